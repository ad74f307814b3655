#include "broker/engine.hpp"
#include "broker/launcher.hpp"
#include "common/timers.hpp"

#include "common/clock.hpp"
#include "common/crypto.hpp"
#include "common/work_queue.hpp"
#include "storage/repository.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <future>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

using namespace common::model;
using broker::LaunchFailure;

namespace {

Object make(Kind k, std::string name, std::initializer_list<std::pair<const char*, Value>> fields) {
  Object o = make_default(k, std::move(name));
  for (const auto& [key, v] : fields) o.fields[key] = v;
  return o;
}

identity::UserIdentity user(const std::string& name) {
  identity::UserIdentity u;
  u.user_name = name;
  u.domain = "DEMO";
  u.qualified_name = "DEMO\\" + name;
  u.groups = {"DEMO\\Domain Users"};
  return u;
}

// An agent channel that answers from a script: machines in `refuse` fail prepare_session.
class FakeAgents : public broker::AgentChannel {
 public:
  std::mutex mutex;
  std::set<std::string> refuse;
  std::set<std::string> time_out;  // these prepare the session but their answer never comes in time
  std::vector<broker::PrepareSession> prepared, timed_out;
  std::vector<std::string> prepared_on, commands;

  void prepare_session(const std::string& machine, const broker::PrepareSession& r, std::chrono::milliseconds,
                       Done done) override {
    bool ok;
    {
      std::lock_guard lock(mutex);
      if (time_out.contains(machine)) {
        timed_out.push_back(r);
        std::thread([done] { done(false, "timeout"); }).detach();
        return;
      }
      ok = !refuse.contains(machine);
      if (ok) {
        prepared.push_back(r);
        prepared_on.push_back(machine);
      }
    }
    // Answer from another thread, as the endpoint does.
    std::thread([done, ok] { done(ok, ok ? "" : "no free session slot"); }).detach();
  }
  bool fail_logoff = false;  // the agent answers logoff_session with an error
  void logoff_session(const std::string& machine, const std::string& key, std::chrono::milliseconds, Done done) override {
    record("logoff " + machine + " " + key);
    if (fail_logoff) done(false, "the session did not end");
    else done(true, {});
  }
  void disconnect_session(const std::string& machine, const std::string& key, std::chrono::milliseconds,
                          Done done) override {
    record("disconnect " + machine + " " + key);
    done(true, {});
  }
  void send_message(const std::string& machine, const std::string& key, const std::string&, const std::string& text,
                    std::chrono::milliseconds, Done done) override {
    record("message " + machine + " " + key + " " + text);
    done(true, {});
  }
  void record(std::string c) {
    std::lock_guard lock(mutex);
    commands.push_back(std::move(c));
  }
};

struct Fixture {
  std::unique_ptr<storage::Repository> repo;
  broker::Engine engine;  // outlives the work queue: its tasks' commits reach it
  common::ManualClock clock;
  FakeAgents agents;
  common::WorkQueue work{2};
  std::string key = common::crypto::new_site_key();
  std::unique_ptr<broker::Launcher> launcher;

  explicit Fixture(std::optional<std::chrono::milliseconds> power_on_wait = std::chrono::milliseconds(0),
                   common::Scheduler* scheduler = nullptr) {
    storage::SqliteOptions o;
    o.path = ":memory:";
    auto r = storage::open_sqlite(o);
    REQUIRE(r);
    repo = std::move(*r);
    broker::LauncherOptions lo;
    lo.credential_key = key;
    lo.max_attempts = 3;
    lo.power_on_wait = power_on_wait;
    lo.scheduler = scheduler;
    REQUIRE(engine.attach(*repo));
    launcher = std::make_unique<broker::Launcher>(*repo, engine, clock, agents, work, nullptr, lo);
    std::vector<Object> objects = {
        make(Kind::catalog, "single", {}),
        make(Kind::catalog, "multi", {{"session_support", std::string("MultiSession")}}),
        make(Kind::delivery_group, "Pool", {}),
        make(Kind::delivery_group, "Personal", {{"desktop_kind", std::string("Private")}}),
        make(Kind::delivery_group, "Apps",
             {{"delivery_type", std::string("AppsOnly")}, {"session_support", std::string("MultiSession")}}),
        access("pool-access", "Pool"),
        make(Kind::rule, "pool-desktop", {{"rule_type", std::string("entitlement")},
                                          {"delivery_group", std::string("Pool")},
                                          {"included_user_filter_enabled", false}}),
        access("personal-access", "Personal"),
        make(Kind::rule, "personal-aofu", {{"rule_type", std::string("assignment")},
                                           {"delivery_group", std::string("Personal")},
                                           {"included_user_filter_enabled", false}}),
        access("apps-access", "Apps"),
        make(Kind::rule, "apps", {{"rule_type", std::string("app_entitlement")},
                                  {"delivery_group", std::string("Apps")},
                                  {"included_user_filter_enabled", false}}),
        make(Kind::application, "Notepad", {{"command_line_executable", std::string("notepad.exe")},
                                            {"delivery_groups", TextList{"Apps"}},
                                            {"max_per_user_instances", std::int64_t{2}}}),
    };
    for (int i = 1; i <= 4; ++i) objects.push_back(machine("DEMO\\pool-" + std::to_string(i), "single", "Pool", i));
    for (int i = 1; i <= 6; ++i) objects.push_back(machine("DEMO\\pers-" + std::to_string(i), "single", "Personal", 10 + i));
    for (int i = 1; i <= 2; ++i) objects.push_back(machine("DEMO\\rds-" + std::to_string(i), "multi", "Apps", 20 + i));
    REQUIRE(repo->write([&](storage::Transaction& tx) -> common::Status {
      for (const auto& obj : objects)
        if (auto c = tx.create(obj); !c) return c.error();
      return {};
    }));
  }

