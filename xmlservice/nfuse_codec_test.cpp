// Tests of the NFuse codec against the files of tests/data/nfuse/:
//   requests/   one file per request type and client variant; each is parsed and its fields checked
//   malformed/  <expected ParseErrc>-<what>.xml: each must fail with exactly that class
//   responses/  golden replies: typed responses are rendered and compared byte for byte
// Run with OPENBROKER_UPDATE_GOLDEN=1 to rewrite the golden replies (then review the diff).
#include "xmlservice/nfuse_codec.hpp"

#include <doctest/doctest.h>
#include <pugixml.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

using namespace xmlservice;
namespace fs = std::filesystem;

namespace {

fs::path data_dir() { return fs::path(OPENBROKER_SOURCE_DIR) / "tests" / "data" / "nfuse"; }

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE_MESSAGE(in.good(), "cannot read " << path.string());
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<fs::path> files_in(const std::string& sub) {
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(data_dir() / sub))
    if (entry.is_regular_file()) files.push_back(entry.path());
  std::sort(files.begin(), files.end());
  return files;
}

ParsedRequest parse_file(const std::string& name) {
  auto result = parse_request(read_file(data_dir() / "requests" / name));
  if (!result) FAIL_CHECK(name << ": " << to_string(result.error().code) << ": " << result.error().message);
  REQUIRE(result);
  return std::move(*result);
}

template <class T>
T request_as(const std::string& name) {
  ParsedRequest parsed = parse_file(name);
  REQUIRE_MESSAGE(std::holds_alternative<T>(parsed.request), name << " parsed as " << request_name(parsed.request));
  return std::get<T>(std::move(parsed.request));
}

void check_golden(const std::string& name, const std::string& rendered) {
  const fs::path path = data_dir() / "responses" / name;
  if (std::getenv("OPENBROKER_UPDATE_GOLDEN")) {
    std::ofstream(path, std::ios::binary) << rendered;
    return;
  }
  CAPTURE(name);
  CHECK(rendered == read_file(path));
}

void check_credentials_demo_user(const std::optional<Credentials>& c) {
  REQUIRE(c);
  CHECK(c->user_name == "demo-user");
  REQUIRE(c->password);
  CHECK(c->password->encoding == PasswordEncoding::ctx1);
  CHECK(c->password->encoding_label == "ctx1");
  CHECK(c->password->plain == std::optional<std::string>("password"));
  REQUIRE(c->domain);
  CHECK(c->domain->name == "SEPAGOND");
  CHECK(c->domain->type == DomainType::nt);
  CHECK(!c->anonymous);
  CHECK(c->ids.empty());
}

}  // namespace

// =============================================================================================
// Requests

TEST_CASE("every request file parses, and every request type has one") {
  const std::map<std::string, std::string> prefixes = {
      {"capabilities-", "RequestCapabilities"},
      {"validate-credentials-", "RequestValidateCredentials"},
      {"appdata-", "RequestAppData"},
      {"serverfarmdata-", "RequestServerFarmData"},
      {"serverdata-", "RequestServerData"},
      {"protocolinfo-", "RequestProtocolInfo"},
      {"address-", "RequestAddress"},
      {"ticket-", "RequestTicket"},
      {"launchref-", "RequestLaunchRef"},
      {"reconnect-session-data-", "RequestReconnectSessionData"},
      {"disconnect-user-sessions-", "RequestDisconnectUserSessions"},
      {"logoff-user-sessions-", "RequestLogoffUserSessions"},
  };
  std::set<std::string> seen;
  for (const auto& path : files_in("requests")) {
    const std::string name = path.filename().string();
    CAPTURE(name);
    auto result = parse_request(read_file(path));
    REQUIRE_MESSAGE(result, to_string(result.error().code) << ": " << result.error().message);
    std::string expected;
    for (const auto& [prefix, request] : prefixes)
      if (name.rfind(prefix, 0) == 0) expected = request;
    CHECK(request_name(result->request) == expected);
    seen.insert(std::string(request_name(result->request)));
    CHECK(!result->version.empty());
  }
  CHECK(seen.size() == std::variant_size_v<NFuseRequest>);
}

TEST_CASE("RequestCapabilities: canonical, <Nil />, ISO-8859-1, empty subset, BOM + CRLF without DOCTYPE") {
  auto wi = parse_file("capabilities-wi50.xml");
  CHECK(wi.version == "5.0");
  CHECK(wi.encoding_label == "UTF-8");
  CHECK(std::holds_alternative<RequestCapabilities>(wi.request));

  auto pn = parse_file("capabilities-pn11-nil-latin1.xml");
  CHECK(pn.version == "1.1");
  CHECK(pn.encoding_label == "ISO-8859-1");
  CHECK(std::holds_alternative<RequestCapabilities>(pn.request));

  auto fma = parse_file("capabilities-fma55-empty-subset.xml");
  CHECK(fma.version == "5.5");
  CHECK(std::holds_alternative<RequestCapabilities>(fma.request));

  auto ps = parse_file("capabilities-powershell-bom-crlf-nodoctype.xml");
  CHECK(ps.encoding_label == "utf-8");  // echoed as sent
  CHECK(std::holds_alternative<RequestCapabilities>(ps.request));
}

TEST_CASE("RequestValidateCredentials: ctx1, NT domain, DesiredInfo user-identity") {
  auto r = request_as<RequestValidateCredentials>("validate-credentials-wi54-ctx1.xml");
  check_credentials_demo_user(r.credentials);
  CHECK(r.desired_user_identity);
}

TEST_CASE("RequestValidateCredentials: single quotes, references, cleartext kept untrimmed") {
  auto parsed = parse_file("validate-credentials-extentrix42-single-quotes.xml");
  CHECK(parsed.version == "4.2");
  CHECK(parsed.encoding_label == "utf-8");
  const auto& r = std::get<RequestValidateCredentials>(parsed.request);
  REQUIRE(r.credentials);
  CHECK(r.credentials->user_name == "joe smith");
  REQUIRE(r.credentials->password);
  CHECK(r.credentials->password->encoding == PasswordEncoding::cleartext);
  CHECK(r.credentials->password->plain == std::optional<std::string>(" p&ss w<rd! "));
  CHECK(r.credentials->domain->name == "DEMO");
  CHECK(!r.desired_user_identity);
}

