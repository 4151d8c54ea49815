#include <bnrelu/bnrelu.hpp>
#include <bnrelu/io/safetensors.hpp>

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "golden.hpp"
#include "scratch.hpp"

namespace nn = bnrelu::nn;
namespace io = bnrelu::io;
using bnrelu::Tensor;
using namespace bnrelu::test;

namespace {

auto conv_linear_net() {
  return nn::Sequential{nn::Conv2d<float>({.in_channels = 1, .out_channels = 2, .kernel_size = 3}),
                        nn::BatchNorm2d<float>({.num_features = 2}), nn::ReLU<float>{}, nn::Flatten<float>{},
                        nn::Linear<float>({.in_features = 8, .out_features = 3})};
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST(Safetensors, RoundTripRestoresEveryTensor) {
  auto a = conv_linear_net();
  a.forward(random_tensor<float, 4>({3, 1, 4, 4}));  // running stats move, counter = 1
  const auto path = scratch_path("roundtrip.safetensors");
  io::save_safetensors(a, path);
  bnrelu::manual_seed(99);
  auto b = conv_linear_net();
  io::load_safetensors(b, path);
  EXPECT_EQ(state_of(b.get<0>()).size(), state_of(a.get<0>()).size());
  auto pa = a.named_parameters(), pb = b.named_parameters();
  for (std::size_t i = 0; i < pa.size(); ++i)
    EXPECT_TRUE(std::equal(pa[i].value.begin(), pa[i].value.end(), pb[i].value.begin())) << pa[i].name;
  auto ba = a.named_buffers(), bb = b.named_buffers();
  for (std::size_t i = 0; i < ba.size(); ++i)
    EXPECT_TRUE(std::equal(ba[i].value.begin(), ba[i].value.end(), bb[i].value.begin())) << ba[i].name;
  EXPECT_EQ(b.get<1>().num_batches_tracked(), 1);
  const auto file = io::read_safetensors(path);
  EXPECT_EQ(file.tensors.at("1.num_batches_tracked").dtype, "I64");
  EXPECT_EQ(file.tensors.at("0.weight").dtype, "F32");
  EXPECT_EQ(file.tensors.at("0.weight").shape, (std::vector<bnrelu::Index>{2, 1, 3, 3}));
  EXPECT_EQ(file.tensors.size(), 4u + 2u + 2u + 1u);
}

TEST(Safetensors, LoadIsStrictAndChangesNothingOnError) {
  auto a = conv_linear_net();
  const auto good = scratch_path("good.safetensors");
  io::save_safetensors(a, good);
  auto sd = io::state_dict(a);
  auto b = conv_linear_net();
  const auto before = state_of(b);
  auto expect_rejected = [&](std::vector<std::pair<std::string, io::RawTensor>> tensors, const std::string& needle) {
    const auto path = scratch_path("bad.safetensors");
    io::write_safetensors(path, tensors);
    try {
      io::load_safetensors(b, path);
      ADD_FAILURE() << "accepted a file with " << needle;
    } catch (const bnrelu::format_error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_EQ(state_of(b), before);
  };
  auto missing = sd;
  missing.erase(missing.begin() + 2);  // 1.weight
  expect_rejected(missing, "missing tensor 1.weight");
  auto extra = sd;
  extra.emplace_back("5.weight", extra[0].second);
  expect_rejected(extra, "unexpected tensor 5.weight");
  auto reshaped = sd;
  reshaped[0].second.shape = {2, 9};
  expect_rejected(reshaped, "shape");
  auto wrong_type = sd;
  wrong_type[0].second.dtype = "I32";
  expect_rejected(wrong_type, "F32 or F64");
}

TEST(Safetensors, MalformedFilesGiveFormatErrors) {
  auto a = conv_linear_net();
  const auto path = scratch_path("m.safetensors");
  io::save_safetensors(a, path);
  const std::string bytes = slurp(path);
  auto reject = [&](const std::string& data, const std::string& needle) {
    try {
      io::parse_safetensors(data);
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const bnrelu::format_error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  reject("", "shorter than");
  reject(bytes.substr(0, 20), "exceeds the file");
  reject(bytes.substr(0, bytes.size() - 4), "outside");
  reject(bytes + "xxxx", "trailing bytes");
  std::string garbled = bytes;
  garbled[9] = '!';
  reject(garbled, "not valid JSON");
  for (std::size_t cut = 0; cut < bytes.size(); cut += 7) EXPECT_THROW(io::parse_safetensors(bytes.substr(0, cut)), bnrelu::format_error);
  EXPECT_THROW(io::read_safetensors(scratch_path("does_not_exist")), bnrelu::format_error);
}

TEST(Safetensors, SaveIsAtomicAndLeavesNoTemporaries) {
  auto a = conv_linear_net();
  const auto dir = scratch_path("atomic_dir");
  std::filesystem::create_directories(dir);
  const auto path = (dir / "model.safetensors").string();
  io::save_safetensors(a, path);
  io::save_safetensors(a, path);  // replacing an existing file
  std::size_t files = 0;
  for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator(dir)) ++files;
  EXPECT_EQ(files, 1u);
  // an unwritable destination throws and leaves the old file intact
  EXPECT_THROW(io::save_safetensors(a, (dir / "no_such_dir" / "x.safetensors").string()), std::runtime_error);
  EXPECT_NO_THROW(io::load_safetensors(a, path));
  std::filesystem::remove_all(dir);
}

TEST(Safetensors, ReadsPyTorchWrittenFixtures) {
  Fixture f("linear_basic");
  EXPECT_EQ(f.raw("weight").dtype, "F64");
  EXPECT_EQ(f.raw("weight").shape, (std::vector<bnrelu::Index>{3, 7}));
}

TEST(Safetensors, KilledSaverNeverLosesTheCheckpoint) {
  // A child process saves two different models over one path in a loop; the parent kills it
  // with SIGKILL at a random moment, then the file must load and be one model or the other.
  bnrelu::manual_seed(1);
  auto a = conv_linear_net();
  bnrelu::manual_seed(2);
  auto b = conv_linear_net();
  const auto dir = scratch_path("kill_dir");
  std::filesystem::create_directories(dir);
  const auto path = (dir / "ckpt.safetensors").string();
  io::save_safetensors(a, path);
  const auto state_a = state_of(a), state_b = state_of(b);
  std::mt19937 gen(7);
  int saw_a = 0, saw_b = 0;
  for (int round = 0; round < 25; ++round) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      try {
        for (unsigned i = 0;; ++i) io::save_safetensors(i % 2 ? a : b, path);
      } catch (...) {
      }
      ::_exit(1);  // a failed save: never back into the test runner, nor into the parent's exit handlers
    }
    ::usleep(std::uniform_int_distribution<unsigned>(0, 20000)(gen));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    auto c = conv_linear_net();
    ASSERT_NO_THROW(io::load_safetensors(c, path)) << "round " << round;
    const auto got = state_of(c);
    ASSERT_TRUE(got == state_a || got == state_b) << "round " << round << ": a mix of two saves";
    (got == state_a ? saw_a : saw_b)++;
  }
  EXPECT_GT(saw_a + saw_b, 0);
  std::filesystem::remove_all(dir);  // including temporaries a killed saver left behind
}

// A file replaced by a save keeps its permission bits; a new one gets 0666 less the umask.
TEST(AtomicFile, KeepsPermissionsAndHonoursTheUmask) {
  const auto dir = scratch_path("perm_dir");
  std::filesystem::create_directories(dir);
  const auto old_file = (dir / "old.bin").string(), new_file = (dir / "new.bin").string();
  io::write_file_atomic(old_file, "a");
  ASSERT_EQ(::chmod(old_file.c_str(), 0600), 0);
  io::write_file_atomic(old_file, "bb");
  struct stat st {};
  ASSERT_EQ(::stat(old_file.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  const mode_t before = ::umask(027);
  io::write_file_atomic(new_file, "c");
  ::umask(before);
  ASSERT_EQ(::stat(new_file.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  std::filesystem::remove_all(dir);
}

// Saving through a symbolic link replaces the file it leads to and keeps the link.
TEST(AtomicFile, FollowsSymbolicLinks) {
  const auto dir = scratch_path("link_dir");
  std::filesystem::create_directories(dir / "real");
  const auto target = dir / "real" / "model.safetensors", link = dir / "link.safetensors";
  io::write_file_atomic(target.string(), "old");
  std::filesystem::create_symlink(std::filesystem::path("real") / "model.safetensors", link);
  io::write_file_atomic(link.string(), "new");
  EXPECT_TRUE(std::filesystem::is_symlink(std::filesystem::symlink_status(link)));
  EXPECT_EQ(slurp(target.string()), "new");
  // a dangling link: the file it names is created
  const auto dangling = dir / "dangling", missing = dir / "real" / "later.bin";
  std::filesystem::create_symlink(std::filesystem::path("real") / "later.bin", dangling);
  io::write_file_atomic(dangling.string(), "x");
  EXPECT_TRUE(std::filesystem::is_symlink(std::filesystem::symlink_status(dangling)));
  EXPECT_EQ(slurp(missing.string()), "x");
  std::filesystem::remove_all(dir);
}

// Any valid file name can be written: the temporary file's name does not grow with it.
TEST(AtomicFile, AcceptsTheLongestValidName) {
  const auto dir = scratch_path("long_dir");
  std::filesystem::create_directories(dir);
  const auto path = dir / std::string(255, 'n');  // NAME_MAX on Linux file systems
  io::write_file_atomic(path.string(), "ok");
  EXPECT_EQ(slurp(path.string()), "ok");
  std::size_t files = 0;
  for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator(dir)) ++files;
  EXPECT_EQ(files, 1u);
  std::filesystem::remove_all(dir);
}

// The header is checked before the body is read: a file that declares more than it holds, or
// a stream without end, is refused after reading the header alone.
TEST(Safetensors, ChecksTheHeaderBeforeReadingTheBody) {
  auto expect_error = [](const std::string& path, const std::string& needle) {
    try {
      io::read_safetensors(path);
      ADD_FAILURE() << "accepted " << path;
    } catch (const bnrelu::format_error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  // a header length beyond the file
  const auto long_header = scratch_path("long_header.safetensors");
  {
    std::ofstream out(long_header, std::ios::binary);
    const std::uint64_t n = 1000;
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << "{}";
  }
  expect_error(long_header, "exceeds the file");
  // a header declaring 1 TB of data in a small file
  const auto big_body = scratch_path("big_body.safetensors");
  {
    const std::string h = R"({"w":{"dtype":"F32","shape":[250000000000],"data_offsets":[0,1000000000000]}})";
    std::ofstream out(big_body, std::ios::binary);
    const std::uint64_t n = h.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << h << "tiny";
  }
  expect_error(big_body, "the file holds 4");
  // an endless stream of zeros: an empty header, refused at once
  expect_error("/dev/zero", "header is not valid JSON");
  // trailing bytes after the declared data
  auto a = conv_linear_net();
  const auto good = scratch_path("trailing.safetensors");
  io::save_safetensors(a, good);
  { std::ofstream(good, std::ios::binary | std::ios::app) << "junk"; }
  expect_error(good, "trailing bytes");
}

// A model after fuse_for_inference is no checkpoint: saving it, or loading into it, throws and
// changes nothing.
TEST(Safetensors, FoldedModelsAreRefused) {
  auto a = conv_linear_net();
  a.forward(random_tensor<float, 4>({3, 1, 4, 4}));
  const auto path = scratch_path("before_fold.safetensors");
  io::save_safetensors(a, path);
  a.fuse_for_inference();
  EXPECT_THROW(io::save_safetensors(a, scratch_path("folded.safetensors")), std::logic_error);
  EXPECT_FALSE(std::filesystem::exists(scratch_path("folded.safetensors")));
  const auto before = state_of(a);
  EXPECT_THROW(io::load_safetensors(a, path), std::logic_error);
  EXPECT_EQ(state_of(a), before);
  // a layer folded by hand is refused too
  auto conv = nn::Conv2d<float>({.in_channels = 1, .out_channels = 2, .kernel_size = 3});
  conv.fold_affine({1.0, 2.0}, {0.0, 0.5}, false);
  EXPECT_THROW(io::state_dict(conv), std::logic_error);
}

// Metadata numbers are parsed whole and range-checked, never half-read.
TEST(Safetensors, MetadataNumbersAreParsedStrictly) {
  io::SafetensorsFile f;
  f.metadata = {{"epoch", "3"}, {"neg", "-4"}, {"junk", "3x"}, {"empty", ""}, {"huge", std::string(400, '9')}, {"lr", "0.5"}};
  EXPECT_EQ(io::metadata_number<int>(f, "epoch", 0, 10), 3);
  EXPECT_EQ(io::metadata_number<double>(f, "lr"), 0.5);
  for (const char* key : {"neg", "junk", "empty", "huge", "missing"}) {
    try {
      io::metadata_number<int>(f, key, 0, 10);
      ADD_FAILURE() << "accepted " << key;
    } catch (const bnrelu::format_error& e) {
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
      EXPECT_LT(std::string(e.what()).size(), 200u) << e.what();
    }
  }
}
