// net/detail/websocket_connection.hpp (private to net/): one WebSocket connection, server or
// client side, behind the WebSocketPeer/WebSocketSession interfaces of net/websocket.hpp.
//
// Everything that instantiates boost::beast::websocket::stream<AnyStream> lives in
// websocket_connection.cpp, so that heavy template code is compiled once for the server
// (server.cpp hands an upgrade request over) and the client pool (websocket_client.cpp); this
// header stays free of Beast's WebSocket headers.
//
// Semantics, both sides: text messages only (a binary one closes with 1003, after the session's
// last message if WebSocketSession::on_binary_message asks for one); a message over
// max_message_bytes closes with 1009; messages reach WebSocketSession::on_message one at a time,
// in order, on the connection's strand; WebSocketPeer::send() (any thread) queues, one write in
// flight, and a queue over max_send_queue_bytes aborts the connection (a slow reader never holds
// memory or other connections); on_close once, last. A close begun by this side (close(),
// shutdown(), idle timeout) sends the queued messages, then the close frame, and drops the
// connection when the close handshake has not finished after kCloseTimeout.
#pragma once

#include "net/detail/any_stream.hpp"
#include "net/websocket.hpp"

#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <spdlog/fwd.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace common {
class Metrics;
}

namespace net::detail {

using WsOpenFn = std::function<std::shared_ptr<WebSocketSession>(std::shared_ptr<WebSocketPeer>)>;

struct WsSettings {
  std::size_t max_message_bytes = 1 << 20;
  std::size_t max_send_queue_bytes = 8 << 20;
  // No message received for this long: closed (1001 "idle timeout"). Zero: never.
  std::chrono::milliseconds idle_timeout{0};
  // Beast's keep-alive: a ping after half of this without any data from the peer, the connection
  // dropped after all of it. Zero: off.
  std::chrono::milliseconds keep_alive{0};
  // Bounds the opening handshake (server: writing the 101 reply; client: everything from the
  // TCP connect to the 101 reply).
  std::chrono::milliseconds handshake_timeout{30000};
  std::string remote_address;              // peer IP, for WebSocketPeer::remote_address() and logs
  std::string user_agent;                  // Server header (server) or User-Agent (client)
  std::shared_ptr<spdlog::logger> logger;  // not null
  common::Metrics* metrics = nullptr;      // optional: broker_websocket_messages_total
  std::string listener;                    // its "listener" label
};

// What the owner of a connection (the server's Connection, the client pool) controls. Every
// function may be called from any thread; the work is posted to the connection's strand.
class WsLink {
 public:
  virtual ~WsLink() = default;
  // Sends the queued messages, then a close frame with 1001 (going away) and `reason`.
  virtual void shutdown(std::string reason) = 0;
  // Closes the socket at once: every pending operation fails, the session gets on_close.
  virtual void abort() = 0;
};

// True for a WebSocket upgrade request (GET, "Connection: upgrade", "Upgrade: websocket").
bool is_websocket_upgrade(const boost::beast::http::request<boost::beast::http::string_body>& request);

// Server side: answers `request` (an upgrade, already read from `stream`) with 101 and runs the
// connection: on_open (nullptr: closed with 1008), then the session. `done` runs on the strand
// once everything has ended (after on_close, if a session was opened). Returns at once.
std::shared_ptr<WsLink> accept_websocket(AnyStream stream,
                                         boost::beast::http::request<boost::beast::http::string_body> request,
                                         WsSettings settings, WsOpenFn on_open, std::function<void()> done);

// Client side: connects `stream` (not yet connected; TLS or plain) to the first of `endpoints`
// that answers, does the TLS handshake and the WebSocket handshake for `host` (Host header) and
// `target` within settings.handshake_timeout, then runs the connection like the server side. On
// any failure before on_open, calls on_failure once with why. `done` as above. Returns at once.
std::shared_ptr<WsLink> connect_websocket(AnyStream stream, std::vector<boost::asio::ip::tcp::endpoint> endpoints,
                                          std::string host, std::string target, WsSettings settings, WsOpenFn on_open,
                                          std::function<void(const std::string&)> on_failure,
                                          std::function<void()> done);

}  // namespace net::detail
