#include "broker/engine.hpp"

#include "storage/repository.hpp"

#include <doctest/doctest.h>

using namespace common::model;
using broker::Engine;

namespace {

struct Fixture {
  std::unique_ptr<storage::Repository> repo;
  Engine engine;
  Fixture() {
    auto r = storage::open_sqlite({":memory:"});
    REQUIRE(r.has_value());
    repo = std::move(*r);
    write([](storage::Transaction& tx) {
      Object pool = make_default(Kind::catalog, "pool");
      create(tx, pool);
      Object rds = make_default(Kind::catalog, "rds");
      rds.fields["session_support"] = std::string("MultiSession");
      create(tx, rds);
      create(tx, make_default(Kind::delivery_group, "Pool"));
      for (int i = 1; i <= 3; ++i) create(tx, machine("DEMO\\pool-" + std::to_string(i), "pool", "Pool", true));
      create(tx, machine("DEMO\\rds-1", "rds", "Pool", true));
      create(tx, machine("DEMO\\spare", "pool", "", true));
    });
    REQUIRE(engine.load(*repo));
    repo->set_commit_observer([this](const std::vector<storage::Change>& c) { engine.apply(c); });
  }
  static Object machine(const std::string& name, const std::string& catalog, const std::string& group, bool registered) {
    Object m = make_default(Kind::machine, name);
    m.fields["catalog"] = catalog;
    if (!group.empty()) m.fields["delivery_group"] = group;
    m.fields["registration_state"] = std::string(registered ? "Registered" : "Unregistered");
    return m;
  }
  static void create(storage::Transaction& tx, const Object& o) { REQUIRE(tx.create(o).has_value()); }
  void write(const std::function<void(storage::Transaction&)>& fn) {
    REQUIRE(repo->write([&](storage::Transaction& tx) -> common::Status {
      fn(tx);
      return {};
    }));
  }
};

}  // namespace

TEST_CASE("engine: loaded once, then kept in step by the commit observer") {
  Fixture f;
  auto stats = f.engine.stats();
  CHECK(stats.machines == 5);
  CHECK(stats.catalogs == 2);
  CHECK(f.engine.machines_of_group("Pool").size() == 4);
  // Free desktops: registered single-session machines of the group without sessions.
  CHECK(f.engine.free_machines("Pool") == std::vector<std::string>{"DEMO\\pool-1", "DEMO\\pool-2", "DEMO\\pool-3"});
  REQUIRE(f.engine.machine("DEMO\\pool-1").has_value());
  CHECK(f.engine.machine("DEMO\\pool-1")->registration == broker::RegistrationState::registered);
  // Derived, not read from storage: a registered multi-session machine below full load.
  CHECK(broker::to_string(f.engine.machine("DEMO\\rds-1")->summary) == "Available");

  // A pending session takes pool-1; an assignment takes pool-2; maintenance takes pool-3.
  f.write([](storage::Transaction& tx) {
    Object s = make_default(Kind::session, "S1");
    s.fields["machine"] = std::string("DEMO\\pool-1");
    s.fields["user_name"] = std::string("DEMO\\alice");
    Fixture::create(tx, s);
    Object a = make_default(Kind::assignment, "");
    a.fields["machine"] = std::string("DEMO\\pool-2");
    a.fields["user"] = std::string("DEMO\\bob");
    Fixture::create(tx, a);
    Object m = *tx.get(Kind::machine, "DEMO\\pool-3");
    m.fields["in_maintenance_mode"] = true;
    REQUIRE(tx.update(m.name, m).has_value());
  });
  CHECK(f.engine.free_machines("Pool").empty());
  CHECK(f.engine.sessions_of_user("demo\\ALICE").size() == 1);  // users compare without case
  CHECK(f.engine.sessions_of_machine("DEMO\\pool-1").at(0).name == "S1");
  CHECK(f.engine.assignments_of_user("DEMO\\bob").at(0).machine == "DEMO\\pool-2");

  // A write that fails changes nothing in the engine.
  CHECK_FALSE(f.repo->write([](storage::Transaction& tx) -> common::Status {
    (void)tx.remove(Kind::session, "S1");
    return common::make_error(common::errc::conflict, "changed my mind");
  }));
  CHECK(f.engine.sessions_of_machine("DEMO\\pool-1").size() == 1);

  // The session logs off: pool-1 is free again, and no longer the user's live session.
  f.write([](storage::Transaction& tx) {
    Object s = *tx.get(Kind::session, "S1");
    s.fields["state"] = std::string("LoggedOff");
    REQUIRE(tx.update("S1", s).has_value());
  });
  CHECK(f.engine.free_machines("Pool") == std::vector<std::string>{"DEMO\\pool-1"});
  CHECK(f.engine.sessions_of_user("DEMO\\alice").empty());
  CHECK(f.engine.session("S1")->state == broker::SessionState::logged_off);

  // Removal and a rename of a referenced kind (the database cascades; the engine reloads).
  f.write([](storage::Transaction& tx) { REQUIRE(tx.remove(Kind::machine, "DEMO\\spare").has_value()); });
  CHECK_FALSE(f.engine.machine("DEMO\\spare").has_value());
  f.write([](storage::Transaction& tx) {
    Object g = *tx.get(Kind::delivery_group, "Pool");
    g.name = "Shared";
    REQUIRE(tx.update("Pool", g).has_value());
  });
  REQUIRE(f.engine.reload_if_needed(*f.repo));
  CHECK(f.engine.machines_of_group("Pool").empty());
  CHECK(f.engine.machines_of_group("Shared").size() == 4);
  CHECK(f.engine.machine("DEMO\\pool-1")->delivery_group == "Shared");
  CHECK(f.engine.stats().reloads == 2);
}

