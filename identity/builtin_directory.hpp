// identity/builtin_directory.hpp: the built-in directory: users and groups stored in the site
// database (common::model Kind::user and Kind::group), checked against the site settings
// (Kind::site: default_domain, lockout_threshold, lockout_window_seconds,
// lockout_duration_seconds, credential_cache_seconds), which are read at every call, so admin
// changes apply at once without a reload.
//
// Finding the user: by account name (case-insensitively) with an optional domain, which must
// equal the user's domain, or the site's default_domain for a user without one (both empty:
// the request must name no domain either); or by UPN (`alice@demo.test`), case-insensitively.
// Pass-through look-ups also accept the user's SID. The name as stored (and the UPN as stored)
// is found by its key; another spelling, and a SID, through the name index (see "Indexes").
//
// Credential checks, in this order:
//   1. unknown user: failed_credentials, after a password check against a fixed dummy hash, so
//      the answer takes as long as for a real user; unknown names are also "locked out" after
//      lockout_threshold failures, in memory, like real users (for lockout_duration_seconds, or
//      until restart when that is 0), so neither the answer nor its timing tells whether a user
//      exists (left: the storage write when a real user gets locked out);
//   2. locked out (locked_out set and locked_out_until empty or in the future), unless disabled:
//      account_locked_out, decided before the password is looked at, so a locked account cannot
//      be probed; such attempts neither count as failures nor extend the lock-out. An automatic
//      lock-out whose time has passed is cleared in storage here (audit action "unlock");
//   3. wrong password (or the user has no password hash, or an empty password was given):
//      failed_credentials, counted towards a lock-out;
//   4. disabled: account_disabled. Only reported after the right password: Windows does the
//      same, and answering account_disabled to any password would reveal that the user exists;
//   5. expired: expired_credentials; 6. must_change_password: must_change_credentials (both
//      with the identity);
//   7. ok, with the identity.
//
// Lock-out: lockout_threshold (0: never) failures within lockout_window_seconds set the user's
// locked_out and locked_out_until = now + lockout_duration_seconds (null for 0: until an admin
// clears locked_out), in one storage write with an audit entry (actor "broker", action
// "lock-out"). The failure counts live in memory only: they reset when the daemon restarts (a
// lock-out already written stays). A correct password (3 passed) resets the user's count.
//
// Success cache: a right password is remembered for credential_cache_seconds (0: off) as
// HMAC-SHA256(process-random key, user name, stored password_hash, password) -> expiry, in
// memory; the password itself is never kept. The user's row is read again at every call and
// steps 1-6 are applied to it, so a password change (new hash: no entry matches), a lock-out or
// a disable takes effect at once without any call into this class. A hit does not extend the
// entry's lifetime.
//
// Groups: every group whose members name the user (`alice`, `DEMO\alice`, the UPN or the SID),
// or name a group the user is in, transitively; cycles are harmless. A group's domain is its
// own, else the site's default_domain.
//
// Caches and indexes (docs/architecture.md "Enumeration"). What a call needs is kept in memory
// and read again only when it may have changed, which the repository tells by its per-kind
// change counts (storage::Repository::change_count; they move after a commit and before the
// write() that made it returns, so the next call after any change reads again):
//   - the site settings and the user rows found by each name form (with "no such user"), while
//     no user and no site change has committed; a lock-out or unlock written here is a user
//     change too. So lock-outs, disables, password and flag changes apply at the next call, as
//     if the row were read every time; a call that hits reads nothing;
//   - the group membership index (every group's members, domain and SID), while no group changed;
//   - the name index (every user's name, UPN and SID in lower case -> the stored name: other
//     spellings and SIDs without reading every user), while no user changed.
// A repository that does not count (change_count() nullopt) gets the old behaviour for rows and
// settings (read at every call), and the two indexes are read again when older than
// options.index_ttl (5 s; 0: at every call): group changes then reach identities within
// index_ttl, and a new user is found at once by the exact name or UPN, by another spelling
// within index_ttl. Writers in other processes sharing the database are not counted either.
// invalidate_indexes() drops everything. At most options.max_cached_users rows are kept (then
// the row cache starts again empty); a cached row keeps only the fields read here.
//
// Threading: thread-safe; every call blocks (storage; PBKDF2 outside any lock), except that
// authenticate_async() can hand the hash to a bounded pool (BuiltinDirectoryOptions::
// password_checks) and go on elsewhere. The in-memory state (failure counts, cache) is guarded
// by one mutex held only briefly.
#pragma once

