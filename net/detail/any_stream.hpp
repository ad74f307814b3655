// net/detail/any_stream.hpp (private to net/, included by net/*.cpp only): a type-erased byte
// stream, plain TCP or TLS over TCP.
//
// The HTTP session code, the client and Beast's HTTP algorithms run on AnyStream, so they are
// compiled once instead of once per stream type (the TLS instantiation was a third of
// server.cpp's compile time); the concrete streams are compiled once, in any_stream.cpp.
// The WebSocket code uses websocket::stream<AnyStream> the same way, through the
// teardown()/async_teardown()/beast_close_socket() overloads below (found by ADL).
//
// Threading: like the streams it wraps, an AnyStream is used from one strand at a time.
// Completion handlers are never invoked inline; they run on their associated executor.
#pragma once

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/beast/core/role.hpp>
#include <boost/beast/core/tcp_stream.hpp>

#include <memory>
#include <string>
#include <vector>

namespace boost::asio::ssl {
class context;
}
struct ssl_st;  // OpenSSL's SSL

namespace net::detail {

// A completion handler with its type erased. It carries the original handler's executor as an
// any_io_executor (Asio 1.81's any_completion_executor cannot be required to be
// blocking.never, which beast::basic_stream's post() needs) and forwards its cancellation slot.
template <class Signature>
class ErasedHandler {
 public:
  using executor_type = boost::asio::any_io_executor;
  using cancellation_slot_type = boost::asio::cancellation_slot;

  template <class Handler>
  ErasedHandler(Handler&& handler, const executor_type& fallback)
      : executor_(boost::asio::get_associated_executor(handler, fallback)), handler_(std::forward<Handler>(handler)) {}

  executor_type get_executor() const noexcept { return executor_; }
  cancellation_slot_type get_cancellation_slot() const noexcept { return handler_.get_cancellation_slot(); }

  template <class... Args>
  void operator()(Args&&... args) {
    std::move(handler_)(std::forward<Args>(args)...);
  }

 private:
  executor_type executor_;
  boost::asio::any_completion_handler<Signature> handler_;
};

class AnyStream {
 public:
  using executor_type = boost::asio::any_io_executor;
  using IoHandler = ErasedHandler<void(boost::system::error_code, std::size_t)>;
  using Handler = ErasedHandler<void(boost::system::error_code)>;
  enum class Role { client, server };

  // The concrete stream (any_stream.cpp).
  struct Impl {
    virtual ~Impl() = default;
    virtual boost::beast::tcp_stream& lowest() = 0;
    virtual bool tls() const = 0;
    virtual ssl_st* tls_handle() = 0;
    virtual void read_some(boost::asio::mutable_buffer buffer, IoHandler handler) = 0;
    virtual void write_some(std::vector<boost::asio::const_buffer> buffers, IoHandler handler) = 0;
    virtual void handshake(Handler handler) = 0;
    virtual void shutdown(Handler handler) = 0;
    virtual void teardown(boost::beast::role_type role, Handler handler) = 0;
  };

  // Plain TCP.
  explicit AnyStream(boost::beast::tcp_stream stream);
  // TLS over `stream`; `context` must outlive the stream. Client role: `server_name` is sent as
  // SNI (unless it is an IP address) and checked against the certificate when the context
  // verifies peers.
  AnyStream(boost::beast::tcp_stream stream, boost::asio::ssl::context& context, Role role,
            const std::string& server_name = {});
  ~AnyStream();
  AnyStream(AnyStream&&) noexcept;
  AnyStream& operator=(AnyStream&&) noexcept;

  executor_type get_executor() { return impl_->lowest().get_executor(); }
  // The TCP layer: expires_after()/expires_at() for timeouts, close() and cancel().
  boost::beast::tcp_stream& lowest_layer() { return impl_->lowest(); }
  bool tls() const { return impl_->tls(); }
  // The OpenSSL connection (peer certificate, verify result); null for plain TCP.
  ssl_st* tls_handle() { return impl_->tls_handle(); }

  // AsyncReadStream / AsyncWriteStream.
  template <class MutableBufferSequence, class Token>
  auto async_read_some(const MutableBufferSequence& buffers, Token&& token) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code, std::size_t)>(
        [](auto handler, Impl* impl, boost::asio::mutable_buffer b) {
          impl->read_some(b, IoHandler(std::move(handler), impl->lowest().get_executor()));
        },
        token, impl_.get(), first_buffer(buffers));
  }
  template <class ConstBufferSequence, class Token>
  auto async_write_some(const ConstBufferSequence& buffers, Token&& token) {
    std::vector<boost::asio::const_buffer> list;
    for (auto it = boost::asio::buffer_sequence_begin(buffers); it != boost::asio::buffer_sequence_end(buffers); ++it) {
      boost::asio::const_buffer b(*it);
      if (b.size() != 0) list.push_back(b);
    }
    return boost::asio::async_initiate<Token, void(boost::system::error_code, std::size_t)>(
        [](auto handler, Impl* impl, std::vector<boost::asio::const_buffer> buffer_list) {
          impl->write_some(std::move(buffer_list), IoHandler(std::move(handler), impl->lowest().get_executor()));
        },
        token, impl_.get(), std::move(list));
  }

  // TLS: the handshake in this stream's role. Plain: completes at once.
  template <class Token>
  auto async_handshake(Token&& token) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code)>(
        [](auto handler, Impl* impl) { impl->handshake(Handler(std::move(handler), impl->lowest().get_executor())); },
        token, impl_.get());
  }
  // TLS: sends close_notify and waits for the peer's (bounded by the lowest layer's expiry).
  // Plain: shuts down the sending side (FIN).
  template <class Token>
  auto async_shutdown(Token&& token) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code)>(
        [](auto handler, Impl* impl) { impl->shutdown(Handler(std::move(handler), impl->lowest().get_executor())); },
        token, impl_.get());
  }
  // The end of a WebSocket close handshake (what Beast's teardown does for the concrete
  // streams): TLS: close_notify; plain: FIN, then read until the peer closes, then close.
  template <class Token>
  auto async_teardown(boost::beast::role_type role, Token&& token) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code)>(
        [](auto handler, Impl* impl, boost::beast::role_type r) {
          impl->teardown(r, Handler(std::move(handler), impl->lowest().get_executor()));
        },
        token, impl_.get(), role);
  }

 private:
  template <class MutableBufferSequence>
  static boost::asio::mutable_buffer first_buffer(const MutableBufferSequence& buffers) {
    for (auto it = boost::asio::buffer_sequence_begin(buffers); it != boost::asio::buffer_sequence_end(buffers); ++it) {
      boost::asio::mutable_buffer b(*it);
      if (b.size() != 0) return b;
    }
    return {};
  }

  std::unique_ptr<Impl> impl_;
};

// For boost::beast::websocket::stream<AnyStream>, found by argument-dependent lookup: the close
// handshake's teardown, and closing the socket (Beast's timeouts).
template <class TeardownHandler>
void async_teardown(boost::beast::role_type role, AnyStream& stream, TeardownHandler&& handler) {
  stream.async_teardown(role, std::forward<TeardownHandler>(handler));
}
// The blocking variant (never used: the net code is asynchronous): closes the socket.
void teardown(boost::beast::role_type role, AnyStream& stream, boost::system::error_code& ec);
void beast_close_socket(AnyStream& stream);

}  // namespace net::detail
