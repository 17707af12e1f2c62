"""Whether the current call is being traced (torch.compile) or captured (CUDA
graphs): validation that reads tensor values (a host sync) is skipped then;
the kernels never read or write out of range either way."""
import torch


def is_tracing() -> bool:
    try:
        if torch.compiler.is_compiling():
            return True
    except AttributeError:  # pragma: no cover - old torch
        pass
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
