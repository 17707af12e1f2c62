// Small building blocks of the CPU kernels: aligned scratch buffers, a
// register-blocked micro-GEMM and a vectorisable exp.
//
// Everything here is plain C++ that GCC/Clang auto-vectorise (`#pragma omp
// simd`, fixed trip counts); the width follows the instruction set the file is
// compiled for (`-march=native` in the JIT build, see edt_kernels/_ext.py).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>

namespace edt_kernels {
namespace cpu {

// ---------------------------------------------------------------- vector width
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

// Elements of T in one SIMD register.
template <typename T>
constexpr int vec_width() {
  return kVecBytes / static_cast<int>(sizeof(T));
}

// Rows of the micro-kernel (register block = kMR x 2 vectors).
constexpr int kMR = 8;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ------------------------------------------------------------ scratch buffers
// 64-byte aligned, zero-initialised buffer of T (never shared between threads).
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(int64_t n) { reset(n); }
  void reset(int64_t n) {
    size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * sizeof(T), 64));
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    std::memset(p, 0, bytes);
    ptr_.reset(static_cast<T*>(p));
    n_ = n;
  }
  T* data() { return ptr_.get(); }
  const T* data() const { return ptr_.get(); }
  T& operator[](int64_t i) { return ptr_.get()[i]; }
  const T& operator[](int64_t i) const { return ptr_.get()[i]; }
  int64_t size() const { return n_; }
  void zero() { std::memset(ptr_.get(), 0, static_cast<size_t>(n_) * sizeof(T)); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr_;
  int64_t n_ = 0;
};

// ------------------------------------------------------------------ micro-GEMM
// C[mr, nr] (+)= op(A)[mr, K] * B[K, nr], row-major, unit stride along rows;
// op(A) = A (A[r, k] at A[r * lda + k]) or, with TRANS_A, A^T (A[k * lda + r]).
template <typename T, int mr, int nr, bool TRANS_A>
static inline __attribute__((always_inline)) void micro_kernel(
    int64_t K, const T* __restrict A, int64_t lda, const T* __restrict B, int64_t ldb,
    T* __restrict C, int64_t ldc, bool accumulate) {
  T c[mr][nr];
  for (int r = 0; r < mr; ++r) {
#pragma omp simd
    for (int j = 0; j < nr; ++j) c[r][j] = accumulate ? C[r * ldc + j] : T(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    for (int r = 0; r < mr; ++r) {
      const T a = TRANS_A ? A[k * lda + r] : A[r * lda + k];
#pragma omp simd
      for (int j = 0; j < nr; ++j) c[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < mr; ++r) {
#pragma omp simd
    for (int j = 0; j < nr; ++j) C[r * ldc + j] = c[r][j];
  }
}

// C[M, N] (+)= op(A)[M, K] * B[K, N] (row-major, leading dimensions; op(A) =
// A, or A^T with A stored [K, M] when TRANS_A).  Requires M % kMR == 0 and
// N % vec_width<T>() == 0: callers pad their tiles, and padded rows/columns
// compute values that are never read.
template <typename T, bool TRANS_A = false>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                 int64_t ldc, bool accumulate) {
  constexpr int VW = vec_width<T>();
  constexpr int NR = 2 * VW;
  auto a_rows = [&](int64_t i) { return TRANS_A ? A + i : A + i * lda; };
  int64_t j = 0;
  for (; j + NR <= N; j += NR)
    for (int64_t i = 0; i < M; i += kMR)
      micro_kernel<T, kMR, NR, TRANS_A>(K, a_rows(i), lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
  for (; j < N; j += VW)
    for (int64_t i = 0; i < M; i += kMR)
      micro_kernel<T, kMR, VW, TRANS_A>(K, a_rows(i), lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
}

template <typename T>
inline void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc, bool accumulate) {
  gemm<T, false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

template <typename T>
inline void gemm_tn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc, bool accumulate) {
  gemm<T, true>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// ------------------------------------------------------------------------- exp
// exp(x) for float without libm, so that loops over it vectorise.  Cody-Waite
// reduction x = n ln2 + f, |f| <= ln2/2, degree-7 Taylor polynomial (relative
// error < 1e-8 before rounding), 2^n built in the exponent bits.  exp(-inf) =
// 0, NaN propagates; the attention kernels only evaluate it for x <= ~0.
static inline __attribute__((always_inline)) float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float f = xc - n * 0.693145751953125f;  // ln2 split in two for exact n*ln2_hi
  f = f - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof(ti));
  const int32_t e = (ti - 0x4B400000 + 127) << 23;  // integer n from the shifted mantissa
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  const float r = p * scale;
  return x < -87.0f ? 0.0f : (x != x ? x : r);
}

template <typename T>
static inline __attribute__((always_inline)) T fast_exp(T x);
template <>
inline __attribute__((always_inline)) float fast_exp<float>(float x) { return exp_approx(x); }
template <>
inline __attribute__((always_inline)) double fast_exp<double>(double x) { return std::exp(x); }

}  // namespace cpu
}  // namespace edt_kernels
