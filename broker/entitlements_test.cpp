#include "broker/entitlements.hpp"

#include <doctest/doctest.h>

#include <algorithm>

using namespace common::model;
using broker::Requester;
using broker::Resource;
using broker::SiteSnapshot;

namespace {

Object make(Kind k, std::string name, std::initializer_list<std::pair<const char*, Value>> fields) {
  Object o = make_default(k, std::move(name));
  for (const auto& [key, v] : fields) o.fields[key] = v;
  return o;
}

identity::UserIdentity user(std::string name, std::vector<std::string> groups) {
  identity::UserIdentity u;
  u.user_name = name;
  u.domain = "DEMO";
  u.qualified_name = "DEMO\\" + name;
  u.groups = std::move(groups);
  return u;
}

SiteSnapshot site() {
  SiteSnapshot s;
  s.groups = {make(Kind::delivery_group, "Pool", {{"published_name", std::string("Windows 11")}}),
              make(Kind::delivery_group, "Personal", {{"desktop_kind", std::string("Private")}}),
              make(Kind::delivery_group, "Apps", {{"delivery_type", std::string("AppsOnly")},
                                                  {"session_support", std::string("MultiSession")}}),
              make(Kind::delivery_group, "Off", {{"enabled", false}})};
  auto access = [](std::string name, std::string group, TextList users) {
    return make(Kind::rule, std::move(name), {{"rule_type", std::string("access")},
                                              {"delivery_group", std::move(group)},
                                              {"included_users", std::move(users)}});
  };
  s.rules = {access("pool-access", "Pool", {"DEMO\\Domain Users"}),
             make(Kind::rule, "pool-desktop", {{"rule_type", std::string("entitlement")},
                                               {"delivery_group", std::string("Pool")},
                                               {"included_users", TextList{"DEMO\\Staff"}},
                                               {"excluded_user_filter_enabled", true},
                                               {"excluded_users", TextList{"DEMO\\carol"}}}),
             access("personal-access", "Personal", {"DEMO\\Domain Users"}),
             make(Kind::rule, "personal-aofu", {{"rule_type", std::string("assignment")},
                                                {"delivery_group", std::string("Personal")},
                                                {"included_users", TextList{"DEMO\\Finance"}},
                                                {"published_name", std::string("My desktop")}}),
             access("apps-access", "Apps", {"Domain Users"}),
             make(Kind::rule, "apps", {{"rule_type", std::string("app_entitlement")},
                                       {"delivery_group", std::string("Apps")},
                                       {"included_user_filter_enabled", false}}),
             access("off-access", "Off", {"DEMO\\Domain Users"}),
             make(Kind::rule, "off-desktop", {{"rule_type", std::string("entitlement")},
                                              {"delivery_group", std::string("Off")},
                                              {"included_user_filter_enabled", false}})};
  s.applications = {
      make(Kind::application, "Notepad", {{"command_line_executable", std::string("notepad.exe")},
                                          {"delivery_groups", TextList{"Apps"}},
                                          {"client_folder", std::string("Tools")}}),
      make(Kind::application, "Payroll", {{"command_line_executable", std::string("pay.exe")},
                                          {"delivery_groups", TextList{"Apps"}},
                                          {"user_filter_enabled", true},
                                          {"associated_users", TextList{"Finance"}}}),
      make(Kind::application, "Hidden", {{"command_line_executable", std::string("h.exe")},
                                         {"delivery_groups", TextList{"Apps"}},
                                         {"visible", false}}),
      make(Kind::application, "Retired", {{"command_line_executable", std::string("r.exe")},
                                          {"delivery_groups", TextList{"Apps"}},
                                          {"enabled", false}})};
  s.machines = {make(Kind::machine, "DEMO\\p1", {{"catalog", std::string("c")}, {"delivery_group", std::string("Personal")}})};
  return s;
}

std::vector<std::string> names(const std::vector<Resource>& rs) {
  std::vector<std::string> out;
  for (const auto& r : rs) out.push_back(r.in_name + (r.disabled ? " (disabled)" : ""));
  return out;
}

}  // namespace

