// CPU forward and backward of amm_attention (edt_kernels.amm_attention):
//
//   out = (softmax(q k^T * scale + T[idx(p_i, p_j), h] + bias) ⊙ M[idx(p_i, p_j)] ⊙ W) v
//
// with T the learned relative-position table, M the AMM tabulated per grid
// offset (edt_kernels.amm.amm_offset_table), bias / W (modulation) optional
// dense tensors broadcastable to [B, H, N, N] and
//
//   idx(i, j) = u_i - u_j + (rows - 1) * (2 cols - 1) + (cols - 1),
//   u = (pos // cols) * (2 cols - 1) + pos % cols.
//
// Flash-attention style (Dao et al. 2022, "FlashAttention"; the online softmax
// of Milakov & Gimelshein 2018): the forward walks key blocks with a running
// max m and denominator l taken from the *unmodulated* scores and accumulates
// exp(s - m) ⊙ M ⊙ W into the numerator (AMM after the softmax, no
// renormalisation); it saves only the natural-log LSE per row.  The backward
// recomputes P = exp(S - lse) tile by tile.  Both score in base 2 (scores,
// table and bias times log2(e), softmax as 2^x: a leaner polynomial than
// exp; cpu::vexp2):
//
//   Delta_i = rowsum(dO_i ⊙ O_i),  dV = (P⊙M⊙W)^T dO,  dP = (dO V^T) ⊙ M ⊙ W,
//   dS = P ⊙ (dP - Delta),  dQ = scale dS K,  dK = scale dS^T Q,
//   dT[idx, h] += dS,  dbias = dS summed over bias's broadcast dims.
//
// Every product is a GEMM on tiles: the forward forms S = scale Q_i K_j^T and
// acc += P V_j on a TQ x TK tile; the backward S, dP = dO_i V_j^T, dV_j +=
// P^T dO_i, dK_j += dS^T Q_i and dQ_i += dS K_j.  In float (float32 and the
// float16/bfloat16 inputs it accumulates) they run on cpu::gemm_packed, a
// 6 x 16 (12 x 8 on a last 8-wide panel) AVX2 register-blocked kernel that
// reads A in place and B from panels packed once per thread and head (K^T
// and V in the forward; K^T, V^T, dO, Q and K in the backward, straight
// from the inputs when they are float32 rows).  float64, machines without 8-float
// vectors and EDT_KERNELS_CPU_PACKED=0 use cpu::gemm_rm (the BLAS
// sgemm/dgemm that libtorch links, single-threaded inside the parallel
// region).  Between the GEMMs, per row of the tile: the learned table and
// the AMM (T[idx, h], M[idx], stored reversed along idx) are read run by run
// where the keys' grid codes go up by one (consecutive columns of a grid
// row: contiguous vector loads), else gathered; without a dense bias or
// modulation the forward takes table add + max in one pass and exp / sum /
// AMM in a second, the backward (tables read by runs) exp / dS in one and
// the table gradient in a second.  No N x N
// tensor is formed: scratch is O(TQ * TK + N * D) per thread in the forward
// and O(N * D) per thread in the backward.
// Parallelism: at::parallel_for (OpenMP) over batch * heads * query blocks in
// the forward (a thread's items of one head share its packed K/V) and over
// batch * heads in the backward.
//
// Kernel contract: edt_kernels/ops/_attention_op.py.
#include "cpu_kernels.h"  // first: it selects at::vec's instruction set

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

namespace edt_kernels {
namespace {

using cpu::Buffer;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// ------------------------------------------------------------------ arguments

struct Dense4 {  // a 4-d tensor read with broadcast (stride 0) strides
  const void* data = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
  int64_t size[4] = {1, 1, 1, 1};
};

// Everything the kernels read besides q/k/v, converted to the accumulation
// dtype (the table and AMM are tiny; bias/modulation only when their dtype
// differs from it).
struct Geometry {
  int64_t B = 0, H = 0, N = 0, D = 0;
  double scale = 1.0;
  // The learned table and the AMM are stored reversed along the offset
  // index (tab[h, x] = log2(e) table[rows_t - 1 - x, h], amm[x] =
  // amm_table[R - 1 - x]) so that a row of keys with consecutive grid codes
  // reads them forwards.  The kernels score in base 2 (see forward_impl):
  // the table is stored times log2(e), the bias is added times log2(e).
  at::Tensor tab;        // [H, rows_t] acc dtype or undefined
  int64_t tab_rows = 0;  // rows_t
  at::Tensor amm;        // [R] acc dtype or undefined
  int64_t amm_rows = 0;  // R
  at::Tensor u;          // int32 [Bp, N] grid code of each token, or undefined
  at::Tensor run_end;    // int32 [Bp, N]: end of the run of consecutive codes that token j belongs to
  bool runs = false;     // runs are long enough (>= 8 tokens on average) to be read run by run
  bool u_batched = false;
  int64_t off = 0;  // (rows - 1) * (2 cols - 1) + (cols - 1)
  at::Tensor bias_t, mod_t;  // acc dtype 4-d (keep alive)
  Dense4 bias, mod;
  bool has_bias() const { return bias.data != nullptr; }
  bool has_mod() const { return mod.data != nullptr; }
  bool has_weight() const { return amm.defined() || has_mod(); }
};

void check_qkv(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu(), "edt_kernels cpp amm_attention: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == 4, "edt_kernels cpp amm_attention: ", name, " must be [B, H, N, D], got ", t.sizes());
  TORCH_CHECK(t.sizes() == q.sizes(), "edt_kernels cpp amm_attention: ", name, " must have q's shape ",
              q.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "edt_kernels cpp amm_attention: ", name,
              " must have q's dtype ", q.scalar_type(), ", got ", t.scalar_type());
}

// The columns of a [n, c] (or [n]) floating-point tensor as the rows of a new
// contiguous [c, n] (or [n]) tensor of dtype acc, each reversed and multiplied by mul
// (in acc): dst[j, n - 1 - i] = acc(src[i, j]) * mul.  One allocation and one
// pass, read through src's strides; the tables are a few thousand values.
at::Tensor reversed_columns(const at::Tensor& src, at::ScalarType acc, double mul) {
  const int64_t n = src.size(0), c = src.dim() == 2 ? src.size(1) : 1;
  const int64_t s0 = src.stride(0), s1 = src.dim() == 2 ? src.stride(1) : 0;
  const auto options = src.options().dtype(acc);
  at::Tensor dst = src.dim() == 2 ? at::empty({c, n}, options) : at::empty({n}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "reversed_columns", [&] {
    using out_t = scalar_t;
    out_t* d = dst.data_ptr<out_t>();
    const out_t m = static_cast<out_t>(mul);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "reversed_columns_src", [&] {
      const scalar_t* p = src.const_data_ptr<scalar_t>();
      for (int64_t j = 0; j < c; ++j)
        for (int64_t i = 0; i < n; ++i) d[j * n + (n - 1 - i)] = static_cast<out_t>(p[i * s0 + j * s1]) * m;
    });
  });
  return dst;
}

Dense4 make_dense4(const at::Tensor& t, const char* name, int64_t B, int64_t H, int64_t N) {
  TORCH_CHECK(t.dim() == 4, "edt_kernels cpp amm_attention: ", name,
              " must be 4-d broadcastable to [B, H, N, N], got ", t.sizes());
  const int64_t full[4] = {B, H, N, N};
  Dense4 d;
  d.data = t.data_ptr();
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(t.size(i) == 1 || t.size(i) == full[i], "edt_kernels cpp amm_attention: ", name, " of shape ",
                t.sizes(), " is not broadcastable to [B, H, N, N] = [", B, ", ", H, ", ", N, ", ", N, "]");
    d.size[i] = t.size(i);
    d.s[i] = t.size(i) == 1 ? 0 : t.stride(i);
  }
  return d;
}

