// common/clock.hpp: the time source. Everything that reasons about time takes a Clock&, so
// tests can use ManualClock instead of sleeping.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

namespace common {

using SysTime = std::chrono::system_clock::time_point;

// Two readings (docs/architecture.md "Time"):
// - now(): the wall clock. What is stored, shown and compared across restarts.
// - monotonic_now(): a wall-clock reading that never goes backwards while this Clock lives. It
//   moves with the monotonic clock (steady()), catches up with the wall clock when that jumps
//   forwards, and ignores jumps backwards. For lifetimes that setting the clock back must not
//   extend (logon tickets, lock-outs, cached credentials): a lifetime measured with it ends at
//   most its length after it began, by the monotonic clock; a forward jump can only shorten it.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual SysTime now() const = 0;
  // The monotonic clock: unaffected by changes of the wall clock.
  virtual std::chrono::steady_clock::time_point steady() const = 0;
  // max(the last reading + the monotonic time since, now()). Thread-safe.
  SysTime monotonic_now() const;

 private:
  mutable std::mutex mutex_;
  mutable bool anchored_ = false;                   // guarded by mutex_
  mutable SysTime last_{};                          // guarded by mutex_
  mutable std::chrono::steady_clock::time_point last_steady_{};  // guarded by mutex_
};

class SystemClock final : public Clock {
 public:
  SysTime now() const override { return std::chrono::system_clock::now(); }
  std::chrono::steady_clock::time_point steady() const override { return std::chrono::steady_clock::now(); }
};

// A clock that moves only when told to. Thread-safe. advance() moves both the wall clock and the
// monotonic clock; set() and jump() move only the wall clock (an administrator or NTP setting
// the time).
class ManualClock final : public Clock {
 public:
  explicit ManualClock(SysTime start = SysTime{}) : ns_(start.time_since_epoch().count()) {}
  SysTime now() const override { return SysTime{SysTime::duration{ns_.load()}}; }
  std::chrono::steady_clock::time_point steady() const override {
    return std::chrono::steady_clock::time_point{std::chrono::steady_clock::duration{steady_ns_.load()}};
  }
  void advance(std::chrono::nanoseconds d) {
    ns_ += std::chrono::duration_cast<SysTime::duration>(d).count();
    steady_ns_ += std::chrono::duration_cast<std::chrono::steady_clock::duration>(d).count();
  }
  void set(SysTime t) { ns_ = t.time_since_epoch().count(); }
  // The wall clock jumps by d (negative: backwards); the monotonic clock does not move.
  void jump(std::chrono::nanoseconds d) { ns_ += std::chrono::duration_cast<SysTime::duration>(d).count(); }

 private:
  std::atomic<SysTime::rep> ns_;
  std::atomic<std::chrono::steady_clock::rep> steady_ns_{0};
};

// RFC 3339 UTC with milliseconds, e.g. "2026-11-23T10:42:55.123Z"; the form used in the
// database, the admin API and logs.
std::string format_time(SysTime t);
// Parses the form above (milliseconds optional). Returns false on malformed input.
bool parse_time(const std::string& text, SysTime& out);

}  // namespace common
