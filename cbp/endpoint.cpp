#include "cbp/endpoint.hpp"

#include "common/timers.hpp"

#include "broker/agent_registry.hpp"
#include "common/metrics.hpp"
#include "common/version.hpp"
#include "common/work_queue.hpp"

#include <boost/json.hpp>
#include <spdlog/spdlog.h>

#include <arpa/inet.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

namespace cbp {

using Clock = std::chrono::steady_clock;

namespace {
struct CloseEvent {
  std::string reason;
};
struct BinaryEvent {};  // a binary frame: a protocol error (docs/cbp.md "Transport")
using Inbound = std::variant<std::string, CloseEvent, BinaryEvent>;

// Whether a registry error is the broker's own trouble (storage unavailable or failing, a bug)
// rather than an answer about what the peer asked: such errors are never the agent's failure.
bool broker_trouble(const common::Error& e) {
  switch (e.code) {
    case common::errc::not_found:
    case common::errc::forbidden:
    case common::errc::conflict:
    case common::errc::invalid_argument:
    case common::errc::unauthorized: return false;
    default: return true;
  }
}

// The HMAC key checked when a hello names no machine with a secret, so that every failed hello
// costs the same work (the answer is the same anyway: BadProof).
const std::string kNoVerifier(64, '0');

struct PendingCommand {
  Clock::time_point deadline;
  std::function<void(CommandOutcome)> done;
};

// The per-address key: the address, or for IPv6 (not IPv4-mapped) its /64, which one host
// usually holds whole.
std::string address_key(const std::string& address) {
  std::array<unsigned char, 16> bytes{};
  static constexpr unsigned char kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (address.find(':') == std::string::npos || inet_pton(AF_INET6, address.c_str(), bytes.data()) != 1 ||
      std::memcmp(bytes.data(), kMapped, 12) == 0)
    return address;
  std::fill(bytes.begin() + 8, bytes.end(), 0);
  char out[INET6_ADDRSTRLEN];
  return inet_ntop(AF_INET6, bytes.data(), out, sizeof out) ? std::string(out) + "/64" : address;
}

// Failed authentications per remote address (EndpointOptions::max_auth_failures_per_address),
// in fixed windows. At most `max_entries` addresses are remembered: when full, addresses with
// neither a back-off nor a failure in the current window are forgotten first, then any address
// not in back-off. Not thread-safe (the endpoint's mutex guards it).
class AddressFailures {
 public:
  AddressFailures(int max_failures, Clock::duration window, Clock::duration backoff, std::size_t max_entries)
      : max_failures_(max_failures), window_(window), backoff_(backoff), max_entries_(max_entries) {}

  bool in_back_off(const std::string& key, Clock::time_point now) const {
    auto it = entries_.find(key);
    return it != entries_.end() && now < it->second.backoff_until;
  }
  // Counts a failure; true when it puts the address in back-off.
  bool record(const std::string& key, Clock::time_point now) {
    if (max_failures_ <= 0) return false;
    auto it = entries_.find(key);
    if (it == entries_.end()) {
      if (entries_.size() >= max_entries_ && !make_room(now)) return false;
      it = entries_.emplace(key, Entry{now, 0, {}}).first;
    }
    Entry& e = it->second;
    if (now - e.window_start >= window_) e = Entry{now, 0, e.backoff_until};
    if (++e.failures < max_failures_) return false;
    e.backoff_until = now + backoff_;
    e.failures = 0;
    e.window_start = now;
    return true;
  }
  std::size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    Clock::time_point window_start;
    int failures = 0;
    Clock::time_point backoff_until;
  };
  bool make_room(Clock::time_point now) {
    std::erase_if(entries_, [&](const auto& kv) {
      return now >= kv.second.backoff_until && now - kv.second.window_start >= window_;
    });
    if (entries_.size() < max_entries_) return true;
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if (now >= it->second.backoff_until) {
        entries_.erase(it);
        return true;
      }
    return false;  // every address is in back-off: the new one goes uncounted
  }

  int max_failures_;
  Clock::duration window_, backoff_;
  std::size_t max_entries_;
  std::unordered_map<std::string, Entry> entries_;
};
}  // namespace

struct AgentEndpoint::Impl : std::enable_shared_from_this<AgentEndpoint::Impl> {
  broker::AgentRegistry& registry;
  common::WorkQueue& work;
  EndpointOptions options;
  std::shared_ptr<spdlog::logger> log;
  common::Metrics* metrics;

