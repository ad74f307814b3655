// common/site_rules.hpp: the rules between site objects that no single object can check alone
// (site-model-reference.md 2.2-2.7), in one place for the config loader (config/config.cpp, with
// line numbers) and the admin API (broker::SiteObjects, as HTTP 400 with the field).
//
// Each function gets the objects as the site model stores them and returns the problem (the
// field of the object being checked that is at fault, and a message) or nullopt.
#pragma once

#include "common/model.hpp"

#include <optional>
#include <string>

namespace common::site_rules {

struct Problem {
  std::string field;    // of the object being checked
  std::string message;  // names the other object
};

// A machine's catalog and delivery group need the same session support (field delivery_group).
std::optional<Problem> machine_in_group(const model::Object& catalog, const model::Object& group);
// A Private delivery group delivers desktops or applications, not both (field delivery_type).
std::optional<Problem> delivery_group(const model::Object& group);
// A rule's type must fit its delivery group (field rule_type): assignment rules for Private
// groups, entitlement rules for Shared groups that deliver desktops, app_entitlement rules for
// groups that deliver applications.
std::optional<Problem> rule_in_group(const model::Object& rule, const model::Object& group);
// A direct assignment's machine must be in a Private delivery group (field machine); `group` is
// nullptr when the machine is in none.
std::optional<Problem> assignment_machine(const model::Object& machine, const model::Object* group);

}  // namespace common::site_rules
