#include "cbp/messages.hpp"

#include "common/address.hpp"
#include "common/crypto.hpp"

#include <boost/json.hpp>

#include <algorithm>
#include <exception>
#include <functional>
#include <new>
#include <ostream>
#include <type_traits>
#include <utility>

namespace cbp {

namespace json = boost::json;
using common::errc;

namespace {

// ---------------------------------------------------------------------------------------------
// Enumeration tables.

struct ReasonEntry {
  Reason reason;
  std::string_view name;
  int code;
};

// In code order (all_reasons() relies on it).
constexpr ReasonEntry kReasons[] = {
    {Reason::agent_shutdown, "AgentShutdown", 0},
    {Reason::agent_suspended, "AgentSuspended", 1},
    {Reason::agent_requested, "AgentRequested", 2},
    {Reason::incompatible_version, "IncompatibleVersion", 100},
    {Reason::agent_address_resolution_failed, "AgentAddressResolutionFailed", 101},
    {Reason::agent_not_contactable, "AgentNotContactable", 102},
    {Reason::agent_wrong_active_directory_ou, "AgentWrongActiveDirectoryOU", 103},
    {Reason::empty_registration_request, "EmptyRegistrationRequest", 104},
    {Reason::missing_registration_capabilities, "MissingRegistrationCapabilities", 105},
    {Reason::missing_agent_version, "MissingAgentVersion", 106},
    {Reason::inconsistent_registration_capabilities, "InconsistentRegistrationCapabilities", 107},
    {Reason::not_licensed_for_feature, "NotLicensedForFeature", 108},
    {Reason::unsupported_credential_security_version, "UnsupportedCredentialSecurityVersion", 109},
    {Reason::invalid_registration_request, "InvalidRegistrationRequest", 110},
    {Reason::single_multi_session_mismatch, "SingleMultiSessionMismatch", 111},
    {Reason::functional_level_too_low_for_catalog, "FunctionalLevelTooLowForCatalog", 112},
    {Reason::functional_level_too_low_for_desktop_group, "FunctionalLevelTooLowForDesktopGroup", 113},
    {Reason::os_not_compatible_with_ddc, "OSNotCompatibleWithDdc", 114},
    {Reason::vm_not_compatible_with_ddc, "VMNotCompatibleWithDdc", 115},
    {Reason::power_off, "PowerOff", 200},
    {Reason::desktop_restart, "DesktopRestart", 201},
    {Reason::desktop_removed, "DesktopRemoved", 202},
    {Reason::agent_rejected_settings_update, "AgentRejectedSettingsUpdate", 203},
    {Reason::send_settings_failure, "SendSettingsFailure", 204},
    {Reason::session_audit_failure, "SessionAuditFailure", 205},
    {Reason::session_prepare_failure, "SessionPrepareFailure", 206},
    {Reason::contact_lost, "ContactLost", 207},
    {Reason::settings_creation_failure, "SettingsCreationFailure", 208},
    {Reason::unknown_error, "UnknownError", 300},
    {Reason::broker_registration_limit_reached, "BrokerRegistrationLimitReached", 301},
    {Reason::registration_state_mismatch, "RegistrationStateMismatch", 302},
    {Reason::none, "None", 400},
    {Reason::hypervisor_reported_failure, "HypervisorReportedFailure", 401},
    {Reason::hypervisor_rate_limit_exceeded, "HypervisorRateLimitExceeded", 402},
    {Reason::unknown_machine, "UnknownMachine", 900},
    {Reason::bad_proof, "BadProof", 901},
    {Reason::too_many_failures, "TooManyFailures", 902},
    {Reason::enrollment_refused, "EnrollmentRefused", 903},
    {Reason::protocol_error, "ProtocolError", 904},
    {Reason::timeout, "Timeout", 905},
    {Reason::superseded, "Superseded", 906},
    {Reason::broker_shutdown, "BrokerShutdown", 907},
    {Reason::unavailable, "Unavailable", 908},
    {Reason::hard_registration_pending, "HardRegistrationPending", 1000},
    {Reason::soft_registered, "SoftRegistered", 1001},
    {Reason::unknown, "Unknown", 1002},
};

const ReasonEntry* find_reason(Reason r) {
  for (const auto& e : kReasons)
    if (e.reason == r) return &e;
  return nullptr;
}

template <class E>
struct Spelling {
  E value;
  std::string_view name;
};

constexpr Spelling<SessionSupport> kSessionSupport[] = {{SessionSupport::single_session, "SingleSession"},
                                                        {SessionSupport::multi_session, "MultiSession"}};
constexpr Spelling<SessionState> kSessionState[] = {{SessionState::preparing, "PreparingNewSession"},
                                                    {SessionState::connected, "Connected"},
                                                    {SessionState::active, "Active"},
                                                    {SessionState::disconnected, "Disconnected"}};
constexpr Spelling<SessionEventKind> kSessionEvent[] = {{SessionEventKind::connected, "Connected"},
                                                        {SessionEventKind::active, "Active"},
                                                        {SessionEventKind::disconnected, "Disconnected"},
                                                        {SessionEventKind::reconnected, "Reconnected"},
                                                        {SessionEventKind::logged_off, "LoggedOff"}};
constexpr Spelling<DisplayProtocol> kProtocol[] = {
    {DisplayProtocol::hdx, "HDX"}, {DisplayProtocol::rdp, "RDP"}, {DisplayProtocol::console, "Console"}};
constexpr Spelling<SessionType> kSessionType[] = {{SessionType::desktop, "Desktop"},
                                                  {SessionType::application, "Application"}};
constexpr Spelling<TicketFailure> kTicketFailure[] = {{TicketFailure::not_found, "NotFound"},
                                                      {TicketFailure::expired, "Expired"},
                                                      {TicketFailure::already_redeemed, "AlreadyRedeemed"},
                                                      {TicketFailure::wrong_machine, "WrongMachine"},
                                                      {TicketFailure::refused, "Refused"}};

template <class E, std::size_t N>
std::string_view name_of(const Spelling<E> (&table)[N], E value) {
  for (const auto& s : table)
    if (s.value == value) return s.name;
  return "?";
}
template <class E, std::size_t N>
std::optional<E> value_of(const Spelling<E> (&table)[N], std::string_view name) {
  for (const auto& s : table)
    if (s.name == name) return s.value;
  return std::nullopt;
}
template <class E, std::size_t N>
std::string choices_of(const Spelling<E> (&table)[N]) {
  std::string out;
  for (const auto& s : table) {
    if (!out.empty()) out += ", ";
    out += s.name;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Text checks.

// Printable form of untrusted text for error messages and logs: quoted, cut after about `max`
// bytes (never inside a UTF-8 sequence, so the result can be sent back in a message), control
// characters and quotes escaped as \xNN (backslashes kept: DOMAIN\user reads as such).
std::string quote(std::string_view text, std::size_t max = 64) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "'";
  std::size_t n = 0;
  for (char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (n++ >= max && (u & 0xc0) != 0x80) {  // at a code point boundary
      out += "...";
      break;
    }
    if (u < 0x20 || u == 0x7f || c == '\'') {
      out += "\\x";
      out += kHex[u >> 4];
      out += kHex[u & 15];
    } else {
      out += c;
    }
  }
  out += "'";
  return out;
}

enum class Chars {
  line,       // any UTF-8 but control characters (U+0000..U+001F, U+007F)
  multiline,  // like line, plus tab, CR and LF
  ascii,      // printable ASCII without space (0x21..0x7E)
  token,      // letters, digits, '_', '.', '-'
  any,        // any UTF-8 (the JSON parser checked it)
};

bool is_token_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
}

// "" when `text` is made of `chars`, else what is wrong.
std::string_view check_chars(std::string_view text, Chars chars) {
  for (char c : text) {
    const auto u = static_cast<unsigned char>(c);
    switch (chars) {
      case Chars::line:
        if (u < 0x20 || u == 0x7f) return "must not contain control characters";
        break;
      case Chars::multiline:
        if ((u < 0x20 && c != '\t' && c != '\n' && c != '\r') || u == 0x7f)
          return "must not contain control characters other than tab and line breaks";
        break;
      case Chars::ascii:
        if (u < 0x21 || u > 0x7e) return "must be printable ASCII without spaces";
        break;
      case Chars::token:
        if (!is_token_char(c)) return "must contain only letters, digits, '_', '.' and '-'";
        break;
      case Chars::any: break;
    }
  }
  return {};
}

bool is_dns_name(std::string_view name) {
  if (name.empty() || name.size() > 253) return false;
  bool numeric = true;
  std::size_t start = 0;
  while (start <= name.size()) {
    std::size_t dot = name.find('.', start);
    if (dot == std::string_view::npos) dot = name.size();
    const auto label = name.substr(start, dot - start);
    if (label.empty() || label.size() > 63 || label.front() == '-' || label.back() == '-') return false;
    for (char c : label) {
      const bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
      if (!alnum && c != '-' && c != '_') return false;
      if (!(c >= '0' && c <= '9')) numeric = false;
    }
    start = dot + 1;
  }
  // All-numeric labels ("10.0.0.500") are an IPv4 address or nothing.
  return !numeric || common::is_ip_address(name);
}

// ---------------------------------------------------------------------------------------------
// Reading JSON objects. The first error is kept; later reads are no-ops.

constexpr std::string_view kRequired = "is required";
constexpr std::string_view kEmptyRegistration = "empty registration request";

enum class Need { required, optional };

class Reader {
 public:
  explicit Reader(std::optional<common::Error>& error) : error_(error) {}

