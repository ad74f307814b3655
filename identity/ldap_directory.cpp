// identity/ldap_directory.cpp: the LDAP backend (see ldap_directory.hpp for the contract).
//
// Everything LDAP goes through libldap's synchronous calls with timeouts; each call of the
// directory holds one pooled service-account connection (Conn) at a time, and a user's bind
// runs on a connection of its own that is closed right after.
#include "identity/ldap_directory.hpp"

#include "common/crypto.hpp"
#include "common/log.hpp"

#include <spdlog/spdlog.h>

#include <ldap.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <unordered_map>
#include <utility>

namespace identity {

namespace ldap_detail {

std::string sid_to_string(std::string_view b) {
  // revision (1), sub-authority count (1), identifier authority (6, big-endian), then count
  // sub-authorities of 4 bytes, little-endian.
  if (b.size() < 8) return {};
  const auto byte = [&](std::size_t i) { return static_cast<std::uint8_t>(b[i]); };
  const std::size_t count = byte(1);
  if (byte(0) != 1 || count > 15 || b.size() != 8 + 4 * count) return {};
  std::uint64_t authority = 0;
  for (std::size_t i = 2; i < 8; ++i) authority = (authority << 8) | byte(i);
  std::string out = "S-1-" + std::to_string(authority);
  for (std::size_t i = 0; i < count; ++i) {
    const std::size_t at = 8 + 4 * i;
    const std::uint32_t sub = static_cast<std::uint32_t>(byte(at)) | (static_cast<std::uint32_t>(byte(at + 1)) << 8) |
                              (static_cast<std::uint32_t>(byte(at + 2)) << 16) |
                              (static_cast<std::uint32_t>(byte(at + 3)) << 24);
    out += "-" + std::to_string(sub);
  }
  return out;
}

std::optional<std::string> sid_from_string(std::string_view text) {
  if (!is_sid(text)) return std::nullopt;
  std::vector<std::uint64_t> parts;
  std::string_view rest = text.substr(4);
  while (true) {
    const auto dash = rest.find('-');
    const std::string_view part = rest.substr(0, dash);
    if (part.empty() || part.size() > 15) return std::nullopt;
    std::uint64_t v = 0;
    for (char c : part) {
      if (c < '0' || c > '9') return std::nullopt;
      v = v * 10 + static_cast<std::uint64_t>(c - '0');
    }
    parts.push_back(v);
    if (dash == std::string_view::npos) break;
    rest.remove_prefix(dash + 1);
  }
  // parts[0]: authority, then the sub-authorities.
  if (parts.size() < 1 || parts.size() > 16 || parts[0] >= (std::uint64_t{1} << 48)) return std::nullopt;
  std::string out;
  out += static_cast<char>(1);
  out += static_cast<char>(parts.size() - 1);
  for (int i = 5; i >= 0; --i) out += static_cast<char>((parts[0] >> (8 * i)) & 0xff);
  for (std::size_t i = 1; i < parts.size(); ++i) {
    if (parts[i] > 0xffffffffu) return std::nullopt;
    for (int k = 0; k < 4; ++k) out += static_cast<char>((parts[i] >> (8 * k)) & 0xff);
  }
  return out;
}

std::string escape_filter_value(std::string_view value) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(value.size());
  for (char ch : value) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c >= 0x7f || c == '*' || c == '(' || c == ')' || c == '\\') {
      out += '\\';
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    } else {
      out += ch;
    }
  }
  return out;
}

unsigned ad_bind_reason(std::string_view diagnostic) {
  // "80090308: LdapErr: DSID-0C09042F, comment: AcceptSecurityContext error, data 775, v2580"
  const auto at = diagnostic.find("data ");
  if (at == std::string_view::npos) return 0;
  unsigned v = 0;
  std::size_t i = at + 5, digits = 0;
  for (; i < diagnostic.size() && digits < 8; ++i, ++digits) {
    const char c = diagnostic[i];
    int d;
    if (c >= '0' && c <= '9')
      d = c - '0';
    else if (c >= 'a' && c <= 'f')
      d = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F')
      d = c - 'A' + 10;
    else
      break;
    v = v * 16 + static_cast<unsigned>(d);
  }
  return digits ? v : 0;
}

common::SysTime from_filetime(std::int64_t filetime) {
  // 11644473600 s between 1601-01-01 and 1970-01-01.
  constexpr std::int64_t kEpochDiff = 116444736000000000;  // in 100 ns
  const std::int64_t unix100ns = filetime - kEpochDiff;
  return common::SysTime{} + std::chrono::duration_cast<common::SysTime::duration>(
                                 std::chrono::duration<std::int64_t, std::ratio<1, 10000000>>(unix100ns));
}

std::string first_rdn_value(std::string_view dn) {
  const auto eq = dn.find('=');
  if (eq == std::string_view::npos) return std::string(dn);
  std::string out;
  for (std::size_t i = eq + 1; i < dn.size(); ++i) {
    const char c = dn[i];
    if (c == '\\' && i + 1 < dn.size()) {
      out += dn[++i];
    } else if (c == ',' || c == '+') {
      break;
    } else {
      out += c;
    }
  }
  return out;
}

std::string escape_binary_filter_value(std::string_view bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 3);
  for (char ch : bytes) {
    const auto c = static_cast<unsigned char>(ch);
    out += '\\';
    out += kHex[c >> 4];
    out += kHex[c & 0xf];
  }
  return out;
}

std::string in_chain_filter(std::string_view group_filter, std::string_view member_attr, std::string_view user_dn) {
  // 1.2.840.113556.1.4.1941: LDAP_MATCHING_RULE_IN_CHAIN, AD's transitive DN match.
  std::string out = "(&";
  out += group_filter;
  out += '(';
  out += member_attr;
  out += ":1.2.840.113556.1.4.1941:=";
  out += escape_filter_value(user_dn);
  out += "))";
  return out;
}

