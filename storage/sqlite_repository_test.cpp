// Tests of storage::open_sqlite(): schema, generic CRUD over every kind, references, renames,
// transactions, group commit, and the refusal of files that are not (healthy, compatible)
// openbroker databases.
#include "common/clock.hpp"
#include "common/metrics.hpp"
#include "common/model.hpp"
#include "storage/repository.hpp"
#include "storage/sqlite/schema.hpp"
#include "storage/sqlite/sqlite_repository.hpp"

#include <doctest/doctest.h>
#include <sqlite3.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <iterator>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>

namespace fs = std::filesystem;
using namespace common::model;
using common::errc;
using storage::AuditEntry;
using storage::AuditQuery;
using storage::Change;
using storage::Query;
using storage::Repository;
using storage::Transaction;

namespace {

// A fresh directory under the system temp directory, removed with its contents at scope exit.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "openbroker-storage-test-XXXXXX").string();
    if (!mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

std::unique_ptr<Repository> open_repo(const std::string& path, common::Metrics* metrics = nullptr) {
  storage::SqliteOptions options;
  options.path = path;
  options.metrics = metrics;
  return storage::open_sqlite(options).value();
}

std::unique_ptr<Repository> memory_repo() { return open_repo(":memory:"); }

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::string& bytes, std::streamoff at = 0) {
  std::fstream out(path, std::ios::binary | std::ios::in | std::ios::out);
  if (!out) out.open(path, std::ios::binary | std::ios::out);
  out.seekp(at);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string random_bytes(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::string out(n, '\0');
  for (auto& c : out) c = static_cast<char>(gen() & 0xff);
  return out;
}

// Direct SQL on a database file, for inspecting and tampering with it from outside the broker.
class RawDb {
 public:
  explicit RawDb(const std::string& path) {
    if (sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE, nullptr) != SQLITE_OK)
      throw std::runtime_error("cannot open " + path);
  }
  ~RawDb() { sqlite3_close(db_); }
  RawDb(const RawDb&) = delete;
  RawDb& operator=(const RawDb&) = delete;

  void exec(const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      std::string msg = err ? err : "?";
      sqlite3_free(err);
      throw std::runtime_error(msg);
    }
  }
  // Rows of text columns for a query with one optional text parameter.
  std::vector<std::vector<std::string>> rows(const std::string& sql, const std::string* param = nullptr) {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr) != SQLITE_OK)
      throw std::runtime_error(sqlite3_errmsg(db_));
    if (param) sqlite3_bind_text(st, 1, param->c_str(), -1, SQLITE_TRANSIENT);
    std::vector<std::vector<std::string>> out;
    while (sqlite3_step(st) == SQLITE_ROW) {
      std::vector<std::string> row;
      for (int i = 0; i < sqlite3_column_count(st); ++i) {
        const auto* t = sqlite3_column_text(st, i);
        row.emplace_back(t ? reinterpret_cast<const char*>(t) : "");
      }
      out.push_back(std::move(row));
    }
    sqlite3_finalize(st);
    return out;
  }

 private:
  sqlite3* db_ = nullptr;
};

// Runs fn in a write transaction and requires success.
void write_ok(Repository& repo, const std::function<void(Transaction&)>& fn) {
  auto status = repo.write([&](Transaction& tx) -> common::Status {
    fn(tx);
    return {};
  });
  REQUIRE_MESSAGE(status.has_value(), (status ? std::string() : status.error().describe()));
}

void read_ok(Repository& repo, const std::function<void(Transaction&)>& fn) {
  auto status = repo.read([&](Transaction& tx) -> common::Status {
    fn(tx);
    return {};
  });
  REQUIRE(status.has_value());
}

Object create_ok(Transaction& tx, const Object& obj) {
  auto r = tx.create(obj);
  REQUIRE_MESSAGE(r.has_value(), (r ? std::string() : r.error().describe()));
  return *r;
}

Object machine(const std::string& name, const std::string& catalog, const std::string& group = {}) {
  Object m = make_default(Kind::machine, name);
  m.fields["catalog"] = catalog;
  if (!group.empty()) m.fields["delivery_group"] = group;
  return m;
}

// Every field set away from its default: the second choice, max, !default, a two-element list
// in non-sorted order, a timestamp; references name the objects in `names` (one per kind).
Object filled(Kind kind, const std::string& name, const std::map<Kind, std::string>& names, int variant = 0) {
  Object obj = make_default(kind, name);
  obj.owner = variant == 0 ? "api" : "config:/etc/openbroker/site.toml";
  for (const auto& f : spec(kind).fields) {
    const std::string key(f.name);
    const std::string suffix = variant == 0 ? "" : "-v" + std::to_string(variant);
    switch (f.type) {
      case FieldType::text:
        if (f.references)
          obj.fields[key] = names.at(*f.references);
        else if (!f.choices.empty())
          obj.fields[key] = std::string(f.choices[(1 + variant) % f.choices.size()]);
        else
          obj.fields[key] = key + "-value" + suffix + " 'quoted' \"x\"; --";
        break;
      case FieldType::integer: obj.fields[key] = (f.min < f.max ? f.max : std::int64_t{1234567}) - variant; break;
      case FieldType::boolean: obj.fields[key] = variant == 0 ? !std::get<bool>(f.default_value) : false; break;
      case FieldType::timestamp:
        obj.fields[key] = std::string(variant == 0 ? "2026-11-23T10:42:55.123Z" : "2027-01-02T03:04:05.000Z");
        break;
      case FieldType::text_list:
        if (f.references)
          obj.fields[key] = TextList{names.at(*f.references)};
        else
          obj.fields[key] = TextList{"zeta" + suffix, "alpha" + suffix, "mu" + suffix};
        break;
    }
  }
  return obj;
}

void check_same_fields(const Object& got, const Object& want) {
  CHECK(got.kind == want.kind);
  CHECK(got.name == want.name);
  CHECK(got.owner == want.owner);
  for (const auto& f : spec(want.kind).fields) {
    INFO("field " << f.name);
    REQUIRE(got.fields.contains(f.name));
    CHECK((got.fields.find(f.name)->second == want.fields.find(f.name)->second));
  }
  CHECK(got.fields.size() == spec(want.kind).fields.size());
}

common::Error write_error(Repository& repo, const std::function<common::Status(Transaction&)>& fn) {
  auto status = repo.write(fn);
  REQUIRE(!status.has_value());
  return status.error();
}

// A small site: catalog c1, delivery groups g1 and g2, machine m1 (c1, g1), application a1
// (g1, g2), rule r1 (g1).
void small_site(Repository& repo) {
  write_ok(repo, [](Transaction& tx) {
    create_ok(tx, make_default(Kind::catalog, "c1"));
    create_ok(tx, make_default(Kind::delivery_group, "g1"));
    create_ok(tx, make_default(Kind::delivery_group, "g2"));
    create_ok(tx, machine("m1", "c1", "g1"));
    Object app = make_default(Kind::application, "a1");
    app.fields["command_line_executable"] = std::string("notepad.exe");
    app.fields["delivery_groups"] = TextList{"g2", "g1"};
    create_ok(tx, app);
    Object rule = make_default(Kind::rule, "r1");
    rule.fields["rule_type"] = std::string("entitlement");
    rule.fields["delivery_group"] = std::string("g1");
    create_ok(tx, rule);
  });
}

}  // namespace

