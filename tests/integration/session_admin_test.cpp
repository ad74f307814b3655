// Integration tests of the admin session actions (docs/openapi.yaml, POST
// /api/v1/sessions/{name}/logoff|disconnect|message) and of explained launch failures in the audit
// log: the real brokerd on free ports with a temporary database, the reference agent
// (tools/vda-agent) reporting sessions, driven through the admin REST API and brokerctl.
//
// Every wait is for a state (the agent's status or the admin API), never for a fixed time.
#include "common/crypto.hpp"
#include "net/http.hpp"
#include "net/http_client.hpp"
#include "tests/integration/daemon.hpp"
#include "tests/integration/support.hpp"
#include "tools/vda-agent/agent.hpp"

#include <boost/json.hpp>
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using itest::Daemon;
using itest::TempDir;
using namespace itest::support;

namespace {

// Two multi-session hosts, TEST\rds-1 and TEST\rds-2, in one delivery group.
const char* kSite = R"(
[site]
site_name = "Session admin test"

[[catalog]]
name = "hosts"
session_support = "MultiSession"

[[delivery_group]]
name = "hosts-group"
session_support = "MultiSession"

[[machine]]
name = "TEST\\rds-{n}"
count = 2
catalog = "hosts"
delivery_group = "hosts-group"
)";

std::string await_state(Api& api, const std::string& key, const std::string& state) {
  return poll<std::string>([&] { return api.session_field(key, "state"); }, state);
}

// A logged-off session is kept as LoggedOff (docs/cbp.md "Session states"): true once it is.
bool await_ended(Api& api, const std::string& key) {
  return poll<bool>([&] { return api.session_field(key, "state") == "LoggedOff"; }, true);
}

// Whether the session is among the live ones GET /api/v1/sessions lists.
bool listed_live(Api& api, const std::string& key) {
  auto page = api.get("/api/v1/sessions?limit=1000");
  REQUIRE(page.has_value());
  for (const auto& item : page->at("items").as_array())
    if (text(item.as_object(), "name") == key) return text(item.as_object(), "state") != "LoggedOff";
  return false;
}

// {"error": {"code": C, "message": M}} -> C
std::string error_code(const net::ClientResponse& r) {
  auto v = json::parse(r.body);
  return text(v.as_object().at("error").as_object(), "code");
}
std::string error_message(const net::ClientResponse& r) {
  auto v = json::parse(r.body);
  return text(v.as_object().at("error").as_object(), "message");
}
std::string error_field(const net::ClientResponse& r) {
  const auto v = json::parse(r.body);
  const auto& e = v.as_object().at("error").as_object();
  if (!e.contains("fields")) return {};
  return text(e.at("fields").as_array().at(0).as_object(), "field");
}

bool has_session(const vda::MachineStatus& s, const std::string& key) {
  return std::any_of(s.sessions.begin(), s.sessions.end(),
                     [&](const vda::SessionView& v) { return v.info.session_key == key; });
}

std::optional<cbp::SessionState> agent_state(const vda::Machine& m, const std::string& key) {
  for (const auto& v : m.status().sessions)
    if (v.info.session_key == key) return v.state;
  return std::nullopt;
}

vda::MachineConfig host_config(const std::string& name, int n, std::string secret) {
  vda::MachineConfig c;
  c.name = name;
  c.catalog = "hosts";
  c.session_support = cbp::SessionSupport::multi_session;
  c.address = "10.99.0." + std::to_string(n) + ":1494";
  c.os = "Windows Server 2022";
  c.secret = std::move(secret);
  return c;
}

const json::object* find_entry(const json::array& items, const std::string& object) {
  for (const auto& i : items)
    if (text(i.as_object(), "object") == object) return &i.as_object();
  return nullptr;
}

}  // namespace

