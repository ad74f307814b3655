// identity::LdapDirectory against a real slapd (tests/integration/slapd.hpp): credential
// outcomes, look-ups by SAM name, UPN and SID, nested groups with a cycle and their cap
// (max_groups), StartTLS with a test CA, failover to a second server, an outage in the middle
// of a run, and a user's own bind that gets no answer (operation_timeout; a proxy written here
// stands between the directory and slapd). Time (caches, back-off) is driven with a ManualClock;
// every wait is for a state.
#include "identity/ldap_directory.hpp"

#include "tests/integration/slapd.hpp"

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
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
#include <string_view>
#include <thread>
#include <vector>

using identity::AuthResult;
using identity::LdapDirectory;
using identity::LdapDirectoryOptions;
using itest::Slapd;
using namespace std::chrono_literals;

namespace {

constexpr const char* kSidPrefix = "S-1-5-21-1004336348-1177238915-682003330-";

LdapDirectoryOptions options(const std::vector<std::string>& servers) {
  LdapDirectoryOptions o = *identity::ldap_profile("ad");
  o.servers = servers;
  o.start_tls = false;
  o.bind_dn = Slapd::kBindDn;
  o.bind_password = Slapd::kBindPassword;
  o.base_dn = Slapd::kBaseDn;
  o.domain = "CORP";
  // The test schema has AD's classes as auxiliary classes and no objectCategory.
  o.user_filter = "(objectClass=user)";
  o.group_filter = "(objectClass=group)";
  o.lockout_duration = std::chrono::seconds(0);
  o.network_timeout = std::chrono::milliseconds(2000);
  o.operation_timeout = std::chrono::milliseconds(5000);
  o.pool_size = 2;
  o.credential_cache_seconds = [] { return std::int64_t{0}; };  // every check binds
  return o;
}

AuthResult result_of(LdapDirectory& d, const std::string& user, const std::string& password,
                     const std::string& domain = {}) {
  auto r = d.authenticate({user, domain, password});
  REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().describe()));
  return r->result;
}

bool has(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

const std::vector<std::string> kAliceGroups = {"CORP\\Cycle A",     "CORP\\Cycle B",     "CORP\\Desktop Users",
                                               "CORP\\Engineering", "CORP\\Kernel Team", "CORP\\Platform"};

}  // namespace