TEST_CASE("migrations create every table and the schema matches the descriptors") {
  TempDir dir;
  const std::string path = dir.file("broker.db");
  {
    auto repo = open_repo(path);
    CHECK(repo->schema().version == storage::current_schema_version());
    CHECK(repo->schema().supported == storage::current_schema_version());
    CHECK(repo->schema().path == path);
    repo->close();
  }
  RawDb raw(path);
  CHECK(raw.rows("PRAGMA journal_mode")[0][0] == "wal");
  CHECK(raw.rows("SELECT max(version) FROM schema_version")[0][0] == std::to_string(storage::current_schema_version()));

  auto columns = [&](const std::string& table) {
    std::map<std::string, std::string> out;
    for (auto& row : raw.rows("SELECT name, type FROM pragma_table_info(?1)", &table)) out[row[0]] = row[1];
    return out;
  };
  // from column -> "table(to) ON UPDATE x ON DELETE y"
  auto keys = [&](const std::string& table) {
    std::map<std::string, std::string> out;
    for (auto& row :
         raw.rows("SELECT \"from\", \"table\", \"to\", on_update, on_delete FROM pragma_foreign_key_list(?1)", &table))
      out[row[0]] = row[1] + "(" + row[2] + ") ON UPDATE " + row[3] + " ON DELETE " + row[4];
    return out;
  };

  std::set<std::string> expected_tables{"schema_version", "audit_log", "logon_tickets", "sqlite_sequence"};
  for (const auto& kind : all_kinds()) {
    const std::string table(kind.table);
    INFO("kind " << kind.name);
    expected_tables.insert(table);
    std::map<std::string, std::string> want{
        {"id", "INTEGER"}, {"name", "TEXT"}, {"owner", "TEXT"}, {"created_at", "TEXT"}, {"updated_at", "TEXT"}};
    std::map<std::string, std::string> want_keys;
    for (const auto& f : kind.fields) {
      const std::string field(f.name);
      std::string ref_key;
      if (f.references)
        ref_key = std::string(spec(*f.references).table) + "(name) ON UPDATE CASCADE ON DELETE RESTRICT";
      if (f.type == FieldType::text_list) {
        const std::string child = std::string(kind.name) + "_" + field;
        INFO("list field " << field << " -> table " << child);
        expected_tables.insert(child);
        CHECK(columns(child) ==
              std::map<std::string, std::string>{{"owner_id", "INTEGER"}, {"position", "INTEGER"}, {"value", "TEXT"}});
        std::map<std::string, std::string> child_keys{
            {"owner_id", table + "(id) ON UPDATE NO ACTION ON DELETE CASCADE"}};
        if (f.references) child_keys["value"] = ref_key;
        CHECK(keys(child) == child_keys);
        continue;
      }
      want[field] = (f.type == FieldType::integer || f.type == FieldType::boolean) ? "INTEGER" : "TEXT";
      if (f.references) want_keys[field] = ref_key;
    }
    CHECK(columns(table) == want);
    CHECK(keys(table) == want_keys);
  }
  for (std::string name : {"machine_tags", "group_members", "application_delivery_groups", "rule_included_users",
                           "site_trusted_front_ends"})
    CHECK(expected_tables.contains(name));

  std::set<std::string> tables;
  for (auto& row : raw.rows("SELECT name FROM sqlite_master WHERE type = 'table'")) tables.insert(row[0]);
  CHECK(tables == expected_tables);

  CHECK(columns("audit_log") == std::map<std::string, std::string>{{"id", "INTEGER"},
                                                                   {"time", "TEXT"},
                                                                   {"actor", "TEXT"},
                                                                   {"action", "TEXT"},
                                                                   {"kind", "TEXT"},
                                                                   {"object", "TEXT"},
                                                                   {"before", "TEXT"},
                                                                   {"after", "TEXT"}});
  CHECK(columns("logon_tickets") == std::map<std::string, std::string>{{"id", "INTEGER"},
                                                                       {"ticket_hash", "TEXT"},
                                                                       {"machine", "TEXT"},
                                                                       {"user_name", "TEXT"},
                                                                       {"credential_type", "TEXT"},
                                                                       {"credential_data", "BLOB"},
                                                                       {"created_at", "TEXT"},
                                                                       {"expires_at", "TEXT"},
                                                                       {"redeemed_at", "TEXT"}});
  std::set<std::string> indexes;
  for (auto& row : raw.rows("SELECT name FROM sqlite_master WHERE type = 'index'")) indexes.insert(row[0]);
  CHECK(indexes.contains("audit_log_kind_object"));
}

TEST_CASE("migration versions are 1, 2, 3, ... and the newest is current") {
  int expected = 1;
  for (const auto& m : storage::sqlite::migrations()) CHECK(m.version == expected++);
  CHECK(storage::current_schema_version() == expected - 1);
}

TEST_CASE("every kind round-trips every field through create, get, list and update") {
  auto repo = memory_repo();
  std::map<Kind, std::string> names;
  std::map<Kind, Object> created;
  write_ok(*repo, [&](Transaction& tx) {
    for (const auto& kind : all_kinds()) {
      INFO("kind " << kind.name);
      const std::string name = kind.auto_name ? std::string() : std::string(kind.name) + "-1";
      Object want = filled(kind.kind, name, names);
      Object got = create_ok(tx, want);
      CHECK(got.id > 0);
      CHECK(!got.created_at.empty());
      CHECK(got.created_at == got.updated_at);
      common::SysTime t;
      CHECK(common::parse_time(got.created_at, t));
      if (kind.auto_name) {
        CHECK(got.name == std::to_string(got.id));
        want.name = got.name;
      }
      check_same_fields(got, want);
      names[kind.kind] = got.name;
      created[kind.kind] = got;
    }
  });
  read_ok(*repo, [&](Transaction& tx) {
    for (const auto& kind : all_kinds()) {
      INFO("kind " << kind.name);
      auto got = tx.get(kind.kind, names[kind.kind]);
      REQUIRE(got.has_value());
      const Object& want = created[kind.kind];
      check_same_fields(*got, want);
      CHECK(got->id == want.id);
      CHECK(got->created_at == want.created_at);
      CHECK(got->updated_at == want.updated_at);
      auto all = tx.list(kind.kind, {});
      REQUIRE(all.has_value());
      REQUIRE(all->size() == 1);
      check_same_fields(all->front(), want);
    }
  });
  // Update every kind to other values (same names, so references stay valid).
  write_ok(*repo, [&](Transaction& tx) {
    for (const auto& kind : all_kinds()) {
      INFO("kind " << kind.name);
      Object want = filled(kind.kind, names[kind.kind], names, 1);
      auto got = tx.update(names[kind.kind], want);
      REQUIRE_MESSAGE(got.has_value(), (got ? std::string() : got.error().describe()));
      check_same_fields(*got, want);
      CHECK(got->id == created[kind.kind].id);
      CHECK(got->created_at == created[kind.kind].created_at);
      auto again = tx.get(kind.kind, names[kind.kind]);
      REQUIRE(again.has_value());
      check_same_fields(*again, want);
    }
  });
}

TEST_CASE("defaults, nulls and empty references are stored as documented") {
  auto repo = memory_repo();
  write_ok(*repo, [](Transaction& tx) {
    create_ok(tx, make_default(Kind::catalog, "c1"));
    // Only the catalog given: every other field takes its default; "" reference -> null.
    Object m;
    m.kind = Kind::machine;
    m.name = "m1";
    m.fields["catalog"] = std::string("c1");
    m.fields["delivery_group"] = std::string("");
    m.fields["tags"] = std::monostate{};
    Object got = create_ok(tx, m);
    CHECK(got.is_null("delivery_group"));
    CHECK(got.list("tags").empty());
    CHECK(got.text("registration_state") == "Unregistered");
    CHECK(got.integer("load_index", -1) == 0);
    CHECK(got.is_null("dns_name"));
    auto read = tx.get(Kind::machine, "m1");
    REQUIRE(read.has_value());
    check_same_fields(*read, got);
    CHECK(std::holds_alternative<TextList>(read->fields.at("tags")));
  });
}

TEST_CASE("set_fields updates only the given columns; create_guarded claims only under its guard") {
  auto repo = memory_repo();
  std::vector<Change> seen;
  repo->set_commit_observer([&](const std::vector<Change>& c) { seen.insert(seen.end(), c.begin(), c.end()); });
  write_ok(*repo, [](Transaction& tx) {
    create_ok(tx, make_default(Kind::catalog, "c1"));
    Object m = machine("m1", "c1");
    m.fields["tags"] = TextList{"gpu"};
    m.fields["dns_name"] = std::string("m1.example");
    create_ok(tx, m);
  });
  seen.clear();
  write_ok(*repo, [](Transaction& tx) {
    auto r = tx.set_fields(Kind::machine, "m1", {{"last_connection_user", std::string("DEMO\\alice")}});
    REQUIRE(r.has_value());
    CHECK(r->text("last_connection_user") == "DEMO\\alice");
    CHECK(r->text("dns_name") == "m1.example");  // untouched
    CHECK(r->list("tags") == TextList{"gpu"});
    CHECK(tx.set_fields(Kind::machine, "nope", {{"dns_name", std::string("x")}}).error().code == errc::not_found);
    CHECK(tx.set_fields(Kind::machine, "m1", {{"tags", TextList{}}}).error().code == errc::invalid_argument);
    CHECK(tx.set_fields(Kind::machine, "m1", {{"load_index", std::string("x")}}).error().code == errc::invalid_argument);
    CHECK(tx.set_fields(Kind::machine, "m1", {{"no_such", std::string("x")}}).error().code == errc::invalid_argument);
  });
  REQUIRE(seen.size() == 1);  // the observer sees the object as stored
  CHECK(seen[0].object->text("last_connection_user") == "DEMO\\alice");

  write_ok(*repo, [](Transaction& tx) {
    Query live;
    live.equals.emplace_back("machine", "m1");
    live.not_equals.emplace_back("state", "LoggedOff");
    Object s1 = make_default(Kind::session, "S1");
    s1.fields["machine"] = std::string("m1");
    s1.fields["state"] = std::string("LoggedOff");
    create_ok(tx, s1);  // history does not count
    Object s2 = make_default(Kind::session, "S2");
    s2.fields["machine"] = std::string("m1");
    auto claimed = tx.create_guarded(s2, Kind::session, live, 1);
    REQUIRE(claimed.has_value());
    CHECK(claimed->has_value());
    Object s3 = make_default(Kind::session, "S3");
    s3.fields["machine"] = std::string("m1");
    auto refused = tx.create_guarded(s3, Kind::session, live, 1);
    REQUIRE(refused.has_value());
    CHECK_FALSE(refused->has_value());
    CHECK(tx.get(Kind::session, "S3").error().code == errc::not_found);
    auto more = tx.create_guarded(s3, Kind::session, live, 2);  // a second slot
    REQUIRE(more.has_value());
    CHECK(more->has_value());
    CHECK(*tx.count(Kind::session, live) == 2);
  });
}

