// Small building blocks of the CPU kernels: aligned scratch buffers, a
// row-major GEMM on tiles (the BLAS that libtorch links, else a register-blocked
// micro-GEMM) and a vectorisable exp.
//
// Everything here is plain C++ that GCC/Clang auto-vectorise (`#pragma omp
// simd`, fixed trip counts); the width follows the instruction set the file is
// compiled for (`-march=native` in the JIT build, see edt_kernels/_ext.py).
#pragma once

// at::vec::Vectorized picks its instruction set from CPU_CAPABILITY_* macros
// that PyTorch's own build defines per kernel file; an extension gets the
// scalar fallback unless it defines them.  Defined here from what the compiler
// targets (-march=native in the JIT build), so this header must come before
// any ATen header that includes <ATen/cpu/vec/vec.h>.
#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

// The Fortran BLAS GEMMs.  Declared weak: libtorch_cpu exports them when it is
// built with MKL or OpenBLAS (the usual x86/arm wheels), and the extension then
// uses them; where it does not, the pointers are null and gemm_rm below runs
// its own micro-kernel.  LP64 interface (32-bit integers), as libtorch uses.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

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

// ------------------------------------------------------------- row-major GEMM
// Whether gemm_rm calls the BLAS of libtorch (true) or the micro-kernel;
// EDT_KERNELS_CPU_BLAS=0 in the environment (read once) forces the latter.
inline bool have_blas_gemm() {
  static const bool allowed = [] {
    const char* e = std::getenv("EDT_KERNELS_CPU_BLAS");
    return !(e != nullptr && e[0] == '0' && e[1] == '\0');
  }();
  return allowed && sgemm_ != nullptr && dgemm_ != nullptr;
}

// C[M, N] = alpha op(A) op(B) + beta C, all row-major with unit stride along
// rows: op(A)[i, k] = TA ? A[k * lda + i] : A[i * lda + k], op(B)[k, n] = TB ?
// B[n * ldb + k] : B[k * ldb + n].  No padding required.  A row-major C is a
// column-major C^T = op(B)^T op(A)^T, hence the swapped BLAS arguments.
template <typename T>
inline void gemm_rm(bool TA, bool TB, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
                    const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  if (have_blas_gemm()) {
    const char ta = TB ? 'T' : 'N', tb = TA ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(std::max<int64_t>(ldb, 1)), lb = static_cast<int>(std::max<int64_t>(lda, 1)),
              lc = static_cast<int>(std::max<int64_t>(ldc, 1));
    if constexpr (std::is_same_v<T, float>) sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    else dgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  // Fallback: pack op(A) as [Mp, K] and op(B) as [K, Np] (padded to the
  // micro-kernel's blocks), multiply, then C = alpha * tile + beta * C.
  constexpr int VW = vec_width<T>();
  const int64_t Mp = round_up(M, kMR), Np = round_up(N, VW);
  thread_local std::vector<T> pa, pb, pc;
  pa.assign(static_cast<size_t>(Mp * K), T(0));
  pb.assign(static_cast<size_t>(K * Np), T(0));
  pc.resize(static_cast<size_t>(Mp * Np));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) pa[i * K + k] = TA ? A[k * lda + i] : A[i * lda + k];
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j) pb[k * Np + j] = TB ? B[j * ldb + k] : B[k * ldb + j];
  gemm<T, false>(Mp, Np, K, pa.data(), K, pb.data(), Np, pc.data(), Np, false);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j)
      C[i * ldc + j] = alpha * pc[i * Np + j] + (beta == T(0) ? T(0) : beta * C[i * ldc + j]);
}

