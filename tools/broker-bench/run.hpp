// tools/broker-bench/run.hpp: the options of a scenario and what every scenario does around its
// measurements: the temporary directory, the broker (started on a generated site, or external),
// the agent workers, snapshots of the broker's CPU, memory and storage counters, waiting for
// registration storms, the ceiling runs and the report.
#pragma once

#include "tools/broker-bench/frontend.hpp"
#include "tools/broker-bench/report.hpp"
#include "tools/broker-bench/site.hpp"
#include "tools/broker-bench/workers.hpp"

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace bench {

struct Options {
  std::string scenario;  // register, steady, enumerate, logon, mixed
  int machines = -1;     // -1: the scenario's default
  int users = -1;
  int requests = -1;
  int connections = 32;                            // front-end connections
  Kind kind = Kind::shared;                        // logon: the desktop group's kind
  Credentials credentials = Credentials::trusted;  // logon, mixed
  int per_worker = 9000;                           // agents per worker process
  int agent_threads = 2;                           // I/O threads per worker
  int max_sessions = 20;                           // multi-session hosts
  int heartbeat_interval = -1;                     // site heartbeat_interval_seconds (-1: scenario default)
  double duration_seconds = 60;                    // steady: how long to hold
  double reregister_percent = 20;                  // mixed
  double spread_seconds = 10;                      // mixed: re-registrations spread over this long
  bool logoff = false;                             // logon: log every session off afterwards
  std::string ceiling = "all";                     // all, static, nginx, none
  Millis phase_limit{600000};                      // every phase ends by then
  bool json = false, quiet = false, keep = false;
  int applications = 5;
  int io_threads = 2, broker_workers = 8;
  std::string log_level = "info";
  std::string brokerd;  // path; default: next to this build's tools
  // An external broker (then the site must be the one `broker-bench site` prints).
  std::string xml_url, agent_url, admin_url;
  int pid = 0;
  std::string command_line;
};

// One broker usage snapshot.
struct Snapshot {
  std::chrono::steady_clock::time_point at;
  ProcUsage broker;
  MetricMap metrics;
  double harness_cpu = 0;
};

class Run {
 public:
  explicit Run(const Options& options);
  ~Run();

  const Options& options() const { return o_; }
  Report& report() { return report_; }
  Broker& broker() { return broker_; }
  TempDir& dir() { return dir_; }
  AgentWorkers& agents() { return *agents_; }

  // Starts brokerd on the generated site (or attaches to the external one). False: reported.
  bool start_broker(const SiteOptions& site);
  // Starts the agent workers for `machines` machines of `kind` (not yet connecting).
  void start_agents(Kind kind, int machines, Millis client_delay = Millis{0});

  Snapshot snapshot();
  // Fills phase.usage from two snapshots.
  void usage(Phase& phase, const Snapshot& before, const Snapshot& after) const;
  // Waits until the broker's CPU use stays under 5 % of a core for half a second (at most 20 s):
  // work a phase queued (commits, logging) is counted in that phase.
  void wait_quiet();
  // Sends `command` (start, or none when empty) to the workers and waits until `expected`
  // machines are registered: the phase "registration storm". Returns the phase (ops: machines
  // that registered; latency: from the command to each registration).
  Phase registration_storm(const std::string& name, const std::string& command, int expected);
  // Waits (bounded by the phase limit) until the broker holds no agent connection.
  bool wait_agents_gone();

  // Runs `items` front-end items against a ceiling server of each kind (--ceiling) answering
  // `sizes`, with the same connection count (at least 10000 items, so that a short phase still
  // gets a steady ceiling); each CeilingRun's ratio is phase_rate / its rate.
  void ceilings(const std::string& phase, double phase_rate, const ReplySizes& sizes, std::size_t items,
                const std::function<void(std::size_t, Connection&)>& work);

  // The process exit code: 0 when every check passed, 1 otherwise; prints the report.
  int finish();

  bool progress_enabled() const { return !o_.quiet; }

 private:
  Options o_;
  Report report_;
  TempDir dir_;
  Broker broker_;
  std::unique_ptr<AgentWorkers> agents_;
};

std::string format_fixed(double v, int digits);
std::int64_t now_ns();
// Latency in ms of each time in `times` (steady ns) after `start` (steady ns).
std::vector<double> since(const std::vector<std::int64_t>& times, std::int64_t start);

int scenario_register(Run& run);
int scenario_steady(Run& run);
int scenario_enumerate(Run& run);
int scenario_logon(Run& run);
int scenario_mixed(Run& run);

}  // namespace bench
