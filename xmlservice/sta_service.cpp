// xmlservice/sta_service.cpp: the ticket store behind /scripts/ctxsta.dll.
//
// Concurrency: the ticket store (Impl::tickets, by_expiry, total_bytes, per_client) is guarded by
// Impl::mutex;
// the lock is held only for map operations and the gauge update (parsing, rendering, logging and
// the request metrics happen outside it). Lock order: Impl::mutex, then the Metrics' own mutex.
//
// Tickets are 16 random bytes (OpenSSL's CSPRNG) written as 32 upper-case hex digits, the form
// Citrix STAs issue. The store is keyed by the SHA-256 of the ticket, so the ticket values themselves
// are not kept, and lookups time the hash, not the secret. The first 8 hex digits of that hash
// name a ticket in the log ("ticket #1a2b3c4d").
#include "xmlservice/sta_service.hpp"

#include "common/address.hpp"
#include "common/clock.hpp"
#include "common/crypto.hpp"
#include "common/log.hpp"
#include "common/metrics.hpp"
#include "common/work_queue.hpp"
#include "xmlservice/detail/xml_text.hpp"
#include "xmlservice/sta_codec.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <exception>
#include <mutex>
#include <set>
#include <unordered_map>
#include <utility>
#include <variant>

namespace xmlservice {

namespace {

using detail::iequals;

std::string upper(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

// The store key of a ticket as presented: hex is case-insensitive, so "ab12" redeems "AB12".
std::string key_of(std::string_view ticket) { return common::crypto::sha256_hex(upper(std::string(ticket))); }
std::string log_name(const std::string& key) { return "#" + key.substr(0, 8); }

// An AuthorityID as written, without a leading "STA" and in upper case, so "STA0A1B" and
// "0a1b" name the same authority (the ICA file carries the id with its "STA" prefix).
std::string authority_core(std::string_view id) {
  id = detail::trim(id);
  if (detail::istarts_with(id, "STA")) id.remove_prefix(3);
  return upper(std::string(id));
}

bool lists_or_empty(const std::vector<std::string>& offered, std::string_view ours) {
  return offered.empty() ||
         std::any_of(offered.begin(), offered.end(), [&](const std::string& t) { return iequals(t, ours); });
}

std::size_t data_bytes(const std::vector<NameValue>& data) {
  std::size_t n = 0;
  for (const auto& v : data) n += v.name.size() + v.value.size();
  return n;
}

net::HttpResponse plain(int status, std::string text) {
  net::HttpResponse r;
  r.status = status;
  r.body = std::move(text) + "\n";
  r.route = std::string(StaService::kPath);
  return r;
}

net::HttpResponse xml_reply(const sta::Response& response) {
  net::HttpResponse r;
  r.content_type = "text/xml; charset=UTF-8";
  r.body = sta::render(response);
  r.route = std::string(StaService::kPath);
  return r;
}

// What one request came to: the reply, the metric result ("ok" or the ErrorId) and details for
// the log line.
struct Outcome {
  sta::Response response;
  std::string detail;      // "3 values", "unknown or expired", ...
  std::string ticket_log;  // "#1a2b3c4d" once a ticket is known
};

Outcome error(sta::ErrorId id, std::string detail, std::string ticket_log = {}) {
  return {sta::ErrorResponse{id}, std::move(detail), std::move(ticket_log)};
}

}  // namespace

std::string default_authority_id(std::string_view site_key) {
  return "STA" + upper(common::crypto::hmac_sha256_hex(site_key, "openbroker sta authority id").substr(0, 12));
}

struct StaService::Impl {
  struct Ticket {
    std::vector<NameValue> data;
    std::size_t bytes = 0;
    common::SysTime issued;
    common::SysTime expires;
    std::string issued_to;  // the front end's address, for the redemption's log line
    bool refreshable = false;
  };

  // What one client holds.
  struct Usage {
    std::size_t tickets = 0;
    std::size_t bytes = 0;
  };