  static Object access(std::string name, std::string group) {
    return make(Kind::rule, std::move(name), {{"rule_type", std::string("access")},
                                              {"delivery_group", std::move(group)},
                                              {"included_users", TextList{"DEMO\\Domain Users"}}});
  }
  static Object machine(std::string name, std::string catalog, std::string group, int n) {
    return make(Kind::machine, std::move(name), {{"catalog", std::move(catalog)},
                                                 {"delivery_group", std::move(group)},
                                                 {"registration_state", std::string("Registered")},
                                                 {"summary_state", std::string("Available")},
                                                 {"agent_address", "10.0.0." + std::to_string(n) + ":1494"}});
  }

  broker::LaunchResult launch(const std::string& who, const std::string& resource) {
    broker::LaunchRequest r;
    r.user = user(who);
    r.resource = resource;
    r.client_name = "client-" + who;
    r.credential.type = "password";
    r.credential.data = {{"password", who + "-pass"}};
    return launcher->launch_sync(std::move(r));
  }

  Object get(Kind k, const std::string& name) {
    Object out;
    REQUIRE(repo->read([&](storage::Transaction& tx) -> common::Status {
      auto o = tx.get(k, name);
      if (!o) return o.error();
      out = *o;
      return {};
    }));
    return out;
  }
  std::vector<Object> list(Kind k) {
    std::vector<Object> out;
    REQUIRE(repo->read([&](storage::Transaction& tx) -> common::Status {
      auto o = tx.list(k, {});
      if (!o) return o.error();
      out = *o;
      return {};
    }));
    return out;
  }
  void update(Kind k, const std::string& name, const char* field, Value v) {
    REQUIRE(repo->write([&](storage::Transaction& tx) -> common::Status {
      auto o = tx.get(k, name);
      if (!o) return o.error();
      o->fields[field] = v;
      if (auto u = tx.update(name, *o); !u) return u.error();
      return {};
    }));
  }
};

}  // namespace

TEST_CASE("launcher: a shared desktop launch stores the pending session, a sealed ticket and prepares the agent") {
  Fixture f;
  auto r = f.launch("alice", "pool-desktop");
  REQUIRE_MESSAGE(r.ok(), r.message);
  CHECK(r.machine.starts_with("DEMO\\pool-"));
  CHECK(r.address.ends_with(":1494"));
  CHECK(r.ticket.size() == 30);
  CHECK(std::all_of(r.ticket.begin(), r.ticket.end(), [](char c) { return std::isxdigit(c) && !std::islower(c); }));
  CHECK_FALSE(r.reconnect);

  auto s = f.get(Kind::session, r.session_key);
  CHECK(s.text("state") == "PreparingNewSession");
  CHECK(s.text("user_name") == "DEMO\\alice");
  CHECK(s.text("machine") == r.machine);
  CHECK(s.text("client_name") == "client-alice");
  CHECK(s.flag("brokered"));
  // The summary state is derived in the engine (not stored by the launch).
  CHECK(f.engine.machine(r.machine)->summary == broker::SummaryState::preparing);

  REQUIRE(f.agents.prepared.size() == 1);
  CHECK(f.agents.prepared[0].ticket == r.ticket);
  CHECK(f.agents.prepared[0].user == "DEMO\\alice");
  CHECK(f.agents.prepared[0].session_key == r.session_key);

  // The ticket is stored as a hash, its credential sealed under the site key for that machine.
  storage::LogonTicket t;
  REQUIRE(f.repo->write([&](storage::Transaction& tx) -> common::Status {
    auto x = tx.redeem_logon_ticket(common::crypto::sha256_hex(r.ticket), r.machine, common::format_time(f.clock.now()));
    if (!x) return x.error();
    t = *x;
    return {};
  }));
  CHECK(t.credential_type == "password");
  CHECK(t.credential_data.find("alice-pass") == std::string::npos);
  auto plain = common::crypto::open(f.key, t.credential_data, t.ticket_hash + "|" + r.machine);
  REQUIRE(plain);
  CHECK(plain->find("alice-pass") != std::string::npos);
}

TEST_CASE("launcher: parallel launches never put two sessions on a single-session machine") {
  Fixture f;
  std::vector<broker::LaunchResult> results(20);
  std::vector<std::thread> threads;
  for (int i = 0; i < 20; ++i)
    threads.emplace_back([&, i] { results[static_cast<std::size_t>(i)] = f.launch("u" + std::to_string(i), "pool-desktop"); });
  for (auto& t : threads) t.join();
  std::set<std::string> machines;
  int ok = 0;
  for (const auto& r : results) {
    if (r.ok()) {
      ++ok;
      CHECK(machines.insert(r.machine).second);
    } else {
      CHECK(r.failure == LaunchFailure::all_in_use);
    }
  }
  CHECK(ok == 4);  // four pool machines
  CHECK(f.list(Kind::session).size() == 4);
}

