#include "power/action_queue.hpp"

#include "power/simulated_driver.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using power::Action;
using power::ActionQueue;
using power::ActionRecord;
using power::ActionState;
using power::Failure;
using power::PowerState;
using power::SimulatedDriver;

namespace {

const common::SysTime kStart = common::SysTime{} + 1000h;  // any fixed point

power::VmRef vm(const std::string& id) { return power::VmRef{"DEMO\\" + id, id}; }

// The owner's side of durability: a table of records, and the order of the calls.
struct FakeStore : power::ActionStore {
  mutable std::mutex mutex;
  std::map<std::int64_t, ActionRecord> rows;
  std::vector<std::pair<std::int64_t, ActionState>> history;  // every saved() call
  std::vector<std::int64_t> forgotten_ids;
  std::set<std::thread::id> threads;

  void saved(const ActionRecord& r) override {
    std::lock_guard lock(mutex);
    rows[r.id] = r;
    history.emplace_back(r.id, r.state);
    threads.insert(std::this_thread::get_id());
  }
  void forgotten(const ActionRecord& r) override {
    std::lock_guard lock(mutex);
    rows.erase(r.id);
    forgotten_ids.push_back(r.id);
    threads.insert(std::this_thread::get_id());
  }
  std::vector<ActionRecord> all() const {
    std::lock_guard lock(mutex);
    std::vector<ActionRecord> out;
    for (const auto& [id, r] : rows) out.push_back(r);
    return out;
  }
  std::vector<ActionState> states_of(std::int64_t id) const {
    std::lock_guard lock(mutex);
    std::vector<ActionState> out;
    for (const auto& [i, s] : history)
      if (i == id) out.push_back(s);
    return out;
  }
};

ActionQueue::Options options() {
  ActionQueue::Options o;
  o.connection = "hv1";
  o.limits = {100, 100, 1000};
  o.poll_interval = 1h;  // passes only when woken: the tests poll()
  o.check_interval = 5s;
  o.completion_timeout = 10min;
  o.initial_backoff = 10s;
  o.max_backoff = 1min;
  return o;
}

SimulatedDriver::Options driver_options() {
  SimulatedDriver::Options o;
  o.boot_delay = 30s;
  o.shutdown_delay = 10s;
  return o;
}

struct Fixture {
  common::ManualClock clock{kStart};
  SimulatedDriver driver{clock, driver_options()};
  FakeStore store;
  std::unique_ptr<ActionQueue> queue;

  explicit Fixture(ActionQueue::Options o = options()) { make(std::move(o)); }
  void make(ActionQueue::Options o) { queue = std::make_unique<ActionQueue>(driver, clock, std::move(o), &store); }
  // One pass now, then everything it caused (driver calls, follow-up passes, store calls).
  void settle() {
    queue->poll();
    queue->wait_idle();
  }
  void advance(std::chrono::milliseconds d) {
    clock.advance(d);
    settle();
  }
  std::int64_t submit(const std::string& id, Action action, int priority = power::kAdminPriority,
                      const std::string& reason = "Admin") {
    auto r = queue->submit({0, vm(id), action, priority, reason});
    REQUIRE(r.has_value());
    CHECK(r->created);
    return r->id;
  }
  ActionState state(std::int64_t id) {
    const auto r = queue->get(id);
    REQUIRE(r.has_value());
    return r->state;
  }
  ActionRecord record(std::int64_t id) {
    const auto r = queue->get(id);
    REQUIRE(r.has_value());
    return *r;
  }
  std::size_t count(ActionState s) { return queue->stats().by_state[static_cast<std::size_t>(s)]; }
};

// Follows the observer: the order actions started in, and the most active at once.
struct StartLog {
  std::mutex mutex;
  std::vector<std::int64_t> started;
  int active = 0, max_active = 0;
  void attach(ActionQueue& q) {
    q.on_change([this](const ActionRecord& r, std::optional<ActionState> before) {
      std::lock_guard lock(mutex);
      if (r.state == ActionState::started) {
        started.push_back(r.id);
        max_active = std::max(max_active, ++active);
      } else if (before == ActionState::started) {
        --active;
      }
    });
  }
  std::vector<std::int64_t> order() {
    std::lock_guard lock(mutex);
    return started;
  }
};

}  // namespace

TEST_CASE("action queue: names and targets") {
  ActionState s{};
  CHECK(power::to_string(ActionState::canceled) == "Canceled");
  CHECK(power::from_string("Lost", s));
  CHECK(s == ActionState::lost);
  CHECK_FALSE(power::from_string("Deleted", s));
  CHECK(power::target_state(Action::shutdown) == PowerState::off);
  CHECK(power::target_state(Action::suspend) == PowerState::suspended);
  CHECK(power::target_state(Action::restart) == PowerState::on);
  CHECK(power::finished(ActionState::lost));
  CHECK_FALSE(power::finished(ActionState::started));
}

