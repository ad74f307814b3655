// Tests of the CBP codec: every message round-trips, hostile and wrong input gets a clear error
// naming the field, proofs match known answers (also quoted in docs/cbp.md), versions and reason
// codes follow the specification.
#include "cbp/messages.hpp"

#include "common/crypto.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

using namespace cbp;

namespace {

const std::string kNonce = "0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0";
const std::string kAgentNonce = "a0b1c2d3e4f5061728394a5b6c7d8e9fa0b1c2d3e4f5061728394a5b6c7d8e9f";
const std::string kHex = "c72c1f3519c8c5782eab5333da36f4a2e2709f42916ef76c51124a2f9bd77411";

SessionInfo sample_session(std::string key) {
  SessionInfo s;
  s.session_key = std::move(key);
  s.user = "DEMO\\alice";
  s.client_name = "LAPTOP-ALICE";
  s.client_address = "192.0.2.10";
  s.protocol = DisplayProtocol::rdp;
  s.application = "Notepad";
  return s;
}

// One fully populated value of every message type (and every command).
std::vector<Message> samples() {
  std::vector<Message> out;
  out.push_back(Challenge{kNonce, {1, 2}, "openbroker/0.1.0"});
  out.push_back(Hello{"DEMO\\pool-1", {1}, "vda-agent/0.1.0", kHex, kAgentNonce, false, ""});
  out.push_back(Hello{"DEMO\\new-7", {1, 2}, "vda-agent/0.1.0", kHex, kAgentNonce, true, "Pool Catalog"});
  out.push_back(Welcome{1, 60, 3, kHex, ""});
  out.push_back(Welcome{1, 5, 100, kHex, std::string(64, 'a')});
  out.push_back(Rejected{Reason::too_many_failures, "try later\nplease", 120});
  out.push_back(Rejected{Reason::single_multi_session_mismatch, "", 0});
  Register reg;
  reg.os = "Windows 11 Enterprise";
  reg.session_support = SessionSupport::multi_session;
  reg.address = "10.0.0.5:1494";
  reg.dns_name = "pool-1.demo.test";
  reg.capabilities = {"prepare_session", "logoff_session", "disconnect_session", "send_message"};
  reg.load_index = 2500;
  reg.sessions = {{SessionState::active, sample_session("s-1")},
                  {SessionState::preparing, SessionInfo{"s-2", "DEMO\\bob", "", "", DisplayProtocol::hdx, ""}},
                  {SessionState::disconnected, sample_session("rdp#3")}};
  out.push_back(reg);
  out.push_back(Register{"Linux", SessionSupport::single_session, "[2001:db8::5]:3389", "", {}, 0, {}});
  out.push_back(Registered{});
  out.push_back(Heartbeat{10000, 7});
  for (auto e : {SessionEventKind::connected, SessionEventKind::active, SessionEventKind::disconnected,
                 SessionEventKind::reconnected, SessionEventKind::logged_off})
    out.push_back(SessionEvent{e, sample_session("s-1")});
  PrepareSessionArgs prep;
  prep.user = "DEMO\\alice";
  prep.resource = "Notepad";
  prep.session_type = SessionType::application;
  prep.ticket_ref = "0123456789ABCDEF0123456789ABCD";
  prep.session_key = "s-42";
  prep.connect_timeout_seconds = 200;
  prep.client_name = "LAPTOP-ALICE";
  prep.client_address = "192.0.2.10";
  prep.command_line_executable = "C:\\Windows\\notepad.exe";
  prep.command_line_arguments = "\"C:\\My Files\\a.txt\"";
  prep.working_directory = "C:\\Users\\alice";
  out.push_back(Command{"c1", 30000, prep});
  out.push_back(Command{"c2", 1, LogoffSessionArgs{"s-42"}});
  out.push_back(Command{"c3", 3600000, DisconnectSessionArgs{"s-42"}});
  out.push_back(Command{"c4", 5000, SendMessageArgs{"s-42", false, "Maintenance", "Back at 6.\nSave your work."}});
  out.push_back(Command{"c5", 5000, SendMessageArgs{"", true, "", "Hello all"}});
  out.push_back(Command{"c6", 5000, UnknownCommandArgs{"future_command"}});
  out.push_back(CommandResult{"c1", true, ""});
  out.push_back(CommandResult{"c2", false, "no such session"});
  out.push_back(RedeemTicket{"r1", "0123456789ABCDEF0123456789ABCD", "s-42"});
  out.push_back(RedeemTicket{"r2", "T", ""});
  Ticket t;
  t.reply_to = "r1";
  t.ok = true;
  t.user = "DEMO\\alice";
  t.credential_type = "password";
  t.credential_data = {{"domain", "DEMO"}, {"user", "alice"}, {"password", "p\u00e4ss \"w\"\n"}};
  t.session_key = "s-42";
  out.push_back(t);
  Ticket bad;
  bad.reply_to = "r2";
  bad.ok = false;
  bad.reason = TicketFailure::already_redeemed;
  bad.message = "the ticket was redeemed at 10:42";
  out.push_back(bad);
  out.push_back(Goodbye{Reason::agent_shutdown, "service stopping"});
  out.push_back(Goodbye{Reason::agent_suspended, ""});
  out.push_back(Goodbye{Reason::agent_requested, ""});
  out.push_back(ErrorMessage{Reason::protocol_error, "unknown message type 'x'"});
  out.push_back(ErrorMessage{Reason::superseded, ""});
  return out;
}

// The error of parsing `text` (fails the test when it parses).
common::Error error_of(const std::string& text) {
  auto r = parse(text);
  REQUIRE_MESSAGE(!r, "parsed unexpectedly: " << text);
  CHECK(r.error().code == common::errc::invalid_argument);
  return r.error();
}

void check_error(const std::string& text, const std::string& field, const std::string& message_part) {
  const auto e = error_of(text);
  CHECK_MESSAGE(e.field == field, text << " -> " << e.describe());
  CHECK_MESSAGE(e.message.find(message_part) != std::string::npos, text << " -> " << e.describe());
}

const std::string kGoodHello = R"({"type":"hello","machine":"DEMO\\pool-1","versions":[1],"agent_version":"1.0",)"
                               R"("proof":")" +
                               kHex + R"(","agent_nonce":")" + kAgentNonce + R"("})";

}  // namespace

