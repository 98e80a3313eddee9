// The CPU emulator's core (see emu.h): a block's CUDA threads as fibers on one OS thread, the block
// barrier, the warp barrier every collective goes through, the launch checks, kernel faults and the
// memory spaces the kernels' addresses fall in.
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>

#include <algorithm>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>

#include "internal.h"

#if defined(__x86_64__) && !defined(MMGPT_EMU_UCONTEXT)
#define MMGPT_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#ifdef MMGPT_EMU_TSAN
#include <sanitizer/tsan_interface.h>
#endif
#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

// --------------------------------------------------------------------------- context switches
#ifdef MMGPT_EMU_ASM_SWITCH
// A switch saves the callee-saved registers of the System V x86-64 ABI (rbx, rbp, r12-r15 and the
// MXCSR / x87 control words) on the current stack and resumes another one: no system call, unlike
// swapcontext's signal-mask round trip, which made a launch's thousands of warp barriers the
// emulator's main cost. A new fiber's stack starts as a saved frame that returns into the trampoline,
// which calls the entry point held in r12.
asm(R"(
.text
.p2align 4
.type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch_stack, .-emu_switch_stack
.p2align 4
.type emu_fiber_trampoline, @function
emu_fiber_trampoline:
  callq *%r12
  ud2
.size emu_fiber_trampoline, .-emu_fiber_trampoline
)");
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
extern "C" void emu_fiber_trampoline();

struct Context {
  void* sp = nullptr;
};

void context_start(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
  uint64_t* frame = top - 8;  // control words, r15, r14, r13, r12, rbx, rbp, return address
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  frame[0] = mxcsr | (static_cast<uint64_t>(fpucw) << 32);
  for (int i = 1; i < 7; ++i) frame[i] = 0;
  frame[4] = reinterpret_cast<uint64_t>(entry);
  frame[7] = reinterpret_cast<uint64_t>(&emu_fiber_trampoline);
  c.sp = frame;
}

void context_switch(Context& from, Context& to) { emu_switch_stack(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void context_start(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;  // fibers never return: they switch back for good
  makecontext(&c.uc, entry, 0);
}

void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ------------------------------------------------------------------------ fibers and blocks
struct Fiber {
  Context context;
  ThreadCtx ctx;
  std::vector<PendingCopy> pending;  // cp.async issued, not yet waited for
  bool done = false;
  const unsigned* wait_generation = nullptr;  // blocked until *wait_generation != wait_value
  unsigned wait_value = 0;
  Op waiting_at = Op::kNone;                  // for a deadlock report: kNone = __syncthreads
  void* asan_fake_stack = nullptr;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier barrier;
  int live = 0;  // threads that have not exited; they no longer count at __syncthreads (bar.sync)
  bool aborted = false;
  const std::function<void()>* body = nullptr;
};

Block g_block;
int g_current = -1;
Context g_scheduler;
std::vector<char*> g_stacks;
unsigned char* g_dynamic_smem = nullptr;
size_t g_dynamic_smem_bytes = 0;
LaunchSite g_site{"", 0, ""};

// ThreadSanitizer build (MMGPT_EMU_TSAN; the kernels compiled with -fsanitize=thread, this file not):
// every CUDA thread is a TSan fiber, and the only happens-before edges between the threads of a block
// are the ones the GPU has: __syncthreads (each phase its own sync object) and the end of the block;
// the warp collectives exchange registers and order no memory. Fiber switches carry none, so an
// access to shared memory that no barrier orders against another thread's write is reported as a
// race, as compute-sanitizer's racecheck would.
char g_block_done;  // sync object: every thread of a block happens before the next block
#ifdef MMGPT_EMU_TSAN
std::vector<void*> g_tsan_fibers;
void* g_tsan_host = nullptr;
void tsan_enter_fiber(int i) { __tsan_switch_to_fiber(g_tsan_fibers[static_cast<size_t>(i)], 0); }
void tsan_leave_fiber() { __tsan_switch_to_fiber(g_tsan_host, __tsan_switch_to_fiber_no_sync); }
void tsan_release(const void* sync) {
  if (sync) __tsan_release(const_cast<void*>(sync));
}
void tsan_acquire(const void* sync) {
  if (sync) __tsan_acquire(const_cast<void*>(sync));
}
void tsan_forget_fibers() {  // after an aborted block: its fibers' TSan state is mid-call
  for (void* f : g_tsan_fibers) __tsan_destroy_fiber(f);
  g_tsan_fibers.clear();
}
#else
inline void tsan_enter_fiber(int) {}
inline void tsan_leave_fiber() {}
inline void tsan_release(const void*) {}
inline void tsan_acquire(const void*) {}
inline void tsan_forget_fibers() {}
#endif

// AddressSanitizer is told about every stack switch, so that it checks each fiber against its own stack.
#ifdef __SANITIZE_ADDRESS__
const void* g_host_stack_bottom = nullptr;
size_t g_host_stack_size = 0;
#endif

Fiber& current() { return g_block.fibers[static_cast<size_t>(g_current)]; }

void to_fiber(int i) {
  Fiber& f = g_block.fibers[static_cast<size_t>(i)];
  g_current = i;
  tsan_enter_fiber(i);  // carries the host's set-up (shared memory fill, indices), nothing else
#ifdef __SANITIZE_ADDRESS__
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, g_stacks[static_cast<size_t>(i)], kStackBytes);
  context_switch(g_scheduler, f.context);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  context_switch(g_scheduler, f.context);
#endif
}

// Back to the scheduler: until resumed, or for good (an exited or faulted thread).
void to_scheduler(bool for_good) {
  Fiber& f = current();
  tsan_leave_fiber();
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_start_switch_fiber(for_good ? nullptr : &f.asan_fake_stack, g_host_stack_bottom, g_host_stack_size);
  context_switch(f.context, g_scheduler);
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, &g_host_stack_bottom, &g_host_stack_size);
#else
  (void)for_good;
  context_switch(f.context, g_scheduler);
#endif
}

