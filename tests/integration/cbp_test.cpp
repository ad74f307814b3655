// Integration tests of the agent protocol (docs/cbp.md): the real brokerd, started on free ports
// with a temporary database, and the reference agent (tools/vda-agent) talking to it over
// WebSockets, checked through the admin REST API as an admin or a front end would see it.
//
// Every wait is for a state (the agent's status or the admin API), never for a fixed time; the
// timeouts are generous upper bounds. The heartbeat tests use the smallest interval the site
// allows (5 s).
#include "cbp/messages.hpp"
#include "common/crypto.hpp"
#include "net/http.hpp"
#include "net/http_client.hpp"
#include "net/test_support.hpp"
#include "net/websocket_client.hpp"
#include "tests/integration/daemon.hpp"
#include "tests/integration/support.hpp"
#include "tools/vda-agent/agent.hpp"
#include "tools/vda-agent/power_follower.hpp"
#include "tools/vda-agent/raw_connection.hpp"

#include <boost/json.hpp>
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <future>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace json = boost::json;
using itest::Daemon;
using itest::TempDir;
using vda::Millis;

namespace {

using namespace itest::support;

const std::string kEnrollKey = "cbp-test-enrollment-key";

// A site with two enrollment catalogs (single- and multi-session), one without enrollment, and
// declared machines TEST\vm-1..4 (single-session) and TEST\rds-1..2 (multi-session).
std::string site_config(int heartbeat_interval_seconds = 60, int missed_heartbeats = 3) {
  const std::string key_hash = common::crypto::sha256_hex(kEnrollKey);
  std::ostringstream c;
  c << "\n[site]\nsite_name = \"CBP test\"\n"
    << "heartbeat_interval_seconds = " << heartbeat_interval_seconds << "\n"
    << "missed_heartbeats = " << missed_heartbeats << "\n";
  c << R"(
[[catalog]]
name = "desktops"
session_support = "SingleSession"
enrollment_key_hash = ")"
    << key_hash << R"("

[[catalog]]
name = "hosts"
session_support = "MultiSession"
enrollment_key_hash = ")"
    << key_hash << R"("

[[catalog]]
name = "closed"
session_support = "SingleSession"

[[delivery_group]]
name = "desktops-group"

[[delivery_group]]
name = "hosts-group"
session_support = "MultiSession"

[[machine]]
name = "TEST\\vm-{n}"
count = 4
catalog = "desktops"
delivery_group = "desktops-group"

[[machine]]
name = "TEST\\rds-{n}"
count = 2
catalog = "hosts"
delivery_group = "hosts-group"
)";
  return c.str();
}

bool rejected_with(const vda::Machine& m, cbp::Reason r) {
  return m.wait_for([r](const vda::MachineStatus& s) { return s.rejected_with(r); }, kWait);
}

// The connection that was registered has ended and the machine got error `r` before.
bool ended_with_error(const vda::Machine& m, cbp::Reason r) {
  return m.wait_for([r](const vda::MachineStatus& s) { return s.got_error(r) && s.state != vda::State::registered; },
                    kWait);
}

std::optional<cbp::Message> next_message(vda::RawConnection& c) {
  auto text = c.next(kWait);
  if (!text) return std::nullopt;
  auto m = cbp::parse(*text);
  if (!m) {
    FAIL_CHECK("the broker sent an unparsable message: " << *text);
    return std::nullopt;
  }
  return *m;
}

// On a fresh raw connection: reads the challenge and answers it with a correct hello for
// `machine` keyed by `secret`. Returns the challenge.
std::optional<cbp::Challenge> say_hello(vda::RawConnection& c, const std::string& machine, const std::string& secret) {
  if (!c.wait_open(kWait)) return std::nullopt;
  auto m = next_message(c);
  if (!m || !std::holds_alternative<cbp::Challenge>(*m)) return std::nullopt;
  const auto challenge = std::get<cbp::Challenge>(*m);
  cbp::Hello h;
  h.machine = machine;
  h.versions = {1};
  h.agent_version = "raw-test/1";
  h.proof = cbp::compute_proof(common::crypto::sha256_hex(secret), challenge.nonce, machine, h.versions);
  h.agent_nonce = cbp::make_nonce();
  c.send(cbp::serialize(h));
  return challenge;
}

}  // namespace

