// The safetensors format: read and write raw tensors, save and load models by PyTorch
// state_dict names.
//
// Layout: u64 little-endian header length n, n bytes of JSON
//   {"<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"<key>": "<string>"}}
// then the data buffer; offsets are relative to the buffer, and tensors tile it exactly.
#pragma once

#include <algorithm>
#include <bit>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "../error.hpp"
#include "../nn/layer.hpp"
#include "../tensor.hpp"
#include "atomic_file.hpp"

namespace bnrelu::io {

static_assert(std::endian::native == std::endian::little, "bnrelu's file formats assume little-endian");

// One tensor as stored: dtype name ("F64", "F32", "I64", ...), shape and raw bytes.
struct RawTensor {
  std::string dtype;
  std::vector<Index> shape;
  std::string bytes;

  Index numel() const {
    Index n = 1;
    for (auto d : shape) n *= d;
    return n;
  }

  // The elements converted to T; format_error if the dtype is not a number type we read.
  template <class T>
  std::vector<T> as() const {
    std::vector<T> out(static_cast<std::size_t>(numel()));
    auto convert = [&]<class S>(S) {
      for (std::size_t i = 0; i < out.size(); ++i) {
        S s;
        std::memcpy(&s, bytes.data() + i * sizeof(S), sizeof(S));
        out[i] = static_cast<T>(s);
      }
    };
    if (dtype == "F64") convert(double{});
    else if (dtype == "F32") convert(float{});
    else if (dtype == "I64") convert(std::int64_t{});
    else if (dtype == "I32") convert(std::int32_t{});
    else if (dtype == "I16") convert(std::int16_t{});
    else if (dtype == "I8") convert(std::int8_t{});
    else if (dtype == "U8" || dtype == "BOOL") convert(std::uint8_t{});
    else throw format_error("safetensors: cannot convert dtype " + dtype);
    return out;
  }

  template <class T>
  static RawTensor from(std::span<const T> values, std::vector<Index> shape);
};

template <class T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, double>) return "F64";
  else if constexpr (std::is_same_v<T, float>) return "F32";
  else if constexpr (std::is_same_v<T, std::int64_t>) return "I64";
  else if constexpr (std::is_same_v<T, std::int32_t>) return "I32";
  else static_assert(sizeof(T) == 0, "unsupported element type");
}

template <class T>
RawTensor RawTensor::from(std::span<const T> values, std::vector<Index> shape) {
  RawTensor t{dtype_name<T>(), std::move(shape), {}};
  t.bytes.assign(reinterpret_cast<const char*>(values.data()), values.size_bytes());
  return t;
}

