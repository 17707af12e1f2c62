// CUDA token gather / scatter of masked diffusion training (MDT / EDT):
// the kernels behind the schemas of edt_kernels/ops/tokens.py (same semantics
// as csrc/tokens_cpu.cpp):
//
//   gather_tokens(x [B, L, C], ids [B, K])           out[b, k] = x[b, ids[b, k]]
//   scatter_tokens(y [B, K, C], ids [B, K], L)       out[b, ids[b, k]] = y[b, k], zeros elsewhere
//   unshuffle_with_mask_token(x_kept, ids_restore [B, L], mask_token [1, 1, C], pos_embed [1, L, C]?)
//   unshuffle_with_mask_token_backward(dout, ids_restore, len_keep, need_dpos)
//
// One pass over the rows: every output row is written once (the scatter first
// inverts its [B, K] index into a [B, L] int32 map, which is tiny next to the
// rows), and rows move as 16-byte words where the row length, the base
// pointers and the row strides allow (8/4/2/1-byte words otherwise).  The
// unshuffle backward reads dout once and writes dx_kept plus deterministic
// per-chunk partial sums for the mask-token and pos-embed gradients.
//
// No validation of index values (the public Python functions do that; these
// kernels also run under CUDA graphs): an out-of-range index is never
// dereferenced, its row reads as zeros / the mask token.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

// Source hash of this build (see csrc/ops.cpp), kept in the binary so that
// edt_kernels/_ext.py can tell a stale prebuilt library.
#ifdef EDT_KERNELS_HAVE_HASH_HEADER
#include "edt_kernels_src_hash.h"
#define EDT_KERNELS_CUDA_STR_(a) #a
#define EDT_KERNELS_CUDA_STR(a) EDT_KERNELS_CUDA_STR_(a)
extern "C" __attribute__((used)) const char edt_kernels_cuda_source_hash[] =
    EDT_KERNELS_CUDA_STR(EDT_KERNELS_SRC_HASH);
#endif

namespace edt_kernels {
namespace {

constexpr int kThreads = 256;

// Largest power of two <= 16 dividing every value (bytes).
int64_t common_alignment(std::initializer_list<int64_t> values) {
  int64_t a = 16;
  for (int64_t v : values)
    while (a > 1 && v % a != 0) a /= 2;
  return a;
}

// Calls f(Word{}) with the widest word type the alignment allows.
template <typename F>
void with_word(int64_t align, F&& f) {
  if (align >= 16)
    f(uint4{});
  else if (align >= 8)
    f(uint2{});
  else if (align >= 4)
    f(uint32_t{});
  else if (align >= 2)
    f(uint16_t{});
  else
    f(uint8_t{});
}

// Threads of a block: x over the words of a row, y over rows.
dim3 block_for(int64_t words) {
  int tx = 32;
  while (tx < words && tx < kThreads) tx *= 2;
  return dim3(tx, kThreads / tx);
}

unsigned grid_for(int64_t rows, unsigned rows_per_block) {
  const int64_t g = (rows + rows_per_block - 1) / rows_per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(g, int64_t(1) << 20)));
}

// out[b, o] = 0 <= idx[b, o] < n_src ? src[b, idx[b, o]] : (fill ? fill : 0), o < n_out.
// Strides are in words.
template <typename W, typename index_t>
__global__ void copy_rows_kernel(const W* __restrict__ src, int64_t src_sb, int64_t src_sr,
                                 const index_t* __restrict__ idx, int64_t idx_sb, int64_t idx_so,
                                 const W* __restrict__ fill, W* __restrict__ out, int64_t B, int64_t n_out,
                                 int64_t n_src, int64_t words) {
  const int64_t rows = B * n_out;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t b = row / n_out, o = row - b * n_out;
    const int64_t r = static_cast<int64_t>(idx[b * idx_sb + o * idx_so]);
    const W* s = (r >= 0 && r < n_src) ? src + b * src_sb + r * src_sr : fill;
    W* d = out + row * words;
    if (s != nullptr) {
      for (int64_t c = threadIdx.x; c < words; c += blockDim.x) d[c] = s[c];
    } else {
      for (int64_t c = threadIdx.x; c < words; c += blockDim.x) d[c] = W{};
    }
  }
}