TEST_CASE("RequestValidateCredentials: UPN, anonymous, pass-through IDs") {
  auto upn = request_as<RequestValidateCredentials>("validate-credentials-upn.xml");
  REQUIRE(upn.credentials);
  CHECK(upn.credentials->user_name == "alice@demo.local");
  CHECK(upn.credentials->password->plain == std::optional<std::string>("Password1"));
  CHECK(!upn.credentials->domain);

  auto anon = request_as<RequestValidateCredentials>("validate-credentials-anonymous.xml");
  REQUIRE(anon.credentials);
  CHECK(anon.credentials->anonymous);
  CHECK(anon.credentials->user_name.empty());
  CHECK(!anon.credentials->password);

  auto sso = request_as<RequestValidateCredentials>("validate-credentials-passthrough-ids.xml");
  REQUIRE(sso.credentials);
  CHECK(!sso.credentials->password);
  const auto& ids = sso.credentials->ids;
  REQUIRE(ids.size() == 5);
  CHECK((ids[0].type == IdType::sam && ids[0].value == "DEMO\\alice"));
  CHECK((ids[1].type == IdType::sid && ids[1].value == "S-1-5-21-1004336348-1177238915-682003330-1114"));
  CHECK((ids[2].type == IdType::sid && ids[2].value == "S-1-5-32-545"));
  CHECK((ids[3].type == IdType::upn && ids[3].value == "alice@demo.local"));
  CHECK((ids[4].type == IdType::sam && ids[4].value == "DEMO\\alice2"));  // no type attribute: SAM
  CHECK(sso.desired_user_identity);
}

TEST_CASE("RequestValidateCredentials: ISO-8859-1 text is converted to UTF-8") {
  auto parsed = parse_file("validate-credentials-latin1.xml");
  CHECK(parsed.encoding_label == "ISO-8859-1");
  const auto& c = std::get<RequestValidateCredentials>(parsed.request).credentials;
  REQUIRE(c);
  CHECK(c->user_name == "J\xC3\xBCrgen");
  CHECK(c->password->plain == std::optional<std::string>("P\xC3\xA4ssw\xC3\xB6rd\xE2\x82\xAC"));
  CHECK(c->domain->name == "B\xC3\x9CRO");
}

TEST_CASE("RequestValidateCredentials: undecodable passwords parse, with no plain text") {
  auto bad = request_as<RequestValidateCredentials>("validate-credentials-bad-ctx1.xml");
  REQUIRE(bad.credentials);
  REQUIRE(bad.credentials->password);
  CHECK(bad.credentials->password->encoding == PasswordEncoding::ctx1);
  CHECK(!bad.credentials->password->plain);

  auto rsa = request_as<RequestValidateCredentials>("validate-credentials-rsa128.xml");
  REQUIRE(rsa.credentials);
  CHECK(rsa.credentials->password->encoding == PasswordEncoding::unsupported);
  CHECK(rsa.credentials->password->encoding_label == "rsa128");
  CHECK(!rsa.credentials->password->plain);
  CHECK(rsa.credentials->domain->type == DomainType::unix_domain);
}

TEST_CASE("RequestAppData: Web Interface pass 1") {
  auto r = request_as<RequestAppData>("appdata-wi50-pass1.xml");
  REQUIRE(r.scope);
  CHECK(r.scope->traverse == Traverse::subtree);
  CHECK(r.scope->folder.empty());
  CHECK(r.desired_details == std::vector<DetailLevel>{DetailLevel::rade_offline_mode});
  CHECK(r.server_types == std::vector<ServerType>{ServerType::all});
  CHECK(r.client_types == std::vector<ClientType>{ClientType::ica30, ClientType::rade, ClientType::content});
  check_credentials_demo_user(r.credentials);
  CHECK(r.client_name == "WI_7IR5mS5__XBwkUuKL");
  REQUIRE(r.client_address);
  CHECK(r.client_address->type == AddressType::dot);
  CHECK(r.client_address->value == "192.168.182.1");
  CHECK(r.app_names.empty());
  CHECK(r.desired_icon_data.empty());
}

TEST_CASE("RequestAppData: Web Interface pass 2 (details, icons, AppName list, no credentials)") {
  auto r = request_as<RequestAppData>("appdata-wi50-pass2.xml");
  CHECK(r.desired_details == std::vector<DetailLevel>{DetailLevel::defaults, DetailLevel::file_type});
  CHECK(r.wants(DetailLevel::file_type));
  CHECK(!r.wants(DetailLevel::icon_info));
  REQUIRE(r.desired_icon_data.size() == 2);
  CHECK(r.desired_icon_data[0].size == 32);
  CHECK(r.desired_icon_data[0].bpp == 4);
  CHECK(r.desired_icon_data[0].format == IconFormat::raw);
  CHECK(r.desired_icon_data[1].size == 16);
  CHECK(r.desired_icon_data[1].bpp == 32);
  CHECK(r.desired_icon_data[1].format == IconFormat::png);
  CHECK(r.app_names == std::vector<std::string>{"Notepad", "Command Prompt"});
  CHECK(!r.credentials);
}

TEST_CASE("RequestAppData: WI 4.x 'default' and attribute defaults of DesiredIconData") {
  auto r = request_as<RequestAppData>("appdata-wi40-default.xml");
  CHECK(r.desired_details == std::vector<DetailLevel>{DetailLevel::defaults});
  REQUIRE(r.desired_icon_data.size() == 1);
  CHECK(r.desired_icon_data[0].size == 32);
  CHECK(r.desired_icon_data[0].bpp == 4);
  CHECK(r.desired_icon_data[0].format == IconFormat::raw);
  CHECK(!r.scope);
}

