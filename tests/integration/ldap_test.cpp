// Integration: brokerd with [directory] backend = "ldap" against a real slapd
// (tests/integration/slapd.hpp). An LDAP user entitled through a group three levels up logs on
// with a password over NFuse, enumerates and launches a desktop on a reference agent; the
// directory goes away mid-run (service-unavailable, never failed-credentials; cached logons go
// on; /readyz and /metrics say so) and comes back; `brokerctl directory test` prints the user.
#include "common/crypto.hpp"
#include "net/http_client.hpp"
#include "tests/integration/daemon.hpp"
#include "tests/integration/slapd.hpp"
#include "tests/integration/support.hpp"

#include <doctest/doctest.h>

#include <regex>
#include <string>

using itest::Daemon;
using itest::Slapd;
using itest::TempDir;
using namespace itest::support;

namespace {

const std::string kEnrollKey = "ldap-test-enrollment-key";

// `group_lookup`: the [directory] key's value; empty: the ad profile's default.
std::string site_config(const TempDir& dir, const Slapd& slapd, const std::string& group_lookup = {}) {
  dir.write("ldap-password", std::string(Slapd::kBindPassword) + "\n");
  std::string c = R"toml(
[directory]
backend = "ldap"
profile = "ad"
)toml" + (group_lookup.empty() ? std::string() : "group_lookup = \"" + group_lookup + "\"\n") +
                  R"toml(
servers = [")toml" +
                  slapd.uri() + R"toml("]
start_tls = false
bind_dn = ")toml" +
                  Slapd::kBindDn + R"toml("
bind_password_file = ")toml" +
                  dir.file("ldap-password") + R"toml("
base_dn = ")toml" +
                  Slapd::kBaseDn + R"toml("
domain = "CORP"
user_filter = "(objectClass=user)"
lockout_duration_seconds = 0
reconnect_max_seconds = 1
network_timeout_ms = 2000

[site]
site_name = "LDAP test"
credential_cache_seconds = 0

[[catalog]]
name = "pool"
allocation_type = "Random"
session_support = "SingleSession"
enrollment_key_hash = ")toml" +
                  common::crypto::sha256_hex(kEnrollKey) + R"toml("

[[delivery_group]]
name = "Engineering Desktops"
desktop_kind = "Shared"
delivery_type = "DesktopsOnly"
session_support = "SingleSession"

[[machine]]
name = "CORP\\vm-1"
catalog = "pool"
delivery_group = "Engineering Desktops"

[[rule]]
name = "Engineering access"
rule_type = "access"
delivery_group = "Engineering Desktops"
included_users = ["CORP\\Desktop Users"]

[[rule]]
name = "Engineering"
rule_type = "entitlement"
delivery_group = "Engineering Desktops"
included_users = ["S-1-5-21-1004336348-1177238915-682003330-1201"]
)toml";
  return itest::base_config(dir, c);
}

std::string credentials(const std::string& user, const std::string& password) {
  return "<Credentials><UserName>" + user + "</UserName><Password encoding=\"cleartext\">" + password +
         "</Password><Domain type=\"NT\">CORP</Domain></Credentials>";
}

std::string validate(const std::string& user, const std::string& password) {
  return R"(<?xml version="1.0"?><NFuseProtocol version="5.0"><RequestValidateCredentials>)" +
         credentials(user, password) + "</RequestValidateCredentials></NFuseProtocol>";
}

std::string app_data(const std::string& user, const std::string& password) {
  return R"(<?xml version="1.0" encoding="UTF-8"?><NFuseProtocol version="5.0"><RequestAppData>
<Scope traverse="subtree"/><DesiredDetails>defaults</DesiredDetails><ServerType>all</ServerType>
<ClientType>ica30</ClientType>)" +
         credentials(user, password) + "<ClientName>WI_test</ClientName></RequestAppData></NFuseProtocol>";
}

std::string address(const std::string& user, const std::string& password, const std::string& app) {
  return R"(<?xml version="1.0" encoding="UTF-8"?><NFuseProtocol version="5.1"><RequestAddress><Name><AppName>)" + app +
         R"(</AppName></Name><ClientName>PC-1</ClientName><ClientAddress addresstype="dot">192.0.2.10</ClientAddress>
<ServerAddress addresstype="dot-port"/><Flags><IncludeTicket/></Flags>)" +
         credentials(user, password) + "</RequestAddress></NFuseProtocol>";
}

std::string element(const std::string& body, const std::string& name) {
  const std::regex re("<" + name + "(?: [^>]*)?>([^<]*)</" + name + ">");
  std::smatch m;
  return std::regex_search(body, m, re) ? m[1].str() : std::string();
}