  bool ok() const { return !error_.has_value(); }
  bool fail(std::string field, std::string message) {
    if (!error_) error_ = common::make_error(errc::invalid_argument, std::move(message), std::move(field));
    return false;
  }

 private:
  std::optional<common::Error>& error_;
};

std::string join_path(std::string_view prefix, std::string_view key) {
  if (prefix.empty()) return std::string(key);
  std::string p(prefix);
  p += '.';
  p += key;
  return p;
}

class Obj {
 public:
  Obj(const json::object& obj, std::string prefix, Reader& r) : obj_(obj), prefix_(std::move(prefix)), r_(r) {}

  std::string path(std::string_view key) const { return join_path(prefix_, key); }
  Reader& reader() { return r_; }
  const json::object& raw() const { return obj_; }

  // The member, or nullptr when absent or null (reporting it when required).
  const json::value* find(std::string_view key, Need need) {
    if (!r_.ok()) return nullptr;
    const json::value* v = obj_.if_contains(key);
    if (v && v->is_null()) v = nullptr;
    if (!v && need == Need::required) r_.fail(path(key), std::string(kRequired));
    return v;
  }

  // Text of 1..max bytes when required; 0..max when optional (absent: empty).
  void text(std::string_view key, std::string& out, Need need, std::size_t max, Chars chars) {
    const json::value* v = find(key, need);
    if (!v) return;
    const json::string* s = v->if_string();
    if (!s) {
      r_.fail(path(key), "must be a string");
      return;
    }
    check_text(path(key), *s, need, max, chars);
    if (r_.ok()) out.assign(s->data(), s->size());
  }

  void hex64(std::string_view key, std::string& out) {
    const json::value* v = find(key, Need::required);
    if (!v) return;
    const json::string* s = v->if_string();
    if (!s) {
      r_.fail(path(key), "must be a string");
    } else if (!is_hex64(*s)) {
      r_.fail(path(key), "must be 64 lower-case hex digits");
    } else {
      out.assign(s->data(), s->size());
    }
  }

  void integer(std::string_view key, std::int64_t& out, Need need, std::int64_t lo, std::int64_t hi) {
    const json::value* v = find(key, need);
    if (!v) return;
    read_integer(path(key), *v, out, lo, hi, r_);
  }

  void flag(std::string_view key, bool& out, Need need) {
    const json::value* v = find(key, need);
    if (!v) return;
    if (const bool* b = v->if_bool()) {
      out = *b;
    } else {
      r_.fail(path(key), "must be true or false");
    }
  }