  mutable std::mutex mutex;
  std::map<std::string, std::weak_ptr<Connection>> registered;  // machine -> current connection
  std::vector<std::weak_ptr<Connection>> all;                   // for deadlines
  std::atomic<bool> shutting_down{false};
  std::atomic<std::uint64_t> next_id{1};
  std::function<void(const std::string&)> registered_observer;  // set before the listener starts
  AddressFailures address_failures;  // guarded by mutex

  std::mutex timer_mutex;
  std::condition_variable timer_cv;
  bool stop_timer = false;
  std::thread timer;          // without options.scheduler
  std::uint64_t timer_id = 0;  // with options.scheduler: the pending check; guarded by timer_mutex

  Impl(broker::AgentRegistry& r, common::WorkQueue& w, EndpointOptions o, std::shared_ptr<spdlog::logger> l,
       common::Metrics* m)
      : registry(r),
        work(w),
        options(std::move(o)),
        log(std::move(l)),
        metrics(m),
        address_failures(options.max_auth_failures_per_address, options.address_failure_window,
                         options.address_backoff, options.max_tracked_addresses) {}

  bool address_in_back_off(const std::string& address) {
    std::lock_guard lock(mutex);
    return address_failures.in_back_off(address_key(address), Clock::now());
  }
  void address_failed(const std::string& address) {
    bool started;
    {
      std::lock_guard lock(mutex);
      started = address_failures.record(address_key(address), Clock::now());
    }
    if (started) {
      count("hello", "address_back_off_started");
      log->warn("agent endpoint: {} failed authentications from {} within {} s: the address is in back-off for {} s",
                options.max_auth_failures_per_address, address_key(address), options.address_failure_window.count(),
                options.address_backoff.count());
    }
  }

  void count(const char* what, std::string_view result) {
    if (metrics) metrics->add("broker_cbp_events_total", {{"event", what}, {"result", std::string(result)}});
  }
  void tick();
  // heartbeat_interval x missed_heartbeats: silent longer than this, an agent has lost contact.
  std::chrono::milliseconds contact_window() const {
    return std::chrono::duration_cast<std::chrono::milliseconds>(options.heartbeat_interval *
                                                                 options.missed_heartbeats);
  }
};

constexpr std::chrono::seconds kWrongUserLogoffTimeout{30};

struct AgentEndpoint::Connection : net::WebSocketSession, std::enable_shared_from_this<AgentEndpoint::Connection> {
  enum class State { awaiting_hello, awaiting_register, registered, closed };

  std::shared_ptr<Impl> ep;
  std::shared_ptr<net::WebSocketPeer> peer;
  std::string nonce = make_nonce();

  std::mutex mutex;  // guards the fields below
  std::deque<Inbound> inbox;
  std::size_t inbox_bytes = 0;  // of the text messages in inbox
  bool overflowed = false;      // closed for a full inbox: later messages are dropped
  bool draining = false;
  State state = State::awaiting_hello;
  Clock::time_point deadline;
  Clock::time_point last_heard = Clock::now();  // any message from the agent
  std::string machine;
  std::string agent_version;  // from hello
  int version = 0;
  std::string goodbye_reason;
  std::string rejected_reason;  // the `rejected` sent, recorded on the machine once closed
  bool superseded = false;
  std::vector<std::string> capabilities;  // what the agent said it can do (commands are gated on it)
  std::map<std::string, PendingCommand> commands;

  Connection(std::shared_ptr<Impl> e, std::shared_ptr<net::WebSocketPeer> p) : ep(std::move(e)), peer(std::move(p)) {}

  void start() {
    {
      std::lock_guard lock(mutex);
      deadline = Clock::now() + ep->options.hello_timeout;
    }
    Challenge c;
    c.nonce = nonce;
    c.versions.assign(kProtocolVersions.begin(), kProtocolVersions.end());
    c.broker = ep->options.broker_name + "/" + common::kVersion;
    send(c);
  }

  // Sends a command on this connection; `done` gets its outcome (see AgentEndpoint::send_command).
  void command(CommandArgs args, std::chrono::milliseconds timeout, std::function<void(CommandOutcome)> done) {
    Command cmd;
    cmd.id = "c-" + std::to_string(ep->next_id++);
    cmd.timeout_ms = std::max<std::int64_t>(1, timeout.count());
    cmd.args = std::move(args);
    std::optional<CommandOutcome> refused;  // reported after the lock is released: `done` may call us
    {
      std::lock_guard lock(mutex);
      const auto name = std::string(command_name(cmd.args));
      if (state != State::registered)
        refused = CommandOutcome{false, "not connected"};
      else if (std::find(capabilities.begin(), capabilities.end(), name) == capabilities.end())
        refused = CommandOutcome{false, "the agent does not support " + name};
      else
        commands[cmd.id] = PendingCommand{Clock::now() + timeout, std::move(done)};
    }
    if (refused) {
      done(std::move(*refused));
      return;
    }
    send(cmd);
  }

