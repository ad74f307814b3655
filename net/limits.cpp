// net/limits.cpp: the descriptor limit and the connection caps fitted into it (see server.hpp,
// raise_descriptor_limit and fit_connection_caps; docs/configuration.md "Connection limits").
#include "net/server.hpp"

#include <sys/resource.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>

namespace net {
namespace {

std::size_t as_size(rlim_t v) {
  if (v == RLIM_INFINITY || v > std::numeric_limits<std::size_t>::max()) return std::numeric_limits<std::size_t>::max();
  return static_cast<std::size_t>(v);
}

// The kernel's ceiling for RLIMIT_NOFILE (fs.nr_open); 1048576 (its usual value) when unreadable.
rlim_t nr_open() {
  std::ifstream in("/proc/sys/fs/nr_open");
  unsigned long long n = 0;
  if (in >> n && n > 0) return static_cast<rlim_t>(n);
  return 1048576;
}

std::string cap_text(std::size_t cap) { return cap == 0 ? std::string("no cap") : std::to_string(cap); }

}  // namespace

DescriptorLimit raise_descriptor_limit() {
  DescriptorLimit r;
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0) {
    r.error = std::string("getrlimit: ") + std::strerror(errno);
    return r;
  }
  r.before = as_size(rl.rlim_cur);
  r.hard = as_size(rl.rlim_max);
  const rlim_t target = rl.rlim_max == RLIM_INFINITY ? nr_open() : rl.rlim_max;
  if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < target) {
    rlimit want = rl;
    want.rlim_cur = target;
    if (::setrlimit(RLIMIT_NOFILE, &want) == 0)
      rl.rlim_cur = target;
    else
      r.error = std::string("setrlimit: ") + std::strerror(errno);
  }
  r.soft = as_size(rl.rlim_cur);
  return r;
}

ConnectionBudget fit_connection_caps(std::size_t descriptors, std::size_t reserve,
                                     std::vector<ListenerOptions*> listeners) {
  ConnectionBudget b;
  b.descriptors = descriptors;
  b.reserve = std::min(reserve, descriptors / 4);
  std::size_t left = descriptors - b.reserve;
  const auto why = [&] {
    return " to fit the descriptor limit (" + std::to_string(descriptors) + ", of which " + std::to_string(b.reserve) +
           " are kept for the database, logs and outgoing connections)";
  };
  const auto lower = [&](ListenerOptions& l, std::size_t& value, std::size_t to, const char* key) {
    if (value != 0 && value <= to) return;
    b.adjustments.push_back(l.name + " listener: " + key + " " + cap_text(value) + " lowered to " + std::to_string(to) +
                            why());
    value = to;
  };
  // First the reserved listeners' own connections ...
  for (ListenerOptions* l : listeners) {
    if (!l->reserved) continue;
    lower(*l, l->max_connections, std::max<std::size_t>(left / 4, 1), "max_connections");
    left -= std::min(left, l->max_connections);
  }
  // ... and the over-limit bands, which hold descriptors outside the shared limit ...
  for (ListenerOptions* l : listeners) {
    if (l->over_limit_connections == 0) continue;
    lower(*l, l->over_limit_connections, left / 16, "over_limit_connections");
    left -= l->over_limit_connections;
  }
  // ... the rest is shared by the other listeners, none of which may hold more than all of it.
  b.shared_limit = std::max<std::size_t>(left, 1);
  for (ListenerOptions* l : listeners) {
    if (!l->reserved) lower(*l, l->max_connections, b.shared_limit, "max_connections");
  }
  return b;
}

}  // namespace net