// ------------------------------------------------- packed-B micro-GEMM (float)
// C[M, N] (+)= alpha A[M, K] B[K, N] with A row-major (read in place, one
// element broadcast per row and k) and B packed once into column panels:
// panel p holds columns [16 p, 16 p + w_p) as [ktot][w_p] (w_p = 16, or 8 for
// a last panel of at most 8 columns; columns past N zero), panel p starting
// at 16 p ktot.  The register block is 6 rows x 16 columns, or 12 rows x 8
// on an 8-wide panel (12 of the 16 AVX2 registers as accumulators).  Columns
// of C are written up to the panel width: C needs round_up(N, 8) (<= 16 p +
// w_p) columns of room.
// Only with 8-float vectors (AVX2); elsewhere the callers use gemm_rm.
constexpr bool kPackedGemm = at::vec::Vectorized<float>::size() == 8;
constexpr int kPanel = 16;
constexpr int kPackMR = 6;

inline int64_t panel_width(int64_t n, int64_t p) { return n - p * kPanel > 8 ? kPanel : 8; }

// Floats of a packed B of N columns and ktot rows.
inline int64_t packed_size(int64_t N, int64_t ktot) { return round_up(N, kPanel) * ktot; }

#if defined(__AVX2__)
// o[c * ld + r] = x_r[c] for r, c < 8: an 8 x 8 transpose in registers.
static inline __attribute__((always_inline)) void transpose8_store(const float* const* x, float* o, int64_t ld) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(x[i]);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(o + i * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(o + (i + 4) * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// Pack B[k, n] = src[n * sn + k * sk] (B = src^T, e.g. keys [n] x head dim
// [k]) for k < K, n < N, panels as panel_width.  (Panels before the last are
// 16 wide, so columns [16 q, N) of a packed B are themselves a packed B.)
template <typename S>
inline void pack_b_transposed(const S* src, int64_t sn, int64_t sk, int64_t N, int64_t K, float* dst) {
  for (int64_t p = 0; p * kPanel < N; ++p) {
    const int64_t w = panel_width(N, p), nn = std::min<int64_t>(w, N - p * kPanel);
    float* d = dst + p * kPanel * K;
    const S* r = src + p * kPanel * sn;
    int64_t k0 = 0;
#if defined(__AVX2__)
    if constexpr (std::is_same_v<S, float>) {
      // float rows with unit stride along k: 8 x 8 blocks transposed in registers
      if (sk == 1 && nn == w) {
        for (; k0 + 8 <= K; k0 += 8)
          for (int64_t c0 = 0; c0 < w; c0 += 8) {
            const float* x[8];
            for (int i = 0; i < 8; ++i) x[i] = r + (c0 + i) * sn + k0;
            transpose8_store(x, d + k0 * w + c0, w);
          }
      }
    }
#endif
    // k outer: contiguous stores, the nn source rows read in step
    for (int64_t k = k0; k < K; ++k) {
      float* o = d + k * w;
      int64_t c = 0;
      for (; c < nn; ++c) o[c] = static_cast<float>(r[c * sn + k * sk]);
      for (; c < w; ++c) o[c] = 0.0f;
    }
  }
}

// Pack B[k, n] = src[k * sk + n * sn] (e.g. values: keys [k] x head dim [n])
// for k < K, n < N, panels as panel_width.
template <typename S>
inline void pack_b(const S* src, int64_t sk, int64_t sn, int64_t K, int64_t N, float* dst) {
  for (int64_t p = 0; p * kPanel < N; ++p) {
    const int64_t w = panel_width(N, p), n0 = p * kPanel, nn = std::min<int64_t>(w, N - n0);
    float* d = dst + n0 * K;
    for (int64_t k = 0; k < K; ++k) {
      const S* r = src + k * sk + n0 * sn;
      float* o = d + k * w;
      int64_t c = 0;
      if (sn == 1) {
#if defined(__AVX2__)
        if constexpr (std::is_same_v<S, float>) {
          if (nn == w) {  // w = 8 or 16
            _mm256_storeu_ps(o, _mm256_loadu_ps(r));
            if (w == kPanel) _mm256_storeu_ps(o + 8, _mm256_loadu_ps(r + 8));
            continue;
          }
        }
#endif
        for (; c < nn; ++c) o[c] = static_cast<float>(r[c]);
      } else {
        for (; c < nn; ++c) o[c] = static_cast<float>(r[c * sn]);
      }
      for (; c < w; ++c) o[c] = 0.0f;
    }
  }
}

template <int MR, int W, bool TA>
static inline __attribute__((always_inline)) void packed_kernel(int64_t K, const float* __restrict A, int64_t lda,
                                                                const float* __restrict Bp, float* __restrict C,
                                                                int64_t ldc, float alpha, bool accumulate) {
  using V = at::vec::Vectorized<float>;
  constexpr int NV = W / 8;
  V c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = V(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = V::loadu(Bp + k * W + v * 8);
    for (int r = 0; r < MR; ++r) {
      const V a(TA ? A[k * lda + r] : A[r * lda + k]);
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(a, b[v], c[r][v]);
    }
  }
  const V va(alpha);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* o = C + r * ldc + v * 8;
      V x = c[r][v] * va;
      if (accumulate) x = x + V::loadu(o);
      x.store(o);
    }
}

template <int W, bool TA>
inline void packed_rows(int64_t mr, int64_t K, const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc,
                        float alpha, bool accumulate) {
  switch (mr) {
    case 6: packed_kernel<6, W, TA>(K, A, lda, Bp, C, ldc, alpha, accumulate); break;
    case 5: packed_kernel<5, W, TA>(K, A, lda, Bp, C, ldc, alpha, accumulate); break;
    case 4: packed_kernel<4, W, TA>(K, A, lda, Bp, C, ldc, alpha, accumulate); break;
    case 3: packed_kernel<3, W, TA>(K, A, lda, Bp, C, ldc, alpha, accumulate); break;
    case 2: packed_kernel<2, W, TA>(K, A, lda, Bp, C, ldc, alpha, accumulate); break;
    default: packed_kernel<1, W, TA>(K, A, lda, Bp, C, ldc, alpha, accumulate); break;
  }
}

// C (+)= alpha op(A) B over rows k0 .. k0 + K of a packed B with ktot rows;
// op(A)[i, k] = A[i * lda + k], or A[k * lda + i] with TA.
template <bool TA = false>
inline void gemm_packed(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* Bp,
                        int64_t ktot, int64_t k0, float* C, int64_t ldc, bool accumulate) {
  if constexpr (kPackedGemm) {
    for (int64_t p = 0; p * kPanel < N; ++p) {
      const int64_t w = panel_width(N, p);
      const float* b = Bp + p * kPanel * ktot + k0 * w;
      float* c = C + p * kPanel;
      auto a_at = [&](int64_t i) { return TA ? A + i : A + i * lda; };
      int64_t i = 0;
      if (w != kPanel) {
        // An 8-wide last panel: 12-row blocks keep 12 accumulators (as the
        // 6 x 16 block does) so that the FMAs do not wait on each other.
        for (; i + 2 * kPackMR <= M; i += 2 * kPackMR)
          packed_kernel<2 * kPackMR, 8, TA>(K, a_at(i), lda, b, c + i * ldc, ldc, alpha, accumulate);
      }
      for (; i < M; i += kPackMR) {
        const int64_t mr = std::min<int64_t>(kPackMR, M - i);
        if (w == kPanel) packed_rows<kPanel, TA>(mr, K, a_at(i), lda, b, c + i * ldc, ldc, alpha, accumulate);
        else packed_rows<8, TA>(mr, K, a_at(i), lda, b, c + i * ldc, ldc, alpha, accumulate);
      }
    }
  }
}

// Whether the float kernels use gemm_packed (true unless
// EDT_KERNELS_CPU_PACKED=0 in the environment, read once, or the vectors are
// not 8 floats wide).
inline bool use_packed_gemm() {
  static const bool allowed = [] {
    const char* e = std::getenv("EDT_KERNELS_CPU_PACKED");
    return !(e != nullptr && e[0] == '0' && e[1] == '\0');
  }();
  return kPackedGemm && allowed;
}

// ---------------------------------------------------------------- exp2 (base 2)
// The attention kernels work in base 2: scores carry a factor log2(e) (folded
// into the GEMM scale, the tables and the bias), so that softmax needs 2^x.

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;


// 2^x of float vectors whose lanes are finite or -inf (never NaN or +inf):
// x = n + f with n = round(x) (the 1.5 * 2^23 shifter), 2^f by the degree-6
// polynomial of Cephes' exp2f (S. L. Moshier; relative error 1.7e-7 on
// |f| <= 0.5), 2^n written into the exponent bits.  x is clamped to
// [-127, 127]; x <= -126.5 (and -inf) gives exactly 0 (denormal results are
// flushed).  13 vector operations against ~20 for Vectorized::exp_u20.
inline at::vec::Vectorized<float> vexp2_finite(at::vec::Vectorized<float> xv) {
  using V = at::vec::Vectorized<float>;
#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2)
  return xv.exp2();
#else
  {
    const V x = at::vec::minimum(at::vec::maximum(xv, V(-127.0f)), V(127.0f));
    const V shifter(12582912.0f);
    const V t = x + shifter;  // round(x) in the low mantissa bits
    const V f = x - (t - shifter);
    V p = at::vec::fmadd(V(1.535336188319500e-4f), f, V(1.339887440266574e-3f));
    p = at::vec::fmadd(p, f, V(9.618437357674640e-3f));
    p = at::vec::fmadd(p, f, V(5.550332471162809e-2f));
    p = at::vec::fmadd(p, f, V(2.402264791363012e-1f));
    p = at::vec::fmadd(p, f, V(6.931472028550421e-1f));
    p = at::vec::fmadd(p, f, V(1.0f));
    // t's bits are 0x4B400000 + n: 2^n = (n + 127) << 23 (0 for n = -127).
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i e = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127 - 0x4B400000)), 23);
    return p * V(_mm512_castsi512_ps(e));
