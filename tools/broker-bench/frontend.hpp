// tools/broker-bench/frontend.hpp: front ends posting NFuse XML over keep-alive HTTP connections
// (net::HttpClient, one blocking client and thread per connection), with latency samples and
// errors per request type.
#pragma once

#include "tools/broker-bench/process.hpp"

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace net {
class HttpClient;
}

namespace bench {

struct Samples {
  std::map<std::string, std::vector<double>> latency_ms;         // per request type
  std::map<std::string, long long> errors;                       // "RequestAddress: no-available-workstation", ...
  std::map<std::string, std::pair<long long, long long>> bytes;  // type -> (replies, body bytes)
  void merge(Samples&& other);
  double mean_bytes(const std::string& type) const;
};

struct Reply {
  int status = 0;  // 0: no reply (transport error)
  std::string body;
  std::string transport_error;  // set when status is 0
  std::string error_id;         // NFuse <ErrorId>, if any
};

class Connection {
 public:
  Connection(const std::string& base_url, Millis timeout);
  ~Connection();
  // One request; records its latency under `type`, and an error "type: <ErrorId>", "type: HTTP
  // <status>" or "type: transport: <what>" when it failed.
  Reply request(const std::string& type, const std::string& method, const std::string& path, const std::string& body,
                const std::vector<std::pair<std::string, std::string>>& headers = {});
  Reply post_xml(const std::string& type, const std::string& path, const std::string& body);
  Samples& samples() { return samples_; }

 private:
  std::unique_ptr<net::HttpClient> http_;
  Samples samples_;
};

// `connections` front ends, each a keep-alive connection driven by its own thread.
class FrontEnds {
 public:
  FrontEnds(const std::string& base_url, int connections, Millis timeout = Millis{60000});
  ~FrontEnds();
  // Runs work(i, connection) for i in 0..count-1, each item on one connection, the connections in
  // parallel; no item starts after `limit`. Returns the number of items run.
  std::size_t run(std::size_t count, Millis limit, const std::function<void(std::size_t, Connection&)>& work);
  // The samples of every connection since the last take().
  Samples take();
  std::size_t done() const { return done_.load(); }  // items finished in the current run
  std::size_t size() const { return connections_.size(); }

 private:
  std::vector<std::unique_ptr<Connection>> connections_;
  std::atomic<std::size_t> next_{0}, done_{0};
};

// NFuse request bodies (docs/nfuse.md) for user `user` (0-based, see site.hpp user_name()).
enum class Credentials { trusted, password };  // trusted: <ID type="SAM"> from a trusted front end
std::string request_app_data(int user, Credentials credentials);
std::string request_address(int user, const std::string& name, Credentials credentials);
// The text of the first <name>...</name> (attributes allowed) in body; empty when none.
std::string element_text(const std::string& body, const std::string& name);

inline constexpr const char* kNfusePath = "/scripts/wpnbr.dll";

}  // namespace bench