TEST_CASE("list fields keep their order") {
  auto repo = memory_repo();
  write_ok(*repo, [](Transaction& tx) {
    Object g = make_default(Kind::group, "staff");
    g.fields["members"] = TextList{"zoe", "adam", "mike", "adam2", "bob"};
    create_ok(tx, g);
    Object g2 = make_default(Kind::group, "other");
    g2.fields["members"] = TextList{"x"};
    create_ok(tx, g2);
  });
  read_ok(*repo, [](Transaction& tx) {
    CHECK(tx.get(Kind::group, "staff")->list("members") == TextList{"zoe", "adam", "mike", "adam2", "bob"});
    auto all = tx.list(Kind::group, {});
    REQUIRE(all->size() == 2);
    CHECK((*all)[0].list("members") == TextList{"zoe", "adam", "mike", "adam2", "bob"});
    CHECK((*all)[1].list("members") == TextList{"x"});
  });
  write_ok(*repo, [](Transaction& tx) {
    Object g = *tx.get(Kind::group, "staff");
    g.fields["members"] = TextList{"bob", "zoe"};
    REQUIRE(tx.update("staff", g).has_value());
    CHECK(tx.get(Kind::group, "staff")->list("members") == TextList{"bob", "zoe"});
    g.fields["members"] = TextList{};
    REQUIRE(tx.update("staff", g).has_value());
    CHECK(tx.get(Kind::group, "staff")->list("members").empty());
    CHECK(tx.get(Kind::group, "other")->list("members") == TextList{"x"});
  });
}

