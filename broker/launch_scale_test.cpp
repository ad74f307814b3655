// Launches at site scale: what a launch reads from storage at 19,000 machines, and a storm of
// concurrent launches at 1,000 machines against a database another broker writes to as well.
#include "broker/engine.hpp"
#include "broker/instant_agents.hpp"
#include "broker/launcher.hpp"
#include "common/clock.hpp"
#include "common/crypto.hpp"
#include "common/metrics.hpp"
#include "common/work_queue.hpp"
#include "storage/repository.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <latch>
#include <map>
#include <set>
#include <thread>
#include <unistd.h>

using namespace common::model;
using broker::LaunchFailure;

namespace {

namespace fs = std::filesystem;

Object make(Kind k, std::string name, std::initializer_list<std::pair<const char*, Value>> fields) {
  Object o = make_default(k, std::move(name));
  for (const auto& [key, v] : fields) o.fields[key] = v;
  return o;
}

std::string machine_name(int i) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "SCALE\\pool-%05d", i);
  return buf;
}

// Returns once every task posted to `work` before the call has finished: one task per thread,
// each waiting until all are running, so no thread can still be busy with an earlier one.
void drain(common::WorkQueue& work, int threads) {
  auto all = std::make_shared<std::latch>(threads);
  auto done = std::make_shared<std::latch>(threads);
  for (int i = 0; i < threads; ++i)
    REQUIRE(work.post([all, done] {
      all->arrive_and_wait();
      done->count_down();
    }));
  done->wait();
}

double metric(const common::Metrics& metrics, const std::string& name) {
  const auto text = metrics.render();
  const auto at = text.find("\n" + name + " ");
  return at == std::string::npos ? 0 : std::atof(text.c_str() + at + name.size() + 2);
}

// A site of `machines` registered single-session desktops in one shared group, in a database
// file of its own, with the engine and a launcher on it.
struct ScaleSite {
  fs::path dir;
  common::Metrics metrics;
  std::unique_ptr<storage::Repository> repo;
  broker::Engine engine;  // outlives the work queue: its tasks' commits reach it
  common::SystemClock clock;
  broker::InstantAgents agents;
  static constexpr int kThreads = 4;
  common::WorkQueue work{kThreads};
  std::unique_ptr<broker::Launcher> launcher;

  explicit ScaleSite(int machines) {
    dir = fs::temp_directory_path() / ("launch_scale_test-" + std::to_string(::getpid()) + "-" +
                                       std::to_string(reinterpret_cast<std::uintptr_t>(this)));
    fs::create_directories(dir);
    storage::SqliteOptions o;
    o.path = (dir / "site.db").string();
    o.metrics = &metrics;
    auto r = storage::open_sqlite(o);
    REQUIRE(r);
    repo = std::move(*r);
    REQUIRE(repo->write([&](storage::Transaction& tx) -> common::Status {
      for (const auto& obj :
           {make(Kind::catalog, "pool", {}), make(Kind::delivery_group, "Pool", {}),
            make(Kind::rule, "pool-access", {{"rule_type", std::string("access")},
                                             {"delivery_group", std::string("Pool")},
                                             {"included_users", TextList{"SCALE\\Users"}}}),
            make(Kind::rule, "pool", {{"rule_type", std::string("entitlement")},
                                      {"delivery_group", std::string("Pool")},
                                      {"included_user_filter_enabled", false}})})
        if (auto c = tx.create(obj); !c) return c.error();
      for (int i = 1; i <= machines; ++i)
        if (auto c = tx.create(make(Kind::machine, machine_name(i),
                                    {{"catalog", std::string("pool")},
                                     {"delivery_group", std::string("Pool")},
                                     {"registration_state", std::string("Registered")},
                                     {"agent_address", std::string("192.0.2.1:1494")}}));
            !c)
          return c.error();
      return {};
    }));
    REQUIRE(engine.attach(*repo));
    broker::LauncherOptions lo;
    lo.credential_key = common::crypto::new_site_key();
    launcher = std::make_unique<broker::Launcher>(*repo, engine, clock, agents, work, nullptr, lo);
  }
  ~ScaleSite() {
    launcher.reset();
    work.stop();
    repo->close();
    std::error_code ec;
    fs::remove_all(dir, ec);
  }

  broker::LaunchRequest request(int user) const {
    broker::LaunchRequest req;
    req.user.user_name = "u" + std::to_string(user);
    req.user.domain = "SCALE";
    req.user.qualified_name = "SCALE\\u" + std::to_string(user);
    req.user.groups = {"SCALE\\Users"};
    req.resource = "Pool";
    req.client_address = "192.0.2.10";
    req.credential.type = "assertion";
    return req;
  }

  // Live sessions per machine, as the database holds them.
  std::map<std::string, int> live_sessions() {
    std::map<std::string, int> out;
    REQUIRE(repo->read([&](storage::Transaction& tx) -> common::Status {
      storage::Query q;
      q.not_equals.emplace_back("state", "LoggedOff");
      auto sessions = tx.list(Kind::session, q);
      if (!sessions) return sessions.error();
      for (const auto& s : *sessions) ++out[s.text("machine")];
      return {};
    }));
    return out;
  }
};

}  // namespace

