// net/websocket_connection.cpp: WebSocket connections over detail::AnyStream, for the server
// (accept_websocket) and the client pool (connect_websocket); see
// net/detail/websocket_connection.hpp for the semantics.
//
// The only translation unit that instantiates boost::beast::websocket::stream (the heaviest
// template code of the project): once, for AnyStream, plain or TLS.
//
// Shape (after Beast's websocket_server_async example, with a write queue):
//   - every member function but send()/close()/shutdown()/abort() runs on the connection's
//     strand (the executor of its socket); those four post there;
//   - the read loop keeps one async_read pending until the connection ends (also while a close
//     handshake runs, so that Beast sees the peer's close frame);
//   - the writer has at most one async_write or async_close in flight (Beast allows one write
//     operation at a time, a close counting as one): queued messages first, then the close;
//   - finish() runs when neither a read nor a write is pending any more: on_close, then `done`.
// Lifetime: the pending operations' handlers own the WsConnection; the WebSocketPeer handed to
// the application holds it weakly, so a peer kept after the end (even after the Server or the
// pool is gone) is harmless.
#include "net/detail/websocket_connection.hpp"

#include "common/metrics.hpp"

#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/bind_handler.hpp>
#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/websocket/rfc6455.hpp>
#include <boost/beast/websocket/stream.hpp>
#include <spdlog/logger.h>

#include <atomic>
#include <deque>
#include <utility>

namespace net::detail {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using boost::system::error_code;

// How long a close handshake begun by this side may take before the socket is just closed.
constexpr auto kCloseTimeout = std::chrono::seconds(5);
constexpr std::size_t kMaxReasonBytes = 123;  // a close frame's payload is at most 125 bytes
constexpr std::size_t kKeptBufferBytes = 16 * 1024;
constexpr const char* kBinaryRefused = "binary messages are not supported";

// `reason` cut to fit into a close frame, at a UTF-8 character boundary.
std::string fit_reason(std::string reason) {
  if (reason.size() <= kMaxReasonBytes) return reason;
  std::size_t n = kMaxReasonBytes;
  while (n > 0 && (static_cast<unsigned char>(reason[n]) & 0xC0) == 0x80) --n;
  reason.resize(n);
  return reason;
}

std::string describe(const error_code& ec) {
  if (ec == beast::error::timeout) return "timed out";
  if (ec == websocket::error::message_too_big) return "message too big";
  return ec.message();
}

class WsConnection;

// The WebSocketPeer the application gets: a weak handle, so that keeping it is harmless.
class Peer final : public WebSocketPeer {
 public:
  Peer(std::weak_ptr<WsConnection> connection, std::string remote, bool tls)
      : connection_(std::move(connection)), remote_(std::move(remote)), tls_(tls) {}

  void send(std::string message) override;
  void close(std::string reason) override;
  std::string remote_address() const override { return remote_; }
  bool tls() const override { return tls_; }

 private:
  const std::weak_ptr<WsConnection> connection_;
  const std::string remote_;
  const bool tls_;
};

class WsConnection final : public WsLink, public std::enable_shared_from_this<WsConnection> {
 public:
  WsConnection(AnyStream stream, WsSettings settings, WsOpenFn on_open, std::function<void()> done)
      : executor_(stream.get_executor()),
        ws_(std::move(stream)),
        settings_(std::move(settings)),
        on_open_(std::move(on_open)),
        done_(std::move(done)),
        idle_timer_(executor_),
        close_timer_(executor_) {
    if (settings_.metrics != nullptr) {
      received_labels_ = {{"listener", settings_.listener}, {"direction", "received"}};
      sent_labels_ = {{"listener", settings_.listener}, {"direction", "sent"}};
    }
    ws_.read_message_max(settings_.max_message_bytes);
    ws_.text(true);
    ws_.auto_fragment(false);  // one frame per message, written from the queued string
  }

  const asio::any_io_executor& executor() const { return executor_; }

