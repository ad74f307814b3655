// power/libvirt_driver_test.cpp: LibvirtDriver against libvirt's built-in test driver
// (test:///<file>, no daemon). Each open of a test:/// URI starts from the file's state, so every
// test case makes its own driver, and a reconnect shows as the domains returning to that state.
// Host files: tests/data/libvirt/.
#include "power/libvirt_driver.hpp"

// The driver's header must not pull in libvirt's.
#if defined(LIBVIR_VERSION_NUMBER) || defined(__VIR_LIBVIRT_H__)
#error "power/libvirt_driver.hpp includes <libvirt/libvirt.h>"
#endif

#include "common/clock.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

namespace {

using power::Action;
using power::Failure;
using power::LibvirtDriver;
using power::LibvirtOptions;
using power::PowerState;
using power::VmRef;

const std::string kDataDir = std::string(OPENBROKER_SOURCE_DIR) + "/tests/data/libvirt/";
const std::string kNodeUri = "test://" + kDataDir + "test-node.xml";
const std::string kDesk01Uuid = "6f1c8e2a-3b4d-4c5e-9f60-718293a4b5c6";  // desk-01, running
const std::string kDesk05Uuid = "0b7e5a3c-9d2f-4e81-a6b4-c3d2e1f0a9b8";  // desk-05, shut off

LibvirtOptions options(const std::string& uri) {
  LibvirtOptions o;
  o.uri = uri;
  return o;
}

VmRef vm(const std::string& id) { return power::vm_ref("DEMO\\" + id, id); }

PowerState state_of(LibvirtDriver& d, const std::string& id) {
  PowerState s = PowerState::unknown;
  const auto o = d.query(vm(id), s);
  INFO(o.message);
  REQUIRE(o.ok());
  return s;
}

// Captures what is written to file descriptor 2 while it lives.
class StderrCapture {
 public:
  StderrCapture() {
    std::fflush(stderr);
    saved_ = ::dup(2);
    std::FILE* f = std::tmpfile();
    REQUIRE(f != nullptr);
    file_ = f;
    ::dup2(::fileno(f), 2);
  }
  ~StderrCapture() { restore(); }
  StderrCapture(const StderrCapture&) = delete;
  StderrCapture& operator=(const StderrCapture&) = delete;

  std::string text() {
    restore();
    std::string out;
    std::rewind(file_);
    char buf[512];
    std::size_t n = 0;
    while ((n = std::fread(buf, 1, sizeof buf, file_)) > 0) out.append(buf, n);
    return out;
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    std::fflush(stderr);
    ::dup2(saved_, 2);
    ::close(saved_);
    saved_ = -1;
  }
  int saved_ = -1;
  std::FILE* file_ = nullptr;
};

// A test-driver host file with `count` domains "vm-000".., even ones running, odd ones shut off.
class ManyDomainsFile {
 public:
  explicit ManyDomainsFile(int count) {
    path_ = std::filesystem::temp_directory_path() /
            ("openbroker-libvirt-" + std::to_string(::getpid()) + "-" + std::to_string(count) + ".xml");
    write(count);
  }
  void write(int count) {
    std::ofstream out(path_, std::ios::trunc);
    out << "<node xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\n";
    for (int i = 0; i < count; ++i) {
      out << "<domain type='test'><name>" << name(i) << "</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>"
          << "<os><type>hvm</type></os>" << (i % 2 == 1 ? "<test:runstate>5</test:runstate>" : "") << "</domain>\n";
    }
    out << "</node>\n";
  }
  // Makes the "hypervisor" unreachable: opening the URI fails (quietly: a missing file would make
  // libxml2 print a warning).
  void write_malformed() { std::ofstream(path_, std::ios::trunc) << "<node><domain>\n"; }
  ~ManyDomainsFile() {
    std::error_code ec;
    std::filesystem::remove(path_, ec);
  }
  ManyDomainsFile(const ManyDomainsFile&) = delete;
  ManyDomainsFile& operator=(const ManyDomainsFile&) = delete;

