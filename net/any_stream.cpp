// net/any_stream.cpp: the concrete streams behind net::detail::AnyStream (plain TCP and TLS).
#include "net/detail/any_stream.hpp"

#include <boost/asio/append.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/host_name_verification.hpp>
#include <boost/beast/ssl/ssl_stream.hpp>
#include <openssl/ssl.h>

#include <memory>

namespace net::detail {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace ssl = asio::ssl;
using boost::system::error_code;

class PlainStream final : public AnyStream::Impl {
 public:
  explicit PlainStream(beast::tcp_stream stream) : stream_(std::move(stream)) {}

  beast::tcp_stream& lowest() override { return stream_; }
  bool tls() const override { return false; }
  ssl_st* tls_handle() override { return nullptr; }
  void read_some(asio::mutable_buffer buffer, AnyStream::IoHandler handler) override {
    stream_.async_read_some(buffer, std::move(handler));
  }
  void write_some(std::vector<asio::const_buffer> buffers, AnyStream::IoHandler handler) override {
    stream_.async_write_some(buffers, std::move(handler));
  }
  void handshake(AnyStream::Handler handler) override {
    asio::post(stream_.get_executor(), asio::append(std::move(handler), error_code()));
  }
  void shutdown(AnyStream::Handler handler) override {
    error_code ec;
    stream_.socket().shutdown(asio::ip::tcp::socket::shutdown_send, ec);
    asio::post(stream_.get_executor(), asio::append(std::move(handler), ec));
  }
  // The end of a WebSocket close handshake over TCP: the server sends FIN first; both read and
  // discard until the peer's FIN, then close. Not Beast's teardown for sockets: in Boost 1.81 it
  // stops after the first chunk it reads (it tests the wrong byte count) and closes with unread
  // data, which resets the connection and can destroy the close frame at the peer.
  void teardown(beast::role_type role, AnyStream::Handler handler) override {
    error_code ignored;
    if (role == beast::role_type::server) stream_.socket().shutdown(asio::ip::tcp::socket::shutdown_send, ignored);
    drain(std::make_shared<Drain>(role, std::move(handler)));
  }

 private:
  struct Drain {
    Drain(beast::role_type r, AnyStream::Handler h) : role(r), handler(std::move(h)) {}
    beast::role_type role;
    AnyStream::Handler handler;
    char buffer[2048];
  };
  // The stream outlives the operation: its owner keeps it while an operation is pending.
  void drain(std::shared_ptr<Drain> op) {
    stream_.socket().async_read_some(asio::buffer(op->buffer), [this, op](error_code ec, std::size_t) {
      if (!ec) {
        drain(op);
        return;
      }
      error_code ignored;
      if (op->role == beast::role_type::client) {
        stream_.socket().shutdown(asio::ip::tcp::socket::shutdown_send, ignored);
      }
      stream_.socket().close(ignored);
      std::move(op->handler)(ec == asio::error::eof ? error_code() : ec);
    });
  }

  beast::tcp_stream stream_;
};

class TlsStream final : public AnyStream::Impl {
 public:
  TlsStream(beast::tcp_stream stream, ssl::context& context, AnyStream::Role role)
      : stream_(std::move(stream), context), role_(role) {}

  // Client side: SNI and host name verification.
  void set_server_name(const std::string& name, bool verify) {
    error_code ec;
    asio::ip::make_address(name, ec);
    if (ec) SSL_set_tlsext_host_name(stream_.native_handle(), name.c_str());
    if (verify) stream_.set_verify_callback(ssl::host_name_verification(name));
  }

  beast::tcp_stream& lowest() override { return beast::get_lowest_layer(stream_); }
  bool tls() const override { return true; }
  ssl_st* tls_handle() override { return stream_.native_handle(); }
  void read_some(asio::mutable_buffer buffer, AnyStream::IoHandler handler) override {
    stream_.async_read_some(buffer, std::move(handler));
  }
  void write_some(std::vector<asio::const_buffer> buffers, AnyStream::IoHandler handler) override {
    stream_.async_write_some(buffers, std::move(handler));
  }
  void handshake(AnyStream::Handler handler) override {
    stream_.async_handshake(role_ == AnyStream::Role::server ? ssl::stream_base::server : ssl::stream_base::client,
                            std::move(handler));
  }
  void shutdown(AnyStream::Handler handler) override { stream_.async_shutdown(std::move(handler)); }
  void teardown(beast::role_type role, AnyStream::Handler handler) override {
    async_teardown(role, stream_, std::move(handler));  // Beast's, for ssl_stream (ADL)
  }

 private:
  beast::ssl_stream<beast::tcp_stream> stream_;
  AnyStream::Role role_;
};

}  // namespace

AnyStream::AnyStream(beast::tcp_stream stream) : impl_(std::make_unique<PlainStream>(std::move(stream))) {}

AnyStream::AnyStream(beast::tcp_stream stream, ssl::context& context, Role role, const std::string& server_name) {
  auto tls = std::make_unique<TlsStream>(std::move(stream), context, role);
  if (role == Role::client && !server_name.empty()) {
    tls->set_server_name(server_name, SSL_CTX_get_verify_mode(context.native_handle()) != SSL_VERIFY_NONE);
  }
  impl_ = std::move(tls);
}

void teardown(beast::role_type, AnyStream& stream, error_code& ec) {
  ec = {};
  stream.lowest_layer().close();
}

void beast_close_socket(AnyStream& stream) { stream.lowest_layer().close(); }

AnyStream::~AnyStream() = default;
AnyStream::AnyStream(AnyStream&&) noexcept = default;
AnyStream& AnyStream::operator=(AnyStream&&) noexcept = default;

}  // namespace net::detail