TEST_CASE("ldap: credential outcomes map the directory's states") {
  Slapd slapd;
  common::ManualClock clock(std::chrono::system_clock::now());
  LdapDirectory d(options({slapd.uri()}), clock);

  SUBCASE("the right password, in every name form") {
    auto r = d.authenticate({"alice", "", "alice-pass"});
    REQUIRE(r.has_value());
    CHECK(r->result == AuthResult::ok);
    REQUIRE(r->identity);
    const auto& id = *r->identity;
    CHECK(id.user_name == "alice");
    CHECK(id.domain == "CORP");
    CHECK(id.qualified_name == "CORP\\alice");
    CHECK(id.upn == "alice@corp.test");
    CHECK(id.sid == std::string(kSidPrefix) + "1101");
    CHECK(id.display_name == "Alice Example");
    CHECK(id.email == "alice@corp.test");
    CHECK(result_of(d, "CORP\\alice", "alice-pass") == AuthResult::ok);
    CHECK(result_of(d, "corp\\ALICE", "alice-pass") == AuthResult::ok);
    CHECK(result_of(d, "alice", "alice-pass", "CORP") == AuthResult::ok);
    CHECK(result_of(d, "Alice@Corp.Test", "alice-pass") == AuthResult::ok);
  }
  SUBCASE("wrong password, unknown user, empty password, other domain: failed_credentials") {
    CHECK(result_of(d, "alice", "wrong") == AuthResult::failed_credentials);
    CHECK(result_of(d, "nobody", "alice-pass") == AuthResult::failed_credentials);
    CHECK(result_of(d, "alice", "") == AuthResult::failed_credentials);
    CHECK(result_of(d, "OTHER\\alice", "alice-pass") == AuthResult::failed_credentials);
    CHECK(result_of(d, "*", "alice-pass") == AuthResult::failed_credentials);
    CHECK(result_of(d, "alice)(uid=*", "alice-pass") == AuthResult::failed_credentials);
    auto r = d.authenticate({"alice", "", "wrong"});
    REQUIRE(r.has_value());
    CHECK_FALSE(r->identity);
  }
  SUBCASE("disabled: only with the right password") {
    CHECK(result_of(d, "carol", "carol-pass") == AuthResult::account_disabled);
    CHECK(result_of(d, "carol", "wrong") == AuthResult::failed_credentials);
  }
  SUBCASE("expired password (ppolicy) and expired account (accountExpires)") {
    auto r = d.authenticate({"dave", "", "dave-pass"});
    REQUIRE(r.has_value());
    CHECK(r->result == AuthResult::expired_credentials);
    REQUIRE(r->identity);
    CHECK(r->identity->qualified_name == "CORP\\dave");
    CHECK(has(r->identity->groups, "CORP\\Desktop Users"));
    CHECK(result_of(d, "dave", "wrong") == AuthResult::failed_credentials);
    CHECK(result_of(d, "ivan", "ivan-pass") == AuthResult::expired_credentials);
  }
  SUBCASE("must change: AD pwdLastSet = 0 and ppolicy pwdReset") {
    auto r = d.authenticate({"erin", "", "erin-pass"});
    REQUIRE(r.has_value());
    CHECK(r->result == AuthResult::must_change_credentials);
    CHECK(r->identity.has_value());
    CHECK(result_of(d, "frank", "frank-pass") == AuthResult::must_change_credentials);
    CHECK(result_of(d, "erin", "wrong") == AuthResult::failed_credentials);
  }
  SUBCASE("locked out (AD lockoutTime, ppolicy pwdAccountLockedTime), whatever the password") {
    CHECK(result_of(d, "grace", "grace-pass") == AuthResult::account_locked_out);
    CHECK(result_of(d, "grace", "wrong") == AuthResult::account_locked_out);
    CHECK(result_of(d, "heidi", "heidi-pass") == AuthResult::account_locked_out);
  }
}

TEST_CASE("ldap: trusted look-ups by SAM name, UPN and SID, with nested groups and a cycle") {
  Slapd slapd;
  common::ManualClock clock(std::chrono::system_clock::now());
  for (const bool member_search : {false, true}) {
    CAPTURE(member_search);
    auto o = options({slapd.uri()});
    if (member_search) {
      // OpenLDAP without the memberof overlay: groups found by their member attribute.
      o.group_lookup = identity::GroupLookup::member;
      o.group_filter = "(objectClass=groupOfNames)";
    }
    LdapDirectory d(o, clock);
    for (const std::string& name :
         std::vector<std::string>{"alice", "CORP\\alice", "alice@corp.test", std::string(kSidPrefix) + "1101"}) {
      CAPTURE(name);
      auto r = d.lookup(name, "");
      REQUIRE(r.has_value());
      CHECK(r->result == AuthResult::ok);
      REQUIRE(r->identity);
      CHECK(r->identity->qualified_name == "CORP\\alice");
      CHECK(r->identity->groups == kAliceGroups);
      const auto& sids = r->identity->group_sids;
      CHECK(sids.size() == 6);
      CHECK(has(sids, std::string(kSidPrefix) + "1200"));  // Desktop Users, three levels up
      CHECK(has(sids, std::string(kSidPrefix) + "1211"));  // Cycle B, through the cycle
      // Rules name groups by name, bare name or SID, as with the built-in directory.
      CHECK(d.in_any(*r->identity, {"CORP\\Desktop Users"}));
      CHECK(d.in_any(*r->identity, {"Engineering"}));
      CHECK(d.in_any(*r->identity, {std::string(kSidPrefix) + "1200"}));
      CHECK_FALSE(d.in_any(*r->identity, {"CORP\\Finance"}));
    }
    auto bob = d.lookup("bob", "CORP");
    REQUIRE(bob.has_value());
    CHECK(bob->identity->groups == std::vector<std::string>{"CORP\\Desktop Users"});
    auto none = d.lookup("nobody", "");
    REQUIRE_FALSE(none.has_value());
    CHECK(none.error().code == common::errc::not_found);
    CHECK_FALSE(d.lookup("OTHER\\alice", "").has_value());
    auto carol = d.lookup("carol", "");
    REQUIRE(carol.has_value());
    CHECK(carol->result == AuthResult::account_disabled);
    CHECK(d.lookup("grace", "")->result == AuthResult::account_locked_out);
    CHECK(d.lookup("heidi", "")->result == AuthResult::account_locked_out);
    CHECK(d.lookup("erin", "")->result == AuthResult::must_change_credentials);
    CHECK(d.lookup("frank", "")->result == AuthResult::must_change_credentials);
    CHECK(d.lookup("ivan", "")->result == AuthResult::expired_credentials);
  }
}

