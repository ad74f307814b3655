#include "config/config.hpp"

#include "common/crypto.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using common::model::Kind;
using common::model::Object;

const std::string kSourceDir = OPENBROKER_SOURCE_DIR;

// The smallest valid file; appended after each test's own lines so their line numbers start at 1.
const std::string kTail = R"(
[database]
path = ":memory:"
[[admin.token]]
name = "t"
sha256 = "e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f"
)";

config::LoadResult load(const std::string& text) { return config::load_string(text + kTail, "t.toml", "/base"); }

std::string all_errors(const config::LoadResult& r) {
  std::string out;
  for (const auto& e : r.errors) out += e.describe() + "\n";
  return out;
}

// The one error of a result (fails the test when there are none or several).
config::ConfigError only_error(const config::LoadResult& r) {
  INFO(all_errors(r));
  REQUIRE(r.errors.size() == 1);
  CHECK(!r.config);
  return r.errors.front();
}

std::vector<const Object*> of_kind(const config::Config& c, Kind k) {
  std::vector<const Object*> out;
  for (const auto& o : c.objects)
    if (o.kind == k) out.push_back(&o);
  return out;
}

const Object* named(const config::Config& c, Kind k, const std::string& name) {
  for (const auto& o : c.objects)
    if (o.kind == k && o.name == name) return &o;
  return nullptr;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

TEST_CASE("the example file loads and keeps the documented defaults") {
  const auto r = config::load_file(kSourceDir + "/config/brokerd.example.toml");
  INFO(all_errors(r));
  REQUIRE(r.errors.empty());
  REQUIRE(r.config);
  const config::Config& c = *r.config;
  const config::Config defaults;
  const config::Listener listener;
  CHECK(c.io_threads == defaults.io_threads);
  CHECK(c.worker_threads == defaults.worker_threads);
  CHECK(c.shutdown_grace_seconds == defaults.shutdown_grace_seconds);
  CHECK(c.xml.port == 8080);
  CHECK(c.agent.port == 8081);
  CHECK(c.admin.port == 8082);
  CHECK(c.xml.header_limit_bytes == listener.header_limit_bytes);
  CHECK(c.xml.body_limit_bytes == listener.body_limit_bytes);
  CHECK(c.xml.read_timeout_seconds == listener.read_timeout_seconds);
  CHECK(c.xml.idle_timeout_seconds == listener.idle_timeout_seconds);
  CHECK(c.database_busy_timeout_ms == defaults.database_busy_timeout_ms);
  CHECK(c.log.level == "info");
  CHECK(c.log.format == "text");
  CHECK(c.log.file.empty());
  CHECK(c.admin_tokens.size() == 1);
  CHECK(c.admin_tokens[0].sha256 == common::crypto::sha256_hex("change-me"));
  CHECK(c.sta.enabled == defaults.sta.enabled);
  CHECK(c.sta.authority_id.empty());
  CHECK(c.sta.ticket_lifetime_seconds == defaults.sta.ticket_lifetime_seconds);
  CHECK(c.sta.max_tickets == defaults.sta.max_tickets);
  CHECK(c.sta.allowed_clients == defaults.sta.allowed_clients);
  CHECK(c.sta.max_bytes == defaults.sta.max_bytes);
  CHECK(c.sta.max_tickets_per_client == defaults.sta.max_tickets_per_client);
  CHECK(c.sta.max_bytes_per_client == defaults.sta.max_bytes_per_client);
  CHECK(c.identity.password_check_threads == defaults.identity.password_check_threads);
  CHECK(c.identity.password_check_queue == defaults.identity.password_check_queue);
  CHECK(c.identity.password_check_max_wait_ms == defaults.identity.password_check_max_wait_ms);
  CHECK(c.xml_service.failed_logons_per_minute == defaults.xml_service.failed_logons_per_minute);
  REQUIRE(c.site);
  CHECK(c.site->name == "site");
  // Every declarable kind has an example.
  for (const auto& ks : common::model::all_kinds())
    if (ks.api_writable && ks.kind != Kind::site) CHECK_MESSAGE(!of_kind(c, ks.kind).empty(), ks.name);
  CHECK(named(c, Kind::assignment, "EXAMPLE\\personal-01:EXAMPLE\\alice"));
  CHECK(named(c, Kind::machine, "EXAMPLE\\desk-3"));
}

TEST_CASE("the example file documents every settable field of every kind") {
  const std::string text = read_text(kSourceDir + "/config/brokerd.example.toml");
  REQUIRE(!text.empty());
  for (const auto& ks : common::model::all_kinds()) {
    if (!ks.api_writable) continue;
    const std::string header = ks.kind == Kind::site ? "\n[site]\n" : "\n[[" + std::string(ks.name) + "]]\n";
    const auto start = text.find(header);
    REQUIRE_MESSAGE(start != std::string::npos, header);
    const auto end = text.find("\n[", start + 1);
    const std::string section = text.substr(start, end == std::string::npos ? std::string::npos : end - start);
    for (const auto& f : ks.fields) {
      const std::string key(f.name);
      const bool documented = section.find("\n" + key + " = ") != std::string::npos ||
                              section.find("\n# " + key + " = ") != std::string::npos;
      if (f.state)
        CHECK_MESSAGE(section.find(key) != std::string::npos, ks.name, ".", key, " (state) is not mentioned");
      else
        CHECK_MESSAGE(documented, ks.name, ".", key, " is not documented in the example");
    }
  }
}

TEST_CASE("the demo site loads with the expected objects") {
  const std::string path = kSourceDir + "/config/demo.toml";
  const auto r = config::load_file(path);
  INFO(all_errors(r));
  REQUIRE(r.errors.empty());
  const config::Config& c = *r.config;
  const std::string abs = fs::absolute(path).lexically_normal().string();
  CHECK(c.path == abs);
  CHECK(c.database_path == (fs::path(kSourceDir) / "var/demo.db").lexically_normal().string());
  CHECK(c.xml.address == "127.0.0.1");
  CHECK(c.admin_unauthenticated_paths == std::vector<std::string>{"/metrics", "/readyz"});
  REQUIRE(c.admin_tokens.size() == 1);
  CHECK(c.admin_tokens[0].name == "demo");
  CHECK(c.admin_tokens[0].sha256 == common::crypto::sha256_hex("demo-admin-token"));
  REQUIRE(c.site);
  CHECK(c.site->text("site_name") == "Demo");
  CHECK(c.site->owner == "config:" + abs);

  CHECK(of_kind(c, Kind::hypervisor_connection).size() == 1);
  CHECK(of_kind(c, Kind::catalog).size() == 3);
  CHECK(of_kind(c, Kind::delivery_group).size() == 3);
  CHECK(of_kind(c, Kind::application).size() == 3);
  CHECK(of_kind(c, Kind::rule).size() == 6);
  CHECK(of_kind(c, Kind::user).size() == 4);
  CHECK(of_kind(c, Kind::group).size() == 3);

  // 6 + 3 + 2 machines; counts below 10 need no padding.
  std::vector<std::string> machines;
  for (const auto* m : of_kind(c, Kind::machine)) machines.push_back(m->name);
  CHECK(machines == std::vector<std::string>{"DEMO\\pool-1", "DEMO\\pool-2", "DEMO\\pool-3", "DEMO\\pool-4",
                                             "DEMO\\pool-5", "DEMO\\pool-6", "DEMO\\personal-1", "DEMO\\personal-2",
                                             "DEMO\\personal-3", "DEMO\\rds-1", "DEMO\\rds-2"});
  const Object* rds = named(c, Kind::machine, "DEMO\\rds-2");
  REQUIRE(rds);
  CHECK(rds->text("catalog") == "rds-hosts");
  CHECK(rds->text("delivery_group") == "Office Apps");
  CHECK(rds->list("tags") == common::model::TextList{"rds", "office"});
  CHECK(rds->text("registration_state") == "Unregistered");  // defaults filled in

  // Objects come in all_kinds() order, each owned by the file.
  int last = -1;
  for (const auto& o : c.objects) {
    CHECK(static_cast<int>(o.kind) >= last);
    last = static_cast<int>(o.kind);
    CHECK(o.owner == "config:" + abs);
  }

  const Object* alice = named(c, Kind::user, "alice");
  REQUIRE(alice);
  CHECK(common::crypto::verify_password("alice-pass", alice->text("password_hash")));
  CHECK(named(c, Kind::user, "dave")->flag("disabled"));
  CHECK(named(c, Kind::group, "Staff")->list("members") == common::model::TextList{"Finance"});
  CHECK(named(c, Kind::catalog, "win11-private")->text("allocation_type") == "Static");
  CHECK(named(c, Kind::delivery_group, "Office Apps")->text("session_support") == "MultiSession");
  CHECK(named(c, Kind::application, "Word")->list("delivery_groups") == common::model::TextList{"Office Apps"});
}

TEST_CASE("machine ranges pad {n} to the width of count") {
  const auto r = load(R"([[catalog]]
name = "c"
[[machine]]
name = "m-{n}-x{n}"
count = 10
catalog = "c"
)");
  INFO(all_errors(r));
  REQUIRE(r.config);
  const auto machines = of_kind(*r.config, Kind::machine);
  REQUIRE(machines.size() == 10);
  CHECK(machines.front()->name == "m-01-x01");
  CHECK(machines[8]->name == "m-09-x09");
  CHECK(machines.back()->name == "m-10-x10");

  CHECK(only_error(load("[[catalog]]\nname = \"c\"\n[[machine]]\nname = \"m-{n}\"\ncatalog = \"c\"\n")).describe() ==
        "t.toml:4: machine[1].name: contains {n} but count is not set");
  CHECK(only_error(load("[[catalog]]\nname = \"c\"\n[[machine]]\nname = \"m\"\ncount = 2\ncatalog = \"c\"\n")).key ==
        "machine[1].count");
  CHECK(only_error(load("[[catalog]]\nname = \"c\"\n[[machine]]\nname = \"m{n}\"\ncount = 10001\ncatalog = \"c\"\n"))
            .message == "must be between 1 and 10000, not 10001");
  // A range that collides with a single machine.
  const auto e = only_error(load("[[catalog]]\nname = \"c\"\n[[machine]]\nname = \"m2\"\ncatalog = \"c\"\n"
                                 "[[machine]]\nname = \"m{n}\"\ncount = 3\ncatalog = \"c\"\n"));
  CHECK(e.describe() == "t.toml:7: machine[2].name: duplicate machine name 'm2' (first at line 4)");
}

TEST_CASE("a TOML syntax error is one error with its line") {
  const auto e = only_error(config::load_string("[daemon]\nio_threads = 2\nshutdown_grace_seconds = \n", "s.toml"));
  CHECK(e.file == "s.toml");
  CHECK(e.line == 3);
  CHECK(e.key.empty());
  CHECK(e.message.find("TOML syntax error") == 0);
}

TEST_CASE("non-ASCII text is taken in strings and comments, and refused elsewhere with its line") {
  // In every kind of string and in comments: loads.
  const auto ok = load("# Caf\u00e9 \u00fcber alles\n[site]\nsite_name = \"Caf\u00e9 \\\" \u00e9\"  # \u00e9\n"
                       "default_domain = 'd\u00e9mo'\n[[catalog]]\nname = \"c\"\ndescription = \"\"\"multi \u00e9\n\"\u00e9\"\n\"\"\"\n"
                       "[[delivery_group]]\nname = \"g\"\ndescription = '''x \u00e9\n'''\n");
  CHECK_MESSAGE(ok.errors.empty(), all_errors(ok));
  // Outside a string (where toml++ 3.3 would reach undefined behaviour): one syntax error, its line.
  const auto e = only_error(load("[daemon]\nio_threads = 2\n[site]\nsite_name = \"x\" \u0340\n"));
  CHECK(e.line == 4);
  CHECK(e.message.find("non-ASCII character outside a string") != std::string::npos);
  // Right after a backslash of a basic string (an escape, or what a line-ending backslash trims):
  // toml++ would ask whether the character is whitespace and reach undefined behaviour.
  for (const std::string& text : {std::string("[site]\nsite_name = \"\"\"a\\\n  \u00a7\"\"\"\n"),
                                  std::string("[site]\nsite_name = \"\"\"a\\\n\n\u00e9\"\"\"\n"),
                                  std::string("[site]\nsite_name = \"a\\\u00e9\"\n")}) {
    CAPTURE(text);
    const auto b = only_error(load(text));
    CHECK(b.line == 2);
    CHECK(b.message.find("right after a backslash") != std::string::npos);
  }
  // A line-ending backslash followed by ASCII, then non-ASCII later on the line: fine.
  const auto trimmed = load("[site]\nsite_name = \"\"\"a\\\n  b \u00e9\"\"\"\n");
  CHECK_MESSAGE(trimmed.errors.empty(), all_errors(trimmed));
  // The input fuzz/config_fuzz found (fuzz/corpus/config/crash-3e2c0849...).
  const std::string found("[a]\nb = [1, \"x\", {c = -27V07:\xcd\x80" "0800\" = \"\"\"\nmlti\n\"\"\"\n[\xdb" "a.f]]\n");
  const auto f = config::load_string(found, "f.toml");
  REQUIRE_FALSE(f.errors.empty());
  CHECK(f.errors.front().message.find("TOML syntax error") == 0);
}

TEST_CASE("a quote starts a string only where TOML starts a key or a value") {
  const auto refused = [](const std::string& text) {
    for (const auto& e : config::load_string(text, "q.toml").errors)
      if (e.message.find("non-ASCII") != std::string::npos) return true;
    return false;
  };
  // Strings wherever TOML has them, non-ASCII inside: not refused by the guard (toml++ reads them;
  // the schema may still refuse the keys).
  for (const std::string& text :
       {std::string("a = [\"\u00e9\", '\u00fc', [\"\u00e9\"], {k = \"\u00e9\"}]\n"),
        std::string("a = [\n  \"\u00e9\",  # \u00e9\n  '\u00fc'\n]\n"),
        std::string("\"k\u00e9\" = 1\n'k\u00fc'.\"x\u00e9\" = 2\na . \"\u00e9\" = 3\n"),
        std::string("[\"caf\u00e9\".'x\u00e9']\nb = { \"\u00e9\" = '\u00fc', c = \"\u00e9\" }\n"),
        std::string("[[t.\"\u00e9\"]]\nd = 1979-05-27 07:32:00Z\ne = \"\u00e9\"\nf = -1.5e3\ng = \"\"\"\u00e9\"\"\"\n"),
        std::string("h=\"\u00e9\"\ni = [{a=\"\u00e9\"},{b='\u00fc'}]\nj = []\nk = {}\nl = '\u00e9'\n")}) {
    CAPTURE(text);
    CHECK_FALSE(refused(text));
  }
  // A quote inside a bare token is not a string: toml++ reads on to the next value terminator and
  // would classify the non-ASCII character (fuzz/corpus/config/crash-2a69c9ee...).
  for (const std::string& text :
       {std::string("c = -'27V07:\u0340\n"), std::string("c = 1.'\u00e9'\n"), std::string("c = x='\u00e9'\n"),
        std::string("c = x['\u00e9']\n"), std::string("c = \"a\" '\u00e9'\n"), std::string("c = = '\u00e9'\n"),
        std::string("c = [1 '\u00e9']\n"), std::string("c = { k = 1 '\u00e9' }\n"), std::string("c'\u00e9' = 1\n")}) {
    CAPTURE(text);
    CHECK(refused(text));
  }
  // The fuzzer's input, whole.
  const std::string found("[a]\nb = [1, \"x\", {c = -'27V07:\xcd\x80" "0800\" = \"\"\"\nmlti\n\"\"\"\n[\xdb" "a.f]]\n");
  const auto f = config::load_string(found, "f.toml");
  REQUIRE_FALSE(f.errors.empty());
  CHECK(f.errors.front().message.find("non-ASCII character outside a string") != std::string::npos);
}

TEST_CASE("unknown keys are errors, with a suggestion when one is close") {
  const auto r = load("[[catalog]]\nname = \"c\"\n[[machine]]\nname = \"m\"\ncatalog = \"c\"\ncatlog = \"c\"\n");
  const auto u = only_error(r);
  CHECK(u.describe() == "t.toml:6: machine[1].catlog: unknown key 'catlog' (did you mean 'catalog'?)");
  CHECK(only_error(load("[daemon]\nio_thread = 2\n")).message ==
        "unknown key 'io_thread' (did you mean 'io_threads'?)");
  CHECK(only_error(load("[listeners.xlm]\nport = 1\n")).message == "unknown key 'xlm' (did you mean 'xml'?)");
  CHECK(only_error(load("[[catalogs]]\nname = \"c\"\n")).message ==
        "unknown key 'catalogs' (did you mean 'catalog'?)");
  CHECK(only_error(load("colour = \"red\"\n")).message == "unknown key 'colour'");
  CHECK(only_error(load("[[session]]\nmachine = \"m\"\n")).message ==
        "session objects are maintained by the broker and cannot be declared in the config file");
}

TEST_CASE("unknown key next to a missing required key: both reported") {
  const auto r = load("[[catalog]]\nname = \"c\"\n[[machine]]\nname = \"m\"\ncatlog = \"c\"\n");
  INFO(all_errors(r));
  REQUIRE(r.errors.size() == 2);
  CHECK(r.errors[0].describe() == "t.toml:3: machine[1].catalog: is required");
  CHECK(r.errors[1].describe() == "t.toml:5: machine[1].catlog: unknown key 'catlog' (did you mean 'catalog'?)");
}

TEST_CASE("wrong TOML types are named") {
  CHECK(only_error(load("[daemon]\nio_threads = \"2\"\n")).describe() ==
        "t.toml:2: daemon.io_threads: must be an integer, not a string");
  CHECK(only_error(load("[[group]]\nname = \"g\"\nmembers = \"alice\"\n")).message ==
        "must be an array of strings, not a string");
  CHECK(only_error(load("[[group]]\nname = \"g\"\nmembers = [\"alice\", 3]\n")).message ==
        "must be an array of strings, but element 2 is an integer");
  CHECK(only_error(load("[[user]]\nname = \"u\"\ndisabled = \"yes\"\n")).message ==
        "must be a boolean (true or false), not a string");
  CHECK(only_error(load("[[user]]\nname = 7\n")).describe() == "t.toml:2: user[1].name: must be a string, not an integer");
  CHECK(only_error(load("[catalog]\nname = \"c\"\n")).message ==
        "must be an array of tables ([[catalog]]), not a table");
  CHECK(only_error(load("daemon = 1\n")).message == "must be a table ([daemon]), not an integer");
  CHECK(only_error(load("[[delivery_group]]\nname = \"g\"\npeak_buffer_size_percent = 101\n")).message ==
        "must be between 0 and 100, not 101");
}

TEST_CASE("a misspelt choice lists the allowed spellings") {
  const auto e = only_error(load("[[catalog]]\nname = \"c\"\nallocation_type = \"random\"\n"));
  CHECK(e.describe() == "t.toml:3: catalog[1].allocation_type: 'random' is not one of Static, Random (did you mean 'Random'?)");
  CHECK(only_error(load("[logging]\nlevel = \"warning\"\n")).message ==
        "'warning' is not one of trace, debug, info, warn, error, critical, off");
  CHECK(only_error(load("[logging]\nformat = \"jsn\"\n")).message == "'jsn' is not one of text, json (did you mean 'json'?)");
}

TEST_CASE("references must name an object declared in the file") {
  CHECK(only_error(load("[[machine]]\nname = \"m\"\ncatalog = \"nope\"\n")).describe() ==
        "t.toml:3: machine[1].catalog: no catalog named 'nope' in this file");
  CHECK(only_error(load("[[delivery_group]]\nname = \"g\"\n[[application]]\nname = \"a\"\n"
                        "command_line_executable = \"a.exe\"\ndelivery_groups = [\"g\", \"h\"]\n"))
            .message == "no delivery_group named 'h' in this file");
  CHECK(only_error(load("[[catalog]]\nname = \"c\"\nhypervisor_connection = \"hv\"\n")).message ==
        "no hypervisor_connection named 'hv' in this file");
}

TEST_CASE("duplicate names give both lines") {
  const auto e = only_error(load("[[catalog]]\nname = \"x\"\n\n[[catalog]]\nname = \"x\"\n"));
  CHECK(e.describe() == "t.toml:5: catalog[2].name: duplicate catalog name 'x' (first at line 2)");
  // Different kinds may share a name.
  CHECK(load("[[catalog]]\nname = \"x\"\n[[delivery_group]]\nname = \"x\"\n").errors.empty());
  CHECK(only_error(load("[[admin.token]]\nname = \"t\"\nsha256 = \"" + std::string(64, 'a') + "\"\n")).message ==
        "duplicate admin token name 't' (first at line 2)");
}

TEST_CASE("a machine's catalog and delivery group need the same session support") {
  const auto e = only_error(load(R"([[catalog]]
name = "rds"
session_support = "MultiSession"
[[delivery_group]]
name = "desk"
[[machine]]
name = "m"
catalog = "rds"
delivery_group = "desk"
)"));
  CHECK(e.line == 9);
  CHECK(e.key == "machine[1].delivery_group");
  CHECK(e.message.find("catalog 'rds' is MultiSession but delivery group 'desk' is SingleSession") == 0);
}

TEST_CASE("delivery group and rule combinations") {
  CHECK(only_error(load("[[delivery_group]]\nname = \"p\"\ndesktop_kind = \"Private\"\ndelivery_type = \"DesktopsAndApps\"\n"))
            .describe() == "t.toml:4: delivery_group[1].delivery_type: a Private delivery group cannot be "
                           "DesktopsAndApps (use DesktopsOnly or AppsOnly)");
  const std::string groups = "[[delivery_group]]\nname = \"shared\"\n"
                             "[[delivery_group]]\nname = \"private\"\ndesktop_kind = \"Private\"\n";
  CHECK(only_error(load(groups + "[[rule]]\nname = \"r\"\nrule_type = \"assignment\"\ndelivery_group = \"shared\"\n"))
            .message == "assignment rules are for Private delivery groups; 'shared' is Shared");
  CHECK(only_error(load(groups + "[[rule]]\nname = \"r\"\nrule_type = \"entitlement\"\ndelivery_group = \"private\"\n"))
            .message == "entitlement rules are for Shared delivery groups; 'private' is Private");
  CHECK(load(groups + "[[rule]]\nname = \"r\"\nrule_type = \"access\"\ndelivery_group = \"private\"\n"
                      "[[rule]]\nname = \"s\"\nrule_type = \"assignment\"\ndelivery_group = \"private\"\n")
            .errors.empty());
  CHECK(only_error(load("[[rule]]\nname = \"r\"\ndelivery_group = \"x\"\n[[delivery_group]]\nname = \"x\"\n")).describe() ==
        "t.toml:1: rule[1].rule_type: is required");
}

TEST_CASE("power time schemes: 24 hourly values, day names, pool sizes, a known group, no overlaps") {
  const std::string group = "[[delivery_group]]\nname = \"pool\"\n";  // lines 1-2
  const auto hours = [](const std::string& value, int n = 24) {
    std::string out = "[";
    for (int i = 0; i < n; ++i) out += (i ? ", \"" : "\"") + value + "\"";
    return out + "]";
  };
  // A valid scheme: peak 08:00-17:59 on weekdays, five machines during the day.
  std::string peak = "[", pool = "[";
  for (int h = 0; h < 24; ++h) {
    peak += std::string(h ? ", " : "") + (h >= 8 && h < 18 ? "\"true\"" : "\"false\"");
    pool += std::string(h ? ", " : "") + (h >= 7 && h < 19 ? "\"5\"" : "\"0\"");
  }
  peak += "]";
  pool += "]";
  const std::string scheme = "[[power_time_scheme]]\nname = \"weekdays\"\ndelivery_group = \"pool\"\n";  // 3-5
  auto r = load(group + scheme + "days_of_week = [\"Weekdays\"]\npeak_hours = " + peak + "\npool_size = " + pool +
                "\n[[power_time_scheme]]\nname = \"weekend\"\ndelivery_group = \"pool\"\ndays_of_week = [\"Saturday\", "
                "\"Sunday\"]\nenabled = false\n");
  INFO(all_errors(r));
  REQUIRE(r.errors.empty());
  const Object* weekdays = named(*r.config, Kind::power_time_scheme, "weekdays");
  REQUIRE(weekdays);
  CHECK(weekdays->text("delivery_group") == "pool");
  CHECK(weekdays->list("days_of_week") == common::model::TextList{"Weekdays"});
  CHECK(weekdays->list("peak_hours")[8] == "true");
  CHECK(weekdays->list("pool_size")[7] == "5");
  const Object* weekend = named(*r.config, Kind::power_time_scheme, "weekend");
  REQUIRE(weekend);
  CHECK(weekend->list("pool_size") == common::model::TextList(24, "-1"));  // defaults: not managed
  CHECK(weekend->list("peak_hours") == common::model::TextList(24, "false"));
  CHECK(!weekend->flag("enabled"));

  CHECK(only_error(load(group + scheme + "days_of_week = [\"Weekdays\"]\npeak_hours = " + hours("false", 23) + "\n"))
            .describe() == "t.toml:7: power_time_scheme[1].peak_hours: must have exactly 24 elements, not 23");
  CHECK(only_error(load(group + scheme + "days_of_week = [\"Weekdays\"]\npool_size = " + hours("1", 25) + "\n"))
            .message == "must have exactly 24 elements, not 25");
  CHECK(only_error(load(group + scheme + "days_of_week = [\"Monday\", \"Funday\"]\n")).describe() ==
        "t.toml:6: power_time_scheme[1].days_of_week: 'Funday' (element 1) is not one of Monday, Tuesday, Wednesday, "
        "Thursday, Friday, Saturday, Sunday, Weekdays, Weekend");
  CHECK(only_error(load(group + scheme)).describe() == "t.toml:3: power_time_scheme[1].days_of_week: is required");
  CHECK(only_error(load(group + scheme + "days_of_week = [\"Monday\"]\npeak_hours = " + hours("yes") + "\n")).message ==
        "'yes' (element 0) is not one of true, false");
  CHECK(only_error(load(group + scheme + "days_of_week = [\"Monday\"]\npool_size = " + hours("-2") + "\n")).describe() ==
        "t.toml:7: power_time_scheme[1].pool_size: '-2' (element 0) is not an integer between -1 and 100000");
  CHECK(only_error(load(group + scheme + "days_of_week = [\"Monday\"]\npool_size = " + hours("five") + "\n")).message ==
        "'five' (element 0) is not an integer between -1 and 100000");
  CHECK(only_error(load(group + scheme + "days_of_week = [\"Monday\"]\npool_using_percentage = true\npool_size = " +
                        hours("120") + "\n"))
            .message == "'120' is more than 100 (pool_using_percentage is on: values are percentages)");
  CHECK(only_error(load("[[power_time_scheme]]\nname = \"s\"\ndelivery_group = \"nope\"\ndays_of_week = [\"Monday\"]\n"))
            .describe() == "t.toml:3: power_time_scheme[1].delivery_group: no delivery_group named 'nope' in this file");
  CHECK(only_error(load(group + scheme + "days_of_week = [\"Weekdays\"]\n[[power_time_scheme]]\nname = \"fri\"\n"
                                         "delivery_group = \"pool\"\ndays_of_week = [\"Friday\", \"Saturday\"]\n"))
            .describe() == "t.toml:10: power_time_scheme[2].days_of_week: shares Friday with power time scheme 'weekdays' "
                           "(line 3); the schemes of delivery group 'pool' must not overlap days");
  // The same days on different groups are fine.
  CHECK(load(group + "[[delivery_group]]\nname = \"other\"\n" + scheme + "days_of_week = [\"Weekdays\"]\n" +
             "[[power_time_scheme]]\nname = \"o\"\ndelivery_group = \"other\"\ndays_of_week = [\"Weekdays\"]\n")
            .errors.empty());
}

TEST_CASE("assignments: exactly one of user and client_ip, name optional") {
  const std::string base = "[[catalog]]\nname = \"c\"\n[[machine]]\nname = \"m\"\ncatalog = \"c\"\n";
  auto r = load(base + "[[assignment]]\nmachine = \"m\"\nuser = \"DEMO\\\\alice\"\n"
                       "[[assignment]]\nmachine = \"m\"\nclient_ip = \"10.0.0.7\"\n"
                       "[[assignment]]\nname = \"mine\"\nmachine = \"m\"\nuser = \"bob\"\n");
  INFO(all_errors(r));
  REQUIRE(r.config);
  CHECK(named(*r.config, Kind::assignment, "m:DEMO\\alice"));
  CHECK(named(*r.config, Kind::assignment, "m:10.0.0.7"));
  CHECK(named(*r.config, Kind::assignment, "mine"));
  CHECK(only_error(load(base + "[[assignment]]\nmachine = \"m\"\n")).describe() ==
        "t.toml:6: assignment[1]: one of user and client_ip is required");
  CHECK(only_error(load(base + "[[assignment]]\nmachine = \"m\"\nuser = \"u\"\nclient_ip = \"10.0.0.1\"\n")).message ==
        "set only one of user and client_ip");
  CHECK(only_error(load(base + "[[assignment]]\nmachine = \"m\"\nclient_ip = \"10.0.0.300\"\n")).message ==
        "'10.0.0.300' is not an IPv4 or IPv6 address");
  CHECK(only_error(load(base + "[[assignment]]\nmachine = \"m\"\nuser = \"u\"\n[[assignment]]\nmachine = \"m\"\nuser = \"u\"\n"))
            .message == "duplicate assignment name 'm:u' (first at line 6)");
}

TEST_CASE("addresses and CIDR ranges are checked") {
  CHECK(load("[site]\ntrusted_front_ends = [\"10.0.0.1\", \"10.0.0.0/8\", \"::1\", \"fd00::/8\"]\n").errors.empty());
  const auto r = load("[site]\ntrusted_front_ends = [\n  \"10.0.0.1\",\n  \"10.0.0.0/33\",\n  \"frontend\",\n]\n");
  INFO(all_errors(r));
  REQUIRE(r.errors.size() == 2);
  CHECK(r.errors[0].describe() == "t.toml:4: site.trusted_front_ends: '10.0.0.0/33' is not an IPv4 or IPv6 address or CIDR range");
  CHECK(r.errors[1].line == 5);
  CHECK(only_error(load("[[delivery_group]]\nname = \"g\"\n[[rule]]\nname = \"r\"\nrule_type = \"access\"\n"
                        "delivery_group = \"g\"\nincluded_client_ips = [\"1.2.3\"]\n"))
            .key == "rule[1].included_client_ips");
  CHECK(only_error(load("[listeners.xml]\naddress = \"localhost\"\n")).message == "'localhost' is not an IPv4 or IPv6 address");
}

TEST_CASE("state fields and plain-text secrets are refused") {
  CHECK(only_error(load("[[catalog]]\nname = \"c\"\n[[machine]]\nname = \"m\"\ncatalog = \"c\"\npower_state = \"On\"\n"))
            .describe() == "t.toml:6: machine[1].power_state: is maintained by the broker and cannot be set in the config file");
  CHECK(only_error(load("[[user]]\nname = \"u\"\npassword = \"secret\"\n")).describe() ==
        "t.toml:3: user[1].password: plain-text passwords are not accepted; use password_hash (brokerd --hash-password)");
  CHECK(only_error(load("[[user]]\nname = \"u\"\npassword_hash = \"secret\"\n")).message.find("brokerd --hash-password") !=
        std::string::npos);
  CHECK(only_error(load("[[catalog]]\nname = \"c\"\nenrollment_key_hash = \"ABC\"\n")).key == "catalog[1].enrollment_key_hash");
  CHECK(only_error(load("[[catalog]]\nname = \"c\"\nenrollment_key = \"abc\"\n")).key == "catalog[1].enrollment_key");
  CHECK(load("[[catalog]]\nname = \"c\"\nenrollment_key_hash = \"" + common::crypto::sha256_hex("k") + "\"\n").errors.empty());
}

TEST_CASE("listener checks") {
  CHECK(only_error(load("[listeners.admin]\nport = 70000\n")).describe() ==
        "t.toml:2: listeners.admin.port: must be between 0 and 65535, not 70000");
  CHECK(only_error(load("[listeners.agent]\nport = 8080\n")).describe() ==
        "t.toml:2: listeners.agent.port: port 8080 is also used by listeners.xml");
  CHECK(load("[listeners.xml]\nport = 0\n[listeners.agent]\nport = 0\n").errors.empty());

  const fs::path dir = fs::temp_directory_path() / ("config_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "c.pem") << "cert";
  std::ofstream(dir / "k.pem") << "key";

  auto e = only_error(config::load_string("[listeners.xml]\ntls_cert = \"c.pem\"\n" + kTail, "t.toml", dir.string()));
  CHECK(e.describe() == "t.toml:2: listeners.xml.tls_key: is required when tls_cert is set (set both tls_cert and tls_key, or neither)");
  e = only_error(config::load_string("[listeners.xml]\ntls_cert = \"c.pem\"\ntls_key = \"missing.pem\"\n" + kTail, "t.toml",
                                     dir.string()));
  CHECK(e.line == 3);
  CHECK(e.message == "file '" + (dir / "missing.pem").string() + "' does not exist");
  auto r = config::load_string("[listeners.xml]\ntls_cert = \"c.pem\"\ntls_key = \"" + (dir / "k.pem").string() + "\"\n" + kTail,
                               "t.toml", dir.string());
  INFO(all_errors(r));
  REQUIRE(r.config);
  CHECK(r.config->xml.tls_cert_file == (dir / "c.pem").string());
  CHECK(r.config->xml.tls_key_file == (dir / "k.pem").string());
  CHECK(r.config->agent.tls_cert_file.empty());
  fs::remove_all(dir);
}

TEST_CASE("listener checks: tls_client_ca (mutual TLS) on the agent listener only, with TLS") {
  const fs::path dir = fs::temp_directory_path() / ("config_test_mtls_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "c.pem") << "cert";
  std::ofstream(dir / "k.pem") << "key";
  std::ofstream(dir / "ca.pem") << "ca";
  const auto load_in_dir = [&](const std::string& text) {
    return config::load_string(text + kTail, "t.toml", dir.string());
  };
  const std::string tls = "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n";

  // On the agent listener with TLS: resolved against the file's directory.
  auto r = load_in_dir("[listeners.agent]\n" + tls + "tls_client_ca = \"ca.pem\"\n");
  INFO(all_errors(r));
  REQUIRE(r.config);
  CHECK(r.config->agent.tls_client_ca_file == (dir / "ca.pem").string());
  CHECK(r.config->agent.tls_cert_file == (dir / "c.pem").string());
  CHECK(r.config->xml.tls_client_ca_file.empty());
  // Not set: no client certificates required.
  r = load_in_dir("[listeners.agent]\n" + tls);
  REQUIRE(r.config);
  CHECK(r.config->agent.tls_client_ca_file.empty());

  // Without TLS on the listener.
  CHECK(only_error(load_in_dir("[listeners.agent]\ntls_client_ca = \"ca.pem\"\n")).describe() ==
        "t.toml:2: listeners.agent.tls_client_ca: needs tls_cert and tls_key: client certificates are only checked "
        "on a TLS listener");
  CHECK(only_error(load_in_dir("[listeners.agent]\ntls_cert = \"c.pem\"\ntls_client_ca = \"ca.pem\"\n")).key ==
        "listeners.agent.tls_key");  // the missing key is the one error
  // On the listeners whose clients cannot present a certificate.
  const std::string kOnlyAgents =
      "client certificates can only be required on [listeners.agent] (front ends, brokerctl and health checks do not "
      "present one)";
  for (const std::string name : {"xml", "admin"}) {
    const auto refused = only_error(load_in_dir("[listeners." + name + "]\n" + tls + "tls_client_ca = \"ca.pem\"\n"));
    CHECK(refused.describe() == "t.toml:4: listeners." + name + ".tls_client_ca: " + kOnlyAgents);
  }
  // A file that cannot be read, an empty name, the wrong type.
  auto e = only_error(load_in_dir("[listeners.agent]\n" + tls + "tls_client_ca = \"missing.pem\"\n"));
  CHECK(e.line == 4);
  CHECK(e.message == "file '" + (dir / "missing.pem").string() + "' does not exist");
  CHECK(only_error(load_in_dir("[listeners.agent]\n" + tls + "tls_client_ca = \"\"\n")).message ==
        "must be a file name (omit the key to accept agents without a client certificate)");
  CHECK(only_error(load_in_dir("[listeners.agent]\n" + tls + "tls_client_ca = 1\n")).key ==
        "listeners.agent.tls_client_ca");
  fs::remove_all(dir);
}

TEST_CASE("admin tokens: at least one, well formed") {
  const auto e = only_error(config::load_string("[database]\npath = \":memory:\"\n", "t.toml"));
  CHECK(e.describe() == "t.toml: admin.token: at least one [[admin.token]] is required: without one nobody can use the admin port");
  CHECK(only_error(config::load_string("[database]\npath = \":memory:\"\n[admin]\nunauthenticated_paths = []\n", "t.toml"))
            .line == 3);
  CHECK(only_error(load("[[admin.token]]\nname = \"x\"\nsha256 = \"E2186DBDB1BB4193608605E84F33208765B5693B55EDD4F730A719A100EEEA6F\"\n"))
            .key == "admin.token[1].sha256");
  CHECK(only_error(load("[admin]\nunauthenticated_paths = [\"metrics\"]\n")).key == "admin.unauthenticated_paths");
}

TEST_CASE("[sta]: defaults, values and checks") {
  const auto none = load("");
  REQUIRE(none.config);
  CHECK(none.config->sta.enabled);
  CHECK(none.config->sta.authority_id.empty());
  CHECK(none.config->sta.ticket_lifetime_seconds == 100);
  // Before: [] meant any client. Now the front ends and loopback, unless the file says otherwise.
  CHECK(none.config->sta.allowed_clients == std::vector<std::string>{"trusted_front_ends", "loopback"});
  CHECK(none.config->sta.max_tickets == 100000);
  CHECK(none.config->sta.max_bytes == 128 * 1024 * 1024);
  CHECK(none.config->sta.max_tickets_per_client == 10000);
  CHECK(none.config->sta.max_bytes_per_client == 16 * 1024 * 1024);

  const auto set = load("[sta]\nenabled = false\nauthority_id = \"STA0A1B2C3D4E5F\"\nticket_lifetime_seconds = 30\n"
                        "allowed_clients = [\"10.0.0.0/8\", \"::1\"]\nmax_tickets = 500\nmax_bytes = 1048576\n"
                        "max_tickets_per_client = 50\nmax_bytes_per_client = 65536\n");
  INFO(all_errors(set));
  REQUIRE(set.config);
  CHECK_FALSE(set.config->sta.enabled);
  CHECK(set.config->sta.authority_id == "STA0A1B2C3D4E5F");
  CHECK(set.config->sta.ticket_lifetime_seconds == 30);
  CHECK(set.config->sta.allowed_clients == std::vector<std::string>{"10.0.0.0/8", "::1"});
  CHECK(set.config->sta.max_tickets == 500);
  CHECK(set.config->sta.max_bytes == 1048576);
  CHECK(set.config->sta.max_tickets_per_client == 50);
  CHECK(set.config->sta.max_bytes_per_client == 65536);
  const auto words = load("[sta]\nallowed_clients = [\"any\"]\n");
  REQUIRE(words.config);
  CHECK(words.config->sta.allowed_clients == std::vector<std::string>{"any"});
  const auto mixed = load("[sta]\nallowed_clients = [\"trusted_front_ends\", \"loopback\", \"192.0.2.7\"]\n");
  REQUIRE(mixed.config);
  CHECK(mixed.config->sta.allowed_clients.size() == 3);

  CHECK(only_error(load("[sta]\nauthority_id = \"STA;1\"\n")).describe() ==
        "t.toml:2: sta.authority_id: 'STA;1' must be 1 to 32 ASCII letters and digits (e.g. \"STA0123456789AB\")");
  CHECK(only_error(load("[sta]\nauthority_id = \"\"\n")).key == "sta.authority_id");
  CHECK(only_error(load("[sta]\nticket_lifetime_seconds = 0\n")).describe() ==
        "t.toml:2: sta.ticket_lifetime_seconds: must be between 1 and 3600, not 0");
  CHECK(only_error(load("[sta]\nallowed_clients = [\"10.0.0.1\",\n  \"gateway\"]\n")).describe() ==
        "t.toml:3: sta.allowed_clients: 'gateway' is not an IPv4 or IPv6 address or CIDR range, \"any\", "
        "\"loopback\" or \"trusted_front_ends\"");
  CHECK(only_error(load("[sta]\nallowed_clients = []\n")).message.starts_with("must not be empty"));
  CHECK(only_error(load("[sta]\nmax_bytes = 10\n")).key == "sta.max_bytes");
  CHECK(only_error(load("[sta]\nmax_tickets_per_client = 0\n")).key == "sta.max_tickets_per_client");
  CHECK(only_error(load("[sta]\nlifetime = 5\n")).key == "sta.lifetime");
  CHECK(only_error(load("[sta]\nenabled = \"yes\"\n")).message == "must be a boolean (true or false), not a string");
}

TEST_CASE("paths resolve against the file's directory") {
  auto r = config::load_string("[logging]\nfile = \"log/b.log\"\n[database]\npath = \"../var/b.db\"\n"
                               "[[admin.token]]\nname = \"t\"\nsha256 = \"" + std::string(64, '0') + "\"\n",
                               "t.toml", "/etc/openbroker");
  INFO(all_errors(r));
  REQUIRE(r.config);
  CHECK(r.config->database_path == "/etc/var/b.db");
  CHECK(r.config->log.file == "/etc/openbroker/log/b.log");
  CHECK(r.config->path == "t.toml");
  CHECK(load("").config->database_path == ":memory:");
  CHECK(only_error(config::load_string("[[admin.token]]\nname = \"t\"\nsha256 = \"" + std::string(64, '0') + "\"\n", "t.toml"))
            .describe() == "t.toml: database.path: is required (add a [database] table with path = \"...\")");
}

TEST_CASE("several errors are reported at once, in file order") {
  const auto r = load(R"([[machine]]
name = "m"
catalog = "nowhere"
[daemon]
io_threads = 0
[[catalog]]
name = "c"
allocation_type = "Sometimes"
[[catalog]]
name = "c"
)");
  INFO(all_errors(r));
  CHECK(!r.config);
  REQUIRE(r.errors.size() == 4);
  CHECK(r.errors[0].line == 3);
  CHECK(r.errors[0].key == "machine[1].catalog");
  CHECK(r.errors[1].line == 5);
  CHECK(r.errors[1].key == "daemon.io_threads");
  CHECK(r.errors[2].line == 8);
  CHECK(r.errors[3].line == 10);
  CHECK(r.errors[3].message == "duplicate catalog name 'c' (first at line 7)");
}

TEST_CASE("describe() is file:line: key: message") {
  config::ConfigError e{"name", 12, "machine[2].catalog", "no catalog named 'x' in this file"};
  CHECK(e.describe() == "name:12: machine[2].catalog: no catalog named 'x' in this file");
  e.line = 0;
  CHECK(e.describe() == "name: machine[2].catalog: no catalog named 'x' in this file");
  e.key.clear();
  CHECK(e.describe() == "name: no catalog named 'x' in this file");
  const auto r = load("[[catalog]]\nname = \"c\"\n[[machine]]\nname = \"a\"\ncatalog = \"c\"\n[[machine]]\nname = \"b\"\n"
                      "catalog = \"x\"\n");
  CHECK(only_error(r).describe() == "t.toml:8: machine[2].catalog: no catalog named 'x' in this file");
}

TEST_CASE("load_file reports unreadable files without a line") {
  const auto r = config::load_file("/nonexistent/brokerd.toml");
  REQUIRE(r.errors.size() == 1);
  CHECK(r.errors[0].line == 0);
  CHECK(r.errors[0].file == "/nonexistent/brokerd.toml");
  CHECK(r.errors[0].describe().find("/nonexistent/brokerd.toml: cannot open") == 0);
  CHECK(!config::load_file(kSourceDir + "/config").errors.empty());
}

TEST_CASE("hostile input gives errors, not exceptions or crashes") {
  const std::string inputs[] = {
      std::string("\0\0\0", 3),
      "[[machine]]\nname = \"\\u0000{n}\"\ncount = 10000\ncatalog = \"c\"\n",
      "a = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n",
      "\xff\xfe = 1\n",
      "[site]\ntrusted_front_ends = [\"/\", \"1.2.3.4/\", \"::/129\", \"1.2.3.4/0032\"]\n",
      "[[user]]\n\"\\n\" = 1\n",
      "[[assignment]]\nname = \"\"\nmachine = \"\"\n",
      "[database]\npath = \"\"\n[[admin.token]]\n",
  };
  for (const auto& text : inputs) {
    config::LoadResult r;
    CHECK_NOTHROW(r = config::load_string(text, "h.toml"));
    CHECK(!r.errors.empty());
    CHECK(!r.config);
    for (const auto& e : r.errors)
      for (char c : e.describe()) CHECK(static_cast<unsigned char>(c) >= 0x20);
  }
}

TEST_CASE("no partial config on error") {
  const auto r = load("[daemon]\nio_threads = 4\n[[catalog]]\nname = \"c\"\nallocation_type = \"X\"\n");
  CHECK(!r.config);
  CHECK(r.errors.size() == 1);
}

TEST_CASE("listener connection caps: defaults per listener, values and ranges") {
  const auto r = load("");
  INFO(all_errors(r));
  REQUIRE(r.config);
  const config::Config& c = *r.config;
  // docs/configuration.md "Connection limits": the agent listener's default fits 100,000 agents;
  // the admin listener's connections are set aside for it.
  CHECK(c.xml.max_connections == 10000);
  CHECK(c.xml.max_connections_per_address == 1000);
  CHECK(c.agent.max_connections == 110000);
  CHECK(c.agent.max_connections >= 100000);
  CHECK(c.agent.max_connections_per_address == 10000);
  CHECK(c.admin.max_connections == 256);
  CHECK(c.admin.max_connections_per_address == 64);
  for (const auto* l : {&c.xml, &c.agent, &c.admin}) CHECK(l->first_request_timeout_seconds == 10);

  const auto set = load(
      "[listeners.xml]\nmax_connections = 50\nmax_connections_per_address = 5\nfirst_request_timeout_seconds = 3\n"
      "[listeners.agent]\nmax_connections = 200000\n[listeners.admin]\nmax_connections_per_address = 2\n");
  INFO(all_errors(set));
  REQUIRE(set.config);
  CHECK(set.config->xml.max_connections == 50);
  CHECK(set.config->xml.max_connections_per_address == 5);
  CHECK(set.config->xml.first_request_timeout_seconds == 3);
  CHECK(set.config->agent.max_connections == 200000);
  CHECK(set.config->agent.max_connections_per_address == 10000);
  CHECK(set.config->admin.max_connections == 256);
  CHECK(set.config->admin.max_connections_per_address == 2);

  CHECK(only_error(load("[listeners.xml]\nmax_connections = 0\n")).describe() ==
        "t.toml:2: listeners.xml.max_connections: must be between 1 and 10000000, not 0");
  CHECK(only_error(load("[listeners.agent]\nmax_connections_per_address = -1\n")).describe() ==
        "t.toml:2: listeners.agent.max_connections_per_address: must be between 1 and 10000000, not -1");
  CHECK(only_error(load("[listeners.admin]\nfirst_request_timeout_seconds = 0\n")).describe() ==
        "t.toml:2: listeners.admin.first_request_timeout_seconds: must be between 1 and 3600, not 0");
  CHECK(only_error(load("[listeners.xml]\nmax_connection = 5\n")).message ==
        "unknown key 'max_connection' (did you mean 'max_connections'?)");

  // The example file spells out the defaults.
  const auto example = config::load_file(kSourceDir + "/config/brokerd.example.toml");
  INFO(all_errors(example));
  REQUIRE(example.config);
  const config::Config defaults;
  const std::pair<const config::Listener*, const config::Listener*> pairs[] = {
      {&example.config->xml, &defaults.xml}, {&example.config->agent, &defaults.agent},
      {&example.config->admin, &defaults.admin}};
  for (const auto& [in_file, by_default] : pairs) {
    CHECK(in_file->max_connections == by_default->max_connections);
    CHECK(in_file->max_connections_per_address == by_default->max_connections_per_address);
    CHECK(in_file->first_request_timeout_seconds == by_default->first_request_timeout_seconds);
  }
  const std::string text = read_text(kSourceDir + "/config/brokerd.example.toml");
  for (const char* key : {"max_connections", "max_connections_per_address", "first_request_timeout_seconds"})
    CHECK_MESSAGE(text.find(std::string("\n") + key + " = ") != std::string::npos, key);
}

TEST_CASE("[identity] and [xml]: password checks and failed logons") {
  const auto none = load("");
  REQUIRE(none.config);
  CHECK(none.config->identity.password_check_threads == 0);
  CHECK(none.config->identity.password_check_queue == 128);
  CHECK(none.config->identity.password_check_max_wait_ms == 2000);
  CHECK(none.config->xml_service.failed_logons_per_minute == 30);

  const auto set = load("[identity]\npassword_check_threads = 2\npassword_check_queue = 10\n"
                        "password_check_max_wait_ms = 500\n[xml]\nfailed_logons_per_minute = 0\n");
  INFO(all_errors(set));
  REQUIRE(set.config);
  CHECK(set.config->identity.password_check_threads == 2);
  CHECK(set.config->identity.password_check_queue == 10);
  CHECK(set.config->identity.password_check_max_wait_ms == 500);
  CHECK(set.config->xml_service.failed_logons_per_minute == 0);

  CHECK(only_error(load("[identity]\npassword_check_queue = 0\n")).describe() ==
        "t.toml:2: identity.password_check_queue: must be between 1 and 100000, not 0");
  CHECK(only_error(load("[identity]\nhash_threads = 2\n")).key == "identity.hash_threads");
  CHECK(only_error(load("[xml]\nfailed_logons_per_minute = -1\n")).key == "xml.failed_logons_per_minute");
  CHECK(only_error(load("[xml]\nport = 8080\n")).key == "xml.port");
}

TEST_CASE("[database] group: the system group that may read a database file brokerd creates") {
  auto r = config::load_string("[database]\npath = \"b.db\"\ngroup = \"openbroker-backup\"\n[[admin.token]]\nname = \"t\"\n"
                               "sha256 = \"e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f\"\n",
                               "t.toml", "/base");
  INFO(all_errors(r));
  REQUIRE(r.config);
  CHECK(r.config->database_group == "openbroker-backup");
  auto bad = config::load_string("[database]\npath = \"b.db\"\ngroup = \"a:b\"\n", "t.toml", "/base");
  CHECK_FALSE(bad.config);
  CHECK(all_errors(bad).find("database.group: must be the name of a system group") != std::string::npos);
}

TEST_CASE("[directory]: builtin by default; ldap with its required keys, profiles and overrides") {
  const auto none = load("");
  REQUIRE(none.config);
  CHECK(none.config->directory.backend == "builtin");

  char tmpl[] = "/tmp/config-test-XXXXXX";
  REQUIRE(::mkdtemp(tmpl));
  const std::string dir = tmpl;
  { std::ofstream(dir + "/pw") << "secret\n"; }
  const std::string ldap = "[directory]\nbackend = \"ldap\"\nservers = [\"ldaps://dc1.example.com\", \"ldap://dc2:389\"]\n"
                           "bind_dn = \"CN=svc,DC=example,DC=com\"\nbind_password_file = \"pw\"\n"
                           "base_dn = \"DC=example,DC=com\"\ndomain = \"EXAMPLE\"\n";
  const auto ok = config::load_string(ldap + "profile = \"openldap\"\ngroup_lookup = \"member_of\"\n"
                                             "user_filter = \"(objectClass=person)\"\npool_size = 2\ncache_seconds = 60\n"
                                             "[directory.attributes]\naccount_name = \"sAMAccountName\"\nlockout_time = \"\"\n" +
                                          kTail,
                                      "t.toml", dir);
  INFO(all_errors(ok));
  REQUIRE(ok.config);
  const auto& d = ok.config->directory;
  CHECK(d.backend == "ldap");
  CHECK(d.profile == "openldap");
  CHECK(d.servers == std::vector<std::string>{"ldaps://dc1.example.com", "ldap://dc2:389"});
  CHECK(d.start_tls);
  CHECK(d.verify_certificates);
  CHECK(d.bind_password_file == dir + "/pw");
  CHECK(d.domain == "EXAMPLE");
  CHECK(d.group_lookup == std::optional<std::string>("member_of"));
  CHECK(d.user_filter == std::optional<std::string>("(objectClass=person)"));
  CHECK_FALSE(d.group_filter);
  CHECK(d.pool_size == 2);
  CHECK(d.cache_seconds == 60);
  CHECK(d.attributes == std::vector<std::pair<std::string, std::string>>{{"account_name", "sAMAccountName"},
                                                                        {"lockout_time", ""}});

  // Required keys, and the password never in the file.
  CHECK(only_error(load("[directory]\nbackend = \"ldap\"\nbase_dn = \"DC=x\"\ndomain = \"X\"\n")).key ==
        "directory.servers");
  CHECK(only_error(load("[directory]\nbackend = \"ldap\"\nservers = [\"ldap://x\"]\ndomain = \"X\"\n")).key ==
        "directory.base_dn");
  CHECK(only_error(load("[directory]\nbackend = \"ldap\"\nservers = [\"ldap://x\"]\nbase_dn = \"DC=x\"\n")).key ==
        "directory.domain");
  CHECK(only_error(load("[directory]\nbackend = \"ldap\"\nservers = [\"ldap://x\"]\nbase_dn = \"DC=x\"\n"
                        "domain = \"X\"\nbind_dn = \"CN=svc\"\n"))
            .key == "directory.bind_password_file");
  const auto pw = only_error(load("[directory]\nbind_password = \"hunter2\"\n"));
  CHECK(pw.key == "directory.bind_password");
  CHECK(pw.message.find("bind_password_file") != std::string::npos);
  CHECK(pw.message.find("hunter2") == std::string::npos);
  // Checked values.
  CHECK(only_error(load("[directory]\nbackend = \"novell\"\n")).key == "directory.backend");
  CHECK(only_error(load("[directory]\nprofile = \"edirectory\"\n")).key == "directory.profile");
  CHECK(only_error(load("[directory]\nservers = [\"http://dc1\"]\n")).key == "directory.servers");
  CHECK(only_error(load("[directory]\nuser_filter = \"objectClass=user\"\n")).key == "directory.user_filter");
  CHECK(only_error(load("[directory]\ngroup_lookup = \"tokenGroups\"\n")).key == "directory.group_lookup");
  for (const char* lookup : {"member", "member_of", "in_chain", "token_groups"}) {
    CAPTURE(lookup);
    const auto r = load(std::string("[directory]\ngroup_lookup = \"") + lookup + "\"\n");
    INFO(all_errors(r));
    REQUIRE(r.config);
    CHECK(r.config->directory.group_lookup == std::optional<std::string>(lookup));
  }
  CHECK(only_error(load("[directory]\nbind_password_file = \"/nonexistent/pw\"\n")).key ==
        "directory.bind_password_file");
  CHECK(only_error(load("[directory]\npool_size = 0\n")).key == "directory.pool_size");
  CHECK(only_error(load("[directory.attributes]\nuid = \"uid\"\n")).key == "directory.attributes.uid");
  CHECK(only_error(load("[directory.attributes]\nupn = \"a)(b\"\n")).key == "directory.attributes.upn");
  std::filesystem::remove_all(dir);
}
