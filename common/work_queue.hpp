// common/work_queue.hpp: a fixed pool of threads for blocking work (SQLite, password hashing,
// hypervisor calls), so the I/O threads never block. Tasks run in FIFO order; with one thread
// they also run one at a time.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace common {

class WorkQueue {
 public:
  explicit WorkQueue(int threads = 1);
  ~WorkQueue();  // stop(): runs what is queued, then joins
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  // Queues a task. Returns false (and drops the task) once stop() has begun.
  bool post(std::function<void()> task);
  // Runs every task already queued, then joins the threads. Idempotent.
  void stop();

 private:
  void run();

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;  // guarded by mutex_
  bool stopping_ = false;                    // guarded by mutex_
  std::vector<std::thread> threads_;
};

}  // namespace common
