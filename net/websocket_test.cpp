// Integration tests of the WebSocket side of net::Server and of net::WebSocketClientPool, on
// real loopback ports. Waits are bounded by generous safety limits; the assertions are about
// behaviour (what arrived, in which order, which callbacks ran), never about timings.
#include "net/websocket.hpp"

#include "common/log.hpp"
#include "common/metrics.hpp"
#include "net/http_client.hpp"
#include "net/server.hpp"
#include "net/test_support.hpp"
#include "net/websocket_client.hpp"

#include <doctest/doctest.h>
#include <spdlog/logger.h>
#include <spdlog/sinks/ostream_sink.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using net::test::RawSocket;
using net::test::TempTlsFiles;
using net::test::TestPki;

namespace {

constexpr auto kPatience = 20s;  // safety net against hangs, not an assertion

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// Polls `condition` (for state that settles a moment after what the test can wait for).
template <class Condition>
bool eventually(Condition condition) {
  const auto until = std::chrono::steady_clock::now() + kPatience;
  while (!condition()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// A session that records what it sees (and optionally echoes every message back).
class Probe : public net::WebSocketSession {
 public:
  Probe(std::shared_ptr<net::WebSocketPeer> p, bool echo) : peer(std::move(p)), echo_(echo) {}

  void on_message(std::string message) override {
    if (echo_) peer->send(message);
    std::lock_guard lock(mutex_);
    if (closes_ != 0) after_close_ = true;
    messages_.push_back(std::move(message));
    cv_.notify_all();
  }
  void on_close(const std::string& reason) override {
    std::lock_guard lock(mutex_);
    ++closes_;
    reason_ = reason;
    cv_.notify_all();
  }

  bool wait_messages(std::size_t n) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, kPatience, [&] { return messages_.size() >= n; });
  }
  bool wait_closed() {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, kPatience, [&] { return closes_ != 0; });
  }
  // Waits briefly (a poll step for loops that must keep working meanwhile).
  bool closed_within(std::chrono::milliseconds d) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, d, [&] { return closes_ != 0; });
  }
  std::vector<std::string> messages() {
    std::lock_guard lock(mutex_);
    return messages_;
  }
  std::string reason() {
    std::lock_guard lock(mutex_);
    return reason_;
  }
  int closes() {
    std::lock_guard lock(mutex_);
    return closes_;
  }
  bool message_after_close() {
    std::lock_guard lock(mutex_);
    return after_close_;
  }

  const std::shared_ptr<net::WebSocketPeer> peer;

 private:
  const bool echo_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::string> messages_;
  int closes_ = 0;
  bool after_close_ = false;
  std::string reason_;
};

// A server with one listener "agent" whose WebSocket sessions are echoing Probes.
class EchoServer {
 public:
  explicit EchoServer(net::WebSocketHandler handler = {}, net::ListenerOptions options = {.name = "agent"},
                      bool echo = true, std::shared_ptr<spdlog::logger> logger = common::null_logger())
      : server_(2, std::move(logger), &metrics) {
    if (!handler.on_open) {
      handler.on_open = [this, echo](std::shared_ptr<net::WebSocketPeer> peer) {
        auto probe = std::make_shared<Probe>(std::move(peer), echo);
        std::lock_guard lock(mutex_);
        sessions_.push_back(probe);
        cv_.notify_all();
        return probe;
      };
    }
    server_.add_listener(
        options,
        [](net::HttpRequest&& r, net::Responder respond) {
          net::HttpResponse res;
          res.body = "http " + r.path;
          respond(std::move(res));
        },
        std::move(handler));
    server_.start();
  }
  ~EchoServer() { server_.stop(5s); }

  std::string url(const std::string& path = "/cbp", const char* scheme = "ws") const {
    return std::string(scheme) + "://127.0.0.1:" + std::to_string(port()) + path;
  }
  std::uint16_t port() const { return server_.port("agent"); }
  net::Server& server() { return server_; }

  // The n-th server-side session (0-based), once it exists.
  std::shared_ptr<Probe> session(std::size_t n) {
    std::unique_lock lock(mutex_);
    if (!cv_.wait_for(lock, kPatience, [&] { return sessions_.size() > n; })) return nullptr;
    return sessions_[n];
  }

  common::Metrics metrics;

 private:
  net::Server server_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::shared_ptr<Probe>> sessions_;
};

struct Outcome {
  std::shared_ptr<Probe> probe;  // null: failed
  std::string error;
};