  Impl(StaOptions o, const common::Clock& c, common::Metrics& m, std::shared_ptr<spdlog::logger> l,
       common::WorkQueue* w)
      : options(std::move(o)), clock(c), metrics(m), log(std::move(l)), work(w) {}

  const StaOptions options;
  const common::Clock& clock;
  common::Metrics& metrics;
  const std::shared_ptr<spdlog::logger> log;
  common::WorkQueue* const work;

  std::mutex mutex;
  // Guarded by mutex: tickets by key; the same keys ordered by expiry; the bytes they hold; what
  // each client (issued_to) holds, for clients holding any.
  std::unordered_map<std::string, Ticket> tickets;
  std::set<std::pair<common::SysTime, std::string>> by_expiry;
  std::size_t total_bytes = 0;
  std::unordered_map<std::string, Usage> per_client;

  // Requires mutex. Removes the ticket `it` points at from the store and returns it.
  Ticket take_locked(std::unordered_map<std::string, Ticket>::iterator it) {
    auto node = tickets.extract(it);
    by_expiry.erase({node.mapped().expires, node.key()});
    total_bytes -= node.mapped().bytes;
    if (auto u = per_client.find(node.mapped().issued_to); u != per_client.end()) {
      u->second.tickets -= 1;
      u->second.bytes -= node.mapped().bytes;
      if (u->second.tickets == 0) per_client.erase(u);
    }
    return std::move(node.mapped());
  }
  // Requires mutex. Removes every ticket whose lifetime is over at `now`.
  void purge_locked(common::SysTime now) {
    while (!by_expiry.empty() && by_expiry.begin()->first <= now) take_locked(tickets.find(by_expiry.begin()->second));
  }
  // Requires mutex (so that concurrent requests publish in order).
  void publish_gauge_locked() {
    metrics.set("broker_sta_tickets_outstanding", {}, static_cast<double>(tickets.size()));
    metrics.set("broker_sta_bytes_outstanding", {}, static_cast<double>(total_bytes));
  }

  // Whether allowed_clients admits `remote`; nullopt when the front ends cannot be read.
  std::optional<bool> trusted(const std::string& remote) const {
    bool front_ends = false;
    for (const auto& entry : options.allowed_clients) {
      if (entry == "any") return true;
      if (entry == "loopback") {
        if (common::address_in(remote, "127.0.0.0/8") || common::address_in(remote, "::1")) return true;
      } else if (entry == "trusted_front_ends") {
        front_ends = true;
      } else if (common::address_in(remote, entry)) {
        return true;
      }
    }
    if (!front_ends || !options.trusted_front_ends) return false;
    const auto ranges = options.trusted_front_ends();
    if (!ranges) return std::nullopt;
    return std::any_of(ranges->begin(), ranges->end(),
                       [&](const std::string& range) { return common::address_in(remote, range); });
  }