#include "common/clock.hpp"
#include "common/crypto.hpp"
#include "identity/directory.hpp"
#include "identity/password_checks.hpp"
#include "storage/repository.hpp"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <optional>
#include <unordered_map>
#include <vector>

namespace identity {

namespace detail {
// The site settings one call works with.
struct SiteSettings {
  std::string default_domain;
  std::int64_t lockout_threshold = 0;
  std::int64_t lockout_window_seconds = 0;
  std::int64_t lockout_duration_seconds = 0;
  std::int64_t credential_cache_seconds = 0;
};
struct NameIndex;     // users by lower-case name, UPN and SID
struct GroupIndex;    // group membership
}  // namespace detail

struct BuiltinDirectoryOptions {
  // Iterations of the dummy hash checked for unknown users; match what `brokerd --hash-password`
  // writes so both paths take as long (tests lower it with their hashes).
  int dummy_hash_iterations = common::crypto::kDefaultPbkdf2Iterations;
  // The password check (tests count calls through it). Must be thread-safe.
  std::function<bool(std::string_view password, std::string_view encoded)> verify_password =
      &common::crypto::verify_password;
  // Bounds on what is tracked in memory for unknown users (failure times and their lock-outs),
  // in names and in bytes (approximate heap use, keys included). An unknown name is kept as a
  // fixed-size digest, never as sent, so a long name costs no more than a short one. When a new
  // failure would go beyond either bound, state that no longer matters is dropped, and if that
  // is not enough, all the unknown names' state. Known users are always tracked.
  std::size_t max_unknown_names = 10000;
  std::size_t max_unknown_bytes = 4 * 1024 * 1024;
  // authenticate_async(): where password hashes run (at most the pool's threads at once, a
  // bounded queue with a deadline; see password_checks.hpp). Null: on the calling thread.
  PasswordCheckPool* password_checks = nullptr;
  // How long the group membership and name indexes are used before they are read again (see
  // "Indexes" above). 0: read at every call that needs them.
  std::chrono::seconds index_ttl{5};
  // Most user look-ups (by name form, unknown names included) kept in the row cache.
  std::size_t max_cached_users = 100000;
  // authenticate_async(): where the check goes on after the hash (storage: a lock-out write, the
  // user's groups), e.g. the daemon's work queue. Returns false when it cannot take the task
  // (shutting down): the check then ends with errc::unavailable. Null: on the pool's thread.
  std::function<bool(std::function<void()>)> resume;
};

class BuiltinDirectory final : public Directory {
 public:
  // Keeps references to both; they must outlive this object.
  BuiltinDirectory(storage::Repository& repository, common::Clock& clock, BuiltinDirectoryOptions options = {});

  Result<AuthOutcome> authenticate(const Credentials& credentials) override;
  // With options.password_checks, the hash runs on that pool and the rest on options.resume;
  // errc::unavailable when the pool refuses the check (queue full, waited too long, stopping).
  // A check that needs no hash (a cached success, a locked-out account) answers on this thread.
  void authenticate_async(const Credentials& credentials, AuthCallback done) override;
  Result<AuthOutcome> lookup(std::string_view user_name, std::string_view domain) override;

  // Drops the cached successful checks of the user (account name as stored, case-insensitive;
  // a `DOMAIN\` prefix is ignored). Not needed for correctness (see the file comment); for an
  // admin who wants a user to type the password again at once.
  void forget(std::string_view user_name);

  // Drops the cached rows, settings and indexes: the next call reads what it needs.
  void invalidate_indexes();
  // Look-ups held in the row cache (tests, metrics).
  std::size_t cached_users() const;
  // How many times an index was read from storage (tests, metrics).
  std::uint64_t index_reads() const;

  // The number of cached successful checks (for tests and metrics).
  std::size_t cached_entries() const;
  // What is tracked for unknown names: entries and approximate bytes (tests, metrics).
  std::size_t unknown_entries() const;
  std::size_t unknown_bytes() const;