// Connects through `pool` and waits for on_open or on_failure.
Outcome connect(net::WebSocketClientPool& pool, const std::string& url, const net::ClientTls& tls = {},
                std::size_t max_message_bytes = 1 << 20, std::chrono::milliseconds timeout = 10s) {
  auto promise = std::make_shared<std::promise<Outcome>>();
  pool.connect(
      url,
      [promise](std::shared_ptr<net::WebSocketPeer> peer) {
        auto probe = std::make_shared<Probe>(std::move(peer), false);
        promise->set_value({probe, {}});
        return probe;
      },
      [promise](const std::string& error) {
        promise->set_value({nullptr, error});
      },
      timeout, tls, max_message_bytes);
  auto future = promise->get_future();
  REQUIRE(future.wait_for(kPatience) == std::future_status::ready);
  return future.get();
}

// A WebSocket client frame (masked, as clients must send them), payload < 126 bytes.
std::string client_frame(unsigned char opcode, const std::string& payload) {
  REQUIRE(payload.size() < 126);
  const unsigned char mask[4] = {0x12, 0x34, 0x56, 0x78};
  std::string f;
  f.push_back(static_cast<char>(0x80 | opcode));
  f.push_back(static_cast<char>(0x80 | payload.size()));
  for (unsigned char m : mask) f.push_back(static_cast<char>(m));
  for (std::size_t i = 0; i < payload.size(); ++i) f.push_back(static_cast<char>(payload[i] ^ mask[i % 4]));
  return f;
}

// A listening socket that never accepts: connections complete in the kernel, then nothing.
class BlackHole {
 public:
  BlackHole() {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd_ >= 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(fd_, 16) == 0);
    socklen_t len = sizeof addr;
    REQUIRE(::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
    port = ntohs(addr.sin_port);
  }
  ~BlackHole() { ::close(fd_); }
  BlackHole(const BlackHole&) = delete;
  BlackHole& operator=(const BlackHole&) = delete;
  std::uint16_t port = 0;

 private:
  int fd_ = -1;
};

std::string upgrade_request(const std::string& path) {
  return "GET " + path +
         " HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
}

}  // namespace

TEST_CASE("websocket: echo round trip, plain HTTP on the same listener, metrics") {
  EchoServer server;
  net::WebSocketClientPool pool(2);
  auto client = connect(pool, server.url());
  REQUIRE(client.probe);
  CHECK(client.probe->peer->remote_address() == "127.0.0.1");
  CHECK_FALSE(client.probe->peer->tls());

  client.probe->peer->send("hello");
  REQUIRE(client.probe->wait_messages(1));
  CHECK(client.probe->messages() == std::vector<std::string>{"hello"});
  auto session = server.session(0);
  REQUIRE(session);
  CHECK(session->peer->remote_address() == "127.0.0.1");
  CHECK_FALSE(session->peer->tls());
  CHECK(session->messages() == std::vector<std::string>{"hello"});

  // Requests without an upgrade still reach the HttpHandler, also on the WebSocket path.
  net::HttpClient http("http://127.0.0.1:" + std::to_string(server.port()), 10s);
  auto r = http.request("GET", "/cbp");
  REQUIRE(r.has_value());
  CHECK(r->status == 200);
  CHECK(r->body == "http /cbp");

  const auto open_metrics = server.metrics.render();
  CHECK(contains(open_metrics, "broker_websocket_connections{listener=\"agent\"} 1\n"));
  CHECK(contains(open_metrics, "broker_websocket_messages_total{listener=\"agent\",direction=\"received\"} 1\n"));
  // The echo's write completes on the server a moment after the client may have read it.
  CHECK(eventually([&] {
    return contains(server.metrics.render(),
                    "broker_websocket_messages_total{listener=\"agent\",direction=\"sent\"} 1\n");
  }));

  client.probe->peer->close("done");
  REQUIRE(session->wait_closed());
  REQUIRE(client.probe->wait_closed());
  pool.stop();
  server.server().stop(5s);
  CHECK(contains(server.metrics.render(), "broker_websocket_connections{listener=\"agent\"} 0\n"));
}

TEST_CASE("websocket: 1000 messages arrive in order, both ways") {
  EchoServer server;
  net::WebSocketClientPool pool(2);
  auto client = connect(pool, server.url());
  REQUIRE(client.probe);
  std::vector<std::string> sent;
  for (int i = 0; i < 1000; ++i) {
    sent.push_back("message " + std::to_string(i));
    client.probe->peer->send(sent.back());
  }
  REQUIRE(client.probe->wait_messages(sent.size()));
  CHECK(client.probe->messages() == sent);
  auto session = server.session(0);
  REQUIRE(session);
  CHECK(session->messages() == sent);
}

