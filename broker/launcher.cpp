// broker/launcher.cpp: see launcher.hpp.
#include "broker/launcher.hpp"

#include "broker/agent_registry.hpp"
#include "broker/entitlements.hpp"
#include "broker/session_keys.hpp"
#include "common/clock.hpp"
#include "common/crypto.hpp"
#include "common/log.hpp"
#include "common/model.hpp"
#include "common/timers.hpp"
#include "common/work_queue.hpp"
#include "storage/repository.hpp"

#include <boost/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <future>
#include <random>
#include <utility>

namespace broker {

using common::Result;
using common::Status;
using common::errc;
using common::make_error;
using common::model::Kind;
using common::model::Object;
using identity::iequals;

namespace {

constexpr std::chrono::hours kLoggedOffRetention{24};  // docs/cbp.md "Session states"

constexpr std::int64_t kFullLoad = 10000;
constexpr std::int64_t kLaunchLoadBump = 500;  // effective load added per launch until the agent reports

std::string upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  return s;
}

bool contains_ci(const std::vector<std::string>& list, std::string_view v) {
  return std::any_of(list.begin(), list.end(), [&](const std::string& e) { return iequals(e, v); });
}

bool is_user(const identity::UserIdentity& u, std::string_view name) {
  return !name.empty() && (iequals(name, u.qualified_name) || iequals(name, u.user_name) ||
                           (!u.upn.empty() && iequals(name, u.upn)));
}

// An assignment names the user, one of the user's groups, or the client's address.
bool assignment_matches(const Object& a, const identity::UserIdentity& u, const std::string& client_address) {
  const auto user = a.text("user");
  if (!user.empty()) return is_user(u, user) || contains_ci(u.groups, user);
  const auto ip = a.text("client_ip");
  return !ip.empty() && ip == client_address;
}

storage::AuditEntry launch_audit(const std::string& action, const std::string& object, boost::json::object detail) {
  storage::AuditEntry e;
  e.actor = "broker";
  e.action = action;
  e.kind = "session";
  e.object = object;
  e.after = boost::json::serialize(detail);
  return e;
}

struct Site {
  Object settings;
  SiteSnapshot snapshot;
  std::vector<Object> sessions;
  std::map<std::string, Object, std::less<>> catalogs;

  const Object* find(const std::vector<Object>& list, std::string_view name) const {
    for (const auto& o : list)
      if (o.name == name) return &o;
    return nullptr;
  }
};

// Powered off (or on its way up) and not known to be broken.
bool can_power_on(const Object& m) {
  const auto p = m.text("power_state");
  const auto f = m.text("fault_state", "None");
  if (f == "FailedToStart" || f == "StuckOnBoot" || f == "VirtualMachineNotFound") return false;
  return p == "Off" || p == "Suspended" || p == "TurningOn" || p == "Resuming";
}

bool booting(const Object& m) {
  const auto p = m.text("power_state");
  return p == "TurningOn" || p == "Resuming";
}

// A machine power management can start for a launch: its catalog names a hypervisor connection,
// and it is off (or on its way up) without a fault.
bool power_managed(const Site& site, const Object& m) {
  const auto it = site.catalogs.find(m.text("catalog"));
  return it != site.catalogs.end() && !it->second.text("hypervisor_connection").empty() && can_power_on(m);
}

Result<Site> read_site(storage::Transaction& tx) {
  Site s;
  storage::Query all;
  auto settings = tx.get(Kind::site, "site");
  s.settings = settings ? std::move(*settings) : common::model::make_default(Kind::site, "site");
  auto load = [&](Kind k, std::vector<Object>& into) -> Status {
    auto r = tx.list(k, all);
    if (!r) return r.error();
    into = std::move(*r);
    return {};
  };
  for (auto [k, v] : {std::pair{Kind::delivery_group, &s.snapshot.groups}, {Kind::rule, &s.snapshot.rules},
                      {Kind::application, &s.snapshot.applications}, {Kind::machine, &s.snapshot.machines},
                      {Kind::assignment, &s.snapshot.assignments}, {Kind::session, &s.sessions}})
    if (auto st = load(k, *v); !st) return st.error();
  // Logged-off sessions are history: nothing to reconnect to, nothing in use.
  std::erase_if(s.sessions, [](const Object& o) { return o.text("state") == "LoggedOff"; });
  std::vector<Object> catalogs;
  if (auto st = load(Kind::catalog, catalogs); !st) return st.error();
  for (auto& c : catalogs) s.catalogs.emplace(c.name, std::move(c));
  return s;
}

// What was reserved for one attempt, and how to undo it.
struct Reservation {
  std::string machine, address, dns_name, group;
  std::int64_t machine_id = 0;
  std::string session_key, ticket;  // session_key: the stored session's name
  std::string agent_key;            // the key the agent knows the session by (session_keys.hpp)
  bool reconnect = false;
  bool disconnect_first = false;  // the session is active elsewhere: disconnect it, then reconnect
  std::string new_assignment;     // made by this launch (undone when the launch fails)
  PrepareSession prepare;
};

struct Candidate {
  const Object* machine = nullptr;
  std::int64_t load = 0;
};

}  // namespace

std::string_view to_string(LaunchFailure f) {
  switch (f) {
    case LaunchFailure::none: return "None";
    case LaunchFailure::not_entitled: return "NotEntitled";
    case LaunchFailure::resource_disabled: return "ResourceDisabled";
    case LaunchFailure::group_disabled: return "DeliveryGroupDisabled";
    case LaunchFailure::group_in_maintenance: return "DeliveryGroupInMaintenance";
    case LaunchFailure::no_machines: return "NoMachines";
    case LaunchFailure::all_unregistered: return "AllMachinesUnregistered";
    case LaunchFailure::all_in_maintenance: return "AllMachinesInMaintenance";
    case LaunchFailure::all_in_use: return "AllMachinesInUse";
    case LaunchFailure::tag_mismatch: return "TagMismatch";
    case LaunchFailure::instance_limit: return "InstanceLimit";
    case LaunchFailure::assignment_limit: return "AssignmentLimit";
    case LaunchFailure::prepare_failed: return "SessionPrepareFailure";
    case LaunchFailure::no_session: return "NoSessionToReconnect";
    case LaunchFailure::storage_error: return "StorageError";
    case LaunchFailure::powering_on: return "PoweringOn";
    case LaunchFailure::power_throttled: return "PowerActionThrottled";
    case LaunchFailure::registration_timeout: return "RegistrationTimeout";
  }
  return "Unknown";
}

std::string new_logon_ticket() { return upper(common::crypto::random_hex(15)); }

struct Launcher::Impl : std::enable_shared_from_this<Launcher::Impl> {
  storage::Repository& repo;
  common::Clock& clock;
  AgentChannel& agents;
  common::WorkQueue& work;
  std::shared_ptr<spdlog::logger> log;
  LauncherOptions opts;

  std::mutex decide_mutex;  // the in-memory selection state; taken inside write transactions only
  struct Bump {
    std::int64_t reported = 0;  // the machine's load_index when the bump began
    std::int64_t extra = 0;
  };
  std::map<std::string, Bump> bumps;  // guarded by decide_mutex
  std::mt19937_64 rng{std::random_device{}()};  // guarded by decide_mutex
  std::atomic<int> inflight{0};
  PowerControl* power = nullptr;

