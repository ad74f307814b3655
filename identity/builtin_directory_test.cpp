#include "identity/builtin_directory.hpp"

#include "common/clock.hpp"
#include "common/crypto.hpp"
#include "storage/repository.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <initializer_list>
#include <optional>
#include <memory>
#include <thread>
#include <vector>

using namespace identity;
using namespace std::chrono_literals;
using common::model::Kind;
using common::model::Object;
using common::model::TextList;
using common::model::Value;

namespace {

constexpr int kIterations = 1000;  // fast hashes for tests

common::SysTime start_time() {
  common::SysTime t;
  REQUIRE(common::parse_time("2026-01-05T09:00:00Z", t));
  return t;
}

// Site settings for a fixture; each test changes what it needs.
struct SiteSettings {
  std::string default_domain = "DEMO";
  std::int64_t threshold = 3;
  std::int64_t window = 60;
  std::int64_t duration = 300;
  std::int64_t cache = 60;
};

// The repository as the directory sees it: counts its read transactions and can hide the change
// counts (a repository that does not count).
class SeenRepository final : public storage::Repository {
 public:
  SeenRepository(storage::Repository& inner, bool counted) : inner_(inner), counted_(counted) {}
  common::Status write(const std::function<common::Status(storage::Transaction&)>& fn) override {
    return inner_.write(fn);
  }
  common::Status read(const std::function<common::Status(storage::Transaction&)>& fn) override {
    ++reads;
    return inner_.read(fn);
  }
  common::Status ping() override { return inner_.ping(); }
  void set_commit_observer(storage::CommitObserver observer) override { inner_.set_commit_observer(std::move(observer)); }
  std::optional<std::uint64_t> change_count(Kind kind) const override {
    return counted_ ? inner_.change_count(kind) : std::nullopt;
  }
  storage::SchemaInfo schema() const override { return inner_.schema(); }
  void close() override { inner_.close(); }

  std::atomic<int> reads{0};

 private:
  storage::Repository& inner_;
  const bool counted_;
};

struct Fixture {
  std::unique_ptr<storage::Repository> repo;
  std::unique_ptr<SeenRepository> seen;  // what the directory uses
  common::ManualClock clock{start_time()};
  std::atomic<int> verifies{0};
  std::unique_ptr<BuiltinDirectory> dir;

  explicit Fixture(const SiteSettings& s = {}, const std::function<void(BuiltinDirectoryOptions&)>& tweak = {},
                   bool counted = true) {
    storage::SqliteOptions o;
    o.path = ":memory:";
    auto r = storage::open_sqlite(o);
    REQUIRE(r.has_value());
    repo = std::move(*r);

    Object site = common::model::make_default(Kind::site, "site");
    site.fields["default_domain"] = s.default_domain.empty() ? Value() : Value(s.default_domain);
    site.fields["lockout_threshold"] = s.threshold;
    site.fields["lockout_window_seconds"] = s.window;
    site.fields["lockout_duration_seconds"] = s.duration;
    site.fields["credential_cache_seconds"] = s.cache;
    create(site);

    BuiltinDirectoryOptions options;
    options.dummy_hash_iterations = kIterations;
    options.verify_password = [this](std::string_view pw, std::string_view enc) {
      ++verifies;
      return common::crypto::verify_password(pw, enc);
    };
    if (tweak) tweak(options);
    seen = std::make_unique<SeenRepository>(*repo, counted);
    dir = std::make_unique<BuiltinDirectory>(*seen, clock, options);
  }

  void create(const Object& obj) {
    auto st = repo->write([&](storage::Transaction& tx) -> common::Status {
      auto r = tx.create(obj);
      if (!r) return r.error();
      return {};
    });
    REQUIRE_MESSAGE(st.has_value(), st.error().describe());
  }

  void add_user(const std::string& name, const std::string& password,
                std::initializer_list<std::pair<const char*, Value>> fields = {}) {
    Object u = common::model::make_default(Kind::user, name);
    u.fields["domain"] = std::string("DEMO");
    u.fields["upn"] = name + "@demo.test";
    u.fields["display_name"] = "User " + name;
    u.fields["email"] = name + "@mail.demo.test";
    if (!password.empty()) u.fields["password_hash"] = common::crypto::hash_password(password, kIterations);
    for (const auto& [k, v] : fields) u.fields[k] = v;
    create(u);
  }

  void add_group(const std::string& name, TextList members,
                 std::initializer_list<std::pair<const char*, Value>> fields = {}) {
    Object g = common::model::make_default(Kind::group, name);
    g.fields["domain"] = std::string("DEMO");
    g.fields["members"] = std::move(members);
    for (const auto& [k, v] : fields) g.fields[k] = v;
    create(g);
  }

  // What an admin does through the admin API: change fields of a stored object.
  void change(Kind kind, const std::string& name, std::initializer_list<std::pair<const char*, Value>> fields) {
    auto st = repo->write([&](storage::Transaction& tx) -> common::Status {
      auto obj = tx.get(kind, name);
      if (!obj) return obj.error();
      for (const auto& [k, v] : fields) obj->fields[k] = v;
      auto r = tx.update(name, *obj);
      if (!r) return r.error();
      return {};
    });
    REQUIRE_MESSAGE(st.has_value(), st.error().describe());
  }

