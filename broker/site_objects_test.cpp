#include "broker/site_objects.hpp"

#include "common/log.hpp"

#include <doctest/doctest.h>

using namespace common::model;
using broker::SiteObjects;

namespace {

struct Fixture {
  std::unique_ptr<storage::Repository> repo;
  std::unique_ptr<SiteObjects> site;
  Fixture() {
    storage::SqliteOptions o;
    o.path = ":memory:";
    auto r = storage::open_sqlite(o);
    REQUIRE(r.has_value());
    repo = std::move(*r);
    site = std::make_unique<SiteObjects>(*repo, common::null_logger());
  }
};

Object obj(Kind k, std::string name, std::initializer_list<std::pair<const char*, Value>> fields,
           std::string owner = "config:/etc/b.toml") {
  Object o = make_default(k, std::move(name));
  o.owner = std::move(owner);
  for (const auto& [key, v] : fields) o.fields[key] = v;
  return o;
}

std::vector<Object> declared_site(int machines) {
  std::vector<Object> d;
  d.push_back(obj(Kind::catalog, "cat", {}));
  d.push_back(obj(Kind::delivery_group, "grp", {}));
  for (int i = 1; i <= machines; ++i)
    d.push_back(obj(Kind::machine, "m" + std::to_string(i), {{"catalog", std::string("cat")}, {"delivery_group", std::string("grp")}}));
  return d;
}

}  // namespace

TEST_CASE("reconcile creates, is idempotent, updates and deletes what the file no longer declares") {
  Fixture f;
  auto first = f.site->reconcile("/etc/b.toml", std::nullopt, declared_site(3));
  REQUIRE(first.has_value());
  CHECK(first->created == 5);
  auto second = f.site->reconcile("/etc/b.toml", std::nullopt, declared_site(3));
  REQUIRE(second.has_value());
  CHECK(second->created == 0);
  CHECK(second->updated == 0);
  CHECK(second->unchanged == 5);

  auto changed = declared_site(2);
  changed[2].fields["tags"] = TextList{"blue"};
  auto third = f.site->reconcile("/etc/b.toml", std::nullopt, changed);
  REQUIRE(third.has_value());
  CHECK(third->updated == 1);
  CHECK(third->deleted == 1);
  CHECK(!f.site->get(Kind::machine, "m3").has_value());
  CHECK(f.site->get(Kind::machine, "m1")->list("tags") == TextList{"blue"});
}

TEST_CASE("objects created through the API survive reconciliation; config objects refuse API changes") {
  Fixture f;
  REQUIRE(f.site->reconcile("/etc/b.toml", std::nullopt, declared_site(1)).has_value());
  auto api_machine = f.site->create(obj(Kind::machine, "api-m", {{"catalog", std::string("cat")}}, "api"), "token:t");
  REQUIRE(api_machine.has_value());
  CHECK(api_machine->owner == "api");
  REQUIRE(f.site->reconcile("/etc/b.toml", std::nullopt, declared_site(1)).has_value());
  CHECK(f.site->get(Kind::machine, "api-m").has_value());

  auto m1 = *f.site->get(Kind::machine, "m1");
  auto tagged = m1;
  tagged.fields["tags"] = TextList{"x"};
  auto refused = f.site->update("m1", tagged, "token:t");
  REQUIRE(!refused);
  CHECK(refused.error().code == common::errc::conflict);
  CHECK(refused.error().message.find("/etc/b.toml") != std::string::npos);
  CHECK(f.site->remove(Kind::machine, "m1", "token:t").error().code == common::errc::conflict);

  auto maint = m1;
  maint.fields["in_maintenance_mode"] = true;
  auto ok = f.site->update("m1", maint, "token:t");
  REQUIRE(ok.has_value());
  CHECK(ok->text("maintenance_mode_reason") == "Administrator");
  REQUIRE(f.site->reconcile("/etc/b.toml", std::nullopt, declared_site(1)).has_value());
  CHECK(f.site->get(Kind::machine, "m1")->flag("in_maintenance_mode"));  // kept
}

