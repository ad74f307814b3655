// cbp/agent_channel.hpp: the launcher's view of the agents (broker::AgentChannel) on top of the
// agent endpoint: each call becomes one CBP command (docs/cbp.md "command").
#pragma once

#include "broker/launcher.hpp"

namespace cbp {

class AgentEndpoint;

class EndpointChannel final : public broker::AgentChannel {
 public:
  explicit EndpointChannel(AgentEndpoint& endpoint) : endpoint_(endpoint) {}

  void prepare_session(const std::string& machine, const broker::PrepareSession& request,
                       std::chrono::milliseconds timeout, Done done) override;
  void logoff_session(const std::string& machine, const std::string& session_key, std::chrono::milliseconds timeout,
                      Done done) override;
  void disconnect_session(const std::string& machine, const std::string& session_key,
                          std::chrono::milliseconds timeout, Done done) override;
  void send_message(const std::string& machine, const std::string& session_key, const std::string& title,
                    const std::string& text, std::chrono::milliseconds timeout, Done done) override;

 private:
  AgentEndpoint& endpoint_;
};

}  // namespace cbp
