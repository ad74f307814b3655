// tools/broker-bench/ceiling.hpp: the ceiling a figure is compared with, measured in the same run
// with the same client and connection count: a static reply of the broker's reply size from
//
//   * the broker's own HTTP stack: `broker-bench static-server`, a child process running
//     net::Server (the listener code brokerd uses, same I/O thread count) whose handler answers
//     fixed bytes at once; brokerd itself gets no test endpoint;
//   * nginx, when it is installed (found on PATH or in /usr/sbin): a private instance in a
//     temporary directory on a free loopback port serving the same bytes.
//
// Each ceiling server answers any POST to /<type> (for example /RequestAppData) with the bytes
// set for that type, so a scenario posts the same request sequence it sent the broker.
#pragma once

#include "tools/broker-bench/process.hpp"

#include <map>
#include <string>
#include <vector>

namespace bench {

// type -> reply body size in bytes
using ReplySizes = std::map<std::string, std::size_t>;

// A body of exactly `bytes` bytes that looks like an XML reply.
std::string static_body(std::size_t bytes);

// A ceiling server in a child process. start() returns false with `error` set.
class CeilingServer {
 public:
  CeilingServer() = default;
  ~CeilingServer();
  CeilingServer(const CeilingServer&) = delete;
  CeilingServer& operator=(const CeilingServer&) = delete;

  // `broker-bench static-server` with `threads` I/O threads.
  bool start_static(const std::string& dir, const ReplySizes& sizes, int threads, std::string& error);
  // nginx with `workers` worker processes; false (error "nginx is not installed") when none.
  bool start_nginx(const std::string& dir, const ReplySizes& sizes, int workers, std::string& error);
  void stop();
  const std::string& url() const { return url_; }  // http://127.0.0.1:P
  int pid() const { return pid_; }

 private:
  bool wait_ready(int port, std::string& error);
  int pid_ = -1;
  std::string url_;
};

std::string find_nginx();  // empty when not installed

// The child side: `broker-bench static-server --reply TYPE=BYTES ... [--threads N] --ready-file F`.
int static_server_main(const std::vector<std::string>& args);

}  // namespace bench