TEST_CASE("cbp: machines register by enrollment and with an admin-issued secret") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config())), daemon.log());
  Api api(daemon);
  vda::Fleet fleet(fleet_options(daemon));

  // A machine the site does not know yet enrolls with the catalog's key.
  auto enroll_cfg = machine_config("TEST\\new-1", "desktops", 1);
  enroll_cfg.enroll_key = kEnrollKey;
  auto enrolled = fleet.add(enroll_cfg);
  // A declared machine with a secret from the admin API, and one with a secret from brokerctl.
  const auto desk_cfg = with_secret(machine_config("TEST\\vm-1", "desktops", 2), api.new_secret("TEST\\vm-1"));
  auto desk = fleet.add(desk_cfg);
  const std::map<std::string, std::string> env{{"OPENBROKER_URL", daemon.admin_url()},
                                               {"OPENBROKER_TOKEN", itest::kToken}};
  auto ctl = itest::run_command({BROKERCTL_PATH, "--json", "machine", "secret", "TEST\\rds-1"}, {}, env);
  REQUIRE_MESSAGE(ctl.exit_code == 0, ctl.err);
  const auto host_cfg =
      with_secret(machine_config("TEST\\rds-1", "hosts", 3, cbp::SessionSupport::multi_session),
                  text(json::parse(ctl.out).as_object(), "secret"));
  REQUIRE(host_cfg.secret.size() == 64);
  auto host = fleet.add(host_cfg);

  fleet.start();
  for (const auto& m : fleet.machines()) REQUIRE_MESSAGE(registered(m), describe(m));

  // The enrolled agent got its own secret and keeps it.
  const auto es = enrolled.status();
  CHECK(es.enrolled);
  CHECK(cbp::is_hex64(es.secret));
  CHECK(fleet.secrets().get("TEST\\new-1") == es.secret);
  CHECK(es.last_hello.find(R"("enroll":true)") != std::string::npos);
  CHECK(es.version == 1);
  CHECK_FALSE(desk.status().enrolled);

  // What the admin sees for each registered machine.
  for (const auto& cfg : {enroll_cfg, desk_cfg, host_cfg}) {
    INFO(cfg.name);
    CHECK(await_machine(api, cfg.name, "registration_state", "Registered") == "Registered");
    auto m = api.machine(cfg.name);
    REQUIRE(m.has_value());
    CHECK(text(*m, "agent_version") == vda::agent_version());
    CHECK(text(*m, "cbp_version") == "1");
    CHECK(text(*m, "agent_address") == cfg.address);
    CHECK(text(*m, "os_type") == cfg.os);
    CHECK(text(*m, "summary_state") == "Available");
    CHECK_FALSE(m->contains("secret_hash"));
  }
  // Enrollment created the machine in its catalog, without a delivery group.
  auto created = api.machine("TEST\\new-1");
  REQUIRE(created.has_value());
  CHECK(text(*created, "catalog") == "desktops");
  CHECK(text(*created, "delivery_group").empty());
  CHECK(api.call("GET", "/api/v1/machines/TEST%5Cnew-1").body.find(common::crypto::sha256_hex(es.secret)) ==
        std::string::npos);

  // From the next connection on the enrolled agent authenticates with the stored secret.
  enrolled.interrupt();
  REQUIRE_MESSAGE(enrolled.wait_for([](const vda::MachineStatus& s) { return s.registrations == 2; }, kWait),
                  describe(enrolled));
  CHECK(enrolled.status().last_hello.find(R"("enroll":true)") == std::string::npos);
  CHECK(enrolled.status().secret == es.secret);
  CHECK(enrolled.status().rejections.empty());

  // A rotated secret stops working at the agent's next handshake.
  api.new_secret("TEST\\vm-1");
  CHECK(desk.status().state == vda::State::registered);
  desk.interrupt();
  CHECK_MESSAGE(rejected_with(desk, cbp::Reason::bad_proof), describe(desk));
  CHECK(desk.status().registrations == 1);
}

TEST_CASE("cbp: heartbeats keep a machine registered and carry its load index") {
  TempDir dir;
  Daemon daemon(dir);
  // 5 s x 1: a machine whose heartbeats were not taken would be dropped after 5 s.
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config(5, 1))), daemon.log());
  Api api(daemon);
  vda::Fleet fleet(fleet_options(daemon));
  auto host_cfg = with_secret(machine_config("TEST\\rds-1", "hosts", 1, cbp::SessionSupport::multi_session),
                              api.new_secret("TEST\\rds-1"));
  host_cfg.max_sessions = 4;  // each session is 2500 of the load index
  auto host = fleet.add(host_cfg);
  auto desk = fleet.add(with_secret(machine_config("TEST\\vm-1", "desktops", 2), api.new_secret("TEST\\vm-1")));
  fleet.start();
  REQUIRE_MESSAGE(registered(host), describe(host));
  REQUIRE_MESSAGE(registered(desk), describe(desk));
  CHECK(host.status().heartbeat_interval_seconds == 5);

  // Three heartbeats span more than the 5 s after which a silent machine is dropped.
  for (const auto& m : {host, desk}) {
    CHECK_MESSAGE(m.wait_for([](const vda::MachineStatus& s) { return s.heartbeats >= 3; }, kWait), describe(m));
    const auto s = m.status();
    CHECK(s.state == vda::State::registered);
    CHECK(s.registrations == 1);
    CHECK_MESSAGE(s.errors.empty(), describe(m));
    CHECK(api.machine_field(m.name(), "registration_state") == "Registered");
  }

  // The multi-session host's load index reaches the broker through its heartbeats.
  REQUIRE(host.add_session({"s-1", "TEST\\alice", "PC-A", "192.0.2.1"}));
  REQUIRE(host.add_session({"s-2", "TEST\\bob", "PC-B", "192.0.2.2"}));
  CHECK(await_machine(api, "TEST\\rds-1", "load_index", "5000") == "5000");
  CHECK(await_machine(api, "TEST\\rds-1", "session_count", "2") == "2");
  CHECK(api.machine_field("TEST\\rds-1", "summary_state") == "Available");
  // Full (10000): no new session goes there, which the summary state shows as InUse.
  REQUIRE(host.add_session({"s-3", "TEST\\carol", "PC-C", "192.0.2.3"}));
  REQUIRE(host.add_session({"s-4", "TEST\\dave", "PC-D", "192.0.2.4"}));
  CHECK(await_machine(api, "TEST\\rds-1", "load_index", "10000") == "10000");
  CHECK(await_machine(api, "TEST\\rds-1", "summary_state", "InUse") == "InUse");
  REQUIRE(host.logoff_session("s-4"));
  CHECK(await_machine(api, "TEST\\rds-1", "load_index", "7500") == "7500");
  CHECK(await_machine(api, "TEST\\rds-1", "summary_state", "Available") == "Available");
  CHECK(await_machine(api, "TEST\\rds-1", "session_count", "3") == "3");
  CHECK(host.status().registrations == 1);
}