  // Machines powered on for a launch, held for its user until they register (and claim_hold
  // after) or until the registration timeout.
  struct BootClaim {
    std::string user;          // qualified name
    common::SysTime deadline;  // powered on + timeout
    std::chrono::seconds timeout{0};  // the site's registration_wait_timeout_seconds
    std::optional<common::SysTime> registered_at;
  };
  std::map<std::string, BootClaim> claims;  // by machine; guarded by decide_mutex

  struct Attempt;
  std::mutex wait_mutex;
  // Launches waiting for a machine to register; whoever takes an attempt out of here (the
  // registration or its timer) carries it on.
  std::map<std::string, std::vector<std::shared_ptr<Attempt>>> waiting;  // by machine; guarded by wait_mutex
  std::uint64_t wait_ids = 0;  // guarded by wait_mutex
  bool stopped = false;        // guarded by wait_mutex: stop() has begun, nobody parks any more
  common::Timers timers;

  Impl(storage::Repository& r, common::Clock& c, AgentChannel& a, common::WorkQueue& w,
       std::shared_ptr<spdlog::logger> l, LauncherOptions o)
      : repo(r), clock(c), agents(a), work(w), log(std::move(l)), opts(std::move(o)) {}

  // Wraps the reply to a command about stored session `name` of `machine`: when the agent answers
  // that it has no such session (it restarted without it, or it ended unseen), the stored session
  // is ended at once (LoggedOff, audit session-ended NotOnAgent) before `done` is called.
  AgentChannel::Done ending_missing(const std::string& machine, const std::string& name, AgentChannel::Done done) {
    auto self = shared_from_this();
    return [self, machine, name, done = std::move(done)](bool ok, const std::string& error) {
      if (ok || error != kNoSuchSession) return done(ok, error);
      auto end = [self, machine, name, done, error] {
        self->end_missing(machine, name);
        done(false, error);
      };
      if (!self->work.post(end)) done(false, error);
    };
  }

  void end_missing(const std::string& machine, const std::string& name) {
    const auto now = common::format_time(clock.now());
    bool ended = false;
    auto st = repo.write([&](storage::Transaction& tx) -> Status {
      auto s = tx.get(Kind::session, name);
      if (!s && s.error().code == errc::not_found) return {};
      if (!s) return s.error();
      if (s->text("machine") != machine || s->text("state") == "LoggedOff") return {};
      Object updated = *s;
      updated.fields["state"] = std::string("LoggedOff");
      updated.fields["state_change_time"] = now;
      updated.fields["end_time"] = now;
      if (auto r = tx.update(name, updated); !r) return r.error();
      if (s->text("state") == "PreparingNewSession") {
        auto m = tx.get(Kind::machine, machine);
        if (!m) return m.error();
        Object failed = *m;
        failed.fields["last_connection_failure"] = std::string("SessionPreparation");
        if (auto r = tx.update(machine, failed); !r) return r.error();
      }
      if (auto r = refresh_summary(tx, machine); !r) return r;
      ended = true;
      return tx.append_audit(launch_audit("session-ended", name,
                                          {{"user", s->text("user_name")}, {"machine", machine},
                                           {"state", s->text("state")}, {"reason", "NotOnAgent"}}));
    });
    if (!st) log->warn("session {} on {}: the agent no longer has it, but it cannot be ended: {}", name, machine,
                       st.error().describe());
    else if (ended) log->info("session {} on {}: the agent no longer has it; ended (NotOnAgent)", name, machine);
  }

  struct Attempt {
    LaunchRequest request;
    std::function<void(LaunchResult)> done;
    std::set<std::string> tried;
    int attempts = 0;
    std::string last_error;
    std::string power_on;  // decide() chose a machine to power on (done after the transaction)
    std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
    std::chrono::seconds registration_timeout{180};  // the site's registration_wait_timeout_seconds
    std::chrono::milliseconds power_on_wait{0};       // opts.power_on_wait, else the site's setting
    // Waiting for this machine to register (guarded by wait_mutex); the answer if the wait ends first.
    std::string wait_machine;
    LaunchResult wait_outcome;
    std::uint64_t wait_timer = 0;         // which wait (0: none); guarded by wait_mutex
    std::uint64_t wait_timer_handle = 0;  // its common::Timers id; guarded by wait_mutex
    std::vector<std::string> timed_out;  // machines powered on for it that never registered
  };

  static LaunchResult failed(LaunchFailure f, std::string message) {
    LaunchResult r;
    r.failure = f;
    r.message = std::move(message);
    return r;
  }

  // The sealed credential data of a ticket (bound to its hash and machine).
  Result<std::string> seal_credential(const Credential& c, const std::string& ticket_hash, const std::string& machine) {
    boost::json::object o;
    for (const auto& [k, v] : c.data) o[k] = v;
    const auto plain = boost::json::serialize(o);
    if (opts.credential_key.empty()) return plain;
    return common::crypto::seal(opts.credential_key, plain, ticket_hash + "|" + machine);
  }

  Status put_ticket(storage::Transaction& tx, const std::string& ticket, const std::string& machine,
                    const std::string& user, const Credential& cred, std::int64_t ttl) {
    storage::LogonTicket t;
    t.ticket_hash = common::crypto::sha256_hex(ticket);
    t.machine = machine;
    t.user_name = user;
    t.credential_type = cred.type;
    auto sealed = seal_credential(cred, t.ticket_hash, machine);
    if (!sealed) return sealed.error();
    t.credential_data = std::move(*sealed);
    t.expires_at = common::format_time(clock.now() + std::chrono::seconds(ttl));
    return tx.put_logon_ticket(t);
  }

  std::int64_t ttl_for(const Site& site, std::int64_t asked) const {
    const auto site_ttl = site.settings.integer("logon_ticket_ttl_seconds", 200);
    return asked > 0 ? std::min(asked, site_ttl) : site_ttl;
  }

  bool registered(const Object& m) const { return m.text("registration_state") == "Registered"; }

  // The user a machine is held for now (empty: none). Under decide_mutex.
  std::string held_for(const std::string& machine, common::SysTime now) const {
    auto it = claims.find(machine);
    if (it == claims.end()) return {};
    const auto& c = it->second;
    const bool live = c.registered_at ? now < *c.registered_at + opts.claim_hold : now < c.deadline;
    return live ? c.user : std::string();
  }

  std::int64_t effective_load(const Object& m) {
    auto it = bumps.find(m.name);
    const auto reported = m.integer("load_index");
    if (it == bumps.end()) return reported;
    if (it->second.reported != reported) {  // the agent has reported since: its figure counts
      bumps.erase(it);
      return reported;
    }
    return reported + it->second.extra;
  }