  void send(const Message& m) { peer->send(serialize(m)); }

  // Sends `rejected` (during the handshake) or `error` with `message`, then closes. `detail` goes
  // to the log only (what the peer must not learn, e.g. that a machine has no secret yet).
  // `retry_after`: of a TooManyFailures rejection (the back-off's whole length).
  void fail(Reason reason, const std::string& message, bool rejected, const std::string& detail = {},
            std::chrono::seconds retry_after = kAuthBackoff) {
    {
      // Before the reply goes out: the peer may close as soon as it reads it, and closed() must
      // then find the rejection to record.
      std::lock_guard lock(mutex);
      state = State::closed;
      // docs/cbp.md "Rejections": recorded on the machine, except a back-off and the broker's own
      // trouble (nothing is written).
      if (rejected && reason != Reason::too_many_failures && reason != Reason::unavailable)
        rejected_reason = std::string(to_string(reason));
    }
    if (rejected) {
      Rejected r;
      r.reason = reason;
      r.message = message;
      // The registry does not say how much of the back-off is left: its whole length is the
      // soonest retry that cannot be refused again.
      if (reason == Reason::too_many_failures) r.retry_after_seconds = retry_after.count();
      if (reason == Reason::unavailable) r.retry_after_seconds = kUnavailableRetryAfter.count();
      send(r);
    } else {
      ErrorMessage e;
      e.reason = reason;
      e.message = message;
      send(e);
    }
    ep->log->info("agent {} ({}): {} {}: {}{}{}", machine.empty() ? "?" : machine, peer->remote_address(),
                  rejected ? "rejected" : "error", to_string(reason), message, detail.empty() ? "" : ": ", detail);
    peer->close(std::string(to_string(reason)));
  }

  // WebSocketSession: queue and process in order on the work queue.
  void on_message(std::string message) override {
    {
      std::lock_guard lock(mutex);
      last_heard = Clock::now();
    }
    enqueue(std::move(message));
  }
  void on_close(const std::string& reason) override { enqueue(CloseEvent{reason}); }
  // A binary frame: answered like any other protocol error, after the messages before it; the
  // transport delivers nothing after it and closes with 1003 when fail() closes.
  bool on_binary_message() override {
    enqueue(BinaryEvent{});
    return true;
  }

  void enqueue(Inbound item) {
    bool start_drain = false;
    std::optional<bool> overflow;  // set when this item overflows the inbox: whether in the handshake
    std::size_t held = 0, held_bytes = 0;
    {
      std::lock_guard lock(mutex);
      const bool close_event = std::holds_alternative<CloseEvent>(item);
      if (overflowed && !close_event) return;  // the close is on its way
      const std::size_t bytes = std::holds_alternative<std::string>(item) ? std::get<std::string>(item).size() : 0;
      const bool handshake = state == State::awaiting_hello || state == State::awaiting_register;
      const auto& o = ep->options;
      const std::size_t max_messages = handshake ? std::min(o.max_inbox_messages, o.max_handshake_inbox_messages)
                                                 : o.max_inbox_messages;
      if (!close_event && state != State::closed &&
          (inbox.size() + 1 > max_messages || inbox_bytes + bytes > o.max_inbox_bytes)) {
        overflowed = true;
        overflow = handshake;
        held = inbox.size() + 1;
        held_bytes = inbox_bytes + bytes;
        // What is queued will not be answered: drop it now (the close event still comes).
        inbox.clear();
        inbox_bytes = 0;
      } else {
        inbox_bytes += bytes;
        inbox.push_back(std::move(item));
        if (!draining) draining = start_drain = true;
      }
    }
    if (overflow) return close_flooding(*overflow, held, held_bytes);
    if (!start_drain) return;
    auto self = shared_from_this();
    if (!ep->work.post([self] { self->drain(); })) {
      std::lock_guard lock(mutex);
      draining = false;
    }
  }

