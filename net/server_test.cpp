// Integration tests of net::Server and net::HttpClient on real loopback ports.
#include "net/server.hpp"

#include "common/log.hpp"
#include "common/metrics.hpp"
#include "net/http_client.hpp"
#include "net/test_support.hpp"

#include <doctest/doctest.h>
#include <spdlog/logger.h>
#include <spdlog/sinks/ostream_sink.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

using namespace std::chrono_literals;

using net::test::RawSocket;
using net::test::TempTlsFiles;

namespace {

net::HttpResponse text(int status, std::string body) {
  net::HttpResponse r;
  r.status = status;
  r.body = std::move(body);
  return r;
}

std::string url(const net::Server& server, const std::string& listener, const char* scheme = "http") {
  return std::string(scheme) + "://127.0.0.1:" + std::to_string(server.port(listener));
}

// Threads started by handlers; joined before the test ends.
class Workers {
 public:
  ~Workers() { join(); }
  void spawn(std::function<void()> f) {
    std::lock_guard lock(mutex_);
    threads_.emplace_back(std::move(f));
  }
  void join() {
    std::vector<std::thread> threads;
    {
      std::lock_guard lock(mutex_);
      threads.swap(threads_);
    }
    for (auto& t : threads) t.join();
  }

 private:
  std::mutex mutex_;
  std::vector<std::thread> threads_;
};

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// Echoes what the handler saw, one "key=value" line each.
void echo(net::HttpRequest&& r, net::Responder respond) {
  std::string body = "method=" + r.method + "\npath=" + r.path + "\nquery=" + r.query + "\nbody=" + r.body +
                     "\nlistener=" + r.listener + "\nremote=" + r.remote_address + "\ntls=" + (r.tls ? "1" : "0") +
                     "\nx-test=" + r.header("X-Test") + "\n";
  for (const auto& [k, v] : r.query_params()) body += "param:" + k + "=" + v + "\n";
  auto res = text(200, std::move(body));
  res.headers.emplace_back("X-Extra", "yes");
  res.route = "/echo";
  respond(std::move(res));
}

}  // namespace

TEST_CASE("GET and POST round trip, metrics") {
  common::Metrics metrics;
  net::Server server(2, common::null_logger(), &metrics);
  server.add_listener({.name = "t"}, echo);
  CHECK(server.port("t") != 0);
  CHECK(server.port("nope") == 0);
  server.start();
  CHECK(server.running());

  net::HttpClient client(url(server, "t"), 10s);
  auto get = client.request("GET", "/hello?x=1", {}, {{"X-Test", "abc"}});
  REQUIRE(get.has_value());
  CHECK(get->status == 200);
  CHECK(contains(get->body, "method=GET\n"));
  CHECK(contains(get->body, "path=/hello\n"));
  CHECK(contains(get->body, "query=x=1\n"));
  CHECK(contains(get->body, "x-test=abc\n"));
  CHECK(contains(get->body, "listener=t\n"));
  CHECK(contains(get->body, "remote=127.0.0.1\n"));
  CHECK(contains(get->body, "tls=0\n"));
  CHECK(get->headers["x-extra"] == "yes");
  CHECK(get->headers["server"].starts_with("openbroker/"));
  CHECK(get->headers["content-type"] == "text/plain; charset=utf-8");
  CHECK(get->headers["content-length"] == std::to_string(get->body.size()));
  CHECK(get->headers.count("transfer-encoding") == 0);

  auto post = client.request("POST", "/submit", "payload", {{"Content-Type", "text/xml"}});
  REQUIRE(post.has_value());
  CHECK(post->status == 200);
  CHECK(contains(post->body, "method=POST\n"));
  CHECK(contains(post->body, "body=payload\n"));

  server.stop(5s);
  CHECK_FALSE(server.running());
  const auto text_metrics = metrics.render();
  CHECK(contains(text_metrics,
                 "broker_http_requests_total{listener=\"t\",route=\"/echo\",method=\"GET\",status=\"200\"} 1"));
  CHECK(contains(text_metrics,
                 "broker_http_requests_total{listener=\"t\",route=\"/echo\",method=\"POST\",status=\"200\"} 1"));
  CHECK(contains(text_metrics, "broker_http_request_duration_seconds_count{listener=\"t\",route=\"/echo\"} 2"));
  CHECK(contains(text_metrics, "broker_http_connections{listener=\"t\"} 0"));
}

