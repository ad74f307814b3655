// net/websocket_client.hpp: many outgoing WebSocket connections on one small thread pool
// (the reference agent runs thousands of machines in one process). No Beast/Asio here.
#pragma once

#include "net/websocket.hpp"

#include <chrono>
#include <functional>
#include <memory>
#include <string>

namespace net {

class WebSocketClientPool {
 public:
  explicit WebSocketClientPool(int threads = 2);
  ~WebSocketClientPool();  // stop()
  WebSocketClientPool(const WebSocketClientPool&) = delete;
  WebSocketClientPool& operator=(const WebSocketClientPool&) = delete;

  using OpenFn = std::function<std::shared_ptr<WebSocketSession>(std::shared_ptr<WebSocketPeer>)>;
  using FailFn = std::function<void(const std::string& error)>;

  // Connects to `url` ("ws://127.0.0.1:8081/cbp" or "wss://host:port/cbp"; TLS verifies against
  // ca_file when given, else does not verify) within `timeout`. On success calls on_open (on a
  // pool thread) and feeds the returned session; on failure calls on_failure once. Never blocks.
  void connect(const std::string& url, OpenFn on_open, FailFn on_failure,
               std::chrono::milliseconds timeout = std::chrono::seconds(10), const std::string& ca_file = {},
               std::size_t max_message_bytes = 1 << 20);

  // Runs fn on a pool thread after `delay` (agents' heartbeats and scripted events). Returns an
  // id for cancel().
  std::uint64_t after(std::chrono::milliseconds delay, std::function<void()> fn);
  void cancel(std::uint64_t timer_id);

  // Closes every connection (their sessions get on_close) and joins the threads. Idempotent.
  // Called on a pool thread (from a callback) it only begins the closing; the destructor, which
  // must not run on a pool thread, then joins.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace net