  // Sessions of the user for the resource that a launch may reconnect to.
  const Object* reconnectable(const Site& site, const identity::UserIdentity& user, const Resource& res,
                              const std::string& reconnection, const std::string& client_name) {
    const Object* best = nullptr;
    for (const auto& s : site.sessions) {
      if (!is_user(user, s.text("user_name"))) continue;
      const bool app = res.type == Resource::Type::application;
      if (app ? s.text("application") != res.in_name && s.text("application") != res.f_name
              : (s.text("session_type") != "Desktop" || s.text("delivery_group") != res.delivery_group))
        continue;
      const auto state = s.text("state");
      const auto* m = site.find(site.snapshot.machines, s.text("machine"));
      if (!m || !registered(*m) || m->flag("in_maintenance_mode")) continue;
      if (state == "Disconnected") return &s;
      if (state == "Active" && reconnection == "Always") best = &s;
      if (state == "Active" && reconnection == "SameEndpointOnly" && !client_name.empty() &&
          iequals(s.text("client_name"), client_name))
        best = &s;
    }
    return best;
  }

  // Picks a machine (or explains why none). Runs inside the write transaction, under decide_mutex.
  LaunchResult decide(storage::Transaction& tx, Attempt& a, Reservation& out) {
    auto loaded = read_site(tx);
    if (!loaded) return failed(LaunchFailure::storage_error, loaded.error().describe());
    Site& site = *loaded;
    const auto& req = a.request;
    const auto& user = req.user;
    Requester who{&user, req.client_address, req.client_name};
    const auto ttl = ttl_for(site, req.ticket_ttl_seconds);
    a.registration_timeout = std::chrono::seconds(site.settings.integer("registration_wait_timeout_seconds", 180));
    a.power_on_wait = opts.power_on_wait.value_or(
        std::chrono::seconds(site.settings.integer("launch_power_on_wait_seconds", 20)));

    auto fill = [&](const Object& m, const std::string& group) {
      out.machine = m.name;
      out.machine_id = m.id;
      out.address = m.text("agent_address");
      out.dns_name = m.text("dns_name");
      out.group = group;
    };

    if (!req.reconnect_session.empty()) {
      auto s = tx.get(Kind::session, req.reconnect_session);
      if (!s || !is_user(user, s->text("user_name")) || s->text("state") == "LoggedOff")
        return failed(LaunchFailure::no_session, "no session '" + req.reconnect_session + "' of " + user.qualified_name);
      const auto* m = site.find(site.snapshot.machines, s->text("machine"));
      if (!m || !registered(*m))
        return failed(LaunchFailure::all_unregistered, "the machine of session '" + s->name + "' is not registered");
      fill(*m, s->text("delivery_group"));
      out.reconnect = true;
      out.disconnect_first = s->text("state") == "Active";
      out.session_key = s->name;
      out.agent_key = agent_session_key(*s);
      out.prepare.resource = s->text("application").empty() ? s->text("delivery_group") : s->text("application");
      out.prepare.application = !s->text("application").empty();
    } else {
      // Which resource, and why it cannot be launched.
      auto resources = entitled_resources(site.snapshot, who);
      auto it = std::find_if(resources.begin(), resources.end(),
                             [&](const Resource& r) { return iequals(r.in_name, req.resource); });
      if (it == resources.end()) {
        SiteSnapshot enabled = site.snapshot;
        for (auto& g : enabled.groups) g.fields["enabled"] = true;
        auto all = entitled_resources(enabled, who);
        const bool in_disabled_group = std::any_of(all.begin(), all.end(), [&](const Resource& r) {
          return iequals(r.in_name, req.resource);
        });
        if (in_disabled_group)
          return failed(LaunchFailure::group_disabled, "'" + req.resource + "' is in a disabled delivery group");
        return failed(LaunchFailure::not_entitled, user.qualified_name + " is not entitled to '" + req.resource + "'");
      }
      const Resource res = *it;
      if (res.disabled) return failed(LaunchFailure::resource_disabled, "'" + res.f_name + "' is disabled");
      const bool app = res.type == Resource::Type::application;
      const Object* application = nullptr;
      const Object* rule = res.rule.empty() ? nullptr : site.find(site.snapshot.rules, res.rule);
      std::vector<std::string> groups;
      if (app) {
        for (const auto& o : site.snapshot.applications)
          if (iequals(o.text("browser_name", o.name), res.in_name) || o.name == res.in_name) application = &o;
        if (!application) return failed(LaunchFailure::not_entitled, "no application '" + res.in_name + "'");
        for (const auto& g : application->list("delivery_groups")) {
          const auto* grp = site.find(site.snapshot.groups, g);
          if (!grp || !grp->flag("enabled", true)) continue;
          const bool access = std::any_of(site.snapshot.rules.begin(), site.snapshot.rules.end(), [&](const Object& r) {
            return r.text("rule_type") == "access" && r.text("delivery_group") == g && r.flag("enabled", true) &&
                   access_allowed(r, who);
          });
          if (access) groups.push_back(g);
        }
      } else {
        groups.push_back(res.delivery_group);
      }
      std::vector<std::string> open_groups;
      for (const auto& g : groups) {
        const auto* grp = site.find(site.snapshot.groups, g);
        if (grp && !grp->flag("in_maintenance_mode")) open_groups.push_back(g);
      }
      if (open_groups.empty())
        return failed(LaunchFailure::group_in_maintenance, "the delivery group of '" + res.f_name + "' is in maintenance mode");

      out.prepare.resource = res.f_name;
      out.prepare.application = app;
      if (application) {
        out.prepare.command_line_executable = application->text("command_line_executable");
        out.prepare.command_line_arguments = application->text("command_line_arguments");
        out.prepare.working_directory = application->text("working_directory");
      }

      // Reconnect first.
      const std::string reconnection = rule ? rule->text("session_reconnection", "Always") : "Always";
      if (const auto* existing = reconnectable(site, user, res, reconnection, req.client_name)) {
        const auto* m = site.find(site.snapshot.machines, existing->text("machine"));
        fill(*m, existing->text("delivery_group"));
        out.reconnect = true;
        out.disconnect_first = existing->text("state") == "Active";
        out.session_key = existing->name;
        out.agent_key = agent_session_key(*existing);
      } else {
        // Instance limits.
        auto count_sessions = [&](auto pred) {
          return std::count_if(site.sessions.begin(), site.sessions.end(), pred);
        };
        if (application) {
          const auto total_max = application->integer("max_total_instances");
          const auto user_max = application->integer("max_per_user_instances");
          const auto name = res.f_name;
          auto is_app = [&](const Object& s) { return s.text("application") == name || s.text("application") == res.in_name; };
          if (total_max > 0 && count_sessions(is_app) >= total_max)
            return failed(LaunchFailure::instance_limit, "'" + name + "' runs its maximum of " + std::to_string(total_max) + " instances");
          if (user_max > 0 && count_sessions([&](const Object& s) { return is_app(s) && is_user(user, s.text("user_name")); }) >= user_max)
            return failed(LaunchFailure::instance_limit, user.qualified_name + " runs the maximum of " + std::to_string(user_max) +
                                                            " instances of '" + name + "'");
        } else if (rule) {
          const auto max = rule->integer("max_per_entitlement_instances");
          if (max > 0 && count_sessions([&](const Object& s) {
                           return s.text("delivery_group") == res.delivery_group && s.text("session_type") == "Desktop";
                         }) >= max)
            return failed(LaunchFailure::instance_limit, "'" + res.f_name + "' has its maximum of " + std::to_string(max) + " sessions");
        }
        auto chosen = choose(site, tx, a, res, rule, application, open_groups, out);
        if (!chosen.ok()) return chosen;
      }
    }

    // Reserve: the pending session (or the reconnect), the ticket, the machine's state.
    const std::string now = common::format_time(clock.now());
    out.ticket = new_logon_ticket();
    const auto cred_user = user.qualified_name;
    if (auto st = put_ticket(tx, out.ticket, out.machine, cred_user, req.credential, ttl); !st)
      return failed(LaunchFailure::storage_error, st.error().describe());
    if (!out.reconnect) {
      out.session_key = "S" + upper(common::crypto::random_hex(10));
      Object s = common::model::make_default(Kind::session, out.session_key);
      s.fields["machine"] = out.machine;
      s.fields["user_name"] = cred_user;
      s.fields["delivery_group"] = out.group;
      if (out.prepare.application) {
        s.fields["application"] = out.prepare.resource;
        s.fields["session_type"] = std::string("Application");
      }
      s.fields["state"] = std::string("PreparingNewSession");
      s.fields["brokered"] = true;
      if (!req.client_name.empty()) s.fields["client_name"] = req.client_name;
      if (!req.client_address.empty()) s.fields["client_address"] = req.client_address;
      if (!req.device_id.empty()) s.fields["device_id"] = req.device_id;
      s.fields["start_time"] = now;
      s.fields["state_change_time"] = now;
      if (auto r = tx.create(s); !r) return failed(LaunchFailure::storage_error, r.error().describe());
    }
    auto m = tx.get(Kind::machine, out.machine);
    if (!m) return failed(LaunchFailure::storage_error, m.error().describe());
    Object updated = *m;
    updated.fields["last_connection_time"] = now;
    updated.fields["last_connection_user"] = cred_user;
    if (!out.reconnect) {
      storage::Query q;
      q.equals.emplace_back("machine", out.machine);
      auto sessions = tx.list(Kind::session, q);
      if (!sessions) return failed(LaunchFailure::storage_error, sessions.error().describe());
      std::vector<std::string> states;
      for (const auto& s : *sessions)
        if (s.text("state") != "LoggedOff") states.push_back(s.text("state"));
      updated.fields["session_count"] = static_cast<std::int64_t>(states.size());
      const auto cat = site.catalogs.find(m->text("catalog"));
      const auto support = cat == site.catalogs.end() ? std::string("SingleSession") : cat->second.text("session_support");
      updated.fields["summary_state"] = summary_state(registered(*m), support, m->integer("load_index"), states);
      if (support == "MultiSession") {
        auto& b = bumps[out.machine];
        if (b.reported != m->integer("load_index")) b = {m->integer("load_index"), 0};
        b.extra += kLaunchLoadBump;
      }
    }
    if (auto r = tx.update(out.machine, updated); !r) return failed(LaunchFailure::storage_error, r.error().describe());

    boost::json::object detail{{"user", cred_user},          {"resource", out.prepare.resource},
                               {"machine", out.machine},     {"reconnect", out.reconnect},
                               {"client_name", req.client_name}, {"client_address", req.client_address}};
    if (!out.new_assignment.empty()) detail["new_assignment"] = out.new_assignment;
    if (auto st = tx.append_audit(launch_audit("launch", out.session_key, detail)); !st)
      return failed(LaunchFailure::storage_error, st.error().describe());

    out.prepare.user = cred_user;
    out.prepare.ticket = out.ticket;
    if (out.agent_key.empty()) out.agent_key = out.session_key;
    out.prepare.session_key = out.agent_key;
    out.prepare.connect_timeout_seconds = ttl;
    out.prepare.client_name = req.client_name;
    out.prepare.client_address = req.client_address;
    LaunchResult r;
    r.machine = out.machine;
    return r;
  }