  template <class E, std::size_t N>
  void choice(std::string_view key, E& out, Need need, const Spelling<E> (&table)[N]) {
    const json::value* v = find(key, need);
    if (!v) return;
    const json::string* s = v->if_string();
    if (!s) {
      r_.fail(path(key), "must be a string");
      return;
    }
    if (auto e = value_of(table, *s)) {
      out = *e;
    } else {
      r_.fail(path(key), "must be one of " + choices_of(table) + " (got " + quote(*s) + ")");
    }
  }

  // A reason name; names this build does not know become unknown_error (forward compatibility).
  void reason(std::string_view key, Reason& out) {
    const json::value* v = find(key, Need::required);
    if (!v) return;
    const json::string* s = v->if_string();
    if (!s) {
      r_.fail(path(key), "must be a string");
      return;
    }
    out = from_string<Reason>(*s).value_or(Reason::unknown_error);
  }

  const json::array* array(std::string_view key, Need need, std::size_t max_items) {
    const json::value* v = find(key, need);
    if (!v) return nullptr;
    const json::array* a = v->if_array();
    if (!a) {
      r_.fail(path(key), "must be an array");
      return nullptr;
    }
    if (a->size() > max_items) {
      r_.fail(path(key), "must have at most " + std::to_string(max_items) + " entries");
      return nullptr;
    }
    return a;
  }

  const json::object* object(std::string_view key, Need need) {
    const json::value* v = find(key, need);
    if (!v) return nullptr;
    const json::object* o = v->if_object();
    if (!o) r_.fail(path(key), "must be an object");
    return o;
  }

  void check_text(const std::string& field, std::string_view s, Need need, std::size_t max, Chars chars) {
    if (need == Need::required && s.empty()) {
      r_.fail(field, "must not be empty");
    } else if (s.size() > max) {
      r_.fail(field, "must be at most " + std::to_string(max) + " bytes");
    } else if (auto bad = check_chars(s, chars); !bad.empty()) {
      r_.fail(field, std::string(bad));
    }
  }

  static void read_integer(const std::string& field, const json::value& v, std::int64_t& out, std::int64_t lo,
                           std::int64_t hi, Reader& r) {
    const auto range = [&] { return "must be " + std::to_string(lo) + ".." + std::to_string(hi); };
    if (const std::int64_t* i = v.if_int64()) {
      if (*i < lo || *i > hi) {
        r.fail(field, range());
      } else {
        out = *i;
      }
    } else if (v.is_uint64()) {
      r.fail(field, range());
    } else {
      r.fail(field, "must be an integer");
    }
  }

