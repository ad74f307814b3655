// The LDAP backend's pure helpers, and its connection limits (operation_timeout, network_timeout,
// pool_size) against loopback servers written here: one that accepts connections and never
// answers, and one whose accept queue is full so that a connect never completes. The directory's
// answers are tested against a real slapd in tests/integration/ldap_directory_test.cpp.
#include "identity/ldap_directory.hpp"

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using namespace identity;
using namespace identity::ldap_detail;

namespace {

// S-1-5-21-1004336348-1177238915-682003330-1104 as AD stores it.
std::string sample_sid() {
  const unsigned char raw[] = {0x01, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05, 0x15, 0x00, 0x00, 0x00, 0xdc, 0xf4,
                               0xdc, 0x3b, 0x83, 0x3d, 0x2b, 0x46, 0x82, 0x8b, 0xa6, 0x28, 0x50, 0x04, 0x00, 0x00};
  return std::string(reinterpret_cast<const char*>(raw), sizeof raw);
}

}  // namespace

TEST_CASE("binary objectSid values decode to the S-1-5-21-... form and back") {
  CHECK(sid_to_string(sample_sid()) == "S-1-5-21-1004336348-1177238915-682003330-1104");
  CHECK(sid_from_string("S-1-5-21-1004336348-1177238915-682003330-1104") == sample_sid());
  CHECK(sid_from_string("s-1-5-32-544").has_value());
  CHECK(sid_to_string(*sid_from_string("S-1-5-32-544")) == "S-1-5-32-544");
  // Malformed: too short, wrong revision, count and size disagree, bad text.
  CHECK(sid_to_string("").empty());
  CHECK(sid_to_string(sample_sid().substr(0, 27)).empty());
  std::string bad = sample_sid();
  bad[0] = 2;
  CHECK(sid_to_string(bad).empty());
  CHECK_FALSE(sid_from_string("S-1-").has_value());
  CHECK_FALSE(sid_from_string("S-1-5-x").has_value());
  CHECK_FALSE(sid_from_string("S-1-5-99999999999").has_value());
  CHECK_FALSE(sid_from_string("alice").has_value());
}

TEST_CASE("filter values are escaped (RFC 4515)") {
  CHECK(escape_filter_value("alice") == "alice");
  CHECK(escape_filter_value("*)(uid=*") == "\\2a\\29\\28uid=\\2a");
  CHECK(escape_filter_value("a\\b") == "a\\5cb");
  CHECK(escape_filter_value(std::string("a\0b", 3)) == "a\\00b");
  CHECK(escape_filter_value("\xc3\xa9") == "\\c3\\a9");
}

TEST_CASE("in_chain: the group search names AD's transitive matching rule and the escaped user DN") {
  CHECK(in_chain_filter("(objectClass=group)", "member", "CN=alice,OU=People,DC=corp,DC=test") ==
        "(&(objectClass=group)(member:1.2.840.113556.1.4.1941:=CN=alice,OU=People,DC=corp,DC=test))");
  // A DN with characters special in filters (an escaped comma stays a DN escape, its backslash
  // is escaped for the filter; parentheses, * and non-ASCII bytes become \xx).
  CHECK(in_chain_filter("(objectClass=group)", "member", "CN=Smith\\, J (ops)*,OU=Caf\xc3\xa9,DC=corp") ==
        "(&(objectClass=group)(member:1.2.840.113556.1.4.1941:=CN=Smith\\5c, J \\28ops\\29\\2a,OU=Caf\\c3\\a9,"
        "DC=corp))");
  // A user DN cannot widen the filter.
  CHECK(in_chain_filter("(objectClass=group)", "member", "*)(objectClass=*") ==
        "(&(objectClass=group)(member:1.2.840.113556.1.4.1941:=\\2a\\29\\28objectClass=\\2a))");
  CHECK(in_chain_filter("(&(objectClass=group)(groupType:1.2.840.113556.1.4.803:=2147483648))", "member", "CN=a") ==
        "(&(&(objectClass=group)(groupType:1.2.840.113556.1.4.803:=2147483648))"
        "(member:1.2.840.113556.1.4.1941:=CN=a))");
}

