// Crash safety under load (issue 15, requirement 3): a logon storm against the real brokerd while
// its agents heartbeat, brokerd killed with SIGKILL at a random moment, restarted on the same
// database and ports, the agents re-register, and then what every answered launch promised is
// checked.
//
// "Can still be connected to" (docs/architecture.md: the assignment and the pending session are
// durable before the reply leaves; docs/nfuse.md "Launching"; docs/cbp.md "Session
// reconciliation" and "Ticket redemption"): for every launch answered with an address, after the
// crash and the re-registration,
//   * the broker still has the launch's session for that user on the machine the address names,
//     in the state the machine's agent reports;
//   * if the user's client had not connected yet, it connects now with the ticket it was given:
//     the agent redeems it, the broker answers with that user and the session goes Active;
//   * if the client had logged on, the user's next RequestAddress for the same desktop reconnects
//     to the same session on the same machine and the client logs on again with the new ticket;
//   * a ticket that was redeemed (before or after the crash) is refused when presented again.
// A user's step that the crash interrupted (a request without a reply, a logon whose ticket reply
// never came) promised nothing: the broker's view then has to agree with the agent's, and
// sessions of unanswered launches are logged off by an admin. Besides: no single-session machine
// has two live sessions (in the broker's list, and as the launches' answers say), every user's
// assign-on-first-use machine stays the one they were given (one assignment per user and per
// machine, none lost), and PRAGMA integrity_check passes after every kill and at the end.
//
// The storm: kUsers users in kWorkers concurrent front-end threads launch a shared single-session
// desktop ("Pool"), an assign-on-first-use one ("Personal") and a multi-session host's desktop
// ("Hosted"), reconnect, and log off, while the agents heartbeat every 5 s. Nothing here depends
// on timing: each kill comes after at least kMinAnswered answered launches of its round, at a
// random moment after that.
//
// The length comes from the environment (scripts/crash-test sets it): OPENBROKER_CRASH_KILLS (the
// number of kills, default 3), OPENBROKER_CRASH_SECONDS (keep killing until this many seconds
// have passed, default 0: only the kills), OPENBROKER_CRASH_SEED (default: random). The figures
// are printed at the end ("crash-test: ...").
#include "tests/integration/daemon.hpp"
#include "tests/integration/support.hpp"

#include "common/crypto.hpp"
#include "net/http_client.hpp"
#include "tools/vda-agent/agent.hpp"

#include <boost/json.hpp>
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using itest::Daemon;
using itest::TempDir;
using namespace itest::support;

