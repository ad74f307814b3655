#include "common/crypto.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <memory>
#include <optional>
#include <stdexcept>
#include <system_error>
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

// ============================================================================================
// Authenticated encryption with a site key.

namespace {

constexpr std::size_t kKeyBytes = 32;
constexpr std::size_t kNonceBytes = 12;
constexpr std::size_t kTagBytes = 16;
constexpr std::string_view kSealedPrefix = "v1.";
constexpr std::size_t kMaxPlaintext = std::size_t{1} << 30;  // keeps every length within int

// The 32 key bytes, wiped when it goes out of scope.
class Key {
 public:
  ~Key() { OPENSSL_cleanse(bytes_.data(), bytes_.size()); }
  const unsigned char* data() const { return bytes_.data(); }
  // False unless `hex` is exactly 64 hex digits.
  bool parse(std::string_view hex) {
    std::vector<unsigned char> raw;
    const bool ok = hex.size() == 2 * kKeyBytes && from_hex(hex, raw);
    if (ok) std::copy(raw.begin(), raw.end(), bytes_.begin());
    OPENSSL_cleanse(raw.data(), raw.size());
    return ok;
  }

 private:
  std::array<unsigned char, kKeyBytes> bytes_{};
};

common::Error bad_key() {
  return common::make_error(common::errc::invalid_argument, "the site key is not 64 hex digits");
}
common::Error openssl_failed(const char* what) {
  return common::make_error(common::errc::internal, std::string("OpenSSL failed: ") + what);
}

using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)>;

const unsigned char* bytes_of(std::string_view s) { return reinterpret_cast<const unsigned char*>(s.data()); }

// --- base64url (RFC 4648 section 5), no padding; decoding is strict: only the alphabet, no
// whitespace or padding, a length that is not 1 mod 4, and zero bits after the last byte (so
// each byte string has exactly one text form).

constexpr std::string_view kBase64Url = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

void append_base64url(std::string& out, const unsigned char* p, std::size_t n) {
  std::uint32_t acc = 0;
  int bits = 0;
  for (std::size_t i = 0; i < n; ++i) {
    acc = (acc << 8) | p[i];
    bits += 8;
    while (bits >= 6) {
      bits -= 6;
      out += kBase64Url[(acc >> bits) & 63];
    }
  }
  if (bits > 0) out += kBase64Url[(acc << (6 - bits)) & 63];
}

bool decode_base64url(std::string_view text, std::vector<unsigned char>& out) {
  if (text.size() % 4 == 1) return false;
  out.clear();
  out.reserve(text.size() * 3 / 4);
  std::uint32_t acc = 0;
  int bits = 0;
  for (char c : text) {
    const std::size_t v = kBase64Url.find(c);
    if (v == std::string_view::npos) return false;
    acc = (acc << 6) | static_cast<std::uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<unsigned char>(acc >> bits));
    }
  }
  return (acc & ((1u << bits) - 1)) == 0;
}

// n random bytes; false when the system generator fails.
bool random_bytes(unsigned char* p, std::size_t n) { return RAND_bytes(p, static_cast<int>(n)) == 1; }

}  // namespace

std::string new_site_key() { return random_hex(kKeyBytes); }

namespace {

// AES-256-GCM over `n` bytes of `in` into `out` (same length) with `aad` as associated data.
// Encrypting writes the tag to `tag`; decrypting checks `tag` and fails with
// "authentication failed" when it does not match.
common::Status aes_256_gcm(bool encrypt, const Key& key, const unsigned char* nonce, std::string_view aad,
                           const unsigned char* in, std::size_t n, unsigned char* out, unsigned char* tag) {
  const int enc = encrypt ? 1 : 0;
  CipherCtx ctx(EVP_CIPHER_CTX_new(), &EVP_CIPHER_CTX_free);
  int len = 0;
  if (!ctx || EVP_CipherInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, key.data(), nonce, enc) != 1)
    return openssl_failed("AES-256-GCM init");
  if (!aad.empty() && EVP_CipherUpdate(ctx.get(), nullptr, &len, bytes_of(aad), static_cast<int>(aad.size())) != 1)
    return openssl_failed("AES-256-GCM associated data");
  if (n > 0 && EVP_CipherUpdate(ctx.get(), out, &len, in, static_cast<int>(n)) != 1)
    return openssl_failed("AES-256-GCM update");
  if (!encrypt && EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagBytes), tag) != 1)
    return openssl_failed("AES-256-GCM set tag");
  if (EVP_CipherFinal_ex(ctx.get(), out + n, &len) != 1) {
    if (encrypt) return openssl_failed("AES-256-GCM final");
    return common::make_error(
        common::errc::invalid_argument,
        "authentication failed: wrong key, wrong associated data, or the sealed value was altered");
  }
  if (encrypt && EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagBytes), tag) != 1)
    return openssl_failed("AES-256-GCM get tag");
  return {};
}

}  // namespace

