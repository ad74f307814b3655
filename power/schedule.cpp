// power/schedule.cpp: see schedule.hpp.
#include "power/schedule.hpp"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <system_error>
#include <utility>

namespace power {

using common::errc;
using common::Error;
namespace chr = std::chrono;
namespace model = common::model;

namespace {

constexpr std::int64_t kDay = 86400;
constexpr std::size_t kMaxZoneFileBytes = 1024 * 1024;  // real files are a few KiB
// RFC 8536: utoff should be in -89999..93599 (just under -25 h .. +26 h).
constexpr std::int32_t kMinOffset = -89999, kMaxOffset = 93599;

std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  std::int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

chr::sys_days days_from_civil(int y, unsigned m, unsigned d) {
  return chr::sys_days{chr::year{y} / chr::month{m} / chr::day{d}};
}

bool is_leap(int y) { return chr::year{y}.is_leap(); }

int year_of(std::int64_t local_seconds) {
  const chr::sys_days d{chr::days{floor_div(local_seconds, kDay)}};
  return static_cast<int>(chr::year_month_day{d}.year());
}

// ---------------------------------------------------------------------------------------------
// POSIX TZ strings (the TZif footer): std offset [dst [offset] [,start[/time],end[/time]]]

class PosixParser {
 public:
  explicit PosixParser(std::string_view s) : s_(s) {}

  bool parse(TimeZone::Posix& out) {
    std::string name;
    std::int32_t offset = 0;
    if (!parse_name(name) || !parse_offset(offset, 24)) return false;
    out.standard = {-offset, false, name};
    if (at_end()) return true;
    TimeZone::Type dst;
    if (!parse_name(dst.abbreviation)) return false;
    dst.dst = true;
    dst.offset = out.standard.offset + 3600;
    if (!at_end() && peek() != ',') {
      if (!parse_offset(offset, 24)) return false;
      dst.offset = -offset;
    }
    out.daylight = dst;
    if (at_end()) {  // POSIX leaves the rules to the implementation; glibc and tzcode use the US ones
      out.start = {TimeZone::Rule::Form::month_week_day, 0, 3, 2, 0, 7200};
      out.end = {TimeZone::Rule::Form::month_week_day, 0, 11, 1, 0, 7200};
      return true;
    }
    if (!eat(',') || !parse_rule(out.start) || !eat(',') || !parse_rule(out.end)) return false;
    return at_end();
  }

 private:
  bool at_end() const { return i_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[i_]; }
  bool eat(char c) {
    if (peek() != c) return false;
    ++i_;
    return true;
  }
  static bool alpha(char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }
  static bool digit(char c) { return c >= '0' && c <= '9'; }

  bool parse_name(std::string& out) {
    out.clear();
    if (eat('<')) {
      while (!at_end() && peek() != '>') {
        const char c = peek();
        if (!alpha(c) && !digit(c) && c != '+' && c != '-') return false;
        out += c;
        ++i_;
      }
      return eat('>') && !out.empty();
    }
    while (alpha(peek())) out += s_[i_++];
    return out.size() >= 3;
  }

  bool number(int& out, int max_digits) {
    int n = 0, digits = 0;
    while (digit(peek()) && digits < max_digits) {
      n = n * 10 + (s_[i_++] - '0');
      ++digits;
    }
    out = n;
    return digits > 0;
  }

  // [+-]hh[:mm[:ss]] with hh <= max_hours; the value as written (POSIX: west of UTC is positive).
  bool parse_offset(std::int32_t& out, int max_hours) {
    int sign = 1;
    if (eat('-'))
      sign = -1;
    else
      eat('+');
    int h = 0, m = 0, sec = 0;
    if (!number(h, 3) || h > max_hours) return false;
    if (eat(':')) {
      if (!number(m, 2) || m > 59) return false;
      if (eat(':') && (!number(sec, 2) || sec > 59)) return false;
    }
    out = sign * (h * 3600 + m * 60 + sec);
    return true;
  }

