// Integration: the Secure Ticket Authority of the real brokerd (POST /scripts/ctxsta.dll on the
// XML listener), used as StoreFront deposits a ticket and as a gateway redeems it, over HTTP.
#include "net/http_client.hpp"
#include "tests/integration/daemon.hpp"

#include <doctest/doctest.h>

#include <regex>
#include <string>
#include <utility>
#include <vector>

namespace {

// What StoreFront sends (the Extentrix shape of nfuse-reference.md section 2.10).
const std::string kRequestTicket = R"(<?xml version="1.0"?>
<!DOCTYPE CtxSTAProtocol SYSTEM "CtxSTA.dtd">
<CtxSTAProtocol version="4.0">
  <RequestTicket>
    <AllowedTicketType>STA-v4</AllowedTicketType>
    <AllowedAuthorityIDType>STA-v1</AllowedAuthorityIDType>
    <TicketData>
      <Value name="CGPAddress">*:2598</Value>
      <Value name="ICAAddress">10.0.0.5:1494</Value>
      <Value name="XData">&lt;?xml version=&quot;1.0&quot;?&gt;&lt;CtxConnInfo version=&quot;1.0&quot;&gt;&lt;ServerAddress&gt;10.0.0.5:1494&lt;/ServerAddress&gt;&lt;UserName&gt;alice&lt;/UserName&gt;&lt;UserDomain&gt;DEMO&lt;/UserDomain&gt;&lt;ApplicationName&gt;Notepad&lt;/ApplicationName&gt;&lt;Protocol&gt;ICA&lt;/Protocol&gt;&lt;/CtxConnInfo&gt;</Value>
    </TicketData>
    <Control><Refreshable>true</Refreshable></Control>
  </RequestTicket>
</CtxSTAProtocol>
)";

// What a gateway sends to validate the ticket it found in the ICA file.
std::string request_data(const std::string& authority_id, const std::string& ticket) {
  return "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
         "<CtxSTAProtocol version=\"4.0\">\n"
         "  <RequestData>\n"
         "    <AuthorityID>" +
         authority_id +
         "</AuthorityID>\n"
         "    <Ticket>" +
         ticket +
         "</Ticket>\n"
         "    <TicketVersion>STA-v4</TicketVersion>\n"
         "  </RequestData>\n"
         "</CtxSTAProtocol>\n";
}

std::string element(const std::string& body, const std::string& name) {
  std::smatch m;
  const std::regex re("<" + name + ">([^<]*)</" + name + ">");
  return std::regex_search(body, m, re) ? m[1].str() : std::string();
}

struct Sta {
  net::HttpClient client;
  explicit Sta(const itest::Daemon& d) : client("http://127.0.0.1:" + std::to_string(d.xml_port())) {}
  net::ClientResponse post(const std::string& body, const std::string& path = "/scripts/ctxsta.dll") {
    auto r = client.request("POST", path, body, {{"Content-Type", "text/xml"}});
    REQUIRE(r.has_value());
    return *r;
  }
};

}  // namespace

