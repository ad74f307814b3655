#include "common/clock.hpp"
#include "common/crypto.hpp"

#include <doctest/doctest.h>

using namespace common;

TEST_CASE("sha256 and hmac known answers") {
  CHECK(crypto::sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  // RFC 4231 test case 2
  CHECK(crypto::hmac_sha256_hex("Jefe", "what do ya want for nothing?") ==
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

TEST_CASE("password hashes verify only the right password") {
  const auto h = crypto::hash_password("s3cret", 1000);
  CHECK(crypto::is_password_hash(h));
  CHECK(crypto::verify_password("s3cret", h));
  CHECK(!crypto::verify_password("s3cret!", h));
  CHECK(!crypto::verify_password("s3cret", "pbkdf2-sha256$x$00$00"));
  CHECK(!crypto::is_password_hash("plain"));
  CHECK(h != crypto::hash_password("s3cret", 1000));  // salted
}

TEST_CASE("time format round trip") {
  SysTime t;
  REQUIRE(parse_time("2026-11-23T10:42:55.123Z", t));
  CHECK(format_time(t) == "2026-11-23T10:42:55.123Z");
  REQUIRE(parse_time("2026-01-02T03:04:05Z", t));
  CHECK(format_time(t) == "2026-01-02T03:04:05.000Z");
  CHECK(!parse_time("yesterday", t));
}
