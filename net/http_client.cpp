// net/http_client.cpp: the blocking HTTP/1.1 client (see http_client.hpp).
//
// Blocking on top of Asio's asynchronous operations: each step (connect, handshake, write,
// read) is started on a private io_context and run to completion on the calling thread. That
// way beast::tcp_stream's timeout (which only applies to asynchronous operations) bounds every
// request: one deadline per attempt covers connecting, sending and receiving.
#include "net/http_client.hpp"

#include "common/version.hpp"
#include "net/detail/any_stream.hpp"

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <openssl/ssl.h>

#include <cctype>
#include <optional>
#include <utility>

namespace net {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using boost::system::error_code;

constexpr std::uint64_t kMaxResponseBody = 256ull * 1024 * 1024;

std::string describe(const error_code& ec) {
  if (ec == beast::error::timeout) return "timed out";
  return ec.message();
}

bool has_line_break(std::string_view s) { return s.find_first_of("\r\n") != std::string_view::npos; }

// Errors that mean "the server had closed the kept-alive connection": worth one retry on a
// fresh connection.
bool is_stale_connection(const error_code& ec) {
  return ec == http::error::end_of_stream || ec == asio::error::eof || ec == asio::error::connection_reset ||
         ec == asio::error::broken_pipe || ec == asio::error::connection_aborted ||
         ec == asio::ssl::error::stream_truncated;
}

}  // namespace

struct HttpClient::Impl {
  Impl(std::string url, std::chrono::milliseconds t, std::string ca) : base_url(std::move(url)), timeout(t) {
    parse_url();
    if (https && parse_error.empty()) setup_tls(ca);
  }

  // base_url: scheme://host[:port][/prefix]; IPv6 hosts in brackets.
  void parse_url() {
    std::string_view rest = base_url;
    if (rest.starts_with("http://")) {
      rest.remove_prefix(7);
    } else if (rest.starts_with("https://")) {
      rest.remove_prefix(8);
      https = true;
    } else {
      parse_error = "invalid URL " + base_url + ": expected http:// or https://";
      return;
    }
    const auto slash = rest.find('/');
    std::string_view authority = rest.substr(0, slash);
    if (slash != std::string_view::npos) prefix = std::string(rest.substr(slash));
    while (!prefix.empty() && prefix.back() == '/') prefix.pop_back();
    host_header = std::string(authority);
    std::string_view port_text;
    if (authority.starts_with("[")) {
      const auto close = authority.find(']');
      if (close == std::string_view::npos) {
        parse_error = "invalid URL " + base_url;
        return;
      }
      host = std::string(authority.substr(1, close - 1));
      const auto after = authority.substr(close + 1);
      if (after.starts_with(":")) port_text = after.substr(1);
    } else {
      const auto colon = authority.rfind(':');
      host = std::string(authority.substr(0, colon));
      if (colon != std::string_view::npos) port_text = authority.substr(colon + 1);
    }
    port = port_text.empty() ? (https ? "443" : "80") : std::string(port_text);
    if (host.empty() || port.find_first_not_of("0123456789") != std::string::npos) {
      parse_error = "invalid URL " + base_url;
    }
  }

  void setup_tls(const std::string& ca_file) {
    tls_context.emplace(ssl::context::tls_client);
    SSL_CTX_set_min_proto_version(tls_context->native_handle(), TLS1_2_VERSION);
    if (ca_file.empty()) {
      tls_context->set_verify_mode(ssl::verify_none);
      return;
    }
    error_code ec;
    tls_context->load_verify_file(ca_file, ec);
    if (ec) {
      parse_error = "cannot load CA file " + ca_file + ": " + ec.message();
      return;
    }
    tls_context->set_verify_mode(ssl::verify_peer);  // AnyStream then checks the host name too
  }

  // Starts one asynchronous operation through `initiate(handler)` and runs the io_context until
  // it completes; the stream's expiry bounds the wait.
  template <class Initiate>
  error_code run(Initiate&& initiate) {
    error_code result = asio::error::would_block;
    std::forward<Initiate>(initiate)([&result](const error_code& ec, auto&&...) { result = ec; });
    ioc.restart();
    ioc.run();
    return result;
  }

  void disconnect() {
    stream.reset();
    buffer.clear();
  }

