// tools/broker-bench/ceiling.cpp: see ceiling.hpp.
#include "tools/broker-bench/ceiling.hpp"

#include "common/log.hpp"
#include "net/http_client.hpp"
#include "net/server.hpp"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

namespace bench {
namespace fs = std::filesystem;

std::string static_body(std::size_t bytes) {
  const std::string head = "<?xml version=\"1.0\" encoding=\"UTF-8\" ?>\n<!-- ";
  const std::string tail = " -->\n";
  if (bytes < head.size() + tail.size()) return std::string(bytes, 'x');
  return head + std::string(bytes - head.size() - tail.size(), 'x') + tail;
}

CeilingServer::~CeilingServer() { stop(); }

void CeilingServer::stop() {
  if (pid_ > 0) terminate(pid_, Millis{10000});
  pid_ = -1;
}

bool CeilingServer::wait_ready(int port, std::string& error) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    if (wait_exit(pid_, Millis{0}) >= 0) {
      pid_ = -1;
      error += " exited at start";
      return false;
    }
    net::HttpClient probe("http://127.0.0.1:" + std::to_string(port), Millis{1000});
    if (auto r = probe.request("GET", "/"); r) {
      url_ = "http://127.0.0.1:" + std::to_string(port);
      return true;
    }
    std::this_thread::sleep_for(Millis{50});
  }
  error += " was not ready within 20 s";
  return false;
}

bool CeilingServer::start_static(const std::string& dir, const ReplySizes& sizes, int threads, std::string& error) {
  const int port = free_loopback_port();
  std::vector<std::string> argv{self_exe(),           "static-server", "--port",
                                std::to_string(port), "--threads",     std::to_string(threads)};
  for (const auto& [type, bytes] : sizes) {
    argv.push_back("--reply");
    argv.push_back(type + "=" + std::to_string(bytes));
  }
  try {
    pid_ = spawn(argv, false, {}, dir + "/static-server.log").pid;
  } catch (const std::exception& e) {
    error = e.what();
    return false;
  }
  error = "static-server (log " + dir + "/static-server.log)";
  return wait_ready(port, error);
}

std::string find_nginx() {
  std::vector<std::string> dirs;
  if (const char* path = std::getenv("PATH")) {
    std::string p = path;
    for (std::size_t start = 0;;) {
      const auto colon = p.find(':', start);
      dirs.push_back(p.substr(start, colon - start));
      if (colon == std::string::npos) break;
      start = colon + 1;
    }
  }
  for (const char* d : {"/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"}) dirs.emplace_back(d);
  for (const auto& d : dirs) {
    const std::string f = d + "/nginx";
    if (!d.empty() && ::access(f.c_str(), X_OK) == 0) return f;
  }
  return {};
}

bool CeilingServer::start_nginx(const std::string& dir, const ReplySizes& sizes, int workers, std::string& error) {
  const std::string nginx = find_nginx();
  if (nginx.empty()) {
    error = "nginx is not installed";
    return false;
  }
  const std::string root = dir + "/nginx";
  std::error_code ec;
  fs::create_directories(root + "/www", ec);
  for (const auto& [type, bytes] : sizes) std::ofstream(root + "/www/" + type, std::ios::trunc) << static_body(bytes);
  // The workers must read the files: as root they run as root, otherwise as the caller.
  fs::permissions(dir, fs::perms::owner_all | fs::perms::group_exec | fs::perms::others_exec, ec);
  const int port = free_loopback_port();
  {
    std::ofstream c(root + "/nginx.conf", std::ios::trunc);
    c << "# broker-bench: the nginx ceiling (a static reply of the broker's size)\n";
    if (::geteuid() == 0) c << "user root;\n";
    c << "worker_processes " << std::max(1, workers) << ";\ndaemon off;\nmaster_process on;\n"
      << "pid " << root << "/nginx.pid;\nerror_log " << root << "/error.log warn;\n"
      << "events { worker_connections 4096; }\n"
      << "http {\n  access_log off;\n  default_type text/xml;\n  keepalive_requests 100000000;\n"
      << "  keepalive_timeout 300s;\n"
      << "  client_body_temp_path " << root << "/body;\n  proxy_temp_path " << root << "/proxy;\n"
      << "  fastcgi_temp_path " << root << "/fastcgi;\n  uwsgi_temp_path " << root << "/uwsgi;\n"
      << "  scgi_temp_path " << root << "/scgi;\n"
      << "  server {\n    listen 127.0.0.1:" << port << ";\n    root " << root << "/www;\n"
      << "    # POST to a static file is 405: answer it with the file (an internal GET).\n"
      << "    location / { error_page 405 =200 $uri; }\n  }\n}\n";
  }
  try {
    pid_ = spawn({nginx, "-p", root, "-c", root + "/nginx.conf", "-e", root + "/error.log"}, false, {},
                 root + "/stderr.log")
               .pid;
  } catch (const std::exception& e) {
    error = e.what();
    return false;
  }
  error = "nginx (" + nginx + ", logs in " + root + ")";
  return wait_ready(port, error);
}

int static_server_main(const std::vector<std::string>& args) {
  int port = 0, threads = 2;
  std::map<std::string, std::string> bodies;
  for (std::size_t i = 0; i + 1 < args.size(); i += 2) {
    if (args[i] == "--port") {
      port = std::stoi(args[i + 1]);
    } else if (args[i] == "--threads") {
      threads = std::stoi(args[i + 1]);
    } else if (args[i] == "--reply") {
      const auto eq = args[i + 1].find('=');
      if (eq == std::string::npos) return 2;
      bodies["/" + args[i + 1].substr(0, eq)] = static_body(std::stoull(args[i + 1].substr(eq + 1)));
    } else {
      std::cerr << "static-server: unknown argument " << args[i] << "\n";
      return 2;
    }
  }
  net::Server server(threads, common::null_logger());
  net::ListenerOptions lo;
  lo.name = "xml";
  lo.address = "127.0.0.1";
  lo.port = static_cast<std::uint16_t>(port);
  lo.idle_timeout = Millis{300000};
  server.add_listener(lo, [&bodies](net::HttpRequest&& req, net::Responder respond) {
    net::HttpResponse r;
    auto it = bodies.find(req.path);
    if (it == bodies.end()) {
      r.status = req.method == "GET" ? 200 : 404;  // GET /: the readiness probe
      r.body = "static-server\n";
    } else {
      r.content_type = "text/xml";
      r.body = it->second;
    }
    respond(std::move(r));
  });
  server.start();
  server.wait_for_signal();
  server.stop(Millis{2000});
  return 0;
}

}  // namespace bench
