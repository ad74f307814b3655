#include "common/metrics.hpp"

#include <doctest/doctest.h>

TEST_CASE("prometheus rendering") {
  common::Metrics m;
  m.describe("http_requests_total", common::Metrics::Type::counter, "Requests.");
  m.add("http_requests_total", {{"route", "/a\"b"}, {"status", "200"}});
  m.add("http_requests_total", {{"route", "/a\"b"}, {"status", "200"}});
  m.observe("lat_seconds", {}, 0.003);
  m.set("machines", {{"state", "Registered"}}, 4);
  const auto text = m.render();
  CHECK(text.find("# TYPE http_requests_total counter\n") != std::string::npos);
  CHECK(text.find("http_requests_total{route=\"/a\\\"b\",status=\"200\"} 2\n") != std::string::npos);
  CHECK(text.find("lat_seconds_bucket{le=\"0.005\"} 1\n") != std::string::npos);
  CHECK(text.find("lat_seconds_bucket{le=\"0.001\"} 0\n") != std::string::npos);
  CHECK(text.find("lat_seconds_count 1\n") != std::string::npos);
  CHECK(text.find("machines{state=\"Registered\"} 4\n") != std::string::npos);
  m.clear("machines");
  CHECK(m.render().find("machines{") == std::string::npos);
}