TEST_CASE("list filters: scalars, booleans, integers, name, owner, list contains; count; paging") {
  auto repo = memory_repo();
  write_ok(*repo, [](Transaction& tx) {
    create_ok(tx, make_default(Kind::catalog, "c1"));
    create_ok(tx, make_default(Kind::catalog, "c2"));
    create_ok(tx, make_default(Kind::delivery_group, "g1"));
    for (int i = 0; i < 10; ++i) {
      Object m = machine("m" + std::to_string(i), i % 2 ? "c1" : "c2", i < 5 ? "g1" : "");
      m.fields["in_maintenance_mode"] = i % 3 == 0;
      m.fields["load_index"] = std::int64_t{i * 100};
      m.fields["tags"] = i % 4 == 0 ? TextList{"gpu", "fast"} : TextList{"fast"};
      if (i == 9) m.owner = "config:/etc/site.toml";
      create_ok(tx, m);
    }
  });
  auto names = [&](const Query& q) {
    std::vector<std::string> out;
    read_ok(*repo, [&](Transaction& tx) {
      auto r = tx.list(Kind::machine, q);
      REQUIRE_MESSAGE(r.has_value(), (r ? std::string() : r.error().describe()));
      for (const auto& o : *r) out.push_back(o.name);
    });
    return out;
  };
  auto count = [&](const Query& q) {
    std::int64_t n = -1;
    read_ok(*repo, [&](Transaction& tx) { n = tx.count(Kind::machine, q).value(); });
    return n;
  };
  using V = std::vector<std::string>;
  CHECK(names({}) == V{"m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "m9"});
  CHECK(names({{{"catalog", "c1"}}}) == V{"m1", "m3", "m5", "m7", "m9"});
  CHECK(names({{{"in_maintenance_mode", "true"}}}) == V{"m0", "m3", "m6", "m9"});
  CHECK(names({{{"in_maintenance_mode", "false"}, {"catalog", "c2"}}}) == V{"m2", "m4", "m8"});
  CHECK(names({{{"load_index", "300"}}}) == V{"m3"});
  CHECK(names({{{"tags", "gpu"}}}) == V{"m0", "m4", "m8"});
  CHECK(names({{{"tags", "fast"}, {"catalog", "c1"}}}) == V{"m1", "m3", "m5", "m7", "m9"});
  CHECK(names({{{"tags", "none"}}}).empty());
  CHECK(names({{{"name", "m4"}}}) == V{"m4"});
  CHECK(names({{{"owner", "config:/etc/site.toml"}}}) == V{"m9"});
  CHECK(names({{{"delivery_group", ""}}}) == V{"m5", "m6", "m7", "m8", "m9"});  // "" matches null
  CHECK(names({{{"registration_state", "Unregistered"}}}).size() == 10);

  Query page;
  page.offset = 2;
  page.limit = 3;
  CHECK(names(page) == V{"m2", "m3", "m4"});
  CHECK(count(page) == 10);  // count ignores offset and limit
  Query gpu_page{{{"tags", "gpu"}}, 1, 1};
  CHECK(names(gpu_page) == V{"m4"});
  CHECK(names(gpu_page).front() == "m4");
  CHECK(count(gpu_page) == 3);
  CHECK(count({{{"catalog", "c1"}, {"in_maintenance_mode", "true"}}}) == 2);

  read_ok(*repo, [](Transaction& tx) {
    auto unknown = tx.list(Kind::machine, {{{"colour", "red"}}});
    REQUIRE(!unknown);
    CHECK(unknown.error().code == errc::invalid_argument);
    CHECK(unknown.error().field == "colour");
    CHECK(unknown.error().message.find("colour") != std::string::npos);
    auto unknown_count = tx.count(Kind::machine, {{{"colour", "red"}}});
    REQUIRE(!unknown_count);
    CHECK(unknown_count.error().field == "colour");
    auto bad_bool = tx.list(Kind::machine, {{{"in_maintenance_mode", "yes"}}});
    REQUIRE(!bad_bool);
    CHECK(bad_bool.error().code == errc::invalid_argument);
    CHECK(bad_bool.error().field == "in_maintenance_mode");
    auto bad_int = tx.list(Kind::machine, {{{"load_index", "12x"}}});
    REQUIRE(!bad_int);
    CHECK(bad_int.error().field == "load_index");
    auto bad_page = tx.list(Kind::machine, {{}, -1, -1});
    REQUIRE(!bad_page);
    CHECK(bad_page.error().field == "offset");
    // Values are bound, never spliced into SQL.
    auto injection = tx.list(Kind::machine, {{{"name", "m1' OR '1'='1"}}});
    REQUIRE(injection.has_value());
    CHECK(injection->empty());
  });
}

TEST_CASE("duplicate names are a conflict, on create and on rename") {
  auto repo = memory_repo();
  small_site(*repo);
  auto e =
      write_error(*repo, [](Transaction& tx) { return tx.create(make_default(Kind::delivery_group, "g1")).error(); });
  CHECK(e.code == errc::conflict);
  CHECK(e.message == "a delivery group named 'g1' already exists");
  e = write_error(*repo, [](Transaction& tx) -> common::Status {
    auto r = tx.create(machine("m1", "c1"));
    if (r) return {};
    return r.error();
  });
  CHECK(e.code == errc::conflict);
  CHECK(e.message == "a machine named 'm1' already exists");
  e = write_error(*repo, [](Transaction& tx) -> common::Status {
    Object g = *tx.get(Kind::delivery_group, "g2");
    g.name = "g1";
    auto r = tx.update("g2", g);
    if (r) return {};
    return r.error();
  });
  CHECK(e.code == errc::conflict);
  CHECK(e.message == "a delivery group named 'g1' already exists");
  // The same name in another kind is fine.
  write_ok(*repo, [](Transaction& tx) { create_ok(tx, make_default(Kind::catalog, "g1")); });
}

TEST_CASE("names of users, groups, machines and the like are unique without regard to case") {
  auto repo = memory_repo();
  small_site(*repo);
  write_ok(*repo, [](Transaction& tx) {
    Object u = make_default(Kind::user, "DEMO\\alice");
    u.fields["domain"] = std::string("DEMO");
    create_ok(tx, u);
  });
  auto e = write_error(*repo, [](Transaction& tx) -> common::Status {
    Object u = make_default(Kind::user, "DEMO\\ALICE");
    u.fields["domain"] = std::string("DEMO");
    auto r = tx.create(u);
    if (r) return {};
    return r.error();
  });
  CHECK(e.code == errc::conflict);
  CHECK(e.message.find("a user named 'DEMO\\alice' already exists") == 0);
  e = write_error(*repo, [](Transaction& tx) -> common::Status {
    auto r = tx.create(machine("M1", "c1"));
    if (r) return {};
    return r.error();
  });
  CHECK(e.code == errc::conflict);
  CHECK(e.message.find("'m1'") != std::string::npos);
  // A rename into another object's name in another case is refused; a change of case of the
  // object's own name is fine.
  e = write_error(*repo, [](Transaction& tx) -> common::Status {
    Object g = *tx.get(Kind::delivery_group, "g2");
    g.name = "G1";
    auto r = tx.update("g2", g);
    if (r) return {};
    return r.error();
  });
  CHECK(e.code == errc::conflict);
  CHECK(e.message.find("'g1'") != std::string::npos);
  write_ok(*repo, [](Transaction& tx) {
    Object g = *tx.get(Kind::delivery_group, "g2");
    g.name = "G2";
    REQUIRE(tx.update("g2", g).has_value());
  });
  // Sessions are named by keys, which are compared exactly.
  write_ok(*repo, [](Transaction& tx) {
    Object s1 = make_default(Kind::session, "Sab");
    s1.fields["machine"] = std::string("m1");
    create_ok(tx, s1);
    Object s2 = make_default(Kind::session, "SAB");
    s2.fields["machine"] = std::string("m1");
    create_ok(tx, s2);
  });
}

TEST_CASE("migration 5: a database holding names that differ only in case is refused, naming them") {
  TempDir dir;
  const std::string path = dir.file("v4.db");
  auto as_version_4 = [&](bool clash) {
    std::filesystem::remove(path);
    { std::ofstream touch(path); }
    RawDb raw(path);
    for (const auto& m : storage::sqlite::migrations()) {
      if (m.version > 4) break;
      raw.exec(std::string(m.sql));
      raw.exec("INSERT INTO schema_version VALUES (" + std::to_string(m.version) + ", '2026-01-01T00:00:00.000Z', 'x')");
    }
    raw.exec("INSERT INTO users (name, owner, created_at, updated_at) VALUES ('DEMO\\alice', 'config', "
             "'2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')");
    raw.exec(std::string("INSERT INTO users (name, owner, created_at, updated_at) VALUES (") +
             (clash ? "'DEMO\\ALICE'" : "'DEMO\\bob'") + ", 'api', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')");
  };
  as_version_4(true);
  storage::SqliteOptions options;
  options.path = path;
  auto r = storage::open_sqlite(options);
  REQUIRE(!r);
  CHECK(r.error().code == errc::conflict);
  CHECK(r.error().message.find("migration 5") != std::string::npos);
  INFO(r.error().message);
  CHECK(r.error().message.find("users: 'DEMO\\") != std::string::npos);
  CHECK(r.error().message.find("'DEMO\\alice'") != std::string::npos);
  CHECK(r.error().message.find("'DEMO\\ALICE'") != std::string::npos);
  {
    RawDb raw(path);  // nothing was applied
    CHECK(raw.rows("SELECT max(version) FROM schema_version")[0][0] == "4");
  }
  as_version_4(false);
  auto repo = open_repo(path);
  CHECK(repo->schema().version == storage::current_schema_version());
}

TEST_CASE("a new database file and its WAL are private (0600) whatever the umask") {
  TempDir dir;
  const mode_t old = ::umask(022);
  storage::SqliteOptions options;
  options.path = dir.file("private.db");
  auto r = storage::open_sqlite(options);
  ::umask(old);
  REQUIRE(r.has_value());
  write_ok(**r, [](Transaction& tx) { create_ok(tx, make_default(Kind::catalog, "c1")); });
  auto mode = [](const std::string& p) {
    return static_cast<int>(std::filesystem::status(p).permissions() & std::filesystem::perms::all);
  };
  CHECK(mode(options.path) == 0600);
  REQUIRE(std::filesystem::exists(options.path + "-wal"));
  CHECK(mode(options.path + "-wal") == 0600);
  (*r)->close();

  options.path = dir.file("grouped.db");
  options.file_group = "no-such-group-openbroker";
  r = storage::open_sqlite(options);
  REQUIRE(!r);
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(!std::filesystem::exists(options.path));
  options.file_group = "root";
  r = storage::open_sqlite(options);
  REQUIRE(r.has_value());
  CHECK(mode(options.path) == 0640);
}

TEST_CASE("a logon ticket is redeemed once; a second redemption says so, until it expires") {
  auto repo = memory_repo();
  small_site(*repo);
  write_ok(*repo, [](Transaction& tx) {
    storage::LogonTicket t;
    t.ticket_hash = "h1";
    t.machine = "m1";
    t.user_name = "DEMO\\alice";
    t.credential_data = "secret";
    t.expires_at = "2026-01-01T00:10:00.000Z";
    REQUIRE(tx.put_logon_ticket(t).has_value());
  });
  write_ok(*repo, [](Transaction& tx) {
    auto t = tx.redeem_logon_ticket("h1", "m1", "2026-01-01T00:01:00.000Z");
    REQUIRE(t.has_value());
    CHECK(t->credential_data == "secret");
  });
  write_ok(*repo, [](Transaction& tx) {
    auto again = tx.redeem_logon_ticket("h1", "m1", "2026-01-01T00:02:00.000Z");
    REQUIRE(!again);
    CHECK(again.error().code == errc::not_found);
    CHECK(again.error().message == "already redeemed");
    CHECK(tx.purge_logon_tickets("2026-01-01T00:10:00.000Z").value() == 1);
    auto gone = tx.redeem_logon_ticket("h1", "m1", "2026-01-01T00:11:00.000Z");
    REQUIRE(!gone);
    CHECK(gone.error().message == "unknown ticket");
  });
}

TEST_CASE("a reference to a missing object is invalid_argument naming the field") {
  auto repo = memory_repo();
  small_site(*repo);
  auto e = write_error(*repo, [](Transaction& tx) -> common::Status {
    auto r = tx.create(machine("m2", "nope"));
    if (r) return {};
    return r.error();
  });
  CHECK(e.code == errc::invalid_argument);
  CHECK(e.field == "catalog");
  CHECK(e.describe() == "catalog: no catalog named 'nope'");

  e = write_error(*repo, [](Transaction& tx) -> common::Status {
    Object app = *tx.get(Kind::application, "a1");
    app.fields["delivery_groups"] = TextList{"g1", "missing-group"};
    auto r = tx.update("a1", app);
    if (r) return {};
    return r.error();
  });
  CHECK(e.code == errc::invalid_argument);
  CHECK(e.describe() == "delivery_groups: no delivery group named 'missing-group'");

  e = write_error(*repo, [](Transaction& tx) -> common::Status {
    auto r = tx.update("m1", machine("m1", "c1", "ghost"));
    if (r) return {};
    return r.error();
  });
  CHECK(e.describe() == "delivery_group: no delivery group named 'ghost'");

  read_ok(*repo, [](Transaction& tx) {
    CHECK(tx.get(Kind::application, "a1")->list("delivery_groups") == TextList{"g2", "g1"});
    CHECK(tx.get(Kind::machine, "m1")->text("delivery_group") == "g1");
    CHECK(tx.count(Kind::machine, {}).value() == 1);
  });
}

TEST_CASE("bad objects are invalid_argument naming the field") {
  auto repo = memory_repo();
  small_site(*repo);
  auto error_of = [&](Object obj) {
    return write_error(*repo, [&](Transaction& tx) -> common::Status {
      auto r = tx.create(obj);
      if (r) return {};
      return r.error();
    });
  };
  Object m = machine("m2", "c1");
  m.fields["load_index"] = std::string("high");
  auto e = error_of(m);
  CHECK(e.code == errc::invalid_argument);
  CHECK(e.field == "load_index");
  m = machine("m2", "c1");
  m.fields["colour"] = std::string("red");
  e = error_of(m);
  CHECK(e.code == errc::invalid_argument);
  CHECK(e.field == "colour");
  e = error_of(make_default(Kind::catalog, ""));
  CHECK(e.code == errc::invalid_argument);
  CHECK(e.field == "name");
}

TEST_CASE("get, update and remove of a missing object are not_found") {
  auto repo = memory_repo();
  read_ok(*repo, [](Transaction& tx) {
    auto r = tx.get(Kind::machine, "ghost");
    REQUIRE(!r);
    CHECK(r.error().code == errc::not_found);
    CHECK(r.error().message == "no machine named 'ghost'");
  });
  auto e = write_error(*repo, [](Transaction& tx) { return tx.remove(Kind::catalog, "ghost"); });
  CHECK(e.code == errc::not_found);
  e = write_error(*repo,
                  [](Transaction& tx) { return tx.update("ghost", make_default(Kind::catalog, "ghost")).error(); });
  CHECK(e.code == errc::not_found);
}

TEST_CASE("removing a referenced object is a conflict naming the referrer") {
  auto repo = memory_repo();
  small_site(*repo);
  auto e = write_error(*repo, [](Transaction& tx) { return tx.remove(Kind::delivery_group, "g1"); });
  CHECK(e.code == errc::conflict);
  CHECK(e.message == "delivery group 'g1' is still used by machine 'm1'");
  e = write_error(*repo, [](Transaction& tx) { return tx.remove(Kind::delivery_group, "g2"); });
  CHECK(e.message == "delivery group 'g2' is still used by application 'a1'");  // via the list table
  e = write_error(*repo, [](Transaction& tx) { return tx.remove(Kind::catalog, "c1"); });
  CHECK(e.message == "catalog 'c1' is still used by machine 'm1'");

  // Remove the referrers, then the groups go too; lists of removed objects go with them.
  write_ok(*repo, [](Transaction& tx) {
    REQUIRE(tx.remove(Kind::machine, "m1").has_value());
    auto still = tx.remove(Kind::delivery_group, "g1");
    REQUIRE(!still);
    CHECK(still.error().message == "delivery group 'g1' is still used by application 'a1'");
    REQUIRE(tx.remove(Kind::application, "a1").has_value());
    auto rule = tx.remove(Kind::delivery_group, "g1");
    REQUIRE(!rule);
    CHECK(rule.error().message == "delivery group 'g1' is still used by rule 'r1'");
    REQUIRE(tx.remove(Kind::rule, "r1").has_value());
    REQUIRE(tx.remove(Kind::delivery_group, "g1").has_value());
    REQUIRE(tx.remove(Kind::delivery_group, "g2").has_value());
    REQUIRE(tx.remove(Kind::catalog, "c1").has_value());
  });
  read_ok(*repo, [](Transaction& tx) {
    for (const auto& kind : all_kinds()) CHECK(tx.count(kind.kind, {}).value() == 0);
  });
}

TEST_CASE("a rename cascades to referencing columns and list elements") {
  TempDir dir;
  const std::string path = dir.file("rename.db");
  auto repo = open_repo(path);
  small_site(*repo);
  write_ok(*repo, [](Transaction& tx) {
    Object a = make_default(Kind::assignment);
    a.fields["machine"] = std::string("m1");
    a.fields["user"] = std::string("EXAMPLE\\alice");
    create_ok(tx, a);
    Object g = *tx.get(Kind::delivery_group, "g1");
    g.name = "group-one";
    auto renamed = tx.update("g1", g);
    REQUIRE(renamed.has_value());
    CHECK(renamed->name == "group-one");
    Object c = *tx.get(Kind::catalog, "c1");
    c.name = "catalog-one";
    REQUIRE(tx.update("c1", c).has_value());
    Object m = *tx.get(Kind::machine, "m1");
    m.name = "desk-01";
    REQUIRE(tx.update("m1", m).has_value());
  });
  read_ok(*repo, [](Transaction& tx) {
    auto m = tx.get(Kind::machine, "desk-01");
    REQUIRE(m.has_value());
    CHECK(m->text("delivery_group") == "group-one");
    CHECK(m->text("catalog") == "catalog-one");
    CHECK(tx.get(Kind::application, "a1")->list("delivery_groups") == TextList{"g2", "group-one"});
    CHECK(tx.get(Kind::rule, "r1")->text("delivery_group") == "group-one");
    auto assignments = tx.list(Kind::assignment, {});
    REQUIRE(assignments->size() == 1);
    CHECK(assignments->front().text("machine") == "desk-01");
    CHECK(tx.get(Kind::delivery_group, "g1").error().code == errc::not_found);
    CHECK(tx.list(Kind::machine, {{{"delivery_group", "group-one"}}})->size() == 1);
    CHECK(tx.list(Kind::application, {{{"delivery_groups", "group-one"}}})->size() == 1);
  });
  repo->close();
  // And in the file itself, for an admin reading it with sqlite3.
  RawDb raw(path);
  CHECK(raw.rows("SELECT value FROM application_delivery_groups ORDER BY position") ==
        std::vector<std::vector<std::string>>{{"g2"}, {"group-one"}});
  CHECK(raw.rows("PRAGMA foreign_key_check").empty());
}

TEST_CASE("migration 3: a version 2 database gains power time schemes, which keep their hourly lists") {
  TempDir dir;
  const std::string path = dir.file("v2.db");
  {  // A database as brokerd 2 left it: migrations 1 and 2, and a delivery group.
    { std::ofstream touch(path); }
    RawDb raw(path);
    for (const auto& m : storage::sqlite::migrations()) {
      if (m.version > 2) break;
      raw.exec(std::string(m.sql));
      raw.exec("INSERT INTO schema_version VALUES (" + std::to_string(m.version) + ", '2026-01-01T00:00:00.000Z', 'x')");
    }
    raw.exec("INSERT INTO delivery_groups (name, owner, created_at, updated_at, time_zone) "
             "VALUES ('g1', 'api', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z', 'Europe/London')");
  }
  auto repo = open_repo(path);  // migrates and checks the schema against the descriptors
  TextList peak(24, "false"), pool(24, "-1");
  for (std::size_t h = 7; h < 19; ++h) {
    peak[h] = "true";
    pool[h] = std::to_string(h);
  }
  write_ok(*repo, [&](Transaction& tx) {
    Object s = make_default(Kind::power_time_scheme, "week");
    s.fields["delivery_group"] = std::string("g1");
    s.fields["days_of_week"] = TextList{"Weekdays", "Saturday"};
    s.fields["peak_hours"] = peak;
    s.fields["pool_size"] = pool;
    create_ok(tx, s);
  });
  read_ok(*repo, [&](Transaction& tx) {
    auto s = tx.get(Kind::power_time_scheme, "week");
    REQUIRE(s.has_value());
    CHECK(s->list("days_of_week") == TextList{"Weekdays", "Saturday"});
    CHECK(s->list("peak_hours") == peak);
    CHECK(s->list("pool_size") == pool);
    CHECK(tx.list(Kind::power_time_scheme, {{{"delivery_group", "g1"}}})->size() == 1);
  });
  // Migration 4: libvirt credentials.
  write_ok(*repo, [&](Transaction& tx) {
    Object c = make_default(Kind::hypervisor_connection, "kvm");
    c.fields["driver"] = std::string("libvirt");
    c.fields["username"] = std::string("broker");
    c.fields["password_file"] = std::string("kvm.pw");
    create_ok(tx, c);
  });
  read_ok(*repo, [&](Transaction& tx) {
    CHECK(tx.get(Kind::hypervisor_connection, "kvm")->text("password_file") == "kvm.pw");
  });
  auto e = write_error(*repo, [](Transaction& tx) { return tx.remove(Kind::delivery_group, "g1"); });
  CHECK(e.code == errc::conflict);
  CHECK(e.message.find("is still used by power") != std::string::npos);
  write_ok(*repo, [](Transaction& tx) {
    Object g = *tx.get(Kind::delivery_group, "g1");
    g.name = "group-one";
    REQUIRE(tx.update("g1", g).has_value());
    CHECK(tx.get(Kind::power_time_scheme, "week")->text("delivery_group") == "group-one");
    REQUIRE(tx.remove(Kind::power_time_scheme, "week").has_value());
    REQUIRE(tx.remove(Kind::delivery_group, "group-one").has_value());
  });
  repo->close();
  RawDb raw(path);
  CHECK(raw.rows("SELECT max(version) FROM schema_version") ==
        std::vector<std::vector<std::string>>{{std::to_string(storage::current_schema_version())}});
  CHECK(raw.rows("SELECT count(*) FROM power_time_scheme_pool_size") == std::vector<std::vector<std::string>>{{"0"}});
}

TEST_CASE("a failed or throwing transaction leaves nothing behind") {
  auto repo = memory_repo();
  auto status = repo->write([](Transaction& tx) -> common::Status {
    create_ok(tx, make_default(Kind::catalog, "c1"));
    create_ok(tx, machine("m1", "c1"));
    REQUIRE(tx.append_audit({0, "", "broker", "create", "machine", "m1", "", "{}"}).has_value());
    return common::make_error(errc::invalid_argument, "changed my mind");
  });
  REQUIRE(!status);
  CHECK(status.error().message == "changed my mind");
  auto throwing = [](Transaction& tx) -> common::Status {
    create_ok(tx, make_default(Kind::catalog, "c2"));
    throw std::runtime_error("bug");
  };
  CHECK_THROWS_AS(repo->write(throwing), std::runtime_error);
  // A failing statement does not commit the statements before it.
  status = repo->write([](Transaction& tx) -> common::Status {
    create_ok(tx, make_default(Kind::catalog, "c3"));
    auto r = tx.create(machine("m3", "no-such-catalog"));
    if (!r) return r.error();
    return {};
  });
  REQUIRE(!status);
  CHECK(status.error().field == "catalog");
  read_ok(*repo, [](Transaction& tx) {
    CHECK(tx.count(Kind::catalog, {}).value() == 0);
    CHECK(tx.count(Kind::machine, {}).value() == 0);
    CHECK(tx.list_audit({}).value().empty());
  });
  // The repository is still usable afterwards.
  write_ok(*repo, [](Transaction& tx) { create_ok(tx, make_default(Kind::catalog, "c1")); });
  read_ok(*repo, [](Transaction& tx) { CHECK(tx.count(Kind::catalog, {}).value() == 1); });
}

TEST_CASE("auto-named kinds are named by their id, and ids are not reused") {
  auto repo = memory_repo();
  small_site(*repo);
  std::int64_t first = 0;
  write_ok(*repo, [&](Transaction& tx) {
    Object p = make_default(Kind::power_action);
    p.fields["machine"] = std::string("m1");
    Object a = create_ok(tx, p);
    Object b = create_ok(tx, p);
    CHECK(a.name == std::to_string(a.id));
    CHECK(b.name == std::to_string(b.id));
    CHECK(b.id > a.id);
    first = b.id;
    REQUIRE(tx.remove(Kind::power_action, b.name).has_value());
    Object c = create_ok(tx, p);
    CHECK(c.id > first);
    CHECK(c.name == std::to_string(c.id));
    CHECK(tx.get(Kind::power_action, c.name)->text("machine") == "m1");
    // A given name is kept.
    Object named = p;
    named.name = "manual";
    CHECK(create_ok(tx, named).name == "manual");
  });
}

TEST_CASE("update keeps id and created_at and may keep the name") {
  auto repo = memory_repo();
  small_site(*repo);
  write_ok(*repo, [](Transaction& tx) {
    Object before = *tx.get(Kind::machine, "m1");
    Object change = before;
    change.name.clear();  // empty: keep the current name
    change.fields["dns_name"] = std::string("m1.example.test");
    change.fields["tags"] = TextList{"b", "a"};
    Object after = *tx.update("m1", change);
    CHECK(after.name == "m1");
    CHECK(after.id == before.id);
    CHECK(after.created_at == before.created_at);
    CHECK(after.updated_at >= before.updated_at);
    CHECK(tx.get(Kind::machine, "m1")->text("dns_name") == "m1.example.test");
    CHECK(tx.get(Kind::machine, "m1")->list("tags") == TextList{"b", "a"});
  });
}

TEST_CASE("a file database keeps its data across close and reopen") {
  TempDir dir;
  const std::string path = dir.file("site.db");
  {
    auto repo = open_repo(path);
    small_site(*repo);
    write_ok(*repo, [](Transaction& tx) {
      REQUIRE(tx.append_audit({0, "", "token:admin", "create", "catalog", "c1", "", "{\"name\":\"c1\"}"}).has_value());
    });
    repo->close();
    CHECK(!fs::exists(path + "-wal"));  // checkpointed and closed
  }
  auto repo = open_repo(path);
  CHECK(repo->schema().version == storage::current_schema_version());
  read_ok(*repo, [](Transaction& tx) {
    CHECK(tx.get(Kind::machine, "m1")->text("catalog") == "c1");
    CHECK(tx.get(Kind::application, "a1")->list("delivery_groups") == TextList{"g2", "g1"});
    CHECK(tx.list_audit({}).value().size() == 1);
  });
  // Foreign keys are on after a reopen, too.
  auto e = write_error(*repo, [](Transaction& tx) { return tx.remove(Kind::catalog, "c1"); });
  CHECK(e.code == errc::conflict);
}

TEST_CASE("a database written by a newer version is refused and left alone") {
  TempDir dir;
  const std::string path = dir.file("newer.db");
  open_repo(path)->close();
  {
    RawDb raw(path);
    raw.exec(
        "INSERT INTO schema_version (version, applied_at, description) VALUES (7, '2030-01-01T00:00:00.000Z', 'x')");
  }
  const std::string before = read_bytes(path);
  storage::SqliteOptions options;
  options.path = path;
  auto r = storage::open_sqlite(options);
  REQUIRE(!r);
  CHECK(r.error().code == errc::incompatible);
  CHECK(r.error().message == "database " + path +
                                 " has schema version 7, written by a newer brokerd; this build supports up to " +
                                 std::to_string(storage::current_schema_version()));
  CHECK(read_bytes(path) == before);
}

TEST_CASE("a file that is not a SQLite database is refused and never modified") {
  TempDir dir;
  const std::string path = dir.file("garbage.db");
  const std::string garbage = random_bytes(8192, 42);
  write_bytes(path, garbage);
  storage::SqliteOptions options;
  options.path = path;
  auto r = storage::open_sqlite(options);
  REQUIRE(!r);
  CHECK(r.error().code == errc::storage_error);
  CHECK(r.error().message.find(path) != std::string::npos);
  CHECK(read_bytes(path) == garbage);
  CHECK(!fs::exists(path + "-wal"));
  CHECK(!fs::exists(path + "-shm"));

  // A short text file too.
  write_bytes(dir.file("notes.txt"), "hello\n");
  options.path = dir.file("notes.txt");
  r = storage::open_sqlite(options);
  REQUIRE(!r);
  CHECK(r.error().code == errc::storage_error);
  CHECK(read_bytes(options.path) == "hello\n");
}

TEST_CASE("a corrupt database is refused and never modified") {
  TempDir dir;
  const std::string path = dir.file("corrupt.db");
  {
    auto repo = open_repo(path);
    write_ok(*repo, [](Transaction& tx) {
      create_ok(tx, make_default(Kind::catalog, "c1"));
      for (int i = 0; i < 200; ++i) create_ok(tx, machine("m" + std::to_string(i), "c1"));
    });
    repo->close();
  }
  const auto size = fs::file_size(path);
  REQUIRE(size > 4 * 4096);
  // Overwrite pages 2 to 4 (the header page stays valid).
  write_bytes(path, random_bytes(3 * 4096, 7), 4096);
  const std::string before = read_bytes(path);
  storage::SqliteOptions options;
  options.path = path;
  auto r = storage::open_sqlite(options);
  REQUIRE(!r);
  CHECK(r.error().code == errc::storage_error);
  CHECK(r.error().message.find(path) != std::string::npos);
  CHECK(read_bytes(path) == before);
}

TEST_CASE("another application's SQLite database is refused and left alone") {
  TempDir dir;
  const std::string path = dir.file("other.db");
  {
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
    REQUIRE(sqlite3_exec(db, "CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('keep me')", nullptr, nullptr,
                         nullptr) == SQLITE_OK);
    sqlite3_close(db);
  }
  const std::string before = read_bytes(path);
  storage::SqliteOptions options;
  options.path = path;
  auto r = storage::open_sqlite(options);
  REQUIRE(!r);
  CHECK(r.error().code == errc::incompatible);
  CHECK(r.error().message.find("not an openbroker database") != std::string::npos);
  CHECK(read_bytes(path) == before);
}

TEST_CASE("a missing file is created, a missing directory is an error") {
  TempDir dir;
  storage::SqliteOptions options;
  options.path = dir.file("new.db");
  auto r = storage::open_sqlite(options);
  REQUIRE(r.has_value());
  (*r)->close();
  CHECK(fs::exists(options.path));

  options.path = dir.file("no-such-dir/new.db");
  r = storage::open_sqlite(options);
  REQUIRE(!r);
  CHECK(r.error().code == errc::storage_error);
  CHECK(r.error().message.find("no-such-dir") != std::string::npos);
  CHECK(r.error().message.find("does not exist") != std::string::npos);
  CHECK(!fs::exists(dir.file("no-such-dir")));

  // An empty file is a new database.
  write_bytes(dir.file("empty.db"), "");
  options.path = dir.file("empty.db");
  r = storage::open_sqlite(options);
  REQUIRE(r.has_value());
  CHECK((*r)->schema().version == storage::current_schema_version());

  options.path = "";
  r = storage::open_sqlite(options);
  REQUIRE(!r);
  CHECK(r.error().code == errc::invalid_argument);
}

TEST_CASE("audit entries are appended and listed newest first with filters") {
  auto repo = memory_repo();
  write_ok(*repo, [](Transaction& tx) {
    REQUIRE(tx.append_audit({0, "", "token:admin", "create", "catalog", "c1", "", R"({"name":"c1"})"}).has_value());
    REQUIRE(tx.append_audit(
                  {0, "2026-01-01T00:00:00.000Z", "config:/etc/site.toml", "reconcile", "machine", "m1", "{}", "{}"})
                .has_value());
    REQUIRE(tx.append_audit({0, "", "token:admin", "delete", "catalog", "c1", R"({"name":"c1"})", ""}).has_value());
    REQUIRE(tx.append_audit({0, "", "broker", "update", "machine", "m2", "{}", "{}"}).has_value());
  });
  read_ok(*repo, [](Transaction& tx) {
    auto all = tx.list_audit({});
    REQUIRE(all.has_value());
    REQUIRE(all->size() == 4);
    CHECK((*all)[0].object == "m2");
    CHECK((*all)[3].action == "create");
    CHECK((*all)[3].after == R"({"name":"c1"})");
    CHECK((*all)[3].before.empty());
    CHECK((*all)[0].id > (*all)[1].id);
    common::SysTime t;
    CHECK(common::parse_time((*all)[0].time, t));         // filled in
    CHECK((*all)[2].time == "2026-01-01T00:00:00.000Z");  // kept

    AuditQuery by_kind;
    by_kind.kind = "catalog";
    auto catalogs = tx.list_audit(by_kind).value();
    REQUIRE(catalogs.size() == 2);
    CHECK(catalogs[0].action == "delete");
    CHECK(catalogs[1].action == "create");
    AuditQuery by_object;
    by_object.kind = "machine";
    by_object.object = "m1";
    CHECK(tx.list_audit(by_object).value().size() == 1);
    AuditQuery by_actor;
    by_actor.actor = "token:admin";
    CHECK(tx.list_audit(by_actor).value().size() == 2);
    AuditQuery page;
    page.offset = 1;
    page.limit = 2;
    auto paged = tx.list_audit(page).value();
    REQUIRE(paged.size() == 2);
    CHECK(paged[0].action == "delete");
    CHECK(paged[1].action == "reconcile");
  });
}

TEST_CASE("misuse: writes in read(), nested calls, calls after close") {
  auto repo = memory_repo();
  auto status = repo->read([](Transaction& tx) -> common::Status {
    auto r = tx.create(make_default(Kind::catalog, "c1"));
    REQUIRE(!r);
    CHECK(r.error().code == errc::internal);
    return {};
  });
  CHECK(status.has_value());
  status = repo->write([&](Transaction&) -> common::Status {
    auto inner = repo->read([](Transaction&) -> common::Status { return {}; });
    REQUIRE(!inner);
    CHECK(inner.error().code == errc::internal);
    CHECK(!repo->ping());
    return {};
  });
  CHECK(status.has_value());
  CHECK(repo->ping().has_value());
  repo->close();
  repo->close();  // idempotent
  CHECK(repo->ping().error().code == errc::unavailable);
  CHECK(repo->write([](Transaction&) -> common::Status { return {}; }).error().code == errc::unavailable);
  CHECK(repo->read([](Transaction&) -> common::Status { return {}; }).error().code == errc::unavailable);
  CHECK(repo->schema().version == storage::current_schema_version());
}

TEST_CASE("commits are observed in the metrics when given") {
  common::Metrics metrics;
  auto repo = open_repo(":memory:", &metrics);
  write_ok(*repo, [](Transaction& tx) { create_ok(tx, make_default(Kind::catalog, "c1")); });
  write_ok(*repo, [](Transaction& tx) { create_ok(tx, make_default(Kind::catalog, "c2")); });
  read_ok(*repo, [](Transaction& tx) { CHECK(tx.count(Kind::catalog, {}).value() == 2); });
  const std::string text = metrics.render();
  CHECK(text.find("# TYPE broker_storage_commit_seconds histogram") != std::string::npos);
  CHECK(text.find("broker_storage_commit_seconds_count 2") != std::string::npos);
}

TEST_CASE("transactions from several threads are serialised") {
  TempDir dir;
  auto repo = open_repo(dir.file("threads.db"));
  write_ok(*repo, [](Transaction& tx) { create_ok(tx, make_default(Kind::catalog, "c1")); });
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 25; ++i) {
        auto status = repo->write([&](Transaction& tx) -> common::Status {
          auto n = tx.count(Kind::machine, {});
          if (!n) return n.error();
          auto r = tx.create(machine("t" + std::to_string(t) + "-" + std::to_string(i), "c1"));
          if (!r) return r.error();
          auto after = tx.count(Kind::machine, {});
          if (!after) return after.error();
          if (*after != *n + 1) return common::make_error(errc::internal, "interleaved");
          return {};
        });
        if (!status) ++failures;
      }
    });
  for (auto& t : threads) t.join();
  CHECK(failures == 0);
  read_ok(*repo, [](Transaction& tx) { CHECK(tx.count(Kind::machine, {}).value() == 100); });

  // A second connection to the same file (another process, e.g. an admin's sqlite3) sees it.
  auto other = open_repo(dir.file("threads.db"));
  read_ok(*other, [](Transaction& tx) { CHECK(tx.count(Kind::machine, {}).value() == 100); });
}

