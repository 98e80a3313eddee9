// Global-memory traffic of the emulated kernels, for the IO audit (benchmarks/io_audit.py): the
// bytes each launch reads and writes in each watched range (the tensors of a call, registered by
// benchmarks/cuda_emulator.py).
//
// In the counting build (build(sanitize="count"), MMGPT_EMU_COUNT) the kernels' translation units
// are compiled with GCC's -fsanitize=kernel-address and a call per check
// (asan-instrumentation-with-call-threshold=0): every load and store of the kernel code calls one of
// the __asan_{load,store}{1,2,4,8,16,N}_noabort hooks below with its address and size, 16-byte
// vectors and aggregate copies included. A watched range is all the hooks look for, so the
// fibers' stacks (registers and local arrays), shared memory and the emulator's own state never
// count. cp.async reads its source in the (uninstrumented) runtime, which counts the src-size bytes
// at issue (count_access from check_cp_async): the global read of the instruction, whatever is
// zero-filled. Only accesses made while a launch runs count.
//
// A byte counts once per warp instruction, as a GPU moves it: the lanes of a warp that load the same
// word (a row's statistic, a target index) share one broadcast, and two instructions that touch the
// same bytes move them twice. A lane's k-th execution of an instruction is taken as the same warp
// instruction as the other lanes' k-th: lanes run one after another between synchronisation points,
// so the emulator cannot see which lanes issue together, and for lanes that take the same path it is
// the same thing. The counts depend on the kernels and the launch plan alone, not on the schedule.
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <unordered_map>

#include "internal.h"

namespace emu {
namespace {

struct Watched {
  uintptr_t begin;
  size_t bytes;
};

struct LaunchRecord {
  const void* kernel;
  LaunchSite site;
  dim3 grid, block;
  size_t smem;
  std::vector<std::array<uint64_t, 2>> bytes;  // per watched range: read, written
};

bool g_recording = false;
std::vector<Watched> g_watched;
std::vector<LaunchRecord> g_launches;
LaunchRecord* g_open = nullptr;  // the running launch, when recorded

// One execution of an instruction (its address) by a thread or, with the thread's warp in place of
// the thread, by a warp: the k-th, per block.
struct Execution {
  const void* site;
  int who;
  bool write;
  uint64_t k;
  bool operator==(const Execution&) const = default;
};
struct ExecutionHash {
  size_t operator()(const Execution& e) const {
    size_t h = std::hash<const void*>()(e.site) ^ (static_cast<size_t>(e.who) << 1 | e.write);
    return h * 0x9e3779b97f4a7c15ull ^ e.k;
  }
};
struct Interval {
  uintptr_t begin, end;
};
std::unordered_map<Execution, uint64_t, ExecutionHash> g_executions;                // (site, thread) -> count
std::unordered_map<Execution, std::vector<Interval>, ExecutionHash> g_warp_bytes;  // disjoint, per warp execution

// The bytes of [p, p + bytes) that the warp instruction's other lanes have not touched yet; adds them.
uint64_t new_bytes(const void* site, bool write, uintptr_t p, size_t bytes) {
  const int thread = current_thread();
  uint64_t& k = g_executions[{site, thread, write, 0}];
  std::vector<Interval>& touched = g_warp_bytes[{site, thread / 32, write, k++}];
  const uintptr_t last = p + bytes;
  uintptr_t begin = p, end = last;  // the access merged with the intervals it overlaps or touches
  uint64_t covered = 0;             // its bytes already touched (the intervals are disjoint)
  std::vector<Interval> kept;
  for (const Interval& t : touched) {
    if (t.end < begin || t.begin > end) {
      kept.push_back(t);
      continue;
    }
    if (t.begin < last && t.end > p) covered += std::min(t.end, last) - std::max(t.begin, p);
    begin = std::min(begin, t.begin);
    end = std::max(end, t.end);
  }
  kept.push_back({begin, end});
  touched.swap(kept);
  return bytes - covered;
}

}  // namespace

void traffic_block_begin() {
  if (g_open == nullptr) return;
  g_executions.clear();
  g_warp_bytes.clear();
}

void traffic_launch_begin(const void* kernel, const LaunchSite& site, dim3 grid, dim3 block, size_t smem) {
  if (!g_recording) return;
  g_launches.push_back({kernel, site, grid, block, smem, std::vector<std::array<uint64_t, 2>>(g_watched.size())});
  g_open = &g_launches.back();
}

void traffic_launch_end() { g_open = nullptr; }

void count_access(const void* site, const void* ptr, size_t bytes, bool write) {
  if (g_open == nullptr || bytes == 0) return;
  const auto p = reinterpret_cast<uintptr_t>(ptr);
  for (size_t i = 0; i < g_watched.size(); ++i)
    if (p - g_watched[i].begin < g_watched[i].bytes) {  // the range holding the access's first byte
      g_open->bytes[i][write ? 1 : 0] += new_bytes(site, write, p, bytes);
      return;
    }
}

}  // namespace emu

