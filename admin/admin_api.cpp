#include "admin/admin_api.hpp"

#include "broker/engine.hpp"

#include "broker/launcher.hpp"
#include "broker/power_manager.hpp"
#include "broker/site_objects.hpp"
#include "common/crypto.hpp"
#include "common/log.hpp"
#include "common/metrics.hpp"
#include "common/model_json.hpp"
#include "common/version.hpp"
#include "common/work_queue.hpp"
#include "identity/directory.hpp"
#include "storage/repository.hpp"

#include <boost/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <charconv>
#include <optional>
#include <set>

namespace admin {

namespace json = boost::json;
namespace model = common::model;
using common::errc;
using common::Error;
using net::HttpRequest;
using net::HttpResponse;

namespace {

const char* code_name(errc c) {
  switch (c) {
    case errc::ok: return "ok";
    case errc::invalid_argument: return "invalid_argument";
    case errc::not_found: return "not_found";
    case errc::conflict: return "conflict";
    case errc::unauthorized: return "unauthorized";
    case errc::forbidden: return "forbidden";
    case errc::unavailable: return "unavailable";
    case errc::storage_error: return "storage_error";
    case errc::incompatible: return "incompatible";
    case errc::internal: return "internal";
  }
  return "internal";
}

int http_status(errc c) {
  switch (c) {
    case errc::invalid_argument: return 400;
    case errc::not_found: return 404;
    case errc::conflict: return 409;
    case errc::unauthorized: return 401;
    case errc::forbidden: return 403;
    case errc::unavailable: return 503;
    case errc::incompatible:
    case errc::storage_error:
    case errc::internal:
    case errc::ok: return 500;
  }
  return 500;
}

HttpResponse json_reply(int status, const json::value& body) {
  HttpResponse r;
  r.status = status;
  r.content_type = "application/json";
  r.body = json::serialize(body);
  r.body += '\n';
  return r;
}

// The one place where errors become admin replies.
HttpResponse reply_error(const Error& e, const char* code = nullptr, int status = 0) {
  // Messages may quote names from the path or query string, bytes as sent: JSON text must be
  // UTF-8, so invalid bytes (and control characters) are written as \xNN (found by admin_fuzz).
  const auto text = [](const std::string& s) { return common::log_safe(s, s.size()); };
  json::object err;
  err["code"] = code ? code : code_name(e.code);
  err["message"] = text(e.field.empty() ? e.message : e.field + ": " + e.message);
  if (!e.field.empty()) {
    json::array fields;
    fields.push_back(json::object{{"field", text(e.field)}, {"message", text(e.message)}});
    err["fields"] = std::move(fields);
  }
  auto r = json_reply(status ? status : http_status(e.code), json::object{{"error", std::move(err)}});
  if (r.status == 401) r.headers.emplace_back("WWW-Authenticate", "Bearer");
  return r;
}

HttpResponse method_not_allowed(const std::string& allow) {
  auto r = reply_error(Error(errc::invalid_argument, "method not allowed; use " + allow), "method_not_allowed", 405);
  r.headers.emplace_back("Allow", allow);
  return r;
}

std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> parts;
  std::size_t i = 0;
  while (i < path.size()) {
    while (i < path.size() && path[i] == '/') ++i;
    if (i >= path.size()) break;
    auto j = path.find('/', i);
    if (j == std::string::npos) j = path.size();
    parts.push_back(path.substr(i, j - i));
    i = j;
  }
  return parts;
}

bool parse_int(const std::string& s, std::int64_t& out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc{} && p == s.data() + s.size();
}

common::Result<json::object> parse_body(const std::string& body) {
  boost::system::error_code ec;
  json::parse_options options;
  options.max_depth = kMaxJsonDepth;  // explicit, not the library's default
  json::value v = json::parse(body, ec, {}, options);
  if (ec == json::error::too_deep)
    return Error(errc::invalid_argument, "request body nests deeper than " + std::to_string(kMaxJsonDepth) + " levels");
  if (ec) return Error(errc::invalid_argument, "request body is not valid JSON: " + ec.message());
  if (!v.is_object()) return Error(errc::invalid_argument, "request body must be a JSON object");
  return std::move(v.as_object());
}

// Pulls the write-only "password" member (users) out of the body and hashes it.
common::Status take_password(json::object& body, model::Object& obj) {
  auto it = body.find("password");
  if (it == body.end()) return {};
  if (obj.kind != model::Kind::user) return Error(errc::invalid_argument, "is not a field of " + std::string(model::spec(obj.kind).name), "password");
  if (!it->value().is_string()) return Error(errc::invalid_argument, "must be a string", "password");
  const std::string pw(it->value().get_string());
  if (pw.size() < 8) return Error(errc::invalid_argument, "must be at least 8 characters", "password");
  obj.fields["password_hash"] = common::crypto::hash_password(pw);
  body.erase(it);
  return {};
}

json::object page_json(const broker::Page& page, std::int64_t offset, std::int64_t limit) {
  json::array items;
  for (const auto& o : page.items) items.push_back(model::to_json(o));
  return json::object{{"items", std::move(items)}, {"total", page.total}, {"offset", offset}, {"limit", limit}};
}

json::value audit_side(const std::string& text) {
  if (text.empty()) return nullptr;
  boost::system::error_code ec;
  auto v = json::parse(text, ec);
  return ec ? json::value(text) : v;
}

// Comma-separated values, empty items dropped ("a,,b" -> a, b).
std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::size_t i = 0;
  while (i <= text.size()) {
    auto j = text.find(',', i);
    if (j == std::string::npos) j = text.size();
    if (j > i) out.push_back(text.substr(i, j - i));
    i = j + 1;
  }
  return out;
}

constexpr std::int64_t kAuditScanChunk = 500;  // rows per read when filtering the audit log by action

// Bounds of a send_message (docs/cbp.md "send_message").
constexpr std::size_t kMaxMessageTitle = 256;
constexpr std::size_t kMaxMessageText = 4096;

