// tools/vda-agent/power_follower.hpp: simulated machines that follow a simulated hypervisor.
//
// brokerd's simulated power driver writes the power state of its virtual machines to a JSON file
// ({"machines": {"pool-1": "On", "pool-2": "Off", ...}}, keyed by VM id: the machine name
// without its domain, or the machine's hosted_machine_id). A PowerFollower polls that file and
// makes each machine of a Fleet behave like the VDA of such a VM: it runs while its VM is On (the
// VDA service starts after boot and registers), says goodbye (AgentShutdown) when the VM goes Off
// or is shutting down, and AgentSuspended when it is suspended. Machines the file does not name
// are left alone. docs/cbp.md "The reference agent".
#pragma once

#include "tools/vda-agent/agent.hpp"

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>

namespace vda {

class PowerFollower {
 public:
  // Does not start anything yet.
  PowerFollower(Fleet& fleet, std::string path, Millis interval = Millis{250});
  ~PowerFollower();  // stops the poller (machines keep their state)
  PowerFollower(const PowerFollower&) = delete;
  PowerFollower& operator=(const PowerFollower&) = delete;

  // Reads the file once and applies it (machines the file names and are not On stay down; those
  // it does not name are started), then polls it every `interval` in a thread of its own.
  void start();
  // Reads the file and applies it now. A missing or unreadable file changes nothing (false).
  bool apply();
  // The last state read for a VM id ("" if none).
  std::string state_of(const std::string& vm_id) const;

 private:
  void run();

  Fleet& fleet_;
  const std::string path_;
  const Millis interval_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false;                         // guarded by mutex_
  std::map<std::string, std::string> states_;   // guarded by mutex_: vm id -> state
  std::map<std::string, std::string> applied_;  // guarded by mutex_: machine -> state acted on
  std::thread thread_;
};

// "DEMO\\pool-1" -> "pool-1"
std::string vm_id_of(const std::string& machine);

}  // namespace vda