TEST_CASE("action queue: a TurnOn completes only when the driver reports On") {
  Fixture f;
  f.driver.add("vm1", PowerState::off);
  const auto id = f.submit("vm1", Action::turn_on, power::kLaunchPriority, "Launch");
  f.settle();
  CHECK(f.state(id) == ActionState::started);
  auto r = f.record(id);
  CHECK(r.start_time == kStart);
  CHECK(r.attempts == 1);
  CHECK(r.hypervisor_connection == "hv1");
  CHECK(r.reason == "Launch");

  f.advance(29s);  // queried: still TurningOn
  CHECK(f.state(id) == ActionState::started);
  f.advance(6s);
  CHECK(f.state(id) == ActionState::completed);
  r = f.record(id);
  CHECK(r.completion_time == kStart + 35s);
  CHECK(r.failure == Failure::none);
  CHECK(r.failure_reason.empty());
  CHECK(f.store.states_of(id) ==
        std::vector<ActionState>{ActionState::pending, ActionState::started, ActionState::completed});
}

TEST_CASE("action queue: a machine that never reaches the target times out; one that vanishes is Lost") {
  Fixture f;
  f.driver.add("stuck", PowerState::off);
  f.driver.add("gone", PowerState::off);
  const auto stuck = f.submit("stuck", Action::turn_on);
  const auto gone = f.submit("gone", Action::turn_on);
  f.settle();
  f.driver.set_state("stuck", PowerState::off);  // the guest crashed during boot
  f.driver.remove("gone");
  f.advance(5s);
  CHECK(f.state(gone) == ActionState::lost);
  CHECK(f.record(gone).failure == Failure::not_found);
  CHECK(f.state(stuck) == ActionState::started);
  f.advance(9min);
  CHECK(f.state(stuck) == ActionState::started);
  f.advance(1min);
  const auto r = f.record(stuck);
  CHECK(r.state == ActionState::failed);
  CHECK(r.failure == Failure::timeout);
  CHECK(r.failure_reason.find("timed out") != std::string::npos);
  CHECK(r.failure_reason.find("last seen Off") != std::string::npos);
}

TEST_CASE("action queue: lower priority numbers run first; a launch jumps ahead of queued policy actions") {
  auto o = options();
  o.limits.max_absolute_active_actions = 1;
  o.enabled = false;  // queue everything first
  Fixture f(o);
  StartLog log;
  log.attach(*f.queue);
  for (const char* id : {"a", "b", "c"}) f.driver.add(id, PowerState::on);
  f.driver.add("d", PowerState::off);
  const auto a = f.submit("a", Action::shutdown, power::kPolicyPriority, "Policy");
  const auto b = f.submit("b", Action::shutdown, power::kPolicyPriority, "Policy");
  const auto c = f.submit("c", Action::shutdown, power::kSchedulePriority, "Schedule");
  f.settle();
  CHECK(f.count(ActionState::pending) == 3);  // disabled: nothing starts
  const auto d = f.submit("d", Action::turn_on, power::kLaunchPriority, "Launch");
  f.queue->set_enabled(true);
  f.settle();
  CHECK(log.order() == std::vector<std::int64_t>{d});
  f.advance(30s);  // d: On; then c (schedule 40) before a and b (policy 50, oldest first)
  CHECK(f.state(d) == ActionState::completed);
  CHECK(log.order() == std::vector<std::int64_t>{d, c});
  for (int i = 0; i < 3; ++i) f.advance(10s);
  CHECK(log.order() == std::vector<std::int64_t>{d, c, a, b});
  CHECK(f.count(ActionState::completed) == 4);
  CHECK(log.max_active == 1);
}

TEST_CASE("action queue: throttle on absolute active actions") {
  auto o = options();
  o.limits = {2, 100, 1000};
  Fixture f(o);
  StartLog log;
  log.attach(*f.queue);
  std::vector<std::int64_t> ids;
  for (int i = 0; i < 5; ++i) {
    f.driver.add("m" + std::to_string(i), PowerState::off);
    ids.push_back(f.submit("m" + std::to_string(i), Action::turn_on));
  }
  f.settle();
  auto s = f.queue->stats();
  CHECK(s.active == 2);
  CHECK(s.queue_depth == 3);
  f.advance(30s);
  CHECK(f.count(ActionState::completed) == 2);
  CHECK(f.queue->stats().active == 2);
  f.advance(30s);
  f.advance(30s);
  CHECK(f.count(ActionState::completed) == 5);
  CHECK(log.max_active == 2);

  // Raising the limit takes effect at once.
  for (int i = 0; i < 4; ++i) {
    f.driver.add("n" + std::to_string(i), PowerState::off);
    f.submit("n" + std::to_string(i), Action::turn_on);
  }
  f.queue->set_limits({4, 100, 1000});
  f.settle();
  CHECK(f.queue->stats().active == 4);
}

