// The LDAP backend's pure helpers. The directory itself is tested against a real slapd in
// tests/integration/ldap_test.cpp.
#include "identity/ldap_directory.hpp"

#include <doctest/doctest.h>

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
