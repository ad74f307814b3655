// cbp/messages.hpp: the agent protocol (CBP) as typed values: one struct per message, their JSON
// text, validation, version choice and the handshake proofs.
//
// Pure: no I/O, no shared state, callable from any thread. The endpoint (broker side) and the
// reference agent (tools/vda-agent) both code against this header; docs/cbp.md is the
// specification it implements, with the rules written out for agents in other languages.
//
// Conventions for the structs below:
// - Text is UTF-8. An optional text field that is empty is absent on the wire (and an absent or
//   null member parses as empty). Optional integers use 0 for "absent" where 0 is not a valid
//   value, as their comments say.
// - Enumerated values are spelled exactly as in docs/cbp.md (case-sensitive).
// - Each message struct has `kType` (its "type" on the wire) and `kSender`.
// - parse() enforces every constraint documented here; serialize() writes what it is given, and
//   validate() says whether that is something the peer will accept.
#pragma once

#include "common/error.hpp"

#include <array>
#include <chrono>
#include <cstdint>
#include <iosfwd>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace cbp {

// ---------------------------------------------------------------------------------------------
// Transport, versions and limits (docs/cbp.md "Transport", "Limits").

// Protocol versions this build speaks, in ascending order.
inline constexpr std::array<int, 1> kProtocolVersions{1};
inline constexpr std::string_view kPath = "/cbp";  // ws://host:8081/cbp, wss:// with TLS
// Largest message in either direction (bytes of JSON text); larger ones close the connection.
inline constexpr std::size_t kMaxMessageBytes = 1 << 20;

// Handshake deadlines enforced by the broker: hello within kHelloTimeout of the challenge,
// register within kRegisterTimeout of the welcome.
inline constexpr std::chrono::seconds kHelloTimeout{10};
inline constexpr std::chrono::seconds kRegisterTimeout{10};
// How long an agent waits for challenge, welcome/rejected or registered/rejected.
inline constexpr std::chrono::seconds kAgentHandshakeTimeout{30};

// Back-off ("sin bin"): kMaxAuthFailures failed authentications (BadProof, or EnrollmentRefused
// for a catalog that takes no enrollment) for one machine name from one remote address within
// kAuthFailureWindow put that pair in back-off for kAuthBackoff. The failure that reaches the
// limit is still answered with its own reason; every later hello in the back-off is rejected with
// TooManyFailures (retry_after_seconds = kAuthBackoff) without looking at the proof.
inline constexpr int kMaxAuthFailures = 5;
inline constexpr std::chrono::seconds kAuthFailureWindow{60};
inline constexpr std::chrono::seconds kAuthBackoff{120};
// retry_after_seconds of a `rejected` Unavailable: the broker could not check the handshake
// (storage trouble); the agent retries after this long, and nothing counts as a failure.
inline constexpr std::chrono::seconds kUnavailableRetryAfter{10};

// Field limits (bytes of UTF-8 unless noted). parse() refuses anything beyond them.
inline constexpr std::size_t kMaxIdBytes = 64;                  // command ids, redeem ids, reply_to
inline constexpr std::size_t kMaxKeyBytes = 128;                // session_key
inline constexpr std::size_t kMaxNameBytes = 256;               // machine, user, catalog, os, ticket, ...
inline constexpr std::size_t kMaxTokenBytes = 64;               // capability, credential_type, command
inline constexpr std::size_t kMaxTextBytes = 4096;              // messages, error texts, command lines
inline constexpr std::size_t kMaxCredentialValueBytes = 65536;  // one credential_data value
inline constexpr std::size_t kMaxVersions = 16;                 // entries in a versions list
inline constexpr std::size_t kMaxCapabilities = 64;
inline constexpr std::size_t kMaxSessions = 10000;  // sessions in one register
inline constexpr std::size_t kMaxCredentialMembers = 32;
inline constexpr int kMaxVersion = 65535;             // versions are 1..kMaxVersion
inline constexpr std::int64_t kMaxLoadIndex = 10000;  // load_index is 0..10000 (10000: full)
inline constexpr std::int64_t kMaxSessionCount = 1000000;
inline constexpr std::int64_t kMinHeartbeatSeconds = 5, kMaxHeartbeatSeconds = 86400;
inline constexpr std::int64_t kMaxMissedHeartbeats = 100;      // 1..100
inline constexpr std::int64_t kMaxCommandTimeoutMs = 3600000;  // timeout_ms is 1..1 h
inline constexpr std::int64_t kMaxConnectTimeoutSeconds = 86400;
inline constexpr std::int64_t kMaxRetryAfterSeconds = 86400;

