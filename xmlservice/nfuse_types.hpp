// xmlservice/nfuse_types.hpp: the NFuse XML protocol as typed values.
//
// One struct per request and per response element of the dialect the broker speaks, so the
// XML service works on values and the codec (nfuse_codec.hpp) is the only place that sees XML.
// The dialect (what we accept and what we emit) is described in docs/nfuse.md; element names and
// spellings follow the captures collected in the design notes (nfuse-reference.md).
//
// Conventions:
// - All text is UTF-8, already unescaped (the codec converts ISO-8859-1 requests).
// - Text fields are trimmed of surrounding whitespace, except passwords.
// - A field the request did not carry is empty / std::nullopt / an empty vector.
// - Enumerated request values are matched case-insensitively. A filter value we do not know
//   (ServerType, ClientType, SessionType) becomes `unknown`, which matches nothing, so an unknown
//   value never widens a filter. Other unknown values are ignored or reported by the parser, as
//   the field comment says.
// - On the response side, an std::optional field that is unset is not written; an empty string
//   in a set field is written as a self-closing element (`<Folder/>`).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace xmlservice {

// The dialect version of every reply, whatever version the request declared (real brokers
// do the same). 5.1 is the WI/PNA-era dialect (XenDesktop 5.x).
inline constexpr std::string_view kDialectVersion = "5.1";

// ---------------------------------------------------------------------------------------------
// Vocabulary shared by requests and responses.

// `<ErrorId>` values, spelled exactly as real brokers do (see to_string); note the capitals of
// the three *-Disabled values.
enum class ErrorId {
  unspecified,                  // generic failure; also unknown or malformed requests
  version_mismatch,             // the request's version cannot be served
  failed_credentials,           // bad user or password (never says which), undecodable password
  must_change_credentials,      // the password was right but must be changed
  expired_credentials,          // the password was right but has expired
  account_locked_out,
  account_disabled,
  invalid_logon_hours,          // the user may not log on at this time
  no_server,                    // no server / machine available
  no_alt_address,               // no alternate address for the target
  mfserver_overloaded,          // every server is at full load
  not_trusted,                  // the front end is not trusted for this operation
  not_licensed,
  service_unavailable,          // the broker cannot process requests now
  ticketing_disabled,           // "Ticketing-Disabled"
  group_enumeration_disabled,   // "GroupEnumeration-Disabled"
  folder_enumeration_disabled,  // "FolderEnumeration-Disabled"
  no_available_workstation,     // 7.x: no desktop free
  retry_required,               // 7.x: the desktop is being prepared; the client retries
  connection_refused,           // StoreFront vocabulary (unsure for NFuse)
  resource_unavailable,         // StoreFront vocabulary (unsure for NFuse)
};
// The wire spelling: "failed-credentials", "Ticketing-Disabled", ...
std::string_view to_string(ErrorId id);
// The ErrorId of an exact wire spelling; nullopt for anything else (case matters).
std::optional<ErrorId> error_id_from_string(std::string_view text);

// `<CapabilityId>` values.
enum class Capability {
  separate_credentials_validation,
  launch_reference,
  integrated_authentication,
  rade_session_proxy,
  multi_image_icons,
  user_identity,
  full_icon_data,
  full_icon_hash,
  accepts_client_identity_for_power_off,
  session_sharing,
  sid_enumeration,
};
std::string_view to_string(Capability capability);  // "separate-credentials-validation", ...

// `<ServerType>`: all | win32 | x (UNIX), and the rarer java | videoframe | viewsoft.
enum class ServerType { all, win32, x, java, videoframe, viewsoft, unknown };
std::string_view to_string(ServerType type);  // unknown -> "unknown" (never sent by us)

// `<ClientType>`: ica30 | content | rade | rdp | all.
enum class ClientType { all, ica30, content, rade, rdp, unknown };
std::string_view to_string(ClientType type);  // unknown -> "unknown" (never sent by us)