bool has(const std::string& body, const std::string& what) { return body.find(what) != std::string::npos; }

// An NFuse request to the broker's XML service: the reply's body.
std::string post_xml(net::HttpClient& xml, const std::string& body) {
  auto r = xml.request("POST", "/scripts/wpnbr.dll", body, {{"Content-Type", "text/xml"}});
  REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));
  return r->body;
}

// Starts the site's machine, CORP\\vm-1 (address 10.99.0.1:1494), on `fleet` and waits until the
// broker has it registered.
void register_vm(vda::Fleet& fleet, Api& api) {
  vda::MachineConfig mc;
  mc.name = "CORP\\vm-1";
  mc.catalog = "pool";
  mc.enroll_key = kEnrollKey;
  mc.address = "10.99.0.1:1494";
  auto machine = fleet.add(mc);
  fleet.start();
  REQUIRE_MESSAGE(registered(machine), describe(machine));
  REQUIRE(await_machine(api, "CORP\\vm-1", "registration_state", "Registered") == "Registered");
}

}  // namespace

TEST_CASE("ldap end to end: nested-group entitlement, logon, enumeration, launch; outage and recovery") {
  Slapd slapd;
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(site_config(dir, slapd)), daemon.log());
  Api api(daemon);
  net::HttpClient xml("http://127.0.0.1:" + std::to_string(daemon.xml_port()));
  const auto post = [&](const std::string& body) { return post_xml(xml, body); };

  vda::Fleet fleet(fleet_options(daemon));
  register_vm(fleet, api);

  // alice is in Kernel Team < Platform < Engineering < Desktop Users: the access rule names
  // Desktop Users, the entitlement Engineering by its SID.
  const auto apps = post(app_data("alice", "alice-pass"));
  CHECK_MESSAGE(has(apps, "<InName>Engineering</InName>"), apps);
  CHECK(has(apps, "<FName>Engineering Desktops</FName>"));
  const auto launch = post(address("alice", "alice-pass", "Engineering"));
  CHECK_MESSAGE(element(launch, "ErrorId").empty(), launch);
  CHECK(element(launch, "ServerAddress") == "10.99.0.1:1494");
  CHECK_FALSE(element(launch, "Ticket").empty());
  // bob is in Desktop Users only: access, but no entitlement.
  const auto bob_apps = post(app_data("bob", "bob-pass"));
  CHECK(element(bob_apps, "ErrorId").empty());
  CHECK_FALSE(has(bob_apps, "<InName>Engineering</InName>"));
  // Credential outcomes come through as NFuse ErrorIds.
  CHECK(element(post(validate("alice", "wrong")), "ErrorId") == "failed-credentials");
  CHECK(element(post(validate("carol", "carol-pass")), "ErrorId") == "account-disabled");
  CHECK(element(post(validate("grace", "grace-pass")), "ErrorId") == "account-locked-out");
  CHECK(element(post(validate("erin", "erin-pass")), "ErrorId") == "must-change-credentials");
  CHECK(element(post(validate("dave", "dave-pass")), "ErrorId") == "expired-credentials");

  // brokerctl directory test: identity and groups.
  auto ctl = itest::run_command(
      {BROKERCTL_PATH, "--url", daemon.admin_url(), "--token", itest::kToken, "directory", "test", "CORP\\alice"});
  CHECK_MESSAGE(ctl.exit_code == 0, ctl.err);
  CHECK(has(ctl.out, "CORP\\alice"));
  CHECK(has(ctl.out, "groups (6)"));
  CHECK(has(ctl.out, "CORP\\Desktop Users"));
  CHECK(has(ctl.out, "S-1-5-21-1004336348-1177238915-682003330-1200"));
  auto missing = itest::run_command(
      {BROKERCTL_PATH, "--url", daemon.admin_url(), "--token", itest::kToken, "directory", "test", "nobody"});
  CHECK(missing.exit_code == 1);
  auto status = api.get("/api/v1/directory");
  REQUIRE(status);
  CHECK(text(*status, "backend") == "ldap");
  CHECK(text(*status, "reachable") == "true");

  // The directory goes away.
  slapd.kill();
  // judy has not logged on before: the broker cannot check her password.
  const auto unavailable =
      poll<std::string>([&] { return element(post(validate("judy", "judy-pass")), "ErrorId"); }, "service-unavailable");
  CHECK(unavailable == "service-unavailable");
  // A wrong password cannot be told from here: service-unavailable, never failed-credentials.
  CHECK(element(post(validate("alice", "wrong")), "ErrorId") == "service-unavailable");
  // alice logged on a moment ago with this password: she keeps enumerating from the cache.
  const auto cached = post(app_data("alice", "alice-pass"));
  CHECK_MESSAGE(has(cached, "<InName>Engineering</InName>"), cached);
  // /readyz and /metrics say so.
  net::HttpClient admin(daemon.admin_url());
  auto ready = admin.request("GET", "/readyz", "", {{"Authorization", std::string("Bearer ") + itest::kToken}});
  REQUIRE(ready.has_value());
  CHECK_MESSAGE(has(ready->body, "\"directory\":\"unreachable"), ready->body);
  auto metrics = admin.request("GET", "/metrics", "", {});
  REQUIRE(metrics.has_value());
  CHECK(has(metrics->body, "\nbroker_directory_up 0"));
  CHECK(has(daemon.log(), "directory: unreachable"));

  // It comes back: logons work again (after the reconnect back-off, at most 1 s here).
  slapd.start();
  const auto back = poll<std::string>([&] { return element(post(validate("judy", "judy-pass")), "ErrorId"); }, "");
  CHECK(back == "");
  CHECK(element(post(validate("alice", "wrong")), "ErrorId") == "failed-credentials");
  metrics = admin.request("GET", "/metrics", "", {});
  REQUIRE(metrics.has_value());
  CHECK(has(metrics->body, "\nbroker_directory_up 1"));
}

