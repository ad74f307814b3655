// xmlservice/nfuse_codec.hpp: NFuse XML bytes <-> the typed values of nfuse_types.hpp.
//
// Pure functions (no I/O, no shared state; callable from any thread). The dialect, with what we
// accept and what we emit, is documented in docs/nfuse.md.
//
//   parse_request: a request body -> ParsedRequest, or a ParseError saying how to answer.
//   render:        a typed response -> the complete reply body.
#pragma once

#include "xmlservice/nfuse_types.hpp"

#include <boost/system/result.hpp>

#include <iosfwd>
#include <string>
#include <string_view>

namespace xmlservice {

// Elements nested deeper than this (the root element is level 1) make a request unsafe_xml.
inline constexpr int kMaxDepth = 64;

// How a body failed to parse, from the least to the most NFuse-like. The service answers the
// first three with HTTP 400 and the last two in-band (HTTP 200, `<ErrorId>unspecified</ErrorId>`
// inside ParseError::response_element); see answered_in_band.
enum class ParseErrc {
  not_xml,          // not well-formed XML: empty, truncated, invalid UTF-8 for the declared
                    // encoding, an unsupported encoding (UTF-16...), undefined entity references,
                    // characters XML forbids, several root elements
  unsafe_xml,       // well-formed but refused: a DTD internal subset with declarations
                    // (entities: "billion laughs", external entities), nesting beyond kMaxDepth
  not_nfuse,        // XML, but the root is not NFuseProtocol or holds no Request* element
  unknown_request,  // NFuse with a Request* element this codec does not know
  invalid_request,  // a known request with a value that cannot be read (a non-numeric icon
                    // size, a negative TimetoLive, an unknown Scope traverse, ...)
};
std::string_view to_string(ParseErrc code);  // "not_xml", ...
// True for unknown_request and invalid_request.
bool answered_in_band(ParseErrc code);

struct ParseError {
  ParseErrc code = ParseErrc::not_xml;
  std::string message;  // what is wrong, safe to log and to show the caller (never a password)
  // Known once the prolog was read: the label to answer with ("UTF-8" when the request had none
  // or was unreadable). Always one render() understands.
  std::string encoding_label = "UTF-8";
  // Known from not_nfuse on when the root was NFuseProtocol: its version attribute.
  std::string version;
  // unknown_request and invalid_request: the request element as sent ("RequestFarmData") and
  // the response element to answer with ("ResponseFarmData"; the known spelling for a known
  // request). Empty otherwise.
  std::string request_element;
  std::string response_element;
};

// For boost::system::result<T, ParseError>::value() (tests): throws std::runtime_error.
[[noreturn]] void throw_exception_from_error(const ParseError& error, const boost::source_location& location);

using ParseResult = boost::system::result<ParsedRequest, ParseError>;

// For logs and test messages: "not_xml: <message>" and "RequestAppData version=5.4 encoding=UTF-8".
std::ostream& operator<<(std::ostream& os, const ParseError& error);
std::ostream& operator<<(std::ostream& os, const ParsedRequest& request);

// Parses one request body. Never throws on any input (only std::bad_alloc), never expands
// entities other than the five predefined ones and character references, never reads files or
// the network. The caller limits the size (any size is handled; memory use is a small multiple of
// it). Leniencies: an optional UTF-8 BOM and leading whitespace; with or without DOCTYPE; a
// DOCTYPE with an empty internal subset (`[]`); either quote style; CDATA, comments and
// processing instructions; element and attribute names matched case-insensitively; children in
// any order; unknown children (`<Nil/>`, ...) ignored; for single-valued fields the first non-empty
// occurrence wins; `UTF-8`, `ISO-8859-1` (converted to UTF-8) and `US-ASCII` declarations.
ParseResult parse_request(std::string_view body);

// The complete reply body for `response`: the XML prolog declaring `encoding_label`, `<!DOCTYPE
// NFuseProtocol SYSTEM "NFuse.dtd">`, `<NFuseProtocol version="` kDialectVersion `">` holding
// the response element, a trailing newline. Text is encoded in the charset of the label
// (characters it cannot hold become character references); a label render does not know is
// replaced by "UTF-8". Layout rules clients depend on: two-space indentation, one element per
// line, all attributes of an element on its line, an empty element written self-closing with
// no space before "/>" (`<Folder/>`), except the Response* element itself, which is always
// written as a start and an end tag (`<ResponseValidateCredentials></ResponseValidateCredentials>`).
// Strings that are not valid UTF-8, or hold characters XML cannot carry, are written with U+FFFD
// in their place.
std::string render(const NFuseResponse& response, std::string_view encoding_label);

}  // namespace xmlservice
