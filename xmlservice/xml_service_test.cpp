// The XML service in process: a real SQLite site (from TOML, as brokerd loads it), the built-in
// directory and the entitlement engine, driven with NFuse request bodies.
#include "xmlservice/xml_service.hpp"

#include "broker/engine.hpp"
#include "broker/site_objects.hpp"
#include "common/crypto.hpp"
#include "common/log.hpp"
#include "common/metrics.hpp"
#include "common/work_queue.hpp"
#include "config/config.hpp"
#include "identity/builtin_directory.hpp"
#include "identity/password_checks.hpp"
#include "storage/repository.hpp"
#include "xmlservice/ctx1.hpp"
#include "xmlservice/request_limits.hpp"

#include <doctest/doctest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <future>
#include <memory>
#include <sstream>
#include <thread>
#include <vector>

namespace {

std::string site_toml(bool trust) {
  const auto hash = [](const char* pw) { return common::crypto::hash_password(pw, 1000); };
  std::string t = R"(
[database]
path = ":memory:"
[[admin.token]]
name = "t"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
[site]
site_name = "Test Farm"
default_domain = "DEMO"
lockout_threshold = 3
expose_access_lists = true
trusted_front_ends = ["127.0.0.0/8"]
)";
  t += std::string("trust_xml_requests = ") + (trust ? "true" : "false") + "\n";
  t += R"(
[[catalog]]
name = "pool"
[[catalog]]
name = "rds"
session_support = "MultiSession"
[[delivery_group]]
name = "Desktops"
published_name = "Windows 11"
[[delivery_group]]
name = "Apps"
delivery_type = "AppsOnly"
session_support = "MultiSession"
[[application]]
name = "Notepad"
command_line_executable = "notepad.exe"
delivery_groups = ["Apps"]
client_folder = "Tools"
[[application]]
name = "Payroll"
command_line_executable = "pay.exe"
delivery_groups = ["Apps"]
user_filter_enabled = true
associated_users = ["DEMO\\Finance"]
[[rule]]
name = "desktops-access"
rule_type = "access"
delivery_group = "Desktops"
included_users = ["DEMO\\Domain Users"]
[[rule]]
name = "Win11"
rule_type = "entitlement"
delivery_group = "Desktops"
included_users = ["DEMO\\Staff"]
[[rule]]
name = "apps-access"
rule_type = "access"
delivery_group = "Apps"
allowed_users = "FilteredOrAnonymous"
included_users = ["DEMO\\Domain Users"]
[[rule]]
name = "apps"
rule_type = "app_entitlement"
delivery_group = "Apps"
included_user_filter_enabled = false
[[group]]
name = "Domain Users"
members = ["alice", "bob", "dave"]
[[group]]
name = "Finance"
members = ["alice"]
[[group]]
name = "Staff"
members = ["Finance"]
[[user]]
name = "alice"
upn = "alice@demo.test"
)";
  t += "password_hash = \"" + hash("alice-pass") + "\"\n";
  t += "[[user]]\nname = \"bob\"\npassword_hash = \"" + hash("bob-pass") + "\"\n";
  t += "[[user]]\nname = \"dave\"\ndisabled = true\npassword_hash = \"" + hash("dave-pass") + "\"\n";
  return t;
}

// What a test may change in the service it runs.
struct Setup {
  bool trust = false;
  identity::PasswordCheckPool* password_checks = nullptr;
  xmlservice::XmlServiceOptions xml;
  std::string extra_toml;  // appended to the site's TOML
};

struct Service {
  std::unique_ptr<storage::Repository> repo;
  std::unique_ptr<broker::SiteObjects> site;
  broker::Engine engine;  // attached to repo: kept in step with what the admin path commits
  common::ManualClock clock;
  std::unique_ptr<identity::BuiltinDirectory> directory;
  common::WorkQueue work{1};
  common::Metrics metrics;
  std::atomic<int> hashes{0};  // password hashes computed
  std::ostringstream log_text;
  std::unique_ptr<xmlservice::XmlService> xml;

