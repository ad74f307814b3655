// power/action_queue.hpp: the power-action queue of one hypervisor connection
// (site-model-reference 2.9, 2.11, 3; docs/power.md "Power actions and the queue").
//
// Callers submit power actions; the queue orders them by priority, releases them to the
// PowerDriver under the connection's three throttles, follows each one with query() until the
// machine reaches the action's target state, retries transient failures with back-off and keeps
// finished actions for a while for admin listings. It is asynchronous to its callers: submit(),
// cancel() and set_priority() only change memory and wake the queue's dispatcher thread; the
// blocking driver calls run on the queue's own small thread pool.
//
// Life of an action:
//
//   Pending --(throttles allow; perform())--> Started --(query() shows the target)--> Completed
//      |  ^                                     |  |
//      |  +--(transient failure, attempts left;  |  +--(query() says not_found)--> Lost
//      |      back-off before the next attempt)  +--(non-transient failure, attempts used up, or
//      +--(cancel())--> Canceled                      completion_timeout)--> Failed
//
// Order: Pending actions start by actual priority (lower first), then request time, then id,
// as far as the throttles allow (Limits). A machine has at most one Started action: its other
// actions wait (without holding up other machines' actions) until that one has finished.
// Started actions count against the throttles until they finish; a transient failure puts the
// action back to Pending (no longer active) until its back-off has passed.
//
// Threads: the dispatcher thread runs the scheduling passes and is the only thread that calls
// the ActionStore and the observers (one call at a time, in the order the changes happened,
// never while holding the queue's lock). The pool threads only call the driver. Public methods
// are thread-safe and never block on the driver (except stop() and wait_idle(), which wait).
//
// A hypervisor that hangs: a driver call that has not returned call_timeout (clock time) after it
// began is abandoned. An abandoned perform() is a transient Timeout failure of its attempt
// (retried with back-off like any other); an abandoned query() counts as a failed query (asked
// again after check_interval). Driver calls cannot be cancelled, so the thread stays with the call
// until it returns (libvirt's keepalive bounds that on a dead host, docs/power.md "What blocks");
// meanwhile the pool has one more thread for each abandoned call, at most max_abandoned_calls
// more, so one hung machine does not hold up the others' actions. Its late result is ignored.
// Threads are never ended before stop(): the pool holds at most threads + max_abandoned_calls.
#pragma once

