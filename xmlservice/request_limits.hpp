// xmlservice/request_limits.hpp: size limits on the NFuse fields the broker keeps, logs or looks
// up (user names, domains, passwords, client names, addresses, resource and session names), so a
// request cannot make the broker store or log megabytes through one field. The body as a whole is
// bounded by the listener (body_limit_bytes); these bound each field the service uses. A request
// over a limit is answered before the directory is consulted: `failed-credentials` for the
// credentials' fields, `unspecified` for the others. The table is in docs/nfuse.md ("Field
// limits").
#pragma once

#include "xmlservice/nfuse_types.hpp"

#include <cstddef>
#include <optional>
#include <string_view>

namespace xmlservice {

// Bytes of UTF-8 (after unescaping), per field.
inline constexpr std::size_t kMaxUserNameBytes = 512;    // UserName: `user`, `DOMAIN\user` or a UPN
inline constexpr std::size_t kMaxDomainBytes = 256;      // Domain
inline constexpr std::size_t kMaxPasswordBytes = 1024;   // Password, decoded (256 UTF-16 characters fit)
inline constexpr std::size_t kMaxIdBytes = 512;          // each ID (SAM, SID, UPN) of pass-through credentials
inline constexpr std::size_t kMaxClientNameBytes = 256;  // ClientName
inline constexpr std::size_t kMaxDeviceIdBytes = 256;    // DeviceId
inline constexpr std::size_t kMaxAddressBytes = 128;     // ClientAddress
inline constexpr std::size_t kMaxNameBytes = 256;        // AppName, launch Name, SessionName parts,
                                                         // TicketTag, the CredentialType setting

// Entries, per request. Each DesiredIconData makes the reply carry one icon per resource (up to
// about 350 KB of base64 for 256x256), so their number is bounded: clients ask for one to three
// (docs/nfuse.md "Field limits"). The reply as a whole is bounded by
// XmlServiceOptions::max_icon_bytes.
inline constexpr std::size_t kMaxDesiredIconData = 8;

struct LimitViolation {
  ErrorId error = ErrorId::unspecified;  // failed_credentials for the credentials' fields
  std::string_view field;                // "UserName", "ClientName", ...
  std::size_t bytes = 0;                 // the field's size (in `unit`)
  std::size_t limit = 0;
  std::string_view unit = "bytes";       // "bytes", or "entries" for repeated elements
};

// The first field of `request` over its limit, or nullopt. Pure; any thread.
std::optional<LimitViolation> check_limits(const NFuseRequest& request);

}  // namespace xmlservice