  Outcome issue(const sta::TicketRequest& req, const std::string& remote) {
    if (!lists_or_empty(req.allowed_ticket_types, sta::kTicketVersion))
      return error(sta::ErrorId::unsupported_ticket_type, "AllowedTicketType leaves out STA-v4");
    if (!lists_or_empty(req.allowed_authority_id_types, sta::kAuthorityIdType))
      return error(sta::ErrorId::unsupported_ticket_type, "AllowedAuthorityIDType leaves out STA-v1");
    const std::size_t bytes = data_bytes(req.ticket_data);
    if (bytes > options.max_ticket_data_bytes)
      return error(sta::ErrorId::bad_request, "TicketData of " + std::to_string(bytes) + " bytes (limit " +
                                                  std::to_string(options.max_ticket_data_bytes) + ")");

    std::string ticket = upper(common::crypto::random_hex(16));
    std::string key = key_of(ticket);
    Ticket t;
    t.data = req.ticket_data;
    t.bytes = bytes;
    t.issued = clock.now();
    t.expires = t.issued + options.ticket_lifetime;
    t.issued_to = remote;
    t.refreshable = req.refreshable;
    {
      std::lock_guard lock(mutex);
      purge_locked(t.issued);
      if (tickets.size() >= options.max_tickets || total_bytes + bytes > options.max_total_bytes) {
        // process() logs `unspecified` as a warning.
        return error(sta::ErrorId::unspecified, "ticket store full: " + std::to_string(tickets.size()) + " tickets, " +
                                                    std::to_string(total_bytes) + " bytes held");
      }
      const Usage held = per_client.contains(remote) ? per_client.at(remote) : Usage{};
      if (held.tickets >= options.max_tickets_per_client || held.bytes + bytes > options.max_bytes_per_client) {
        return error(sta::ErrorId::unspecified, "client quota reached: " + remote + " holds " +
                                                    std::to_string(held.tickets) + " tickets, " +
                                                    std::to_string(held.bytes) + " bytes");
      }
      while (tickets.contains(key)) {  // 2^-128; but never hand out one ticket twice
        ticket = upper(common::crypto::random_hex(16));
        key = key_of(ticket);
      }
      by_expiry.emplace(t.expires, key);
      total_bytes += bytes;
      auto& usage = per_client[remote];
      usage.tickets += 1;
      usage.bytes += bytes;
      tickets.emplace(key, std::move(t));
      publish_gauge_locked();
    }
    sta::TicketResponse r;
    r.authority_id = options.authority_id;
    r.ticket = std::move(ticket);
    return {std::move(r), std::to_string(req.ticket_data.size()) + " values" + (req.refreshable ? ", refreshable" : ""),
            log_name(key)};
  }

