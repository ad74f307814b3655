// tools/vda-agent/agent.cpp: the simulated machines (see agent.hpp).
//
// Shape: each Machine::Impl is a state machine guarded by its own mutex. Everything that happens
// to it arrives on a pool thread (connection opened, message, close, timer) or from the scripted
// API, takes the mutex, updates the state and sends through the WebSocketPeer (which only
// queues). Connections and timers carry the generation of the connection they belong to, so a
// late callback of an earlier connection is ignored. The pool's connect() is the one call made
// without the mutex: it may report a failure synchronously.
#include "tools/vda-agent/agent.hpp"

#include "common/log.hpp"
#include "common/version.hpp"
#include "net/websocket_client.hpp"

#include <boost/json.hpp>
#include <spdlog/spdlog.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

namespace vda {

namespace json = boost::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::string_view kSingleSessionOs = "Windows 11 Enterprise 23H2 (simulated)";
constexpr std::string_view kMultiSessionOs = "Windows Server 2022 Datacenter (simulated)";
constexpr std::string_view kDisplayPort = "1494";
constexpr auto kMinHeartbeatGap = std::chrono::seconds(1);  // "SHOULD NOT send more than one per second"

double jitter() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return std::uniform_real_distribution<double>(0.5, 1.5)(rng);
}

Millis random_below(Millis limit) {
  if (limit.count() <= 0) return Millis{0};
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return Millis{std::uniform_int_distribution<std::int64_t>(0, limit.count())(rng)};
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
         });
}

// Writes `text` to `path` atomically; returns an error text, empty on success.
std::string write_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return "cannot write " + tmp + ": " + std::strerror(errno);
  std::size_t done = 0;
  while (done < text.size()) {
    const auto n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const std::string err = std::strerror(errno);
      ::close(fd);
      return "cannot write " + tmp + ": " + err;
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const std::string err = std::strerror(errno);
    ::close(fd);
    return "cannot write " + tmp + ": " + err;
  }
  ::close(fd);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return "cannot replace " + path + ": " + std::strerror(errno);
  // The rename itself is durable once the directory is synced.
  const auto slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return {};
}

cbp::Ticket failed_ticket(std::string reply_to, std::string message) {
  cbp::Ticket t;
  t.reply_to = std::move(reply_to);
  t.ok = false;
  t.reason = cbp::TicketFailure::refused;
  t.message = std::move(message);
  return t;
}

}  // namespace

std::string agent_version() { return std::string("vda-agent/") + common::kVersion; }

std::string_view to_string(State s) {
  switch (s) {
    case State::offline: return "offline";
    case State::connecting: return "connecting";
    case State::handshake: return "handshake";
    case State::registered: return "registered";
    case State::stopped: return "stopped";
  }
  return "?";
}

bool MachineStatus::rejected_with(cbp::Reason r) const {
  return std::find(rejections.begin(), rejections.end(), r) != rejections.end();
}
bool MachineStatus::got_error(cbp::Reason r) const { return std::find(errors.begin(), errors.end(), r) != errors.end(); }

std::string nth_address(const std::string& base, std::uint32_t n) {
  in_addr a{};
  if (::inet_pton(AF_INET, base.c_str(), &a) != 1) return {};
  const std::uint64_t v = static_cast<std::uint64_t>(ntohl(a.s_addr)) + n;
  if (v > 0xFFFFFFFFull) return {};
  a.s_addr = htonl(static_cast<std::uint32_t>(v));
  char text[INET_ADDRSTRLEN] = {};
  if (!::inet_ntop(AF_INET, &a, text, sizeof text)) return {};
  return text;
}

// ---------------------------------------------------------------------------------------------
// SecretStore

SecretStore::SecretStore(std::string path) : path_(std::move(path)) {}

common::Status SecretStore::load() {
  if (path_.empty()) return {};
  std::ifstream in(path_, std::ios::binary);
  if (!in) return {};  // no file yet
  std::stringstream ss;
  ss << in.rdbuf();
  boost::system::error_code ec;
  auto v = json::parse(ss.str(), ec);
  if (ec || !v.is_object() || !v.as_object().contains("machines") || !v.at("machines").is_object())
    return common::make_error(common::errc::invalid_argument,
                              path_ + ": not a secrets file (expected {\"machines\": {\"NAME\": \"SECRET\", ...}})");
  std::lock_guard lock(mutex_);
  for (const auto& [name, secret] : v.at("machines").as_object())
    if (secret.is_string()) secrets_[std::string(name)] = std::string(secret.get_string());
  return {};
}

std::string SecretStore::get(const std::string& machine) const {
  std::lock_guard lock(mutex_);
  auto it = secrets_.find(machine);
  return it == secrets_.end() ? std::string() : it->second;
}

void SecretStore::put(const std::string& machine, const std::string& secret) {
  {
    std::lock_guard lock(mutex_);
    secrets_[machine] = secret;
  }
  persist();
}

void SecretStore::erase(const std::string& machine) {
  {
    std::lock_guard lock(mutex_);
    if (secrets_.erase(machine) == 0) return;
  }
  persist();
}

std::map<std::string, std::string> SecretStore::all() const {
  std::lock_guard lock(mutex_);
  return secrets_;
}

std::string SecretStore::last_error() const {
  std::lock_guard lock(mutex_);
  return last_error_;
}

