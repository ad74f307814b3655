// power/libvirt_driver.cpp: see libvirt_driver.hpp and docs/power.md ("The libvirt driver").
//
// Error handling: libvirt reports failures through a thread-local "last error"; every failing
// call below is followed, on the same thread and before any other libvirt call, by take_error(),
// which copies and clears it. virConnGetLastError (per connection, shared between threads) is
// never used.
#include "power/libvirt_driver.hpp"

#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>

namespace power {

namespace {

// --- process-wide libvirt set-up ---------------------------------------------------------------

void ignore_error(void* /*user_data*/, virErrorPtr /*error*/) {}

// virInitialize and the no-op error handler, once per process. Returns false when libvirt could
// not be initialised.
bool init_libvirt() {
  static std::once_flag once;
  static bool ok = false;
  std::call_once(once, [] {
    ok = virInitialize() == 0;
    // Without a handler libvirt prints every error to stderr; errors are returned instead.
    virSetErrorFunc(nullptr, &ignore_error);
  });
  return ok;
}

// libvirt's default event loop, run on one background thread for the rest of the process. Needed
// for keepalive (the pings are timers and socket watches of this loop). Returns false when it
// cannot be registered (keepalive then stays off).
bool start_event_loop() {
  static std::once_flag once;
  static bool ok = false;
  std::call_once(once, [] {
    if (virEventRegisterDefaultImpl() < 0) {
      virResetLastError();
      return;
    }
    ok = true;
    std::thread([] {
      for (;;) {
        // Returns after each batch of events; -1 only on an internal poll() error.
        if (virEventRunDefaultImpl() < 0) {
          virResetLastError();
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
      }
    }).detach();
  });
  return ok;
}

// --- errors --------------------------------------------------------------------------------------

struct LibvirtError {
  int code = VIR_ERR_INTERNAL_ERROR;
  int domain = VIR_FROM_NONE;
  std::string message = "unknown libvirt error";
};

// Copies and clears this thread's last libvirt error. Call right after the failing call.
LibvirtError take_error() {
  LibvirtError e;
  if (const virErrorPtr last = virGetLastError(); last != nullptr) {
    e.code = last->code;
    e.domain = last->domain;
    if (last->message != nullptr) e.message = last->message;
  }
  virResetLastError();
  return e;
}

bool auth_error(int code) {
  return code == VIR_ERR_AUTH_FAILED || code == VIR_ERR_AUTH_CANCELLED || code == VIR_ERR_AUTH_UNAVAILABLE;
}

// The error table of docs/power.md. `conn` (may be null) is asked whether it is still alive for
// the errors that mean "connection lost" only on a dead connection.
Failure classify(const LibvirtError& e, virConnectPtr conn) {
  switch (e.code) {
    case VIR_ERR_NO_DOMAIN: return Failure::not_found;
    case VIR_ERR_OPERATION_INVALID: return Failure::invalid_state;
    case VIR_ERR_NO_CONNECT:
    case VIR_ERR_INVALID_CONN:
    case VIR_ERR_RPC: return Failure::connection;
    case VIR_ERR_OPERATION_TIMEOUT:
    case VIR_ERR_AGENT_UNRESPONSIVE: return Failure::timeout;
    case VIR_ERR_AUTH_FAILED:
    case VIR_ERR_AUTH_CANCELLED:
    case VIR_ERR_AUTH_UNAVAILABLE:
    case VIR_ERR_OPERATION_DENIED:
    case VIR_ERR_ACCESS_DENIED:
    case VIR_ERR_NO_SUPPORT:
    case VIR_ERR_OPERATION_UNSUPPORTED:
    case VIR_ERR_ARGUMENT_UNSUPPORTED: return Failure::refused;
    case VIR_ERR_SYSTEM_ERROR:
    case VIR_ERR_INTERNAL_ERROR:
      // Socket errors of the remote transport; otherwise "lost" only if the connection is dead
      // (a system error can also be e.g. a missing disk image on the host).
      if (e.domain == VIR_FROM_RPC || e.domain == VIR_FROM_REMOTE) return Failure::connection;
      if (conn != nullptr) {
        const int alive = virConnectIsAlive(conn);
        virResetLastError();
        if (alive == 0) return Failure::connection;
      }
      return Failure::internal;
    default: return Failure::internal;
  }
}

// --- RAII for libvirt objects --------------------------------------------------------------------

struct DomainFree {
  void operator()(virDomainPtr d) const {
    virDomainFree(d);
    virResetLastError();
  }
};
using DomainPtr = std::unique_ptr<virDomain, DomainFree>;

// One open connection. Shared by the calls running on it; closed when the last one lets go, so a
// reconnect never closes a connection under a call still using it.
struct Connection {
  explicit Connection(virConnectPtr p) : ptr(p) {}
  ~Connection() {
    virConnectClose(ptr);
    virResetLastError();
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  virConnectPtr const ptr;
  std::atomic<bool> dead{false};  // a call saw it drop: the next acquire() replaces it
};

// --- credentials ---------------------------------------------------------------------------------

struct Credentials {
  const std::string* username;
  const std::string* password;
};

int credential_types[] = {VIR_CRED_AUTHNAME, VIR_CRED_USERNAME, VIR_CRED_PASSPHRASE, VIR_CRED_NOECHOPROMPT};

// virConnectOpenAuth's callback: answers from the options, never prompts. libvirt frees the
// results with free().
int answer_credentials(virConnectCredentialPtr cred, unsigned int ncred, void* cbdata) {
  const auto* creds = static_cast<const Credentials*>(cbdata);
  for (unsigned int i = 0; i < ncred; ++i) {
    const std::string* answer = nullptr;
    switch (cred[i].type) {
      case VIR_CRED_AUTHNAME:
      case VIR_CRED_USERNAME: answer = creds->username; break;
      case VIR_CRED_PASSPHRASE:
      case VIR_CRED_NOECHOPROMPT: answer = creds->password; break;
      default: break;
    }
    if (answer == nullptr || answer->empty()) return -1;
    cred[i].result = strdup(answer->c_str());
    if (cred[i].result == nullptr) return -1;
    cred[i].resultlen = static_cast<unsigned int>(answer->size());
  }
  return 0;
}

// --- domains -------------------------------------------------------------------------------------

// "8-4-4-4-12" hex digits.
bool looks_like_uuid(std::string_view id) {
  if (id.size() != 36) return false;
  for (std::size_t i = 0; i < id.size(); ++i) {
    const char c = id[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-') return false;
    } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) {
      return false;
    }
  }
  return true;
}

std::string_view state_name(int state) {
  switch (state) {
    case VIR_DOMAIN_NOSTATE: return "in no state";
    case VIR_DOMAIN_RUNNING: return "running";
    case VIR_DOMAIN_BLOCKED: return "blocked";
    case VIR_DOMAIN_PAUSED: return "paused";
    case VIR_DOMAIN_SHUTDOWN: return "shutting down";
    case VIR_DOMAIN_SHUTOFF: return "shut off";
    case VIR_DOMAIN_CRASHED: return "crashed";
    case VIR_DOMAIN_PMSUSPENDED: return "suspended by guest power management";
    default: return "in an unknown state";
  }
}

PowerState to_power_state(int state, int reason) {
  switch (state) {
    case VIR_DOMAIN_RUNNING:
    case VIR_DOMAIN_BLOCKED: return PowerState::on;
    case VIR_DOMAIN_PAUSED:
      if (reason == VIR_DOMAIN_PAUSED_STARTING_UP) return PowerState::turning_on;
      if (reason == VIR_DOMAIN_PAUSED_SHUTTING_DOWN) return PowerState::turning_off;
      return PowerState::suspended;
    case VIR_DOMAIN_SHUTDOWN: return PowerState::turning_off;
    case VIR_DOMAIN_SHUTOFF: return PowerState::off;
    case VIR_DOMAIN_CRASHED: return PowerState::unavailable;
    case VIR_DOMAIN_PMSUSPENDED: return PowerState::suspended;
    default: return PowerState::unknown;
  }
}

bool running(int s) { return s == VIR_DOMAIN_RUNNING || s == VIR_DOMAIN_BLOCKED; }
bool suspended(int s) { return s == VIR_DOMAIN_PAUSED || s == VIR_DOMAIN_PMSUSPENDED; }

// Whether `action` can apply to a domain in `state`. NOSTATE (the hypervisor cannot say) leaves
// the decision to libvirt.
bool applies(Action action, int state) {
  if (state == VIR_DOMAIN_NOSTATE) return true;
  switch (action) {
    case Action::turn_on: return state == VIR_DOMAIN_SHUTOFF;
    case Action::turn_off:
    case Action::shutdown:
    case Action::reset:
    case Action::restart: return state != VIR_DOMAIN_SHUTOFF;
    case Action::suspend: return running(state);
    case Action::resume: return suspended(state);
  }
  return true;
}

// Whether a domain in `state` is already where `action` leads (Reset and Restart never are).
bool reached(Action action, int state) {
  switch (action) {
    case Action::turn_on:
    case Action::resume: return running(state);
    case Action::turn_off:
    case Action::shutdown: return state == VIR_DOMAIN_SHUTOFF;
    case Action::suspend: return suspended(state);
    case Action::reset:
    case Action::restart: return false;
  }
  return false;
}

int call_action(virDomainPtr d, Action action, int state) {
  switch (action) {
    case Action::turn_on: return virDomainCreate(d);
    case Action::turn_off: return virDomainDestroy(d);
    case Action::shutdown: return virDomainShutdown(d);
    case Action::reset: return virDomainReset(d, 0);
    case Action::restart: return virDomainReboot(d, 0);
    case Action::suspend: return virDomainSuspend(d);
    case Action::resume: return state == VIR_DOMAIN_PMSUSPENDED ? virDomainPMWakeup(d, 0) : virDomainResume(d);
  }
  return -1;
}

std::string quoted(std::string_view s) { return "'" + std::string(s) + "'"; }

}  // namespace

// --- the driver ----------------------------------------------------------------------------------

struct LibvirtDriver::Impl {
  explicit Impl(LibvirtOptions o)
      : options(std::move(o)),
        clock(options.clock != nullptr ? *options.clock : system_clock),
        credentials{&options.username, &options.password} {}