 private:
  const json::object& obj_;
  std::string prefix_;
  Reader& r_;
};

void read_versions(Obj& o, std::vector<int>& out) {
  const json::array* a = o.array("versions", Need::required, kMaxVersions);
  if (!a) return;
  if (a->empty()) {
    o.reader().fail(o.path("versions"), "must not be empty");
    return;
  }
  out.clear();
  for (std::size_t i = 0; i < a->size() && o.reader().ok(); ++i) {
    std::int64_t v = 0;
    Obj::read_integer(o.path("versions") + "[" + std::to_string(i) + "]", (*a)[i], v, 1, kMaxVersion, o.reader());
    out.push_back(static_cast<int>(v));
  }
}

void read_session_info(Obj& o, SessionInfo& s) {
  o.text("session_key", s.session_key, Need::required, kMaxKeyBytes, Chars::ascii);
  o.text("user", s.user, Need::optional, kMaxNameBytes, Chars::line);
  o.text("client_name", s.client_name, Need::optional, kMaxNameBytes, Chars::line);
  o.text("client_address", s.client_address, Need::optional, kMaxNameBytes, Chars::line);
  o.choice("protocol", s.protocol, Need::optional, kProtocol);
  o.text("application", s.application, Need::optional, kMaxNameBytes, Chars::line);
}

// ---------------------------------------------------------------------------------------------
// One reader per message type.

void read(Obj& o, Challenge& m) {
  o.hex64("nonce", m.nonce);
  read_versions(o, m.versions);
  o.text("broker", m.broker, Need::optional, kMaxNameBytes, Chars::line);
}

void read(Obj& o, Hello& m) {
  o.text("machine", m.machine, Need::required, kMaxNameBytes, Chars::line);
  read_versions(o, m.versions);
  o.text("agent_version", m.agent_version, Need::required, kMaxNameBytes, Chars::line);
  o.hex64("proof", m.proof);
  o.hex64("agent_nonce", m.agent_nonce);
  o.flag("enroll", m.enroll, Need::optional);
  if (m.enroll) o.text("catalog", m.catalog, Need::required, kMaxNameBytes, Chars::line);
}

void read(Obj& o, Welcome& m) {
  std::int64_t version = 0;
  o.integer("version", version, Need::required, 1, kMaxVersion);
  m.version = static_cast<int>(version);
  o.integer("heartbeat_interval_seconds", m.heartbeat_interval_seconds, Need::required, kMinHeartbeatSeconds,
            kMaxHeartbeatSeconds);
  o.integer("missed_heartbeats", m.missed_heartbeats, Need::required, 1, kMaxMissedHeartbeats);
  o.hex64("broker_proof", m.broker_proof);
  o.text("machine_secret", m.machine_secret, Need::optional, kMaxNameBytes, Chars::ascii);
}

void read(Obj& o, Rejected& m) {
  o.reason("reason", m.reason);
  o.text("message", m.message, Need::optional, kMaxTextBytes, Chars::multiline);
  o.integer("retry_after_seconds", m.retry_after_seconds, Need::optional, 1, kMaxRetryAfterSeconds);
}

void read(Obj& o, Register& m) {
  static constexpr std::string_view kMembers[] = {"os",         "session_support", "address",
                                                  "load_index", "capabilities",    "sessions"};
  if (std::none_of(std::begin(kMembers), std::end(kMembers), [&](std::string_view k) {
        const json::value* v = o.raw().if_contains(k);
        return v && !v->is_null();
      })) {
    o.reader().fail("", std::string(kEmptyRegistration));
    return;
  }
  o.text("os", m.os, Need::required, kMaxNameBytes, Chars::line);
  o.choice("session_support", m.session_support, Need::required, kSessionSupport);
  o.text("address", m.address, Need::required, kMaxNameBytes, Chars::ascii);
  if (o.reader().ok() && !is_host_port(m.address))
    o.reader().fail("address", "must be host:port (an IPv4 address, [IPv6 address] or DNS name, port 1..65535)");
  o.text("dns_name", m.dns_name, Need::optional, kMaxNameBytes, Chars::ascii);
  if (o.reader().ok() && !m.dns_name.empty() && !is_dns_name(m.dns_name))
    o.reader().fail("dns_name", "must be a DNS name");
  if (const json::array* caps = o.array("capabilities", Need::required, kMaxCapabilities)) {
    for (std::size_t i = 0; i < caps->size() && o.reader().ok(); ++i) {
      const std::string field = "capabilities[" + std::to_string(i) + "]";
      const json::string* s = (*caps)[i].if_string();
      if (!s) {
        o.reader().fail(field, "must be a string");
        break;
      }
      o.check_text(field, *s, Need::required, kMaxTokenBytes, Chars::token);
      m.capabilities.emplace_back(s->data(), s->size());
    }
  }
  o.integer("load_index", m.load_index, Need::required, 0, kMaxLoadIndex);
  if (const json::array* sessions = o.array("sessions", Need::required, kMaxSessions)) {
    m.sessions.reserve(sessions->size());
    for (std::size_t i = 0; i < sessions->size() && o.reader().ok(); ++i) {
      const std::string field = "sessions[" + std::to_string(i) + "]";
      const json::object* so = (*sessions)[i].if_object();
      if (!so) {
        o.reader().fail(field, "must be an object");
        break;
      }
      Obj s(*so, field, o.reader());
      SessionReport report;
      s.choice("state", report.state, Need::required, kSessionState);
      read_session_info(s, report.session);
      m.sessions.push_back(std::move(report));
    }
  }
}

void read(Obj&, Registered&) {}

void read(Obj& o, Heartbeat& m) {
  o.integer("load_index", m.load_index, Need::required, 0, kMaxLoadIndex);
  o.integer("session_count", m.session_count, Need::required, 0, kMaxSessionCount);
}

void read(Obj& o, SessionEvent& m) {
  o.choice("event", m.event, Need::required, kSessionEvent);
  if (const json::object* so = o.object("session", Need::required)) {
    Obj s(*so, "session", o.reader());
    read_session_info(s, m.session);
  }
}

void read_args(Obj& a, PrepareSessionArgs& m) {
  a.text("user", m.user, Need::required, kMaxNameBytes, Chars::line);
  a.text("resource", m.resource, Need::required, kMaxNameBytes, Chars::line);
  a.choice("session_type", m.session_type, Need::optional, kSessionType);
  a.text("ticket_ref", m.ticket_ref, Need::required, kMaxNameBytes, Chars::ascii);
  a.text("session_key", m.session_key, Need::required, kMaxKeyBytes, Chars::ascii);
  a.integer("connect_timeout_seconds", m.connect_timeout_seconds, Need::required, 1, kMaxConnectTimeoutSeconds);
  a.text("client_name", m.client_name, Need::optional, kMaxNameBytes, Chars::line);
  a.text("client_address", m.client_address, Need::optional, kMaxNameBytes, Chars::line);
  a.text("command_line_executable", m.command_line_executable, Need::optional, kMaxTextBytes, Chars::line);
  a.text("command_line_arguments", m.command_line_arguments, Need::optional, kMaxTextBytes, Chars::line);
  a.text("working_directory", m.working_directory, Need::optional, kMaxTextBytes, Chars::line);
}
void read_args(Obj& a, LogoffSessionArgs& m) {
  a.text("session_key", m.session_key, Need::required, kMaxKeyBytes, Chars::ascii);
}
void read_args(Obj& a, DisconnectSessionArgs& m) {
  a.text("session_key", m.session_key, Need::required, kMaxKeyBytes, Chars::ascii);
}
void read_args(Obj& a, SendMessageArgs& m) {
  a.text("session_key", m.session_key, Need::optional, kMaxKeyBytes, Chars::ascii);
  a.flag("all", m.all, Need::optional);
  if (a.reader().ok() && m.all == !m.session_key.empty())
    a.reader().fail(a.path("session_key"), "exactly one of session_key and all (true) must be given");
  a.text("title", m.title, Need::optional, kMaxNameBytes, Chars::line);
  a.text("text", m.text, Need::required, kMaxTextBytes, Chars::multiline);
}

template <class Args>
CommandArgs read_command_args(Obj& a) {
  Args args;
  read_args(a, args);
  return args;
}

void read(Obj& o, Command& m) {
  o.text("id", m.id, Need::required, kMaxIdBytes, Chars::ascii);
  std::string name;
  o.text("command", name, Need::required, kMaxTokenBytes, Chars::token);
  o.integer("timeout_ms", m.timeout_ms, Need::required, 1, kMaxCommandTimeoutMs);
  if (!o.reader().ok()) return;
  static const json::object kNoArgs;
  const json::object* args = o.object("args", Need::optional);
  if (!o.reader().ok()) return;
  Obj a(args ? *args : kNoArgs, "args", o.reader());
  if (name == PrepareSessionArgs::kName) {
    m.args = read_command_args<PrepareSessionArgs>(a);
  } else if (name == LogoffSessionArgs::kName) {
    m.args = read_command_args<LogoffSessionArgs>(a);
  } else if (name == DisconnectSessionArgs::kName) {
    m.args = read_command_args<DisconnectSessionArgs>(a);
  } else if (name == SendMessageArgs::kName) {
    m.args = read_command_args<SendMessageArgs>(a);
  } else {
    m.args = UnknownCommandArgs{std::move(name)};
  }
}

void read(Obj& o, CommandResult& m) {
  o.text("reply_to", m.reply_to, Need::required, kMaxIdBytes, Chars::ascii);
  o.flag("ok", m.ok, Need::required);
  o.text("error", m.error, Need::optional, kMaxTextBytes, Chars::multiline);
}

void read(Obj& o, RedeemTicket& m) {
  o.text("id", m.id, Need::required, kMaxIdBytes, Chars::ascii);
  o.text("ticket", m.ticket, Need::required, kMaxNameBytes, Chars::ascii);
  o.text("session_key", m.session_key, Need::optional, kMaxKeyBytes, Chars::ascii);
}

void read(Obj& o, Ticket& m) {
  o.text("reply_to", m.reply_to, Need::required, kMaxIdBytes, Chars::ascii);
  o.flag("ok", m.ok, Need::required);
  if (!o.reader().ok()) return;
  if (m.ok) {
    o.text("user", m.user, Need::required, kMaxNameBytes, Chars::line);
    o.text("credential_type", m.credential_type, Need::required, kMaxTokenBytes, Chars::token);
    if (const json::object* data = o.object("credential_data", Need::optional)) {
      if (data->size() > kMaxCredentialMembers) {
        o.reader().fail("credential_data", "must have at most " + std::to_string(kMaxCredentialMembers) + " members");
        return;
      }
      for (const auto& [key, value] : *data) {
        const std::string field = "credential_data." + std::string(key);
        o.check_text("credential_data", key, Need::required, kMaxTokenBytes, Chars::token);
        const json::string* s = value.if_string();
        if (!s) o.reader().fail(field, "must be a string");
        if (!o.reader().ok()) return;
        o.check_text(field, *s, Need::optional, kMaxCredentialValueBytes, Chars::any);
        m.credential_data[std::string(key)] = std::string(*s);
      }
    }
    o.text("session_key", m.session_key, Need::optional, kMaxKeyBytes, Chars::ascii);
  } else {
    const json::value* v = o.find("reason", Need::required);
    if (v) {
      if (const json::string* s = v->if_string()) {
        m.reason = value_of(kTicketFailure, *s).value_or(TicketFailure::refused);
      } else {
        o.reader().fail("reason", "must be a string");
      }
    }
    o.text("message", m.message, Need::optional, kMaxTextBytes, Chars::multiline);
  }
}

void read(Obj& o, Goodbye& m) {
  const json::value* v = o.find("reason", Need::required);
  if (!v) return;
  const json::string* s = v->if_string();
  const auto r = s ? from_string<Reason>(*s) : std::nullopt;
  if (!r || (*r != Reason::agent_shutdown && *r != Reason::agent_suspended && *r != Reason::agent_requested)) {
    o.reader().fail("reason", "must be one of AgentShutdown, AgentSuspended, AgentRequested" +
                                  (s ? " (got " + quote(*s) + ")" : std::string()));
    return;
  }
  m.reason = *r;
  o.text("message", m.message, Need::optional, kMaxTextBytes, Chars::multiline);
}

void read(Obj& o, ErrorMessage& m) {
  o.reason("reason", m.reason);
  o.text("message", m.message, Need::optional, kMaxTextBytes, Chars::multiline);
}

template <class T>
common::Result<Message> read_message(const json::object& obj) {
  std::optional<common::Error> error;
  Reader r(error);
  Obj o(obj, "", r);
  T m;
  read(o, m);
  if (error) return *error;
  return Message(std::move(m));
}

using ReadFn = common::Result<Message> (*)(const json::object&);

template <std::size_t... I>
constexpr auto make_readers(std::index_sequence<I...>) {
  return std::array<std::pair<std::string_view, ReadFn>, sizeof...(I)>{std::pair<std::string_view, ReadFn>{
      std::variant_alternative_t<I, Message>::kType, &read_message<std::variant_alternative_t<I, Message>>}...};
}
constexpr auto kReaders = make_readers(std::make_index_sequence<std::variant_size_v<Message>>{});

common::Result<Message> parse_unchecked(std::string_view text) {
  if (text.size() > kMaxMessageBytes)
    return common::make_error(errc::invalid_argument, "message is " + std::to_string(text.size()) +
                                                          " bytes, the limit is " + std::to_string(kMaxMessageBytes));
  json::parse_options options;
  options.max_depth = 32;
  json::parser parser(json::storage_ptr(), options);
  boost::system::error_code ec;
  const std::size_t used = parser.write(text.data(), text.size(), ec);
  if (ec)
    return common::make_error(errc::invalid_argument,
                              "malformed JSON at byte " + std::to_string(used) + ": " + ec.message());
  const json::value value = parser.release();
  const json::object* obj = value.if_object();
  if (!obj) return common::make_error(errc::invalid_argument, "must be a JSON object");
  const json::value* type = obj->if_contains("type");
  if (!type || type->is_null()) return common::make_error(errc::invalid_argument, std::string(kRequired), "type");
  const json::string* type_text = type->if_string();
  if (!type_text) return common::make_error(errc::invalid_argument, "must be a string", "type");
  for (const auto& [name, fn] : kReaders)
    if (name == *type_text) return fn(*obj);
  return common::make_error(errc::invalid_argument, "unknown message type " + quote(*type_text), "type");
}

// ---------------------------------------------------------------------------------------------
// Writing.

json::array to_json(const std::vector<int>& versions) {
  json::array a;
  for (int v : versions) a.emplace_back(v);
  return a;
}

void put_if(json::object& o, std::string_view key, const std::string& text) {
  if (!text.empty()) o[key] = text;
}

void write_session_info(json::object& o, const SessionInfo& s) {
  o["session_key"] = s.session_key;
  put_if(o, "user", s.user);
  put_if(o, "client_name", s.client_name);
  put_if(o, "client_address", s.client_address);
  o["protocol"] = to_string(s.protocol);
  put_if(o, "application", s.application);
}

void write(json::object& o, const Challenge& m) {
  o["nonce"] = m.nonce;
  o["versions"] = to_json(m.versions);
  put_if(o, "broker", m.broker);
}
void write(json::object& o, const Hello& m) {
  o["machine"] = m.machine;
  o["versions"] = to_json(m.versions);
  o["agent_version"] = m.agent_version;
  o["proof"] = m.proof;
  o["agent_nonce"] = m.agent_nonce;
  if (m.enroll) {
    o["enroll"] = true;
    o["catalog"] = m.catalog;
  }
}
void write(json::object& o, const Welcome& m) {
  o["version"] = m.version;
  o["heartbeat_interval_seconds"] = m.heartbeat_interval_seconds;
  o["missed_heartbeats"] = m.missed_heartbeats;
  o["broker_proof"] = m.broker_proof;
  put_if(o, "machine_secret", m.machine_secret);
}
void write(json::object& o, const Rejected& m) {
  o["reason"] = to_string(m.reason);
  put_if(o, "message", m.message);
  if (m.retry_after_seconds != 0) o["retry_after_seconds"] = m.retry_after_seconds;
}
void write(json::object& o, const Register& m) {
  o["os"] = m.os;
  o["session_support"] = to_string(m.session_support);
  o["address"] = m.address;
  put_if(o, "dns_name", m.dns_name);
  json::array caps;
  for (const auto& c : m.capabilities) caps.emplace_back(c);
  o["capabilities"] = std::move(caps);
  o["load_index"] = m.load_index;
  json::array sessions;
  for (const auto& s : m.sessions) {
    json::object so;
    so["session_key"] = s.session.session_key;
    so["state"] = to_string(s.state);
    write_session_info(so, s.session);
    sessions.emplace_back(std::move(so));
  }
  o["sessions"] = std::move(sessions);
}
void write(json::object&, const Registered&) {}
void write(json::object& o, const Heartbeat& m) {
  o["load_index"] = m.load_index;
  o["session_count"] = m.session_count;
}
void write(json::object& o, const SessionEvent& m) {
  o["event"] = to_string(m.event);
  json::object so;
  write_session_info(so, m.session);
  o["session"] = std::move(so);
}

void write_args(json::object& a, const PrepareSessionArgs& m) {
  a["user"] = m.user;
  a["resource"] = m.resource;
  a["session_type"] = to_string(m.session_type);
  a["ticket_ref"] = m.ticket_ref;
  a["session_key"] = m.session_key;
  a["connect_timeout_seconds"] = m.connect_timeout_seconds;
  put_if(a, "client_name", m.client_name);
  put_if(a, "client_address", m.client_address);
  put_if(a, "command_line_executable", m.command_line_executable);
  put_if(a, "command_line_arguments", m.command_line_arguments);
  put_if(a, "working_directory", m.working_directory);
}
void write_args(json::object& a, const LogoffSessionArgs& m) { a["session_key"] = m.session_key; }
void write_args(json::object& a, const DisconnectSessionArgs& m) { a["session_key"] = m.session_key; }
void write_args(json::object& a, const SendMessageArgs& m) {
  if (m.all) {
    a["all"] = true;
  } else {
    a["session_key"] = m.session_key;
  }
  put_if(a, "title", m.title);
  a["text"] = m.text;
}
void write_args(json::object&, const UnknownCommandArgs&) {}

void write(json::object& o, const Command& m) {
  o["id"] = m.id;
  o["command"] = command_name(m.args);
  o["timeout_ms"] = m.timeout_ms;
  json::object args;
  std::visit([&](const auto& a) { write_args(args, a); }, m.args);
  o["args"] = std::move(args);
}
void write(json::object& o, const CommandResult& m) {
  o["reply_to"] = m.reply_to;
  o["ok"] = m.ok;
  put_if(o, "error", m.error);
}
void write(json::object& o, const RedeemTicket& m) {
  o["id"] = m.id;
  o["ticket"] = m.ticket;
  put_if(o, "session_key", m.session_key);
}
void write(json::object& o, const Ticket& m) {
  o["reply_to"] = m.reply_to;
  o["ok"] = m.ok;
  if (m.ok) {
    o["user"] = m.user;
    o["credential_type"] = m.credential_type;
    json::object data;
    for (const auto& [k, v] : m.credential_data) data[k] = v;
    o["credential_data"] = std::move(data);
    put_if(o, "session_key", m.session_key);
  } else {
    o["reason"] = to_string(m.reason);
    put_if(o, "message", m.message);
  }
}
void write(json::object& o, const Goodbye& m) {
  o["reason"] = to_string(m.reason);
  put_if(o, "message", m.message);
}
void write(json::object& o, const ErrorMessage& m) {
  o["reason"] = to_string(m.reason);
  put_if(o, "message", m.message);
}

// ---------------------------------------------------------------------------------------------
// describe().

std::string list_text(const std::vector<int>& versions) {
  std::string out;
  for (int v : versions) {
    if (!out.empty()) out += ',';
    out += std::to_string(v);
  }
  return out;
}

class Line {
 public:
  explicit Line(std::string_view type) : out_(type) {}
  Line& word(std::string_view w) {
    out_ += ' ';
    out_ += w;
    return *this;
  }
  Line& text(std::string_view key, std::string_view value) {
    if (value.empty()) return *this;
    out_ += ' ';
    out_ += key;
    out_ += '=';
    out_ += quote(value, 200);
    return *this;
  }
  Line& raw(std::string_view key, std::string_view value) {
    out_ += ' ';
    out_ += key;
    out_ += '=';
    out_ += value;
    return *this;
  }
  Line& num(std::string_view key, std::int64_t value) { return raw(key, std::to_string(value)); }
  std::string str() && { return std::move(out_); }