  explicit Service(bool trust = false) : Service(Setup{trust, nullptr, {}}) {}
  explicit Service(Setup setup) {
    const bool trust = setup.trust;
    auto cfg = config::load_string(site_toml(trust) + setup.extra_toml, "test.toml");
    REQUIRE_MESSAGE(cfg.config.has_value(), (cfg.errors.empty() ? "" : cfg.errors[0].describe()));
    auto r = storage::open_sqlite({":memory:"});
    REQUIRE(r.has_value());
    repo = std::move(*r);
    site = std::make_unique<broker::SiteObjects>(*repo, common::null_logger());
    REQUIRE(site->reconcile("test.toml", cfg.config->site, cfg.config->objects).has_value());
    REQUIRE(engine.attach(*repo).has_value());
    identity::BuiltinDirectoryOptions o;
    o.dummy_hash_iterations = 1000;
    o.verify_password = [this](std::string_view pw, std::string_view enc) {
      ++hashes;
      return common::crypto::verify_password(pw, enc);
    };
    o.password_checks = setup.password_checks;
    directory = std::make_unique<identity::BuiltinDirectory>(*repo, clock, o);
    auto logger = std::make_shared<spdlog::logger>("test", std::make_shared<spdlog::sinks::ostream_sink_mt>(log_text));
    logger->set_pattern("%v");
    if (!setup.xml.clock) setup.xml.clock = &clock;
    xml = std::make_unique<xmlservice::XmlService>(*directory, engine, work, metrics, logger, nullptr, setup.xml);
  }

  net::HttpResponse post(const std::string& body, const std::string& from = "127.0.0.1") {
    net::HttpRequest req;
    req.method = "POST";
    req.path = "/scripts/wpnbr.dll";
    req.body = body;
    req.remote_address = from;
    return xml->process(req);
  }
};

std::string wrap(const std::string& inner, const std::string& encoding = "UTF-8") {
  return "<?xml version=\"1.0\" encoding=\"" + encoding +
         "\"?>\n<!DOCTYPE NFuseProtocol SYSTEM \"NFuse.dtd\">\n<NFuseProtocol version=\"5.0\">" + inner +
         "</NFuseProtocol>";
}

std::string creds(const std::string& user, const std::string& password, const std::string& domain = "DEMO") {
  return "<Credentials><UserName>" + user + "</UserName><Password encoding=\"cleartext\">" + password +
         "</Password><Domain type=\"NT\">" + domain + "</Domain></Credentials>";
}

std::string validate(const std::string& credentials) {
  return wrap("<RequestValidateCredentials>" + credentials +
              "<DesiredInfo>user-identity</DesiredInfo></RequestValidateCredentials>");
}

std::string appdata(const std::string& credentials, const std::string& extra = {}) {
  return wrap("<RequestAppData><Scope traverse=\"subtree\"/><DesiredDetails>defaults</DesiredDetails>"
              "<DesiredDetails>access-list</DesiredDetails><ServerType>all</ServerType><ClientType>ica30</ClientType>" +
              extra + credentials + "</RequestAppData>");
}

bool has(const net::HttpResponse& r, const std::string& s) { return r.body.find(s) != std::string::npos; }

}  // namespace

TEST_CASE("capabilities, farm data and the reply envelope") {
  Service s;
  auto caps = s.post(wrap("<RequestCapabilities><Nil/></RequestCapabilities>"));
  CHECK(caps.status == 200);
  CHECK(caps.content_type == "text/xml; charset=UTF-8");
  CHECK(caps.body.rfind("<?xml version=\"1.0\" encoding=\"UTF-8\"", 0) == 0);
  CHECK(has(caps, "<!DOCTYPE NFuseProtocol SYSTEM \"NFuse.dtd\">"));
  CHECK(has(caps, "<NFuseProtocol version=\"5.1\">"));
  CHECK(has(caps, "separate-credentials-validation"));
  CHECK_FALSE(has(caps, "launch-reference"));  // launch arrives with brokering; not advertised yet
  auto farm = s.post(wrap("<RequestServerFarmData><Nil/></RequestServerFarmData>", "ISO-8859-1"));
  CHECK(has(farm, "<ServerFarmName>Test Farm</ServerFarmName>"));
  CHECK(farm.body.rfind("<?xml version=\"1.0\" encoding=\"ISO-8859-1\"", 0) == 0);
  CHECK(has(s.post(wrap("<RequestServerData><ServerType>all</ServerType>" + creds("alice", "alice-pass") +
                        "</RequestServerData>")),
            "<ResponseServerData>"));
}