  LibvirtOptions options;
  common::SystemClock system_clock;
  const common::Clock& clock;
  Credentials credentials;

  std::atomic<std::uint64_t> opens{0};
  std::atomic<std::uint64_t> attempts{0};
  std::atomic<int> injected_failures{0};

  std::mutex mutex;  // guards the members below; held while opening, so one thread reconnects
  std::shared_ptr<Connection> conn;
  common::SysTime next_attempt{};        // no open before this (back-off)
  std::chrono::milliseconds backoff{0};  // the current back-off; 0 after a successful open
  Outcome last_open_failure;             // why the last open failed

  // Opens a new connection (mutex held).
  Outcome open(std::shared_ptr<Connection>& out) {
    if (!init_libvirt()) return {Failure::internal, "libvirt could not be initialised (virInitialize failed)"};
    if (options.keepalive_interval_seconds > 0) start_event_loop();
    virConnectAuth auth{credential_types, sizeof credential_types / sizeof credential_types[0], &answer_credentials,
                        &credentials};
    virConnectPtr c = virConnectOpenAuth(options.uri.empty() ? nullptr : options.uri.c_str(), &auth, 0);
    if (c == nullptr) {
      const LibvirtError e = take_error();
      return {auth_error(e.code) ? Failure::refused : Failure::connection,
              "cannot connect to " + quoted(options.uri) + ": " + e.message};
    }
    virConnSetErrorFunc(c, nullptr, &ignore_error);
    if (options.keepalive_interval_seconds > 0) {
      // -1 with VIR_ERR_NO_SUPPORT for in-process drivers (test, esx, hyperv); 1 when the daemon
      // does not support keepalive. Either way the connection works, only without keepalive.
      if (virConnectSetKeepAlive(c, options.keepalive_interval_seconds, options.keepalive_count) < 0) {
        const LibvirtError e = take_error();
        if (e.code != VIR_ERR_NO_SUPPORT && options.logger)
          options.logger->warn("libvirt {}: keepalive not enabled: {}", options.uri, e.message);
      }
    }
    out = std::make_shared<Connection>(c);
    return {};
  }