  Object get(Kind kind, const std::string& name) {
    Object out;
    auto st = repo->read([&](storage::Transaction& tx) -> common::Status {
      auto obj = tx.get(kind, name);
      if (!obj) return obj.error();
      out = std::move(*obj);
      return {};
    });
    REQUIRE(st.has_value());
    return out;
  }

  std::vector<storage::AuditEntry> audit(const std::string& object) {
    std::vector<storage::AuditEntry> out;
    storage::AuditQuery q;
    q.object = object;
    auto st = repo->read([&](storage::Transaction& tx) -> common::Status {
      auto r = tx.list_audit(q);
      if (!r) return r.error();
      out = std::move(*r);
      return {};
    });
    REQUIRE(st.has_value());
    return out;
  }

  AuthOutcome auth(const std::string& user, const std::string& password, const std::string& domain = {}) {
    auto r = dir->authenticate(Credentials{user, domain, password});
    REQUIRE_MESSAGE(r.has_value(), r.error().describe());
    return *r;
  }
  AuthResult result(const std::string& user, const std::string& password, const std::string& domain = {}) {
    return auth(user, password, domain).result;
  }
};

bool has(const std::vector<std::string>& list, const std::string& item) {
  for (const auto& e : list)
    if (e == item) return true;
  return false;
}

}  // namespace

TEST_CASE("every name form authenticates and yields the identity") {
  Fixture f;
  f.add_user("alice", "secret", {{"sid", std::string("S-1-5-21-9-1001")}});
  f.add_group("Domain Users", {"alice"});

  for (const auto& form : std::vector<std::pair<std::string, std::string>>{{"alice", ""},
                                                                           {"alice", "DEMO"},
                                                                           {"ALICE", "demo"},
                                                                           {"DEMO\\alice", ""},
                                                                           {"demo\\Alice", "IGNORED"},
                                                                           {"alice@demo.test", ""},
                                                                           {"Alice@Demo.TEST", "IGNORED"}}) {
    const std::string& name = form.first;
    const std::string& domain = form.second;
    CAPTURE(name);
    CAPTURE(domain);
    auto out = f.auth(name, "secret", domain);
    REQUIRE(out.result == AuthResult::ok);
    REQUIRE(out.identity.has_value());
    CHECK(out.identity->user_name == "alice");
    CHECK(out.identity->domain == "DEMO");
    CHECK(out.identity->qualified_name == "DEMO\\alice");
    CHECK(out.identity->upn == "alice@demo.test");
    CHECK(out.identity->sid == "S-1-5-21-9-1001");
    CHECK(out.identity->display_name == "User alice");
    CHECK(out.identity->email == "alice@mail.demo.test");
    CHECK(out.identity->groups == std::vector<std::string>{"DEMO\\Domain Users"});
  }

  // The domain must be the user's.
  CHECK(f.result("OTHER\\alice", "secret") == AuthResult::failed_credentials);
  CHECK(f.result("alice", "secret", "OTHER") == AuthResult::failed_credentials);
  CHECK(f.result("alice@other.test", "secret") == AuthResult::failed_credentials);
}

TEST_CASE("a user without a domain takes the site's default domain") {
  Fixture f;
  f.add_user("bob", "pw", {{"domain", Value()}});
  auto out = f.auth("DEMO\\bob", "pw");
  REQUIRE(out.result == AuthResult::ok);
  CHECK(out.identity->qualified_name == "DEMO\\bob");
  CHECK(f.result("OTHER\\bob", "pw") == AuthResult::failed_credentials);
}

TEST_CASE("without any domain the name stands alone") {
  SiteSettings s;
  s.default_domain = "";
  Fixture f(s);
  f.add_user("carol", "pw", {{"domain", Value()}});
  f.add_group("Readers", {"carol"}, {{"domain", Value()}});
  auto out = f.auth("carol", "pw");
  REQUIRE(out.result == AuthResult::ok);
  CHECK(out.identity->qualified_name == "carol");
  CHECK(out.identity->groups == std::vector<std::string>{"Readers"});
  CHECK(f.dir->in_any(*out.identity, {"readers"}));
  CHECK_FALSE(f.dir->in_any(*out.identity, {"DEMO\\Readers"}));
  CHECK(f.result("DEMO\\carol", "pw") == AuthResult::failed_credentials);
}

TEST_CASE("a wrong password and an unknown user look the same, and both spend a hash check") {
  Fixture f;
  f.add_user("alice", "secret");
  f.verifies = 0;
  auto wrong = f.auth("alice", "nope");
  CHECK(wrong.result == AuthResult::failed_credentials);
  CHECK_FALSE(wrong.identity.has_value());
  CHECK(f.verifies == 1);

  auto unknown = f.auth("mallory", "nope");
  CHECK(unknown.result == AuthResult::failed_credentials);
  CHECK_FALSE(unknown.identity.has_value());
  CHECK(f.verifies == 2);

  CHECK(f.result("", "nope") == AuthResult::failed_credentials);
  CHECK(f.result("alice", "") == AuthResult::failed_credentials);
  CHECK(f.verifies == 4);
}

TEST_CASE("a user without a password hash cannot log on with a password") {
  Fixture f;
  f.add_user("nopw", "");
  f.verifies = 0;
  CHECK(f.result("nopw", "") == AuthResult::failed_credentials);
  CHECK(f.result("nopw", "anything") == AuthResult::failed_credentials);
  CHECK(f.verifies == 2);  // against the dummy hash
}