TEST_CASE("keep-alive: several requests on one connection") {
  common::Metrics metrics;
  net::Server server(2, common::null_logger(), &metrics);
  server.add_listener({.name = "t"}, echo);
  server.start();

  // The client keeps its connection: while it lives, the server counts it as the one open
  // connection (a second connection would make the gauge 2 while both are open).
  {
    net::HttpClient client(url(server, "t"), 10s);
    for (int i = 0; i < 3; ++i) {
      auto r = client.request("GET", "/again");
      REQUIRE(r.has_value());
      CHECK(r->status == 200);
      CHECK(r->headers.count("connection") == 0);
    }
    CHECK(contains(metrics.render(), "broker_http_connections{listener=\"t\"} 1\n"));
  }

  // The server answers two requests on one raw connection.
  RawSocket sock(server.port("t"));
  sock.send("GET /one HTTP/1.1\r\nHost: x\r\n\r\n");
  const auto first = sock.read_response();
  CHECK(first.starts_with("HTTP/1.1 200 OK\r\n"));
  CHECK(contains(first, "path=/one\n"));
  CHECK_FALSE(contains(first, "Connection: close"));
  sock.send("GET /two HTTP/1.1\r\nHost: x\r\n\r\n");
  const auto second = sock.read_response();
  CHECK(second.starts_with("HTTP/1.1 200 OK\r\n"));
  CHECK(contains(second, "path=/two\n"));
  server.stop(5s);
}

TEST_CASE("limits and malformed requests") {
  net::Server server(1, common::null_logger());
  net::ListenerOptions opts{.name = "t"};
  opts.body_limit = 1024;
  opts.header_limit = 1024;
  server.add_listener(opts, echo);
  server.start();
  net::HttpClient client(url(server, "t"), 10s);

  SUBCASE("body over the limit: 413, then the connection closes") {
    auto r = client.request("POST", "/big", std::string(4096, 'x'));
    REQUIRE(r.has_value());
    CHECK(r->status == 413);
    CHECK(r->headers["connection"] == "close");
    // The client reconnects for the next request.
    auto next = client.request("POST", "/small", "ok");
    REQUIRE(next.has_value());
    CHECK(next->status == 200);
  }
  SUBCASE("header over the limit: 431") {
    auto r = client.request("GET", "/", {}, {{"X-Big", std::string(4096, 'h')}});
    REQUIRE(r.has_value());
    CHECK(r->status == 431);
    CHECK(r->headers["connection"] == "close");
  }
  SUBCASE("malformed request: 400, then close") {
    RawSocket sock(server.port("t"));
    sock.send("THIS IS NOT HTTP\r\n\r\n");
    const auto reply = sock.read_all();
    CHECK(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"));
    CHECK(contains(reply, "Connection: close\r\n"));
  }
  SUBCASE("body within the limit") {
    auto r = client.request("POST", "/ok", std::string(1024, 'y'));
    REQUIRE(r.has_value());
    CHECK(r->status == 200);
  }
  server.stop(5s);
}

TEST_CASE("responder called from another thread") {
  Workers workers;
  net::Server server(2, common::null_logger());
  server.add_listener({.name = "t"}, [&workers](net::HttpRequest&& r, net::Responder respond) {
    workers.spawn([path = r.path, respond = std::move(respond)] {
      std::this_thread::sleep_for(20ms);
      respond(text(202, "later " + path));
      respond(text(500, "a second call is ignored"));
    });
  });
  server.start();
  net::HttpClient client(url(server, "t"), 10s);
  for (int i = 0; i < 3; ++i) {
    auto r = client.request("GET", "/async/" + std::to_string(i));
    REQUIRE(r.has_value());
    CHECK(r->status == 202);
    CHECK(r->body == "later /async/" + std::to_string(i));
  }
  server.stop(5s);
  workers.join();
}

TEST_CASE("percent-decoded path and query parameters") {
  net::Server server(1, common::null_logger());
  server.add_listener({.name = "t"}, echo);
  server.start();
  net::HttpClient client(url(server, "t"), 10s);
  auto r = client.request("GET", "/a%20b/c%2Fd?name=J%C3%BCrgen+X&empty=&flag");
  REQUIRE(r.has_value());
  CHECK(contains(r->body, "path=/a b/c/d\n"));
  CHECK(contains(r->body, "query=name=J%C3%BCrgen+X&empty=&flag\n"));
  CHECK(contains(r->body, "param:name=J\xC3\xBCrgen X\n"));
  CHECK(contains(r->body, "param:empty=\n"));
  CHECK(contains(r->body, "param:flag=\n"));
  server.stop(5s);
}

TEST_CASE("TLS listener") {
  TempTlsFiles files;
  net::Server server(2, common::null_logger());
  server.add_listener({.name = "secure", .tls_cert_file = files.cert, .tls_key_file = files.key}, echo);
  server.start();

  net::HttpClient client(url(server, "secure", "https"), 10s);
  for (int i = 0; i < 2; ++i) {
    auto r = client.request("POST", "/tls", "secret");
    REQUIRE(r.has_value());
    CHECK(r->status == 200);
    CHECK(contains(r->body, "tls=1\n"));
    CHECK(contains(r->body, "body=secret\n"));
  }
  // With the certificate as the trusted CA, verification succeeds too.
  net::HttpClient verifying("https://localhost:" + std::to_string(server.port("secure")), 10s, files.cert);
  auto v = verifying.request("GET", "/verified");
  REQUIRE(v.has_value());
  CHECK(v->status == 200);

  // Plain HTTP to a TLS port fails without a reply.
  net::HttpClient plain(url(server, "secure"), 10s);
  CHECK_FALSE(plain.request("GET", "/").has_value());
  server.stop(5s);
}

TEST_CASE("start-up errors are exceptions naming the listener or file") {
  net::Server first(1, common::null_logger());
  first.add_listener({.name = "admin"}, echo);
  const auto port = first.port("admin");

  net::Server second(1, common::null_logger());
  try {
    second.add_listener({.name = "admin", .port = port}, echo);
    FAIL("binding a busy port must throw");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()).starts_with("admin listener 127.0.0.1:" + std::to_string(port) + ": "));
  }
  try {
    second.add_listener(
        {.name = "xml", .tls_cert_file = "/nonexistent/cert.pem", .tls_key_file = "/nonexistent/key.pem"}, echo);
    FAIL("a missing certificate must throw");
  } catch (const std::runtime_error& e) {
    CHECK(contains(e.what(), "xml listener"));
    CHECK(contains(e.what(), "/nonexistent/cert.pem"));
  }
  // Never started: stop only releases the ports.
  first.stop(1s);
  first.stop(1s);
  CHECK_FALSE(first.running());
}