Geometry prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& positions,
                 const std::optional<at::Tensor>& amm_table, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& modulation, double scale, int64_t rows, int64_t cols) {
  TORCH_CHECK(q.device().is_cpu(), "edt_kernels cpp amm_attention: q must be a CPU tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 4, "edt_kernels cpp amm_attention: q must be [B, H, N, D], got ", q.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "edt_kernels cpp amm_attention: q must be float16, bfloat16, float32 or float64, got ", st);
  check_qkv(k, "k", q);
  check_qkv(v, "v", q);
  TORCH_CHECK(rows >= 1 && cols >= 1, "edt_kernels cpp amm_attention: grid (rows, cols) must be positive, got (",
              rows, ", ", cols, ")");
  Geometry g;
  g.B = q.size(0);
  g.H = q.size(1);
  g.N = q.size(2);
  g.D = q.size(3);
  g.scale = scale;
  TORCH_CHECK(g.D >= 1 && g.D <= 256, "edt_kernels cpp amm_attention: head dim must be in 1..256, got ", g.D);
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t R = (2 * rows - 1) * (2 * cols - 1);
  g.off = (rows - 1) * (2 * cols - 1) + (cols - 1);
  const bool has_table = table.has_value() && table->defined();
  const bool has_amm = amm_table.has_value() && amm_table->defined();
  if (has_table) {
    const auto& t = *table;
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.size(1) == g.H && t.size(0) >= R,
                "edt_kernels cpp amm_attention: table must be a CPU [(2*rows-1)*(2*cols-1) + extra, H] = [>= ", R,
                ", ", g.H, "] tensor, got ", t.sizes(), " on ", t.device());
    TORCH_CHECK(t.is_floating_point(), "edt_kernels cpp amm_attention: table must be floating point, got ",
                t.scalar_type());
    g.tab = reversed_columns(t, acc, cpu::kLog2e);  // [H, rows_t], reversed, base 2
    g.tab_rows = t.size(0);
  }
  if (has_amm) {
    const auto& a = *amm_table;
    TORCH_CHECK(a.device().is_cpu() && a.dim() == 1 && a.size(0) == R,
                "edt_kernels cpp amm_attention: amm_table must be a CPU [(2*rows-1)*(2*cols-1)] = [", R,
                "] tensor, got ", a.sizes(), " on ", a.device());
    TORCH_CHECK(a.is_floating_point(), "edt_kernels cpp amm_attention: amm_table must be floating point, got ",
                a.scalar_type());
    g.amm = reversed_columns(a, acc, 1.0);  // reversed
    g.amm_rows = R;
  }
  if (has_table || has_amm) {
    at::Tensor pos;
    if (positions.has_value() && positions->defined()) {
      pos = *positions;
      TORCH_CHECK(pos.device().is_cpu(), "edt_kernels cpp amm_attention: positions must be on the CPU");
      TORCH_CHECK(pos.scalar_type() == at::kLong || pos.scalar_type() == at::kInt,
                  "edt_kernels cpp amm_attention: positions must be int64, got ", pos.scalar_type());
      TORCH_CHECK((pos.dim() == 1 && pos.size(0) == g.N) || (pos.dim() == 2 && pos.size(0) == g.B &&
                                                              pos.size(1) == g.N),
                  "edt_kernels cpp amm_attention: positions must be [N] or [B, N] = [", g.B, ", ", g.N, "], got ",
                  pos.sizes());
      pos = pos.to(at::kLong).contiguous();
    } else {
      TORCH_CHECK(g.N == rows * cols, "edt_kernels cpp amm_attention: without positions N = ", g.N,
                  " must equal rows * cols = ", rows * cols);
    }
    const int64_t Bp = pos.defined() && pos.dim() == 2 ? g.B : 1;
    g.u_batched = Bp > 1;
    g.u = at::empty({Bp, g.N}, at::TensorOptions().dtype(at::kInt));
    int32_t* u = g.u.data_ptr<int32_t>();
    const int64_t* p = pos.defined() ? pos.data_ptr<int64_t>() : nullptr;
    for (int64_t t = 0; t < Bp * g.N; ++t) {
      const int64_t x = p ? p[t] : t;
      TORCH_CHECK(x >= 0 && x < rows * cols, "edt_kernels cpp amm_attention: positions must lie in [0, rows*cols) = [0, ",
                  rows * cols, "), got ", x);
      u[t] = static_cast<int32_t>((x / cols) * (2 * cols - 1) + x % cols);
    }
    g.run_end = at::empty({Bp, g.N}, at::TensorOptions().dtype(at::kInt));
    int32_t* re = g.run_end.data_ptr<int32_t>();
    int64_t n_runs = 0;
    for (int64_t b = 0; b < Bp; ++b) {
      const int32_t* ub = u + b * g.N;
      int32_t* rb = re + b * g.N;
      for (int64_t j = g.N - 1; j >= 0; --j)
        rb[j] = (j + 1 < g.N && ub[j + 1] == ub[j] + 1) ? rb[j + 1] : static_cast<int32_t>(j + 1);
      for (int64_t j = 0; j < g.N; ++j) n_runs += (j == 0 || ub[j] != ub[j - 1] + 1) ? 1 : 0;
    }
    g.runs = n_runs * 8 <= Bp * g.N;
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->is_floating_point(),
                "edt_kernels cpp amm_attention: bias must be a floating-point CPU tensor");
    g.bias_t = bias->scalar_type() == acc ? *bias : bias->to(acc);
    g.bias = make_dense4(g.bias_t, "bias", g.B, g.H, g.N);
  }
  if (modulation.has_value() && modulation->defined()) {
    TORCH_CHECK(modulation->device().is_cpu() && modulation->is_floating_point(),
                "edt_kernels cpp amm_attention: modulation must be a floating-point CPU tensor");
    g.mod_t = modulation->scalar_type() == acc ? *modulation : modulation->to(acc);
    g.mod = make_dense4(g.mod_t, "modulation", g.B, g.H, g.N);
  }
  return g;
}

