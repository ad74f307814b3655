// xmlservice/sta_service.hpp: the Secure Ticket Authority served on the XML listener
// (POST /scripts/ctxsta.dll), as Citrix controllers serve it to StoreFront and gateways.
//
//   * a front end deposits connection data (TicketData: ICAAddress, XData, ...) with RequestTicket
//     and gets a fresh ticket: AuthorityID, Ticket, TicketVersion;
//   * a gateway presents that ticket with RequestData and gets the deposited data back, once:
//     the ticket is deleted when it is redeemed, and is redeemable only within its lifetime.
//
// Tickets live in memory only, like a Citrix STA's: a restart of brokerd invalidates every
// outstanding ticket (they last 100 s by default, so a launch in flight is retried by the user).
// The store is bounded (count and bytes); expired tickets are purged at every request.
// The shapes on the wire are the codec's (xmlservice/sta_codec.hpp); the contract for admins
// and gateway writers is docs/nfuse.md, "Secure Ticket Authority".
#pragma once

#include "net/http.hpp"

#include <spdlog/fwd.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace common {
class Clock;
class Metrics;
}  // namespace common

namespace xmlservice {

struct StaOptions {
  // The AuthorityID this STA answers with and accepts in RequestData. Never empty; see
  // default_authority_id().
  std::string authority_id;
  // How long a ticket can be redeemed after it was issued (Citrix's default is 100 s).
  std::chrono::seconds ticket_lifetime{100};
  // IP addresses and CIDR ranges that may call the STA; empty: any client that reaches the XML
  // listener. Others get ResponseError not-trusted.
  std::vector<std::string> allowed_clients;
  // Bounds of the in-memory store. A RequestTicket beyond them gets ResponseError unspecified
  // (outstanding tickets are never evicted to make room).
  std::size_t max_tickets = 100000;
  std::size_t max_ticket_data_bytes = 64 * 1024;    // names + values of one ticket
  std::size_t max_total_bytes = 128 * 1024 * 1024;  // names + values of all held tickets
};

// The AuthorityID of a site without a configured one: "STA" followed by 12 upper-case hex digits
// derived (HMAC-SHA256) from the site key, so it is stable for a database and its key file, and
// has the form of a Citrix STA ID ("STA" + a MAC address). Pure; any thread.
std::string default_authority_id(std::string_view site_key);

class StaService {
 public:
  static constexpr std::string_view kPath = "/scripts/ctxsta.dll";

  // `clock` and `metrics` must outlive the service. Describes its metric families:
  // broker_sta_requests_total{request,result}, broker_sta_request_duration_seconds{request},
  // broker_sta_tickets_outstanding.
  StaService(StaOptions options, const common::Clock& clock, common::Metrics& metrics,
             std::shared_ptr<spdlog::logger> logger);
  ~StaService();
  StaService(const StaService&) = delete;
  StaService& operator=(const StaService&) = delete;

  // True for kPath, in any case (IIS paths are case-insensitive): the XML listener routes these
  // requests here.
  static bool serves(std::string_view path);

  // A net::HttpHandler. Answers before returning, on the calling (I/O) thread: the work is
  // parsing one bounded body and a short critical section, with no I/O.
  void handle(net::HttpRequest&& request, net::Responder respond);

  // The reply to one request; any thread. 404 for another path, 405 (Allow: POST) for another
  // method; otherwise 200 with a CtxSTAProtocol document: ResponseTicket, ResponseData or
  // ResponseError (bad-request, not-trusted, unsupported-ticket-type, invalid-ticket,
  // unspecified). Logs one line per POST (never a ticket in full, never a TicketData value)
  // and counts it in the metrics.
  net::HttpResponse process(const net::HttpRequest& request);

  // Tickets held now, after purging the expired ones.
  std::size_t outstanding() const;
  const std::string& authority_id() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace xmlservice
