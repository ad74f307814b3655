// xmlservice/xml_service.hpp: the NFuse XML service on the XML listener
// (POST /scripts/wpnbr.dll). It only translates: the codec turns the body into a typed request,
// the identity directory says who is asking, the entitlement engine says what they may see, and
// the codec renders the typed reply. Errors become NFuse ErrorIds in one place (reply_error in
// the .cpp). Dialect: docs/nfuse.md.
#pragma once

#include "net/http.hpp"

#include <spdlog/fwd.h>

#include <memory>

namespace common {
class Metrics;
class WorkQueue;
}  // namespace common
namespace broker {
class SiteObjects;
}
namespace identity {
class Directory;
}
namespace storage {
class Repository;
}

namespace xmlservice {

class XmlService {
 public:
  XmlService(identity::Directory& directory, broker::SiteObjects& site, storage::Repository& repository,
             common::WorkQueue& work, common::Metrics& metrics, std::shared_ptr<spdlog::logger> logger);
  ~XmlService();

  // The net::HttpHandler of the XML listener. Called on an I/O thread; never blocks (requests
  // are processed on the work queue: password checks and storage reads block).
  void handle(net::HttpRequest&& request, net::Responder respond);

  // Processes one request body from `remote_address` synchronously (tests, benchmarks).
  net::HttpResponse process(const net::HttpRequest& request);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace xmlservice