  // Server side, on the strand: the 101 reply, then open().
  void accept(http::request<http::string_body> request) {
    request_ = std::move(request);
    ws_.set_option(websocket::stream_base::decorator(
        [agent = settings_.user_agent](websocket::response_type& res) { res.set(http::field::server, agent); }));
    tcp_layer().expires_after(settings_.handshake_timeout);
    ws_.async_accept(request_, beast::bind_front_handler(&WsConnection::on_handshake, shared_from_this()));
  }

  // Client side, on the strand: TCP connect, TLS handshake, WebSocket handshake, then open().
  void connect(std::vector<tcp::endpoint> endpoints, std::string host, std::string target,
               std::function<void(const std::string&)> on_failure) {
    client_ = true;
    on_failure_ = std::move(on_failure);
    host_ = std::move(host);
    target_ = std::move(target);
    ws_.set_option(websocket::stream_base::decorator(
        [agent = settings_.user_agent](websocket::request_type& req) { req.set(http::field::user_agent, agent); }));
    tcp_layer().expires_after(settings_.handshake_timeout);
    tcp_layer().async_connect(endpoints, beast::bind_front_handler(&WsConnection::on_connect, shared_from_this()));
  }

  // Any thread.
  void shutdown(std::string reason) override {
    asio::post(executor_, [self = shared_from_this(), reason = std::move(reason)] {
      self->begin_close(websocket::close_code::going_away, reason, reason);
    });
  }
  void abort() override {
    asio::post(executor_, [self = shared_from_this()] {
      self->set_cause("aborted");
      self->drop();
    });
  }
  void send(std::string message) {
    if (closed_.load(std::memory_order_acquire)) return;
    const std::size_t n = message.size();
    if (queued_bytes_.fetch_add(n, std::memory_order_relaxed) + n > settings_.max_send_queue_bytes) {
      queued_bytes_.fetch_sub(n, std::memory_order_relaxed);
      asio::post(executor_, [self = shared_from_this()] { self->overflow(); });
      return;
    }
    asio::post(executor_,
               [self = shared_from_this(), m = std::move(message)]() mutable { self->enqueue(std::move(m)); });
  }
  void close(std::string reason) {
    asio::post(executor_, [self = shared_from_this(), reason = std::move(reason)] {
      // After a refused binary message the close says so (1003), whatever the session's reason.
      self->begin_close(self->refused_ ? websocket::close_code::unknown_data : websocket::close_code::normal, reason,
                        reason.empty() ? "closed" : reason);
    });
  }

 private:
  beast::tcp_stream& tcp_layer() { return ws_.next_layer().lowest_layer(); }
  spdlog::logger& log() const { return *settings_.logger; }

  void on_connect(error_code ec, const tcp::endpoint& endpoint) {
    if (ec) {
      fail_open("cannot connect: " + describe(ec));
      return;
    }
    settings_.remote_address = endpoint.address().to_string();
    ws_.next_layer().async_handshake(beast::bind_front_handler(&WsConnection::on_tls_handshake, shared_from_this()));
  }

  void on_tls_handshake(error_code ec) {
    if (ec) {
      fail_open("TLS handshake failed: " + describe(ec));
      return;
    }
    ws_.async_handshake(response_, host_, target_,
                        beast::bind_front_handler(&WsConnection::on_handshake, shared_from_this()));
  }

  void on_handshake(error_code ec) {
    request_ = {};
    if (ec) {
      if (ec == websocket::error::upgrade_declined) {
        fail_open("WebSocket handshake declined: " + std::to_string(response_.result_int()) + " " +
                  std::string(response_.reason()));
      } else {
        fail_open("WebSocket handshake failed: " + describe(ec));
      }
      return;
    }
    response_ = {};
    if (dropped_) {
      fail_open("cancelled");
      return;
    }
    open();
  }