TEST_CASE("websocket: 200 connections from one pool with 2 threads, each echoing") {
  EchoServer server;
  net::WebSocketClientPool pool(2);
  constexpr int kClients = 200;
  constexpr int kMessages = 5;

  std::mutex mutex;
  std::condition_variable cv;
  std::vector<std::shared_ptr<Probe>> probes;
  int failures = 0;
  for (int i = 0; i < kClients; ++i) {
    pool.connect(
        server.url(),
        [&](std::shared_ptr<net::WebSocketPeer> peer) {
          auto probe = std::make_shared<Probe>(std::move(peer), false);
          std::lock_guard lock(mutex);
          probes.push_back(probe);
          cv.notify_all();
          return probe;
        },
        [&](const std::string&) {
          std::lock_guard lock(mutex);
          ++failures;
          cv.notify_all();
        });
  }
  {
    std::unique_lock lock(mutex);
    REQUIRE(cv.wait_for(lock, kPatience, [&] { return probes.size() + failures == kClients; }));
  }
  REQUIRE(failures == 0);
  for (std::size_t i = 0; i < probes.size(); ++i) {
    for (int m = 0; m < kMessages; ++m) probes[i]->peer->send(std::to_string(i) + ":" + std::to_string(m));
  }
  for (std::size_t i = 0; i < probes.size(); ++i) {
    REQUIRE(probes[i]->wait_messages(kMessages));
    std::vector<std::string> expected;
    for (int m = 0; m < kMessages; ++m) expected.push_back(std::to_string(i) + ":" + std::to_string(m));
    CHECK(probes[i]->messages() == expected);
  }
  CHECK(contains(server.metrics.render(),
                 "broker_websocket_connections{listener=\"agent\"} " + std::to_string(kClients) + "\n"));
  pool.stop();
  for (const auto& p : probes) CHECK(p->closes() == 1);
}

TEST_CASE("websocket: a message over the limit closes the connection (1009)") {
  net::WebSocketHandler handler;
  handler.max_message_bytes = 1024;
  EchoServer server(handler);
  net::WebSocketClientPool pool(2);
  auto client = connect(pool, server.url());
  REQUIRE(client.probe);
  client.probe->peer->send(std::string(1000, 'a'));  // within the limit: echoed
  REQUIRE(client.probe->wait_messages(1));
  client.probe->peer->send(std::string(4096, 'b'));
  REQUIRE(client.probe->wait_closed());
  CHECK_MESSAGE(contains(client.probe->reason(), "1009"), client.probe->reason());
  auto session = server.session(0);
  REQUIRE(session);
  REQUIRE(session->wait_closed());
  CHECK(session->reason() == "message too big");
  CHECK(session->messages().size() == 1);
  CHECK(session->closes() == 1);
}

TEST_CASE("websocket: the client's own limit applies to what it receives") {
  EchoServer server;
  net::WebSocketClientPool pool(2);
  auto client = connect(pool, server.url(), {}, 100);
  REQUIRE(client.probe);
  client.probe->peer->send(std::string(99, 'x'));
  REQUIRE(client.probe->wait_messages(1));
  client.probe->peer->send(std::string(200, 'y'));  // the echo is too big for the client
  REQUIRE(client.probe->wait_closed());
  CHECK(client.probe->reason() == "message too big");
}

TEST_CASE("websocket: an upgrade on another path gets 404") {
  EchoServer server;
  RawSocket sock(server.port());
  sock.send(upgrade_request("/other"));
  const auto head = sock.read_head();
  CHECK(head.starts_with("HTTP/1.1 404 Not Found\r\n"));

  net::WebSocketClientPool pool(2);
  auto client = connect(pool, server.url("/other"));
  CHECK_FALSE(client.probe);
  CHECK(contains(client.error, "404"));
}

TEST_CASE("websocket: a listener without a WebSocketHandler hands upgrades to the HttpHandler") {
  net::Server server(1, common::null_logger());
  server.add_listener({.name = "plain"}, [](net::HttpRequest&& r, net::Responder respond) {
    net::HttpResponse res;
    res.status = 426;
    res.body = r.header("Upgrade");
    respond(std::move(res));
  });
  server.start();
  RawSocket sock(server.port("plain"));
  sock.send(upgrade_request("/cbp"));
  CHECK(sock.read_response().starts_with("HTTP/1.1 426 "));
  server.stop(5s);
}