  // Machine selection in the open groups (a new session). Explains an empty choice.
  LaunchResult choose(const Site& site, storage::Transaction& tx, Attempt& a, const Resource& res, const Object* rule,
                      const Object* application, const std::vector<std::string>& groups, Reservation& out) {
    const auto& req = a.request;
    const std::string tag = application ? application->text("restrict_to_tag") : rule ? rule->text("restrict_to_tag") : "";
    std::map<std::string, int, std::less<>> sessions_on;
    for (const auto& s : site.sessions) ++sessions_on[s.text("machine")];
    std::set<std::string, std::less<>> assigned_machines;
    for (const auto& asg : site.snapshot.assignments) assigned_machines.insert(asg.text("machine"));
    // Machines powered on for a launch are held for its user (single-session ones are not given
    // to anyone else meanwhile).
    const auto now = clock.now();
    auto hold = [&](const Object& m) {  // 0: held for this user, 1: not held, 2: held for another
      const auto user = held_for(m.name, now);
      return user.empty() ? 1 : iequals(user, req.user.qualified_name) ? 0 : 2;
    };

    int total = 0, tagged = 0, reg = 0, open = 0;
    std::vector<Candidate> usable;
    std::vector<const Object*> to_power;  // off but power-managed, idle, not faulted
    bool private_group = false;
    std::vector<const Object*> mine;  // machines assigned to the user (private groups)
    std::string group_of;
    for (const auto& g : groups) {
      const auto* grp = site.find(site.snapshot.groups, g);
      const bool multi = grp->text("session_support") == "MultiSession";
      private_group = !application && grp->text("desktop_kind") == "Private";
      if (private_group) {
        for (const auto& asg : site.snapshot.assignments) {
          const auto* m = site.find(site.snapshot.machines, asg.text("machine"));
          if (m && m->text("delivery_group") == g && assignment_matches(asg, req.user, req.client_address)) mine.push_back(m);
        }
      }
      for (const auto& m : site.snapshot.machines) {
        if (m.text("delivery_group") != g || a.tried.contains(m.name)) continue;
        if (private_group) {
          const bool is_mine = std::find(mine.begin(), mine.end(), &m) != mine.end();
          if (!mine.empty() ? !is_mine : assigned_machines.contains(m.name)) continue;
        }
        ++total;
        if (!tag.empty() && !contains_ci(m.list("tags"), tag)) continue;
        ++tagged;
        if (!registered(m)) {
          // Off (or on its way up), or on but not registered yet while held for this user: the
          // hypervisor may report a machine On long before its agent registers.
          const bool target = power_managed(site, m) || (hold(m) == 0 && m.text("power_state") == "On" &&
                                                          m.text("fault_state", "None") == "None");
          if (power && target && !m.flag("in_maintenance_mode") && sessions_on[m.name] == 0 &&
              (!private_group || mine.empty() || grp->flag("automatic_power_on_for_assigned", true)))
            to_power.push_back(&m);
          continue;
        }
        ++reg;
        if (m.flag("in_maintenance_mode")) continue;
        ++open;
        const auto load = effective_load(m);
        if (multi ? load >= kFullLoad : sessions_on[m.name] > 0) continue;
        if (!multi && hold(m) == 2) continue;
        usable.push_back({&m, multi ? load : 0});
        group_of = g;
      }
    }
    if (private_group && mine.empty()) {
      // Assign on first use, within the rule's MaxDesktops.
      const auto max = rule && rule->text("rule_type") == "assignment" ? rule->integer("max_desktops", 1) : 0;
      if (max == 0)
        return failed(LaunchFailure::not_entitled, req.user.qualified_name + " has no machine assigned in '" + res.f_name + "'");
      const auto have = std::count_if(site.snapshot.assignments.begin(), site.snapshot.assignments.end(), [&](const Object& asg) {
        return asg.text("rule") == rule->name && is_user(req.user, asg.text("user"));
      });
      if (have >= max)
        return failed(LaunchFailure::assignment_limit, req.user.qualified_name + " already has " + std::to_string(have) +
                                                          " of the " + std::to_string(max) + " machines '" + rule->name + "' allows");
    }
    if (usable.empty() && !to_power.empty()) {
      // The one held for this user first, then those held for no one (another user's only when
      // nothing else is left); one already on its way up first (no second machine for the same
      // wait), else any; by name among equals so that concurrent launches converge.
      std::stable_sort(to_power.begin(), to_power.end(), [&](const Object* x, const Object* y) {
        const int hx = hold(*x), hy = hold(*y);
        if (hx != hy) return hx < hy;
        const bool bx = booting(*x), by = booting(*y);
        return bx != by ? bx : x->name < y->name;
      });
      a.power_on = to_power.front()->name;
      return failed(LaunchFailure::powering_on, "no machine is ready; powering on " + a.power_on + ": retry shortly");
    }
    if (usable.empty()) {
      if (total == 0)
        return failed(private_group && mine.empty() ? LaunchFailure::all_in_use : LaunchFailure::no_machines,
                      private_group && mine.empty() ? "no unassigned machine left in the delivery group"
                                                    : "the delivery group has no machines to offer");
      if (tagged == 0) return failed(LaunchFailure::tag_mismatch, "no machine has the tag '" + tag + "'");
      if (reg == 0) return failed(LaunchFailure::all_unregistered, "every candidate machine is unregistered");
      if (open == 0) return failed(LaunchFailure::all_in_maintenance, "every registered candidate is in maintenance mode");
      return failed(LaunchFailure::all_in_use, "every registered candidate machine is in use");
    }
    // Least effective load; random among equals.
    std::shuffle(usable.begin(), usable.end(), rng);
    std::stable_sort(usable.begin(), usable.end(), [](const Candidate& x, const Candidate& y) { return x.load < y.load; });
    auto pick = std::find_if(usable.begin(), usable.end(), [&](const Candidate& c) { return hold(*c.machine) == 0; });
    const Object& m = *(pick == usable.end() ? usable.front() : *pick).machine;
    if (pick != usable.end()) claims.erase(m.name);  // the machine powered on for this user: taken
    out.machine = m.name;
    out.machine_id = m.id;
    out.address = m.text("agent_address");
    out.dns_name = m.text("dns_name");
    out.group = m.text("delivery_group");
    if (private_group && mine.empty()) {
      Object asg = common::model::make_default(Kind::assignment);
      asg.fields["machine"] = m.name;
      asg.fields["user"] = req.user.qualified_name;
      asg.fields["rule"] = rule->name;
      auto created = tx.create(asg);
      if (!created) return failed(LaunchFailure::storage_error, created.error().describe());
      out.new_assignment = created->name;
    }
    return {};
  }

