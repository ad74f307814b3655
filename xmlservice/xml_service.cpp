#include "xmlservice/xml_service.hpp"

#include "broker/engine.hpp"
#include "broker/entitlements.hpp"
#include "broker/launcher.hpp"
#include "common/address.hpp"
#include "common/clock.hpp"
#include "common/log.hpp"
#include "common/metrics.hpp"
#include "common/work_queue.hpp"
#include "identity/directory.hpp"
#include "xmlservice/default_icon.hpp"
#include "xmlservice/logon_throttle.hpp"
#include "xmlservice/nfuse_codec.hpp"
#include "xmlservice/request_limits.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <future>
#include <map>
#include <set>

namespace xmlservice {

namespace model = common::model;

namespace {

constexpr std::string_view kPath = "/scripts/wpnbr.dll";

bool iequal_path(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
         });
}

net::HttpResponse xml_reply(std::string body, const std::string& encoding_label) {
  net::HttpResponse r;
  r.content_type = "text/xml; charset=" + encoding_label;
  r.body = std::move(body);
  r.route = std::string(kPath);
  return r;
}

net::HttpResponse plain(int status, std::string text) {
  net::HttpResponse r;
  r.status = status;
  r.body = std::move(text) + "\n";
  r.route = std::string(kPath);
  return r;
}

// Who is asking: an identity, anonymous, or an ErrorId to answer with.
struct Caller {
  std::optional<identity::UserIdentity> user;
  bool anonymous = false;
  std::optional<ErrorId> error;
  std::string label;   // for the log: "DEMO\\alice", "anonymous", "alice (no password)"; as sent
  std::string detail;  // why `error`, for the log ("throttled: ..."); may be empty

  // The log's result for `error`: "failed-credentials", "service-unavailable (throttled ...)".
  std::string error_result() const {
    std::string r(to_string(error.value_or(ErrorId::unspecified)));
    return detail.empty() ? r : r + " (" + detail + ")";
  }
};

ErrorId to_error_id(identity::AuthResult r) {
  switch (r) {
    case identity::AuthResult::ok: return ErrorId::unspecified;
    case identity::AuthResult::failed_credentials: return ErrorId::failed_credentials;
    case identity::AuthResult::account_disabled: return ErrorId::account_disabled;
    case identity::AuthResult::account_locked_out: return ErrorId::account_locked_out;
    case identity::AuthResult::must_change_credentials: return ErrorId::must_change_credentials;
    case identity::AuthResult::expired_credentials: return ErrorId::expired_credentials;
  }
  return ErrorId::unspecified;
}

bool server_type_ok(const std::vector<ServerType>& types) {
  return types.empty() || std::any_of(types.begin(), types.end(),
                                      [](ServerType t) { return t == ServerType::all || t == ServerType::win32; });
}
bool client_type_ok(const std::vector<ClientType>& types) {
  return types.empty() || std::any_of(types.begin(), types.end(),
                                      [](ClientType t) { return t == ClientType::all || t == ClientType::ica30; });
}

bool in_scope(const std::optional<Scope>& scope, const std::string& folder) {
  if (!scope || scope->folder.empty()) return scope && scope->traverse == Traverse::onelevel ? folder.empty() : true;
  std::string want = scope->folder;
  while (!want.empty() && (want.back() == '\\' || want.back() == '/')) want.pop_back();
  if (scope->traverse == Traverse::onelevel) return identity::iequals(folder, want);
  return identity::iequals(folder.substr(0, want.size()), want) &&
         (folder.size() == want.size() || folder[want.size()] == '\\' || folder[want.size()] == '/');
}

}  // namespace

struct XmlService::Impl {
  Impl(identity::Directory& d, broker::Engine& e, common::WorkQueue& w, common::Metrics& m,
       std::shared_ptr<spdlog::logger> l, broker::Launcher* la, const XmlServiceOptions& o)
      : directory(d),
        engine(e),
        work(w),
        metrics(m),
        log(std::move(l)),
        launcher(la),
        max_icon_bytes(o.max_icon_bytes),
        clock(o.clock ? nullptr : std::make_unique<common::SystemClock>()),
        throttle(o.failed_logons_per_minute, o.max_throttled_sources, o.clock ? *o.clock : *clock) {}

