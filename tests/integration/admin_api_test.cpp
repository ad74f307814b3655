// Integration tests: the real brokerd, started on free ports with a temporary database, used
// over HTTP as an admin (and through brokerctl) would.
#include "tests/integration/daemon.hpp"

#include "net/http_client.hpp"

#include <boost/json.hpp>
#include <doctest/doctest.h>

#include <fstream>
#include <sstream>

namespace json = boost::json;
using itest::Daemon;
using itest::TempDir;

namespace {

const char* kSite = R"(
[site]
site_name = "Test site"

[[hypervisor_connection]]
name = "sim"
driver = "simulated"

[[catalog]]
name = "cfg-cat"
hypervisor_connection = "sim"

[[delivery_group]]
name = "cfg-group"

[[machine]]
name = "TEST\\cfg-{n}"
count = COUNT
catalog = "cfg-cat"
delivery_group = "cfg-group"
)";

std::string site_config(int machines) {
  std::string s = kSite;
  s.replace(s.find("COUNT"), 5, std::to_string(machines));
  return s;
}

struct Api {
  net::HttpClient http;
  explicit Api(const Daemon& d) : http(d.admin_url()) {}

  net::ClientResponse call(const std::string& method, const std::string& target, const std::string& body = {},
                           const char* token = itest::kToken) {
    std::vector<std::pair<std::string, std::string>> h;
    if (token) h.emplace_back("Authorization", std::string("Bearer ") + token);
    if (!body.empty()) h.emplace_back("Content-Type", "application/json");
    auto r = http.request(method, target, body, h);
    REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));
    return *r;
  }
  json::object obj(const net::ClientResponse& r) {
    auto v = json::parse(r.body);
    REQUIRE(v.is_object());
    return v.as_object();
  }
};