TEST_CASE("every message type round-trips through JSON") {
  std::vector<std::string_view> types_seen;
  for (const Message& m : samples()) {
    const std::string text = serialize(m);
    CAPTURE(text);
    auto back = parse(text);
    REQUIRE_MESSAGE(back, back.error().describe());
    CHECK(*back == m);
    CHECK(serialize(*back) == text);
    CHECK(validate(m));
    CHECK(text.rfind(R"({"type":")" + std::string(type_name(m)) + "\"", 0) == 0);  // type first
    types_seen.push_back(type_name(m));
  }
  for (std::string_view t :
       {"challenge", "hello", "welcome", "rejected", "register", "registered", "heartbeat", "session_event", "command",
        "command_result", "redeem_ticket", "ticket", "goodbye", "error"})
    CHECK_MESSAGE(std::find(types_seen.begin(), types_seen.end(), t) != types_seen.end(), t);
}

TEST_CASE("wire form of some messages") {
  CHECK(serialize(Heartbeat{120, 2}) == R"({"type":"heartbeat","load_index":120,"session_count":2})");
  CHECK(serialize(Registered{}) == R"({"type":"registered"})");
  CHECK(serialize(Command{"c9", 15000, LogoffSessionArgs{"s-1"}}) ==
        R"({"type":"command","id":"c9","command":"logoff_session","timeout_ms":15000,"args":{"session_key":"s-1"}})");
  CHECK(serialize(Rejected{Reason::bad_proof, "", 0}) == R"({"type":"rejected","reason":"BadProof"})");
  CHECK(serialize(Goodbye{Reason::agent_shutdown, ""}) == R"({"type":"goodbye","reason":"AgentShutdown"})");
}

TEST_CASE("type names and senders") {
  CHECK(type_name(Message(SessionEvent{})) == "session_event");
  CHECK(sender_of(Message(Challenge{})) == Sender::broker);
  CHECK(sender_of(Message(Hello{})) == Sender::agent);
  CHECK(sender_of(Message(Ticket{})) == Sender::broker);
  CHECK(sender_of(Message(RedeemTicket{})) == Sender::agent);
  CHECK(sender_of(Message(ErrorMessage{})) == Sender::either);
  CHECK(command_name(CommandArgs(SendMessageArgs{})) == "send_message");
  CHECK(command_name(CommandArgs(UnknownCommandArgs{"x_y"})) == "x_y");
}

TEST_CASE("unknown members are ignored, null is absent, whitespace is fine") {
  auto m = parse(R"( { "type" : "heartbeat", "load_index": 5, "session_count": 0, "future": {"a":[1,2,3]},
                       "another": null } )");
  REQUIRE(m);
  CHECK(std::get<Heartbeat>(*m) == Heartbeat{5, 0});

  auto r = parse(R"({"type":"rejected","reason":"BadProof","message":null,"retry_after_seconds":null,"x":1})");
  REQUIRE(r);
  CHECK(std::get<Rejected>(*r) == Rejected{Reason::bad_proof, "", 0});

  // Unknown members inside nested objects too.
  auto e = parse(R"({"type":"session_event","event":"Active","session":{"session_key":"k","color":"blue"}})");
  REQUIRE(e);
  CHECK(std::get<SessionEvent>(*e).session.session_key == "k");
  CHECK(std::get<SessionEvent>(*e).session.protocol == DisplayProtocol::hdx);  // default

  // catalog without enroll is ignored.
  auto h = parse(kGoodHello.substr(0, kGoodHello.size() - 1) + R"(,"catalog":"X"})");
  REQUIRE(h);
  CHECK(std::get<Hello>(*h).catalog.empty());
  CHECK(!std::get<Hello>(*h).enroll);
}

TEST_CASE("forward compatibility: unknown reasons and commands") {
  auto r = parse(R"({"type":"rejected","reason":"SomethingNew","message":"m"})");
  REQUIRE(r);
  CHECK(std::get<Rejected>(*r).reason == Reason::unknown_error);
  auto e = parse(R"({"type":"error","reason":"SomethingNew"})");
  REQUIRE(e);
  CHECK(std::get<ErrorMessage>(*e).reason == Reason::unknown_error);
  auto t = parse(R"({"type":"ticket","reply_to":"r","ok":false,"reason":"Whatever"})");
  REQUIRE(t);
  CHECK(std::get<Ticket>(*t).reason == TicketFailure::refused);
  auto c = parse(R"({"type":"command","id":"c1","command":"reboot_machine","timeout_ms":10,"args":{"in":5}})");
  REQUIRE(c);
  const auto& cmd = std::get<Command>(*c);
  CHECK(std::get<UnknownCommandArgs>(cmd.args).name == "reboot_machine");
  CHECK(command_name(cmd.args) == "reboot_machine");
}

