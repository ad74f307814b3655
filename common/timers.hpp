// common/timers.hpp: one thread that runs callbacks after a delay (steady clock), for the few
// places outside the I/O threads that must wake up at a time (a launch waiting for a machine to
// register). Callbacks run on the timer thread one at a time: keep them short (post real work to
// a WorkQueue).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

namespace common {

// Something that runs a callback once after a delay (steady clock). brokerd's is the I/O
// threads' io_context (net::Server::scheduler(): no thread of its own); Timers below is a thread
// of its own for tests and tools. Callbacks must be short: post real work to a WorkQueue.
class Scheduler {
 public:
  virtual ~Scheduler() = default;
  // Runs fn once, `delay` from now (at once when delay <= 0). Returns an id for cancel(); 0 when
  // the scheduler is stopping (fn is dropped).
  virtual std::uint64_t after(std::chrono::milliseconds delay, std::function<void()> fn) = 0;
  // Drops the timer. True when it had not started running; false when it has run, is running or
  // is unknown.
  virtual bool cancel(std::uint64_t id) = 0;
};

// A Scheduler for tests: time stands still until advance(), which runs the callbacks that fall
// due, in order, on the calling thread. Thread-safe.
class ManualScheduler final : public Scheduler {
 public:
  std::uint64_t after(std::chrono::milliseconds delay, std::function<void()> fn) override;
  bool cancel(std::uint64_t id) override;
  // Moves time on by `by` and runs every callback due by then.
  void advance(std::chrono::milliseconds by);
  std::size_t pending() const;

 private:
  mutable std::mutex mutex_;
  std::chrono::milliseconds now_{0};                                                          // guarded by mutex_
  std::map<std::pair<std::chrono::milliseconds, std::uint64_t>, std::function<void()>> due_;  // guarded by mutex_
  std::uint64_t next_id_ = 0;                                                                 // guarded by mutex_
};

class Timers final : public Scheduler {
 public:
  Timers();
  ~Timers() override;  // stop()
  Timers(const Timers&) = delete;
  Timers& operator=(const Timers&) = delete;

  std::uint64_t after(std::chrono::milliseconds delay, std::function<void()> fn) override;
  bool cancel(std::uint64_t id) override;
  // Drops every timer not yet run and joins the thread (waits for a running callback). Idempotent
  // and safe from several threads; not from a callback. An exception thrown by a callback is
  // swallowed.
  void stop();

 private:
  void run();

  using Key = std::pair<std::chrono::steady_clock::time_point, std::uint64_t>;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::map<Key, std::function<void()>> due_;  // guarded by mutex_
  std::map<std::uint64_t, Key> keys_;         // guarded by mutex_
  std::uint64_t next_id_ = 0;                 // guarded by mutex_
  bool stopping_ = false;                     // guarded by mutex_
  std::mutex join_mutex_;                     // one stop() joins
  std::thread thread_;
};

}  // namespace common