TEST_CASE("nested groups, exclusions, user filters, hidden and disabled applications") {
  const auto s = site();
  // alice: Finance, nested in Staff, and Domain Users.
  auto alice = user("alice", {"DEMO\\Domain Users", "DEMO\\Finance", "DEMO\\Staff"});
  CHECK(names(broker::entitled_resources(s, {&alice, "10.0.0.5", "pc1"})) ==
        std::vector<std::string>{"pool-desktop", "personal-aofu", "Notepad", "Payroll", "Retired (disabled)"});
  auto alice_desktops = broker::entitled_resources(s, {&alice, "", ""});
  CHECK(alice_desktops[0].f_name == "Windows 11");  // the group's published name
  CHECK(alice_desktops[1].f_name == "My desktop");  // the rule's
  CHECK(alice_desktops[2].folder == "Tools");

  // bob: Domain Users only: no Staff desktop, no Finance app.
  auto bob = user("bob", {"DEMO\\Domain Users"});
  CHECK(names(broker::entitled_resources(s, {&bob, "", ""})) ==
        std::vector<std::string>{"Notepad", "Retired (disabled)"});

  // carol is in Staff but excluded by name.
  auto carol = user("carol", {"DEMO\\Domain Users", "DEMO\\Staff"});
  CHECK(names(broker::entitled_resources(s, {&carol, "", ""})) ==
        std::vector<std::string>{"Notepad", "Retired (disabled)"});

  // Outsiders get nothing; access rules are needed.
  auto eve = user("eve", {});
  CHECK(broker::entitled_resources(s, {&eve, "", ""}).empty());
}

TEST_CASE("anonymous requesters see only what is published to anonymous users") {
  auto s = site();
  CHECK(broker::entitled_resources(s, {nullptr, "", ""}).empty());
  for (auto& r : s.rules)
    if (r.name == "apps-access") r.fields["allowed_users"] = std::string("AnonymousOnly");
  CHECK(names(broker::entitled_resources(s, {nullptr, "", ""})) == std::vector<std::string>{"Notepad", "Retired (disabled)"});
  auto bob = user("bob", {"DEMO\\Domain Users"});
  CHECK(broker::entitled_resources(s, {&bob, "", ""}).empty());  // AnonymousOnly shuts out users
}

TEST_CASE("access rule filters: client addresses, names, protocols, gateway") {
  auto bob = user("bob", {"DEMO\\Domain Users"});
  Object rule = make(Kind::rule, "a", {{"rule_type", std::string("access")},
                                       {"delivery_group", std::string("Apps")},
                                       {"included_users", TextList{"DEMO\\bob"}}});
  CHECK(broker::access_allowed(rule, {&bob, "10.1.2.3", "pc"}));
  rule.fields["included_client_ips"] = TextList{"192.168.0.0/16"};
  CHECK_FALSE(broker::access_allowed(rule, {&bob, "10.1.2.3", "pc"}));
  CHECK(broker::access_allowed(rule, {&bob, "192.168.4.4", "pc"}));
  rule.fields["excluded_client_names"] = TextList{"KIOSK"};
  CHECK_FALSE(broker::access_allowed(rule, {&bob, "192.168.4.4", "kiosk"}));
  rule.fields["excluded_client_names"] = TextList{};
  rule.fields["allowed_protocols"] = TextList{};
  CHECK_FALSE(broker::access_allowed(rule, {&bob, "192.168.4.4", "pc"}));  // an empty list denies
  rule.fields["allowed_protocols"] = TextList{"HDX"};
  rule.fields["allowed_connections"] = std::string("ViaAG");
  CHECK_FALSE(broker::access_allowed(rule, {&bob, "192.168.4.4", "pc"}));
  rule.fields["allowed_connections"] = std::string("Filtered");
  rule.fields["enabled"] = false;
  CHECK_FALSE(broker::access_allowed(rule, {&bob, "192.168.4.4", "pc"}));
}

TEST_CASE("a direct assignment gives the private group's desktop") {
  auto s = site();
  s.assignments = {make(Kind::assignment, "1", {{"machine", std::string("DEMO\\p1")}, {"user", std::string("DEMO\\bob")}})};
  auto bob = user("bob", {"DEMO\\Domain Users"});
  CHECK(names(broker::entitled_resources(s, {&bob, "", ""})) ==
        std::vector<std::string>{"Personal", "Notepad", "Retired (disabled)"});
}
