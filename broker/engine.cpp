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
constexpr Spellings<Reconnection, 3> kReconnection{{{Reconnection::always, "Always"},
                                                    {Reconnection::disconnected_only, "DisconnectedOnly"},
                                                    {Reconnection::same_endpoint_only, "SameEndpointOnly"}}};
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

template <class Map, class Key>
typename Map::mapped_type* find_in(Map& map, const Key& key) {
  auto it = map.find(key);
  return it == map.end() ? nullptr : &it->second;
}

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

SummaryState derive_summary(RegistrationState registration, PowerState power, SessionSupport support,
                            std::int64_t load_index, const std::vector<SessionState>& states) {
  if (registration != RegistrationState::registered)
    return power == PowerState::off || power == PowerState::suspended ? SummaryState::off : SummaryState::unregistered;
  const auto has = [&](SessionState s) { return std::find(states.begin(), states.end(), s) != states.end(); };
  if (support == SessionSupport::multi_session) return load_index >= kFullLoad ? SummaryState::in_use : SummaryState::available;
  if (has(SessionState::active) || has(SessionState::connected) || has(SessionState::reconnecting)) return SummaryState::in_use;
  if (has(SessionState::preparing_new_session)) return SummaryState::preparing;
  if (has(SessionState::disconnected)) return SummaryState::disconnected;
  if (!states.empty()) return SummaryState::in_use;
  return SummaryState::available;
}

bool Lowered::operator()(std::string_view a, std::string_view b) const {
  return std::lexicographical_compare(a.begin(), a.end(), b.begin(), b.end(), [](char x, char y) {
    return std::tolower(static_cast<unsigned char>(x)) < std::tolower(static_cast<unsigned char>(y));
  });
}

// ---- SiteState ----

const Machine* SiteState::machine(std::string_view name) const {
  auto it = machines.find(name);
  return it == machines.end() ? nullptr : &it->second;
}

const Session* SiteState::session(std::string_view name) const {
  auto it = sessions.find(name);
  return it == sessions.end() ? nullptr : &it->second;
}

std::size_t SiteState::live_sessions_on(std::string_view machine) const {
  auto it = sessions_by_machine.find(machine);
  return it == sessions_by_machine.end() ? 0 : it->second.size();
}

std::vector<const Session*> SiteState::sessions_of(const identity::UserIdentity& user) const {
  Names seen;
  std::vector<const Session*> out;
  for (const auto* key : {&user.qualified_name, &user.user_name, &user.upn}) {
    if (key->empty()) continue;
    auto it = sessions_by_user.find(*key);
    if (it == sessions_by_user.end()) continue;
    for (const auto& n : it->second)
      if (seen.insert(n).second) out.push_back(&sessions.find(n)->second);
  }
  // In the order they were stored (session names are random: order by start, then name).
  std::sort(out.begin(), out.end(), [](const Session* a, const Session* b) {
    return a->start_time != b->start_time ? a->start_time < b->start_time : a->name < b->name;
  });
  return out;
}

std::vector<const Assignment*> SiteState::assignments_for(const identity::UserIdentity& user,
                                                          const std::string& client_address) const {
  Names seen;
  std::vector<const Assignment*> out;
  auto add = [&](const Names& names) {
    for (const auto& n : names)
      if (seen.insert(n).second) out.push_back(&assignments.find(n)->second);
  };
  std::vector<const std::string*> principals{&user.qualified_name, &user.user_name, &user.upn};
  for (const auto& g : user.groups) principals.push_back(&g);
  for (const auto* p : principals) {
    if (p->empty()) continue;
    if (auto it = assignments_by_user.find(*p); it != assignments_by_user.end()) add(it->second);
  }
  if (!client_address.empty())
    if (auto it = assignments_by_client_ip.find(client_address); it != assignments_by_client_ip.end()) add(it->second);
  std::sort(out.begin(), out.end(), [](const Assignment* a, const Assignment* b) { return a->name < b->name; });
  return out;
}

std::int64_t SiteState::effective_load(const Machine& m) const {
  auto it = bumps.find(m.name);
  if (it == bumps.end() || it->second.reported != m.load_index) return m.load_index;  // reported since
  return m.load_index + it->second.extra;
}

