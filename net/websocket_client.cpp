// net/websocket_client.cpp: WebSocketClientPool (see websocket_client.hpp).
//
// One io_context run by N threads; every connection on its own strand, so thousands of them
// share the threads (nothing blocks a thread per connection). This file does the URL, the name
// resolution, the TLS contexts (one per distinct ClientTls, shared), the bookkeeping for stop() and the
// timers; the connections themselves are detail::connect_websocket() in
// websocket_connection.cpp (TCP connect, TLS and WebSocket handshakes, then the same
// peer/session code as the server side).
#include "net/websocket_client.hpp"

#include "common/log.hpp"
#include "common/version.hpp"
#include "net/detail/websocket_connection.hpp"

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <spdlog/logger.h>

#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <vector>

namespace net {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;
using boost::system::error_code;

constexpr std::size_t kSendQueueBytes = 8 << 20;
// A connection without any data from the server for half of this is pinged; without an answer
// by the end of it, it is dropped (a dead broker is noticed).
constexpr std::chrono::milliseconds kKeepAlive{60000};
// stop(): how long the close handshakes may take before the connections are cut, and how long
// to wait for them to unwind after that.
constexpr auto kStopGrace = std::chrono::seconds(5);
constexpr auto kForceGrace = std::chrono::seconds(5);
constexpr std::string_view kStopReason = "client shutting down";

struct WsUrl {
  bool tls = false;
  std::string host;  // without brackets
  std::uint16_t port = 0;
  std::string host_header;  // host[:port] as written
  std::string target;       // path and query, "/" at least
};

// ws://host[:port][/path][?query] or wss://...; IPv6 hosts in brackets. Empty: invalid.
std::optional<WsUrl> parse_url(std::string_view url) {
  WsUrl out;
  if (url.starts_with("ws://")) {
    url.remove_prefix(5);
  } else if (url.starts_with("wss://")) {
    url.remove_prefix(6);
    out.tls = true;
  } else {
    return std::nullopt;
  }
  const auto end = url.find_first_of("/?#");
  const std::string_view authority = url.substr(0, end);
  std::string_view rest = end == std::string_view::npos ? std::string_view() : url.substr(end);
  rest = rest.substr(0, rest.find('#'));
  out.target = rest.empty() || rest.front() != '/' ? "/" + std::string(rest) : std::string(rest);
  out.host_header = std::string(authority);
  std::string_view port_text;
  if (authority.starts_with("[")) {
    const auto close = authority.find(']');
    if (close == std::string_view::npos) return std::nullopt;
    out.host = std::string(authority.substr(1, close - 1));
    const auto after = authority.substr(close + 1);
    if (!after.empty() && !after.starts_with(":")) return std::nullopt;
    if (!after.empty()) port_text = after.substr(1);
  } else {
    const auto colon = authority.rfind(':');
    out.host = std::string(authority.substr(0, colon));
    if (colon != std::string_view::npos) port_text = authority.substr(colon + 1);
  }
  if (out.host.empty() || out.host.find_first_of(" \t\r\n@") != std::string::npos) return std::nullopt;
  if (port_text.empty()) {
    out.port = out.tls ? 443 : 80;
  } else {
    const auto [ptr, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), out.port);
    if (ec != std::errc() || ptr != port_text.data() + port_text.size() || out.port == 0) return std::nullopt;
  }
  return out;
}

// Empty when `path` can be opened for reading, else why not.
std::string unreadable(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return std::strerror(errno);
  std::fclose(f);
  return {};
}

