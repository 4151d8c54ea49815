// ONNX export: a model's eval-mode computation as an ONNX graph (opset 13), built with the
// protobuf classes of the ONNX project (Debian libonnx-dev) and written atomically.
//
// Part of the optional component bnrelu::onnx (CMake: BNRELU_WITH_ONNX, target bnrelu::onnx),
// which links ONNX's protobuf library; the core library does not.
//
// Each layer becomes the ONNX operators PyTorch's exporter gives it:
//   Conv2d            Conv (kernel_shape, strides, pads, dilations), then Relu if a ReLU was folded in
//   Linear            Gemm (transB = 1), then Relu if a ReLU was folded in
//   BatchNorm1d/2d    BatchNormalization with the running statistics (affine = false: scale 1, bias 0)
//   BatchNormReLU*    BatchNormalization, Relu
//   ReLU              Relu
//   MaxPool2d         MaxPool;  AvgPool2d  AveragePool (count_include_pad)
//   AdaptiveAvgPool2d GlobalAveragePool for 1 x 1, else AveragePool when the input divides evenly
//   Flatten           Flatten (axis 1)
//   Dropout, Identity nothing (the eval-mode identity)
//   Sequential        its layers in order (after fuse_for_inference, the folded batch norms and
//                     ReLUs are the Conv's or Gemm's);  Residual  main, shortcut, Add, Relu
// Anything else (a custom layer, a batch norm without running statistics, an adaptive pool
// ONNX cannot express) is refused with std::invalid_argument naming the layer, before any file
// is touched.
#pragma once

#include <onnx/onnx_pb.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "../nn/avgpool2d.hpp"
#include "../nn/batchnorm.hpp"
#include "../nn/batchnorm_relu.hpp"
#include "../nn/conv2d.hpp"
#include "../nn/dropout.hpp"
#include "../nn/flatten.hpp"
#include "../nn/identity.hpp"
#include "../nn/linear.hpp"
#include "../nn/maxpool2d.hpp"
#include "../nn/relu.hpp"
#include "../nn/residual.hpp"
#include "../nn/sequential.hpp"
#include "../tensor.hpp"
#include "atomic_file.hpp"

namespace bnrelu::io {

namespace onnx_detail {

template <class L, template <class> class Tpl>
struct is_a : std::false_type {};
template <class T, template <class> class Tpl>
struct is_a<Tpl<T>, Tpl> : std::true_type {};
template <class L, template <class> class Tpl>
inline constexpr bool is_a_v = is_a<std::remove_cvref_t<L>, Tpl>::value;

template <class L>
struct is_sequential : std::false_type {};
template <class... L>
struct is_sequential<nn::Sequential<L...>> : std::true_type {};
template <class L>
struct is_residual : std::false_type {};
template <class M, class S>
struct is_residual<nn::Residual<M, S>> : std::true_type {};

template <class T>
constexpr int element_type() {
  if constexpr (std::is_same_v<T, float>)
    return onnx::TensorProto::FLOAT;
  else
    return onnx::TensorProto::DOUBLE;
}

// Builds the graph node by node; each add_* returns the name of the value it produced.
template <class T>
class GraphBuilder {
 public:
  explicit GraphBuilder(onnx::GraphProto* g) : g_(g) {}