TEST_CASE("action queue: throttle on the percentage of the connection's machines") {
  auto o = options();
  o.limits = {100, 20, 1000};
  Fixture f(o);
  f.queue->set_machine_count(10);  // 20% of 10 (set before submitting: the queue starts at once)
  for (int i = 0; i < 10; ++i) {
    f.driver.add("m" + std::to_string(i), PowerState::off);
    f.submit("m" + std::to_string(i), Action::turn_on);
  }
  f.settle();
  CHECK(f.queue->stats().active == 2);
  f.queue->set_machine_count(20);  // 20% of 20
  f.settle();
  CHECK(f.queue->stats().active == 4);
  f.advance(30s);
  CHECK(f.count(ActionState::completed) == 4);
  CHECK(f.queue->stats().active == 4);

  SUBCASE("at least one, however few machines") {
    f.queue->set_machine_count(2);  // 20% of 2 = 0.4
    f.advance(30s);                 // the four started ones complete; one more may start
    CHECK(f.queue->stats().active == 1);
  }
  SUBCASE("not applied while the machine count is unknown") {
    f.queue->set_machine_count(0);
    f.settle();
    CHECK(f.queue->stats().active == 6);
  }
}

TEST_CASE("action queue: throttle on new actions per sliding minute") {
  auto o = options();
  o.limits = {100, 100, 3};
  Fixture f(o);
  std::vector<std::int64_t> ids;
  for (int i = 0; i < 5; ++i) {
    f.driver.add("m" + std::to_string(i), PowerState::on);
    ids.push_back(f.submit("m" + std::to_string(i), Action::turn_off));  // completes at once
  }
  f.settle();
  CHECK(f.count(ActionState::completed) == 3);
  CHECK(f.count(ActionState::pending) == 2);
  CHECK(f.queue->stats().started_last_minute == 3);
  f.advance(59s);
  CHECK(f.count(ActionState::pending) == 2);  // nothing is active, but the minute is not over
  f.advance(1s);
  CHECK(f.count(ActionState::completed) == 5);
  CHECK(f.queue->stats().started_last_minute == 2);
  CHECK(f.record(ids[4]).start_time == kStart + 60s);
}

TEST_CASE("action queue: transient failures are retried with exponential back-off, then succeed") {
  auto o = options();
  o.initial_backoff = 10s;
  o.max_backoff = 15s;
  Fixture f(o);
  f.driver.add("vm1", PowerState::off);
  f.driver.inject_failures("vm1", Failure::connection, 2);
  const auto id = f.submit("vm1", Action::turn_on);
  f.settle();
  auto r = f.record(id);
  CHECK(r.state == ActionState::pending);
  CHECK(r.attempts == 1);
  CHECK(r.failure == Failure::connection);
  CHECK(r.failure_reason.find("retrying") != std::string::npos);
  CHECK(r.next_attempt == kStart + 10s);
  f.advance(9s);
  CHECK(f.record(id).attempts == 1);
  f.advance(1s);  // second attempt fails too; the next wait doubles (20 s), capped at 15 s
  r = f.record(id);
  CHECK(r.state == ActionState::pending);
  CHECK(r.attempts == 2);
  CHECK(r.next_attempt == kStart + 25s);
  f.advance(14s);
  CHECK(f.record(id).attempts == 2);
  f.advance(1s);
  CHECK(f.state(id) == ActionState::started);
  f.advance(30s);
  r = f.record(id);
  CHECK(r.state == ActionState::completed);
  CHECK(r.attempts == 3);
  CHECK(r.failure_reason.empty());
  CHECK(f.driver.perform_calls() == 3);
  CHECK(f.store.states_of(id) ==
        std::vector<ActionState>{ActionState::pending, ActionState::started, ActionState::pending, ActionState::started,
                                 ActionState::pending, ActionState::started, ActionState::completed});
}

TEST_CASE("action queue: transient failures give up after max_attempts") {
  auto o = options();
  o.max_attempts = 3;
  o.initial_backoff = 1s;
  Fixture f(o);
  f.driver.add("vm1", PowerState::off);
  f.driver.inject_failures("vm1", Failure::timeout, 10);
  const auto id = f.submit("vm1", Action::turn_on);
  f.settle();
  for (int i = 0; i < 5; ++i) f.advance(2s);
  const auto r = f.record(id);
  CHECK(r.state == ActionState::failed);
  CHECK(r.attempts == 3);
  CHECK(r.failure == Failure::timeout);
  CHECK(r.failure_reason.find("gave up after 3 attempts") != std::string::npos);
  CHECK(f.driver.perform_calls() == 3);
}