  std::string uri() const { return "test://" + path_.string(); }
  static std::string name(int i) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "vm-%03d", i);
    return buf;
  }

 private:
  std::filesystem::path path_;
};

}  // namespace

TEST_CASE("libvirt: the driver's kind, and no connection before the first call") {
  LibvirtDriver d(options(kNodeUri));
  CHECK(d.kind() == "libvirt");
  CHECK(d.uri() == kNodeUri);
  CHECK(d.open_attempts() == 0);
  CHECK(d.connect().ok());
  CHECK(d.connect().ok());
  CHECK(d.opens() == 1);
}

TEST_CASE("libvirt: query running and shut-off domains by name and by UUID") {
  LibvirtDriver d(options(kNodeUri));
  CHECK(state_of(d, "desk-01") == PowerState::on);
  CHECK(state_of(d, "desk-04") == PowerState::on);
  CHECK(state_of(d, "desk-05") == PowerState::off);
  CHECK(state_of(d, "desk-08") == PowerState::off);
  CHECK(state_of(d, kDesk01Uuid) == PowerState::on);
  CHECK(state_of(d, kDesk05Uuid) == PowerState::off);
  // Upper-case hex is the same UUID.
  std::string upper = kDesk05Uuid;
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  CHECK(state_of(d, upper) == PowerState::off);
  // A domain named like a UUID (not its own) is found by name.
  CHECK(state_of(d, "9e2d0f1a-0000-4000-8000-00000000beef") == PowerState::on);
  // The machine name without its domain part, when there is no hosted_machine_id.
  PowerState s = PowerState::unknown;
  CHECK(d.query(power::vm_ref("DEMO\\desk-06", ""), s).ok());
  CHECK(s == PowerState::off);
  CHECK(d.opens() == 1);
}

TEST_CASE("libvirt: the other domain states") {
  LibvirtDriver d(options(kNodeUri));
  CHECK(state_of(d, "desk-paused") == PowerState::suspended);
  CHECK(state_of(d, "desk-stopping") == PowerState::turning_off);
  CHECK(state_of(d, "desk-crashed") == PowerState::unavailable);
  CHECK(state_of(d, "desk-pmsuspended") == PowerState::suspended);
}

TEST_CASE("libvirt: TurnOn, then Shutdown and TurnOff round trips") {
  LibvirtDriver d(options(kNodeUri));
  for (const std::string id : {"desk-05", "desk-06"}) {
    REQUIRE(state_of(d, id) == PowerState::off);
    CHECK(d.perform(vm(id), Action::turn_on).ok());
    CHECK(state_of(d, id) == PowerState::on);
  }
  CHECK(d.perform(vm("desk-05"), Action::shutdown).ok());
  CHECK(state_of(d, "desk-05") == PowerState::off);
  CHECK(d.perform(vm("desk-06"), Action::turn_off).ok());
  CHECK(state_of(d, "desk-06") == PowerState::off);
  // By UUID, and again after being turned off.
  CHECK(d.perform(vm(kDesk05Uuid), Action::turn_on).ok());
  CHECK(state_of(d, "desk-05") == PowerState::on);
  CHECK(d.perform(vm(kDesk01Uuid), Action::turn_off).ok());
  CHECK(state_of(d, kDesk01Uuid) == PowerState::off);
  // A domain being shut down can be turned off hard.
  CHECK(d.perform(vm("desk-stopping"), Action::turn_off).ok());
  CHECK(state_of(d, "desk-stopping") == PowerState::off);
}

