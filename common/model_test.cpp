#include "common/model.hpp"
#include "common/model_json.hpp"

#include <boost/json.hpp>
#include <doctest/doctest.h>

using namespace common::model;

TEST_CASE("every kind has a spec, found by name, plural and table") {
  for (const auto& ks : all_kinds()) {
    CHECK(&spec(ks.kind) == &ks);
    CHECK(find_kind(ks.name) == &ks);
    CHECK(find_kind(ks.plural) == &ks);
    for (const auto& f : ks.fields)
      if (f.references) CHECK(static_cast<int>(*f.references) < static_cast<int>(ks.kind));  // dependency order
  }
  CHECK(find_kind("nonsense") == nullptr);
}

TEST_CASE("defaults validate, bad values are named") {
  Object m = make_default(Kind::machine, "desk-01");
  CHECK(validate_fields(m) == "catalog: is required");
  m.fields["catalog"] = std::string("cat");
  CHECK(validate_fields(m).empty());
  m.fields["power_state"] = std::string("Sideways");
  CHECK(validate_fields(m).find("power_state: 'Sideways' is not one of") == 0);
  m.fields["power_state"] = std::string("On");
  m.fields["load_index"] = std::int64_t{10001};
  CHECK(validate_fields(m) == "load_index: must be between 0 and 10000");
  m.fields["load_index"] = true;
  CHECK(validate_fields(m) == "load_index: must be a integer");
  Object bad = make_default(Kind::catalog, "a/b");
  CHECK(validate_fields(bad).find("name:") == 0);
}

TEST_CASE("JSON round trip hides secrets and refuses state fields") {
  Object u = make_default(Kind::user, "alice");
  u.fields["password_hash"] = std::string("pbkdf2-sha256$1$00$x");
  auto j = to_json(u);
  CHECK(!j.contains("password_hash"));
  CHECK(j.at("name").as_string() == "alice");

  Object m = make_default(Kind::machine, "m");
  auto in = boost::json::parse(R"({"catalog":"c","tags":["a","b"],"in_maintenance_mode":true})").as_object();
  REQUIRE(merge_json(in, m));
  CHECK(m.text("catalog") == "c");
  CHECK(m.list("tags") == TextList{"a", "b"});
  CHECK(m.flag("in_maintenance_mode"));

  auto state = boost::json::parse(R"({"registration_state":"Registered"})").as_object();
  auto r = merge_json(state, m);
  REQUIRE(!r);
  CHECK(r.error().field == "registration_state");
  auto wrong = boost::json::parse(R"({"tags":"a"})").as_object();
  CHECK(merge_json(wrong, m).error().message == "must be a list of strings");
  auto unknown = boost::json::parse(R"({"colour":"red"})").as_object();
  CHECK(merge_json(unknown, m).error().field == "colour");
}

TEST_CASE("same_declared_fields ignores state") {
  Object a = make_default(Kind::machine, "m");
  a.fields["catalog"] = std::string("c");
  Object b = a;
  b.fields["registration_state"] = std::string("Registered");
  CHECK(same_declared_fields(a, b));
  b.fields["tags"] = TextList{"x"};
  CHECK(!same_declared_fields(a, b));
}
