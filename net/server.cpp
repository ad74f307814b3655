// net/server.cpp: the listeners and HTTP/1.1 sessions behind net::Server (see server.hpp).
//
// Shape (after Beast's advanced_server_flex_awaitable example, HTTP only):
//   - one io_context run by N threads; every acceptor and every connection has its own strand;
//   - accept_loop(): one coroutine per listener, spawns Connection::run() per accepted socket;
//   - Connection::run(): TLS handshake on TLS listeners, then serve() over a detail::AnyStream
//     (plain or TLS; type-erased so the session code is compiled once);
//   - serve(): read a request (parser with header/body limits, timeouts on the tcp_stream),
//     hand it to the HttpHandler, wait on a timer for the Responder (which may fire from any
//     thread and wakes the strand through a ReplySlot), write the response, loop on keep-alive.
//   - stop(): close the acceptors, close idle connections, let busy ones finish up to the
//     deadline, force-close the rest, join the threads.
// A WebSocket upgrade hooks into serve() right after the request header is read: upgrade()
// hands the stream to a WebSocket connection (websocket_connection.cpp, where the Beast
// WebSocket code is compiled) and waits, still registered as a connection, until it has ended;
// stop() asks it to close (1001) instead of closing the socket.
#include "net/server.hpp"

#include "common/log.hpp"
#include "common/metrics.hpp"
#include "common/version.hpp"
#include "net/detail/any_stream.hpp"
#include "net/detail/websocket_connection.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <spdlog/logger.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>
#include <tuple>

