// Integration tests of the connection caps (docs/configuration.md "Connection limits", docs/cbp.md
// "Registration limit"): the real brokerd with small configured caps, flooded from loopback with
// a few tens of connections, checked from the outside (other ports, the agent protocol, /metrics).
//
// Every wait is for a state, bounded by a generous safety limit, never for a fixed time.
#include "cbp/messages.hpp"
#include "common/crypto.hpp"
#include "net/http_client.hpp"
#include "net/test_support.hpp"
#include "net/websocket_client.hpp"
#include "tests/integration/daemon.hpp"
#include "tests/integration/support.hpp"
#include "tools/vda-agent/agent.hpp"
#include "tools/vda-agent/raw_connection.hpp"

#include <doctest/doctest.h>

#include <memory>
#include <string>
#include <vector>

using itest::Daemon;
using itest::TempDir;
using net::test::RawSocket;

namespace {

using namespace itest::support;

// itest::base_config with keys of our own in [listeners.xml] and [listeners.agent].
std::string limits_config(const TempDir& dir, const std::string& xml_keys, const std::string& agent_keys,
                          const std::string& extra = {}) {
  std::string c;
  c += "[listeners.xml]\nport = 0\n" + xml_keys;
  c += "[listeners.agent]\nport = 0\n" + agent_keys;
  c += "[listeners.admin]\nport = 0\n";
  c += "[database]\npath = \"" + dir.file("broker.db") + "\"\n";
  c += "[logging]\nlevel = \"info\"\n";
  c += "[admin]\nunauthenticated_paths = [\"/metrics\"]\n";
  c += "[[admin.token]]\nname = \"tester\"\nsha256 = \"" + common::crypto::sha256_hex(itest::kToken) + "\"\n";
  return c + extra;
}

// The value of one series ("name{labels}") on the daemon's /metrics; -1 when it is absent.
double metric(const Daemon& daemon, const std::string& series) {
  net::HttpClient http(daemon.admin_url());
  auto r = http.request("GET", "/metrics");
  REQUIRE(r.has_value());
  const std::string text = "\n" + r->body;
  const auto at = text.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + series.size() + 2));
}

// GET path on the admin port: the status.
int admin_get(const Daemon& daemon, const std::string& path) {
  net::HttpClient http(daemon.admin_url());
  auto r = http.request("GET", path);
  REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));
  return r->status;
}

const char* const kSite = R"(
[site]
site_name = "Limits test"

[[catalog]]
name = "desktops"
session_support = "SingleSession"

[[delivery_group]]
name = "desktops-group"

[[machine]]
name = "TEST\\vm-{n}"
count = 3
catalog = "desktops"
delivery_group = "desktops-group"
)";

}  // namespace

