// broker/power_manager.hpp: power management of the site (docs/power.md): one driver and one
// power-action queue (power::ActionQueue) per hypervisor connection, actions kept durable in
// storage (power_action objects), machines' power_state and fault_state kept up to date.
//
// Which machines are power-managed: those whose catalog names a hypervisor connection; the
// others show power_state Unmanaged. A machine is matched to its VM by hosted_machine_id, else by
// its name without the domain (power::vm_ref).
//
// Threads: every method may be called from any thread except an I/O thread (they read or write
// storage). The queues run driver calls on their own threads; refresh() queries drivers and
// blocks for as long as they do.
#pragma once

#include "common/clock.hpp"
#include "broker/launcher.hpp"
#include "common/error.hpp"
#include "power/action_queue.hpp"

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace spdlog {
class logger;
}
namespace storage {
class Repository;
}

namespace broker {

class Engine;

struct PowerManagerOptions {
  // Simulated connections: delays of the simulated hypervisor.
  std::chrono::milliseconds simulated_boot_delay{std::chrono::seconds(20)};
  std::chrono::milliseconds simulated_shutdown_delay{std::chrono::seconds(10)};
  // Simulated connections whose `uri` is set write their VMs' power states to the file it names
  // (`file:PATH`, or a plain path; relative to `base_dir`), for reference agents started with
  // --power-state-file (docs/cbp.md "The reference agent").
  std::string base_dir = ".";
  // Real-time tick of the simulated drivers and of the queues' dispatchers.
  std::chrono::milliseconds tick{std::chrono::seconds(1)};
  // How long finished actions stay listed.
  std::chrono::milliseconds retention{std::chrono::hours(1)};
  // A machine powered on whose agent has not registered this long after gets fault_state
  // Unregistered (checked by refresh()). Unset: the site's registration_wait_timeout_seconds,
  // the timeout launches use too.
  std::optional<std::chrono::seconds> registration_timeout;
};

// One power action as admins see it (power_action in the site model).
using PowerAction = power::ActionRecord;

class PowerManager final : public PowerControl {
 public:
  PowerManager(storage::Repository& repository, common::Clock& clock, std::shared_ptr<spdlog::logger> logger,
               PowerManagerOptions options = {});
  ~PowerManager();  // stop()
  PowerManager(const PowerManager&) = delete;
  PowerManager& operator=(const PowerManager&) = delete;

  // Builds the drivers and queues of the site's hypervisor connections, takes back the stored
  // actions (pending ones run again) and refreshes every managed machine's power state. A
  // connection whose driver cannot be built (a bad libvirt URI) is logged and left out; its
  // machines show power_state Unavailable.
  common::Status start();
  // Stops the queues (pending actions stay stored as Pending) and the drivers.
  void stop();

  // Queues `action` for each machine (admin: priority 30, reason Admin). Machines that are not
  // power-managed or unknown fail the whole call (invalid_argument / not_found) before anything
  // is queued. Returns the actions (existing equivalent ones for duplicates).
  common::Result<std::vector<PowerAction>> submit(const std::vector<std::string>& machines, power::Action action,
                                                   int priority = power::kAdminPriority,
                                                   const std::string& reason = "Admin");
  common::Status cancel(std::int64_t id);
  common::Status set_priority(std::int64_t id, int priority);
  std::optional<PowerAction> get(std::int64_t id) const;
  // Every action of every connection (pending, active and those finished within the retention).
  std::vector<PowerAction> actions() const;
  // Per connection: counts by state, queue depth.
  std::map<std::string, power::QueueStats> stats() const;

  // Whether the machine is power-managed (its catalog names a connection that runs).
  bool manages(const std::string& machine) const;
  // Queries every managed machine's power state and stores it (machine.power_state); a machine on
  // for longer than registration_timeout since the broker saw it power on, still unregistered,
  // gets fault_state Unregistered. Blocks on the drivers.
  common::Status refresh();

  // The pool policy (docs/power.md "Power time schemes and pool policy"), once: for each
  // single-session delivery group with power-managed machines, evaluates its power time schemes
  // in its time zone and queues the actions power::plan_pool asks for (priority 40 for the pool,
  // 50 for shutdowns after use). Returns how many actions were queued. brokerd runs it every
  // minute. A group whose time zone or schemes cannot be read is logged and skipped. The groups
  // and machines come from the engine (set_engine(); errc::unavailable without one), the
  // schedules from storage.
  common::Result<int> reconcile_pools();

  // PowerControl: TurnOn with launch priority (reason Launch).
  common::Result<bool> power_on(const std::string& machine) override;

  // The engine whose state the pool policy, refresh() and manages() read (registration is not
  // stored). Set before start(); without one refresh() reads the machine table and counts every
  // machine unregistered, and reconcile_pools() fails (tests that need neither).
  void set_engine(const Engine* engine);

  // Machines the pool policy counts as in use although they have no session yet: machines held
  // for a launch (Launcher::held_machines). Set before the first reconcile_pools().
  void set_held_machines(std::function<std::set<std::string>()> held);

  // Called (on a queue thread) whenever an action changes state.
  void on_action(std::function<void(const PowerAction&)> observer);

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace broker
