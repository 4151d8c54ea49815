// The IDX file format (MNIST and friends), raw or gzip-compressed.
//
// Layout: 0x00 0x00, a type byte (0x08 u8, 0x09 i8, 0x0B i16, 0x0C i32, 0x0D f32, 0x0E f64),
// a dimension count, that many big-endian u32 sizes, then the elements, big-endian.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <limits>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "../error.hpp"
#include "../tensor.hpp"

namespace bnrelu::data {

// The elements of an IDX file in their own type, native byte order.
using IdxData = std::variant<std::vector<std::uint8_t>, std::vector<std::int8_t>, std::vector<std::int16_t>,
                             std::vector<std::int32_t>, std::vector<float>, std::vector<double>>;

struct IdxArray {
  std::vector<Index> dims;
  IdxData data;

  Index size() const {
    return std::visit([](const auto& v) { return static_cast<Index>(v.size()); }, data);
  }
  // The elements converted to T.
  template <class T>
  std::vector<T> values() const {
    return std::visit([](const auto& v) { return std::vector<T>(v.begin(), v.end()); }, data);
  }
};

// Files whose data would exceed this many bytes (decompressed) are refused, not allocated.
inline constexpr std::uint64_t kMaxIdxBytes = std::uint64_t{8} << 30;

inline std::size_t idx_element_size(unsigned char type) {
  switch (type) {
    case 0x08: case 0x09: return 1;
    case 0x0B: return 2;
    case 0x0C: case 0x0D: return 4;
    case 0x0E: return 8;
    default: return 0;
  }
}

namespace detail {

template <class T>
T from_big_endian(const unsigned char* p) {
  using U = std::conditional_t<sizeof(T) == 1, std::uint8_t,
            std::conditional_t<sizeof(T) == 2, std::uint16_t,
            std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>>>;
  U u = 0;
  for (std::size_t i = 0; i < sizeof(T); ++i) u = static_cast<U>((u << 8) | p[i]);
  return std::bit_cast<T>(u);
}

// Reads a file as a byte stream: raw, or, when it starts with the gzip magic (1f 8b), the data
// of its gzip members, inflated on demand. A gzip stream must be whole: a member cut before
// its trailer (CRC-32 and length), or bytes after the last member that do not start another,
// is a format_error.
class GzReader {
 public:
  explicit GzReader(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "rb")) {
    if (!f_) throw format_error("read_idx: cannot open " + path);
    in_.resize(1 << 17);
    fill();
    gzip_ = avail_ >= 2 && in_[0] == 0x1f && in_[1] == 0x8b;
    if (gzip_) {
      if (inflateInit2(&z_, 15 + 16) != Z_OK) {
        std::fclose(f_);
        throw format_error("read_idx: " + path + ": cannot start zlib");
      }
      z_started_ = true;
    }
  }
  ~GzReader() {
    if (z_started_) inflateEnd(&z_);
    std::fclose(f_);
  }
  GzReader(const GzReader&) = delete;
  GzReader& operator=(const GzReader&) = delete;

  // Reads up to n bytes; returns how many were read (fewer only at the end of the data).
  std::size_t read(unsigned char* out, std::size_t n) { return gzip_ ? inflate_into(out, n) : copy_into(out, n); }

 private:
  [[noreturn]] void fail(const std::string& why) const { throw format_error("read_idx: " + path_ + ": " + why); }

  // Refills the input buffer when it is empty; false at the end of the file.
  bool fill() {
    if (avail_ > 0) return true;
    next_ = 0;
    avail_ = std::fread(in_.data(), 1, in_.size(), f_);
    if (avail_ == 0 && std::ferror(f_)) fail("read error");
    return avail_ > 0;
  }

  std::size_t copy_into(unsigned char* out, std::size_t n) {
    std::size_t done = 0;
    while (done < n && fill()) {
      const std::size_t k = std::min(n - done, avail_);
      std::memcpy(out + done, in_.data() + next_, k);
      next_ += k;
      avail_ -= k;
      done += k;
    }
    return done;
  }

  std::size_t inflate_into(unsigned char* out, std::size_t n) {
    std::size_t done = 0;
    while (done < n) {
      if (member_ended_) {  // the end of the data, another member, or junk
        if (!fill()) return done;
        if (avail_ < 2) top_up();  // two bytes tell a gzip member
        if (avail_ < 2 || in_[next_] != 0x1f || in_[next_ + 1] != 0x8b) fail("has bytes after its gzip stream");
        inflateReset(&z_);
        member_ended_ = false;
      }
      if (avail_ == 0 && !fill()) fail("the gzip stream is truncated (it ends before its trailer)");
      z_.next_in = in_.data() + next_;
      z_.avail_in = static_cast<uInt>(avail_);
      const std::size_t room = std::min<std::size_t>(n - done, 1u << 30);
      z_.next_out = out + done;
      z_.avail_out = static_cast<uInt>(room);
      const int ret = inflate(&z_, Z_NO_FLUSH);
      const std::size_t consumed = avail_ - z_.avail_in;
      next_ += consumed;
      avail_ -= consumed;
      done += room - z_.avail_out;
      if (ret == Z_STREAM_END) member_ended_ = true;
      else if (ret == Z_BUF_ERROR && consumed == 0 && room == z_.avail_out && avail_ > 0) fail("inflate made no progress");
      else if (ret != Z_OK && ret != Z_BUF_ERROR) fail(std::string("bad gzip data: ") + (z_.msg ? z_.msg : "inflate error"));
    }
    return done;
  }

