// broker/engine.cpp: see engine.hpp.
#include "broker/engine.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <utility>

namespace broker {

using common::model::Kind;
using common::model::Object;

namespace {

template <class E, std::size_t N>
using Spellings = std::array<std::pair<E, std::string_view>, N>;

constexpr Spellings<SessionSupport, 2> kSessionSupport{{{SessionSupport::single_session, "SingleSession"},
                                                        {SessionSupport::multi_session, "MultiSession"}}};
constexpr Spellings<RegistrationState, 4> kRegistration{{{RegistrationState::unregistered, "Unregistered"},
                                                         {RegistrationState::initializing, "Initializing"},
                                                         {RegistrationState::registered, "Registered"},
                                                         {RegistrationState::agent_error, "AgentError"}}};
constexpr Spellings<SummaryState, 6> kSummary{{{SummaryState::off, "Off"},
                                               {SummaryState::unregistered, "Unregistered"},
                                               {SummaryState::available, "Available"},
                                               {SummaryState::disconnected, "Disconnected"},
                                               {SummaryState::in_use, "InUse"},
                                               {SummaryState::preparing, "Preparing"}}};
constexpr Spellings<PowerState, 10> kPower{{{PowerState::unmanaged, "Unmanaged"},
                                            {PowerState::unknown, "Unknown"},
                                            {PowerState::unavailable, "Unavailable"},
                                            {PowerState::off, "Off"},
                                            {PowerState::on, "On"},
                                            {PowerState::suspended, "Suspended"},
                                            {PowerState::turning_on, "TurningOn"},
                                            {PowerState::turning_off, "TurningOff"},
                                            {PowerState::suspending, "Suspending"},
                                            {PowerState::resuming, "Resuming"}}};
constexpr Spellings<SessionState, 9> kSessionState{{{SessionState::preparing_new_session, "PreparingNewSession"},
                                                    {SessionState::connected, "Connected"},
                                                    {SessionState::active, "Active"},
                                                    {SessionState::disconnected, "Disconnected"},
                                                    {SessionState::reconnecting, "Reconnecting"},
                                                    {SessionState::non_brokered_session, "NonBrokeredSession"},
                                                    {SessionState::other, "Other"},
                                                    {SessionState::unknown, "Unknown"},
                                                    {SessionState::logged_off, "LoggedOff"}}};
constexpr Spellings<DesktopKind, 2> kDesktopKind{{{DesktopKind::private_desktop, "Private"},
                                                  {DesktopKind::shared_desktop, "Shared"}}};
constexpr Spellings<DeliveryType, 3> kDeliveryType{{{DeliveryType::desktops_only, "DesktopsOnly"},
                                                    {DeliveryType::apps_only, "AppsOnly"},
                                                    {DeliveryType::desktops_and_apps, "DesktopsAndApps"}}};
constexpr Spellings<AllocationType, 2> kAllocation{{{AllocationType::static_allocation, "Static"},
                                                    {AllocationType::random_allocation, "Random"}}};
constexpr Spellings<RuleType, 4> kRuleType{{{RuleType::access, "access"},
                                            {RuleType::entitlement, "entitlement"},
                                            {RuleType::assignment, "assignment"},
                                            {RuleType::app_entitlement, "app_entitlement"}}};

template <class E, std::size_t N>
std::string_view spell(const Spellings<E, N>& table, E v) {
  for (const auto& [e, s] : table)
    if (e == v) return s;
  return {};
}

template <class E, std::size_t N>
std::optional<E> parse(const Spellings<E, N>& table, std::string_view text) {
  for (const auto& [e, s] : table)
    if (s == text) return e;
  return std::nullopt;
}

// The field as the enum, else `fallback` (the descriptors' default; storage validated the value).
template <class E, std::size_t N>
E field(const Object& o, const char* name, const Spellings<E, N>& table, E fallback) {
  return parse(table, o.text(name)).value_or(fallback);
}

bool live(const Session& s) { return s.state != SessionState::logged_off; }

}  // namespace

std::string_view to_string(SessionSupport v) { return spell(kSessionSupport, v); }
std::string_view to_string(RegistrationState v) { return spell(kRegistration, v); }
std::string_view to_string(SummaryState v) { return spell(kSummary, v); }
std::string_view to_string(PowerState v) { return spell(kPower, v); }
std::string_view to_string(SessionState v) { return spell(kSessionState, v); }

template <>
std::optional<SessionSupport> parse_enum<SessionSupport>(std::string_view t) { return parse(kSessionSupport, t); }
template <>
std::optional<RegistrationState> parse_enum<RegistrationState>(std::string_view t) { return parse(kRegistration, t); }
template <>
std::optional<SummaryState> parse_enum<SummaryState>(std::string_view t) { return parse(kSummary, t); }
template <>
std::optional<PowerState> parse_enum<PowerState>(std::string_view t) { return parse(kPower, t); }
template <>
std::optional<SessionState> parse_enum<SessionState>(std::string_view t) { return parse(kSessionState, t); }

bool Engine::Lowered::operator()(const std::string& a, const std::string& b) const {
  return std::lexicographical_compare(a.begin(), a.end(), b.begin(), b.end(), [](char x, char y) {
    return std::tolower(static_cast<unsigned char>(x)) < std::tolower(static_cast<unsigned char>(y));
  });
}

common::Status Engine::load(storage::Repository& repository) {
  std::vector<Object> all;
  auto st = repository.read([&](storage::Transaction& tx) -> common::Status {
    all.clear();
    for (Kind k : {Kind::catalog, Kind::delivery_group, Kind::machine, Kind::session, Kind::assignment,
                   Kind::application, Kind::rule}) {
      auto objects = tx.list(k, {});
      if (!objects) return objects.error();
      for (auto& o : *objects) all.push_back(std::move(o));
    }
    return {};
  });
  if (!st) return st;
  std::lock_guard lock(mutex_);
  clear_locked();
  for (const auto& o : all) put_locked(o);
  reload_needed_ = false;
  ++counters_.reloads;
  return {};
}

void Engine::apply(const std::vector<storage::Change>& changes) {
  std::lock_guard lock(mutex_);
  for (const auto& c : changes) {
    ++counters_.applied_changes;
    if (!c.old_name.empty()) {
      erase_locked(c.kind, c.old_name);
      if (c.kind == Kind::catalog || c.kind == Kind::delivery_group || c.kind == Kind::machine)
        reload_needed_ = true;  // the database renamed the references too
    }
    if (c.object)
      put_locked(*c.object);
    else
      erase_locked(c.kind, c.name);
  }
}

common::Status Engine::reload_if_needed(storage::Repository& repository) {
  {
    std::lock_guard lock(mutex_);
    if (!reload_needed_) return {};
  }
  return load(repository);
}

void Engine::clear_locked() {
  catalogs_.clear();
  groups_.clear();
  machines_.clear();
  sessions_.clear();
  assignments_.clear();
  applications_.clear();
  rules_.clear();
  machines_by_group_.clear();
  free_by_group_.clear();
  sessions_by_machine_.clear();
  sessions_by_user_.clear();
  assignments_by_user_.clear();
  assignments_by_machine_.clear();
  rules_by_group_.clear();
}

bool Engine::is_free_locked(const Machine& m) const {
  if (m.delivery_group.empty() || m.registration != RegistrationState::registered || m.in_maintenance_mode)
    return false;
  auto cat = catalogs_.find(m.catalog);
  if (cat == catalogs_.end() || cat->second.session_support != SessionSupport::single_session) return false;
  if (auto s = sessions_by_machine_.find(m.name); s != sessions_by_machine_.end() && !s->second.empty()) return false;
  if (auto a = assignments_by_machine_.find(m.name); a != assignments_by_machine_.end() && !a->second.empty())
    return false;
  return true;
}

void Engine::refresh_free_locked(const std::string& machine) {
  auto it = machines_.find(machine);
  if (it == machines_.end()) return;
  const Machine& m = it->second;
  if (m.delivery_group.empty()) return;
  auto& set = free_by_group_[m.delivery_group];
  if (is_free_locked(m))
    set.insert(m.name);
  else
    set.erase(m.name);
}

void Engine::index_machine_locked(const Machine& m, bool add) {
  if (m.delivery_group.empty()) return;
  if (add) {
    machines_by_group_[m.delivery_group].insert(m.name);
  } else {
    machines_by_group_[m.delivery_group].erase(m.name);
    free_by_group_[m.delivery_group].erase(m.name);
  }
}

void Engine::index_session_locked(const Session& s, bool add) {
  if (!live(s)) return;
  if (add) {
    sessions_by_machine_[s.machine].insert(s.name);
    if (!s.user.empty()) sessions_by_user_[s.user].insert(s.name);
  } else {
    sessions_by_machine_[s.machine].erase(s.name);
    if (!s.user.empty()) sessions_by_user_[s.user].erase(s.name);
  }
}

void Engine::index_assignment_locked(const Assignment& a, bool add) {
  if (add) {
    assignments_by_machine_[a.machine].insert(a.name);
    if (!a.user.empty()) assignments_by_user_[a.user].insert(a.name);
  } else {
    assignments_by_machine_[a.machine].erase(a.name);
    if (!a.user.empty()) assignments_by_user_[a.user].erase(a.name);
  }
}

void Engine::erase_locked(Kind kind, const std::string& name) {
  switch (kind) {
    case Kind::catalog: catalogs_.erase(name); break;
    case Kind::delivery_group: groups_.erase(name); break;
    case Kind::machine:
      if (auto it = machines_.find(name); it != machines_.end()) {
        index_machine_locked(it->second, false);
        machines_.erase(it);
      }
      break;
    case Kind::session:
      if (auto it = sessions_.find(name); it != sessions_.end()) {
        const auto machine = it->second.machine;
        index_session_locked(it->second, false);
        sessions_.erase(it);
        refresh_free_locked(machine);
      }
      break;
    case Kind::assignment:
      if (auto it = assignments_.find(name); it != assignments_.end()) {
        const auto machine = it->second.machine;
        index_assignment_locked(it->second, false);
        assignments_.erase(it);
        refresh_free_locked(machine);
      }
      break;
    case Kind::application: applications_.erase(name); break;
    case Kind::rule:
      if (auto it = rules_.find(name); it != rules_.end()) {
        rules_by_group_[it->second.delivery_group].erase(name);
        rules_.erase(it);
      }
      break;
    default: break;
  }
}

void Engine::put_locked(const Object& o) {
  erase_locked(o.kind, o.name);
  switch (o.kind) {
    case Kind::catalog: {
      Catalog c;
      c.name = o.name;
      c.allocation = field(o, "allocation_type", kAllocation, AllocationType::random_allocation);
      c.session_support = field(o, "session_support", kSessionSupport, SessionSupport::single_session);
      c.hypervisor_connection = o.text("hypervisor_connection");
      c.physical = o.flag("machines_are_physical");
      catalogs_[c.name] = std::move(c);
      // A catalog's session support decides which of its machines are free desktops.
      for (const auto& [name, m] : machines_)
        if (m.catalog == o.name) refresh_free_locked(name);
      break;
    }
    case Kind::delivery_group: {
      DeliveryGroup g;
      g.name = o.name;
      g.published_name = o.text("published_name", o.name);
      g.kind = field(o, "desktop_kind", kDesktopKind, DesktopKind::shared_desktop);
      g.delivery = field(o, "delivery_type", kDeliveryType, DeliveryType::desktops_only);
      g.session_support = field(o, "session_support", kSessionSupport, SessionSupport::single_session);
      g.enabled = o.flag("enabled", true);
      g.in_maintenance_mode = o.flag("in_maintenance_mode");
      g.automatic_power_on_for_assigned = o.flag("automatic_power_on_for_assigned", true);
      groups_[g.name] = std::move(g);
      break;
    }
    case Kind::machine: {
      Machine m;
      m.name = o.name;
      m.id = o.id;
      m.catalog = o.text("catalog");
      m.delivery_group = o.text("delivery_group");
      m.dns_name = o.text("dns_name");
      m.agent_address = o.text("agent_address");
      m.tags = o.list("tags");
      m.in_maintenance_mode = o.flag("in_maintenance_mode");
      m.registration = field(o, "registration_state", kRegistration, RegistrationState::unregistered);
      m.power = field(o, "power_state", kPower, PowerState::unknown);
      m.summary = field(o, "summary_state", kSummary, SummaryState::unregistered);
      m.fault_state = o.text("fault_state", "None");
      m.load_index = o.integer("load_index");
      m.session_count = o.integer("session_count");
      index_machine_locked(m, true);
      const auto name = m.name;
      machines_[name] = std::move(m);
      refresh_free_locked(name);
      break;
    }
    case Kind::session: {
      Session s;
      s.name = o.name;
      s.key = o.text("session_key", o.name);
      s.machine = o.text("machine");
      s.user = o.text("user_name");
      s.delivery_group = o.text("delivery_group");
      s.application = o.text("application");
      s.client_name = o.text("client_name");
      s.client_address = o.text("client_address");
      s.state = field(o, "state", kSessionState, SessionState::unknown);
      s.brokered = o.flag("brokered", true);
      s.start_time = o.text("start_time");
      index_session_locked(s, true);
      const auto machine = s.machine;
      sessions_[s.name] = std::move(s);
      refresh_free_locked(machine);
      break;
    }
    case Kind::assignment: {
      Assignment a;
      a.name = o.name;
      a.machine = o.text("machine");
      a.user = o.text("user");
      a.client_ip = o.text("client_ip");
      a.rule = o.text("rule");
      index_assignment_locked(a, true);
      const auto machine = a.machine;
      assignments_[a.name] = std::move(a);
      refresh_free_locked(machine);
      break;
    }
    case Kind::application: {
      Application a;
      a.name = o.name;
      a.browser_name = o.text("browser_name", o.name);
      a.published_name = o.text("published_name", o.name);
      a.restrict_to_tag = o.text("restrict_to_tag");
      a.delivery_groups = o.list("delivery_groups");
      a.associated_users = o.list("associated_users");
      a.enabled = o.flag("enabled", true);
      a.visible = o.flag("visible", true);
      a.user_filter_enabled = o.flag("user_filter_enabled");
      a.max_per_user_instances = o.integer("max_per_user_instances");
      a.max_total_instances = o.integer("max_total_instances");
      applications_[a.name] = std::move(a);
      break;
    }
    case Kind::rule: {
      Rule r;
      r.name = o.name;
      r.delivery_group = o.text("delivery_group");
      r.published_name = o.text("published_name");
      r.restrict_to_tag = o.text("restrict_to_tag");
      r.session_reconnection = o.text("session_reconnection", "Always");
      r.type = field(o, "rule_type", kRuleType, RuleType::access);
      r.enabled = o.flag("enabled", true);
      r.max_desktops = o.integer("max_desktops", 1);
      rules_by_group_[r.delivery_group].insert(r.name);
      rules_[r.name] = std::move(r);
      break;
    }
    default: break;
  }
}

std::optional<Machine> Engine::machine(std::string_view name) const {
  std::lock_guard lock(mutex_);
  auto it = machines_.find(name);
  if (it == machines_.end()) return std::nullopt;
  return it->second;
}

std::optional<Session> Engine::session(std::string_view name) const {
  std::lock_guard lock(mutex_);
  auto it = sessions_.find(name);
  if (it == sessions_.end()) return std::nullopt;
  return it->second;
}

std::vector<Session> Engine::sessions_of_machine(std::string_view machine) const {
  std::lock_guard lock(mutex_);
  std::vector<Session> out;
  if (auto it = sessions_by_machine_.find(machine); it != sessions_by_machine_.end())
    for (const auto& n : it->second) out.push_back(sessions_.find(n)->second);
  return out;
}

std::vector<Session> Engine::sessions_of_user(std::string_view user) const {
  std::lock_guard lock(mutex_);
  std::vector<Session> out;
  if (auto it = sessions_by_user_.find(std::string(user)); it != sessions_by_user_.end())
    for (const auto& n : it->second) out.push_back(sessions_.find(n)->second);
  return out;
}

std::vector<Assignment> Engine::assignments_of_user(std::string_view user) const {
  std::lock_guard lock(mutex_);
  std::vector<Assignment> out;
  if (auto it = assignments_by_user_.find(std::string(user)); it != assignments_by_user_.end())
    for (const auto& n : it->second) out.push_back(assignments_.find(n)->second);
  return out;
}

std::vector<Assignment> Engine::assignments_of_machine(std::string_view machine) const {
  std::lock_guard lock(mutex_);
  std::vector<Assignment> out;
  if (auto it = assignments_by_machine_.find(machine); it != assignments_by_machine_.end())
    for (const auto& n : it->second) out.push_back(assignments_.find(n)->second);
  return out;
}

std::vector<std::string> Engine::machines_of_group(std::string_view group) const {
  std::lock_guard lock(mutex_);
  auto it = machines_by_group_.find(group);
  if (it == machines_by_group_.end()) return {};
  return {it->second.begin(), it->second.end()};
}

std::vector<std::string> Engine::free_machines(std::string_view group) const {
  std::lock_guard lock(mutex_);
  auto it = free_by_group_.find(group);
  if (it == free_by_group_.end()) return {};
  return {it->second.begin(), it->second.end()};
}

std::vector<Rule> Engine::rules_of_group(std::string_view group) const {
  std::lock_guard lock(mutex_);
  std::vector<Rule> out;
  if (auto it = rules_by_group_.find(group); it != rules_by_group_.end())
    for (const auto& n : it->second) out.push_back(rules_.find(n)->second);
  return out;
}

std::optional<Catalog> Engine::catalog(std::string_view name) const {
  std::lock_guard lock(mutex_);
  auto it = catalogs_.find(name);
  if (it == catalogs_.end()) return std::nullopt;
  return it->second;
}

std::optional<DeliveryGroup> Engine::group(std::string_view name) const {
  std::lock_guard lock(mutex_);
  auto it = groups_.find(name);
  if (it == groups_.end()) return std::nullopt;
  return it->second;
}

EngineStats Engine::stats() const {
  std::lock_guard lock(mutex_);
  EngineStats s = counters_;
  s.catalogs = catalogs_.size();
  s.groups = groups_.size();
  s.machines = machines_.size();
  s.sessions = sessions_.size();
  s.live_sessions = static_cast<std::size_t>(
      std::count_if(sessions_.begin(), sessions_.end(), [](const auto& kv) { return live(kv.second); }));
  s.assignments = assignments_.size();
  s.applications = applications_.size();
  s.rules = rules_.size();
  return s;
}

}  // namespace broker