TEST_CASE("launcher: assign on first use gives distinct users distinct machines, within MaxDesktops") {
  Fixture f;
  std::vector<broker::LaunchResult> results(8);
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i)
    threads.emplace_back([&, i] { results[static_cast<std::size_t>(i)] = f.launch("a" + std::to_string(i), "personal-aofu"); });
  for (auto& t : threads) t.join();
  std::set<std::string> machines;
  int ok = 0;
  for (const auto& r : results)
    if (r.ok()) {
      ++ok;
      CHECK(machines.insert(r.machine).second);
    }
  CHECK(ok == 6);  // six personal machines
  auto assignments = f.list(Kind::assignment);
  CHECK(assignments.size() == 6);
  std::set<std::string> assigned_users;
  for (const auto& a : assignments) CHECK(assigned_users.insert(a.text("user")).second);

  // The user's session becomes active, then a second launch reconnects to the same machine.
  const auto& first = *std::find_if(results.begin(), results.end(), [](const auto& r) { return r.ok(); });
  const auto who = f.get(Kind::session, first.session_key).text("user_name").substr(5);
  f.update(Kind::session, first.session_key, "state", std::string("Disconnected"));
  auto again = f.launch(who, "personal-aofu");
  REQUIRE_MESSAGE(again.ok(), again.message);
  CHECK(again.reconnect);
  CHECK(again.machine == first.machine);
  CHECK(again.session_key == first.session_key);
  CHECK(f.list(Kind::assignment).size() == 6);  // no second assignment (MaxDesktops 1)
}

TEST_CASE("launcher: an active session elsewhere is disconnected, then reconnected") {
  Fixture f;
  auto r = f.launch("bob", "pool-desktop");
  REQUIRE(r.ok());
  f.update(Kind::session, r.session_key, "state", std::string("Active"));
  auto again = f.launch("bob", "pool-desktop");
  REQUIRE(again.ok());
  CHECK(again.reconnect);
  CHECK(again.machine == r.machine);
  CHECK(std::count(f.agents.commands.begin(), f.agents.commands.end(), "disconnect " + r.machine + " " + r.session_key) == 1);
}

TEST_CASE("launcher: a session being logged off is not reconnected to; a failed logoff makes it reconnectable again") {
  Fixture f;
  auto r = f.launch("bob", "pool-desktop");
  REQUIRE(r.ok());
  f.update(Kind::session, r.session_key, "state", std::string("Active"));
  // Bob logs off (the agent acknowledges; its report that the session ended has not come yet)
  // and launches again at once: a new session elsewhere, not a reconnect to the dying one.
  REQUIRE(f.launcher->end_user_sessions(user("bob"), true));
  auto again = f.launch("bob", "pool-desktop");
  REQUIRE(again.ok());
  CHECK_FALSE(again.reconnect);
  CHECK(again.machine != r.machine);
  CHECK(again.session_key != r.session_key);
  // Nor is it offered for reconnection, or named for one.
  auto listed = f.launcher->user_sessions(user("bob"), {});
  REQUIRE(listed.has_value());
  CHECK(std::none_of(listed->begin(), listed->end(), [&](const auto& u) { return u.session_key == r.session_key; }));
  broker::LaunchRequest named;
  named.user = user("bob");
  named.reconnect_session = r.session_key;
  named.credential.type = "password";
  CHECK(f.launcher->launch_sync(std::move(named)).failure == LaunchFailure::no_session);

  // A logoff the agent refuses leaves the session as it was: reconnectable.
  auto c = f.launch("carol", "pool-desktop");
  REQUIRE(c.ok());
  f.update(Kind::session, c.session_key, "state", std::string("Disconnected"));
  f.agents.fail_logoff = true;
  REQUIRE(f.launcher->end_user_sessions(user("carol"), true));
  auto back = f.launch("carol", "pool-desktop");
  REQUIRE(back.ok());
  CHECK(back.reconnect);
  CHECK(back.session_key == c.session_key);
}

TEST_CASE("launcher: a refused preparation fails over to another machine and is recorded") {
  Fixture f;
  f.agents.refuse = {"DEMO\\pool-1", "DEMO\\pool-2"};
  f.update(Kind::machine, "DEMO\\pool-3", "in_maintenance_mode", true);
  // pool-1, pool-2 refuse and pool-4 works: whatever the order, the launch ends on pool-4. Each
  // launch tries pool-1 before pool-4 with probability 1/2: over 40 launches both refusing
  // machines are tried (all but certainly).
  for (int i = 0; i < 40; ++i) {
    auto r = f.launch("carol" + std::to_string(i), "pool-desktop");
    REQUIRE_MESSAGE(r.ok(), r.message);
    CHECK(r.machine == "DEMO\\pool-4");
    f.update(Kind::session, r.session_key, "state", std::string("LoggedOff"));
    REQUIRE(f.repo->write([&](storage::Transaction& tx) { return tx.remove(Kind::session, r.session_key); }));
  }
  // The refusals are recorded on the machines and left no sessions behind.
  CHECK(f.list(Kind::session).empty());
  for (const auto& m : f.list(Kind::machine))
    if (m.name == "DEMO\\pool-1" || m.name == "DEMO\\pool-2")
      CHECK(m.text("last_connection_failure") == "SessionPreparation");
    else
      CHECK(m.text("last_connection_failure") == "None");

  // Every machine refuses: after max_attempts (3) the launch fails with SessionPrepareFailure.
  f.agents.refuse = {"DEMO\\pool-1", "DEMO\\pool-2", "DEMO\\pool-4"};
  auto none = f.launch("dan", "pool-desktop");
  CHECK(none.failure == LaunchFailure::prepare_failed);
  CHECK(none.message.find("no free session slot") != std::string::npos);
  CHECK(f.list(Kind::session).empty());
}

