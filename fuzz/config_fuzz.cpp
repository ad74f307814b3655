// fuzz/config_fuzz.cpp: the config loader on arbitrary bytes.
//
// Built two ways (fuzz/CMakeLists.txt):
// * config_fuzz (clang, -DOPENBROKER_FUZZ=ON): a libFuzzer target, run as
//     config_fuzz -max_total_time=60 fuzz/corpus/config
// * config_fuzz_replay (any compiler, OPENBROKER_FUZZ_REPLAY defined): a plain program that feeds
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

#ifdef OPENBROKER_FUZZ_REPLAY
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

int replay(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    std::cerr << file.string() << ": cannot open\n";
    return 1;
  }
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int failures = 0;
  int count = 0;
  for (int i = 1; i < argc; ++i) {
    const std::filesystem::path arg(argv[i]);
    std::error_code ec;
    if (std::filesystem::is_directory(arg, ec)) {
      std::vector<std::filesystem::path> files;
      for (const auto& entry : std::filesystem::directory_iterator(arg, ec))
        if (entry.is_regular_file()) files.push_back(entry.path());
      if (ec) {
        std::cerr << arg.string() << ": " << ec.message() << "\n";
        ++failures;
      }
      for (const auto& f : files) {
        failures += replay(f);
        ++count;
      }
    } else {
      failures += replay(arg);
      ++count;
    }
  }
  std::cout << "replayed " << count << " inputs\n";
  return failures == 0 && count > 0 ? 0 : 1;
}
#endif
