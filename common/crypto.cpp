#include "common/crypto.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <stdexcept>
#include <vector>

namespace common::crypto {
namespace {
std::string to_hex(const unsigned char* p, std::size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string out(n * 2, '0');
  for (std::size_t i = 0; i < n; ++i) {
    out[2 * i] = digits[p[i] >> 4];
    out[2 * i + 1] = digits[p[i] & 15];
  }
  return out;
}
bool from_hex(std::string_view hex, std::vector<unsigned char>& out) {
  if (hex.size() % 2) return false;
  out.clear();
  auto nib = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (std::size_t i = 0; i < hex.size(); i += 2) {
    int hi = nib(hex[i]), lo = nib(hex[i + 1]);
    if (hi < 0 || lo < 0) return false;
    out.push_back(static_cast<unsigned char>(hi * 16 + lo));
  }
  return true;
}
std::vector<unsigned char> pbkdf2(std::string_view password, const std::vector<unsigned char>& salt, int iterations) {
  std::vector<unsigned char> out(32);
  if (PKCS5_PBKDF2_HMAC(password.data(), static_cast<int>(password.size()), salt.data(), static_cast<int>(salt.size()),
                        iterations, EVP_sha256(), static_cast<int>(out.size()), out.data()) != 1)
    throw std::runtime_error("PBKDF2 failed");
  return out;
}
}  // namespace

std::string sha256_hex(std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr);
  return to_hex(md, len);
}

std::string hmac_sha256_hex(std::string_view key, std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(data.data()),
       data.size(), md, &len);
  return to_hex(md, len);
}

std::string random_hex(std::size_t n) {
  std::vector<unsigned char> buf(n);
  if (RAND_bytes(buf.data(), static_cast<int>(n)) != 1) throw std::runtime_error("RAND_bytes failed");
  return to_hex(buf.data(), n);
}

bool constant_time_equal(std::string_view a, std::string_view b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

std::string hash_password(std::string_view password, int iterations) {
  std::vector<unsigned char> salt;
  from_hex(random_hex(16), salt);
  const auto dk = pbkdf2(password, salt, iterations);
  return "pbkdf2-sha256$" + std::to_string(iterations) + "$" + to_hex(salt.data(), salt.size()) + "$" +
         to_hex(dk.data(), dk.size());
}

namespace {
bool split_hash(std::string_view enc, int& iterations, std::vector<unsigned char>& salt, std::string_view& hash) {
  constexpr std::string_view prefix = "pbkdf2-sha256$";
  if (enc.substr(0, prefix.size()) != prefix) return false;
  enc.remove_prefix(prefix.size());
  auto d1 = enc.find('$');
  if (d1 == std::string_view::npos) return false;
  auto d2 = enc.find('$', d1 + 1);
  if (d2 == std::string_view::npos) return false;
  iterations = 0;
  for (char c : enc.substr(0, d1)) {
    if (c < '0' || c > '9' || iterations > 100000000) return false;
    iterations = iterations * 10 + (c - '0');
  }
  if (iterations < 1) return false;
  if (!from_hex(enc.substr(d1 + 1, d2 - d1 - 1), salt) || salt.empty()) return false;
  hash = enc.substr(d2 + 1);
  return hash.size() == 64;
}
}  // namespace

bool is_password_hash(std::string_view encoded) {
  int it;
  std::vector<unsigned char> salt;
  std::string_view h;
  return split_hash(encoded, it, salt, h);
}

bool verify_password(std::string_view password, std::string_view encoded) {
  int iterations;
  std::vector<unsigned char> salt;
  std::string_view expected;
  if (!split_hash(encoded, iterations, salt, expected)) return false;
  const auto dk = pbkdf2(password, salt, iterations);
  return constant_time_equal(to_hex(dk.data(), dk.size()), expected);
}

}  // namespace common::crypto
