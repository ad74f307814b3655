// fuzz/ctx1_fuzz.cpp: ctx1 decoding and encoding (xmlservice/ctx1.hpp: the obfuscated
// <Password encoding="ctx1"> of NFuse requests) on arbitrary bytes.
//
// Built as ctx1_fuzz (libFuzzer) and ctx1_fuzz_replay (ctest, over fuzz/corpus/ctx1/): see
// fuzz/CMakeLists.txt.
//
// The contracts checked (std::abort on violation): decode and encode never throw or crash;
// decode(encode(s)) == s for text without NUL; encode(decode(t)) == t without its whitespace for
// every t that decodes.
#include "xmlservice/ctx1.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  if (auto encoded = xmlservice::ctx1::encode(text)) {
    if (text.find('\0') == std::string_view::npos) {
      auto back = xmlservice::ctx1::decode(*encoded);
      if (!back || *back != text) std::abort();
    }
  }
  if (auto decoded = xmlservice::ctx1::decode(text)) {
    std::string letters;
    for (char c : text)
      if (c != ' ' && c != '\t' && c != '\r' && c != '\n') letters += c;
    auto again = xmlservice::ctx1::encode(*decoded);
    if (!again || *again != letters) std::abort();
  } else if (decoded.error().message.empty()) {
    std::abort();
  }
  return 0;
}