std::string error_field(const json::object& body) {
  const auto& e = body.at("error").as_object();
  if (!e.contains("fields")) return {};
  return std::string(e.at("fields").as_array().at(0).as_object().at("field").as_string());
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

TEST_CASE("admin API: auth, CRUD, validation, conflicts, audit, metrics, and data survives a restart") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config(3))), daemon.log());
  Api api(daemon);

  // Health needs no token; everything else does.
  auto health = api.call("GET", "/healthz", {}, nullptr);
  CHECK(health.status == 200);
  CHECK(health.body == "ok\n");
  auto no_token = api.call("GET", "/api/v1/machines", {}, nullptr);
  CHECK(no_token.status == 401);
  CHECK(no_token.headers["www-authenticate"] == "Bearer");
  CHECK(api.obj(no_token).at("error").at("code").as_string() == "unauthorized");
  CHECK(api.call("GET", "/api/v1/machines", {}, "wrong-token").status == 401);
  CHECK(api.call("GET", "/readyz", {}, nullptr).status == 401);  // not in unauthenticated_paths here

  // The config file's objects are there and marked as owned by it.
  auto machines = api.call("GET", "/api/v1/machines");
  REQUIRE(machines.status == 200);
  auto page = api.obj(machines);
  CHECK(page.at("total").as_int64() == 3);
  CHECK(page.at("items").as_array().at(0).at("name").as_string() == "TEST\\cfg-1");
  CHECK(page.at("items").as_array().at(0).at("config_owned").as_bool());
  CHECK(page.at("items").as_array().at(0).at("registration_state").as_string() == "Unregistered");

  // Create, duplicate, validation errors with field names, unknown references.
  auto created = api.call("POST", "/api/v1/catalogs", R"({"name":"api-cat","allocation_type":"Static"})");
  CHECK(created.status == 201);
  CHECK(created.headers["location"] == "/api/v1/catalogs/api-cat");
  CHECK(api.obj(created).at("owner").as_string() == "api");
  auto dup = api.call("POST", "/api/v1/catalogs", R"({"name":"api-cat"})");
  CHECK(dup.status == 409);
  auto bad_enum = api.call("POST", "/api/v1/catalogs", R"({"name":"x","allocation_type":"Sometimes"})");
  CHECK(bad_enum.status == 400);
  CHECK(error_field(api.obj(bad_enum)) == "allocation_type");
  auto bad_ref = api.call("POST", "/api/v1/machines", R"({"name":"m0","catalog":"nope"})");
  CHECK(bad_ref.status == 400);
  CHECK(error_field(api.obj(bad_ref)) == "catalog");
  CHECK(api.call("POST", "/api/v1/machines", "not json").status == 400);
  CHECK(api.call("POST", "/api/v1/machines", R"({"catalog":"api-cat"})").status == 400);  // no name
  auto bad_type = api.call("POST", "/api/v1/delivery-groups", R"({"name":"g","enabled":"yes"})");
  CHECK(bad_type.status == 400);
  CHECK(error_field(api.obj(bad_type)) == "enabled");

  REQUIRE(api.call("POST", "/api/v1/delivery-groups", R"({"name":"api-group"})").status == 201);
  REQUIRE(api.call("POST", "/api/v1/machines",
                   R"({"name":"TEST\\m1","catalog":"api-cat","delivery_group":"api-group","tags":["gpu"]})")
              .status == 201);
  auto in_use = api.call("DELETE", "/api/v1/delivery-groups/api-group");
  CHECK(in_use.status == 409);
  CHECK(api.obj(in_use).at("error").at("message").as_string().find("TEST\\m1") != json::string::npos);
  CHECK(api.call("GET", "/api/v1/machines/nope").status == 404);
  CHECK(api.call("GET", "/api/v1/nonsense").status == 404);
  auto got = api.call("GET", "/api/v1/machines/TEST%5Cm1");
  CHECK(got.status == 200);
  CHECK(api.obj(got).at("tags").as_array().at(0).as_string() == "gpu");

  // State fields are the broker's; config-owned objects refuse changes but allow maintenance mode.
  auto state = api.call("PATCH", "/api/v1/machines/TEST%5Cm1", R"({"registration_state":"Registered"})");
  CHECK(state.status == 400);
  CHECK(error_field(api.obj(state)) == "registration_state");
  auto owned = api.call("PATCH", "/api/v1/machines/TEST%5Ccfg-1", R"({"tags":["x"]})");
  CHECK(owned.status == 409);
  CHECK(api.obj(owned).at("error").at("message").as_string().find(daemon.config_path()) != json::string::npos);
  CHECK(api.call("DELETE", "/api/v1/machines/TEST%5Ccfg-2").status == 409);
  auto maint = api.call("PATCH", "/api/v1/machines/TEST%5Ccfg-1", R"({"in_maintenance_mode":true})");
  CHECK(maint.status == 200);
  CHECK(api.obj(maint).at("maintenance_mode_reason").as_string() == "Administrator");

  // Filters and pagination.
  auto filtered = api.obj(api.call("GET", "/api/v1/machines?delivery_group=cfg-group&limit=2"));
  CHECK(filtered.at("total").as_int64() == 3);
  CHECK(filtered.at("items").as_array().size() == 2);
  CHECK(api.obj(api.call("GET", "/api/v1/machines?tags=gpu")).at("total").as_int64() == 1);
  CHECK(api.obj(api.call("GET", "/api/v1/machines?in_maintenance_mode=true")).at("total").as_int64() == 1);
  CHECK(api.call("GET", "/api/v1/machines?colour=red").status == 400);
  CHECK(api.call("GET", "/api/v1/machines?limit=abc").status == 400);

  // Users: write-only password, never shown.
  auto short_pw = api.call("POST", "/api/v1/users", R"({"name":"eve","password":"short"})");
  CHECK(short_pw.status == 400);
  CHECK(error_field(api.obj(short_pw)) == "password");
  auto eve = api.call("POST", "/api/v1/users", R"({"name":"eve","password":"long-enough-pw","domain":"TEST"})");
  CHECK(eve.status == 201);
  CHECK(eve.body.find("password_hash") == std::string::npos);
  CHECK(eve.body.find("long-enough-pw") == std::string::npos);
  CHECK(api.obj(eve).contains("must_change_password"));
  // Names are compared without regard to case: EVE would be eve to the directory and the engine.
  auto upper = api.call("POST", "/api/v1/users", R"({"name":"EVE","password":"other-long-pw","domain":"TEST"})");
  CHECK(upper.status == 409);
  CHECK_MESSAGE(upper.body.find("a user named 'eve' already exists") != std::string::npos, upper.body);
  auto upper_cat = api.call("POST", "/api/v1/catalogs", R"({"name":"API-CAT"})");
  CHECK(upper_cat.status == 409);
  CHECK(upper_cat.body.find("'api-cat'") != std::string::npos);

  // Assignments: only in Private groups; deleting one undoes it.
  auto shared_assign = api.call("POST", "/api/v1/assignments", R"({"machine":"TEST\\m1","user":"eve"})");
  CHECK(shared_assign.status == 400);
  REQUIRE(api.call("POST", "/api/v1/delivery-groups", R"({"name":"private","desktop_kind":"Private"})").status == 201);
  REQUIRE(api.call("POST", "/api/v1/machines", R"({"name":"TEST\\p1","catalog":"api-cat","delivery_group":"private"})")
              .status == 201);
  CHECK(api.call("POST", "/api/v1/assignments", R"({"machine":"TEST\\p1"})").status == 400);
  auto assigned = api.call("POST", "/api/v1/assignments", R"({"machine":"TEST\\p1","user":"TEST\\eve"})");
  REQUIRE(assigned.status == 201);
  const std::string assignment = std::string(api.obj(assigned).at("name").as_string());
  CHECK(api.call("DELETE", "/api/v1/assignments/" + assignment).status == 204);
  CHECK(api.call("GET", "/api/v1/assignments/" + assignment).status == 404);

  // Agent secrets: shown once, only their hash is stored, never shown again.
  auto secret = api.call("POST", "/api/v1/machines/TEST%5Ccfg-2/secret");
  CHECK(secret.status == 200);
  const auto secret_text = std::string(api.obj(secret).at("secret").as_string());
  CHECK(secret_text.size() == 64);
  CHECK(api.call("GET", "/api/v1/machines/TEST%5Ccfg-2").body.find(secret_text) == std::string::npos);
  CHECK(api.call("GET", "/api/v1/machines/TEST%5Ccfg-2/secret").status == 405);
  CHECK(api.call("POST", "/api/v1/machines/nope/secret").status == 404);

  // Read-only kinds.
  CHECK(api.obj(api.call("GET", "/api/v1/sessions")).at("total").as_int64() == 0);
  CHECK(api.call("POST", "/api/v1/sessions", "{}").status == 405);
  CHECK(api.call("GET", "/api/v1/power-actions").status == 200);

  // Site settings are declared in the file here, so they are read-only.
  auto site = api.obj(api.call("GET", "/api/v1/site"));
  CHECK(site.at("site_name").as_string() == "Test site");
  CHECK(api.call("PATCH", "/api/v1/site", R"({"site_name":"Other"})").status == 409);

  // The audit log names the token, with before and after.
  auto audit = api.obj(api.call("GET", "/api/v1/audit?kind=machine&object=TEST%5Ccfg-1"));
  REQUIRE(!audit.at("items").as_array().empty());
  const auto& last = audit.at("items").as_array().at(0).as_object();
  CHECK(last.at("actor").as_string() == "token:tester");
  CHECK(last.at("action").as_string() == "update");
  CHECK(last.at("before").at("in_maintenance_mode").as_bool() == false);
  CHECK(last.at("after").at("in_maintenance_mode").as_bool() == true);

  // Metrics are served without a token here (unauthenticated_paths), in Prometheus text.
  auto metrics = api.call("GET", "/metrics", {}, nullptr);
  CHECK(metrics.status == 200);
  CHECK(metrics.headers["content-type"].find("text/plain") == 0);
  CHECK(metrics.body.find("broker_machines{registration_state=\"Unregistered\"} 5") != std::string::npos);
  CHECK(metrics.body.find("broker_http_requests_total{") != std::string::npos);
  CHECK(metrics.body.find("broker_storage_commit_seconds_count") != std::string::npos);
  auto ready = api.call("GET", "/readyz");
  CHECK(ready.status == 200);
  CHECK(api.obj(ready).at("ready").as_bool());

  // The XML and agent listeners are real listeners.
  net::HttpClient xml("http://127.0.0.1:" + std::to_string(daemon.xml_port()));
  auto nfuse = xml.request("POST", "/scripts/wpnbr.dll", "<NFuseProtocol/>");
  REQUIRE(nfuse.has_value());
  CHECK(nfuse->status == 400);  // XML, but no request in it
  net::HttpClient agent("http://127.0.0.1:" + std::to_string(daemon.agent_port()));
  auto cbp = agent.request("GET", "/");
  REQUIRE(cbp.has_value());
  CHECK(cbp->status == 501);

  // Graceful stop, restart on the same database: everything is still there.
  CHECK(daemon.stop() == 0);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config(3))), daemon.log());
  Api again(daemon);
  CHECK(again.call("GET", "/api/v1/catalogs/api-cat").status == 200);
  CHECK(again.call("GET", "/api/v1/users/eve").status == 200);
  auto cfg1 = again.obj(again.call("GET", "/api/v1/machines/TEST%5Ccfg-1"));
  CHECK(cfg1.at("in_maintenance_mode").as_bool());  // an operational change survives reconciliation
  CHECK(again.obj(again.call("GET", "/api/v1/machines")).at("total").as_int64() == 5);

  // Dropping a machine from the file removes it at the next start; the API's objects stay.
  CHECK(daemon.stop() == 0);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config(2))), daemon.log());
  Api third(daemon);
  CHECK(third.call("GET", "/api/v1/machines/TEST%5Ccfg-3").status == 404);
  CHECK(third.call("GET", "/api/v1/machines/TEST%5Cm1").status == 200);
  auto deleted = third.obj(third.call("GET", "/api/v1/audit?object=TEST%5Ccfg-3&limit=1"));
  CHECK(deleted.at("items").as_array().at(0).at("action").as_string() == "delete");
  CHECK(deleted.at("items").as_array().at(0).at("actor").as_string().find("config:") == 0);
  CHECK(daemon.stop() == 0);
}