  bool parse_rule(TimeZone::Rule& r) {
    using Form = TimeZone::Rule::Form;
    if (eat('J')) {
      r.form = Form::julian;
      if (!number(r.day, 3) || r.day < 1 || r.day > 365) return false;
    } else if (eat('M')) {
      r.form = Form::month_week_day;
      if (!number(r.month, 2) || r.month < 1 || r.month > 12 || !eat('.') || !number(r.week, 1) || r.week < 1 ||
          r.week > 5 || !eat('.') || !number(r.weekday, 1) || r.weekday > 6)
        return false;
    } else {
      r.form = Form::zero_based;
      if (!number(r.day, 3) || r.day > 365) return false;
    }
    r.time = 7200;
    if (eat('/')) return parse_offset(r.time, 167);  // RFC 8536 allows -167..167 hours here
    return true;
  }

  std::string_view s_;
  std::size_t i_ = 0;
};

// The local date of the rule in year y, as days since the epoch.
std::int64_t rule_day(const TimeZone::Rule& r, int y) {
  using Form = TimeZone::Rule::Form;
  const chr::sys_days jan1 = days_from_civil(y, 1, 1);
  switch (r.form) {
    case Form::julian: {  // 1..365, February 29 is never counted
      int n = r.day - 1;
      if (is_leap(y) && r.day >= 60) ++n;
      return (jan1 + chr::days{n}).time_since_epoch().count();
    }
    case Form::zero_based: return (jan1 + chr::days{r.day}).time_since_epoch().count();
    case Form::month_week_day: {
      const chr::sys_days first = days_from_civil(y, static_cast<unsigned>(r.month), 1);
      const int first_wd = static_cast<int>(chr::weekday{first}.c_encoding());
      int mday = 1 + (r.weekday - first_wd + 7) % 7 + (r.week - 1) * 7;
      const chr::year_month_day_last end_of_month{chr::year{y},
                                                  chr::month_day_last{chr::month{static_cast<unsigned>(r.month)}}};
      const int last = static_cast<int>(static_cast<unsigned>(end_of_month.day()));
      while (mday > last) mday -= 7;
      return (first + chr::days{mday - 1}).time_since_epoch().count();
    }
  }
  return jan1.time_since_epoch().count();
}

// The UTC instant of the rule in year y; `offset_before` is the offset in effect just before it
// (standard time for the start of DST, daylight time for its end).
std::int64_t rule_instant(const TimeZone::Rule& r, int y, std::int32_t offset_before) {
  return rule_day(r, y) * kDay + r.time - offset_before;
}

TimeZone::Type posix_type_at(const TimeZone::Posix& p, std::int64_t t) {
  if (!p.daylight) return p.standard;
  const int y = year_of(t + p.standard.offset);
  const std::int64_t start = rule_instant(p.start, y, p.standard.offset);
  const std::int64_t end = rule_instant(p.end, y, p.daylight->offset);
  const bool dst = start < end ? (start <= t && t < end)   // northern hemisphere: DST inside the year
                               : !(end <= t && t < start);  // southern: DST across the new year
  return dst ? *p.daylight : p.standard;
}

// ---------------------------------------------------------------------------------------------
// TZif (RFC 8536)

class Bytes {
 public:
  explicit Bytes(std::string_view d) : d_(d) {}
  bool has(std::uint64_t n) const { return n <= d_.size() - at_; }
  std::size_t left() const { return d_.size() - at_; }
  std::uint8_t u8() { return static_cast<std::uint8_t>(d_[at_++]); }
  std::uint32_t u32() {
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v = (v << 8) | u8();
    return v;
  }
  std::int64_t i64() {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = (v << 8) | u8();
    return static_cast<std::int64_t>(v);
  }
  std::int32_t i32() { return static_cast<std::int32_t>(u32()); }
  std::string_view take(std::size_t n) {
    auto s = d_.substr(at_, n);
    at_ += n;
    return s;
  }
  void skip(std::uint64_t n) { at_ += static_cast<std::size_t>(n); }

