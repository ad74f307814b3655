// broker/power_manager.cpp: see power_manager.hpp.
#include "broker/power_manager.hpp"

#include "broker/engine.hpp"

#include "common/log.hpp"
#include "common/model.hpp"
#include "power/libvirt_driver.hpp"
#include "power/schedule.hpp"
#include "power/simulated_driver.hpp"
#include "storage/repository.hpp"

#include <boost/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

namespace broker {

using common::errc;
using common::make_error;
using common::Result;
using common::Status;
using common::model::Kind;
using common::model::Object;

namespace {

// What the engine holds of a machine that the pool policy and the registration check need.
struct LiveFacts {
  bool registered = false;
  int sessions = 0;  // sessions not logged off (pending ones too), or the agent's count if higher
};

std::string time_text(common::SysTime t) { return t == common::SysTime{} ? std::string() : common::format_time(t); }

common::SysTime time_of(const std::string& text) {
  common::SysTime t{};
  if (!text.empty()) common::parse_time(text, t);
  return t;
}

// The power_action object of a record (named by the action id).
Object to_object(const PowerAction& r) {
  Object o = common::model::make_default(Kind::power_action, std::to_string(r.id));
  o.fields["machine"] = r.vm.machine;
  o.fields["hypervisor_connection"] = r.hypervisor_connection;
  o.fields["action"] = std::string(power::to_string(r.action));
  o.fields["state"] = std::string(power::to_string(r.state));
  o.fields["base_priority"] = static_cast<std::int64_t>(r.base_priority);
  o.fields["actual_priority"] = static_cast<std::int64_t>(r.actual_priority);
  o.fields["reason"] = r.reason;
  auto put_time = [&](const char* field, common::SysTime t) {
    if (t == common::SysTime{}) o.fields.erase(field);
    else o.fields[field] = time_text(t);
  };
  put_time("request_time", r.request_time);
  put_time("start_time", r.start_time);
  put_time("completion_time", r.completion_time);
  o.fields["failure_reason"] = r.failure_reason;
  return o;
}

}  // namespace

struct PowerManager::Impl : power::ActionStore, std::enable_shared_from_this<PowerManager::Impl> {
  storage::Repository& repo;
  common::Clock& clock;
  std::shared_ptr<spdlog::logger> log;
  PowerManagerOptions opts;
  std::atomic<std::int64_t> next_id{1};

  struct Connection {
    std::string name;
    std::unique_ptr<power::PowerDriver> driver;
    power::SimulatedDriver* simulated = nullptr;  // driver, when simulated
    std::unique_ptr<power::ActionQueue> queue;
    power::Limits limits;           // the queue's throttles
    std::size_t machine_count = 0;  // for max_percentage_active_actions
    std::string state_file;                              // simulated with a uri: where states go
    std::map<std::string, std::string> vm_states;        // vm id -> state, for the file
    std::map<std::string, std::string> machine_of_vm;    // vm id -> machine
  };
  mutable std::mutex mutex;  // guards connections (the map; each Connection's own maps: file_mutex)
  std::map<std::string, std::unique_ptr<Connection>> connections;
  std::mutex file_mutex;
  std::mutex observers_mutex;
  std::vector<std::function<void(const PowerAction&)>> observers;
  power::TimeZoneDb zones;
  const common::SysTime started_at = clock.now();
  std::mutex power_on_mutex;
  std::map<std::string, common::SysTime> powered_on_at;  // guarded by power_on_mutex: machine -> last seen On
  std::map<std::string, bool> was_peak;  // guarded by power_on_mutex: delivery group -> peak at the last pass
  std::function<std::set<std::string>()> held_machines;  // set before the first reconcile_pools()

  std::atomic<const Engine*> engine{nullptr};  // the live registrations and sessions (set_engine)

  Impl(storage::Repository& r, common::Clock& c, std::shared_ptr<spdlog::logger> l, PowerManagerOptions o)
      : repo(r), clock(c), log(std::move(l)), opts(std::move(o)) {}

