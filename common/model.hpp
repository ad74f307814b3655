// common/model.hpp: the site model as data.
//
// Each kind of site object (catalog, delivery group, machine, ...) is described once, here, by a
// KindSpec: its table, its fields, their types, defaults, allowed spellings and references. The
// config loader (TOML), the storage layer (SQL) and the admin API (JSON) are generic over these
// descriptors, so adding a field is one line here plus a migration in storage/.
//
// An Object is one stored instance: id, unique name, owner ("api" or "config:<file>") and a
// value per field. The engine reads fields with the typed accessors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace common::model {

enum class Kind {
  site,  // the one site-settings object, named "site"
  hypervisor_connection,
  catalog,
  delivery_group,
  power_time_scheme,  // peak hours and pool sizes of a delivery group (site-model-reference 2.8)
  machine,
  application,
  rule,
  assignment,
  user,
  group,
  session,       // read-only through the API; written by the engine
  power_action,  // read-only through the API; written by the power module
};

enum class FieldType { text, integer, boolean, text_list, timestamp };

using TextList = std::vector<std::string>;
// monostate = null (absent optional field). Timestamps are text in common::format_time form.
using Value = std::variant<std::monostate, std::string, std::int64_t, bool, TextList>;

struct FieldSpec {
  std::string_view name;  // the key in TOML and JSON, and the SQL column (or child table suffix)
  FieldType type = FieldType::text;
  bool required = false;  // must be given on create
  Value default_value;    // used when not given (monostate: null)
  std::vector<std::string_view> choices;  // allowed spellings (enum), empty: free
  std::optional<Kind> references;         // names an object of that kind (or each list element does)
  bool state = false;   // maintained by the broker: read-only through config and the API
  bool secret = false;  // never shown through the API or in the audit log
  // Run-time switch (maintenance mode): the config file gives the initial value; the admin API
  // may change it even on objects the config file declares, and reconciliation keeps that change.
  bool operational = false;
  // Integer bounds when min < max. For a text_list, each element must then be the decimal text of
  // an integer within them (pool sizes per hour: "-1", "5").
  std::int64_t min = 0, max = 0;
  // text_list only: element count bounds when max_items > 0 (24 for per-hour lists). `choices`,
  // when given, apply to each element of a text_list.
  std::size_t min_items = 0, max_items = 0;
  std::string_view help;          // one line, for docs and error messages
};

struct KindSpec {
  Kind kind;
  std::string_view name;      // "delivery_group": config table [[delivery_group]], brokerctl noun
  std::string_view plural;    // "delivery-groups": API path segment
  std::string_view table;     // "delivery_groups": SQL table
  bool api_writable = true;   // false: list/get only (sessions, power actions)
  bool auto_name = false;     // the name is the id, assigned at creation (assignments, actions)
  std::vector<FieldSpec> fields;  // excluding the common columns id, name, owner, created_at, updated_at

  const FieldSpec* field(std::string_view field_name) const;
};

// All kinds, in dependency order (a kind only references kinds before it).
std::span<const KindSpec> all_kinds();
const KindSpec& spec(Kind kind);
const KindSpec* find_kind(std::string_view name_or_plural);  // "machine", "machines" or "machines" path

using Fields = std::map<std::string, Value, std::less<>>;

struct Object {
  Kind kind = Kind::site;
  std::int64_t id = 0;
  std::string name;
  std::string owner = "api";  // "api", or "config:<path>" for objects declared in a config file
  std::string created_at;
  std::string updated_at;
  Fields fields;

  // Typed reads; a null or missing field gives the fallback.
  std::string text(std::string_view field, std::string_view fallback = {}) const;
  std::int64_t integer(std::string_view field, std::int64_t fallback = 0) const;
  bool flag(std::string_view field, bool fallback = false) const;
  TextList list(std::string_view field) const;
  bool is_null(std::string_view field) const;

  bool owned_by_config() const { return owner.rfind("config:", 0) == 0; }
  // The config file path for config-owned objects, else empty.
  std::string config_file() const { return owned_by_config() ? owner.substr(7) : std::string{}; }
};

// "machine 'name'" (for test failure messages and logs).
std::ostream& operator<<(std::ostream& os, const Object& obj);

// A new object of the kind with every field at its default.
Object make_default(Kind kind, std::string name = {});

// Checks field values against the descriptor: types, choices, bounds, required fields present.
// References are not checked here (that needs storage). Returns "" or "field: message".
std::string validate_fields(const Object& obj);

// Equality of the settable, non-state fields (used by config reconciliation).
bool same_declared_fields(const Object& a, const Object& b);

std::string_view to_string(FieldType t);

// Well-known values (spellings admins know; see docs/site-model.md).
namespace registration {
inline constexpr std::string_view unregistered = "Unregistered", initializing = "Initializing",
                                  registered = "Registered", agent_error = "AgentError";
}

}  // namespace common::model