// inv[b, ids[b, k]] = k for ids in [0, L); inv starts at -1.
__global__ void invert_kernel(const int64_t* __restrict__ ids, int64_t ids_sb, int64_t ids_sk,
                              int32_t* __restrict__ inv, int64_t B, int64_t K, int64_t L) {
  const int64_t n = B * K;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / K, k = t - b * K;
    const int64_t id = ids[b * ids_sb + k * ids_sk];
    if (id >= 0 && id < L) inv[b * L + id] = static_cast<int32_t>(k);
  }
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// out[b, l] = (kept ? x_kept[b, r] : mask) + pos[l], VEC elements per access.
template <typename scalar_t, int VEC>
__global__ void unshuffle_pos_kernel(const scalar_t* __restrict__ src, int64_t src_sb, int64_t src_sk,
                                     const int64_t* __restrict__ idx, int64_t idx_sb, int64_t idx_sl,
                                     const scalar_t* __restrict__ fill, const scalar_t* __restrict__ pos,
                                     scalar_t* __restrict__ out, int64_t B, int64_t L, int64_t K, int64_t C) {
  using P = Pack<scalar_t, VEC>;
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t rows = B * L, packs = C / VEC;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t b = row / L, l = row - b * L;
    const int64_t r = idx[b * idx_sb + l * idx_sl];
    const P* s = reinterpret_cast<const P*>((r >= 0 && r < K) ? src + b * src_sb + r * src_sk : fill);
    const P* p = reinterpret_cast<const P*>(pos + l * C);
    P* d = reinterpret_cast<P*>(out + row * C);
    for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
      P a = s[c];
      const P e = p[c];
#pragma unroll
      for (int i = 0; i < VEC; ++i) a.v[i] = static_cast<scalar_t>(static_cast<acc_t>(a.v[i]) + static_cast<acc_t>(e.v[i]));
      d[c] = a;
    }
  }
}

// One read of dout: dx[b, r] = dout[b, l] for r in [0, K); partial sums over
// this block's chunk of the batch of dout (pos) and of its masked rows (mask),
// written to [n_chunks, L, C] buffers (float32, float64 for float64 dout),
// reduced afterwards in a fixed order (deterministic).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void unshuffle_bwd_kernel(const scalar_t* __restrict__ dout, int64_t d_sb, int64_t d_sl,
                                     const int64_t* __restrict__ idx, int64_t idx_sb, int64_t idx_sl,
                                     scalar_t* __restrict__ dx, acc_t* __restrict__ mask_part,
                                     acc_t* __restrict__ pos_part, int64_t B, int64_t L, int64_t K, int64_t C,
                                     int64_t b_per_chunk) {
  using P = Pack<scalar_t, VEC>;
  const int64_t l = blockIdx.x, chunk = blockIdx.y;
  const int64_t b0 = chunk * b_per_chunk, b1 = b0 + b_per_chunk < B ? b0 + b_per_chunk : B;
  const int64_t packs = C / VEC;
  for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
    acc_t m[VEC], p[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) m[i] = p[i] = acc_t(0);
    for (int64_t b = b0; b < b1; ++b) {
      const P v = reinterpret_cast<const P*>(dout + b * d_sb + l * d_sl)[c];
      const int64_t r = idx[b * idx_sb + l * idx_sl];
      if (r >= 0 && r < K) {
        reinterpret_cast<P*>(dx + (b * K + r) * C)[c] = v;
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) m[i] += static_cast<acc_t>(v.v[i]);
      }
      if (pos_part != nullptr) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) p[i] += static_cast<acc_t>(v.v[i]);
      }
    }
    acc_t* mo = mask_part + (chunk * L + l) * C + c * VEC;
#pragma unroll
    for (int i = 0; i < VEC; ++i) mo[i] = m[i];
    if (pos_part != nullptr) {
      acc_t* po = pos_part + (chunk * L + l) * C + c * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) po[i] = p[i];
    }
  }
}

void check_cuda(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dims, got ", t.sizes());
}

at::Tensor index_i64(const at::Tensor& ids, const char* name, int64_t B) {
  check_cuda(ids, name, 2);
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, name, " must be int64, got ",
                   ids.scalar_type());
  TORCH_CHECK_VALUE(ids.size(0) == B, name, " must be [B, *] with B = ", B, ", got ", ids.sizes());
  return ids.scalar_type() == at::kLong ? ids : ids.to(at::kLong);
}

// Rows with unit stride along channels (a copy only for channel-strided input).
at::Tensor rows_unit_stride(const at::Tensor& x) { return x.size(2) <= 1 || x.stride(2) == 1 ? x : x.contiguous(); }

