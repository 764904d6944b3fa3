// Segmented multi-LoRA (SGMV) and segmented heads for fmplex's CUDA executor.
//
// Semantics (see kernels/cuda_lora.py for the Python wrappers and their shape contracts):
//   shrink:  v[i, j] = sum_k x[i, k] * A_s[j, k]            for j < r_s, and v[i, j] = 0 for
//            r_s <= j < r_max, for every row i of segment s (A_s is (r_s, in), row-major)
//   expand:  y[i, o] += scale_s * sum_{j < r_s} v[i, j] * B_s[o, j]   (B_s is (out, r_s))
//   head:    out[off_s + (i - start_s) * n_s + l] = act(sum_k x[i, k] * W_s[l, k] + b_s[l])
// Accumulation is in fp32 whatever the storage type (fp32, fp16, bf16). Pointers arrive as
// 64-bit integers (one per segment) so that segments may live in different allocations (each
// task's slot is its own allocation).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define RMAX 64          // largest rank the shrink keeps in registers
#define WARP 32

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = WARP / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// One warp per row. Lanes stride over the input dimension, each keeping r_s partial sums in
// registers, then the warp reduces each of them. grid = (segments, row blocks), block = 256.
template <typename T>
__device__ void shrink(const T* x, float* v, const int* starts, const int* ends,
                       const unsigned long long* a_ptrs, const int* ranks, int in_dim, int r_max) {
  const int s = blockIdx.x;
  const int warps = blockDim.x / WARP, lane = threadIdx.x % WARP;
  const int row = starts[s] + blockIdx.y * warps + threadIdx.x / WARP;
  if (row >= ends[s]) return;
  const T* a = reinterpret_cast<const T*>(a_ptrs[s]);
  const int r = ranks[s];
  float acc[RMAX];
#pragma unroll
  for (int j = 0; j < RMAX; ++j) acc[j] = 0.f;
  for (int k = lane; k < in_dim; k += WARP) {
    const float xk = to_f<T>(x[(long long)row * in_dim + k]);
#pragma unroll
    for (int j = 0; j < RMAX; ++j)
      if (j < r) acc[j] += xk * to_f<T>(a[(long long)j * in_dim + k]);
  }
#pragma unroll
  for (int j = 0; j < RMAX; ++j) {
    if (j >= r_max) break;
    const float sum = warp_sum(j < r ? acc[j] : 0.f);
    if (lane == 0) v[(long long)row * r_max + j] = sum;      // zeros past the segment's rank
  }
}

// Threads over output columns; a block takes `rows_per_block` rows of one segment, staging each
// row's v in shared memory. grid = (segments, row blocks, column blocks), block = 256.
template <typename T>
__device__ void expand(T* y, const float* v, const int* starts, const int* ends,
                       const unsigned long long* b_ptrs, const int* ranks, const float* scales,
                       int out_dim, int r_max, int rows_per_block) {
  __shared__ float vs[RMAX];
  const int s = blockIdx.x;
  const int o = blockIdx.z * blockDim.x + threadIdx.x;
  const T* b = reinterpret_cast<const T*>(b_ptrs[s]);
  const int r = ranks[s];
  const float scale = scales[s];
  const int first = starts[s] + blockIdx.y * rows_per_block;
  const int last = min(ends[s], first + rows_per_block);
  for (int row = first; row < last; ++row) {
    __syncthreads();
    if (threadIdx.x < r) vs[threadIdx.x] = v[(long long)row * r_max + threadIdx.x];
    __syncthreads();
    if (o < out_dim) {
      float acc = 0.f;
      for (int j = 0; j < r; ++j) acc += vs[j] * to_f<T>(b[(long long)o * r + j]);
      const long long at = (long long)row * out_dim + o;
      y[at] = from_f<T>(to_f<T>(y[at]) + scale * acc);
    }
  }
}

// One thread per (row, label) of one segment; act: 0 none, 1 relu, 2 gelu (erf), 3 tanh.
// grid = (segments, blocks over rows * labels), block = 256.
template <typename T>
__device__ void head(const T* x, T* out, const int* starts, const int* ends,
                     const unsigned long long* w_ptrs, const unsigned long long* b_ptrs,
                     const int* n_out, const long long* out_offsets, int in_dim, int act) {
  const int s = blockIdx.x;
  const int n = n_out[s];
  const long long idx = (long long)blockIdx.y * blockDim.x + threadIdx.x;
  const int rows = ends[s] - starts[s];
  if (idx >= (long long)rows * n) return;
  const int i = starts[s] + (int)(idx / n), l = (int)(idx % n);
  const T* w = reinterpret_cast<const T*>(w_ptrs[s]);
  const T* b = reinterpret_cast<const T*>(b_ptrs[s]);
  float acc = to_f<T>(b[l]);
  for (int k = 0; k < in_dim; ++k)
    acc += to_f<T>(x[(long long)i * in_dim + k]) * to_f<T>(w[(long long)l * in_dim + k]);
  if (act == 1) acc = fmaxf(acc, 0.f);
  else if (act == 2) acc = 0.5f * acc * (1.f + erff(acc * 0.70710678118654752f));
  else if (act == 3) acc = tanhf(acc);
  out[out_offsets[s] + idx] = from_f<T>(acc);
}

#define INSTANTIATE(SUFFIX, T)                                                                   \
  extern "C" __global__ void sgmv_shrink_##SUFFIX(                                               \
      unsigned long long x, unsigned long long v, const int* starts, const int* ends,            \
      const unsigned long long* a_ptrs, const int* ranks, int in_dim, int r_max) {               \
    shrink<T>(reinterpret_cast<const T*>(x), reinterpret_cast<float*>(v), starts, ends, a_ptrs, \
              ranks, in_dim, r_max);                                                             \
  }                                                                                              \
  extern "C" __global__ void sgmv_expand_##SUFFIX(                                               \
      unsigned long long y, unsigned long long v, const int* starts, const int* ends,            \
      const unsigned long long* b_ptrs, const int* ranks, const float* scales, int out_dim,      \
      int r_max, int rows_per_block) {                                                           \
    expand<T>(reinterpret_cast<T*>(y), reinterpret_cast<const float*>(v), starts, ends, b_ptrs, \
              ranks, scales, out_dim, r_max, rows_per_block);                                   \
  }                                                                                              \
  extern "C" __global__ void segmented_head_##SUFFIX(                                            \
      unsigned long long x, unsigned long long out, const int* starts, const int* ends,          \
      const unsigned long long* w_ptrs, const unsigned long long* b_ptrs, const int* n_out,      \
      const long long* out_offsets, int in_dim, int act) {                                       \
    head<T>(reinterpret_cast<const T*>(x), reinterpret_cast<T*>(out), starts, ends, w_ptrs,     \
            b_ptrs, n_out, out_offsets, in_dim, act);                                            \
  }

INSTANTIATE(f32, float)
INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)