// "" when `text` has no control characters (multiline: tab, CR and LF allowed), else the problem.
std::string control_characters(std::string_view text, bool multiline) {
  for (char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (multiline && (c == '\t' || c == '\n' || c == '\r')) continue;
    if (u < 0x20 || u == 0x7f)
      return multiline ? "must not contain control characters other than tab and line breaks"
                       : "must not contain control characters";
  }
  return {};
}

const char* command_verb(const std::string& command) {
  if (command == "logoff") return "log off";
  if (command == "disconnect") return "disconnect";
  return "show a message in";
}

// A session action sent to an agent and not answered yet. Its answer may come on any thread,
// also after the AdminApi is gone (an agent timing out at shutdown), so it holds what it needs
// itself: references to the work queue and the repository (they outlive the agent endpoint).
struct PendingAction : std::enable_shared_from_this<PendingAction> {
  common::WorkQueue& work;
  storage::Repository& repository;
  std::shared_ptr<spdlog::logger> logger;
  std::shared_ptr<net::Responder> respond;
  std::string session, command, machine, title, text, actor;

  PendingAction(common::WorkQueue& w, storage::Repository& r, std::shared_ptr<spdlog::logger> l,
                std::shared_ptr<net::Responder> rs)
      : work(w), repository(r), logger(std::move(l)), respond(std::move(rs)) {}

  // The agent's answer: audit and reply on the work queue (storage blocks); when the queue has
  // stopped, reply without the audit entry (never block the calling thread).
  void answered(bool ok, const std::string& error) {
    auto self = shared_from_this();
    if (!work.post([self, ok, error] { self->finish(ok, error, true); })) finish(ok, error, false);
  }

  void finish(bool ok, const std::string& error, bool write_audit) {
    if (write_audit) {
      json::object detail{{"machine", machine}, {"result", ok ? "done" : "failed"}};
      if (!ok) detail["error"] = error;
      if (command == "message") {
        detail["title"] = title;
        detail["text"] = text;
      }
      storage::AuditEntry e;
      e.actor = actor;
      e.action = "session-" + command;
      e.kind = "session";
      e.object = session;
      e.after = json::serialize(detail);
      auto st = repository.write([&](storage::Transaction& tx) { return tx.append_audit(e); });
      if (!st) logger->error("admin: cannot audit {} of session {}: {}", command, session, st.error().describe());
    } else {
      logger->warn("admin: {} of session {} not audited: the broker is stopping", command, session);
    }
    HttpResponse r;
    if (ok) {
      logger->info("admin: {} {} session {} on {}", actor, command, session, machine);
      r = json_reply(200, json::object{{"session", session}, {"command", command}, {"result", "done"}});
    } else {
      logger->warn("admin: {} could not {} session {} on {}: {}", actor, command_verb(command), session, machine,
                   error);
      const std::string agent = "the agent of machine '" + machine + "'";
      if (error == "not connected")
        r = reply_error(Error(errc::conflict, agent + " is not connected"), "agent_not_connected", 409);
      else if (error == "connection closed")
        r = reply_error(Error(errc::conflict, agent + " disconnected before it answered"), "agent_not_connected", 409);
      else if (error == "timeout")
        r = reply_error(Error(errc::unavailable, agent + " did not answer in time"), "agent_timeout", 504);
      else
        r = reply_error(Error(errc::conflict,
                              agent + " could not " + command_verb(command) + " session '" + session + "': " + error),
                        "agent_refused", 409);
    }
    r.route = "/api/v1/sessions/{name}/" + command;
    (*respond)(std::move(r));
  }
};

// ---- Power actions (docs/power.md "Admin API and brokerctl")

json::value time_json(common::SysTime t) {
  if (t == common::SysTime{}) return nullptr;
  return json::value(common::format_time(t));
}

// One power action as the admin API shows it (the fields of the power_action kind, plus attempts).
json::object action_json(const broker::PowerAction& a) {
  return json::object{
      {"id", a.id},
      {"name", std::to_string(a.id)},
      {"machine", a.vm.machine},
      {"hypervisor_connection", a.hypervisor_connection},
      {"action", power::to_string(a.action)},
      {"state", power::to_string(a.state)},
      {"base_priority", a.base_priority},
      {"actual_priority", a.actual_priority},
      {"reason", a.reason},
      {"request_time", time_json(a.request_time)},
      {"start_time", time_json(a.start_time)},
      {"completion_time", time_json(a.completion_time)},
      {"failure_reason", a.failure_reason.empty() ? json::value(nullptr) : json::value(a.failure_reason)},
      {"attempts", a.attempts}};
}

std::string action_names() {
  std::string out;
  for (auto a : {power::Action::turn_on, power::Action::turn_off, power::Action::shutdown, power::Action::reset,
                 power::Action::restart, power::Action::suspend, power::Action::resume})
    out += (out.empty() ? "" : ", ") + std::string(power::to_string(a));
  return out;
}

std::string state_names() {
  std::string out;
  for (std::size_t i = 0; i < power::kActionStateCount; ++i)
    out += (out.empty() ? "" : ", ") + std::string(power::to_string(static_cast<power::ActionState>(i)));
  return out;
}

// The priority member of a create or PATCH body: an integer from kMinPriority to kMaxPriority.
common::Result<int> priority_value(const json::value& v) {
  const std::string range =
      "must be an integer from " + std::to_string(power::kMinPriority) + " to " + std::to_string(power::kMaxPriority);
  if (v.is_int64() && v.get_int64() >= power::kMinPriority && v.get_int64() <= power::kMaxPriority)
    return static_cast<int>(v.get_int64());
  if (v.is_uint64() && v.get_uint64() <= static_cast<std::uint64_t>(power::kMaxPriority))
    return static_cast<int>(v.get_uint64());
  return Error(errc::invalid_argument, range, "priority");
}

// A power action's id from the path: a positive integer (anything else names no action).
std::optional<std::int64_t> action_id(const std::string& text) {
  std::int64_t id = 0;
  if (!parse_int(text, id) || id <= 0) return std::nullopt;
  return id;
}

