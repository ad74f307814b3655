// power/schedule_test.cpp: time zones (TZif tables and POSIX footers, the 2026 DST changes of
// several zones), power time schemes at the hour boundaries around DST changes, and the pool
// policy (buffers, pool size, sessions, maintenance, pending actions, settlement, shutdown after
// use). The expected local times were checked against Python's zoneinfo (tzdata 2025b).
//
// The zone tests need the system's tzdata (/usr/share/zoneinfo; scripts/setup installs it).
#include "power/schedule.hpp"

#include "common/model.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <iterator>
#include <random>
#include <thread>

using namespace power;
using common::SysTime;
using common::model::Kind;
using common::model::Object;
using common::model::TextList;
using std::chrono::hours;
using std::chrono::minutes;
using std::chrono::seconds;

namespace {

SysTime at(const std::string& rfc3339) {
  SysTime t;
  REQUIRE_MESSAGE(common::parse_time(rfc3339, t), rfc3339);
  return t;
}

std::shared_ptr<const TimeZone> zone(const std::string& name) {
  static TimeZoneDb db;  // one cache for the whole test binary, like brokerd's
  auto z = db.find(name);
  REQUIRE_MESSAGE(z.has_value(), (z ? std::string() : z.error().describe()));
  return *z;
}

// "2026-03-29 02:00:00 BST (+01:00)" of the zone at the UTC instant.
std::string local(const std::string& zone_name, const std::string& utc) {
  return to_string(zone(zone_name)->to_local(at(utc)));
}

const char* const kDayNames[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
std::string weekday(const std::string& zone_name, const std::string& utc) {
  return kDayNames[zone(zone_name)->to_local(at(utc)).weekday];
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Time zones

TEST_CASE("schedule: UTC is built in and needs no zoneinfo directory") {
  TimeZoneDb db("/nonexistent/zoneinfo");
  for (const char* name : {"UTC", "Etc/UTC"}) {
    auto z = db.find(name);
    REQUIRE(z.has_value());
    const LocalTime t = (*z)->to_local(at("2026-03-29T01:00:00Z"));
    CHECK(to_string(t) == "2026-03-29 01:00:00 UTC (+00:00)");
    CHECK(t.weekday == 0);
    CHECK(!t.dst);
  }
  auto london = db.find("Europe/London");
  REQUIRE(!london);
  CHECK(london.error().code == common::errc::not_found);
  CHECK(london.error().message.find("unknown time zone 'Europe/London'") == 0);
  CHECK(london.error().message.find("tzdata") != std::string::npos);
  CHECK(TimeZone().to_local(at("1970-01-01T00:00:00Z")).weekday == 4);
}

TEST_CASE("schedule: unknown and malformed zone names are refused clearly") {
  TimeZoneDb db;
  auto unknown = db.find("Mars/Olympus_Mons");
  REQUIRE(!unknown);
  CHECK(unknown.error().code == common::errc::not_found);
  CHECK(unknown.error().message.find("unknown time zone 'Mars/Olympus_Mons'") == 0);
  CHECK(unknown.error().field == "time_zone");
  for (const char* bad : {"", "../../etc/passwd", "/etc/localtime", "Europe/", "Europe//London", "Europe/./London",
                          "Europe/Lon don", "Europe\\London"}) {
    auto r = db.find(bad);
    REQUIRE_MESSAGE(!r, bad);
    CHECK_MESSAGE(r.error().code == common::errc::invalid_argument, bad);
  }
  auto dir = db.find("Europe");  // a directory, not a zone
  REQUIRE(!dir);
  CHECK(dir.error().code == common::errc::not_found);
}

TEST_CASE("schedule: zones are cached and may be looked up from many threads") {
  TimeZoneDb db;
  auto first = db.find("Europe/London");
  REQUIRE(first.has_value());
  CHECK(db.find("Europe/London").value().get() == first->get());

  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i)
    threads.emplace_back([&, i] {
      const char* names[] = {"America/New_York", "Australia/Sydney", "Asia/Kolkata", "Europe/London"};
      for (int n = 0; n < 200; ++n) {
        auto z = db.find(names[(i + n) % 4]);
        if (!z) {
          ++wrong;
          continue;
        }
        const LocalTime t = (*z)->to_local(at("2026-07-01T12:00:00Z"));
        const int want[] = {8, 22, 17, 13};
        if (t.hour != want[(i + n) % 4]) ++wrong;
      }
    });
  for (auto& t : threads) t.join();
  CHECK(wrong.load() == 0);
  CHECK(db.find("Asia/Kolkata").value().get() == db.find("Asia/Kolkata").value().get());
}

TEST_CASE("schedule: Europe/London across the 2026 DST changes") {
  // Spring forward: 01:00 GMT becomes 02:00 BST at 2026-03-29 01:00 UTC.
  CHECK(local("Europe/London", "2026-03-29T00:59:59Z") == "2026-03-29 00:59:59 GMT (+00:00)");
  CHECK(local("Europe/London", "2026-03-29T01:00:00Z") == "2026-03-29 02:00:00 BST (+01:00)");
  // Fall back: 02:00 BST becomes 01:00 GMT at 2026-10-25 01:00 UTC.
  CHECK(local("Europe/London", "2026-10-25T00:59:59Z") == "2026-10-25 01:59:59 BST (+01:00)");
  CHECK(local("Europe/London", "2026-10-25T01:00:00Z") == "2026-10-25 01:00:00 GMT (+00:00)");
  CHECK(weekday("Europe/London", "2026-10-25T01:00:00Z") == "Sun");
  const LocalTime summer = zone("Europe/London")->to_local(at("2026-07-01T12:00:00Z"));
  CHECK(summer.dst);
  CHECK(summer.utc_offset == 3600);
  // Beyond the table: the footer's rule (GMT0BST,M3.5.0/1,M10.5.0).
  CHECK(local("Europe/London", "2100-07-01T12:00:00Z") == "2100-07-01 13:00:00 BST (+01:00)");
  CHECK(local("Europe/London", "2100-12-01T12:00:00Z") == "2100-12-01 12:00:00 GMT (+00:00)");
}

TEST_CASE("schedule: America/New_York across the 2026 DST changes") {
  CHECK(local("America/New_York", "2026-03-08T06:59:59Z") == "2026-03-08 01:59:59 EST (-05:00)");
  CHECK(local("America/New_York", "2026-03-08T07:00:00Z") == "2026-03-08 03:00:00 EDT (-04:00)");
  CHECK(local("America/New_York", "2026-11-01T05:59:59Z") == "2026-11-01 01:59:59 EDT (-04:00)");
  CHECK(local("America/New_York", "2026-11-01T06:00:00Z") == "2026-11-01 01:00:00 EST (-05:00)");
  // The date changes before UTC's does.
  CHECK(local("America/New_York", "2026-01-01T03:00:00Z") == "2025-12-31 22:00:00 EST (-05:00)");
  CHECK(weekday("America/New_York", "2026-01-01T03:00:00Z") == "Wed");
  // Before the first transition: local mean time (time type 0), with its seconds.
  CHECK(local("America/New_York", "1850-01-01T12:00:00Z") == "1850-01-01 07:03:58 LMT (-04:56)");
}

TEST_CASE("schedule: Australia/Sydney (southern hemisphere) across the 2026 DST changes") {
  CHECK(local("Australia/Sydney", "2026-04-04T15:59:59Z") == "2026-04-05 02:59:59 AEDT (+11:00)");
  CHECK(local("Australia/Sydney", "2026-04-04T16:00:00Z") == "2026-04-05 02:00:00 AEST (+10:00)");
  CHECK(local("Australia/Sydney", "2026-10-03T15:59:59Z") == "2026-10-04 01:59:59 AEST (+10:00)");
  CHECK(local("Australia/Sydney", "2026-10-03T16:00:00Z") == "2026-10-04 03:00:00 AEDT (+11:00)");
  CHECK(weekday("Australia/Sydney", "2026-10-03T16:00:00Z") == "Sun");  // Saturday in UTC
  // DST across the new year, beyond the table (footer AEST-10AEDT,M10.1.0,M4.1.0/3).
  CHECK(local("Australia/Sydney", "2150-01-01T00:00:00Z") == "2150-01-01 11:00:00 AEDT (+11:00)");
}

TEST_CASE("schedule: Asia/Kolkata's half-hour offset") {
  CHECK(local("Asia/Kolkata", "2026-01-01T00:00:00Z") == "2026-01-01 05:30:00 IST (+05:30)");
  CHECK(local("Asia/Kolkata", "2026-06-30T18:29:59Z") == "2026-06-30 23:59:59 IST (+05:30)");
  CHECK(local("Asia/Kolkata", "2026-06-30T18:30:00Z") == "2026-07-01 00:00:00 IST (+05:30)");
  CHECK(weekday("Asia/Kolkata", "2026-06-30T18:30:00Z") == "Wed");
  CHECK(zone("Asia/Kolkata")->to_local(at("2026-03-29T01:00:00Z")).utc_offset == 19800);
}

TEST_CASE("schedule: the POSIX footer alone agrees with the transitions table, hour by hour") {
  // Each zone's footer rule, used for every instant, must give what the table gives for the
  // years the table covers (2026-2036 here): checks the rule arithmetic against tzdata.
  const std::pair<const char*, const char*> zones[] = {
      {"Europe/London", "GMT0BST,M3.5.0/1,M10.5.0"},
      {"America/New_York", "EST5EDT,M3.2.0,M11.1.0"},
      {"Australia/Sydney", "AEST-10AEDT,M10.1.0,M4.1.0/3"},
      {"Asia/Kolkata", "IST-5:30"},
  };
  for (const auto& [name, tz] : zones) {
    INFO(name);
    auto table = zone(name);
    auto rule = TimeZone::from_posix(name, tz);
    REQUIRE(rule.has_value());
    int differences = 0;
    const SysTime end = at("2037-01-01T00:00:00Z");
    for (SysTime t = at("2026-01-01T00:30:00Z"); t < end; t += hours(1))
      if (to_string(table->to_local(t)) != to_string(rule->to_local(t))) ++differences;
    CHECK(differences == 0);
  }
}

TEST_CASE("schedule: TZif parsing refuses malformed data without crashing") {
  const std::string london = read_file("/usr/share/zoneinfo/Europe/London");
  REQUIRE(london.size() > 100);
  REQUIRE(TimeZone::from_tzif("Europe/London", london).has_value());
  // Every truncation is refused (or, cut inside the footer, still parses the table).
  for (std::size_t n = 0; n < london.size(); n += 7) {
    auto r = TimeZone::from_tzif("cut", std::string_view(london).substr(0, n));
    if (!r) CHECK(r.error().message.find("not a valid TZif file") != std::string::npos);
  }
  CHECK(!TimeZone::from_tzif("x", "TZif"));
  CHECK(!TimeZone::from_tzif("x", std::string(44, '\0')));
  // Random corruption of the data: no crash, an answer either way.
  std::mt19937 rng(42);
  for (int i = 0; i < 2000; ++i) {
    std::string bad = london;
    for (int k = 0; k < 4; ++k) bad[rng() % bad.size()] = static_cast<char>(rng());
    auto r = TimeZone::from_tzif("fuzz", bad);
    if (r) (void)r->to_local(at("2026-03-29T01:00:00Z"));
  }
  auto right = TimeZoneDb().find("right/UTC");  // leap seconds: refused if the file exists
  if (!right && right.error().code == common::errc::invalid_argument)
    CHECK(right.error().message.find("leap-second") != std::string::npos);
  // POSIX strings.
  CHECK(!TimeZone::from_posix("x", "EST"));
  CHECK(!TimeZone::from_posix("x", "EST5EDT,M13.1.0,M11.1.0"));
  CHECK(!TimeZone::from_posix("x", "<+05"));
  auto morocco_like = TimeZone::from_posix("x", "<+01>-1");
  REQUIRE(morocco_like.has_value());
  CHECK(to_string(morocco_like->to_local(at("2026-01-01T00:00:00Z"))) == "2026-01-01 01:00:00 +01 (+01:00)");
  // Permanent DST written as a rule that covers the whole year.
  auto all_year = TimeZone::from_posix("x", "EST5EDT,0/0,J365/25");
  REQUIRE(all_year.has_value());
  CHECK(all_year->to_local(at("2026-01-01T12:00:00Z")).dst);
  CHECK(all_year->to_local(at("2026-12-31T12:00:00Z")).dst);
}

// ---------------------------------------------------------------------------------------------
// Power time schemes

namespace {

TimeScheme scheme(std::string name, std::bitset<7> days) {
  TimeScheme s;
  s.name = std::move(name);
  s.days = days;
  return s;
}

constexpr std::bitset<7> kWeekdays{0b0111110};
constexpr std::bitset<7> kWeekend{0b1000001};

// Weekdays: peak 07:00-18:59, pool size = 100 + hour. Weekend: no peak, pool size = 200 + hour.
std::vector<TimeScheme> office_schemes() {
  TimeScheme week = scheme("office week", kWeekdays);
  TimeScheme weekend = scheme("office weekend", kWeekend);
  for (int h = 0; h < 24; ++h) {
    week.peak[static_cast<std::size_t>(h)] = h >= 7 && h <= 18;
    week.pool_size[static_cast<std::size_t>(h)] = 100 + h;
    weekend.pool_size[static_cast<std::size_t>(h)] = 200 + h;
  }
  return {week, weekend};
}

ScheduleNow eval(const std::vector<TimeScheme>& schemes, const std::string& zone_name, const std::string& utc) {
  return evaluate(schemes, *zone(zone_name), at(utc));
}

}  // namespace

TEST_CASE("schedule: weekday and weekend schemes, peak hours at the hour boundaries") {
  const auto s = office_schemes();
  // Friday 2026-03-27 in London (GMT).
  auto before = eval(s, "Europe/London", "2026-03-27T06:59:59Z");
  CHECK(before.scheme == "office week");
  CHECK(!before.peak);
  CHECK(before.pool_size == 106);
  auto start = eval(s, "Europe/London", "2026-03-27T07:00:00Z");
  CHECK(start.peak);
  CHECK(start.pool_size == 107);
  CHECK(eval(s, "Europe/London", "2026-03-27T18:59:59Z").peak);
  CHECK(!eval(s, "Europe/London", "2026-03-27T19:00:00Z").peak);
  // Saturday.
  auto sat = eval(s, "Europe/London", "2026-03-28T12:00:00Z");
  CHECK(sat.scheme == "office weekend");
  CHECK(!sat.peak);
  CHECK(sat.pool_size == 212);
  // The group's zone decides the day: Friday 14:00 UTC is already Saturday 01:00 in Sydney,
  // and Friday 19:00 UTC is Saturday 00:30 in Kolkata; Friday 03:00 UTC is Thursday in New York.
  CHECK(eval(s, "Australia/Sydney", "2026-03-27T14:00:00Z").scheme == "office weekend");
  CHECK(eval(s, "Australia/Sydney", "2026-03-27T14:00:00Z").pool_size == 201);
  CHECK(eval(s, "Asia/Kolkata", "2026-03-27T19:00:00Z").pool_size == 200);
  CHECK(eval(s, "Asia/Kolkata", "2026-03-27T18:29:59Z").pool_size == 123);
  CHECK(eval(s, "America/New_York", "2026-03-27T03:00:00Z").scheme == "office week");
  CHECK(eval(s, "America/New_York", "2026-03-27T03:00:00Z").pool_size == 123);
  // Peak at 07:00 local in New York is 11:00 UTC in summer time, 12:00 UTC in winter.
  CHECK(eval(s, "America/New_York", "2026-07-01T11:00:00Z").peak);
  CHECK(!eval(s, "America/New_York", "2026-12-01T11:00:00Z").peak);
  CHECK(eval(s, "America/New_York", "2026-12-01T12:00:00Z").peak);
}

TEST_CASE("schedule: hour 1 on the spring-forward and fall-back days in Europe/London") {
  // A Sunday scheme whose pool size names the hour: 10 + hour; hour 1 is peak.
  TimeScheme sunday = scheme("sunday", std::bitset<7>{1});
  for (std::size_t h = 0; h < 24; ++h) sunday.pool_size[h] = 10 + static_cast<int>(h);
  sunday.peak[1] = true;
  const std::vector<TimeScheme> s{sunday};
  // 2026-03-29: 00:59:59 GMT is hour 0; one second later it is 02:00 BST: hour 1 never happens.
  CHECK(eval(s, "Europe/London", "2026-03-29T00:00:00Z").pool_size == 10);
  CHECK(eval(s, "Europe/London", "2026-03-29T00:59:59Z").pool_size == 10);
  CHECK(!eval(s, "Europe/London", "2026-03-29T00:59:59Z").peak);
  CHECK(eval(s, "Europe/London", "2026-03-29T01:00:00Z").pool_size == 12);
  CHECK(!eval(s, "Europe/London", "2026-03-29T01:00:00Z").peak);
  CHECK(eval(s, "Europe/London", "2026-03-29T02:00:00Z").pool_size == 13);
  // 2026-10-25: hour 1 happens twice (01:00-01:59 BST, then 01:00-01:59 GMT): two real hours.
  CHECK(eval(s, "Europe/London", "2026-10-24T23:59:59Z").pool_size == 10);
  CHECK(eval(s, "Europe/London", "2026-10-25T00:00:00Z").pool_size == 11);
  CHECK(eval(s, "Europe/London", "2026-10-25T00:00:00Z").peak);
  CHECK(eval(s, "Europe/London", "2026-10-25T01:59:59Z").pool_size == 11);
  CHECK(eval(s, "Europe/London", "2026-10-25T01:59:59Z").peak);
  CHECK(eval(s, "Europe/London", "2026-10-25T02:00:00Z").pool_size == 12);
}

TEST_CASE("schedule: hours 1 to 3 on the 2026 DST days in America/New_York") {
  TimeScheme sunday = scheme("sunday", std::bitset<7>{1});
  for (std::size_t h = 0; h < 24; ++h) sunday.pool_size[h] = 10 + static_cast<int>(h);
  const std::vector<TimeScheme> s{sunday};
  // 2026-03-08: 01:59:59 EST, then 03:00:00 EDT: hour 2 is skipped.
  CHECK(eval(s, "America/New_York", "2026-03-08T06:00:00Z").pool_size == 11);
  CHECK(eval(s, "America/New_York", "2026-03-08T06:59:59Z").pool_size == 11);
  CHECK(eval(s, "America/New_York", "2026-03-08T07:00:00Z").pool_size == 13);
  // 2026-11-01: hour 1 from 05:00 to 06:59 UTC, then hour 2.
  CHECK(eval(s, "America/New_York", "2026-11-01T04:59:59Z").pool_size == 10);
  CHECK(eval(s, "America/New_York", "2026-11-01T05:00:00Z").pool_size == 11);
  CHECK(eval(s, "America/New_York", "2026-11-01T06:30:00Z").pool_size == 11);
  CHECK(eval(s, "America/New_York", "2026-11-01T07:00:00Z").pool_size == 12);
  // Saturday: no scheme covers it.
  auto none = eval(s, "America/New_York", "2026-11-01T03:59:59Z");
  CHECK(none.scheme.empty());
  CHECK(none.pool_size == -1);
  CHECK(!none.peak);
}

TEST_CASE("schedule: disabled schemes are skipped; overlapping schemes resolve by name") {
  auto s = office_schemes();
  s[0].enabled = false;
  auto friday = eval(s, "UTC", "2026-03-27T12:00:00Z");
  CHECK(friday.scheme.empty());
  CHECK(friday.pool_size == -1);
  s[0].enabled = true;
  TimeScheme extra = scheme("a first", kWeekdays);
  extra.pool_size.fill(7);
  s.push_back(extra);
  CHECK(eval(s, "UTC", "2026-03-27T12:00:00Z").scheme == "a first");
  CHECK(eval(s, "UTC", "2026-03-27T12:00:00Z").pool_size == 7);
}

TEST_CASE("schedule: power_time_scheme objects parse and are validated") {
  Object o = common::model::make_default(Kind::power_time_scheme, "office");
  o.fields["delivery_group"] = std::string("pool");
  o.fields["days_of_week"] = TextList{"Weekdays", "Saturday"};
  TextList peak(24, "false"), pool(24, "-1");
  peak[8] = "true";
  pool[8] = "5";
  pool[9] = "0";
  o.fields["peak_hours"] = peak;
  o.fields["pool_size"] = pool;
  CHECK(common::model::validate_fields(o).empty());
  auto s = scheme_from_object(o);
  REQUIRE(s.has_value());
  CHECK(s->name == "office");
  CHECK(s->days == std::bitset<7>{0b1111110});
  CHECK(s->peak[8]);
  CHECK(!s->peak[7]);
  CHECK(s->pool_size[8] == 5);
  CHECK(s->pool_size[9] == 0);
  CHECK(s->pool_size[10] == -1);
  CHECK(s->enabled);

  // Defaults: no peak, no pool management; days are required.
  Object d = common::model::make_default(Kind::power_time_scheme, "d");
  d.fields["delivery_group"] = std::string("pool");
  CHECK(common::model::validate_fields(d) == "days_of_week: is required");
  d.fields["days_of_week"] = TextList{"Sunday"};
  auto ds = scheme_from_object(d);
  REQUIRE(ds.has_value());
  CHECK(std::all_of(ds->pool_size.begin(), ds->pool_size.end(), [](int n) { return n == -1; }));
  CHECK(std::none_of(ds->peak.begin(), ds->peak.end(), [](bool b) { return b; }));

  auto refused = [&](const char* field, common::model::Value v) {
    Object bad = o;
    bad.fields[field] = std::move(v);
    auto r = scheme_from_object(bad);
    REQUIRE(!r);
    CHECK(r.error().field == field);
    return r.error().message;
  };
  CHECK(refused("days_of_week", TextList{"Funday"}).find("'Funday' (element 0) is not one of Monday") !=
        std::string::npos);
  CHECK(refused("days_of_week", TextList{}).find("must have 1 to 9 elements, not 0") != std::string::npos);
  CHECK(refused("peak_hours", TextList(23, "false")).find("must have exactly 24 elements, not 23") !=
        std::string::npos);
  CHECK(refused("peak_hours", TextList(24, "yes")).find("'yes' (element 0) is not one of true, false") !=
        std::string::npos);
  TextList low = pool;
  low[3] = "-2";
  CHECK(refused("pool_size", low).find("'-2' (element 3) is not an integer between -1 and 100000") !=
        std::string::npos);
  low[3] = "3 ";
  CHECK(refused("pool_size", low).find("'3 ' (element 3)") != std::string::npos);
  low[3] = "150";
  Object percent = o;
  percent.fields["pool_size"] = low;
  percent.fields["pool_using_percentage"] = true;
  CHECK(common::model::validate_fields(percent).find("pool_size: '150' is more than 100") == 0);

  std::vector<Object> all{o, d};
  all.push_back(common::model::make_default(Kind::machine, "not a scheme"));
  auto mine = schemes_for_group(all, "pool");
  REQUIRE(mine.has_value());
  CHECK(mine->size() == 2);
  CHECK(schemes_for_group(all, "other").value().empty());
}

TEST_CASE("schedule: parse_days knows the SDK spellings") {
  CHECK(parse_days({"Weekend"}).value() == std::bitset<7>{0b1000001});
  CHECK(parse_days({"Monday", "Sunday"}).value() == std::bitset<7>{0b0000011});
  CHECK(!parse_days({"monday"}));
  CHECK(!parse_days({}));
}

// ---------------------------------------------------------------------------------------------
// Pool policy

namespace {

const SysTime kNow = SysTime{} + hours(24 * 20000);

PoolMachine machine(std::string name, PowerState power, int sessions = 0) {
  PoolMachine m;
  m.name = std::move(name);
  m.power = power;
  m.registered = power == PowerState::on;
  m.sessions = sessions;
  return m;
}

std::vector<PoolMachine> machines(int on, int off, const std::string& prefix = "pool-") {
  std::vector<PoolMachine> out;
  int n = 0;
  const auto name = [&] {
    ++n;
    return prefix + (n < 10 ? "0" : "") + std::to_string(n);
  };
  for (int i = 0; i < on; ++i) out.push_back(machine(name(), PowerState::on));
  for (int i = 0; i < off; ++i) out.push_back(machine(name(), PowerState::off));
  return out;
}

ScheduleNow hour(bool peak, int pool_size) {
  ScheduleNow s;
  s.local.hour = 9;
  s.peak = peak;
  s.pool_size = pool_size;
  return s;
}

// "TurnOn pool-03, Shutdown pool-09"
std::string actions(const PoolPlan& p) {
  std::string out;
  for (const auto& a : p.actions) out += (out.empty() ? "" : ", ") + std::string(to_string(a.action)) + " " + a.machine;
  return out;
}

PoolPlan plan(const GroupPolicy& g, const ScheduleNow& s, const std::vector<PoolMachine>& ms, SysTime now = kNow) {
  return plan_pool(g, s, ms, now);
}

}  // namespace

TEST_CASE("schedule: the buffer powers on idle unassigned machines, rounded up, and never shuts down") {
  GroupPolicy g;
  g.peak_buffer_percent = 20;
  g.off_peak_buffer_percent = 10;
  auto ms = machines(0, 10);
  auto peak = plan(g, hour(true, -1), ms);
  CHECK(peak.managed);
  CHECK(peak.buffer_target == 2);
  CHECK(actions(peak) == "TurnOn pool-01, TurnOn pool-02");
  CHECK(peak.actions[0].reason == kReasonIdlePool);
  CHECK(peak.actions[0].detail.find("buffer 20% = 2 idle") == 0);
  CHECK(actions(plan(g, hour(false, -1), ms)) == "TurnOn pool-01");  // 10% of 10
  g.off_peak_buffer_percent = 1;
  CHECK(actions(plan(g, hour(false, -1), ms)) == "TurnOn pool-01");  // 1% of 10 rounds up to 1
  g.off_peak_buffer_percent = 0;
  CHECK(plan(g, hour(false, -1), ms).actions.empty());
  // Eight idle machines on, buffer 20 % (2), no pool size this hour: nothing is shut down.
  auto idle = machines(8, 2);
  auto none = plan(g, hour(true, -1), idle);
  CHECK(none.actions.empty());
  CHECK(none.idle_unassigned_on == 8);
  // Machines in use do not count as buffer.
  for (int i = 0; i < 8; ++i) idle[static_cast<std::size_t>(i)].sessions = 1;
  auto busy = plan(g, hour(true, -1), idle);
  CHECK(busy.in_use == 8);
  CHECK(actions(busy) == "TurnOn pool-09, TurnOn pool-10");
}

TEST_CASE("schedule: the pool size powers on and off; with the buffer it keeps max(pool, in use + buffer)") {
  GroupPolicy g;
  // Pool size 4, two on: two more, the lowest names first.
  auto ms = machines(2, 6);
  auto up = plan(g, hour(true, 4), ms);
  CHECK(up.pool_target == 4);
  CHECK(actions(up) == "TurnOn pool-03, TurnOn pool-04");
  CHECK(up.actions[0].detail.find("pool size 4 (peak, 09:00): 2 on") == 0);
  // Pool size 2, five idle on: the three highest names go off.
  auto down = plan(g, hour(false, 2), machines(5, 3));
  CHECK(actions(down) == "Shutdown pool-05, Shutdown pool-04, Shutdown pool-03");
  CHECK(down.actions[0].reason == kReasonIdlePool);
  // Pool size 2, three in use, buffer 20 % of 10 = 2: keep 3 + 2 = 5 on.
  g.peak_buffer_percent = 20;
  auto mixed = machines(3, 7);
  for (auto& m : mixed)
    if (m.power == PowerState::on) m.sessions = 1;
  auto both = plan(g, hour(true, 2), mixed);
  CHECK(both.buffer_target == 2);
  CHECK(actions(both) == "TurnOn pool-04, TurnOn pool-05");
  // ... and with eight on (three in use, five idle): three idle ones go off.
  auto eight = machines(8, 2);
  for (int i = 0; i < 3; ++i) eight[static_cast<std::size_t>(i)].sessions = 1;
  CHECK(actions(plan(g, hour(true, 2), eight)) == "Shutdown pool-08, Shutdown pool-07, Shutdown pool-06");
  // Pool size larger than the group: everything that can be, is on.
  CHECK(actions(plan(GroupPolicy{}, hour(true, 50), machines(1, 2))) == "TurnOn pool-02, TurnOn pool-03");
  // Pool size as a percentage of the group's machines: 50 % of 6 = 3.
  auto pct = hour(true, 50);
  pct.pool_using_percentage = true;
  auto p = plan(GroupPolicy{}, pct, machines(1, 5));
  CHECK(p.pool_target == 3);
  CHECK(actions(p) == "TurnOn pool-02, TurnOn pool-03");
}

TEST_CASE("schedule: a machine with sessions is never powered off") {
  GroupPolicy g;
  g.shutdown_after_use = true;
  auto ms = machines(4, 0);
  for (auto& m : ms) {
    m.sessions = 1;
    m.last_session_end = kNow - hours(1);  // an earlier session ended; a new one is running
  }
  auto p = plan(g, hour(false, 0), ms);
  CHECK(p.actions.empty());
  CHECK(p.in_use == 4);
  // The highest name is busy: the next idle ones go instead.
  auto some = machines(4, 0);
  some[3].sessions = 2;
  CHECK(actions(plan(g, hour(false, 2), some)) == "Shutdown pool-03, Shutdown pool-02");
}

TEST_CASE("schedule: machines and groups in maintenance mode are left alone") {
  GroupPolicy g;
  auto ms = machines(3, 3);
  ms[2].in_maintenance = true;  // on, idle, in excess: stays on
  ms[3].in_maintenance = true;  // off: not powered on
  auto p = plan(g, hour(true, 0), ms);
  CHECK(actions(p) == "Shutdown pool-02, Shutdown pool-01");
  auto up = plan(g, hour(true, 4), ms);
  CHECK(up.on == 2);  // pool-03 does not count
  CHECK(actions(up) == "TurnOn pool-05, TurnOn pool-06");
  g.in_maintenance = true;
  auto group = plan(g, hour(true, 6), ms);
  CHECK(!group.managed);
  CHECK(group.actions.empty());
}

TEST_CASE("schedule: machines with an action pending are skipped and counted as it will leave them") {
  GroupPolicy g;
  auto ms = machines(0, 4);
  ms[0].pending = Action::turn_on;
  auto p = plan(g, hour(true, 2), ms);
  CHECK(p.on == 1);
  CHECK(actions(p) == "TurnOn pool-02");  // not a second power-on of pool-01, and only one more
  auto on = machines(3, 0);
  on[2].pending = Action::shutdown;  // going off already
  auto down = plan(g, hour(true, 1), on);
  CHECK(down.on == 2);
  CHECK(actions(down) == "Shutdown pool-02");
  // A pending restart of an excess machine: it stays untouched.
  on[2].pending = Action::restart;
  CHECK(actions(plan(g, hour(true, 1), on)) == "Shutdown pool-02, Shutdown pool-01");
  on[0].pending = Action::restart;
  on[1].pending = Action::restart;
  CHECK(plan(g, hour(true, 1), on).actions.empty());
}

TEST_CASE("schedule: the settlement period delays automatic shutdown after a session ends") {
  GroupPolicy g;
  g.settlement_before_auto_shutdown = seconds(300);
  auto ms = machines(2, 0);
  ms[1].last_session_end = kNow - seconds(60);
  auto p = plan(g, hour(false, 0), ms);
  CHECK(actions(p) == "Shutdown pool-01");  // never used since power-on: no settlement
  REQUIRE(p.recheck_at.has_value());
  CHECK(*p.recheck_at == kNow + seconds(240));
  auto later = plan(g, hour(false, 0), ms, kNow + seconds(240));
  CHECK(actions(later) == "Shutdown pool-02, Shutdown pool-01");
  CHECK(!later.recheck_at);
}

TEST_CASE("schedule: ShutdownDesktopsAfterUse powers off used machines after the settlement period") {
  GroupPolicy g;
  g.shutdown_after_use = true;
  g.settlement_before_auto_shutdown = seconds(120);
  g.peak_buffer_percent = 30;  // of 3 machines: 1
  auto ms = machines(2, 1);
  ms[0].last_session_end = kNow - seconds(30);  // logged off 30 s ago: draining
  ms[1].last_session_end = kNow - seconds(600);  // logged off long ago
  auto p = plan(g, hour(true, -1), ms);
  // pool-02 goes off now; pool-01 waits; neither counts as buffer, so pool-03 comes on.
  CHECK(actions(p) == "Shutdown pool-02, TurnOn pool-03");
  CHECK(p.actions[0].reason == kReasonPolicy);
  CHECK(p.actions[0].detail == "shutdown after use");
  CHECK(p.idle_unassigned_on == 0);
  REQUIRE(p.recheck_at.has_value());
  CHECK(*p.recheck_at == kNow + seconds(90));
  CHECK(actions(plan(g, hour(true, -1), ms, kNow + seconds(90))) == "Shutdown pool-01, Shutdown pool-02, TurnOn pool-03");
  // Off by default: used machines stay on.
  g.shutdown_after_use = false;
  CHECK(plan(g, hour(true, -1), ms).actions.empty());
  // It applies to assigned machines of Private groups too, where pools and buffers do not.
  GroupPolicy priv;
  priv.shared = false;
  priv.shutdown_after_use = true;
  auto personal = machines(2, 2, "desk-");
  for (auto& m : personal) m.assigned = true;
  personal[0].last_session_end = kNow - seconds(1);
  auto pp = plan(priv, hour(true, 4), personal);
  CHECK(pp.managed);
  CHECK(actions(pp) == "Shutdown desk-01");
}

TEST_CASE("schedule: only single-session groups are managed; odd machines are left alone") {
  GroupPolicy multi;
  multi.single_session = false;
  auto p = plan(multi, hour(true, 5), machines(0, 5));
  CHECK(!p.managed);
  CHECK(p.actions.empty());

  GroupPolicy g;
  std::vector<PoolMachine> ms{machine("a-unknown", PowerState::unknown), machine("b-suspended", PowerState::suspended),
                              machine("c-booting", PowerState::on), machine("d-turning-off", PowerState::turning_off),
                              machine("e-assigned", PowerState::off)};
  ms[2].registered = false;
  ms[4].assigned = true;
  auto up = plan(g, hour(true, 3), ms);
  CHECK(up.on == 1);                            // c-booting
  CHECK(actions(up) == "Resume b-suspended");  // not the unknown one, nor the assigned one
  // An unregistered machine that is on may be booting for a launch: not shut down for excess.
  CHECK(plan(g, hour(true, 0), ms).actions.empty());
}

TEST_CASE("schedule: private groups start assigned machines at the start of peak and stop them at the start of off-peak") {
  GroupPolicy g;
  g.shared = false;
  auto ms = machines(2, 3, "pc-");  // pc-01, pc-02 on; pc-03..05 off
  for (auto& m : ms) m.assigned = true;
  ms[4].assigned = false;  // pc-05: not assigned, never touched
  ms[1].sessions = 1;      // pc-02: in use
  ms[2].in_maintenance = true;
  auto peak = hour(true, -1);
  auto off_peak = hour(false, -1);
  peak.scheme = off_peak.scheme = "Weekdays";

  // No change of peak (or not known: the first pass after a start): nothing.
  CHECK(plan_pool(g, peak, ms, kNow).actions.empty());
  CHECK(plan_pool(g, peak, ms, kNow, true).actions.empty());
  CHECK(plan_pool(g, off_peak, ms, kNow, false).actions.empty());
  // Peak begins: the assigned machines that are off start (not the one in maintenance).
  auto began = plan_pool(g, peak, ms, kNow, false);
  CHECK(actions(began) == "TurnOn pc-04");
  CHECK(began.actions[0].reason == kReasonSchedule);
  CHECK(began.actions[0].detail.find("start of peak") != std::string::npos);
  // Off-peak begins: idle assigned machines that are on stop; the one in use stays.
  CHECK(actions(plan_pool(g, off_peak, ms, kNow, true)) == "Shutdown pc-01");
  // Off during peak: started again only with AutomaticPowerOnForAssignedDuringPeak.
  g.power_on_assigned_during_peak = true;
  CHECK(actions(plan_pool(g, peak, ms, kNow, true)) == "TurnOn pc-04");
  CHECK(actions(plan_pool(g, peak, ms, kNow)) == "TurnOn pc-04");
  CHECK(plan_pool(g, off_peak, ms, kNow, false).actions.empty());
  // Without a scheme for the day nothing happens.
  CHECK(plan_pool(g, hour(true, -1), ms, kNow, false).actions.empty());
  // From a delivery group object.
  auto obj = common::model::make_default(common::model::Kind::delivery_group, "Personal");
  obj.fields["desktop_kind"] = std::string("Private");
  obj.fields["automatic_power_on_for_assigned_during_peak"] = true;
  const auto read = group_policy(obj);
  CHECK_FALSE(read.shared);
  CHECK(read.power_on_assigned_during_peak);
}

TEST_CASE("schedule: the plan does not depend on the order of the machines") {
  GroupPolicy g;
  g.peak_buffer_percent = 25;
  auto ms = machines(5, 7);
  ms[1].sessions = 1;
  ms[6].pending = Action::turn_on;
  const std::string want = actions(plan(g, hour(true, 8), ms));
  CHECK(want == "TurnOn pool-06, TurnOn pool-08");  // pool-07 is being powered on already
  std::mt19937 rng(7);
  for (int i = 0; i < 20; ++i) {
    std::shuffle(ms.begin(), ms.end(), rng);
    CHECK(actions(plan(g, hour(true, 8), ms)) == want);
  }
}

TEST_CASE("schedule: end to end, a London pool across the spring-forward hour") {
  // Sunday scheme: pool size 1 until 00:59, 3 in hour 1 (never reached on 2026-03-29), 2 from 02:00.
  TimeScheme sunday = scheme("sunday", std::bitset<7>{1});
  sunday.pool_size.fill(2);
  sunday.pool_size[0] = 1;
  sunday.pool_size[1] = 3;
  const std::vector<TimeScheme> s{sunday};
  Object group = common::model::make_default(Kind::delivery_group, "pool");
  group.fields["time_zone"] = std::string("Europe/London");
  const GroupPolicy g = group_policy(group);
  CHECK(g.single_session);
  CHECK(g.shared);
  auto z = zone(group.text("time_zone"));
  auto ms = machines(1, 4);
  CHECK(plan_pool(g, evaluate(s, *z, at("2026-03-29T00:59:59Z")), ms, at("2026-03-29T00:59:59Z")).actions.empty());
  auto after = plan_pool(g, evaluate(s, *z, at("2026-03-29T01:00:00Z")), ms, at("2026-03-29T01:00:00Z"));
  CHECK(after.pool_target == 2);  // hour 2, not hour 1's 3
  CHECK(actions(after) == "TurnOn pool-02");
  CHECK(after.actions[0].detail == "pool size 2 (off-peak, 02:00): 1 on");
}

TEST_CASE("schedule: pool_machine reads a machine object and takes the live fields it is given") {
  Object m = common::model::make_default(Kind::machine, "DEMO\\pool-1");
  m.fields["power_state"] = std::string("On");
  m.fields["in_maintenance_mode"] = true;
  // The stored registration_state and session_count are not live state: ignored.
  m.fields["registration_state"] = std::string("Registered");
  m.fields["session_count"] = std::int64_t{3};
  const PoolMachine p = pool_machine(m, false, 1);
  CHECK(p.name == "DEMO\\pool-1");
  CHECK(p.power == PowerState::on);
  CHECK_FALSE(p.registered);
  CHECK(p.sessions == 1);
  CHECK(p.in_maintenance);
  CHECK(pool_machine(m, true, 0).registered);
  CHECK(pool_machine(m, true, 0).sessions == 0);
  CHECK(pool_machine(m, true, -4).sessions == 0);
  m.fields["power_state"] = std::string("Unmanaged");
  CHECK(pool_machine(m, true, 0).power == PowerState::unknown);
}
