#include "common/metrics.hpp"

#include <array>
#include <charconv>

namespace common {
namespace {
constexpr std::array<double, 14> kBuckets{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                          0.1,    0.25,  0.5,    1.0,   2.5,  5.0,  10.0};

// Shortest form that reads back as the same double ("0.005", "2", "1e-05").
std::string number(double v) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return ec == std::errc{} ? std::string(buf, end) : std::string("NaN");
}

std::string label_text(const Labels& labels, const std::string& extra_key = {}, const std::string& extra = {}) {
  if (labels.empty() && extra_key.empty()) return {};
  std::string out = "{";
  bool first = true;
  for (const auto& [k, v] : labels) {
    if (!first) out += ',';
    first = false;
    out += k + "=\"" + escape_label_value(v) + "\"";
  }
  if (!extra_key.empty()) {
    if (!first) out += ',';
    out += extra_key + "=\"" + extra + "\"";
  }
  return out + "}";
}
}  // namespace

std::string escape_label_value(std::string_view v) {
  std::string out;
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

void Metrics::describe(std::string_view name, Type type, std::string_view help) {
  std::lock_guard lock(mutex_);
  auto& f = families_[std::string(name)];
  f.type = type;
  f.typed = true;
  f.help = std::string(help);
}

void Metrics::add(std::string_view name, const Labels& labels, double value) {
  std::lock_guard lock(mutex_);
  auto it = families_.find(name);
  if (it == families_.end()) it = families_.emplace(std::string(name), Family{Type::counter}).first;
  it->second.values[labels] += value;
}

void Metrics::set(std::string_view name, const Labels& labels, double value) {
  std::lock_guard lock(mutex_);
  auto it = families_.find(name);
  if (it == families_.end()) it = families_.emplace(std::string(name), Family{Type::gauge}).first;
  it->second.values[labels] = value;
}

void Metrics::observe(std::string_view name, const Labels& labels, double seconds) {
  std::lock_guard lock(mutex_);
  auto it = families_.find(name);
  if (it == families_.end()) it = families_.emplace(std::string(name), Family{Type::histogram}).first;
  auto& h = it->second.histograms[labels];
  if (h.buckets.empty()) h.buckets.assign(kBuckets.size(), 0);
  for (std::size_t i = 0; i < kBuckets.size(); ++i)
    if (seconds <= kBuckets[i]) ++h.buckets[i];
  ++h.count;
  h.sum += seconds;
}

void Metrics::clear(std::string_view name) {
  std::lock_guard lock(mutex_);
  auto it = families_.find(name);
  if (it != families_.end()) it->second.values.clear();
}

std::string Metrics::render() const {
  std::lock_guard lock(mutex_);
  std::string out;
  for (const auto& [name, f] : families_) {
    if (!f.help.empty()) out += "# HELP " + name + " " + f.help + "\n";
    const char* type = f.type == Type::counter ? "counter" : f.type == Type::gauge ? "gauge" : "histogram";
    out += "# TYPE " + name + " " + type + "\n";
    for (const auto& [labels, v] : f.values) out += name + label_text(labels) + " " + number(v) + "\n";
    for (const auto& [labels, h] : f.histograms) {
      for (std::size_t i = 0; i < kBuckets.size(); ++i)
        out += name + "_bucket" + label_text(labels, "le", number(kBuckets[i])) + " " + std::to_string(h.buckets[i]) + "\n";
      out += name + "_bucket" + label_text(labels, "le", "+Inf") + " " + std::to_string(h.count) + "\n";
      out += name + "_sum" + label_text(labels) + " " + number(h.sum) + "\n";
      out += name + "_count" + label_text(labels) + " " + std::to_string(h.count) + "\n";
    }
  }
  return out;
}

}  // namespace common