  // The connection to use: the open one if it is alive, else a new one (subject to back-off).
  Outcome acquire(std::shared_ptr<Connection>& out) {
    std::shared_ptr<Connection> old;  // a replaced connection is closed after the lock is released
    std::lock_guard lock(mutex);
    if (conn && (conn->dead.load() || virConnectIsAlive(conn->ptr) == 0)) {
      virResetLastError();
      old = std::move(conn);
      conn.reset();
    }
    if (!conn) {
      const common::SysTime now = clock.now();
      if (now < next_attempt) {
        const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next_attempt - now);
        return {last_open_failure.failure, "not connected (next attempt in " + std::to_string(wait.count()) +
                                               " ms); last attempt: " + last_open_failure.message};
      }
      ++attempts;
      if (Outcome o = open(conn); !o.ok()) {
        backoff =
            backoff.count() == 0 ? options.reconnect_min_backoff : std::min(backoff * 2, options.reconnect_max_backoff);
        next_attempt = now + backoff;
        last_open_failure = o;
        if (options.logger)
          options.logger->warn("libvirt {}: {} (retrying in {} ms)", options.uri, o.message, backoff.count());
        return o;
      }
      if (opens++ > 0 && options.logger) options.logger->info("libvirt {}: reconnected", options.uri);
      backoff = std::chrono::milliseconds{0};
      next_attempt = {};
    }
    out = conn;
    return {};
  }

