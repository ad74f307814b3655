// broker/site_objects.hpp: the site's configuration objects (catalogs, delivery groups,
// machines, applications, rules, assignments, directory users and groups, site settings) as the
// admin API and the config file change them.
//
// It checks what a single object cannot check alone (references, session support of a machine vs
// its catalog and group, rule types vs group kinds, assignment shape), enforces config-file
// ownership, and writes an audit entry in the same transaction as every change.
//
// Threading: every method blocks on storage; call it from a work queue, never an I/O thread.
// Thread-safe (storage serialises the transactions).
#pragma once

#include "common/error.hpp"
#include "common/model.hpp"
#include "storage/repository.hpp"

#include <spdlog/fwd.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace power {
class TimeZoneDb;
}

namespace broker {

using common::Result;
using common::Status;
using common::model::Kind;
using common::model::Object;

struct Page {
  std::vector<Object> items;
  std::int64_t total = 0;
};

struct ReconcileReport {
  int created = 0, updated = 0, deleted = 0, unchanged = 0;
  int released = 0;  // no longer declared but still referenced: handed over to the admin API
};

class SiteObjects {
 public:
  SiteObjects(storage::Repository& repository, std::shared_ptr<spdlog::logger> logger);

  Result<Page> list(Kind kind, const storage::Query& query);
  Result<Object> get(Kind kind, std::string_view name);

  // `candidate` is the complete object to store (defaults filled in). The actor is recorded in
  // the audit log ("token:ops"). Errors: invalid_argument (with field), conflict, not_found.
  Result<Object> create(Object candidate, const std::string& actor);
  // Replaces the object named `name` with `candidate` (a rename when the names differ). Objects
  // declared in the config file only accept changes to operational fields (maintenance mode).
  Result<Object> update(std::string_view name, Object candidate, const std::string& actor);
  Status remove(Kind kind, std::string_view name, const std::string& actor);

  // Called (on the calling thread, after the commit) with the name of every machine removed
  // through remove(): the agent endpoint ends that machine's registration (DesktopRemoved).
  void on_machine_removed(std::function<void(const std::string&)> hook) { machine_removed_ = std::move(hook); }

  // Gives the machine a new random secret for agent authentication and returns it (it is stored
  // only as its sha256, so it is shown this once); the old secret stops working. Allowed on
  // config-declared machines (the secret is state, not declaration). errc::not_found.
  Result<std::string> rotate_machine_secret(std::string_view machine, const std::string& actor);

  // The site settings object (created with defaults when the database has none).
  Result<Object> site();

  // Makes the database match the objects a config file declares (all in one transaction):
  // creates and updates them (keeping state and operational fields), takes over same-named
  // objects created through the API, and deletes config-owned objects the file no longer
  // declares (or hands them to the API when something still references them).
  Result<ReconcileReport> reconcile(const std::string& config_path, const std::optional<Object>& site,
                                    const std::vector<Object>& declared);

  // Registration is live state (the engine's; brokerd no longer stores it): at start every machine
  // is Unregistered until its agent registers again. Resets the stored registration_state that an
  // older broker left as anything else, so that the engine loads Unregistered. Returns how many
  // machines were reset.
  Result<int> reset_registrations();

  // Counts of machines per registration_state and sessions per state (for /metrics).
  Result<std::vector<std::pair<std::string, std::int64_t>>> count_by(Kind kind, std::string_view field);

 private:
  Status check_semantics(storage::Transaction& tx, const Object& obj);

  storage::Repository& repository_;
  std::shared_ptr<spdlog::logger> logger_;
  std::function<void(const std::string&)> machine_removed_;  // set once at start-up
  std::shared_ptr<power::TimeZoneDb> zones_;                 // delivery groups' time_zone checks
};

}  // namespace broker