  void attempt(std::shared_ptr<Attempt> a) {
    Reservation res;
    LaunchResult outcome;
    {
      // The lock is taken inside the transaction, never around write(): storage serialises the
      // writes itself and commits concurrent launches together (docs/architecture.md).
      auto st = repo.write([&](storage::Transaction& tx) -> Status {
        std::lock_guard lock(decide_mutex);
        outcome = decide(tx, *a, res);
        if (!outcome.ok()) return make_error(errc::conflict, outcome.message);  // roll back
        return {};
      });
      if (!st && outcome.ok()) {
        // The transaction did not commit (its batch failed): undo the in-memory load bump too.
        outcome = failed(LaunchFailure::storage_error, st.error().describe());
        std::lock_guard lock(decide_mutex);
        bumps.erase(res.machine);
      }
    }
    if (!a->power_on.empty() && outcome.failure == LaunchFailure::powering_on) {
      const bool held = claim(a->power_on, a->request.user.qualified_name, a->registration_timeout);
      if (auto throttled = power->power_on(a->power_on); !throttled) {
        if (held) unclaim(a->power_on);
        log->warn("launch: cannot power on {}: {}", a->power_on, throttled.error().describe());
        outcome = failed(LaunchFailure::all_unregistered, "every candidate machine is off and " + a->power_on +
                                                              " cannot be powered on: " + throttled.error().message);
      } else if (*throttled) {
        outcome = failed(LaunchFailure::power_throttled,
                         "no machine is ready; the power-on of " + a->power_on + " waits for the hypervisor connection's throttles: retry later");
      }
      if ((outcome.failure == LaunchFailure::powering_on || outcome.failure == LaunchFailure::power_throttled) &&
          wait_for_registration(a, a->power_on, outcome))
        return;  // goes on once it registers, or the wait ends
    }
    if (!outcome.ok()) {
      const bool none_left = outcome.failure == LaunchFailure::all_in_use || outcome.failure == LaunchFailure::no_machines ||
                             outcome.failure == LaunchFailure::all_unregistered;
      if (!a->last_error.empty() && none_left)
        outcome = failed(LaunchFailure::prepare_failed, "no machine could prepare the session (last: " + a->last_error + ")");
      else if (!a->timed_out.empty() && none_left)
        outcome = failed(LaunchFailure::registration_timeout,
                         a->timed_out.back() + " was powered on for the launch but did not register within " +
                             std::to_string(a->registration_timeout.count()) + " s, and no other machine is available");
      record_failure(*a, outcome);
      return finish(a, std::move(outcome));
    }
    ++a->attempts;
    a->tried.insert(res.machine);
    auto self = shared_from_this();
    auto prepare = [self, a, res]() {
      self->agents.prepare_session(res.machine, res.prepare, self->opts.prepare_timeout,
                                   [self, a, res](bool ok, const std::string& error) {
                                     if (ok) return self->prepared(a, res);
                                     if (!self->work.post([self, a, res, error] { self->prepare_failed(a, res, error); }))
                                       self->stopping(a);
                                   });
    };
    if (res.disconnect_first) {
      agents.disconnect_session(res.machine, res.agent_key, opts.prepare_timeout,
                                [prepare](bool, const std::string&) { prepare(); });
    } else {
      prepare();
    }
  }

