// Operator schemas of the edt_kernels C++/CUDA extension (namespace
// `edt_kernels_cpp`; the Python custom ops of edt_kernels wrap these).  The
// token schemas are those of edt_kernels/ops/tokens.py, so that these kernels
// can be registered as implementations of edt_kernels::* ops.
//
// The kernels are registered per device in amm_attention_cpu.cpp,
// tokens_cpu.cpp and tokens_cuda.cu.  There are no pybind11 bindings: the
// operators are reached through torch.ops.edt_kernels_cpp.*, which keeps this
// extension quick to compile (no <torch/extension.h>).
#include "cpu_kernels.h"  // first: it selects at::vec's instruction set

#include <Python.h>
#include <torch/library.h>

#include <string>

#define EDT_KERNELS_CONCAT_(a, b) a##b
#define EDT_KERNELS_CONCAT(a, b) EDT_KERNELS_CONCAT_(a, b)
#define EDT_KERNELS_STR_(a) #a
#define EDT_KERNELS_STR(a) EDT_KERNELS_STR_(a)

// Hash of the sources this library was built from (an identifier written to a
// generated header by edt_kernels/_ext.py and edt_kernels_build.py; the loader finds it in the
// binary to tell whether a prebuilt library is stale).
#ifdef EDT_KERNELS_HAVE_HASH_HEADER
#include "edt_kernels_src_hash.h"
#endif
#ifndef EDT_KERNELS_SRC_HASH
#define EDT_KERNELS_SRC_HASH edt_kernels_src_unknown
#endif

namespace {
std::string source_hash() { return EDT_KERNELS_STR(EDT_KERNELS_SRC_HASH); }
// Which GEMM the CPU attention kernels use: "blas" (the sgemm/dgemm libtorch
// exports) or "micro-kernel" (none exported, or EDT_KERNELS_CPU_BLAS=0).
std::string cpu_gemm() { return edt_kernels::cpu::have_blas_gemm() ? "blas" : "micro-kernel"; }
}  // namespace

TORCH_LIBRARY(edt_kernels_cpp, m) {
  m.def("source_hash() -> str", &source_hash);
  m.def("cpu_gemm() -> str", &cpu_gemm);
  m.def(
      "amm_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? table, Tensor? positions, Tensor? amm_table, "
      "Tensor? bias, Tensor? modulation, float scale, int rows, int cols) -> Tensor[]");
  m.def(
      "amm_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? table, "
      "Tensor? positions, Tensor? amm_table, Tensor? bias, Tensor? modulation, float scale, int rows, int cols, "
      "bool need_dtable, bool need_dbias) -> Tensor[]");
  // out[b, k] = x[b, ids[b, k]]: [B, L, C], [B, K] -> [B, K, C]
  m.def("gather_tokens(Tensor x, Tensor ids) -> Tensor");
  // out[b, ids[b, k]] = y[b, k], zeros elsewhere: [B, K, C] -> [B, length, C]
  m.def("scatter_tokens(Tensor y, Tensor ids, SymInt length) -> Tensor");
  // out[b, l] = (ids_restore[b, l] in [0, K) ? x_kept[b, ids_restore[b, l]] : mask_token) + pos_embed[0, l]
  m.def("unshuffle_with_mask_token(Tensor x_kept, Tensor ids_restore, Tensor mask_token, Tensor? pos_embed) -> Tensor");
  // -> dx_kept [B, K, C] (dout's dtype), dmask_token [1, 1, C] float32, dpos_embed [1, L, C] float32 (or [0])
  m.def(
      "unshuffle_with_mask_token_backward(Tensor dout, Tensor ids_restore, SymInt len_keep, bool need_dpos) "
      "-> (Tensor, Tensor, Tensor)");
}

// Importable as a Python module too (setup.py builds it as an extension
// module); importing only loads the library, which registers the operators.
#ifdef TORCH_EXTENSION_NAME
PyMODINIT_FUNC EDT_KERNELS_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, EDT_KERNELS_STR(TORCH_EXTENSION_NAME),
                                   "edt_kernels C++ operators (torch.ops.edt_kernels_cpp)", -1, nullptr};
  return PyModule_Create(&def);
}
#endif