extern "C" {
#ifdef MMGPT_EMU_COUNT
// What GCC's kernel-address instrumentation calls (with -fsanitize-recover, its default for the
// kernel: the _noabort forms); the plain forms in case a build asks for no recovery. The caller's
// return address stands for the instruction.
#define MMGPT_EMU_SITE __builtin_return_address(0)
#define MMGPT_EMU_HOOKS(n)                                                                                \
  void __asan_load##n##_noabort(const void* p) { emu::count_access(MMGPT_EMU_SITE, p, n, false); }      \
  void __asan_store##n##_noabort(const void* p) { emu::count_access(MMGPT_EMU_SITE, p, n, true); }      \
  void __asan_load##n(const void* p) { emu::count_access(MMGPT_EMU_SITE, p, n, false); }                \
  void __asan_store##n(const void* p) { emu::count_access(MMGPT_EMU_SITE, p, n, true); }
MMGPT_EMU_HOOKS(1)
MMGPT_EMU_HOOKS(2)
MMGPT_EMU_HOOKS(4)
MMGPT_EMU_HOOKS(8)
MMGPT_EMU_HOOKS(16)
#undef MMGPT_EMU_HOOKS
void __asan_loadN_noabort(const void* p, size_t n) { emu::count_access(MMGPT_EMU_SITE, p, n, false); }
void __asan_storeN_noabort(const void* p, size_t n) { emu::count_access(MMGPT_EMU_SITE, p, n, true); }
void __asan_loadN(const void* p, size_t n) { emu::count_access(MMGPT_EMU_SITE, p, n, false); }
void __asan_storeN(const void* p, size_t n) { emu::count_access(MMGPT_EMU_SITE, p, n, true); }
void __asan_handle_no_return() {}
#endif

// 1 in the counting build (its kernels call the hooks), else 0: only cp.async would count.
int mmgpt_emu_traffic_counting() {
#ifdef MMGPT_EMU_COUNT
  return 1;
#else
  return 0;
#endif
}

// Forgets every watched range and record; recording on: each launch from now on gets a record.
void mmgpt_emu_traffic_start() {
  emu::g_watched.clear();
  emu::g_launches.clear();
  emu::g_open = nullptr;
  emu::g_recording = true;
}

void mmgpt_emu_traffic_stop() { emu::g_recording = false; }

// Watches [begin, begin + bytes) (a tensor) for the launches that start after this; its index.
int mmgpt_emu_traffic_watch(const void* begin, int64_t bytes) {
  emu::g_watched.push_back({reinterpret_cast<uintptr_t>(begin), static_cast<size_t>(std::max<int64_t>(bytes, 0))});
  return static_cast<int>(emu::g_watched.size() - 1);
}

int64_t mmgpt_emu_traffic_launches() { return static_cast<int64_t>(emu::g_launches.size()); }

// Launch i: its kernel (as an offset into the library that holds it, for the symbol table), where
// it was launched, its grid, block and dynamic shared memory; -1 for no such launch.
struct TrafficLaunch {
  int64_t kernel_offset;
  const char* file;
  int line;
  unsigned grid[3], block[3];
  int64_t smem;
};

int mmgpt_emu_traffic_launch(int64_t i, TrafficLaunch* out) {
  if (i < 0 || i >= static_cast<int64_t>(emu::g_launches.size())) return -1;
  const emu::LaunchRecord& r = emu::g_launches[static_cast<size_t>(i)];
  Dl_info info{};
  const bool known = dladdr(r.kernel, &info) != 0 && info.dli_fbase != nullptr;
  out->kernel_offset = known ? static_cast<const char*>(r.kernel) - static_cast<const char*>(info.dli_fbase) : -1;
  out->file = r.site.file;
  out->line = r.site.line;
  const unsigned grid[3] = {r.grid.x, r.grid.y, r.grid.z}, block[3] = {r.block.x, r.block.y, r.block.z};
  std::copy(grid, grid + 3, out->grid);
  std::copy(block, block + 3, out->block);
  out->smem = static_cast<int64_t>(r.smem);
  return 0;
}

// The bytes launch i read (write = 0) or wrote (write = 1) in watched range `watched`; -1 when out of range.
int64_t mmgpt_emu_traffic_bytes(int64_t i, int watched, int write) {
  if (i < 0 || i >= static_cast<int64_t>(emu::g_launches.size())) return -1;
  const emu::LaunchRecord& r = emu::g_launches[static_cast<size_t>(i)];
  if (watched < 0 || static_cast<size_t>(watched) >= r.bytes.size()) return 0;  // watched after this launch
  return static_cast<int64_t>(r.bytes[static_cast<size_t>(watched)][write ? 1 : 0]);
}
}
