#include "broker/power_manager.hpp"

#include "common/clock.hpp"
#include "storage/repository.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <thread>

using namespace common::model;

namespace {

Object make(Kind k, std::string name, std::initializer_list<std::pair<const char*, Value>> fields) {
  Object o = make_default(k, std::move(name));
  for (const auto& [key, v] : fields) o.fields[key] = v;
  return o;
}

struct Site {
  std::unique_ptr<storage::Repository> repo;
  common::ManualClock clock{std::chrono::system_clock::now()};

  Site() {
    storage::SqliteOptions o;
    o.path = ":memory:";
    auto r = storage::open_sqlite(o);
    REQUIRE(r);
    repo = std::move(*r);
    std::vector<Object> objects = {
        make(Kind::hypervisor_connection, "sim", {{"driver", std::string("simulated")},
                                                  {"simulated_shutdown_delay_seconds", std::int64_t{0}}}),
        make(Kind::catalog, "pool", {{"hypervisor_connection", std::string("sim")}}),
        make(Kind::delivery_group, "Pool", {}),
        // One machine on in every hour of every day.
        make(Kind::power_time_scheme, "Pool always",
             {{"delivery_group", std::string("Pool")},
              {"days_of_week", TextList{"Weekdays", "Weekend"}},
              {"pool_size", TextList(24, "1")}}),
    };
    for (int i = 1; i <= 4; ++i)
      objects.push_back(make(Kind::machine, "DEMO\\pool-" + std::to_string(i),
                             {{"catalog", std::string("pool")},
                              {"delivery_group", std::string("Pool")},
                              {"registration_state", std::string("Registered")},
                              {"power_state", std::string("On")}}));
    REQUIRE(repo->write([&](storage::Transaction& tx) -> common::Status {
      for (const auto& obj : objects)
        if (auto c = tx.create(obj); !c) return c.error();
      return {};
    }));
  }
  std::string machine_field(const std::string& name, const char* field) {
    std::string out;
    REQUIRE(repo->read([&](storage::Transaction& tx) -> common::Status {
      auto m = tx.get(Kind::machine, name);
      if (!m) return m.error();
      out = m->text(field);
      return {};
    }));
    return out;
  }
};

}  // namespace

TEST_CASE("power manager: the pool policy keeps the scheme's pool size and shuts the idle rest down") {
  Site site;
  broker::PowerManagerOptions o;
  o.tick = std::chrono::milliseconds(20);
  broker::PowerManager power(*site.repo, site.clock, nullptr, o);
  REQUIRE(power.start());
  CHECK(power.manages("DEMO\\pool-1"));

  // Four idle registered machines on, a pool size of one: the three highest names are shut down.
  auto queued = power.reconcile_pools();
  REQUIRE(queued);
  CHECK(*queued == 3);
  auto actions = power.actions();
  REQUIRE(actions.size() == 3);
  for (const auto& a : actions) {
    CHECK(a.action == power::Action::shutdown);
    CHECK(a.reason == "IdlePool");
    CHECK(a.base_priority == power::kSchedulePriority);
    CHECK(a.vm.machine != "DEMO\\pool-1");
  }
  // Nothing more while they are under way or done.
  auto again = power.reconcile_pools();
  REQUIRE(again);
  CHECK(*again == 0);
  // The queue runs them (one a minute by default: move the clock) and the machines end up Off.
  for (int i = 0; i < 200 && site.machine_field("DEMO\\pool-2", "power_state") != "Off"; ++i) {
    site.clock.advance(std::chrono::seconds(61));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (const char* m : {"DEMO\\pool-2", "DEMO\\pool-3", "DEMO\\pool-4"}) {
    for (int i = 0; i < 200 && site.machine_field(m, "power_state") != "Off"; ++i) {
      site.clock.advance(std::chrono::seconds(61));
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    CHECK(site.machine_field(m, "power_state") == "Off");
  }
  CHECK(site.machine_field("DEMO\\pool-1", "power_state") == "On");
  // Pool size met: nothing to do.
  auto after = power.reconcile_pools();
  REQUIRE(after);
  CHECK(*after == 0);
  power.stop();
}
