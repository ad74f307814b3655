#include "xmlservice/logon_throttle.hpp"

#include "common/address.hpp"
#include "common/clock.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <iterator>

namespace xmlservice {

LogonThrottle::LogonThrottle(int failures_per_minute, std::size_t max_sources, const common::Clock& clock)
    : rate_(std::max(0, failures_per_minute)), max_sources_(std::max<std::size_t>(1, max_sources)), clock_(clock) {}

double LogonThrottle::now_seconds() const {
  return std::chrono::duration<double>(clock_.now().time_since_epoch()).count();
}

double LogonThrottle::refill_locked(Bucket& b, double now) const {
  if (now > b.at) {
    b.tokens = std::min(rate_, b.tokens + (now - b.at) * rate_ / 60.0);
    b.at = now;
  }
  return b.tokens;
}

bool LogonThrottle::allowed(const std::string& source) {
  if (rate_ <= 0) return true;
  std::lock_guard lock(mutex_);
  auto it = buckets_.find(source);
  if (it == buckets_.end()) return true;
  if (refill_locked(it->second, now_seconds()) >= 1.0) return true;
  return false;
}

void LogonThrottle::failed(const std::string& source) {
  if (rate_ <= 0) return;
  const double now = now_seconds();
  std::lock_guard lock(mutex_);
  auto it = buckets_.find(source);
  if (it == buckets_.end()) {
    if (buckets_.size() >= max_sources_) {
      for (auto b = buckets_.begin(); b != buckets_.end();)
        b = refill_locked(b->second, now) >= 1.0 ? buckets_.erase(b) : std::next(b);
      if (buckets_.size() >= max_sources_) return;  // all throttled: they stay so; this one is not tracked
    }
    it = buckets_.emplace(source, Bucket{rate_, now}).first;
  }
  Bucket& b = it->second;
  refill_locked(b, now);
  b.tokens = std::max(0.0, b.tokens - 1.0);
}

std::size_t LogonThrottle::tracked() const {
  std::lock_guard lock(mutex_);
  return buckets_.size();
}

std::string LogonThrottle::source_of(std::string_view peer, bool trusted_front_end, std::string_view client_address) {
  std::string_view source = peer;
  if (trusted_front_end && common::is_ip_address(client_address)) source = client_address;
  // IPv6 (not IPv4-mapped): the /64 network.
  if (source.find(':') != std::string_view::npos && source.size() <= 45) {
    const std::string text(source);
    std::array<unsigned char, 16> bytes{};
    static constexpr unsigned char kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (inet_pton(AF_INET6, text.c_str(), bytes.data()) == 1 && std::memcmp(bytes.data(), kMapped, 12) != 0) {
      std::fill(bytes.begin() + 8, bytes.end(), 0);
      char out[INET6_ADDRSTRLEN];
      if (inet_ntop(AF_INET6, bytes.data(), out, sizeof out)) return std::string(out) + "/64";
    }
  }
  return std::string(source);
}

}  // namespace xmlservice
