// brokerd: the openbroker daemon. Composition root: reads the config, opens storage, reconciles
// the declared site, binds the three listeners (XML service, agent endpoint, admin), serves until
// SIGTERM/SIGINT, then shuts down gracefully.
#include "admin/admin_api.hpp"
#include "broker/agent_registry.hpp"
#include "broker/engine.hpp"
#include "broker/launcher.hpp"
#include "broker/power_manager.hpp"
#include "broker/site_objects.hpp"
#include "cbp/agent_channel.hpp"
#include "cbp/endpoint.hpp"
#include "common/crypto.hpp"
#include "common/log.hpp"
#include "common/metrics.hpp"
#include "common/timers.hpp"
#include "common/version.hpp"
#include "common/work_queue.hpp"
#include "config/config.hpp"
#include "identity/builtin_directory.hpp"
#include "identity/ldap_directory.hpp"
#include "net/server.hpp"
#include "storage/repository.hpp"
#include "xmlservice/sta_service.hpp"
#include "xmlservice/xml_service.hpp"

#include <spdlog/spdlog.h>

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr const char* kUsage = R"(usage:
  brokerd --config FILE [--ready-file PATH]   run the broker
  brokerd --check-config FILE                  validate a config file and exit (0: valid)
  brokerd --hash-token [TOKEN]                 print the sha256 to put in [[admin.token]] (reads stdin if no TOKEN)
  brokerd --new-token                          make a random admin token and print it with its sha256
  brokerd --hash-password                      read a password from stdin, print a password_hash for [[user]]
  brokerd --version
)";

int usage_error(const std::string& msg) {
  std::cerr << "brokerd: " << msg << "\n" << kUsage;
  return 2;
}

std::string read_secret_line() {
  std::string line;
  std::getline(std::cin, line);
  if (!line.empty() && line.back() == '\r') line.pop_back();
  return line;
}

net::ListenerOptions listener_options(const std::string& name, const config::Listener& l) {
  net::ListenerOptions o;
  o.name = name;
  o.address = l.address;
  o.port = l.port;
  o.tls_cert_file = l.tls_cert_file;
  o.tls_key_file = l.tls_key_file;
  o.tls_client_ca_file = l.tls_client_ca_file;
  o.header_limit = l.header_limit_bytes;
  o.body_limit = l.body_limit_bytes;
  o.read_timeout = std::chrono::seconds(l.read_timeout_seconds);
  o.idle_timeout = std::chrono::seconds(l.idle_timeout_seconds);
  o.first_request_timeout = std::chrono::seconds(l.first_request_timeout_seconds);
  o.max_connections = l.max_connections;
  o.max_connections_per_address = l.max_connections_per_address;
  return o;
}

// Connection caps (docs/configuration.md "Connection limits"). Descriptors kept out of the
// connection budget for the database (and its WAL), logs, listening sockets, the I/O machinery
// and outgoing connections (hypervisors).
constexpr std::size_t kReservedDescriptors = 256;
// Agents over the agent listener's cap: this many more connections are accepted so that they
// hear `rejected BrokerRegistrationLimitReached` (docs/cbp.md) instead of a closed socket.
constexpr std::size_t kAgentOverLimitConnections = 64;

// Raises RLIMIT_NOFILE to the hard limit, fits the listeners' caps into it (logging what was
// lowered) and returns the shared connection limit of the xml and agent listeners.
std::size_t size_connection_caps(spdlog::logger& log, net::ListenerOptions& xml, net::ListenerOptions& agent,
                                 net::ListenerOptions& admin) {
  const net::DescriptorLimit fds = net::raise_descriptor_limit();
  const auto text = [](std::size_t n) {
    return n == std::numeric_limits<std::size_t>::max() ? std::string("unlimited") : std::to_string(n);
  };
  if (!fds.error.empty())
    log.warn("file descriptors: cannot raise the limit from {} to the hard limit {}: {}", text(fds.before),
             text(fds.hard), fds.error);
  else
    log.info("file descriptors: limit {} (was {}, hard limit {})", text(fds.soft), text(fds.before), text(fds.hard));
  agent.over_limit_connections = kAgentOverLimitConnections;
  admin.reserved = true;
  const net::ConnectionBudget budget = net::fit_connection_caps(fds.soft, kReservedDescriptors, {&xml, &agent, &admin});
  for (const auto& a : budget.adjustments) log.warn("{}", a);
  log.info(
      "connection caps: xml {} ({} per address), agent {} ({} per address, {} more to refuse), admin {} ({} per "
      "address, reserved); xml and agent together {}, {} descriptors kept in reserve",
      xml.max_connections, xml.max_connections_per_address, agent.max_connections, agent.max_connections_per_address,
      agent.over_limit_connections, admin.max_connections, admin.max_connections_per_address, budget.shared_limit,
      budget.reserve);
  return budget.shared_limit;
}