  // The peer sent more than the inbox holds (EndpointOptions::max_inbox_*): told why and closed,
  // on the thread that received the message. Nothing queued is processed; the close event is.
  void close_flooding(bool handshake, std::size_t messages, std::size_t bytes) {
    ep->count("message", "inbox_full");
    const std::string message = "too many messages waiting to be processed (" + std::to_string(messages) +
                                " messages, " + std::to_string(bytes) +
                                " bytes): wait for the broker's answers before sending more";
    if (handshake) {
      Rejected r;
      r.reason = Reason::protocol_error;
      r.message = message;
      send(r);
    } else {
      ErrorMessage e;
      e.reason = Reason::protocol_error;
      e.message = message;
      send(e);
    }
    ep->log->warn("agent connection from {}: {} {}: {}", peer->remote_address(), handshake ? "rejected" : "error",
                  to_string(Reason::protocol_error), message);
    peer->close("too many messages waiting");
  }

  void drain() {
    for (;;) {
      Inbound item;
      {
        std::lock_guard lock(mutex);
        if (inbox.empty()) {
          draining = false;
          return;
        }
        item = std::move(inbox.front());
        inbox.pop_front();
        if (const auto* text = std::get_if<std::string>(&item)) inbox_bytes -= text->size();
      }
      try {
        if (auto* text = std::get_if<std::string>(&item))
          handle(*text);
        else if (auto* close = std::get_if<CloseEvent>(&item))
          closed(close->reason);
        else
          binary();
      } catch (const std::exception& e) {
        ep->log->error("agent {}: {}", machine, e.what());
        bool handshake;
        {
          std::lock_guard lock(mutex);
          handshake = state == State::awaiting_hello || state == State::awaiting_register;
        }
        fail(Reason::unknown_error, "internal error", handshake);
      }
    }
  }

  void handle(const std::string& text) {
    State current;
    {
      std::lock_guard lock(mutex);
      current = state;
    }
    if (current == State::closed) return;
    const bool handshake = current != State::registered;
    auto parsed = parse(text);
    if (!parsed) {
      ep->count("message", "invalid");
      // docs/cbp.md "Protocol errors during the handshake": a bad member of the hello or register
      // awaited is InvalidRegistrationRequest (or a more specific reason), anything else ProtocolError.
      const std::string_view expected = current == State::awaiting_hello ? Hello::kType : Register::kType;
      fail(handshake ? handshake_rejection_reason(expected, text, parsed.error()) : Reason::protocol_error,
           parsed.error().describe(), handshake);
      return;
    }
    const Message& m = *parsed;
    if (sender_of(m) == Sender::broker) {
      fail(Reason::protocol_error, "'" + std::string(type_name(m)) + "' is sent by the broker, not by agents",
           handshake);
      return;
    }
    if (auto* e = std::get_if<ErrorMessage>(&m)) {
      ep->log->warn("agent {} reported an error: {}: {}", machine, to_string(e->reason), e->message);
      peer->close("agent error");
      return;
    }
    switch (current) {
      case State::awaiting_hello:
        if (auto* h = std::get_if<Hello>(&m)) return on_hello(*h);
        break;
      case State::awaiting_register:
        if (auto* r = std::get_if<Register>(&m)) return on_register(*r);
        break;
      case State::registered:
        if (auto* hb = std::get_if<Heartbeat>(&m)) return on_heartbeat(*hb);
        if (auto* ev = std::get_if<SessionEvent>(&m)) return on_session_event(*ev);
        if (auto* cr = std::get_if<CommandResult>(&m)) return on_command_result(*cr);
        if (auto* rt = std::get_if<RedeemTicket>(&m)) return on_redeem(*rt);
        if (auto* g = std::get_if<Goodbye>(&m)) {
          {
            std::lock_guard lock(mutex);
            goodbye_reason = std::string(to_string(g->reason));
          }
          peer->close("goodbye");
          return;
        }
        break;
      case State::closed: return;
    }
    fail(Reason::protocol_error, "unexpected '" + std::string(type_name(m)) + "' at this point of the conversation",
         current != State::registered);
  }

  void binary() {
    State current;
    {
      std::lock_guard lock(mutex);
      current = state;
    }
    if (current == State::closed) {
      peer->close("binary message");  // already failing: the transport still waits for a close
      return;
    }
    ep->count("message", "invalid");
    fail(Reason::protocol_error, "binary frames are not allowed: a CBP message is one JSON text frame",
         current != State::registered);
  }

  // The broker cannot answer this handshake now (storage trouble): the agent retries later, and
  // nothing counts against it (docs/cbp.md "What the broker checks at hello").
  void unavailable(const char* step, const common::Error& why) {
    ep->count(step, "unavailable");
    ep->log->warn("agent {} ({}): cannot complete the {}: {}", machine, peer->remote_address(), step, why.describe());
    fail(Reason::unavailable, "the broker cannot complete the handshake now; retry later", true);
  }