TEST_CASE("ldap: max_groups caps a user's groups, nested ones included, in every group look-up slapd serves") {
  // alice is in six groups (two direct, four by nesting and the cycle); her tokenGroups also name
  // the primary group's SID (513). in_chain needs AD's matching rule, which slapd lacks.
  Slapd slapd;
  common::ManualClock clock(std::chrono::system_clock::now());
  struct Mode {
    const char* name;
    identity::GroupLookup lookup;
    const char* group_filter;
  };
  for (const Mode mode : {Mode{"member_of", identity::GroupLookup::member_of, "(objectClass=group)"},
                          Mode{"member", identity::GroupLookup::member, "(objectClass=groupOfNames)"},
                          Mode{"token_groups", identity::GroupLookup::token_groups, "(objectClass=group)"}}) {
    CAPTURE(mode.name);
    auto o = options({slapd.uri()});
    o.group_lookup = mode.lookup;
    o.group_filter = mode.group_filter;
    {
      LdapDirectory d(o, clock);  // the default cap (1000): all of them
      auto r = d.lookup("alice", "");
      REQUIRE(r.has_value());
      REQUIRE(r->identity);
      CHECK(r->identity->groups == kAliceGroups);
      CHECK(r->identity->group_sids.size() == (mode.lookup == identity::GroupLookup::token_groups ? 7 : 6));
    }
    o.max_groups = 3;
    LdapDirectory d(o, clock);
    auto logon = d.authenticate({"alice", "", "alice-pass"});
    REQUIRE(logon.has_value());
    CHECK(logon->result == AuthResult::ok);
    auto look = d.lookup("alice", "");
    REQUIRE(look.has_value());
    for (const auto& id : {logon->identity, look->identity}) {
      REQUIRE(id);
      CHECK(id->groups.size() == 3);
      CHECK(id->group_sids.size() == 3);
      for (const auto& g : id->groups) CHECK_MESSAGE(has(kAliceGroups, g), g);
    }
  }
}

TEST_CASE("ldap: StartTLS with the test CA; certificates are checked") {
  Slapd slapd({.tls = true});
  common::ManualClock clock(std::chrono::system_clock::now());
  auto o = options({slapd.uri()});
  o.start_tls = true;
  o.ca_file = slapd.ca_file();
  {
    LdapDirectory d(o, clock);
    CHECK(result_of(d, "alice", "alice-pass") == AuthResult::ok);
    CHECK(result_of(d, "alice", "wrong") == AuthResult::failed_credentials);
    CHECK(d.check().has_value());
  }
  {
    o.ca_file = slapd.other_ca_file();  // a CA that did not sign the server's certificate
    LdapDirectory d(o, clock);
    auto r = d.authenticate({"alice", "", "alice-pass"});
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == common::errc::unavailable);
    CHECK_FALSE(d.state().reachable);
  }
}

