// power/driver.hpp: what the broker needs from a hypervisor (site-model-reference 2.9, 2.11, 3).
//
// A PowerDriver talks to one hypervisor connection ([[hypervisor_connection]] in the config).
// Its calls BLOCK (libvirt's C API does): callers never run them on I/O threads; the power-action
// queue (power/action_queue.hpp) runs them on its own threads and is asynchronous to its callers.
// Implementations are thread-safe.
#pragma once

#include "common/error.hpp"

#include <string>
#include <string_view>
#include <vector>

namespace power {

// The machine's power state as the broker shows it (machine.power_state).
enum class PowerState { unknown, unavailable, off, on, suspended, turning_on, turning_off, suspending, resuming };
std::string_view to_string(PowerState s);  // "Unknown", "Unavailable", "Off", "On", ...

// Power actions (power_action.action).
enum class Action { turn_on, turn_off, shutdown, reset, restart, suspend, resume };
std::string_view to_string(Action a);  // "TurnOn", "TurnOff", "Shutdown", "Reset", "Restart", "Suspend", "Resume"
bool from_string(std::string_view text, Action& out);

// Why a driver call failed. Transient failures are retried by the queue with back-off.
enum class Failure {
  none,
  connection,       // the hypervisor cannot be reached (transient: the driver reconnects)
  timeout,          // the hypervisor did not answer in time (transient)
  not_found,        // no virtual machine by that name or UUID (machine fault VirtualMachineNotFound)
  invalid_state,    // e.g. Resume of a machine that is not suspended
  refused,          // the hypervisor refused (permissions, unsupported operation)
  internal,
};
std::string_view to_string(Failure f);  // "Connection", "Timeout", "VirtualMachineNotFound", ...
bool transient(Failure f);

struct Outcome {
  Failure failure = Failure::none;
  std::string message;  // the hypervisor's words, for logs and power_action.failure_reason
  bool ok() const { return failure == Failure::none; }
};

// How the driver finds a machine: the machine's hosted_machine_id (a domain name or UUID), else
// its name without the domain part ("DEMO\\pool-1" -> "pool-1").
struct VmRef {
  std::string machine;  // the broker's machine name
  std::string vm_id;    // hosted_machine_id, or derived from the name
};
VmRef vm_ref(std::string_view machine, std::string_view hosted_machine_id);

class PowerDriver {
 public:
  virtual ~PowerDriver() = default;
  // "simulated", "libvirt"
  virtual std::string_view kind() const = 0;
  // The machine's state now. Failure: connection, timeout, not_found.
  virtual Outcome query(const VmRef& vm, PowerState& state) = 0;
  // Starts the action and returns once the hypervisor accepted it (a TurnOn returns before the
  // guest has booted: query() reports on/turning_on; the agent's registration says it is ready).
  virtual Outcome perform(const VmRef& vm, Action action) = 0;
  // Every VM the connection sees, by vm id (for matching and admin listings). May be empty for a
  // driver that cannot list.
  virtual Outcome list(std::vector<std::string>& vm_ids) = 0;
};

}  // namespace power
