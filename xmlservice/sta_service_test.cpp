// Tests of the Secure Ticket Authority service: issue and one-time redemption, the lifetime on a
// ManualClock, the store's bounds, who may ask, malformed bodies, the log lines (never a ticket or
// a TicketData value) and concurrent redemption. Replies are read back with pugixml.
#include "xmlservice/sta_service.hpp"

#include "common/clock.hpp"
#include "common/log.hpp"
#include "common/metrics.hpp"
#include "xmlservice/sta_codec.hpp"

#include <doctest/doctest.h>
#include <pugixml.hpp>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using namespace xmlservice;
using namespace std::chrono_literals;

namespace {

const std::string kXData =
    R"(<?xml version="1.0"?><CtxConnInfo version="1.0"><ServerAddress>10.0.0.5:1494</ServerAddress>)"
    R"(<UserName>alice</UserName><UserDomain>DEMO</UserDomain><ApplicationName>Notepad</ApplicationName>)"
    R"(<Protocol>ICA</Protocol></CtxConnInfo>)";

// What StoreFront deposits.
std::vector<NameValue> storefront_values() {
  return {{"CGPAddress", "*:2598"}, {"ICAAddress", "10.0.0.5:1494"}, {"XData", kXData}, {"UserName", "alice"}};
}

std::string ticket_request(std::vector<NameValue> values = storefront_values()) {
  sta::TicketRequest r;
  r.allowed_ticket_types = {"STA-v4"};
  r.allowed_authority_id_types = {"STA-v1"};
  r.ticket_data = std::move(values);
  r.refreshable = true;
  return sta::render_request(r);
}

std::string data_request(const std::string& ticket, const std::string& authority = {},
                         const std::string& version = "STA-v4") {
  return sta::render_request(sta::DataRequest{authority, ticket, version});
}

// A reply read back: which Response* element, its children, and the TicketData values.
struct Reply {
  int status = 0;
  std::string element;  // "ResponseTicket", "ResponseData", "ResponseError"
  std::string authority_id, ticket, ticket_version, error_id;
  std::vector<std::pair<std::string, std::string>> values;
};

Reply read_reply(const net::HttpResponse& http) {
  Reply r;
  r.status = http.status;
  REQUIRE(http.status == 200);
  CHECK(http.content_type == "text/xml; charset=UTF-8");
  pugi::xml_document doc;
  REQUIRE(doc.load_string(http.body.c_str()));
  const auto root = doc.child("CtxSTAProtocol");
  REQUIRE(root);
  CHECK(std::string(root.attribute("version").value()) == "4.0");
  const auto e = root.first_child();
  r.element = e.name();
  r.authority_id = e.child_value("AuthorityID");
  r.ticket = e.child_value("Ticket");
  r.ticket_version = e.child_value("TicketVersion");
  r.error_id = e.child_value("ErrorId");
  for (auto v : e.child("TicketData").children("Value"))
    r.values.emplace_back(v.attribute("name").value(), v.child_value());
  return r;
}

struct Fixture {
  common::ManualClock clock{common::SysTime{} + std::chrono::hours(24 * 365 * 50)};
  common::Metrics metrics;
  std::ostringstream log_text;
  std::shared_ptr<spdlog::logger> log;
  std::unique_ptr<StaService> sta;

  // The default allowed_clients admits the front ends: here 10.0.0.0/8 unless the test says.
  explicit Fixture(StaOptions options = {}) {
    if (options.authority_id.empty()) options.authority_id = "STA0123456789AB";
    if (!options.trusted_front_ends)
      options.trusted_front_ends = [] { return std::optional<std::vector<std::string>>({"10.0.0.0/8"}); };
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(log_text);
    log = std::make_shared<spdlog::logger>("test", sink);
    log->set_level(spdlog::level::trace);
    sta = std::make_unique<StaService>(std::move(options), clock, metrics, log);
  }

  net::HttpResponse send(const std::string& body, const std::string& from = "10.1.2.3",
                         const std::string& method = "POST", const std::string& path = "/scripts/ctxsta.dll") {
    net::HttpRequest req;
    req.method = method;
    req.path = path;
    req.target = path;
    req.body = body;
    req.remote_address = from;
    req.listener = "xml";
    return sta->process(req);
  }
  Reply post(const std::string& body, const std::string& from = "10.1.2.3") { return read_reply(send(body, from)); }