#include "common/clock.hpp"
#include "common/error.hpp"
#include "power/driver.hpp"

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace power {

// power_action.state. (The model's "Deleted" is not used: forgotten actions just disappear.)
enum class ActionState { pending, started, completed, failed, canceled, lost };
inline constexpr std::size_t kActionStateCount = 6;
std::string_view to_string(ActionState s);  // "Pending", "Started", "Completed", "Failed", "Canceled", "Lost"
bool from_string(std::string_view text, ActionState& out);
// Completed, Failed, Canceled, Lost.
bool finished(ActionState s);

// The power state that completes an action: TurnOn, Resume, Reset, Restart: On; TurnOff,
// Shutdown: Off; Suspend: Suspended.
PowerState target_state(Action a);

// Base priorities by origin (power_action.reason). Lower runs first; admins know 30.
inline constexpr int kLaunchPriority = 10;
inline constexpr int kAdminPriority = 30;
inline constexpr int kSchedulePriority = 40;
inline constexpr int kPolicyPriority = 50;
inline constexpr int kMinPriority = 0, kMaxPriority = 1000;  // the model's bounds

// The connection's throttles ([[hypervisor_connection]] in the config).
struct Limits {
  int max_absolute_active_actions = 100;
  // Of the connection's machine count (set_machine_count); at least one action may always be
  // active. Not applied while the machine count is 0 (unknown).
  int max_percentage_active_actions = 20;
  // perform() calls (first attempts and retries) in any sliding 60 s of clock time.
  int max_new_actions_per_minute = 10;
};

struct ActionRequest {
  std::int64_t id = 0;  // 0: the queue assigns one (Options::next_id)
  VmRef vm;
  Action action = Action::turn_on;
  int base_priority = kAdminPriority;
  std::string reason = "Admin";  // Launch, Admin, Policy, Schedule, IdlePool, Reset, Untaint, Pvd
};

// One action, as the store saves it and admins see it (fields of the power_action kind, plus the
// queue's own bookkeeping). A zero time point means "not yet".
struct ActionRecord {
  std::int64_t id = 0;
  VmRef vm;                           // machine (the broker's name) and vm id
  std::string hypervisor_connection;  // Options::connection
  Action action = Action::turn_on;
  ActionState state = ActionState::pending;
  int base_priority = kAdminPriority;
  int actual_priority = kAdminPriority;  // after boosts and set_priority()
  std::string reason;
  common::SysTime request_time{};
  common::SysTime start_time{};       // the latest attempt's perform(); cleared when a retry waits
  common::SysTime completion_time{};  // when it reached a finished state
  // Finished: why it failed ("Refused: ...", "timed out ..."); Pending after a transient failure:
  // the failure being retried. Empty when Completed.
  std::string failure_reason;
  Failure failure = Failure::none;  // the class of failure_reason (not_found: machine fault
                                    // VirtualMachineNotFound)
  int attempts = 0;                 // perform() calls so far
  common::SysTime next_attempt{};   // Pending retry: not before this time
};

// Durability, implemented by the owner (the broker, on storage's power_action objects). Called
// on the queue's dispatcher thread only, never with the queue's lock held; keep it cheap (it
// holds up the queue's bookkeeping, not its driver calls). Must not throw.
class ActionStore {
 public:
  virtual ~ActionStore() = default;
  // The action was created or changed (state, priority, times, failure): insert or update by id.
  virtual void saved(const ActionRecord& record) = 0;
  // The action finished more than Options::retention ago and the queue forgot it.
  virtual void forgotten(const ActionRecord& record) = 0;
};

struct QueueStats {
  std::array<std::size_t, kActionStateCount> by_state{};  // indexed by ActionState
  std::size_t queue_depth = 0;                            // Pending
  std::size_t active = 0;                                 // Started
  std::size_t started_last_minute = 0;                    // perform() calls in the sliding minute
  std::size_t driver_calls_in_flight = 0;     // posted, not returned, not abandoned
  std::size_t driver_calls_abandoned = 0;     // abandoned after call_timeout, not returned yet
};

class ActionQueue {
 public:
  struct Options {
    std::string connection;  // the hypervisor connection's name, copied into records
    Limits limits;
    bool enabled = true;  // false: nothing starts (the connection's `enabled`)
    int threads = 2;      // driver calls at once (the pool's size)
    // Retries of transient failures (power::transient): the wait before attempt n+1 is
    // initial_backoff * 2^(n-1), at most max_backoff, by the clock. Attempts include the first.
    int max_attempts = 5;
    std::chrono::milliseconds initial_backoff{std::chrono::seconds(5)};
    std::chrono::milliseconds max_backoff{std::chrono::minutes(5)};
    // A Started action not at its target state this long after its start: Failed "timed out".
    std::chrono::milliseconds completion_timeout{std::chrono::minutes(10)};
    // A perform() or query() that has not returned this long (clock time) after it began is
    // abandoned (see the file comment). Noticed by the next pass (poll_interval).
    std::chrono::milliseconds call_timeout{std::chrono::minutes(2)};
    // Extra pool threads for abandoned calls that have not returned yet; past that many, new
    // calls wait for a thread.
    int max_abandoned_calls = 8;
    // How often (clock time) a Started action's machine is queried; the first query follows
    // the successful perform() at once.
    std::chrono::milliseconds check_interval{std::chrono::seconds(5)};
    // How long finished actions stay listed (and in the store) before they are forgotten.
    std::chrono::milliseconds retention{std::chrono::hours(1)};
    // Real (wall-clock) time between the dispatcher's passes when nothing wakes it; bounds how
    // late the queue notices that clock-based deadlines (back-off, throttle window, checks,
    // timeouts, retention) have passed.
    std::chrono::milliseconds poll_interval{std::chrono::seconds(1)};
    // Id source for submit() without an id; share one across the connections' queues so ids are
    // unique site-wide (called with the queue's lock held: keep it trivial, e.g. an atomic counter
    // seeded past the stored ids). Empty: a counter in this queue, from 1 and past every id it has
    // seen (restored or submitted).
    std::function<std::int64_t()> next_id;
  };

  // Called on every state change (and when an action is created), with the new record and the
  // state before (nullopt for a new action); not for priority changes (those reach only the
  // store). Same thread rules as ActionStore; it may call
  // submit(), cancel(), set_priority(), get(), snapshot(), but not wait_idle() or stop().
  using Observer = std::function<void(const ActionRecord& record, std::optional<ActionState> before)>;

  struct Submitted {
    std::int64_t id = 0;
    bool created = false;  // false: an equivalent action existed and was returned (maybe boosted)
  };

  // `driver` and `store` (may be null) must outlive the queue. Starts the threads.
  ActionQueue(PowerDriver& driver, common::Clock& clock, Options options, ActionStore* store = nullptr);
  ~ActionQueue();  // stop()
  ActionQueue(const ActionQueue&) = delete;
  ActionQueue& operator=(const ActionQueue&) = delete;

  // Queues an action as Pending. Dedupe: when the machine (by vm id) already has the same action
  // Pending, or Started for TurnOn, TurnOff, Shutdown, Suspend or Resume (whose effect does not
  // depend on when they ran), returns that action with created == false, and lowers its actual
  // priority to the request's base priority if that is more urgent (a launch boosts a queued
  // policy TurnOn). Reset and Restart while one is Started queue a second one.
  // Errors: unavailable after stop(); invalid_argument (empty vm id, priority out of
  // kMinPriority..kMaxPriority); conflict (the id is taken).
  common::Result<Submitted> submit(ActionRequest request);
  // Pending -> Canceled. not_found; conflict when it is not Pending; unavailable after stop().
  common::Status cancel(std::int64_t id);
  // Sets the actual priority of a Pending action. not_found; conflict when not Pending;
  // invalid_argument when out of range; unavailable after stop().
  common::Status set_priority(std::int64_t id, int priority);

  void set_limits(const Limits& limits);
  void set_enabled(bool enabled);
  // The connection's machine count, for max_percentage_active_actions.
  void set_machine_count(std::size_t count);

  // Takes back the actions the store had at start-up (call before the first submit()):
  // - Pending: Pending again, with their priorities, request time and attempts.
  // - Started (in flight when the broker stopped): Started again, and the machine is queried at
  //   once: at the target state -> Completed; in the transitional state towards it (TurningOn for
  //   TurnOn, Reset, Restart; Resuming; TurningOff for TurnOff, Shutdown; Suspending) -> stays
  //   Started, followed as usual, with a fresh completion_timeout; VM gone -> Lost; anything
  //   else (the perform() may never have reached the hypervisor) -> Lost "interrupted by a
  //   broker restart" (the owner may submit it again).
  // - Finished: listed until their retention ends.
  // Nothing is saved for the restored records until they change. Records whose id is taken or
  // whose vm id is empty are skipped. Returns how many were taken.
  std::size_t restore(std::vector<ActionRecord> records);

  // Adds an observer (see Observer). Changes queued before this call may or may not reach it.
  void on_change(Observer observer);

  std::optional<ActionRecord> get(std::int64_t id) const;
  // Every action the queue knows (active and retained), by id.
  std::vector<ActionRecord> snapshot() const;
  QueueStats stats() const;

  // Wakes the dispatcher for a pass now (after the clock jumped, or when a machine's state may
  // have changed). Does not wait.
  void poll();
  // Blocks until the queue is quiet: no pass pending or running, no driver call in flight, and
  // every store and observer call for the changes so far made. Returns at once after stop().
  // Not from an observer or the store. (Tests: poll(); wait_idle(); then look.)
  void wait_idle();
  // No new actions (submit() fails with unavailable) and nothing new starts; waits for the driver
  // calls in flight and delivers their changes to the store and the observers, then joins the
  // threads. Pending actions stay Pending and Started ones Started (restore() takes them back);
  // a Started action whose perform() had not begun goes back to Pending, that attempt uncounted.
  // Idempotent; not from an observer or the store.
  void stop();

 private:
  struct Entry {
    ActionRecord rec;
    bool call_in_flight = false;   // a perform() or query() for it is running on the pool
    std::uint64_t call = 0;        // that call's serial (Call::serial)
    bool call_is_perform = false;
    common::SysTime call_began{};  // when a pool thread began it (zero: queued, not begun)
    bool performed = false;        // Started and perform() succeeded: follow it with query()
    bool restored = false;         // Started at a restart: the first query decides (see restore)
    bool check_now = false;        // query at the next pass, whatever last_check says
    common::SysTime last_check{};  // the last query()
    common::SysTime deadline{};    // Started: completion_timeout ends
    PowerState last_seen = PowerState::unknown;
  };
  struct Event {
    bool forgotten = false;
    ActionRecord record;
    std::optional<ActionState> before;
    bool state_changed = true;
  };
  struct Call {
    std::int64_t id;
    VmRef vm;
    Action action;
    bool perform;  // else query
    std::uint64_t serial;  // Entry::call while current; a stale result is ignored
  };

  // With mutex_ held.
  void pass_locked(common::SysTime now, std::vector<Call>& calls);
  void record_locked(const Entry& e, std::optional<ActionState> before, bool state_changed = true);
  void finish_locked(Entry& e, ActionState state, common::SysTime now);
  void requeue_locked(Entry& e);  // Started -> Pending, without a failure (stop before perform())
  // A perform() attempt failed: retried after a back-off when transient with attempts left,
  // else Failed.
  void attempt_failed_locked(Entry& e, const Outcome& out, common::SysTime now);
  // The current call of `e` is past call_timeout: abandoned (see the file comment).
  void abandon_call_locked(Entry& e, common::SysTime now);
  std::size_t active_limit_locked() const;
  std::int64_t allocate_id_locked();

  void run_dispatcher();
  // Queues the calls for the pool, growing it for abandoned calls (dispatcher thread only).
  void post(std::vector<Call> calls);
  void run_worker();
  // A driver call came back: the action it belongs to, or nullptr when the result is stale (the
  // action has moved on: cancelled, restarted, another attempt).
  Entry* returned_locked(const Call& call);
  void on_performed(const Call& call, const Outcome& out);
  void on_queried(const Call& call, const Outcome& out, PowerState state);
  // Delivers events_ to the store and observers; dispatcher thread only, without mutex_.
  void deliver();

  PowerDriver& driver_;
  common::Clock& clock_;
  ActionStore* const store_;
  const Options options_;  // limits and enabled: only the initial values (see limits_, enabled_)

  mutable std::mutex mutex_;
  std::condition_variable wake_cv_;  // the dispatcher waits on it
  std::condition_variable idle_cv_;  // wait_idle() waits on it
  // Guarded by mutex_:
  std::map<std::int64_t, Entry> actions_;
  std::map<std::string, std::vector<std::int64_t>> active_by_vm_;  // vm id -> its Pending and Started actions
  std::set<std::string> busy_vms_;                                 // vm ids with a Started action
  std::deque<common::SysTime> recent_starts_;                      // perform() times in the last minute
  std::deque<Event> events_;                                       // for deliver()
  std::shared_ptr<const std::vector<Observer>> observers_;         // copy on write
  Limits limits_;
  bool enabled_ = true;
  std::size_t machine_count_ = 0;
  std::int64_t next_id_ = 1;
  std::size_t in_flight_ = 0;  // driver calls posted and not finished (abandoned ones excluded)
  std::deque<Call> calls_;     // posted, not begun
  std::set<std::uint64_t> abandoned_;  // serials of abandoned calls that have not returned
  std::uint64_t next_call_ = 1;
  bool workers_stopping_ = false;
  bool wake_ = false;          // a pass is wanted
  bool busy_ = false;          // the dispatcher is in a pass or delivering
  bool stopping_ = false;
  bool dispatcher_done_ = false;

  std::mutex stop_mutex_;  // serialises stop()
  std::condition_variable work_cv_;  // the pool's threads wait on it (with mutex_)
  std::vector<std::thread> workers_;  // the pool; grown and joined by the dispatcher thread only
  std::thread dispatcher_;
};

}  // namespace power
