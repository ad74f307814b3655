// config/config.cpp: the TOML loader.
//
// toml++ parses the text; everything after that is ours: each table is read against the layout in
// docs/configuration.md (daemon, listeners, database, logging, admin) or against the site-model
// descriptors (common/model.hpp) for [site] and the [[<kind>]] arrays, then the objects are
// checked against each other. Every problem becomes a ConfigError with the line of the key it is
// about; all of them are collected, and a Config is returned only when there are none.
//
// toml++ is the only heavy include of the module and stays in this file.
#include "config/config.hpp"

#include "common/site_rules.hpp"

#include "common/address.hpp"

#include "common/crypto.hpp"

#include <toml++/toml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <system_error>
#include <utility>

namespace config {
namespace {

namespace fs = std::filesystem;
namespace model = common::model;
using model::FieldSpec;
using model::FieldType;
using model::Kind;
using model::KindSpec;
using model::Object;
using model::TextList;
using model::Value;

constexpr std::int64_t kMaxRangeCount = 10000;         // [[machine]] count = 1..10000
constexpr std::size_t kMaxObjects = 100000;            // all declared objects of one file
constexpr std::size_t kMaxFileBytes = 64 * 1024 * 1024;  // load_file refuses larger files

// ---------------------------------------------------------------------------------------------
// Small helpers

int line_of(const toml::node& n) { return static_cast<int>(n.source().begin.line); }

// A value from the file, made safe to print: control bytes escaped, long text cut.
std::string printable(std::string_view s) {
  constexpr std::size_t kMax = 120;
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (out.size() >= kMax) {
      out += "...";
      break;
    }
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

std::string in_quotes(std::string_view s) { return "'" + printable(s) + "'"; }

std::string_view type_name(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::table: return "a table";
    case toml::node_type::array: return "an array";
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a floating-point number";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::date: return "a date";
    case toml::node_type::time: return "a time";
    case toml::node_type::date_time: return "a date-time";
    default: return "nothing";
  }
}

// Optimal string alignment distance (a transposition costs 1), capped: anything further apart
// than `limit` comes back as limit + 1, so hostile long keys cost nothing.
std::size_t edit_distance(std::string_view a, std::string_view b, std::size_t limit = 2) {
  const std::size_t n = a.size(), m = b.size();
  if ((n > m ? n - m : m - n) > limit || n > 64 || m > 64) return limit + 1;
  std::vector<std::vector<std::size_t>> d(n + 1, std::vector<std::size_t>(m + 1));
  for (std::size_t i = 0; i <= n; ++i) d[i][0] = i;
  for (std::size_t j = 0; j <= m; ++j) d[0][j] = j;
  for (std::size_t i = 1; i <= n; ++i)
    for (std::size_t j = 1; j <= m; ++j) {
      const std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return std::min(d[n][m], limit + 1);
}

bool iequal(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
         });
}

// The closest candidate within edit distance 2 (a case-only difference counts as closest), or "".
std::string_view closest(std::string_view word, std::span<const std::string_view> candidates) {
  std::string_view best;
  std::size_t best_d = 3;
  for (auto c : candidates) {
    const std::size_t d = iequal(word, c) ? 0 : edit_distance(word, c);
    if (d < best_d && d < std::max<std::size_t>(word.size(), 2)) {
      best = c;
      best_d = d;
    }
  }
  return best;
}

std::string did_you_mean(std::string_view word, std::span<const std::string_view> candidates) {
  const auto best = closest(word, candidates);
  return best.empty() ? std::string{} : " (did you mean '" + std::string(best) + "'?)";
}

std::string join(std::span<const std::string_view> items) {
  std::string out;
  for (auto s : items) {
    if (!out.empty()) out += ", ";
    out += s;
  }
  return out;
}

bool is_lower_hex(std::string_view s, std::size_t size) {
  return s.size() == size &&
         std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

// "" when the file exists and can be opened for reading, else what is wrong.
std::string check_readable(const fs::path& p) {
  std::error_code ec;
  const auto st = fs::status(p, ec);
  if (!fs::exists(st)) {
    if (ec && ec != std::errc::no_such_file_or_directory && ec != std::errc::not_a_directory)
      return "cannot read file " + in_quotes(p.string()) + ": " + ec.message();
    return "file " + in_quotes(p.string()) + " does not exist";
  }
  if (!fs::is_regular_file(st)) return in_quotes(p.string()) + " is not a regular file";
  std::FILE* f = std::fopen(p.c_str(), "rb");
  if (!f) return "cannot read file " + in_quotes(p.string()) + ": " + std::strerror(errno);
  std::fclose(f);
  return {};
}

// The kinds a config file may declare ([[<kind>]] arrays): writable ones except the site itself.
bool declarable(const KindSpec& ks) { return ks.api_writable && ks.kind != Kind::site; }

// Checks one field value with the model's own rules: "" or the message (without "field: ").
std::string model_check(Kind kind, const FieldSpec& f, const Value& value) {
  Object probe;
  probe.kind = kind;
  probe.name = "probe";
  probe.fields[std::string(f.name)] = value;
  const std::string msg = model::validate_fields(probe);
  const std::string prefix = std::string(f.name) + ": ";
  return msg.rfind(prefix, 0) == 0 ? msg.substr(prefix.size()) : std::string{};
}

// The model's rules for an object name: "" or the message (without "name: ").
std::string model_check_name(Kind kind, const std::string& name) {
  Object probe;
  probe.kind = kind;
  probe.name = name;
  const std::string msg = model::validate_fields(probe);
  return msg.rfind("name: ", 0) == 0 ? msg.substr(6) : std::string{};
}

// ---------------------------------------------------------------------------------------------
// The loader

// One [[<kind>]] table (or [site]) as read. A machine range is one Declared with several names.
struct Declared {
  Object obj;                      // fields as read; obj.name is the name as written
  std::vector<std::string> names;  // the names it declares (expanded ranges); empty if unnamed
  std::string path;                // "machine[2]"
  int line = 0;                    // the table's line
  int name_line = 0;
  std::map<std::string, int, std::less<>> lines;  // key -> line
  std::set<std::string, std::less<>> bad;         // keys whose value was refused

  int key_line(std::string_view key) const {
    auto it = lines.find(key);
    return it == lines.end() || it->second == 0 ? line : it->second;
  }
  bool usable(std::string_view field) const { return !bad.contains(field) && !obj.is_null(field); }
};

class TableReader;

class Loader {
 public:
  Loader(std::string file, std::string config_path, fs::path base_dir)
      : file_(std::move(file)), base_dir_(std::move(base_dir)) {
    config_.path = std::move(config_path);
  }

  LoadResult run(std::string_view text);

  void error(int line, std::string key, std::string message) {
    errors_.push_back(ConfigError{file_, line, std::move(key), std::move(message)});
  }
  std::size_t error_count() const { return errors_.size(); }

 private:
  const toml::table* section(const toml::table& root, std::string_view name);
  void read_daemon(const toml::table& root);
  void read_listeners(const toml::table& root);
  // `client_certificates`: whether tls_client_ca is allowed (the agent listener only).
  void read_listener(const toml::table& t, const std::string& path, Listener& out, bool client_certificates);
  void read_database(const toml::table& root);
  void read_logging(const toml::table& root);
  void read_admin(const toml::table& root);
  void read_sta(const toml::table& root);
  void read_identity(const toml::table& root);
  void read_xml(const toml::table& root);
  void read_directory(const toml::table& root);
  // A file name key: resolved against the file's directory into `target` when the file can be
  // read, else an error. `omit_to`: what leaving the key out is for (in the message).
  void readable_file(TableReader& r, std::string_view k, std::string& target, std::string_view omit_to);
  void read_site(const toml::table& root);
  void read_objects(const toml::table& root);
  bool read_object(const KindSpec& ks, const toml::table& t, const std::string& path, Declared& d);
  void read_range(Declared& d, TableReader& r);
  void check_references();
  void check_rules_between_objects();
  std::string resolve(const std::string& p) const {
    const fs::path path(p);
    return (path.is_absolute() ? path : base_dir_ / path).lexically_normal().string();
  }
  const Declared* find(Kind kind, const std::string& name) const {
    auto k = index_.find(kind);
    if (k == index_.end()) return nullptr;
    auto it = k->second.find(name);
    return it == k->second.end() ? nullptr : it->second;
  }

  std::string file_;
  fs::path base_dir_;
  Config config_;
  std::vector<ConfigError> errors_;
  std::map<Kind, std::vector<Declared>> declared_;
  std::map<Kind, std::map<std::string, const Declared*>> index_;  // first declaration of each name
  std::size_t object_count_ = 0;
  struct PortUse {
    const Listener* listener;
    int line;
  };
  std::vector<PortUse> ports_;
};

// Reads the keys of one table. Every getter marks its key as known; finish() reports the rest as
// unknown, with a suggestion taken from `known`.
class TableReader {
 public:
  TableReader(Loader& loader, const toml::table& table, std::string path, std::vector<std::string_view> known)
      : loader_(loader), table_(table), path_(std::move(path)), known_(std::move(known)) {}

  std::string key(std::string_view k) const { return path_.empty() ? std::string(k) : path_ + "." + std::string(k); }
  int table_line() const { return line_of(table_); }
  bool has(std::string_view k) const { return table_.contains(k); }

  // The line of key k (its value's line when the key has none), or the table's line when absent.
  int line(std::string_view k) const {
    auto it = table_.find(k);
    if (it == table_.end()) return table_line();
    const int l = static_cast<int>(it->first.source().begin.line);
    return l ? l : line_of(it->second);
  }

  const toml::node* get(std::string_view k) {
    used_.insert(std::string(k));
    return table_.get(k);
  }

  std::optional<std::string> string(std::string_view k) {
    const toml::node* n = get(k);
    if (!n) return std::nullopt;
    if (auto* s = n->as_string()) return s->get();
    wrong_type(k, *n, "a string");
    return std::nullopt;
  }

  std::optional<std::int64_t> integer(std::string_view k, std::int64_t lo, std::int64_t hi) {
    const toml::node* n = get(k);
    if (!n) return std::nullopt;
    auto* v = n->as_integer();
    if (!v) {
      wrong_type(k, *n, "an integer");
      return std::nullopt;
    }
    if (v->get() < lo || v->get() > hi) {
      loader_.error(line(k), key(k),
                    "must be between " + std::to_string(lo) + " and " + std::to_string(hi) + ", not " +
                        std::to_string(v->get()));
      return std::nullopt;
    }
    return v->get();
  }

  std::optional<bool> boolean(std::string_view k) {
    const toml::node* n = get(k);
    if (!n) return std::nullopt;
    if (auto* b = n->as_boolean()) return b->get();
    wrong_type(k, *n, "a boolean (true or false)");
    return std::nullopt;
  }

  struct Item {
    std::string value;
    int line;
  };
  std::optional<std::vector<Item>> strings(std::string_view k) {
    const toml::node* n = get(k);
    if (!n) return std::nullopt;
    auto* a = n->as_array();
    if (!a) {
      wrong_type(k, *n, "an array of strings");
      return std::nullopt;
    }
    std::vector<Item> out;
    for (std::size_t i = 0; i < a->size(); ++i) {
      const toml::node& e = *a->get(i);
      auto* s = e.as_string();
      if (!s) {
        loader_.error(line_of(e) ? line_of(e) : line(k), key(k),
                      "must be an array of strings, but element " + std::to_string(i + 1) + " is " +
                          std::string(type_name(e)));
        return std::nullopt;
      }
      out.push_back({s->get(), line_of(e) ? line_of(e) : line(k)});
    }
    return out;
  }

  // Reports key k (when present) with a message of its own instead of "unknown key".
  void refuse(std::string_view k, const std::string& message) {
    if (!has(k)) return;
    used_.insert(std::string(k));
    loader_.error(line(k), key(k), message);
  }

  void finish() {
    for (auto&& [k, v] : table_) {
      if (used_.contains(k.str())) continue;
      if (std::find(known_.begin(), known_.end(), k.str()) != known_.end()) continue;
      const int l = k.source().begin.line ? static_cast<int>(k.source().begin.line) : line_of(v);
      loader_.error(l, key(printable(k.str())), "unknown key " + in_quotes(k.str()) + did_you_mean(k.str(), known_));
    }
  }

  void wrong_type(std::string_view k, const toml::node& n, std::string_view want) {
    loader_.error(line(k), key(k), "must be " + std::string(want) + ", not " + std::string(type_name(n)));
  }

 private:
  Loader& loader_;
  const toml::table& table_;
  std::string path_;
  std::vector<std::string_view> known_;
  std::set<std::string, std::less<>> used_;
};

const toml::table* Loader::section(const toml::table& root, std::string_view name) {
  const toml::node* n = root.get(name);
  if (!n) return nullptr;
  if (auto* t = n->as_table()) return t;
  error(line_of(*n), std::string(name), "must be a table ([" + std::string(name) + "]), not " + std::string(type_name(*n)));
  return nullptr;
}

void Loader::read_daemon(const toml::table& root) {
  const toml::table* t = section(root, "daemon");
  if (!t) return;
  TableReader r(*this, *t, "daemon", {"io_threads", "worker_threads", "shutdown_grace_seconds"});
  if (auto v = r.integer("io_threads", 1, 256)) config_.io_threads = static_cast<int>(*v);
  if (auto v = r.integer("worker_threads", 1, 256)) config_.worker_threads = static_cast<int>(*v);
  if (auto v = r.integer("shutdown_grace_seconds", 0, 3600)) config_.shutdown_grace_seconds = static_cast<int>(*v);
  r.finish();
}

void Loader::read_listeners(const toml::table& root) {
  const toml::table* t = section(root, "listeners");
  if (t) {
    TableReader r(*this, *t, "listeners", {"xml", "agent", "admin"});
    const std::pair<std::string_view, Listener*> all[] = {
        {"xml", &config_.xml}, {"agent", &config_.agent}, {"admin", &config_.admin}};
    for (auto [name, listener] : all) {
      const toml::node* n = r.get(name);
      if (!n) continue;
      if (auto* lt = n->as_table())
        read_listener(*lt, "listeners." + std::string(name), *listener, name == "agent");
      else
        r.wrong_type(name, *n, "a table ([listeners." + std::string(name) + "])");
    }
    r.finish();
  }
  // Two listeners on one port: the second one cannot bind.
  const std::pair<std::string_view, const Listener*> all[] = {
      {"listeners.xml", &config_.xml}, {"listeners.agent", &config_.agent}, {"listeners.admin", &config_.admin}};
  for (std::size_t i = 0; i < 3; ++i)
    for (std::size_t j = 0; j < i; ++j) {
      const Listener& a = *all[j].second;
      const Listener& b = *all[i].second;
      const auto wildcard = [](const std::string& s) { return s == "0.0.0.0" || s == "::"; };
      if (a.port == 0 || a.port != b.port) continue;
      if (a.address != b.address && !wildcard(a.address) && !wildcard(b.address)) continue;
      // Report it where the file sets the port (the later one when both do).
      int line_a = 0, line_b = 0;
      for (const auto& p : ports_) {
        if (p.listener == &a) line_a = p.line;
        if (p.listener == &b) line_b = p.line;
      }
      const bool at_b = line_b != 0 || line_a == 0;
      error(at_b ? line_b : line_a, std::string(all[at_b ? i : j].first) + ".port",
            "port " + std::to_string(b.port) + " is also used by " + std::string(all[at_b ? j : i].first));
    }
}

void Loader::read_listener(const toml::table& t, const std::string& path, Listener& out, bool client_certificates) {
  TableReader r(*this, t, path,
                {"address", "port", "tls_cert", "tls_key", "tls_client_ca", "header_limit_bytes", "body_limit_bytes",
                 "read_timeout_seconds", "idle_timeout_seconds", "first_request_timeout_seconds", "max_connections",
                 "max_connections_per_address"});
  if (auto v = r.string("address")) {
    if (common::is_ip_address(*v))
      out.address = *v;
    else
      error(r.line("address"), r.key("address"), in_quotes(*v) + " is not an IPv4 or IPv6 address");
  }
  if (auto v = r.integer("port", 0, 65535)) {
    out.port = static_cast<std::uint16_t>(*v);
    ports_.push_back({&out, r.line("port")});
  }
  readable_file(r, "tls_cert", out.tls_cert_file, "for plain HTTP");
  readable_file(r, "tls_key", out.tls_key_file, "for plain HTTP");
  if (r.has("tls_cert") != r.has("tls_key")) {
    const std::string_view given = r.has("tls_cert") ? "tls_cert" : "tls_key";
    const std::string_view missing = r.has("tls_cert") ? "tls_key" : "tls_cert";
    error(r.line(given), r.key(missing),
          "is required when " + std::string(given) + " is set (set both tls_cert and tls_key, or neither)");
  }
  // Mutual TLS (docs/cbp.md "Mutual TLS"): only agents can present a client certificate; front
  // ends, brokerctl and health checks cannot, so the other listeners refuse the key.
  if (r.has("tls_client_ca")) {
    r.get("tls_client_ca");  // known here, also when refused below
    if (!client_certificates) {
      error(r.line("tls_client_ca"), r.key("tls_client_ca"),
            "client certificates can only be required on [listeners.agent] (front ends, brokerctl and health "
            "checks do not present one)");
    } else if (!r.has("tls_cert") && !r.has("tls_key")) {  // one of them: reported above
      error(r.line("tls_client_ca"), r.key("tls_client_ca"),
            "needs tls_cert and tls_key: client certificates are only checked on a TLS listener");
    } else {
      readable_file(r, "tls_client_ca", out.tls_client_ca_file, "to accept agents without a client certificate");
    }
  }
  if (auto v = r.integer("header_limit_bytes", 1024, 1024 * 1024))
    out.header_limit_bytes = static_cast<std::size_t>(*v);
  if (auto v = r.integer("body_limit_bytes", 1024, std::int64_t{1} << 30))
    out.body_limit_bytes = static_cast<std::size_t>(*v);
  if (auto v = r.integer("read_timeout_seconds", 1, 3600)) out.read_timeout_seconds = static_cast<int>(*v);
  if (auto v = r.integer("idle_timeout_seconds", 1, 86400)) out.idle_timeout_seconds = static_cast<int>(*v);
  if (auto v = r.integer("first_request_timeout_seconds", 1, 3600))
    out.first_request_timeout_seconds = static_cast<int>(*v);
  // Connection caps (docs/configuration.md "Connection limits").
  if (auto v = r.integer("max_connections", 1, 10000000)) out.max_connections = static_cast<std::size_t>(*v);
  if (auto v = r.integer("max_connections_per_address", 1, 10000000))
    out.max_connections_per_address = static_cast<std::size_t>(*v);
  r.finish();
}

void Loader::read_database(const toml::table& root) {
  const toml::table* t = section(root, "database");
  if (!t) {
    if (!root.contains("database")) error(0, "database.path", "is required (add a [database] table with path = \"...\")");
    return;
  }
  TableReader r(*this, *t, "database", {"path", "busy_timeout_ms", "group"});
  if (auto v = r.string("path")) {
    if (v->empty() || v->find('\0') != std::string::npos)
      error(r.line("path"), r.key("path"), "must be a file name or \":memory:\"");
    else
      config_.database_path = *v == ":memory:" ? *v : resolve(*v);
  } else if (!r.has("path")) {
    error(r.table_line(), r.key("path"), "is required");
  }
  if (auto v = r.integer("busy_timeout_ms", 0, 600000)) config_.database_busy_timeout_ms = static_cast<int>(*v);
  if (auto v = r.string("group")) {
    if (v->empty() || v->find_first_of(std::string_view(":/\0 ", 4)) != std::string::npos)
      error(r.line("group"), r.key("group"), "must be the name of a system group");
    else
      config_.database_group = *v;
  }
  r.finish();
}

void Loader::read_logging(const toml::table& root) {
  const toml::table* t = section(root, "logging");
  if (!t) return;
  TableReader r(*this, *t, "logging", {"level", "format", "file"});
  if (auto v = r.string("level")) {
    static constexpr std::string_view kLevels[] = {"trace", "debug", "info", "warn", "error", "critical", "off"};
    if (common::valid_log_level(*v))
      config_.log.level = *v;
    else
      error(r.line("level"), r.key("level"), in_quotes(*v) + " is not one of " + join(kLevels) + did_you_mean(*v, kLevels));
  }
  if (auto v = r.string("format")) {
    static constexpr std::string_view kFormats[] = {"text", "json"};
    if (*v == "text" || *v == "json")
      config_.log.format = *v;
    else
      error(r.line("format"), r.key("format"), in_quotes(*v) + " is not one of text, json" + did_you_mean(*v, kFormats));
  }
  if (auto v = r.string("file")) {
    if (v->find('\0') != std::string::npos)
      error(r.line("file"), r.key("file"), "must be a file name");
    else
      config_.log.file = v->empty() ? std::string{} : resolve(*v);
  }
  r.finish();
}

void Loader::read_admin(const toml::table& root) {
  const toml::table* admin = section(root, "admin");
  if (admin) {
    TableReader r(*this, *admin, "admin", {"unauthenticated_paths", "token"});
    if (auto paths = r.strings("unauthenticated_paths")) {
      for (auto& p : *paths) {
        if (p.value.empty() || p.value[0] != '/' || p.value.find_first_of(std::string_view("\0 ?#", 4)) != std::string::npos)
          error(p.line, r.key("unauthenticated_paths"),
                in_quotes(p.value) + " is not a path (it must start with '/' and have no spaces, '?' or '#')");
        else
          config_.admin_unauthenticated_paths.push_back(std::move(p.value));
      }
    }
    if (const toml::node* n = r.get("token")) {
      const toml::array* tokens = n->as_array();
      if (!tokens) {
        r.wrong_type("token", *n, "an array of tables ([[admin.token]])");
      } else {
        std::map<std::string, int> seen;  // name -> line
        for (std::size_t i = 0; i < tokens->size(); ++i) {
          const toml::node& e = *tokens->get(i);
          const std::string path = "admin.token[" + std::to_string(i + 1) + "]";
          const toml::table* t = e.as_table();
          if (!t) {
            error(line_of(e), path, "must be a table ([[admin.token]]), not " + std::string(type_name(e)));
            continue;
          }
          TableReader tr(*this, *t, path, {"name", "sha256"});
          AdminToken token;
          bool ok = true;
          if (auto v = tr.string("name")) {
            const bool printable_name = !v->empty() && v->size() <= 100 &&
                                        std::none_of(v->begin(), v->end(), [](char c) {
                                          return static_cast<unsigned char>(c) < 0x21 || c == 0x7f;
                                        });
            if (!printable_name) {
              error(tr.line("name"), tr.key("name"), "must be 1 to 100 printable characters without spaces");
              ok = false;
            } else if (auto [it, inserted] = seen.emplace(*v, tr.line("name")); !inserted) {
              error(tr.line("name"), tr.key("name"),
                    "duplicate admin token name " + in_quotes(*v) + " (first at line " + std::to_string(it->second) + ")");
              ok = false;
            }
            token.name = *v;
          } else {
            if (!tr.has("name")) error(tr.table_line(), tr.key("name"), "is required");
            ok = false;
          }
          if (auto v = tr.string("sha256")) {
            if (!is_lower_hex(*v, 64)) {
              error(tr.line("sha256"), tr.key("sha256"),
                    "must be 64 lower-case hex digits: the SHA-256 of the token (brokerd --hash-token)");
              ok = false;
            }
            token.sha256 = *v;
          } else {
            if (!tr.has("sha256")) error(tr.table_line(), tr.key("sha256"), "is required");
            ok = false;
          }
          tr.refuse("token", "plain-text tokens are not accepted; use sha256 (brokerd --hash-token)");
          tr.finish();
          if (ok) config_.admin_tokens.push_back(std::move(token));
        }
        if (tokens->empty())
          error(r.line("token"), r.key("token"), "at least one [[admin.token]] is required: without one nobody can use the admin port");
      }
    }
    r.finish();
  }
  if (!admin || !admin->contains("token")) {
    error(admin ? line_of(*admin) : 0, "admin.token",
          "at least one [[admin.token]] is required: without one nobody can use the admin port");
  }
}

// Reads the fields of one site object. Returns false when the table had errors.
bool Loader::read_object(const KindSpec& ks, const toml::table& t, const std::string& path, Declared& d) {
  const std::size_t errors_before = error_count();
  std::vector<std::string_view> known;
  if (ks.kind != Kind::site) known.push_back("name");
  for (const auto& f : ks.fields) known.push_back(f.name);
  if (ks.kind == Kind::machine) known.push_back("count");
  TableReader r(*this, t, path, known);

  d.path = path;
  d.line = r.table_line();
  for (auto&& [k, v] : t) d.lines[std::string(k.str())] = r.line(k.str());

  std::string name = "site";
  if (ks.kind != Kind::site) {
    name.clear();
    d.name_line = r.line("name");
    if (auto v = r.string("name")) {
      name = *v;
      // A range's name is checked with {n} standing for a number.
      std::string probe = name;
      for (std::size_t at; (at = probe.find("{n}")) != std::string::npos;) probe.replace(at, 3, "1");
      if (auto problem = model_check_name(ks.kind, probe); !problem.empty()) error(d.name_line, r.key("name"), problem);
      if (ks.auto_name && name.empty()) error(d.name_line, r.key("name"), "must not be empty (omit it for the default)");
    } else if (!r.has("name") && !ks.auto_name) {
      error(d.line, r.key("name"), "is required");
    }
  }
  d.obj = model::make_default(ks.kind, name);
  d.obj.owner = "config:" + config_.path;

  for (const auto& f : ks.fields) {
    const std::string fname(f.name);
    if (!r.has(f.name)) continue;
    if (f.state) {
      r.refuse(f.name, "is maintained by the broker and cannot be set in the config file");
      d.bad.insert(fname);
      continue;
    }
    const int line = r.line(f.name);
    const std::size_t before = error_count();
    Value value;
    std::vector<TableReader::Item> items;
    switch (f.type) {
      case FieldType::text:
      case FieldType::timestamp:
        if (auto v = r.string(f.name)) value = *v;
        break;
      case FieldType::integer:
        if (const toml::node* n = r.get(f.name)) {
          if (auto* i = n->as_integer())
            value = i->get();
          else
            r.wrong_type(f.name, *n, "an integer");
        }
        break;
      case FieldType::boolean:
        if (auto v = r.boolean(f.name)) value = *v;
        break;
      case FieldType::text_list:
        if (auto v = r.strings(f.name)) {
          items = *v;
          TextList list;
          for (const auto& item : items) list.push_back(item.value);
          value = std::move(list);
        }
        break;
    }
    if (error_count() != before) {
      d.bad.insert(fname);
      continue;
    }
    std::string problem = model_check(ks.kind, f, value);
    if (!problem.empty() && !f.choices.empty())
      if (auto* s = std::get_if<std::string>(&value)) {
        problem = in_quotes(*s) + " is not one of " + join(f.choices) + did_you_mean(*s, f.choices);
      }
    if (auto* n = std::get_if<std::int64_t>(&value); n && problem.rfind("must be between", 0) == 0)
      problem += ", not " + std::to_string(*n);
    // Values the model cannot judge on its own.
    if (problem.empty()) {
      if (auto* s = std::get_if<std::string>(&value)) {
        if (ks.kind == Kind::catalog && f.name == "enrollment_key_hash" && !is_lower_hex(*s, 64))
          problem = "must be 64 lower-case hex digits: the SHA-256 of the enrollment key";
        else if (ks.kind == Kind::user && f.name == "password_hash" && !common::crypto::is_password_hash(*s))
          problem = "is not a password hash (\"pbkdf2-sha256$...\"); make one with brokerd --hash-password";
        else if (ks.kind == Kind::assignment && f.name == "client_ip" && !s->empty() && !common::is_ip_address(*s))
          problem = in_quotes(*s) + " is not an IPv4 or IPv6 address";
      }
      const bool address_list = (ks.kind == Kind::site && f.name == "trusted_front_ends") ||
                                 (ks.kind == Kind::rule && (f.name == "included_client_ips" || f.name == "excluded_client_ips"));
      if (address_list)
        for (const auto& item : items)
          if (!item.value.empty() && !common::is_ip_or_cidr(item.value))
            error(item.line, r.key(f.name), in_quotes(item.value) + " is not an IPv4 or IPv6 address or CIDR range");
    }
    if (!problem.empty()) error(line, r.key(f.name), problem);
    if (error_count() != before) {
      d.bad.insert(fname);
      continue;
    }
    d.obj.fields[fname] = std::move(value);
  }

  // Required fields (present but refused ones are reported already).
  for (const auto& f : ks.fields) {
    if (!f.required || f.state || d.bad.contains(f.name)) continue;
    const auto* s = std::get_if<std::string>(&d.obj.fields[std::string(f.name)]);
    if (d.obj.is_null(f.name) || (s && s->empty())) {
      error(r.has(f.name) ? r.line(f.name) : d.line, r.key(f.name), r.has(f.name) ? "must not be empty" : "is required");
      d.bad.insert(std::string(f.name));
    }
  }

  if (ks.kind == Kind::user)
    r.refuse("password", "plain-text passwords are not accepted; use password_hash (brokerd --hash-password)");
  if (ks.kind == Kind::catalog)
    r.refuse("enrollment_key",
             "plain-text enrollment keys are not accepted; use enrollment_key_hash (the SHA-256 hex of the key)");

  if (ks.kind == Kind::assignment) {
    const bool has_user = !d.obj.text("user").empty();
    const bool has_ip = !d.obj.text("client_ip").empty();
    if (has_user == has_ip && !d.bad.contains("user") && !d.bad.contains("client_ip"))
      error(d.line, path, has_user ? "set only one of user and client_ip" : "one of user and client_ip is required");
    else if (name.empty() && !r.has("name") && d.usable("machine"))
      d.obj.name = d.obj.text("machine") + ":" + (has_user ? d.obj.text("user") : d.obj.text("client_ip"));
  }

  if (ks.kind == Kind::machine) {
    read_range(d, r);
  } else if (!d.obj.name.empty() && ks.kind != Kind::site) {
    d.names.push_back(d.obj.name);
  }
  r.finish();

  if (error_count() != errors_before) return false;
  // Backstop: the model's own verdict on the whole object.
  Object check = d.obj;
  if (!d.names.empty()) check.name = d.names.front();
  if (auto problem = model::validate_fields(check); !problem.empty()) {
    const auto colon = problem.find(": ");
    const std::string field = colon == std::string::npos ? std::string{} : problem.substr(0, colon);
    error(field.empty() ? d.line : d.key_line(field), field.empty() ? path : path + "." + field,
          colon == std::string::npos ? problem : problem.substr(colon + 2));
    return false;
  }
  return true;
}

// A [[machine]] with count = N and "{n}" in its name declares N machines.
void Loader::read_range(Declared& d, TableReader& r) {
  const std::string& pattern = d.obj.name;
  const bool has_placeholder = pattern.find("{n}") != std::string::npos;
  std::optional<std::int64_t> count;
  if (r.has("count")) {
    count = r.integer("count", 1, kMaxRangeCount);
    if (!count) return;  // reported
    if (!has_placeholder && !pattern.empty()) {
      error(r.line("count"), r.key("count"), "needs a name containing {n} (e.g. \"pool-{n}\")");
      return;
    }
  } else if (has_placeholder) {
    error(d.name_line, r.key("name"), "contains {n} but count is not set");
    return;
  }
  if (pattern.empty()) return;
  if (!count) {
    if (object_count_ >= kMaxObjects) {
      error(d.line, d.path, "too many objects in one file (more than " + std::to_string(kMaxObjects) + ")");
      return;
    }
    ++object_count_;
    d.names.push_back(pattern);
    return;
  }
  if (object_count_ + static_cast<std::size_t>(*count) > kMaxObjects) {
    error(r.line("count"), r.key("count"), "too many objects in one file (more than " + std::to_string(kMaxObjects) + ")");
    return;
  }
  object_count_ += static_cast<std::size_t>(*count);
  const std::size_t width = std::to_string(*count).size();
  for (std::int64_t n = 1; n <= *count; ++n) {
    std::string digits = std::to_string(n);
    digits.insert(0, width - digits.size(), '0');
    std::string name = pattern;
    for (std::size_t at = 0; (at = name.find("{n}", at)) != std::string::npos; at += digits.size())
      name.replace(at, 3, digits);
    d.names.push_back(std::move(name));
  }
}

void Loader::read_sta(const toml::table& root) {
  const toml::table* t = section(root, "sta");
  if (!t) return;
  TableReader r(*this, *t, "sta",
                {"enabled", "authority_id", "ticket_lifetime_seconds", "allowed_clients", "max_tickets", "max_bytes",
                 "max_tickets_per_client", "max_bytes_per_client"});
  if (auto v = r.boolean("enabled")) config_.sta.enabled = *v;
  if (auto v = r.string("authority_id")) {
    // It travels in ICA files as ";40;<AuthorityID>;<Ticket>": letters and digits only.
    const bool ok = !v->empty() && v->size() <= 32 && std::all_of(v->begin(), v->end(), [](char c) {
      return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
    });
    if (ok)
      config_.sta.authority_id = *v;
    else
      error(r.line("authority_id"), r.key("authority_id"),
            in_quotes(*v) + " must be 1 to 32 ASCII letters and digits (e.g. \"STA0123456789AB\")");
  }
  if (auto v = r.integer("ticket_lifetime_seconds", 1, 3600))
    config_.sta.ticket_lifetime_seconds = static_cast<int>(*v);
  if (auto clients = r.strings("allowed_clients")) {
    config_.sta.allowed_clients.clear();
    if (clients->empty())
      error(r.line("allowed_clients"), r.key("allowed_clients"),
            "must not be empty: leave it out for the default (the trusted front ends and loopback), or say [\"any\"] "
            "to admit every client");
    for (auto& c : *clients) {
      if (c.value == "any" || c.value == "loopback" || c.value == "trusted_front_ends" || common::is_ip_or_cidr(c.value))
        config_.sta.allowed_clients.push_back(std::move(c.value));
      else
        error(c.line, r.key("allowed_clients"),
              in_quotes(c.value) +
                  " is not an IPv4 or IPv6 address or CIDR range, \"any\", \"loopback\" or \"trusted_front_ends\"");
    }
  }
  if (auto v = r.integer("max_tickets", 1, 10000000)) config_.sta.max_tickets = static_cast<int>(*v);
  if (auto v = r.integer("max_bytes", 65536, std::int64_t{1} << 40)) config_.sta.max_bytes = *v;
  if (auto v = r.integer("max_tickets_per_client", 1, 10000000)) config_.sta.max_tickets_per_client = static_cast<int>(*v);
  if (auto v = r.integer("max_bytes_per_client", 65536, std::int64_t{1} << 40)) config_.sta.max_bytes_per_client = *v;
  r.finish();
}

void Loader::read_identity(const toml::table& root) {
  const toml::table* t = section(root, "identity");
  if (!t) return;
  TableReader r(*this, *t, "identity",
                {"password_check_threads", "password_check_queue", "password_check_max_wait_ms"});
  if (auto v = r.integer("password_check_threads", 0, 256)) config_.identity.password_check_threads = static_cast<int>(*v);
  if (auto v = r.integer("password_check_queue", 1, 100000)) config_.identity.password_check_queue = static_cast<int>(*v);
  if (auto v = r.integer("password_check_max_wait_ms", 1, 600000))
    config_.identity.password_check_max_wait_ms = static_cast<int>(*v);
  r.finish();
}

void Loader::read_xml(const toml::table& root) {
  const toml::table* t = section(root, "xml");
  if (!t) return;
  TableReader r(*this, *t, "xml", {"failed_logons_per_minute"});
  if (auto v = r.integer("failed_logons_per_minute", 0, 1000000))
    config_.xml_service.failed_logons_per_minute = static_cast<int>(*v);
  r.finish();
}

void Loader::readable_file(TableReader& r, std::string_view k, std::string& target, std::string_view omit_to) {
  auto v = r.string(k);
  if (!v) return;
  if (v->empty() || v->find('\0') != std::string::npos) {
    error(r.line(k), r.key(k), "must be a file name (omit the key " + std::string(omit_to) + ")");
    return;
  }
  const std::string p = resolve(*v);
  if (auto problem = check_readable(p); !problem.empty())
    error(r.line(k), r.key(k), problem);
  else
    target = p;
}

void Loader::read_directory(const toml::table& root) {
  const toml::table* t = section(root, "directory");
  if (!t) return;
  Directory& d = config_.directory;
  const std::size_t errors_before = error_count();
  static constexpr std::string_view kAttributes[] = {
      "account_name", "upn",  "sid", "member_of", "member", "group_name", "display_name", "mail",
      "user_account_control", "pwd_last_set", "account_expires", "lockout_time"};
  TableReader r(*this, *t, "directory",
                {"backend", "profile", "servers", "start_tls", "ca_file", "verify_certificates", "bind_dn",
                 "bind_password_file", "base_dn", "domain", "user_filter", "group_filter", "group_lookup",
                 "attributes", "network_timeout_ms", "operation_timeout_ms", "pool_size", "cache_seconds",
                 "lockout_duration_seconds", "reconnect_max_seconds"});
  if (auto v = r.string("backend")) {
    if (*v == "builtin" || *v == "ldap")
      d.backend = *v;
    else
      error(r.line("backend"), r.key("backend"), in_quotes(*v) + " is not \"builtin\" or \"ldap\"");
  }
  if (auto v = r.string("profile")) {
    if (*v == "ad" || *v == "openldap")
      d.profile = *v;
    else
      error(r.line("profile"), r.key("profile"), in_quotes(*v) + " is not \"ad\" or \"openldap\"");
  }
  if (auto list = r.strings("servers")) {
    for (auto& s : *list) {
      std::string lower = s.value;
      std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
      const bool ok = (lower.rfind("ldap://", 0) == 0 && lower.size() > 7) || (lower.rfind("ldaps://", 0) == 0 && lower.size() > 8);
      if (!ok || s.value.find_first_of(" \t\n\r") != std::string::npos)
        error(s.line, r.key("servers"), in_quotes(s.value) + " is not an ldap:// or ldaps:// URI");
      else
        d.servers.push_back(std::move(s.value));
    }
  }
  if (auto v = r.boolean("start_tls")) d.start_tls = *v;
  if (auto v = r.boolean("verify_certificates")) d.verify_certificates = *v;
  readable_file(r, "ca_file", d.ca_file, "for the system's trust store");
  readable_file(r, "bind_password_file", d.bind_password_file, "for anonymous searches, with bind_dn");
  if (auto v = r.string("bind_dn")) d.bind_dn = *v;
  if (auto v = r.string("base_dn")) d.base_dn = *v;
  if (auto v = r.string("domain")) d.domain = *v;
  const auto filter = [&](std::string_view k, std::optional<std::string>& target) {
    auto v = r.string(k);
    if (!v) return;
    if (v->size() < 3 || v->front() != '(' || v->back() != ')')
      error(r.line(k), r.key(k), in_quotes(*v) + " is not an LDAP filter in parentheses, e.g. \"(objectClass=user)\"");
    else
      target = *v;
  };
  filter("user_filter", d.user_filter);
  filter("group_filter", d.group_filter);
  if (auto v = r.string("group_lookup")) {
    if (*v == "member_of" || *v == "member" || *v == "in_chain" || *v == "token_groups")
      d.group_lookup = *v;
    else
      error(r.line("group_lookup"), r.key("group_lookup"),
            in_quotes(*v) + " is not \"member_of\", \"member\", \"in_chain\" or \"token_groups\"");
  }
  if (const toml::node* n = r.get("attributes")) {
    if (const toml::table* at = n->as_table()) {
      TableReader ar(*this, *at, "directory.attributes", {std::begin(kAttributes), std::end(kAttributes)});
      for (auto k : kAttributes)
        if (auto v = ar.string(k)) {
          if (v->find_first_of(" ()=*\\,\0") != std::string::npos)
            error(ar.line(k), ar.key(k), in_quotes(*v) + " is not an attribute name");
          else
            d.attributes.emplace_back(std::string(k), *v);
        }
      ar.finish();
    } else {
      r.wrong_type("attributes", *n, "a table ([directory.attributes])");
    }
  }
  if (auto v = r.integer("network_timeout_ms", 100, 600000)) d.network_timeout_ms = static_cast<int>(*v);
  if (auto v = r.integer("operation_timeout_ms", 100, 600000)) d.operation_timeout_ms = static_cast<int>(*v);
  if (auto v = r.integer("pool_size", 1, 256)) d.pool_size = static_cast<int>(*v);
  if (auto v = r.integer("cache_seconds", 0, 86400)) d.cache_seconds = static_cast<int>(*v);
  if (auto v = r.integer("lockout_duration_seconds", 0, 86400 * 365)) d.lockout_duration_seconds = static_cast<int>(*v);
  if (auto v = r.integer("reconnect_max_seconds", 1, 3600)) d.reconnect_max_seconds = static_cast<int>(*v);
  r.refuse("bind_password",
           "the service account's password never goes in the config file: write it to a file only brokerd can read "
           "and name that file with bind_password_file");
  r.finish();
  if (d.backend == "ldap") {
    const auto required = [&](std::string_view k, bool present, const std::string& what) {
      if (!present) error(r.line(k), r.key(k), "is required for backend \"ldap\" (" + what + ")");
    };
    if (!r.has("servers") || (d.servers.empty() && error_count() == errors_before))
      error(r.line("servers"), r.key("servers"), "is required for backend \"ldap\" (one or more ldap:// or ldaps:// URIs)");
    required("base_dn", !d.base_dn.empty(), "where users and groups are searched");
    required("domain", !d.domain.empty(), "the NetBIOS domain name, e.g. \"CORP\"");
    if (!d.bind_dn.empty() && !r.has("bind_password_file"))
      error(r.line("bind_dn"), r.key("bind_password_file"),
            "is required with bind_dn (a file holding the service account's password; never the password itself)");
  }
}

void Loader::read_site(const toml::table& root) {
  const toml::table* t = section(root, "site");
  if (!t) return;
  Declared d;
  if (read_object(model::spec(Kind::site), *t, "site", d)) config_.site = std::move(d.obj);
}

void Loader::read_objects(const toml::table& root) {
  for (const auto& ks : model::all_kinds()) {
    if (!declarable(ks)) continue;
    const toml::node* n = root.get(ks.name);
    if (!n) continue;
    const std::string kind_name(ks.name);
    const toml::array* a = n->as_array();
    if (!a) {
      error(line_of(*n), kind_name, "must be an array of tables ([[" + kind_name + "]]), not " + std::string(type_name(*n)));
      continue;
    }
    auto& list = declared_[ks.kind];
    for (std::size_t i = 0; i < a->size(); ++i) {
      const toml::node& e = *a->get(i);
      const std::string path = kind_name + "[" + std::to_string(i + 1) + "]";
      const toml::table* t = e.as_table();
      if (!t) {
        error(line_of(e), path, "must be a table ([[" + kind_name + "]]), not " + std::string(type_name(e)));
        continue;
      }
      if (ks.kind != Kind::machine && object_count_ >= kMaxObjects) {
        error(line_of(e), path, "too many objects in one file (more than " + std::to_string(kMaxObjects) + ")");
        break;
      }
      if (ks.kind != Kind::machine) ++object_count_;
      Declared d;
      read_object(ks, *t, path, d);
      list.push_back(std::move(d));
    }
  }
  // Names are unique per kind.
  for (auto& [kind, list] : declared_) {
    auto& names = index_[kind];
    for (const auto& d : list)
      for (const auto& name : d.names) {
        auto [it, inserted] = names.emplace(name, &d);
        if (inserted) continue;
        const Declared& first = *it->second;
        const int first_line = first.name_line ? first.name_line : first.line;
        error(d.name_line ? d.name_line : d.line, d.path + ".name",
              "duplicate " + std::string(model::spec(kind).name) + " name " + in_quotes(name) + " (first at line " +
                  std::to_string(first_line) + ")");
      }
  }
}

// Every reference names an object of the referenced kind declared in this file.
void Loader::check_references() {
  for (const auto& [kind, list] : declared_) {
    const KindSpec& ks = model::spec(kind);
    for (const auto& d : list)
      for (const auto& f : ks.fields) {
        if (!f.references || f.state || !d.usable(f.name)) continue;
        const std::string target_kind(model::spec(*f.references).name);
        TextList targets = f.type == FieldType::text_list ? d.obj.list(f.name) : TextList{d.obj.text(f.name)};
        for (const auto& target : targets)
          if (!find(*f.references, target))
            error(d.key_line(f.name), d.path + "." + std::string(f.name),
                  "no " + target_kind + " named " + in_quotes(target) + " in this file");
      }
  }
}

void Loader::check_rules_between_objects() {
  // Machines: the catalog's session support must match the delivery group's.
  for (const auto& d : declared_[Kind::machine]) {
    if (!d.usable("catalog") || !d.usable("delivery_group")) continue;
    const Declared* cat = find(Kind::catalog, d.obj.text("catalog"));
    const Declared* group = find(Kind::delivery_group, d.obj.text("delivery_group"));
    if (!cat || !group || !cat->usable("session_support") || !group->usable("session_support")) continue;
    if (auto p = common::site_rules::machine_in_group(cat->obj, group->obj))
      error(d.key_line(p->field), d.path + "." + p->field, p->message);
  }
  // Delivery groups: Private groups deliver desktops or apps, not both.
  for (const auto& d : declared_[Kind::delivery_group]) {
    if (!d.usable("desktop_kind") || !d.usable("delivery_type")) continue;
    if (auto p = common::site_rules::delivery_group(d.obj)) error(d.key_line(p->field), d.path + "." + p->field, p->message);
  }
  // Power time schemes: the schemes of one delivery group must not share a day (site-model-reference 2.8).
  {
    // The single days first (bit 0 is Sunday), then the two sets.
    static constexpr std::pair<std::string_view, unsigned> kDays[] = {
        {"Monday", 1u << 1}, {"Tuesday", 1u << 2},  {"Wednesday", 1u << 3}, {"Thursday", 1u << 4},
        {"Friday", 1u << 5}, {"Saturday", 1u << 6}, {"Sunday", 1u << 0},    {"Weekdays", 0x3eu},
        {"Weekend", 0x41u}};
    const auto bits_of = [&](const TextList& days) {
      unsigned bits = 0;
      for (const auto& d : days)
        for (const auto& [name, b] : kDays)
          if (d == name) bits |= b;
      return bits;
    };
    std::map<std::string, std::vector<std::pair<const Declared*, unsigned>>> by_group;
    for (const auto& d : declared_[Kind::power_time_scheme]) {
      if (!d.usable("delivery_group") || !d.usable("days_of_week")) continue;
      const unsigned bits = bits_of(d.obj.list("days_of_week"));
      auto& seen = by_group[d.obj.text("delivery_group")];
      for (const auto& [other, other_bits] : seen) {
        const unsigned shared = bits & other_bits;
        if (!shared) continue;
        std::string days;
        for (std::size_t i = 0; i < 7; ++i)
          if (shared & kDays[i].second) days += (days.empty() ? "" : ", ") + std::string(kDays[i].first);
        error(d.key_line("days_of_week"), d.path + ".days_of_week",
              "shares " + days + " with power time scheme " + in_quotes(other->obj.name) + " (line " +
                  std::to_string(other->line) + "); the schemes of delivery group " +
                  in_quotes(d.obj.text("delivery_group")) + " must not overlap days");
        break;
      }
      seen.emplace_back(&d, bits);
    }
  }
  // Rules: each type fits only some delivery groups.
  for (const auto& d : declared_[Kind::rule]) {
    if (!d.usable("rule_type") || !d.usable("delivery_group")) continue;
    const Declared* group = find(Kind::delivery_group, d.obj.text("delivery_group"));
    if (!group || !group->usable("desktop_kind") || !group->usable("delivery_type")) continue;
    if (auto p = common::site_rules::rule_in_group(d.obj, group->obj))
      error(d.key_line(p->field), d.path + "." + p->field, p->message);
  }
}

// Where toml++ 3.3 (Debian's) would meet a non-ASCII character it classifies with a function that
// reaches __builtin_unreachable() for some of them (undefined behaviour, found by fuzz/config_fuzz;
// upstream issues 190 and 295; the inputs are in fuzz/corpus/config):
// - outside strings and comments, where TOML allows only ASCII anyway (bare keys are ASCII);
// - right after a backslash in a basic string, past the blanks and line breaks a line-ending
//   backslash trims (`"""\` then `é` on the next line is valid TOML, but toml++ asks whether `é`
//   is whitespace).
// Such a character is refused here, before toml++ sees the file. To know what is a string, the
// scan follows TOML's tokens as toml++ reads them: a quote starts a string only where a key or a
// value starts. Anywhere else it is part of a bare token, which toml++ reads to the next value
// terminator (blank, line break, `]`, `}`, `,`, `#`) asking of each character whether it is one:
// `c = -'27V07:é` is a bare value, and `é` in it is refused.
struct UnsafeText {
  int line = 0;  // 1-based; 0: none
  bool after_backslash = false;
};

UnsafeText unsafe_non_ascii(std::string_view text) {
  enum class Next { key, after_key, value, after_value };
  Next next = Next::key;
  std::string brackets;  // open `[` (arrays, table headers) and `{` (inline tables), innermost last
  int line = 1;
  std::size_t i = 0;
  const auto starts = [&](std::string_view what) { return text.substr(i, what.size()) == what; };
  const auto non_ascii = [&](std::size_t at) { return at < text.size() && static_cast<unsigned char>(text[at]) >= 0x80; };
  const auto blank = [](char c) { return c == ' ' || c == '\t' || c == '\r'; };
  const auto key_char = [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
  };
  // At a backslash of a basic string: is a non-ASCII character next (past the blanks and line
  // breaks a line-ending backslash trims, in a multi-line string)?
  const auto unsafe_escape = [&](bool multi_line) {
    std::size_t k = i + 1;
    while (multi_line && k < text.size() && (blank(text[k]) || text[k] == '\n')) ++k;
    return non_ascii(i + 1) || non_ascii(k);
  };
  while (i < text.size()) {
    const char c = text[i];
    const bool at_start = next == Next::key || next == Next::value;
    if (c == '\n') {
      ++line;
      ++i;
      if (brackets.empty()) next = Next::key;  // a line break inside an array keeps its place
    } else if (blank(c)) {
      ++i;
    } else if (c == '#') {  // a comment, to the end of the line
      while (i < text.size() && text[i] != '\n') ++i;
    } else if (at_start && (starts("\"\"\"") || starts("'''"))) {  // multi-line string
      const std::string_view close = text.substr(i, 3);
      const bool basic = close[0] == '"';
      for (i += 3; i < text.size() && !starts(close); ++i) {
        if (basic && text[i] == '\\') {
          if (unsafe_escape(true)) return {line, true};
          ++i;  // the escaped character (a quote, or the line break a line-ending backslash trims)
        }
        if (i < text.size() && text[i] == '\n') ++line;
      }
      i += 3;
      while (i < text.size() && text[i] == close[0]) ++i;  // up to two quotes may end the string
      next = next == Next::key ? Next::after_key : Next::after_value;
    } else if (at_start && (c == '"' || c == '\'')) {  // one-line string (ends at the line's end at the latest)
      for (++i; i < text.size() && text[i] != c && text[i] != '\n'; ++i)
        if (c == '"' && text[i] == '\\') {
          if (unsafe_escape(false)) return {line, true};
          ++i;
        }
      if (i < text.size() && text[i] == c) ++i;
      next = next == Next::key ? Next::after_key : Next::after_value;
    } else if (c == '[' && (next == Next::value || (next == Next::key && (brackets.empty() || brackets.back() == '[')))) {
      brackets += '[';  // an array's elements are values; a table header's name is a key
      ++i;
    } else if (c == '{' && next == Next::value) {
      brackets += '{';
      next = Next::key;
      ++i;
    } else if (c == ']' || c == '}') {
      if (!brackets.empty()) brackets.pop_back();
      next = Next::after_value;
      ++i;
    } else if (c == ',') {
      next = !brackets.empty() && brackets.back() == '{' ? Next::key : Next::value;
      ++i;
    } else if (c == '.' && next == Next::after_key) {
      next = Next::key;
      ++i;
    } else if (c == '=' && next == Next::after_key) {
      next = Next::value;
      ++i;
    } else if (next == Next::key && key_char(c)) {  // a bare key
      while (i < text.size() && key_char(text[i])) ++i;
      next = Next::after_key;
    } else {  // a bare value (a number, a date, true...), or something toml++ will refuse
      for (; i < text.size() && !blank(text[i]) && std::string_view("\n]},#").find(text[i]) == std::string_view::npos; ++i)
        if (non_ascii(i)) return {line, false};
      next = Next::after_value;
    }
  }
  return {};
}

LoadResult Loader::run(std::string_view text) {
  LoadResult result;
  if (const auto unsafe = unsafe_non_ascii(text); unsafe.line != 0) {
    result.errors.push_back(ConfigError{
        file_, unsafe.line, "",
        unsafe.after_backslash
            ? "TOML syntax error: a non-ASCII character right after a backslash (an escape, or the blanks a "
              "line-ending backslash trims): the TOML library cannot read it safely; start the line with "
              "an ASCII character"
            : "TOML syntax error: a non-ASCII character outside a string or comment (quote the key or value)"});
    return result;
  }
  toml::table root;
  try {
    root = toml::parse(text, std::string_view(file_));
  } catch (const toml::parse_error& e) {
    result.errors.push_back(ConfigError{file_, static_cast<int>(e.source().begin.line), "",
                                        "TOML syntax error: " + std::string(e.description())});
    return result;
  }

  TableReader top(*this, root, "",
                  {"daemon", "listeners", "database", "logging", "admin", "sta", "identity", "xml", "directory", "site",
                   "hypervisor_connection", "catalog",
                   "delivery_group", "power_time_scheme", "machine", "application", "rule", "assignment", "user", "group"});
  for (const auto& ks : model::all_kinds()) {
    if (!ks.api_writable)
      top.refuse(ks.name, std::string(ks.name) + " objects are maintained by the broker and cannot be declared in the config file");
  }
  top.finish();

  read_daemon(root);
  read_listeners(root);
  read_database(root);
  read_logging(root);
  read_admin(root);
  read_sta(root);
  read_identity(root);
  read_xml(root);
  read_directory(root);
  read_site(root);
  read_objects(root);
  check_references();
  check_rules_between_objects();

  // File order; errors without a line (whole-file problems) last.
  std::stable_sort(errors_.begin(), errors_.end(), [](const ConfigError& a, const ConfigError& b) {
    const auto key = [](int line) { return line > 0 ? line : std::numeric_limits<int>::max(); };
    return key(a.line) < key(b.line);
  });
  if (!errors_.empty()) {
    result.errors = std::move(errors_);
    return result;
  }
  for (const auto& ks : model::all_kinds()) {
    auto it = declared_.find(ks.kind);
    if (it == declared_.end()) continue;
    for (const auto& d : it->second)
      for (const auto& name : d.names) {
        Object obj = d.obj;
        obj.name = name;
        config_.objects.push_back(std::move(obj));
      }
  }
  result.config = std::move(config_);
  return result;
}

LoadResult load(std::string_view text, std::string file, std::string config_path, fs::path base_dir) {
  Loader loader(file, std::move(config_path), std::move(base_dir));
  try {
    return loader.run(text);
  } catch (const std::exception& e) {  // allocation failure or a bug: still an answer, not a crash
    LoadResult result;
    result.errors.push_back(ConfigError{std::move(file), 0, "", std::string("cannot load: ") + e.what()});
    return result;
  }
}

LoadResult file_error(const std::string& path, std::string message) {
  LoadResult result;
  result.errors.push_back(ConfigError{path, 0, "", std::move(message)});
  return result;
}

}  // namespace

std::string ConfigError::describe() const {
  std::string out = file;
  if (line > 0) out += ":" + std::to_string(line);
  out += ": ";
  if (!key.empty()) out += key + ": ";
  out += message;
  return out;
}

LoadResult load_file(const std::string& path) {
  if (path.empty()) return file_error(path, "no config file given");
  std::error_code ec;
  fs::path absolute = fs::absolute(path, ec);
  if (ec) return file_error(path, "cannot resolve the path: " + ec.message());
  absolute = absolute.lexically_normal();
  if (fs::is_directory(absolute, ec)) return file_error(path, "is a directory, not a config file");

  std::FILE* f = std::fopen(absolute.c_str(), "rb");
  if (!f) return file_error(path, std::string("cannot open: ") + std::strerror(errno));
  std::string text;
  char buf[64 * 1024];
  bool too_big = false;
  bool failed = false;
  for (;;) {
    const std::size_t n = std::fread(buf, 1, sizeof buf, f);
    text.append(buf, n);
    if (text.size() > kMaxFileBytes) {
      too_big = true;
      break;
    }
    if (n < sizeof buf) {
      failed = std::ferror(f) != 0;
      break;
    }
  }
  const int read_errno = errno;
  std::fclose(f);
  if (too_big) return file_error(path, "is larger than " + std::to_string(kMaxFileBytes >> 20) + " MiB");
  if (failed) return file_error(path, std::string("cannot read: ") + std::strerror(read_errno));
  return load(text, path, absolute.string(), absolute.parent_path());
}

LoadResult load_string(std::string_view text, const std::string& name, const std::string& base_dir) {
  std::error_code ec;
  fs::path base = fs::absolute(base_dir.empty() ? fs::path(".") : fs::path(base_dir), ec);
  if (ec) base = base_dir;
  return load(text, name, name, base.lexically_normal());
}

}  // namespace config