std::string sids_filter(std::string_view group_filter, std::string_view sid_attr,
                        const std::vector<std::string>& binary_sids) {
  std::string out = "(&";
  out += group_filter;
  out += "(|";
  for (const auto& sid : binary_sids) {
    out += '(';
    out += sid_attr;
    out += '=';
    out += escape_binary_filter_value(sid);
    out += ')';
  }
  out += "))";
  return out;
}

}  // namespace ldap_detail

std::optional<GroupLookup> group_lookup_from_string(std::string_view text) {
  if (text == "member_of") return GroupLookup::member_of;
  if (text == "member") return GroupLookup::member;
  if (text == "in_chain") return GroupLookup::in_chain;
  if (text == "token_groups") return GroupLookup::token_groups;
  return std::nullopt;
}

namespace {

using common::errc;
using common::Error;
using common::SysTime;
using namespace ldap_detail;

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return out;
}

bool ci_less(const std::string& a, const std::string& b) {
  return std::lexicographical_compare(a.begin(), a.end(), b.begin(), b.end(), [](char x, char y) {
    const auto f = [](char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; };
    return f(x) < f(y);
  });
}

timeval to_timeval(std::chrono::milliseconds ms) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(ms.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((ms.count() % 1000) * 1000);
  return tv;
}

// A failure of the connection or the server rather than an answer about the request.
bool connection_error(int rc) {
  return rc == LDAP_SERVER_DOWN || rc == LDAP_TIMEOUT || rc == LDAP_CONNECT_ERROR || rc == LDAP_UNAVAILABLE ||
         rc == LDAP_BUSY || rc == LDAP_LOCAL_ERROR || rc == LDAP_ENCODING_ERROR || rc == LDAP_DECODING_ERROR ||
         rc == LDAP_NO_MEMORY;
}

std::string diagnostic(LDAP* ld) {
  char* msg = nullptr;
  std::string out;
  if (ld && ldap_get_option(ld, LDAP_OPT_DIAGNOSTIC_MESSAGE, &msg) == LDAP_OPT_SUCCESS && msg) {
    out = msg;
    ldap_memfree(msg);
  }
  return out;
}

std::string describe(int rc, const std::string& diag) {
  std::string out = ldap_err2string(rc);
  if (!diag.empty()) out += " (" + diag + ")";
  return out;
}

struct Handle {
  LDAP* ld = nullptr;
  Handle() = default;
  explicit Handle(LDAP* l) : ld(l) {}
  Handle(Handle&& o) noexcept : ld(std::exchange(o.ld, nullptr)) {}
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      reset();
      ld = std::exchange(o.ld, nullptr);
    }
    return *this;
  }
  ~Handle() { reset(); }
  void reset() {
    if (ld) ldap_unbind_ext_s(ld, nullptr, nullptr);
    ld = nullptr;
  }
};

// One entry of a search: its DN and attributes (names in lower case).
struct LdapEntry {
  std::string dn;
  std::map<std::string, std::vector<std::string>> attrs;
  const std::vector<std::string>* values(const std::string& attr) const {
    if (attr.empty()) return nullptr;
    auto it = attrs.find(lower(attr));
    return it == attrs.end() || it->second.empty() ? nullptr : &it->second;
  }
  std::string first(const std::string& attr) const {
    const auto* v = values(attr);
    return v ? v->front() : std::string();
  }
  std::optional<std::int64_t> integer(const std::string& attr) const {
    const auto* v = values(attr);
    if (!v) return std::nullopt;
    try {
      return std::stoll(v->front());
    } catch (const std::exception&) {
      return std::nullopt;
    }
  }
};

struct OpResult {
  int rc = LDAP_SUCCESS;
  std::string diag;
};

struct MessageGuard {
  LDAPMessage* m = nullptr;
  ~MessageGuard() {
    if (m) ldap_msgfree(m);
  }
};

}  // namespace

std::optional<LdapDirectoryOptions> ldap_profile(std::string_view profile) {
  LdapDirectoryOptions o;
  if (profile == "ad") return o;
  if (profile != "openldap") return std::nullopt;
  o.user_filter = "(objectClass=inetOrgPerson)";
  o.group_filter = "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))";
  o.attributes.account_name = "uid";
  o.attributes.upn = "";
  o.attributes.sid = "";
  o.attributes.member_of = "memberOf";
  o.attributes.member = "member";
  o.attributes.group_name = "cn";
  o.attributes.display_name = "displayName";
  o.attributes.mail = "mail";
  o.attributes.user_account_control = "";
  o.attributes.pwd_last_set = "";
  o.attributes.account_expires = "";
  o.attributes.lockout_time = "";
  o.group_lookup = GroupLookup::member;
  return o;
}

struct LdapDirectory::Impl {
  // A user entry as the directory reads it.
  struct User {
    std::string dn;
    UserIdentity identity;               // groups not yet filled in
    std::vector<std::string> member_of;  // DNs
    bool disabled = false, locked = false, expired = false, must_change = false;
  };
  struct Cached {
    User user;  // with groups
    SysTime fetched;
  };
  struct Group {
    std::string name, sid;
    std::vector<std::string> parents;  // DNs of the groups this one is in
    SysTime fetched;
    bool found = true;
  };
  struct Credential {
    std::string user_key;  // key into identities_
    SysTime verified;
  };

  LdapDirectoryOptions o;
  common::Clock& clock;
  std::shared_ptr<spdlog::logger> log;
  const std::string cache_key = common::crypto::random_hex(32);

  // The pool. Conn slots with a null handle are connected on use.
  std::mutex pool_mutex;
  std::condition_variable pool_cv;
  std::vector<Handle> idle;  // guarded by pool_mutex
  std::size_t open = 0;      // guarded by pool_mutex: handles out of the pool plus idle ones