// `addresstype` of ServerAddress, ClientAddress, SSLRelayAddress, CGPAddress.
enum class AddressType { unspecified, dot, dot_port, dns, dns_port, no_change, port, unknown };
// "dot", "dot-port", ...; "" for unspecified and unknown (the attribute is then not written).
std::string_view to_string(AddressType type);

struct Address {
  AddressType type = AddressType::unspecified;
  std::string value;  // "10.1.2.3", "host:1494", "2598", or empty (a request for a format)
};

// `<Domain type="...">`: NT | UNIX | NDS.
enum class DomainType { unspecified, nt, unix_domain, nds, unknown };
// "NT", "UNIX", "NDS"; "" for unspecified and unknown (the attribute is then not written).
std::string_view to_string(DomainType type);

struct Domain {
  std::string name;
  DomainType type = DomainType::unspecified;
};

// `<ID type="...">` of pass-through credentials and of UserIdentityInfo. An ID without a type
// attribute is the SAM form ("DOMAIN\user").
enum class IdType { sam, sid, upn, unknown };
std::string_view to_string(IdType type);  // "SAM", "SID", "UPN", "unknown"

struct UserId {
  IdType type = IdType::sam;
  std::string value;  // "DOMAIN\user", "S-1-5-21-...", "user@realm"
};

struct NameValue {
  std::string name;
  std::string value;
};

// ---------------------------------------------------------------------------------------------
// Credentials (a child of most requests).

enum class PasswordEncoding {
  cleartext,    // encoding="cleartext", or no encoding attribute
  ctx1,         // encoding="ctx1" (xmlservice/ctx1.hpp)
  unsupported,  // rsa56, rsa128 or anything else: never decoded
};

struct Password {
  PasswordEncoding encoding = PasswordEncoding::cleartext;
  std::string encoding_label;  // the encoding attribute as sent; empty when absent
  // The password in UTF-8, exactly as typed (not trimmed). nullopt when it could not be decoded
  // (ctx1 that is not valid ctx1, an unsupported encoding): the service answers
  // `failed-credentials` without consulting the directory.
  std::optional<std::string> plain;
};

// Forms seen: UserName + Password + Domain (NT logon; UserName may also be "DOMAIN\user" or a
// UPN "user@realm" with no Domain), `<AnonymousUser/>`, and pass-through / single sign-on with
// `<ID type="SAM">`, `<ID type="SID">` (repeated, the user's and their groups'), `<ID
// type="UPN">` and no password. The codec reports what was sent; deciding what is acceptable
// (and how to read the name forms) is the service's and the directory's job.
struct Credentials {
  bool anonymous = false;
  std::string user_name;
  std::optional<Password> password;
  std::optional<Domain> domain;
  std::vector<UserId> ids;  // in request order
};

// ---------------------------------------------------------------------------------------------
// Requests.

enum class Traverse { onelevel, subtree };
std::string_view to_string(Traverse traverse);  // "onelevel", "subtree"

// `<Scope traverse="subtree" type="PNFolder">folder</Scope>`.
struct Scope {
  Traverse traverse = Traverse::subtree;  // when the attribute is absent
  std::string type;                       // e.g. "PNFolder"; empty when absent
  std::string folder;                     // the text: a folder path, e.g. "$PRELAUNCH$"; empty = root
};

// `<DesiredDetails>` levels. "default" (WI 4.x) is read as `defaults`; other values are ignored.
enum class DetailLevel {
  defaults,
  permissions,
  all,
  icon,
  icon_info,
  access_list,
  file_type,
  rade_offline_mode,
};
std::string_view to_string(DetailLevel level);  // "defaults", "icon-info", ...

enum class IconFormat { raw, png };
std::string_view to_string(IconFormat format);

// `<DesiredIconData size="32" bpp="4" format="raw"/>`, also IconType and IconData attributes.
// Missing attributes take these defaults (the legacy 32x32 16-colour icon).
struct IconSpec {
  int size = 32;  // pixels: 16 | 32 | 48 | 128 | 256 seen
  int bpp = 4;    // 4 | 8 | 16 | 32 seen
  IconFormat format = IconFormat::raw;
};

struct RequestCapabilities {};