#else
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127 - 0x4B400000)), 23);
    return p * V(_mm256_castsi256_ps(e));
#endif
  }
#endif
}

// 2^x: with FINITE (the caller guarantees no NaN or +inf lane) the lean
// float version above, otherwise Sleef's exp2 (1 ulp; NaN and infinities as
// IEEE says).  double always takes Sleef's.
template <typename T, bool FINITE>
inline at::vec::Vectorized<T> vexp2(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float> && FINITE) {
    return vexp2_finite(x);
  } else {
    return x.exp2();
  }
}

// ------------------------------------------------------------ vectorised rows
// (at::vec::Vectorized: 8 floats with AVX2, 16 with AVX-512.)

// max_j s[j] over j < n (NaN if any s[j] is NaN); -inf for n = 0.
template <typename T>
inline T row_max(const T* s, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  if (n <= 0) return -std::numeric_limits<T>::infinity();
  return at::vec::reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, n);
}

// Calls f(std::true_type{}) when finite, else f(std::false_type{}): the row
// functions below take `finite` (the row's max or LSE is finite, so no lane
// of x - m is NaN or +inf) and pick the lean 2^x for it.
template <typename F>
inline decltype(auto) with_finite(bool finite, F&& f) {
  if (finite) return f(std::true_type{});
  return f(std::false_type{});
}

