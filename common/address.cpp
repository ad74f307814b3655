#include "common/address.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <string>

namespace common {
namespace {

struct Ip {
  std::array<unsigned char, 16> bytes{};
  int size = 0;  // 4 or 16; 0 when invalid
};

Ip parse(std::string_view s) {
  Ip ip;
  if (s.empty() || s.size() > 45 || s.find('\0') != std::string_view::npos) return ip;
  const std::string z(s);
  if (inet_pton(AF_INET, z.c_str(), ip.bytes.data()) == 1) {
    ip.size = 4;
  } else if (inet_pton(AF_INET6, z.c_str(), ip.bytes.data()) == 1) {
    ip.size = 16;
    static constexpr unsigned char kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (std::memcmp(ip.bytes.data(), kMapped, 12) == 0) {  // ::ffff:a.b.c.d is IPv4
      std::memmove(ip.bytes.data(), ip.bytes.data() + 12, 4);
      ip.size = 4;
    }
  }
  return ip;
}

// Splits "addr/bits"; bits = -1 when absent, -2 when malformed.
int split(std::string_view s, std::string_view& address) {
  const auto slash = s.find('/');
  address = s.substr(0, slash);
  if (slash == std::string_view::npos) return -1;
  const auto bits = s.substr(slash + 1);
  if (bits.empty() || bits.size() > 3 ||
      !std::all_of(bits.begin(), bits.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return -2;
  int n = 0;
  for (char c : bits) n = n * 10 + (c - '0');
  return n;
}

}  // namespace

bool is_ip_address(std::string_view text) { return parse(text).size != 0; }

bool is_ip_or_cidr(std::string_view text) {
  std::string_view address;
  const int bits = split(text, address);
  if (bits == -2) return false;
  const Ip ip = parse(address);
  if (ip.size == 0) return false;
  const int max = address.find(':') != std::string_view::npos ? 128 : 32;
  return bits <= max;
}

bool address_in(std::string_view address, std::string_view range) {
  std::string_view net_text;
  int bits = split(range, net_text);
  if (bits == -2) return false;
  const Ip a = parse(address);
  const Ip net = parse(net_text);
  if (a.size == 0 || net.size == 0 || a.size != net.size) return false;
  if (bits == -1) bits = net.size * 8;
  // A mapped range written in IPv6 form ("::ffff:10.0.0.0/104") was folded to IPv4 by parse().
  if (net.size == 4 && net_text.find(':') != std::string_view::npos) bits -= 96;
  if (bits < 0 || bits > net.size * 8) return false;
  for (int i = 0; i < net.size && bits > 0; ++i, bits -= 8) {
    const unsigned char mask = bits >= 8 ? 0xff : static_cast<unsigned char>(0xff << (8 - bits));
    if ((a.bytes[i] & mask) != (net.bytes[i] & mask)) return false;
  }
  return true;
}

}  // namespace common
