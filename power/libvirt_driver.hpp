// power/libvirt_driver.hpp: the PowerDriver for libvirt (KVM/QEMU, Xen, ESX, Hyper-V, libvirt's
// test driver), on libvirt's C API. Format and behaviour for admins: docs/power.md, "The libvirt
// driver". This header does not include <libvirt/libvirt.h> (the connection lives in the .cpp).
//
// One LibvirtDriver is one libvirt connection (one [[hypervisor_connection]] with driver =
// "libvirt"). The connection is opened on the first call (or by connect()), shared by all calls,
// and reopened when it is lost: a call that fails because the connection dropped, or finds
// virConnectIsAlive() false, closes it, reopens it and retries the call once. A failed (re)open
// starts a back-off (reconnect_min_backoff, doubling up to reconnect_max_backoff); until it ends,
// calls fail at once with Failure::connection instead of hammering a dead hypervisor.
//
// Machines are matched to domains by VmRef::vm_id: a UUID in its 36-character form is looked up
// as a UUID (then as a name, for domains named like UUIDs); anything else is a domain name.
//
// Thread-safety: every member function may be called from any thread at the same time (libvirt
// connections are thread-safe); one mutex guards opening and replacing the connection, so only one
// thread reconnects. Calls BLOCK for as long as libvirt does: see LibvirtOptions::keepalive_*.
//
// Process-wide effects (libvirt's own state is process-wide): the first LibvirtDriver calls
// virInitialize() and installs a no-op libvirt error handler (virSetErrorFunc), so libvirt never
// prints its errors to stderr; the driver returns them in Outcome::message instead. When keepalive
// is on, it also registers libvirt's default event loop and runs it on one background thread for
// the rest of the process (libvirt needs a running event loop for keepalive).
#pragma once

#include "common/clock.hpp"
#include "power/driver.hpp"

#include <spdlog/fwd.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace power {

struct LibvirtOptions {
  // The libvirt connection URI ([[hypervisor_connection]] uri), e.g. "qemu:///system",
  // "qemu+ssh://root@kvm1/system", "xen:///system", "esx://vc1.example.com/?no_verify=1",
  // "hyperv://hv1.example.com/", "test:///path/to/node.xml".
  std::string uri;

  // Credentials for URIs that ask for them (esx://, hyperv://, SASL on qemu+tcp://). Given to
  // libvirt through virConnectOpenAuth's callback: username answers VIR_CRED_AUTHNAME and
  // VIR_CRED_USERNAME, password answers VIR_CRED_PASSPHRASE and VIR_CRED_NOECHOPROMPT. Any other
  // question (or one whose answer is empty here) fails the open: the driver never prompts.
  // libvirt's drivers read their client auth file first (LIBVIRT_AUTH_FILE, else
  // $XDG_CONFIG_HOME/libvirt/auth.conf, else /etc/libvirt/auth.conf), so credentials can also
  // live there and stay out of the broker's config.
  std::string username;
  std::string password;

  // Keepalive (remote connections: qemu:///system, qemu+ssh://, qemu+tcp://, xen:///system ...):
  // after keepalive_interval seconds without traffic the client pings the daemon; when
  // keepalive_count pings in a row go unanswered the connection is closed, which fails any call
  // blocked on it (so a call on a dead or hung daemon returns Failure::connection after about
  // interval * (count + 1) seconds, 20 s by default) and the next call reconnects. 0 turns it off
  // (then a call on a hung daemon blocks until TCP gives up). In-process drivers (test://, esx://,
  // hyperv://) do not support keepalive; the driver ignores that.
  int keepalive_interval_seconds = 5;
  unsigned keepalive_count = 3;

  // Back-off after a failed (re)open: the first retry waits min, each further failure doubles
  // the wait up to max; a successful open resets it.
  std::chrono::milliseconds reconnect_min_backoff{1000};
  std::chrono::milliseconds reconnect_max_backoff{60000};

  // Time source for the back-off (nullptr: the system clock). Must outlive the driver.
  const common::Clock* clock = nullptr;
  // Reconnects and their failures are logged here (nullptr: not logged).
  std::shared_ptr<spdlog::logger> logger;
};

class LibvirtDriver final : public PowerDriver {
 public:
  // Does not connect: the first call (or connect()) does, so a hypervisor that is down when the
  // broker starts does not stop the broker.
  explicit LibvirtDriver(LibvirtOptions options);
  ~LibvirtDriver() override;
  LibvirtDriver(const LibvirtDriver&) = delete;
  LibvirtDriver& operator=(const LibvirtDriver&) = delete;

  std::string_view kind() const override { return "libvirt"; }

  // The domain's state (virDomainGetState): running/blocked -> on, paused -> suspended (paused
  // while starting up -> turning_on, while shutting down -> turning_off), shutdown (being shut
  // down) -> turning_off, shutoff -> off, crashed -> unavailable, pmsuspended -> suspended,
  // nostate -> unknown. Failure: connection, timeout, not_found, refused, internal.
  Outcome query(const VmRef& vm, PowerState& state) override;

  // TurnOn = virDomainCreate, TurnOff = virDomainDestroy, Shutdown = virDomainShutdown,
  // Reset = virDomainReset, Restart = virDomainReboot, Suspend = virDomainSuspend,
  // Resume = virDomainResume (virDomainPMWakeup for a pmsuspended domain).
  // The driver checks the domain's state first and answers invalid_state itself when the action
  // cannot apply (TurnOn of an active domain; TurnOff, Shutdown, Reset, Restart of an inactive
  // one; Suspend of one that is not running; Resume of one that is not suspended), so every
  // libvirt back end reports it the same way. When the call is retried after a reconnect and the
  // domain is already where the action leads (the first attempt may have reached the
  // hypervisor before the connection dropped), the action counts as done.
  // Failure: connection, timeout, not_found, invalid_state, refused, internal.
  Outcome perform(const VmRef& vm, Action action) override;

  // The names of all domains (active and inactive), sorted. Failure: connection, timeout,
  // refused, internal.
  Outcome list(std::vector<std::string>& vm_ids) override;

  // Opens the connection now if it is not open (subject to the back-off). Failure: connection,
  // or refused when the hypervisor rejected the credentials.
  Outcome connect();

  const std::string& uri() const;
  // Successful opens so far, and open attempts so far (both count reconnects).
  std::uint64_t opens() const;
  std::uint64_t open_attempts() const;

  // Test hooks (libvirt's test driver never loses its connection):
  // the current connection counts as dead, as if virConnectIsAlive() had turned false;
  void simulate_connection_loss_for_test();
  // the next `calls` calls fail as if the connection dropped in the middle of the call, before
  // reaching libvirt (each call, and each retry, uses one).
  void fail_next_calls_for_test(int calls);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace power