namespace {

const std::string kEnrollKey = "crash-test-enrollment-key";
constexpr int kPool = 40;      // CRASH\pool-1..40: shared single-session desktops ("Pool")
constexpr int kPersonal = 40;  // CRASH\pc-1..40: private desktops assigned on first use ("Personal")
constexpr int kHosts = 4;      // CRASH\host-1..4: multi-session hosts ("Hosted"), 20 sessions each
constexpr int kUsers = 30;     // CRASH\u01..u30
constexpr int kWorkers = 6;    // concurrent front-end threads, each serving kUsers / kWorkers users
constexpr int kMinAnswered = 8;  // launches answered in a round before its kill may come
constexpr int kTicketTtl = 120;  // seconds: outlives a round; a held launch is checked well within it

const std::vector<std::string> kGroups{"Pool", "Personal", "Hosted"};

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

std::string user_name(int n) {
  char b[8];
  std::snprintf(b, sizeof b, "u%02d", n);
  return b;
}

// Trusted front end (identity assertion): users launch by name.
std::string site_config(const TempDir& dir, const std::string& ports) {
  const std::string key_hash = common::crypto::sha256_hex(kEnrollKey);
  std::ostringstream c;
  c << "\n[site]\nsite_name = \"Crash test\"\ndefault_domain = \"CRASH\"\ntrust_xml_requests = true\n"
    << "trusted_front_ends = [\"127.0.0.1\"]\nlogon_ticket_ttl_seconds = " << kTicketTtl
    << "\nheartbeat_interval_seconds = 5\n";
  auto catalog = [&](const std::string& name, const std::string& allocation, const std::string& support) {
    c << "\n[[catalog]]\nname = \"" << name << "\"\nallocation_type = \"" << allocation << "\"\nsession_support = \""
      << support << "\"\nenrollment_key_hash = \"" << key_hash << "\"\n";
  };
  catalog("pool", "Random", "SingleSession");
  catalog("private", "Static", "SingleSession");
  catalog("hosts", "Random", "MultiSession");
  auto group = [&](const std::string& name, const std::string& kind, const std::string& support,
                   const std::string& rule_type) {
    c << "\n[[delivery_group]]\nname = \"" << name << "\"\ndesktop_kind = \"" << kind
      << "\"\ndelivery_type = \"DesktopsOnly\"\nsession_support = \"" << support << "\"\n";
    c << "\n[[rule]]\nname = \"" << name << " access\"\nrule_type = \"access\"\ndelivery_group = \"" << name
      << "\"\nincluded_users = [\"CRASH\\\\Users\"]\n";
    c << "\n[[rule]]\nname = \"" << name << "\"\nrule_type = \"" << rule_type << "\"\ndelivery_group = \"" << name
      << "\"\nincluded_users = [\"CRASH\\\\Users\"]\n";
    if (rule_type == "assignment") c << "max_desktops = 1\n";
  };
  group("Pool", "Shared", "SingleSession", "entitlement");
  group("Personal", "Private", "SingleSession", "assignment");
  group("Hosted", "Shared", "MultiSession", "entitlement");
  auto machines = [&](const std::string& prefix, int count, const std::string& cat, const std::string& grp) {
    c << "\n[[machine]]\nname = \"CRASH\\\\" << prefix << "-{n}\"\ncount = " << count << "\ncatalog = \"" << cat
      << "\"\ndelivery_group = \"" << grp << "\"\n";
  };
  machines("pool", kPool, "pool", "Pool");
  machines("pc", kPersonal, "private", "Personal");
  machines("host", kHosts, "hosts", "Hosted");
  std::string members;
  for (int i = 1; i <= kUsers; ++i) {
    c << "\n[[user]]\nname = \"" << user_name(i) << "\"\ndomain = \"CRASH\"\n";
    members += (members.empty() ? "\"" : ", \"") + user_name(i) + "\"";
  }
  c << "\n[[group]]\nname = \"Users\"\ndomain = \"CRASH\"\nmembers = [" << members << "]\n";
  std::string base = itest::base_config(dir, c.str());
  // The same ports after every restart: "port = 0" three times (xml, agent, admin), in that order.
  std::istringstream p(ports);
  for (std::string port; p >> port;) base.replace(base.find("port = 0"), 8, "port = " + port);
  return base;
}

std::string request_address(const std::string& user, const std::string& group) {
  return R"(<?xml version="1.0" encoding="UTF-8"?>
<NFuseProtocol version="5.1"><RequestAddress><Name><AppName>)" + group + R"(</AppName></Name>
<ClientName>PC-)" + user + R"(</ClientName><ClientAddress addresstype="dot">192.0.2.10</ClientAddress>
<ServerAddress addresstype="dot-port"/><Flags><IncludeTicket/></Flags>
<Credentials><ID type="SAM">CRASH\)" + user + R"(</ID></Credentials></RequestAddress></NFuseProtocol>)";
}

std::string element(const std::string& body, const std::string& name) {
  const std::regex re("<" + name + "(?: [^>]*)?>([^<]*)</" + name + ">");
  std::smatch m;
  return std::regex_search(body, m, re) ? m[1].str() : std::string();
}

struct Answer {
  bool replied = false;  // false: no HTTP reply (the broker went away)
  std::string address, ticket, session, error, body;
  bool reconnect = false;
};

Answer launch(net::HttpClient& http, const std::string& user, const std::string& group) {
  Answer a;
  auto r = http.request("POST", "/scripts/wpnbr.dll", request_address(user, group), {{"Content-Type", "text/xml"}});
  if (!r || r->status != 200) return a;
  a.replied = true;
  a.body = r->body;
  a.address = element(a.body, "ServerAddress");
  a.ticket = element(a.body, "Ticket");
  const auto tag = element(a.body, "TicketTag");
  a.session = tag.rfind("OBSession:", 0) == 0 ? tag.substr(10) : std::string();
  a.error = element(a.body, "ErrorId");
  a.reconnect = a.body.find("<DisconnectedSession/>") != std::string::npos;
  return a;
}

// Agents for every machine: pool-n at 10.99.0.n, pc-n at 10.99.1.n, host-n at 10.99.2.n.
struct Agents {
  vda::Fleet fleet;
  std::map<std::string, vda::Machine> by_name;
  std::map<std::string, std::string> by_address;  // "10.99.0.1:1494" -> machine
  std::set<std::string> single;                   // addresses of single-session machines