TEST_CASE("disabled is told only to whoever knows the password") {
  Fixture f;
  f.add_user("dave", "pw", {{"disabled", true}});
  CHECK(f.result("dave", "pw") == AuthResult::account_disabled);
  CHECK_FALSE(f.auth("dave", "pw").identity.has_value());
  CHECK(f.result("dave", "wrong") == AuthResult::failed_credentials);
}

TEST_CASE("must change and expired passwords, with the identity") {
  Fixture f;
  f.add_user("erin", "pw", {{"must_change_password", true}});
  f.add_user("frank", "pw", {{"expired", true}});
  f.add_user("gina", "pw", {{"expired", true}, {"must_change_password", true}});

  auto erin = f.auth("erin", "pw");
  CHECK(erin.result == AuthResult::must_change_credentials);
  REQUIRE(erin.identity.has_value());
  CHECK(erin.identity->qualified_name == "DEMO\\erin");

  auto frank = f.auth("frank", "pw");
  CHECK(frank.result == AuthResult::expired_credentials);
  REQUIRE(frank.identity.has_value());

  CHECK(f.result("gina", "pw") == AuthResult::expired_credentials);
  CHECK(f.result("erin", "bad") == AuthResult::failed_credentials);
  CHECK(f.result("frank", "bad") == AuthResult::failed_credentials);
}

TEST_CASE("N failures within the window lock the user out, in storage") {
  Fixture f;  // threshold 3, window 60 s, duration 300 s
  f.add_user("alice", "secret");
  CHECK(f.result("alice", "x1") == AuthResult::failed_credentials);
  f.clock.advance(10s);
  CHECK(f.result("DEMO\\alice", "x2") == AuthResult::failed_credentials);  // every name form counts
  f.clock.advance(10s);
  CHECK(f.result("alice@demo.test", "x3") == AuthResult::failed_credentials);

  Object stored = f.get(Kind::user, "alice");
  CHECK(stored.flag("locked_out"));
  CHECK(stored.text("locked_out_until") == common::format_time(f.clock.now() + 300s));
  auto audit = f.audit("alice");
  REQUIRE_FALSE(audit.empty());
  CHECK(audit.front().action == "lock-out");
  CHECK(audit.front().actor == "broker");
  CHECK(audit.front().after.find("secret") == std::string::npos);

  // The right password does not help, is not checked, and does not extend the lock-out.
  f.verifies = 0;
  f.clock.advance(100s);
  CHECK(f.result("alice", "secret") == AuthResult::account_locked_out);
  CHECK(f.result("alice", "wrong") == AuthResult::account_locked_out);
  CHECK(f.verifies == 0);
  CHECK(f.get(Kind::user, "alice").text("locked_out_until") == stored.text("locked_out_until"));
}

TEST_CASE("failures spread beyond the window do not lock") {
  Fixture f;
  f.add_user("alice", "secret");
  CHECK(f.result("alice", "x") == AuthResult::failed_credentials);  // t=0
  f.clock.advance(30s);
  CHECK(f.result("alice", "x") == AuthResult::failed_credentials);  // t=30
  f.clock.advance(31s);
  CHECK(f.result("alice", "x") == AuthResult::failed_credentials);  // t=61: the first has left the window
  CHECK_FALSE(f.get(Kind::user, "alice").flag("locked_out"));
  CHECK(f.result("alice", "secret") == AuthResult::ok);

  // A success resets the count.
  CHECK(f.result("alice", "x") == AuthResult::failed_credentials);
  CHECK(f.result("alice", "x") == AuthResult::failed_credentials);
  CHECK(f.result("alice", "secret") == AuthResult::ok);
  CHECK(f.result("alice", "x") == AuthResult::failed_credentials);
  CHECK(f.result("alice", "x") == AuthResult::failed_credentials);
  CHECK_FALSE(f.get(Kind::user, "alice").flag("locked_out"));
  CHECK(f.result("alice", "x") == AuthResult::failed_credentials);
  CHECK(f.get(Kind::user, "alice").flag("locked_out"));
}

TEST_CASE("an automatic lock-out ends with the clock and is cleared in storage") {
  Fixture f;
  f.add_user("alice", "secret");
  for (int i = 0; i < 3; ++i) CHECK(f.result("alice", "x") == AuthResult::failed_credentials);
  f.clock.advance(299s);
  CHECK(f.result("alice", "secret") == AuthResult::account_locked_out);
  f.clock.advance(1s);
  CHECK(f.result("alice", "secret") == AuthResult::ok);
  Object stored = f.get(Kind::user, "alice");
  CHECK_FALSE(stored.flag("locked_out"));
  CHECK(stored.is_null("locked_out_until"));
  CHECK(f.audit("alice").front().action == "unlock");

  // A fresh count after the unlock.
  CHECK(f.result("alice", "x") == AuthResult::failed_credentials);
  CHECK(f.result("alice", "secret") == AuthResult::ok);
}