TEST_CASE("sta: StoreFront gets a ticket, a gateway redeems it once, over HTTP") {
  itest::TempDir dir;
  std::string ticket, authority;
  {
    itest::Daemon daemon(dir);
    REQUIRE_MESSAGE(daemon.start(itest::base_config(dir)), daemon.log());
    Sta sta(daemon);

    // RequestTicket -> AuthorityID, Ticket, TicketVersion.
    const auto issued = sta.post(kRequestTicket);
    CHECK(issued.status == 200);
    CHECK(issued.headers.at("content-type").find("text/xml") == 0);
    CHECK(issued.body.find("<ResponseTicket>") != std::string::npos);
    authority = element(issued.body, "AuthorityID");
    ticket = element(issued.body, "Ticket");
    CHECK(std::regex_match(authority, std::regex("STA[0-9A-F]{12}")));
    CHECK(std::regex_match(ticket, std::regex("[0-9A-F]{32}")));
    CHECK(element(issued.body, "TicketVersion") == "STA-v4");

    // RequestData, as the gateway validates: the deposited values come back.
    const auto data = sta.post(request_data(authority, ticket));
    CHECK(data.status == 200);
    CHECK(data.body.find("<ResponseData>") != std::string::npos);
    CHECK(data.body.find(R"(<Value name="CGPAddress">*:2598</Value>)") != std::string::npos);
    CHECK(data.body.find(R"(<Value name="ICAAddress">10.0.0.5:1494</Value>)") != std::string::npos);
    CHECK(data.body.find("&lt;UserName&gt;alice&lt;/UserName&gt;") != std::string::npos);

    // The same ticket again: refused.
    const auto again = sta.post(request_data(authority, ticket));
    CHECK(again.status == 200);
    CHECK(element(again.body, "ErrorId") == "invalid-ticket");
    CHECK(again.body.find("<ResponseData>") == std::string::npos);

    // Malformed input gets the STA error shape; other methods and paths as on the rest of the listener.
    for (const std::string body :
         {"definitely not xml", "<CtxSTAProtocol version=\"4.0\"><RequestData/></CtxSTAProtocol>",
          "<?xml version=\"1.0\"?><NFuseProtocol version=\"5.0\"><RequestCapabilities/></NFuseProtocol>"}) {
      CAPTURE(body);
      const auto bad = sta.post(body);
      CHECK(bad.status == 200);
      CHECK(element(bad.body, "ErrorId") == "bad-request");
    }
    CHECK(sta.client.request("GET", "/scripts/ctxsta.dll")->status == 405);
    CHECK(sta.post(kRequestTicket, "/scripts/ctxsta2.dll").status == 404);
    CHECK(sta.post(kRequestTicket, "/Scripts/CtxSta.dll").status == 200);
    // The NFuse service is still there.
    const auto nfuse = sta.post(
        R"(<?xml version="1.0"?><NFuseProtocol version="5.0"><RequestServerFarmData><Nil/></RequestServerFarmData></NFuseProtocol>)",
        "/scripts/wpnbr.dll");
    CHECK(nfuse.status == 200);
    CHECK(nfuse.body.find("<ResponseServerFarmData>") != std::string::npos);

    // One more ticket, left outstanding across the restart below.
    ticket = element(sta.post(kRequestTicket).body, "Ticket");

    // Counted and logged; the log never holds a ticket or XData.
    net::HttpClient admin(daemon.admin_url());
    const auto metrics = admin.request("GET", "/metrics");
    REQUIRE(metrics.has_value());
    CHECK(metrics->body.find("broker_sta_requests_total{request=\"RequestTicket\",result=\"ok\"} 3") !=
          std::string::npos);
    CHECK(metrics->body.find("broker_sta_requests_total{request=\"RequestData\",result=\"ok\"} 1") !=
          std::string::npos);
    CHECK(metrics->body.find("broker_sta_requests_total{request=\"RequestData\",result=\"invalid-ticket\"} 1") !=
          std::string::npos);
    CHECK(metrics->body.find("broker_sta_tickets_outstanding 2") != std::string::npos);
    CHECK(daemon.stop() == 0);
    const std::string log = daemon.log();
    CHECK(log.find("sta RequestTicket from 127.0.0.1") != std::string::npos);
    CHECK(log.find("sta RequestData from 127.0.0.1") != std::string::npos);
    CHECK(log.find(ticket) == std::string::npos);
    CHECK(log.find("CtxConnInfo") == std::string::npos);
    CHECK(log.find("10.0.0.5") == std::string::npos);
  }

  // After a restart on the same database: the same AuthorityID; outstanding tickets are gone.
  itest::Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir)), daemon.log());
  Sta sta(daemon);
  CHECK(element(sta.post(request_data(authority, ticket)).body, "ErrorId") == "invalid-ticket");
  CHECK(element(sta.post(kRequestTicket).body, "AuthorityID") == authority);
  CHECK(daemon.stop() == 0);
}