TEST_CASE("websocket: the server sends from another thread") {
  EchoServer server;
  net::WebSocketClientPool pool(2);
  auto client = connect(pool, server.url());
  REQUIRE(client.probe);
  auto session = server.session(0);
  REQUIRE(session);
  std::vector<std::string> pushed;
  for (int i = 0; i < 100; ++i) pushed.push_back("push " + std::to_string(i));
  std::thread pusher([&] {
    for (const auto& m : pushed) session->peer->send(m);
  });
  pusher.join();
  REQUIRE(client.probe->wait_messages(pushed.size()));
  CHECK(client.probe->messages() == pushed);
}

TEST_CASE("websocket: the server closes, the client gets on_close (queued messages first)") {
  EchoServer server;
  net::WebSocketClientPool pool(2);
  auto client = connect(pool, server.url());
  REQUIRE(client.probe);
  auto session = server.session(0);
  REQUIRE(session);
  session->peer->send("last words");
  session->peer->close("bye");
  session->peer->send("dropped after close");
  session->peer->close("second close is a no-op");
  REQUIRE(client.probe->wait_closed());
  CHECK(client.probe->messages() == std::vector<std::string>{"last words"});
  CHECK(client.probe->reason() == "closed by the peer: 1000 bye");
  REQUIRE(session->wait_closed());
  CHECK(session->reason() == "bye");
  CHECK(session->closes() == 1);
  CHECK(client.probe->closes() == 1);
  // A peer kept after the end is harmless.
  session->peer->send("nobody listens");
  session->peer->close("again");
}

TEST_CASE("websocket: the client closes, the server gets on_close") {
  EchoServer server;
  net::WebSocketClientPool pool(2);
  auto client = connect(pool, server.url());
  REQUIRE(client.probe);
  auto session = server.session(0);
  REQUIRE(session);
  client.probe->peer->close("agent done");
  REQUIRE(session->wait_closed());
  CHECK(session->reason() == "closed by the peer: 1000 agent done");
  REQUIRE(client.probe->wait_closed());
  CHECK(client.probe->reason() == "agent done");
  CHECK(session->closes() == 1);
}

TEST_CASE("websocket: on_open returning nullptr closes the connection (1008)") {
  net::WebSocketHandler handler;
  handler.on_open = [](std::shared_ptr<net::WebSocketPeer>) { return std::shared_ptr<net::WebSocketSession>(); };
  EchoServer server(handler);
  net::WebSocketClientPool pool(2);
  auto client = connect(pool, server.url());
  REQUIRE(client.probe);
  REQUIRE(client.probe->wait_closed());
  CHECK(client.probe->reason() == "closed by the peer: 1008 connection rejected");
}

TEST_CASE("websocket: an idle connection is closed") {
  net::WebSocketHandler handler;
  handler.idle_timeout = 300ms;
  EchoServer server(handler);
  net::WebSocketClientPool pool(2);
  auto client = connect(pool, server.url());
  REQUIRE(client.probe);
  auto session = server.session(0);
  REQUIRE(session);
  REQUIRE(session->wait_closed());
  CHECK(session->reason() == "idle timeout");
  REQUIRE(client.probe->wait_closed());
  CHECK(client.probe->reason() == "closed by the peer: 1001 idle timeout");
}

TEST_CASE("websocket: a binary message closes the connection (1003)") {
  EchoServer server;
  RawSocket sock(server.port());
  sock.send(upgrade_request("/cbp"));
  const auto head = sock.read_head();
  REQUIRE(head.starts_with("HTTP/1.1 101 "));
  CHECK(contains(head, "Server: openbroker/"));
  sock.send(client_frame(0x1, "text first"));
  const auto echo = sock.read_exact(2 + 10);
  CHECK(echo == std::string("\x81\x0a", 2) + "text first");
  sock.send(client_frame(0x2, "binary"));
  const auto close = sock.read_exact(4);
  REQUIRE(close.size() == 4);
  CHECK(static_cast<unsigned char>(close[0]) == 0x88);  // close frame
  CHECK(((static_cast<unsigned char>(close[2]) << 8) | static_cast<unsigned char>(close[3])) == 1003);
  sock.read_exact(static_cast<unsigned char>(close[1]) - 2u);  // the reason text
  // Complete the close handshake as a client does: close frame back, then FIN.
  sock.send(client_frame(0x8, std::string("\x03\xeb", 2)));
  sock.shutdown_send();
  CHECK(sock.read_all().empty());  // the server closes the TCP connection
  auto session = server.session(0);
  REQUIRE(session);
  REQUIRE(session->wait_closed());
  CHECK(session->reason() == "binary message");
  CHECK(session->messages() == std::vector<std::string>{"text first"});
}

