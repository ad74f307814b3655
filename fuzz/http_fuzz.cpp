// fuzz/http_fuzz.cpp: the HTTP layer's request parsing as net::Server configures it, on the
// bytes a client sends on one connection (one or more pipelined requests).
//
// Beast's request parser (http::request_parser<string_body>) with the listener limits brokerd
// uses by default (config: header_limit_bytes 16 KiB, body_limit_bytes 1 MiB), the server's cap
// on a single field and on the trailer section, fed the way a read loop feeds it (the bytes
// received so far, then end of stream); each request is turned into a net::HttpRequest the way
// the server does (path percent-decoded, query kept raw, repeated headers joined), and its query
// parameters and headers are read as handlers read them. net/server.cpp keeps its parser
// subclass and its RFC 9112 framing checks private, so the field cap is restated here (keep it
// in step with RequestParser there); the framing checks are not run.
//
// Built as http_fuzz (libFuzzer) and http_fuzz_replay (ctest, over fuzz/corpus/http/): see
// fuzz/CMakeLists.txt.
//
// The contracts checked (std::abort on violation): the parser never throws or crashes, never
// consumes more than it was given, and a request it completes respects the limits (body within
// body_limit, no field over the cap); decoding the path and query never crashes.
#include "net/http.hpp"
#include "net/server.hpp"

#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <string_view>

namespace {

namespace beast = boost::beast;
namespace http = beast::http;

// net/server.cpp: kMaxFieldBytes.
constexpr std::size_t kMaxFieldBytes = std::numeric_limits<std::uint16_t>::max() - 2;

void check(bool ok) {
  if (!ok) std::abort();
}

// net/server.cpp's RequestParser: single fields capped, trailer fields counted against
// `trailer_limit` and dropped.
class Parser final : public http::request_parser<http::string_body> {
 public:
  explicit Parser(std::size_t trailer_limit) : trailer_limit_(trailer_limit) {}

 private:
  void on_field_impl(http::field name, beast::string_view name_string, beast::string_view value,
                     beast::error_code& ec) override {
    ec = {};
    if (std::max(name_string.size(), value.size()) > kMaxFieldBytes) {
      ec = http::error::header_limit;
    } else if (!is_header_done()) {
      get().insert(name, name_string, value);
    } else if ((trailer_bytes_ += name_string.size() + value.size()) > trailer_limit_) {
      ec = http::error::header_limit;
    }
  }

  const std::size_t trailer_limit_;
  std::size_t trailer_bytes_ = 0;
};

// net::Server's to_request, then what handlers read.
void use(http::request<http::string_body>&& msg) {
  net::HttpRequest r;
  r.method = std::string(msg.method_string());
  r.target = std::string(msg.target());
  const auto q = r.target.find('?');
  r.path = net::percent_decode(std::string_view(r.target).substr(0, q));
  if (q != std::string::npos) r.query = r.target.substr(q + 1);
  for (const auto& field : msg) {
    check(field.value().size() <= kMaxFieldBytes);
    auto [it, inserted] = r.headers.emplace(std::string(field.name_string()), std::string(field.value()));
    if (!inserted) it->second += ", " + std::string(field.value());
  }
  r.body = std::move(msg.body());
  for (const auto& [name, value] : r.query_params()) check(name.size() + value.size() <= r.query.size());
  (void)r.header("Authorization");
  (void)r.header("content-type");
  (void)net::percent_encode(r.path);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const net::ListenerOptions limits;  // the defaults brokerd's config also has
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  for (int request = 0; request < 16; ++request) {  // requests on one keep-alive connection
    Parser parser(limits.header_limit);
    parser.header_limit(static_cast<std::uint32_t>(limits.header_limit));
    parser.body_limit(static_cast<std::uint64_t>(limits.body_limit));
    beast::error_code ec;
    while (!parser.is_done()) {
      if (rest.empty()) {
        parser.put_eof(ec);
        break;
      }
      const std::size_t used = parser.put(boost::asio::const_buffer(rest.data(), rest.size()), ec);
      check(used <= rest.size());
      rest.remove_prefix(used);
      if (ec == http::error::need_more) {
        if (used == 0 && !rest.empty()) {
          // Beast wants more than is buffered (the server reads more): all of it is here.
          ec = {};
          parser.put_eof(ec);
          break;
        }
        ec = {};
        continue;
      }
      if (ec) break;
    }
    if (ec || !parser.is_done()) return 0;  // the server answers 400/413/431 or closes
    check(parser.get().body().size() <= limits.body_limit);
    const bool keep_alive = parser.get().keep_alive();
    use(parser.release());
    if (!keep_alive || rest.empty()) return 0;
  }
  return 0;
}