// Writes the file; when other threads change the store meanwhile, the thread already writing
// writes again for them (so thousands of enrollments make a few writes, not thousands).
void SecretStore::persist() {
  if (path_.empty()) return;
  std::unique_lock lock(mutex_);
  dirty_ = true;
  if (writing_) return;
  writing_ = true;
  while (dirty_) {
    dirty_ = false;
    json::object machines;
    for (const auto& [name, secret] : secrets_) machines[name] = secret;
    json::object doc;
    doc["machines"] = std::move(machines);
    lock.unlock();
    std::string text = json::serialize(doc);
    text += "\n";
    const std::string err = write_atomically(path_, text);
    lock.lock();
    last_error_ = err;
  }
  writing_ = false;
}

// ---------------------------------------------------------------------------------------------
// Fleet::Shared and the machine

struct Fleet::Shared {
  explicit Shared(FleetOptions o)
      : options(std::move(o)),
        log(options.logger ? options.logger : common::null_logger()),
        secrets(options.secrets_file),
        tls{options.ca_file, options.client_cert_file, options.client_key_file},
        pool(std::make_shared<net::WebSocketClientPool>(std::max(1, options.threads))) {}
  const FleetOptions options;
  const std::shared_ptr<spdlog::logger> log;
  SecretStore secrets;
  const net::ClientTls tls;  // for wss:// broker URLs
  const std::shared_ptr<net::WebSocketClientPool> pool;
};

namespace {

enum class Phase { none, awaiting_challenge, awaiting_welcome, awaiting_registered, registered };

struct Session {
  cbp::SessionInfo info;
  cbp::SessionState state = cbp::SessionState::active;
  bool brokered = false;
  std::string prepared_user;  // prepare_session's user
  std::string ticket_ref;     // prepared: the ticket the client will present
  bool reconnecting = false;  // prepared to reconnect this disconnected session
  bool client_pending = false;  // a client is logging on (its ticket is being redeemed)
  std::uint64_t prep = 0;       // which preparation (timers of an earlier one are ignored)
};

struct Redemption {
  std::string session_key;  // a simulated client's logon: its session
  std::uint64_t prep = 0;
  std::shared_ptr<std::promise<cbp::Ticket>> promise;  // Machine::redeem
  std::uint64_t timer = 0;
};

}  // namespace

struct Machine::Impl : std::enable_shared_from_this<Machine::Impl> {
  Impl(std::shared_ptr<Fleet::Shared> s, MachineConfig c) : shared(std::move(s)), cfg(std::move(c)) {
    if (cfg.capabilities.empty())
      cfg.capabilities = {std::string(cbp::kCapPrepareSession), std::string(cbp::kCapLogoffSession),
                          std::string(cbp::kCapDisconnectSession), std::string(cbp::kCapSendMessage)};
    if (cfg.os.empty())
      cfg.os = std::string(cfg.session_support == cbp::SessionSupport::multi_session ? kMultiSessionOs : kSingleSessionOs);
    secret = cfg.secret.empty() ? shared->secrets.get(cfg.name) : cfg.secret;
    st.name = cfg.name;
  }

  const std::shared_ptr<Fleet::Shared> shared;
  MachineConfig cfg;
  spdlog::logger& log() const { return *shared->log; }
  const FleetOptions& opts() const { return shared->options; }
  net::WebSocketClientPool& pool() const { return *shared->pool; }

  mutable std::mutex mutex;
  mutable std::condition_variable cv;
  // Everything below is guarded by mutex.
  MachineStatus st;  // counters and observations; state, sessions and secret are filled in by snapshot()
  bool running = false;
  std::string secret;
  Faults faults;
  bool heartbeats_on = true;

  std::uint64_t gen = 0;  // the current connection attempt
  std::shared_ptr<net::WebSocketPeer> peer;
  Phase phase = Phase::none;
  std::string nonce, agent_nonce, proof_key;  // this connection's handshake (proof_key: the verifier)
  bool enrolling = false;
  std::vector<int> offered;
  bool reached_registered = false;
  Clock::time_point registered_at{};
  std::int64_t missed_heartbeats = 3;
  Clock::time_point last_heartbeat{};
  std::uint64_t handshake_timer = 0, heartbeat_timer = 0, early_heartbeat_timer = 0, reconnect_timer = 0;
  int failures = 0;     // consecutive attempts that did not reach registered
  Millis min_delay{0};  // the next reconnect waits at least this long
  std::vector<cbp::SessionEvent> queued;  // between register and registered
  std::map<std::string, Session> sessions;
  std::map<std::string, Redemption> redemptions;
  std::uint64_t next_redeem = 1, next_prep = 1;

  // --- helpers (mutex held) --------------------------------------------------------------------

  template <class F>
  std::uint64_t timer(Millis delay, F fn) {
    std::weak_ptr<Impl> weak = weak_from_this();
    return pool().after(delay, [weak, fn = std::move(fn)]() mutable {
      if (auto self = weak.lock()) fn(*self);
    });
  }
  void cancel(std::uint64_t& id) {
    if (id != 0) pool().cancel(id);
    id = 0;
  }

  void send(const cbp::Message& m) {
    if (peer) peer->send(cbp::serialize(m));
  }

  void close_connection(const std::string& why) {
    if (peer) peer->close(why);
  }

  void protocol_error(const std::string& what) {
    log().warn("{}: protocol error: {}; closing", cfg.name, what);
    cbp::ErrorMessage e;
    e.reason = cbp::Reason::protocol_error;
    e.message = what.substr(0, cbp::kMaxTextBytes);
    send(e);
    close_connection("protocol error");
  }

  std::int64_t load_index() const {
    if (cfg.session_support == cbp::SessionSupport::single_session)
      return sessions.empty() ? 0 : cbp::kMaxLoadIndex;
    const auto per = cbp::kMaxLoadIndex / std::max(1, cfg.max_sessions);
    return std::min<std::int64_t>(cbp::kMaxLoadIndex, static_cast<std::int64_t>(sessions.size()) * per);
  }

