// xmlservice/nfuse_codec.cpp: parse_request (pugixml, hardened) and render (hand-written, so
// the byte layout clients depend on is under our control).
//
// Parsing runs in stages, each failing with the first applicable ParseErrc:
//   1-4. detail::Document::load (detail/xml_document.hpp): prolog and encoding, pugixml
//        without entity expansion, document shape and DOCTYPE, depth, strict unescaping
//                                                                               (not_xml, unsafe_xml)
//   5. NFuseProtocol root, first Request* child, dispatch by name               (not_nfuse, unknown_request)
//   6. typed fields                                                             (invalid_request)
#include "xmlservice/nfuse_codec.hpp"

#include "xmlservice/ctx1.hpp"
#include "xmlservice/detail/xml_document.hpp"
#include "xmlservice/detail/xml_text.hpp"

#include <pugixml.hpp>

#include <array>
#include <charconv>
#include <initializer_list>
#include <ostream>
#include <stdexcept>
#include <utility>

namespace xmlservice {

std::string_view to_string(ParseErrc code) {
  switch (code) {
    case ParseErrc::not_xml: return "not_xml";
    case ParseErrc::unsafe_xml: return "unsafe_xml";
    case ParseErrc::not_nfuse: return "not_nfuse";
    case ParseErrc::unknown_request: return "unknown_request";
    case ParseErrc::invalid_request: return "invalid_request";
  }
  return "not_xml";
}

bool answered_in_band(ParseErrc code) {
  return code == ParseErrc::unknown_request || code == ParseErrc::invalid_request;
}

std::ostream& operator<<(std::ostream& os, const ParseError& error) {
  return os << to_string(error.code) << ": " << error.message;
}

std::ostream& operator<<(std::ostream& os, const ParsedRequest& request) {
  return os << request_name(request.request) << " version=" << request.version << " encoding=" << request.encoding_label;
}

void throw_exception_from_error(const ParseError& error, const boost::source_location&) {
  throw std::runtime_error(std::string(to_string(error.code)) + ": " + error.message);
}

namespace {

using detail::append_escaped;
using detail::iequals;
using detail::is_ascii_name;
using detail::is_element;
using detail::text_of;
using detail::trim;
using detail::trimmed_attr;
using detail::trimmed_text;

// ============================================================================================
// Stage 6: typed fields.

// Collects the first invalid_request message.
struct Ctx {
  std::string error;
  void fail(std::string message) {
    if (error.empty()) error = std::move(message);
  }
};

// Splits on whitespace and commas (lists written in one element: "alt-addr no-load-bias").
std::vector<std::string_view> tokens(std::string_view s) {
  std::vector<std::string_view> out;
  std::size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && (detail::is_xml_space(s[i]) || s[i] == ',')) ++i;
    const std::size_t start = i;
    while (i < s.size() && !detail::is_xml_space(s[i]) && s[i] != ',') ++i;
    if (i > start) out.push_back(s.substr(start, i - start));
  }
  return out;
}

template <class E, std::size_t N>
std::optional<E> lookup(const std::array<std::pair<std::string_view, E>, N>& table, std::string_view text) {
  for (const auto& [name, value] : table)
    if (iequals(name, text)) return value;
  return std::nullopt;
}

