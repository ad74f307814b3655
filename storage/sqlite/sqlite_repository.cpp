// storage/sqlite/sqlite_repository.cpp: storage::open_sqlite(): opening and checking the file,
// connection settings, migrations, and the transaction wrapper: one connection, handed to one
// caller at a time in arrival order, with group commit for write() (docs/architecture.md,
// "Durability and group commit").
#include "storage/sqlite/sqlite_repository.hpp"

#include "common/metrics.hpp"
#include "storage/repository.hpp"
#include "storage/sqlite/connection.hpp"
#include "storage/sqlite/schema.hpp"
#include "storage/sqlite/transaction.hpp"

#include <sqlite3.h>

#include <fcntl.h>
#include <grp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <exception>
#include <filesystem>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace storage {
namespace {

using common::errc;
using common::Error;
using sqlite::Connection;

constexpr std::string_view kMemory = ":memory:";
constexpr std::string_view kCommitMetric = "broker_storage_commit_seconds";
constexpr std::string_view kBatchesMetric = "broker_storage_commit_batches_total";
constexpr std::string_view kBatchWritesMetric = "broker_storage_commit_batch_writes_total";
constexpr std::string_view kRowsMetric = "broker_storage_rows_read_total";

// The most write() calls one COMMIT serves; later arrivals form the next batch.
constexpr std::size_t kMaxBatch = 64;

// Group commit
// ------------
// The connection is a resource handed to one holder at a time, in arrival order (a FIFO hand-off,
// so neither readers nor writers can be starved): read(), ping(), close() and the leader of a
// write batch each wait for their turn.
//
// write() queues its function. A caller that finds no leader elected becomes the leader: it waits
// for the connection, takes up to kMaxBatch queued functions (its own first), elects the next
// queued writer (if any) as the next leader, and runs BEGIN IMMEDIATE, each function inside its
// own SAVEPOINT, then one COMMIT. Every other caller sleeps until the leader hands it its result.
// A lone writer is the leader of a batch of one and never waits for company: batches form only
// from writers that were already waiting while the previous batch held the connection.
class SqliteRepository final : public Repository {
 public:
  SqliteRepository(std::unique_ptr<Connection> db, SchemaInfo info, common::Metrics* metrics)
      : db_(std::move(db)), info_(std::move(info)), metrics_(metrics) {
    struct stat st {};
    if (db_->path() != kMemory && ::stat(db_->path().c_str(), &st) == 0) file_ = FileIdentity{st.st_dev, st.st_ino};
  }
  ~SqliteRepository() override { close(); }

  Status write(const std::function<Status(Transaction&)>& fn) override {
    if (inside()) return nested();
    PendingWrite self{&fn};
    {
      std::unique_lock lock(mutex_);
      if (closing_) return closed();
      writers_.push_back(&self);
      if (!leader_elected_) {
        leader_elected_ = true;
        self.leader = true;
      } else {
        self.wake.wait(lock, [&] { return self.leader || self.done; });
      }
      if (!self.done) lead(lock, self);
    }
    if (self.thrown) std::rethrow_exception(self.thrown);
    return std::move(self.result);
  }

  Status read(const std::function<Status(Transaction&)>& fn) override {
    if (inside()) return nested();
    Turn turn;
    if (!take_connection(turn)) return closed();
    Lease lease(*this);
    Inside mark(owner_);
    if (auto ok = db_->exec("BEGIN"); !ok) return ok;
    sqlite::SqliteTransaction tx(*db_, false);
    Status result;
    const auto rows_before = db_->rows_returned();
    try {
      result = fn(tx);
    } catch (...) {
      tx.finish();
      rollback();
      throw;
    }
    tx.finish();
    if (metrics_) metrics_->add(kRowsMetric, {}, static_cast<double>(db_->rows_returned() - rows_before));
    // A read transaction has nothing to commit: ending it either way releases the snapshot.
    if (!result) {
      rollback();
      return result;
    }
    if (auto ok = db_->exec("COMMIT"); !ok) {
      rollback();
      return ok;
    }
    return {};
  }

