"""RetNet's decoding path: one token per step, each block's ``step`` called directly, optionally
compiled (:meth:`RetNetDecodingMixin.compile_decoding`).

A decoding step of a small model costs per-call overhead more than arithmetic, so one-token recurrent
steps without padding or autograd skip the general path: the position tables are built once for all
blocks, and :meth:`RetNetDecodingMixin.layer_steps` calls every block's ``step`` in turn. The result
is the general path's, bit for bit (``tests/models/test_retnet_decode_fastpath.py``).

The compiled step: ``torch.compile`` of ``layer_steps``, the weights frozen in
(:class:`FrozenWeightsStep`). Why freeze: at batch 1 a decoding step is a chain of matrix-vector
products, one per weight matrix, and on CPU their cost is how fast the weights stream from memory.
Inductor's CPU GEMM template (``max_autotune`` with the ``CPP`` backend) packs each weight once into a
blocked layout and generates a micro-kernel for it; on the project's 2-core AMD EPYC box that runs a
step's products 2-3x faster than the MKL calls of eager PyTorch (docs/benchmarks.md). Packing needs the
weights to be constants of the compiled graph, which is inductor's ``freezing``.

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
from torch import Tensor, nn

from retlm.layers.retention import RetentionState, StepTables, step_dtype
from retlm.models.retnet.cache import RetNetCache

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


class RetNetDecodingMixin:
    """The one-token decoding path of :class:`~retlm.models.retnet.RetNetModel` (``self.layers``, its
    blocks; ``decoder_layer_class``, the block type whose ``step`` mirrors its ``forward``)."""

    layers: nn.ModuleList
    decoder_layer_class: type[nn.Module]
    _compiled_layer_steps: Callable[..., Any] | None = None
    _frozen_step: FrozenWeightsStep | None = None

    def takes_step_path(
        self, retention_mode: str, seq_len: int, mask: Tensor | None, output_hidden_states: bool
    ) -> bool:
        """Whether this call runs :meth:`decode_step_layers`: one recurrent token without padding, in eval
        without autograd, no hidden states asked for, and blocks that run as their ``step``."""
        return (
            retention_mode == "recurrent" and seq_len == 1 and mask is None and not output_hidden_states
            and not self.training and not torch.is_grad_enabled() and self.blocks_are_plain()
        )  # fmt: skip

    def blocks_are_plain(self) -> bool:
        """Whether calling every block's ``step`` does what calling the block would. ``step`` bypasses
        ``nn.Module.__call__``, so a block that is not a plain ``decoder_layer_class`` (a wrapper or
        subclass with its own ``forward``) or that has forward hooks keeps the general path."""
        forward = self.decoder_layer_class.forward
        return len(self.layers) > 0 and all(
            type(layer).forward is forward and not (layer._forward_hooks or layer._forward_pre_hooks)
            for layer in self.layers
        )

    def decode_step_layers(
        self, hidden: Tensor, position_offset: int | Tensor, cache: RetNetCache, use_cache: bool
    ) -> Tensor:
        """All blocks for one token without padding, in eval without autograd: ``hidden (batch, 1, hidden)``
        -> the last block's output; the cache's states are replaced when ``use_cache``.
        The position tables are built once (every layer has the same retention shape); the blocks then
        run :meth:`layer_steps`, or its compiled version after :meth:`compile_decoding`."""
        retention = self.layers[0].retention
        tables = retention.step_tables(position_offset, hidden.device, step_dtype(hidden.dtype), None)
        states = [cache.get_state(idx) for idx in range(len(self.layers))]
        run = self.layer_steps
        if self._compiled_layer_steps is not None and all(state is not None for state in states):
            run = self._compiled_layer_steps
        hidden, new_states = run(hidden, tables, states)
        if use_cache:
            for idx, state in enumerate(new_states):
                cache.set_state(idx, state)
        return hidden

    def layer_steps(
        self, hidden: Tensor, tables: StepTables, states: list[RetentionState | None]
    ) -> tuple[Tensor, list[RetentionState]]:
        """Every block's ``step`` in turn -> ``(hidden (batch, 1, hidden), states)``. This is the function
        :meth:`compile_decoding` compiles."""
        new_states = []
        for layer, state in zip(self.layers, states, strict=True):
            hidden, new_state = layer.step(hidden, tables, state)
            new_states.append(new_state)
        return hidden, new_states

    def compile_decoding(self, enabled: bool = True, **compile_kwargs: Any) -> None:
        """Run the blocks of every later one-token recurrent step (``generate``'s decoding steps) through
        ``torch.compile(self.layer_steps, **compile_kwargs)``, weights frozen into the compiled code
        (:class:`FrozenWeightsStep`); ``enabled=False``: eager.
        Opt-in: the first steps pay the compilation (tens of seconds on CPU; again per batch size or
        dtype), packed weights add about one copy of the weight matrices to memory, and results equal
        the eager step's within float32 rounding. Padded, autograd and first steps stay eager.
        ``compile_decoding(False)`` then ``compile_decoding()`` with the same arguments reuses the code."""
        if enabled and (self._frozen_step is None or self._frozen_step.arguments != compile_kwargs):
            self._frozen_step = FrozenWeightsStep(self.layer_steps, self, **compile_kwargs)  # reused below
        self._compiled_layer_steps = self._frozen_step if enabled else None