inline std::size_t dtype_size(const std::string& dtype) {
  static const std::map<std::string, std::size_t> sizes{
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2},
      {"I8", 1},  {"U64", 8}, {"U32", 4}, {"U16", 2},  {"U8", 1},  {"BOOL", 1}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

// The format's own limit on the JSON header, and a bound on tensor rank.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;
inline constexpr std::size_t kMaxRank = 32;

struct SafetensorsFile {
  std::map<std::string, RawTensor> tensors;
  std::map<std::string, std::string> metadata;
};

// Parses a whole file held in memory; format_error for anything malformed.
inline SafetensorsFile parse_safetensors(std::string_view data, const std::string& what = "buffer") {
  auto bad = [&](const std::string& why) -> format_error {
    return format_error("safetensors " + what + ": " + why);
  };
  if (data.size() < 8) throw bad("shorter than the 8-byte header length");
  std::uint64_t n = 0;
  std::memcpy(&n, data.data(), 8);
  if (n > data.size() - 8) throw bad("header length " + std::to_string(n) + " exceeds the file");
  if (n > kMaxHeaderBytes) throw bad("header length " + std::to_string(n) + " exceeds the format's 100 MB limit");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(data.substr(8, n));
  } catch (const nlohmann::json::exception& e) {
    throw bad(std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) throw bad("header is not a JSON object");
  const std::string_view buffer = data.substr(8 + n);
  SafetensorsFile file;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) throw bad("__metadata__ is not an object");
      for (auto& [k, v] : entry.items()) {
        if (!v.is_string()) throw bad("metadata value for " + k + " is not a string");
        file.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets") || !entry["dtype"].is_string() ||
        !entry["shape"].is_array() || !entry["data_offsets"].is_array() ||
        entry["data_offsets"].size() != 2)
      throw bad("tensor " + name + " lacks a valid dtype, shape or data_offsets");
    RawTensor t;
    t.dtype = entry["dtype"].get<std::string>();
    const std::size_t esize = dtype_size(t.dtype);
    if (esize == 0) throw bad("tensor " + name + " has unknown dtype " + t.dtype);
    if (entry["shape"].size() > kMaxRank) throw bad("tensor " + name + " has more than 32 dimensions");
    std::uint64_t count = 1;
    bool too_big = false;
    for (auto& d : entry["shape"]) {
      if (!d.is_number_unsigned()) throw bad("tensor " + name + " has a bad dimension");
      const auto v = d.get<std::uint64_t>();
      if (v > static_cast<std::uint64_t>(std::numeric_limits<Index>::max())) throw bad("tensor " + name + " has a bad dimension");
      if (v != 0 && count > std::numeric_limits<std::uint64_t>::max() / esize / v) too_big = true;
      else count *= v;
      t.shape.push_back(static_cast<Index>(v));
    }
    if (too_big || count * esize > buffer.size()) throw bad("tensor " + name + " is larger than the file");
    const auto& off = entry["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw bad("tensor " + name + " has bad data_offsets");
    const auto begin = off[0].get<std::uint64_t>(), end = off[1].get<std::uint64_t>();
    if (begin > end || end > buffer.size())
      throw bad("tensor " + name + " data_offsets [" + std::to_string(begin) + ", " +
                std::to_string(end) + "] lie outside the " + std::to_string(buffer.size()) +
                "-byte data buffer");
    if (end - begin != count * esize)
      throw bad("tensor " + name + " has " + std::to_string(end - begin) + " bytes, expected " +
                std::to_string(count * esize) + " for shape " + shape_string(t.shape) + " " + t.dtype);
    t.bytes.assign(buffer.substr(begin, end - begin));
    ranges.emplace_back(begin, end);
    file.tensors.emplace(name, std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  std::uint64_t pos = 0;
  for (auto [b, e] : ranges) {
    if (b != pos) throw bad("tensor data overlaps or leaves gaps in the buffer");
    pos = e;
  }
  if (pos != buffer.size()) throw bad("the data buffer has trailing bytes");
  return file;
}

// The bytes of a safetensors file, read as its header declares them: the 8-byte length and the
// header first, then exactly the data buffer the header's offsets call for, then a check that
// nothing follows. A file whose header is bad or declares more data than the file holds is
// refused before its body is read, so a junk file (or /dev/zero) costs no more than its header.
inline std::string read_safetensors_bytes(const std::string& path) {
  auto bad = [&](const std::string& why) { return format_error("safetensors " + path + ": " + why); };
  std::ifstream in(path, std::ios::binary);
  if (!in) throw format_error("cannot open " + path);
  std::string data(8, '\0');
  if (!in.read(data.data(), 8)) throw bad("shorter than the 8-byte header length");
  std::uint64_t n = 0;
  std::memcpy(&n, data.data(), 8);
  if (n > kMaxHeaderBytes) throw bad("header length " + std::to_string(n) + " exceeds the format's 100 MB limit");
  // a regular file's size bounds what may be read; other files (pipes, devices) are read as far
  // as the header says and no further
  std::error_code ec;
  const auto file_size = std::filesystem::is_regular_file(path, ec) ? std::filesystem::file_size(path, ec)
                                                                      : static_cast<std::uintmax_t>(-1);
  if (!ec && file_size != static_cast<std::uintmax_t>(-1) && n > file_size - 8)
    throw bad("header length " + std::to_string(n) + " exceeds the file");
  data.resize(8 + n);
  if (!in.read(data.data() + 8, static_cast<std::streamsize>(n))) throw bad("header length " + std::to_string(n) + " exceeds the file");
  std::uint64_t body = 0;  // the end of the last tensor's data, as declared
  try {
    const auto header = nlohmann::json::parse(std::string_view(data).substr(8));
    if (header.is_object())
      for (auto& [name, entry] : header.items())
        if (name != "__metadata__" && entry.is_object() && entry.contains("data_offsets") &&
            entry["data_offsets"].is_array() && entry["data_offsets"].size() == 2 &&
            entry["data_offsets"][1].is_number_unsigned())
          body = std::max(body, entry["data_offsets"][1].get<std::uint64_t>());
  } catch (const nlohmann::json::exception& e) {
    throw bad(std::string("header is not valid JSON: ") + e.what());
  }
  if (file_size != static_cast<std::uintmax_t>(-1) && body > file_size - 8 - n)
    throw bad("the header declares " + std::to_string(body) + " bytes of tensor data, the file holds " +
              std::to_string(file_size - 8 - n));
  // read in pieces, so that a stream shorter than declared never allocates the whole amount
  constexpr std::uint64_t kPiece = std::uint64_t{64} << 20;
  for (std::uint64_t done = 0; done < body;) {
    const std::uint64_t piece = std::min(kPiece, body - done);
    data.resize(static_cast<std::size_t>(8 + n + done + piece));
    if (!in.read(data.data() + 8 + n + done, static_cast<std::streamsize>(piece)))
      throw bad("the header declares " + std::to_string(body) + " bytes of tensor data, the file ends before");
    done += piece;
  }
  if (in.peek() != std::char_traits<char>::eof()) throw bad("the data buffer has trailing bytes");
  return data;
}

inline SafetensorsFile read_safetensors(const std::string& path) {
  return parse_safetensors(read_safetensors_bytes(path), path);
}

// The metadata entry key of file as a number of type N (an integer type or double), parsed
// whole; format_error naming the key when it is missing, not a number, or outside [lo, hi].
template <class N>
N metadata_number(const SafetensorsFile& file, const std::string& key, N lo = std::numeric_limits<N>::lowest(),
                  N hi = std::numeric_limits<N>::max()) {
  const auto it = file.metadata.find(key);
  if (it == file.metadata.end()) throw format_error("safetensors metadata lacks the entry " + key);
  const std::string& text = it->second;
  N value{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc{} || end != text.data() + text.size() || text.empty() || !(value >= lo && value <= hi))
    throw format_error("safetensors metadata entry " + key + " = \"" + text.substr(0, 40) + "\" is not a number in [" +
                       std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return value;
}

// Serialises tensors (in the given order) and metadata into safetensors bytes.
inline std::string serialize_safetensors(const std::vector<std::pair<std::string, RawTensor>>& tensors,
                                         const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    header[name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const std::uint64_t n = h.size();
  std::memcpy(out.data(), &n, 8);
  out += h;
  for (const auto& [name, t] : tensors) out += t.bytes;
  return out;
}

inline void write_safetensors(const std::string& path,
                              const std::vector<std::pair<std::string, RawTensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  write_file_atomic(path, serialize_safetensors(tensors, metadata));
}


// The model's state_dict: parameters, running buffers and num_batches_tracked (I64).
// std::logic_error for a model after fuse_for_inference: its folded weights would load into a
// PyTorch model (or a fresh bnrelu one) without error and compute something else.
template <class Model>
std::vector<std::pair<std::string, RawTensor>> state_dict(Model& model) {
  using T = typename Model::value_type;
  if (nn::any_folded(model))
    throw std::logic_error("state_dict: the model was folded for inference (fuse_for_inference); its weights are no "
                           "checkpoint. Save before folding, and fold after loading");
  std::vector<std::pair<std::string, RawTensor>> out;
  for (auto& p : model.named_parameters())
    out.emplace_back(p.name, RawTensor::from<T>(p.value, p.shape));
  for (auto& b : model.named_buffers())
    out.emplace_back(b.name, RawTensor::from<T>(b.value, b.shape));
  nn::check_counters_reachable(model, "state_dict");
  nn::for_each_batch_counter(model, "", [&](const std::string& name, std::int64_t& v) {
    out.emplace_back(name, RawTensor::from<std::int64_t>(std::span<const std::int64_t>(&v, 1), {}));
  });
  return out;
}

// Saves the model's state_dict atomically (temporary file, then rename).
template <class Model>
void save_safetensors(Model& model, const std::string& path,
                      const std::map<std::string, std::string>& metadata = {}) {
  write_safetensors(path, state_dict(model), metadata);
}

// Loads a state_dict into the model. Strict: a missing, unexpected or wrongly shaped tensor,
// or a non-numeric dtype, is a format_error and the model is left unchanged.
// std::logic_error (and no change) for a model after fuse_for_inference: load, then fold.
template <class Model>
void load_state_dict(Model& model, const SafetensorsFile& file, const std::string& what) {
  using T = typename Model::value_type;
  if (nn::any_folded(model))
    throw std::logic_error("load_state_dict " + what + ": the model was folded for inference (fuse_for_inference); "
                           "load into an unfolded model, then fold it");
  auto bad = [&](const std::string& why) { return format_error("load_safetensors " + what + ": " + why); };
  struct Target {
    std::string name;
    std::vector<Index> shape;
    std::span<T> dst;
    std::int64_t* counter;
  };
  std::vector<Target> targets;
  for (auto& p : model.named_parameters()) targets.push_back({p.name, p.shape, p.value, nullptr});
  for (auto& b : model.named_buffers()) targets.push_back({b.name, b.shape, b.value, nullptr});
  nn::check_counters_reachable(model, what);
  nn::for_each_batch_counter(model, "", [&](const std::string& name, std::int64_t& v) {
    targets.push_back({name, {}, {}, &v});
  });
  std::vector<std::vector<T>> values(targets.size());
  std::vector<std::int64_t> counters(targets.size());
  for (std::size_t i = 0; i < targets.size(); ++i) {
    const auto& t = targets[i];
    const auto it = file.tensors.find(t.name);
    if (it == file.tensors.end()) throw bad("missing tensor " + t.name);
    const RawTensor& raw = it->second;
    const bool scalar_ok = t.counter && raw.numel() == 1 && raw.shape.size() <= 1;
    if (!scalar_ok && raw.shape != t.shape)
      throw bad("tensor " + t.name + " has shape " + shape_string(raw.shape) + ", the model expects " +
                shape_string(t.shape));
    if (t.counter) {
      if (raw.dtype != "I64") throw bad("tensor " + t.name + " must be I64, got " + raw.dtype);
      counters[i] = raw.as<std::int64_t>()[0];
    } else {
      if (raw.dtype != "F32" && raw.dtype != "F64")
        throw bad("tensor " + t.name + " must be F32 or F64, got " + raw.dtype);
      values[i] = raw.as<T>();
    }
  }
  for (const auto& entry : file.tensors) {
    const std::string& name = entry.first;
    const bool known = std::any_of(targets.begin(), targets.end(), [&](const Target& t) { return t.name == name; });
    if (!known) throw bad("unexpected tensor " + name);
  }
  for (std::size_t i = 0; i < targets.size(); ++i) {  // nothing has thrown: commit
    if (targets[i].counter) *targets[i].counter = counters[i];
    else std::copy(values[i].begin(), values[i].end(), targets[i].dst.begin());
  }
}

template <class Model>
void load_safetensors(Model& model, const std::string& path) {
  load_state_dict(model, read_safetensors(path), path);
}

}  // namespace bnrelu::io
