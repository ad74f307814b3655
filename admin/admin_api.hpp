// admin/admin_api.hpp: the REST/JSON admin API, health and metrics on the admin listener.
// Routes and shapes: docs/openapi.yaml. It only translates: HTTP + JSON in, calls on
// broker::SiteObjects on the work queue, JSON out; errors become replies in one place
// (reply_error).
#pragma once

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
class SiteObjects;
}
namespace storage {
class Repository;
}

namespace admin {

struct Token {
  std::string name;
  std::string sha256;  // lower-case hex of the bearer token
};

struct AdminOptions {
  std::vector<Token> tokens;
  std::vector<std::string> unauthenticated_paths;  // besides /healthz
  std::size_t max_page = 1000;
};

class AdminApi {
 public:
  AdminApi(broker::SiteObjects& site, storage::Repository& repository, common::WorkQueue& work,
           common::Metrics& metrics, AdminOptions options, std::shared_ptr<spdlog::logger> logger);

  // The net::HttpHandler of the admin listener. Called on an I/O thread; never blocks.
  void handle(net::HttpRequest&& request, net::Responder respond);

  // /readyz reports not ready until the daemon says its listeners are up.
  void set_listeners_ready(std::vector<std::string> names);

 private:
  net::HttpResponse dispatch(const net::HttpRequest& request, const std::string& actor);
  net::HttpResponse readyz();
  net::HttpResponse metrics();

  broker::SiteObjects& site_;
  storage::Repository& repository_;
  common::WorkQueue& work_;
  common::Metrics& metrics_;
  AdminOptions options_;
  std::shared_ptr<spdlog::logger> logger_;
  std::chrono::steady_clock::time_point started_;
  std::atomic<bool> listeners_ready_{false};
  std::vector<std::string> listener_names_;  // written once before listeners_ready_ is set
};

}  // namespace admin