  identity::Directory& directory;
  broker::Engine& engine;
  common::WorkQueue& work;
  common::Metrics& metrics;
  std::shared_ptr<spdlog::logger> log;
  broker::Launcher* launcher = nullptr;
  std::size_t max_icon_bytes;
  std::unique_ptr<common::SystemClock> clock;  // when the options named none
  LogonThrottle throttle;

  // Whether the request is answered for a caller, and the credentials, whether they are
  // required and the ClientAddress it names.
  struct Identity {
    const std::optional<Credentials>* credentials = nullptr;
    bool required = true;
    std::string client_address;
  };
  std::optional<Identity> needs_caller(const NFuseRequest& request) const {
    return std::visit(
        [&](const auto& req) -> std::optional<Identity> {
          using T = std::decay_t<decltype(req)>;
          if constexpr (std::is_same_v<T, RequestValidateCredentials> || std::is_same_v<T, RequestServerData>) {
            return Identity{&req.credentials, true, {}};
          } else if constexpr (std::is_same_v<T, RequestAppData> || std::is_same_v<T, RequestAddress>) {
            if (std::is_same_v<T, RequestAddress> && !launcher) return std::nullopt;
            return Identity{&req.credentials, std::is_same_v<T, RequestAddress>,
                            req.client_address ? req.client_address->value : std::string()};
          } else if constexpr (std::is_same_v<T, RequestTicket> || std::is_same_v<T, RequestLaunchRef> ||
                               std::is_same_v<T, RequestReconnectSessionData> ||
                               std::is_base_of_v<UserSessionsRequest, T>) {
            if (!launcher) return std::nullopt;
            return Identity{&req.credentials, true, {}};
          } else {
            return std::nullopt;
          }
        },
        request);
  }

  static bool from_front_end(const model::Object& site_settings, const std::string& remote) {
    const auto trusted_list = site_settings.list("trusted_front_ends");
    return std::any_of(trusted_list.begin(), trusted_list.end(),
                       [&](const std::string& r) { return common::address_in(remote, r); });
  }

  // The client address access rules and assignments by client IP match (docs/nfuse.md "Client
  // address"): the request's ClientAddress when a trusted front end (`trusted_front_ends`) sent it
  // and it is an IP address, else the connection's peer. Anyone else could claim any address.
  static std::string client_address_of(const model::Object& site_settings, const std::string& remote,
                                       const std::optional<Address>& claimed) {
    if (claimed && common::is_ip_address(claimed->value) && from_front_end(site_settings, remote)) return claimed->value;
    return remote;
  }

