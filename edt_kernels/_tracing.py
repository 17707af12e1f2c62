"""Whether the current call is being traced (torch.compile) or captured (CUDA
graphs): validation that reads tensor values (a host sync) is skipped then;
the kernels never read or write out of range either way.  And what a traced
call of a cached look-up becomes: a constant of the graph
(:func:`constant_while_traced`)."""
import functools
import itertools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


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


class _GraphConstants:
    """One function per traced call of a :func:`constant_while_traced` function, returning the
    value that call made (see there)."""


_constant_names = itertools.count()


def constant_while_traced(fn: F) -> F:
    """``fn`` unchanged when called eagerly.  A call that torch.compile traces runs ``fn``
    eagerly, once, when the graph is traced, and the graph holds its result as a constant,
    with no guard on the state ``fn`` read.

    For look-ups whose answer depends only on the arguments for the life of the process:
    tables cached on a device, the C++ extension's availability.  Traced through, such a
    cache costs a recompile when it fills (Dynamo guards on its contents) or is skipped (a
    ``functools.lru_cache``), and the graph then rebuilds the table, on the host and copied
    to the device, on every call; Dynamo cannot trace a build, a lock or a file-system check
    at all.  The arguments must be Python constants (a cached tensor is not copied: ``fn``'s
    own cache decides what is made once).

    Each traced call defines a function of its own, under a new name, that returns the value
    (``torch.compiler.assume_constant_result``): a constant tensor becomes an attribute of the
    graph named after the function that made it, and torch.compile's AOT stage refuses one
    graph with two constants of the same name."""

    def define(*args, **kwargs) -> str:
        value = fn(*args, **kwargs)
        name = f"{getattr(fn, '__name__', 'constant')}_{next(_constant_names)}"

        def constant():
            return value

        constant.__code__ = constant.__code__.replace(co_name=name)  # the name Dynamo uses
        constant.__name__ = constant.__qualname__ = name
        setattr(_GraphConstants, name, staticmethod(torch.compiler.assume_constant_result(constant)))
        return name

    define_while_traced = torch.compiler.assume_constant_result(define)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return getattr(_GraphConstants, define_while_traced(*args, **kwargs))()
        return fn(*args, **kwargs)

    return call  # type: ignore[return-value]
