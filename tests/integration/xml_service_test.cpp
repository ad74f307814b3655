// Integration: the NFuse XML service of the real brokerd, on the real demo site
// (config/demo.toml with free ports and a temporary database), as a front end would use it.
#include "tests/integration/daemon.hpp"

#include "net/http_client.hpp"

#include <doctest/doctest.h>

#include <fstream>
#include <regex>
#include <sstream>

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