TEST_CASE("action queue: a non-transient failure fails at once") {
  Fixture f;
  f.driver.add("vm1", PowerState::off);
  f.driver.inject_failures("vm1", Failure::refused);
  const auto refused = f.submit("vm1", Action::turn_on);
  const auto missing = f.submit("nowhere", Action::turn_on);
  f.settle();
  auto r = f.record(refused);
  CHECK(r.state == ActionState::failed);
  CHECK(r.attempts == 1);
  CHECK(r.failure == Failure::refused);
  CHECK(r.failure_reason.rfind("Refused: ", 0) == 0);
  CHECK(r.completion_time == kStart);
  r = f.record(missing);
  CHECK(r.state == ActionState::failed);
  CHECK(r.failure == Failure::not_found);
  CHECK(r.failure_reason.rfind("VirtualMachineNotFound", 0) == 0);
}

TEST_CASE("action queue: cancel and re-prioritise pending actions") {
  auto o = options();
  o.limits.max_absolute_active_actions = 1;
  o.enabled = false;
  Fixture f(o);
  StartLog log;
  log.attach(*f.queue);
  for (const char* id : {"a", "b", "c"}) f.driver.add(id, PowerState::on);
  const auto a = f.submit("a", Action::turn_off, power::kPolicyPriority);
  const auto b = f.submit("b", Action::turn_off, power::kPolicyPriority);
  const auto c = f.submit("c", Action::turn_off, power::kPolicyPriority);
  CHECK(f.queue->set_priority(c, 5).has_value());
  CHECK(f.queue->cancel(b).has_value());
  CHECK(f.queue->cancel(b).error().code == common::errc::conflict);
  CHECK(f.queue->set_priority(b, 1).error().code == common::errc::conflict);
  CHECK(f.queue->cancel(999).error().code == common::errc::not_found);
  CHECK(f.queue->set_priority(999, 1).error().code == common::errc::not_found);
  CHECK(f.queue->set_priority(a, 1001).error().code == common::errc::invalid_argument);
  f.queue->set_enabled(true);
  f.settle();
  CHECK(log.order() == std::vector<std::int64_t>{c, a});
  CHECK(f.state(b) == ActionState::canceled);
  CHECK(f.record(b).completion_time == kStart);
  CHECK(f.record(c).actual_priority == 5);
  CHECK(f.record(c).base_priority == power::kPolicyPriority);
  CHECK(f.queue->cancel(c).error().code == common::errc::conflict);  // Completed
  // The store saw the priority change; the observer only state changes.
  const auto states = f.store.states_of(c);
  CHECK(states.size() == 4);  // Pending, Pending (priority 5), Started, Completed
}

TEST_CASE("action queue: a second TurnOn for a machine returns the first, boosted") {
  auto o = options();
  o.limits.max_absolute_active_actions = 1;
  o.enabled = false;
  Fixture f(o);
  StartLog log;
  log.attach(*f.queue);
  f.driver.add("m1", PowerState::off);
  f.driver.add("m2", PowerState::off);
  const auto m2 = f.submit("m2", Action::turn_on, power::kPolicyPriority, "IdlePool");
  const auto m1 = f.submit("m1", Action::turn_on, power::kPolicyPriority, "IdlePool");
  auto again = f.queue->submit({0, vm("m1"), Action::turn_on, power::kLaunchPriority, "Launch"});
  REQUIRE(again.has_value());
  CHECK(again->id == m1);
  CHECK_FALSE(again->created);
  auto r = f.record(m1);
  CHECK(r.actual_priority == power::kLaunchPriority);
  CHECK(r.base_priority == power::kPolicyPriority);
  CHECK(r.reason == "IdlePool");
  // A less urgent duplicate does not lower the priority back.
  again = f.queue->submit({0, vm("m1"), Action::turn_on, power::kPolicyPriority, "Policy"});
  CHECK(again->id == m1);
  CHECK(f.record(m1).actual_priority == power::kLaunchPriority);

  f.queue->set_enabled(true);
  f.settle();
  CHECK(log.order() == std::vector<std::int64_t>{m1});  // the boosted one first
  // Started: still the same action.
  again = f.queue->submit({0, vm("m1"), Action::turn_on, power::kLaunchPriority, "Launch"});
  CHECK(again->id == m1);
  CHECK_FALSE(again->created);
  // Another action for the machine is another action, and waits for the machine's current one.
  const auto restart = f.submit("m1", Action::restart);
  CHECK(restart != m1);
  f.advance(30s);  // m1 On; the restart (30) goes before m2 (50)
  CHECK(log.order() == std::vector<std::int64_t>{m1, restart});
  // A Restart while one is Started is queued again.
  const auto restart2 = f.submit("m1", Action::restart);
  CHECK(restart2 != restart);
  CHECK(f.queue->stats().queue_depth == 2);
  CHECK(f.state(m2) == ActionState::pending);
  // Ids given by the caller must be free.
  CHECK(f.queue->submit({m2, vm("m9"), Action::turn_on, 30, "Admin"}).error().code == common::errc::conflict);
  CHECK(f.queue->submit({0, vm(""), Action::turn_on, 30, "Admin"}).error().code == common::errc::invalid_argument);
  CHECK(f.queue->submit({0, vm("m9"), Action::turn_on, -1, "Admin"}).error().code == common::errc::invalid_argument);
}