// s[j] = 2^(s[j] - m) * (w ? w[j] : 1) for j < n; returns sum_j 2^(s[j] - m).
template <typename T>
inline T exp_row(T* s, const T* w, int64_t n, T m, bool finite) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t VW = Vec::size();
  return with_finite(finite, [&](auto fin) {
    constexpr bool F = decltype(fin)::value;
    const Vec vm(m);
    Vec vsum(T(0));
    int64_t j = 0;
    for (; j + VW <= n; j += VW) {
      Vec p = vexp2<T, F>(Vec::loadu(s + j) - vm);
      vsum = vsum + p;
      if (w) p = p * Vec::loadu(w + j);
      p.store(s + j);
    }
    if (j < n) {
      const int64_t r = n - j;
      Vec p = vexp2<T, F>(Vec::loadu(s + j, r) - vm);
      vsum = Vec::set(vsum, vsum + p, r);
      if (w) p = p * Vec::loadu(w + j, r);
      p.store(s + j, r);
    }
    return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, vsum);
  });
}

// Backward row: p = 2^(s[j] - lse); s[j] = p w[j]; dp[j] = p (dp[j] w[j] - delta)
// (w = 1 when null), for j < n.
template <typename T>
inline void softmax_grad_row(T* s, T* dp, const T* w, int64_t n, T lse, T delta, bool finite) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t VW = Vec::size();
  with_finite(finite, [&](auto fin) {
    constexpr bool F = decltype(fin)::value;
    const Vec vl(lse), vd(delta);
    for (int64_t j = 0; j < n; j += VW) {
      const int64_t r = std::min<int64_t>(VW, n - j);
      const Vec p = vexp2<T, F>(Vec::loadu(s + j, r) - vl);
      Vec g = Vec::loadu(dp + j, r);
      Vec pw = p;
      if (w) {
        const Vec wv = Vec::loadu(w + j, r);
        pw = p * wv;
        g = g * wv;
      }
      const Vec ds = p * (g - vd);
      if (r == VW) {
        pw.store(s + j);
        ds.store(dp + j);
      } else {
        pw.store(s + j, r);
        ds.store(dp + j, r);
      }
    }
  });
}

