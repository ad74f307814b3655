// power/schedule.hpp: time zones, power time schemes and the pool policy of single-session
// delivery groups (site-model-reference 2.3, 2.8 and 3; docs/power.md "Power time schemes and
// pool policy").
//
// Three layers, each usable alone:
//   * TimeZone / TimeZoneDb: UTC -> local civil time in an IANA zone, read from the system's TZif
//     files (tzdata). libstdc++ 12 has no std::chrono::tzdb, and setenv("TZ") + localtime_r is
//     process-global state: neither is used.
//   * TimeScheme + evaluate(): which scheme is in force at an instant, whether it is peak, and the
//     pool size of that hour, in the group's time zone.
//   * plan_pool(): the pool-policy decision as a pure function of the group's settings, the
//     schedule now and the group's machines: the power actions to issue. The caller (the broker's
//     periodic reconciler) gathers the inputs and queues the actions; nothing here does I/O
//     except TimeZoneDb reading zone files.
#pragma once

#include "common/clock.hpp"
#include "common/error.hpp"
#include "common/model.hpp"
#include "power/driver.hpp"

#include <array>
#include <bitset>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace power {

// ---------------------------------------------------------------------------------------------
// Time zones

// A wall-clock reading in some zone.
struct LocalTime {
  int year = 1970;
  int month = 1;  // 1..12
  int day = 1;    // 1..31
  int hour = 0;   // 0..23
  int minute = 0;
  int second = 0;
  int weekday = 4;                  // 0 = Sunday .. 6 = Saturday (1970-01-01 was a Thursday)
  std::int32_t utc_offset = 0;      // seconds east of UTC: local = UTC + utc_offset
  bool dst = false;                 // daylight-saving (summer) time is in effect
  std::string abbreviation = "UTC"; // "GMT", "BST", "EDT", "IST", "+0530", ...
};
// "2026-03-29 02:00:00 BST (+01:00)"
std::string to_string(const LocalTime& t);

// One zone's rules: the transitions table of its TZif file plus the POSIX TZ rule of the file's
// footer for instants after the table (version 2+ files; "slim" files from tzdata 2020b on keep
// only a few transitions and rely on the footer). Immutable once built: to_local() may be called
// from any thread.
//
// Limits: leap-second ("right/...") zones are refused; instants before the first transition use
// the zone's first time type (local mean time for most zones), as RFC 8536 says; times are whole
// seconds.
class TimeZone {
 public:
  // UTC, built in (needs no file).
  TimeZone();

  // Parses TZif data (RFC 8536, versions 1 to 4). `name` is used in messages and name().
  // Fails with invalid_argument naming the problem (bad magic, truncated data, unsorted
  // transitions, bad indexes, leap seconds, unparsable footer). Never throws on bad input.
  static common::Result<TimeZone> from_tzif(std::string name, std::string_view data);
  // A zone given by a POSIX TZ string only, e.g. "EST5EDT,M3.2.0,M11.1.0" or "<+0530>-5:30".
  static common::Result<TimeZone> from_posix(std::string name, std::string_view tz);

  const std::string& name() const { return name_; }
  LocalTime to_local(common::SysTime t) const;

  // The rules' representation (public for the implementation's helpers; not for callers).
  struct Type {
    std::int32_t offset = 0;  // seconds east of UTC
    bool dst = false;
    std::string abbreviation;
  };
  struct Rule {  // when DST starts or ends, in local time (POSIX "Jn", "n" or "Mm.w.d" plus "/time")
    enum class Form { julian, zero_based, month_week_day } form = Form::month_week_day;
    int day = 0;    // Jn: 1..365 (Feb 29 never counted); n: 0..365
    int month = 0;  // Mm.w.d: 1..12
    int week = 0;   //         1..5 (5: the last)
    int weekday = 0;  //       0 = Sunday .. 6
    std::int32_t time = 7200;  // seconds after local midnight (may be negative or beyond 24 h)
  };
  struct Posix {
    Type standard;
    std::optional<Type> daylight;
    Rule start, end;
  };

 private:
  Type type_at(std::int64_t utc_seconds) const;

  std::string name_ = "UTC";
  std::vector<std::int64_t> transitions_;    // UTC seconds, ascending
  std::vector<std::uint8_t> transition_types_;  // index into types_ for each transition
  std::vector<Type> types_;                  // at least one
  std::optional<Posix> footer_;              // for instants after the last transition
};