// An audit entry of a power action (actor, action and kind are filled by the caller).
storage::AuditEntry audit_entry(std::int64_t id, const json::object* before, const json::object* after) {
  storage::AuditEntry e;
  e.object = std::to_string(id);
  if (before) e.before = json::serialize(*before);
  if (after) e.after = json::serialize(*after);
  return e;
}

Error no_action(const std::string& id) { return Error(errc::not_found, "no power action with id '" + id + "'"); }

Error not_pending(const broker::PowerAction& a, const char* what) {
  return Error(errc::conflict, "power action " + std::to_string(a.id) + " is " +
                                   std::string(power::to_string(a.state)) + "; only Pending actions can be " + what);
}

}  // namespace

AdminApi::AdminApi(broker::SiteObjects& site, storage::Repository& repository, common::WorkQueue& work,
                   common::Metrics& metrics, AdminOptions options, std::shared_ptr<spdlog::logger> logger,
                   broker::Launcher* launcher)
    : site_(site),
      repository_(repository),
      work_(work),
      metrics_(metrics),
      options_(std::move(options)),
      logger_(std::move(logger)),
      launcher_(launcher),
      started_(std::chrono::steady_clock::now()) {
  metrics_.describe("broker_machines", common::Metrics::Type::gauge, "Machines by registration state.");
  metrics_.describe("broker_sessions", common::Metrics::Type::gauge, "Sessions by state.");
  metrics_.describe("broker_up", common::Metrics::Type::gauge, "1 while the broker serves.");
  metrics_.describe("broker_power_actions", common::Metrics::Type::gauge,
                    "Power actions by hypervisor connection and state (queued, running, and finished within the "
                    "retention).");
  metrics_.describe("broker_power_queue_depth", common::Metrics::Type::gauge,
                    "Pending power actions by hypervisor connection.");
  // broker_storage_* are described by storage (storage::SqliteOptions::metrics).
}

void AdminApi::set_listeners_ready(std::vector<std::string> names) {
  listener_names_ = std::move(names);
  listeners_ready_ = true;
}

void AdminApi::set_power_manager(broker::PowerManager* power) { power_ = power; }

void AdminApi::set_engine(const broker::Engine* engine) { engine_ = engine; }

model::Object AdminApi::live(model::Object object) const {
  if (const auto* engine = engine_.load(); engine && object.kind == model::Kind::machine) {
    engine->overlay_live(object);
    // session_count is live too (not stored): the sessions the broker keeps for the machine.
    if (auto n = engine->with_state([&](const broker::SiteState& site) -> std::optional<std::int64_t> {
          if (!site.machine(object.name)) return std::nullopt;
          return static_cast<std::int64_t>(site.live_sessions_on(object.name));
        }))
      object.fields["session_count"] = *n;
  }
  return object;
}

void AdminApi::handle(HttpRequest&& request, net::Responder respond) {
  if (request.path == "/healthz") {
    HttpResponse r;
    r.body = "ok\n";
    r.route = "/healthz";
    if (request.method != "GET" && request.method != "HEAD") r = method_not_allowed("GET");
    respond(std::move(r));
    return;
  }
  std::string actor;
  const bool open = std::find(options_.unauthenticated_paths.begin(), options_.unauthenticated_paths.end(),
                              request.path) != options_.unauthenticated_paths.end();
  if (!open) {
    const std::string auth = request.header("Authorization");
    constexpr std::string_view scheme = "Bearer ";
    const bool has_bearer = auth.size() > scheme.size() && std::equal(scheme.begin(), scheme.end(), auth.begin(),
        [](char a, char b) { return std::tolower(static_cast<unsigned char>(a)) == std::tolower(static_cast<unsigned char>(b)); });
    if (has_bearer) {
      const auto digest = common::crypto::sha256_hex(std::string_view(auth).substr(scheme.size()));
      for (const auto& t : options_.tokens)
        if (common::crypto::constant_time_equal(digest, t.sha256)) actor = "token:" + t.name;
    }
    if (actor.empty()) {
      auto r = reply_error(Error(errc::unauthorized, has_bearer ? "the bearer token is not valid"
                                                                : "an Authorization: Bearer <token> header is required"));
      r.route = "unauthorized";
      logger_->info("admin: refused {} {} from {}: {}", request.method, request.path, request.remote_address,
                    has_bearer ? "wrong token" : "no token");
      respond(std::move(r));
      return;
    }
  }
  if (session_action(request, actor, respond)) return;
  // Everything else may touch storage: off the I/O thread.
  net::respond_from_queue(
      work_, std::move(request), std::move(respond),
      [this, actor](const HttpRequest& req) { return dispatch(req, actor); },
      [this](int status, const std::string& message) {
        if (status == 503) return reply_error(Error(errc::unavailable, message));
        logger_->error("admin: {}", message);
        return reply_error(Error(errc::internal, "internal error; see the broker log"));
      });
}

bool AdminApi::session_action(HttpRequest& request, const std::string& actor, net::Responder& respond) {
  const auto parts = split_path(request.path);  // decoded (names never contain '/')
  if (parts.size() != 5 || parts[0] != "api" || parts[1] != "v1" || parts[2] != "sessions") return false;
  const std::string& command = parts[4];
  if (command != "logoff" && command != "disconnect" && command != "message") return false;
  const std::string route = "/api/v1/sessions/{name}/" + command;
  auto reply_now = [&](HttpResponse r) {
    r.route = route;
    respond(std::move(r));
  };
  if (request.method != "POST") {
    reply_now(method_not_allowed("POST"));
    return true;
  }
  if (!launcher_) {
    reply_now(reply_error(Error(errc::unavailable, "session actions are not available: this broker has no launcher")));
    return true;
  }
  auto shared_respond = std::make_shared<net::Responder>(std::move(respond));
  const bool queued =
      work_.post([this, session = parts[3], command, body = std::move(request.body), actor, shared_respond] {
        try {
          start_session_action(session, command, body, actor, shared_respond);
        } catch (const std::exception& e) {
          logger_->error("admin: {} of session {}: {}", command, session, e.what());
          auto r = reply_error(Error(errc::internal, "internal error; see the broker log"));
          r.route = "/api/v1/sessions/{name}/" + command;
          (*shared_respond)(std::move(r));
        }
      });
  if (!queued) {
    auto r = reply_error(Error(errc::unavailable, "the broker is shutting down"));
    r.route = route;
    (*shared_respond)(std::move(r));
  }
  return true;
}