  void prepared(const std::shared_ptr<Attempt>& a, const Reservation& res) {
    LaunchResult r;
    r.machine = res.machine;
    r.machine_id = res.machine_id;
    r.address = res.address;
    r.dns_name = res.dns_name;
    r.session_key = res.session_key;
    r.ticket = res.ticket;
    r.reconnect = res.reconnect;
    r.message = std::string(res.reconnect ? "reconnect to " : "new session on ") + res.machine;
    log->info("launch: {} {} '{}' on {} (session {})", a->request.user.qualified_name,
              res.reconnect ? "reconnects to" : "launches", res.prepare.resource, res.machine, res.session_key);
    const auto took =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - a->started).count();
    // BrokeringDuration, informational: written beside the reply, not part of the launch's
    // commit. Posted before finish(): once the launch is finished its owner may go away.
    auto self = shared_from_this();
    work.post([self, key = res.session_key, took] {
      auto st = self->repo.write([&](storage::Transaction& tx) -> Status {
        auto s = tx.get(Kind::session, key);
        if (!s) return {};  // already gone
        Object updated = *s;
        updated.fields["brokering_duration_ms"] = static_cast<std::int64_t>(took);
        auto u = tx.update(key, updated);
        if (!u) return u.error();
        return {};
      });
      if (!st) self->log->warn("launch: brokering duration of {} not stored: {}", key, st.error().describe());
    });
    finish(a, std::move(r));
  }

  void prepare_failed(const std::shared_ptr<Attempt>& a, const Reservation& res, const std::string& error) {
    log->warn("launch: {} could not prepare a session for {}: {}", res.machine, a->request.user.qualified_name, error);
    a->last_error = res.machine + ": " + error;
    {
      auto st = repo.write([&](storage::Transaction& tx) -> Status {
        // The ticket goes with the attempt: an agent that prepares late cannot take a logon with it.
        if (auto r = tx.remove_logon_ticket(common::crypto::sha256_hex(res.ticket)); !r) return r;
        if (!res.reconnect) {
          auto s = tx.get(Kind::session, res.session_key);
          if (s && s->text("state") == "PreparingNewSession")
            if (auto r = tx.remove(Kind::session, res.session_key); !r) return r;
        }
        if (!res.new_assignment.empty())
          if (auto r = tx.remove(Kind::assignment, res.new_assignment); !r && r.error().code != errc::not_found) return r;
        auto m = tx.get(Kind::machine, res.machine);
        if (m) {
          Object updated = *m;
          updated.fields["last_connection_failure"] = std::string("SessionPreparation");
          if (!res.reconnect && updated.text("summary_state") == "Preparing") updated.fields["summary_state"] = std::string("Available");
          if (auto r = tx.update(res.machine, updated); !r) return r.error();
        }
        return tx.append_audit(launch_audit("launch-failed", res.session_key,
                                            {{"user", a->request.user.qualified_name}, {"machine", res.machine},
                                             {"reason", "SessionPrepareFailure"}, {"error", error}}));
      });
      if (!st) log->error("launch: cannot undo the reservation on {}: {}", res.machine, st.error().describe());
      std::lock_guard lock(decide_mutex);
      bumps.erase(res.machine);
    }
    // No answer in time: the agent may still prepare (or have prepared) the new session, holding
    // the machine for a client that will never come. Tell it to drop it; "no such session" is fine.
    if (!res.reconnect && error == "timeout") {
      auto l = log;
      const auto machine = res.machine, key = res.agent_key;
      agents.logoff_session(machine, key, opts.prepare_timeout, [l, machine, key](bool ok, const std::string& e) {
        if (!ok && e != kNoSuchSession)
          l->warn("launch: {} did not drop the abandoned preparation of {}: {}", machine, key, e);
      });
    }
    const bool out_of_time = std::chrono::steady_clock::now() - a->started + opts.prepare_timeout > opts.launch_budget;
    if (res.reconnect || a->attempts >= opts.max_attempts || out_of_time) {
      auto r = failed(LaunchFailure::prepare_failed, "the session could not be prepared (" + a->last_error + ")");
      record_failure(*a, r);
      return finish(a, std::move(r));
    }
    attempt(a);
  }

  // Holds a machine about to be powered on for a launch for its user. An existing live hold is
  // kept (false); true when this call made it.
  bool claim(const std::string& machine, const std::string& user, std::chrono::seconds timeout) {
    std::lock_guard lock(decide_mutex);
    const auto now = clock.now();
    if (!held_for(machine, now).empty()) return false;
    // Past its deadline and still unregistered: kept as it is, so the wait ends at once and the
    // machine is timed out (a retry must not grant a stuck machine a new deadline).
    if (auto it = claims.find(machine); it != claims.end() && !it->second.registered_at) return false;
    claims[machine] = {user, now + timeout, timeout, std::nullopt};
    return true;
  }
  void unclaim(const std::string& machine) {
    std::lock_guard lock(decide_mutex);
    claims.erase(machine);
  }

  // Parks the launch until the machine registers or the wait ends (power_on_wait from the
  // launch's start, or the machine's registration deadline, whichever is first). False when
  // there is no time left to wait: answer now.
  bool wait_for_registration(const std::shared_ptr<Attempt>& a, const std::string& machine, const LaunchResult& outcome) {
    using std::chrono::duration_cast;
    using std::chrono::milliseconds;
    auto left = a->power_on_wait - duration_cast<milliseconds>(std::chrono::steady_clock::now() - a->started);
    if (left <= milliseconds(0)) return false;
    {
      std::lock_guard lock(decide_mutex);
      auto it = claims.find(machine);
      if (it != claims.end() && !it->second.registered_at)
        // Rounded up and a little after: the wait must not end a hair before the deadline.
        left = std::min(left, std::max(milliseconds(0), std::chrono::ceil<milliseconds>(it->second.deadline - clock.now()) +
                                                            milliseconds(20)));
    }
    a->wait_outcome = outcome;
    auto self = shared_from_this();
    {
      // Armed and listed under one lock: a wake() sees the attempt only with its timer id set.
      std::lock_guard lock(wait_mutex);
      if (stopped) return false;
      a->wait_machine = machine;
      const auto id = ++wait_ids;
      a->wait_timer = id;
      const auto timer = timers.after(left, [self, a, id] {
        if (!self->work.post([self, a, id] { self->wait_over(a, id); }) && !self->unpark(a, id).empty()) self->stopping(a);
      });
      if (timer == 0) return false;  // stopping: answer now
      a->wait_timer_handle = timer;
      waiting[machine].push_back(a);
    }
    log->info("launch: {} waits up to {} ms for {} to register", a->request.user.qualified_name, left.count(), machine);
    // It may have registered between the selection and now.
    bool now_registered = false;
    auto st = repo.read([&](storage::Transaction& tx) -> Status {
      auto m = tx.get(Kind::machine, machine);
      now_registered = m && registered(*m);
      return {};
    });
    if (st && now_registered) wake(machine);
    return true;
  }

  // Takes the attempt out of the waiting list, if it still waits under timer `id`, and returns the
  // machine it waited for; empty when someone else already has.
  std::string unpark(const std::shared_ptr<Attempt>& a, std::uint64_t id) {
    std::lock_guard lock(wait_mutex);
    if (a->wait_timer != id) return {};
    auto it = waiting.find(a->wait_machine);
    if (it == waiting.end()) return {};
    auto& list = it->second;
    auto pos = std::find(list.begin(), list.end(), a);
    if (pos == list.end()) return {};
    list.erase(pos);
    if (list.empty()) waiting.erase(it);
    a->wait_timer = 0;
    return std::exchange(a->wait_machine, {});
  }

  // The machine registered: the launches waiting for it select again.
  void wake(const std::string& machine) {
    std::vector<std::shared_ptr<Attempt>> woken;
    {
      std::lock_guard lock(wait_mutex);
      auto it = waiting.find(machine);
      if (it == waiting.end()) return;
      woken = std::move(it->second);
      waiting.erase(it);
      for (auto& a : woken) {
        timers.cancel(a->wait_timer_handle);
        a->wait_machine.clear();
        a->wait_timer = 0;
      }
    }
    auto self = shared_from_this();
    for (auto& a : woken)
      if (!work.post([self, a] { self->attempt(a); })) stopping(a);
  }

  // The wait ended without the machine registering: past its registration deadline the launch
  // fails over, else it answers retry-required (the machine stays held for the user's retry).
  void wait_over(const std::shared_ptr<Attempt>& a, std::uint64_t id) {
    const auto machine = unpark(a, id);
    if (machine.empty()) return;  // woken meanwhile
    bool timed_out = false;
    {
      std::lock_guard lock(decide_mutex);
      auto it = claims.find(machine);
      if (it != claims.end() && !it->second.registered_at && clock.now() >= it->second.deadline) {
        claims.erase(it);
        timed_out = true;
      }
    }
    if (timed_out) {
      registration_timed_out(machine, a->request.user.qualified_name, a->registration_timeout);
      a->tried.insert(machine);
      a->timed_out.push_back(machine);
      return attempt(a);  // fail over
    }
    auto r = std::move(a->wait_outcome);
    record_failure(*a, r);
    finish(a, std::move(r));
  }

  // A machine powered on for a launch did not register in time: its fault state says why
  // (StuckOnBoot: the hypervisor never reported it on; Unregistered: on, but its agent never
  // registered), and the failure is recorded.
  void registration_timed_out(const std::string& machine, const std::string& user, std::chrono::seconds timeout) {
    std::string fault;
    auto st = repo.write([&](storage::Transaction& tx) -> Status {
      auto m = tx.get(Kind::machine, machine);
      if (!m) return m.error().code == errc::not_found ? Status{} : Status{m.error()};
      if (registered(*m)) return {};  // registered after all
      fault = m->text("power_state") == "On" ? "Unregistered" : "StuckOnBoot";
      Object updated = *m;
      updated.fields["fault_state"] = fault;
      updated.fields["last_connection_failure"] = std::string("RegistrationTimeout");
      if (auto r = tx.update(machine, updated); !r) return r.error();
      return tx.append_audit(launch_audit("launch-failed", machine,
                                          {{"user", user}, {"machine", machine}, {"reason", "RegistrationTimeout"},
                                           {"fault_state", fault}, {"timeout_seconds", timeout.count()}}));
    });
    if (!st) log->error("launch: cannot record the registration timeout of {}: {}", machine, st.error().describe());
    else if (!fault.empty())
      log->warn("launch: {} was powered on for {} but did not register within {} s: RegistrationTimeout, fault state {}",
                machine, user, timeout.count(), fault);
  }

  // The broker is stopping: a launch taken out of the waiting list answers at once.
  void stopping(const std::shared_ptr<Attempt>& a) {
    finish(a, failed(LaunchFailure::storage_error, "the broker is stopping"));
  }

  void record_failure(const Attempt& a, const LaunchResult& r) {
    log->warn("launch: {} cannot launch '{}': {}: {}", a.request.user.qualified_name,
              a.request.reconnect_session.empty() ? a.request.resource : a.request.reconnect_session, to_string(r.failure),
              r.message);
    if (r.failure == LaunchFailure::storage_error) return;
    auto st = repo.write([&](storage::Transaction& tx) -> Status {
      return tx.append_audit(launch_audit("launch-refused", a.request.resource,
                                          {{"user", a.request.user.qualified_name},
                                           {"reason", std::string(to_string(r.failure))},
                                           {"message", r.message},
                                           {"client_address", a.request.client_address}}));
    });
    if (!st) log->error("launch: cannot audit a refused launch: {}", st.error().describe());
  }

  void finish(const std::shared_ptr<Attempt>& a, LaunchResult r) {
    --inflight;
    auto done = std::move(a->done);
    if (done) done(std::move(r));
  }
};

