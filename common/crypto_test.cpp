#include "common/crypto.hpp"

#include "common/clock.hpp"

#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <system_error>

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

// --- authenticated encryption with a site key ---------------------------------------------

namespace {

const std::string kKey = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

// Replaces the character at `pos` with another base64url character (changes the decoded bytes).
std::string flip_char(std::string s, std::size_t pos) {
  s[pos] = s[pos] == 'A' ? 'B' : 'A';
  return s;
}

// A fresh directory under /tmp, removed with everything in it at the end of the test.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "crypto_test.XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

void write_text(const std::filesystem::path& path, const std::string& text, mode_t mode) {
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
  }
  REQUIRE(::chmod(path.c_str(), mode) == 0);
}

mode_t mode_of(const std::filesystem::path& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

}  // namespace

TEST_CASE("new_site_key is 64 lower-case hex digits, different each time") {
  const std::string a = crypto::new_site_key();
  CHECK(a.size() == 64);
  CHECK(a.find_first_not_of("0123456789abcdef") == std::string::npos);
  CHECK(a != crypto::new_site_key());
  CHECK(crypto::seal(a, "x", "").has_value());
}

TEST_CASE("seal and open round trip") {
  for (const std::string& plaintext : {std::string(), std::string("p"), std::string("s3cret password"),
                                       std::string("\0binary\xff\x80", 9), std::string(1000, 'x')}) {
    CAPTURE(plaintext.size());
    const auto sealed = crypto::seal(kKey, plaintext, "ticket:42");
    REQUIRE(sealed);
    CHECK(sealed->rfind("v1.", 0) == 0);
    CHECK(sealed->find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", 3) ==
          std::string::npos);
    // 12-byte nonce + ciphertext + 16-byte tag, unpadded base64url.
    CHECK(sealed->size() == 3 + ((12 + plaintext.size() + 16) * 4 + 2) / 3);
    const auto opened = crypto::open(kKey, *sealed, "ticket:42");
    REQUIRE(opened);
    CHECK(*opened == plaintext);
  }
  // Upper-case keys are the same key.
  std::string upper = kKey;
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  const auto sealed = crypto::seal(upper, "abc", "");
  REQUIRE(sealed);
  CHECK(crypto::open(kKey, *sealed, "").value() == "abc");
}

TEST_CASE("two seals of the same text differ (fresh nonce)") {
  const auto a = crypto::seal(kKey, "same text", "ad");
  const auto b = crypto::seal(kKey, "same text", "ad");
  REQUIRE(a);
  REQUIRE(b);
  CHECK(*a != *b);
  CHECK(a->substr(0, 3 + 16) != b->substr(0, 3 + 16));  // the first 12 bytes (the nonce) differ
  CHECK(crypto::open(kKey, *a, "ad").value() == "same text");
  CHECK(crypto::open(kKey, *b, "ad").value() == "same text");
}

TEST_CASE("open refuses altered values, the wrong key and the wrong associated data") {
  const std::string plaintext = "correct horse battery staple";
  const auto sealed = crypto::seal(kKey, plaintext, "ticket:42");
  REQUIRE(sealed);
  auto refused_as_altered = [](const common::Result<std::string>& r) {
    REQUIRE(!r);
    CHECK(r.error().code == common::errc::invalid_argument);
    CHECK(r.error().message.find("authentication failed") != std::string::npos);
  };

  // Each part: nonce (chars 3..18), ciphertext, tag (the last 22 characters).
  const std::size_t nonce_pos = 3 + 2;
  const std::size_t ciphertext_pos = 3 + 16 + 4;
  const std::size_t tag_pos = sealed->size() - 10;
  for (std::size_t pos : {nonce_pos, ciphertext_pos, tag_pos}) {
    CAPTURE(pos);
    refused_as_altered(crypto::open(kKey, flip_char(*sealed, pos), "ticket:42"));
  }
  // Every character position, for good measure.
  for (std::size_t pos = 3; pos < sealed->size(); ++pos)
    CHECK(!crypto::open(kKey, flip_char(*sealed, pos), "ticket:42"));

  std::string other_key = kKey;
  other_key[63] = 'e';
  refused_as_altered(crypto::open(other_key, *sealed, "ticket:42"));
  refused_as_altered(crypto::open(kKey, *sealed, "ticket:43"));
  refused_as_altered(crypto::open(kKey, *sealed, ""));

  // Cut after a whole group of 4 characters (3 bytes): still long enough, but the tag is off.
  const std::size_t groups = (sealed->size() - 3) / 4 - 1;
  refused_as_altered(crypto::open(kKey, sealed->substr(0, 3 + 4 * groups), "ticket:42"));
  // Extra bytes appended.
  refused_as_altered(crypto::open(kKey, *sealed + "AAAA", "ticket:42"));
}