constexpr std::array<std::pair<std::string_view, ServerType>, 6> kServerTypes{{
    {"all", ServerType::all},
    {"win32", ServerType::win32},
    {"x", ServerType::x},
    {"java", ServerType::java},
    {"videoframe", ServerType::videoframe},
    {"viewsoft", ServerType::viewsoft},
}};
constexpr std::array<std::pair<std::string_view, ClientType>, 5> kClientTypes{{
    {"all", ClientType::all},
    {"ica30", ClientType::ica30},
    {"content", ClientType::content},
    {"rade", ClientType::rade},
    {"rdp", ClientType::rdp},
}};
constexpr std::array<std::pair<std::string_view, AddressType>, 6> kAddressTypes{{
    {"dot", AddressType::dot},
    {"dot-port", AddressType::dot_port},
    {"dns", AddressType::dns},
    {"dns-port", AddressType::dns_port},
    {"no-change", AddressType::no_change},
    {"port", AddressType::port},
}};
constexpr std::array<std::pair<std::string_view, DomainType>, 3> kDomainTypes{{
    {"NT", DomainType::nt},
    {"UNIX", DomainType::unix_domain},
    {"NDS", DomainType::nds},
}};
constexpr std::array<std::pair<std::string_view, IdType>, 3> kIdTypes{{
    {"SAM", IdType::sam},
    {"SID", IdType::sid},
    {"UPN", IdType::upn},
}};
constexpr std::array<std::pair<std::string_view, DetailLevel>, 9> kDetailLevels{{
    {"defaults", DetailLevel::defaults},
    {"default", DetailLevel::defaults},
    {"permissions", DetailLevel::permissions},
    {"all", DetailLevel::all},
    {"icon", DetailLevel::icon},
    {"icon-info", DetailLevel::icon_info},
    {"access-list", DetailLevel::access_list},
    {"file-type", DetailLevel::file_type},
    {"rade-offline-mode", DetailLevel::rade_offline_mode},
}};
constexpr std::array<std::pair<std::string_view, Traverse>, 2> kTraverses{{
    {"onelevel", Traverse::onelevel},
    {"subtree", Traverse::subtree},
}};
constexpr std::array<std::pair<std::string_view, IconFormat>, 2> kIconFormats{{
    {"raw", IconFormat::raw},
    {"png", IconFormat::png},
}};
constexpr std::array<std::pair<std::string_view, SessionType>, 2> kSessionTypes{{
    {"active", SessionType::active},
    {"disconnected", SessionType::disconnected},
}};
constexpr std::array<std::pair<std::string_view, LaunchRefType>, 2> kLaunchRefTypes{{
    {"ICA", LaunchRefType::ica},
    {"RADE", LaunchRefType::rade},
}};