// --- group commit ------------------------------------------------------------------------------

namespace {

// The value of an unlabelled counter or gauge in the rendered metrics; 0 when absent.
double metric_value(const common::Metrics& metrics, const std::string& name) {
  const std::string text = "\n" + metrics.render();
  const auto pos = text.find("\n" + name + " ");
  if (pos == std::string::npos) return 0;
  return std::stod(text.substr(pos + name.size() + 2));
}

// Polls `done` until it holds; fails the test (instead of hanging) after a minute.
void wait_until(const std::function<bool()>& done) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::minutes(1);
  while (!done()) {
    if (std::chrono::steady_clock::now() > give_up) {
      FAIL_CHECK("condition not reached");
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// A write() that holds the connection until release(): while it runs, other writers queue up,
// and they are all taken into the next batch together. Creates catalog `name`.
class HeldWrite {
 public:
  HeldWrite(Repository& repo, std::string name) {
    auto entered = entered_.get_future();
    thread_ = std::thread([this, &repo, name = std::move(name)] {
      status_ = repo.write([&](Transaction& tx) -> common::Status {
        auto r = tx.create(make_default(Kind::catalog, name));
        entered_.set_value();
        release_.get_future().wait();
        if (!r) return r.error();
        return {};
      });
    });
    entered.wait();
  }
  ~HeldWrite() { join(); }
  HeldWrite(const HeldWrite&) = delete;
  HeldWrite& operator=(const HeldWrite&) = delete;

  // Lets the held write finish and waits for its write() to return.
  common::Status join() {
    if (!released_) {
      released_ = true;
      release_.set_value();
    }
    if (thread_.joinable()) thread_.join();
    return status_;
  }

 private:
  std::promise<void> entered_, release_;
  bool released_ = false;
  std::thread thread_;
  common::Status status_;
};

}  // namespace

TEST_CASE("group commit: many concurrent writers all commit, durably") {
  TempDir dir;
  const std::string path = dir.file("group.db");
  common::Metrics metrics;
  auto repo = open_repo(path, &metrics);
  write_ok(*repo, [](Transaction& tx) { create_ok(tx, make_default(Kind::catalog, "c1")); });
  constexpr int kThreads = 16;
  constexpr int kWrites = 20;
  std::atomic<int> failures{0};
  std::atomic<bool> writing{true};
  std::atomic<bool> reads_ok{true};
  // A reader alongside the writers: each snapshot sees every earlier commit, never fewer.
  std::thread reader([&] {
    std::int64_t last = 0;
    while (writing) {
      auto st = repo->read([&](Transaction& tx) -> common::Status {
        auto n = tx.count(Kind::machine, {});
        if (!n) return n.error();
        if (*n < last) reads_ok = false;
        last = *n;
        return {};
      });
      if (!st) reads_ok = false;
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < kWrites; ++i) {
        // Like a launch: a new row and an update of a shared one, in one write().
        auto st = repo->write([&](Transaction& tx) -> common::Status {
          auto m = tx.create(machine("t" + std::to_string(t) + "-" + std::to_string(i), "c1"));
          if (!m) return m.error();
          auto c = tx.get(Kind::catalog, "c1");
          if (!c) return c.error();
          if (auto u = tx.update("c1", *c); !u) return u.error();
          return {};
        });
        if (!st) ++failures;
      }
    });
  for (auto& t : threads) t.join();
  writing = false;
  reader.join();
  CHECK(failures == 0);
  CHECK(reads_ok);
  read_ok(*repo, [&](Transaction& tx) { CHECK(tx.count(Kind::machine, {}).value() == kThreads * kWrites); });
  // Every write() was served by exactly one committed batch; batches never exceed 64.
  const double batches = metric_value(metrics, "broker_storage_commit_batches_total");
  const double writes = metric_value(metrics, "broker_storage_commit_batch_writes_total");
  CHECK(writes == 1 + kThreads * kWrites);
  CHECK(batches >= writes / 64);
  CHECK(batches <= writes);
  CHECK(metric_value(metrics, "broker_storage_commit_seconds_count") == batches);
  CHECK(metrics.render().find("# TYPE broker_storage_commit_batches_total counter") != std::string::npos);

  repo->close();
  auto reopened = open_repo(path);
  read_ok(*reopened, [&](Transaction& tx) { CHECK(tx.count(Kind::machine, {}).value() == kThreads * kWrites); });
}

TEST_CASE("group commit: a failing or throwing write does not roll back its batch neighbours") {
  TempDir dir;
  const std::string path = dir.file("batch.db");
  common::Metrics metrics;
  auto repo = open_repo(path, &metrics);
  write_ok(*repo, [](Transaction& tx) { create_ok(tx, make_default(Kind::catalog, "c1")); });
  const double batches_before = metric_value(metrics, "broker_storage_commit_batches_total");
  const double writes_before = metric_value(metrics, "broker_storage_commit_batch_writes_total");

  // Six writers queue behind a held write; they form one batch, run by one leader thread.
  std::mutex ids_mutex;
  std::set<std::thread::id> runners;  // threads that ran the queued functions
  auto ran_here = [&] {
    std::lock_guard lock(ids_mutex);
    runners.insert(std::this_thread::get_id());
  };
  auto create = [&](const std::string& name) {
    return [&, name](Transaction& tx) -> common::Status {
      ran_here();
      auto r = tx.create(make_default(Kind::catalog, name));
      if (!r) return r.error();
      return {};
    };
  };
  std::map<std::string, std::function<common::Status(Transaction&)>> fns;
  fns["ok1"] = create("ok1");
  fns["ok2"] = create("ok2");
  // (No REQUIRE in these: they run on the leader's thread.)
  fns["fails"] = [&](Transaction& tx) -> common::Status {
    ran_here();
    if (auto r = tx.create(make_default(Kind::catalog, "fails")); !r) return r.error();
    return common::make_error(errc::invalid_argument, "changed my mind");
  };
  fns["throws"] = [&](Transaction& tx) -> common::Status {
    ran_here();
    if (auto r = tx.create(make_default(Kind::catalog, "throws")); !r) return r.error();
    throw std::runtime_error("bug in a batch");
  };
  fns["conflict"] = [&](Transaction& tx) -> common::Status {
    ran_here();
    if (auto r = tx.create(make_default(Kind::catalog, "conflict")); !r) return r.error();
    auto dup = tx.create(make_default(Kind::catalog, "held"));  // committed by the held write
    if (!dup) return dup.error();
    return {};
  };
  std::atomic<int> nested_read{0}, nested_write{0};
  fns["nested"] = [&](Transaction& tx) -> common::Status {
    ran_here();
    // Run by the leader's thread, the repository still sees it as inside a transaction.
    auto r = repo->read([](Transaction&) -> common::Status { return {}; });
    nested_read = r ? 0 : static_cast<int>(r.error().code);
    auto w = repo->write([](Transaction&) -> common::Status { return {}; });
    nested_write = w ? 0 : static_cast<int>(w.error().code);
    if (auto c = tx.create(make_default(Kind::catalog, "nested")); !c) return c.error();
    return {};
  };

  std::map<std::string, common::Status> results;
  std::string thrown;
  {
    HeldWrite held(*repo, "held");
    std::vector<std::thread> threads;
    std::mutex results_mutex;
    for (auto& [name, fn] : fns)
      threads.emplace_back([&, name = name] {
        common::Status st;
        try {
          st = repo->write(fns.at(name));
        } catch (const std::runtime_error& e) {
          std::lock_guard lock(results_mutex);
          thrown = name + ": " + e.what();
        }
        std::lock_guard lock(results_mutex);
        results[name] = st;
      });
    wait_until([&] { return storage::sqlite::write_queue_state(*repo).queued == fns.size(); });
    CHECK(held.join().has_value());
    for (auto& t : threads) t.join();
  }

  CHECK(results.at("ok1").has_value());
  CHECK(results.at("ok2").has_value());
  CHECK(results.at("nested").has_value());
  REQUIRE(!results.at("fails"));
  CHECK(results.at("fails").error().message == "changed my mind");
  REQUIRE(!results.at("conflict"));
  CHECK(results.at("conflict").error().code == errc::conflict);
  CHECK(thrown == "throws: bug in a batch");  // rethrown in the caller's thread
  CHECK(nested_read == static_cast<int>(errc::internal));
  CHECK(nested_write == static_cast<int>(errc::internal));
  CHECK(runners.size() == 1);  // one leader ran every function of the batch

  // The held write, then one batch of six (one COMMIT for all of them).
  CHECK(metric_value(metrics, "broker_storage_commit_batches_total") - batches_before == 2);
  CHECK(metric_value(metrics, "broker_storage_commit_batch_writes_total") - writes_before == 7);

  auto check_catalogs = [](Repository& r) {
    read_ok(r, [](Transaction& tx) {
      std::set<std::string> names;
      for (const auto& c : tx.list(Kind::catalog, {}).value()) names.insert(c.name);
      CHECK(names == std::set<std::string>{"c1", "held", "ok1", "ok2", "nested"});
    });
  };
  check_catalogs(*repo);
  repo->close();
  check_catalogs(*open_repo(path));
}

TEST_CASE("group commit: later functions of a batch see the earlier ones' writes") {
  auto repo = memory_repo();
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  {
    HeldWrite held(*repo, "c1");
    for (int i = 0; i < 8; ++i)
      threads.emplace_back([&, i] {
        // Each appends to the same catalog's description what it read there: every function sees
        // its predecessors' updates, so no update is lost.
        auto st = repo->write([&](Transaction& tx) -> common::Status {
          auto c = tx.get(Kind::catalog, "c1");
          if (!c) return c.error();
          c->fields["description"] = c->text("description") + std::to_string(i);
          if (auto u = tx.update("c1", *c); !u) return u.error();
          return {};
        });
        if (!st) ++failures;
      });
    wait_until([&] { return storage::sqlite::write_queue_state(*repo).queued == 8; });
    CHECK(held.join().has_value());
    for (auto& t : threads) t.join();
  }
  CHECK(failures == 0);
  read_ok(*repo, [](Transaction& tx) {
    auto description = tx.get(Kind::catalog, "c1").value().text("description");
    std::sort(description.begin(), description.end());
    CHECK(description == "01234567");
  });
}

TEST_CASE("group commit: close() fails the writers still queued, after the batch in progress") {
  TempDir dir;
  const std::string path = dir.file("close.db");
  auto repo = open_repo(path);
  std::vector<common::Status> results(3);
  std::vector<std::thread> threads;
  std::thread closer;
  common::Status held_status;
  {
    HeldWrite held(*repo, "held");
    for (std::size_t i = 0; i < results.size(); ++i)
      threads.emplace_back([&, i] {
        results[i] = repo->write([&](Transaction& tx) -> common::Status {
          auto r = tx.create(make_default(Kind::catalog, "queued-" + std::to_string(i)));
          if (!r) return r.error();
          return {};
        });
      });
    wait_until([&] { return storage::sqlite::write_queue_state(*repo).queued == results.size(); });
    closer = std::thread([&] { repo->close(); });
    wait_until([&] { return storage::sqlite::write_queue_state(*repo).closing; });
    // New calls fail at once, without waiting for the held write.
    CHECK(repo->write([](Transaction&) -> common::Status { return {}; }).error().code == errc::unavailable);
    CHECK(repo->read([](Transaction&) -> common::Status { return {}; }).error().code == errc::unavailable);
    held_status = held.join();
  }
  for (auto& t : threads) t.join();
  closer.join();
  CHECK(held_status.has_value());  // it was running: it commits
  for (const auto& st : results) {
    REQUIRE(!st);
    CHECK(st.error().code == errc::unavailable);
    CHECK(st.error().message == "storage is closed");
  }
  CHECK(storage::sqlite::write_queue_state(*repo).queued == 0);
  auto reopened = open_repo(path);
  read_ok(*reopened, [](Transaction& tx) {
    auto all = tx.list(Kind::catalog, {}).value();
    REQUIRE(all.size() == 1);
    CHECK(all[0].name == "held");
  });
}

TEST_CASE("the commit observer sees what each committed write changed, and nothing rolled back") {
  auto repo = memory_repo();
  std::mutex mutex;
  std::vector<std::vector<storage::Change>> seen;
  repo->set_commit_observer([&](const std::vector<storage::Change>& changes) {
    std::lock_guard lock(mutex);
    seen.push_back(changes);
  });
  small_site(*repo);
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].size() == 6);
  CHECK(seen[0][0].kind == Kind::catalog);
  CHECK(seen[0][0].name == "c1");
  REQUIRE(seen[0][0].object.has_value());
  CHECK(seen[0][3].name == "m1");
  CHECK(seen[0][3].object->text("delivery_group") == "g1");

