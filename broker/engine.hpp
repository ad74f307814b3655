// broker/engine.hpp: the site in memory, typed (issue 14; docs/architecture.md "The engine's
// state"). The engine holds the configuration objects and the machines, sessions and assignments
// as typed structs with the indexes the hot paths need, loaded with one read at start and kept in
// step with the database by storage's commit observer (Engine::apply): whatever any writer commits
// reaches the engine before its write() returns, so the engine and the database cannot disagree.
//
// State of this groundwork: the engine is loaded and kept up to date; the request paths (launch
// selection, enumeration, registration and heartbeats) still read storage and move onto it next.
//
// Threading: every method may be called from any thread; one mutex serialises them (the decisions
// they serve take microseconds). Readers get copies or run a function under the lock (with_site).
#pragma once

#include "common/error.hpp"
#include "common/model.hpp"
#include "storage/repository.hpp"

#include <cstdint>
#include <functional>
#include <map>
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

// The spelling the site model (common/model.cpp) and the admin API use, and back; nullopt for a
// spelling that is not one of the enum's.
std::string_view to_string(SessionSupport v);
std::string_view to_string(RegistrationState v);
std::string_view to_string(SummaryState v);
std::string_view to_string(PowerState v);
std::string_view to_string(SessionState v);
template <class E>
std::optional<E> parse_enum(std::string_view text);

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
  std::string name, catalog, delivery_group, dns_name, agent_address;
  std::vector<std::string> tags;
  bool in_maintenance_mode = false;
  RegistrationState registration = RegistrationState::unregistered;
  PowerState power = PowerState::unknown;
  SummaryState summary = SummaryState::unregistered;
  std::string fault_state = "None";
  std::int64_t load_index = 0;
  std::int64_t session_count = 0;
  std::int64_t id = 0;
};

struct Session {
  std::string name;         // stored name (broker/session_keys.hpp)
  std::string key;          // the agent's key
  std::string machine, user, delivery_group, application, client_name, client_address;
  SessionState state = SessionState::preparing_new_session;
  bool brokered = true;
  std::string start_time;
};

struct Assignment {
  std::string name, machine, user, client_ip, rule;
};

struct Application {
  std::string name, browser_name, published_name, restrict_to_tag;
  std::vector<std::string> delivery_groups, associated_users;
  bool enabled = true, visible = true, user_filter_enabled = false;
  std::int64_t max_per_user_instances = 0, max_total_instances = 0;
};

struct Rule {
  std::string name, delivery_group, published_name, restrict_to_tag, session_reconnection = "Always";
  RuleType type = RuleType::access;
  bool enabled = true;
  std::int64_t max_desktops = 1;
};

// Counts, for tests, /metrics and the memory figures in docs/architecture.md.
struct EngineStats {
  std::size_t catalogs = 0, groups = 0, machines = 0, sessions = 0, live_sessions = 0, assignments = 0,
              applications = 0, rules = 0;
  std::uint64_t applied_changes = 0, reloads = 0;
};

class Engine {
 public:
  // Reads the whole site in one read transaction (replacing what the engine holds).
  common::Status load(storage::Repository& repository);
  // The commit observer's entry point (storage::CommitObserver): applies committed changes.
  // A rename of a kind other objects refer to (catalog, delivery group, machine) is followed by
  // a reload on the next call of reload_if_needed() (the database cascaded it to the referrers).
  void apply(const std::vector<storage::Change>& changes);
  // Reloads when a rename asked for it; call it outside any storage transaction.
  common::Status reload_if_needed(storage::Repository& repository);

  std::optional<Machine> machine(std::string_view name) const;
  std::optional<Session> session(std::string_view name) const;
  // Sessions that have not logged off, of a machine / of a user (case-insensitive).
  std::vector<Session> sessions_of_machine(std::string_view machine) const;
  std::vector<Session> sessions_of_user(std::string_view user) const;
  std::vector<Assignment> assignments_of_user(std::string_view user) const;
  std::vector<Assignment> assignments_of_machine(std::string_view machine) const;
  // Machines of a delivery group, by name.
  std::vector<std::string> machines_of_group(std::string_view group) const;
  // Registered single-session machines of the group, not in maintenance, with no live session
  // and no assignment: the free desktops a shared launch picks from (by name).
  std::vector<std::string> free_machines(std::string_view group) const;
  std::vector<Rule> rules_of_group(std::string_view group) const;
  std::optional<Catalog> catalog(std::string_view name) const;
  std::optional<DeliveryGroup> group(std::string_view name) const;
  EngineStats stats() const;

 private:
  struct Lowered {
    bool operator()(const std::string& a, const std::string& b) const;
  };
  void clear_locked();
  void put_locked(const common::model::Object& o);
  void erase_locked(common::model::Kind kind, const std::string& name);
  void index_session_locked(const Session& s, bool add);
  void index_assignment_locked(const Assignment& a, bool add);
  void index_machine_locked(const Machine& m, bool add);
  bool is_free_locked(const Machine& m) const;
  void refresh_free_locked(const std::string& machine);

  mutable std::mutex mutex_;
  std::map<std::string, Catalog, std::less<>> catalogs_;
  std::map<std::string, DeliveryGroup, std::less<>> groups_;
  std::map<std::string, Machine, std::less<>> machines_;
  std::map<std::string, Session, std::less<>> sessions_;
  std::map<std::string, Assignment, std::less<>> assignments_;
  std::map<std::string, Application, std::less<>> applications_;
  std::map<std::string, Rule, std::less<>> rules_;
  // Indexes (names into the maps above).
  std::map<std::string, std::set<std::string>, std::less<>> machines_by_group_;
  std::map<std::string, std::set<std::string>, std::less<>> free_by_group_;
  std::map<std::string, std::set<std::string>, std::less<>> sessions_by_machine_;  // live only
  std::map<std::string, std::set<std::string>, Lowered> sessions_by_user_;         // live only
  std::map<std::string, std::set<std::string>, Lowered> assignments_by_user_;
  std::map<std::string, std::set<std::string>, std::less<>> assignments_by_machine_;
  std::map<std::string, std::set<std::string>, std::less<>> rules_by_group_;
  bool reload_needed_ = false;
  EngineStats counters_;
};

}  // namespace broker
