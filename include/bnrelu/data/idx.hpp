// The IDX file format (MNIST and friends), raw or gzip-compressed.
//
// Layout: 0x00 0x00, a type byte (0x08 u8, 0x09 i8, 0x0B i16, 0x0C i32, 0x0D f32, 0x0E f64),
// a dimension count, that many big-endian u32 sizes, then the elements, big-endian.
#pragma once

#include <zlib.h>

#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
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

// Reads a file through zlib, which passes uncompressed files through unchanged.
class GzReader {
 public:
  explicit GzReader(const std::string& path) : path_(path), f_(gzopen(path.c_str(), "rb")) {
    if (!f_) throw format_error("read_idx: cannot open " + path);
    gzbuffer(f_, 1 << 17);
  }
  ~GzReader() { gzclose(f_); }
  GzReader(const GzReader&) = delete;
  GzReader& operator=(const GzReader&) = delete;

  // Reads up to n bytes; returns how many were read (fewer only at the end of the data).
  std::size_t read(unsigned char* out, std::size_t n) {
    std::size_t done = 0;
    while (done < n) {
      const unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(n - done, 1u << 30));
      const int got = gzread(f_, out + done, chunk);
      if (got < 0) {
        int err = 0;
        const char* msg = gzerror(f_, &err);
        throw format_error("read_idx: " + path_ + ": " + (msg ? msg : "read error"));
      }
      if (got == 0) break;
      done += static_cast<std::size_t>(got);
    }
    return done;
  }

 private:
  std::string path_;
  gzFile f_;
};

template <class T>
IdxData read_elements(GzReader& in, const std::string& path, std::uint64_t count) {
  std::vector<T> out;
  constexpr std::size_t kChunk = std::size_t{1} << 20;  // grow as data arrives: no huge
  std::vector<unsigned char> buf(kChunk * sizeof(T));   // allocation for a lying header
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

// Reads an IDX file, raw or .gz; format_error on a bad magic, type or dimension, a truncated
// file, or bytes after the data.
inline IdxArray read_idx(const std::string& path) {
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
    if (v != 0 && count > kMaxIdxBytes / v) too_big = true;  // checked before it can overflow
    else count *= v;
  }
  if (esize && (too_big || count > kMaxIdxBytes / esize))
    throw format_error("read_idx: " + path + " declares more than 8 GiB of data (" + shape_string(out.dims) + ")");
  switch (magic[2]) {
    case 0x08: out.data = detail::read_elements<std::uint8_t>(in, path, count); break;
    case 0x09: out.data = detail::read_elements<std::int8_t>(in, path, count); break;
    case 0x0B: out.data = detail::read_elements<std::int16_t>(in, path, count); break;
    case 0x0C: out.data = detail::read_elements<std::int32_t>(in, path, count); break;
    case 0x0D: out.data = detail::read_elements<float>(in, path, count); break;
    case 0x0E: out.data = detail::read_elements<double>(in, path, count); break;
    default:
      throw format_error("read_idx: " + path + " has unknown element type 0x" +
                         std::to_string(magic[2] >> 4) + std::to_string(magic[2] & 15));
  }
  unsigned char extra;
  if (in.read(&extra, 1) != 0)
    throw format_error("read_idx: " + path + " has bytes after the " + std::to_string(count) + " elements its header declares");
  return out;
}

}  // namespace bnrelu::data
