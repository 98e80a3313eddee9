// The CPU emulator's runtime (see emu.h): fibers, barriers, the warp collectives with their PTX
// semantics, the few CUDA runtime calls the launchers make, and a C entry point per launcher
// for ctypes (tests/ops/test_cuda_emulated.py).
#include "emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../launchers.h"

#ifdef MMGPT_EMU_TSAN
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_read_range(void* addr, unsigned long size);
#endif

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

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
void tsan_read(const void* addr, size_t bytes) { __tsan_read_range(const_cast<void*>(addr), bytes); }
#else
inline void tsan_enter_fiber(int) {}
inline void tsan_leave_fiber() {}
inline void tsan_release(const void*) {}
inline void tsan_acquire(const void*) {}
inline void tsan_read(const void*, size_t) {}
#endif

struct Fiber {
  ucontext_t context;
  ThreadCtx ctx;
  std::vector<PendingCopy> pending;  // cp.async issued, not yet waited for
  bool done = false;
  const unsigned* wait_generation = nullptr;  // blocked until *wait_generation != wait_value
  unsigned wait_value = 0;
};

struct Barrier {
  unsigned generation = 0;
  int arrived = 0;
  int live = 0;  // threads that have not exited
  char phase_sync[2] = {0, 0};  // TSan sync objects, alternating by generation
  const void* sync() const { return &phase_sync[generation & 1]; }
};

struct Warp {
  Barrier barrier;
  float f[32];
  const void* address[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier barrier;
  const std::function<void()>* body = nullptr;
};

Block g_block;
int g_current = -1;
ucontext_t g_scheduler;
std::vector<char*> g_stacks;
std::vector<unsigned char> g_dynamic_smem;
int g_sm_count = 4;
int g_smem_optin = 227 * 1024;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "emu: %s\n", what);
  std::abort();
}

Fiber& current() { return g_block.fibers[static_cast<size_t>(g_current)]; }
int current_lane() { return g_current % 32; }
Warp& current_warp() { return g_block.warps[static_cast<size_t>(g_current / 32)]; }

void release(Barrier& b) {
  b.arrived = 0;
  ++b.generation;
}

// Arrive at the barrier; return once every live member has arrived. orders_memory: whether the
// operation orders the members' memory accesses (bar.sync does; the warp collectives shfl.sync,
// ldmatrix and mma.sync exchange registers only, so lanes that talk through shared memory around
// them race, as on the GPU).
void arrive(Barrier& b, bool orders_memory) {
  // this phase's sync object: a member that runs on to the next phase releases into the other one
  const void* sync = orders_memory ? b.sync() : nullptr;
  tsan_release(sync);
  const unsigned generation = b.generation;
  if (++b.arrived >= b.live) {
    release(b);
    tsan_acquire(sync);
    return;
  }
  Fiber& f = current();
  f.wait_generation = &b.generation;
  f.wait_value = generation;
  tsan_leave_fiber();
  swapcontext(&f.context, &g_scheduler);
  tsan_acquire(sync);
}

void fiber_entry() {
  (*g_block.body)();
  Fiber& f = current();
  f.done = true;
  // an exited thread no longer counts at barriers: release any its peers are waiting on
  tsan_release(g_block.barrier.sync());
  for (Barrier* b : {&g_block.barrier, &current_warp().barrier}) {
    --b->live;
    if (b->arrived > 0 && b->arrived >= b->live) release(*b);
  }
  tsan_release(&g_block_done);
  tsan_leave_fiber();
}  // returns to g_scheduler through uc_link

uint16_t half_bits(uint32_t packed, int which) { return static_cast<uint16_t>(which ? packed >> 16 : packed & 0xffff); }

float to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

}  // namespace

ThreadCtx& ctx() { return current().ctx; }

std::vector<PendingCopy>& pending_copies() { return current().pending; }

void* dynamic_smem() { return g_dynamic_smem.data(); }

void block_barrier() { arrive(g_block.barrier, true); }

