// storage/sqlite/connection.hpp: a thin RAII layer over one sqlite3 connection: opening,
// executing SQL scripts, a cache of prepared statements, and SQLite errors turned into
// common::Error values. Private to storage/.
//
// Threading: a Connection is not thread-safe; the repository serialises every use behind its
// mutex.
#pragma once

#include "common/error.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>

struct sqlite3;
struct sqlite3_stmt;

namespace storage::sqlite {

class Connection;

// A prepared statement on loan from the connection's cache. Bind with 1-based indexes, step,
// read columns with 0-based indexes. Returning the loan (destruction) resets the statement and
// clears its bindings, so the next user starts clean. Must not outlive its Connection.
class Statement {
 public:
  Statement(Statement&& other) noexcept;
  Statement& operator=(Statement&&) = delete;
  Statement(const Statement&) = delete;
  ~Statement();

  // Bind a value; text is copied, so the argument need not outlive the call.
  void bind(int index, std::string_view text);
  void bind(int index, std::int64_t value);
  void bind_null(int index);

  // true: a row is available; false: done. storage_error (or conflict for a constraint
  // violation) on failure.
  common::Result<bool> step();
  // Steps until done, for statements without result rows.
  common::Status run();

  bool is_null(int column) const;
  std::int64_t column_int(int column) const;
  std::string column_text(int column) const;
  std::string column_blob(int column) const;

 private:
  friend class Connection;
  Statement(const Connection& connection, sqlite3_stmt* stmt, bool* on_loan);

  const Connection* connection_;
  sqlite3_stmt* stmt_;
  bool* on_loan_;  // the cache entry's flag; nullptr: not cached, finalised on release
};

class Connection {
 public:
  // Opens `path` with sqlite3_open_v2 flags (SQLITE_OPEN_*). The caller has already decided
  // whether creating the file is allowed. storage_error naming the path on failure.
  static common::Result<std::unique_ptr<Connection>> open(const std::string& path, int flags);

  ~Connection();  // finalises every statement and closes the handle
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Runs one or more SQL statements that return no rows we need (scripts, pragmas, BEGIN).
  common::Status exec(std::string_view sql);

  // A statement for `sql`, prepared once and cached by its text. If the cached statement is
  // already on loan (a nested use of the same SQL), or the cache is full (512 texts), a fresh
  // uncached one is prepared and finalised after use.
  // The text must come from descriptors or constants, never from values.
  common::Result<Statement> prepare(const std::string& sql);

  // Turns an SQLite result code into an Error: SQLITE_CONSTRAINT -> conflict, everything else
  // -> storage_error, with the path and the connection's error message.
  common::Error error(int rc, std::string_view what) const;

  bool read_only() const;
  std::int64_t last_insert_rowid() const;
  int changes() const;
  // Rows its statements have returned since it was opened (for the rows-read metric).
  std::uint64_t rows_returned() const { return rows_returned_; }
  const std::string& path() const { return path_; }
  sqlite3* handle() const { return db_; }

 private:
  Connection(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}

  struct CachedStatement {
    sqlite3_stmt* stmt = nullptr;
    bool on_loan = false;
  };

  sqlite3* db_;
  std::string path_;
  mutable std::uint64_t rows_returned_ = 0;  // used by the connection's holder only
  friend class Statement;
  // Node-based: entries keep their address, so a loan can hold a pointer to its flag.
  std::unordered_map<std::string, CachedStatement> cache_;
};

// Double-quoted SQL identifier. Identifiers come from the model descriptors, never from input.
std::string quote_identifier(std::string_view name);

}  // namespace storage::sqlite
