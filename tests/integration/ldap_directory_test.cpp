// identity::LdapDirectory against a real slapd (tests/integration/slapd.hpp): credential
// outcomes, look-ups by SAM name, UPN and SID, nested groups with a cycle and their cap
// (max_groups), StartTLS with a test CA, failover to a second server, and an outage in the middle
// of a run. Time (caches, back-off) is driven with a ManualClock; every wait is for a state.
#include "identity/ldap_directory.hpp"

#include "tests/integration/slapd.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

using identity::AuthResult;
using identity::LdapDirectory;
using identity::LdapDirectoryOptions;
using itest::Slapd;

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
