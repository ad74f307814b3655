// tools/broker-bench/frontend.cpp: see frontend.hpp.
#include "tools/broker-bench/frontend.hpp"

#include "net/http_client.hpp"
#include "tools/broker-bench/site.hpp"

#include <thread>

namespace bench {
namespace {
using Clock = std::chrono::steady_clock;

std::string credentials_xml(int user, Credentials c) {
  if (c == Credentials::trusted)
    return "<Credentials><ID type=\"SAM\">" + std::string(kDomain) + "\\" + user_name(user) + "</ID></Credentials>";
  return "<Credentials><UserName>" + user_name(user) + "</UserName><Password encoding=\"cleartext\">" + kPassword +
         "</Password><Domain type=\"NT\">" + kDomain + "</Domain></Credentials>";
}
}  // namespace

void Samples::merge(Samples&& o) {
  for (auto& [k, v] : o.latency_ms) {
    auto& mine = latency_ms[k];
    mine.insert(mine.end(), v.begin(), v.end());
  }
  for (auto& [k, v] : o.errors) errors[k] += v;
  for (auto& [k, v] : o.bytes) {
    bytes[k].first += v.first;
    bytes[k].second += v.second;
  }
  o = Samples{};
}

double Samples::mean_bytes(const std::string& type) const {
  auto it = bytes.find(type);
  if (it == bytes.end() || it->second.first == 0) return 0;
  return static_cast<double>(it->second.second) / static_cast<double>(it->second.first);
}

Connection::Connection(const std::string& base_url, Millis timeout)
    : http_(std::make_unique<net::HttpClient>(base_url, timeout)) {}
Connection::~Connection() = default;

Reply Connection::request(const std::string& type, const std::string& method, const std::string& path,
                          const std::string& body, const std::vector<std::pair<std::string, std::string>>& headers) {
  Reply r;
  const auto start = Clock::now();
  auto res = http_->request(method, path, body, headers);
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  samples_.latency_ms[type].push_back(ms);
  if (!res) {
    r.transport_error = res.error().message;
    // Keep the error categories few: the message up to its first ':' names the kind.
    ++samples_.errors[type + ": transport: " + r.transport_error.substr(0, r.transport_error.find(':'))];
    return r;
  }
  r.status = res->status;
  r.body = std::move(res->body);
  auto& b = samples_.bytes[type];
  ++b.first;
  b.second += static_cast<long long>(r.body.size());
  if (r.status != 200) {
    ++samples_.errors[type + ": HTTP " + std::to_string(r.status)];
    return r;
  }
  if (r.body.find("<ErrorId>") != std::string::npos) {
    r.error_id = element_text(r.body, "ErrorId");
    ++samples_.errors[type + ": " + r.error_id];
  }
  return r;
}

Reply Connection::post_xml(const std::string& type, const std::string& path, const std::string& body) {
  return request(type, "POST", path, body, {{"Content-Type", "text/xml"}});
}

FrontEnds::FrontEnds(const std::string& base_url, int connections, Millis timeout) {
  for (int i = 0; i < std::max(1, connections); ++i)
    connections_.push_back(std::make_unique<Connection>(base_url, timeout));
}

FrontEnds::~FrontEnds() = default;

std::size_t FrontEnds::run(std::size_t count, Millis limit, const std::function<void(std::size_t, Connection&)>& work) {
  next_ = 0;
  done_ = 0;
  const auto deadline = Clock::now() + limit;
  std::vector<std::thread> threads;
  for (auto& c : connections_)
    threads.emplace_back([&, conn = c.get()] {
      for (;;) {
        if (Clock::now() >= deadline) return;
        const std::size_t i = next_++;
        if (i >= count) return;
        work(i, *conn);
        ++done_;
      }
    });
  for (auto& t : threads) t.join();
  return done_.load();
}

Samples FrontEnds::take() {
  Samples all;
  for (auto& c : connections_) all.merge(std::move(c->samples()));
  return all;
}

std::string request_app_data(int user, Credentials c) {
  return "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<NFuseProtocol version=\"5.1\"><RequestAppData>"
         "<Scope traverse=\"subtree\"/><DesiredDetails>defaults</DesiredDetails><ServerType>all</ServerType>"
         "<ClientType>ica30</ClientType>" +
         credentials_xml(user, c) + "<ClientName>WS-" + user_name(user) +
         "</ClientName></RequestAppData></NFuseProtocol>";
}

std::string request_address(int user, const std::string& name, Credentials c) {
  return "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<NFuseProtocol version=\"5.1\"><RequestAddress><Name><AppName>" +
         name + "</AppName></Name><ClientName>WS-" + user_name(user) +
         "</ClientName><ClientAddress addresstype=\"dot\">192.0.2.10</ClientAddress>"
         "<ServerAddress addresstype=\"dot-port\"/><Flags><IncludeTicket/></Flags>" +
         credentials_xml(user, c) + "</RequestAddress></NFuseProtocol>";
}

std::string element_text(const std::string& body, const std::string& name) {
  const std::string open = "<" + name;
  for (std::size_t pos = body.find(open); pos != std::string::npos; pos = body.find(open, pos + 1)) {
    const std::size_t after = pos + open.size();
    if (after >= body.size() || (body[after] != '>' && body[after] != ' ')) continue;
    const auto gt = body.find('>', after);
    if (gt == std::string::npos || body[gt - 1] == '/') return {};
    const auto close = body.find("</" + name + ">", gt);
    if (close == std::string::npos) return {};
    return body.substr(gt + 1, close - gt - 1);
  }
  return {};
}

}  // namespace bench
