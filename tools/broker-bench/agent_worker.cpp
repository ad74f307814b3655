// tools/broker-bench/agent_worker.cpp: the child side of the agent workers (see workers.hpp): a
// vda::Fleet of simulated machines driven by one-line commands on stdin, with a logger sink that
// turns the agents' log lines into timed events.
#include "tools/broker-bench/workers.hpp"
#include "tools/vda-agent/agent.hpp"

#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

namespace bench {
namespace {

using Clock = std::chrono::steady_clock;

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

// What the agents' log lines tell, since the last mark. The message formats are those of
// tools/vda-agent/agent.cpp ("NAME: registered (protocol ...").
class EventSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  void mark() {
    std::lock_guard lock(mutex_);
    registered_.clear();
    logons_.clear();
    logon_times_.clear();
    counts_.clear();
  }
  std::string counts() {
    std::lock_guard lock(mutex_);
    std::string out;
    for (const char* k : {"registered", "enrolled", "logons", "failed_logons", "rejected", "cannot_connect", "ended"})
      out += std::string(k) + "=" + std::to_string(counts_[k]) + " ";
    for (const auto& [k, v] : counts_)
      if (k.rfind("cc.", 0) == 0) out += k + "=" + std::to_string(v) + " ";
    return out;
  }
  std::vector<std::string> events() {
    std::lock_guard lock(mutex_);
    std::string r = "R", l = "L", a = "A";
    for (auto t : registered_) r += " " + std::to_string(t);
    for (const auto& [name, t] : logons_) l += " " + name + "=" + std::to_string(t);
    for (auto t : logon_times_) a += " " + std::to_string(t);
    return {r, l, a};
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    const std::string_view text(msg.payload.data(), msg.payload.size());
    const auto colon = text.find(": ");
    if (colon == std::string_view::npos) return;
    const std::string_view name = text.substr(0, colon);
    const std::string_view rest = text.substr(colon + 2);
    if (rest.starts_with("registered (")) {
      registered_.push_back(now_ns());
      ++counts_["registered"];
    } else if (rest.starts_with("enrolled in catalog")) {
      ++counts_["enrolled"];
    } else if (rest.find(" logged on to session ") != std::string_view::npos ||
               rest.find(" reconnected to session ") != std::string_view::npos) {
      const auto t = now_ns();
      logons_.emplace(std::string(name), t);
      logon_times_.push_back(t);
      ++counts_["logons"];
    } else if (rest.starts_with("logon to session ")) {
      ++counts_["failed_logons"];
    } else if (rest.starts_with("rejected by the broker")) {
      ++counts_["rejected"];
    } else if (rest.starts_with("cannot connect")) {
      ++counts_["cannot_connect"];
      // "cannot connect to URL: WHY": counted by WHY, one word (cc.connection_refused=3).
      const auto why = rest.rfind(": ");
      std::string key = "cc." + std::string(why == std::string_view::npos ? "other" : rest.substr(why + 2));
      for (char& ch : key)
        if (ch == ' ' || ch == '=') ch = '_';
      ++counts_[key];
    } else if (rest.starts_with("connection ended")) {
      ++counts_["ended"];
    }
    // Warnings and worse go to stderr (the worker's log file), a bounded number of them.
    if (msg.level >= spdlog::level::warn && written_ < 200) {
      ++written_;
      std::fprintf(stderr, "%.*s\n", static_cast<int>(text.size()), text.data());
    }
  }
  void flush_() override { std::fflush(stderr); }

 private:
  std::vector<std::int64_t> registered_;
  std::map<std::string, std::int64_t> logons_;  // first logon per machine
  std::vector<std::int64_t> logon_times_;       // every logon
  std::map<std::string, long long> counts_;
  int written_ = 0;
};

struct WorkerArgs {
  std::string broker_url;
  Kind kind = Kind::shared;
  int total = 0, first = 0, count = 0, threads = 2, max_sessions = 20;
  long long client_delay_ms = 0, backoff_base_ms = 500, backoff_max_ms = 5000;
};

bool parse(const std::vector<std::string>& args, WorkerArgs& a) {
  for (std::size_t i = 0; i + 1 < args.size(); i += 2) {
    const auto& k = args[i];
    const auto& v = args[i + 1];
    if (k == "--broker-url")
      a.broker_url = v;
    else if (k == "--kind") {
      if (!parse_kind(v, a.kind)) return false;
    } else if (k == "--total")
      a.total = std::stoi(v);
    else if (k == "--first")
      a.first = std::stoi(v);
    else if (k == "--count")
      a.count = std::stoi(v);
    else if (k == "--threads")
      a.threads = std::stoi(v);
    else if (k == "--max-sessions")
      a.max_sessions = std::stoi(v);
    else if (k == "--client-delay-ms")
      a.client_delay_ms = std::stoll(v);
    else if (k == "--backoff-base-ms")
      a.backoff_base_ms = std::stoll(v);
    else if (k == "--backoff-max-ms")
      a.backoff_max_ms = std::stoll(v);
    else
      return false;
  }
  return args.size() % 2 == 0 && !a.broker_url.empty() && a.count > 0;
}

void reply(const std::vector<std::string>& lines) {
  for (const auto& l : lines) std::cout << l << "\n";
  std::cout << "end" << std::endl;
}

std::string status_line(vda::Fleet& fleet, cbp::SessionSupport support, int max_sessions) {
  std::map<std::string, long long> c;
  for (const char* k : {"machines", "registered", "offline", "connecting", "handshake", "stopped", "enrolled",
                        "registrations", "heartbeats", "logons", "failed_logons", "sessions", "overfull"})
    c[k] = 0;
  const std::size_t limit = support == cbp::SessionSupport::single_session ? 1 : static_cast<std::size_t>(max_sessions);
  for (const auto& m : fleet.machines()) {
    const auto s = m.status();
    ++c["machines"];
    ++c[std::string(vda::to_string(s.state))];
    c["enrolled"] += s.enrolled ? 1 : 0;
    c["registrations"] += s.registrations;
    c["heartbeats"] += s.heartbeats;
    c["logons"] += s.logons;
    c["failed_logons"] += s.failed_logons;
    c["sessions"] += static_cast<long long>(s.sessions.size());
    if (s.sessions.size() > limit) ++c["overfull"];
    for (auto r : s.rejections) ++c["rej." + std::string(cbp::to_string(r))];
  }
  std::string out;
  for (const auto& [k, v] : c) out += k + "=" + std::to_string(v) + " ";
  return out;
}

}  // namespace