TEST_CASE("session admin: log off, disconnect and message sessions through the admin API and brokerctl") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, kSite)), daemon.log());
  Api api(daemon);

  vda::FleetOptions fo;
  fo.broker_url = "ws://127.0.0.1:" + std::to_string(daemon.agent_port()) + "/cbp";
  fo.threads = 1;
  fo.client_connect_delay = std::nullopt;
  vda::Fleet fleet(fo);
  auto host = fleet.add(host_config("TEST\\rds-1", 1, api.new_secret("TEST\\rds-1")));
  // An agent that cannot show messages (it does not list send_message among its capabilities).
  auto mute_cfg = host_config("TEST\\rds-2", 2, api.new_secret("TEST\\rds-2"));
  mute_cfg.capabilities = {"prepare_session", "logoff_session", "disconnect_session"};
  auto mute = fleet.add(mute_cfg);

  const std::string odd = "TEST\\rdp+4";  // a non-brokered session keyed by the agent: encoded in URLs
  const std::vector<std::pair<std::string, std::string>> reported{{"s-1", "TEST\\alice"}, {"s-2", "TEST\\bob"},
                                                                  {"s-3", "TEST\\carol"}, {odd, "TEST\\dave"},
                                                                  {"s-5", "TEST\\erin"},  {"s-6", "TEST\\frank"}};
  for (const auto& [key, user] : reported)
    REQUIRE(host.add_session({key, user, "PC", "192.0.2.1"}, cbp::SessionState::active));
  REQUIRE(mute.add_session({"m-1", "TEST\\gina", "PC", "192.0.2.2"}, cbp::SessionState::active));
  fleet.start();
  for (const auto& [key, user] : reported) REQUIRE_MESSAGE(await_state(api, key, "Active") == "Active", key);
  REQUIRE(await_state(api, "m-1", "Active") == "Active");

  SUBCASE("logoff: the agent logs the session off and the broker stops listing it") {
    auto r = api.action("s-1", "logoff");
    REQUIRE_MESSAGE(r.status == 200, r.body);
    auto body = json::parse(r.body).as_object();
    CHECK(text(body, "session") == "s-1");
    CHECK(text(body, "command") == "logoff");
    CHECK(text(body, "result") == "done");
    // The agent had ended the session before it answered.
    CHECK_FALSE(has_session(host.status(), "s-1"));
    const auto cmds = host.status().commands;
    CHECK(std::find(cmds.begin(), cmds.end(), "logoff_session ok") != cmds.end());
    CHECK(await_ended(api, "s-1"));
    CHECK_FALSE(listed_live(api, "s-1"));
    CHECK(await_state(api, "s-2", "Active") == "Active");  // the others stay

    // A name that needs encoding (backslash, plus) reaches the right session.
    auto o = api.action(odd, "logoff");
    CHECK_MESSAGE(o.status == 200, o.body);
    CHECK(await_ended(api, odd));
    CHECK_FALSE(has_session(host.status(), odd));

    // Audited with the admin token's identity.
    auto items = api.audit("action=session-logoff");
    REQUIRE(items.size() == 2);
    const auto* e = find_entry(items, "s-1");
    REQUIRE(e != nullptr);
    CHECK(text(*e, "actor") == "token:tester");
    CHECK(text(*e, "action") == "session-logoff");
    CHECK(text(*e, "kind") == "session");
    const auto& after = e->at("after").as_object();
    CHECK(text(after, "result") == "done");
    CHECK(text(after, "machine") == "TEST\\rds-1");
    CHECK(find_entry(items, odd) != nullptr);
  }

  SUBCASE("disconnect: the session stays, Disconnected") {
    auto r = api.action("s-2", "disconnect", "{}");
    REQUIRE_MESSAGE(r.status == 200, r.body);
    CHECK(text(json::parse(r.body).as_object(), "command") == "disconnect");
    CHECK(agent_state(host, "s-2") == cbp::SessionState::disconnected);
    CHECK(await_state(api, "s-2", "Disconnected") == "Disconnected");
    auto items = api.audit("action=session-disconnect");
    REQUIRE(items.size() == 1);
    CHECK(text(items[0].as_object(), "object") == "s-2");
    // logoff and disconnect take no body members.
    auto extra = api.action("s-2", "disconnect", R"({"text":"x"})");
    CHECK(extra.status == 400);
    CHECK(error_field(extra) == "text");
  }

  SUBCASE("message: the agent shows it") {
    auto r = api.action("s-3", "message", R"({"title":"Maintenance","text":"Back in 5 minutes.\nSave your work."})");
    REQUIRE_MESSAGE(r.status == 200, r.body);
    CHECK(text(json::parse(r.body).as_object(), "command") == "message");
    const auto msgs = host.status().messages;
    CHECK(std::find(msgs.begin(), msgs.end(), "Maintenance: Back in 5 minutes.\nSave your work.") != msgs.end());
    auto plain = api.action("s-3", "message", R"({"text":"no title"})");
    CHECK_MESSAGE(plain.status == 200, plain.body);
    CHECK(host.status().messages.back() == "no title");
    CHECK(api.session_field("s-3", "state") == "Active");
    auto items = api.audit("action=session-message&object=s-3");
    REQUIRE(items.size() == 2);
    const auto& after = items[1].as_object().at("after").as_object();  // newest first
    CHECK(text(after, "title") == "Maintenance");
    CHECK(text(after, "result") == "done");

    // Bad requests never reach the agent.
    const auto shown = host.status().messages.size();
    auto missing = api.action("s-3", "message", R"({"title":"t"})");
    CHECK(missing.status == 400);
    CHECK(error_field(missing) == "text");
    CHECK(api.action("s-3", "message", R"({"text":""})").status == 400);
    CHECK(api.action("s-3", "message", R"({"text":")" + std::string(4097, 'x') + R"("})").status == 400);
    CHECK(api.action("s-3", "message", R"({"text":")" + std::string(4096, 'x') + R"("})").status == 200);
    auto long_title = api.action("s-3", "message", R"({"text":"t","title":")" + std::string(257, 'x') + R"("})");
    CHECK(long_title.status == 400);
    CHECK(error_field(long_title) == "title");
    CHECK(api.action("s-3", "message", R"({"text":"t","title":"two\nlines"})").status == 400);
    CHECK(api.action("s-3", "message", R"({"text":"bell\u0007"})").status == 400);
    CHECK(api.action("s-3", "message", R"({"text":42})").status == 400);
    auto unknown = api.action("s-3", "message", R"({"text":"t","urgent":true})");
    CHECK(unknown.status == 400);
    CHECK(error_field(unknown) == "urgent");
    CHECK(api.action("s-3", "message", "not json").status == 400);
    CHECK(api.action("s-3", "message", "[]").status == 400);
    CHECK(host.status().messages.size() == shown + 1);  // only the 4096-byte one
  }

  SUBCASE("an agent that refuses: 409 with its error") {
    auto r = api.action("m-1", "message", R"({"text":"hello"})");
    CHECK(r.status == 409);
    CHECK(error_code(r) == "agent_refused");
    CHECK(error_message(r).find("TEST\\rds-2") != std::string::npos);
    CHECK(error_message(r).find("send_message") != std::string::npos);
    auto items = api.audit("action=session-message&object=m-1");
    REQUIRE(items.size() == 1);
    const auto& after = items[0].as_object().at("after").as_object();
    CHECK(text(after, "result") == "failed");
    CHECK(text(after, "error").find("send_message") != std::string::npos);
    // Its logoff works.
    CHECK(api.action("m-1", "logoff").status == 200);
    CHECK(await_ended(api, "m-1"));
  }

  SUBCASE("unknown sessions, wrong methods, unknown actions") {
    for (const char* command : {"logoff", "disconnect", "message"}) {
      auto r = api.action("no-such-session", command, std::string(command) == "message" ? R"({"text":"t"})" : "");
      CHECK_MESSAGE(r.status == 404, command);
      CHECK(error_code(r) == "not_found");
    }
    auto get = api.call("GET", "/api/v1/sessions/s-5/logoff");
    CHECK(get.status == 405);
    CHECK(get.headers["allow"] == "POST");
    CHECK(api.call("POST", "/api/v1/sessions/s-5/reboot").status == 404);
    CHECK(api.call("DELETE", "/api/v1/sessions/s-5/disconnect").status == 405);
    // Unauthenticated: 401, nothing sent.
    net::HttpClient anonymous(daemon.admin_url());
    auto anon = anonymous.request("POST", "/api/v1/sessions/s-5/logoff");
    REQUIRE(anon.has_value());
    CHECK(anon->status == 401);
    CHECK(api.session_field("s-5", "state") == "Active");
  }

  SUBCASE("brokerctl session logoff, disconnect, message; then the agent is gone") {
    const std::map<std::string, std::string> env{{"OPENBROKER_URL", daemon.admin_url()},
                                                 {"OPENBROKER_TOKEN", itest::kToken}};
    auto ctl = [&](std::vector<std::string> args) {
      args.insert(args.begin(), BROKERCTL_PATH);
      return itest::run_command(args, {}, env);
    };
    auto msg = ctl({"session", "message", "s-5", "--title", "IT", "--text", "Rebooting tonight"});
    CHECK_MESSAGE(msg.exit_code == 0, msg.err);
    CHECK(msg.out == "message shown in session s-5\n");
    CHECK(host.status().messages.back() == "IT: Rebooting tonight");
    auto disc = ctl({"session", "disconnect", "s-5"});
    CHECK_MESSAGE(disc.exit_code == 0, disc.err);
    CHECK(disc.out == "disconnected session s-5\n");
    CHECK(await_state(api, "s-5", "Disconnected") == "Disconnected");
    auto off = ctl({"--json", "session", "logoff", "s-6"});
    CHECK_MESSAGE(off.exit_code == 0, off.err);
    CHECK(text(json::parse(off.out).as_object(), "result") == "done");
    CHECK(await_ended(api, "s-6"));

    auto unknown = ctl({"session", "logoff", "nope"});
    CHECK(unknown.exit_code == 1);
    CHECK(unknown.err.find("nope") != std::string::npos);
    auto no_text = ctl({"session", "message", "s-5"});
    CHECK(no_text.exit_code == 2);
    CHECK(no_text.err.find("--text") != std::string::npos);
    CHECK(ctl({"session", "logoff"}).exit_code == 2);
    CHECK(ctl({"machine", "list", "--text", "x"}).exit_code == 2);

    auto audit = ctl({"audit", "list", "--action", "session-logoff,session-disconnect"});
    CHECK_MESSAGE(audit.exit_code == 0, audit.err);
    CHECK(audit.out.find("session-logoff") != std::string::npos);
    CHECK(audit.out.find("session-disconnect") != std::string::npos);
    CHECK(audit.out.find("token:tester") != std::string::npos);
    CHECK(audit.out.find("session-message") == std::string::npos);

    // The machine's agent is gone: the broker keeps its sessions, the actions fail with 409.
    host.stop();
    CHECK(poll<std::string>([&] { return api.machine_field("TEST\\rds-1", "registration_state"); }, "Unregistered") ==
          "Unregistered");
    REQUIRE(api.session_field("s-2", "state") != "<gone>");
    auto r = api.action("s-2", "logoff");
    CHECK(r.status == 409);
    CHECK(error_code(r) == "agent_not_connected");
    CHECK(error_message(r) == "the agent of machine 'TEST\\rds-1' is not connected");
    auto gone = ctl({"session", "disconnect", "s-3"});
    CHECK(gone.exit_code == 1);
    CHECK(gone.err.find("not connected") != std::string::npos);
    auto failed = api.audit("action=session-logoff&object=s-2");
    REQUIRE(failed.size() == 1);
    CHECK(text(failed[0].as_object().at("after").as_object(), "error") == "not connected");
  }

  fleet.stop(cbp::Reason::agent_shutdown, kWait);
  CHECK(daemon.stop() == 0);
}