  // Who is asking; `done` gets the answer exactly once: before this returns, except for a password
  // check, which may finish later on another thread (Directory::authenticate_async).
  // `client_address`: the request's ClientAddress, or empty (it names the source a trusted front
  // end's failed logons count under).
  void identify(const std::optional<Credentials>& creds, const model::Object& site_settings, const std::string& remote,
                const std::string& client_address, bool required, std::function<void(Caller)> done) {
    Caller c;
    if (!creds) {
      if (required) {
        c.error = ErrorId::failed_credentials;
        c.label = "(no credentials)";
      } else {
        c.anonymous = true;
        c.label = "anonymous";
      }
      return done(std::move(c));
    }
    if (creds->anonymous) {
      c.anonymous = true;
      c.label = "anonymous";
      return done(std::move(c));
    }
    std::string name = creds->user_name;
    std::string domain = creds->domain ? creds->domain->name : std::string();
    if (creds->password) {
      c.label = domain.empty() ? name : domain + "\\" + name;
      if (!creds->password->plain || name.empty()) {
        c.error = ErrorId::failed_credentials;
        return done(std::move(c));
      }
      // Refused before the directory when this source failed too often.
      std::string source = LogonThrottle::source_of(remote, from_front_end(site_settings, remote), client_address);
      if (!throttle.allowed(source)) {
        metrics.add("broker_xml_logons_throttled_total", {});
        c.error = ErrorId::service_unavailable;
        c.detail = "throttled: too many failed logons from " + source;
        return done(std::move(c));
      }
      return directory.authenticate_async(
          {name, domain, *creds->password->plain},
          [this, c = std::move(c), source = std::move(source), done = std::move(done)](
              identity::Result<identity::AuthOutcome> outcome) mutable {
            if (!outcome) {
              if (outcome.error().code == common::errc::unavailable) {
                c.detail = outcome.error().message;  // busy: logged once, with the request
              } else {
                log->error("xml: directory failed: {}", outcome.error().describe());
              }
              c.error = ErrorId::service_unavailable;
            } else if (outcome->result != identity::AuthResult::ok) {
              if (outcome->result == identity::AuthResult::failed_credentials) throttle.failed(source);
              c.error = to_error_id(outcome->result);
            } else {
              c.user = outcome->identity;
              c.label = c.user->qualified_name;
            }
            done(std::move(c));
          });
    }
    // No password: pass-through, gateway or smart card. Trusted front ends only.
    if (name.empty())
      for (const auto& id : creds->ids)
        if (!id.value.empty()) {
          name = id.value;
          break;
        }
    c.label = (domain.empty() ? name : domain + "\\" + name) + " (no password)";
    if (name.empty()) {
      c.error = ErrorId::failed_credentials;
      return done(std::move(c));
    }
    const bool trusted = site_settings.flag("trust_xml_requests") && from_front_end(site_settings, remote);
    if (!trusted) {
      c.error = ErrorId::not_trusted;
      return done(std::move(c));
    }
    auto outcome = directory.lookup(name, domain);
    if (!outcome) {
      c.error = outcome.error().code == common::errc::not_found ? ErrorId::failed_credentials : ErrorId::service_unavailable;
      return done(std::move(c));
    }
    if (outcome->result != identity::AuthResult::ok) {
      c.error = to_error_id(outcome->result);
      return done(std::move(c));
    }
    c.user = outcome->identity;
    c.label = c.user->qualified_name + " (trusted)";
    done(std::move(c));
  }

  // The icons of one RequestAppData reply: each distinct one drawn once, and at most `remaining`
  // base64 bytes in all (XmlServiceOptions::max_icon_bytes).
  struct IconBudget {
    std::size_t remaining = 0;
    std::size_t resources_cut = 0;  // resources listed without their icons
    std::map<std::tuple<int, int, IconFormat, bool>, std::string> drawn;

    const std::string& icon(const IconSpec& spec, bool desktop) {
      auto key = std::make_tuple(std::clamp(spec.size, 16, 256), spec.bpp, spec.format, desktop);
      auto it = drawn.find(key);
      if (it == drawn.end()) it = drawn.emplace(key, default_icon_base64(spec, desktop)).first;
      return it->second;
    }
  };

