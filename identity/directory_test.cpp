#include "identity/directory.hpp"

#include <doctest/doctest.h>

using namespace identity;

namespace {

UserIdentity alice() {
  UserIdentity u;
  u.user_name = "alice";
  u.domain = "DEMO";
  u.qualified_name = "DEMO\\alice";
  u.upn = "alice@demo.test";
  u.sid = "S-1-5-21-1-2-3-1001";
  u.groups = {"DEMO\\Domain Users", "DEMO\\Finance", "Local"};
  u.group_sids = {"S-1-5-21-1-2-3-513"};
  return u;
}

}  // namespace

TEST_CASE("account names split into domain, name and UPN") {
  auto a = parse_account_name("DEMO\\alice", "OTHER");
  CHECK(a.domain == "DEMO");
  CHECK(a.name == "alice");
  CHECK_FALSE(a.upn);

  auto b = parse_account_name("alice", "DEMO");
  CHECK(b.domain == "DEMO");
  CHECK(b.name == "alice");

  auto c = parse_account_name("alice@demo.test", "DEMO");
  CHECK(c.upn);
  CHECK(c.domain.empty());
  CHECK(c.name == "alice@demo.test");

  auto d = parse_account_name("alice");
  CHECK(d.domain.empty());
}

TEST_CASE("principals match the user and their groups, case-insensitively, qualified or bare") {
  const UserIdentity u = alice();
  CHECK(names_user(u, "alice"));
  CHECK(names_user(u, "ALICE"));
  CHECK(names_user(u, "DEMO\\alice"));
  CHECK(names_user(u, "demo\\Alice"));
  CHECK_FALSE(names_user(u, "OTHER\\alice"));
  CHECK(names_user(u, "Alice@Demo.Test"));
  CHECK_FALSE(names_user(u, "bob@demo.test"));
  CHECK(names_user(u, "s-1-5-21-1-2-3-1001"));
  CHECK(names_user(u, "S-1-5-21-1-2-3-513"));
  CHECK_FALSE(names_user(u, "S-1-5-21-1-2-3-999"));

  CHECK(names_user(u, "Finance"));
  CHECK(names_user(u, "finance"));
  CHECK(names_user(u, "DEMO\\Domain Users"));
  CHECK(names_user(u, "demo\\domain users"));
  CHECK(names_user(u, " Domain Users "));
  CHECK_FALSE(names_user(u, "OTHER\\Finance"));
  CHECK_FALSE(names_user(u, "Staff"));

  // A group without a domain matches only bare.
  CHECK(names_user(u, "local"));
  CHECK_FALSE(names_user(u, "DEMO\\Local"));

  CHECK_FALSE(names_user(u, ""));
  CHECK_FALSE(names_user(u, "  "));
  CHECK_FALSE(names_user(u, "\\"));

  CHECK(names_any(u, {"bob", "DEMO\\Finance"}));
  CHECK_FALSE(names_any(u, {"bob", "Staff"}));
  CHECK_FALSE(names_any(u, {}));
}

TEST_CASE("a user without a domain matches bare names only") {
  UserIdentity u;
  u.user_name = "carol";
  u.qualified_name = "carol";
  CHECK(names_user(u, "carol"));
  CHECK_FALSE(names_user(u, "DEMO\\carol"));
  CHECK_FALSE(names_user(u, "carol@demo.test"));  // no UPN
}

TEST_CASE("results have stable names") {
  CHECK(to_string(AuthResult::ok) == "ok");
  CHECK(to_string(AuthResult::failed_credentials) == "failed_credentials");
  CHECK(to_string(AuthResult::account_locked_out) == "account_locked_out");
  CHECK(iequals("Domain Users", "DOMAIN USERS"));
  CHECK_FALSE(iequals("a", "ab"));
  CHECK(is_sid("S-1-5-32-545"));
  CHECK_FALSE(is_sid("S-1-"));
  CHECK_FALSE(is_sid("Staff"));
}
