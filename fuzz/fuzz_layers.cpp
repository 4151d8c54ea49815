// libFuzzer target: the layer API fed arbitrary options, shapes and values. Every call either
// works or throws shape_error / logic_error; a throw changes no state; finite inputs give
// finite outputs and gradients. Fused BatchNorm+ReLU and BatchNorm+Add+ReLU give the bits of
// the unfused chains, on whichever of the kernels' paths the fuzzed tuning values select.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <bnrelu/bnrelu.hpp>

namespace nn = bnrelu::nn;
using bnrelu::Index;
using bnrelu::Tensor;

namespace {

// Reads the fuzz input as a stream of small numbers.
struct Bytes {
  const std::uint8_t* p;
  std::size_t n;
  int next(int lo, int hi) {  // in [lo, hi]
    const int v = n ? *p++ : 0;
    if (n) --n;
    return lo + v % (hi - lo + 1);
  }
  float value() { return static_cast<float>(next(0, 255) - 128) / 16.0f; }
};

template <class L>
std::vector<float> state_of(L& l) {
  std::vector<float> s;
  for (auto& p : l.named_parameters()) {
    s.insert(s.end(), p.value.begin(), p.value.end());
    s.insert(s.end(), p.grad.begin(), p.grad.end());
  }
  for (auto& b : l.named_buffers()) s.insert(s.end(), b.value.begin(), b.value.end());
  return s;
}

bool same(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

template <int R>
Tensor<float, R> tensor(Bytes& in, const bnrelu::Dims<R>& d) {
  Tensor<float, R> t(d);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = in.value();
  return t;
}

template <int R>
bool finite(const Tensor<float, R>& t) {
  for (Index i = 0; i < t.size(); ++i)
    if (!std::isfinite(t.data()[i])) return false;
  return true;
}

// forward, then backward with a gradient of the right shape or (sometimes) a wrong one.
template <class L, int RI, int RO>
void exercise(L& layer, Bytes& in, const bnrelu::Dims<RI>& dims) {
  if (in.next(0, 3) == 0) layer.eval();
  const auto x = tensor<RI>(in, dims);
  auto before = state_of(layer);
  Tensor<float, RO> y;
  try {
    y = layer.forward(x);
  } catch (const bnrelu::shape_error&) {
    if (!same(before, state_of(layer))) __builtin_trap();
    return;
  }
  if (!finite(y)) __builtin_trap();
  auto dd = bnrelu::dims_of(y);
  if (in.next(0, 4) == 0) dd[static_cast<std::size_t>(in.next(0, RO - 1))] += 1;
  const auto dy = tensor<RO>(in, dd);
  before = state_of(layer);
  try {
    const auto dx = layer.backward(dy);
    if (!finite(dx)) __builtin_trap();
  } catch (const bnrelu::shape_error&) {
    if (!same(before, state_of(layer))) __builtin_trap();
  } catch (const std::logic_error&) {
    if (layer.is_training()) __builtin_trap();  // only eval-mode forwards leave nothing to backward
    if (!same(before, state_of(layer))) __builtin_trap();
  }
}

// The same model built twice (the same seed), run fused and unfused on the same x and dy:
// outputs, input gradients, parameter gradients and running statistics agree bit for bit.
template <class Make>
void fused_matches_unfused(Bytes& in, Make make, const bnrelu::Dims<4>& dims) {
  namespace kd = bnrelu::kernels::detail;
  // each tuning value left as it is or set to 0 (every tensor "large": streaming stores, long
  // runs, the reverse backward walk), for this input only
  auto zero_or_kept = [&](Index& value) { return in.next(0, 1) == 1 ? Index{0} : value; };
  const kd::ScopedTuning stream(kd::stream_threshold(), zero_or_kept(kd::stream_threshold()));
  const kd::ScopedTuning runs(kd::long_run_bytes(), zero_or_kept(kd::long_run_bytes()));
  const kd::ScopedTuning back_runs(kd::backward_long_run_bytes(), zero_or_kept(kd::backward_long_run_bytes()));
  const kd::ScopedTuning spill(kd::backward_spill_bytes(), zero_or_kept(kd::backward_spill_bytes()));
  const auto x = tensor<4>(in, dims);
  auto run = [&](bool fused, Tensor<float, 4>& y, Tensor<float, 4>& dx, std::vector<float>& state) {
    bnrelu::manual_seed(7);
    auto model = make();
    model.set_fusion(fused);
    y = model.forward(x);
    Bytes same_dy = in;  // both runs read the same dy
    dx = model.backward(tensor<4>(same_dy, bnrelu::dims_of(y)));
    state = state_of(model);
  };
  Tensor<float, 4> ya, yb, dxa, dxb;
  std::vector<float> sa, sb;
  try {
    run(true, ya, dxa, sa);
  } catch (const bnrelu::shape_error&) {
    // the unfused chain must refuse the same input
    try {
      run(false, yb, dxb, sb);
    } catch (const bnrelu::shape_error&) {
      return;
    }
    __builtin_trap();
  }
  try {
    run(false, yb, dxb, sb);
  } catch (const bnrelu::shape_error&) {  // the fused chain took this input
    __builtin_trap();
  }
  auto bits_equal = [](const Tensor<float, 4>& a, const Tensor<float, 4>& b) {
    return a.dimensions() == b.dimensions() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  if (!bits_equal(ya, yb) || !bits_equal(dxa, dxb) || !same(sa, sb)) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in{data, size};
  bnrelu::set_num_threads(1);
  const bnrelu::Dims<4> d4{in.next(0, 3), in.next(0, 4), in.next(0, 7), in.next(0, 7)};
  const bnrelu::Dims<2> d2{in.next(0, 5), in.next(0, 9)};
  try {
    switch (in.next(0, 13)) {
      case 0: {
        nn::Conv2d<float> l({.in_channels = in.next(-1, 4), .out_channels = in.next(-1, 4), .kernel_size = in.next(-1, 4),
                             .stride = in.next(-1, 3), .padding = in.next(-1, 3), .dilation = in.next(-1, 3),
                             .bias = in.next(0, 1) == 1});
        exercise<decltype(l), 4, 4>(l, in, d4);
        break;
      }
      case 1: {
        nn::BatchNorm2d<float> l({.num_features = in.next(-1, 4), .eps = in.next(-1, 2) * 1e-3,
                                  .momentum = in.next(-1, 11) / 10.0, .affine = in.next(0, 1) == 1,
                                  .track_running_stats = in.next(0, 1) == 1});
        exercise<decltype(l), 4, 4>(l, in, d4);
        break;
      }
      case 2: {
        nn::BatchNormReLU1d<float> l({.num_features = in.next(-1, 9), .affine = in.next(0, 1) == 1});
        exercise<decltype(l), 2, 2>(l, in, d2);
        break;
      }
      case 3: {
        nn::MaxPool2d<float> l({.kernel_size = in.next(-1, 4), .stride = in.next(-1, 3), .padding = in.next(-1, 2)});
        exercise<decltype(l), 4, 4>(l, in, d4);
        break;
      }
      case 4: {
        nn::Linear<float> l({.in_features = in.next(-1, 9), .out_features = in.next(-1, 4), .bias = in.next(0, 1) == 1});
        exercise<decltype(l), 2, 2>(l, in, d2);
        break;
      }
      case 5: {
        nn::BatchNormReLU2d<float> l({.num_features = in.next(-1, 4), .momentum = in.next(0, 10) / 10.0});
        exercise<decltype(l), 4, 4>(l, in, d4);
        break;
      }
      case 7: {
        nn::AvgPool2d<float> l({.kernel_size = in.next(-1, 4), .stride = in.next(-1, 3), .padding = in.next(-1, 2),
                                .count_include_pad = in.next(0, 1) == 1});
        exercise<decltype(l), 4, 4>(l, in, d4);
        break;
      }
      case 8: {
        nn::AdaptiveAvgPool2d<float> l({.output_size = in.next(-1, 5), .output_width = in.next(-1, 5)});
        exercise<decltype(l), 4, 4>(l, in, d4);
        break;
      }
      case 9: {
        nn::Dropout<float> l({.p = in.next(-1, 11) / 10.0});
        exercise<decltype(l), 4, 4>(l, in, d4);
        break;
      }
      case 10: {  // a residual block: the branches' shapes must agree, fused or not
        auto l = bnrelu::models::detail::basic_block<float>(in.next(1, 4));
        l.set_fusion(in.next(0, 1) == 1);
        exercise<decltype(l), 4, 4>(l, in, d4);
        break;
      }
      case 11: {
        auto l = bnrelu::models::detail::down_block<float>(in.next(1, 4), in.next(1, 4));
        l.set_fusion(in.next(0, 1) == 1);
        exercise<decltype(l), 4, 4>(l, in, d4);
        break;
      }
      case 12: {  // up to 3 x 4 x 12 x 12: chunks of more than a 64-bit mask word
        const Index c = in.next(1, 4), out = in.next(1, 4);
        const bnrelu::Dims<4> dims{in.next(0, 3), c, in.next(1, 12), in.next(1, 12)};
        if (in.next(0, 1) == 0)
          fused_matches_unfused(in, [c] { return bnrelu::models::detail::basic_block<float>(c); }, dims);
        else
          fused_matches_unfused(in, [c, out] { return bnrelu::models::detail::down_block<float>(c, out); }, dims);
        break;
      }
      case 13: {
        const Index c = in.next(1, 4);
        const bnrelu::Dims<4> dims{in.next(0, 3), c, in.next(1, 12), in.next(1, 12)};
        fused_matches_unfused(
            in, [c] { return nn::Sequential(nn::BatchNorm2d<float>({.num_features = c}), nn::ReLU<float>{}); }, dims);
        break;
      }
      default: {
        nn::ReLU<float> l;
        exercise<decltype(l), 2, 2>(l, in, d2);
        break;
      }
    }
  } catch (const bnrelu::shape_error&) {  // rejected options
  }
  return 0;
}
