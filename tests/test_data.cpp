#include <bnrelu/data/idx.hpp>
#include <bnrelu/data/loader.hpp>
#include <bnrelu/data/mnist.hpp>

#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <limits>

#include "golden.hpp"

namespace data = bnrelu::data;
namespace fs = std::filesystem;

namespace {

fs::path scratch(const std::string& name) {
  const auto dir = fs::temp_directory_path() / ("bnrelu_data_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir / name;
}

std::string idx_bytes(unsigned char type, const std::vector<std::uint32_t>& dims, const std::string& payload) {
  std::string s{'\0', '\0', static_cast<char>(type), static_cast<char>(dims.size())};
  for (auto d : dims)
    for (int k = 3; k >= 0; --k) s.push_back(static_cast<char>((d >> (8 * k)) & 0xFF));
  return s + payload;
}

void write_raw(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

void write_gz(const fs::path& p, const std::string& bytes) {
  gzFile f = gzopen(p.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
}

// A tiny MNIST-format set: n images of h x w with pixel (i, r, c) = (i + r + c) % 256.
void write_set(const fs::path& dir, const std::string& prefix, int n, int h, int w, bool gz, const std::string& sep) {
  std::string pixels, labels;
  for (int i = 0; i < n; ++i) {
    labels.push_back(static_cast<char>(i % 3));
    for (int r = 0; r < h; ++r)
      for (int c = 0; c < w; ++c) pixels.push_back(static_cast<char>((i + r + c) % 256));
  }
  const std::string ext = gz ? ".gz" : "";
  const auto img = dir / (prefix + "-images" + sep + "idx3-ubyte" + ext);
  const auto lab = dir / (prefix + "-labels" + sep + "idx1-ubyte" + ext);
  const auto ib = idx_bytes(0x08, {static_cast<std::uint32_t>(n), static_cast<std::uint32_t>(h), static_cast<std::uint32_t>(w)}, pixels);
  const auto lb = idx_bytes(0x08, {static_cast<std::uint32_t>(n)}, labels);
  if (gz) {
    write_gz(img, ib);
    write_gz(lab, lb);
  } else {
    write_raw(img, ib);
    write_raw(lab, lb);
  }
}

}  // namespace

TEST(Idx, ReadsEveryElementTypeBigEndianRawAndGz) {
  // i16: 0x0102 = 258 and 0xFFFE = -2; i32: 0x00010000 = 65536; f32 1.5 = 0x3FC00000; f64 -2.25
  const auto i16 = idx_bytes(0x0B, {2}, std::string("\x01\x02\xFF\xFE", 4));
  const auto i32 = idx_bytes(0x0C, {1, 1}, std::string("\x00\x01\x00\x00", 4));
  const auto f32 = idx_bytes(0x0D, {1}, std::string("\x3F\xC0\x00\x00", 4));
  const auto f64 = idx_bytes(0x0E, {1}, std::string("\xC0\x02\x00\x00\x00\x00\x00\x00", 8));
  const auto i8 = idx_bytes(0x09, {3}, std::string("\x01\xFF\x80", 3));
  for (bool gz : {false, true}) {
    auto read = [&](const std::string& bytes) {
      const auto p = scratch(gz ? "t.idx.gz" : "t.idx");
      gz ? write_gz(p, bytes) : write_raw(p, bytes);
      return data::read_idx(p.string());
    };
    auto a = read(i16);
    EXPECT_EQ(a.values<int>(), (std::vector<int>{258, -2}));
    auto b = read(i32);
    EXPECT_EQ(b.dims, (std::vector<bnrelu::Index>{1, 1}));
    EXPECT_EQ(b.values<int>(), (std::vector<int>{65536}));
    EXPECT_EQ(read(f32).values<float>(), (std::vector<float>{1.5f}));
    EXPECT_EQ(read(f64).values<double>(), (std::vector<double>{-2.25}));
    EXPECT_EQ(read(i8).values<int>(), (std::vector<int>{1, -1, -128}));
  }
}

TEST(Idx, RejectsBadFilesClearly) {
  auto expect_error = [](const std::string& bytes, const std::string& needle) {
    const auto p = scratch("bad.idx");
    write_raw(p, bytes);
    try {
      data::read_idx(p.string());
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const bnrelu::format_error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error("", "shorter than");
  expect_error(std::string("\x01\x00\x08\x01", 4), "magic");
  expect_error(idx_bytes(0x07, {1}, "x"), "unknown element type");
  expect_error(std::string("\x00\x00\x08\x00", 4), "0 dimensions");
  expect_error(idx_bytes(0x08, {3}, "ab"), "truncated");
  expect_error(idx_bytes(0x08, {2}, "abc"), "bytes after");
  expect_error(idx_bytes(0x08, {2, 3}, "ab").substr(0, 9), "inside its dimensions");
  expect_error(idx_bytes(0x08, {0xFFFFFFFF, 0xFFFFFFFF, 4}, ""), "more than the 8589934592 bytes allowed");
  expect_error(idx_bytes(0xAB, {1}, "x"), "unknown element type 0xAB");
  EXPECT_THROW(data::read_idx(scratch("missing.idx").string()), bnrelu::format_error);
  // a truncated gzip stream
  const auto good = idx_bytes(0x08, {1000}, std::string(1000, 'a'));
  write_gz(scratch("t.gz"), good);
  std::ifstream in(scratch("t.gz"), std::ios::binary);
  std::string gz((std::istreambuf_iterator<char>(in)), {});
  write_raw(scratch("cut.gz"), gz.substr(0, gz.size() / 2));
  EXPECT_THROW(data::read_idx(scratch("cut.gz").string()), bnrelu::format_error);
}

namespace {
std::string gz_bytes(const std::string& payload) {
  write_gz(scratch("member.gz"), payload);
  std::ifstream in(scratch("member.gz"), std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}
}  // namespace

// A gzip stream must be whole: its trailer present, and nothing after it but more members.
TEST(Idx, GzipStreamsMustBeWhole) {
  const auto good = idx_bytes(0x08, {1000}, std::string(1000, 'a'));
  const auto gz = gz_bytes(good);
  auto read = [&](const std::string& bytes) {
    write_raw(scratch("t.idx.gz"), bytes);
    return data::read_idx(scratch("t.idx.gz").string());
  };
  EXPECT_EQ(read(gz).size(), 1000);
  for (std::size_t cut : {std::size_t{1}, std::size_t{4}, std::size_t{8}}) {  // trailer cut short or missing
    try {
      read(gz.substr(0, gz.size() - cut));
      ADD_FAILURE() << "accepted a stream without the last " << cut << " bytes";
    } catch (const bnrelu::format_error& e) {
      EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
    }
  }
  for (const std::string& junk : {std::string("x"), std::string("\x1f"), std::string("junk after the data")}) {
    try {
      read(gz + junk);
      ADD_FAILURE() << "accepted junk after the stream";
    } catch (const bnrelu::format_error& e) {
      EXPECT_NE(std::string(e.what()).find("after its gzip stream"), std::string::npos) << e.what();
    }
  }
  // two members, the data split between them, are one stream (as gzip itself treats them)
  const auto two = gz_bytes(good.substr(0, 600)) + gz_bytes(good.substr(600));
  EXPECT_EQ(read(two).values<int>(), std::vector<int>(1000, 'a'));
}

// Decompression stops at what the caller allows, checked from the header before inflating.
TEST(Idx, DecompressionIsCappedByTheCaller) {
  const auto bomb = gz_bytes(idx_bytes(0x08, {1 << 20}, std::string(1 << 20, '\0')));  // 1 MiB of zeros
  EXPECT_LT(bomb.size(), std::size_t{10} << 10);
  write_raw(scratch("bomb.idx.gz"), bomb);
  EXPECT_EQ(data::read_idx(scratch("bomb.idx.gz").string()).size(), 1 << 20);
  try {
    data::read_idx(scratch("bomb.idx.gz").string(), /*max_bytes=*/1 << 16);
    ADD_FAILURE() << "read past the cap";
  } catch (const bnrelu::format_error& e) {
    EXPECT_NE(std::string(e.what()).find("more than the 65536 bytes allowed"), std::string::npos) << e.what();
  }
}

TEST(Mnist, FindsBothNamingsWithOrWithoutGz) {
  int k = 0;
  for (const std::string sep : {"-", "."})
    for (bool gz : {false, true}) {
      const auto dir = scratch("set" + std::to_string(k++));
      fs::create_directories(dir);
      write_set(dir, "train", 7, 5, 4, gz, sep);
      write_set(dir, "t10k", 3, 5, 4, gz, sep);
      const auto train = data::load_mnist(dir.string(), data::Split::train);
      EXPECT_EQ(train.images.dimension(0), 7);
      EXPECT_EQ(train.images.dimension(1), 1);
      EXPECT_EQ(train.images.dimension(2), 5);
      EXPECT_FLOAT_EQ(train.images(2, 0, 1, 3), static_cast<float>(2 + 1 + 3) / 255.0f);
      EXPECT_EQ(train.labels, (std::vector<std::int64_t>{0, 1, 2, 0, 1, 2, 0}));
      EXPECT_EQ(data::load_mnist(dir.string(), data::Split::test).labels.size(), 3u);
    }
  try {
    data::load_mnist(scratch("empty").string(), data::Split::train);
    FAIL();
  } catch (const bnrelu::format_error& e) {
    EXPECT_NE(std::string(e.what()).find("train-images.idx3-ubyte.gz"), std::string::npos) << e.what();
  }
}

TEST(Mnist, RejectsMismatchedCounts) {
  const auto dir = scratch("mismatch");
  fs::create_directories(dir);
  write_set(dir, "train", 4, 2, 2, false, "-");
  write_raw(dir / "train-labels-idx1-ubyte", idx_bytes(0x08, {3}, "abc"));
  EXPECT_THROW(data::load_mnist(dir.string(), data::Split::train), bnrelu::format_error);
}

TEST(DataLoader, SeededShufflePartialBatchAndNormalisation) {
  data::Mnist set;
  set.images.resize(10, 1, 1, 2);
  for (int i = 0; i < 10; ++i) {
    set.images(i, 0, 0, 0) = static_cast<float>(i);
    set.images(i, 0, 0, 1) = 1.0f;
    set.labels.push_back(i);
  }
  auto order = [&](std::uint64_t seed, int epoch, bool drop_last) {
    data::DataLoader<float> loader(set, {.batch_size = 4, .drop_last = drop_last, .seed = seed, .mean = 1.0f, .std = 2.0f});
    loader.start_epoch(epoch);
    std::vector<std::int64_t> seen;
    std::vector<bnrelu::Index> sizes;
    data::Batch<float> b;
    while (loader.next(b)) {
      sizes.push_back(b.images.dimension(0));
      for (bnrelu::Index i = 0; i < b.images.dimension(0); ++i) {
        EXPECT_FLOAT_EQ(b.images(i, 0, 0, 0), (static_cast<float>(b.labels[i]) - 1.0f) / 2.0f);
        EXPECT_FLOAT_EQ(b.images(i, 0, 0, 1), 0.0f);
        seen.push_back(b.labels[i]);
      }
    }
    return std::make_pair(seen, sizes);
  };
  const auto a = order(5, 0, false), b = order(5, 0, false), c = order(5, 1, false), d = order(6, 0, false);
  EXPECT_EQ(a.first, b.first);    // same seed and epoch: same order
  EXPECT_NE(a.first, c.first);    // another epoch: another order
  EXPECT_NE(a.first, d.first);    // another seed: another order
  EXPECT_EQ(a.second, (std::vector<bnrelu::Index>{4, 4, 2}));  // last partial batch
  auto sorted = a.first;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(sorted, (std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
  EXPECT_EQ(order(5, 0, true).second, (std::vector<bnrelu::Index>{4, 4}));
  // resuming at a batch gives the rest of the same epoch
  data::DataLoader<float> loader(set, {.batch_size = 4, .seed = 5});
  loader.seek(0, 1);
  data::Batch<float> batch;
  ASSERT_TRUE(loader.next(batch));
  EXPECT_EQ(batch.labels[0], a.first[4]);
  EXPECT_THROW(loader.seek(0, 9), bnrelu::shape_error);
  EXPECT_THROW(data::DataLoader<float>(set, {.batch_size = 0}), bnrelu::shape_error);
  // sizes whose products would overflow, and options that are not numbers
  EXPECT_THROW(data::DataLoader<float>(set, {.batch_size = bnrelu::Index{1} << 62}), bnrelu::shape_error);
  EXPECT_THROW(data::DataLoader<float>(set, {.batch_size = bnrelu::Index{1} << 30, .rank = 0, .world_size = 1 << 20}),
               bnrelu::shape_error);
  EXPECT_THROW(data::DataLoader<float>(set, {.std = std::numeric_limits<float>::infinity()}), bnrelu::shape_error);
  EXPECT_THROW(data::DataLoader<float>(set, {.mean = std::numeric_limits<float>::quiet_NaN()}), bnrelu::shape_error);
}

// Data parallelism: replica r's batch k is the r-th part of the one-process batch k of the
// global size, so the shards are disjoint and together make every global batch (a last partial
// one cut to a multiple of the replicas, so that all replicas' batches have one size).
TEST(DataLoader, ReplicaShardsSplitEveryGlobalBatch) {
  data::Mnist set;
  set.images.resize(23, 1, 1, 1);
  for (int i = 0; i < 23; ++i) {
    set.images(i, 0, 0, 0) = static_cast<float>(i);
    set.labels.push_back(i);
  }
  for (int world : {2, 3}) {
    SCOPED_TRACE(world);
    data::DataLoader<float> one(set, {.batch_size = 2 * world, .seed = 8});
    std::vector<data::DataLoader<float>> shards;
    for (int r = 0; r < world; ++r) shards.emplace_back(set, data::LoaderOptions{.batch_size = 2, .seed = 8, .rank = r, .world_size = world});
    for (auto& s : shards) {
      s.start_epoch(3);
      EXPECT_EQ(s.num_batches(), one.num_batches());  // a last partial global batch is split
    }
    one.start_epoch(3);
    data::Batch<float> whole, part;
    while (one.next(whole)) {
      std::vector<std::int64_t> joined;
      const std::size_t each = whole.labels.size() / static_cast<std::size_t>(world);
      for (auto& s : shards) {
        ASSERT_TRUE(s.next(part));
        EXPECT_EQ(part.labels.size(), each);
        joined.insert(joined.end(), part.labels.begin(), part.labels.end());
      }
      EXPECT_EQ(joined, std::vector<std::int64_t>(whole.labels.begin(), whole.labels.begin() + static_cast<std::ptrdiff_t>(joined.size())));
    }
  }
  // a last global batch with fewer images than replicas is dropped on every replica
  data::DataLoader<float> few(set, {.batch_size = 11, .seed = 1, .rank = 1, .world_size = 2});
  EXPECT_EQ(few.num_batches(), 1);  // 22 images in one global batch; the 23rd cannot be split
  EXPECT_THROW(data::DataLoader<float>(set, {.rank = 2, .world_size = 2}), bnrelu::shape_error);
  EXPECT_THROW(data::DataLoader<float>(set, {.rank = 0, .world_size = 0}), bnrelu::shape_error);
}