TEST_CASE("malformed JSON, non-objects and unknown types are errors") {
  check_error("", "", "malformed JSON");
  check_error("{", "", "malformed JSON");
  check_error(R"({"type":"heartbeat",})", "", "malformed JSON");  // no trailing commas
  check_error(R"({"type":"heartbeat"} x)", "", "malformed JSON");
  check_error(R"({"type":"heartbeat"} {"type":"heartbeat"})", "", "malformed JSON");
  check_error("/* c */ {\"type\":\"registered\"}", "", "malformed JSON");  // no comments
  check_error("[1,2]", "", "must be a JSON object");
  check_error("\"hello\"", "", "must be a JSON object");
  check_error("null", "", "must be a JSON object");
  check_error("{}", "type", "is required");
  check_error(R"({"type":7})", "type", "must be a string");
  check_error(R"({"type":"Heartbeat"})", "type", "unknown message type 'Heartbeat'");
  check_error(R"({"type":"bogus\u0001"})", "type", "'bogus\\x01'");
  // Invalid UTF-8.
  check_error("{\"type\":\"registered\",\"x\":\"\xff\xfe\"}", "", "malformed JSON");
  // Nesting beyond 32.
  check_error(R"({"type":"registered","x":)" + std::string(40, '[') + std::string(40, ']') + "}", "", "malformed JSON");
  // Too big.
  std::string big = R"({"type":"registered","pad":")" + std::string(kMaxMessageBytes, 'a') + "\"}";
  check_error(big, "", "the limit is 1048576");
}

TEST_CASE("wrong member types name the member") {
  check_error(R"({"type":"heartbeat","load_index":"5","session_count":0})", "load_index", "must be an integer");
  check_error(R"({"type":"heartbeat","load_index":5.0,"session_count":0})", "load_index", "must be an integer");
  check_error(R"({"type":"heartbeat","load_index":5e2,"session_count":0})", "load_index", "must be an integer");
  check_error(R"({"type":"heartbeat","load_index":true,"session_count":0})", "load_index", "must be an integer");
  check_error(R"({"type":"heartbeat","load_index":1})", "session_count", "is required");
  check_error(R"({"type":"command_result","reply_to":"c1","ok":"yes"})", "ok", "must be true or false");
  check_error(R"({"type":"command_result","reply_to":1,"ok":true})", "reply_to", "must be a string");
  check_error(R"({"type":"session_event","event":"Active","session":[]})", "session", "must be an object");
  check_error(R"({"type":"session_event","event":"Active"})", "session", "is required");
  check_error(R"({"type":"session_event","event":"Active","session":{"session_key":5}})", "session.session_key",
              "must be a string");
  check_error(R"({"type":"challenge","nonce":")" + kNonce + R"(","versions":1})", "versions", "must be an array");
  check_error(R"({"type":"challenge","nonce":")" + kNonce + R"(","versions":[1,"2"]})", "versions[1]",
              "must be an integer");
  check_error(R"({"type":"command","id":"c","command":"logoff_session","timeout_ms":5,"args":"x"})", "args",
              "must be an object");
  check_error(R"({"type":"command","id":"c","command":"logoff_session","timeout_ms":5})", "args.session_key",
              "is required");
}

