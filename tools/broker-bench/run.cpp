// tools/broker-bench/run.cpp: see run.hpp.
#include "tools/broker-bench/run.hpp"

#include <iomanip>
#include <iostream>
#include <sstream>
#include <thread>

namespace bench {
namespace {
using Clock = std::chrono::steady_clock;
constexpr std::size_t kMinCeilingItems = 10000;
double mib(std::uint64_t kib) { return static_cast<double>(kib) / 1024.0; }
double metric(const MetricMap& m, const std::string& name) {
  auto it = m.find(name);
  return it == m.end() ? 0 : it->second;
}
}  // namespace

std::string format_fixed(double v, int digits) {
  std::ostringstream s;
  s << std::fixed << std::setprecision(digits) << v;
  return s.str();
}

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

std::vector<double> since(const std::vector<std::int64_t>& times, std::int64_t start) {
  std::vector<double> out;
  out.reserve(times.size());
  for (auto t : times) out.push_back(static_cast<double>(t - start) / 1e6);
  return out;
}

Run::Run(const Options& options) : o_(options) {
  report_.scenario = o_.scenario;
  report_.command = o_.command_line;
  report_.machine = machine_info();
  report_.load_start = load_average();
  if (o_.keep) dir_.keep();
}

Run::~Run() {
  agents_.reset();
  broker_.stop();
}

bool Run::start_broker(const SiteOptions& site_in) {
  if (!o_.xml_url.empty()) {
    broker_.attach(o_.xml_url, o_.agent_url, o_.admin_url, o_.pid);
    report_.parameters.push_back({"broker", "external (" + o_.xml_url + ", pid " + std::to_string(o_.pid) + ")"});
    return true;
  }
  SiteOptions site = site_in;
  site.database_path = dir_.file("broker.db");
  site.log_file = dir_.file("brokerd.log");
  site.log_level = o_.log_level;
  site.io_threads = o_.io_threads;
  site.worker_threads = o_.broker_workers;
  std::string error;
  if (!broker_.start(o_.brokerd, dir_.path(), site_toml(site), error)) {
    dir_.keep();
    report_.check("brokerd starts on the generated site", false, error + " (kept " + dir_.path() + ")");
    return false;
  }
  report_.parameters.push_back({"broker", o_.brokerd + " (pid " + std::to_string(broker_.pid()) + "), log level " +
                                              o_.log_level + ", " + std::to_string(o_.io_threads) + " I/O threads, " +
                                              std::to_string(o_.broker_workers) + " worker threads"});
  report_.parameters.push_back({"site", std::to_string(site.machines) + " machines in a " + to_string(site.kind) +
                                            " group, " + std::to_string(site.users) + " users, " +
                                            std::to_string(site.applications) + " applications, heartbeat every " +
                                            std::to_string(site.heartbeat_interval_seconds) + " s, credential cache " +
                                            std::to_string(site.credential_cache_seconds) + " s"});
  return true;
}

void Run::start_agents(Kind kind, int machines, Millis client_delay) {
  AgentOptions ao;
  ao.broker_url = broker_.agent_url();
  ao.kind = kind;
  ao.total = machines;
  ao.per_worker = o_.per_worker;
  ao.threads = o_.agent_threads;
  ao.max_sessions = o_.max_sessions;
  ao.client_delay = client_delay;
  ao.log_dir = dir_.path();
  agents_ = std::make_unique<AgentWorkers>(ao);
  report_.parameters.push_back({"agents", std::to_string(machines) + " in " + std::to_string(agents_->size()) +
                                              " worker processes (" + std::to_string(o_.agent_threads) +
                                              " I/O threads each)"});
}

Snapshot Run::snapshot() {
  Snapshot s;
  s.at = Clock::now();
  s.broker = broker_.usage();
  s.metrics = broker_.metrics();
  s.harness_cpu = self_cpu_seconds() + (agents_ ? agents_->cpu_seconds() : 0);
  return s;
}

void Run::usage(Phase& p, const Snapshot& a, const Snapshot& b) const {
  p.usage.known = a.broker.ok && b.broker.ok;
  if (p.usage.known) {
    p.usage.cpu_seconds = b.broker.cpu_seconds - a.broker.cpu_seconds;
    p.usage.rss_mib = mib(b.broker.rss_kib);
    p.usage.hwm_mib = mib(b.broker.hwm_kib);
  }
  if (!a.metrics.empty() && !b.metrics.empty()) {
    p.usage.commits = metric(b.metrics, "broker_storage_commit_batches_total") -
                      metric(a.metrics, "broker_storage_commit_batches_total");
    p.usage.commit_writes = metric(b.metrics, "broker_storage_commit_batch_writes_total") -
                            metric(a.metrics, "broker_storage_commit_batch_writes_total");
  }
  p.usage.harness_cpu_seconds = b.harness_cpu - a.harness_cpu;
}

void Run::wait_quiet() {
  if (broker_.pid() <= 0) return;
  const auto deadline = Clock::now() + std::chrono::seconds(20);
  int quiet = 0;
  double last = broker_.usage().cpu_seconds;
  while (Clock::now() < deadline && quiet < 2) {
    std::this_thread::sleep_for(Millis{250});
    const double now = broker_.usage().cpu_seconds;
    quiet = now - last < 0.0125 ? quiet + 1 : 0;
    last = now;
  }
}

bool Run::wait_agents_gone() {
  const auto deadline = Clock::now() + o_.phase_limit;
  while (Clock::now() < deadline) {
    const auto m = broker_.metrics();
    auto it = m.find("broker_websocket_connections{listener=\"agent\"}");
    if (m.empty() || it == m.end() || it->second <= 0) return !m.empty();
    std::this_thread::sleep_for(Millis{100});
  }
  return false;
}

Phase Run::registration_storm(const std::string& name, const std::string& command, int expected) {
  Phase p;
  p.name = name;
  p.op = "registration";
  agents_->all("mark");
  const Totals before = agents_->totals("status");
  wait_quiet();
  const Snapshot s0 = snapshot();
  const std::int64_t t0 = now_ns();
  if (!command.empty()) agents_->all(command);
  const auto deadline = Clock::now() + o_.phase_limit;
  std::atomic<long long> seen{0};
  {
    Progress progress(progress_enabled(), [&] {
      const double s = static_cast<double>(now_ns() - t0) / 1e9;
      return "[" + name + "] " + std::to_string(seen.load()) + "/" + std::to_string(expected) + " registered, " +
             format_fixed(s, 1) + " s, broker " + format_fixed(broker_.usage().cpu_seconds - s0.broker.cpu_seconds, 1) +
             " CPU s";
    });
    while (Clock::now() < deadline) {
      seen = agents_->totals("counts")["registered"];
      if (seen >= expected) break;
      std::this_thread::sleep_for(Millis{50});
    }
  }
  // The events may count a machine twice (a drop and a second registration): the scan decides.
  Totals after = agents_->totals("status");
  while (after["registered"] < expected && Clock::now() < deadline) {
    std::this_thread::sleep_for(Millis{500});
    after = agents_->totals("status");
  }
  const Events ev = agents_->events();
  std::int64_t last = t0;
  for (auto t : ev.registered) last = std::max(last, t);
  wait_quiet();
  const Snapshot s1 = snapshot();
  p.ops = static_cast<long long>(ev.registered.size());
  p.seconds = static_cast<double>(last - t0) / 1e9;
  p.latency["registration"] = summarize(since(ev.registered, t0));
  usage(p, s0, s1);
  for (const auto& [k, v] : after) {
    const auto was = before.find(k);  // a reason first seen in this phase is absent before it
    const long long delta = v - (was == before.end() ? 0 : was->second);
    if (k.rfind("rej.", 0) == 0 && delta > 0) p.errors["rejected: " + k.substr(4)] = delta;
  }
  const Totals counts = agents_->totals("counts");
  for (const auto& [k, v] : counts)
    if (k.rfind("cc.", 0) == 0 && v > 0) p.errors["cannot connect (first failure of a machine): " + k.substr(3)] = v;
  p.figures.push_back(
      {"machines registered at the end", std::to_string(after["registered"]) + " of " + std::to_string(expected)});
  if (counts.at("enrolled") > 0) p.figures.push_back({"enrolled", std::to_string(counts.at("enrolled"))});
  if (p.ops > expected) p.figures.push_back({"registrations beyond one per machine", std::to_string(p.ops - expected)});
  report_.check(name + ": every agent registered", after["registered"] == expected,
                std::to_string(after["registered"]) + " of " + std::to_string(expected));
  report_.check(name + ": every registration seen by the harness", p.ops >= expected,
                std::to_string(p.ops) + " registration events for " + std::to_string(expected) + " machines");
  return p;
}

void Run::ceilings(const std::string& phase, double phase_rate, const ReplySizes& sizes, std::size_t items,
                   const std::function<void(std::size_t, Connection&)>& work) {
  if (o_.ceiling == "none") return;
  for (const std::string server : {"static", "nginx"}) {
    if (o_.ceiling != "all" && o_.ceiling != server) continue;
    CeilingRun c;
    c.server = server == "static" ? "broker HTTP stack (static-server)" : "nginx";
    c.phase = phase;
    c.sizes = sizes;
    CeilingServer cs;
    std::string error;
    const bool up = server == "static" ? cs.start_static(dir_.path(), sizes, o_.io_threads, error)
                                       : cs.start_nginx(dir_.path(), sizes, o_.io_threads, error);
    if (!up) {
      c.error = error;
      report_.ceilings.push_back(std::move(c));
      continue;
    }
    FrontEnds fe(cs.url(), o_.connections);
    // At least kMinCeilingItems, so that a small phase still gets a ceiling worth the name.
    const std::size_t n = std::max(items, kMinCeilingItems);
    const auto start = Clock::now();
    {
      Progress progress(progress_enabled(), [&] {
        return "[ceiling " + server + "] " + std::to_string(fe.done()) + "/" + std::to_string(n);
      });
      c.ops = static_cast<long long>(fe.run(n, o_.phase_limit, work));
    }
    c.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    Samples s = fe.take();
    for (auto& [type, v] : s.latency_ms) c.latency[type] = summarize(std::move(v));
    c.errors = s.errors;
    c.ratio = c.rate() > 0 ? phase_rate / c.rate() : 0;
    cs.stop();
    report_.ceilings.push_back(std::move(c));
  }
}

int Run::finish() {
  report_.load_end = load_average();
  if (!report_.ok()) dir_.keep();  // the logs of a failed run are worth a look
  if (o_.keep || !report_.ok()) report_.notes.push_back("kept the run's directory " + dir_.path());
  if (o_.json)
    std::cout << report_.json();
  else
    std::cout << report_.text();
  std::cout.flush();
  return report_.ok() ? 0 : 1;
}

}  // namespace bench