  AppData app_data(const broker::Resource& r, const RequestAppData& req, const model::Object& site_settings,
                   IconBudget& icons) {
    AppData a;
    a.in_name = r.in_name;
    a.f_name = r.f_name;
    const bool desktop = r.type == broker::Resource::Type::desktop;
    const bool all = req.wants(DetailLevel::all);
    AppDetails details;
    if (all || req.wants(DetailLevel::defaults) || req.desired_details.empty()) {
      AppSettings s;
      s.app_is_desktop = desktop;
      s.app_is_disabled = r.disabled;
      s.folder = r.folder;
      s.description = r.description;
      s.publisher_name = site_settings.text("site_name", "openbroker");
      details.settings = std::move(s);
    }
    if ((all || req.wants(DetailLevel::access_list)) && site_settings.flag("expose_access_lists")) {
      std::vector<AccessEntry> acl;
      for (const auto& p : r.principals) {
        auto parsed = identity::parse_account_name(p);
        AccessEntry e;
        e.kind = AccessKind::group;
        e.name = parsed.name;
        if (!parsed.domain.empty()) e.domain = Domain{parsed.domain, DomainType::nt};
        acl.push_back(std::move(e));
      }
      details.access_list = std::move(acl);
    }
    if (all || req.wants(DetailLevel::icon_info)) details.icon_info = default_icon_specs();
    // All of this resource's icons, or none of them.
    const IconSpec legacy{32, 4, IconFormat::raw};
    const bool wants_legacy = req.wants(DetailLevel::icon);
    std::size_t bytes = wants_legacy ? icons.icon(legacy, desktop).size() : 0;
    for (const auto& spec : req.desired_icon_data) bytes += icons.icon(spec, desktop).size();
    if (bytes <= icons.remaining) {
      icons.remaining -= bytes;
      if (wants_legacy) details.icon = icons.icon(legacy, desktop);
      for (const auto& spec : req.desired_icon_data) a.icon_data.push_back({spec, icons.icon(spec, desktop)});
    } else {
      ++icons.resources_cut;
    }
    a.details = std::move(details);
    a.server_type = ServerType::win32;
    a.client_type = ClientType::ica30;
    return a;
  }

  // What the logon ticket carries to the agent (docs/nfuse.md "Launch"): the password when the
  // user gave one, else an identity assertion from the trusted front end.
  static broker::Credential credential_of(const Credentials& creds, const identity::UserIdentity& user) {
    broker::Credential c;
    c.data["user"] = user.user_name;
    c.data["domain"] = user.domain;
    if (!user.upn.empty()) c.data["upn"] = user.upn;
    if (creds.password && creds.password->plain) {
      c.type = "password";
      c.data["password"] = *creds.password->plain;
    } else {
      c.type = "assertion";
      if (!user.sid.empty()) c.data["sid"] = user.sid;
    }
    return c;
  }

  static constexpr std::string_view kTagPrefix = "OBSession:";

  // RequestTicket, RequestLaunchRef, RequestReconnectSessionData, RequestDisconnectUserSessions,
  // RequestLogoffUserSessions for an authenticated user.
  template <class T>
  std::pair<NFuseResponse, std::string> session_request(const NFuseRequest& request, const T& req,
                                                        const identity::UserIdentity& user,
                                                        const broker::Credential& credential) {
    if constexpr (std::is_same_v<T, RequestTicket> || std::is_same_v<T, RequestLaunchRef>) {
      if (!req.ticket_tag.starts_with(kTagPrefix))
        return {error_response(request, ErrorId::unspecified), "unknown TicketTag '" + req.ticket_tag + "'"};
      auto ticket = launcher->reissue_ticket(user, req.ticket_tag.substr(kTagPrefix.size()), credential,
                                             req.time_to_live ? static_cast<std::int64_t>(*req.time_to_live) : 0);
      if (!ticket) {
        const bool gone = ticket.error().code == common::errc::not_found;
        return {error_response(request, gone ? ErrorId::unspecified : ErrorId::service_unavailable),
                gone ? "no such launch" : "service-unavailable"};
      }
      if constexpr (std::is_same_v<T, RequestTicket>) return {ResponseTicket{*ticket}, "ok"};
      else return {ResponseLaunchRef{*ticket}, "ok"};
    } else if constexpr (std::is_same_v<T, RequestReconnectSessionData>) {
      std::set<std::string> states;
      for (auto t : req.session_types) {
        if (t == SessionType::active) states.insert("Active");
        if (t == SessionType::disconnected) states.insert("Disconnected");
      }
      if (states.empty()) states = {"Disconnected"};  // no SessionType: disconnected ones (WI's default)
      auto sessions = launcher->user_sessions(user, states);
      if (!sessions) return {error_response(request, ErrorId::service_unavailable), "service-unavailable"};
      ResponseReconnectSessionData r;
      for (const auto& us : *sessions) {
        SessionData d;
        d.in_name = us.resource;
        d.host_id = HostId{"ima-host-id", std::to_string(us.machine_id)};
        d.session_id = us.session_key;
        r.sessions.push_back(std::move(d));
      }
      return {r, "ok, " + std::to_string(r.sessions.size()) + " sessions"};
    } else {
      constexpr bool logoff = std::is_same_v<T, RequestLogoffUserSessions>;
      auto n = launcher->end_user_sessions(user, logoff);
      if (!n) return {error_response(request, ErrorId::service_unavailable), "service-unavailable"};
      const auto outcome = "ok, " + std::to_string(*n) + " sessions";
      if constexpr (logoff) return {ResponseLogoffUserSessions{}, outcome};
      else return {ResponseDisconnectUserSessions{}, outcome};
    }
  }

