// broker/instant_agents.hpp: an AgentChannel for tests and benchmarks whose agents accept every
// command at once: prepare_session answers from another thread, as the agent endpoint does
// (the launcher must not depend on being called back on its own thread); the other commands
// answer inline. Not used by brokerd.
#pragma once

#include "broker/launcher.hpp"

#include <thread>

namespace broker {

class InstantAgents final : public AgentChannel {
 public:
  void prepare_session(const std::string&, const PrepareSession&, std::chrono::milliseconds, Done done) override {
    std::thread([done = std::move(done)] { done(true, {}); }).detach();
  }
  void logoff_session(const std::string&, const std::string&, std::chrono::milliseconds, Done done) override {
    done(true, {});
  }
  void disconnect_session(const std::string&, const std::string&, std::chrono::milliseconds, Done done) override {
    done(true, {});
  }
  void send_message(const std::string&, const std::string&, const std::string&, const std::string&,
                    std::chrono::milliseconds, Done done) override {
    done(true, {});
  }
};

}  // namespace broker
