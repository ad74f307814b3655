// common/site_rules.cpp: see site_rules.hpp.
#include "common/site_rules.hpp"

namespace common::site_rules {

namespace {
std::string quoted(const std::string& s) { return "'" + s + "'"; }
}  // namespace

std::optional<Problem> machine_in_group(const model::Object& catalog, const model::Object& group) {
  const auto cat = catalog.text("session_support", "SingleSession");
  const auto grp = group.text("session_support", "SingleSession");
  if (cat == grp) return std::nullopt;
  return Problem{"delivery_group", "catalog " + quoted(catalog.name) + " is " + cat + " but delivery group " +
                                       quoted(group.name) + " is " + grp +
                                       " (a machine's catalog and delivery group need the same session_support)"};
}

std::optional<Problem> delivery_group(const model::Object& group) {
  if (group.text("desktop_kind") == "Private" && group.text("delivery_type") == "DesktopsAndApps")
    return Problem{"delivery_type", "a Private delivery group cannot be DesktopsAndApps (use DesktopsOnly or AppsOnly)"};
  return std::nullopt;
}

std::optional<Problem> rule_in_group(const model::Object& rule, const model::Object& group) {
  const std::string type = rule.text("rule_type");
  const std::string kind = group.text("desktop_kind", "Shared");
  const std::string delivery = group.text("delivery_type", "DesktopsOnly");
  std::string problem;
  if (type == "assignment" && kind != "Private")
    problem = "assignment rules are for Private delivery groups; " + quoted(group.name) + " is " + kind;
  else if (type == "entitlement" && kind != "Shared")
    problem = "entitlement rules are for Shared delivery groups; " + quoted(group.name) + " is " + kind;
  else if (type == "entitlement" && delivery == "AppsOnly")
    problem = "entitlement rules publish desktops; " + quoted(group.name) + " is AppsOnly (use app_entitlement)";
  else if (type == "app_entitlement" && delivery == "DesktopsOnly")
    problem = "app_entitlement rules are for groups that deliver applications; " + quoted(group.name) + " is DesktopsOnly";
  if (problem.empty()) return std::nullopt;
  return Problem{"rule_type", problem};
}

std::optional<Problem> assignment_machine(const model::Object& machine, const model::Object* group) {
  if (!group) return Problem{"machine", "machine " + quoted(machine.name) + " is in no delivery group"};
  if (group->text("desktop_kind", "Shared") != "Private")
    return Problem{"machine", "machine " + quoted(machine.name) + " is in the " + group->text("desktop_kind", "Shared") +
                                  " group " + quoted(group->name) + "; assignments are for Private groups"};
  return std::nullopt;
}

}  // namespace common::site_rules