void SiteState::reserve(const std::string& machine) {
  ++reserved[machine];
  if (const auto* m = this->machine(machine); m && m->session_support == SessionSupport::multi_session) {
    auto& b = bumps[machine];
    if (b.reported != m->load_index) b = {m->load_index, 0};
    b.extra += kLaunchLoadBump;
  }
  refresh_machine(machine);
}

void SiteState::release(const std::string& machine, bool undo) {
  auto it = reserved.find(machine);
  if (it == reserved.end()) return;
  if (--it->second <= 0) reserved.erase(it);
  if (undo)
    if (auto b = bumps.find(machine); b != bumps.end() && (b->second.extra -= kLaunchLoadBump) <= 0) bumps.erase(b);
  refresh_machine(machine);
}

bool SiteState::is_free(const Machine& m) const {
  if (m.delivery_group.empty() || m.registration != RegistrationState::registered || m.in_maintenance_mode ||
      m.session_support != SessionSupport::single_session)
    return false;
  if (live_sessions_on(m.name) > 0 || reserved.contains(m.name)) return false;
  if (auto a = assignments_by_machine.find(m.name); a != assignments_by_machine.end() && !a->second.empty()) return false;
  return true;
}

void SiteState::refresh_machine(const std::string& name) {
  auto it = machines.find(name);
  if (it == machines.end()) return;
  Machine& m = it->second;
  auto cat = catalogs.find(m.catalog);
  m.session_support = cat == catalogs.end() ? SessionSupport::single_session : cat->second.session_support;
  std::vector<SessionState> states;
  if (auto s = sessions_by_machine.find(name); s != sessions_by_machine.end())
    for (const auto& n : s->second) states.push_back(sessions.find(n)->second.state);
  m.summary = derive_summary(m.registration, m.power, m.session_support, m.load_index, states);
  unindex_load(m);
  if (m.delivery_group.empty()) return;
  if (m.session_support == SessionSupport::multi_session && m.registration == RegistrationState::registered &&
      !m.in_maintenance_mode) {
    const auto load = effective_load(m);
    hosts_by_load[m.delivery_group].insert({load, m.name});
    m.indexed_load = load;
  }
  auto& set = free_by_group[m.delivery_group];
  if (is_free(m))
    set.insert(m.name);
  else
    set.erase(m.name);
}

void SiteState::unindex_load(Machine& m) {
  if (!m.indexed_load) return;
  if (auto h = hosts_by_load.find(m.delivery_group); h != hosts_by_load.end()) h->second.erase({*m.indexed_load, m.name});
  m.indexed_load.reset();
}

// ---- Engine ----

Engine::Engine() : settings_(common::model::make_default(Kind::site, "site")) { publish_view_locked(); }

common::Status Engine::attach(storage::Repository& repository) {
  if (auto st = load(repository); !st) return st;
  repository.set_commit_observer([this](const std::vector<storage::Change>& changes) { apply(changes); });
  return {};
}

