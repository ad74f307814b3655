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
// A WebSocket upgrade hooks into serve() right after the request header is read: serve() returns
// (freeing its read buffer and parser), then upgrade() hands the stream to a WebSocket connection (websocket_connection.cpp, where the Beast
// WebSocket code is compiled) and waits, still registered as a connection, until it has ended;
// stop() asks it to close (1001) instead of closing the socket.
// Connection caps: accept_loop() asks its Listener to admit() each accepted socket (listener cap,
// per-address cap, the ServerState's shared limit, the over-limit band) and closes it at once when
// refused; the Connection gives its place back when it is destroyed.
#include "net/server.hpp"

#include "common/timers.hpp"

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
#include <unordered_map>

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
// Beast keeps a field's name and value lengths in 16 bits and throws (std::length_error) beyond
// them: longer fields are refused before they reach it.
constexpr std::size_t kMaxFieldBytes = std::numeric_limits<std::uint16_t>::max() - 2;
// The read buffer holds at most this much more than header_limit: one read's worth, so that a
// chunk line or trailer section (which Beast buffers whole) cannot grow it without bound.
constexpr std::size_t kReadChunkBytes = 64 * 1024;
// Pause after a failed accept (out of descriptors...), doubling up to kMaxAcceptBackoff.
constexpr auto kAcceptBackoff = std::chrono::milliseconds(50);
constexpr auto kMaxAcceptBackoff = std::chrono::milliseconds(1000);
// Refused connections and failed accepts are logged at most once per period, with a count.
constexpr auto kRefusalLogPeriod = std::chrono::seconds(10);
// Retry-After of the 503 a plain HTTP request gets on an over-limit connection.
constexpr int kOverLimitRetryAfterSeconds = 60;

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

  // The shared connection limit (Server::set_shared_connection_limit); 0: none.
  void set_shared_limit(std::size_t limit) { shared_limit_.store(limit, std::memory_order_relaxed); }
  // Takes one place under the shared limit; false when none is left.
  bool take_shared() {
    const std::size_t limit = shared_limit_.load(std::memory_order_relaxed);
    std::size_t used = shared_used_.load(std::memory_order_relaxed);
    do {
      if (limit != 0 && used >= limit) return false;
    } while (!shared_used_.compare_exchange_weak(used, used + 1, std::memory_order_relaxed));
    return true;
  }
  void give_shared() { shared_used_.fetch_sub(1, std::memory_order_relaxed); }

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
  std::atomic<std::size_t> shared_limit_{0};
  std::atomic<std::size_t> shared_used_{0};
  std::mutex mutex_;
  std::condition_variable idle_cv_;
  std::size_t active_ = 0;                                              // guarded by mutex_
  std::map<const Connection*, std::weak_ptr<Connection>> connections_;  // guarded by mutex_
};

// Where an accepted connection stands with the caps (Listener::admit).
enum class Admission { normal, over_limit, refused };

// Logs at most once per kRefusalLogPeriod: the first event after a quiet period at once, the
// others counted and reported with the next line. Not thread-safe (used on a listener's strand).
class LogThrottle {
 public:
  // True: log now; `skipped` is then the number of events not logged since the last line.
  bool ready(Clock::time_point now, std::uint64_t& skipped) {
    if (logged_ && now - last_ < kRefusalLogPeriod) {
      ++skipped_;
      return false;
    }
    logged_ = true;
    last_ = now;
    skipped = std::exchange(skipped_, 0);
    return true;
  }

 private:
  bool logged_ = false;
  Clock::time_point last_;
  std::uint64_t skipped_ = 0;
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

