// net/http.hpp: the plain HTTP request and response types that handlers see. No Beast or Asio
// here, so protocol modules (admin, xmlservice) stay cheap to compile and testable with strings.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace common {
class WorkQueue;
}

namespace net {

struct CaseInsensitiveLess {
  using is_transparent = void;
  bool operator()(std::string_view a, std::string_view b) const;
};

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // as sent: "/api/v1/machines?limit=10"
  std::string path;    // target up to '?', percent-decoded
  std::string query;   // after '?', raw
  std::map<std::string, std::string, CaseInsensitiveLess> headers;
  std::string body;
  std::string remote_address;  // peer IP, no port
  std::string listener;        // listener name: "xml", "agent", "admin"
  bool tls = false;

  std::string header(std::string_view name) const;  // "" when absent
  // Decoded query parameters in order (a=1&b=x%20y).
  std::vector<std::pair<std::string, std::string>> query_params() const;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;  // extra headers
  std::string route;  // label for metrics ("/api/v1/{kind}"); the handler sets it, default: path
};

// Called once per request on an I/O thread. It must not block: blocking work goes to a work
// queue, and `respond` may then be called from any thread, exactly once.
using Responder = std::function<void(HttpResponse)>;
using HttpHandler = std::function<void(HttpRequest&& request, Responder respond)>;

// Answers `request` from `queue`'s threads (for handlers whose work blocks): `work` builds the
// response there. When `work` throws, or the queue has stopped (shutdown), `failure` builds the
// reply from a status (500 or 503) and a message that is safe to show.
void respond_from_queue(common::WorkQueue& queue, HttpRequest&& request, Responder respond,
                        std::function<HttpResponse(const HttpRequest&)> work,
                        std::function<HttpResponse(int status, const std::string& message)> failure);

std::string percent_decode(std::string_view s, bool plus_is_space = false);
// Encodes every byte except the unreserved ones (A-Z a-z 0-9 - _ . ~), for one path segment or
// query value.
std::string percent_encode(std::string_view s);
std::string reason_phrase(int status);

}  // namespace net