TEST_CASE("ldap: fails over to the next server when the first is down") {
  Slapd slapd;
  common::ManualClock clock(std::chrono::system_clock::now());
  const std::string dead = "ldap://127.0.0.1:" + std::to_string(itest::free_port()) + "/";
  LdapDirectory d(options({dead, slapd.uri()}), clock);
  CHECK(result_of(d, "alice", "alice-pass") == AuthResult::ok);
  CHECK(result_of(d, "bob", "wrong") == AuthResult::failed_credentials);
  CHECK(d.state().reachable);
  CHECK(d.state().server == slapd.uri());
}

TEST_CASE("ldap: outage mid-run: unavailable (never failed credentials), cached identities served, then restored") {
  Slapd slapd;
  common::ManualClock clock(std::chrono::system_clock::now());
  auto o = options({slapd.uri()});
  o.cache_ttl = std::chrono::seconds(300);
  o.reconnect_min = std::chrono::milliseconds(1000);
  o.reconnect_max = std::chrono::milliseconds(4000);
  LdapDirectory d(o, clock);
  CHECK(result_of(d, "alice", "alice-pass") == AuthResult::ok);
  REQUIRE(d.lookup("erin", "").has_value());
  CHECK(d.state().reachable);

  slapd.kill();
  // A user not seen before, and a wrong password: the directory cannot say, so unavailable.
  auto bob = d.authenticate({"bob", "", "bob-pass"});
  REQUIRE_FALSE(bob.has_value());
  CHECK(bob.error().code == common::errc::unavailable);
  CHECK_FALSE(d.state().reachable);
  auto wrong = d.authenticate({"alice", "", "wrong"});
  REQUIRE_FALSE(wrong.has_value());
  CHECK(wrong.error().code == common::errc::unavailable);
  // alice, with the password that worked, keeps getting in; erin's look-up is served cached.
  auto alice = d.authenticate({"alice", "", "alice-pass"});
  REQUIRE(alice.has_value());
  CHECK(alice->result == AuthResult::ok);
  CHECK(alice->identity->groups == kAliceGroups);
  auto erin = d.lookup("erin", "");
  REQUIRE(erin.has_value());
  CHECK(erin->result == AuthResult::must_change_credentials);
  // ... for the cache TTL, then no more.
  clock.advance(std::chrono::seconds(301));
  auto late = d.authenticate({"alice", "", "alice-pass"});
  REQUIRE_FALSE(late.has_value());
  CHECK(late.error().code == common::errc::unavailable);
  CHECK_FALSE(d.lookup("erin", "").has_value());

  // The server comes back: after the back-off the next call reconnects.
  slapd.start();
  clock.advance(std::chrono::seconds(5));
  CHECK(result_of(d, "bob", "bob-pass") == AuthResult::ok);
  CHECK(d.state().reachable);
  CHECK(result_of(d, "alice", "wrong") == AuthResult::failed_credentials);
  CHECK(d.state().failures >= 1);
}

namespace {

constexpr auto kPatience = 20s;  // safety net against hangs, not an assertion

// The size of the first BER element in `data` (an LDAP message: tag, length, contents), or 0
// while it has not all arrived.
std::size_t first_message_size(std::string_view data) {
  if (data.size() < 2) return 0;
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(data[i]); };
  std::size_t length = byte(1), header = 2;
  if (length & 0x80) {
    const std::size_t octets = length & 0x7f;
    if (octets > 4) return data.size();  // not from libldap: take it all as the message
    if (data.size() < header + octets) return 0;
    length = 0;
    for (std::size_t i = 0; i < octets; ++i) length = (length << 8) | byte(header + i);
    header += octets;
  }
  return data.size() >= header + length ? header + length : 0;
}

