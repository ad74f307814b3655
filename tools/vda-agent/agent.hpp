// tools/vda-agent/agent.hpp: the reference desktop agent (VDA), a real client of the agent
// protocol (docs/cbp.md). One Fleet runs any number of simulated machines in one process, each
// with its own connection, secret and sessions, all on one net::WebSocketClientPool (a few
// threads for thousands of machines).
//
// Each machine connects to the broker, answers the challenge (with its machine secret, or with
// the catalog's enrollment key when it has none yet and then stores the secret it is given),
// checks the broker's proof, registers, heartbeats, reconnects with back-off, and simulates the
// users of its sessions: prepare_session reserves a session, a simulated client shows up (after
// FleetOptions::client_connect_delay), redeems the logon ticket and logs on. The scripted API of
// Machine drives everything else a test or a harness needs: sessions coming and going, crashes,
// lost heartbeats and deliberate protocol faults.
//
// Threading: every Machine and Fleet method may be called from any thread; the machines run on
// the pool's threads. docs/cbp.md "The reference agent" describes the command line (main.cpp).
#pragma once

#include "cbp/messages.hpp"

#include <spdlog/fwd.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace vda {

using Millis = std::chrono::milliseconds;

// The agent's product string, sent as hello.agent_version ("vda-agent/0.1.0").
std::string agent_version();

// Machine secrets, by machine name, kept in a JSON file ({"machines": {"DEMO\\pool-1": "..."}})
// that is rewritten atomically (temporary file, fsync, rename; mode 0600) on every change.
// Without a path it only keeps them in memory. Thread-safe.
class SecretStore {
 public:
  explicit SecretStore(std::string path = {});
  // Reads the file; a missing file is an empty store. Fails (errc::invalid_argument) for a file
  // that is not such a JSON object.
  common::Status load();
  std::string get(const std::string& machine) const;  // empty: none
  void put(const std::string& machine, const std::string& secret);
  void erase(const std::string& machine);
  std::map<std::string, std::string> all() const;
  const std::string& path() const { return path_; }
  // The last write error (empty after a successful write).
  std::string last_error() const;

 private:
  void persist();

  const std::string path_;
  mutable std::mutex mutex_;
  std::map<std::string, std::string> secrets_;  // guarded by mutex_
  bool dirty_ = false;                           // guarded by mutex_
  bool writing_ = false;                         // guarded by mutex_: one thread writes, others leave it dirty
  std::string last_error_;                       // guarded by mutex_
};

// What a machine is and what it reports at registration.
struct MachineConfig {
  std::string name;     // as the site knows it: "DEMO\\pool-1"
  std::string catalog;  // the catalog to enroll in (hello.catalog)
  cbp::SessionSupport session_support = cbp::SessionSupport::single_session;
  std::string secret;      // the machine secret; empty: from the SecretStore, else enroll
  std::string enroll_key;  // the catalog's enrollment key (plain text); empty: never enroll
  std::string address;     // host:port users connect to ("10.99.0.1:1494")
  std::string dns_name;    // optional
  std::string os;          // empty: a Windows 11 or Windows Server name by session support
  int max_sessions = 20;   // multi-session: the load index is sessions x 10000 / max_sessions
  std::vector<std::string> capabilities;  // empty: the four commands of version 1
};

// Deliberate faults, for tests of the broker (Machine::set_faults).
struct Faults {
  bool bad_proof = false;              // hello.proof computed with a wrong key
  std::vector<int> versions;           // offer these versions instead of ours (e.g. {99})
  bool wrong_session_support = false;  // register the other session support than configured
  bool no_heartbeats = false;          // send no heartbeats (the broker sees ContactLost)
  bool ignore_commands = false;        // never answer commands (the broker's command timeout)
  bool no_register = false;            // after welcome, send nothing (the broker's register timeout)
};

struct FleetOptions {
  std::string broker_url = "ws://127.0.0.1:8081/cbp";
  std::string ca_file;  // wss: verify the broker's certificate and name against this CA
  bool insecure = false;  // wss without ca_file: connect without checking (refused unless set)
  // wss: the client certificate (PEM chain) and its key, presented to a broker whose agent
  // listener requires one (mutual TLS, docs/cbp.md); both empty: none.
  std::string client_cert_file;
  std::string client_key_file;
  int threads = 2;
  std::shared_ptr<spdlog::logger> logger;  // null: log nothing
  std::string secrets_file;                // empty: secrets in memory only
  std::vector<int> versions{cbp::kProtocolVersions.begin(), cbp::kProtocolVersions.end()};

  Millis connect_timeout{10000};                  // TCP + WebSocket handshake
  Millis handshake_timeout{cbp::kAgentHandshakeTimeout};  // each of challenge, welcome, registered
  // Reconnecting (docs/cbp.md "Reconnecting and back-off"): min(backoff_max, backoff_base x
  // 2^failures) x random(0.5..1.5); at least auth_failure_backoff after a rejection an admin
  // has to act on, superseded_backoff after Superseded, retry_after_seconds after
  // TooManyFailures. A registration that lasted stable_registration resets the failures.
  Millis backoff_base{1000};
  Millis backoff_max{60000};
  Millis auth_failure_backoff{60000};
  Millis superseded_backoff{60000};
  Millis stable_registration{60000};
  bool retry_incompatible_version = false;  // false: IncompatibleVersion stops the machine
  Millis start_spread{0};                   // Fleet::start spreads the first connects over this

  // Simulated users: after a successful prepare_session the client connects after this delay
  // (0: at once; nullopt: never, only Machine::client_connects).
  std::optional<Millis> client_connect_delay = Millis{2000};
  Millis redeem_timeout{30000};  // no ticket reply by then: the logon fails
};

