// net/test_support.hpp: helpers for the net/ integration tests (not part of broker_net): a raw
// blocking socket, a self-signed TLS certificate in a temporary directory, and a small PKI for
// mutual TLS (also used by tests/integration).
#pragma once

#include <doctest/doctest.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace net::test {

// A plain blocking socket, for bytes no well-behaved client sends.
class RawSocket {
 public:
  // `source`: the local IPv4 address to connect from (any of 127.0.0.0/8 works on loopback),
  // null: the system's choice.
  explicit RawSocket(std::uint16_t port, const char* source = nullptr) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd_ >= 0);
    timeval tv{10, 0};  // a safety net against hangs, not an assertion
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (source != nullptr) {
      sockaddr_in local{};
      local.sin_family = AF_INET;
      REQUIRE(::inet_pton(AF_INET, source, &local.sin_addr) == 1);
      REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&local), sizeof local) == 0);
    }
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
  // Reads and drops everything until the server closes: true when it did (end of stream or a
  // reset), false when nothing ended the connection within the safety timeout.
  bool wait_closed_by_peer() {
    char buf[4096];
    for (;;) {
      const auto n = ::recv(fd_, buf, sizeof buf, 0);
      if (n == 0) return true;
      if (n < 0) return errno == ECONNRESET;
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

// A small PKI for mutual TLS, made at test time as PEM files in a temp dir (EC P-256, valid from
// an hour ago for a day): a CA; a server certificate it signed for localhost and 127.0.0.1; a
// client certificate it signed; and a client certificate signed by another CA, which a listener
// trusting `ca` must refuse.
class TestPki {
 public:
  TestPki() {
    static std::atomic<int> counter{0};
    dir_ = std::filesystem::temp_directory_path() /
           ("openbroker_pki_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(dir_);

    Issued root = issue("openbroker test CA", nullptr, kCa);
    Issued other_root = issue("another test CA", nullptr, kCa);
    ca = write(root, "ca");
    other_ca = write(other_root, "other-ca");
    std::tie(server_cert, server_key) = write_pair(issue("localhost", &root, kServer), "server");
    std::tie(client_cert, client_key) = write_pair(issue("TEST vm-1", &root, kClient), "client");
    std::tie(other_client_cert, other_client_key) =
        write_pair(issue("TEST vm-1", &other_root, kClient), "other-client");
    for (Issued* i : {&root, &other_root}) release(*i);
  }
  ~TestPki() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  TestPki(const TestPki&) = delete;
  TestPki& operator=(const TestPki&) = delete;

  std::string ca;  // the CA: trust it to verify the server, or require client certificates it signed
  std::string server_cert, server_key;              // CN=localhost, SAN DNS:localhost, IP:127.0.0.1
  std::string client_cert, client_key;              // CN=TEST vm-1, signed by `ca`
  std::string other_ca;                             // a CA nobody trusts
  std::string other_client_cert, other_client_key;  // CN=TEST vm-1, signed by `other_ca`

 private:
  enum Profile { kCa, kServer, kClient };
  struct Issued {
    X509* cert = nullptr;
    EVP_PKEY* key = nullptr;
  };

  static void release(Issued& i) {
    X509_free(i.cert);
    EVP_PKEY_free(i.key);
  }

  // A certificate for a new key, signed by `issuer` (null: self-signed).
  static Issued issue(const std::string& common_name, const Issued* issuer, Profile profile) {
    static std::atomic<long> serial{1};
    Issued out;
    out.key = EVP_EC_gen("P-256");
    REQUIRE(out.key != nullptr);
    out.cert = X509_new();
    X509_set_version(out.cert, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(out.cert), serial++);
    X509_gmtime_adj(X509_getm_notBefore(out.cert), -3600);
    X509_gmtime_adj(X509_getm_notAfter(out.cert), 24 * 3600);
    X509_set_pubkey(out.cert, out.key);
    X509_NAME* name = X509_get_subject_name(out.cert);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(common_name.c_str()),
                               -1, -1, 0);
    X509* issuer_cert = issuer ? issuer->cert : out.cert;
    X509_set_issuer_name(out.cert, X509_get_subject_name(issuer_cert));

    std::vector<std::pair<int, std::string>> extensions{{NID_subject_key_identifier, "hash"}};
    if (issuer) extensions.emplace_back(NID_authority_key_identifier, "keyid");
    switch (profile) {
      case kCa:
        extensions.emplace_back(NID_basic_constraints, "critical,CA:TRUE");
        extensions.emplace_back(NID_key_usage, "critical,keyCertSign,cRLSign");
        break;
      case kServer:
        extensions.emplace_back(NID_basic_constraints, "critical,CA:FALSE");
        extensions.emplace_back(NID_key_usage, "critical,digitalSignature");
        extensions.emplace_back(NID_ext_key_usage, "serverAuth");
        extensions.emplace_back(NID_subject_alt_name, "DNS:localhost,IP:127.0.0.1");
        break;
      case kClient:
        extensions.emplace_back(NID_basic_constraints, "critical,CA:FALSE");
        extensions.emplace_back(NID_key_usage, "critical,digitalSignature");
        extensions.emplace_back(NID_ext_key_usage, "clientAuth");
        break;
    }
    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, issuer_cert, out.cert, nullptr, nullptr, 0);
    for (const auto& [nid, value] : extensions) {
      X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
      REQUIRE(ext != nullptr);
      X509_add_ext(out.cert, ext, -1);
      X509_EXTENSION_free(ext);
    }
    REQUIRE(X509_sign(out.cert, issuer ? issuer->key : out.key, EVP_sha256()) > 0);
    return out;
  }

  // Writes the certificate to <dir>/<name>.pem; returns the path.
  std::string write(const Issued& i, const std::string& name) {
    const std::string path = (dir_ / (name + ".pem")).string();
    std::FILE* f = std::fopen(path.c_str(), "wb");
    REQUIRE(f != nullptr);
    PEM_write_X509(f, i.cert);
    std::fclose(f);
    return path;
  }
  // Writes certificate and key (<name>.pem, <name>.key), frees them; returns both paths.
  std::pair<std::string, std::string> write_pair(Issued i, const std::string& name) {
    const std::string cert = write(i, name);
    const std::string key = (dir_ / (name + ".key")).string();
    std::FILE* f = std::fopen(key.c_str(), "wb");
    REQUIRE(f != nullptr);
    PEM_write_PrivateKey(f, i.key, nullptr, nullptr, 0, nullptr, nullptr);
    std::fclose(f);
    release(i);
    return {cert, key};
  }

  std::filesystem::path dir_;
};

}  // namespace net::test