  // Decides whether a connection from `address` may open (see server.hpp "Connection caps");
  // `why` names the cap that refused it. Every admitted connection must be released() once.
  // Any thread.
  Admission admit(const std::string& address, const char*& why) {
    std::lock_guard lock(admit_mutex_);
    const auto it = per_address_.find(address);
    const std::size_t from_address = it == per_address_.end() ? 0 : it->second;
    if (options.max_connections_per_address != 0 && from_address >= options.max_connections_per_address) {
      why = "max_connections_per_address";
      return Admission::refused;
    }
    Admission result = Admission::refused;
    if (options.max_connections != 0 && admitted_ >= options.max_connections) {
      why = "max_connections";
    } else if (!options.reserved && !state->take_shared()) {
      why = "shared_limit";
    } else {
      result = Admission::normal;
      ++admitted_;
    }
    if (result == Admission::refused && over_limit_ < options.over_limit_connections) {
      result = Admission::over_limit;
      ++over_limit_;
    }
    if (result == Admission::refused) return result;
    if (it == per_address_.end())
      per_address_.emplace(address, 1);
    else
      ++it->second;
    return result;
  }
  void release(const std::string& address, Admission admission) {
    if (admission == Admission::refused) return;
    std::lock_guard lock(admit_mutex_);
    if (admission == Admission::normal) {
      --admitted_;
      if (!options.reserved) state->give_shared();
    } else {
      --over_limit_;
    }
    const auto it = per_address_.find(address);
    if (it != per_address_.end() && --it->second == 0) per_address_.erase(it);
  }

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

  std::mutex admit_mutex_;
  std::size_t admitted_ = 0;                                  // guarded by admit_mutex_
  std::size_t over_limit_ = 0;                                // guarded by admit_mutex_
  std::unordered_map<std::string, std::size_t> per_address_;  // guarded by admit_mutex_
};

// The WebSocketPeer handed to the WebSocketHandler for a connection accepted over the cap: the
// real peer, marked over_limit().
class OverLimitPeer final : public WebSocketPeer {
 public:
  explicit OverLimitPeer(std::shared_ptr<WebSocketPeer> peer) : peer_(std::move(peer)) {}
  void send(std::string message) override { peer_->send(std::move(message)); }
  void close(std::string reason) override { peer_->close(std::move(reason)); }
  std::string remote_address() const override { return peer_->remote_address(); }
  bool tls() const override { return peer_->tls(); }
  bool over_limit() const override { return true; }

 private:
  const std::shared_ptr<WebSocketPeer> peer_;
};

// Beast's request parser with limits on single fields (kMaxFieldBytes) and on the trailer section
// of a chunked body (`trailer_limit` bytes, names and values counted); trailer fields are dropped.
// Over a limit: http::error::header_limit (431).
class RequestParser final : public http::request_parser<http::string_body> {
 public:
  explicit RequestParser(std::size_t trailer_limit) : trailer_limit_(trailer_limit) {}

 private:
  void on_field_impl(http::field name, beast::string_view name_string, beast::string_view value,
                     error_code& ec) override {
    if (name_string.size() > kMaxFieldBytes || value.size() > kMaxFieldBytes) {
      ec = http::error::header_limit;
      return;
    }
    ec = {};
    if (is_header_done()) {  // a trailer field (RFC 9110 6.5: never merged into the header)
      trailer_bytes_ += name_string.size() + value.size();
      if (trailer_bytes_ > trailer_limit_) ec = http::error::header_limit;
      return;
    }
    get().insert(name, name_string, value);
  }

  const std::size_t trailer_limit_;
  std::size_t trailer_bytes_ = 0;
};

