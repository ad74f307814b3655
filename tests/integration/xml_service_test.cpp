// Integration: the NFuse XML service of the real brokerd, on the real demo site
// (config/demo.toml with free ports and a temporary database), as a front end would use it.
#include "tests/integration/daemon.hpp"

#include "net/http_client.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>
#include <vector>

namespace {

std::string demo_config(const itest::TempDir& dir) {
  std::ifstream in(std::string(OPENBROKER_SOURCE_DIR) + "/config/demo.toml");
  std::stringstream ss;
  ss << in.rdbuf();
  std::string text = ss.str();
  for (const char* port : {"port = 8080", "port = 8081", "port = 8082"})
    text.replace(text.find(port), std::string(port).size(), "port = 0");
  const std::string db = "path = \"../var/demo.db\"";
  text.replace(text.find(db), db.size(), "path = \"" + dir.file("demo.db") + "\"");
  return text;
}

std::vector<std::string> in_names(const std::string& body) {
  std::vector<std::string> out;
  static const std::regex re("<InName>([^<]*)</InName>");
  for (auto it = std::sregex_iterator(body.begin(), body.end(), re); it != std::sregex_iterator(); ++it)
    out.push_back((*it)[1]);
  return out;
}

std::string appdata(const std::string& user, const std::string& password) {
  return R"(<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE NFuseProtocol SYSTEM "NFuse.dtd">
<NFuseProtocol version="5.0">
  <RequestAppData>
    <Scope traverse="subtree"/>
    <DesiredDetails>defaults</DesiredDetails>
    <ServerType>all</ServerType>
    <ClientType>ica30</ClientType>
    <Credentials>
      <UserName>)" + user + R"(</UserName>
      <Password encoding="cleartext">)" + password + R"(</Password>
      <Domain type="NT">DEMO</Domain>
    </Credentials>
    <ClientName>WI_test</ClientName>
  </RequestAppData>
</NFuseProtocol>)";
}

std::string validate(const std::string& user, const std::string& password) {
  return R"(<?xml version="1.0"?><NFuseProtocol version="5.0"><RequestValidateCredentials><Credentials><UserName>)" +
         user + "</UserName><Password>" + password +
         "</Password><Domain type=\"NT\">DEMO</Domain></Credentials></RequestValidateCredentials></NFuseProtocol>";
}

bool has(const std::string& body, const std::string& what) { return body.find(what) != std::string::npos; }

// The value of an unlabelled metric in a /metrics page; -1 when absent.
double metric(const std::string& page, const std::string& name) {
  const auto at = page.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stod(page.substr(at + name.size() + 2));
}

}  // namespace

TEST_CASE("demo users enumerate exactly what their entitlements give them, over HTTP") {
  itest::TempDir dir;
  itest::Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(demo_config(dir)), daemon.log());
  net::HttpClient xml("http://127.0.0.1:" + std::to_string(daemon.xml_port()));
  auto post = [&](const std::string& body) {
    auto r = xml.request("POST", "/scripts/wpnbr.dll", body, {{"Content-Type", "text/xml"}});
    REQUIRE(r.has_value());
    return *r;
  };

  auto alice = post(appdata("alice", "alice-pass"));
  CHECK(alice.status == 200);
  CHECK(alice.headers["content-type"].find("text/xml") == 0);
  CHECK(alice.headers.contains("content-length"));
  CHECK(in_names(alice.body) ==
        std::vector<std::string>{"Win11 Desktop", "Win11 Personal", "Notepad", "Calculator", "Word"});
  CHECK(in_names(post(appdata("bob", "bob-pass")).body) ==
        std::vector<std::string>{"Win11 Desktop", "Notepad", "Calculator"});
  CHECK(in_names(post(appdata("carol", "carol-pass")).body) == std::vector<std::string>{"Notepad", "Calculator"});
  CHECK(post(appdata("dave", "dave-pass")).body.find("<ErrorId>account-disabled</ErrorId>") != std::string::npos);
  CHECK(post(appdata("alice", "wrong")).body.find("<ErrorId>failed-credentials</ErrorId>") != std::string::npos);
  // The demo does not trust XML requests: a user name without a password is refused.
  auto passthrough = post(R"(<?xml version="1.0"?><NFuseProtocol version="5.0"><RequestValidateCredentials>
    <Credentials><ID type="SAM">DEMO\alice</ID></Credentials></RequestValidateCredentials></NFuseProtocol>)");
  CHECK(passthrough.body.find("<ErrorId>not-trusted</ErrorId>") != std::string::npos);
  CHECK(post("definitely not xml").status == 400);
  CHECK(xml.request("POST", "/Scripts/WPNBR.DLL", appdata("bob", "bob-pass"))->status == 200);

  // Front ends send users with thousands of group SIDs: a 600 KB request is served.
  std::string many_ids;
  while (many_ids.size() < 600 * 1024)
    many_ids += "<ID type=\"SID\">S-1-5-21-1004336348-1177238915-682003330-" + std::to_string(many_ids.size()) + "</ID>";
  auto big = post(R"(<?xml version="1.0"?><NFuseProtocol version="5.0"><RequestValidateCredentials><Credentials>)" +
                  many_ids + "</Credentials></RequestValidateCredentials></NFuseProtocol>");
  CHECK(big.status == 200);
  CHECK(big.body.find("<ErrorId>not-trusted</ErrorId>") != std::string::npos);
  // Beyond the listener's body limit (1 MiB by default): 413.
  CHECK(post(std::string(2 * 1024 * 1024, ' ')).status == 413);

  // Every request is counted by type and result.
  net::HttpClient admin(daemon.admin_url());
  auto metrics = admin.request("GET", "/metrics");
  REQUIRE(metrics.has_value());
  CHECK(metrics->body.find("broker_xml_requests_total{request=\"RequestAppData\",result=\"ok\"} 4") != std::string::npos);
  CHECK(metrics->body.find("broker_xml_requests_total{request=\"RequestAppData\",result=\"account-disabled\"} 1") !=
        std::string::npos);
  CHECK(daemon.stop() == 0);
}