TEST_CASE("brokerctl lists, switches maintenance mode, and fails clearly") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config(2))), daemon.log());
  const std::map<std::string, std::string> env{{"OPENBROKER_URL", daemon.admin_url()},
                                               {"OPENBROKER_TOKEN", itest::kToken}};
  auto list = itest::run_command({BROKERCTL_PATH, "machine", "list"}, {}, env);
  CHECK(list.exit_code == 0);
  {
    // https: the token goes out only to a certificate checked against a CA, unless --insecure.
    const std::string https = "https://127.0.0.1:" + std::to_string(daemon.admin_port());
    auto unchecked = itest::run_command({BROKERCTL_PATH, "--url", https, "machine", "list"}, {}, env);
    CHECK(unchecked.exit_code == 2);
    CHECK_MESSAGE(unchecked.err.find("--ca-file") != std::string::npos, unchecked.err);
    auto no_ca = itest::run_command({BROKERCTL_PATH, "--url", https, "--ca-file", dir.file("no-such-ca.pem"), "machine", "list"},
                                    {}, env);
    CHECK(no_ca.exit_code == 3);
    CHECK_MESSAGE(no_ca.err.find("cannot load CA file") != std::string::npos, no_ca.err);
    auto insecure = itest::run_command({BROKERCTL_PATH, "--url", https, "--insecure", "machine", "list"}, {}, env);
    CHECK(insecure.exit_code == 3);  // accepted; the plain-HTTP listener does not speak TLS
  }
  CHECK(list.out.find("NAME") == 0);
  CHECK(list.out.find("TEST\\cfg-1") != std::string::npos);
  CHECK(list.out.find("TEST\\cfg-2") != std::string::npos);

  auto on = itest::run_command({BROKERCTL_PATH, "machine", "maintenance", "on", "TEST\\cfg-2"}, {}, env);
  CHECK(on.exit_code == 0);
  auto js = itest::run_command({BROKERCTL_PATH, "--json", "machine", "get", "TEST\\cfg-2"}, {}, env);
  CHECK(js.exit_code == 0);
  CHECK(json::parse(js.out).at("in_maintenance_mode").as_bool());

  auto group = itest::run_command({BROKERCTL_PATH, "group", "create", "Sales", "desktop_kind=Private"}, {}, env);
  CHECK(group.exit_code == 0);
  auto bad = itest::run_command({BROKERCTL_PATH, "group", "create", "Sales"}, {}, env);
  CHECK(bad.exit_code == 1);
  CHECK(bad.err.find("already exists") != std::string::npos);

  auto wrong = itest::run_command({BROKERCTL_PATH, "--token", "nope", "machine", "list"}, {}, env);
  CHECK(wrong.exit_code == 1);
  CHECK(wrong.err.find("not valid") != std::string::npos);
  auto usage = itest::run_command({BROKERCTL_PATH, "machine", "explode"}, {}, env);
  CHECK(usage.exit_code == 2);
  auto down = itest::run_command({BROKERCTL_PATH, "--url", "http://127.0.0.1:1", "machine", "list"}, {}, env);
  CHECK(down.exit_code == 3);
  CHECK(daemon.stop() == 0);
}

