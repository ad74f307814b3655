#include "storage/sqlite/schema.hpp"

#include "common/clock.hpp"
#include "storage/repository.hpp"
#include "storage/sqlite/connection.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <map>
#include <utility>

namespace storage::sqlite {
namespace {

using common::errc;
using common::Error;
using common::model::FieldType;

// Migration 1: the initial schema. One table per kind of common::model (id, name, owner,
// created_at, updated_at, then one column per scalar field: TEXT for text and timestamps,
// INTEGER for integers and booleans 0/1, all nullable); one child table per list field
// (owner_id, position, value), ordered by position; references are foreign keys on the
// referenced table's name, cascading renames and refusing deletes. Never edit this text once
// released: add migration 2 instead (and docs/storage.md).
constexpr std::string_view kMigration1 = R"sql(
CREATE TABLE schema_version (
  version INTEGER PRIMARY KEY,
  applied_at TEXT NOT NULL,
  description TEXT NOT NULL
);

CREATE TABLE site (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  site_name TEXT,
  trust_xml_requests INTEGER,
  heartbeat_interval_seconds INTEGER,
  missed_heartbeats INTEGER,
  logon_ticket_ttl_seconds INTEGER,
  registration_wait_timeout_seconds INTEGER,
  dns_resolution_enabled INTEGER,
  default_domain TEXT,
  lockout_threshold INTEGER,
  lockout_window_seconds INTEGER,
  lockout_duration_seconds INTEGER,
  credential_cache_seconds INTEGER,
  expose_access_lists INTEGER
);
CREATE TABLE site_trusted_front_ends (
  owner_id INTEGER NOT NULL REFERENCES site(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX site_trusted_front_ends_value ON site_trusted_front_ends(value);

CREATE TABLE hypervisor_connections (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  driver TEXT,
  uri TEXT,
  enabled INTEGER,
  max_absolute_active_actions INTEGER,
  max_percentage_active_actions INTEGER,
  max_new_actions_per_minute INTEGER,
  description TEXT
);

CREATE TABLE catalogs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  allocation_type TEXT,
  session_support TEXT,
  provisioning_type TEXT,
  persist_user_changes TEXT,
  machines_are_physical INTEGER,
  hypervisor_connection TEXT REFERENCES hypervisor_connections(name) ON UPDATE CASCADE ON DELETE RESTRICT,
  enrollment_key_hash TEXT,
  description TEXT
);
CREATE INDEX catalogs_hypervisor_connection ON catalogs(hypervisor_connection);

CREATE TABLE delivery_groups (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  desktop_kind TEXT,
  delivery_type TEXT,
  session_support TEXT,
  enabled INTEGER,
  in_maintenance_mode INTEGER,
  published_name TEXT,
  description TEXT,
  time_zone TEXT,
  color_depth TEXT,
  secure_ica_required INTEGER,
  peak_buffer_size_percent INTEGER,
  off_peak_buffer_size_percent INTEGER,
  automatic_power_on_for_assigned INTEGER,
  automatic_power_on_for_assigned_during_peak INTEGER,
  shutdown_desktops_after_use INTEGER,
  settlement_period_before_use_seconds INTEGER,
  settlement_period_before_auto_shutdown_seconds INTEGER
);

CREATE TABLE machines (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  catalog TEXT REFERENCES catalogs(name) ON UPDATE CASCADE ON DELETE RESTRICT,
  delivery_group TEXT REFERENCES delivery_groups(name) ON UPDATE CASCADE ON DELETE RESTRICT,
  dns_name TEXT,
  hosted_machine_id TEXT,
  in_maintenance_mode INTEGER,
  maintenance_mode_reason TEXT,
  registration_state TEXT,
  power_state TEXT,
  summary_state TEXT,
  fault_state TEXT,
  agent_version TEXT,
  os_type TEXT,
  cbp_version TEXT,
  agent_address TEXT,
  load_index INTEGER,
  session_count INTEGER,
  last_deregistration_reason TEXT,
  last_deregistration_time TEXT,
  last_connection_failure TEXT,
  last_connection_time TEXT,
  last_connection_user TEXT,
  secret_hash TEXT
);
CREATE INDEX machines_catalog ON machines(catalog);
CREATE INDEX machines_delivery_group ON machines(delivery_group);
CREATE TABLE machine_tags (
  owner_id INTEGER NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX machine_tags_value ON machine_tags(value);

CREATE TABLE applications (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  browser_name TEXT,
  published_name TEXT,
  application_type TEXT,
  command_line_executable TEXT,
  command_line_arguments TEXT,
  working_directory TEXT,
  client_folder TEXT,
  description TEXT,
  enabled INTEGER,
  visible INTEGER,
  user_filter_enabled INTEGER,
  restrict_to_tag TEXT,
  max_per_user_instances INTEGER,
  max_total_instances INTEGER
);
CREATE TABLE application_associated_users (
  owner_id INTEGER NOT NULL REFERENCES applications(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX application_associated_users_value ON application_associated_users(value);
CREATE TABLE application_delivery_groups (
  owner_id INTEGER NOT NULL REFERENCES applications(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL
    REFERENCES delivery_groups(name) ON UPDATE CASCADE ON DELETE RESTRICT,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX application_delivery_groups_value ON application_delivery_groups(value);

CREATE TABLE rules (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  rule_type TEXT,
  delivery_group TEXT REFERENCES delivery_groups(name) ON UPDATE CASCADE ON DELETE RESTRICT,
  enabled INTEGER,
  description TEXT,
  included_user_filter_enabled INTEGER,
  excluded_user_filter_enabled INTEGER,
  allowed_users TEXT,
  allowed_connections TEXT,
  allow_restart INTEGER,
  published_name TEXT,
  restrict_to_tag TEXT,
  session_reconnection TEXT,
  max_desktops INTEGER,
  max_per_entitlement_instances INTEGER
);
CREATE INDEX rules_delivery_group ON rules(delivery_group);
CREATE TABLE rule_included_users (
  owner_id INTEGER NOT NULL REFERENCES rules(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX rule_included_users_value ON rule_included_users(value);
CREATE TABLE rule_excluded_users (
  owner_id INTEGER NOT NULL REFERENCES rules(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX rule_excluded_users_value ON rule_excluded_users(value);
CREATE TABLE rule_included_client_ips (
  owner_id INTEGER NOT NULL REFERENCES rules(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX rule_included_client_ips_value ON rule_included_client_ips(value);
CREATE TABLE rule_excluded_client_ips (
  owner_id INTEGER NOT NULL REFERENCES rules(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX rule_excluded_client_ips_value ON rule_excluded_client_ips(value);
CREATE TABLE rule_included_client_names (
  owner_id INTEGER NOT NULL REFERENCES rules(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX rule_included_client_names_value ON rule_included_client_names(value);
CREATE TABLE rule_excluded_client_names (
  owner_id INTEGER NOT NULL REFERENCES rules(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX rule_excluded_client_names_value ON rule_excluded_client_names(value);
CREATE TABLE rule_allowed_protocols (
  owner_id INTEGER NOT NULL REFERENCES rules(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX rule_allowed_protocols_value ON rule_allowed_protocols(value);

CREATE TABLE assignments (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  machine TEXT REFERENCES machines(name) ON UPDATE CASCADE ON DELETE RESTRICT,
  user TEXT,
  client_ip TEXT,
  rule TEXT
);
CREATE INDEX assignments_machine ON assignments(machine);

CREATE TABLE users (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  domain TEXT,
  upn TEXT,
  display_name TEXT,
  email TEXT,
  sid TEXT,
  password_hash TEXT,
  disabled INTEGER,
  locked_out INTEGER,
  must_change_password INTEGER,
  expired INTEGER,
  locked_out_until TEXT
);

CREATE TABLE groups (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  domain TEXT,
  sid TEXT,
  description TEXT
);
CREATE TABLE group_members (
  owner_id INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX group_members_value ON group_members(value);

CREATE TABLE sessions (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  machine TEXT REFERENCES machines(name) ON UPDATE CASCADE ON DELETE RESTRICT,
  user_name TEXT,
  delivery_group TEXT,
  application TEXT,
  session_type TEXT,
  state TEXT,
  protocol TEXT,
  client_name TEXT,
  client_address TEXT,
  device_id TEXT,
  brokered INTEGER,
  start_time TEXT,
  state_change_time TEXT
);
CREATE INDEX sessions_machine ON sessions(machine);

CREATE TABLE power_actions (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  machine TEXT REFERENCES machines(name) ON UPDATE CASCADE ON DELETE RESTRICT,
  hypervisor_connection TEXT,
  action TEXT,
  state TEXT,
  base_priority INTEGER,
  actual_priority INTEGER,
  reason TEXT,
  request_time TEXT,
  start_time TEXT,
  completion_time TEXT,
  failure_reason TEXT
);
CREATE INDEX power_actions_machine ON power_actions(machine);

CREATE TABLE audit_log (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  time TEXT NOT NULL,
  actor TEXT NOT NULL,
  action TEXT NOT NULL,
  kind TEXT NOT NULL,
  object TEXT NOT NULL,
  "before" TEXT NOT NULL DEFAULT '',
  "after" TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_log_kind_object ON audit_log(kind, object);

CREATE TABLE logon_tickets (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  ticket_hash TEXT NOT NULL UNIQUE,
  machine TEXT REFERENCES machines(name) ON UPDATE CASCADE ON DELETE CASCADE,
  user_name TEXT,
  credential_type TEXT,
  credential_data BLOB,
  created_at TEXT NOT NULL,
  expires_at TEXT NOT NULL,
  redeemed_at TEXT
);
CREATE INDEX logon_tickets_machine ON logon_tickets(machine);
CREATE INDEX logon_tickets_expires_at ON logon_tickets(expires_at);
)sql";

// Migration 2: sessions keep their brokering duration and, once logged off, their end time.
constexpr std::string_view kMigration2 = R"sql(
ALTER TABLE sessions ADD COLUMN brokering_duration_ms INTEGER;
ALTER TABLE sessions ADD COLUMN end_time TEXT;
CREATE INDEX sessions_state ON sessions(state);
)sql";

// Migration 3: power time schemes (peak hours and pool sizes per hour of a delivery group), with
// the conventions of migration 1: the per-hour lists are child tables of 24 rows each.
constexpr std::string_view kMigration3 = R"sql(
CREATE TABLE power_time_schemes (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  delivery_group TEXT REFERENCES delivery_groups(name) ON UPDATE CASCADE ON DELETE RESTRICT,
  pool_using_percentage INTEGER,
  enabled INTEGER,
  description TEXT
);
CREATE INDEX power_time_schemes_delivery_group ON power_time_schemes(delivery_group);
CREATE TABLE power_time_scheme_days_of_week (
  owner_id INTEGER NOT NULL REFERENCES power_time_schemes(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX power_time_scheme_days_of_week_value ON power_time_scheme_days_of_week(value);
CREATE TABLE power_time_scheme_peak_hours (
  owner_id INTEGER NOT NULL REFERENCES power_time_schemes(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX power_time_scheme_peak_hours_value ON power_time_scheme_peak_hours(value);
CREATE TABLE power_time_scheme_pool_size (
  owner_id INTEGER NOT NULL REFERENCES power_time_schemes(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (owner_id, position)
) WITHOUT ROWID;
CREATE INDEX power_time_scheme_pool_size_value ON power_time_scheme_pool_size(value);
ALTER TABLE hypervisor_connections ADD COLUMN completed_action_retention_minutes INTEGER;
ALTER TABLE hypervisor_connections ADD COLUMN simulated_boot_delay_seconds INTEGER;
ALTER TABLE hypervisor_connections ADD COLUMN simulated_shutdown_delay_seconds INTEGER;
)sql";

// Migration 4: credentials of libvirt connections (the password stays in a file of its own), the
// simulated driver's failure rate and how long a launch waits for a machine it powers on.
constexpr std::string_view kMigration4 = R"sql(
ALTER TABLE hypervisor_connections ADD COLUMN username TEXT;
ALTER TABLE hypervisor_connections ADD COLUMN password_file TEXT;
ALTER TABLE hypervisor_connections ADD COLUMN simulated_failure_percent INTEGER;
ALTER TABLE site ADD COLUMN launch_power_on_wait_seconds INTEGER;
)sql";

// Migration 5: names unique without regard to case for the kinds of names_ignore_case() (two
// users "DEMO\alice" and "DEMO\ALICE" were two accounts to the database but one to everyone
// else). check_case_clashes refuses to migrate a database that holds such pairs, naming them.
constexpr std::array<std::string_view, 9> kCaseInsensitiveTables{
    "hypervisor_connections", "catalogs", "delivery_groups", "machines", "applications",
    "rules", "users", "groups", "power_time_schemes"};

constexpr std::string_view kMigration5 = R"sql(
CREATE UNIQUE INDEX hypervisor_connections_name_nocase ON hypervisor_connections(name COLLATE NOCASE);
CREATE UNIQUE INDEX catalogs_name_nocase ON catalogs(name COLLATE NOCASE);
CREATE UNIQUE INDEX delivery_groups_name_nocase ON delivery_groups(name COLLATE NOCASE);
CREATE UNIQUE INDEX machines_name_nocase ON machines(name COLLATE NOCASE);
CREATE UNIQUE INDEX applications_name_nocase ON applications(name COLLATE NOCASE);
CREATE UNIQUE INDEX rules_name_nocase ON rules(name COLLATE NOCASE);
CREATE UNIQUE INDEX users_name_nocase ON users(name COLLATE NOCASE);
CREATE UNIQUE INDEX groups_name_nocase ON groups(name COLLATE NOCASE);
CREATE UNIQUE INDEX power_time_schemes_name_nocase ON power_time_schemes(name COLLATE NOCASE);
ALTER TABLE sessions ADD COLUMN session_key TEXT;
)sql";

common::Status check_case_clashes(Connection& db) {
  std::string clashes;
  int count = 0;
  for (auto table : kCaseInsensitiveTables) {
    auto st = db.prepare("SELECT group_concat(quote(name), ' and ') FROM " + std::string(table) +
                         " GROUP BY name COLLATE NOCASE HAVING count(*) > 1 ORDER BY min(id)");
    if (!st) return st.error();
    for (;;) {
      auto row = st->step();
      if (!row) return row.error();
      if (!*row) break;
      if (++count <= 20) clashes += std::string(clashes.empty() ? "" : "; ") + std::string(table) + ": " + st->column_text(0);
    }
  }
  if (count == 0) return {};
  if (count > 20) clashes += "; and " + std::to_string(count - 20) + " more";
  return Error(errc::conflict,
               "names must be unique without regard to case, but the database holds " + std::to_string(count) +
                   " set(s) of names that differ only in case (" + clashes +
                   "); rename or remove all but one of each (brokerd of the previous version, or sqlite3) and start "
                   "again");
}

const std::array<Migration, 5> kMigrations{{
    {1, "initial schema", kMigration1},
    {2, "session brokering duration and end time", kMigration2},
    {3, "power time schemes; simulated power delays", kMigration3},
    {4, "libvirt connection credentials; simulated failure rate; launch power-on wait", kMigration4},
    {5, "names unique without regard to case; session keys per machine", kMigration5, check_case_clashes},
}};

}  // namespace

std::span<const Migration> migrations() { return kMigrations; }

bool names_ignore_case(const common::model::KindSpec& kind) {
  return std::find(kCaseInsensitiveTables.begin(), kCaseInsensitiveTables.end(), kind.table) !=
         kCaseInsensitiveTables.end();
}

std::string child_table(const common::model::KindSpec& kind, const common::model::FieldSpec& field) {
  return std::string(kind.name) + "_" + std::string(field.name);
}

common::Result<SchemaState> read_schema_state(Connection& db) {
  SchemaState state;
  bool has_version_table = false;
  {
    auto st =
        db.prepare("SELECT count(*), coalesce(sum(type = 'table' AND name = 'schema_version'), 0) FROM sqlite_master");
    if (!st) return st.error();
    auto row = st->step();
    if (!row) return row.error();
    has_version_table = st->column_int(1) > 0;
    state.foreign = st->column_int(0) > 0 && !has_version_table;
  }
  if (!has_version_table) return state;
  auto st = db.prepare("SELECT coalesce(max(version), 0) FROM schema_version");
  if (!st) return st.error();
  auto row = st->step();
  if (!row) return row.error();
  state.version = static_cast<int>(st->column_int(0));
  return state;
}

common::Status check_version(const Connection& db, const SchemaState& state) {
  if (state.foreign)
    return Error(errc::incompatible, "database " + db.path() +
                                         " is a SQLite database but not an openbroker database (it has tables but no "
                                         "schema_version table); refusing to modify it");
  if (state.version > current_schema_version())
    return Error(errc::incompatible, "database " + db.path() + " has schema version " + std::to_string(state.version) +
                                         ", written by a newer brokerd; this build supports up to " +
                                         std::to_string(current_schema_version()));
  return {};
}

namespace {

common::Result<int> apply_missing(Connection& db) {
  auto state = read_schema_state(db);
  if (!state) return state.error();
  if (auto ok = check_version(db, *state); !ok) return ok.error();
  for (const auto& m : kMigrations) {
    if (m.version <= state->version) continue;
    if (m.check)
      if (auto ok = m.check(db); !ok)
        return Error(ok.error().code, "migration " + std::to_string(m.version) + " (" + std::string(m.description) +
                                          ") cannot be applied to " + db.path() + ": " + ok.error().message);
    if (auto ok = db.exec(m.sql); !ok)
      return Error(ok.error().code, "migration " + std::to_string(m.version) + " failed: " + ok.error().message);
    auto st = db.prepare("INSERT INTO schema_version (version, applied_at, description) VALUES (?1, ?2, ?3)");
    if (!st) return st.error();
    st->bind(1, std::int64_t{m.version});
    st->bind(2, common::format_time(std::chrono::system_clock::now()));
    st->bind(3, m.description);
    if (auto ok = st->run(); !ok) return ok.error();
  }
  return current_schema_version();
}

}  // namespace

common::Result<int> migrate(Connection& db) {
  if (auto ok = db.exec("BEGIN IMMEDIATE"); !ok) return ok.error();
  auto version = apply_missing(db);
  if (!version) {
    (void)db.exec("ROLLBACK");
    return version.error();
  }
  if (auto ok = db.exec("COMMIT"); !ok) {
    (void)db.exec("ROLLBACK");
    return ok.error();
  }
  return *version;
}

namespace {

struct ForeignKey {
  std::string table, to, on_update, on_delete;
};

struct TableInfo {
  std::map<std::string, std::string> columns;      // name -> declared type
  std::map<std::string, ForeignKey> foreign_keys;  // from column -> key
};

common::Result<TableInfo> table_info(Connection& db, const std::string& table) {
  TableInfo info;
  {
    auto st = db.prepare("SELECT name, type FROM pragma_table_info(?1)");
    if (!st) return st.error();
    st->bind(1, table);
    for (;;) {
      auto row = st->step();
      if (!row) return row.error();
      if (!*row) break;
      info.columns[st->column_text(0)] = st->column_text(1);
    }
  }
  auto st = db.prepare("SELECT \"from\", \"table\", \"to\", on_update, on_delete FROM pragma_foreign_key_list(?1)");
  if (!st) return st.error();
  st->bind(1, table);
  for (;;) {
    auto row = st->step();
    if (!row) return row.error();
    if (!*row) break;
    info.foreign_keys[st->column_text(0)] = {st->column_text(1), st->column_text(2), st->column_text(3),
                                             st->column_text(4)};
  }
  return info;
}

Error mismatch(const std::string& what) {
  return Error(errc::internal, "database schema does not match the site model: " + what +
                                   " (a field was added to common/model.cpp without a migration in storage/)");
}

common::Status expect_column(const TableInfo& info, const std::string& table, const std::string& column,
                             std::string_view type) {
  auto it = info.columns.find(column);
  if (it == info.columns.end()) return mismatch("table " + table + " has no column " + column);
  if (it->second != type)
    return mismatch("column " + table + "." + column + " is " + it->second + ", expected " + std::string(type));
  return {};
}

common::Status expect_key(const TableInfo& info, const std::string& table, const std::string& column,
                          const std::string& target, std::string_view to, std::string_view on_update,
                          std::string_view on_delete) {
  auto it = info.foreign_keys.find(column);
  if (it == info.foreign_keys.end() || it->second.table != target || it->second.to != to ||
      it->second.on_update != on_update || it->second.on_delete != on_delete)
    return mismatch("column " + table + "." + column + " is not a foreign key to " + target + "(" + std::string(to) +
                    ") ON UPDATE " + std::string(on_update) + " ON DELETE " + std::string(on_delete));
  return {};
}

}  // namespace

common::Status verify_schema(Connection& db) {
  for (const auto& kind : common::model::all_kinds()) {
    const std::string table(kind.table);
    auto info = table_info(db, table);
    if (!info) return info.error();
    if (info->columns.empty()) return mismatch("no table " + table + " for kind " + std::string(kind.name));
    for (auto [column, type] : {std::pair{"id", "INTEGER"},
                                {"name", "TEXT"},
                                {"owner", "TEXT"},
                                {"created_at", "TEXT"},
                                {"updated_at", "TEXT"}})
      if (auto ok = expect_column(*info, table, column, type); !ok) return ok;
    for (const auto& field : kind.fields) {
      if (field.type == FieldType::text_list) {
        const std::string child = child_table(kind, field);
        auto cinfo = table_info(db, child);
        if (!cinfo) return cinfo.error();
        if (cinfo->columns.empty())
          return mismatch("no table " + child + " for list field " + std::string(kind.name) + "." +
                          std::string(field.name));
        for (auto [column, type] : {std::pair{"owner_id", "INTEGER"}, {"position", "INTEGER"}, {"value", "TEXT"}})
          if (auto ok = expect_column(*cinfo, child, column, type); !ok) return ok;
        if (auto ok = expect_key(*cinfo, child, "owner_id", table, "id", "NO ACTION", "CASCADE"); !ok) return ok;
        if (field.references)
          if (auto ok = expect_key(*cinfo, child, "value", std::string(common::model::spec(*field.references).table),
                                   "name", "CASCADE", "RESTRICT");
              !ok)
            return ok;
        continue;
      }
      const bool numeric = field.type == FieldType::integer || field.type == FieldType::boolean;
      const std::string column(field.name);
      if (auto ok = expect_column(*info, table, column, numeric ? "INTEGER" : "TEXT"); !ok) return ok;
      if (field.references)
        if (auto ok = expect_key(*info, table, column, std::string(common::model::spec(*field.references).table),
                                 "name", "CASCADE", "RESTRICT");
            !ok)
          return ok;
    }
  }
  return {};
}

}  // namespace storage::sqlite

int storage::current_schema_version() { return storage::sqlite::kMigrations.back().version; }