TEST_CASE("client errors") {
  net::HttpClient refused("http://127.0.0.1:1", 5s);
  auto r = refused.request("GET", "/");
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == common::errc::unavailable);
  CHECK(r.error().message.starts_with("cannot connect to http://127.0.0.1:1: "));

  net::HttpClient bad("ftp://x", 5s);
  auto b = bad.request("GET", "/");
  REQUIRE_FALSE(b.has_value());
  CHECK(b.error().code == common::errc::invalid_argument);
}

TEST_CASE("client reconnects after the server closed an idle connection") {
  net::Server server(1, common::null_logger());
  net::ListenerOptions opts{.name = "t"};
  opts.idle_timeout = 50ms;
  server.add_listener(opts, echo);
  server.start();
  net::HttpClient client(url(server, "t"), 10s);
  REQUIRE(client.request("GET", "/1").has_value());
  std::this_thread::sleep_for(300ms);  // the server drops the idle connection meanwhile
  auto r = client.request("POST", "/2", "again");
  REQUIRE(r.has_value());
  CHECK(r->status == 200);
  server.stop(5s);
}

TEST_CASE("a handler that never responds does not hold the connection forever") {
  net::Server server(1, common::null_logger());
  net::ListenerOptions opts{.name = "t"};
  opts.read_timeout = 200ms;
  std::vector<net::Responder> kept;  // touched on the single I/O thread only
  server.add_listener(opts, [&kept](net::HttpRequest&&, net::Responder respond) { kept.push_back(respond); });
  server.start();
  net::HttpClient client(url(server, "t"), 10s);
  auto r = client.request("GET", "/never");
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == common::errc::unavailable);
  server.stop(5s);
  kept.front()(text(200, "too late"));  // dropped, harmless
}

