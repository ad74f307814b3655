#include "common/log.hpp"

#include <doctest/doctest.h>

#include <string>

using common::log_safe;

TEST_CASE("log_safe keeps ordinary names as they are") {
  CHECK(log_safe("alice") == "alice");
  CHECK(log_safe("DEMO\\alice") == "DEMO\\alice");
  CHECK(log_safe("J\xC3\xBCrgen M\xC3\xBCller \xE6\x9D\x8E") == "J\xC3\xBCrgen M\xC3\xBCller \xE6\x9D\x8E");
  CHECK(log_safe("") == "");
}

TEST_CASE("log_safe escapes what could forge or hide a log line") {
  CHECK(log_safe("bob\nxml RequestAppData from 10.0.0.1 user=admin result=ok") ==
        "bob\\x0axml RequestAppData from 10.0.0.1 user=admin result=ok");
  CHECK(log_safe("a\rb\tc\x1b[31md\x7f") == "a\\x0db\\x09c\\x1b[31md\\x7f");
  CHECK(log_safe(std::string("nul\0here", 8)) == "nul\\x00here");
  CHECK(log_safe("c1\xC2\x85x") == "c1\\u{0085}x");                   // NEL
  CHECK(log_safe("ls\xE2\x80\xA8x") == "ls\\u{2028}x");               // line separator
  CHECK(log_safe("evil\xE2\x80\xAEgnp.exe") == "evil\\u{202E}gnp.exe");  // right-to-left override
  // Not UTF-8: overlong, surrogate, truncated, stray continuation bytes.
  CHECK(log_safe("\xC0\xAF") == "\\xc0\\xaf");
  CHECK(log_safe("\xED\xA0\x80") == "\\xed\\xa0\\x80");
  CHECK(log_safe("ab\xE2\x82") == "ab\\xe2\\x82");
  CHECK(log_safe("\x80z") == "\\x80z");
}

TEST_CASE("log_safe truncates at a character boundary and says how long the value was") {
  const std::string long_name(900 * 1024, 'x');
  const std::string shown = log_safe(long_name);
  CHECK(shown == std::string(common::kLogSafeMaxBytes, 'x') + "...(921600 bytes)");
  CHECK(log_safe("abcdef", 4) == "abcd...(6 bytes)");
  CHECK(log_safe("abcdef", 6) == "abcdef");
  // A two-byte character that would straddle the limit is left out whole.
  CHECK(log_safe("abc\xC3\xBC", 4) == "abc...(5 bytes)");
  // The output stays bounded whatever the input holds.
  const std::string controls(10000, '\n');
  CHECK(log_safe(controls).size() <= 8 * common::kLogSafeMaxBytes + 24);
}