TEST_CASE("launch at scale: a launch at a 19,000-machine site reads only the rows it changes") {
  ScaleSite site(19000);
  CHECK(site.engine.stats().machines == 19000);
  // Warm: the first launch prepares the statements.
  REQUIRE(site.launcher->launch_sync(site.request(0)).ok());
  drain(site.work, ScaleSite::kThreads);
  site.launcher->flush_brokering_durations();
  const double rows_before = metric(site.metrics, "broker_storage_rows_read_total");
  const double batches_before = metric(site.metrics, "broker_storage_commit_batches_total");
  auto r = site.launcher->launch_sync(site.request(1));
  REQUIRE_MESSAGE(r.ok(), r.message);
  drain(site.work, ScaleSite::kThreads);
  site.launcher->flush_brokering_durations();  // the brokering duration, written beside the reply
  const double rows = metric(site.metrics, "broker_storage_rows_read_total") - rows_before;
  const double batches = metric(site.metrics, "broker_storage_commit_batches_total") - batches_before;
  MESSAGE("one launch at 19,000 machines read ", rows, " rows in ", batches, " commits");
  // The ticket's machine check, the guarded session insert's count, the name and reference
  // checks, the machine's row read back after its two columns are set, the session's: a few
  // dozen at most, against tens of thousands for a read of the site.
  CHECK(rows < 40);
  CHECK(batches <= 2);
  CHECK(site.live_sessions().size() == 2);
}

TEST_CASE("launch at scale: a launch storm never puts two sessions on a desktop, and a refused claim fails over") {
  constexpr int kMachines = 1000, kTakenElsewhere = 40, kLaunches = 900;
  ScaleSite site(kMachines);
  // Another broker sharing the database has put users on some desktops: this broker's engine does
  // not know (its own connection, no observer).
  std::set<std::string> taken;
  {
    storage::SqliteOptions o;
    o.path = (site.dir / "site.db").string();
    auto other = storage::open_sqlite(o);
    REQUIRE(other);
    REQUIRE((*other)->write([&](storage::Transaction& tx) -> common::Status {
      for (int i = 1; i <= kTakenElsewhere; ++i) {
        const auto m = machine_name(i * 7);  // spread over the group
        taken.insert(m);
        auto s = make(Kind::session, "ELSEWHERE" + std::to_string(i),
                      {{"machine", m}, {"user_name", "SCALE\\other" + std::to_string(i)}, {"state", std::string("Active")}});
        if (auto c = tx.create(s); !c) return c.error();
      }
      return {};
    }));
    (*other)->close();
  }
  CHECK(site.engine.free_machines("Pool").size() == kMachines);  // it believes them free

  // Eight threads launch for distinct users at once.
  std::atomic<int> next{0}, ok{0};
  std::vector<std::string> failures;
  std::mutex failures_mutex;
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&] {
      for (int i; (i = next++) < kLaunches;) {
        auto r = site.launcher->launch_sync(site.request(100 + i));
        if (r.ok()) {
          ++ok;
        } else {
          std::lock_guard lock(failures_mutex);
          failures.push_back(std::string(broker::to_string(r.failure)) + ": " + r.message);
        }
      }
    });
  for (auto& t : threads) t.join();
  drain(site.work, ScaleSite::kThreads);
  for (const auto& f : failures) MESSAGE(f);
  CHECK(ok == kLaunches);
  CHECK(failures.empty());

  const auto live = site.live_sessions();
  int sessions = 0;
  for (const auto& [machine, n] : live) {
    CHECK_MESSAGE(n == 1, machine, " has ", n, " live sessions");
    sessions += n;
  }
  CHECK(sessions == kLaunches + kTakenElsewhere);
  // Some launches chose a desktop the other broker had taken; the guarded insert refused them and
  // they went on to another desktop, and the engine learnt of the other broker's sessions.
  CHECK(site.launcher->refused_claims() > 0);
  CHECK(site.launcher->refused_claims() <= static_cast<std::uint64_t>(kTakenElsewhere));
  for (const auto& m : taken) CHECK(site.engine.sessions_of_machine(m).size() == 1);
  CHECK(site.engine.stats().reserved == 0);  // every reservation confirmed or undone
  CHECK(site.engine.free_machines("Pool").size() == kMachines - kLaunches - kTakenElsewhere);
}

TEST_CASE("launch at scale: housekeeping writes only when something is due") {
  ScaleSite site(50);
  const auto commits = [&] { return metric(site.metrics, "broker_storage_commit_batches_total"); };
  REQUIRE(site.launcher->sweep());  // at start: tickets of an earlier run may be waiting
  const double after_first = commits();
  REQUIRE(site.launcher->sweep());
  CHECK(commits() == after_first);  // nothing due: no commit
  REQUIRE(site.launcher->launch_sync(site.request(1)).ok());
  drain(site.work, ScaleSite::kThreads);
  site.launcher->flush_brokering_durations();
  const double after_launch = commits();
  REQUIRE(site.launcher->sweep());  // the launch's ticket expires in 200 s, its session is young
  CHECK(commits() == after_launch);
}