TEST_CASE("token_groups: binary SIDs become filter escapes, every byte") {
  CHECK(escape_binary_filter_value("") == "");
  CHECK(escape_binary_filter_value(std::string("\x00\x2a\x28\x29\x5c\x41\xff", 7)) == "\\00\\2a\\28\\29\\5c\\41\\ff");
  CHECK(escape_binary_filter_value(sample_sid()) ==
        "\\01\\05\\00\\00\\00\\00\\00\\05\\15\\00\\00\\00\\dc\\f4\\dc\\3b\\83\\3d\\2b\\46\\82\\8b\\a6\\28\\50\\04\\00\\"
        "00");
  const auto builtin_users = *sid_from_string("S-1-5-32-545");
  CHECK(sids_filter("(objectClass=group)", "objectSid", {builtin_users}) ==
        "(&(objectClass=group)(|(objectSid=\\01\\02\\00\\00\\00\\00\\00\\05\\20\\00\\00\\00\\21\\02\\00\\00)))");
  CHECK(sids_filter("(objectClass=group)", "objectSid", {builtin_users, sample_sid()}) ==
        "(&(objectClass=group)(|(objectSid=\\01\\02\\00\\00\\00\\00\\00\\05\\20\\00\\00\\00\\21\\02\\00\\00)"
        "(objectSid=" +
            escape_binary_filter_value(sample_sid()) + ")))");
}

TEST_CASE("group_lookup spellings") {
  CHECK(group_lookup_from_string("member_of") == GroupLookup::member_of);
  CHECK(group_lookup_from_string("member") == GroupLookup::member);
  CHECK(group_lookup_from_string("in_chain") == GroupLookup::in_chain);
  CHECK(group_lookup_from_string("token_groups") == GroupLookup::token_groups);
  CHECK_FALSE(group_lookup_from_string("tokenGroups"));
  CHECK_FALSE(group_lookup_from_string(""));
}

TEST_CASE("AD's reason codes are read from a refused bind's diagnostic message") {
  CHECK(ad_bind_reason("80090308: LdapErr: DSID-0C09042F, comment: AcceptSecurityContext error, data 775, v2580") ==
        0x775);
  CHECK(ad_bind_reason("80090308: LdapErr: DSID-0C0903A9, comment: AcceptSecurityContext error, data 52e, v1db1") ==
        0x52e);
  CHECK(ad_bind_reason("") == 0);
  CHECK(ad_bind_reason("invalid credentials") == 0);
}

TEST_CASE("FILETIME values convert to time points") {
  // 2021-01-01T00:00:00Z
  const auto t = from_filetime(132539328000000000);
  CHECK(std::chrono::duration_cast<std::chrono::seconds>(t.time_since_epoch()).count() == 1609459200);
}

TEST_CASE("first RDN values") {
  CHECK(first_rdn_value("CN=Finance,OU=Groups,DC=corp,DC=test") == "Finance");
  CHECK(first_rdn_value("cn=Smith\\, John,ou=People") == "Smith, John");
  CHECK(first_rdn_value("nodn") == "nodn");
}

TEST_CASE("profiles") {
  auto ad = ldap_profile("ad");
  REQUIRE(ad);
  CHECK(ad->attributes.account_name == "sAMAccountName");
  CHECK(ad->group_lookup == GroupLookup::member_of);
  auto ol = ldap_profile("openldap");
  REQUIRE(ol);
  CHECK(ol->attributes.account_name == "uid");
  CHECK(ol->group_lookup == GroupLookup::member);
  CHECK_FALSE(ldap_profile("novell"));
}

TEST_CASE("an unreachable directory is errc::unavailable, never a credential answer") {
  common::SystemClock clock;
  LdapDirectoryOptions o;
  o.servers = {"ldap://127.0.0.1:1/"};  // nothing listens on port 1
  o.base_dn = "dc=corp,dc=test";
  o.domain = "CORP";
  o.network_timeout = std::chrono::milliseconds(500);
  LdapDirectory d(o, clock);
  auto r = d.authenticate({"alice", "", "secret"});
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == common::errc::unavailable);
  CHECK_FALSE(d.state().reachable);
  // In back-off: refused at once, still unavailable.
  auto again = d.lookup("alice", "");
  REQUIRE_FALSE(again.has_value());
  CHECK(again.error().code == common::errc::unavailable);
}