TEST_CASE("cbp: lost contact unregisters a machine with ContactLost until it registers again") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config(5, 1))), daemon.log());
  Api api(daemon);
  auto opts = fleet_options(daemon);
  opts.backoff_base = Millis{60000};  // no automatic reconnect during the test: the test restarts them
  vda::Fleet fleet(opts);
  auto crashing = fleet.add(with_secret(machine_config("TEST\\vm-1", "desktops", 1), api.new_secret("TEST\\vm-1")));
  auto silent = fleet.add(with_secret(machine_config("TEST\\vm-2", "desktops", 2), api.new_secret("TEST\\vm-2")));
  vda::Faults no_heartbeats;
  no_heartbeats.no_heartbeats = true;
  silent.set_faults(no_heartbeats);
  fleet.start();
  REQUIRE_MESSAGE(registered(crashing), describe(crashing));
  REQUIRE_MESSAGE(registered(silent), describe(silent));

  // The connection drops without goodbye.
  crashing.crash();
  CHECK(await_machine(api, "TEST\\vm-1", "registration_state", "Unregistered") == "Unregistered");
  CHECK(api.machine_field("TEST\\vm-1", "last_deregistration_reason") == "ContactLost");
  CHECK(api.machine_field("TEST\\vm-1", "summary_state") == "Unregistered");
  CHECK_FALSE(api.machine_field("TEST\\vm-1", "last_deregistration_time").empty());

  // No heartbeat for heartbeat_interval_seconds x missed_heartbeats: the broker drops it.
  CHECK_MESSAGE(silent.wait_for([](const vda::MachineStatus& s) { return s.state != vda::State::registered; }, kWait),
                describe(silent));
  CHECK(silent.status().heartbeats == 0);
  CHECK(await_machine(api, "TEST\\vm-2", "registration_state", "Unregistered") == "Unregistered");
  CHECK(api.machine_field("TEST\\vm-2", "last_deregistration_reason") == "ContactLost");
  // docs/cbp.md "Heartbeats and contact loss": the broker says so before it closes.
  CHECK_MESSAGE(silent.status().got_error(cbp::Reason::contact_lost), describe(silent));

  // Both come back.
  silent.crash();
  silent.set_faults({});
  silent.start();
  crashing.start();
  for (const auto& m : {crashing, silent}) {
    CHECK_MESSAGE(m.wait_for([](const vda::MachineStatus& s) { return s.registrations == 2; }, kWait), describe(m));
    CHECK(await_machine(api, m.name(), "registration_state", "Registered") == "Registered");
    CHECK(api.machine_field(m.name(), "summary_state") == "Available");
  }
}

TEST_CASE("cbp: graceful stops and removing a machine through the admin API") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config())), daemon.log());
  Api api(daemon);
  vda::Fleet fleet(fleet_options(daemon));
  auto stopping = fleet.add(with_secret(machine_config("TEST\\vm-1", "desktops", 1), api.new_secret("TEST\\vm-1")));
  auto sleeping = fleet.add(with_secret(machine_config("TEST\\vm-2", "desktops", 2), api.new_secret("TEST\\vm-2")));
  REQUIRE(api.call("POST", "/api/v1/machines",
                   R"({"name":"TEST\\api-1","catalog":"desktops","delivery_group":"desktops-group"})")
              .status == 201);
  auto removed = fleet.add(with_secret(machine_config("TEST\\api-1", "desktops", 3), api.new_secret("TEST\\api-1")));
  fleet.start();
  for (const auto& m : fleet.machines()) REQUIRE_MESSAGE(registered(m), describe(m));
  CHECK(await_machine(api, "TEST\\api-1", "registration_state", "Registered") == "Registered");

  stopping.stop();
  sleeping.stop(cbp::Reason::agent_suspended, "going to sleep");
  CHECK(await_machine(api, "TEST\\vm-1", "registration_state", "Unregistered") == "Unregistered");
  CHECK(api.machine_field("TEST\\vm-1", "last_deregistration_reason") == "AgentShutdown");
  CHECK(await_machine(api, "TEST\\vm-2", "registration_state", "Unregistered") == "Unregistered");
  CHECK(api.machine_field("TEST\\vm-2", "last_deregistration_reason") == "AgentSuspended");
  CHECK(stopping.status().state == vda::State::stopped);
  CHECK(stopping.status().errors.empty());

  // Deleting a registered machine ends its agent's connection with DesktopRemoved.
  CHECK(api.call("DELETE", "/api/v1/machines/TEST%5Capi-1").status == 204);
  CHECK_MESSAGE(removed.wait_for(
                    [](const vda::MachineStatus& s) {
                      return s.got_error(cbp::Reason::desktop_removed) && s.state == vda::State::stopped;
                    },
                    kWait),
                describe(removed));
  CHECK_FALSE(removed.status().running);
  CHECK_FALSE(api.machine("TEST\\api-1").has_value());
  // It is gone for the broker: a new attempt names an unknown machine, which gets the answer of a
  // wrong proof (docs/cbp.md "Information given away").
  removed.start();
  CHECK_MESSAGE(rejected_with(removed, cbp::Reason::bad_proof), describe(removed));
}