TEST_CASE("a lock-out of duration 0 lasts until an admin clears it") {
  SiteSettings s;
  s.duration = 0;
  Fixture f(s);
  f.add_user("alice", "secret");
  for (int i = 0; i < 3; ++i) CHECK(f.result("alice", "x") == AuthResult::failed_credentials);
  Object stored = f.get(Kind::user, "alice");
  CHECK(stored.flag("locked_out"));
  CHECK(stored.is_null("locked_out_until"));

  f.clock.advance(24h * 30);
  CHECK(f.result("alice", "secret") == AuthResult::account_locked_out);

  f.change(Kind::user, "alice", {{"locked_out", false}});
  CHECK(f.result("alice", "secret") == AuthResult::ok);
}

TEST_CASE("an admin's lock-out applies at once, and a threshold of 0 never locks") {
  SiteSettings s;
  s.threshold = 0;
  Fixture f(s);
  f.add_user("alice", "secret");
  for (int i = 0; i < 20; ++i) CHECK(f.result("alice", "x") == AuthResult::failed_credentials);
  CHECK(f.result("alice", "secret") == AuthResult::ok);

  f.change(Kind::user, "alice", {{"locked_out", true}});
  CHECK(f.result("alice", "secret") == AuthResult::account_locked_out);

  // Disabled wins over locked out (the password is checked for that).
  f.change(Kind::user, "alice", {{"disabled", true}});
  CHECK(f.result("alice", "secret") == AuthResult::account_disabled);
  CHECK(f.result("alice", "x") == AuthResult::failed_credentials);
}

TEST_CASE("unknown names lock out like real users") {
  Fixture f;
  f.add_user("alice", "secret");
  for (int i = 0; i < 3; ++i) {
    CHECK(f.result("alice", "x") == AuthResult::failed_credentials);
    CHECK(f.result("nobody", "x") == AuthResult::failed_credentials);
  }
  CHECK(f.result("alice", "x") == AuthResult::account_locked_out);
  CHECK(f.result("NOBODY", "x") == AuthResult::account_locked_out);
  f.clock.advance(300s);
  CHECK(f.result("alice", "x") == AuthResult::failed_credentials);
  CHECK(f.result("nobody", "x") == AuthResult::failed_credentials);
}

TEST_CASE("a successful check is cached, bound to the stored hash and flags") {
  Fixture f;  // cache 60 s
  f.add_user("alice", "secret");
  f.verifies = 0;
  CHECK(f.result("alice", "secret") == AuthResult::ok);
  CHECK(f.verifies == 1);
  CHECK(f.result("alice", "secret") == AuthResult::ok);
  CHECK(f.result("DEMO\\alice", "secret") == AuthResult::ok);
  CHECK(f.result("alice@demo.test", "secret") == AuthResult::ok);
  CHECK(f.verifies == 1);
  CHECK(f.dir->cached_entries() == 1);

  // A wrong password is never answered from the cache.
  CHECK(f.result("alice", "Secret") == AuthResult::failed_credentials);
  CHECK(f.verifies == 2);

  // The entry lives for credential_cache_seconds from the real check, hits do not extend it.
  f.clock.advance(59s);
  CHECK(f.result("alice", "secret") == AuthResult::ok);
  CHECK(f.verifies == 2);
  f.clock.advance(1s);
  CHECK(f.result("alice", "secret") == AuthResult::ok);
  CHECK(f.verifies == 3);

  // A password change in storage: the old password fails at once, the new one works.
  f.change(Kind::user, "alice", {{"password_hash", common::crypto::hash_password("changed", kIterations)}});
  CHECK(f.result("alice", "secret") == AuthResult::failed_credentials);
  CHECK(f.verifies == 4);
  CHECK(f.result("alice", "changed") == AuthResult::ok);
  CHECK(f.result("alice", "changed") == AuthResult::ok);
  CHECK(f.verifies == 5);

  // Flags are read at every call: disable and lock-out apply at once.
  f.change(Kind::user, "alice", {{"disabled", true}});
  CHECK(f.result("alice", "changed") == AuthResult::account_disabled);
  f.change(Kind::user, "alice", {{"disabled", false}, {"locked_out", true}});
  CHECK(f.result("alice", "changed") == AuthResult::account_locked_out);
  f.change(Kind::user, "alice", {{"locked_out", false}});
  f.verifies = 0;
  CHECK(f.result("alice", "changed") == AuthResult::ok);
  CHECK(f.verifies == 1);  // the lock-out dropped the entry

  // forget() drops it too.
  CHECK(f.result("alice", "changed") == AuthResult::ok);
  CHECK(f.verifies == 1);
  f.dir->forget("DEMO\\ALICE");
  CHECK(f.dir->cached_entries() == 0);
  CHECK(f.result("alice", "changed") == AuthResult::ok);
  CHECK(f.verifies == 2);
}

TEST_CASE("a cache lifetime of 0 checks every time") {
  SiteSettings s;
  s.cache = 0;
  Fixture f(s);
  f.add_user("alice", "secret");
  f.verifies = 0;
  for (int i = 0; i < 3; ++i) CHECK(f.result("alice", "secret") == AuthResult::ok);
  CHECK(f.verifies == 3);
  CHECK(f.dir->cached_entries() == 0);
}

