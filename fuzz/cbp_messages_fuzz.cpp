// fuzz/cbp_messages_fuzz.cpp: the agent protocol's message codec (cbp/messages.hpp), every
// message type, on arbitrary bytes.
//
// Built as cbp_messages_fuzz (libFuzzer) and cbp_messages_fuzz_replay (ctest, over
// fuzz/corpus/cbp_messages/): see fuzz/CMakeLists.txt.
//
// The contracts checked (std::abort on violation):
// - parse never throws or crashes; an error has a message;
// - what parses validates, serializes to text that parses back to the same message, and has a
//   log line (describe) that names its type;
// - the handshake's rejection reasons are computed for any text and error.
#include "cbp/messages.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const auto parsed = cbp::parse(text);
  if (parsed) {
    const cbp::Message& m = *parsed;
    check(cbp::validate(m).has_value());
    const std::string again = cbp::serialize(m);
    const auto reparsed = cbp::parse(again);
    check(reparsed.has_value() && *reparsed == m);
    check(cbp::describe(m).find(std::string(cbp::type_name(m))) != std::string::npos);
  } else {
    const common::Error& e = parsed.error();
    check(!e.message.empty());
    (void)cbp::rejection_reason(e);
    (void)cbp::handshake_rejection_reason(cbp::Hello::kType, text, e);
    (void)cbp::handshake_rejection_reason(cbp::Register::kType, text, e);
  }
  if (size <= 1024) {
    (void)cbp::is_host_port(text);
    (void)cbp::is_hex64(text);
  }
  return 0;
}