// ---- connection limits, against loopback servers ----------------------------------------------

namespace {

constexpr auto kPatience = 20s;  // safety net against hangs, not an assertion

// A listening socket on 127.0.0.1; `port` gets the port the kernel chose.
int listening_socket(int backlog, int& port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0 || ::listen(fd, backlog) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    throw std::runtime_error("listen failed");
  }
  port = ntohs(addr.sin_port);
  return fd;
}

std::string ldap_uri(int port) { return "ldap://127.0.0.1:" + std::to_string(port) + "/"; }

// Reads and drops what the peer sent on `fd`; false once the peer has closed the connection.
bool drain(int fd) {
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0 || (n < 0 && errno == EINTR)) continue;
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  }
}

// An LDAP server that accepts every connection and never answers: it reads and drops what
// clients send, and counts connections (accepted in all, and the most open at once).
class SilentServer {
 public:
  SilentServer() : listen_(listening_socket(SOMAXCONN, port_)) {
    ::fcntl(listen_, F_SETFL, O_NONBLOCK);
    if (::pipe2(wake_, O_CLOEXEC) != 0) throw std::runtime_error("pipe failed");
    thread_ = std::thread([this] { run(); });
  }
  ~SilentServer() {
    hang_up();
    ::close(wake_[0]);
    ::close(wake_[1]);
  }
  SilentServer(const SilentServer&) = delete;
  SilentServer& operator=(const SilentServer&) = delete;

  std::string uri() const { return ldap_uri(port_); }

  // The counts once the server has taken in every connection made before the call.
  std::size_t accepted() {
    settle();
    std::lock_guard lock(mutex_);
    return accepted_;
  }
  std::size_t most_open() {
    settle();
    std::lock_guard lock(mutex_);
    return most_open_;
  }
  // Waits until `n` connections have been accepted in all (false: not within kPatience).
  bool wait_accepted(std::size_t n) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, kPatience, [&] { return accepted_ >= n; });
  }
  // Closes every connection and the listening socket: a client waiting for an answer sees its
  // connection closed.
  void hang_up() {
    if (!thread_.joinable()) return;
    poke(kQuit);
    thread_.join();
  }

 private:
  static constexpr char kQuit = 'q', kSettle = 's';

  void poke(char what) {
    while (::write(wake_[1], &what, 1) < 0 && errno == EINTR) {}
  }

  // One turn of the server loop that starts after this call (so every connect that completed
  // before it is accepted and counted).
  void settle() {
    if (!thread_.joinable()) return;
    std::size_t target;
    {
      std::lock_guard lock(mutex_);
      target = ++settles_asked_;
    }
    poke(kSettle);
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return settles_done_ >= target || stopped_; });
  }

  void run() {
    std::vector<int> clients;
    for (bool quit = false; !quit;) {
      std::vector<pollfd> fds{{wake_[0], POLLIN, 0}, {listen_, POLLIN, 0}};
      for (int fd : clients) fds.push_back({fd, POLLIN, 0});
      if (::poll(fds.data(), fds.size(), -1) < 0 && errno != EINTR) break;
      std::size_t settles = 0;
      if (fds[0].revents != 0) {
        char buf[64];
        const ssize_t n = ::read(wake_[0], buf, sizeof buf);
        for (ssize_t i = 0; i < n; ++i) {
          if (buf[i] == kQuit) quit = true;
          if (buf[i] == kSettle) ++settles;
        }
      }
      // Closed connections are counted out before new ones are accepted, so that a client that
      // closes one connection and then opens the next is never seen with both open.
      std::erase_if(clients, [](int fd) {
        if (drain(fd)) return false;
        ::close(fd);
        return true;
      });
      std::size_t added = 0;
      for (int fd; (fd = ::accept4(listen_, nullptr, nullptr, SOCK_CLOEXEC)) >= 0; ++added) clients.push_back(fd);
      std::lock_guard lock(mutex_);
      accepted_ += added;
      most_open_ = std::max(most_open_, clients.size());
      settles_done_ += settles;
      cv_.notify_all();
    }
    for (int fd : clients) ::close(fd);
    ::close(listen_);
    std::lock_guard lock(mutex_);
    stopped_ = true;
    cv_.notify_all();
  }

  int port_ = 0;
  int listen_ = -1;
  int wake_[2] = {-1, -1};
  std::mutex mutex_;
  std::condition_variable cv_;
  std::size_t accepted_ = 0;       // guarded by mutex_
  std::size_t most_open_ = 0;      // guarded by mutex_
  std::size_t settles_asked_ = 0;  // guarded by mutex_
  std::size_t settles_done_ = 0;   // guarded by mutex_
  bool stopped_ = false;           // guarded by mutex_
  std::thread thread_;
};

