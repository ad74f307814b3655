// identity/ldap_directory.hpp: the LDAP / Active Directory backend of identity::Directory, on
// the OpenLDAP client library (libldap). docs/directory.md is the admin's view of it.
//
// Finding a user (authenticate and lookup): one subtree search under base_dn, bound as the
// service account, with `(&<user_filter>(<attr>=<value>))` where attr is the account name
// attribute (`DOMAIN\user` or a bare `user`: the domain must be empty or equal `domain`), the UPN
// attribute (`user@suffix`) or, for lookup only, the SID attribute (`S-1-...`, matched as the
// binary SID). Values are escaped (RFC 4515). No match, or more than one: no such user.
//
// authenticate, in this order (the same outcomes and order as the built-in directory):
//   1. unknown user: failed_credentials, after a bind to a DN that does not exist with the given
//      password (the same round trips as for a known user); an empty password never binds (a
//      simple bind with an empty password is an unauthenticated bind that succeeds);
//   2. locked out by the attributes (AD lockoutTime set and within lockout_duration, or 0 = until
//      an admin unlocks; ppolicy pwdAccountLockedTime present): account_locked_out, without a bind;
//   3. a simple bind as the user's DN with the password, on a connection of its own (StartTLS or
//      ldaps as configured), with the password policy request control. A refused bind is
//      failed_credentials, unless the server says why: AD's "data NNN" in the diagnostic message
//      (775 locked out, 533 disabled, 532 password expired, 701 account expired, 773 must change)
//      or a ppolicy response control (accountLocked, passwordExpired, changeAfterReset);
//   4. disabled (userAccountControl & 0x2): account_disabled;
//   5. expired (accountExpires in the past, userAccountControl & 0x800000): expired_credentials;
//   6. must change (pwdLastSet = 0, ppolicy pwdReset TRUE or changeAfterReset): must_change;
//   7. ok. 4-6 carry the identity as for the built-in directory.
// lookup applies 2, 4, 5 and 6 to the entry (without a bind, so a password that has expired by
// a policy only the server knows, ppolicy pwdMaxAge, is not seen).
//
// Groups: every group the user is in, nested groups included, with a bound on the number of
// groups (max_groups). GroupLookup::member_of reads the user's memberOf values and then each
// group's memberOf (AD, and OpenLDAP with the memberof overlay); GroupLookup::member searches
// `(&<group_filter>(<member>=<dn>))` level by level (OpenLDAP without the overlay); both skip
// groups already seen, so cycles end. Active Directory only: GroupLookup::in_chain is one subtree
// search `(&<group_filter>(<member>:1.2.840.113556.1.4.1941:=<dn>))` (LDAP_MATCHING_RULE_IN_CHAIN:
// the server walks the nesting); GroupLookup::token_groups reads the user entry's constructed
// `tokenGroups` (a base-scope read: the binary SIDs of every group in the user's token, nested,
// primary group included), then resolves the SIDs not yet cached with searches
// `(&<group_filter>(|(<sid>=\01\05...)...))` (at most ldap_detail::kSidsPerSearch each); a SID no group
// under base_dn has (another domain's group, a SID-history value) is kept as a SID without a
// name, after the named groups' SIDs in group_sids. A group's canonical name is
// `DOMAIN\<group_name attribute>`, its SID the decoded objectSid (S-1-5-21-...). What is known of
// each group (name, SID, parents) and each user's group list is cached for cache_ttl.
//
// Caching and outage: a looked-up identity (entry state and groups) is reused for cache_ttl;
// a right password is remembered (HMAC with a process-random key, never the password) for
// credential_cache_seconds(), without asking the server again. When the server cannot be
// reached, a user whose same password succeeded within cache_ttl and whose identity is cached
// keeps being let in (log line "directory unreachable: serving cached identity"); everything
// else is errc::unavailable (the XML service answers service-unavailable, never
// failed-credentials).
//
// Connections: pool_size connections bound as the service account, made on first need; a
// connection that fails (server down, timeout) is dropped and made again, trying `servers` in
// order (failover). When every server fails, new attempts wait a back-off (reconnect_min,
// doubling to reconnect_max); calls meanwhile fail at once with errc::unavailable. Every
// operation has network_timeout (connect) and operation_timeout (each request) limits.
//
// Threading: thread-safe; every call blocks on the network (run it on a work queue, never on an
// I/O thread). A call holds one pool connection at a time (waits up to operation_timeout for one).
#pragma once

#include "common/clock.hpp"
#include "common/metrics.hpp"
#include "identity/directory.hpp"

#include <spdlog/fwd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace identity {

// The attribute names read (the defaults are Active Directory's; see ldap_profile()).
struct LdapAttributes {
  std::string account_name = "sAMAccountName";
  std::string upn = "userPrincipalName";
  std::string sid = "objectSid";  // binary SID; empty: no SIDs
  std::string member_of = "memberOf";
  std::string member = "member";
  std::string group_name = "sAMAccountName";  // a group's name in DOMAIN\Group
  std::string display_name = "displayName";
  std::string mail = "mail";
  std::string user_account_control = "userAccountControl";  // empty: not read (and so for the rest)
  std::string pwd_last_set = "pwdLastSet";
  std::string account_expires = "accountExpires";
  std::string lockout_time = "lockoutTime";
  std::string token_groups = "tokenGroups";  // AD's constructed attribute (GroupLookup::token_groups)
};