TEST_CASE("sta: [sta] settings: authority_id, allowed_clients, enabled") {
  itest::TempDir dir;
  {
    itest::Daemon daemon(dir);
    REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, "[sta]\nauthority_id = \"STA00DEADBEEF00\"\n")), daemon.log());
    Sta sta(daemon);
    const auto issued = sta.post(kRequestTicket);
    CHECK(element(issued.body, "AuthorityID") == "STA00DEADBEEF00");
    // Another authority's id: refused, and the ticket is not used up.
    const std::string ticket = element(issued.body, "Ticket");
    CHECK(element(sta.post(request_data("STA111111111111", ticket)).body, "ErrorId") == "invalid-ticket");
    CHECK(sta.post(request_data("STA00DEADBEEF00", ticket)).body.find("<ResponseData>") != std::string::npos);
    CHECK(daemon.stop() == 0);
  }
  {
    itest::Daemon daemon(dir);
    REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, "[sta]\nallowed_clients = [\"10.0.0.0/8\"]\n")), daemon.log());
    Sta sta(daemon);
    CHECK(element(sta.post(kRequestTicket).body, "ErrorId") == "not-trusted");
    CHECK(daemon.stop() == 0);
  }
  {
    itest::Daemon daemon(dir);
    REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, "[sta]\nenabled = false\n")), daemon.log());
    Sta sta(daemon);
    CHECK(sta.post(kRequestTicket).status == 404);
    CHECK(daemon.stop() == 0);
  }
}

TEST_CASE("sta: allowed_clients follows the site's trusted_front_ends; per-client quota") {
  itest::TempDir dir;
  itest::Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(
                      dir, "[sta]\nallowed_clients = [\"trusted_front_ends\"]\nmax_tickets_per_client = 2\n")),
                  daemon.log());
  Sta sta(daemon);
  net::HttpClient admin(daemon.admin_url());
  const std::vector<std::pair<std::string, std::string>> auth{{"Authorization", std::string("Bearer ") + itest::kToken},
                                                              {"Content-Type", "application/json"}};
  // 127.0.0.1 is no front end yet (and loopback is not in the list).
  CHECK(element(sta.post(kRequestTicket).body, "ErrorId") == "not-trusted");
  // An admin makes it one: it applies at once.
  auto patched = admin.request("PATCH", "/api/v1/site", R"({"trusted_front_ends":["127.0.0.1"]})", auth);
  REQUIRE(patched.has_value());
  REQUIRE_MESSAGE(patched->status == 200, patched->body);
  const std::string first = element(sta.post(kRequestTicket).body, "Ticket");
  const std::string authority = element(sta.post(kRequestTicket).body, "AuthorityID");
  CHECK(first.size() == 32);
  // The client's quota (2 tickets) is used up; other clients would still be served.
  CHECK(element(sta.post(kRequestTicket).body, "ErrorId") == "unspecified");
  // A redemption gives the room back.
  CHECK(sta.post(request_data(authority, first)).body.find("<ResponseData>") != std::string::npos);
  CHECK(element(sta.post(kRequestTicket).body, "Ticket").size() == 32);
  CHECK(daemon.stop() == 0);
  CHECK(daemon.log().find("client quota reached: 127.0.0.1 holds 2 tickets") != std::string::npos);
}

TEST_CASE("sta: allowed_clients = [\"any\"] opens it; [] is refused at start") {
  itest::TempDir dir;
  {
    itest::Daemon daemon(dir);
    REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, "[sta]\nallowed_clients = [\"any\"]\n")), daemon.log());
    Sta sta(daemon);
    CHECK(element(sta.post(kRequestTicket).body, "Ticket").size() == 32);
    CHECK(daemon.stop() == 0);
  }
  itest::Daemon daemon(dir);
  CHECK_FALSE(daemon.start(itest::base_config(dir, "[sta]\nallowed_clients = []\n")));
  CHECK(daemon.log().find("sta.allowed_clients: must not be empty") != std::string::npos);
}
