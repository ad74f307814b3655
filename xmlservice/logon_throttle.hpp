// xmlservice/logon_throttle.hpp: failed logons per source address, so one client cannot spend the
// broker's CPU on password hashes (or guess passwords) at will. Each source has a bucket of
// `failures_per_minute` tokens that refills at that rate; a failed password check takes one; a
// source with less than one token left is throttled: its password logons are refused before the
// directory is consulted (the XML service answers `service-unavailable`) until the bucket refills.
// So a source gets a burst of N failures, then one more every 60/N seconds. Successful logons and
// requests without a password are never counted or refused here. docs/nfuse.md, "Failed logons
// per address".
//
// The source of a request (source_of): the peer's address; for a request from a trusted front end
// (an address in the site's trusted_front_ends) that names the user's ClientAddress, that
// address, so one user's typos behind StoreFront do not throttle everyone behind it. IPv6
// addresses count by their /64 network (one host usually holds a whole /64).
//
// Bounded: at most `max_sources` sources are tracked (about 100 bytes each); when that is
// reached, the sources that are not throttled are forgotten, and if every tracked source is
// throttled a new source is not tracked (the throttled ones stay throttled).
//
// Threading: thread-safe (one mutex, held briefly).
#pragma once

#include <cstddef>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

namespace common {
class Clock;
}

namespace xmlservice {

class LogonThrottle {
 public:
  // `failures_per_minute` 0: no throttling. `clock` must outlive the throttle.
  LogonThrottle(int failures_per_minute, std::size_t max_sources, const common::Clock& clock);

  // False when `source` has used up its failures: refuse its password logon.
  bool allowed(const std::string& source);
  // Counts one failed password check of `source`.
  void failed(const std::string& source);

  std::size_t tracked() const;

  // The source a request is counted under (see the file comment). `trusted_front_end`: the peer
  // is in the site's trusted_front_ends; `client_address`: the request's ClientAddress, or empty.
  static std::string source_of(std::string_view peer, bool trusted_front_end, std::string_view client_address);

 private:
  struct Bucket {
    double tokens = 0;
    double at = 0;  // seconds since the clock's epoch when `tokens` was computed
  };
  double now_seconds() const;
  // Requires mutex_: the bucket's tokens at `now` (refilled, capped at the rate).
  double refill_locked(Bucket& b, double now) const;

  const double rate_;  // failures per minute; 0: off
  const std::size_t max_sources_;
  const common::Clock& clock_;
  mutable std::mutex mutex_;
  std::unordered_map<std::string, Bucket> buckets_;  // guarded by mutex_
};

}  // namespace xmlservice
