// broker-bench: the storm harness (issue 13). Drives a brokerd over its real listeners the way a
// site does at its worst moments: thousands of agents speaking CBP (tools/vda-agent, in worker
// processes) and front ends posting NFuse over keep-alive HTTP; measures throughput, latency,
// errors, the broker's CPU time per operation, memory and storage commits, and the same requests
// against a static reply (the ceiling). docs/BENCHMARKS.md records what it measured.
#include "tools/broker-bench/ceiling.hpp"
#include "tools/broker-bench/run.hpp"

#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr const char* kUsage = R"(usage: broker-bench SCENARIO [OPTIONS]
       broker-bench site [OPTIONS]        print the generated site (brokerd.toml) and exit

Storm harness for brokerd: agents speak CBP over WebSocket (tools/vda-agent, in worker processes
of at most --per-worker agents each), front ends post NFuse XML over keep-alive HTTP. By default
it starts brokerd itself on a generated site in a temporary directory (BENCH domain, one delivery
group of --machines machines, --users users in the built-in directory, a trusted front end
127.0.0.1), so one command runs a whole scenario. Traffic goes to 127.0.0.1 only. Every phase
ends after --phase-limit seconds at the latest.

scenarios:
  register    N agents enroll with the catalog's key (phase "enroll"); then every agent says
              goodbye and all reconnect at once with their secrets (phase "reboot": the reboot
              storm). Figures: registrations/s, time from the start to each registration,
              broker CPU per registration, memory per registered agent.
  steady      N agents enroll, then stay registered and heartbeat for --duration seconds
              (heartbeat every --heartbeat-interval s, default 20): heartbeats/s, broker CPU,
              RSS and memory per idle agent.
  enumerate   RequestAppData only, from --connections front ends: "trusted" (user names from
              a trusted front end, no password), "cold" (each user once with a password: one
              PBKDF2 check each) and "warm" (passwords, credential cache warm). Ceiling: the same
              requests against a static reply of the warm reply's size.
  logon       U users each enumerate (RequestAppData) then launch the desktop (RequestAddress)
              on a group of N machines (--kind shared|private|multi); the agents prepare the
              session, redeem the ticket and report it Active; --logoff logs them all off
              afterwards. Ceiling: the same request pairs against static replies.
  mixed       logons on a shared group while --reregister-percent of the agents drop their
              connection and re-register (spread over --spread seconds) and an admin lists
              machines (GET /api/v1/machines, a page of 100 every 100 ms) while the logons run.

sizes:
  --machines N            agents = machines in the site (register/steady/enumerate/logon: 1000;
                          logon --kind multi: 100)
  --users N               users (enumerate: 1000; logon: one per machine, multi: machines x
                          max-sessions / 2; mixed: machines / 2)
  --requests N            enumerate: requests in the trusted and warm phases (5000)
  --connections N         front-end keep-alive connections, one thread each (32)
  --kind K                logon: shared (a pooled single-session group, default), private
                          (assign on first use), multi (multi-session hosts)
  --password              logon, mixed: send passwords instead of trusted user names
  --max-sessions N        multi-session hosts: sessions per host (20)
  --applications N        published applications every user sees (5)
  --heartbeat-interval S  the site's heartbeat_interval_seconds (register 60, steady 20)
  --duration S            steady: how long to hold (60)
  --reregister-percent P  mixed: agents that drop and re-register (20)
  --spread S              mixed: over how long (10)
  --logoff                logon: log every session off afterwards (phase "logoff")

ceiling:
  --ceiling WHAT          all (default), static, nginx, none. static: `broker-bench
                          static-server`, the broker's own HTTP stack (net::Server) in a child
                          process answering fixed bytes; nginx: a private nginx on a free
                          loopback port, when nginx is installed (else reported as not measured)

broker:
  --brokerd PATH          the brokerd to start (default: the one built with this harness)
  --io-threads N          brokerd [daemon] io_threads, also the ceiling servers' threads (2)
  --worker-threads N      brokerd [daemon] worker_threads (8)
  --log-level LEVEL       brokerd [logging] level (info); the log is in the run's directory
  --xml-url URL --agent-url URL --admin-url URL [--pid PID]
                          use a running broker instead (its site must be the one `broker-bench
                          site` prints for the same options; --pid for the /proc figures)

harness:
  --per-worker N          most agents per worker process (9000; each process may hold 20000
                          descriptors here)
  --agent-threads N       I/O threads per worker process (2)
  --phase-limit S         every phase ends by then (600)
  --json                  print the report as JSON (for scripts) instead of text
  --quiet                 no progress line on stderr
  --keep                  keep the run's temporary directory (config, database, logs)
  --help

The report: per phase the operations, their rate, latency p50/p90/p99/max per request type,
errors (by ErrorId, HTTP status, transport error or CBP rejection reason), the broker's CPU
seconds (from /proc/PID/stat) and CPU per operation, its RSS and peak RSS (VmHWM), the storage
commits and mean batch (from /metrics), the harness's own CPU; the ceilings with the broker's
ratio to each; and the correctness checks (every agent registered, every launch answered, no
machine with two sessions, ...). Exit code: 0 when every check passed, 1 when one failed, 2 for
a usage error. No check is about time.
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int to_int(const std::string& v, const std::string& what, int lo, int hi) {
  try {
    std::size_t used = 0;
    const long long x = std::stoll(v, &used);
    if (used == v.size() && x >= lo && x <= hi) return static_cast<int>(x);
  } catch (const std::exception&) {}
  throw UsageError(what + " must be an integer " + std::to_string(lo) + ".." + std::to_string(hi));
}

