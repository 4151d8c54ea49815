// Crash-safe file writes: a temporary file in the same directory, fsync, then rename.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>

#include "../error.hpp"

namespace bnrelu::io {

namespace detail {
// The file a write to path replaces: path itself, or the file a symbolic link at path leads to
// (through any chain of links; the last may not exist yet), so that a link keeps being a link.
inline std::filesystem::path write_target(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  fs::path p = path;
  for (int hops = 0;; ++hops) {  // 40: Linux's own limit on links in a path
    std::error_code ec;
    if (!fs::is_symlink(fs::symlink_status(p, ec))) return p;
    if (hops == 40) throw std::runtime_error("cannot write " + path.string() + ": too many levels of symbolic links");
    const fs::path next = fs::read_symlink(p, ec);
    if (ec) throw std::runtime_error("cannot read the symbolic link " + p.string() + ": " + ec.message());
    p = next.is_absolute() ? next : p.parent_path() / next;
  }
}
}  // namespace detail

// Replaces path with bytes atomically: a reader (or a crash) sees the old file or the new one,
// never a mix. An existing file keeps its permission bits; a new one gets 0666 less the umask,
// as any file a program creates. A symbolic link at path stays, and the file it leads to is
// replaced. Throws std::runtime_error on any I/O failure and leaves the old file in place.
inline void write_file_atomic(const std::string& path, std::string_view bytes) {
  namespace fs = std::filesystem;
  const fs::path target = detail::write_target(fs::path(path));
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  // A short temporary name, so that any valid file name can be written; unique per process and
  // call, and O_EXCL refuses a name that is somehow taken.
  static std::atomic<unsigned> counter{0};
  int fd = -1;
  std::string tmp;
  for (int attempt = 0; fd < 0 && attempt < 100; ++attempt) {
    tmp = (dir / (".bnrelu-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) + ".tmp")).string();
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);  // the umask applies
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0)
    throw std::runtime_error("cannot create a temporary file next to " + path + ": " + std::strerror(errno));
  auto fail = [&](const std::string& what) {
    const int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    throw std::runtime_error(what + " " + path + ": " + std::strerror(err));
  };
  struct stat old {};
  if (::stat(target.c_str(), &old) == 0 && ::fchmod(fd, old.st_mode & 07777) != 0)
    fail("cannot copy the permissions of");
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("cannot write");
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) fail("cannot sync");
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot close " + path + ": " + std::strerror(err));
  }
  if (::rename(tmp.c_str(), target.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot rename onto " + path + ": " + std::strerror(err));
  }
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {  // make the rename itself durable
    ::fsync(dfd);
    ::close(dfd);
  }
}

// Throws std::runtime_error naming path unless a file can be created in path's directory (and
// path, if it exists, can be written): for programs that should find out before hours of work.
inline void check_writable(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path target = detail::write_target(fs::path(path));
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::error_code ec;
  if (fs::is_directory(target, ec)) throw std::runtime_error("cannot write " + path + ": it is a directory");
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    throw std::runtime_error("cannot write " + path + ": directory " + dir.string() + ": " + std::strerror(errno));
  if (fs::exists(target, ec) && ::access(target.c_str(), W_OK) != 0)
    throw std::runtime_error("cannot write " + path + ": " + std::strerror(errno));
}

}  // namespace bnrelu::io
