// The emulated devices (one architecture's limits each), the CUDA runtime calls the launchers make,
// the error state, and the C entry points that choose the device and read the errors (for ctypes).
#include <algorithm>
#include <cstdarg>
#include <map>
#include <string>
#include <utility>

#include "internal.h"

namespace emu {
namespace {

// Shared memory a block may opt in to, per architecture: per-SM shared memory less the 1 KB the
// driver reserves per block (CUDA C++ Programming Guide, "Technical Specifications per Compute
// Capability"; CCCL's arch_traits). Every other limit the emulator checks is the same on all of them.
struct Arch {
  int cc;
  int smem_optin;
};
constexpr Arch kArchs[] = {{80, 163 * 1024}, {86, 99 * 1024}, {89, 99 * 1024}, {90, 227 * 1024}, {120, 99 * 1024}};

std::vector<Device> g_devices;
int g_device = -1;
std::map<std::pair<const void*, int>, int> g_kernel_smem;  // (kernel, device) -> opted-in dynamic shared memory
std::map<std::string, int64_t> g_calls;

cudaError_t g_last = cudaSuccess;      // what cudaGetLastError returns (and clears)
cudaError_t g_sticky = cudaSuccess;    // a kernel fault: every later call fails until mmgpt_emu_reset()
cudaError_t g_reported = cudaSuccess;  // the first error since mmgpt_emu_reset(), for the Python side
std::string g_message;

const Arch* find_arch(int cc) {
  for (const Arch& a : kArchs)
    if (a.cc == cc) return &a;
  return nullptr;
}

int select_device(int cc, int sm_count, int smem_optin) {
  for (size_t i = 0; i < g_devices.size(); ++i) {
    const Device& d = g_devices[i];
    if (d.cc == cc && d.sm_count == sm_count && d.smem_optin == smem_optin) return g_device = static_cast<int>(i);
  }
  g_devices.push_back({cc, sm_count, smem_optin});
  return g_device = static_cast<int>(g_devices.size() - 1);
}

}  // namespace

const Device& current_device() {
  if (g_device < 0) select_device(90, 4, find_arch(90)->smem_optin);
  return g_devices[static_cast<size_t>(g_device)];
}

int current_device_index() {
  current_device();
  return g_device;
}

int kernel_smem_limit(const void* kernel, bool& opted_in) {
  const auto it = g_kernel_smem.find({kernel, current_device_index()});
  opted_in = it != g_kernel_smem.end();
  return opted_in ? it->second : std::min(kDefaultSmem, current_device().smem_optin);
}

void count_call(const char* what) { ++g_calls[what]; }

void set_error(cudaError_t code, bool sticky, const std::string& message) {
  g_last = code;
  if (sticky && g_sticky == cudaSuccess) g_sticky = code;
  if (g_reported == cudaSuccess) {
    g_reported = code;
    g_message = message;
  }
}

cudaError_t sticky_error() { return g_sticky; }
const std::string& error_message() { return g_message; }

}  // namespace emu

// ------------------------------------------------------------- the CUDA runtime, as launchers see it
extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = emu::current_device_index();
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  emu::count_call("cudaDeviceGetAttribute");
  if (device < 0 || static_cast<size_t>(device) >= emu::g_devices.size()) return cudaErrorInvalidDevice;
  const emu::Device& d = emu::g_devices[static_cast<size_t>(device)];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = std::min(emu::kDefaultSmem, d.smem_optin); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = d.cc / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = d.cc % 10; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  emu::count_call("cudaFuncSetAttribute");
  if (emu::g_sticky != cudaSuccess) return emu::g_sticky;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  const emu::Device& d = emu::current_device();
  if (value < 0 || value > d.smem_optin) {
    emu::set_error(cudaErrorInvalidValue, false,
                   emu::format("sm_%d: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d B): above this device's "
                               "opt-in maximum of %d B per block", d.cc, value, d.smem_optin));
    return cudaErrorInvalidValue;
  }
  emu::g_kernel_smem[{func, emu::current_device_index()}] = value;
  return cudaSuccess;
}

// launches run to completion before they return: only a kernel fault is left to report
cudaError_t cudaDeviceSynchronize() { return emu::g_sticky; }

cudaError_t cudaGetLastError() {
  const cudaError_t err = emu::g_sticky != cudaSuccess ? emu::g_sticky : emu::g_last;
  emu::g_last = cudaSuccess;
  return err;
}

cudaError_t cudaPeekAtLastError() { return emu::g_sticky != cudaSuccess ? emu::g_sticky : emu::g_last; }

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "emulated CUDA error";
  }
}

// ----------------------------------------------------------------- devices and errors for ctypes
// The known architectures, as compute capabilities (10 * major + minor); 0 past the end.
int mmgpt_emu_arch(int i) {
  return i >= 0 && i < static_cast<int>(std::size(emu::kArchs)) ? emu::kArchs[i].cc : 0;
}

// Makes the device of architecture `cc` with `sm_count` SMs current (smem_optin <= 0: the
// architecture's opt-in shared memory; else that, e.g. a small one to force a launch plan). The same
// properties give the same device, so what the launchers cached per device stays true. Returns the
// device index; -1 for an unknown architecture, -2 for a bad SM count or shared memory size.
int mmgpt_emu_use_device(int cc, int sm_count, int smem_optin) {
  const emu::Arch* arch = emu::find_arch(cc);
  if (arch == nullptr) return -1;
  if (smem_optin <= 0) smem_optin = arch->smem_optin;
  if (sm_count <= 0 || smem_optin > arch->smem_optin) return -2;
  return emu::select_device(cc, sm_count, smem_optin);
}

// The first error since the last reset (0: none) and its message.
int mmgpt_emu_error_code() { return static_cast<int>(emu::g_reported); }
const char* mmgpt_emu_error_message() { return emu::g_message.c_str(); }

// Clears every error, a kernel fault's included; the devices keep their kernels' attributes.
void mmgpt_emu_reset() {
  emu::g_last = emu::g_sticky = emu::g_reported = cudaSuccess;
  emu::g_message.clear();
}

// How often the launchers called `what` ("cudaDeviceGetAttribute", "cudaFuncSetAttribute", "launch").
int64_t mmgpt_emu_calls(const char* what) {
  const auto it = emu::g_calls.find(what);
  return it == emu::g_calls.end() ? 0 : it->second;
}
}
