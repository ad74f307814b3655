#include "tests/integration/daemon.hpp"

#include "common/crypto.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <thread>

extern char** environ;

namespace itest {
namespace fs = std::filesystem;

namespace {
std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int spawn(const std::vector<std::string>& argv, const std::string& in_file, const std::string& out_file,
          const std::string& err_file, const std::map<std::string, std::string>& env) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, in_file.empty() ? "/dev/null" : in_file.c_str(), O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, out_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e) {
    std::string s(*e);
    const auto key = s.substr(0, s.find('='));
    if (!env.contains(key)) env_strings.push_back(s);
  }
  for (const auto& [k, v] : env) env_strings.push_back(k + "=" + v);
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0].c_str(), &fa, nullptr, args.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw std::runtime_error("cannot start " + argv[0]);
  return pid;
}

int wait_exit(int pid) {
  int status = 0;
  if (waitpid(pid, &status, 0) < 0) return -1;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}
}  // namespace

CommandResult run_command(const std::vector<std::string>& argv, const std::string& input,
                          const std::map<std::string, std::string>& env) {
  TempDir tmp;
  tmp.write("in", input);
  const int pid = spawn(argv, tmp.file("in"), tmp.file("out"), tmp.file("err"), env);
  CommandResult r;
  r.exit_code = wait_exit(pid);
  r.out = slurp(tmp.file("out"));
  r.err = slurp(tmp.file("err"));
  return r;
}

TempDir::TempDir() {
  std::string tmpl = (fs::temp_directory_path() / "openbroker-test-XXXXXX").string();
  if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

void TempDir::write(const std::string& name, const std::string& text) const {
  std::ofstream out(file(name), std::ios::trunc);
  out << text;
}

Daemon::~Daemon() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    wait_exit(pid_);
  }
}

bool Daemon::start(const std::string& config_text) {
  dir_.write("brokerd.toml", config_text);
  const std::string ready = dir_.file("ready.json");
  std::error_code ec;
  fs::remove(ready, ec);
  pid_ = spawn({BROKERD_PATH, "--config", config_path(), "--ready-file", ready}, "", dir_.file("brokerd.out"),
               dir_.file("brokerd.err"), {});
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    if (fs::exists(ready)) {
      const auto text = slurp(ready);
      std::smatch m;
      if (std::regex_search(text, m, std::regex(R"("xml":(\d+),"agent":(\d+),"admin":(\d+))"))) {
        xml_ = std::stoi(m[1]);
        agent_ = std::stoi(m[2]);
        admin_ = std::stoi(m[3]);
        return true;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

int Daemon::stop() {
  if (pid_ <= 0) return -1;
  ::kill(pid_, SIGTERM);
  const int code = wait_exit(pid_);
  pid_ = -1;
  return code;
}

void Daemon::kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  wait_exit(pid_);
  pid_ = -1;
}

std::string Daemon::log() const { return slurp(dir_.file("brokerd.err")); }

std::string base_config(const TempDir& dir, const std::string& extra, const std::string& agent_listener) {
  std::string c;
  c += "[listeners.xml]\nport = 0\n[listeners.agent]\nport = 0\n" + agent_listener + "[listeners.admin]\nport = 0\n";
  c += "[database]\npath = \"" + dir.file("broker.db") + "\"\n";
  c += "[logging]\nlevel = \"info\"\n";
  c += "[admin]\nunauthenticated_paths = [\"/metrics\"]\n";
  c += "[[admin.token]]\nname = \"tester\"\nsha256 = \"" + common::crypto::sha256_hex(kToken) + "\"\n";
  c += extra;
  return c;
}

}  // namespace itest
