// tools/broker-bench/process.cpp: see process.hpp.
#include "tools/broker-bench/process.hpp"

#include <fcntl.h>
#include <linux/close_range.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

extern char** environ;

namespace bench {
namespace {
using Clock = std::chrono::steady_clock;

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
}  // namespace

Child spawn(const std::vector<std::string>& argv, bool pipes, const std::string& out_file,
            const std::string& err_file) {
  // Everything the child needs is prepared here: between fork and exec it only calls
  // async-signal-safe functions (the harness is multi-threaded).
  int in_pipe[2] = {-1, -1}, out_pipe[2] = {-1, -1}, exec_pipe[2] = {-1, -1};
  auto close_all = [&] {
    for (int fd : {in_pipe[0], in_pipe[1], out_pipe[0], out_pipe[1], exec_pipe[0], exec_pipe[1]})
      if (fd >= 0) ::close(fd);
  };
  if (pipes) {
    if (::pipe2(in_pipe, O_CLOEXEC) != 0 || ::pipe2(out_pipe, O_CLOEXEC) != 0) {
      close_all();
      throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
    }
  } else {
    in_pipe[0] = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    out_pipe[1] =
        ::open(out_file.empty() ? "/dev/null" : out_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  }
  const int err_fd =
      ::open(err_file.empty() ? "/dev/null" : err_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (in_pipe[0] < 0 || out_pipe[1] < 0 || err_fd < 0 || ::pipe2(exec_pipe, O_CLOEXEC) != 0) {
    const std::string why = std::strerror(errno);
    close_all();
    if (err_fd >= 0) ::close(err_fd);
    throw std::runtime_error("cannot start " + argv[0] + ": " + why);
  }
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid == 0) {
    // The child dies with the harness (even when the harness is killed), so no broker, worker
    // or nginx outlives a run.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(127);
    ::dup2(in_pipe[0], 0);
    ::dup2(out_pipe[1], 1);
    ::dup2(err_fd, 2);
    const int keep = exec_pipe[1];
    ::dup2(keep, 3);
    ::fcntl(3, F_SETFD, FD_CLOEXEC);
    ::close_range(4, ~0U, 0);
    ::execve(args[0], args.data(), environ);
    const int e = errno;
    [[maybe_unused]] auto n = ::write(3, &e, sizeof e);
    ::_exit(127);
  }
  const int fork_errno = errno;
  ::close(err_fd);
  ::close(exec_pipe[1]);
  exec_pipe[1] = -1;
  ::close(in_pipe[0]);
  in_pipe[0] = -1;
  ::close(out_pipe[1]);
  out_pipe[1] = -1;
  if (pid < 0) {
    close_all();
    throw std::runtime_error("cannot start " + argv[0] + ": fork: " + std::strerror(fork_errno));
  }
  int exec_errno = 0;
  ssize_t n = 0;
  do n = ::read(exec_pipe[0], &exec_errno, sizeof exec_errno);
  while (n < 0 && errno == EINTR);
  ::close(exec_pipe[0]);
  exec_pipe[0] = -1;
  if (n > 0) {
    ::waitpid(pid, nullptr, 0);
    close_all();
    throw std::runtime_error("cannot start " + argv[0] + ": " + std::strerror(exec_errno));
  }
  Child c;
  c.pid = pid;
  if (pipes) {
    c.in_fd = in_pipe[1];
    c.out_fd = out_pipe[0];
  }
  return c;
}

int wait_exit(int pid, Millis timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    int status = 0;
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) {
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      return -1;
    }
    if (r < 0) return 255;  // not our child any more
    if (Clock::now() >= deadline) return -1;
    std::this_thread::sleep_for(Millis{10});
  }
}

int terminate(int pid, Millis grace) {
  if (pid <= 0) return -1;
  ::kill(pid, SIGTERM);
  int code = wait_exit(pid, grace);
  if (code < 0) {
    ::kill(pid, SIGKILL);
    code = wait_exit(pid, Millis{10000});
  }
  return code;
}

