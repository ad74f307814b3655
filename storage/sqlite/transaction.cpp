#include "storage/sqlite/transaction.hpp"

#include "common/clock.hpp"
#include "storage/sqlite/connection.hpp"
#include "storage/sqlite/schema.hpp"

#include <charconv>
#include <chrono>
#include <variant>

namespace storage::sqlite {
namespace {

using common::errc;
using common::Error;
using common::make_error;
using common::model::FieldSpec;
using common::model::FieldType;
using common::model::KindSpec;
using common::model::TextList;
using common::model::Value;

// Column order of every kind table's SELECT: the five common columns, then the scalar fields.
constexpr int kFirstFieldColumn = 5;

struct ListSql {
  const FieldSpec* field;
  std::string table;         // quoted child table
  std::string select_range;  // (owner_id, value) for owner ids in [?1, ?2], in list order
  std::string insert;        // (?1 owner_id, ?2 position, ?3 value)
  std::string clear;         // every element of owner ?1
};

// An object that may name an object of another kind, and the query for the first one that names
// ?1 (by id).
struct Referrer {
  const KindSpec* kind;
  std::string first_by_value;
};

// Everything SQL about one kind, built once from its descriptor.
struct KindSql {
  const KindSpec* spec = nullptr;
  std::string table;                      // quoted
  std::vector<const FieldSpec*> columns;  // scalar fields, in column order
  std::vector<ListSql> lists;
  std::string select;   // "SELECT <all columns> FROM t"
  std::string insert;   // ?1 id (NULL: assign), ?2 name, ?3 owner, ?4 created_at, ?5 updated_at, ?6.. fields
  std::string update;   // ?1 id, ?2 name, ?3 owner, ?4 updated_at, ?5.. fields
  std::string find;     // id, created_at of the object named ?1
  std::string next_id;  // the id the next insert would get (?1: the unquoted table name)
  std::string remove;   // delete id ?1
  std::vector<Referrer> referrers;
};

std::vector<KindSql> build_kind_sql() {
  std::vector<KindSql> all;
  for (const auto& kind : common::model::all_kinds()) {
    KindSql k;
    k.spec = &kind;
    k.table = quote_identifier(kind.table);
    std::string cols = "id, name, owner, created_at, updated_at";
    std::string insert_cols = cols, insert_params = "?1, ?2, ?3, ?4, ?5";
    std::string update_set = "name = ?2, owner = ?3, updated_at = ?4";
    int insert_index = 6, update_index = 5;
    for (const auto& field : kind.fields) {
      if (field.type == FieldType::text_list) {
        const std::string child = quote_identifier(child_table(kind, field));
        k.lists.push_back(
            {&field, child,
             "SELECT owner_id, value FROM " + child + " WHERE owner_id BETWEEN ?1 AND ?2 ORDER BY owner_id, position",
             "INSERT INTO " + child + " (owner_id, position, value) VALUES (?1, ?2, ?3)",
             "DELETE FROM " + child + " WHERE owner_id = ?1"});
        continue;
      }
      const std::string column = quote_identifier(field.name);
      k.columns.push_back(&field);
      cols += ", " + column;
      insert_cols += ", " + column;
      insert_params += ", ?" + std::to_string(insert_index++);
      update_set += ", " + column + " = ?" + std::to_string(update_index++);
    }
    k.select = "SELECT " + cols + " FROM " + k.table;
    k.insert = "INSERT INTO " + k.table + " (" + insert_cols + ") VALUES (" + insert_params + ")";
    k.update = "UPDATE " + k.table + " SET " + update_set + " WHERE id = ?1";
    k.find = "SELECT id, created_at FROM " + k.table + " WHERE name = ?1";
    k.next_id =
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = ?1), 0), coalesce((SELECT max(id) "
        "FROM " +
        k.table + "), 0)) + 1";
    k.remove = "DELETE FROM " + k.table + " WHERE id = ?1";
    all.push_back(std::move(k));
  }
  // Referrers: every field (scalar or list) of any kind that references this kind.
  for (const auto& from : common::model::all_kinds())
    for (const auto& field : from.fields) {
      if (!field.references) continue;
      auto& target =
          all[static_cast<std::size_t>(&common::model::spec(*field.references) - common::model::all_kinds().data())];
      const std::string from_table = quote_identifier(from.table);
      if (field.type == FieldType::text_list)
        target.referrers.push_back({&from, "SELECT p.name FROM " + quote_identifier(child_table(from, field)) +
                                               " c JOIN " + from_table +
                                               " p ON p.id = c.owner_id WHERE c.value = ?1 ORDER BY p.id LIMIT 1"});
      else
        target.referrers.push_back({&from, "SELECT name FROM " + from_table + " WHERE " + quote_identifier(field.name) +
                                               " = ?1 ORDER BY id LIMIT 1"});
    }
  return all;
}

const KindSql& kind_sql(Kind kind) {
  static const std::vector<KindSql> all = build_kind_sql();
  const auto& spec = common::model::spec(kind);
  return all[static_cast<std::size_t>(&spec - common::model::all_kinds().data())];
}

// "delivery group" for delivery_group: the words admins read in messages.
std::string display_name(const KindSpec& kind) {
  std::string out(kind.name);
  for (char& c : out)
    if (c == '_') c = ' ';
  return out;
}

std::string with_article(const KindSpec& kind) {
  const std::string name = display_name(kind);
  const bool vowel = !name.empty() && (name[0] == 'a' || name[0] == 'e' || name[0] == 'i' || name[0] == 'o');
  return (vowel ? "an " : "a ") + name;
}

Error not_found(const KindSpec& kind, std::string_view name) {
  return Error(errc::not_found, "no " + display_name(kind) + " named '" + std::string(name) + "'");
}

std::string now_text() { return common::format_time(std::chrono::system_clock::now()); }

bool type_matches(FieldType type, const Value& v) {
  switch (type) {
    case FieldType::text:
    case FieldType::timestamp: return std::holds_alternative<std::string>(v);
    case FieldType::integer: return std::holds_alternative<std::int64_t>(v);
    case FieldType::boolean: return std::holds_alternative<bool>(v);
    case FieldType::text_list: return std::holds_alternative<TextList>(v);
  }
  return false;
}

// The storage form of `in` (see transaction.hpp), or invalid_argument naming the bad field.
common::Result<Object> normalise(const Object& in) {
  const KindSpec& kind = common::model::spec(in.kind);
  for (const auto& [key, value] : in.fields)
    if (!kind.field(key)) return Error(errc::invalid_argument, "is not a field of " + display_name(kind), key);
  Object out;
  out.kind = in.kind;
  out.id = in.id;
  out.name = in.name;
  out.owner = in.owner;
  for (const auto& field : kind.fields) {
    auto it = in.fields.find(field.name);
    Value value = it == in.fields.end() ? field.default_value : it->second;
    if (std::holds_alternative<std::monostate>(value)) {
      if (field.type == FieldType::text_list) value = TextList{};
    } else if (!type_matches(field.type, value)) {
      return Error(errc::invalid_argument, "must be a " + std::string(common::model::to_string(field.type)),
                   std::string(field.name));
    }
    if (field.references) {
      if (auto* s = std::get_if<std::string>(&value); s && s->empty()) value = std::monostate{};
    }
    out.fields.emplace(std::string(field.name), std::move(value));
  }
  return out;
}

void bind_value(Statement& st, int index, const Value& value) {
  if (auto* s = std::get_if<std::string>(&value))
    st.bind(index, std::string_view(*s));
  else if (auto* n = std::get_if<std::int64_t>(&value))
    st.bind(index, *n);
  else if (auto* b = std::get_if<bool>(&value))
    st.bind(index, std::int64_t{*b ? 1 : 0});
  else
    st.bind_null(index);
}

// `obj` is in storage form (normalise): every field of its kind is present.
void bind_fields(Statement& st, int first_index, const KindSql& k, const Object& obj) {
  int index = first_index;
  for (const FieldSpec* field : k.columns) bind_value(st, index++, obj.fields.find(field->name)->second);
}

Object read_row(const Statement& st, const KindSql& k) {
  Object obj;
  obj.kind = k.spec->kind;
  obj.id = st.column_int(0);
  obj.name = st.column_text(1);
  obj.owner = st.column_text(2);
  obj.created_at = st.column_text(3);
  obj.updated_at = st.column_text(4);
  int column = kFirstFieldColumn;
  for (const FieldSpec* field : k.columns) {
    Value value;
    if (!st.is_null(column)) {
      switch (field->type) {
        case FieldType::integer: value = st.column_int(column); break;
        case FieldType::boolean: value = st.column_int(column) != 0; break;
        default: value = st.column_text(column); break;
      }
    }
    obj.fields.emplace(std::string(field->name), std::move(value));
    ++column;
  }
  for (const auto& list : k.lists) obj.fields.emplace(std::string(list.field->name), TextList{});
  return obj;
}

// Fills the list fields of `objects` (sorted by id, as every query returns them): one range query
// per list field, merged by owner id.
common::Status load_lists(Connection& db, const KindSql& k, std::vector<Object>& objects) {
  if (objects.empty()) return {};
  for (const auto& list : k.lists) {
    auto st = db.prepare(list.select_range);
    if (!st) return st.error();
    st->bind(1, objects.front().id);
    st->bind(2, objects.back().id);
    std::size_t i = 0;
    const std::string key(list.field->name);
    for (;;) {
      auto row = st->step();
      if (!row) return row.error();
      if (!*row) break;
      const std::int64_t owner = st->column_int(0);
      while (i < objects.size() && objects[i].id < owner) ++i;
      if (i == objects.size()) break;
      if (objects[i].id == owner) std::get<TextList>(objects[i].fields[key]).push_back(st->column_text(1));
    }
  }
  return {};
}

common::Status write_lists(Connection& db, const KindSql& k, const Object& obj, bool clear_first) {
  for (const auto& list : k.lists) {
    if (clear_first) {
      auto st = db.prepare(list.clear);
      if (!st) return st.error();
      st->bind(1, obj.id);
      if (auto ok = st->run(); !ok) return ok;
    }
    const auto& values = std::get<TextList>(obj.fields.find(list.field->name)->second);
    std::int64_t position = 0;
    for (const auto& value : values) {
      auto st = db.prepare(list.insert);
      if (!st) return st.error();
      st->bind(1, obj.id);
      st->bind(2, position++);
      st->bind(3, std::string_view(value));
      if (auto ok = st->run(); !ok) return ok;
    }
  }
  return {};
}

struct Found {
  std::int64_t id = 0;
  std::string created_at;
};

// The object named `name`, if any.
common::Result<std::optional<Found>> find(Connection& db, const KindSql& k, std::string_view name) {
  auto st = db.prepare(k.find);
  if (!st) return st.error();
  st->bind(1, name);
  auto row = st->step();
  if (!row) return row.error();
  if (!*row) return std::optional<Found>{};
  return std::optional<Found>{Found{st->column_int(0), st->column_text(1)}};
}

// Every reference of `obj` names an existing object; else invalid_argument naming the field.
common::Status check_references(Connection& db, const Object& obj) {
  for (const auto& field : common::model::spec(obj.kind).fields) {
    if (!field.references) continue;
    const KindSql& target = kind_sql(*field.references);
    const Value& value = obj.fields.find(field.name)->second;
    std::vector<std::string_view> names;
    if (auto* s = std::get_if<std::string>(&value)) names.emplace_back(*s);
    if (auto* l = std::get_if<TextList>(&value)) names.assign(l->begin(), l->end());
    for (auto name : names) {
      auto found = find(db, target, name);
      if (!found) return found.error();
      if (!*found)
        return Error(errc::invalid_argument, "no " + display_name(*target.spec) + " named '" + std::string(name) + "'",
                     std::string(field.name));
    }
  }
  return {};
}

// `name` is free for an object of kind k (other than the one with id `self`): no object has it,
// and for kinds whose names are compared case-insensitively (names_ignore_case) none has it in
// another case. errc::conflict naming the object that holds it.
common::Status check_name_free(Connection& db, const KindSql& k, std::string_view name, std::int64_t self = 0) {
  if (names_ignore_case(*k.spec)) {
    auto st = db.prepare("SELECT name FROM " + k.table + " WHERE name = ?1 COLLATE NOCASE AND id <> ?2 LIMIT 1");
    if (!st) return st.error();
    st->bind(1, name);
    st->bind(2, self);
    auto row = st->step();
    if (!row) return row.error();
    if (!*row) return {};
    const std::string holder = st->column_text(0);
    if (holder == name)
      return Error(errc::conflict, with_article(*k.spec) + " named '" + holder + "' already exists");
    return Error(errc::conflict, with_article(*k.spec) + " named '" + holder + "' already exists ('" +
                                     std::string(name) + "' differs only in case; names are compared without case)");
  }
  auto found = find(db, k, name);
  if (!found) return found.error();
  if (*found) return Error(errc::conflict, with_article(*k.spec) + " named '" + std::string(name) + "' already exists");
  return {};
}

// A WHERE clause and its bound values for a Query; every value is a parameter.
struct Filter {
  std::string where;  // "" or " WHERE ..."
  std::vector<std::variant<std::string, std::int64_t>> values;
};

common::Result<Filter> build_filter(const KindSql& k, const Query& query) {
  Filter filter;
  std::string where;
  auto add = [&](const std::string& clause) { where += (where.empty() ? " WHERE " : " AND ") + clause; };
  auto param = [&] { return "?" + std::to_string(filter.values.size()); };
  for (const auto& [key, text] : query.equals) {
    if (key == "name" || key == "owner") {
      filter.values.emplace_back(text);
      add(quote_identifier(key) + " = " + param());
      continue;
    }
    const FieldSpec* field = k.spec->field(key);
    if (!field)
      return Error(errc::invalid_argument, display_name(*k.spec) + " has no field '" + key + "' to filter on", key);
    const std::string column = quote_identifier(field->name);
    switch (field->type) {
      case FieldType::text:
      case FieldType::timestamp:
        if (text.empty()) {
          add("(" + column + " IS NULL OR " + column + " = '')");
        } else {
          filter.values.emplace_back(text);
          add(column + " = " + param());
        }
        break;
      case FieldType::integer: {
        std::int64_t n = 0;
        const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
        if (ec != std::errc{} || end != text.data() + text.size() || text.empty())
          return Error(errc::invalid_argument, "'" + text + "' is not an integer", key);
        filter.values.emplace_back(n);
        add(column + " = " + param());
        break;
      }
      case FieldType::boolean:
        if (text != "true" && text != "false")
          return Error(errc::invalid_argument, "'" + text + "' is not true or false", key);
        filter.values.emplace_back(std::int64_t{text == "true" ? 1 : 0});
        add(column + " = " + param());
        break;
      case FieldType::text_list:
        filter.values.emplace_back(text);
        add("id IN (SELECT owner_id FROM " + quote_identifier(child_table(*k.spec, *field)) +
            " WHERE value = " + param() + ")");
        break;
    }
  }
  for (const auto& [key, text] : query.not_equals) {
    const FieldSpec* field = k.spec->field(key);
    if (!field || field->type == FieldType::text_list)
      return Error(errc::invalid_argument, display_name(*k.spec) + " has no scalar field '" + key + "' to filter on", key);
    const std::string column = quote_identifier(field->name);
    if (field->type == FieldType::integer || field->type == FieldType::boolean) {
      std::int64_t n = text == "true" ? 1 : 0;
      if (field->type == FieldType::integer) {
        const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
        if (ec != std::errc{} || end != text.data() + text.size() || text.empty())
          return Error(errc::invalid_argument, "'" + text + "' is not an integer", key);
      }
      filter.values.emplace_back(n);
    } else {
      filter.values.emplace_back(text);
    }
    add("(" + column + " IS NULL OR " + column + " <> " + param() + ")");
  }
  filter.where = std::move(where);
  return filter;
}

void bind_filter(Statement& st, const Filter& filter) {
  int index = 1;
  for (const auto& v : filter.values) {
    if (auto* s = std::get_if<std::string>(&v))
      st.bind(index++, std::string_view(*s));
    else
      st.bind(index++, std::get<std::int64_t>(v));
  }
}

common::Status check_page(std::int64_t offset, std::int64_t limit) {
  if (offset < 0) return Error(errc::invalid_argument, "must not be negative", "offset");
  if (limit < -1) return Error(errc::invalid_argument, "must be -1 (all) or more", "limit");
  return {};
}

}  // namespace

Status SqliteTransaction::usable(bool write) const {
  if (!active_) return Error(errc::internal, "transaction used after write()/read() returned");
  if (write && !writable_) return Error(errc::internal, "write inside a read transaction");
  return {};
}

Result<std::vector<Object>> SqliteTransaction::list(Kind kind, const Query& query) {
  if (auto ok = usable(false); !ok) return ok.error();
  if (auto ok = check_page(query.offset, query.limit); !ok) return ok.error();
  const KindSql& k = kind_sql(kind);
  auto filter = build_filter(k, query);
  if (!filter) return filter.error();
  const auto n = static_cast<int>(filter->values.size());
  auto st = db_.prepare(k.select + filter->where + " ORDER BY id LIMIT ?" + std::to_string(n + 1) + " OFFSET ?" +
                        std::to_string(n + 2));
  if (!st) return st.error();
  bind_filter(*st, *filter);
  st->bind(n + 1, query.limit);
  st->bind(n + 2, query.offset);
  std::vector<Object> out;
  for (;;) {
    auto row = st->step();
    if (!row) return row.error();
    if (!*row) break;
    out.push_back(read_row(*st, k));
  }
  if (auto ok = load_lists(db_, k, out); !ok) return ok.error();
  return out;
}

Result<std::int64_t> SqliteTransaction::count(Kind kind, const Query& query) {
  if (auto ok = usable(false); !ok) return ok.error();
  const KindSql& k = kind_sql(kind);
  auto filter = build_filter(k, query);
  if (!filter) return filter.error();
  auto st = db_.prepare("SELECT count(*) FROM " + k.table + filter->where);
  if (!st) return st.error();
  bind_filter(*st, *filter);
  auto row = st->step();
  if (!row) return row.error();
  return st->column_int(0);
}

Result<Object> SqliteTransaction::get(Kind kind, std::string_view name) {
  if (auto ok = usable(false); !ok) return ok.error();
  const KindSql& k = kind_sql(kind);
  std::vector<Object> one;
  {
    auto st = db_.prepare(k.select + " WHERE name = ?1");
    if (!st) return st.error();
    st->bind(1, name);
    auto row = st->step();
    if (!row) return row.error();
    if (!*row) return not_found(*k.spec, name);
    one.push_back(read_row(*st, k));
  }
  if (auto ok = load_lists(db_, k, one); !ok) return ok.error();
  return std::move(one.front());
}

Result<Object> SqliteTransaction::create(const Object& in) {
  if (auto ok = usable(true); !ok) return ok.error();
  auto obj = normalise(in);
  if (!obj) return obj.error();
  const KindSql& k = kind_sql(obj->kind);
  const bool assign_name = obj->name.empty() && k.spec->auto_name;
  if (obj->name.empty() && !assign_name) return Error(errc::invalid_argument, "is required", "name");
  if (!assign_name)
    if (auto ok = check_name_free(db_, k, obj->name); !ok) return ok.error();
  if (auto ok = check_references(db_, *obj); !ok) return ok.error();

  obj->id = 0;
  if (assign_name) {
    auto st = db_.prepare(k.next_id);
    if (!st) return st.error();
    st->bind(1, k.spec->table);
    auto row = st->step();
    if (!row) return row.error();
    obj->id = st->column_int(0);
    obj->name = std::to_string(obj->id);
    if (auto ok = check_name_free(db_, k, obj->name); !ok) return ok.error();
  }
  obj->created_at = obj->updated_at = now_text();
  {
    auto st = db_.prepare(k.insert);
    if (!st) return st.error();
    if (obj->id != 0) st->bind(1, obj->id);
    st->bind(2, std::string_view(obj->name));
    st->bind(3, std::string_view(obj->owner));
    st->bind(4, std::string_view(obj->created_at));
    st->bind(5, std::string_view(obj->updated_at));
    bind_fields(*st, 6, k, *obj);
    if (auto ok = st->run(); !ok) return ok.error();
  }
  obj->id = db_.last_insert_rowid();
  if (auto ok = write_lists(db_, k, *obj, false); !ok) return ok.error();
  if (changes_) changes_->push_back({obj->kind, obj->name, {}, *obj});
  return obj;
}

Result<Object> SqliteTransaction::update(std::string_view name, const Object& in) {
  if (auto ok = usable(true); !ok) return ok.error();
  auto obj = normalise(in);
  if (!obj) return obj.error();
  const KindSql& k = kind_sql(obj->kind);
  auto found = find(db_, k, name);
  if (!found) return found.error();
  if (!*found) return not_found(*k.spec, name);
  if (obj->name.empty()) obj->name = std::string(name);
  if (obj->name != name)
    if (auto ok = check_name_free(db_, k, obj->name, (*found)->id); !ok) return ok.error();
  if (auto ok = check_references(db_, *obj); !ok) return ok.error();

  obj->id = (*found)->id;
  obj->created_at = (*found)->created_at;
  obj->updated_at = now_text();
  {
    auto st = db_.prepare(k.update);
    if (!st) return st.error();
    st->bind(1, obj->id);
    st->bind(2, std::string_view(obj->name));
    st->bind(3, std::string_view(obj->owner));
    st->bind(4, std::string_view(obj->updated_at));
    bind_fields(*st, 5, k, *obj);
    if (auto ok = st->run(); !ok) return ok.error();
  }
  if (auto ok = write_lists(db_, k, *obj, true); !ok) return ok.error();
  if (changes_) changes_->push_back({obj->kind, obj->name, obj->name != name ? std::string(name) : std::string(), *obj});
  return obj;
}

Status SqliteTransaction::remove(Kind kind, std::string_view name) {
  if (auto ok = usable(true); !ok) return ok;
  const KindSql& k = kind_sql(kind);
  auto found = find(db_, k, name);
  if (!found) return found.error();
  if (!*found) return not_found(*k.spec, name);
  for (const auto& referrer : k.referrers) {
    auto st = db_.prepare(referrer.first_by_value);
    if (!st) return st.error();
    st->bind(1, name);
    auto row = st->step();
    if (!row) return row.error();
    if (*row)
      return Error(errc::conflict, display_name(*k.spec) + " '" + std::string(name) + "' is still used by " +
                                       display_name(*referrer.kind) + " '" + st->column_text(0) + "'");
  }
  auto st = db_.prepare(k.remove);
  if (!st) return st.error();
  st->bind(1, (*found)->id);
  if (auto ok = st->run(); !ok) return ok;
  if (changes_) changes_->push_back({kind, std::string(name), {}, std::nullopt});
  return {};
}

Result<Object> SqliteTransaction::set_fields(Kind kind, std::string_view name, const common::model::Fields& fields) {
  if (auto ok = usable(true); !ok) return ok.error();
  const KindSql& k = kind_sql(kind);
  std::string sql = "UPDATE " + k.table + " SET updated_at = ?2";
  int index = 3;
  for (const auto& [key, value] : fields) {
    const FieldSpec* field = k.spec->field(key);
    if (!field) return Error(errc::invalid_argument, "is not a field of " + display_name(*k.spec), key);
    if (field->type == FieldType::text_list) return Error(errc::invalid_argument, "is a list: update the object", key);
    if (!std::holds_alternative<std::monostate>(value) && !type_matches(field->type, value))
      return Error(errc::invalid_argument, "must be a " + std::string(common::model::to_string(field->type)), key);
    sql += ", " + quote_identifier(field->name) + " = ?" + std::to_string(index++);
  }
  sql += " WHERE name = ?1";
  {
    auto st = db_.prepare(sql);
    if (!st) return st.error();
    const auto now = now_text();
    st->bind(1, name);
    st->bind(2, std::string_view(now));
    index = 3;
    for (const auto& [key, value] : fields) bind_value(*st, index++, value);
    if (auto ok = st->run(); !ok) return ok.error();
  }
  if (db_.changes() == 0) return not_found(*k.spec, name);
  auto obj = get(kind, name);
  if (!obj) return obj.error();
  if (changes_) changes_->push_back({kind, obj->name, {}, *obj});
  return obj;
}

Result<std::optional<Object>> SqliteTransaction::create_guarded(const Object& obj, Kind guard_kind, const Query& guard,
                                                                std::int64_t below) {
  if (auto ok = usable(true); !ok) return ok.error();
  auto n = count(guard_kind, guard);
  if (!n) return n.error();
  if (*n >= below) return std::optional<Object>();
  auto created = create(obj);
  if (!created) return created.error();
  return std::optional<Object>(std::move(*created));
}

Status SqliteTransaction::put_logon_ticket(const LogonTicket& ticket) {
  if (auto ok = usable(true); !ok) return ok;
  if (ticket.ticket_hash.empty()) return make_error(errc::invalid_argument, "is required", "ticket_hash");
  if (ticket.expires_at.empty()) return make_error(errc::invalid_argument, "is required", "expires_at");
  {
    auto m = get(Kind::machine, ticket.machine);
    if (!m && m.error().code == errc::not_found)
      return make_error(errc::invalid_argument, "no machine named '" + ticket.machine + "'", "machine");
    if (!m) return m.error();
  }
  {
    auto dup = db_.prepare("SELECT 1 FROM logon_tickets WHERE ticket_hash = ?1");
    if (!dup) return dup.error();
    dup->bind(1, ticket.ticket_hash);
    auto row = dup->step();
    if (!row) return row.error();
    if (*row) return make_error(errc::conflict, "a logon ticket with that hash already exists");
  }
  auto st = db_.prepare(
      "INSERT INTO logon_tickets (ticket_hash, machine, user_name, credential_type, credential_data, created_at, "
      "expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)");
  if (!st) return st.error();
  st->bind(1, ticket.ticket_hash);
  st->bind(2, ticket.machine);
  st->bind(3, ticket.user_name);
  st->bind(4, ticket.credential_type);
  st->bind(5, ticket.credential_data);
  st->bind(6, ticket.created_at.empty() ? now_text() : ticket.created_at);
  st->bind(7, ticket.expires_at);
  return st->run();
}

Result<LogonTicket> SqliteTransaction::redeem_logon_ticket(std::string_view ticket_hash, std::string_view machine,
                                                           std::string_view now) {
  if (auto ok = usable(true); !ok) return ok.error();
  auto st = db_.prepare(
      "SELECT id, ticket_hash, machine, user_name, credential_type, credential_data, created_at, expires_at, "
      "coalesce(redeemed_at, '') FROM logon_tickets WHERE ticket_hash = ?1");
  if (!st) return st.error();
  st->bind(1, ticket_hash);
  auto row = st->step();
  if (!row) return row.error();
  if (!*row) return make_error(errc::not_found, "unknown ticket");
  const std::int64_t id = st->column_int(0);
  LogonTicket t;
  t.ticket_hash = st->column_text(1);
  t.machine = st->column_text(2);
  t.user_name = st->column_text(3);
  t.credential_type = st->column_text(4);
  t.credential_data = st->column_text(5);
  t.created_at = st->column_text(6);
  t.expires_at = st->column_text(7);
  const std::string redeemed_at = st->column_text(8);
  if (t.machine != machine) return make_error(errc::not_found, "issued for another machine");
  if (t.expires_at <= now) {
    auto del = db_.prepare("DELETE FROM logon_tickets WHERE id = ?1");
    if (!del) return del.error();
    del->bind(1, id);
    if (auto r = del->run(); !r) return r.error();
    return make_error(errc::not_found, redeemed_at.empty() ? "expired" : "already redeemed");
  }
  if (!redeemed_at.empty()) return make_error(errc::not_found, "already redeemed");
  // Kept (without its credentials) until it expires, so a second redemption is told apart.
  auto mark = db_.prepare("UPDATE logon_tickets SET redeemed_at = ?2, credential_data = '' WHERE id = ?1");
  if (!mark) return mark.error();
  mark->bind(1, id);
  mark->bind(2, now);
  if (auto r = mark->run(); !r) return r.error();
  return t;
}

Status SqliteTransaction::remove_logon_ticket(std::string_view ticket_hash) {
  if (auto ok = usable(true); !ok) return ok;
  auto st = db_.prepare("DELETE FROM logon_tickets WHERE ticket_hash = ?1");
  if (!st) return st.error();
  st->bind(1, ticket_hash);
  return st->run();
}

Result<std::int64_t> SqliteTransaction::purge_logon_tickets(std::string_view now) {
  if (auto ok = usable(true); !ok) return ok.error();
  auto st = db_.prepare("DELETE FROM logon_tickets WHERE expires_at <= ?1");
  if (!st) return st.error();
  st->bind(1, now);
  if (auto r = st->run(); !r) return r.error();
  return static_cast<std::int64_t>(db_.changes());
}

Status SqliteTransaction::append_audit(const AuditEntry& entry) {
  if (auto ok = usable(true); !ok) return ok;
  auto st = db_.prepare(
      "INSERT INTO audit_log (time, actor, action, kind, object, \"before\", \"after\") "
      "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)");
  if (!st) return st.error();
  st->bind(1, entry.time.empty() ? now_text() : entry.time);
  st->bind(2, entry.actor);
  st->bind(3, entry.action);
  st->bind(4, entry.kind);
  st->bind(5, entry.object);
  st->bind(6, entry.before);
  st->bind(7, entry.after);
  return st->run();
}

Result<std::vector<AuditEntry>> SqliteTransaction::list_audit(const AuditQuery& query) {
  if (auto ok = usable(false); !ok) return ok.error();
  if (auto ok = check_page(query.offset, query.limit); !ok) return ok.error();
  std::string sql = "SELECT id, time, actor, action, kind, object, \"before\", \"after\" FROM audit_log";
  std::vector<const std::string*> values;
  auto add = [&](const char* column, const std::string& value) {
    if (value.empty()) return;
    values.push_back(&value);
    sql += (values.size() == 1 ? " WHERE " : " AND ") + std::string(column) + " = ?" + std::to_string(values.size());
  };
  add("kind", query.kind);
  add("object", query.object);
  add("actor", query.actor);
  const auto n = static_cast<int>(values.size());
  sql += " ORDER BY id DESC LIMIT ?" + std::to_string(n + 1) + " OFFSET ?" + std::to_string(n + 2);
  auto st = db_.prepare(sql);
  if (!st) return st.error();
  for (int i = 0; i < n; ++i) st->bind(i + 1, std::string_view(*values[static_cast<std::size_t>(i)]));
  st->bind(n + 1, query.limit);
  st->bind(n + 2, query.offset);
  std::vector<AuditEntry> out;
  for (;;) {
    auto row = st->step();
    if (!row) return row.error();
    if (!*row) break;
    out.push_back({st->column_int(0), st->column_text(1), st->column_text(2), st->column_text(3), st->column_text(4),
                   st->column_text(5), st->column_text(6), st->column_text(7)});
  }
  return out;
}

}  // namespace storage::sqlite