 private:
  using Settings = detail::SiteSettings;
  struct CacheEntry {
    std::string user_key;  // lower-case account name
    common::SysTime expires;
  };

  struct Attempt;  // one check between its look-up and its hash (builtin_directory.cpp)

  // Everything before the password hash: the outcome when no hash is needed (a storage error,
  // a locked-out account or name, a cached success), else nullopt with `attempt` ready.
  std::optional<Result<AuthOutcome>> prepare(const Credentials& credentials, Attempt& attempt);
  // The hash: true when the password matches the attempt's hash (always false for the dummy).
  bool verify(const Attempt& attempt) const;
  // Everything after the hash.
  Result<AuthOutcome> conclude(Attempt& attempt, bool matched);
  // Unknown names: locked out now? / count one more failure.
  bool unknown_locked(const std::string& key);
  void record_unknown_failure(const std::string& key, const Settings& settings);
  // Requires mutex_: makes room for an unknown name's entry (see max_unknown_*).
  void make_room_locked(common::SysTime now, const Settings& settings);
  Status record_failure(const storage::Object& user, const Settings& settings);
  void clear_failures(const std::string& key);
  // Clears an automatic lock-out that has run out (when it still is the one read).
  Status unlock(const storage::Object& user);
  Result<UserIdentity> resolve(const storage::Object& user, const Settings& settings);
  // The indexes, read when missing or older than options_.index_ttl. name_index() reads inside
  // the caller's transaction; group_index() in a read transaction of its own.
  bool fresh(common::SysTime read_at) const;
  // When an index was read: the change count then (nullopt: not counted) and the time.
  struct Stamp {
    std::optional<std::uint64_t> count;
    common::SysTime read_at{};
  };
  // Current: the count has not moved since; without counts, read within index_ttl.
  bool current(const Stamp& stamp, std::optional<std::uint64_t> count) const;
  // The site settings and the user a name designates (slimmed; nullopt: none), from the row
  // cache or one read transaction.
  struct Found {
    Settings settings;
    std::optional<storage::Object> user;
  };
  Result<Found> find(const AccountName& name, bool allow_sid);
  Result<std::shared_ptr<const detail::NameIndex>> name_index(storage::Transaction& tx);
  Result<std::shared_ptr<const detail::GroupIndex>> group_index();
  // An outcome that carries the identity.
  Result<AuthOutcome> with_identity(AuthResult result, const storage::Object& user, const Settings& settings);

  storage::Repository& repository_;
  common::Clock& clock_;
  BuiltinDirectoryOptions options_;
  const std::string dummy_hash_;  // hash of a random password nobody knows
  const std::string cache_key_;   // process-random HMAC key

  mutable std::mutex mutex_;
  // Recent failure times (oldest first) per lower-case account name, or, for unknown names,
  // "?" + the hex SHA-256 of "domain\name" in lower case.
  std::unordered_map<std::string, std::vector<common::SysTime>> failures_;  // guarded by mutex_
  // Lock-outs of unknown names: key as above -> end (SysTime::max(): until restart).
  std::unordered_map<std::string, common::SysTime> unknown_locks_;  // guarded by mutex_
  std::size_t unknown_bytes_ = 0;  // guarded by mutex_: estimated heap use of the unknown entries
  std::unordered_map<std::string, CacheEntry> cache_;               // guarded by mutex_; key: HMAC hex
  std::size_t next_sweep_ = 1024;                                   // guarded by mutex_

  mutable std::mutex index_mutex_;  // guards the indexes below (held only to copy or set a pointer)
  std::shared_ptr<const detail::NameIndex> names_;    // null: not read yet
  Stamp names_stamp_;
  std::shared_ptr<const detail::GroupIndex> groups_;  // null: not read yet
  Stamp groups_stamp_;
  // The row cache: key (name form) -> the user (nullopt: no such user), valid for these counts.
  std::unordered_map<std::string, std::optional<storage::Object>> rows_;
  std::optional<Settings> settings_;
  std::optional<std::uint64_t> rows_users_, rows_site_;
  std::uint64_t index_reads_ = 0;
};

}  // namespace identity
