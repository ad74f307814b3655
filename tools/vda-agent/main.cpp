// vda-agent: the reference desktop agent on the command line. Runs any number of simulated
// machines in one process (docs/cbp.md "The reference agent"); SIGINT or SIGTERM makes every
// machine say goodbye (AgentShutdown) before the process exits.
#include "common/log.hpp"
#include "tools/vda-agent/agent.hpp"
#include "tools/vda-agent/power_follower.hpp"

#include <spdlog/spdlog.h>

#include <csignal>
#include <ctime>
#include <iostream>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr const char* kUsage = R"(usage: vda-agent --broker URL MACHINES CREDENTIALS [OPTIONS]

Simulated desktop agents (VDAs): each machine keeps its own connection to the broker's agent
endpoint, registers, heartbeats and simulates its users (docs/cbp.md).

machines (any mix; every machine runs in this one process):
  --machine NAME               one machine (catalog and session support from the options below)
  --range PATTERN --count N    N machines, {n} in PATTERN runs 1..N ('DEMO\pool-{n}')
  --group PATTERN:N:CATALOG:SUPPORT
                               a range with its own catalog and session support
                               ('DEMO\rds-{n}:2:rds-hosts:MultiSession'); repeatable
  --catalog NAME               catalog of --machine/--range machines (to enroll in)
  --session-support S          SingleSession (default) or MultiSession, for --machine/--range
credentials:
  --enroll-key KEY             the catalogs' enrollment key: machines without a secret enroll
  --secret SECRET              the machine secret (from brokerctl machine secret)
  --secrets-file FILE          JSON file keeping the secrets machines got by enrolling (read at
                               start, rewritten atomically)
