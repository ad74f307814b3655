// power/action_queue.cpp: see action_queue.hpp.
#include "power/action_queue.hpp"

#include <algorithm>
#include <utility>

namespace power {

namespace {

using common::errc;
using common::make_error;
using namespace std::chrono_literals;

constexpr std::array<std::string_view, kActionStateCount> kStateNames{"Pending", "Started",  "Completed",
                                                                      "Failed",  "Canceled", "Lost"};
constexpr auto kWindow = std::chrono::minutes(1);

// Actions whose effect does not depend on when they run: a second request while one is Started
// is the same request.
bool idempotent(Action a) {
  return a == Action::turn_on || a == Action::turn_off || a == Action::shutdown || a == Action::suspend ||
         a == Action::resume;
}

// The state a machine passes through on its way to the action's target.
bool on_the_way(Action a, PowerState s) {
  switch (a) {
    case Action::turn_on:
    case Action::reset:
    case Action::restart: return s == PowerState::turning_on;
    case Action::resume: return s == PowerState::resuming;
    case Action::turn_off:
    case Action::shutdown: return s == PowerState::turning_off;
    case Action::suspend: return s == PowerState::suspending;
  }
  return false;
}

std::string describe(const Outcome& out) {
  std::string text(to_string(out.failure));
  if (!out.message.empty()) text += ": " + out.message;
  return text;
}

std::string seconds_text(std::chrono::milliseconds d) {
  return std::to_string(std::chrono::duration_cast<std::chrono::seconds>(d).count()) + " s";
}

void erase_id(std::map<std::string, std::vector<std::int64_t>>& index, const std::string& vm_id, std::int64_t id) {
  const auto it = index.find(vm_id);
  if (it == index.end()) return;
  std::erase(it->second, id);
  if (it->second.empty()) index.erase(it);
}

}  // namespace

std::string_view to_string(ActionState s) { return kStateNames[static_cast<std::size_t>(s)]; }

bool from_string(std::string_view text, ActionState& out) {
  for (std::size_t i = 0; i < kStateNames.size(); ++i)
    if (kStateNames[i] == text) {
      out = static_cast<ActionState>(i);
      return true;
    }
  return false;
}

bool finished(ActionState s) { return s != ActionState::pending && s != ActionState::started; }

PowerState target_state(Action a) {
  switch (a) {
    case Action::turn_off:
    case Action::shutdown: return PowerState::off;
    case Action::suspend: return PowerState::suspended;
    case Action::turn_on:
    case Action::resume:
    case Action::reset:
    case Action::restart: return PowerState::on;
  }
  return PowerState::on;
}

ActionQueue::ActionQueue(PowerDriver& driver, common::Clock& clock, Options options, ActionStore* store)
    : driver_(driver),
      clock_(clock),
      store_(store),
      options_(std::move(options)),
      observers_(std::make_shared<const std::vector<Observer>>()),
      limits_(options_.limits),
      enabled_(options_.enabled) {
  for (int i = 0; i < std::max(1, options_.threads); ++i) workers_.emplace_back([this] { run_worker(); });
  dispatcher_ = std::thread([this] { run_dispatcher(); });
}

ActionQueue::~ActionQueue() { stop(); }

common::Result<ActionQueue::Submitted> ActionQueue::submit(ActionRequest request) {
  if (request.vm.vm_id.empty()) return make_error(errc::invalid_argument, "the machine has no vm id", "machine");
  if (request.base_priority < kMinPriority || request.base_priority > kMaxPriority)
    return make_error(errc::invalid_argument, "must be between 0 and 1000", "base_priority");
  Submitted result;
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return make_error(errc::unavailable, "the power-action queue is stopping");

    // Dedupe (and boost) against the machine's active actions.
    if (const auto idx = active_by_vm_.find(request.vm.vm_id); idx != active_by_vm_.end()) {
      for (const auto id : idx->second) {
        Entry& e = actions_.at(id);
        if (e.rec.action != request.action) continue;
        if (e.rec.state != ActionState::pending && !(e.rec.state == ActionState::started && idempotent(e.rec.action)))
          continue;
        if (e.rec.state == ActionState::pending && request.base_priority < e.rec.actual_priority) {
          e.rec.actual_priority = request.base_priority;
          record_locked(e, e.rec.state, false);
          wake_ = true;
        }
        result = Submitted{id, false};
        break;
      }
    }

    if (result.id == 0) {
      std::int64_t id = request.id;
      if (id == 0) {
        id = allocate_id_locked();
      } else if (id < 0 || actions_.contains(id)) {
        return make_error(errc::conflict, "power action " + std::to_string(id) + " exists already", "id");
      }
      if (id >= next_id_) next_id_ = id + 1;
      Entry e;
      e.rec.id = id;
      e.rec.vm = std::move(request.vm);
      e.rec.hypervisor_connection = options_.connection;
      e.rec.action = request.action;
      e.rec.state = ActionState::pending;
      e.rec.base_priority = e.rec.actual_priority = request.base_priority;
      e.rec.reason = std::move(request.reason);
      e.rec.request_time = clock_.now();
      active_by_vm_[e.rec.vm.vm_id].push_back(id);
      const auto it = actions_.emplace(id, std::move(e)).first;
      record_locked(it->second, std::nullopt);
      wake_ = true;
      result = Submitted{id, true};
    }
  }
  wake_cv_.notify_one();
  return result;
}