// A listening socket whose accept queue is full (backlog 0 and one connection in the queue,
// never accepted): Linux drops the SYN of every further connect, so such a connect is neither
// completed nor refused until the kernel gives up (net.ipv4.tcp_syn_retries: about 2 minutes
// with the default of 6).
class FullListener {
 public:
  FullListener() : listen_(listening_socket(0, port_)) {
    filler_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<std::uint16_t>(port_));
    if (filler_ < 0 || ::connect(filler_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      hang_up();
      throw std::runtime_error("connect failed");
    }
  }
  ~FullListener() { hang_up(); }
  FullListener(const FullListener&) = delete;
  FullListener& operator=(const FullListener&) = delete;

  std::string uri() const { return ldap_uri(port_); }

  // The kernel's own test: for a listening socket, tcpi_unacked is the accept queue's length and
  // tcpi_sacked its backlog; the queue is full when longer than the backlog.
  bool full() const {
    tcp_info info{};
    socklen_t len = sizeof info;
    return listen_ >= 0 && ::getsockopt(listen_, IPPROTO_TCP, TCP_INFO, &info, &len) == 0 &&
           info.tcpi_unacked > info.tcpi_sacked;
  }
  // Waits until the filler connection is in the queue (false: not within kPatience).
  bool wait_full() const {
    const auto until = std::chrono::steady_clock::now() + kPatience;
    while (!full()) {
      if (std::chrono::steady_clock::now() > until) return false;
      std::this_thread::sleep_for(1ms);
    }
    return true;
  }
  // Closes the listening socket: a connect still waiting is refused at its next SYN.
  void hang_up() {
    if (listen_ >= 0) ::close(listen_);
    if (filler_ >= 0) ::close(filler_);
    listen_ = filler_ = -1;
  }

 private:
  int port_ = 0;
  int listen_ = -1;
  int filler_ = -1;
};

LdapDirectoryOptions options_for(std::vector<std::string> servers) {
  LdapDirectoryOptions o;
  o.servers = std::move(servers);
  o.start_tls = false;
  o.bind_dn = "cn=svc-broker,ou=Service,dc=corp,dc=test";
  o.bind_password = "svc-pass";
  o.base_dn = "dc=corp,dc=test";
  o.domain = "CORP";
  return o;
}

using Call = std::future<common::Result<AuthOutcome>>;

template <class Fn>
Call start(Fn fn) {
  return std::async(std::launch::async, std::move(fn));
}