  // docs/cbp.md "Registration limit": the listener accepted this connection over its cap, so
  // that the agent hears why. Nothing is examined, counted against the agent or recorded.
  void refuse_over_limit() {
    {
      std::lock_guard lock(mutex);
      state = State::closed;
    }
    ep->count("hello", "limit_reached");
    Rejected r;
    r.reason = Reason::broker_registration_limit_reached;
    r.message = "the broker accepts no more agent connections now; retry later";
    // 60..120 s, spread by the (random) nonce so that refused agents do not come back together.
    r.retry_after_seconds = 60 + static_cast<std::int64_t>(std::stoul(nonce.substr(0, 4), nullptr, 16) % 61);
    send(r);
    ep->log->debug("agent {} ({}): rejected {}", machine, peer->remote_address(), to_string(r.reason));
    peer->close(std::string(to_string(r.reason)));
  }

  void on_hello(const Hello& h) {
    machine = h.machine;
    agent_version = h.agent_version;
    if (peer->over_limit()) return refuse_over_limit();
    auto& reg = ep->registry;
    const std::string who = h.machine + "|" + peer->remote_address();  // back-off key
    if (ep->address_in_back_off(peer->remote_address())) {
      ep->count("hello", "address_back_off");
      return fail(Reason::too_many_failures, "too many failed attempts; retry later", true,
                  "too many failed authentications from this address, whatever the machine", ep->options.address_backoff);
    }
    if (reg.in_back_off(who)) {
      ep->count("hello", "back_off");
      return fail(Reason::too_many_failures, "too many failed attempts; retry later", true);
    }
    // An authentication failure counts for the (machine, address) pair and for the address.
    const auto auth_failed = [&] {
      reg.record_failure(who);
      ep->address_failed(peer->remote_address());
    };
    auto chosen = choose_version(kProtocolVersions, h.versions);
    if (!chosen) {
      ep->count("hello", "incompatible_version");
      return fail(Reason::incompatible_version, "this broker speaks protocol version 1", true);
    }
    std::string key, secret;
    if (h.enroll) {
      auto verifier = reg.enrollment_verifier(h.catalog);
      if (!verifier && broker_trouble(verifier.error())) return unavailable("hello", verifier.error());
      if (!verifier) {
        auth_failed();
        ep->count("hello", "enrollment_refused");
        return fail(Reason::enrollment_refused, "catalog '" + h.catalog + "' does not accept enrollment", true);
      }
      if (!verify_proof(*verifier, nonce, h.machine, h.versions, h.proof)) {
        auth_failed();
        ep->count("hello", "bad_proof");
        return fail(Reason::bad_proof, "the proof does not verify", true);
      }
      auto enrolled = reg.enroll(h.machine, h.catalog);
      if (!enrolled && broker_trouble(enrolled.error())) return unavailable("hello", enrolled.error());
      if (!enrolled) {
        // Not an authentication failure: the proof was right, the machine cannot enroll.
        ep->count("hello", "enrollment_refused");
        return fail(Reason::enrollment_refused, enrolled.error().message, true);
      }
      key = *verifier;
      secret = *enrolled;
    } else {
      auto verifier = reg.machine_verifier(h.machine);
      if (!verifier && broker_trouble(verifier.error())) return unavailable("hello", verifier.error());
      // An unknown machine, a machine without a secret and a wrong proof look the same to the peer
      // (docs/cbp.md "Information given away"); the log tells them apart.
      const bool verified = verify_proof(verifier ? *verifier : kNoVerifier, nonce, h.machine, h.versions, h.proof);
      if (!verifier || !verified) {
        auth_failed();
        ep->count("hello", !verifier && verifier.error().code == common::errc::not_found ? "unknown_machine"
                           : !verifier                                                    ? "no_secret"
                                                                                          : "bad_proof");
        return fail(Reason::bad_proof, "the proof does not verify", true,
                    verifier ? std::string("wrong proof") : verifier.error().message);
      }
      key = *verifier;
    }
    reg.record_success(who);
    Welcome w;
    w.version = *chosen;
    w.heartbeat_interval_seconds = ep->options.heartbeat_interval.count();
    w.missed_heartbeats = ep->options.missed_heartbeats;
    w.broker_proof = compute_broker_proof(key, h.agent_nonce, nonce, h.machine, *chosen);
    w.machine_secret = secret;
    {
      std::lock_guard lock(mutex);
      version = *chosen;
      state = State::awaiting_register;
      deadline = Clock::now() + ep->options.register_timeout;
    }
    send(w);
  }