  mutable std::mutex state_mutex;
  LdapState state;                       // guarded by state_mutex
  std::size_t preferred = 0;             // guarded by state_mutex: index of the server last reached
  SysTime retry_at{};                    // guarded by state_mutex: no new connection before
  std::chrono::milliseconds backoff{0};  // guarded by state_mutex

  mutable std::mutex cache_mutex;
  std::unordered_map<std::string, Cached> identities;  // guarded by cache_mutex; key: name form
  // guarded by cache_mutex; key: a lower DN (member_of), or "group:", "parents:", "chain:",
  // "token:" and a lower DN, or "sid:" and a lower SID.
  std::unordered_map<std::string, Group> groups;
  std::unordered_map<std::string, Credential> credentials;  // guarded by cache_mutex; key: HMAC hex

  Impl(LdapDirectoryOptions opts, common::Clock& c) : o(std::move(opts)), clock(c) {
    log = o.log ? o.log : common::null_logger();
    if (o.pool_size == 0) o.pool_size = 1;
    if (o.metrics) {
      o.metrics->describe("broker_directory_up", common::Metrics::Type::gauge,
                          "1 when the LDAP directory answered the last connection attempt, else 0");
      o.metrics->describe("broker_directory_connection_failures_total", common::Metrics::Type::counter,
                          "Failed attempts to connect to (or bind at) an LDAP server");
      o.metrics->describe("broker_directory_cached_logons_total", common::Metrics::Type::counter,
                          "Logons let in from the cache while the directory was unreachable");
      o.metrics->set("broker_directory_up", {}, 1);
    }
  }

  // ---- connections ----------------------------------------------------------------------

  // A handle for `uri` with the options set (and StartTLS done); not bound.
  Result<Handle> connect_to(const std::string& uri) {
    LDAP* raw = nullptr;
    int rc = ldap_initialize(&raw, uri.c_str());
    if (rc != LDAP_SUCCESS || !raw) return Error(errc::unavailable, uri + ": " + describe(rc, {}));
    Handle h(raw);
    int version = LDAP_VERSION3;
    ldap_set_option(h.ld, LDAP_OPT_PROTOCOL_VERSION, &version);
    ldap_set_option(h.ld, LDAP_OPT_REFERRALS, LDAP_OPT_OFF);
    timeval nt = to_timeval(o.network_timeout), ot = to_timeval(o.operation_timeout);
    ldap_set_option(h.ld, LDAP_OPT_NETWORK_TIMEOUT, &nt);
    ldap_set_option(h.ld, LDAP_OPT_TIMEOUT, &ot);
    int require = o.verify_certificates ? LDAP_OPT_X_TLS_DEMAND : LDAP_OPT_X_TLS_NEVER;
    ldap_set_option(h.ld, LDAP_OPT_X_TLS_REQUIRE_CERT, &require);
    if (!o.ca_file.empty()) ldap_set_option(h.ld, LDAP_OPT_X_TLS_CACERTFILE, o.ca_file.c_str());
    int is_server = 0;
    ldap_set_option(h.ld, LDAP_OPT_X_TLS_NEWCTX, &is_server);
    if (o.start_tls && lower(uri).rfind("ldap://", 0) == 0) {
      rc = ldap_start_tls_s(h.ld, nullptr, nullptr);
      if (rc != LDAP_SUCCESS) return Error(errc::unavailable, uri + ": StartTLS: " + describe(rc, diagnostic(h.ld)));
    }
    return h;
  }

  static OpResult simple_bind(LDAP* ld, const std::string& dn, const std::string& password, LDAPControl** sctrls,
                              LDAPControl*** rctrls, std::chrono::milliseconds timeout) {
    berval cred;
    cred.bv_val = const_cast<char*>(password.data());
    cred.bv_len = password.size();
    int msgid = 0;
    int rc = ldap_sasl_bind(ld, dn.c_str(), LDAP_SASL_SIMPLE, &cred, sctrls, nullptr, &msgid);
    if (rc != LDAP_SUCCESS) return {rc, diagnostic(ld)};
    timeval tv = to_timeval(timeout);
    MessageGuard res;
    rc = ldap_result(ld, msgid, LDAP_MSG_ALL, &tv, &res.m);
    if (rc == 0) return {LDAP_TIMEOUT, "no answer to the bind in time"};
    if (rc < 0) {
      int err = LDAP_SERVER_DOWN;
      ldap_get_option(ld, LDAP_OPT_RESULT_CODE, &err);
      return {err, diagnostic(ld)};
    }
    int result = LDAP_SUCCESS;
    char* diag = nullptr;
    rc = ldap_parse_result(ld, res.m, &result, nullptr, &diag, nullptr, rctrls, 0);
    OpResult out{rc == LDAP_SUCCESS ? result : rc, diag ? std::string(diag) : std::string()};
    if (diag) ldap_memfree(diag);
    return out;
  }

  void note_reachable(const std::string& uri, std::size_t index) {
    std::lock_guard lock(state_mutex);
    preferred = index;
    backoff = std::chrono::milliseconds(0);
    retry_at = {};
    state.server = uri;
    if (!state.reachable) {
      state.reachable = true;
      state.since = clock.now();
      log->warn("directory: reachable again via {}", uri);
    }
    if (o.metrics) o.metrics->set("broker_directory_up", {}, 1);
  }

  void note_unreachable(const std::string& error) {
    std::lock_guard lock(state_mutex);
    ++state.failures;
    state.last_error = error;
    backoff = backoff.count() == 0 ? o.reconnect_min : std::min(backoff * 2, o.reconnect_max);
    retry_at = clock.now() + backoff;
    if (state.reachable) {
      state.reachable = false;
      state.since = clock.now();
      log->error("directory: unreachable: {} (retrying in {} ms)", error, backoff.count());
    }
    if (o.metrics) {
      o.metrics->set("broker_directory_up", {}, 0);
      o.metrics->add("broker_directory_connection_failures_total", {});
    }
  }