  bool take_injected_failure() {
    int n = injected_failures.load();
    while (n > 0)
      if (injected_failures.compare_exchange_weak(n, n - 1)) return true;
    return false;
  }

  // Runs fn(conn, retry) on the connection; when it fails because the connection dropped,
  // reconnects and runs it once more (retry = true).
  template <typename Fn>
  Outcome with_connection(Fn&& fn) {
    Outcome o;
    for (int attempt = 0; attempt < 2; ++attempt) {
      std::shared_ptr<Connection> c;
      if (o = acquire(c); !o.ok()) return o;
      if (take_injected_failure())
        o = {Failure::connection, "connection lost (simulated by a test)"};
      else
        o = fn(c->ptr, attempt > 0);
      if (o.failure != Failure::connection) return o;
      c->dead = true;
      if (options.logger)
        options.logger->warn("libvirt {}: connection lost: {}{}", options.uri, o.message,
                             attempt == 0 ? "; reconnecting" : "");
    }
    return o;
  }

  // The outcome of a failed libvirt call, right after it (same thread).
  static Outcome failed(virConnectPtr c, const std::string& context) {
    const LibvirtError e = take_error();
    return {classify(e, c), context + ": " + e.message};
  }

  static Outcome lookup(virConnectPtr c, const std::string& id, DomainPtr& out) {
    if (id.empty()) return {Failure::not_found, "no virtual machine id (empty name)"};
    if (looks_like_uuid(id)) {
      out.reset(virDomainLookupByUUIDString(c, id.c_str()));
      if (out) return {};
      const LibvirtError e = take_error();
      if (e.code != VIR_ERR_NO_DOMAIN) return {classify(e, c), "looking up domain " + quoted(id) + ": " + e.message};
      // Not a UUID the hypervisor knows: maybe a domain named like one.
    }
    out.reset(virDomainLookupByName(c, id.c_str()));
    if (out) return {};
    const LibvirtError e = take_error();
    if (e.code == VIR_ERR_NO_DOMAIN) return {Failure::not_found, "no domain named or with UUID " + quoted(id)};
    return {classify(e, c), "looking up domain " + quoted(id) + ": " + e.message};
  }