  std::string node(const std::string& op, const std::vector<std::string>& inputs) {
    onnx::NodeProto* n = g_->add_node();
    n->set_op_type(op);
    n->set_name(op + "_" + std::to_string(count_));
    for (const auto& i : inputs) n->add_input(i);
    const std::string out = "t" + std::to_string(count_++);
    n->add_output(out);
    last_ = n;
    return out;
  }
  void attr(const std::string& name, const std::vector<std::int64_t>& ints) {
    onnx::AttributeProto* a = last_->add_attribute();
    a->set_name(name);
    a->set_type(onnx::AttributeProto::INTS);
    for (auto v : ints) a->add_ints(v);
  }
  void attr(const std::string& name, std::int64_t v) {
    onnx::AttributeProto* a = last_->add_attribute();
    a->set_name(name);
    a->set_type(onnx::AttributeProto::INT);
    a->set_i(v);
  }
  void attr(const std::string& name, float v) {
    onnx::AttributeProto* a = last_->add_attribute();
    a->set_name(name);
    a->set_type(onnx::AttributeProto::FLOAT);
    a->set_f(v);
  }
  // A square window's attributes (Conv, MaxPool, AveragePool): the same along both axes.
  void window(Index kernel, Index stride, Index pad) {
    attr("kernel_shape", {kernel, kernel});
    attr("strides", {stride, stride});
    attr("pads", {pad, pad, pad, pad});
  }
  // An initializer (a constant input) named name, of the given shape, from n values.
  std::string constant(const std::string& name, const std::vector<std::int64_t>& shape, const T* values) {
    onnx::TensorProto* t = g_->add_initializer();
    t->set_name(name);
    t->set_data_type(element_type<T>());
    std::int64_t n = 1;
    for (auto d : shape) {
      t->add_dims(d);
      n *= d;
    }
    t->set_raw_data(std::string(reinterpret_cast<const char*>(values), static_cast<std::size_t>(n) * sizeof(T)));
    return name;
  }
  std::string constant(const std::string& name, const std::vector<std::int64_t>& shape, const std::vector<T>& v) {
    return constant(name, shape, v.data());
  }

