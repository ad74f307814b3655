// Tests of the Secure Ticket Authority codec: the Extentrix request of the reference notes,
// our RequestData form, the rendered replies read back by an independent parser (pugixml with its
// own unescaping), and hostile input (including every not_xml and unsafe_xml file of
// tests/data/nfuse/malformed/, which must fail the same way here).
#include "xmlservice/sta_codec.hpp"

#include <doctest/doctest.h>
#include <pugixml.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <variant>
#include <vector>

using namespace xmlservice;
namespace fs = std::filesystem;

namespace {

// The request Extentrix sends, as in /work/shared/design/nfuse-reference.md section 2.10 (with
// a user and domain filled in).
const std::string kExtentrixRequest = R"(<?xml version="1.0"?>
<!DOCTYPE CtxSTAProtocol SYSTEM "CtxSTA.dtd">
<CtxSTAProtocol version="4.0">
  <RequestTicket>
    <AllowedTicketType>STA-v4</AllowedTicketType>
    <AllowedAuthorityIDType>STA-v1</AllowedAuthorityIDType>
    <TicketData>
      <Value name="ICAAddress">10.0.0.5:1494</Value>
      <Value name="XData">&lt;?xml version=&quot;1.0&quot;?&gt;&lt;CtxConnInfo version=&quot;1.0&quot;&gt;&lt;ServerAddress&gt;10.0.0.5:1494&lt;/ServerAddress&gt;&lt;UserName&gt;alice&lt;/UserName&gt;&lt;UserDomain&gt;DEMO&lt;/UserDomain&gt;&lt;ApplicationName&gt;Notepad&lt;/ApplicationName&gt;&lt;Protocol&gt;ICA&lt;/Protocol&gt;&lt;/CtxConnInfo&gt;</Value>
    </TicketData>
    <Control><Refreshable>true</Refreshable></Control>
  </RequestTicket>
</CtxSTAProtocol>
)";

const std::string kXData =
    R"(<?xml version="1.0"?><CtxConnInfo version="1.0"><ServerAddress>10.0.0.5:1494</ServerAddress>)"
    R"(<UserName>alice</UserName><UserDomain>DEMO</UserDomain><ApplicationName>Notepad</ApplicationName>)"
    R"(<Protocol>ICA</Protocol></CtxConnInfo>)";

std::string in_sta(const std::string& request_element) {
  return R"(<?xml version="1.0" encoding="UTF-8"?><CtxSTAProtocol version="4.0">)" + request_element +
         "</CtxSTAProtocol>";
}

sta::ParsedRequest parse_ok(const std::string& body) {
  auto result = sta::parse_request(body);
  if (!result) FAIL_CHECK(result.error());
  REQUIRE(result);
  return std::move(*result);
}

sta::TicketRequest ticket_request(const std::string& body) {
  sta::ParsedRequest parsed = parse_ok(body);
  REQUIRE(std::holds_alternative<sta::TicketRequest>(parsed.request));
  return std::get<sta::TicketRequest>(std::move(parsed.request));
}

sta::DataRequest data_request(const std::string& body) {
  sta::ParsedRequest parsed = parse_ok(body);
  REQUIRE(std::holds_alternative<sta::DataRequest>(parsed.request));
  return std::get<sta::DataRequest>(std::move(parsed.request));
}

sta::ParseError parse_error(const std::string& body) {
  auto result = sta::parse_request(body);
  REQUIRE(!result);
  CHECK(!result.error().message.empty());
  return result.error();
}

using Pairs = std::vector<std::pair<std::string, std::string>>;
// NameValue has no operator==: compare as pairs.
Pairs pairs(const std::vector<NameValue>& values) {
  Pairs out;
  for (const auto& v : values) out.emplace_back(v.name, v.value);
  return out;
}