TEST_CASE("action queue: finished actions are kept for the retention, then forgotten") {
  auto o = options();
  o.retention = 1h;
  Fixture f(o);
  f.driver.add("m1", PowerState::on);
  const auto done = f.submit("m1", Action::turn_off);
  f.settle();
  CHECK(f.state(done) == ActionState::completed);
  f.advance(30min);
  f.queue->set_enabled(false);
  const auto canceled = f.submit("m1", Action::turn_on);
  CHECK(f.queue->cancel(canceled).has_value());
  f.advance(29min);
  CHECK(f.queue->snapshot().size() == 2);
  f.advance(1min);  // an hour after `done` completed
  CHECK_FALSE(f.queue->get(done).has_value());
  CHECK(f.queue->get(canceled).has_value());
  f.advance(30min);
  CHECK(f.queue->snapshot().empty());
  CHECK(f.store.forgotten_ids == std::vector<std::int64_t>{done, canceled});
  CHECK(f.store.all().empty());
}

TEST_CASE("action queue: observers and the store run on the queue's thread, in order") {
  Fixture f;
  std::mutex mutex;
  std::vector<std::pair<std::optional<ActionState>, ActionState>> seen;
  std::set<std::thread::id> threads;
  f.queue->on_change([&](const ActionRecord& r, std::optional<ActionState> before) {
    std::lock_guard lock(mutex);
    seen.emplace_back(before, r.state);
    threads.insert(std::this_thread::get_id());
  });
  f.driver.add("m1", PowerState::off);
  f.submit("m1", Action::turn_on);
  f.settle();
  f.advance(30s);
  std::lock_guard lock(mutex);
  CHECK(seen == std::vector<std::pair<std::optional<ActionState>, ActionState>>{
                    {std::nullopt, ActionState::pending},
                    {ActionState::pending, ActionState::started},
                    {ActionState::started, ActionState::completed}});
  REQUIRE(threads.size() == 1);
  CHECK(*threads.begin() != std::this_thread::get_id());
  CHECK(f.store.threads == threads);
}

TEST_CASE("action queue: restart from the store") {
  // First life: a is Started (booting), b and c Pending when the broker stops.
  common::ManualClock clock(kStart);
  SimulatedDriver driver(clock, driver_options());
  for (const char* id : {"a", "b"}) driver.add(id, PowerState::off);
  driver.add("c", PowerState::on);
  FakeStore first;
  auto o = options();
  o.limits.max_absolute_active_actions = 1;
  std::int64_t a = 0, b = 0, c = 0;
  {
    ActionQueue q(driver, clock, o, &first);
    a = q.submit({0, vm("a"), Action::turn_on, power::kLaunchPriority, "Launch"})->id;
    q.poll();
    q.wait_idle();
    b = q.submit({0, vm("b"), Action::turn_on, power::kAdminPriority, "Admin"})->id;
    c = q.submit({0, vm("c"), Action::shutdown, power::kPolicyPriority, "Policy"})->id;
    q.poll();
    q.wait_idle();
    q.stop();
    CHECK(q.submit({0, vm("a"), Action::turn_off, 30, "Admin"}).error().code == common::errc::unavailable);
    CHECK(q.cancel(b).error().code == common::errc::unavailable);
    CHECK(q.set_priority(b, 1).error().code == common::errc::unavailable);
  }
  auto rows = first.all();
  REQUIRE(rows.size() == 3);
  CHECK(first.rows.at(a).state == ActionState::started);
  CHECK(first.rows.at(b).state == ActionState::pending);
  CHECK(first.rows.at(c).state == ActionState::pending);

  // Records a store could hold after a crash: Started but the machine shows no sign of it; Started
  // and done; Started for a machine that is gone; and an old Completed one.
  driver.add("x", PowerState::off);
  driver.add("y", PowerState::on);
  auto started = [&](std::int64_t id, const std::string& machine, Action action) {
    ActionRecord r;
    r.id = id;
    r.vm = vm(machine);
    r.action = action;
    r.state = ActionState::started;
    r.request_time = r.start_time = kStart - 1min;
    r.attempts = 1;
    return r;
  };
  rows.push_back(started(100, "x", Action::turn_on));
  rows.push_back(started(101, "y", Action::turn_on));
  rows.push_back(started(102, "ghost", Action::turn_off));
  ActionRecord old = started(103, "y", Action::shutdown);
  old.state = ActionState::completed;
  old.completion_time = kStart - 50min;
  rows.push_back(old);
  rows.push_back(old);  // a duplicate id is skipped

  FakeStore second;
  o.limits.max_absolute_active_actions = 10;
  ActionQueue q(driver, clock, o, &second);
  StartLog log;
  log.attach(q);
  CHECK(q.restore(rows) == 7);
  q.poll();
  q.wait_idle();
  auto get = [&](std::int64_t id) { return *q.get(id); };
  CHECK(get(a).state == ActionState::started);  // TurningOn: on its way, followed as usual
  CHECK(get(a).attempts == 1);
  CHECK(get(100).state == ActionState::lost);
  CHECK(get(100).failure_reason.find("interrupted by a broker restart") != std::string::npos);
  CHECK(get(101).state == ActionState::completed);
  CHECK(get(102).state == ActionState::lost);
  CHECK(get(102).failure == Failure::not_found);
  CHECK(get(103).state == ActionState::completed);
  CHECK(get(b).base_priority == power::kAdminPriority);
  CHECK(get(b).request_time == kStart);
  // Pending ones come back Pending and run (one per machine, so b waits for nothing else).
  CHECK(get(b).state == ActionState::started);
  CHECK(get(c).state == ActionState::started);
  // New ids continue after the restored ones.
  driver.add("z", PowerState::off);
  const auto z = q.submit({0, vm("z"), Action::turn_on, 30, "Admin"});
  CHECK(z->id == 104);
  clock.advance(30s);
  q.poll();
  q.wait_idle();
  CHECK(get(a).state == ActionState::completed);
  CHECK(get(b).state == ActionState::completed);
  CHECK(get(c).state == ActionState::completed);
  clock.advance(10min);  // 60 min after 103 completed
  q.poll();
  q.wait_idle();
  CHECK_FALSE(q.get(103).has_value());
  CHECK(second.forgotten_ids == std::vector<std::int64_t>{103});
}

