#include "storage/sqlite/connection.hpp"

#include <sqlite3.h>

namespace storage::sqlite {

using common::errc;
using common::Error;

constexpr std::size_t kMaxCachedStatements = 512;

std::string quote_identifier(std::string_view name) {
  std::string out = "\"";
  for (char c : name) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + '"';
}

// --- Statement -------------------------------------------------------------------------------

Statement::Statement(const Connection& connection, sqlite3_stmt* stmt, bool* on_loan)
    : connection_(&connection), stmt_(stmt), on_loan_(on_loan) {}

Statement::Statement(Statement&& other) noexcept
    : connection_(other.connection_), stmt_(other.stmt_), on_loan_(other.on_loan_) {
  other.stmt_ = nullptr;
  other.on_loan_ = nullptr;
}

Statement::~Statement() {
  if (!stmt_) return;
  if (on_loan_) {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
    *on_loan_ = false;
  } else {
    sqlite3_finalize(stmt_);
  }
}

void Statement::bind(int index, std::string_view text) {
  sqlite3_bind_text64(stmt_, index, text.data(), text.size(), SQLITE_TRANSIENT, SQLITE_UTF8);
}
void Statement::bind(int index, std::int64_t value) { sqlite3_bind_int64(stmt_, index, value); }
void Statement::bind_null(int index) { sqlite3_bind_null(stmt_, index); }

common::Result<bool> Statement::step() {
  const int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) {
    ++connection_->rows_returned_;
    return true;
  }
  if (rc == SQLITE_DONE) return false;
  return connection_->error(rc, "statement failed");
}

common::Status Statement::run() {
  for (;;) {
    auto r = step();
    if (!r) return r.error();
    if (!*r) return {};
  }
}

bool Statement::is_null(int column) const { return sqlite3_column_type(stmt_, column) == SQLITE_NULL; }
std::int64_t Statement::column_int(int column) const { return sqlite3_column_int64(stmt_, column); }
std::string Statement::column_text(int column) const {
  const auto* p = sqlite3_column_text(stmt_, column);
  const int n = sqlite3_column_bytes(stmt_, column);
  return p ? std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n)) : std::string{};
}
std::string Statement::column_blob(int column) const {
  const auto* p = sqlite3_column_blob(stmt_, column);
  const int n = sqlite3_column_bytes(stmt_, column);
  return p ? std::string(static_cast<const char*>(p), static_cast<std::size_t>(n)) : std::string{};
}

// --- Connection ------------------------------------------------------------------------------

common::Result<std::unique_ptr<Connection>> Connection::open(const std::string& path, int flags) {
  sqlite3* db = nullptr;
  const int rc = sqlite3_open_v2(path.c_str(), &db, flags, nullptr);
  if (rc != SQLITE_OK) {
    std::string msg = "cannot open database " + path + ": " + (db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
    sqlite3_close_v2(db);
    return Error(errc::storage_error, std::move(msg));
  }
  sqlite3_extended_result_codes(db, 1);
  return std::unique_ptr<Connection>(new Connection(db, path));
}

Connection::~Connection() {
  for (auto& [sql, entry] : cache_) sqlite3_finalize(entry.stmt);
  cache_.clear();
  sqlite3_close_v2(db_);
}

common::Status Connection::exec(std::string_view sql) {
  const std::string text(sql);
  const int rc = sqlite3_exec(db_, text.c_str(), nullptr, nullptr, nullptr);
  if (rc != SQLITE_OK) return error(rc, "statement failed");
  return {};
}

common::Result<Statement> Connection::prepare(const std::string& sql) {
  auto it = cache_.find(sql);
  if (it != cache_.end() && !it->second.on_loan) {
    it->second.on_loan = true;
    return Statement(*this, it->second.stmt, &it->second.on_loan);
  }
  // Filters make the set of SQL texts open-ended; past the cap, statements are not cached.
  const bool cache = it == cache_.end() && cache_.size() < kMaxCachedStatements;
  sqlite3_stmt* stmt = nullptr;
  const int rc = sqlite3_prepare_v3(db_, sql.c_str(), static_cast<int>(sql.size()),
                                    cache ? SQLITE_PREPARE_PERSISTENT : 0, &stmt, nullptr);
  if (rc != SQLITE_OK) return error(rc, "cannot prepare statement");
  if (!cache) return Statement(*this, stmt, nullptr);
  auto& entry = cache_[sql];
  entry.stmt = stmt;
  entry.on_loan = true;
  return Statement(*this, stmt, &entry.on_loan);
}

common::Error Connection::error(int rc, std::string_view what) const {
  const int primary = rc & 0xff;
  const std::string detail = sqlite3_errmsg(db_);
  switch (primary) {
    case SQLITE_CONSTRAINT: return Error(errc::conflict, "constraint violated: " + detail);
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return Error(errc::storage_error,
                   "database " + path_ + " is locked by another connection (busy timeout expired): " + detail);
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return Error(errc::storage_error, "database " + path_ + " is corrupt or not a SQLite database: " + detail);
    case SQLITE_FULL: return Error(errc::storage_error, "database " + path_ + ": disk full: " + detail);
    case SQLITE_READONLY: return Error(errc::storage_error, "database " + path_ + " is read-only: " + detail);
    default: return Error(errc::storage_error, "database " + path_ + ": " + std::string(what) + ": " + detail);
  }
}

bool Connection::read_only() const { return sqlite3_db_readonly(db_, "main") == 1; }
std::int64_t Connection::last_insert_rowid() const { return sqlite3_last_insert_rowid(db_); }
int Connection::changes() const { return sqlite3_changes(db_); }

}  // namespace storage::sqlite
