"""edt: the EDT and MDTv2 diffusion transformers on ``edt_kernels``, with the
diffusion process, training and sampling.

    >>> from edt.models import EDT_models, MDTv2_models, create_model
"""
from .models import EDT_models, MDTv2_models, create_model  # noqa: F401