// How a user's nested groups are found (see the file comment); in_chain and token_groups are
// Active Directory's.
enum class GroupLookup { member_of, member, in_chain, token_groups };

// "member_of", "member", "in_chain", "token_groups" (the config file's spellings); nullopt else.
std::optional<GroupLookup> group_lookup_from_string(std::string_view text);

struct LdapDirectoryOptions {
  // URIs tried in order: ldap://host:port (StartTLS when start_tls) or ldaps://host:port.
  std::vector<std::string> servers;
  bool start_tls = true;
  std::string ca_file;              // empty: the system's trust store
  bool verify_certificates = true;  // false: no check of the server's certificate (tests only)
  std::string bind_dn;              // the service account
  std::string bind_password;
  std::string base_dn;
  std::string domain;  // NetBIOS domain of every user and group: "CORP"
  std::string user_filter = "(&(objectCategory=person)(objectClass=user))";
  std::string group_filter = "(objectClass=group)";
  LdapAttributes attributes;
  GroupLookup group_lookup = GroupLookup::member_of;
  std::chrono::milliseconds network_timeout{5000};
  std::chrono::milliseconds operation_timeout{10000};
  std::size_t pool_size = 4;
  std::chrono::seconds cache_ttl{300};
  // How long an AD lockoutTime locks the account (the domain's lockoutDuration); 0: until an
  // admin clears lockoutTime.
  std::chrono::seconds lockout_duration{1800};
  std::chrono::milliseconds reconnect_min{1000};
  std::chrono::milliseconds reconnect_max{30000};
  std::size_t max_groups = 1000;    // per user, nested ones included
  std::size_t max_cached = 100000;  // identities and credential entries kept (then cleared)
  // The site's credential_cache_seconds, read at each authenticate; null: 60.
  std::function<std::int64_t()> credential_cache_seconds;
  // Where the directory logs (reachability changes, logons served from the cache); null: nowhere.
  std::shared_ptr<spdlog::logger> log;
  // Optional: broker_directory_up (gauge, 1/0), broker_directory_connection_failures_total,
  // broker_directory_cached_logons_total (logons let in from the cache while unreachable).
  common::Metrics* metrics = nullptr;
};

// Options with the attribute names, filters and group look-up of a profile: "ad" (the
// defaults above) or "openldap" (uid, mail, cn as group name, groupOfNames with member, and
// memberOf from the overlay; no AD state attributes, entryUUID-less: no SIDs unless configured).
// nullopt for an unknown profile.
std::optional<LdapDirectoryOptions> ldap_profile(std::string_view profile);

// The directory's connection state (admin API, /readyz, metrics).
struct LdapState {
  bool reachable = true;       // false after the last attempt to reach any server failed
  std::string server;          // the URI last connected to (empty before the first)
  std::string last_error;      // the last connection failure, empty when none yet
  common::SysTime since{};     // when `reachable` last changed
  std::uint64_t failures = 0;  // connection failures so far
  std::size_t cached_identities = 0;
};

class LdapDirectory final : public Directory {
 public:
  // Connects lazily (the first call). `clock` (and options.metrics) must outlive this object.
  LdapDirectory(LdapDirectoryOptions options, common::Clock& clock);
  ~LdapDirectory() override;
  LdapDirectory(const LdapDirectory&) = delete;
  LdapDirectory& operator=(const LdapDirectory&) = delete;

  Result<AuthOutcome> authenticate(const Credentials& credentials) override;
  Result<AuthOutcome> lookup(std::string_view user_name, std::string_view domain) override;

  // Checks the service account can connect and bind (start-up check and `directory test`).
  Status check();
  LdapState state() const;
  // Drops every cached identity, group and credential entry.
  void invalidate();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

namespace ldap_detail {
// The textual form of a binary SID ("S-1-5-21-1-2-3-1104"); empty when malformed.
std::string sid_to_string(std::string_view binary);
// The binary form of a textual SID; nullopt when malformed.
std::optional<std::string> sid_from_string(std::string_view text);
// RFC 4515 escaping of a value in a filter (every byte outside printable ASCII, and * ( ) \ NUL).
std::string escape_filter_value(std::string_view value);
// AD's reason code in a bind's diagnostic message ("... data 775, v2580"): 0x775, or 0 when none.
unsigned ad_bind_reason(std::string_view diagnostic);
// A Windows FILETIME (100 ns since 1601) as a time point.
common::SysTime from_filetime(std::int64_t filetime);
// The `CN=Finance,OU=...` DN's first RDN value ("Finance"); the whole DN when it has none.
std::string first_rdn_value(std::string_view dn);
// Every byte as a filter escape ("\01\05\00..."): a binary value (a SID) in a filter.
std::string escape_binary_filter_value(std::string_view bytes);
// GroupLookup::in_chain's filter: `(&<group_filter>(<member_attr>:1.2.840.113556.1.4.1941:=<dn>))`,
// the DN escaped (RFC 4515).
std::string in_chain_filter(std::string_view group_filter, std::string_view member_attr, std::string_view user_dn);
// GroupLookup::token_groups' resolving filter: `(&<group_filter>(|(<sid_attr>=<escaped SID>)...))`
// for binary SIDs (at least one).
std::string sids_filter(std::string_view group_filter, std::string_view sid_attr,
                        const std::vector<std::string>& binary_sids);
// How many SIDs one resolving search names at most (filters stay well under servers' limits).
inline constexpr std::size_t kSidsPerSearch = 100;
}  // namespace ldap_detail

}  // namespace identity