  // Moves the unread bytes to the front of the buffer and reads more after them.
  void top_up() {
    std::memmove(in_.data(), in_.data() + next_, avail_);
    next_ = 0;
    avail_ += std::fread(in_.data() + avail_, 1, in_.size() - avail_, f_);
  }

  std::string path_;
  std::FILE* f_;
  std::vector<unsigned char> in_;
  std::size_t next_ = 0, avail_ = 0;
  bool gzip_ = false, z_started_ = false, member_ended_ = false;
  z_stream z_{};
};

template <class T>
IdxData read_elements(GzReader& in, const std::string& path, std::uint64_t count) {
  std::vector<T> out;
  constexpr std::size_t kChunk = std::size_t{1} << 20;  // grow as data arrives: no huge
  std::vector<unsigned char> buf(kChunk * sizeof(T));   // allocation for a lying header
  out.reserve(static_cast<std::size_t>(std::min<std::uint64_t>(count, kChunk)));
  std::uint64_t done = 0;
  while (done < count) {
    const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(count - done, kChunk));
    const std::size_t got = in.read(buf.data(), want * sizeof(T));
    if (got != want * sizeof(T))
      throw format_error("read_idx: " + path + " is truncated: expected " + std::to_string(count) +
                         " elements, the data ends after " + std::to_string(done + got / sizeof(T)));
    for (std::size_t i = 0; i < want; ++i) out.push_back(from_big_endian<T>(buf.data() + i * sizeof(T)));
    done += want;
  }
  return out;
}

}  // namespace detail

// Reads an IDX file, raw or .gz; format_error on a bad magic, type or dimension, data larger
// than max_bytes (decompressed) or than memory holds, a truncated file or gzip stream, or
// bytes after the data. Nothing past what the header declares is decompressed.
inline IdxArray read_idx(const std::string& path, std::uint64_t max_bytes = kMaxIdxBytes) {
  detail::GzReader in(path);
  unsigned char magic[4];
  if (in.read(magic, 4) != 4) throw format_error("read_idx: " + path + " is shorter than the 4-byte magic");
  if (magic[0] != 0 || magic[1] != 0)
    throw format_error("read_idx: " + path + " does not start with an IDX magic (00 00 type ndims)");
  const int ndims = magic[3];
  if (ndims == 0) throw format_error("read_idx: " + path + " declares 0 dimensions");
  std::vector<unsigned char> dim_bytes(4 * static_cast<std::size_t>(ndims));
  if (in.read(dim_bytes.data(), dim_bytes.size()) != dim_bytes.size())
    throw format_error("read_idx: " + path + " is truncated inside its dimensions");
  const std::size_t esize = idx_element_size(magic[2]);
  IdxArray out;
  std::uint64_t count = 1;
  bool too_big = false;
  for (int d = 0; d < ndims; ++d) {
    const auto v = detail::from_big_endian<std::uint32_t>(dim_bytes.data() + 4 * d);
    out.dims.push_back(static_cast<Index>(v));
    if (v != 0 && count > max_bytes / v) too_big = true;  // checked before it can overflow
    else count *= v;
  }
  if (esize && (too_big || count > max_bytes / esize))
    throw format_error("read_idx: " + path + " declares " + shape_string(out.dims) + " elements of " +
                       std::to_string(esize) + " bytes, more than the " + std::to_string(max_bytes) + " bytes allowed");
  try {
  switch (magic[2]) {
    case 0x08: out.data = detail::read_elements<std::uint8_t>(in, path, count); break;
    case 0x09: out.data = detail::read_elements<std::int8_t>(in, path, count); break;
    case 0x0B: out.data = detail::read_elements<std::int16_t>(in, path, count); break;
    case 0x0C: out.data = detail::read_elements<std::int32_t>(in, path, count); break;
    case 0x0D: out.data = detail::read_elements<float>(in, path, count); break;
    case 0x0E: out.data = detail::read_elements<double>(in, path, count); break;
    default: {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02X", static_cast<unsigned>(magic[2]));
      throw format_error("read_idx: " + path + " has unknown element type " + hex +
                         " (known: 0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E)");
    }
  }
  } catch (const std::bad_alloc&) {
    throw format_error("read_idx: " + path + ": its " + shape_string(out.dims) + " elements do not fit in memory");
  }
  unsigned char extra;
  if (in.read(&extra, 1) != 0)
    throw format_error("read_idx: " + path + " has bytes after the " + std::to_string(count) + " elements its header declares");
  return out;
}

}  // namespace bnrelu::data