// Well-known capability strings (register.capabilities). The broker sends a command only to an
// agent that listed its name.
inline constexpr std::string_view kCapPrepareSession = "prepare_session";
inline constexpr std::string_view kCapLogoffSession = "logoff_session";
inline constexpr std::string_view kCapDisconnectSession = "disconnect_session";
inline constexpr std::string_view kCapSendMessage = "send_message";

// ---------------------------------------------------------------------------------------------
// Enumerations. to_string gives the wire spelling; from_string<E> parses it (exact match).

// Why a registration was refused or ended: the deregistration reasons of the site model
// (machine.last_deregistration_reason) with their Citrix numeric codes, plus openbroker's own
// (codes 900+). Spellings and codes: see to_string and reason_code, and docs/cbp.md.
enum class Reason {
  agent_shutdown,                              // 0 AgentShutdown
  agent_suspended,                             // 1 AgentSuspended
  agent_requested,                             // 2 AgentRequested
  incompatible_version,                        // 100 IncompatibleVersion
  agent_address_resolution_failed,             // 101
  agent_not_contactable,                       // 102
  agent_wrong_active_directory_ou,             // 103
  empty_registration_request,                  // 104
  missing_registration_capabilities,           // 105
  missing_agent_version,                       // 106
  inconsistent_registration_capabilities,      // 107
  not_licensed_for_feature,                    // 108
  unsupported_credential_security_version,     // 109
  invalid_registration_request,                // 110
  single_multi_session_mismatch,               // 111
  functional_level_too_low_for_catalog,        // 112
  functional_level_too_low_for_desktop_group,  // 113
  os_not_compatible_with_ddc,                  // 114
  vm_not_compatible_with_ddc,                  // 115
  power_off,                                   // 200
  desktop_restart,                             // 201
  desktop_removed,                             // 202
  agent_rejected_settings_update,              // 203
  send_settings_failure,                       // 204
  session_audit_failure,                       // 205
  session_prepare_failure,                     // 206
  contact_lost,                                // 207
  settings_creation_failure,                   // 208
  unknown_error,                               // 300 (also: a reason name the receiver does not know)
  broker_registration_limit_reached,           // 301
  registration_state_mismatch,                 // 302
  none,                                        // 400
  hypervisor_reported_failure,                 // 401
  hypervisor_rate_limit_exceeded,              // 402
  hard_registration_pending,                   // 1000
  soft_registered,                             // 1001
  unknown,                                     // 1002
  // openbroker's own
  unknown_machine,     // 900 UnknownMachine: register names a machine that no longer exists (a hello
                       //     for an unknown machine gets BadProof: docs/cbp.md "Information given away")
  bad_proof,           // 901 BadProof: the proof does not verify (also: unknown machine, no secret yet)
  too_many_failures,   // 902 TooManyFailures: in back-off after repeated failures
  enrollment_refused,  // 903 EnrollmentRefused: no such catalog, no enrollment key, or not allowed
  protocol_error,      // 904 ProtocolError: malformed JSON, unknown type, invalid or unexpected message
  timeout,             // 905 Timeout: a handshake step did not arrive in time
  superseded,          // 906 Superseded: a newer connection registered the same machine
  broker_shutdown,     // 907 BrokerShutdown: the broker is stopping
  unavailable,         // 908 Unavailable: the broker cannot complete the handshake now (storage
                       //     trouble); retry after retry_after_seconds. Not an authentication failure
};

enum class SessionSupport { single_session, multi_session };  // "SingleSession", "MultiSession"

// State of a session reported in register.sessions.
enum class SessionState {
  preparing,     // "PreparingNewSession": prepared by prepare_session, no client yet
  connected,     // "Connected": a client is connected, logon in progress
  active,        // "Active": a user is logged on and connected
  disconnected,  // "Disconnected": logged on, no client
};