  explicit Agents(const Daemon& d) : fleet(options(d)) {
    for (int i = 1; i <= kPool; ++i) add("pool-" + std::to_string(i), "pool", "10.99.0." + std::to_string(i), true);
    for (int i = 1; i <= kPersonal; ++i) add("pc-" + std::to_string(i), "private", "10.99.1." + std::to_string(i), true);
    for (int i = 1; i <= kHosts; ++i) add("host-" + std::to_string(i), "hosts", "10.99.2." + std::to_string(i), false);
    fleet.start();
  }
  static vda::FleetOptions options(const Daemon& d) {
    auto o = fleet_options(d);  // clients connect only when the test says so
    o.backoff_base = Millis{200};
    o.backoff_max = Millis{1000};
    return o;
  }
  void add(const std::string& short_name, const std::string& catalog, const std::string& ip, bool single_session) {
    vda::MachineConfig c;
    c.name = "CRASH\\" + short_name;
    c.catalog = catalog;
    c.enroll_key = kEnrollKey;
    c.address = ip + ":1494";
    c.session_support = single_session ? cbp::SessionSupport::single_session : cbp::SessionSupport::multi_session;
    c.max_sessions = 20;
    by_name[c.name] = fleet.add(c);
    by_address[c.address] = c.name;
    if (single_session) single.insert(c.address);
  }
  vda::Machine* at(const std::string& address) {
    auto it = by_address.find(address);
    return it == by_address.end() ? nullptr : &by_name.at(it->second);
  }
};

// The agent's view of one session: nullopt when the agent does not have it.
std::optional<cbp::SessionState> agent_state(const vda::Machine& m, const std::string& key) {
  for (const auto& v : m.status().sessions)
    if (v.info.session_key == key) return v.state;
  return std::nullopt;
}

// Waits until the client's logon to `key` has an outcome; true when the session is Active. Ends
// early when the agent drops the session (a failed logon) or loses its broker.
bool logged_on(const vda::Machine& m, const std::string& key) {
  m.wait_for(
      [&](const vda::MachineStatus& s) {
        if (s.state != vda::State::registered) return true;
        for (const auto& v : s.sessions)
          if (v.info.session_key == key) return v.state == cbp::SessionState::active;
        return true;
      },
      kWait);
  return agent_state(m, key) == cbp::SessionState::active;
}

// Waits until the broker has ended the session; returns its last state ("LoggedOff" when ended
// or removed).
std::string await_ended(Api& api, const std::string& key) {
  return poll<std::string>(
      [&] {
        const auto state = api.session_field(key, "state");
        return state == "<gone>" ? std::string("LoggedOff") : state;
      },
      "LoggedOff");
}

// What the test knows of one user's desktop of one group.
struct Slot {
  enum class State {
    none,       // no session the test knows of
    held,       // answered; the client has not connected yet
    active,     // the client logged on (Active)
    unsettled,  // the crash interrupted the user's last step on `session` (may have ended)
  };
  State state = State::none;
  std::string session, address, ticket;
  // The crash swallowed a reconnect's reply: the agent may hold a preparation the test has no
  // ticket for, so the user logs off instead of reconnecting.
  bool maybe_reconnecting = false;
};

struct Ticket {
  std::string ticket, address, session;
  bool used = false;  // redeemed by a logon the test saw succeed
  int round = 0;
};

struct Figures {
  int kills = 0, rounds = 0;
  std::atomic<int> answered{0}, answered_new{0}, answered_reconnect{0}, refused{0}, unanswered{0};
  std::atomic<int> logons{0}, logoffs{0}, interrupted{0};
  int held_connected = 0, reconnected = 0, followed_agent = 0, orphans = 0, tickets_rechecked = 0;
  int checks = 0, integrity_checks = 0;
};

// The storm and its checks.
class Storm {
 public:
  Storm(TempDir& dir, Daemon& daemon, Agents& agents, unsigned seed)
      : dir_(dir), daemon_(daemon), agents_(agents), rng_(seed), slots_(kUsers + 1, std::vector<Slot>(kGroups.size())) {}

  Figures figures;

  // A check that counts (doctest reports the failure).
  void expect(bool ok, const std::string& what) {
    ++figures.checks;
    CHECK_MESSAGE(ok, what);
  }

