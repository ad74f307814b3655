// power/simulated_driver.hpp: a PowerDriver with no hypervisor behind it, for tests, the demo
// and the storm harness. Machines (VMs) live in memory, keyed by vm id; their power state moves
// with a common::Clock, so tests drive it with common::ManualClock and never sleep.
//
// State machine (delays from Options; a delay of zero still passes through the transitional
// state, so followers always see both steps):
//
//   action    from                          goes to                                    then
//   TurnOn    Off                           TurningOn for boot_delay                   On
//             On, TurningOn                 (no change, succeeds)
//   TurnOff   any but Off (hard power-off)  Off at once
//             Off                           (no change, succeeds)
//   Shutdown  On                            TurningOff for shutdown_delay              Off
//             Off, TurningOff               (no change, succeeds)
//   Suspend   On                            Suspending for suspend_delay               Suspended
//             Suspended, Suspending         (no change, succeeds)
//   Resume    Suspended                     Resuming for resume_delay                  On
//             On, Resuming                  (no change, succeeds)
//   Reset     On, TurningOn (hard reset)    TurningOn for boot_delay                   On
//   Restart   On (guest reboot)             TurningOn for boot_delay                   On
//   anything else: Failure::invalid_state, no change.
//
// perform() on an unknown vm id fails with Failure::not_found before anything else; then an
// injected failure (inject_failures) or a random one (Options::failure_rate) may fail it; only
// then is the action applied. query() and list() never fail for a known machine.
//
// Followers: on_change() listeners are called once per state change, with the new state. The
// change is applied, and the listeners called, by whichever call made or noticed it: perform(),
// add(), set_state() (immediate changes) and advance(), query(), list() or the ticker thread
// (changes that fall due as the clock moves: each of these first applies every transition due by
// clock.now(), for all machines). Calls happen outside the driver's lock, one at a time and in
// the order the changes happened; a listener may call back into the driver (the change it causes
// is delivered after the current one returns, possibly by the same thread). Because the
// delivery is handed between threads, the call that made a change may return before its
// listeners have run.
//
// Thread-safe.
#pragma once

#include "common/clock.hpp"
#include "power/driver.hpp"

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace power {

class SimulatedDriver final : public PowerDriver {
 public:
  struct Options {
    std::chrono::milliseconds boot_delay{std::chrono::seconds(20)};      // TurningOn -> On
    std::chrono::milliseconds shutdown_delay{std::chrono::seconds(10)};  // TurningOff -> Off
    std::chrono::milliseconds suspend_delay{std::chrono::seconds(5)};    // Suspending -> Suspended
    std::chrono::milliseconds resume_delay{std::chrono::seconds(5)};     // Resuming -> On
    // Fraction (0..1) of perform() calls on known machines that fail at random, before anything
    // changes. A failure is transient (Failure::connection) with probability transient_share,
    // else Failure::refused. Deterministic for a given seed and sequence of perform() calls.
    double failure_rate = 0.0;
    double transient_share = 1.0;
    std::uint64_t seed = 1;
    // Real (wall-clock) time each perform() and query() blocks, to imitate a slow hypervisor in
    // the demo and the storm harness. Zero in tests.
    std::chrono::milliseconds call_latency{0};
    // When non-zero, a driver-owned thread calls advance() at this real-time interval, so that
    // followers see machines finish booting without anyone calling query(). Zero: no thread
    // (tests call advance()).
    std::chrono::milliseconds tick_interval{0};
  };

  // Called with the machine's vm id and its new state; see the file comment for the threads.
  // Must not throw.
  using Listener = std::function<void(const std::string& vm_id, PowerState state)>;

  SimulatedDriver(common::Clock& clock, Options options);
  explicit SimulatedDriver(common::Clock& clock) : SimulatedDriver(clock, Options{}) {}
  ~SimulatedDriver() override;  // stops the ticker thread
  SimulatedDriver(const SimulatedDriver&) = delete;
  SimulatedDriver& operator=(const SimulatedDriver&) = delete;

  // PowerDriver. query(): not_found for an unknown vm id. perform(): see the file comment.
  // list(): every vm id, sorted.
  std::string_view kind() const override { return "simulated"; }
  Outcome query(const VmRef& vm, PowerState& state) override;
  Outcome perform(const VmRef& vm, Action action) override;
  Outcome list(std::vector<std::string>& vm_ids) override;

  // Adds a machine (or replaces one, dropping its transition and injected failures). Listeners
  // hear about it when the state differs from the one it replaced (a new machine: always).
  void add(const std::string& vm_id, PowerState initial = PowerState::off);
  // The machine disappears (later calls: not_found). Listeners hear PowerState::unknown.
  // Returns false when there was no such machine.
  bool remove(const std::string& vm_id);
  // Out-of-band change (a guest shutting itself down, an admin on the hypervisor console):
  // cancels any transition. Returns false for an unknown vm id.
  bool set_state(const std::string& vm_id, PowerState state);
  // The next `count` perform() calls on this machine fail with `failure` (after the not_found
  // check, before the random failures). Deterministic; for tests and fault drills.
  void inject_failures(const std::string& vm_id, Failure failure, int count = 1);
  void set_failure_rate(double rate, double transient_share = 1.0);

  // Applies every transition due by clock.now() and calls the listeners for them.
  void advance();

  // Adds a listener; returns its id for remove_listener().
  std::uint64_t on_change(Listener listener);
  // After it returns, the listener is not called again and no call of it is running (unless
  // remove_listener is called from inside that listener, which is allowed).
  void remove_listener(std::uint64_t id);

  std::uint64_t perform_calls() const;  // every perform() call so far, failed ones included
  std::uint64_t query_calls() const;

 private:
  struct Vm {
    PowerState state = PowerState::off;
    std::optional<PowerState> target;  // where the current transition ends
    common::SysTime due{};             // when it ends
    std::deque<Failure> injected;
  };
  struct Change {
    std::string vm_id;
    PowerState state;
  };
  struct Subscriber {
    std::recursive_mutex mutex;  // held while the listener runs; remove_listener takes it
    bool active = true;          // guarded by mutex
    Listener listener;
  };

  // All with mutex_ held.
  Outcome perform_locked(const std::string& vm_id, Action action, common::SysTime now);
  void set_locked(const std::string& vm_id, Vm& vm, PowerState state);
  void settle_locked(common::SysTime now);
  // Without mutex_: delivers queued changes unless another thread is delivering already.
  void deliver();
  void run_ticker();
  double next_random();  // [0, 1), with mutex_ held

  common::Clock& clock_;
  const std::chrono::milliseconds call_latency_;
  const std::chrono::milliseconds tick_interval_;

  mutable std::mutex mutex_;
  Options options_;                                                   // guarded by mutex_
  std::map<std::string, Vm> vms_;                                     // guarded by mutex_
  std::mt19937_64 rng_;                                               // guarded by mutex_
  std::deque<Change> changes_;                                        // guarded by mutex_
  bool delivering_ = false;                                           // guarded by mutex_
  std::map<std::uint64_t, std::shared_ptr<Subscriber>> subscribers_;  // guarded by mutex_
  std::uint64_t next_subscriber_ = 1;                                 // guarded by mutex_
  std::uint64_t perform_calls_ = 0;                                   // guarded by mutex_
  std::uint64_t query_calls_ = 0;                                     // guarded by mutex_
  bool stopping_ = false;                                             // guarded by mutex_
  std::condition_variable ticker_cv_;
  std::thread ticker_;
};

}  // namespace power
