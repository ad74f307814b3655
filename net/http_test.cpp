#include "net/http.hpp"

#include <doctest/doctest.h>

TEST_CASE("percent_decode") {
  CHECK(net::percent_decode("/a%20b/%7Euser") == "/a b/~user");
  CHECK(net::percent_decode("a+b") == "a+b");
  CHECK(net::percent_decode("a+b", true) == "a b");
  // Malformed escapes stay as they are.
  CHECK(net::percent_decode("100%") == "100%");
  CHECK(net::percent_decode("%4") == "%4");
  CHECK(net::percent_decode("%zz%41") == "%zzA");
  CHECK(net::percent_decode("%00").size() == 1);
}

TEST_CASE("query_params and header lookup") {
  net::HttpRequest r;
  r.query = "a=1&b=x%20y&&flag&c=a+b&=empty";
  const auto params = r.query_params();
  REQUIRE(params.size() == 5);
  CHECK(params[0] == std::pair<std::string, std::string>{"a", "1"});
  CHECK(params[1] == std::pair<std::string, std::string>{"b", "x y"});
  CHECK(params[2] == std::pair<std::string, std::string>{"flag", ""});
  CHECK(params[3] == std::pair<std::string, std::string>{"c", "a b"});
  CHECK(params[4] == std::pair<std::string, std::string>{"", "empty"});

  r.headers.emplace("Content-Type", "text/xml");
  CHECK(r.header("content-type") == "text/xml");
  CHECK(r.header("CONTENT-TYPE") == "text/xml");
  CHECK(r.header("x-missing").empty());
}

TEST_CASE("CaseInsensitiveLess") {
  net::CaseInsensitiveLess less;
  CHECK_FALSE(less("Host", "host"));
  CHECK_FALSE(less("host", "HOST"));
  CHECK(less("accept", "Host"));
  CHECK(less("Host", "hostname"));
}

TEST_CASE("reason_phrase") {
  CHECK(net::reason_phrase(200) == "OK");
  CHECK(net::reason_phrase(413) == "Payload Too Large");
  CHECK(net::reason_phrase(431) == "Request Header Fields Too Large");
  CHECK(net::reason_phrase(599) == "Server Error");
  CHECK(net::reason_phrase(42) == "Unknown");
}