TEST_CASE("out-of-range and badly spelled values") {
  check_error(R"({"type":"heartbeat","load_index":10001,"session_count":0})", "load_index", "must be 0..10000");
  check_error(R"({"type":"heartbeat","load_index":-1,"session_count":0})", "load_index", "must be 0..10000");
  check_error(R"({"type":"heartbeat","load_index":18446744073709551615,"session_count":0})", "load_index",
              "must be 0..10000");
  check_error(R"({"type":"heartbeat","load_index":0,"session_count":1000001})", "session_count", "must be 0..1000000");
  check_error(R"({"type":"welcome","version":1,"heartbeat_interval_seconds":4,"missed_heartbeats":3,"broker_proof":")" +
                  kHex + "\"}",
              "heartbeat_interval_seconds", "must be 5..86400");
  check_error(
      R"({"type":"welcome","version":0,"heartbeat_interval_seconds":60,"missed_heartbeats":3,"broker_proof":")" + kHex +
          "\"}",
      "version", "must be 1..65535");
  check_error(R"({"type":"command","id":"c","command":"logoff_session","timeout_ms":0,"args":{"session_key":"k"}})",
              "timeout_ms", "must be 1..3600000");
  check_error(R"({"type":"session_event","event":"LoggedOn","session":{"session_key":"k"}})", "event",
              "must be one of Connected, Active, Disconnected, Reconnected, LoggedOff (got 'LoggedOn')");
  check_error(R"({"type":"session_event","event":"Active","session":{"session_key":"k","protocol":"hdx"}})",
              "session.protocol", "must be one of HDX, RDP, Console");
  check_error(R"({"type":"session_event","event":"Active","session":{"session_key":""}})", "session.session_key",
              "must not be empty");
  check_error(R"({"type":"session_event","event":"Active","session":{"session_key":"a b"}})", "session.session_key",
              "printable ASCII");
  check_error(R"({"type":"session_event","event":"Active","session":{"session_key":")" + std::string(129, 'k') + "\"}}",
              "session.session_key", "at most 128 bytes");
  check_error(R"({"type":"session_event","event":"Active","session":{"session_key":"k","user":"a\nb"}})",
              "session.user", "control characters");
  check_error(R"({"type":"goodbye","reason":"ContactLost"})", "reason",
              "must be one of AgentShutdown, AgentSuspended, AgentRequested");
  check_error(R"({"type":"goodbye"})", "reason", "is required");
  check_error(R"({"type":"rejected","reason":"BadProof","retry_after_seconds":0})", "retry_after_seconds",
              "must be 1..86400");
  check_error(R"({"type":"ticket","reply_to":"r","ok":true,"user":"u","credential_type":"pass word"})",
              "credential_type", "letters, digits");
  check_error(R"({"type":"ticket","reply_to":"r","ok":true,"user":"u","credential_type":"password",)"
              R"("credential_data":{"password":5}})",
              "credential_data.password", "must be a string");
  check_error(R"({"type":"ticket","reply_to":"r","ok":true,"credential_type":"password"})", "user", "is required");
  check_error(R"({"type":"ticket","reply_to":"r","ok":false})", "reason", "is required");
  check_error(R"({"type":"command","id":"c","command":"send_message","timeout_ms":5,"args":{"text":"t"}})",
              "args.session_key", "exactly one of session_key and all");
  check_error(R"({"type":"command","id":"c","command":"send_message","timeout_ms":5,)"
              R"("args":{"text":"t","all":true,"session_key":"k"}})",
              "args.session_key", "exactly one of session_key and all");
  check_error(R"({"type":"command","id":"c","command":"send_message","timeout_ms":5,"args":{"all":true}})", "args.text",
              "is required");
  check_error(R"({"type":"command","id":"c","command":"prepare_session","timeout_ms":5,"args":{"user":"u",)"
              R"("resource":"r","ticket_ref":"t","session_key":"k","connect_timeout_seconds":0}})",
              "args.connect_timeout_seconds", "must be 1..86400");
  check_error(R"({"type":"command","id":"c","command":"Prepare Session","timeout_ms":5})", "command", "letters");
}

TEST_CASE("hello validation") {
  REQUIRE(parse(kGoodHello));
  auto with = [](const std::string& from, const std::string& to) {
    std::string s = kGoodHello;
    const auto at = s.find(from);
    REQUIRE(at != std::string::npos);
    return s.replace(at, from.size(), to);
  };
  check_error(with(R"("machine":"DEMO\\pool-1")", R"("machine":"")"), "machine", "must not be empty");
  check_error(with(R"("machine":"DEMO\\pool-1",)", ""), "machine", "is required");
  check_error(with(R"("versions":[1])", R"("versions":[])"), "versions", "must not be empty");
  check_error(with(R"("versions":[1])", R"("versions":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17])"), "versions",
              "at most 16 entries");
  check_error(with(R"("versions":[1])", R"("versions":[1,-2])"), "versions[1]", "must be 1..65535");
  check_error(with(kHex, std::string(63, 'a')), "proof", "64 lower-case hex digits");
  check_error(with(kHex, "C72C1F3519C8C5782EAB5333DA36F4A2E2709F42916EF76C51124A2F9BD77411"), "proof",
              "64 lower-case hex digits");
  check_error(with(kAgentNonce, std::string(64, 'g')), "agent_nonce", "64 lower-case hex digits");
  check_error(with(R"("agent_version":"1.0",)", ""), "agent_version", "is required");
  check_error(with(R"("machine")", R"("enroll":true,"machine")"), "catalog", "is required");
  check_error(with(R"("machine")", R"("enroll":1,"machine")"), "enroll", "must be true or false");
}

TEST_CASE("register validation and rejection reasons") {
  const std::string good =
      R"({"type":"register","os":"Linux","session_support":"SingleSession","address":"10.0.0.5:1494",)"
      R"("capabilities":[],"load_index":0,"sessions":[]})";
  REQUIRE(parse(good));
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    const auto at = s.find(from);
    REQUIRE(at != std::string::npos);
    return s.replace(at, from.size(), to);
  };
  check_error(with("SingleSession", "Single"), "session_support", "must be one of SingleSession, MultiSession");
  for (const char* bad :
       {"10.0.0.5", "10.0.0.5:", "10.0.0.5:0", "10.0.0.5:65536", "10.0.0.5:14a4", ":1494", "2001:db8::5:1494",
        "[10.0.0.5]:1494", "[zz::1]:1494", "bad_host-:1494", "a..b:1494", "10.0.0.300:1494", "host name:1494"})
    check_error(with("10.0.0.5:1494", bad), "address", "");
  for (const char* ok : {"10.0.0.5:1", "[2001:db8::5]:65535", "vm-1.example.test:2598", "VM1:3389", "::1"}) {
    const bool expect = std::string(ok) != "::1";
    CHECK_MESSAGE(is_host_port(ok) == expect, ok);
  }
  check_error(with(R"("capabilities":[])", R"("capabilities":["a b"])"), "capabilities[0]", "letters");
  check_error(with(R"("capabilities":[])", R"("capabilities":[1])"), "capabilities[0]", "must be a string");
  check_error(with(R"("sessions":[])", R"("sessions":[{"session_key":"k"}])"), "sessions[0].state", "is required");
  check_error(with(R"("sessions":[])", R"("sessions":[{"state":"Active","session_key":"k"},5])"), "sessions[1]",
              "must be an object");
  check_error(with(R"("sessions":[])", R"("sessions":[{"state":"Logon","session_key":"k"}])"), "sessions[0].state",
              "PreparingNewSession, Connected, Active, Disconnected");
  check_error(with(R"(,"load_index":0)", R"(,"load_index":20000)"), "load_index", "must be 0..10000");
  check_error(with(R"("os":"Linux",)", R"("dns_name":"-x","os":"Linux",)"), "dns_name", "DNS name");

  CHECK(rejection_reason(error_of(with(R"("capabilities":[],)", ""))) == Reason::missing_registration_capabilities);
  CHECK(rejection_reason(error_of(R"({"type":"register"})")) == Reason::empty_registration_request);
  CHECK(rejection_reason(error_of(R"({"type":"register","unknown":1})")) == Reason::empty_registration_request);
  CHECK(rejection_reason(error_of(with("SingleSession", "x"))) == Reason::invalid_registration_request);
  CHECK(rejection_reason(error_of("{")) == Reason::invalid_registration_request);
  std::string no_version = kGoodHello;
  no_version.replace(no_version.find(R"("agent_version":"1.0",)"), 22, "");
  CHECK(rejection_reason(error_of(no_version)) == Reason::missing_agent_version);
}