TEST_CASE("credential validation outcomes") {
  Service s;
  auto ok = s.post(validate(creds("alice", "alice-pass")));
  CHECK_FALSE(has(ok, "ErrorId"));
  CHECK(has(ok, "DEMO\\alice"));
  CHECK(has(ok, "alice@demo.test"));
  auto upn = s.post(validate("<Credentials><UserName>alice@demo.test</UserName><Password>alice-pass</Password></Credentials>"));
  CHECK_FALSE(has(upn, "ErrorId"));
  auto encoded = xmlservice::ctx1::encode("bob-pass");
  REQUIRE(encoded.has_value());
  auto ctx1 = s.post(validate("<Credentials><UserName>bob</UserName><Password encoding=\"ctx1\">" + *encoded +
                              "</Password><Domain type=\"NT\">DEMO</Domain></Credentials>"));
  CHECK_FALSE(has(ctx1, "ErrorId"));
  CHECK(has(s.post(validate(creds("alice", "wrong"))), "<ErrorId>failed-credentials</ErrorId>"));
  CHECK(has(s.post(validate(creds("nobody", "whatever"))), "<ErrorId>failed-credentials</ErrorId>"));
  CHECK(has(s.post(validate(creds("dave", "dave-pass"))), "<ErrorId>account-disabled</ErrorId>"));
  CHECK(has(s.post(validate("<Credentials><UserName>bob</UserName><Password encoding=\"ctx1\">ZZZ!</Password></Credentials>")),
            "<ErrorId>failed-credentials</ErrorId>"));
  CHECK(has(s.post(validate("")), "<ErrorId>failed-credentials</ErrorId>"));
  auto err = s.post(validate(creds("alice", "wrong")));
  CHECK(has(err, "<ResponseValidateCredentials>"));
}

TEST_CASE("lock-out after repeated failures, then even the right password is refused") {
  Service s;
  for (int i = 0; i < 3; ++i) CHECK(has(s.post(validate(creds("bob", "bad"))), "failed-credentials"));
  CHECK(has(s.post(validate(creds("bob", "bob-pass"))), "<ErrorId>account-locked-out</ErrorId>"));
  CHECK_FALSE(has(s.post(validate(creds("alice", "alice-pass"))), "ErrorId"));
}

TEST_CASE("enumeration follows entitlements") {
  Service s;
  auto alice = s.post(appdata(creds("alice", "alice-pass")));
  CHECK_FALSE(has(alice, "ErrorId"));
  CHECK(has(alice, "<InName>Win11</InName>"));
  CHECK(has(alice, "<FName>Windows 11</FName>"));
  CHECK(has(alice, "<InName>Notepad</InName>"));
  CHECK(has(alice, "<InName>Payroll</InName>"));
  CHECK(has(alice, "appisdesktop=\"true\""));
  CHECK(has(alice, "<AccessList>"));  // the site exposes access lists
  auto bob = s.post(appdata(creds("bob", "bob-pass")));
  CHECK(has(bob, "<InName>Notepad</InName>"));
  CHECK_FALSE(has(bob, "Payroll"));  // not in Finance
  CHECK_FALSE(has(bob, "Win11"));    // not in Staff
  auto anonymous = s.post(appdata("<Credentials><AnonymousUser/></Credentials>"));
  CHECK(has(anonymous, "<InName>Notepad</InName>"));  // FilteredOrAnonymous
  CHECK_FALSE(has(anonymous, "Win11"));
  auto filtered = s.post(appdata(creds("alice", "alice-pass"), "<AppName>Payroll</AppName>"));
  CHECK(has(filtered, "Payroll"));
  CHECK_FALSE(has(filtered, "Notepad"));
  auto icons = s.post(appdata(creds("bob", "bob-pass"), "<DesiredIconData size=\"32\" bpp=\"32\" format=\"png\"/>"));
  CHECK(has(icons, "<IconData size=\"32\" bpp=\"32\" format=\"png\">iVBORw0KGgo"));  // a PNG
  CHECK(has(s.post(appdata(creds("alice", "nope"))), "<ErrorId>failed-credentials</ErrorId>"));
}