// --------------------------------------------------------------- tile helpers

// dst[r, d] = mul * src[row0 + r, d] for r < rows, d < D; zero up to (rows_pad, ld).
template <typename scalar_t, typename acc_t>
void pack_rows(const scalar_t* src, int64_t sn, int64_t sd, int64_t rows, int64_t rows_pad, int64_t D, acc_t mul,
               acc_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * sn;
    acc_t* o = dst + r * ld;
    if (sd == 1) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<acc_t>(s[d]) * mul;
    } else {
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<acc_t>(s[d * sd]) * mul;
    }
    for (int64_t d = D; d < ld; ++d) o[d] = acc_t(0);
  }
  for (int64_t r = rows; r < rows_pad; ++r) std::fill(dst + r * ld, dst + (r + 1) * ld, acc_t(0));
}

template <typename scalar_t, typename acc_t>
void write_rows(const acc_t* src, int64_t ld, int64_t rows, int64_t D, const acc_t* row_mul, acc_t mul,
                scalar_t* dst, int64_t sn, int64_t sd) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t m = row_mul ? row_mul[r] : mul;
    const acc_t* s = src + r * ld;
    scalar_t* o = dst + r * sn;
    for (int64_t d = 0; d < D; ++d) o[d * sd] = static_cast<scalar_t>(s[d] * m);
  }
}

// sum_d a[d] b[d * sb] for d < D (vectorised when b is acc_t with unit stride).
template <typename scalar_t, typename acc_t>
acc_t dot_row(const acc_t* a, const scalar_t* b, int64_t sb, int64_t D) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (sb == 1) {
      Vec acc(acc_t(0));
      cpu::for_each_vec<acc_t>(D, [&](int64_t d, int64_t r) {
        acc = at::vec::fmadd(cpu::load_part(a + d, r), cpu::load_part(b + d, r), acc);
      });
      return at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, acc);
    }
  }
  acc_t s = 0;
  for (int64_t d = 0; d < D; ++d) s += a[d] * static_cast<acc_t>(b[d * sb]);
  return s;
}

// Per-head views of the geometry.
template <typename acc_t>
struct HeadView {
  const acc_t* tab = nullptr;   // [rows_t] of head h, reversed
  const acc_t* amm = nullptr;   // [R], reversed
  const int32_t* u = nullptr;   // [N] of batch b
  const int32_t* run_end = nullptr;  // [N] of batch b
  bool runs = false;
  bool fused = false;  // table or AMM, no bias, no modulation: one pass per row (cpu::*_table)
  int32_t tab_last = 0, amm_last = 0;  // rows_t - 1, R - 1
  const acc_t* bias = nullptr;  // bias[b, h] with strides bs2, bs3
  int64_t bs2 = 0, bs3 = 0;
  const acc_t* mod = nullptr;
  int64_t ms2 = 0, ms3 = 0;
  int64_t off = 0;

  HeadView(const Geometry& g, int64_t b, int64_t h) {
    off = g.off;
    if (g.tab.defined()) tab = g.tab.data_ptr<acc_t>() + h * g.tab_rows;
    if (g.amm.defined()) amm = g.amm.data_ptr<acc_t>();
    tab_last = static_cast<int32_t>(g.tab_rows - 1);
    amm_last = static_cast<int32_t>(g.amm_rows - 1);
    runs = g.runs;
    if (g.u.defined()) {
      u = g.u.data_ptr<int32_t>() + (g.u_batched ? b * g.N : 0);
      run_end = g.run_end.data_ptr<int32_t>() + (g.u_batched ? b * g.N : 0);
    }
    fused = u != nullptr && !g.has_bias() && !g.has_mod();
    if (g.has_bias()) {
      bias = static_cast<const acc_t*>(g.bias.data) + b * g.bias.s[0] + h * g.bias.s[1];
      bs2 = g.bias.s[2];
      bs3 = g.bias.s[3];
    }
    if (g.has_mod()) {
      mod = static_cast<const acc_t*>(g.mod.data) + b * g.mod.s[0] + h * g.mod.s[1];
      ms2 = g.mod.s[2];
      ms3 = g.mod.s[3];
    }
  }