// ------------------------------------------------- per-offset tables on a row
// The attention kernels read a per-offset table t (indexed by the grid offset
// of a query and a key) along a row of keys as t[base + uk[j]], with uk the
// keys' grid codes and base fixed by the query (the tables are stored
// reversed so that the index grows with uk).  Keys whose codes go up by one
// (consecutive columns of a grid row) read consecutive entries: a run.
// run_end[j] is the (exclusive) end of the run that key j belongs to; with
// runs = true the row is read run by run with contiguous vector loads,
// otherwise element by element (a vector gather).

// s[j] += t[base + uk[j]] for j < n, element by element.
template <typename T>
inline void gather_add(T* s, const T* t, int32_t base, const int32_t* uk, int64_t n) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float> &&
                at::vec::Vectorized<float>::size() == at::vec::Vectorized<int32_t>::size()) {
    using VF = at::vec::Vectorized<float>;
    using VI = at::vec::Vectorized<int32_t>;
    const VI vb(base);
    for (; j + VF::size() <= n; j += VF::size()) {
      const VF g = at::vec::gather<sizeof(float)>(t, vb + VI::loadu(uk + j));
      (VF::loadu(s + j) + g).store(s + j);
    }
  }
  for (; j < n; ++j) s[j] += t[base + uk[j]];
}

// w[j] = t[base + uk[j]] for j < n, element by element.
template <typename T>
inline void gather_set(T* w, const T* t, int32_t base, const int32_t* uk, int64_t n) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float> &&
                at::vec::Vectorized<float>::size() == at::vec::Vectorized<int32_t>::size()) {
    using VF = at::vec::Vectorized<float>;
    using VI = at::vec::Vectorized<int32_t>;
    const VI vb(base);
    for (; j + VF::size() <= n; j += VF::size())
      at::vec::gather<sizeof(float)>(t, vb + VI::loadu(uk + j)).store(w + j);
  }
  for (; j < n; ++j) w[j] = t[base + uk[j]];
}

// Calls f(j, src, len) for each run [j, j + len) of keys j0 + j, j < n, with
// src = t + base + uk[j] (the run's len consecutive table entries).
template <typename T, typename F>
inline void for_each_run(const T* t, int32_t base, const int32_t* uk, const int32_t* run_end, int64_t j0,
                         int64_t n, F&& f) {
  for (int64_t j = 0; j < n;) {
    const int64_t e = std::min<int64_t>(static_cast<int64_t>(run_end[j]) - j0, n);
    f(j, t + base + uk[j], e - j);
    j = e;
  }
}