std::optional<std::uint32_t> parse_uint(std::string_view s) {
  s = trim(s);
  std::uint32_t value = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (s.empty() || ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return value;
}

// "First wins" for single-valued text fields: an empty occurrence does not count.
void read_text(pugi::xml_node n, std::string& out) {
  if (out.empty()) out = trimmed_text(n);
}

void read_server_type(pugi::xml_node n, std::vector<ServerType>& out) {
  const std::string v = trimmed_text(n);
  if (!v.empty()) out.push_back(lookup(kServerTypes, v).value_or(ServerType::unknown));
}

void read_client_type(pugi::xml_node n, std::vector<ClientType>& out) {
  const std::string v = trimmed_text(n);
  if (!v.empty()) out.push_back(lookup(kClientTypes, v).value_or(ClientType::unknown));
}

void read_address(pugi::xml_node n, std::optional<Address>& out) {
  if (out) return;
  Address a;
  const std::string type = trimmed_attr(n, "addresstype");
  if (!type.empty()) a.type = lookup(kAddressTypes, type).value_or(AddressType::unknown);
  a.value = trimmed_text(n);
  out = std::move(a);
}

void read_ttl(pugi::xml_node n, std::optional<std::uint32_t>& out, Ctx& ctx) {
  if (out) return;
  const std::string v = trimmed_text(n);
  if (v.empty()) return;
  if (auto value = parse_uint(v))
    out = *value;
  else
    ctx.fail("TimeToLive is not a number of seconds");
}

void read_session_context(pugi::xml_node n, std::vector<NameValue>& out) {
  for (pugi::xml_node e = n.first_child(); e; e = e.next_sibling())
    if (is_element(e, "SessionContextEntry")) out.push_back({trimmed_attr(e, "name"), trimmed_text(e)});
}

Password read_password(pugi::xml_node n) {
  Password p;
  p.encoding_label = trimmed_attr(n, "encoding");
  std::string raw = text_of(n);
  if (p.encoding_label.empty() || iequals(p.encoding_label, "cleartext")) {
    p.encoding = PasswordEncoding::cleartext;
    p.plain = std::move(raw);
  } else if (iequals(p.encoding_label, "ctx1")) {
    p.encoding = PasswordEncoding::ctx1;
    if (auto decoded = ctx1::decode(raw)) p.plain = std::move(*decoded);
  } else {
    p.encoding = PasswordEncoding::unsupported;
  }
  return p;
}

Domain read_domain(pugi::xml_node n) {
  Domain d;
  d.name = trimmed_text(n);
  const std::string type = trimmed_attr(n, "type");
  if (!type.empty()) d.type = lookup(kDomainTypes, type).value_or(DomainType::unknown);
  return d;
}

void read_credentials(pugi::xml_node n, std::optional<Credentials>& out) {
  if (out) return;
  Credentials cr;
  for (pugi::xml_node c = n.first_child(); c; c = c.next_sibling()) {
    if (is_element(c, "UserName")) {
      read_text(c, cr.user_name);
    } else if (is_element(c, "Password")) {
      if (!cr.password) cr.password = read_password(c);
    } else if (is_element(c, "Domain")) {
      if (!cr.domain) cr.domain = read_domain(c);
    } else if (is_element(c, "AnonymousUser")) {
      cr.anonymous = true;
    } else if (is_element(c, "ID")) {
      std::string value = trimmed_text(c);
      if (value.empty()) continue;
      const std::string type = trimmed_attr(c, "type");
      const IdType id_type = type.empty() ? IdType::sam : lookup(kIdTypes, type).value_or(IdType::unknown);
      cr.ids.push_back({id_type, std::move(value)});
    }
  }
  out = std::move(cr);
}

void read_scope(pugi::xml_node n, std::optional<Scope>& out, Ctx& ctx) {
  if (out) return;
  Scope s;
  const std::string traverse = trimmed_attr(n, "traverse");
  if (!traverse.empty()) {
    if (auto t = lookup(kTraverses, traverse))
      s.traverse = *t;
    else
      ctx.fail("Scope traverse is neither subtree nor onelevel");
  }
  s.type = trimmed_attr(n, "type");
  s.folder = trimmed_text(n);
  out = std::move(s);
}

IconSpec read_icon_spec(pugi::xml_node n, Ctx& ctx) {
  IconSpec spec;
  auto number = [&](std::string_view attr, int& field) {
    const std::string v = trimmed_attr(n, attr);
    if (v.empty()) return;
    const auto value = parse_uint(v);
    if (!value || *value == 0 || *value > 4096)
      ctx.fail("DesiredIconData " + std::string(attr) + " is not a number from 1 to 4096");
    else
      field = static_cast<int>(*value);
  };
  number("size", spec.size);
  number("bpp", spec.bpp);
  const std::string format = trimmed_attr(n, "format");
  if (!format.empty()) {
    if (auto f = lookup(kIconFormats, format))
      spec.format = *f;
    else
      ctx.fail("DesiredIconData format is neither raw nor png");
  }
  return spec;
}

LaunchName read_launch_name(pugi::xml_node n) {
  LaunchName name;
  for (pugi::xml_node c = n.first_child(); c; c = c.next_sibling()) {
    if (is_element(c, "AppName")) {
      name.kind = LaunchNameKind::app;
    } else if (is_element(c, "ServerName")) {
      name.kind = LaunchNameKind::server;
    } else if (is_element(c, "ServerFarmName")) {
      name.kind = LaunchNameKind::server_farm;
    } else if (is_element(c, "UnspecifiedName")) {
      name.kind = LaunchNameKind::unspecified;
    } else if (is_element(c, "SessionName")) {
      name.kind = LaunchNameKind::session;
      for (pugi::xml_node s = c.first_child(); s; s = s.next_sibling()) {
        if (is_element(s, "InName")) {
          read_text(s, name.session.in_name);
        } else if (is_element(s, "HostId")) {
          if (name.session.host_id.value.empty()) name.session.host_id = {trimmed_attr(s, "type"), trimmed_text(s)};
        } else if (is_element(s, "SessionId")) {
          read_text(s, name.session.session_id);
        }
      }
      return name;
    } else {
      continue;
    }
    name.value = trimmed_text(c);
    return name;
  }
  return name;
}

// --- one reader per request type ---------------------------------------------------------

// Each reader visits the request element's children once, in document order.

NFuseRequest read_capabilities(pugi::xml_node, Ctx&) { return RequestCapabilities{}; }

NFuseRequest read_validate_credentials(pugi::xml_node n, Ctx&) {
  RequestValidateCredentials r;
  for (pugi::xml_node c : n.children()) {
    if (is_element(c, "Credentials")) {
      read_credentials(c, r.credentials);
    } else if (is_element(c, "DesiredInfo")) {
      const std::string v = text_of(c);
      for (auto token : tokens(v))
        if (iequals(token, "user-identity")) r.desired_user_identity = true;
    }
  }
  return r;
}

NFuseRequest read_app_data(pugi::xml_node n, Ctx& ctx) {
  RequestAppData r;
  for (pugi::xml_node c : n.children()) {
    if (is_element(c, "Scope")) {
      read_scope(c, r.scope, ctx);
    } else if (is_element(c, "DesiredDetails")) {
      const std::string v = text_of(c);
      for (auto token : tokens(v))
        if (auto level = lookup(kDetailLevels, token)) r.desired_details.push_back(*level);
    } else if (is_element(c, "DesiredIconData")) {
      r.desired_icon_data.push_back(read_icon_spec(c, ctx));
    } else if (is_element(c, "AppName")) {
      std::string v = trimmed_text(c);
      if (!v.empty()) r.app_names.push_back(std::move(v));
    } else if (is_element(c, "ServerType")) {
      read_server_type(c, r.server_types);
    } else if (is_element(c, "ClientType")) {
      read_client_type(c, r.client_types);
    } else if (is_element(c, "Credentials")) {
      read_credentials(c, r.credentials);
    } else if (is_element(c, "ClientName")) {
      read_text(c, r.client_name);
    } else if (is_element(c, "DeviceId")) {
      read_text(c, r.device_id);
    } else if (is_element(c, "ClientAddress")) {
      read_address(c, r.client_address);
    }
  }
  return r;
}

NFuseRequest read_server_farm_data(pugi::xml_node n, Ctx&) {
  RequestServerFarmData r;
  for (pugi::xml_node c : n.children()) {
    if (is_element(c, "Credentials")) read_credentials(c, r.credentials);
  }
  return r;
}

NFuseRequest read_server_data(pugi::xml_node n, Ctx&) {
  RequestServerData r;
  for (pugi::xml_node c : n.children()) {
    if (is_element(c, "ServerType"))
      read_server_type(c, r.server_types);
    else if (is_element(c, "ClientType"))
      read_client_type(c, r.client_types);
    else if (is_element(c, "Credentials"))
      read_credentials(c, r.credentials);
  }
  return r;
}

NFuseRequest read_protocol_info(pugi::xml_node n, Ctx&) {
  RequestProtocolInfo r;
  for (pugi::xml_node c : n.children()) {
    if (is_element(c, "ServerAddress"))
      read_address(c, r.server_address);
    else if (is_element(c, "Credentials"))
      read_credentials(c, r.credentials);
  }
  return r;
}

NFuseRequest read_address_request(pugi::xml_node n, Ctx&) {
  RequestAddress r;
  bool have_name = false;
  for (pugi::xml_node c : n.children()) {
    if (is_element(c, "Name")) {
      if (!have_name) r.name = read_launch_name(c);
      have_name = true;
    } else if (is_element(c, "ClientName")) {
      read_text(c, r.client_name);
    } else if (is_element(c, "DeviceId")) {
      read_text(c, r.device_id);
    } else if (is_element(c, "ClientAddress")) {
      read_address(c, r.client_address);
    } else if (is_element(c, "ServerAddress")) {
      read_address(c, r.server_address);
    } else if (is_element(c, "Flags")) {
      const std::string v = text_of(c);
      for (auto token : tokens(v)) {
        if (iequals(token, "alt-addr")) r.alt_addr = true;
        if (iequals(token, "no-load-bias")) r.no_load_bias = true;
      }
    } else if (is_element(c, "Credentials")) {
      read_credentials(c, r.credentials);
    } else if (is_element(c, "ServerType")) {
      read_server_type(c, r.server_types);
    } else if (is_element(c, "ClientType")) {
      read_client_type(c, r.client_types);
    } else if (is_element(c, "SessionSettings")) {
      for (pugi::xml_node s = c.first_child(); s; s = s.next_sibling())
        if (s.type() == pugi::node_element) r.session_settings.push_back({s.name(), trimmed_text(s)});
    }
  }
  return r;
}

NFuseRequest read_ticket(pugi::xml_node n, Ctx& ctx) {
  RequestTicket r;
  for (pugi::xml_node c : n.children()) {
    if (is_element(c, "Credentials"))
      read_credentials(c, r.credentials);
    else if (is_element(c, "TicketType"))
      read_text(c, r.ticket_type);
    else if (is_element(c, "TicketTag"))
      read_text(c, r.ticket_tag);
    else if (is_element(c, "TimeToLive"))  // matches "TimetoLive" too (names are case-insensitive)
      read_ttl(c, r.time_to_live, ctx);
    else if (is_element(c, "LaunchRef"))
      read_text(c, r.launch_ref);
    else if (is_element(c, "SessionContext"))
      read_session_context(c, r.session_context);
  }
  return r;
}

NFuseRequest read_launch_ref(pugi::xml_node n, Ctx& ctx) {
  RequestLaunchRef r;
  bool have_type = false;
  for (pugi::xml_node c : n.children()) {
    if (is_element(c, "LaunchRefType")) {
      const std::string v = trimmed_text(c);
      if (have_type || v.empty()) continue;
      have_type = true;
      if (auto type = lookup(kLaunchRefTypes, v))
        r.type = *type;
      else
        ctx.fail("LaunchRefType is neither ICA nor RADE");
    } else if (is_element(c, "TicketTag")) {
      read_text(c, r.ticket_tag);
    } else if (is_element(c, "ClientName")) {
      read_text(c, r.client_name);
    } else if (is_element(c, "DeviceId")) {
      read_text(c, r.device_id);
    } else if (is_element(c, "SessionSharingKey")) {
      read_text(c, r.session_sharing_key);
    } else if (is_element(c, "Credentials")) {
      read_credentials(c, r.credentials);
    } else if (is_element(c, "TimeToLive")) {
      read_ttl(c, r.time_to_live, ctx);
    } else if (is_element(c, "SessionContext")) {
      read_session_context(c, r.session_context);
    }
  }
  return r;
}

// The children shared by the session requests; false when `c` is none of them.
template <class R>
bool read_session_common(pugi::xml_node c, R& r) {
  if (is_element(c, "Credentials"))
    read_credentials(c, r.credentials);
  else if (is_element(c, "ClientName"))
    read_text(c, r.client_name);
  else if (is_element(c, "DeviceId"))
    read_text(c, r.device_id);
  else if (is_element(c, "ServerType"))
    read_server_type(c, r.server_types);
  else if (is_element(c, "ClientType"))
    read_client_type(c, r.client_types);
  else if (is_element(c, "SessionContext"))
    read_session_context(c, r.session_context);
  else
    return false;
  return true;
}

NFuseRequest read_reconnect_session_data(pugi::xml_node n, Ctx&) {
  RequestReconnectSessionData r;
  for (pugi::xml_node c : n.children()) {
    if (read_session_common(c, r)) continue;
    if (is_element(c, "SessionType")) {
      const std::string v = trimmed_text(c);
      if (!v.empty()) r.session_types.push_back(lookup(kSessionTypes, v).value_or(SessionType::unknown));
    }
  }
  return r;
}

template <class R>
NFuseRequest read_user_sessions(pugi::xml_node n, Ctx&) {
  R r;
  for (pugi::xml_node c : n.children()) { read_session_common(c, r); }
  return r;
}

struct RequestReader {
  std::string_view name;  // canonical spelling; NFuseRequest index order
  NFuseRequest (*read)(pugi::xml_node, Ctx&);
};

constexpr std::array<RequestReader, std::variant_size_v<NFuseRequest>> kReaders{{
    {"RequestCapabilities", read_capabilities},
    {"RequestValidateCredentials", read_validate_credentials},
    {"RequestAppData", read_app_data},
    {"RequestServerFarmData", read_server_farm_data},
    {"RequestServerData", read_server_data},
    {"RequestProtocolInfo", read_protocol_info},
    {"RequestAddress", read_address_request},
    {"RequestTicket", read_ticket},
    {"RequestLaunchRef", read_launch_ref},
    {"RequestReconnectSessionData", read_reconnect_session_data},
    {"RequestDisconnectUserSessions", read_user_sessions<RequestDisconnectUserSessions>},
    {"RequestLogoffUserSessions", read_user_sessions<RequestLogoffUserSessions>},
}};

}  // namespace