namespace net {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using boost::system::error_code;

constexpr auto kTuple = asio::as_tuple(asio::use_awaitable);
constexpr std::size_t kFirstReadSize = 4096;
// After an error reply the unread rest of the request is drained for a while, so that closing
// with unread input (which sends a RST) does not destroy the reply at the client.
constexpr auto kLingerTime = std::chrono::seconds(2);
constexpr std::size_t kLingerBytes = 1024 * 1024;
// How long stop() waits for force-closed connections to unwind before stopping the io_context.
constexpr auto kForceGrace = std::chrono::seconds(5);
constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
constexpr std::string_view kShutdownReason = "broker shutting down";

std::string host_port(const std::string& host, std::uint16_t port) {
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

std::string address_text(const asio::ip::address& a) {
  if (a.is_v6() && a.to_v6().is_v4_mapped()) {
    return asio::ip::make_address_v4(asio::ip::v4_mapped, a.to_v6()).to_string();
  }
  return a.to_string();
}

bool iequals(std::string_view a, std::string_view b) { return beast::iequals(a, b); }

bool has_line_break(std::string_view s) { return s.find_first_of("\r\n") != std::string_view::npos; }

class Connection;

// State shared by the Server, its listeners and its connections. Every coroutine keeps it alive
// (through its Listener), so a frame destroyed late, in the io_context's destructor, never
// touches freed memory. Thread-safe.
class ServerState {
 public:
  ServerState(std::shared_ptr<spdlog::logger> log, common::Metrics* m)
      : logger(std::move(log)), metrics(m), server_header(std::string("openbroker/") + common::kVersion) {}

  const std::shared_ptr<spdlog::logger> logger;
  common::Metrics* const metrics;  // may be null
  const std::string server_header;

  bool stopping() const { return stopping_.load(std::memory_order_acquire); }

  // Registers a new connection; false once stop() has begun (the caller then drops it).
  bool add_connection(const std::shared_ptr<Connection>& c) {
    std::lock_guard lock(mutex_);
    if (stopping()) return false;
    connections_.emplace(c.get(), c);
    ++active_;
    return true;
  }
  void remove_connection(const Connection* c) {
    std::lock_guard lock(mutex_);
    connections_.erase(c);
    finish_one();
  }
  void loop_started() {
    std::lock_guard lock(mutex_);
    ++active_;
  }
  void loop_finished() {
    std::lock_guard lock(mutex_);
    finish_one();
  }

  // Sets the stopping flag: no new connections from now on, no more keep-alive.
  void begin_stop() {
    std::lock_guard lock(mutex_);
    stopping_.store(true, std::memory_order_release);
  }
  std::vector<std::shared_ptr<Connection>> snapshot() {
    std::lock_guard lock(mutex_);
    return snapshot_locked();
  }
  // True when every accept loop and connection has finished before `until`.
  bool wait_idle_until(Clock::time_point until) {
    std::unique_lock lock(mutex_);
    return idle_cv_.wait_until(lock, until, [this] { return active_ == 0; });
  }

 private:
  void finish_one() {
    if (--active_ == 0) idle_cv_.notify_all();
  }
  std::vector<std::shared_ptr<Connection>> snapshot_locked() {
    std::vector<std::shared_ptr<Connection>> out;
    for (auto& [ptr, weak] : connections_) {
      if (auto c = weak.lock()) out.push_back(std::move(c));
    }
    return out;
  }

  std::atomic<bool> stopping_{false};
  std::mutex mutex_;
  std::condition_variable idle_cv_;
  std::size_t active_ = 0;                                              // guarded by mutex_
  std::map<const Connection*, std::weak_ptr<Connection>> connections_;  // guarded by mutex_
};

// One bound listening socket with its options and handler. The acceptor is used on `strand`
// only, once the accept loop runs.
struct Listener {
  Listener(asio::io_context& io, const ListenerOptions& opts, HttpHandler h, std::optional<WebSocketHandler> ws,
           std::shared_ptr<ServerState> s)
      : ioc(io),
        options(opts),
        handler(std::move(h)),
        websocket(std::move(ws)),
        state(std::move(s)),
        acceptor(io),
        strand(asio::make_strand(io)) {}

  asio::io_context& ioc;
  const ListenerOptions options;
  const HttpHandler handler;                        // called concurrently from several strands
  const std::optional<WebSocketHandler> websocket;  // set: upgrades on websocket->path
  const std::shared_ptr<ServerState> state;
  std::unique_ptr<ssl::context> tls;  // null: plain HTTP
  tcp::acceptor acceptor;
  asio::strand<asio::io_context::executor_type> strand;
  std::uint16_t port = 0;
  std::string endpoint;  // "127.0.0.1:8082"

  void connection_opened() { count_connection(+1); }
  void connection_closed() { count_connection(-1); }
  void websocket_opened() { count_websocket(+1); }
  void websocket_closed() { count_websocket(-1); }

  void record(const std::string& method, const std::string& route, int status, Clock::time_point started) const {
    if (state->metrics == nullptr) return;
    const std::chrono::duration<double> elapsed = Clock::now() - started;
    state->metrics->add(
        "broker_http_requests_total",
        {{"listener", options.name}, {"route", route}, {"method", method}, {"status", std::to_string(status)}});
    state->metrics->observe("broker_http_request_duration_seconds", {{"listener", options.name}, {"route", route}},
                            elapsed.count());
  }

 private:
  void count_connection(int delta) {
    std::lock_guard lock(gauge_mutex_);
    open_connections_ += delta;
    if (state->metrics != nullptr) {
      state->metrics->set("broker_http_connections", {{"listener", options.name}},
                          static_cast<double>(open_connections_));
    }
  }
  void count_websocket(int delta) {
    std::lock_guard lock(gauge_mutex_);
    open_websockets_ += delta;
    if (state->metrics != nullptr) {
      state->metrics->set("broker_websocket_connections", {{"listener", options.name}},
                          static_cast<double>(open_websockets_));
    }
  }
  std::mutex gauge_mutex_;
  std::int64_t open_connections_ = 0;  // guarded by gauge_mutex_
  std::int64_t open_websockets_ = 0;   // guarded by gauge_mutex_
};

// Where a request's Responder (any thread) meets its connection (strand). The connection waits
// on a timer; deliver() stores the response and calls `wake`, which posts a cancel of that timer
// to the strand. detach() (the connection gave up or finished) makes later deliveries no-ops;
// wake is called under the mutex, so it never runs after detach() returned.
class ReplySlot {
 public:
  explicit ReplySlot(std::function<void()> wake) : wake_(std::move(wake)) {}

  void deliver(HttpResponse response) {
    std::lock_guard lock(mutex_);
    if (answered_) return;  // the contract is "exactly once": extra calls are dropped
    answered_ = true;
    if (!wake_) return;
    response_ = std::move(response);
    wake_();
  }
  std::optional<HttpResponse> take() {
    std::lock_guard lock(mutex_);
    return std::exchange(response_, std::nullopt);
  }
  void detach() {
    std::lock_guard lock(mutex_);
    wake_ = nullptr;
  }

 private:
  std::mutex mutex_;
  std::function<void()> wake_;            // guarded by mutex_
  bool answered_ = false;                 // guarded by mutex_
  std::optional<HttpResponse> response_;  // guarded by mutex_
};

// Maps a read error to the status of the reply sent before closing; 0: close without a reply.
int error_status(const error_code& ec) {
  if (ec == http::error::body_limit) return 413;
  if (ec == http::error::header_limit) return 431;
  if (ec == http::error::end_of_stream || ec == http::error::partial_message) return 0;
  if (ec.category() == http::make_error_code(http::error::bad_target).category()) return 400;
  return 0;  // timeout, reset, TLS failure, cancelled by stop
}

// The Beast response for `r`. Content-Length always (never chunked); `keep_alive` is cleared
// when the handler asked for "Connection: close". Header values with line breaks are dropped.
http::response<http::string_body> make_response(HttpResponse&& r, unsigned version, bool head, bool& keep_alive,
                                                const std::string& server_header) {
  int status = r.status;
  if (status < 100 || status > 999) status = 500;
  http::response<http::string_body> res;
  res.version(version);
  res.result(static_cast<unsigned>(status));
  res.reason(reason_phrase(status));
  res.set(http::field::server, server_header);
  const bool no_body = status < 200 || status == 204 || status == 304;
  if (!no_body && !r.content_type.empty() && !has_line_break(r.content_type)) {
    res.set(http::field::content_type, r.content_type);
  }
  for (const auto& [name, value] : r.headers) {
    if (name.empty() || has_line_break(name) || has_line_break(value)) continue;
    if (iequals(name, "content-length") || iequals(name, "transfer-encoding")) continue;
    if (iequals(name, "connection")) {
      if (value.find("close") != std::string::npos) keep_alive = false;
      continue;
    }
    res.insert(name, value);
  }
  if (!no_body) {
    res.content_length(r.body.size());
    if (!head) res.body() = std::move(r.body);
  }
  res.keep_alive(keep_alive);
  return res;
}

HttpRequest to_request(http::request<http::string_body>&& msg) {
  HttpRequest r;
  r.method = std::string(msg.method_string());
  r.target = std::string(msg.target());
  const auto q = r.target.find('?');
  r.path = percent_decode(std::string_view(r.target).substr(0, q));
  if (q != std::string::npos) r.query = r.target.substr(q + 1);
  for (const auto& field : msg) {
    auto [it, inserted] = r.headers.emplace(std::string(field.name_string()), std::string(field.value()));
    if (!inserted) {
      it->second += ", ";
      it->second += field.value();
    }
  }
  r.body = std::move(msg.body());
  return r;
}

// Why a server-side TLS handshake failed because of the client's certificate, with OpenSSL's
// words ("peer did not return a certificate (SSL routines)", "unable to get local issuer
// certificate"); empty when it failed for another reason. `ssl`: the failed connection.
std::string client_certificate_problem(const error_code& ec, ssl_st* ssl) {
  if (ec.category() != asio::error::get_ssl_category()) return {};
  const auto code = static_cast<unsigned long>(ec.value());
  if (ERR_GET_LIB(code) != ERR_LIB_SSL) return {};
  switch (ERR_GET_REASON(code)) {
    case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE: return ec.message();
    case SSL_R_CERTIFICATE_VERIFY_FAILED: {
      const long result = ssl != nullptr ? SSL_get_verify_result(ssl) : X509_V_OK;
      return result == X509_V_OK ? ec.message() : X509_verify_cert_error_string(result);
    }
    default: return {};
  }
}

// One accepted connection. Everything but the constructor runs on the connection's strand
// (the executor of its socket); graceful_close() and force_close() must be posted there.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(std::shared_ptr<Listener> listener, tcp::socket socket, std::string remote)
      : listener_(std::move(listener)),
        stream_(listener_->tls ? detail::AnyStream(beast::tcp_stream(std::move(socket)), *listener_->tls,
                                                   detail::AnyStream::Role::server)
                               : detail::AnyStream(beast::tcp_stream(std::move(socket)))),
        reply_timer_(stream_.get_executor()),
        remote_(std::move(remote)) {}

  asio::any_io_executor executor() { return reply_timer_.get_executor(); }

  static asio::awaitable<void> run(std::shared_ptr<Connection> self);

  // Stop requested: closes the connection unless a request is in progress (which then gets
  // "Connection: close"); a connection lingering after its last reply is closed too; a
  // WebSocket connection gets a close frame (1001).
  void graceful_close() {
    if (phase_ == Phase::websocket) {
      if (websocket_) websocket_->shutdown(std::string(kShutdownReason));
    } else if (phase_ == Phase::starting || phase_ == Phase::idle || phase_ == Phase::closing) {
      stream_.lowest_layer().close();
    }
  }
  // The stop deadline passed: abandons whatever is in progress.
  void force_close() {
    closing_ = true;
    if (phase_ == Phase::websocket) {
      if (websocket_) websocket_->abort();
    } else {
      stream_.lowest_layer().close();
    }
    reply_timer_.cancel();
  }

 private:
  // websocket: stream_ has moved to the WebSocket connection (websocket_).
  enum class Phase { starting, idle, reading, handling, writing, closing, websocket };

  asio::awaitable<void> serve();
  asio::awaitable<void> upgrade(http::request<http::string_body> request, bool clean, Clock::time_point started);
  asio::awaitable<void> reply_error(int status, Clock::time_point started);
  asio::awaitable<void> shut_down(bool drain);
  asio::awaitable<std::optional<HttpResponse>> handle(HttpRequest request, Clock::time_point deadline);

  const ListenerOptions& options() const { return listener_->options; }
  spdlog::logger& log() const { return *listener_->state->logger; }

  const std::shared_ptr<Listener> listener_;
  detail::AnyStream stream_;
  asio::steady_timer reply_timer_;
  const std::string remote_;
  Phase phase_ = Phase::starting;
  bool closing_ = false;                       // force_close() was called
  std::shared_ptr<detail::WsLink> websocket_;  // Phase::websocket
  bool websocket_done_ = false;                // the WebSocket connection has ended
};

asio::awaitable<void> Connection::run(std::shared_ptr<Connection> self) {
  // Runs when the coroutine ends, also when its frame is destroyed without resuming.
  struct Exit {
    Connection& c;
    ~Exit() {
      if (c.phase_ == Phase::websocket) {
        c.listener_->websocket_closed();
      } else {
        c.listener_->connection_closed();
      }
      c.listener_->state->remove_connection(&c);
    }
  } exit{*self};
  self->listener_->connection_opened();
  try {
    if (self->stream_.tls()) {
      self->stream_.lowest_layer().expires_after(self->options().read_timeout);
      auto [ec] = co_await self->stream_.async_handshake(kTuple);
      if (ec) {
        if (self->listener_->state->stopping()) co_return;
        const std::string rejected = self->options().tls_client_ca_file.empty()
                                         ? std::string()
                                         : client_certificate_problem(ec, self->stream_.tls_handle());
        if (!rejected.empty()) {
          self->log().info("{} listener: TLS handshake with {} failed: client certificate rejected: {}",
                           self->options().name, self->remote_, rejected);
        } else {
          self->log().debug("{} listener: TLS handshake with {} failed: {}", self->options().name, self->remote_,
                            ec.message());
        }
        co_return;
      }
    }
    co_await self->serve();
  } catch (const std::exception& e) {
    self->log().error("{} listener: connection from {}: {}", self->options().name, self->remote_, e.what());
  }
}

asio::awaitable<void> Connection::serve() {
  const ListenerOptions& opts = options();
  const ServerState& state = *listener_->state;
  beast::tcp_stream& lowest = stream_.lowest_layer();
  beast::flat_buffer buffer;
  error_code ec;
  for (;;) {
    // Between requests: wait for the first byte under the idle timeout.
    if (buffer.size() == 0) {
      if (state.stopping() || closing_) co_return;
      phase_ = Phase::idle;
      lowest.expires_after(opts.idle_timeout);
      std::size_t n = 0;
      std::tie(ec, n) = co_await stream_.async_read_some(buffer.prepare(kFirstReadSize), kTuple);
      if (ec) co_return;  // closed by the peer, idle timeout, stop
      buffer.commit(n);
    }
    if (closing_) co_return;

    // The whole exchange (rest of the request, handler, and reply) runs under the read timeout.
    phase_ = Phase::reading;
    const auto started = Clock::now();
    const auto deadline = started + opts.read_timeout;
    lowest.expires_at(deadline);
    http::request_parser<http::string_body> parser;
    parser.header_limit(static_cast<std::uint32_t>(
        std::min<std::size_t>(opts.header_limit, std::numeric_limits<std::uint32_t>::max())));
    parser.body_limit(static_cast<std::uint64_t>(opts.body_limit));
    std::tie(ec, std::ignore) = co_await http::async_read_header(stream_, buffer, parser, kTuple);

    // WebSocket upgrade: the connection leaves the HTTP loop for good.
    if (!ec && listener_->websocket && detail::is_websocket_upgrade(parser.get())) {
      const bool clean = parser.is_done() && buffer.size() == 0;  // no body, nothing after it
      co_await upgrade(parser.release(), clean, started);
      co_return;
    }

    if (!ec && iequals(parser.get()[http::field::expect], "100-continue") && !parser.is_done()) {
      std::tie(ec, std::ignore) = co_await asio::async_write(stream_, asio::buffer(kContinue), kTuple);
    }
    if (!ec && !parser.is_done()) {
      std::tie(ec, std::ignore) = co_await http::async_read(stream_, buffer, parser, kTuple);
    }
    if (ec) {
      const int status = error_status(ec);
      if (status != 0 && !closing_) co_await reply_error(status, started);
      co_return;
    }

    const bool head = parser.get().method() == http::verb::head;
    const unsigned version = parser.get().version();
    bool keep_alive = parser.get().keep_alive();
    HttpRequest request = to_request(parser.release());
    request.remote_address = remote_;
    request.listener = opts.name;
    request.tls = stream_.tls();
    const std::string method = request.method;
    std::string route = request.path;

    phase_ = Phase::handling;
    std::optional<HttpResponse> response = co_await handle(std::move(request), deadline);
    if (!response) {
      if (!closing_) {
        log().warn("{} listener: no response to {} {} within the read timeout; closing the connection", opts.name,
                   method, route);
      }
      co_return;
    }
    if (!response->route.empty()) route = std::move(response->route);
    keep_alive = keep_alive && !state.stopping() && !closing_;
    auto res = make_response(std::move(*response), version, head, keep_alive, state.server_header);

    phase_ = Phase::writing;
    lowest.expires_after(opts.read_timeout);
    std::tie(ec, std::ignore) = co_await http::async_write(stream_, res, kTuple);
    listener_->record(method, route, static_cast<int>(res.result_int()), started);
    if (ec) co_return;
    if (!keep_alive) {
      co_await shut_down(false);
      co_return;
    }
  }
}

// Runs the WebSocket connection for an upgrade `request` and returns when it has ended. Not on
// the handler's path: 404. With a body or bytes after the request (a client must wait for the
// 101 before it sends frames): 400.
asio::awaitable<void> Connection::upgrade(http::request<http::string_body> request, bool clean,
                                          Clock::time_point started) {
  const WebSocketHandler& handler = *listener_->websocket;
  const ServerState& state = *listener_->state;
  const std::string_view target = request.target();
  if (percent_decode(target.substr(0, target.find('?'))) != handler.path) {
    co_await reply_error(404, started);
    co_return;
  }
  if (!clean) {
    co_await reply_error(400, started);
    co_return;
  }
  detail::WsSettings settings;
  settings.max_message_bytes = handler.max_message_bytes;
  settings.max_send_queue_bytes = handler.max_send_queue_bytes;
  settings.idle_timeout = handler.idle_timeout;
  settings.keep_alive = handler.idle_timeout;
  settings.handshake_timeout = options().read_timeout;
  settings.remote_address = remote_;
  settings.user_agent = state.server_header;
  settings.logger = state.logger;
  settings.metrics = state.metrics;
  settings.listener = options().name;

  listener_->connection_closed();
  listener_->websocket_opened();
  phase_ = Phase::websocket;
  websocket_ = detail::accept_websocket(std::move(stream_), std::move(request), std::move(settings), handler.on_open,
                                        [weak = weak_from_this()] {
                                          // On this strand (the socket's), once the WebSocket
                                          // connection has ended.
                                          if (auto self = weak.lock()) {
                                            self->websocket_done_ = true;
                                            self->reply_timer_.cancel();
                                          }
                                        });
  // stop() began before this connection was a WebSocket: its graceful_close() did nothing.
  if (state.stopping()) websocket_->shutdown(std::string(kShutdownReason));
  reply_timer_.expires_at(Clock::time_point::max());
  while (!websocket_done_) co_await reply_timer_.async_wait(kTuple);
  websocket_.reset();
}

asio::awaitable<std::optional<HttpResponse>> Connection::handle(HttpRequest request, Clock::time_point deadline) {
  auto slot = std::make_shared<ReplySlot>([self = shared_from_this()] {
    asio::post(self->reply_timer_.get_executor(), [self] { self->reply_timer_.cancel(); });
  });
  struct Detach {
    ReplySlot& s;
    ~Detach() { s.detach(); }
  } detach{*slot};
  try {
    listener_->handler(std::move(request), [slot](HttpResponse r) { slot->deliver(std::move(r)); });
  } catch (const std::exception& e) {
    log().error("{} listener: handler failed: {}", options().name, e.what());
    slot->deliver(HttpResponse{500, "text/plain; charset=utf-8", "internal error\n", {}, {}});
  } catch (...) {
    log().error("{} listener: handler failed with an unknown exception", options().name);
    slot->deliver(HttpResponse{500, "text/plain; charset=utf-8", "internal error\n", {}, {}});
  }
  reply_timer_.expires_at(deadline);
  for (;;) {
    if (auto r = slot->take()) co_return r;
    if (closing_ || Clock::now() >= deadline) co_return std::nullopt;
    // Ends at the deadline, on deliver() (the posted cancel) or on force_close().
    co_await reply_timer_.async_wait(kTuple);
  }
}

asio::awaitable<void> Connection::reply_error(int status, Clock::time_point started) {
  HttpResponse r;
  r.status = status;
  r.body = std::to_string(status) + " " + reason_phrase(status) + "\n";
  bool keep_alive = false;
  auto res = make_response(std::move(r), 11, false, keep_alive, listener_->state->server_header);
  phase_ = Phase::writing;
  stream_.lowest_layer().expires_after(options().read_timeout);
  auto [ec, n] = co_await http::async_write(stream_, res, kTuple);
  listener_->record("-", "-", status, started);
  if (!ec) co_await shut_down(true);
}

// Ends the connection after a "Connection: close" reply. TLS: close_notify, briefly. Plain TCP:
// FIN, then (drain) read and discard what the client still sends for a short while.
asio::awaitable<void> Connection::shut_down(bool drain) {
  phase_ = Phase::closing;
  if (closing_) co_return;
  stream_.lowest_layer().expires_after(kLingerTime);
  auto [ec] = co_await stream_.async_shutdown(kTuple);
  if (ec || !drain || stream_.tls()) co_return;
  std::size_t drained = 0;
  char sink[4096];
  while (drained < kLingerBytes) {
    std::size_t n = 0;
    std::tie(ec, n) = co_await stream_.async_read_some(asio::buffer(sink), kTuple);
    if (ec) break;
    drained += n;
  }
}

asio::awaitable<void> accept_loop(std::shared_ptr<Listener> l) {
  struct Exit {
    ServerState& s;
    ~Exit() { s.loop_finished(); }
  } exit{*l->state};
  ServerState& state = *l->state;
  asio::steady_timer backoff(l->strand);
  for (;;) {
    tcp::socket socket(asio::make_strand(l->ioc));
    auto [ec] = co_await l->acceptor.async_accept(socket, kTuple);
    if (!l->acceptor.is_open() || state.stopping() || ec == asio::error::operation_aborted) co_return;
    if (ec) {
      state.logger->warn("{} listener: accept failed: {}", l->options.name, ec.message());
      // Out of file descriptors and the like: back off instead of spinning.
      backoff.expires_after(std::chrono::milliseconds(100));
      co_await backoff.async_wait(kTuple);
      continue;
    }
    error_code peer_ec;
    const auto peer = socket.remote_endpoint(peer_ec);
    if (peer_ec) continue;  // already gone
    auto conn = std::make_shared<Connection>(l, std::move(socket), address_text(peer.address()));
    if (!state.add_connection(conn)) co_return;
    asio::co_spawn(conn->executor(), Connection::run(conn), asio::detached);
  }
}

// Empty string on success, else why the file cannot be read.
std::string check_readable(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return std::strerror(errno);
  std::fclose(f);
  return {};
}

// A TLS 1.2+ server context from the listener's PEM files; with tls_client_ca_file it also
// requires a client certificate that chains to one of those CAs (mutual TLS). Throws
// std::runtime_error("<where>: ...") naming the file that failed.
std::unique_ptr<ssl::context> make_tls_context(const std::string& where, const ListenerOptions& options) {
  const std::string& cert = options.tls_cert_file;
  const std::string& key = options.tls_key_file;
  const std::string& client_ca = options.tls_client_ca_file;
  auto fail = [&](const std::string& reason) {
    ERR_clear_error();  // nothing left behind for the next OpenSSL call on this thread
    throw std::runtime_error(where + ": " + reason);
  };
  auto ctx = std::make_unique<ssl::context>(ssl::context::tls_server);
  error_code ec;
  ctx->set_options(ssl::context::default_workarounds | ssl::context::single_dh_use, ec);
  if (SSL_CTX_set_min_proto_version(ctx->native_handle(), TLS1_2_VERSION) != 1) fail("cannot require TLS 1.2");
  if (auto why = check_readable(cert); !why.empty()) fail("cannot read TLS certificate " + cert + ": " + why);
  if (auto why = check_readable(key); !why.empty()) fail("cannot read TLS key " + key + ": " + why);
  ctx->use_certificate_chain_file(cert, ec);
  if (ec) fail("cannot load TLS certificate " + cert + ": " + ec.message());
  ctx->use_private_key_file(key, ssl::context::pem, ec);
  if (ec) fail("cannot load TLS key " + key + ": " + ec.message());
  if (SSL_CTX_check_private_key(ctx->native_handle()) != 1) {
    fail("TLS key " + key + " does not match certificate " + cert);
  }
  if (!client_ca.empty()) {
    if (auto why = check_readable(client_ca); !why.empty()) {
      fail("cannot read TLS client CA file " + client_ca + ": " + why);
    }
    // The CA names go into the CertificateRequest, so that a client with several certificates
    // can pick the one this listener accepts.
    STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(client_ca.c_str());
    if (names == nullptr) fail("TLS client CA file " + client_ca + " holds no PEM certificate");
    SSL_CTX_set_client_CA_list(ctx->native_handle(), names);  // takes ownership
    ctx->load_verify_file(client_ca, ec);
    if (ec) fail("cannot load TLS client CA file " + client_ca + ": " + ec.message());
    ctx->set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert);
    // OpenSSL refuses to resume sessions of a verifying server without a session id context.
    static constexpr unsigned char kSessionContext[] = "openbroker";
    SSL_CTX_set_session_id_context(ctx->native_handle(), kSessionContext, sizeof kSessionContext - 1);
  }
  return ctx;
}

}  // namespace