common::Result<std::string> seal(std::string_view key_hex, std::string_view plaintext,
                                 std::string_view associated_data) {
  Key key;
  if (!key.parse(key_hex)) return bad_key();
  if (plaintext.size() > kMaxPlaintext || associated_data.size() > kMaxPlaintext)
    return common::make_error(common::errc::invalid_argument, "the value to seal is larger than 1 GiB");

  // nonce || ciphertext || tag
  std::vector<unsigned char> buf(kNonceBytes + plaintext.size() + kTagBytes);
  unsigned char* nonce = buf.data();
  unsigned char* ciphertext = nonce + kNonceBytes;
  if (!random_bytes(nonce, kNonceBytes)) return openssl_failed("RAND_bytes");
  if (auto done = aes_256_gcm(true, key, nonce, associated_data, bytes_of(plaintext), plaintext.size(), ciphertext,
                              ciphertext + plaintext.size());
      !done)
    return done.error();

  std::string out(kSealedPrefix);
  out.reserve(kSealedPrefix.size() + (buf.size() * 4 + 2) / 3);
  append_base64url(out, buf.data(), buf.size());
  return out;
}

common::Result<std::string> open(std::string_view key_hex, std::string_view sealed, std::string_view associated_data) {
  auto invalid = [](std::string message) {
    return common::make_error(common::errc::invalid_argument, std::move(message));
  };
  Key key;
  if (!key.parse(key_hex)) return bad_key();
  if (sealed.substr(0, kSealedPrefix.size()) != kSealedPrefix) {
    const std::string_view version = sealed.substr(0, sealed.find('.'));
    const bool numbered = version.size() >= 2 && version.size() < sealed.size() && version.size() <= 10 &&
                          version[0] == 'v' && version.find_first_not_of("0123456789", 1) == std::string_view::npos;
    if (numbered)
      return invalid("unsupported sealed-value version '" + std::string(version) + "' (this build reads v1)");
    return invalid("not a sealed value (no 'v1.' prefix)");
  }
  if (associated_data.size() > kMaxPlaintext || sealed.size() > kMaxPlaintext * 2)
    return invalid("the sealed value is larger than 1 GiB");
  std::vector<unsigned char> buf;
  if (!decode_base64url(sealed.substr(kSealedPrefix.size()), buf))
    return invalid("the sealed value is not valid unpadded base64url");
  if (buf.size() < kNonceBytes + kTagBytes) return invalid("the sealed value is too short");

  const std::size_t ciphertext_size = buf.size() - kNonceBytes - kTagBytes;
  const unsigned char* nonce = buf.data();
  const unsigned char* ciphertext = nonce + kNonceBytes;
  unsigned char* tag = buf.data() + kNonceBytes + ciphertext_size;  // EVP_CTRL_GCM_SET_TAG takes void*
  std::string plaintext(ciphertext_size, '\0');
  if (auto done = aes_256_gcm(false, key, nonce, associated_data, ciphertext, ciphertext_size,
                              reinterpret_cast<unsigned char*>(plaintext.data()), tag);
      !done) {
    OPENSSL_cleanse(plaintext.data(), plaintext.size());
    return done.error();
  }
  return plaintext;
}

// --- the key file -------------------------------------------------------------------------

namespace {

constexpr std::size_t kMaxKeyFileSize = 4096;

std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

common::Error key_file_error(common::errc code, const std::string& path, const std::string& what) {
  return common::make_error(code, "key file " + path + ": " + what);
}

// Closes the descriptor it owns.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  // Closes now, reporting the result (a deferred write error shows here).
  bool close() {
    const int fd = fd_;
    fd_ = -1;
    return ::close(fd) == 0;
  }

 private:
  int fd_;
};