  static ErrorId launch_error_id(broker::LaunchFailure f) {
    using F = broker::LaunchFailure;
    switch (f) {
      case F::all_in_use:
      case F::all_unregistered:
      case F::all_in_maintenance:
      case F::no_machines:
      case F::tag_mismatch:
      case F::assignment_limit:
      case F::instance_limit:
      case F::prepare_failed:
      case F::group_in_maintenance:
      case F::registration_timeout: return ErrorId::no_available_workstation;
      case F::storage_error: return ErrorId::service_unavailable;
      case F::powering_on:
      case F::power_throttled: return ErrorId::retry_required;
      default: return ErrorId::unspecified;
    }
  }

  // ServerAddress in the form the client asked for (dot, dot-port, dns, dns-port; default dot-port).
  static Address server_address(const broker::LaunchResult& r, const std::optional<Address>& wanted, bool use_dns) {
    std::string host = r.address, port = "1494";
    if (auto colon = r.address.rfind(':'); colon != std::string::npos) {
      host = r.address.substr(0, colon);
      port = r.address.substr(colon + 1);
    }
    const bool dns = use_dns && !r.dns_name.empty();
    const auto type = wanted ? wanted->type : AddressType::dot_port;
    if (type == AddressType::dot) return {AddressType::dot, host};
    if (type == AddressType::dns) return dns ? Address{AddressType::dns, r.dns_name} : Address{AddressType::dot, host};
    if (dns) return {AddressType::dns_port, r.dns_name + ":" + port};
    return {AddressType::dot_port, host + ":" + port};
  }

  // RequestAddress: brokers the launch; `reply` gets the response once the agent has prepared.
  void launch(const NFuseRequest& request, const RequestAddress& req, const model::Object& site_settings,
              const std::string& remote, const Caller& caller,
              std::function<void(NFuseResponse, std::string result, std::string who)> reply) {
    if (caller.error) return reply(error_response(request, *caller.error), caller.error_result(), caller.label);
    if (!caller.user) return reply(error_response(request, ErrorId::failed_credentials), "failed-credentials", caller.label);
    broker::LaunchRequest lr;
    lr.user = *caller.user;
    lr.client_name = req.client_name;
    lr.device_id = req.device_id;
    lr.client_address = client_address_of(site_settings, remote, req.client_address);
    lr.credential = credential_of(*req.credentials, *caller.user);
    for (const auto& nv : req.session_settings)
      if (identity::iequals(nv.name, "CredentialType") && !nv.value.empty()) lr.credential.type = nv.value;
    switch (req.name.kind) {
      case LaunchNameKind::app:
      case LaunchNameKind::unspecified: lr.resource = req.name.value; break;
      case LaunchNameKind::session: lr.reconnect_session = req.name.session.session_id; break;
      default:
        return reply(error_response(request, ErrorId::unspecified), "unsupported Name (use AppName or SessionName)",
                     caller.label);
    }
    const bool use_dns = site_settings.flag("dns_resolution_enabled");
    const auto wanted = req.server_address;
    const auto label = caller.label;
    launcher->launch(std::move(lr), [request, reply, use_dns, wanted, label](broker::LaunchResult r) {
      if (!r.ok())
        return reply(error_response(request, launch_error_id(r.failure)),
                     std::string(to_string(launch_error_id(r.failure))) + " (" + std::string(broker::to_string(r.failure)) +
                         ": " + r.message + ")",
                     label);
      ResponseAddress a;
      a.server_address = server_address(r, wanted, use_dns);
      a.server_type = ServerType::win32;
      a.connection_type = "tcp";
      a.client_type = ClientType::ica30;
      a.ticket_tag = std::string(kTagPrefix) + r.session_key;
      a.disconnected_session = r.reconnect;
      a.ticket = r.ticket;
      reply(a, "ok, " + r.machine + (r.reconnect ? " (reconnect)" : ""), label);
    });
  }