int agent_worker_main(const std::vector<std::string>& args) {
  WorkerArgs a;
  try {
    if (!parse(args, a)) {
      std::cerr << "agent-worker: bad arguments\n";
      return 2;
    }
  } catch (const std::exception& e) {
    std::cerr << "agent-worker: bad arguments: " << e.what() << "\n";
    return 2;
  }
  raise_descriptor_limit();
  auto sink = std::make_shared<EventSink>();
  auto logger = std::make_shared<spdlog::logger>("agents", sink);
  logger->set_level(spdlog::level::info);

  vda::FleetOptions fo;
  fo.broker_url = a.broker_url;
  fo.threads = a.threads;
  fo.logger = logger;
  fo.backoff_base = Millis{a.backoff_base_ms};
  fo.backoff_max = Millis{a.backoff_max_ms};
  fo.client_connect_delay = Millis{a.client_delay_ms};
  const auto support =
      a.kind == Kind::hosted ? cbp::SessionSupport::multi_session : cbp::SessionSupport::single_session;
  std::unique_ptr<vda::Fleet> fleet;
  try {
    fleet = std::make_unique<vda::Fleet>(fo);
  } catch (const std::exception& e) {
    std::cerr << "agent-worker: " << e.what() << "\n";
    return 1;
  }
  for (int i = a.first; i < a.first + a.count; ++i) {
    vda::MachineConfig mc;
    mc.name = machine_name(a.kind, i, a.total);
    mc.catalog = catalog_name(a.kind);
    mc.session_support = support;
    mc.enroll_key = kEnrollKey;
    mc.address = machine_address(i);
    mc.max_sessions = a.max_sessions;
    fleet->add(std::move(mc));
  }
  std::cout << "ready" << std::endl;

  std::vector<std::jthread> interrupters;
  for (std::string line; std::getline(std::cin, line);) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    if (cmd == "start") {
      fleet->start();
      reply({"ok"});
    } else if (cmd == "stop") {
      const auto left = fleet->stop(cbp::Reason::agent_shutdown, Millis{60000});
      reply({"ok left=" + std::to_string(left)});
    } else if (cmd == "mark") {
      sink->mark();
      reply({"ok"});
    } else if (cmd == "counts") {
      reply({sink->counts()});
    } else if (cmd == "status") {
      reply({status_line(*fleet, support, a.max_sessions)});
    } else if (cmd == "events") {
      reply(sink->events());
    } else if (cmd == "interrupt") {
      double percent = 0;
      long long spread_ms = 0;
      in >> percent >> spread_ms;
      auto machines = fleet->machines();
      std::mt19937_64 rng{std::random_device{}()};
      std::shuffle(machines.begin(), machines.end(), rng);
      machines.resize(std::min(machines.size(), static_cast<std::size_t>(static_cast<double>(machines.size()) *
                                                                         std::clamp(percent, 0.0, 100.0) / 100.0)));
      const auto n = machines.size();
      spread_ms = std::clamp<long long>(spread_ms, 0, 3600000);
      // One thread walks through the machines at an even pace; stop_token ends it at quit.
      interrupters.emplace_back([machines = std::move(machines), spread_ms](std::stop_token stop) {
        const auto start = Clock::now();
        for (std::size_t i = 0; i < machines.size() && !stop.stop_requested(); ++i) {
          const auto at = start + Millis{machines.size() > 1 ? spread_ms * static_cast<long long>(i) /
                                                                   static_cast<long long>(machines.size() - 1)
                                                             : 0};
          while (Clock::now() < at && !stop.stop_requested()) std::this_thread::sleep_for(Millis{5});
          vda::Machine m = machines[i];  // a handle: the copy refers to the same machine
          m.interrupt();
        }
      });
      reply({"ok n=" + std::to_string(n)});
    } else if (cmd == "logoff") {
      long long n = 0;
      for (auto& m : fleet->machines())
        for (const auto& s : m.status().sessions) n += m.logoff_session(s.info.session_key) ? 1 : 0;
      reply({"ok n=" + std::to_string(n)});
    } else if (cmd == "quit") {
      reply({"ok"});
      break;
    } else {
      reply({"error unknown command"});
    }
  }
  for (auto& t : interrupters) t.request_stop();
  interrupters.clear();
  fleet.reset();
  return 0;
}

}  // namespace bench
