// Unit tests of the admin API's session actions, power actions and audit filter: the handler with
// an in-memory database, a real broker::Launcher and a scripted agent channel (answers chosen per
// session, held until the test releases them), and a real broker::PowerManager on a simulated
// hypervisor connection driven by a ManualClock. The real daemon and agent: tests/integration.
#include "admin/admin_api.hpp"

#include "broker/engine.hpp"
#include "broker/launcher.hpp"
#include "broker/power_manager.hpp"
#include "broker/site_objects.hpp"
#include "common/clock.hpp"
#include "common/crypto.hpp"
#include "common/log.hpp"
#include "common/metrics.hpp"
#include "common/work_queue.hpp"
#include "storage/repository.hpp"

#include <boost/json.hpp>
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <future>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace common::model;
namespace json = boost::json;

namespace {

constexpr const char* kToken = "unit-token";

// Answers each command from `answers` (by session key; default ok); sessions in `hold` keep
// their `done` in `held` until the test calls it.
class ScriptedAgents : public broker::AgentChannel {
 public:
  std::mutex mutex;
  std::map<std::string, std::string> answers;  // session key -> error ("" = ok)
  std::vector<std::string> hold;
  std::map<std::string, Done> held;  // by session key
  std::vector<std::string> sent;  // "logoff DEMO\\rds-1 s-1", "message ... title|text"

  void prepare_session(const std::string&, const broker::PrepareSession&, std::chrono::milliseconds,
                       Done done) override {
    done(false, "not in this test");
  }
  void logoff_session(const std::string& m, const std::string& k, std::chrono::milliseconds, Done done) override {
    answer("logoff " + m + " " + k, k, std::move(done));
  }
  void disconnect_session(const std::string& m, const std::string& k, std::chrono::milliseconds, Done done) override {
    answer("disconnect " + m + " " + k, k, std::move(done));
  }
  void send_message(const std::string& m, const std::string& k, const std::string& title, const std::string& text,
                    std::chrono::milliseconds, Done done) override {
    answer("message " + m + " " + k + " " + title + "|" + text, k, std::move(done));
  }

 private:
  void answer(std::string what, const std::string& key, Done done) {
    std::string error;
    {
      std::lock_guard lock(mutex);
      sent.push_back(std::move(what));
      if (std::find(hold.begin(), hold.end(), key) != hold.end()) {
        held[key] = std::move(done);
        return;
      }
      if (auto it = answers.find(key); it != answers.end()) error = it->second;
    }
    done(error.empty(), error);
  }
};

struct Reply {
  int status = 0;
  json::object body;
  std::string route;
  std::map<std::string, std::string> headers;
  std::string raw;  // the body as sent
};

struct Fixture {
  std::unique_ptr<storage::Repository> repo;
  broker::Engine engine;  // outlives the work queue: its tasks' commits reach it
  common::ManualClock clock;
  common::Metrics metrics;
  ScriptedAgents agents;
  common::WorkQueue work{2};
  std::unique_ptr<broker::SiteObjects> site;
  std::unique_ptr<broker::Launcher> launcher;
  std::unique_ptr<broker::PowerManager> power;
  std::unique_ptr<admin::AdminApi> api;