void AdminApi::start_session_action(const std::string& session, const std::string& command, const std::string& body,
                                    const std::string& actor, const std::shared_ptr<net::Responder>& respond) {
  auto fail = [&](const Error& e) {
    auto r = reply_error(e);
    r.route = "/api/v1/sessions/{name}/" + command;
    (*respond)(std::move(r));
  };
  auto action = std::make_shared<PendingAction>(work_, repository_, logger_, respond);
  action->session = session;
  action->command = command;
  action->actor = actor;
  // The body: {"title": ..., "text": ...} for a message; nothing (or {}) otherwise.
  if (command == "message" || !body.empty()) {
    auto parsed = parse_body(body);
    if (!parsed) return fail(parsed.error());
    bool has_text = false;
    for (const auto& [key, value] : *parsed) {
      const std::string k(key);
      if (command != "message")
        return fail(Error(errc::invalid_argument, "is not a member of a " + command + " request (send no body)", k));
      if (k != "title" && k != "text")
        return fail(Error(errc::invalid_argument, "is not a member of a message (use title, text)", k));
      if (value.is_null() && k == "title") continue;
      if (!value.is_string()) return fail(Error(errc::invalid_argument, "must be a string", k));
      const std::string v(value.get_string());
      const std::size_t max = k == "title" ? kMaxMessageTitle : kMaxMessageText;
      if (v.size() > max)
        return fail(Error(errc::invalid_argument, "must be at most " + std::to_string(max) + " bytes", k));
      if (auto bad = control_characters(v, k == "text"); !bad.empty())
        return fail(Error(errc::invalid_argument, bad, k));
      if (k == "title") {
        action->title = v;
      } else {
        if (v.empty()) return fail(Error(errc::invalid_argument, "must not be empty", k));
        action->text = v;
        has_text = true;
      }
    }
    if (command == "message" && !has_text) return fail(Error(errc::invalid_argument, "is required", "text"));
  }
  auto s = site_.get(model::Kind::session, session);
  if (!s) return fail(s.error());
  if (s->text("state") == "LoggedOff")
    return fail(Error(errc::conflict, "session '" + session + "' has already logged off"));
  action->machine = s->text("machine");
  auto st = launcher_->session_command(session, command, action->title, action->text,
                                       [action](bool ok, const std::string& error) { action->answered(ok, error); });
  if (!st) return fail(st.error());
}

