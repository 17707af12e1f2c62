"""edt-kernels benchmarks: ``pytest benchmarks/ --benchmark-only`` or
``python -m benchmarks.<module> --help`` (each module has a ``main``)."""
