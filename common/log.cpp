#include "common/log.hpp"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/null_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ctime>

namespace common {
namespace {

// One JSON object per line: {"time":..,"level":..,"logger":..,"thread":..,"msg":..}
class JsonFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    using namespace std::chrono;
    const auto ms = duration_cast<milliseconds>(msg.time.time_since_epoch()).count();
    std::time_t secs = static_cast<std::time_t>(ms / 1000);
    std::tm tm{};
    gmtime_r(&secs, &tm);
    char ts[96];
    std::snprintf(ts, sizeof ts, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                  tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms % 1000));
    append("{\"time\":\"", dest);
    append(ts, dest);
    append("\",\"level\":\"", dest);
    const auto lvl = spdlog::level::to_string_view(msg.level);
    dest.append(lvl.data(), lvl.data() + lvl.size());
    append("\",\"logger\":\"", dest);
    escape({msg.logger_name.data(), msg.logger_name.size()}, dest);
    append("\",\"thread\":", dest);
    append(std::to_string(msg.thread_id), dest);
    append(",\"msg\":\"", dest);
    escape({msg.payload.data(), msg.payload.size()}, dest);
    append("\"}\n", dest);
  }
  std::unique_ptr<spdlog::formatter> clone() const override { return std::make_unique<JsonFormatter>(); }

 private:
  static void append(std::string_view s, spdlog::memory_buf_t& dest) { dest.append(s.data(), s.data() + s.size()); }
  static void escape(std::string_view s, spdlog::memory_buf_t& dest) {
    for (unsigned char c : s) {
      switch (c) {
        case '"': append("\\\"", dest); break;
        case '\\': append("\\\\", dest); break;
        case '\n': append("\\n", dest); break;
        case '\r': append("\\r", dest); break;
        case '\t': append("\\t", dest); break;
        default:
          if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            append(buf, dest);
          } else {
            dest.push_back(static_cast<char>(c));
          }
      }
    }
  }
};

// The length of the UTF-8 sequence starting at text[i] and its code point; 0 when the bytes there
// are not a valid, shortest-form sequence of a scalar value (no surrogates, nothing past U+10FFFF).
std::size_t utf8_sequence(std::string_view text, std::size_t i, std::uint32_t& cp) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char b0 = byte(i);
  std::size_t len = 0;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
    cp = b0 & 0x1Fu;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    cp = b0 & 0x0Fu;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    cp = b0 & 0x07u;
  } else {
    return 0;
  }
  if (i + len > text.size()) return 0;
  for (std::size_t k = 1; k < len; ++k) {
    const unsigned char b = byte(i + k);
    if ((b & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b & 0x3Fu);
  }
  if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF))
    return 0;
  return len;
}

// Characters that are valid but must not reach a log line as they are.
bool hides_text(std::uint32_t cp) {
  return (cp >= 0x80 && cp <= 0x9F) ||      // C1 controls
         cp == 0x2028 || cp == 0x2029 ||    // line and paragraph separators
         cp == 0x200E || cp == 0x200F ||    // left-to-right / right-to-left marks
         (cp >= 0x202A && cp <= 0x202E) ||  // embeddings and overrides
         (cp >= 0x2066 && cp <= 0x2069) ||  // isolates
         cp == 0xFEFF;                      // zero-width no-break space
}

}  // namespace

std::string log_safe(std::string_view text, std::size_t max_bytes) {
  std::string out;
  out.reserve(std::min(text.size(), max_bytes) + 8);
  char buf[16];
  std::size_t i = 0;
  while (i < text.size()) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    std::size_t len = 1;
    if (c < 0x20 || c == 0x7F) {
      if (i + 1 > max_bytes) break;
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else if (c < 0x80) {
      if (i + 1 > max_bytes) break;
      out += static_cast<char>(c);
    } else {
      std::uint32_t cp = 0;
      len = utf8_sequence(text, i, cp);
      if (len == 0) {
        len = 1;
        if (i + 1 > max_bytes) break;
        std::snprintf(buf, sizeof buf, "\\x%02x", c);
        out += buf;
      } else {
        if (i + len > max_bytes) break;
        if (hides_text(cp)) {
          std::snprintf(buf, sizeof buf, "\\u{%04X}", static_cast<unsigned>(cp));
          out += buf;
        } else {
          out.append(text.substr(i, len));
        }
      }
    }
    i += len;
  }
  if (i < text.size()) out += "...(" + std::to_string(text.size()) + " bytes)";
  return out;
}

bool valid_log_level(const std::string& level) {
  return level == "trace" || level == "debug" || level == "info" || level == "warn" || level == "error" ||
         level == "critical" || level == "off";
}

std::shared_ptr<spdlog::logger> make_logger(const LogOptions& options, const std::string& name) {
  spdlog::sink_ptr sink;
  if (options.file.empty())
    sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  else
    sink = std::make_shared<spdlog::sinks::basic_file_sink_mt>(options.file, false);
  auto logger = std::make_shared<spdlog::logger>(name, sink);
  if (options.format == "json")
    logger->set_formatter(std::make_unique<JsonFormatter>());
  else
    logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e%z %^%l%$ [%n] %v");
  logger->set_level(spdlog::level::from_str(options.level));
  logger->flush_on(spdlog::level::info);
  return logger;
}

std::shared_ptr<spdlog::logger> null_logger() {
  return std::make_shared<spdlog::logger>("null", std::make_shared<spdlog::sinks::null_sink_mt>());
}

}  // namespace common