  // T[idx(i, j)] = tab[tab_base(i) + u[j]], M[idx(i, j)] = amm[amm_base(i) + u[j]].
  inline int32_t tab_base(int64_t i) const { return tab_last - (u[i] + static_cast<int32_t>(off)); }
  inline int32_t amm_base(int64_t i) const { return amm_last - (u[i] + static_cast<int32_t>(off)); }

  // s[j] += log2(e) (T[idx(i, j0 + j)] + bias[i, j0 + j]) for j < bn.
  inline void add_scores(acc_t* s, int64_t i, int64_t j0, int64_t bn) const {
    if (tab) cpu::table_add<acc_t>(s, tab, tab_base(i), u + j0, run_end + j0, j0, bn, runs);
    if (bias) {
      const acc_t* br = bias + i * bs2 + j0 * bs3;
      constexpr acc_t l2e = static_cast<acc_t>(cpu::kLog2e);
      if (bs3 == 1) {
#pragma omp simd
        for (int64_t j = 0; j < bn; ++j) s[j] += l2e * br[j];
      } else {
        for (int64_t j = 0; j < bn; ++j) s[j] += l2e * br[j * bs3];
      }
    }
  }

  // w[j] = M[idx(i, j0 + j)] * W[i, j0 + j] (at least one of them present).
  inline void weights(acc_t* w, int64_t i, int64_t j0, int64_t bn) const {
    if (amm) {
      cpu::table_set<acc_t>(w, amm, amm_base(i), u + j0, run_end + j0, j0, bn, runs);
    } else {
      std::fill(w, w + bn, acc_t(1));
    }
    if (mod) {
      const acc_t* mr = mod + i * ms2 + j0 * ms3;
      for (int64_t j = 0; j < bn; ++j) w[j] *= mr[j * ms3];
    }
  }
};

// ------------------------------------------------------------------- forward

// Rows [0, rows) of a [N, D] slice (row stride sn, element stride sd) as an
// acc_t matrix with unit element stride: the input itself when it already is
// one (float32/float64 with contiguous rows, read in place), else converted
// into buf ([rows, D]).  ld receives the row stride of the result.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_acc(const scalar_t* src, int64_t sn, int64_t sd, int64_t rows, int64_t D, acc_t* buf,
                         int64_t& ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (sd == 1 && (rows == 1 || (sn >= D && sn < (int64_t(1) << 31)))) {
      ld = rows == 1 ? D : sn;
      return src;
    }
  }
  pack_rows<scalar_t, acc_t>(src, sn, sd, rows, rows, D, acc_t(1), buf, D);
  ld = D;
  return buf;
}

// Query rows per work item and keys per GEMM tile of the forward.  Keys: up
// to 512 per tile (one tile, no online rescaling, for N <= 512); queries: 48
// rows (120 from N = 768), fewer when the work items would leave threads idle.
// Scratch per thread is O(tile_q * tile_kv + tile_q * D): linear in N.
inline void forward_tiles(int64_t N, int64_t BH, int64_t threads, int64_t& tq, int64_t& tkv) {
  tkv = std::min<int64_t>(N, 512);
  tq = N >= 768 ? 120 : 48;  // multiples of the micro-GEMM's 6 rows
  while (tq > 16 && BH * ((N + tq - 1) / tq) < 4 * threads) tq /= 2;
  tq = std::min(tq, N);
}