TEST_CASE("nested groups resolve transitively and rules match them") {
  Fixture f;
  f.add_user("alice", "pw", {{"sid", std::string("S-1-5-21-9-1001")}});
  f.add_user("bob", "pw");
  f.add_group("Domain Users", {"alice", "bob"}, {{"sid", std::string("S-1-5-21-9-513")}});
  f.add_group("Finance", {"DEMO\\alice"});
  f.add_group("Staff", {"Finance"});
  f.add_group("Everyone Here", {"demo\\staff"});
  f.add_group("Elsewhere", {"OTHER\\alice"});  // another domain's alice
  f.add_group("By UPN", {"ALICE@demo.test"});
  f.add_group("By SID", {"S-1-5-21-9-1001"});
  f.add_group("Partners", {"bob"}, {{"domain", std::string("PARTNER")}});

  auto alice = f.auth("alice", "pw");
  REQUIRE(alice.result == AuthResult::ok);
  const UserIdentity& a = *alice.identity;
  CHECK(a.groups == std::vector<std::string>{"DEMO\\By SID", "DEMO\\By UPN", "DEMO\\Domain Users",
                                             "DEMO\\Everyone Here", "DEMO\\Finance", "DEMO\\Staff"});
  CHECK(a.group_sids == std::vector<std::string>{"S-1-5-21-9-513"});

  CHECK(f.dir->in_any(a, {"Staff"}));
  CHECK(f.dir->in_any(a, {"DEMO\\Staff"}));
  CHECK(f.dir->in_any(a, {"demo\\STAFF"}));
  CHECK(f.dir->in_any(a, {"everyone here"}));
  CHECK(f.dir->in_any(a, {"bob", "DEMO\\alice"}));
  CHECK(f.dir->in_any(a, {"S-1-5-21-9-513"}));
  CHECK_FALSE(f.dir->in_any(a, {"OTHER\\Staff"}));
  CHECK_FALSE(f.dir->in_any(a, {"Elsewhere", "Partners", "bob"}));
  CHECK_FALSE(f.dir->in_any(a, {}));

  auto bob = f.auth("bob", "pw");
  REQUIRE(bob.result == AuthResult::ok);
  CHECK(bob.identity->groups == std::vector<std::string>{"DEMO\\Domain Users", "PARTNER\\Partners"});
  CHECK_FALSE(f.dir->in_any(*bob.identity, {"Staff"}));
  CHECK(f.dir->in_any(*bob.identity, {"partner\\partners"}));
}

TEST_CASE("group cycles terminate") {
  Fixture f;
  f.add_user("alice", "pw");
  f.add_group("A", {"alice", "B"});
  f.add_group("B", {"A", "C"});
  f.add_group("C", {"B", "C", "A"});
  f.add_group("Self", {"Self", "alice"});
  f.add_group("Outside", {"Outside"});

  auto out = f.auth("alice", "pw");
  REQUIRE(out.result == AuthResult::ok);
  CHECK(out.identity->groups == std::vector<std::string>{"DEMO\\A", "DEMO\\B", "DEMO\\C", "DEMO\\Self"});
  CHECK_FALSE(f.dir->in_any(*out.identity, {"Outside"}));
}

TEST_CASE("trusted look-up: no password, same flags") {
  Fixture f;
  f.add_user("alice", "pw", {{"sid", std::string("S-1-5-21-9-1001")}});
  f.add_user("dave", "pw", {{"disabled", true}});
  f.add_user("erin", "pw", {{"locked_out", true}});
  f.add_user("frank", "pw", {{"expired", true}});
  f.add_user("gina", "pw", {{"must_change_password", true}});
  f.add_group("Finance", {"alice"});
  f.verifies = 0;

  for (const auto& form : std::vector<std::pair<std::string, std::string>>{
           {"alice", ""}, {"Alice", "demo"}, {"DEMO\\alice", ""}, {"alice@demo.test", ""}, {"s-1-5-21-9-1001", ""}}) {
    const std::string& name = form.first;
    const std::string& domain = form.second;
    CAPTURE(name);
    auto r = f.dir->lookup(name, domain);
    REQUIRE(r.has_value());
    CHECK(r->result == AuthResult::ok);
    REQUIRE(r->identity.has_value());
    CHECK(r->identity->qualified_name == "DEMO\\alice");
    CHECK(has(r->identity->groups, "DEMO\\Finance"));
  }

  auto missing = f.dir->lookup("mallory", "");
  REQUIRE_FALSE(missing.has_value());
  CHECK(missing.error().code == common::errc::not_found);
  CHECK_FALSE(f.dir->lookup("OTHER\\alice", "").has_value());

  CHECK(f.dir->lookup("dave", "")->result == AuthResult::account_disabled);
  CHECK(f.dir->lookup("erin", "")->result == AuthResult::account_locked_out);
  auto frank = f.dir->lookup("frank", "");
  CHECK(frank->result == AuthResult::expired_credentials);
  CHECK(frank->identity.has_value());
  auto gina = f.dir->lookup("gina", "");
  CHECK(gina->result == AuthResult::must_change_credentials);
  CHECK(gina->identity.has_value());
  CHECK(f.verifies == 0);

  // An automatic lock-out that has run out is cleared by a look-up too.
  f.change(Kind::user, "erin", {{"locked_out_until", common::format_time(f.clock.now() + 10s)}});
  CHECK(f.dir->lookup("erin", "")->result == AuthResult::account_locked_out);
  f.clock.advance(10s);
  CHECK(f.dir->lookup("erin", "")->result == AuthResult::ok);
  CHECK_FALSE(f.get(Kind::user, "erin").flag("locked_out"));
}

