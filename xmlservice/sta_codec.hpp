// xmlservice/sta_codec.hpp: the Secure Ticket Authority protocol (CtxSTAProtocol, served by
// Citrix controllers at /scripts/ctxsta.dll) as typed values.
//
// Two conversations, each one XML document per HTTP POST:
//   * a front end (StoreFront, Web Interface) deposits connection data and gets a one-time ticket:
//     RequestTicket -> ResponseTicket;
//   * a gateway presents that ticket (with the authority id it came with) and gets the deposited
//     data back, once: RequestData -> ResponseData.
// Either may be answered with ResponseError. The shapes we accept and produce are documented in
// docs/nfuse.md ("Secure Ticket Authority").
//
// Pure functions (no I/O, no shared state; callable from any thread). The ticket store, expiry,
// one-time redemption and who may ask belong to the caller.
#pragma once

#include "xmlservice/nfuse_types.hpp"

#include <boost/system/result.hpp>

#include <iosfwd>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace xmlservice::sta {

inline constexpr std::string_view kProtocolVersion = "4.0";     // the version attribute we write
inline constexpr std::string_view kTicketVersion = "STA-v4";    // AllowedTicketType, TicketVersion
inline constexpr std::string_view kAuthorityIdType = "STA-v1";  // AllowedAuthorityIDType
// Elements nested deeper than this (the root element is level 1) make a request unsafe_xml. STA
// documents are four levels deep; XData travels as escaped text, not as elements.
inline constexpr int kMaxDepth = 16;

// --- requests -------------------------------------------------------------------------------

// RequestTicket: deposit TicketData, get a ticket.
struct TicketRequest {
  std::vector<std::string> allowed_ticket_types;        // AllowedTicketType, in order ("STA-v4")
  std::vector<std::string> allowed_authority_id_types;  // AllowedAuthorityIDType ("STA-v1")
  // TicketData/Value, in document order, repeated names kept. The name attribute is trimmed
  // and never empty; the value is the element's text exactly as sent, unescaped and untrimmed
  // (XData arrives as escaped XML and is kept as that text: `<?xml ...?><CtxConnInfo ...>`); a value
  // of only whitespace reads as empty.
  std::vector<NameValue> ticket_data;
  bool refreshable = false;  // Control/Refreshable: true | false | 1 | 0 (any case)
};

// RequestData (our form; the Citrix one is not public): redeem a ticket for its TicketData.
//   <CtxSTAProtocol version="4.0"><RequestData>
//     <AuthorityID>STA0123ABCD</AuthorityID><Ticket>...</Ticket><TicketVersion>STA-v4</TicketVersion>
//   </RequestData></CtxSTAProtocol>
struct DataRequest {
  std::string authority_id;    // AuthorityID, trimmed; empty when absent
  std::string ticket;          // Ticket, trimmed; never empty (a request without one is invalid_request)
  std::string ticket_version;  // TicketVersion, trimmed; empty when absent
};

using Request = std::variant<TicketRequest, DataRequest>;

// "RequestTicket" or "RequestData".
std::string_view request_name(const Request& request);

struct ParsedRequest {
  std::string version;         // the CtxSTAProtocol version attribute ("4.0"), trimmed; may be empty
  std::string encoding_label;  // the encoding the request declared ("UTF-8" when none)
  Request request;
};

// How a body failed to parse, from the least to the most STA-like. The caller answers every
// class with ResponseError (ErrorId bad-request) or an HTTP 400; the message is for the log.
enum class ParseErrc {
  not_xml,          // not well-formed XML (also: invalid encoding, undefined entity references)
  unsafe_xml,       // well-formed but refused: DTD declarations, nesting beyond kMaxDepth
  not_sta,          // XML, but the root is not CtxSTAProtocol or holds no Request* element
  unknown_request,  // a Request* element other than RequestTicket and RequestData
  invalid_request,  // a known request with a missing or unreadable value (no Ticket, a Value
                    // without a name, Refreshable neither true nor false)
};
std::string_view to_string(ParseErrc code);  // "not_xml", ...