  // The handshake is done: on_open, the idle timer, the read loop.
  void open() {
    tcp_layer().expires_never();  // from now on Beast's own timeouts apply
    websocket::stream_base::timeout timeouts;
    timeouts.handshake_timeout = kCloseTimeout;  // Beast uses it for the close handshake too
    if (settings_.keep_alive.count() > 0) {
      timeouts.idle_timeout = settings_.keep_alive;
      timeouts.keep_alive_pings = true;
    } else {
      timeouts.idle_timeout = websocket::stream_base::none();
      timeouts.keep_alive_pings = false;
    }
    ws_.set_option(timeouts);
    opened_ = true;
    on_failure_ = nullptr;

    std::shared_ptr<WebSocketSession> session;
    try {
      session = on_open_(std::make_shared<Peer>(weak_from_this(), settings_.remote_address, ws_.next_layer().tls()));
    } catch (const std::exception& e) {
      log().error("WebSocket {}: on_open failed: {}", settings_.remote_address, e.what());
      begin_close(websocket::close_code::internal_error, "internal error", "internal error");
    }
    on_open_ = nullptr;
    if (session) {
      session_ = std::move(session);
    } else if (!close_started_) {
      begin_close(websocket::close_code::policy_error, "connection rejected", "rejected");
    }
    last_message_ = Clock::now();
    if (settings_.idle_timeout.count() > 0) arm_idle_timer(last_message_ + settings_.idle_timeout);
    read();
  }

  void read() {
    reading_ = true;
    ws_.async_read(buffer_, beast::bind_front_handler(&WsConnection::on_read, shared_from_this()));
  }

  void on_read(error_code ec, std::size_t) {
    reading_ = false;
    if (ec) {
      // A close frame from the peer (also when answering it failed afterwards).
      if (ec == websocket::error::closed || ws_.reason().code != websocket::close_code::none) {
        const auto& r = ws_.reason();
        std::string why = "closed by the peer: " + std::to_string(r.code);
        if (!r.reason.empty()) why += " " + std::string(r.reason.data(), r.reason.size());
        set_cause(why);
      } else {
        set_cause(describe(ec));
      }
      // A close handshake of ours finishes on its own (bounded by the close timer); otherwise
      // the socket goes now, which also ends a write stuck on a peer that does not read.
      if (!close_sent_) drop();
      maybe_finish();
      return;
    }
    if (!ws_.got_text()) {
      clear_buffer();
      refuse_binary();
    } else if (!close_started_ && !refused_ && session_) {
      last_message_ = Clock::now();
      std::string message = beast::buffers_to_string(buffer_.data());
      clear_buffer();
      if (settings_.metrics != nullptr) settings_.metrics->add("broker_websocket_messages_total", received_labels_);
      try {
        session_->on_message(std::move(message));
      } catch (const std::exception& e) {
        log().error("WebSocket {}: on_message failed: {}", settings_.remote_address, e.what());
        begin_close(websocket::close_code::internal_error, "internal error", "internal error");
      }
    } else {
      clear_buffer();  // closing: dropped
    }
    read();
  }

  // A binary message (net/websocket.hpp, WebSocketSession::on_binary_message): the session may
  // have the last word before the connection closes with 1003; nothing more is delivered.
  void refuse_binary() {
    if (close_started_ || refused_) return;
    refused_ = true;
    set_cause("binary message");
    bool session_closes = false;
    if (session_) {
      try {
        session_closes = session_->on_binary_message();
      } catch (const std::exception& e) {
        log().error("WebSocket {}: on_binary_message failed: {}", settings_.remote_address, e.what());
      }
    }
    if (!session_closes) {
      begin_close(websocket::close_code::unknown_data, kBinaryRefused, "binary message");
      return;
    }
    // The session closes (close() uses 1003 from now on); a session that never does is closed here.
    close_timer_.expires_after(kCloseTimeout);
    close_timer_.async_wait([self = shared_from_this()](error_code ec) {
      if (ec || self->finished_ || self->close_started_) return;
      self->begin_close(websocket::close_code::unknown_data, kBinaryRefused, "binary message");
    });
  }

  // After a large message the buffer gives its memory back (thousands of idle connections).
  void clear_buffer() {
    buffer_.clear();
    if (buffer_.capacity() > kKeptBufferBytes) buffer_.shrink_to_fit();
  }