  // errc::unavailable while in back-off after every server failed.
  Status may_connect() {
    std::lock_guard lock(state_mutex);
    if (!state.reachable && clock.now() < retry_at)
      return Error(errc::unavailable, "directory unreachable: " + state.last_error);
    return {};
  }

  // The servers in the order to try: the one last reached first, then the configured order.
  std::vector<std::size_t> server_order() {
    std::vector<std::size_t> order;
    std::size_t first;
    {
      std::lock_guard lock(state_mutex);
      first = preferred < o.servers.size() ? preferred : 0;
    }
    order.push_back(first);
    for (std::size_t i = 0; i < o.servers.size(); ++i)
      if (i != first) order.push_back(i);
    return order;
  }

  // A connection bound as the service account, failing over through the servers.
  Result<Handle> service_connection() {
    if (auto ok = may_connect(); !ok) return ok.error();
    if (o.servers.empty()) return Error(errc::unavailable, "no LDAP servers configured");
    std::string errors;
    // Always from the first server: a server earlier in the list is preferred once it is back.
    for (std::size_t i = 0; i < o.servers.size(); ++i) {
      const std::string& uri = o.servers[i];
      auto h = connect_to(uri);
      if (!h) {
        errors += (errors.empty() ? "" : "; ") + h.error().message;
        continue;
      }
      if (!o.bind_dn.empty()) {
        OpResult r = simple_bind(h->ld, o.bind_dn, o.bind_password, nullptr, nullptr, o.operation_timeout);
        if (r.rc != LDAP_SUCCESS) {
          errors += (errors.empty() ? "" : "; ") + uri + ": service account bind: " + describe(r.rc, r.diag);
          continue;
        }
      }
      note_reachable(uri, i);
      return std::move(*h);
    }
    note_unreachable(errors);
    return Error(errc::unavailable, "directory unreachable: " + errors);
  }

  Result<Handle> acquire() {
    {
      std::unique_lock lock(pool_mutex);
      const bool got = pool_cv.wait_for(lock, o.operation_timeout, [&] { return !idle.empty() || open < o.pool_size; });
      if (!got)
        return Error(errc::unavailable, "all " + std::to_string(o.pool_size) + " directory connections are busy");
      if (!idle.empty()) {
        Handle h = std::move(idle.back());
        idle.pop_back();
        return h;
      }
      ++open;
    }
    auto h = service_connection();
    if (!h) release(Handle{}, true);
    return h;
  }

  // Gives a connection back; `broken`: it is closed (the slot is made again on next use).
  void release(Handle h, bool broken) {
    if (broken) h.reset();
    std::lock_guard lock(pool_mutex);
    if (broken) {
      --open;
    } else {
      idle.push_back(std::move(h));
    }
    pool_cv.notify_one();
  }

  // Closes the idle connections (their slots are made again on next use).
  void drop_idle() {
    std::vector<Handle> dropped;
    {
      std::lock_guard lock(pool_mutex);
      open -= idle.size();
      dropped.swap(idle);
      pool_cv.notify_all();
    }
    // `dropped` unbinds here, outside the lock.
  }

  // Runs fn(ld) on a pooled connection; when it fails for the connection's sake, once more on a
  // new one (which may be another server). fn returns an OpResult.
  template <class Fn>
  Status with_connection(Fn&& fn) {
    for (int attempt = 0; attempt < 2; ++attempt) {
      auto h = acquire();
      if (!h) return h.error();
      OpResult r = fn(h->ld);
      if (!connection_error(r.rc)) {
        release(std::move(*h), false);
        if (r.rc == LDAP_SUCCESS) return {};
        return Error(errc::storage_error, "directory: " + describe(r.rc, r.diag));
      }
      release(std::move(*h), true);
      drop_idle();  // made before the failure, likely dead too: the retry gets a new connection
      if (attempt == 1) {
        note_unreachable(describe(r.rc, r.diag));
        return Error(errc::unavailable, "directory unreachable: " + describe(r.rc, r.diag));
      }
    }
    return Error(errc::internal, "unreachable");
  }

  // ---- searches --------------------------------------------------------------------------

  OpResult search(LDAP* ld, const std::string& base, int scope, const std::string& filter,
                  const std::vector<std::string>& attrs, int size_limit, std::vector<LdapEntry>& out) {
    std::vector<char*> names;
    for (const auto& a : attrs)
      if (!a.empty()) names.push_back(const_cast<char*>(a.c_str()));
    names.push_back(nullptr);
    timeval tv = to_timeval(o.operation_timeout);
    MessageGuard res;
    int rc = ldap_search_ext_s(ld, base.c_str(), scope, filter.c_str(), names.data(), 0, nullptr, nullptr, &tv,
                               size_limit, &res.m);
    if (rc != LDAP_SUCCESS && rc != LDAP_SIZELIMIT_EXCEEDED && rc != LDAP_NO_SUCH_OBJECT) return {rc, diagnostic(ld)};
    if (!res.m) return {};
    for (LDAPMessage* e = ldap_first_entry(ld, res.m); e; e = ldap_next_entry(ld, e)) {
      LdapEntry entry;
      if (char* dn = ldap_get_dn(ld, e)) {
        entry.dn = dn;
        ldap_memfree(dn);
      }
      BerElement* ber = nullptr;
      for (char* a = ldap_first_attribute(ld, e, &ber); a; a = ldap_next_attribute(ld, e, ber)) {
        auto& vals = entry.attrs[lower(a)];
        if (berval** bv = ldap_get_values_len(ld, e, a)) {
          for (int i = 0; bv[i]; ++i) vals.emplace_back(bv[i]->bv_val, bv[i]->bv_len);
          ldap_value_free_len(bv);
        }
        ldap_memfree(a);
      }
      if (ber) ber_free(ber, 0);
      out.push_back(std::move(entry));
    }
    return {};
  }