TEST_CASE("websocket: a session that takes a binary message has the last word before the close (1003)") {
  // A session that answers a binary message in the protocol's own terms, then closes.
  class LastWord : public Probe {
   public:
    using Probe::Probe;
    bool on_binary_message() override {
      ++binaries;
      peer->send(R"({"type":"error","reason":"ProtocolError"})");
      peer->close("protocol error");
      return true;
    }
    std::atomic<int> binaries{0};
  };
  std::shared_ptr<LastWord> session;
  std::mutex mutex;
  net::WebSocketHandler handler;
  handler.on_open = [&](std::shared_ptr<net::WebSocketPeer> peer) {
    auto s = std::make_shared<LastWord>(std::move(peer), false);
    std::lock_guard lock(mutex);
    session = s;
    return s;
  };
  EchoServer server(handler);
  RawSocket sock(server.port());
  sock.send(upgrade_request("/cbp"));
  REQUIRE(sock.read_head().starts_with("HTTP/1.1 101 "));
  sock.send(client_frame(0x1, "before"));
  sock.send(client_frame(0x2, "binary"));
  sock.send(client_frame(0x1, "after"));  // never delivered
  const std::string last = R"({"type":"error","reason":"ProtocolError"})";
  const auto text = sock.read_exact(2 + last.size());
  CHECK(text == std::string("\x81") + static_cast<char>(last.size()) + last);
  const auto close = sock.read_exact(4);
  REQUIRE(close.size() == 4);
  CHECK(static_cast<unsigned char>(close[0]) == 0x88);
  CHECK(((static_cast<unsigned char>(close[2]) << 8) | static_cast<unsigned char>(close[3])) == 1003);
  sock.read_exact(static_cast<unsigned char>(close[1]) - 2u);
  sock.send(client_frame(0x8, std::string("\x03\xeb", 2)));
  sock.shutdown_send();
  CHECK(sock.read_all().empty());
  std::shared_ptr<LastWord> s;
  {
    std::lock_guard lock(mutex);
    s = session;
  }
  REQUIRE(s);
  REQUIRE(s->wait_closed());
  CHECK(s->reason() == "binary message");
  CHECK(s->binaries == 1);
  CHECK(s->messages() == std::vector<std::string>{"before"});
}

TEST_CASE("websocket: a session that takes a binary message but never closes is closed (1003)") {
  class Silent : public Probe {
   public:
    using Probe::Probe;
    bool on_binary_message() override { return true; }
  };
  net::WebSocketHandler handler;
  handler.on_open = [](std::shared_ptr<net::WebSocketPeer> peer) { return std::make_shared<Silent>(std::move(peer), false); };
  EchoServer server(handler);
  RawSocket sock(server.port());
  sock.send(upgrade_request("/cbp"));
  REQUIRE(sock.read_head().starts_with("HTTP/1.1 101 "));
  sock.send(client_frame(0x2, "binary"));
  const auto close = sock.read_exact(4);  // after the transport's grace (a few seconds)
  REQUIRE(close.size() == 4);
  CHECK(static_cast<unsigned char>(close[0]) == 0x88);
  CHECK(((static_cast<unsigned char>(close[2]) << 8) | static_cast<unsigned char>(close[3])) == 1003);
}

TEST_CASE("websocket: invalid UTF-8 in a text message fails the connection in the transport (1007)") {
  // RFC 6455 section 8.1: no message reaches the session; docs/cbp.md "Transport" says so.
  EchoServer server;
  RawSocket sock(server.port());
  sock.send(upgrade_request("/cbp"));
  REQUIRE(sock.read_head().starts_with("HTTP/1.1 101 "));
  sock.send(client_frame(0x1, "{\"type\":\"\xff\xfe\"}"));
  const auto close = sock.read_exact(4);
  REQUIRE(close.size() == 4);
  CHECK(static_cast<unsigned char>(close[0]) == 0x88);
  CHECK(((static_cast<unsigned char>(close[2]) << 8) | static_cast<unsigned char>(close[3])) == 1007);
  sock.read_exact(static_cast<unsigned char>(close[1]) - 2u);
  sock.shutdown_send();
  CHECK(sock.read_all().empty());
  auto session = server.session(0);
  REQUIRE(session);
  REQUIRE(session->wait_closed());
  CHECK(session->messages().empty());
}

