// xmlservice/sta_codec.cpp: parse_request (the hardened reading of detail/xml_document.hpp,
// then a walk over the CtxSTAProtocol tree) and render (hand-written, like the NFuse replies).
#include "xmlservice/sta_codec.hpp"

#include "xmlservice/detail/xml_document.hpp"
#include "xmlservice/detail/xml_text.hpp"

#include <optional>
#include <ostream>
#include <stdexcept>
#include <utility>

namespace xmlservice::sta {

std::string_view to_string(ParseErrc code) {
  switch (code) {
    case ParseErrc::not_xml: return "not_xml";
    case ParseErrc::unsafe_xml: return "unsafe_xml";
    case ParseErrc::not_sta: return "not_sta";
    case ParseErrc::unknown_request: return "unknown_request";
    case ParseErrc::invalid_request: return "invalid_request";
  }
  return "not_xml";
}

std::string_view to_string(ErrorId id) {
  switch (id) {
    case ErrorId::unspecified: return "unspecified";
    case ErrorId::bad_request: return "bad-request";
    case ErrorId::not_trusted: return "not-trusted";
    case ErrorId::unsupported_ticket_type: return "unsupported-ticket-type";
    case ErrorId::invalid_ticket: return "invalid-ticket";
  }
  return "unspecified";
}

std::ostream& operator<<(std::ostream& os, const ParseError& error) {
  return os << to_string(error.code) << ": " << error.message;
}

std::string_view request_name(const Request& request) {
  return std::holds_alternative<TicketRequest>(request) ? "RequestTicket" : "RequestData";
}

std::ostream& operator<<(std::ostream& os, const ParsedRequest& request) {
  return os << request_name(request.request) << " version=" << request.version
            << " encoding=" << request.encoding_label;
}

void throw_exception_from_error(const ParseError& error, const boost::source_location&) {
  throw std::runtime_error(std::string(to_string(error.code)) + ": " + error.message);
}

namespace {

using detail::iequals;
using detail::is_element;

// "First wins" for single-valued text fields: an empty occurrence does not count.
void read_first(pugi::xml_node n, std::string& out) {
  if (out.empty()) out = detail::trimmed_text(n);
}

// Appends the Value children of a TicketData element; false (with `error`) for a nameless one.
bool read_ticket_data(pugi::xml_node n, std::vector<NameValue>& out, std::string& error) {
  for (pugi::xml_node v = n.first_child(); v; v = v.next_sibling()) {
    if (!is_element(v, "Value")) continue;
    std::string name = detail::trimmed_attr(v, "name");
    if (name.empty()) {
      error = "a TicketData Value without a name";
      return false;
    }
    out.push_back({std::move(name), detail::text_of(v)});
  }
  return true;
}

Request read_ticket_request(pugi::xml_node n, std::string& error) {
  TicketRequest r;
  std::string refreshable;
  for (pugi::xml_node c = n.first_child(); c; c = c.next_sibling()) {
    if (is_element(c, "AllowedTicketType")) {
      if (std::string v = detail::trimmed_text(c); !v.empty()) r.allowed_ticket_types.push_back(std::move(v));
    } else if (is_element(c, "AllowedAuthorityIDType")) {
      if (std::string v = detail::trimmed_text(c); !v.empty()) r.allowed_authority_id_types.push_back(std::move(v));
    } else if (is_element(c, "TicketData")) {
      if (!read_ticket_data(c, r.ticket_data, error)) return r;
    } else if (is_element(c, "Control")) {
      for (pugi::xml_node k = c.first_child(); k; k = k.next_sibling())
        if (is_element(k, "Refreshable")) read_first(k, refreshable);
    }
  }
  if (refreshable.empty() || iequals(refreshable, "false") || refreshable == "0")
    r.refreshable = false;
  else if (iequals(refreshable, "true") || refreshable == "1")
    r.refreshable = true;
  else
    error = "Refreshable is neither true nor false";
  return r;
}

Request read_data_request(pugi::xml_node n, std::string& error) {
  DataRequest r;
  for (pugi::xml_node c = n.first_child(); c; c = c.next_sibling()) {
    if (is_element(c, "AuthorityID"))
      read_first(c, r.authority_id);
    else if (is_element(c, "Ticket"))
      read_first(c, r.ticket);
    else if (is_element(c, "TicketVersion"))
      read_first(c, r.ticket_version);
  }
  if (r.ticket.empty()) error = "RequestData holds no Ticket";
  return r;
}

struct RequestReader {
  std::string_view name;
  Request (*read)(pugi::xml_node, std::string&);
};
constexpr RequestReader kReaders[] = {
    {"RequestTicket", read_ticket_request},
    {"RequestData", read_data_request},
};

}  // namespace

ParseResult parse_request(std::string_view body) {
  auto fail = [](ParseErrc code, std::string message, std::string_view element = {}) {
    return ParseError{code, std::move(message), std::string(element)};
  };
  detail::Document doc;
  if (auto error = doc.load(body, kMaxDepth))
    return fail(error->code == detail::DocumentErrc::unsafe_xml ? ParseErrc::unsafe_xml : ParseErrc::not_xml,
                std::move(error->message));

  const pugi::xml_node root = doc.root();
  if (!iequals(root.name(), "CtxSTAProtocol"))
    return fail(ParseErrc::not_sta, "the root element is not CtxSTAProtocol");

  const pugi::xml_node request = detail::first_element_starting_with(root, "Request");
  if (!request) return fail(ParseErrc::not_sta, "CtxSTAProtocol holds no Request element");

  const std::string_view name = request.name();
  for (const auto& reader : kReaders) {
    if (!iequals(reader.name, name)) continue;
    std::string error;
    Request typed = reader.read(request, error);
    if (!error.empty()) return fail(ParseErrc::invalid_request, std::move(error), name);
    return ParsedRequest{detail::trimmed_attr(root, "version"), doc.encoding_label(), std::move(typed)};
  }
  const bool printable = detail::is_ascii_name(name) && name.size() <= 128;
  return fail(ParseErrc::unknown_request, "unknown request type", printable ? name : std::string_view());
}

// ============================================================================================
// render

namespace {

// Writes one element per line, two spaces of indentation per level, below the CtxSTAProtocol root.
class StaWriter {
 public:
  explicit StaWriter(bool doctype) {
    out_ = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
    if (doctype) out_ += "<!DOCTYPE CtxSTAProtocol SYSTEM \"CtxSTA.dtd\">\n";
    out_ += "<CtxSTAProtocol version=\"";
    out_ += kProtocolVersion;
    out_ += "\">\n";
  }

