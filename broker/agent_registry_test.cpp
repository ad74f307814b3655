#include "broker/agent_registry.hpp"

#include "broker/engine.hpp"
#include "broker/session_keys.hpp"
#include "broker/site_objects.hpp"
#include "common/crypto.hpp"
#include "common/log.hpp"
#include "common/metrics.hpp"
#include "storage/repository.hpp"

#include <doctest/doctest.h>

using namespace common::model;
using broker::AgentRegistry;
using broker::AgentSession;
using broker::Registration;

namespace {

// Commits the repository made so far (broker_storage_commit_batches_total).
double commits(const common::Metrics& metrics) {
  const std::string text = "\n" + metrics.render();
  const std::string name = "broker_storage_commit_batches_total";
  const auto pos = text.find("\n" + name + " ");
  if (pos == std::string::npos) return 0;
  return std::stod(text.substr(pos + name.size() + 2));
}

struct Fixture {
  common::Metrics metrics;
  broker::Engine engine;  // outlives the repository's commits
  std::unique_ptr<storage::Repository> repo;
  std::unique_ptr<broker::SiteObjects> site;
  common::ManualClock clock{common::SysTime{std::chrono::hours(24 * 365 * 56)}};
  std::unique_ptr<AgentRegistry> agents;
  Fixture() {
    storage::SqliteOptions o;
    o.path = ":memory:";
    o.metrics = &metrics;
    auto r = storage::open_sqlite(o);
    REQUIRE(r.has_value());
    repo = std::move(*r);
    site = std::make_unique<broker::SiteObjects>(*repo, common::null_logger());
    Object cat = make_default(Kind::catalog, "pool");
    cat.fields["enrollment_key_hash"] = common::crypto::sha256_hex("enroll-me");
    Object multi = make_default(Kind::catalog, "rds");
    multi.fields["session_support"] = std::string("MultiSession");
    std::vector<Object> declared{cat, multi, make_default(Kind::delivery_group, "grp")};
    Object m = make_default(Kind::machine, "DEMO\\m1");
    m.fields["catalog"] = std::string("pool");
    m.fields["delivery_group"] = std::string("grp");
    declared.push_back(m);
    REQUIRE(site->reconcile("/etc/b.toml", std::nullopt, declared).has_value());
    REQUIRE(engine.attach(*repo));
    agents = std::make_unique<AgentRegistry>(*repo, engine, clock, common::null_logger(), 3, std::chrono::seconds(60));
  }
  Object machine(const std::string& name) { return *site->get(Kind::machine, name); }
  // The live fields, from the engine.
  broker::Machine live(const std::string& name) { return engine.machine(name).value(); }
  std::string registration(const std::string& name) { return std::string(to_string(live(name).registration)); }
  std::string summary(const std::string& name) { return std::string(to_string(live(name).summary)); }
  std::size_t sessions(const std::string& name) { return engine.sessions_of_machine(name).size(); }
};

Registration reg(std::string machine, std::vector<AgentSession> sessions = {}) {
  Registration r;
  r.machine = std::move(machine);
  r.agent_version = "1.0";
  r.os = "Windows 11";
  r.session_support = "SingleSession";
  r.address = "10.0.0.5:1494";
  r.sessions = std::move(sessions);
  return r;
}

}  // namespace

TEST_CASE("enrollment gives a secret once; the verifier is its sha256") {
  Fixture f;
  CHECK(f.agents->machine_verifier("DEMO\\m1").error().code == common::errc::forbidden);  // no secret yet
  CHECK(f.agents->machine_verifier("nope").error().code == common::errc::not_found);
  CHECK(*f.agents->enrollment_verifier("pool") == common::crypto::sha256_hex("enroll-me"));
  CHECK(f.agents->enrollment_verifier("rds").error().code == common::errc::not_found);
  auto secret = f.agents->enroll("DEMO\\m1", "pool");
  REQUIRE(secret.has_value());
  CHECK(*f.agents->machine_verifier("DEMO\\m1") == common::crypto::sha256_hex(*secret));
  auto rekeyed = f.agents->enroll("DEMO\\m1", "pool");  // not registered: a lost secret can be replaced
  REQUIRE(rekeyed.has_value());
  CHECK(*f.agents->machine_verifier("DEMO\\m1") == common::crypto::sha256_hex(*rekeyed));
  REQUIRE(f.agents->register_agent(reg("DEMO\\m1")).has_value());
  CHECK(f.agents->enroll("DEMO\\m1", "pool").error().code == common::errc::conflict);  // registered
  auto fresh = f.agents->enroll("DEMO\\new", "pool");  // a new machine joins the catalog
  REQUIRE(fresh.has_value());
  CHECK(f.machine("DEMO\\new").text("catalog") == "pool");
  CHECK(f.agents->enroll("DEMO\\m1", "rds").error().code == common::errc::conflict);
}

