// Trains the founding document's CNN on Fashion-MNIST (or any MNIST-format folder).
//
//   train_mnist                       # 2 epochs of SGD on /usr/share/datasets/fashion-mnist
//   train_mnist --epochs 5 --optimizer adam --lr 1e-3 --log run.csv
//   train_mnist --resume bnrelu_mnist.safetensors --epochs 4    # continue where it stopped
//   train_mnist --eval-only --resume bnrelu_mnist.safetensors
//   mpirun -np 2 train_mnist --distributed --threads 1     # data parallel (BNRELU_WITH_MPI builds)
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <bnrelu/bnrelu.hpp>
#ifdef BNRELU_TRAIN_MPI
#include <bnrelu/dist/mpi.hpp>
#endif

#include "report.hpp"

namespace nn = bnrelu::nn;

using bnrelu::Index;
using Clock = std::chrono::steady_clock;

namespace {

// A double as text that reads back to the same double.
std::string exact(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

struct Config {
  std::string data = "/usr/share/datasets/fashion-mnist";
  int epochs = 2;
  Index batch_size = 64;
  double lr = 0.01;
  double momentum = 0.9;
  double weight_decay = 0;
  std::string optimizer = "sgd";
  std::string scheduler = "cosine";
  int threads = 0;
  std::uint64_t seed = 1;
  bool no_fuse = false;
  std::string save = "bnrelu_mnist.safetensors";
  std::string resume;
  bool eval_only = false;
  std::string log = "train_log.csv";
  Index classes = 10;
  Index max_steps = 0;
  Index train_limit = 0;
  Index test_limit = 0;
  bool distributed = false;
  std::string model = "seed";
  bool augment = false;
  bool nesterov = false;
};

// --model resnet20's defaults for the options not given on the command line: He et al.'s
// CIFAR recipe shortened to 10 epochs (SGD 0.1 with Nesterov momentum 0.9, weight decay 5e-4,
// cosine schedule, batch 128).
void apply_model_defaults(Config& cfg, const std::function<bool(const char*)>& given) {
  if (cfg.model != "resnet20") return;
  if (!given("--lr")) cfg.lr = 0.1;
  if (!given("--epochs")) cfg.epochs = 10;
  if (!given("--batch-size")) cfg.batch_size = 128;
  if (!given("--weight-decay")) cfg.weight_decay = 5e-4;
  if (!given("--nesterov")) cfg.nesterov = true;
  if (!given("--augment")) cfg.augment = true;
}

// Data parallelism: the rank of this process, the number of ranks, and the model wrapper. One
// process without MPI is rank 0 of 1.
struct Replicas {
  int rank = 0, size = 1;
#ifdef BNRELU_TRAIN_MPI
  bnrelu::dist::DataParallel<bnrelu::models::SeedCNN<float>>* ddp = nullptr;  // owned next to the model
#endif
  // The model's backward, then one optimizer step from the gradients averaged over ranks (the
  // ranks of a machine share the step's work).
  template <class Model, class Dy>
  void backward_and_step(Model& model, Dy&& dy, bnrelu::optim::Optimizer<float>& opt) {
#ifdef BNRELU_TRAIN_MPI
    if (ddp) return ddp->backward_and_step(std::forward<Dy>(dy), opt);
#endif
    model.backward_params(std::forward<Dy>(dy));
    opt.step();
  }
  // The optimizer's whole state on every rank, before it is saved (every rank calls this).
  void gather_optimizer_state([[maybe_unused]] bnrelu::optim::Optimizer<float>& opt) {
#ifdef BNRELU_TRAIN_MPI
    if (ddp) ddp->gather_optimizer_state(opt);
#endif
  }
  // The sum of v over all ranks.
  double sum(double v) const {
#ifdef BNRELU_TRAIN_MPI
    if (ddp) return bnrelu::dist::sum_over_ranks(v);
#endif
    return v;
  }
};


const std::vector<std::string> kFashionNames{"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                             "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

std::string class_name(const Config& cfg, Index k, Index classes) {
  if (classes == 10 && cfg.data.find("fashion") != std::string::npos) return kFashionNames[static_cast<std::size_t>(k)];
  return std::to_string(k);
}

// A CLI11 check: a finite number in [lo, hi].
CLI::Validator finite_in(double lo, double hi) {
  return CLI::Validator(
      [lo, hi](std::string& text) -> std::string {
        double v = 0;
        std::size_t used = 0;
        try {
          v = std::stod(text, &used);
        } catch (const std::exception&) {
          return "'" + text.substr(0, 40) + "' is not a number";
        }
        if (used != text.size() || !std::isfinite(v) || v < lo || v > hi)
          return "'" + text.substr(0, 40) + "' is not a finite number in [" + exact(lo) + ", " + exact(hi) + "]";
        return {};
      },
      "FINITE in [" + exact(lo) + ", " + exact(hi) + "]");
}

std::string duration(double s) {
  char buf[32];
  const int t = static_cast<int>(std::lround(s));
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%d:%02d:%02d", t / 3600, t / 60 % 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%d:%02d", t / 60, t % 60);
  return buf;
}

// The live line on a terminal, or a plain line every tenth of an epoch otherwise.
class Progress {
 public:
  Progress(int epoch, int epochs, Index total) : epoch_(epoch), epochs_(epochs), total_(total), tty_(isatty(STDOUT_FILENO)) {}

  void update(Index step, double loss, double acc, Index images) {
    const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
    const bool last = step == total_;
    if (tty_) {
      if (!last && std::chrono::duration<double>(Clock::now() - shown_).count() < 0.1) return;
    } else if (!last && step % std::max<Index>(1, total_ / 10) != 0) {
      return;
    }
    shown_ = Clock::now();
    const double rate = images / std::max(elapsed, 1e-9);
    const double eta = elapsed / static_cast<double>(step) * static_cast<double>(total_ - step);
    constexpr int kBar = 24;
    const int filled = static_cast<int>(kBar * step / std::max<Index>(total_, 1));
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(kBar, '.');
    std::printf("%sepoch %d/%d [%s] %5ld/%ld  loss %.4f  acc %5.1f%%  %6.0f img/s  %s %s%s", tty_ ? "\r\033[K" : "",
                epoch_, epochs_, bar.c_str(), static_cast<long>(step), static_cast<long>(total_), loss, 100 * acc, rate,
                last ? "took" : "ETA", duration(last ? elapsed : eta).c_str(), tty_ && !last ? "" : "\n");
    std::fflush(stdout);
    open_line_ = tty_ && !last;
  }

  // Ends a live line left open by a run stopped mid-epoch.
  void finish() {
    if (open_line_) std::printf("\n");
    open_line_ = false;
  }

 private:
  bool open_line_ = false;
  int epoch_, epochs_;
  Index total_;
  bool tty_;
  Clock::time_point start_ = Clock::now(), shown_ = Clock::time_point{};
};

// The class with the largest logit in row i.
Index predicted(const bnrelu::Tensor<float, 2>& logits, Index i) {
  Index best = 0;
  for (Index k = 1; k < logits.dimension(1); ++k)
    if (logits(i, k) > logits(i, best)) best = k;
  return best;
}

struct Evaluation {
  double loss = 0, accuracy = 0;
  std::vector<std::vector<Index>> confusion;  // [true][predicted]
};

template <class Model>
Evaluation evaluate(Model& model, const bnrelu::data::Mnist& set, const bnrelu::data::LoaderOptions& norm, Index classes) {
  bnrelu::data::LoaderOptions opt = norm;
  opt.batch_size = 500;
  opt.shuffle = false;
  bnrelu::data::DataLoader<float> loader(set, opt);
  bnrelu::data::Batch<float> batch;
  nn::CrossEntropyLoss<float> ce;
  Evaluation ev;
  ev.confusion.assign(static_cast<std::size_t>(classes), std::vector<Index>(static_cast<std::size_t>(classes), 0));
  double total_loss = 0;
  Index correct = 0, seen = 0;
  const bool was_training = model.is_training();
  model.eval();
  while (loader.next(batch)) {
    const auto logits = model.forward(std::move(batch.images));
    const Index n = logits.dimension(0);
    total_loss += static_cast<double>(ce.forward(logits, batch.labels)) * static_cast<double>(n);
    for (Index i = 0; i < n; ++i) {
      const Index best = predicted(logits, i);
      const auto truth = batch.labels[static_cast<std::size_t>(i)];
      ++ev.confusion[static_cast<std::size_t>(truth)][static_cast<std::size_t>(best)];
      correct += best == truth;
    }
    seen += n;
  }
  model.train(was_training);
  ev.loss = total_loss / static_cast<double>(std::max<Index>(seen, 1));
  ev.accuracy = static_cast<double>(correct) / static_cast<double>(std::max<Index>(seen, 1));
  return ev;
}

void print_confusion(const Config& cfg, const Evaluation& ev, Index classes) {
  std::printf("\nconfusion matrix on the test set (rows: true class, columns: predicted)\n%13s", "");
  for (Index k = 0; k < classes; ++k) std::printf(" %5ld", static_cast<long>(k));
  std::printf("   recall\n");
  for (Index t = 0; t < classes; ++t) {
    Index row = 0;
    for (Index p = 0; p < classes; ++p) row += ev.confusion[static_cast<std::size_t>(t)][static_cast<std::size_t>(p)];
    std::printf("%2ld %-10.10s", static_cast<long>(t), class_name(cfg, t, classes).c_str());
    for (Index p = 0; p < classes; ++p) std::printf(" %5ld", static_cast<long>(ev.confusion[static_cast<std::size_t>(t)][static_cast<std::size_t>(p)]));
    std::printf("   %5.1f%%\n", 100.0 * static_cast<double>(ev.confusion[static_cast<std::size_t>(t)][static_cast<std::size_t>(t)]) / static_cast<double>(std::max<Index>(row, 1)));
  }
}

std::string state_path(const std::string& checkpoint) { return checkpoint + ".train-state"; }

// Every label of a set in [0, classes), or std::invalid_argument naming the first that is not.
void check_labels(const bnrelu::data::Mnist& set, const char* which, Index classes) {
  for (std::size_t i = 0; i < set.labels.size(); ++i)
    if (set.labels[i] < 0 || set.labels[i] >= classes)
      throw std::invalid_argument(std::string(which) + " label " + std::to_string(i) + " is " +
                                  std::to_string(set.labels[i]) + ", outside the " + std::to_string(classes) +
                                  " classes (set --classes)");
}

// Where training stands: the epoch under way and the next batch of it.
struct Position {
  int epoch = 0;
  Index batch = 0;
};

// What the training set is: its size, classes and a hash of its labels (FNV-1a), so that a
// resumed run can tell that it continues on the same data wherever the files now lie.
struct DataPrint {
  Index images = 0, classes = 0;
  std::uint64_t labels_hash = 0;
};
DataPrint data_print(const bnrelu::data::Mnist& train, Index classes) {
  std::uint64_t h = 1469598103934665603ULL;
  for (auto l : train.labels) h = (h ^ static_cast<std::uint64_t>(l)) * 1099511628211ULL;
  return {train.images.dimension(0), classes, h};
}

// The settings that shape a run, as the train-state file records them: a resumed run must
// have the same, or it would not continue the run that was saved. --epochs may grow where the
// learning rate does not depend on it (--scheduler none).
std::map<std::string, std::string> run_settings(const Config& cfg, const DataPrint& data) {
  std::map<std::string, std::string> m{
      {"--batch-size", std::to_string(cfg.batch_size)}, {"--seed", std::to_string(cfg.seed)},
      {"--optimizer", cfg.optimizer},                   {"--lr", exact(cfg.lr)},
      {"--momentum", exact(cfg.momentum)}, {"--weight-decay", exact(cfg.weight_decay)},
      {"--scheduler", cfg.scheduler},                   {"--train-limit", std::to_string(cfg.train_limit)},
      {"--classes", std::to_string(cfg.classes)},       {"training images", std::to_string(data.images)},
      {"training labels (hash)", std::to_string(data.labels_hash)}};
  if (cfg.scheduler != "none") m["--epochs"] = std::to_string(cfg.epochs);
  // recorded when not the default, so that files from before these options resume alike
  if (cfg.model != "seed") m["--model"] = cfg.model;
  if (cfg.augment) m["--augment"] = "on";
  if (cfg.nesterov) m["--nesterov"] = "on";
  return m;
}

// The value a train-state file without the setting ran with (the settings recorded only when
// not their default); null for settings every file records.
const char* setting_default(const std::string& key) {
  if (key == "--model") return "seed";
  if (key == "--augment" || key == "--nesterov") return "off";
  return nullptr;
}

// The train-state file: the model's state_dict ("model.<name>"), the optimizer's state
// ("optimizer.<name>"), the position, and the run's settings; everything --resume needs, in
// one file written atomically, so that no crash or full disk leaves a state that disagrees
// with itself. It is written before the model file (the PyTorch-loadable export), which may
// therefore lag one save behind it after a crash, never the other way round.
template <class Model>
void save_train_state(Model& model, bnrelu::optim::Optimizer<float>& opt, const std::string& path, Position at,
                      const std::map<std::string, std::string>& settings) {
  std::vector<std::pair<std::string, bnrelu::io::RawTensor>> tensors;
  for (auto& [name, t] : bnrelu::io::state_dict(model)) tensors.emplace_back("model." + name, std::move(t));
  for (auto& [name, values] : opt.state())
    tensors.emplace_back("optimizer." + name,
                         bnrelu::io::RawTensor::from<float>(std::span<const float>(*values), {static_cast<Index>(values->size())}));
  std::map<std::string, std::string> meta{{"epoch", std::to_string(at.epoch)},
                                          {"batch", std::to_string(at.batch)},
                                          {"steps", std::to_string(opt.steps())}};
  for (const auto& [key, value] : settings) meta["setting " + key] = value;
  bnrelu::io::write_safetensors(path, tensors, meta);
}

// Restores model and optimizer from a train-state file after checking that it was written by
// a run with these settings; changes nothing on any error.
template <class Model>
Position load_train_state(Model& model, bnrelu::optim::Optimizer<float>& opt, const std::string& path,
                          const std::map<std::string, std::string>& settings, Index batches_per_epoch, int epochs) {
  if (!std::filesystem::exists(path))
    throw bnrelu::format_error("--resume needs " + path + " (the optimizer state and position of the run); only " +
                               "--eval-only can use a model file alone");
  const auto file = bnrelu::io::read_safetensors(path);
  auto check = [&](const std::string& key, const std::string& want) {
    const auto it = file.metadata.find("setting " + key);
    if (it == file.metadata.end() && !setting_default(key))
      throw bnrelu::format_error(path + " does not record the setting " + key + " (not written by this train_mnist)");
    const std::string used = it == file.metadata.end() ? setting_default(key) : it->second;
    if (used != want)
      throw std::invalid_argument(key + " is " + want + " but the run in " + path + " used " + used.substr(0, 80) +
                                  ": resuming would not continue that run (pass the same " + key +
                                  (key == "--epochs" ? ", or use --scheduler none to extend a run)" : ")"));
  };
  for (const auto& [key, want] : settings) check(key, want);
  for (const char* key : {"--model", "--augment", "--nesterov"})
    if (!settings.count(key)) check(key, setting_default(key));
  const Position at{bnrelu::io::metadata_number<int>(file, "epoch", 0, epochs),
                    bnrelu::io::metadata_number<Index>(file, "batch", 0, batches_per_epoch)};
  const auto steps = bnrelu::io::metadata_number<std::int64_t>(file, "steps", 0);
  bnrelu::io::SafetensorsFile model_part, optimizer_part;
  for (const auto& [name, t] : file.tensors) {
    if (name.starts_with("model.")) model_part.tensors.emplace(name.substr(6), t);
    else if (name.starts_with("optimizer.")) optimizer_part.tensors.emplace(name.substr(10), t);
    else throw bnrelu::format_error(path + ": unexpected tensor " + name);
  }
  auto state = opt.state();
  std::vector<std::vector<float>> values;
  for (auto& [name, vec] : state) {
    const auto it = optimizer_part.tensors.find(name);
    if (it == optimizer_part.tensors.end() || static_cast<std::size_t>(it->second.numel()) != vec->size() ||
        it->second.dtype != "F32")
      throw bnrelu::format_error(path + ": missing or mis-sized optimizer state " + name);
    values.push_back(it->second.template as<float>());
  }
  if (optimizer_part.tensors.size() != state.size()) throw bnrelu::format_error(path + ": unexpected optimizer state");
  bnrelu::io::load_state_dict(model, model_part, path);  // checks everything before it changes the model
  for (std::size_t i = 0; i < state.size(); ++i) *state[i].second = std::move(values[i]);
  opt.set_steps(steps);
  return at;
}

// The rows of an earlier run's CSV log for epochs before `before`, so a resumed run's log
// and chart cover the whole training.
std::vector<EpochRecord> read_log(const std::string& path, int before) {
  std::vector<EpochRecord> rows;
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return rows;
  char line[512];
  while (std::fgets(line, sizeof line, f)) {
    EpochRecord r{};
    if (std::sscanf(line, "%d,%lf,%lf,%lf,%lf,%lf", &r.epoch, &r.train_loss, &r.train_acc, &r.test_loss, &r.test_acc,
                    &r.seconds) == 6 && r.epoch <= before)
      rows.push_back(r);
  }
  std::fclose(f);
  return rows;
}

const char* model_name(const Config& cfg) { return cfg.model == "resnet20" ? "resnet20" : "seed_cnn"; }

template <class Model>
int train_model(const Config& cfg, Replicas& replicas, bool saving, const bnrelu::data::Mnist& train,
                const bnrelu::data::Mnist& test, Model model);

int run(Config cfg) {
  Replicas replicas;
#ifdef BNRELU_TRAIN_MPI
  if (cfg.distributed) {
    replicas.rank = bnrelu::dist::rank();
    replicas.size = bnrelu::dist::size();
  }
#endif
  if (cfg.batch_size % replicas.size != 0)
    throw std::invalid_argument("--batch-size " + std::to_string(cfg.batch_size) + " is the global batch and must divide by the " +
                                std::to_string(replicas.size) + " ranks");
  const bool saving = !cfg.save.empty();  // on every rank: the optimizer state is gathered for rank 0's save
  if (replicas.rank != 0) {  // rank 0 alone prints, logs and saves
    if (!std::freopen("/dev/null", "w", stdout)) throw std::runtime_error("cannot silence rank " + std::to_string(replicas.rank));
    cfg.save.clear();
    cfg.log.clear();
  }
  // everything that can be checked before the data loads and the first step runs
  if (cfg.eval_only && cfg.resume.empty()) throw std::invalid_argument("--eval-only needs --resume CHECKPOINT");
  if (cfg.distributed && cfg.model != "seed") throw std::invalid_argument("--distributed trains --model seed only");
  if (cfg.nesterov && (cfg.optimizer != "sgd" || cfg.momentum <= 0))
    throw std::invalid_argument("--nesterov needs --optimizer sgd and a --momentum above 0");
  if (!cfg.eval_only) {
    for (const auto& path : {cfg.save, cfg.save.empty() ? std::string() : state_path(cfg.save), cfg.log,
                             cfg.log.empty() ? std::string() : svg_path(cfg.log)})
      if (!path.empty()) bnrelu::io::check_writable(path);
  }
  if (cfg.threads > 0) bnrelu::set_num_threads(cfg.threads);
  bnrelu::manual_seed(cfg.seed);
  const auto t_load = Clock::now();
  const auto train = bnrelu::data::first_n(bnrelu::data::load_mnist(cfg.data, bnrelu::data::Split::train), cfg.train_limit);
  const auto test = bnrelu::data::first_n(bnrelu::data::load_mnist(cfg.data, bnrelu::data::Split::test), cfg.test_limit);
  const Index classes = cfg.classes;
  check_labels(train, "training", classes);
  check_labels(test, "test", classes);
  if (!cfg.eval_only && train.images.dimension(0) < 2 * replicas.size)
    throw std::invalid_argument("the training set has " + std::to_string(train.images.dimension(0)) +
                                " images; batch norm needs at least 2 per rank");
  std::printf("bnrelu train_mnist: %ld training and %ld test images of %ldx%ld, %ld classes from %s (%.1f s)\n",
              static_cast<long>(train.images.dimension(0)), static_cast<long>(test.images.dimension(0)),
              static_cast<long>(train.images.dimension(2)), static_cast<long>(train.images.dimension(3)),
              static_cast<long>(classes), cfg.data.c_str(), std::chrono::duration<double>(Clock::now() - t_load).count());

  const Index C = train.images.dimension(1), H = train.images.dimension(2), W = train.images.dimension(3);
  if (cfg.model == "resnet20") return train_model(cfg, replicas, saving, train, test, bnrelu::models::resnet20<float>(C, classes));
  if (H < 4 || W < 4) throw std::invalid_argument("--model seed needs images of at least 4 x 4");
  return train_model(cfg, replicas, saving, train, test, bnrelu::models::seed_cnn<float>(C, classes, H, W));
}

// Trains (or, with --eval-only, evaluates) one model on the loaded sets.
template <class Model>
int train_model(const Config& cfg, Replicas& replicas, bool saving, const bnrelu::data::Mnist& train,
                const bnrelu::data::Mnist& test, Model model) {
  const Index classes = cfg.classes;
  const auto [mean, stdev] = bnrelu::data::pixel_mean_std(train);
  const bnrelu::data::LoaderOptions loader_opt{.batch_size = cfg.batch_size, .shuffle = true, .seed = cfg.seed, .mean = mean, .std = stdev};
  model.set_fusion(!cfg.no_fuse);
  std::unique_ptr<bnrelu::optim::Optimizer<float>> opt;
  if (cfg.optimizer == "sgd")
    opt = std::make_unique<bnrelu::optim::SGD<float>>(model.named_parameters(),
        bnrelu::optim::SGDOptions{.lr = cfg.lr, .momentum = cfg.momentum, .weight_decay = cfg.weight_decay, .nesterov = cfg.nesterov});
  else if (cfg.optimizer == "adam")
    opt = std::make_unique<bnrelu::optim::Adam<float>>(model.named_parameters(),
        bnrelu::optim::AdamOptions{.lr = cfg.lr, .weight_decay = cfg.weight_decay});
  else
    opt = std::make_unique<bnrelu::optim::AdamW<float>>(model.named_parameters(),
        bnrelu::optim::AdamWOptions{.lr = cfg.lr, .weight_decay = cfg.weight_decay});
  // The learning rate per step: constant, x0.1 after half the epochs, or cosine-annealed to 0
  // over the whole run (PyTorch's CosineAnnealingLR stepped once per batch).
  const Index steps_per_epoch = (train.images.dimension(0) + cfg.batch_size - 1) / cfg.batch_size;
  bnrelu::optim::StepLR<float> step_lr(*opt, std::max<Index>(1, cfg.epochs / 2) * steps_per_epoch, 0.1);
  bnrelu::optim::CosineAnnealingLR<float> cosine_lr(*opt, cfg.epochs * steps_per_epoch);
  auto schedule = [&](std::int64_t step) {
    if (cfg.scheduler == "step") step_lr.set_epoch(step);
    if (cfg.scheduler == "cosine") cosine_lr.set_epoch(step);
  };

  const auto settings = run_settings(cfg, data_print(train, classes));
  Position start;
  if (cfg.eval_only) {
    bnrelu::io::load_state_dict(model, bnrelu::io::read_safetensors(cfg.resume), cfg.resume);
  } else if (!cfg.resume.empty()) {
    // the train-state file holds the model too: it is never older than the model file
    start = load_train_state(model, *opt, state_path(cfg.resume), settings, steps_per_epoch, cfg.epochs);
    std::printf("resumed from %s at epoch %d, step %ld of it\n", state_path(cfg.resume).c_str(), start.epoch + 1,
                static_cast<long>(start.batch));
  }
  if (cfg.eval_only) {
    const auto ev = evaluate(model, test, loader_opt, classes);
    std::printf("test loss %.4f, accuracy %.2f%%\n", ev.loss, 100 * ev.accuracy);
    print_confusion(cfg, ev, classes);
    return 0;
  }
#ifdef BNRELU_TRAIN_MPI
  std::unique_ptr<bnrelu::dist::DataParallel<decltype(model)>> ddp;  // declared after the model: dies first
  if (cfg.distributed) {
    // fc1's weight kept once for the ranks of a machine; the optimizer follows it there
    if constexpr (std::is_same_v<Model, bnrelu::models::SeedCNN<float>>) {
      ddp = std::make_unique<bnrelu::dist::DataParallel<decltype(model)>>(model, bnrelu::dist::DataParallelOptions{.share_weights = true});
      opt->rebind(model.named_parameters());
      replicas.ddp = ddp.get();
    }
  }
#endif
  std::printf("%s, %zu parameter tensors, %s fused BatchNorm+ReLU%s, %s lr %g (%s) momentum %g%s weight decay %g, "
              "batch %ld, %d epochs%s, %d threads",
              model_name(cfg), model.named_parameters().size(), cfg.no_fuse ? "without" : "with",
              cfg.model == "resnet20" ? " and BatchNorm+Add+ReLU" : "", cfg.optimizer.c_str(), cfg.lr,
              cfg.scheduler.c_str(), cfg.momentum, cfg.nesterov ? " (Nesterov)" : "", cfg.weight_decay,
              static_cast<long>(cfg.batch_size), cfg.epochs, cfg.augment ? ", random crop (padding 4) and flip" : "",
              bnrelu::num_threads());
  if (replicas.size > 1)
    std::printf(" per rank, %d ranks (batch %ld each, SyncBatchNorm)", replicas.size,
                static_cast<long>(cfg.batch_size / replicas.size));
  std::printf("\n\n");

  auto train_opt = loader_opt;
  train_opt.batch_size = cfg.batch_size / replicas.size;
  train_opt.rank = replicas.rank;
  train_opt.world_size = replicas.size;
  if (cfg.augment) {
    train_opt.crop_padding = 4;
    train_opt.horizontal_flip = true;
  }
  // batch norm needs 2 images in a batch: drop a last global batch that would give a rank fewer
  train_opt.drop_last = train.images.dimension(0) % cfg.batch_size < 2 * replicas.size;
  bnrelu::data::DataLoader<float> loader(train, train_opt);
  bnrelu::data::Batch<float> batch;
  nn::CrossEntropyLoss<float> ce;
  std::vector<EpochRecord> history = cfg.resume.empty() || cfg.log.empty() ? std::vector<EpochRecord>{} : read_log(cfg.log, start.epoch);
  Evaluation last_eval;
  Index steps = 0;
  for (int epoch = start.epoch; epoch < cfg.epochs; ++epoch) {
    loader.seek(epoch, epoch == start.epoch ? start.batch : 0);
    Progress progress(epoch + 1, cfg.epochs, loader.num_batches());
    const auto t0 = Clock::now();
    double loss_sum = 0;
    Index correct = 0, seen = 0;
    while (loader.next(batch)) {
      schedule(opt->steps());
      opt->zero_grad();
      const auto labels = batch.labels;
      const auto logits = model.forward(std::move(batch.images));
      const float loss = ce.forward(logits, labels);
      // every rank stops together (a rank leaving alone would leave the others in a collective)
      if (replicas.sum(std::isfinite(loss) ? 0.0 : 1.0) > 0) {
        progress.finish();
        std::fprintf(stderr,
                     "train_mnist: the loss became %f at epoch %d, step %ld; stopping. The last good checkpoint is %s "
                     "(try a smaller --lr).\n",
                     static_cast<double>(loss), epoch + 1, static_cast<long>(loader.batch_index()), cfg.save.c_str());
        return 3;
      }
      replicas.backward_and_step(model, ce.backward(), *opt);  // no gradient for the images themselves
      const Index n = logits.dimension(0);
      loss_sum += static_cast<double>(loss) * static_cast<double>(n);
      for (Index i = 0; i < n; ++i) correct += predicted(logits, i) == labels[static_cast<std::size_t>(i)];
      seen += n;
      ++steps;
      // live figures are this rank's; the rate counts every rank's images
      progress.update(loader.batch_index(), loss_sum / static_cast<double>(seen),
                      static_cast<double>(correct) / static_cast<double>(seen), seen * replicas.size);
      if (cfg.max_steps > 0 && steps >= cfg.max_steps) break;
    }
    progress.finish();
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    if (replicas.size > 1) {  // the epoch's figures over every rank's shard
      loss_sum = replicas.sum(loss_sum);
      correct = static_cast<Index>(replicas.sum(static_cast<double>(correct)));
      seen = static_cast<Index>(replicas.sum(static_cast<double>(seen)));
    }
    last_eval = evaluate(model, test, loader_opt, classes);
    history.push_back({epoch + 1, loss_sum / static_cast<double>(std::max<Index>(seen, 1)),
                       static_cast<double>(correct) / static_cast<double>(std::max<Index>(seen, 1)), last_eval.loss,
                       last_eval.accuracy, seconds});
    std::printf("epoch %d/%d: train loss %.4f acc %.2f%% | test loss %.4f acc %.2f%% | %.1f s, %.0f img/s\n", epoch + 1,
                cfg.epochs, history.back().train_loss, 100 * history.back().train_acc, last_eval.loss,
                100 * last_eval.accuracy, seconds, static_cast<double>(seen) / seconds);
    if (saving) replicas.gather_optimizer_state(*opt);
    if (!cfg.save.empty()) {
      const Position at = loader.batch_index() >= loader.num_batches() ? Position{epoch + 1, 0}
                                                                       : Position{epoch, loader.batch_index()};
      save_train_state(model, *opt, state_path(cfg.save), at, settings);  // first: see save_train_state
      bnrelu::io::save_safetensors(model, cfg.save,
                                   {{"pixel_mean", std::to_string(mean)}, {"pixel_std", std::to_string(stdev)},
                                    {"classes", std::to_string(classes)}, {"steps", std::to_string(opt->steps())}});
    }
    if (!cfg.log.empty()) write_reports(cfg.log, history, std::string("bnrelu ") + model_name(cfg) + " on " + std::filesystem::path(cfg.data).filename().string());
    if (cfg.max_steps > 0 && steps >= cfg.max_steps) break;
  }
  if (!history.empty()) print_confusion(cfg, last_eval, classes);
  std::printf("\n");
  if (!cfg.save.empty()) std::printf("checkpoint: %s (PyTorch state_dict names; what --resume reads in %s)\n", cfg.save.c_str(), state_path(cfg.save).c_str());
  if (!cfg.log.empty() && !history.empty()) {
    std::printf("log: %s, chart: %s\n", cfg.log.c_str(), svg_path(cfg.log).c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  CLI::App app{"Train the founding document's BatchNorm+ReLU CNN on an MNIST-format data set"};
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  app.add_option("--data", cfg.data, "folder with train/t10k IDX files (raw or .gz)")->capture_default_str();
  app.add_option("--epochs", cfg.epochs, "epochs to train")->capture_default_str()->check(CLI::Range(1, 100000));
  app.add_option("--batch-size", cfg.batch_size, "images per step")->capture_default_str()->check(CLI::Range(Index{1}, Index{1} << 20));
  app.add_option("--lr", cfg.lr, "learning rate")->capture_default_str()->check(finite_in(0, 1e6));
  app.add_option("--momentum", cfg.momentum, "SGD momentum")->capture_default_str()->check(finite_in(0, 1));
  app.add_option("--weight-decay", cfg.weight_decay, "L2 penalty (decoupled for adamw)")->capture_default_str()->check(finite_in(0, 1e6));
  app.add_option("--optimizer", cfg.optimizer, "sgd, adam or adamw")->capture_default_str()->check(CLI::IsMember({"sgd", "adam", "adamw"}));
  app.add_option("--scheduler", cfg.scheduler, "learning rate per step: none, step (x0.1 after half the epochs) or cosine (to 0 at the end)")->capture_default_str()->check(CLI::IsMember({"none", "step", "cosine"}));
  app.add_option("--threads", cfg.threads, "threads, at most the " + std::to_string(cores) + " cores (default: OMP_NUM_THREADS or all cores)")->check(CLI::Range(0, cores));
  app.add_option("--seed", cfg.seed, "seed for initialisation and shuffling")->capture_default_str();
  app.add_option("--classes", cfg.classes, "number of classes; every label must lie in [0, classes)")->capture_default_str()->check(CLI::Range(Index{2}, Index{256}));
  app.add_flag("--no-fuse", cfg.no_fuse, "run BatchNorm and ReLU as separate passes");
  app.add_option("--save", cfg.save, "checkpoint written after every epoch, with CHECKPOINT.train-state for --resume (empty: none)")->capture_default_str();
  app.add_option("--resume", cfg.resume, "checkpoint to continue from (reads CHECKPOINT.train-state; the run's settings must match), or to evaluate");
  app.add_flag("--eval-only", cfg.eval_only, "evaluate --resume on the test set and stop");
  app.add_option("--log", cfg.log, "CSV log per epoch; an SVG chart is written next to it (empty: none)")->capture_default_str();
  app.add_option("--max-steps", cfg.max_steps, "stop after this many training steps (0: no limit)")->check(CLI::Range(Index{0}, Index{1} << 40));
  app.add_option("--train-limit", cfg.train_limit, "use only the first N training images (0: all)")->check(CLI::Range(Index{0}, Index{1} << 40));
  app.add_option("--test-limit", cfg.test_limit, "use only the first N test images (0: all)")->check(CLI::Range(Index{0}, Index{1} << 40));
  app.add_flag("--distributed", cfg.distributed,
               "data parallel over MPI ranks (mpirun -np N); --batch-size is the global batch. Detected under mpirun");
  app.add_option("--model", cfg.model,
                 "seed (the founding document's CNN) or resnet20 (He et al.'s CIFAR ResNet-20; its defaults: --lr 0.1 "
                 "--epochs 10 --batch-size 128 --weight-decay 5e-4 --nesterov --augment)")
      ->capture_default_str()->check(CLI::IsMember({"seed", "resnet20"}));
  app.add_flag("--augment", cfg.augment, "random crop after zero padding by 4 pixels, and horizontal flip, per training image");
  app.add_flag("--nesterov", cfg.nesterov, "Nesterov momentum (sgd)");
  CLI11_PARSE(app, argc, argv);
  apply_model_defaults(cfg, [&](const char* name) { return app.count(name) > 0; });
#ifdef BNRELU_TRAIN_MPI
  if (std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE")) cfg.distributed = true;
#endif
  try {
#ifdef BNRELU_TRAIN_MPI
    std::unique_ptr<bnrelu::dist::Environment> mpi;
    if (cfg.distributed) mpi = std::make_unique<bnrelu::dist::Environment>(&argc, &argv);
    try {
      return run(cfg);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "train_mnist: %s\n", e.what());
      // the other ranks may be waiting in a collective: end the whole job
      if (mpi && bnrelu::dist::size() > 1) MPI_Abort(MPI_COMM_WORLD, 1);
      return 1;
    }
#else
    if (cfg.distributed) throw std::invalid_argument("--distributed needs a build with -DBNRELU_WITH_MPI=ON");
    return run(cfg);
#endif
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_mnist: %s\n", e.what());
    return 1;
  }
}