TEST_CASE("engine: multi-session hosts are indexed by effective load; a reservation bumps it, a report resets it") {
  Fixture f;
  f.write([](storage::Transaction& tx) {
    Object rds2 = *tx.get(Kind::machine, "DEMO\\rds-1");
    rds2.name = "DEMO\\rds-2";
    rds2.id = 0;
    Fixture::create(tx, rds2);
  });
  auto order = [&] {
    return f.engine.with_state([](const broker::SiteState& st) {
      std::vector<std::pair<std::int64_t, std::string>> out;
      if (auto h = st.hosts_by_load.find("Pool"); h != st.hosts_by_load.end()) out.assign(h->second.begin(), h->second.end());
      return out;
    });
  };
  using Entry = std::pair<std::int64_t, std::string>;
  CHECK(order() == std::vector<Entry>{{0, "DEMO\\rds-1"}, {0, "DEMO\\rds-2"}});
  CHECK(f.engine.set_load("DEMO\\rds-1", 3000, 3));
  CHECK(order() == std::vector<Entry>{{0, "DEMO\\rds-2"}, {3000, "DEMO\\rds-1"}});
  f.engine.with_state([](broker::SiteState& st) { st.reserve("DEMO\\rds-2"); });
  CHECK(order() == std::vector<Entry>{{500, "DEMO\\rds-2"}, {3000, "DEMO\\rds-1"}});
  CHECK(f.engine.set_load("DEMO\\rds-2", 100, 1));  // the agent's figure counts from now on
  CHECK(order() == std::vector<Entry>{{100, "DEMO\\rds-2"}, {3000, "DEMO\\rds-1"}});
  f.engine.with_state([](broker::SiteState& st) { st.release("DEMO\\rds-2", false); });
  CHECK(f.engine.unregistered("DEMO\\rds-1"));
  CHECK(order() == std::vector<Entry>{{100, "DEMO\\rds-2"}});
  f.write([](storage::Transaction& tx) {
    Object m = *tx.get(Kind::machine, "DEMO\\rds-2");
    m.fields["in_maintenance_mode"] = true;
    REQUIRE(tx.update(m.name, m).has_value());
  });
  CHECK(order().empty());
}

TEST_CASE("engine: sessions are found by (machine, agent key) in any state") {
  Fixture f;
  // A brokered session is stored under its own name; an agent's session "rdp-1" reported by two
  // machines is stored once bare and once as "<machine>/rdp-1" (broker/session_keys.hpp).
  f.write([](storage::Transaction& tx) {
    Object brokered = make_default(Kind::session, "S1");
    brokered.fields["machine"] = std::string("DEMO\\pool-1");
    Fixture::create(tx, brokered);
    Object bare = make_default(Kind::session, "rdp-1");
    bare.fields["machine"] = std::string("DEMO\\rds-1");
    bare.fields["session_key"] = std::string("rdp-1");
    Fixture::create(tx, bare);
    Object qualified = make_default(Kind::session, "DEMO\\pool-2/rdp-1");
    qualified.fields["machine"] = std::string("DEMO\\pool-2");
    qualified.fields["session_key"] = std::string("rdp-1");
    Fixture::create(tx, qualified);
  });
  CHECK(f.engine.session_name("DEMO\\pool-1", "S1") == "S1");
  CHECK(f.engine.session_name("DEMO\\rds-1", "rdp-1") == "rdp-1");
  CHECK(f.engine.session_name("DEMO\\pool-2", "rdp-1") == "DEMO\\pool-2/rdp-1");
  CHECK_FALSE(f.engine.session_name("DEMO\\pool-3", "rdp-1").has_value());
  CHECK_FALSE(f.engine.session_name("DEMO\\pool-2", "S1").has_value());

  // Logged off: still found (an agent reusing the key replaces the old record); removed: gone.
  f.write([](storage::Transaction& tx) {
    Object s = *tx.get(Kind::session, "rdp-1");
    s.fields["state"] = std::string("LoggedOff");
    REQUIRE(tx.update("rdp-1", s).has_value());
  });
  CHECK(f.engine.session_name("DEMO\\rds-1", "rdp-1") == "rdp-1");
  f.write([](storage::Transaction& tx) { REQUIRE(tx.remove(Kind::session, "DEMO\\pool-2/rdp-1").has_value()); });
  CHECK_FALSE(f.engine.session_name("DEMO\\pool-2", "rdp-1").has_value());
  CHECK(f.engine.session_name("DEMO\\rds-1", "rdp-1") == "rdp-1");
}