  std::string issue(std::vector<NameValue> values = storefront_values()) {
    Reply r = post(ticket_request(std::move(values)));
    REQUIRE(r.element == "ResponseTicket");
    return r.ticket;
  }
};

using Pairs = std::vector<std::pair<std::string, std::string>>;
Pairs pairs(const std::vector<NameValue>& values) {
  Pairs out;
  for (const auto& v : values) out.emplace_back(v.name, v.value);
  return out;
}

}  // namespace

TEST_CASE("RequestTicket answers AuthorityID, Ticket and TicketVersion; RequestData redeems the ticket once") {
  Fixture f;
  const Reply issued = f.post(ticket_request());
  CHECK(issued.element == "ResponseTicket");
  CHECK(issued.authority_id == "STA0123456789AB");
  CHECK(std::regex_match(issued.ticket, std::regex("[0-9A-F]{32}")));
  CHECK(issued.ticket_version == "STA-v4");
  CHECK(f.sta->outstanding() == 1);

  // A gateway redeems it: the values come back exactly, in the order deposited.
  const Reply data = f.post(data_request(issued.ticket, issued.authority_id), "10.9.9.9");
  CHECK(data.element == "ResponseData");
  CHECK(data.values == pairs(storefront_values()));
  CHECK(f.sta->outstanding() == 0);

  // Once only.
  const Reply again = f.post(data_request(issued.ticket, issued.authority_id), "10.9.9.9");
  CHECK(again.element == "ResponseError");
  CHECK(again.error_id == "invalid-ticket");

  // Every ticket is fresh.
  CHECK(f.issue() != f.issue());

  CHECK(f.metrics.render().find("broker_sta_requests_total{request=\"RequestTicket\",result=\"ok\"} 3") !=
        std::string::npos);
  CHECK(f.metrics.render().find("broker_sta_requests_total{request=\"RequestData\",result=\"ok\"} 1") !=
        std::string::npos);
  CHECK(f.metrics.render().find("broker_sta_requests_total{request=\"RequestData\",result=\"invalid-ticket\"} 1") !=
        std::string::npos);
  CHECK(f.metrics.render().find("broker_sta_tickets_outstanding 2") != std::string::npos);
}

TEST_CASE("RequestData: the ticket in any case, the AuthorityID with or without STA, or none") {
  Fixture f;
  std::string t = f.issue();
  for (auto& c : t) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  CHECK(f.post(data_request(t)).element == "ResponseData");
  CHECK(f.post(data_request(f.issue(), "0123456789ab", "")).element == "ResponseData");
  CHECK(f.post(data_request(" " + f.issue() + "\n", "sta0123456789AB")).element == "ResponseData");
  CHECK(f.post(data_request("0123456789ABCDEF0123456789ABCDEF")).error_id == "invalid-ticket");
}

TEST_CASE("RequestData for another authority or ticket version is refused and does not use the ticket up") {
  Fixture f;
  const std::string t = f.issue();
  CHECK(f.post(data_request(t, "STA999999999999")).error_id == "invalid-ticket");
  CHECK(f.post(data_request(t, "STA0123456789AB", "STA-v2")).error_id == "invalid-ticket");
  CHECK(f.sta->outstanding() == 1);
  CHECK(f.post(data_request(t, "STA0123456789AB")).element == "ResponseData");
}

TEST_CASE("tickets are redeemable only within their lifetime") {
  StaOptions o;
  o.ticket_lifetime = 100s;
  Fixture f(o);
  const std::string early = f.issue();
  const std::string late = f.issue();
  f.clock.advance(99s);
  CHECK(f.post(data_request(early)).element == "ResponseData");
  f.clock.advance(1s);  // exactly 100 s: over
  const Reply expired = f.post(data_request(late));
  CHECK(expired.element == "ResponseError");
  CHECK(expired.error_id == "invalid-ticket");
  CHECK(f.log_text.str().find("(expired)") != std::string::npos);

  // Expired tickets are purged as requests come, without being asked for.
  for (int i = 0; i < 5; ++i) f.issue();
  CHECK(f.sta->outstanding() == 5);
  f.clock.advance(100s);
  CHECK(f.sta->outstanding() == 0);
  f.issue();
  CHECK(f.metrics.render().find("broker_sta_tickets_outstanding 1") != std::string::npos);

  StaOptions shorter;
  shorter.ticket_lifetime = 5s;
  Fixture g(shorter);
  const std::string t = g.issue();
  g.clock.advance(5s);
  CHECK(g.post(data_request(t)).error_id == "invalid-ticket");
}