  // Machine -> its live facts, from the engine; empty without one (every machine unregistered,
  // no sessions).
  std::map<std::string, LiveFacts, std::less<>> live_facts() const {
    std::map<std::string, LiveFacts, std::less<>> out;
    const Engine* e = engine.load();
    if (!e) return out;
    e->with_state([&](const SiteState& site) {
      for (const auto& [name, m] : site.machines) {
        const auto live = static_cast<std::int64_t>(site.live_sessions_on(name));
        out.emplace(name, LiveFacts{m.registration == RegistrationState::registered,
                                    static_cast<int>(std::clamp<std::int64_t>(std::max(live, m.reported_sessions), 0,
                                                                              1000000))});
      }
    });
    return out;
  }

  // ActionStore (queue dispatcher threads).
  void saved(const PowerAction& r) override {
    auto st = repo.write([&](storage::Transaction& tx) -> Status {
      const Object o = to_object(r);
      auto existing = tx.get(Kind::power_action, o.name);
      if (existing) {
        Object updated = *existing;
        for (const auto& [k, v] : o.fields) updated.fields[k] = v;
        for (const char* t : {"request_time", "start_time", "completion_time"})
          if (!o.fields.contains(t)) updated.fields.erase(t);
        auto u = tx.update(o.name, updated);
        if (!u) return u.error();
        return {};
      }
      if (existing.error().code != errc::not_found) return existing.error();
      auto c = tx.create(o);
      if (!c) return c.error();
      return {};
    });
    if (!st) log->error("power: action {} not stored: {}", r.id, st.error().describe());
  }
  void forgotten(const PowerAction& r) override {
    auto st = repo.write([&](storage::Transaction& tx) -> Status {
      auto rm = tx.remove(Kind::power_action, std::to_string(r.id));
      if (!rm && rm.error().code != errc::not_found) return rm;
      return {};
    });
    if (!st) log->error("power: action {} not removed: {}", r.id, st.error().describe());
  }

  // Updates fields of a machine (absent machines are ignored).
  void update_machine(const std::string& machine, const std::map<std::string, std::string>& fields) {
    auto st = repo.write([&](storage::Transaction& tx) -> Status {
      auto m = tx.get(Kind::machine, machine);
      if (!m) return m.error().code == errc::not_found ? Status{} : Status{m.error()};
      Object updated = *m;
      bool changed = false;
      for (const auto& [k, v] : fields)
        if (updated.text(k) != v) {
          updated.fields[k] = v;
          changed = true;
        }
      // (An unregistered machine that is off shows summary state Off: the engine derives it from
      // the stored power state, broker::derive_summary.)
      if (!changed) return {};
      if (fields.contains("power_state") && updated.text("power_state") == "On" && m->text("power_state") != "On") {
        std::lock_guard lock(power_on_mutex);
        powered_on_at[machine] = clock.now();
      }
      auto u = tx.update(machine, updated);
      if (!u) return u.error();
      return {};
    });
    if (!st) log->warn("power: machine {} not updated: {}", machine, st.error().describe());
  }

  // A queue's action changed state.
  void action_changed(const PowerAction& r, std::optional<power::ActionState> before) {
    using S = power::ActionState;
    if (before != r.state) {
      log->info("power: {} {} on {} ({}): {}{}{}", power::to_string(r.action), r.id, r.vm.machine,
                r.hypervisor_connection, power::to_string(r.state), r.failure_reason.empty() ? "" : ": ",
                r.failure_reason);
      if (r.state == S::completed) {
        std::map<std::string, std::string> f{{"power_state", std::string(power::to_string(power::target_state(r.action)))}};
        if (r.action == power::Action::turn_on) f["fault_state"] = "None";
        update_machine(r.vm.machine, f);
      } else if (r.state == S::failed && r.failure == power::Failure::not_found) {
        update_machine(r.vm.machine, {{"fault_state", "VirtualMachineNotFound"}});
      } else if ((r.state == S::failed || r.state == S::lost) && r.action == power::Action::turn_on) {
        // The hypervisor accepted the TurnOn but never reported the machine on: StuckOnBoot.
        const bool stuck = r.state == S::failed && r.failure == power::Failure::timeout &&
                           r.failure_reason.rfind("timed out", 0) == 0;  // the queue's completion timeout
        update_machine(r.vm.machine, {{"fault_state", stuck ? "StuckOnBoot" : "FailedToStart"}});
      }
    }
    std::vector<std::function<void(const PowerAction&)>> copy;
    {
      std::lock_guard lock(observers_mutex);
      copy = observers;
    }
    for (auto& o : copy) o(r);
  }