// /api/v1/power-actions[/{id}[/cancel]] with a PowerManager. The actions are the manager's (its
// queues' memory; storage holds the same rows). Everything the manager could refuse as
// invalid_argument is checked here first, so that its invalid_argument on submit() can only mean
// "not power-managed" (409).
HttpResponse AdminApi::power_actions(const HttpRequest& req, const std::vector<std::string>& parts,
                                     const std::string& actor, broker::PowerManager& power) {
  const auto& m = req.method;
  auto with_route = [](HttpResponse r, const char* route) {
    r.route = route;
    return r;
  };
  // Audit entries of one request, in one transaction; a failure is logged (the change is made).
  auto write_audit = [&](const char* action, std::vector<storage::AuditEntry> entries) {
    auto st = repository_.write([&](storage::Transaction& tx) -> common::Status {
      for (auto& e : entries) {
        e.actor = actor;
        e.action = action;
        e.kind = "power_action";
        if (auto r = tx.append_audit(e); !r) return r;
      }
      return {};
    });
    if (!st) logger_->error("admin: cannot audit {} by {}: {}", action, actor, st.error().describe());
  };

  if (parts.size() == 3) {
    constexpr const char* route = "/api/v1/power-actions";
    if (m == "GET") {
      std::int64_t limit = 100, offset = 0;
      std::optional<std::string> machine, connection, reason;
      std::set<power::ActionState> states;
      std::set<power::Action> actions;
      for (const auto& [k, v] : req.query_params()) {
        if (k == "limit" || k == "offset") {
          std::int64_t n;
          if (!parse_int(v, n) || n < 0 || (k == "limit" && n > static_cast<std::int64_t>(options_.max_page)))
            return with_route(
                reply_error(Error(errc::invalid_argument,
                                  "must be an integer from 0 to " + std::to_string(options_.max_page), k)),
                route);
          (k == "limit" ? limit : offset) = n;
        } else if (k == "machine") {
          machine = v;
        } else if (k == "hypervisor_connection") {
          connection = v;
        } else if (k == "reason") {
          reason = v;
        } else if (k == "state") {
          for (const auto& name : split_list(v)) {
            power::ActionState st;
            if (!power::from_string(name, st))
              return with_route(reply_error(Error(errc::invalid_argument,
                                                  "'" + name + "' is not a state (use " + state_names() + ")", k)),
                                route);
            states.insert(st);
          }
          if (states.empty())
            return with_route(reply_error(Error(errc::invalid_argument, "must name a state", k)), route);
        } else if (k == "action") {
          for (const auto& name : split_list(v)) {
            power::Action a;
            if (!power::from_string(name, a))
              return with_route(reply_error(Error(errc::invalid_argument,
                                                  "'" + name + "' is not an action (use " + action_names() + ")", k)),
                                route);
            actions.insert(a);
          }
          if (actions.empty())
            return with_route(reply_error(Error(errc::invalid_argument, "must name an action", k)), route);
        } else {
          return with_route(reply_error(Error(errc::invalid_argument,
                                              "unknown query parameter (use machine, state, action, "
                                              "hypervisor_connection, reason, limit, offset)",
                                              k)),
                            route);
        }
      }
      auto all = power.actions();
      std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
      json::array items;
      std::int64_t total = 0;
      for (const auto& a : all) {
        if (machine && a.vm.machine != *machine) continue;
        if (connection && a.hypervisor_connection != *connection) continue;
        if (reason && a.reason != *reason) continue;
        if (!states.empty() && !states.contains(a.state)) continue;
        if (!actions.empty() && !actions.contains(a.action)) continue;
        if (total >= offset && total - offset < limit) items.push_back(action_json(a));
        ++total;
      }
      return with_route(
          json_reply(200,
                     json::object{{"items", std::move(items)}, {"total", total}, {"offset", offset}, {"limit", limit}}),
          route);
    }
    if (m != "POST") return with_route(method_not_allowed("GET, POST"), route);

    // POST {"machines": [...], "action": "TurnOn", "priority": 30?}
    auto body = parse_body(req.body);
    if (!body) return with_route(reply_error(body.error()), route);
    std::vector<std::string> machines;
    std::optional<power::Action> action;
    int priority = power::kAdminPriority;
    bool has_machines = false;
    for (const auto& [key, value] : *body) {
      const std::string k(key);
      if (k == "machines") {
        has_machines = true;
        if (!value.is_array())
          return with_route(reply_error(Error(errc::invalid_argument, "must be a list of machine names", k)), route);
        for (const auto& e : value.get_array()) {
          if (!e.is_string() || e.get_string().empty())
            return with_route(reply_error(Error(errc::invalid_argument, "must be a list of machine names", k)), route);
          std::string name(e.get_string());
          if (std::find(machines.begin(), machines.end(), name) == machines.end()) machines.push_back(std::move(name));
        }
      } else if (k == "action") {
        power::Action a;
        if (!value.is_string() || !power::from_string(value.get_string(), a))
          return with_route(reply_error(Error(errc::invalid_argument, "must be one of " + action_names(), k)), route);
        action = a;
      } else if (k == "priority") {
        auto p = priority_value(value);
        if (!p) return with_route(reply_error(p.error()), route);
        priority = *p;
      } else {
        return with_route(
            reply_error(Error(errc::invalid_argument,
                              "is not a member of a power action request (use machines, action, priority)", k)),
            route);
      }
    }
    if (!has_machines) return with_route(reply_error(Error(errc::invalid_argument, "is required", "machines")), route);
    if (machines.empty())
      return with_route(reply_error(Error(errc::invalid_argument, "must name at least one machine", "machines")),
                        route);
    if (machines.size() > options_.max_page)
      return with_route(
          reply_error(Error(errc::invalid_argument,
                            "must name at most " + std::to_string(options_.max_page) + " machines", "machines")),
          route);
    if (!action) return with_route(reply_error(Error(errc::invalid_argument, "is required", "action")), route);
    // The manager checks every machine before it queues anything: not_found (404) for an unknown
    // one; invalid_argument for one that is not power-managed, which is a 409 here (the request
    // is well-formed; the machine's catalog has no running hypervisor connection).
    auto submitted = power.submit(machines, *action, priority, "Admin");
    if (!submitted) {
      Error e = submitted.error();
      if (e.code == errc::invalid_argument) e.code = errc::conflict;
      return with_route(reply_error(e), route);
    }
    json::array items;
    std::vector<storage::AuditEntry> entries;
    for (const auto& a : *submitted) {
      json::object j = action_json(a);
      entries.push_back(audit_entry(a.id, nullptr, &j));
      items.push_back(std::move(j));
    }
    write_audit("power-action-create", entries);
    logger_->info("admin: {} queued {} for {} machine(s) (priority {})", actor, power::to_string(*action),
                  machines.size(), priority);
    return with_route(json_reply(201, json::object{{"items", std::move(items)}}), route);
  }

  const auto id = action_id(parts[3]);
  if (parts.size() == 5 && parts[4] == "cancel") {
    constexpr const char* route = "/api/v1/power-actions/{id}/cancel";
    if (m != "POST") return with_route(method_not_allowed("POST"), route);
    auto before = id ? power.get(*id) : std::nullopt;
    if (!before) return with_route(reply_error(no_action(parts[3])), route);
    if (before->state != power::ActionState::pending)
      return with_route(reply_error(not_pending(*before, "canceled")), route);
    if (auto st = power.cancel(*id); !st) return with_route(reply_error(st.error()), route);
    auto after = power.get(*id);
    if (!after) {  // forgotten at once (no retention): show what it became
      after = before;
      after->state = power::ActionState::canceled;
    }
    json::object j = action_json(*after);
    const json::object was = action_json(*before);
    write_audit("power-action-cancel", {audit_entry(*id, &was, &j)});
    logger_->info("admin: {} canceled power action {} ({} of {})", actor, *id, power::to_string(after->action),
                  after->vm.machine);
    return with_route(json_reply(200, j), route);
  }
  if (parts.size() != 4) {
    auto r = reply_error(Error(errc::not_found, "no such endpoint: " + req.path));
    r.route = "other";
    return r;
  }
  constexpr const char* route = "/api/v1/power-actions/{id}";
  if (m == "GET") {
    auto a = id ? power.get(*id) : std::nullopt;
    return with_route(a ? json_reply(200, action_json(*a)) : reply_error(no_action(parts[3])), route);
  }
  if (m != "PATCH") return with_route(method_not_allowed("GET, PATCH"), route);
  // PATCH {"priority": N}
  auto before = id ? power.get(*id) : std::nullopt;
  if (!before) return with_route(reply_error(no_action(parts[3])), route);
  auto body = parse_body(req.body);
  if (!body) return with_route(reply_error(body.error()), route);
  std::optional<int> priority;
  for (const auto& [key, value] : *body) {
    const std::string k(key);
    if (k != "priority")
      return with_route(reply_error(Error(errc::invalid_argument, "cannot be changed (only priority)", k)), route);
    auto p = priority_value(value);
    if (!p) return with_route(reply_error(p.error()), route);
    priority = *p;
  }
  if (!priority) return with_route(reply_error(Error(errc::invalid_argument, "is required", "priority")), route);
  if (before->state != power::ActionState::pending)
    return with_route(reply_error(not_pending(*before, "re-prioritised")), route);
  if (auto st = power.set_priority(*id, *priority); !st) return with_route(reply_error(st.error()), route);
  auto after = power.get(*id);
  if (!after) {
    after = before;
    after->actual_priority = *priority;
  }
  json::object j = action_json(*after);
  const json::object was = action_json(*before);
  write_audit("power-action-priority", {audit_entry(*id, &was, &j)});
  logger_->info("admin: {} set the priority of power action {} to {}", actor, *id, *priority);
  return with_route(json_reply(200, j), route);
}

