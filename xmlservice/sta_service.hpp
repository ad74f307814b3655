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
// The store is bounded (count and bytes, in all and per client); expired tickets are purged at
// every request. Only the front ends may call it by default (allowed_clients).
// The shapes on the wire are the codec's (xmlservice/sta_codec.hpp); the contract for admins
// and gateway writers is docs/nfuse.md, "Secure Ticket Authority".
#pragma once

#include "net/http.hpp"

#include <spdlog/fwd.h>

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace common {
class Clock;
class Metrics;
class WorkQueue;
}  // namespace common

namespace xmlservice {

struct StaOptions {
  // The AuthorityID this STA answers with and accepts in RequestData. Never empty; see
  // default_authority_id().
  std::string authority_id;
  // How long a ticket can be redeemed after it was issued (Citrix's default is 100 s).
  std::chrono::seconds ticket_lifetime{100};
  // Who may call the STA (others get ResponseError not-trusted, before their body is read): IP
  // addresses, CIDR ranges, and the words "any" (every client that reaches the XML listener),
  // "loopback" (127.0.0.0/8, ::1) and "trusted_front_ends" (the site's trusted_front_ends, from
  // `trusted_front_ends` at each request). The default admits the front ends and loopback; an
  // empty list admits nobody.
  std::vector<std::string> allowed_clients = {"trusted_front_ends", "loopback"};
  // The site's trusted_front_ends now, or nullopt when they cannot be read (the request is then
  // answered `unspecified`). Called for a client that nothing else in allowed_clients admits;
  // may block (storage): give the service a work queue. Unset: no front ends.
  std::function<std::optional<std::vector<std::string>>()> trusted_front_ends;
  // Bounds of the in-memory store, in all and per client (the address a ticket was issued to).
  // A RequestTicket beyond them gets ResponseError unspecified (outstanding tickets are never
  // evicted to make room); names + values count as the bytes of a ticket.
  std::size_t max_tickets = 100000;
  std::size_t max_ticket_data_bytes = 64 * 1024;    // one ticket
  std::size_t max_total_bytes = 128 * 1024 * 1024;  // all held tickets
  std::size_t max_tickets_per_client = 10000;
  std::size_t max_bytes_per_client = 16 * 1024 * 1024;
};

// The AuthorityID of a site without a configured one: "STA" followed by 12 upper-case hex digits
// derived (HMAC-SHA256) from the site key, so it is stable for a database and its key file, and
// has the form of a Citrix STA ID ("STA" + a MAC address). Pure; any thread.
std::string default_authority_id(std::string_view site_key);

class StaService {
 public:
  static constexpr std::string_view kPath = "/scripts/ctxsta.dll";

  // `clock`, `metrics` and `work` must outlive the service. Describes its metric families:
  // broker_sta_requests_total{request,result}, broker_sta_request_duration_seconds{request},
  // broker_sta_tickets_outstanding, broker_sta_bytes_outstanding. With `work`, handle()
  // answers from that queue (options.trusted_front_ends may block).
  StaService(StaOptions options, const common::Clock& clock, common::Metrics& metrics,
             std::shared_ptr<spdlog::logger> logger, common::WorkQueue* work = nullptr);
  ~StaService();
  StaService(const StaService&) = delete;
  StaService& operator=(const StaService&) = delete;

  // True for kPath, in any case (IIS paths are case-insensitive): the XML listener routes these
  // requests here.
  static bool serves(std::string_view path);

  // A net::HttpHandler: answers from the work queue when the service has one (503 when it is
  // shutting down), else before returning, on the calling thread.
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
