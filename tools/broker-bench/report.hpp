// tools/broker-bench/report.hpp: the figures of a run, printed for people (text) or scripts
// (--json), and the progress line shown while it runs.
#pragma once

#include "tools/broker-bench/ceiling.hpp"
#include "tools/broker-bench/process.hpp"

#include <atomic>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

namespace bench {

struct Latency {
  long long count = 0;
  double p50 = 0, p90 = 0, p99 = 0, max = 0, mean = 0;  // milliseconds
};
Latency summarize(std::vector<double> ms);

// What the broker (and the harness) spent during a phase.
struct Usage {
  bool known = false;              // false: no pid (external broker without --pid)
  double cpu_seconds = 0;          // the broker's user + system time in the phase
  double rss_mib = 0;              // VmRSS at the end of the phase
  double hwm_mib = 0;              // VmHWM (peak RSS) at the end of the phase
  double commits = -1;             // storage commits in the phase (-1: /metrics not readable)
  double commit_writes = -1;       // write() calls those commits carried
  double harness_cpu_seconds = 0;  // agent workers and front ends together
};

struct Phase {
  std::string name;  // "enroll", "reboot", "steady", "trusted", "cold", "warm", "logon", ...
  std::string op;    // what one operation is: "registration", "enumeration", "launch", "heartbeat"
  long long ops = 0;
  double seconds = 0;
  std::map<std::string, Latency> latency;   // per request type (or "registration", "launch to Active")
  std::map<std::string, long long> errors;  // by ErrorId, HTTP status, transport error, rejection reason
  Usage usage;
  std::vector<std::pair<std::string, std::string>> figures;  // further named figures, in order
  double rate() const { return seconds > 0 ? static_cast<double>(ops) / seconds : 0; }
};

struct CeilingRun {
  std::string server;  // "broker HTTP stack (static-server)" or "nginx"
  std::string phase;   // the phase it is the ceiling of
  ReplySizes sizes;
  long long ops = 0;
  double seconds = 0;
  std::map<std::string, Latency> latency;
  std::map<std::string, long long> errors;
  std::string error;  // why it could not run (then no figures)
  double ratio = 0;   // the phase's rate / this rate
  double rate() const { return seconds > 0 ? static_cast<double>(ops) / seconds : 0; }
};

struct Check {
  std::string what;
  bool ok = false;
  std::string detail;
};

struct Report {
  std::string scenario;
  std::string command;
  MachineInfo machine;
  double load_start = 0, load_end = 0;
  std::vector<std::pair<std::string, std::string>> parameters;
  std::vector<Phase> phases;
  std::vector<CeilingRun> ceilings;
  std::vector<Check> checks;
  std::vector<std::string> notes;

  bool ok() const;
  void check(std::string what, bool ok, std::string detail = {});
  std::string text() const;
  std::string json() const;
};

// Prints line() to stderr every second while it lives (on a terminal: rewritten in place;
// otherwise a line every 5 s). Disabled: does nothing.
class Progress {
 public:
  Progress(bool enabled, std::function<std::string()> line);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

 private:
  std::jthread thread_;
};

}  // namespace bench
