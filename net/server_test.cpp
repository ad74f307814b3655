// Integration tests of net::Server and net::HttpClient on real loopback ports.
#include "net/server.hpp"

#include "common/log.hpp"
#include "common/metrics.hpp"
#include "net/http_client.hpp"
#include "net/test_support.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
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
