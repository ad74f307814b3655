// common/address.hpp: IP addresses and CIDR ranges as admins write them in the config and in
// rules ("10.0.0.5", "10.0.0.0/8", "2001:db8::/32"). Pure parsing; no sockets.
#pragma once

#include <string_view>

namespace common {

bool is_ip_address(std::string_view text);
bool is_ip_or_cidr(std::string_view text);
// True when `address` lies in `range` (an address or a CIDR range). An IPv4-mapped IPv6 address
// ("::ffff:10.0.0.5", as sockets report IPv4 peers on dual-stack listeners) matches IPv4 ranges.
// Malformed input never matches.
bool address_in(std::string_view address, std::string_view range);

}  // namespace common
