#include <bnrelu/data/cifar.hpp>
#include <bnrelu/data/idx.hpp>
#include <bnrelu/data/loader.hpp>
#include <bnrelu/data/mnist.hpp>

#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <set>

#include "golden.hpp"
#include "scratch.hpp"

namespace data = bnrelu::data;
namespace fs = std::filesystem;
using bnrelu::test::scratch_path;

namespace {

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
      const auto p = scratch_path(gz ? "t.idx.gz" : "t.idx");
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
    const auto p = scratch_path("bad.idx");
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
  EXPECT_THROW(data::read_idx(scratch_path("missing.idx").string()), bnrelu::format_error);
  // a truncated gzip stream
  const auto good = idx_bytes(0x08, {1000}, std::string(1000, 'a'));
  write_gz(scratch_path("t.gz"), good);
  std::ifstream in(scratch_path("t.gz"), std::ios::binary);
  std::string gz((std::istreambuf_iterator<char>(in)), {});
  write_raw(scratch_path("cut.gz"), gz.substr(0, gz.size() / 2));
  EXPECT_THROW(data::read_idx(scratch_path("cut.gz").string()), bnrelu::format_error);
}

namespace {
std::string gz_bytes(const std::string& payload) {
  write_gz(scratch_path("member.gz"), payload);
  std::ifstream in(scratch_path("member.gz"), std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}
}  // namespace

// A gzip stream must be whole: its trailer present, and nothing after it but more members.
TEST(Idx, GzipStreamsMustBeWhole) {
  const auto good = idx_bytes(0x08, {1000}, std::string(1000, 'a'));
  const auto gz = gz_bytes(good);
  auto read = [&](const std::string& bytes) {
    write_raw(scratch_path("t.idx.gz"), bytes);
    return data::read_idx(scratch_path("t.idx.gz").string());
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
  write_raw(scratch_path("bomb.idx.gz"), bomb);
  EXPECT_EQ(data::read_idx(scratch_path("bomb.idx.gz").string()).size(), 1 << 20);
  try {
    data::read_idx(scratch_path("bomb.idx.gz").string(), /*max_bytes=*/1 << 16);
    ADD_FAILURE() << "read past the cap";
  } catch (const bnrelu::format_error& e) {
    EXPECT_NE(std::string(e.what()).find("more than the 65536 bytes allowed"), std::string::npos) << e.what();
  }
}

TEST(Mnist, FindsBothNamingsWithOrWithoutGz) {
  int k = 0;
  for (const std::string sep : {"-", "."})
    for (bool gz : {false, true}) {
      const auto dir = scratch_path("set" + std::to_string(k++));
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
    data::load_mnist(scratch_path("empty").string(), data::Split::train);
    FAIL();
  } catch (const bnrelu::format_error& e) {
    EXPECT_NE(std::string(e.what()).find("train-images.idx3-ubyte.gz"), std::string::npos) << e.what();
  }
}

TEST(Mnist, RejectsMismatchedCounts) {
  const auto dir = scratch_path("mismatch");
  fs::create_directories(dir);
  write_set(dir, "train", 4, 2, 2, false, "-");
  write_raw(dir / "train-labels-idx1-ubyte", idx_bytes(0x08, {3}, "abc"));
  EXPECT_THROW(data::load_mnist(dir.string(), data::Split::train), bnrelu::format_error);
}

// first_n keeps the first n images and labels, or all of them for n <= 0 or n >= N; a set
// passed as an rvalue and kept whole is moved (the same buffer), never copied.
TEST(ImageSet, FirstNKeepsTheFirstImagesAndMovesAWholeRvalue) {
  data::ImageSet set;
  set.images.resize(3, 1, 2, 2);
  for (bnrelu::Index i = 0; i < set.images.size(); ++i) set.images.data()[i] = static_cast<float>(i);
  set.labels = {7, 8, 9};
  const auto two = data::first_n(set, 2);
  ASSERT_EQ(two.images.dimension(0), 2);
  EXPECT_EQ(two.labels, (std::vector<std::int64_t>{7, 8}));
  EXPECT_EQ(two.images(1, 0, 1, 1), 7.0f);
  for (bnrelu::Index n : {0, -1, 3, 4}) {
    EXPECT_EQ(data::first_n(set, n).images.dimension(0), 3) << n;
    auto copy = set;
    const float* buffer = copy.images.data();
    const auto all = data::first_n(std::move(copy), n);
    EXPECT_EQ(all.images.data(), buffer) << n;
    EXPECT_EQ(all.labels, set.labels) << n;
  }
  auto copy = set;
  const auto one = data::first_n(std::move(copy), 1);
  ASSERT_EQ(one.images.dimension(0), 1);
  EXPECT_EQ(one.labels, (std::vector<std::int64_t>{7}));
  EXPECT_EQ(one.images(0, 0, 1, 1), 3.0f);
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

namespace {

// A CIFAR-10 binary file of the given labels; pixel k of record n is (n * 7 + k) % 256.
std::string cifar_bytes(const std::vector<int>& labels) {
  std::string s;
  for (std::size_t n = 0; n < labels.size(); ++n) {
    s.push_back(static_cast<char>(labels[n]));
    for (int k = 0; k < 3072; ++k) s.push_back(static_cast<char>((n * 7 + static_cast<std::size_t>(k)) % 256));
  }
  return s;
}

void write_file(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}

}  // namespace

TEST(Cifar10, ReadsRecordsAsRedGreenBluePlanes) {
  const auto dir = scratch_path("cifar");
  fs::create_directories(dir);
  for (int i = 1; i <= 5; ++i) write_file(dir / ("data_batch_" + std::to_string(i) + ".bin"), cifar_bytes({i, 9, 0}));
  write_file(dir / "test_batch.bin", cifar_bytes({3, 4}));
  const auto train = data::load_cifar10(dir.string(), data::Split::train);
  ASSERT_EQ(train.images.dimension(0), 15);
  EXPECT_EQ(train.images.dimension(1), 3);
  EXPECT_EQ(train.images.dimension(2), 32);
  EXPECT_EQ(train.labels, (std::vector<std::int64_t>{1, 9, 0, 2, 9, 0, 3, 9, 0, 4, 9, 0, 5, 9, 0}));
  // record 1 of a file: pixel (c, y, x) is byte c*1024 + y*32 + x after the label
  EXPECT_FLOAT_EQ(train.images(4, 1, 2, 3), static_cast<float>((7 + 1024 + 2 * 32 + 3) % 256) / 255.0f);
  const auto test = data::load_cifar10(dir.string(), data::Split::test);
  EXPECT_EQ(test.labels, (std::vector<std::int64_t>{3, 4}));
  // bad files: a cut record, a label past 9, an empty file, a missing batch
  write_file(dir / "cut.bin", cifar_bytes({1}).substr(0, 3000));
  EXPECT_THROW(data::read_cifar10_file((dir / "cut.bin").string()), bnrelu::format_error);
  write_file(dir / "label.bin", cifar_bytes({1, 10}));
  try {
    data::read_cifar10_file((dir / "label.bin").string());
    FAIL() << "no format_error";
  } catch (const bnrelu::format_error& e) {
    EXPECT_NE(std::string(e.what()).find("record 1"), std::string::npos) << e.what();
  }
  write_file(dir / "empty.bin", "");
  EXPECT_THROW(data::read_cifar10_file((dir / "empty.bin").string()), bnrelu::format_error);
  fs::remove(dir / "data_batch_3.bin");
  EXPECT_THROW(data::load_cifar10(dir.string(), data::Split::train), bnrelu::format_error);
  fs::remove_all(dir);
}

TEST(DataLoader, PerChannelNormalisation) {
  data::ImageSet set;
  set.images.resize(4, 2, 2, 2);
  for (bnrelu::Index i = 0; i < set.images.size(); ++i) set.images.data()[i] = static_cast<float>(i % 7);
  set.labels = {0, 1, 2, 3};
  const auto [mean, stdev] = data::channel_mean_std(set);
  ASSERT_EQ(mean.size(), 2u);
  data::DataLoader<float> loader(set, {.batch_size = 4, .shuffle = false, .channel_mean = mean, .channel_std = stdev});
  data::Batch<float> b;
  ASSERT_TRUE(loader.next(b));
  for (int c = 0; c < 2; ++c) {  // every channel has mean 0 and std 1 after normalisation
    double sum = 0, sq = 0;
    for (int n = 0; n < 4; ++n)
      for (int y = 0; y < 2; ++y)
        for (int x = 0; x < 2; ++x) {
          sum += b.images(n, c, y, x);
          sq += b.images(n, c, y, x) * b.images(n, c, y, x);
        }
    EXPECT_NEAR(sum / 16, 0, 1e-6);
    EXPECT_NEAR(sq / 16, 1, 1e-5);
  }
  EXPECT_THROW(data::DataLoader<float>(set, {.channel_mean = {0.5f}, .channel_std = {1.0f}}), bnrelu::shape_error);
  EXPECT_THROW(data::DataLoader<float>(set, {.channel_mean = {0.5f, 0.5f}, .channel_std = {1.0f, 0.0f}}),
               bnrelu::shape_error);
  EXPECT_THROW(data::DataLoader<float>(set, {.crop_padding = -1}), bnrelu::shape_error);
}

// Random crop after zero padding and horizontal flip: each image is its own shifted and
// mirrored copy, padding normalised like a 0 pixel, drawn from (seed, epoch, position) alone:
// the same after a seek and for any number of replicas, different across epochs.
TEST(DataLoader, AugmentationIsSeededCropAndFlip) {
  data::ImageSet set;
  const bnrelu::Index N = 12, C = 2, H = 5, W = 6;
  set.images.resize(N, C, H, W);
  for (bnrelu::Index i = 0; i < set.images.size(); ++i) set.images.data()[i] = 1.0f + static_cast<float>(i % 97);
  for (bnrelu::Index n = 0; n < N; ++n) set.labels.push_back(n);
  const data::LoaderOptions opt{.batch_size = 4, .seed = 3, .mean = 0.5f, .std = 2.0f, .crop_padding = 2,
                                .horizontal_flip = true};
  auto epoch_images = [&](const data::LoaderOptions& o, int epoch) {
    data::DataLoader<float> loader(set, o);
    loader.start_epoch(epoch);
    std::vector<float> all;
    std::vector<std::int64_t> labels;
    data::Batch<float> b;
    bnrelu::Index position = 0, wrong = 0;
    while (loader.next(b)) {
      for (bnrelu::Index i = 0; i < b.images.dimension(0); ++i, ++position) {
        const auto a = loader.augmentation(position);
        const bnrelu::Index src = b.labels[static_cast<std::size_t>(i)];
        for (bnrelu::Index c = 0; c < C; ++c)
          for (bnrelu::Index y = 0; y < H; ++y)
            for (bnrelu::Index x = 0; x < W; ++x) {
              const bnrelu::Index sy = y + a.dy - 2, sx = (a.flip ? W - 1 - x : x) + a.dx - 2;
              const float raw = sy >= 0 && sy < H && sx >= 0 && sx < W ? set.images(src, c, sy, sx) : 0.0f;
              wrong += b.images(i, c, y, x) != (raw - 0.5f) * 0.5f;
            }
      }
      all.insert(all.end(), b.images.data(), b.images.data() + b.images.size());
      labels.insert(labels.end(), b.labels.begin(), b.labels.end());
    }
    EXPECT_EQ(wrong, 0) << "pixels that are not the crop and flip augmentation() describes";
    return std::make_pair(all, labels);
  };
  const auto a = epoch_images(opt, 0), again = epoch_images(opt, 0), next = epoch_images(opt, 1);
  EXPECT_EQ(a, again);
  EXPECT_NE(a.first, next.first);
  // offsets and flips vary over the epoch
  data::DataLoader<float> loader(set, opt);
  std::set<std::pair<bnrelu::Index, bnrelu::Index>> offsets;
  int flips = 0;
  for (bnrelu::Index p = 0; p < 200; ++p) {
    const auto g = loader.augmentation(p);
    EXPECT_TRUE(g.dy >= 0 && g.dy <= 4 && g.dx >= 0 && g.dx <= 4);
    offsets.insert({g.dy, g.dx});
    flips += g.flip;
  }
  EXPECT_EQ(offsets.size(), 25u);
  EXPECT_GT(flips, 60);
  EXPECT_LT(flips, 140);
  // two replicas together see exactly what one process sees
  auto two = opt;
  two.batch_size = 2;
  two.world_size = 2;
  std::vector<float> r0, r1;
  for (int rank : {0, 1}) {
    two.rank = rank;
    data::DataLoader<float> l(set, two);
    data::Batch<float> b;
    while (l.next(b)) (rank == 0 ? r0 : r1).insert((rank == 0 ? r0 : r1).end(), b.images.data(), b.images.data() + b.images.size());
  }
  const bnrelu::Index image = C * H * W;
  for (bnrelu::Index k = 0; k < N / 4; ++k)
    for (bnrelu::Index j = 0; j < 4; ++j) {
      const auto& from = j < 2 ? r0 : r1;
      const bnrelu::Index at = (k * 2 + j % 2) * image;
      EXPECT_TRUE(std::equal(from.begin() + at, from.begin() + at + image, a.first.begin() + (k * 4 + j) * image))
          << "batch " << k << " image " << j;
    }
}
