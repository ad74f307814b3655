// bench/storage_bench.cpp: throughput and latency of the SQLite repository (storage/).
//
// Creates N machines in batched transactions and N more one per transaction, updates machine
// state one per transaction, reads machines by name, lists and counts them, and prints a table
// to stdout: operations, seconds, operations per second, and the p50/p99 latency of one
// write()/read() call (for writes that includes BEGIN IMMEDIATE ... COMMIT). Then, with
// concurrent writer threads (1, 4, 16, 64 by default), each write() a small launch-like
// transaction (create a session row, update its machine): write() calls per second (each one
// durable on return: synchronous = FULL) and the mean group-commit batch size. Results are
// recorded in docs/BENCHMARKS.md. Not a test: it asserts nothing.
//
//   storage_bench [--machines N] [--batch B] [--path FILE] [--writers 1,4,16,64]
//                 [--launches L] [--concurrent-only]
//
// --launches is the number of write() calls per writer-count run (default 2000), shared between
// the threads; --writers 0 skips the concurrent runs; --concurrent-only skips the single-thread
// phases (it still creates the N machines the launches pick from, in batches).
// Without --path the database is created in a fresh temporary directory, removed afterwards.
#include "common/metrics.hpp"
#include "common/model.hpp"
#include "storage/repository.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;
using common::model::Kind;
using common::model::Object;
using common::model::TextList;
using Clock = std::chrono::steady_clock;

struct Options {
  std::int64_t machines = 10000;
  std::int64_t batch = 100;
  std::string path;
  std::vector<int> writers{1, 4, 16, 64};
  std::int64_t launches = 2000;
  bool concurrent_only = false;
};

[[noreturn]] void usage() {
  std::fprintf(stderr,
               "usage: storage_bench [--machines N] [--batch B] [--path FILE] [--writers 1,4,16,64] [--launches L] "
               "[--concurrent-only]\n");
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--concurrent-only") {
      o.concurrent_only = true;
      continue;
    }
    if (i + 1 >= argc) usage();
    const std::string value = argv[++i];
    if (arg == "--machines") {
      o.machines = std::atoll(value.c_str());
    } else if (arg == "--batch") {
      o.batch = std::atoll(value.c_str());
    } else if (arg == "--path") {
      o.path = value;
    } else if (arg == "--launches") {
      o.launches = std::atoll(value.c_str());
    } else if (arg == "--writers") {
      o.writers.clear();
      std::istringstream list(value);
      for (std::string item; std::getline(list, item, ',');) {
        const int n = std::atoi(item.c_str());
        if (n < 0) usage();
        if (n > 0) o.writers.push_back(n);
      }
    } else {
      usage();
    }
  }
  if (o.machines < 1 || o.batch < 1 || o.launches < 1) usage();
  return o;
}

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// One row of the report: `ops` operations done in `calls` write()/read() calls.
struct Phase {
  std::string name;
  std::int64_t ops = 0;
  double seconds = 0;
  std::vector<double> latencies;  // seconds per call

  double percentile_ms(double p) {
    if (latencies.empty()) return 0;
    std::sort(latencies.begin(), latencies.end());
    const auto rank = static_cast<std::size_t>(std::ceil(p * static_cast<double>(latencies.size())));
    return latencies[std::min(latencies.size() - 1, rank == 0 ? 0 : rank - 1)] * 1000.0;
  }
};

void print_header() {
  std::printf("%-36s %9s %9s %11s %9s %9s\n", "phase", "ops", "seconds", "ops/s", "p50 ms", "p99 ms");
}

void print(Phase& p) {
  std::printf("%-36s %9lld %9.3f %11.0f %9.3f %9.3f\n", p.name.c_str(), static_cast<long long>(p.ops), p.seconds,
              static_cast<double>(p.ops) / p.seconds, p.percentile_ms(0.50), p.percentile_ms(0.99));
  std::fflush(stdout);
}

// Runs fn and records its latency; exits on failure (a benchmark has no use for partial numbers).
void timed(Phase& phase, storage::Repository& repo, bool write,
           const std::function<common::Status(storage::Transaction&)>& fn) {
  const auto start = Clock::now();
  auto status = write ? repo.write(fn) : repo.read(fn);
  phase.latencies.push_back(seconds_since(start));
  if (!status) {
    std::fprintf(stderr, "storage_bench: %s: %s\n", phase.name.c_str(), status.error().describe().c_str());
    std::exit(1);
  }
}

// The value of an unlabelled counter in the rendered metrics; 0 when absent.
double metric_value(const common::Metrics& metrics, const std::string& name) {
  const std::string text = "\n" + metrics.render();
  const auto pos = text.find("\n" + name + " ");
  if (pos == std::string::npos) return 0;
  return std::strtod(text.c_str() + pos + name.size() + 2, nullptr);
}

