// brokerctl: the admin CLI, a thin client of the admin REST API (docs/openapi.yaml).
// Readable tables by default, --json for scripts. Exit codes: 0 ok, 1 the broker refused or
// failed the request, 2 usage error, 3 cannot reach the broker.
#include "common/model.hpp"
#include "net/http.hpp"
#include "net/http_client.hpp"

#include <boost/json.hpp>

#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace json = boost::json;
namespace model = common::model;

namespace {

constexpr const char* kUsage = R"(usage: brokerctl [--url URL] [--token TOKEN] [--json] NOUN VERB [ARGS]

  --url URL      admin endpoint (default $OPENBROKER_URL or http://127.0.0.1:8082)
  --token TOKEN  admin bearer token (default $OPENBROKER_TOKEN)
  --ca-file FILE for an https URL: the CA (PEM) that signed the broker's admin certificate
                 (default $OPENBROKER_CA_FILE); the certificate and host name are checked
  --insecure     for an https URL: no certificate check (the token may go to whoever answers)
  --json         print the API's JSON instead of tables

nouns: machine, catalog, group (delivery group), scheme (power time scheme), application, rule, assignment,
       user, user-group (directory group), hypervisor, session (read-only; sessions take logoff, disconnect
       and message below), power (power actions: the verbs below)

  NOUN list [FIELD=VALUE ...] [--limit N] [--offset N]   list, filtered on fields
  NOUN get NAME
  NOUN create NAME [FIELD=VALUE ...]                     (assignment create machine=M user=U)
  NOUN update NAME FIELD=VALUE ...                       change the given fields
  NOUN delete NAME
  machine maintenance on|off NAME
  machine tag add|remove NAME TAG
  machine secret NAME                                    new agent secret (shown once; the old one stops working)
  user set-password NAME                                 reads the new password from stdin
  session logoff NAME                                    log the session off (waits for its agent)
  session disconnect NAME                                disconnect the client, keep the session
  session message NAME --text TEXT [--title TITLE]       show a message in the session
  power list [--machine M] [--state S[,S...]] [--action A[,A...]] [--limit N] [--offset N]
                                                         power actions (queued, running, finished in the last hour)
  power get ID
  power create ACTION MACHINE [MACHINE ...] [--priority N]
                                                         queue TurnOn, TurnOff, Shutdown, Reset, Restart, Suspend or
                                                         Resume (priority 0..1000, lower runs first; default 30)
  power cancel ID                                        cancel a Pending action
  power priority ID N                                    change a Pending action's priority
  site get | site update FIELD=VALUE ...
  directory status                                       the user directory's backend and state
  directory test USER [--domain D]                       look USER up (DOMAIN\user, user@upn or a SID) as the
                                                         broker does for a trusted front end: identity and groups
  audit [list] [kind=K] [object=NAME] [actor=A] [--action A[,A...]] [--limit N] [--offset N]
                                                         e.g. audit list --action launch-failed,launch-refused
  info | health

FIELD=VALUE: booleans true/false, lists comma-separated (tags=a,b), FIELD= clears a field.
Field names are those of the API (docs/openapi.yaml), e.g. delivery_group, in_maintenance_mode.
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ApiError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ConnectError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const model::KindSpec& noun_kind(const std::string& noun) {
  static const std::map<std::string, model::Kind> nouns{
      {"machine", model::Kind::machine},           {"machines", model::Kind::machine},
      {"catalog", model::Kind::catalog},           {"catalogs", model::Kind::catalog},
      {"group", model::Kind::delivery_group},      {"groups", model::Kind::delivery_group},
      {"delivery-group", model::Kind::delivery_group}, {"dg", model::Kind::delivery_group},
      {"application", model::Kind::application},   {"applications", model::Kind::application},
      {"app", model::Kind::application},           {"rule", model::Kind::rule},
      {"rules", model::Kind::rule},                {"assignment", model::Kind::assignment},
      {"assignments", model::Kind::assignment},    {"user", model::Kind::user},
      {"users", model::Kind::user},                {"user-group", model::Kind::group},
      {"user-groups", model::Kind::group},         {"directory-group", model::Kind::group},
      {"hypervisor", model::Kind::hypervisor_connection}, {"hypervisor-connection", model::Kind::hypervisor_connection},
      {"session", model::Kind::session},           {"sessions", model::Kind::session},
      {"power-action", model::Kind::power_action}, {"power-actions", model::Kind::power_action},
      {"power", model::Kind::power_action},
      {"power-time-scheme", model::Kind::power_time_scheme}, {"power-time-schemes", model::Kind::power_time_scheme},
      {"scheme", model::Kind::power_time_scheme},  {"schemes", model::Kind::power_time_scheme},
  };
  auto it = nouns.find(noun);
  if (it == nouns.end()) throw UsageError("unknown noun '" + noun + "'");
  return model::spec(it->second);
}

std::vector<std::string> default_columns(model::Kind k) {
  using K = model::Kind;
  switch (k) {
    case K::machine: return {"name", "catalog", "delivery_group", "registration_state", "last_deregistration_reason", "power_state", "fault_state", "summary_state", "in_maintenance_mode", "tags", "source"};
    case K::catalog: return {"name", "allocation_type", "session_support", "provisioning_type", "hypervisor_connection", "source"};
    case K::delivery_group: return {"name", "desktop_kind", "delivery_type", "session_support", "enabled", "in_maintenance_mode", "source"};
    case K::power_time_scheme: return {"name", "delivery_group", "days_of_week", "pool_using_percentage", "enabled", "source"};
    case K::application: return {"name", "published_name", "command_line_executable", "delivery_groups", "enabled", "source"};
    case K::rule: return {"name", "rule_type", "delivery_group", "enabled", "included_users", "source"};
    case K::assignment: return {"name", "machine", "user", "client_ip", "rule"};
    case K::user: return {"name", "domain", "display_name", "disabled", "locked_out", "source"};
    case K::group: return {"name", "domain", "members", "source"};
    case K::hypervisor_connection: return {"name", "driver", "uri", "enabled", "source"};
    case K::session: return {"name", "machine", "user_name", "state", "session_type", "client_name", "start_time"};
    case K::power_action: return {"id", "machine", "action", "state", "actual_priority", "reason", "request_time", "failure_reason"};
    case K::site: return {};
  }
  return {"name"};
}

std::string cell(const json::object& o, const std::string& col) {
  if (col == "source") {
    auto it = o.find("config_owned");
    return it != o.end() && it->value().is_bool() && it->value().get_bool() ? "config" : "api";
  }
  auto it = o.find(col);
  if (it == o.end() || it->value().is_null()) return "-";
  const auto& v = it->value();
  if (v.is_string()) return v.get_string().empty() ? "-" : std::string(v.get_string());
  if (v.is_bool()) return v.get_bool() ? (col == "in_maintenance_mode" ? "on" : "yes") : (col == "in_maintenance_mode" ? "off" : "no");
  if (v.is_array()) {
    std::string s;
    for (const auto& e : v.get_array()) {
      if (!s.empty()) s += ",";
      if (e.is_object() && e.get_object().contains("id") && e.get_object().contains("action")) {
        // pending_power_actions of a machine: "12 TurnOn (Pending)"
        const auto& a = e.get_object();
        s += (s.empty() ? "" : " ") + json::serialize(a.at("id")) + " " + cell(a, "action") + " (" + cell(a, "state") + ")";
        continue;
      }
      s += e.is_string() ? std::string(e.get_string()) : json::serialize(e);
    }
    return s.empty() ? "-" : s;
  }
  return json::serialize(v);
}

void print_table(const std::vector<std::string>& cols, const json::array& items) {
  std::vector<std::vector<std::string>> rows;
  std::vector<std::size_t> width(cols.size());
  std::vector<std::string> header;
  for (std::size_t i = 0; i < cols.size(); ++i) {
    std::string h = cols[i];
    std::replace(h.begin(), h.end(), '_', ' ');
    std::transform(h.begin(), h.end(), h.begin(), [](unsigned char c) { return std::toupper(c); });
    if (cols[i] == "in_maintenance_mode") h = "MAINT";
    if (cols[i] == "registration_state") h = "REGISTRATION";
    if (cols[i] == "last_deregistration_reason") h = "LAST DEREGISTRATION";
    if (cols[i] == "actual_priority") h = "PRIORITY";
    if (cols[i] == "fault_state") h = "FAULT";
    if (cols[i] == "request_time") h = "REQUESTED";
    if (cols[i] == "failure_reason") h = "FAILURE";
    header.push_back(h);
    width[i] = h.size();
  }
  for (const auto& item : items) {
    if (!item.is_object()) continue;
    std::vector<std::string> row;
    for (std::size_t i = 0; i < cols.size(); ++i) {
      row.push_back(cell(item.get_object(), cols[i]));
      width[i] = std::max(width[i], row.back().size());
    }
    rows.push_back(std::move(row));
  }
  auto print_row = [&](const std::vector<std::string>& r) {
    std::string line;
    for (std::size_t i = 0; i < r.size(); ++i) {
      line += r[i];
      if (i + 1 < r.size()) line += std::string(width[i] - r[i].size() + 2, ' ');
    }
    std::cout << line << "\n";
  };
  print_row(header);
  for (const auto& r : rows) print_row(r);
}

void print_object(const json::object& o) {
  std::size_t w = 0;
  for (const auto& [k, v] : o) w = std::max(w, k.size());
  for (const auto& [k, v] : o) {
    std::string key(k);
    std::cout << key << std::string(w - key.size() + 2, ' ') << cell(o, key) << "\n";
  }
}

json::value field_value(const model::KindSpec& ks, const std::string& key, const std::string& text) {
  if (key == "name" || key == "password") return json::value(text);
  const auto* f = ks.field(key);
  if (!f) throw UsageError("'" + key + "' is not a field of " + std::string(ks.name));
  if (text.empty() && f->type != model::FieldType::text_list) return nullptr;
  switch (f->type) {
    case model::FieldType::boolean: {
      if (text == "true" || text == "on" || text == "yes" || text == "1") return true;
      if (text == "false" || text == "off" || text == "no" || text == "0") return false;
      throw UsageError(key + ": expected true or false, got '" + text + "'");
    }
    case model::FieldType::integer: {
      char* end = nullptr;
      const long long n = std::strtoll(text.c_str(), &end, 10);
      if (!end || *end) throw UsageError(key + ": expected a whole number, got '" + text + "'");
      return static_cast<std::int64_t>(n);
    }
    case model::FieldType::text_list: {
      json::array a;
      std::size_t i = 0;
      while (i <= text.size() && !text.empty()) {
        auto j = text.find(',', i);
        if (j == std::string::npos) j = text.size();
        if (j > i) a.emplace_back(text.substr(i, j - i));
        i = j + 1;
      }
      return a;
    }
    default: return json::value(text);
  }
}

// FIELD=VALUE arguments from args[from] on, as an encoded query string (without '?').
std::string filter_query(const std::vector<std::string>& args, std::size_t from) {
  std::string q;
  for (std::size_t i = from; i < args.size(); ++i) {
    auto eq = args[i].find('=');
    if (eq == std::string::npos) throw UsageError("expected FIELD=VALUE, got '" + args[i] + "'");
    q += (q.empty() ? "" : "&") + net::percent_encode(args[i].substr(0, eq)) + "=" +
         net::percent_encode(args[i].substr(eq + 1));
  }
  return q;
}

bool noun_is_session(const std::string& noun) { return noun == "session" || noun == "sessions"; }

// The audit table's DETAIL column: for entries whose "after" is an event record rather than an
// object (launch failures, session actions), the reason or result and the message; for power
// actions, the action, machine, state and priority afterwards.
void add_audit_detail(json::value& page) {
  if (!page.is_object() || !page.as_object().contains("items") || !page.as_object().at("items").is_array()) return;
  for (auto& item : page.as_object().at("items").as_array()) {
    if (!item.is_object()) continue;
    auto& o = item.as_object();
    const auto* after = o.if_contains("after");
    if (!after || !after->is_object()) continue;
    const auto& a = after->as_object();
    auto str = [&](const char* key) {
      const auto* v = a.if_contains(key);
      return v && v->is_string() ? std::string(v->get_string()) : std::string();
    };
    if (cell(o, "kind") == "power_action") {  // "Suspend of DEMO\rds-2: Canceled, priority 3"
      o["detail"] = str("action") + " of " + str("machine") + ": " + str("state") + ", priority " +
                    cell(a, "actual_priority");
      continue;
    }
    std::string head = !str("reason").empty() ? str("reason") : str("result");
    if (head.empty()) continue;
    std::string more = !str("message").empty() ? str("message") : str("error");
    o["detail"] = more.empty() ? head : head + ": " + more;
  }
}

class Client {
 public:
  Client(std::string url, std::string token, std::string ca_file)
      : url_(url), http_(std::move(url), std::chrono::seconds(30), std::move(ca_file)), token_(std::move(token)) {}

  json::value call(const std::string& method, const std::string& target, const json::value* body = nullptr) {
    std::vector<std::pair<std::string, std::string>> headers;
    if (!token_.empty()) headers.emplace_back("Authorization", "Bearer " + token_);
    if (body) headers.emplace_back("Content-Type", "application/json");
    auto r = http_.request(method, target, body ? json::serialize(*body) : std::string(), headers);
    if (!r) throw ConnectError(r.error().message);
    boost::system::error_code ec;
    json::value v = r->body.empty() ? json::value() : json::parse(r->body, ec);
    if (r->status >= 400) {
      std::string msg = "HTTP " + std::to_string(r->status);
      if (!ec && v.is_object() && v.as_object().contains("error")) {
        const auto& e = v.as_object().at("error");
        if (e.is_object() && e.as_object().contains("message")) msg = json::value_to<std::string>(e.as_object().at("message"));
      } else if (!r->body.empty()) {
        msg += ": " + r->body;
      }
      if (r->status == 401 && token_.empty()) msg += " (give --token or set OPENBROKER_TOKEN)";
      throw ApiError(msg);
    }
    if (ec) return json::value(r->body);
    return v;
  }

 private:
  std::string url_;
  net::HttpClient http_;
  std::string token_;
};

std::string read_password() {
  const bool tty = ::isatty(STDIN_FILENO);
  termios old{};
  if (tty) {
    std::cerr << "new password: " << std::flush;
    ::tcgetattr(STDIN_FILENO, &old);
    termios quiet = old;
    quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
    ::tcsetattr(STDIN_FILENO, TCSANOW, &quiet);
  }
  std::string pw;
  std::getline(std::cin, pw);
  if (tty) {
    ::tcsetattr(STDIN_FILENO, TCSANOW, &old);
    std::cerr << "\n";
  }
  return pw;
}

// A whole number for a usage argument (ids, priorities).
std::int64_t whole_number(const std::string& what, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || !end || *end || errno == ERANGE)
    throw UsageError(what + ": expected a whole number, got '" + text + "'");
  return n;
}

// brokerctl power list|get|create|cancel|priority: /api/v1/power-actions.
int power_command(Client& client, const std::vector<std::string>& rest, bool as_json,
                  const std::optional<std::string>& machine, const std::optional<std::string>& state,
                  const std::optional<std::string>& action, const std::optional<std::string>& priority,
                  const std::function<std::string(std::string)>& paging) {
  const std::string base = "/api/v1/power-actions";
  const std::vector<std::string> cols{"id",     "machine",      "action",        "state", "actual_priority",
                                      "reason", "request_time", "failure_reason"};
  const std::string verb = rest.size() > 1 ? rest[1] : "list";
  auto print = [&](const json::value& v) {
    if (as_json)
      std::cout << json::serialize(v) << "\n";
    else if (v.is_object() && v.as_object().contains("items") && v.as_object().at("items").is_array())
      print_table(cols, v.as_object().at("items").as_array());
    else if (v.is_object())
      print_object(v.as_object());
  };
  auto id_arg = [&](std::size_t idx) {
    if (rest.size() <= idx) throw UsageError("power " + verb + " needs an ID");
    return std::to_string(whole_number("ID", rest[idx]));
  };
  auto describe = [](const json::value& v) {
    const auto& o = v.as_object();
    return json::serialize(o.at("id")) + " (" + cell(o, "action") + " of " + cell(o, "machine") + ")";
  };

  if (verb == "list") {
    std::string q = filter_query(rest, rest.size() > 1 ? 2 : 1);
    auto add = [&](const char* key, const std::optional<std::string>& v) {
      if (v) q += (q.empty() ? "" : "&") + std::string(key) + "=" + net::percent_encode(*v);
    };
    add("machine", machine);
    add("state", state);
    add("action", action);
    print(client.call("GET", base + paging(q)));
  } else if (verb == "get" || verb == "show") {
    const auto id = id_arg(2);
    if (rest.size() > 3) throw UsageError("power " + verb + " takes one ID");
    print(client.call("GET", base + "/" + id));
  } else if (verb == "create") {
    if (rest.size() < 4) throw UsageError("power create ACTION MACHINE [MACHINE ...]");
    json::array machines;
    for (std::size_t i = 3; i < rest.size(); ++i) machines.emplace_back(rest[i]);
    json::object body{{"action", rest[2]}, {"machines", std::move(machines)}};
    if (priority) body["priority"] = whole_number("--priority", *priority);
    json::value b = std::move(body);
    print(client.call("POST", base, &b));
  } else if (verb == "cancel") {
    const auto id = id_arg(2);
    if (rest.size() > 3) throw UsageError("power cancel takes one ID");
    json::value b = json::object{};
    auto r = client.call("POST", base + "/" + id + "/cancel", &b);
    if (as_json)
      std::cout << json::serialize(r) << "\n";
    else
      std::cout << "canceled power action " << describe(r) << "\n";
  } else if (verb == "priority") {
    const auto id = id_arg(2);
    if (rest.size() != 4) throw UsageError("power priority ID N");
    json::value b = json::object{{"priority", whole_number("priority", rest[3])}};
    auto r = client.call("PATCH", base + "/" + id, &b);
    if (as_json)
      std::cout << json::serialize(r) << "\n";
    else
      std::cout << "power action " << describe(r) << ": priority " << cell(r.as_object(), "actual_priority") << "\n";
  } else {
    throw UsageError("unknown verb '" + verb + "' for power (use list, get, create, cancel, priority)");
  }
  return 0;
}

int run(std::vector<std::string> args) {
  std::string url = std::getenv("OPENBROKER_URL") ? std::getenv("OPENBROKER_URL") : "http://127.0.0.1:8082";
  std::string token = std::getenv("OPENBROKER_TOKEN") ? std::getenv("OPENBROKER_TOKEN") : "";
  std::string ca_file = std::getenv("OPENBROKER_CA_FILE") ? std::getenv("OPENBROKER_CA_FILE") : "";
  bool insecure = false;
  bool as_json = false;
  std::optional<std::string> limit, offset, text, title, action, machine, state, priority, domain;
  std::vector<std::string> rest;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const auto& a = args[i];
    auto value = [&]() {
      if (i + 1 >= args.size()) throw UsageError(a + " needs a value");
      return args[++i];
    };
    if (a == "--url") url = value();
    else if (a == "--token") token = value();
    else if (a == "--json") as_json = true;
    else if (a == "--ca-file") ca_file = value();
    else if (a == "--insecure") insecure = true;
    else if (a == "--limit") limit = value();
    else if (a == "--offset") offset = value();
    else if (a == "--text") text = value();
    else if (a == "--title") title = value();
    else if (a == "--domain") domain = value();
    else if (a == "--action") action = value();
    else if (a == "--machine") machine = value();
    else if (a == "--state") state = value();
    else if (a == "--priority") priority = value();
    else if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      return 0;
    } else if (a.rfind("--", 0) == 0) throw UsageError("unknown option '" + a + "'");
    else rest.push_back(a);
  }
  if (rest.empty()) throw UsageError("no command given");
  if ((text || title) && !(rest.size() > 1 && noun_is_session(rest[0]) && rest[1] == "message"))
    throw UsageError("--text and --title go with session message");
  const bool power_noun = rest[0] == "power" || rest[0] == "power-action" || rest[0] == "power-actions";
  const bool power_list = power_noun && (rest.size() == 1 || rest[1] == "list");
  if (action && rest[0] != "audit" && !power_list) throw UsageError("--action goes with audit and power list");
  if (domain && !(rest.size() > 1 && rest[0] == "directory" && rest[1] == "test"))
    throw UsageError("--domain goes with directory test");
  if ((machine || state) && !power_list) throw UsageError("--machine and --state go with power list");
  if (priority && !(power_noun && rest.size() > 1 && rest[1] == "create"))
    throw UsageError("--priority goes with power create (power priority ID N changes one)");
  // The bearer token must not go to whoever answers: https is checked unless asked not to.
  if (url.rfind("https://", 0) == 0 && ca_file.empty() && !insecure)
    throw UsageError("an https URL needs --ca-file FILE (the CA that signed the broker's admin certificate) or "
                     "--insecure (no certificate check)");
  Client client(url, token, insecure ? std::string() : ca_file);
  const std::string noun = rest[0];
  const std::string verb = rest.size() > 1 ? rest[1] : "";

  auto emit = [&](const json::value& v, const std::vector<std::string>& cols) {
    if (as_json) {
      std::cout << json::serialize(v) << "\n";
    } else if (v.is_object() && v.as_object().contains("items") && v.as_object().at("items").is_array()) {
      print_table(cols, v.as_object().at("items").as_array());
    } else if (v.is_object()) {
      print_object(v.as_object());
    } else if (!v.is_null()) {
      std::cout << (v.is_string() ? std::string(v.get_string()) : json::serialize(v)) << "\n";
    }
  };
  auto paging = [&](std::string query) {
    if (limit) query += (query.empty() ? "" : "&") + std::string("limit=") + net::percent_encode(*limit);
    if (offset) query += (query.empty() ? "" : "&") + std::string("offset=") + net::percent_encode(*offset);
    return query.empty() ? std::string() : "?" + query;
  };

  if (noun == "info") {
    emit(client.call("GET", "/api/v1/info"), {});
    return 0;
  }
  if (noun == "health") {
    emit(client.call("GET", "/healthz"), {});
    return 0;
  }
  if (noun == "directory") {
    if (verb == "status" || verb.empty()) {
      emit(client.call("GET", "/api/v1/directory"), {});
      return 0;
    }
    if (verb != "test" || rest.size() != 3) throw UsageError("directory takes status, or test USER");
    std::string target = "/api/v1/directory/users/" + net::percent_encode(rest[2]);
    if (domain) target += "?domain=" + net::percent_encode(*domain);
    const auto v = client.call("GET", target);
    if (as_json || !v.is_object()) {
      emit(v, {});
      return 0;
    }
    const auto& o = v.as_object();
    const auto str = [&](const char* k) { return cell(o, k); };
    std::cout << "user:          " << (str("qualified_name").empty() ? rest[2] : str("qualified_name")) << "\n"
              << "result:        " << str("result") << "\n";
    if (o.contains("qualified_name")) {
      std::cout << "upn:           " << str("upn") << "\n"
                << "sid:           " << str("sid") << "\n"
                << "display name:  " << str("display_name") << "\n"
                << "email:         " << str("email") << "\n";
      const auto list = [&](const char* k, const char* heading) {
        const auto* a = o.if_contains(k);
        const std::size_t n = a && a->is_array() ? a->as_array().size() : 0;
        std::cout << heading << " (" << n << "):\n";
        if (n)
          for (const auto& g : a->as_array()) std::cout << "  " << (g.is_string() ? std::string(g.get_string()) : "") << "\n";
      };
      list("groups", "groups");
      list("group_sids", "group SIDs");
    }
    return 0;
  }
  if (noun == "audit") {
    std::string q = filter_query(rest, verb == "list" ? 2 : 1);
    if (action) q += (q.empty() ? "" : "&") + std::string("action=") + net::percent_encode(*action);
    auto page = client.call("GET", "/api/v1/audit" + paging(q));
    if (!as_json) add_audit_detail(page);
    emit(page, {"id", "time", "actor", "action", "kind", "object", "detail"});
    return 0;
  }
  if (noun == "site") {
    const auto& ks = model::spec(model::Kind::site);
    if (verb == "get" || verb.empty()) {
      emit(client.call("GET", "/api/v1/site"), {});
    } else if (verb == "update") {
      json::object body;
      for (std::size_t i = 2; i < rest.size(); ++i) {
        auto eq = rest[i].find('=');
        if (eq == std::string::npos) throw UsageError("expected FIELD=VALUE, got '" + rest[i] + "'");
        body[rest[i].substr(0, eq)] = field_value(ks, rest[i].substr(0, eq), rest[i].substr(eq + 1));
      }
      json::value b = body;
      emit(client.call("PATCH", "/api/v1/site", &b), {});
    } else {
      throw UsageError("site takes get or update");
    }
    return 0;
  }

  if (power_noun) return power_command(client, rest, as_json, machine, state, action, priority, paging);

  const auto& ks = noun_kind(noun);
  const std::string base = "/api/v1/" + std::string(ks.plural);
  auto need_name = [&](std::size_t idx) -> std::string {
    if (rest.size() <= idx) throw UsageError(noun + " " + verb + " needs a NAME");
    return rest[idx];
  };
  auto fields_from = [&](std::size_t from, json::object& body) {
    for (std::size_t i = from; i < rest.size(); ++i) {
      auto eq = rest[i].find('=');
      if (eq == std::string::npos) throw UsageError("expected FIELD=VALUE, got '" + rest[i] + "'");
      const auto key = rest[i].substr(0, eq);
      body[key] = field_value(ks, key, rest[i].substr(eq + 1));
    }
  };
  const auto cols = default_columns(ks.kind);

  if (verb == "list" || verb.empty()) {
    const std::string q = filter_query(rest, 2);
    emit(client.call("GET", base + paging(q)), cols);
  } else if (verb == "get" || verb == "show") {
    emit(client.call("GET", base + "/" + net::percent_encode(need_name(2))), cols);
  } else if (verb == "create") {
    json::object body;
    std::size_t from = 2;
    if (!ks.auto_name) {
      body["name"] = need_name(2);
      from = 3;
    }
    fields_from(from, body);
    json::value b = body;
    emit(client.call("POST", base, &b), cols);
  } else if (verb == "update") {
    const auto name = need_name(2);
    json::object body;
    fields_from(3, body);
    if (body.empty()) throw UsageError("update needs at least one FIELD=VALUE");
    json::value b = body;
    emit(client.call("PATCH", base + "/" + net::percent_encode(name), &b), cols);
  } else if (verb == "delete" || verb == "remove") {
    const auto name = need_name(2);
    client.call("DELETE", base + "/" + net::percent_encode(name));
    if (!as_json) std::cout << "deleted " << ks.name << " " << name << "\n";
  } else if (verb == "maintenance" && (ks.kind == model::Kind::machine || ks.kind == model::Kind::delivery_group)) {
    if (rest.size() < 4 || (rest[2] != "on" && rest[2] != "off")) throw UsageError(noun + " maintenance on|off NAME");
    json::value b = json::object{{"in_maintenance_mode", rest[2] == "on"}};
    emit(client.call("PATCH", base + "/" + net::percent_encode(rest[3]), &b), cols);
  } else if (verb == "tag" && ks.kind == model::Kind::machine) {
    if (rest.size() < 5 || (rest[2] != "add" && rest[2] != "remove")) throw UsageError("machine tag add|remove NAME TAG");
    auto m = client.call("GET", base + "/" + net::percent_encode(rest[3]));
    json::array tags;
    if (m.is_object() && m.as_object().contains("tags") && m.as_object().at("tags").is_array()) tags = m.as_object().at("tags").as_array();
    auto it = std::find(tags.begin(), tags.end(), json::value(rest[4]));
    if (rest[2] == "add" && it == tags.end()) tags.emplace_back(rest[4]);
    if (rest[2] == "remove" && it != tags.end()) tags.erase(it);
    json::value b = json::object{{"tags", tags}};
    emit(client.call("PATCH", base + "/" + net::percent_encode(rest[3]), &b), cols);
  } else if (verb == "secret" && ks.kind == model::Kind::machine) {
    const auto name = need_name(2);
    auto r = client.call("POST", base + "/" + net::percent_encode(name) + "/secret");
    if (as_json)
      std::cout << json::serialize(r) << "\n";
    else
      std::cout << "agent secret for " << name << " (shown once): " << json::value_to<std::string>(r.at("secret")) << "\n";
  } else if ((verb == "logoff" || verb == "disconnect" || verb == "message") && ks.kind == model::Kind::session) {
    const auto name = need_name(2);
    if (rest.size() > 3) throw UsageError("session " + verb + " takes one NAME");
    json::value b = json::object{};
    if (verb == "message") {
      if (!text || text->empty()) throw UsageError("session message needs --text TEXT");
      json::object m{{"text", *text}};
      if (title) m["title"] = *title;
      b = std::move(m);
    }
    auto r = client.call("POST", base + "/" + net::percent_encode(name) + "/" + verb, &b);
    if (as_json)
      std::cout << json::serialize(r) << "\n";
    else
      std::cout << (verb == "logoff"       ? "logged off session "
                    : verb == "disconnect" ? "disconnected session "
                                           : "message shown in session ")
                << name << "\n";
  } else if (verb == "set-password" && ks.kind == model::Kind::user) {
    const auto name = need_name(2);
    const auto pw = read_password();
    json::value b = json::object{{"password", pw}};
    client.call("PATCH", base + "/" + net::percent_encode(name), &b);
    if (!as_json) std::cout << "password changed for " << name << "\n";
  } else {
    throw UsageError("unknown verb '" + verb + "' for " + noun);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const UsageError& e) {
    std::cerr << "brokerctl: " << e.what() << "\n\n" << kUsage;
    return 2;
  } catch (const ApiError& e) {
    std::cerr << "brokerctl: " << e.what() << "\n";
    return 1;
  } catch (const ConnectError& e) {
    std::cerr << "brokerctl: " << e.what() << "\n";
    return 3;
  } catch (const std::exception& e) {
    std::cerr << "brokerctl: " << e.what() << "\n";
    return 1;
  }
}