// session_event.event.
enum class SessionEventKind {
  connected,     // "Connected"
  active,        // "Active"
  disconnected,  // "Disconnected"
  reconnected,   // "Reconnected"
  logged_off,    // "LoggedOff": the session ended (also: a preparation dropped unused)
};

enum class DisplayProtocol { hdx, rdp, console };  // "HDX", "RDP", "Console"
enum class SessionType { desktop, application };   // "Desktop", "Application"

// Why a redeem_ticket failed (ticket.reason).
enum class TicketFailure {
  not_found,         // "NotFound": no such ticket
  expired,           // "Expired": past its lifetime
  already_redeemed,  // "AlreadyRedeemed": tickets are good once
  wrong_machine,     // "WrongMachine": issued for another machine
  refused,           // "Refused": any other reason (also: a name the receiver does not know)
};

std::string_view to_string(Reason r);
std::string_view to_string(SessionSupport s);
std::string_view to_string(SessionState s);
std::string_view to_string(SessionEventKind e);
std::string_view to_string(DisplayProtocol p);
std::string_view to_string(SessionType t);
std::string_view to_string(TicketFailure f);

// Exact wire spelling -> value; nullopt for anything else.
template <class E>
std::optional<E> from_string(std::string_view name);
template <>
std::optional<Reason> from_string<Reason>(std::string_view name);
template <>
std::optional<SessionSupport> from_string<SessionSupport>(std::string_view name);
template <>
std::optional<SessionState> from_string<SessionState>(std::string_view name);
template <>
std::optional<SessionEventKind> from_string<SessionEventKind>(std::string_view name);
template <>
std::optional<DisplayProtocol> from_string<DisplayProtocol>(std::string_view name);
template <>
std::optional<SessionType> from_string<SessionType>(std::string_view name);
template <>
std::optional<TicketFailure> from_string<TicketFailure>(std::string_view name);

// The numeric code of a reason (section 1.6 of the site-model reference; 900+ for ours).
int reason_code(Reason r);
std::optional<Reason> reason_from_code(int code);
// Every reason, in code order.
std::span<const Reason> all_reasons();

// ---------------------------------------------------------------------------------------------
// Messages. Sender: who may send it; the other side treats it as a protocol error otherwise.

enum class Sender { broker, agent, either };

// broker -> agent, first message on every connection.
struct Challenge {
  static constexpr std::string_view kType = "challenge";
  static constexpr Sender kSender = Sender::broker;
  std::string nonce;          // 64 lower-case hex digits (32 random bytes), fresh per connection
  std::vector<int> versions;  // protocol versions the broker speaks, 1..kMaxVersions entries
  std::string broker;         // optional product string, "openbroker/0.1.0"
  bool operator==(const Challenge&) const = default;
};

// agent -> broker, answer to the challenge.
struct Hello {
  static constexpr std::string_view kType = "hello";
  static constexpr Sender kSender = Sender::agent;
  std::string machine;        // machine name as the site knows it ("DEMO\\pool-1"), 1..256 bytes
  std::vector<int> versions;  // protocol versions the agent speaks, 1..kMaxVersions entries
  std::string agent_version;  // required, 1..256 bytes (missing: MissingAgentVersion)
  std::string proof;          // compute_proof(...), 64 lower-case hex digits
  std::string agent_nonce;    // 64 lower-case hex digits, fresh per connection (for broker_proof)
  bool enroll = false;        // first contact with a catalog enrollment key
  std::string catalog;        // required with enroll (1..256 bytes), not sent without
  bool operator==(const Hello&) const = default;
};

// broker -> agent: the proof verified and a version was chosen.
struct Welcome {
  static constexpr std::string_view kType = "welcome";
  static constexpr Sender kSender = Sender::broker;
  int version = 0;                               // the chosen protocol version
  std::int64_t heartbeat_interval_seconds = 60;  // 5..86400
  std::int64_t missed_heartbeats = 3;            // 1..100
  std::string broker_proof;                      // compute_broker_proof(...), 64 hex digits
  std::string machine_secret;                    // only after enrollment: the new secret (once)
  bool operator==(const Welcome&) const = default;
};

