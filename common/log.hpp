// common/log.hpp: building loggers. Libraries take a std::shared_ptr<spdlog::logger> in their
// constructors; only apps/ builds one (no global logger).
#pragma once

#include <spdlog/fwd.h>

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

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

// How much of one client-controlled string log_safe() shows by default.
inline constexpr std::size_t kLogSafeMaxBytes = 128;

// A string the network controls (a user name, an element name, an address as sent), made fit for
// one field of a log line: at most `max_bytes` bytes of `text` are shown, cut at a character
// boundary and followed by "...(N bytes)" when `text` was longer; control characters (C0, DEL,
// C1), bytes that are not valid UTF-8, and the characters that move or hide text (U+2028,
// U+2029, the bidirectional marks, embeddings, overrides and isolates, U+FEFF) are written as
// `\xNN` (a byte) or `\u{NNNN}` (a character), so a value can never start a log line of its
// own or hide what follows. Everything else, backslashes included
// (`DEMO\alice`), is kept as is. The result is at most 8 * max_bytes + 24 bytes. Pure; any thread.
std::string log_safe(std::string_view text, std::size_t max_bytes = kLogSafeMaxBytes);

}  // namespace common