  void on_register(const Register& r) {
    broker::Registration reg;
    reg.machine = machine;
    reg.agent_version = agent_version;
    reg.os = r.os;
    reg.session_support = std::string(to_string(r.session_support));
    reg.address = r.address;
    reg.protocol_version = version;
    reg.load_index = r.load_index;
    for (const auto& s : r.sessions) {
      broker::AgentSession a;
      a.session_key = s.session.session_key;
      a.user = s.session.user;
      a.state = s.state == SessionState::preparing ? "PreparingNewSession" : std::string(to_string(s.state));
      a.client_name = s.session.client_name;
      a.client_address = s.session.client_address;
      a.protocol = std::string(to_string(s.session.protocol));
      a.application = s.session.application;
      reg.sessions.push_back(std::move(a));
    }
    auto result = ep->registry.register_agent(reg);
    if (!result && broker_trouble(result.error())) return unavailable("register", result.error());
    if (!result) {
      ep->count("register", "error");
      return fail(Reason::unknown_error, result.error().message, true);
    }
    if (*result) {
      ep->count("register", (*result)->reason);
      return fail(from_string<Reason>((*result)->reason).value_or(Reason::invalid_registration_request),
                  (*result)->message, true);
    }
    std::shared_ptr<Connection> previous;
    {
      std::lock_guard lock(ep->mutex);
      auto& slot = ep->registered[machine];
      previous = slot.lock();
      slot = weak_from_this();
    }
    if (previous && previous.get() != this) {
      {
        std::lock_guard lock(previous->mutex);
        previous->superseded = true;
      }
      ep->log->info("agent {}: a new connection from {} replaces the one from {}", machine, peer->remote_address(),
                    previous->peer->remote_address());
      ErrorMessage e;
      e.reason = Reason::superseded;
      e.message = "a newer connection registered this machine";
      previous->send(e);
      previous->peer->close("superseded");
    }
    {
      std::lock_guard lock(mutex);
      state = State::registered;
      capabilities = r.capabilities;
    }
    ep->count("register", "ok");
    send(Registered{});
    if (ep->registered_observer) ep->registered_observer(machine);
  }

  void on_heartbeat(const Heartbeat& hb) {
    if (auto st = ep->registry.heartbeat(machine, hb.load_index, hb.session_count); !st)
      ep->log->warn("agent {}: heartbeat not stored: {}", machine, st.error().describe());
  }

  void on_session_event(const SessionEvent& ev) {
    broker::AgentSession a;
    a.session_key = ev.session.session_key;
    a.user = ev.session.user;
    a.client_name = ev.session.client_name;
    a.client_address = ev.session.client_address;
    a.protocol = std::string(to_string(ev.session.protocol));
    a.application = ev.session.application;
    auto outcome = ep->registry.session_event(machine, std::string(to_string(ev.event)), a);
    if (!outcome) {
      ep->log->warn("agent {}: session event {} not stored: {}", machine, to_string(ev.event),
                    outcome.error().describe());
      return;
    }
    if (!outcome->end_session) return;
    // docs/cbp.md "Session events": not the brokered user: the session is logged off.
    auto log = ep->log;
    const auto m = machine, key = a.session_key;
    command(LogoffSessionArgs{key}, kWrongUserLogoffTimeout, [log, m, key](CommandOutcome o) {
      if (!o.ok) log->warn("agent {}: logoff of session {} (wrong user) failed: {}", m, key, o.error);
    });
  }

  void on_command_result(const CommandResult& cr) {
    PendingCommand pending;
    {
      std::lock_guard lock(mutex);
      auto it = commands.find(cr.reply_to);
      if (it == commands.end()) {
        ep->log->info("agent {}: result for unknown or timed-out command '{}'", machine, cr.reply_to);
        return;
      }
      pending = std::move(it->second);
      commands.erase(it);
    }
    pending.done({cr.ok, cr.ok ? std::string() : (cr.error.empty() ? std::string("refused") : cr.error)});
  }

  void on_redeem(const RedeemTicket& rt) {
    Ticket reply;
    reply.reply_to = rt.id;
    auto t = ep->registry.redeem_ticket(machine, rt.ticket);
    if (t) {
      reply.ok = true;
      reply.user = t->user_name;
      reply.credential_type = t->credential_type;
      boost::system::error_code ec;
      auto data = boost::json::parse(t->credential_data, ec);
      if (!ec && data.is_object())
        for (const auto& [k, v] : data.as_object())
          if (v.is_string()) reply.credential_data[std::string(k)] = std::string(v.get_string());
      reply.session_key = rt.session_key;
      ep->count("redeem_ticket", "ok");
    } else {
      reply.ok = false;
      const auto& msg = t.error().message;
      reply.reason = msg == "expired"                      ? TicketFailure::expired
                     : msg == "issued for another machine" ? TicketFailure::wrong_machine
                     : msg == "already redeemed"           ? TicketFailure::already_redeemed
                     : msg == "unknown ticket"             ? TicketFailure::not_found
                                                           : TicketFailure::refused;
      reply.message =
          t.error().code == common::errc::not_found ? msg : std::string("the broker cannot redeem tickets now");
      ep->count("redeem_ticket", to_string(reply.reason));
    }
    send(reply);
  }