template <typename scalar_t>
void forward_impl(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  at::Tensor& lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = g.B, H = g.H, N = g.N, D = g.D;
  int64_t TQ = 0, TK = 0;
  forward_tiles(N, B * H, at::get_num_threads(), TQ, TK);
  const int64_t nqb = (N + TQ - 1) / TQ;
  // Scores in base 2: S = log2(e) (scale q k^T + T + bias), so that the
  // softmax is 2^(S - m) (cpu::vexp2) and the LSE ln(2) (m + log2 l).
  const acc_t scale = static_cast<acc_t>(g.scale * cpu::kLog2e);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();
  const auto sq = q.strides(), sk = k.strides(), sv = v.strides(), so = out.strides();
  const bool weighted = g.has_weight();
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  // float: the GEMMs run on cpu::gemm_packed with K^T and V of the head
  // packed once per thread and head (work items of one head are consecutive);
  // otherwise on cpu::gemm_rm (BLAS).
  const bool packed = std::is_same_v<acc_t, float> && cpu::use_packed_gemm();
  const int64_t TKp = cpu::round_up(TK, cpu::kPanel);       // row stride of the score tile
  const int64_t ldacc = packed ? cpu::round_up(D, cpu::kPanel) : D;  // row stride of the accumulator

  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    Buffer<acc_t> Qb(TQ * D), Kb(packed ? 0 : TK * D), Vb(packed ? 0 : TK * D), S(TQ * TKp), acc(TQ * ldacc), W(TK),
        m(TQ), l(TQ);
    Buffer<float> KTp(packed ? cpu::packed_size(N, D) : 0), Vp(packed ? cpu::packed_size(D, N) : 0);
    int64_t packed_bh = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % nqb, bh = item / nqb, h = bh % H, b = bh / H;
      if (packed && bh != packed_bh) {
        cpu::pack_b_transposed<scalar_t>(kp + b * sk[0] + h * sk[1], sk[2], sk[3], N, D, KTp.data());
        cpu::pack_b<scalar_t>(vp + b * sv[0] + h * sv[1], sv[2], sv[3], N, D, Vp.data());
        packed_bh = bh;
      }
      const int64_t i0 = qb * TQ, bm = std::min(TQ, N - i0);
      const HeadView<acc_t> hv(g, b, h);
      int64_t ldq = 0, ldk = 0, ldv = 0;
      const acc_t* Q = rows_as_acc<scalar_t, acc_t>(qp + b * sq[0] + h * sq[1] + i0 * sq[2], sq[2], sq[3], bm, D,
                                                    Qb.data(), ldq);
      std::fill(m.data(), m.data() + bm, -kInf);
      std::fill(l.data(), l.data() + bm, acc_t(0));
      for (int64_t j0 = 0; j0 < N; j0 += TK) {
        const int64_t bn = std::min(TK, N - j0);
        const bool first = j0 == 0;
        const acc_t* V = nullptr;
        // S = log2(e) scale Q K^T
        if constexpr (std::is_same_v<acc_t, float>) {
          if (packed)
            cpu::gemm_packed(bm, bn, D, scale, Q, ldq, KTp.data() + j0 * D, D, 0, S.data(), TKp, false);
        }
        if (!packed) {
          const acc_t* K = rows_as_acc<scalar_t, acc_t>(kp + b * sk[0] + h * sk[1] + j0 * sk[2], sk[2], sk[3], bn,
                                                        D, Kb.data(), ldk);
          V = rows_as_acc<scalar_t, acc_t>(vp + b * sv[0] + h * sv[1] + j0 * sv[2], sv[2], sv[3], bn, D, Vb.data(),
                                           ldv);
          cpu::gemm_rm<acc_t>(false, true, bm, bn, D, scale, Q, ldq, K, ldk, acc_t(0), S.data(), TKp);
        }
        for (int64_t i = 0; i < bm; ++i) {
          acc_t* s = S.data() + i * TKp;
          acc_t mx;
          if (hv.fused) {
            mx = cpu::table_add_max<acc_t>(s, hv.tab, hv.tab ? hv.tab_base(i0 + i) : 0, hv.u + j0, hv.run_end + j0,
                                           j0, bn, hv.runs);
          } else {
            hv.add_scores(s, i0 + i, j0, bn);
            mx = cpu::row_max<acc_t>(s, bn);
          }
          // A NaN score makes the row NaN (as in the reference softmax); a
          // finite max (or -inf, all keys masked) lets exp take the lean 2^x.
          const acc_t m_new = mx != mx ? mx : std::max(m[i], mx);
          const acc_t m_use = m_new == -kInf ? acc_t(0) : m_new;
          const bool finite = std::isfinite(m_use);
          acc_t sum;
          if (hv.fused) {
            sum = cpu::exp_row_table<acc_t>(s, hv.amm, hv.amm ? hv.amm_base(i0 + i) : 0, hv.u + j0, hv.run_end + j0,
                                            j0, bn, m_use, finite, hv.runs);
          } else {
            const acc_t* w = nullptr;
            if (weighted) {
              hv.weights(W.data(), i0 + i, j0, bn);
              w = W.data();
            }
            sum = cpu::exp_row<acc_t>(s, w, bn, m_use, finite);
          }
          if (first) {
            l[i] = sum;
          } else {
            const acc_t alpha = std::exp2(m[i] - m_use);
            l[i] = l[i] * alpha + sum;
            if (alpha != acc_t(1)) {
              acc_t* a = acc.data() + i * ldacc;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
            }
          }
          m[i] = m_new;
        }
        // acc (+)= (P ⊙ M ⊙ W) V
        if constexpr (std::is_same_v<acc_t, float>) {
          if (packed) cpu::gemm_packed(bm, D, bn, 1.0f, S.data(), TKp, Vp.data(), N, j0, acc.data(), ldacc, !first);
        }
        if (!packed)
          cpu::gemm_rm<acc_t>(false, false, bm, D, bn, acc_t(1), S.data(), TKp, V, ldv, first ? acc_t(0) : acc_t(1),
                              acc.data(), ldacc);
      }
      float* lrow = lp + (b * H + h) * N + i0;
      for (int64_t i = 0; i < bm; ++i) {
        lrow[i] = static_cast<float>((m[i] + std::log2(l[i])) * static_cast<acc_t>(cpu::kLn2));
        l[i] = acc_t(1) / l[i];
      }
      write_rows<scalar_t, acc_t>(acc.data(), ldacc, bm, D, l.data(), acc_t(1), op + b * so[0] + h * so[1] + i0 * so[2],
                                  so[2], so[3]);
    }
  });
}

// ------------------------------------------------------------------ backward