// ============================================================================================

ParseResult parse_request(std::string_view body) {
  detail::Document doc;
  const auto loaded = doc.load(body, kMaxDepth);

  ParseError base;  // fields known so far, copied into every later error
  base.encoding_label = doc.encoding_label();
  auto fail = [&base](ParseErrc code, std::string message) {
    ParseError e = base;
    e.code = code;
    e.message = std::move(message);
    return e;
  };
  if (loaded)
    return fail(loaded->code == detail::DocumentErrc::unsafe_xml ? ParseErrc::unsafe_xml : ParseErrc::not_xml,
                loaded->message);

  const pugi::xml_node root = doc.root();
  if (!iequals(root.name(), "NFuseProtocol")) return fail(ParseErrc::not_nfuse, "the root element is not NFuseProtocol");
  for (pugi::xml_attribute a = root.first_attribute(); a; a = a.next_attribute())
    if (iequals(a.name(), "version")) {
      base.version = std::string(trim(a.value()));
      break;
    }

  const pugi::xml_node request = detail::first_element_starting_with(root, "Request");
  if (!request) return fail(ParseErrc::not_nfuse, "NFuseProtocol holds no Request element");

  const std::string_view name = request.name();
  for (const auto& reader : kReaders) {
    if (!iequals(reader.name, name)) continue;
    Ctx ctx;
    NFuseRequest typed = reader.read(request, ctx);
    if (!ctx.error.empty()) {
      ParseError e = fail(ParseErrc::invalid_request, ctx.error);
      e.request_element = std::string(name);
      e.response_element = std::string(response_name(typed));
      return e;
    }
    return ParsedRequest{base.version, base.encoding_label, std::move(typed)};
  }

  const std::string_view suffix = name.substr(std::string_view("Request").size());
  if (!is_ascii_name(suffix) || name.size() > 128)
    return fail(ParseErrc::not_nfuse, "the request element name is not a plain ASCII name");
  ParseError e = fail(ParseErrc::unknown_request, "unknown request type");
  e.request_element = std::string(name);
  e.response_element = "Response" + std::string(suffix);
  return e;
}

