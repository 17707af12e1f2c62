"""Static profiles of the Triton kernels, no timing: ``python -m benchmarks.profiling.sm90_profile``
compiles every kernel for sm_90 without a GPU (``sm90_compile``) and reads registers, spills, shared
memory and the instruction mix; ``gather_locality`` counts the bias-table lines a kernel's gather
touches."""
