#include "xmlservice/ctx1.hpp"

#include "xmlservice/detail/xml_text.hpp"

#include <cstdint>
#include <vector>

namespace xmlservice::ctx1 {

namespace {
constexpr std::uint8_t kKey = 0xA5;
}  // namespace

common::Result<std::string> encode(std::string_view plain) {
  const auto utf16 = detail::utf8_to_utf16(plain);
  if (!utf16) return common::make_error(common::errc::invalid_argument, "password is not valid UTF-8");
  std::string out;
  out.reserve(utf16->size() * 4);
  std::uint8_t prev = 0;
  auto put = [&](std::uint8_t byte) {
    const auto x = static_cast<std::uint8_t>(byte ^ kKey ^ prev);
    prev = x;
    out += static_cast<char>('A' + (x >> 4));
    out += static_cast<char>('A' + (x & 0x0F));
  };
  for (char16_t unit : *utf16) {
    put(static_cast<std::uint8_t>(unit & 0xFF));  // UTF-16LE: low byte first
    put(static_cast<std::uint8_t>(unit >> 8));
  }
  return out;
}

common::Result<std::string> decode(std::string_view encoded) {
  std::vector<std::uint8_t> nibbles;
  nibbles.reserve(encoded.size());
  for (char c : encoded) {
    if (detail::is_xml_space(c)) continue;
    if (c < 'A' || c > 'P')
      return common::make_error(common::errc::invalid_argument, "ctx1 text holds a character outside A..P");
    nibbles.push_back(static_cast<std::uint8_t>(c - 'A'));
  }
  if (nibbles.size() % 4 != 0)
    return common::make_error(common::errc::invalid_argument, "ctx1 text length is not a multiple of 4");

  std::u16string utf16;
  utf16.reserve(nibbles.size() / 4);
  std::uint8_t prev = 0;
  std::uint8_t low = 0;
  for (std::size_t i = 0; i < nibbles.size(); i += 2) {
    const auto v = static_cast<std::uint8_t>((nibbles[i] << 4) | nibbles[i + 1]);
    const auto byte = static_cast<std::uint8_t>(v ^ kKey ^ prev);
    prev = v;
    if ((i / 2) % 2 == 0) {
      low = byte;
    } else {
      const auto unit = static_cast<char16_t>(low | (byte << 8));
      if (unit == 0) return common::make_error(common::errc::invalid_argument, "ctx1 password holds NUL");
      utf16 += unit;
    }
  }
  auto utf8 = detail::utf16_to_utf8(utf16);
  if (!utf8) return common::make_error(common::errc::invalid_argument, "ctx1 password is not valid UTF-16");
  return std::move(*utf8);
}

}  // namespace xmlservice::ctx1