struct Server::Impl {
  Impl(int thread_count, std::shared_ptr<spdlog::logger> logger, common::Metrics* metrics)
      : ioc(thread_count),
        threads_wanted(thread_count),
        state(std::make_shared<ServerState>(logger ? std::move(logger) : common::null_logger(), metrics)) {
    if (metrics != nullptr) {
      metrics->describe("broker_http_requests_total", common::Metrics::Type::counter,
                        "HTTP requests answered, by listener, route, method and status.");
      metrics->describe("broker_http_request_duration_seconds", common::Metrics::Type::histogram,
                        "Time from the first byte of a request to the end of its response.");
      metrics->describe("broker_http_connections", common::Metrics::Type::gauge, "Open HTTP connections.");
      metrics->describe("broker_websocket_connections", common::Metrics::Type::gauge, "Open WebSocket connections.");
      metrics->describe("broker_websocket_messages_total", common::Metrics::Type::counter,
                        "WebSocket messages, by listener and direction (received, sent).");
    }
  }

  ~Impl() {
    if (stopper.joinable()) stopper.join();
    stop(std::chrono::milliseconds(0));
  }

  void add_listener(const ListenerOptions& options, HttpHandler handler, std::optional<WebSocketHandler> websocket);
  std::uint16_t port(const std::string& name) const;
  void start();
  void stop(std::chrono::milliseconds deadline);
  void wait_for_signal();
  bool running() const {
    std::lock_guard lock(mutex);
    return phase == Phase::running;
  }