// Plain HTTP requests on the agent listener (agents speak WebSocket on /cbp).
net::HttpHandler not_implemented(std::string what) {
  return [what](net::HttpRequest&&, net::Responder respond) {
    net::HttpResponse r;
    r.status = 501;
    r.body = what + " is not implemented in this version of brokerd\n";
    r.route = "not_implemented";
    respond(std::move(r));
  };
}

bool write_ready_file(const std::string& path, const net::Server& server) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!out) return false;
    out << "{\"pid\":" << ::getpid() << ",\"xml\":" << server.port("xml") << ",\"agent\":" << server.port("agent")
        << ",\"admin\":" << server.port("admin") << "}\n";
    if (!out.flush()) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

// The LDAP directory's options from [directory] (docs/directory.md): the profile's defaults,
// then what the file says; the service account's password from its file (first line).
common::Result<identity::LdapDirectoryOptions> ldap_options(const config::Directory& d) {
  auto o = identity::ldap_profile(d.profile);
  if (!o) return common::Error(common::errc::invalid_argument, "unknown directory profile " + d.profile);
  o->servers = d.servers;
  o->start_tls = d.start_tls;
  o->ca_file = d.ca_file;
  o->verify_certificates = d.verify_certificates;
  o->bind_dn = d.bind_dn;
  if (!d.bind_password_file.empty()) {
    std::ifstream in(d.bind_password_file);
    if (!in || !std::getline(in, o->bind_password))
      return common::Error(common::errc::invalid_argument, "cannot read " + d.bind_password_file);
    if (!o->bind_password.empty() && o->bind_password.back() == '\r') o->bind_password.pop_back();
  }
  o->base_dn = d.base_dn;
  o->domain = d.domain;
  if (d.user_filter) o->user_filter = *d.user_filter;
  if (d.group_filter) o->group_filter = *d.group_filter;
  if (d.group_lookup) {
    const auto lookup = identity::group_lookup_from_string(*d.group_lookup);
    if (!lookup) return common::Error(common::errc::invalid_argument, "unknown group_lookup " + *d.group_lookup);
    o->group_lookup = *lookup;
  }
  auto& a = o->attributes;
  for (const auto& [key, value] : d.attributes) {
    std::string* target = key == "account_name"           ? &a.account_name
                          : key == "upn"                  ? &a.upn
                          : key == "sid"                  ? &a.sid
                          : key == "member_of"            ? &a.member_of
                          : key == "member"               ? &a.member
                          : key == "group_name"           ? &a.group_name
                          : key == "display_name"         ? &a.display_name
                          : key == "mail"                 ? &a.mail
                          : key == "user_account_control" ? &a.user_account_control
                          : key == "pwd_last_set"         ? &a.pwd_last_set
                          : key == "account_expires"      ? &a.account_expires
                          : key == "lockout_time"         ? &a.lockout_time
                                                          : nullptr;
    if (target) *target = value;
  }
  o->network_timeout = std::chrono::milliseconds(d.network_timeout_ms);
  o->operation_timeout = std::chrono::milliseconds(d.operation_timeout_ms);
  o->pool_size = static_cast<std::size_t>(d.pool_size);
  o->cache_ttl = std::chrono::seconds(d.cache_seconds);
  o->lockout_duration = std::chrono::seconds(d.lockout_duration_seconds);
  o->reconnect_max = std::chrono::seconds(d.reconnect_max_seconds);
  return std::move(*o);
}

