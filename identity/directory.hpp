// identity/directory.hpp: the identity seam. Who is asking (credential validation and trusted
// look-up) and which groups they are in, behind one interface so the built-in directory (users
// and groups in the database, builtin_directory.hpp) and the LDAP / Active Directory backend
// (ldap_directory.hpp) are interchangeable. Nothing here names storage, XML or sockets.
//
// Name forms (Windows conventions, compared case-insensitively; ASCII case folding only):
// - a user is named `user`, `DOMAIN\user` or `user@upn.suffix` (a UPN); a separate NT domain may
//   come with the request (NFuse `<Domain type="NT">`), used only for the bare `user` form;
// - the canonical form of a user is `DOMAIN\user` (UserIdentity::qualified_name), and of a group
//   `DOMAIN\Group` (UserIdentity::groups), with the stored spelling of both parts; an object with
//   no domain (and no site default domain) is just `user` / `Group`;
// - a principal in a rule (in_any) may be `DOMAIN\name`, a bare `name` (any domain), a UPN
//   (users only) or a SID (`S-1-...`, the user's or one of their groups').
//
// Threading: Directory calls block (storage, password hashing, network for LDAP): run them on a
// work queue, never on an I/O thread. Implementations are thread-safe.
#pragma once

#include "common/error.hpp"

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace identity {

using common::Result;
using common::Status;

// The outcome of a credential check, one per NFuse ErrorId of the credential family
// (failed-credentials, account-disabled, account-locked-out, must-change-credentials,
// expired-credentials); the XML service owns the mapping to those spellings.
enum class AuthResult {
  ok,
  failed_credentials,  // unknown user or wrong password: the two are never told apart
  account_disabled,
  account_locked_out,
  must_change_credentials,  // the password was right, but must be changed before use
  expired_credentials,      // the password was right, but has expired
};

// "ok", "failed_credentials", ...: the enumerator's name (for logs and metrics labels).
std::string_view to_string(AuthResult result);

struct Credentials {
  std::string user_name;  // as given: `user`, `DOMAIN\user` or `user@upn.suffix`
  std::string domain;     // optional NT domain; ignored when user_name carries one (or is a UPN)
  std::string password;   // plain text (the XML service has decoded ctx1); never logged or stored
};

// Who the user is. Every name list holds canonical forms (see the file comment).
struct UserIdentity {
  std::string user_name;       // account name as stored: "alice"
  std::string domain;          // "DEMO": the user's domain, else the site's default; may be empty
  std::string qualified_name;  // "DEMO\alice" (the SAM form); "alice" when there is no domain
  std::string upn;             // may be empty
  std::string sid;             // may be empty
  std::string display_name;    // may be empty
  std::string email;           // may be empty
  // Every group the user is in, directly or through nested groups: "DEMO\Domain Users",
  // "DEMO\Finance", ... sorted case-insensitively, no duplicates.
  std::vector<std::string> groups;
  std::vector<std::string> group_sids;  // SIDs of those groups that have one, in the same order
};

struct AuthOutcome {
  AuthResult result = AuthResult::failed_credentials;
  // Set for ok, must_change_credentials and expired_credentials (the user is known for sure);
  // empty for the other results.
  std::optional<UserIdentity> identity;
};

// The parts of a user name as given. `domain` is the prefix of `DOMAIN\user`, else the separate
// domain; for a UPN (`user@suffix` without a backslash) `upn` is true, `name` is the whole UPN
// and `domain` is empty.
struct AccountName {
  std::string name;
  std::string domain;
  bool upn = false;
};
AccountName parse_account_name(std::string_view user_name, std::string_view domain = {});

// ASCII case-insensitive equality (how the directory compares every name).
bool iequals(std::string_view a, std::string_view b);
// True for an `S-1-...` security identifier (case-insensitive prefix).
bool is_sid(std::string_view text);

// True when `principal` (a rule's entry: `DOMAIN\name`, `name`, a UPN or a SID) names the user or
// one of their groups. Case-insensitive; surrounding spaces are ignored. A qualified principal
// needs the domain to match; a bare one matches in any domain. Empty principals match nothing.
bool names_user(const UserIdentity& user, std::string_view principal);
bool names_any(const UserIdentity& user, const std::vector<std::string>& principals);

class Directory {
 public:
  virtual ~Directory() = default;

  // Checks a user name and password. Every rejection of the credentials themselves is a value
  // (AuthOutcome::result); an error is returned only when the backend fails (errc::storage_error,
  // errc::unavailable), never for an unknown user. May be slow (password hashing); blocking.
  virtual Result<AuthOutcome> authenticate(const Credentials& credentials) = 0;

  // authenticate(), for callers that must not wait for the password hash: `done` gets the same
  // outcome, exactly once, either before this returns or later on another thread (a backend with
  // bounded hashing runs the hash on a pool of its own; see BuiltinDirectoryOptions). Adds one
  // error: errc::unavailable when the backend refuses to check now (too many checks waiting, or
  // shutting down). `done` must not throw. The default calls authenticate() on this thread.
  using AuthCallback = std::function<void(Result<AuthOutcome>)>;
  virtual void authenticate_async(const Credentials& credentials, AuthCallback done) {
    done(authenticate(credentials));
  }

  // Trusted pass-through (the front end vouches for the user; no password): the user named
  // `user`, `DOMAIN\user`, a UPN or a SID. Outcomes as for authenticate except
  // failed_credentials: account_disabled, account_locked_out, expired_credentials and
  // must_change_credentials (the last two with the identity, so the caller may still decide to
  // let a smart-card user in). errc::not_found when no such user exists; backend failures as
  // for authenticate. Never counts towards a lock-out.
  virtual Result<AuthOutcome> lookup(std::string_view user_name, std::string_view domain) = 0;

  // True when the rule's principal list names the user or one of their (nested) groups. The
  // entitlement engine calls this for every rule; it must be cheap and must not block. The
  // default is names_any(); a backend may override it (e.g. to resolve foreign groups lazily).
  virtual bool in_any(const UserIdentity& user, const std::vector<std::string>& principals) const {
    return names_any(user, principals);
  }
};

}  // namespace identity
