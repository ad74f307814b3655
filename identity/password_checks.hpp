// identity/password_checks.hpp: bounded concurrency for password hashing.
//
// A password check (PBKDF2, ~50 ms of CPU at the default iterations) is the one piece of request
// work whose cost an unauthenticated client chooses to spend: a flood of wrong passwords would
// otherwise occupy every worker thread and core, and everything else the broker does (cached
// logons, trusted front ends' launches, the admin API, agents) would wait behind it. The pool
// runs at most `threads` checks at once on threads of its own; more wait in a bounded queue for
// at most `max_wait`; beyond either bound a check is refused, and the caller answers "busy"
// (NFuse `service-unavailable`) instead of queueing without bound. See docs/nfuse.md
// "Password checks under load".
//
// Threading: submit() from any thread; jobs run on the pool's threads, in FIFO order.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string_view>
#include <thread>
#include <vector>

namespace common {
class Metrics;
}

namespace identity {

struct PasswordCheckOptions {
  int threads = 0;                           // checks at once; 0: the number of cores (at least 1)
  std::size_t max_queued = 128;              // checks waiting for a thread; more are refused
  std::chrono::milliseconds max_wait{2000};  // a check that waited longer is refused, not run
  // The time source for max_wait (tests); default std::chrono::steady_clock::now.
  std::function<std::chrono::steady_clock::time_point()> now;
};

class PasswordCheckPool {
 public:
  enum class Refusal {
    queue_full,  // max_queued checks were already waiting
    deadline,    // the check waited max_wait without getting a thread
    stopped,     // the pool is stopping (shutdown)
  };
  static std::string_view to_string(Refusal refusal);  // "queue_full", "deadline", "stopped"

  // Starts the threads. With `metrics`, describes and keeps up to date
  // broker_password_checks_total{result}, broker_password_checks_running,
  // broker_password_checks_queued and broker_password_check_wait_seconds; `metrics` must outlive
  // the pool.
  explicit PasswordCheckPool(PasswordCheckOptions options = {}, common::Metrics* metrics = nullptr);
  ~PasswordCheckPool();  // stop()
  PasswordCheckPool(const PasswordCheckPool&) = delete;
  PasswordCheckPool& operator=(const PasswordCheckPool&) = delete;

  // Exactly one of `job` and `refused` is called, once: `job` on a pool thread when one is free;
  // `refused` instead on this thread (queue_full, stopped) or on a pool thread (deadline: the
  // job waited too long). Neither may throw; neither is called with the pool's lock held.
  void submit(std::function<void()> job, std::function<void(Refusal)> refused);

  // Refuses the queued checks (stopped), lets the running ones finish, joins the threads; later
  // submits are refused at once. Idempotent; not from a pool thread.
  void stop();

  int threads() const { return static_cast<int>(threads_.size()); }
  std::size_t queued() const;

 private:
  struct Waiting {
    std::function<void()> job;
    std::function<void(Refusal)> refused;
    std::chrono::steady_clock::time_point since;
  };
  std::chrono::steady_clock::time_point now() const;
  void run();
  void publish_locked();  // requires mutex_: the gauges

  const PasswordCheckOptions options_;
  common::Metrics* const metrics_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Waiting> queue_;  // guarded by mutex_
  int running_ = 0;            // guarded by mutex_
  bool stopping_ = false;      // guarded by mutex_
  std::vector<std::thread> threads_;
};

}  // namespace identity