void AdminApi::set_directory(DirectoryAccess access) { directory_ = std::move(access); }

// GET /api/v1/directory and GET /api/v1/directory/users/{name}; on the work queue.
HttpResponse AdminApi::directory(const HttpRequest& req, const std::vector<std::string>& parts) {
  if (req.method != "GET") return method_not_allowed("GET");
  if (parts.size() == 3) {
    const DirectoryStatus s = directory_.status ? directory_.status() : DirectoryStatus{};
    auto r = json_reply(200, json::object{{"backend", directory_.backend},
                                          {"reachable", s.reachable},
                                          {"server", s.server},
                                          {"last_error", s.last_error},
                                          {"connection_failures", s.connection_failures},
                                          {"cached_identities", s.cached_identities}});
    r.route = "/api/v1/directory";
    return r;
  }
  if (parts.size() != 5 || parts[3] != "users") {
    auto r = reply_error(Error(errc::not_found, "no such endpoint: " + req.path));
    r.route = "other";
    return r;
  }
  const auto with_route = [](HttpResponse r) {
    r.route = "/api/v1/directory/users/{name}";
    return r;
  };
  if (!directory_.directory) return with_route(reply_error(Error(errc::unavailable, "no directory")));
  std::string domain;
  for (const auto& [k, v] : req.query_params())
    if (k == "domain") domain = v;
  auto outcome = directory_.directory->lookup(parts[4], domain);
  if (!outcome) return with_route(reply_error(outcome.error()));
  json::object body{{"result", std::string(identity::to_string(outcome->result))}};
  if (const auto& id = outcome->identity) {
    json::array groups, sids;
    for (const auto& g : id->groups) groups.emplace_back(g);
    for (const auto& g : id->group_sids) sids.emplace_back(g);
    body["user_name"] = id->user_name;
    body["domain"] = id->domain;
    body["qualified_name"] = id->qualified_name;
    body["upn"] = id->upn;
    body["sid"] = id->sid;
    body["display_name"] = id->display_name;
    body["email"] = id->email;
    body["groups"] = std::move(groups);
    body["group_sids"] = std::move(sids);
  }
  return with_route(json_reply(200, body));
}

HttpResponse AdminApi::readyz() {
  json::object body;
  bool ready = true;
  auto ping = repository_.ping();
  body["storage"] = ping ? "ok" : ping.error().message;
  // Reported, but not a reason to be unready: the broker still serves cached identities,
  // enumerations of users already known and every admin and agent request (docs/directory.md).
  if (directory_.status) {
    const DirectoryStatus d = directory_.status();
    body["directory"] = d.reachable ? std::string("ok") : "unreachable: " + d.last_error;
  } else {
    body["directory"] = "ok";
  }
  ready = ready && ping.has_value();
  json::array names;
  if (listeners_ready_)
    for (const auto& n : listener_names_) names.emplace_back(n);
  body["listeners"] = std::move(names);
  ready = ready && listeners_ready_;
  body["ready"] = ready;
  auto r = json_reply(ready ? 200 : 503, body);
  r.route = "/readyz";
  return r;
}

HttpResponse AdminApi::metrics() {
  metrics_.set("broker_up", {}, 1);
  if (const auto* engine = engine_.load()) {
    metrics_.clear("broker_machines");
    for (const auto& [state, n] : engine->registration_counts())
      metrics_.set("broker_machines", {{"registration_state", state}}, static_cast<double>(n));
  } else if (auto counts = site_.count_by(model::Kind::machine, "registration_state")) {
    metrics_.clear("broker_machines");
    for (const auto& [state, n] : *counts)
      metrics_.set("broker_machines", {{"registration_state", state}}, static_cast<double>(n));
  }
  if (auto counts = site_.count_by(model::Kind::session, "state")) {
    metrics_.clear("broker_sessions");
    for (const auto& [state, n] : *counts) metrics_.set("broker_sessions", {{"state", state}}, static_cast<double>(n));
  }
  if (auto* power = power_.load()) {
    const auto stats = power->stats();
    metrics_.clear("broker_power_actions");
    metrics_.clear("broker_power_queue_depth");
    for (const auto& [connection, st] : stats) {
      for (std::size_t i = 0; i < power::kActionStateCount; ++i)
        metrics_.set("broker_power_actions",
                     {{"hypervisor_connection", connection},
                      {"state", std::string(power::to_string(static_cast<power::ActionState>(i)))}},
                     static_cast<double>(st.by_state[i]));
      metrics_.set("broker_power_queue_depth", {{"hypervisor_connection", connection}},
                   static_cast<double>(st.queue_depth));
    }
  }
  HttpResponse r;
  r.content_type = "text/plain; version=0.0.4; charset=utf-8";
  r.body = metrics_.render();
  r.route = "/metrics";
  return r;
}