TEST_CASE("cbp: rejected handshakes and the back-off after repeated failures") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config())), daemon.log());
  Api api(daemon);
  auto opts = fleet_options(daemon);
  opts.auth_failure_backoff = Millis{100};  // retry a failed authentication at once
  opts.backoff_base = Millis{50};           // and without the exponential wait
  vda::Fleet fleet(opts);

  auto old = fleet.add(with_secret(machine_config("TEST\\vm-2", "desktops", 2), api.new_secret("TEST\\vm-2")));
  vda::Faults future;
  future.versions = {99};
  old.set_faults(future);
  auto ghost = fleet.add(with_secret(machine_config("TEST\\ghost", "desktops", 3), cbp::make_machine_secret()));
  auto outsider_cfg = machine_config("TEST\\new-9", "closed", 4);
  outsider_cfg.enroll_key = kEnrollKey;
  auto outsider = fleet.add(outsider_cfg);
  old.start();
  ghost.start();
  outsider.start();
  CHECK_MESSAGE(rejected_with(old, cbp::Reason::incompatible_version), describe(old));
  CHECK_MESSAGE(rejected_with(ghost, cbp::Reason::bad_proof), describe(ghost));  // as for a wrong proof
  CHECK_MESSAGE(rejected_with(outsider, cbp::Reason::enrollment_refused), describe(outsider));
  ghost.crash();
  outsider.crash();
  // No common version: the agent gives up.
  CHECK(old.wait_for([](const vda::MachineStatus& s) { return s.state == vda::State::stopped; }, kWait));
  CHECK(old.status().rejections.size() == 1);
  CHECK(old.status().registrations == 0);
  // Nothing was created for the unknown names.
  CHECK_FALSE(api.machine("TEST\\ghost").has_value());
  CHECK_FALSE(api.machine("TEST\\new-9").has_value());
  CHECK(api.machine_field("TEST\\vm-2", "registration_state") == "Unregistered");
  // docs/cbp.md "Rejections": the reason is recorded on a machine that exists.
  CHECK(await_machine(api, "TEST\\vm-2", "last_deregistration_reason", "IncompatibleVersion") ==
        "IncompatibleVersion");

  // A wrong proof, again and again: BadProof until the (machine, address) pair is in back-off.
  const auto secret = api.new_secret("TEST\\vm-1");
  auto guesser = fleet.add(with_secret(machine_config("TEST\\vm-1", "desktops", 1), secret));
  vda::Faults wrong;
  wrong.bad_proof = true;
  guesser.set_faults(wrong);
  guesser.start();
  REQUIRE_MESSAGE(rejected_with(guesser, cbp::Reason::too_many_failures), describe(guesser));
  const auto rejections = guesser.status().rejections;
  CHECK_MESSAGE(std::count(rejections.begin(), rejections.end(), cbp::Reason::bad_proof) == cbp::kMaxAuthFailures,
                names(rejections));
  CHECK(rejections.size() == cbp::kMaxAuthFailures + 1);
  CHECK(rejections.back() == cbp::Reason::too_many_failures);
  guesser.crash();
  CHECK(api.machine_field("TEST\\vm-1", "registration_state") == "Unregistered");

  // In back-off the proof is not examined: even the right one gets TooManyFailures, with the
  // time left of the back-off.
  net::WebSocketClientPool pool(1);
  vda::RawConnection raw(pool, url(daemon));
  REQUIRE(say_hello(raw, "TEST\\vm-1", secret).has_value());
  auto answer = next_message(raw);
  REQUIRE(answer.has_value());
  REQUIRE_MESSAGE(std::holds_alternative<cbp::Rejected>(*answer), cbp::describe(*answer));
  const auto& refused = std::get<cbp::Rejected>(*answer);
  CHECK(refused.reason == cbp::Reason::too_many_failures);
  CHECK(refused.retry_after_seconds > 0);
  CHECK(refused.retry_after_seconds <= cbp::kAuthBackoff.count());
  // docs/cbp.md "Back-off after failures": retry_after_seconds is the back-off's whole length
  // (kAuthBackoff, 120 s), so an agent honouring it is never refused again for this back-off.
  CHECK(refused.retry_after_seconds == cbp::kAuthBackoff.count());
  CHECK(raw.wait_closed(kWait));

  // Other machines from the same address are not affected.
  auto good = fleet.add(with_secret(machine_config("TEST\\vm-3", "desktops", 5), api.new_secret("TEST\\vm-3")));
  good.start();
  CHECK_MESSAGE(registered(good), describe(good));
  CHECK(await_machine(api, "TEST\\vm-3", "registration_state", "Registered") == "Registered");
}

TEST_CASE("cbp: a recorded hello replayed on a new connection is refused") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config())), daemon.log());
  Api api(daemon);
  vda::Fleet fleet(fleet_options(daemon));
  const auto secret = api.new_secret("TEST\\vm-1");
  auto machine = fleet.add(with_secret(machine_config("TEST\\vm-1", "desktops", 1), secret));
  machine.start();
  REQUIRE_MESSAGE(registered(machine), describe(machine));
  const auto recorded = machine.status().last_hello;
  REQUIRE(cbp::parse(recorded).has_value());

  net::WebSocketClientPool pool(1);
  vda::RawConnection replay(pool, url(daemon));
  REQUIRE(replay.wait_open(kWait));
  auto challenge = next_message(replay);
  REQUIRE(challenge.has_value());
  REQUIRE(std::holds_alternative<cbp::Challenge>(*challenge));
  CHECK(std::get<cbp::Challenge>(*challenge).versions == std::vector<int>{1});
  replay.send(recorded);
  auto answer = next_message(replay);
  REQUIRE(answer.has_value());
  REQUIRE_MESSAGE(std::holds_alternative<cbp::Rejected>(*answer), cbp::describe(*answer));
  CHECK(std::get<cbp::Rejected>(*answer).reason == cbp::Reason::bad_proof);
  CHECK(replay.wait_closed(kWait));

  // The same secret with the new connection's nonce is accepted: only the replay was wrong.
  vda::RawConnection fresh(pool, url(daemon));
  REQUIRE(say_hello(fresh, "TEST\\vm-1", secret).has_value());
  auto welcome = next_message(fresh);
  REQUIRE(welcome.has_value());
  CHECK_MESSAGE(std::holds_alternative<cbp::Welcome>(*welcome), cbp::describe(*welcome));
  fresh.close();

  // The real agent was not disturbed.
  CHECK(machine.status().state == vda::State::registered);
  CHECK(machine.status().registrations == 1);
  CHECK(api.machine_field("TEST\\vm-1", "registration_state") == "Registered");
}

TEST_CASE("cbp: a second agent with the same identity supersedes the first") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config())), daemon.log());
  Api api(daemon);
  const auto secret = api.new_secret("TEST\\vm-1");
  auto opts = fleet_options(daemon);
  opts.superseded_backoff = Millis{600000};  // the first stays away for the rest of the test
  vda::Fleet first_fleet(opts);
  vda::Fleet second_fleet(opts);
  auto first = first_fleet.add(with_secret(machine_config("TEST\\vm-1", "desktops", 1), secret));
  auto second = second_fleet.add(with_secret(machine_config("TEST\\vm-1", "desktops", 2), secret));

  first.start();
  REQUIRE_MESSAGE(registered(first), describe(first));
  CHECK(await_machine(api, "TEST\\vm-1", "agent_address", "10.99.0.1:1494") == "10.99.0.1:1494");
  second.start();
  REQUIRE_MESSAGE(registered(second), describe(second));
  CHECK_MESSAGE(ended_with_error(first, cbp::Reason::superseded), describe(first));
  CHECK(second.status().errors.empty());
  CHECK(await_machine(api, "TEST\\vm-1", "agent_address", "10.99.0.2:1494") == "10.99.0.2:1494");

  // The superseded connection's end does not unregister the machine, and the first agent stays
  // away (its back-off after Superseded).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (std::chrono::steady_clock::now() < deadline) {
    REQUIRE(api.machine_field("TEST\\vm-1", "registration_state") == "Registered");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  CHECK(second.status().state == vda::State::registered);
  CHECK(first.status().connects == 1);
  CHECK(first.status().state == vda::State::offline);
}