TEST_CASE("libvirt: Suspend and Resume round trip") {
  LibvirtDriver d(options(kNodeUri));
  CHECK(d.perform(vm("desk-02"), Action::suspend).ok());
  CHECK(state_of(d, "desk-02") == PowerState::suspended);
  CHECK(d.perform(vm("desk-02"), Action::resume).ok());
  CHECK(state_of(d, "desk-02") == PowerState::on);
  CHECK(d.perform(vm("desk-paused"), Action::resume).ok());
  CHECK(state_of(d, "desk-paused") == PowerState::on);
}

TEST_CASE("libvirt: Reset and Restart of a running domain") {
  LibvirtDriver d(options(kNodeUri));
  CHECK(d.perform(vm("desk-03"), Action::reset).ok());
  CHECK(state_of(d, "desk-03") == PowerState::on);
  CHECK(d.perform(vm("desk-03"), Action::restart).ok());
  CHECK(state_of(d, "desk-03") == PowerState::on);
  CHECK(d.perform(vm(kDesk01Uuid), Action::restart).ok());
  CHECK(state_of(d, "desk-01") == PowerState::on);
}

TEST_CASE("libvirt: actions that do not apply to the domain's state are invalid_state") {
  LibvirtDriver d(options(kNodeUri));
  struct Case {
    const char* id;
    Action action;
  };
  const Case cases[] = {
      {"desk-05", Action::suspend}, {"desk-05", Action::resume}, {"desk-05", Action::reset},
      {"desk-05", Action::restart}, {"desk-crashed", Action::turn_on},
  };
  for (const auto& c : cases) {
    CAPTURE(c.id);
    CAPTURE(power::to_string(c.action));
    const auto o = d.perform(vm(c.id), c.action);
    CHECK(o.failure == Failure::invalid_state);
    CHECK(o.message.find(c.id) != std::string::npos);
    CHECK_FALSE(power::transient(o.failure));
  }
  const auto o = d.perform(vm("desk-05"), Action::resume);
  CHECK(o.message == "cannot Resume 'desk-05': the domain is shut off");
  // Actions the domain is already past succeed without change (as with the simulated driver).
  for (const auto& [id, action] : {std::pair{"desk-01", Action::turn_on}, {"desk-01", Action::resume},
                                   {"desk-05", Action::shutdown}, {"desk-05", Action::turn_off},
                                   {"desk-paused", Action::suspend}})
    CHECK(d.perform(vm(id), action).ok());
  // Nothing changed.
  CHECK(state_of(d, "desk-01") == PowerState::on);
  CHECK(state_of(d, "desk-05") == PowerState::off);
  CHECK(state_of(d, "desk-paused") == PowerState::suspended);
}

TEST_CASE("libvirt: unknown domains are not_found") {
  LibvirtDriver d(options(kNodeUri));
  PowerState s = PowerState::on;
  for (const std::string id : {"no-such-desk", "00000000-0000-4000-8000-000000000000", ""}) {
    CAPTURE(id);
    const auto q = d.query(vm(id), s);
    CHECK(q.failure == Failure::not_found);
    CHECK(d.perform(vm(id), Action::turn_on).failure == Failure::not_found);
  }
  CHECK(d.query(vm("no-such-desk"), s).message == "no domain named or with UUID 'no-such-desk'");
  CHECK(s == PowerState::on);  // untouched on failure
  CHECK(d.opens() == 1);       // not_found is not a connection problem
}

TEST_CASE("libvirt: list") {
  LibvirtDriver d(options(kNodeUri));
  std::vector<std::string> ids{"stale"};
  REQUIRE(d.list(ids).ok());
  const std::vector<std::string> expected{
      "9e2d0f1a-0000-4000-8000-00000000beef",
      "desk-01",
      "desk-02",
      "desk-03",
      "desk-04",
      "desk-05",
      "desk-06",
      "desk-07",
      "desk-08",
      "desk-crashed",
      "desk-paused",
      "desk-pmsuspended",
      "desk-stopping",
  };
  CHECK(ids == expected);
}