  void set_commit_observer(CommitObserver observer) override { observer_ = std::move(observer); }

  std::optional<std::uint64_t> change_count(Kind kind) const override {
    const auto i = static_cast<std::size_t>(kind);
    if (i >= change_counts_.size()) return std::nullopt;
    return change_counts_[i].load();
  }

  Status ping() override {
    if (inside()) return nested();
    if (auto ok = check_file(); !ok) return ok;
    Turn turn;
    if (!take_connection(turn)) return closed();
    Lease lease(*this);
    auto st = db_->prepare("SELECT 1");
    if (!st) return st.error();
    auto row = st->step();
    if (!row) return row.error();
    return {};
  }

  SchemaInfo schema() const override { return info_; }

  // A no-op when already closed, and when called from inside write()/read() (it would deadlock).
  // Waits for the holder of the connection (a write batch in progress commits); every call
  // still waiting for the connection, and every queued write(), then fails with unavailable.
  void close() override {
    if (inside()) return;
    Turn turn;
    {
      std::unique_lock lock(mutex_);
      closing_ = true;
      acquire(lock, turn);
    }
    Lease lease(*this);
    if (!db_) return;
    (void)db_->exec("PRAGMA wal_checkpoint(TRUNCATE)");
    db_.reset();
  }

  sqlite::WriteQueueState write_queue_state() {
    std::lock_guard lock(mutex_);
    return {writers_.size(), closing_};
  }

 private:
  // A caller waiting for the connection.
  struct Turn {
    std::condition_variable wake;
    bool granted = false;
  };

  // One write() call: its function, and its outcome once its batch is done.
  struct PendingWrite : Turn {
    explicit PendingWrite(const std::function<Status(Transaction&)>* f) : fn(f) {}
    const std::function<Status(Transaction&)>* fn;
    bool leader = false;  // elected to run the next batch
    bool done = false;    // result/thrown are final
    Status result;
    std::exception_ptr thrown;
    std::vector<Change> changes;  // what fn changed, kept when its savepoint was released
  };

  // The functions of one batch, in queue order (a fixed array: taking a batch never allocates
  // while the connection is held).
  struct Batch {
    std::array<PendingWrite*, kMaxBatch> items{};
    std::size_t size = 0;
    PendingWrite** begin() { return items.data(); }
    PendingWrite** end() { return items.data() + size; }
    PendingWrite* operator[](std::size_t i) const { return items[i]; }
  };

  // Marks the calling thread as the one inside a transaction, for the nesting check. While a
  // leader runs a batch, that is the leader's thread (it runs the other callers' functions).
  class Inside {
   public:
    explicit Inside(std::atomic<std::thread::id>& owner) : owner_(owner) { owner_ = std::this_thread::get_id(); }
    ~Inside() { owner_ = std::thread::id{}; }
    Inside(const Inside&) = delete;
    Inside& operator=(const Inside&) = delete;

   private:
    std::atomic<std::thread::id>& owner_;
  };

  // Gives the connection back (to the next in line) at scope exit.
  class Lease {
   public:
    explicit Lease(SqliteRepository& repo) : repo_(repo) {}
    ~Lease() {
      std::lock_guard lock(repo_.mutex_);
      repo_.release();
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;

   private:
    SqliteRepository& repo_;
  };

  bool inside() const { return owner_.load() == std::this_thread::get_id(); }
  static Error nested() {
    return Error(errc::internal, "the repository was called from inside one of its own transactions");
  }
  static Error closed() { return Error(errc::unavailable, "storage is closed"); }

  // Waits (mutex_ held through `lock`) until the connection is the caller's.
  void acquire(std::unique_lock<std::mutex>& lock, Turn& turn) {
    if (!busy_) {
      busy_ = true;
      return;
    }
    turn.granted = false;
    line_.push_back(&turn);
    turn.wake.wait(lock, [&] { return turn.granted; });
  }

