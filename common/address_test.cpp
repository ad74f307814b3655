#include "common/address.hpp"

#include <doctest/doctest.h>

using common::address_in;

TEST_CASE("addresses and ranges") {
  CHECK(common::is_ip_address("10.0.0.5"));
  CHECK(common::is_ip_address("::1"));
  CHECK_FALSE(common::is_ip_address("10.0.0.256"));
  CHECK_FALSE(common::is_ip_address("host"));
  CHECK(common::is_ip_or_cidr("10.0.0.0/8"));
  CHECK(common::is_ip_or_cidr("2001:db8::/32"));
  CHECK_FALSE(common::is_ip_or_cidr("10.0.0.0/33"));
  CHECK_FALSE(common::is_ip_or_cidr("10.0.0.0/"));

  CHECK(address_in("10.1.2.3", "10.0.0.0/8"));
  CHECK_FALSE(address_in("11.1.2.3", "10.0.0.0/8"));
  CHECK(address_in("192.168.1.130", "192.168.1.128/25"));
  CHECK_FALSE(address_in("192.168.1.127", "192.168.1.128/25"));
  CHECK(address_in("127.0.0.1", "127.0.0.1"));
  CHECK_FALSE(address_in("127.0.0.2", "127.0.0.1"));
  CHECK(address_in("::ffff:127.0.0.1", "127.0.0.0/8"));  // dual-stack sockets
  CHECK(address_in("2001:db8::1", "2001:db8::/32"));
  CHECK_FALSE(address_in("2001:db9::1", "2001:db8::/32"));
  CHECK_FALSE(address_in("10.0.0.1", "::/0"));
  CHECK(address_in("10.0.0.1", "0.0.0.0/0"));
  CHECK_FALSE(address_in("", "0.0.0.0/0"));
  CHECK_FALSE(address_in("10.0.0.1", "garbage"));
}