  // A simulated VM changed state: store it and rewrite the state file.
  void vm_changed(Connection& c, const std::string& vm_id, power::PowerState state) {
    std::string machine, file;
    std::map<std::string, std::string> states;
    {
      std::lock_guard lock(file_mutex);
      c.vm_states[vm_id] = std::string(power::to_string(state));
      auto it = c.machine_of_vm.find(vm_id);
      if (it != c.machine_of_vm.end()) machine = it->second;
      file = c.state_file;
      states = c.vm_states;
    }
    if (!file.empty()) write_state_file(file, states);
    if (!machine.empty()) update_machine(machine, {{"power_state", std::string(power::to_string(state))}});
  }

  void write_state_file(const std::string& path, const std::map<std::string, std::string>& states) {
    boost::json::object machines;
    for (const auto& [k, v] : states) machines[k] = v;
    const auto text = boost::json::serialize(boost::json::object{{"machines", machines}});
    const std::string tmp = path + ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << text << "\n";
      if (!out) {
        log->warn("power: cannot write {}", tmp);
        return;
      }
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) log->warn("power: cannot write {}: {}", path, ec.message());
  }

  struct ManagedMachine {
    std::string name, connection;
    power::VmRef vm;
    std::string power_state;
    bool registered = false;
    std::string fault_state;
  };

  // Every machine with the connection that powers it ("" when none): from the engine when there
  // is one (no table read: at 19,000 machines a read of every row every 30 s costs ~40 MB of
  // short-lived objects), else from storage.
  Result<std::vector<ManagedMachine>> machines() const {
    std::vector<ManagedMachine> out;
    if (const Engine* e = engine.load()) {
      e->with_state([&](const SiteState& site) {
        out.reserve(site.machines.size());
        for (const auto& [name, m] : site.machines) out.push_back(managed(site, m));
      });
      return out;
    }
    const auto live = live_facts();
    auto st = repo.read([&](storage::Transaction& tx) -> Status {
      storage::Query all;
      auto cats = tx.list(Kind::catalog, all);
      if (!cats) return cats.error();
      std::map<std::string, std::string> conn_of;
      for (const auto& c : *cats) conn_of[c.name] = c.text("hypervisor_connection");
      auto ms = tx.list(Kind::machine, all);
      if (!ms) return ms.error();
      for (const auto& m : *ms) {
        const auto it = live.find(m.name);
        out.push_back({m.name, conn_of[m.text("catalog")], power::vm_ref(m.name, m.text("hosted_machine_id")),
                       m.text("power_state"), it != live.end() && it->second.registered,
                       m.text("fault_state", "None")});
      }
      return {};
    });
    if (!st) return st.error();
    return out;
  }

  static ManagedMachine managed(const SiteState& site, const Machine& m) {
    const auto c = site.catalogs.find(m.catalog);
    return {m.name, c == site.catalogs.end() ? std::string() : c->second.hypervisor_connection,
            power::vm_ref(m.name, m.hosted_machine_id), std::string(to_string(m.power)),
            m.registration == RegistrationState::registered, m.fault_state};
  }

  Connection* find(const std::string& name) const {
    std::lock_guard lock(mutex);
    auto it = connections.find(name);
    return it == connections.end() ? nullptr : it->second.get();
  }
};

PowerManager::PowerManager(storage::Repository& repository, common::Clock& clock,
                           std::shared_ptr<spdlog::logger> logger, PowerManagerOptions options)
    : impl_(std::make_shared<Impl>(repository, clock, logger ? std::move(logger) : common::null_logger(),
                                   std::move(options))) {}