  void spawn_accept_loop(const std::shared_ptr<Listener>& l) {
    state->loop_started();
    asio::co_spawn(l->strand, accept_loop(l), asio::detached);
    state->logger->info("{} listener on {} ({}{}{}{})", l->options.name, l->endpoint, l->tls ? "https" : "http",
                        l->websocket ? (l->tls ? ", wss on " : ", ws on ") : "",
                        l->websocket ? l->websocket->path : std::string(),
                        l->options.tls_client_ca_file.empty() ? "" : ", client certificates required");
  }
  void run_thread() {
    for (;;) {
      try {
        ioc.run();
        return;
      } catch (const std::exception& e) {
        state->logger->error("I/O thread: unhandled exception: {}", e.what());
      }
    }
  }
  void do_stop(std::chrono::milliseconds deadline);

  enum class Phase { created, running, stopping, stopped };

  asio::io_context ioc;  // first member: destroyed last, after everything that uses it
  const int threads_wanted;
  const std::shared_ptr<ServerState> state;

  mutable std::mutex mutex;
  std::condition_variable stopped_cv;
  Phase phase = Phase::created;                                                    // guarded by mutex
  std::vector<std::shared_ptr<Listener>> listeners;                                // guarded by mutex
  std::vector<asio::io_context*> signal_waiters;                                   // guarded by mutex
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;  // guarded by mutex
  std::vector<std::thread> threads;  // written by start(), joined by do_stop()
  std::thread stopper;               // runs do_stop() when stop() is called on an I/O thread
};