TEST_CASE("registration, session reconciliation, events, summary state, deregistration") {
  Fixture f;
  auto refused = f.agents->register_agent([] {
    auto r = reg("DEMO\\m1");
    r.session_support = "MultiSession";
    return r;
  }());
  REQUIRE(refused.has_value());
  REQUIRE(refused->has_value());
  CHECK((*refused)->reason == "SingleMultiSessionMismatch");
  CHECK(f.registration("DEMO\\m1") == "Unregistered");
  CHECK((*f.agents->register_agent(reg("ghost")))->reason == "UnknownMachine");

  // A stored session the agent no longer has is ended; an unknown one is recorded non-brokered.
  Object stale = make_default(Kind::session, "stale-key");
  stale.fields["machine"] = std::string("DEMO\\m1");
  stale.fields["state"] = std::string("Active");
  REQUIRE(f.repo->write([&](storage::Transaction& tx) -> common::Status {
    auto r = tx.create(stale);
    if (!r) return r.error();
    return {};
  }));
  AgentSession s{"s-1", "DEMO\\alice", "Active", "pc1", "10.1.1.1", "HDX", ""};
  auto ok = f.agents->register_agent(reg("DEMO\\m1", {s}));
  REQUIRE(ok.has_value());
  CHECK_FALSE(ok->has_value());
  auto m = f.machine("DEMO\\m1");
  CHECK(f.registration("DEMO\\m1") == "Registered");
  CHECK(m.text("agent_address") == "10.0.0.5:1494");
  CHECK(m.text("agent_version") == "1.0");
  CHECK(m.text("os_type") == "Windows 11");
  CHECK(f.summary("DEMO\\m1") == "InUse");
  CHECK(f.sessions("DEMO\\m1") == 1);
  // Live fields are not stored (docs/storage.md): the row keeps its defaults.
  CHECK(m.text("registration_state") == "Unregistered");
  CHECK(m.integer("session_count") == 0);
  // The stale session ended: kept as LoggedOff, with its end time.
  auto ended = f.site->get(Kind::session, "stale-key");
  REQUIRE(ended.has_value());
  CHECK(ended->text("state") == "LoggedOff");
  CHECK_FALSE(ended->text("end_time").empty());
  auto recorded = f.site->get(Kind::session, "s-1");
  REQUIRE(recorded.has_value());
  CHECK_FALSE(recorded->flag("brokered", true));
  CHECK(recorded->text("user_name") == "DEMO\\alice");

  REQUIRE(f.agents->session_event("DEMO\\m1", "Disconnected", s).has_value());
  CHECK(f.summary("DEMO\\m1") == "Disconnected");
  REQUIRE(f.agents->session_event("DEMO\\m1", "Reconnected", s).has_value());
  CHECK(f.site->get(Kind::session, "s-1")->text("state") == "Active");
  REQUIRE(f.agents->session_event("DEMO\\m1", "LoggedOff", s).has_value());
  CHECK(f.site->get(Kind::session, "s-1")->text("state") == "LoggedOff");
  CHECK_FALSE(f.site->get(Kind::session, "s-1")->text("end_time").empty());
  CHECK(f.summary("DEMO\\m1") == "Available");
  CHECK(f.sessions("DEMO\\m1") == 0);
  // The agent reuses the key for a new session: a new record replaces the logged-off one.
  REQUIRE(f.agents->session_event("DEMO\\m1", "Active", s).has_value());
  CHECK(f.site->get(Kind::session, "s-1")->text("state") == "Active");
  CHECK(f.site->get(Kind::session, "s-1")->text("end_time").empty());
  REQUIRE(f.agents->session_event("DEMO\\m1", "LoggedOff", s).has_value());
  CHECK_FALSE(f.agents->session_event("DEMO\\m1", "Exploded", s).has_value());

  REQUIRE(f.agents->heartbeat("DEMO\\m1", 4200, 0));
  CHECK(f.live("DEMO\\m1").load_index == 4200);
  CHECK(f.agents->heartbeat("ghost", 1, 0).error().code == common::errc::not_found);

  REQUIRE(f.agents->deregister("DEMO\\m1", "ContactLost"));
  m = f.machine("DEMO\\m1");
  CHECK(f.registration("DEMO\\m1") == "Unregistered");
  CHECK(f.summary("DEMO\\m1") == "Unregistered");
  CHECK(m.text("last_deregistration_reason") == "ContactLost");
  CHECK_FALSE(m.text("last_deregistration_time").empty());
}