// broker -> agent during the handshake (instead of welcome or registered); the broker closes.
struct Rejected {
  static constexpr std::string_view kType = "rejected";
  static constexpr Sender kSender = Sender::broker;
  Reason reason = Reason::invalid_registration_request;  // unknown names parse as unknown_error
  std::string message;                                   // optional, for people, 0..4096 bytes
  std::int64_t retry_after_seconds = 0;                  // optional (0: absent), 1..86400; set with TooManyFailures
                                                         // and Unavailable
  bool operator==(const Rejected&) const = default;
};

// What a session is; in register.sessions and session_event.
struct SessionInfo {
  std::string session_key;                          // 1..128 printable ASCII (0x21..0x7E), unique on the machine
  std::string user;                                 // "DOMAIN\\user" or UPN; may be empty before logon (0..256)
  std::string client_name;                          // optional (0..256)
  std::string client_address;                       // optional (0..256)
  DisplayProtocol protocol = DisplayProtocol::hdx;  // optional on the wire, default HDX
  std::string application;                          // optional: published application name (empty: desktop session)
  bool operator==(const SessionInfo&) const = default;
};

// One element of register.sessions (on the wire: the SessionInfo members plus "state").
struct SessionReport {
  SessionState state = SessionState::active;
  SessionInfo session;
  bool operator==(const SessionReport&) const = default;
};

// agent -> broker, after welcome.
struct Register {
  static constexpr std::string_view kType = "register";
  static constexpr Sender kSender = Sender::agent;
  std::string os;                                                   // required, 1..256 bytes ("Windows 11 Enterprise")
  SessionSupport session_support = SessionSupport::single_session;  // required
  std::string address;                                              // required "host:port" users connect to
  std::string dns_name;                                             // optional DNS name of the machine
  std::vector<std::string> capabilities;                            // required (may be empty), tokens, <= 64 entries
  std::int64_t load_index = 0;                                      // required, 0..10000
  std::vector<SessionReport> sessions;                              // required (may be empty), <= kMaxSessions
  bool operator==(const Register&) const = default;
};

// broker -> agent: registration complete; heartbeats, events and commands may flow.
struct Registered {
  static constexpr std::string_view kType = "registered";
  static constexpr Sender kSender = Sender::broker;
  bool operator==(const Registered&) const = default;
};

// agent -> broker, every heartbeat_interval_seconds. No reply.
struct Heartbeat {
  static constexpr std::string_view kType = "heartbeat";
  static constexpr Sender kSender = Sender::agent;
  std::int64_t load_index = 0;     // 0..10000
  std::int64_t session_count = 0;  // 0..1000000: prepared plus established sessions
  bool operator==(const Heartbeat&) const = default;
};

// agent -> broker when a session changes. No reply.
struct SessionEvent {
  static constexpr std::string_view kType = "session_event";
  static constexpr Sender kSender = Sender::agent;
  SessionEventKind event = SessionEventKind::connected;
  SessionInfo session;
  bool operator==(const SessionEvent&) const = default;
};