  // Hands the connection to the next in line, or marks it free. mutex_ held.
  void release() {
    if (line_.empty()) {
      busy_ = false;
      return;
    }
    Turn* next = line_.front();
    line_.pop_front();
    next->granted = true;
    next->wake.notify_one();
  }

  // Takes the connection for read()/ping(); false (connection not taken) once closing.
  bool take_connection(Turn& turn) {
    std::unique_lock lock(mutex_);
    if (closing_) return false;
    acquire(lock, turn);
    if (closing_ || !db_) {
      release();
      return false;
    }
    return true;
  }

  void rollback() {
    if (in_transaction()) (void)db_->exec("ROLLBACK");
  }
  bool in_transaction() const { return sqlite3_get_autocommit(db_->handle()) == 0; }

  // The leader's part of write(): `self` is the front of writers_. Returns with self.done set.
  void lead(std::unique_lock<std::mutex>& lock, PendingWrite& self) {
    acquire(lock, self);
    Batch batch;
    while (!writers_.empty() && batch.size < kMaxBatch) {
      batch.items[batch.size++] = writers_.front();
      writers_.pop_front();
    }
    // The writers that queued behind this batch elect their leader now: it lines up for the
    // connection and takes whoever has queued by the time its turn comes.
    if (writers_.empty()) {
      leader_elected_ = false;
    } else {
      writers_.front()->leader = true;
      writers_.front()->wake.notify_one();
    }
    const bool open = !closing_ && db_;
    lock.unlock();
    if (open) {
      Inside mark(owner_);
      run_batch(batch);
    } else {
      for (auto* p : batch) p->result = closed();
    }
    lock.lock();
    release();
    for (auto* p : batch) {
      p->done = true;
      if (p != &self) p->wake.notify_one();  // under mutex_: the waiter cannot return (and die) first
    }
  }

  // Runs one queued function inside its own savepoint: on error or exception only its own
  // changes are rolled back. false when the enclosing transaction did not survive (SQLite rolled
  // it back after an I/O or similar error, or the savepoint could not be ended).
  bool run_one(PendingWrite& p) {
    if (auto ok = db_->exec("SAVEPOINT openbroker_write"); !ok) {
      p.result = ok;
      return in_transaction();
    }
    sqlite::SqliteTransaction tx(*db_, true);
    p.changes.clear();
    tx.record_changes(&p.changes);  // for the observer and change_count()
    bool failed = false;
    const auto rows_before = db_->rows_returned();
    struct CountRows {  // rows the function read, whatever way it ends
      SqliteRepository& self;
      std::uint64_t before;
      ~CountRows() {
        if (self.metrics_) self.metrics_->add(kRowsMetric, {}, static_cast<double>(self.db_->rows_returned() - before));
      }
    } count_rows{*this, rows_before};
    try {
      p.result = (*p.fn)(tx);
      failed = !p.result;
    } catch (...) {
      p.thrown = std::current_exception();
      failed = true;
    }
    tx.finish();
    if (!in_transaction()) {
      if (!failed) p.result = Error(errc::storage_error, "database " + db_->path() + ": transaction lost");
      return false;
    }
    Status ended;
    if (failed) p.changes.clear();
    if (failed) ended = db_->exec("ROLLBACK TO openbroker_write");
    if (ended) ended = db_->exec("RELEASE openbroker_write");
    if (!ended && !failed) p.result = ended;
    return ended.has_value();
  }

