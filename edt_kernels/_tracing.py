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


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def runs_eagerly(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` runs plainly: not traced by torch.compile, under no
    dispatch mode (fake tensors, export, counters), no functorch transform (vmap,
    grad) and ``t`` no tensor subclass.  Then an op may call its
    ``torch.autograd.Function`` and kernels directly instead of its custom op
    (same kernels, same results, less host work per call); anywhere else the custom
    op, with its fake kernel, is what runs."""
    return (type(t) in _PLAIN_TENSORS and not torch.compiler.is_compiling()
            and not torch._C._len_torch_dispatch_stack()
            and torch._C._functorch.peek_interpreter_stack() is None)
