#include "xmlservice/request_limits.hpp"

#include <cctype>
#include <type_traits>

namespace xmlservice {

namespace {

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) return false;
  return true;
}

// Checks fields in order and remembers the first violation.
struct Checker {
  std::optional<LimitViolation> found;

  void check(std::string_view field, std::string_view value, std::size_t limit, ErrorId error = ErrorId::unspecified) {
    if (!found && value.size() > limit) found = LimitViolation{error, field, value.size(), limit};
  }

  void credentials(const std::optional<Credentials>& c) {
    if (!c) return;
    constexpr auto failed = ErrorId::failed_credentials;
    check("UserName", c->user_name, kMaxUserNameBytes, failed);
    if (c->domain) check("Domain", c->domain->name, kMaxDomainBytes, failed);
    if (c->password && c->password->plain) check("Password", *c->password->plain, kMaxPasswordBytes, failed);
    for (const auto& id : c->ids) check("ID", id.value, kMaxIdBytes, failed);
  }

  void client(const std::string& client_name, const std::string& device_id) {
    check("ClientName", client_name, kMaxClientNameBytes);
    check("DeviceId", device_id, kMaxDeviceIdBytes);
  }

  void address(const std::optional<Address>& a) {
    if (a) check("ClientAddress", a->value, kMaxAddressBytes);
  }

  void count(std::string_view field, std::size_t entries, std::size_t limit) {
    if (!found && entries > limit) found = LimitViolation{ErrorId::unspecified, field, entries, limit, "entries"};
  }
};

}  // namespace

std::optional<LimitViolation> check_limits(const NFuseRequest& request) {
  Checker c;
  std::visit(
      [&](const auto& req) {
        using T = std::decay_t<decltype(req)>;
        // Credentials first: their violations answer failed-credentials.
        if constexpr (requires { req.credentials; }) c.credentials(req.credentials);
        if constexpr (std::is_same_v<T, RequestAppData>) {
          c.client(req.client_name, req.device_id);
          c.address(req.client_address);
          for (const auto& name : req.app_names) c.check("AppName", name, kMaxNameBytes);
          c.count("DesiredIconData", req.desired_icon_data.size(), kMaxDesiredIconData);
        } else if constexpr (std::is_same_v<T, RequestAddress>) {
          c.client(req.client_name, req.device_id);
          c.address(req.client_address);
          c.check("Name", req.name.value, kMaxNameBytes);
          c.check("SessionName/InName", req.name.session.in_name, kMaxNameBytes);
          c.check("SessionName/HostId", req.name.session.host_id.value, kMaxNameBytes);
          c.check("SessionName/SessionId", req.name.session.session_id, kMaxNameBytes);
          for (const auto& nv : req.session_settings)  // only CredentialType is kept (in the ticket)
            if (iequals(nv.name, "CredentialType")) c.check("SessionSettings/CredentialType", nv.value, kMaxNameBytes);
        } else if constexpr (std::is_same_v<T, RequestTicket>) {
          c.check("TicketTag", req.ticket_tag, kMaxNameBytes);
        } else if constexpr (std::is_same_v<T, RequestLaunchRef>) {
          c.check("TicketTag", req.ticket_tag, kMaxNameBytes);
          c.client(req.client_name, req.device_id);
        } else if constexpr (std::is_same_v<T, RequestReconnectSessionData> ||
                             std::is_base_of_v<UserSessionsRequest, T>) {
          c.client(req.client_name, req.device_id);
        }
      },
      request);
  return c.found;
}

}  // namespace xmlservice