  // Returns the response and a short outcome for the log ("ok, 4 resources").
  // `caller`: who is asking, for the requests that need to know (needs_caller).
  std::pair<NFuseResponse, std::string> dispatch(const NFuseRequest& request, const broker::SiteView& view,
                                                  const std::string& remote, const std::optional<Caller>& identified,
                                                  std::string& who) {
    const model::Object& site_settings = view.settings_object;
    return std::visit(
        [&](const auto& req) -> std::pair<NFuseResponse, std::string> {
          using T = std::decay_t<decltype(req)>;
          if constexpr (std::is_same_v<T, RequestCapabilities>) {
            ResponseCapabilities caps{{Capability::separate_credentials_validation, Capability::user_identity,
                                       Capability::integrated_authentication, Capability::full_icon_data}};
            if (launcher) caps.capabilities.push_back(Capability::launch_reference);
            return {caps, "ok"};
          } else if constexpr (std::is_same_v<T, RequestServerFarmData>) {
            return {ResponseServerFarmData{{site_settings.text("site_name", "openbroker").empty()
                                                ? std::string("openbroker")
                                                : site_settings.text("site_name", "openbroker")}},
                    "ok"};
          } else if constexpr (std::is_same_v<T, RequestProtocolInfo>) {
            ResponseProtocolInfo r;
            if (req.server_address) r.server_address = Address{req.server_address->type, {}};
            return {r, "ok"};
          } else if constexpr (std::is_same_v<T, RequestValidateCredentials> || std::is_same_v<T, RequestAppData> ||
                               std::is_same_v<T, RequestServerData>) {
            const Caller& caller = *identified;
            who = caller.label;
            if (caller.error) return {error_response(request, *caller.error), caller.error_result()};
            if constexpr (std::is_same_v<T, RequestValidateCredentials>) {
              ResponseValidateCredentials r;
              if (req.desired_user_identity && caller.user) {
                UserIdentityInfo info;
                info.ids.push_back({IdType::sam, caller.user->qualified_name});
                if (!caller.user->sid.empty()) info.ids.push_back({IdType::sid, caller.user->sid});
                if (!caller.user->upn.empty()) info.ids.push_back({IdType::upn, caller.user->upn});
                r.user_identity = std::move(info);
              }
              if (caller.anonymous) return {error_response(request, ErrorId::failed_credentials), "failed-credentials"};
              return {r, "ok"};
            } else if constexpr (std::is_same_v<T, RequestServerData>) {
              ResponseServerData r;
              if (server_type_ok(req.server_types) && client_type_ok(req.client_types)) {
                // The registered machines (the engine's live registration state), in id order as
                // storage lists them.
                std::vector<std::pair<std::int64_t, std::string>> registered;
                engine.with_state([&](const broker::SiteState& st) {
                  for (const auto& [name, m] : st.machines)
                    if (m.registration == broker::RegistrationState::registered) registered.emplace_back(m.id, name);
                });
                std::sort(registered.begin(), registered.end());
                for (auto& [id, name] : registered) r.servers.push_back({std::move(name), ServerType::win32, ClientType::ica30});
              }
              return {r, "ok, " + std::to_string(r.servers.size()) + " servers"};
            } else {
              broker::Requester requester;
              requester.user = caller.user ? &*caller.user : nullptr;
              requester.client_address = client_address_of(site_settings, remote, req.client_address);
              requester.client_name = req.client_name;
              ResponseAppData r;
              r.scope = req.scope;
              if (server_type_ok(req.server_types) && client_type_ok(req.client_types)) {
                // The configuration as of the last change (the view the request started with),
                // and the requester's own direct assignments from the engine's indexes.
                std::vector<broker::DirectAssignment> direct;
                IconBudget icons{max_icon_bytes};
                if (caller.user)
                  direct = engine.with_state([&](const broker::SiteState& st) {
                    return broker::direct_assignments_for(st, *caller.user, requester.client_address);
                  });
                for (const auto& res : broker::entitled_resources(view.config, requester, direct)) {
                  if (!req.app_names.empty() &&
                      std::none_of(req.app_names.begin(), req.app_names.end(),
                                   [&](const std::string& n) { return identity::iequals(n, res.in_name); }))
                    continue;
                  if (!in_scope(req.scope, res.folder)) continue;
                  r.apps.push_back(app_data(res, req, site_settings, icons));
                }
                if (icons.resources_cut)
                  return {r, "ok, " + std::to_string(r.apps.size()) + " resources, " +
                                 std::to_string(icons.resources_cut) + " without icons (over " +
                                 std::to_string(max_icon_bytes) + " icon bytes)"};
              }
              return {r, "ok, " + std::to_string(r.apps.size()) + " resources"};
            }
          } else if constexpr (std::is_same_v<T, RequestAddress>) {
            // Answered by launch() when there is a launcher.
            return {error_response(request, ErrorId::unspecified), "no brokering engine"};
          } else {
            if (!launcher) return {error_response(request, ErrorId::unspecified), "no brokering engine"};
            const Caller& caller = *identified;
            who = caller.label;
            if (caller.error) return {error_response(request, *caller.error), caller.error_result()};
            if (!caller.user) return {error_response(request, ErrorId::failed_credentials), "failed-credentials"};
            return session_request(request, req, *caller.user, credential_of(*req.credentials, *caller.user));
          }
        },
        request);
  }
};

