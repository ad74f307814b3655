// cbp/endpoint.hpp: the agent endpoint. Runs the CBP conversation (docs/cbp.md) of every agent
// connection: challenge, authentication (machine secret or catalog enrollment key, with a
// back-off after repeated failures), version choice, registration, heartbeats, session events,
// commands pushed to agents and ticket redemption. The engine (broker::AgentRegistry) keeps the
// state; this layer only translates messages and tracks connections. A connection the agent
// listener accepted over its cap (net::WebSocketPeer::over_limit()) gets `rejected`
// BrokerRegistrationLimitReached with retry_after_seconds at its hello (docs/cbp.md
// "Registration limit").
//
// Threading: WebSocket callbacks arrive on I/O threads; each connection's messages are processed
// in order on the work queue (registry calls block on storage). A small timer thread enforces the
// handshake deadlines and command timeouts. Thread-safe.
#pragma once

#include "cbp/messages.hpp"
#include "net/websocket.hpp"

#include <spdlog/fwd.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace broker {
class AgentRegistry;
}
namespace common {
class Scheduler;
class Metrics;
class WorkQueue;
}  // namespace common

namespace cbp {

struct EndpointOptions {
  std::chrono::seconds heartbeat_interval{60};
  int missed_heartbeats = 3;
  std::chrono::milliseconds hello_timeout = kHelloTimeout;
  std::chrono::milliseconds register_timeout = kRegisterTimeout;
  std::string broker_name = "openbroker";
  // Received messages waiting to be processed, per connection (docs/cbp.md "Limits"). A peer that
  // sends faster than the broker processes is closed (`rejected`/`error` ProtocolError "too many
  // messages waiting") once its queue holds more than max_inbox_messages or max_inbox_bytes, or,
  // before it is registered, more than max_handshake_inbox_messages (an agent sends one message
  // and waits for the answer at each handshake step).
  std::size_t max_inbox_messages = 1024;
  std::size_t max_inbox_bytes = 16u << 20;
  std::size_t max_handshake_inbox_messages = 4;
  // Failed authentications (BadProof, EnrollmentRefused) per remote address (an IPv6 peer by its
  // /64), whatever machine names the hellos give: more than this within address_failure_window
  // put the whole address in back-off for address_backoff (`rejected` TooManyFailures, the proof
  // not examined). Generous, as many machines may share one NATed address; 0: no per-address
  // limit. The per-(machine, address) back-off (kMaxAuthFailures) applies as well. docs/cbp.md
  // "Back-off after failures".
  int max_auth_failures_per_address = 100;
  std::chrono::seconds address_failure_window = kAuthFailureWindow;
  std::chrono::seconds address_backoff = kAuthBackoff;
  std::size_t max_tracked_addresses = 100000;  // addresses remembered for that (bounded memory)
  // Where the deadline checks (every 200 ms) run: brokerd passes the I/O threads' timers
  // (net::Server::scheduler()), which must outlive the endpoint. nullptr: a thread of its own
  // (tests, tools).
  common::Scheduler* scheduler = nullptr;
};

struct CommandOutcome {
  bool ok = false;
  std::string error;  // the agent's error, "timeout", "not connected" or "connection closed"
};

class AgentEndpoint {
 public:
  AgentEndpoint(broker::AgentRegistry& registry, common::WorkQueue& work, EndpointOptions options,
                std::shared_ptr<spdlog::logger> logger, common::Metrics* metrics = nullptr);
  ~AgentEndpoint();  // stops the deadline checks
  AgentEndpoint(const AgentEndpoint&) = delete;
  AgentEndpoint& operator=(const AgentEndpoint&) = delete;

  // The WebSocket handler for the agent listener (path /cbp, idle timeout = heartbeat interval
  // x missed heartbeats: a silent agent is closed and deregistered with ContactLost).
  net::WebSocketHandler handler();

  // Sends a command to the machine's registered agent; `done` is called once, from any thread
  // (possibly this one, before send_command returns), with the agent's result, or "not
  // connected" / "timeout" / "connection closed" / "the agent does not support <command>" (not in
  // the agent's register.capabilities). No lock of the endpoint is held while `done` runs.
  void send_command(const std::string& machine, CommandArgs args, std::chrono::milliseconds timeout,
                    std::function<void(CommandOutcome)> done);
  // Closes the machine's agent connection and deregisters it with `reason` (DesktopRemoved when an
  // admin deletes the machine). No-op when it is not connected.
  void disconnect(const std::string& machine, Reason reason);
  // From now on closing connections do not deregister machines (the broker is stopping; at the
  // next start every machine is Unregistered until its agent registers again). Sends every
  // registered agent `error` BrokerShutdown; the server's stop() then closes the connections.
  void begin_shutdown();

  std::vector<std::string> registered_machines() const;

  // Called (from a worker thread) each time an agent has registered and been told so, i.e. once
  // commands can be sent to it. Set before the agent listener starts.
  void on_registered(std::function<void(const std::string& machine)> observer);

 private:
  struct Impl;
  struct Connection;
  static void arm_deadline_checks(const std::shared_ptr<Impl>& impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace cbp
