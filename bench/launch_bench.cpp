// bench/launch_bench.cpp: brokered launches per second through broker::Launcher on a file-backed
// SQLite database (synchronous = FULL: each accepted launch is on disk before its reply).
//
// A shared single-session group of M registered machines; M distinct users each launch the
// desktop once, with at most C launches in flight (C = 1, 8, 32 by default), the engine's work
// queue having C threads. The agents are simulated in-process and acknowledge prepare_session at
// once, so the figures are the broker's own cost: selection (which reads the group), the pending
// session, assignment and sealed logon ticket in one transaction, and its commit. Prints
// launches/s, p50/p99 latency of one launch and the mean group-commit batch size. Results are
// recorded in docs/BENCHMARKS.md. Not a test: it asserts nothing beyond "every launch succeeded".
//
//   launch_bench [--machines M] [--concurrency 1,8,32]
#include "broker/engine.hpp"
#include "broker/instant_agents.hpp"
#include "broker/launcher.hpp"
#include "common/clock.hpp"
#include "common/crypto.hpp"
#include "common/metrics.hpp"
#include "common/work_queue.hpp"
#include "storage/repository.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using namespace common::model;
using Clock = std::chrono::steady_clock;

Object make(Kind k, std::string name, std::initializer_list<std::pair<const char*, Value>> fields) {
  Object o = make_default(k, std::move(name));
  for (const auto& [key, v] : fields) o.fields[key] = v;
  return o;
}

std::vector<int> parse_list(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(std::atoi(item.c_str()));
  return out;
}

double metric(const std::string& text, const std::string& name) {
  const auto at = text.find("\n" + name + " ");
  if (at == std::string::npos) return 0;
  return std::atof(text.c_str() + at + name.size() + 2);
}

double cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

struct Run {
  double seconds = 0, p50_ms = 0, p99_ms = 0, batch = 0, cpu_us = 0;
  int failed = 0;
};

Run run(int machines, int concurrency, const fs::path& dir) {
  common::Metrics metrics;
  storage::SqliteOptions so;
  so.path = (dir / ("launch-" + std::to_string(concurrency) + ".db")).string();
  so.metrics = &metrics;
  auto repo = storage::open_sqlite(so);
  if (!repo) {
    std::fprintf(stderr, "launch_bench: %s\n", repo.error().describe().c_str());
    std::exit(1);
  }
  std::vector<Object> objects = {
      make(Kind::catalog, "pool", {}),
      make(Kind::delivery_group, "Pool", {}),
      make(Kind::rule, "pool-access", {{"rule_type", std::string("access")},
                                       {"delivery_group", std::string("Pool")},
                                       {"included_users", TextList{"BENCH\\Users"}}}),
      make(Kind::rule, "pool", {{"rule_type", std::string("entitlement")},
                                {"delivery_group", std::string("Pool")},
                                {"included_user_filter_enabled", false}}),
  };
  for (int i = 1; i <= machines; ++i)
    objects.push_back(make(Kind::machine, "BENCH\\pool-" + std::to_string(i),
                           {{"catalog", std::string("pool")},
                            {"delivery_group", std::string("Pool")},
                            {"registration_state", std::string("Registered")},
                            {"summary_state", std::string("Available")},
                            {"agent_address", "10.0." + std::to_string(i / 250) + "." + std::to_string(i % 250) + ":1494"}}));
  auto st = (*repo)->write([&](storage::Transaction& tx) -> common::Status {
    for (const auto& o : objects)
      if (auto c = tx.create(o); !c) return c.error();
    return {};
  });
  if (!st) {
    std::fprintf(stderr, "launch_bench: %s\n", st.error().describe().c_str());
    std::exit(1);
  }

  common::SystemClock clock;
  broker::InstantAgents agents;
  broker::Engine engine;  // outlives the work queue: its last tasks' commits reach it
  common::WorkQueue work(concurrency);
  broker::LauncherOptions lo;
  lo.credential_key = common::crypto::new_site_key();
  if (auto loaded = engine.attach(**repo); !loaded) {
    std::fprintf(stderr, "launch_bench: %s\n", loaded.error().describe().c_str());
    std::exit(1);
  }
  broker::Launcher launcher(**repo, engine, clock, agents, work, nullptr, lo);
  const auto before = metrics.render();

  std::mutex mutex;
  std::condition_variable cv;
  int in_flight = 0, done_count = 0;
  Run r;
  std::vector<double> latencies;
  const double cpu_start = cpu_seconds();
  const auto start = Clock::now();
  for (int i = 0; i < machines; ++i) {
    {
      std::unique_lock lock(mutex);
      cv.wait(lock, [&] { return in_flight < concurrency; });
      ++in_flight;
    }
    broker::LaunchRequest req;
    req.user.user_name = "u" + std::to_string(i);
    req.user.domain = "BENCH";
    req.user.qualified_name = "BENCH\\u" + std::to_string(i);
    req.user.groups = {"BENCH\\Users"};
    req.resource = "Pool";
    req.client_name = "PC";
    req.client_address = "192.0.2.1";
    req.credential.type = "assertion";
    const auto t0 = Clock::now();
    launcher.launch(std::move(req), [&, t0](broker::LaunchResult result) {
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      std::lock_guard lock(mutex);
      latencies.push_back(ms);
      if (!result.ok()) ++r.failed;
      --in_flight;
      ++done_count;
      cv.notify_all();
    });
  }
  {
    std::unique_lock lock(mutex);
    cv.wait(lock, [&] { return done_count == machines; });
  }
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  r.cpu_us = (cpu_seconds() - cpu_start) * 1e6 / machines;
  std::sort(latencies.begin(), latencies.end());
  r.p50_ms = latencies[latencies.size() / 2];
  r.p99_ms = latencies[std::min(latencies.size() - 1, latencies.size() * 99 / 100)];
  const auto after = metrics.render();
  const double batches = metric(after, "broker_storage_commit_batches_total") -
                         metric(before, "broker_storage_commit_batches_total");
  const double writes = metric(after, "broker_storage_commit_batch_writes_total") -
                        metric(before, "broker_storage_commit_batch_writes_total");
  r.batch = batches > 0 ? writes / batches : 0;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  int machines = 1000;
  std::vector<int> concurrency{1, 8, 32};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--machines" && i + 1 < argc) machines = std::atoi(argv[++i]);
    else if (a == "--concurrency" && i + 1 < argc) concurrency = parse_list(argv[++i]);
    else {
      std::fprintf(stderr, "usage: launch_bench [--machines M] [--concurrency 1,8,32]\n");
      return 2;
    }
  }
  const fs::path dir = fs::temp_directory_path() / ("launch_bench-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::printf("%d machines, %d launches of distinct users per run (shared single-session group)\n\n", machines,
              machines);
  std::printf("%-12s %10s %12s %10s %10s %12s %14s %8s\n", "in flight", "seconds", "launches/s", "p50 ms", "p99 ms",
              "mean batch", "CPU us/launch", "failed");
  for (int c : concurrency) {
    const auto r = run(machines, c, dir);
    std::printf("%-12d %10.2f %12.0f %10.2f %10.2f %12.2f %14.0f %8d\n", c, r.seconds, machines / r.seconds, r.p50_ms,
                r.p99_ms, r.batch, r.cpu_us, r.failed);
  }
  fs::remove_all(dir);
  return 0;
}
