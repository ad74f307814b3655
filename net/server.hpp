// net/server.hpp: the daemon's listeners. Boost.Beast on Asio with C++20 coroutines; the
// Beast/Asio types stay in server.cpp.
//
// One io_context run by `threads` threads; each connection on its own strand. HTTP/1.1 with
// keep-alive, optional TLS per listener, header and body size limits, read and idle timeouts.
// Graceful stop: stop accepting, let in-flight requests finish up to a deadline, then close.
//
// Replies always carry Content-Length (never chunked) and "Server: openbroker/<version>";
// a body over the limit gets 413, a header over the limit 431, a malformed request 400 (then
// the connection closes). A request whose handler has not responded when the read timeout ends
// is dropped (the connection closes). With a Metrics registry: broker_http_requests_total
// {listener,route,method,status}, broker_http_request_duration_seconds{listener,route} (route:
// HttpResponse::route, else the path; "-" for the 4xx the server sends itself) and
// broker_http_connections{listener}.
//
// Connection caps (docs/configuration.md "Connection limits"): each listener has a cap of open
// connections and one per peer address, and the listeners without `reserved` together share the
// server's shared connection limit (set_shared_connection_limit), so that a reserved listener (the
// admin port) always has descriptors left while the others are flooded. A connection over a cap
// is closed right after accept, without a reply; established connections are never touched. A
// WebSocket listener with over_limit_connections accepts that many more connections over its
// caps (not over the per-address one) and marks them (WebSocketPeer::over_limit()) so that its
// protocol refuses them in its own words; a plain HTTP request on such a connection gets 503.
// A new connection must deliver its first request header (TLS handshake included) within
// first_request_timeout. When accept fails for lack of descriptors (EMFILE, ENFILE), the
// listener pauses (kAcceptBackoff, doubling up to a second) and logs once per
// kRefusalLogPeriod; so are refusals logged, with their count. Metrics:
// broker_connections_refused_total{listener,reason="max_connections"|"max_connections_per_address"|
// "shared_limit"}, broker_connections_over_limit_total{listener} and
// broker_accept_failures_total{listener,reason="descriptors"|"other"}.
//
// HTTP/1.1 framing (RFC 9112): a request without exactly one Host (HTTP/1.1), with a
// Transfer-Encoding other than a single "chunked" (or any on HTTP/1.0), or with a header or
// trailer field over 64 KiB or trailers over header_limit gets 400 or 431, then the connection
// closes. Trailer fields are read and dropped (handlers never see them).
//
// A listener added with a WebSocketHandler also takes WebSocket upgrades (see websocket.hpp):
// GET on handler.path becomes a WebSocket connection (wss on TLS listeners), an upgrade on another
// path gets 404, everything else goes to the HttpHandler. stop() closes WebSocket connections with
// 1001 "broker shutting down" (their sessions get on_close). Metrics: broker_websocket_connections
// {listener} (upgraded connections, no longer counted in broker_http_connections) and
// broker_websocket_messages_total{listener,direction="received"|"sent"}.
#pragma once

#include "net/http.hpp"
#include "net/websocket.hpp"

#include <spdlog/fwd.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace common {
class Scheduler;
class Metrics;
}