// ============================================================================================
// render

namespace {

using Attrs = std::initializer_list<std::pair<std::string_view, std::string_view>>;

std::string_view bool_text(bool b) { return b ? "true" : "false"; }

// Writes elements one per line, indented by two spaces per level. A start tag stays open
// ("pending") until its first child, so an element that gets no content is closed as "<X/>".
// Attributes with an empty value are not written.
class Writer {
 public:
  Writer(std::string& out, int depth) : out_(out), depth_(depth) {}

  void start(std::string_view name, Attrs attrs = {}) {
    close_pending();
    indent();
    out_ += '<';
    out_ += name;
    append_attrs(attrs);
    pending_ = true;
    ++depth_;
  }

  // Ends the element opened last: "/>" when it got no content.
  void end(std::string_view name) {
    --depth_;
    if (pending_) {
      out_ += "/>\n";
      pending_ = false;
      return;
    }
    indent();
    out_ += "</";
    out_ += name;
    out_ += ">\n";
  }

  // Ends the element opened last, never self-closing it ("<X></X>").
  void end_never_empty(std::string_view name) {
    if (pending_) {
      --depth_;
      out_ += "></";
      out_ += name;
      out_ += ">\n";
      pending_ = false;
      return;
    }
    end(name);
  }

  // An element holding only text; "<X/>" when the text is empty.
  void leaf(std::string_view name, std::string_view text, Attrs attrs = {}) {
    close_pending();
    indent();
    out_ += '<';
    out_ += name;
    append_attrs(attrs);
    if (text.empty()) {
      out_ += "/>\n";
      return;
    }
    out_ += '>';
    append_escaped(out_, text, false);
    out_ += "</";
    out_ += name;
    out_ += ">\n";
  }

