// Tests of cbp::AgentEndpoint on a real port: a net::Server with the agent listener, the engine's
// broker::AgentRegistry over a temporary SQLite database, and on the other end the reference agent
// (vda::Fleet) or a vda::RawConnection for what no well-behaved agent sends.
//
// Waits are bounded by a generous safety limit (kPatience); the assertions are about behaviour
// (what each side received, what storage holds), never about how long anything took. The
// handshake tests shorten the endpoint's deadlines so that they run quickly.
#include "cbp/endpoint.hpp"

#include "broker/agent_registry.hpp"
#include "broker/engine.hpp"
#include "broker/site_objects.hpp"
#include "common/clock.hpp"
#include "common/crypto.hpp"
#include "common/log.hpp"
#include "common/model.hpp"
#include "common/work_queue.hpp"
#include "net/server.hpp"
#include "net/test_support.hpp"
#include "net/websocket_client.hpp"
#include "storage/repository.hpp"
#include "tools/vda-agent/agent.hpp"
#include "tools/vda-agent/raw_connection.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using common::model::Kind;
using common::model::Object;

namespace {

constexpr auto kPatience = 20s;         // safety net against hangs, not an assertion
constexpr auto kShortDeadline = 500ms;  // handshake deadlines in the tests that exercise them

const std::vector<std::string> kMachines = {"DEMO\\m1", "DEMO\\m2", "DEMO\\m3"};

// Polls `condition` (for state that settles a moment after what the test can wait for).
template <class Condition>
bool eventually(Condition condition) {
  const auto until = std::chrono::steady_clock::now() + kPatience;
  while (!condition()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

bool contains(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

std::shared_ptr<spdlog::logger> test_logger() {
  // CBP_TEST_LOG=debug shows the broker's and the agents' logs when a test needs explaining.
  if (const char* level = std::getenv("CBP_TEST_LOG")) {
    common::LogOptions o;
    o.level = level;
    return common::make_logger(o, "test");
  }
  return common::null_logger();
}

// The registry's storage: the real repository, whose reads and writes fail (errc::storage_error,
// as a full disk or "unable to open database file" would) while a test says so.
class FlakyRepository : public storage::Repository {
 public:
  explicit FlakyRepository(storage::Repository& real) : real_(real) {}
  std::atomic<bool> fail_reads{false};
  std::atomic<bool> fail_writes{false};

  common::Status write(const std::function<common::Status(storage::Transaction&)>& fn) override {
    if (fail_writes) return common::make_error(common::errc::storage_error, "disk I/O error (test)");
    return real_.write(fn);
  }
  common::Status read(const std::function<common::Status(storage::Transaction&)>& fn) override {
    if (fail_reads) return common::make_error(common::errc::storage_error, "unable to open database file (test)");
    return real_.read(fn);
  }
  common::Status ping() override { return real_.ping(); }
  void set_commit_observer(storage::CommitObserver observer) override { real_.set_commit_observer(std::move(observer)); }
  storage::SchemaInfo schema() const override { return real_.schema(); }
  void close() override {}  // the fixture closes the real one

 private:
  storage::Repository& real_;
};

// The broker side: storage with one catalog, one delivery group and three machines that each have
// a secret, the registry (on storage that can be made to fail), the endpoint on a real listener,
// and a fleet of reference agents.
struct Broker {
  std::shared_ptr<spdlog::logger> log = test_logger();
  std::filesystem::path dir;
  // The live state (registration, load); attached to repo, so it outlives the queued commits.
  broker::Engine engine;
  std::unique_ptr<storage::Repository> repo;
  std::unique_ptr<FlakyRepository> flaky;  // the registry's view of repo
  std::unique_ptr<broker::SiteObjects> site;
  common::ManualClock clock{common::SysTime{std::chrono::hours(24 * 365 * 56)}};
  std::unique_ptr<broker::AgentRegistry> registry;
  // One thread: the connections' work runs one task at a time, so a task posted after an event
  // runs after that event's processing (see flush()), and a test can hold the queue (Gate).
  std::unique_ptr<common::WorkQueue> work = std::make_unique<common::WorkQueue>(1);
  std::unique_ptr<cbp::AgentEndpoint> endpoint;
  std::unique_ptr<net::Server> server;
  std::unique_ptr<net::WebSocketClientPool> raw_pool;
  std::unique_ptr<vda::Fleet> fleet;
  std::map<std::string, std::string> secrets;  // machine -> its secret
  std::string url;

  explicit Broker(cbp::EndpointOptions options = {}) {
    dir = std::filesystem::temp_directory_path() / ("cbp_endpoint_test-" + common::crypto::random_hex(8));
    std::filesystem::create_directories(dir);
    auto opened = storage::open_sqlite({(dir / "broker.db").string()});
    REQUIRE(opened.has_value());
    repo = std::move(*opened);
    site = std::make_unique<broker::SiteObjects>(*repo, log);
    std::vector<Object> declared{common::model::make_default(Kind::catalog, "pool"),
                                 common::model::make_default(Kind::delivery_group, "grp")};
    for (const auto& name : kMachines) {
      Object m = common::model::make_default(Kind::machine, name);
      m.fields["catalog"] = std::string("pool");
      m.fields["delivery_group"] = std::string("grp");
      declared.push_back(m);
    }
    REQUIRE(site->reconcile("/etc/openbroker/test.toml", std::nullopt, declared).has_value());
    for (const auto& name : kMachines) {
      auto secret = site->rotate_machine_secret(name, "test");
      REQUIRE(secret.has_value());
      secrets[name] = *secret;
    }
    REQUIRE(engine.attach(*repo));
    flaky = std::make_unique<FlakyRepository>(*repo);
    registry =
        std::make_unique<broker::AgentRegistry>(*flaky, engine, clock, log, cbp::kMaxAuthFailures, cbp::kAuthBackoff);
    endpoint = std::make_unique<cbp::AgentEndpoint>(*registry, *work, options, log);
    server = std::make_unique<net::Server>(2, log);
    net::ListenerOptions agent;
    agent.name = "agent";
    server->add_listener(
        agent,
        [](net::HttpRequest&&, net::Responder respond) {
          net::HttpResponse r;
          r.status = 404;
          respond(std::move(r));
        },
        endpoint->handler());
    server->start();
    url = "ws://127.0.0.1:" + std::to_string(server->port("agent")) + "/cbp";
    raw_pool = std::make_unique<net::WebSocketClientPool>(1);
    vda::FleetOptions fo;
    fo.broker_url = url;
    fo.logger = log;
    fo.client_connect_delay = std::nullopt;  // clients connect only when a test says so
    fleet = std::make_unique<vda::Fleet>(fo);
  }

  ~Broker() {
    fleet.reset();
    raw_pool.reset();
    server->stop(2s);
    work->stop();
    endpoint.reset();
    registry.reset();
    site.reset();
    repo->close();
    repo.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }

  vda::MachineConfig config(const std::string& name) const {
    vda::MachineConfig c;
    c.name = name;
    c.catalog = "pool";
    c.secret = secrets.at(name);
    c.address = "10.99.0.1:1494";
    return c;
  }

  // Starts a reference agent and waits until it is registered.
  vda::Machine start(vda::MachineConfig c, const vda::Faults& faults = {}) {
    vda::Machine m = fleet->add(std::move(c));
    m.set_faults(faults);
    m.start();
    REQUIRE(m.wait_for([](const vda::MachineStatus& s) { return s.state == vda::State::registered; }, kPatience));
    return m;
  }
  vda::Machine start(const std::string& name) { return start(config(name)); }

  // The stored machine with the engine's live fields (registration_state, load_index,
  // summary_state), as the admin API shows it.
  Object machine(const std::string& name) {
    auto m = site->get(Kind::machine, name);
    REQUIRE(m.has_value());
    engine.overlay_live(*m);
    return *m;
  }
  std::optional<Object> session(const std::string& key) {
    auto s = site->get(Kind::session, key);
    if (!s) return std::nullopt;
    return *s;
  }

  // Waits until everything the work queue holds now has run (one worker thread: FIFO).
  void flush() {
    auto done = std::make_shared<std::promise<void>>();
    auto f = done->get_future();
    REQUIRE(work->post([done] { done->set_value(); }));
    REQUIRE(f.wait_for(kPatience) == std::future_status::ready);
  }

  void put_ticket(const std::string& ticket, const std::string& machine, std::chrono::seconds ttl,
                  const std::string& user = "DEMO\\alice") {
    storage::LogonTicket t;
    t.ticket_hash = common::crypto::sha256_hex(ticket);
    t.machine = machine;
    t.user_name = user;
    t.credential_type = "password";
    t.credential_data = R"({"domain":"DEMO","user":"alice","password":"correct horse"})";
    t.expires_at = common::format_time(clock.now() + ttl);
    REQUIRE(repo->write([&](storage::Transaction& tx) { return tx.put_logon_ticket(t); }));
  }
};

// Collects the outcome of one send_command and counts how often `done` was called.
class OutcomeProbe {
 public:
  std::function<void(cbp::CommandOutcome)> callback() {
    return [s = state_](cbp::CommandOutcome o) {
      std::lock_guard lock(s->mutex);
      if (++s->calls == 1) s->outcome = std::move(o);
      s->cv.notify_all();
    };
  }
  cbp::CommandOutcome wait() {
    std::unique_lock lock(state_->mutex);
    REQUIRE(state_->cv.wait_for(lock, kPatience, [&] { return state_->calls > 0; }));
    return *state_->outcome;
  }
  bool done() const {
    std::lock_guard lock(state_->mutex);
    return state_->calls > 0;
  }
  int calls() const {
    std::lock_guard lock(state_->mutex);
    return state_->calls;
  }

 private:
  struct State {
    mutable std::mutex mutex;
    std::condition_variable cv;
    int calls = 0;
    std::optional<cbp::CommandOutcome> outcome;
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

cbp::CommandOutcome run_command(Broker& b, const std::string& machine, cbp::CommandArgs args,
                                std::chrono::milliseconds timeout = 10s) {
  OutcomeProbe probe;
  b.endpoint->send_command(machine, std::move(args), timeout, probe.callback());
  auto outcome = probe.wait();
  CHECK(probe.calls() == 1);
  return outcome;
}

cbp::Ticket redeem(vda::Machine& m, const std::string& ticket, const std::string& session_key = {}) {
  auto f = m.redeem(ticket, session_key);
  REQUIRE(f.wait_for(kPatience) == std::future_status::ready);
  return f.get();
}

cbp::PrepareSessionArgs prepare_args(const std::string& session_key, const std::string& ticket_ref) {
  cbp::PrepareSessionArgs a;
  a.user = "DEMO\\alice";
  a.resource = "Pool Desktop";
  a.ticket_ref = ticket_ref;
  a.session_key = session_key;
  a.connect_timeout_seconds = 600;
  a.client_name = "LAPTOP-ALICE";
  return a;
}

const vda::SessionView* find_session(const vda::MachineStatus& s, const std::string& key) {
  for (const auto& v : s.sessions)
    if (v.info.session_key == key) return &v;
  return nullptr;
}

// --- raw protocol ------------------------------------------------------------------------------

// The next message on a raw connection, parsed (fails the test when none comes or it is invalid).
cbp::Message next_message(vda::RawConnection& c) {
  auto text = c.next(kPatience);
  REQUIRE_MESSAGE(text.has_value(), "no message from the broker");
  auto m = cbp::parse(*text);
  const std::string unparsable = "unparsable message from the broker: " + *text;
  REQUIRE_MESSAGE(m.has_value(), unparsable);
  return *m;
}

template <class T>
T expect(vda::RawConnection& c) {
  cbp::Message m = next_message(c);
  const T* t = std::get_if<T>(&m);
  const std::string unexpected = "expected '" + std::string(T::kType) + "', got " + cbp::serialize(m);
  REQUIRE_MESSAGE(t != nullptr, unexpected);
  return *t;
}

cbp::Hello hello_for(const std::string& machine, const std::string& secret, const std::string& nonce) {
  cbp::Hello h;
  h.machine = machine;
  h.versions = {1};
  h.agent_version = "raw-test/1";
  h.proof = cbp::compute_proof(cbp::secret_hash(secret), nonce, machine, h.versions);
  h.agent_nonce = cbp::make_nonce();
  return h;
}

cbp::Register register_message(std::vector<std::string> capabilities) {
  cbp::Register r;
  r.os = "Raw OS";
  r.session_support = cbp::SessionSupport::single_session;
  r.address = "10.99.0.9:1494";
  r.capabilities = std::move(capabilities);
  return r;
}

// Runs the whole handshake for `machine` by hand; returns when `registered` arrived.
void raw_register(Broker& b, vda::RawConnection& c, const std::string& machine,
                  std::vector<std::string> capabilities = {std::string(cbp::kCapSendMessage)}) {
  REQUIRE(c.wait_open(kPatience));
  const auto challenge = expect<cbp::Challenge>(c);
  const auto hello = hello_for(machine, b.secrets.at(machine), challenge.nonce);
  c.send(cbp::serialize(hello));
  const auto welcome = expect<cbp::Welcome>(c);
  CHECK(cbp::verify_broker_proof(cbp::secret_hash(b.secrets.at(machine)), hello.agent_nonce, challenge.nonce, machine,
                                 welcome.version, welcome.broker_proof));
  c.send(cbp::serialize(register_message(std::move(capabilities))));
  expect<cbp::Registered>(c);
}

// A hello under the catalog "pool"'s enrollment key.
cbp::Hello enroll_hello(const std::string& machine, const std::string& enrollment_key, const std::string& nonce) {
  cbp::Hello h = hello_for(machine, enrollment_key, nonce);
  h.enroll = true;
  h.catalog = "pool";
  return h;
}

// On a new raw connection: the hello `make(nonce)` after the challenge; returns the broker's answer
// (after a rejection, also waits until the broker has closed).
cbp::Message answer_to(Broker& b, const std::function<cbp::Hello(const std::string& nonce)>& make) {
  vda::RawConnection c(*b.raw_pool, b.url);
  REQUIRE(c.wait_open(kPatience));
  const auto challenge = expect<cbp::Challenge>(c);
  c.send(cbp::serialize(make(challenge.nonce)));
  auto answer = next_message(c);
  if (std::holds_alternative<cbp::Rejected>(answer)) CHECK(c.wait_closed(kPatience));
  return answer;
}

cbp::Rejected rejection(const cbp::Message& m) {
  const auto* r = std::get_if<cbp::Rejected>(&m);
  const std::string unexpected = "expected 'rejected', got " + cbp::serialize(m);
  REQUIRE_MESSAGE(r != nullptr, unexpected);
  return *r;
}

void set_enrollment_key(Broker& b, const std::string& key) {
  REQUIRE(b.repo->write([&](storage::Transaction& tx) -> common::Status {
    auto c = tx.get(Kind::catalog, "pool");
    if (!c) return c.error();
    Object o = *c;
    o.fields["enrollment_key_hash"] = cbp::secret_hash(key);
    if (auto r = tx.update("pool", o); !r) return r.error();
    return {};
  }));
}

// --- raw WebSocket frames (for what the WebSocket client never sends: binary frames) ----------

// A masked client frame (as clients must send them), payload < 64 KiB.
std::string client_frame(unsigned char opcode, std::string_view payload) {
  REQUIRE(payload.size() < 65536);
  const unsigned char mask[4] = {0x5a, 0x17, 0xc3, 0x08};
  std::string f;
  f.push_back(static_cast<char>(0x80 | opcode));
  if (payload.size() < 126) {
    f.push_back(static_cast<char>(0x80 | payload.size()));
  } else {
    f.push_back(static_cast<char>(0x80 | 126));
    f.push_back(static_cast<char>(payload.size() >> 8));
    f.push_back(static_cast<char>(payload.size() & 0xff));
  }
  for (unsigned char m : mask) f.push_back(static_cast<char>(m));
  for (std::size_t i = 0; i < payload.size(); ++i) f.push_back(static_cast<char>(payload[i] ^ mask[i % 4]));
  return f;
}

struct Frame {
  int opcode = -1;  // 1 text, 8 close; -1: the connection ended first
  std::string payload;
  int close_code() const {
    return payload.size() < 2 ? 0 : (static_cast<unsigned char>(payload[0]) << 8) | static_cast<unsigned char>(payload[1]);
  }
};

// The next frame from the server (unmasked, unfragmented: what Beast sends here).
Frame read_frame(net::test::RawSocket& sock) {
  const auto head = sock.read_exact(2);
  if (head.size() < 2) return {};
  std::uint64_t n = static_cast<unsigned char>(head[1]) & 0x7f;
  if (n >= 126) {
    const auto ext = sock.read_exact(n == 126 ? 2 : 8);
    n = 0;
    for (unsigned char c : ext) n = (n << 8) | c;
  }
  Frame f;
  f.opcode = static_cast<unsigned char>(head[0]) & 0x0f;
  f.payload = sock.read_exact(static_cast<std::size_t>(n));
  return f;
}

// A raw TCP connection to the agent listener that has completed the WebSocket upgrade and read the
// challenge.
struct RawAgent {
  net::test::RawSocket sock;
  cbp::Challenge challenge;

  // `source`: the local address to connect from (see net::test::RawSocket).
  explicit RawAgent(Broker& b, const char* source = nullptr) : sock(b.server->port("agent"), source) {
    sock.send(
        "GET /cbp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    REQUIRE(sock.read_head().starts_with("HTTP/1.1 101 "));
    challenge = std::get<cbp::Challenge>(next());
  }
  void send(const cbp::Message& m) { sock.send(client_frame(0x1, cbp::serialize(m))); }
  cbp::Message next() {
    const auto f = read_frame(sock);
    REQUIRE_MESSAGE(f.opcode == 0x1, "expected a text frame, got opcode " << f.opcode);
    auto m = cbp::parse(f.payload);
    REQUIRE_MESSAGE(m.has_value(), f.payload);
    return *m;
  }
};

// Holds the work queue (every connection's message processing) until released or destroyed.
class Gate {
 public:
  explicit Gate(common::WorkQueue& work) {
    auto f = open_.get_future().share();
    auto entered = std::make_shared<std::promise<void>>();
    auto in = entered->get_future();
    REQUIRE(work.post([f, entered] {
      entered->set_value();
      f.wait();
    }));
    REQUIRE(in.wait_for(kPatience) == std::future_status::ready);
  }
  ~Gate() { release(); }
  void release() {
    if (released_) return;
    released_ = true;
    open_.set_value();
  }

 private:
  std::promise<void> open_;
  bool released_ = false;
};

}  // namespace

// ---------------------------------------------------------------------------------------------

TEST_CASE("each command reaches the reference agent and its result comes back") {
  Broker b;
  auto m1 = b.start("DEMO\\m1");
  CHECK(contains(b.endpoint->registered_machines(), "DEMO\\m1"));
  CHECK(b.machine("DEMO\\m1").text("registration_state") == "Registered");

  SUBCASE("prepare_session, then logoff_session") {
    auto out = run_command(b, "DEMO\\m1", prepare_args("s-1", "TICKET-1"));
    CHECK(out.ok);
    CHECK(out.error.empty());
    auto st = m1.status();
    const auto* s = find_session(st, "s-1");
    REQUIRE(s != nullptr);
    CHECK(s->state == cbp::SessionState::preparing);
    CHECK(s->brokered);
    CHECK(s->prepared_user == "DEMO\\alice");
    CHECK(s->info.client_name == "LAPTOP-ALICE");

    // A single-session machine with a prepared session has no room for a second one: the agent's
    // own error comes back.
    out = run_command(b, "DEMO\\m1", prepare_args("s-2", "TICKET-2"));
    CHECK_FALSE(out.ok);
    CHECK(out.error == "no free session slot");

    out = run_command(b, "DEMO\\m1", cbp::LogoffSessionArgs{"s-1"});
    CHECK(out.ok);
    CHECK(find_session(m1.status(), "s-1") == nullptr);
    CHECK(contains(m1.status().commands, "logoff_session ok"));
  }

  SUBCASE("disconnect_session, send_message and logoff_session on a running session") {
    cbp::SessionInfo info;
    info.session_key = "rdp-1";
    info.user = "DEMO\\bob";
    info.protocol = cbp::DisplayProtocol::rdp;
    REQUIRE(m1.add_session(info));

    // The agent sends its session_event before the command_result, and the endpoint handles a
    // connection's messages in order: storage reflects the event once the outcome is in.
    auto out = run_command(b, "DEMO\\m1", cbp::DisconnectSessionArgs{"rdp-1"});
    CHECK(out.ok);
    const auto status = m1.status();  // kept: find_session points into it
    const auto* s = find_session(status, "rdp-1");
    REQUIRE(s != nullptr);
    CHECK(s->state == cbp::SessionState::disconnected);
    auto stored = b.session("rdp-1");
    REQUIRE(stored.has_value());
    CHECK(stored->text("state") == "Disconnected");
    CHECK(stored->text("machine") == "DEMO\\m1");

    cbp::SendMessageArgs msg;
    msg.session_key = "rdp-1";
    msg.title = "Maintenance";
    msg.text = "This machine restarts at 18:00.\nPlease save your work.";
    out = run_command(b, "DEMO\\m1", msg);
    CHECK(out.ok);
    CHECK(contains(m1.status().messages, "Maintenance: This machine restarts at 18:00.\nPlease save your work."));

    cbp::SendMessageArgs all;
    all.all = true;
    all.text = "to everyone";
    CHECK(run_command(b, "DEMO\\m1", all).ok);
    CHECK(contains(m1.status().messages, "to everyone"));

    out = run_command(b, "DEMO\\m1", cbp::LogoffSessionArgs{"rdp-1"});
    CHECK(out.ok);
    CHECK(find_session(m1.status(), "rdp-1") == nullptr);
    // Kept as history: LoggedOff.
    CHECK(eventually([&] { return b.session("rdp-1") && b.session("rdp-1")->text("state") == "LoggedOff"; }));
  }

  SUBCASE("a command for a session the agent does not have fails with the agent's error") {
    for (cbp::CommandArgs args :
         std::vector<cbp::CommandArgs>{cbp::LogoffSessionArgs{"nope"}, cbp::DisconnectSessionArgs{"nope"},
                                       cbp::SendMessageArgs{"nope", false, "", "hello"}}) {
      CAPTURE(cbp::command_name(args));
      auto out = run_command(b, "DEMO\\m1", args);
      CHECK_FALSE(out.ok);
      CHECK(out.error == "no such session");
    }
    CHECK(m1.status().commands.size() == 3);  // each one reached the agent
    CHECK(m1.status().state == vda::State::registered);
  }

  SUBCASE("a command for a machine without a registered agent: not connected") {
    auto out = run_command(b, "DEMO\\m2", cbp::LogoffSessionArgs{"s-1"});  // exists, never connected
    CHECK_FALSE(out.ok);
    CHECK(out.error == "not connected");
    out = run_command(b, "DEMO\\nobody", cbp::LogoffSessionArgs{"s-1"});
    CHECK_FALSE(out.ok);
    CHECK(out.error == "not connected");

    // After a graceful stop the machine is no longer reachable either.
    m1.stop();
    REQUIRE(m1.wait_for([](const vda::MachineStatus& s) { return s.state == vda::State::stopped; }, kPatience));
    REQUIRE(eventually([&] { return !contains(b.endpoint->registered_machines(), "DEMO\\m1"); }));
    out = run_command(b, "DEMO\\m1", cbp::LogoffSessionArgs{"s-1"});
    CHECK(out.error == "not connected");
    b.flush();
    CHECK(b.machine("DEMO\\m1").text("last_deregistration_reason") == "AgentShutdown");
  }
}

TEST_CASE("commands go only to agents that declared them as a capability") {
  Broker b;
  auto c = b.config("DEMO\\m2");
  c.capabilities = {"prepare_session", "logoff_session", "reboot"};
  auto m2 = b.start(c);

  auto out = run_command(b, "DEMO\\m2", cbp::SendMessageArgs{"", true, "", "hello"});
  CHECK_FALSE(out.ok);
  CHECK(out.error == "the agent does not support send_message");
  out = run_command(b, "DEMO\\m2", cbp::DisconnectSessionArgs{"s-1"});
  CHECK_FALSE(out.ok);
  CHECK(out.error == "the agent does not support disconnect_session");
  CHECK(m2.status().commands.empty());  // neither was sent

  // A declared command name the agent does not implement (a newer broker's command) is sent, and
  // the agent answers that it does not support it.
  out = run_command(b, "DEMO\\m2", cbp::UnknownCommandArgs{"reboot"});
  CHECK_FALSE(out.ok);
  CHECK(out.error == "unsupported command");
  // An undeclared one is not.
  out = run_command(b, "DEMO\\m2", cbp::UnknownCommandArgs{"shutdown"});
  CHECK_FALSE(out.ok);
  CHECK(out.error == "the agent does not support shutdown");

  CHECK(run_command(b, "DEMO\\m2", prepare_args("s-1", "T")).ok);
  CHECK(m2.status().commands == std::vector<std::string>{"reboot failed: unsupported command", "prepare_session ok"});

  // `done` may call back into the endpoint (an engine that falls back to another command): the
  // refusal must not be reported while the endpoint holds the connection's lock.
  OutcomeProbe first, second;
  auto chained = first.callback();
  std::promise<void> returned;
  auto has_returned = returned.get_future();
  std::thread caller([&] {
    b.endpoint->send_command(
        "DEMO\\m2", cbp::SendMessageArgs{"", true, "", "hello"}, 10s, [&, chained](cbp::CommandOutcome o) {
          chained(std::move(o));
          b.endpoint->send_command("DEMO\\m2", cbp::LogoffSessionArgs{"s-1"}, 10s, second.callback());
        });
    returned.set_value();
  });
  if (has_returned.wait_for(kPatience) != std::future_status::ready) {
    // A deadlock cannot be undone, and the teardown would hang on it: report and leave.
    FAIL_CHECK("send_command deadlocked when `done` called back into the endpoint");
    std::fflush(stdout);
    std::_Exit(1);
  }
  caller.join();
  REQUIRE(eventually([&] { return second.done(); }));
  CHECK(first.wait().error == "the agent does not support send_message");
  CHECK(second.wait().ok);
  CHECK(find_session(m2.status(), "s-1") == nullptr);
}

TEST_CASE("a command the agent does not answer fails with timeout; a late result is ignored") {
  Broker b;

  SUBCASE("the reference agent ignoring commands") {
    vda::Faults f;
    f.ignore_commands = true;
    auto m1 = b.start(b.config("DEMO\\m1"), f);
    auto out = run_command(b, "DEMO\\m1", cbp::SendMessageArgs{"", true, "", "hello"}, 300ms);
    CHECK_FALSE(out.ok);
    CHECK(out.error == "timeout");
    CHECK(m1.status().commands == std::vector<std::string>{"send_message ignored"});  // it did arrive
    // A timeout fails the command, not the machine.
    CHECK(contains(b.endpoint->registered_machines(), "DEMO\\m1"));
    CHECK(m1.status().state == vda::State::registered);
  }

  SUBCASE("a raw agent answering after the timeout") {
    vda::RawConnection c(*b.raw_pool, b.url);
    raw_register(b, c, "DEMO\\m1");
    OutcomeProbe probe;
    b.endpoint->send_command("DEMO\\m1", cbp::SendMessageArgs{"", true, "", "first"}, 300ms, probe.callback());
    const auto cmd = expect<cbp::Command>(c);
    CHECK(cbp::command_name(cmd.args) == "send_message");
    CHECK(cmd.timeout_ms == 300);
    const auto out = probe.wait();
    CHECK(out.error == "timeout");

    cbp::CommandResult late;
    late.reply_to = cmd.id;
    late.ok = true;
    c.send(cbp::serialize(late));
    cbp::CommandResult unknown;
    unknown.reply_to = "no-such-command";
    unknown.ok = true;
    c.send(cbp::serialize(unknown));

    // Both were ignored: the connection still takes commands, and `done` ran once.
    OutcomeProbe next;
    b.endpoint->send_command("DEMO\\m1", cbp::SendMessageArgs{"", true, "", "second"}, 10s, next.callback());
    const auto cmd2 = expect<cbp::Command>(c);
    CHECK(cmd2.id != cmd.id);
    cbp::CommandResult answer;
    answer.reply_to = cmd2.id;
    answer.ok = false;
    answer.error = "the user dismissed it";
    c.send(cbp::serialize(answer));
    const auto out2 = next.wait();
    CHECK_FALSE(out2.ok);
    CHECK(out2.error == "the user dismissed it");
    CHECK(probe.calls() == 1);
    CHECK(contains(b.endpoint->registered_machines(), "DEMO\\m1"));
  }
}

TEST_CASE("a command pending when the connection closes fails with connection closed") {
  Broker b;
  vda::Faults f;
  f.ignore_commands = true;
  auto m1 = b.start(b.config("DEMO\\m1"), f);
  OutcomeProbe probe;
  b.endpoint->send_command("DEMO\\m1", prepare_args("s-1", "T"), 60s, probe.callback());
  REQUIRE(m1.wait_for([](const vda::MachineStatus& s) { return !s.commands.empty(); }, kPatience));
  CHECK_FALSE(probe.done());
  m1.crash();
  const auto out = probe.wait();
  CHECK_FALSE(out.ok);
  CHECK(out.error == "connection closed");
  b.flush();
  CHECK(probe.calls() == 1);
  const auto stored = b.machine("DEMO\\m1");
  CHECK(stored.text("registration_state") == "Unregistered");
  CHECK(stored.text("last_deregistration_reason") == "ContactLost");
}

TEST_CASE("handshake deadlines close silent connections") {
  cbp::EndpointOptions o;
  o.hello_timeout = kShortDeadline;
  o.register_timeout = kShortDeadline;
  Broker b(o);

  SUBCASE("no hello after the challenge") {
    vda::RawConnection c(*b.raw_pool, b.url);
    REQUIRE(c.wait_open(kPatience));
    const auto challenge = expect<cbp::Challenge>(c);
    CHECK(cbp::is_hex64(challenge.nonce));
    const auto rejected = expect<cbp::Rejected>(c);
    CHECK(rejected.reason == cbp::Reason::timeout);
    CHECK(c.wait_closed(kPatience));
  }

  SUBCASE("no register after the welcome (the reference agent's no_register fault)") {
    vda::Faults f;
    f.no_register = true;
    auto m1 = b.fleet->add(b.config("DEMO\\m1"));
    m1.set_faults(f);
    m1.start();
    REQUIRE(m1.wait_for([](const vda::MachineStatus& s) { return s.rejected_with(cbp::Reason::timeout); }, kPatience));
    m1.crash();
    const auto st = m1.status();
    CHECK(st.version == 1);  // it got as far as the welcome
    CHECK(st.registrations == 0);
    CHECK(b.endpoint->registered_machines().empty());
    // docs/cbp.md "Rejections": the reason is recorded on the machine.
    CHECK(eventually([&] { return b.machine("DEMO\\m1").text("last_deregistration_reason") == "Timeout"; }));
    CHECK(b.machine("DEMO\\m1").text("registration_state") == "Unregistered");
  }

  SUBCASE("a full handshake within the deadlines registers") {
    auto m2 = b.start("DEMO\\m2");
    CHECK(contains(b.endpoint->registered_machines(), "DEMO\\m2"));
    CHECK(m2.status().rejections.empty());
  }
}

TEST_CASE("rejected handshakes are recorded on the machine, but never on a live registration") {
  Broker b;
  auto m1 = b.start("DEMO\\m1");

  // A second connection for the registered m1 that offers no common version is refused; the
  // registration on the first connection goes on, and storage keeps saying so.
  {
    vda::RawConnection c(*b.raw_pool, b.url);
    REQUIRE(c.wait_open(kPatience));
    const auto challenge = expect<cbp::Challenge>(c);
    auto hello = hello_for("DEMO\\m1", b.secrets.at("DEMO\\m1"), challenge.nonce);
    hello.versions = {99};
    hello.proof =
        cbp::compute_proof(cbp::secret_hash(b.secrets.at("DEMO\\m1")), challenge.nonce, "DEMO\\m1", hello.versions);
    c.send(cbp::serialize(hello));
    CHECK(expect<cbp::Rejected>(c).reason == cbp::Reason::incompatible_version);
    CHECK(c.wait_closed(kPatience));
  }
  // A machine that is not registered gets the reason recorded (so the close above was processed
  // once this one shows).
  vda::Faults wrong;
  wrong.wrong_session_support = true;
  auto m2 = b.fleet->add(b.config("DEMO\\m2"));
  m2.set_faults(wrong);
  m2.start();
  REQUIRE(m2.wait_for(
      [](const vda::MachineStatus& s) { return s.rejected_with(cbp::Reason::single_multi_session_mismatch); },
      kPatience));
  m2.crash();
  CHECK(eventually(
      [&] { return b.machine("DEMO\\m2").text("last_deregistration_reason") == "SingleMultiSessionMismatch"; }));
  b.flush();
  auto stored = b.machine("DEMO\\m1");
  CHECK(stored.text("registration_state") == "Registered");
  CHECK(stored.text("last_deregistration_reason").empty());
  CHECK(contains(b.endpoint->registered_machines(), "DEMO\\m1"));
  CHECK(m1.status().state == vda::State::registered);

  // Wrong proofs: BadProof (recorded) until the (machine, address) pair is in back-off, then
  // TooManyFailures, even for the right proof, without writing anything.
  auto attempt = [&](const std::string& machine, const std::string& secret) {
    vda::RawConnection c(*b.raw_pool, b.url);
    REQUIRE(c.wait_open(kPatience));
    const auto challenge = expect<cbp::Challenge>(c);
    c.send(cbp::serialize(hello_for(machine, secret, challenge.nonce)));
    auto rejected = expect<cbp::Rejected>(c);
    CHECK(c.wait_closed(kPatience));
    return rejected;
  };
  // Each rejection is stamped with the registry's clock, moved on before each one.
  auto recorded_now = [&](const std::string& machine, const std::string& reason) {
    return eventually([&] {
      const auto m = b.machine(machine);
      return m.text("last_deregistration_reason") == reason &&
             m.text("last_deregistration_time") == common::format_time(b.clock.now());
    });
  };
  for (int i = 0; i < cbp::kMaxAuthFailures; ++i) {
    CAPTURE(i);
    b.clock.advance(1s);
    CHECK(attempt("DEMO\\m3", "not the secret").reason == cbp::Reason::bad_proof);
    CHECK(recorded_now("DEMO\\m3", "BadProof"));
  }
  const auto recorded_at = b.machine("DEMO\\m3").text("last_deregistration_time");
  b.clock.advance(1s);  // a write now would show in the time
  const auto refused = attempt("DEMO\\m3", b.secrets.at("DEMO\\m3"));
  CHECK(refused.reason == cbp::Reason::too_many_failures);
  // The agent is not told to come back before the back-off ends (1 s of its 120 s has passed on
  // the registry's clock), nor later than its whole length.
  CHECK(refused.retry_after_seconds >= cbp::kAuthBackoff.count() - 1);
  CHECK(refused.retry_after_seconds <= cbp::kAuthBackoff.count());
  // Another name from the same address is not in back-off; once its rejection is recorded, the
  // one before has long been processed.
  CHECK(attempt("DEMO\\m2", "not the secret").reason == cbp::Reason::bad_proof);
  CHECK(recorded_now("DEMO\\m2", "BadProof"));
  b.flush();
  CHECK(b.machine("DEMO\\m3").text("last_deregistration_time") == recorded_at);
  CHECK(b.machine("DEMO\\m3").text("last_deregistration_reason") == "BadProof");
}

TEST_CASE("a handshake message that arrived in time is not timed out while the broker is busy") {
  cbp::EndpointOptions o;
  o.hello_timeout = kShortDeadline;
  o.register_timeout = kShortDeadline;
  Broker b(o);
  vda::RawConnection c(*b.raw_pool, b.url);
  REQUIRE(c.wait_open(kPatience));
  const auto challenge = expect<cbp::Challenge>(c);
  const auto hello = hello_for("DEMO\\m1", b.secrets.at("DEMO\\m1"), challenge.nonce);
  {
    // The hello arrives at once, but storage work is slow: the queue holds it past the deadline.
    Gate gate(*b.work);
    c.send(cbp::serialize(hello));
    // Past the deadline, and two of the endpoint's timer ticks (200 ms) beyond (no assertion on time).
    std::this_thread::sleep_for(kShortDeadline + 600ms);
  }
  const auto welcome = expect<cbp::Welcome>(c);
  CHECK(welcome.version == 1);
  {
    Gate gate(*b.work);
    c.send(cbp::serialize(register_message({})));
    std::this_thread::sleep_for(kShortDeadline + 600ms);
  }
  expect<cbp::Registered>(c);
  CHECK(contains(b.endpoint->registered_machines(), "DEMO\\m1"));
  CHECK(b.machine("DEMO\\m1").text("registration_state") == "Registered");
}

TEST_CASE("logon tickets are redeemed once, only by their machine, within their lifetime") {
  Broker b;
  auto m1 = b.start("DEMO\\m1");
  auto m2 = b.start("DEMO\\m2");
  b.put_ticket("T-A", "DEMO\\m1", 200s);

  SUBCASE("once, by its own machine") {
    const auto t = redeem(m1, "T-A", "s-7");
    REQUIRE(t.ok);
    CHECK(t.user == "DEMO\\alice");
    CHECK(t.credential_type == "password");
    CHECK(t.credential_data ==
          std::map<std::string, std::string>{{"domain", "DEMO"}, {"user", "alice"}, {"password", "correct horse"}});
    CHECK(t.session_key == "s-7");

    const auto again = redeem(m1, "T-A", "s-7");
    CHECK_FALSE(again.ok);
    CHECK(again.user.empty());
    CHECK(again.credential_data.empty());
    CHECK(again.reason != cbp::TicketFailure::refused);  // a definite answer, not "cannot redeem now"
  }

  SUBCASE("not by another machine, which leaves it for its own") {
    const auto wrong = redeem(m2, "T-A");
    CHECK_FALSE(wrong.ok);
    CHECK(wrong.reason == cbp::TicketFailure::wrong_machine);
    CHECK(wrong.credential_data.empty());
    const auto right = redeem(m1, "T-A");
    CHECK(right.ok);
    CHECK(right.user == "DEMO\\alice");
  }

  SUBCASE("not after it expired") {
    b.put_ticket("T-B", "DEMO\\m1", 10s);
    b.clock.advance(11s);
    const auto t = redeem(m1, "T-B");
    CHECK_FALSE(t.ok);
    CHECK(t.reason == cbp::TicketFailure::expired);
    CHECK(t.credential_data.empty());
  }

  SUBCASE("not a ticket nobody issued") {
    const auto t = redeem(m1, "T-NONE");
    CHECK_FALSE(t.ok);
    CHECK(t.reason == cbp::TicketFailure::not_found);
  }

  // Both agents stay registered through all of this.
  CHECK(m1.status().state == vda::State::registered);
  CHECK(m2.status().state == vda::State::registered);
}

TEST_CASE("launch: prepare_session, the client connects, the agent redeems the ticket, the session is Active") {
  Broker b;
  auto m1 = b.start("DEMO\\m1");
  b.put_ticket("T-LAUNCH", "DEMO\\m1", 200s);
  REQUIRE(run_command(b, "DEMO\\m1", prepare_args("s-42", "T-LAUNCH")).ok);
  REQUIRE(m1.client_connects("s-42"));
  REQUIRE(m1.wait_for([](const vda::MachineStatus& s) { return s.logons == 1 || s.failed_logons > 0; }, kPatience));
  const auto st = m1.status();
  CHECK(st.logons == 1);
  CHECK(st.failed_logons == 0);
  const auto* s = find_session(st, "s-42");
  REQUIRE(s != nullptr);
  CHECK(s->state == cbp::SessionState::active);
  CHECK(s->info.user == "DEMO\\alice");

  // The broker saw Connected and then Active for the session.
  REQUIRE(eventually([&] {
    auto stored = b.session("s-42");
    return stored && stored->text("state") == "Active";
  }));
  const auto stored = b.session("s-42");
  CHECK(stored->text("user_name") == "DEMO\\alice");
  CHECK(stored->text("machine") == "DEMO\\m1");
  b.flush();  // the summary state follows the session's in a second transaction
  CHECK(b.machine("DEMO\\m1").text("summary_state") == "InUse");

  // The ticket is spent.
  CHECK_FALSE(redeem(m1, "T-LAUNCH").ok);
}

TEST_CASE("begin_shutdown: the closing connections do not deregister their machines") {
  Broker b;
  auto m1 = b.start("DEMO\\m1");
  auto m2 = b.start("DEMO\\m2");
  // Before the shutdown, a lost connection is recorded (so the check below can tell).
  auto m3 = b.start("DEMO\\m3");
  m3.crash();
  REQUIRE(eventually([&] { return b.machine("DEMO\\m3").text("last_deregistration_reason") == "ContactLost"; }));

  b.endpoint->begin_shutdown();
  b.server->stop(5s);
  b.work->stop();  // runs every close the stop queued
  CHECK(b.endpoint->registered_machines().empty());
  for (auto* m : {&m1, &m2}) {
    CAPTURE(m->name());
    // The agents see the end of their connections a moment after the server is done with them.
    CHECK(m->wait_for([](const vda::MachineStatus& s) { return s.state != vda::State::registered; }, kPatience));
    CHECK(m->status().got_error(cbp::Reason::broker_shutdown));  // told why (docs/cbp.md "Other closes")
    const auto stored = b.machine(m->name());
    CHECK(stored.text("registration_state") == "Registered");
    CHECK(stored.text("last_deregistration_reason").empty());
  }
}

TEST_CASE("disconnect(DesktopRemoved) ends the registration and the agent stops") {
  Broker b;
  auto m1 = b.start("DEMO\\m1");
  auto m2 = b.start("DEMO\\m2");
  b.endpoint->disconnect("DEMO\\m1", cbp::Reason::desktop_removed);
  REQUIRE(m1.wait_for([](const vda::MachineStatus& s) { return s.state == vda::State::stopped; }, kPatience));
  CHECK(m1.status().got_error(cbp::Reason::desktop_removed));
  CHECK_FALSE(m1.status().running);  // it does not come back
  REQUIRE(eventually([&] { return !contains(b.endpoint->registered_machines(), "DEMO\\m1"); }));
  b.flush();
  const auto stored = b.machine("DEMO\\m1");
  CHECK(stored.text("registration_state") == "Unregistered");
  CHECK(stored.text("last_deregistration_reason") == "DesktopRemoved");
  // The other machine is untouched.
  CHECK(b.endpoint->registered_machines() == std::vector<std::string>{"DEMO\\m2"});
  CHECK(m2.status().state == vda::State::registered);
  // A machine that is not connected: nothing happens.
  b.endpoint->disconnect("DEMO\\m3", cbp::Reason::desktop_removed);
  b.flush();
  CHECK(b.machine("DEMO\\m3").text("last_deregistration_reason").empty());
}

TEST_CASE("protocol errors close only the offending connection") {
  Broker b;
  auto m2 = b.start("DEMO\\m2");

  SUBCASE("before the welcome: garbage, an unknown type, a message out of order, a broken hello") {
    // docs/cbp.md "Protocol errors during the handshake": always `rejected`; ProtocolError except
    // for a bad member of the hello itself.
    const std::vector<std::pair<std::string, cbp::Reason>> cases = {
        {"{not json", cbp::Reason::protocol_error},
        {R"({"type":"launch_rockets"})", cbp::Reason::protocol_error},
        {R"({"type":"heartbeat","load_index":0,"session_count":0})", cbp::Reason::protocol_error},
        {cbp::serialize(cbp::Challenge{std::string(64, 'a'), {1}, ""}), cbp::Reason::protocol_error},
        {cbp::serialize(register_message({})), cbp::Reason::protocol_error},
        {R"({"type":"hello","machine":"DEMO\\m1"})", cbp::Reason::invalid_registration_request},
    };
    for (const auto& [text, reason] : cases) {
      CAPTURE(text);
      vda::RawConnection c(*b.raw_pool, b.url);
      REQUIRE(c.wait_open(kPatience));
      expect<cbp::Challenge>(c);
      c.send(text);
      const auto rejected = expect<cbp::Rejected>(c);  // during the handshake: rejected, not error
      CHECK(rejected.reason == reason);
      CHECK_FALSE(rejected.message.empty());
      CHECK(c.wait_closed(kPatience));
      CHECK_FALSE(c.next(0ms).has_value());  // nothing after the rejection
    }
  }

  SUBCASE("after the welcome: a message out of order, a broken register") {
    auto no_capabilities = cbp::serialize(register_message({}));
    no_capabilities.replace(no_capabilities.find(R"("capabilities":[],)"), 18, "");
    auto bad_address = register_message({});
    bad_address.address = "nowhere";
    const std::vector<std::pair<std::string, cbp::Reason>> cases = {
        {"{not json", cbp::Reason::protocol_error},
        {cbp::serialize(cbp::Challenge{std::string(64, 'a'), {1}, ""}), cbp::Reason::protocol_error},
        {cbp::serialize(hello_for("DEMO\\m1", "x", std::string(64, 'a'))), cbp::Reason::protocol_error},
        {R"({"type":"heartbeat","load_index":0,"session_count":0})", cbp::Reason::protocol_error},
        {cbp::serialize(bad_address), cbp::Reason::invalid_registration_request},
        {no_capabilities, cbp::Reason::missing_registration_capabilities},
        {R"({"type":"register"})", cbp::Reason::empty_registration_request},
    };
    for (const auto& [text, reason] : cases) {
      CAPTURE(text);
      vda::RawConnection c(*b.raw_pool, b.url);
      REQUIRE(c.wait_open(kPatience));
      const auto challenge = expect<cbp::Challenge>(c);
      c.send(cbp::serialize(hello_for("DEMO\\m1", b.secrets.at("DEMO\\m1"), challenge.nonce)));
      expect<cbp::Welcome>(c);
      c.send(text);
      const auto rejected = expect<cbp::Rejected>(c);
      CHECK(rejected.reason == reason);
      CHECK(c.wait_closed(kPatience));
    }
  }

  SUBCASE("after the handshake: garbage, an unknown type, a broker message") {
    for (const std::string& text :
         {std::string("{not json"), std::string(R"({"type":"launch_rockets"})"),
          std::string(R"({"type":"registered"})"), std::string(R"({"type":"hello","machine":"x"})")}) {
      CAPTURE(text);
      vda::RawConnection c(*b.raw_pool, b.url);
      raw_register(b, c, "DEMO\\m1");
      REQUIRE(contains(b.endpoint->registered_machines(), "DEMO\\m1"));
      REQUIRE(b.machine("DEMO\\m1").text("registration_state") == "Registered");
      c.send(text);
      const auto error = expect<cbp::ErrorMessage>(c);
      CHECK(error.reason == cbp::Reason::protocol_error);
      CHECK_FALSE(error.message.empty());
      CHECK(c.wait_closed(kPatience));
      REQUIRE(eventually([&] { return !contains(b.endpoint->registered_machines(), "DEMO\\m1"); }));
      b.flush();
      const auto stored = b.machine("DEMO\\m1");
      CHECK(stored.text("registration_state") == "Unregistered");  // no agent behind it any more
      CHECK(stored.text("last_deregistration_reason") == "ContactLost");
    }
  }

  // The well-behaved agent never noticed.
  CHECK(contains(b.endpoint->registered_machines(), "DEMO\\m2"));
  CHECK(m2.status().state == vda::State::registered);
  CHECK(m2.status().errors.empty());
  CHECK(run_command(b, "DEMO\\m2", prepare_args("s-1", "T")).ok);
}

TEST_CASE("a binary frame is a protocol error: the CBP answer first, then the close (1003)") {
  Broker b;
  auto bystander = b.start("DEMO\\m2");

  SUBCASE("during the handshake: rejected ProtocolError") {
    RawAgent raw(b);
    raw.sock.send(client_frame(0x2, "\x01\x02" "binary"));
    const auto rejected = rejection(raw.next());
    CHECK(rejected.reason == cbp::Reason::protocol_error);
    CHECK(rejected.message.find("binary") != std::string::npos);
    const auto close = read_frame(raw.sock);
    CHECK(close.opcode == 0x8);
    CHECK(close.close_code() == 1003);
  }

  SUBCASE("after registered: error ProtocolError, the machine loses its registration") {
    RawAgent raw(b);
    raw.send(hello_for("DEMO\\m1", b.secrets.at("DEMO\\m1"), raw.challenge.nonce));
    REQUIRE(std::holds_alternative<cbp::Welcome>(raw.next()));
    raw.send(register_message({}));
    REQUIRE(std::holds_alternative<cbp::Registered>(raw.next()));
    REQUIRE(contains(b.endpoint->registered_machines(), "DEMO\\m1"));
    raw.sock.send(client_frame(0x2, "binary"));
    // A text message after the binary one is not processed (the transport delivers nothing more).
    raw.sock.send(client_frame(0x1, R"({"type":"heartbeat","load_index":0,"session_count":0})"));
    const auto m = raw.next();
    const auto* error = std::get_if<cbp::ErrorMessage>(&m);
    REQUIRE_MESSAGE(error != nullptr, cbp::serialize(m));
    CHECK(error->reason == cbp::Reason::protocol_error);
    const auto close = read_frame(raw.sock);
    CHECK(close.opcode == 0x8);
    CHECK(close.close_code() == 1003);
    REQUIRE(eventually([&] { return !contains(b.endpoint->registered_machines(), "DEMO\\m1"); }));
    b.flush();
    CHECK(b.machine("DEMO\\m1").text("last_deregistration_reason") == "ContactLost");
  }

  CHECK(bystander.status().state == vda::State::registered);
  CHECK(bystander.status().errors.empty());
}

TEST_CASE("storage trouble during the handshake is Unavailable, never an authentication failure") {
  Broker b;
  const std::string key = "endpoint-test-enrollment-key";
  set_enrollment_key(b, key);
  auto enroll = [&](const std::string& nonce) { return enroll_hello("DEMO\\new-1", key, nonce); };
  auto known = [&](const std::string& nonce) { return hello_for("DEMO\\m1", b.secrets.at("DEMO\\m1"), nonce); };
  // More attempts than the back-off allows failures: none of them counts.
  auto all_unavailable = [&](const std::function<cbp::Hello(const std::string&)>& make) {
    for (int i = 0; i < cbp::kMaxAuthFailures + 2; ++i) {
      CAPTURE(i);
      const auto r = rejection(answer_to(b, make));
      CHECK(r.reason == cbp::Reason::unavailable);
      CHECK(r.retry_after_seconds == cbp::kUnavailableRetryAfter.count());
    }
  };

  SUBCASE("enrollment: the new machine cannot be stored") {
    b.flaky->fail_writes = true;
    all_unavailable(enroll);
    b.flaky->fail_writes = false;
    const auto welcome = answer_to(b, enroll);
    REQUIRE_MESSAGE(std::holds_alternative<cbp::Welcome>(welcome), cbp::serialize(welcome));
    CHECK_FALSE(std::get<cbp::Welcome>(welcome).machine_secret.empty());
  }

  SUBCASE("enrollment: the catalog cannot be read") {
    b.flaky->fail_reads = true;
    all_unavailable(enroll);
    b.flaky->fail_reads = false;
    const auto welcome = answer_to(b, enroll);
    CHECK_MESSAGE(std::holds_alternative<cbp::Welcome>(welcome), cbp::serialize(welcome));
  }

  SUBCASE("a known machine: its verifier cannot be read") {
    b.flaky->fail_reads = true;
    all_unavailable(known);
    b.flaky->fail_reads = false;
    const auto welcome = answer_to(b, known);
    CHECK_MESSAGE(std::holds_alternative<cbp::Welcome>(welcome), cbp::serialize(welcome));
    b.flush();
    CHECK(b.machine("DEMO\\m1").text("last_deregistration_reason").empty());  // nothing recorded
  }

  SUBCASE("register: the registration cannot be stored") {
    b.flaky->fail_writes = true;
    vda::RawConnection c(*b.raw_pool, b.url);
    REQUIRE(c.wait_open(kPatience));
    const auto challenge = expect<cbp::Challenge>(c);
    c.send(cbp::serialize(known(challenge.nonce)));
    expect<cbp::Welcome>(c);
    c.send(cbp::serialize(register_message({})));
    const auto r = expect<cbp::Rejected>(c);
    CHECK(r.reason == cbp::Reason::unavailable);
    CHECK(r.retry_after_seconds == cbp::kUnavailableRetryAfter.count());
    CHECK(c.wait_closed(kPatience));
    b.flaky->fail_writes = false;
    b.start("DEMO\\m1");
  }
}

TEST_CASE("an unknown machine, a machine without a secret and a wrong proof get the same answer") {
  Broker b;
  // A machine the site knows but that has no secret yet (it could enroll).
  REQUIRE(b.repo->write([&](storage::Transaction& tx) -> common::Status {
    Object m = common::model::make_default(Kind::machine, "DEMO\\bare");
    m.fields["catalog"] = std::string("pool");
    if (auto r = tx.create(m); !r) return r.error();
    return {};
  }));
  const std::vector<std::pair<std::string, std::string>> peers = {
      {"DEMO\\ghost", "a guess"}, {"DEMO\\bare", "a guess"}, {"DEMO\\m1", "a guess"}};
  std::vector<cbp::Rejected> answers;
  for (const auto& [machine, secret] : peers) {
    CAPTURE(machine);
    answers.push_back(rejection(answer_to(b, [&](const std::string& nonce) { return hello_for(machine, secret, nonce); })));
    CHECK(answers.back().reason == cbp::Reason::bad_proof);
    CHECK(answers.back().message == answers.front().message);
    CHECK(answers.back().message.find(machine) == std::string::npos);
  }
  // Each is an authentication failure: the pair goes into back-off after kMaxAuthFailures.
  for (const auto& [machine, secret] : peers) {
    CAPTURE(machine);
    for (int i = 1; i < cbp::kMaxAuthFailures; ++i)
      CHECK(rejection(answer_to(b, [&](const std::string& nonce) { return hello_for(machine, secret, nonce); }))
                .reason == cbp::Reason::bad_proof);
    CHECK(rejection(answer_to(b, [&](const std::string& nonce) { return hello_for(machine, secret, nonce); })).reason ==
          cbp::Reason::too_many_failures);
  }
}

TEST_CASE("between welcome and register the machine is still Unregistered") {
  // docs/cbp.md "Registration state": openbroker does not use Initializing.
  Broker b;
  vda::RawConnection c(*b.raw_pool, b.url);
  REQUIRE(c.wait_open(kPatience));
  const auto challenge = expect<cbp::Challenge>(c);
  c.send(cbp::serialize(hello_for("DEMO\\m1", b.secrets.at("DEMO\\m1"), challenge.nonce)));
  expect<cbp::Welcome>(c);
  b.flush();
  const auto before = b.machine("DEMO\\m1");
  CHECK(before.text("registration_state") == "Unregistered");
  CHECK(before.text("agent_version").empty());  // stored with the registration, not at welcome
  c.send(cbp::serialize(register_message({})));
  expect<cbp::Registered>(c);
  const auto after = b.machine("DEMO\\m1");
  CHECK(after.text("registration_state") == "Registered");
  CHECK(after.text("agent_version") == "raw-test/1");
  CHECK(after.text("cbp_version") == "1");
}

// ---------------------------------------------------------------------------------------------
// Abuse limits of the agent listener's CBP layer (docs/SECURITY.md section 7.2). The transport's
// own (message size, send queue, UTF-8, binary frames, idle) are in net/websocket_test.cpp; the
// message fields' in cbp/messages_test.cpp (suite `limits`).
TEST_SUITE("limits") {

TEST_CASE("inbox: a peer flooding before its hello is processed is rejected and closed; nothing it sent is processed") {
  cbp::EndpointOptions o;
  o.max_handshake_inbox_messages = 4;
  Broker b(o);
  vda::RawConnection c(*b.raw_pool, b.url);
  REQUIRE(c.wait_open(kPatience));
  const auto challenge = expect<cbp::Challenge>(c);
  {
    Gate gate(*b.work);  // the broker is busy: nothing is processed meanwhile
    // A valid hello first, then more than the handshake allows to wait.
    c.send(cbp::serialize(hello_for("DEMO\\m1", b.secrets.at("DEMO\\m1"), challenge.nonce)));
    for (int i = 0; i < 4; ++i) c.send(cbp::serialize(cbp::Heartbeat{}));
    const auto rejected = expect<cbp::Rejected>(c);  // answered on the receiving thread
    CHECK(rejected.reason == cbp::Reason::protocol_error);
    CHECK(rejected.message.find("too many messages waiting to be processed (5 messages") != std::string::npos);
    CHECK(c.wait_closed(kPatience));
  }
  b.flush();
  // The hello was dropped with the rest: no welcome, no registration.
  CHECK_FALSE(c.next(0ms).has_value());
  CHECK(b.endpoint->registered_machines().empty());
  CHECK(b.machine("DEMO\\m1").text("registration_state") == "Unregistered");
  // Other agents are served.
  auto m2 = b.start("DEMO\\m2");
  CHECK(contains(b.endpoint->registered_machines(), "DEMO\\m2"));
}

TEST_CASE("inbox: a registered agent over max_inbox_messages gets error ProtocolError, is closed and unregistered") {
  cbp::EndpointOptions o;
  o.max_inbox_messages = 8;
  Broker b(o);
  vda::RawConnection c(*b.raw_pool, b.url);
  raw_register(b, c, "DEMO\\m1");
  REQUIRE(b.machine("DEMO\\m1").text("registration_state") == "Registered");

  SUBCASE("at the limit every message is processed") {
    {
      Gate gate(*b.work);
      for (int i = 0; i < 8; ++i) {
        cbp::Heartbeat hb;
        hb.load_index = 100 * (i + 1);
        c.send(cbp::serialize(hb));
      }
      // No answer to heartbeats: a session event would not tell either; let them all arrive.
      std::this_thread::sleep_for(200ms);
    }
    b.flush();
    CHECK_FALSE(c.next(0ms).has_value());  // no error
    CHECK(eventually([&] { return b.machine("DEMO\\m1").integer("load_index") == 800; }));
    CHECK(contains(b.endpoint->registered_machines(), "DEMO\\m1"));
  }

  SUBCASE("one more closes the connection") {
    {
      Gate gate(*b.work);
      for (int i = 0; i < 9; ++i) c.send(cbp::serialize(cbp::Heartbeat{}));
      const auto error = expect<cbp::ErrorMessage>(c);
      CHECK(error.reason == cbp::Reason::protocol_error);
      CHECK(error.message.find("(9 messages") != std::string::npos);
      CHECK(c.wait_closed(kPatience));
    }
    CHECK(eventually([&] { return b.endpoint->registered_machines().empty(); }));
    CHECK(eventually([&] { return b.machine("DEMO\\m1").text("registration_state") == "Unregistered"; }));
  }
}

TEST_CASE("inbox: max_inbox_bytes bounds the bytes waiting, whatever their number") {
  cbp::EndpointOptions o;
  o.max_inbox_bytes = 64 * 1024;
  Broker b(o);
  vda::RawConnection c(*b.raw_pool, b.url);
  raw_register(b, c, "DEMO\\m1");
  {
    Gate gate(*b.work);
    // Two messages of 40 KB (not even parsed yet: the bound is on what waits).
    c.send(std::string(40 * 1024, ' ') + cbp::serialize(cbp::Heartbeat{}));
    c.send(std::string(40 * 1024, ' ') + cbp::serialize(cbp::Heartbeat{}));
    const auto error = expect<cbp::ErrorMessage>(c);
    CHECK(error.reason == cbp::Reason::protocol_error);
    CHECK(error.message.find("(2 messages, ") != std::string::npos);
    CHECK(c.wait_closed(kPatience));
  }
  CHECK(eventually([&] { return b.machine("DEMO\\m1").text("registration_state") == "Unregistered"; }));
}

TEST_CASE("back-off per address: a peer that changes machine names at each failure is backed off") {
  cbp::EndpointOptions o;
  o.max_auth_failures_per_address = 3;
  o.address_backoff = 1s;  // so that the test sees it end
  Broker b(o);
  const std::string key = "enrollment-key-1";
  set_enrollment_key(b, key);
  // Guesses of the enrollment key from one address, each under a new machine name: the
  // (machine, address) back-off never sees two failures of one pair.
  auto guess = [&](const char* from, const std::string& machine, const std::string& tried) {
    RawAgent a(b, from);
    a.send(enroll_hello(machine, tried, a.challenge.nonce));
    return a.next();
  };
  for (int i = 0; i < 3; ++i)  // the third failure is still answered with its own reason
    CHECK(rejection(guess("127.0.0.2", "DEMO\\new-" + std::to_string(i), "guess-" + std::to_string(i))).reason ==
          cbp::Reason::bad_proof);
  // Now the address is in back-off: even the right key under yet another name is not examined.
  const auto refused = rejection(guess("127.0.0.2", "DEMO\\new-9", key));
  CHECK(refused.reason == cbp::Reason::too_many_failures);
  CHECK(refused.retry_after_seconds == 1);
  // So is a machine's own hello with its right secret from that address.
  {
    RawAgent a(b, "127.0.0.2");
    a.send(hello_for("DEMO\\m1", b.secrets.at("DEMO\\m1"), a.challenge.nonce));
    CHECK(rejection(a.next()).reason == cbp::Reason::too_many_failures);
  }
  // Other addresses are not affected.
  {
    RawAgent a(b, "127.0.0.3");
    a.send(hello_for("DEMO\\m1", b.secrets.at("DEMO\\m1"), a.challenge.nonce));
    CHECK(std::holds_alternative<cbp::Welcome>(a.next()));
  }
  // Nothing was enrolled; the back-off ends.
  CHECK_FALSE(b.site->get(Kind::machine, "DEMO\\new-9").has_value());
  CHECK(eventually([&] {
    RawAgent a(b, "127.0.0.2");
    a.send(enroll_hello("DEMO\\new-9", key, a.challenge.nonce));
    return std::holds_alternative<cbp::Welcome>(a.next());
  }));
}

TEST_CASE("back-off per address: max_auth_failures_per_address = 0 turns it off") {
  cbp::EndpointOptions o;
  o.max_auth_failures_per_address = 0;
  Broker b(o);
  for (int i = 0; i < 8; ++i) {
    RawAgent a(b, "127.0.0.4");
    a.send(hello_for("DEMO\\nobody-" + std::to_string(i), "wrong", a.challenge.nonce));
    CHECK(rejection(a.next()).reason == cbp::Reason::bad_proof);
  }
}

}  // TEST_SUITE("limits")