common::Status ActionQueue::cancel(std::int64_t id) {
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return make_error(errc::unavailable, "the power-action queue is stopping");
    const auto it = actions_.find(id);
    if (it == actions_.end()) return make_error(errc::not_found, "no power action " + std::to_string(id));
    Entry& e = it->second;
    if (e.rec.state != ActionState::pending)
      return make_error(errc::conflict, "the action is " + std::string(to_string(e.rec.state)) +
                                            "; only Pending actions can be canceled");
    finish_locked(e, ActionState::canceled, clock_.now());
    wake_ = true;
  }
  wake_cv_.notify_one();
  return {};
}

common::Status ActionQueue::set_priority(std::int64_t id, int priority) {
  if (priority < kMinPriority || priority > kMaxPriority)
    return make_error(errc::invalid_argument, "must be between 0 and 1000", "actual_priority");
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return make_error(errc::unavailable, "the power-action queue is stopping");
    const auto it = actions_.find(id);
    if (it == actions_.end()) return make_error(errc::not_found, "no power action " + std::to_string(id));
    Entry& e = it->second;
    if (e.rec.state != ActionState::pending)
      return make_error(errc::conflict, "the action is " + std::string(to_string(e.rec.state)) +
                                            "; only Pending actions can be re-prioritised");
    if (e.rec.actual_priority == priority) return {};
    e.rec.actual_priority = priority;
    record_locked(e, e.rec.state, false);
    wake_ = true;
  }
  wake_cv_.notify_one();
  return {};
}

void ActionQueue::set_limits(const Limits& limits) {
  {
    std::lock_guard lock(mutex_);
    limits_ = limits;
    wake_ = true;
  }
  wake_cv_.notify_one();
}

void ActionQueue::set_enabled(bool enabled) {
  {
    std::lock_guard lock(mutex_);
    enabled_ = enabled;
    wake_ = true;
  }
  wake_cv_.notify_one();
}

void ActionQueue::set_machine_count(std::size_t count) {
  {
    std::lock_guard lock(mutex_);
    machine_count_ = count;
    wake_ = true;
  }
  wake_cv_.notify_one();
}