TEST_CASE("a broken config is reported with its line and never starts the daemon") {
  TempDir dir;
  dir.write("broken.toml", itest::base_config(dir, "\n[[catalog]]\nname = \"c\"\nallocation_type = \"Sometimes\"\n"));
  auto check = itest::run_command({BROKERD_PATH, "--check-config", dir.file("broken.toml")});
  CHECK(check.exit_code != 0);
  CHECK(check.err.find("broken.toml:") != std::string::npos);
  CHECK(check.err.find("allocation_type") != std::string::npos);

  dir.write("good.toml", itest::base_config(dir));
  auto good = itest::run_command({BROKERD_PATH, "--check-config", dir.file("good.toml")});
  CHECK(good.exit_code == 0);

  Daemon daemon(dir);
  CHECK_FALSE(daemon.start(itest::base_config(dir, "\n[[catalog]]\nname = \"c\"\ncolour = \"red\"\n")));
  CHECK(daemon.log().find("colour") != std::string::npos);
  std::ifstream db(dir.file("broker.db"));
  CHECK_FALSE(db.good());  // nothing was created
}

TEST_CASE("a corrupt database is refused and left untouched") {
  TempDir dir;
  const std::string garbage(8192, '\x5a');
  dir.write("broker.db", garbage);
  Daemon daemon(dir);
  CHECK_FALSE(daemon.start(itest::base_config(dir)));
  CHECK(daemon.log().find("broker.db") != std::string::npos);
  CHECK(slurp(dir.file("broker.db")) == garbage);
}

TEST_CASE("brokerd --version and a port in use") {
  auto v = itest::run_command({BROKERD_PATH, "--version"});
  CHECK(v.exit_code == 0);
  CHECK(v.out.find("brokerd ") == 0);

  TempDir dir;
  Daemon first(dir);
  REQUIRE_MESSAGE(first.start(itest::base_config(dir)), first.log());
  TempDir dir2;
  std::string clash = itest::base_config(dir2);
  clash.replace(clash.find("[listeners.admin]\nport = 0"), 26,
                "[listeners.admin]\nport = " + std::to_string(first.admin_port()));
  Daemon second(dir2);
  CHECK_FALSE(second.start(clash));
  CHECK(second.log().find("admin listener") != std::string::npos);
  CHECK(first.stop() == 0);
}