  void open(std::string_view name) {
    indent();
    out_ += '<';
    out_ += name;
    out_ += ">\n";
    ++depth_;
  }
  void close(std::string_view name) {
    --depth_;
    indent();
    out_ += "</";
    out_ += name;
    out_ += ">\n";
  }
  // <element>text</element>, or <element/> when the text is empty; with a name attribute when
  // `name_attr` is set (written even when empty).
  void leaf(std::string_view element, std::string_view text, std::optional<std::string_view> name_attr = {}) {
    indent();
    out_ += '<';
    out_ += element;
    if (name_attr) {
      out_ += " name=\"";
      detail::append_escaped(out_, *name_attr, true);
      out_ += '"';
    }
    if (text.empty()) {
      out_ += "/>\n";
      return;
    }
    out_ += '>';
    detail::append_escaped(out_, text, false);
    out_ += "</";
    out_ += element;
    out_ += ">\n";
  }
  void ticket_data(const std::vector<NameValue>& values) {
    open("TicketData");
    for (const auto& v : values) leaf("Value", v.value, v.name);
    close("TicketData");
  }

  std::string finish() && {
    out_ += "</CtxSTAProtocol>\n";
    return std::move(out_);
  }

 private:
  void indent() { out_.append(static_cast<std::size_t>(depth_) * 2, ' '); }

  std::string out_;
  int depth_ = 1;
};

struct ResponseBody {
  StaWriter& w;
  void operator()(const TicketResponse& r) const {
    w.open("ResponseTicket");
    w.leaf("AuthorityID", r.authority_id);
    w.leaf("Ticket", r.ticket);
    w.leaf("TicketVersion", r.ticket_version);
    w.close("ResponseTicket");
  }
  void operator()(const DataResponse& r) const {
    w.open("ResponseData");
    w.ticket_data(r.ticket_data);
    w.close("ResponseData");
  }
  void operator()(const ErrorResponse& r) const {
    w.open("ResponseError");
    w.leaf("ErrorId", to_string(r.error_id));
    w.close("ResponseError");
  }
};

struct RequestBody {
  StaWriter& w;
  void operator()(const TicketRequest& r) const {
    w.open("RequestTicket");
    for (const auto& t : r.allowed_ticket_types) w.leaf("AllowedTicketType", t);
    for (const auto& t : r.allowed_authority_id_types) w.leaf("AllowedAuthorityIDType", t);
    w.ticket_data(r.ticket_data);
    w.open("Control");
    w.leaf("Refreshable", r.refreshable ? "true" : "false");
    w.close("Control");
    w.close("RequestTicket");
  }
  void operator()(const DataRequest& r) const {
    w.open("RequestData");
    if (!r.authority_id.empty()) w.leaf("AuthorityID", r.authority_id);
    w.leaf("Ticket", r.ticket);
    if (!r.ticket_version.empty()) w.leaf("TicketVersion", r.ticket_version);
    w.close("RequestData");
  }
};

}  // namespace

std::string render(const Response& response) {
  StaWriter w(false);
  std::visit(ResponseBody{w}, response);
  return std::move(w).finish();
}

std::string render_request(const Request& request) {
  StaWriter w(true);
  std::visit(RequestBody{w}, request);
  return std::move(w).finish();
}

}  // namespace xmlservice::sta