float shfl_xor(float v, int lane_mask) {
  Warp& w = current_warp();
  const int lane = current_lane();
  w.f[lane] = v;
  arrive(w.barrier, false);
  const float r = w.f[lane ^ lane_mask];
  arrive(w.barrier, false);  // nobody overwrites f before every lane has read it
  return r;
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8i..8i+7 address the rows of matrix i;
// lane t receives row t/4, columns 2(t%4) and 2(t%4)+1 of matrix i (transposed: column t/4,
// rows 2(t%4) and 2(t%4)+1) in register i, the lower column (row) in the low half.
void ldmatrix_x4(uint32_t (&r)[4], const void* row_address, bool trans) {
  Warp& w = current_warp();
  const int t = current_lane();
  w.address[t] = row_address;
  arrive(w.barrier, false);
  for (int i = 0; i < 4; ++i) {
    auto element = [&](int row, int col) {
      const uint16_t* at = static_cast<const uint16_t*>(w.address[8 * i + row]) + col;
      tsan_read(at, sizeof *at);  // this lane reads shared memory at another lane's address
      return *at;
    };
    const uint16_t lo = trans ? element(2 * (t % 4), t / 4) : element(t / 4, 2 * (t % 4));
    const uint16_t hi = trans ? element(2 * (t % 4) + 1, t / 4) : element(t / 4, 2 * (t % 4) + 1);
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  arrive(w.barrier, false);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: fragments as in the PTX ISA (see
// flash_attn_common.cuh); each lane computes its own four accumulators from every lane's A and B.
void mma_m16n8k16_f32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Warp& w = current_warp();
  const int t = current_lane();
  for (int i = 0; i < 4; ++i) w.a[t][i] = a[i];
  w.b[t][0] = b0;
  w.b[t][1] = b1;
  arrive(w.barrier, false);
  auto A = [&](int row, int k) {
    return to_float(half_bits(w.a[(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k % 2), bf16);
  };
  auto B = [&](int k, int n) { return to_float(half_bits(w.b[n * 4 + (k % 8) / 2][k >= 8], k % 2), bf16); };
  for (int e = 0; e < 4; ++e) {
    const int row = t / 4 + (e >= 2 ? 8 : 0), col = 2 * (t % 4) + (e & 1);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    c[e] += sum;
  }
  arrive(w.barrier, false);
}

void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads <= 0 || threads > 1024) fail("block size outside 1..1024");
  if (threads % 32 != 0) fail("the emulator takes blocks of whole warps");
  if (smem > static_cast<size_t>(g_smem_optin)) fail("dynamic shared memory above the device limit");
  // exactly the bytes requested (an access past them is an error the address-sanitized build reports);
  // not zero: kernels must not rely on fresh shared memory
  g_dynamic_smem.assign(smem > 0 ? smem : 1, 0xcd);
  while (g_stacks.size() < static_cast<size_t>(threads)) {
    void* stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (stack == MAP_FAILED) fail("cannot map a fiber stack");
    g_stacks.push_back(static_cast<char*>(stack));
  }
  g_block.body = &body;
#ifdef MMGPT_EMU_TSAN
  g_tsan_host = __tsan_get_current_fiber();
  while (g_tsan_fibers.size() < static_cast<size_t>(threads)) g_tsan_fibers.push_back(__tsan_create_fiber(0));
#endif
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        g_block.fibers.assign(static_cast<size_t>(threads), Fiber{});
        g_block.warps.assign(static_cast<size_t>(threads / 32), Warp{});
        g_block.barrier = Barrier{0, 0, threads};
        for (auto& w : g_block.warps) w.barrier.live = 32;
        for (int i = 0; i < threads; ++i) {
          Fiber& f = g_block.fibers[static_cast<size_t>(i)];
          const unsigned tx = static_cast<unsigned>(i) % block.x, ty = (static_cast<unsigned>(i) / block.x) % block.y,
                         tz = static_cast<unsigned>(i) / (block.x * block.y);
          f.ctx = ThreadCtx{make_uint3(tx, ty, tz), make_uint3(bx, by, bz), block, grid};
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = g_stacks[static_cast<size_t>(i)];
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = &g_scheduler;
          makecontext(&f.context, fiber_entry, 0);
        }
        for (int remaining = threads; remaining > 0;) {
          bool progressed = false;
          for (int i = 0; i < threads; ++i) {
            Fiber& f = g_block.fibers[static_cast<size_t>(i)];
            if (f.done || (f.wait_generation != nullptr && *f.wait_generation == f.wait_value)) continue;
            f.wait_generation = nullptr;
            g_current = i;
            tsan_enter_fiber(i);  // carries the host's set-up (shared memory fill, indices), nothing else
            swapcontext(&g_scheduler, &f.context);
            progressed = true;
            if (f.done) --remaining;
          }
          if (!progressed) fail("deadlock: threads wait at a barrier the others never reach");
        }
        tsan_acquire(&g_block_done);  // blocks run one after another on reused statics and stacks
      }
  g_current = -1;
}

}  // namespace emu

// ------------------------------------------------------------- the CUDA runtime, as launchers see it
extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::g_sm_count; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::g_smem_optin; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t cudaFuncSetAttribute(const void* /*func*/, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize && value > emu::g_smem_optin) return cudaErrorInvalidValue;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

// ---------------------------------------------------------------------- entry points for ctypes
using mmgpt::DType;
// sizeof of each params struct, so that the ctypes mirrors can check their layout
int64_t mmgpt_emu_sizeof(int which) {
  switch (which) {
    case 0: return sizeof(mmgpt::NormFwdParams);
    case 1: return sizeof(mmgpt::NormBwdParams);
    case 2: return sizeof(mmgpt::SoftmaxFwdParams);
    case 3: return sizeof(mmgpt::SoftmaxBwdParams);
    case 4: return sizeof(mmgpt::CrossEntropyFwdParams);
    case 5: return sizeof(mmgpt::CrossEntropyBwdParams);
    case 6: return sizeof(mmgpt::FlashParams);
    default: return -1;
  }
}
void mmgpt_emu_set_device(int sm_count, int smem_optin) {
  emu::g_sm_count = sm_count;
  emu::g_smem_optin = smem_optin;
}
int mmgpt_emu_norm_fwd(const mmgpt::NormFwdParams* p, int dtype) { return mmgpt::norm_fwd(*p, DType(dtype), nullptr); }
int64_t mmgpt_emu_norm_bwd_workspace(const mmgpt::NormBwdParams* p, int dtype) {
  return mmgpt::norm_bwd_workspace_floats(*p, DType(dtype));
}
int mmgpt_emu_norm_bwd(const mmgpt::NormBwdParams* p, int dtype) { return mmgpt::norm_bwd(*p, DType(dtype), nullptr); }
int mmgpt_emu_softmax_fwd(const mmgpt::SoftmaxFwdParams* p, int dtype) {
  return mmgpt::softmax_fwd(*p, DType(dtype), nullptr);
}
int mmgpt_emu_softmax_bwd(const mmgpt::SoftmaxBwdParams* p, int dtype) {
  return mmgpt::softmax_bwd(*p, DType(dtype), nullptr);
}
int mmgpt_emu_cross_entropy_fwd(const mmgpt::CrossEntropyFwdParams* p, int dtype) {
  return mmgpt::cross_entropy_fwd(*p, DType(dtype), nullptr);
}
int mmgpt_emu_cross_entropy_bwd(const mmgpt::CrossEntropyBwdParams* p, int dtype) {
  return mmgpt::cross_entropy_bwd(*p, DType(dtype), nullptr);
}
int mmgpt_emu_flash_attn_fwd(const mmgpt::FlashParams* p, int dtype) {
  return mmgpt::flash_attn_fwd(*p, DType(dtype), nullptr);
}
int mmgpt_emu_flash_attn_bwd(const mmgpt::FlashParams* p, int dtype) {
  return mmgpt::flash_attn_bwd(*p, DType(dtype), nullptr);
}
}
