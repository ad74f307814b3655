// tools/broker-bench/process.hpp: child processes and what /proc says about them, for the storm
// harness (brokerd, the agent workers, the static-reply server, nginx). Linux only.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace bench {

using Millis = std::chrono::milliseconds;

// A started child. in_fd / out_fd: the write end of its stdin and the read end of its stdout when
// started with pipes (else -1).
struct Child {
  int pid = -1;
  int in_fd = -1;
  int out_fd = -1;
};

// Starts argv[0] (a path) with the arguments. stdin/stdout are pipes to the caller when `pipes`,
// else /dev/null and `out_file`; stderr goes to `err_file` (appended). Every other descriptor is
// closed in the child. The child gets SIGTERM when the calling thread ends (PR_SET_PDEATHSIG),
// so call it from the main thread: then nothing outlives the harness, even killed. Throws
// std::runtime_error when the program cannot be started.
Child spawn(const std::vector<std::string>& argv, bool pipes, const std::string& out_file, const std::string& err_file);

// Waits up to `timeout` for pid to exit; its exit code (128 + signal), or -1 when still running.
int wait_exit(int pid, Millis timeout);
// SIGTERM, up to `grace` to exit, then SIGKILL; returns the exit code.
int terminate(int pid, Millis grace);

// CPU time (user + system) and memory of a process, from /proc/<pid>/stat and /proc/<pid>/status.
struct ProcUsage {
  bool ok = false;            // false: the process is gone (or /proc unreadable)
  double cpu_seconds = 0;     // utime + stime
  std::uint64_t rss_kib = 0;  // VmRSS
  std::uint64_t hwm_kib = 0;  // VmHWM: peak RSS
  std::uint64_t threads = 0;
};
ProcUsage read_usage(int pid);
// The calling process's own CPU time (all threads).
double self_cpu_seconds();

// One line at a time over a pipe, with a deadline. Not thread-safe.
class LineReader {
 public:
  explicit LineReader(int fd = -1) : fd_(fd) {}
  // The next line (without '\n'); false on EOF, error or timeout (then `line` is empty).
  bool read(std::string& line, Millis timeout);

 private:
  int fd_;
  std::string buffer_;
};
// Writes all of `text`; false when the pipe is closed.
bool write_all(int fd, const std::string& text);

// The machine, for reports: "Intel(R) Xeon(R) ... x 2 cores, 23.5 GiB, Linux 6.1.0".
struct MachineInfo {
  std::string cpu;
  int cores = 0;
  double memory_gib = 0;
  std::string kernel;
  std::string describe() const;
};
MachineInfo machine_info();
double load_average();  // 1-minute

std::string self_exe();  // /proc/self/exe
// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now.
std::size_t raise_descriptor_limit();
int free_loopback_port();  // binds 127.0.0.1:0, returns the port and closes (0 on failure)

}  // namespace bench
