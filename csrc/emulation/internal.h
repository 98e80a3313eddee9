// The emulator runtime's own state, shared by runtime.cpp (fibers, blocks, launches), warp.cpp
// (warp collectives, cp.async), device.cpp (devices, the CUDA runtime API, errors) and traffic.cpp
// (global-memory bytes per launch, for the IO audit).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "emu.h"

namespace emu {

// ------------------------------------------------------------------------------------ errors
// Stops the running kernel (from a fiber) or the launch (from the host side) with `code`; a fault
// inside a kernel sticks until mmgpt_emu_reset(), as a GPU context's does. printf-style message.
[[noreturn]] void fault(cudaError_t code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void set_error(cudaError_t code, bool sticky, const std::string& message);
cudaError_t sticky_error();
const std::string& error_message();
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// ----------------------------------------------------------------------------------- devices
struct Device {
  int cc;              // compute capability, 10 * major + minor
  int sm_count;
  int smem_optin;      // bytes a block may opt in to
};
const Device& current_device();
int current_device_index();
constexpr int kDefaultSmem = 48 * 1024;  // dynamic shared memory a kernel gets without opting in
// The dynamic shared memory `kernel` may launch with on the current device: 48 KB (or the device's
// opt-in maximum, if less), or what cudaFuncSetAttribute opted it in to (then opted_in = true).
int kernel_smem_limit(const void* kernel, bool& opted_in);
void count_call(const char* what);

// ------------------------------------------------------------------------------ blocks, warps
enum class Op { kNone, kShfl, kLdmatrix, kMma };
const char* op_name(Op op);

struct Barrier {
  unsigned generation = 0;
  int arrived = 0;
  char phase_sync[2] = {0, 0};  // TSan sync objects, alternating by generation
  const void* sync() const { return &phase_sync[generation & 1]; }
};

struct Warp {
  Barrier barrier;
  int live = 32;                  // lanes that have not exited
  Op op = Op::kNone;              // the collective this generation's lanes are at
  const void* site = nullptr;     // and its instruction
  uint32_t arrived_mask = 0;
  float f[32];
  const void* address[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
};

// Enters warp collective `op` at instruction `site` (both phases of the exchange call it): every lane of
// the warp must be there, at the same instruction; returns when all 32 have arrived.
void warp_arrive(Warp& w, Op op, const void* site);

Warp& current_warp();
int current_lane();
int current_thread();  // linear index in the block
std::string where();   // "block (x, y, z) thread t (warp w lane l), kernel launched at ..."

// ---------------------------------------------------------------------------- memory spaces
enum class Space { kShared, kSharedOverrun, kLocal, kGlobal };
const char* space_name(Space s);
// Where [p, p + bytes) lies as the emulated kernel sees it: shared (the dynamic shared memory or a
// `__shared__` variable, which the emulator keeps among the library's static data; overrun: starts in
// the dynamic shared memory, ends past it), local (a thread's stack) or global (anything else: tensors).
Space space_of(const void* p, size_t bytes);

// ----------------------------------------------------------------------------------- traffic
// A launch that runs (checks passed) opens a traffic record, if recording; its blocks' accesses to
// the watched ranges count into it (count_access: from the instrumented kernels and from cp.async;
// site: the instruction, e.g. the caller's return address).
void traffic_launch_begin(const void* kernel, const LaunchSite& site, dim3 grid, dim3 block, size_t smem);
void traffic_block_begin();
void traffic_launch_end();
void count_access(const void* site, const void* p, size_t bytes, bool write);

}  // namespace emu