TEST_CASE("handshake rejection reasons: a bad member of the awaited message, else ProtocolError") {
  // docs/cbp.md "Protocol errors during the handshake".
  const std::string good_register =
      R"({"type":"register","os":"Linux","session_support":"SingleSession","address":"10.0.0.5:1494",)"
      R"("capabilities":[],"load_index":0,"sessions":[]})";
  auto reason = [](std::string_view expected, const std::string& text) {
    return handshake_rejection_reason(expected, text, error_of(text));
  };
  auto without = [](std::string text, const std::string& part) {
    const auto at = text.find(part);
    REQUIRE(at != std::string::npos);
    return text.erase(at, part.size());
  };
  std::string bad_address = good_register;
  bad_address.replace(bad_address.find("10.0.0.5:1494"), 13, "nowhere");

  // The awaited message with a wrong or missing member: a registration refusal.
  CHECK(reason("hello", R"({"type":"hello","machine":"x"})") == Reason::invalid_registration_request);
  CHECK(reason("hello", without(kGoodHello, R"("agent_version":"1.0",)")) == Reason::missing_agent_version);
  CHECK(reason("register", bad_address) == Reason::invalid_registration_request);
  CHECK(reason("register", without(good_register, R"("capabilities":[],)")) ==
        Reason::missing_registration_capabilities);
  CHECK(reason("register", R"({"type":"register"})") == Reason::empty_registration_request);
  // Anything else is a protocol error: not JSON, not an object, no or an unknown type, another
  // message (also a broken one), whichever step the handshake is at.
  for (std::string_view expected : {"hello", "register"}) {
    CAPTURE(expected);
    CHECK(reason(expected, "{not json") == Reason::protocol_error);
    CHECK(reason(expected, "[1]") == Reason::protocol_error);
    CHECK(reason(expected, R"({"machine":"x"})") == Reason::protocol_error);
    CHECK(reason(expected, R"({"type":7})") == Reason::protocol_error);
    CHECK(reason(expected, R"({"type":"launch_rockets"})") == Reason::protocol_error);
    CHECK(reason(expected, R"({"type":"heartbeat","load_index":"high"})") == Reason::protocol_error);
    CHECK(reason(expected, R"({"type":"challenge","nonce":"x"})") == Reason::protocol_error);
  }
  CHECK(reason("register", R"({"type":"hello","machine":"x"})") == Reason::protocol_error);
  CHECK(reason("hello", bad_address) == Reason::protocol_error);
  CHECK(reason("hello", R"({"type":"register"})") == Reason::protocol_error);
}

TEST_CASE("JSON escapes that are not Unicode are protocol errors") {
  // docs/cbp.md "Message format": invalid UTF-8 in the frame is the transport's (close 1007);
  // escapes that encode no character (a lone surrogate) are caught here.
  check_error(R"({"type":"registered","x":"\ud800"})", "", "malformed JSON");
  check_error(R"({"type":"registered","x":"\udc00x"})", "", "malformed JSON");
  CHECK(parse(R"({"type":"registered","x":"\ud83d\ude00"})"));  // a surrogate pair is fine
}

TEST_CASE("validate reports what the peer would refuse") {
  CHECK(validate(Heartbeat{10000, 0}));
  auto bad = validate(Heartbeat{10001, 0});
  REQUIRE(!bad);
  CHECK(bad.error().field == "load_index");
  CHECK(!validate(Hello{}));
  CHECK(!validate(Command{"c", 100, SendMessageArgs{"", false, "", "t"}}));
  CHECK(!validate(Register{"Linux", SessionSupport::single_session, "nohostport", "", {}, 0, {}}));
}