  // One round: the storm, a SIGKILL at a random moment after kMinAnswered answers, the integrity
  // check of the database the crash left, a restart on the same database and ports.
  void round(const std::string& config) {
    ++figures.rounds;
    ++round_;
    answered_round_ = 0;
    killed_ = false;
    std::vector<std::thread> workers;
    for (int w = 0; w < kWorkers; ++w) workers.emplace_back([this, w, seed = rng_()] { work(w, seed); });
    // The kill: after enough answers, a random 0..1500 ms later.
    const auto start = std::chrono::steady_clock::now();
    while (answered_round_ < kMinAnswered && std::chrono::steady_clock::now() - start < std::chrono::seconds(60))
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    const int answered_before_kill = answered_round_;
    std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(0, 1500)(rng_)));
    killed_ = true;  // first: a request failing from now on is the crash's
    daemon_.kill();
    ++figures.kills;
    for (auto& t : workers) t.join();
    // Not vacuous: the round's kill came after answered launches.
    expect(answered_before_kill >= kMinAnswered,
           "round " + std::to_string(round_) + ": only " + std::to_string(answered_before_kill) +
               " launches answered before the kill");
    integrity_check("after kill " + std::to_string(figures.kills));
    logs_ += "==== brokerd run " + std::to_string(round_) + " (killed)\n" + daemon_.log();
    REQUIRE_MESSAGE(daemon_.start(config), daemon_.log());
  }

  // Every agent registered again (a new connection to the restarted broker) and the broker agrees.
  void await_registered() {
    Api api(daemon_);
    for (auto& [name, m] : agents_.by_name) {
      const int before = registrations_[name];
      const bool again = m.wait_for(
          [before](const vda::MachineStatus& s) { return s.registrations > before && s.state == vda::State::registered; },
          kWait);
      REQUIRE_MESSAGE(again, describe(m));
      REQUIRE(await_machine(api, name, "registration_state", "Registered") == "Registered");
      registrations_[name] = m.status().registrations;
    }
  }

  // After the restart: what every answered launch promised, then the site-wide invariants.
  void verify() {
    Api api(daemon_);
    net::HttpClient http("http://127.0.0.1:" + std::to_string(daemon_.xml_port()));
    for (int u = 1; u <= kUsers; ++u)
      for (std::size_t g = 0; g < kGroups.size(); ++g) verify_slot(api, http, u, g);
    recheck_used_tickets();
    clean_orphans(api);
    invariants(api);
  }

  // At the end: every ticket the test was given, presented twice: a used one is refused both
  // times, any other is accepted at most once.
  void final_tickets() {
    for (auto& t : tickets_) {
      auto* m = agents_.at(t.address);
      REQUIRE(m);
      int ok = 0;
      for (int i = 0; i < 2; ++i) ok += m->redeem(t.ticket, t.session).get().ok ? 1 : 0;
      ++figures.tickets_rechecked;
      expect(ok <= (t.used ? 0 : 1), "ticket of session " + t.session + " (round " + std::to_string(t.round) +
                                         ") redeemed " + std::to_string(ok) + " more times" +
                                         (t.used ? " after its logon" : ""));
    }
  }

  void integrity_check(const std::string& when) {
    auto r = itest::run_command({"/usr/bin/sqlite3", "-readonly", dir_.file("broker.db"), "PRAGMA integrity_check;"});
    ++figures.integrity_checks;
    expect(r.exit_code == 0 && r.out == "ok\n", "PRAGMA integrity_check " + when + ": " + r.out + r.err);
  }

  // What every killed brokerd wrote to stderr, then the last one's.
  std::string logs() const { return logs_ + "==== brokerd last run\n" + daemon_.log(); }

  std::vector<std::string> violations() {
    std::lock_guard lock(mutex_);
    return violations_;
  }

 private:
  // ---- the storm (worker threads: no doctest assertions here, violations are collected) ----

  void violation(const std::string& what) {
    std::lock_guard lock(mutex_);
    violations_.push_back("round " + std::to_string(round_) + ": " + what);
  }

  // The broker's state of a session ("<gone>": none; "": no answer), through the admin API.
  static std::string broker_state(net::HttpClient& admin, const std::string& key) {
    auto r = admin.request("GET", "/api/v1/sessions/" + net::percent_encode(key), {},
                           {{"Authorization", std::string("Bearer ") + itest::kToken}});
    if (!r) return {};
    if (r->status == 404) return "<gone>";
    boost::system::error_code ec;
    auto v = json::parse(r->body, ec);
    if (ec || !v.is_object()) return {};
    return text(v.as_object(), "state");
  }

  // Waits until the broker has the session in one of `want` (a user's next step depends on what
  // the broker has heard from the agent). False when it does not, or brokerd went away.
  bool broker_reaches(net::HttpClient& admin, const std::string& key, const std::set<std::string>& want) {
    const auto deadline = std::chrono::steady_clock::now() + kWait;
    while (!killed_ && std::chrono::steady_clock::now() < deadline) {
      if (want.contains(broker_state(admin, key))) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

  void work(int worker, unsigned seed) {
    std::mt19937 rng(seed);
    net::HttpClient http("http://127.0.0.1:" + std::to_string(daemon_.xml_port()), std::chrono::seconds(30));
    net::HttpClient admin(daemon_.admin_url(), std::chrono::seconds(30));
    std::vector<int> users;
    for (int u = 1 + worker; u <= kUsers; u += kWorkers) users.push_back(u);
    while (!killed_) {
      const int u = users[std::uniform_int_distribution<std::size_t>(0, users.size() - 1)(rng)];
      const std::size_t g = std::uniform_int_distribution<std::size_t>(0, kGroups.size() - 1)(rng);
      step(http, admin, rng, u, g);
    }
  }

  // One user's next step on one desktop.
  void step(net::HttpClient& http, net::HttpClient& admin, std::mt19937& rng, int u, std::size_t g) {
    Slot& slot = slots_[u][g];
    const std::string user = user_name(u), group = kGroups[g];
    switch (slot.state) {
      case Slot::State::held:
      case Slot::State::unsettled:
        return;  // settled after the restart
      case Slot::State::active:
        if (std::uniform_int_distribution<int>(0, 2)(rng) == 0) {
          // The user logs off (on the machine); the machine is free once the broker hears it.
          release(slot.address, slot.session);
          if (auto* m = agents_.at(slot.address)) m->logoff_session(slot.session);
          ++figures.logoffs;
          if (!broker_reaches(admin, slot.session, {"LoggedOff", "<gone>"})) {
            slot.state = Slot::State::unsettled;
            if (!killed_) violation("the broker did not end session " + slot.session + " its agent logged off");
            return;
          }
          slot = {};
          return;
        }
        break;
      case Slot::State::none:
        break;
    }
    const bool reconnect = slot.state == Slot::State::active;
    const bool down_before = killed_;
    Answer a = launch(http, user, group);
    if (!a.replied) {
      ++figures.unanswered;
      // A new launch without a reply may still have been stored (an orphan, logged off after the
      // restart); an interrupted reconnect leaves the session to be compared with its agent.
      if (reconnect) {
        slot.state = Slot::State::unsettled;
        slot.maybe_reconnecting = true;
      }
      if (!down_before && !killed_) violation("RequestAddress of " + user + " for " + group + " got no reply while brokerd ran");
      return;
    }
    if (!a.error.empty() || a.address.empty()) {
      ++figures.refused;
      // Refusals are legitimate only when every machine is taken or the session is busy; the
      // storm never exhausts a group (at most one desktop of each kind per user).
      if (reconnect) slot.state = Slot::State::unsettled;
      if (!killed_)
        violation("RequestAddress of " + user + " for " + group + (reconnect ? " (reconnect)" : "") + " refused: " + a.error);
      return;
    }
    ++figures.answered;
    ++answered_round_;
    ++(reconnect ? figures.answered_reconnect : figures.answered_new);
    auto* m = agents_.at(a.address);
    if (!m) return violation("launch of " + user + " answered with unknown address " + a.address);
    if (!reconnect && a.reconnect) violation(user + "'s new launch of " + group + " reconnected to " + a.session);
    if (reconnect) {
      if (a.session != slot.session || a.address != slot.address || !a.reconnect)
        violation(user + "'s launch of " + group + " did not reconnect to " + slot.session + " at " + slot.address + ": " +
                  a.session + " at " + a.address);
    } else {
      claim(a.address, a.session, user);
    }
    if (group == "Personal") expect_personal(user, a.address);
    {
      std::lock_guard lock(mutex_);
      tickets_.push_back({a.ticket, a.address, a.session, false, round_});
    }
    slot.session = a.session;
    slot.address = a.address;
    slot.ticket = a.ticket;
    // A new launch's client connects at once or later (held); a reconnecting client at once.
    if (!reconnect && std::uniform_int_distribution<int>(0, 1)(rng) == 0) {
      slot.state = Slot::State::held;
      return;
    }
    if (!m->client_connects(a.session)) {
      // The agent lost its broker meanwhile: the client will come after the restart.
      slot.state = reconnect ? Slot::State::unsettled : Slot::State::held;
      return;
    }
    if (logged_on(*m, a.session)) {
      ++figures.logons;
      mark_used(a.ticket);
      // Active once the broker has heard it (until then a launch would not reconnect to it).
      if (broker_reaches(admin, a.session, {"Active"})) {
        slot.state = Slot::State::active;
      } else {
        slot.state = Slot::State::unsettled;
        if (!killed_) violation("the broker did not see session " + a.session + " Active after its logon");
      }
    } else {
      ++figures.interrupted;
      slot.state = Slot::State::unsettled;
      if (!killed_) violation(user + "'s client could not log on to " + a.session + " at " + a.address + " while brokerd ran");
    }
  }

  // A new session on a single-session machine: no other live session may be there.
  void claim(const std::string& address, const std::string& session, const std::string& user) {
    if (!agents_.single.contains(address)) return;
    std::lock_guard lock(mutex_);
    auto [it, fresh] = live_on_machine_.emplace(address, session);
    if (!fresh && it->second != session)
      violations_.push_back("round " + std::to_string(round_) + ": single-session machine " + address + " given to " +
                            user + " (" + session + ") while session " + it->second + " is live there");
    it->second = session;
  }
  void release(const std::string& address, const std::string& session) {
    std::lock_guard lock(mutex_);
    auto it = live_on_machine_.find(address);
    if (it != live_on_machine_.end() && it->second == session) live_on_machine_.erase(it);
  }
  void expect_personal(const std::string& user, const std::string& address) {
    std::lock_guard lock(mutex_);
    auto [it, fresh] = personal_.emplace(user, address);
    if (!fresh && it->second != address)
      violations_.push_back("round " + std::to_string(round_) + ": " + user + "'s personal desktop moved from " +
                            it->second + " to " + address);
  }
  void mark_used(const std::string& ticket) {
    std::lock_guard lock(mutex_);
    for (auto& t : tickets_)
      if (t.ticket == ticket) t.used = true;
  }

  // ---- after the restart (main thread) ----

  void verify_slot(Api& api, net::HttpClient& http, int u, std::size_t g) {
    Slot& slot = slots_[u][g];
    if (slot.state == Slot::State::none) return;
    const std::string user = user_name(u), group = kGroups[g], qualified = "CRASH\\" + user;
    auto* m = agents_.at(slot.address);
    REQUIRE(m);
    const std::string machine = agents_.by_address.at(slot.address);
    INFO(user << " " << group << " session " << slot.session << " at " << machine << " (test state "
              << static_cast<int>(slot.state) << ")");
    const auto on_agent = agent_state(*m, slot.session);
    if (slot.state == Slot::State::unsettled) {
      ++figures.followed_agent;
      if (!on_agent) {
        // The crash ended it on the machine (a logon whose ticket reply never came): the broker
        // ends it too once the agent re-registered without it, or, for a launch young enough to
        // be still preparing (docs/cbp.md "Session reconciliation"), when an admin logs it off.
        if (api.session_field(slot.session, "state") == "PreparingNewSession") {
          auto r = api.action(slot.session, "logoff");
          expect(r.status == 200, "admin logoff of " + slot.session + ": " + r.body);
        }
        const auto st = await_ended(api, slot.session);
        expect(st == "LoggedOff", "session " + slot.session + " the agent ended is still " + st + " in the broker");
        release(slot.address, slot.session);
        slot = {};
        return;
      }
    } else {
      // Answered, and the user's last step completed: the machine must still have the session.
      expect(on_agent.has_value(), "the agent of " + machine + " lost session " + slot.session);
      if (!on_agent) {
        release(slot.address, slot.session);
        slot = {};
        return;
      }
    }
    // The broker kept the answered launch: the user's session on that machine, in the agent's state.
    const auto stored = api.session(slot.session);
    expect(stored.has_value(), "answered launch lost: no session " + slot.session + " of " + qualified + " on " + machine +
                                   " after the crash");
    if (!stored) {
      slot = {};
      return;
    }
    expect(text(*stored, "user_name") == qualified, "session " + slot.session + " user " + text(*stored, "user_name"));
    expect(text(*stored, "machine") == machine, "session " + slot.session + " machine " + text(*stored, "machine"));
    const std::string want_state = *on_agent == cbp::SessionState::preparing      ? "PreparingNewSession"
                                   : *on_agent == cbp::SessionState::connected    ? "Connected"
                                   : *on_agent == cbp::SessionState::disconnected ? "Disconnected"
                                                                                  : "Active";
    const auto state = await_session(api, slot.session, "state", want_state);
    expect(state == want_state, "session " + slot.session + " is " + state + " in the broker, " + want_state + " on its agent");

    if (slot.maybe_reconnecting) {
      // The user gives up and logs off (the machine's agent ends it; the broker follows).
      release(slot.address, slot.session);
      m->logoff_session(slot.session);
      const auto st = await_ended(api, slot.session);
      expect(st == "LoggedOff", "session " + slot.session + " logged off on its agent is still " + st);
      slot = {};
      return;
    }

    if (*on_agent == cbp::SessionState::preparing) {
      // The client connects now with the ticket it was given.
      expect(m->client_connects(slot.session), "client cannot connect to prepared session " + slot.session);
      const bool on = logged_on(*m, slot.session);
      expect(on, "the client of " + qualified + " could not log on to " + slot.session + " with its ticket after the crash");
      if (on) {
        ++figures.held_connected;
        mark_used(slot.ticket);
      }
    } else {
      // The user's next launch of the desktop reconnects to the same session on the same machine.
      const Answer a = launch(http, user, group);
      expect(a.replied && a.error.empty(), "reconnect of " + qualified + " to " + group + " refused: " + a.error);
      expect(a.session == slot.session && a.address == slot.address,
             qualified + "'s launch of " + group + " after the crash went to " + a.session + " at " + a.address +
                 " instead of " + slot.session + " at " + slot.address);
      if (a.session == slot.session && a.address == slot.address) {
        {
          std::lock_guard lock(mutex_);
          tickets_.push_back({a.ticket, a.address, a.session, false, round_});
        }
        expect(m->client_connects(slot.session), "client cannot reconnect to " + slot.session);
        const bool on = logged_on(*m, slot.session);
        expect(on, "the client of " + qualified + " could not reconnect to " + slot.session + " after the crash");
        if (on) {
          ++figures.reconnected;
          mark_used(a.ticket);
        }
      }
    }
    const auto active = await_session(api, slot.session, "state", "Active");
    expect(active == "Active", "session " + slot.session + " is " + active + " in the broker after the logon");
    expect(api.session_field(slot.session, "user_name") == qualified, "session " + slot.session + " changed user");
    slot.state = Slot::State::active;
  }

  // Tickets used by logons of this round and the one before: the crash must not have revived them.
  void recheck_used_tickets() {
    for (auto& t : tickets_) {
      if (!t.used || t.round < round_ - 1) continue;
      auto* m = agents_.at(t.address);
      const auto r = m->redeem(t.ticket, t.session).get();
      ++figures.tickets_rechecked;
      expect(!r.ok, "ticket of session " + t.session + " redeemed again after its logon and a crash (round " +
                        std::to_string(t.round) + ")");
    }
  }

  // Live sessions the test does not know are those of launches whose reply the crash swallowed:
  // an admin logs them off. Every live session is on a machine whose agent has it (or young).
  void clean_orphans(Api& api) {
    std::set<std::string> known;
    for (const auto& per_user : slots_)
      for (const auto& s : per_user)
        if (s.state != Slot::State::none) known.insert(s.session);
    for (const auto& s : live_sessions(api)) {
      const auto name = text(s, "name");
      if (known.contains(name)) continue;
      ++figures.orphans;
      auto r = api.action(name, "logoff");
      expect(r.status == 200 || r.status == 404 || r.status == 409, "admin logoff of orphan " + name + ": " + r.body);
      const auto st = await_ended(api, name);
      expect(st == "LoggedOff", "orphan session " + name + " is still " + st);
    }
  }

  std::vector<json::object> live_sessions(Api& api) {
    std::vector<json::object> out;
    for (int offset = 0;; offset += 1000) {
      auto page = api.get("/api/v1/sessions?limit=1000&offset=" + std::to_string(offset));
      REQUIRE(page.has_value());
      const auto& items = page->at("items").as_array();
      for (const auto& i : items)
        if (text(i.as_object(), "state") != "LoggedOff") out.push_back(i.as_object());
      if (items.size() < 1000) break;
    }
    return out;
  }

  void invariants(Api& api) {
    // No single-session machine with two live sessions.
    std::map<std::string, int> per_machine;
    for (const auto& s : live_sessions(api)) ++per_machine[text(s, "machine")];
    for (const auto& [machine, n] : per_machine)
      if (machine.find("host-") == std::string::npos)
        expect(n <= 1, machine + " has " + std::to_string(n) + " live sessions");
    // Assignments: one per user and per machine; every user's personal desktop is the one the
    // launches answered (none lost, none duplicated).
    auto page = api.get("/api/v1/assignments?limit=1000");
    REQUIRE(page.has_value());
    std::map<std::string, std::vector<std::string>> of_user;
    std::map<std::string, int> of_machine;
    for (const auto& a : page->at("items").as_array()) {
      of_user[text(a.as_object(), "user")].push_back(text(a.as_object(), "machine"));
      ++of_machine[text(a.as_object(), "machine")];
    }
    for (const auto& [user, machines] : of_user)
      expect(machines.size() == 1, user + " has " + std::to_string(machines.size()) + " assignments");
    for (const auto& [machine, n] : of_machine) expect(n == 1, machine + " is assigned " + std::to_string(n) + " times");
    std::lock_guard lock(mutex_);
    for (const auto& [user, address] : personal_) {
      const auto it = of_user.find("CRASH\\" + user);
      const std::string want = agents_.by_address.at(address);
      expect(it != of_user.end() && it->second.front() == want,
             "assignment of CRASH\\" + user + " to " + want + " lost after the crash");
    }
  }

  TempDir& dir_;
  Daemon& daemon_;
  Agents& agents_;
  std::mt19937 rng_;
  std::vector<std::vector<Slot>> slots_;  // [user][group]; a worker owns its users' rows during a round
  std::map<std::string, int> registrations_;
  int round_ = 0;
  std::string logs_;
  std::atomic<int> answered_round_{0};
  std::atomic<bool> killed_{false};
  std::mutex mutex_;
  std::vector<std::string> violations_;                 // guarded by mutex_
  std::vector<Ticket> tickets_;                         // guarded by mutex_ (during a round)
  std::map<std::string, std::string> live_on_machine_;  // guarded by mutex_: address -> session
  std::map<std::string, std::string> personal_;         // guarded by mutex_: user -> address
};

}  // namespace