  error_code connect(Clock::time_point deadline) {
    disconnect();
    error_code ec;
    tcp::resolver resolver(ioc);
    const auto endpoints = resolver.resolve(host, port, ec);
    if (ec) return ec;
    beast::tcp_stream tcp(ioc);
    tcp.expires_at(deadline);
    ec = run([&](auto handler) { tcp.async_connect(endpoints, std::move(handler)); });
    if (ec) return ec;
    if (!https) {
      stream.emplace(std::move(tcp));
      return {};
    }
    stream.emplace(std::move(tcp), *tls_context, detail::AnyStream::Role::client, host);
    return run([&](auto handler) { stream->async_handshake(std::move(handler)); });
  }

  error_code exchange(http::request<http::string_body>& req, http::response_parser<http::string_body>& parser) {
    error_code ec = run([&](auto handler) { http::async_write(*stream, req, std::move(handler)); });
    if (ec) return ec;
    return run([&](auto handler) { http::async_read(*stream, buffer, parser, std::move(handler)); });
  }

  common::Result<ClientResponse> request(const std::string& method, const std::string& target, const std::string& body,
                                         const std::vector<std::pair<std::string, std::string>>& headers) {
    if (!parse_error.empty()) return common::make_error(common::errc::invalid_argument, parse_error);
    http::request<http::string_body> req;
    const auto verb = http::string_to_verb(method);
    if (verb == http::verb::unknown) {
      req.method_string(method);
    } else {
      req.method(verb);
    }
    req.target(prefix + target);
    req.version(11);
    req.set(http::field::host, host_header);
    req.set(http::field::user_agent, std::string("openbroker/") + common::kVersion);
    for (const auto& [name, value] : headers) {
      if (name.empty() || has_line_break(name) || has_line_break(value)) {
        return common::make_error(common::errc::invalid_argument, "invalid header " + name);
      }
      req.insert(name, value);
    }
    req.body() = body;
    if (!body.empty() || verb == http::verb::post || verb == http::verb::put || verb == http::verb::patch) {
      req.content_length(body.size());
    }
    req.keep_alive(true);

    for (int attempt = 0;; ++attempt) {
      const bool reused = connected;
      const auto deadline = Clock::now() + timeout;
      error_code ec;
      if (!connected) {
        ec = connect(deadline);
        if (ec) {
          disconnect();
          return common::make_error(common::errc::unavailable, "cannot connect to " + base_url + ": " + describe(ec));
        }
        connected = true;
      } else {
        stream->lowest_layer().expires_at(deadline);
      }
      http::response_parser<http::string_body> parser;
      parser.body_limit(kMaxResponseBody);
      if (req.method() == http::verb::head) parser.skip(true);
      ec = exchange(req, parser);
      if (ec) {
        connected = false;
        disconnect();
        if (reused && attempt == 0 && is_stale_connection(ec)) continue;
        return common::make_error(common::errc::unavailable,
                                  method + " " + base_url + prefix + target + " failed: " + describe(ec));
      }
      auto& res = parser.get();
      ClientResponse out;
      out.status = static_cast<int>(res.result_int());
      for (const auto& field : res) {
        std::string name(field.name_string());
        for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        auto [it, inserted] = out.headers.emplace(std::move(name), std::string(field.value()));
        if (!inserted) {
          it->second += ", ";
          it->second += field.value();
        }
      }
      if (!res.keep_alive()) {
        connected = false;
        disconnect();
      }
      out.body = std::move(res.body());
      return out;
    }
  }

  const std::string base_url;
  const std::chrono::milliseconds timeout;
  std::string parse_error;  // set: every request fails with it
  bool https = false;
  std::string host;
  std::string port;
  std::string prefix;  // path part of base_url, without trailing '/'
  std::string host_header;

  asio::io_context ioc{1};
  std::optional<ssl::context> tls_context;
  std::optional<detail::AnyStream> stream;  // the kept-alive connection, plain or TLS
  beast::flat_buffer buffer;
  bool connected = false;
};

HttpClient::HttpClient(std::string base_url, std::chrono::milliseconds timeout, std::string ca_file)
    : impl_(std::make_unique<Impl>(std::move(base_url), timeout, std::move(ca_file))) {}

HttpClient::~HttpClient() = default;

common::Result<ClientResponse> HttpClient::request(const std::string& method, const std::string& target,
                                                   const std::string& body,
                                                   const std::vector<std::pair<std::string, std::string>>& headers) {
  return impl_->request(method, target, body, headers);
}

}  // namespace net
