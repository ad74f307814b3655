// storage/sqlite/sqlite_repository.hpp: what the SQLite repository shows beyond storage::Repository,
// for tests and diagnostics. Private to storage/ (and its tests); the broker sees only
// storage/repository.hpp.
#pragma once

#include "storage/repository.hpp"

#include <cstddef>

namespace storage::sqlite {

// A snapshot of the group-commit queue (docs/architecture.md, "Durability and group commit").
struct WriteQueueState {
  std::size_t queued = 0;  // write() calls waiting to be taken into a batch (an elected leader included)
  bool closing = false;    // close() has been called
};

// The state of a repository returned by open_sqlite(); an empty state for any other Repository.
// Thread-safe; the answer may be stale by the time it is read (tests poll it while they hold a
// batch open on purpose).
WriteQueueState write_queue_state(Repository& repo);

}  // namespace storage::sqlite
