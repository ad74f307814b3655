// power/simulated_driver.cpp: see simulated_driver.hpp.
#include "power/simulated_driver.hpp"

#include <algorithm>
#include <utility>

namespace power {

namespace {

Outcome fail(Failure f, std::string message) { return Outcome{f, std::move(message)}; }

}  // namespace

SimulatedDriver::SimulatedDriver(common::Clock& clock, Options options)
    : clock_(clock),
      call_latency_(options.call_latency),
      tick_interval_(options.tick_interval),
      options_(options),
      rng_(options.seed) {
  options_.failure_rate = std::clamp(options_.failure_rate, 0.0, 1.0);
  options_.transient_share = std::clamp(options_.transient_share, 0.0, 1.0);
  if (tick_interval_.count() > 0) ticker_ = std::thread([this] { run_ticker(); });
}

SimulatedDriver::~SimulatedDriver() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  ticker_cv_.notify_all();
  if (ticker_.joinable()) ticker_.join();
}

Outcome SimulatedDriver::query(const VmRef& vm, PowerState& state) {
  if (call_latency_.count() > 0) std::this_thread::sleep_for(call_latency_);
  Outcome out;
  {
    std::lock_guard lock(mutex_);
    ++query_calls_;
    settle_locked(clock_.now());
    const auto it = vms_.find(vm.vm_id);
    if (it == vms_.end()) {
      out = fail(Failure::not_found, "no simulated machine '" + vm.vm_id + "'");
    } else {
      state = it->second.state;
    }
  }
  deliver();
  return out;
}

Outcome SimulatedDriver::perform(const VmRef& vm, Action action) {
  if (call_latency_.count() > 0) std::this_thread::sleep_for(call_latency_);
  Outcome out;
  {
    std::lock_guard lock(mutex_);
    ++perform_calls_;
    out = perform_locked(vm.vm_id, action, clock_.now());
  }
  deliver();
  return out;
}

Outcome SimulatedDriver::perform_locked(const std::string& vm_id, Action action, common::SysTime now) {
  settle_locked(now);
  const auto it = vms_.find(vm_id);
  if (it == vms_.end()) return fail(Failure::not_found, "no simulated machine '" + vm_id + "'");
  Vm& m = it->second;
  if (!m.injected.empty()) {
    const Failure f = m.injected.front();
    m.injected.pop_front();
    return fail(f, "injected failure of " + std::string(to_string(action)));
  }
  if (options_.failure_rate > 0 && next_random() < options_.failure_rate) {
    if (next_random() < options_.transient_share) return fail(Failure::connection, "simulated connection failure");
    return fail(Failure::refused, "simulated refusal of " + std::string(to_string(action)));
  }

  const PowerState s = m.state;
  Outcome out;
  // Starts a transition: the transitional state now, `target` after `delay`.
  auto begin = [&](PowerState transitional, PowerState target, std::chrono::milliseconds delay) {
    set_locked(vm_id, m, transitional);
    m.target = target;
    m.due = now + delay;
  };
  auto invalid = [&] {
    out = fail(Failure::invalid_state,
               std::string(to_string(action)) + " is not possible while the machine is " + std::string(to_string(s)));
  };
  switch (action) {
    case Action::turn_on:
      if (s == PowerState::off)
        begin(PowerState::turning_on, PowerState::on, options_.boot_delay);
      else if (s != PowerState::on && s != PowerState::turning_on)
        invalid();
      break;
    case Action::turn_off:
      if (s != PowerState::off) {
        m.target.reset();
        set_locked(vm_id, m, PowerState::off);
      }
      break;
    case Action::shutdown:
      if (s == PowerState::on)
        begin(PowerState::turning_off, PowerState::off, options_.shutdown_delay);
      else if (s != PowerState::off && s != PowerState::turning_off)
        invalid();
      break;
    case Action::suspend:
      if (s == PowerState::on)
        begin(PowerState::suspending, PowerState::suspended, options_.suspend_delay);
      else if (s != PowerState::suspended && s != PowerState::suspending)
        invalid();
      break;
    case Action::resume:
      if (s == PowerState::suspended)
        begin(PowerState::resuming, PowerState::on, options_.resume_delay);
      else if (s != PowerState::on && s != PowerState::resuming)
        invalid();
      break;
    case Action::reset:
      // From TurningOn the state does not change, but the boot starts again.
      if (s == PowerState::on || s == PowerState::turning_on)
        begin(PowerState::turning_on, PowerState::on, options_.boot_delay);
      else
        invalid();
      break;
    case Action::restart:
      if (s == PowerState::on)
        begin(PowerState::turning_on, PowerState::on, options_.boot_delay);
      else
        invalid();
      break;
  }
  settle_locked(now);  // zero delays end at once
  return out;
}

