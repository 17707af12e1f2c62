// CPU token gather / scatter of masked diffusion training (MDT / EDT),
// the kernels behind the schemas of edt_kernels/ops/tokens.py:
//
//   gather_tokens(x [B, L, C], ids [B, K])            -> out[b, k] = x[b, ids[b, k]]
//   scatter_tokens(y [B, K, C], ids [B, K], L)        -> out[b, ids[b, k]] = y[b, k], zeros elsewhere
//   unshuffle_with_mask_token(x_kept [B, K, C], ids_restore [B, L], mask_token [1, 1, C], pos_embed [1, L, C]?)
//       -> out[b, l] = (r = ids_restore[b, l]) in [0, K) ? x_kept[b, r] : mask_token, + pos_embed[l]
//   unshuffle_with_mask_token_backward(dout, ids_restore, len_keep, need_dpos)
//       -> dx_kept[b, r] = dout[b, l] for r in [0, K) (dout's dtype); dmask_token [1, 1, C] float32 =
//          sum of dout over the other rows; dpos_embed [1, L, C] float32 = sum_b dout (or [0])
//
// Every output row is written exactly once (scatter goes through the inverse
// index, so there is no zero-fill pass).  Like the Triton kernels, these ops
// do not validate index *values* (the public functions do): an index outside
// its range is never dereferenced; its row reads as zeros / the mask token.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace edt_kernels {
namespace {

// Copy one row of C elements of `esize` bytes (source may be strided).
inline void copy_row(const char* src, int64_t src_stride, char* dst, int64_t C, int64_t esize) {
  if (src_stride == 1) {
    std::memcpy(dst, src, static_cast<size_t>(C * esize));
    return;
  }
  for (int64_t c = 0; c < C; ++c) std::memcpy(dst + c * esize, src + c * src_stride * esize, esize);
}

// Index tensor as int64, contiguous (copied only when int32 or strided).
at::Tensor check_index(const at::Tensor& ids, const char* name, int64_t B) {
  TORCH_CHECK_VALUE(ids.device().is_cpu(), name, " must be a CPU tensor, got ", ids.device());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, name,
                   " must be int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == B, name, " must be [B, *] with B = ", B, ", got ",
                    ids.sizes());
  return ids.to(at::kLong).contiguous();
}

void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 3, name, " must be [B, L, C], got ", x.sizes());
}

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& ids_in) {
  check_x(x, "x");
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  const at::Tensor ids = check_index(ids_in, "ids", B);
  const int64_t K = ids.size(1);
  at::Tensor out = at::empty({B, K, C}, x.options());
  const int64_t es = x.element_size();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t sb = x.stride(0), sl = x.stride(1), sc = x.stride(2);
  at::parallel_for(0, B * K, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / K, id = ip[r];
      if (id >= 0 && id < L)
        copy_row(xp + (b * sb + id * sl) * es, sc, op + r * C * es, C, es);
      else
        std::memset(op + r * C * es, 0, static_cast<size_t>(C * es));
    }
  });
  return out;
}

at::Tensor scatter_tokens_cpu(const at::Tensor& y, const at::Tensor& ids_in, int64_t length) {
  check_x(y, "y");
  const int64_t B = y.size(0), K = y.size(1), C = y.size(2), L = length;
  TORCH_CHECK_VALUE(L >= 0, "length must be >= 0, got ", L);
  const at::Tensor ids = check_index(ids_in, "ids", B);
  TORCH_CHECK_VALUE(ids.size(1) == K, "ids must be [B, K] = [", B, ", ", K, "], got ", ids.sizes());
  // inverse index: inv[b, l] = k with ids[b, k] = l, or -1
  std::vector<int64_t> inv(static_cast<size_t>(B * L), -1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k)
      if (ip[b * K + k] >= 0 && ip[b * K + k] < L) inv[b * L + ip[b * K + k]] = k;
  at::Tensor out = at::empty({B, L, C}, y.options());
  const int64_t es = y.element_size();
  const char* yp = static_cast<const char*>(y.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t sb = y.stride(0), sk = y.stride(1), sc = y.stride(2);
  at::parallel_for(0, B * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t k = inv[r], b = r / L;
      if (k >= 0)
        copy_row(yp + (b * sb + k * sk) * es, sc, op + r * C * es, C, es);
      else
        std::memset(op + r * C * es, 0, static_cast<size_t>(C * es));
    }
  });
  return out;
}