TEST_CASE("pass-through needs trust and a trusted front end") {
  const std::string passthrough =
      validate("<Credentials><ID type=\"SAM\">DEMO\\alice</ID></Credentials>");
  Service off(false);
  CHECK(has(off.post(passthrough), "<ErrorId>not-trusted</ErrorId>"));
  Service on(true);
  auto trusted = on.post(passthrough, "127.0.0.1");
  CHECK_FALSE(has(trusted, "ErrorId"));
  CHECK(has(trusted, "DEMO\\alice"));
  CHECK(has(on.post(passthrough, "10.9.9.9"), "<ErrorId>not-trusted</ErrorId>"));
  CHECK(has(on.post(validate("<Credentials><ID type=\"SAM\">DEMO\\dave</ID></Credentials>")),
            "<ErrorId>account-disabled</ErrorId>"));
  CHECK(has(on.post(validate("<Credentials><ID type=\"SAM\">DEMO\\ghost</ID></Credentials>")),
            "<ErrorId>failed-credentials</ErrorId>"));
}

TEST_CASE("malformed requests, wrong endpoints, metrics") {
  Service s;
  CHECK(s.post("this is not xml").status == 400);
  CHECK(s.post("<?xml version=\"1.0\"?><html/>").status == 400);
  auto unknown = s.post(wrap("<RequestTeleport/>"));
  CHECK(unknown.status == 200);
  CHECK(has(unknown, "<ResponseTeleport>"));
  CHECK(has(unknown, "<ErrorId>unspecified</ErrorId>"));
  net::HttpRequest get;
  get.method = "GET";
  get.path = "/Scripts/WPnBr.dll";
  CHECK(s.xml->process(get).status == 405);
  get.method = "POST";
  get.path = "/other";
  CHECK(s.xml->process(get).status == 404);
  s.post(validate(creds("alice", "wrong")));
  const auto text = s.metrics.render();
  CHECK(text.find("broker_xml_requests_total{request=\"RequestValidateCredentials\",result=\"failed-credentials\"} 1") !=
        std::string::npos);
  CHECK(text.find("broker_xml_requests_total{request=\"invalid\",result=\"not_xml\"} 1") != std::string::npos);
}

TEST_CASE("over-long fields are refused before the directory is consulted, and logged short") {
  Service s;
  const std::string long_name(900 * 1024, 'n');
  auto r = s.post(validate(creds(long_name, "whatever")));
  CHECK(has(r, "<ErrorId>failed-credentials</ErrorId>"));
  CHECK(s.hashes == 0);
  r = s.post(validate(creds("alice", "alice-pass", std::string(5000, 'D'))));
  CHECK(has(r, "<ErrorId>failed-credentials</ErrorId>"));
  r = s.post(appdata(creds("alice", "alice-pass"), "<ClientName>" + std::string(10000, 'c') + "</ClientName>"));
  CHECK(has(r, "<ErrorId>unspecified</ErrorId>"));
  CHECK(s.hashes == 0);
  const std::string log = s.log_text.str();
  CHECK(log.find("UserName of 921600 bytes") != std::string::npos);
  CHECK(log.find("ClientName of 10000 bytes") != std::string::npos);
  CHECK(log.size() < 4096);  // not 900 KB
  // At the limit the request is served.
  CHECK_FALSE(has(s.post(appdata(creds("alice", "alice-pass"),
                                 "<ClientName>" + std::string(xmlservice::kMaxClientNameBytes, 'c') + "</ClientName>")),
                  "ErrorId"));
}

TEST_CASE("user-controlled strings reach the log truncated and escaped") {
  Service s;
  // A name (within the limit) with a line break that would forge a second log line.
  s.post(validate(creds("bob&#10;xml RequestAppData from 10.0.0.1 user=DEMO\\admin result=ok", "x")));
  // Unknown request elements: each one answered, none of them becomes a metric series of its own.
  for (int i = 0; i < 20; ++i) {
    auto unknown = s.post(wrap("<RequestX" + std::to_string(i) + std::string(100, 'X') + "/>"));
    CHECK(has(unknown, "<ErrorId>unspecified</ErrorId>"));
  }
  const std::string log = s.log_text.str();
  CHECK(log.find("bob\\x0axml RequestAppData") != std::string::npos);
  CHECK(log.find("\nxml RequestAppData from 10.0.0.1") == std::string::npos);
  CHECK(log.find("RequestX7XXXX") != std::string::npos);  // the log says which
  // The metric label is "unknown", not the element as sent.
  const auto text = s.metrics.render();
  CHECK(text.find("broker_xml_requests_total{request=\"unknown\",result=\"unspecified\"} 20") != std::string::npos);
  CHECK(text.find("XXXX") == std::string::npos);
}

