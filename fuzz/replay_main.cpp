// fuzz/replay_main.cpp: turns a libFuzzer entry point into a plain program that feeds it every
// file given on the command line (directories: every regular file in them). ctest runs it over
// the seed corpora with any compiler; exit 1 when a file cannot be read or nothing was replayed.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

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