// Why a request's header breaks the framing rules of RFC 9112 (answered with 400), or "".
std::string_view framing_problem(const http::request<http::string_body>& req) {
  // 3.2: an HTTP/1.1 request has exactly one Host.
  if (req.version() >= 11 && req.count(http::field::host) != 1) return "HTTP/1.1 request without exactly one Host";
  // 6.1, 6.3: chunked must be the final (here: the only) transfer coding; none on HTTP/1.0.
  std::size_t codings = 0;
  bool chunked_only = true;
  for (auto [it, end] = req.equal_range(http::field::transfer_encoding); it != end; ++it) {
    if (req.version() < 11) return "Transfer-Encoding on an HTTP/1.0 request";
    std::string_view list = it->value();
    while (!list.empty()) {
      const auto comma = list.find(',');
      std::string_view item = list.substr(0, comma);
      list = comma == std::string_view::npos ? std::string_view() : list.substr(comma + 1);
      while (!item.empty() && (item.front() == ' ' || item.front() == '\t')) item.remove_prefix(1);
      while (!item.empty() && (item.back() == ' ' || item.back() == '\t')) item.remove_suffix(1);
      if (item.empty()) continue;
      ++codings;
      if (!iequals(item, "chunked")) chunked_only = false;
    }
  }
  if (codings > 1 || !chunked_only) return "Transfer-Encoding other than chunked";
  return {};
}

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
  if (ec == http::error::buffer_overflow) return 431;  // a chunk line or trailer section too long
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
  // `admission`: how listener->admit() let it in (normal or over_limit); given back on destruction.
  Connection(std::shared_ptr<Listener> listener, tcp::socket socket, std::string remote, Admission admission)
      : listener_(std::move(listener)),
        stream_(listener_->tls ? detail::AnyStream(beast::tcp_stream(std::move(socket)), *listener_->tls,
                                                   detail::AnyStream::Role::server)
                               : detail::AnyStream(beast::tcp_stream(std::move(socket)))),
        reply_timer_(stream_.get_executor()),
        remote_(std::move(remote)),
        admission_(admission),
        first_request_deadline_(Clock::now() + listener_->options.first_request_timeout) {}
  ~Connection() { listener_->release(remote_, admission_); }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

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
  asio::awaitable<void> reply_error(int status, Clock::time_point started,
                                    std::vector<std::pair<std::string, std::string>> headers = {});
  asio::awaitable<void> shut_down(bool drain);
  asio::awaitable<std::optional<HttpResponse>> handle(HttpRequest request, Clock::time_point deadline);

  const ListenerOptions& options() const { return listener_->options; }
  spdlog::logger& log() const { return *listener_->state->logger; }

  const std::shared_ptr<Listener> listener_;
  detail::AnyStream stream_;
  asio::steady_timer reply_timer_;
  const std::string remote_;
  const Admission admission_;
  const Clock::time_point first_request_deadline_;  // the TLS handshake and first request header
  Phase phase_ = Phase::starting;
  bool closing_ = false;                       // force_close() was called
  struct PendingUpgrade {
    http::request<http::string_body> request;
    bool clean = false;
    Clock::time_point started;
  };
  std::optional<PendingUpgrade> upgrade_;      // serve() read an upgrade request: run() does it
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
      self->stream_.lowest_layer().expires_at(self->first_request_deadline_);
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
    // An upgrade leaves serve() first, so its read buffer and parser are freed before the
    // WebSocket's (long) life begins: only this frame waits for it to end.
    if (auto upgrade = std::move(self->upgrade_)) {
      self->upgrade_.reset();
      co_await self->upgrade(std::move(upgrade->request), upgrade->clean, upgrade->started);
    }
  } catch (const std::exception& e) {
    self->log().error("{} listener: connection from {}: {}", self->options().name, self->remote_, e.what());
  }
}