 private:
  std::string_view d_;
  std::size_t at_ = 0;
};

struct Header {
  char version = 0;
  std::uint32_t isutcnt = 0, isstdcnt = 0, leapcnt = 0, timecnt = 0, typecnt = 0, charcnt = 0;
  // Bytes of the data block that follows, for 4- or 8-byte times.
  std::uint64_t block_size(int time_size) const {
    return std::uint64_t{timecnt} * (time_size + 1) + std::uint64_t{typecnt} * 6 + charcnt +
           std::uint64_t{leapcnt} * (time_size + 4) + isstdcnt + isutcnt;
  }
};

bool read_header(Bytes& b, Header& h) {
  if (!b.has(44)) return false;
  if (b.take(4) != "TZif") return false;
  h.version = static_cast<char>(b.u8());
  b.skip(15);
  h.isutcnt = b.u32();
  h.isstdcnt = b.u32();
  h.leapcnt = b.u32();
  h.timecnt = b.u32();
  h.typecnt = b.u32();
  h.charcnt = b.u32();
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// TimeZone

TimeZone::TimeZone() { types_.push_back({0, false, "UTC"}); }

common::Result<TimeZone> TimeZone::from_posix(std::string name, std::string_view tz) {
  Posix p;
  if (!PosixParser(tz).parse(p))
    return Error(errc::invalid_argument, "time zone '" + name + "': cannot parse the POSIX TZ rule '" +
                                             std::string(tz) + "'");
  TimeZone z;
  z.name_ = std::move(name);
  z.types_ = {p.standard};
  z.footer_ = std::move(p);
  return z;
}

common::Result<TimeZone> TimeZone::from_tzif(std::string name, std::string_view data) {
  const auto bad = [&](const std::string& why) {
    return Error(errc::invalid_argument, "time zone '" + name + "': not a valid TZif file: " + why);
  };
  Bytes b(data);
  Header h;
  if (!read_header(b, h)) return bad("no TZif header");
  if (h.version != 0 && h.version < '2') return bad("unknown version");
  int time_size = 4;
  if (h.version >= '2') {  // skip the 32-bit block: the 64-bit one follows with its own header
    if (!b.has(h.block_size(4))) return bad("truncated version 1 data");
    b.skip(h.block_size(4));
    if (!read_header(b, h)) return bad("no second header");
    time_size = 8;
  }
  if (h.typecnt == 0 || h.typecnt > 256) return bad("needs 1 to 256 local time types");
  if (h.charcnt == 0) return bad("no time zone abbreviations");
  if ((h.isstdcnt != 0 && h.isstdcnt != h.typecnt) || (h.isutcnt != 0 && h.isutcnt != h.typecnt))
    return bad("inconsistent counts");
  if (h.leapcnt != 0)
    return bad("it has leap-second records (\"right/\" zones are not supported; use the zone without \"right/\")");
  if (!b.has(h.block_size(time_size))) return bad("truncated data");

  TimeZone z;
  z.name_ = std::move(name);
  z.types_.clear();
  z.transitions_.reserve(h.timecnt);
  for (std::uint32_t i = 0; i < h.timecnt; ++i) {
    const std::int64_t t = time_size == 8 ? b.i64() : std::int64_t{b.i32()};
    if (!z.transitions_.empty() && t <= z.transitions_.back()) return bad("transition times are not ascending");
    z.transitions_.push_back(t);
  }
  z.transition_types_.reserve(h.timecnt);
  for (std::uint32_t i = 0; i < h.timecnt; ++i) {
    const std::uint8_t idx = b.u8();
    if (idx >= h.typecnt) return bad("transition type index out of range");
    z.transition_types_.push_back(idx);
  }
  struct Raw {
    std::int32_t offset;
    bool dst;
    std::uint8_t abbr;
  };
  std::vector<Raw> raw;
  for (std::uint32_t i = 0; i < h.typecnt; ++i) {
    Raw r{b.i32(), false, 0};
    const std::uint8_t isdst = b.u8();
    r.abbr = b.u8();
    if (r.offset < kMinOffset || r.offset > kMaxOffset) return bad("UTC offset out of range");
    if (isdst > 1) return bad("bad isdst value");
    if (r.abbr >= h.charcnt) return bad("abbreviation index out of range");
    r.dst = isdst == 1;
    raw.push_back(r);
  }
  const std::string_view chars = b.take(h.charcnt);
  for (const auto& r : raw) {
    std::string_view a = chars.substr(r.abbr);
    a = a.substr(0, a.find('\0'));
    z.types_.push_back({r.offset, r.dst, std::string(a)});
  }
  b.skip(std::uint64_t{h.isstdcnt} + h.isutcnt);  // only matter for POSIX-style TZ fallbacks

  if (time_size == 8 && b.left() > 0) {
    // Footer: "\n" POSIX-TZ "\n"; an empty TZ string means no rule beyond the table.
    if (b.u8() != '\n') return bad("footer does not start with a newline");
    const std::string_view rest = b.take(b.left());
    const auto nl = rest.find('\n');
    if (nl == std::string_view::npos) return bad("footer does not end with a newline");
    const std::string_view tz = rest.substr(0, nl);
    if (!tz.empty()) {
      Posix p;
      if (!PosixParser(tz).parse(p)) return bad("cannot parse the footer's TZ rule '" + std::string(tz) + "'");
      z.footer_ = std::move(p);
    }
  }
  return z;
}

TimeZone::Type TimeZone::type_at(std::int64_t t) const {
  if (transitions_.empty()) return footer_ ? posix_type_at(*footer_, t) : types_.front();
  if (t < transitions_.front()) return types_.front();  // RFC 8536: time type 0
  if (t >= transitions_.back() && footer_) return posix_type_at(*footer_, t);
  const auto it = std::upper_bound(transitions_.begin(), transitions_.end(), t);
  return types_[transition_types_[static_cast<std::size_t>(std::distance(transitions_.begin(), it) - 1)]];
}

LocalTime TimeZone::to_local(common::SysTime t) const {
  const std::int64_t utc = chr::floor<chr::seconds>(t).time_since_epoch().count();
  const Type type = type_at(utc);
  const std::int64_t local = utc + type.offset;
  const std::int64_t days = floor_div(local, kDay);
  const std::int64_t sod = local - days * kDay;
  const chr::sys_days d{chr::days{days}};
  const chr::year_month_day ymd{d};
  LocalTime out;
  out.year = static_cast<int>(ymd.year());
  out.month = static_cast<int>(static_cast<unsigned>(ymd.month()));
  out.day = static_cast<int>(static_cast<unsigned>(ymd.day()));
  out.hour = static_cast<int>(sod / 3600);
  out.minute = static_cast<int>(sod % 3600 / 60);
  out.second = static_cast<int>(sod % 60);
  out.weekday = static_cast<int>(chr::weekday{d}.c_encoding());
  out.utc_offset = type.offset;
  out.dst = type.dst;
  out.abbreviation = type.abbreviation;
  return out;
}

std::string to_string(const LocalTime& t) {
  const std::int32_t off = t.utc_offset < 0 ? -t.utc_offset : t.utc_offset;
  char buf[96];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02d %02d:%02d:%02d", t.year, t.month, t.day, t.hour, t.minute, t.second);
  char zone[32];
  std::snprintf(zone, sizeof zone, "%c%02d:%02d", t.utc_offset < 0 ? '-' : '+', off / 3600, off % 3600 / 60);
  return std::string(buf) + " " + t.abbreviation + " (" + zone + ")";
}

// ---------------------------------------------------------------------------------------------
// TimeZoneDb

std::string TimeZoneDb::default_directory() {
  // getenv is safe here: nothing in brokerd calls setenv.
  if (const char* dir = std::getenv("TZDIR"); dir && *dir) return dir;
  return "/usr/share/zoneinfo";
}

TimeZoneDb::TimeZoneDb(std::string directory) : directory_(std::move(directory)) {}

namespace {

// IANA names: components of letters, digits and . _ + -, separated by '/'; no "." or ".."
// component, no leading '/': the name can only reach files below the zoneinfo directory.
bool valid_zone_name(std::string_view n) {
  if (n.empty() || n.size() > 255 || n.front() == '/' || n.back() == '/') return false;
  std::size_t start = 0;
  while (start <= n.size()) {
    auto end = n.find('/', start);
    if (end == std::string_view::npos) end = n.size();
    const auto part = n.substr(start, end - start);
    if (part.empty() || part == "." || part == "..") return false;
    for (char c : part)
      if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
            c == '+' || c == '-'))
        return false;
    start = end + 1;
  }
  return true;
}

}  // namespace

common::Result<std::shared_ptr<const TimeZone>> TimeZoneDb::find(std::string_view name) {
  {
    std::lock_guard lock(mutex_);
    if (auto it = zones_.find(name); it != zones_.end()) return it->second;
  }
  if (!valid_zone_name(name))
    return Error(errc::invalid_argument, "'" + std::string(name) + "' is not a valid IANA time zone name (e.g. Europe/London)",
                 "time_zone");
  std::shared_ptr<const TimeZone> zone;
  if (name == "UTC" || name == "Etc/UTC") {
    auto r = TimeZone::from_posix(std::string(name), "UTC0");
    if (!r) return r.error();
    zone = std::make_shared<const TimeZone>(std::move(*r));
  } else {
    namespace fs = std::filesystem;
    const fs::path path = fs::path(directory_) / std::string(name);
    std::error_code ec;
    if (!fs::is_regular_file(path, ec))
      return Error(errc::not_found,
                   "unknown time zone '" + std::string(name) + "' (no file " + path.string() +
                       "; is the tzdata package installed?)",
                   "time_zone");
    std::ifstream in(path, std::ios::binary);
    std::string data;
    if (in) {
      data.resize(kMaxZoneFileBytes + 1);
      in.read(data.data(), static_cast<std::streamsize>(data.size()));
      data.resize(static_cast<std::size_t>(in.gcount()));
    }
    if (!in && !in.eof())
      return Error(errc::not_found, "time zone '" + std::string(name) + "': cannot read " + path.string(), "time_zone");
    if (data.size() > kMaxZoneFileBytes)
      return Error(errc::invalid_argument, "time zone '" + std::string(name) + "': " + path.string() + " is too large",
                   "time_zone");
    auto r = TimeZone::from_tzif(std::string(name), data);
    if (!r) return Error(r.error().code, r.error().message, "time_zone");
    zone = std::make_shared<const TimeZone>(std::move(*r));
  }
  std::lock_guard lock(mutex_);
  auto [it, inserted] = zones_.emplace(std::string(name), std::move(zone));
  return it->second;  // a concurrent first load of the same zone: both got equal zones; keep one
}

// ---------------------------------------------------------------------------------------------
// Power time schemes

common::Result<std::bitset<7>> parse_days(const model::TextList& days) {
  static constexpr std::array<std::pair<std::string_view, std::uint8_t>, 9> kNames{{
      {"Sunday", 1u << 0},
      {"Monday", 1u << 1},
      {"Tuesday", 1u << 2},
      {"Wednesday", 1u << 3},
      {"Thursday", 1u << 4},
      {"Friday", 1u << 5},
      {"Saturday", 1u << 6},
      {"Weekdays", 0b0111110},
      {"Weekend", 0b1000001},
  }};
  if (days.empty()) return Error(errc::invalid_argument, "needs at least one day", "days_of_week");
  std::bitset<7> out;
  for (const auto& d : days) {
    const auto it = std::find_if(kNames.begin(), kNames.end(), [&](const auto& e) { return e.first == d; });
    if (it == kNames.end())
      return Error(errc::invalid_argument,
                   "'" + d + "' is not a day (Monday .. Sunday, Weekdays or Weekend)", "days_of_week");
    out |= std::bitset<7>(it->second);
  }
  return out;
}

common::Result<TimeScheme> scheme_from_object(const model::Object& o) {
  if (o.kind != model::Kind::power_time_scheme)
    return Error(errc::invalid_argument, "not a power_time_scheme object");
  if (auto msg = model::validate_fields(o); !msg.empty()) {
    const auto colon = msg.find(": ");
    return Error(errc::invalid_argument,
                 "power time scheme '" + o.name + "': " + (colon == std::string::npos ? msg : msg.substr(colon + 2)),
                 colon == std::string::npos ? std::string{} : msg.substr(0, colon));
  }
  TimeScheme s;
  s.name = o.name;
  s.enabled = o.flag("enabled", true);
  s.pool_using_percentage = o.flag("pool_using_percentage");
  auto days = parse_days(o.list("days_of_week"));
  if (!days) return Error(errc::invalid_argument, "power time scheme '" + o.name + "': " + days.error().message, "days_of_week");
  s.days = *days;
  // validate_fields checked the element counts, spellings and bounds; this is a backstop.
  const auto peak = o.list("peak_hours");
  const auto pool = o.list("pool_size");
  if (peak.size() != 24 || pool.size() != 24)
    return Error(errc::invalid_argument, "power time scheme '" + o.name + "': needs 24 peak_hours and 24 pool_size values");
  for (std::size_t h = 0; h < 24; ++h) {
    s.peak[h] = peak[h] == "true";
    int n = -1;
    const auto [end, ec] = std::from_chars(pool[h].data(), pool[h].data() + pool[h].size(), n);
    if (ec != std::errc{} || end != pool[h].data() + pool[h].size() || n < -1)
      return Error(errc::invalid_argument, "power time scheme '" + o.name + "': bad pool size '" + pool[h] + "'",
                   "pool_size");
    s.pool_size[h] = n;
  }
  return s;
}

common::Result<std::vector<TimeScheme>> schemes_for_group(std::span<const model::Object> schemes,
                                                          std::string_view delivery_group) {
  std::vector<TimeScheme> out;
  for (const auto& o : schemes) {
    if (o.kind != model::Kind::power_time_scheme || o.text("delivery_group") != delivery_group) continue;
    auto s = scheme_from_object(o);
    if (!s) return s.error();
    out.push_back(std::move(*s));
  }
  return out;
}

ScheduleNow evaluate(std::span<const TimeScheme> schemes, const LocalTime& local) {
  ScheduleNow now;
  now.local = local;
  const TimeScheme* found = nullptr;
  for (const auto& s : schemes) {
    if (!s.enabled || local.weekday < 0 || local.weekday > 6 || !s.days.test(static_cast<std::size_t>(local.weekday)))
      continue;
    if (!found || s.name < found->name) found = &s;
  }
  if (!found || local.hour < 0 || local.hour > 23) return now;
  const auto h = static_cast<std::size_t>(local.hour);
  now.scheme = found->name;
  now.peak = found->peak[h];
  now.pool_size = found->pool_size[h];
  now.pool_using_percentage = found->pool_using_percentage;
  return now;
}

ScheduleNow evaluate(std::span<const TimeScheme> schemes, const TimeZone& zone, common::SysTime now) {
  return evaluate(schemes, zone.to_local(now));
}

// ---------------------------------------------------------------------------------------------
// Pool policy

GroupPolicy group_policy(const model::Object& g) {
  GroupPolicy p;
  p.single_session = g.text("session_support", "SingleSession") == "SingleSession";
  p.shared = g.text("desktop_kind", "Shared") == "Shared";
  p.in_maintenance = g.flag("in_maintenance_mode");
  p.peak_buffer_percent = static_cast<int>(std::clamp<std::int64_t>(g.integer("peak_buffer_size_percent"), 0, 100));
  p.off_peak_buffer_percent =
      static_cast<int>(std::clamp<std::int64_t>(g.integer("off_peak_buffer_size_percent"), 0, 100));
  p.shutdown_after_use = g.flag("shutdown_desktops_after_use");
  p.settlement_before_auto_shutdown =
      chr::seconds{std::max<std::int64_t>(0, g.integer("settlement_period_before_auto_shutdown_seconds"))};
  p.power_on_assigned_during_peak = g.flag("automatic_power_on_for_assigned_during_peak");
  return p;
}

PowerState power_state_from(std::string_view s) {
  static constexpr std::array<PowerState, 9> kAll{PowerState::unknown,    PowerState::unavailable, PowerState::off,
                                                  PowerState::on,         PowerState::suspended,   PowerState::turning_on,
                                                  PowerState::turning_off, PowerState::suspending, PowerState::resuming};
  for (auto p : kAll)
    if (to_string(p) == s) return p;
  return PowerState::unknown;  // "Unmanaged" and anything else: not ours to manage
}

namespace {

// What the machine will be once what is under way has happened.
enum class Expect { on, off, unknown };

Expect expected(const PoolMachine& m) {
  if (m.pending) {
    switch (*m.pending) {
      case Action::turn_on:
      case Action::resume:
      case Action::restart:
      case Action::reset: return Expect::on;
      case Action::turn_off:
      case Action::shutdown:
      case Action::suspend: return Expect::off;
    }
  }
  switch (m.power) {
    case PowerState::on:
    case PowerState::turning_on:
    case PowerState::resuming: return Expect::on;
    case PowerState::off:
    case PowerState::turning_off:
    case PowerState::suspended:
    case PowerState::suspending: return Expect::off;
    case PowerState::unknown:
    case PowerState::unavailable: return Expect::unknown;
  }
  return Expect::unknown;
}

int percent_of(int percent, int count) {  // rounded up: any buffer > 0 % of >= 1 machine is >= 1
  if (percent <= 0 || count <= 0) return 0;
  return static_cast<int>((static_cast<std::int64_t>(percent) * count + 99) / 100);
}

std::string hour_text(const LocalTime& t) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%02d:00", t.hour);
  return buf;
}

}  // namespace