int check_config(const std::string& path) {
  auto loaded = config::load_file(path);
  for (const auto& e : loaded.errors) std::cerr << e.describe() << "\n";
  if (!loaded.config) {
    std::cerr << path << ": " << loaded.errors.size() << " error(s)\n";
    return 1;
  }
  std::cout << path << ": ok (" << loaded.config->objects.size() << " site objects, "
            << loaded.config->admin_tokens.size() << " admin tokens)\n";
  return 0;
}

int run(const std::string& config_path, const std::string& ready_file) {
  auto loaded = config::load_file(config_path);
  if (!loaded.config) {
    for (const auto& e : loaded.errors) std::cerr << e.describe() << "\n";
    std::cerr << "brokerd: not started: " << config_path << " has " << loaded.errors.size() << " error(s)\n";
    return 1;
  }
  const config::Config& cfg = *loaded.config;

  std::shared_ptr<spdlog::logger> log;
  try {
    log = common::make_logger(cfg.log);
  } catch (const std::exception& e) {
    std::cerr << "brokerd: cannot open the log: " << e.what() << "\n";
    return 1;
  }
  log->info("brokerd {} starting with {}", common::kVersion, cfg.path);

  common::Metrics metrics;
  storage::SqliteOptions sopts;
  sopts.path = cfg.database_path;
  sopts.busy_timeout_ms = cfg.database_busy_timeout_ms;
  sopts.file_group = cfg.database_group;
  sopts.metrics = &metrics;
  auto repo = storage::open_sqlite(sopts);
  if (!repo) {
    log->critical("not started: {}", repo.error().describe());
    return 1;
  }
  storage::Repository& repository = **repo;
  // The site in memory (docs/architecture.md "The engine"): loaded once the config file is
  // reconciled (below), then kept in step by storage's commit observer. Declared before
  // everything that writes, so it outlives their last commit.
  broker::Engine engine;
  log->info("database {} (schema version {})", cfg.database_path, repository.schema().version);

  broker::SiteObjects site(repository, log);
  common::WorkQueue work(cfg.worker_threads);

  common::SystemClock clock;
  // Password hashes run on a bounded pool of their own ([identity]; docs/nfuse.md "Password
  // checks under load"), so a flood of wrong passwords cannot hold the work queue; the rest of a
  // check goes on on the work queue.
  identity::PasswordCheckOptions pcopts;
  pcopts.threads = cfg.identity.password_check_threads;
  pcopts.max_queued = static_cast<std::size_t>(cfg.identity.password_check_queue);
  pcopts.max_wait = std::chrono::milliseconds(cfg.identity.password_check_max_wait_ms);
  identity::PasswordCheckPool password_checks(pcopts, &metrics);
  log->info("password checks: {} at once, up to {} waiting for at most {} ms", password_checks.threads(),
            pcopts.max_queued, pcopts.max_wait.count());
  identity::BuiltinDirectoryOptions dopts;
  dopts.password_checks = &password_checks;
  dopts.resume = [&work](std::function<void()> task) { return work.post(std::move(task)); };
  identity::BuiltinDirectory builtin_directory(repository, clock, dopts);
  // [directory] backend = "ldap": users and groups from LDAP / Active Directory instead.
  std::unique_ptr<identity::LdapDirectory> ldap_directory;
  if (cfg.directory.backend == "ldap") {
    auto lo = ldap_options(cfg.directory);
    if (!lo) {
      log->critical("not started: [directory]: {}", lo.error().describe());
      repository.close();
      return 1;
    }
    lo->log = log;
    lo->metrics = &metrics;
    // The site's credential_cache_seconds, from the engine's current view (set once the site
    // is loaded, below; until then the default).
    lo->credential_cache_seconds = [&engine]() -> std::int64_t {
      auto view = engine.view();
      return view ? view->settings_object.integer("credential_cache_seconds", 60) : 60;
    };
    for (const auto& uri : lo->servers)
      if (!lo->start_tls && uri.rfind("ldap://", 0) == 0)
        log->warn("directory: {} without StartTLS: passwords cross the network in clear text", uri);
    if (!lo->verify_certificates) log->warn("directory: the LDAP servers' certificates are not checked");
    ldap_directory = std::make_unique<identity::LdapDirectory>(std::move(*lo), clock);
  }
  identity::Directory& directory =
      ldap_directory ? static_cast<identity::Directory&>(*ldap_directory) : builtin_directory;
  broker::AgentRegistry agents(repository, engine, clock, log, cbp::kMaxAuthFailures, cbp::kAuthBackoff);
  // The network server: its io_context also runs the broker's timers (launch waits, the agent
  // endpoint's deadline checks, housekeeping). Declared before everything that arms them.
  net::Server server(cfg.io_threads, log, &metrics);
  cbp::EndpointOptions eopts;
  eopts.scheduler = &server.scheduler();
  {
    // The config file's [site] wins (it is reconciled below); else what the database holds.
    auto stored = site.site();
    const common::model::Object* settings = cfg.site ? &*cfg.site : (stored ? &*stored : nullptr);
    if (settings) {
      eopts.heartbeat_interval = std::chrono::seconds(settings->integer("heartbeat_interval_seconds", 60));
      eopts.missed_heartbeats = static_cast<int>(settings->integer("missed_heartbeats", 3));
    }
  }
  cbp::AgentEndpoint agent_endpoint(agents, work, eopts, log, &metrics);
  site.on_machine_removed(
      [&agent_endpoint](const std::string& machine) { agent_endpoint.disconnect(machine, cbp::Reason::desktop_removed); });

  // The site key seals the credentials in logon tickets at rest: <database>.key, beside the
  // database (created on first start, mode 0600). An in-memory database gets a key per run.
  std::string site_key = common::crypto::new_site_key();
  if (cfg.database_path != ":memory:") {
    auto key = common::crypto::load_or_create_key_file(cfg.database_path + ".key");
    if (!key) {
      log->critical("not started: {}", key.error().describe());
      repository.close();
      return 1;
    }
    site_key = *key;
  }
  agents.set_credential_key(site_key);
  cbp::EndpointChannel agent_channel(agent_endpoint);
  broker::LauncherOptions lopts;
  lopts.credential_key = site_key;
  lopts.scheduler = &server.scheduler();
  broker::Launcher launcher(repository, engine, clock, agent_channel, work, log, lopts);
  // A launch's pending session the agent does not report at registration is ended once no launch
  // can still be preparing it.
  agents.set_preparation_grace(
      std::chrono::duration_cast<std::chrono::seconds>(lopts.prepare_timeout) + std::chrono::seconds(5));
  // Power management (docs/power.md): started once the config's connections and machines are in.
  broker::PowerManagerOptions popts;
  popts.base_dir = std::filesystem::path(cfg.path).parent_path().string();
  if (popts.base_dir.empty()) popts.base_dir = ".";
  broker::PowerManager power(repository, clock, log, popts);
  power.set_engine(&engine);  // registrations and sessions are live: the pool policy reads them there
  launcher.set_power(&power);
  power.set_held_machines([&launcher] { return launcher.held_machines(); });
  // A launch waiting for a machine it powered on goes on once the machine's agent registers.
  agent_endpoint.on_registered([&launcher](const std::string& machine) { launcher.machine_registered(machine); });
  power.on_action([&launcher](const broker::PowerAction& a) {
    if (a.action == power::Action::turn_on &&
        (a.state == power::ActionState::failed || a.state == power::ActionState::lost))
      launcher.machine_power_failed(a.vm.machine);
  });
  admin::AdminOptions aopts;
  for (const auto& t : cfg.admin_tokens) aopts.tokens.push_back({t.name, t.sha256});
  aopts.unauthenticated_paths = cfg.admin_unauthenticated_paths;
  admin::AdminApi admin_api(site, repository, work, metrics, aopts, log, &launcher);
  admin_api.set_power_manager(&power);
  admin_api.set_engine(&engine);
  {
    admin::DirectoryAccess da;
    da.backend = cfg.directory.backend;
    da.directory = &directory;
    if (ldap_directory)
      da.status = [&ldap_directory] {
        const auto s = ldap_directory->state();
        return admin::DirectoryStatus{s.reachable, s.server, s.last_error, s.failures, s.cached_identities};
      };
    admin_api.set_directory(std::move(da));
  }
  xmlservice::XmlServiceOptions xopts;
  xopts.failed_logons_per_minute = cfg.xml_service.failed_logons_per_minute;
  xopts.clock = &clock;
  xmlservice::XmlService xml_service(directory, engine, work, metrics, log, &launcher, xopts);
  // The Secure Ticket Authority ([sta]) on the XML listener: POST /scripts/ctxsta.dll.
  std::unique_ptr<xmlservice::StaService> sta;
  if (cfg.sta.enabled) {
    xmlservice::StaOptions so;
    so.authority_id = cfg.sta.authority_id.empty() ? xmlservice::default_authority_id(site_key) : cfg.sta.authority_id;
    so.ticket_lifetime = std::chrono::seconds(cfg.sta.ticket_lifetime_seconds);
    so.allowed_clients = cfg.sta.allowed_clients;
    // Read at each request that needs it (on the work queue), so admin changes apply at once.
    so.trusted_front_ends = [&site, &log]() -> std::optional<std::vector<std::string>> {
      auto settings = site.site();
      if (!settings) {
        log->error("sta: cannot read the site settings: {}", settings.error().describe());
        return std::nullopt;
      }
      return settings->list("trusted_front_ends");
    };
    so.max_tickets = static_cast<std::size_t>(cfg.sta.max_tickets);
    so.max_total_bytes = static_cast<std::size_t>(cfg.sta.max_bytes);
    so.max_tickets_per_client = static_cast<std::size_t>(cfg.sta.max_tickets_per_client);
    so.max_bytes_per_client = static_cast<std::size_t>(cfg.sta.max_bytes_per_client);
    sta = std::make_unique<xmlservice::StaService>(std::move(so), clock, metrics, log, &work);
  }

  auto xml_listener = listener_options("xml", cfg.xml);
  auto agent_listener = listener_options("agent", cfg.agent);
  auto admin_listener = listener_options("admin", cfg.admin);
  server.set_shared_connection_limit(size_connection_caps(*log, xml_listener, agent_listener, admin_listener));
  try {
    server.add_listener(xml_listener, [&xml_service, &sta](net::HttpRequest&& req, net::Responder respond) {
      if (sta && xmlservice::StaService::serves(req.path)) return sta->handle(std::move(req), std::move(respond));
      xml_service.handle(std::move(req), std::move(respond));
    });
    server.add_listener(agent_listener, not_implemented("plain HTTP on the agent endpoint"), agent_endpoint.handler());
    server.add_listener(admin_listener, [&admin_api](net::HttpRequest&& req, net::Responder respond) {
      admin_api.handle(std::move(req), std::move(respond));
    });
  } catch (const std::exception& e) {
    log->critical("not started: {}", e.what());
    repository.close();
    return 1;
  }

  auto report = site.reconcile(cfg.path, cfg.site, cfg.objects);
  if (!report) {
    log->critical("not started: cannot apply {}: {}", cfg.path, report.error().describe());
    repository.close();
    return 1;
  }
  if (auto site_obj = site.site(); !site_obj) {
    log->critical("not started: {}", site_obj.error().describe());
    repository.close();
    return 1;
  }
  if (auto reset = site.reset_registrations(); !reset) {
    log->critical("not started: {}", reset.error().describe());
    repository.close();
    return 1;
  } else if (*reset > 0) {
    log->info("{} machines marked Unregistered until their agents register again", *reset);
  }
  if (auto st = engine.attach(repository); !st) {
    log->critical("not started: cannot load the site: {}", st.error().describe());
    repository.close();
    return 1;
  } else {
    const auto stats = engine.stats();
    log->info("site loaded: {} machines, {} live sessions, {} assignments, {} delivery groups", stats.machines,
              stats.live_sessions, stats.assignments, stats.groups);
  }
  if (auto st = power.start(); !st) {
    log->critical("not started: power management: {}", st.error().describe());
    repository.close();
    return 1;
  }
  if (ldap_directory) {
    // Not fatal: the broker starts without its directory and keeps retrying (docs/directory.md).
    if (auto st = ldap_directory->check(); !st)
      log->error("directory: not reachable at start: {}", st.error().describe());
    else
      log->info("directory: LDAP via {} (base {}, domain {})", ldap_directory->state().server, cfg.directory.base_dn,
                cfg.directory.domain);
  }

  server.start();
  admin_api.set_listeners_ready({"xml", "agent", "admin"});
  log->info("ready: xml {}:{}, agent {}:{}, admin {}:{}", cfg.xml.address, server.port("xml"), cfg.agent.address,
            server.port("agent"), cfg.admin.address, server.port("admin"));
  if (!ready_file.empty() && !write_ready_file(ready_file, server))
    log->warn("cannot write the ready file {}", ready_file);

  // Housekeeping every 5 s on the server's timers (no thread of its own), its work on the work
  // queue: launches whose client never came, expired tickets, a reload after a rename; power
  // states every 30 s; the pool policy every minute.
  std::atomic<bool> housekeeping_on{true};
  std::function<void(int)> housekeeping = [&](int tick) {
    if (!housekeeping_on) return;
    work.post([&launcher, &log, &engine, &repository] {
      if (auto st = engine.reload_if_needed(repository); !st) log->error("housekeeping: {}", st.error().describe());
      if (auto st = launcher.sweep(); !st) log->error("housekeeping: {}", st.error().describe());
    });
    if (tick % 6 == 0 && ldap_directory)  // the directory's state (and reconnection), every 30 s
      work.post([&ldap_directory] { (void)ldap_directory->check(); });
    if (tick % 6 == 0)  // machines' power states, every 30 s
      work.post([&power, &log] {
        if (auto st = power.refresh(); !st) log->error("power: refresh: {}", st.error().describe());
      });
    if (tick % 12 == 0)  // the delivery groups' pool policy, every minute
      work.post([&power, &log] {
        if (auto n = power.reconcile_pools(); !n) log->error("power: pool policy: {}", n.error().describe());
      });
    server.scheduler().after(std::chrono::seconds(5), [&housekeeping, tick] { housekeeping(tick + 1); });
  };
  server.scheduler().after(std::chrono::seconds(5), [&housekeeping] { housekeeping(1); });

  server.wait_for_signal();
  housekeeping_on = false;
  log->info("stopping: finishing in-flight requests (up to {} s)", cfg.shutdown_grace_seconds);
  agent_endpoint.begin_shutdown();
  launcher.stop();  // launches waiting for a machine to boot answer while the server can still send
  server.stop(std::chrono::seconds(cfg.shutdown_grace_seconds));
  power.stop();  // pending power actions stay stored
  password_checks.stop();  // checks still queued answer service-unavailable; running ones finish
  work.stop();
  repository.close();
  log->info("stopped");
  log->flush();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_path, ready_file;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto next = [&](const char* what) -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(std::string(what) + " needs a value");
      return argv[++i];
    };
    try {
      if (arg == "--version") {
        std::cout << "brokerd " << common::kVersion << "\n";
        return 0;
      } else if (arg == "--help" || arg == "-h") {
        std::cout << kUsage;
        return 0;
      } else if (arg == "--check-config") {
        return check_config(next("--check-config"));
      } else if (arg == "--hash-token") {
        const std::string token = i + 1 < argc ? std::string(argv[++i]) : read_secret_line();
        if (token.empty()) return usage_error("empty token");
        std::cout << common::crypto::sha256_hex(token) << "\n";
        return 0;
      } else if (arg == "--new-token") {
        const std::string token = common::crypto::random_hex(24);
        std::cout << "token:  " << token << "\nsha256: " << common::crypto::sha256_hex(token) << "\n";
        return 0;
      } else if (arg == "--hash-password") {
        const std::string pw = read_secret_line();
        if (pw.empty()) return usage_error("empty password");
        std::cout << common::crypto::hash_password(pw) << "\n";
        return 0;
      } else if (arg == "--config" || arg == "-c") {
        config_path = next("--config");
      } else if (arg == "--ready-file") {
        ready_file = next("--ready-file");
      } else {
        return usage_error("unknown argument '" + arg + "'");
      }
    } catch (const std::invalid_argument& e) {
      return usage_error(e.what());
    }
  }
  if (config_path.empty()) return usage_error("--config FILE is required");
  try {
    return run(config_path, ready_file);
  } catch (const std::exception& e) {
    std::cerr << "brokerd: fatal: " << e.what() << "\n";
    return 1;
  }
}