options:
  --broker URL                 ws://host:8081/cbp or wss://... (required)
  --ca-file FILE               verify a wss:// broker's certificate and name against this CA
                               (required for wss://, unless --insecure)
  --insecure                   wss:// without --ca-file: no certificate check (ticket
                               credentials and secrets may go to whoever answers; labs only)
  --client-cert FILE           wss://: present this certificate (PEM chain) to a broker that
                               requires client certificates (mutual TLS); needs --client-key
  --client-key FILE            the private key (PEM) of --client-cert
  --address-base IP            address of the first machine, +1 for each next one (10.99.0.1)
  --port PORT                  the port in the machines' addresses (1494)
  --os TEXT                    the OS the machines report
  --max-sessions N             multi-session hosts: sessions that make the load index full (20)
  --client-delay SECONDS|never after prepare_session, the simulated client connects (2)
  --start-spread SECONDS       spread the first connections over this many seconds (0)
  --threads N                  I/O threads for all machines (2)
  --power-state-file FILE      follow a simulated hypervisor: a machine runs while this file
                               (written by brokerd's simulated power driver) says its VM is On,
                               and says goodbye when it goes Off or Suspended
  --log-level LEVEL            trace, debug, info, warn, error (info)
  --version, --help
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Group {
  std::string pattern;
  int count = 1;  // 0: a single name without {n}
  std::string catalog;
  cbp::SessionSupport support = cbp::SessionSupport::single_session;
  bool own_settings = false;  // --group: catalog and support given with it
};

cbp::SessionSupport parse_support(const std::string& s) {
  auto v = cbp::from_string<cbp::SessionSupport>(s);
  if (!v) throw UsageError("session support must be SingleSession or MultiSession, not '" + s + "'");
  return *v;
}

int parse_int(const std::string& s, const char* what, int lo, int hi) {
  try {
    std::size_t used = 0;
    const int v = std::stoi(s, &used);
    if (used == s.size() && v >= lo && v <= hi) return v;
  } catch (const std::exception&) {
  }
  throw UsageError(std::string(what) + " must be an integer " + std::to_string(lo) + ".." + std::to_string(hi));
}

// PATTERN:N:CATALOG:SUPPORT, split from the right (the pattern may hold ':').
Group parse_group(const std::string& spec) {
  std::vector<std::string> parts;
  std::string rest = spec;
  for (int i = 0; i < 3; ++i) {
    const auto colon = rest.rfind(':');
    if (colon == std::string::npos) throw UsageError("--group needs PATTERN:N:CATALOG:SUPPORT, not '" + spec + "'");
    parts.insert(parts.begin(), rest.substr(colon + 1));
    rest.resize(colon);
  }
  Group g;
  g.pattern = rest;
  g.count = parse_int(parts[0], "--group count", 1, 1000000);
  g.catalog = parts[1];
  g.support = parse_support(parts[2]);
  g.own_settings = true;
  return g;
}

std::string expand(const std::string& pattern, int n) {
  std::string out = pattern;
  for (auto pos = out.find("{n}"); pos != std::string::npos; pos = out.find("{n}", pos))
    out.replace(pos, 3, std::to_string(n));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  vda::FleetOptions fo;
  std::vector<Group> groups;
  std::string catalog, enroll_key, secret, power_file, address_base = "10.99.0.1", os, log_level = "info";
  cbp::SessionSupport support = cbp::SessionSupport::single_session;
  int port = 1494, max_sessions = 20, pending_range = -1;
  bool have_broker = false;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      auto next = [&]() -> std::string {
        if (i + 1 >= argc) throw UsageError(arg + " needs a value");
        return argv[++i];
      };
      if (arg == "--help" || arg == "-h") {
        std::cout << kUsage;
        return 0;
      } else if (arg == "--version") {
        std::cout << vda::agent_version() << "\n";
        return 0;
      } else if (arg == "--broker") {
        fo.broker_url = next();
        have_broker = true;
      } else if (arg == "--machine") {
        groups.push_back({next(), 0, {}, {}, false});
      } else if (arg == "--range") {
        groups.push_back({next(), 1, {}, {}, false});
        pending_range = static_cast<int>(groups.size()) - 1;
      } else if (arg == "--count") {
        if (pending_range < 0) throw UsageError("--count follows --range");
        groups[static_cast<std::size_t>(pending_range)].count = parse_int(next(), "--count", 1, 1000000);
        pending_range = -1;
      } else if (arg == "--group") {
        groups.push_back(parse_group(next()));
      } else if (arg == "--catalog") {
        catalog = next();
      } else if (arg == "--session-support") {
        support = parse_support(next());
      } else if (arg == "--enroll-key") {
        enroll_key = next();
      } else if (arg == "--secret") {
        secret = next();
      } else if (arg == "--secrets-file") {
        fo.secrets_file = next();
      } else if (arg == "--power-state-file") {
        power_file = next();
      } else if (arg == "--ca-file") {
        fo.ca_file = next();
      } else if (arg == "--insecure") {
        fo.insecure = true;
      } else if (arg == "--client-cert") {
        fo.client_cert_file = next();
      } else if (arg == "--client-key") {
        fo.client_key_file = next();
      } else if (arg == "--address-base") {
        address_base = next();
      } else if (arg == "--port") {
        port = parse_int(next(), "--port", 1, 65535);
      } else if (arg == "--os") {
        os = next();
      } else if (arg == "--max-sessions") {
        max_sessions = parse_int(next(), "--max-sessions", 1, 10000);
      } else if (arg == "--client-delay") {
        const auto v = next();
        if (v == "never")
          fo.client_connect_delay.reset();
        else
          fo.client_connect_delay = std::chrono::seconds(parse_int(v, "--client-delay", 0, 86400));
      } else if (arg == "--start-spread") {
        fo.start_spread = std::chrono::seconds(parse_int(next(), "--start-spread", 0, 3600));
      } else if (arg == "--threads") {
        fo.threads = parse_int(next(), "--threads", 1, 64);
      } else if (arg == "--log-level") {
        log_level = next();
        if (!common::valid_log_level(log_level)) throw UsageError("unknown log level '" + log_level + "'");
      } else {
        throw UsageError("unknown argument '" + arg + "'");
      }
    }
    if (!have_broker) throw UsageError("--broker URL is required");
    if (groups.empty()) throw UsageError("no machines: give --machine, --range or --group");
    if (fo.client_cert_file.empty() != fo.client_key_file.empty())
      throw UsageError("--client-cert and --client-key go together");
    if (!fo.client_cert_file.empty() && !fo.broker_url.starts_with("wss://"))
      throw UsageError("--client-cert needs a wss:// broker URL");
    if (fo.broker_url.starts_with("wss://") && fo.ca_file.empty() && !fo.insecure)
      throw UsageError("a wss:// broker needs --ca-file FILE (the CA that signed its certificate), "
                       "or --insecure (no certificate check)");
    if (enroll_key.empty() && secret.empty() && fo.secrets_file.empty())
      throw UsageError("no credentials: give --enroll-key, --secret or --secrets-file");
    for (const auto& g : groups)
      if (!g.own_settings && catalog.empty() && secret.empty() && !enroll_key.empty())
        throw UsageError("--enroll-key needs --catalog for --machine and --range machines");
  } catch (const UsageError& e) {
    std::cerr << "vda-agent: " << e.what() << "\n" << kUsage;
    return 2;
  }

  // SIGINT and SIGTERM are taken by sigtimedwait below: blocked in every thread (the pool's
  // threads inherit this mask), with their default action restored in case the parent ignored
  // them (background jobs of a shell do).
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  try {
    common::LogOptions lo;
    lo.level = log_level;
    fo.logger = common::make_logger(lo, "vda-agent");
    auto log = fo.logger;
    vda::Fleet fleet(fo);
    std::set<std::string> names;
    std::uint32_t index = 0;
    for (const auto& g : groups) {
      for (int n = 1; n <= std::max(1, g.count); ++n) {
        vda::MachineConfig mc;
        mc.name = g.count == 0 ? g.pattern : expand(g.pattern, n);
        if (!names.insert(mc.name).second) throw UsageError("machine '" + mc.name + "' is given twice");
        mc.catalog = g.own_settings ? g.catalog : catalog;
        mc.session_support = g.own_settings ? g.support : support;
        mc.secret = secret;
        mc.enroll_key = enroll_key;
        const auto host = vda::nth_address(address_base, index++);
        if (host.empty()) throw UsageError("--address-base must be an IPv4 address with room for every machine");
        mc.address = host + ":" + std::to_string(port);
        mc.os = os;
        mc.max_sessions = max_sessions;
        fleet.add(std::move(mc));
      }
    }
    log->info("{} starting {} machines against {}", vda::agent_version(), names.size(), fo.broker_url);
    std::unique_ptr<vda::PowerFollower> follower;
    if (power_file.empty()) {
      fleet.start();
    } else {
      log->info("machines follow the power states in {}", power_file);
      follower = std::make_unique<vda::PowerFollower>(fleet, power_file);
      follower->start();
    }

    int received = 0;
    for (;;) {
      const timespec tick{1, 0};
      const int sig = sigtimedwait(&signals, nullptr, &tick);
      if (sig == SIGINT || sig == SIGTERM) {
        received = sig;
        break;
      }
      bool any_running = false;
      for (const auto& m : fleet.machines())
        if (m.status().running) {
          any_running = true;
          break;
        }
      if (!any_running && !follower) {  // with a power file, every VM may just be off
        log->error("every machine has stopped (see the errors above); exiting");
        return 1;
      }
    }
    log->info("{}: saying goodbye (AgentShutdown) from {} machines", received == SIGINT ? "SIGINT" : "SIGTERM",
              names.size());
    const auto left = fleet.stop(cbp::Reason::agent_shutdown, std::chrono::seconds(10));
    if (left > 0) log->warn("{} connections did not close in time", left);
    log->info("stopped");
    log->flush();
    return 0;
  } catch (const UsageError& e) {
    std::cerr << "vda-agent: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "vda-agent: " << e.what() << "\n";
    return 1;
  }
}