TEST_CASE("RequestAppData: StoreFront permissions, any child order") {
  auto r = request_as<RequestAppData>("appdata-sf54-permissions.xml");
  CHECK(r.desired_details == std::vector<DetailLevel>{DetailLevel::permissions});
  check_credentials_demo_user(r.credentials);
  CHECK(r.client_name == "WI_pKQkz4qG5gI1YvUU");
  CHECK(r.client_address->value == "10.1.2.3");
  CHECK(r.client_types == std::vector<ClientType>{ClientType::ica30, ClientType::content});
  CHECK(r.server_types == std::vector<ServerType>{ServerType::all});
  REQUIRE(r.scope);
  CHECK(r.scope->traverse == Traverse::subtree);
}

TEST_CASE("RequestAppData: PNA 4.6 without DOCTYPE, PNFolder scope, DeviceId") {
  auto parsed = parse_file("appdata-pna46-prelaunch-nodoctype.xml");
  CHECK(parsed.version == "4.6");
  const auto& r = std::get<RequestAppData>(parsed.request);
  REQUIRE(r.scope);
  CHECK(r.scope->traverse == Traverse::onelevel);
  CHECK(r.scope->type == "PNFolder");
  CHECK(r.scope->folder == "$PRELAUNCH$");
  CHECK(r.server_types == std::vector<ServerType>{ServerType::win32, ServerType::x});
  CHECK(r.device_id == "WR_9bf5c6d7");
  CHECK(r.client_name.empty());
}

TEST_CASE("RequestAppData: case drift, unknown values, lists, CDATA, comments, first wins") {
  auto parsed = parse_file("appdata-case-drift.xml");
  CHECK(parsed.version == "5.5");
  const auto& r = std::get<RequestAppData>(parsed.request);
  REQUIRE(r.scope);
  CHECK(r.scope->traverse == Traverse::onelevel);
  CHECK(r.scope->folder == "Office\\Tools");
  // "bogus-level" is ignored; "icon-info, access-list" is a list.
  CHECK(r.desired_details == std::vector<DetailLevel>{DetailLevel::all, DetailLevel::icon_info, DetailLevel::access_list});
  CHECK(r.server_types == std::vector<ServerType>{ServerType::win32});
  CHECK(r.client_types == std::vector<ClientType>{ClientType::unknown});  // never widens a filter
  CHECK(r.app_names == std::vector<std::string>{"R&D <Tools>"});
  CHECK(r.client_name == "hand-made");
}

TEST_CASE("RequestServerFarmData, RequestServerData, RequestProtocolInfo (PN-era)") {
  auto farm = parse_file("serverfarmdata-pn11-nil-latin1.xml");
  CHECK(farm.encoding_label == "ISO-8859-1");
  CHECK(!std::get<RequestServerFarmData>(farm.request).credentials);

  auto servers = request_as<RequestServerData>("serverdata-scanner11.xml");
  CHECK(servers.server_types == std::vector<ServerType>{ServerType::all});
  CHECK(servers.client_types == std::vector<ClientType>{ClientType::all});

  auto info = request_as<RequestProtocolInfo>("protocolinfo-pn11-latin1.xml");
  REQUIRE(info.server_address);
  CHECK(info.server_address->type == AddressType::dns_port);
  CHECK(info.server_address->value.empty());
}

TEST_CASE("RequestAddress: application, session reconnect, PN unspecified name, 7.x") {
  auto app = request_as<RequestAddress>("address-wi50-app.xml");
  CHECK(app.name.kind == LaunchNameKind::app);
  CHECK(app.name.value == "Notepad");
  CHECK(app.client_name == "WI_7IR5mS5__XBwkUuKL");
  CHECK(app.client_address->type == AddressType::dot);
  REQUIRE(app.server_address);
  CHECK(app.server_address->type == AddressType::dns_port);
  CHECK(app.alt_addr);
  CHECK(!app.no_load_bias);
  check_credentials_demo_user(app.credentials);
  CHECK(app.client_types == std::vector<ClientType>{ClientType::ica30});

  auto session = request_as<RequestAddress>("address-wi50-reconnect-session.xml");
  CHECK(session.name.kind == LaunchNameKind::session);
  CHECK(session.name.session.in_name == "Notepad");
  CHECK(session.name.session.host_id.type == "ima-host-id");
  CHECK(session.name.session.host_id.value == "23363");
  CHECK(session.name.session.session_id == "2");
  CHECK(session.server_address->type == AddressType::dot);

  auto pn = request_as<RequestAddress>("address-pn11-unspecified-latin1.xml");
  CHECK(pn.name.kind == LaunchNameKind::unspecified);
  CHECK(pn.name.value == "FOOFARM01*");
  CHECK(pn.client_address->type == AddressType::dns_port);
  CHECK(pn.client_address->value.empty());
  CHECK(!pn.alt_addr);
  REQUIRE(pn.credentials);
  CHECK(pn.credentials->user_name == "bob");
  CHECK(!pn.credentials->password);
  CHECK(pn.credentials->domain->type == DomainType::unspecified);

  auto xl = request_as<RequestAddress>("address-xenlauncher58.xml");
  CHECK(xl.name.kind == LaunchNameKind::app);
  CHECK(xl.name.value == "CTX:Microsoft Office - Word");
  CHECK(xl.alt_addr);
  CHECK(xl.no_load_bias);
  CHECK(xl.device_id == "XL_0001");
  CHECK(xl.server_address->type == AddressType::dot_port);
  REQUIRE(xl.credentials);
  CHECK(xl.credentials->ids.size() == 2);
  REQUIRE(xl.session_settings.size() == 3);
  CHECK(xl.session_settings[0].name == "ColorDepth");
  CHECK(xl.session_settings[0].value == "24");
  CHECK(xl.session_settings[2].name == "EnableSessionSharing");
}