XmlService::XmlService(identity::Directory& directory, broker::Engine& engine, common::WorkQueue& work,
                       common::Metrics& metrics, std::shared_ptr<spdlog::logger> logger, broker::Launcher* launcher,
                       XmlServiceOptions options)
    : impl_(std::make_unique<Impl>(directory, engine, work, metrics, std::move(logger), launcher, options)) {
  metrics.describe("broker_xml_requests_total", common::Metrics::Type::counter,
                   "NFuse XML requests by request type and result (ok or the ErrorId).");
  metrics.describe("broker_xml_request_duration_seconds", common::Metrics::Type::histogram,
                   "Time to answer one NFuse XML request.");
  metrics.describe("broker_xml_logons_throttled_total", common::Metrics::Type::counter,
                   "Password logons refused without a check because their source address failed too often.");
  metrics.add("broker_xml_logons_throttled_total", {}, 0);
}

XmlService::~XmlService() = default;

void XmlService::handle(net::HttpRequest&& request, net::Responder respond) {
  auto shared_request = std::make_shared<net::HttpRequest>(std::move(request));
  auto shared_respond = std::make_shared<net::Responder>(std::move(respond));
  const bool queued = impl_->work.post([this, shared_request, shared_respond] {
    try {
      process(*shared_request, [shared_respond](net::HttpResponse r) { (*shared_respond)(std::move(r)); });
    } catch (const std::exception& e) {
      impl_->log->error("xml: {}", e.what());
      (*shared_respond)(plain(500, "internal error; see the broker log"));
    }
  });
  if (!queued) (*shared_respond)(plain(503, "the broker is shutting down"));
}

net::HttpResponse XmlService::process(const net::HttpRequest& http) {
  std::promise<net::HttpResponse> promise;
  auto future = promise.get_future();
  process(http, [&promise](net::HttpResponse r) { promise.set_value(std::move(r)); });
  return future.get();
}

