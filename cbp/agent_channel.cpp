// cbp/agent_channel.cpp: see agent_channel.hpp.
#include "cbp/agent_channel.hpp"

#include "cbp/endpoint.hpp"

namespace cbp {

namespace {

std::function<void(CommandOutcome)> reply(broker::AgentChannel::Done done) {
  return [done = std::move(done)](CommandOutcome o) { done(o.ok, o.error); };
}

}  // namespace

void EndpointChannel::prepare_session(const std::string& machine, const broker::PrepareSession& r,
                                      std::chrono::milliseconds timeout, Done done) {
  PrepareSessionArgs a;
  a.user = r.user;
  a.resource = r.resource;
  a.session_type = r.application ? SessionType::application : SessionType::desktop;
  a.ticket_ref = r.ticket;
  a.session_key = r.session_key;
  a.connect_timeout_seconds = r.connect_timeout_seconds;
  a.client_name = r.client_name;
  a.client_address = r.client_address;
  a.command_line_executable = r.command_line_executable;
  a.command_line_arguments = r.command_line_arguments;
  a.working_directory = r.working_directory;
  endpoint_.send_command(machine, std::move(a), timeout, reply(std::move(done)));
}

void EndpointChannel::logoff_session(const std::string& machine, const std::string& session_key,
                                     std::chrono::milliseconds timeout, Done done) {
  endpoint_.send_command(machine, LogoffSessionArgs{session_key}, timeout, reply(std::move(done)));
}

void EndpointChannel::disconnect_session(const std::string& machine, const std::string& session_key,
                                         std::chrono::milliseconds timeout, Done done) {
  endpoint_.send_command(machine, DisconnectSessionArgs{session_key}, timeout, reply(std::move(done)));
}

void EndpointChannel::send_message(const std::string& machine, const std::string& session_key,
                                   const std::string& title, const std::string& text,
                                   std::chrono::milliseconds timeout, Done done) {
  SendMessageArgs a;
  a.session_key = session_key;
  a.title = title;
  a.text = text;
  endpoint_.send_command(machine, std::move(a), timeout, reply(std::move(done)));
}

}  // namespace cbp