TEST_CASE("the store is bounded: count, bytes per ticket, bytes in all") {
  StaOptions o;
  o.max_tickets = 3;
  o.max_ticket_data_bytes = 1000;
  o.max_total_bytes = 2500;
  Fixture f(o);

  SUBCASE("count") {
    std::vector<std::string> held{f.issue(), f.issue(), f.issue()};
    const Reply full = f.post(ticket_request());
    CHECK(full.element == "ResponseError");
    CHECK(full.error_id == "unspecified");
    CHECK(f.log_text.str().find("ticket store full") != std::string::npos);
    CHECK(f.log_text.str().find("[warning]") != std::string::npos);
    // Outstanding tickets are never evicted; redeeming one makes room.
    for (const auto& t : held) CHECK(f.post(data_request(t)).element == "ResponseData");
    for (int i = 0; i < 3; ++i) f.issue();
    CHECK(f.post(ticket_request()).error_id == "unspecified");
    // So does expiry.
    f.clock.advance(100s);
    CHECK(f.post(ticket_request()).element == "ResponseTicket");
  }
  SUBCASE("bytes") {
    const std::vector<NameValue> big{{"XData", std::string(990, 'x')}};  // 995 bytes with the name
    const std::vector<NameValue> too_big{{"XData", std::string(996, 'x')}};
    CHECK(f.post(ticket_request(too_big)).error_id == "bad-request");
    f.issue(big);
    f.issue(big);
    CHECK(f.post(ticket_request(big)).error_id == "unspecified");  // 2985 > 2500
    CHECK(f.post(ticket_request({{"a", "b"}})).element == "ResponseTicket");
  }
}

TEST_CASE("RequestTicket that leaves out STA-v4 or STA-v1 gets unsupported-ticket-type") {
  Fixture f;
  sta::TicketRequest r;
  r.ticket_data = storefront_values();
  CHECK(f.post(sta::render_request(r)).element == "ResponseTicket");  // no lists: anything goes
  r.allowed_ticket_types = {"STA-v1", "sta-V4"};
  CHECK(f.post(sta::render_request(r)).element == "ResponseTicket");
  r.allowed_ticket_types = {"STA-v2"};
  CHECK(f.post(sta::render_request(r)).error_id == "unsupported-ticket-type");
  r.allowed_ticket_types = {"STA-v4"};
  r.allowed_authority_id_types = {"STA-v9"};
  CHECK(f.post(sta::render_request(r)).error_id == "unsupported-ticket-type");
  CHECK(f.sta->outstanding() == 2);
}

TEST_CASE("malformed bodies get ResponseError bad-request") {
  Fixture f;
  const std::string bodies[] = {
      "",
      "definitely not xml",
      "<CtxSTAProtocol><RequestTicket>",
      R"(<?xml version="1.0"?><NFuseProtocol version="5.0"><RequestCapabilities/></NFuseProtocol>)",
      R"(<CtxSTAProtocol version="4.0"/>)",
      R"(<CtxSTAProtocol version="4.0"><RequestRefresh><Ticket>AB</Ticket></RequestRefresh></CtxSTAProtocol>)",
      R"(<CtxSTAProtocol version="4.0"><RequestData><AuthorityID>STA1</AuthorityID></RequestData></CtxSTAProtocol>)",
      R"(<CtxSTAProtocol version="4.0"><RequestTicket><TicketData><Value>x</Value></TicketData></RequestTicket></CtxSTAProtocol>)",
      R"(<?xml version="1.0"?><!DOCTYPE CtxSTAProtocol [<!ENTITY x "xx">]><CtxSTAProtocol version="4.0"><RequestData><Ticket>&x;</Ticket></RequestData></CtxSTAProtocol>)",
  };
  for (const auto& body : bodies) {
    CAPTURE(body);
    const Reply r = f.post(body);
    CHECK(r.element == "ResponseError");
    CHECK(r.error_id == "bad-request");
  }
  CHECK(f.sta->outstanding() == 0);
  // Labelled by request type when the codec knew it, else "invalid" (never a client's element name).
  const auto m = f.metrics.render();
  CHECK(m.find("broker_sta_requests_total{request=\"invalid\",result=\"bad-request\"} 7") != std::string::npos);
  CHECK(m.find("broker_sta_requests_total{request=\"RequestData\",result=\"bad-request\"} 1") != std::string::npos);
  CHECK(m.find("broker_sta_requests_total{request=\"RequestTicket\",result=\"bad-request\"} 1") != std::string::npos);
  CHECK(m.find("RequestRefresh") == std::string::npos);
}

