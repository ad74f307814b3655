#include "xmlservice/logon_throttle.hpp"

#include "common/clock.hpp"

#include <doctest/doctest.h>

using xmlservice::LogonThrottle;
using namespace std::chrono_literals;

TEST_CASE("a source gets N failures, then one more every 60/N seconds") {
  common::ManualClock clock;
  LogonThrottle t(6, 100, clock);
  for (int i = 0; i < 6; ++i) {
    CHECK(t.allowed("10.0.0.1"));
    t.failed("10.0.0.1");
  }
  CHECK_FALSE(t.allowed("10.0.0.1"));
  CHECK(t.allowed("10.0.0.2"));  // per source
  clock.advance(9s);
  CHECK_FALSE(t.allowed("10.0.0.1"));
  clock.advance(1s);  // 10 s: one failure's worth
  CHECK(t.allowed("10.0.0.1"));
  t.failed("10.0.0.1");
  CHECK_FALSE(t.allowed("10.0.0.1"));
  clock.advance(60s);
  for (int i = 0; i < 6; ++i) {
    CHECK(t.allowed("10.0.0.1"));
    t.failed("10.0.0.1");
  }
  CHECK_FALSE(t.allowed("10.0.0.1"));
}

TEST_CASE("0 failures per minute: never throttled") {
  common::ManualClock clock;
  LogonThrottle t(0, 100, clock);
  for (int i = 0; i < 1000; ++i) t.failed("10.0.0.1");
  CHECK(t.allowed("10.0.0.1"));
  CHECK(t.tracked() == 0);
}

TEST_CASE("the number of sources tracked is bounded; throttled ones are kept") {
  common::ManualClock clock;
  LogonThrottle t(2, 10, clock);
  t.failed("10.0.0.1");
  t.failed("10.0.0.1");
  CHECK_FALSE(t.allowed("10.0.0.1"));
  for (int i = 0; i < 1000; ++i) t.failed("10.1." + std::to_string(i / 256) + "." + std::to_string(i % 256));
  CHECK(t.tracked() <= 10);
  CHECK_FALSE(t.allowed("10.0.0.1"));
}

TEST_CASE("the source: the peer, a trusted front end's ClientAddress, IPv6 by /64") {
  CHECK(LogonThrottle::source_of("10.0.0.5", false, "192.168.1.7") == "10.0.0.5");
  CHECK(LogonThrottle::source_of("10.0.0.5", true, "192.168.1.7") == "192.168.1.7");
  CHECK(LogonThrottle::source_of("10.0.0.5", true, "") == "10.0.0.5");
  CHECK(LogonThrottle::source_of("10.0.0.5", true, "not an address") == "10.0.0.5");
  CHECK(LogonThrottle::source_of("2001:db8:1:2:aaaa:bbbb:cccc:dddd", false, "") == "2001:db8:1:2::/64");
  CHECK(LogonThrottle::source_of("2001:db8:1:2::99", false, "") == "2001:db8:1:2::/64");
  CHECK(LogonThrottle::source_of("::ffff:10.0.0.5", false, "") == "::ffff:10.0.0.5");
}
