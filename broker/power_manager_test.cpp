#include "broker/power_manager.hpp"

#include "broker/engine.hpp"
#include "common/clock.hpp"
#include "storage/repository.hpp"

#include <doctest/doctest.h>

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <set>
#include <thread>

using namespace common::model;

namespace {

Object make(Kind k, std::string name, std::initializer_list<std::pair<const char*, Value>> fields) {
  Object o = make_default(k, std::move(name));
  for (const auto& [key, v] : fields) o.fields[key] = v;
  return o;
}

// Machines' registrations are live state: the engine's (the tests set them there; storage's
// registration_state stays Unregistered, as brokerd leaves it).
struct Site {
  broker::Engine engine;  // outlives the repository's commits
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
                              {"power_state", std::string("On")}}));
    REQUIRE(repo->write([&](storage::Transaction& tx) -> common::Status {
      for (const auto& obj : objects)
        if (auto c = tx.create(obj); !c) return c.error();
      return {};
    }));
    REQUIRE(engine.attach(*repo));
    for (int i = 1; i <= 4; ++i) REQUIRE(engine.registered("DEMO\\pool-" + std::to_string(i), 0));
  }
  // The machine is off and its agent gone.
  void power_off(const std::string& name) {
    update(Kind::machine, name, {{"power_state", std::string("Off")}});
    REQUIRE(engine.unregistered(name));
  }
  // Sets fields of a stored object.
  void update(Kind k, const std::string& name, std::initializer_list<std::pair<const char*, Value>> fields) {
    REQUIRE(repo->write([&](storage::Transaction& tx) -> common::Status {
      auto o = tx.get(k, name);
      if (!o) return o.error();
      for (const auto& [key, v] : fields) o->fields[key] = v;
      if (auto u = tx.update(name, *o); !u) return u.error();
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
  power.set_engine(&site.engine);
  REQUIRE(power.start());
  CHECK(power.manages("DEMO\\pool-1"));

  // Four idle registered machines on, a pool size of one: the three highest names are shut down.
  auto queued = power.reconcile_pools();
  REQUIRE(queued.has_value());
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
  REQUIRE(again.has_value());
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
  REQUIRE(after.has_value());
  CHECK(*after == 0);
  power.stop();
}

TEST_CASE("power manager: fault states StuckOnBoot and Unregistered") {
  Site site;
  // pool-1 and pool-2 off; the simulated hypervisor takes an hour to boot.
  site.update(Kind::hypervisor_connection, "sim",
              {{"simulated_boot_delay_seconds", std::int64_t{3600}}, {"max_new_actions_per_minute", std::int64_t{100}}});
  for (const char* name : {"DEMO\\pool-1", "DEMO\\pool-2"})
    site.power_off(name);
  broker::PowerManagerOptions o;
  o.tick = std::chrono::milliseconds(20);
  broker::PowerManager power(*site.repo, site.clock, nullptr, o);
  power.set_engine(&site.engine);
  REQUIRE(power.start());
  auto on = power.submit({"DEMO\\pool-1"}, power::Action::turn_on);
  REQUIRE(on.has_value());
  // The queue gives up after its completion timeout (10 min): the machine is stuck on boot.
  for (int i = 0; i < 200 && site.machine_field("DEMO\\pool-1", "fault_state") != "StuckOnBoot"; ++i) {
    site.clock.advance(std::chrono::minutes(1));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  CHECK(site.machine_field("DEMO\\pool-1", "fault_state") == "StuckOnBoot");
  CHECK(power.get(on->front().id)->state == power::ActionState::failed);

  power.stop();
}

TEST_CASE("power manager: a machine powered on whose agent never registers gets the Unregistered fault") {
  Site site;
  site.update(Kind::hypervisor_connection, "sim", {{"simulated_boot_delay_seconds", std::int64_t{0}}});
  site.power_off("DEMO\\pool-2");
  broker::PowerManagerOptions o;
  o.tick = std::chrono::milliseconds(20);
  broker::PowerManager power(*site.repo, site.clock, nullptr, o);
  power.set_engine(&site.engine);
  REQUIRE(power.start());
  auto on = power.submit({"DEMO\\pool-2"}, power::Action::turn_on);
  REQUIRE(on.has_value());
  for (int i = 0; i < 500 && site.machine_field("DEMO\\pool-2", "power_state") != "On"; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  REQUIRE(site.machine_field("DEMO\\pool-2", "power_state") == "On");
  // Within the registration timeout (the site's registration_wait_timeout_seconds, 180 s by
  // default): no fault. Past it, still unregistered: Unregistered.
  site.clock.advance(std::chrono::minutes(2));
  REQUIRE(power.refresh());
  CHECK(site.machine_field("DEMO\\pool-2", "fault_state") == "None");
  site.clock.advance(std::chrono::seconds(61));
  REQUIRE(power.refresh());
  CHECK(site.machine_field("DEMO\\pool-2", "fault_state") == "Unregistered");
  // Registered machines that are on are never faulted for it.
  CHECK(site.machine_field("DEMO\\pool-1", "fault_state") == "None");
  power.stop();
}

TEST_CASE("power manager: a launch's power-on says when the connection's throttles hold it back") {
  Site site;
  site.update(Kind::hypervisor_connection, "sim",
              {{"max_new_actions_per_minute", std::int64_t{1}}, {"simulated_boot_delay_seconds", std::int64_t{3600}}});
  for (const char* name : {"DEMO\\pool-1", "DEMO\\pool-2"})
    site.update(Kind::machine, name, {{"power_state", std::string("Off")}});
  broker::PowerManagerOptions o;
  o.tick = std::chrono::milliseconds(20);
  broker::PowerManager power(*site.repo, site.clock, nullptr, o);
  power.set_engine(&site.engine);
  REQUIRE(power.start());
  // The first power-on of the minute starts; the second waits for the per-minute throttle.
  auto first = power.power_on("DEMO\\pool-1");
  REQUIRE(first.has_value());
  CHECK_FALSE(*first);
  for (int i = 0; i < 500 && power.stats()["sim"].started_last_minute == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  auto second = power.power_on("DEMO\\pool-2");
  REQUIRE(second.has_value());
  CHECK(*second);
  // Not a power-managed machine: an error, not a throttle.
  CHECK_FALSE(power.power_on("DEMO\\nobody").has_value());
  power.stop();
}

TEST_CASE("power manager: a private group's assigned machines start when peak begins and stop when off-peak begins") {
  Site site;
  common::SysTime six_thirty;  // a Monday, 06:30 UTC (the group's time zone)
  REQUIRE(common::parse_time("2026-11-23T06:30:00Z", six_thirty));
  site.clock.set(six_thirty);
  std::vector<std::string> peak(24, "false");
  for (int h = 7; h < 19; ++h) peak[static_cast<std::size_t>(h)] = "true";
  REQUIRE(site.repo->write([&](storage::Transaction& tx) -> common::Status {
    std::vector<Object> objects = {
        make(Kind::delivery_group, "Personal", {{"desktop_kind", std::string("Private")}}),
        make(Kind::power_time_scheme, "Personal hours",
             {{"delivery_group", std::string("Personal")},
              {"days_of_week", TextList{"Weekdays", "Weekend"}},
              {"peak_hours", TextList(peak.begin(), peak.end())}}),
    };
    for (const char* pc : {"DEMO\\pc-1", "DEMO\\pc-2"}) {
      objects.push_back(make(Kind::machine, pc,
                             {{"catalog", std::string("pool")},
                              {"delivery_group", std::string("Personal")},
                              {"power_state", std::string("Off")}}));
      objects.push_back(make(Kind::assignment, {}, {{"machine", std::string(pc)}, {"user", std::string("DEMO\\alice")}}));
    }
    for (const auto& obj : objects)
      if (auto c = tx.create(obj); !c) return c.error();
    return {};
  }));
  broker::PowerManagerOptions o;
  o.tick = std::chrono::milliseconds(20);
  broker::PowerManager power(*site.repo, site.clock, nullptr, o);
  power.set_engine(&site.engine);
  REQUIRE(power.start());
  auto turn_ons = [&] {
    std::vector<std::string> out;
    for (const auto& a : power.actions())
      if (a.action == power::Action::turn_on && a.reason == "Schedule") out.push_back(a.vm.machine);
    return out;
  };
  REQUIRE(power.reconcile_pools());  // off-peak, first pass: nothing for the private group
  CHECK(turn_ons().empty());
  site.clock.advance(std::chrono::hours(1));  // 07:30: peak has begun
  REQUIRE(power.reconcile_pools());
  CHECK(turn_ons() == std::vector<std::string>{"DEMO\\pc-1", "DEMO\\pc-2"});
  for (const auto& a : power.actions())
    if (a.reason == "Schedule") CHECK(a.base_priority == power::kSchedulePriority);
  power.stop();
}

TEST_CASE("power manager: a libvirt connection's username and password_file answer the hypervisor's credential questions") {
  const std::string dir = std::filesystem::temp_directory_path() / ("pm-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/good.pw") << "s3cret\n";
  std::ofstream(dir + "/bad.pw") << "wrong\n";
  const std::string uri = std::string("test://") + OPENBROKER_SOURCE_DIR + "/tests/data/libvirt/test-auth.xml";
  auto machine_state = [&](const std::string& password_file) {
    Site site;
    REQUIRE(site.repo->write([&](storage::Transaction& tx) -> common::Status {
      std::vector<Object> objects = {
          make(Kind::hypervisor_connection, "kvm",
               {{"driver", std::string("libvirt")}, {"uri", uri}, {"username", std::string("broker")},
                {"password_file", password_file}}),
          make(Kind::catalog, "secure", {{"hypervisor_connection", std::string("kvm")}}),
          make(Kind::machine, "DEMO\\secure-01", {{"catalog", std::string("secure")}}),
      };
      for (const auto& obj : objects)
        if (auto c = tx.create(obj); !c) return c.error();
      return {};
    }));
    broker::PowerManagerOptions o;
    o.base_dir = dir;  // password_file is relative to the config file's directory
    broker::PowerManager power(*site.repo, site.clock, nullptr, o);
    power.set_engine(&site.engine);
    REQUIRE(power.start());
    REQUIRE(power.refresh());
    const auto state = site.machine_field("DEMO\\secure-01", "power_state");
    power.stop();
    return state;
  };
  CHECK(machine_state("good.pw") == "On");
  CHECK(machine_state("bad.pw") == "Unavailable");      // authentication refused
  CHECK(machine_state("missing.pw") == "Unavailable");  // the connection is left out
  std::filesystem::remove_all(dir);
}

TEST_CASE("power manager: a simulated connection's simulated_failure_percent fails its actions (retried, then Failed)") {
  Site site;
  site.update(Kind::hypervisor_connection, "sim", {{"simulated_failure_percent", std::int64_t{100}}});
  broker::PowerManagerOptions o;
  o.tick = std::chrono::milliseconds(10);
  broker::PowerManager power(*site.repo, site.clock, nullptr, o);
  power.set_engine(&site.engine);
  REQUIRE(power.start());
  auto off = power.submit({"DEMO\\pool-4"}, power::Action::shutdown);
  REQUIRE(off.has_value());
  const auto id = off->front().id;
  for (int i = 0; i < 500 && power.get(id)->state != power::ActionState::failed; ++i) {
    site.clock.advance(std::chrono::seconds(61));  // past each retry's back-off and the per-minute throttle
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const auto a = power.get(id);
  REQUIRE(a.has_value());
  CHECK(a->state == power::ActionState::failed);
  CHECK(a->attempts > 1);  // transient: retried before giving up
  CHECK(site.machine_field("DEMO\\pool-4", "power_state") == "On");
  power.stop();
}

TEST_CASE("power manager: the pool policy never shuts down a machine held for a launch") {
  Site site;
  broker::PowerManagerOptions o;
  o.tick = std::chrono::milliseconds(20);
  broker::PowerManager power(*site.repo, site.clock, nullptr, o);
  power.set_engine(&site.engine);
  power.set_held_machines([] { return std::set<std::string>{"DEMO\\pool-4"}; });
  REQUIRE(power.start());
  // Pool size one, four idle machines on: three go, but not pool-4 (held; counted as in use).
  auto queued = power.reconcile_pools();
  REQUIRE(queued.has_value());
  CHECK(*queued == 3);
  for (const auto& a : power.actions()) CHECK(a.vm.machine != "DEMO\\pool-4");
  power.stop();
}

TEST_CASE("power manager: a launch's power-on on a hypervisor that refuses every call is retried, then FailedToStart, saying why") {
  Site site;
  site.update(Kind::hypervisor_connection, "sim", {{"simulated_failure_percent", std::int64_t{100}}});
  site.power_off("DEMO\\pool-1");
  broker::PowerManagerOptions o;
  o.tick = std::chrono::milliseconds(10);
  broker::PowerManager power(*site.repo, site.clock, nullptr, o);
  power.set_engine(&site.engine);
  REQUIRE(power.start());
  auto throttled = power.power_on("DEMO\\pool-1");  // as the launcher asks
  REQUIRE(throttled.has_value());
  std::optional<broker::PowerAction> action;
  for (const auto& a : power.actions())
    if (a.vm.machine == "DEMO\\pool-1" && a.action == power::Action::turn_on) action = a;
  REQUIRE(action.has_value());
  CHECK(action->reason == "Launch");
  const auto id = action->id;
  for (int i = 0; i < 500 && power.get(id)->state != power::ActionState::failed; ++i) {
    site.clock.advance(std::chrono::seconds(61));  // past each retry's back-off and the per-minute throttle
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const auto a = power.get(id);
  REQUIRE(a.has_value());
  CHECK(a->state == power::ActionState::failed);
  CHECK(a->attempts == 5);  // the built-in max_attempts
  CHECK(a->failure == power::Failure::connection);
  CHECK(a->failure_reason.find("gave up after 5 attempts") != std::string::npos);
  for (int i = 0; i < 500 && site.machine_field("DEMO\\pool-1", "fault_state") != "FailedToStart"; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(site.machine_field("DEMO\\pool-1", "fault_state") == "FailedToStart");  // launches skip it now
  power.stop();
}