TEST_CASE("allowed_clients: others get not-trusted, before their body is read") {
  StaOptions o;
  o.allowed_clients = {"10.0.0.0/8", "192.168.1.7"};
  Fixture f(o);
  CHECK(f.post(ticket_request(), "10.20.30.40").element == "ResponseTicket");
  CHECK(f.post(ticket_request(), "::ffff:10.1.1.1").element == "ResponseTicket");
  CHECK(f.post(ticket_request(), "192.168.1.7").element == "ResponseTicket");
  const std::string t = f.issue();
  for (const std::string from : {"192.168.1.8", "127.0.0.1", "2001:db8::1"}) {
    CAPTURE(from);
    CHECK(f.post(data_request(t), from).error_id == "not-trusted");
    CHECK(f.post(ticket_request(), from).error_id == "not-trusted");
    CHECK(f.post("not xml", from).error_id == "not-trusted");
  }
  CHECK(f.post(data_request(t), "10.0.0.1").element == "ResponseData");  // not used up by the refusals
  CHECK(f.metrics.render().find("broker_sta_requests_total{request=\"untrusted\",result=\"not-trusted\"} 9") !=
        std::string::npos);
}

TEST_CASE("only POST to /scripts/ctxsta.dll, in any case") {
  Fixture f;
  CHECK(StaService::serves("/scripts/ctxsta.dll"));
  CHECK(StaService::serves("/Scripts/CtxSta.DLL"));
  CHECK_FALSE(StaService::serves("/scripts/wpnbr.dll"));
  CHECK_FALSE(StaService::serves("/scripts/ctxsta.dll/x"));
  const auto get = f.send({}, "10.1.2.3", "GET");
  CHECK(get.status == 405);
  REQUIRE(get.headers.size() == 1);
  CHECK(get.headers[0] == std::pair<std::string, std::string>{"Allow", "POST"});
  CHECK(f.send(ticket_request(), "10.1.2.3", "POST", "/scripts/other.dll").status == 404);
  CHECK(read_reply(f.send(ticket_request(), "10.1.2.3", "POST", "/SCRIPTS/CTXSTA.DLL")).element == "ResponseTicket");
  CHECK(f.send(ticket_request()).route == "/scripts/ctxsta.dll");
}

TEST_CASE("one log line per request, without tickets or TicketData values") {
  Fixture f;
  const std::string t = f.issue();
  f.post(data_request(t));
  f.post(data_request(t));
  f.post("junk");
  const std::string text = f.log_text.str();
  CHECK(text.find(t) == std::string::npos);
  CHECK(text.find(t.substr(0, 12)) == std::string::npos);
  for (const char* secret : {"CtxConnInfo", "alice", "10.0.0.5", "*:2598"}) {
    CAPTURE(secret);
    CHECK(text.find(secret) == std::string::npos);
  }
  std::istringstream lines(text);
  std::vector<std::string> sta_lines;
  for (std::string line; std::getline(lines, line);)
    if (line.find("] sta ") != std::string::npos) sta_lines.push_back(line);
  REQUIRE(sta_lines.size() == 4);
  CHECK(sta_lines[0].find("sta RequestTicket from 10.1.2.3 ticket=#") != std::string::npos);
  CHECK(sta_lines[0].find("result=ok (4 values, refreshable)") != std::string::npos);
  CHECK(sta_lines[1].find("result=ok (4 values, issued to 10.1.2.3") != std::string::npos);
  // The issue and the redemptions of one ticket carry the same name.
  const auto name = [](const std::string& line) { return line.substr(line.find("ticket=#"), 17); };
  CHECK(name(sta_lines[0]) == name(sta_lines[1]));
  CHECK(name(sta_lines[0]) == name(sta_lines[2]));
  CHECK(sta_lines[2].find("result=invalid-ticket") != std::string::npos);
  CHECK(sta_lines[3].find("sta invalid from 10.1.2.3 ticket=- result=bad-request (not_xml") != std::string::npos);
}

TEST_CASE("concurrent redemptions of the same tickets: each is answered with data exactly once") {
  Fixture f;
  std::vector<std::string> tickets;
  for (int i = 0; i < 200; ++i) tickets.push_back(f.issue({{"n", std::to_string(i)}}));
  std::atomic<int> redeemed{0}, refused{0};
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k)
    threads.emplace_back([&] {
      for (const auto& t : tickets) {
        net::HttpRequest req;
        req.method = "POST";
        req.path = "/scripts/ctxsta.dll";
        req.body = data_request(t);
        req.remote_address = "10.0.0.1";
        const auto r = f.sta->process(req);
        if (r.body.find("<ResponseData>") != std::string::npos)
          ++redeemed;
        else if (r.body.find("invalid-ticket") != std::string::npos)
          ++refused;
        // Issuing at the same time.
        req.body = ticket_request();
        f.sta->process(req);
      }
    });
  for (auto& t : threads) t.join();
  CHECK(redeemed == 200);
  CHECK(refused == 600);
  CHECK(f.sta->outstanding() == 800);
}