asio::awaitable<void> Connection::serve() {
  const ListenerOptions& opts = options();
  const ServerState& state = *listener_->state;
  beast::tcp_stream& lowest = stream_.lowest_layer();
  beast::flat_buffer buffer(opts.header_limit + kReadChunkBytes);
  error_code ec;
  for (bool first = true;; first = false) {
    // Between requests: wait for the first byte under the idle timeout (the first request: under
    // the first-request deadline).
    if (buffer.size() == 0) {
      if (state.stopping() || closing_) co_return;
      phase_ = Phase::idle;
      if (first)
        lowest.expires_at(first_request_deadline_);
      else
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
    lowest.expires_at(first ? std::min(deadline, first_request_deadline_) : deadline);
    RequestParser parser(opts.header_limit);
    parser.header_limit(static_cast<std::uint32_t>(
        std::min<std::size_t>(opts.header_limit, std::numeric_limits<std::uint32_t>::max())));
    parser.body_limit(static_cast<std::uint64_t>(opts.body_limit));
    std::tie(ec, std::ignore) = co_await http::async_read_header(stream_, buffer, parser, kTuple);
    if (!ec && first) lowest.expires_at(deadline);

    if (!ec) {
      if (const auto problem = framing_problem(parser.get()); !problem.empty()) {
        log().debug("{} listener: request from {} refused: {}", opts.name, remote_, problem);
        if (!closing_) co_await reply_error(400, started);
        co_return;
      }
    }

    // WebSocket upgrade: the connection leaves the HTTP loop for good.
    if (!ec && listener_->websocket && detail::is_websocket_upgrade(parser.get())) {
      const bool clean = parser.is_done() && buffer.size() == 0;  // no body, nothing after it
      upgrade_.emplace(PendingUpgrade{parser.release(), clean, started});
      co_return;
    }

    // Over the cap (accepted in the over-limit band) and not an upgrade: 503, then close.
    if (!ec && admission_ == Admission::over_limit) {
      std::vector<std::pair<std::string, std::string>> headers;
      headers.emplace_back("Retry-After", std::to_string(kOverLimitRetryAfterSeconds));
      if (!closing_) co_await reply_error(503, started, std::move(headers));
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
  detail::WsOpenFn on_open = handler.on_open;
  if (admission_ == Admission::over_limit) {
    on_open = [inner = handler.on_open](std::shared_ptr<WebSocketPeer> peer) {
      return inner(std::make_shared<OverLimitPeer>(std::move(peer)));
    };
  }
  websocket_ = detail::accept_websocket(std::move(stream_), std::move(request), std::move(settings), std::move(on_open),
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

asio::awaitable<void> Connection::reply_error(int status, Clock::time_point started,
                                              std::vector<std::pair<std::string, std::string>> headers) {
  HttpResponse r;
  r.status = status;
  r.body = std::to_string(status) + " " + reason_phrase(status) + "\n";
  r.headers = std::move(headers);
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
  const std::string& name = l->options.name;
  asio::steady_timer backoff(l->strand);
  auto pause = kAcceptBackoff;
  LogThrottle accept_log, refusal_log;
  std::uint64_t skipped = 0;
  for (;;) {
    tcp::socket socket(asio::make_strand(l->ioc));
    auto [ec] = co_await l->acceptor.async_accept(socket, kTuple);
    if (!l->acceptor.is_open() || state.stopping() || ec == asio::error::operation_aborted) co_return;
    if (ec) {
      // Out of file descriptors and the like: pause instead of spinning (the pending connection
      // stays in the backlog), and log once per period, not once per attempt.
      const bool descriptors =
          ec == asio::error::no_descriptors || ec == error_code(ENFILE, boost::system::system_category());
      if (state.metrics != nullptr)
        state.metrics->add("broker_accept_failures_total",
                           {{"listener", name}, {"reason", descriptors ? "descriptors" : "other"}});
      if (accept_log.ready(Clock::now(), skipped)) {
        state.logger->warn(
            "{} listener: accept failed: {}; pausing accepts{}", name, ec.message(),
            skipped == 0 ? std::string() : " (" + std::to_string(skipped) + " more failures not logged)");
      }
      backoff.expires_after(pause);
      pause = std::min(pause * 2, kMaxAcceptBackoff);
      co_await backoff.async_wait(kTuple);
      continue;
    }
    pause = kAcceptBackoff;
    error_code peer_ec;
    const auto peer = socket.remote_endpoint(peer_ec);
    if (peer_ec) continue;  // already gone
    std::string remote = address_text(peer.address());
    const char* why = "";
    const Admission admission = l->admit(remote, why);
    if (admission != Admission::normal && state.metrics != nullptr) {
      if (admission == Admission::refused)
        state.metrics->add("broker_connections_refused_total", {{"listener", name}, {"reason", why}});
      else
        state.metrics->add("broker_connections_over_limit_total", {{"listener", name}});
    }
    if (admission != Admission::normal && refusal_log.ready(Clock::now(), skipped)) {
      state.logger->warn(
          "{} listener: {} from {}: {} reached{}", name,
          admission == Admission::refused ? "closed a new connection"
                                          : "accepted a connection over the limit, to be refused",
          remote, why,
          skipped == 0 ? std::string() : " (and " + std::to_string(skipped) + " more since the last report)");
    }
    if (admission == Admission::refused) {
      socket.close(peer_ec);  // at once, without a reply; established connections go on
      continue;
    }
    auto conn = std::make_shared<Connection>(l, std::move(socket), std::move(remote), admission);
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
  // An idle connection (thousands of agents between heartbeats) gives OpenSSL's read and write
  // buffers back instead of keeping about 34 KiB each.
  SSL_CTX_set_mode(ctx->native_handle(), SSL_MODE_RELEASE_BUFFERS);
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

// common::Scheduler on the io_context: one steady_timer per pending callback.
class AsioScheduler final : public common::Scheduler {
 public:
  explicit AsioScheduler(asio::io_context& io) : io_(io) {}
  std::uint64_t after(std::chrono::milliseconds delay, std::function<void()> fn) override {
    std::lock_guard lock(mutex_);
    if (stopped_) return 0;
    const auto id = ++next_id_;
    auto timer = std::make_shared<asio::steady_timer>(io_, delay);
    pending_.emplace(id, timer);
    timer->async_wait([this, id, timer, fn = std::move(fn)](const boost::system::error_code& ec) {
      {
        std::lock_guard inner(mutex_);
        if (pending_.erase(id) == 0) return;  // cancelled
      }
      if (ec) return;
      try {
        fn();
      } catch (...) {
      }
    });
    return id;
  }
  bool cancel(std::uint64_t id) override {
    std::lock_guard lock(mutex_);
    auto it = pending_.find(id);
    if (it == pending_.end()) return false;
    it->second->cancel();
    pending_.erase(it);
    return true;
  }
  void stop() {
    std::lock_guard lock(mutex_);
    stopped_ = true;
    for (auto& [id, timer] : pending_) timer->cancel();
    pending_.clear();
  }

 private:
  asio::io_context& io_;
  std::mutex mutex_;
  std::map<std::uint64_t, std::shared_ptr<asio::steady_timer>> pending_;  // guarded by mutex_
  std::uint64_t next_id_ = 0;                                              // guarded by mutex_
  bool stopped_ = false;                                                   // guarded by mutex_
};

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
      metrics->describe("broker_connections_refused_total", common::Metrics::Type::counter,
                        "Connections closed at accept, by listener and the cap that refused them "
                        "(max_connections, max_connections_per_address, shared_limit).");
      metrics->describe("broker_connections_over_limit_total", common::Metrics::Type::counter,
                        "Connections accepted over the cap to be refused by their protocol (agent listener).");
      metrics->describe("broker_accept_failures_total", common::Metrics::Type::counter,
                        "Failed accepts, by listener and reason (descriptors: out of file descriptors).");
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
  AsioScheduler scheduler{ioc};
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
  scheduler.stop();
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
void Server::set_shared_connection_limit(std::size_t limit) { impl_->state->set_shared_limit(limit); }
std::uint16_t Server::port(const std::string& listener_name) const { return impl_->port(listener_name); }
void Server::start() { impl_->start(); }
common::Scheduler& Server::scheduler() { return impl_->scheduler; }
void Server::stop(std::chrono::milliseconds deadline) { impl_->stop(deadline); }
void Server::wait_for_signal() { impl_->wait_for_signal(); }
bool Server::running() const { return impl_->running(); }

}  // namespace net