  // An update (with a rename) and a removal; a failing write in between is not seen.
  write_ok(*repo, [](Transaction& tx) {
    Object m = *tx.get(Kind::machine, "m1");
    m.name = "m1-renamed";
    m.fields["registration_state"] = std::string("Registered");
    REQUIRE(tx.update("m1", m).has_value());
  });
  CHECK(write_error(*repo, [](Transaction& tx) -> common::Status {
          (void)tx.create(make_default(Kind::catalog, "doomed"));
          return common::make_error(errc::conflict, "no");
        }).code == errc::conflict);
  write_ok(*repo, [](Transaction& tx) { REQUIRE(tx.remove(Kind::rule, "r1").has_value()); });
  REQUIRE(seen.size() == 3);
  CHECK(seen[1][0].name == "m1-renamed");
  CHECK(seen[1][0].old_name == "m1");
  CHECK(seen[1][0].object->text("registration_state") == "Registered");
  CHECK(seen[2][0].kind == Kind::rule);
  CHECK_FALSE(seen[2][0].object.has_value());

  // Concurrent writers: every committed change is seen exactly once.
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i)
        write_ok(*repo, [&](Transaction& tx) {
          create_ok(tx, make_default(Kind::catalog, "c-" + std::to_string(t) + "-" + std::to_string(i)));
        });
    });
  for (auto& th : threads) th.join();
  std::set<std::string> created;
  for (std::size_t i = 3; i < seen.size(); ++i)
    for (const auto& c : seen[i]) created.insert(c.name);
  CHECK(created.size() == 160);
}

