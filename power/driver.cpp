// power/driver.cpp: see driver.hpp.
#include "power/driver.hpp"

#include <array>
#include <utility>

namespace power {

namespace {

constexpr std::array<std::pair<PowerState, std::string_view>, 9> kStates{{
    {PowerState::unknown, "Unknown"},
    {PowerState::unavailable, "Unavailable"},
    {PowerState::off, "Off"},
    {PowerState::on, "On"},
    {PowerState::suspended, "Suspended"},
    {PowerState::turning_on, "TurningOn"},
    {PowerState::turning_off, "TurningOff"},
    {PowerState::suspending, "Suspending"},
    {PowerState::resuming, "Resuming"},
}};

constexpr std::array<std::pair<Action, std::string_view>, 7> kActions{{
    {Action::turn_on, "TurnOn"},
    {Action::turn_off, "TurnOff"},
    {Action::shutdown, "Shutdown"},
    {Action::reset, "Reset"},
    {Action::restart, "Restart"},
    {Action::suspend, "Suspend"},
    {Action::resume, "Resume"},
}};

}  // namespace

std::string_view to_string(PowerState s) {
  for (const auto& [v, name] : kStates)
    if (v == s) return name;
  return "Unknown";
}

std::string_view to_string(Action a) {
  for (const auto& [v, name] : kActions)
    if (v == a) return name;
  return "TurnOn";
}

bool from_string(std::string_view text, Action& out) {
  for (const auto& [v, name] : kActions)
    if (name == text) {
      out = v;
      return true;
    }
  return false;
}

std::string_view to_string(Failure f) {
  switch (f) {
    case Failure::none: return "None";
    case Failure::connection: return "Connection";
    case Failure::timeout: return "Timeout";
    case Failure::not_found: return "VirtualMachineNotFound";
    case Failure::invalid_state: return "InvalidState";
    case Failure::refused: return "Refused";
    case Failure::internal: return "Internal";
  }
  return "Internal";
}

bool transient(Failure f) { return f == Failure::connection || f == Failure::timeout; }

VmRef vm_ref(std::string_view machine, std::string_view hosted_machine_id) {
  VmRef r;
  r.machine = std::string(machine);
  if (!hosted_machine_id.empty()) {
    r.vm_id = std::string(hosted_machine_id);
  } else {
    const auto slash = machine.rfind('\\');
    r.vm_id = std::string(slash == std::string_view::npos ? machine : machine.substr(slash + 1));
  }
  return r;
}

}  // namespace power