// GET /api/v1/audit. storage::AuditQuery filters on kind, object and actor; the action filter is
// applied here, scanning the (filtered) log newest first in one read transaction.
HttpResponse AdminApi::audit(const HttpRequest& req) {
  storage::AuditQuery q;
  std::vector<std::string> actions;  // empty: any
  for (const auto& [k, v] : req.query_params()) {
    if (k == "kind") q.kind = v;
    else if (k == "object") q.object = v;
    else if (k == "actor") q.actor = v;
    else if (k == "action") {
      for (const auto& a : split_list(v)) actions.push_back(a);
      if (actions.empty()) return reply_error(Error(errc::invalid_argument, "must name at least one action", k));
    } else if (k == "limit" || k == "offset") {
      std::int64_t n;
      if (!parse_int(v, n) || n < 0 || (k == "limit" && n > static_cast<std::int64_t>(options_.max_page)))
        return reply_error(
            Error(errc::invalid_argument, "must be an integer from 0 to " + std::to_string(options_.max_page), k));
      (k == "limit" ? q.limit : q.offset) = n;
    } else {
      return reply_error(
          Error(errc::invalid_argument, "unknown query parameter (use kind, object, actor, action, limit, offset)", k));
    }
  }
  std::vector<storage::AuditEntry> entries;
  auto st = repository_.read([&](storage::Transaction& tx) -> common::Status {
    if (actions.empty()) {
      auto r = tx.list_audit(q);
      if (!r) return r.error();
      entries = std::move(*r);
      return {};
    }
    storage::AuditQuery chunk = q;
    chunk.offset = 0;
    chunk.limit = kAuditScanChunk;
    std::int64_t skipped = 0;
    while (static_cast<std::int64_t>(entries.size()) < q.limit) {
      auto r = tx.list_audit(chunk);
      if (!r) return r.error();
      for (auto& e : *r) {
        if (std::find(actions.begin(), actions.end(), e.action) == actions.end()) continue;
        if (skipped < q.offset) ++skipped;
        else if (static_cast<std::int64_t>(entries.size()) < q.limit) entries.push_back(std::move(e));
      }
      if (static_cast<std::int64_t>(r->size()) < chunk.limit) break;
      chunk.offset += chunk.limit;
    }
    return {};
  });
  if (!st) return reply_error(st.error());
  json::array items;
  for (const auto& e : entries)
    items.push_back(json::object{{"id", e.id}, {"time", e.time}, {"actor", e.actor}, {"action", e.action},
                                 {"kind", e.kind}, {"object", e.object}, {"before", audit_side(e.before)},
                                 {"after", audit_side(e.after)}});
  return json_reply(200, json::object{{"items", std::move(items)}, {"offset", q.offset}, {"limit", q.limit}});
}