// ------------------------------------------------------------------------------- messages
std::string vformat(const char* fmt, va_list args) {
  va_list copy;
  va_copy(copy, args);
  const int n = std::vsnprintf(nullptr, 0, fmt, copy);
  va_end(copy);
  std::string s(n > 0 ? static_cast<size_t>(n) : 0, '\0');
  std::vsnprintf(s.data(), s.size() + 1, fmt, args);
  return s;
}

std::string launch_description() {
  const char* file = std::strrchr(g_site.file, '/');
  return format("kernel launched at %s:%d by %s", file ? file + 1 : g_site.file, g_site.line, g_site.function);
}

std::string lanes_string(uint32_t mask) {
  std::string s;
  for (int lo = 0; lo < 32; ++lo) {
    if (!(mask >> lo & 1u)) continue;
    int hi = lo;
    while (hi + 1 < 32 && (mask >> (hi + 1) & 1u)) ++hi;
    s += (s.empty() ? "" : ", ") + (lo == hi ? format("%d", lo) : format("%d-%d", lo, hi));
    lo = hi;
  }
  return s.empty() ? "none" : s;
}

// An instruction of the kernel code: the library and offset (addr2line -e <library> <offset>).
std::string site_string(const void* site) {
  Dl_info info{};
  if (site != nullptr && dladdr(site, &info) != 0 && info.dli_fname != nullptr) {
    const char* name = std::strrchr(info.dli_fname, '/');
    return format("%s+0x%zx", name ? name + 1 : info.dli_fname,
                  static_cast<size_t>(static_cast<const char*>(site) - static_cast<const char*>(info.dli_fbase)));
  }
  return format("%p", site);
}

// ---------------------------------------------------------------------------------- barriers
void release(Barrier& b) {
  b.arrived = 0;
  ++b.generation;
}

// Arrive at the barrier; return once `expected` members have arrived. orders_memory: whether the
// operation orders the members' memory accesses (bar.sync does; the warp collectives shfl.sync,
// ldmatrix and mma.sync exchange registers only, so lanes that talk through shared memory around
// them race, as on the GPU).
void arrive(Barrier& b, int expected, bool orders_memory, Op op) {
  // this phase's sync object: a member that runs on to the next phase releases into the other one
  const void* sync = orders_memory ? b.sync() : nullptr;
  tsan_release(sync);
  const unsigned generation = b.generation;
  if (++b.arrived >= expected) {
    release(b);
    tsan_acquire(sync);
    return;
  }
  Fiber& f = current();
  f.wait_generation = &b.generation;
  f.wait_value = generation;
  f.waiting_at = op;
  to_scheduler(false);
  tsan_acquire(sync);
}

