// xmlservice/detail/xml_document.hpp: the hardened XML reading and the text escaping the
// xmlservice codecs share (private to xmlservice/). Loading a body checks, in order:
//   1. prolog: optional UTF-8 BOM, the declared encoding (UTF-8, ISO-8859-1 converted to UTF-8,
//      US-ASCII), every character valid UTF-8 and allowed by XML                  (not_xml)
//   2. pugixml parse without entity expansion                                        (not_xml)
//   3. document level: one root element, no text outside it, a DOCTYPE only without
//      declarations (an empty internal subset `[]` is allowed)                       (not_xml, unsafe_xml)
//   4. tree walk: nesting depth, then our own strict unescaping of every text node and attribute
//      value (the five predefined entities and character references; any other
//      reference is an error)                                                        (unsafe_xml, not_xml)
// It never expands declared entities, never reads files or the network, and never throws (only
// std::bad_alloc). Memory use is a small multiple of the body size; the caller limits that.
#pragma once

#include <pugixml.hpp>

#include <optional>
#include <string>
#include <string_view>

namespace xmlservice::detail {

enum class DocumentErrc {
  not_xml,     // not well-formed, or an encoding we do not read
  unsafe_xml,  // well-formed but refused: DTD declarations, nesting too deep
};

struct DocumentError {
  DocumentErrc code = DocumentErrc::not_xml;
  std::string message;  // what is wrong, safe to log and to show the caller
};

// One parsed and checked body. Not copyable or movable (pugixml points into its buffer).
class Document {
 public:
  Document() = default;
  Document(const Document&) = delete;
  Document& operator=(const Document&) = delete;

  // Parses `body` (once per Document), refusing elements nested deeper than `max_depth` (the
  // root element is level 1). nullopt on success; then root() is the root element and every
  // text node and attribute value in the tree holds plain, unescaped text.
  std::optional<DocumentError> load(std::string_view body, int max_depth);

  pugi::xml_node root() const { return root_; }
  // The encoding label the body declared ("UTF-8" when none); valid once the prolog was read,
  // so also for most errors. Always one charset_for_label() knows.
  const std::string& encoding_label() const { return encoding_label_; }

 private:
  std::string text_;  // the body as UTF-8; pugixml parses it in place
  pugi::xml_document doc_;
  pugi::xml_node root_;
  std::string encoding_label_ = "UTF-8";
};

// --- reading a loaded tree (names compared ASCII case-insensitively) --------------------------

// True when `n` is an element named `name`.
bool is_element(pugi::xml_node n, std::string_view name);
// The element's own text (its text and CDATA children, concatenated), not trimmed.
std::string text_of(pugi::xml_node n);
// text_of without leading and trailing XML whitespace.
std::string trimmed_text(pugi::xml_node n);
// The value of the first attribute called `name`, trimmed; empty when there is none.
std::string trimmed_attr(pugi::xml_node n, std::string_view name);

// The first child element whose name starts with `prefix` ("Request"); null when none does.
pugi::xml_node first_element_starting_with(pugi::xml_node parent, std::string_view prefix);

// A plain ASCII XML name (safe to write back in any charset).
bool is_ascii_name(std::string_view s);

// --- writing ------------------------------------------------------------------------------

// Appends `text` escaped for XML: markup characters as entities, CR (and in attributes TAB and
// LF) as character references so a parser reads them back unchanged, and U+FFFD in place of
// invalid UTF-8 and of characters XML cannot carry.
void append_escaped(std::string& out, std::string_view text, bool attribute);

}  // namespace xmlservice::detail
