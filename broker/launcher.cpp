// broker/launcher.cpp: see launcher.hpp.
#include "broker/launcher.hpp"

#include "broker/agent_registry.hpp"
#include "broker/engine.hpp"
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
#include <limits>
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

storage::AuditEntry launch_audit(const std::string& action, const std::string& object, boost::json::object detail) {
  storage::AuditEntry e;
  e.actor = "broker";
  e.action = action;
  e.kind = "session";
  e.object = object;
  e.after = boost::json::serialize(detail);
  return e;
}

// Powered off (or on its way up) and not known to be broken.
bool can_power_on(const Machine& m) {
  if (m.fault_state == "FailedToStart" || m.fault_state == "StuckOnBoot" || m.fault_state == "VirtualMachineNotFound")
    return false;
  return m.power == PowerState::off || m.power == PowerState::suspended || m.power == PowerState::turning_on ||
         m.power == PowerState::resuming;
}

bool booting(const Machine& m) { return m.power == PowerState::turning_on || m.power == PowerState::resuming; }

bool registered(const Machine& m) { return m.registration == RegistrationState::registered; }

// A machine power management can start for a launch: its catalog names a hypervisor connection,
// and it is off (or on its way up) without a fault.
bool power_managed(const SiteState& st, const Machine& m) {
  const auto it = st.catalogs.find(m.catalog);
  return it != st.catalogs.end() && !it->second.hypervisor_connection.empty() && can_power_on(m);
}

// What one attempt picked and reserved, what it writes, and how to undo it.
struct Reservation {
  std::string machine, address, dns_name, group;
  std::int64_t machine_id = 0;
  std::string session_key, ticket;  // session_key: the stored session's name
  std::string agent_key;            // the key the agent knows the session by (session_keys.hpp)
  bool reconnect = false;
  bool disconnect_first = false;  // the session is active elsewhere: disconnect it, then reconnect
  bool reserved = false;          // the engine holds a reservation of the machine for it
  SessionSupport support = SessionSupport::single_session;
  std::string assign_rule;        // assign on first use under this rule (and its max_desktops)
  std::int64_t assign_max = 0;
  std::string new_assignment;     // made by this launch (undone when the launch fails)
  std::int64_t ttl = 200;
  PrepareSession prepare;
};

struct Candidate {
  const Machine* machine = nullptr;
  std::int64_t load = 0;
};

