// tools/broker-bench/workers.cpp: the parent side of the agent workers (see workers.hpp).
#include "tools/broker-bench/workers.hpp"

#include <unistd.h>

#include <algorithm>
#include <sstream>
#include <stdexcept>

namespace bench {

AgentWorkers::AgentWorkers(const AgentOptions& o) {
  const int per = std::max(1, o.per_worker);
  const int n = std::max(1, (o.total + per - 1) / per);
  const std::string exe = self_exe();
  int first = 0;
  for (int i = 0; i < n; ++i) {
    const int count = o.total / n + (i < o.total % n ? 1 : 0);
    std::vector<std::string> argv{exe,
                                  "agent-worker",
                                  "--broker-url",
                                  o.broker_url,
                                  "--kind",
                                  to_string(o.kind),
                                  "--total",
                                  std::to_string(o.total),
                                  "--first",
                                  std::to_string(first),
                                  "--count",
                                  std::to_string(count),
                                  "--threads",
                                  std::to_string(o.threads),
                                  "--max-sessions",
                                  std::to_string(o.max_sessions),
                                  "--client-delay-ms",
                                  std::to_string(o.client_delay.count()),
                                  "--backoff-base-ms",
                                  std::to_string(o.backoff_base.count()),
                                  "--backoff-max-ms",
                                  std::to_string(o.backoff_max.count())};
    Worker w;
    w.child = spawn(argv, true, {}, o.log_dir + "/agent-worker-" + std::to_string(i + 1) + ".log");
    w.reader = LineReader(w.child.out_fd);
    workers_.push_back(std::move(w));
    first += count;
  }
  // Each worker says "ready" once its fleet is built.
  for (std::size_t i = 0; i < workers_.size(); ++i) {
    std::string line;
    if (!workers_[i].reader.read(line, Millis{60000}) || line != "ready")
      throw std::runtime_error("agent worker " + std::to_string(i + 1) + " did not start (see " + o.log_dir +
                               "/agent-worker-" + std::to_string(i + 1) + ".log)");
  }
}

AgentWorkers::~AgentWorkers() {
  for (auto& w : workers_) write_all(w.child.in_fd, "quit\n");
  for (auto& w : workers_) {
    if (wait_exit(w.child.pid, Millis{20000}) < 0) terminate(w.child.pid, Millis{5000});
    ::close(w.child.in_fd);
    ::close(w.child.out_fd);
  }
}

std::vector<int> AgentWorkers::pids() const {
  std::vector<int> p;
  for (const auto& w : workers_) p.push_back(w.child.pid);
  return p;
}

std::vector<std::vector<std::string>> AgentWorkers::all(const std::string& command, Millis timeout) {
  for (std::size_t i = 0; i < workers_.size(); ++i)
    if (!write_all(workers_[i].child.in_fd, command + "\n"))
      throw std::runtime_error("agent worker " + std::to_string(i + 1) + " is gone (command " + command + ")");
  std::vector<std::vector<std::string>> replies(workers_.size());
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (std::size_t i = 0; i < workers_.size(); ++i) {
    for (std::size_t lines = 0;; ++lines) {
      const auto left = std::chrono::duration_cast<Millis>(deadline - std::chrono::steady_clock::now());
      std::string line;
      if (lines > 1000 || !workers_[i].reader.read(line, std::max(left, Millis{0})))
        throw std::runtime_error("agent worker " + std::to_string(i + 1) + " did not answer '" + command + "'");
      if (line == "end") break;
      replies[i].push_back(std::move(line));
    }
  }
  return replies;
}

Totals AgentWorkers::totals(const std::string& command, Millis timeout) {
  Totals t;
  for (const auto& reply : all(command, timeout))
    for (const auto& line : reply) {
      std::istringstream in(line);
      for (std::string word; in >> word;) {
        const auto eq = word.find('=');
        if (eq == std::string::npos) continue;
        t[word.substr(0, eq)] += std::stoll(word.substr(eq + 1));
      }
    }
  return t;
}

Events AgentWorkers::events() {
  Events e;
  for (const auto& reply : all("events"))
    for (const auto& line : reply) {
      std::istringstream in(line);
      std::string tag;
      in >> tag;
      for (std::string word; in >> word;) {
        if (tag == "R") {
          e.registered.push_back(std::stoll(word));
        } else if (tag == "A") {
          e.logons.push_back(std::stoll(word));
        } else if (tag == "L") {
          const auto eq = word.rfind('=');
          if (eq != std::string::npos) e.logon_by_machine.emplace(word.substr(0, eq), std::stoll(word.substr(eq + 1)));
        }
      }
    }
  return e;
}

double AgentWorkers::cpu_seconds() const {
  double s = 0;
  for (const auto& w : workers_) s += read_usage(w.child.pid).cpu_seconds;
  return s;
}

}  // namespace bench