void Server::Impl::add_listener(const ListenerOptions& options, HttpHandler handler,
                                std::optional<WebSocketHandler> websocket) {
  const std::string where = options.name + " listener " + host_port(options.address, options.port);
  auto fail = [&](const std::string& reason) { throw std::runtime_error(where + ": " + reason); };
  if (!handler) fail("no handler");
  if (websocket) {
    if (!websocket->on_open) fail("no WebSocket on_open handler");
    if (!websocket->path.starts_with("/")) fail("WebSocket path must start with '/'");
  }
  {
    std::lock_guard lock(mutex);
    if (phase == Phase::stopping || phase == Phase::stopped) fail("the server is stopped");
    for (const auto& l : listeners) {
      if (l->options.name == options.name) fail("duplicate listener name");
    }
  }
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    fail("tls_cert_file and tls_key_file must be given together");
  }
  auto l = std::make_shared<Listener>(ioc, options, std::move(handler), std::move(websocket), state);
  if (!options.tls_client_ca_file.empty() && options.tls_cert_file.empty()) {
    fail("tls_client_ca_file needs tls_cert_file and tls_key_file");
  }
  if (!options.tls_cert_file.empty()) l->tls = make_tls_context(where, options);

  error_code ec;
  tcp::endpoint endpoint;
  const auto address = asio::ip::make_address(options.address, ec);
  if (!ec) {
    endpoint = tcp::endpoint(address, options.port);
  } else {
    tcp::resolver resolver(ioc);
    const auto results = resolver.resolve(options.address, std::to_string(options.port),
                                          tcp::resolver::passive | tcp::resolver::address_configured, ec);
    if (ec || results.empty()) fail("cannot resolve the address: " + (ec ? ec.message() : "no address"));
    endpoint = results.begin()->endpoint();
  }
  l->acceptor.open(endpoint.protocol(), ec);
  if (!ec) l->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) l->acceptor.bind(endpoint, ec);
  if (!ec) l->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) fail(ec.message());
  l->port = l->acceptor.local_endpoint(ec).port();
  if (ec) fail(ec.message());
  l->endpoint = host_port(address_text(endpoint.address()), l->port);
  l->connection_opened();  // publishes the gauge at 0 ...
  l->connection_closed();  // ... for listeners nobody connected to yet
  if (l->websocket) {
    l->websocket_opened();
    l->websocket_closed();
  }

  std::lock_guard lock(mutex);
  if (phase == Phase::stopping || phase == Phase::stopped) fail("the server is stopped");
  for (const auto& other : listeners) {
    if (other->options.name == options.name) fail("duplicate listener name");
  }
  listeners.push_back(l);
  if (phase == Phase::running) spawn_accept_loop(l);
}