TEST_CASE("cbp: an agent whose session support differs from its catalog is refused") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config())), daemon.log());
  Api api(daemon);
  vda::Fleet fleet(fleet_options(daemon));
  auto desk = fleet.add(with_secret(machine_config("TEST\\vm-1", "desktops", 1), api.new_secret("TEST\\vm-1")));
  auto host = fleet.add(with_secret(machine_config("TEST\\rds-1", "hosts", 2, cbp::SessionSupport::multi_session),
                                    api.new_secret("TEST\\rds-1")));
  vda::Faults wrong;
  wrong.wrong_session_support = true;
  desk.set_faults(wrong);
  host.set_faults(wrong);
  fleet.start();
  for (const auto& m : {desk, host}) {
    INFO(m.name());
    CHECK_MESSAGE(rejected_with(m, cbp::Reason::single_multi_session_mismatch), describe(m));
    CHECK(m.status().registrations == 0);
    CHECK(api.machine_field(m.name(), "registration_state") == "Unregistered");
    // docs/cbp.md "Rejections": the reason is recorded on the machine.
    CHECK(await_machine(api, m.name(), "last_deregistration_reason", "SingleMultiSessionMismatch") ==
          "SingleMultiSessionMismatch");
  }
  // Reporting what the catalog says, it registers.
  desk.crash();
  desk.set_faults({});
  desk.start();
  CHECK_MESSAGE(registered(desk), describe(desk));
  CHECK(await_machine(api, "TEST\\vm-1", "registration_state", "Registered") == "Registered");
}

TEST_CASE("cbp: sessions reported at registration are reconciled; session events drive states") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config())), daemon.log());
  Api api(daemon);
  vda::Fleet fleet(fleet_options(daemon));
  auto host = fleet.add(with_secret(machine_config("TEST\\rds-1", "hosts", 1, cbp::SessionSupport::multi_session),
                                    api.new_secret("TEST\\rds-1")));
  REQUIRE(host.add_session({"s-1", "TEST\\alice", "LAPTOP-A", "192.0.2.10"}, cbp::SessionState::active));
  REQUIRE(host.add_session({"rdp-2", "TEST\\bob", "", "", cbp::DisplayProtocol::rdp}, cbp::SessionState::disconnected));
  host.start();
  REQUIRE_MESSAGE(registered(host), describe(host));

  // Sessions the broker did not broker are recorded as they were reported.
  CHECK(poll<std::int64_t>([&] { return api.total("/api/v1/sessions?machine=TEST%5Crds-1"); }, 2) == 2);
  auto s1 = api.session("s-1");
  REQUIRE(s1.has_value());
  CHECK(text(*s1, "machine") == "TEST\\rds-1");
  CHECK(text(*s1, "brokered") == "false");
  CHECK(text(*s1, "state") == "Active");
  CHECK(text(*s1, "user_name") == "TEST\\alice");
  CHECK(text(*s1, "client_name") == "LAPTOP-A");
  CHECK(text(*s1, "client_address") == "192.0.2.10");
  CHECK(text(*s1, "protocol") == "HDX");
  auto rdp2 = api.session("rdp-2");
  REQUIRE(rdp2.has_value());
  CHECK(text(*rdp2, "brokered") == "false");
  CHECK(text(*rdp2, "state") == "Disconnected");
  CHECK(text(*rdp2, "protocol") == "RDP");
  CHECK(text(*rdp2, "user_name") == "TEST\\bob");
  CHECK(api.machine_field("TEST\\rds-1", "session_count") == "2");

  // Stopped, the sessions stay stored; one ends while the agent is away; at the next
  // registration the broker ends the one the agent no longer reports.
  host.stop();
  CHECK(await_machine(api, "TEST\\rds-1", "registration_state", "Unregistered") == "Unregistered");
  CHECK(api.total("/api/v1/sessions?machine=TEST%5Crds-1") == 2);
  REQUIRE(host.logoff_session("rdp-2"));
  host.start();
  REQUIRE_MESSAGE(host.wait_for([](const vda::MachineStatus& s) { return s.registrations == 2; }, kWait),
                  describe(host));
  CHECK(await_session(api, "rdp-2", "state", "LoggedOff") == "LoggedOff");
  CHECK(await_session(api, "s-1", "state", "Active") == "Active");
  CHECK(await_machine(api, "TEST\\rds-1", "session_count", "1") == "1");

  // Session events of a single-session desktop, and the machine's summary state.
  auto desk = fleet.add(with_secret(machine_config("TEST\\vm-1", "desktops", 2), api.new_secret("TEST\\vm-1")));
  desk.start();
  REQUIRE_MESSAGE(registered(desk), describe(desk));
  CHECK(await_machine(api, "TEST\\vm-1", "summary_state", "Available") == "Available");
  REQUIRE(desk.add_session({"c-1", "TEST\\carol", "PC-C", "192.0.2.30"}, cbp::SessionState::connected));
  CHECK(await_session(api, "c-1", "state", "Connected") == "Connected");
  CHECK(await_machine(api, "TEST\\vm-1", "summary_state", "InUse") == "InUse");
  CHECK(api.session_field("c-1", "brokered") == "false");
  REQUIRE(desk.disconnect_session("c-1"));
  CHECK(await_session(api, "c-1", "state", "Disconnected") == "Disconnected");
  CHECK(await_machine(api, "TEST\\vm-1", "summary_state", "Disconnected") == "Disconnected");
  REQUIRE(desk.reconnect_session("c-1", "TABLET-C"));
  CHECK(await_session(api, "c-1", "state", "Active") == "Active");
  CHECK(api.session_field("c-1", "client_name") == "TABLET-C");
  CHECK(await_machine(api, "TEST\\vm-1", "summary_state", "InUse") == "InUse");
  CHECK(api.machine_field("TEST\\vm-1", "session_count") == "1");
  REQUIRE(desk.logoff_session("c-1"));
  CHECK(await_session(api, "c-1", "state", "LoggedOff") == "LoggedOff");
  CHECK(await_machine(api, "TEST\\vm-1", "summary_state", "Available") == "Available");
  CHECK(api.machine_field("TEST\\vm-1", "session_count") == "0");
  // An Active event for a session the broker does not know records it.
  REQUIRE(host.add_session({"s-3", "TEST\\dave"}, cbp::SessionState::active));
  CHECK(await_session(api, "s-3", "state", "Active") == "Active");
  CHECK(api.session_field("s-3", "machine") == "TEST\\rds-1");
  CHECK(await_machine(api, "TEST\\rds-1", "session_count", "2") == "2");
}