  std::vector<std::string> user_attributes() const {
    const auto& a = o.attributes;
    return {a.account_name,
            a.upn,
            a.sid,
            a.member_of,
            a.display_name,
            a.mail,
            a.user_account_control,
            a.pwd_last_set,
            a.account_expires,
            a.lockout_time,
            "pwdReset",
            "pwdAccountLockedTime"};
  }

  // The filter that finds `name`, or nullopt when the name cannot be one of ours.
  std::optional<std::string> user_filter(const AccountName& name, bool allow_sid) const {
    const auto& a = o.attributes;
    std::string clause;
    if (allow_sid && name.domain.empty() && is_sid(name.name)) {
      if (a.sid.empty()) return std::nullopt;
      auto binary = sid_from_string(name.name);
      if (!binary) return std::nullopt;
      clause = "(" + a.sid + "=" + escape_binary_filter_value(*binary) + ")";
    } else if (name.upn) {
      if (a.upn.empty()) {
        // No UPN attribute: user@domain means the account name, when the suffix is ours... we
        // cannot know the suffixes, so treat the part before @ as nothing.
        return std::nullopt;
      }
      clause = "(" + a.upn + "=" + escape_filter_value(name.name) + ")";
    } else {
      if (!name.domain.empty() && !iequals(name.domain, o.domain)) return std::nullopt;
      clause = "(" + a.account_name + "=" + escape_filter_value(name.name) + ")";
    }
    if (name.name.empty()) return std::nullopt;
    return "(&" + o.user_filter + clause + ")";
  }

  User read_user(const LdapEntry& e) const {
    const auto& a = o.attributes;
    User u;
    u.dn = e.dn;
    UserIdentity& id = u.identity;
    id.user_name = e.first(a.account_name);
    if (id.user_name.empty()) id.user_name = first_rdn_value(e.dn);
    id.domain = o.domain;
    id.qualified_name = id.domain.empty() ? id.user_name : id.domain + "\\" + id.user_name;
    id.upn = e.first(a.upn);
    if (!a.sid.empty()) id.sid = sid_to_string(e.first(a.sid));
    id.display_name = e.first(a.display_name);
    id.email = e.first(a.mail);
    if (const auto* v = e.values(a.member_of)) u.member_of = *v;
    const SysTime now = clock.now();
    if (auto uac = e.integer(a.user_account_control)) {
      u.disabled = (*uac & 0x2) != 0;
      u.expired = (*uac & 0x800000) != 0;
      if (*uac & 0x10) u.locked = true;  // LOCKOUT (older servers)
    }
    if (auto lt = e.integer(a.lockout_time); lt && *lt > 0) {
      if (o.lockout_duration.count() == 0 || from_filetime(*lt) + o.lockout_duration > now) u.locked = true;
    }
    if (e.values("pwdAccountLockedTime")) u.locked = true;
    if (auto ae = e.integer(a.account_expires); ae && *ae > 0 && *ae != std::numeric_limits<std::int64_t>::max()) {
      if (from_filetime(*ae) <= now) u.expired = true;
    }
    if (auto pls = e.integer(a.pwd_last_set); pls && *pls == 0) u.must_change = true;
    if (iequals(e.first("pwdReset"), "TRUE")) u.must_change = true;
    return u;
  }

  // Finds the user (nullopt: no such user, or more than one).
  Result<std::optional<User>> find_user(const AccountName& name, bool allow_sid) {
    const auto filter = user_filter(name, allow_sid);
    if (!filter) return std::optional<User>{};
    std::vector<LdapEntry> found;
    auto st = with_connection([&](LDAP* ld) {
      found.clear();
      return search(ld, o.base_dn, LDAP_SCOPE_SUBTREE, *filter, user_attributes(), 2, found);
    });
    if (!st) return st.error();
    if (found.size() != 1) return std::optional<User>{};
    return std::optional<User>(read_user(found.front()));
  }

  // ---- groups ----------------------------------------------------------------------------

  std::vector<std::string> group_attributes() const {
    return {o.attributes.group_name, o.attributes.sid, o.attributes.member_of};
  }

  Group read_group(const LdapEntry& e) const {
    Group g;
    g.name = e.first(o.attributes.group_name);
    if (g.name.empty()) g.name = first_rdn_value(e.dn);
    if (!o.attributes.sid.empty()) g.sid = sid_to_string(e.first(o.attributes.sid));
    if (const auto* v = e.values(o.attributes.member_of)) g.parents = *v;
    g.fetched = clock.now();
    return g;
  }

  std::optional<Group> cached_group(const std::string& key) {
    std::lock_guard lock(cache_mutex);
    auto it = groups.find(key);
    if (it == groups.end() || clock.now() - it->second.fetched >= o.cache_ttl) return std::nullopt;
    return it->second;
  }

  void store_group(const std::string& key, Group g) {
    std::lock_guard lock(cache_mutex);
    if (groups.size() >= o.max_cached) groups.clear();
    groups[key] = std::move(g);
  }

  // memberOf: the group at `dn` (its name, SID and parents), cached.
  Result<Group> group_by_dn(const std::string& dn) {
    const std::string key = lower(dn);
    if (auto g = cached_group(key)) return *g;
    std::vector<LdapEntry> found;
    auto st = with_connection([&](LDAP* ld) {
      found.clear();
      return search(ld, dn, LDAP_SCOPE_BASE, o.group_filter, group_attributes(), 1, found);
    });
    if (!st) return st.error();
    Group g;
    if (found.empty()) {
      g.found = false;
      g.fetched = clock.now();
    } else {
      g = read_group(found.front());
    }
    store_group(key, g);
    return g;
  }

