// net/test_support.hpp: helpers for the net/ integration tests (not part of broker_net): a raw
// blocking socket and a self-signed TLS certificate in a temporary directory.
#pragma once

#include <doctest/doctest.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>

namespace net::test {

// A plain blocking socket, for bytes no well-behaved client sends.
class RawSocket {
 public:
  explicit RawSocket(std::uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd_ >= 0);
    timeval tv{10, 0};  // a safety net against hangs, not an assertion
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  }
  ~RawSocket() { ::close(fd_); }
  RawSocket(const RawSocket&) = delete;
  RawSocket& operator=(const RawSocket&) = delete;

  void send(std::string_view bytes) {
    while (!bytes.empty()) {
      const auto n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      REQUIRE(n > 0);
      bytes.remove_prefix(static_cast<std::size_t>(n));
    }
  }
  // Sends FIN (the peer then reads end-of-stream).
  void shutdown_send() { ::shutdown(fd_, SHUT_WR); }
  // Everything until the server closes.
  std::string read_all() {
    std::string out;
    char buf[4096];
    for (;;) {
      const auto n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) return out;
      out.append(buf, static_cast<std::size_t>(n));
    }
  }
  // Up to and including the first "\r\n\r\n" (a response head without a body); reads byte by
  // byte so that nothing after it is consumed.
  std::string read_head() {
    std::string out;
    char c = 0;
    while (!out.ends_with("\r\n\r\n")) {
      if (::recv(fd_, &c, 1, 0) != 1) return out;
      out.push_back(c);
    }
    return out;
  }
  // Exactly n bytes, fewer when the peer closes first.
  std::string read_exact(std::size_t n) {
    std::string out(n, '\0');
    std::size_t got = 0;
    while (got < n) {
      const auto r = ::recv(fd_, out.data() + got, n - got, 0);
      if (r <= 0) break;
      got += static_cast<std::size_t>(r);
    }
    out.resize(got);
    return out;
  }
  // One response with a Content-Length body.
  std::string read_response() {
    std::string out;
    char buf[4096];
    std::size_t need = std::string::npos;
    for (;;) {
      const auto end = out.find("\r\n\r\n");
      if (end != std::string::npos && need == std::string::npos) {
        const auto cl = out.find("Content-Length: ");
        REQUIRE(cl != std::string::npos);
        need = end + 4 + std::stoul(out.substr(cl + 16));
      }
      if (need != std::string::npos && out.size() >= need) return out.substr(0, need);
      const auto n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) return out;
      out.append(buf, static_cast<std::size_t>(n));
    }
  }

 private:
  int fd_ = -1;
};

// A self-signed certificate (CN=localhost, EC P-256) and its key, as PEM files in a temp dir.
class TempTlsFiles {
 public:
  TempTlsFiles() {
    static std::atomic<int> counter{0};
    dir_ = std::filesystem::temp_directory_path() /
           ("openbroker_net_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(dir_);
    cert = (dir_ / "cert.pem").string();
    key = (dir_ / "key.pem").string();

    EVP_PKEY* pkey = EVP_EC_gen("P-256");
    REQUIRE(pkey != nullptr);
    X509* x509 = X509_new();
    X509_set_version(x509, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x509), 1);
    X509_gmtime_adj(X509_getm_notBefore(x509), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x509), 24 * 3600);
    X509_set_pubkey(x509, pkey);
    X509_NAME* name = X509_get_subject_name(x509);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("localhost"), -1, -1,
                               0);
    X509_set_issuer_name(x509, name);
    REQUIRE(X509_sign(x509, pkey, EVP_sha256()) > 0);

    std::FILE* f = std::fopen(cert.c_str(), "wb");
    REQUIRE(f != nullptr);
    PEM_write_X509(f, x509);
    std::fclose(f);
    f = std::fopen(key.c_str(), "wb");
    REQUIRE(f != nullptr);
    PEM_write_PrivateKey(f, pkey, nullptr, nullptr, 0, nullptr, nullptr);
    std::fclose(f);
    X509_free(x509);
    EVP_PKEY_free(pkey);
  }
  ~TempTlsFiles() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string cert;
  std::string key;

 private:
  std::filesystem::path dir_;
};

}  // namespace net::test