std::uint16_t Server::Impl::port(const std::string& name) const {
  std::lock_guard lock(mutex);
  for (const auto& l : listeners) {
    if (l->options.name == name) return l->port;
  }
  return 0;
}

void Server::Impl::start() {
  std::lock_guard lock(mutex);
  if (phase != Phase::created) return;
  phase = Phase::running;
  work.emplace(ioc.get_executor());
  for (const auto& l : listeners) spawn_accept_loop(l);
  for (int i = 0; i < threads_wanted; ++i) threads.emplace_back([this] { run_thread(); });
}

void Server::Impl::stop(std::chrono::milliseconds deadline) {
  {
    std::unique_lock lock(mutex);
    for (auto* waiter : signal_waiters) waiter->stop();
    switch (phase) {
      case Phase::created:
        // Never started: nothing runs, only the bound ports are to be released.
        phase = Phase::stopped;
        state->begin_stop();
        for (const auto& l : listeners) {
          error_code ignored;
          l->acceptor.close(ignored);
        }
        stopped_cv.notify_all();
        return;
      case Phase::stopped: return;
      case Phase::stopping:
        if (ioc.get_executor().running_in_this_thread()) return;
        stopped_cv.wait(lock, [this] { return phase == Phase::stopped; });
        return;
      case Phase::running:
        phase = Phase::stopping;
        state->begin_stop();  // from now on every response says "Connection: close"
        if (ioc.get_executor().running_in_this_thread()) {
          // An I/O thread cannot wait for the I/O threads: another thread does the stopping.
          stopper = std::thread([this, deadline] { do_stop(deadline); });
          return;
        }
        break;
    }
  }
  do_stop(deadline);
}