struct RequestValidateCredentials {
  std::optional<Credentials> credentials;
  bool desired_user_identity = false;  // `<DesiredInfo>user-identity</DesiredInfo>`
};

struct RequestAppData {
  std::optional<Scope> scope;
  std::vector<DetailLevel> desired_details;  // in request order, duplicates kept
  std::vector<IconSpec> desired_icon_data;
  std::vector<std::string> app_names;  // `<AppName>`: restrict the answer to these InNames
  std::vector<ServerType> server_types;
  std::vector<ClientType> client_types;
  std::optional<Credentials> credentials;  // absent in WI's second enumeration pass
  std::string client_name;
  std::string device_id;
  std::optional<Address> client_address;

  bool wants(DetailLevel level) const;
};

struct RequestServerFarmData {
  std::optional<Credentials> credentials;
};

struct RequestServerData {
  std::vector<ServerType> server_types;
  std::vector<ClientType> client_types;
  std::optional<Credentials> credentials;
};

struct RequestProtocolInfo {
  std::optional<Address> server_address;  // the address format wanted
  std::optional<Credentials> credentials;
};

// `<HostId type="ima-host-id">23363</HostId>`.
struct HostId {
  std::string type;
  std::string value;
};

// `<SessionName>`: reconnect to a known session.
struct SessionName {
  std::string in_name;
  HostId host_id;
  std::string session_id;
};

// `<Name>` of RequestAddress: exactly one of the alternatives; `none` when missing.
enum class LaunchNameKind {
  none,
  app,          // <AppName>
  server,       // <ServerName>
  server_farm,  // <ServerFarmName>
  unspecified,  // <UnspecifiedName> (PN client; a trailing '*' means a farm)
  session,      // <SessionName>
};

struct LaunchName {
  LaunchNameKind kind = LaunchNameKind::none;
  std::string value;    // the name for every kind but session and none
  SessionName session;  // kind == session
};

struct RequestAddress {
  LaunchName name;
  std::string client_name;
  std::string device_id;
  std::optional<Address> client_address;
  std::optional<Address> server_address;  // the address format the client wants back
  bool alt_addr = false;                  // <Flags>alt-addr</Flags>
  bool no_load_bias = false;              // <Flags>no-load-bias</Flags>
  std::optional<Credentials> credentials;
  std::vector<ServerType> server_types;
  std::vector<ClientType> client_types;
  std::vector<NameValue> session_settings;  // 7.x <SessionSettings> children, in order
};

struct RequestTicket {
  std::optional<Credentials> credentials;
  std::string ticket_type;  // "CtxLogon"
  std::string ticket_tag;   // from ResponseAddress
  std::optional<std::uint32_t> time_to_live;  // seconds; <TimetoLive> or <TimeToLive>
  std::string launch_ref;
  std::vector<NameValue> session_context;  // <SessionContextEntry name="...">value</...>
};

enum class LaunchRefType { ica, rade };
std::string_view to_string(LaunchRefType type);  // "ICA", "RADE"

struct RequestLaunchRef {
  LaunchRefType type = LaunchRefType::ica;  // when <LaunchRefType> is absent
  std::string ticket_tag;
  std::string client_name;
  std::string device_id;
  std::string session_sharing_key;
  std::optional<Credentials> credentials;
  std::optional<std::uint32_t> time_to_live;  // seconds
  std::vector<NameValue> session_context;
};

enum class SessionType { active, disconnected, unknown };
std::string_view to_string(SessionType type);

struct RequestReconnectSessionData {
  std::optional<Credentials> credentials;
  std::string client_name;
  std::string device_id;
  std::vector<ServerType> server_types;
  std::vector<ClientType> client_types;
  std::vector<SessionType> session_types;
  std::vector<NameValue> session_context;
};

// The common body of RequestDisconnectUserSessions and RequestLogoffUserSessions.
struct UserSessionsRequest {
  std::optional<Credentials> credentials;
  std::string client_name;
  std::string device_id;
  std::vector<ServerType> server_types;
  std::vector<ClientType> client_types;
  std::vector<NameValue> session_context;
};
struct RequestDisconnectUserSessions : UserSessionsRequest {};
struct RequestLogoffUserSessions : UserSessionsRequest {};