TEST_CASE("graceful stop lets an in-flight request finish") {
  Workers workers;
  std::promise<void> started;
  net::Server server(2, common::null_logger());
  server.add_listener({.name = "t"}, [&](net::HttpRequest&&, net::Responder respond) {
    workers.spawn([respond = std::move(respond)] {
      std::this_thread::sleep_for(300ms);
      respond(text(200, "slow done"));
    });
    started.set_value();
  });
  server.start();
  // An idle keep-alive connection is closed at once by stop.
  RawSocket idle(server.port("t"));

  common::Result<net::ClientResponse> result = common::make_error(common::errc::internal, "not run");
  std::thread client_thread([&] {
    net::HttpClient client(url(server, "t"), 10s);
    result = client.request("GET", "/slow");
  });
  started.get_future().wait();
  server.stop(10s);
  client_thread.join();
  REQUIRE(result.has_value());
  CHECK(result->status == 200);
  CHECK(result->body == "slow done");
  CHECK(result->headers["connection"] == "close");
  CHECK(idle.read_all().empty());
  CHECK_FALSE(server.running());
  server.stop(10s);  // a second stop is a no-op
  CHECK_FALSE(server.running());
  workers.join();
}

TEST_CASE("stop closes a connection stuck in the middle of a request at the deadline") {
  net::Server server(1, common::null_logger());
  server.add_listener({.name = "t"}, echo);
  server.start();
  RawSocket sock(server.port("t"));
  sock.send("POST /partial HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part");
  std::this_thread::sleep_for(50ms);  // let the server start reading it
  server.stop(100ms);
  CHECK_FALSE(server.running());
  CHECK(sock.read_all().empty());  // closed without a reply
}

TEST_CASE("stop from a handler and wait_for_signal") {
  net::Server server(1, common::null_logger());
  server.add_listener({.name = "t"}, [&server](net::HttpRequest&&, net::Responder respond) {
    server.stop(5s);  // on the I/O thread: hands the stopping to another thread
    respond(text(200, "bye"));
  });
  server.start();
  std::thread waiter([&server] { server.wait_for_signal(); });  // returns once stop() is called
  net::HttpClient client(url(server, "t"), 10s);
  auto r = client.request("POST", "/quit", "now");
  REQUIRE(r.has_value());
  CHECK(r->body == "bye");
  CHECK(r->headers["connection"] == "close");
  waiter.join();
  server.stop(5s);  // waits for the stop begun by the handler
  CHECK_FALSE(server.running());
}

// ---------------------------------------------------------------------------------------------
// Connection caps, the first-request deadline, accept failures (issue 12, item 3) and HTTP/1.1
// framing (item 7).

