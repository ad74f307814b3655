#include "xmlservice/nfuse_types.hpp"

#include <algorithm>
#include <array>
#include <utility>

namespace xmlservice {

namespace {

constexpr std::array<std::pair<ErrorId, std::string_view>, 21> kErrorIds{{
    {ErrorId::unspecified, "unspecified"},
    {ErrorId::version_mismatch, "version-mismatch"},
    {ErrorId::failed_credentials, "failed-credentials"},
    {ErrorId::must_change_credentials, "must-change-credentials"},
    {ErrorId::expired_credentials, "expired-credentials"},
    {ErrorId::account_locked_out, "account-locked-out"},
    {ErrorId::account_disabled, "account-disabled"},
    {ErrorId::invalid_logon_hours, "invalid-logon-hours"},
    {ErrorId::no_server, "no-server"},
    {ErrorId::no_alt_address, "no-alt-address"},
    {ErrorId::mfserver_overloaded, "mfserver-overloaded"},
    {ErrorId::not_trusted, "not-trusted"},
    {ErrorId::not_licensed, "not-licensed"},
    {ErrorId::service_unavailable, "service-unavailable"},
    {ErrorId::ticketing_disabled, "Ticketing-Disabled"},
    {ErrorId::group_enumeration_disabled, "GroupEnumeration-Disabled"},
    {ErrorId::folder_enumeration_disabled, "FolderEnumeration-Disabled"},
    {ErrorId::no_available_workstation, "no-available-workstation"},
    {ErrorId::retry_required, "retry-required"},
    {ErrorId::connection_refused, "connection-refused"},
    {ErrorId::resource_unavailable, "resource-unavailable"},
}};

// Names of the NFuseRequest alternatives, in variant order.
constexpr std::array<std::pair<std::string_view, std::string_view>, std::variant_size_v<NFuseRequest>> kNames{{
    {"RequestCapabilities", "ResponseCapabilities"},
    {"RequestValidateCredentials", "ResponseValidateCredentials"},
    {"RequestAppData", "ResponseAppData"},
    {"RequestServerFarmData", "ResponseServerFarmData"},
    {"RequestServerData", "ResponseServerData"},
    {"RequestProtocolInfo", "ResponseProtocolInfo"},
    {"RequestAddress", "ResponseAddress"},
    {"RequestTicket", "ResponseTicket"},
    {"RequestLaunchRef", "ResponseLaunchRef"},
    {"RequestReconnectSessionData", "ResponseReconnectSessionData"},
    {"RequestDisconnectUserSessions", "ResponseDisconnectUserSessions"},
    {"RequestLogoffUserSessions", "ResponseLogoffUserSessions"},
}};

}  // namespace

std::string_view to_string(ErrorId id) {
  for (const auto& [value, text] : kErrorIds)
    if (value == id) return text;
  return "unspecified";
}

std::optional<ErrorId> error_id_from_string(std::string_view text) {
  for (const auto& [value, spelling] : kErrorIds)
    if (spelling == text) return value;
  return std::nullopt;
}

std::string_view to_string(Capability capability) {
  switch (capability) {
    case Capability::separate_credentials_validation: return "separate-credentials-validation";
    case Capability::launch_reference: return "launch-reference";
    case Capability::integrated_authentication: return "integrated-authentication";
    case Capability::rade_session_proxy: return "rade-session-proxy";
    case Capability::multi_image_icons: return "multi-image-icons";
    case Capability::user_identity: return "user-identity";
    case Capability::full_icon_data: return "full-icon-data";
    case Capability::full_icon_hash: return "full-icon-hash";
    case Capability::accepts_client_identity_for_power_off: return "accepts-client-identity-for-power-off";
    case Capability::session_sharing: return "session-sharing";
    case Capability::sid_enumeration: return "sid-enumeration";
  }
  return "unknown";
}

std::string_view to_string(ServerType type) {
  switch (type) {
    case ServerType::all: return "all";
    case ServerType::win32: return "win32";
    case ServerType::x: return "x";
    case ServerType::java: return "java";
    case ServerType::videoframe: return "videoframe";
    case ServerType::viewsoft: return "viewsoft";
    case ServerType::unknown: return "unknown";
  }
  return "unknown";
}

std::string_view to_string(ClientType type) {
  switch (type) {
    case ClientType::all: return "all";
    case ClientType::ica30: return "ica30";
    case ClientType::content: return "content";
    case ClientType::rade: return "rade";
    case ClientType::rdp: return "rdp";
    case ClientType::unknown: return "unknown";
  }
  return "unknown";
}

std::string_view to_string(AddressType type) {
  switch (type) {
    case AddressType::dot: return "dot";
    case AddressType::dot_port: return "dot-port";
    case AddressType::dns: return "dns";
    case AddressType::dns_port: return "dns-port";
    case AddressType::no_change: return "no-change";
    case AddressType::port: return "port";
    case AddressType::unspecified:
    case AddressType::unknown: return "";
  }
  return "";
}

std::string_view to_string(DomainType type) {
  switch (type) {
    case DomainType::nt: return "NT";
    case DomainType::unix_domain: return "UNIX";
    case DomainType::nds: return "NDS";
    case DomainType::unspecified:
    case DomainType::unknown: return "";
  }
  return "";
}

std::string_view to_string(IdType type) {
  switch (type) {
    case IdType::sam: return "SAM";
    case IdType::sid: return "SID";
    case IdType::upn: return "UPN";
    case IdType::unknown: return "unknown";
  }
  return "unknown";
}

std::string_view to_string(Traverse traverse) { return traverse == Traverse::onelevel ? "onelevel" : "subtree"; }

std::string_view to_string(DetailLevel level) {
  switch (level) {
    case DetailLevel::defaults: return "defaults";
    case DetailLevel::permissions: return "permissions";
    case DetailLevel::all: return "all";
    case DetailLevel::icon: return "icon";
    case DetailLevel::icon_info: return "icon-info";
    case DetailLevel::access_list: return "access-list";
    case DetailLevel::file_type: return "file-type";
    case DetailLevel::rade_offline_mode: return "rade-offline-mode";
  }
  return "defaults";
}

std::string_view to_string(IconFormat format) { return format == IconFormat::png ? "png" : "raw"; }

std::string_view to_string(LaunchRefType type) { return type == LaunchRefType::rade ? "RADE" : "ICA"; }

std::string_view to_string(SessionType type) {
  switch (type) {
    case SessionType::active: return "active";
    case SessionType::disconnected: return "disconnected";
    case SessionType::unknown: return "unknown";
  }
  return "unknown";
}

bool RequestAppData::wants(DetailLevel level) const {
  return std::find(desired_details.begin(), desired_details.end(), level) != desired_details.end();
}

std::string_view request_name(const NFuseRequest& request) { return kNames[request.index()].first; }
std::string_view response_name(const NFuseRequest& request) { return kNames[request.index()].second; }

ResponseError error_response(const NFuseRequest& request, ErrorId id) {
  return ResponseError{std::string(response_name(request)), id};
}

}  // namespace xmlservice
