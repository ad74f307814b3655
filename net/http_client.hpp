// net/http_client.hpp: a small blocking HTTP/1.1 client for brokerctl, tools and tests.
#pragma once

#include "common/error.hpp"

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace net {

struct ClientResponse {
  int status = 0;
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
};

class HttpClient {
 public:
  // base_url: "http://127.0.0.1:8082" or "https://host:port" (TLS: verify_peer off unless a CA
  // file is given).
  explicit HttpClient(std::string base_url, std::chrono::milliseconds timeout = std::chrono::seconds(30),
                      std::string ca_file = {});
  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  // Keeps one connection alive across calls and reconnects when the server closed it.
  // Fails with errc::unavailable ("cannot connect to ...: connection refused") on network errors.
  common::Result<ClientResponse> request(const std::string& method, const std::string& target,
                                         const std::string& body = {},
                                         const std::vector<std::pair<std::string, std::string>>& headers = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace net