  bool full() const {
    if (cfg.session_support == cbp::SessionSupport::single_session) return !sessions.empty();
    return static_cast<int>(sessions.size()) >= std::max(1, cfg.max_sessions);
  }

  MachineStatus snapshot() const {
    MachineStatus s = st;
    s.running = running;
    s.secret = secret;
    s.load_index = load_index();
    s.sessions.clear();
    for (const auto& [k, v] : sessions) s.sessions.push_back({v.info, v.state, v.brokered, v.prepared_user});
    return s;
  }

  void changed() { cv.notify_all(); }

  // Sends the event now (registered), after `registered` (registering), or not at all (offline:
  // the next register reports the sessions).
  void emit(cbp::SessionEventKind kind, const cbp::SessionInfo& info) {
    cbp::SessionEvent ev;
    ev.event = kind;
    ev.session = info;
    if (phase == Phase::registered)
      send(ev);
    else if (phase == Phase::awaiting_registered)
      queued.push_back(std::move(ev));
  }

  void send_heartbeat() {
    cbp::Heartbeat hb;
    hb.load_index = load_index();
    hb.session_count = static_cast<std::int64_t>(sessions.size());
    send(hb);
    last_heartbeat = Clock::now();
    ++st.heartbeats;
  }

  bool heartbeating() const { return phase == Phase::registered && heartbeats_on && !faults.no_heartbeats; }

  // The load changed: tell the broker now, or as soon as one second has passed since the last
  // heartbeat.
  void load_changed() {
    if (!heartbeating()) return;
    const auto since = Clock::now() - last_heartbeat;
    if (since >= kMinHeartbeatGap) {
      send_heartbeat();
    } else if (early_heartbeat_timer == 0) {
      const auto g = gen;
      early_heartbeat_timer =
          timer(std::chrono::duration_cast<Millis>(kMinHeartbeatGap - since) + Millis{1}, [g](Impl& self) {
            std::lock_guard lock(self.mutex);
            if (g != self.gen) return;
            self.early_heartbeat_timer = 0;
            if (self.heartbeating()) self.send_heartbeat();
          });
    }
  }

  // With missed_heartbeats = 1 a heartbeat sent exactly at the interval races the broker's timer:
  // such agents heartbeat at 0.6 x the interval.
  Millis heartbeat_period() const {
    const Millis interval = std::chrono::seconds(std::max<std::int64_t>(1, st.heartbeat_interval_seconds));
    return missed_heartbeats <= 1 ? interval * 6 / 10 : interval;
  }

  void schedule_heartbeat() {
    const auto g = gen;
    heartbeat_timer = timer(heartbeat_period(), [g](Impl& self) {
      std::lock_guard lock(self.mutex);
      if (g != self.gen || self.phase != Phase::registered) return;
      self.heartbeat_timer = 0;
      if (self.heartbeating() && Clock::now() - self.last_heartbeat >= kMinHeartbeatGap) {
        self.send_heartbeat();
        self.changed();
      }
      self.schedule_heartbeat();
    });
  }

  void arm_handshake_timer() {
    cancel(handshake_timer);
    const auto g = gen;
    handshake_timer = timer(opts().handshake_timeout, [g](Impl& self) {
      std::lock_guard lock(self.mutex);
      if (g != self.gen || self.phase == Phase::registered || !self.peer) return;
      self.handshake_timer = 0;
      self.log().warn("{}: the broker did not answer within {} ms during the handshake; closing", self.cfg.name,
                      self.opts().handshake_timeout.count());
      self.st.last_close = "handshake timeout";
      self.close_connection("handshake timeout");
    });
  }

  void schedule_reconnect() {
    const double exp = std::pow(2.0, std::min(failures, 20));
    double ms = std::min(static_cast<double>(opts().backoff_max.count()), opts().backoff_base.count() * exp) * jitter();
    Millis delay{static_cast<std::int64_t>(ms)};
    delay = std::max(delay, min_delay);
    min_delay = Millis{0};
    log().debug("{}: reconnecting in {} ms", cfg.name, delay.count());
    cancel(reconnect_timer);
    reconnect_timer = timer(delay, [](Impl& self) {
      {
        std::lock_guard lock(self.mutex);
        self.reconnect_timer = 0;
      }
      self.connect();
    });
  }

  // --- connection lifecycle --------------------------------------------------------------------

  // Starts a connection attempt when running and not connected. Called without the mutex.
  void connect() {
    std::uint64_t g = 0;
    {
      std::lock_guard lock(mutex);
      if (!running || peer || st.state == State::connecting || reconnect_timer != 0) return;
      g = ++gen;
      st.state = State::connecting;
      ++st.connects;
      changed();
    }
    std::weak_ptr<Impl> weak = weak_from_this();
    pool().connect(
        opts().broker_url,
        [weak, g](std::shared_ptr<net::WebSocketPeer> p) -> std::shared_ptr<net::WebSocketSession> {
          auto self = weak.lock();
          return self ? self->opened(g, std::move(p)) : nullptr;
        },
        [weak, g](const std::string& why) {
          if (auto self = weak.lock()) self->connect_failed(g, why);
        },
        opts().connect_timeout, shared->tls, cbp::kMaxMessageBytes);
  }

  std::shared_ptr<net::WebSocketSession> opened(std::uint64_t g, std::shared_ptr<net::WebSocketPeer> p);

  // The connection is gone: reconnect after the back-off when running, else stay stopped.
  void go_offline() {
    if (running) {
      st.state = State::offline;
      schedule_reconnect();
    } else {
      st.state = State::stopped;
    }
    changed();
  }