TEST_CASE("a config object still referenced by an API object is released, not deleted") {
  Fixture f;
  REQUIRE(f.site->reconcile("/etc/b.toml", std::nullopt, declared_site(0)).has_value());
  REQUIRE(f.site->create(obj(Kind::machine, "api-m", {{"catalog", std::string("cat")}}, "api"), "token:t").has_value());
  auto r = f.site->reconcile("/etc/b.toml", std::nullopt, {});
  REQUIRE(r.has_value());
  CHECK(r->released == 1);  // the catalog
  CHECK(r->deleted == 1);   // the group
  auto cat = f.site->get(Kind::catalog, "cat");
  REQUIRE(cat.has_value());
  CHECK(cat->owner == "api");
}

TEST_CASE("semantic checks name the field") {
  Fixture f;
  REQUIRE(f.site->create(obj(Kind::catalog, "multi", {{"session_support", std::string("MultiSession")}}, "api"), "t"));
  REQUIRE(f.site->create(obj(Kind::delivery_group, "single", {}, "api"), "t"));
  auto mismatch = f.site->create(
      obj(Kind::machine, "m", {{"catalog", std::string("multi")}, {"delivery_group", std::string("single")}}, "api"), "t");
  REQUIRE(!mismatch);
  CHECK(mismatch.error().field == "delivery_group");
  auto missing = f.site->create(obj(Kind::machine, "m", {{"catalog", std::string("nope")}}, "api"), "t");
  CHECK(missing.error().field == "catalog");
  auto bad_rule = f.site->create(
      obj(Kind::rule, "r", {{"rule_type", std::string("assignment")}, {"delivery_group", std::string("single")}}, "api"), "t");
  CHECK(bad_rule.error().field == "rule_type");
  auto private_mixed = f.site->create(
      obj(Kind::delivery_group, "p", {{"desktop_kind", std::string("Private")}, {"delivery_type", std::string("DesktopsAndApps")}}, "api"), "t");
  CHECK(private_mixed.error().field == "delivery_type");
  // The same rules as the config loader (common/site_rules.hpp): they used to drift, and the
  // admin API accepted an app_entitlement rule on a DesktopsOnly group that the config refuses.
  auto apps_on_desktops = f.site->create(
      obj(Kind::rule, "a", {{"rule_type", std::string("app_entitlement")}, {"delivery_group", std::string("single")}}, "api"),
      "t");
  REQUIRE(!apps_on_desktops);
  CHECK(apps_on_desktops.error().field == "rule_type");
  CHECK(apps_on_desktops.error().message ==
        "app_entitlement rules are for groups that deliver applications; 'single' is DesktopsOnly");
  REQUIRE(f.site->create(obj(Kind::delivery_group, "apps", {{"delivery_type", std::string("AppsOnly")}}, "api"), "t"));
  auto desktops_on_apps = f.site->create(
      obj(Kind::rule, "e", {{"rule_type", std::string("entitlement")}, {"delivery_group", std::string("apps")}}, "api"), "t");
  REQUIRE(!desktops_on_apps);
  CHECK(desktops_on_apps.error().message == "entitlement rules publish desktops; 'apps' is AppsOnly (use app_entitlement)");
}

TEST_CASE("the admin API cannot point a hypervisor connection at the host's files or programs; the config file can") {
  Fixture f;
  const auto conn = [](std::initializer_list<std::pair<const char*, Value>> fields) {
    return obj(Kind::hypervisor_connection, "h", fields, "api");
  };
  auto state_file = f.site->create(conn({{"driver", std::string("simulated")}, {"uri", std::string("file:/var/lib/openbroker/broker.db")}}), "t");
  REQUIRE(!state_file);
  CHECK(state_file.error().field == "uri");
  CHECK(state_file.error().message.find("config file only") != std::string::npos);
  auto password = f.site->create(conn({{"driver", std::string("libvirt")}, {"uri", std::string("qemu+ssh://kvm1/system")},
                                       {"password_file", std::string("/etc/openbroker/site.key")}}),
                                 "t");
  REQUIRE(!password);
  CHECK(password.error().field == "password_file");
  for (const char* uri : {"qemu+ext:///system?command=/bin/sh", "QEMU+EXT:///system", "qemu+unix:///system?Command=/x"}) {
    CAPTURE(uri);
    auto ext = f.site->create(conn({{"driver", std::string("libvirt")}, {"uri", std::string(uri)}}), "t");
    REQUIRE(!ext);
    CHECK(ext.error().field == "uri");
  }
  // What the API may do: a remote libvirt host, a simulated driver without a state file.
  REQUIRE(f.site->create(conn({{"driver", std::string("libvirt")}, {"uri", std::string("qemu+ssh://kvm1/system")}}), "t"));
  REQUIRE(f.site->create(obj(Kind::hypervisor_connection, "sim", {{"driver", std::string("simulated")}}, "api"), "t"));
  // ... and an update cannot add what a create could not.
  auto h = *f.site->get(Kind::hypervisor_connection, "h");
  h.fields["password_file"] = std::string("kvm.pw");
  auto updated = f.site->update("h", h, "t");
  REQUIRE(!updated);
  CHECK(updated.error().field == "password_file");
  // The config file (written by someone with the host's access) may name files.
  REQUIRE(f.site
              ->reconcile("/etc/b.toml", std::nullopt,
                          {obj(Kind::hypervisor_connection, "declared",
                               {{"driver", std::string("simulated")}, {"uri", std::string("file:vms.json")}})})
              .has_value());
  CHECK(f.site->get(Kind::hypervisor_connection, "declared")->text("uri") == "file:vms.json");
}