// Loads zones by IANA name ("Europe/London") from a zoneinfo directory and caches them: each zone
// is read once per TimeZoneDb. Thread-safe. "UTC" and "Etc/UTC" are built in and need no file, so
// groups left at the default time zone work without tzdata.
class TimeZoneDb {
 public:
  // The zoneinfo directory: $TZDIR when set, else /usr/share/zoneinfo (Debian's tzdata package).
  static std::string default_directory();

  explicit TimeZoneDb(std::string directory = default_directory());

  // The zone, or an error: invalid_argument for a malformed name ("../x", empty, odd characters)
  // or a malformed file, not_found for a zone that does not exist ("unknown time zone
  // 'Mars/Olympus' (no file /usr/share/zoneinfo/Mars/Olympus; is the tzdata package
  // installed?)"). Failures are not cached: installing tzdata later fixes them.
  common::Result<std::shared_ptr<const TimeZone>> find(std::string_view name);

  const std::string& directory() const { return directory_; }

 private:
  std::string directory_;
  std::mutex mutex_;
  std::map<std::string, std::shared_ptr<const TimeZone>, std::less<>> zones_;  // guarded by mutex_
};

// ---------------------------------------------------------------------------------------------
// Power time schemes (the power_time_scheme kind of common/model.cpp)

struct TimeScheme {
  std::string name;
  std::bitset<7> days;              // bit w: applies on weekday w (0 = Sunday .. 6 = Saturday)
  std::array<bool, 24> peak{};      // peak[h]: the wall-clock hour h:00-h:59 is peak
  std::array<int, 24> pool_size{};  // machines to keep on in hour h; -1: no pool management
  bool pool_using_percentage = false;  // pool_size is a percentage (0..100) of the group's machines
  bool enabled = true;
  TimeScheme() { pool_size.fill(-1); }
};

// "Monday" .. "Sunday", "Weekdays" (Monday to Friday), "Weekend" (Saturday and Sunday); the
// spellings of the Broker SDK, case-sensitive. Fails (invalid_argument, field days_of_week) on an
// unknown name or an empty list.
common::Result<std::bitset<7>> parse_days(const common::model::TextList& days);

// A power_time_scheme object as a TimeScheme. Fails (invalid_argument naming the field) when the
// object does not pass common::model::validate_fields or is not a power_time_scheme.
common::Result<TimeScheme> scheme_from_object(const common::model::Object& scheme);

// The schemes (power_time_scheme objects) of one delivery group, parsed; disabled ones included
// (evaluate() skips them). Fails on the first malformed one.
common::Result<std::vector<TimeScheme>> schemes_for_group(std::span<const common::model::Object> schemes,
                                                          std::string_view delivery_group);

// The schedule of a group at one instant.
struct ScheduleNow {
  LocalTime local;        // the instant in the group's time zone
  std::string scheme;     // the scheme in force; empty when no enabled scheme covers the day
  bool peak = false;      // the hour is a peak hour of that scheme (false without a scheme)
  int pool_size = -1;     // that hour's pool size; -1: no pool management now
  bool pool_using_percentage = false;
};

// The scheme in force at `local`: the first enabled scheme, in name order, whose days include
// local.weekday (schemes of one group must not overlap days; the config loader and the admin API refuse that). The
// hour is the wall-clock hour: on the day DST starts the skipped hour's settings never apply (at
// Europe/London 2026-03-29 01:00 UTC the reading jumps from hour 0 to hour 2); on the day it ends
// the repeated hour's settings apply for two real hours.
ScheduleNow evaluate(std::span<const TimeScheme> schemes, const LocalTime& local);
ScheduleNow evaluate(std::span<const TimeScheme> schemes, const TimeZone& zone, common::SysTime now);

// ---------------------------------------------------------------------------------------------
// Pool policy

