// xmlservice/detail/xml_document.cpp: see the header for the stages and their errors.
#include "xmlservice/detail/xml_document.hpp"

#include "xmlservice/detail/xml_text.hpp"

#include <charconv>
#include <cstdint>
#include <utility>

namespace xmlservice::detail {

namespace {

// ============================================================================================
// Stage 1: prolog and encoding.

struct DecodedBody {
  std::string utf8;
  std::string label;  // for the reply
};

bool is_enc_name(std::string_view s) {  // XML EncName: [A-Za-z] ([A-Za-z0-9._] | '-')*
  if (s.empty() || s.size() > 40) return false;
  auto alpha = [](char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); };
  if (!alpha(s[0])) return false;
  for (char c : s)
    if (!alpha(c) && !(c >= '0' && c <= '9') && c != '.' && c != '_' && c != '-') return false;
  return true;
}

// The encoding pseudo-attribute of an XML declaration's body (between "<?xml" and "?>"):
// false when the declaration is malformed; `encoding` is left empty when absent.
bool declaration_encoding(std::string_view decl, std::string& encoding) {
  std::size_t i = 0;
  auto skip_space = [&] {
    while (i < decl.size() && is_xml_space(decl[i])) ++i;
  };
  for (;;) {
    skip_space();
    if (i >= decl.size()) return true;
    const std::size_t name_start = i;
    while (i < decl.size() && ((decl[i] >= 'a' && decl[i] <= 'z') || (decl[i] >= 'A' && decl[i] <= 'Z'))) ++i;
    const std::string_view name = decl.substr(name_start, i - name_start);
    if (name.empty()) return false;
    skip_space();
    if (i >= decl.size() || decl[i] != '=') return false;
    ++i;
    skip_space();
    if (i >= decl.size() || (decl[i] != '"' && decl[i] != '\'')) return false;
    const char quote = decl[i++];
    const std::size_t end = decl.find(quote, i);
    if (end == std::string_view::npos) return false;
    const std::string_view value = decl.substr(i, end - i);
    i = end + 1;
    if (name == "encoding" && encoding.empty()) {
      if (!is_enc_name(value)) return false;
      encoding = std::string(value);
    }
  }
}

std::optional<DocumentError> decode_body(std::string_view body, DecodedBody& out) {
  auto fail = [](std::string message) { return DocumentError{DocumentErrc::not_xml, std::move(message)}; };
  if (body.empty()) return fail("empty body");
  std::string_view s = body;
  bool bom = false;
  if (s.size() >= 3 && s.substr(0, 3) == "\xEF\xBB\xBF") {
    s.remove_prefix(3);
    bom = true;
  } else if (s.size() >= 2 &&
             (s.substr(0, 2) == "\xFE\xFF" || s.substr(0, 2) == "\xFF\xFE" || s[0] == '\0' || s[1] == '\0')) {
    return fail("UTF-16 and UTF-32 bodies are not supported");
  }

  std::string label;
  std::string_view t = s;
  while (!t.empty() && is_xml_space(t.front())) t.remove_prefix(1);
  if (t.size() > 5 && t.substr(0, 5) == "<?xml" && (is_xml_space(t[5]) || t[5] == '?')) {
    const std::size_t end = t.find("?>");
    if (end == std::string_view::npos) return fail("unterminated XML declaration");
    if (!declaration_encoding(t.substr(5, end - 5), label)) return fail("malformed XML declaration");
  }

  Charset charset = Charset::utf8;
  if (label.empty()) {
    out.label = "UTF-8";
  } else {
    const auto known = charset_for_label(label);
    if (!known) return fail("unsupported encoding '" + label + "' (UTF-8 and ISO-8859-1 are)");
    if (bom && *known != Charset::utf8) return fail("a UTF-8 byte order mark contradicts the declared encoding");
    charset = *known;
    out.label = label;
  }

  switch (charset) {
    case Charset::utf8: out.utf8.assign(s); break;
    case Charset::latin1: out.utf8 = latin1_to_utf8(s); break;
    case Charset::ascii:
      for (char c : s)
        if (static_cast<unsigned char>(c) >= 0x80) return fail("a byte above 0x7F in a US-ASCII body");
      out.utf8.assign(s);
      break;
  }

  std::size_t pos = 0;
  char32_t cp = 0;
  while (pos < out.utf8.size()) {
    if (!next_code_point(out.utf8, pos, cp)) return fail("the body is not valid UTF-8");
    if (!is_xml_char(cp)) return fail("the body holds a character XML forbids (NUL or a control character)");
  }
  return std::nullopt;
}

// ============================================================================================
// Stages 3 and 4: document shape, depth, unescaping.

// True when the DOCTYPE value (pugixml's text after "<!DOCTYPE") has an internal subset with
// anything but whitespace in it: entity, element or attribute declarations, parameter entities.
bool doctype_has_declarations(std::string_view doctype) {
  char quote = 0;
  for (std::size_t i = 0; i < doctype.size(); ++i) {
    const char c = doctype[i];
    if (quote) {
      if (c == quote) quote = 0;
    } else if (c == '"' || c == '\'') {
      quote = c;
    } else if (c == '[') {
      std::string_view subset = doctype.substr(i + 1);
      const std::size_t close = subset.rfind(']');
      if (close != std::string_view::npos) subset = subset.substr(0, close);
      return !trim(subset).empty();
    }
  }
  return false;
}

// Replaces the five predefined entities and character references of `in`. Every other
// reference is an error (there are no declared entities: documents declaring any are refused).
bool unescape(std::string_view in, std::string& out, std::string& error) {
  out.clear();
  out.reserve(in.size());
  for (std::size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '&') {
      out += in[i];
      continue;
    }
    const std::size_t semi = in.find(';', i + 1);
    if (semi == std::string_view::npos || semi - i > 12) {
      error = "a '&' that does not start a reference";
      return false;
    }
    const std::string_view ref = in.substr(i + 1, semi - i - 1);
    i = semi;
    if (ref == "lt") {
      out += '<';
    } else if (ref == "gt") {
      out += '>';
    } else if (ref == "amp") {
      out += '&';
    } else if (ref == "apos") {
      out += '\'';
    } else if (ref == "quot") {
      out += '"';
    } else if (ref.size() >= 2 && ref[0] == '#') {
      std::string_view digits = ref.substr(1);
      int base = 10;
      if (digits[0] == 'x' || digits[0] == 'X') {
        base = 16;
        digits.remove_prefix(1);
      }
      std::uint32_t value = 0;
      const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value, base);
      if (digits.empty() || ec != std::errc() || end != digits.data() + digits.size()) {
        error = "a malformed character reference";
        return false;
      }
      if (!is_xml_char(value)) {
        error = "a character reference to a character XML forbids";
        return false;
      }
      append_utf8(out, value);
    } else {
      error = "a reference to an undefined entity";
      return false;
    }
  }
  return true;
}