TEST_CASE("a delivery group's time zone must exist; a group's power time schemes must not share days") {
  Fixture f;
  auto mars = f.site->create(obj(Kind::delivery_group, "g", {{"time_zone", std::string("Mars/Olympus")}}, "api"), "t");
  REQUIRE(!mars);
  CHECK(mars.error().field == "time_zone");
  CHECK(mars.error().message.find("Mars/Olympus") != std::string::npos);
  REQUIRE(f.site->create(obj(Kind::delivery_group, "g", {{"time_zone", std::string("UTC")}}, "api"), "t"));
  auto scheme = [](std::string name, TextList days) {
    return obj(Kind::power_time_scheme, std::move(name), {{"delivery_group", std::string("g")}, {"days_of_week", std::move(days)}},
               "api");
  };
  REQUIRE(f.site->create(scheme("weekdays", {"Weekdays"}), "t"));
  auto overlap = f.site->create(scheme("fridays", {"Friday", "Saturday"}), "t");
  REQUIRE(!overlap);
  CHECK(overlap.error().field == "days_of_week");
  CHECK(overlap.error().message.find("shares Friday with power time scheme 'weekdays'") == 0);
  REQUIRE(f.site->create(scheme("weekend", {"Weekend"}), "t"));
  // Updating a scheme compares it with the others only.
  REQUIRE(f.site->update("weekend", scheme("weekend", {"Saturday", "Sunday"}), "t"));
  auto grow = f.site->update("weekend", scheme("weekend", {"Sunday", "Monday"}), "t");
  REQUIRE(!grow);
  CHECK(grow.error().field == "days_of_week");
}

TEST_CASE("every change is audited in the same transaction") {
  Fixture f;
  REQUIRE(f.site->create(obj(Kind::catalog, "c", {}, "api"), "token:ops"));
  std::vector<storage::AuditEntry> entries;
  REQUIRE(f.repo->read([&](storage::Transaction& tx) -> common::Status {
    auto r = tx.list_audit({});
    if (!r) return r.error();
    entries = *r;
    return {};
  }));
  REQUIRE(entries.size() == 1);
  CHECK(entries[0].actor == "token:ops");
  CHECK(entries[0].action == "create");
  CHECK(entries[0].object == "c");
  CHECK(entries[0].before.empty());
  CHECK(entries[0].after.find("\"name\":\"c\"") != std::string::npos);
}

TEST_CASE("registration state resets at start") {
  Fixture f;
  REQUIRE(f.site->reconcile("/etc/b.toml", std::nullopt, declared_site(2)).has_value());
  REQUIRE(f.repo->write([&](storage::Transaction& tx) -> common::Status {
    auto m = tx.get(Kind::machine, "m1");
    if (!m) return m.error();
    m->fields["registration_state"] = std::string("Registered");
    m->fields["summary_state"] = std::string("Available");
    auto u = tx.update("m1", *m);
    if (!u) return u.error();
    return {};
  }));
  auto n = f.site->reset_registrations();
  REQUIRE(n.has_value());
  CHECK(*n == 1);
  CHECK(*f.site->reset_registrations() == 0);  // nothing left to reset: no write of the others
  CHECK(f.site->get(Kind::machine, "m1")->text("registration_state") == "Unregistered");
  auto counts = f.site->count_by(Kind::machine, "registration_state");
  REQUIRE(counts.has_value());
  CHECK((*counts)[0] == std::pair<std::string, std::int64_t>{"Unregistered", 2});
}