template <typename index_t>
void launch_copy_rows(const at::Tensor& src, const at::Tensor& idx, const at::Tensor* fill, at::Tensor& out,
                      int64_t n_src, cudaStream_t stream) {
  const int64_t B = out.size(0), n_out = out.size(1), C = out.size(2);
  if (out.numel() == 0) return;
  const int64_t es = src.element_size();
  const auto sptr = reinterpret_cast<std::uintptr_t>(src.data_ptr());
  const auto optr = reinterpret_cast<std::uintptr_t>(out.data_ptr());
  const auto fptr = fill ? reinterpret_cast<std::uintptr_t>(fill->data_ptr()) : 0;
  const int64_t align = common_alignment({C * es, static_cast<int64_t>(sptr % 16), static_cast<int64_t>(optr % 16),
                                          static_cast<int64_t>(fptr % 16), src.stride(0) * es, src.stride(1) * es});
  with_word(align, [&](auto word) {
    using W = decltype(word);
    const int64_t words = C * es / static_cast<int64_t>(sizeof(W));
    const dim3 block = block_for(words);
    copy_rows_kernel<W, index_t><<<grid_for(B * n_out, block.y), block, 0, stream>>>(
        reinterpret_cast<const W*>(src.data_ptr()), src.stride(0) * es / static_cast<int64_t>(sizeof(W)),
        src.stride(1) * es / static_cast<int64_t>(sizeof(W)), idx.data_ptr<index_t>(), idx.stride(0), idx.stride(1),
        fill ? reinterpret_cast<const W*>(fill->data_ptr()) : nullptr, reinterpret_cast<W*>(out.data_ptr()), B,
        n_out, n_src, words);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor gather_tokens_cuda(const at::Tensor& x_in, const at::Tensor& ids_in) {
  check_cuda(x_in, "x", 3);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_unit_stride(x_in);
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  const at::Tensor ids = index_i64(ids_in, "ids", B);
  at::Tensor out = at::empty({B, ids.size(1), C}, x.options());
  launch_copy_rows<int64_t>(x, ids, nullptr, out, L, c10::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor scatter_tokens_cuda(const at::Tensor& y_in, const at::Tensor& ids_in, int64_t length) {
  check_cuda(y_in, "y", 3);
  const c10::cuda::CUDAGuard guard(y_in.device());
  TORCH_CHECK_VALUE(length >= 0, "length must be >= 0, got ", length);
  const at::Tensor y = rows_unit_stride(y_in);
  const int64_t B = y.size(0), K = y.size(1), C = y.size(2);
  const at::Tensor ids = index_i64(ids_in, "ids", B);
  TORCH_CHECK_VALUE(ids.size(1) == K, "ids must be [B, K] = [", B, ", ", K, "], got ", ids.sizes());
  TORCH_CHECK_VALUE(length < (int64_t(1) << 31) && K < (int64_t(1) << 31), "length and K must be < 2^31");
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor inv = at::empty({B, length}, ids.options().dtype(at::kInt));
  at::Tensor out = at::empty({B, length, C}, y.options());
  if (inv.numel() > 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(inv.data_ptr(), 0xff, inv.numel() * sizeof(int32_t), stream));  // -1
    if (B * K > 0) {
      invert_kernel<<<grid_for(B * K, kThreads), kThreads, 0, stream>>>(ids.data_ptr<int64_t>(), ids.stride(0),
                                                                         ids.stride(1), inv.data_ptr<int32_t>(), B,
                                                                         K, length);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  launch_copy_rows<int32_t>(y, inv, nullptr, out, K, stream);
  return out;
}

at::Tensor unshuffle_with_mask_token_cuda(const at::Tensor& x_kept_in, const at::Tensor& ids_restore_in,
                                          const at::Tensor& mask_token, const std::optional<at::Tensor>& pos_embed) {
  check_cuda(x_kept_in, "x_kept", 3);
  const c10::cuda::CUDAGuard guard(x_kept_in.device());
  const int64_t B = x_kept_in.size(0), K = x_kept_in.size(1), C = x_kept_in.size(2);
  const at::Tensor ids = index_i64(ids_restore_in, "ids_restore", B);
  const int64_t L = ids.size(1);
  TORCH_CHECK_VALUE(mask_token.is_cuda() && mask_token.numel() == C, "mask_token must be a CUDA [1, 1, C] = [1, 1, ",
                    C, "] tensor, got ", mask_token.sizes());
  auto dtype = c10::promoteTypes(x_kept_in.scalar_type(), mask_token.scalar_type());
  const bool has_pos = pos_embed.has_value() && pos_embed->defined();
  if (has_pos) {
    TORCH_CHECK_VALUE(pos_embed->is_cuda() && pos_embed->numel() == L * C, "pos_embed must be a CUDA [1, L, C] = [1, ",
                      L, ", ", C, "] tensor, got ", pos_embed->sizes());
    dtype = c10::promoteTypes(dtype, pos_embed->scalar_type());
  }
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "unshuffle_with_mask_token needs floating-point inputs, got ", dtype);
  const at::Tensor x_kept = rows_unit_stride(x_kept_in.scalar_type() == dtype ? x_kept_in : x_kept_in.to(dtype));
  const at::Tensor fill = mask_token.to(dtype).reshape({C}).contiguous();
  at::Tensor out = at::empty({B, L, C}, x_kept.options());
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (!has_pos) {
    launch_copy_rows<int64_t>(x_kept, ids, &fill, out, K, stream);
    return out;
  }
  const at::Tensor pos = pos_embed->to(dtype).reshape({L, C}).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unshuffle_with_mask_token_cuda", [&] {
    const int64_t es = sizeof(scalar_t);
    const int64_t align = common_alignment(
        {C * es, static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(x_kept.data_ptr()) % 16),
         static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(fill.data_ptr()) % 16),
         static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(pos.data_ptr()) % 16),
         static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(out.data_ptr()) % 16), x_kept.stride(0) * es,
         x_kept.stride(1) * es});
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const dim3 block = block_for(C / VEC);
      unshuffle_pos_kernel<scalar_t, VEC><<<grid_for(B * L, block.y), block, 0, stream>>>(
          x_kept.data_ptr<scalar_t>(), x_kept.stride(0), x_kept.stride(1), ids.data_ptr<int64_t>(), ids.stride(0),
          ids.stride(1), fill.data_ptr<scalar_t>(), pos.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, L, K, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (align >= 16)
      launch(std::integral_constant<int, kVec>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_with_mask_token_backward_cuda(const at::Tensor& dout_in,
                                                                                        const at::Tensor& ids_restore,
                                                                                        int64_t K, bool need_dpos) {
  check_cuda(dout_in, "dout", 3);
  const c10::cuda::CUDAGuard guard(dout_in.device());
  const at::Tensor dout = rows_unit_stride(dout_in);
  const int64_t B = dout.size(0), L = dout.size(1), C = dout.size(2);
  TORCH_CHECK_VALUE(K >= 0 && K <= L, "len_keep must be in [0, L = ", L, "], got ", K);
  const at::Tensor ids = index_i64(ids_restore, "ids_restore", B);
  TORCH_CHECK_VALUE(ids.size(1) == L, "ids_restore must be [B, L] = [", B, ", ", L, "], got ", ids.sizes());
  const auto f32 = dout.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({B, K, C}, dout.options());
  if (B == 0 || L == 0 || C == 0) {
    at::Tensor dmask = at::empty({1, 1, C}, f32).zero_();
    at::Tensor dpos = need_dpos ? at::empty({1, L, C}, f32).zero_() : at::empty({0}, f32);
    return {dx, dmask, dpos};
  }
  // Batch chunks: enough blocks to fill the GPU, partial buffers small next to dout.
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(B, (2048 + L - 1) / L));
  const int64_t b_per_chunk = (B + n_chunks - 1) / n_chunks;
  const int64_t chunks = (B + b_per_chunk - 1) / b_per_chunk;
  const auto acc_opts = dout.options().dtype(dout.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor mask_part = at::empty({chunks, L, C}, acc_opts);
  at::Tensor pos_part = need_dpos ? at::empty({chunks, L, C}, acc_opts) : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dout.scalar_type(), "unshuffle_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const int64_t es = sizeof(scalar_t);
    const int64_t align =
        common_alignment({C * es, static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(dout.data_ptr()) % 16),
                          static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(dx.data_ptr()) % 16),
                          dout.stride(0) * es, dout.stride(1) * es});
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int64_t packs = C / VEC;
      const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (packs + 31) / 32 * 32)));
      unshuffle_bwd_kernel<scalar_t, acc_t, VEC><<<dim3(static_cast<unsigned>(L), static_cast<unsigned>(chunks)), threads, 0,
                                            stream>>>(
          dout.data_ptr<scalar_t>(), dout.stride(0), dout.stride(1), ids.data_ptr<int64_t>(), ids.stride(0),
          ids.stride(1), dx.data_ptr<scalar_t>(), mask_part.data_ptr<acc_t>(),
          need_dpos ? pos_part.data_ptr<acc_t>() : nullptr, B, L, K, C, b_per_chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (align >= 16)
      launch(std::integral_constant<int, kVec>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  at::Tensor dmask = at::sum(mask_part, {0, 1}).to(at::kFloat).reshape({1, 1, C});
  at::Tensor dpos = need_dpos ? at::sum(pos_part, {0}).to(at::kFloat).reshape({1, L, C}) : at::empty({0}, f32);
  return {dx, dmask, dpos};
}

}  // namespace

TORCH_LIBRARY_IMPL(edt_kernels_cpp, CUDA, m) {
  m.impl("gather_tokens", &gather_tokens_cuda);
  m.impl("scatter_tokens", &scatter_tokens_cuda);
  m.impl("unshuffle_with_mask_token", &unshuffle_with_mask_token_cuda);
  m.impl("unshuffle_with_mask_token_backward", &unshuffle_with_mask_token_backward_cuda);
}

}  // namespace edt_kernels