Object machine(std::int64_t i) {
  Object m = common::model::make_default(Kind::machine, "desk-" + std::to_string(i));
  m.fields["catalog"] = std::string("catalog-1");
  m.fields["delivery_group"] = std::string(i % 2 ? "group-odd" : "group-even");
  m.fields["dns_name"] = "desk-" + std::to_string(i) + ".example.test";
  m.fields["hosted_machine_id"] = "vm-" + std::to_string(i);
  m.fields["tags"] = i % 10 == 0 ? TextList{"gpu", "win11"} : TextList{"win11"};
  return m;
}

// Concurrent writers: for each writer count, `launches` write() calls shared between that many
// threads, each like a launch: create a pending session on a random machine and update the
// machine's session count. Prints write() calls per second, the latency of one call, and the
// mean batch size (write() calls per COMMIT, from the repository's metrics).
void concurrent_launches(storage::Repository& repo, const common::Metrics& metrics, const Options& options,
                         std::int64_t machines) {
  std::printf("\nconcurrent writers: %lld launch-like write() calls per run (create session + update machine)\n",
              static_cast<long long>(options.launches));
  std::printf("%-8s %9s %9s %11s %9s %9s %11s\n", "writers", "commits", "seconds", "commits/s", "p50 ms", "p99 ms",
              "mean batch");
  int run = 0;
  for (const int writers : options.writers) {
    ++run;
    const double batches_before = metric_value(metrics, "broker_storage_commit_batches_total");
    const double writes_before = metric_value(metrics, "broker_storage_commit_batch_writes_total");
    Phase phase{std::to_string(writers)};
    std::mutex latencies_mutex;
    std::vector<std::thread> threads;
    const auto start = Clock::now();
    for (int t = 0; t < writers; ++t)
      threads.emplace_back([&, t] {
        std::mt19937_64 random(static_cast<std::uint64_t>(run * 1000 + t));
        std::uniform_int_distribution<std::int64_t> any_machine(0, machines - 1);
        Phase mine{phase.name};
        for (std::int64_t i = t; i < options.launches; i += writers) {
          const std::string name = "desk-" + std::to_string(any_machine(random));
          const std::string key = "s-" + std::to_string(run) + "-" + std::to_string(i);
          timed(mine, repo, true, [&](storage::Transaction& tx) -> common::Status {
            Object session = common::model::make_default(Kind::session, key);
            session.fields["machine"] = name;
            session.fields["user_name"] = "EXAMPLE\\user" + std::to_string(i);
            session.fields["delivery_group"] = std::string("group-odd");
            if (auto r = tx.create(session); !r) return r.error();
            auto m = tx.get(Kind::machine, name);
            if (!m) return m.error();
            m->fields["session_count"] = std::get<std::int64_t>(m->fields["session_count"]) + 1;
            if (auto r = tx.update(name, *m); !r) return r.error();
            return {};
          });
        }
        std::lock_guard lock(latencies_mutex);
        phase.latencies.insert(phase.latencies.end(), mine.latencies.begin(), mine.latencies.end());
      });
    for (auto& thread : threads) thread.join();
    phase.seconds = seconds_since(start);
    phase.ops = options.launches;
    const double batches = metric_value(metrics, "broker_storage_commit_batches_total") - batches_before;
    const double writes = metric_value(metrics, "broker_storage_commit_batch_writes_total") - writes_before;
    std::printf("%-8d %9lld %9.3f %11.0f %9.3f %9.3f %11.2f\n", writers, static_cast<long long>(phase.ops),
                phase.seconds, static_cast<double>(phase.ops) / phase.seconds, phase.percentile_ms(0.50),
                phase.percentile_ms(0.99), batches > 0 ? writes / batches : 0.0);
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  std::string dir;
  std::string path = options.path;
  if (path.empty()) {
    std::string pattern = (fs::temp_directory_path() / "storage-bench-XXXXXX").string();
    if (!mkdtemp(pattern.data())) {
      std::perror("storage_bench: mkdtemp");
      return 1;
    }
    dir = pattern;
    path = (fs::path(dir) / "bench.db").string();
  }

  common::Metrics metrics;
  storage::SqliteOptions sqlite_options;
  sqlite_options.path = path;
  sqlite_options.metrics = &metrics;
  auto opened = storage::open_sqlite(sqlite_options);
  if (!opened) {
    std::fprintf(stderr, "storage_bench: %s\n", opened.error().describe().c_str());
    return 1;
  }
  storage::Repository& repo = **opened;
  const std::int64_t n = options.machines;
  std::printf("storage_bench: %lld machines, batch %lld, database %s (synchronous = FULL, group commit)\n",
              static_cast<long long>(n), static_cast<long long>(options.batch), path.c_str());
  print_header();

  Phase setup{"setup"};
  timed(setup, repo, true, [](storage::Transaction& tx) -> common::Status {
    for (auto [kind, name] : {std::pair{Kind::catalog, "catalog-1"},
                              {Kind::delivery_group, "group-odd"},
                              {Kind::delivery_group, "group-even"}})
      if (auto r = tx.create(common::model::make_default(kind, name)); !r) return r.error();
    return {};
  });

  Phase batched{"create, " + std::to_string(options.batch) + " per transaction"};
  auto start = Clock::now();
  for (std::int64_t i = 0; i < n; i += options.batch) {
    const std::int64_t end = std::min(n, i + options.batch);
    timed(batched, repo, true, [&](storage::Transaction& tx) -> common::Status {
      for (std::int64_t j = i; j < end; ++j)
        if (auto r = tx.create(machine(j)); !r) return r.error();
      return {};
    });
  }
  batched.seconds = seconds_since(start);
  batched.ops = n;
  print(batched);

  if (!options.concurrent_only) {
    Phase single{"create, 1 per transaction"};
    start = Clock::now();
    for (std::int64_t i = n; i < 2 * n; ++i)
      timed(single, repo, true, [&](storage::Transaction& tx) -> common::Status {
        if (auto r = tx.create(machine(i)); !r) return r.error();
        return {};
      });
    single.seconds = seconds_since(start);
    single.ops = n;
    print(single);

    std::mt19937_64 random(1);
    std::uniform_int_distribution<std::int64_t> any_machine(0, 2 * n - 1);
    Phase update{"update state, 1 per transaction"};
    start = Clock::now();
    for (std::int64_t i = 0; i < n; ++i) {
      const std::string name = "desk-" + std::to_string(any_machine(random));
      timed(update, repo, true, [&](storage::Transaction& tx) -> common::Status {
        auto m = tx.get(Kind::machine, name);
        if (!m) return m.error();
        m->fields["registration_state"] = std::string(i % 2 ? "Registered" : "Unregistered");
        m->fields["load_index"] = i % 10000;
        if (auto r = tx.update(name, *m); !r) return r.error();
        return {};
      });
    }
    update.seconds = seconds_since(start);
    update.ops = n;
    print(update);

    Phase get{"get by name, 1 per read transaction"};
    start = Clock::now();
    for (std::int64_t i = 0; i < n; ++i) {
      const std::string name = "desk-" + std::to_string(any_machine(random));
      timed(get, repo, false, [&](storage::Transaction& tx) -> common::Status {
        if (auto m = tx.get(Kind::machine, name); !m) return m.error();
        return {};
      });
    }
    get.seconds = seconds_since(start);
    get.ops = n;
    print(get);

    constexpr int kRounds = 5;
    struct ListCase {
      std::string name;
      storage::Query query;
    };
    const std::vector<ListCase> lists{
        {"list all (objects)", {}},
        {"list delivery_group= (objects)", {{{"delivery_group", "group-odd"}}}},
        {"list tags contains (objects)", {{{"tags", "gpu"}}}},
        {"list page of 100 at the end (objects)", {{}, std::max<std::int64_t>(0, 2 * n - 100), 100}},
    };
    for (const auto& c : lists) {
      Phase list{c.name};
      start = Clock::now();
      for (int round = 0; round < kRounds; ++round)
        timed(list, repo, false, [&](storage::Transaction& tx) -> common::Status {
          auto all = tx.list(Kind::machine, c.query);
          if (!all) return all.error();
          list.ops += static_cast<std::int64_t>(all->size());
          return {};
        });
      list.seconds = seconds_since(start);
      print(list);
    }

    Phase count{"count delivery_group= (calls)"};
    start = Clock::now();
    for (int round = 0; round < 100; ++round)
      timed(count, repo, false, [&](storage::Transaction& tx) -> common::Status {
        auto c = tx.count(Kind::machine, {{{"delivery_group", "group-even"}}});
        if (!c) return c.error();
        return {};
      });
    count.seconds = seconds_since(start);
    count.ops = 100;
    print(count);
  }

  if (!options.writers.empty()) concurrent_launches(repo, metrics, options, options.concurrent_only ? n : 2 * n);

  repo.close();
  std::error_code ec;
  std::printf("database size after close: %.1f MiB\n", static_cast<double>(fs::file_size(path, ec)) / 1048576.0);
  if (!dir.empty()) fs::remove_all(dir, ec);
  return 0;
}