TEST_CASE("cbp: a prepared session the broker never brokered is not recorded at registration") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config())), daemon.log());
  Api api(daemon);
  const auto secret = api.new_secret("TEST\\rds-1");
  net::WebSocketClientPool pool(1);
  vda::RawConnection raw(pool, url(daemon));
  REQUIRE(say_hello(raw, "TEST\\rds-1", secret).has_value());
  auto welcome = next_message(raw);
  REQUIRE(welcome.has_value());
  REQUIRE_MESSAGE(std::holds_alternative<cbp::Welcome>(*welcome), cbp::describe(*welcome));

  cbp::Register r;
  r.os = "Windows Server 2022";
  r.session_support = cbp::SessionSupport::multi_session;
  r.address = "10.99.0.1:1494";
  r.load_index = 1000;
  r.sessions.push_back({cbp::SessionState::active, {"a-1", "TEST\\alice"}});
  r.sessions.push_back({cbp::SessionState::preparing, {"p-1", "TEST\\mallory"}});
  raw.send(cbp::serialize(cbp::Message{r}));
  auto answer = next_message(raw);
  REQUIRE(answer.has_value());
  REQUIRE_MESSAGE(std::holds_alternative<cbp::Registered>(*answer), cbp::describe(*answer));

  // docs/cbp.md "Session reconciliation": a reported PreparingNewSession the broker does not
  // know is ignored (without a valid ticket it cannot be used).
  CHECK(await_session(api, "a-1", "state", "Active") == "Active");
  CHECK_FALSE(api.session("p-1").has_value());
  CHECK(api.machine_field("TEST\\rds-1", "registration_state") == "Registered");
  // ... nor counted: session_count is the number of sessions the broker keeps for the machine.
  CHECK(api.machine_field("TEST\\rds-1", "session_count") == "1");
  raw.close();
}

TEST_CASE("cbp: the broker's commands carry the timeouts docs/cbp.md gives") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config())), daemon.log());
  Api api(daemon);
  const auto secret = api.new_secret("TEST\\rds-1");
  net::WebSocketClientPool pool(1);
  vda::RawConnection raw(pool, url(daemon));
  REQUIRE(say_hello(raw, "TEST\\rds-1", secret).has_value());
  auto welcome = next_message(raw);
  REQUIRE(welcome.has_value());
  REQUIRE_MESSAGE(std::holds_alternative<cbp::Welcome>(*welcome), cbp::describe(*welcome));
  cbp::Register r;
  r.os = "Windows Server 2022";
  r.session_support = cbp::SessionSupport::multi_session;
  r.address = "10.99.0.1:1494";
  r.capabilities = {"prepare_session", "logoff_session", "disconnect_session", "send_message"};
  r.sessions.push_back({cbp::SessionState::active, {"t-1", "TEST\\alice"}});
  raw.send(cbp::serialize(cbp::Message{r}));
  auto answer = next_message(raw);
  REQUIRE(answer.has_value());
  REQUIRE_MESSAGE(std::holds_alternative<cbp::Registered>(*answer), cbp::describe(*answer));
  REQUIRE(await_session(api, "t-1", "state", "Active") == "Active");

  // docs/cbp.md "Logoff, disconnect, message": an admin's session action becomes a command with
  // timeout_ms 5000 (the launch's prepare_session has the same one).
  for (const auto& [action, body, command] :
       {std::tuple<std::string, std::string, std::string>{"message", R"({"text":"hello"})", "send_message"},
        {"disconnect", "{}", "disconnect_session"},
        {"logoff", "", "logoff_session"}}) {
    CAPTURE(action);
    auto reply = std::async(std::launch::async, [&daemon, action = action, body = body] {
      Api own(daemon);
      return own.action("t-1", action, body).status;
    });
    auto m = next_message(raw);
    REQUIRE(m.has_value());
    const auto* c = std::get_if<cbp::Command>(&*m);
    REQUIRE_MESSAGE(c != nullptr, cbp::describe(*m));
    CHECK(cbp::command_name(c->args) == command);
    CHECK(c->timeout_ms == 5000);
    raw.send(cbp::serialize(cbp::Message{cbp::CommandResult{c->id, true, ""}}));
    CHECK(reply.get() == 200);
  }
  raw.close();
}