void Server::Impl::do_stop(std::chrono::milliseconds deadline) {
  const auto until = Clock::now() + deadline;
  std::vector<std::shared_ptr<Listener>> ls;
  {
    std::lock_guard lock(mutex);
    ls = listeners;
  }
  auto busy = state->snapshot();  // stop() called begin_stop(): no connection is added any more
  for (const auto& l : ls) {
    asio::post(l->strand, [l] {
      error_code ignored;
      l->acceptor.close(ignored);
    });
  }
  for (const auto& c : busy) asio::post(c->executor(), [c] { c->graceful_close(); });
  busy.clear();
  if (!state->wait_idle_until(until)) {
    busy = state->snapshot();
    state->logger->info("stopping: closing {} connection(s) still busy at the deadline", busy.size());
    for (const auto& c : busy) asio::post(c->executor(), [c] { c->force_close(); });
    busy.clear();
    if (!state->wait_idle_until(Clock::now() + kForceGrace)) {
      state->logger->warn("stopping: connections did not close in time; abandoning them");
    }
  }
  {
    std::lock_guard lock(mutex);
    work.reset();
  }
  ioc.stop();
  for (auto& t : threads) t.join();
  threads.clear();
  std::lock_guard lock(mutex);
  phase = Phase::stopped;
  stopped_cv.notify_all();
}