// Arguments of each command (command.args).
struct PrepareSessionArgs {
  static constexpr std::string_view kName = "prepare_session";
  std::string user;                                 // required, 1..256 ("DOMAIN\\alice")
  std::string resource;                             // required: desktop or application name, 1..256
  SessionType session_type = SessionType::desktop;  // optional, default Desktop
  std::string ticket_ref;                           // required: the logon ticket the client presents
  std::string session_key;                          // required: key the agent uses for the session
  std::int64_t connect_timeout_seconds = 0;         // required, 1..86400: the client connects by then
  std::string client_name;                          // optional
  std::string client_address;                       // optional
  std::string command_line_executable;              // optional (applications), 0..4096
  std::string command_line_arguments;               // optional (applications), 0..4096
  std::string working_directory;                    // optional (applications), 0..4096
  bool operator==(const PrepareSessionArgs&) const = default;
};
struct LogoffSessionArgs {
  static constexpr std::string_view kName = "logoff_session";
  std::string session_key;  // required
  bool operator==(const LogoffSessionArgs&) const = default;
};
struct DisconnectSessionArgs {
  static constexpr std::string_view kName = "disconnect_session";
  std::string session_key;  // required
  bool operator==(const DisconnectSessionArgs&) const = default;
};
struct SendMessageArgs {
  static constexpr std::string_view kName = "send_message";
  std::string session_key;  // exactly one of session_key and all
  bool all = false;         // every session on the machine
  std::string title;        // optional, 0..256
  std::string text;         // required, 1..4096 (may span lines)
  bool operator==(const SendMessageArgs&) const = default;
};
// A command name this build does not know (a newer broker): the agent answers
// command_result{ok: false, error: "unsupported command"}. Its args are not kept.
struct UnknownCommandArgs {
  std::string name;  // a token, 1..64 bytes
  bool operator==(const UnknownCommandArgs&) const = default;
};
using CommandArgs =
    std::variant<PrepareSessionArgs, LogoffSessionArgs, DisconnectSessionArgs, SendMessageArgs, UnknownCommandArgs>;
// The wire name of the command ("prepare_session", or UnknownCommandArgs::name).
std::string_view command_name(const CommandArgs& args);

// broker -> agent, after registered. Reply: command_result within timeout_ms.
struct Command {
  static constexpr std::string_view kType = "command";
  static constexpr Sender kSender = Sender::broker;
  std::string id;               // 1..64 printable ASCII, unique per connection
  std::int64_t timeout_ms = 0;  // 1..3600000: the broker fails the command after this
  CommandArgs args;
  bool operator==(const Command&) const = default;
};

// agent -> broker, the reply to a command.
struct CommandResult {
  static constexpr std::string_view kType = "command_result";
  static constexpr Sender kSender = Sender::agent;
  std::string reply_to;  // the command's id
  bool ok = false;
  std::string error;  // optional (with ok false), 0..4096
  bool operator==(const CommandResult&) const = default;
};

// agent -> broker: a client presented a logon ticket. Reply: ticket.
struct RedeemTicket {
  static constexpr std::string_view kType = "redeem_ticket";
  static constexpr Sender kSender = Sender::agent;
  std::string id;           // 1..64 printable ASCII, chosen by the agent
  std::string ticket;       // 1..256 printable ASCII
  std::string session_key;  // optional: the prepared session the client connected to
  bool operator==(const RedeemTicket&) const = default;
};

// broker -> agent, the reply to redeem_ticket.
struct Ticket {
  static constexpr std::string_view kType = "ticket";
  static constexpr Sender kSender = Sender::broker;
  std::string reply_to;  // the redeem_ticket's id
  bool ok = false;
  // ok: the user's identity and credential (all required but session_key and credential_data).
  std::string user;                                    // 1..256
  std::string credential_type;                         // token: "password", "smartcard", "assertion" or a plugin name
  std::map<std::string, std::string> credential_data;  // string members; secret: never log it
  std::string session_key;                             // optional: the launch the ticket was issued for
  // !ok: why (required), and a text for people.
  TicketFailure reason = TicketFailure::refused;
  std::string message;
  bool operator==(const Ticket&) const = default;
};

// agent -> broker before a graceful close. No reply.
struct Goodbye {
  static constexpr std::string_view kType = "goodbye";
  static constexpr Sender kSender = Sender::agent;
  Reason reason = Reason::agent_shutdown;  // AgentShutdown, AgentSuspended or AgentRequested only
  std::string message;                     // optional
  bool operator==(const Goodbye&) const = default;
};

// Either side, right before it closes the connection for a reason other than goodbye.
struct ErrorMessage {
  static constexpr std::string_view kType = "error";
  static constexpr Sender kSender = Sender::either;
  Reason reason = Reason::protocol_error;  // unknown names parse as unknown_error
  std::string message;                     // optional
  bool operator==(const ErrorMessage&) const = default;
};

using Message = std::variant<Challenge, Hello, Welcome, Rejected, Register, Registered, Heartbeat, SessionEvent,
                             Command, CommandResult, RedeemTicket, Ticket, Goodbye, ErrorMessage>;