TEST_CASE("RequestTicket: TimetoLive and TimeToLive spellings, SessionContext") {
  auto wi = request_as<RequestTicket>("ticket-wi50.xml");
  CHECK(wi.ticket_type == "CtxLogon");
  CHECK(wi.ticket_tag == "IMAHostId:23363");
  CHECK(wi.time_to_live == std::optional<std::uint32_t>(200));
  check_credentials_demo_user(wi.credentials);

  auto xse = request_as<RequestTicket>("ticket-xse-timetolive.xml");
  CHECK(xse.time_to_live == std::optional<std::uint32_t>(3600));
  CHECK(xse.launch_ref == "LR-0042");
  REQUIRE(xse.session_context.size() == 2);
  CHECK(xse.session_context[0].name == "ClientVersion");
  CHECK(xse.session_context[0].value == "12.0");
  CHECK(xse.session_context[1].value == "ag.example");
}

TEST_CASE("RequestLaunchRef, RequestReconnectSessionData, Disconnect/LogoffUserSessions") {
  auto lr = request_as<RequestLaunchRef>("launchref-sf.xml");
  CHECK(lr.type == LaunchRefType::ica);
  CHECK(lr.ticket_tag == "IMAHostId:23363");
  CHECK(lr.device_id == "WR_12345");
  CHECK(lr.session_sharing_key == "4-basic-basic-DEMO-alice-Farm");
  CHECK(lr.time_to_live == std::optional<std::uint32_t>(200));
  check_credentials_demo_user(lr.credentials);

  auto rc = request_as<RequestReconnectSessionData>("reconnect-session-data-wi50.xml");
  CHECK(rc.session_types == std::vector<SessionType>{SessionType::active, SessionType::disconnected});
  CHECK(rc.client_name == "WI_7IR5mS5__XBwkUuKL");
  CHECK(rc.server_types == std::vector<ServerType>{ServerType::all});
  check_credentials_demo_user(rc.credentials);

  auto dc = request_as<RequestDisconnectUserSessions>("disconnect-user-sessions-wi50.xml");
  CHECK(dc.client_name == "WI_7IR5mS5__XBwkUuKL");
  CHECK(dc.client_types == std::vector<ClientType>{ClientType::ica30});
  check_credentials_demo_user(dc.credentials);

  auto lo = request_as<RequestLogoffUserSessions>("logoff-user-sessions-sf.xml");
  CHECK(lo.device_id == "WR_12345");
  REQUIRE(lo.session_context.size() == 1);
  CHECK(lo.session_context[0].name == "Reason");
}

TEST_CASE("requests of at least 512 KB parse (users with many group SIDs)") {
  std::string body =
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<NFuseProtocol version=\"5.4\">\n<RequestAppData>\n"
      "<DesiredDetails>permissions</DesiredDetails>\n<Credentials>\n<ID type=\"SAM\">DEMO\\alice</ID>\n";
  int sids = 0;
  while (body.size() < 600 * 1024) {
    body += "<ID type=\"SID\">S-1-5-21-1004336348-1177238915-682003330-" + std::to_string(100000 + sids) + "</ID>\n";
    ++sids;
  }
  body += "</Credentials>\n</RequestAppData>\n</NFuseProtocol>\n";
  auto result = parse_request(body);
  REQUIRE(result);
  const auto& r = std::get<RequestAppData>(result->request);
  REQUIRE(r.credentials);
  CHECK(r.credentials->ids.size() == static_cast<std::size_t>(sids) + 1);
}

// =============================================================================================
// Malformed and hostile input

TEST_CASE("every malformed file fails with the class its name announces") {
  const std::map<std::string, ParseErrc> classes = {
      {"not_xml", ParseErrc::not_xml},
      {"unsafe_xml", ParseErrc::unsafe_xml},
      {"not_nfuse", ParseErrc::not_nfuse},
      {"unknown_request", ParseErrc::unknown_request},
      {"invalid_request", ParseErrc::invalid_request},
  };
  std::set<ParseErrc> seen;
  for (const auto& path : files_in("malformed")) {
    const std::string name = path.filename().string();
    CAPTURE(name);
    const auto cls = classes.find(name.substr(0, name.find('-')));
    REQUIRE(cls != classes.end());
    auto result = parse_request(read_file(path));
    REQUIRE(!result);
    CHECK(to_string(result.error().code) == to_string(cls->second));
    CHECK(!result.error().message.empty());
    CHECK(answered_in_band(result.error().code) == !result.error().response_element.empty());
    seen.insert(result.error().code);
  }
  CHECK(seen.size() == classes.size());
}

TEST_CASE("unknown and invalid requests carry what the in-band reply needs") {
  auto farm = parse_request(read_file(data_dir() / "malformed" / "unknown_request-farmdata.xml"));
  REQUIRE(!farm);
  CHECK(farm.error().request_element == "RequestFarmData");
  CHECK(farm.error().response_element == "ResponseFarmData");
  CHECK(farm.error().version == "5.0");
  CHECK(farm.error().encoding_label == "UTF-8");

  auto alt = parse_request(read_file(data_dir() / "malformed" / "unknown_request-altaddress-latin1.xml"));
  REQUIRE(!alt);
  CHECK(alt.error().response_element == "ResponseAltAddress");
  CHECK(alt.error().encoding_label == "ISO-8859-1");

  auto ttl = parse_request(read_file(data_dir() / "malformed" / "invalid_request-negative-ttl.xml"));
  REQUIRE(!ttl);
  CHECK(ttl.error().request_element == "RequestTicket");
  CHECK(ttl.error().response_element == "ResponseTicket");

  // A lower-case known request answers with the canonical spelling.
  auto lower = parse_request("<NFuseProtocol version='5.0'><requestappdata><Scope traverse='x'/></requestappdata></NFuseProtocol>");
  REQUIRE(!lower);
  CHECK(lower.error().code == ParseErrc::invalid_request);
  CHECK(lower.error().request_element == "requestappdata");
  CHECK(lower.error().response_element == "ResponseAppData");

  // Names that cannot be echoed safely are not answered in-band.
  auto odd = parse_request("<NFuseProtocol version='5.0'><Request\xC3\xA9/></NFuseProtocol>");
  REQUIRE(!odd);
  CHECK(odd.error().code == ParseErrc::not_nfuse);
}

