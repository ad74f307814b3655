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
};

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

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace net