// A conditional write refused: the database holds what the engine did not know (another broker,
// or an agent's report committed between the choice and the write). The launch tries again.
constexpr const char* kGuardRefused = "the machine was taken meanwhile";
constexpr int kMaxGuardRetries = 8;

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
  Engine& engine;
  common::Clock& clock;
  AgentChannel& agents;
  common::WorkQueue& work;
  std::shared_ptr<spdlog::logger> log;
  LauncherOptions opts;

  // Serialises decisions with the launcher's own state (claims, rng); taken before the engine's
  // lock, never inside a storage transaction.
  std::mutex decide_mutex;
  std::mt19937_64 rng{std::random_device{}()};  // guarded by decide_mutex
  std::atomic<int> inflight{0};
  std::atomic<std::uint64_t> refused_claims{0};
  // When the earliest logon ticket this launcher issued expires (milliseconds since the epoch;
  // 0 at start: tickets of an earlier run may be waiting): the sweep purges only from then on.
  std::atomic<std::int64_t> next_ticket_expiry{0};
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

  // Sessions (by name) whose logoff was asked of their agent and whose end has not been reported
  // yet, until when that counts: a launch in that time does not reconnect to them (the user
  // logged off and launched again; the old session is going away). A refused logoff removes the
  // entry; an agent that acknowledges but never reports the end is believed for
  // prepare_timeout + kLogoffGrace. Guarded by decide_mutex.
  static constexpr std::chrono::seconds kLogoffGrace{60};
  std::map<std::string, common::SysTime> logging_off;

  void logoff_requested(const std::string& session) {
    const auto now = clock.monotonic_now();
    std::lock_guard lock(decide_mutex);
    std::erase_if(logging_off, [&](const auto& e) { return e.second <= now; });
    logging_off[session] = now + opts.prepare_timeout + kLogoffGrace;
  }
  void logoff_refused(const std::string& session) {
    std::lock_guard lock(decide_mutex);
    logging_off.erase(session);
  }
  // Under decide_mutex.
  bool is_logging_off(const std::string& session) const {
    const auto it = logging_off.find(session);
    return it != logging_off.end() && clock.monotonic_now() < it->second;
  }

  struct Attempt;
  std::mutex wait_mutex;
  // Launches waiting for a machine to register; whoever takes an attempt out of here (the
  // registration or its timer) carries it on.
  std::map<std::string, std::vector<std::shared_ptr<Attempt>>> waiting;  // by machine; guarded by wait_mutex
  std::uint64_t wait_ids = 0;  // guarded by wait_mutex
  bool stopped = false;        // guarded by wait_mutex: stop() has begun, nobody parks any more
  std::unique_ptr<common::Timers> own_timers;  // when opts.scheduler is not given
  common::Scheduler* timers = nullptr;

  Impl(storage::Repository& r, Engine& e, common::Clock& c, AgentChannel& a, common::WorkQueue& w,
       std::shared_ptr<spdlog::logger> l, LauncherOptions o)
      : repo(r), engine(e), clock(c), agents(a), work(w), log(std::move(l)), opts(std::move(o)) {
    if (opts.scheduler) {
      timers = opts.scheduler;
    } else {
      own_timers = std::make_unique<common::Timers>();
      timers = own_timers.get();
    }
  }

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
    int guard_refusals = 0;              // conditional writes refused (a machine taken meanwhile)
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
    // By the clock's monotonic reading: setting the wall clock back cannot lengthen the ticket
    // (AgentRegistry::redeem_ticket compares with the same reading; docs/SECURITY.md section 4).
    const auto issued = clock.monotonic_now();
    const auto expires = issued + std::chrono::seconds(ttl);
    t.created_at = common::format_time(issued);
    t.expires_at = common::format_time(expires);
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(expires.time_since_epoch()).count();
    for (auto seen = next_ticket_expiry.load(); ms < seen && !next_ticket_expiry.compare_exchange_weak(seen, ms);) {
    }
    return tx.put_logon_ticket(t);
  }

  std::int64_t ttl_for(const SiteView& view, std::int64_t asked) const {
    const auto site_ttl = view.settings.logon_ticket_ttl_seconds;
    return asked > 0 ? std::min(asked, site_ttl) : site_ttl;
  }

  // The user a machine is held for now (empty: none). Under decide_mutex.
  std::string held_for(const std::string& machine, common::SysTime now) const {
    auto it = claims.find(machine);
    if (it == claims.end()) return {};
    const auto& c = it->second;
    const bool live = c.registered_at ? now < *c.registered_at + opts.claim_hold : now < c.deadline;
    return live ? c.user : std::string();
  }

  // The user's session for the resource that a launch may reconnect to.
  const Session* reconnectable(const SiteState& st, const identity::UserIdentity& user, const Resource& res,
                               Reconnection reconnection, const std::string& client_name) {
    const Session* best = nullptr;
    for (const Session* s : st.sessions_of(user)) {
      const bool app = res.type == Resource::Type::application;
      if (app ? s->application != res.in_name && s->application != res.f_name
              : (s->type != SessionType::desktop || s->delivery_group != res.delivery_group))
        continue;
      const auto* m = st.machine(s->machine);
      if (!m || !registered(*m) || m->in_maintenance_mode || is_logging_off(s->name)) continue;
      if (s->state == SessionState::disconnected) return s;
      if (s->state != SessionState::active) continue;
      if (reconnection == Reconnection::always) best = s;
      if (reconnection == Reconnection::same_endpoint_only && !client_name.empty() && iequals(s->client_name, client_name))
        best = s;
    }
    return best;
  }

  // Picks a machine (or explains why none) and reserves it. In memory, under decide_mutex and
  // the engine's lock: no storage, no agent calls.
  LaunchResult decide(SiteState& st, const SiteView& view, Attempt& a, Reservation& out) {
    const auto& req = a.request;
    const auto& user = req.user;
    Requester who{&user, req.client_address, req.client_name};
    out.ttl = ttl_for(view, req.ticket_ttl_seconds);
    a.registration_timeout = std::chrono::seconds(view.settings.registration_wait_timeout_seconds);
    a.power_on_wait = opts.power_on_wait.value_or(std::chrono::seconds(view.settings.launch_power_on_wait_seconds));

    auto fill = [&](const Machine& m, const std::string& group) {
      out.machine = m.name;
      out.machine_id = m.id;
      out.address = m.agent_address;
      out.dns_name = m.dns_name;
      out.group = group;
      out.support = m.session_support;
    };

    if (!req.reconnect_session.empty()) {
      const Session* s = st.session(req.reconnect_session);
      if (!s || !is_user(user, s->user) || s->state == SessionState::logged_off)
        return failed(LaunchFailure::no_session, "no session '" + req.reconnect_session + "' of " + user.qualified_name);
      if (is_logging_off(s->name))
        return failed(LaunchFailure::no_session, "session '" + s->name + "' is being logged off");
      const Machine* m = st.machine(s->machine);
      if (!m || !registered(*m))
        return failed(LaunchFailure::all_unregistered, "the machine of session '" + s->name + "' is not registered");
      fill(*m, s->delivery_group);
      out.reconnect = true;
      out.disconnect_first = s->state == SessionState::active;
      out.session_key = s->name;
      out.agent_key = s->key;
      out.prepare.resource = s->application.empty() ? s->delivery_group : s->application;
      out.prepare.application = !s->application.empty();
      return {};
    }

    // Which resource, and why it cannot be launched.
    const auto direct = direct_assignments_for(st, user, req.client_address);
    auto resources = entitled_resources(view.config, who, direct);
    auto it = std::find_if(resources.begin(), resources.end(),
                           [&](const Resource& r) { return iequals(r.in_name, req.resource); });
    if (it == resources.end()) {
      SiteSnapshot enabled = view.config;
      for (auto& g : enabled.groups) g.fields["enabled"] = true;
      auto all = entitled_resources(enabled, who, direct);
      const bool in_disabled_group =
          std::any_of(all.begin(), all.end(), [&](const Resource& r) { return iequals(r.in_name, req.resource); });
      if (in_disabled_group)
        return failed(LaunchFailure::group_disabled, "'" + req.resource + "' is in a disabled delivery group");
      return failed(LaunchFailure::not_entitled, user.qualified_name + " is not entitled to '" + req.resource + "'");
    }
    const Resource res = *it;
    if (res.disabled) return failed(LaunchFailure::resource_disabled, "'" + res.f_name + "' is disabled");
    const bool app = res.type == Resource::Type::application;
    const Application* application = nullptr;
    const Rule* rule = nullptr;
    if (!res.rule.empty())
      if (auto r = st.rules.find(res.rule); r != st.rules.end()) rule = &r->second;
    std::vector<std::string> groups;
    if (app) {
      for (const auto& [name, o] : st.applications)
        if (iequals(o.browser_name, res.in_name) || o.name == res.in_name) application = &o;
      if (!application) return failed(LaunchFailure::not_entitled, "no application '" + res.in_name + "'");
      for (const auto& g : application->delivery_groups) {
        auto grp = st.groups.find(g);
        if (grp == st.groups.end() || !grp->second.enabled) continue;
        const bool access = std::any_of(view.config.rules.begin(), view.config.rules.end(), [&](const Object& r) {
          return r.text("rule_type") == "access" && r.text("delivery_group") == g && r.flag("enabled", true) &&
                 access_allowed(r, who);
        });
        if (access) groups.push_back(g);
      }
    } else {
      groups.push_back(res.delivery_group);
    }
    std::vector<std::string> open_groups;
    for (const auto& g : groups)
      if (auto grp = st.groups.find(g); grp != st.groups.end() && !grp->second.in_maintenance_mode) open_groups.push_back(g);
    if (open_groups.empty())
      return failed(LaunchFailure::group_in_maintenance, "the delivery group of '" + res.f_name + "' is in maintenance mode");

    out.prepare.resource = res.f_name;
    out.prepare.application = app;
    if (application) {
      out.prepare.command_line_executable = application->command_line_executable;
      out.prepare.command_line_arguments = application->command_line_arguments;
      out.prepare.working_directory = application->working_directory;
    }

    // Reconnect first.
    const auto reconnection = rule ? rule->session_reconnection : Reconnection::always;
    if (const auto* existing = reconnectable(st, user, res, reconnection, req.client_name)) {
      fill(*st.machine(existing->machine), existing->delivery_group);
      out.reconnect = true;
      out.disconnect_first = existing->state == SessionState::active;
      out.session_key = existing->name;
      out.agent_key = existing->key;
      return {};
    }

    // Instance limits (counted only when a limit is set).
    auto count_live = [&](auto pred) {
      std::int64_t n = 0;
      for (const auto& [name, s] : st.sessions)
        if (s.state != SessionState::logged_off && pred(s)) ++n;
      return n;
    };
    if (application) {
      const auto total_max = application->max_total_instances;
      const auto user_max = application->max_per_user_instances;
      const auto& name = res.f_name;
      auto is_app = [&](const Session& s) { return s.application == name || s.application == res.in_name; };
      if (total_max > 0 && count_live(is_app) >= total_max)
        return failed(LaunchFailure::instance_limit, "'" + name + "' runs its maximum of " + std::to_string(total_max) + " instances");
      if (user_max > 0) {
        const auto mine = st.sessions_of(user);
        if (std::count_if(mine.begin(), mine.end(), [&](const Session* s) { return is_app(*s); }) >= user_max)
          return failed(LaunchFailure::instance_limit, user.qualified_name + " runs the maximum of " +
                                                          std::to_string(user_max) + " instances of '" + name + "'");
      }
    } else if (rule && rule->max_per_entitlement_instances > 0) {
      const auto max = rule->max_per_entitlement_instances;
      if (count_live([&](const Session& s) { return s.delivery_group == res.delivery_group && s.type == SessionType::desktop; }) >= max)
        return failed(LaunchFailure::instance_limit, "'" + res.f_name + "' has its maximum of " + std::to_string(max) + " sessions");
    }
    auto chosen = choose(st, a, res, rule, application, open_groups, out);
    if (!chosen.ok()) return chosen;
    st.reserve(out.machine);
    out.reserved = true;
    return {};
  }

  // Machine selection in the open groups (a new session). Explains an empty choice. A shared
  // single-session group is served from the engine's free-machine index, a multi-session group
  // from its hosts by effective load; the whole group is walked only for a user's own machines
  // or to explain a failure.
  LaunchResult choose(const SiteState& st, Attempt& a, const Resource& res, const Rule* rule,
                      const Application* application, const std::vector<std::string>& groups, Reservation& out) {
    const auto& req = a.request;
    const std::string tag = application ? application->restrict_to_tag : rule ? rule->restrict_to_tag : "";
    const auto now = clock.now();
    auto hold = [&](const Machine& m) {  // 0: held for this user, 1: not held, 2: held for another
      const auto user = held_for(m.name, now);
      return user.empty() ? 1 : iequals(user, req.user.qualified_name) ? 0 : 2;
    };
    auto tagged_ok = [&](const Machine& m) { return tag.empty() || contains_ci(m.tags, tag); };
    auto assigned = [&](const std::string& machine) {
      auto it = st.assignments_by_machine.find(machine);
      return it != st.assignments_by_machine.end() && !it->second.empty();
    };
    auto busy_single = [&](const Machine& m) { return st.live_sessions_on(m.name) > 0 || st.reserved.contains(m.name); };

    int total = 0, tagged = 0, reg = 0, open = 0;
    std::vector<Candidate> usable;
    std::vector<const Machine*> to_power;  // off but power-managed, idle, not faulted
    std::string power_faults;              // "m1: FailedToStart, m2: StuckOnBoot": why not powered on
    bool private_group = false;
    std::vector<const Machine*> mine;  // machines assigned to the user (private groups)
    for (const auto& g : groups) {
      const DeliveryGroup& grp = st.groups.find(g)->second;
      const bool multi = grp.session_support == SessionSupport::multi_session;
      private_group = !application && grp.kind == DesktopKind::private_desktop;
      mine.clear();
      if (private_group) {
        for (const auto* asg : st.assignments_for(req.user, req.client_address))
          if (const auto* m = st.machine(asg->machine); m && m->delivery_group == g) mine.push_back(m);
      }
      // The fast path: a free desktop (registered, not in maintenance, no session, no assignment,
      // not reserved), the one powered on for this user first.
      if (!multi && (!private_group || mine.empty())) {
        const Machine* found = nullptr;
        for (const auto& [machine, c] : claims)
          if (const auto* m = st.machine(machine); m && m->delivery_group == g && hold(*m) == 0 && st.is_free(*m) &&
                                                    !a.tried.contains(m->name) && tagged_ok(*m))
            found = m;
        if (auto f = st.free_by_group.find(g); !found && f != st.free_by_group.end())
          for (const auto& name : f->second) {
            const Machine* m = st.machine(name);
            if (a.tried.contains(name) || !tagged_ok(*m) || hold(*m) == 2) continue;
            found = m;
            break;
          }
        if (found) {
          usable.push_back({found, 0});
          continue;
        }
      }
      // Multi-session hosts from the load index: the least effectively loaded acceptable one.
      if (multi && !private_group)
        if (auto h = st.hosts_by_load.find(g); h != st.hosts_by_load.end()) {
          const Machine* found = nullptr;
          for (const auto& [load, name] : h->second) {
            if (load >= kFullLoad) break;
            const Machine* m = st.machine(name);
            if (a.tried.contains(name) || !tagged_ok(*m)) continue;
            found = m;
            break;
          }
          if (found) {
            usable.push_back({found, st.effective_load(*found)});
            continue;
          }
        }
      // The walk: every machine of the group (or the user's own ones).
      std::vector<const Machine*> walk;
      if (private_group && !mine.empty()) {
        walk = mine;
      } else if (auto ms = st.machines_by_group.find(g); ms != st.machines_by_group.end()) {
        for (const auto& name : ms->second) walk.push_back(st.machine(name));
      }
      for (const Machine* mp : walk) {
        const Machine& m = *mp;
        if (a.tried.contains(m.name)) continue;
        if (private_group && mine.empty() && assigned(m.name)) continue;
        ++total;
        if (!tagged_ok(m)) continue;
        ++tagged;
        if (!registered(m)) {
          // Off (or on its way up), or on but not registered yet while held for this user: the
          // hypervisor may report a machine On long before its agent registers.
          const bool target = power_managed(st, m) ||
                              (hold(m) == 0 && m.power == PowerState::on && m.fault_state == "None");
          if (power && target && !m.in_maintenance_mode && st.live_sessions_on(m.name) == 0 &&
              (!private_group || mine.empty() || grp.automatic_power_on_for_assigned))
            to_power.push_back(&m);
          else if (power && !target && m.fault_state != "None" && !m.fault_state.empty() &&
                   (m.power == PowerState::off || m.power == PowerState::suspended))
            power_faults += (power_faults.empty() ? "" : ", ") + m.name + ": " + m.fault_state;
          continue;
        }
        ++reg;
        if (m.in_maintenance_mode) continue;
        ++open;
        const auto load = st.effective_load(m);
        if (multi ? load >= kFullLoad : busy_single(m)) continue;
        if (!multi && hold(m) == 2) continue;
        usable.push_back({&m, multi ? load : 0});
      }
    }
    if (private_group && mine.empty()) {
      // Assign on first use, within the rule's MaxDesktops.
      const auto max = rule && rule->type == RuleType::assignment ? rule->max_desktops : 0;
      if (max == 0)
        return failed(LaunchFailure::not_entitled, req.user.qualified_name + " has no machine assigned in '" + res.f_name + "'");
      const auto have = assignments_under(st, req.user, rule->name);
      if (have >= max)
        return failed(LaunchFailure::assignment_limit, req.user.qualified_name + " already has " + std::to_string(have) +
                                                          " of the " + std::to_string(max) + " machines '" + rule->name + "' allows");
      out.assign_rule = rule->name;
      out.assign_max = max;
    }
    if (usable.empty() && !to_power.empty()) {
      // The one held for this user first, then those held for no one (another user's only when
      // nothing else is left); one already on its way up first (no second machine for the same
      // wait), else any; by name among equals so that concurrent launches converge.
      std::stable_sort(to_power.begin(), to_power.end(), [&](const Machine* x, const Machine* y) {
        const int hx = hold(*x), hy = hold(*y);
        if (hx != hy) return hx < hy;
        const bool bx = booting(*x), by = booting(*y);
        return bx != by ? bx : x->name < y->name;
      });
      a.power_on = to_power.front()->name;
      out.assign_rule.clear();
      return failed(LaunchFailure::powering_on, "no machine is ready; powering on " + a.power_on + ": retry shortly");
    }
    if (usable.empty()) {
      if (total == 0)
        return failed(private_group && mine.empty() ? LaunchFailure::all_in_use : LaunchFailure::no_machines,
                      private_group && mine.empty() ? "no unassigned machine left in the delivery group"
                                                    : "the delivery group has no machines to offer");
      if (tagged == 0) return failed(LaunchFailure::tag_mismatch, "no machine has the tag '" + tag + "'");
      if (reg == 0)
        return failed(LaunchFailure::all_unregistered,
                      power_faults.empty() ? "every candidate machine is unregistered"
                                           : "every candidate machine is unregistered, and those that are off "
                                             "could not be powered on (" + power_faults + ")");
      if (open == 0) return failed(LaunchFailure::all_in_maintenance, "every registered candidate is in maintenance mode");
      return failed(LaunchFailure::all_in_use, "every registered candidate machine is in use");
    }
    // Least effective load; random among equals.
    if (usable.size() > 1) {
      std::shuffle(usable.begin(), usable.end(), rng);
      std::stable_sort(usable.begin(), usable.end(), [](const Candidate& x, const Candidate& y) { return x.load < y.load; });
    }
    auto pick = std::find_if(usable.begin(), usable.end(), [&](const Candidate& c) { return hold(*c.machine) == 0; });
    const Machine& m = *(pick == usable.end() ? usable.front() : *pick).machine;
    if (pick != usable.end()) claims.erase(m.name);  // the machine powered on for this user: taken
    out.machine = m.name;
    out.machine_id = m.id;
    out.address = m.agent_address;
    out.dns_name = m.dns_name;
    out.group = m.delivery_group;
    out.support = m.session_support;
    return {};
  }

  // How many machines the user holds under an assignment rule.
  static std::int64_t assignments_under(const SiteState& st, const identity::UserIdentity& user, const std::string& rule) {
    // The user's own assignments (not a group's or an address's) under the rule, each once.
    const auto mine = st.assignments_for(user, {});
    return std::count_if(mine.begin(), mine.end(),
                         [&](const Assignment* a) { return a->rule == rule && is_user(user, a->user); });
  }

  // The launch's rows, written in one write() (group commit): the ticket, the pending session
  // (guarded: a single-session machine with no live session, a multi-session one with a free
  // slot), a new assignment (guarded: the machine unassigned, the user under the rule's limit),
  // the machine's last-connection columns and the audit entry. A refused guard rolls this
  // function back and fails with errc::conflict and kGuardRefused.
  Status commit(storage::Transaction& tx, const Attempt& a, Reservation& out) {
    const auto& req = a.request;
    const std::string now = common::format_time(clock.now());
    const auto& cred_user = req.user.qualified_name;
    out.ticket = new_logon_ticket();
    if (auto st = put_ticket(tx, out.ticket, out.machine, cred_user, req.credential, out.ttl); !st) return st;
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
      storage::Query live_on_machine;
      live_on_machine.equals.emplace_back("machine", out.machine);
      live_on_machine.not_equals.emplace_back("state", "LoggedOff");
      const std::int64_t slots =
          out.support == SessionSupport::multi_session ? static_cast<std::int64_t>(AgentRegistry::kMaxMultiSessions) : 1;
      auto created = tx.create_guarded(s, Kind::session, live_on_machine, slots);
      if (!created) return created.error();
      if (!*created) return make_error(errc::conflict, kGuardRefused);
      if (!out.assign_rule.empty()) {
        storage::Query under_rule;
        under_rule.equals.emplace_back("rule", out.assign_rule);
        under_rule.equals.emplace_back("user", cred_user);
        auto have = tx.count(Kind::assignment, under_rule);
        if (!have) return have.error();
        if (*have >= out.assign_max) return make_error(errc::conflict, kGuardRefused);
        Object asg = common::model::make_default(Kind::assignment);
        asg.fields["machine"] = out.machine;
        asg.fields["user"] = cred_user;
        asg.fields["rule"] = out.assign_rule;
        storage::Query of_machine;
        of_machine.equals.emplace_back("machine", out.machine);
        auto made = tx.create_guarded(asg, Kind::assignment, of_machine, 1);
        if (!made) return made.error();
        if (!*made) return make_error(errc::conflict, kGuardRefused);
        out.new_assignment = (*made)->name;
      }
    }
    common::model::Fields changed{{"last_connection_time", now}, {"last_connection_user", cred_user}};
    if (auto r = tx.set_fields(Kind::machine, out.machine, changed); !r) return r.error();

    boost::json::object detail{{"user", cred_user},          {"resource", out.prepare.resource},
                               {"machine", out.machine},     {"reconnect", out.reconnect},
                               {"client_name", req.client_name}, {"client_address", req.client_address}};
    if (!out.new_assignment.empty()) detail["new_assignment"] = out.new_assignment;
    if (auto st = tx.append_audit(launch_audit("launch", out.session_key, detail)); !st) return st;

    out.prepare.user = cred_user;
    out.prepare.ticket = out.ticket;
    if (out.agent_key.empty()) out.agent_key = out.session_key;
    out.prepare.session_key = out.agent_key;
    out.prepare.connect_timeout_seconds = out.ttl;
    out.prepare.client_name = req.client_name;
    out.prepare.client_address = req.client_address;
    return {};
  }

  // A claim on `machine` was refused: the database holds sessions or assignments of it the engine
  // did not see (written by another broker sharing the database). They are read (two indexed
  // queries) and given to the engine, so that no launch picks the machine again in vain.
  void resync(const std::string& machine) {
    std::vector<storage::Change> found;
    auto st = repo.read([&](storage::Transaction& tx) -> Status {
      storage::Query q;
      q.equals.emplace_back("machine", machine);
      for (Kind k : {Kind::session, Kind::assignment}) {
        auto objects = tx.list(k, q);
        if (!objects) return objects.error();
        for (auto& o : *objects) found.push_back({k, o.name, {}, std::move(o)});
      }
      return {};
    });
    if (!st) return log->warn("launch: cannot read the sessions of {} again: {}", machine, st.error().describe());
    engine.apply(found);
  }

  void attempt(std::shared_ptr<Attempt> a) {
    Reservation res;
    LaunchResult outcome;
    // After an admin renamed a catalog, group or machine (the database cascaded it), the engine
    // reads the site again once; otherwise this is a flag test.
    if (auto st = engine.reload_if_needed(repo); !st) log->error("launch: cannot reload the site: {}", st.error().describe());
    {
      // Choose and reserve in memory (microseconds), then write outside every lock: storage
      // commits concurrent launches together (docs/architecture.md "Launch").
      const auto view = engine.view();
      {
        std::lock_guard lock(decide_mutex);
        outcome = engine.with_state([&](SiteState& st) { return decide(st, *view, *a, res); });
      }
      if (outcome.ok()) {
        auto st = repo.write([&](storage::Transaction& tx) -> Status { return commit(tx, *a, res); });
        const bool refused = !st && st.error().code == errc::conflict && st.error().message == kGuardRefused;
        if (refused) {
          // Before the reservation goes: no other launch may pick the machine in between.
          ++refused_claims;
          log->info("launch: {} for {}: {}; trying another machine", res.machine, a->request.user.qualified_name,
                    kGuardRefused);
          resync(res.machine);
        }
        // Confirmed: the committed session now holds the machine in the engine. Undone: the
        // reservation (and a multi-session machine's load bump) goes.
        if (res.reserved) engine.with_state([&](SiteState& s) { s.release(res.machine, !st.has_value()); });
        if (refused && ++a->guard_refusals <= kMaxGuardRetries) {
          a->tried.insert(res.machine);
          return attempt(a);
        }
        if (!st) {
          log->error("launch: the launch of {} on {} cannot be stored: {}", a->request.user.qualified_name, res.machine,
                     st.error().describe());
          outcome = failed(LaunchFailure::storage_error, st.error().describe());
        }
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
    // BrokeringDuration, informational: not part of the launch's commit. Durations are gathered
    // and written together, one write for all those of the last 200 ms (a storm's thousands of
    // launches cost a handful of commits); a crash may lose the last ones.
    note_brokering_duration(res.session_key, took);
    finish(a, std::move(r));
  }

  std::mutex durations_mutex;
  std::vector<std::pair<std::string, std::int64_t>> durations;  // guarded by durations_mutex

  void note_brokering_duration(const std::string& session, std::int64_t ms) {
    bool first = false;
    {
      std::lock_guard lock(durations_mutex);
      first = durations.empty();
      durations.emplace_back(session, ms);
    }
    if (!first) return;  // a flush is already due
    auto self = shared_from_this();
    auto flush = [self] {
      if (!self->work.post([self] { self->flush_brokering_durations(); })) self->flush_brokering_durations();
    };
    if (timers->after(std::chrono::milliseconds(200), flush) == 0) flush();
  }

  void flush_brokering_durations() {
    std::vector<std::pair<std::string, std::int64_t>> batch;
    {
      std::lock_guard lock(durations_mutex);
      batch.swap(durations);
    }
    if (batch.empty()) return;
    auto st = repo.write([&](storage::Transaction& tx) -> Status {
      for (const auto& [key, ms] : batch) {
        auto u = tx.set_fields(Kind::session, key, {{"brokering_duration_ms", ms}});
        if (!u && u.error().code != errc::not_found) return u.error();  // not_found: already gone
      }
      return {};
    });
    if (!st) log->warn("launch: brokering durations of {} launches not stored: {}", batch.size(), st.error().describe());
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
        if (auto r = tx.set_fields(Kind::machine, res.machine, {{"last_connection_failure", std::string("SessionPreparation")}});
            !r && r.error().code != errc::not_found)
          return r.error();
        return tx.append_audit(launch_audit("launch-failed", res.session_key,
                                            {{"user", a->request.user.qualified_name}, {"machine", res.machine},
                                             {"reason", "SessionPrepareFailure"}, {"error", error}}));
      });
      if (!st) log->error("launch: cannot undo the reservation on {}: {}", res.machine, st.error().describe());
      // The load bump of a multi-session machine goes with the launch.
      engine.with_state([&](SiteState& s) {
        if (auto b = s.bumps.find(res.machine); b != s.bumps.end() && (b->second.extra -= kLaunchLoadBump) <= 0)
          s.bumps.erase(b);
      });
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
      const auto timer = timers->after(left, [self, a, id] {
        if (!self->work.post([self, a, id] { self->wait_over(a, id); }) && !self->unpark(a, id).empty()) self->stopping(a);
      });
      if (timer == 0) return false;  // stopping: answer now
      a->wait_timer_handle = timer;
      waiting[machine].push_back(a);
    }
    log->info("launch: {} waits up to {} ms for {} to register", a->request.user.qualified_name, left.count(), machine);
    // It may have registered between the selection and now.
    if (auto m = engine.machine(machine); m && registered(*m)) wake(machine);
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
        timers->cancel(a->wait_timer_handle);
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
    const auto m = engine.machine(machine);
    if (!m || registered(*m)) return;  // gone, or registered after all
    const std::string fault = m->power == PowerState::on ? "Unregistered" : "StuckOnBoot";
    auto st = repo.write([&](storage::Transaction& tx) -> Status {
      common::model::Fields failed{{"fault_state", fault}, {"last_connection_failure", std::string("RegistrationTimeout")}};
      if (auto r = tx.set_fields(Kind::machine, machine, failed); !r) return r.error();
      return tx.append_audit(launch_audit("launch-failed", machine,
                                          {{"user", user}, {"machine", machine}, {"reason", "RegistrationTimeout"},
                                           {"fault_state", fault}, {"timeout_seconds", timeout.count()}}));
    });
    if (!st) log->error("launch: cannot record the registration timeout of {}: {}", machine, st.error().describe());
    else
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