namespace {

constexpr auto kPatience = 20s;  // safety net against hangs, not an assertion

// Polls `condition` until it holds or kPatience has passed.
template <class Condition>
bool eventually(Condition condition) {
  const auto until = std::chrono::steady_clock::now() + kPatience;
  while (!condition()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

// The value of one series ("name{labels}") in `metrics`; 0 when it is absent.
double metric(const common::Metrics& metrics, const std::string& series) {
  const std::string text = "\n" + metrics.render();
  const auto at = text.find("\n" + series + " ");
  if (at == std::string::npos) return 0;
  return std::stod(text.substr(at + series.size() + 2));
}

std::size_t count_of(const std::string& haystack, const std::string& needle) {
  std::size_t n = 0;
  for (auto at = haystack.find(needle); at != std::string::npos; at = haystack.find(needle, at + 1)) ++n;
  return n;
}

std::string get(const std::string& path) { return "GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n"; }

// True when a request on `sock` is answered 200 with the echo of `path`.
bool served(RawSocket& sock, const std::string& path) {
  sock.send(get(path));
  const auto reply = sock.read_response();
  return reply.starts_with("HTTP/1.1 200 OK\r\n") && contains(reply, "path=" + path + "\n");
}

// A WebSocket session that does nothing.
class Quiet : public net::WebSocketSession {
 public:
  void on_message(std::string) override {}
  void on_close(const std::string&) override {}
};

std::string upgrade_request(const std::string& path) {
  return "GET " + path +
         " HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
}

}  // namespace

TEST_CASE("connection caps: over max_connections a connection is closed at accept, the others go on") {
  common::Metrics metrics;
  net::Server server(2, common::null_logger(), &metrics);
  net::ListenerOptions opts{.name = "t"};
  opts.max_connections = 2;
  server.add_listener(opts, echo);
  server.start();
  const auto port = server.port("t");

  RawSocket a(port);
  auto b = std::make_unique<RawSocket>(port);
  REQUIRE(served(a, "/a"));
  REQUIRE(served(*b, "/b"));
  RawSocket c(port);  // the kernel completes the TCP handshake; the server closes it at accept
  c.send(get("/c"));
  CHECK(c.wait_closed_by_peer());
  CHECK(metric(metrics, R"(broker_connections_refused_total{listener="t",reason="max_connections"})") == 1);
  // The established connections are not touched.
  CHECK(served(a, "/a2"));
  CHECK(served(*b, "/b2"));
  // Once one of them has closed, a new connection is served again.
  b.reset();
  CHECK(eventually([&] {
    RawSocket d(port);
    return served(d, "/d");
  }));
  server.stop(5s);
}

TEST_CASE("connection caps: max_connections_per_address counts each peer address on its own") {
  common::Metrics metrics;
  net::Server server(2, common::null_logger(), &metrics);
  net::ListenerOptions opts{.name = "t"};
  opts.max_connections_per_address = 1;
  server.add_listener(opts, echo);
  server.start();
  const auto port = server.port("t");

  RawSocket first(port, "127.0.0.2");
  REQUIRE(served(first, "/first"));
  RawSocket second(port, "127.0.0.2");
  CHECK(second.wait_closed_by_peer());
  CHECK(metric(metrics, R"(broker_connections_refused_total{listener="t",reason="max_connections_per_address"})") == 1);
  RawSocket other(port, "127.0.0.3");
  other.send(get("/other"));
  const auto reply = other.read_response();
  CHECK(reply.starts_with("HTTP/1.1 200 OK\r\n"));
  CHECK(contains(reply, "remote=127.0.0.3\n"));
  CHECK(served(first, "/again"));
  server.stop(5s);
}

TEST_CASE("connection caps: a flood that uses up the shared limit leaves the reserved listener reachable") {
  common::Metrics metrics;
  net::Server server(2, common::null_logger(), &metrics);
  server.add_listener({.name = "xml", .max_connections = 100}, echo);
  server.add_listener({.name = "agent", .max_connections = 100}, echo);
  server.add_listener({.name = "admin", .max_connections = 2, .reserved = true}, echo);
  server.set_shared_connection_limit(3);
  server.start();

  std::vector<std::unique_ptr<RawSocket>> flood;
  for (int i = 0; i < 3; ++i) {
    flood.push_back(std::make_unique<RawSocket>(server.port("xml")));
    REQUIRE(served(*flood.back(), "/flood"));
  }
  RawSocket more(server.port("xml"));
  CHECK(more.wait_closed_by_peer());
  RawSocket agent(server.port("agent"));
  CHECK(agent.wait_closed_by_peer());
  CHECK(metric(metrics, R"(broker_connections_refused_total{listener="agent",reason="shared_limit"})") == 1);
  // The admin listener's connections are its own.
  RawSocket admin(server.port("admin"));
  CHECK(served(admin, "/healthz"));
  RawSocket admin2(server.port("admin"));
  CHECK(served(admin2, "/healthz"));
  server.stop(5s);
}

TEST_CASE("connection caps: a WebSocket listener's over-limit band marks the peer; plain HTTP there gets 503") {
  common::Metrics metrics;
  net::Server server(2, common::null_logger(), &metrics);
  std::mutex mutex;
  std::vector<bool> opened;  // over_limit() of each peer, in order
  net::WebSocketHandler ws;
  ws.on_open = [&](std::shared_ptr<net::WebSocketPeer> peer) -> std::shared_ptr<net::WebSocketSession> {
    std::lock_guard lock(mutex);
    opened.push_back(peer->over_limit());
    return std::make_shared<Quiet>();
  };
  server.add_listener({.name = "agent", .max_connections = 1, .over_limit_connections = 1}, echo, ws);
  server.start();
  const auto port = server.port("agent");
  const auto opened_count = [&] {
    std::lock_guard lock(mutex);
    return opened.size();
  };

  RawSocket normal(port);
  normal.send(upgrade_request("/cbp"));
  REQUIRE(normal.read_head().starts_with("HTTP/1.1 101 "));
  REQUIRE(eventually([&] { return opened_count() == 1; }));
  auto over = std::make_unique<RawSocket>(port);
  over->send(upgrade_request("/cbp"));
  REQUIRE(over->read_head().starts_with("HTTP/1.1 101 "));
  REQUIRE(eventually([&] { return opened_count() == 2; }));
  {
    std::lock_guard lock(mutex);
    CHECK_FALSE(opened[0]);
    CHECK(opened[1]);
  }
  CHECK(metric(metrics, R"(broker_connections_over_limit_total{listener="agent"})") == 1);
  RawSocket beyond(port);  // over the cap and the band: closed at accept
  CHECK(beyond.wait_closed_by_peer());
  CHECK(metric(metrics, R"(broker_connections_refused_total{listener="agent",reason="max_connections"})") == 1);

  // The band is free again once its connection ended: a plain request there gets 503.
  over.reset();
  std::string reply;
  CHECK(eventually([&] {
    RawSocket plain(port);
    plain.send(get("/x"));
    reply = plain.read_all();
    return !reply.empty();
  }));
  CHECK(reply.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
  CHECK(contains(reply, "Retry-After: 60\r\n"));
  CHECK(contains(reply, "Connection: close\r\n"));
  server.stop(5s);
}

TEST_CASE("first_request_timeout: a new connection that sends nothing, or trickles, is closed; keep-alive is not") {
  net::Server server(1, common::null_logger());
  net::ListenerOptions opts{.name = "t"};
  opts.first_request_timeout = 200ms;
  opts.idle_timeout = 60s;
  opts.read_timeout = 30s;
  server.add_listener(opts, echo);
  server.start();
  const auto port = server.port("t");

  RawSocket silent(port);
  CHECK(silent.wait_closed_by_peer());
  RawSocket trickle(port);
  trickle.send("GET /slow HTTP/1.1\r\nHost: x\r\n");  // the header never ends
  CHECK(trickle.wait_closed_by_peer());

  // After its first request a connection waits for the next one up to idle_timeout.
  RawSocket kept(port);
  REQUIRE(served(kept, "/1"));
  std::this_thread::sleep_for(500ms);  // longer than first_request_timeout
  CHECK(served(kept, "/2"));
  server.stop(5s);
}

TEST_CASE("accept out of descriptors: the listener pauses, logs once, counts, and recovers") {
  std::ostringstream log_text;
  auto logger = std::make_shared<spdlog::logger>("t", std::make_shared<spdlog::sinks::ostream_sink_mt>(log_text));
  common::Metrics metrics;
  net::Server server(1, logger, &metrics);
  server.add_listener({.name = "t"}, echo);
  server.start();
  const auto port = server.port("t");

  // Client sockets made while descriptors are left; then the process limit is lowered to the
  // lowest free descriptor, so that the server's accept() fails with EMFILE.
  std::vector<int> clients;
  for (int i = 0; i < 2; ++i) {
    clients.push_back(::socket(AF_INET, SOCK_STREAM, 0));
    REQUIRE(clients.back() >= 0);
    timeval tv{10, 0};
    ::setsockopt(clients.back(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  struct LimitGuard {
    rlimit saved{};
    LimitGuard() { REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0); }
    ~LimitGuard() { ::setrlimit(RLIMIT_NOFILE, &saved); }
  };
  double failures = 0;
  {
    LimitGuard guard;
    const int lowest_free = ::open("/dev/null", O_RDONLY);
    REQUIRE(lowest_free >= 0);
    ::close(lowest_free);
    rlimit low = guard.saved;
    low.rlim_cur = static_cast<rlim_t>(lowest_free);
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int fd : clients) CHECK(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    const std::string series = R"(broker_accept_failures_total{listener="t",reason="descriptors"})";
    eventually([&] { return metric(metrics, series) >= 3; });
    failures = metric(metrics, series);
  }  // the limit is back
  CHECK(failures >= 3);

  // The pending connections are accepted and served once descriptors are free again.
  for (int fd : clients) {
    const std::string request = get("/late");
    CHECK(::send(fd, request.data(), request.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(request.size()));
    char buf[64] = {};
    const auto n = ::recv(fd, buf, sizeof buf - 1, 0);
    CHECK(n > 0);
    CHECK(std::string(buf).starts_with("HTTP/1.1 200 OK"));
    ::close(fd);
  }
  server.stop(5s);
  logger->flush();
  // One warning for the whole episode (the next one would come after kRefusalLogPeriod), not one
  // per failed accept.
  CHECK(count_of(log_text.str(), "accept failed") == 1);
}

TEST_CASE("fit_connection_caps: the caps fit the descriptor limit, the reserved listener's come first") {
  net::ListenerOptions xml{.name = "xml", .max_connections = 10000};
  net::ListenerOptions agent{.name = "agent", .max_connections = 110000, .over_limit_connections = 64};
  net::ListenerOptions admin{.name = "admin", .max_connections = 256, .reserved = true};
  auto b = net::fit_connection_caps(20000, 256, {&xml, &agent, &admin});
  CHECK(b.reserve == 256);
  CHECK(admin.max_connections == 256);
  CHECK(agent.over_limit_connections == 64);
  CHECK(b.shared_limit == 20000 - 256 - 256 - 64);
  CHECK(xml.max_connections == 10000);
  CHECK(agent.max_connections == b.shared_limit);
  REQUIRE(b.adjustments.size() == 1);
  CHECK(b.adjustments[0].starts_with("agent listener: max_connections 110000 lowered to 19424 "));

  // A tiny limit: everything shrinks, nothing is left without a place, the sum still fits.
  net::ListenerOptions x{.name = "xml"};  // no cap of its own
  net::ListenerOptions g{.name = "agent", .max_connections = 110000, .over_limit_connections = 64};
  net::ListenerOptions a{.name = "admin", .max_connections = 256, .reserved = true};
  b = net::fit_connection_caps(64, 256, {&x, &g, &a});
  CHECK(b.reserve == 16);
  CHECK(a.max_connections == 12);
  CHECK(g.over_limit_connections == 2);
  CHECK(b.shared_limit == 34);
  CHECK(x.max_connections == 34);
  CHECK(g.max_connections == 34);
  CHECK(b.reserve + a.max_connections + g.over_limit_connections + b.shared_limit == 64);
  CHECK(b.adjustments.size() == 4);

  // Plenty of descriptors: nothing changes.
  net::ListenerOptions big{.name = "agent", .max_connections = 110000, .over_limit_connections = 64};
  b = net::fit_connection_caps(1 << 20, 256, {&big});
  CHECK(big.max_connections == 110000);
  CHECK(b.adjustments.empty());
}

TEST_CASE("HTTP/1.1 framing: Host and Transfer-Encoding as RFC 9112 requires") {
  net::Server server(1, common::null_logger());
  server.add_listener({.name = "t"}, echo);
  server.start();
  const auto port = server.port("t");
  const auto exchange = [&](const std::string& request) {
    RawSocket sock(port);
    sock.send(request);
    sock.shutdown_send();
    return sock.read_all();
  };
  const std::string bad = "HTTP/1.1 400 Bad Request\r\n";

  SUBCASE("Host") {
    CHECK(exchange("GET /nohost HTTP/1.1\r\n\r\n").starts_with(bad));
    CHECK(exchange("GET /two HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").starts_with(bad));
    CHECK(contains(exchange("GET /nohost HTTP/1.1\r\n\r\n"), "Connection: close\r\n"));
    // HTTP/1.0 has no Host requirement.
    const auto old = exchange("GET /old HTTP/1.0\r\n\r\n");
    CHECK(old.starts_with("HTTP/1.0 200 OK\r\n"));
    CHECK(contains(old, "path=/old\n"));
  }
  SUBCASE("Transfer-Encoding") {
    const std::string head = "POST /te HTTP/1.1\r\nHost: x\r\n";
    const std::string body = "\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    CHECK(exchange(head + "Transfer-Encoding: identity, chunked" + body).starts_with(bad));
    CHECK(exchange(head + "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked" + body).starts_with(bad));
    CHECK(exchange(head + "Transfer-Encoding: chunked, chunked" + body).starts_with(bad));
    CHECK(exchange(head + "Transfer-Encoding: chunked;x=1" + body).starts_with(bad));
    CHECK(exchange("POST /te HTTP/1.0\r\nTransfer-Encoding: chunked" + body).starts_with(bad));
    const auto ok = exchange(head + "Transfer-Encoding: Chunked" + body);
    CHECK(ok.starts_with("HTTP/1.1 200 OK\r\n"));
    CHECK(contains(ok, "body=hello\n"));
  }
  server.stop(5s);
}

TEST_CASE("oversized header and trailer fields: 431 and close, never an exception") {
  std::ostringstream log_text;
  auto logger = std::make_shared<spdlog::logger>("t", std::make_shared<spdlog::sinks::ostream_sink_mt>(log_text));
  net::Server server(1, logger);
  net::ListenerOptions opts{.name = "t"};
  opts.header_limit = 1024 * 1024;  // the largest the config allows
  server.add_listener(opts, echo);
  net::ListenerOptions small{.name = "small"};
  small.header_limit = 4096;
  server.add_listener(small, echo);
  server.start();
  const auto exchange = [&](const std::string& listener, const std::string& request) {
    RawSocket sock(server.port(listener));
    sock.send(request);
    sock.shutdown_send();
    return sock.read_all();
  };
  const std::string chunked = "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n";
  const std::string too_large = "HTTP/1.1 431 Request Header Fields Too Large\r\n";

  SUBCASE("one trailer field over 64 KiB") {
    const auto reply = exchange("t", chunked + "X-Big: " + std::string(70000, 'a') + "\r\n\r\n");
    CHECK(reply.starts_with(too_large));
    CHECK(contains(reply, "Connection: close\r\n"));
  }
  SUBCASE("trailers over header_limit in total") {
    std::string trailers;
    for (int i = 0; i < 50; ++i) trailers += "X-T" + std::to_string(i) + ": " + std::string(100, 'b') + "\r\n";
    CHECK(exchange("small", chunked + trailers + "\r\n").starts_with(too_large));
  }
  SUBCASE("a trailer section larger than the read buffer") {
    CHECK(exchange("small", chunked + "X-Big: " + std::string(200000, 'c') + "\r\n\r\n").starts_with(too_large));
  }
  SUBCASE("one header field over 64 KiB under a 1 MiB header limit") {
    CHECK(exchange("t", "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(70000, 'd') + "\r\n\r\n")
              .starts_with(too_large));
  }
  SUBCASE("trailers within the limits are read and dropped") {
    const auto reply = exchange("t", chunked + "X-Test: from-the-trailer\r\n\r\n");
    CHECK(reply.starts_with("HTTP/1.1 200 OK\r\n"));
    CHECK(contains(reply, "body=hello\n"));
    CHECK(contains(reply, "x-test=\n"));
  }
  // The server goes on serving.
  net::HttpClient client(url(server, "t"), 10s);
  auto r = client.request("GET", "/after");
  REQUIRE(r.has_value());
  CHECK(r->status == 200);
  server.stop(5s);
  logger->flush();
  CHECK_FALSE(contains(log_text.str(), "exception"));
  CHECK_FALSE(contains(log_text.str(), "too large"));
}

// ---------------------------------------------------------------------------------------------
// Abuse limits of the HTTP layer every listener shares (docs/SECURITY.md section 7.1). Most have
// their test above ("limits and malformed requests", "oversized header and trailer fields...",
// "first_request_timeout...", "connection caps..."); these are the timeouts' remaining cases.
TEST_SUITE("limits") {

namespace {
// A connected plain socket whose sends may fail (the server closes it under the test's feet).
int raw_connect(std::uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  return fd;
}
// Whether the server has closed `fd` (end of stream or reset), without waiting; bytes it sent
// first (a reply) are read and dropped.
bool closed_by_server(int fd) {
  char buf[4096];
  for (;;) {
    const auto n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) continue;
    if (n == 0) return true;
    return errno != EAGAIN && errno != EWOULDBLOCK;
  }
}
}  // namespace

TEST_CASE("read_timeout: a body trickled past read_timeout is cut off, however steady the trickle") {
  net::Server server(1, common::null_logger());
  net::ListenerOptions opts{.name = "t"};
  opts.read_timeout = 300ms;
  opts.first_request_timeout = 60s;  // the header arrives at once: only read_timeout applies
  opts.idle_timeout = 60s;
  std::atomic<int> handled{0};
  server.add_listener(opts, [&handled](net::HttpRequest&& r, net::Responder respond) {
    ++handled;
    echo(std::move(r), std::move(respond));
  });
  server.start();
  const int fd = raw_connect(server.port("t"));
  const std::string head = "POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n";
  REQUIRE(::send(fd, head.data(), head.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(head.size()));
  // One byte every 50 ms, each gap far shorter than read_timeout: only a deadline on the whole
  // request ends this. At most 200 bytes (a safety net against hangs, not an assertion).
  bool closed = false;
  int sent = 0;
  for (; sent < 200 && !closed; ++sent) {
    closed = closed_by_server(fd) || ::send(fd, "x", 1, MSG_NOSIGNAL) != 1;
    if (!closed) std::this_thread::sleep_for(50ms);
  }
  CHECK(closed);
  CHECK(sent > 1);  // it did trickle for a while first
  CHECK(handled == 0);
  ::close(fd);
  // The listener goes on.
  RawSocket next(server.port("t"));
  CHECK(served(next, "/after"));
  server.stop(5s);
}

TEST_CASE("idle_timeout: a keep-alive connection without a next request is closed by the server") {
  net::Server server(1, common::null_logger());
  net::ListenerOptions opts{.name = "t"};
  opts.idle_timeout = 200ms;
  opts.first_request_timeout = 60s;
  opts.read_timeout = 60s;
  server.add_listener(opts, echo);
  server.start();
  RawSocket kept(server.port("t"));
  REQUIRE(served(kept, "/1"));
  // Nothing more is sent: the server ends the connection (within the socket's 10 s safety net).
  CHECK(kept.wait_closed_by_peer());
  server.stop(5s);
}

}  // TEST_SUITE("limits")