TEST_CASE("repeated authentication failures put a machine in a back-off that expires") {
  Fixture f;
  for (int i = 0; i < 2; ++i) f.agents->record_failure("DEMO\\m1");
  CHECK_FALSE(f.agents->in_back_off("DEMO\\m1"));
  f.agents->record_failure("DEMO\\m1");
  CHECK(f.agents->in_back_off("DEMO\\m1"));
  CHECK_FALSE(f.agents->in_back_off("DEMO\\other"));
  f.clock.advance(std::chrono::seconds(61));
  CHECK_FALSE(f.agents->in_back_off("DEMO\\m1"));
  // Failures spread beyond a minute do not add up.
  f.agents->record_failure("DEMO\\m1");
  f.agents->record_failure("DEMO\\m1");
  f.clock.advance(std::chrono::seconds(90));
  f.agents->record_failure("DEMO\\m1");
  CHECK_FALSE(f.agents->in_back_off("DEMO\\m1"));
}

TEST_CASE("summary state rules (broker::derive_summary, the one place they are decided)") {
  using broker::derive_summary;
  using R = broker::RegistrationState;
  using P = broker::PowerState;
  using S = broker::SessionState;
  using broker::SummaryState;
  const auto single = broker::SessionSupport::single_session, multi = broker::SessionSupport::multi_session;
  CHECK(derive_summary(R::unregistered, P::on, single, 0, {S::active}) == SummaryState::unregistered);
  CHECK(derive_summary(R::unregistered, P::off, single, 0, {}) == SummaryState::off);
  CHECK(derive_summary(R::registered, P::on, single, 0, {}) == SummaryState::available);
  CHECK(derive_summary(R::registered, P::on, single, 0, {S::preparing_new_session}) == SummaryState::preparing);
  CHECK(derive_summary(R::registered, P::on, single, 0, {S::disconnected}) == SummaryState::disconnected);
  CHECK(derive_summary(R::registered, P::on, multi, 5000, {S::active, S::active}) == SummaryState::available);
  CHECK(derive_summary(R::registered, P::on, multi, 10000, {S::active}) == SummaryState::in_use);
}

namespace {

// A logon ticket of DEMO\\alice for DEMO\\m1, stored as the launcher stores it.
common::Status put_ticket(Fixture& f, const std::string& ticket, common::SysTime expires) {
  storage::LogonTicket t;
  t.ticket_hash = common::crypto::sha256_hex(ticket);
  t.machine = "DEMO\\m1";
  t.user_name = "DEMO\\alice";
  t.credential_type = "password";
  t.credential_data = "opaque";
  t.expires_at = common::format_time(expires);
  return f.repo->write([&](storage::Transaction& tx) { return tx.put_logon_ticket(t); });
}

}  // namespace