TEST_CASE("failed logons are throttled per source address, before the directory") {
  Setup setup;
  setup.xml.failed_logons_per_minute = 3;
  Service s(setup);
  for (int i = 0; i < 3; ++i)
    CHECK(has(s.post(validate(creds("nobody" + std::to_string(i), "x")), "10.0.0.9"), "failed-credentials"));
  const int hashes = s.hashes;
  // The fourth attempt from that address is refused without a check, even with the right password.
  CHECK(has(s.post(validate(creds("alice", "alice-pass")), "10.0.0.9"), "<ErrorId>service-unavailable</ErrorId>"));
  CHECK(s.hashes == hashes);
  // Other addresses, and requests without a password, are not affected.
  CHECK_FALSE(has(s.post(validate(creds("alice", "alice-pass")), "10.0.0.10"), "ErrorId"));
  CHECK(has(s.post(appdata("<Credentials><AnonymousUser/></Credentials>"), "10.0.0.9"), "<InName>Notepad</InName>"));
  // The bucket refills: one failure's worth every 20 s.
  s.clock.advance(std::chrono::seconds(20));
  CHECK_FALSE(has(s.post(validate(creds("alice", "alice-pass")), "10.0.0.9"), "ErrorId"));
  const auto text = s.metrics.render();
  CHECK(text.find("broker_xml_logons_throttled_total 1") != std::string::npos);
  CHECK(s.log_text.str().find("throttled: too many failed logons from 10.0.0.9") != std::string::npos);
}

TEST_CASE("with the password checks busy, requests that need no hash are still answered") {
  identity::PasswordCheckOptions po;
  po.threads = 1;
  po.max_queued = 2;
  po.max_wait = std::chrono::hours(1);
  identity::PasswordCheckPool pool(po);
  Setup setup;
  setup.password_checks = &pool;
  setup.xml.failed_logons_per_minute = 0;
  Service s(setup);
  CHECK_FALSE(has(s.post(validate(creds("alice", "alice-pass"))), "ErrorId"));  // fills the cache

  // Hold the only hashing thread, as a flood of wrong passwords would.
  std::promise<void> release, started;
  pool.submit(
      [&started, gate = release.get_future().share()] {
        started.set_value();
        gate.wait();
      },
      [](identity::PasswordCheckPool::Refusal) {});
  started.get_future().wait();

  // Two wrong passwords wait for the hashing thread; they hold no work-queue thread meanwhile.
  std::vector<std::future<net::HttpResponse>> waiting;
  for (int i = 0; i < 2; ++i) {
    auto p = std::make_shared<std::promise<net::HttpResponse>>();
    waiting.push_back(p->get_future());
    net::HttpRequest req;
    req.method = "POST";
    req.path = "/scripts/wpnbr.dll";
    req.body = validate(creds("alice", "wrong"));
    req.remote_address = "10.0.0.66";
    s.xml->handle(std::move(req), [p](net::HttpResponse r) { p->set_value(std::move(r)); });
  }
  while (pool.queued() < 2) std::this_thread::yield();
  // The queue is full: the next one is refused at once (service-unavailable), not queued.
  CHECK(has(s.post(validate(creds("bob", "wrong"))), "<ErrorId>service-unavailable</ErrorId>"));
  // A cached logon, anonymous enumeration and capabilities are answered meanwhile.
  CHECK_FALSE(has(s.post(appdata(creds("alice", "alice-pass"))), "ErrorId"));
  CHECK(has(s.post(appdata("<Credentials><AnonymousUser/></Credentials>")), "<InName>Notepad</InName>"));
  CHECK(has(s.post(wrap("<RequestCapabilities/>")), "<ResponseCapabilities>"));
  for (auto& w : waiting) CHECK(w.wait_for(std::chrono::seconds(0)) == std::future_status::timeout);

  release.set_value();
  for (auto& w : waiting) CHECK(has(w.get(), "<ErrorId>failed-credentials</ErrorId>"));
  CHECK(s.log_text.str().find("too many password checks at once (queue_full)") != std::string::npos);
}