TEST_CASE("launcher: a machine that answers too late is told to drop the preparation, and its ticket is gone") {
  Fixture f;
  f.agents.time_out = {"DEMO\\pool-1", "DEMO\\pool-2"};
  f.update(Kind::machine, "DEMO\\pool-3", "in_maintenance_mode", true);
  // Random allocation: launch until one has tried a machine that times out first.
  broker::LaunchResult r;
  std::vector<broker::PrepareSession> abandoned;
  for (int i = 0; i < 40 && abandoned.empty(); ++i) {
    r = f.launch("erin" + std::to_string(i), "pool-desktop");
    REQUIRE_MESSAGE(r.ok(), r.message);
    CHECK(r.machine == "DEMO\\pool-4");
    {
      std::lock_guard lock(f.agents.mutex);
      abandoned = f.agents.timed_out;
    }
    if (abandoned.empty()) {
      f.update(Kind::session, r.session_key, "state", std::string("LoggedOff"));
      REQUIRE(f.repo->write([&](storage::Transaction& tx) { return tx.remove(Kind::session, r.session_key); }));
    }
  }
  REQUIRE_FALSE(abandoned.empty());
  for (const auto& p : abandoned) {
    INFO("abandoned session " << p.session_key);
    // Its ticket cannot be redeemed on any machine any more.
    for (const char* m : {"DEMO\\pool-1", "DEMO\\pool-2", "DEMO\\pool-3"}) {
      auto st = f.repo->write([&](storage::Transaction& tx) -> common::Status {
        auto t = tx.redeem_logon_ticket(common::crypto::sha256_hex(p.ticket), m, common::format_time(f.clock.now()));
        REQUIRE_FALSE(t.has_value());
        CHECK(t.error().message == "unknown ticket");
        return {};
      });
      CHECK(st.has_value());
    }
  }
  // And the agents were told to drop what they may have prepared (before the launch went on).
  std::lock_guard lock(f.agents.mutex);
  for (const auto& p : abandoned)
    CHECK(std::count_if(f.agents.commands.begin(), f.agents.commands.end(), [&](const std::string& c) {
            return c.find("logoff ") == 0 && c.find(p.session_key) != std::string::npos;
          }) == 1);
  // The machine that answered in time got no such command.
  CHECK(std::none_of(f.agents.commands.begin(), f.agents.commands.end(),
                     [&](const std::string& c) { return c.find(r.session_key) != std::string::npos; }));
}

TEST_CASE("launcher: explained failures") {
  Fixture f;
  CHECK(f.launch("alice", "no-such-thing").failure == LaunchFailure::not_entitled);

  f.update(Kind::machine, "DEMO\\pool-1", "registration_state", std::string("Unregistered"));
  f.update(Kind::machine, "DEMO\\pool-2", "registration_state", std::string("Unregistered"));
  f.update(Kind::machine, "DEMO\\pool-3", "in_maintenance_mode", true);
  f.update(Kind::machine, "DEMO\\pool-4", "in_maintenance_mode", true);
  CHECK(f.launch("alice", "pool-desktop").failure == LaunchFailure::all_in_maintenance);
  f.update(Kind::machine, "DEMO\\pool-3", "registration_state", std::string("Unregistered"));
  f.update(Kind::machine, "DEMO\\pool-4", "registration_state", std::string("Unregistered"));
  CHECK(f.launch("alice", "pool-desktop").failure == LaunchFailure::all_unregistered);

  f.update(Kind::rule, "pool-desktop", "restrict_to_tag", std::string("gpu"));
  CHECK(f.launch("alice", "pool-desktop").failure == LaunchFailure::tag_mismatch);

  f.update(Kind::delivery_group, "Pool", "in_maintenance_mode", true);
  CHECK(f.launch("alice", "pool-desktop").failure == LaunchFailure::group_in_maintenance);
  f.update(Kind::delivery_group, "Pool", "enabled", false);
  CHECK(f.launch("alice", "pool-desktop").failure == LaunchFailure::group_disabled);

  // Every refusal is in the audit trail with its reason.
  std::vector<storage::AuditEntry> audit;
  REQUIRE(f.repo->read([&](storage::Transaction& tx) -> common::Status {
    storage::AuditQuery q;
    q.actor = "broker";
    auto a = tx.list_audit(q);
    if (!a) return a.error();
    audit = *a;
    return {};
  }));
  const auto refused = std::count_if(audit.begin(), audit.end(), [](const auto& e) { return e.action == "launch-refused"; });
  CHECK(refused == 6);
  CHECK(std::any_of(audit.begin(), audit.end(), [](const auto& e) { return e.after.find("TagMismatch") != std::string::npos; }));
}