TEST_CASE("change_count counts the committed changes of each kind, with or without an observer") {
  auto repo = memory_repo();
  const auto count = [&](Kind k) { return repo->change_count(k).value(); };
  CHECK(count(Kind::user) == 0);
  write_ok(*repo, [](Transaction& tx) {
    create_ok(tx, make_default(Kind::user, "alice"));
    create_ok(tx, make_default(Kind::group, "staff"));
  });
  CHECK(count(Kind::user) == 1);
  CHECK(count(Kind::group) == 1);
  CHECK(count(Kind::catalog) == 0);
  // Rolled back: not counted. Reads: not counted.
  CHECK(write_error(*repo, [](Transaction& tx) -> common::Status {
          (void)tx.create(make_default(Kind::user, "doomed"));
          return common::make_error(errc::conflict, "no");
        }).code == errc::conflict);
  read_ok(*repo, [](Transaction& tx) { CHECK(tx.list(Kind::user, {}).value().size() == 1); });
  CHECK(count(Kind::user) == 1);
  write_ok(*repo, [](Transaction& tx) {
    Object u = *tx.get(Kind::user, "alice");
    u.fields["disabled"] = true;
    REQUIRE(tx.update("alice", u).has_value());
  });
  write_ok(*repo, [](Transaction& tx) { REQUIRE(tx.remove(Kind::group, "staff").has_value()); });
  CHECK(count(Kind::user) == 2);
  CHECK(count(Kind::group) == 2);
}