TEST_CASE("libvirt: an unreachable hypervisor is a connection failure, without stderr output") {
  StderrCapture capture;
  {
    LibvirtDriver d(options("qemu+tcp://127.0.0.1:1/system"));
    PowerState s = PowerState::unknown;
    const auto q = d.query(vm("desk-01"), s);
    CHECK(q.failure == Failure::connection);
    CHECK(power::transient(q.failure));
    CHECK(q.message.find("cannot connect to 'qemu+tcp://127.0.0.1:1/system'") == 0);
    CHECK(d.opens() == 0);
  }
  {
    LibvirtDriver d(options("test://" + kDataDir + "malformed.xml"));
    std::vector<std::string> ids;
    CHECK(d.list(ids).failure == Failure::connection);
    CHECK(d.perform(vm("x"), Action::turn_on).failure == Failure::connection);
  }
  {
    LibvirtDriver d(options("nosuchdriver:///system"));
    CHECK(d.connect().failure == Failure::connection);
  }
  CHECK(capture.text() == "");
}

TEST_CASE("libvirt: a dead hypervisor is retried with back-off") {
  common::ManualClock clock;
  LibvirtOptions o = options("qemu+tcp://127.0.0.1:1/system");
  o.clock = &clock;
  o.reconnect_min_backoff = std::chrono::seconds(1);
  o.reconnect_max_backoff = std::chrono::seconds(4);
  LibvirtDriver d(o);
  PowerState s = PowerState::unknown;

  CHECK(d.query(vm("a"), s).failure == Failure::connection);
  CHECK(d.open_attempts() == 1);
  // Within the back-off: fails at once, without trying.
  const auto fast = d.query(vm("a"), s);
  CHECK(fast.failure == Failure::connection);
  CHECK(fast.message.find("next attempt in 1000 ms") != std::string::npos);
  CHECK(fast.message.find("Connection refused") != std::string::npos);
  CHECK(d.open_attempts() == 1);

  const int expected_waits[] = {1, 2, 4, 4};  // doubling, capped at the maximum
  std::uint64_t attempts = 1;
  for (const int wait : expected_waits) {
    clock.advance(std::chrono::seconds(wait) - std::chrono::milliseconds(1));
    CHECK(d.connect().failure == Failure::connection);
    CHECK(d.open_attempts() == attempts);
    clock.advance(std::chrono::milliseconds(1));
    CHECK(d.connect().failure == Failure::connection);
    CHECK(d.open_attempts() == ++attempts);
  }
}

TEST_CASE("libvirt: credentials are answered from the options") {
  const std::string uri = "test://" + kDataDir + "test-auth.xml";
  SUBCASE("right credentials") {
    LibvirtOptions o = options(uri);
    o.username = "broker";
    o.password = "s3cret";
    LibvirtDriver d(o);
    CHECK(state_of(d, "secure-01") == PowerState::on);
  }
  SUBCASE("wrong password") {
    LibvirtOptions o = options(uri);
    o.username = "broker";
    o.password = "wrong";
    LibvirtDriver d(o);
    const auto c = d.connect();
    CHECK(c.failure == Failure::refused);
    CHECK_FALSE(power::transient(c.failure));
  }
  SUBCASE("none configured: refused, never a prompt") {
    LibvirtDriver d(options(uri));
    CHECK(d.connect().failure == Failure::refused);
  }
}

TEST_CASE("libvirt: 200 domains listed and queried") {
  ManyDomainsFile file(200);
  LibvirtDriver d(options(file.uri()));
  std::vector<std::string> ids;
  REQUIRE(d.list(ids).ok());
  REQUIRE(ids.size() == 200);
  for (int i = 0; i < 200; ++i) {
    CHECK(ids[static_cast<std::size_t>(i)] == ManyDomainsFile::name(i));
    CHECK(state_of(d, ManyDomainsFile::name(i)) == (i % 2 == 0 ? PowerState::on : PowerState::off));
  }
  // Turn all the shut-off ones on.
  for (int i = 1; i < 200; i += 2) CHECK(d.perform(vm(ManyDomainsFile::name(i)), Action::turn_on).ok());
  for (int i = 0; i < 200; ++i) CHECK(state_of(d, ManyDomainsFile::name(i)) == PowerState::on);
  CHECK(d.opens() == 1);
}