  // The groups a subtree search for `filter` finds (each cached under "group:" + DN, without
  // parents), their DNs cached under `key` (as a Group whose parents are the list).
  Result<std::vector<std::string>> groups_matching(const std::string& key, const std::string& filter) {
    if (auto g = cached_group(key)) return g->parents;
    std::vector<LdapEntry> found;
    auto st = with_connection([&](LDAP* ld) {
      found.clear();
      return search(ld, o.base_dn, LDAP_SCOPE_SUBTREE, filter, group_attributes(), static_cast<int>(o.max_groups),
                    found);
    });
    if (!st) return st.error();
    Group list;
    list.fetched = clock.now();
    for (const auto& e : found) {
      Group g = read_group(e);
      g.parents.clear();  // found by a member search: the parents come from their own search
      store_group("group:" + lower(e.dn), g);
      list.parents.push_back(e.dn);
    }
    store_group(key, list);
    return list.parents;
  }

  // member: the groups that name `dn` as a member.
  Result<std::vector<std::string>> parents_by_member(const std::string& dn) {
    return groups_matching("parents:" + lower(dn),
                           "(&" + o.group_filter + "(" + o.attributes.member + "=" + escape_filter_value(dn) + "))");
  }

  // in_chain: every group the user at `dn` is in, nested ones included, from one search (AD
  // follows the nesting: LDAP_MATCHING_RULE_IN_CHAIN).
  Result<std::vector<std::string>> groups_in_chain(const std::string& dn) {
    return groups_matching("chain:" + lower(dn), in_chain_filter(o.group_filter, o.attributes.member, dn));
  }

  // A group found by groups_matching: (name, SID); its RDN value and no SID once out of the cache.
  std::pair<std::string, std::string> matched_group(const std::string& dn) {
    if (auto g = cached_group("group:" + lower(dn))) return {g->name, g->sid};
    return {first_rdn_value(dn), std::string()};
  }

  // token_groups: the SIDs (textual) in the user entry's tokenGroups, read with a base-scope
  // search (AD computes the attribute only so); cached under "token:" + DN.
  Result<std::vector<std::string>> token_group_sids(const std::string& dn) {
    const std::string key = "token:" + lower(dn);
    if (auto g = cached_group(key)) return g->parents;
    std::vector<LdapEntry> found;
    auto st = with_connection([&](LDAP* ld) {
      found.clear();
      return search(ld, dn, LDAP_SCOPE_BASE, "(objectClass=*)", {o.attributes.token_groups}, 1, found);
    });
    if (!st) return st.error();
    Group list;
    list.fetched = clock.now();
    if (!found.empty())
      if (const auto* values = found.front().values(o.attributes.token_groups))
        for (const auto& binary : *values)
          if (auto sid = sid_to_string(binary); !sid.empty()) list.parents.push_back(std::move(sid));
    store_group(key, list);
    return list.parents;
  }

  // token_groups: the group of each SID (found = false: no group under base_dn has it), cached
  // under "sid:" + SID; the ones not cached are looked up kSidsPerSearch at a time.
  Result<std::vector<Group>> groups_by_sid(const std::vector<std::string>& sids) {
    std::vector<Group> out(sids.size());
    std::vector<std::size_t> missing;
    for (std::size_t i = 0; i < sids.size(); ++i) {
      if (auto g = cached_group("sid:" + lower(sids[i])))
        out[i] = *g;
      else
        missing.push_back(i);
    }
    for (std::size_t at = 0; at < missing.size(); at += kSidsPerSearch) {
      const std::size_t end = std::min(missing.size(), at + kSidsPerSearch);
      std::vector<std::string> binary;
      for (std::size_t k = at; k < end; ++k)
        if (auto b = sid_from_string(sids[missing[k]])) binary.push_back(std::move(*b));
      std::map<std::string, Group> by_sid;  // lower SID
      if (!binary.empty() && !o.attributes.sid.empty()) {
        std::vector<LdapEntry> found;
        const std::string filter = sids_filter(o.group_filter, o.attributes.sid, binary);
        auto st = with_connection([&](LDAP* ld) {
          found.clear();
          return search(ld, o.base_dn, LDAP_SCOPE_SUBTREE, filter, group_attributes(),
                        static_cast<int>(std::max(o.max_groups, binary.size())), found);
        });
        if (!st) return st.error();
        for (const auto& e : found) {
          Group g = read_group(e);
          g.parents.clear();
          if (g.sid.empty()) continue;
          store_group("group:" + lower(e.dn), g);
          by_sid[lower(g.sid)] = std::move(g);
        }
      }
      for (std::size_t k = at; k < end; ++k) {
        const std::string& sid = sids[missing[k]];
        Group g;
        if (auto it = by_sid.find(lower(sid)); it != by_sid.end()) {
          g = it->second;
        } else {
          g.found = false;
          g.sid = sid;
          g.fetched = clock.now();
        }
        store_group("sid:" + lower(sid), g);
        out[missing[k]] = std::move(g);
      }
    }
    return out;
  }

  Status resolve_groups(User& user) {
    std::vector<std::pair<std::string, std::string>> out;  // name (empty: a SID only), SID
    if (o.group_lookup == GroupLookup::in_chain) {
      auto dns = groups_in_chain(user.dn);
      if (!dns) return dns.error();
      for (const auto& dn : *dns) {
        if (out.size() >= o.max_groups) break;
        out.push_back(matched_group(dn));
      }
    } else if (o.group_lookup == GroupLookup::token_groups) {
      auto sids = token_group_sids(user.dn);
      if (!sids) return sids.error();
      if (sids->size() > o.max_groups) sids->resize(o.max_groups);
      auto found = groups_by_sid(*sids);
      if (!found) return found.error();
      for (const auto& g : *found) out.emplace_back(g.found ? g.name : std::string(), g.sid);
    } else if (auto st = walk_groups(user, out); !st) {
      return st;
    }
    set_groups(user.identity, out);
    return {};
  }