TEST_CASE("logon tickets: once, only by their machine, within their lifetime, then wiped") {
  Fixture f;
  Object other = make_default(Kind::machine, "DEMO\\m2");
  other.fields["catalog"] = std::string("pool");
  REQUIRE(f.site->create(other, "t").has_value());
  const auto now = f.clock.now();
  auto put = [&](const std::string& ticket, std::chrono::seconds ttl) { return put_ticket(f, ticket, now + ttl); };
  REQUIRE(put("T1", std::chrono::seconds(100)));
  CHECK(put("T1", std::chrono::seconds(100)).error().code == common::errc::conflict);
  auto wrong = f.agents->redeem_ticket("DEMO\\m2", "T1");
  REQUIRE_FALSE(wrong.has_value());
  CHECK(wrong.error().message == "issued for another machine");
  auto ok = f.agents->redeem_ticket("DEMO\\m1", "T1");  // still there for its own machine
  REQUIRE(ok.has_value());
  CHECK(ok->user_name == "DEMO\\alice");
  CHECK(ok->credential_type == "password");
  CHECK(ok->credential_data == "opaque");
  CHECK(f.agents->redeem_ticket("DEMO\\m1", "T1").error().message == "already redeemed");  // once

  REQUIRE(put("T2", std::chrono::seconds(10)));
  f.clock.advance(std::chrono::seconds(11));
  CHECK(f.agents->redeem_ticket("DEMO\\m1", "T2").error().message == "expired");
  CHECK(f.agents->redeem_ticket("DEMO\\m1", "T2").error().message == "unknown ticket");  // wiped

  REQUIRE(put("T3", std::chrono::seconds(5)));
  std::int64_t purged = 0;
  REQUIRE(f.repo->write([&](storage::Transaction& tx) -> common::Status {
    auto n = tx.purge_logon_tickets(common::format_time(f.clock.now() + std::chrono::seconds(10)));
    if (!n) return n.error();
    purged = *n;
    return {};
  }));
  CHECK(purged == 1);
}

namespace {

// A launch's pending session as the launcher stores it.
common::Status put_pending(Fixture& f, const std::string& key, const std::string& machine, common::SysTime started) {
  Object s = make_default(Kind::session, key);
  s.fields["machine"] = machine;
  s.fields["user_name"] = std::string("DEMO\\bob");
  s.fields["client_name"] = std::string("BOB-PC");
  s.fields["client_address"] = std::string("192.0.2.7");
  s.fields["delivery_group"] = std::string("grp");
  s.fields["state"] = std::string("PreparingNewSession");
  s.fields["start_time"] = common::format_time(started);
  return f.repo->write([&](storage::Transaction& tx) -> common::Status {
    auto r = tx.create(s);
    if (!r) return r.error();
    return {};
  });
}

std::vector<std::string> audit_actions(Fixture& f) {
  std::vector<std::string> out;
  (void)f.repo->read([&](storage::Transaction& tx) -> common::Status {
    auto entries = tx.list_audit({});
    if (!entries) return entries.error();
    for (const auto& e : *entries) out.push_back(e.action);
    return {};
  });
  return out;
}

bool has(const std::vector<std::string>& v, const std::string& x) { return std::find(v.begin(), v.end(), x) != v.end(); }

}  // namespace

TEST_CASE("re-registration keeps what the broker knows of a session when the agent does not report it") {
  Fixture f;
  REQUIRE(put_pending(f, "SPENDING", "DEMO\\m1", f.clock.now()));
  // The agent reports the prepared session without its user or client (docs/cbp.md allows it).
  AgentSession bare{"SPENDING", "", "PreparingNewSession", "", "", "HDX", ""};
  auto r = f.agents->register_agent(reg("DEMO\\m1", {bare}));
  REQUIRE(r.has_value());
  CHECK_FALSE(r->has_value());
  auto s = f.site->get(Kind::session, "SPENDING");
  REQUIRE(s.has_value());
  CHECK(s->text("user_name") == "DEMO\\bob");
  CHECK(s->text("client_name") == "BOB-PC");
  CHECK(s->text("client_address") == "192.0.2.7");
  CHECK(s->text("state") == "PreparingNewSession");
  CHECK(f.summary("DEMO\\m1") == "Preparing");
  // The user connects: the session is theirs, not a wrong-user case.
  AgentSession active{"SPENDING", "DEMO\\bob", "Active", "BOB-PC", "192.0.2.7", "HDX", ""};
  auto e = f.agents->session_event("DEMO\\m1", "Active", active);
  REQUIRE(e.has_value());
  CHECK_FALSE(e->end_session);
  CHECK(f.site->get(Kind::session, "SPENDING")->text("state") == "Active");
  // Another user reported at registration does not take the brokered session over.
  AgentSession other{"SPENDING", "DEMO\\mallory", "Active", "", "", "HDX", ""};
  REQUIRE(f.agents->register_agent(reg("DEMO\\m1", {other})).has_value());
  CHECK(f.site->get(Kind::session, "SPENDING")->text("user_name") == "DEMO\\bob");
}

