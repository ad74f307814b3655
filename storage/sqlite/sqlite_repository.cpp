// storage/sqlite/sqlite_repository.cpp: storage::open_sqlite(): opening and checking the file,
// connection settings, migrations, and the transaction wrapper (one connection behind a mutex).
#include "common/metrics.hpp"
#include "storage/repository.hpp"
#include "storage/sqlite/connection.hpp"
#include "storage/sqlite/schema.hpp"
#include "storage/sqlite/transaction.hpp"

#include <sqlite3.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <thread>

namespace storage {
namespace {

using common::errc;
using common::Error;
using sqlite::Connection;

constexpr std::string_view kMemory = ":memory:";
constexpr std::string_view kCommitMetric = "broker_storage_commit_seconds";

class SqliteRepository final : public Repository {
 public:
  SqliteRepository(std::unique_ptr<Connection> db, SchemaInfo info, common::Metrics* metrics)
      : db_(std::move(db)), info_(std::move(info)), metrics_(metrics) {}
  ~SqliteRepository() override { close(); }

  Status write(const std::function<Status(Transaction&)>& fn) override { return run(fn, true); }
  Status read(const std::function<Status(Transaction&)>& fn) override { return run(fn, false); }

  Status ping() override {
    if (inside()) return nested();
    std::lock_guard lock(mutex_);
    if (!db_) return closed();
    auto st = db_->prepare("SELECT 1");
    if (!st) return st.error();
    auto row = st->step();
    if (!row) return row.error();
    return {};
  }

  SchemaInfo schema() const override { return info_; }

  // A no-op when already closed, and when called from inside write()/read() (it would deadlock).
  void close() override {
    if (inside()) return;
    std::lock_guard lock(mutex_);
    if (!db_) return;
    (void)db_->exec("PRAGMA wal_checkpoint(TRUNCATE)");
    db_.reset();
  }

 private:
  // Marks the calling thread as the one inside a transaction, for the nesting check.
  class Inside {
   public:
    explicit Inside(std::atomic<std::thread::id>& owner) : owner_(owner) { owner_ = std::this_thread::get_id(); }
    ~Inside() { owner_ = std::thread::id{}; }
    Inside(const Inside&) = delete;
    Inside& operator=(const Inside&) = delete;

   private:
    std::atomic<std::thread::id>& owner_;
  };

  bool inside() const { return owner_.load() == std::this_thread::get_id(); }
  static Error nested() {
    return Error(errc::internal, "the repository was called from inside one of its own transactions");
  }
  static Error closed() { return Error(errc::unavailable, "storage is closed"); }

  void rollback() {
    if (sqlite3_get_autocommit(db_->handle()) == 0) (void)db_->exec("ROLLBACK");
  }

