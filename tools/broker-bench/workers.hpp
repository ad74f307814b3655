// tools/broker-bench/workers.hpp: the simulated agents, in child processes ("agent workers").
//
// One process may hold at most 20,000 descriptors here (a hard limit), so the N agents of a storm
// are spread over several workers, each a `broker-bench agent-worker` process running one
// vda::Fleet (tools/vda-agent) with up to `per_worker` machines. The parent drives them over their
// stdin/stdout with one-line commands; each reply ends with a line "end":
//
//   start                      start every machine (connect, enroll or answer with the secret)
//   stop                       graceful stop of every machine (goodbye AgentShutdown); "ok left=N"
//   mark                       forget the events seen so far (the next phase starts now)
//   counts                     events since mark: registered=, enrolled=, logons=, failed_logons=,
//                              rejected=, cannot_connect=, ended=, cc.WHY= (cannot connect, by why)
//   status                     a scan of every machine: machines=, registered=, offline=, ...,
//                              overfull= (machines holding more sessions than they can), rej.REASON=
//   events                     "R t t ..." (registration times), "L name=t ..." (first logon per
//                              machine) and "A t t ..." (every logon): steady_clock nanoseconds,
//                              comparable between processes
//   interrupt PERCENT SPREAD_MS drop the connection of PERCENT % of the machines (chosen at
//                              random), spread over SPREAD_MS; they re-register with their secret
//   logoff                     log off every session; "ok n=N"
//   quit                       exit (connections dropped)
//
// Events are read from the agents' own log lines ("NAME: registered (...", "NAME: USER logged on
// to session ..."), through a logger sink in the worker: the harness needs no change to the
// agent. The smoke test checks that every registration and logon was seen this way.
#pragma once

#include "tools/broker-bench/process.hpp"
#include "tools/broker-bench/site.hpp"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace bench {

struct AgentOptions {
  std::string broker_url;  // ws://127.0.0.1:P/cbp
  Kind kind = Kind::shared;
  int total = 0;             // machines: indexes 0..total-1 of the site
  int per_worker = 9000;     // most machines in one worker process
  int threads = 2;           // I/O threads per worker
  int max_sessions = 20;     // multi-session hosts
  Millis client_delay{0};    // after prepare_session, the simulated client connects
  Millis backoff_base{500};  // reconnect back-off (docs/cbp.md), short for storms
  Millis backoff_max{5000};
  std::string log_dir;  // the workers' stderr: <log_dir>/agent-worker-<i>.log
};

using Totals = std::map<std::string, long long>;

// Registration and logon times reported by the workers.
struct Events {
  std::vector<std::int64_t> registered;                  // steady_clock ns
  std::map<std::string, std::int64_t> logon_by_machine;  // first logon after mark
  std::vector<std::int64_t> logons;                      // every logon after mark
};

class AgentWorkers {
 public:
  // Starts ceil(total / per_worker) workers with the machines split evenly; each has its fleet
  // built (not started) when this returns. Throws std::runtime_error when one does not come up.
  explicit AgentWorkers(const AgentOptions& options);
  ~AgentWorkers();  // quit, then terminate what is left
  AgentWorkers(const AgentWorkers&) = delete;
  AgentWorkers& operator=(const AgentWorkers&) = delete;

  std::size_t size() const { return workers_.size(); }
  std::vector<int> pids() const;
  // Sends `command` to every worker (all first, then reads), returns each one's reply lines.
  // Throws std::runtime_error when a worker does not answer within `timeout`.
  std::vector<std::vector<std::string>> all(const std::string& command, Millis timeout = Millis{120000});
  // "counts" or "status" (or any reply of key=value words) summed over the workers.
  Totals totals(const std::string& command, Millis timeout = Millis{120000});
  Events events();
  // CPU seconds of the workers together (from /proc).
  double cpu_seconds() const;

 private:
  struct Worker {
    Child child;
    LineReader reader;
  };
  std::vector<Worker> workers_;
};

// The child side: `broker-bench agent-worker ...` (main.cpp passes its arguments). Returns the
// exit code.
int agent_worker_main(const std::vector<std::string>& args);

}  // namespace bench