TEST_CASE("under a wrong-password flood, cached logons and requests without a hash are still answered") {
  // One hashing thread, a queue that holds the whole flood, no per-address throttle (the flood
  // and the user share 127.0.0.1 here): the flood queues for the one thread, everything else
  // goes past it. Before, the hashes ran on the work queue's threads and a cached logon queued
  // behind the flood's hashes.
  itest::TempDir dir;
  itest::Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(demo_config(dir) +
                               "\n[identity]\npassword_check_threads = 1\npassword_check_queue = 1000\n"
                               "password_check_max_wait_ms = 600000\n[xml]\nfailed_logons_per_minute = 0\n"),
                  daemon.log());
  const std::string xml_url = "http://127.0.0.1:" + std::to_string(daemon.xml_port());
  net::HttpClient xml(xml_url);
  net::HttpClient admin(daemon.admin_url());
  auto post = [&](const std::string& body) {
    auto r = xml.request("POST", "/scripts/wpnbr.dll", body, {{"Content-Type", "text/xml"}});
    REQUIRE(r.has_value());
    return r->body;
  };
  REQUIRE(in_names(post(appdata("alice", "alice-pass"))).size() == 5);  // alice's success is now cached

  // The flood: wrong passwords for names that do not exist (each costs a hash; none locks out).
  constexpr int kFlood = 24;
  std::atomic<int> answered{0}, refused_right{0};
  std::vector<std::thread> flood;
  for (int i = 0; i < kFlood; ++i)
    flood.emplace_back([&, i] {
      net::HttpClient c(xml_url, std::chrono::seconds(120));
      auto r = c.request("POST", "/scripts/wpnbr.dll", validate("nobody" + std::to_string(i), "wrong"),
                         {{"Content-Type", "text/xml"}});
      if (r && has(r->body, "<ErrorId>failed-credentials</ErrorId>")) ++refused_right;
      ++answered;
    });
  // Wait until the broker holds the whole flood (queued or hashing), or part of it was answered.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  for (;;) {
    auto page = admin.request("GET", "/metrics");
    REQUIRE(page.has_value());
    const double held = metric(page->body, "broker_password_checks_queued") +
                        metric(page->body, "broker_password_checks_running");
    if (held + answered >= kFlood || std::chrono::steady_clock::now() > deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }

  // Meanwhile: a cached logon, requests that need no credentials and the admin API are answered, long before
  // the flood is (it needs kFlood hashes, one at a time).
  CHECK(in_names(post(appdata("alice", "alice-pass"))).size() == 5);
  CHECK(has(post(R"(<NFuseProtocol version="5.0"><RequestCapabilities/></NFuseProtocol>)"), "<ResponseCapabilities>"));
  CHECK(has(post(R"(<NFuseProtocol version="5.0"><RequestServerFarmData/></NFuseProtocol>)"), "<ServerFarmName>Demo"));
  auto health = admin.request("GET", "/healthz");
  REQUIRE(health.has_value());
  CHECK(health->status == 200);
  CHECK(answered < kFlood / 2);

  for (auto& t : flood) t.join();
  CHECK(answered == kFlood);
  CHECK(refused_right == kFlood);  // the flood itself is answered correctly, only later
  auto page = admin.request("GET", "/metrics");
  REQUIRE(page.has_value());
  CHECK(has(page->body, "broker_password_checks_total{result=\"run\"}"));
  CHECK(daemon.stop() == 0);
}

TEST_CASE("failed logons per address are throttled before the directory; long names are refused and logged short") {
  itest::TempDir dir;
  itest::Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(demo_config(dir) + "\n[xml]\nfailed_logons_per_minute = 3\n"), daemon.log());
  net::HttpClient xml("http://127.0.0.1:" + std::to_string(daemon.xml_port()));
  auto post = [&](const std::string& body) {
    auto r = xml.request("POST", "/scripts/wpnbr.dll", body, {{"Content-Type", "text/xml"}});
    REQUIRE(r.has_value());
    return r->body;
  };
  // A 900 KB user name: refused before the directory, and not written to the log.
  const std::string long_name(900 * 1024, 'n');
  CHECK(has(post(validate(long_name, "x")), "<ErrorId>failed-credentials</ErrorId>"));
  // Three failures, then even the right password is refused for a while.
  for (int i = 0; i < 3; ++i) CHECK(has(post(validate("carol", "wrong")), "<ErrorId>failed-credentials</ErrorId>"));
  CHECK(has(post(validate("carol", "carol-pass")), "<ErrorId>service-unavailable</ErrorId>"));
  // Requests without a password are not affected.
  CHECK(has(post(R"(<NFuseProtocol version="5.0"><RequestCapabilities/></NFuseProtocol>)"), "<ResponseCapabilities>"));

  net::HttpClient admin(daemon.admin_url());
  auto page = admin.request("GET", "/metrics");
  REQUIRE(page.has_value());
  CHECK(has(page->body, "broker_xml_logons_throttled_total 1"));
  CHECK(daemon.stop() == 0);
  const std::string log = daemon.log();
  CHECK(has(log, "UserName of 921600 bytes"));
  CHECK_FALSE(has(log, std::string(1024, 'n')));
  CHECK(has(log, "throttled: too many failed logons from 127.0.0.1"));
}
