#include "common/timers.hpp"

#include <algorithm>

namespace common {

Timers::Timers() : thread_([this] { run(); }) {}

Timers::~Timers() { stop(); }

std::uint64_t Timers::after(std::chrono::milliseconds delay, std::function<void()> fn) {
  std::uint64_t id = 0;
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return 0;
    id = ++next_id_;
    const Key key{std::chrono::steady_clock::now() + std::max(delay, std::chrono::milliseconds(0)), id};
    due_.emplace(key, std::move(fn));
    keys_.emplace(id, key);
  }
  cv_.notify_one();
  return id;
}

bool Timers::cancel(std::uint64_t id) {
  std::lock_guard lock(mutex_);
  auto it = keys_.find(id);
  if (it == keys_.end()) return false;
  due_.erase(it->second);
  keys_.erase(it);
  return true;
}

void Timers::stop() {
  std::map<Key, std::function<void()>> dropped;  // destroyed outside the lock
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
    dropped.swap(due_);
    keys_.clear();
  }
  cv_.notify_all();
  std::lock_guard join(join_mutex_);
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

void Timers::run() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    if (due_.empty()) {
      cv_.wait(lock);
      continue;
    }
    const auto first = due_.begin()->first;
    if (std::chrono::steady_clock::now() < first.first) {
      cv_.wait_until(lock, first.first);
      continue;
    }
    auto fn = std::move(due_.begin()->second);
    due_.erase(due_.begin());
    keys_.erase(first.second);
    lock.unlock();
    try {
      fn();
    } catch (...) {
      // A callback's failure is its own; the other timers still run.
    }
    fn = nullptr;  // its captures go before the lock is taken again
    lock.lock();
  }
}

std::uint64_t ManualScheduler::after(std::chrono::milliseconds delay, std::function<void()> fn) {
  std::lock_guard lock(mutex_);
  const auto id = ++next_id_;
  due_.emplace(std::pair{now_ + std::max(delay, std::chrono::milliseconds(0)), id}, std::move(fn));
  return id;
}

bool ManualScheduler::cancel(std::uint64_t id) {
  std::lock_guard lock(mutex_);
  for (auto it = due_.begin(); it != due_.end(); ++it)
    if (it->first.second == id) {
      due_.erase(it);
      return true;
    }
  return false;
}

void ManualScheduler::advance(std::chrono::milliseconds by) {
  std::chrono::milliseconds until;
  {
    std::lock_guard lock(mutex_);
    until = now_ + by;
  }
  for (;;) {
    std::function<void()> fn;
    {
      std::lock_guard lock(mutex_);
      auto it = due_.begin();
      if (it == due_.end() || it->first.first > until) {
        now_ = until;
        return;
      }
      now_ = it->first.first;
      fn = std::move(it->second);
      due_.erase(it);
    }
    fn();
  }
}

std::size_t ManualScheduler::pending() const {
  std::lock_guard lock(mutex_);
  return due_.size();
}

}  // namespace common