std::size_t ActionQueue::restore(std::vector<ActionRecord> records) {
  std::size_t taken = 0;
  {
    std::lock_guard lock(mutex_);
    const auto now = clock_.now();
    for (auto& rec : records) {
      if (rec.id <= 0 || rec.vm.vm_id.empty() || actions_.contains(rec.id)) continue;
      if (rec.id >= next_id_) next_id_ = rec.id + 1;
      if (rec.hypervisor_connection.empty()) rec.hypervisor_connection = options_.connection;
      Entry e;
      e.rec = std::move(rec);
      switch (e.rec.state) {
        case ActionState::pending: active_by_vm_[e.rec.vm.vm_id].push_back(e.rec.id); break;
        case ActionState::started:
          active_by_vm_[e.rec.vm.vm_id].push_back(e.rec.id);
          busy_vms_.insert(e.rec.vm.vm_id);
          e.performed = true;
          e.restored = true;
          e.check_now = true;
          e.deadline = now + options_.completion_timeout;
          break;
        default:
          if (e.rec.completion_time == common::SysTime{}) e.rec.completion_time = now;
          break;
      }
      actions_.emplace(e.rec.id, std::move(e));
      ++taken;
    }
    wake_ = true;
  }
  wake_cv_.notify_one();
  return taken;
}

void ActionQueue::on_change(Observer observer) {
  std::lock_guard lock(mutex_);
  auto next = std::make_shared<std::vector<Observer>>(*observers_);
  next->push_back(std::move(observer));
  observers_ = std::move(next);
}

std::optional<ActionRecord> ActionQueue::get(std::int64_t id) const {
  std::lock_guard lock(mutex_);
  const auto it = actions_.find(id);
  if (it == actions_.end()) return std::nullopt;
  return it->second.rec;
}

std::vector<ActionRecord> ActionQueue::snapshot() const {
  std::lock_guard lock(mutex_);
  std::vector<ActionRecord> out;
  out.reserve(actions_.size());
  for (const auto& [id, e] : actions_) out.push_back(e.rec);
  return out;
}

QueueStats ActionQueue::stats() const {
  std::lock_guard lock(mutex_);
  QueueStats s;
  for (const auto& [id, e] : actions_) ++s.by_state[static_cast<std::size_t>(e.rec.state)];
  s.queue_depth = s.by_state[static_cast<std::size_t>(ActionState::pending)];
  s.active = s.by_state[static_cast<std::size_t>(ActionState::started)];
  const auto since = clock_.now() - kWindow;
  s.started_last_minute = static_cast<std::size_t>(
      std::count_if(recent_starts_.begin(), recent_starts_.end(), [&](common::SysTime t) { return t > since; }));
  s.driver_calls_in_flight = in_flight_;
  s.driver_calls_abandoned = abandoned_.size();
  return s;
}

void ActionQueue::poll() {
  {
    std::lock_guard lock(mutex_);
    wake_ = true;
  }
  wake_cv_.notify_one();
}

void ActionQueue::wait_idle() {
  std::unique_lock lock(mutex_);
  idle_cv_.wait(lock, [this] { return dispatcher_done_ || (!wake_ && !busy_ && in_flight_ == 0 && events_.empty()); });
}

void ActionQueue::stop() {
  std::lock_guard stop_lock(stop_mutex_);
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_cv_.notify_all();
  if (dispatcher_.joinable() && dispatcher_.get_id() != std::this_thread::get_id()) dispatcher_.join();
}

// ---- the dispatcher ----

void ActionQueue::run_dispatcher() {
  std::unique_lock lock(mutex_);
  for (;;) {
    wake_cv_.wait_for(lock, options_.poll_interval, [this] { return wake_ || stopping_; });
    if (stopping_) break;
    wake_ = false;
    busy_ = true;
    std::vector<Call> calls;
    pass_locked(clock_.now(), calls);
    lock.unlock();
    post(std::move(calls));
    deliver();
    lock.lock();
    busy_ = false;
    idle_cv_.notify_all();
  }
  busy_ = true;
  workers_stopping_ = true;
  lock.unlock();
  // The calls in flight finish (abandoned ones too); queued performs go back to Pending.
  work_cv_.notify_all();
  for (auto& w : workers_) w.join();
  deliver();
  lock.lock();
  busy_ = false;
  dispatcher_done_ = true;
  idle_cv_.notify_all();
}