double to_double(const std::string& v, const std::string& what, double lo, double hi) {
  try {
    std::size_t used = 0;
    const double x = std::stod(v, &used);
    if (used == v.size() && x >= lo && x <= hi) return x;
  } catch (const std::exception&) {}
  throw UsageError(what + " must be a number " + std::to_string(lo) + ".." + std::to_string(hi));
}

bench::Options parse(const std::vector<std::string>& args) {
  bench::Options o;
  o.brokerd = BROKERD_PATH;
  if (args.empty()) throw UsageError("a scenario is required");
  o.scenario = args[0];
  for (std::size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= args.size()) throw UsageError(a + " needs a value");
      return args[++i];
    };
    if (a == "--machines")
      o.machines = to_int(next(), a, 0, 1000000);
    else if (a == "--users")
      o.users = to_int(next(), a, 1, 99000);
    else if (a == "--requests")
      o.requests = to_int(next(), a, 1, 100000000);
    else if (a == "--connections")
      o.connections = to_int(next(), a, 1, 4096);
    else if (a == "--kind") {
      if (!bench::parse_kind(next(), o.kind)) throw UsageError("--kind must be shared, private or multi");
    } else if (a == "--password")
      o.credentials = bench::Credentials::password;
    else if (a == "--max-sessions")
      o.max_sessions = to_int(next(), a, 1, 10000);
    else if (a == "--applications")
      o.applications = to_int(next(), a, 0, 1000);
    else if (a == "--heartbeat-interval")
      o.heartbeat_interval = to_int(next(), a, 5, 86400);
    else if (a == "--duration")
      o.duration_seconds = to_double(next(), a, 0, 86400);
    else if (a == "--reregister-percent")
      o.reregister_percent = to_double(next(), a, 0, 100);
    else if (a == "--spread")
      o.spread_seconds = to_double(next(), a, 0, 3600);
    else if (a == "--logoff")
      o.logoff = true;
    else if (a == "--ceiling") {
      o.ceiling = next();
      if (o.ceiling != "all" && o.ceiling != "static" && o.ceiling != "nginx" && o.ceiling != "none")
        throw UsageError("--ceiling must be all, static, nginx or none");
    } else if (a == "--brokerd")
      o.brokerd = next();
    else if (a == "--io-threads")
      o.io_threads = to_int(next(), a, 1, 256);
    else if (a == "--worker-threads")
      o.broker_workers = to_int(next(), a, 1, 256);
    else if (a == "--log-level")
      o.log_level = next();
    else if (a == "--xml-url")
      o.xml_url = next();
    else if (a == "--agent-url")
      o.agent_url = next();
    else if (a == "--admin-url")
      o.admin_url = next();
    else if (a == "--pid")
      o.pid = to_int(next(), a, 1, 1 << 30);
    else if (a == "--per-worker")
      o.per_worker = to_int(next(), a, 1, 19000);
    else if (a == "--agent-threads")
      o.agent_threads = to_int(next(), a, 1, 64);
    else if (a == "--phase-limit")
      o.phase_limit = bench::Millis{static_cast<long long>(to_double(next(), a, 1, 86400) * 1000)};
    else if (a == "--json")
      o.json = true;
    else if (a == "--quiet")
      o.quiet = true;
    else if (a == "--keep")
      o.keep = true;
    else
      throw UsageError("unknown option '" + a + "'");
  }
  if (!o.xml_url.empty() && (o.agent_url.empty() || o.admin_url.empty()))
    throw UsageError("an external broker needs --xml-url, --agent-url and --admin-url");
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && args[0] == "agent-worker")
    return bench::agent_worker_main(std::vector<std::string>(args.begin() + 1, args.end()));
  if (!args.empty() && args[0] == "static-server")
    return bench::static_server_main(std::vector<std::string>(args.begin() + 1, args.end()));
  for (const auto& a : args)
    if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      return 0;
    }
  bench::Options o;
  try {
    o = parse(args);
  } catch (const UsageError& e) {
    std::cerr << "broker-bench: " << e.what() << "\n\n" << kUsage;
    return 2;
  }
  for (const auto& a : args) o.command_line += (o.command_line.empty() ? "broker-bench " : " ") + a;
  bench::raise_descriptor_limit();
  try {
    if (o.scenario == "site") {
      bench::SiteOptions s;
      s.kind = o.kind;
      s.machines = o.machines >= 0 ? o.machines : 1000;
      s.users = o.users > 0 ? o.users : 1000;
      s.applications = o.applications;
      s.heartbeat_interval_seconds = o.heartbeat_interval > 0 ? o.heartbeat_interval : 60;
      s.database_path = "broker-bench.db";
      s.io_threads = o.io_threads;
      s.worker_threads = o.broker_workers;
      std::cout << bench::site_toml(s);
      return 0;
    }
    bench::Run run(o);
    if (o.scenario == "register") return bench::scenario_register(run);
    if (o.scenario == "steady") return bench::scenario_steady(run);
    if (o.scenario == "enumerate") return bench::scenario_enumerate(run);
    if (o.scenario == "logon") return bench::scenario_logon(run);
    if (o.scenario == "mixed") return bench::scenario_mixed(run);
    std::cerr << "broker-bench: unknown scenario '" << o.scenario << "'\n\n" << kUsage;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "broker-bench: " << e.what() << "\n";
    return 1;
  }
}