void Server::Impl::wait_for_signal() {
  asio::io_context ctx(1);
  asio::signal_set signals(ctx, SIGINT, SIGTERM);
  int received = 0;
  signals.async_wait([&received](const error_code& ec, int signal_number) {
    if (!ec) received = signal_number;
  });
  {
    std::lock_guard lock(mutex);
    if (phase == Phase::stopping || phase == Phase::stopped) return;
    signal_waiters.push_back(&ctx);
  }
  ctx.run();
  {
    std::lock_guard lock(mutex);
    std::erase(signal_waiters, &ctx);
  }
  if (received != 0) state->logger->info("received {}", received == SIGINT ? "SIGINT" : "SIGTERM");
}

Server::Server(int threads, std::shared_ptr<spdlog::logger> logger, common::Metrics* metrics)
    : impl_(std::make_unique<Impl>(threads < 1 ? 1 : threads, std::move(logger), metrics)) {}

Server::~Server() = default;

void Server::add_listener(const ListenerOptions& options, HttpHandler handler) {
  impl_->add_listener(options, std::move(handler), std::nullopt);
}
void Server::add_listener(const ListenerOptions& options, HttpHandler handler, WebSocketHandler websocket) {
  impl_->add_listener(options, std::move(handler), std::move(websocket));
}
std::uint16_t Server::port(const std::string& listener_name) const { return impl_->port(listener_name); }
void Server::start() { impl_->start(); }
void Server::stop(std::chrono::milliseconds deadline) { impl_->stop(deadline); }
void Server::wait_for_signal() { impl_->wait_for_signal(); }
bool Server::running() const { return impl_->running(); }

}  // namespace net
