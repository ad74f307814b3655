// tools/broker-bench/scenarios_agents.cpp: the scenarios driven by agents alone: `register` (the
// enrollment storm, then the reboot storm with secrets) and `steady` (registered agents
// heartbeating: the broker's CPU and memory per agent).
#include "tools/broker-bench/run.hpp"

#include <thread>

namespace bench {
namespace {

// Broker memory per registered agent: the RSS growth since before the agents connected.
void memory_per_agent(Phase& p, const Snapshot& before_agents, const Snapshot& now, int agents) {
  if (!before_agents.broker.ok || !now.broker.ok || agents <= 0) return;
  const double grown = static_cast<double>(now.broker.rss_kib) - static_cast<double>(before_agents.broker.rss_kib);
  p.figures.push_back({"broker RSS before the agents",
                       format_fixed(static_cast<double>(before_agents.broker.rss_kib) / 1024, 1) + " MiB"});
  p.figures.push_back({"memory per registered agent",
                       format_fixed(grown / agents, 1) + " KiB (RSS growth since before the agents / agents)"});
}

int machines_or_default(Run& run) { return run.options().machines > 0 ? run.options().machines : 1000; }

// The site of the agent scenarios: one shared group of n machines; the heartbeat interval from
// the options, else `heartbeat_default` seconds.
SiteOptions shared_site(Run& run, int n, int heartbeat_default) {
  const auto& o = run.options();
  SiteOptions site;
  site.kind = Kind::shared;
  site.machines = n;
  site.users = o.users >= 0 ? o.users : 10;
  site.applications = o.applications;
  site.heartbeat_interval_seconds = o.heartbeat_interval > 0 ? o.heartbeat_interval : heartbeat_default;
  return site;
}

}  // namespace

int scenario_register(Run& run) {
  const int n = machines_or_default(run);
  if (!run.start_broker(shared_site(run, n, 60))) return run.finish();
  run.wait_quiet();
  const Snapshot before_agents = run.snapshot();
  run.start_agents(Kind::shared, n);

  Phase enroll = run.registration_storm("enroll", "start", n);
  run.report().phases.push_back(enroll);

  // The reboot storm: every agent says goodbye, then all come back at once with their secrets.
  const auto stopped = run.agents().totals("stop");
  run.report().check("reboot: every agent stopped", stopped.count("left") && stopped.at("left") == 0);
  run.report().check("reboot: the broker closed every agent connection", run.wait_agents_gone());
  Phase reboot = run.registration_storm("reboot", "start", n);
  const Snapshot after = run.snapshot();
  memory_per_agent(reboot, before_agents, after, n);
  const long long enrolled_again = run.agents().totals("counts").at("enrolled");
  run.report().check("reboot: every agent used its secret (none enrolled again)", enrolled_again == 0,
                     std::to_string(enrolled_again) + " enrollments in the reboot");
  run.report().phases.push_back(reboot);
  return run.finish();
}

int scenario_steady(Run& run) {
  const auto& o = run.options();
  const int n = machines_or_default(run);
  if (!run.start_broker(shared_site(run, n, 20))) return run.finish();
  run.wait_quiet();
  const Snapshot before_agents = run.snapshot();
  run.start_agents(Kind::shared, n);
  run.report().phases.push_back(run.registration_storm("enroll", "start", n));

  Phase p;
  p.name = "steady";
  p.op = "heartbeat";
  run.agents().all("mark");
  const Totals t0 = run.agents().totals("status");
  const Snapshot s0 = run.snapshot();
  const auto start = std::chrono::steady_clock::now();
  const auto hold = std::chrono::duration<double>(o.duration_seconds);
  {
    Progress progress(run.progress_enabled(), [&] {
      return "[steady] " +
             format_fixed(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 0) + " of " +
             format_fixed(o.duration_seconds, 0) + " s, broker RSS " +
             format_fixed(static_cast<double>(run.broker().usage().rss_kib) / 1024, 1) + " MiB";
    });
    while (std::chrono::steady_clock::now() - start < hold) std::this_thread::sleep_for(Millis{100});
  }
  const Snapshot s1 = run.snapshot();
  const Totals t1 = run.agents().totals("status");
  p.seconds = std::chrono::duration<double>(s1.at - s0.at).count();
  p.ops = t1.at("heartbeats") - t0.at("heartbeats");
  run.usage(p, s0, s1);
  memory_per_agent(p, before_agents, s1, n);
  p.figures.push_back({"broker CPU while idle", format_fixed(p.usage.cpu_seconds * 100 / std::max(p.seconds, 1e-9), 2) +
                                                    " % of one core for " + std::to_string(n) + " agents"});
  const Totals c = run.agents().totals("counts");
  if (c.at("registered") > 0) p.errors["re-registrations"] = c.at("registered");
  if (c.at("ended") > 0) p.errors["connections ended"] = c.at("ended");
  run.report().check("steady: every agent still registered", t1.at("registered") == n,
                     std::to_string(t1.at("registered")) + " of " + std::to_string(n));
  run.report().check(
      "steady: no connection dropped", c.at("ended") == 0 && c.at("registered") == 0,
      std::to_string(c.at("ended")) + " ended, " + std::to_string(c.at("registered")) + " registered again");
  run.report().phases.push_back(p);
  return run.finish();
}

}  // namespace bench