// The delivery group settings the policy reads.
struct GroupPolicy {
  bool single_session = true;  // only single-session groups are power-managed by the policy
  bool shared = true;          // pool size and buffers apply to Shared (pooled) groups only
  bool in_maintenance = false; // a group in maintenance mode is left alone entirely
  int peak_buffer_percent = 0;
  int off_peak_buffer_percent = 0;
  bool shutdown_after_use = false;
  std::chrono::seconds settlement_before_auto_shutdown{0};
  // Private groups: assigned machines start at the start of peak and stop at the start of
  // off-peak; with this also any assigned machine found off during peak is started again.
  bool power_on_assigned_during_peak = false;
};
// From a delivery_group object (session_support, desktop_kind, in_maintenance_mode,
// peak_/off_peak_buffer_size_percent, shutdown_desktops_after_use,
// settlement_period_before_auto_shutdown_seconds, automatic_power_on_for_assigned_during_peak).
GroupPolicy group_policy(const common::model::Object& delivery_group);

// One machine of the group as the policy sees it. The caller fills it from the machine object,
// its sessions, its assignments and the power-action queue.
struct PoolMachine {
  std::string name;
  PowerState power = PowerState::unknown;
  bool registered = false;
  int sessions = 0;            // pending plus established sessions, including a launch waiting for it
  bool assigned = false;       // has an assignment (assigned machines are never pooled)
  bool in_maintenance = false; // excluded from automatic power management
  // An action queued or running for it (power_action state Pending or Started): the machine is
  // left alone and counted as the action will leave it.
  std::optional<Action> pending;
  // When its last session ended, if it has hosted a session since it was last powered on;
  // nullopt when it has not been used since (or has sessions now). Drives ShutdownDesktopsAfterUse
  // and the settlement period before automatic shutdown.
  std::optional<common::SysTime> last_session_end;
};
// name, power_state and in_maintenance_mode of a stored machine object, with its live
// registration and session count (the engine's: storage does not hold them); assigned, pending
// and last_session_end are left for the caller.
PoolMachine pool_machine(const common::model::Object& machine, bool registered, int sessions);
// A stored power_state spelling ("On", "Off", ...) as a PowerState; unknown for anything else
// ("Unmanaged" included: not the pool policy's to manage).
PowerState power_state_from(std::string_view power_state);

inline constexpr std::string_view kReasonIdlePool = "IdlePool";  // pool size and buffer
inline constexpr std::string_view kReasonPolicy = "Policy";      // shutdown after use
inline constexpr std::string_view kReasonSchedule = "Schedule";  // private groups at peak changes

struct PlannedAction {
  std::string machine;
  Action action = Action::turn_on;  // turn_on, resume (a suspended machine) or shutdown
  std::string_view reason;          // power_action.reason: kReasonIdlePool, kReasonPolicy or kReasonSchedule
  std::string detail;               // one line for logs and the audit log
};

struct PoolPlan {
  bool managed = false;  // false: the group is not power-managed (multi-session, in maintenance)
  bool peak = false;
  int pool_target = -1;     // machines the pool size asks for now (-1: not managed this hour)
  int buffer_target = 0;    // idle unassigned machines the buffer asks for
  int on = 0;               // machines counted as on before the plan (see docs/power.md)
  int in_use = 0;           // machines with sessions
  int idle_unassigned_on = 0;
  std::vector<PlannedAction> actions;  // shutdowns after use first, then power-ons, then shutdowns
  // The earliest future instant at which a settlement period ends and the plan would change
  // (the reconciler may wake up then instead of waiting for its next period).
  std::optional<common::SysTime> recheck_at;
};

// The power actions that bring the group's machines to the policy now. Pure and deterministic:
// machines are considered in name order, power-ons take the lowest names, shutdowns the highest.
//
// Private groups: `was_peak` is whether the previous evaluation (the reconciler's last pass) was
// at peak, nullopt when unknown (the first pass after a start). When peak has just begun every
// assigned machine that is off is started (reason Schedule); when off-peak has just begun every
// idle assigned machine is shut down; during peak with power_on_assigned_during_peak, assigned
// machines found off are started again.
//
// Never: acts on a machine in maintenance mode, with sessions, with an action pending, or with an
// unknown power state; shuts down a machine before its settlement period (after its last
// session) has passed; shuts down an idle unregistered machine for being in excess (it may be
// booting for a launch). The rules, and how pool size and buffer combine, are in docs/power.md.
PoolPlan plan_pool(const GroupPolicy& group, const ScheduleNow& schedule, std::span<const PoolMachine> machines,
                   common::SysTime now, std::optional<bool> was_peak = std::nullopt);

}  // namespace power