void ActionQueue::pass_locked(common::SysTime now, std::vector<Call>& calls) {
  while (!recent_starts_.empty() && recent_starts_.front() + kWindow <= now) recent_starts_.pop_front();

  std::size_t active = 0;
  std::vector<Entry*> candidates;
  for (auto it = actions_.begin(); it != actions_.end();) {
    Entry& e = it->second;
    switch (e.rec.state) {
      case ActionState::pending:
        if (e.rec.next_attempt <= now) candidates.push_back(&e);
        break;
      case ActionState::started:
        if (now >= e.deadline) {
          e.rec.failure = Failure::timeout;
          e.rec.failure_reason = "timed out after " + seconds_text(options_.completion_timeout) + " waiting for " +
                                 std::string(to_string(target_state(e.rec.action))) + " (last seen " +
                                 std::string(to_string(e.last_seen)) + ")";
          finish_locked(e, ActionState::failed, now);
          break;
        }
        if (e.call_in_flight && e.call_began != common::SysTime{} && now >= e.call_began + options_.call_timeout) {
          abandon_call_locked(e, now);
          if (e.rec.state != ActionState::started) break;  // the attempt failed (retry or Failed)
        }
        ++active;
        if (e.performed && !e.call_in_flight && (e.check_now || e.last_check + options_.check_interval <= now)) {
          e.check_now = false;
          e.call_in_flight = true;
          e.call = next_call_++;
          e.call_is_perform = false;
          e.call_began = {};
          calls.push_back(Call{e.rec.id, e.rec.vm, e.rec.action, false, e.call});
        }
        break;
      default:
        if (e.rec.completion_time + options_.retention <= now) {
          events_.push_back(Event{true, e.rec, e.rec.state, false});
          it = actions_.erase(it);
          continue;
        }
        break;
    }
    ++it;
  }

  if (enabled_ && !stopping_ && !candidates.empty()) {
    std::sort(candidates.begin(), candidates.end(), [](const Entry* a, const Entry* b) {
      if (a->rec.actual_priority != b->rec.actual_priority) return a->rec.actual_priority < b->rec.actual_priority;
      if (a->rec.request_time != b->rec.request_time) return a->rec.request_time < b->rec.request_time;
      return a->rec.id < b->rec.id;
    });
    const std::size_t limit = active_limit_locked();
    const std::size_t per_minute = static_cast<std::size_t>(std::max(0, limits_.max_new_actions_per_minute));
    for (Entry* e : candidates) {
      if (active >= limit || recent_starts_.size() >= per_minute) break;
      if (busy_vms_.contains(e->rec.vm.vm_id)) continue;  // one Started action per machine
      e->rec.state = ActionState::started;
      e->rec.start_time = now;
      e->rec.next_attempt = {};
      ++e->rec.attempts;
      e->performed = false;
      e->restored = false;
      e->check_now = false;
      e->call_in_flight = true;
      e->call = next_call_++;
      e->call_is_perform = true;
      e->call_began = {};
      e->deadline = now + options_.completion_timeout;
      busy_vms_.insert(e->rec.vm.vm_id);
      recent_starts_.push_back(now);
      ++active;
      record_locked(*e, ActionState::pending);
      calls.push_back(Call{e->rec.id, e->rec.vm, e->rec.action, true, e->call});
    }
  }
  in_flight_ += calls.size();
}

void ActionQueue::post(std::vector<Call> calls) {
  std::size_t wanted = 0;
  {
    std::lock_guard lock(mutex_);
    for (auto& call : calls) calls_.push_back(std::move(call));
    wanted = static_cast<std::size_t>(std::max(1, options_.threads)) +
             std::min(abandoned_.size(), static_cast<std::size_t>(std::max(0, options_.max_abandoned_calls)));
  }
  // The threads held by abandoned calls are replaced, so the other machines' calls go on.
  while (workers_.size() < wanted) workers_.emplace_back([this] { run_worker(); });
  if (!calls.empty()) work_cv_.notify_all();
}