TEST_CASE("cbp: a protocol error closes only the connection that made it") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config())), daemon.log());
  Api api(daemon);
  auto opts = fleet_options(daemon);
  opts.backoff_base = Millis{60000};  // the offenders stay away for the rest of the test
  vda::Fleet fleet(opts);
  auto garbled = fleet.add(with_secret(machine_config("TEST\\vm-1", "desktops", 1), api.new_secret("TEST\\vm-1")));
  auto strange = fleet.add(with_secret(machine_config("TEST\\vm-2", "desktops", 2), api.new_secret("TEST\\vm-2")));
  auto bystander = fleet.add(with_secret(machine_config("TEST\\vm-3", "desktops", 3), api.new_secret("TEST\\vm-3")));
  fleet.start();
  for (const auto& m : fleet.machines()) REQUIRE_MESSAGE(registered(m), describe(m));

  garbled.send_raw(R"({"type":"heartbeat","load_index":)");
  strange.send_raw(R"({"type":"dance","steps":3})");
  for (const auto& m : {garbled, strange}) {
    INFO(m.name());
    CHECK_MESSAGE(ended_with_error(m, cbp::Reason::protocol_error), describe(m));
    CHECK(m.status().errors.size() == 1);
  }
  // docs/cbp.md "Other closes by the broker": a protocol error after registered is recorded as
  // ContactLost, and the machine is no longer Registered.
  for (const auto& m : {garbled, strange}) {
    INFO(m.name());
    CHECK(await_machine(api, m.name(), "registration_state", "Unregistered") == "Unregistered");
    CHECK(api.machine_field(m.name(), "last_deregistration_reason") == "ContactLost");
  }

  // The other connection is unaffected and still heard.
  CHECK(bystander.status().state == vda::State::registered);
  CHECK(bystander.status().errors.empty());
  CHECK(bystander.status().registrations == 1);
  REQUIRE(bystander.add_session({"b-1", "TEST\\bob"}, cbp::SessionState::active));
  CHECK(await_session(api, "b-1", "state", "Active") == "Active");
  CHECK(api.machine_field("TEST\\vm-3", "registration_state") == "Registered");

  // During the handshake, garbage instead of hello gets `rejected` and the connection closes.
  net::WebSocketClientPool pool(1);
  vda::RawConnection raw(pool, url(daemon));
  REQUIRE(raw.wait_open(kWait));
  auto challenge = next_message(raw);
  REQUIRE(challenge.has_value());
  REQUIRE(std::holds_alternative<cbp::Challenge>(*challenge));
  raw.send("this is not JSON");
  auto answer = next_message(raw);
  REQUIRE(answer.has_value());
  CHECK_MESSAGE(std::holds_alternative<cbp::Rejected>(*answer), cbp::describe(*answer));
  CHECK(raw.wait_closed(kWait));
  CHECK(bystander.status().state == vda::State::registered);
}

TEST_CASE("cbp: a thousand agents enroll, register and stop gracefully") {
  constexpr int kMachines = 1000;
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config())), daemon.log());
  Api api(daemon);
  auto opts = fleet_options(daemon);
  opts.threads = 2;
  opts.start_spread = Millis{2000};
  vda::Fleet fleet(opts);
  std::set<std::string> expected;
  for (int i = 1; i <= kMachines; ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "TEST\\load-%04d", i);
    auto cfg = machine_config(name, "desktops", 0);
    cfg.address = vda::nth_address("10.98.0.1", static_cast<std::uint32_t>(i)) + ":1494";
    cfg.enroll_key = kEnrollKey;
    fleet.add(cfg);
    expected.insert(name);
  }
  fleet.start();
  const Millis kFleetWait{60000};
  CHECK(poll<std::size_t>([&] { return fleet.count(vda::State::registered); }, kMachines, kFleetWait) == kMachines);
  CHECK(fleet.secrets().all().size() == kMachines);

  // The admin API agrees, page by page.
  CHECK(poll<std::int64_t>([&] { return api.total("/api/v1/machines?registration_state=Registered&limit=1"); },
                           kMachines) == kMachines);
  std::set<std::string> seen;
  for (int offset = 0;; offset += 300) {
    auto page = api.get("/api/v1/machines?registration_state=Registered&limit=300&offset=" + std::to_string(offset));
    REQUIRE(page.has_value());
    const auto& items = page->at("items").as_array();
    for (const auto& item : items) seen.insert(text(item.as_object(), "name"));
    if (items.size() < 300) break;
  }
  CHECK(seen == expected);
  auto metrics = api.call("GET", "/metrics");
  CHECK(metrics.body.find("broker_machines{registration_state=\"Registered\"} " + std::to_string(kMachines) + "\n") !=
        std::string::npos);

  CHECK(fleet.stop(cbp::Reason::agent_shutdown, kFleetWait) == 0);
  CHECK(poll<std::int64_t>([&] { return api.total("/api/v1/machines?registration_state=Registered&limit=1"); }, 0) ==
        0);
  CHECK(api.total("/api/v1/machines?catalog=desktops&last_deregistration_reason=AgentShutdown&limit=1") ==
        kMachines);
  CHECK(api.total("/api/v1/machines?catalog=desktops&registration_state=Unregistered&limit=1") == kMachines + 4);
}