Launcher::Launcher(storage::Repository& repository, common::Clock& clock, AgentChannel& agents, common::WorkQueue& work,
                   std::shared_ptr<spdlog::logger> logger, LauncherOptions options)
    : impl_(std::make_shared<Impl>(repository, clock, agents, work,
                                   logger ? std::move(logger) : common::null_logger(), std::move(options))) {}

Launcher::~Launcher() { stop(); }

void Launcher::stop() {
  std::map<std::string, std::vector<std::shared_ptr<Impl::Attempt>>> waiting;
  {
    std::lock_guard lock(impl_->wait_mutex);
    impl_->stopped = true;
    waiting.swap(impl_->waiting);
    for (auto& [machine, list] : waiting)
      for (auto& a : list) a->wait_timer = 0;  // a timer already firing finds nothing to end
  }
  impl_->timers.stop();
  for (auto& [machine, list] : waiting)
    for (auto& a : list) impl_->stopping(a);
}

void Launcher::launch(LaunchRequest request, std::function<void(LaunchResult)> done) {
  auto a = std::make_shared<Impl::Attempt>();
  a->request = std::move(request);
  a->done = std::move(done);
  ++impl_->inflight;
  auto impl = impl_;
  if (!impl->work.post([impl, a] { impl->attempt(a); }))
    impl->finish(a, Impl::failed(LaunchFailure::storage_error, "the broker is stopping"));
}

LaunchResult Launcher::launch_sync(LaunchRequest request) {
  auto promise = std::make_shared<std::promise<LaunchResult>>();
  auto future = promise->get_future();
  launch(std::move(request), [promise](LaunchResult r) { promise->set_value(std::move(r)); });
  return future.get();
}

Result<std::string> Launcher::reissue_ticket(const identity::UserIdentity& user, const std::string& session_key,
                                             const Credential& credential, std::int64_t ttl_seconds) {
  std::string ticket;
  auto st = impl_->repo.write([&](storage::Transaction& tx) -> Status {
    auto s = tx.get(Kind::session, session_key);
    if (!s || !is_user(user, s->text("user_name")) || s->text("state") == "LoggedOff")
      return make_error(errc::not_found, "no launch '" + session_key + "' of " + user.qualified_name);
    auto settings = tx.get(Kind::site, "site");
    const auto site_ttl = settings ? settings->integer("logon_ticket_ttl_seconds", 200) : 200;
    ticket = new_logon_ticket();
    return impl_->put_ticket(tx, ticket, s->text("machine"), user.qualified_name, credential,
                             ttl_seconds > 0 ? std::min(ttl_seconds, site_ttl) : site_ttl);
  });
  if (!st) return st.error();
  return ticket;
}