  // Runs a batch: BEGIN IMMEDIATE, each function in order in its savepoint, one COMMIT. Fills
  // every function's result. Never throws (an exception from a function is stored for its
  // caller; anything else thrown here fails the rest of the batch with it).
  void run_batch(const Batch& batch) {
    if (auto ok = check_file(); !ok) {
      for (std::size_t i = 0; i < batch.size; ++i) batch[i]->result = ok;
      return;
    }
    std::size_t next = 0;
    while (next < batch.size) {
      const std::size_t first = next;
      try {
        if (auto ok = db_->exec("BEGIN IMMEDIATE"); !ok) {
          for (; next < batch.size; ++next) batch[next]->result = ok;
          return;
        }
        bool survived = true;
        while (survived && next < batch.size) survived = run_one(*batch[next++]);
        if (!survived) {
          // The transaction is gone with the changes of this batch's earlier functions: fail
          // them too; the functions not run yet go on in a new transaction.
          rollback();
          const Error lost(errc::storage_error, "database " + db_->path() +
                                                    ": transaction rolled back after a database error in the "
                                                    "same commit batch");
          for (std::size_t i = first; i + 1 < next; ++i)
            if (!batch[i]->thrown && batch[i]->result) batch[i]->result = lost;
          continue;
        }
        const auto start = std::chrono::steady_clock::now();
        if (auto ok = db_->exec("COMMIT"); !ok) {
          rollback();
          for (std::size_t i = first; i < next; ++i)
            if (!batch[i]->thrown && batch[i]->result) batch[i]->result = ok;
          continue;
        }
        {
          std::vector<Change> committed;
          for (std::size_t i = first; i < next; ++i)
            if (!batch[i]->thrown && batch[i]->result)
              for (auto& c : batch[i]->changes) committed.push_back(std::move(c));
          for (const auto& c : committed)
            if (const auto k = static_cast<std::size_t>(c.kind); k < change_counts_.size()) change_counts_[k].fetch_add(1);
          // The commit stands whatever the observer does (it must not throw).
          if (observer_ && !committed.empty()) try {
              observer_(committed);
            } catch (...) {
            }
        }
        if (metrics_) {
          metrics_->observe(kCommitMetric, {},
                            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
          metrics_->add(kBatchesMetric, {});
          metrics_->add(kBatchWritesMetric, {}, static_cast<double>(next - first));
        }
      } catch (...) {
        // Not from a function (run_one catches those): e.g. bad_alloc. Nothing of the
        // transaction is committed.
        const auto error = std::current_exception();
        rollback();
        for (std::size_t i = first; i < batch.size; ++i)
          if (!batch[i]->thrown) batch[i]->thrown = error;
        return;
      }
    }
  }

  // The database file must still be the one opened: deleted or replaced under a running broker
  // (an admin's mistake, a restore copied over it), SQLite would go on writing to the open
  // inode, which nobody will read again, and every later commit would be lost at the restart.
  // So writes and ping() (/readyz) are refused with errc::unavailable until brokerd is
  // restarted. One stat() per commit batch.
  Status check_file() const {
    if (!file_) return {};
    struct stat st {};
    if (::stat(db_path().c_str(), &st) != 0) {
      if (errno != ENOENT) return {};  // cannot tell (a permission change on the directory): go on
      return Error(errc::unavailable, "database " + db_path() +
                                          " was deleted while the broker runs; writes are refused (they would be "
                                          "lost); restore it from a backup and restart brokerd");
    }
    if (st.st_dev != file_->device || st.st_ino != file_->inode)
      return Error(errc::unavailable, "database " + db_path() +
                                          " was replaced by another file while the broker runs; writes are refused "
                                          "(they would go to the old file); restart brokerd to use the new one");
    return {};
  }
  const std::string& db_path() const { return info_.path; }
  struct FileIdentity {
    dev_t device;
    ino_t inode;
  };
  std::optional<FileIdentity> file_;  // unset for :memory:

  std::mutex mutex_;                   // guards the fields below up to owner_
  bool busy_ = false;                  // someone holds the connection
  std::deque<Turn*> line_;             // waiting for the connection, first come first served
  std::deque<PendingWrite*> writers_;  // queued write() calls not yet taken into a batch
  bool leader_elected_ = false;        // writers_.front() is the elected leader of the next batch
  bool closing_ = false;               // close() was called: no new transactions
  std::atomic<std::thread::id> owner_{};
  std::unique_ptr<Connection> db_;  // used only by the connection's holder; null once closed
  CommitObserver observer_;          // set before concurrent use; called by the connection's holder
  // Committed changes per Kind (change_count()); bumped by the connection's holder after COMMIT.
  std::array<std::atomic<std::uint64_t>, 16> change_counts_{};
  const SchemaInfo info_;
  common::Metrics* metrics_;
};

// What the file at `path` is before SQLite touches it.
enum class FileState { missing, empty, database };

// Creates the (missing) database file empty with mode 0600, or 0640 and owned by `group`,
// whatever the process's umask; SQLite gives the WAL and shared-memory files the database
// file's mode when it creates them.
common::Status create_private_file(const std::string& path, const std::string& group) {
  gid_t gid = static_cast<gid_t>(-1);
  if (!group.empty()) {
    std::vector<char> buffer(16384);
    struct group entry {};
    struct group* found = nullptr;
    if (getgrnam_r(group.c_str(), &entry, buffer.data(), buffer.size(), &found) != 0 || !found)
      return Error(errc::invalid_argument, "database group '" + group + "' is not a group on this system", "group");
    gid = found->gr_gid;
  }
  const mode_t mode = group.empty() ? 0600 : 0640;
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) {
    if (errno == EEXIST) return {};  // created meanwhile: SQLite opens what is there
    return Error(errc::storage_error, "cannot create database " + path + ": " + std::strerror(errno));
  }
  std::string failure;
  if (::fchmod(fd, mode) != 0) failure = std::string("chmod: ") + std::strerror(errno);
  if (failure.empty() && gid != static_cast<gid_t>(-1) && ::fchown(fd, static_cast<uid_t>(-1), gid) != 0)
    failure = "chown to group " + group + ": " + std::strerror(errno);
  ::close(fd);
  if (!failure.empty()) {
    ::unlink(path.c_str());
    return Error(errc::storage_error, "cannot create database " + path + " (" + failure + ")");
  }
  return {};
}

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
    if (*state == FileState::missing) {
      flags |= SQLITE_OPEN_CREATE;
      if (auto ok = create_private_file(path, options.file_group); !ok) return ok.error();
    }
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
  if (auto ok = db.exec("PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL"); !ok) return ok.error();
  auto fk = pragma_text(db, "PRAGMA foreign_keys");
  if (!fk) return fk.error();
  if (*fk != "1") return Error(errc::storage_error, "this SQLite library does not enforce foreign keys");

