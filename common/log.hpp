// common/log.hpp: building loggers. Libraries take a std::shared_ptr<spdlog::logger> in their
// constructors; only apps/ builds one (no global logger).
#pragma once

#include <spdlog/fwd.h>

#include <memory>
#include <string>

namespace common {

struct LogOptions {
  std::string level = "info";   // trace, debug, info, warn, error, critical, off
  std::string format = "text";  // "text" or "json" (one JSON object a line)
  std::string file;             // empty: stderr
};

// Throws std::runtime_error when the file cannot be opened.
std::shared_ptr<spdlog::logger> make_logger(const LogOptions& options, const std::string& name = "brokerd");

// A logger that drops everything (tests, tools).
std::shared_ptr<spdlog::logger> null_logger();

bool valid_log_level(const std::string& level);

}  // namespace common