TEST_CASE("launcher: multi-session hosts take the least effective load; per-user instance limits") {
  Fixture f;
  f.update(Kind::machine, "DEMO\\rds-1", "load_index", std::int64_t{2800});
  f.update(Kind::machine, "DEMO\\rds-2", "load_index", std::int64_t{2000});
  auto a = f.launch("alice", "Notepad");
  REQUIRE_MESSAGE(a.ok(), a.message);
  CHECK(a.machine == "DEMO\\rds-2");
  CHECK(f.agents.prepared.back().application);
  CHECK(f.agents.prepared.back().command_line_executable == "notepad.exe");
  // rds-2 effective load rises by 500 with each launch until its agent reports: 2000, 2500, then 3000 > 2800.
  CHECK(f.launch("bob", "Notepad").machine == "DEMO\\rds-2");
  CHECK(f.launch("carol", "Notepad").machine == "DEMO\\rds-1");
  // alice may run Notepad twice.
  CHECK(f.launch("alice", "Notepad").ok());
  CHECK(f.launch("alice", "Notepad").failure == LaunchFailure::instance_limit);
  f.update(Kind::machine, "DEMO\\rds-1", "load_index", std::int64_t{10000});
  f.update(Kind::machine, "DEMO\\rds-2", "load_index", std::int64_t{10000});
  CHECK(f.launch("dave", "Notepad").failure == LaunchFailure::all_in_use);
}

TEST_CASE("launcher: a client that never connects releases the machine (ConnectionTimeout)") {
  Fixture f;
  auto r = f.launch("alice", "pool-desktop");
  REQUIRE(r.ok());
  REQUIRE(f.launcher->sweep());
  CHECK(f.list(Kind::session).size() == 1);  // not yet
  f.clock.advance(std::chrono::seconds(200 + 6));
  REQUIRE(f.launcher->sweep());
  CHECK(f.list(Kind::session).empty());
  CHECK(f.get(Kind::machine, r.machine).text("last_connection_failure") == "ConnectionTimeout");
}

TEST_CASE("launcher: user sessions, reissued tickets and session commands") {
  Fixture f;
  auto r = f.launch("alice", "pool-desktop");
  REQUIRE(r.ok());
  auto none = f.launcher->user_sessions(user("alice"), {});
  REQUIRE(none.has_value());
  CHECK(none->empty());  // still preparing
  f.update(Kind::session, r.session_key, "state", std::string("Disconnected"));
  auto mine = f.launcher->user_sessions(user("alice"), {"Disconnected"});
  REQUIRE(mine.has_value());
  REQUIRE(mine->size() == 1);
  CHECK((*mine)[0].session_key == r.session_key);
  auto bobs = f.launcher->user_sessions(user("bob"), {});
  REQUIRE(bobs.has_value());
  CHECK(bobs->empty());

  broker::Credential c;
  auto t = f.launcher->reissue_ticket(user("alice"), r.session_key, c, 60);
  REQUIRE(t);
  CHECK(t->size() == 30);
  CHECK_FALSE(f.launcher->reissue_ticket(user("bob"), r.session_key, c, 60));

  // A re-issued ticket lives for the smaller of what the front end asked (TimetoLive) and the
  // site's logon_ticket_ttl_seconds (200 here); asking nothing (0) gets the site's.
  const auto redeemable_at = [&](std::int64_t asked, std::int64_t after_seconds) {
    auto ticket = f.launcher->reissue_ticket(user("alice"), r.session_key, c, asked);
    REQUIRE(ticket);
    const auto at = common::format_time(f.clock.monotonic_now() + std::chrono::seconds(after_seconds));
    bool ok = false;
    REQUIRE(f.repo->write([&](storage::Transaction& tx) -> common::Status {
      ok = tx.redeem_logon_ticket(common::crypto::sha256_hex(*ticket), r.machine, at).has_value();
      return {};
    }));
    return ok;
  };
  for (const auto& [asked, lifetime] : {std::pair<std::int64_t, std::int64_t>{60, 60}, {0, 200}, {5000, 200}}) {
    CAPTURE(asked);
    CHECK(redeemable_at(asked, lifetime - 1));
    CHECK_FALSE(redeemable_at(asked, lifetime + 1));
  }

  REQUIRE(f.launcher->end_user_sessions(user("alice"), true));
  CHECK(f.agents.commands.back() == "logoff " + r.machine + " " + r.session_key);
  bool done = false;
  REQUIRE(f.launcher->session_command(r.session_key, "message", "Title", "hello", [&](bool ok, const std::string&) { done = ok; }));
  CHECK(done);
  CHECK_FALSE(f.launcher->session_command("nope", "logoff", "", "", [](bool, const std::string&) {}));
}

