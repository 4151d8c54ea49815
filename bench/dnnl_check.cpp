// Configure-time check (bench/CMakeLists.txt): a program that builds and links against oneDNN.
#include <dnnl.hpp>

int main() {
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine.get_kind() == dnnl::engine::kind::cpu ? 0 : 1;
}