namespace {

// The demo site (config/demo.toml) on free ports with a temporary database and the test's admin
// token: users alice (and others) with passwords, desktops on machines that have no agent running.
std::string demo_config(const TempDir& dir) {
  std::ifstream in(std::string(OPENBROKER_SOURCE_DIR) + "/config/demo.toml");
  std::stringstream ss;
  ss << in.rdbuf();
  std::string t = ss.str();
  for (const char* port : {"port = 8080", "port = 8081", "port = 8082"})
    t.replace(t.find(port), std::string(port).size(), "port = 0");
  const std::string db = "path = \"../var/demo.db\"";
  t.replace(t.find(db), db.size(), "path = \"" + dir.file("demo.db") + "\"");
  // The test talks NFuse as a front end on 127.0.0.1 would: trusted, so its ClientAddress counts
  // (docs/nfuse.md "Client address").
  const std::string site = "[site]\n";
  t.replace(t.find(site), site.size(), site + "trusted_front_ends = [\"127.0.0.1\"]\n");
  // The test's admin token beside the demo's.
  const std::string token = "[[admin.token]]\n";
  t.replace(t.find(token), token.size(),
            token + "name = \"tester\"\nsha256 = \"" + common::crypto::sha256_hex(itest::kToken) + "\"\n\n" + token);
  return t;
}

std::string request_address(const std::string& resource) {
  return R"(<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE NFuseProtocol SYSTEM "NFuse.dtd">
<NFuseProtocol version="5.0">
  <RequestAddress>
    <Name><AppName>)" +
         resource + R"(</AppName></Name>
    <ClientName>WI_audit</ClientName>
    <ClientAddress addresstype="dot">192.0.2.77</ClientAddress>
    <ServerAddress addresstype="dot"></ServerAddress>
    <Credentials>
      <UserName>alice</UserName>
      <Password encoding="cleartext">alice-pass</Password>
      <Domain type="NT">DEMO</Domain>
    </Credentials>
    <ClientType>ica30</ClientType>
  </RequestAddress>
</NFuseProtocol>)";
}

}  // namespace

