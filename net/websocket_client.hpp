// net/websocket_client.hpp: many outgoing WebSocket connections on one small thread pool
// (the reference agent runs thousands of machines in one process). No Beast/Asio here.
#pragma once

#include "net/websocket.hpp"

#include <chrono>
#include <functional>
#include <memory>
#include <string>

namespace net {

// TLS settings of wss:// connections (ws:// ignores them). All files PEM.
struct ClientTls {
  std::string ca_file;    // verify the server's certificate and name against these CAs; empty: no verification
  std::string cert_file;  // certificate (chain) presented when the server asks for one (mutual TLS); empty: none
  std::string key_file;   // the private key of cert_file; set exactly when cert_file is
};

class WebSocketClientPool {
 public:
  explicit WebSocketClientPool(int threads = 2);
  ~WebSocketClientPool();  // stop()
  WebSocketClientPool(const WebSocketClientPool&) = delete;
  WebSocketClientPool& operator=(const WebSocketClientPool&) = delete;

  using OpenFn = std::function<std::shared_ptr<WebSocketSession>(std::shared_ptr<WebSocketPeer>)>;
  using FailFn = std::function<void(const std::string& error)>;

  // Connects to `url` ("ws://127.0.0.1:8081/cbp" or "wss://host:port/cbp", with `tls`) within
  // `timeout`. On success calls on_open (on a pool thread) and feeds the returned session; on
  // failure (also: TLS files that cannot be loaded, a server that refuses the client
  // certificate) calls on_failure once. Never blocks.
  void connect(const std::string& url, OpenFn on_open, FailFn on_failure,
               std::chrono::milliseconds timeout = std::chrono::seconds(10), const ClientTls& tls = {},
               std::size_t max_message_bytes = 1 << 20);

  // Loads the files of `tls` now (connect() reuses what was loaded, per distinct ClientTls).
  // Returns why they cannot be used ("cannot read client certificate /x.pem: No such file or
  // directory", "client key /k.pem does not match certificate /c.pem"), empty when they can.
  std::string check_tls(const ClientTls& tls);

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