  void connect_failed(std::uint64_t g, const std::string& why) {
    std::lock_guard lock(mutex);
    if (g != gen || st.state != State::connecting) return;
    st.last_close = "cannot connect: " + why;
    if (failures == 0) log().warn("{}: cannot connect to {}: {}", cfg.name, opts().broker_url, why);
    failures = std::min(failures + 1, 20);
    go_offline();
  }

  void closed(std::uint64_t g, const std::string& why) {
    std::lock_guard lock(mutex);
    if (g != gen || !peer) return;
    peer.reset();
    phase = Phase::none;
    queued.clear();
    cancel(handshake_timer);
    cancel(heartbeat_timer);
    cancel(early_heartbeat_timer);
    // Outstanding redemptions cannot be answered any more.
    auto pending = std::move(redemptions);
    redemptions.clear();
    for (auto& [id, r] : pending) {
      cancel(r.timer);
      if (r.promise)
        r.promise->set_value(failed_ticket(id, "connection closed"));
      else
        finish_logon(r, nullptr, "the connection to the broker ended");
    }
    if (reached_registered) {
      if (Clock::now() - registered_at >= opts().stable_registration) failures = 0;
      log().info("{}: connection ended: {}", cfg.name, why);
    } else {
      failures = std::min(failures + 1, 20);
      log().debug("{}: connection ended before registration: {}", cfg.name, why);
    }
    reached_registered = false;
    if (st.last_close.empty()) st.last_close = why;
    go_offline();
  }

  // --- messages ------------------------------------------------------------------------------

  void on_message(std::uint64_t g, const std::string& text) {
    std::lock_guard lock(mutex);
    if (g != gen || !peer) return;
    auto parsed = cbp::parse(text);
    if (!parsed) {
      protocol_error("cannot parse the broker's message: " + parsed.error().describe());
      changed();
      return;
    }
    const cbp::Message& m = *parsed;
    if (cbp::sender_of(m) == cbp::Sender::agent) {
      protocol_error("'" + std::string(cbp::type_name(m)) + "' is sent by agents, not by the broker");
    } else if (auto* c = std::get_if<cbp::Challenge>(&m)) {
      on_challenge(*c);
    } else if (auto* w = std::get_if<cbp::Welcome>(&m)) {
      on_welcome(*w);
    } else if (auto* r = std::get_if<cbp::Rejected>(&m)) {
      on_rejected(*r);
    } else if (std::holds_alternative<cbp::Registered>(m)) {
      on_registered();
    } else if (auto* cmd = std::get_if<cbp::Command>(&m)) {
      if (phase != Phase::registered)
        protocol_error("a command before registered");
      else
        on_command(*cmd);
    } else if (auto* t = std::get_if<cbp::Ticket>(&m)) {
      if (phase != Phase::registered)
        protocol_error("a ticket before registered");
      else
        on_ticket(*t);
    } else if (auto* e = std::get_if<cbp::ErrorMessage>(&m)) {
      on_error(*e);
    } else {
      protocol_error("unexpected '" + std::string(cbp::type_name(m)) + "'");
    }
    changed();
  }

  void on_challenge(const cbp::Challenge& c) {
    if (phase != Phase::awaiting_challenge) return protocol_error("a second challenge");
    nonce = c.nonce;
    offered = faults.versions.empty() ? opts().versions : faults.versions;
    if (!cbp::choose_version(c.versions, offered))
      log().warn("{}: the broker speaks no protocol version this agent offers; saying hello anyway", cfg.name);
    enrolling = secret.empty();
    if (enrolling && (cfg.enroll_key.empty() || cfg.catalog.empty())) {
      log().error("{}: no machine secret, and no enrollment key and catalog to enroll with: stopping", cfg.name);
      running = false;
      close_connection("no credentials");
      return;
    }
    proof_key = cbp::secret_hash(enrolling ? cfg.enroll_key : secret);
    agent_nonce = cbp::make_nonce();
    cbp::Hello h;
    h.machine = cfg.name;
    h.versions = offered;
    h.agent_version = agent_version();
    h.proof =
        cbp::compute_proof(faults.bad_proof ? cbp::secret_hash("not the secret") : proof_key, nonce, cfg.name, offered);
    h.agent_nonce = agent_nonce;
    h.enroll = enrolling;
    if (enrolling) h.catalog = cfg.catalog;
    st.last_hello = cbp::serialize(h);
    peer->send(st.last_hello);
    phase = Phase::awaiting_welcome;
    arm_handshake_timer();
  }

  void on_welcome(const cbp::Welcome& w) {
    if (phase != Phase::awaiting_welcome) return protocol_error("unexpected welcome");
    if (std::find(offered.begin(), offered.end(), w.version) == offered.end())
      return protocol_error("welcome chose version " + std::to_string(w.version) + ", which this agent did not offer");
    if (!cbp::verify_broker_proof(proof_key, agent_nonce, nonce, cfg.name, w.version, w.broker_proof)) {
      log().error("{}: the broker's proof does not verify: it does not know this machine's secret; not registering",
                  cfg.name);
      cbp::ErrorMessage e;
      e.reason = cbp::Reason::bad_proof;
      e.message = "broker_proof does not verify";
      send(e);
      close_connection("bad broker proof");
      return;
    }
    if (!w.machine_secret.empty()) {
      if (enrolling) {
        secret = w.machine_secret;
        st.enrolled = true;
        shared->secrets.put(cfg.name, secret);
        if (auto err = shared->secrets.last_error(); !err.empty())
          log().error("{}: enrolled, but the machine secret could not be stored: {}", cfg.name, err);
        else
          log().info("{}: enrolled in catalog '{}'; machine secret stored", cfg.name, cfg.catalog);
      } else {
        log().warn("{}: the broker sent a machine secret without an enrollment; ignored", cfg.name);
      }
    }
    st.version = w.version;
    st.heartbeat_interval_seconds = w.heartbeat_interval_seconds;
    missed_heartbeats = w.missed_heartbeats;
    phase = Phase::awaiting_registered;
    arm_handshake_timer();
    if (faults.no_register) return;
    send(make_register());
  }

