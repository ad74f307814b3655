// tools/vda-agent/raw_connection.hpp: one bare WebSocket connection to the agent endpoint that
// sends whatever it is told and keeps every message it receives: for tests of what no
// well-behaved agent sends (replayed hellos, silence during the handshake, garbage).
//
// Thread-safe; the connection runs on the given pool, which must outlive it.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

namespace net {
class WebSocketClientPool;
class WebSocketPeer;
}  // namespace net

namespace vda {

class RawConnection {
 public:
  // Starts connecting to `url` (ws://host:port/cbp).
  RawConnection(net::WebSocketClientPool& pool, const std::string& url);
  ~RawConnection();  // closes
  RawConnection(const RawConnection&) = delete;
  RawConnection& operator=(const RawConnection&) = delete;

  bool wait_open(std::chrono::milliseconds timeout);
  void send(std::string text);
  void close();
  // The next message received, waiting up to `timeout`; nullopt when none came (timeout, or the
  // connection ended with nothing left to read).
  std::optional<std::string> next(std::chrono::milliseconds timeout);
  // Waits until the connection has ended (either side).
  bool wait_closed(std::chrono::milliseconds timeout);
  std::string failure() const;  // why connecting failed, if it did

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace vda