bool send_all(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

// A TCP proxy on a loopback port in front of slapd. A connection whose first LDAP message binds
// as the service account (a simple BindRequest carries its DN in clear: Slapd::kBindDn) is
// forwarded to slapd byte for byte, both ways; every other connection is held: accepted and read,
// never forwarded or answered. After forward_all(), every connection accepted is forwarded.
class HoldingProxy {
 public:
  explicit HoldingProxy(int upstream_port) : upstream_port_(upstream_port) {
    listen_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr = loopback(0);
    socklen_t len = sizeof addr;
    if (listen_ < 0 || ::bind(listen_, reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
        ::listen(listen_, SOMAXCONN) != 0 || ::getsockname(listen_, reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
        ::pipe2(wake_, O_CLOEXEC) != 0) {
      if (listen_ >= 0) ::close(listen_);
      throw std::runtime_error("proxy: listen failed");
    }
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { run(); });
  }
  ~HoldingProxy() {
    hang_up();
    ::close(wake_[0]);
    ::close(wake_[1]);
  }
  HoldingProxy(const HoldingProxy&) = delete;
  HoldingProxy& operator=(const HoldingProxy&) = delete;

  std::string uri() const { return "ldap://127.0.0.1:" + std::to_string(port_) + "/"; }

  // Connections accepted from now on are forwarded from the start (held ones stay held).
  void forward_all() {
    std::lock_guard lock(mutex_);
    forward_all_ = true;
  }
  // How many connections have been held so far.
  std::size_t held() {
    std::lock_guard lock(mutex_);
    return held_.size();
  }
  // Waits until a held connection has sent `text` (false: not within kPatience).
  bool wait_held_sent(const std::string& text) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, kPatience, [&] {
      return std::any_of(held_.begin(), held_.end(),
                         [&](const std::string& sent) { return sent.find(text) != std::string::npos; });
    });
  }
  // Closes every connection and the listening socket: a client waiting for an answer sees its
  // connection closed.
  void hang_up() {
    if (!thread_.joinable()) return;
    while (::write(wake_[1], "q", 1) < 0 && errno == EINTR) {}
    thread_.join();
  }

 private:
  struct Conn {
    int client = -1;
    int upstream = -1;                // >= 0: forwarded
    std::optional<std::size_t> held;  // index into held_: held
    std::string first;                // while neither: what the client sent so far
    bool open = true;
  };

  static sockaddr_in loopback(int port) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<std::uint16_t>(port));
    return addr;
  }

  bool connect_upstream(Conn& c) const {
    c.upstream = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const sockaddr_in addr = loopback(upstream_port_);
    return c.upstream >= 0 && ::connect(c.upstream, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0;
  }

  // Reads what the client sent and forwards, holds or decides; false once the connection ends.
  bool from_client(Conn& c) {
    char buf[4096];
    const ssize_t n = ::recv(c.client, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) return true;
    if (n <= 0) return false;
    const std::string_view data(buf, static_cast<std::size_t>(n));
    if (c.upstream >= 0) return send_all(c.upstream, data);
    if (c.held) {
      std::lock_guard lock(mutex_);
      held_[*c.held] += data;
      cv_.notify_all();
      return true;
    }
    c.first += data;
    const std::size_t size = first_message_size(c.first);
    if (size == 0) return true;
    if (std::string_view(c.first).substr(0, size).find(Slapd::kBindDn) != std::string_view::npos)
      return connect_upstream(c) && send_all(c.upstream, c.first);
    std::lock_guard lock(mutex_);
    c.held = held_.size();
    held_.push_back(std::move(c.first));
    cv_.notify_all();
    return true;
  }

  // Forwards what slapd sent to the client; false once the connection ends.
  static bool from_upstream(Conn& c) {
    char buf[4096];
    const ssize_t n = ::recv(c.upstream, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) return true;
    return n > 0 && send_all(c.client, std::string_view(buf, static_cast<std::size_t>(n)));
  }

  void run() {
    std::vector<Conn> conns;
    for (bool quit = false; !quit;) {
      std::vector<pollfd> fds{{wake_[0], POLLIN, 0}, {listen_, POLLIN, 0}};
      for (const Conn& c : conns) {
        fds.push_back({c.client, POLLIN, 0});
        fds.push_back({c.upstream, POLLIN, 0});  // -1 while not forwarded: poll skips it
      }
      if (::poll(fds.data(), fds.size(), -1) < 0) {
        if (errno == EINTR) continue;
        break;
      }
      quit = fds[0].revents != 0;
      for (std::size_t i = 0; i < conns.size(); ++i) {
        Conn& c = conns[i];
        if (fds[2 + 2 * i].revents != 0) c.open = from_client(c);
        if (c.open && fds[3 + 2 * i].revents != 0) c.open = from_upstream(c);
      }
      std::erase_if(conns, [](const Conn& c) {
        if (c.open) return false;
        ::close(c.client);
        if (c.upstream >= 0) ::close(c.upstream);
        return true;
      });
      if (fds[1].revents != 0) {
        if (const int fd = ::accept4(listen_, nullptr, nullptr, SOCK_CLOEXEC); fd >= 0) {
          Conn c;
          c.client = fd;
          bool forward;
          {
            std::lock_guard lock(mutex_);
            forward = forward_all_;
          }
          if (forward) c.open = connect_upstream(c);
          conns.push_back(std::move(c));
        }
      }
    }
    for (const Conn& c : conns) {
      ::close(c.client);
      if (c.upstream >= 0) ::close(c.upstream);
    }
    ::close(listen_);
  }

  const int upstream_port_;
  int port_ = 0;
  int listen_ = -1;
  int wake_[2] = {-1, -1};
  std::mutex mutex_;
  std::condition_variable cv_;
  bool forward_all_ = false;       // guarded by mutex_
  std::vector<std::string> held_;  // guarded by mutex_: what each held connection sent
  std::thread thread_;
};

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("ldap: operation_timeout on a user's own bind: no answer is errc::unavailable, not a credential answer") {
  Slapd slapd;
  HoldingProxy proxy(slapd.port());
  common::ManualClock clock(std::chrono::system_clock::now());
  auto o = options({proxy.uri()});
  o.pool_size = 1;
  o.operation_timeout = 1000ms;
  LdapDirectory d(o, clock);

  // The service account's connection (bind, then the search for alice) reaches slapd; alice's
  // bind, on a connection of its own, is never answered. Without a limit on that bind the call
  // would wait until the proxy hangs up (after kPatience, when the test has failed).
  auto call = std::async(std::launch::async, [&] { return d.authenticate({"alice", "", "alice-pass"}); });
  if (call.wait_for(kPatience) != std::future_status::ready) {
    proxy.hang_up();
    call.wait();
    FAIL("authenticate did not return while the user's bind went unanswered");
  }
  const auto r = call.get();
  REQUIRE_MESSAGE(!r.has_value(), "a credential answer to a bind that was never answered");
  CHECK(r.error().code == common::errc::unavailable);
  // The user's bind timed out (the service account's would say "service account bind: ", a
  // search would name no server).
  CHECK_MESSAGE(contains(r.error().message, proxy.uri() + ": Timed out"), r.error().message);
  CHECK(proxy.wait_held_sent("cn=alice,ou=People,dc=corp,dc=test"));  // the held connection was her bind
  CHECK(proxy.held() == 1);
  CHECK_FALSE(d.state().reachable);

  // Answered, the same password is right: it was the silence, not the password.
  proxy.forward_all();
  clock.advance(o.reconnect_max);  // past the back-off the timeout started
  CHECK(result_of(d, "alice", "alice-pass") == AuthResult::ok);
  CHECK(d.state().reachable);
  CHECK(proxy.held() == 1);
}