TEST_CASE("session admin: a refused launch is explained in the audit log, through the API and brokerctl") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(demo_config(dir)), daemon.log());
  net::HttpClient xml("http://127.0.0.1:" + std::to_string(daemon.xml_port()));
  // No agent runs for the demo's machines: the launch is refused.
  auto r = xml.request("POST", "/scripts/wpnbr.dll", request_address("Win11 Desktop"), {{"Content-Type", "text/xml"}});
  REQUIRE(r.has_value());
  CHECK(r->status == 200);
  CHECK(r->body.find("<ErrorId>") != std::string::npos);

  Api api(daemon);
  auto items = api.audit("action=launch-refused,launch-failed,launch-timeout");
  REQUIRE(items.size() == 1);
  const auto& e = items[0].as_object();
  CHECK(text(e, "actor") == "broker");
  CHECK(text(e, "action") == "launch-refused");
  CHECK(text(e, "kind") == "session");
  CHECK(text(e, "object") == "Win11 Desktop");
  const auto& after = e.at("after").as_object();
  CHECK(text(after, "user") == "DEMO\\alice");
  CHECK(text(after, "reason") == "AllMachinesUnregistered");
  CHECK(text(after, "client_address") == "192.0.2.77");
  CHECK_FALSE(text(after, "message").empty());
  // The filter combines with the others, and pages.
  CHECK(api.audit("action=launch-refused&actor=broker").size() == 1);
  CHECK(api.audit("action=launch-refused&actor=token:tester").empty());
  CHECK(api.audit("action=launch-refused&offset=1").empty());
  CHECK(api.audit("action=launch-refused&limit=0").empty());
  CHECK(api.audit("action=launch").empty());
  CHECK(api.call("GET", "/api/v1/audit?action=").status == 400);

  const std::map<std::string, std::string> env{{"OPENBROKER_URL", daemon.admin_url()},
                                               {"OPENBROKER_TOKEN", itest::kToken}};
  auto ctl = itest::run_command({BROKERCTL_PATH, "audit", "list", "--action", "launch-refused"}, {}, env);
  CHECK_MESSAGE(ctl.exit_code == 0, ctl.err);
  CHECK(ctl.out.find("DETAIL") != std::string::npos);
  CHECK(ctl.out.find("launch-refused") != std::string::npos);
  CHECK(ctl.out.find("AllMachinesUnregistered: ") != std::string::npos);
  auto field_form = itest::run_command({BROKERCTL_PATH, "audit", "action=launch-refused", "actor=broker"}, {}, env);
  CHECK_MESSAGE(field_form.exit_code == 0, field_form.err);
  CHECK(field_form.out.find("AllMachinesUnregistered") != std::string::npos);
  CHECK(daemon.stop() == 0);
}
