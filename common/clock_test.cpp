#include "common/clock.hpp"

#include <doctest/doctest.h>

using namespace std::chrono_literals;

TEST_CASE("clock: monotonic_now() follows the wall clock forwards and ignores jumps backwards") {
  const common::SysTime start = common::SysTime{} + 1000h;
  common::ManualClock clock(start);
  CHECK(clock.monotonic_now() == start);
  clock.advance(10s);  // both clocks move
  CHECK(clock.monotonic_now() == start + 10s);
  CHECK(clock.now() == start + 10s);

  clock.jump(-1h);  // the wall clock is set back: the monotonic reading does not go back
  CHECK(clock.now() == start + 10s - 1h);
  CHECK(clock.monotonic_now() == start + 10s);
  clock.advance(5s);  // and goes on with the monotonic clock
  CHECK(clock.monotonic_now() == start + 15s);

  clock.jump(2h);  // the wall clock jumps forwards, past the monotonic reading: caught up
  CHECK(clock.now() == start + 15s + 1h);
  CHECK(clock.monotonic_now() == start + 15s + 1h);
  clock.jump(-30min);  // back again: held
  CHECK(clock.monotonic_now() == start + 15s + 1h);
  clock.advance(1s);
  CHECK(clock.monotonic_now() == start + 16s + 1h);
}

TEST_CASE("clock: the system clock's monotonic reading never goes backwards") {
  common::SystemClock clock;
  auto last = clock.monotonic_now();
  for (int i = 0; i < 1000; ++i) {
    const auto next = clock.monotonic_now();
    CHECK(next >= last);
    last = next;
  }
}