  void closed(const std::string& transport_reason) {
    std::map<std::string, PendingCommand> orphaned;
    std::string bye, rejection;
    bool was_superseded;
    {
      std::lock_guard lock(mutex);
      state = State::closed;
      orphaned.swap(commands);
      bye = goodbye_reason;
      rejection = rejected_reason;
      was_superseded = superseded;
    }
    for (auto& [id, p] : orphaned) p.done({false, "connection closed"});
    if (machine.empty()) return;
    bool current = false, registered_elsewhere = false;
    {
      std::lock_guard lock(ep->mutex);
      auto it = ep->registered.find(machine);
      if (it != ep->registered.end() && it->second.lock().get() == this) {
        ep->registered.erase(it);
        current = true;
      } else if (it != ep->registered.end()) {
        registered_elsewhere = !it->second.expired();
      }
    }
    if (!rejection.empty()) {
      // A rejected handshake records its reason on a machine that exists (a no-op for unknown
      // names), unless another connection has it registered: that registration goes on.
      if (registered_elsewhere || ep->shutting_down) return;
      if (auto st = ep->registry.record_rejection(machine, rejection); !st)
        ep->log->warn("agent {}: rejection not stored: {}", machine, st.error().describe());
      return;
    }
    // Only the machine's current registration deregisters it. Its state may already be `closed`
    // (fail() after a protocol error): the machine is Unregistered all the same.
    if (!current || was_superseded || ep->shutting_down) return;
    const std::string reason = !bye.empty() ? bye : std::string(to_string(Reason::contact_lost));
    ep->log->info("agent {} disconnected ({}): {}", machine, transport_reason, reason);
    ep->count("deregister", reason);
    if (auto st = ep->registry.deregister(machine, reason); !st)
      ep->log->warn("agent {}: deregistration not stored: {}", machine, st.error().describe());
  }
};

