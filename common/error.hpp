// common/error.hpp: errors as values across module boundaries.
//
// Every module reports failures as a common::Error: a code from common::errc (the class of
// failure, which each endpoint maps to its own reply: HTTP status, NFuse ErrorId, CBP reason),
// a human-readable message that is safe to show to the caller, and optionally the field
// (config key, JSON member) the message is about.
#pragma once

#include <boost/system/result.hpp>

#include <ostream>
#include <string>
#include <system_error>
#include <utility>

namespace common {

enum class errc {
  ok = 0,
  invalid_argument = 1,  // the caller sent something malformed or out of range
  not_found,             // the named object does not exist
  conflict,              // duplicate name, object still in use, owned by the config file
  unauthorized,          // missing or wrong credentials
  forbidden,             // authenticated, but not allowed
  unavailable,           // storage closed, shutting down
  storage_error,         // the database failed (I/O, corruption, busy beyond the timeout)
  incompatible,          // e.g. database written by a newer version
  internal,              // a bug
};

const std::error_category& error_category() noexcept;
inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), error_category()}; }

struct Error {
  errc code = errc::internal;
  std::string message;
  std::string field;  // optional: which field / key the message is about

  Error() = default;
  Error(errc c, std::string msg, std::string fld = {})
      : code(c), message(std::move(msg)), field(std::move(fld)) {}

  // "field: message" or just "message".
  std::string describe() const { return field.empty() ? message : field + ": " + message; }
};

inline std::ostream& operator<<(std::ostream& os, const Error& e) { return os << e.describe(); }

// Thrown by result<T>::value() on an error; only for start-up code and tests.
struct ErrorException : std::runtime_error {
  Error error;
  explicit ErrorException(Error e) : std::runtime_error(e.describe()), error(std::move(e)) {}
};

[[noreturn]] void throw_exception_from_error(const Error& e, const boost::source_location& loc);

template <class T>
using Result = boost::system::result<T, Error>;
using Status = boost::system::result<void, Error>;

inline Error make_error(errc c, std::string msg, std::string field = {}) {
  return Error(c, std::move(msg), std::move(field));
}

}  // namespace common

template <>
struct std::is_error_code_enum<common::errc> : std::true_type {};