TEST_CASE("without a site object the defaults apply") {
  storage::SqliteOptions o;
  o.path = ":memory:";
  auto repo = storage::open_sqlite(o);
  REQUIRE(repo.has_value());
  common::ManualClock clock{start_time()};
  BuiltinDirectoryOptions options;
  options.dummy_hash_iterations = kIterations;
  BuiltinDirectory dir(**repo, clock, options);
  Object u = common::model::make_default(Kind::user, "alice");
  u.fields["password_hash"] = common::crypto::hash_password("pw", kIterations);
  REQUIRE((*repo)
              ->write([&](storage::Transaction& tx) -> common::Status {
                auto r = tx.create(u);
                if (!r) return r.error();
                return {};
              })
              .has_value());

  auto ok = dir.authenticate({"alice", "", "pw"});
  REQUIRE(ok.has_value());
  CHECK(ok->result == AuthResult::ok);
  CHECK(ok->identity->qualified_name == "alice");
  for (int i = 0; i < 5; ++i) CHECK(dir.authenticate({"alice", "", "x"})->result == AuthResult::failed_credentials);
  CHECK(dir.authenticate({"alice", "", "pw"})->result == AuthResult::account_locked_out);  // default threshold 5
}

TEST_CASE("concurrent checks are safe") {
  Fixture f;
  f.add_user("alice", "secret");
  f.add_user("bob", "secret");
  std::atomic<int> oks{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i) {
        auto r = f.dir->authenticate({t % 2 ? "alice" : "bob", "", "secret"});
        if (r && r->result == AuthResult::ok) ++oks;
        if (i % 5 == 0) f.dir->forget("alice");
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(oks == 80);
}

TEST_CASE("unknown names are tracked in bounded bytes, whatever their length") {
  // Before: each failed unknown name was kept as sent, so 300 names of 900 KB held 270 MB.
  Fixture f({}, [](BuiltinDirectoryOptions& o) { o.max_unknown_bytes = 16 * 1024; });
  f.add_user("alice", "secret");
  for (int i = 0; i < 300; ++i) {
    const std::string name = std::to_string(i) + std::string(100 * 1024, 'x');
    CHECK(f.result(name, "x") == AuthResult::failed_credentials);
    CHECK(f.dir->unknown_bytes() <= 16 * 1024);
  }
  CHECK(f.dir->unknown_entries() > 0);
  CHECK(f.dir->unknown_entries() < 300);
  // Lock-out of a long unknown name still works (it is tracked by digest).
  const std::string longest(200 * 1024, 'y');
  for (int i = 0; i < 3; ++i) CHECK(f.result(longest, "x") == AuthResult::failed_credentials);
  CHECK(f.result(longest, "x") == AuthResult::account_locked_out);
  CHECK(f.result("alice", "secret") == AuthResult::ok);
}

TEST_CASE("the entry bound still holds for unknown names") {
  Fixture f({}, [](BuiltinDirectoryOptions& o) { o.max_unknown_names = 10; });
  for (int i = 0; i < 50; ++i) CHECK(f.result("ghost" + std::to_string(i), "x") == AuthResult::failed_credentials);
  CHECK(f.dir->unknown_entries() <= 10);
}

namespace {

// A pool of one thread that the test can hold busy.
struct HeldPool {
  PasswordCheckPool pool;
  std::promise<void> release;
  explicit HeldPool(std::size_t max_queued = 4)
      : pool([&] {
          PasswordCheckOptions o;
          o.threads = 1;
          o.max_queued = max_queued;
          o.max_wait = std::chrono::hours(1);
          return o;
        }()) {}
  void hold() {
    std::promise<void> started;
    pool.submit(
        [this, &started, gate = release.get_future().share()] {
          started.set_value();
          gate.wait();
        },
        [](PasswordCheckPool::Refusal) {});
    started.get_future().wait();
  }
};

// authenticate_async, with the outcome once it is there.
struct AsyncResult {
  std::promise<common::Result<AuthOutcome>> promise;
  std::future<common::Result<AuthOutcome>> future = promise.get_future();
  bool ready() { return future.wait_for(0s) == std::future_status::ready; }
};
void start(Fixture& f, const std::string& user, const std::string& password, AsyncResult& out) {
  f.dir->authenticate_async(Credentials{user, {}, password},
                            [&out](common::Result<AuthOutcome> r) { out.promise.set_value(std::move(r)); });
}

}  // namespace

TEST_CASE("authenticate_async hashes on the pool; a cached success or a lock-out needs no hash") {
  HeldPool held;
  Fixture f({}, [&](BuiltinDirectoryOptions& o) { o.password_checks = &held.pool; });
  f.add_user("alice", "secret");
  f.add_user("bob", "pw", {{"locked_out", true}});
  CHECK(f.result("alice", "secret") == AuthResult::ok);  // synchronous: fills the cache

  held.hold();  // every hashing thread is busy from now on
  AsyncResult cached, locked, wrong, unknown;
  start(f, "alice", "secret", cached);
  start(f, "bob", "pw", locked);
  REQUIRE(cached.ready());  // answered on this thread, without waiting for the pool
  REQUIRE(locked.ready());
  CHECK(cached.future.get()->result == AuthResult::ok);
  CHECK(locked.future.get()->result == AuthResult::account_locked_out);

  start(f, "alice", "wrong", wrong);
  start(f, "nobody", "x", unknown);
  CHECK_FALSE(wrong.ready());  // waiting for a hashing thread
  CHECK_FALSE(unknown.ready());
  held.release.set_value();
  CHECK(wrong.future.get()->result == AuthResult::failed_credentials);
  CHECK(unknown.future.get()->result == AuthResult::failed_credentials);
}

TEST_CASE("authenticate_async: a full queue is errc::unavailable; resume runs the rest") {
  HeldPool held(1);
  std::atomic<int> resumed{0};
  Fixture f({}, [&](BuiltinDirectoryOptions& o) {
    o.password_checks = &held.pool;
    o.resume = [&](std::function<void()> task) {
      ++resumed;
      task();
      return true;
    };
  });
  f.add_user("alice", "secret");
  held.hold();
  AsyncResult queued, refused;
  start(f, "alice", "secret", queued);
  start(f, "alice", "secret", refused);
  REQUIRE(refused.ready());
  auto r = refused.future.get();
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == common::errc::unavailable);
  held.release.set_value();
  auto ok = queued.future.get();
  REQUIRE(ok.has_value());
  CHECK(ok->result == AuthResult::ok);
  CHECK(ok->identity->qualified_name == "DEMO\\alice");
  CHECK(resumed == 1);
}