TEST_CASE("websocket: wss on a TLS listener") {
  TempTlsFiles files;
  EchoServer server({}, {.name = "agent", .tls_cert_file = files.cert, .tls_key_file = files.key});
  net::WebSocketClientPool pool(2);

  auto client = connect(pool, server.url("/cbp", "wss"));
  REQUIRE(client.probe);
  CHECK(client.probe->peer->tls());
  client.probe->peer->send("secret");
  REQUIRE(client.probe->wait_messages(1));
  CHECK(client.probe->messages() == std::vector<std::string>{"secret"});
  auto session = server.session(0);
  REQUIRE(session);
  CHECK(session->peer->tls());

  // Verified against the certificate as CA, by host name.
  auto verified = connect(pool, "wss://localhost:" + std::to_string(server.port()) + "/cbp", {.ca_file = files.cert});
  REQUIRE(verified.probe);
  verified.probe->peer->send("verified");
  REQUIRE(verified.probe->wait_messages(1));

  // Plain ws to a TLS listener fails.
  auto plain = connect(pool, server.url("/cbp", "ws"));
  CHECK_FALSE(plain.probe);

  // A close over TLS works like one over TCP.
  client.probe->peer->close("tls bye");
  REQUIRE(session->wait_closed());
  CHECK(session->reason() == "closed by the peer: 1000 tls bye");
  REQUIRE(client.probe->wait_closed());
}

TEST_CASE("websocket: mutual TLS: only clients with a certificate from the listener's CA get in") {
  TestPki pki;
  std::ostringstream log_text;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(log_text);
  auto logger = std::make_shared<spdlog::logger>("test", sink);
  logger->set_level(spdlog::level::info);
  EchoServer server(
      {},
      {.name = "agent", .tls_cert_file = pki.server_cert, .tls_key_file = pki.server_key, .tls_client_ca_file = pki.ca},
      true, logger);
  net::WebSocketClientPool pool(2);
  const std::string url = "wss://localhost:" + std::to_string(server.port()) + "/cbp";
  const auto log_lines = [&] {
    logger->flush();
    return log_text.str();
  };

  SUBCASE("no client certificate: the handshake fails") {
    auto r = connect(pool, url, {.ca_file = pki.ca});
    CHECK_FALSE(r.probe);
    CHECK_FALSE(r.error.empty());
    // One line at the listener, with the peer and OpenSSL's reason.
    CHECK(eventually([&] { return contains(log_lines(), "client certificate rejected"); }));
    CHECK(contains(log_lines(),
                   "agent listener: TLS handshake with 127.0.0.1 failed: client certificate rejected: peer did not "
                   "return a certificate"));
  }
  SUBCASE("a certificate from another CA: the handshake fails") {
    auto r =
        connect(pool, url, {.ca_file = pki.ca, .cert_file = pki.other_client_cert, .key_file = pki.other_client_key});
    CHECK_FALSE(r.probe);
    CHECK_FALSE(r.error.empty());
    CHECK(eventually([&] { return contains(log_lines(), "client certificate rejected"); }));
    CHECK(contains(log_lines(),
                   "with 127.0.0.1 failed: client certificate rejected: unable to get local issuer "
                   "certificate"));
  }
  SUBCASE("a certificate from the listener's CA: connected, messages flow") {
    auto r = connect(pool, url, {.ca_file = pki.ca, .cert_file = pki.client_cert, .key_file = pki.client_key});
    REQUIRE_MESSAGE(r.probe, r.error);
    CHECK(r.probe->peer->tls());
    r.probe->peer->send("with a certificate");
    REQUIRE(r.probe->wait_messages(1));
    CHECK(r.probe->messages() == std::vector<std::string>{"with a certificate"});
    // Also without verifying the server: the client certificate is what counts here.
    auto unverified = connect(pool, url, {.cert_file = pki.client_cert, .key_file = pki.client_key});
    REQUIRE_MESSAGE(unverified.probe, unverified.error);
    CHECK_FALSE(contains(log_lines(), "client certificate rejected"));
  }
  CHECK(contains(log_lines(), "client certificates required"));  // in the "listening" line
}