namespace {

// Power control for launcher tests: records power-ons; `on_power` runs inside each.
struct FakePower : broker::PowerControl {
  std::mutex mutex;
  std::vector<std::string> on;
  bool throttle = false;
  std::function<void(const std::string&)> on_power;
  common::Result<bool> power_on(const std::string& machine) override {
    {
      std::lock_guard lock(mutex);
      on.push_back(machine);
    }
    if (on_power) on_power(machine);
    return throttle;
  }
  std::vector<std::string> powered() {
    std::lock_guard lock(mutex);
    return on;
  }
};

// The Pool group's four machines power-managed, unregistered and off.
void power_off_pool(Fixture& f) {
  REQUIRE(f.repo->write([&](storage::Transaction& tx) -> common::Status {
    auto c = tx.create(make(Kind::hypervisor_connection, "sim", {{"driver", std::string("simulated")}}));
    if (!c) return c.error();
    return {};
  }));
  f.update(Kind::catalog, "single", "hypervisor_connection", std::string("sim"));
  for (int i = 1; i <= 4; ++i) {
    const auto m = "DEMO\\pool-" + std::to_string(i);
    f.update(Kind::machine, m, "registration_state", std::string("Unregistered"));
    f.update(Kind::machine, m, "power_state", std::string("Off"));
  }
}

// Waits (yielding, up to 30 s of patience) until a launch has parked on the scheduler's timer.
void park_patiently(const common::ManualScheduler& timers) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (timers.pending() == 0 && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
}

// A site whose pool machines are off, a hypervisor that powers them on (their agents never
// register) and launches answered through a future; the waits run on `timers`.
struct PoweredOffPool {
  Fixture f;
  FakePower power;
  std::vector<std::promise<broker::LaunchResult>> answers{4};
  std::size_t used = 0;
  explicit PoweredOffPool(common::ManualScheduler& timers) : f(std::chrono::seconds(30), &timers) {
    f.launcher->set_power(&power);
    power_off_pool(f);
  }
  std::future<broker::LaunchResult> launch(const std::string& who) {
    auto& answered = answers.at(used++);
    broker::LaunchRequest req;
    req.user = user(who);
    req.resource = "pool-desktop";
    f.launcher->launch(req, [&answered](broker::LaunchResult r) { answered.set_value(std::move(r)); });
    return answered.get_future();
  }
};

// FakePower::on_power: the hypervisor boots the machine and its agent registers, on another
// thread, while the launch goes on to wait (before or after it parks: both must work).
std::function<void(const std::string&)> boots_and_registers(Fixture& f) {
  return [&f](const std::string& machine) {
    std::thread([&f, machine] {
      f.update(Kind::machine, machine, "power_state", std::string("On"));
      f.update(Kind::machine, machine, "registration_state", std::string("Registered"));
      f.launcher->machine_registered(machine);
    }).detach();
  };
}

}  // namespace

TEST_CASE("launcher: with no machine ready one is powered on (retry), held for the user, and a throttled power-on is said so") {
  Fixture f;  // answers at once (no wait for registration)
  FakePower power;
  f.launcher->set_power(&power);
  power_off_pool(f);
  auto r = f.launch("erin", "pool-desktop");
  CHECK(r.failure == LaunchFailure::powering_on);
  CHECK(power.powered() == std::vector<std::string>{"DEMO\\pool-1"});
  CHECK(f.list(Kind::session).empty());  // nothing reserved
  // erin's retry goes back to the machine powered on for her.
  r = f.launch("erin", "pool-desktop");
  CHECK(r.failure == LaunchFailure::powering_on);
  CHECK(power.powered().back() == "DEMO\\pool-1");
  // Another user: not erin's machine; one already booting is preferred over powering on another.
  f.update(Kind::machine, "DEMO\\pool-3", "power_state", std::string("TurningOn"));
  power.throttle = true;
  r = f.launch("frank", "pool-desktop");
  CHECK(r.failure == LaunchFailure::power_throttled);
  CHECK(power.powered().back() == "DEMO\\pool-3");
  CHECK(broker::to_string(r.failure) == "PowerActionThrottled");

  // pool-1 registers: held for erin, so frank does not get it, erin does.
  f.update(Kind::machine, "DEMO\\pool-1", "registration_state", std::string("Registered"));
  f.update(Kind::machine, "DEMO\\pool-1", "power_state", std::string("On"));
  f.launcher->machine_registered("DEMO\\pool-1");
  power.throttle = false;
  r = f.launch("frank", "pool-desktop");
  CHECK(r.failure == LaunchFailure::powering_on);
  r = f.launch("erin", "pool-desktop");
  REQUIRE_MESSAGE(r.ok(), r.message);
  CHECK(r.machine == "DEMO\\pool-1");
}

TEST_CASE("launcher: a launch waits for the machine it powers on and lands on it once its agent registers") {
  Fixture f(std::chrono::seconds(30));
  FakePower power;
  power.on_power = boots_and_registers(f);
  f.launcher->set_power(&power);
  power_off_pool(f);
  auto r = f.launch("erin", "pool-desktop");
  REQUIRE_MESSAGE(r.ok(), r.message);
  CHECK(r.machine == "DEMO\\pool-1");
  CHECK(power.powered() == std::vector<std::string>{"DEMO\\pool-1"});
  CHECK(f.get(Kind::session, r.session_key).text("state") == "PreparingNewSession");
  // The next user gets the next machine, powered on for them.
  r = f.launch("frank", "pool-desktop");
  REQUIRE_MESSAGE(r.ok(), r.message);
  CHECK(r.machine == "DEMO\\pool-2");
}

