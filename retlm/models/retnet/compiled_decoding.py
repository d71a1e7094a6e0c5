"""The compiled decoding step: ``torch.compile`` of a model's one-token step, its weights frozen in.

Why freeze: at batch 1 a decoding step is a chain of matrix-vector products, one per weight matrix,
and on CPU their cost is how fast the weights stream from memory. Inductor's CPU GEMM template
(``max_autotune`` with the ``CPP`` backend) packs each weight once into a blocked layout and generates
a micro-kernel for it; on the project's 2-core AMD EPYC box that runs a step's products 2-3x faster
than the MKL calls of eager PyTorch (docs/benchmarks.md). Packing needs the weights to be constants
of the compiled graph, which is inductor's ``freezing``.

Frozen weights are copies: an in-place change to a parameter (an optimizer step, ``load_state_dict``)
would not reach them. So the step remembers every parameter's and buffer's version counter and
compiles again, with the new values, when one has moved; torch's own guards catch a replaced
parameter or module. The packed copies add about one copy of the weight matrices to the model's
memory while compiled decoding is on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import nn

logger = logging.getLogger(__name__)

# Inductor options of the frozen step: autotune each product between the generated CPU GEMM kernel and
# ATen's, keeping the faster (the tuning runs once, in the first step).
FROZEN_STEP_OPTIONS: dict[str, Any] = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


class FrozenWeightsStep:
    """``torch.compile(step, **compile_kwargs)`` with ``module``'s weights frozen into the compiled code,
    recompiled when any of them changes in place. Call it as ``step`` would be called.

    Freezing applies only without autograd (the decoding path); with autograd enabled torch compiles
    an ordinary graph that reads the live weights.
    """

    def __init__(self, step: Callable[..., Any], module: nn.Module, **compile_kwargs: Any) -> None:
        self.step = step
        self.module = module
        self.arguments = compile_kwargs  # as given
        self.gemm_template = True  # FROZEN_STEP_OPTIONS on; off once the template failed to compile
        self.compiled: Callable[..., Any] | None = None
        self.tensors: list[torch.Tensor] = []
        self.versions: list[int] = []
        self.compilations = 0

    def torch_compile_arguments(self) -> dict[str, Any]:
        """The caller's arguments, with this class's options under the caller's own."""
        ours = FROZEN_STEP_OPTIONS if self.gemm_template else {}
        return {**self.arguments, "options": {**ours, **self.arguments.get("options", {})}}

    def current_versions(self) -> list[int]:
        return [tensor._version for tensor in self.tensors]

    def compile(self) -> None:
        """A fresh ``torch.compile``, traced and compiled at the next call from the weights as they are
        then. torch keeps compiled graphs per code object (here every model's ``step``), up to a small
        limit before it falls back to eager; they are dropped first, with their packed weights (another
        model's compiled step then compiles again at its next call)."""
        reset_code = getattr(torch._dynamo, "reset_code", None)  # not in every torch release
        code = getattr(self.step, "__code__", None)
        if reset_code is not None and code is not None:
            reset_code(code)
        self.compiled = torch.compile(self.step, **self.torch_compile_arguments())
        self.tensors = [*self.module.parameters(), *self.module.buffers()]
        self.versions = self.current_versions()
        self.compilations += 1

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            self.compile()
        elif self.current_versions() != self.versions:
            logger.info("the weights changed since the decoding step was compiled: compiling it again")
            self.compile()
        try:
            return self.call_frozen(*args)
        except torch._dynamo.exc.BackendCompilerFailed:
            given = self.arguments.get("options", {})
            if not (self.gemm_template and any(key not in given for key in FROZEN_STEP_OPTIONS)):
                raise  # nothing of ours to leave out
            self.gemm_template = False
            # Seen with torch 2.6, whose template emits C++ that does not compile on this box.
            logger.warning(
                "inductor's CPU GEMM template failed to compile here; compiling the decoding step "
                "without it (frozen weights, ATen's matrix products)"
            )
            self.compile()
            return self.call_frozen(*args)

    def call_frozen(self, *args: Any) -> Any:
        # Read by Dynamo while tracing and by inductor while compiling, i.e. inside this call; set only
        # for its length so that the caller's other compilations are not frozen.
        frozen = inductor_config.freezing
        inductor_config.freezing = True
        try:
            return self.compiled(*args)
        finally:
            inductor_config.freezing = frozen
