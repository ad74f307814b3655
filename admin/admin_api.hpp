// admin/admin_api.hpp: the REST/JSON admin API, health and metrics on the admin listener.
// Routes and shapes: docs/openapi.yaml. It only translates: HTTP + JSON in, calls on
// broker::SiteObjects (broker::Launcher for session actions, broker::PowerManager for power
// actions) on the work queue, JSON out; errors become replies in one place (reply_error).
#pragma once

#include "common/model.hpp"
#include "net/http.hpp"

#include <spdlog/fwd.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace common {
class Metrics;
class WorkQueue;
}  // namespace common
namespace broker {
class Launcher;
class PowerManager;
class Engine;
class SiteObjects;
}  // namespace broker
namespace storage {
class Repository;
}
namespace identity {
class Directory;
}

namespace admin {

struct Token {
  std::string name;
  std::string sha256;  // lower-case hex of the bearer token
};

// Request bodies nesting arrays and objects deeper than this (the body's own object is level 1)
// are refused with 400 before anything else is looked at (docs/SECURITY.md section 7.5).
inline constexpr std::size_t kMaxJsonDepth = 32;

struct AdminOptions {
  std::vector<Token> tokens;
  std::vector<std::string> unauthenticated_paths;  // besides /healthz
  // The most items one list request returns (`limit`), and the most machines one power-action
  // request names.
  std::size_t max_page = 1000;
};

// The directory's state as the admin API shows it (GET /api/v1/directory, /readyz).
struct DirectoryStatus {
  bool reachable = true;
  std::string server;      // the LDAP server last reached
  std::string last_error;  // the last connection failure
  std::uint64_t connection_failures = 0;
  std::size_t cached_identities = 0;
};

struct DirectoryAccess {
  std::string backend = "builtin";
  identity::Directory* directory = nullptr;   // GET /api/v1/directory/users/{name}; null: 503
  std::function<DirectoryStatus()> status;    // null: always reachable
};

class AdminApi {
 public:
  // `launcher` (may be null: the session actions then answer 503) sends the session actions
  // (POST /api/v1/sessions/{name}/logoff|disconnect|message) to the agents. Every reference and
  // the launcher must outlive the AdminApi; `work` and `repository` must also outlive the agent
  // endpoint, whose late answers (timeouts at shutdown) post the audit entry to `work`.
  AdminApi(broker::SiteObjects& site, storage::Repository& repository, common::WorkQueue& work,
           common::Metrics& metrics, AdminOptions options, std::shared_ptr<spdlog::logger> logger,
           broker::Launcher* launcher = nullptr);

  // The net::HttpHandler of the admin listener. Called on an I/O thread; never blocks. Session
  // actions answer once the agent has (up to the launcher's command timeout, 20 s).
  void handle(net::HttpRequest&& request, net::Responder respond);

  // /readyz reports not ready until the daemon says its listeners are up.
  void set_listeners_ready(std::vector<std::string> names);

  // Serves the power actions through `power` (docs/power.md "Admin API and brokerctl"):
  // GET/POST /api/v1/power-actions, GET/PATCH /api/v1/power-actions/{id},
  // POST /api/v1/power-actions/{id}/cancel, the pending actions in GET /api/v1/machines/{name}
  // and the broker_power_* gauges of /metrics. Without it (nullptr, the default) the listing is
  // read from storage and the changes answer 503. Call before the admin listener serves (or
  // any time: the pointer is read atomically per request); `power` must outlive the AdminApi
  // and the requests already dispatched to it.
  void set_power_manager(broker::PowerManager* power);
  // Machines' live fields (registration_state, load_index, summary_state) and the
  // broker_machines gauge come from the engine (they are not stored). Same lifetime rules as
  // set_power_manager.
  void set_engine(const broker::Engine* engine);
  // The user directory (docs/directory.md): GET /api/v1/directory (backend and state),
  // GET /api/v1/directory/users/{name}[?domain=D] (a trusted look-up: identity and groups, as
  // `brokerctl directory test` prints them) and the "directory" member of /readyz. Call before the
  // admin listener serves; the directory must outlive the AdminApi.
  void set_directory(DirectoryAccess access);

 private:
  net::HttpResponse dispatch(const net::HttpRequest& request, const std::string& actor);
  net::HttpResponse audit(const net::HttpRequest& request);
  // POST /api/v1/sessions/{name}/{logoff,disconnect,message}: false when `request` is not one
  // of those (then `respond` is untouched); else it has taken `respond` and answers later.
  bool session_action(net::HttpRequest& request, const std::string& actor, net::Responder& respond);
  // The part of a session action that runs on the work queue.
  void start_session_action(const std::string& session, const std::string& command, const std::string& body,
                            const std::string& actor, const std::shared_ptr<net::Responder>& respond);
  // /api/v1/power-actions[/{id}[/cancel]] with a PowerManager; on the work queue.
  net::HttpResponse power_actions(const net::HttpRequest& request, const std::vector<std::string>& parts,
                                  const std::string& actor, broker::PowerManager& power);
  net::HttpResponse readyz();
  net::HttpResponse directory(const net::HttpRequest& request, const std::vector<std::string>& parts);
  net::HttpResponse metrics();

  broker::SiteObjects& site_;
  storage::Repository& repository_;
  common::WorkQueue& work_;
  common::Metrics& metrics_;
  AdminOptions options_;
  std::shared_ptr<spdlog::logger> logger_;
  broker::Launcher* launcher_;  // may be null
  std::atomic<broker::PowerManager*> power_{nullptr};
  std::atomic<const broker::Engine*> engine_{nullptr};
  // The object as admins see it: a machine with its live fields from the engine.
  common::model::Object live(common::model::Object object) const;
  std::chrono::steady_clock::time_point started_;
  std::atomic<bool> listeners_ready_{false};
  std::vector<std::string> listener_names_;  // written once before listeners_ready_ is set
  DirectoryAccess directory_;                // set before the listener serves
};

}  // namespace admin