TEST_CASE("launcher: a machine that never registers times out (StuckOnBoot or Unregistered) and the launch fails over") {
  Fixture f(std::chrono::seconds(30));
  REQUIRE(f.repo->write([&](storage::Transaction& tx) -> common::Status {
    auto site = make(Kind::site, "site", {{"registration_wait_timeout_seconds", std::int64_t{60}}});
    auto c = tx.create(site);
    if (!c) return c.error();
    return {};
  }));
  FakePower power;
  power.on_power = [&](const std::string& machine) {
    // pool-1 boots but its agent never registers; the others never boot. Time passes past the
    // registration deadline (the wait ends at once, as the deadline has gone).
    if (machine == "DEMO\\pool-1") f.update(Kind::machine, machine, "power_state", std::string("On"));
    f.clock.advance(std::chrono::seconds(61));
  };
  f.launcher->set_power(&power);
  power_off_pool(f);
  f.update(Kind::machine, "DEMO\\pool-4", "in_maintenance_mode", true);
  auto r = f.launch("erin", "pool-desktop");
  CHECK(r.failure == LaunchFailure::registration_timeout);
  CHECK(broker::to_string(r.failure) == "RegistrationTimeout");
  CHECK(r.message.find("did not register within 60 s") != std::string::npos);
  // Failed over across the three machines it could power on.
  CHECK(power.powered() == std::vector<std::string>{"DEMO\\pool-1", "DEMO\\pool-2", "DEMO\\pool-3"});
  CHECK(f.get(Kind::machine, "DEMO\\pool-1").text("fault_state") == "Unregistered");
  CHECK(f.get(Kind::machine, "DEMO\\pool-2").text("fault_state") == "StuckOnBoot");
  for (const char* m : {"DEMO\\pool-1", "DEMO\\pool-2", "DEMO\\pool-3"})
    CHECK(f.get(Kind::machine, m).text("last_connection_failure") == "RegistrationTimeout");
  CHECK(f.get(Kind::machine, "DEMO\\pool-4").text("fault_state", "None") == "None");
  int timeouts = 0;
  REQUIRE(f.repo->read([&](storage::Transaction& tx) -> common::Status {
    storage::AuditQuery q;
    auto entries = tx.list_audit(q);
    if (!entries) return entries.error();
    for (const auto& e : *entries)
      if (e.action == "launch-failed" && e.after.find("RegistrationTimeout") != std::string::npos) ++timeouts;
    return {};
  }));
  CHECK(timeouts == 3);
}

TEST_CASE("launcher: the sweep times out a machine powered on for a launch nobody waits for any more") {
  Fixture f;  // answers at once
  FakePower power;
  f.launcher->set_power(&power);
  power_off_pool(f);
  auto r = f.launch("erin", "pool-desktop");
  CHECK(r.failure == LaunchFailure::powering_on);
  REQUIRE(f.launcher->sweep());
  CHECK(f.get(Kind::machine, "DEMO\\pool-1").text("fault_state", "None") == "None");  // not yet
  f.clock.advance(std::chrono::seconds(181));  // registration_wait_timeout_seconds defaults to 180
  REQUIRE(f.launcher->sweep());
  const auto m = f.get(Kind::machine, "DEMO\\pool-1");
  CHECK(m.text("fault_state") == "StuckOnBoot");
  CHECK(m.text("last_connection_failure") == "RegistrationTimeout");
  // The next launch powers on another machine.
  r = f.launch("erin", "pool-desktop");
  CHECK(r.failure == LaunchFailure::powering_on);
  CHECK(power.powered().back() == "DEMO\\pool-2");
}

TEST_CASE("launcher: the site's launch_power_on_wait_seconds sets how long a launch waits (0: answer at once)") {
  Fixture f(std::nullopt);  // the site's setting decides
  REQUIRE(f.repo->write([&](storage::Transaction& tx) -> common::Status {
    auto c = tx.create(make(Kind::site, "site", {{"launch_power_on_wait_seconds", std::int64_t{0}}}));
    if (!c) return c.error();
    return {};
  }));
  FakePower power;
  power.on_power = boots_and_registers(f);
  f.launcher->set_power(&power);
  power_off_pool(f);
  auto r = f.launch("erin", "pool-desktop");
  CHECK(r.failure == LaunchFailure::powering_on);  // did not wait for the registration
  f.update(Kind::site, "site", "launch_power_on_wait_seconds", std::int64_t{30});
  r = f.launch("frank", "pool-desktop");  // powers on pool-2 and waits for it
  REQUIRE_MESSAGE(r.ok(), r.message);
  CHECK(r.machine == "DEMO\\pool-2");
}

TEST_CASE("launcher: a retry waits on the machine held for the user even once the hypervisor reports it On") {
  Fixture f;  // answers at once
  FakePower power;
  f.launcher->set_power(&power);
  power_off_pool(f);
  auto r = f.launch("erin", "pool-desktop");
  CHECK(r.failure == LaunchFailure::powering_on);
  // libvirt reports the machine On long before its agent registers.
  f.update(Kind::machine, "DEMO\\pool-1", "power_state", std::string("On"));
  r = f.launch("erin", "pool-desktop");
  CHECK(r.failure == LaunchFailure::powering_on);  // still waiting for it, not AllMachinesUnregistered
  CHECK(power.powered() == std::vector<std::string>{"DEMO\\pool-1", "DEMO\\pool-1"});
  // Another user does not wait on it: a machine of their own.
  r = f.launch("frank", "pool-desktop");
  CHECK(r.failure == LaunchFailure::powering_on);
  CHECK(power.powered().back() == "DEMO\\pool-2");
  // Past the registration deadline both are faulted (pool-1 is on: Unregistered; pool-2 never
  // came up: StuckOnBoot) and the retry powers on another machine.
  f.clock.advance(std::chrono::seconds(181));
  REQUIRE(f.launcher->sweep());
  CHECK(f.get(Kind::machine, "DEMO\\pool-1").text("fault_state") == "Unregistered");
  CHECK(f.get(Kind::machine, "DEMO\\pool-2").text("fault_state") == "StuckOnBoot");
  r = f.launch("erin", "pool-desktop");
  CHECK(r.failure == LaunchFailure::powering_on);
  CHECK(power.powered().back() == "DEMO\\pool-3");
}