// Walks the whole tree without recursion: refuses nesting beyond max_depth and unescapes every
// text node and attribute value in place, so readers of the tree see plain text.
std::optional<DocumentError> normalise_tree(pugi::xml_node root, int max_depth) {
  std::string scratch;
  std::string error;
  auto unescape_in_place = [&](auto& item) -> bool {  // an xml_node or an xml_attribute
    const std::string_view value = item.value();
    if (value.find('&') == std::string_view::npos) return true;
    if (!unescape(value, scratch, error)) return false;
    item.set_value(scratch.c_str());
    return true;
  };

  pugi::xml_node node = root;
  int depth = 1;
  for (;;) {
    if (node.type() == pugi::node_element) {
      if (depth > max_depth)
        return DocumentError{DocumentErrc::unsafe_xml,
                             "elements nested deeper than " + std::to_string(max_depth) + " levels"};
      for (pugi::xml_attribute a = node.first_attribute(); a; a = a.next_attribute())
        if (!unescape_in_place(a)) return DocumentError{DocumentErrc::not_xml, "attribute value: " + error};
    } else if (node.type() == pugi::node_pcdata) {
      if (!unescape_in_place(node)) return DocumentError{DocumentErrc::not_xml, "text: " + error};
    }
    if (pugi::xml_node child = node.first_child()) {
      node = child;
      ++depth;
      continue;
    }
    for (;;) {
      if (node == root) return std::nullopt;
      if (pugi::xml_node sibling = node.next_sibling()) {
        node = sibling;
        break;
      }
      node = node.parent();
      --depth;
    }
  }
}

}  // namespace