TEST_CASE("libvirt: concurrent calls from several threads") {
  constexpr int thread_count = 8;
  constexpr int per_thread = 12;  // domains each thread owns
  ManyDomainsFile file(thread_count * per_thread);
  LibvirtDriver d(options(file.uri()));
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  threads.reserve(thread_count);
  for (int t = 0; t < thread_count; ++t) {
    threads.emplace_back([&, t] {
      auto expect = [&](bool ok) {
        if (!ok) ++failures;
      };
      for (int round = 0; round < 3; ++round) {
        for (int k = 0; k < per_thread; ++k) {
          const int i = t * per_thread + k;
          const VmRef ref = vm(ManyDomainsFile::name(i));
          PowerState s = PowerState::unknown;
          expect(d.query(ref, s).ok());
          // Each domain ends each round in the state it started in.
          const bool was_off = s == PowerState::off;
          if (was_off) {
            expect(d.perform(ref, Action::turn_on).ok());
            expect(d.query(ref, s).ok() && s == PowerState::on);
            expect(d.perform(ref, Action::suspend).ok());
            expect(d.perform(ref, Action::resume).ok());
            expect(d.perform(ref, Action::turn_off).ok());
          } else {
            expect(s == PowerState::on);
            expect(d.perform(ref, Action::restart).ok());
            expect(d.perform(ref, Action::shutdown).ok());
            expect(d.perform(ref, Action::turn_on).ok());
          }
          // Resume applies to neither: done already for a running domain, invalid for a shut-off one.
          expect(d.perform(ref, Action::resume).failure == (was_off ? Failure::invalid_state : Failure::none));
        }
        std::vector<std::string> ids;
        expect(d.list(ids).ok() && ids.size() == static_cast<std::size_t>(thread_count) * per_thread);
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failures.load() == 0);
  for (int i = 0; i < thread_count * per_thread; ++i)
    CHECK(state_of(d, ManyDomainsFile::name(i)) == (i % 2 == 0 ? PowerState::on : PowerState::off));
  CHECK(d.opens() == 1);
}

TEST_CASE("libvirt: a lost connection is reopened by the next call") {
  LibvirtDriver d(options(kNodeUri));
  REQUIRE(d.perform(vm("desk-07"), Action::turn_on).ok());
  REQUIRE(state_of(d, "desk-07") == PowerState::on);
  d.simulate_connection_loss_for_test();
  // A new connection to the test driver starts from the file again: desk-07 is off there.
  CHECK(state_of(d, "desk-07") == PowerState::off);
  CHECK(d.opens() == 2);
  CHECK(d.open_attempts() == 2);
  CHECK(state_of(d, "desk-07") == PowerState::off);
  CHECK(d.opens() == 2);
}

TEST_CASE("libvirt: a call that loses the connection reconnects and is retried once") {
  LibvirtDriver d(options(kNodeUri));
  REQUIRE(d.connect().ok());

  SUBCASE("the retry succeeds") {
    d.fail_next_calls_for_test(1);
    CHECK(state_of(d, "desk-05") == PowerState::off);
    CHECK(d.opens() == 2);
    d.fail_next_calls_for_test(1);
    CHECK(d.perform(vm("desk-05"), Action::turn_on).ok());
    CHECK(d.opens() == 3);
    CHECK(state_of(d, "desk-05") == PowerState::on);
  }
  SUBCASE("the retry fails too: connection, and the next call reconnects") {
    d.fail_next_calls_for_test(2);
    std::vector<std::string> ids;
    const auto o = d.list(ids);
    CHECK(o.failure == Failure::connection);
    CHECK(o.message.find("connection lost") != std::string::npos);
    CHECK(d.opens() == 2);
    CHECK(d.list(ids).ok());
    CHECK(d.opens() == 3);
    CHECK(ids.size() == 13);
  }
  SUBCASE("an action already done when retried counts as done") {
    // desk-01 runs: a TurnOn whose first attempt "reached the hypervisor" before the connection
    // dropped finds it running on the retry.
    d.fail_next_calls_for_test(1);
    CHECK(d.perform(vm("desk-01"), Action::turn_on).ok());
    d.fail_next_calls_for_test(1);
    CHECK(d.perform(vm("desk-05"), Action::shutdown).ok());
    d.fail_next_calls_for_test(1);
    CHECK(d.perform(vm("desk-paused"), Action::suspend).ok());
    // Without a retry the same calls are done as well (the domain is already there).
    CHECK(d.perform(vm("desk-01"), Action::turn_on).ok());
    CHECK(d.perform(vm("desk-05"), Action::shutdown).ok());
  }
}

TEST_CASE("libvirt: a failed reconnect is a connection failure, and a later call reconnects") {
  common::ManualClock clock;
  ManyDomainsFile file(4);
  LibvirtOptions o = options(file.uri());
  o.clock = &clock;
  LibvirtDriver d(o);
  REQUIRE(state_of(d, ManyDomainsFile::name(0)) == PowerState::on);

  StderrCapture capture;
  // The hypervisor goes away.
  file.write_malformed();
  PowerState s = PowerState::unknown;
  SUBCASE("found dead before the call") { d.simulate_connection_loss_for_test(); }
  SUBCASE("lost during the call") { d.fail_next_calls_for_test(1); }
  const auto lost = d.query(vm(ManyDomainsFile::name(0)), s);
  CHECK(lost.failure == Failure::connection);
  CHECK(lost.message.find("cannot connect to") == 0);
  CHECK(d.opens() == 1);
  CHECK(d.open_attempts() == 2);
  CHECK(d.query(vm(ManyDomainsFile::name(0)), s).failure == Failure::connection);  // back-off
  CHECK(d.open_attempts() == 2);

  // It is back.
  file.write(4);
  CHECK(d.query(vm(ManyDomainsFile::name(0)), s).failure == Failure::connection);  // still backing off
  clock.advance(o.reconnect_min_backoff);
  CHECK(state_of(d, ManyDomainsFile::name(1)) == PowerState::off);
  CHECK(d.opens() == 2);
  CHECK(d.open_attempts() == 3);
  CHECK(capture.text() == "");
}

TEST_CASE("libvirt: concurrent calls while the connection keeps dropping") {
  constexpr int drops = 50;
  ManyDomainsFile file(40);
  LibvirtDriver d(options(file.uri()));
  REQUIRE(d.connect().ok());
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::atomic<int> calls{0};
  std::vector<std::thread> threads;
  threads.reserve(6);
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (int n = 0; !stop.load(); ++n) {
        PowerState s = PowerState::unknown;
        const auto o = d.query(vm(ManyDomainsFile::name((t * 7 + n) % 40)), s);
        if (!o.ok()) ++failures;
        ++calls;
      }
    });
  }
  // Drops the connection, waits until a caller has reopened it, again and again.
  bool reopened = true;
  for (int k = 0; k < drops && reopened; ++k) {
    d.simulate_connection_loss_for_test();
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (d.opens() < static_cast<std::uint64_t>(k) + 2 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::yield();
    reopened = d.opens() == static_cast<std::uint64_t>(k) + 2;
  }
  stop = true;
  for (auto& th : threads) th.join();
  CHECK(reopened);
  CHECK(calls.load() > drops);
  CHECK(failures.load() == 0);
  CHECK(d.opens() == drops + 1);
  CHECK(d.open_attempts() == drops + 1);
}
