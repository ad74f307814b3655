// broker/launcher.hpp: brokering. A user asks for a desktop or an application; the launcher checks
// access and entitlement, reconnects the user's existing session or picks a machine (assigned,
// assigned on first use, or the best available one of a shared group), commits the pending
// session (and any new assignment, and the logon ticket) to storage, asks the agent to prepare the
// session and, once it has, answers with where to connect and the one-time logon ticket.
//
// Semantics: site-model-reference.md 2.3-2.7 and 2.12; docs/architecture.md "Launch".
//
// Power: a launch that finds no ready machine powers one on (PowerControl), holds it for the user
// and waits for its agent to register (machine_registered()), up to power_on_wait; the front end
// retries after that and finds the machine still held. A machine that never registers within the
// site's registration_wait_timeout_seconds gets a fault state and the launch fails over
// (RegistrationTimeout when no machine is left). docs/power.md "Launching on a powered-off machine".
//
// Concurrency (docs/architecture.md "Launch"): selection runs in memory on the engine's state
// (broker/engine.hpp) under the launcher's decide mutex and the engine's lock, and reserves the
// chosen machine there; the launch's rows are then written in one write() outside every lock
// (group commit), each claim guarded in SQL (Transaction::create_guarded: a single-session
// machine without a live session, an unassigned machine and the user under the rule's limit).
// The reservation is confirmed once the write committed (the session, now in the engine, holds
// the machine) and undone when it failed; a refused guard re-reads that machine's rows into the
// engine and tries the next machine. So two launches never take the same single-session machine
// and assignments never exceed the rules, even against another broker sharing the database.
// The slow part (waiting for the agent's ack) holds no lock. Blocking storage work runs on the
// work queue; callbacks come from any thread.
#pragma once

#include "common/error.hpp"
#include "identity/directory.hpp"

#include <spdlog/fwd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace common {
class Clock;
class Scheduler;
class WorkQueue;
}  // namespace common
namespace storage {
class Repository;
}

namespace broker {

class Engine;

// What the launcher asks of an agent (cbp::AgentEndpoint implements it).
struct PrepareSession {
  std::string user;  // "DEMO\\alice"
  std::string resource;
  bool application = false;
  std::string ticket;  // the logon ticket the client will present
  std::string session_key;
  std::int64_t connect_timeout_seconds = 200;
  std::string client_name, client_address;
  std::string command_line_executable, command_line_arguments, working_directory;
};

// The launcher's view of power management (broker::PowerManager implements it): a launch that
// finds no ready machine powers one on and tells the client to retry.
class PowerControl {
 public:
  virtual ~PowerControl() = default;
  // Queues a TurnOn of the machine with launch priority (an equivalent pending action is boosted
  // instead). Returns true when the connection's throttles hold the action back for now (power
  // action throttled). Must not be called from inside a storage transaction.
  virtual common::Result<bool> power_on(const std::string& machine) = 0;
};

// What an agent answers a command about a session it does not have (docs/cbp.md).
inline constexpr const char* kNoSuchSession = "no such session";

class AgentChannel {
 public:
  virtual ~AgentChannel() = default;
  using Done = std::function<void(bool ok, const std::string& error)>;
  // Each calls done exactly once, from any thread: ok, or the agent's error / "timeout" /
  // "not connected" / "connection closed".
  virtual void prepare_session(const std::string& machine, const PrepareSession& request,
                               std::chrono::milliseconds timeout, Done done) = 0;
  virtual void logoff_session(const std::string& machine, const std::string& session_key,
                              std::chrono::milliseconds timeout, Done done) = 0;
  virtual void disconnect_session(const std::string& machine, const std::string& session_key,
                                  std::chrono::milliseconds timeout, Done done) = 0;
  virtual void send_message(const std::string& machine, const std::string& session_key, const std::string& title,
                            const std::string& text, std::chrono::milliseconds timeout, Done done) = 0;
};

// Why no machine could be given (the structured reason of requirement "explained failures").
enum class LaunchFailure {
  none,
  not_entitled,            // no such resource for this user (or no access)
  resource_disabled,       // listed as disabled
  group_disabled,          // the delivery group is disabled
  group_in_maintenance,    // the delivery group is in maintenance mode
  no_machines,             // the group has no machines
  all_unregistered,        // every candidate machine is unregistered (or off)
  all_in_maintenance,      // every registered candidate is in maintenance mode
  all_in_use,              // every registered candidate is busy or full
  tag_mismatch,            // no machine carries the required tag
  instance_limit,          // application or per-user instance limit reached
  assignment_limit,        // the user has all the machines the assignment rule allows, none usable
  prepare_failed,          // every attempt to prepare a session failed
  no_session,              // reconnect: no such session of this user
  storage_error,
  powering_on,             // no machine is ready; a power-managed one is being powered on: retry
  power_throttled,         // as powering_on, but the power action waits for the connection's throttles
  registration_timeout,    // the machine powered on for the launch did not register in time, none left
};
std::string_view to_string(LaunchFailure f);  // "NotEntitled", "AllInUse", ...

struct Credential {
  std::string type = "password";  // password | smartcard | assertion | <plugin name>
  std::map<std::string, std::string> data;  // password: {"password": ...}; smartcard: {"pin": ...}
};

struct LaunchRequest {
  identity::UserIdentity user;
  std::string resource;  // the resource's InName (desktop: rule or group name; application: browser name)
  std::string reconnect_session;  // NFuse SessionName: reconnect to this session key (resource ignored)
  std::string client_name, client_address, device_id;
  Credential credential;
  std::int64_t ticket_ttl_seconds = 0;  // 0: the site's logon_ticket_ttl_seconds
};

struct LaunchResult {
  LaunchFailure failure = LaunchFailure::none;
  std::string message;  // for logs, audit and admins
  std::string machine, address, dns_name;  // address: the agent's "host:port"
  std::int64_t machine_id = 0;
  std::string session_key;
  std::string ticket;  // 30 upper-case hex digits
  bool reconnect = false;
  bool ok() const { return failure == LaunchFailure::none; }
};

struct UserSession {
  std::string session_key, machine, resource, state, client_name;
  std::string agent_key;  // the key the machine's agent knows it by (broker/session_keys.hpp)
  std::int64_t machine_id = 0;
};

struct LauncherOptions {
  std::chrono::milliseconds prepare_timeout{5000};  // an agent acks prepare_session at once
  int max_attempts = 3;                              // machines tried per launch
  // No fail-over is started after this long: front ends give up on a reply after ~30 s.
  std::chrono::milliseconds launch_budget{15000};
  std::string credential_key;  // site key (64 hex) that seals credential data; empty: stored unsealed (tests)
  // A launch that powers a machine on waits this long for its agent to register (then answers
  // PoweringOn, retry-required). The machine stays held for the user until the site's
  // registration_wait_timeout_seconds; past that the launch fails over (RegistrationTimeout).
  // Unset: the site's launch_power_on_wait_seconds (20 s by default; front ends give up on a
  // reply after about 30 s). 0: answer retry-required at once.
  std::optional<std::chrono::milliseconds> power_on_wait;
  // A machine that registers for a user who is not waiting any more stays held for that user's
  // retry this long.
  std::chrono::milliseconds claim_hold{60000};
  // Where the launch waits' timers run (brokerd: the I/O threads' io_context,
  // net::Server::scheduler()); it must outlive the launcher's last launch. nullptr: a timer thread
  // of the launcher's own (tests, tools).
  common::Scheduler* scheduler = nullptr;
};

class Launcher {
 public:
  // `engine` holds the site (attached to `repository`'s commit observer): selection reads it.
  Launcher(storage::Repository& repository, Engine& engine, common::Clock& clock, AgentChannel& agents,
           common::WorkQueue& work, std::shared_ptr<spdlog::logger> logger, LauncherOptions options = {});
  ~Launcher();  // stop()
  // Launches waiting for a machine to register answer now ("the broker is stopping"), and later
  // ones that would wait answer retry-required at once. Call before the front ends' server stops:
  // the answers go out through it. Idempotent.
  void stop();
  Launcher(const Launcher&) = delete;
  Launcher& operator=(const Launcher&) = delete;