  cbp::Register make_register() const {
    cbp::Register r;
    r.os = cfg.os;
    r.session_support = cfg.session_support;
    if (faults.wrong_session_support)
      r.session_support = cfg.session_support == cbp::SessionSupport::single_session
                              ? cbp::SessionSupport::multi_session
                              : cbp::SessionSupport::single_session;
    r.address = cfg.address;
    r.dns_name = cfg.dns_name;
    r.capabilities = cfg.capabilities;
    r.load_index = load_index();
    for (const auto& [k, s] : sessions) r.sessions.push_back({s.state, s.info});
    return r;
  }

  void on_rejected(const cbp::Rejected& r) {
    if (phase == Phase::registered || phase == Phase::awaiting_challenge)
      return protocol_error("unexpected rejected");
    st.rejections.push_back(r.reason);
    log().warn("{}: rejected by the broker: {}{}{}", cfg.name, cbp::to_string(r.reason), r.message.empty() ? "" : ": ",
               r.message);
    using R = cbp::Reason;
    switch (r.reason) {
      case R::incompatible_version:
        if (!opts().retry_incompatible_version) {
          log().error("{}: no protocol version in common with the broker: stopping", cfg.name);
          running = false;
        } else {
          min_delay = opts().auth_failure_backoff;
        }
        break;
      case R::too_many_failures:
        min_delay = r.retry_after_seconds > 0 ? Millis{std::chrono::seconds(r.retry_after_seconds)}
                                              : opts().auth_failure_backoff;
        break;
      case R::unavailable:  // the broker's own trouble: no admin has to act, only wait
        if (r.retry_after_seconds > 0) min_delay = Millis{std::chrono::seconds(r.retry_after_seconds)};
        break;
      case R::broker_registration_limit_reached:  // the broker is full: come back when it says
        min_delay = r.retry_after_seconds > 0 ? Millis{std::chrono::seconds(r.retry_after_seconds)}
                                              : opts().auth_failure_backoff;
        break;
      case R::unknown_machine:
      case R::bad_proof:
        if (!enrolling && !cfg.enroll_key.empty() && !faults.bad_proof) {
          // The broker forgot this machine or its secret (a new database, a removed machine
          // declared again): the catalog's key lets it enroll again.
          log().warn("{}: the broker does not accept the stored secret; enrolling again", cfg.name);
          secret.clear();
          shared->secrets.erase(cfg.name);
        } else {
          min_delay = opts().auth_failure_backoff;
        }
        break;
      case R::enrollment_refused:
      case R::single_multi_session_mismatch:
      case R::invalid_registration_request:
      case R::empty_registration_request:
      case R::missing_registration_capabilities:
      case R::missing_agent_version:
        min_delay = opts().auth_failure_backoff;  // an admin (or a fix) has to act first
        break;
      default: break;
    }
    close_connection("rejected");
  }

  void on_registered() {
    if (phase != Phase::awaiting_registered) return protocol_error("unexpected registered");
    cancel(handshake_timer);
    phase = Phase::registered;
    st.state = State::registered;
    ++st.registrations;
    reached_registered = true;
    registered_at = Clock::now();
    log().info("{}: registered (protocol {}, heartbeat every {} s, {} sessions)", cfg.name, st.version,
               st.heartbeat_interval_seconds, sessions.size());
    for (auto& ev : queued) send(ev);
    queued.clear();
    last_heartbeat = Clock::now();
    schedule_heartbeat();
  }

  void on_error(const cbp::ErrorMessage& e) {
    st.errors.push_back(e.reason);
    using R = cbp::Reason;
    switch (e.reason) {
      case R::superseded:
        log().error("{}: a newer connection registered this machine (two agents with one identity?); "
                    "reconnecting in {} s at the earliest",
                    cfg.name, std::chrono::duration_cast<std::chrono::seconds>(opts().superseded_backoff).count());
        min_delay = opts().superseded_backoff;
        break;
      case R::desktop_removed:
        log().warn("{}: the machine was removed from the site: stopping", cfg.name);
        running = false;
        break;
      default:
        log().warn("{}: the broker ends the connection: {}{}{}", cfg.name, cbp::to_string(e.reason),
                   e.message.empty() ? "" : ": ", e.message);
        break;
    }
    close_connection("broker error");
  }

  // --- commands ------------------------------------------------------------------------------

  void reply(const std::string& id, std::string_view name, bool ok, const std::string& error = {}) {
    cbp::CommandResult r;
    r.reply_to = id;
    r.ok = ok;
    if (!ok) r.error = error;
    send(r);
    st.commands.push_back(std::string(name) + (ok ? " ok" : " failed: " + error));
  }