  // member_of and member: up the nesting one level at a time, each group once (cycles end).
  Status walk_groups(const User& user, std::vector<std::pair<std::string, std::string>>& out) {
    std::set<std::string> seen;  // lower DNs
    std::deque<std::string> todo;
    const auto push_all = [&](const std::vector<std::string>& dns) {
      for (const auto& dn : dns)
        if (seen.insert(lower(dn)).second) todo.push_back(dn);
    };
    if (o.group_lookup == GroupLookup::member_of) {
      push_all(user.member_of);
    } else {
      auto parents = parents_by_member(user.dn);
      if (!parents) return parents.error();
      push_all(*parents);
    }
    while (!todo.empty() && out.size() < o.max_groups) {
      const std::string dn = todo.front();
      todo.pop_front();
      if (o.group_lookup == GroupLookup::member_of) {
        auto g = group_by_dn(dn);
        if (!g) return g.error();
        if (!g->found) continue;
        out.emplace_back(g->name, g->sid);
        push_all(g->parents);
      } else {
        out.push_back(matched_group(dn));
        auto parents = parents_by_member(dn);
        if (!parents) return parents.error();
        push_all(*parents);
      }
    }
    return {};
  }

  // The identity's groups: the named ones as DOMAIN\Name, sorted case-insensitively without
  // duplicates, and their SIDs in the same order; then the SIDs without a name, sorted.
  void set_groups(UserIdentity& id, const std::vector<std::pair<std::string, std::string>>& out) const {
    std::vector<std::pair<std::string, std::string>> named;  // qualified name, SID
    std::vector<std::string> sid_only;
    for (const auto& [name, sid] : out) {
      if (!name.empty())
        named.emplace_back(o.domain.empty() ? name : o.domain + "\\" + name, sid);
      else if (!sid.empty())
        sid_only.push_back(sid);
    }
    std::stable_sort(named.begin(), named.end(),
                     [](const auto& a, const auto& b) { return ci_less(a.first, b.first); });
    std::vector<std::string> names, sids;
    for (auto& [name, sid] : named) {
      if (!names.empty() && iequals(names.back(), name)) continue;
      names.push_back(std::move(name));
      if (!sid.empty()) sids.push_back(std::move(sid));
    }
    std::set<std::string> known;  // lower SIDs
    for (const auto& sid : sids) known.insert(lower(sid));
    std::sort(sid_only.begin(), sid_only.end());
    for (auto& sid : sid_only)
      if (known.insert(lower(sid)).second) sids.push_back(std::move(sid));
    id.groups = std::move(names);
    id.group_sids = std::move(sids);
  }
  // ---- caches ----------------------------------------------------------------------------

  static std::string name_key(const AccountName& name, const std::string& default_domain) {
    if (name.upn) return "upn:" + lower(name.name);
    if (name.domain.empty() && is_sid(name.name)) return "sid:" + lower(name.name);
    return "sam:" + lower(name.domain.empty() ? default_domain : name.domain) + "\\" + lower(name.name);
  }

  std::optional<Cached> cached_identity(const std::string& key, std::chrono::seconds max_age) {
    std::lock_guard lock(cache_mutex);
    auto it = identities.find(key);
    if (it == identities.end() || clock.now() - it->second.fetched >= max_age) return std::nullopt;
    return it->second;
  }

  void store_identity(const std::string& key, const User& user) {
    std::lock_guard lock(cache_mutex);
    if (identities.size() >= o.max_cached) identities.clear();
    identities[key] = Cached{user, clock.now()};
  }

  std::string credential_key(const std::string& user_key, const std::string& password) const {
    std::string data = user_key;
    data += '\0';
    data += password;
    return common::crypto::hmac_sha256_hex(cache_key, data);
  }

  std::chrono::seconds credential_cache() const {
    const std::int64_t s = o.credential_cache_seconds ? o.credential_cache_seconds() : 60;
    return std::chrono::seconds(std::max<std::int64_t>(0, s));
  }

  // The cached identity for a password that succeeded within max_age, or nullopt.
  std::optional<Cached> remembered(const std::string& cred_key, const std::string& user_key,
                                   std::chrono::seconds max_age) {
    {
      std::lock_guard lock(cache_mutex);
      auto it = credentials.find(cred_key);
      if (it == credentials.end() || it->second.user_key != user_key || clock.now() - it->second.verified >= max_age)
        return std::nullopt;
    }
    return cached_identity(user_key, std::max(max_age, o.cache_ttl));
  }

  void remember(const std::string& cred_key, const std::string& user_key) {
    std::lock_guard lock(cache_mutex);
    if (credentials.size() >= o.max_cached) credentials.clear();
    credentials[cred_key] = Credential{user_key, clock.now()};
  }

  // ---- the checks ------------------------------------------------------------------------

  static AuthOutcome outcome(AuthResult r, const User* user) {
    AuthOutcome out;
    out.result = r;
    if (user &&
        (r == AuthResult::ok || r == AuthResult::must_change_credentials || r == AuthResult::expired_credentials))
      out.identity = user->identity;
    return out;
  }

  static AuthOutcome state_outcome(const User& u) {
    if (u.locked) return outcome(AuthResult::account_locked_out, &u);
    if (u.disabled) return outcome(AuthResult::account_disabled, &u);
    if (u.expired) return outcome(AuthResult::expired_credentials, &u);
    if (u.must_change) return outcome(AuthResult::must_change_credentials, &u);
    return outcome(AuthResult::ok, &u);
  }