TEST_CASE("ldap end to end, group_lookup = token_groups: groups from tokenGroups SIDs, logon, enumeration, launch") {
  // tests/data/ldap stores on each user the tokenGroups values AD would compute (slapd cannot):
  // alice's six group SIDs and the primary group's (513), which names no entry here.
  Slapd slapd;
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(site_config(dir, slapd, "token_groups")), daemon.log());
  Api api(daemon);
  net::HttpClient xml("http://127.0.0.1:" + std::to_string(daemon.xml_port()));
  const auto post = [&](const std::string& body) { return post_xml(xml, body); };

  auto ctl = itest::run_command(
      {BROKERCTL_PATH, "--url", daemon.admin_url(), "--token", itest::kToken, "directory", "test", "CORP\\alice"});
  CHECK_MESSAGE(ctl.exit_code == 0, ctl.err);
  CHECK_MESSAGE(has(ctl.out, "groups (6)"), ctl.out);
  for (const char* g : {"CORP\\Cycle A", "CORP\\Cycle B", "CORP\\Desktop Users", "CORP\\Engineering",
                        "CORP\\Kernel Team", "CORP\\Platform"})
    CHECK_MESSAGE(has(ctl.out, g), g);
  CHECK(has(ctl.out, "S-1-5-21-1004336348-1177238915-682003330-1200"));
  CHECK(has(ctl.out, "S-1-5-21-1004336348-1177238915-682003330-1211"));
  CHECK(has(ctl.out, "S-1-5-21-1004336348-1177238915-682003330-513"));  // SID only: no such group entry

  vda::Fleet fleet(fleet_options(daemon));
  register_vm(fleet, api);

  // Access through Desktop Users, entitlement through Engineering's SID: both only in alice's
  // tokenGroups, not in her memberOf (which names Kernel Team and Cycle A).
  const auto apps = post(app_data("alice", "alice-pass"));
  CHECK_MESSAGE(has(apps, "<InName>Engineering</InName>"), apps);
  const auto launch = post(address("alice", "alice-pass", "Engineering"));
  CHECK_MESSAGE(element(launch, "ErrorId").empty(), launch);
  CHECK(element(launch, "ServerAddress") == "10.99.0.1:1494");
  const auto bob_apps = post(app_data("bob", "bob-pass"));
  CHECK(element(bob_apps, "ErrorId").empty());
  CHECK_FALSE(has(bob_apps, "<InName>Engineering</InName>"));
  CHECK(element(post(validate("alice", "wrong")), "ErrorId") == "failed-credentials");
  CHECK(element(post(validate("dave", "dave-pass")), "ErrorId") == "expired-credentials");
}

TEST_CASE("ldap: a broker started while its directory is down starts, reports it, and recovers") {
  Slapd slapd;
  slapd.kill();
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(site_config(dir, slapd)), daemon.log());
  net::HttpClient xml("http://127.0.0.1:" + std::to_string(daemon.xml_port()));
  const auto validate_bob = [&] {
    auto r = xml.request("POST", "/scripts/wpnbr.dll", validate("bob", "bob-pass"), {{"Content-Type", "text/xml"}});
    REQUIRE(r.has_value());
    return element(r->body, "ErrorId");
  };
  CHECK(validate_bob() == "service-unavailable");
  CHECK(has(daemon.log(), "not reachable at start"));
  slapd.start();
  CHECK(poll<std::string>(validate_bob, "") == "");
}