TEST_CASE("default_authority_id: STA and 12 hex digits, stable per site key") {
  const std::string key_a(64, 'a'), key_b(64, 'b');
  const std::string id = default_authority_id(key_a);
  CHECK(std::regex_match(id, std::regex("STA[0-9A-F]{12}")));
  CHECK(default_authority_id(key_a) == id);
  CHECK(default_authority_id(key_b) != id);
  StaOptions o;
  o.authority_id = id;
  Fixture f(o);
  CHECK(f.sta->authority_id() == id);
  CHECK(f.post(ticket_request()).authority_id == id);
}

TEST_CASE("allowed_clients by default: the site's trusted front ends and loopback, nobody else") {
  std::vector<std::string> front_ends{"192.168.7.0/24"};
  bool readable = true;
  StaOptions o;
  o.trusted_front_ends = [&]() -> std::optional<std::vector<std::string>> {
    if (!readable) return std::nullopt;
    return front_ends;
  };
  Fixture f(o);
  CHECK(f.post(ticket_request(), "192.168.7.20").element == "ResponseTicket");
  CHECK(f.post(ticket_request(), "127.0.0.1").element == "ResponseTicket");
  CHECK(f.post(ticket_request(), "::1").element == "ResponseTicket");
  CHECK(f.post(ticket_request(), "::ffff:127.0.0.1").element == "ResponseTicket");
  // Before: the default admitted any client, so anyone who reached the XML port filled the store.
  CHECK(f.post(ticket_request(), "10.1.2.3").error_id == "not-trusted");
  CHECK(f.post(ticket_request(), "2001:db8::1").error_id == "not-trusted");
  // The site's list is read at each request: an admin's change applies at once.
  front_ends = {"10.0.0.0/8"};
  CHECK(f.post(ticket_request(), "10.1.2.3").element == "ResponseTicket");
  CHECK(f.post(ticket_request(), "192.168.7.20").error_id == "not-trusted");
  // Storage failing: answered unspecified, nobody is let in by mistake.
  readable = false;
  CHECK(f.post(ticket_request(), "10.1.2.3").error_id == "unspecified");
  CHECK(f.post(ticket_request(), "127.0.0.1").element == "ResponseTicket");  // loopback needs no look-up
}

TEST_CASE("allowed_clients: \"any\" opens the STA, an empty list closes it") {
  StaOptions open;
  open.allowed_clients = {"any"};
  Fixture f(open);
  CHECK(f.post(ticket_request(), "203.0.113.9").element == "ResponseTicket");
  StaOptions closed;
  closed.allowed_clients = {};
  Fixture g(closed);
  CHECK(g.post(ticket_request(), "127.0.0.1").error_id == "not-trusted");
  CHECK(g.post(ticket_request(), "10.1.2.3").error_id == "not-trusted");
}

TEST_CASE("per-client quota in tickets and bytes; other clients are still served") {
  StaOptions o;
  o.max_tickets_per_client = 3;
  o.max_bytes_per_client = 2500;
  Fixture f(o);
  SUBCASE("tickets") {
    std::vector<std::string> held{f.issue(), f.issue(), f.issue()};
    const Reply over = f.post(ticket_request());
    CHECK(over.error_id == "unspecified");
    CHECK(f.log_text.str().find("client quota reached: 10.1.2.3 holds 3 tickets") != std::string::npos);
    CHECK(f.post(ticket_request(), "10.9.9.9").element == "ResponseTicket");  // another front end
    // Redeeming (by anyone) gives the quota back; so does expiry.
    CHECK(f.post(data_request(held[0]), "10.9.9.9").element == "ResponseData");
    CHECK(f.post(ticket_request()).element == "ResponseTicket");
    CHECK(f.post(ticket_request()).error_id == "unspecified");
    f.clock.advance(100s);
    CHECK(f.post(ticket_request()).element == "ResponseTicket");
  }
  SUBCASE("bytes") {
    const std::vector<NameValue> big{{"XData", std::string(990, 'x')}};  // 995 bytes with the name
    f.issue(big);
    f.issue(big);
    CHECK(f.post(ticket_request(big)).error_id == "unspecified");  // 2985 > 2500
    CHECK(f.post(ticket_request(big), "10.9.9.9").element == "ResponseTicket");
    CHECK(f.metrics.render().find("broker_sta_bytes_outstanding 2985") != std::string::npos);
  }
}
