// fuzz/cbp_handshake_fuzz.cpp: the agent endpoint's conversation (cbp::AgentEndpoint: challenge,
// hello, welcome, register, then heartbeats, session events, command results, ticket
// redemptions, goodbye) fed a sequence of messages, without sockets.
//
// The input is one agent connection: one message per line ('\n'); a line "BINARY" is a binary
// frame. In a hello, the proof "@" stands for the right proof over this connection's challenge
// (the machine's secret, or the catalog's enrollment key with "enroll":true), so that the fuzzer
// gets past authentication. The broker side is real: an in-memory database holding the catalog
// "pool" (enrollment key "enroll-key") with the machines DEMO\m1..m3 (secrets known here), the
// engine, the agent registry and the endpoint, with a manual scheduler (deadlines never fire)
// and one worker thread. A fake WebSocketPeer records what the endpoint sends.
//
// Built as cbp_handshake_fuzz (libFuzzer) and cbp_handshake_fuzz_replay (ctest, over
// fuzz/corpus/cbp_handshake/): see fuzz/CMakeLists.txt.
//
// The contracts checked (std::abort on violation):
// - the first message the broker sends is a challenge; everything it sends parses and is a
//   broker message; at most one welcome and one registered, registered only after welcome;
// - after `rejected` the broker closes the connection;
// - once the connection is closed, the endpoint lists no registered machine.
#include "broker/agent_registry.hpp"
#include "broker/engine.hpp"
#include "broker/site_objects.hpp"
#include "cbp/endpoint.hpp"
#include "cbp/messages.hpp"
#include "common/clock.hpp"
#include "common/log.hpp"
#include "common/model.hpp"
#include "common/timers.hpp"
#include "common/work_queue.hpp"
#include "fuzz/fixture.hpp"
#include "net/websocket.hpp"
#include "storage/repository.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace {

using common::model::Kind;
using common::model::Object;

constexpr const char* kEnrollmentKey = "enroll-key";
// The broker is built anew after this many connections, so that what they stored (enrolled
// machines, sessions, audit) does not pile up.
constexpr int kConnectionsPerBroker = 500;

void check(bool ok) {
  if (!ok) std::abort();
}

class FakePeer final : public net::WebSocketPeer {
 public:
  explicit FakePeer(std::string address) : address_(std::move(address)) {}
  void send(std::string message) override {
    std::lock_guard lock(mutex_);
    if (!closed_) sent_.push_back(std::move(message));
  }
  void close(std::string) override {
    std::lock_guard lock(mutex_);
    closed_ = true;
  }
  std::string remote_address() const override { return address_; }
  bool tls() const override { return false; }

  std::vector<std::string> sent() const {
    std::lock_guard lock(mutex_);
    return sent_;
  }
  bool closed() const {
    std::lock_guard lock(mutex_);
    return closed_;
  }

 private:
  const std::string address_;
  mutable std::mutex mutex_;
  std::vector<std::string> sent_;  // guarded by mutex_
  bool closed_ = false;            // guarded by mutex_
};

struct Broker {
  broker::Engine engine;  // outlives the queued commits
  std::unique_ptr<storage::Repository> repo;
  std::unique_ptr<broker::SiteObjects> site;
  common::ManualClock clock{common::SysTime{std::chrono::hours(24 * 365 * 56)}};
  common::ManualScheduler scheduler;
  std::unique_ptr<broker::AgentRegistry> registry;
  std::unique_ptr<common::WorkQueue> work = std::make_unique<common::WorkQueue>(1);
  std::unique_ptr<cbp::AgentEndpoint> endpoint;
  net::WebSocketHandler handler;
  std::map<std::string, std::string> verifiers;  // machine -> secret_hash(secret)