TEST_CASE("limits: a flood of idle connections on the XML port leaves the admin port answering") {
  TempDir dir;
  Daemon daemon(dir);
  // first_request_timeout_seconds: the flood stays for the whole test.
  REQUIRE_MESSAGE(daemon.start(limits_config(dir, "max_connections = 10\nfirst_request_timeout_seconds = 600\n", "")),
                  daemon.log());
  // At start brokerd reports the descriptor limit and the caps it derived from it.
  CHECK(daemon.log().find("file descriptors: limit ") != std::string::npos);
  CHECK(daemon.log().find("connection caps: xml 10 ") != std::string::npos);

  // 30 idle connections from one client: the first 10 are held, the others closed at accept.
  std::vector<std::unique_ptr<RawSocket>> flood;
  for (int i = 0; i < 30; ++i) flood.push_back(std::make_unique<RawSocket>(daemon.xml_port()));
  CHECK(poll<double>(
            [&] {
              return metric(daemon, R"(broker_connections_refused_total{listener="xml",reason="max_connections"})");
            },
            20) == 20);
  for (std::size_t i = 10; i < flood.size(); ++i) CHECK(flood[i]->wait_closed_by_peer());
  CHECK(poll<double>([&] { return metric(daemon, R"(broker_http_connections{listener="xml"})"); }, 10) == 10);

  // The operator still reaches /healthz and the API.
  CHECK(admin_get(daemon, "/healthz") == 200);
  Api api(daemon);
  CHECK(api.call("GET", "/api/v1/machines").status == 200);
  // A held connection of the flood is an established connection: it is still served.
  flood[0]->send("POST /scripts/wpnbr.dll HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
  CHECK(flood[0]->read_response().starts_with("HTTP/1.1 "));

  // Once the flood ends the XML port takes new connections again.
  flood.clear();
  CHECK(poll<bool>(
      [&] {
        net::HttpClient http("http://127.0.0.1:" + std::to_string(daemon.xml_port()));
        auto r = http.request("POST", "/scripts/wpnbr.dll", "<x/>", {{"Content-Type", "text/xml"}});
        return r.has_value();
      },
      true));
  CHECK(daemon.stop() == 0);
}

TEST_CASE("limits: an agent over the agent listener's cap is rejected BrokerRegistrationLimitReached") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(limits_config(dir, "", "max_connections = 2\n", kSite)), daemon.log());
  Api api(daemon);
  vda::Fleet fleet(fleet_options(daemon));
  auto one = fleet.add(with_secret(machine_config("TEST\\vm-1", "desktops", 1), api.new_secret("TEST\\vm-1")));
  auto two = fleet.add(with_secret(machine_config("TEST\\vm-2", "desktops", 2), api.new_secret("TEST\\vm-2")));
  fleet.start();
  REQUIRE_MESSAGE(registered(one), describe(one));
  REQUIRE_MESSAGE(registered(two), describe(two));

  // A third agent, with a right proof: challenge, hello, then the documented rejection, not a
  // hang in the TCP or WebSocket stage.
  const std::string secret = api.new_secret("TEST\\vm-3");
  net::WebSocketClientPool pool(1);
  vda::RawConnection raw(pool, url(daemon));
  REQUIRE_MESSAGE(raw.wait_open(kWait), raw.failure());
  auto first = raw.next(kWait);
  REQUIRE(first.has_value());
  auto challenge = cbp::parse(*first);
  REQUIRE(challenge.has_value());
  REQUIRE(std::holds_alternative<cbp::Challenge>(*challenge));
  cbp::Hello h;
  h.machine = "TEST\\vm-3";
  h.versions = {1};
  h.agent_version = "limits-test/1";
  h.proof = cbp::compute_proof(common::crypto::sha256_hex(secret), std::get<cbp::Challenge>(*challenge).nonce,
                               h.machine, h.versions);
  h.agent_nonce = cbp::make_nonce();
  raw.send(cbp::serialize(h));
  auto answer_text = raw.next(kWait);
  REQUIRE(answer_text.has_value());
  auto answer = cbp::parse(*answer_text);
  REQUIRE(answer.has_value());
  REQUIRE_MESSAGE(std::holds_alternative<cbp::Rejected>(*answer), *answer_text);
  const auto& rejected = std::get<cbp::Rejected>(*answer);
  CHECK(rejected.reason == cbp::Reason::broker_registration_limit_reached);
  CHECK(rejected.retry_after_seconds >= 60);
  CHECK(rejected.retry_after_seconds <= 120);
  CHECK(raw.wait_closed(kWait));

  // The registered agents were not touched, and nothing was recorded on the refused machine.
  CHECK(api.machine_field("TEST\\vm-1", "registration_state") == "Registered");
  CHECK(api.machine_field("TEST\\vm-2", "registration_state") == "Registered");
  CHECK(api.machine_field("TEST\\vm-3", "registration_state") == "Unregistered");
  CHECK(api.machine_field("TEST\\vm-3", "last_deregistration_reason").empty());
  CHECK(metric(daemon, R"(broker_connections_over_limit_total{listener="agent"})") == 1);
  CHECK(metric(daemon, R"(broker_cbp_events_total{event="hello",result="limit_reached"})") == 1);

  // With a place free again, the third machine registers.
  one.stop();
  CHECK(poll<double>([&] { return metric(daemon, R"(broker_websocket_connections{listener="agent"})"); }, 1) == 1);
  auto three = fleet.add(with_secret(machine_config("TEST\\vm-3", "desktops", 3), secret));
  three.start();
  CHECK_MESSAGE(registered(three), describe(three));
  CHECK(await_machine(api, "TEST\\vm-3", "registration_state", "Registered") == "Registered");
  CHECK(daemon.stop() == 0);
}
