// storage/repository.hpp: the storage seam. The engine and the admin layer see only this
// interface; storage/sqlite/ implements it (a PostgreSQL implementation can slot in later).
//
// Threading: every call blocks on disk I/O, so call it off the I/O threads (the engine's work
// queue). Implementations are thread-safe: transactions are serialised, and concurrent write()
// calls are committed together (group commit; docs/architecture.md, "Durability and group
// commit").
#pragma once

#include "common/error.hpp"
#include "common/model.hpp"

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace common {
class Metrics;
}

namespace storage {

using common::Result;
using common::Status;
using common::model::Kind;
using common::model::Object;

// A list query: equality filters on the kind's scalar fields (and "name", "owner"), a list
// filter matches when the list contains the value; results ordered by id.
struct Query {
  std::vector<std::pair<std::string, std::string>> equals;  // field -> value in text form ("true", "42")
  std::int64_t offset = 0;
  std::int64_t limit = -1;  // -1: all
  std::vector<std::pair<std::string, std::string>> not_equals;  // scalar fields only; NULL counts as different
};

struct AuditEntry {
  std::int64_t id = 0;
  std::string time;    // common::format_time; filled by storage when empty
  std::string actor;   // "token:<name>", "config:<file>", "broker"
  std::string action;  // "create", "update", "delete", "reconcile", ...
  std::string kind;    // KindSpec::name
  std::string object;  // object name
  std::string before;  // JSON text of the object before (secrets omitted), "" if none
  std::string after;   // JSON text after, "" if none
};

// A one-time logon ticket (docs/storage.md, docs/cbp.md "Ticket redemption"). The ticket text
// itself is never stored: only its SHA-256. credential_data is opaque to storage (the engine
// encrypts it with the site key before storing it).
struct LogonTicket {
  std::string ticket_hash;  // lower-case hex SHA-256 of the ticket
  std::string machine;      // the only machine that may redeem it
  std::string user_name;
  std::string credential_type;  // password | smartcard | assertion | <plugin name>
  std::string credential_data;
  std::string created_at;  // filled by storage when empty
  std::string expires_at;  // common::format_time; required
};

struct AuditQuery {
  std::string kind, object, actor;  // empty: any
  std::int64_t offset = 0;
  std::int64_t limit = 100;
};

// One transaction. Every method fails with errc::storage_error on database failure.
class Transaction {
 public:
  virtual ~Transaction() = default;

  virtual Result<std::vector<Object>> list(Kind kind, const Query& query) = 0;
  virtual Result<std::int64_t> count(Kind kind, const Query& query) = 0;  // ignores offset/limit
  // errc::not_found when absent.
  virtual Result<Object> get(Kind kind, std::string_view name) = 0;
  // Inserts; assigns id, created_at, updated_at (and the name for auto-named kinds).
  // errc::conflict for a duplicate name, errc::invalid_argument ("field: ...") for a reference to
  // a missing object.
  virtual Result<Object> create(const Object& obj) = 0;
  // Replaces the object named `name` (obj.name may differ: a rename, which cascades to the objects
  // that reference it). errc::not_found, errc::conflict as for create.
  virtual Result<Object> update(std::string_view name, const Object& obj) = 0;
  // errc::not_found; errc::conflict ("... still referenced by machine X") when referenced.
  virtual Status remove(Kind kind, std::string_view name) = 0;
  // Sets only the given scalar fields of the object named `name` (one UPDATE of those columns and
  // updated_at) and returns the object as stored. errc::not_found; errc::invalid_argument for a
  // field not of the kind, a list field, or a value of the wrong type. References are not
  // checked: do not set reference fields with it.
  virtual Result<Object> set_fields(Kind kind, std::string_view name, const common::model::Fields& fields) = 0;
  // A claim: creates `obj` only when fewer than `below` objects of `guard_kind` match `guard`,
  // counted in this write transaction (which holds the database's write lock, so no other writer,
  // in this process or another sharing the file, comes between the count and the insert).
  // Returns nullopt, having written nothing, when the guard refuses; errors as for create.
  virtual Result<std::optional<Object>> create_guarded(const Object& obj, Kind guard_kind, const Query& guard,
                                                       std::int64_t below) = 0;

  // Stores a new ticket. errc::conflict for a duplicate hash, errc::invalid_argument for a
  // missing machine (or expires_at).
  virtual Status put_logon_ticket(const LogonTicket& ticket) = 0;
  // Redeems a ticket once: when a ticket with that hash exists, was issued for `machine`, has
  // not expired at `now` (common::format_time text) and was not redeemed before, it is returned
  // and marked redeemed (its credential data is wiped; the row stays until it expires, so a
  // second redemption is told apart). Otherwise errc::not_found with the reason in the message
  // ("unknown ticket", "issued for another machine", "expired", "already redeemed"); a ticket
  // presented by the wrong machine is left in place, an expired one is deleted (callers commit
  // the transaction even on not_found, or the deletion is rolled back with it).
  virtual Result<LogonTicket> redeem_logon_ticket(std::string_view ticket_hash, std::string_view machine,
                                                  std::string_view now) = 0;
  // Deletes every ticket expired at `now`; returns how many.
  virtual Result<std::int64_t> purge_logon_tickets(std::string_view now) = 0;
  // Deletes the ticket with that hash (a launch that gave up on its machine); no error when there
  // is none.
  virtual Status remove_logon_ticket(std::string_view ticket_hash) = 0;