  // Brokers one launch; done is called once, from any thread.
  void launch(LaunchRequest request, std::function<void(LaunchResult)> done);
  // Blocking convenience (tests, benchmarks): launch() and wait.
  LaunchResult launch_sync(LaunchRequest request);
  // Power management for launches of machines that are off (nullptr: such machines are skipped).
  // Set before the first launch.
  void set_power(PowerControl* power);

  // A second ticket for a launch already made (NFuse RequestTicket with the launch's TicketTag):
  // same machine, user and credential kind. errc::not_found when the session is gone or belongs to
  // another user.
  common::Result<std::string> reissue_ticket(const identity::UserIdentity& user, const std::string& session_key,
                                             const Credential& credential, std::int64_t ttl_seconds);

  // The user's sessions (states: "Active", "Disconnected"; both when empty), without those being
  // logged off: asked to log off (here or by session_command) and not yet reported ended. A launch
  // does not reconnect to those either; a logoff the agent refuses makes them reconnectable again.
  common::Result<std::vector<UserSession>> user_sessions(const identity::UserIdentity& user,
                                                         const std::set<std::string>& states);
  // Sends logoff_session / disconnect_session for each of the user's sessions; returns how many.
  common::Result<int> end_user_sessions(const identity::UserIdentity& user, bool logoff);
  // Session commands by session name (admin API). not_found for an unknown session.
  common::Status session_command(const std::string& session_key, const std::string& command, const std::string& title,
                                 const std::string& text, AgentChannel::Done done);

  // An agent has registered: launches waiting for that machine go on. Any thread.
  void machine_registered(const std::string& machine);
  // The machine's power-on failed (the hypervisor refused it or it never came on; its fault is
  // stored first): it is no longer held for a user, and launches waiting for it choose again at
  // once instead of at the end of their wait. Any thread.
  void machine_power_failed(const std::string& machine);
  // Machines powered on for launches and still held for their users (the pool policy counts them
  // as in use). Any thread.
  std::set<std::string> held_machines() const;

  // Housekeeping, run periodically: pending launches whose client never came within the ticket
  // lifetime release their machine (ConnectionTimeout); expired tickets are wiped; machines
  // powered on for a launch that have not registered within registration_wait_timeout_seconds
  // get their fault state (StuckOnBoot or Unregistered) and last_connection_failure
  // RegistrationTimeout.
  common::Status sweep();

  // Launches accepted and not answered yet.
  int in_flight() const;
  // Writes the brokering durations of the launches answered so far (the launcher gathers them and
  // writes them together 200 ms after the first, and at stop()). Tests call it to settle.
  void flush_brokering_durations();
  // Conditional writes refused since start: a machine the engine took for free was claimed in the
  // database (by another broker sharing it); each such launch tried another machine.
  std::uint64_t refused_claims() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// A fresh 30-character upper-case hex logon ticket.
std::string new_logon_ticket();

}  // namespace broker