template <typename scalar_t>
using acc_t_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

at::Tensor unshuffle_with_mask_token_cpu(const at::Tensor& x_kept_in, const at::Tensor& ids_restore_in,
                                         const at::Tensor& mask_token_in,
                                         const std::optional<at::Tensor>& pos_embed_in) {
  check_x(x_kept_in, "x_kept");
  const int64_t B = x_kept_in.size(0), K = x_kept_in.size(1), C = x_kept_in.size(2);
  TORCH_CHECK_VALUE(ids_restore_in.dim() == 2, "ids_restore must be [B, L], got ", ids_restore_in.sizes());
  const int64_t L = ids_restore_in.size(1);
  TORCH_CHECK_VALUE(L >= K, "ids_restore has L = ", L, " < K = ", K, " kept tokens");
  const at::Tensor ids = check_index(ids_restore_in, "ids_restore", B);
  TORCH_CHECK_VALUE(mask_token_in.device().is_cpu() && mask_token_in.numel() == C,
                    "mask_token must be a CPU tensor of C = ", C, " elements ([1, 1, C]), got ",
                    mask_token_in.sizes());
  auto dtype = c10::promoteTypes(x_kept_in.scalar_type(), mask_token_in.scalar_type());
  const bool has_pos = pos_embed_in.has_value() && pos_embed_in->defined();
  if (has_pos) {
    const auto& p = *pos_embed_in;
    TORCH_CHECK_VALUE(p.device().is_cpu() && p.numel() == L * C && p.size(-1) == C,
                      "pos_embed must be a CPU [1, L, C] = [1, ", L, ", ", C, "] tensor, got ", p.sizes());
    dtype = c10::promoteTypes(dtype, p.scalar_type());
  }
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "unshuffle_with_mask_token needs floating-point inputs, got ", dtype);
  const at::Tensor x_kept = x_kept_in.scalar_type() == dtype ? x_kept_in : x_kept_in.to(dtype);
  const at::Tensor mask = mask_token_in.to(dtype).contiguous().reshape({C});
  const at::Tensor pos = has_pos ? pos_embed_in->to(dtype).contiguous().reshape({L, C}) : at::Tensor();
  at::Tensor out = at::empty({B, L, C}, x_kept.options());
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t sb = x_kept.stride(0), sk = x_kept.stride(1), sc = x_kept.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unshuffle_with_mask_token_cpu", [&] {
    using acc_t = acc_t_of<scalar_t>;
    const scalar_t* xp = x_kept.data_ptr<scalar_t>();
    const scalar_t* mp = mask.data_ptr<scalar_t>();
    const scalar_t* pp = has_pos ? pos.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * L, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / L, l = row % L, r = ip[row];
        const bool kept = r >= 0 && r < K;
        const scalar_t* src = kept ? xp + b * sb + r * sk : mp;
        const int64_t s = kept ? sc : 1;
        scalar_t* o = op + row * C;
        if (pp) {
          const scalar_t* pr = pp + l * C;
          for (int64_t c = 0; c < C; ++c)
            o[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c * s]) + static_cast<acc_t>(pr[c]));
        } else {
          for (int64_t c = 0; c < C; ++c) o[c] = src[c * s];
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_with_mask_token_backward_cpu(
    const at::Tensor& dout, const at::Tensor& ids_restore_in, int64_t K, bool need_dpos) {
  check_x(dout, "dout");
  const int64_t B = dout.size(0), L = dout.size(1), C = dout.size(2);
  TORCH_CHECK_VALUE(K >= 0 && K <= L, "len_keep must be in [0, L = ", L, "], got ", K);
  const at::Tensor ids = check_index(ids_restore_in, "ids_restore", B);
  TORCH_CHECK_VALUE(ids.size(1) == L, "ids_restore must be [B, L] = [", B, ", ", L, "], got ", ids.sizes());
  TORCH_CHECK_TYPE(dout.is_floating_point(), "dout must be floating point, got ", dout.scalar_type());
  // inverse: src[b, k] = l with ids_restore[b, l] = k in [0, K) (rows without a source get zeros)
  std::vector<int64_t> src(static_cast<size_t>(B * K), -1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) {
      const int64_t r = ip[b * L + l];
      if (r >= 0 && r < K) src[b * K + r] = l;
    }
  const auto f32 = dout.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({B, K, C}, dout.options());
  at::Tensor dmask = at::empty({1, 1, C}, f32);
  at::Tensor dpos = need_dpos ? at::empty({1, L, C}, f32) : at::empty({0}, f32);
  const int64_t sb = dout.stride(0), sl = dout.stride(1), sc = dout.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dout.scalar_type(), "unshuffle_backward_cpu", [&] {
    using acc_t = acc_t_of<scalar_t>;
    const scalar_t* dp = dout.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    // dx_kept rows (one write each)
    at::parallel_for(0, B * K, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / K, l = src[row];
        scalar_t* o = dxp + row * C;
        if (l < 0) {
          std::fill(o, o + C, scalar_t(0));
          continue;
        }
        const scalar_t* s = dp + b * sb + l * sl;
        for (int64_t c = 0; c < C; ++c) o[c] = s[c * sc];
      }
    });
    // Reductions over the batch: chunk t owns rows [t L / T, (t+1) L / T) of
    // dpos and a private mask-token partial sum, combined in a fixed order.
    const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), L));
    std::vector<std::vector<acc_t>> mask_part(static_cast<size_t>(T), std::vector<acc_t>(C, acc_t(0)));
    float* dposp = need_dpos ? dpos.data_ptr<float>() : nullptr;
    at::parallel_for(0, T, 1, [&](int64_t cb, int64_t ce) {
      std::vector<acc_t> pos_acc(static_cast<size_t>(C));
      for (int64_t t = cb; t < ce; ++t) {
        acc_t* mp = mask_part[t].data();
        for (int64_t l = t * L / T; l < (t + 1) * L / T; ++l) {
          std::fill(pos_acc.begin(), pos_acc.end(), acc_t(0));
          for (int64_t b = 0; b < B; ++b) {
            const scalar_t* s = dp + b * sb + l * sl;
            const int64_t r = ip[b * L + l];
            const bool masked = r < 0 || r >= K;
            if (need_dpos)
              for (int64_t c = 0; c < C; ++c) pos_acc[c] += static_cast<acc_t>(s[c * sc]);
            if (masked)
              for (int64_t c = 0; c < C; ++c) mp[c] += static_cast<acc_t>(s[c * sc]);
          }
          if (dposp)
            for (int64_t c = 0; c < C; ++c) dposp[l * C + c] = static_cast<float>(pos_acc[c]);
        }
      }
    });
    float* o = dmask.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) {
      acc_t s = 0;
      for (int64_t t = 0; t < T; ++t) s += mask_part[t][c];
      o[c] = static_cast<float>(s);
    }
  });
  return {dx, dmask, dpos};
}

}  // namespace

TORCH_LIBRARY_IMPL(edt_kernels_cpp, CPU, m) {
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("scatter_tokens", &scatter_tokens_cpu);
  m.impl("unshuffle_with_mask_token", &unshuffle_with_mask_token_cpu);
  m.impl("unshuffle_with_mask_token_backward", &unshuffle_with_mask_token_backward_cpu);
}

}  // namespace edt_kernels