  Status run(const std::function<Status(Transaction&)>& fn, bool write) {
    if (inside()) return nested();
    std::lock_guard lock(mutex_);
    if (!db_) return closed();
    Inside mark(owner_);
    if (auto ok = db_->exec(write ? "BEGIN IMMEDIATE" : "BEGIN"); !ok) return ok;
    sqlite::SqliteTransaction tx(*db_, write);
    Status result;
    try {
      result = fn(tx);
    } catch (...) {
      tx.finish();
      rollback();
      throw;
    }
    tx.finish();
    if (!result) {
      rollback();
      return result;
    }
    const auto start = std::chrono::steady_clock::now();
    if (auto ok = db_->exec("COMMIT"); !ok) {
      rollback();
      return ok;
    }
    if (write && metrics_)
      metrics_->observe(kCommitMetric, {},
                        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    return {};
  }

  std::mutex mutex_;
  std::atomic<std::thread::id> owner_{};
  std::unique_ptr<Connection> db_;  // guarded by mutex_; null once closed
  const SchemaInfo info_;
  common::Metrics* metrics_;
};

// What the file at `path` is before SQLite touches it.
enum class FileState { missing, empty, database };

// Classifies the file without modifying it: storage_error if it cannot be read, is not a regular
// file, does not start with the SQLite header, or its directory does not exist.
common::Result<FileState> inspect_file(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    return Error(errc::storage_error, "cannot access database " + path + ": " + ec.message());
  if (!fs::exists(status)) {
    fs::path dir = fs::path(path).parent_path();
    if (dir.empty()) dir = ".";
    if (!fs::is_directory(dir, ec))
      return Error(errc::storage_error,
                   "cannot create database " + path + ": directory " + dir.string() + " does not exist");
    return FileState::missing;
  }
  if (!fs::is_regular_file(status)) return Error(errc::storage_error, "database " + path + " is not a regular file");
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return Error(errc::storage_error, "cannot read database " + path + ": " + std::strerror(errno));
  char header[100];
  const std::size_t n = std::fread(header, 1, sizeof header, f);
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) return Error(errc::storage_error, "cannot read database " + path + ": read error");
  if (n == 0) return FileState::empty;                 // SQLite treats an empty file as a new database
  static constexpr char kMagic[] = "SQLite format 3";  // 16 bytes with the terminating NUL
  if (n < sizeof header || std::memcmp(header, kMagic, sizeof kMagic) != 0)
    return Error(errc::storage_error,
                 "database " + path + " is not a SQLite database (bad header); refusing to open or modify it");
  return FileState::database;
}

// PRAGMA quick_check: storage_error unless the database reads back as consistent.
common::Status quick_check(Connection& db) {
  auto st = db.prepare("PRAGMA quick_check");
  if (!st) return st.error();
  std::string problems;
  int count = 0;
  for (;;) {
    auto row = st->step();
    if (!row) return row.error();
    if (!*row) break;
    std::string line = st->column_text(0);
    if (line == "ok") continue;
    if (++count <= 3) problems += (problems.empty() ? "" : "; ") + line;
  }
  if (count > 0)
    return Error(errc::storage_error, "database " + db.path() + " is corrupt (quick_check: " + problems +
                                          (count > 3 ? "; ..." : "") + "); refusing to open it");
  return {};
}

common::Result<std::string> pragma_text(Connection& db, const std::string& sql) {
  auto st = db.prepare(sql);
  if (!st) return st.error();
  auto row = st->step();
  if (!row) return row.error();
  if (!*row) return std::string{};
  return st->column_text(0);
}

}  // namespace

Result<std::unique_ptr<Repository>> open_sqlite(const SqliteOptions& options) {
  const std::string& path = options.path;
  if (path.empty()) return Error(errc::invalid_argument, "is empty", "path");
  const bool memory = path == kMemory;

  int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX;
  if (memory) {
    flags |= SQLITE_OPEN_CREATE;
  } else {
    auto state = inspect_file(path);
    if (!state) return state.error();
    if (*state == FileState::missing) flags |= SQLITE_OPEN_CREATE;
  }
  auto opened = Connection::open(path, flags);
  if (!opened) return opened.error();
  Connection& db = **opened;
  sqlite3_busy_timeout(db.handle(), options.busy_timeout_ms);
  if (db.read_only())
    return Error(errc::storage_error,
                 "database " + path + " is read-only (check the file's permissions); brokerd must be able to write it");

  // Read-only checks first: nothing is written until the file is known to be a healthy
  // openbroker database of a version this build understands.
  if (auto ok = quick_check(db); !ok) return ok.error();
  auto state = sqlite::read_schema_state(db);
  if (!state) return state.error();
  if (auto ok = sqlite::check_version(db, *state); !ok) return ok.error();

  auto mode = pragma_text(db, "PRAGMA journal_mode = WAL");
  if (!mode) return mode.error();
  if (*mode != (memory ? "memory" : "wal"))
    return Error(errc::storage_error, "cannot switch database " + path + " to WAL journal mode (it stays in '" + *mode +
                                          "' mode); is it on a network file system?");
  if (auto ok = db.exec("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL"); !ok) return ok.error();
  auto fk = pragma_text(db, "PRAGMA foreign_keys");
  if (!fk) return fk.error();
  if (*fk != "1") return Error(errc::storage_error, "this SQLite library does not enforce foreign keys");

  auto version = sqlite::migrate(db);
  if (!version) return version.error();
  if (auto ok = sqlite::verify_schema(db); !ok) return ok.error();

  if (options.metrics)
    options.metrics->describe(kCommitMetric, common::Metrics::Type::histogram,
                              "time to commit one storage write transaction");
  SchemaInfo info{*version, current_schema_version(), path};
  return std::unique_ptr<Repository>(new SqliteRepository(std::move(*opened), std::move(info), options.metrics));
}

}  // namespace storage
