#include "common/log.hpp"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/null_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <chrono>
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

}  // namespace

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