PowerManager::~PowerManager() { stop(); }

Status PowerManager::start() {
  auto& im = *impl_;
  std::vector<Object> conns;
  std::vector<PowerAction> stored;
  auto st = im.repo.read([&](storage::Transaction& tx) -> Status {
    storage::Query all;
    auto c = tx.list(Kind::hypervisor_connection, all);
    if (!c) return c.error();
    conns = std::move(*c);
    auto actions = tx.list(Kind::power_action, all);
    if (!actions) return actions.error();
    auto ms = tx.list(Kind::machine, all);
    if (!ms) return ms.error();
    std::map<std::string, std::string> hosted;
    for (const auto& m : *ms) hosted[m.name] = m.text("hosted_machine_id");
    for (const auto& a : *actions) {
      PowerAction r;
      r.id = std::atoll(a.name.c_str());
      if (r.id <= 0) continue;
      r.vm = power::vm_ref(a.text("machine"), hosted[a.text("machine")]);
      r.hypervisor_connection = a.text("hypervisor_connection");
      if (!power::from_string(a.text("action"), r.action) || !power::from_string(a.text("state"), r.state)) continue;
      r.base_priority = static_cast<int>(a.integer("base_priority", power::kAdminPriority));
      r.actual_priority = static_cast<int>(a.integer("actual_priority", r.base_priority));
      r.reason = a.text("reason");
      r.request_time = time_of(a.text("request_time"));
      r.start_time = time_of(a.text("start_time"));
      r.completion_time = time_of(a.text("completion_time"));
      r.failure_reason = a.text("failure_reason");
      stored.push_back(std::move(r));
    }
    return {};
  });
  if (!st) return st;
  for (const auto& r : stored) im.next_id = std::max(im.next_id.load(), r.id + 1);
  auto machines = im.machines();
  if (!machines) return machines.error();

  std::weak_ptr<Impl> weak = impl_;
  for (const auto& c : conns) {
    auto conn = std::make_unique<Impl::Connection>();
    conn->name = c.name;
    const auto driver = c.text("driver");
    const auto uri = c.text("uri");
    if (driver == "simulated") {
      power::SimulatedDriver::Options so;
      const auto secs = [](std::int64_t n) { return std::chrono::milliseconds(n * 1000); };
      so.boot_delay = c.fields.contains("simulated_boot_delay_seconds")
                          ? secs(c.integer("simulated_boot_delay_seconds"))
                          : im.opts.simulated_boot_delay;
      so.shutdown_delay = c.fields.contains("simulated_shutdown_delay_seconds")
                              ? secs(c.integer("simulated_shutdown_delay_seconds"))
                              : im.opts.simulated_shutdown_delay;
      so.tick_interval = im.opts.tick;
      so.failure_rate = static_cast<double>(c.integer("simulated_failure_percent", 0)) / 100.0;
      auto sim = std::make_unique<power::SimulatedDriver>(im.clock, so);
      conn->simulated = sim.get();
      if (!uri.empty()) {
        std::filesystem::path p(uri.rfind("file:", 0) == 0 ? uri.substr(5) : uri);
        if (p.is_relative()) p = std::filesystem::path(im.opts.base_dir) / p;
        conn->state_file = p.lexically_normal().string();
      }
      // Every machine of the connection is a VM, in the state last stored (On when unknown).
      for (const auto& m : *machines) {
        if (m.connection != c.name) continue;
        const auto initial = m.power_state == "Off"         ? power::PowerState::off
                             : m.power_state == "Suspended" ? power::PowerState::suspended
                                                            : power::PowerState::on;
        conn->machine_of_vm[m.vm.vm_id] = m.name;
        conn->vm_states[m.vm.vm_id] = std::string(power::to_string(initial));
        sim->add(m.vm.vm_id, initial);
      }
      auto* raw = conn.get();
      sim->on_change([weak, raw](const std::string& vm_id, power::PowerState s) {
        if (auto self = weak.lock()) self->vm_changed(*raw, vm_id, s);
      });
      if (!conn->state_file.empty()) im.write_state_file(conn->state_file, conn->vm_states);
      conn->driver = std::move(sim);
    } else {
      power::LibvirtOptions lo;
      lo.uri = uri;
      lo.clock = &im.clock;
      lo.logger = im.log;
      lo.username = c.text("username");
      if (const auto file = c.text("password_file"); !file.empty()) {
        std::filesystem::path p(file);
        if (p.is_relative()) p = std::filesystem::path(im.opts.base_dir) / p;
        std::ifstream in(p);
        if (!in || !std::getline(in, lo.password)) {
          im.log->error("power: hypervisor connection '{}' left out: cannot read its password_file {}", c.name,
                        p.string());
          continue;
        }
        if (!lo.password.empty() && lo.password.back() == '\r') lo.password.pop_back();
      }
      try {
        conn->driver = std::make_unique<power::LibvirtDriver>(lo);
      } catch (const std::exception& e) {
        im.log->error("power: connection '{}' ({}) left out: {}", c.name, uri, e.what());
        continue;
      }
    }
    power::ActionQueue::Options qo;
    qo.connection = c.name;
    qo.limits.max_absolute_active_actions = static_cast<int>(c.integer("max_absolute_active_actions", 100));
    qo.limits.max_percentage_active_actions = static_cast<int>(c.integer("max_percentage_active_actions", 20));
    qo.limits.max_new_actions_per_minute = static_cast<int>(c.integer("max_new_actions_per_minute", 10));
    qo.enabled = c.flag("enabled", true);
    qo.retention = c.fields.contains("completed_action_retention_minutes")
                       ? std::chrono::milliseconds(c.integer("completed_action_retention_minutes", 60) * 60000)
                       : im.opts.retention;
    qo.poll_interval = im.opts.tick;
    qo.check_interval = 2 * im.opts.tick;  // a started action's machine is queried this often
    qo.next_id = [weak] {
      auto self = weak.lock();
      return self ? self->next_id++ : 0;
    };
    conn->queue = std::make_unique<power::ActionQueue>(*conn->driver, im.clock, qo, &im);
    std::size_t count = 0;
    for (const auto& m : *machines) count += m.connection == c.name;
    conn->queue->set_machine_count(count);
    conn->limits = qo.limits;
    conn->machine_count = count;
    conn->queue->on_change([weak](const PowerAction& r, std::optional<power::ActionState> before) {
      if (auto self = weak.lock()) self->action_changed(r, before);
    });
    std::vector<PowerAction> mine;
    for (const auto& r : stored)
      if (r.hypervisor_connection == c.name) mine.push_back(r);
    const auto restored = conn->queue->restore(std::move(mine));
    im.log->info("power: connection '{}' ({}{}{}): {} machines, {} stored actions taken back", c.name, driver,
                 uri.empty() ? "" : " ", uri, count, restored);
    std::lock_guard lock(im.mutex);
    im.connections[c.name] = std::move(conn);
  }
  return refresh();
}

