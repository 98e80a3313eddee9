// Host-side template dispatch: a runtime dtype / vectors-per-thread choice turned into a
// compile-time one, instantiating only the combinations a kernel's register budget allows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "common.cuh"

namespace mmgpt {

template <typename T> struct Tag { using type = T; };

// f(Tag<T>{}) for the storage type of dtype; false for a dtype the kernels do not take.
template <typename F> bool with_float_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(Tag<float>{}); return true;
    case DType::kFloat16: f(Tag<__half>{}); return true;
    case DType::kBFloat16: f(Tag<__nv_bfloat16>{}); return true;
    default: return false;
  }
}

template <typename T> struct IsHalfLike : std::bool_constant<std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>> {};

// f(std::integral_constant<int, NV>{}) for nv in {1, 2, 4, 8} with nv * VEC <= MAX_ELEMS.
template <typename T, int MAX_ELEMS, typename F> bool with_nv(int nv, F&& f) {
  constexpr int VEC = Vec<T>::kWidth;
  switch (nv) {
    case 1:
      if constexpr (1 * VEC <= MAX_ELEMS) { f(std::integral_constant<int, 1>{}); return true; }
      break;
    case 2:
      if constexpr (2 * VEC <= MAX_ELEMS) { f(std::integral_constant<int, 2>{}); return true; }
      break;
    case 4:
      if constexpr (4 * VEC <= MAX_ELEMS) { f(std::integral_constant<int, 4>{}); return true; }
      break;
    case 8:
      if constexpr (8 * VEC <= MAX_ELEMS) { f(std::integral_constant<int, 8>{}); return true; }
      break;
    default:
      break;
  }
  return false;
}

}  // namespace mmgpt
