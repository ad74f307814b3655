// broker/engine.hpp: the site in memory, typed (docs/architecture.md "The engine"). The engine
// holds the configuration objects and the machines, sessions and assignments as typed structs with
// the indexes the hot paths need, loaded with one read at start and kept in step with the database
// by storage's commit observer (Engine::apply): whatever any writer commits reaches the engine
// before its write() returns, so the engine and the database cannot disagree.
//
// Durable and live: configuration, sessions, assignments, power and fault states are stored, and
// reach the engine through apply(). Registration state, load index and the agents' reported
// session counts are live: the agent registry sets them here (registered(), unregistered(),
// set_load()); a machine's stored row overwrites them only where its stored value changed. A machine's
// summary state is derived from them (derive_summary()) and never read from storage.
//
// Reservations: a launch picks its machine under the engine's lock (with_state) and reserves it
// (SiteState::reserve) before it writes; a reserved single-session machine is not free, a
// reserved multi-session one counts a launch's load bump. The launch confirms or undoes the
// reservation (release) once its write has committed (the committed session then holds the
// machine) or failed.
//
// Threading: every method may be called from any thread; one mutex serialises them, and
// with_state() runs a function under it (keep such functions to in-memory work: no storage, no
// agent calls, no logging of more than a line). Readers get copies, or the immutable SiteView.
#pragma once