namespace {

// A driver whose perform() blocks until released, and which notes the threads it runs on.
class GatedDriver final : public power::PowerDriver {
 public:
  std::string_view kind() const override { return "gated"; }
  power::Outcome query(const power::VmRef&, PowerState& state) override {
    state = PowerState::on;
    return {};
  }
  power::Outcome perform(const power::VmRef& v, Action) override {
    std::unique_lock lock(mutex_);
    threads_.insert(std::this_thread::get_id());
    entered_.push_back(v.vm_id);
    cv_.notify_all();
    cv_.wait(lock, [this] { return open_; });
    return {};
  }
  power::Outcome list(std::vector<std::string>&) override { return {}; }

  void wait_entered(std::size_t n) {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return entered_.size() >= n; });
  }
  void open() {
    std::lock_guard lock(mutex_);
    open_ = true;
    cv_.notify_all();
  }
  std::vector<std::string> entered() {
    std::lock_guard lock(mutex_);
    return entered_;
  }
  std::set<std::thread::id> threads() {
    std::lock_guard lock(mutex_);
    return threads_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool open_ = false;
  std::vector<std::string> entered_;
  std::set<std::thread::id> threads_;
};

}  // namespace

TEST_CASE("action queue: stop() lets the call in flight finish and leaves the rest for the store") {
  common::ManualClock clock(kStart);
  GatedDriver driver;
  FakeStore store;
  auto o = options();
  o.threads = 1;
  ActionQueue q(driver, clock, o, &store);
  const auto a = q.submit({0, vm("a"), Action::turn_on, 10, "Launch"})->id;
  const auto b = q.submit({0, vm("b"), Action::turn_on, 10, "Launch"})->id;
  const auto c = q.submit({0, vm("c"), Action::turn_on, 10, "Launch"})->id;
  q.set_enabled(true);
  q.poll();
  driver.wait_entered(1);  // one perform() blocks the only pool thread; the others wait behind it
  std::thread stopper([&] { q.stop(); });
  // submit() is refused once stop() has begun (a duplicate, so it adds nothing before that).
  while (q.submit({0, vm("a"), Action::turn_on, 10, "Launch"}).has_value()) std::this_thread::yield();
  driver.open();
  stopper.join();
  q.wait_idle();  // returns at once after stop()

  REQUIRE(driver.entered().size() == 1);
  const auto first = driver.entered()[0];
  CHECK(driver.threads().count(std::this_thread::get_id()) == 0);
  std::map<std::string, std::int64_t> by_vm{{"a", a}, {"b", b}, {"c", c}};
  for (const auto& [name, id] : by_vm) {
    const auto r = *q.get(id);
    // The one that reached the driver stays Started (a restart re-checks it); the others never
    // left the queue.
    CHECK(r.state == (name == first ? ActionState::started : ActionState::pending));
    CHECK(r.attempts == (name == first ? 1 : 0));
    std::lock_guard lock(store.mutex);
    CHECK(store.rows.at(id).state == r.state);
  }
}