// The error of a directory call that must return (within kPatience; else `unblock` makes it
// return and the test fails) and fail with errc::unavailable, never give a credential answer.
template <class Unblock>
std::string unavailable_reason(Call& call, Unblock unblock) {
  if (call.wait_for(kPatience) != std::future_status::ready) {
    unblock();
    call.wait();
    FAIL("the call did not return while the server stayed silent");
  }
  const auto r = call.get();
  REQUIRE_MESSAGE(!r.has_value(), "a credential answer from a server that never answered");
  CHECK(r.error().code == common::errc::unavailable);
  return r.error().message;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("operation_timeout: a server that never answers is errc::unavailable (timed out), not a credential answer") {
  SilentServer server;
  common::ManualClock clock(std::chrono::system_clock::now());
  auto o = options_for({server.uri()});
  o.operation_timeout = 300ms;
  const auto hang_up = [&] { server.hang_up(); };

  SUBCASE("the service account's bind") {
    LdapDirectory d(o, clock);
    auto auth = start([&] { return d.authenticate({"alice", "", "secret"}); });
    const auto reason = unavailable_reason(auth, hang_up);
    CHECK_MESSAGE(contains(reason, "service account bind: Timed out"), reason);
    CHECK(server.accepted() == 1);
    CHECK_FALSE(d.state().reachable);
    clock.advance(o.reconnect_max);  // past the back-off: the next call asks the server again
    auto look = start([&] { return d.lookup("alice", ""); });
    const auto again = unavailable_reason(look, hang_up);
    CHECK_MESSAGE(contains(again, "service account bind: Timed out"), again);
    CHECK(server.accepted() == 2);
  }
  SUBCASE("a search (a service connection without a bind)") {
    o.bind_dn.clear();
    LdapDirectory d(o, clock);
    // Each call searches twice, the second time on a new connection, then gives up.
    auto look = start([&] { return d.lookup("alice", ""); });
    const auto reason = unavailable_reason(look, hang_up);
    CHECK_MESSAGE(contains(reason, "directory unreachable: Timed out"), reason);
    CHECK(server.accepted() == 2);
    CHECK_FALSE(d.state().reachable);
    clock.advance(o.reconnect_max);
    auto auth = start([&] { return d.authenticate({"alice", "", "secret"}); });
    const auto again = unavailable_reason(auth, hang_up);
    CHECK_MESSAGE(contains(again, "directory unreachable: Timed out"), again);
    CHECK(server.accepted() == 4);
  }
}

TEST_CASE("network_timeout: a connect that never completes is given up, and the next server is tried") {
  FullListener full;
  REQUIRE(full.wait_full());
  SilentServer next;
  common::ManualClock clock(std::chrono::system_clock::now());
  auto o = options_for({full.uri(), next.uri()});
  o.network_timeout = 200ms;
  o.operation_timeout = 300ms;
  LdapDirectory d(o, clock);
  // Without network_timeout the connect to `full` would last until the kernel gives up (minutes):
  // the call would not return within kPatience and would never reach `next` before that.
  auto auth = start([&] { return d.authenticate({"alice", "", "secret"}); });
  const auto reason = unavailable_reason(auth, [&] { full.hang_up(); });
  CHECK_MESSAGE(contains(reason, full.uri() + ": service account bind: Can't contact LDAP server"), reason);
  CHECK_MESSAGE(contains(reason, next.uri() + ": service account bind: Timed out"), reason);
  CHECK(next.accepted() == 1);
}

TEST_CASE("pool_size: at most pool_size service connections at once; a caller finding none free in time fails busy") {
  SilentServer server;
  common::ManualClock clock(std::chrono::system_clock::now());
  // The same silent server ten times: a call holds its pool slot through ten service-account
  // binds that each time out (10 x operation_timeout), while a caller that finds both slots taken
  // waits operation_timeout for one (so the waiters have 1.8 s to start, even on a loaded machine).
  constexpr std::size_t kServers = 10;
  auto o = options_for(std::vector<std::string>(kServers, server.uri()));
  o.operation_timeout = 200ms;
  o.pool_size = 2;
  LdapDirectory d(o, clock);
  const auto hang_up = [&] { server.hang_up(); };
  const auto lookup = [&] { return d.lookup("alice", ""); };

  std::vector<Call> holders, waiters;
  for (int i = 0; i < 2; ++i) holders.push_back(start(lookup));
  REQUIRE(server.wait_accepted(2));  // both slots taken, each call in its first bind
  for (int i = 0; i < 2; ++i) waiters.push_back(start(lookup));
  for (auto& call : waiters) CHECK(unavailable_reason(call, hang_up) == "all 2 directory connections are busy");
  for (auto& call : holders) {
    const auto reason = unavailable_reason(call, hang_up);
    CHECK_MESSAGE(contains(reason, "service account bind: Timed out"), reason);
  }
  CHECK(server.most_open() == 2);
  CHECK(server.accepted() == 2 * kServers);  // the busy callers never connected
}