// Enumeration is answered from the engine: what the admin path commits reaches it through the
// repository's commit observer (broker::Engine::apply), with no reload and no restart.
TEST_CASE("enumeration follows configuration changes and direct assignments made after start") {
  Service s;
  const std::string actor = "token:t";
  const auto make = [](common::model::Kind kind, std::string name,
                       std::initializer_list<std::pair<const char*, common::model::Value>> fields) {
    auto o = common::model::make_default(kind, std::move(name));
    for (const auto& [k, v] : fields) o.fields[k] = v;
    return o;
  };
  using common::model::Kind;
  using common::model::TextList;
  const auto ok = [](const auto& result) {
    if (!result) FAIL_CHECK(result.error().describe());
    return result.has_value();
  };
  REQUIRE_FALSE(has(s.post(appdata(creds("bob", "bob-pass"))), "Personal"));

  // A private group with an access rule but no assignment rule: nothing to see yet.
  REQUIRE(ok(s.site->create(make(Kind::delivery_group, "Personal", {{"desktop_kind", std::string("Private")},
                                                                 {"published_name", std::string("My PC")}}),
                         actor)));
  REQUIRE(ok(s.site->create(make(Kind::rule, "personal-access", {{"rule_type", std::string("access")},
                                                              {"delivery_group", std::string("Personal")},
                                                              {"included_users", TextList{"DEMO\\Domain Users"}}}),
                         actor)));
  REQUIRE(ok(s.site->create(make(Kind::machine, "pc-7", {{"catalog", std::string("pool")},
                                                      {"delivery_group", std::string("Personal")}}),
                         actor)));
  CHECK_FALSE(has(s.post(appdata(creds("bob", "bob-pass"))), "Personal"));

  // A direct assignment (no rule) of pc-7 to bob: bob sees the group's desktop, alice does not.
  REQUIRE(ok(s.site->create(make(Kind::assignment, "", {{"machine", std::string("pc-7")}, {"user", std::string("DEMO\\bob")}}),
                         actor)));
  auto bob = s.post(appdata(creds("bob", "bob-pass")));
  CHECK(has(bob, "<InName>Personal</InName>"));
  CHECK(has(bob, "<FName>My PC</FName>"));
  CHECK_FALSE(has(s.post(appdata(creds("alice", "alice-pass"))), "Personal"));

  // Configuration changes: a renamed desktop, a new application, then hidden.
  auto personal = s.site->get(Kind::delivery_group, "Personal");
  REQUIRE(personal.has_value());
  personal->fields["published_name"] = std::string("My Desktop");
  REQUIRE(ok(s.site->update("Personal", *personal, actor)));
  bob = s.post(appdata(creds("bob", "bob-pass")));
  CHECK(has(bob, "<FName>My Desktop</FName>"));
  CHECK_FALSE(has(bob, "Calc"));
  REQUIRE(ok(s.site->create(make(Kind::application, "Calc", {{"command_line_executable", std::string("calc.exe")},
                                                             {"delivery_groups", TextList{"Apps"}}}),
                            actor)));
  CHECK(has(s.post(appdata(creds("bob", "bob-pass"))), "<InName>Calc</InName>"));
  auto calc = s.site->get(Kind::application, "Calc");
  REQUIRE(calc.has_value());
  calc->fields["visible"] = false;
  REQUIRE(ok(s.site->update("Calc", *calc, actor)));
  CHECK_FALSE(has(s.post(appdata(creds("bob", "bob-pass"))), "Calc"));
  // The site settings come from the config file: a reload of the changed file (brokerd's
  // reconcile) reaches the engine the same way.
  std::string toml = site_toml(false);
  toml.replace(toml.find("Test Farm"), 9, "Renamed Farm");
  auto cfg = config::load_string(toml, "test.toml");
  REQUIRE(cfg.config.has_value());
  REQUIRE(ok(s.site->reconcile("test.toml", cfg.config->site, cfg.config->objects)));
  CHECK(has(s.post(wrap("<RequestServerFarmData><Nil/></RequestServerFarmData>")),
            "<ServerFarmName>Renamed Farm</ServerFarmName>"));

  // The assignment removed: the desktop goes.
  auto assignments = s.site->list(Kind::assignment, {});
  REQUIRE(assignments.has_value());
  REQUIRE(assignments->items.size() == 1);
  REQUIRE(ok(s.site->remove(Kind::assignment, assignments->items[0].name, actor)));
  CHECK_FALSE(has(s.post(appdata(creds("bob", "bob-pass"))), "Personal"));
}