 private:
  void close_pending() {
    if (pending_) {
      out_ += ">\n";
      pending_ = false;
    }
  }
  void indent() { out_.append(static_cast<std::size_t>(depth_) * 2, ' '); }
  void append_attrs(Attrs attrs) {
    for (const auto& [name, value] : attrs) {
      if (value.empty()) continue;
      out_ += ' ';
      out_ += name;
      out_ += "=\"";
      append_escaped(out_, value, true);
      out_ += '"';
    }
  }

  std::string& out_;
  int depth_;
  bool pending_ = false;
};

void write_domain(Writer& w, const std::optional<Domain>& domain) {
  if (domain) w.leaf("Domain", domain->name, {{"type", to_string(domain->type)}});
}

void write_address(Writer& w, std::string_view element, const Address& a) {
  w.leaf(element, a.value, {{"addresstype", to_string(a.type)}});
}

void write_icon_spec_leaf(Writer& w, std::string_view element, const IconSpec& spec, std::string_view text) {
  const std::string size = std::to_string(spec.size);
  const std::string bpp = std::to_string(spec.bpp);
  w.leaf(element, text, {{"size", size}, {"bpp", bpp}, {"format", to_string(spec.format)}});
}

void write_settings(Writer& w, const AppSettings& s) {
  w.start("Settings", {{"appisdisabled", bool_text(s.app_is_disabled)}, {"appisdesktop", bool_text(s.app_is_desktop)}});
  if (s.folder) w.leaf("Folder", *s.folder);
  if (s.description) w.leaf("Description", *s.description);
  if (s.window) {
    w.leaf("WinWidth", std::to_string(s.window->width));
    w.leaf("WinHeight", std::to_string(s.window->height));
    w.leaf("WinColor", std::to_string(s.window->color));
    w.leaf("WinType", s.window->type);
    w.leaf("WinScale", std::to_string(s.window->scale));
  }
  auto minimum = [&](std::string_view element, const std::optional<MinimumSetting>& m) {
    if (m) w.leaf(element, m->value, {{"minimum", bool_text(m->minimum)}});
  };
  minimum("SoundType", s.sound);
  minimum("VideoType", s.video);
  minimum("Encryption", s.encryption);
  if (s.app_on_desktop) w.leaf("AppOnDesktop", "", {{"value", bool_text(*s.app_on_desktop)}});
  if (s.app_in_start_menu)
    w.leaf("AppInStartmenu", s.app_in_start_menu->folder,
           {{"value", bool_text(s.app_in_start_menu->value)}, {"root", s.app_in_start_menu->root}});
  if (s.publisher_name) w.leaf("PublisherName", *s.publisher_name);
  if (s.ssl_enabled) w.leaf("SSLEnabled", bool_text(*s.ssl_enabled));
  if (s.remote_access_enabled) w.leaf("RemoteAccessEnabled", bool_text(*s.remote_access_enabled));
  w.end("Settings");
}

void write_details(Writer& w, const AppDetails& d) {
  w.start("Details");
  if (d.settings) write_settings(w, *d.settings);
  if (d.access_list) {
    w.start("AccessList");
    for (const auto& e : *d.access_list) {
      switch (e.kind) {
        case AccessKind::user:
          w.start("User");
          w.leaf("UserName", e.name);
          write_domain(w, e.domain);
          w.end("User");
          break;
        case AccessKind::group:
          w.start("Group");
          w.leaf("GroupName", e.name);
          write_domain(w, e.domain);
          w.end("Group");
          break;
        case AccessKind::anonymous: w.leaf("AnonymousUser", ""); break;
      }
    }
    w.end("AccessList");
  }
  for (const auto& f : d.file_types) {
    w.start("FileType", {{"name", f.name}, {"isdefault", bool_text(f.is_default)}, {"overwrite", bool_text(f.overwrite)}});
    for (const auto& ext : f.extensions) w.leaf("FileExtension", ext);
    for (const auto& mime : f.mime_types) w.leaf("MimeType", mime);
    if (!f.parameters.empty()) w.leaf("Parameters", f.parameters);
    w.end("FileType");
  }
  if (d.icon_info) {
    w.start("IconInfo");
    for (const auto& spec : *d.icon_info) write_icon_spec_leaf(w, "IconType", spec, "");
    w.end("IconInfo");
  }
  if (d.icon) w.leaf("Icon", *d.icon);
  w.end("Details");
}

void write_app_data(Writer& w, const AppData& a) {
  w.start("AppData", {{"type", a.type}});
  w.leaf("InName", a.in_name);
  w.leaf("FName", a.f_name);
  if (a.details) write_details(w, *a.details);
  for (const auto& icon : a.icon_data) write_icon_spec_leaf(w, "IconData", icon.spec, icon.base64);
  if (!a.seq_no.empty()) w.leaf("SeqNo", a.seq_no);
  if (a.server_type) w.leaf("ServerType", to_string(*a.server_type));
  if (a.client_type) w.leaf("ClientType", to_string(*a.client_type));
  if (a.rade_offline_mode) w.leaf("RadeOfflineMode", *a.rade_offline_mode);
  w.end("AppData");
}

// Writes the children of the Response* element.
struct BodyWriter {
  Writer& w;