ProcUsage read_usage(int pid) {
  ProcUsage u;
  const std::string stat = slurp("/proc/" + std::to_string(pid) + "/stat");
  // pid (comm) state ppid ... : fields after the last ')' start with field 3 (state).
  const auto close = stat.rfind(')');
  if (close == std::string::npos) return u;
  std::istringstream in(stat.substr(close + 2));
  std::vector<std::string> f;
  for (std::string x; in >> x;) f.push_back(x);
  if (f.size() < 13) return u;
  const double tick = static_cast<double>(::sysconf(_SC_CLK_TCK));
  u.cpu_seconds = (std::stod(f[11]) + std::stod(f[12])) / tick;  // fields 14 and 15
  std::istringstream status(slurp("/proc/" + std::to_string(pid) + "/status"));
  for (std::string line; std::getline(status, line);) {
    auto value = [&] { return std::strtoull(line.c_str() + line.find(':') + 1, nullptr, 10); };
    if (line.rfind("VmRSS:", 0) == 0) u.rss_kib = value();
    if (line.rfind("VmHWM:", 0) == 0) u.hwm_kib = value();
    if (line.rfind("Threads:", 0) == 0) u.threads = value();
  }
  u.ok = true;
  return u;
}

double self_cpu_seconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6; };
  return sec(ru.ru_utime) + sec(ru.ru_stime);
}

bool LineReader::read(std::string& line, Millis timeout) {
  line.clear();
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    const auto nl = buffer_.find('\n');
    if (nl != std::string::npos) {
      line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      return true;
    }
    const auto left = std::chrono::duration_cast<Millis>(deadline - Clock::now()).count();
    if (left <= 0 || fd_ < 0) return false;
    pollfd p{fd_, POLLIN, 0};
    const int r = ::poll(&p, 1, static_cast<int>(std::min<long long>(left, INT_MAX)));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    char buf[65536];
    const auto n = ::read(fd_, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    buffer_.append(buf, static_cast<std::size_t>(n));
  }
}

bool write_all(int fd, const std::string& text) {
  std::size_t done = 0;
  while (done < text.size()) {
    const auto n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<std::size_t>(n);
  }
  return true;
}

std::string MachineInfo::describe() const {
  std::ostringstream s;
  s << cpu << ", " << cores << " cores, ";
  s.precision(3);
  s << memory_gib << " GiB memory, Linux " << kernel;
  return s.str();
}

MachineInfo machine_info() {
  MachineInfo m;
  std::istringstream cpuinfo(slurp("/proc/cpuinfo"));
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("model name", 0) == 0 && m.cpu.empty()) m.cpu = line.substr(line.find(':') + 2);
  }
  m.cores = static_cast<int>(std::thread::hardware_concurrency());
  std::istringstream meminfo(slurp("/proc/meminfo"));
  for (std::string line; std::getline(meminfo, line);)
    if (line.rfind("MemTotal:", 0) == 0)
      m.memory_gib = static_cast<double>(std::strtoull(line.c_str() + 9, nullptr, 10)) / (1024.0 * 1024.0);
  utsname u{};
  if (::uname(&u) == 0) m.kernel = u.release;
  return m;
}

double load_average() {
  double l[1] = {0};
  return ::getloadavg(l, 1) == 1 ? l[0] : 0;
}

std::string self_exe() {
  char buf[4096];
  const auto n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return {};
  return std::string(buf, static_cast<std::size_t>(n));
}

std::size_t raise_descriptor_limit() {
  rlimit r{};
  if (::getrlimit(RLIMIT_NOFILE, &r) != 0) return 0;
  if (r.rlim_cur < r.rlim_max) {
    rlimit want = r;
    want.rlim_cur = r.rlim_max == RLIM_INFINITY ? 1048576 : r.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &want) == 0) r = want;
  }
  return static_cast<std::size_t>(r.rlim_cur);
}

int free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  int port = 0;
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  ::close(fd);
  return port;
}

}  // namespace bench
