#include "xmlservice/default_icon.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace xmlservice {
namespace {

using Bytes = std::vector<std::uint8_t>;

void put16(Bytes& b, std::uint32_t v) {
  b.push_back(v & 0xff);
  b.push_back((v >> 8) & 0xff);
}
void put32(Bytes& b, std::uint32_t v) {
  put16(b, v & 0xffff);
  put16(b, v >> 16);
}
void put32be(Bytes& b, std::uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back((v >> s) & 0xff);
}

// RGBA pixels, row 0 at the top.
std::vector<std::array<std::uint8_t, 4>> draw(int n, bool desktop) {
  std::vector<std::array<std::uint8_t, 4>> px(static_cast<std::size_t>(n) * n, {0, 0, 0, 0});
  auto fill = [&](int x0, int y0, int x1, int y1, std::array<std::uint8_t, 4> c) {
    for (int y = std::max(0, y0); y < std::min(n, y1); ++y)
      for (int x = std::max(0, x0); x < std::min(n, x1); ++x) px[static_cast<std::size_t>(y) * n + x] = c;
  };
  const std::array<std::uint8_t, 4> frame{40, 48, 60, 255}, screen{52, 120, 200, 255}, bar{230, 230, 235, 255};
  const int u = std::max(1, n / 16);
  if (desktop) {
    fill(u, 2 * u, n - u, n - 5 * u, frame);              // monitor
    fill(2 * u, 3 * u, n - 2 * u, n - 6 * u, screen);     // screen
    fill(n / 2 - u, n - 5 * u, n / 2 + u, n - 3 * u, frame);  // neck
    fill(n / 4, n - 3 * u, n - n / 4, n - 2 * u, frame);  // foot
  } else {
    fill(u, 2 * u, n - u, n - 2 * u, frame);              // window
    fill(2 * u, 5 * u, n - 2 * u, n - 3 * u, bar);        // client area
    fill(2 * u, 3 * u, n - 2 * u, 4 * u + (u > 1 ? 0 : 1), screen);  // title bar
  }
  return px;
}

std::uint32_t crc32(const std::uint8_t* p, std::size_t n, std::uint32_t crc = 0) {
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

void png_chunk(Bytes& out, const char* type, const Bytes& data) {
  put32be(out, static_cast<std::uint32_t>(data.size()));
  Bytes typed(type, type + 4);
  typed.insert(typed.end(), data.begin(), data.end());
  out.insert(out.end(), typed.begin(), typed.end());
  put32be(out, crc32(typed.data(), typed.size()));
}

Bytes png(int n, bool desktop) {
  const auto px = draw(n, desktop);
  Bytes raw;  // filter byte 0 + RGBA per row
  for (int y = 0; y < n; ++y) {
    raw.push_back(0);
    for (int x = 0; x < n; ++x) {
      const auto& c = px[static_cast<std::size_t>(y) * n + x];
      raw.insert(raw.end(), c.begin(), c.end());
    }
  }
  // zlib stream of stored (uncompressed) deflate blocks.
  Bytes z{0x78, 0x01};
  std::uint32_t a = 1, b = 0;
  for (auto byte : raw) {
    a = (a + byte) % 65521;
    b = (b + a) % 65521;
  }
  for (std::size_t off = 0; off < raw.size() || off == 0; off += 65535) {
    const std::size_t len = std::min<std::size_t>(65535, raw.size() - off);
    z.push_back(off + len >= raw.size() ? 1 : 0);
    put16(z, static_cast<std::uint32_t>(len));
    put16(z, static_cast<std::uint32_t>(~len & 0xffff));
    z.insert(z.end(), raw.begin() + static_cast<std::ptrdiff_t>(off), raw.begin() + static_cast<std::ptrdiff_t>(off + len));
    if (off + len >= raw.size()) break;
  }
  put32be(z, (b << 16) | a);
  Bytes out{0x89, 'P', 'N', 'G', 0x0d, 0x0a, 0x1a, 0x0a};
  Bytes ihdr;
  put32be(ihdr, static_cast<std::uint32_t>(n));
  put32be(ihdr, static_cast<std::uint32_t>(n));
  ihdr.insert(ihdr.end(), {8, 6, 0, 0, 0});  // 8-bit RGBA
  png_chunk(out, "IHDR", ihdr);
  png_chunk(out, "IDAT", z);
  png_chunk(out, "IEND", {});
  return out;
}

Bytes ico(int n, bool desktop) {
  const auto px = draw(n, desktop);
  Bytes image;  // BITMAPINFOHEADER + BGRA bottom-up + AND mask
  put32(image, 40);
  put32(image, static_cast<std::uint32_t>(n));
  put32(image, static_cast<std::uint32_t>(2 * n));  // XOR + AND heights
  put16(image, 1);
  put16(image, 32);
  for (int i = 0; i < 6; ++i) put32(image, 0);
  for (int y = n - 1; y >= 0; --y)
    for (int x = 0; x < n; ++x) {
      const auto& c = px[static_cast<std::size_t>(y) * n + x];
      image.insert(image.end(), {c[2], c[1], c[0], c[3]});
    }
  const int mask_row = ((n + 31) / 32) * 4;
  for (int y = n - 1; y >= 0; --y) {
    Bytes row(static_cast<std::size_t>(mask_row), 0);
    for (int x = 0; x < n; ++x)
      if (px[static_cast<std::size_t>(y) * n + x][3] == 0) row[static_cast<std::size_t>(x / 8)] |= static_cast<std::uint8_t>(0x80 >> (x % 8));
    image.insert(image.end(), row.begin(), row.end());
  }
  Bytes out;
  put16(out, 0);
  put16(out, 1);  // icon
  put16(out, 1);  // one image
  out.push_back(n >= 256 ? 0 : static_cast<std::uint8_t>(n));
  out.push_back(n >= 256 ? 0 : static_cast<std::uint8_t>(n));
  out.push_back(0);
  out.push_back(0);
  put16(out, 1);
  put16(out, 32);
  put32(out, static_cast<std::uint32_t>(image.size()));
  put32(out, 22);
  out.insert(out.end(), image.begin(), image.end());
  return out;
}

std::string base64(const Bytes& in) {
  static const char* t = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  std::size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const std::uint32_t v = (in[i] << 16) | (in[i + 1] << 8) | in[i + 2];
    out += t[v >> 18];
    out += t[(v >> 12) & 63];
    out += t[(v >> 6) & 63];
    out += t[v & 63];
  }
  if (i < in.size()) {
    std::uint32_t v = in[i] << 16;
    if (i + 1 < in.size()) v |= in[i + 1] << 8;
    out += t[v >> 18];
    out += t[(v >> 12) & 63];
    out += i + 1 < in.size() ? t[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

}  // namespace

std::string default_icon_base64(const IconSpec& spec, bool desktop) {
  const int n = std::clamp(spec.size, 16, 256);
  return base64(spec.format == IconFormat::png ? png(n, desktop) : ico(n, desktop));
}

std::vector<IconSpec> default_icon_specs() {
  std::vector<IconSpec> specs;
  for (int size : {16, 32, 48}) specs.push_back({size, 32, IconFormat::raw});
  for (int size : {16, 32, 48, 128, 256}) specs.push_back({size, 32, IconFormat::png});
  return specs;
}

}  // namespace xmlservice