  static Outcome get_state(virConnectPtr c, virDomainPtr d, const std::string& id, int& state, int& reason) {
    if (virDomainGetState(d, &state, &reason, 0) < 0) return failed(c, "getting the state of " + quoted(id));
    return {};
  }
};

LibvirtDriver::LibvirtDriver(LibvirtOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}

LibvirtDriver::~LibvirtDriver() = default;

Outcome LibvirtDriver::query(const VmRef& vm, PowerState& state) {
  return impl_->with_connection([&](virConnectPtr c, bool /*retry*/) -> Outcome {
    DomainPtr d;
    if (Outcome o = Impl::lookup(c, vm.vm_id, d); !o.ok()) return o;
    int s = VIR_DOMAIN_NOSTATE;
    int reason = 0;
    if (Outcome o = Impl::get_state(c, d.get(), vm.vm_id, s, reason); !o.ok()) return o;
    state = to_power_state(s, reason);
    return {};
  });
}

Outcome LibvirtDriver::perform(const VmRef& vm, Action action) {
  return impl_->with_connection([&](virConnectPtr c, bool /*retry*/) -> Outcome {
    DomainPtr d;
    if (Outcome o = Impl::lookup(c, vm.vm_id, d); !o.ok()) return o;
    int s = VIR_DOMAIN_NOSTATE;
    int reason = 0;
    if (Outcome o = Impl::get_state(c, d.get(), vm.vm_id, s, reason); !o.ok()) return o;
    // Already where the action leads (TurnOn of a running domain, a retry after a lost reply):
    // done, as with the simulated driver. Only actions that cannot lead there are invalid_state.
    if (reached(action, s)) return {};
    if (!applies(action, s))
      return {Failure::invalid_state, "cannot " + std::string(to_string(action)) + " " + quoted(vm.vm_id) +
                                          ": the domain is " + std::string(state_name(s))};
    if (call_action(d.get(), action, s) < 0)
      return Impl::failed(c, std::string(to_string(action)) + " of " + quoted(vm.vm_id));
    return {};
  });
}

Outcome LibvirtDriver::list(std::vector<std::string>& vm_ids) {
  return impl_->with_connection([&](virConnectPtr c, bool /*retry*/) -> Outcome {
    virDomainPtr* domains = nullptr;
    const int n = virConnectListAllDomains(c, &domains, 0);
    if (n < 0) return Impl::failed(c, "listing domains");
    std::vector<std::string> names;
    names.reserve(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      if (const char* name = virDomainGetName(domains[i]); name != nullptr) names.emplace_back(name);
      virDomainFree(domains[i]);
    }
    std::free(domains);
    virResetLastError();
    std::sort(names.begin(), names.end());
    vm_ids = std::move(names);
    return {};
  });
}

Outcome LibvirtDriver::connect() {
  std::shared_ptr<Connection> c;
  return impl_->acquire(c);
}

const std::string& LibvirtDriver::uri() const { return impl_->options.uri; }

std::uint64_t LibvirtDriver::opens() const { return impl_->opens.load(); }

std::uint64_t LibvirtDriver::open_attempts() const { return impl_->attempts.load(); }

void LibvirtDriver::simulate_connection_loss_for_test() {
  std::lock_guard lock(impl_->mutex);
  if (impl_->conn) impl_->conn->dead = true;
}

void LibvirtDriver::fail_next_calls_for_test(int calls) { impl_->injected_failures = std::max(calls, 0); }

}  // namespace power