  Broker() {
    storage::SqliteOptions o;
    o.path = ":memory:";
    auto opened = storage::open_sqlite(o);
    check(opened.has_value());
    repo = std::move(*opened);
    site = std::make_unique<broker::SiteObjects>(*repo, common::null_logger());
    Object catalog = common::model::make_default(Kind::catalog, "pool");
    std::vector<Object> declared{catalog, common::model::make_default(Kind::delivery_group, "grp")};
    for (const char* name : {"DEMO\\m1", "DEMO\\m2", "DEMO\\m3"}) {
      Object m = common::model::make_default(Kind::machine, name);
      m.fields["catalog"] = std::string("pool");
      m.fields["delivery_group"] = std::string("grp");
      declared.push_back(m);
    }
    check(site->reconcile("/etc/openbroker/fuzz.toml", std::nullopt, declared).has_value());
    for (const char* name : {"DEMO\\m1", "DEMO\\m2", "DEMO\\m3"}) {
      auto secret = site->rotate_machine_secret(name, "fuzz");
      check(secret.has_value());
      verifiers[name] = cbp::secret_hash(*secret);
    }
    check(repo->write([](storage::Transaction& tx) -> common::Status {
                auto c = tx.get(Kind::catalog, "pool");
                if (!c) return c.error();
                Object updated = *c;
                updated.fields["enrollment_key_hash"] = cbp::secret_hash(kEnrollmentKey);
                if (auto r = tx.update("pool", updated); !r) return r.error();
                return {};
              }).has_value());
    check(engine.attach(*repo).has_value());
    registry = std::make_unique<broker::AgentRegistry>(*repo, engine, clock, common::null_logger(),
                                                       cbp::kMaxAuthFailures, cbp::kAuthBackoff);
    cbp::EndpointOptions options;
    options.scheduler = &scheduler;
    endpoint = std::make_unique<cbp::AgentEndpoint>(*registry, *work, options, common::null_logger());
    handler = endpoint->handler();
  }
  ~Broker() {
    work->stop();
    endpoint.reset();
    registry.reset();
    site.reset();
    repo->close();
  }

  // Waits until everything the work queue holds now has run (one thread: FIFO).
  void flush() {
    std::promise<void> done;
    auto f = done.get_future();
    if (work->post([&done] { done.set_value(); })) f.wait();
  }
};

// The hello `line` with its proof "@" replaced by the right one; `line` unchanged otherwise.
std::string with_proof(const Broker& b, const std::string& line, const std::string& nonce) {
  if (line.find("\"@\"") == std::string::npos) return line;
  auto parsed = cbp::parse(line);
  if (!parsed) return line;
  auto* hello = std::get_if<cbp::Hello>(&*parsed);
  if (hello == nullptr || hello->proof != "@") return line;
  std::string key;
  if (hello->enroll) {
    key = cbp::secret_hash(kEnrollmentKey);
  } else if (auto it = b.verifiers.find(hello->machine); it != b.verifiers.end()) {
    key = it->second;
  } else {
    return line;
  }
  hello->proof = cbp::compute_proof(key, nonce, hello->machine, hello->versions);
  return cbp::serialize(*parsed);
}

void check_sent(const std::vector<std::string>& sent, bool closed) {
  check(!sent.empty());
  int welcomes = 0, registereds = 0;
  bool rejected = false;
  for (std::size_t i = 0; i < sent.size(); ++i) {
    auto m = cbp::parse(sent[i]);
    check(m.has_value());
    check(cbp::sender_of(*m) != cbp::Sender::agent);
    if (i == 0) check(std::holds_alternative<cbp::Challenge>(*m));
    if (std::holds_alternative<cbp::Welcome>(*m)) ++welcomes;
    if (std::holds_alternative<cbp::Registered>(*m)) {
      check(welcomes == 1);
      ++registereds;
    }
    if (std::holds_alternative<cbp::Rejected>(*m)) rejected = true;
  }
  check(welcomes <= 1 && registereds <= 1);
  if (rejected) check(closed);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static unsigned connections = 0;
  ++connections;
  Broker& b = fuzz::fixture<Broker>(kConnectionsPerBroker);

  // A new address per connection: the back-off after failed proofs (per machine and address, on
  // a clock that stands still here) must not leak from one input into the next.
  const unsigned n = connections;
  auto peer = std::make_shared<FakePeer>("10." + std::to_string((n >> 16) & 255) + "." +
                                         std::to_string((n >> 8) & 255) + "." + std::to_string(n & 255));
  auto session = b.handler.on_open(peer);
  check(session != nullptr);
  const auto challenge = cbp::parse(peer->sent().at(0));
  check(challenge.has_value() && std::holds_alternative<cbp::Challenge>(*challenge));
  const std::string nonce = std::get<cbp::Challenge>(*challenge).nonce;

  std::string_view rest(reinterpret_cast<const char*>(data), size);
  while (!rest.empty() && !peer->closed()) {
    const auto eol = rest.find('\n');
    const std::string line(rest.substr(0, eol));
    rest = eol == std::string_view::npos ? std::string_view() : rest.substr(eol + 1);
    if (line == "BINARY") {
      // The transport delivers nothing after a binary frame.
      if (!session->on_binary_message()) break;
      b.flush();
      break;
    }
    session->on_message(with_proof(b, line, nonce));
    b.flush();
  }
  session->on_close(peer->closed() ? "closed by this side" : "closed by the peer: 1000");
  b.flush();
  check_sent(peer->sent(), peer->closed());
  check(b.endpoint->registered_machines().empty());
  return 0;
}