struct ParseError {
  ParseErrc code = ParseErrc::not_xml;
  std::string message;          // what is wrong, safe to log (never ticket data)
  std::string request_element;  // unknown_request, invalid_request: the element as sent
};
// For logs and test messages: "not_xml: <message>" and "RequestData version=4.0 encoding=UTF-8"
// (never ticket data).
std::ostream& operator<<(std::ostream& os, const ParseError& error);
std::ostream& operator<<(std::ostream& os, const ParsedRequest& request);
// For boost::system::result<T, ParseError>::value() (tests): throws std::runtime_error.
[[noreturn]] void throw_exception_from_error(const ParseError& error, const boost::source_location& location);

using ParseResult = boost::system::result<ParsedRequest, ParseError>;

// Parses one request body. Never throws on any input (only std::bad_alloc); never expands
// entities other than the five predefined ones and character references; refuses any DOCTYPE
// with declarations. Lenient like the NFuse parser: optional prolog and DOCTYPE, either quote
// style, names matched case-insensitively, children in any order, unknown children ignored;
// UTF-8, ISO-8859-1 and US-ASCII bodies. For single-valued fields the first non-empty
// occurrence wins. The caller limits the body size.
ParseResult parse_request(std::string_view body);

// --- responses ------------------------------------------------------------------------------

struct TicketResponse {
  std::string authority_id;  // AuthorityID: identifies this STA (ICA files carry ;40;<AuthorityID>;<Ticket>)
  std::string ticket;        // Ticket
  std::string ticket_version{kTicketVersion};
};

// The deposited TicketData, in the order it was deposited.
struct DataResponse {
  std::vector<NameValue> ticket_data;
};

// ErrorIds of ResponseError (our vocabulary; spelled like NFuse's).
enum class ErrorId {
  unspecified,              // "unspecified": an internal failure
  bad_request,              // "bad-request": the body could not be parsed (any ParseErrc)
  not_trusted,              // "not-trusted": this caller may not request or redeem tickets
  unsupported_ticket_type,  // "unsupported-ticket-type": the request's AllowedTicketType or
                            // AllowedAuthorityIDType list leaves out what we issue (STA-v4, STA-v1)
  invalid_ticket,           // "invalid-ticket": unknown, expired, already redeemed, or issued
                            // by another authority (deliberately not told apart)
};
std::string_view to_string(ErrorId id);

struct ErrorResponse {
  ErrorId error_id = ErrorId::unspecified;
};

using Response = std::variant<TicketResponse, DataResponse, ErrorResponse>;

// The complete reply body, in UTF-8 whatever the request declared:
//   <?xml version="1.0" encoding="UTF-8"?>
//   <CtxSTAProtocol version="4.0">
//     <ResponseTicket> AuthorityID, Ticket, TicketVersion </ResponseTicket>
//     | <ResponseData><TicketData><Value name="...">...</Value>...</TicketData></ResponseData>
//     | <ResponseError><ErrorId>invalid-ticket</ErrorId></ResponseError>
//   </CtxSTAProtocol>
// Two-space indentation, one element per line, a trailing newline; no DOCTYPE. Values are escaped
// so that parsing the reply yields them unchanged (strings that are not valid UTF-8, or hold
// characters XML cannot carry, are written with U+FFFD in their place).
std::string render(const Response& response);

// The request body a client sends (StoreFront's RequestTicket, a gateway's RequestData): the
// layout of render() plus the `<!DOCTYPE CtxSTAProtocol SYSTEM "CtxSTA.dtd">` line clients send.
// For tests and for tools that play the client; parse_request(render_request(r)) yields r for
// valid UTF-8 strings (Value names and the single-valued fields trimmed).
std::string render_request(const Request& request);

}  // namespace xmlservice::sta
