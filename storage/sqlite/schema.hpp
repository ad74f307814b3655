// storage/sqlite/schema.hpp: the database schema: versioned migrations (explicit SQL text, one
// entry per version, never edited once released), reading the version of an open database, and
// a check that the schema matches the site-model descriptors. The schema is documented for
// admins in docs/storage.md.
//
// Version rule: the newest applied migration is MAX(version) in the schema_version table; a
// database without that table (and without any other table) is version 0, i.e. new.
#pragma once

#include "common/error.hpp"
#include "common/model.hpp"

#include <span>
#include <string>
#include <string_view>

namespace storage::sqlite {

class Connection;

struct Migration {
  int version;
  std::string_view description;
  std::string_view sql;  // a script of CREATE/ALTER statements, run inside the migration transaction
  // Run before `sql`, in the same transaction: fails (nothing applied) with a message an admin
  // can act on when the data stands in the migration's way. Optional.
  common::Status (*check)(Connection& db) = nullptr;
};

// Kinds whose names are compared without regard to case (ASCII), as Windows and the directory
// compare them: users, groups, machines, catalogs, delivery groups, applications, rules,
// hypervisor connections, power time schemes. Their names are unique case-insensitively
// (migration 5's unique indexes); create and rename refuse a name that differs only in case.
bool names_ignore_case(const common::model::KindSpec& kind);

// Every migration, oldest first; versions are 1, 2, 3, ... without gaps.
std::span<const Migration> migrations();

// The child table holding a list field: "<kind name>_<field>", e.g. "machine_tags".
std::string child_table(const common::model::KindSpec& kind, const common::model::FieldSpec& field);

struct SchemaState {
  int version = 0;       // 0: nothing applied yet
  bool foreign = false;  // has tables but no schema_version table: not an openbroker database
};

// Reads the schema state without writing anything. storage_error when the file cannot be read.
common::Result<SchemaState> read_schema_state(Connection& db);

// errc::incompatible (naming the path and both versions) when the state shows a database this
// build must not touch: newer than this build, or not an openbroker database.
common::Status check_version(const Connection& db, const SchemaState& state);

// Applies the missing migrations in one BEGIN IMMEDIATE transaction (re-reading the version
// inside it, so two processes opening the same new file do not both migrate). Returns the
// version after migration. errc::incompatible (nothing written) when the database is newer than
// this build or is not an openbroker database.
common::Result<int> migrate(Connection& db);

// Compares the open database with the descriptors: every kind has its table, every scalar field
// its column (of the right type, with the right foreign key for references), every list field
// its child table. errc::internal naming the first mismatch (a field added without a migration).
common::Status verify_schema(Connection& db);

}  // namespace storage::sqlite
