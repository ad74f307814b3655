// net/websocket.hpp: WebSocket endpoints and clients without Beast/Asio in the interface, for
// the agent endpoint (cbp/) and the reference agent (tools/vda-agent).
//
// Server side: a listener given a WebSocketHandler upgrades GET requests on handler.path to
// WebSocket (text frames); other requests go to the listener's HttpHandler as usual. Each
// accepted connection gets a WebSocketPeer (send / close, thread-safe) and the handler returns
// the WebSocketSession that receives its messages, in order, on the connection's strand.
#pragma once

#include "net/http.hpp"

#include <chrono>
#include <functional>
#include <memory>
#include <string>

namespace net {

// One open WebSocket connection, as the code above the socket sees it. Thread-safe.
class WebSocketPeer {
 public:
  virtual ~WebSocketPeer() = default;
  // Queues one text message; messages go out in the order queued. Dropped after close. A peer
  // whose queue exceeds the send limit (a slow reader) is closed.
  virtual void send(std::string message) = 0;
  // Sends a close frame with `reason` (<= 123 bytes) and closes; idempotent.
  virtual void close(std::string reason) = 0;
  virtual std::string remote_address() const = 0;  // peer IP
  virtual bool tls() const = 0;
  // True for a connection the listener accepted over its connection cap (its
  // over_limit_connections band, see server.hpp): the session should refuse it in its protocol's
  // words (CBP: rejected BrokerRegistrationLimitReached) and close.
  virtual bool over_limit() const { return false; }
};

class WebSocketSession {
 public:
  virtual ~WebSocketSession() = default;
  // One complete text message. Called on the connection's strand, one at a time.
  virtual void on_message(std::string message) = 0;
  // A binary message arrived; this transport carries text only. Called on the strand, in order
  // with on_message. Return false (the default) and the connection closes at once with 1003.
  // Return true to end it yourself: send a last text message if the protocol wants one (CBP:
  // `error ProtocolError`), then call WebSocketPeer::close(); the close frame then carries 1003.
  // Either way no message after the binary one is delivered, and on_close says "binary message".
  // A session that returns true and does not close within a few seconds is closed with 1003.
  virtual bool on_binary_message() { return false; }
  // The connection ended (either side, an error, a timeout, shutdown). Called once, last.
  // `reason`: the text this side gave to close() (or "broker shutting down", "client shutting
  // down"), "idle timeout", "message too big", "binary message", "send queue full",
  // "closed by the peer: <code> <peer's reason>", or a network error ("timed out", ...).
  // Invalid UTF-8 in a text message fails the connection in the transport (close 1007, RFC 6455
  // section 8.1) before the session sees it: on_close then says why.
  virtual void on_close(const std::string& reason) = 0;
};

struct WebSocketHandler {
  std::string path = "/cbp";                // upgrade requests on other paths get 404 (query ignored)
  std::size_t max_message_bytes = 1 << 20;  // larger messages close the connection (1009)
  std::size_t max_send_queue_bytes = 8 << 20;
  std::chrono::milliseconds idle_timeout{90000};  // no message received for this long: closed
  // Called for each upgraded connection; returns the session that receives its messages
  // (nullptr: close at once).
  std::function<std::shared_ptr<WebSocketSession>(std::shared_ptr<WebSocketPeer>)> on_open;
};

}  // namespace net