 private:
  std::string out_;
};

void describe_session(Line& l, const SessionInfo& s) {
  l.text("session_key", s.session_key).text("user", s.user).text("client_name", s.client_name);
  l.text("client_address", s.client_address).raw("protocol", to_string(s.protocol));
  l.text("application", s.application);
}

std::string describe_one(const Challenge& m) {
  return std::move(Line(m.kType).raw("versions", "[" + list_text(m.versions) + "]").text("broker", m.broker)).str();
}
std::string describe_one(const Hello& m) {
  Line l(m.kType);
  l.text("machine", m.machine).raw("versions", "[" + list_text(m.versions) + "]");
  l.text("agent_version", m.agent_version);
  if (m.enroll) l.word("enroll").text("catalog", m.catalog);
  return std::move(l).str();
}
std::string describe_one(const Welcome& m) {
  Line l(m.kType);
  l.num("version", m.version).num("heartbeat_interval_seconds", m.heartbeat_interval_seconds);
  l.num("missed_heartbeats", m.missed_heartbeats);
  if (!m.machine_secret.empty()) l.raw("machine_secret", "(redacted)");
  return std::move(l).str();
}
std::string describe_one(const Rejected& m) {
  Line l(m.kType);
  l.raw("reason", to_string(m.reason)).text("message", m.message);
  if (m.retry_after_seconds) l.num("retry_after_seconds", m.retry_after_seconds);
  return std::move(l).str();
}
std::string describe_one(const Register& m) {
  Line l(m.kType);
  l.text("os", m.os).raw("session_support", to_string(m.session_support)).text("address", m.address);
  l.text("dns_name", m.dns_name);
  std::string caps;
  for (const auto& c : m.capabilities) caps += (caps.empty() ? "" : ",") + c;
  l.raw("capabilities", "[" + caps + "]").num("load_index", m.load_index);
  l.num("sessions", static_cast<std::int64_t>(m.sessions.size()));
  return std::move(l).str();
}
std::string describe_one(const Registered& m) { return std::string(m.kType); }
std::string describe_one(const Heartbeat& m) {
  return std::move(Line(m.kType).num("load_index", m.load_index).num("session_count", m.session_count)).str();
}
std::string describe_one(const SessionEvent& m) {
  Line l(m.kType);
  l.word(to_string(m.event));
  describe_session(l, m.session);
  return std::move(l).str();
}
std::string describe_one(const Command& m) {
  Line l(m.kType);
  l.text("id", m.id).word(command_name(m.args)).num("timeout_ms", m.timeout_ms);
  std::visit(
      [&](const auto& a) {
        using A = std::decay_t<decltype(a)>;
        if constexpr (std::is_same_v<A, PrepareSessionArgs>) {
          l.text("session_key", a.session_key).text("user", a.user).text("resource", a.resource);
          l.raw("session_type", to_string(a.session_type)).num("connect_timeout_seconds", a.connect_timeout_seconds);
        } else if constexpr (std::is_same_v<A, SendMessageArgs>) {
          if (a.all) l.word("all");
          l.text("session_key", a.session_key).num("text_bytes", static_cast<std::int64_t>(a.text.size()));
        } else if constexpr (!std::is_same_v<A, UnknownCommandArgs>) {
          l.text("session_key", a.session_key);
        }
      },
      m.args);
  return std::move(l).str();
}
std::string describe_one(const CommandResult& m) {
  Line l(m.kType);
  l.text("reply_to", m.reply_to).word(m.ok ? "ok" : "failed").text("error", m.error);
  return std::move(l).str();
}
std::string describe_one(const RedeemTicket& m) {
  return std::move(Line(m.kType).text("id", m.id).text("session_key", m.session_key)).str();
}
std::string describe_one(const Ticket& m) {
  Line l(m.kType);
  l.text("reply_to", m.reply_to);
  if (m.ok) {
    l.word("ok").text("user", m.user).text("credential_type", m.credential_type).text("session_key", m.session_key);
  } else {
    l.word("failed").raw("reason", to_string(m.reason)).text("message", m.message);
  }
  return std::move(l).str();
}
std::string describe_one(const Goodbye& m) {
  return std::move(Line(m.kType).raw("reason", to_string(m.reason)).text("message", m.message)).str();
}
std::string describe_one(const ErrorMessage& m) {
  return std::move(Line(m.kType).raw("reason", to_string(m.reason)).text("message", m.message)).str();
}

}  // namespace

// -----------------------------------------------------------------------------------------------
// Enumerations.

std::string_view to_string(Reason r) {
  const ReasonEntry* e = find_reason(r);
  return e ? e->name : "UnknownError";
}
std::string_view to_string(SessionSupport s) { return name_of(kSessionSupport, s); }
std::string_view to_string(SessionState s) { return name_of(kSessionState, s); }
std::string_view to_string(SessionEventKind e) { return name_of(kSessionEvent, e); }
std::string_view to_string(DisplayProtocol p) { return name_of(kProtocol, p); }
std::string_view to_string(SessionType t) { return name_of(kSessionType, t); }
std::string_view to_string(TicketFailure f) { return name_of(kTicketFailure, f); }

template <>
std::optional<Reason> from_string<Reason>(std::string_view name) {
  for (const auto& e : kReasons)
    if (e.name == name) return e.reason;
  return std::nullopt;
}
template <>
std::optional<SessionSupport> from_string<SessionSupport>(std::string_view name) {
  return value_of(kSessionSupport, name);
}
template <>
std::optional<SessionState> from_string<SessionState>(std::string_view name) {
  return value_of(kSessionState, name);
}
template <>
std::optional<SessionEventKind> from_string<SessionEventKind>(std::string_view name) {
  return value_of(kSessionEvent, name);
}
template <>
std::optional<DisplayProtocol> from_string<DisplayProtocol>(std::string_view name) {
  return value_of(kProtocol, name);
}
template <>
std::optional<SessionType> from_string<SessionType>(std::string_view name) {
  return value_of(kSessionType, name);
}
template <>
std::optional<TicketFailure> from_string<TicketFailure>(std::string_view name) {
  return value_of(kTicketFailure, name);
}

int reason_code(Reason r) {
  const ReasonEntry* e = find_reason(r);
  return e ? e->code : 300;
}

std::optional<Reason> reason_from_code(int code) {
  for (const auto& e : kReasons)
    if (e.code == code) return e.reason;
  return std::nullopt;
}

std::span<const Reason> all_reasons() {
  static const auto all = [] {
    std::array<Reason, std::size(kReasons)> out{};
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = kReasons[i].reason;
    return out;
  }();
  return all;
}

// -----------------------------------------------------------------------------------------------
// Messages.

std::string_view command_name(const CommandArgs& args) {
  return std::visit(
      [](const auto& a) -> std::string_view {
        if constexpr (std::is_same_v<std::decay_t<decltype(a)>, UnknownCommandArgs>) {
          return a.name;
        } else {
          return std::decay_t<decltype(a)>::kName;
        }
      },
      args);
}

std::string_view type_name(const Message& m) {
  return std::visit([](const auto& x) { return std::decay_t<decltype(x)>::kType; }, m);
}

Sender sender_of(const Message& m) {
  return std::visit([](const auto& x) { return std::decay_t<decltype(x)>::kSender; }, m);
}

common::Result<Message> parse(std::string_view text) {
  try {
    return parse_unchecked(text);
  } catch (const std::bad_alloc&) {
    return common::make_error(errc::internal, "out of memory while parsing a message");
  } catch (const std::exception& e) {
    return common::make_error(errc::internal, std::string("parse failed: ") + e.what());
  }
}

std::string serialize(const Message& m) {
  json::object o;
  o["type"] = type_name(m);
  std::visit([&](const auto& x) { write(o, x); }, m);
  return json::serialize(o);
}

common::Status validate(const Message& m) {
  auto parsed = parse(serialize(m));
  if (!parsed) return parsed.error();
  return {};
}

std::string describe(const Message& m) {
  return std::visit([](const auto& x) { return describe_one(x); }, m);
}

std::ostream& operator<<(std::ostream& os, const Message& m) { return os << describe(m); }

Reason rejection_reason(const common::Error& parse_error) {
  if (parse_error.message == kEmptyRegistration) return Reason::empty_registration_request;
  if (parse_error.message == kRequired) {
    if (parse_error.field == "agent_version") return Reason::missing_agent_version;
    if (parse_error.field == "capabilities") return Reason::missing_registration_capabilities;
  }
  return Reason::invalid_registration_request;
}

Reason handshake_rejection_reason(std::string_view expected, std::string_view text, const common::Error& parse_error) {
  // A bad member of a known type: the text is a JSON object with that type. Anything else (the
  // whole text, or its type) is wrong beyond a registration request.
  const bool member_error = !parse_error.field.empty() || parse_error.message == kEmptyRegistration;
  if (!member_error || parse_error.field == "type" || text.size() > kMaxMessageBytes) return Reason::protocol_error;
  json::parse_options options;
  options.max_depth = 32;
  boost::system::error_code ec;
  const json::value value = json::parse(text, ec, json::storage_ptr(), options);
  const json::object* obj = ec ? nullptr : value.if_object();
  const json::value* type = obj ? obj->if_contains("type") : nullptr;
  const json::string* type_text = type ? type->if_string() : nullptr;
  if (!type_text || *type_text != expected) return Reason::protocol_error;
  return rejection_reason(parse_error);
}

// -----------------------------------------------------------------------------------------------
// Versions and proofs.

std::optional<int> choose_version(std::span<const int> ours, std::span<const int> theirs) {
  std::optional<int> best;
  for (int v : ours)
    if (std::find(theirs.begin(), theirs.end(), v) != theirs.end() && (!best || v > *best)) best = v;
  return best;
}

std::string secret_hash(std::string_view secret) { return common::crypto::sha256_hex(secret); }

std::string make_nonce() { return common::crypto::random_hex(32); }
std::string make_machine_secret() { return common::crypto::random_hex(32); }

std::string compute_proof(std::string_view key_hex, std::string_view nonce, std::string_view machine,
                          std::span<const int> versions) {
  std::string data;
  data.reserve(nonce.size() + machine.size() + 2 + versions.size() * 3);
  data.append(nonce).append("\n").append(machine).append("\n");
  for (std::size_t i = 0; i < versions.size(); ++i) {
    if (i) data += ',';
    data += std::to_string(versions[i]);
  }
  return common::crypto::hmac_sha256_hex(key_hex, data);
}

std::string compute_broker_proof(std::string_view key_hex, std::string_view agent_nonce, std::string_view nonce,
                                 std::string_view machine, int version) {
  std::string data = "broker\n";
  data.append(agent_nonce).append("\n").append(nonce).append("\n").append(machine).append("\n");
  data += std::to_string(version);
  return common::crypto::hmac_sha256_hex(key_hex, data);
}

bool verify_proof(std::string_view key_hex, std::string_view nonce, std::string_view machine,
                  std::span<const int> versions, std::string_view proof) {
  return common::crypto::constant_time_equal(compute_proof(key_hex, nonce, machine, versions), proof);
}

bool verify_broker_proof(std::string_view key_hex, std::string_view agent_nonce, std::string_view nonce,
                         std::string_view machine, int version, std::string_view proof) {
  return common::crypto::constant_time_equal(compute_broker_proof(key_hex, agent_nonce, nonce, machine, version),
                                             proof);
}

bool is_hex64(std::string_view text) {
  return text.size() == 64 &&
         std::all_of(text.begin(), text.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

bool is_host_port(std::string_view address) {
  const auto colon = address.rfind(':');
  if (colon == std::string_view::npos) return false;
  const auto host = address.substr(0, colon);
  const auto port = address.substr(colon + 1);
  if (port.empty() || port.size() > 5) return false;
  int value = 0;
  for (char c : port) {
    if (c < '0' || c > '9') return false;
    value = value * 10 + (c - '0');
  }
  if (value < 1 || value > 65535) return false;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    const auto inner = host.substr(1, host.size() - 2);
    return inner.find(':') != std::string_view::npos && common::is_ip_address(inner);
  }
  if (host.find(':') != std::string_view::npos) return false;  // IPv6 needs brackets
  return is_dns_name(host);
}

}  // namespace cbp
