// tools/vda-agent/power_follower.cpp: see power_follower.hpp.
#include "tools/vda-agent/power_follower.hpp"

#include <boost/json.hpp>

#include <fstream>
#include <sstream>

namespace vda {

std::string vm_id_of(const std::string& machine) {
  const auto slash = machine.rfind('\\');
  return slash == std::string::npos ? machine : machine.substr(slash + 1);
}

PowerFollower::PowerFollower(Fleet& fleet, std::string path, Millis interval)
    : fleet_(fleet), path_(std::move(path)), interval_(interval) {}

PowerFollower::~PowerFollower() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void PowerFollower::start() {
  if (!apply()) {
    // No file yet: machines it would name cannot be told apart, so all start (as without it).
    for (auto& m : fleet_.machines()) m.start();
  }
  thread_ = std::thread([this] { run(); });
}

void PowerFollower::run() {
  std::unique_lock lock(mutex_);
  while (!cv_.wait_for(lock, interval_, [this] { return stop_; })) {
    lock.unlock();
    apply();
    lock.lock();
  }
}

std::string PowerFollower::state_of(const std::string& vm_id) const {
  std::lock_guard lock(mutex_);
  auto it = states_.find(vm_id);
  return it == states_.end() ? std::string() : it->second;
}

bool PowerFollower::apply() {
  std::ifstream in(path_);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  boost::system::error_code ec;
  auto v = boost::json::parse(ss.str(), ec);
  if (ec || !v.is_object() || !v.as_object().contains("machines") || !v.as_object().at("machines").is_object())
    return false;  // being rewritten, or not ours: try again at the next poll
  std::map<std::string, std::string> states;
  for (const auto& [k, s] : v.as_object().at("machines").as_object())
    if (s.is_string()) states[std::string(k)] = std::string(s.get_string());
  {
    std::lock_guard lock(mutex_);
    states_ = states;
  }
  // Only changes are acted on: a machine that stopped on its own (a rejection it cannot heal)
  // is not restarted every poll, only when its VM is powered on again.
  for (auto& m : fleet_.machines()) {
    auto it = states.find(vm_id_of(m.name()));
    if (it == states.end()) it = states.find(m.name());
    const std::string state = it == states.end() ? std::string("<absent>") : it->second;
    std::string before;
    {
      std::lock_guard lock(mutex_);
      auto [seen, fresh] = applied_.try_emplace(m.name(), "");
      before = fresh ? std::string("<new>") : seen->second;
      seen->second = state;
    }
    if (state == before) continue;
    const bool running = m.status().running;
    if (state == "<absent>") {
      if (before == "<new>" && !running) m.start();  // not powered by the file: runs as usual
    } else if (state == "On") {
      if (!running) m.start();
    } else if (state == "Off" || state == "TurningOff") {
      if (running) m.stop(cbp::Reason::agent_shutdown, "the machine is shutting down");
    } else if (state == "Suspended" || state == "Suspending") {
      if (running) m.stop(cbp::Reason::agent_suspended, "the machine is suspending");
    }
  }
  return true;
}

}  // namespace vda