  void on_command(const cbp::Command& c) {
    const std::string name(cbp::command_name(c.args));
    if (faults.ignore_commands) {
      st.commands.push_back(name + " ignored");
      return;
    }
    if (auto* a = std::get_if<cbp::PrepareSessionArgs>(&c.args)) return prepare(c.id, *a);
    if (auto* a = std::get_if<cbp::LogoffSessionArgs>(&c.args)) {
      if (!sessions.contains(a->session_key)) return reply(c.id, name, false, "no such session");
      end_session(a->session_key);
      return reply(c.id, name, true);
    }
    if (auto* a = std::get_if<cbp::DisconnectSessionArgs>(&c.args)) {
      auto it = sessions.find(a->session_key);
      if (it == sessions.end()) return reply(c.id, name, false, "no such session");
      if (it->second.state == cbp::SessionState::preparing)
        return reply(c.id, name, false, "no client is connected to this session");
      disconnect(it->second);
      return reply(c.id, name, true);
    }
    if (auto* a = std::get_if<cbp::SendMessageArgs>(&c.args)) {
      const std::string shown = a->title.empty() ? a->text : a->title + ": " + a->text;
      if (!a->all && !sessions.contains(a->session_key)) return reply(c.id, name, false, "no such session");
      for (const auto& [k, s] : sessions)
        if (a->all || k == a->session_key)
          log().info("{}: message shown in session {} ({}): {}", cfg.name, k, s.info.user, shown);
      st.messages.push_back(shown);
      return reply(c.id, name, true);
    }
    reply(c.id, name, false, "unsupported command");
  }

  void prepare(const std::string& id, const cbp::PrepareSessionArgs& a) {
    const std::string name(cbp::PrepareSessionArgs::kName);
    const std::uint64_t prep = next_prep++;
    auto it = sessions.find(a.session_key);
    if (it != sessions.end()) {
      Session& s = it->second;
      if (s.state != cbp::SessionState::disconnected || s.reconnecting)
        return reply(id, name, false, "session " + a.session_key + " is in use");
      s.reconnecting = true;  // the user's client will reconnect to this session
      s.prepared_user = a.user;
      s.ticket_ref = a.ticket_ref;
      s.prep = prep;
      if (!a.client_name.empty()) s.info.client_name = a.client_name;
      if (!a.client_address.empty()) s.info.client_address = a.client_address;
    } else {
      if (full()) return reply(id, name, false, "no free session slot");
      Session s;
      s.info.session_key = a.session_key;
      s.info.client_name = a.client_name;
      s.info.client_address = a.client_address;
      if (a.session_type == cbp::SessionType::application) s.info.application = a.resource;
      s.state = cbp::SessionState::preparing;
      s.brokered = true;
      s.prepared_user = a.user;
      s.ticket_ref = a.ticket_ref;
      s.prep = prep;
      sessions.emplace(a.session_key, std::move(s));
    }
    log().info("{}: prepared session {} for {} ({}); the client is expected within {} s", cfg.name, a.session_key,
               a.user, a.resource, a.connect_timeout_seconds);
    reply(id, name, true);
    load_changed();
    const std::string key = a.session_key;
    timer(std::chrono::seconds(a.connect_timeout_seconds), [key, prep](Impl& self) {
      std::lock_guard lock(self.mutex);
      self.connect_deadline(key, prep);
      self.changed();
    });
    if (opts().client_connect_delay)
      timer(*opts().client_connect_delay, [key, prep](Impl& self) {
        std::lock_guard lock(self.mutex);
        auto found = self.sessions.find(key);
        if (found != self.sessions.end() && found->second.prep == prep) self.begin_logon(found->second);
        self.changed();
      });
  }

  void connect_deadline(const std::string& session_key, std::uint64_t prep) {
    auto it = sessions.find(session_key);
    if (it == sessions.end() || it->second.prep != prep) return;
    Session& s = it->second;
    if (s.state == cbp::SessionState::preparing) {
      log().info("{}: no client for session {} in time: preparation dropped", cfg.name, session_key);
      end_session(session_key);
    } else if (s.reconnecting) {
      log().info("{}: no client reconnected to session {} in time", cfg.name, session_key);
      s.reconnecting = false;
      s.client_pending = false;
      s.ticket_ref.clear();
      s.prep = next_prep++;
    }
  }

  // A (simulated) client connects to a prepared session and presents its ticket.
  bool begin_logon(Session& s) {
    const bool prepared = s.state == cbp::SessionState::preparing || s.reconnecting;
    if (!prepared || s.client_pending || phase != Phase::registered) return false;
    s.client_pending = true;
    if (!s.reconnecting) {
      s.state = cbp::SessionState::connected;
      emit(cbp::SessionEventKind::connected, s.info);
    }
    const std::string id = "r-" + std::to_string(next_redeem++);
    Redemption r;
    r.session_key = s.info.session_key;
    r.prep = s.prep;
    r.timer = timer(opts().redeem_timeout, [id](Impl& self) { self.redeem_expired(id); });
    redemptions.emplace(id, std::move(r));
    cbp::RedeemTicket rt;
    rt.id = id;
    rt.ticket = s.ticket_ref;
    rt.session_key = s.info.session_key;
    send(rt);
    return true;
  }

  void redeem_expired(const std::string& id) {
    std::lock_guard lock(mutex);
    auto it = redemptions.find(id);
    if (it == redemptions.end()) return;
    Redemption r = std::move(it->second);
    redemptions.erase(it);
    if (r.promise)
      r.promise->set_value(failed_ticket(id, "timeout"));
    else
      finish_logon(r, nullptr, "no ticket reply in time");
    changed();
  }

  void on_ticket(const cbp::Ticket& t) {
    auto it = redemptions.find(t.reply_to);
    if (it == redemptions.end()) {
      log().debug("{}: ticket reply for unknown redemption '{}' ignored", cfg.name, t.reply_to);
      return;
    }
    Redemption r = std::move(it->second);
    redemptions.erase(it);
    cancel(r.timer);
    if (r.promise) {
      r.promise->set_value(t);
      return;
    }
    finish_logon(r, &t, {});
  }

