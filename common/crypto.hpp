// common/crypto.hpp: the few primitives the broker needs, on OpenSSL.
//
// All functions are pure or touch only the files named in their arguments, keep no state and may
// be called from any thread.
#pragma once

#include "common/error.hpp"

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

// --- Authenticated encryption with a site key ----------------------------------------------
//
// For secrets the broker stores and reads back itself (logon-ticket credentials at rest). A site
// key is 32 bytes written as 64 hex digits (either case is accepted; new_site_key and
// load_or_create_key_file return lower case).
//
// Sealed format, version 1 (text, so it fits a TEXT column):
//   "v1." base64url(nonce[12] || ciphertext || tag[16])   (RFC 4648 section 5 alphabet, no padding)
// AES-256-GCM with a fresh random 96-bit nonce per seal and `associated_data` as GCM additional
// authenticated data: it is not stored, and open must be given the same bytes. Bind the sealed value
// to its context with it (e.g. the ticket id) so a value copied to another row does not open.
// The ciphertext is as long as the plaintext: sealed values reveal the plaintext length.
// Random nonces: do not seal more than about 2^32 values under one key.

// A new random site key: 32 bytes as 64 lower-case hex digits. Throws std::runtime_error only
// when the system random generator fails.
std::string new_site_key();

// Encrypts and authenticates `plaintext`. Fails with errc::invalid_argument when `key_hex` is not
// 64 hex digits or the plaintext is over 1 GiB, errc::internal when OpenSSL fails. Never throws
// (but std::bad_alloc).
common::Result<std::string> seal(std::string_view key_hex, std::string_view plaintext,
                                 std::string_view associated_data);

// The plaintext `sealed` was made from, when it was sealed under this key with this associated
// data and has not been altered. Fails with errc::invalid_argument, the message saying which:
// a bad key, a missing or unknown version prefix, characters outside base64url, too short to be
// a sealed value, or "authentication failed" (wrong key, wrong associated data, or altered
// bytes: GCM cannot tell these apart). errc::internal when OpenSSL fails. Never throws (but
// std::bad_alloc).
common::Result<std::string> open(std::string_view key_hex, std::string_view sealed, std::string_view associated_data);

// The site key kept in the file at `path`: one line of 64 hex digits (a trailing newline, LF or
// CRLF, is allowed), returned in lower case. When no file exists at `path`, creates one with a
// new_site_key(): written to a temporary file in the same directory with mode 0600, fsync'ed,
// then moved into place without replacing a file another process created meanwhile (that file's
// key is returned instead), and the directory fsync'ed. The directory must exist.
// Errors, each naming the path: errc::invalid_argument for a file that is not a regular file,
// that group or others may access (mode & 077; the message says to chmod 600) or that does not
// hold a key; errc::storage_error when the file cannot be read or created. Never throws (but
// std::bad_alloc).
common::Result<std::string> load_or_create_key_file(const std::string& path);

}  // namespace common::crypto
