// bench/engine_memory.cpp: what the engine's state costs in memory (docs/architecture.md
// "Memory"). Builds a site of M single-session machines in a temporary SQLite file, then loads
// it into an engine three times: machines only, then with one live session per machine, then
// with one assignment per machine too, and prints the heap bytes each kind adds (glibc's
// mallinfo2: bytes in use, not RSS), per object, indexes included.
//
//   engine_memory [--machines M]     (100000 by default)
#include "broker/engine.hpp"
#include "storage/repository.hpp"

#include <malloc.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace {

namespace fs = std::filesystem;
using namespace common::model;

std::size_t in_use() {
  ::malloc_trim(0);
  return mallinfo2().uordblks;
}

std::string name(const char* prefix, int i) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%s%06d", prefix, i);
  return buf;
}

void must(const common::Status& st, const char* what) {
  if (st) return;
  std::fprintf(stderr, "engine_memory: %s: %s\n", what, st.error().describe().c_str());
  std::exit(1);
}

// Heap bytes an engine loaded from `repo` holds.
std::size_t loaded(storage::Repository& repo, broker::EngineStats& stats) {
  const auto before = in_use();
  broker::Engine engine;
  must(engine.load(repo), "load");
  stats = engine.stats();
  return in_use() - before;
}

}  // namespace

int main(int argc, char** argv) {
  int machines = 100000;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--machines" && i + 1 < argc) {
      machines = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: engine_memory [--machines M]\n");
      return 2;
    }
  }
  const fs::path dir = fs::temp_directory_path() / ("engine_memory-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  storage::SqliteOptions so;
  so.path = (dir / "site.db").string();
  auto repo = storage::open_sqlite(so);
  if (!repo) {
    std::fprintf(stderr, "engine_memory: %s\n", repo.error().describe().c_str());
    return 1;
  }
  auto write = [&](auto fn, const char* what) {
    must((*repo)->write([&](storage::Transaction& tx) -> common::Status { return fn(tx); }), what);
  };
  write(
      [&](storage::Transaction& tx) -> common::Status {
        if (auto c = tx.create(make_default(Kind::catalog, "pool")); !c) return c.error();
        if (auto c = tx.create(make_default(Kind::delivery_group, "Pool")); !c) return c.error();
        for (int i = 0; i < machines; ++i) {
          Object m = make_default(Kind::machine, name("MEM\\desktop-", i));
          m.fields["catalog"] = std::string("pool");
          m.fields["delivery_group"] = std::string("Pool");
          m.fields["dns_name"] = name("desktop-", i) + ".mem.example";
          m.fields["agent_address"] = std::string("10.1.2.3:1494");
          m.fields["registration_state"] = std::string("Registered");
          if (auto c = tx.create(m); !c) return c.error();
        }
        return {};
      },
      "machines");
  broker::EngineStats stats;
  const auto with_machines = loaded(**repo, stats);
  write(
      [&](storage::Transaction& tx) -> common::Status {
        for (int i = 0; i < machines; ++i) {
          Object s = make_default(Kind::session, name("S", i));
          s.fields["machine"] = name("MEM\\desktop-", i);
          s.fields["user_name"] = name("MEM\\user", i);
          s.fields["delivery_group"] = std::string("Pool");
          s.fields["state"] = std::string("Active");
          s.fields["client_name"] = name("CLIENT-", i);
          s.fields["client_address"] = std::string("192.0.2.44");
          s.fields["start_time"] = std::string("2026-12-02T08:00:00Z");
          if (auto c = tx.create(s); !c) return c.error();
        }
        return {};
      },
      "sessions");
  const auto with_sessions = loaded(**repo, stats);
  write(
      [&](storage::Transaction& tx) -> common::Status {
        for (int i = 0; i < machines; ++i) {
          Object a = make_default(Kind::assignment);
          a.fields["machine"] = name("MEM\\desktop-", i);
          a.fields["user"] = name("MEM\\user", i);
          if (auto c = tx.create(a); !c) return c.error();
        }
        return {};
      },
      "assignments");
  const auto with_all = loaded(**repo, stats);
  (*repo)->close();
  fs::remove_all(dir);

  const double n = machines;
  std::printf("%d machines (%zu loaded), %zu live sessions, %zu assignments\n", machines, stats.machines,
              stats.live_sessions, stats.assignments);
  std::printf("%-32s %12s %14s\n", "engine holding", "heap MiB", "bytes each");
  std::printf("%-32s %12.1f %14.0f\n", "machines", with_machines / 1048576.0, with_machines / n);
  std::printf("%-32s %12.1f %14.0f\n", "+ one live session each", with_sessions / 1048576.0,
              (static_cast<double>(with_sessions) - static_cast<double>(with_machines)) / n);
  std::printf("%-32s %12.1f %14.0f\n", "+ one assignment each", with_all / 1048576.0,
              (static_cast<double>(with_all) - static_cast<double>(with_sessions)) / n);
  return 0;
}