TEST_CASE("nesting: 64 levels are accepted, 65 are not") {
  auto nested = [](int levels) {  // NFuseProtocol and RequestCapabilities are 2 of the levels
    std::string body = "<NFuseProtocol version=\"5.0\"><RequestCapabilities>";
    for (int i = 2; i < levels; ++i) body += "<Nil>";
    for (int i = 2; i < levels; ++i) body += "</Nil>";
    return body + "</RequestCapabilities></NFuseProtocol>";
  };
  CHECK(parse_request(nested(kMaxDepth)));
  auto deep = parse_request(nested(kMaxDepth + 1));
  REQUIRE(!deep);
  CHECK(deep.error().code == ParseErrc::unsafe_xml);

  // Far deeper than any stack would allow for a recursive walker.
  auto very_deep = parse_request(nested(200000));
  REQUIRE(!very_deep);
  CHECK(very_deep.error().code == ParseErrc::unsafe_xml);
  std::string unclosed(300000, ' ');
  for (std::size_t i = 0; i < unclosed.size(); i += 3) unclosed.replace(i, 3, "<a>");
  auto truncated = parse_request(unclosed);
  REQUIRE(!truncated);
  CHECK(truncated.error().code == ParseErrc::not_xml);
}

TEST_CASE("entity declarations are refused before any expansion; external DTDs are never read") {
  // The refusal does not depend on the entity being used.
  auto unused = parse_request(
      "<!DOCTYPE NFuseProtocol [<!ENTITY a \"b\">]><NFuseProtocol version=\"5.0\"><RequestCapabilities/></NFuseProtocol>");
  REQUIRE(!unused);
  CHECK(unused.error().code == ParseErrc::unsafe_xml);
  // A SYSTEM id alone is fine (it is never fetched); so is an empty subset, with spaces.
  CHECK(parse_request("<!DOCTYPE NFuseProtocol SYSTEM \"http://attacker.example/x.dtd\"><NFuseProtocol version=\"5.0\">"
                      "<RequestCapabilities/></NFuseProtocol>"));
  CHECK(parse_request("<!DOCTYPE NFuseProtocol SYSTEM \"NFuse.dtd\" [ \n ]><NFuseProtocol version=\"5.0\">"
                      "<RequestCapabilities/></NFuseProtocol>"));
  // A reference to an entity that is not declared is not XML.
  auto undeclared = parse_request("<NFuseProtocol version=\"5.0\"><RequestAppData><AppName>&lol9;</AppName></RequestAppData></NFuseProtocol>");
  REQUIRE(!undeclared);
  CHECK(undeclared.error().code == ParseErrc::not_xml);
  // Deeply nested conditional sections in a DTD do not crash the DTD skipper.
  std::string dtd = "<!DOCTYPE x [";
  for (int i = 0; i < 100000; ++i) dtd += "<![";
  auto sections = parse_request(dtd + "]><NFuseProtocol version=\"5.0\"><RequestCapabilities/></NFuseProtocol>");
  CHECK(!sections);
}

TEST_CASE("invalid UTF-8 anywhere is not XML; the same bytes declared ISO-8859-1 are fine") {
  const std::string head = "<NFuseProtocol version=\"5.0\"><RequestValidateCredentials><Credentials><UserName>";
  const std::string tail = "</UserName></Credentials></RequestValidateCredentials></NFuseProtocol>";
  for (const std::string bad : {"\x80", "\xC3", "\xC3\x28", "\xE2\x82", "\xF0\x9F\x98", "\xF8\x88\x80\x80\x80", "\xC1\xBF",
                                "\xE0\x80\xAF", "\xED\xBF\xBF", "\xF4\x90\x80\x80", "\xEF\xBF\xBE"}) {
    CAPTURE(bad);
    auto r = parse_request(head + bad + tail);
    REQUIRE(!r);
    CHECK(r.error().code == ParseErrc::not_xml);
  }
  auto latin1 = parse_request("<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?>" + head + "\xC3\x28\xFF" + tail);
  REQUIRE(latin1);
  CHECK(std::get<RequestValidateCredentials>(latin1->request).credentials->user_name == "\xC3\x83(\xC3\xBF");
}

TEST_CASE("every proper prefix of a request is not XML, and never crashes") {
  for (const auto& path : files_in("requests")) {
    const std::string body = read_file(path);
    std::string lower = body;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    const std::size_t complete = lower.rfind("</nfuseprotocol>") + std::string("</nfuseprotocol>").size();
    CAPTURE(path.filename().string());
    for (std::size_t n = 0; n < body.size(); ++n) {
      auto r = parse_request(std::string_view(body).substr(0, n));
      if (n < complete) {
        CAPTURE(n);
        REQUIRE(!r);
        CHECK(r.error().code == ParseErrc::not_xml);
      } else {
        CHECK(r);
      }
    }
  }
}

TEST_CASE("mutated requests never crash and always give a result or a classified error") {
  std::vector<std::string> seeds;
  for (const auto& path : files_in("requests")) seeds.push_back(read_file(path));
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next = [&state] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  const std::string specials("<>&;#\"'/![]?=x\0\xC3\xFF", 17);
  int ok = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string body = seeds[next() % seeds.size()];
    const int edits = 1 + static_cast<int>(next() % 4);
    for (int e = 0; e < edits && !body.empty(); ++e) {
      const std::size_t at = next() % body.size();
      switch (next() % 4) {
        case 0: body[at] = specials[next() % specials.size()]; break;
        case 1: body.erase(at, 1 + next() % 8); break;
        case 2: body.insert(at, 1, specials[next() % specials.size()]); break;
        case 3: body.insert(at, body.substr(next() % body.size(), next() % 64)); break;
      }
    }
    auto r = parse_request(body);
    if (r) {
      ++ok;
      CHECK(!render(error_response(r->request, ErrorId::unspecified), r->encoding_label).empty());
    } else {
      CHECK(!r.error().message.empty());
      // The label of an error is always one the renderer writes back unchanged.
      const std::string label = r.error().encoding_label;
      CHECK(render(ResponseError{"ResponseAppData", ErrorId::unspecified}, label).find("encoding=\"" + label + "\"") !=
            std::string::npos);
    }
  }
  CHECK(ok > 0);
}