enum class State {
  offline,     // not connected; a reconnect may be scheduled
  connecting,  // TCP/WebSocket handshake
  handshake,   // challenge .. registered
  registered,  // heartbeating, taking commands
  stopped,     // stop(), crash(), or a rejection that cannot heal: stays down until start()
};
std::string_view to_string(State s);

struct SessionView {
  cbp::SessionInfo info;
  cbp::SessionState state = cbp::SessionState::active;
  bool brokered = false;      // created by prepare_session
  std::string prepared_user;  // the user prepare_session named
};

// A snapshot of a machine, for tests and harnesses.
struct MachineStatus {
  std::string name;
  State state = State::offline;
  bool running = false;  // wants to be connected (start() and no stop)
  std::string secret;    // the machine secret in use (empty: will enroll)
  bool enrolled = false;  // got its secret from an enrollment
  int connects = 0;       // connection attempts
  int registrations = 0;  // `registered` received
  int heartbeats = 0;     // heartbeats sent
  std::vector<cbp::Reason> rejections;  // every `rejected` received, in order
  std::vector<cbp::Reason> errors;      // every `error` received from the broker, in order
  std::string last_close;               // why the last connection ended
  std::string last_hello;               // the JSON text of the last hello sent
  int version = 0;                      // the version of the last welcome
  std::int64_t heartbeat_interval_seconds = 0;
  std::int64_t load_index = 0;
  std::vector<SessionView> sessions;
  std::vector<std::string> commands;  // "prepare_session ok", "logoff_session failed: no such session", ...
  std::vector<std::string> messages;  // send_message texts shown ("title: text")
  int logons = 0;                     // simulated clients that redeemed their ticket and logged on
  int failed_logons = 0;              // ... whose ticket could not be used

  bool rejected_with(cbp::Reason r) const;
  bool got_error(cbp::Reason r) const;
};

class Fleet;

// One simulated machine. A cheap handle (copies refer to the same machine); made by Fleet::add.
class Machine {
 public:
  struct Impl;
  Machine() = default;
  explicit Machine(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
  explicit operator bool() const { return impl_ != nullptr; }

  const std::string& name() const;
  // Connects (again) and stays connected, reconnecting with back-off. No-op when running.
  void start();
  // Graceful stop: goodbye with `reason` (AgentShutdown, AgentSuspended or AgentRequested) when
  // registered, then closes; stays down until start().
  void stop(cbp::Reason reason = cbp::Reason::agent_shutdown, std::string message = "service stopping");
  // Drops the connection without goodbye and stays down (a crash: the broker sees ContactLost).
  void crash();
  // Drops the connection without goodbye and reconnects after the back-off (a network cut).
  void interrupt();
  // Heartbeats on or off (off: the broker drops the machine with ContactLost).
  void set_heartbeats(bool on);
  void set_faults(Faults faults);
  // Sends any text on the current connection (malformed JSON, unknown types, replays).
  void send_raw(std::string text);

  // Sessions the broker did not broker, and what users do with sessions. Events go to the broker
  // when registered (queued between register and registered, dropped while offline: the next
  // register reports the sessions). Each returns false when the session is not there or not in a
  // state that allows it.
  bool add_session(const cbp::SessionInfo& info, cbp::SessionState state = cbp::SessionState::active);
  bool disconnect_session(const std::string& session_key);
  bool reconnect_session(const std::string& session_key, const std::string& client_name = {});
  bool logoff_session(const std::string& session_key);
  // The client of a prepared session connects now: Connected, redeem_ticket, then Active (or
  // Reconnected) with the redeemed user, or LoggedOff when the ticket cannot be used or names
  // another user than the one prepared.
  bool client_connects(const std::string& session_key);
  // Redeems any ticket (as a client presenting it would); the future gets the broker's reply, or
  // ok=false, reason Refused, message "not registered" / "connection closed" / "timeout".
  std::future<cbp::Ticket> redeem(const std::string& ticket, const std::string& session_key = {});

  MachineStatus status() const;
  // Waits until pred(status()) holds (checked at every change) or timeout; returns the result.
  bool wait_for(const std::function<bool(const MachineStatus&)>& pred, Millis timeout) const;

 private:
  friend class Fleet;
  std::shared_ptr<Impl> impl_;
};

class Fleet {
 public:
  // Throws std::runtime_error when the secrets file cannot be read or, for a wss:// broker, the
  // TLS files (CA, client certificate and key) cannot be loaded.
  explicit Fleet(FleetOptions options);
  // Closes every connection (without goodbye: call stop() first for a graceful end) and joins
  // the pool's threads. Must not run on a pool thread.
  ~Fleet();
  Fleet(const Fleet&) = delete;
  Fleet& operator=(const Fleet&) = delete;

  // A new machine (not started). Its secret: config.secret, else the store's.
  Machine add(MachineConfig config);
  // Starts every machine, the first connects spread over options.start_spread.
  void start();
  // Graceful stop of every machine (goodbye `reason`); waits up to `timeout` until every
  // connection has ended. Returns how many had not ended by then.
  std::size_t stop(cbp::Reason reason, Millis timeout);

  std::vector<Machine> machines() const;
  std::size_t count(State state) const;
  SecretStore& secrets();
  const FleetOptions& options() const;

  struct Shared;

 private:
  std::shared_ptr<Shared> shared_;
  mutable std::mutex mutex_;
  std::vector<Machine> machines_;  // guarded by mutex_
};

// "10.99.0.1" + 3 -> "10.99.0.4" (IPv4 only); empty when base is not an IPv4 address or the
// result would leave the address space.
std::string nth_address(const std::string& base, std::uint32_t n);

}  // namespace vda