Launcher::Launcher(storage::Repository& repository, Engine& engine, common::Clock& clock, AgentChannel& agents,
                   common::WorkQueue& work, std::shared_ptr<spdlog::logger> logger, LauncherOptions options)
    : impl_(std::make_shared<Impl>(repository, engine, clock, agents, work,
                                   logger ? std::move(logger) : common::null_logger(), std::move(options))) {}

Launcher::~Launcher() { stop(); }

void Launcher::stop() {
  std::map<std::string, std::vector<std::shared_ptr<Impl::Attempt>>> waiting;
  {
    std::lock_guard lock(impl_->wait_mutex);
    impl_->stopped = true;
    waiting.swap(impl_->waiting);
    for (auto& [machine, list] : waiting)
      for (auto& a : list) {
        impl_->timers->cancel(a->wait_timer_handle);
        a->wait_timer = 0;  // a timer already firing finds nothing to end
      }
  }
  if (impl_->own_timers) impl_->own_timers->stop();
  impl_->flush_brokering_durations();
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
  std::set<std::string> logging_off;  // not offered for reconnection, not ended twice
  {
    const auto now = impl_->clock.monotonic_now();
    std::lock_guard lock(impl_->decide_mutex);
    for (const auto& [name, until] : impl_->logging_off)
      if (now < until) logging_off.insert(name);
  }
  return impl_->engine.with_state([&](const SiteState& st) {
    std::vector<UserSession> out;
    for (const Session* s : st.sessions_of(user)) {
      if (s->state != SessionState::active && s->state != SessionState::disconnected) continue;
      if (logging_off.contains(s->name)) continue;
      const std::string state(to_string(s->state));
      if (!states.empty() && !states.contains(state)) continue;
      UserSession u;
      u.session_key = s->name;
      u.agent_key = s->key;
      u.machine = s->machine;
      u.resource = s->application.empty() ? s->delivery_group : s->application;
      u.state = state;
      u.client_name = s->client_name;
      if (const auto* m = st.machine(u.machine)) u.machine_id = m->id;
      out.push_back(std::move(u));
    }
    return out;
  });
}

