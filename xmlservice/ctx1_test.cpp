#include "xmlservice/ctx1.hpp"

#include <doctest/doctest.h>

#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

std::vector<std::pair<std::string, std::string>> load_vectors() {
  std::ifstream in(std::string(OPENBROKER_SOURCE_DIR) + "/tests/data/nfuse/ctx1-vectors.txt");
  REQUIRE(in.good());
  std::vector<std::pair<std::string, std::string>> vectors;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const auto tab = line.find('\t');
    REQUIRE(tab != std::string::npos);
    vectors.emplace_back(line.substr(0, tab), line.substr(tab + 1));
  }
  return vectors;
}

}  // namespace

using namespace xmlservice;

TEST_CASE("ctx1: the reference vectors encode and decode exactly") {
  const auto vectors = load_vectors();
  REQUIRE(vectors.size() >= 6);
  for (const auto& vector : vectors) {
    const std::string& plain = vector.first;
    const std::string& encoded = vector.second;
    CAPTURE(plain);
    CHECK(ctx1::encode(plain).value() == encoded);
    CHECK(ctx1::decode(encoded).value() == plain);
  }
  // The ones of the design notes, spelled out.
  CHECK(ctx1::decode("NFHALEBBMHGCLEBBMDGGKMAJNOHLLKBP").value() == "password");
  CHECK(ctx1::encode("Password1").value() == "PFFAJEDBOHECJEDBODEGIMCJPOFLJKDPKLAO");
  CHECK(ctx1::encode("a").value() == "MEGB");
  CHECK(ctx1::encode("ab").value() == "MEGBKGAD");
}

TEST_CASE("ctx1: empty password and whitespace") {
  CHECK(ctx1::encode("").value().empty());
  CHECK(ctx1::decode("").value().empty());
  CHECK(ctx1::decode("  MEGB\r\n KGAD \t").value() == "ab");
}

TEST_CASE("ctx1: every BMP and astral round trip") {
  std::string all;
  for (char32_t cp : {U'A', U'z', U' ', U'\u00e9', U'\u20ac', U'\uffe0', U'\U0001F600', U'\U0010FFFD'}) {
    std::string s;
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else if (cp < 0x800) {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      s += static_cast<char>(0xE0 | (cp >> 12));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      s += static_cast<char>(0xF0 | (cp >> 18));
      s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    all += s;
    const auto encoded = ctx1::encode(s).value();
    CHECK(encoded.size() == (cp < 0x10000 ? 4u : 8u));
    CHECK(ctx1::decode(encoded).value() == s);
  }
  CHECK(ctx1::decode(ctx1::encode(all).value()).value() == all);
}

TEST_CASE("ctx1: input that is not ctx1 is an error") {
  // Redacted placeholders from blog posts: letters beyond P.
  CHECK(!ctx1::decode("PASSWORDLOL"));
  CHECK(!ctx1::decode("JJJHFTEBJKAKLSNVYRHABEHBDHBTTEJWUDBJLOLEO"));
  CHECK(!ctx1::decode("megb"));                  // lower case
  CHECK(!ctx1::decode("MEG"));                   // not a multiple of 4
  CHECK(!ctx1::decode("MEGBKG"));                // half a UTF-16 code unit
  CHECK(!ctx1::decode("MEGB-KGAD"));             // punctuation
  CHECK(ctx1::decode("MEG").error().code == common::errc::invalid_argument);
  // A lone high surrogate (U+D800 alone).
  std::string lone;
  {
    // bytes 00 D8: x0 = 0x00^0xA5 = 0xA5 (KF), x1 = 0xD8^0xA5^0xA5 = 0xD8 (NI)
    lone = "KFNI";
  }
  CHECK(!ctx1::decode(lone));
  // A NUL code unit: bytes 00 00 -> A5 (KF), 00^A5^A5 = 00 (AA).
  CHECK(!ctx1::decode("KFAA"));
  // Invalid UTF-8 cannot be encoded.
  CHECK(!ctx1::encode("\xff"));
  CHECK(!ctx1::encode("\xed\xa0\x80"));  // an encoded surrogate
}