namespace net {

struct ListenerOptions {
  std::string name;  // "xml", "agent", "admin": used in logs and metrics
  std::string address = "127.0.0.1";
  std::uint16_t port = 0;     // 0: any free port (see Server::port)
  std::string tls_cert_file;  // PEM; both empty: plain HTTP
  std::string tls_key_file;
  // PEM bundle of CAs (needs tls_cert_file). Set: mutual TLS, a client must present a certificate
  // signed by one of them or its TLS handshake fails (logged at info with the peer and reason).
  std::string tls_client_ca_file;
  std::size_t header_limit = 16 * 1024;
  std::size_t body_limit = 1024 * 1024;           // larger bodies get 413
  std::chrono::milliseconds read_timeout{30000};  // to read one whole request once it started
  std::chrono::milliseconds idle_timeout{60000};  // keep-alive connection without a request
  // From accept to the end of the first request's header, TLS handshake included (a connection
  // that sends nothing, or trickles, is closed when it ends). Later requests: idle_timeout.
  std::chrono::milliseconds first_request_timeout{10000};
  // Caps (see above); 0: none.
  std::size_t max_connections = 0;              // open connections (HTTP and WebSocket) here
  std::size_t max_connections_per_address = 0;  // from one peer IP address
  // WebSocket listeners only: connections accepted over max_connections or the shared limit,
  // marked over_limit. They count towards max_connections_per_address, not the shared limit.
  std::size_t over_limit_connections = 0;
  // True: this listener's connections are outside the server's shared limit (its own
  // max_connections are set aside for it; the admin listener).
  bool reserved = false;
};

// RLIMIT_NOFILE after raise_descriptor_limit().
struct DescriptorLimit {
  std::size_t before = 0;  // soft limit found at start
  std::size_t soft = 0;    // soft limit now
  std::size_t hard = 0;    // hard limit (SIZE_MAX: unlimited)
  std::string error;       // why raising failed; empty when it worked or was not needed
};

// Raises the soft RLIMIT_NOFILE of the process to its hard limit (to the kernel's nr_open when
// the hard limit is unlimited) and reports both. Call once at start, before threads open files.
DescriptorLimit raise_descriptor_limit();

// What fit_connection_caps() decided.
struct ConnectionBudget {
  std::size_t descriptors = 0;           // the descriptor limit it was given
  std::size_t reserve = 0;               // kept back for everything but connections
  std::size_t shared_limit = 0;          // for Server::set_shared_connection_limit
  std::vector<std::string> adjustments;  // one sentence per lowered cap, for the log
};

// Fits the listeners' caps into `descriptors` (the soft RLIMIT_NOFILE) so that the broker never
// runs out: `reserve` descriptors (at most a quarter of them) stay for the database, logs,
// listening sockets and outgoing connections; then the reserved listeners' max_connections and
// every listener's over_limit_connections are set aside (each lowered to fit, a reserved cap to at
// most a quarter of what is left); the rest is the shared limit, and a non-reserved listener's
// max_connections (0 included) is lowered to it. Modifies `listeners` in place.
ConnectionBudget fit_connection_caps(std::size_t descriptors, std::size_t reserve,
                                     std::vector<ListenerOptions*> listeners);

// A listener added with a WebSocketHandler also takes WebSocket upgrades

class Server {
 public:
  // `metrics` (optional) must outlive the Server; a null logger logs nothing.
  Server(int threads, std::shared_ptr<spdlog::logger> logger, common::Metrics* metrics = nullptr);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds now (so a busy port is reported at start-up) and serves once run() is called.
  // Throws std::runtime_error with a clear message ("admin listener 127.0.0.1:8082: address in
  // use") when binding or loading the TLS files (certificate, key, client CAs) fails.
  void add_listener(const ListenerOptions& options, HttpHandler handler);
  // The same, with WebSocket upgrades on websocket.path (websocket.on_open must be set).
  void add_listener(const ListenerOptions& options, HttpHandler handler, WebSocketHandler websocket);

  // The most connections the listeners without `reserved` may hold together (0: no cap, the
  // default). Call before start().
  void set_shared_connection_limit(std::size_t limit);

  // The bound port of the named listener (useful with port 0); 0 for an unknown name.
  std::uint16_t port(const std::string& listener_name) const;

  // Starts the I/O threads and returns at once.
  void start();
  // Graceful stop (callable from any thread, idempotent): stop accepting, wait up to `deadline`
  // for in-flight requests and WebSocket close handshakes, close every connection, join the
  // threads. Called on an I/O thread
  // (from a handler) it returns at once and another thread does the stopping; a concurrent
  // second call waits until the first has finished.
  void stop(std::chrono::milliseconds deadline);
  // Blocks until SIGINT or SIGTERM, then returns (the caller then calls stop()). Also returns
  // when stop() is called meanwhile (or was already).
  void wait_for_signal();

  bool running() const;

  // Timers on the server's io_context (no thread of their own): callbacks run on an I/O thread
  // once the server is started, one at a time per timer; keep them short (post real work to a
  // WorkQueue). stop() cancels the pending ones and refuses new ones (after() returns 0).
  common::Scheduler& scheduler();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace net