template <typename scalar_t>
void backward_impl(const Geometry& g, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv, at::Tensor* dtable, at::Tensor* dbias) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = g.B, H = g.H, N = g.N, D = g.D;
  const acc_t scale = static_cast<acc_t>(g.scale);
  // Scores in base 2 as in the forward: S = log2(e) (Qs K^T + T + bias) with
  // Qs = scale Q (the dK operand), P = 2^(S - log2(e) lse).
  constexpr acc_t l2e = static_cast<acc_t>(cpu::kLog2e);
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>(),
                 *dop = dout.data_ptr<scalar_t>(), *outp = out.data_ptr<scalar_t>();
  const float* lsep = lse.data_ptr<float>();
  const int64_t lse_sb = lse.stride(0), lse_sh = lse.stride(1), lse_sn = lse.stride(2);
  scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
  const auto sq = q.strides(), sk = k.strides(), sv = v.strides(), sdo = dout.strides(), sout = out.strides(),
             sdq = dq.strides(), sdk = dk.strides(), sdv = dv.strides();
  const bool weighted = g.has_weight();
  // dtable accumulators cover every table row; the extra rows beyond
  // (2 rows - 1)(2 cols - 1) are never indexed and stay 0.
  const int64_t R = g.tab.defined() ? g.tab_rows : 0;

  // dbias target strides (broadcast dims reduced: stride 0).
  int64_t ts[4] = {0, 0, 0, 0};
  int64_t dbias_numel = 0;
  bool shared_dbias = false;
  if (dbias) {
    const int64_t full[4] = {B, H, N, N};
    for (int d = 0; d < 4; ++d) ts[d] = (dbias->size(d) == 1) ? 0 : dbias->stride(d);
    dbias_numel = dbias->numel();
    shared_dbias = (dbias->size(0) == 1 && full[0] > 1) || (dbias->size(1) == 1 && full[1] > 1);
  }
  // Work items: groups of (b, h) whose dbias slices coincide are run by one
  // thread ("group mode") unless there are fewer groups than threads, in
  // which case every chunk accumulates into a private copy of dbias.
  const int64_t T_max = std::max<int64_t>(1, at::get_num_threads());
  int64_t GB = B, GH = H;
  bool private_dbias = false;
  if (shared_dbias) {
    const int64_t groups = dbias->size(0) * dbias->size(1);
    const double private_bytes = static_cast<double>(std::min(T_max, B * H)) * dbias_numel * sizeof(float);
    if (groups >= T_max || private_bytes > (1ull << 30)) {
      GB = dbias->size(0);
      GH = dbias->size(1);
    } else {
      private_dbias = true;
    }
  }
  const int64_t items = GB * GH;
  const int64_t T = std::min(T_max, items);
  std::vector<Buffer<double>> dtab_buf(dtable ? T : 0);
  for (auto& buf : dtab_buf) buf.reset(H * R);
  std::vector<Buffer<float>> dbias_buf(private_dbias ? T : 0);
  for (auto& buf : dbias_buf) buf.reset(dbias_numel);
  float* dbias_out = dbias ? dbias->data_ptr<float>() : nullptr;
  if (dbias) std::fill(dbias_out, dbias_out + dbias_numel, 0.0f);

  // Tiles: TQ query rows x TK keys (scratch TQ * TK per thread; the per-head
  // operands and dK/dV accumulators are [N, D]).
  const int64_t TQ = std::min<int64_t>(N, 64), TK = std::min<int64_t>(N, 256);
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  // float: the five GEMMs of a tile run on cpu::gemm_packed, their B operands
  // (K^T, V^T, dO, Q, K of the head) packed once per head; otherwise gemm_rm.
  const bool packed = std::is_same_v<acc_t, float> && cpu::use_packed_gemm();
  const int64_t TKp = cpu::round_up(TK, cpu::kPanel);               // row stride of S / dP
  const int64_t ldacc = packed ? cpu::round_up(D, cpu::kPanel) : D;  // row stride of dQ / dK / dV
  const int64_t npk = packed ? std::max(cpu::packed_size(N, D), cpu::packed_size(D, N)) : 0;
  // float32 inputs whose rows are unit-stride: Q and dO read in place, the
  // GEMM panels packed straight from q, k, v and dout (no per-head copies).
  const bool direct = packed && std::is_same_v<scalar_t, float> && sq[3] == 1 && sdo[3] == 1 &&
                      sq[2] < (int64_t(1) << 31) && sdo[2] < (int64_t(1) << 31);
  const int64_t ncopy = direct ? 0 : N * D;
  at::parallel_for(0, T, 1, [&](int64_t cbegin, int64_t cend) {
    Buffer<acc_t> Qs(ncopy), dO(ncopy), Kr(ncopy), Vr(ncopy), dK(N * ldacc), dV(N * ldacc), dQ(TQ * ldacc),
        S(TQ * TKp), dP(TQ * TKp), W(TK), lse_r(N), delta(N), mrun(TQ);
    Buffer<float> KTp(npk), VTp(npk), dOp(npk), Qp(npk), Kp(npk);
    for (int64_t c = cbegin; c < cend; ++c) {
      double* dtab = dtable ? dtab_buf[c].data() : nullptr;
      float* dbias_tgt = private_dbias ? dbias_buf[c].data() : dbias_out;
      for (int64_t item = c * items / T; item < (c + 1) * items / T; ++item) {
        const int64_t gb = item / GH, gh = item % GH;
        const int64_t b_lo = GB == B ? gb : 0, b_hi = GB == B ? gb + 1 : B;
        const int64_t h_lo = GH == H ? gh : 0, h_hi = GH == H ? gh + 1 : H;
        for (int64_t b = b_lo; b < b_hi; ++b)
          for (int64_t h = h_lo; h < h_hi; ++h) {
            const HeadView<acc_t> hv(g, b, h);
            const scalar_t *q_bh = qp + b * sq[0] + h * sq[1], *do_bh = dop + b * sdo[0] + h * sdo[1],
                           *k_bh = kp + b * sk[0] + h * sk[1], *v_bh = vp + b * sv[0] + h * sv[1];
            // Q (as Qs = scale Q, or read in place and scaled in the GEMMs) and
            // dO as acc_t rows with row strides ldq / lddo.
            const acc_t *Qa = Qs.data(), *dOa = dO.data();
            int64_t ldq = D, lddo = D;
            if constexpr (std::is_same_v<scalar_t, float>) {
              if (direct) {
                Qa = q_bh;
                ldq = sq[2];
                dOa = do_bh;
                lddo = sdo[2];
              }
            }
            if (!direct) {
              pack_rows(q_bh, sq[2], sq[3], N, N, D, scale, Qs.data(), D);
              pack_rows(do_bh, sdo[2], sdo[3], N, N, D, acc_t(1), dO.data(), D);
              pack_rows(k_bh, sk[2], sk[3], N, N, D, acc_t(1), Kr.data(), D);
              pack_rows(v_bh, sv[2], sv[3], N, N, D, acc_t(1), Vr.data(), D);
            }
            // Delta_i = rowsum(dO_i * O_i) from the saved output.
            const scalar_t* o_bh = outp + b * sout[0] + h * sout[1];
            for (int64_t i = 0; i < N; ++i)
              delta[i] = dot_row<scalar_t, acc_t>(dOa + i * lddo, o_bh + i * sout[2], sout[3], D);
            if constexpr (std::is_same_v<acc_t, double>) {
              // The saved LSE is float32; recompute it in double so that the
              // float64 path stays float64-accurate (an extra pass over QK^T).
              // lse_r is in base 2 like the scores.
              for (int64_t i0 = 0; i0 < N; i0 += TQ) {
                const int64_t bm = std::min(TQ, N - i0);
                for (int64_t i = 0; i < bm; ++i) {
                  mrun[i] = -kInf;    // running max
                  lse_r[i0 + i] = 0;  // running sum
                }
                for (int64_t j0 = 0; j0 < N; j0 += TK) {
                  const int64_t bn = std::min(TK, N - j0);
                  cpu::gemm_rm<acc_t>(false, true, bm, bn, D, l2e, Qs.data() + i0 * D, D, Kr.data() + j0 * D, D,
                                      acc_t(0), S.data(), TKp);
                  for (int64_t i = 0; i < bm; ++i) {
                    acc_t* s = S.data() + i * TKp;
                    hv.add_scores(s, i0 + i, j0, bn);
                    acc_t mx = -kInf;
#pragma omp simd reduction(max : mx)
                    for (int64_t j = 0; j < bn; ++j) mx = std::max(mx, s[j]);
                    const acc_t m_new = std::max<acc_t>(mrun[i], mx);
                    const acc_t m_use = m_new == -kInf ? acc_t(0) : m_new;
                    acc_t sum = 0;
                    for (int64_t j = 0; j < bn; ++j) sum += std::exp2(s[j] - m_use);
                    lse_r[i0 + i] = lse_r[i0 + i] * std::exp2(mrun[i] - m_use) + sum;
                    mrun[i] = m_new;
                  }
                }
                for (int64_t i = 0; i < bm; ++i) lse_r[i0 + i] = mrun[i] + std::log2(lse_r[i0 + i]);
              }
            } else {
              const float* lrow = lsep + b * lse_sb + h * lse_sh;
              for (int64_t i = 0; i < N; ++i) lse_r[i] = static_cast<acc_t>(lrow[i * lse_sn]) * l2e;
            }
            if constexpr (std::is_same_v<acc_t, float>) {
              if (direct) {  // straight from the inputs; Qp unscaled (dK scaled when written)
                cpu::pack_b_transposed<scalar_t>(k_bh, sk[2], sk[3], N, D, KTp.data());
                cpu::pack_b_transposed<scalar_t>(v_bh, sv[2], sv[3], N, D, VTp.data());
                cpu::pack_b<scalar_t>(do_bh, sdo[2], sdo[3], N, D, dOp.data());
                cpu::pack_b<scalar_t>(q_bh, sq[2], sq[3], N, D, Qp.data());
                cpu::pack_b<scalar_t>(k_bh, sk[2], sk[3], N, D, Kp.data());
              } else if (packed) {
                cpu::pack_b_transposed<float>(Kr.data(), D, 1, N, D, KTp.data());
                cpu::pack_b_transposed<float>(Vr.data(), D, 1, N, D, VTp.data());
                cpu::pack_b<float>(dO.data(), D, 1, N, D, dOp.data());
                cpu::pack_b<float>(Qs.data(), D, 1, N, D, Qp.data());
                cpu::pack_b<float>(Kr.data(), D, 1, N, D, Kp.data());
              }
            }
            double* dtab_h = dtab ? dtab + h * R : nullptr;
            float* dbias_bh = dbias ? dbias_tgt + b * ts[0] + h * ts[1] : nullptr;
            for (int64_t i0 = 0; i0 < N; i0 += TQ) {
              const int64_t bm = std::min(TQ, N - i0);
              for (int64_t j0 = 0; j0 < N; j0 += TK) {
                const int64_t bn = std::min(TK, N - j0);
                const acc_t* Qi = Qa + i0 * ldq;
                const acc_t* dOi = dOa + i0 * lddo;
                // S = log2(e) (scale Q_i) K_j^T, dP = dO_i V_j^T
                if constexpr (std::is_same_v<acc_t, float>) {
                  if (packed) {
                    cpu::gemm_packed(bm, bn, D, direct ? l2e * scale : l2e, Qi, ldq, KTp.data() + j0 * D, D, 0,
                                     S.data(), TKp, false);
                    cpu::gemm_packed(bm, bn, D, 1.0f, dOi, lddo, VTp.data() + j0 * D, D, 0, dP.data(), TKp, false);
                  }
                }
                if (!packed) {
                  cpu::gemm_rm<acc_t>(false, true, bm, bn, D, l2e, Qi, D, Kr.data() + j0 * D, D, acc_t(0),
                                      S.data(), TKp);
                  cpu::gemm_rm<acc_t>(false, true, bm, bn, D, acc_t(1), dOi, D, Vr.data() + j0 * D, D, acc_t(0),
                                      dP.data(), TKp);
                }
                for (int64_t i = 0; i < bm; ++i) {
                  acc_t* s = S.data() + i * TKp;   // scores -> P ⊙ M ⊙ W
                  acc_t* dp = dP.data() + i * TKp;  // dO V^T -> dS
                  const acc_t li = lse_r[i0 + i], di = delta[i0 + i];
                  const bool finite = std::isfinite(li);
                  // (Gathered tables: two passes, measured faster than one here.)
                  if (hv.fused && hv.runs) {
                    cpu::softmax_grad_row_table<acc_t>(s, dp, hv.tab, hv.tab ? hv.tab_base(i0 + i) : 0, hv.amm,
                                                       hv.amm ? hv.amm_base(i0 + i) : 0, hv.u + j0, hv.run_end + j0,
                                                       j0, bn, li, di, finite);
                  } else {
                    hv.add_scores(s, i0 + i, j0, bn);
                    const acc_t* w = nullptr;
                    if (weighted) {
                      hv.weights(W.data(), i0 + i, j0, bn);
                      w = W.data();
                    }
                    cpu::softmax_grad_row<acc_t>(s, dp, w, bn, li, di, finite);
                  }
                  if (dtab_h)  // (reversed like the table)
                    cpu::table_scatter<acc_t>(dtab_h, dp, hv.tab_base(i0 + i), hv.u + j0, hv.run_end + j0, j0, bn,
                                              hv.runs);
                  if (dbias_bh) {
                    float* br = dbias_bh + (i0 + i) * ts[2] + j0 * ts[3];
                    for (int64_t j = 0; j < bn; ++j) br[j * ts[3]] += static_cast<float>(dp[j]);
                  }
                }
                // dV_j += (P⊙M⊙W)^T dO_i, dK_j += dS^T (scale Q_i), dQ_i (+)= dS K_j.
                if constexpr (std::is_same_v<acc_t, float>) {
                  if (packed) {
                    cpu::gemm_packed<true>(bn, D, bm, 1.0f, S.data(), TKp, dOp.data(), N, i0, dV.data() + j0 * ldacc,
                                           ldacc, i0 != 0);
                    cpu::gemm_packed<true>(bn, D, bm, 1.0f, dP.data(), TKp, Qp.data(), N, i0, dK.data() + j0 * ldacc,
                                           ldacc, i0 != 0);
                    cpu::gemm_packed(bm, D, bn, 1.0f, dP.data(), TKp, Kp.data(), N, j0, dQ.data(), ldacc, j0 != 0);
                  }
                }
                if (!packed) {
                  const acc_t beta_kv = i0 == 0 ? acc_t(0) : acc_t(1);
                  cpu::gemm_rm<acc_t>(true, false, bn, D, bm, acc_t(1), S.data(), TKp, dOi, D, beta_kv,
                                      dV.data() + j0 * ldacc, ldacc);
                  cpu::gemm_rm<acc_t>(true, false, bn, D, bm, acc_t(1), dP.data(), TKp, Qi, D, beta_kv,
                                      dK.data() + j0 * ldacc, ldacc);
                  cpu::gemm_rm<acc_t>(false, false, bm, D, bn, acc_t(1), dP.data(), TKp, Kr.data() + j0 * D, D,
                                      j0 == 0 ? acc_t(0) : acc_t(1), dQ.data(), ldacc);
                }
              }
              write_rows<scalar_t, acc_t>(dQ.data(), ldacc, bm, D, nullptr, scale,
                                          dqp + b * sdq[0] + h * sdq[1] + i0 * sdq[2], sdq[2], sdq[3]);
            }
            write_rows<scalar_t, acc_t>(dK.data(), ldacc, N, D, nullptr, direct ? scale : acc_t(1),
                                        dkp + b * sdk[0] + h * sdk[1], sdk[2], sdk[3]);
            write_rows<scalar_t, acc_t>(dV.data(), ldacc, N, D, nullptr, acc_t(1), dvp + b * sdv[0] + h * sdv[1],
                                        sdv[2], sdv[3]);
          }
      }
    }
  });

  if (dtable) {
    // dtable[r, h] = sum over chunks, in chunk order (deterministic for a given thread count).
    // float64 inputs get a float64 table gradient (the accumulators are double).
    const int64_t st0 = dtable->stride(0), st1 = dtable->stride(1);
    auto write = [&](auto* dt) {
      using out_t = std::remove_pointer_t<decltype(dt)>;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t r = 0; r < R; ++r) {
          double s = 0;
          for (int64_t c = 0; c < T; ++c) s += dtab_buf[c][h * R + (R - 1 - r)];  // reversed
          dt[r * st0 + h * st1] = static_cast<out_t>(s);
        }
    };
    if (dtable->scalar_type() == at::kDouble) write(dtable->data_ptr<double>());
    else write(dtable->data_ptr<float>());
  }
  if (private_dbias) {
    at::parallel_for(0, dbias_numel, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t c = 0; c < T; ++c) {
        const float* src = dbias_buf[c].data();
        for (int64_t e = begin; e < end; ++e) dbias_out[e] += src[e];
      }
    });
  }
}

