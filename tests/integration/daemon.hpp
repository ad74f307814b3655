// tests/integration/daemon.hpp: starts the real brokerd on free ports (port 0 + --ready-file)
// with a temporary directory for its config and database, and runs command-line tools.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace itest {

struct CommandResult {
  int exit_code = -1;
  std::string out, err;
};

// Runs argv[0] with the arguments, feeding `input` on stdin; waits for it to exit.
CommandResult run_command(const std::vector<std::string>& argv, const std::string& input = {},
                          const std::map<std::string, std::string>& env = {});

// A fresh temporary directory, removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  void write(const std::string& name, const std::string& text) const;

 private:
  std::string path_;
};

class Daemon {
 public:
  explicit Daemon(const TempDir& dir) : dir_(dir) {}
  ~Daemon();  // kills the daemon if still running

  // Writes `config_text` to <dir>/brokerd.toml and starts brokerd. Returns false (with the
  // daemon's stderr in log()) if it exits or is not ready within 60 s.
  bool start(const std::string& config_text);
  // SIGTERM and wait; returns the exit code (or -1).
  int stop();
  // SIGKILL (a crash: nothing is flushed or closed) and wait.
  void kill();

  int xml_port() const { return xml_; }
  int agent_port() const { return agent_; }
  int admin_port() const { return admin_; }
  std::string admin_url() const { return "http://127.0.0.1:" + std::to_string(admin_); }
  std::string log() const;  // what the daemon wrote to stderr so far
  std::string config_path() const { return dir_.file("brokerd.toml"); }

 private:
  const TempDir& dir_;
  int pid_ = -1;
  int xml_ = 0, agent_ = 0, admin_ = 0;
};

// The basic config used by the tests: listeners on port 0, the database in `dir`, one admin
// token "test-token" (name "tester"), plus `extra` TOML appended; `agent_listener`: more keys
// of [listeners.agent] (TLS).
std::string base_config(const TempDir& dir, const std::string& extra = {}, const std::string& agent_listener = {});

inline constexpr const char* kToken = "test-token";

}  // namespace itest
