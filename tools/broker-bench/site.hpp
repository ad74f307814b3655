// tools/broker-bench/site.hpp: the generated site a scenario runs on, and the brokerd the harness
// starts on it (or an external one).
//
// The site (site_toml): domain BENCH, one delivery group of N machines of the scenario's kind
// (a shared single-session "Pool", a private assign-on-first-use "Personal", or a shared
// multi-session "Hosted"), an apps-only group "Apps" (no machines) with A applications, U users
// in the built-in directory (all with the password kPassword, all members of BENCH\Domain Users,
// which the rules name), and a trusted front end 127.0.0.1 (trust_xml_requests). Machine names
// come from ranges of at most 10000 (docs/configuration.md "Machine ranges"); machine_name()
// gives the same names, so the agent workers and the config agree.
#pragma once

#include "tools/broker-bench/process.hpp"

#include <cstdint>
#include <map>
#include <memory>
#include <string>

namespace bench {

enum class Kind { shared, personal, hosted };
const char* to_string(Kind k);
bool parse_kind(const std::string& s, Kind& out);

inline constexpr const char* kDomain = "BENCH";
inline constexpr const char* kEnrollKey = "broker-bench-enrollment-key";
inline constexpr const char* kAdminToken = "broker-bench-admin-token";
inline constexpr const char* kPassword = "Bench-Passw0rd";
inline constexpr int kRangeSize = 10000;  // a [[machine]] range holds at most this many

// Machine `index` (0..total-1) of a site of `total` machines: "BENCH\\pool1-00001".
std::string machine_name(Kind kind, int index, int total);
std::string catalog_name(Kind kind);
std::string group_name(Kind kind);  // the desktop's InName in NFuse requests
std::string user_name(int index);   // index 0..U-1: "u000001" (domain BENCH)
// The address machine `index` reports (198.18.0.0/15, the benchmarking range; never contacted).
std::string machine_address(int index);

struct SiteOptions {
  Kind kind = Kind::shared;
  int machines = 100;
  int users = 100;
  int applications = 5;
  int heartbeat_interval_seconds = 60;
  int credential_cache_seconds = 3600;
  std::string database_path;  // required
  std::string log_file;       // empty: stderr of brokerd
  std::string log_level = "info";
  int io_threads = 2;
  int worker_threads = 8;
};
// The whole brokerd.toml: listeners on port 0, the admin token kAdminToken, /metrics without a
// token, the agent listener's per-address cap raised (every simulated agent comes from 127.0.0.1).
std::string site_toml(const SiteOptions& options);

// Counters and gauges from /metrics, summed over their labels ("name" -> value), plus each
// labelled series ("name{labels}" -> value).
using MetricMap = std::map<std::string, double>;
MetricMap parse_metrics(const std::string& text);

// The broker under test: one the harness started (start()) or an external one (attach()).
class Broker {
 public:
  Broker();
  ~Broker();  // stops a broker the harness started
  Broker(const Broker&) = delete;
  Broker& operator=(const Broker&) = delete;

  // Writes `config` to <dir>/brokerd.toml and starts `brokerd_path` on it; false (with `error`
  // set, naming the log) when it exits or is not ready within 120 s.
  bool start(const std::string& brokerd_path, const std::string& dir, const std::string& config, std::string& error);
  // An external broker: its three base URLs and, when known, its pid (0: no /proc figures).
  void attach(std::string xml_url, std::string agent_url, std::string admin_url, int pid);
  // SIGTERM (a started broker only); its exit code.
  int stop();

  const std::string& xml_url() const { return xml_url_; }      // http://127.0.0.1:P
  const std::string& agent_url() const { return agent_url_; }  // ws://127.0.0.1:P/cbp
  const std::string& admin_url() const { return admin_url_; }  // http://127.0.0.1:P
  int pid() const { return pid_; }
  bool started() const { return started_; }

  ProcUsage usage() const;  // ok=false without a pid
  // GET /metrics; empty on failure.
  MetricMap metrics() const;

 private:
  std::string xml_url_, agent_url_, admin_url_;
  int pid_ = 0;
  bool started_ = false;
};

// A temporary directory, removed with its contents on destruction unless keep().
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  void keep() { keep_ = true; }

 private:
  std::string path_;
  bool keep_ = false;
};

}  // namespace bench