// ------------------------------------------------------------------ entry points

std::vector<at::Tensor> amm_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const std::optional<at::Tensor>& table,
                                              const std::optional<at::Tensor>& positions,
                                              const std::optional<at::Tensor>& amm_table,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& modulation, double scale,
                                              int64_t rows, int64_t cols) {
  const Geometry g = prepare(q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols);
  // [B, N, H, D] memory, returned as a [B, H, N, D] view (edt_kernels.ops._attention_op._empty_like_out).
  at::Tensor out = at::empty({g.B, g.N, g.H, g.D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({g.B, g.H, g.N}, q.options().dtype(at::kFloat));
  if (q.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "amm_attention_fwd_cpu",
                                    [&] { forward_impl<scalar_t>(g, q, k, v, out, lse); });
  }
  return {out, lse};
}

std::vector<at::Tensor> amm_attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                              const std::optional<at::Tensor>& table,
                                              const std::optional<at::Tensor>& positions,
                                              const std::optional<at::Tensor>& amm_table,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& modulation, double scale,
                                              int64_t rows, int64_t cols, bool need_dtable, bool need_dbias) {
  const Geometry g = prepare(q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols);
  check_qkv(dout, "dout", q);
  check_qkv(out, "out", q);
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == g.B &&
                  lse.size(1) == g.H && lse.size(2) == g.N,
              "edt_kernels cpp amm_attention: lse must be a float32 CPU [B, H, N] tensor, got ", lse.sizes(), " ",
              lse.scalar_type());
  need_dtable = need_dtable && table.has_value() && table->defined();
  need_dbias = need_dbias && bias.has_value() && bias->defined();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const auto f32 = q.options().dtype(at::kFloat);
  const auto dtable_opts = q.scalar_type() == at::kDouble ? q.options() : f32;
  at::Tensor dtable = need_dtable ? at::zeros(table->sizes(), dtable_opts) : at::empty({0}, f32);
  at::Tensor dbias = need_dbias ? at::empty(bias->sizes(), f32) : at::empty({0}, f32);
  if (need_dbias)
    TORCH_CHECK(bias->dim() == 4, "edt_kernels cpp amm_attention: bias must be 4-d, got ", bias->sizes());
  if (q.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "amm_attention_bwd_cpu", [&] {
      backward_impl<scalar_t>(g, dout, q, k, v, out, lse, dq, dk, dv, need_dtable ? &dtable : nullptr,
                              need_dbias ? &dbias : nullptr);
    });
  } else if (need_dbias) {
    dbias.zero_();
  }
  return {dq, dk, dv, dtable, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(edt_kernels_cpp, CPU, m) {
  m.impl("amm_attention_fwd", &amm_attention_fwd_cpu);
  m.impl("amm_attention_bwd", &amm_attention_bwd_cpu);
}

}  // namespace edt_kernels
