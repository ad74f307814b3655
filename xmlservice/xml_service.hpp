// xmlservice/xml_service.hpp: the NFuse XML service on the XML listener
// (POST /scripts/wpnbr.dll). It only translates: the codec turns the body into a typed request,
// the identity directory says who is asking, the entitlement engine says what they may see, and
// the codec renders the typed reply. Errors become NFuse ErrorIds in one place (reply_error in
// the .cpp). Dialect: docs/nfuse.md.
//
// Reads come from the engine (broker::Engine), never from storage: the site settings and the
// configuration from its immutable SiteView, the requester's direct assignments and the
// registered machines from its state (docs/architecture.md "Enumeration"). Only the directory
// (and the launcher, for launches) may touch storage.
#pragma once

#include "net/http.hpp"

#include <spdlog/fwd.h>

#include <cstddef>
#include <memory>

namespace common {
class Clock;
class Metrics;
class WorkQueue;
}  // namespace common
namespace broker {
class Engine;
class Launcher;
}  // namespace broker
namespace identity {
class Directory;
}

namespace xmlservice {

struct XmlServiceOptions {
  // Failed password logons a source address may have per minute before its password logons are
  // refused (`service-unavailable`) without consulting the directory; 0: no limit. See
  // logon_throttle.hpp and docs/nfuse.md "Failed logons per address".
  int failed_logons_per_minute = 30;
  std::size_t max_throttled_sources = 10000;  // sources tracked for that
  // Base64 icon bytes (IconData and the legacy Icon) one RequestAppData reply may carry in all.
  // Resources past it are listed without icons (clients draw their own default) and the log line
  // says so. Each distinct icon is drawn once per request. docs/nfuse.md "Field limits".
  std::size_t max_icon_bytes = 32u << 20;
  // The time source of the throttle; null: the system clock. Must outlive the service.
  const common::Clock* clock = nullptr;
};

class XmlService {
 public:
  // Without a launcher the launch requests (RequestAddress, RequestTicket, ...) answer
  // `unspecified` and are not advertised. Password checks go through
  // Directory::authenticate_async, so with a directory that hashes on a pool of its own a
  // request that waits for a hash holds no work-queue thread meanwhile. Keeps references to
  // the directory, the engine, the work queue and the metrics; they must outlive the service.
  XmlService(identity::Directory& directory, broker::Engine& engine, common::WorkQueue& work, common::Metrics& metrics,
             std::shared_ptr<spdlog::logger> logger, broker::Launcher* launcher = nullptr,
             XmlServiceOptions options = {});
  ~XmlService();

  // The net::HttpHandler of the XML listener. Called on an I/O thread; never blocks (requests
  // are processed on the work queue: the directory's look-ups may block).
  void handle(net::HttpRequest&& request, net::Responder respond);

  // Processes one request and calls respond once, from any thread. May block in the directory
  // (run it on the work queue); a launch answers later, when the agent has prepared the session, and a
  // password check may answer later, from the thread the directory finishes it on.
  void process(const net::HttpRequest& request, net::Responder respond);
  // The same, waiting for the answer (tests, benchmarks; never on the work queue's threads).
  net::HttpResponse process(const net::HttpRequest& request);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace xmlservice
