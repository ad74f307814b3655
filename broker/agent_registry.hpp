// broker/agent_registry.hpp: the engine's view of agents (VDAs): authentication material,
// registration, heartbeats, session events and deregistration. The CBP endpoint (cbp/) calls it;
// it knows no sockets or JSON.
//
// Live and durable (docs/architecture.md "Live state"): registration state, load index and the
// agent's session count are live, held by the engine (broker::Engine::registered, unregistered,
// set_load) and never written to storage; a heartbeat touches no storage at all. What must survive
// a restart is stored: an enrollment's machine and secret hash, the agent's facts (version, OS,
// protocol version, address) when they change, the sessions reconciliation changes, the
// deregistration reason and time, and audit entries. A re-registration that changes nothing
// writes nothing.
//
// Threading: methods other than heartbeat() may block on storage; call them off the I/O threads.
// Thread-safe.
#pragma once

#include "common/clock.hpp"
#include "common/error.hpp"
#include "common/model.hpp"

#include <spdlog/fwd.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "storage/repository.hpp"


namespace broker {

class Engine;
using common::Result;
using common::Status;

// One session as an agent reports it.
struct AgentSession {
  std::string session_key;
  std::string user;
  std::string state;  // Connected | Active | Disconnected (agent events map onto these)
  std::string client_name;
  std::string client_address;
  std::string protocol = "HDX";
  std::string application;
};

struct Registration {
  std::string machine;
  std::string agent_version;
  std::string os;
  std::string session_support;  // SingleSession | MultiSession
  std::string address;          // host:port users connect to
  int protocol_version = 1;
  std::int64_t load_index = 0;
  std::vector<AgentSession> sessions;
};

// Why a registration was refused; the names are the admin-known deregistration reasons.
struct Refusal {
  std::string reason;   // e.g. "SingleMultiSessionMismatch", "UnknownMachine"
  std::string message;  // for the agent and the log
};

struct SessionEventOutcome {
  bool end_session = false;  // the agent must log the session off
  std::string why;
};

class AgentRegistry {
 public:
  // The most sessions a multi-session machine may report (a single-session machine: one). More
  // are not recorded; the violation is logged and audited (session-limit-exceeded).
  static constexpr std::size_t kMaxMultiSessions = 10000;

  // The engine holds the live state; attach it to `repository` (Engine::attach) so that what the
  // registry stores reaches it. Both must outlive the registry.
  AgentRegistry(storage::Repository& repository, Engine& engine, common::Clock& clock,
                std::shared_ptr<spdlog::logger> logger, int max_failures_per_minute = 5,
                std::chrono::seconds back_off = std::chrono::seconds(60));

  // The verifier (sha256 hex of the machine secret) of a known machine; errc::not_found for an
  // unknown machine, errc::forbidden when it has no secret yet (enroll or set one first).
  Result<std::string> machine_verifier(const std::string& machine);
  // The enrollment verifier of a catalog (sha256 hex of its enrollment key); not_found when the
  // catalog does not exist or has no enrollment key.
  Result<std::string> enrollment_verifier(const std::string& catalog);
  // First contact under an enrollment key: creates the machine in the catalog when it does not
  // exist, or re-keys an existing machine of that catalog that is not Registered now (non-persistent
  // VMs lose their secret); sets a new secret and returns it (shown once). errc::conflict when the
  // machine is Registered or belongs to another catalog.
  Result<std::string> enroll(const std::string& machine, const std::string& catalog);

  // Sin bin: failed authentications per key (the endpoint uses machine name and address), in memory.
  bool in_back_off(const std::string& machine);
  void record_failure(const std::string& machine);
  void record_success(const std::string& machine);

