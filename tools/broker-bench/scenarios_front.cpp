// tools/broker-bench/scenarios_front.cpp: the scenarios driven by front ends: `enumerate`
// (RequestAppData: trusted, cold passwords, warm credential cache), `logon` (each user enumerates
// then launches a desktop; the agents redeem the tickets and the sessions go Active) and `mixed`
// (logons while agents re-register and an admin lists machines).
#include "tools/broker-bench/run.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <set>
#include <thread>

namespace bench {
namespace {
using Clock = std::chrono::steady_clock;

// Runs `items` front-end items as one phase; `samples` gets what the front ends recorded (the
// latency lists are summarized into the phase).
// `before_run` / `after_run` (optional) start and end what runs alongside the front ends.
Phase front_phase(Run& run, FrontEnds& fe, const std::string& name, const std::string& op, std::size_t items,
                  const std::function<void(std::size_t, Connection&)>& work, Samples& samples,
                  const std::function<void()>& before_run = {}, const std::function<void()>& after_run = {}) {
  Phase p;
  p.name = name;
  p.op = op;
  run.wait_quiet();
  fe.take();
  const Snapshot s0 = run.snapshot();
  if (before_run) before_run();
  {
    Progress progress(run.progress_enabled(), [&] {
      const double s = std::chrono::duration<double>(Clock::now() - s0.at).count();
      return "[" + name + "] " + std::to_string(fe.done()) + "/" + std::to_string(items) + " " + op + "s, " +
             format_fixed(static_cast<double>(fe.done()) / std::max(s, 1e-9), 0) + "/s";
    });
    p.ops = static_cast<long long>(fe.run(items, run.options().phase_limit, work));
  }
  p.seconds = std::chrono::duration<double>(Clock::now() - s0.at).count();
  if (after_run) after_run();
  run.wait_quiet();
  const Snapshot s1 = run.snapshot();
  samples = fe.take();
  for (const auto& [type, v] : samples.latency_ms) p.latency[type] = summarize(v);
  p.errors = samples.errors;
  run.usage(p, s0, s1);
  if (static_cast<std::size_t>(p.ops) < items)
    p.figures.push_back(
        {"stopped by the phase limit", std::to_string(items - static_cast<std::size_t>(p.ops)) + " items not run"});
  return p;
}

long long answered(const Samples& s, const std::string& type) {
  auto it = s.bytes.find(type);
  return it == s.bytes.end() ? 0 : it->second.first;
}

long long error_count(const Samples& s, const std::string& type) {
  long long n = 0;
  for (const auto& [what, count] : s.errors)
    if (what.rfind(type + ":", 0) == 0) n += count;
  return n;
}

// Machine index of a reported address ("198.18.0.7:1494" -> 6), -1 when not one of ours.
int machine_index(const std::string& address) {
  const auto colon = address.find(':');
  in_addr a{}, base{};
  if (::inet_pton(AF_INET, address.substr(0, colon).c_str(), &a) != 1 || ::inet_pton(AF_INET, "198.18.0.1", &base) != 1)
    return -1;
  const long long d = static_cast<long long>(ntohl(a.s_addr)) - static_cast<long long>(ntohl(base.s_addr));
  return d >= 0 && d < (1 << 20) ? static_cast<int>(d) : -1;
}

struct LaunchRecord {
  std::int64_t sent_ns = 0;
  bool answered = false;  // HTTP 200 with an address or an ErrorId
  std::string address;    // ServerAddress on success
};

struct LaunchOutcome {
  long long answered = 0, succeeded = 0, duplicates = 0;
  std::map<std::string, std::int64_t> sent_by_machine;  // single-session: machine -> RequestAddress sent
};

LaunchOutcome tally(const std::vector<LaunchRecord>& records, Kind kind, int machines) {
  LaunchOutcome out;
  std::set<std::string> seen;
  for (const auto& r : records) {
    if (!r.answered) continue;
    ++out.answered;
    if (r.address.empty()) continue;
    ++out.succeeded;
    if (kind != Kind::hosted && !seen.insert(r.address).second) ++out.duplicates;
    const int idx = machine_index(r.address);
    if (kind != Kind::hosted && idx >= 0 && idx < machines)
      out.sent_by_machine[machine_name(kind, idx, machines)] = r.sent_ns;
  }
  return out;
}

// The logon work item of user `u`: RequestAppData, then RequestAddress for the desktop.
std::function<void(std::size_t, Connection&)> logon_work(std::vector<LaunchRecord>& records, int users, Kind kind,
                                                         Credentials cred) {
  return [&records, users, kind, cred](std::size_t i, Connection& c) {
    const int u = static_cast<int>(i % static_cast<std::size_t>(users));
    c.post_xml("RequestAppData", kNfusePath, request_app_data(u, cred));
    LaunchRecord& r = records[i];
    r.sent_ns = now_ns();
    const Reply rep = c.post_xml("RequestAddress", kNfusePath, request_address(u, group_name(kind), cred));
    r.answered = rep.status == 200 && (!rep.error_id.empty() || !element_text(rep.body, "ServerAddress").empty());
    if (rep.status == 200 && rep.error_id.empty()) r.address = element_text(rep.body, "ServerAddress");
  };
}

// Waits until the agents saw `expected` logons since mark (bounded); returns them.
long long wait_logons(Run& run, long long expected) {
  const auto deadline = Clock::now() + std::min<Millis>(run.options().phase_limit, Millis{120000});
  long long seen = 0;
  while (Clock::now() < deadline) {
    const Totals c = run.agents().totals("counts");
    seen = c.at("logons") + c.at("failed_logons");
    if (seen >= expected) break;
    std::this_thread::sleep_for(Millis{100});
  }
  return run.agents().totals("counts").at("logons");
}

void add_ratio_figures(Report& report, Phase& phase, const std::string& ceiling_phase) {
  for (const auto& c : report.ceilings)
    if (c.phase == ceiling_phase && c.error.empty() && c.rate() > 0)
      phase.figures.push_back(
          {"against the " + c.server + " ceiling", format_fixed(phase.rate() / c.rate() * 100, 1) + " %"});
}

}  // namespace

int scenario_enumerate(Run& run) {
  const auto& o = run.options();
  const int n = o.machines >= 0 ? o.machines : 1000;
  const int users = o.users > 0 ? o.users : 1000;
  const std::size_t requests = o.requests > 0 ? static_cast<std::size_t>(o.requests) : 5000;
  SiteOptions site;
  site.kind = Kind::shared;
  site.machines = n;
  site.users = users;
  site.applications = o.applications;
  site.credential_cache_seconds = 3600;
  if (!run.start_broker(site)) return run.finish();
  if (n > 0) {
    run.start_agents(Kind::shared, n);
    run.report().phases.push_back(run.registration_storm("enroll", "start", n));
  }
  run.report().parameters.push_back({"front ends", std::to_string(o.connections) + " keep-alive connections"});
  FrontEnds fe(run.broker().xml_url(), o.connections);
  auto appdata = [users](Credentials cred) {
    return [users, cred](std::size_t i, Connection& c) {
      c.post_xml("RequestAppData", kNfusePath,
                 request_app_data(static_cast<int>(i % static_cast<std::size_t>(users)), cred));
    };
  };
  Samples trusted_s, cold_s, warm_s;
  Phase trusted = front_phase(run, fe, "trusted", "enumeration", requests, appdata(Credentials::trusted), trusted_s);
  trusted.figures.push_back({"credentials", "user name from a trusted front end (no password)"});
  // cold: every user once, with a password; which users the broker checked (and so cached).
  std::vector<char> checked(static_cast<std::size_t>(users), 0);
  auto cold_work = [&checked](std::size_t i, Connection& c) {
    const Reply r =
        c.post_xml("RequestAppData", kNfusePath, request_app_data(static_cast<int>(i), Credentials::password));
    checked[i] = r.status == 200 && r.error_id.empty();
  };
  Phase cold = front_phase(run, fe, "cold", "enumeration", static_cast<std::size_t>(users), cold_work, cold_s);
  cold.figures.push_back({"credentials", "password, credential cache empty: one PBKDF2 check per request"});
  // Warm-up (not measured): the users the cold phase could not check (password checks refused
  // under load) are checked again, two at a time, so that the warm phase finds every user cached.
  {
    FrontEnds slow(run.broker().xml_url(), 2);
    for (int round = 0; round < 5; ++round) {
      std::vector<std::size_t> missing;
      for (std::size_t u = 0; u < checked.size(); ++u)
        if (!checked[u]) missing.push_back(u);
      if (missing.empty()) break;
      slow.run(missing.size(), run.options().phase_limit, [&](std::size_t i, Connection& c) {
        const Reply r = c.post_xml("RequestAppData", kNfusePath,
                                   request_app_data(static_cast<int>(missing[i]), Credentials::password));
        checked[missing[i]] = r.status == 200 && r.error_id.empty();
      });
    }
    const auto left = std::count(checked.begin(), checked.end(), 0);
    if (left > 0) cold.figures.push_back({"users still not cached before 'warm'", std::to_string(left)});
  }
  Phase warm = front_phase(run, fe, "warm", "enumeration", requests, appdata(Credentials::password), warm_s);
  warm.figures.push_back({"credentials", "password, credential cache warm (every user checked once in 'cold')"});
  for (auto* ph : {&trusted, &warm}) {
    const auto& s = ph == &trusted ? trusted_s : warm_s;
    run.report().check(ph->name + ": every request answered without error",
                       answered(s, "RequestAppData") == ph->ops && error_count(s, "RequestAppData") == 0 &&
                           ph->ops == static_cast<long long>(requests),
                       std::to_string(answered(s, "RequestAppData")) + " answered of " + std::to_string(requests) +
                           ", " + std::to_string(error_count(s, "RequestAppData")) + " errors");
  }
  run.report().check("cold: every request answered", answered(cold_s, "RequestAppData") == users,
                     std::to_string(answered(cold_s, "RequestAppData")) + " of " + std::to_string(users) +
                         " (password checks refused under load count as answered)");
  const ReplySizes sizes{{"RequestAppData", static_cast<std::size_t>(warm_s.mean_bytes("RequestAppData"))}};
  run.ceilings("warm", warm.rate(), sizes, requests, [](std::size_t i, Connection& c) {
    c.post_xml("RequestAppData", "/RequestAppData",
               request_app_data(static_cast<int>(i % 1000), Credentials::password));
  });
  add_ratio_figures(run.report(), trusted, "warm");
  add_ratio_figures(run.report(), warm, "warm");
  for (auto* ph : {&trusted, &cold, &warm}) run.report().phases.push_back(*ph);
  return run.finish();
}

namespace {

// The logon storm on `kind` machines; used by `logon` and (with disturbances) `mixed`.
Phase logon_phase(Run& run, FrontEnds& fe, const std::string& name, Kind kind, int machines, int users,
                  Credentials cred, std::vector<LaunchRecord>& records, Samples& samples, LaunchOutcome& outcome,
                  const std::function<void()>& before_run = {}, const std::function<void()>& after_run = {}) {
  records.assign(static_cast<std::size_t>(users), {});
  run.agents().all("mark");
  Phase p = front_phase(run, fe, name, "logon", static_cast<std::size_t>(users), logon_work(records, users, kind, cred),
                        samples, before_run, after_run);
  outcome = tally(records, kind, machines);
  std::int64_t first_sent = 0;
  for (const auto& r : records)
    if (r.sent_ns > 0 && (first_sent == 0 || r.sent_ns < first_sent)) first_sent = r.sent_ns;
  const long long active = wait_logons(run, outcome.succeeded);
  const Events ev = run.agents().events();
  std::vector<double> to_active;
  std::int64_t last_active = 0;
  for (auto t : ev.logons) last_active = std::max(last_active, t);
  for (const auto& [machine, t] : ev.logon_by_machine) {
    auto it = outcome.sent_by_machine.find(machine);
    if (it != outcome.sent_by_machine.end()) to_active.push_back(static_cast<double>(t - it->second) / 1e6);
  }
  if (!to_active.empty()) p.latency["launch to Active (agent)"] = summarize(to_active);
  p.figures.push_back({"launches answered", std::to_string(outcome.answered) + " of " + std::to_string(p.ops)});
  p.figures.push_back({"launches that got a machine", std::to_string(outcome.succeeded)});
  p.figures.push_back({"sessions Active at the agents", std::to_string(active)});
  if (active > outcome.succeeded)
    p.figures.push_back({"sessions Active beyond the launches answered with a machine",
                         std::to_string(active - outcome.succeeded) +
                             " (machines a launch gave up on still took the logon; the simulated client connects"
                             " at prepare_session, a real one only with the address)"});
  if (first_sent > 0 && last_active > first_sent)
    p.figures.push_back({"first RequestAddress to last session Active",
                         format_fixed(static_cast<double>(last_active - first_sent) / 1e9, 3) + " s"});
  return p;
}

}  // namespace

int scenario_logon(Run& run) {
  const auto& o = run.options();
  const Kind kind = o.kind;
  const int n = o.machines > 0 ? o.machines : (kind == Kind::hosted ? 100 : 1000);
  const int users = o.users > 0 ? o.users : (kind == Kind::hosted ? n * o.max_sessions / 2 : n);
  SiteOptions site;
  site.kind = kind;
  site.machines = n;
  site.users = users;
  site.applications = o.applications;
  if (!run.start_broker(site)) return run.finish();
  run.start_agents(kind, n);
  run.report().phases.push_back(run.registration_storm("enroll", "start", n));
  run.report().parameters.push_back(
      {"front ends",
       std::to_string(o.connections) + " keep-alive connections, " +
           (o.credentials == Credentials::trusted ? "trusted (user names without passwords)" : "passwords")});
  FrontEnds fe(run.broker().xml_url(), o.connections);
  std::vector<LaunchRecord> records;
  Samples s;
  LaunchOutcome out;
  Phase p = logon_phase(run, fe, "logon", kind, n, users, o.credentials, records, s, out);
  const Totals st = run.agents().totals("status");
  const bool capacity = kind == Kind::hosted ? static_cast<long long>(n) * o.max_sessions >= users : n >= users;
  run.report().check("every launch answered", out.answered == users && p.ops == users,
                     std::to_string(out.answered) + " of " + std::to_string(users));
  if (capacity)
    run.report().check("every launch got a machine", out.succeeded == users,
                       std::to_string(out.succeeded) + " of " + std::to_string(users));
  else
    run.report().notes.push_back("more users than session slots: launches without a machine are expected");
  run.report().check("no machine with two sessions (or more than it can hold)",
                     st.at("overfull") == 0 && out.duplicates == 0,
                     std::to_string(st.at("overfull")) + " overfull machines, " + std::to_string(out.duplicates) +
                         " addresses handed out twice");
  run.report().check("every agent registered", st.at("registered") == n,
                     std::to_string(st.at("registered")) + " of " + std::to_string(n));
  run.report().check(
      "every launched session went Active", st.at("logons") >= out.succeeded && st.at("failed_logons") == 0,
      std::to_string(st.at("logons")) + " logons, " + std::to_string(st.at("failed_logons")) + " refused");
  run.report().phases.push_back(p);

  const ReplySizes sizes{{"RequestAppData", static_cast<std::size_t>(s.mean_bytes("RequestAppData"))},
                         {"RequestAddress", static_cast<std::size_t>(s.mean_bytes("RequestAddress"))}};
  if (o.logoff) {
    Phase lp;
    lp.name = "logoff";
    lp.op = "logoff";
    const Snapshot s0 = run.snapshot();
    lp.ops = run.agents().totals("logoff").at("n");
    run.wait_quiet();
    const Snapshot s1 = run.snapshot();
    lp.seconds = std::chrono::duration<double>(s1.at - s0.at).count();
    run.usage(lp, s0, s1);
    lp.figures.push_back({"seconds", "from the agents' LoggedOff events to the broker being idle again"});
    run.report().phases.push_back(lp);
  }
  const Credentials cred = o.credentials;
  run.ceilings("logon", p.rate(), sizes, static_cast<std::size_t>(users), [cred, kind](std::size_t i, Connection& c) {
    const int u = static_cast<int>(i % 1000);
    c.post_xml("RequestAppData", "/RequestAppData", request_app_data(u, cred));
    c.post_xml("RequestAddress", "/RequestAddress", request_address(u, group_name(kind), cred));
  });
  for (auto& ph : run.report().phases)
    if (ph.name == "logon") add_ratio_figures(run.report(), ph, "logon");
  return run.finish();
}

constexpr Millis kAdminInterval{100};

int scenario_mixed(Run& run) {
  const auto& o = run.options();
  const int n = o.machines > 0 ? o.machines : 1000;
  const int users = o.users > 0 ? o.users : n / 2;
  SiteOptions site;
  site.kind = Kind::shared;
  site.machines = n;
  site.users = users;
  site.applications = o.applications;
  if (!run.start_broker(site)) return run.finish();
  run.start_agents(Kind::shared, n);
  run.report().phases.push_back(run.registration_storm("enroll", "start", n));
  run.report().parameters.push_back(
      {"disturbances", format_fixed(o.reregister_percent, 0) +
                           " % of the agents drop their connection and re-register, spread over " +
                           format_fixed(o.spread_seconds, 0) +
                           " s; one admin lists a page of 100 machines every 100 ms while the logons run"});
  FrontEnds fe(run.broker().xml_url(), o.connections);
  std::atomic<bool> done{false};
  Connection admin(run.broker().admin_url(), Millis{60000});
  std::thread admin_thread;
  std::vector<LaunchRecord> records;
  Samples s;
  LaunchOutcome out;
  // Alongside the logons: the re-registrations, and an admin listing a page of machines every
  // kAdminInterval (one connection).
  auto start_disturbances = [&] {
    run.agents().all("interrupt " + format_fixed(o.reregister_percent, 3) + " " +
                     std::to_string(static_cast<long long>(o.spread_seconds * 1000)));
    admin_thread = std::thread([&] {
      const auto deadline = Clock::now() + o.phase_limit;
      auto next = Clock::now();
      for (int page = 0; page < 1000000 && !done && Clock::now() < deadline; ++page) {
        const int offset = (page * 100) % std::max(1, n);
        admin.request("admin machine list", "GET", "/api/v1/machines?limit=100&offset=" + std::to_string(offset), {},
                      {{"Authorization", std::string("Bearer ") + kAdminToken}});
        next += kAdminInterval;
        while (!done && Clock::now() < next) std::this_thread::sleep_for(Millis{5});
      }
    });
  };
  auto stop_disturbances = [&] {
    done = true;
    admin_thread.join();
  };
  Phase p = logon_phase(run, fe, "mixed", Kind::shared, n, users, o.credentials, records, s, out, start_disturbances,
                        stop_disturbances);
  Samples a = std::move(admin.samples());
  for (auto& [type, v] : a.latency_ms) p.latency[type] = summarize(v);
  for (auto& [what, count] : a.errors) p.errors[what] += count;
  // The re-registrations go on after the logons: wait for them (bounded) before the checks.
  const auto deadline = Clock::now() + o.phase_limit;
  Totals st = run.agents().totals("status");
  while (st.at("registered") < n && Clock::now() < deadline) {
    std::this_thread::sleep_for(Millis{250});
    st = run.agents().totals("status");
  }
  const Totals counts = run.agents().totals("counts");
  p.figures.push_back({"re-registrations during the phase", std::to_string(counts.at("registered"))});
  p.figures.push_back({"admin machine lists", std::to_string(p.latency["admin machine list"].count)});
  run.report().check("every launch answered", out.answered == users && p.ops == users,
                     std::to_string(out.answered) + " of " + std::to_string(users));
  run.report().check("no machine with two sessions", st.at("overfull") == 0 && out.duplicates == 0,
                     std::to_string(st.at("overfull")) + " overfull machines, " + std::to_string(out.duplicates) +
                         " addresses handed out twice");
  run.report().check("every agent registered at the end", st.at("registered") == n,
                     std::to_string(st.at("registered")) + " of " + std::to_string(n));
  run.report().phases.push_back(p);
  return run.finish();
}

}  // namespace bench