TEST_CASE("proof known answers (the worked example of docs/cbp.md)") {
  const std::string secret = "5a1f0c3e9b7d2a4c6e8f0b1d3c5e7a9b2d4f6a8c0e1b3d5f7a9c2e4b6d8f0a1c";
  const std::string key = secret_hash(secret);
  CHECK(key == "5f84cfa45ee8cbb0165737974939aa4d6d997aa5a2e70f6108978452b37c5a53");
  CHECK(key == common::crypto::sha256_hex(secret));
  const std::string machine = "DEMO\\pool-1";
  const std::vector<int> versions{1};
  const std::string proof = compute_proof(key, kNonce, machine, versions);
  // By hand: HMAC-SHA256(key text, nonce "\n" machine "\n" "1").
  CHECK(proof == common::crypto::hmac_sha256_hex(key, kNonce + "\n" + machine + "\n1"));
  CHECK(proof == "c72c1f3519c8c5782eab5333da36f4a2e2709f42916ef76c51124a2f9bd77411");
  CHECK(verify_proof(key, kNonce, machine, versions, proof));
  CHECK(!verify_proof(key, kNonce, "DEMO\\pool-2", versions, proof));
  CHECK(!verify_proof(key, kAgentNonce, machine, versions, proof));  // another nonce: no replay
  CHECK(!verify_proof(key, kNonce, machine, std::vector<int>{1, 2}, proof));
  CHECK(!verify_proof(secret_hash("other"), kNonce, machine, versions, proof));
  CHECK(!verify_proof(key, kNonce, machine, versions, ""));

  const std::string bproof = compute_broker_proof(key, kAgentNonce, kNonce, machine, 1);
  CHECK(bproof ==
        common::crypto::hmac_sha256_hex(key, "broker\n" + kAgentNonce + "\n" + kNonce + "\n" + machine + "\n1"));
  CHECK(bproof == "4b494a50336b334ce1533a173ffeb429a28e37cad6a1185b34d12199ada0844e");
  CHECK(verify_broker_proof(key, kAgentNonce, kNonce, machine, 1, bproof));
  CHECK(!verify_broker_proof(key, kAgentNonce, kNonce, machine, 2, bproof));

  // Enrollment: the key is the catalog's enrollment_key_hash; versions joined with ",".
  const std::string ekey = secret_hash("demo-enrollment-key");
  CHECK(ekey == "9395c4f484e96fff567577b6d8d464384bec8aff57417bd1358cfef6471ee626");
  CHECK(compute_proof(ekey, kNonce, "DEMO\\new-7", std::vector<int>{1, 2}) ==
        "da119f92f9e45bc6d7ccef6d15645f8d7e8bc7d71e1310ab4db8eed5c826a810");
  CHECK(compute_broker_proof(ekey, kAgentNonce, kNonce, "DEMO\\new-7", 1) ==
        "5779deb4723d1dea10d6fcc423e93c7b30ba92caedc08cf87a500b0b745e9c4f");

  CHECK(is_hex64(make_nonce()));
  CHECK(is_hex64(make_machine_secret()));
  CHECK(make_nonce() != make_nonce());
}

TEST_CASE("version choice") {
  const std::vector<int> ours{1, 2, 3};
  CHECK(choose_version(ours, std::vector<int>{1}) == 1);
  CHECK(choose_version(ours, std::vector<int>{3, 1, 2}) == 3);
  CHECK(choose_version(ours, std::vector<int>{2, 7}) == 2);
  CHECK(choose_version(ours, std::vector<int>{4, 5}) == std::nullopt);
  CHECK(choose_version(ours, std::vector<int>{}) == std::nullopt);
  CHECK(choose_version(kProtocolVersions, std::vector<int>{1}) == 1);
  CHECK(choose_version(kProtocolVersions, std::vector<int>{2}) == std::nullopt);
}

TEST_CASE("reason names and codes") {
  CHECK(to_string(Reason::contact_lost) == "ContactLost");
  CHECK(reason_code(Reason::contact_lost) == 207);
  CHECK(reason_code(Reason::agent_shutdown) == 0);
  CHECK(reason_code(Reason::incompatible_version) == 100);
  CHECK(reason_code(Reason::invalid_registration_request) == 110);
  CHECK(reason_code(Reason::single_multi_session_mismatch) == 111);
  CHECK(reason_code(Reason::desktop_removed) == 202);
  CHECK(reason_code(Reason::unknown) == 1002);
  CHECK(to_string(Reason::os_not_compatible_with_ddc) == "OSNotCompatibleWithDdc");
  CHECK(to_string(Reason::agent_wrong_active_directory_ou) == "AgentWrongActiveDirectoryOU");
  CHECK(to_string(Reason::unknown_machine) == "UnknownMachine");
  CHECK(reason_code(Reason::unknown_machine) == 900);
  CHECK(reason_code(Reason::broker_shutdown) == 907);
  CHECK(to_string(Reason::unavailable) == "Unavailable");
  CHECK(reason_code(Reason::unavailable) == 908);
  CHECK(from_string<Reason>("TooManyFailures") == Reason::too_many_failures);
  CHECK(from_string<Reason>("contactlost") == std::nullopt);  // exact spelling only
  CHECK(reason_from_code(205) == Reason::session_audit_failure);
  CHECK(reason_from_code(999) == std::nullopt);

  // Every reason has a distinct name and code, in ascending code order, and round-trips.
  int last = -1;
  std::vector<std::string_view> names;
  for (Reason r : all_reasons()) {
    CHECK(reason_code(r) > last);
    last = reason_code(r);
    CHECK(from_string<Reason>(to_string(r)) == r);
    CHECK(reason_from_code(reason_code(r)) == r);
    CHECK(std::find(names.begin(), names.end(), to_string(r)) == names.end());
    names.push_back(to_string(r));
  }
  CHECK(all_reasons().size() == 46);

  CHECK(from_string<SessionSupport>("MultiSession") == SessionSupport::multi_session);
  CHECK(from_string<SessionState>("PreparingNewSession") == SessionState::preparing);
  CHECK(from_string<SessionEventKind>("LoggedOff") == SessionEventKind::logged_off);
  CHECK(from_string<DisplayProtocol>("Console") == DisplayProtocol::console);
  CHECK(from_string<SessionType>("Application") == SessionType::application);
  CHECK(from_string<TicketFailure>("WrongMachine") == TicketFailure::wrong_machine);
  CHECK(from_string<SessionSupport>("singlesession") == std::nullopt);
}

