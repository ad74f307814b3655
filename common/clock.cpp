#include "common/clock.hpp"

#include <algorithm>
#include <cstdio>
#include <ctime>

namespace common {

SysTime Clock::monotonic_now() const {
  const auto wall = now();
  const auto steady_now = steady();
  std::lock_guard lock(mutex_);
  SysTime reading = wall;
  if (anchored_) {
    const auto moved = std::chrono::duration_cast<SysTime::duration>(steady_now - last_steady_);
    reading = std::max(wall, last_ + std::max(SysTime::duration::zero(), moved));
  }
  anchored_ = true;
  last_ = reading;
  last_steady_ = steady_now;
  return reading;
}

std::string format_time(SysTime t) {
  using namespace std::chrono;
  const auto ms = duration_cast<milliseconds>(t.time_since_epoch()).count();
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  long frac = static_cast<long>(ms % 1000);
  if (frac < 0) {
    frac += 1000;
    --secs;
  }
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[96];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, frac);
  return buf;
}

bool parse_time(const std::string& text, SysTime& out) {
  int y, mo, d, h, mi, s;
  int consumed = 0;
  if (std::sscanf(text.c_str(), "%4d-%2d-%2dT%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &s, &consumed) != 6) return false;
  long ms = 0;
  const char* rest = text.c_str() + consumed;
  if (*rest == '.') {
    ++rest;
    int digits = 0;
    while (*rest >= '0' && *rest <= '9') {
      if (digits < 3) ms = ms * 10 + (*rest - '0');
      ++digits;
      ++rest;
    }
    if (digits == 0) return false;
    for (; digits < 3; ++digits) ms *= 10;
  }
  if (*rest != 'Z' || rest[1] != '\0') return false;
  std::tm tm{};
  tm.tm_year = y - 1900;
  tm.tm_mon = mo - 1;
  tm.tm_mday = d;
  tm.tm_hour = h;
  tm.tm_min = mi;
  tm.tm_sec = s;
  const std::time_t secs = timegm(&tm);
  out = SysTime{std::chrono::seconds{secs} + std::chrono::milliseconds{ms}};
  return true;
}

}  // namespace common