 private:
  onnx::GraphProto* g_;
  onnx::NodeProto* last_ = nullptr;
  int count_ = 0;
};

[[noreturn]] inline void refuse(const std::string& where, const std::string& why) {
  throw std::invalid_argument("save_onnx: " + where + ": " + why);
}

// Emits layer l (state_dict prefix `name`) reading value `in` of shape `dims`; returns the
// output's name and updates dims. Layers are visited with their eval-mode meaning.
template <class T, class L>
std::string emit(GraphBuilder<T>& b, L& l, const std::string& name, const std::string& in,
                 std::vector<Index>& dims);

template <class T, class Seq>
std::string emit_chain(GraphBuilder<T>& b, Seq& seq, const std::string& prefix, std::string in,
                       std::vector<Index>& dims) {
  std::size_t covered = 0;  // layers a folded Conv2d or Linear computes already
  seq.for_each_indexed([&](std::size_t i, auto& layer) {
    if (covered > 0) {
      --covered;
      return;
    }
    in = emit(b, layer, prefix.empty() ? std::to_string(i) : prefix + "." + std::to_string(i), in, dims);
    covered = seq.layers_folded_into(i) - 1;
  });
  return in;
}

template <int R>
Dims<R> as_dims(const std::vector<Index>& v, const std::string& where) {
  if (v.size() != R)
    refuse(where, "expected a rank-" + std::to_string(R) + " input, got rank " + std::to_string(v.size()));
  Dims<R> d;
  for (int i = 0; i < R; ++i) d[static_cast<std::size_t>(i)] = v[static_cast<std::size_t>(i)];
  return d;
}
template <std::size_t R>
std::vector<Index> as_vector(const std::array<Index, R>& d) {
  return std::vector<Index>(d.begin(), d.end());
}

template <class T, class L>
std::string emit(GraphBuilder<T>& b, L& l, const std::string& name, const std::string& in,
                 std::vector<Index>& dims) {
  using Layer = std::remove_cvref_t<L>;
  const std::string where = name.empty() ? std::string("the model") : "layer " + name;
  // state_dict's name of this layer's tensor `leaf` ("3.weight"; "weight" for a lone layer)
  auto key = [&](const char* leaf) { return name.empty() ? std::string(leaf) : name + "." + leaf; };
  if constexpr (is_sequential<Layer>::value) {
    return emit_chain(b, l, name, in, dims);
  } else if constexpr (is_residual<Layer>::value) {
    std::vector<Index> sdims = dims;
    const std::string m = emit(b, l.main(), key("main"), in, dims);
    const std::string s = emit(b, l.shortcut(), key("shortcut"), in, sdims);
    if (sdims != dims) refuse(where, "the main branch's and the shortcut's outputs differ in shape");
    return b.node("Relu", {b.node("Add", {m, s})});
  } else if constexpr (is_a_v<Layer, nn::Conv2d>) {
    const auto& o = l.options();
    dims = as_vector(l.output_dims(as_dims<4>(dims, where)));
    const auto& w = std::as_const(l).weight();
    std::vector<std::string> inputs{in, b.constant(key("weight"), {o.out_channels, o.in_channels, o.kernel_size, o.kernel_size}, w.data())};
    if (l.bias().size() > 0) inputs.push_back(b.constant(key("bias"), {o.out_channels}, l.bias().data()));
    std::string out = b.node("Conv", inputs);
    b.window(o.kernel_size, o.stride, o.padding);
    b.attr("dilations", {o.dilation, o.dilation});
    return l.folded_relu() ? b.node("Relu", {out}) : out;
  } else if constexpr (is_a_v<Layer, nn::Linear>) {
    const auto& o = l.options();
    dims = as_vector(l.output_dims(as_dims<2>(dims, where)));
    std::vector<std::string> inputs{in, b.constant(key("weight"), {o.out_features, o.in_features}, std::as_const(l).weight().data())};
    if (l.bias().size() > 0) inputs.push_back(b.constant(key("bias"), {o.out_features}, l.bias().data()));
    std::string out = b.node("Gemm", inputs);
    b.attr("transB", std::int64_t{1});
    return l.folded_relu() ? b.node("Relu", {out}) : out;
  } else if constexpr (is_a_v<Layer, nn::BatchNorm2d> || is_a_v<Layer, nn::BatchNorm1d> ||
                       is_a_v<Layer, nn::BatchNormReLU2d> || is_a_v<Layer, nn::BatchNormReLU1d>) {
    const auto& o = l.options();
    if (!o.track_running_stats) refuse(where, "a batch norm without running statistics normalises by the batch's own in eval, which ONNX's BatchNormalization cannot");
    constexpr std::size_t rank = is_a_v<Layer, nn::BatchNorm2d> || is_a_v<Layer, nn::BatchNormReLU2d> ? 4 : 2;
    if (dims.size() != rank || dims[1] != o.num_features)
      refuse(where, "expected " + std::to_string(o.num_features) + " channels in a rank-" + std::to_string(rank) + " input");
    const Index C = o.num_features;
    std::vector<T> scale(static_cast<std::size_t>(C), T(1)), shift(static_cast<std::size_t>(C), T(0));
    if (o.affine)
      for (Index c = 0; c < C; ++c) {
        scale[static_cast<std::size_t>(c)] = l.weight()(c);
        shift[static_cast<std::size_t>(c)] = l.bias()(c);
      }
    std::string out = b.node("BatchNormalization",
                             {in, b.constant(key("weight"), {C}, scale), b.constant(key("bias"), {C}, shift),
                              b.constant(key("running_mean"), {C}, l.running_mean().data()),
                              b.constant(key("running_var"), {C}, l.running_var().data())});
    b.attr("epsilon", static_cast<float>(o.eps));
    constexpr bool relu = is_a_v<Layer, nn::BatchNormReLU2d> || is_a_v<Layer, nn::BatchNormReLU1d>;
    return relu ? b.node("Relu", {out}) : out;
  } else if constexpr (is_a_v<Layer, nn::ReLU>) {
    return b.node("Relu", {in});
  } else if constexpr (is_a_v<Layer, nn::MaxPool2d>) {
    dims = as_vector(l.output_dims(as_dims<4>(dims, where)));
    std::string out = b.node("MaxPool", {in});
    b.window(l.kernel_size(), l.stride(), l.padding());
    return out;
  } else if constexpr (is_a_v<Layer, nn::AvgPool2d>) {
    dims = as_vector(l.output_dims(as_dims<4>(dims, where)));
    std::string out = b.node("AveragePool", {in});
    b.window(l.kernel_size(), l.stride(), l.padding());
    b.attr("count_include_pad", std::int64_t{l.count_include_pad() ? 1 : 0});
    return out;
  } else if constexpr (is_a_v<Layer, nn::AdaptiveAvgPool2d>) {
    const Dims<4> d = as_dims<4>(dims, where);
    dims = as_vector(l.output_dims(d));
    const Index oh = l.output_height(), ow = l.output_width();
    if (oh == 1 && ow == 1) return b.node("GlobalAveragePool", {in});
    if (d[2] % oh != 0 || d[3] % ow != 0)
      refuse(where, "adaptive pooling of " + std::to_string(d[2]) + " x " + std::to_string(d[3]) + " to " +
                        std::to_string(oh) + " x " + std::to_string(ow) + " has uneven windows, which ONNX cannot express");
    std::string out = b.node("AveragePool", {in});
    b.attr("kernel_shape", {d[2] / oh, d[3] / ow});
    b.attr("strides", {d[2] / oh, d[3] / ow});
    return out;
  } else if constexpr (is_a_v<Layer, nn::Flatten>) {
    dims = as_vector(l.output_dims(as_dims<4>(dims, where)));
    std::string out = b.node("Flatten", {in});
    b.attr("axis", std::int64_t{1});
    return out;
  } else if constexpr (is_a_v<Layer, nn::Dropout> || is_a_v<Layer, nn::Identity>) {
    return in;
  } else {
    refuse(where, std::string("no ONNX form for this layer type (") + typeid(Layer).name() + ")");
  }
}

}  // namespace onnx_detail

// The ONNX model of `model` for inputs of shape input_dims (the batch dimension, input_dims[0],
// is exported as the symbolic "batch"): graph input "input", output "output", every parameter
// and running statistic an initializer named as in state_dict(). Throws std::invalid_argument
// for a layer ONNX cannot express and shape_error when input_dims do not fit the model.
template <class Model>
onnx::ModelProto to_onnx(Model& model, const std::vector<Index>& input_dims) {
  using T = typename Model::value_type;
  onnx::ModelProto m;
  m.set_ir_version(onnx::IR_VERSION);
  m.set_producer_name("bnrelu");
  onnx::OperatorSetIdProto* opset = m.add_opset_import();
  opset->set_domain("");
  opset->set_version(13);
  onnx::GraphProto* g = m.mutable_graph();
  g->set_name("bnrelu");
  onnx_detail::GraphBuilder<T> b(g);
  if (input_dims.size() < 2 || std::any_of(input_dims.begin(), input_dims.end(), [](Index d) { return d < 1; }))
    throw shape_error("save_onnx: input_dims must be N x C [x H x W] with every extent >= 1");
  std::vector<Index> dims = input_dims;
  std::string out = onnx_detail::emit(b, model, "", "input", dims);
  if (out == "input") out = b.node("Identity", {out});
  // the last node's output is renamed "output"
  for (auto& n : *g->mutable_node())
    for (auto& o : *n.mutable_output())
      if (o == out) o = "output";
  auto value_info = [&](onnx::ValueInfoProto* v, const std::string& name, const std::vector<Index>& d) {
    v->set_name(name);
    auto* tt = v->mutable_type()->mutable_tensor_type();
    tt->set_elem_type(onnx_detail::element_type<T>());
    auto* shape = tt->mutable_shape();
    for (std::size_t i = 0; i < d.size(); ++i) {
      auto* dim = shape->add_dim();
      if (i == 0)
        dim->set_dim_param("batch");
      else
        dim->set_dim_value(d[i]);
    }
  };
  value_info(g->add_input(), "input", input_dims);
  value_info(g->add_output(), "output", dims);
  return m;
}

// Writes to_onnx(model, input_dims) to path atomically (the old file, if any, stays whole on
// failure). Errors as to_onnx's, and std::runtime_error for I/O.
template <class Model>
void save_onnx(Model& model, const std::string& path, const std::vector<Index>& input_dims) {
  const onnx::ModelProto m = to_onnx(model, input_dims);
  std::string bytes;
  if (!m.SerializeToString(&bytes)) throw std::runtime_error("save_onnx: the model could not be serialised");
  write_file_atomic(path, bytes);
}

// The same, with the dims as a Dims<R> (dims_of(x) of an input x).
template <class Model, std::size_t R>
onnx::ModelProto to_onnx(Model& model, const std::array<Index, R>& input_dims) {
  return to_onnx(model, std::vector<Index>(input_dims.begin(), input_dims.end()));
}
template <class Model, std::size_t R>
void save_onnx(Model& model, const std::string& path, const std::array<Index, R>& input_dims) {
  save_onnx(model, path, std::vector<Index>(input_dims.begin(), input_dims.end()));
}

}  // namespace bnrelu::io
