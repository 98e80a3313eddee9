// The warp collectives with their PTX semantics (shfl.sync.bfly, ldmatrix, mma.sync) and the checks
// the hardware makes of them and of cp.async: every lane at the same instruction, 16-byte aligned
// addresses in the memory space the instruction reads or writes.
#include "internal.h"

#ifdef MMGPT_EMU_TSAN
extern "C" void __tsan_read_range(void* addr, unsigned long size);
#endif

namespace emu {
namespace {

#ifdef MMGPT_EMU_TSAN
void tsan_read(const void* addr, size_t bytes) { __tsan_read_range(const_cast<void*>(addr), bytes); }
#else
inline void tsan_read(const void*, size_t) {}
#endif

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

// A 16-byte access of `what` at p must be 16-byte aligned and in `want`.
void check_16(const char* what, const void* p, Space want) {
  const auto offset = reinterpret_cast<uintptr_t>(p) % 16;
  if (offset != 0) fault(cudaErrorMisalignedAddress, "%s at %p: %zu bytes past a 16-byte boundary; the address "
                         "must be 16-byte aligned", what, p, static_cast<size_t>(offset));
  const Space got = space_of(p, 16);
  if (got != want) fault(cudaErrorIllegalAddress, "%s at %p: the address is in %s, expected %s", what, p,
                         space_name(got), space_name(want));
}

}  // namespace

// shfl.sync.bfly with the full-warp mask: lane t receives lane (t ^ lane_mask)'s value; a source lane
// outside the warp gives the lane its own value.
float shfl_xor(unsigned mask, float v, int lane_mask) {
  const void* site = __builtin_return_address(0);
  if (mask != 0xffffffffu)
    fault(cudaErrorNotSupported, "__shfl_xor_sync with mask 0x%08x: the emulator runs full-warp shuffles "
          "(0xffffffff) only", mask);
  Warp& w = current_warp();
  const int lane = current_lane();
  w.f[lane] = v;
  warp_arrive(w, Op::kShfl, site);
  const int src = lane ^ lane_mask;
  const float r = src >= 0 && src < 32 ? w.f[src] : v;
  warp_arrive(w, Op::kShfl, site);  // nobody overwrites f before every lane has read it
  return r;
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8i..8i+7 address the rows of matrix i;
// lane t receives row t/4, columns 2(t%4) and 2(t%4)+1 of matrix i (transposed: column t/4,
// rows 2(t%4) and 2(t%4)+1) in register i, the lower column (row) in the low half.
void ldmatrix_x4(uint32_t (&r)[4], const void* row_address, bool trans) {
  const void* site = __builtin_return_address(0);
  check_16("ldmatrix: this lane's row address", row_address, Space::kShared);
  Warp& w = current_warp();
  const int t = current_lane();
  w.address[t] = row_address;
  warp_arrive(w, Op::kLdmatrix, site);
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
  warp_arrive(w, Op::kLdmatrix, site);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: fragments as in the PTX ISA (see
// flash_attn_common.cuh); each lane computes its own four accumulators from every lane's A and B.
void mma_m16n8k16_f32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  const void* site = __builtin_return_address(0);
  Warp& w = current_warp();
  const int t = current_lane();
  for (int i = 0; i < 4; ++i) w.a[t][i] = a[i];
  w.b[t][0] = b0;
  w.b[t][1] = b1;
  warp_arrive(w, Op::kMma, site);
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
  warp_arrive(w, Op::kMma, site);
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: checked, and its global read counted
void check_cp_async(const void* dst, const void* src, int src_bytes) {
  if (src_bytes < 0 || src_bytes > 16)
    fault(cudaErrorInvalidValue, "cp.async: src-size %d, expected 0 to 16 (the copy size)", src_bytes);
  check_16("cp.async: the destination", dst, Space::kShared);
  check_16("cp.async: the source", src, Space::kGlobal);
  // read at issue; the rest of the 16 bytes is zero-filled
  count_access(__builtin_return_address(0), src, static_cast<size_t>(src_bytes), false);
}

}  // namespace emu