TEST_CASE("error texts quoting peer input stay valid UTF-8 and short") {
  // A long unknown type made of 2-byte characters: the quoted excerpt is cut between characters.
  std::string type;
  for (int i = 0; i < 100; ++i) type += "\u00e4";
  for (const std::string& prefix : {std::string(), std::string("x")}) {
    const auto e = error_of(R"({"type":")" + prefix + type + R"("})");
    CHECK(e.field == "type");
    CHECK(e.message.size() < 120);
    CHECK(validate(ErrorMessage{Reason::protocol_error, e.describe()}));
    CHECK(validate(Rejected{Reason::invalid_registration_request, e.describe(), 0}));
  }
}

TEST_CASE("describe redacts secrets") {
  for (const Message& m : samples()) {
    const std::string line = describe(m);
    CAPTURE(line);
    CHECK(line.rfind(std::string(type_name(m)), 0) == 0);
    for (const std::string& secret : {kHex, kAgentNonce, kNonce, std::string(64, 'a'),
                                      std::string("0123456789ABCDEF0123456789ABCD"), std::string("p\u00e4ss")})
      CHECK(line.find(secret) == std::string::npos);
    CHECK(line.find('\n') == std::string::npos);
  }
  CHECK(describe(Heartbeat{3, 1}) == "heartbeat load_index=3 session_count=1");
}

TEST_CASE("hostile input never throws") {
  // Mutations of every valid message: truncations, byte flips, insertions.
  std::mt19937 rng(42);
  std::size_t parsed = 0;
  for (const Message& m : samples()) {
    const std::string text = serialize(m);
    for (std::size_t cut = 0; cut < text.size(); cut += 3) CHECK_NOTHROW((void)parse(text.substr(0, cut)));
    for (int i = 0; i < 300; ++i) {
      std::string t = text;
      const int edits = 1 + static_cast<int>(rng() % 4);
      for (int k = 0; k < edits; ++k) {
        const std::size_t at = rng() % t.size();
        switch (rng() % 3) {
          case 0: t[at] = static_cast<char>(rng() % 256); break;
          case 1: t.insert(at, 1, "{}[]\",:0-e.\\u"[rng() % 14]); break;
          case 2: t.erase(at, 1); break;
        }
        if (t.empty()) t = "{";
      }
      common::Result<Message> r = common::make_error(common::errc::internal, "unset");
      CHECK_NOTHROW(r = parse(t));
      if (r) {
        ++parsed;
        CHECK(validate(*r));  // whatever parses re-serializes to something valid
      } else {
        // The error text can be sent back to the peer as it is.
        CHECK(validate(ErrorMessage{Reason::protocol_error, r.error().describe()}));
      }
    }
  }
  CHECK(parsed > 0);
}