// The key in a key file's content: 64 hex digits, then nothing, "\n" or "\r\n".
std::optional<std::string> key_from_content(std::string_view content) {
  if (content.size() >= 1 && content.back() == '\n') content.remove_suffix(1);
  if (content.size() >= 1 && content.back() == '\r') content.remove_suffix(1);
  std::vector<unsigned char> raw;
  if (content.size() != 2 * kKeyBytes || !from_hex(content, raw)) return std::nullopt;
  std::string key = to_hex(raw.data(), raw.size());
  OPENSSL_cleanse(raw.data(), raw.size());
  return key;
}

// Reads the key of the open file `fd` (which is `path`).
common::Result<std::string> read_key_file(int fd, const std::string& path) {
  struct stat st {};
  if (::fstat(fd, &st) != 0)
    return key_file_error(common::errc::storage_error, path, "cannot stat: " + errno_text(errno));
  if (!S_ISREG(st.st_mode)) return key_file_error(common::errc::invalid_argument, path, "not a regular file");
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return key_file_error(common::errc::invalid_argument, path,
                          std::string("group or others may access it (mode ") + mode + "); run chmod 600 " + path);
  }
  std::string content(kMaxKeyFileSize + 1, '\0');
  std::size_t size = 0;
  while (size < content.size()) {
    const ssize_t n = ::read(fd, content.data() + size, content.size() - size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return key_file_error(common::errc::storage_error, path, "cannot read: " + errno_text(errno));
    if (n == 0) break;
    size += static_cast<std::size_t>(n);
  }
  auto key = key_from_content(std::string_view(content).substr(0, size));
  OPENSSL_cleanse(content.data(), content.size());
  if (!key)
    return key_file_error(common::errc::invalid_argument, path, "does not hold a key (one line of 64 hex digits)");
  return std::move(*key);
}

bool write_all(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

std::string parent_dir(const std::string& path) {
  const std::size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Creates `path` holding a new key (see load_or_create_key_file). When another process created
// it first, returns that file's key.
common::Result<std::string> create_key_file(const std::string& path) {
  const auto fail = [&path](const std::string& what) {
    return key_file_error(common::errc::storage_error, path, what + ": " + errno_text(errno));
  };
  std::array<unsigned char, kKeyBytes> raw{};
  if (!random_bytes(raw.data(), raw.size())) return openssl_failed("RAND_bytes");
  std::string key = to_hex(raw.data(), raw.size());
  OPENSSL_cleanse(raw.data(), raw.size());

  std::string tmp = path + ".tmp.XXXXXX";
  Fd fd(::mkstemp(tmp.data()));  // mode 0600
  if (fd.get() < 0) return fail("cannot create a temporary file in " + parent_dir(path));
  struct TmpGuard {  // removes the temporary file on every path
    const std::string& name;
    ~TmpGuard() { ::unlink(name.c_str()); }
  } guard{tmp};
  if (::fchmod(fd.get(), 0600) != 0) return fail("cannot chmod " + tmp);
  const bool written = write_all(fd.get(), key + "\n");
  const bool synced = written && ::fsync(fd.get()) == 0;
  if (!written || !synced || !fd.close()) return fail("cannot write " + tmp);

  // link() never replaces an existing file: a concurrent creator's key wins over ours.
  if (::link(tmp.c_str(), path.c_str()) != 0) {
    if (errno == EEXIST) {
      Fd existing(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
      if (existing.get() < 0) return fail("cannot open");
      return read_key_file(existing.get(), path);
    }
    // A file system without hard links: fall back to rename (replaces a file that appeared since
    // the caller found none; the window is a few microseconds).
    if (::rename(tmp.c_str(), path.c_str()) != 0) return fail("cannot move " + tmp + " into place");
  }

  const std::string dir = parent_dir(path);
  Fd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.get() < 0) return fail("cannot open directory " + dir);
  if (::fsync(dir_fd.get()) != 0 && errno != EINVAL) return fail("cannot fsync directory " + dir);
  return key;
}

}  // namespace

common::Result<std::string> load_or_create_key_file(const std::string& path) {
  if (path.empty()) return common::make_error(common::errc::invalid_argument, "key file: the path is empty");
  // O_NONBLOCK: a FIFO at `path` must not block the open (read_key_file then refuses it).
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
  if (fd.get() >= 0) return read_key_file(fd.get(), path);
  if (errno != ENOENT) return key_file_error(common::errc::storage_error, path, "cannot open: " + errno_text(errno));
  return create_key_file(path);
}

}  // namespace common::crypto
