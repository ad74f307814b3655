// tools/broker-bench/report.cpp: see report.hpp.
#include "tools/broker-bench/report.hpp"

#include <boost/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <sstream>

namespace bench {
namespace json = boost::json;

Latency summarize(std::vector<double> ms) {
  Latency l;
  if (ms.empty()) return l;
  std::sort(ms.begin(), ms.end());
  auto pct = [&](double p) {
    const auto i = static_cast<std::size_t>(std::ceil(p * static_cast<double>(ms.size())));
    return ms[std::min(ms.size() - 1, i == 0 ? 0 : i - 1)];
  };
  l.count = static_cast<long long>(ms.size());
  l.p50 = pct(0.50);
  l.p90 = pct(0.90);
  l.p99 = pct(0.99);
  l.max = ms.back();
  double sum = 0;
  for (double v : ms) sum += v;
  l.mean = sum / static_cast<double>(ms.size());
  return l;
}

bool Report::ok() const {
  return std::all_of(checks.begin(), checks.end(), [](const Check& c) { return c.ok; });
}

void Report::check(std::string what, bool is_ok, std::string detail) {
  checks.push_back({std::move(what), is_ok, std::move(detail)});
}

namespace {
std::string fixed(double v, int digits) {
  std::ostringstream s;
  s << std::fixed << std::setprecision(digits) << v;
  return s.str();
}

void latency_table(std::ostringstream& o, const std::map<std::string, Latency>& lat) {
  if (lat.empty()) return;
  o << "    " << std::left << std::setw(28) << "latency (ms)" << std::right << std::setw(9) << "count" << std::setw(10)
    << "p50" << std::setw(10) << "p90" << std::setw(10) << "p99" << std::setw(10) << "max"
    << "\n";
  for (const auto& [type, l] : lat)
    o << "    " << std::left << std::setw(28) << type << std::right << std::setw(9) << l.count << std::setw(10)
      << fixed(l.p50, 2) << std::setw(10) << fixed(l.p90, 2) << std::setw(10) << fixed(l.p99, 2) << std::setw(10)
      << fixed(l.max, 2) << "\n";
}

void errors_list(std::ostringstream& o, const std::map<std::string, long long>& errors) {
  if (errors.empty()) {
    o << "    errors: none\n";
    return;
  }
  o << "    errors:\n";
  for (const auto& [what, n] : errors) o << "      " << n << " x " << what << "\n";
}

json::object latency_json(const std::map<std::string, Latency>& lat) {
  json::object o;
  for (const auto& [type, l] : lat)
    o[type] = {{"count", l.count}, {"p50_ms", l.p50}, {"p90_ms", l.p90},
               {"p99_ms", l.p99},  {"max_ms", l.max}, {"mean_ms", l.mean}};
  return o;
}

json::object errors_json(const std::map<std::string, long long>& errors) {
  json::object o;
  for (const auto& [what, n] : errors) o[what] = n;
  return o;
}
}  // namespace

std::string Report::text() const {
  std::ostringstream o;
  o << "broker-bench " << scenario << "\n";
  o << "  command: " << command << "\n";
  o << "  machine: " << machine.describe() << "; load average " << fixed(load_start, 2) << " at the start, "
    << fixed(load_end, 2) << " at the end\n";
  for (const auto& [k, v] : parameters) o << "  " << k << ": " << v << "\n";
  for (const auto& p : phases) {
    o << "\n  phase " << p.name << ": " << p.ops << " " << p.op << (p.ops == 1 ? "" : "s") << " in "
      << fixed(p.seconds, 3) << " s = " << fixed(p.rate(), 1) << " " << p.op << "s/s\n";
    if (p.usage.known) {
      o << "    broker: " << fixed(p.usage.cpu_seconds, 2) << " CPU s";
      if (p.ops > 0)
        o << " = " << fixed(p.usage.cpu_seconds * 1e6 / static_cast<double>(p.ops), 0) << " CPU us per " << p.op;
      o << "; RSS " << fixed(p.usage.rss_mib, 1) << " MiB, peak " << fixed(p.usage.hwm_mib, 1) << " MiB\n";
    }
    if (p.usage.commits >= 0) {
      o << "    storage: " << fixed(p.usage.commits, 0) << " commits carrying " << fixed(p.usage.commit_writes, 0)
        << " writes";
      if (p.usage.commits > 0) o << ", mean batch " << fixed(p.usage.commit_writes / p.usage.commits, 2);
      o << "\n";
    }
    o << "    harness: " << fixed(p.usage.harness_cpu_seconds, 2) << " CPU s (agent workers and front ends)\n";
    for (const auto& [k, v] : p.figures) o << "    " << k << ": " << v << "\n";
    latency_table(o, p.latency);
    errors_list(o, p.errors);
  }
  if (!ceilings.empty()) o << "\n  ceiling (the same requests, a static reply of the same size):\n";
  for (const auto& c : ceilings) {
    o << "    " << c.server << " for phase " << c.phase << ": ";
    if (!c.error.empty()) {
      o << "not measured: " << c.error << "\n";
      continue;
    }
    o << c.ops << " in " << fixed(c.seconds, 3) << " s = " << fixed(c.rate(), 1) << "/s; the broker reaches "
      << fixed(c.ratio * 100, 1) << " % of it (reply bytes:";
    for (const auto& [t, b] : c.sizes) o << " " << t << " " << b;
    o << ")\n";
    std::ostringstream inner;
    latency_table(inner, c.latency);
    errors_list(inner, c.errors);
    std::istringstream lines(inner.str());
    for (std::string line; std::getline(lines, line);) o << "    " << line << "\n";
  }
  o << "\n  checks:\n";
  for (const auto& c : checks)
    o << "    [" << (c.ok ? "ok" : "FAILED") << "] " << c.what << (c.detail.empty() ? "" : ": " + c.detail) << "\n";
  for (const auto& n : notes) o << "  note: " << n << "\n";
  o << "  result: " << (ok() ? "ok" : "FAILED") << "\n";
  return o.str();
}

std::string Report::json() const {
  json::object o;
  o["scenario"] = scenario;
  o["command"] = command;
  o["machine"] = {{"cpu", machine.cpu},       {"cores", machine.cores},           {"memory_gib", machine.memory_gib},
                  {"kernel", machine.kernel}, {"load_average_start", load_start}, {"load_average_end", load_end}};
  json::object params;
  for (const auto& [k, v] : parameters) params[k] = v;
  o["parameters"] = std::move(params);
  json::array phases_json;
  for (const auto& p : phases) {
    json::object j;
    j["name"] = p.name;
    j["op"] = p.op;
    j["ops"] = p.ops;
    j["seconds"] = p.seconds;
    j["per_second"] = p.rate();
    j["latency"] = latency_json(p.latency);
    j["errors"] = errors_json(p.errors);
    json::object u;
    if (p.usage.known) {
      u["cpu_seconds"] = p.usage.cpu_seconds;
      u["cpu_us_per_op"] = p.ops > 0 ? p.usage.cpu_seconds * 1e6 / static_cast<double>(p.ops) : 0.0;
      u["rss_mib"] = p.usage.rss_mib;
      u["peak_rss_mib"] = p.usage.hwm_mib;
    }
    if (p.usage.commits >= 0) {
      u["commits"] = p.usage.commits;
      u["commit_writes"] = p.usage.commit_writes;
      u["mean_batch"] = p.usage.commits > 0 ? p.usage.commit_writes / p.usage.commits : 0.0;
    }
    u["harness_cpu_seconds"] = p.usage.harness_cpu_seconds;
    j["broker"] = std::move(u);
    json::object f;
    for (const auto& [k, v] : p.figures) f[k] = v;
    j["figures"] = std::move(f);
    phases_json.push_back(std::move(j));
  }
  o["phases"] = std::move(phases_json);
  json::array ceil_json;
  for (const auto& c : ceilings) {
    json::object j;
    j["server"] = c.server;
    j["phase"] = c.phase;
    if (!c.error.empty()) {
      j["error"] = c.error;
    } else {
      json::object sizes;
      for (const auto& [t, b] : c.sizes) sizes[t] = b;
      j["reply_bytes"] = std::move(sizes);
      j["ops"] = c.ops;
      j["seconds"] = c.seconds;
      j["per_second"] = c.rate();
      j["broker_ratio"] = c.ratio;
      j["latency"] = latency_json(c.latency);
      j["errors"] = errors_json(c.errors);
    }
    ceil_json.push_back(std::move(j));
  }
  o["ceilings"] = std::move(ceil_json);
  json::array checks_json;
  for (const auto& c : checks) checks_json.push_back({{"what", c.what}, {"ok", c.ok}, {"detail", c.detail}});
  o["checks"] = std::move(checks_json);
  json::array notes_json;
  for (const auto& n : notes) notes_json.push_back(json::string(n));
  o["notes"] = std::move(notes_json);
  o["ok"] = ok();
  return json::serialize(o) + "\n";
}

Progress::Progress(bool enabled, std::function<std::string()> line) {
  if (!enabled) return;
  thread_ = std::jthread([line = std::move(line)](std::stop_token stop) {
    const bool tty = ::isatty(2) != 0;
    int ticks = 0;
    while (!stop.stop_requested()) {
      for (int i = 0; i < 10 && !stop.stop_requested(); ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      if (stop.stop_requested()) break;
      ++ticks;
      if (tty) {
        std::fprintf(stderr, "\r\033[K%s", line().c_str());
      } else if (ticks % 5 == 0) {
        std::fprintf(stderr, "%s\n", line().c_str());
      }
      std::fflush(stderr);
    }
    if (tty) std::fprintf(stderr, "\r\033[K");
  });
}

Progress::~Progress() = default;  // the jthread asks its loop to stop and joins

}  // namespace bench
