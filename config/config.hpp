// config/config.hpp: the config file (TOML) -> a validated Config.
//
// Every key is documented in config/brokerd.example.toml and docs/configuration.md. Loading
// either yields a complete, validated Config or a list of errors "file:line: key: what is wrong";
// never a partial Config. Relative paths in the file resolve against the file's directory.
#pragma once

#include "common/log.hpp"
#include "common/model.hpp"

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace config {

struct Listener {
  std::string address = "127.0.0.1";
  std::uint16_t port = 0;
  std::string tls_cert_file;  // absolute after loading; both set or both empty
  std::string tls_key_file;
  // Absolute after loading; set: clients must present a certificate signed by one of these CAs
  // (mutual TLS). Only on the agent listener, and only with tls_cert_file and tls_key_file.
  std::string tls_client_ca_file;
  std::size_t header_limit_bytes = 16 * 1024;
  std::size_t body_limit_bytes = 1024 * 1024;
  int read_timeout_seconds = 30;
  int idle_timeout_seconds = 60;
  // Connection caps (docs/configuration.md "Connection limits"); brokerd lowers them to fit the
  // descriptor limit. Defaults per listener: see Config.
  int first_request_timeout_seconds = 10;  // accept (TLS handshake included) to the first request header
  std::size_t max_connections = 10000;
  std::size_t max_connections_per_address = 1000;
};

struct AdminToken {
  std::string name;    // shown in the audit log as "token:<name>"
  std::string sha256;  // lower-case hex SHA-256 of the token (brokerd --hash-token)
};

// [sta]: the Secure Ticket Authority on the XML listener (POST /scripts/ctxsta.dll).
struct Sta {
  bool enabled = true;
  std::string authority_id;  // empty: derived from the site key ("STA" + 12 hex digits)
  int ticket_lifetime_seconds = 100;
  // IP addresses, CIDR ranges and the words "any", "loopback" and "trusted_front_ends" (the
  // site's); never empty (the file cannot say []).
  std::vector<std::string> allowed_clients = {"trusted_front_ends", "loopback"};
  int max_tickets = 100000;
  std::int64_t max_bytes = 128 * 1024 * 1024;  // TicketData bytes held in all
  int max_tickets_per_client = 10000;
  std::int64_t max_bytes_per_client = 16 * 1024 * 1024;
};

// [identity]: password checks (docs/nfuse.md "Password checks under load").
struct Identity {
  int password_check_threads = 0;  // hashes at once; 0: the number of cores
  int password_check_queue = 128;  // checks waiting for a thread; beyond: service-unavailable
  int password_check_max_wait_ms = 2000;
};

// [directory]: where users and groups come from (docs/directory.md). The LDAP keys are read only
// for backend "ldap"; filters, group_lookup and attribute names left out take the profile's
// defaults (identity::ldap_profile), so they are optional here.
struct Directory {
  std::string backend = "builtin";  // "builtin" | "ldap"
  std::string profile = "ad";       // "ad" | "openldap"
  std::vector<std::string> servers;  // ldap:// or ldaps:// URIs, tried in order
  bool start_tls = true;             // for ldap:// servers
  std::string ca_file;               // absolute after loading; empty: the system's trust store
  bool verify_certificates = true;
  std::string bind_dn;
  std::string bind_password_file;  // absolute after loading; the password is its first line
  std::string base_dn;
  std::string domain;  // NetBIOS domain name of the directory's users and groups ("CORP")
  std::optional<std::string> user_filter, group_filter;
  std::optional<std::string> group_lookup;  // "member_of" | "member" | "in_chain" | "token_groups"
  // [directory.attributes]: account_name, upn, sid, member_of, member, group_name, display_name,
  // mail, user_account_control, pwd_last_set, account_expires, lockout_time -> attribute name
  // ("" switches a state attribute off).
  std::vector<std::pair<std::string, std::string>> attributes;
  int network_timeout_ms = 5000;
  int operation_timeout_ms = 10000;
  int pool_size = 4;
  int cache_seconds = 300;
  int lockout_duration_seconds = 1800;
  int reconnect_max_seconds = 30;
};

// [xml]: the NFuse XML service (the listener itself is [listeners.xml]).
struct XmlService {
  int failed_logons_per_minute = 30;  // per source address; 0: no throttling
};

struct Config {
  std::string path;  // absolute path of the file
  Listener xml{.address = "127.0.0.1", .port = 8080};
  // 100,000 agents, and room for reconnects and handshakes; up to 10,000 agents behind one address
  // (NAT, or a host simulating agents).
  Listener agent{
      .address = "127.0.0.1", .port = 8081, .max_connections = 110000, .max_connections_per_address = 10000};
  // Set aside for the admin port alone: the other listeners cannot take them.
  Listener admin{.address = "127.0.0.1", .port = 8082, .max_connections = 256, .max_connections_per_address = 64};
  std::string database_path;  // absolute, or ":memory:"
  int database_busy_timeout_ms = 5000;
  // A new database file (and its WAL) is created 0600; with a group, 0640 and owned by that group.
  std::string database_group;
  common::LogOptions log;
  int io_threads = 2;
  int worker_threads = 8;  // the work queue: storage and other blocking work
  int shutdown_grace_seconds = 10;
  std::vector<AdminToken> admin_tokens;
  // Admin-port paths served without a bearer token besides /healthz (e.g. "/metrics", "/readyz").
  std::vector<std::string> admin_unauthenticated_paths;
  Sta sta;
  Identity identity;
  XmlService xml_service;
  Directory directory;
  // The [site] table as the Kind::site object named "site" (owner "config:<path>"), if present.
  std::optional<common::model::Object> site;
  // Declared site objects in dependency order (all_kinds() order, then file order), each with
  // owner "config:<path>" and every field set (defaults filled in). Machine ranges are expanded;
  // the site object is in `site`, not here.
  std::vector<common::model::Object> objects;
};

struct ConfigError {
  std::string file;
  int line = 0;     // 0 when unknown (e.g. the file cannot be read)
  std::string key;  // dotted path, e.g. "machine[3].catalog" (the 3rd [[machine]], from 1) or
                    // "listeners.admin.port"; empty for syntax errors and unreadable files
  std::string message;
  // "file:line: key: message"; without ":line" when line is 0, without "key: " when key is empty.
  std::string describe() const;
};

struct LoadResult {
  std::optional<Config> config;     // set exactly when errors is empty
  std::vector<ConfigError> errors;  // in file order
};

LoadResult load_file(const std::string& path);
// For tests and fuzzing: `name` stands in for the file name in messages; relative paths resolve
// against `base_dir`.
LoadResult load_string(std::string_view text, const std::string& name, const std::string& base_dir = ".");

}  // namespace config