  // with_power: a simulated hypervisor connection "sim" (2 new actions per clock minute) with the
  // catalog "pool" and its machines DEMO\pool-1..4, run by a PowerManager.
  explicit Fixture(bool with_launcher = true, bool with_power = false) {
    storage::SqliteOptions o;
    o.path = ":memory:";
    auto r = storage::open_sqlite(o);
    REQUIRE(r);
    repo = std::move(*r);
    site = std::make_unique<broker::SiteObjects>(*repo, common::null_logger());
    REQUIRE(engine.attach(*repo));
    launcher = std::make_unique<broker::Launcher>(*repo, engine, clock, agents, work, nullptr);
    admin::AdminOptions ao;
    ao.tokens.push_back({"unit", common::crypto::sha256_hex(kToken)});
    api = std::make_unique<admin::AdminApi>(*site, *repo, work, metrics, ao, common::null_logger(),
                                            with_launcher ? launcher.get() : nullptr);
    REQUIRE(repo->write([&](storage::Transaction& tx) -> common::Status {
      Object cat = make_default(Kind::catalog, "hosts");
      cat.fields["session_support"] = std::string("MultiSession");
      if (auto c = tx.create(cat); !c) return c.error();
      Object m = make_default(Kind::machine, "DEMO\\rds-1");
      m.fields["catalog"] = std::string("hosts");
      if (auto c = tx.create(m); !c) return c.error();
      if (with_power) {
        Object h = make_default(Kind::hypervisor_connection, "sim");
        h.fields["driver"] = std::string("simulated");
        h.fields["max_new_actions_per_minute"] = std::int64_t{2};
        h.fields["max_percentage_active_actions"] = std::int64_t{100};
        if (auto c = tx.create(h); !c) return c.error();
        Object pool = make_default(Kind::catalog, "pool");
        pool.fields["hypervisor_connection"] = std::string("sim");
        if (auto c = tx.create(pool); !c) return c.error();
        for (int i = 1; i <= 4; ++i) {
          Object pm = make_default(Kind::machine, "DEMO\\pool-" + std::to_string(i));
          pm.fields["catalog"] = std::string("pool");
          pm.fields["power_state"] = std::string("On");
          if (auto c = tx.create(pm); !c) return c.error();
        }
      }
      for (const char* key : {"s-1", "s-2", "DEMO\\odd+key", "ended"}) {
        Object s = make_default(Kind::session, key);
        s.fields["machine"] = std::string("DEMO\\rds-1");
        s.fields["state"] = std::string(std::string(key) == "ended" ? "LoggedOff" : "Active");
        if (auto c = tx.create(s); !c) return c.error();
      }
      return {};
    }));
    if (with_power) {
      common::SysTime start;
      REQUIRE(common::parse_time("2026-11-23T10:00:00.000Z", start));
      clock.set(start);  // time zero would read as "not yet"
      broker::PowerManagerOptions po;
      po.tick = std::chrono::milliseconds(5);  // real time: how soon the queue notices changes
      power = std::make_unique<broker::PowerManager>(*repo, clock, common::null_logger(), po);
      REQUIRE(power->start());
      api->set_power_manager(power.get());
    }
  }
  ~Fixture() {
    work.stop();
    if (power) power->stop();
  }

