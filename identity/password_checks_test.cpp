#include "identity/password_checks.hpp"

#include "common/metrics.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <optional>
#include <vector>

using identity::PasswordCheckOptions;
using identity::PasswordCheckPool;
using Refusal = PasswordCheckPool::Refusal;

namespace {

// A gate the jobs wait on, so the tests decide when a "hash" finishes.
struct Gate {
  std::promise<void> open_promise;
  std::shared_future<void> opened = open_promise.get_future().share();
  void open() { open_promise.set_value(); }
};

// A job that reports it started, then waits for the gate.
std::function<void()> blocking_job(Gate& gate, std::promise<void>& started) {
  return [&gate, &started] {
    started.set_value();
    gate.opened.wait();
  };
}

}  // namespace

TEST_CASE("at most `threads` checks run at once; the others wait their turn") {
  PasswordCheckOptions o;
  o.threads = 2;
  o.max_queued = 100;
  o.max_wait = std::chrono::hours(1);
  PasswordCheckPool pool(o);
  CHECK(pool.threads() == 2);

  Gate gate;
  std::atomic<int> running{0}, peak{0}, done{0};
  std::vector<std::promise<void>> finished(10);
  for (int i = 0; i < 10; ++i) {
    pool.submit(
        [&, i] {
          const int now = ++running;
          int p = peak.load();
          while (now > p && !peak.compare_exchange_weak(p, now)) {
          }
          gate.opened.wait();
          --running;
          ++done;
          finished[static_cast<std::size_t>(i)].set_value();
        },
        [](Refusal) { FAIL("refused"); });
  }
  gate.open();
  for (auto& f : finished) f.get_future().wait();
  CHECK(done == 10);
  CHECK(peak <= 2);
}

TEST_CASE("a full queue refuses at once, on the submitting thread") {
  PasswordCheckOptions o;
  o.threads = 1;
  o.max_queued = 2;
  o.max_wait = std::chrono::hours(1);
  common::Metrics metrics;
  PasswordCheckPool pool(o, &metrics);
  Gate gate;
  std::promise<void> started;
  pool.submit(blocking_job(gate, started), [](Refusal) { FAIL("refused"); });
  started.get_future().wait();  // the one thread is busy

  std::promise<void> first, second;
  pool.submit([&] { first.set_value(); }, [](Refusal r) { FAIL("refused: " << PasswordCheckPool::to_string(r)); });
  pool.submit([&] { second.set_value(); }, [](Refusal r) { FAIL("refused: " << PasswordCheckPool::to_string(r)); });
  CHECK(pool.queued() == 2);
  std::optional<Refusal> refusal;
  pool.submit([] { FAIL("ran"); }, [&](Refusal r) { refusal = r; });
  REQUIRE(refusal.has_value());  // answered before submit returned
  CHECK(*refusal == Refusal::queue_full);
  CHECK(metrics.render().find("broker_password_checks_total{result=\"queue_full\"} 1") != std::string::npos);
  CHECK(metrics.render().find("broker_password_checks_queued 2") != std::string::npos);

  gate.open();
  first.get_future().wait();
  second.get_future().wait();
}

TEST_CASE("a check that waited past max_wait is refused instead of run") {
  std::atomic<std::int64_t> now_ms{0};
  PasswordCheckOptions o;
  o.threads = 1;
  o.max_queued = 10;
  o.max_wait = std::chrono::milliseconds(500);
  o.now = [&] { return std::chrono::steady_clock::time_point(std::chrono::milliseconds(now_ms.load())); };
  PasswordCheckPool pool(o);
  Gate gate;
  std::promise<void> started;
  pool.submit(blocking_job(gate, started), [](Refusal) { FAIL("refused"); });
  started.get_future().wait();

  std::promise<Refusal> late;
  pool.submit([] { FAIL("ran"); }, [&](Refusal r) { late.set_value(r); });  // queued at 0 ms
  now_ms = 400;
  std::promise<void> in_time;
  pool.submit([&] { in_time.set_value(); }, [](Refusal) { FAIL("refused"); });  // queued at 400 ms
  now_ms = 800;  // the first waited 800 ms, the second 400 ms
  gate.open();
  CHECK(late.get_future().get() == Refusal::deadline);
  in_time.get_future().wait();
}

TEST_CASE("stop refuses what is queued and everything after") {
  PasswordCheckOptions o;
  o.threads = 1;
  o.max_wait = std::chrono::hours(1);
  PasswordCheckPool pool(o);
  Gate gate;
  std::promise<void> started;
  pool.submit(blocking_job(gate, started), [](Refusal) { FAIL("refused"); });
  started.get_future().wait();
  std::promise<Refusal> queued;
  pool.submit([] { FAIL("ran"); }, [&](Refusal r) { queued.set_value(r); });
  auto stopping = std::async(std::launch::async, [&] { pool.stop(); });
  CHECK(queued.get_future().get() == Refusal::stopped);
  gate.open();
  stopping.get();
  std::optional<Refusal> after;
  pool.submit([] { FAIL("ran"); }, [&](Refusal r) { after = r; });
  CHECK(after == Refusal::stopped);
}