void ActionQueue::run_worker() {
  std::unique_lock lock(mutex_);
  for (;;) {
    work_cv_.wait(lock, [this] { return workers_stopping_ || !calls_.empty(); });
    if (calls_.empty()) return;  // stopping and drained
    const Call call = std::move(calls_.front());
    calls_.pop_front();
    const auto it = actions_.find(call.id);
    Entry* e = it != actions_.end() && it->second.rec.state == ActionState::started && it->second.call == call.serial
                   ? &it->second
                   : nullptr;
    if (!e || stopping_) {
      // Not begun. Stale (the action moved on while the call waited for a thread): dropped. At
      // stop: a perform goes back to Pending, a query is dropped.
      --in_flight_;
      if (e) {
        e->call_in_flight = false;
        if (call.perform) requeue_locked(*e);
      }
      wake_ = true;
      wake_cv_.notify_one();
      idle_cv_.notify_all();
      continue;
    }
    e->call_began = clock_.now();
    lock.unlock();
    if (call.perform) {
      const Outcome out = driver_.perform(call.vm, call.action);
      on_performed(call, out);
    } else {
      PowerState state = PowerState::unknown;
      const Outcome out = driver_.query(call.vm, state);
      on_queried(call, out, state);
    }
    lock.lock();
  }
}

ActionQueue::Entry* ActionQueue::returned_locked(const Call& call) {
  wake_ = true;
  if (abandoned_.erase(call.serial) > 0) return nullptr;  // given up on: counted elsewhere
  --in_flight_;
  const auto it = actions_.find(call.id);
  if (it == actions_.end() || it->second.rec.state != ActionState::started || it->second.call != call.serial)
    return nullptr;
  it->second.call_in_flight = false;
  it->second.call_began = {};
  return &it->second;
}

void ActionQueue::on_performed(const Call& call, const Outcome& out) {
  {
    std::lock_guard lock(mutex_);
    if (Entry* found = returned_locked(call)) {
      Entry& e = *found;
      if (out.ok()) {
        e.performed = true;
        e.check_now = true;
      } else {
        attempt_failed_locked(e, out, clock_.now());
      }
    }
  }
  wake_cv_.notify_one();
}

void ActionQueue::on_queried(const Call& call, const Outcome& out, PowerState state) {
  {
    std::lock_guard lock(mutex_);
    if (Entry* found = returned_locked(call)) {
      Entry& e = *found;
      const auto now = clock_.now();
      e.last_check = now;
      if (out.ok()) {
        e.last_seen = state;
        if (state == target_state(e.rec.action)) {
          e.rec.failure = Failure::none;
          e.rec.failure_reason.clear();
          finish_locked(e, ActionState::completed, now);
        } else if (e.restored) {
          if (on_the_way(e.rec.action, state)) {
            e.restored = false;
          } else {
            e.rec.failure_reason = "interrupted by a broker restart (machine is " + std::string(to_string(state)) + ")";
            finish_locked(e, ActionState::lost, now);
          }
        }
      } else if (out.failure == Failure::not_found) {
        e.rec.failure = Failure::not_found;
        e.rec.failure_reason = describe(out) + " (the machine disappeared while the action was in progress)";
        finish_locked(e, ActionState::lost, now);
      }
      // Other failures: asked again after check_interval, until completion_timeout.
    }
  }
  wake_cv_.notify_one();
}