TEST_CASE("a pending session the re-registered agent no longer has is ended at once, unless a launch may still prepare it") {
  Fixture f;
  f.agents->set_preparation_grace(std::chrono::seconds(10));
  REQUIRE(put_pending(f, "SOLD", "DEMO\\m1", f.clock.now() - std::chrono::seconds(30)));
  REQUIRE(put_pending(f, "SYOUNG", "DEMO\\m1", f.clock.now() - std::chrono::seconds(2)));
  REQUIRE(f.agents->register_agent(reg("DEMO\\m1")).has_value());
  auto old = f.site->get(Kind::session, "SOLD");
  REQUIRE(old.has_value());
  CHECK(old->text("state") == "LoggedOff");
  CHECK(f.site->get(Kind::session, "SYOUNG")->text("state") == "PreparingNewSession");
  CHECK(f.machine("DEMO\\m1").text("last_connection_failure") == "SessionPreparation");
  CHECK(f.sessions("DEMO\\m1") == 1);
  CHECK(has(audit_actions(f), "launch-failed"));
  // Once the young one is past the grace, the next registration ends it too.
  f.clock.advance(std::chrono::seconds(20));
  REQUIRE(f.agents->register_agent(reg("DEMO\\m1")).has_value());
  CHECK(f.site->get(Kind::session, "SYOUNG")->text("state") == "LoggedOff");
  CHECK(f.summary("DEMO\\m1") == "Available");
}

TEST_CASE("session keys are unique per machine: two machines reporting the same key keep two sessions") {
  Fixture f;
  REQUIRE(f.agents->enroll("DEMO\\m2", "pool").has_value());
  AgentSession a{"rdp-3", "DEMO\\alice", "Active", "PC-A", "10.1.1.1", "RDP", ""};
  AgentSession b{"rdp-3", "DEMO\\bob", "Active", "PC-B", "10.1.1.2", "RDP", ""};
  REQUIRE(f.agents->register_agent(reg("DEMO\\m1", {a})).has_value());
  REQUIRE(f.agents->register_agent(reg("DEMO\\m2", {b})).has_value());
  auto first = f.site->get(Kind::session, "rdp-3");
  REQUIRE(first.has_value());
  CHECK(first->text("machine") == "DEMO\\m1");
  CHECK(first->text("user_name") == "DEMO\\alice");
  auto second = f.site->get(Kind::session, "DEMO\\m2/rdp-3");
  REQUIRE(second.has_value());
  CHECK(second->text("machine") == "DEMO\\m2");
  CHECK(second->text("session_key") == "rdp-3");
  CHECK(broker::agent_session_key(*second) == "rdp-3");
  CHECK(f.sessions("DEMO\\m1") == 1);
  CHECK(f.sessions("DEMO\\m2") == 1);
  // Events go to each machine's own record; registering again changes nothing.
  REQUIRE(f.agents->session_event("DEMO\\m2", "Disconnected", b).has_value());
  CHECK(f.site->get(Kind::session, "DEMO\\m2/rdp-3")->text("state") == "Disconnected");
  CHECK(f.site->get(Kind::session, "rdp-3")->text("state") == "Active");
  REQUIRE(f.agents->register_agent(reg("DEMO\\m1", {a})).has_value());
  CHECK(f.site->get(Kind::session, "DEMO\\m2/rdp-3")->text("machine") == "DEMO\\m2");
  CHECK(f.site->get(Kind::session, "rdp-3")->text("machine") == "DEMO\\m1");
  REQUIRE(f.agents->session_event("DEMO\\m1", "LoggedOff", a).has_value());
  CHECK(f.site->get(Kind::session, "rdp-3")->text("state") == "LoggedOff");
  CHECK(f.site->get(Kind::session, "DEMO\\m2/rdp-3")->text("state") == "Disconnected");
}