void fiber_entry() {
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_finish_switch_fiber(nullptr, &g_host_stack_bottom, &g_host_stack_size);
#endif
  (*g_block.body)();
  Fiber& f = current();
  if (!f.pending.empty())
    fault(cudaErrorLaunchFailure, "the thread exited with cp.async copies in flight: %zu x 16 bytes, never "
          "waited for with cp.async.wait_group", f.pending.size());
  Warp& w = current_warp();
  if (w.barrier.arrived > 0)
    fault(cudaErrorLaunchFailure, "lane %d exited while lanes %s of its warp wait for it at %s (%s): every lane "
          "of a warp takes part in each shfl / ldmatrix / mma", current_lane(), lanes_string(w.arrived_mask).c_str(),
          op_name(w.op), site_string(w.site).c_str());
  --w.live;
  f.done = true;
  // an exited thread no longer counts at __syncthreads: release the barrier if the rest wait at it
  tsan_release(g_block.barrier.sync());
  --g_block.live;
  if (g_block.barrier.arrived > 0 && g_block.barrier.arrived >= g_block.live) release(g_block.barrier);
  tsan_release(&g_block_done);
  to_scheduler(true);
  std::abort();  // never resumed
}

// ----------------------------------------------------------------------------- memory spaces
struct Range {
  uintptr_t begin, end;
};

// The writable segments of this library: its static data, among which the `__shared__` variables
// (function statics under the emulator).
const std::vector<Range>& static_data() {
  static const std::vector<Range> ranges = [] {
    std::vector<Range> out;
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* data) {
          const auto self = reinterpret_cast<uintptr_t>(&g_block);
          std::vector<Range> segments;
          bool mine = false;
          for (int i = 0; i < info->dlpi_phnum; ++i) {
            const ElfW(Phdr)& ph = info->dlpi_phdr[i];
            if (ph.p_type != PT_LOAD) continue;
            const uintptr_t begin = info->dlpi_addr + ph.p_vaddr, end = begin + ph.p_memsz;
            mine = mine || (self >= begin && self < end);
            if (ph.p_flags & PF_W) segments.push_back({begin, end});
          }
          if (mine) *static_cast<std::vector<Range>*>(data) = segments;
          return mine ? 1 : 0;
        },
        &out);
    return out;
  }();
  return ranges;
}

bool within(uintptr_t p, size_t bytes, uintptr_t begin, uintptr_t end) { return p >= begin && p + bytes <= end; }

}  // namespace

// ------------------------------------------------------------------------------ shared API
ThreadCtx& ctx() { return current().ctx; }
std::vector<PendingCopy>& pending_copies() { return current().pending; }
void* dynamic_smem() { return g_dynamic_smem; }
Warp& current_warp() { return g_block.warps[static_cast<size_t>(g_current / 32)]; }
int current_lane() { return g_current % 32; }
int current_thread() { return g_current; }

std::string format(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::string s = vformat(fmt, args);
  va_end(args);
  return s;
}

std::string where() {
  const ThreadCtx& c = current().ctx;
  return format("block (%u, %u, %u), thread %d (warp %d, lane %d); %s", c.block_idx.x, c.block_idx.y,
                c.block_idx.z, g_current, g_current / 32, g_current % 32, launch_description().c_str());
}

[[noreturn]] void fault(cudaError_t code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  const std::string what = vformat(fmt, args);
  va_end(args);
  if (g_current < 0) {  // not inside a kernel: a bug of the emulator itself
    std::fprintf(stderr, "emu: %s\n", what.c_str());
    std::abort();
  }
  set_error(code, true, format("sm_%d: %s; at %s", current_device().cc, what.c_str(), where().c_str()));
  g_block.aborted = true;
  to_scheduler(true);  // never resumed: the scheduler abandons the block
  std::abort();
}

const char* op_name(Op op) {
  switch (op) {
    case Op::kShfl: return "shfl.sync";
    case Op::kLdmatrix: return "ldmatrix";
    case Op::kMma: return "mma.sync";
    default: return "__syncthreads";
  }
}

void warp_arrive(Warp& w, Op op, const void* site) {
  const int lane = current_lane();
  if (w.live < 32) {
    uint32_t exited = 0;
    for (int i = 0; i < 32; ++i)
      if (g_block.fibers[static_cast<size_t>(g_current - lane + i)].done) exited |= 1u << i;
    fault(cudaErrorLaunchFailure, "%s (%s) after lanes %s of the warp exited: every lane of a warp takes part in "
          "each shfl / ldmatrix / mma", op_name(op), site_string(site).c_str(), lanes_string(exited).c_str());
  }
  if (w.barrier.arrived == 0) {
    w.op = op;
    w.site = site;
    w.arrived_mask = 0;
  } else if (w.op != op || w.site != site) {
    fault(cudaErrorLaunchFailure, "lane %d is at %s (%s) while lanes %s of its warp are at %s (%s): the lanes of a "
          "warp reach each collective together", lane, op_name(op), site_string(site).c_str(),
          lanes_string(w.arrived_mask).c_str(), op_name(w.op), site_string(w.site).c_str());
  }
  w.arrived_mask |= 1u << lane;
  arrive(w.barrier, 32, false, op);
}

