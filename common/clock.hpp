// common/clock.hpp: the time source. Everything that reasons about time takes a Clock&, so
// tests can use ManualClock instead of sleeping.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

namespace common {

using SysTime = std::chrono::system_clock::time_point;

class Clock {
 public:
  virtual ~Clock() = default;
  virtual SysTime now() const = 0;
};

class SystemClock final : public Clock {
 public:
  SysTime now() const override { return std::chrono::system_clock::now(); }
};

// A clock that moves only when told to. Thread-safe.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(SysTime start = SysTime{}) : ns_(start.time_since_epoch().count()) {}
  SysTime now() const override { return SysTime{SysTime::duration{ns_.load()}}; }
  void advance(std::chrono::nanoseconds d) {
    ns_ += std::chrono::duration_cast<SysTime::duration>(d).count();
  }
  void set(SysTime t) { ns_ = t.time_since_epoch().count(); }

 private:
  std::atomic<SysTime::rep> ns_;
};

// RFC 3339 UTC with milliseconds, e.g. "2026-11-23T10:42:55.123Z"; the form used in the
// database, the admin API and logs.
std::string format_time(SysTime t);
// Parses the form above (milliseconds optional). Returns false on malformed input.
bool parse_time(const std::string& text, SysTime& out);

}  // namespace common
