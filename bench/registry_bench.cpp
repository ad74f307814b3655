// bench/registry_bench.cpp: the broker's own CPU per agent re-registration, in process (no
// network): broker::AgentRegistry over a file-backed SQLite database (synchronous = FULL) and the
// engine, for a site of M single-session machines. Every machine registers once (its facts are
// stored), all deregister, then all register again with the same facts (the reboot storm's
// re-registration): the CPU time of that last pass, divided by M, is printed, with the storage
// commits and rows read it caused. Not a test: it asserts nothing beyond "every registration
// succeeded". Results are recorded in docs/BENCHMARKS.md.
//
//   registry_bench [--machines M]
#include "broker/agent_registry.hpp"
#include "broker/engine.hpp"
#include "common/clock.hpp"
#include "common/log.hpp"
#include "common/metrics.hpp"
#include "storage/repository.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using namespace common::model;

double cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

double metric(const std::string& text, const std::string& name) {
  const auto at = text.find("\n" + name + " ");
  if (at == std::string::npos) return 0;
  return std::atof(text.c_str() + at + name.size() + 2);
}

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "registry_bench: %s\n", what.c_str());
  std::exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  int machines = 19000;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--machines") == 0 && i + 1 < argc) machines = std::atoi(argv[++i]);
    else fail("usage: registry_bench [--machines M]");
  }
  const fs::path dir = fs::temp_directory_path() / ("registry-bench-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  common::Metrics metrics;
  storage::SqliteOptions so;
  so.path = (dir / "registry.db").string();
  so.metrics = &metrics;
  auto repo = storage::open_sqlite(so);
  if (!repo) fail(repo.error().describe());
  std::vector<Object> objects = {make_default(Kind::catalog, "pool"), make_default(Kind::delivery_group, "Pool")};
  for (int i = 1; i <= machines; ++i) {
    Object m = make_default(Kind::machine, "BENCH\\pool-" + std::to_string(i));
    m.fields["catalog"] = std::string("pool");
    m.fields["delivery_group"] = std::string("Pool");
    objects.push_back(std::move(m));
  }
  auto st = (*repo)->write([&](storage::Transaction& tx) -> common::Status {
    for (const auto& o : objects)
      if (auto c = tx.create(o); !c) return c.error();
    return {};
  });
  if (!st) fail(st.error().describe());
  broker::Engine engine;
  if (auto loaded = engine.attach(**repo); !loaded) fail(loaded.error().describe());
  common::SystemClock clock;
  broker::AgentRegistry registry(**repo, engine, clock, common::null_logger(), 5, std::chrono::seconds(60));
  auto registration = [](int i) {
    broker::Registration r;
    r.machine = "BENCH\\pool-" + std::to_string(i);
    r.agent_version = "1.0.0";
    r.os = "Windows 11";
    r.session_support = "SingleSession";
    r.address = "10.0." + std::to_string(i / 250) + "." + std::to_string(i % 250) + ":1494";
    return r;
  };
  auto pass = [&](const char* what) {
    for (int i = 1; i <= machines; ++i) {
      auto r = registry.register_agent(registration(i));
      if (!r) fail(std::string(what) + ": " + r.error().describe());
      if (*r) fail(std::string(what) + ": refused: " + (*r)->message);
    }
  };
  pass("first registration");
  for (int i = 1; i <= machines; ++i) (void)registry.deregister(registration(i).machine, "AgentShutdown");
  const auto before = metrics.render();
  const double cpu = cpu_seconds();
  pass("re-registration");
  const double used = cpu_seconds() - cpu;
  const auto after = metrics.render();
  std::printf("registry_bench: %d machines: re-registration %.1f us CPU each; %.0f storage commits, %.0f rows read\n",
              machines, used / machines * 1e6,
              metric(after, "broker_storage_commit_batches_total") - metric(before, "broker_storage_commit_batches_total"),
              metric(after, "broker_storage_rows_read_total") - metric(before, "broker_storage_rows_read_total"));
  repo->reset();
  fs::remove_all(dir);
  return 0;
}