Result<std::vector<UserSession>> Launcher::user_sessions(const identity::UserIdentity& user,
                                                         const std::set<std::string>& states) {
  std::vector<UserSession> out;
  auto st = impl_->repo.read([&](storage::Transaction& tx) -> Status {
    storage::Query all;
    auto sessions = tx.list(Kind::session, all);
    if (!sessions) return sessions.error();
    for (const auto& s : *sessions) {
      if (!is_user(user, s.text("user_name"))) continue;
      const auto state = s.text("state");
      if (state != "Active" && state != "Disconnected") continue;
      if (!states.empty() && !states.contains(state)) continue;
      UserSession u;
      u.session_key = s.name;
      u.agent_key = agent_session_key(s);
      u.machine = s.text("machine");
      u.resource = s.text("application").empty() ? s.text("delivery_group") : s.text("application");
      u.state = state;
      u.client_name = s.text("client_name");
      if (auto m = tx.get(Kind::machine, u.machine)) u.machine_id = m->id;
      out.push_back(std::move(u));
    }
    return {};
  });
  if (!st) return st.error();
  return out;
}

Result<int> Launcher::end_user_sessions(const identity::UserIdentity& user, bool logoff) {
  auto sessions = user_sessions(user, {});
  if (!sessions) return sessions.error();
  for (const auto& s : *sessions) {
    auto log = impl_->log;
    auto done = impl_->ending_missing(s.machine, s.session_key, [log, s, logoff](bool ok, const std::string& error) {
      if (!ok) log->warn("{} of session {} on {} failed: {}", logoff ? "logoff" : "disconnect", s.session_key, s.machine, error);
    });
    if (logoff)
      impl_->agents.logoff_session(s.machine, s.agent_key, impl_->opts.prepare_timeout, done);
    else if (s.state == "Active")
      impl_->agents.disconnect_session(s.machine, s.agent_key, impl_->opts.prepare_timeout, done);
  }
  return static_cast<int>(sessions->size());
}

Status Launcher::session_command(const std::string& session_key, const std::string& command, const std::string& title,
                                 const std::string& text, AgentChannel::Done done) {
  std::string machine, key;
  auto st = impl_->repo.read([&](storage::Transaction& tx) -> Status {
    auto s = tx.get(Kind::session, session_key);
    if (!s) return s.error();
    if (s->text("state") == "LoggedOff") return make_error(errc::not_found, "session '" + session_key + "' has logged off");
    machine = s->text("machine");
    key = agent_session_key(*s);
    return {};
  });
  if (!st) return st;
  const auto timeout = impl_->opts.prepare_timeout;
  if (command == "logoff") {
    // The agent no longer has it: the session is over, and the admin's logoff has done its job.
    auto ended = [done = std::move(done)](bool ok, const std::string& error) {
      done(ok || error == kNoSuchSession, ok || error == kNoSuchSession ? std::string() : error);
    };
    impl_->agents.logoff_session(machine, key, timeout, impl_->ending_missing(machine, session_key, std::move(ended)));
  } else if (command == "disconnect") {
    impl_->agents.disconnect_session(machine, key, timeout, impl_->ending_missing(machine, session_key, std::move(done)));
  } else if (command == "message") {
    impl_->agents.send_message(machine, key, title, text, timeout, std::move(done));
  }
  else return make_error(errc::invalid_argument, "unknown session command '" + command + "' (logoff, disconnect, message)", "command");
  return {};
}

std::set<std::string> Launcher::held_machines() const {
  std::set<std::string> out;
  std::lock_guard lock(impl_->decide_mutex);
  const auto now = impl_->clock.now();
  for (const auto& [machine, c] : impl_->claims)
    if (!impl_->held_for(machine, now).empty()) out.insert(machine);
  return out;
}

void Launcher::machine_registered(const std::string& machine) {
  {
    std::lock_guard lock(impl_->decide_mutex);
    auto it = impl_->claims.find(machine);
    if (it != impl_->claims.end() && !it->second.registered_at) it->second.registered_at = impl_->clock.now();
  }
  impl_->wake(machine);
}

Status Launcher::sweep() {
  const auto now = impl_->clock.now();
  // Machines powered on for launches nobody waits for any more, past their registration deadline
  // (a waiting launch handles its own); holds that have served their time are dropped.
  std::set<std::string> waited;
  {
    std::lock_guard lock(impl_->wait_mutex);
    for (const auto& [machine, list] : impl_->waiting) waited.insert(machine);
  }
  std::vector<std::pair<std::string, Impl::BootClaim>> expired;
  {
    std::lock_guard lock(impl_->decide_mutex);
    for (auto it = impl_->claims.begin(); it != impl_->claims.end();) {
      const auto& c = it->second;
      const bool over = c.registered_at ? now >= *c.registered_at + impl_->opts.claim_hold : now >= c.deadline;
      if (!over || waited.contains(it->first)) {
        ++it;
        continue;
      }
      if (!c.registered_at) expired.emplace_back(it->first, c);
      it = impl_->claims.erase(it);
    }
  }
  for (const auto& [machine, c] : expired) impl_->registration_timed_out(machine, c.user, c.timeout);
  const auto now_text = common::format_time(now);
  return impl_->repo.write([&](storage::Transaction& tx) -> Status {
    if (auto r = tx.purge_logon_tickets(now_text); !r) return r.error();
    auto settings = tx.get(Kind::site, "site");
    const auto ttl = std::chrono::seconds(settings ? settings->integer("logon_ticket_ttl_seconds", 200) : 200);
    // Logged-off sessions are kept for a day (admins look back at them), then purged.
    storage::Query gone;
    gone.equals.emplace_back("state", "LoggedOff");
    auto ended = tx.list(Kind::session, gone);
    if (!ended) return ended.error();
    for (const auto& s : *ended) {
      common::SysTime end;
      if (common::parse_time(s.text("end_time"), end) && now < end + kLoggedOffRetention) continue;
      if (auto r = tx.remove(Kind::session, s.name); !r) return r;
    }
    storage::Query q;
    q.equals.emplace_back("state", "PreparingNewSession");
    auto pending = tx.list(Kind::session, q);
    if (!pending) return pending.error();
    for (const auto& s : *pending) {
      if (!s.flag("brokered", true)) continue;
      common::SysTime started;
      // A grace of a few seconds past the ticket lifetime: the agent drops its reservation then too.
      if (!common::parse_time(s.text("start_time"), started) || now < started + ttl + std::chrono::seconds(5)) continue;
      if (auto r = tx.remove(Kind::session, s.name); !r) return r;
      auto m = tx.get(Kind::machine, s.text("machine"));
      if (m) {
        Object updated = *m;
        updated.fields["last_connection_failure"] = std::string("ConnectionTimeout");
        if (updated.text("summary_state") == "Preparing") updated.fields["summary_state"] = std::string("Available");
        if (auto r = tx.update(m->name, updated); !r) return r.error();
      }
      if (auto st = tx.append_audit(launch_audit("launch-timeout", s.name,
                                                 {{"user", s.text("user_name")}, {"machine", s.text("machine")},
                                                  {"reason", "ConnectionTimeout"}}));
          !st)
        return st;
      impl_->log->warn("launch: the client of {} never connected to {} (session {}): ConnectionTimeout",
                       s.text("user_name"), s.text("machine"), s.name);
    }
    return {};
  });
}

int Launcher::in_flight() const { return impl_->inflight.load(); }

void Launcher::set_power(PowerControl* power) { impl_->power = power; }

}  // namespace broker