TEST_CASE("RequestServerData lists the machines the engine holds registered") {
  Service s;
  using common::model::Kind;
  const auto ok = [](const auto& result) {
    if (!result) FAIL_CHECK(result.error().describe());
    return result.has_value();
  };
  for (const char* name : {"pc-1", "pc-2"}) {
    auto m = common::model::make_default(Kind::machine, name);
    m.fields["catalog"] = std::string("pool");
    m.fields["delivery_group"] = std::string("Desktops");
    REQUIRE(ok(s.site->create(m, "token:t")));
  }
  const auto servers = [&] {
    return s.post(wrap("<RequestServerData><ServerType>all</ServerType>" + creds("alice", "alice-pass") +
                       "</RequestServerData>"));
  };
  CHECK_FALSE(has(servers(), "<ServerName>"));
  REQUIRE(s.engine.registered("pc-2", 0));  // live state: the agent registry sets it, storage never sees it
  auto r = servers();
  CHECK(has(r, "<ServerName>pc-2</ServerName>"));
  CHECK_FALSE(has(r, "pc-1"));
  REQUIRE(s.engine.unregistered("pc-2"));
  CHECK_FALSE(has(servers(), "<ServerName>"));
}

// Abuse limits of the XML listener's service (docs/SECURITY.md section 7.3). The field limits'
// own tests are in request_limits_test.cpp; the transport's (body, header, timeouts) in
// net/server_test.cpp.
TEST_SUITE("limits") {

namespace {
std::string icons(std::size_t n, const std::string& spec = "size=\"256\" bpp=\"32\" format=\"raw\"") {
  std::string s;
  for (std::size_t i = 0; i < n; ++i) s += "<DesiredIconData " + spec + "/>";
  return s;
}
std::size_t count(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + what.size())) ++n;
  return n;
}
}  // namespace

TEST_CASE("DesiredIconData: more than kMaxDesiredIconData entries are refused before the directory") {
  Service s;
  // At the limit: served, one IconData per entry and resource.
  auto at_limit = s.post(appdata(creds("bob", "bob-pass"), icons(xmlservice::kMaxDesiredIconData)));
  CHECK_FALSE(has(at_limit, "ErrorId"));
  CHECK(count(at_limit.body, "<IconData ") == xmlservice::kMaxDesiredIconData);  // bob sees Notepad only
  const int hashes = s.hashes;
  // One more, or a body full of them, is `unspecified` without a password check.
  for (std::size_t n : {xmlservice::kMaxDesiredIconData + 1, std::size_t{30000}}) {
    auto over = s.post(appdata(creds("bob", "bob-pass"), icons(n)));
    CHECK(has(over, "<ResponseAppData>"));
    CHECK(has(over, "<ErrorId>unspecified</ErrorId>"));
    CHECK_FALSE(has(over, "<IconData"));
  }
  CHECK(s.hashes == hashes);
  const std::string log = s.log_text.str();
  CHECK(log.find("DesiredIconData of 9 entries; the limit is 8") != std::string::npos);
  CHECK(log.find("DesiredIconData of 30000 entries") != std::string::npos);
}

