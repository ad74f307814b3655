// common/metrics.hpp: counters, gauges and histograms, rendered in the Prometheus text format by
// the admin endpoint. Thread-safe; cheap enough for per-request use.
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace common {

using Labels = std::vector<std::pair<std::string, std::string>>;

class Metrics {
 public:
  enum class Type { counter, gauge, histogram };

  // Declares a metric family; optional (undeclared families are rendered as untyped).
  void describe(std::string_view name, Type type, std::string_view help);

  void add(std::string_view name, const Labels& labels, double value = 1.0);
  void set(std::string_view name, const Labels& labels, double value);
  // Histogram observation in seconds (buckets 0.5 ms .. 10 s).
  void observe(std::string_view name, const Labels& labels, double seconds);
  // Drops every series of a gauge family (before re-setting a snapshot, e.g. machines by state).
  void clear(std::string_view name);

  std::string render() const;  // Prometheus text exposition format 0.0.4

 private:
  struct Histogram {
    std::vector<std::uint64_t> buckets;
    std::uint64_t count = 0;
    double sum = 0;
  };
  struct Family {
    Type type = Type::gauge;
    bool typed = false;
    std::string help;
    std::map<Labels, double> values;
    std::map<Labels, Histogram> histograms;
  };
  mutable std::mutex mutex_;
  std::map<std::string, Family, std::less<>> families_;
};

// Label values escaped for the exposition format.
std::string escape_label_value(std::string_view v);

}  // namespace common