void XmlService::process(const net::HttpRequest& http, net::Responder respond) {
  const auto started = std::chrono::steady_clock::now();
  if (!iequal_path(http.path, kPath)) {
    auto r = plain(404, "no such endpoint: " + http.path + " (the XML service is POST " + std::string(kPath) + ")");
    r.route = "other";
    return respond(std::move(r));
  }
  if (http.method != "POST") {
    auto r = plain(405, "use POST");
    r.headers.emplace_back("Allow", "POST");
    return respond(std::move(r));
  }
  Impl* impl = impl_.get();
  const std::string remote = http.remote_address;
  // Logs and counts the request once. `type` is a known request name, "unknown" or "invalid";
  // `result` and `who` may hold what the client sent (they are made safe here).
  auto finish = [impl, started, remote](const std::string& type, const std::string& result, const std::string& who) {
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    const auto short_result = result.substr(0, result.find_first_of(", "));
    impl->metrics.add("broker_xml_requests_total", {{"request", type}, {"result", short_result}});
    impl->metrics.observe("broker_xml_request_duration_seconds", {{"request", type}}, secs);
    impl->log->info("xml {} from {} user={} result={} in {:.1f} ms", type, remote,
                    who.empty() ? "-" : common::log_safe(who), common::log_safe(result, 256), secs * 1000);
  };

  auto parsed = parse_request(http.body);
  if (!parsed) {
    const auto& e = parsed.error();
    if (!answered_in_band(e.code)) {
      finish("invalid", std::string(to_string(e.code)), {});
      return respond(plain(400, "not an NFuse request: " + e.message));
    }
    // The metric label is a known request name or "unknown", never the element as sent.
    std::string label = "unknown";
    if (e.code == ParseErrc::invalid_request && e.response_element.starts_with("Response"))
      label = "Request" + e.response_element.substr(8);
    finish(label, "unspecified (" + (label == "unknown" ? e.request_element + ": " : std::string()) + e.message + ")",
           {});
    return respond(xml_reply(render(ResponseError{e.response_element, ErrorId::unspecified}, e.encoding_label),
                             e.encoding_label));
  }
  const std::string type(request_name(parsed->request));
  const std::string encoding = parsed->encoding_label;
  if (const auto over = check_limits(parsed->request)) {
    finish(type,
           std::string(to_string(over->error)) + " (" + std::string(over->field) + " of " + std::to_string(over->bytes) +
               " " + std::string(over->unit) + "; the limit is " + std::to_string(over->limit) + ")",
           {});
    return respond(xml_reply(render(error_response(parsed->request, over->error), encoding), encoding));
  }
  // The site settings and configuration this request is answered with (immutable; a change
  // published meanwhile applies to the next request).
  // The rest runs once the caller is known, which for a password check may be later, on the
  // thread the directory finishes on.
  struct Pending {
    NFuseRequest request;
    std::shared_ptr<const broker::SiteView> view;
  };
  auto pending = std::make_shared<Pending>(Pending{std::move(parsed->request), impl_->engine.view()});
  auto answer = [impl, pending, remote, finish, respond, type, encoding](std::optional<Caller> caller) {
    try {
      if (const auto* ra = std::get_if<RequestAddress>(&pending->request); ra && impl->launcher) {
        return impl->launch(
            pending->request, *ra, pending->view->settings_object, remote, *caller,
            [finish, respond, type, encoding](NFuseResponse response, std::string result, std::string who) {
              finish(type, result, who);
              respond(xml_reply(render(response, encoding), encoding));
            });
      }
      std::string who;
      auto [response, result] = impl->dispatch(pending->request, *pending->view, remote, caller, who);
      finish(type, result, who);
      respond(xml_reply(render(response, encoding), encoding));
    } catch (const std::exception& e) {
      impl->log->error("xml: {}", e.what());
      respond(plain(500, "internal error; see the broker log"));
    }
  };
  const auto identity = impl_->needs_caller(pending->request);
  if (!identity) return answer(std::nullopt);
  impl_->identify(*identity->credentials, pending->view->settings_object, remote, identity->client_address,
                  identity->required,
                  [answer](Caller caller) { answer(std::move(caller)); });
}

}  // namespace xmlservice
