// xmlservice/detail/xml_text.hpp: character-level helpers for the NFuse codec (private to
// xmlservice/): strict UTF-8 and UTF-16 conversion, the encodings a request may declare, XML
// character rules and ASCII case-insensitive comparison. Pure functions; none of them throws
// except std::bad_alloc.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace xmlservice::detail {

// Decodes the code point starting at s[pos] and advances pos past it. Strict: overlong forms,
// surrogates (U+D800..U+DFFF), values above U+10FFFF and truncated sequences return false and
// leave pos unchanged.
bool next_code_point(std::string_view s, std::size_t& pos, char32_t& cp);
bool is_valid_utf8(std::string_view s);
// Appends cp (any scalar value up to U+10FFFF, surrogates excluded) as UTF-8.
void append_utf8(std::string& out, char32_t cp);

// The XML 1.0 Char production: #x9 | #xA | #xD | [#x20-#xD7FF] | [#xE000-#xFFFD] |
// [#x10000-#x10FFFF].
bool is_xml_char(char32_t cp);

// UTF-8 <-> UTF-16 (as code units). nullopt on invalid input (invalid UTF-8; unpaired
// surrogates in UTF-16).
std::optional<std::u16string> utf8_to_utf16(std::string_view utf8);
std::optional<std::string> utf16_to_utf8(std::u16string_view utf16);

// The character sets a request may declare in its XML prolog and a reply may be written in.
enum class Charset { utf8, latin1, ascii };
// Maps an encoding label (case-insensitive: "UTF-8", "utf8", "ISO-8859-1", "latin1", "US-ASCII",
// ...) to its charset; nullopt for any other label.
std::optional<Charset> charset_for_label(std::string_view label);
// Every byte of ISO-8859-1 text is the code point of the same value.
std::string latin1_to_utf8(std::string_view latin1);
// Re-encodes valid UTF-8 text in `charset`; characters the charset cannot hold become decimal
// character references (`&#8364;`), so the input must be XML markup in which a character
// reference is allowed wherever non-ASCII text occurs (text content and attribute values).
std::string utf8_to_charset(std::string_view utf8, Charset charset);

// ASCII case-insensitive comparisons (element and attribute names, enumerated values).
bool iequals(std::string_view a, std::string_view b);
bool istarts_with(std::string_view s, std::string_view prefix);
// Without leading and trailing ASCII whitespace (space, tab, CR, LF).
std::string_view trim(std::string_view s);
bool is_xml_space(char c);

}  // namespace xmlservice::detail
