// C entry points of the csrc launchers (launchers.h) for ctypes (benchmarks/cuda_emulator.py): the
// emulated extension calls these where the pybind module (bindings.cpp) calls the launchers.
#include "../launchers.h"

extern "C" {
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