// ---------------------------------------------------------------------------------------------
// Field limits of CBP messages (docs/cbp.md "Limits and timeouts", docs/SECURITY.md section 7.2):
// each one accepted at the limit and a protocol error one past it, naming the field. The message
// size and nesting limits are in "malformed JSON, non-objects and unknown types are errors",
// versions in "hello validation", session_key in "out-of-range and badly spelled values".
TEST_SUITE("limits") {

namespace {
// `make(n)` builds a message with the limited field at size n: it parses at `limit`, and at
// `limit + 1` is an error on `field` saying "at most <limit> <unit>".
template <class Make>
void check_limit(Make make, std::size_t limit, const std::string& field, const std::string& unit = "bytes") {
  CAPTURE(field);
  const std::string at = serialize(make(limit));
  const auto parsed = parse(at);
  CHECK_MESSAGE(parsed.has_value(), (parsed ? std::string() : parsed.error().describe()));
  check_error(serialize(make(limit + 1)), field, "at most " + std::to_string(limit) + " " + unit);
}

Hello hello_with(std::string machine, std::string agent_version = "1.0") {
  return Hello{std::move(machine), {1}, std::move(agent_version), kHex, kAgentNonce, false, ""};
}
Register register_with(std::vector<std::string> capabilities, std::vector<SessionReport> sessions = {}) {
  return Register{"Linux", SessionSupport::multi_session, "10.0.0.5:1494", "", std::move(capabilities), 0,
                  std::move(sessions)};
}
Ticket ticket_with(std::map<std::string, std::string> data, std::string credential_type = "password") {
  Ticket t;
  t.reply_to = "r1";
  t.ok = true;
  t.user = "DEMO\\alice";
  t.credential_type = std::move(credential_type);
  t.credential_data = std::move(data);
  return t;
}
}  // namespace

TEST_CASE("kMaxNameBytes: machine, agent_version, catalog, os, user, client, ticket, title") {
  const auto s = [](std::size_t n) { return std::string(n, 'n'); };
  check_limit([&](std::size_t n) { return hello_with(s(n)); }, kMaxNameBytes, "machine");
  check_limit([&](std::size_t n) { return hello_with("m", s(n)); }, kMaxNameBytes, "agent_version");
  check_limit([&](std::size_t n) {
    auto h = hello_with("m");
    h.enroll = true;
    h.catalog = s(n);
    return h;
  }, kMaxNameBytes, "catalog");
  check_limit([&](std::size_t n) {
    auto r = register_with({});
    r.os = s(n);
    return r;
  }, kMaxNameBytes, "os");
  check_limit([&](std::size_t n) {
    auto info = sample_session("k");
    info.user = s(n);
    return SessionEvent{SessionEventKind::active, info};
  }, kMaxNameBytes, "session.user");
  check_limit([&](std::size_t n) {
    auto info = sample_session("k");
    info.client_name = s(n);
    return SessionEvent{SessionEventKind::active, info};
  }, kMaxNameBytes, "session.client_name");
  check_limit([&](std::size_t n) { return RedeemTicket{"r1", s(n), ""}; }, kMaxNameBytes, "ticket");
  check_limit([&](std::size_t n) {
    auto t = ticket_with({});
    t.user = s(n);
    return t;
  }, kMaxNameBytes, "user");
  check_limit([&](std::size_t n) { return Command{"c", 5000, SendMessageArgs{"k", false, s(n), "t"}}; },
              kMaxNameBytes, "args.title");
}

TEST_CASE("kMaxIdBytes: command id, reply_to, redeem id") {
  const auto s = [](std::size_t n) { return std::string(n, 'i'); };
  check_limit([&](std::size_t n) { return Command{s(n), 5000, LogoffSessionArgs{"k"}}; }, kMaxIdBytes, "id");
  check_limit([&](std::size_t n) { return CommandResult{s(n), true, ""}; }, kMaxIdBytes, "reply_to");
  check_limit([&](std::size_t n) { return RedeemTicket{s(n), "T", ""}; }, kMaxIdBytes, "id");
  check_limit([&](std::size_t n) {
    auto t = ticket_with({});
    t.reply_to = s(n);
    return t;
  }, kMaxIdBytes, "reply_to");
}

TEST_CASE("kMaxTokenBytes: capability, credential type, credential_data names, command") {
  const auto s = [](std::size_t n) { return std::string(n, 't'); };
  check_limit([&](std::size_t n) { return register_with({s(n)}); }, kMaxTokenBytes, "capabilities[0]");
  check_limit([&](std::size_t n) { return ticket_with({}, s(n)); }, kMaxTokenBytes, "credential_type");
  check_limit([&](std::size_t n) { return ticket_with({{s(n), "v"}}); }, kMaxTokenBytes, "credential_data");
  check_limit([&](std::size_t n) { return Command{"c", 5000, UnknownCommandArgs{s(n)}}; }, kMaxTokenBytes, "command");
}

TEST_CASE("kMaxTextBytes: messages, error texts, command lines, message text") {
  const auto s = [](std::size_t n) { return std::string(n, 'x'); };
  check_limit([&](std::size_t n) { return CommandResult{"c1", false, s(n)}; }, kMaxTextBytes, "error");
  check_limit([&](std::size_t n) { return ErrorMessage{Reason::protocol_error, s(n)}; }, kMaxTextBytes, "message");
  check_limit([&](std::size_t n) { return Rejected{Reason::bad_proof, s(n), 0}; }, kMaxTextBytes, "message");
  check_limit([&](std::size_t n) { return Goodbye{Reason::agent_shutdown, s(n)}; }, kMaxTextBytes, "message");
  check_limit([&](std::size_t n) { return Command{"c", 5000, SendMessageArgs{"k", false, "", s(n)}}; },
              kMaxTextBytes, "args.text");
  check_limit([&](std::size_t n) {
    PrepareSessionArgs p;
    p.user = "u";
    p.resource = "r";
    p.ticket_ref = "T";
    p.session_key = "k";
    p.connect_timeout_seconds = 60;
    p.command_line_arguments = s(n);
    return Command{"c", 5000, p};
  }, kMaxTextBytes, "args.command_line_arguments");
}

TEST_CASE("kMaxCapabilities and kMaxSessions: entries in one register") {
  check_limit([](std::size_t n) { return register_with(std::vector<std::string>(n, "send_message")); },
              kMaxCapabilities, "capabilities", "entries");
  check_limit([](std::size_t n) {
    std::vector<SessionReport> sessions;
    for (std::size_t i = 0; i < n; ++i) {  // minimal ones: 10000 sample_session()s would pass 1 MiB
      SessionInfo info;
      info.session_key = "s" + std::to_string(i);
      sessions.push_back({SessionState::active, info});
    }
    return register_with({}, std::move(sessions));
  }, kMaxSessions, "sessions", "entries");
}

TEST_CASE("credential_data: kMaxCredentialMembers members, kMaxCredentialValueBytes per value") {
  check_limit([](std::size_t n) {
    std::map<std::string, std::string> data;
    for (std::size_t i = 0; i < n; ++i) data["k" + std::to_string(i)] = "v";
    return ticket_with(std::move(data));
  }, kMaxCredentialMembers, "credential_data", "members");
  check_limit([](std::size_t n) { return ticket_with({{"password", std::string(n, 'p')}}); },
              kMaxCredentialValueBytes, "credential_data.password");
}

}  // TEST_SUITE("limits")