  void enqueue(std::string message) {
    if (close_started_ || dropped_ || finished_) {
      queued_bytes_.fetch_sub(message.size(), std::memory_order_relaxed);
      return;
    }
    queue_.push_back(std::move(message));
    write();
  }

  // Starts the next write: a queued message, else the close frame once a close was begun.
  void write() {
    if (writing_ || finished_ || dropped_ || !opened_) return;
    if (!queue_.empty()) {
      writing_ = true;
      ws_.async_write(asio::buffer(queue_.front()),
                      beast::bind_front_handler(&WsConnection::on_write, shared_from_this()));
    } else if (close_started_ && !close_sent_) {
      writing_ = true;
      close_sent_ = true;
      ws_.async_close(close_frame_, beast::bind_front_handler(&WsConnection::on_close_sent, shared_from_this()));
    }
  }

  void on_write(error_code ec, std::size_t) {
    writing_ = false;
    queued_bytes_.fetch_sub(queue_.front().size(), std::memory_order_relaxed);
    queue_.pop_front();
    if (ec) {
      set_cause(describe(ec));
      drop();
      maybe_finish();
      return;
    }
    if (settings_.metrics != nullptr) settings_.metrics->add("broker_websocket_messages_total", sent_labels_);
    write();
    maybe_finish();
  }

  void on_close_sent(error_code) {
    writing_ = false;
    drop();  // the TLS teardown leaves the socket open
    maybe_finish();
  }

  // Begins a close handshake (idempotent): the queue is sent first, then the close frame.
  // `cause` is what on_close will say.
  void begin_close(websocket::close_code code, const std::string& reason, const std::string& cause) {
    if (close_started_ || finished_) return;
    close_started_ = true;
    closed_.store(true, std::memory_order_release);
    set_cause(cause);
    close_frame_ = websocket::close_reason(code, fit_reason(reason));
    if (!opened_) {  // still connecting or accepting: nothing to say goodbye to
      drop();
      return;
    }
    close_timer_.expires_after(kCloseTimeout);
    close_timer_.async_wait([self = shared_from_this()](error_code ec) {
      if (ec || self->finished_) return;
      self->log().debug("WebSocket {}: close handshake timed out", self->settings_.remote_address);
      self->drop();
    });
    write();
  }

  // The send queue went over its limit: the peer does not read fast enough. There is no point
  // in queueing a close frame behind megabytes it does not read: the connection just goes.
  void overflow() {
    if (finished_ || dropped_) return;
    log().warn("WebSocket {}: send queue over {} bytes; closing the connection", settings_.remote_address,
               settings_.max_send_queue_bytes);
    closed_.store(true, std::memory_order_release);
    set_cause("send queue full");
    drop();
  }

  // Closes the socket: every pending operation completes with an error.
  void drop() {
    closed_.store(true, std::memory_order_release);
    if (dropped_) return;
    dropped_ = true;
    tcp_layer().close();
  }

  void arm_idle_timer(Clock::time_point at) {
    idle_timer_.expires_at(at);
    idle_timer_.async_wait([self = shared_from_this()](error_code ec) {
      if (ec || self->finished_ || self->close_started_) return;
      const auto due = self->last_message_ + self->settings_.idle_timeout;
      if (Clock::now() < due) {
        self->arm_idle_timer(due);
        return;
      }
      self->begin_close(websocket::close_code::going_away, "idle timeout", "idle timeout");
    });
  }

  void set_cause(const std::string& why) {
    if (cause_.empty()) cause_ = why;
  }

  // A failure before on_open (client: on_failure; server: just the end).
  void fail_open(const std::string& why) {
    set_cause(why);
    drop();
    if (client_) {
      log().debug("WebSocket to {}{}: {}", host_, target_, why);
    } else {
      log().debug("WebSocket from {}: handshake failed: {}", settings_.remote_address, why);
    }
    if (on_failure_) {
      auto f = std::exchange(on_failure_, nullptr);
      try {
        f(why);
      } catch (const std::exception& e) {
        log().error("WebSocket to {}{}: on_failure failed: {}", host_, target_, e.what());
      }
    }
    on_open_ = nullptr;
    finish();
  }