TEST_CASE("crash: SIGKILL during a logon storm loses no answered launch, assignment or ticket use") {
  const int kills = std::max(1, env_int("OPENBROKER_CRASH_KILLS", 3));
  const int seconds = env_int("OPENBROKER_CRASH_SECONDS", 0);
  const unsigned seed = static_cast<unsigned>(env_int("OPENBROKER_CRASH_SEED", static_cast<int>(std::random_device{}() & 0x7fffffff)));
  CAPTURE(seed);
  const auto started = std::chrono::steady_clock::now();

  TempDir dir;
  Daemon daemon(dir);
  REQUIRE_MESSAGE(daemon.start(site_config(dir, "")), daemon.log());
  const std::string config = site_config(dir, std::to_string(daemon.xml_port()) + " " + std::to_string(daemon.agent_port()) +
                                                  " " + std::to_string(daemon.admin_port()));
  // The same ports from now on (the agents reconnect to the URL they know).
  daemon.stop();
  REQUIRE_MESSAGE(daemon.start(config), daemon.log());
  Agents agents(daemon);
  Storm storm(dir, daemon, agents, seed);
  storm.await_registered();

  for (int k = 0;; ++k) {
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    if (k >= kills && elapsed >= seconds) break;
    storm.round(config);
    storm.await_registered();
    storm.verify();
  }
  storm.final_tickets();
  for (const auto& v : storm.violations()) {
    ++storm.figures.checks;
    FAIL_CHECK(v);
  }
  if (const char* keep = std::getenv("OPENBROKER_CRASH_LOG"); keep && *keep) {
    std::ofstream(keep) << storm.logs();
  }
  // A clean stop, then the database once more.
  CHECK(daemon.stop() == 0);
  storm.integrity_check("after the final stop");

  const auto& f = storm.figures;
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  std::ostringstream out;
  out << "crash-test: seed " << seed << ", " << f.kills << " kills in " << f.rounds << " rounds, " << f.answered
      << " launches answered (" << f.answered_new << " new, " << f.answered_reconnect << " reconnects), " << f.refused
      << " refused, " << f.unanswered << " unanswered (in flight at a kill), " << f.logons << " logons and "
      << f.logoffs << " logoffs in the storm, " << f.interrupted << " logons interrupted by a kill; after the restarts: "
      << f.held_connected << " held clients connected, " << f.reconnected << " reconnects to the same session, "
      << f.followed_agent << " interrupted steps compared with the agent, " << f.orphans
      << " orphan sessions logged off, " << f.tickets_rechecked << " presentations of used or old tickets checked, "
      << f.integrity_checks << " integrity checks; " << f.checks << " checks, "
      << storm.violations().size() << " violations; " << static_cast<int>(total) << " s\n";
  std::cout << out.str() << std::flush;
  MESSAGE(out.str());
  // Not vacuous: something was launched and checked after every kill.
  CHECK(f.kills >= kills);
  CHECK(f.answered >= f.kills * kMinAnswered);
  CHECK(f.held_connected + f.reconnected > 0);
}