void AgentEndpoint::Impl::tick() {
  const auto now = Clock::now();
  std::vector<std::shared_ptr<Connection>> live;
  {
    std::lock_guard lock(mutex);
    std::vector<std::weak_ptr<Connection>> keep;
    for (auto& w : all)
      if (auto c = w.lock()) {
        live.push_back(c);
        keep.push_back(w);
      }
    all.swap(keep);
  }
  for (auto& c : live) {
    bool handshake_expired = false, silent = false;
    std::vector<PendingCommand> expired;
    {
      std::lock_guard lock(c->mutex);
      // Only a connection that sent nothing in time is late: a message queued or being processed
      // (the work queue is busy with storage) met the deadline. Marked closed under this lock, so
      // no message that arrives meanwhile is processed.
      handshake_expired =
          (c->state == Connection::State::awaiting_hello || c->state == Connection::State::awaiting_register) &&
          now > c->deadline && c->inbox.empty() && !c->draining;
      if (handshake_expired) c->state = Connection::State::closed;
      // docs/cbp.md "Heartbeats and contact loss": silent for the whole window.
      silent = c->state == Connection::State::registered && now - c->last_heard > contact_window();
      if (silent) c->state = Connection::State::closed;
      for (auto it = c->commands.begin(); it != c->commands.end();) {
        if (now > it->second.deadline) {
          expired.push_back(std::move(it->second));
          it = c->commands.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (auto& p : expired) p.done({false, "timeout"});
    if (handshake_expired) c->fail(Reason::timeout, "the handshake did not complete in time", true);
    if (silent)
      c->fail(Reason::contact_lost,
              "no message for " +
                  std::to_string(std::chrono::duration_cast<std::chrono::seconds>(contact_window()).count()) + " s",
              false);
  }
}

AgentEndpoint::AgentEndpoint(broker::AgentRegistry& registry, common::WorkQueue& work, EndpointOptions options,
                             std::shared_ptr<spdlog::logger> logger, common::Metrics* metrics)
    : impl_(std::make_shared<Impl>(registry, work, std::move(options), std::move(logger), metrics)) {
  if (metrics)
    metrics->describe("broker_cbp_events_total", common::Metrics::Type::counter,
                      "Agent protocol events (hello, register, redeem_ticket, deregister, message) by result.");
  if (impl_->options.scheduler) {
    arm_deadline_checks(impl_);
    return;
  }
  impl_->timer = std::thread([impl = impl_.get()] {
    std::unique_lock lock(impl->timer_mutex);
    while (!impl->stop_timer) {
      impl->timer_cv.wait_for(lock, std::chrono::milliseconds(200));
      if (impl->stop_timer) break;
      lock.unlock();
      impl->tick();
      lock.lock();
    }
  });
}

void AgentEndpoint::arm_deadline_checks(const std::shared_ptr<Impl>& impl) {
  std::lock_guard lock(impl->timer_mutex);
  if (impl->stop_timer) return;
  impl->timer_id = impl->options.scheduler->after(std::chrono::milliseconds(200), [weak = std::weak_ptr<Impl>(impl)] {
    auto self = weak.lock();
    if (!self) return;
    {
      std::lock_guard inner(self->timer_mutex);
      if (self->stop_timer) return;
    }
    self->tick();
    arm_deadline_checks(self);
  });
}

AgentEndpoint::~AgentEndpoint() {
  {
    std::lock_guard lock(impl_->timer_mutex);
    impl_->stop_timer = true;
    if (impl_->options.scheduler && impl_->timer_id != 0) impl_->options.scheduler->cancel(impl_->timer_id);
  }
  impl_->timer_cv.notify_all();
  if (impl_->timer.joinable()) impl_->timer.join();
}

net::WebSocketHandler AgentEndpoint::handler() {
  net::WebSocketHandler h;
  h.path = std::string(kPath);
  h.max_message_bytes = kMaxMessageBytes;
  // A backstop only: tick() notices the silence first and tells the agent (ContactLost).
  h.idle_timeout = impl_->contact_window() +
                   std::chrono::duration_cast<std::chrono::milliseconds>(impl_->options.heartbeat_interval);
  std::weak_ptr<Impl> weak = impl_;
  h.on_open = [weak](std::shared_ptr<net::WebSocketPeer> peer) -> std::shared_ptr<net::WebSocketSession> {
    auto impl = weak.lock();
    if (!impl) return nullptr;
    auto c = std::make_shared<Connection>(impl, std::move(peer));
    {
      std::lock_guard lock(impl->mutex);
      impl->all.push_back(c);
    }
    c->start();
    return c;
  };
  return h;
}

void AgentEndpoint::send_command(const std::string& machine, CommandArgs args, std::chrono::milliseconds timeout,
                                 std::function<void(CommandOutcome)> done) {
  std::shared_ptr<Connection> c;
  {
    std::lock_guard lock(impl_->mutex);
    auto it = impl_->registered.find(machine);
    if (it != impl_->registered.end()) c = it->second.lock();
  }
  if (!c) {
    done({false, "not connected"});
    return;
  }
  c->command(std::move(args), timeout, std::move(done));
}

void AgentEndpoint::disconnect(const std::string& machine, Reason reason) {
  std::shared_ptr<Connection> c;
  {
    std::lock_guard lock(impl_->mutex);
    auto it = impl_->registered.find(machine);
    if (it != impl_->registered.end()) c = it->second.lock();
  }
  if (!c) return;
  {
    std::lock_guard lock(c->mutex);
    c->goodbye_reason = std::string(to_string(reason));
  }
  ErrorMessage e;
  e.reason = reason;
  e.message = "the broker ends this registration";
  c->send(e);
  c->peer->close(std::string(to_string(reason)));
}

void AgentEndpoint::begin_shutdown() {
  impl_->shutting_down = true;
  std::vector<std::shared_ptr<Connection>> live;
  {
    std::lock_guard lock(impl_->mutex);
    for (const auto& [m, w] : impl_->registered)
      if (auto c = w.lock()) live.push_back(std::move(c));
  }
  ErrorMessage e;
  e.reason = Reason::broker_shutdown;
  e.message = "the broker is stopping";
  for (auto& c : live) c->send(e);  // the server's stop then closes them (1001)
}

std::vector<std::string> AgentEndpoint::registered_machines() const {
  std::vector<std::string> out;
  std::lock_guard lock(impl_->mutex);
  for (const auto& [m, w] : impl_->registered)
    if (!w.expired()) out.push_back(m);
  return out;
}

void AgentEndpoint::on_registered(std::function<void(const std::string& machine)> observer) {
  impl_->registered_observer = std::move(observer);
}

}  // namespace cbp