  // Marks the machine Registered and reconciles its sessions: stored sessions the agent no longer
  // has are ended (LoggedOff), reported sessions the broker never brokered are recorded as
  // NonBrokeredSession, reported PreparingNewSession ones the broker does not know are ignored.
  // A field the agent leaves empty (user, client name, client address) keeps its stored value;
  // a brokered session keeps its brokered user. A launch's pending session the agent does not
  // report is ended (LoggedOff, audit launch-failed PreparationLost) once it is older than the
  // preparation grace (a launch may still be preparing a younger one). Sessions beyond the
  // machine's session support are not recorded (audit session-limit-exceeded).
  // Returns a Refusal (and changes nothing) for a session-support mismatch with the catalog or an
  // unknown machine. The engine learns the registration and load index; storage gets only what
  // changed (sessions, the agent's facts and fault_state None, audit): nothing when nothing did.
  Result<std::optional<Refusal>> register_agent(const Registration& registration);
  // The reported load index and session count, to the engine only (no storage); errc::not_found
  // for a machine the engine does not know.
  Status heartbeat(const std::string& machine, std::int64_t load_index, std::int64_t session_count);
  // event: Connected | Active | Disconnected | Reconnected | LoggedOff. A logged-off session is
  // kept as LoggedOff with its end time. When someone other than the brokered user connects to a
  // brokered session, nothing is updated, the failure is recorded (machine
  // last_connection_failure Other, audit session-wrong-user) and the outcome says to end it.
  Result<SessionEventOutcome> session_event(const std::string& machine, const std::string& event,
                                            const AgentSession& session);
  // Ticket redemption by an agent: the ticket (as the agent presents it) must have been issued for
  // this machine and not have expired; it is redeemable once and then wiped. errc::not_found with
  // the reason otherwise (the ticket stays for its own machine; expired ones are wiped).
  // Credential data sealed with the site key ("v1." prefix, see common::crypto::seal) is returned
  // opened; set before agents connect.
  Result<storage::LogonTicket> redeem_ticket(const std::string& machine, const std::string& ticket);
  void set_credential_key(std::string site_key) { credential_key_ = std::move(site_key); }
  // How long after its start a pending session may still be in preparation by a launch (the
  // launcher's prepare timeout and a margin); set before agents connect.
  void set_preparation_grace(std::chrono::seconds grace) { preparation_grace_ = grace; }
  // Unregistered in the engine; the reason (AgentShutdown, ContactLost, DesktopRemoved, ...) and
  // time are stored (last_deregistration_reason, last_deregistration_time), except that the same
  // reason for the same machine is stored again at most once a minute (a flapping agent does not
  // turn into a write per flap).
  Status deregister(const std::string& machine, const std::string& reason);
  // A refused handshake (BadProof, UnknownMachine, ...): as deregister(), but every one is stored
  // (the endpoint's authentication back-off bounds how often).
  Status record_rejection(const std::string& machine, const std::string& reason);

 private:
  Status unregister(const std::string& machine, const std::string& reason, bool coalesce);
  storage::Repository& repository_;
  Engine& engine_;
  common::Clock& clock_;
  std::shared_ptr<spdlog::logger> logger_;
  int max_failures_;
  std::chrono::seconds back_off_;
  std::string credential_key_;
  std::chrono::seconds preparation_grace_{35};
  std::mutex mutex_;
  std::map<std::string, std::vector<common::SysTime>> failures_;  // guarded by mutex_
  std::map<std::string, common::SysTime> banned_until_;           // guarded by mutex_
  // The deregistrations recorded lately (deregister()): machine -> reason and time written.
  struct Recorded {
    std::string reason;
    common::SysTime at;
  };
  static constexpr std::chrono::seconds kDeregistrationRecordInterval{60};
  static constexpr std::size_t kMaxDeregistrationsKept = 4096;  // then the old ones are dropped
  std::map<std::string, Recorded> deregistrations_;               // guarded by mutex_
};

// A machine, its catalog's session support and the states of its sessions that have not logged
// off, read in `tx`.
struct MachineSessions {
  common::model::Object machine;
  std::string session_support;
  std::vector<std::string> states;
};
Result<MachineSessions> machine_sessions(storage::Transaction& tx, const std::string& machine);


}  // namespace broker
