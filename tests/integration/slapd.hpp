// tests/integration/slapd.hpp: a real OpenLDAP slapd for the LDAP directory tests. Started on a
// free loopback port with a temporary mdb database loaded from tests/data/ldap (the AD-like
// schema and corp.ldif, with the ppolicy overlay), as the current user; killed at the end.
// Throws (so the test fails, loudly) when slapd is not installed: scripts/setup installs it.
#pragma once

#include "tests/integration/daemon.hpp"

#include <string>

namespace itest {

struct SlapdOptions {
  bool tls = false;  // a test CA and a server certificate for 127.0.0.1, made with openssl
};

class Slapd {
 public:
  static constexpr const char* kBaseDn = "dc=corp,dc=test";
  static constexpr const char* kBindDn = "cn=svc-broker,ou=Service,dc=corp,dc=test";
  static constexpr const char* kBindPassword = "svc-pass";

  explicit Slapd(SlapdOptions options = {});  // loads the data and starts
  ~Slapd();
  Slapd(const Slapd&) = delete;
  Slapd& operator=(const Slapd&) = delete;

  // Kills slapd (SIGKILL: the server goes away mid-run) / starts it again on the same port.
  void kill();
  void start();
  bool running() const { return pid_ > 0; }

  int port() const { return port_; }
  std::string uri() const { return "ldap://127.0.0.1:" + std::to_string(port_) + "/"; }
  std::string ca_file() const { return dir_.file("ca.crt"); }           // the CA that signed the server
  std::string other_ca_file() const { return dir_.file("other.crt"); }  // a CA that did not
  std::string log() const;

 private:
  SlapdOptions options_;
  TempDir dir_;
  int port_ = 0;
  int pid_ = -1;
};

// A loopback port nothing listens on (bound once, then closed).
int free_port();

}  // namespace itest