// s[j] += t[base + uk[j]] for j < n (uk = codes of keys j0.., run_end of the same keys).
template <typename T>
inline void table_add(T* s, const T* t, int32_t base, const int32_t* uk, const int32_t* run_end, int64_t j0,
                      int64_t n, bool runs) {
  if (!runs) return gather_add<T>(s, t, base, uk, n);
  for_each_run(t, base, uk, run_end, j0, n, [&](int64_t j, const T* src, int64_t len) {
    T* d = s + j;
#pragma omp simd
    for (int64_t x = 0; x < len; ++x) d[x] += src[x];
  });
}

// w[j] = t[base + uk[j]] for j < n.
template <typename T>
inline void table_set(T* w, const T* t, int32_t base, const int32_t* uk, const int32_t* run_end, int64_t j0,
                      int64_t n, bool runs) {
  if (!runs) return gather_set<T>(w, t, base, uk, n);
  for_each_run(t, base, uk, run_end, j0, n,
               [&](int64_t j, const T* src, int64_t len) { std::memcpy(w + j, src, len * sizeof(T)); });
}

// dt[base + uk[j]] += g[j] for j < n (the transpose of table_add: the table
// gradient; several j may hit one entry only across runs, never within one).
template <typename T>
inline void table_scatter(double* dt, const T* g, int32_t base, const int32_t* uk, const int32_t* run_end,
                          int64_t j0, int64_t n, bool runs) {
  if (!runs) {
    for (int64_t j = 0; j < n; ++j) dt[base + uk[j]] += static_cast<double>(g[j]);
    return;
  }
  for (int64_t j = 0; j < n;) {
    const int64_t e = std::min<int64_t>(static_cast<int64_t>(run_end[j]) - j0, n);
    double* d = dt + base + uk[j];
    const T* src = g + j;
#pragma omp simd
    for (int64_t x = 0; x < e - j; ++x) d[x] += static_cast<double>(src[x]);
    j = e;
  }
}

// ------------------------------------------------------------------ fused rows
// One pass per row of a score tile when there is no dense bias or
// modulation: the table and the AMM are read run by run (contiguous vector
// loads) when `runs`, else gathered lane by lane.

template <typename T, typename F>
inline void for_each_vec(int64_t len, F&& f) {
  constexpr int64_t VW = at::vec::Vectorized<T>::size();
  int64_t x = 0;
  for (; x + VW <= len; x += VW) f(x, VW);
  if (x < len) f(x, len - x);
}

// Vector of t[base + uk[l]] for lanes l < r (lanes past r are 0).
template <typename T>
inline at::vec::Vectorized<T> gather_vec(const T* t, int32_t base, const int32_t* uk, int64_t r) {
  using Vec = at::vec::Vectorized<T>;
  if constexpr (std::is_same_v<T, float> &&
                at::vec::Vectorized<float>::size() == at::vec::Vectorized<int32_t>::size()) {
    using VI = at::vec::Vectorized<int32_t>;
    if (r == Vec::size()) return at::vec::gather<sizeof(float)>(t, VI(base) + VI::loadu(uk));
  }
  alignas(64) T buf[Vec::size()] = {};
  for (int64_t l = 0; l < r; ++l) buf[l] = t[base + uk[l]];
  return Vec::loadu(buf);
}

// Walks keys j < n of a row (codes uk of keys j0.., run_end of the same keys)
// in vectors: f(x, r, lanes) for lanes x .. x + r, where lanes(t, base)
// returns the vector of t[base + uk[x + l]] (l < r; lanes past r are not
// defined): a contiguous load inside a run, else a gather.
template <typename T, typename F>
inline void for_each_key_vec(const int32_t* uk, const int32_t* run_end, int64_t j0, int64_t n, bool runs, F&& f) {
  using Vec = at::vec::Vectorized<T>;
  if (runs) {
    for (int64_t j = 0; j < n;) {
      const int64_t e = std::min<int64_t>(static_cast<int64_t>(run_end[j]) - j0, n);
      const int32_t u0 = uk[j];
      for_each_vec<T>(e - j, [&](int64_t x, int64_t r) {
        f(j + x, r, [&](const T* t, int32_t base) {
          const T* src = t + base + u0 + x;
          return r == Vec::size() ? Vec::loadu(src) : Vec::loadu(src, r);
        });
      });
      j = e;
    }
  } else {
    for_each_vec<T>(n, [&](int64_t x, int64_t r) {
      f(x, r, [&](const T* t, int32_t base) { return gather_vec<T>(t, base, uk + x, r); });
    });
  }
}