TEST_CASE("cbp: agents that follow a simulated hypervisor's power states") {
  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config())), daemon.log());
  Api api(daemon);
  vda::Fleet fleet(fleet_options(daemon));
  auto off = fleet.add(with_secret(machine_config("TEST\\vm-1", "desktops", 1), api.new_secret("TEST\\vm-1")));
  auto unnamed = fleet.add(with_secret(machine_config("TEST\\vm-2", "desktops", 2), api.new_secret("TEST\\vm-2")));
  const auto file = dir.file("power-state.json");
  dir.write("power-state.json", R"({"machines": {"vm-1": "Off"}})");
  vda::PowerFollower follower(fleet, file, Millis{50});
  follower.start();
  // A machine the file does not name runs as usual; one whose VM is off stays down.
  REQUIRE_MESSAGE(registered(unnamed), describe(unnamed));
  CHECK_FALSE(off.status().running);
  CHECK(off.status().connects == 0);

  // Powered on: its agent registers. Shut down: goodbye AgentShutdown. Suspended: AgentSuspended.
  dir.write("power-state.json", R"({"machines": {"vm-1": "On"}})");
  REQUIRE_MESSAGE(registered(off), describe(off));
  CHECK(await_machine(api, "TEST\\vm-1", "registration_state", "Registered") == "Registered");
  dir.write("power-state.json", R"({"machines": {"vm-1": "Off"}})");
  CHECK(await_machine(api, "TEST\\vm-1", "registration_state", "Unregistered") == "Unregistered");
  CHECK(api.machine_field("TEST\\vm-1", "last_deregistration_reason") == "AgentShutdown");
  dir.write("power-state.json", R"({"machines": {"TEST\\vm-1": "On"}})");  // full names work too
  CHECK(await_machine(api, "TEST\\vm-1", "registration_state", "Registered") == "Registered");
  dir.write("power-state.json", R"({"machines": {"vm-1": "Suspended"}})");
  CHECK(await_machine(api, "TEST\\vm-1", "last_deregistration_reason", "AgentSuspended") == "AgentSuspended");
  // A file being rewritten (not JSON) changes nothing.
  dir.write("power-state.json", "{\"machin");
  CHECK_FALSE(follower.apply());
  CHECK(unnamed.status().state == vda::State::registered);
}

TEST_CASE("cbp: mutual TLS: an agent needs a client certificate from the configured CA, and its proof too") {
  net::test::TestPki pki;
  TempDir dir;
  Daemon daemon(dir);
  const std::string agent_tls = "tls_cert = \"" + pki.server_cert + "\"\ntls_key = \"" + pki.server_key +
                                "\"\ntls_client_ca = \"" + pki.ca + "\"\n";
  REQUIRE_MESSAGE(daemon.start(itest::base_config(dir, site_config(), agent_tls)), daemon.log());
  Api api(daemon);
  const std::string wss = "wss://localhost:" + std::to_string(daemon.agent_port()) + "/cbp";
  const auto secret = api.new_secret("TEST\\vm-1");
  const auto vm1 = with_secret(machine_config("TEST\\vm-1", "desktops", 1), secret);
  auto opts = fleet_options(daemon);
  opts.broker_url = wss;
  opts.ca_file = pki.ca;
  // The attempts that fail at the TLS handshake: never a CBP message, so never registered.
  const auto cannot_connect = [&](const vda::FleetOptions& o) {
    vda::Fleet fleet(o);
    auto m = fleet.add(vm1);
    m.start();
    const bool failed =
        m.wait_for([](const vda::MachineStatus& s) { return s.last_close.starts_with("cannot connect: "); }, kWait);
    const auto s = m.status();
    m.stop();
    INFO(describe(m));
    CHECK(s.registrations == 0);
    CHECK(s.rejections.empty());  // refused before CBP: nothing a broker could have said
    return failed;
  };

  // Without a client certificate.
  CHECK(cannot_connect(opts));
  // With a certificate of another CA.
  auto other = opts;
  other.client_cert_file = pki.other_client_cert;
  other.client_key_file = pki.other_client_key;
  CHECK(cannot_connect(other));
  // A bare connection without one cannot even open.
  net::WebSocketClientPool pool(1);
  vda::RawConnection raw(pool, wss);
  CHECK_FALSE(raw.wait_open(kWait));
  CHECK_FALSE(raw.failure().empty());
  CHECK(api.machine_field("TEST\\vm-1", "registration_state") == "Unregistered");
  // The listener logged each refusal with OpenSSL's reason.
  const auto logged = [&](const std::string& text) { return daemon.log().find(text) != std::string::npos; };
  CHECK(
      poll<bool>([&] { return logged("client certificate rejected: unable to get local issuer certificate"); }, true));
  CHECK(logged("client certificate rejected: peer did not return a certificate"));
  CHECK(logged("client certificates required"));

  // With a certificate from the CA the machine registers as usual.
  auto with_cert = opts;
  with_cert.client_cert_file = pki.client_cert;
  with_cert.client_key_file = pki.client_key;
  vda::Fleet fleet(with_cert);
  auto m = fleet.add(vm1);
  m.start();
  REQUIRE_MESSAGE(registered(m), describe(m));
  CHECK(await_machine(api, "TEST\\vm-1", "registration_state", "Registered") == "Registered");

  // The certificate comes on top of the machine's proof, it does not replace it.
  auto guesser = fleet.add(with_secret(machine_config("TEST\\vm-2", "desktops", 2), api.new_secret("TEST\\vm-2")));
  vda::Faults wrong;
  wrong.bad_proof = true;
  guesser.set_faults(wrong);
  guesser.start();
  CHECK_MESSAGE(rejected_with(guesser, cbp::Reason::bad_proof), describe(guesser));
  guesser.crash();
  CHECK(api.machine_field("TEST\\vm-2", "registration_state") == "Unregistered");

  // TLS files the agent cannot use are a start-up error of the fleet.
  auto broken = with_cert;
  broken.client_key_file = pki.other_client_key;
  CHECK_THROWS_WITH_AS(vda::Fleet{broken}, doctest::Contains("does not match certificate"), std::runtime_error);

  // The agent checks the broker (SECURITY.md 9.6): a wss:// URL without a CA file is refused at
  // start unless `insecure` says so by name, and a broker whose certificate another CA signed
  // is never reached.
  auto unchecked = with_cert;
  unchecked.ca_file.clear();
  CHECK_THROWS_WITH_AS(vda::Fleet{unchecked}, doctest::Contains("needs a CA file"), std::runtime_error);
  auto wrong_ca = with_cert;
  wrong_ca.ca_file = pki.other_ca;
  CHECK(cannot_connect(wrong_ca));
  unchecked.insecure = true;
  vda::Fleet insecure_fleet(unchecked);
  auto m3 = insecure_fleet.add(with_secret(machine_config("TEST\\vm-3", "desktops", 3), api.new_secret("TEST\\vm-3")));
  m3.start();
  CHECK_MESSAGE(registered(m3), describe(m3));
  m3.stop();
}
