#include "common/error.hpp"

namespace common {
namespace {
class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "openbroker"; }
  std::string message(int c) const override {
    switch (static_cast<errc>(c)) {
      case errc::ok: return "ok";
      case errc::invalid_argument: return "invalid argument";
      case errc::not_found: return "not found";
      case errc::conflict: return "conflict";
      case errc::unauthorized: return "unauthorized";
      case errc::forbidden: return "forbidden";
      case errc::unavailable: return "unavailable";
      case errc::storage_error: return "storage error";
      case errc::incompatible: return "incompatible";
      case errc::internal: return "internal error";
    }
    return "unknown error";
  }
};
}  // namespace

const std::error_category& error_category() noexcept {
  static const Category category;
  return category;
}

void throw_exception_from_error(const Error& e, const boost::source_location&) { throw ErrorException(e); }

}  // namespace common
