// Unit tests of the admin API's session actions and audit filter: the handler with an in-memory
// database, a real broker::Launcher and a scripted agent channel (answers chosen per session,
// held until the test releases them). The real daemon and agent: tests/integration.
#include "admin/admin_api.hpp"

#include "broker/launcher.hpp"
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
};

struct Fixture {
  std::unique_ptr<storage::Repository> repo;
  common::ManualClock clock;
  common::Metrics metrics;
  ScriptedAgents agents;
  common::WorkQueue work{2};
  std::unique_ptr<broker::SiteObjects> site;
  std::unique_ptr<broker::Launcher> launcher;
  std::unique_ptr<admin::AdminApi> api;

  explicit Fixture(bool with_launcher = true) {
    storage::SqliteOptions o;
    o.path = ":memory:";
    auto r = storage::open_sqlite(o);
    REQUIRE(r);
    repo = std::move(*r);
    site = std::make_unique<broker::SiteObjects>(*repo, common::null_logger());
    launcher = std::make_unique<broker::Launcher>(*repo, clock, agents, work, nullptr);
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
      for (const char* key : {"s-1", "s-2", "DEMO\\odd+key", "ended"}) {
        Object s = make_default(Kind::session, key);
        s.fields["machine"] = std::string("DEMO\\rds-1");
        s.fields["state"] = std::string(std::string(key) == "ended" ? "LoggedOff" : "Active");
        if (auto c = tx.create(s); !c) return c.error();
      }
      return {};
    }));
  }
  ~Fixture() { work.stop(); }

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
  CHECK(f.call("POST", "/api/v1/sessions/s-1/logoff", "{}").status == 409);  // reaches the agent: no such session
  auto wrong = f.call("PUT", "/api/v1/sessions/s-1/logoff");
  CHECK(wrong.status == 405);
  CHECK(wrong.headers["Allow"] == "POST");
  CHECK(f.call("POST", "/api/v1/sessions/s-1/shutdown").status == 404);
  CHECK(f.sent().size() == before + 2);
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