template <typename T>
inline at::vec::Vectorized<T> load_part(const T* p, int64_t r) {
  using Vec = at::vec::Vectorized<T>;
  return r == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, r);
}

template <typename T>
inline void store_part(const at::vec::Vectorized<T>& v, T* p, int64_t r) {
  if (r == at::vec::Vectorized<T>::size()) v.store(p);
  else v.store(p, r);
}

// s[j] += t[base + uk[j]] (t may be null: nothing added); returns max_j s[j]
// (NaN if any is NaN, -inf for n = 0).
template <typename T>
inline T table_add_max(T* s, const T* t, int32_t base, const int32_t* uk, const int32_t* run_end, int64_t j0,
                       int64_t n, bool runs) {
  using Vec = at::vec::Vectorized<T>;
  if (t == nullptr) return row_max<T>(s, n);
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  Vec vmax(kNegInf);
  for_each_key_vec<T>(uk, run_end, j0, n, runs, [&](int64_t x, int64_t r, auto&& lanes) {
    const Vec v = load_part(s + x, r) + lanes(t, base);
    store_part(v, s + x, r);
    vmax = at::vec::maximum(vmax, r == Vec::size() ? v : Vec::set(Vec(kNegInf), v, r));
  });
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
}

// p[j] = 2^(s[j] - m); s[j] = p[j] * w[base + uk[j]] (w may be null: s[j] =
// p[j]); returns sum_j p[j].
template <typename T>
inline T exp_row_table(T* s, const T* w, int32_t base, const int32_t* uk, const int32_t* run_end, int64_t j0,
                       int64_t n, T m, bool finite, bool runs) {
  using Vec = at::vec::Vectorized<T>;
  if (w == nullptr) return exp_row<T>(s, nullptr, n, m, finite);
  return with_finite(finite, [&](auto fin) {
    constexpr bool F = decltype(fin)::value;
    const Vec vm(m);
    Vec vsum(T(0));
    for_each_key_vec<T>(uk, run_end, j0, n, runs, [&](int64_t x, int64_t r, auto&& lanes) {
      const Vec p = vexp2<T, F>(load_part(s + x, r) - vm);
      vsum = r == Vec::size() ? vsum + p : Vec::set(vsum, vsum + p, r);
      store_part(p * lanes(w, base), s + x, r);
    });
    return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, vsum);
  });
}

// Backward row in one pass, tables read run by run: s[j] += t[tb + uk[j]];
// p = 2^(s[j] - lse); w = a[ab + uk[j]]; s[j] = p w; dp[j] = p (dp[j] w -
// delta).  t, a may be null (no table: nothing added; no AMM: w = 1).
template <typename T>
inline void softmax_grad_row_table(T* s, T* dp, const T* t, int32_t tb, const T* a, int32_t ab,
                                   const int32_t* uk, const int32_t* run_end, int64_t j0, int64_t n, T lse,
                                   T delta, bool finite) {
  using Vec = at::vec::Vectorized<T>;
  with_finite(finite, [&](auto fin) {
    constexpr bool F = decltype(fin)::value;
    const Vec vl(lse), vd(delta);
    for_each_key_vec<T>(uk, run_end, j0, n, true, [&](int64_t x, int64_t r, auto&& lanes) {
      Vec sv = load_part(s + x, r);
      if (t) sv = sv + lanes(t, tb);
      const Vec p = vexp2<T, F>(sv - vl);
      Vec g = load_part(dp + x, r);
      Vec pw = p;
      if (a) {
        const Vec wv = lanes(a, ab);
        pw = p * wv;
        g = g * wv;
      }
      store_part(pw, s + x, r);
      store_part(Vec(p * (g - vd)), dp + x, r);
    });
  });
}

}  // namespace cpu
}  // namespace edt_kernels
