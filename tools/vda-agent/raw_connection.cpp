#include "tools/vda-agent/raw_connection.hpp"

#include "net/websocket_client.hpp"

namespace vda {

struct RawConnection::State {
  std::mutex mutex;
  std::condition_variable cv;
  std::shared_ptr<net::WebSocketPeer> peer;  // guarded by mutex
  std::deque<std::string> inbox;             // guarded by mutex
  bool open = false;                         // guarded by mutex
  bool ended = false;                        // guarded by mutex
  std::string failure;                       // guarded by mutex
};

namespace {
class Sink final : public net::WebSocketSession {
 public:
  explicit Sink(std::shared_ptr<RawConnection::State> s) : state_(std::move(s)) {}
  void on_message(std::string message) override {
    std::lock_guard lock(state_->mutex);
    state_->inbox.push_back(std::move(message));
    state_->cv.notify_all();
  }
  void on_close(const std::string&) override {
    std::lock_guard lock(state_->mutex);
    state_->ended = true;
    state_->peer.reset();
    state_->cv.notify_all();
  }

 private:
  std::shared_ptr<RawConnection::State> state_;
};
}  // namespace

RawConnection::RawConnection(net::WebSocketClientPool& pool, const std::string& url)
    : state_(std::make_shared<State>()) {
  auto state = state_;
  pool.connect(
      url,
      [state](std::shared_ptr<net::WebSocketPeer> peer) -> std::shared_ptr<net::WebSocketSession> {
        std::lock_guard lock(state->mutex);
        state->peer = std::move(peer);
        state->open = true;
        state->cv.notify_all();
        return std::make_shared<Sink>(state);
      },
      [state](const std::string& why) {
        std::lock_guard lock(state->mutex);
        state->failure = why;
        state->ended = true;
        state->cv.notify_all();
      });
}

RawConnection::~RawConnection() { close(); }

bool RawConnection::wait_open(std::chrono::milliseconds timeout) {
  std::unique_lock lock(state_->mutex);
  state_->cv.wait_for(lock, timeout, [&] { return state_->open || state_->ended; });
  return state_->open;
}

void RawConnection::send(std::string text) {
  std::shared_ptr<net::WebSocketPeer> peer;
  {
    std::lock_guard lock(state_->mutex);
    peer = state_->peer;
  }
  if (peer) peer->send(std::move(text));
}

void RawConnection::close() {
  std::shared_ptr<net::WebSocketPeer> peer;
  {
    std::lock_guard lock(state_->mutex);
    peer = state_->peer;
  }
  if (peer) peer->close("test done");
}

std::optional<std::string> RawConnection::next(std::chrono::milliseconds timeout) {
  std::unique_lock lock(state_->mutex);
  state_->cv.wait_for(lock, timeout, [&] { return !state_->inbox.empty() || state_->ended; });
  if (state_->inbox.empty()) return std::nullopt;
  auto m = std::move(state_->inbox.front());
  state_->inbox.pop_front();
  return m;
}

bool RawConnection::wait_closed(std::chrono::milliseconds timeout) {
  std::unique_lock lock(state_->mutex);
  return state_->cv.wait_for(lock, timeout, [&] { return state_->ended; });
}

std::string RawConnection::failure() const {
  std::lock_guard lock(state_->mutex);
  return state_->failure;
}

}  // namespace vda