// A TLS 1.2+ client context for `tls`; null with `error` set when a file cannot be used.
std::shared_ptr<ssl::context> make_tls_context(const ClientTls& tls, std::string& error) {
  auto ctx = std::make_shared<ssl::context>(ssl::context::tls_client);
  SSL_CTX_set_min_proto_version(ctx->native_handle(), TLS1_2_VERSION);
  auto fail = [&](std::string why) {
    ERR_clear_error();
    error = std::move(why);
    return nullptr;
  };
  error_code ec;
  if (tls.ca_file.empty()) {
    ctx->set_verify_mode(ssl::verify_none);
  } else {
    ctx->load_verify_file(tls.ca_file, ec);
    if (ec) return fail("cannot load CA file " + tls.ca_file + ": " + ec.message());
    ctx->set_verify_mode(ssl::verify_peer);  // AnyStream checks the host name too
  }
  if (tls.cert_file.empty() != tls.key_file.empty()) {
    return fail(tls.cert_file.empty() ? "a client key needs its certificate" : "a client certificate needs its key");
  }
  if (tls.cert_file.empty()) return ctx;
  if (auto why = unreadable(tls.cert_file); !why.empty()) {
    return fail("cannot read client certificate " + tls.cert_file + ": " + why);
  }
  if (auto why = unreadable(tls.key_file); !why.empty()) {
    return fail("cannot read client key " + tls.key_file + ": " + why);
  }
  ctx->use_certificate_chain_file(tls.cert_file, ec);
  if (ec) return fail("cannot load client certificate " + tls.cert_file + ": " + ec.message());
  ctx->use_private_key_file(tls.key_file, ssl::context::pem, ec);
  const auto code = static_cast<unsigned long>(ec.value());
  const bool mismatch = ec && ec.category() == asio::error::get_ssl_category() && ERR_GET_LIB(code) == ERR_LIB_X509 &&
                        ERR_GET_REASON(code) == X509_R_KEY_VALUES_MISMATCH;
  if (mismatch || (!ec && SSL_CTX_check_private_key(ctx->native_handle()) != 1)) {
    return fail("client key " + tls.key_file + " does not match certificate " + tls.cert_file);
  }
  if (ec) return fail("cannot load client key " + tls.key_file + ": " + ec.message());
  return ctx;
}

}  // namespace

struct WebSocketClientPool::Impl {
  explicit Impl(int thread_count) : ioc(thread_count), work(ioc.get_executor()) {
    for (int i = 0; i < thread_count; ++i) threads.emplace_back([this] { run_thread(); });
  }

  void run_thread() {
    for (;;) {
      try {
        ioc.run();
        return;
      } catch (const std::exception& e) {
        logger->error("WebSocket client thread: unhandled exception: {}", e.what());
      }
    }
  }

  void connect(const std::string& url, OpenFn on_open, FailFn on_failure, std::chrono::milliseconds timeout,
               const ClientTls& tls, std::size_t max_message_bytes);
  void resolved(std::uint64_t id, const WsUrl& url, std::shared_ptr<ssl::context> tls, detail::WsSettings settings,
                OpenFn on_open, FailFn on_failure, std::vector<tcp::endpoint> endpoints);
  void finished(std::uint64_t id);
  // The TLS client context for `tls`, made on first use and shared by the connections. Null with
  // `error` set when a file cannot be loaded (tried again on the next call).
  std::shared_ptr<ssl::context> tls_context(const ClientTls& tls, std::string& error);

  std::uint64_t after(std::chrono::milliseconds delay, std::function<void()> fn);
  void cancel(std::uint64_t id);
  void stop();

  const std::shared_ptr<spdlog::logger> logger = common::null_logger();
  // Declared before the io_context: the connections (destroyed with it at the latest) refer to
  // them.
  using TlsKey = std::tuple<std::string, std::string, std::string>;  // CA, certificate, key file
  std::map<TlsKey, std::shared_ptr<ssl::context>> tls_contexts;      // guarded by mutex

  asio::io_context ioc;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;  // reset by stop()
  std::vector<std::thread> threads;

  std::mutex stop_mutex;  // serializes stop() callers that join
  bool joined = false;    // guarded by stop_mutex

  std::mutex mutex;
  std::condition_variable idle_cv;
  bool stopping = false;  // guarded by mutex
  // Connections from connect() until they have ended (resolving, connecting or open); the link
  // is empty until the connection has started.
  std::map<std::uint64_t, std::weak_ptr<detail::WsLink>> links;         // guarded by mutex
  std::uint64_t next_id = 0;                                            // guarded by mutex
  std::map<std::uint64_t, std::shared_ptr<asio::steady_timer>> timers;  // guarded by mutex
};

std::shared_ptr<ssl::context> WebSocketClientPool::Impl::tls_context(const ClientTls& tls, std::string& error) {
  const TlsKey key{tls.ca_file, tls.cert_file, tls.key_file};
  std::lock_guard lock(mutex);
  if (auto it = tls_contexts.find(key); it != tls_contexts.end()) return it->second;
  auto ctx = make_tls_context(tls, error);
  if (ctx) tls_contexts.emplace(key, ctx);
  return ctx;
}