Result<int> Launcher::end_user_sessions(const identity::UserIdentity& user, bool logoff) {
  auto sessions = user_sessions(user, {});
  if (!sessions) return sessions.error();
  for (const auto& s : *sessions) {
    auto impl = impl_;
    auto done = impl_->ending_missing(s.machine, s.session_key, [impl, s, logoff](bool ok, const std::string& error) {
      if (ok) return;
      impl->log->warn("{} of session {} on {} failed: {}", logoff ? "logoff" : "disconnect", s.session_key, s.machine, error);
      if (logoff && error != kNoSuchSession) impl->logoff_refused(s.session_key);
    });
    if (logoff) {
      impl_->logoff_requested(s.session_key);
      impl_->agents.logoff_session(s.machine, s.agent_key, impl_->opts.prepare_timeout, done);
    } else if (s.state == "Active")
      impl_->agents.disconnect_session(s.machine, s.agent_key, impl_->opts.prepare_timeout, done);
  }
  return static_cast<int>(sessions->size());
}

Status Launcher::session_command(const std::string& session_key, const std::string& command, const std::string& title,
                                 const std::string& text, AgentChannel::Done done) {
  const auto s = impl_->engine.session(session_key);
  if (!s) return make_error(errc::not_found, "no session '" + session_key + "'");
  if (s->state == SessionState::logged_off) return make_error(errc::not_found, "session '" + session_key + "' has logged off");
  const std::string machine = s->machine, key = s->key;
  const auto timeout = impl_->opts.prepare_timeout;
  if (command == "logoff") {
    // The agent no longer has it: the session is over, and the admin's logoff has done its job.
    auto ended = [impl = impl_, session_key, done = std::move(done)](bool ok, const std::string& error) {
      if (!ok && error != kNoSuchSession) impl->logoff_refused(session_key);
      done(ok || error == kNoSuchSession, ok || error == kNoSuchSession ? std::string() : error);
    };
    impl_->logoff_requested(session_key);
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

void Launcher::machine_power_failed(const std::string& machine) {
  impl_->unclaim(machine);
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
  // What is due, from memory: a write only when something is (no commit every 5 s for nothing).
  const auto ttl = std::chrono::seconds(impl_->engine.view()->settings.logon_ticket_ttl_seconds);
  std::vector<std::string> purge, time_out;
  impl_->engine.with_state([&](const SiteState& st) {
    for (const auto& [name, s] : st.sessions) {
      common::SysTime t;
      if (s.state == SessionState::logged_off) {
        // Logged-off sessions are kept for a day (admins look back at them), then purged.
        if (!common::parse_time(s.end_time, t) || now >= t + kLoggedOffRetention) purge.push_back(name);
      } else if (s.state == SessionState::preparing_new_session && s.brokered) {
        // A grace of a few seconds past the ticket lifetime: the agent drops its reservation then too.
        if (common::parse_time(s.start_time, t) && now >= t + ttl + std::chrono::seconds(5)) time_out.push_back(name);
      }
    }
  });
  const auto now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count();
  const bool tickets_due = now_ms >= impl_->next_ticket_expiry.load();
  if (!tickets_due && purge.empty() && time_out.empty()) return {};
  // Tickets issued from here on lower it again.
  if (tickets_due) impl_->next_ticket_expiry = std::numeric_limits<std::int64_t>::max();
  auto swept = impl_->repo.write([&](storage::Transaction& tx) -> Status {
    if (tickets_due)
      if (auto r = tx.purge_logon_tickets(now_text); !r) return r.error();
    for (const auto& name : purge) {
      auto s = tx.get(Kind::session, name);
      if (!s || s->text("state") != "LoggedOff") continue;
      if (auto r = tx.remove(Kind::session, name); !r) return r;
    }
    std::vector<Object> pending;
    for (const auto& name : time_out)
      if (auto s = tx.get(Kind::session, name); s && s->text("state") == "PreparingNewSession") pending.push_back(*s);
    for (const auto& s : pending) {
      if (auto r = tx.remove(Kind::session, s.name); !r) return r;
      if (auto r = tx.set_fields(Kind::machine, s.text("machine"),
                                 {{"last_connection_failure", std::string("ConnectionTimeout")}});
          !r && r.error().code != errc::not_found)
        return r.error();
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
  if (!swept && tickets_due) impl_->next_ticket_expiry = 0;  // try again at the next sweep
  return swept;
}

int Launcher::in_flight() const { return impl_->inflight.load(); }

void Launcher::flush_brokering_durations() { impl_->flush_brokering_durations(); }

std::uint64_t Launcher::refused_claims() const { return impl_->refused_claims.load(); }

void Launcher::set_power(PowerControl* power) { impl_->power = power; }

}  // namespace broker