TEST_CASE("launcher: stop() answers the launches waiting for a machine to register") {
  common::ManualScheduler timers;  // the wait never ends by itself: only stop() ends it
  Fixture f(std::chrono::seconds(60), &timers);
  FakePower power;
  f.launcher->set_power(&power);
  power_off_pool(f);
  std::promise<broker::LaunchResult> answered;
  broker::LaunchRequest req;
  req.user = user("erin");
  req.resource = "pool-desktop";
  f.launcher->launch(req, [&](broker::LaunchResult r) { answered.set_value(std::move(r)); });
  // Parked on its timer (a bounded poll for the work queue to get there, no sleep).
  park_patiently(timers);
  REQUIRE(timers.pending() == 1);
  auto future = answered.get_future();
  CHECK(future.wait_for(std::chrono::milliseconds(0)) == std::future_status::timeout);  // waiting
  f.launcher->stop();
  REQUIRE(future.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  CHECK(future.get().failure == LaunchFailure::storage_error);
  CHECK(f.launcher->in_flight() == 0);
  // Later launches do not wait any more.
  auto r = f.launch("frank", "pool-desktop");
  CHECK(r.failure == LaunchFailure::powering_on);
}

TEST_CASE("launcher: a launch's wait for registration runs on the scheduler: it ends when the scheduler's time does") {
  common::ManualScheduler timers;  // time moves only when the test says so
  PoweredOffPool pool(timers);       // powers on; the agent never registers
  auto& f = pool.f;
  auto& power = pool.power;
  auto future = pool.launch("erin");
  // Parked on its timer (a bounded poll for the work queue to get there, no sleep).
  park_patiently(timers);
  REQUIRE(timers.pending() == 1);
  CHECK(power.powered() == std::vector<std::string>{"DEMO\\pool-1"});
  timers.advance(std::chrono::seconds(20));  // not yet: the wait is 30 s
  CHECK(timers.pending() == 1);
  CHECK(future.wait_for(std::chrono::milliseconds(0)) == std::future_status::timeout);
  timers.advance(std::chrono::seconds(11));  // the wait is over: retry-required, the machine held
  REQUIRE(future.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  CHECK(future.get().failure == LaunchFailure::powering_on);
  CHECK(f.launcher->held_machines() == std::set<std::string>{"DEMO\\pool-1"});
  CHECK(timers.pending() == 0);
}

TEST_CASE("launcher: when the hypervisor refuses the power-ons the launch fails saying which machines failed to start") {
  Fixture f;  // answers at once
  FakePower power;
  // The hypervisor refuses every TurnOn: the power manager sets the machine's fault (docs/power.md).
  power.on_power = [&](const std::string& machine) {
    f.update(Kind::machine, machine, "fault_state", std::string("FailedToStart"));
  };
  f.launcher->set_power(&power);
  power_off_pool(f);
  f.update(Kind::machine, "DEMO\\pool-3", "in_maintenance_mode", true);
  f.update(Kind::machine, "DEMO\\pool-4", "in_maintenance_mode", true);
  auto r = f.launch("erin", "pool-desktop");
  CHECK(r.failure == LaunchFailure::powering_on);  // pool-1 queued; its TurnOn fails meanwhile
  r = f.launch("erin", "pool-desktop");            // the retry: pool-1 is faulted, pool-2 next
  CHECK(r.failure == LaunchFailure::powering_on);
  CHECK(power.powered() == std::vector<std::string>{"DEMO\\pool-1", "DEMO\\pool-2"});
  r = f.launch("erin", "pool-desktop");  // nothing left to power on: explained (NFuse no-available-workstation)
  CHECK(r.failure == LaunchFailure::all_unregistered);
  CHECK(r.message == "every candidate machine is unregistered, and those that are off could not be powered on "
                     "(DEMO\\pool-1: FailedToStart, DEMO\\pool-2: FailedToStart)");
  CHECK(power.powered().size() == 2);  // faulted machines are not powered on again
}

TEST_CASE("launcher: a launch waiting for a power-on that failed chooses again at once (machine_power_failed)") {
  common::ManualScheduler timers;  // the wait never ends by itself here
  PoweredOffPool pool(timers);       // powers on; the agents never register
  auto& f = pool.f;
  auto& power = pool.power;
  auto future = pool.launch("erin");
  park_patiently(timers);
  REQUIRE(timers.pending() == 1);
  REQUIRE(power.powered() == std::vector<std::string>{"DEMO\\pool-1"});
  CHECK(f.launcher->held_machines() == std::set<std::string>{"DEMO\\pool-1"});

  // The hypervisor refused: the power manager stores the fault, then tells the launcher. The
  // launch does not wait out its 30 s: it powers on the next machine and waits for that one.
  f.update(Kind::machine, "DEMO\\pool-1", "fault_state", std::string("FailedToStart"));
  f.launcher->machine_power_failed("DEMO\\pool-1");
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (power.powered().size() < 2 && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
  CHECK(power.powered() == std::vector<std::string>{"DEMO\\pool-1", "DEMO\\pool-2"});
  CHECK(f.launcher->held_machines() == std::set<std::string>{"DEMO\\pool-2"});
  CHECK(future.wait_for(std::chrono::milliseconds(0)) == std::future_status::timeout);  // waiting again
  park_patiently(timers);
  CHECK(timers.pending() == 1);
  f.launcher->stop();
  REQUIRE(future.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
}