TEST_CASE("action queue: a storm of actions with random failures settles consistently") {
  common::ManualClock clock(kStart);
  SimulatedDriver::Options d_opts = driver_options();
  d_opts.failure_rate = 0.2;
  d_opts.transient_share = 0.7;
  d_opts.seed = 99;
  SimulatedDriver driver(clock, d_opts);
  constexpr int kMachines = 60;
  for (int i = 0; i < kMachines; ++i) driver.add("m" + std::to_string(i), i % 2 ? PowerState::on : PowerState::off);
  FakeStore store;
  auto o = options();
  o.threads = 3;
  o.limits = {8, 50, 40};
  o.initial_backoff = 1s;
  o.retention = 24h;
  ActionQueue q(driver, clock, o, &store);
  q.set_machine_count(kMachines);
  StartLog log;
  log.attach(q);

  std::vector<std::thread> submitters;
  std::atomic<int> submitted{0};
  for (int t = 0; t < 3; ++t)
    submitters.emplace_back([&, t] {
      for (int i = 0; i < 40; ++i) {
        const int m = (t * 40 + i) % kMachines;
        const Action action = i % 3 == 0 ? Action::turn_off : (i % 3 == 1 ? Action::turn_on : Action::restart);
        if (q.submit({0, vm("m" + std::to_string(m)), action, 10 + 10 * t, "Policy"}).has_value()) ++submitted;
        if (i % 7 == 0) q.poll();
      }
    });
  std::thread ticker([&] {
    for (int i = 0; i < 50; ++i) {
      clock.advance(1s);
      q.poll();
    }
  });
  for (auto& t : submitters) t.join();
  ticker.join();
  for (int i = 0; i < 200 && (q.stats().queue_depth > 0 || q.stats().active > 0); ++i) {
    clock.advance(30s);
    q.poll();
    q.wait_idle();
  }
  const auto s = q.stats();
  CHECK(submitted.load() == 120);
  CHECK(s.queue_depth == 0);
  CHECK(s.active == 0);
  CHECK(log.max_active <= 8);
  // The store agrees with the queue on every action.
  const auto snap = q.snapshot();
  REQUIRE(snap.size() == store.all().size());
  for (const auto& r : snap) {
    std::lock_guard lock(store.mutex);
    CHECK(store.rows.at(r.id).state == r.state);
    CHECK(power::finished(r.state));
  }
}

// ---- a hypervisor that refuses or hangs (issue 15, requirement 4) ----

namespace {

// perform() on a vm id in `hanging` blocks until release(); others answer at once (On).
class HangingDriver final : public power::PowerDriver {
 public:
  explicit HangingDriver(std::set<std::string> hanging) : hanging_(std::move(hanging)) {}
  ~HangingDriver() override { release(); }
  std::string_view kind() const override { return "hanging"; }
  power::Outcome query(const power::VmRef&, PowerState& state) override {
    state = PowerState::on;
    return {};
  }
  power::Outcome perform(const power::VmRef& v, Action) override {
    std::unique_lock lock(mutex_);
    ++performs_[v.vm_id];
    cv_.notify_all();
    if (hanging_.contains(v.vm_id)) {
      ++blocked_;
      cv_.notify_all();
      cv_.wait(lock, [this] { return released_; });
      --blocked_;
    }
    return {};
  }
  power::Outcome list(std::vector<std::string>&) override { return {}; }

  // Waits until `n` calls are blocked at once.
  void wait_blocked(int n) {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return blocked_ >= n; });
  }
  int performs(const std::string& vm_id) {
    std::lock_guard lock(mutex_);
    return performs_[vm_id];
  }
  void release() {
    std::lock_guard lock(mutex_);
    released_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  const std::set<std::string> hanging_;
  std::map<std::string, int> performs_;
  int blocked_ = 0;
  bool released_ = false;
};

}  // namespace

TEST_CASE("action queue: a hypervisor that refuses every call: retried with growing back-off, then Failed, saying why") {
  auto o = options();
  o.max_attempts = 4;
  o.initial_backoff = 10s;
  o.max_backoff = 1min;
  Fixture f(o);
  f.driver.add("vm1", PowerState::off);
  f.driver.inject_failures("vm1", Failure::connection, 100);  // never answers
  const auto id = f.submit("vm1", Action::turn_on, power::kLaunchPriority, "Launch");
  f.settle();
  // The waits between attempts: 10 s, 20 s, 40 s.
  std::vector<common::SysTime> retries;
  for (int attempt = 1; attempt < 4; ++attempt) {
    const auto r = f.record(id);
    REQUIRE(r.state == ActionState::pending);
    CHECK(r.attempts == attempt);
    CHECK(r.failure == Failure::connection);
    CHECK(r.failure_reason.find("attempt " + std::to_string(attempt) + " of 4; retrying") != std::string::npos);
    retries.push_back(r.next_attempt);
    f.clock.set(r.next_attempt - 1s);
    f.settle();
    CHECK(f.record(id).attempts == attempt);  // not before its back-off
    f.clock.set(r.next_attempt);
    f.settle();
  }
  CHECK(retries == std::vector<common::SysTime>{kStart + 10s, kStart + 10s + 20s, kStart + 10s + 20s + 40s});
  const auto r = f.record(id);
  CHECK(r.state == ActionState::failed);
  CHECK(r.attempts == 4);
  CHECK(r.failure == Failure::connection);
  CHECK(r.failure_reason.rfind("Connection: ", 0) == 0);
  CHECK(r.failure_reason.find("gave up after 4 attempts") != std::string::npos);
  CHECK(f.store.rows.at(id).failure_reason == r.failure_reason);  // stored as admins see it
  CHECK(f.driver.perform_calls() == 4);
}

