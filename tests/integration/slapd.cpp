#include "tests/integration/slapd.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

extern char** environ;

namespace itest {
namespace {

constexpr const char* kSlapd = "/usr/sbin/slapd";
constexpr const char* kSlapadd = "/usr/sbin/slapadd";

std::string data_dir() { return std::string(OPENBROKER_SOURCE_DIR) + "/tests/data/ldap"; }

void run_or_throw(const std::vector<std::string>& argv, const std::string& what) {
  auto r = run_command(argv);
  if (r.exit_code != 0)
    throw std::runtime_error(what + " failed (exit " + std::to_string(r.exit_code) + "): " + r.err + r.out);
}

// The test CA, a server certificate for 127.0.0.1 signed by it, and an unrelated second CA.
void make_certificates(const TempDir& dir) {
  const std::string openssl = "/usr/bin/openssl";
  if (!std::filesystem::exists(openssl)) throw std::runtime_error("openssl is not installed: run scripts/setup");
  const auto ca = [&](const std::string& name, const std::string& cn) {
    run_or_throw(
        {openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
         dir.file(name + ".key"), "-out", dir.file(name + ".crt"), "-days", "2", "-subj", "/CN=" + cn},
        "openssl req (CA)");
  };
  ca("ca", "openbroker test CA");
  ca("other", "some other CA");
  run_or_throw({openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", dir.file("server.key"), "-out", dir.file("server.csr"), "-subj", "/CN=127.0.0.1"},
               "openssl req (server)");
  dir.write("server.ext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
            "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n");
  run_or_throw(
      {openssl, "x509", "-req", "-in", dir.file("server.csr"), "-CA", dir.file("ca.crt"), "-CAkey", dir.file("ca.key"),
       "-CAcreateserial", "-out", dir.file("server.crt"), "-days", "2", "-extfile", dir.file("server.ext")},
      "openssl x509 (server)");
}

bool answers(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

}  // namespace

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = 0;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

Slapd::Slapd(SlapdOptions options) : options_(options) {
  if (!std::filesystem::exists(kSlapd) || !std::filesystem::exists(kSlapadd))
    throw std::runtime_error(std::string(kSlapd) + " is not installed: run scripts/setup (Debian package slapd)");
  if (options_.tls) make_certificates(dir_);
  std::filesystem::create_directory(dir_.file("db"));
  std::ostringstream conf;
  conf << "include /etc/ldap/schema/core.schema\n"
          "include /etc/ldap/schema/cosine.schema\n"
          "include /etc/ldap/schema/inetorgperson.schema\n"
       << "include " << data_dir() << "/ad.schema\n"
       << "modulepath /usr/lib/ldap\nmoduleload back_mdb\nmoduleload ppolicy\n"
       << "pidfile " << dir_.file("slapd.pid") << "\n";
  if (options_.tls)
    conf << "TLSCACertificateFile " << dir_.file("ca.crt") << "\nTLSCertificateFile " << dir_.file("server.crt")
         << "\nTLSCertificateKeyFile " << dir_.file("server.key") << "\n";
  conf << "database mdb\nmaxsize 16777216\nsuffix \"" << kBaseDn << "\"\n"
       << "rootdn \"cn=admin," << kBaseDn << "\"\nrootpw admin-pass\n"
       << "directory " << dir_.file("db") << "\n"
       << "index objectClass eq\nindex sAMAccountName,userPrincipalName,uid,member,memberOf eq\n"
       << "overlay ppolicy\nppolicy_default \"cn=default,ou=Policies," << kBaseDn << "\"\nppolicy_use_lockout\n";
  dir_.write("slapd.conf", conf.str());
  run_or_throw({kSlapadd, "-q", "-f", dir_.file("slapd.conf"), "-l", data_dir() + "/corp.ldif"}, "slapadd");
  port_ = free_port();
  start();
}

Slapd::~Slapd() { kill(); }

void Slapd::start() {
  if (pid_ > 0) return;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, dir_.file("slapd.log").c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, dir_.file("slapd.log").c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  const std::string conf = dir_.file("slapd.conf"), url = uri();
  // -d 0: stay in the foreground (our child), without debug output.
  std::vector<std::string> argv = {kSlapd, "-d", "0", "-f", conf, "-h", url};
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(a.data());
  args.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, kSlapd, &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw std::runtime_error("cannot start slapd");
  pid_ = pid;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!answers(port_)) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      throw std::runtime_error("slapd exited at start: " + log());
    }
    if (std::chrono::steady_clock::now() > deadline) {
      kill();
      throw std::runtime_error("slapd did not answer within 20 s: " + log());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void Slapd::kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  std::filesystem::remove(dir_.file("slapd.pid"));
}

std::string Slapd::log() const {
  std::ifstream in(dir_.file("slapd.log"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace itest