void WebSocketClientPool::Impl::connect(const std::string& url, OpenFn on_open, FailFn on_failure,
                                        std::chrono::milliseconds timeout, const ClientTls& tls_files,
                                        std::size_t max_message_bytes) {
  // Failures before anything started are reported on a pool thread, like the later ones (once
  // the pool is stopped: right here).
  auto fail = [&](const std::string& why) {
    std::unique_lock lock(mutex);
    if (stopping) {
      lock.unlock();
      if (on_failure) on_failure(why);
      return;
    }
    asio::post(ioc, [f = std::move(on_failure), why] {
      if (f) f(why);
    });
  };
  if (!on_open) {
    fail("no on_open handler");
    return;
  }
  const auto parsed = parse_url(url);
  if (!parsed) {
    fail("invalid WebSocket URL " + url + ": expected ws://host[:port]/path or wss://...");
    return;
  }
  std::shared_ptr<ssl::context> tls;
  if (parsed->tls) {
    std::string error;
    tls = tls_context(tls_files, error);
    if (!tls) {
      fail(error);
      return;
    }
  }
  detail::WsSettings settings;
  settings.max_message_bytes = max_message_bytes;
  settings.max_send_queue_bytes = kSendQueueBytes;
  settings.keep_alive = kKeepAlive;
  settings.handshake_timeout = timeout;
  settings.user_agent = std::string("openbroker/") + common::kVersion;
  settings.logger = logger;

  std::uint64_t id = 0;
  {
    std::lock_guard lock(mutex);
    if (stopping) {
      id = 0;
    } else {
      id = ++next_id;
      links.emplace(id, std::weak_ptr<detail::WsLink>());
    }
  }
  if (id == 0) {
    fail("the WebSocket client pool is stopped");
    return;
  }

  error_code ec;
  const auto address = asio::ip::make_address(parsed->host, ec);
  if (!ec) {
    resolved(id, *parsed, std::move(tls), std::move(settings), std::move(on_open), std::move(on_failure),
             {tcp::endpoint(address, parsed->port)});
    return;
  }
  // A name: resolved in the background (Asio runs getaddrinfo on a thread of its own).
  auto resolver = std::make_shared<tcp::resolver>(asio::make_strand(ioc));
  resolver->async_resolve(
      parsed->host, std::to_string(parsed->port),
      [this, id, resolver, url = *parsed, tls = std::move(tls), settings = std::move(settings),
       on_open = std::move(on_open), on_failure = std::move(on_failure)](
          const error_code& error, const tcp::resolver::results_type& results) mutable {
        std::vector<tcp::endpoint> endpoints;
        for (const auto& entry : results) endpoints.push_back(entry.endpoint());
        if (error || endpoints.empty()) {
          finished(id);
          if (on_failure) on_failure("cannot resolve " + url.host + ": " + (error ? error.message() : "no address"));
          return;
        }
        resolved(id, url, std::move(tls), std::move(settings), std::move(on_open), std::move(on_failure),
                 std::move(endpoints));
      });
}

void WebSocketClientPool::Impl::resolved(std::uint64_t id, const WsUrl& url, std::shared_ptr<ssl::context> tls,
                                         detail::WsSettings settings, OpenFn on_open, FailFn on_failure,
                                         std::vector<tcp::endpoint> endpoints) {
  beast::tcp_stream tcp(asio::make_strand(ioc));
  auto stream = tls ? detail::AnyStream(std::move(tcp), *tls, detail::AnyStream::Role::client, url.host)
                    : detail::AnyStream(std::move(tcp));
  auto failure = [on_failure = std::move(on_failure)](const std::string& why) {
    if (on_failure) on_failure(why);
  };
  auto link = detail::connect_websocket(std::move(stream), std::move(endpoints), url.host_header, url.target,
                                        std::move(settings), std::move(on_open), std::move(failure),
                                        [this, id] { finished(id); });
  bool stop_now = false;
  {
    std::lock_guard lock(mutex);
    if (auto it = links.find(id); it != links.end()) it->second = link;  // else: already over
    stop_now = stopping;
  }
  if (stop_now) link->abort();  // stop() began meanwhile and did not see this link
}

void WebSocketClientPool::Impl::finished(std::uint64_t id) {
  std::lock_guard lock(mutex);
  links.erase(id);
  if (links.empty()) idle_cv.notify_all();
}