TEST_CASE("action queue: a hung perform() is abandoned after call_timeout, retried with back-off, and does not hold up "
          "other machines") {
  common::ManualClock clock(kStart);
  HangingDriver driver({"stuck"});
  FakeStore store;
  auto o = options();
  o.threads = 1;  // one thread: without abandoning, the hung call would block every other action
  o.call_timeout = 30s;
  o.initial_backoff = 10s;
  o.max_attempts = 2;
  ActionQueue q(driver, clock, o, &store);
  const auto stuck = q.submit({0, vm("stuck"), Action::turn_on, power::kLaunchPriority, "Launch"})->id;
  q.poll();
  driver.wait_blocked(1);
  q.submit({0, vm("ok-1"), Action::turn_on, power::kAdminPriority, "Admin"});
  q.poll();
  // Not abandoned before its time: the other action waits behind the only thread.
  clock.advance(29s);
  q.poll();
  CHECK(q.get(stuck)->state == ActionState::started);
  CHECK(q.stats().driver_calls_abandoned == 0);
  CHECK(driver.performs("ok-1") == 0);

  clock.advance(1s);
  q.poll();
  q.wait_idle();  // the abandoned call does not count as in flight
  auto r = *q.get(stuck);
  CHECK(r.state == ActionState::pending);
  CHECK(r.failure == Failure::timeout);
  CHECK(r.failure_reason.rfind("Timeout: the hypervisor did not answer TurnOn within 30 s (call abandoned)", 0) == 0);
  CHECK(r.failure_reason.find("attempt 1 of 2; retrying") != std::string::npos);
  CHECK(r.next_attempt == kStart + 30s + 10s);
  CHECK(q.stats().driver_calls_abandoned == 1);
  // A fresh thread took over: the other machine's action ran.
  const auto others = q.snapshot();
  const auto ok = std::find_if(others.begin(), others.end(), [](const ActionRecord& a) { return a.vm.vm_id == "ok-1"; });
  REQUIRE(ok != others.end());
  CHECK(ok->state == ActionState::completed);
  CHECK(driver.performs("ok-1") == 1);

  // The retry hangs too (on a second thread), is abandoned again and the action fails.
  clock.advance(10s);
  q.poll();
  driver.wait_blocked(2);
  clock.advance(30s);
  q.poll();
  q.wait_idle();
  r = *q.get(stuck);
  CHECK(r.state == ActionState::failed);
  CHECK(r.attempts == 2);
  CHECK(r.failure == Failure::timeout);
  CHECK(r.failure_reason.find("gave up after 2 attempts") != std::string::npos);
  CHECK(q.stats().driver_calls_abandoned == 2);
  // Meanwhile other machines' actions still run.
  const auto later = q.submit({0, vm("ok-2"), Action::turn_on, power::kAdminPriority, "Admin"})->id;
  q.poll();
  q.wait_idle();
  CHECK(q.get(later)->state == ActionState::completed);

  // The hung calls return at last: their late results are ignored.
  driver.release();
  while (q.stats().driver_calls_abandoned > 0) std::this_thread::yield();
  q.poll();
  q.wait_idle();
  CHECK(q.get(stuck)->state == ActionState::failed);
  CHECK(store.rows.at(stuck).state == ActionState::failed);
}

TEST_CASE("action queue: at most max_abandoned_calls extra threads for hung calls") {
  common::ManualClock clock(kStart);
  HangingDriver driver({"a", "b", "c"});
  auto o = options();
  o.threads = 1;
  o.call_timeout = 30s;
  o.max_attempts = 1;
  o.max_abandoned_calls = 1;
  ActionQueue q(driver, clock, o);
  for (const char* name : {"a", "b", "c"}) q.submit({0, vm(name), Action::turn_on, power::kAdminPriority, "Admin"});
  q.poll();
  driver.wait_blocked(1);
  clock.advance(30s);
  q.poll();
  driver.wait_blocked(2);  // one extra thread took the next call, which hangs too
  clock.advance(30s);
  q.poll();  // (not wait_idle(): the third call waits for a thread, so the queue is not idle)
  while (q.stats().driver_calls_abandoned < 2) std::this_thread::yield();
  // Two abandoned calls, but only one extra thread: the third action's call waits for a thread.
  CHECK(q.stats().driver_calls_in_flight == 1);
  CHECK(driver.performs("a") + driver.performs("b") + driver.performs("c") == 2);
  driver.release();
  q.poll();
  q.wait_idle();
  CHECK(driver.performs("a") + driver.performs("b") + driver.performs("c") == 3);
}