  virtual Status append_audit(const AuditEntry& entry) = 0;
  virtual Result<std::vector<AuditEntry>> list_audit(const AuditQuery& query) = 0;
};

// One committed change to a site object, as the commit observer sees it.
struct Change {
  Kind kind;
  std::string name;                     // the object's name after the change (removed: its name)
  std::string old_name;                 // a rename: the name before; else empty
  std::optional<common::model::Object> object;  // the object as stored; nullopt: removed
};
// Called with the changes of each committed transaction (every write() function of a commit
// batch that succeeded, in the order they ran), after COMMIT and before those write() calls
// return. It runs on a thread that holds the database: it must not call the repository, and it
// should only update memory. A rename's cascade to referencing columns (ON UPDATE CASCADE) is
// not listed as changes of the referencing objects.
using CommitObserver = std::function<void(const std::vector<Change>&)>;

struct SchemaInfo {
  int version = 0;          // schema version of the open database
  int supported = 0;        // newest version this build knows
  std::string path;
};

class Repository {
 public:
  virtual ~Repository() = default;

  // Runs fn as one atomic, isolated write: its changes are committed when fn returns success,
  // rolled back when it returns an error (which is returned) or throws (rethrown in the caller's
  // thread). Success means durable: the commit reached the disk (survives a power loss).
  // Group commit: fn may run in one SQL transaction (BEGIN IMMEDIATE ... COMMIT) with the
  // functions of other concurrent write() calls, each in its own savepoint, so:
  // - fn may run on another thread than the caller's (no thread-local state; do not take a lock
  //   inside fn that another thread may hold while it calls write());
  // - fn sees the changes of the functions run before it in the same batch; a failing neighbour
  //   does not roll fn back, but a failed COMMIT (or a database error that aborts the whole
  //   transaction) fails every function of the batch that had succeeded, so in-memory effects
  //   made inside fn must be undone when write() returns an error;
  // - holding a mutex of one's own across write() serialises the callers and prevents batching.
  // Calling the repository from inside fn fails with errc::internal; errc::unavailable once
  // close() has been called (also for calls queued when it was called).
  virtual Status write(const std::function<Status(Transaction&)>& fn) = 0;
  // Runs fn inside a read transaction (a consistent snapshot), on the caller's thread. Reads and
  // write batches take turns in arrival order, so neither starves the other.
  virtual Status read(const std::function<Status(Transaction&)>& fn) = 0;

  // A cheap liveness probe for /readyz.
  virtual Status ping() = 0;
  // Sets (or with nullptr clears) the observer of committed changes (CommitObserver). Set it
  // before concurrent use; it replaces any earlier one.
  virtual void set_commit_observer(CommitObserver observer) = 0;
  // How many changes to objects of `kind` (creates, updates, renames, removals) have committed
  // through this repository since it was opened. Counted after COMMIT and before the write()
  // calls that made them return, so a reader that reads the count, then the objects, and later
  // finds the count unchanged knows that no write through this repository changed such objects
  // since (writers in other processes sharing the database are not counted). nullopt: this
  // implementation does not count (callers must not cache on it).
  virtual std::optional<std::uint64_t> change_count(Kind kind) const {
    (void)kind;
    return std::nullopt;
  }
  virtual SchemaInfo schema() const = 0;
  // Waits for the transaction in progress, checkpoints the WAL and closes; calls still waiting
  // (queued write()s included) and later calls fail with errc::unavailable.
  virtual void close() = 0;
};

struct SqliteOptions {
  std::string path;                 // ":memory:" for tests
  int busy_timeout_ms = 5000;
  // A database file this call creates is made mode 0600 whatever the umask (SQLite gives its WAL
  // and shared-memory files the same mode); with file_group (a system group name), 0640 and that
  // group. An existing file keeps its mode. errc::invalid_argument for an unknown group.
  std::string file_group;
  // optional: broker_storage_commit_seconds histogram, broker_storage_commit_batches_total and
  // broker_storage_commit_batch_writes_total counters (group-commit batch sizes)
  common::Metrics* metrics = nullptr;
};

// Opens (creating if absent) and migrates the database. Fails with errc::incompatible for a
// database written by a newer version, errc::storage_error for an unreadable or corrupt file
// (the file is never replaced or modified in that case).
Result<std::unique_ptr<Repository>> open_sqlite(const SqliteOptions& options);

// Newest schema version this build writes.
int current_schema_version();

}  // namespace storage