using NFuseRequest =
    std::variant<RequestCapabilities, RequestValidateCredentials, RequestAppData, RequestServerFarmData,
                 RequestServerData, RequestProtocolInfo, RequestAddress, RequestTicket, RequestLaunchRef,
                 RequestReconnectSessionData, RequestDisconnectUserSessions, RequestLogoffUserSessions>;

// "RequestAppData", ... and the matching "ResponseAppData", ...
std::string_view request_name(const NFuseRequest& request);
std::string_view response_name(const NFuseRequest& request);

// A request as parse_request returns it.
struct ParsedRequest {
  std::string version;         // the root's version attribute as sent (informational); may be empty
  std::string encoding_label;  // the label to answer with: the request's, "UTF-8" when it had none
  NFuseRequest request;
};

// ---------------------------------------------------------------------------------------------
// Responses.

struct ResponseCapabilities {
  std::vector<Capability> capabilities;  // written in this order
};

struct UserIdentityInfo {
  // Written in this order; a SAM entry without a type attribute (as real brokers do), the others
  // with type="SID" / type="UPN".
  std::vector<UserId> ids;
};

struct ResponseValidateCredentials {
  std::optional<UserIdentityInfo> user_identity;  // when DesiredInfo asked for user-identity
};

// `<SoundType minimum="false">none</SoundType>`, also VideoType and Encryption.
struct MinimumSetting {
  std::string value;
  bool minimum = false;
};

// WinWidth, WinHeight, WinColor, WinType, WinScale.
struct WindowSettings {
  int width = 1024;
  int height = 768;
  int color = 8;
  std::string type = "pixels";
  int scale = 1;
};

// `<AppInStartmenu value="..." root="...">folder</AppInStartmenu>`.
struct StartMenu {
  bool value = false;
  std::string root;    // attribute written when not empty
  std::string folder;  // text
};

// `<Settings appisdisabled=".." appisdesktop="..">`; children in the order of the fields.
struct AppSettings {
  bool app_is_disabled = false;
  bool app_is_desktop = false;  // true for a published desktop
  std::optional<std::string> folder = std::string();       // client folder path; empty = root
  std::optional<std::string> description = std::string();
  std::optional<WindowSettings> window;
  std::optional<MinimumSetting> sound;       // <SoundType>
  std::optional<MinimumSetting> video;       // <VideoType>
  std::optional<MinimumSetting> encryption;  // <Encryption>: basic | rc5-...
  std::optional<bool> app_on_desktop;        // <AppOnDesktop value=".."/>
  std::optional<StartMenu> app_in_start_menu;
  std::optional<std::string> publisher_name;  // the farm / site name
  std::optional<bool> ssl_enabled;
  std::optional<bool> remote_access_enabled;
};

enum class AccessKind { user, group, anonymous };

// One `<AccessList>` entry: `<User><UserName>..</UserName><Domain ..>..</Domain></User>`,
// `<Group><GroupName>..</GroupName><Domain ..>..</Domain></Group>` or `<AnonymousUser/>`.
struct AccessEntry {
  AccessKind kind = AccessKind::user;
  std::string name;
  std::optional<Domain> domain;
};

// `<FileType name=".." isdefault=".." overwrite="..">`.
struct FileTypeAssociation {
  std::string name;
  bool is_default = false;
  bool overwrite = false;
  std::vector<std::string> extensions;  // <FileExtension>.txt</FileExtension>
  std::vector<std::string> mime_types;  // <MimeType>text/plain</MimeType>
  std::string parameters;               // <Parameters>"%*"</Parameters>; written when not empty
};

// `<Details>`: children in the order of the fields.
struct AppDetails {
  std::optional<AppSettings> settings;
  std::optional<std::vector<AccessEntry>> access_list;  // only when the site exposes ACLs
  std::vector<FileTypeAssociation> file_types;
  std::optional<std::vector<IconSpec>> icon_info;  // <IconInfo><IconType .../></IconInfo>
  std::optional<std::string> icon;                 // legacy <Icon>base64</Icon>
};