// =============================================================================================
// Rendering

namespace {

AppData notepad_full() {
  AppData a;
  a.in_name = "Notepad";
  a.f_name = "Notepad";
  AppSettings s;
  s.window = WindowSettings{};
  s.sound = MinimumSetting{"none", false};
  s.video = MinimumSetting{"none", false};
  s.encryption = MinimumSetting{"rc5-128", false};
  s.app_on_desktop = false;
  s.app_in_start_menu = StartMenu{};
  s.publisher_name = "PS45FP1";
  s.ssl_enabled = false;
  s.remote_access_enabled = false;
  AppDetails d;
  d.settings = s;
  d.access_list = std::vector<AccessEntry>{
      {AccessKind::group, "Ctx-User", Domain{"SEPAGOND", DomainType::nt}},
      {AccessKind::user, "Joe", Domain{"WIN-B4RL0SUCJ29", DomainType::nt}},
      {AccessKind::anonymous, "", std::nullopt},
  };
  d.file_types.push_back({"Text Document", true, false, {".txt"}, {"text/plain"}, "\"%*\""});
  d.icon_info = std::vector<IconSpec>{{32, 4, IconFormat::raw}};
  a.details = d;
  a.icon_data.push_back({{32, 4, IconFormat::raw}, "AAABAAEAICAQAAAAAADoAgAAFgAAACgAAAAgAAAAQAAAAAEABAAAAAAAgAIAAAAAAAAAAAAAAAAAAAAAAAA="});
  a.seq_no = "1206389369";
  a.server_type = ServerType::win32;
  a.client_type = ClientType::ica30;
  return a;
}

AppData desktop_full() {
  AppData a;
  a.in_name = "Win10 Desktop";
  a.f_name = "Windows 10 & Office <2019>";
  AppSettings s;
  s.app_is_desktop = true;
  s.folder = "Desktops\\Office";
  s.description = "Say \"hello\"";
  s.window = WindowSettings{0, 0, 32, "percent", 1};
  s.app_in_start_menu = StartMenu{true, "programs", "Citrix Desktops"};
  AppDetails d;
  d.settings = s;
  d.icon = "Qk0=";
  a.details = d;
  a.seq_no = "7";
  a.server_type = ServerType::win32;
  a.client_type = ClientType::ica30;
  return a;
}

std::map<std::string, std::pair<NFuseResponse, std::string>> golden_responses() {
  std::map<std::string, std::pair<NFuseResponse, std::string>> g;
  const std::string utf8 = "UTF-8";

  g["capabilities.xml"] = {ResponseCapabilities{{Capability::separate_credentials_validation, Capability::launch_reference,
                                                 Capability::integrated_authentication, Capability::rade_session_proxy,
                                                 Capability::multi_image_icons}},
                           utf8};
  g["validate-credentials-ok.xml"] = {ResponseValidateCredentials{}, utf8};
  g["validate-credentials-user-identity.xml"] = {
      ResponseValidateCredentials{UserIdentityInfo{{{IdType::sam, "DEMO\\myuser"},
                                                    {IdType::upn, "myuser@demo.local"},
                                                    {IdType::sid, "S-1-5-32-545"},
                                                    {IdType::sid, "S-1-5-21-1004336348-1177238915-682003330-1114"}}}},
      utf8};
  g["error-failed-credentials.xml"] = {error_response(RequestValidateCredentials{}, ErrorId::failed_credentials), utf8};
  g["error-unspecified-appdata.xml"] = {error_response(RequestAppData{}, ErrorId::unspecified), utf8};
  g["error-unknown-request-latin1.xml"] = {ResponseError{"ResponseAltAddress", ErrorId::unspecified}, "ISO-8859-1"};

  ResponseAppData pass1;
  pass1.scope = Scope{Traverse::onelevel, "", ""};
  AppData notepad;
  notepad.in_name = "Notepad";
  notepad.f_name = "Notepad";
  notepad.seq_no = "1206389369";
  notepad.server_type = ServerType::win32;
  notepad.client_type = ClientType::ica30;
  notepad.rade_offline_mode = "none";
  pass1.apps.push_back(notepad);
  pass1.rade_license_type = "online";
  g["appdata-pass1.xml"] = {pass1, utf8};

  ResponseAppData full;
  full.scope = Scope{Traverse::subtree, "", ""};
  full.apps = {notepad_full(), desktop_full()};
  g["appdata-full.xml"] = {full, utf8};

  ResponseAppData trimmed;  // the 5.8 shape: type="app", trimmed Settings, no ServerType
  AppData word;
  word.type = "app";
  word.in_name = "CTX:Microsoft Office - Word";
  word.f_name = "Microsoft Word";
  AppSettings ws;
  ws.folder.reset();
  ws.window = WindowSettings{0, 0, 8, "pixels", 1};
  ws.app_on_desktop = false;
  AppDetails wd;
  wd.settings = ws;
  word.details = wd;
  word.seq_no = "1";
  word.client_type = ClientType::ica30;
  trimmed.apps.push_back(word);
  g["appdata-trimmed-type-app.xml"] = {trimmed, utf8};

  g["appdata-empty.xml"] = {ResponseAppData{}, utf8};

  ResponseAppData latin;
  AppData buero;
  buero.in_name = "B\xC3\xBCro Drucker";
  buero.f_name = "B\xC3\xBCro \xE2\x82\xAC \xE6\x97\xA5\xE6\x9C\xAC";  // Büro € 日本
  buero.details.reset();
  latin.apps.push_back(buero);
  g["appdata-latin1.xml"] = {latin, "ISO-8859-1"};
  g["appdata-utf8.xml"] = {latin, utf8};

  g["serverfarmdata.xml"] = {ResponseServerFarmData{{"FOOFARM01"}}, "ISO-8859-1"};
  g["serverdata.xml"] = {ResponseServerData{{{"PS45FP1", ServerType::win32, ClientType::ica30},
                                             {"PS45FP2", ServerType::win32, ClientType::ica30}}},
                         "ISO-8859-1"};
  g["protocolinfo.xml"] = {ResponseProtocolInfo{}, "ISO-8859-1"};

  ResponseAddress address;
  address.server_address = {AddressType::dot_port, "192.168.182.10:1494"};
  address.server_type = ServerType::win32;
  address.connection_type = "tcp";
  address.client_type = ClientType::ica30;
  address.ticket_tag = "IMAHostId:23363";
  address.farm_load_hint = 100;
  address.ssl_relay_address = Address{AddressType::dns_port, "PS45FP1.example:443"};
  address.cgp_address = Address{AddressType::port, "2598"};
  g["address.xml"] = {address, utf8};

  ResponseAddress reconnect = address;
  reconnect.server_address = {AddressType::dot, "192.168.182.10"};
  reconnect.disconnected_session = true;
  reconnect.ssl_relay_address = Address{AddressType::dns, "PS45FP1.example"};
  g["address-reconnect.xml"] = {reconnect, utf8};

  ResponseAddress seven = address;
  seven.launch_ref = "LR-0042";
  seven.session_sharing_key = "4-basic-basic-DEMO-alice-Farm";
  seven.ticket = "234E9D1E6F9AE50D98AF5A063D28AF";
  g["address-7x.xml"] = {seven, utf8};

  g["ticket.xml"] = {ResponseTicket{"234E9D1E6F9AE50D98AF5A063D28AF"}, utf8};
  g["launchref.xml"] = {ResponseLaunchRef{"LR-0042"}, utf8};
  g["reconnect-session-data.xml"] = {
      ResponseReconnectSessionData{{{"Notepad", ServerType::all, ClientType::ica30, {"ima-host-id", "23363"}, "2"}}}, utf8};
  g["reconnect-session-data-none.xml"] = {ResponseReconnectSessionData{}, utf8};
  g["disconnect-user-sessions.xml"] = {ResponseDisconnectUserSessions{}, utf8};
  g["logoff-user-sessions.xml"] = {ResponseLogoffUserSessions{}, utf8};
  return g;
}

}  // namespace

