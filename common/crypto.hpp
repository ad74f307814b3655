// common/crypto.hpp: the few primitives the broker needs, on OpenSSL.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace common::crypto {

std::string sha256_hex(std::string_view data);
std::string hmac_sha256_hex(std::string_view key, std::string_view data);
// n cryptographically random bytes, hex encoded (2n characters).
std::string random_hex(std::size_t n);
bool constant_time_equal(std::string_view a, std::string_view b);

// Password hashes: "pbkdf2-sha256$<iterations>$<salt hex>$<hash hex>".
inline constexpr int kDefaultPbkdf2Iterations = 210000;
std::string hash_password(std::string_view password, int iterations = kDefaultPbkdf2Iterations);
// False for a wrong password or a malformed hash.
bool verify_password(std::string_view password, std::string_view encoded);
bool is_password_hash(std::string_view encoded);

}  // namespace common::crypto
