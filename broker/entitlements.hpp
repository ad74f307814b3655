// broker/entitlements.hpp: who may see which published desktops and applications.
//
// Semantics (docs/nfuse.md, "What a user sees"; site-model-reference.md 2.7): a user needs access
// to a delivery group (an access rule: all its enabled include filters match, none of its enabled
// exclude filters, and it allows the HDX protocol) plus an entitlement: an entitlement rule
// (shared desktops), an assignment rule or a direct assignment (private desktops), or an
// application entitlement rule together with the application's own user filter (applications).
// Disabled groups and rules give nothing; hidden applications are not listed; a disabled but
// visible application is listed as disabled. Anonymous requesters pass only access rules that
// allow anonymous users and entitlement rules whose include filter is off.
//
// Pure functions over a snapshot: no storage, no I/O. Thread-safe.
#pragma once

#include "common/error.hpp"
#include "common/model.hpp"
#include "identity/directory.hpp"

#include <string>
#include <vector>

namespace storage {
class Repository;
}

namespace broker {

struct SiteState;  // broker/engine.hpp

// The configuration objects entitlement needs, read in one transaction.
struct SiteSnapshot {
  std::vector<common::model::Object> groups, rules, applications, machines, assignments;
};
common::Result<SiteSnapshot> load_snapshot(storage::Repository& repository);

struct Requester {
  const identity::UserIdentity* user = nullptr;  // nullptr: anonymous
  std::string client_address;                     // may be empty (unknown)
  std::string client_name;                        // may be empty
};

struct Resource {
  enum class Type { desktop, application };
  Type type = Type::desktop;
  std::string in_name;      // desktops: the rule name (or the group name for direct assignments);
                            // applications: browser_name
  std::string f_name;       // the name users see
  std::string description;
  std::string folder;       // client folder ("" = root)
  std::string delivery_group;  // the (first) group that grants it
  std::string rule;            // the granting entitlement / assignment rule, if any
  bool disabled = false;       // listed but cannot be launched
  std::vector<std::string> principals;  // users and groups the granting rules name (access lists)
};

bool access_allowed(const common::model::Object& access_rule, const Requester& who);
bool rule_includes(const common::model::Object& rule, const Requester& who);

// A machine assigned directly (without a rule) to a principal the requester matches, by the
// assignment's user (or group) name and the machine's delivery group.
struct DirectAssignment {
  std::string user, delivery_group;
};

// The requester's direct assignments from the engine's indexes (SiteState::assignments_for: the
// assignments naming the user, one of the user's groups, or the client's address), each with
// its machine's delivery group; assignments without a user name or whose machine is unknown are
// left out. Call it under the engine's lock (Engine::with_state). Touches only the requester's
// assignments, whatever the size of the site.
std::vector<DirectAssignment> direct_assignments_for(const SiteState& state, const identity::UserIdentity& user,
                                                     const std::string& client_address);

// Desktops first (in group then rule order), then applications (in id order). Direct
// assignments come from site.machines and site.assignments.
std::vector<Resource> entitled_resources(const SiteSnapshot& site, const Requester& who);
// The same with the requester's direct assignments given (site.machines and site.assignments
// are not read): the engine finds them in its indexes.
std::vector<Resource> entitled_resources(const SiteSnapshot& site, const Requester& who,
                                         const std::vector<DirectAssignment>& direct);

}  // namespace broker