TEST_CASE("rendered responses match the golden files byte for byte") {
  const auto goldens = golden_responses();
  for (const auto& [name, item] : goldens) check_golden(name, render(item.first, item.second));
  // No stale golden files.
  for (const auto& path : files_in("responses")) CHECK_MESSAGE(goldens.count(path.filename().string()), path.filename().string());
}

TEST_CASE("layout rules clients depend on hold in every golden") {
  for (const auto& golden : golden_responses()) {
    const std::string& name = golden.first;
    const auto& item = golden.second;
    CAPTURE(name);
    const std::string xml = render(item.first, item.second);
    CHECK(xml.rfind("<?xml version=\"1.0\" encoding=\"" + item.second + "\" ?>\n<!DOCTYPE NFuseProtocol SYSTEM \"NFuse.dtd\">\n"
                    "<NFuseProtocol version=\"" + std::string(kDialectVersion) + "\">\n", 0) == 0);
    CHECK(xml.find(" />") == std::string::npos);
    CHECK(xml.find("\r") == std::string::npos);
    CHECK(xml.substr(xml.size() - 17) == "</NFuseProtocol>\n");
    // Well-formed, and the single child of the root is a Response* element with a start and end tag.
    pugi::xml_document doc;
    REQUIRE(doc.load_buffer(xml.data(), xml.size()));
    const auto root = doc.document_element();
    CHECK(std::string(root.name()) == "NFuseProtocol");
    CHECK(std::string(root.attribute("version").value()) == kDialectVersion);
    const auto response = root.first_child();
    CHECK(std::string(response.name()).rfind("Response", 0) == 0);
    CHECK(!response.next_sibling());
    CHECK(xml.find("</" + std::string(response.name()) + ">") != std::string::npos);
  }
}

TEST_CASE("Settings keeps its attributes on one line; empty elements self-close without a space") {
  ResponseAppData r;
  r.apps.push_back(notepad_full());
  const std::string xml = render(r, "UTF-8");
  CHECK(xml.find("      <Settings appisdisabled=\"false\" appisdesktop=\"false\">\n") != std::string::npos);
  CHECK(xml.find("<AppOnDesktop value=\"false\"/>\n") != std::string::npos);
  CHECK(xml.find("<Folder/>\n") != std::string::npos);
  CHECK(xml.find("<Description/>\n") != std::string::npos);
  CHECK(xml.find("<IconType size=\"32\" bpp=\"4\" format=\"raw\"/>\n") != std::string::npos);
  CHECK(xml.find("<AnonymousUser/>\n") != std::string::npos);
}

TEST_CASE("empty Response elements are written as a start and an end tag") {
  CHECK(render(ResponseValidateCredentials{}, "UTF-8").find(
            "\n  <ResponseValidateCredentials></ResponseValidateCredentials>\n") != std::string::npos);
  CHECK(render(ResponseAppData{}, "UTF-8").find("\n  <ResponseAppData></ResponseAppData>\n") != std::string::npos);
}

TEST_CASE("text is encoded in the charset of the label, with references for what it cannot hold") {
  ResponseServerFarmData farm{{"B\xC3\xBCro \xE2\x82\xAC \xF0\x9F\x98\x80"}};  // Büro € 😀
  const std::string utf8 = render(farm, "UTF-8");
  CHECK(utf8.find("<ServerFarmName>B\xC3\xBCro \xE2\x82\xAC \xF0\x9F\x98\x80</ServerFarmName>") != std::string::npos);
  const std::string latin1 = render(farm, "ISO-8859-1");
  CHECK(latin1.find("encoding=\"ISO-8859-1\"") != std::string::npos);
  CHECK(latin1.find("<ServerFarmName>B\xFCro &#8364; &#128512;</ServerFarmName>") != std::string::npos);
  const std::string ascii = render(farm, "us-ascii");
  CHECK(ascii.find("encoding=\"us-ascii\"") != std::string::npos);
  CHECK(ascii.find("<ServerFarmName>B&#252;ro &#8364; &#128512;</ServerFarmName>") != std::string::npos);
  // A label we do not know is replaced, never echoed.
  const std::string other = render(farm, "EBCDIC\"><x");
  CHECK(other.rfind("<?xml version=\"1.0\" encoding=\"UTF-8\" ?>\n", 0) == 0);
  CHECK(other == utf8);
}