  Outcome redeem(const sta::DataRequest& req) {
    const std::string key = key_of(detail::trim(req.ticket));
    const std::string name = log_name(key);
    if (!req.authority_id.empty() && authority_core(req.authority_id) != authority_core(options.authority_id))
      return error(sta::ErrorId::invalid_ticket, "AuthorityID of another authority", name);
    if (!req.ticket_version.empty() && !iequals(req.ticket_version, sta::kTicketVersion))
      return error(sta::ErrorId::invalid_ticket, "TicketVersion is not STA-v4", name);

    const auto now = clock.now();
    Ticket t;
    std::string why;
    {
      std::lock_guard lock(mutex);
      if (auto it = tickets.find(key); it == tickets.end()) {
        why = "unknown, used or expired";
      } else {
        t = take_locked(it);  // used up either way
        if (t.expires <= now) why = "expired";
      }
      purge_locked(now);
      publish_gauge_locked();
    }
    if (!why.empty()) return error(sta::ErrorId::invalid_ticket, why, name);
    const auto age_ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - t.issued).count();
    std::string detail =
        std::to_string(t.data.size()) + " values, issued to " + t.issued_to + " " + std::to_string(age_ms) + " ms ago";
    return {sta::DataResponse{std::move(t.data)}, std::move(detail), name};
  }
};

StaService::StaService(StaOptions options, const common::Clock& clock, common::Metrics& metrics,
                       std::shared_ptr<spdlog::logger> logger, common::WorkQueue* work)
    : impl_(std::make_unique<Impl>(std::move(options), clock, metrics, std::move(logger), work)) {
  metrics.describe("broker_sta_requests_total", common::Metrics::Type::counter,
                   "Secure Ticket Authority requests by request type and result (ok or the ErrorId).");
  metrics.describe("broker_sta_request_duration_seconds", common::Metrics::Type::histogram,
                   "Time to answer one Secure Ticket Authority request.");
  metrics.describe("broker_sta_tickets_outstanding", common::Metrics::Type::gauge,
                   "STA tickets issued and not yet redeemed (expired ones count until purged).");
  metrics.describe("broker_sta_bytes_outstanding", common::Metrics::Type::gauge,
                   "Bytes of TicketData (names and values) the outstanding STA tickets hold.");
  metrics.set("broker_sta_tickets_outstanding", {}, 0);
  metrics.set("broker_sta_bytes_outstanding", {}, 0);
  const auto& o = impl_->options;
  std::string clients;
  for (const auto& c : o.allowed_clients) clients += (clients.empty() ? "" : ", ") + c;
  impl_->log->info("sta: POST {} as {}, tickets valid {} s, clients: {}; at most {} tickets and {} bytes, {} and {} per client",
                   kPath, o.authority_id, o.ticket_lifetime.count(), clients.empty() ? std::string("none") : clients,
                   o.max_tickets, o.max_total_bytes, o.max_tickets_per_client, o.max_bytes_per_client);
}

StaService::~StaService() = default;

bool StaService::serves(std::string_view path) { return iequals(path, kPath); }

const std::string& StaService::authority_id() const { return impl_->options.authority_id; }

std::size_t StaService::outstanding() const {
  std::lock_guard lock(impl_->mutex);
  impl_->purge_locked(impl_->clock.now());
  impl_->publish_gauge_locked();
  return impl_->tickets.size();
}

void StaService::handle(net::HttpRequest&& request, net::Responder respond) {
  if (!impl_->work) return respond(process(request));
  auto shared_request = std::make_shared<net::HttpRequest>(std::move(request));
  auto shared_respond = std::make_shared<net::Responder>(std::move(respond));
  if (!impl_->work->post([this, shared_request, shared_respond] { (*shared_respond)(process(*shared_request)); }))
    (*shared_respond)(plain(503, "the broker is shutting down"));
}

net::HttpResponse StaService::process(const net::HttpRequest& http) {
  if (!serves(http.path)) {
    auto r = plain(404, "no such endpoint: " + http.path);
    r.route = "other";
    return r;
  }
  if (http.method != "POST") {
    auto r = plain(405, "use POST");
    r.headers.emplace_back("Allow", "POST");
    return r;
  }
  const auto started = std::chrono::steady_clock::now();
  std::string type = "invalid";  // metric label: RequestTicket, RequestData, invalid, untrusted
  Outcome outcome{sta::ErrorResponse{sta::ErrorId::unspecified}, {}, {}};
  try {
    const auto trusted = impl_->trusted(http.remote_address);
    if (!trusted) {
      type = "untrusted";
      outcome = error(sta::ErrorId::unspecified, "cannot read the site's trusted_front_ends");
    } else if (!*trusted) {
      type = "untrusted";
      outcome = error(sta::ErrorId::not_trusted, "not in [sta] allowed_clients");
    } else if (auto parsed = sta::parse_request(http.body); !parsed) {
      const auto& e = parsed.error();
      for (std::string_view known : {"RequestTicket", "RequestData"})
        if (iequals(e.request_element, known)) type = known;
      outcome = error(sta::ErrorId::bad_request, std::string(to_string(e.code)) + ": " + e.message);
    } else {
      type = sta::request_name(parsed->request);
      if (const auto* t = std::get_if<sta::TicketRequest>(&parsed->request))
        outcome = impl_->issue(*t, http.remote_address);
      else
        outcome = impl_->redeem(std::get<sta::DataRequest>(parsed->request));
    }
  } catch (const std::exception& e) {  // std::bad_alloc, or the random generator failing
    impl_->log->error("sta: {}", e.what());
    outcome = error(sta::ErrorId::unspecified, "internal error");
  }

  const auto* err = std::get_if<sta::ErrorResponse>(&outcome.response);
  const std::string result = err ? std::string(to_string(err->error_id)) : std::string("ok");
  auto reply = xml_reply(outcome.response);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  impl_->metrics.add("broker_sta_requests_total", {{"request", type}, {"result", result}});
  impl_->metrics.observe("broker_sta_request_duration_seconds", {{"request", type}}, secs);
  const bool full = err && err->error_id == sta::ErrorId::unspecified;
  impl_->log->log(full ? spdlog::level::warn : spdlog::level::info,
                  "sta {} from {} ticket={} result={} ({}) in {:.1f} ms", type, http.remote_address,
                  outcome.ticket_log.empty() ? "-" : outcome.ticket_log, result, common::log_safe(outcome.detail, 256),
                  secs * 1000);
  return reply;
}

}  // namespace xmlservice