  void operator()(const ResponseCapabilities& r) const {
    for (Capability c : r.capabilities) w.leaf("CapabilityId", to_string(c));
  }
  void operator()(const ResponseValidateCredentials& r) const {
    if (!r.user_identity) return;
    w.start("UserIdentityInfo");
    for (const auto& id : r.user_identity->ids) {
      if (id.type == IdType::unknown) continue;
      w.leaf("ID", id.value, {{"type", id.type == IdType::sam ? std::string_view() : to_string(id.type)}});
    }
    w.end("UserIdentityInfo");
  }
  void operator()(const ResponseAppData& r) const {
    if (r.apps.empty()) return;
    w.start("AppDataSet");
    if (r.scope) w.leaf("Scope", r.scope->folder, {{"traverse", to_string(r.scope->traverse)}, {"type", r.scope->type}});
    for (const auto& app : r.apps) write_app_data(w, app);
    if (r.rade_license_type) w.leaf("RadeLicenseType", *r.rade_license_type);
    w.end("AppDataSet");
  }
  void operator()(const ResponseServerFarmData& r) const {
    for (const auto& name : r.farm_names) {
      w.start("ServerFarmData");
      w.leaf("ServerFarmName", name);
      w.end("ServerFarmData");
    }
  }
  void operator()(const ResponseServerData& r) const {
    for (const auto& s : r.servers) {
      w.start("ServerData");
      w.leaf("ServerName", s.name);
      w.leaf("ServerType", to_string(s.server_type));
      w.leaf("ClientType", to_string(s.client_type));
      w.end("ServerData");
    }
  }
  void operator()(const ResponseProtocolInfo& r) const { write_address(w, "ServerAddress", r.server_address); }
  void operator()(const ResponseAddress& r) const {
    write_address(w, "ServerAddress", r.server_address);
    if (r.server_type) w.leaf("ServerType", to_string(*r.server_type));
    if (r.connection_type) w.leaf("ConnectionType", *r.connection_type);
    if (r.client_type) w.leaf("ClientType", to_string(*r.client_type));
    if (!r.ticket_tag.empty()) w.leaf("TicketTag", r.ticket_tag);
    if (r.farm_load_hint) w.leaf("FarmLoadHint", std::to_string(*r.farm_load_hint));
    if (r.disconnected_session) w.leaf("DisconnectedSession", "");
    if (r.ssl_relay_address) write_address(w, "SSLRelayAddress", *r.ssl_relay_address);
    if (r.cgp_address) write_address(w, "CGPAddress", *r.cgp_address);
    if (r.launch_ref) w.leaf("LaunchRef", *r.launch_ref);
    if (r.session_sharing_key) w.leaf("SessionSharingKey", *r.session_sharing_key);
    if (r.ticket) w.leaf("Ticket", *r.ticket);
  }
  void operator()(const ResponseTicket& r) const { w.leaf("Ticket", r.ticket); }
  void operator()(const ResponseLaunchRef& r) const { w.leaf("LaunchRef", r.launch_ref); }
  void operator()(const ResponseReconnectSessionData& r) const {
    if (r.sessions.empty()) return;
    w.start("AppDataSet");
    for (const auto& s : r.sessions) {
      w.start("AppData", {{"type", "session"}});
      w.leaf("InName", s.in_name);
      w.leaf("DataType", "", {{"value", "session"}});
      w.leaf("ServerType", to_string(s.server_type));
      w.leaf("ClientType", to_string(s.client_type));
      w.leaf("HostId", s.host_id.value, {{"type", s.host_id.type}});
      w.leaf("SessionId", s.session_id);
      w.end("AppData");
    }
    w.end("AppDataSet");
  }
  void operator()(const ResponseDisconnectUserSessions&) const {}
  void operator()(const ResponseLogoffUserSessions&) const {}
  void operator()(const ResponseError& r) const { w.leaf("ErrorId", to_string(r.error_id)); }
};

// Names of the NFuseResponse alternatives but the last (ResponseError names itself).
constexpr std::array<std::string_view, std::variant_size_v<NFuseResponse> - 1> kResponseNames{{
    "ResponseCapabilities",
    "ResponseValidateCredentials",
    "ResponseAppData",
    "ResponseServerFarmData",
    "ResponseServerData",
    "ResponseProtocolInfo",
    "ResponseAddress",
    "ResponseTicket",
    "ResponseLaunchRef",
    "ResponseReconnectSessionData",
    "ResponseDisconnectUserSessions",
    "ResponseLogoffUserSessions",
}};

}  // namespace

std::string render(const NFuseResponse& response, std::string_view encoding_label) {
  auto charset = detail::charset_for_label(encoding_label);
  if (!charset) {
    encoding_label = "UTF-8";
    charset = detail::Charset::utf8;
  }

  std::string_view element;
  if (const auto* error = std::get_if<ResponseError>(&response))
    element = is_ascii_name(error->element) ? std::string_view(error->element) : "ResponseError";
  else
    element = kResponseNames[response.index()];

  std::string out;
  out.reserve(1024);
  out += "<?xml version=\"1.0\" encoding=\"";
  out += encoding_label;
  out += "\" ?>\n<!DOCTYPE NFuseProtocol SYSTEM \"NFuse.dtd\">\n<NFuseProtocol version=\"";
  out += kDialectVersion;
  out += "\">\n";
  Writer w(out, 1);
  w.start(element);
  std::visit(BodyWriter{w}, response);
  w.end_never_empty(element);
  out += "</NFuseProtocol>\n";
  return detail::utf8_to_charset(out, *charset);
}

}  // namespace xmlservice