void block_barrier() { arrive(g_block.barrier, g_block.live, true, Op::kNone); }

const char* space_name(Space s) {
  switch (s) {
    case Space::kShared: return "shared memory";
    case Space::kSharedOverrun: return "shared memory but runs past the end of the dynamic shared memory";
    case Space::kLocal: return "local memory (a thread's stack)";
    default: return "global memory";
  }
}

Space space_of(const void* ptr, size_t bytes) {
  const auto p = reinterpret_cast<uintptr_t>(ptr);
  const auto smem = reinterpret_cast<uintptr_t>(g_dynamic_smem);
  if (g_dynamic_smem != nullptr && within(p, bytes, smem, smem + g_dynamic_smem_bytes)) return Space::kShared;
  for (const Range& r : static_data())
    if (within(p, bytes, r.begin, r.end)) return Space::kShared;
  if (g_dynamic_smem != nullptr && p >= smem && p < smem + g_dynamic_smem_bytes) return Space::kSharedOverrun;
  for (char* stack : g_stacks) {
    const auto s = reinterpret_cast<uintptr_t>(stack);
    if (p >= s && p < s + kStackBytes) return Space::kLocal;
  }
  return Space::kGlobal;
}

// ---------------------------------------------------------------------------------- launches
namespace {

void refuse(cudaError_t code, const std::string& why) {
  set_error(code, false, format("sm_%d: launch refused: %s; %s", current_device().cc, why.c_str(),
                                launch_description().c_str()));
}

// What the GPU refuses at launch; empty when the launch may run.
std::string launch_problem(const void* kernel, int max_threads, dim3 grid, dim3 block, size_t smem, cudaError_t& code) {
  const long threads = static_cast<long>(block.x) * block.y * block.z;
  code = cudaErrorInvalidConfiguration;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > 1024)
    return format("block (%u, %u, %u): each dimension at least 1, at most (1024, 1024, 64), and at most 1024 threads",
                  block.x, block.y, block.z);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > static_cast<unsigned>(INT_MAX) || grid.y > 65535 ||
      grid.z > 65535)
    return format("grid (%u, %u, %u): each dimension at least 1, at most (2147483647, 65535, 65535)", grid.x, grid.y,
                  grid.z);
  code = cudaErrorInvalidValue;
  if (threads > max_threads)
    return format("%ld threads per block, above the kernel's __launch_bounds__(%d)", threads, max_threads);
  bool opted_in = false;
  const int limit = kernel_smem_limit(kernel, opted_in);
  if (smem > static_cast<size_t>(limit)) {
    if (!opted_in)
      return format("%zu B of dynamic shared memory, above the %d B a kernel gets without opting in "
                    "(cudaFuncSetAttribute(MaxDynamicSharedMemorySize), up to %d B here)", smem, limit,
                    current_device().smem_optin);
    return format("%zu B of dynamic shared memory, above the %d B this kernel is opted in to (this device's "
                  "opt-in maximum: %d B)", smem, limit, current_device().smem_optin);
  }
  code = cudaErrorNotSupported;
  if (threads % 32 != 0) return format("%ld threads per block: the emulator runs blocks of whole warps only", threads);
  return {};
}