TEST_CASE("mutual TLS: the listener's client CA file and the client's certificate files are checked") {
  TestPki pki;
  net::Server server(1, common::null_logger());
  const auto add = [&](const std::string& name, const std::string& client_ca) {
    server.add_listener({.name = name,
                         .tls_cert_file = pki.server_cert,
                         .tls_key_file = pki.server_key,
                         .tls_client_ca_file = client_ca},
                        [](net::HttpRequest&&, net::Responder respond) { respond({}); });
  };
  try {
    add("missing", "/nonexistent/ca.pem");
    FAIL("a missing client CA file must throw");
  } catch (const std::runtime_error& e) {
    CHECK(contains(e.what(), "missing listener 127.0.0.1:0: cannot read TLS client CA file /nonexistent/ca.pem: "));
  }
  try {
    add("not_pem", pki.server_key);  // a key, not a certificate
    FAIL("a client CA file without certificates must throw");
  } catch (const std::runtime_error& e) {
    CHECK(contains(e.what(), "TLS client CA file " + pki.server_key + " holds no PEM certificate"));
  }
  try {
    server.add_listener({.name = "plain", .tls_client_ca_file = pki.ca},
                        [](net::HttpRequest&&, net::Responder respond) { respond({}); });
    FAIL("a client CA file without TLS must throw");
  } catch (const std::runtime_error& e) {
    CHECK(contains(e.what(), "needs tls_cert_file"));
  }
  add("good", pki.ca);
  server.stop(1s);

  net::WebSocketClientPool pool(1);
  CHECK(pool.check_tls({}).empty());
  CHECK(pool.check_tls({.ca_file = pki.ca, .cert_file = pki.client_cert, .key_file = pki.client_key}).empty());
  CHECK(pool.check_tls({.cert_file = pki.client_cert}) == "a client certificate needs its key");
  CHECK(pool.check_tls({.key_file = pki.client_key}) == "a client key needs its certificate");
  CHECK(pool.check_tls({.cert_file = "/nonexistent/c.pem", .key_file = pki.client_key}) ==
        "cannot read client certificate /nonexistent/c.pem: No such file or directory");
  CHECK(pool.check_tls({.cert_file = pki.client_cert, .key_file = "/nonexistent/k.pem"}) ==
        "cannot read client key /nonexistent/k.pem: No such file or directory");
  CHECK(contains(pool.check_tls({.cert_file = pki.client_key, .key_file = pki.client_key}),
                 "cannot load client certificate " + pki.client_key));
  CHECK(pool.check_tls({.cert_file = pki.client_cert, .key_file = pki.other_client_key}) ==
        "client key " + pki.other_client_key + " does not match certificate " + pki.client_cert);
  // A connection with such files fails with the same reason.
  auto r = connect(pool, "wss://127.0.0.1:1/cbp", {.cert_file = pki.client_cert, .key_file = pki.other_client_key});
  CHECK_FALSE(r.probe);
  CHECK(contains(r.error, "does not match certificate"));
}

TEST_CASE("websocket: Server::stop closes the sessions with 1001 and returns") {
  EchoServer server;
  net::WebSocketClientPool pool(2);
  std::vector<std::shared_ptr<Probe>> clients;
  for (int i = 0; i < 3; ++i) {
    auto c = connect(pool, server.url());
    REQUIRE(c.probe);
    clients.push_back(c.probe);
  }
  std::vector<std::shared_ptr<Probe>> sessions;
  for (std::size_t i = 0; i < clients.size(); ++i) {
    auto s = server.session(i);
    REQUIRE(s);
    sessions.push_back(s);
  }
  server.server().stop(5s);
  CHECK_FALSE(server.server().running());
  for (const auto& s : sessions) {
    CHECK(s->closes() == 1);  // before stop() returned
    CHECK(s->reason() == "broker shutting down");
  }
  for (const auto& c : clients) {
    REQUIRE(c->wait_closed());
    CHECK(c->reason() == "closed by the peer: 1001 broker shutting down");
  }
}

TEST_CASE("websocket: Server::stop drops a peer that does not answer the close at the deadline") {
  EchoServer server;
  RawSocket mute(server.port());
  mute.send(upgrade_request("/cbp"));
  REQUIRE(mute.read_head().starts_with("HTTP/1.1 101 "));
  auto session = server.session(0);
  REQUIRE(session);
  server.server().stop(100ms);
  CHECK_FALSE(server.server().running());
  CHECK(session->closes() == 1);
  CHECK(session->reason() == "broker shutting down");
  // It got the close frame (1001) before the connection went.
  const auto frame = mute.read_exact(4);
  REQUIRE(frame.size() == 4);
  CHECK(static_cast<unsigned char>(frame[0]) == 0x88);
  CHECK(((static_cast<unsigned char>(frame[2]) << 8) | static_cast<unsigned char>(frame[3])) == 1001);
}

TEST_CASE("websocket: the pool's stop closes its connections") {
  EchoServer server;
  auto pool = std::make_unique<net::WebSocketClientPool>(2);
  auto client = connect(*pool, server.url());
  REQUIRE(client.probe);
  auto session = server.session(0);
  REQUIRE(session);
  pool->stop();
  CHECK(client.probe->closes() == 1);  // before stop() returned
  CHECK(client.probe->reason() == "client shutting down");
  REQUIRE(session->wait_closed());
  CHECK(session->reason() == "closed by the peer: 1001 client shutting down");
  pool->stop();  // idempotent

  // After stop: connect fails at once, timers never run.
  std::string error;
  pool->connect(
      server.url(), [](std::shared_ptr<net::WebSocketPeer>) { return std::shared_ptr<net::WebSocketSession>(); },
      [&error](const std::string& e) { error = e; });
  CHECK_FALSE(error.empty());
  CHECK(pool->after(1ms, [] {}) == 0);
  pool.reset();
  client.probe->peer->send("after the pool is gone: dropped");
}

