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

class Timers {
 public:
  Timers();
  ~Timers();  // stop()
  Timers(const Timers&) = delete;
  Timers& operator=(const Timers&) = delete;

  // Runs fn once, `delay` from now (at once when delay <= 0). Returns an id for cancel(); 0 once
  // stop() has begun (fn is dropped).
  std::uint64_t after(std::chrono::milliseconds delay, std::function<void()> fn);
  // Drops the timer. True when it had not started running; false when it has run, is running or
  // is unknown.
  bool cancel(std::uint64_t id);
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
