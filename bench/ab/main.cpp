// bench/ab.py's driver: each case of the two versions of the library (libab_base.so and
// libab_work.so, both built from cases.cpp) as the runs "base/<case>/threads:<t>" and
// "work/<case>/threads:<t>", for the thread counts of --ab_threads=1,2 (the default).
#include <benchmark/benchmark.h>

#include <cstring>
#include <sstream>
#include <string>
#include <vector>

extern "C" {
int base_cases();
const char* base_name(int i);
void* base_make(int i, int threads);
void base_run(void* c, int threads);
void base_free(void* c);
int work_cases();
const char* work_name(int i);
void* work_make(int i, int threads);
void work_run(void* c, int threads);
void work_free(void* c);
}

namespace {

struct Version {
  const char* label;
  int (*cases)();
  const char* (*name)(int);
  void* (*make)(int, int);
  void (*run)(void*, int);
  void (*free)(void*);
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> threads{1, 2};
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--ab_threads=", 13) == 0) {
      threads.clear();
      std::stringstream list(argv[i] + 13);
      for (std::string t; std::getline(list, t, ',');) threads.push_back(std::stoi(t));
    } else {
      args.push_back(argv[i]);
    }
  }
  for (const Version& v : {Version{"base", base_cases, base_name, base_make, base_run, base_free},
                           Version{"work", work_cases, work_name, work_make, work_run, work_free}})
    for (int i = 0; i < v.cases(); ++i)
      for (int t : threads) {
        const std::string name = std::string(v.label) + "/" + v.name(i) + "/threads:" + std::to_string(t);
        benchmark::RegisterBenchmark(name.c_str(), [v, i, t](benchmark::State& state) {
          void* c = v.make(i, t);
          for (auto _ : state) v.run(c, t);
          v.free(c);
        })->UseRealTime()->Unit(benchmark::kMillisecond);
      }
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