Outcome SimulatedDriver::list(std::vector<std::string>& vm_ids) {
  {
    std::lock_guard lock(mutex_);
    settle_locked(clock_.now());
    vm_ids.clear();
    vm_ids.reserve(vms_.size());
    for (const auto& [id, vm] : vms_) vm_ids.push_back(id);
  }
  deliver();
  return {};
}

void SimulatedDriver::add(const std::string& vm_id, PowerState initial) {
  {
    std::lock_guard lock(mutex_);
    auto [it, inserted] = vms_.try_emplace(vm_id);
    Vm& vm = it->second;
    vm.target.reset();
    vm.injected.clear();
    if (inserted) {
      vm.state = initial;
      changes_.push_back({vm_id, initial});
    } else {
      set_locked(vm_id, vm, initial);
    }
  }
  deliver();
}

bool SimulatedDriver::remove(const std::string& vm_id) {
  {
    std::lock_guard lock(mutex_);
    if (vms_.erase(vm_id) == 0) return false;
    changes_.push_back({vm_id, PowerState::unknown});
  }
  deliver();
  return true;
}

bool SimulatedDriver::set_state(const std::string& vm_id, PowerState state) {
  {
    std::lock_guard lock(mutex_);
    const auto it = vms_.find(vm_id);
    if (it == vms_.end()) return false;
    it->second.target.reset();
    set_locked(vm_id, it->second, state);
  }
  deliver();
  return true;
}

void SimulatedDriver::inject_failures(const std::string& vm_id, Failure failure, int count) {
  std::lock_guard lock(mutex_);
  const auto it = vms_.find(vm_id);
  if (it == vms_.end()) return;
  for (int i = 0; i < count; ++i) it->second.injected.push_back(failure);
}

void SimulatedDriver::set_failure_rate(double rate, double transient_share) {
  std::lock_guard lock(mutex_);
  options_.failure_rate = std::clamp(rate, 0.0, 1.0);
  options_.transient_share = std::clamp(transient_share, 0.0, 1.0);
}

void SimulatedDriver::advance() {
  {
    std::lock_guard lock(mutex_);
    settle_locked(clock_.now());
  }
  deliver();
}

std::uint64_t SimulatedDriver::on_change(Listener listener) {
  auto sub = std::make_shared<Subscriber>();
  sub->listener = std::move(listener);
  std::lock_guard lock(mutex_);
  const auto id = next_subscriber_++;
  subscribers_.emplace(id, std::move(sub));
  return id;
}

void SimulatedDriver::remove_listener(std::uint64_t id) {
  std::shared_ptr<Subscriber> sub;
  {
    std::lock_guard lock(mutex_);
    const auto it = subscribers_.find(id);
    if (it == subscribers_.end()) return;
    sub = std::move(it->second);
    subscribers_.erase(it);
  }
  // Waits for a call in progress on another thread; recursive, so a listener may remove itself.
  std::lock_guard sub_lock(sub->mutex);
  sub->active = false;
}

std::uint64_t SimulatedDriver::perform_calls() const {
  std::lock_guard lock(mutex_);
  return perform_calls_;
}

std::uint64_t SimulatedDriver::query_calls() const {
  std::lock_guard lock(mutex_);
  return query_calls_;
}

void SimulatedDriver::set_locked(const std::string& vm_id, Vm& vm, PowerState state) {
  if (vm.state == state) return;
  vm.state = state;
  changes_.push_back({vm_id, state});
}

void SimulatedDriver::settle_locked(common::SysTime now) {
  for (auto& [id, vm] : vms_) {
    if (!vm.target || vm.due > now) continue;
    const PowerState target = *vm.target;
    vm.target.reset();
    set_locked(id, vm, target);
  }
}

void SimulatedDriver::deliver() {
  std::unique_lock lock(mutex_);
  if (delivering_) return;  // that thread delivers ours too, in order
  delivering_ = true;
  while (!changes_.empty()) {
    Change change = std::move(changes_.front());
    changes_.pop_front();
    std::vector<std::shared_ptr<Subscriber>> subs;
    subs.reserve(subscribers_.size());
    for (const auto& [id, sub] : subscribers_) subs.push_back(sub);
    lock.unlock();
    for (const auto& sub : subs) {
      std::lock_guard sub_lock(sub->mutex);
      if (sub->active) sub->listener(change.vm_id, change.state);
    }
    lock.lock();
  }
  delivering_ = false;
}

void SimulatedDriver::run_ticker() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    ticker_cv_.wait_for(lock, tick_interval_, [this] { return stopping_; });
    if (stopping_) break;
    lock.unlock();
    advance();
    lock.lock();
  }
}

double SimulatedDriver::next_random() {
  return static_cast<double>(rng_() >> 11) * 0x1.0p-53;  // 53 random bits, the same everywhere
}

}  // namespace power