  // Starts a request; the future gets the reply.
  std::future<Reply> start(const std::string& method, const std::string& target, const std::string& body = {},
                           bool auth = true) {
    net::HttpRequest req;
    req.method = method;
    req.target = target;
    const auto q = target.find('?');
    req.path = net::percent_decode(target.substr(0, q));
    if (q != std::string::npos) req.query = target.substr(q + 1);
    if (auth) req.headers["Authorization"] = std::string("Bearer ") + kToken;
    req.body = body;
    req.remote_address = "127.0.0.1";
    req.listener = "admin";
    auto promise = std::make_shared<std::promise<Reply>>();
    auto future = promise->get_future();
    api->handle(std::move(req), [promise](net::HttpResponse r) {
      Reply out;
      out.status = r.status;
      out.route = r.route;
      for (const auto& [k, v] : r.headers) out.headers[k] = v;
      out.raw = r.body;
      if (r.content_type == "application/json") out.body = json::parse(r.body).as_object();
      promise->set_value(std::move(out));
    });
    return future;
  }
  Reply call(const std::string& method, const std::string& target, const std::string& body = {}) {
    auto f = start(method, target, body);
    REQUIRE(f.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
    return f.get();
  }
  std::vector<std::string> sent() {
    std::lock_guard lock(agents.mutex);
    return agents.sent;
  }
};

std::string text(const json::object& o, const char* k) {
  const auto* v = o.if_contains(k);
  return v && v->is_string() ? std::string(v->get_string()) : std::string();
}
std::string code(const Reply& r) { return text(r.body.at("error").as_object(), "code"); }
std::string message(const Reply& r) { return text(r.body.at("error").as_object(), "message"); }

}  // namespace

TEST_CASE("session actions answer with the agent's outcome and are audited") {
  Fixture f;
  auto ok = f.call("POST", "/api/v1/sessions/s-1/logoff");
  CHECK(ok.status == 200);
  CHECK(text(ok.body, "session") == "s-1");
  CHECK(text(ok.body, "command") == "logoff");
  CHECK(text(ok.body, "result") == "done");
  CHECK(ok.route == "/api/v1/sessions/{name}/logoff");
  CHECK(f.call("POST", "/api/v1/sessions/s-1/disconnect").status == 200);
  CHECK(f.call("POST", "/api/v1/sessions/s-1/message", R"({"title":"T","text":"hello\tthere"})").status == 200);
  CHECK(f.call("POST", "/api/v1/sessions/DEMO%5Codd%2Bkey/logoff").status == 200);
  CHECK(f.sent() == std::vector<std::string>{"logoff DEMO\\rds-1 s-1", "disconnect DEMO\\rds-1 s-1",
                                             "message DEMO\\rds-1 s-1 T|hello\tthere",
                                             "logoff DEMO\\rds-1 DEMO\\odd+key"});

  auto audit = f.call("GET", "/api/v1/audit?action=session-logoff,session-message");
  REQUIRE(audit.status == 200);
  const auto& items = audit.body.at("items").as_array();
  REQUIRE(items.size() == 3);
  const auto& newest = items[0].as_object();
  CHECK(text(newest, "actor") == "token:unit");
  CHECK(text(newest, "action") == "session-logoff");
  CHECK(text(newest, "kind") == "session");
  CHECK(text(newest, "object") == "DEMO\\odd+key");
  const auto& msg = items[1].as_object().at("after").as_object();
  CHECK(text(msg, "result") == "done");
  CHECK(text(msg, "machine") == "DEMO\\rds-1");
  CHECK(text(msg, "title") == "T");
  CHECK(text(msg, "text") == "hello\tthere");
}

TEST_CASE("session action failures: agent errors, unknown and ended sessions, bad requests") {
  Fixture f;
  f.agents.answers = {{"s-1", "timeout"}, {"s-2", "not connected"}, {"DEMO\\odd+key", "connection closed"}};
  auto timeout = f.call("POST", "/api/v1/sessions/s-1/logoff");
  CHECK(timeout.status == 504);
  CHECK(code(timeout) == "agent_timeout");
  auto gone = f.call("POST", "/api/v1/sessions/s-2/disconnect");
  CHECK(gone.status == 409);
  CHECK(code(gone) == "agent_not_connected");
  CHECK(message(gone) == "the agent of machine 'DEMO\\rds-1' is not connected");
  auto closed = f.call("POST", "/api/v1/sessions/DEMO%5Codd%2Bkey/logoff");
  CHECK(closed.status == 409);
  CHECK(code(closed) == "agent_not_connected");
  f.agents.answers = {{"s-1", "no such session"}};
  auto refused = f.call("POST", "/api/v1/sessions/s-1/message", R"({"text":"hi"})");
  CHECK(refused.status == 409);
  CHECK(code(refused) == "agent_refused");
  CHECK(message(refused) ==
        "the agent of machine 'DEMO\\rds-1' could not show a message in session 's-1': no such session");
  // Each attempt that reached an agent is audited with its result.
  auto audit = f.call("GET", "/api/v1/audit?action=session-logoff");
  REQUIRE(audit.body.at("items").as_array().size() == 2);
  const auto& after = audit.body.at("items").as_array()[1].as_object().at("after").as_object();
  CHECK(text(after, "result") == "failed");
  CHECK(text(after, "error") == "timeout");

  const auto before = f.sent().size();
  CHECK(f.call("POST", "/api/v1/sessions/nope/logoff").status == 404);
  auto ended = f.call("POST", "/api/v1/sessions/ended/logoff");
  CHECK(ended.status == 409);
  CHECK(code(ended) == "conflict");
  CHECK(f.call("POST", "/api/v1/sessions/s-1/message").status == 400);
  CHECK(f.call("POST", "/api/v1/sessions/s-1/message", R"({"text":null})").status == 400);
  // A null title is no title: this one reaches the agent (which refuses it, as scripted).
  CHECK(f.call("POST", "/api/v1/sessions/s-1/message", R"({"text":"t","title":null})").status == 409);
  CHECK(f.call("POST", "/api/v1/sessions/s-1/logoff", R"({"x":1})").status == 400);
  // Reaches the agent, which has no such session: it is over, so the logoff has done its job and
  // the broker ends its record.
  CHECK(f.call("POST", "/api/v1/sessions/s-1/logoff", "{}").status == 200);
  auto over = f.call("GET", "/api/v1/sessions/s-1");
  CHECK(text(over.body, "state") == "LoggedOff");
  auto wrong = f.call("PUT", "/api/v1/sessions/s-1/logoff");
  CHECK(wrong.status == 405);
  CHECK(wrong.headers["Allow"] == "POST");
  CHECK(f.call("POST", "/api/v1/sessions/s-1/shutdown").status == 404);
  CHECK(f.sent().size() == before + 2);
  CHECK(f.call("POST", "/api/v1/sessions/s-1/logoff", "{}").status == 409);  // already ended
  // Without a token nothing happens.
  auto anon = f.start("POST", "/api/v1/sessions/s-2/logoff", {}, false);
  REQUIRE(anon.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  CHECK(anon.get().status == 401);
  CHECK(f.sent().size() == before + 2);
}

TEST_CASE("a session action answers only once the agent has, also after the work queue stopped") {
  Fixture f;
  f.agents.hold = {"s-1", "s-2"};
  auto first = f.start("POST", "/api/v1/sessions/s-1/logoff");
  auto second = f.start("POST", "/api/v1/sessions/s-2/logoff");
  auto sent_both = [&] { return f.sent().size() == 2; };
  for (int i = 0; i < 500 && !sent_both(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  REQUIRE(sent_both());
  CHECK(first.wait_for(std::chrono::milliseconds(100)) == std::future_status::timeout);
  std::map<std::string, broker::AgentChannel::Done> held;
  {
    std::lock_guard lock(f.agents.mutex);
    held = f.agents.held;
  }
  REQUIRE(held.size() == 2);
  held.at("s-1")(true, {});
  REQUIRE(first.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  CHECK(first.get().status == 200);
  // The broker stops before the second agent answers: the reply still comes (without audit).
  f.work.stop();
  held.at("s-2")(false, "connection closed");
  REQUIRE(second.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  CHECK(second.get().status == 409);
}

TEST_CASE("without a launcher the session actions answer 503") {
  Fixture f(false);
  auto r = f.call("POST", "/api/v1/sessions/s-1/logoff");
  CHECK(r.status == 503);
  CHECK(code(r) == "unavailable");
  CHECK(f.sent().empty());
}

TEST_CASE("the audit log filters on actions, newest first, paged past the scan chunk") {
  Fixture f;
  REQUIRE(f.repo->write([&](storage::Transaction& tx) -> common::Status {
    for (int i = 0; i < 1300; ++i) {
      storage::AuditEntry e;
      e.actor = "broker";
      e.action = i % 3 == 0 ? "launch-failed" : "launch";
      e.kind = "session";
      e.object = "k" + std::to_string(i);
      if (auto st = tx.append_audit(e); !st) return st;
    }
    return {};
  }));
  // launch-failed: k1299, k1296, ... (434 entries, newest first).
  auto page = f.call("GET", "/api/v1/audit?action=launch-failed&limit=5&offset=200");
  REQUIRE(page.status == 200);
  const auto& items = page.body.at("items").as_array();
  REQUIRE(items.size() == 5);
  CHECK(text(items[0].as_object(), "object") == "k" + std::to_string(1299 - 3 * 200));
  CHECK(text(items[4].as_object(), "object") == "k" + std::to_string(1299 - 3 * 204));
  auto all = f.call("GET", "/api/v1/audit?action=launch-failed&limit=1000");
  CHECK(all.body.at("items").as_array().size() == 434);
  auto tail = f.call("GET", "/api/v1/audit?action=launch-failed&limit=10&offset=430");
  CHECK(tail.body.at("items").as_array().size() == 4);
  CHECK(f.call("GET", "/api/v1/audit?action=launch-failed&object=k3").body.at("items").as_array().size() == 1);
  CHECK(f.call("GET", "/api/v1/audit?action=nothing").body.at("items").as_array().empty());
  auto bad = f.call("GET", "/api/v1/audit?action=");
  CHECK(bad.status == 400);
  CHECK(f.call("GET", "/api/v1/audit?verb=x").status == 400);
}

namespace {

// Polls `done` (every 5 ms, for up to 20 s of real time): the power queues are asynchronous.
template <class F>
bool eventually(F done) {
  for (int i = 0; i < 4000; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return done();
}

std::int64_t total(const Reply& r) { return r.body.at("total").as_int64(); }

}  // namespace

TEST_CASE("power actions: created for several machines, listed, completed, shown on the machine") {
  Fixture f(true, true);
  auto created =
      f.call("POST", "/api/v1/power-actions", R"({"machines":["DEMO\\pool-1","DEMO\\pool-2"],"action":"TurnOff"})");
  REQUIRE(created.status == 201);
  CHECK(created.route == "/api/v1/power-actions");
  const auto& items = created.body.at("items").as_array();
  REQUIRE(items.size() == 2);
  for (std::size_t i = 0; i < 2; ++i) {
    const auto& a = items[i].as_object();
    CHECK(text(a, "machine") == "DEMO\\pool-" + std::to_string(i + 1));
    CHECK(text(a, "hypervisor_connection") == "sim");
    CHECK(text(a, "action") == "TurnOff");
    CHECK(text(a, "reason") == "Admin");
    CHECK(a.at("base_priority").as_int64() == 30);
    CHECK(a.at("actual_priority").as_int64() == 30);
    CHECK(text(a, "name") == std::to_string(a.at("id").as_int64()));
    CHECK(a.at("request_time").is_string());
    const auto st = text(a, "state");
    CHECK((st == "Pending" || st == "Started" || st == "Completed"));
  }
  // A hard power-off is done at once: both complete without the clock moving.
  REQUIRE(eventually([&] { return total(f.call("GET", "/api/v1/power-actions?state=Completed")) == 2; }));
  auto list = f.call("GET", "/api/v1/power-actions");
  REQUIRE(list.status == 200);
  CHECK(total(list) == 2);
  CHECK(list.body.at("limit").as_int64() == 100);
  const auto& done = list.body.at("items").as_array()[0].as_object();
  CHECK(done.at("start_time").is_string());
  CHECK(done.at("completion_time").is_string());
  CHECK(done.at("failure_reason").is_null());
  CHECK(done.at("attempts").as_int64() == 1);
  const auto id = done.at("id").as_int64();
  auto one = f.call("GET", "/api/v1/power-actions/" + std::to_string(id));
  CHECK(one.status == 200);
  CHECK(one.route == "/api/v1/power-actions/{id}");
  CHECK(text(one.body, "state") == "Completed");
  CHECK(f.call("GET", "/api/v1/power-actions/999").status == 404);
  CHECK(f.call("GET", "/api/v1/power-actions/abc").status == 404);

  // Filters and paging.
  CHECK(total(f.call("GET", "/api/v1/power-actions?machine=DEMO%5Cpool-2")) == 1);
  CHECK(total(f.call("GET", "/api/v1/power-actions?hypervisor_connection=sim&action=TurnOff,TurnOn")) == 2);
  CHECK(total(f.call("GET", "/api/v1/power-actions?action=TurnOn")) == 0);
  CHECK(total(f.call("GET", "/api/v1/power-actions?state=Pending,Started")) == 0);
  auto page = f.call("GET", "/api/v1/power-actions?limit=1&offset=1");
  CHECK(total(page) == 2);
  REQUIRE(page.body.at("items").as_array().size() == 1);
  CHECK(text(page.body.at("items").as_array()[0].as_object(), "machine") == "DEMO\\pool-2");

  // The machines show their new power state, and no pending actions.
  REQUIRE(
      eventually([&] { return text(f.call("GET", "/api/v1/machines/DEMO%5Cpool-1").body, "power_state") == "Off"; }));
  auto m = f.call("GET", "/api/v1/machines/DEMO%5Cpool-1");
  CHECK(m.body.at("pending_power_actions").as_array().empty());
  CHECK(text(m.body, "fault_state") == "None");
  CHECK(
      !f.call("GET", "/api/v1/machines").body.at("items").as_array()[0].as_object().contains("pending_power_actions"));

  auto audit = f.call("GET", "/api/v1/audit?action=power-action-create");
  REQUIRE(audit.body.at("items").as_array().size() == 2);
  const auto& entry = audit.body.at("items").as_array()[0].as_object();
  CHECK(text(entry, "actor") == "token:unit");
  CHECK(text(entry, "kind") == "power_action");
  CHECK(text(entry.at("after").as_object(), "action") == "TurnOff");
}

TEST_CASE("power actions: pending ones are canceled and re-prioritised; metrics count them") {
  Fixture f(true, true);
  // Two new actions per clock minute, and the clock stands still: two start, two wait.
  auto created =
      f.call("POST", "/api/v1/power-actions",
             R"({"machines":["DEMO\\pool-1","DEMO\\pool-2","DEMO\\pool-3","DEMO\\pool-4"],"action":"TurnOff"})");
  REQUIRE(created.status == 201);
  std::vector<std::int64_t> ids;
  for (const auto& a : created.body.at("items").as_array()) ids.push_back(a.as_object().at("id").as_int64());
  REQUIRE(ids.size() == 4);
  REQUIRE(eventually([&] { return total(f.call("GET", "/api/v1/power-actions?state=Completed")) == 2; }));
  auto pending = f.call("GET", "/api/v1/power-actions?state=Pending");
  REQUIRE(total(pending) == 2);
  const auto waiting = pending.body.at("items").as_array()[0].as_object().at("id").as_int64();
  const auto other = pending.body.at("items").as_array()[1].as_object().at("id").as_int64();
  const auto finished = f.call("GET", "/api/v1/power-actions?state=Completed")
                            .body.at("items")
                            .as_array()[0]
                            .as_object()
                            .at("id")
                            .as_int64();
  const auto path = [](std::int64_t id) { return "/api/v1/power-actions/" + std::to_string(id); };

  // The machine shows its pending action.
  const std::string waiting_machine = text(f.call("GET", path(waiting)).body, "machine");
  auto m = f.call("GET", "/api/v1/machines/" + net::percent_encode(waiting_machine));
  REQUIRE(m.body.at("pending_power_actions").as_array().size() == 1);
  const auto& p = m.body.at("pending_power_actions").as_array()[0].as_object();
  CHECK(p.at("id").as_int64() == waiting);
  CHECK(text(p, "action") == "TurnOff");
  CHECK(text(p, "state") == "Pending");

  // Metrics: counts by state and the queue depth.
  auto metrics = f.call("GET", "/metrics");
  REQUIRE(metrics.status == 200);
  CHECK(metrics.raw.find("# TYPE broker_power_actions gauge") != std::string::npos);
  CHECK(metrics.raw.find("broker_power_actions{hypervisor_connection=\"sim\",state=\"Pending\"} 2") !=
        std::string::npos);
  CHECK(metrics.raw.find("broker_power_actions{hypervisor_connection=\"sim\",state=\"Completed\"} 2") !=
        std::string::npos);
  CHECK(metrics.raw.find("broker_power_actions{hypervisor_connection=\"sim\",state=\"Failed\"} 0") !=
        std::string::npos);
  CHECK(metrics.raw.find("broker_power_queue_depth{hypervisor_connection=\"sim\"} 2") != std::string::npos);

  // Cancel one.
  auto canceled = f.call("POST", path(waiting) + "/cancel");
  REQUIRE(canceled.status == 200);
  CHECK(canceled.route == "/api/v1/power-actions/{id}/cancel");
  CHECK(text(canceled.body, "state") == "Canceled");
  CHECK(text(f.call("GET", path(waiting)).body, "state") == "Canceled");
  auto again = f.call("POST", path(waiting) + "/cancel");
  CHECK(again.status == 409);
  CHECK(message(again) ==
        "power action " + std::to_string(waiting) + " is Canceled; only Pending actions can be canceled");
  CHECK(f.call("POST", path(finished) + "/cancel").status == 409);
  CHECK(f.call("POST", "/api/v1/power-actions/999/cancel").status == 404);
  CHECK(f.call("POST", "/api/v1/power-actions/x/cancel").status == 404);
  auto get_cancel = f.call("GET", path(other) + "/cancel");
  CHECK(get_cancel.status == 405);
  CHECK(get_cancel.headers["Allow"] == "POST");

  // Re-prioritise the other.
  auto changed = f.call("PATCH", path(other), R"({"priority":5})");
  REQUIRE(changed.status == 200);
  CHECK(changed.body.at("actual_priority").as_int64() == 5);
  CHECK(changed.body.at("base_priority").as_int64() == 30);
  CHECK(text(changed.body, "state") == "Pending");
  CHECK(f.call("PATCH", path(other), R"({"priority":1001})").status == 400);
  CHECK(f.call("PATCH", path(other), R"({"priority":-1})").status == 400);
  CHECK(f.call("PATCH", path(other), R"({"priority":"5"})").status == 400);
  CHECK(f.call("PATCH", path(other), R"({"state":"Completed"})").status == 400);
  CHECK(f.call("PATCH", path(other), R"({})").status == 400);
  CHECK(f.call("PATCH", path(finished), R"({"priority":5})").status == 409);
  CHECK(f.call("PATCH", path(waiting), R"({"priority":5})").status == 409);
  CHECK(f.call("PATCH", "/api/v1/power-actions/999", R"({"priority":5})").status == 404);
  CHECK(f.call("DELETE", path(other)).status == 405);

  // A minute later the throttle lets the last one run.
  f.clock.advance(std::chrono::seconds(61));
  REQUIRE(eventually([&] { return total(f.call("GET", "/api/v1/power-actions?state=Completed")) == 3; }));
  CHECK(text(f.call("GET", path(other)).body, "state") == "Completed");
  CHECK(text(f.call("GET", path(waiting)).body, "state") == "Canceled");
  metrics = f.call("GET", "/metrics");
  CHECK(metrics.raw.find("broker_power_actions{hypervisor_connection=\"sim\",state=\"Canceled\"} 1") !=
        std::string::npos);
  CHECK(metrics.raw.find("broker_power_actions{hypervisor_connection=\"sim\",state=\"Pending\"} 0") !=
        std::string::npos);
  CHECK(metrics.raw.find("broker_power_queue_depth{hypervisor_connection=\"sim\"} 0") != std::string::npos);

  auto cancels = f.call("GET", "/api/v1/audit?action=power-action-cancel");
  REQUIRE(cancels.body.at("items").as_array().size() == 1);
  const auto& c = cancels.body.at("items").as_array()[0].as_object();
  CHECK(text(c, "object") == std::to_string(waiting));
  CHECK(text(c.at("before").as_object(), "state") == "Pending");
  CHECK(text(c.at("after").as_object(), "state") == "Canceled");
  auto priorities = f.call("GET", "/api/v1/audit?action=power-action-priority");
  REQUIRE(priorities.body.at("items").as_array().size() == 1);
  const auto& pr = priorities.body.at("items").as_array()[0].as_object();
  CHECK(pr.at("before").as_object().at("actual_priority").as_int64() == 30);
  CHECK(pr.at("after").as_object().at("actual_priority").as_int64() == 5);
  CHECK(f.call("GET", "/api/v1/audit?action=power-action-create").body.at("items").as_array().size() == 4);
}

TEST_CASE("power action requests that are refused queue nothing") {
  Fixture f(true, true);
  const std::string path = "/api/v1/power-actions";
  auto bad_action = f.call("POST", path, R"({"machines":["DEMO\\pool-1"],"action":"Explode"})");
  CHECK(bad_action.status == 400);
  CHECK(code(bad_action) == "invalid_argument");
  CHECK(bad_action.body.at("error").as_object().at("fields").as_array()[0].as_object().at("field") == "action");
  CHECK(f.call("POST", path, R"({"machines":["DEMO\\pool-1"]})").status == 400);
  CHECK(f.call("POST", path, R"({"machines":[],"action":"TurnOn"})").status == 400);
  CHECK(f.call("POST", path, R"({"action":"TurnOn"})").status == 400);
  CHECK(f.call("POST", path, R"({"machines":"DEMO\\pool-1","action":"TurnOn"})").status == 400);
  CHECK(f.call("POST", path, R"({"machines":[""],"action":"TurnOn"})").status == 400);
  CHECK(f.call("POST", path, R"({"machines":["DEMO\\pool-1"],"action":"TurnOn","priority":1001})").status == 400);
  CHECK(f.call("POST", path, R"({"machines":["DEMO\\pool-1"],"action":"TurnOn","priority":2.5})").status == 400);
  CHECK(f.call("POST", path, R"({"machines":["DEMO\\pool-1"],"action":"TurnOn","when":"now"})").status == 400);
  CHECK(f.call("POST", path, "not json").status == 400);
  auto unknown = f.call("POST", path, R"({"machines":["DEMO\\pool-1","DEMO\\nope"],"action":"TurnOn"})");
  CHECK(unknown.status == 404);
  CHECK(message(unknown) == "machines: no machine named 'DEMO\\nope'");
  auto unmanaged = f.call("POST", path, R"({"machines":["DEMO\\pool-1","DEMO\\rds-1"],"action":"TurnOn"})");
  CHECK(unmanaged.status == 409);
  CHECK(code(unmanaged) == "conflict");
  CHECK(message(unmanaged).find("DEMO\\rds-1") != std::string::npos);
  auto wrong = f.call("PUT", path);
  CHECK(wrong.status == 405);
  CHECK(wrong.headers["Allow"] == "GET, POST");
  CHECK(f.call("GET", path + "?state=Sleeping").status == 400);
  CHECK(f.call("GET", path + "?state=").status == 400);
  CHECK(f.call("GET", path + "?action=Explode").status == 400);
  CHECK(f.call("GET", path + "?colour=red").status == 400);
  CHECK(f.call("GET", path + "?limit=5000").status == 400);
  CHECK(f.call("GET", "/api/v1/power-actions/1/retry").status == 404);
  CHECK(total(f.call("GET", path)) == 0);
  CHECK(f.call("GET", "/api/v1/audit?kind=power_action").body.at("items").as_array().empty());

  // An explicit priority; the same action again for the same machine is the same action.
  auto first = f.call("POST", path, R"({"machines":["DEMO\\pool-1"],"action":"Restart","priority":7})");
  REQUIRE(first.status == 201);
  const auto& a = first.body.at("items").as_array()[0].as_object();
  CHECK(a.at("base_priority").as_int64() == 7);
  CHECK(text(a, "action") == "Restart");
}

TEST_CASE("without a power manager the stored power actions are listed and changes answer 503") {
  Fixture f;
  auto list = f.call("GET", "/api/v1/power-actions");
  CHECK(list.status == 200);
  CHECK(total(list) == 0);
  auto create = f.call("POST", "/api/v1/power-actions", R"({"machines":["DEMO\\rds-1"],"action":"TurnOn"})");
  CHECK(create.status == 503);
  CHECK(code(create) == "unavailable");
  CHECK(f.call("PATCH", "/api/v1/power-actions/1", R"({"priority":5})").status == 503);
  CHECK(f.call("POST", "/api/v1/power-actions/1/cancel").status == 503);
  CHECK(f.call("GET", "/api/v1/power-actions/1").status == 404);
  CHECK(!f.call("GET", "/api/v1/machines/DEMO%5Crds-1").body.contains("pending_power_actions"));
  CHECK(f.call("GET", "/metrics").raw.find("broker_power_actions{") == std::string::npos);
}

// Abuse limits of the admin API (docs/SECURITY.md section 7.5). The transport's (body size,
// connections, timeouts) are in net/server_test.cpp; `limit` on list requests in "power action
// requests that are refused queue nothing".
TEST_SUITE("limits") {

TEST_CASE("request bodies nest at most kMaxJsonDepth levels; deeper ones are 400 before anything else") {
  Fixture f;
  // A body whose own object is level 1 and holds `depth - 1` nested arrays.
  const auto nested = [](std::size_t depth) {
    return R"({"name":"g1","x":)" + std::string(depth - 1, '[') + std::string(depth - 1, ']') + "}";
  };
  // At the limit the body is read: the answer is about the unknown member, not the JSON.
  auto at_limit = f.call("POST", "/api/v1/groups", nested(admin::kMaxJsonDepth));
  CHECK(at_limit.status == 400);
  CHECK(message(at_limit).find("nests deeper") == std::string::npos);
  CHECK(message(at_limit).find("not valid JSON") == std::string::npos);
  for (std::size_t depth : {admin::kMaxJsonDepth + 1, std::size_t{100000}}) {
    auto deep = f.call("POST", "/api/v1/groups", nested(depth));
    CHECK(deep.status == 400);
    CHECK(code(deep) == "invalid_argument");
    CHECK(message(deep) == "request body nests deeper than 32 levels");
  }
  // Not even created by accident.
  CHECK(f.call("GET", "/api/v1/groups/g1").status == 404);
}

TEST_CASE("a power-action request names at most max_page machines") {
  Fixture f(true, true);
  const auto body = [](std::size_t n) {
    std::string machines;
    for (std::size_t i = 0; i < n; ++i) machines += std::string(i ? "," : "") + "\"DEMO\\\\m" + std::to_string(i) + "\"";
    return R"({"machines":[)" + machines + R"(],"action":"TurnOn"})";
  };
  // At the limit the machines are looked at (none of these exists).
  auto at_limit = f.call("POST", "/api/v1/power-actions", body(1000));
  CHECK(at_limit.status == 404);
  auto over = f.call("POST", "/api/v1/power-actions", body(1001));
  CHECK(over.status == 400);
  CHECK(message(over) == "machines: must name at most 1000 machines");
  CHECK(f.call("GET", "/api/v1/power-actions").body.at("total").as_int64() == 0);
}

}  // TEST_SUITE("limits")
