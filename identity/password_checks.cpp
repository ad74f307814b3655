#include "identity/password_checks.hpp"

#include "common/metrics.hpp"

#include <algorithm>

namespace identity {

namespace {
int default_threads() { return std::max(1, static_cast<int>(std::thread::hardware_concurrency())); }
}  // namespace

std::string_view PasswordCheckPool::to_string(Refusal refusal) {
  switch (refusal) {
    case Refusal::queue_full: return "queue_full";
    case Refusal::deadline: return "deadline";
    case Refusal::stopped: return "stopped";
  }
  return "?";
}

PasswordCheckPool::PasswordCheckPool(PasswordCheckOptions options, common::Metrics* metrics)
    : options_(std::move(options)), metrics_(metrics) {
  if (metrics_) {
    metrics_->describe("broker_password_checks_total", common::Metrics::Type::counter,
                       "Password checks (hashes) by result: run, or refused (queue_full, deadline, stopped).");
    metrics_->describe("broker_password_checks_running", common::Metrics::Type::gauge,
                       "Password hashes being computed now.");
    metrics_->describe("broker_password_checks_queued", common::Metrics::Type::gauge,
                       "Password checks waiting for a hashing thread.");
    metrics_->describe("broker_password_check_wait_seconds", common::Metrics::Type::histogram,
                       "Time a password check waited for a hashing thread.");
    metrics_->set("broker_password_checks_running", {}, 0);
    metrics_->set("broker_password_checks_queued", {}, 0);
  }
  const int n = options_.threads > 0 ? options_.threads : default_threads();
  threads_.reserve(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) threads_.emplace_back([this] { run(); });
}

PasswordCheckPool::~PasswordCheckPool() { stop(); }

std::chrono::steady_clock::time_point PasswordCheckPool::now() const {
  return options_.now ? options_.now() : std::chrono::steady_clock::now();
}

std::size_t PasswordCheckPool::queued() const {
  std::lock_guard lock(mutex_);
  return queue_.size();
}

void PasswordCheckPool::publish_locked() {
  if (!metrics_) return;
  metrics_->set("broker_password_checks_running", {}, running_);
  metrics_->set("broker_password_checks_queued", {}, static_cast<double>(queue_.size()));
}

void PasswordCheckPool::submit(std::function<void()> job, std::function<void(Refusal)> refused) {
  std::optional<Refusal> refusal;
  {
    std::lock_guard lock(mutex_);
    if (stopping_) {
      refusal = Refusal::stopped;
    } else if (queue_.size() >= options_.max_queued) {
      refusal = Refusal::queue_full;
    } else {
      queue_.push_back(Waiting{std::move(job), std::move(refused), now()});
      publish_locked();
    }
  }
  if (refusal) {
    if (metrics_) metrics_->add("broker_password_checks_total", {{"result", std::string(to_string(*refusal))}});
    refused(*refusal);
    return;
  }
  cv_.notify_one();
}

void PasswordCheckPool::stop() {
  std::deque<Waiting> dropped;
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
    dropped.swap(queue_);
    publish_locked();
  }
  cv_.notify_all();
  for (auto& w : dropped) {
    if (metrics_) metrics_->add("broker_password_checks_total", {{"result", "stopped"}});
    w.refused(Refusal::stopped);
  }
  for (auto& t : threads_)
    if (t.joinable() && t.get_id() != std::this_thread::get_id()) t.join();
}

void PasswordCheckPool::run() {
  for (;;) {
    Waiting w;
    bool late = false;
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping
      w = std::move(queue_.front());
      queue_.pop_front();
      const auto waited = now() - w.since;
      late = waited > options_.max_wait;
      if (!late) ++running_;
      publish_locked();
      if (metrics_) metrics_->observe("broker_password_check_wait_seconds", {}, std::chrono::duration<double>(waited).count());
    }
    if (late) {
      if (metrics_) metrics_->add("broker_password_checks_total", {{"result", "deadline"}});
      w.refused(Refusal::deadline);
      continue;
    }
    w.job();
    {
      std::lock_guard lock(mutex_);
      --running_;
      publish_locked();
    }
    if (metrics_) metrics_->add("broker_password_checks_total", {{"result", "run"}});
  }
}

}  // namespace identity
