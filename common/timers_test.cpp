#include "common/timers.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <future>
#include <mutex>
#include <vector>

using namespace std::chrono_literals;

TEST_CASE("timers run once, in deadline order, and can be cancelled") {
  common::Timers timers;
  std::mutex m;
  std::vector<int> order;
  std::promise<void> all;
  auto add = [&](int v) {
    std::lock_guard lock(m);
    order.push_back(v);
    if (order.size() == 3) all.set_value();
  };
  timers.after(60ms, [&] { add(3); });
  timers.after(0ms, [&] { add(1); });
  const auto dropped = timers.after(20ms, [&] { add(99); });
  timers.after(30ms, [&] { add(2); });
  CHECK(timers.cancel(dropped));
  CHECK_FALSE(timers.cancel(dropped));
  all.get_future().wait();
  std::lock_guard lock(m);
  CHECK(order == std::vector<int>{1, 2, 3});
}

TEST_CASE("a run timer cannot be cancelled; stop drops the rest and refuses new ones") {
  common::Timers timers;
  std::promise<void> ran;
  const auto id = timers.after(0ms, [&] { ran.set_value(); });
  ran.get_future().wait();
  CHECK_FALSE(timers.cancel(id));
  std::atomic<bool> late{false};
  timers.after(1h, [&] { late = true; });
  timers.stop();
  CHECK(timers.after(0ms, [&] { late = true; }) == 0);
  CHECK_FALSE(late.load());
}

TEST_CASE("the manual scheduler runs what falls due when the test moves time, in order") {
  common::ManualScheduler timers;
  std::vector<int> ran;
  timers.after(std::chrono::seconds(2), [&] { ran.push_back(2); });
  const auto one = timers.after(std::chrono::seconds(1), [&] { ran.push_back(1); });
  const auto three = timers.after(std::chrono::seconds(3), [&] {
    ran.push_back(3);
    timers.after(std::chrono::seconds(1), [&] { ran.push_back(4); });  // re-armed from a callback
  });
  CHECK(timers.pending() == 3);
  timers.advance(std::chrono::milliseconds(999));
  CHECK(ran.empty());
  timers.advance(std::chrono::milliseconds(1));
  CHECK(ran == std::vector<int>{1});
  CHECK_FALSE(timers.cancel(one));  // has run
  timers.advance(std::chrono::seconds(5));
  CHECK(ran == std::vector<int>{1, 2, 3, 4});
  CHECK_FALSE(timers.cancel(three));
  const auto dropped = timers.after(std::chrono::seconds(1), [&] { ran.push_back(5); });
  CHECK(timers.cancel(dropped));
  timers.advance(std::chrono::seconds(2));
  CHECK(ran.size() == 4);
  CHECK(timers.pending() == 0);
}