TEST_CASE("a single-session machine records one session, whatever its agent reports") {
  Fixture f;
  std::vector<AgentSession> many;
  for (int i = 0; i < 5; ++i)
    many.push_back({"x-" + std::to_string(i), "DEMO\\u" + std::to_string(i), "Active", "", "", "HDX", ""});
  REQUIRE(f.agents->register_agent(reg("DEMO\\m1", many)).has_value());
  CHECK(f.sessions("DEMO\\m1") == 1);
  CHECK(f.site->get(Kind::session, "x-0").has_value());
  CHECK_FALSE(f.site->get(Kind::session, "x-1").has_value());
  CHECK(has(audit_actions(f), "session-limit-exceeded"));
  // A further session reported by event is not recorded either.
  REQUIRE(f.agents->session_event("DEMO\\m1", "Active", many[3]).has_value());
  CHECK_FALSE(f.site->get(Kind::session, "x-3").has_value());
  CHECK(f.sessions("DEMO\\m1") == 1);
  // The recorded one still takes events.
  REQUIRE(f.agents->session_event("DEMO\\m1", "Disconnected", many[0]).has_value());
  CHECK(f.site->get(Kind::session, "x-0")->text("state") == "Disconnected");
}

TEST_CASE("heartbeats are live state: no storage commit, whatever the load") {
  Fixture f;
  REQUIRE(f.agents->register_agent(reg("DEMO\\m1")).has_value());
  const double before = commits(f.metrics);
  for (int load : {0, 2500, 2500, 10000, 12000, 0}) REQUIRE(f.agents->heartbeat("DEMO\\m1", load, load > 0 ? 1 : 0));
  CHECK(commits(f.metrics) == before);
  CHECK(f.live("DEMO\\m1").load_index == 0);
  REQUIRE(f.agents->heartbeat("DEMO\\m1", 12000, 1));
  CHECK(f.live("DEMO\\m1").load_index == 10000);  // clamped
  CHECK(f.live("DEMO\\m1").reported_sessions == 1);
  CHECK(f.machine("DEMO\\m1").integer("load_index") == 0);  // never stored
  CHECK(commits(f.metrics) == before);
}

TEST_CASE("a re-registration that changes nothing writes nothing; a changed fact is written alone") {
  Fixture f;
  REQUIRE(put_pending(f, "SPENDING", "DEMO\\m1", f.clock.now()));
  AgentSession pending{"SPENDING", "DEMO\\bob", "PreparingNewSession", "BOB-PC", "192.0.2.7", "HDX", ""};
  REQUIRE(f.agents->register_agent(reg("DEMO\\m1", {pending})).has_value());  // first: facts stored
  const auto audits = audit_actions(f).size();
  double before = commits(f.metrics);
  for (int i = 0; i < 3; ++i) {
    // History: written the first time; the same reason again within a minute is not.
    REQUIRE(f.agents->deregister("DEMO\\m1", "AgentShutdown"));
    CHECK(f.registration("DEMO\\m1") == "Unregistered");
    if (i == 0) ++before;
    CHECK(commits(f.metrics) == before);
    auto again = f.agents->register_agent(reg("DEMO\\m1", {pending}));
    REQUIRE(again.has_value());
    CHECK_FALSE(again->has_value());
    CHECK(commits(f.metrics) == before);  // nothing changed: no write at all
    CHECK(f.registration("DEMO\\m1") == "Registered");
    CHECK(f.summary("DEMO\\m1") == "Preparing");
  }
  CHECK(audit_actions(f).size() == audits);
  // A new agent version is a fact that changed: written (one commit), nothing else is.
  auto upgraded = reg("DEMO\\m1", {pending});
  upgraded.agent_version = "1.1";
  upgraded.load_index = 700;
  REQUIRE(f.agents->register_agent(upgraded).has_value());
  CHECK(commits(f.metrics) == before + 1);
  const auto m = f.machine("DEMO\\m1");
  CHECK(m.text("agent_version") == "1.1");
  CHECK(m.text("registration_state") == "Unregistered");  // live fields stay out of storage
  CHECK(m.integer("load_index") == 0);
  CHECK(f.live("DEMO\\m1").load_index == 700);
  // A session the agent reports differently is a change too.
  AgentSession active = pending;
  active.state = "Active";
  REQUIRE(f.agents->register_agent(reg("DEMO\\m1", {active})).has_value());
  CHECK(commits(f.metrics) == before + 2);
  CHECK(f.site->get(Kind::session, "SPENDING")->text("state") == "Active");
  CHECK(f.summary("DEMO\\m1") == "InUse");
}

