// A program written only against the public API of the optional component bnrelu::onnx:
// export the seed CNN, folded, as API.md shows, and read the file back.
#include <bnrelu/bnrelu.hpp>
#include <bnrelu/io/onnx.hpp>

#include <cstdio>
#include <fstream>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  auto model = bnrelu::models::seed_cnn<float>(1, 10);
  model.eval();
  model.fuse_for_inference();
  bnrelu::io::save_onnx(model, argv[1], {1, 1, 28, 28});
  onnx::ModelProto m;
  std::ifstream f(argv[1], std::ios::binary);
  if (!m.ParseFromIstream(&f)) return 1;
  std::printf("%d nodes, opset %ld\n", m.graph().node_size(), static_cast<long>(m.opset_import(0).version()));
  return m.graph().node_size() == 10 ? 0 : 1;
}