  void maybe_finish() {
    if (!reading_ && !writing_ && !finished_) finish();
  }

  void finish() {
    finished_ = true;
    closed_.store(true, std::memory_order_release);
    drop();
    idle_timer_.cancel();
    close_timer_.cancel();
    queue_.clear();
    if (opened_) log().debug("WebSocket {}: closed: {}", settings_.remote_address, cause_);
    if (auto session = std::move(session_)) {
      try {
        session->on_close(cause_);
      } catch (const std::exception& e) {
        log().error("WebSocket {}: on_close failed: {}", settings_.remote_address, e.what());
      }
    }
    if (auto done = std::exchange(done_, nullptr)) done();
  }

  const asio::any_io_executor executor_;
  websocket::stream<AnyStream> ws_;
  WsSettings settings_;
  WsOpenFn on_open_;                                    // until open()
  std::function<void()> done_;                          // until finish()
  std::function<void(const std::string&)> on_failure_;  // client, until open()
  std::string host_;                                    // client
  std::string target_;                                  // client
  http::request<http::string_body> request_;            // server, during the handshake
  websocket::response_type response_;                   // client, during the handshake
  std::shared_ptr<WebSocketSession> session_;           // from open() to finish()
  common::Labels received_labels_;
  common::Labels sent_labels_;

  beast::flat_buffer buffer_;
  std::deque<std::string> queue_;
  asio::steady_timer idle_timer_;
  asio::steady_timer close_timer_;
  Clock::time_point last_message_{};
  websocket::close_reason close_frame_;
  std::string cause_;  // why the connection ended, for on_close

  bool client_ = false;         // connect() rather than accept()
  bool opened_ = false;         // the handshake succeeded
  bool reading_ = false;        // an async_read is pending
  bool writing_ = false;        // an async_write or async_close is pending
  bool close_started_ = false;  // begin_close() ran
  bool refused_ = false;        // a binary message arrived: nothing more is delivered, closes use 1003
  bool close_sent_ = false;     // async_close was started
  bool dropped_ = false;        // the socket was closed
  bool finished_ = false;       // finish() ran

  std::atomic<bool> closed_{false};  // send() drops from now on (any thread)
  std::atomic<std::size_t> queued_bytes_{0};
};

void Peer::send(std::string message) {
  if (auto c = connection_.lock()) c->send(std::move(message));
}
void Peer::close(std::string reason) {
  if (auto c = connection_.lock()) c->close(std::move(reason));
}

}  // namespace

bool is_websocket_upgrade(const http::request<http::string_body>& request) { return websocket::is_upgrade(request); }

std::shared_ptr<WsLink> accept_websocket(AnyStream stream, http::request<http::string_body> request,
                                         WsSettings settings, WsOpenFn on_open, std::function<void()> done) {
  auto c = std::make_shared<WsConnection>(std::move(stream), std::move(settings), std::move(on_open), std::move(done));
  asio::post(c->executor(), [c, r = std::move(request)]() mutable { c->accept(std::move(r)); });
  return c;
}

std::shared_ptr<WsLink> connect_websocket(AnyStream stream, std::vector<tcp::endpoint> endpoints, std::string host,
                                          std::string target, WsSettings settings, WsOpenFn on_open,
                                          std::function<void(const std::string&)> on_failure,
                                          std::function<void()> done) {
  auto c = std::make_shared<WsConnection>(std::move(stream), std::move(settings), std::move(on_open), std::move(done));
  asio::post(c->executor(), [c, e = std::move(endpoints), h = std::move(host), t = std::move(target),
                             f = std::move(on_failure)]() mutable {
    c->connect(std::move(e), std::move(h), std::move(t), std::move(f));
  });
  return c;
}

}  // namespace net::detail