PoolMachine pool_machine(const model::Object& m, bool registered, int sessions) {
  PoolMachine p;
  p.name = m.name;
  p.power = power_state_from(m.text("power_state"));
  p.registered = registered;
  p.sessions = std::clamp(sessions, 0, 1000000);
  p.in_maintenance = m.flag("in_maintenance_mode");
  return p;
}

PoolPlan plan_pool(const GroupPolicy& group, const ScheduleNow& schedule, std::span<const PoolMachine> machines,
                   common::SysTime now, std::optional<bool> was_peak) {
  PoolPlan plan;
  plan.peak = schedule.peak;
  if (!group.single_session || group.in_maintenance) return plan;
  plan.managed = true;

  // The machines the policy may count and touch, in name order.
  struct Entry {
    const PoolMachine* m;
    Expect state;
    bool busy;
    bool acted = false;     // an action of this plan targets it
    bool draining = false;  // waiting for its settlement period before a shutdown after use
  };
  std::vector<Entry> all;
  for (const auto& m : machines)
    if (!m.in_maintenance) all.push_back({&m, expected(m), m.sessions > 0});
  std::sort(all.begin(), all.end(), [](const Entry& a, const Entry& b) { return a.m->name < b.m->name; });

  const auto settled_at = [&](const PoolMachine& m) {
    return m.last_session_end ? *m.last_session_end + group.settlement_before_auto_shutdown : common::SysTime::min();
  };
  const auto note_recheck = [&](common::SysTime t) {
    if (t > now && (!plan.recheck_at || t < *plan.recheck_at)) plan.recheck_at = t;
  };
  const auto can_act = [](const Entry& e) { return !e.acted && !e.busy && !e.m->pending; };

  // 1. ShutdownDesktopsAfterUse: a used machine whose user has logged off goes off once the
  //    settlement period has passed. Until then it is draining: not counted as available.
  if (group.shutdown_after_use) {
    for (auto& e : all) {
      if (!can_act(e) || e.m->power != PowerState::on || !e.m->last_session_end) continue;
      const auto due = settled_at(*e.m);
      if (now >= due) {
        plan.actions.push_back({e.m->name, Action::shutdown, kReasonPolicy, "shutdown after use"});
        e.acted = true;
        e.state = Expect::off;
      } else {
        e.draining = true;
        note_recheck(due);
      }
    }
  }

  // 2. Pool size and buffer (Shared groups).
  int unassigned = 0;
  for (const auto& e : all) {
    if (!e.m->assigned) ++unassigned;
    const bool on = e.busy || (e.state == Expect::on && !e.draining);
    if (!on) continue;
    ++plan.on;
    if (e.busy)
      ++plan.in_use;
    else if (!e.m->assigned)
      ++plan.idle_unassigned_on;
  }
  if (!group.shared) {
    // 3. Private groups follow the peak hours of their scheme.
    if (schedule.scheme.empty()) return plan;
    const bool peak_began = schedule.peak && was_peak == false;
    const bool off_peak_began = !schedule.peak && was_peak == true;
    const std::string when = (schedule.peak ? "peak, " : "off-peak, ") + hour_text(schedule.local);
    if (peak_began || (schedule.peak && group.power_on_assigned_during_peak)) {
      const std::string detail = peak_began ? "assigned machine at the start of peak (" + when + ")"
                                            : "assigned machine off during peak (" + when + ")";
      for (auto& e : all) {
        if (!can_act(e) || !e.m->assigned || e.draining) continue;
        if (e.m->power != PowerState::off && e.m->power != PowerState::suspended) continue;
        plan.actions.push_back({e.m->name, e.m->power == PowerState::off ? Action::turn_on : Action::resume,
                                kReasonSchedule, detail});
        e.acted = true;
      }
    } else if (off_peak_began) {
      for (auto& e : all) {
        if (!can_act(e) || !e.m->assigned || e.draining || e.m->power != PowerState::on || !e.m->registered) continue;
        if (now < settled_at(*e.m)) {
          note_recheck(settled_at(*e.m));
          continue;
        }
        plan.actions.push_back({e.m->name, Action::shutdown, kReasonSchedule,
                                "assigned machine at the start of off-peak (" + when + ")"});
        e.acted = true;
      }
    }
    return plan;
  }

  const int buffer_percent = schedule.peak ? group.peak_buffer_percent : group.off_peak_buffer_percent;
  plan.buffer_target = percent_of(buffer_percent, unassigned);
  if (schedule.pool_size >= 0)
    plan.pool_target = schedule.pool_using_percentage ? percent_of(std::min(schedule.pool_size, 100),
                                                                   static_cast<int>(all.size()))
                                                      : schedule.pool_size;
  const std::string when = (schedule.peak ? "peak, " : "off-peak, ") + hour_text(schedule.local);

  // Power on: enough machines for the pool size, and enough idle unassigned ones for the buffer.
  const int for_pool = plan.pool_target >= 0 ? plan.pool_target - plan.on : 0;
  const int for_buffer = plan.buffer_target - plan.idle_unassigned_on;
  int need = std::max({for_pool, for_buffer, 0});
  if (need > 0) {
    const std::string detail =
        for_pool >= for_buffer
            ? "pool size " + std::to_string(plan.pool_target) + " (" + when + "): " + std::to_string(plan.on) + " on"
            : "buffer " + std::to_string(buffer_percent) + "% = " + std::to_string(plan.buffer_target) + " idle (" +
                  when + "): " + std::to_string(plan.idle_unassigned_on) + " idle";
    for (auto& e : all) {
      if (need == 0) break;
      if (!can_act(e) || e.m->assigned || e.draining) continue;
      Action a = Action::turn_on;
      if (e.m->power == PowerState::off)
        a = Action::turn_on;
      else if (e.m->power == PowerState::suspended)
        a = Action::resume;
      else
        continue;
      plan.actions.push_back({e.m->name, a, kReasonIdlePool, detail});
      e.acted = true;
      --need;
    }
    return plan;  // never power on and off in one pass
  }

  // Power off: only with a pool size this hour (the buffer alone never shuts machines down),
  // down to max(pool size, machines in use + buffer), idle unassigned registered ones only.
  if (plan.pool_target < 0) return plan;
  const int keep = std::max(plan.pool_target, plan.in_use + plan.buffer_target);
  int excess = plan.on - keep;
  if (excess <= 0) return plan;
  const std::string detail = "pool size " + std::to_string(plan.pool_target) + ", " + std::to_string(plan.in_use) +
                             " in use + buffer " + std::to_string(plan.buffer_target) + " (" + when +
                             "): keep " + std::to_string(keep) + " of " + std::to_string(plan.on) + " on";
  for (auto it = all.rbegin(); it != all.rend() && excess > 0; ++it) {
    auto& e = *it;
    if (!can_act(e) || e.m->assigned || e.draining || e.m->power != PowerState::on || !e.m->registered) continue;
    const auto due = settled_at(*e.m);
    if (now < due) {
      note_recheck(due);
      continue;
    }
    plan.actions.push_back({e.m->name, Action::shutdown, kReasonIdlePool, detail});
    e.acted = true;
    --excess;
  }
  return plan;
}

}  // namespace power