// Runs one block; false when it faulted (deadlock included), with the error set.
bool run_block(dim3 grid, dim3 block, uint3 block_idx, int threads) {
  traffic_block_begin();
  g_block.fibers.assign(static_cast<size_t>(threads), Fiber{});
  g_block.warps.assign(static_cast<size_t>(threads / 32), Warp{});
  g_block.barrier = Barrier{};
  g_block.live = threads;
  g_block.aborted = false;
  for (int i = 0; i < threads; ++i) {
    Fiber& f = g_block.fibers[static_cast<size_t>(i)];
    const unsigned t = static_cast<unsigned>(i);
    const uint3 thread_idx = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    f.ctx = ThreadCtx{thread_idx, block_idx, block, grid};
    context_start(f.context, g_stacks[static_cast<size_t>(i)], kStackBytes, fiber_entry);
  }
  for (int remaining = threads; remaining > 0 && !g_block.aborted;) {
    bool progressed = false;
    for (int i = 0; i < threads && !g_block.aborted; ++i) {
      Fiber& f = g_block.fibers[static_cast<size_t>(i)];
      if (f.done || (f.wait_generation != nullptr && *f.wait_generation == f.wait_value)) continue;
      f.wait_generation = nullptr;
      to_fiber(i);
      progressed = true;
      if (f.done) --remaining;
    }
    if (!progressed && !g_block.aborted) {
      std::string waits;
      for (size_t w = 0; w < g_block.warps.size(); ++w) {
        uint32_t at_barrier = 0, at_op = 0;
        for (int l = 0; l < 32; ++l) {
          const Fiber& f = g_block.fibers[w * 32 + static_cast<size_t>(l)];
          if (f.done) continue;
          (f.waiting_at == Op::kNone ? at_barrier : at_op) |= 1u << l;
        }
        if (at_barrier) waits += format("; warp %zu lanes %s at __syncthreads", w, lanes_string(at_barrier).c_str());
        if (at_op)
          waits += format("; warp %zu lanes %s at %s (%s)", w, lanes_string(at_op).c_str(),
                          op_name(g_block.warps[w].op), site_string(g_block.warps[w].site).c_str());
      }
      set_error(cudaErrorLaunchFailure, true,
                format("sm_%d: deadlock in block (%u, %u, %u): threads wait at barriers the others never reach%s; %s",
                       current_device().cc, block_idx.x, block_idx.y, block_idx.z, waits.c_str(),
                       launch_description().c_str()));
      g_block.aborted = true;
    }
  }
  g_current = -1;
  if (!g_block.aborted) {
    tsan_acquire(&g_block_done);  // blocks run one after another on reused statics and stacks
    return true;
  }
#ifdef __SANITIZE_ADDRESS__
  for (int i = 0; i < threads; ++i) ASAN_UNPOISON_MEMORY_REGION(g_stacks[static_cast<size_t>(i)], kStackBytes);
#endif
  tsan_forget_fibers();
  return false;
}

}  // namespace

void run_grid(const void* kernel, int max_threads, dim3 grid, dim3 block, size_t smem, const LaunchSite& site,
              const std::function<void()>& body) {
  count_call("launch");
  g_site = site;
  if (sticky_error() != cudaSuccess) {
    refuse(sticky_error(), "an earlier kernel faulted (" + error_message() + ")");
    return;
  }
  cudaError_t code = cudaSuccess;
  const std::string problem = launch_problem(kernel, max_threads, grid, block, smem, code);
  if (!problem.empty()) {
    refuse(code, problem);
    return;
  }
  count_call(format("launch with %zu B", smem).c_str());  // dynamic shared memory: which tiles a plan chose
  const int threads = static_cast<int>(block.x * block.y * block.z);
  // exactly the bytes requested (an access past them is an error the address-sanitized build reports),
  // 128-byte aligned like the GPU's window; not zero: kernels must not rely on fresh shared memory
  void* window = nullptr;
  if (posix_memalign(&window, 128, smem > 0 ? smem : 1) != 0) fault(cudaErrorMemoryAllocation, "no memory");
  g_dynamic_smem = static_cast<unsigned char*>(window);
  g_dynamic_smem_bytes = smem;
  std::memset(g_dynamic_smem, 0xcd, smem > 0 ? smem : 1);
  while (g_stacks.size() < static_cast<size_t>(threads)) {
    void* stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (stack == MAP_FAILED) fault(cudaErrorMemoryAllocation, "cannot map a fiber stack");
    g_stacks.push_back(static_cast<char*>(stack));
  }
  g_block.body = &body;
#ifdef MMGPT_EMU_TSAN
  g_tsan_host = __tsan_get_current_fiber();
  while (g_tsan_fibers.size() < static_cast<size_t>(threads)) g_tsan_fibers.push_back(__tsan_create_fiber(0));
#endif
  traffic_launch_begin(kernel, site, grid, block, smem);
  bool ok = true;
  for (unsigned bz = 0; bz < grid.z && ok; ++bz)
    for (unsigned by = 0; by < grid.y && ok; ++by)
      for (unsigned bx = 0; bx < grid.x && ok; ++bx) ok = run_block(grid, block, make_uint3(bx, by, bz), threads);
  traffic_launch_end();
  std::free(g_dynamic_smem);
  g_dynamic_smem = nullptr;
  g_dynamic_smem_bytes = 0;
}

}  // namespace emu