HttpResponse AdminApi::dispatch(const HttpRequest& req, const std::string& actor) {
  const auto& m = req.method;
  if (req.path == "/readyz") return m == "GET" ? readyz() : method_not_allowed("GET");
  if (req.path == "/metrics") return m == "GET" ? metrics() : method_not_allowed("GET");

  const auto parts = split_path(req.path);
  if (parts.size() < 3 || parts[0] != "api" || parts[1] != "v1") {
    auto r = reply_error(Error(errc::not_found, "no such endpoint: " + req.path));
    r.route = "other";
    return r;
  }
  const std::string& noun = parts[2];
  auto with_route = [](HttpResponse r, std::string route) {
    r.route = std::move(route);
    return r;
  };

  if (noun == "info" && parts.size() == 3) {
    if (m != "GET") return method_not_allowed("GET");
    auto site = site_.site();
    json::object body{{"version", common::kVersion},
                      {"schema_version", repository_.schema().version},
                      {"site_name", site ? site->text("site_name") : std::string()},
                      {"uptime_seconds", std::chrono::duration_cast<std::chrono::seconds>(
                                             std::chrono::steady_clock::now() - started_).count()}};
    return with_route(json_reply(200, body), "/api/v1/info");
  }

  if (noun == "directory") return directory(req, parts);

  if (noun == "audit" && parts.size() == 3) {
    if (m != "GET") return method_not_allowed("GET");
    return with_route(audit(req), "/api/v1/audit");
  }

  if (noun == "site" && parts.size() == 3) {
    if (m == "GET") {
      auto site = site_.site();
      return with_route(site ? json_reply(200, model::to_json(*site)) : reply_error(site.error()), "/api/v1/site");
    }
    if (m != "PATCH") return method_not_allowed("GET, PATCH");
    auto body = parse_body(req.body);
    if (!body) return reply_error(body.error());
    auto site = site_.site();
    if (!site) return reply_error(site.error());
    model::Object candidate = *site;
    if (auto st = model::merge_json(*body, candidate); !st) return reply_error(st.error());
    candidate.name = "site";
    auto updated = site_.update("site", candidate, actor);
    return with_route(updated ? json_reply(200, model::to_json(*updated)) : reply_error(updated.error()), "/api/v1/site");
  }

  if (noun == "power-actions") {
    if (auto* power = power_.load()) return power_actions(req, parts, actor, *power);
    // Without a power manager the stored actions stay listed (the read-only routes below); the
    // changes need one.
    std::string route;
    if (parts.size() == 3 && m == "POST")
      route = "/api/v1/power-actions";
    else if (parts.size() == 4 && m == "PATCH")
      route = "/api/v1/power-actions/{id}";
    else if (parts.size() == 5 && parts[4] == "cancel")
      route = "/api/v1/power-actions/{id}/cancel";
    if (!route.empty())
      return with_route(
          reply_error(Error(errc::unavailable, "power actions cannot be changed: this broker has no power manager")),
          route);
  }

  const model::KindSpec* ks = model::find_kind(noun);
  if (ks && ks->kind == model::Kind::machine && parts.size() == 5 && parts[4] == "secret") {
    if (m != "POST") return method_not_allowed("POST");
    auto secret = site_.rotate_machine_secret(parts[3], actor);
    if (!secret) return with_route(reply_error(secret.error()), "/api/v1/machines/{name}/secret");
    return with_route(json_reply(200, json::object{{"machine", parts[3]}, {"secret", *secret},
                                                   {"note", "shown once; the agent authenticates with it"}}),
                      "/api/v1/machines/{name}/secret");
  }
  if (!ks || ks->plural != noun || ks->kind == model::Kind::site || parts.size() > 4) {
    auto r = reply_error(Error(errc::not_found, "no such endpoint: " + req.path));
    r.route = "other";
    return r;
  }
  const std::string base = "/api/v1/" + std::string(ks->plural);

  if (parts.size() == 3) {
    const std::string route = base;
    if (m == "GET") {
      storage::Query q;
      q.limit = 100;
      for (const auto& [k, v] : req.query_params()) {
        if (k == "limit" || k == "offset") {
          std::int64_t n;
          if (!parse_int(v, n) || n < 0 || (k == "limit" && n > static_cast<std::int64_t>(options_.max_page)))
            return with_route(reply_error(Error(errc::invalid_argument,
                                                "must be an integer from 0 to " + std::to_string(options_.max_page), k)),
                              route);
          (k == "limit" ? q.limit : q.offset) = n;
          continue;
        }
        const auto* f = ks->field(k);
        if (k != "name" && k != "owner" && (!f || f->secret))
          return with_route(reply_error(Error(errc::invalid_argument, "cannot filter on this; not a field of " +
                                                                          std::string(ks->name), k)),
                            route);
        q.equals.emplace_back(k, v);
      }
      // A machine's live fields (registration_state, load_index, summary_state, session_count)
      // are the engine's, not storage's: a filter on one is applied to the overlaid objects in
      // memory, and the page cut from what matched (this lists every machine the other filters
      // match).
      std::vector<std::pair<std::string, std::string>> live_filters;
      if (ks->kind == model::Kind::machine && engine_.load())
        std::erase_if(q.equals, [&](const auto& filter) {
          const bool is_live = filter.first == "registration_state" || filter.first == "load_index" ||
                               filter.first == "summary_state" || filter.first == "session_count";
          if (is_live) live_filters.push_back(filter);
          return is_live;
        });
      if (!live_filters.empty()) {
        storage::Query stored = q;
        stored.offset = 0;
        stored.limit = -1;
        auto all = site_.list(ks->kind, stored);
        if (!all) return with_route(reply_error(all.error()), route);
        const auto text_of = [](const model::Value& v) -> std::string {
          if (const auto* s = std::get_if<std::string>(&v)) return *s;
          if (const auto* i = std::get_if<std::int64_t>(&v)) return std::to_string(*i);
          if (const auto* b = std::get_if<bool>(&v)) return *b ? "true" : "false";
          return {};
        };
        broker::Page page;
        for (auto& o : all->items) {
          o = live(std::move(o));
          const bool matches = std::all_of(live_filters.begin(), live_filters.end(), [&](const auto& filter) {
            auto it = o.fields.find(filter.first);
            return it != o.fields.end() && text_of(it->second) == filter.second;
          });
          if (!matches) continue;
          if (page.total >= q.offset && (q.limit < 0 || page.total < q.offset + q.limit))
            page.items.push_back(std::move(o));
          ++page.total;
        }
        return with_route(json_reply(200, page_json(page, q.offset, q.limit)), route);
      }
      auto page = site_.list(ks->kind, q);
      if (!page) return with_route(reply_error(page.error()), route);
      for (auto& o : page->items) o = live(std::move(o));
      return with_route(json_reply(200, page_json(*page, q.offset, q.limit)), route);
    }
    if (m == "POST" && ks->api_writable) {
      auto body = parse_body(req.body);
      if (!body) return with_route(reply_error(body.error()), route);
      model::Object candidate = model::make_default(ks->kind);
      if (auto st = take_password(*body, candidate); !st) return with_route(reply_error(st.error()), route);
      if (auto st = model::merge_json(*body, candidate); !st) return with_route(reply_error(st.error()), route);
      auto created = site_.create(std::move(candidate), actor);
      if (!created) return with_route(reply_error(created.error()), route);
      auto r = json_reply(201, model::to_json(*created));
      r.headers.emplace_back("Location", base + "/" + net::percent_encode(created->name));
      return with_route(std::move(r), route);
    }
    return with_route(method_not_allowed(ks->api_writable ? "GET, POST" : "GET"), route);
  }

  // /api/v1/{plural}/{name}
  const std::string route = base + "/{name}";
  const std::string& name = parts[3];
  if (m == "GET") {
    auto obj = site_.get(ks->kind, name);
    if (!obj) return with_route(reply_error(obj.error()), route);
    json::object body = model::to_json(live(*obj));
    if (auto* power = power_.load(); power && ks->kind == model::Kind::machine) {
      json::array pending;
      for (const auto& a : power->actions())
        if (a.vm.machine == obj->name && !power::finished(a.state))
          pending.push_back(json::object{{"id", a.id},
                                         {"action", power::to_string(a.action)},
                                         {"state", power::to_string(a.state)},
                                         {"actual_priority", a.actual_priority}});
      body["pending_power_actions"] = std::move(pending);
    }
    return with_route(json_reply(200, body), route);
  }
  if (!ks->api_writable) return with_route(method_not_allowed("GET"), route);
  if (m == "DELETE") {
    auto st = site_.remove(ks->kind, name, actor);
    if (!st) return with_route(reply_error(st.error()), route);
    HttpResponse r;
    r.status = 204;
    r.content_type.clear();
    return with_route(std::move(r), route);
  }
  if (m == "PATCH" || m == "PUT") {
    auto body = parse_body(req.body);
    if (!body) return with_route(reply_error(body.error()), route);
    auto existing = site_.get(ks->kind, name);
    if (!existing) return with_route(reply_error(existing.error()), route);
    model::Object candidate = *existing;
    if (m == "PUT") {
      // Replace: every settable field back to its default unless given; secrets are kept.
      candidate = model::make_default(ks->kind, existing->name);
      for (const auto& f : ks->fields)
        if (f.secret || f.state)
          if (auto it = existing->fields.find(f.name); it != existing->fields.end())
            candidate.fields[std::string(f.name)] = it->second;
    }
    if (auto st = take_password(*body, candidate); !st) return with_route(reply_error(st.error()), route);
    if (auto st = model::merge_json(*body, candidate); !st) return with_route(reply_error(st.error()), route);
    auto updated = site_.update(name, std::move(candidate), actor);
    return with_route(updated ? json_reply(200, model::to_json(live(*updated))) : reply_error(updated.error()), route);
  }
  return with_route(method_not_allowed("GET, PATCH, PUT, DELETE"), route);
}

}  // namespace admin