  // The ticket of a client logon came back (t), or never will (why).
  void finish_logon(const Redemption& r, const cbp::Ticket* t, const std::string& why) {
    auto it = sessions.find(r.session_key);
    if (it == sessions.end() || it->second.prep != r.prep || !it->second.client_pending) return;
    Session& s = it->second;
    s.client_pending = false;
    std::string refused = why;
    if (t && !t->ok) {
      refused = "ticket refused: " + std::string(cbp::to_string(t->reason)) + (t->message.empty() ? "" : ": " + t->message);
    } else if (t && !iequals(t->user, s.prepared_user)) {
      refused = "the ticket is for " + t->user + ", the session was prepared for " + s.prepared_user;
    } else if (t && t->credential_type != "password" && t->credential_type != "smartcard" &&
               t->credential_type != "assertion") {
      refused = "cannot log on with credential type " + t->credential_type;
    }
    if (!t || !refused.empty()) {
      ++st.failed_logons;
      log().warn("{}: logon to session {} refused: {}", cfg.name, s.info.session_key, refused);
      if (s.reconnecting) {
        s.reconnecting = false;
        s.ticket_ref.clear();
      } else {
        end_session(s.info.session_key);
      }
      return;
    }
    const bool reconnect = s.reconnecting;
    s.info.user = t->user;  // credential_data is never logged or kept
    s.state = cbp::SessionState::active;
    s.reconnecting = false;
    s.ticket_ref.clear();
    ++st.logons;
    log().info("{}: {} {} session {}", cfg.name, t->user, reconnect ? "reconnected to" : "logged on to",
               s.info.session_key);
    emit(reconnect ? cbp::SessionEventKind::reconnected : cbp::SessionEventKind::active, s.info);
  }

  void disconnect(Session& s) {
    if (s.state == cbp::SessionState::disconnected) return;
    s.state = cbp::SessionState::disconnected;
    s.client_pending = false;
    s.info.client_name.clear();
    s.info.client_address.clear();
    emit(cbp::SessionEventKind::disconnected, s.info);
  }

  void end_session(const std::string& session_key) {
    auto node = sessions.extract(session_key);
    if (node.empty()) return;
    log().info("{}: session {} ended", cfg.name, session_key);
    emit(cbp::SessionEventKind::logged_off, node.mapped().info);
    load_changed();
  }

  // --- scripted API ----------------------------------------------------------------------------

  void start_after(Millis delay) {
    {
      std::lock_guard lock(mutex);
      if (running) return;
      running = true;
      min_delay = Millis{0};
      if (st.state == State::stopped) st.state = State::offline;
      changed();
      if (delay.count() > 0 && !peer && st.state != State::connecting) {
        cancel(reconnect_timer);
        reconnect_timer = timer(delay, [](Impl& self) {
          {
            std::lock_guard guard(self.mutex);
            self.reconnect_timer = 0;
          }
          self.connect();
        });
        return;
      }
    }
    connect();
  }

  // Ends the machine's connection and keeps it down; goodbye first when `goodbye`.
  void halt(std::optional<cbp::Goodbye> goodbye, const std::string& why) {
    std::lock_guard lock(mutex);
    running = false;
    cancel(reconnect_timer);
    if (peer) {
      if (goodbye && phase == Phase::registered) send(*goodbye);
      close_connection(why);
    } else {
      st.state = State::stopped;
    }
    changed();
  }
};

namespace {
// The session the pool feeds with one connection's messages.
class Link final : public net::WebSocketSession {
 public:
  Link(std::weak_ptr<Machine::Impl> m, std::uint64_t g) : machine_(std::move(m)), gen_(g) {}
  void on_message(std::string message) override {
    if (auto m = machine_.lock()) m->on_message(gen_, message);
  }
  void on_close(const std::string& reason) override {
    if (auto m = machine_.lock()) m->closed(gen_, reason);
  }

 private:
  const std::weak_ptr<Machine::Impl> machine_;
  const std::uint64_t gen_;
};
}  // namespace

std::shared_ptr<net::WebSocketSession> Machine::Impl::opened(std::uint64_t g, std::shared_ptr<net::WebSocketPeer> p) {
  std::lock_guard lock(mutex);
  if (g != gen || !running || peer) return nullptr;  // stopped or superseded meanwhile: closed at once
  peer = std::move(p);
  phase = Phase::awaiting_challenge;
  st.state = State::handshake;
  st.last_close.clear();
  arm_handshake_timer();
  changed();
  return std::make_shared<Link>(weak_from_this(), g);
}

// ---------------------------------------------------------------------------------------------
// Machine

const std::string& Machine::name() const { return impl_->cfg.name; }
void Machine::start() { impl_->start_after(Millis{0}); }

void Machine::stop(cbp::Reason reason, std::string message) {
  cbp::Goodbye g;
  g.reason = reason;
  g.message = std::move(message);
  impl_->halt(g, "agent stopping");
}

void Machine::crash() { impl_->halt(std::nullopt, "agent crashed"); }

void Machine::interrupt() {
  std::lock_guard lock(impl_->mutex);
  impl_->close_connection("connection interrupted");
}

void Machine::set_heartbeats(bool on) {
  std::lock_guard lock(impl_->mutex);
  impl_->heartbeats_on = on;
}

void Machine::set_faults(Faults faults) {
  std::lock_guard lock(impl_->mutex);
  impl_->faults = std::move(faults);
}

void Machine::send_raw(std::string text) {
  std::lock_guard lock(impl_->mutex);
  if (impl_->peer) impl_->peer->send(std::move(text));
}