TEST_CASE("websocket: a slow reader over max_send_queue_bytes is closed; others go on") {
  net::WebSocketHandler handler;
  handler.max_send_queue_bytes = 256 * 1024;
  EchoServer server(handler, {.name = "agent"}, false);
  net::WebSocketClientPool pool(2);

  // An agent that completes the handshake by hand and then never reads.
  RawSocket slow(server.port());
  slow.send(upgrade_request("/cbp"));
  REQUIRE(slow.read_head().starts_with("HTTP/1.1 101 "));
  auto slow_session = server.session(0);
  REQUIRE(slow_session);
  // And one that reads.
  auto good = connect(pool, server.url());
  REQUIRE(good.probe);
  auto good_session = server.session(1);
  REQUIRE(good_session);

  // The same stream to both, at the pace the good one reads: the slow one's messages first fill
  // the socket buffers (a few MB), then its send queue, which ends it. The good one never gets
  // near the limit, and keeps receiving while the slow one is stuck.
  const std::string chunk(64 * 1024, 'z');
  std::size_t pushed = 0;
  constexpr std::size_t kGiveUp = 1024ull * 1024 * 1024;  // the test failed long before
  while (!slow_session->closed_within(0ms) && pushed < kGiveUp) {
    slow_session->peer->send(chunk);
    good_session->peer->send(chunk);
    pushed += chunk.size();
    REQUIRE(good.probe->wait_messages(pushed / chunk.size()));
  }
  REQUIRE(slow_session->wait_closed());
  CHECK(slow_session->reason() == "send queue full");
  CHECK(pushed > handler.max_send_queue_bytes);
  slow_session->peer->send("dropped");

  good_session->peer->send("still here");
  REQUIRE(good.probe->wait_messages(pushed / chunk.size() + 1));
  CHECK(good.probe->messages().back() == "still here");
  CHECK(good.probe->closes() == 0);
  CHECK(good_session->closes() == 0);
}

TEST_CASE("websocket client: failures and timers") {
  net::WebSocketClientPool pool(2);
  SUBCASE("connection refused") {
    auto r = connect(pool, "ws://127.0.0.1:1/cbp");
    CHECK_FALSE(r.probe);
    CHECK(r.error.starts_with("cannot connect: "));
  }
  SUBCASE("no handshake within the timeout") {
    BlackHole hole;
    auto r = connect(pool, "ws://127.0.0.1:" + std::to_string(hole.port) + "/cbp", {}, 1 << 20, 200ms);
    CHECK_FALSE(r.probe);
    CHECK(contains(r.error, "timed out"));
  }
  SUBCASE("stop while connecting: on_failure, and stop returns") {
    BlackHole hole;
    std::promise<std::string> failed;
    pool.connect(
        "ws://127.0.0.1:" + std::to_string(hole.port) + "/cbp",
        [](std::shared_ptr<net::WebSocketPeer>) { return std::shared_ptr<net::WebSocketSession>(); },
        [&failed](const std::string& error) { failed.set_value(error); }, 60s);
    pool.stop();
    auto f = failed.get_future();
    REQUIRE(f.wait_for(0s) == std::future_status::ready);  // called before stop() returned
    CHECK_FALSE(f.get().empty());
  }
  SUBCASE("invalid URLs") {
    for (const char* url : {"http://127.0.0.1:80/", "ws://", "ws://host:99999/", "ws://[::1/"}) {
      auto r = connect(pool, url);
      CHECK_FALSE(r.probe);
      CHECK(r.error.starts_with("invalid WebSocket URL"));
    }
  }
  SUBCASE("unreadable CA file") {
    auto r = connect(pool, "wss://127.0.0.1:1/cbp", {.ca_file = "/nonexistent/ca.pem"});
    CHECK_FALSE(r.probe);
    CHECK(contains(r.error, "/nonexistent/ca.pem"));
  }
  SUBCASE("after and cancel") {
    std::promise<void> fired;
    std::atomic<bool> cancelled_ran{false};
    const auto doomed = pool.after(200ms, [&] { cancelled_ran = true; });
    pool.cancel(doomed);
    pool.cancel(doomed);  // twice: harmless
    pool.after(400ms, [&] { fired.set_value(); });
    REQUIRE(fired.get_future().wait_for(kPatience) == std::future_status::ready);
    CHECK_FALSE(cancelled_ran);
  }
}