TEST_CASE("open and seal report malformed input") {
  const auto sealed = crypto::seal(kKey, "text", "");
  REQUIRE(sealed);
  auto message_of = [](const common::Result<std::string>& r) {
    REQUIRE(!r);
    CHECK(r.error().code == common::errc::invalid_argument);
    return r.error().message;
  };

  for (const std::string& bad_key :
       {std::string(), kKey.substr(0, 62), kKey + "00", "g" + kKey.substr(1), std::string(64, ' ')}) {
    CAPTURE(bad_key);
    CHECK(message_of(crypto::seal(bad_key, "text", "")).find("64 hex digits") != std::string::npos);
    CHECK(message_of(crypto::open(bad_key, *sealed, "")).find("64 hex digits") != std::string::npos);
  }

  CHECK(message_of(crypto::open(kKey, "", "")).find("prefix") != std::string::npos);
  CHECK(message_of(crypto::open(kKey, sealed->substr(3), "")).find("prefix") != std::string::npos);
  CHECK(message_of(crypto::open(kKey, "V1." + sealed->substr(3), "")).find("prefix") != std::string::npos);
  CHECK(message_of(crypto::open(kKey, "v2." + sealed->substr(3), "")).find("unsupported") != std::string::npos);
  CHECK(message_of(crypto::open(kKey, "v1.", "")).find("too short") != std::string::npos);
  CHECK(message_of(crypto::open(kKey, sealed->substr(0, 3 + 36), "")).find("too short") != std::string::npos);
  for (const std::string& bad : {*sealed + "=", sealed->substr(0, 10) + "+" + sealed->substr(11),
                                 sealed->substr(0, 10) + "/" + sealed->substr(11),
                                 sealed->substr(0, 10) + " " + sealed->substr(11), *sealed + "\n"}) {
    CAPTURE(bad);
    CHECK(message_of(crypto::open(kKey, bad, "")).find("base64url") != std::string::npos);
  }
  // Non-zero bits after the last byte: another spelling of the same bytes is refused.
  // 12 + 4 + 16 = 32 bytes = 42 characters + 4 bits of padding in the last one.
  REQUIRE(sealed->size() == 3 + 43);
  std::string non_canonical = *sealed;
  const auto last =
      std::string_view("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_").find(non_canonical.back());
  non_canonical.back() = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last | 1];
  CHECK(message_of(crypto::open(kKey, non_canonical, "")).find("base64url") != std::string::npos);
}

TEST_CASE("load_or_create_key_file creates a 0600 key file once, then reads it") {
  TempDir dir;
  const std::string path = (dir.path / "site.key").string();
  const auto created = crypto::load_or_create_key_file(path);
  REQUIRE_MESSAGE(created, created.error().describe());
  CHECK(created->size() == 64);
  CHECK(mode_of(path) == 0600);
  {
    std::ifstream in(path);
    std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(content == *created + "\n");
  }
  // No temporary file left behind.
  CHECK(std::distance(std::filesystem::directory_iterator(dir.path), std::filesystem::directory_iterator()) == 1);

  const auto again = crypto::load_or_create_key_file(path);
  REQUIRE(again);
  CHECK(*again == *created);
  const auto sealed = crypto::seal(*created, "pw", "t");
  REQUIRE(sealed);
  CHECK(crypto::open(*again, *sealed, "t").value() == "pw");
}

TEST_CASE("load_or_create_key_file reads keys written by hand") {
  TempDir dir;
  const auto path = dir.path / "k";
  std::string upper = kKey;
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  for (const std::string& content : {kKey, kKey + "\n", kKey + "\r\n", upper + "\n"}) {
    write_text(path, content, 0600);
    const auto key = crypto::load_or_create_key_file(path.string());
    REQUIRE_MESSAGE(key, key.error().describe());
    CHECK(*key == kKey);
  }
  write_text(path, kKey + "\n", 0400);
  CHECK(crypto::load_or_create_key_file(path.string()).value() == kKey);
}

TEST_CASE("load_or_create_key_file refuses bad files with messages naming the path") {
  TempDir dir;
  const auto path = dir.path / "k";
  auto error_of = [](const std::filesystem::path& p) {
    const auto r = crypto::load_or_create_key_file(p.string());
    REQUIRE(!r);
    CHECK(r.error().message.find(p.string()) != std::string::npos);
    return r.error();
  };

  for (mode_t mode : {0640, 0604, 0644, 0660, 0601, 0700 | 0010}) {
    CAPTURE(mode);
    write_text(path, kKey + "\n", mode);
    const auto e = error_of(path);
    CHECK(e.code == common::errc::invalid_argument);
    CHECK(e.message.find("chmod 600") != std::string::npos);
  }

  for (const std::string& content :
       {std::string(), std::string("\n"), kKey.substr(0, 63) + "\n", kKey + "0\n", kKey + "\n\n", " " + kKey,
        kKey + " \n", "z" + kKey.substr(1), std::string(10000, 'a'), kKey + "\n" + kKey + "\n"}) {
    CAPTURE(content.size());
    write_text(path, content, 0600);
    const auto e = error_of(path);
    CHECK(e.code == common::errc::invalid_argument);
    CHECK(e.message.find("does not hold a key") != std::string::npos);
    CHECK(e.message.find(kKey) == std::string::npos);  // never echo the content
  }

  // A directory where the file should be.
  const auto sub = dir.path / "sub";
  std::filesystem::create_directory(sub);
  CHECK(error_of(sub).code == common::errc::invalid_argument);

  // A FIFO: refused without blocking.
  const auto fifo = dir.path / "fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  CHECK(error_of(fifo).message.find("not a regular file") != std::string::npos);

  // A missing directory: the file cannot be created.
  CHECK(error_of(dir.path / "missing" / "k").code == common::errc::storage_error);

  // An unreadable file (root reads everything: only checked for other users).
  if (::geteuid() != 0) {
    write_text(path, kKey + "\n", 0000);
    CHECK(error_of(path).code == common::errc::storage_error);
  }
}