TEST_CASE("escaping of text and attributes; invalid strings cannot break the document") {
  ResponseAddress a;
  a.server_address = {AddressType::dot_port, "a<b>&\"c'"};
  a.ticket_tag = "x\"y<z>&w";
  a.ssl_relay_address = Address{AddressType::dns, "line1\nline2\ttab\rcr"};
  const std::string xml = render(a, "UTF-8");
  CHECK(xml.find("<ServerAddress addresstype=\"dot-port\">a&lt;b&gt;&amp;\"c'</ServerAddress>") != std::string::npos);
  CHECK(xml.find("<TicketTag>x\"y&lt;z&gt;&amp;w</TicketTag>") != std::string::npos);
  CHECK(xml.find("<SSLRelayAddress addresstype=\"dns\">line1\nline2\ttab&#13;cr</SSLRelayAddress>") != std::string::npos);

  ResponseAppData r;
  AppData bad;
  bad.type = "a\"b";
  bad.in_name = std::string("nul\0ctl\x01 bad\xFF utf8", 18);
  bad.f_name = "surrogate \xED\xA0\x80 end";
  r.apps.push_back(bad);
  const std::string xml2 = render(r, "UTF-8");
  CHECK(xml2.find("<AppData type=\"a&quot;b\">") != std::string::npos);
  CHECK(xml2.find("<InName>nul\xEF\xBF\xBD" "ctl\xEF\xBF\xBD bad\xEF\xBF\xBD utf8</InName>") != std::string::npos);
  pugi::xml_document doc;
  CHECK(doc.load_buffer(xml2.data(), xml2.size()));
  CHECK(std::string(doc.document_element().first_child().first_child().first_child().attribute("type").value()) == "a\"b");
}

TEST_CASE("the dialect version is ours whatever the request said") {
  for (const char* file : {"capabilities-pn11-nil-latin1.xml", "capabilities-wi50.xml", "capabilities-fma55-empty-subset.xml"}) {
    auto parsed = parse_file(file);
    const std::string xml = render(ResponseCapabilities{}, parsed.encoding_label);
    CHECK(xml.find("<NFuseProtocol version=\"" + std::string(kDialectVersion) + "\">") != std::string::npos);
    CHECK(xml.find("encoding=\"" + parsed.encoding_label + "\"") != std::string::npos);
  }
}

TEST_CASE("ErrorId spellings are exact and round trip") {
  CHECK(to_string(ErrorId::unspecified) == "unspecified");
  CHECK(to_string(ErrorId::failed_credentials) == "failed-credentials");
  CHECK(to_string(ErrorId::account_disabled) == "account-disabled");
  CHECK(to_string(ErrorId::account_locked_out) == "account-locked-out");
  CHECK(to_string(ErrorId::must_change_credentials) == "must-change-credentials");
  CHECK(to_string(ErrorId::expired_credentials) == "expired-credentials");
  CHECK(to_string(ErrorId::version_mismatch) == "version-mismatch");
  CHECK(to_string(ErrorId::invalid_logon_hours) == "invalid-logon-hours");
  CHECK(to_string(ErrorId::no_server) == "no-server");
  CHECK(to_string(ErrorId::no_alt_address) == "no-alt-address");
  CHECK(to_string(ErrorId::mfserver_overloaded) == "mfserver-overloaded");
  CHECK(to_string(ErrorId::not_trusted) == "not-trusted");
  CHECK(to_string(ErrorId::not_licensed) == "not-licensed");
  CHECK(to_string(ErrorId::service_unavailable) == "service-unavailable");
  CHECK(to_string(ErrorId::ticketing_disabled) == "Ticketing-Disabled");
  CHECK(to_string(ErrorId::group_enumeration_disabled) == "GroupEnumeration-Disabled");
  CHECK(to_string(ErrorId::folder_enumeration_disabled) == "FolderEnumeration-Disabled");
  CHECK(to_string(ErrorId::no_available_workstation) == "no-available-workstation");
  CHECK(to_string(ErrorId::retry_required) == "retry-required");
  CHECK(to_string(ErrorId::connection_refused) == "connection-refused");
  CHECK(to_string(ErrorId::resource_unavailable) == "resource-unavailable");
  std::set<std::string_view> spellings;
  for (int i = 0; i <= static_cast<int>(ErrorId::resource_unavailable); ++i) {
    const auto id = static_cast<ErrorId>(i);
    CHECK(error_id_from_string(to_string(id)) == id);
    spellings.insert(to_string(id));
  }
  CHECK(spellings.size() == static_cast<std::size_t>(ErrorId::resource_unavailable) + 1);
  CHECK(!error_id_from_string("credentials-must-change"));  // a spelling that does not exist
  CHECK(!error_id_from_string("Failed-Credentials"));
}

TEST_CASE("request and response names, error_response, answered_in_band") {
  CHECK(request_name(RequestLogoffUserSessions{}) == "RequestLogoffUserSessions");
  CHECK(response_name(RequestLogoffUserSessions{}) == "ResponseLogoffUserSessions");
  CHECK(response_name(RequestDisconnectUserSessions{}) == "ResponseDisconnectUserSessions");
  const auto e = error_response(RequestServerData{}, ErrorId::no_server);
  CHECK(e.element == "ResponseServerData");
  CHECK(e.error_id == ErrorId::no_server);
  CHECK(!answered_in_band(ParseErrc::not_xml));
  CHECK(!answered_in_band(ParseErrc::unsafe_xml));
  CHECK(!answered_in_band(ParseErrc::not_nfuse));
  CHECK(answered_in_band(ParseErrc::unknown_request));
  CHECK(answered_in_band(ParseErrc::invalid_request));
  // An element name that is not a plain name is replaced.
  CHECK(render(ResponseError{"Response><x", ErrorId::unspecified}, "UTF-8").find("<ResponseError>") != std::string::npos);
}
