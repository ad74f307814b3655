#include "broker/site_objects.hpp"

#include "common/site_rules.hpp"

#include "common/crypto.hpp"
#include "common/model_json.hpp"
#include "power/schedule.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>

namespace broker {

namespace site_rules = common::site_rules;

using common::errc;
using common::make_error;
namespace model = common::model;

namespace {

std::string kind_label(Kind kind) {
  std::string s(model::spec(kind).name);
  std::replace(s.begin(), s.end(), '_', ' ');
  return s;
}

storage::AuditEntry audit(const std::string& actor, const char* action, const Object* before, const Object* after) {
  const Object& any = after ? *after : *before;
  storage::AuditEntry e;
  e.actor = actor;
  e.action = action;
  e.kind = std::string(model::spec(any.kind).name);
  e.object = any.name;
  if (before) e.before = model::to_json_text(*before);
  if (after) e.after = model::to_json_text(*after);
  return e;
}

Status field_error(const std::string& described) {
  // validate_fields gives "field: message".
  const auto colon = described.find(": ");
  if (colon == std::string::npos) return make_error(errc::invalid_argument, described);
  return make_error(errc::invalid_argument, described.substr(colon + 2), described.substr(0, colon));
}

Status owned_by_config_error(const Object& obj) {
  return make_error(errc::conflict, kind_label(obj.kind) + " '" + obj.name + "' is declared in " + obj.config_file() +
                                        "; change it there");
}

// Copies the state fields (and, when keep_operational, the operational ones) from `from`.
void keep_broker_fields(const Object& from, Object& to, bool keep_operational) {
  for (const auto& f : model::spec(to.kind).fields) {
    if (!(f.state || (keep_operational && f.operational))) continue;
    auto it = from.fields.find(f.name);
    if (it != from.fields.end()) to.fields[std::string(f.name)] = it->second;
  }
}

}  // namespace

SiteObjects::SiteObjects(storage::Repository& repository, std::shared_ptr<spdlog::logger> logger)
    : repository_(repository), logger_(std::move(logger)), zones_(std::make_shared<power::TimeZoneDb>()) {}

Result<Page> SiteObjects::list(Kind kind, const storage::Query& query) {
  Page page;
  auto st = repository_.read([&](storage::Transaction& tx) -> Status {
    auto items = tx.list(kind, query);
    if (!items) return items.error();
    auto total = tx.count(kind, query);
    if (!total) return total.error();
    page.items = std::move(*items);
    page.total = *total;
    return {};
  });
  if (!st) return st.error();
  return page;
}

Result<Object> SiteObjects::get(Kind kind, std::string_view name) {
  Object out;
  auto st = repository_.read([&](storage::Transaction& tx) -> Status {
    auto o = tx.get(kind, name);
    if (!o) return o.error();
    out = std::move(*o);
    return {};
  });
  if (!st) return st.error();
  return out;
}

Status SiteObjects::check_semantics(storage::Transaction& tx, const Object& obj) {
  if (auto msg = model::validate_fields(obj); !msg.empty()) return field_error(msg);
  const auto& ks = model::spec(obj.kind);
  // References, with messages that name the field.
  for (const auto& f : ks.fields) {
    if (!f.references) continue;
    std::vector<std::string> names;
    if (f.type == model::FieldType::text_list)
      names = obj.list(f.name);
    else if (!obj.is_null(f.name) && !obj.text(f.name).empty())
      names.push_back(obj.text(f.name));
    for (const auto& n : names) {
      auto r = tx.get(*f.references, n);
      if (!r && r.error().code == errc::not_found)
        return make_error(errc::invalid_argument, "no " + kind_label(*f.references) + " named '" + n + "'",
                          std::string(f.name));
      if (!r) return r.error();
    }
  }
  switch (obj.kind) {
    case Kind::machine: {
      if (obj.is_null("delivery_group") || obj.text("delivery_group").empty()) break;
      auto cat = tx.get(Kind::catalog, obj.text("catalog"));
      auto grp = tx.get(Kind::delivery_group, obj.text("delivery_group"));
      if (!cat) return cat.error();
      if (!grp) return grp.error();
      if (auto p = site_rules::machine_in_group(*cat, *grp)) return make_error(errc::invalid_argument, p->message, p->field);
      break;
    }
    case Kind::delivery_group: {
      if (auto p = site_rules::delivery_group(obj)) return make_error(errc::invalid_argument, p->message, p->field);
      // The power policy reads schedules in this zone: refuse one that cannot be read now rather
      // than skip the group's pool management later.
      if (auto zone = zones_->find(obj.text("time_zone", "UTC")); !zone)
        return make_error(errc::invalid_argument, zone.error().message, "time_zone");
      break;
    }
    case Kind::power_time_scheme: {
      // The scheme in force on a day must be unambiguous: a group's schemes do not share days.
      auto days = power::parse_days(obj.list("days_of_week"));
      if (!days) return make_error(errc::invalid_argument, days.error().message, "days_of_week");
      storage::Query q;
      q.equals.emplace_back("delivery_group", obj.text("delivery_group"));
      auto others = tx.list(Kind::power_time_scheme, q);
      if (!others) return others.error();
      static constexpr const char* kDayNames[] = {"Sunday",   "Monday", "Tuesday", "Wednesday",
                                                  "Thursday", "Friday", "Saturday"};
      for (const auto& other : *others) {
        if (other.name == obj.name) continue;
        // Two schemes of the config file were checked with line numbers when it was loaded (and a
        // reconcile that swaps their days must not trip over the half-applied state).
        if (obj.owner.rfind("config:", 0) == 0 && other.owner.rfind("config:", 0) == 0) continue;
        auto other_days = power::parse_days(other.list("days_of_week"));
        if (!other_days) continue;
        const auto shared = *days & *other_days;
        if (shared.none()) continue;
        std::string names;
        for (std::size_t i = 0; i < 7; ++i)
          if (shared.test(i)) names += (names.empty() ? "" : ", ") + std::string(kDayNames[i]);
        return make_error(errc::invalid_argument,
                          "shares " + names + " with power time scheme '" + other.name + "'; the schemes of delivery group '" +
                              obj.text("delivery_group") + "' must not overlap days",
                          "days_of_week");
      }
      break;
    }
    case Kind::rule: {
      auto grp = tx.get(Kind::delivery_group, obj.text("delivery_group"));
      if (!grp) return grp.error();
      if (auto p = site_rules::rule_in_group(obj, *grp)) return make_error(errc::invalid_argument, p->message, p->field);
      break;
    }
    case Kind::assignment: {
      const bool has_user = !obj.text("user").empty();
      const bool has_ip = !obj.text("client_ip").empty();
      if (has_user == has_ip) return make_error(errc::invalid_argument, "give exactly one of user and client_ip", "user");
      auto m = tx.get(Kind::machine, obj.text("machine"));
      if (!m) return m.error();
      const auto group_name = m->text("delivery_group");
      std::optional<Object> grp;
      if (!group_name.empty()) {
        auto g = tx.get(Kind::delivery_group, group_name);
        if (!g) return g.error();
        grp = std::move(*g);
      }
      if (auto p = site_rules::assignment_machine(*m, grp ? &*grp : nullptr))
        return make_error(errc::invalid_argument, p->message, p->field);
      break;
    }
    default: break;
  }
  return {};
}

namespace {

// What the admin API may not set, because it would reach the broker host's files or programs:
// a hypervisor connection's file paths (a simulated driver's state file is written by rename, a
// password_file is read and sent to the connection's URI) and libvirt's `ext` transport or its
// `command` parameter (runs a program). Those belong in the config file, which only someone
// with access to the host can change (docs/SECURITY.md 9.5).
Status api_may_set(const Object& obj) {
  if (obj.kind != Kind::hypervisor_connection) return {};
  const std::string host_only = " can be set in the config file only, not through the admin API (it would reach "
                                "the broker host's files or programs)";
  const auto uri = obj.text("uri");
  if (obj.text("driver", "simulated") == "simulated" && !uri.empty())
    return make_error(errc::invalid_argument, "a simulated driver's state file" + host_only, "uri");
  if (!obj.text("password_file").empty())
    return make_error(errc::invalid_argument, "password_file" + host_only, "password_file");
  std::string lowered = uri;
  for (auto& c : lowered) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  const auto scheme = lowered.substr(0, lowered.find(':'));
  const auto query = lowered.find('?') == std::string::npos ? std::string() : lowered.substr(lowered.find('?'));
  if (scheme.ends_with("+ext") || query.find("command=") != std::string::npos)
    return make_error(errc::invalid_argument, "libvirt's ext transport (a command run by the broker)" + host_only,
                      "uri");
  return {};
}

}  // namespace

Result<Object> SiteObjects::create(Object candidate, const std::string& actor) {
  if (!model::spec(candidate.kind).api_writable)
    return make_error(errc::invalid_argument, kind_label(candidate.kind) + "s are read-only");
  if (auto ok = api_may_set(candidate); !ok) return ok.error();
  candidate.owner = "api";
  if (candidate.kind == Kind::machine)
    candidate.fields["maintenance_mode_reason"] =
        std::string(candidate.flag("in_maintenance_mode") ? "Administrator" : "None");
  Object stored;
  auto st = repository_.write([&](storage::Transaction& tx) -> Status {
    if (auto ok = check_semantics(tx, candidate); !ok) return ok;
    auto r = tx.create(candidate);
    if (!r) return r.error();
    stored = std::move(*r);
    return tx.append_audit(audit(actor, "create", nullptr, &stored));
  });
  if (!st) return st.error();
  logger_->info("{} created {} '{}'", actor, model::spec(stored.kind).name, stored.name);
  return stored;
}

Result<Object> SiteObjects::update(std::string_view name, Object candidate, const std::string& actor) {
  if (!model::spec(candidate.kind).api_writable)
    return make_error(errc::invalid_argument, kind_label(candidate.kind) + "s are read-only");
  Object stored;
  auto st = repository_.write([&](storage::Transaction& tx) -> Status {
    auto existing = tx.get(candidate.kind, name);
    if (!existing) return existing.error();
    if (model::spec(candidate.kind).auto_name) candidate.name = existing->name;
    candidate.owner = existing->owner;
    keep_broker_fields(*existing, candidate, false);
    if (existing->owned_by_config()) {
      Object declared_view = candidate;
      if (declared_view.name != existing->name || !model::same_declared_fields(declared_view, *existing))
        return owned_by_config_error(*existing);
    } else if (auto ok = api_may_set(candidate); !ok) {
      return ok;
    }
    if (candidate.kind == Kind::machine && candidate.flag("in_maintenance_mode") != existing->flag("in_maintenance_mode"))
      candidate.fields["maintenance_mode_reason"] =
          std::string(candidate.flag("in_maintenance_mode") ? "Administrator" : "None");
    if (auto ok = check_semantics(tx, candidate); !ok) return ok;
    auto r = tx.update(name, candidate);
    if (!r) return r.error();
    stored = std::move(*r);
    return tx.append_audit(audit(actor, "update", &*existing, &stored));
  });
  if (!st) return st.error();
  logger_->info("{} updated {} '{}'", actor, model::spec(stored.kind).name, stored.name);
  return stored;
}

namespace {

// A machine's logged-off sessions are history that must not keep it from being deleted.
Status forget_logged_off_sessions(storage::Transaction& tx, std::string_view machine) {
  storage::Query q;
  q.equals.emplace_back("machine", std::string(machine));
  q.equals.emplace_back("state", "LoggedOff");
  auto ended = tx.list(Kind::session, q);
  if (!ended) return ended.error();
  for (const auto& s : *ended)
    if (auto r = tx.remove(Kind::session, s.name); !r) return r;
  return {};
}

}  // namespace

Status SiteObjects::remove(Kind kind, std::string_view name, const std::string& actor) {
  if (!model::spec(kind).api_writable || kind == Kind::site)
    return make_error(errc::invalid_argument, kind_label(kind) + " cannot be deleted");
  auto st = repository_.write([&](storage::Transaction& tx) -> Status {
    auto existing = tx.get(kind, name);
    if (!existing) return existing.error();
    if (existing->owned_by_config()) return owned_by_config_error(*existing);
    if (kind == Kind::machine)
      if (auto r = forget_logged_off_sessions(tx, name); !r) return r;
    if (auto r = tx.remove(kind, name); !r) return r;
    return tx.append_audit(audit(actor, "delete", &*existing, nullptr));
  });
  if (st) logger_->info("{} deleted {} '{}'", actor, model::spec(kind).name, name);
  if (st && kind == Kind::machine && machine_removed_) machine_removed_(std::string(name));
  return st;
}

Result<std::string> SiteObjects::rotate_machine_secret(std::string_view machine, const std::string& actor) {
  const std::string secret = common::crypto::random_hex(32);
  auto st = repository_.write([&](storage::Transaction& tx) -> Status {
    auto existing = tx.get(Kind::machine, machine);
    if (!existing) return existing.error();
    Object updated = *existing;
    updated.fields["secret_hash"] = common::crypto::sha256_hex(secret);
    auto r = tx.update(machine, updated);
    if (!r) return r.error();
    storage::AuditEntry e;
    e.actor = actor;
    e.action = "rotate-secret";
    e.kind = "machine";
    e.object = existing->name;
    return tx.append_audit(e);
  });
  if (!st) return st.error();
  logger_->info("{} set a new agent secret for machine '{}'", actor, machine);
  return secret;
}

Result<Object> SiteObjects::site() {
  auto existing = get(Kind::site, "site");
  if (existing || existing.error().code != errc::not_found) return existing;
  Object created;
  auto st = repository_.write([&](storage::Transaction& tx) -> Status {
    auto again = tx.get(Kind::site, "site");
    if (again) {
      created = std::move(*again);
      return {};
    }
    auto r = tx.create(model::make_default(Kind::site, "site"));
    if (!r) return r.error();
    created = std::move(*r);
    return {};
  });
  if (!st) return st.error();
  return created;
}

Result<ReconcileReport> SiteObjects::reconcile(const std::string& config_path, const std::optional<Object>& site,
                                               const std::vector<Object>& declared) {
  ReconcileReport report;
  const std::string actor = "config:" + config_path;
  const std::string owner = "config:" + config_path;
  auto st = repository_.write([&](storage::Transaction& tx) -> Status {
    std::map<Kind, std::vector<std::string>> declared_names;
    std::vector<Object> wanted = declared;
    if (site) wanted.insert(wanted.begin(), *site);
    for (Object obj : wanted) {
      obj.owner = owner;
      declared_names[obj.kind].push_back(obj.name);
      auto existing = tx.get(obj.kind, obj.name);
      if (!existing && existing.error().code != errc::not_found) return existing.error();
      if (!existing) {
        if (obj.kind == Kind::machine)
          obj.fields["maintenance_mode_reason"] = std::string(obj.flag("in_maintenance_mode") ? "Administrator" : "None");
        if (auto ok = check_semantics(tx, obj); !ok)
          return make_error(ok.error().code, kind_label(obj.kind) + " '" + obj.name + "': " + ok.error().describe());
        auto r = tx.create(obj);
        if (!r) return r.error();
        if (auto a = tx.append_audit(audit(actor, "create", nullptr, &*r)); !a) return a;
        ++report.created;
        continue;
      }
      keep_broker_fields(*existing, obj, true);
      if (model::same_declared_fields(obj, *existing)) {
        ++report.unchanged;
        continue;
      }
      if (!existing->owned_by_config())
        logger_->warn("{} '{}' was created through the admin API; {} now declares it and owns it",
                      model::spec(obj.kind).name, obj.name, config_path);
      if (auto ok = check_semantics(tx, obj); !ok)
        return make_error(ok.error().code, kind_label(obj.kind) + " '" + obj.name + "': " + ok.error().describe());
      auto r = tx.update(obj.name, obj);
      if (!r) return r.error();
      if (auto a = tx.append_audit(audit(actor, "update", &*existing, &*r)); !a) return a;
      ++report.updated;
    }
    // Config-owned objects the file no longer declares: delete, dependants first.
    auto kinds = model::all_kinds();
    for (auto it = kinds.rbegin(); it != kinds.rend(); ++it) {
      if (!it->api_writable) continue;
      storage::Query q;
      auto objs = tx.list(it->kind, q);
      if (!objs) return objs.error();
      const auto& names = declared_names[it->kind];
      for (const auto& obj : *objs) {
        if (!obj.owned_by_config() || std::find(names.begin(), names.end(), obj.name) != names.end()) continue;
        if (it->kind == Kind::site) {
          Object released = obj;
          released.owner = "api";
          auto r = tx.update(obj.name, released);
          if (!r) return r.error();
          ++report.released;
          continue;
        }
        if (it->kind == Kind::machine)
          if (auto r = forget_logged_off_sessions(tx, obj.name); !r) return r;
        auto removed = tx.remove(it->kind, obj.name);
        if (removed) {
          if (auto a = tx.append_audit(audit(actor, "delete", &obj, nullptr)); !a) return a;
          ++report.deleted;
          continue;
        }
        if (removed.error().code != errc::conflict) return removed;
        Object released = obj;
        released.owner = "api";
        auto r = tx.update(obj.name, released);
        if (!r) return r.error();
        if (auto a = tx.append_audit(audit(actor, "update", &obj, &*r)); !a) return a;
        logger_->warn("{} '{}' is no longer declared in {} but {}; it is kept and now managed through the admin API",
                      it->name, obj.name, config_path, removed.error().message);
        ++report.released;
      }
    }
    return {};
  });
  if (!st) return st.error();
  logger_->info("reconciled {}: {} created, {} updated, {} deleted, {} released, {} unchanged", config_path,
                report.created, report.updated, report.deleted, report.released, report.unchanged);
  return report;
}

Result<int> SiteObjects::reset_registrations() {
  int reset = 0;
  auto st = repository_.write([&](storage::Transaction& tx) -> Status {
    reset = 0;
    // Only rows a broker that still stored registration left behind: nothing else writes the column.
    storage::Query q;
    q.not_equals.emplace_back("registration_state", std::string(model::registration::unregistered));
    auto machines = tx.list(Kind::machine, q);
    if (!machines) return machines.error();
    for (const auto& m : *machines) {
      auto r = tx.set_fields(Kind::machine, m.name,
                             {{"registration_state", std::string(model::registration::unregistered)}});
      if (!r) return r.error();
      ++reset;
    }
    return {};
  });
  if (!st) return st.error();
  return reset;
}

Result<std::vector<std::pair<std::string, std::int64_t>>> SiteObjects::count_by(Kind kind, std::string_view field) {
  std::vector<std::pair<std::string, std::int64_t>> out;
  const auto* f = model::spec(kind).field(field);
  if (!f) return make_error(errc::invalid_argument, "no such field", std::string(field));
  auto st = repository_.read([&](storage::Transaction& tx) -> Status {
    for (auto value : f->choices) {
      storage::Query q;
      q.equals.emplace_back(std::string(field), std::string(value));
      auto n = tx.count(kind, q);
      if (!n) return n.error();
      out.emplace_back(std::string(value), *n);
    }
    return {};
  });
  if (!st) return st.error();
  return out;
}

}  // namespace broker
