// fuzz/config_fuzz.cpp: the config loader on arbitrary bytes.
//
// Built two ways (fuzz/CMakeLists.txt):
// * config_fuzz (clang, -DOPENBROKER_FUZZ=ON): a libFuzzer target, run as
//     config_fuzz -max_total_time=60 fuzz/corpus/config
// * config_fuzz_replay (any compiler, with replay_main.cpp): a plain program that feeds
//   each file given on the command line, or each file of a directory, to the same entry point;
//   ctest runs it over the seed corpus.
//
// The contract checked: load_string never throws or crashes, and yields either a config or at
// least one error, never both.
#include "config/config.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const config::LoadResult result = config::load_string(text, "fuzz.toml", "/nonexistent");
  if (result.config.has_value() == !result.errors.empty()) std::abort();
  for (const auto& e : result.errors)
    if (e.describe().empty()) std::abort();
  return 0;
}