// The Value children of <root>/<response>/TicketData, read by pugixml itself.
std::vector<NameValue> values_read_back(const std::string& xml, const char* response) {
  pugi::xml_document doc;
  REQUIRE(doc.load_string(xml.c_str()));
  std::vector<NameValue> out;
  for (pugi::xml_node v : doc.child("CtxSTAProtocol").child(response).child("TicketData").children("Value"))
    out.push_back({v.attribute("name").value(), v.text().get()});
  return out;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE_MESSAGE(in.good(), "cannot read " << path.string());
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_CASE("STA: the Extentrix RequestTicket") {
  const sta::ParsedRequest parsed = parse_ok(kExtentrixRequest);
  CHECK(parsed.version == "4.0");
  CHECK(parsed.encoding_label == "UTF-8");
  REQUIRE(std::holds_alternative<sta::TicketRequest>(parsed.request));
  const auto& r = std::get<sta::TicketRequest>(parsed.request);
  CHECK(r.allowed_ticket_types == std::vector<std::string>{"STA-v4"});
  CHECK(r.allowed_authority_id_types == std::vector<std::string>{"STA-v1"});
  REQUIRE(r.ticket_data.size() == 2);
  CHECK(r.ticket_data[0].name == "ICAAddress");
  CHECK(r.ticket_data[0].value == "10.0.0.5:1494");
  CHECK(r.ticket_data[1].name == "XData");
  CHECK(r.ticket_data[1].value == kXData);  // unescaped once, kept as text
  CHECK(r.refreshable);
}

TEST_CASE("STA: RequestTicket leniencies and details") {
  SUBCASE("single quotes, no prolog, no DOCTYPE, names in any case, children in any order") {
    const auto r = ticket_request(
        "<ctxstaprotocol version='4.0'><requestticket><control><refreshable>FALSE</refreshable></control>"
        "<ticketdata><value NAME='a'>1</value></ticketdata><allowedtickettype>STA-v4</allowedtickettype>"
        "<Nil/></requestticket></ctxstaprotocol>");
    CHECK(pairs(r.ticket_data) == Pairs{{"a", "1"}});
    CHECK(r.allowed_ticket_types == std::vector<std::string>{"STA-v4"});
    CHECK(!r.refreshable);
  }
  SUBCASE("values keep their order, repeated names, whitespace, CDATA and character references") {
    const auto r = ticket_request(
        in_sta("<RequestTicket><TicketData><Value name=' b '>x</Value><Value name='a'> two words </Value>"
               "<Value name='b'>y</Value><Value name='c'><![CDATA[<raw & text>]]></Value>"
               "<Value name='d'>&#233;&#x20AC;&amp;</Value><Value name='e'/></TicketData>"
               "<TicketData><Value name='f'>second list</Value></TicketData></RequestTicket>"));
    CHECK(pairs(r.ticket_data) == Pairs{{"b", "x"},
                                        {"a", " two words "},
                                        {"b", "y"},
                                        {"c", "<raw & text>"},
                                        {"d", "\xC3\xA9\xE2\x82\xAC&"},
                                        {"e", ""},
                                        {"f", "second list"}});
    CHECK(!r.refreshable);  // no Control
  }
  SUBCASE("ISO-8859-1 bodies are converted to UTF-8") {
    const auto parsed = parse_ok(
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><CtxSTAProtocol version=\"4.0\"><RequestTicket>"
        "<TicketData><Value name=\"UserName\">J\xFCrgen</Value></TicketData></RequestTicket></CtxSTAProtocol>");
    CHECK(parsed.encoding_label == "ISO-8859-1");
    CHECK(std::get<sta::TicketRequest>(parsed.request).ticket_data[0].value == "J\xC3\xBCrgen");
  }
  SUBCASE("an empty internal DTD subset is accepted") {
    CHECK(ticket_request("<!DOCTYPE CtxSTAProtocol SYSTEM \"CtxSTA.dtd\"[]>" + in_sta("<RequestTicket/>"))
              .ticket_data.empty());
  }
  SUBCASE("Refreshable spellings; the first non-empty one wins") {
    CHECK(ticket_request(in_sta("<RequestTicket><Control><Refreshable>1</Refreshable></Control></RequestTicket>"))
              .refreshable);
    CHECK(ticket_request(in_sta("<RequestTicket><Control><Refreshable/><Refreshable> True </Refreshable>"
                                "<Refreshable>false</Refreshable></Control></RequestTicket>"))
              .refreshable);
    CHECK(!ticket_request(in_sta("<RequestTicket><Control><Refreshable>0</Refreshable></Control></RequestTicket>"))
               .refreshable);
  }
  SUBCASE("several allowed types") {
    const auto r = ticket_request(
        in_sta("<RequestTicket><AllowedTicketType>STA-v2</AllowedTicketType><AllowedTicketType/>"
               "<AllowedTicketType> STA-v4 </AllowedTicketType><AllowedAuthorityIDType>STA-v1</AllowedAuthorityIDType>"
               "</RequestTicket>"));
    CHECK(r.allowed_ticket_types == std::vector<std::string>{"STA-v2", "STA-v4"});
  }
}

TEST_CASE("STA: invalid RequestTicket values") {
  for (const std::string& body : {
           in_sta("<RequestTicket><TicketData><Value>no name</Value></TicketData></RequestTicket>"),
           in_sta("<RequestTicket><TicketData><Value name='  '>blank name</Value></TicketData></RequestTicket>"),
           in_sta("<RequestTicket><Control><Refreshable>maybe</Refreshable></Control></RequestTicket>"),
       }) {
    CAPTURE(body);
    const auto e = parse_error(body);
    CHECK(e.code == sta::ParseErrc::invalid_request);
    CHECK(e.request_element == "RequestTicket");
  }
}

TEST_CASE("STA: RequestData") {
  const auto r = data_request(
      in_sta("<RequestData><AuthorityID> STA0A1B2C3D </AuthorityID><Ticket>\n  0123456789ABCDEF0123456789ABCDEF\n"
             "</Ticket><TicketVersion>STA-v4</TicketVersion></RequestData>"));
  CHECK(r.authority_id == "STA0A1B2C3D");
  CHECK(r.ticket == "0123456789ABCDEF0123456789ABCDEF");
  CHECK(r.ticket_version == "STA-v4");

  const auto minimal = data_request(in_sta("<RequestData><Ticket>T</Ticket></RequestData>"));
  CHECK(minimal.authority_id.empty());
  CHECK(minimal.ticket == "T");
  CHECK(minimal.ticket_version.empty());

  for (const std::string& body :
       {in_sta("<RequestData/>"), in_sta("<RequestData><AuthorityID>A</AuthorityID></RequestData>"),
        in_sta("<RequestData><Ticket>  </Ticket></RequestData>")}) {
    CAPTURE(body);
    const auto e = parse_error(body);
    CHECK(e.code == sta::ParseErrc::invalid_request);
    CHECK(e.message.find("Ticket") != std::string::npos);
    CHECK(e.request_element == "RequestData");
  }
}

TEST_CASE("STA: not an STA request") {
  SUBCASE("wrong root") {
    const auto e =
        parse_error("<?xml version=\"1.0\"?><NFuseProtocol version=\"5.1\"><RequestTicket/></NFuseProtocol>");
    CHECK(e.code == sta::ParseErrc::not_sta);
    CHECK(e.message.find("CtxSTAProtocol") != std::string::npos);
  }
  SUBCASE("no request element") {
    CHECK(parse_error(in_sta("")).code == sta::ParseErrc::not_sta);
    CHECK(parse_error(in_sta("<ResponseTicket/>")).code == sta::ParseErrc::not_sta);
    CHECK(parse_error(in_sta("text only")).code == sta::ParseErrc::not_sta);
  }
  SUBCASE("the request element is reported as sent") {
    CHECK(parse_error(in_sta("<requestdata/>")).request_element == "requestdata");
  }
  SUBCASE("an unknown request") {
    const auto e = parse_error(in_sta("<RequestRefresh><Ticket>T</Ticket></RequestRefresh>"));
    CHECK(e.code == sta::ParseErrc::unknown_request);
    CHECK(e.request_element == "RequestRefresh");
    const auto odd = parse_error(in_sta("<Request\xC3\xA9/>"));
    CHECK(odd.code == sta::ParseErrc::unknown_request);
    CHECK(odd.request_element.empty());  // not echoed: not a plain ASCII name
  }
  SUBCASE("not XML at all") {
    for (const std::string& body : {std::string(), std::string("hello"), std::string("{\"ticket\": \"T\"}"),
                                    std::string("<CtxSTAProtocol><RequestData>"), std::string("\0\0\0", 3),
                                    in_sta("<RequestData><Ticket>a &nbsp; b</Ticket></RequestData>")}) {
      CAPTURE(body);
      CHECK(parse_error(body).code == sta::ParseErrc::not_xml);
    }
    CHECK(parse_error("<html><body>hi</body></html>").code == sta::ParseErrc::not_sta);
  }
}

TEST_CASE("STA: hostile XML is refused") {
  SUBCASE("entity declarations (billion laughs, external entities)") {
    const std::string laughs =
        "<?xml version=\"1.0\"?><!DOCTYPE CtxSTAProtocol [<!ENTITY lol \"lol\">"
        "<!ENTITY lol2 \"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;\">]>"
        "<CtxSTAProtocol version=\"4.0\"><RequestData><Ticket>&lol2;</Ticket></RequestData></CtxSTAProtocol>";
    const std::string external =
        "<?xml version=\"1.0\"?><!DOCTYPE CtxSTAProtocol [<!ENTITY xxe SYSTEM \"file:///etc/passwd\">]>"
        "<CtxSTAProtocol version=\"4.0\"><RequestTicket><TicketData><Value name=\"XData\">&xxe;</Value>"
        "</TicketData></RequestTicket></CtxSTAProtocol>";
    for (const std::string& body : {laughs, external}) {
      const auto e = parse_error(body);
      CHECK(e.code == sta::ParseErrc::unsafe_xml);
      CHECK(e.message.find("DTD") != std::string::npos);
    }
  }
  SUBCASE("nesting beyond kMaxDepth") {
    std::string inner;
    for (int i = 0; i < sta::kMaxDepth; ++i) inner = "<x>" + inner + "</x>";
    const auto e = parse_error(in_sta("<RequestTicket><TicketData>" + inner + "</TicketData></RequestTicket>"));
    CHECK(e.code == sta::ParseErrc::unsafe_xml);
    // Exactly kMaxDepth levels are fine (CtxSTAProtocol, RequestTicket, then kMaxDepth - 2).
    std::string ok;
    for (int i = 0; i < sta::kMaxDepth - 2; ++i) ok = "<x>" + ok + "</x>";
    CHECK(ticket_request(in_sta("<RequestTicket>" + ok + "</RequestTicket>")).ticket_data.empty());

    std::string deep;
    for (int i = 0; i < 100000; ++i) deep += "<a>";
    CHECK(parse_error(in_sta("<RequestTicket>" + deep)).code == sta::ParseErrc::not_xml);  // truncated
    for (int i = 0; i < 100000; ++i) deep += "</a>";
    CHECK(parse_error(in_sta("<RequestTicket>" + deep + "</RequestTicket>")).code == sta::ParseErrc::unsafe_xml);
  }
  SUBCASE("the NFuse corpus of malformed XML fails the same way") {
    const fs::path dir = fs::path(OPENBROKER_SOURCE_DIR) / "tests" / "data" / "nfuse" / "malformed";
    int checked = 0;
    for (const auto& entry : fs::directory_iterator(dir)) {
      const std::string name = entry.path().filename().string();
      const std::string cls = name.substr(0, name.find('-'));
      if (cls != "not_xml" && cls != "unsafe_xml") continue;
      CAPTURE(name);
      CHECK(to_string(parse_error(read_file(entry.path())).code) == cls);
      ++checked;
    }
    CHECK(checked >= 20);
  }
  SUBCASE("every prefix of a valid request parses or fails cleanly") {
    for (std::size_t n = 0; n < kExtentrixRequest.size(); ++n) {
      const auto result = sta::parse_request(std::string_view(kExtentrixRequest).substr(0, n));
      if (!result) CHECK(!result.error().message.empty());
    }
  }
}

TEST_CASE("STA: ResponseTicket and ResponseError are written as documented") {
  CHECK(sta::render(sta::TicketResponse{"STA0A1B2C3D", "0123456789ABCDEF0123456789ABCDEF"}) ==
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
        "<CtxSTAProtocol version=\"4.0\">\n"
        "  <ResponseTicket>\n"
        "    <AuthorityID>STA0A1B2C3D</AuthorityID>\n"
        "    <Ticket>0123456789ABCDEF0123456789ABCDEF</Ticket>\n"
        "    <TicketVersion>STA-v4</TicketVersion>\n"
        "  </ResponseTicket>\n"
        "</CtxSTAProtocol>\n");
  CHECK(sta::render(sta::ErrorResponse{sta::ErrorId::invalid_ticket}) ==
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
        "<CtxSTAProtocol version=\"4.0\">\n"
        "  <ResponseError>\n"
        "    <ErrorId>invalid-ticket</ErrorId>\n"
        "  </ResponseError>\n"
        "</CtxSTAProtocol>\n");
  for (auto id : {sta::ErrorId::unspecified, sta::ErrorId::bad_request, sta::ErrorId::not_trusted,
                  sta::ErrorId::unsupported_ticket_type, sta::ErrorId::invalid_ticket}) {
    pugi::xml_document doc;
    REQUIRE(doc.load_string(sta::render(sta::ErrorResponse{id}).c_str()));
    CHECK(std::string(doc.child("CtxSTAProtocol").child("ResponseError").child_value("ErrorId")) == to_string(id));
  }
}

TEST_CASE("STA: ResponseData carries the deposited values back unchanged") {
  // What a front end deposited, as parsed, is what the gateway reads back.
  const auto deposited = ticket_request(kExtentrixRequest).ticket_data;
  const std::string rendered = sta::render(sta::DataResponse{deposited});
  CHECK(rendered.find("<ResponseData>\n    <TicketData>\n      <Value name=\"ICAAddress\">10.0.0.5:1494</Value>\n") !=
        std::string::npos);
  CHECK(pairs(values_read_back(rendered, "ResponseData")) == pairs(deposited));

  const std::vector<NameValue> tricky = {
      {"quotes \" and ' <&>", "markup <a href=\"x\">&amp;</a>"},
      {"lines", "one\ntwo\r\nthree\tfour"},
      {"non-ASCII", "J\xC3\xBCrgen \xE2\x82\xAC \xF0\x9F\x98\x80"},
      {"empty", ""},
      {"XData", kXData},
  };
  CHECK(pairs(values_read_back(sta::render(sta::DataResponse{tricky}), "ResponseData")) == pairs(tricky));

  // Bytes XML cannot carry are replaced, never written raw.
  const auto replaced =
      values_read_back(sta::render(sta::DataResponse{{{"bad", std::string("a\0b\xFF", 4)}}}), "ResponseData");
  REQUIRE(replaced.size() == 1);
  CHECK(replaced[0].value ==
        "a\xEF\xBF\xBD"
        "b\xEF\xBF\xBD");

  CHECK(values_read_back(sta::render(sta::DataResponse{}), "ResponseData").empty());
}

TEST_CASE("STA: render_request and parse_request round trip") {
  sta::TicketRequest t;
  t.allowed_ticket_types = {"STA-v4"};
  t.allowed_authority_id_types = {"STA-v1"};
  t.ticket_data = {{"ICAAddress", "10.0.0.5:1494"}, {"XData", kXData}, {"a", "  spaced <&> \"q\" \n"}, {"a", ""}};
  t.refreshable = true;
  const std::string body = sta::render_request(t);
  CHECK(body.rfind("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE CtxSTAProtocol SYSTEM \"CtxSTA.dtd\">\n"
                   "<CtxSTAProtocol version=\"4.0\">\n  <RequestTicket>\n",
                   0) == 0);
  const auto parsed = parse_ok(body);
  CHECK(parsed.version == sta::kProtocolVersion);
  const auto& back = std::get<sta::TicketRequest>(parsed.request);
  CHECK(back.allowed_ticket_types == t.allowed_ticket_types);
  CHECK(back.allowed_authority_id_types == t.allowed_authority_id_types);
  CHECK(pairs(back.ticket_data) == pairs(t.ticket_data));
  CHECK(back.refreshable);

  sta::DataRequest d{"STA0A1B2C3D", "0123456789ABCDEF", "STA-v4"};
  const auto data = data_request(sta::render_request(d));
  CHECK(data.authority_id == d.authority_id);
  CHECK(data.ticket == d.ticket);
  CHECK(data.ticket_version == d.ticket_version);
}