TEST_CASE("nothing is read while nothing changed; a user, group or site change applies at the next call") {
  Fixture f;
  f.add_user("alice", "pw", {{"sid", std::string("S-1-5-21-9-1001")}});
  f.add_user("bob", "pw");
  f.add_group("Finance", {"alice"});
  const auto groups_of = [&](const std::string& name) {
    auto r = f.dir->lookup(name, "");
    REQUIRE(r.has_value());
    REQUIRE(r->identity.has_value());
    return r->identity->groups;
  };
  CHECK(groups_of("alice") == std::vector<std::string>{"DEMO\\Finance"});
  CHECK(groups_of("ALICE") == std::vector<std::string>{"DEMO\\Finance"});
  CHECK(groups_of("s-1-5-21-9-1001") == std::vector<std::string>{"DEMO\\Finance"});
  CHECK(groups_of("bob").empty());
  CHECK(f.dir->lookup("mallory", "").error().code == common::errc::not_found);
  CHECK(f.result("alice", "pw") == AuthResult::ok);
  const int reads = f.seen->reads;
  CHECK(f.dir->index_reads() == 2);  // the group index, and the name index (for ALICE and the SID)
  for (int i = 0; i < 20; ++i) {  // the clock does not matter
    f.clock.advance(1h);
    CHECK(groups_of("alice") == std::vector<std::string>{"DEMO\\Finance"});
    CHECK(groups_of("ALICE") == std::vector<std::string>{"DEMO\\Finance"});
    CHECK(groups_of("s-1-5-21-9-1001") == std::vector<std::string>{"DEMO\\Finance"});
    CHECK(groups_of("bob").empty());
    CHECK(f.dir->lookup("mallory", "").error().code == common::errc::not_found);
    CHECK(f.result("alice", "pw") == AuthResult::ok);  // a cached success
  }
  CHECK(f.seen->reads == reads);  // no storage read at all
  CHECK(f.dir->index_reads() == 2);

  // A membership change: the next call sees it.
  f.change(Kind::group, "Finance", {{"members", TextList{"alice", "bob"}}});
  CHECK(groups_of("bob") == std::vector<std::string>{"DEMO\\Finance"});
  f.add_group("Staff", {"Finance"});
  CHECK(groups_of("bob") == std::vector<std::string>{"DEMO\\Finance", "DEMO\\Staff"});
  // User changes: a new user under any spelling, a disable, a new password, a removal.
  f.add_user("carol", "pw");
  CHECK(f.dir->lookup("Carol", "")->result == AuthResult::ok);
  f.change(Kind::user, "carol", {{"disabled", true}});
  CHECK(f.dir->lookup("carol", "")->result == AuthResult::account_disabled);
  f.change(Kind::user, "alice", {{"password_hash", common::crypto::hash_password("new", kIterations)}});
  CHECK(f.result("alice", "pw") == AuthResult::failed_credentials);
  CHECK(f.result("alice", "new") == AuthResult::ok);
  auto st = f.repo->write([](storage::Transaction& tx) { return tx.remove(Kind::user, "bob"); });
  REQUIRE(st.has_value());
  CHECK(f.dir->lookup("bob", "").error().code == common::errc::not_found);
  // A site change: the default domain (of a user without a domain of its own).
  f.add_user("dora", "pw");
  f.change(Kind::user, "dora", {{"domain", Value()}});
  CHECK(f.dir->lookup("dora", "")->identity->qualified_name == "DEMO\\dora");
  f.change(Kind::site, "site", {{"default_domain", std::string("CORP")}});
  CHECK(f.dir->lookup("dora", "")->identity->qualified_name == "CORP\\dora");
}

