#include "broker/agent_registry.hpp"

#include "broker/engine.hpp"

#include "common/crypto.hpp"
#include "common/model_json.hpp"
#include "broker/session_keys.hpp"
#include "identity/directory.hpp"
#include "storage/repository.hpp"

#include <boost/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>

namespace broker {

using common::errc;
using common::make_error;
using common::model::Kind;
using common::model::Object;

namespace {

std::string protocol_or_default(const std::string& p) {
  return p == "HDX" || p == "RDP" || p == "Console" ? p : std::string("HDX");
}

std::string stored_state(const std::string& agent_state) {
  if (agent_state == "PreparingNewSession" || agent_state == "Connected" || agent_state == "Active" || agent_state == "Disconnected") return agent_state;
  return "Other";
}

storage::AuditEntry agent_audit(const std::string& machine, const char* action) {
  storage::AuditEntry e;
  e.actor = "agent:" + machine;
  e.action = action;
  e.kind = "machine";
  e.object = machine;
  return e;
}

// The session `key` of `machine`, in any state: the engine's index names the record; a session
// the engine does not know yet (created by an earlier write of the same group commit) is looked
// for as session_keys.hpp stores it.
Result<Object> known_session(storage::Transaction& tx, const Engine& engine, const std::string& machine,
                             const std::string& key) {
  if (auto name = engine.session_name(machine, key)) {
    auto s = tx.get(Kind::session, *name);
    if (s && s->text("machine") == machine && agent_session_key(*s) == key) return s;
    if (!s && s.error().code != errc::not_found) return s.error();
  }
  return find_session(tx, machine, key);
}

// The session `key` of `machine` that has not logged off, or errc::not_found.
Result<Object> live_session(storage::Transaction& tx, const Engine& engine, const std::string& machine,
                            const std::string& key) {
  auto s = known_session(tx, engine, machine, key);
  if (s && s->text("state") == "LoggedOff")
    return make_error(errc::not_found, "session '" + key + "' has logged off");
  return s;
}

// An agent reuses a key of a session that logged off: the old record makes room for the new one.
Status forget_logged_off(storage::Transaction& tx, const Engine& engine, const std::string& machine,
                         const std::string& key) {
  auto s = known_session(tx, engine, machine, key);
  if (s && s->text("state") == "LoggedOff") return tx.remove(Kind::session, s->name);
  return {};
}

// The most sessions a machine may report (docs/cbp.md "Sessions"): one on a single-session
// machine; kMaxMultiSessions on a session host.
std::size_t session_limit(const std::string& session_support) {
  return session_support == "MultiSession" ? AgentRegistry::kMaxMultiSessions : 1;
}

// The session ended: kept as LoggedOff with its end time (purged later by the launcher's sweep).
Status end_session(storage::Transaction& tx, const Object& session, const std::string& now) {
  Object ended = session;
  ended.fields["state"] = std::string("LoggedOff");
  ended.fields["state_change_time"] = now;
  ended.fields["end_time"] = now;
  auto r = tx.update(session.name, ended);
  if (!r) return r.error();
  return {};
}

}  // namespace

AgentRegistry::AgentRegistry(storage::Repository& repository, Engine& engine, common::Clock& clock,
                             std::shared_ptr<spdlog::logger> logger, int max_failures_per_minute,
                             std::chrono::seconds back_off)
    : repository_(repository),
      engine_(engine),
      clock_(clock),
      logger_(std::move(logger)),
      max_failures_(max_failures_per_minute),
      back_off_(back_off) {}

Result<std::string> AgentRegistry::machine_verifier(const std::string& machine) {
  std::string verifier;
  auto st = repository_.read([&](storage::Transaction& tx) -> Status {
    auto m = tx.get(Kind::machine, machine);
    if (!m) return m.error();
    verifier = m->text("secret_hash");
    return {};
  });
  if (!st) return st.error();
  if (verifier.empty()) return make_error(errc::forbidden, "machine '" + machine + "' has no secret yet");
  return verifier;
}

Result<std::string> AgentRegistry::enrollment_verifier(const std::string& catalog) {
  std::string verifier;
  auto st = repository_.read([&](storage::Transaction& tx) -> Status {
    auto c = tx.get(Kind::catalog, catalog);
    if (!c) return c.error();
    verifier = c->text("enrollment_key_hash");
    return {};
  });
  if (!st) return st.error();
  if (verifier.empty()) return make_error(errc::not_found, "catalog '" + catalog + "' has no enrollment key");
  return verifier;
}

Result<std::string> AgentRegistry::enroll(const std::string& machine, const std::string& catalog) {
  const std::string secret = common::crypto::random_hex(32);
  // Registration is live: the engine knows whether an agent holds the machine now.
  const auto live = engine_.machine(machine);
  const bool registered = live && live->registration == RegistrationState::registered;
  auto st = repository_.write([&](storage::Transaction& tx) -> Status {
    auto existing = tx.get(Kind::machine, machine);
    if (!existing && existing.error().code != errc::not_found) return existing.error();
    if (existing) {
      if (existing->text("catalog") != catalog)
        return make_error(errc::conflict, "machine '" + machine + "' belongs to catalog '" + existing->text("catalog") + "'");
      if (registered) return make_error(errc::conflict, "machine '" + machine + "' is registered; authenticate with its secret");
      auto r = tx.set_fields(Kind::machine, machine, {{"secret_hash", common::crypto::sha256_hex(secret)}});
      if (!r) return r.error();
      return tx.append_audit(agent_audit(machine, "enroll"));
    }
    Object m = common::model::make_default(Kind::machine, machine);
    m.fields["catalog"] = catalog;
    m.fields["secret_hash"] = common::crypto::sha256_hex(secret);
    if (auto msg = common::model::validate_fields(m); !msg.empty()) return make_error(errc::invalid_argument, msg);
    auto r = tx.create(m);
    if (!r) return r.error();
    auto audit = agent_audit(machine, "enroll");
    audit.after = common::model::to_json_text(*r);
    return tx.append_audit(audit);
  });
  if (!st) return st.error();
  logger_->info("machine '{}' enrolled in catalog '{}'", machine, catalog);
  return secret;
}

bool AgentRegistry::in_back_off(const std::string& machine) {
  std::lock_guard lock(mutex_);
  auto it = banned_until_.find(machine);
  if (it == banned_until_.end()) return false;
  if (clock_.now() < it->second) return true;
  banned_until_.erase(it);
  return false;
}

void AgentRegistry::record_failure(const std::string& machine) {
  std::lock_guard lock(mutex_);
  const auto now = clock_.now();
  auto& times = failures_[machine];
  times.erase(std::remove_if(times.begin(), times.end(), [&](auto t) { return now - t > std::chrono::minutes(1); }),
              times.end());
  times.push_back(now);
  if (static_cast<int>(times.size()) >= max_failures_) {
    banned_until_[machine] = now + back_off_;
    times.clear();
    logger_->warn("machine '{}' failed authentication {} times in a minute: refused for {} s", machine, max_failures_,
                  back_off_.count());
  }
  if (failures_.size() > 100000) failures_.clear();  // bound memory under a flood of names
}

void AgentRegistry::record_success(const std::string& machine) {
  std::lock_guard lock(mutex_);
  failures_.erase(machine);
}

Result<std::optional<Refusal>> AgentRegistry::register_agent(const Registration& reg) {
  const auto load_index = std::clamp<std::int64_t>(reg.load_index, 0, kFullLoad);
  // The machine and its catalog's session support, from the engine (the live site).
  std::optional<Refusal> refusal = engine_.with_state([&](const SiteState& site) -> std::optional<Refusal> {
    const Machine* m = site.machine(reg.machine);
    if (!m) return Refusal{"UnknownMachine", "no machine named '" + reg.machine + "'"};
    const auto support = to_string(m->session_support);
    if (support != reg.session_support)
      return Refusal{"SingleMultiSessionMismatch", "the agent is " + reg.session_support + " but catalog '" +
                                                       m->catalog + "' is " + std::string(support)};
    return std::nullopt;
  });
  if (refusal) {
    logger_->warn("registration of '{}' refused: {}: {}", reg.machine, refusal->reason, refusal->message);
    return refusal;
  }
  int ended = 0, non_brokered = 0, ignored = 0, over_limit = 0;
  std::vector<std::string> lost;  // pending sessions whose preparation the agent no longer has
  const auto now_time = clock_.now();
  const std::string now = common::format_time(now_time);
  // What must survive a restart (docs/cbp.md "Registration"): the sessions reconciliation
  // changes, the agent's facts when they changed, audit. Run first as a dry run in a read
  // transaction (apply false: stops at the first write it would make, setting needs_write), and
  // only when something would change, again in a write transaction.
  bool needs_write = false;
  const bool any_live =
      engine_.with_state([&](const SiteState& site) { return site.live_sessions_on(reg.machine) > 0; });
  auto reconcile = [&](storage::Transaction& tx, bool apply) -> Status {
    ended = non_brokered = ignored = over_limit = 0;
    lost.clear();
    needs_write = false;
    const auto must_write = [&] {
      needs_write = true;
      return !apply;  // true: stop here (dry run)
    };
    auto m = tx.get(Kind::machine, reg.machine);
    if (!m && m.error().code == errc::not_found) {  // removed since the check above
      refusal = Refusal{"UnknownMachine", "no machine named '" + reg.machine + "'"};
      return {};
    }
    if (!m) return m.error();
    // Sessions: end the stored ones the agent no longer has, record the ones we did not broker.
    // A machine with no live session that reports none has nothing to reconcile.
    std::vector<std::string> states;
    if (any_live || !reg.sessions.empty()) {
      storage::Query q;
      q.equals.emplace_back("machine", reg.machine);
      auto stored = tx.list(Kind::session, q);
      if (!stored) return stored.error();
      for (const auto& s : *stored) {
        if (s.text("state") == "LoggedOff") continue;
        const auto key = agent_session_key(s);
        const auto reported = std::find_if(reg.sessions.begin(), reg.sessions.end(),
                                           [&](const AgentSession& a) { return a.session_key == key; });
        if (reported != reg.sessions.end()) continue;
        if (s.text("state") != "PreparingNewSession") {
          if (must_write()) return {};
          if (auto r = end_session(tx, s, now); !r) return r;
          ++ended;
          continue;
        }
        // A launch's pending session the agent does not report: it restarted without the
        // preparation, so the user's client can never connect to it. Ended at once, unless a launch
        // may still be preparing it right now (younger than the preparation grace).
        common::SysTime started;
        const bool young =
            !common::parse_time(s.text("start_time"), started) || now_time < started + preparation_grace_;
        if (young || !s.flag("brokered", true)) {
          states.push_back(s.text("state"));
          continue;
        }
        if (must_write()) return {};
        if (auto r = end_session(tx, s, now); !r) return r;
        lost.push_back(s.name);
        auto failed = tx.set_fields(Kind::machine, reg.machine,
                                    {{"last_connection_failure", std::string("SessionPreparation")}});
        if (!failed) return failed.error();
        m = std::move(*failed);
        auto e = agent_audit(reg.machine, "launch-failed");
        e.kind = "session";
        e.object = s.name;
        e.after = boost::json::serialize(boost::json::object{{"user", s.text("user_name")},
                                                             {"machine", reg.machine},
                                                             {"reason", "PreparationLost"},
                                                             {"error", "the agent re-registered without the session"}});
        if (auto audited = tx.append_audit(e); !audited) return audited;
      }
      const std::size_t limit = session_limit(reg.session_support);
      for (const auto& a : reg.sessions) {
        auto existing = live_session(tx, engine_, reg.machine, a.session_key);
        if (!existing && existing.error().code != errc::not_found) return existing.error();
        if (!existing && a.state == "PreparingNewSession") {
          ++ignored;  // no client and no valid ticket: it will never become a session we know
          continue;
        }
        if (!existing && states.size() >= limit) {
          ++over_limit;  // more than the machine's session support allows: not recorded
          continue;
        }
        Object s = existing ? *existing : common::model::make_default(Kind::session, "");
        if (!existing) {
          if (must_write()) return {};
          if (auto r = forget_logged_off(tx, engine_, reg.machine, a.session_key); !r) return r;
          auto name = reported_session_name(tx, reg.machine, a.session_key);
          if (!name) return name.error();
          s.name = *name;
          s.fields["session_key"] = a.session_key;
          s.fields["brokered"] = false;
          s.fields["start_time"] = now;
          ++non_brokered;
        }
        s.fields["machine"] = reg.machine;
        // What the agent does not report keeps what the broker knows (docs/cbp.md allows a
        // prepared session without its user); another user in a brokered session is not taken
        // over here: the session's next event ends it (session_event).
        const bool brokered = existing && existing->flag("brokered", true);
        if (!a.user.empty() && !(brokered && !existing->text("user_name").empty()))
          s.fields["user_name"] = a.user;
        if (!a.client_name.empty()) s.fields["client_name"] = a.client_name;
        if (!a.client_address.empty()) s.fields["client_address"] = a.client_address;
        const auto state = stored_state(a.state);
        if (!existing || s.text("state") != state) s.fields["state_change_time"] = now;
        s.fields["state"] = state;
        s.fields["protocol"] = protocol_or_default(a.protocol);
        if (!a.application.empty()) {
          s.fields["application"] = a.application;
          s.fields["session_type"] = std::string("Application");
        }
        if (existing && common::model::same_declared_fields(s, *existing) && s.fields == existing->fields) {
          states.push_back(state);
          continue;  // nothing changed: no write
        }
        if (must_write()) return {};
        auto r = existing ? tx.update(s.name, s) : tx.create(s);
        if (!r) return r.error();
        states.push_back(state);
      }
      if (over_limit > 0) {
        if (must_write()) return {};
        auto e = agent_audit(reg.machine, "session-limit-exceeded");
        e.after = boost::json::serialize(boost::json::object{{"session_support", reg.session_support},
                                                             {"limit", static_cast<std::int64_t>(limit)},
                                                             {"not_recorded", over_limit}});
        if (auto r = tx.append_audit(e); !r) return r;
      }
    }
    // The agent's facts, written only when they changed. Registration state, load index, session
    // count and summary state are live (the engine's), never written here.
    common::model::Fields facts;
    const auto fact = [&](const char* field, std::string value) {
      if (m->text(field) != value) facts.emplace(field, std::move(value));
    };
    fact("agent_version", reg.agent_version);
    fact("os_type", reg.os);
    fact("cbp_version", std::to_string(reg.protocol_version));
    fact("agent_address", reg.address);
    fact("fault_state", "None");  // a registered machine has no registration or start fault
    if (facts.empty()) return {};
    if (must_write()) return {};
    auto r = tx.set_fields(Kind::machine, reg.machine, facts);
    if (!r) return r.error();
    return {};
  };
  auto st = repository_.read([&](storage::Transaction& tx) { return reconcile(tx, false); });
  if (st && needs_write && !refusal) st = repository_.write([&](storage::Transaction& tx) { return reconcile(tx, true); });
  if (!st) return st.error();
  if (refusal) {
    logger_->warn("registration of '{}' refused: {}: {}", reg.machine, refusal->reason, refusal->message);
    return refusal;
  }
  engine_.registered(reg.machine, load_index);
  logger_->info(
      "machine '{}' registered (agent {}, protocol {}, {} sessions; {} stale ended, {} non-brokered, {} unknown "
      "preparations ignored)",
      reg.machine, reg.agent_version, reg.protocol_version, reg.sessions.size(), ended, non_brokered, ignored);
  for (const auto& key : lost)
    logger_->warn("machine '{}' re-registered without the pending session {}: the launch's preparation is lost; "
                  "session ended (PreparationLost)",
                  reg.machine, key);
  if (over_limit > 0)
    logger_->warn("machine '{}' ({}) reported {} sessions more than it may have ({}); not recorded", reg.machine,
                  reg.session_support, over_limit, session_limit(reg.session_support));
  return refusal;
}

Status AgentRegistry::heartbeat(const std::string& machine, std::int64_t load_index, std::int64_t session_count) {
  // Live state: memory only (docs/cbp.md "Heartbeats").
  if (!engine_.set_load(machine, std::clamp<std::int64_t>(load_index, 0, kFullLoad), session_count))
    return common::make_error(errc::not_found, "no machine '" + machine + "'");
  return {};
}

Result<MachineSessions> machine_sessions(storage::Transaction& tx, const std::string& machine) {
  auto m = tx.get(Kind::machine, machine);
  if (!m) return m.error();
  auto cat = tx.get(Kind::catalog, m->text("catalog"));
  if (!cat) return cat.error();
  storage::Query q;
  q.equals.emplace_back("machine", machine);
  auto sessions = tx.list(Kind::session, q);
  if (!sessions) return sessions.error();
  MachineSessions out{std::move(*m), cat->text("session_support"), {}};
  for (const auto& s : *sessions)
    if (s.text("state") != "LoggedOff") out.states.push_back(s.text("state"));
  return out;
}

Result<SessionEventOutcome> AgentRegistry::session_event(const std::string& machine, const std::string& event,
                                                         const AgentSession& a) {
  const std::string now = common::format_time(clock_.now());
  SessionEventOutcome outcome;
  bool over_limit = false;
  auto apply = [&](storage::Transaction& tx) -> Status {
    auto existing = live_session(tx, engine_, machine, a.session_key);
    if (!existing && existing.error().code != errc::not_found) return existing.error();
    if (event == "LoggedOff") {
      if (!existing) return {};
      if (existing->text("state") != "PreparingNewSession" || !existing->flag("brokered", true))
        return end_session(tx, *existing, now);
      // The agent gave up waiting for the client of a launch (the ticket's lifetime passed): the
      // session never began. The launch is recorded as ConnectionTimeout, as the broker's own
      // sweep would.
      if (auto r = tx.remove(Kind::session, existing->name); !r) return r;
      if (auto r = tx.set_fields(Kind::machine, machine, {{"last_connection_failure", std::string("ConnectionTimeout")}});
          !r && r.error().code != errc::not_found)
        return r.error();
      auto e = agent_audit(machine, "launch-timeout");
      e.kind = "session";
      e.object = existing->name;
      e.after = boost::json::serialize(boost::json::object{
          {"user", existing->text("user_name")}, {"machine", machine}, {"reason", "ConnectionTimeout"}});
      logger_->warn("launch: the client of {} never connected to {} (session {}): ConnectionTimeout",
                    existing->text("user_name"), machine, existing->name);
      return tx.append_audit(e);
    }
    std::string state;
    if (event == "Connected") state = "Connected";
    else if (event == "Active" || event == "Reconnected") state = "Active";
    else if (event == "Disconnected") state = "Disconnected";
    else return make_error(errc::invalid_argument, "unknown session event '" + event + "'", "event");
    if (existing && existing->flag("brokered", true) && !a.user.empty() &&
        !identity::iequals(a.user, existing->text("user_name")) && state != "Disconnected") {
      // Someone else logged on with this launch: the agent is told to end the session.
      outcome.end_session = true;
      outcome.why = "the brokered user is " + existing->text("user_name") + " but " + a.user + " connected";
      if (auto r = tx.set_fields(Kind::machine, machine, {{"last_connection_failure", std::string("Other")}});
          !r && r.error().code != errc::not_found)
        return r.error();
      auto e = agent_audit(machine, "session-wrong-user");
      e.kind = "session";
      e.object = a.session_key;
      e.after = boost::json::serialize(boost::json::object{{"brokered_user", existing->text("user_name")},
                                                           {"connected_user", a.user},
                                                           {"client_address", a.client_address}});
      return tx.append_audit(e);
    }
    if (!existing) {
      // A session the broker did not broker: within the machine's session support only.
      auto ms = machine_sessions(tx, machine);
      if (!ms) return ms.error();
      const auto limit = session_limit(ms->session_support);
      if (ms->states.size() >= limit) {
        over_limit = true;
        auto e = agent_audit(machine, "session-limit-exceeded");
        e.after = boost::json::serialize(boost::json::object{{"session_support", ms->session_support},
                                                             {"limit", static_cast<std::int64_t>(limit)},
                                                             {"session_key", a.session_key}});
        return tx.append_audit(e);
      }
    }
    if (!existing)
      if (auto r = forget_logged_off(tx, engine_, machine, a.session_key); !r) return r;
    Object s = existing ? *existing : common::model::make_default(Kind::session, "");
    if (!existing) {
      auto name = reported_session_name(tx, machine, a.session_key);
      if (!name) return name.error();
      s.name = *name;
      s.fields["session_key"] = a.session_key;
      s.fields["brokered"] = false;
      s.fields["start_time"] = now;
    }
    s.fields["machine"] = machine;
    if (!a.user.empty()) s.fields["user_name"] = a.user;
    if (!a.client_name.empty()) s.fields["client_name"] = a.client_name;
    if (!a.client_address.empty()) s.fields["client_address"] = a.client_address;
    s.fields["protocol"] = protocol_or_default(a.protocol);
    if (!a.application.empty()) {
      s.fields["application"] = a.application;
      s.fields["session_type"] = std::string("Application");
    }
    s.fields["state"] = state;
    s.fields["state_change_time"] = now;
    auto r = existing ? tx.update(s.name, s) : tx.create(s);
    if (!r) return r.error();
    return {};
  };
  // The machine's summary follows from the committed sessions (the engine derives it).
  auto st = repository_.write(apply);
  if (!st) return st.error();
  if (outcome.end_session)
    logger_->warn("machine '{}': session {}: {}; ending it", machine, a.session_key, outcome.why);
  if (over_limit)
    logger_->warn("machine '{}' reported session {} beyond what its session support allows; not recorded", machine,
                  a.session_key);
  return outcome;
}

Result<storage::LogonTicket> AgentRegistry::redeem_ticket(const std::string& machine, const std::string& ticket) {
  std::optional<common::Error> refused;
  storage::LogonTicket redeemed;
  // The reading the launcher issued it with: a wall clock set back does not lengthen a ticket.
  const auto now = common::format_time(clock_.monotonic_now());
  auto st = repository_.write([&](storage::Transaction& tx) -> Status {
    auto r = tx.redeem_logon_ticket(common::crypto::sha256_hex(ticket), machine, now);
    if (r) {
      redeemed = std::move(*r);
    } else if (r.error().code == errc::not_found) {
      refused = r.error();  // commit anyway: an expired ticket's deletion must stick
    } else {
      return r.error();
    }
    return {};
  });
  if (!st) return st.error();
  if (refused) {
    logger_->warn("machine '{}' presented a logon ticket that cannot be redeemed: {}", machine, refused->message);
    return *refused;
  }
  if (!credential_key_.empty() && redeemed.credential_data.starts_with("v1.")) {
    // Sealed by the launcher with the ticket's hash and machine as associated data.
    auto plain = common::crypto::open(credential_key_, redeemed.credential_data,
                                      common::crypto::sha256_hex(ticket) + "|" + machine);
    if (!plain) {
      logger_->error("machine '{}': the credentials of a logon ticket cannot be decrypted with the site key: {}",
                     machine, plain.error().describe());
      return common::Error{errc::not_found, "the ticket's credentials cannot be decrypted"};
    }
    redeemed.credential_data = std::move(*plain);
  }
  logger_->info("machine '{}' redeemed the logon ticket of {}", machine, redeemed.user_name);
  return redeemed;
}

Status AgentRegistry::deregister(const std::string& machine, const std::string& reason) {
  return unregister(machine, reason, true);
}

Status AgentRegistry::record_rejection(const std::string& machine, const std::string& reason) {
  return unregister(machine, reason, false);
}

Status AgentRegistry::unregister(const std::string& machine, const std::string& reason, bool coalesce) {
  // The state is live (the engine's): no agent holds the machine now, whatever storage says.
  // The reason and time are history admins read: stored.
  engine_.unregistered(machine);
  // A flapping agent (connects and drops again and again) must not become a stream of writes: the
  // same reason is recorded again at most once per kDeregistrationRecordInterval. (Rejected
  // handshakes are bounded by the authentication back-off instead, and each one is recorded.)
  const auto now = clock_.now();
  if (coalesce) {
    std::lock_guard lock(mutex_);
    auto it = deregistrations_.find(machine);
    if (it != deregistrations_.end() && it->second.reason == reason && now >= it->second.at &&
        now - it->second.at < kDeregistrationRecordInterval) {
      logger_->debug("machine '{}' unregistered again: {} (recorded at most once a minute)", machine, reason);
      return {};
    }
  }
  auto st = repository_.write([&](storage::Transaction& tx) -> Status {
    auto r = tx.set_fields(Kind::machine, machine,
                           {{"last_deregistration_reason", reason},
                            {"last_deregistration_time", common::format_time(now)}});
    if (!r && r.error().code == errc::not_found) return {};  // removed meanwhile
    if (!r) return r.error();
    return {};
  });
  if (st) {
    logger_->info("machine '{}' unregistered: {}", machine, reason);
    std::lock_guard lock(mutex_);
    if (deregistrations_.size() >= kMaxDeregistrationsKept)
      std::erase_if(deregistrations_, [&](const auto& d) { return now - d.second.at >= kDeregistrationRecordInterval; });
    deregistrations_[machine] = {reason, now};
  }
  return st;
}

}  // namespace broker
