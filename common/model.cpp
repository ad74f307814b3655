#include "common/model.hpp"

#include <algorithm>
#include <charconv>
#include <limits>
#include <ostream>

namespace common::model {
namespace {

using enum FieldType;

FieldSpec text_field(std::string_view name, std::string_view help, bool required = false) {
  FieldSpec f;
  f.name = name;
  f.type = text;
  f.required = required;
  f.help = help;
  return f;
}
FieldSpec choice(std::string_view name, std::vector<std::string_view> choices, std::string_view def,
                 std::string_view help) {
  FieldSpec f;
  f.name = name;
  f.type = text;
  f.choices = std::move(choices);
  f.default_value = std::string(def);
  f.help = help;
  return f;
}
FieldSpec flag(std::string_view name, bool def, std::string_view help) {
  FieldSpec f;
  f.name = name;
  f.type = boolean;
  f.default_value = def;
  f.help = help;
  return f;
}
FieldSpec number(std::string_view name, std::int64_t def, std::int64_t lo, std::int64_t hi, std::string_view help) {
  FieldSpec f;
  f.name = name;
  f.type = integer;
  f.default_value = def;
  f.min = lo;
  f.max = hi;
  f.help = help;
  return f;
}
FieldSpec list(std::string_view name, std::string_view help, TextList def = {}) {
  FieldSpec f;
  f.name = name;
  f.type = text_list;
  f.default_value = std::move(def);
  f.help = help;
  return f;
}
FieldSpec ref(std::string_view name, Kind kind, bool required, std::string_view help) {
  FieldSpec f = text_field(name, help, required);
  f.references = kind;
  return f;
}
FieldSpec ref_list(std::string_view name, Kind kind, std::string_view help) {
  FieldSpec f = list(name, help);
  f.references = kind;
  return f;
}
FieldSpec state(FieldSpec f) {
  f.state = true;
  return f;
}
FieldSpec secret(FieldSpec f) {
  f.secret = true;
  return f;
}
FieldSpec operational(FieldSpec f) {
  f.operational = true;
  return f;
}
FieldSpec time_field(std::string_view name, std::string_view help) {
  FieldSpec f;
  f.name = name;
  f.type = timestamp;
  f.help = help;
  return f;
}

constexpr std::int64_t kDay = 86400;
const std::vector<std::string_view> kSessionSupport{"SingleSession", "MultiSession"};
const std::vector<std::string_view> kColorDepth{"FourBit", "EightBit", "SixteenBit", "TwentyFourBit"};
const std::vector<std::string_view> kDays{"Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                                          "Saturday", "Sunday",  "Weekdays",  "Weekend"};

std::vector<KindSpec> build_specs() {
  std::vector<KindSpec> kinds;

  kinds.push_back({Kind::site, "site", "site", "site", true, false, {
      text_field("site_name", "display name of the site"),
      flag("trust_xml_requests", false,
           "TrustRequestsSentToTheXmlServicePort: trust user names without passwords from trusted front ends"),
      list("trusted_front_ends", "addresses or CIDR ranges of front ends trusted when trust_xml_requests is on"),
      number("heartbeat_interval_seconds", 60, 5, kDay, "agent heartbeat interval set at registration"),
      number("missed_heartbeats", 3, 1, 100, "heartbeats missed before a machine is Unregistered (ContactLost)"),
      number("logon_ticket_ttl_seconds", 200, 10, kDay, "lifetime of one-time logon tickets"),
      number("launch_power_on_wait_seconds", 20, 0, 120,
             "how long a launch that powers a machine on waits for it to register before answering retry-required"),
      number("registration_wait_timeout_seconds", 180, 5, kDay,
             "how long a machine powered on may take to register before it is faulted (a launch's RegistrationTimeout)"),
      flag("dns_resolution_enabled", false, "hand out the agent's DNS name instead of its IP address"),
      text_field("default_domain", "NT domain assumed for users named without one"),
      number("lockout_threshold", 5, 0, 1000, "failed logons within lockout_window_seconds that lock a user out (0: never)"),
      number("lockout_window_seconds", 900, 1, kDay, "window in which failed logons are counted"),
      number("lockout_duration_seconds", 1800, 0, 365 * kDay, "how long a lock-out lasts (0: until an admin unlocks)"),
      number("credential_cache_seconds", 60, 0, 3600, "how long a successful password check is remembered (0: never)"),
      flag("expose_access_lists", false, "include AccessList (users and groups) in RequestAppData replies"),
  }});

  kinds.push_back({Kind::hypervisor_connection, "hypervisor_connection", "hypervisor-connections",
                   "hypervisor_connections", true, false, {
      [] { auto f = choice("driver", {"simulated", "libvirt"}, "simulated", "power driver"); f.required = true; return f; }(),
      text_field("uri", "libvirt connection URI, e.g. qemu:///system or test:///default; simulated: file:PATH where the VMs' power states are written for reference agents"),
      flag("enabled", true, "power actions run only on enabled connections"),
      number("max_absolute_active_actions", 100, 1, 100000, "throttle: power actions started at once"),
      number("max_percentage_active_actions", 20, 1, 100, "throttle: active actions as a percentage of machines"),
      number("max_new_actions_per_minute", 10, 1, 100000, "throttle: actions started per minute"),
      number("completed_action_retention_minutes", 60, 1, 10080, "finished power actions stay listed this long"),
      number("simulated_boot_delay_seconds", 20, 0, 3600, "simulated driver: seconds from TurnOn to On"),
      number("simulated_shutdown_delay_seconds", 10, 0, 3600, "simulated driver: seconds from Shutdown to Off"),
      number("simulated_failure_percent", 0, 0, 100, "simulated driver: percentage of power actions that fail (transiently, then retried)"),
      text_field("username", "libvirt: user name for URIs that ask for credentials (esx://, hyperv://, SASL)"),
      text_field("password_file", "libvirt: file whose first line is the password (relative to the config file; keep it mode 0600)"),
      text_field("description", "free text"),
  }});

  kinds.push_back({Kind::catalog, "catalog", "catalogs", "catalogs", true, false, {
      choice("allocation_type", {"Static", "Random"}, "Random", "Static (permanent) or Random"),
      choice("session_support", kSessionSupport, "SingleSession", "must match the agents' session support"),
      choice("provisioning_type", {"Manual", "MCS", "PVS"}, "Manual", "how machines were provisioned"),
      choice("persist_user_changes", {"OnLocal", "Discard", "OnPvd"}, "OnLocal", "what happens to user changes"),
      flag("machines_are_physical", false, "physical machines are not power managed"),
      ref("hypervisor_connection", Kind::hypervisor_connection, false, "connection that powers the machines"),
      secret(text_field("enrollment_key_hash", "sha256 hex of a key that lets new machines enroll on first contact")),
      text_field("description", "free text"),
  }});

  kinds.push_back({Kind::delivery_group, "delivery_group", "delivery-groups", "delivery_groups", true, false, {
      choice("desktop_kind", {"Private", "Shared"}, "Shared", "Private (assigned) or Shared (pooled)"),
      choice("delivery_type", {"DesktopsOnly", "AppsOnly", "DesktopsAndApps"}, "DesktopsOnly", "what the group delivers"),
      choice("session_support", kSessionSupport, "SingleSession", "single- or multi-session machines"),
      flag("enabled", true, "disabled groups are hidden from users"),
      operational(flag("in_maintenance_mode", false, "no connections or reconnections")),
      text_field("published_name", "name shown to users (default: name)"),
      text_field("description", "free text"),
      [] { auto f = text_field("time_zone", "IANA time zone for power schemes"); f.default_value = std::string("UTC"); return f; }(),
      choice("color_depth", kColorDepth, "TwentyFourBit", "session colour depth"),
      flag("secure_ica_required", false, "require encrypted sessions"),
      number("peak_buffer_size_percent", 0, 0, 100, "idle machines kept powered on in peak hours (%)"),
      number("off_peak_buffer_size_percent", 0, 0, 100, "idle machines kept powered on off peak (%)"),
      flag("automatic_power_on_for_assigned", true, "power on assigned machines when their user launches"),
      flag("automatic_power_on_for_assigned_during_peak", false, "during peak, also power on assigned machines found off (they all start when peak begins)"),
      flag("shutdown_desktops_after_use", false, "power off single-session machines after logoff"),
      number("settlement_period_before_use_seconds", 0, 0, kDay, "idle time after registration before use"),
      number("settlement_period_before_auto_shutdown_seconds", 0, 0, kDay, "delay before automatic shutdown"),
  }});

  // Hours are the group's time_zone wall-clock hours; per-hour lists have 24 elements, 00:00 first.
  kinds.push_back({Kind::power_time_scheme, "power_time_scheme", "power-time-schemes", "power_time_schemes", true,
                   false, {
      ref("delivery_group", Kind::delivery_group, true, "the group the scheme is for"),
      [] { auto f = list("days_of_week", "days the scheme applies to: Monday .. Sunday, Weekdays, Weekend");
           f.default_value = std::monostate{}; f.required = true; f.choices = kDays; f.min_items = 1; f.max_items = 9;
           return f; }(),
      [] { auto f = list("peak_hours", "24 values, \"true\" or \"false\": peak hours (element 0 is 00:00-00:59)",
                         TextList(24, "false"));
           f.choices = {"true", "false"}; f.min_items = f.max_items = 24; return f; }(),
      [] { auto f = list("pool_size", "24 integers as text: machines kept powered on each hour (-1: not managed)",
                         TextList(24, "-1"));
           f.min = -1; f.max = 100000; f.min_items = f.max_items = 24; return f; }(),
      flag("pool_using_percentage", false, "pool_size values are percentages (0..100) of the group's machines"),
      flag("enabled", true, "disabled schemes are ignored"),
      text_field("description", "free text"),
  }});

  kinds.push_back({Kind::machine, "machine", "machines", "machines", true, false, {
      ref("catalog", Kind::catalog, true, "catalog the machine belongs to"),
      ref("delivery_group", Kind::delivery_group, false, "delivery group that uses the machine"),
      text_field("dns_name", "DNS name"),
      text_field("hosted_machine_id", "the hypervisor's name or UUID for the machine"),
      list("tags", "tags used by tag restrictions"),
      operational(flag("in_maintenance_mode", false, "excluded from brokering and automatic power management")),
      state(choice("maintenance_mode_reason", {"None", "Administrator", "MaxFailedRegistrations"}, "None", "why")),
      state(choice("registration_state", {"Unregistered", "Initializing", "Registered", "AgentError"},
                   "Unregistered", "agent registration state")),
      state(choice("power_state", {"Unmanaged", "Unknown", "Unavailable", "Off", "On", "Suspended", "TurningOn",
                                   "TurningOff", "Suspending", "Resuming"}, "Unknown", "hypervisor power state")),
      state(choice("summary_state", {"Off", "Unregistered", "Available", "Disconnected", "InUse", "Preparing"},
                   "Unregistered", "summary for admins")),
      state(choice("fault_state", {"None", "FailedToStart", "StuckOnBoot", "Unregistered", "MaxCapacity",
                                   "VirtualMachineNotFound"}, "None", "fault")),
      state(text_field("agent_version", "reported by the agent")),
      state(text_field("os_type", "reported by the agent")),
      state(text_field("cbp_version", "agent protocol version in use")),
      state(text_field("agent_address", "host:port users connect to, reported by the agent")),
      state(number("load_index", 0, 0, 10000, "0..10000, 10000 is full")),
      state(number("session_count", 0, 0, 1000000, "pending plus established sessions")),
      state(text_field("last_deregistration_reason", "see docs/site-model.md")),
      state(time_field("last_deregistration_time", "when")),
      state(choice("last_connection_failure", {"None", "SessionPreparation", "RegistrationTimeout",
                                               "ConnectionTimeout", "Licensing", "Ticketing", "Other"},
                   "None", "last launch failure")),
      state(time_field("last_connection_time", "last launch")),
      state(text_field("last_connection_user", "user of the last launch")),
      secret(state(text_field("secret_hash", "verifier of the machine secret (agent authentication)"))),
  }});

  kinds.push_back({Kind::application, "application", "applications", "applications", true, false, {
      text_field("browser_name", "unique key used by the XML service (default: name)"),
      text_field("published_name", "name shown to users (default: name)"),
      choice("application_type", {"HostedOnDesktop", "InstalledOnClient", "PublishedContent"}, "HostedOnDesktop",
             "kind of application"),
      text_field("command_line_executable", "program to start", true),
      text_field("command_line_arguments", "arguments"),
      text_field("working_directory", "working directory"),
      text_field("client_folder", "folder shown to users"),
      text_field("description", "free text"),
      flag("enabled", true, "disabled applications cannot be launched"),
      flag("visible", true, "hidden applications are not enumerated"),
      flag("user_filter_enabled", false, "when on, only associated_users see the application"),
      list("associated_users", "users and groups that see the application when the filter is on"),
      ref_list("delivery_groups", Kind::delivery_group, "groups whose machines serve the application"),
      text_field("restrict_to_tag", "only machines with this tag serve the application"),
      number("max_per_user_instances", 0, 0, 1000000, "0 is unlimited"),
      number("max_total_instances", 0, 0, 1000000, "0 is unlimited"),
  }});

  kinds.push_back({Kind::rule, "rule", "rules", "rules", true, false, {
      [] { auto f = choice("rule_type", {"access", "entitlement", "assignment", "app_entitlement"}, "", "kind of rule");
           f.default_value = std::monostate{}; f.required = true; return f; }(),
      ref("delivery_group", Kind::delivery_group, true, "the group the rule is for"),
      flag("enabled", true, "disabled rules are ignored"),
      text_field("description", "free text"),
      flag("included_user_filter_enabled", true, "when off, every user with access is included"),
      list("included_users", "users and groups included"),
      flag("excluded_user_filter_enabled", false, "when on, excluded_users are refused"),
      list("excluded_users", "users and groups excluded"),
      choice("allowed_users", {"Filtered", "AnyAuthenticated", "Any", "AnonymousOnly", "FilteredOrAnonymous"},
             "Filtered", "access rules: which users"),
      choice("allowed_connections", {"Filtered", "NotViaAG", "ViaAG", "AnyViaAG"}, "Filtered",
             "access rules: via a gateway or not"),
      list("included_client_ips", "access rules: client addresses or CIDR ranges included (empty: any)"),
      list("excluded_client_ips", "access rules: client addresses or CIDR ranges excluded"),
      list("included_client_names", "access rules: client names included (empty: any)"),
      list("excluded_client_names", "access rules: client names excluded"),
      list("allowed_protocols", "access rules: protocols allowed (empty: deny)", TextList{"HDX"}),
      flag("allow_restart", true, "access rules: users may restart their machine"),
      text_field("published_name", "entitlement and assignment rules: name shown to users"),
      text_field("restrict_to_tag", "only machines with this tag serve the rule"),
      choice("session_reconnection", {"Always", "DisconnectedOnly", "SameEndpointOnly"}, "Always",
             "which sessions a launch reconnects to"),
      number("max_desktops", 1, 1, 1000, "assignment rules: machines each user may be assigned"),
      number("max_per_entitlement_instances", 0, 0, 1000000, "entitlement rules: 0 is unlimited"),
  }});

  kinds.push_back({Kind::assignment, "assignment", "assignments", "assignments", true, true, {
      ref("machine", Kind::machine, true, "the assigned machine"),
      text_field("user", "assigned user or group (one of user, client_ip)"),
      text_field("client_ip", "assigned client address (one of user, client_ip)"),
      text_field("rule", "assignment rule that made it, if any"),
  }});

  kinds.push_back({Kind::user, "user", "users", "users", true, false, {
      text_field("domain", "NT domain (default: the site's default_domain)"),
      text_field("upn", "user principal name, e.g. alice@example.test"),
      text_field("display_name", "full name"),
      text_field("email", "mail address"),
      text_field("sid", "security identifier"),
      secret(text_field("password_hash", "PBKDF2 hash: brokerd --hash-password")),
      flag("disabled", false, "account disabled"),
      operational(flag("locked_out", false, "locked out after failed logons (clear it to unlock)")),
      flag("must_change_password", false, "the user must change the password"),
      flag("expired", false, "the password has expired"),
      state(time_field("locked_out_until", "end of an automatic lock-out (empty: none or until unlocked)")),
  }});

  kinds.push_back({Kind::group, "group", "groups", "groups", true, false, {
      text_field("domain", "NT domain"),
      text_field("sid", "security identifier"),
      text_field("description", "free text"),
      list("members", "user and group names (groups nest)"),
  }});

  kinds.push_back({Kind::session, "session", "sessions", "sessions", false, false, {
      ref("machine", Kind::machine, true, "machine hosting the session"),
      text_field("user_name", "DOMAIN\\user"),
      text_field("delivery_group", "group the session was brokered from"),
      text_field("application", "application launched, if any"),
      choice("session_type", {"Desktop", "Application"}, "Desktop", "kind of session"),
      choice("state", {"PreparingNewSession", "Connected", "Active", "Disconnected", "Reconnecting",
                       "NonBrokeredSession", "Other", "Unknown", "LoggedOff"}, "PreparingNewSession", "session state"),
      choice("protocol", {"HDX", "RDP", "Console"}, "HDX", "display protocol"),
      text_field("client_name", "client device name"),
      text_field("client_address", "client address"),
      text_field("device_id", "client device id"),
      flag("brokered", true, "false for sessions the broker did not broker"),
      time_field("start_time", "when the launch was brokered (BrokeringTime)"),
      time_field("state_change_time", "last state change"),
      number("brokering_duration_ms", 0, 0, std::numeric_limits<std::int64_t>::max(),
             "how long the broker took to answer the launch (BrokeringDuration)"),
      time_field("end_time", "when the session logged off (state LoggedOff; kept for a day, then purged)"),
      text_field("session_key", "the key the machine's agent knows the session by, when it differs from the name"),
  }});

  kinds.push_back({Kind::power_action, "power_action", "power-actions", "power_actions", false, true, {
      ref("machine", Kind::machine, true, "target machine"),
      text_field("hypervisor_connection", "connection that runs it"),
      choice("action", {"TurnOn", "TurnOff", "Shutdown", "Reset", "Restart", "Suspend", "Resume"}, "TurnOn", "action"),
      choice("state", {"Pending", "Started", "Completed", "Failed", "Canceled", "Deleted", "Lost"}, "Pending", "state"),
      number("base_priority", 30, 0, 1000, "lower runs first; admin actions are 30"),
      number("actual_priority", 30, 0, 1000, "after boosts"),
      choice("reason", {"Reset", "Pvd", "Schedule", "Launch", "Admin", "Untaint", "Policy", "IdlePool"}, "Admin", "origin"),
      time_field("request_time", "queued at"),
      time_field("start_time", "started at"),
      time_field("completion_time", "ended at"),
      text_field("failure_reason", "why it failed"),
  }});
  return kinds;
}

const std::vector<KindSpec>& specs() {
  static const std::vector<KindSpec> all = build_specs();
  return all;
}

}  // namespace

const FieldSpec* KindSpec::field(std::string_view field_name) const {
  for (const auto& f : fields)
    if (f.name == field_name) return &f;
  return nullptr;
}

std::span<const KindSpec> all_kinds() { return specs(); }

const KindSpec& spec(Kind kind) {
  for (const auto& k : specs())
    if (k.kind == kind) return k;
  return specs().front();  // unreachable: every Kind has a spec (checked by model_test)
}

const KindSpec* find_kind(std::string_view n) {
  for (const auto& k : specs())
    if (k.name == n || k.plural == n || k.table == n) return &k;
  return nullptr;
}

std::string Object::text(std::string_view f, std::string_view fallback) const {
  auto it = fields.find(f);
  if (it != fields.end())
    if (auto* s = std::get_if<std::string>(&it->second)) return *s;
  return std::string(fallback);
}
std::int64_t Object::integer(std::string_view f, std::int64_t fallback) const {
  auto it = fields.find(f);
  if (it != fields.end())
    if (auto* v = std::get_if<std::int64_t>(&it->second)) return *v;
  return fallback;
}
bool Object::flag(std::string_view f, bool fallback) const {
  auto it = fields.find(f);
  if (it != fields.end())
    if (auto* v = std::get_if<bool>(&it->second)) return *v;
  return fallback;
}
TextList Object::list(std::string_view f) const {
  auto it = fields.find(f);
  if (it != fields.end())
    if (auto* v = std::get_if<TextList>(&it->second)) return *v;
  return {};
}
bool Object::is_null(std::string_view f) const {
  auto it = fields.find(f);
  return it == fields.end() || std::holds_alternative<std::monostate>(it->second);
}

std::ostream& operator<<(std::ostream& os, const Object& obj) {
  return os << spec(obj.kind).name << " '" << obj.name << "'";
}

Object make_default(Kind kind, std::string name) {
  Object o;
  o.kind = kind;
  o.name = std::move(name);
  for (const auto& f : spec(kind).fields) o.fields[std::string(f.name)] = f.default_value;
  return o;
}

std::string_view to_string(FieldType t) {
  switch (t) {
    case text: return "string";
    case integer: return "integer";
    case boolean: return "boolean";
    case text_list: return "list of strings";
    case timestamp: return "timestamp";
  }
  return "?";
}

namespace {
bool type_matches(FieldType t, const Value& v) {
  switch (t) {
    case text:
    case timestamp: return std::holds_alternative<std::string>(v);
    case integer: return std::holds_alternative<std::int64_t>(v);
    case boolean: return std::holds_alternative<bool>(v);
    case text_list: return std::holds_alternative<TextList>(v);
  }
  return false;
}

std::string join_choices(const std::vector<std::string_view>& c) {
  std::string out;
  for (auto s : c) {
    if (!out.empty()) out += ", ";
    out += s;
  }
  return out;
}
// Whole decimal integers only ("-1", "12"), no signs other than a leading '-', no spaces.
bool parse_integer(const std::string& text, std::int64_t& out) {
  const char* first = text.data();
  const char* last = text.data() + text.size();
  if (first == last) return false;
  auto [end, ec] = std::from_chars(first, last, out);
  return ec == std::errc{} && end == last;
}

// A text_list value against its spec: "" or the message (without "field: ").
std::string check_list(const FieldSpec& f, const TextList& l) {
  if (f.max_items > 0 && (l.size() < f.min_items || l.size() > f.max_items)) {
    if (f.min_items == f.max_items)
      return "must have exactly " + std::to_string(f.max_items) + " elements, not " + std::to_string(l.size());
    return "must have " + std::to_string(f.min_items) + " to " + std::to_string(f.max_items) + " elements, not " +
           std::to_string(l.size());
  }
  for (std::size_t i = 0; i < l.size(); ++i) {
    const std::string& e = l[i];
    if (e.empty()) return "list elements must not be empty";
    if (!f.choices.empty() && std::find(f.choices.begin(), f.choices.end(), e) == f.choices.end())
      return "'" + e + "' (element " + std::to_string(i) + ") is not one of " + join_choices(f.choices);
    if (f.min < f.max) {
      std::int64_t n = 0;
      if (!parse_integer(e, n) || n < f.min || n > f.max)
        return "'" + e + "' (element " + std::to_string(i) + ") is not an integer between " + std::to_string(f.min) +
               " and " + std::to_string(f.max);
    }
  }
  return {};
}
}  // namespace

std::string validate_fields(const Object& obj) {
  const auto& ks = spec(obj.kind);
  if (!ks.auto_name && obj.kind != Kind::site) {
    if (obj.name.empty()) return "name: is required";
    if (obj.name.size() > 256) return "name: is longer than 256 characters";
    for (unsigned char c : obj.name)
      if (c < 0x20 || c == '/' || c == '?' || c == '#' || c == '%')
        return "name: must not contain control characters or any of / ? # %";
  }
  for (const auto& [key, value] : obj.fields) {
    const FieldSpec* f = ks.field(key);
    if (!f) return key + ": is not a field of " + std::string(ks.name);
    if (std::holds_alternative<std::monostate>(value)) {
      if (f->required) return key + ": is required";
      continue;
    }
    if (!type_matches(f->type, value)) return key + ": must be a " + std::string(to_string(f->type));
    if (auto* s = std::get_if<std::string>(&value)) {
      if (f->required && s->empty()) return key + ": is required";
      if (!f->choices.empty() && std::find(f->choices.begin(), f->choices.end(), *s) == f->choices.end())
        return key + ": '" + *s + "' is not one of " + join_choices(f->choices);
    }
    if (auto* n = std::get_if<std::int64_t>(&value); n && f->min < f->max && (*n < f->min || *n > f->max))
      return key + ": must be between " + std::to_string(f->min) + " and " + std::to_string(f->max);
    if (auto* l = std::get_if<TextList>(&value)) {
      if (auto msg = check_list(*f, *l); !msg.empty()) return key + ": " + msg;
    }
  }
  if (obj.kind == Kind::power_time_scheme && obj.flag("pool_using_percentage"))
    for (const auto& e : obj.list("pool_size"))
      if (std::int64_t n = 0; parse_integer(e, n) && n > 100)
        return "pool_size: '" + e + "' is more than 100 (pool_using_percentage is on: values are percentages)";
  for (const auto& f : ks.fields)
    if (f.required && !obj.fields.contains(f.name)) return std::string(f.name) + ": is required";
  return {};
}

bool same_declared_fields(const Object& a, const Object& b) {
  if (a.kind != b.kind || a.name != b.name || a.owner != b.owner) return false;
  for (const auto& f : spec(a.kind).fields) {
    if (f.state || f.operational) continue;
    auto ia = a.fields.find(f.name);
    auto ib = b.fields.find(f.name);
    const Value none;
    if ((ia == a.fields.end() ? none : ia->second) != (ib == b.fields.end() ? none : ib->second)) return false;
  }
  return true;
}

}  // namespace common::model