std::string_view type_name(const Message& m);  // the "type" on the wire
Sender sender_of(const Message& m);

// ---------------------------------------------------------------------------------------------
// JSON text.

// Parses one message. Never throws (std::bad_alloc included: it becomes errc::internal).
// Errors are errc::invalid_argument with `field` the JSON path of the offending member
// ("type", "sessions[2].session_key", "args.user"; empty for the message as a whole) and
// `message` what is wrong ("is required", "must be an integer", "must be 0..10000", ...).
// Rejected: more than kMaxMessageBytes, malformed JSON or invalid UTF-8, not an object, nesting
// deeper than 32, an unknown type, a missing required member, a member of the wrong JSON type,
// a value out of range or badly spelled. Unknown members are ignored; null is the same as absent;
// a repeated member: the last one counts. Integers must be JSON integers (no fraction/exponent).
common::Result<Message> parse(std::string_view text);

// Compact JSON text, "type" first; optional members left out when absent. Does not validate.
std::string serialize(const Message& m);

// Whether `m` satisfies every constraint parse() checks (serializes and parses it again).
common::Status validate(const Message& m);

// One line for logs: the type and the identifying fields, with secrets (proofs, nonces,
// machine_secret, tickets, credential_data, ticket_ref) redacted.
std::string describe(const Message& m);
// Writes describe(m) (for logs and test failure messages).
std::ostream& operator<<(std::ostream& os, const Message& m);

// The reason for `rejected` when a hello or register failed to parse with `parse_error`:
// MissingAgentVersion, MissingRegistrationCapabilities, EmptyRegistrationRequest where they fit,
// else InvalidRegistrationRequest.
Reason rejection_reason(const common::Error& parse_error);

// The reason for `rejected` when `text`, received during the handshake while the broker waits for
// a message of type `expected` ("hello" or "register"), failed to parse with `parse_error`
// (docs/cbp.md "Protocol errors during the handshake"): rejection_reason(parse_error) when `text`
// is a message of type `expected` with a bad member; ProtocolError for anything else (not JSON,
// not an object, no or an unknown type, a message of another type).
Reason handshake_rejection_reason(std::string_view expected, std::string_view text, const common::Error& parse_error);

// ---------------------------------------------------------------------------------------------
// Versions and proofs (docs/cbp.md "Handshake").

// The highest version in both lists; nullopt when none is.
std::optional<int> choose_version(std::span<const int> ours, std::span<const int> theirs);

// The verifier the broker stores for a secret: lower-case hex SHA-256 of its text. This is
// machine.secret_hash for a machine secret and catalog.enrollment_key_hash for an enrollment key,
// and the (ASCII) HMAC key of both proofs.
std::string secret_hash(std::string_view secret);

// 64 lower-case hex digits from 32 random bytes: challenge nonces, agent nonces, machine secrets.
std::string make_nonce();
std::string make_machine_secret();

// hello.proof: lower-case hex HMAC-SHA256(key_hex, nonce "\n" machine "\n" versions), versions
// in decimal joined by "," in the order the hello lists them.
std::string compute_proof(std::string_view key_hex, std::string_view nonce, std::string_view machine,
                          std::span<const int> versions);
// welcome.broker_proof: HMAC-SHA256(key_hex, "broker\n" agent_nonce "\n" nonce "\n" machine "\n" version).
std::string compute_broker_proof(std::string_view key_hex, std::string_view agent_nonce, std::string_view nonce,
                                 std::string_view machine, int version);
// Constant-time checks of a received proof.
bool verify_proof(std::string_view key_hex, std::string_view nonce, std::string_view machine,
                  std::span<const int> versions, std::string_view proof);
bool verify_broker_proof(std::string_view key_hex, std::string_view agent_nonce, std::string_view nonce,
                         std::string_view machine, int version, std::string_view proof);

// Syntax checks shared with the endpoint and the agent's configuration.
bool is_host_port(std::string_view address);  // "10.0.0.5:1494", "[2001:db8::5]:1494", "vm1.example.test:3389"
bool is_hex64(std::string_view text);         // exactly 64 lower-case hex digits

}  // namespace cbp