  // The user's bind on a connection of its own. The AuthResult the server's answer means
  // (ok: the bind succeeded, nothing said against it), or errc::unavailable.
  Result<AuthResult> user_bind(const std::string& dn, const std::string& password) {
    if (auto ok = may_connect(); !ok) return ok.error();
    std::string errors;
    for (std::size_t i : server_order()) {
      const std::string& uri = o.servers[i];
      auto h = connect_to(uri);
      if (!h) {
        errors += (errors.empty() ? "" : "; ") + h.error().message;
        continue;
      }
      LDAPControl* request = nullptr;
      ldap_create_passwordpolicy_control(h->ld, &request);
      LDAPControl* sctrls[] = {request, nullptr};
      LDAPControl** rctrls = nullptr;
      OpResult r = simple_bind(h->ld, dn, password, request ? sctrls : nullptr, &rctrls, o.operation_timeout);
      if (request) ldap_control_free(request);
      LDAPPasswordPolicyError pp = PP_noError;
      if (rctrls) {
        if (LDAPControl* c = ldap_control_find(LDAP_CONTROL_PASSWORDPOLICYRESPONSE, rctrls, nullptr)) {
          ber_int_t expire = -1, grace = -1;
          ldap_parse_passwordpolicy_control(h->ld, c, &expire, &grace, &pp);
        }
        ldap_controls_free(rctrls);
      }
      if (connection_error(r.rc)) {
        errors += (errors.empty() ? "" : "; ") + uri + ": " + describe(r.rc, r.diag);
        continue;
      }
      note_reachable(uri, i);
      if (pp == PP_accountLocked) return AuthResult::account_locked_out;
      if (pp == PP_passwordExpired) return AuthResult::expired_credentials;
      if (r.rc == LDAP_INVALID_CREDENTIALS) {
        switch (ad_bind_reason(r.diag)) {
          case 0x775: return AuthResult::account_locked_out;
          case 0x533: return AuthResult::account_disabled;
          case 0x532:
          case 0x701: return AuthResult::expired_credentials;
          case 0x773: return AuthResult::must_change_credentials;
          default: return AuthResult::failed_credentials;
        }
      }
      if (r.rc != LDAP_SUCCESS) return AuthResult::failed_credentials;
      if (pp == PP_changeAfterReset) return AuthResult::must_change_credentials;
      return AuthResult::ok;
    }
    note_unreachable(errors);
    return Error(errc::unavailable, "directory unreachable: " + errors);
  }

  // The outage fallback: the identity of a user whose same password succeeded within cache_ttl.
  Result<AuthOutcome> from_cache_or(const Error& error, const std::string& cred_key, const std::string& user_key) {
    if (error.code == errc::unavailable) {
      if (auto hit = remembered(cred_key, user_key, o.cache_ttl)) {
        log->warn("directory unreachable: serving cached identity of {}", hit->user.identity.qualified_name);
        if (o.metrics) o.metrics->add("broker_directory_cached_logons_total", {});
        return outcome(AuthResult::ok, &hit->user);
      }
    }
    return error;
  }

  Result<AuthOutcome> authenticate(const Credentials& c) {
    const AccountName name = parse_account_name(c.user_name, c.domain);
    const std::string user_key = name_key(name, o.domain);
    const std::string cred_key = credential_key(user_key, c.password);
    if (const auto ttl = credential_cache(); ttl.count() > 0)
      if (auto hit = remembered(cred_key, user_key, ttl)) return outcome(AuthResult::ok, &hit->user);

    auto found = find_user(name, false);
    if (!found) return from_cache_or(found.error(), cred_key, user_key);
    if (!*found || c.password.empty()) {
      // The same round trips as for a real user: a bind that cannot succeed.
      if (!c.password.empty()) {
        auto r = user_bind("cn=openbroker-no-such-user," + o.base_dn, c.password);
        if (!r) return r.error();
      }
      return outcome(AuthResult::failed_credentials, nullptr);
    }
    User& user = **found;
    if (user.locked) return outcome(AuthResult::account_locked_out, nullptr);
    auto bound = user_bind(user.dn, c.password);
    if (!bound) return from_cache_or(bound.error(), cred_key, user_key);
    switch (*bound) {
      case AuthResult::ok: break;
      case AuthResult::must_change_credentials:
      case AuthResult::expired_credentials: {
        if (auto st = resolve_groups(user); !st) return st.error();
        return outcome(*bound, &user);
      }
      default: return outcome(*bound, nullptr);
    }
    if (auto st = resolve_groups(user); !st) return from_cache_or(st.error(), cred_key, user_key);
    AuthOutcome out = state_outcome(user);
    store_identity(user_key, user);
    if (out.result == AuthResult::ok) remember(cred_key, user_key);
    if (out.result == AuthResult::account_disabled || out.result == AuthResult::account_locked_out)
      out.identity.reset();
    return out;
  }

  Result<AuthOutcome> lookup(std::string_view user_name, std::string_view domain) {
    const AccountName name = parse_account_name(user_name, domain);
    const std::string key = name_key(name, o.domain);
    if (auto hit = cached_identity(key, o.cache_ttl)) return state_outcome(hit->user);
    auto found = find_user(name, true);
    if (!found) return found.error();
    if (!*found) return Error(errc::not_found, "no such user");
    User& user = **found;
    if (auto st = resolve_groups(user); !st) return st.error();
    store_identity(key, user);
    return state_outcome(user);
  }
};

LdapDirectory::LdapDirectory(LdapDirectoryOptions options, common::Clock& clock)
    : impl_(std::make_unique<Impl>(std::move(options), clock)) {}

LdapDirectory::~LdapDirectory() = default;

Result<AuthOutcome> LdapDirectory::authenticate(const Credentials& credentials) {
  return impl_->authenticate(credentials);
}

Result<AuthOutcome> LdapDirectory::lookup(std::string_view user_name, std::string_view domain) {
  return impl_->lookup(user_name, domain);
}

Status LdapDirectory::check() {
  return impl_->with_connection([&](LDAP* ld) {
    std::vector<LdapEntry> found;
    return impl_->search(ld, impl_->o.base_dn, LDAP_SCOPE_BASE, "(objectClass=*)", {"1.1"}, 1, found);
  });
}

LdapState LdapDirectory::state() const {
  LdapState s;
  {
    std::lock_guard lock(impl_->state_mutex);
    s = impl_->state;
  }
  std::lock_guard lock(impl_->cache_mutex);
  s.cached_identities = impl_->identities.size();
  return s;
}

void LdapDirectory::invalidate() {
  std::lock_guard lock(impl_->cache_mutex);
  impl_->identities.clear();
  impl_->groups.clear();
  impl_->credentials.clear();
}

}  // namespace identity