#include "broker/entitlements.hpp"
#include "common/error.hpp"
#include "common/model.hpp"
#include "identity/directory.hpp"
#include "storage/repository.hpp"

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace broker {

enum class SessionSupport { single_session, multi_session };
enum class RegistrationState { unregistered, initializing, registered, agent_error };
enum class SummaryState { off, unregistered, available, disconnected, in_use, preparing };
enum class PowerState { unmanaged, unknown, unavailable, off, on, suspended, turning_on, turning_off, suspending, resuming };
enum class SessionState {
  preparing_new_session, connected, active, disconnected, reconnecting, non_brokered_session, other, unknown, logged_off
};
enum class DesktopKind { private_desktop, shared_desktop };
enum class DeliveryType { desktops_only, apps_only, desktops_and_apps };
enum class AllocationType { static_allocation, random_allocation };
enum class RuleType { access, entitlement, assignment, app_entitlement };
enum class Reconnection { always, disconnected_only, same_endpoint_only };
enum class SessionType { desktop, application };

// The spelling the site model (common/model.cpp) and the admin API use, and back; nullopt for a
// spelling that is not one of the enum's.
std::string_view to_string(SessionSupport v);
std::string_view to_string(RegistrationState v);
std::string_view to_string(SummaryState v);
std::string_view to_string(PowerState v);
std::string_view to_string(SessionState v);
template <class E>
std::optional<E> parse_enum(std::string_view text);

inline constexpr std::int64_t kFullLoad = 10000;  // a multi-session machine's load index when full
// Effective load a launch adds to a multi-session machine until its agent reports a new load.
inline constexpr std::int64_t kLaunchLoadBump = 500;

struct Catalog {
  std::string name;
  AllocationType allocation = AllocationType::random_allocation;
  SessionSupport session_support = SessionSupport::single_session;
  std::string hypervisor_connection;  // empty: not power managed
  bool physical = false;
};

struct DeliveryGroup {
  std::string name, published_name;
  DesktopKind kind = DesktopKind::shared_desktop;
  DeliveryType delivery = DeliveryType::desktops_only;
  SessionSupport session_support = SessionSupport::single_session;
  bool enabled = true;
  bool in_maintenance_mode = false;
  bool automatic_power_on_for_assigned = true;
};

struct Machine {
  // Stored.
  std::string name, catalog, delivery_group, dns_name, agent_address;
  std::vector<std::string> tags;
  bool in_maintenance_mode = false;
  PowerState power = PowerState::unknown;
  std::string fault_state = "None";
  std::string hosted_machine_id;  // the hypervisor's name for its VM (empty: the machine's name)
  std::int64_t id = 0;
  // Live (set by the agent registry; see the file comment).
  RegistrationState registration = RegistrationState::unregistered;
  std::int64_t load_index = 0;
  std::int64_t reported_sessions = 0;  // the agent's last heartbeat count
  // What the stored row last said of those: a stored value that changes (a writer set it on
  // purpose: the reset at start, a test) is taken; an unchanged one keeps the live value.
  RegistrationState stored_registration = RegistrationState::unregistered;
  std::int64_t stored_load = 0;
  // Derived when it changes (derive_summary).
  SummaryState summary = SummaryState::unregistered;
  std::optional<std::int64_t> indexed_load;  // its key in SiteState::hosts_by_load, if there
  SessionSupport session_support = SessionSupport::single_session;  // its catalog's
};

struct Session {
  std::string name;         // stored name (broker/session_keys.hpp)
  std::string key;          // the agent's key
  std::string machine, user, delivery_group, application, client_name, client_address;
  SessionType type = SessionType::desktop;
  SessionState state = SessionState::preparing_new_session;
  bool brokered = true;
  std::string start_time, end_time;
};

struct Assignment {
  std::string name, machine, user, client_ip, rule;
};

struct Application {
  std::string name, browser_name, published_name, restrict_to_tag;
  std::string command_line_executable, command_line_arguments, working_directory;
  std::vector<std::string> delivery_groups, associated_users;
  bool enabled = true, visible = true, user_filter_enabled = false;
  std::int64_t max_per_user_instances = 0, max_total_instances = 0;
};

struct Rule {
  std::string name, delivery_group, published_name, restrict_to_tag;
  Reconnection session_reconnection = Reconnection::always;
  RuleType type = RuleType::access;
  bool enabled = true;
  std::int64_t max_desktops = 1;
  std::int64_t max_per_entitlement_instances = 0;
};

struct SiteSettings {
  std::int64_t logon_ticket_ttl_seconds = 200;
  std::int64_t registration_wait_timeout_seconds = 180;
  std::int64_t launch_power_on_wait_seconds = 20;
};

// A machine's summary state (site-model-reference 1.8) from its registration, power state, load
// and the states of its sessions that have not logged off. The one place it is decided.
SummaryState derive_summary(RegistrationState registration, PowerState power, SessionSupport support,
                            std::int64_t load_index, const std::vector<SessionState>& live_sessions);

// What requests read of the configuration: immutable, replaced on every configuration change
// (delivery groups, rules, applications, site settings). Entitlement evaluation reads `config`
// (its filters keep the site model's field names); everything else the typed fields.
struct SiteView {
  common::model::Object settings_object;
  SiteSettings settings;
  SiteSnapshot config;  // groups, rules, applications (machines and assignments left empty)
  std::uint64_t generation = 0;
};

// Counts, for tests, /metrics and the memory figures in docs/architecture.md.
struct EngineStats {
  std::size_t catalogs = 0, groups = 0, machines = 0, sessions = 0, live_sessions = 0, assignments = 0,
              applications = 0, rules = 0, reserved = 0;
  std::uint64_t applied_changes = 0, reloads = 0, views = 0;
};

struct Lowered {  // case-insensitive ordering (user and group names)
  using is_transparent = void;
  bool operator()(std::string_view a, std::string_view b) const;
};

// The engine's state. Read and changed only under the engine's lock (Engine::with_state).
struct SiteState {
  template <class T>
  using ByName = std::map<std::string, T, std::less<>>;
  using Names = std::set<std::string, std::less<>>;

  ByName<Catalog> catalogs;
  ByName<DeliveryGroup> groups;
  ByName<Machine> machines;
  ByName<Session> sessions;  // logged-off ones too (history, until purged)
  ByName<Assignment> assignments;
  ByName<Application> applications;
  ByName<Rule> rules;
  // Indexes (names into the maps above).
  ByName<Names> machines_by_group;
  ByName<Names> free_by_group;  // registered single-session, not in maintenance, no live session, no assignment, not reserved
  // Registered multi-session machines not in maintenance, per group, by effective load (then name).
  ByName<std::set<std::pair<std::int64_t, std::string>>> hosts_by_load;
  ByName<Names> sessions_by_machine;                        // live only
  std::map<std::string, Names, Lowered> sessions_by_user;    // live only
  // Every stored session (logged-off ones too) by (machine, the agent's key) -> stored name:
  // how an agent's session event finds its record (broker/session_keys.hpp).
  std::map<std::pair<std::string, std::string>, std::string, std::less<>> sessions_by_key;
  std::map<std::string, Names, Lowered> assignments_by_user;  // the assignment's user (or group) name
  ByName<Names> assignments_by_client_ip;
  ByName<Names> assignments_by_machine;
  ByName<Names> rules_by_group;
  // Launches that picked a machine and have not committed yet: machine -> count.
  ByName<int> reserved;
  // Load added by launches to multi-session machines since their agent's last reported load.
  struct Bump {
    std::int64_t reported = 0;  // the load index when the bump began
    std::int64_t extra = 0;
  };
  ByName<Bump> bumps;

  const Machine* machine(std::string_view name) const;
  const Session* session(std::string_view name) const;
  std::size_t live_sessions_on(std::string_view machine) const;
  // Live sessions of the user (their stored user names the user by SAM name, bare name or UPN).
  std::vector<const Session*> sessions_of(const identity::UserIdentity& user) const;
  // Assignments that name the user, one of the user's groups, or the client's address.
  std::vector<const Assignment*> assignments_for(const identity::UserIdentity& user,
                                                 const std::string& client_address) const;
  std::int64_t effective_load(const Machine& m) const;  // reported load plus reserved launches' bumps

  // A launch picked the machine (a multi-session one gets a load bump); release() when its
  // write committed (confirm) or failed (undo: the bump goes too).
  void reserve(const std::string& machine);
  void release(const std::string& machine, bool undo);

  bool is_free(const Machine& m) const;
  void refresh_machine(const std::string& machine);  // free and load indexes, and summary
  void unindex_load(Machine& m);
};

class Engine {
 public:
  Engine();
  // load(), then becomes the repository's commit observer (replacing any other). Call before
  // concurrent use; the engine must outlive the repository's writes.
  common::Status attach(storage::Repository& repository);
  // Reads the whole site in one read transaction (replacing what the engine holds; the live
  // fields of machines already known are kept).
  common::Status load(storage::Repository& repository);
  // The commit observer's entry point (storage::CommitObserver): applies committed changes.
  // A rename of a kind other objects refer to (catalog, delivery group, machine) is followed by
  // a reload on the next call of reload_if_needed() (the database cascaded it to the referrers).
  void apply(const std::vector<storage::Change>& changes);
  // Reloads when a rename asked for it; call it outside any storage transaction.
  common::Status reload_if_needed(storage::Repository& repository);

  // Runs fn(SiteState&) under the engine's lock and returns what it returns.
  template <class F>
  decltype(auto) with_state(F&& fn) {
    std::lock_guard lock(mutex_);
    return std::forward<F>(fn)(state_);
  }
  template <class F>
  decltype(auto) with_state(F&& fn) const {
    std::lock_guard lock(mutex_);
    return std::forward<F>(fn)(static_cast<const SiteState&>(state_));
  }

  // The configuration as of the last change (never null).
  std::shared_ptr<const SiteView> view() const;

  // Live state, from the agent registry. False for a machine the engine does not know.
  bool registered(const std::string& machine, std::int64_t load_index);
  bool unregistered(const std::string& machine);
  bool set_load(const std::string& machine, std::int64_t load_index, std::int64_t session_count);

  std::optional<Machine> machine(std::string_view name) const;
  std::optional<Session> session(std::string_view name) const;
  // Sessions that have not logged off, of a machine / of a user name (case-insensitive).
  std::vector<Session> sessions_of_machine(std::string_view machine) const;
  std::vector<Session> sessions_of_user(std::string_view user) const;
  // The stored name of the machine's session that its agent knows by `key`, in any state.
  std::optional<std::string> session_name(const std::string& machine, const std::string& key) const;
  std::vector<Assignment> assignments_of_user(std::string_view user) const;
  std::vector<Assignment> assignments_of_machine(std::string_view machine) const;
  // Machines of a delivery group, by name.
  std::vector<std::string> machines_of_group(std::string_view group) const;
  // Registered single-session machines of the group, not in maintenance, with no live session,
  // no assignment and no launch reserving them: the free desktops a shared launch picks from.
  std::vector<std::string> free_machines(std::string_view group) const;
  std::vector<Rule> rules_of_group(std::string_view group) const;
  std::optional<Catalog> catalog(std::string_view name) const;
  std::optional<DeliveryGroup> group(std::string_view name) const;
  // Machine counts by registration state ("Registered", ...).
  std::map<std::string, std::int64_t> registration_counts() const;
  // Writes the live fields (registration_state, load_index, summary_state) into a stored machine
  // object, for the admin API. No-op for a machine the engine does not know.
  void overlay_live(common::model::Object& machine) const;
  EngineStats stats() const;

 private:
  void clear_locked();
  void put_locked(const common::model::Object& o, bool keep_live);
  void erase_locked(common::model::Kind kind, const std::string& name);
  void index_session_locked(const Session& s, bool add);
  void index_assignment_locked(const Assignment& a, bool add);
  void index_machine_locked(const Machine& m, bool add);
  void publish_view_locked();

  mutable std::mutex mutex_;
  SiteState state_;
  common::model::Object settings_;
  std::vector<common::model::Object> group_objects_, rule_objects_, application_objects_;  // for the view
  std::shared_ptr<const SiteView> view_;
  bool view_dirty_ = false;
  bool loaded_ = false;
  bool reload_needed_ = false;
  EngineStats counters_;
};

}  // namespace broker