bool Machine::add_session(const cbp::SessionInfo& info, cbp::SessionState state) {
  std::lock_guard lock(impl_->mutex);
  if (info.session_key.empty() || state == cbp::SessionState::preparing || impl_->sessions.contains(info.session_key))
    return false;
  Session s;
  s.info = info;
  s.state = state;
  impl_->sessions.emplace(info.session_key, s);
  const auto kind = state == cbp::SessionState::connected      ? cbp::SessionEventKind::connected
                    : state == cbp::SessionState::disconnected ? cbp::SessionEventKind::disconnected
                                                               : cbp::SessionEventKind::active;
  impl_->emit(kind, info);
  impl_->load_changed();
  impl_->changed();
  return true;
}

bool Machine::disconnect_session(const std::string& session_key) {
  std::lock_guard lock(impl_->mutex);
  auto it = impl_->sessions.find(session_key);
  if (it == impl_->sessions.end() || it->second.state == cbp::SessionState::preparing ||
      it->second.state == cbp::SessionState::disconnected)
    return false;
  impl_->disconnect(it->second);
  impl_->changed();
  return true;
}

bool Machine::reconnect_session(const std::string& session_key, const std::string& client_name) {
  std::lock_guard lock(impl_->mutex);
  auto it = impl_->sessions.find(session_key);
  if (it == impl_->sessions.end() || it->second.state != cbp::SessionState::disconnected) return false;
  Session& s = it->second;
  s.state = cbp::SessionState::active;
  s.reconnecting = false;
  s.info.client_name = client_name;
  impl_->emit(cbp::SessionEventKind::reconnected, s.info);
  impl_->changed();
  return true;
}

bool Machine::logoff_session(const std::string& session_key) {
  std::lock_guard lock(impl_->mutex);
  if (!impl_->sessions.contains(session_key)) return false;
  impl_->end_session(session_key);
  impl_->changed();
  return true;
}

bool Machine::client_connects(const std::string& session_key) {
  std::lock_guard lock(impl_->mutex);
  auto it = impl_->sessions.find(session_key);
  if (it == impl_->sessions.end()) return false;
  const bool ok = impl_->begin_logon(it->second);
  impl_->changed();
  return ok;
}

std::future<cbp::Ticket> Machine::redeem(const std::string& ticket, const std::string& session_key) {
  auto promise = std::make_shared<std::promise<cbp::Ticket>>();
  auto future = promise->get_future();
  std::lock_guard lock(impl_->mutex);
  const std::string id = "r-" + std::to_string(impl_->next_redeem++);
  if (impl_->phase != Phase::registered) {
    promise->set_value(failed_ticket(id, "not registered"));
    return future;
  }
  Redemption r;
  r.promise = promise;
  r.timer = impl_->timer(impl_->opts().redeem_timeout, [id](Machine::Impl& self) { self.redeem_expired(id); });
  impl_->redemptions.emplace(id, std::move(r));
  cbp::RedeemTicket rt;
  rt.id = id;
  rt.ticket = ticket;
  rt.session_key = session_key;
  impl_->send(rt);
  return future;
}

MachineStatus Machine::status() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->snapshot();
}

bool Machine::wait_for(const std::function<bool(const MachineStatus&)>& pred, Millis timeout) const {
  std::unique_lock lock(impl_->mutex);
  return impl_->cv.wait_for(lock, timeout, [&] { return pred(impl_->snapshot()); });
}

// ---------------------------------------------------------------------------------------------
// Fleet

Fleet::Fleet(FleetOptions options) : shared_(std::make_shared<Shared>(std::move(options))) {
  if (auto st = shared_->secrets.load(); !st) throw std::runtime_error(st.error().message);
  if (shared_->options.broker_url.starts_with("wss://")) {
    // Unchecked TLS would hand ticket credentials and machine secrets to whoever answers
    // (docs/SECURITY.md 9.6): only when asked for by name.
    if (shared_->options.ca_file.empty() && !shared_->options.insecure)
      throw std::runtime_error("a wss:// broker needs a CA file to check its certificate against (or insecure)");
    if (auto why = shared_->pool->check_tls(shared_->tls); !why.empty()) throw std::runtime_error(why);
  }
}

Fleet::~Fleet() { shared_->pool->stop(); }

Machine Fleet::add(MachineConfig config) {
  Machine m(std::make_shared<Machine::Impl>(shared_, std::move(config)));
  std::lock_guard lock(mutex_);
  machines_.push_back(m);
  return m;
}

void Fleet::start() {
  for (auto& m : machines()) m.impl_->start_after(random_below(shared_->options.start_spread));
}

std::size_t Fleet::stop(cbp::Reason reason, Millis timeout) {
  auto all = machines();
  for (auto& m : all) m.stop(reason);
  const auto deadline = Clock::now() + timeout;
  std::size_t left = 0;
  for (const auto& m : all) {
    const auto remaining = std::chrono::duration_cast<Millis>(deadline - Clock::now());
    if (!m.wait_for([](const MachineStatus& s) { return s.state == State::stopped; }, std::max(remaining, Millis{0})))
      ++left;
  }
  return left;
}

std::vector<Machine> Fleet::machines() const {
  std::lock_guard lock(mutex_);
  return machines_;
}

std::size_t Fleet::count(State state) const {
  std::size_t n = 0;
  for (const auto& m : machines())
    if (m.status().state == state) ++n;
  return n;
}

SecretStore& Fleet::secrets() { return shared_->secrets; }
const FleetOptions& Fleet::options() const { return shared_->options; }

}  // namespace vda
