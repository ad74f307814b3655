#include "broker/entitlements.hpp"

#include "broker/engine.hpp"
#include "common/address.hpp"
#include "storage/repository.hpp"

#include <algorithm>
#include <map>

namespace broker {

using common::model::Kind;
using common::model::Object;

common::Result<SiteSnapshot> load_snapshot(storage::Repository& repository) {
  SiteSnapshot snap;
  auto st = repository.read([&](storage::Transaction& tx) -> common::Status {
    const std::pair<Kind, std::vector<Object>*> parts[] = {{Kind::delivery_group, &snap.groups},
                                                           {Kind::rule, &snap.rules},
                                                           {Kind::application, &snap.applications},
                                                           {Kind::machine, &snap.machines},
                                                           {Kind::assignment, &snap.assignments}};
    for (const auto& [kind, out] : parts) {
      auto r = tx.list(kind, {});
      if (!r) return r.error();
      *out = std::move(*r);
    }
    return {};
  });
  if (!st) return st.error();
  return snap;
}

namespace {

using common::model::TextList;

// Field reads without copies (the per-request path reads every rule's lists).
std::string_view text_of(const Object& o, std::string_view field, std::string_view fallback = {}) {
  auto it = o.fields.find(field);
  if (it != o.fields.end())
    if (const auto* s = std::get_if<std::string>(&it->second)) return *s;
  return fallback;
}
const TextList& list_of(const Object& o, std::string_view field) {
  static const TextList empty;
  auto it = o.fields.find(field);
  if (it != o.fields.end())
    if (const auto* l = std::get_if<TextList>(&it->second)) return *l;
  return empty;
}

bool names(const Requester& who, const std::vector<std::string>& principals) {
  return who.user && identity::names_any(*who.user, principals);
}

bool any_address(const std::string& address, const std::vector<std::string>& ranges) {
  return std::any_of(ranges.begin(), ranges.end(), [&](const std::string& r) { return common::address_in(address, r); });
}

bool any_name(const std::string& name, const std::vector<std::string>& names_list) {
  return std::any_of(names_list.begin(), names_list.end(),
                     [&](const std::string& n) { return identity::iequals(n, name); });
}

const Object* find(const std::vector<Object>& objs, const std::string& name) {
  for (const auto& o : objs)
    if (o.name == name) return &o;
  return nullptr;
}

std::string shown_name(const Object* rule, const Object& group) {
  if (rule && !rule->text("published_name").empty()) return rule->text("published_name");
  if (!group.text("published_name").empty()) return group.text("published_name");
  return group.name;
}

}  // namespace

bool access_allowed(const Object& rule, const Requester& who) {
  if (!rule.flag("enabled", true)) return false;
  const bool anonymous = who.user == nullptr;
  const auto allowed = text_of(rule, "allowed_users", "Filtered");
  const bool filter = rule.flag("included_user_filter_enabled", true);
  if (allowed == "Filtered") {
    if (anonymous || (filter && !names(who, list_of(rule, "included_users")))) return false;
  } else if (allowed == "AnyAuthenticated" || allowed == "Any") {
    if (anonymous) return false;
  } else if (allowed == "AnonymousOnly") {
    if (!anonymous) return false;
  } else if (allowed == "FilteredOrAnonymous") {
    if (!anonymous && filter && !names(who, list_of(rule, "included_users"))) return false;
  } else {
    return false;
  }
  if (rule.flag("excluded_user_filter_enabled") && names(who, list_of(rule, "excluded_users"))) return false;
  const auto& inc_ips = list_of(rule, "included_client_ips");
  if (!inc_ips.empty() && !any_address(who.client_address, inc_ips)) return false;
  if (any_address(who.client_address, list_of(rule, "excluded_client_ips"))) return false;
  const auto& inc_names = list_of(rule, "included_client_names");
  if (!inc_names.empty() && !any_name(who.client_name, inc_names)) return false;
  if (!who.client_name.empty() && any_name(who.client_name, list_of(rule, "excluded_client_names"))) return false;
  // The XML service cannot tell gateway connections apart: rules only for gateway users fail.
  const auto via = text_of(rule, "allowed_connections", "Filtered");
  if (via == "ViaAG" || via == "AnyViaAG") return false;
  return any_name("HDX", list_of(rule, "allowed_protocols"));
}

bool rule_includes(const Object& rule, const Requester& who) {
  if (!rule.flag("enabled", true)) return false;
  if (rule.flag("included_user_filter_enabled", true) && !names(who, list_of(rule, "included_users"))) return false;
  if (rule.flag("excluded_user_filter_enabled") && names(who, list_of(rule, "excluded_users"))) return false;
  return true;
}

std::vector<DirectAssignment> direct_assignments_for(const SiteState& state, const identity::UserIdentity& user,
                                                     const std::string& client_address) {
  std::vector<DirectAssignment> out;
  for (const auto* a : state.assignments_for(user, client_address))
    if (const auto* m = state.machine(a->machine); m && !a->user.empty()) out.push_back({a->user, m->delivery_group});
  return out;
}

std::vector<Resource> entitled_resources(const SiteSnapshot& site, const Requester& who) {
  std::vector<DirectAssignment> direct;
  if (who.user)
    for (const auto& a : site.assignments) {
      const Object* m = find(site.machines, a.text("machine"));
      if (m && !a.text("user").empty()) direct.push_back({a.text("user"), m->text("delivery_group")});
    }
  return entitled_resources(site, who, direct);
}

std::vector<Resource> entitled_resources(const SiteSnapshot& site, const Requester& who,
                                         const std::vector<DirectAssignment>& direct) {
  std::map<std::string, std::vector<const Object*>> rules_by_group;
  for (const auto& r : site.rules) rules_by_group[r.text("delivery_group")].push_back(&r);

  auto has_access = [&](const Object& group) {
    if (!group.flag("enabled", true)) return false;
    for (const Object* r : rules_by_group[group.name])
      if (text_of(*r, "rule_type") == "access" && access_allowed(*r, who)) return true;
    return false;
  };

  std::vector<Resource> out;
  std::map<std::string, bool> access;  // group name -> has access
  for (const auto& g : site.groups) access[g.name] = has_access(g);

  // Desktops.
  for (const auto& g : site.groups) {
    if (!access[g.name] || text_of(g, "delivery_type") == "AppsOnly") continue;
    const bool is_private = text_of(g, "desktop_kind") == "Private";
    const std::string_view wanted = is_private ? "assignment" : "entitlement";
    bool any = false;
    for (const Object* r : rules_by_group[g.name]) {
      if (text_of(*r, "rule_type") != wanted || !rule_includes(*r, who)) continue;
      Resource d;
      d.type = Resource::Type::desktop;
      d.in_name = r->name;
      d.f_name = shown_name(r, g);
      d.description = r->text("description", g.text("description"));
      d.delivery_group = g.name;
      d.rule = r->name;
      d.principals = r->list("included_users");
      out.push_back(std::move(d));
      any = true;
    }
    if (!is_private || any || !who.user) continue;
    // Machines assigned to the user directly (no rule): one desktop for the group.
    for (const auto& a : direct) {
      if (a.delivery_group != g.name || a.user.empty()) continue;
      if (!identity::names_user(*who.user, a.user) && !names(who, {a.user})) continue;
      Resource d;
      d.type = Resource::Type::desktop;
      d.in_name = g.name;
      d.f_name = shown_name(nullptr, g);
      d.description = g.text("description");
      d.delivery_group = g.name;
      d.principals = {a.user};
      out.push_back(std::move(d));
      break;
    }
  }

  // Applications.
  for (const auto& app : site.applications) {
    if (!app.flag("visible", true)) continue;
    if (app.flag("user_filter_enabled") && !names(who, list_of(app, "associated_users"))) continue;
    for (const auto& group_name : list_of(app, "delivery_groups")) {
      const Object* g = find(site.groups, group_name);
      if (!g || !access[g->name] || text_of(*g, "delivery_type") == "DesktopsOnly") continue;
      const Object* granting = nullptr;
      for (const Object* r : rules_by_group[g->name])
        if (text_of(*r, "rule_type") == "app_entitlement" && rule_includes(*r, who)) {
          granting = r;
          break;
        }
      if (!granting) continue;
      Resource a;
      a.type = Resource::Type::application;
      a.in_name = app.text("browser_name", app.name);
      if (a.in_name.empty()) a.in_name = app.name;
      a.f_name = app.text("published_name");
      if (a.f_name.empty()) a.f_name = app.name;
      a.description = app.text("description");
      a.folder = app.text("client_folder");
      a.delivery_group = g->name;
      a.rule = granting->name;
      a.disabled = !app.flag("enabled", true);
      a.principals = app.flag("user_filter_enabled") ? app.list("associated_users") : granting->list("included_users");
      out.push_back(std::move(a));
      break;
    }
  }
  return out;
}

}  // namespace broker