TEST_CASE("a flapping agent does not churn storage: its deregistration is recorded at most once a minute") {
  Fixture f;
  REQUIRE(f.agents->register_agent(reg("DEMO\\m1")).has_value());
  const double before = commits(f.metrics);
  for (int i = 0; i < 100; ++i) {
    REQUIRE(f.agents->deregister("DEMO\\m1", "ContactLost"));
    CHECK(f.registration("DEMO\\m1") == "Unregistered");  // the live state follows every flap
    REQUIRE(f.agents->register_agent(reg("DEMO\\m1")).has_value());
    CHECK(f.registration("DEMO\\m1") == "Registered");
    f.clock.advance(std::chrono::milliseconds(100));
  }
  CHECK(commits(f.metrics) == before + 1);  // 100 flaps in 10 s: one write
  const auto first = f.machine("DEMO\\m1").text("last_deregistration_time");
  // A minute later the time is brought up to date; another reason is recorded at once.
  f.clock.advance(std::chrono::seconds(60));
  REQUIRE(f.agents->deregister("DEMO\\m1", "ContactLost"));
  CHECK(commits(f.metrics) == before + 2);
  CHECK(f.machine("DEMO\\m1").text("last_deregistration_time") != first);
  REQUIRE(f.agents->deregister("DEMO\\m1", "AgentShutdown"));
  CHECK(commits(f.metrics) == before + 3);
  CHECK(f.machine("DEMO\\m1").text("last_deregistration_reason") == "AgentShutdown");
}

TEST_CASE("enrollment refuses a machine the engine has registered, and re-keys it once it is not") {
  Fixture f;
  REQUIRE(f.agents->enroll("DEMO\\m1", "pool").has_value());
  REQUIRE(f.agents->register_agent(reg("DEMO\\m1")).has_value());
  CHECK(f.agents->enroll("DEMO\\m1", "pool").error().code == common::errc::conflict);
  REQUIRE(f.agents->deregister("DEMO\\m1", "ContactLost"));
  CHECK(f.agents->enroll("DEMO\\m1", "pool").has_value());
}

TEST_CASE("logon tickets: setting the wall clock back does not lengthen a ticket; forwards only shortens it") {
  Fixture f;
  // Issued as the launcher issues them: by the clock's monotonic reading.
  auto put = [&](const std::string& ticket, std::chrono::seconds ttl) {
    REQUIRE(put_ticket(f, ticket, f.clock.monotonic_now() + ttl));
  };
  using std::chrono::seconds;
  put("BEFORE-JUMP", seconds(100));
  put("OUTLIVED", seconds(100));
  f.clock.jump(-std::chrono::hours(1));  // the wall clock is set back an hour
  f.clock.advance(seconds(60));
  CHECK(f.agents->redeem_ticket("DEMO\\m1", "BEFORE-JUMP").has_value());  // within its 100 s
  put("AFTER-JUMP", seconds(100));  // issued after the jump: a full lifetime, not less
  f.clock.advance(seconds(41));  // 101 s since the first two were issued; the wall clock says -59 min
  CHECK(f.agents->redeem_ticket("DEMO\\m1", "OUTLIVED").error().message == "expired");
  f.clock.advance(seconds(58));
  CHECK(f.agents->redeem_ticket("DEMO\\m1", "AFTER-JUMP").has_value());  // 99 s after its issue

  put("JUMPED-PAST", seconds(100));
  f.clock.jump(std::chrono::hours(2));  // forwards, past the ticket's end: it ends early
  CHECK(f.agents->redeem_ticket("DEMO\\m1", "JUMPED-PAST").error().message == "expired");
}