TEST_CASE("the icons in one RequestAppData reply are bounded by max_icon_bytes") {
  // What one application's two icons weigh.
  const std::string two_icons = icons(1) + icons(1, "size=\"48\" bpp=\"32\" format=\"png\"");
  const std::string both_apps = "<AppName>Notepad</AppName><AppName>Payroll</AppName>";
  std::size_t one_app = 0;
  {
    Service s;
    auto r = s.post(appdata(creds("alice", "alice-pass"), two_icons + "<AppName>Notepad</AppName>"));
    REQUIRE(count(r.body, "<IconData ") == 2);
    for (auto at = r.body.find("<IconData "); at != std::string::npos; at = r.body.find("<IconData ", at + 1)) {
      const auto open = r.body.find('>', at) + 1;
      one_app += r.body.find("</IconData>", open) - open;
    }
    REQUIRE(one_app > 200000);  // a 256x256 32-bit icon
  }
  // A budget of one application's icons: the first application gets both, the second none, and
  // both are listed.
  Setup setup;
  setup.xml.max_icon_bytes = one_app;
  Service s(setup);
  auto r = s.post(appdata(creds("alice", "alice-pass"), two_icons + both_apps));
  CHECK_FALSE(has(r, "ErrorId"));
  CHECK(has(r, "<InName>Notepad</InName>"));
  CHECK(has(r, "<InName>Payroll</InName>"));
  CHECK(count(r.body, "<IconData ") == 2);
  CHECK(s.log_text.str().find("result=ok, 2 resources, 1 without icons") != std::string::npos);
  // The legacy <Icon> counts too: with no budget left for it, no resource gets one.
  setup.xml.max_icon_bytes = 1;
  Service none(setup);
  r = none.post(appdata(creds("alice", "alice-pass"), "<DesiredDetails>icon</DesiredDetails>" + both_apps));
  CHECK(has(r, "<InName>Payroll</InName>"));
  CHECK_FALSE(has(r, "<Icon>"));
  // Without a limit reached, every resource has its icon.
  Service plenty;
  r = plenty.post(appdata(creds("alice", "alice-pass"), "<DesiredDetails>icon</DesiredDetails>" + both_apps));
  CHECK(count(r.body, "<Icon>") == 2);
}

}  // TEST_SUITE("limits")

// docs/nfuse.md "Client address": ClientAddress is believed only from trusted front ends; access
// rules by client IP see the peer's own address otherwise. (The site trusts 127.0.0.0/8.)
TEST_CASE("ClientAddress counts only from trusted front ends; others are matched by their own address") {
  Setup setup;
  setup.extra_toml = R"(
[[delivery_group]]
name = "Lab"
delivery_type = "AppsOnly"
session_support = "MultiSession"
[[application]]
name = "LabApp"
command_line_executable = "lab.exe"
delivery_groups = ["Lab"]
[[rule]]
name = "lab-access"
rule_type = "access"
delivery_group = "Lab"
included_users = ["DEMO\\Domain Users"]
included_client_ips = ["10.1.0.0/16"]
[[rule]]
name = "lab-apps"
rule_type = "app_entitlement"
delivery_group = "Lab"
included_user_filter_enabled = false
)";
  Service s(setup);
  const auto claiming = [](const std::string& address) {
    return appdata(creds("bob", "bob-pass"), "<ClientAddress addresstype=\"dot\">" + address + "</ClientAddress>");
  };
  // A trusted front end speaks for its client.
  CHECK(has(s.post(claiming("10.1.2.3"), "127.0.0.1"), "<InName>LabApp</InName>"));
  CHECK_FALSE(has(s.post(claiming("10.2.0.1"), "127.0.0.1"), "LabApp"));
  // Anyone else is matched by the address it connects from, whatever it claims.
  auto untrusted = s.post(claiming("10.1.2.3"), "10.9.9.9");
  CHECK_FALSE(has(untrusted, "ErrorId"));
  CHECK(has(untrusted, "<InName>Notepad</InName>"));
  CHECK_FALSE(has(untrusted, "LabApp"));
  CHECK(has(s.post(claiming("10.9.9.9"), "10.1.7.7"), "<InName>LabApp</InName>"));
  CHECK(has(s.post(appdata(creds("bob", "bob-pass")), "10.1.7.7"), "<InName>LabApp</InName>"));
  // A ClientAddress that is not an IP address is ignored, even from a trusted front end.
  CHECK_FALSE(has(s.post(claiming("lab-pc.example"), "127.0.0.1"), "LabApp"));
}