  auto version = sqlite::migrate(db);
  if (!version) return version.error();
  if (auto ok = sqlite::verify_schema(db); !ok) return ok.error();

  if (options.metrics) {
    options.metrics->describe(kCommitMetric, common::Metrics::Type::histogram,
                              "time to commit one storage write batch (one COMMIT and one disk flush)");
    options.metrics->describe(kBatchesMetric, common::Metrics::Type::counter,
                              "storage write batches committed (group commit: one COMMIT and disk flush each)");
    options.metrics->describe(kRowsMetric, common::Metrics::Type::counter,
                              "rows returned by storage statements (reads inside read() and write() calls)");
    options.metrics->describe(kBatchWritesMetric, common::Metrics::Type::counter,
                              "write() calls run in committed batches; divided by "
                              "broker_storage_commit_batches_total it is the mean batch size");
  }
  SchemaInfo info{*version, current_schema_version(), path};
  return std::unique_ptr<Repository>(new SqliteRepository(std::move(*opened), std::move(info), options.metrics));
}

namespace sqlite {

WriteQueueState write_queue_state(Repository& repo) {
  auto* sqlite = dynamic_cast<SqliteRepository*>(&repo);
  return sqlite ? sqlite->write_queue_state() : WriteQueueState{};
}

}  // namespace sqlite
}  // namespace storage