void PowerManager::stop() {
  std::map<std::string, std::unique_ptr<Impl::Connection>> conns;
  {
    std::lock_guard lock(impl_->mutex);
    conns.swap(impl_->connections);
  }
  for (auto& [name, c] : conns)
    if (c->queue) c->queue->stop();
  conns.clear();  // each Connection destroys its queue before its driver (member order)
}

Result<std::vector<PowerAction>> PowerManager::submit(const std::vector<std::string>& names, power::Action action,
                                                      int priority, const std::string& reason) {
  if (names.empty()) return make_error(errc::invalid_argument, "name at least one machine", "machines");
  auto machines = impl_->machines();
  if (!machines) return machines.error();
  std::vector<std::pair<Impl::Connection*, power::VmRef>> targets;
  for (const auto& n : names) {
    auto it = std::find_if(machines->begin(), machines->end(), [&](const auto& m) { return m.name == n; });
    if (it == machines->end()) return make_error(errc::not_found, "no machine named '" + n + "'", "machines");
    if (it->connection.empty())
      return make_error(errc::invalid_argument, "machine '" + n + "' is not power-managed (its catalog has no hypervisor_connection)", "machines");
    auto* c = impl_->find(it->connection);
    if (!c)
      return make_error(errc::invalid_argument, "the hypervisor connection '" + it->connection + "' of machine '" + n + "' is not running", "machines");
    targets.emplace_back(c, it->vm);
  }
  std::vector<PowerAction> out;
  for (const auto& [c, vm] : targets) {
    power::ActionRequest req;
    req.vm = vm;
    req.action = action;
    req.base_priority = priority;
    req.reason = reason;
    auto s = c->queue->submit(req);
    if (!s) return s.error();
    if (auto r = c->queue->get(s->id)) out.push_back(*r);
  }
  return out;
}