void ActionQueue::deliver() {
  std::unique_lock lock(mutex_);
  while (!events_.empty()) {
    Event ev = std::move(events_.front());
    events_.pop_front();
    const auto observers = observers_;
    lock.unlock();
    if (ev.forgotten) {
      if (store_) store_->forgotten(ev.record);
    } else {
      if (store_) store_->saved(ev.record);
      if (ev.state_changed)
        for (const auto& observer : *observers) observer(ev.record, ev.before);
    }
    lock.lock();
  }
}

// ---- helpers, with mutex_ held ----

void ActionQueue::record_locked(const Entry& e, std::optional<ActionState> before, bool state_changed) {
  events_.push_back(Event{false, e.rec, before, state_changed});
}

void ActionQueue::finish_locked(Entry& e, ActionState state, common::SysTime now) {
  const ActionState before = e.rec.state;
  if (before == ActionState::started) busy_vms_.erase(e.rec.vm.vm_id);
  erase_id(active_by_vm_, e.rec.vm.vm_id, e.rec.id);
  e.rec.state = state;
  e.rec.completion_time = now;
  e.rec.next_attempt = {};
  e.performed = e.restored = e.check_now = false;
  record_locked(e, before);
}

void ActionQueue::attempt_failed_locked(Entry& e, const Outcome& out, common::SysTime now) {
  const int max_attempts = std::max(1, options_.max_attempts);
  e.rec.failure = out.failure;
  if (transient(out.failure) && e.rec.attempts < max_attempts) {
    auto wait = options_.initial_backoff;
    for (int i = 1; i < e.rec.attempts && wait < options_.max_backoff; ++i) wait *= 2;
    wait = std::min(wait, options_.max_backoff);
    e.rec.state = ActionState::pending;
    e.rec.start_time = {};
    e.rec.next_attempt = now + wait;
    e.rec.failure_reason = describe(out) + " (attempt " + std::to_string(e.rec.attempts) + " of " +
                           std::to_string(max_attempts) + "; retrying)";
    busy_vms_.erase(e.rec.vm.vm_id);
    record_locked(e, ActionState::started);
  } else {
    e.rec.failure_reason = describe(out);
    if (transient(out.failure))
      e.rec.failure_reason += " (gave up after " + std::to_string(e.rec.attempts) + " attempts)";
    finish_locked(e, ActionState::failed, now);
  }
}

void ActionQueue::abandon_call_locked(Entry& e, common::SysTime now) {
  abandoned_.insert(e.call);
  --in_flight_;
  e.call_in_flight = false;
  e.call_began = {};
  if (e.call_is_perform) {
    attempt_failed_locked(e,
                          Outcome{Failure::timeout, "the hypervisor did not answer " + std::string(to_string(e.rec.action)) +
                                                        " within " + seconds_text(options_.call_timeout) +
                                                        " (call abandoned)"},
                          now);
  } else {
    e.last_check = now;  // a failed query: asked again after check_interval
  }
}

void ActionQueue::requeue_locked(Entry& e) {
  busy_vms_.erase(e.rec.vm.vm_id);
  e.rec.state = ActionState::pending;
  e.rec.start_time = {};
  if (e.rec.attempts > 0) --e.rec.attempts;
  e.performed = e.restored = e.check_now = false;
  record_locked(e, ActionState::started);
}

std::size_t ActionQueue::active_limit_locked() const {
  std::size_t limit = static_cast<std::size_t>(std::max(0, limits_.max_absolute_active_actions));
  if (machine_count_ > 0) {
    const auto pct = static_cast<std::size_t>(std::clamp(limits_.max_percentage_active_actions, 0, 100));
    limit = std::min(limit, std::max<std::size_t>(1, machine_count_ * pct / 100));
  }
  return limit;
}

std::int64_t ActionQueue::allocate_id_locked() {
  if (options_.next_id) {
    const std::int64_t id = options_.next_id();
    if (id > 0 && !actions_.contains(id)) return id;
    // A shared source that hands out a taken id is a bug in the owner; fall back to our counter.
  }
  while (actions_.contains(next_id_)) ++next_id_;
  return next_id_++;
}

}  // namespace power