common::Status Engine::load(storage::Repository& repository) {
  std::vector<Object> all;
  std::optional<Object> settings;
  auto st = repository.read([&](storage::Transaction& tx) -> common::Status {
    all.clear();
    if (auto s = tx.get(Kind::site, "site")) settings = std::move(*s);
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
  // A reload keeps what is live (registrations, loads, reservations): storage does not hold it.
  SiteState::ByName<Machine> before;
  before.swap(state_.machines);
  auto reserved = std::move(state_.reserved);
  auto bumps = std::move(state_.bumps);
  clear_locked();
  state_.reserved = std::move(reserved);
  state_.bumps = std::move(bumps);
  settings_ = settings ? std::move(*settings) : common::model::make_default(Kind::site, "site");
  for (const auto& o : all) put_locked(o, false);
  if (loaded_)
    for (auto& [name, m] : state_.machines)
      if (auto* old = find_in(before, name)) {
        m.registration = old->registration;
        m.load_index = old->load_index;
        m.reported_sessions = old->reported_sessions;
      }
  for (const auto& [name, m] : state_.machines) state_.refresh_machine(name);
  loaded_ = true;
  reload_needed_ = false;
  ++counters_.reloads;
  publish_view_locked();
  return {};
}

void Engine::apply(const std::vector<storage::Change>& changes) {
  std::lock_guard lock(mutex_);
  for (const auto& c : changes) {
    ++counters_.applied_changes;
    if (!c.old_name.empty()) {
      // A renamed machine keeps its live state under its new name.
      if (c.kind == Kind::machine && c.object)
        if (auto* old = find_in(state_.machines, c.old_name)) {
          Machine carried = *old;
          erase_locked(c.kind, c.old_name);
          carried.name = c.name;
          state_.machines[c.name] = std::move(carried);
        }
      erase_locked(c.kind, c.old_name);
      if (c.kind == Kind::catalog || c.kind == Kind::delivery_group || c.kind == Kind::machine)
        reload_needed_ = true;  // the database renamed the references too
    }
    if (c.object)
      put_locked(*c.object, true);
    else
      erase_locked(c.kind, c.name);
  }
  if (view_dirty_) publish_view_locked();
}

common::Status Engine::reload_if_needed(storage::Repository& repository) {
  {
    std::lock_guard lock(mutex_);
    if (!reload_needed_) return {};
  }
  return load(repository);
}

std::shared_ptr<const SiteView> Engine::view() const {
  std::lock_guard lock(mutex_);
  return view_;
}

void Engine::publish_view_locked() {
  auto v = std::make_shared<SiteView>();
  v->settings_object = settings_;
  v->settings.logon_ticket_ttl_seconds = settings_.integer("logon_ticket_ttl_seconds", 200);
  v->settings.registration_wait_timeout_seconds = settings_.integer("registration_wait_timeout_seconds", 180);
  v->settings.launch_power_on_wait_seconds = settings_.integer("launch_power_on_wait_seconds", 20);
  // In id order, as storage lists them (entitlements list resources in that order).
  auto by_id = [](std::vector<Object> list) {
    std::sort(list.begin(), list.end(), [](const Object& a, const Object& b) { return a.id < b.id; });
    return list;
  };
  v->config.groups = by_id(group_objects_);
  v->config.rules = by_id(rule_objects_);
  v->config.applications = by_id(application_objects_);
  v->generation = ++counters_.views;
  view_ = std::move(v);
  view_dirty_ = false;
}

bool Engine::registered(const std::string& machine, std::int64_t load_index) {
  std::lock_guard lock(mutex_);
  auto* m = find_in(state_.machines, machine);
  if (!m) return false;
  m->registration = RegistrationState::registered;
  m->load_index = load_index;
  state_.refresh_machine(machine);
  return true;
}

bool Engine::unregistered(const std::string& machine) {
  std::lock_guard lock(mutex_);
  auto* m = find_in(state_.machines, machine);
  if (!m) return false;
  m->registration = RegistrationState::unregistered;
  m->load_index = 0;
  m->reported_sessions = 0;
  state_.refresh_machine(machine);
  return true;
}

bool Engine::set_load(const std::string& machine, std::int64_t load_index, std::int64_t session_count) {
  std::lock_guard lock(mutex_);
  auto* m = find_in(state_.machines, machine);
  if (!m) return false;
  const bool changed = m->load_index != load_index;
  m->load_index = load_index;
  m->reported_sessions = session_count;
  if (changed) {
    state_.bumps.erase(machine);  // the agent's figure counts now
    state_.refresh_machine(machine);
  }
  return true;
}

void Engine::clear_locked() {
  state_ = SiteState{};
  group_objects_.clear();
  rule_objects_.clear();
  application_objects_.clear();
  view_dirty_ = true;
}

void Engine::index_machine_locked(const Machine& m, bool add) {
  if (m.delivery_group.empty()) return;
  if (add) {
    state_.machines_by_group[m.delivery_group].insert(m.name);
  } else {
    state_.machines_by_group[m.delivery_group].erase(m.name);
    state_.free_by_group[m.delivery_group].erase(m.name);
    if (m.indexed_load)
      if (auto h = state_.hosts_by_load.find(m.delivery_group); h != state_.hosts_by_load.end())
        h->second.erase({*m.indexed_load, m.name});
  }
}

void Engine::index_session_locked(const Session& s, bool add) {
  if (add) {
    // Two records of one key (a live one beside an old logged-off one) point at the live one.
    auto [it, inserted] = state_.sessions_by_key.try_emplace({s.machine, s.key}, s.name);
    if (!inserted && it->second != s.name) {
      const Session* other = state_.session(it->second);
      if (!other || !live(*other) || live(s)) it->second = s.name;
    }
  } else if (auto it = state_.sessions_by_key.find(std::pair{s.machine, s.key});
             it != state_.sessions_by_key.end() && it->second == s.name) {
    state_.sessions_by_key.erase(it);
  }
  if (!live(s)) return;
  if (add) {
    state_.sessions_by_machine[s.machine].insert(s.name);
    if (!s.user.empty()) state_.sessions_by_user[s.user].insert(s.name);
  } else {
    if (auto* set = find_in(state_.sessions_by_machine, s.machine)) {
      set->erase(s.name);
      if (set->empty()) state_.sessions_by_machine.erase(s.machine);
    }
    if (!s.user.empty())
      if (auto it = state_.sessions_by_user.find(s.user); it != state_.sessions_by_user.end()) {
        it->second.erase(s.name);
        if (it->second.empty()) state_.sessions_by_user.erase(it);
      }
  }
}

void Engine::index_assignment_locked(const Assignment& a, bool add) {
  auto edit = [&](auto& index, const std::string& key) {
    if (key.empty()) return;
    if (add) return void(index[key].insert(a.name));
    auto it = index.find(key);
    if (it == index.end()) return;
    it->second.erase(a.name);
    if (it->second.empty()) index.erase(it);
  };
  edit(state_.assignments_by_machine, a.machine);
  edit(state_.assignments_by_user, a.user);
  if (a.user.empty()) edit(state_.assignments_by_client_ip, a.client_ip);
}

namespace {
void erase_object(std::vector<Object>& list, const std::string& name) {
  std::erase_if(list, [&](const Object& o) { return o.name == name; });
}
}  // namespace

void Engine::erase_locked(Kind kind, const std::string& name) {
  switch (kind) {
    case Kind::site: break;
    case Kind::catalog: state_.catalogs.erase(name); break;
    case Kind::delivery_group:
      state_.groups.erase(name);
      erase_object(group_objects_, name);
      view_dirty_ = true;
      break;
    case Kind::machine:
      if (auto it = state_.machines.find(name); it != state_.machines.end()) {
        index_machine_locked(it->second, false);
        state_.machines.erase(it);
      }
      break;
    case Kind::session:
      if (auto it = state_.sessions.find(name); it != state_.sessions.end()) {
        const auto machine = it->second.machine;
        index_session_locked(it->second, false);
        state_.sessions.erase(it);
        state_.refresh_machine(machine);
      }
      break;
    case Kind::assignment:
      if (auto it = state_.assignments.find(name); it != state_.assignments.end()) {
        const auto machine = it->second.machine;
        index_assignment_locked(it->second, false);
        state_.assignments.erase(it);
        state_.refresh_machine(machine);
      }
      break;
    case Kind::application:
      state_.applications.erase(name);
      erase_object(application_objects_, name);
      view_dirty_ = true;
      break;
    case Kind::rule:
      if (auto it = state_.rules.find(name); it != state_.rules.end()) {
        state_.rules_by_group[it->second.delivery_group].erase(name);
        state_.rules.erase(it);
      }
      erase_object(rule_objects_, name);
      view_dirty_ = true;
      break;
    default: break;
  }
}

void Engine::put_locked(const Object& o, bool keep_live) {
  if (o.kind == Kind::site) {
    settings_ = o;
    view_dirty_ = true;
    return;
  }
  std::optional<Machine> previous;
  if (o.kind == Kind::machine && keep_live)
    if (auto* m = find_in(state_.machines, o.name)) previous = *m;
  erase_locked(o.kind, o.name);
  switch (o.kind) {
    case Kind::catalog: {
      Catalog c;
      c.name = o.name;
      c.allocation = field(o, "allocation_type", kAllocation, AllocationType::random_allocation);
      c.session_support = field(o, "session_support", kSessionSupport, SessionSupport::single_session);
      c.hypervisor_connection = o.text("hypervisor_connection");
      c.physical = o.flag("machines_are_physical");
      state_.catalogs[c.name] = std::move(c);
      // A catalog's session support decides which of its machines are free desktops.
      for (const auto& [name, m] : state_.machines)
        if (m.catalog == o.name) state_.refresh_machine(name);
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
      state_.groups[g.name] = std::move(g);
      group_objects_.push_back(o);
      view_dirty_ = true;
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
      m.power = field(o, "power_state", kPower, PowerState::unknown);
      m.fault_state = o.text("fault_state", "None");
      m.hosted_machine_id = o.text("hosted_machine_id");
      m.stored_registration = field(o, "registration_state", kRegistration, RegistrationState::unregistered);
      m.stored_load = o.integer("load_index");
      m.registration = m.stored_registration;
      m.load_index = m.stored_load;
      if (previous) {
        if (previous->stored_registration == m.stored_registration) m.registration = previous->registration;
        if (previous->stored_load == m.stored_load) m.load_index = previous->load_index;
        m.reported_sessions = previous->reported_sessions;
      }
      index_machine_locked(m, true);
      const auto name = m.name;
      state_.machines[name] = std::move(m);
      state_.refresh_machine(name);
      break;
    }
    case Kind::session: {
      Session s;
      s.name = o.name;
      s.key = o.text("session_key");
      if (s.key.empty()) s.key = o.name;
      s.machine = o.text("machine");
      s.user = o.text("user_name");
      s.delivery_group = o.text("delivery_group");
      s.application = o.text("application");
      s.type = o.text("session_type", "Desktop") == "Application" ? SessionType::application : SessionType::desktop;
      s.client_name = o.text("client_name");
      s.client_address = o.text("client_address");
      s.state = field(o, "state", kSessionState, SessionState::unknown);
      s.brokered = o.flag("brokered", true);
      s.start_time = o.text("start_time");
      s.end_time = o.text("end_time");
      index_session_locked(s, true);
      const auto machine = s.machine;
      state_.sessions[s.name] = std::move(s);
      state_.refresh_machine(machine);
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
      state_.assignments[a.name] = std::move(a);
      state_.refresh_machine(machine);
      break;
    }
    case Kind::application: {
      Application a;
      a.name = o.name;
      a.browser_name = o.text("browser_name", o.name);
      if (a.browser_name.empty()) a.browser_name = o.name;
      a.published_name = o.text("published_name", o.name);
      if (a.published_name.empty()) a.published_name = o.name;
      a.restrict_to_tag = o.text("restrict_to_tag");
      a.command_line_executable = o.text("command_line_executable");
      a.command_line_arguments = o.text("command_line_arguments");
      a.working_directory = o.text("working_directory");
      a.delivery_groups = o.list("delivery_groups");
      a.associated_users = o.list("associated_users");
      a.enabled = o.flag("enabled", true);
      a.visible = o.flag("visible", true);
      a.user_filter_enabled = o.flag("user_filter_enabled");
      a.max_per_user_instances = o.integer("max_per_user_instances");
      a.max_total_instances = o.integer("max_total_instances");
      state_.applications[a.name] = std::move(a);
      application_objects_.push_back(o);
      view_dirty_ = true;
      break;
    }
    case Kind::rule: {
      Rule r;
      r.name = o.name;
      r.delivery_group = o.text("delivery_group");
      r.published_name = o.text("published_name");
      r.restrict_to_tag = o.text("restrict_to_tag");
      r.session_reconnection = field(o, "session_reconnection", kReconnection, Reconnection::always);
      r.type = field(o, "rule_type", kRuleType, RuleType::access);
      r.enabled = o.flag("enabled", true);
      r.max_desktops = o.integer("max_desktops", 1);
      r.max_per_entitlement_instances = o.integer("max_per_entitlement_instances");
      state_.rules_by_group[r.delivery_group].insert(r.name);
      state_.rules[r.name] = std::move(r);
      rule_objects_.push_back(o);
      view_dirty_ = true;
      break;
    }
    default: break;
  }
}

std::optional<Machine> Engine::machine(std::string_view name) const {
  std::lock_guard lock(mutex_);
  if (const auto* m = state_.machine(name)) return *m;
  return std::nullopt;
}

std::optional<Session> Engine::session(std::string_view name) const {
  std::lock_guard lock(mutex_);
  if (const auto* s = state_.session(name)) return *s;
  return std::nullopt;
}

std::vector<Session> Engine::sessions_of_machine(std::string_view machine) const {
  std::lock_guard lock(mutex_);
  std::vector<Session> out;
  if (auto it = state_.sessions_by_machine.find(machine); it != state_.sessions_by_machine.end())
    for (const auto& n : it->second) out.push_back(state_.sessions.find(n)->second);
  return out;
}

std::vector<Session> Engine::sessions_of_user(std::string_view user) const {
  std::lock_guard lock(mutex_);
  std::vector<Session> out;
  if (auto it = state_.sessions_by_user.find(user); it != state_.sessions_by_user.end())
    for (const auto& n : it->second) out.push_back(state_.sessions.find(n)->second);
  return out;
}

std::optional<std::string> Engine::session_name(const std::string& machine, const std::string& key) const {
  std::lock_guard lock(mutex_);
  auto it = state_.sessions_by_key.find(std::pair{machine, key});
  if (it == state_.sessions_by_key.end()) return std::nullopt;
  return it->second;
}

std::vector<Assignment> Engine::assignments_of_user(std::string_view user) const {
  std::lock_guard lock(mutex_);
  std::vector<Assignment> out;
  if (auto it = state_.assignments_by_user.find(user); it != state_.assignments_by_user.end())
    for (const auto& n : it->second) out.push_back(state_.assignments.find(n)->second);
  return out;
}

std::vector<Assignment> Engine::assignments_of_machine(std::string_view machine) const {
  std::lock_guard lock(mutex_);
  std::vector<Assignment> out;
  if (auto it = state_.assignments_by_machine.find(machine); it != state_.assignments_by_machine.end())
    for (const auto& n : it->second) out.push_back(state_.assignments.find(n)->second);
  return out;
}

std::vector<std::string> Engine::machines_of_group(std::string_view group) const {
  std::lock_guard lock(mutex_);
  auto it = state_.machines_by_group.find(group);
  if (it == state_.machines_by_group.end()) return {};
  return {it->second.begin(), it->second.end()};
}

std::vector<std::string> Engine::free_machines(std::string_view group) const {
  std::lock_guard lock(mutex_);
  auto it = state_.free_by_group.find(group);
  if (it == state_.free_by_group.end()) return {};
  return {it->second.begin(), it->second.end()};
}

std::vector<Rule> Engine::rules_of_group(std::string_view group) const {
  std::lock_guard lock(mutex_);
  std::vector<Rule> out;
  if (auto it = state_.rules_by_group.find(group); it != state_.rules_by_group.end())
    for (const auto& n : it->second) out.push_back(state_.rules.find(n)->second);
  return out;
}

std::optional<Catalog> Engine::catalog(std::string_view name) const {
  std::lock_guard lock(mutex_);
  auto it = state_.catalogs.find(name);
  if (it == state_.catalogs.end()) return std::nullopt;
  return it->second;
}

std::optional<DeliveryGroup> Engine::group(std::string_view name) const {
  std::lock_guard lock(mutex_);
  auto it = state_.groups.find(name);
  if (it == state_.groups.end()) return std::nullopt;
  return it->second;
}

std::map<std::string, std::int64_t> Engine::registration_counts() const {
  std::lock_guard lock(mutex_);
  std::map<std::string, std::int64_t> out;
  for (const auto& [name, m] : state_.machines) ++out[std::string(to_string(m.registration))];
  return out;
}

void Engine::overlay_live(Object& machine) const {
  std::lock_guard lock(mutex_);
  const auto* m = state_.machine(machine.name);
  if (!m) return;
  machine.fields["registration_state"] = std::string(to_string(m->registration));
  machine.fields["load_index"] = m->load_index;
  machine.fields["summary_state"] = std::string(to_string(m->summary));
}

EngineStats Engine::stats() const {
  std::lock_guard lock(mutex_);
  EngineStats s = counters_;
  s.catalogs = state_.catalogs.size();
  s.groups = state_.groups.size();
  s.machines = state_.machines.size();
  s.sessions = state_.sessions.size();
  s.live_sessions = static_cast<std::size_t>(
      std::count_if(state_.sessions.begin(), state_.sessions.end(), [](const auto& kv) { return live(kv.second); }));
  s.assignments = state_.assignments.size();
  s.applications = state_.applications.size();
  s.rules = state_.rules.size();
  s.reserved = state_.reserved.size();
  return s;
}

}  // namespace broker