std::uint64_t WebSocketClientPool::Impl::after(std::chrono::milliseconds delay, std::function<void()> fn) {
  auto timer = std::make_shared<asio::steady_timer>(asio::make_strand(ioc));
  std::uint64_t id = 0;
  {
    std::lock_guard lock(mutex);
    if (stopping) return 0;  // never runs
    id = ++next_id;
    timers.emplace(id, timer);
  }
  // Started on the timer's strand, where cancel() and stop() cancel it too.
  asio::post(timer->get_executor(), [this, id, timer, delay, fn = std::move(fn)]() mutable {
    {
      std::lock_guard lock(mutex);
      if (!timers.contains(id)) return;  // cancelled already
    }
    timer->expires_after(delay);
    timer->async_wait([this, id, timer, fn = std::move(fn)](const error_code& ec) {
      {
        std::lock_guard lock(mutex);
        // Not in the map: cancelled (also when the wait had completed just before).
        if (timers.erase(id) == 0) return;
      }
      if (ec) return;
      try {
        fn();
      } catch (const std::exception& e) {
        logger->error("WebSocket client timer: {}", e.what());
      }
    });
  });
  return id;
}

void WebSocketClientPool::Impl::cancel(std::uint64_t id) {
  std::shared_ptr<asio::steady_timer> timer;
  {
    std::lock_guard lock(mutex);
    const auto it = timers.find(id);
    if (it == timers.end()) return;
    timer = std::move(it->second);
    timers.erase(it);
  }
  asio::post(timer->get_executor(), [timer] { timer->cancel(); });
}

void WebSocketClientPool::Impl::stop() {
  std::vector<std::shared_ptr<detail::WsLink>> open;
  std::vector<std::shared_ptr<asio::steady_timer>> pending_timers;
  auto begin = [&] {
    std::lock_guard lock(mutex);
    stopping = true;
    for (auto& [id, weak] : links) {
      if (auto link = weak.lock()) open.push_back(std::move(link));
    }
    for (auto& [id, timer] : timers) pending_timers.push_back(std::move(timer));
    timers.clear();
  };
  if (ioc.get_executor().running_in_this_thread()) {
    // A pool thread cannot join the pool: close everything, the destructor joins.
    begin();
    for (const auto& link : open) link->shutdown(std::string(kStopReason));
    for (const auto& t : pending_timers) asio::post(t->get_executor(), [t] { t->cancel(); });
    return;
  }
  std::lock_guard stop_lock(stop_mutex);
  if (joined) return;
  begin();
  for (const auto& link : open) link->shutdown(std::string(kStopReason));
  for (const auto& t : pending_timers) asio::post(t->get_executor(), [t] { t->cancel(); });
  open.clear();
  pending_timers.clear();
  {
    std::unique_lock lock(mutex);
    if (!idle_cv.wait_for(lock, kStopGrace, [this] { return links.empty(); })) {
      for (auto& [id, weak] : links) {
        if (auto link = weak.lock()) open.push_back(std::move(link));
      }
    }
  }
  for (const auto& link : open) link->abort();
  open.clear();
  {
    std::unique_lock lock(mutex);
    idle_cv.wait_for(lock, kForceGrace, [this] { return links.empty(); });
  }
  work.reset();
  ioc.stop();
  for (auto& t : threads) t.join();
  threads.clear();
  joined = true;
}

WebSocketClientPool::WebSocketClientPool(int threads) : impl_(std::make_unique<Impl>(threads < 1 ? 1 : threads)) {}

WebSocketClientPool::~WebSocketClientPool() { impl_->stop(); }

void WebSocketClientPool::connect(const std::string& url, OpenFn on_open, FailFn on_failure,
                                  std::chrono::milliseconds timeout, const ClientTls& tls,
                                  std::size_t max_message_bytes) {
  impl_->connect(url, std::move(on_open), std::move(on_failure), timeout, tls, max_message_bytes);
}

std::string WebSocketClientPool::check_tls(const ClientTls& tls) {
  std::string error;
  impl_->tls_context(tls, error);
  return error;
}

std::uint64_t WebSocketClientPool::after(std::chrono::milliseconds delay, std::function<void()> fn) {
  return impl_->after(delay, std::move(fn));
}

void WebSocketClientPool::cancel(std::uint64_t timer_id) { impl_->cancel(timer_id); }

void WebSocketClientPool::stop() { impl_->stop(); }

}  // namespace net