TEST_CASE("a repository that does not count: rows at every call, indexes once per index_ttl") {
  Fixture f({}, {}, false);
  f.add_user("alice", "pw", {{"sid", std::string("S-1-5-21-9-1001")}});
  f.add_user("bob", "pw");
  f.add_group("Finance", {"alice"});
  const auto groups_of = [&](const std::string& name) {
    auto r = f.dir->lookup(name, "");
    REQUIRE(r.has_value());
    REQUIRE(r->identity.has_value());
    return r->identity->groups;
  };

  for (int i = 0; i < 20; ++i) {
    CHECK(groups_of("alice") == std::vector<std::string>{"DEMO\\Finance"});
    CHECK(groups_of("bob").empty());
  }
  CHECK(f.dir->index_reads() == 1);  // the group index; exact names need no name index
  CHECK(f.dir->cached_users() == 0);
  for (int i = 0; i < 20; ++i) {
    CHECK(groups_of("ALICE") == std::vector<std::string>{"DEMO\\Finance"});
    CHECK(groups_of("s-1-5-21-9-1001") == std::vector<std::string>{"DEMO\\Finance"});
    CHECK(f.dir->lookup("mallory", "").error().code == common::errc::not_found);
  }
  CHECK(f.dir->index_reads() == 2);  // and the name index, once

  // A membership change reaches identities once the index is older than index_ttl (5 s)...
  f.change(Kind::group, "Finance", {{"members", TextList{"alice", "bob"}}});
  f.clock.advance(4s);
  CHECK(groups_of("bob").empty());
  f.clock.advance(1s);
  CHECK(groups_of("bob") == std::vector<std::string>{"DEMO\\Finance"});
  // ... or at once after invalidate_indexes().
  f.add_group("Staff", {"Finance"});
  f.dir->invalidate_indexes();
  CHECK(groups_of("bob") == std::vector<std::string>{"DEMO\\Finance", "DEMO\\Staff"});

  // A new user is found at once by its exact name, by another spelling once the name index is
  // read again; user flags are read at every call.
  CHECK(f.dir->lookup("BOB", "")->result == AuthResult::ok);  // the name index is read here
  f.add_user("carol", "pw");
  CHECK(f.dir->lookup("carol", "")->result == AuthResult::ok);
  f.clock.advance(5s);
  CHECK(f.dir->lookup("Carol", "")->result == AuthResult::ok);
  f.change(Kind::user, "carol", {{"disabled", true}});
  CHECK(f.dir->lookup("Carol", "")->result == AuthResult::account_disabled);
}

TEST_CASE("index_ttl 0 reads the indexes at every call") {
  Fixture f({}, [](BuiltinDirectoryOptions& o) { o.index_ttl = 0s; }, false);
  f.add_user("alice", "pw");
  f.add_group("Finance", {"alice"});
  CHECK(f.dir->lookup("alice", "")->identity->groups == std::vector<std::string>{"DEMO\\Finance"});
  f.change(Kind::group, "Finance", {{"members", TextList{"bob"}}});
  CHECK(f.dir->lookup("alice", "")->identity->groups.empty());
  CHECK(f.dir->index_reads() == 2);
}

TEST_CASE("the row cache is bounded") {
  Fixture f({}, [](BuiltinDirectoryOptions& o) { o.max_cached_users = 10; });
  f.add_user("alice", "pw");
  for (int i = 0; i < 50; ++i) (void)f.dir->lookup("nobody" + std::to_string(i), "");
  CHECK(f.dir->cached_users() <= 10);
  CHECK(f.dir->lookup("alice", "")->result == AuthResult::ok);
}

TEST_CASE("lock-outs follow the monotonic clock: setting the wall clock back does not lengthen them, forwards only shortens") {
  Fixture f;  // threshold 3, window 60 s, duration 300 s
  f.add_user("alice", "secret");
  f.add_user("bob", "secret");
  f.add_user("carol", "secret");
  for (int i = 0; i < 3; ++i) CHECK(f.result("alice", "x") == AuthResult::failed_credentials);
  CHECK(f.result("alice", "secret") == AuthResult::account_locked_out);
  f.clock.jump(-1h);  // the wall clock is set back an hour
  f.clock.advance(299s);
  CHECK(f.result("alice", "secret") == AuthResult::account_locked_out);
  f.clock.advance(1s);  // 300 s after the lock-out by the monotonic clock: over
  CHECK(f.result("alice", "secret") == AuthResult::ok);

  // The failure window too: two failures, the clock set back, 61 s: they have left the window.
  for (int i = 0; i < 2; ++i) CHECK(f.result("bob", "x") == AuthResult::failed_credentials);
  f.clock.jump(-1h);
  f.clock.advance(61s);
  CHECK(f.result("bob", "x") == AuthResult::failed_credentials);
  CHECK(f.result("bob", "secret") == AuthResult::ok);

  // Unknown names (kept in memory) alike.
  for (int i = 0; i < 3; ++i) CHECK(f.result("nobody", "x") == AuthResult::failed_credentials);
  CHECK(f.result("nobody", "x") == AuthResult::account_locked_out);
  f.clock.jump(-1h);
  f.clock.advance(300s);
  CHECK(f.result("nobody", "x") == AuthResult::failed_credentials);

  // A jump forwards past the end of a lock-out ends it (the wall clock was set back 3 h above:
  // it jumps 1 h past the monotonic reading).
  for (int i = 0; i < 3; ++i) CHECK(f.result("carol", "x") == AuthResult::failed_credentials);
  CHECK(f.result("carol", "secret") == AuthResult::account_locked_out);
  f.clock.jump(4h);
  CHECK(f.result("carol", "secret") == AuthResult::ok);
}