// `<IconData size=".." bpp=".." format="..">base64</IconData>`.
struct IconData {
  IconSpec spec;
  std::string base64;
};

// One published application or desktop. Children are written in the order of the fields.
struct AppData {
  std::string type;     // attribute type="app" (5.8 dialect); not written when empty
  std::string in_name;  // internal (browser) name: the key of AppName filters and RequestAddress
  std::string f_name;   // friendly (display) name
  std::optional<AppDetails> details = AppDetails{};  // an empty one is written <Details/>
  std::vector<IconData> icon_data;                   // one per DesiredIconData
  std::string seq_no;                                // not written when empty
  std::optional<ServerType> server_type;
  std::optional<ClientType> client_type;
  std::optional<std::string> rade_offline_mode;  // "none"
};

// With no apps, the reply is an empty ResponseAppData (no AppDataSet), as real brokers answer.
struct ResponseAppData {
  std::optional<Scope> scope;  // the first child of AppDataSet: <Scope traverse=".."/>
  std::vector<AppData> apps;
  std::optional<std::string> rade_license_type;  // last child of AppDataSet: "online"
};

struct ResponseServerFarmData {
  std::vector<std::string> farm_names;  // one <ServerFarmData><ServerFarmName> each
};

struct ServerData {
  std::string name;
  ServerType server_type = ServerType::win32;
  ClientType client_type = ClientType::ica30;
};

struct ResponseServerData {
  std::vector<ServerData> servers;
};

struct ResponseProtocolInfo {
  Address server_address{AddressType::no_change, {}};
};

// Children in the order of the fields; unset optionals are not written.
struct ResponseAddress {
  Address server_address;  // e.g. {dot_port, "192.168.182.10:1494"}
  std::optional<ServerType> server_type;
  std::optional<std::string> connection_type;  // "tcp"
  std::optional<ClientType> client_type;
  std::string ticket_tag;  // "IMAHostId:23363"; not written when empty
  std::optional<int> farm_load_hint;
  bool disconnected_session = false;  // <DisconnectedSession/> when reconnecting
  std::optional<Address> ssl_relay_address;
  std::optional<Address> cgp_address;  // {port, "2598"}
  // 7.x single-request launch: only the names are known, the placement is a guess.
  std::optional<std::string> launch_ref;
  std::optional<std::string> session_sharing_key;
  std::optional<std::string> ticket;
};

struct ResponseTicket {
  std::string ticket;  // 30 upper-case hex characters
};

struct ResponseLaunchRef {
  std::string launch_ref;  // opaque
};

// One `<AppData type="session">` of ResponseReconnectSessionData.
struct SessionData {
  std::string in_name;
  ServerType server_type = ServerType::all;
  ClientType client_type = ClientType::ica30;
  HostId host_id;
  std::string session_id;
};

struct ResponseReconnectSessionData {
  std::vector<SessionData> sessions;  // none: an empty ResponseReconnectSessionData
};

struct ResponseDisconnectUserSessions {};
struct ResponseLogoffUserSessions {};

// The in-band error reply: `<ResponseXxx><ErrorId>...</ErrorId></ResponseXxx>` (HTTP 200).
// `element` is the response element name, "ResponseAppData"; for an unknown request it is the
// request's name with "Request" replaced by "Response" (ParseError::response_element). A name
// that is not a plain ASCII XML name is written as "ResponseError".
struct ResponseError {
  std::string element;
  ErrorId error_id = ErrorId::unspecified;
};

using NFuseResponse =
    std::variant<ResponseCapabilities, ResponseValidateCredentials, ResponseAppData, ResponseServerFarmData,
                 ResponseServerData, ResponseProtocolInfo, ResponseAddress, ResponseTicket, ResponseLaunchRef,
                 ResponseReconnectSessionData, ResponseDisconnectUserSessions, ResponseLogoffUserSessions,
                 ResponseError>;

// The error reply to `request`: its Response element holding `id`.
ResponseError error_response(const NFuseRequest& request, ErrorId id);

}  // namespace xmlservice