std::optional<DocumentError> Document::load(std::string_view body, int max_depth) {
  DecodedBody decoded;
  if (auto error = decode_body(body, decoded)) return error;
  encoding_label_ = std::move(decoded.label);
  text_ = std::move(decoded.utf8);

  auto fail = [](DocumentErrc code, std::string message) { return DocumentError{code, std::move(message)}; };
  constexpr unsigned kOptions = pugi::parse_cdata | pugi::parse_wconv_attribute | pugi::parse_eol |
                                pugi::parse_doctype | pugi::parse_fragment;  // no parse_escapes: see unescape
  const pugi::xml_parse_result parsed =
      doc_.load_buffer_inplace(text_.data(), text_.size(), kOptions, pugi::encoding_utf8);
  if (!parsed)
    return fail(DocumentErrc::not_xml,
                std::string(parsed.description()) + " near byte " + std::to_string(parsed.offset));

  pugi::xml_node root;
  for (pugi::xml_node n = doc_.first_child(); n; n = n.next_sibling()) {
    switch (n.type()) {
      case pugi::node_element:
        if (root) return fail(DocumentErrc::not_xml, "more than one root element");
        root = n;
        break;
      case pugi::node_doctype:
        if (root) return fail(DocumentErrc::not_xml, "a DOCTYPE after the root element");
        if (doctype_has_declarations(n.value()))
          return fail(DocumentErrc::unsafe_xml, "DTD declarations (an internal subset) are not accepted");
        break;
      case pugi::node_pcdata:
      case pugi::node_cdata: return fail(DocumentErrc::not_xml, "text outside the root element");
      default: break;  // comments and processing instructions
    }
  }
  if (!root) return fail(DocumentErrc::not_xml, "no root element");
  if (auto error = normalise_tree(root, max_depth)) return error;
  root_ = root;
  return std::nullopt;
}

bool is_element(pugi::xml_node n, std::string_view name) {
  return n.type() == pugi::node_element && iequals(n.name(), name);
}

std::string text_of(pugi::xml_node n) {
  std::string s;
  for (pugi::xml_node c = n.first_child(); c; c = c.next_sibling())
    if (c.type() == pugi::node_pcdata || c.type() == pugi::node_cdata) s += c.value();
  return s;
}

std::string trimmed_text(pugi::xml_node n) {
  const std::string s = text_of(n);
  return std::string(trim(s));
}

std::string trimmed_attr(pugi::xml_node n, std::string_view name) {
  for (pugi::xml_attribute a = n.first_attribute(); a; a = a.next_attribute())
    if (iequals(a.name(), name)) return std::string(trim(a.value()));
  return {};
}

pugi::xml_node first_element_starting_with(pugi::xml_node parent, std::string_view prefix) {
  for (pugi::xml_node c = parent.first_child(); c; c = c.next_sibling())
    if (c.type() == pugi::node_element && istarts_with(c.name(), prefix)) return c;
  return {};
}

bool is_ascii_name(std::string_view s) {
  if (s.empty()) return false;
  auto alpha = [](char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_'; };
  if (!alpha(s[0])) return false;
  for (char c : s)
    if (!alpha(c) && !(c >= '0' && c <= '9') && c != '.' && c != '-') return false;
  return true;
}

void append_escaped(std::string& out, std::string_view text, bool attribute) {
  std::size_t pos = 0;
  char32_t cp = 0;
  while (pos < text.size()) {
    if (!next_code_point(text, pos, cp)) {
      ++pos;
      cp = 0xFFFD;
    } else if (!is_xml_char(cp)) {
      cp = 0xFFFD;
    }
    switch (cp) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"':
        if (attribute)
          out += "&quot;";
        else
          out += '"';
        break;
      case '\r': out += "&#13;"; break;
      case '\n':
        if (attribute)
          out += "&#10;";
        else
          out += '\n';
        break;
      case '\t':
        if (attribute)
          out += "&#9;";
        else
          out += '\t';
        break;
      default: append_utf8(out, cp);
    }
  }
}

}  // namespace xmlservice::detail