Status PowerManager::cancel(std::int64_t id) {
  std::lock_guard lock(impl_->mutex);
  for (auto& [n, c] : impl_->connections)
    if (c->queue->get(id)) return c->queue->cancel(id);
  return make_error(errc::not_found, "no power action " + std::to_string(id));
}

Status PowerManager::set_priority(std::int64_t id, int priority) {
  std::lock_guard lock(impl_->mutex);
  for (auto& [n, c] : impl_->connections)
    if (c->queue->get(id)) return c->queue->set_priority(id, priority);
  return make_error(errc::not_found, "no power action " + std::to_string(id));
}

std::optional<PowerAction> PowerManager::get(std::int64_t id) const {
  std::lock_guard lock(impl_->mutex);
  for (const auto& [n, c] : impl_->connections)
    if (auto r = c->queue->get(id)) return r;
  return std::nullopt;
}

std::vector<PowerAction> PowerManager::actions() const {
  std::vector<PowerAction> out;
  std::lock_guard lock(impl_->mutex);
  for (const auto& [n, c] : impl_->connections) {
    auto s = c->queue->snapshot();
    out.insert(out.end(), s.begin(), s.end());
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
  return out;
}

std::map<std::string, power::QueueStats> PowerManager::stats() const {
  std::map<std::string, power::QueueStats> out;
  std::lock_guard lock(impl_->mutex);
  for (const auto& [n, c] : impl_->connections) out[n] = c->queue->stats();
  return out;
}

bool PowerManager::manages(const std::string& machine) const {
  if (const Engine* e = impl_->engine.load()) {
    const auto connection = e->with_state([&](const SiteState& site) -> std::optional<std::string> {
      const Machine* m = site.machine(machine);
      if (!m) return std::nullopt;
      return Impl::managed(site, *m).connection;
    });
    return connection && !connection->empty() && impl_->find(*connection) != nullptr;
  }
  auto machines = impl_->machines();
  if (!machines) return false;
  for (const auto& m : *machines)
    if (m.name == machine) return !m.connection.empty() && impl_->find(m.connection) != nullptr;
  return false;
}

Status PowerManager::refresh() {
  auto machines = impl_->machines();
  if (!machines) return machines.error();
  auto registration_timeout = impl_->opts.registration_timeout;
  if (!registration_timeout) {
    auto st = impl_->repo.read([&](storage::Transaction& tx) -> Status {
      auto site = tx.get(Kind::site, "site");
      registration_timeout = std::chrono::seconds(site ? site->integer("registration_wait_timeout_seconds", 180) : 180);
      return {};
    });
    if (!st) return st;
  }
  for (const auto& m : *machines) {
    std::string state;
    if (m.connection.empty()) {
      state = "Unmanaged";
    } else if (auto* c = impl_->find(m.connection); !c) {
      state = "Unavailable";
    } else {
      power::PowerState s = power::PowerState::unknown;
      const auto o = c->driver->query(m.vm, s);
      if (o.ok()) state = std::string(power::to_string(s));
      else if (o.failure == power::Failure::not_found) {
        impl_->update_machine(m.name, {{"power_state", "Unknown"}, {"fault_state", "VirtualMachineNotFound"}});
        continue;
      } else state = "Unavailable";
    }
    if (state != m.power_state) impl_->update_machine(m.name, {{"power_state", state}});
    if (state == "On" && !m.registered) {
      std::optional<common::SysTime> on_since;
      {
        std::lock_guard lock(impl_->power_on_mutex);
        if (auto it = impl_->powered_on_at.find(m.name); it != impl_->powered_on_at.end()) on_since = it->second;
      }
      if (on_since && impl_->clock.now() - *on_since > *registration_timeout && m.fault_state == "None")
        impl_->update_machine(m.name, {{"fault_state", "Unregistered"}});
    }
  }
  return {};
}

namespace {

// A machine of a delivery group as the pool policy sees it, before the manager's own facts
// (holds, actions in progress, connections) are added; with the end times of its logged-off
// sessions.
struct PoolCandidate {
  std::string connection;  // its catalog's hypervisor connection ("" when none)
  power::PoolMachine pm;   // name, power, registered, sessions, in_maintenance, assigned
  std::vector<common::SysTime> logoffs;
};
using PoolCandidates = std::map<std::string, std::vector<PoolCandidate>, std::less<>>;  // by group

// From the engine: no table read (at 19,000 machines the pool policy used to read every machine,
// session and assignment row each minute).
PoolCandidates candidates_from(const Engine& engine) {
  PoolCandidates out;
  engine.with_state([&](const SiteState& site) {
    for (const auto& [group, names] : site.machines_by_group) {
      auto& list = out[group];
      for (const auto& name : names) {
        const Machine* m = site.machine(name);
        if (!m) continue;
        PoolCandidate c;
        if (auto cat = site.catalogs.find(m->catalog); cat != site.catalogs.end())
          c.connection = cat->second.hypervisor_connection;
        if (c.connection.empty()) continue;  // not power-managed
        c.pm.name = name;
        c.pm.power = power::power_state_from(to_string(m->power));
        c.pm.registered = m->registration == RegistrationState::registered;
        c.pm.sessions = static_cast<int>(std::clamp<std::int64_t>(
            std::max<std::int64_t>(static_cast<std::int64_t>(site.live_sessions_on(name)), m->reported_sessions), 0,
            1000000));
        c.pm.in_maintenance = m->in_maintenance_mode;
        c.pm.assigned = site.assignments_by_machine.contains(name);
        for (auto it = site.sessions_by_key.lower_bound(std::pair<std::string, std::string>{name, ""});
             it != site.sessions_by_key.end() && it->first.first == name; ++it)
          if (const Session* s = site.session(it->second); s && s->state == SessionState::logged_off)
            c.logoffs.push_back(time_of(s->end_time));
        list.push_back(std::move(c));
      }
    }
  });
  return out;
}

}  // namespace

Result<int> PowerManager::reconcile_pools() {
  auto& im = *impl_;
  std::vector<Object> groups, schemes;
  PoolCandidates candidates;
  const Engine* e = im.engine.load();
  if (!e) return make_error(errc::unavailable, "the pool policy needs the engine (set_engine)");
  const auto view = e->view();
  groups = view->config.groups;
  auto st = im.repo.read([&](storage::Transaction& tx) -> Status {
    auto r = tx.list(Kind::power_time_scheme, {});
    if (!r) return r.error();
    schemes = std::move(*r);
    return {};
  });
  if (!st) return st.error();
  candidates = candidates_from(*e);
  const auto held = im.held_machines ? im.held_machines() : std::set<std::string>{};
  // Pending or started actions by machine.
  std::map<std::string, power::Action> busy;
  for (const auto& a : actions())
    if (a.state == power::ActionState::pending || a.state == power::ActionState::started) busy[a.vm.machine] = a.action;
  const auto now = im.clock.now();
  int queued = 0;
  for (const auto& g : groups) {
    const auto policy = power::group_policy(g);
    auto group_schemes = power::schemes_for_group(schemes, g.name);
    if (!group_schemes) {
      im.log->warn("power: delivery group '{}': {}", g.name, group_schemes.error().describe());
      continue;
    }
    std::vector<power::PoolMachine> pool;
    auto members = candidates.find(g.name);
    if (members == candidates.end()) continue;
    for (auto& c : members->second) {
      if (!im.find(c.connection)) continue;  // its connection is not running
      auto pm = std::move(c.pm);
      if (held.contains(pm.name)) pm.sessions = std::max(pm.sessions, 1);  // a launch waits for it
      if (auto b = busy.find(pm.name); b != busy.end()) pm.pending = b->second;
      if (pm.sessions == 0) {
        // Its last session ended after it was last powered on (or after the broker started, when
        // that is not known): it has been used since.
        common::SysTime since;
        {
          std::lock_guard lock(im.power_on_mutex);
          auto it = im.powered_on_at.find(pm.name);
          since = it == im.powered_on_at.end() ? im.started_at : it->second;
        }
        for (const auto end : c.logoffs)
          if (end >= since && (!pm.last_session_end || end > *pm.last_session_end)) pm.last_session_end = end;
      }
      pool.push_back(std::move(pm));
    }
    if (pool.empty()) continue;
    auto zone = im.zones.find(g.text("time_zone", "UTC"));
    if (!zone) {
      im.log->warn("power: delivery group '{}': {}", g.name, zone.error().describe());
      continue;
    }
    const auto schedule = power::evaluate(*group_schemes, **zone, now);
    std::optional<bool> was_peak;
    {
      std::lock_guard lock(im.power_on_mutex);
      if (auto it = im.was_peak.find(g.name); it != im.was_peak.end()) was_peak = it->second;
      im.was_peak[g.name] = schedule.peak;
    }
    const auto plan = power::plan_pool(policy, schedule, pool, now, was_peak);
    for (const auto& a : plan.actions) {
      const int priority = a.reason == power::kReasonPolicy ? power::kPolicyPriority : power::kSchedulePriority;
      auto r = submit({a.machine}, a.action, priority, std::string(a.reason));
      if (!r) {
        im.log->warn("power: delivery group '{}': {} of {} not queued: {}", g.name, power::to_string(a.action), a.machine,
                     r.error().describe());
        continue;
      }
      im.log->info("power: delivery group '{}': {} {} ({})", g.name, power::to_string(a.action), a.machine, a.detail);
      ++queued;
    }
  }
  return queued;
}

Result<bool> PowerManager::power_on(const std::string& machine) {
  auto r = submit({machine}, power::Action::turn_on, power::kLaunchPriority, "Launch");
  if (!r) return r.error();
  const auto& action = r->front();
  if (action.state != power::ActionState::pending) return false;
  // Pending: held back if the connection's throttles are used up now (it starts when they allow).
  auto* c = impl_->find(action.hypervisor_connection);
  if (!c) return false;
  const auto s = c->queue->stats();
  // The queue's dispatcher may have started it meanwhile (then it counts in `s` itself, and it is
  // not held back): ask after the statistics, so that a start after them cannot be mistaken.
  if (auto now = get(action.id); now && now->state != power::ActionState::pending) return false;
  const auto& l = c->limits;
  const auto by_percent = std::max<std::size_t>(1, c->machine_count * static_cast<std::size_t>(l.max_percentage_active_actions) / 100);
  return s.active >= static_cast<std::size_t>(l.max_absolute_active_actions) ||
         (c->machine_count > 0 && s.active >= by_percent) ||
         s.started_last_minute >= static_cast<std::size_t>(l.max_new_actions_per_minute);
}

void PowerManager::set_engine(const Engine* engine) { impl_->engine = engine; }

void PowerManager::set_held_machines(std::function<std::set<std::string>()> held) {
  impl_->held_machines = std::move(held);
}

void PowerManager::on_action(std::function<void(const PowerAction&)> observer) {
  std::lock_guard lock(impl_->observers_mutex);
  impl_->observers.push_back(std::move(observer));
}

}  // namespace broker
