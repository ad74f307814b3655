// storage/sqlite/transaction.hpp: storage::Transaction over one SQLite connection: generic
// CRUD over the site-model descriptors (common/model.hpp) and the audit log. The SQL text is
// built once per kind from the descriptors (identifiers only); every value is a bound parameter.
//
// Storage form of an Object (see docs/storage.md):
// - every field of the kind is stored; a field missing from Object::fields is stored as its
//   descriptor default; a null list is stored as an empty list;
// - an empty reference ("") is stored as NULL and read back as null;
// - objects read back carry every field of their kind (null scalars as std::monostate, lists as
//   TextList, possibly empty).
//
// The repository begins and ends the SQL transaction; this object only runs statements inside it
// and refuses use after the repository's write()/read() has returned.
#pragma once

#include "storage/repository.hpp"

namespace storage::sqlite {

class Connection;

class SqliteTransaction final : public Transaction {
 public:
  // `writable`: false for read(): the write methods then fail with errc::internal.
  SqliteTransaction(Connection& db, bool writable) : db_(db), writable_(writable) {}

  // Called by the repository when the SQL transaction ends; later calls fail with errc::internal.
  void finish() { active_ = false; }
  // Records every create, update and remove that succeeds into `changes` (null: none).
  void record_changes(std::vector<Change>* changes) { changes_ = changes; }

  Result<std::vector<Object>> list(Kind kind, const Query& query) override;
  Result<std::int64_t> count(Kind kind, const Query& query) override;
  Result<Object> get(Kind kind, std::string_view name) override;
  // Also: errc::invalid_argument ("field: ...") for a field not of the kind, a value of the wrong
  // type, or an empty name for a kind that is not auto-named.
  Result<Object> create(const Object& obj) override;
  // An empty obj.name keeps the current name. created_at is kept, updated_at set to now.
  Result<Object> update(std::string_view name, const Object& obj) override;
  // errc::conflict: "<kind> '<name>' is still used by <kind> '<name>'" (the first referrer by id).
  Status remove(Kind kind, std::string_view name) override;
  Result<Object> set_fields(Kind kind, std::string_view name, const common::model::Fields& fields) override;
  Result<std::optional<Object>> create_guarded(const Object& obj, Kind guard_kind, const Query& guard,
                                               std::int64_t below) override;

  Status put_logon_ticket(const LogonTicket& ticket) override;
  Result<LogonTicket> redeem_logon_ticket(std::string_view ticket_hash, std::string_view machine,
                                          std::string_view now) override;
  Result<std::int64_t> purge_logon_tickets(std::string_view now) override;
  Status remove_logon_ticket(std::string_view ticket_hash) override;

  // An empty entry.time is set to now; entry.id is ignored (assigned by the database).
  Status append_audit(const AuditEntry& entry) override;
  // Newest first.
  Result<std::vector<AuditEntry>> list_audit(const AuditQuery& query) override;

 private:
  Status usable(bool write) const;

  Connection& db_;
  bool writable_;
  bool active_ = true;
  std::vector<Change>* changes_ = nullptr;
};

}  // namespace storage::sqlite
