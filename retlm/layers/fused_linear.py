"""Several ``nn.Linear`` that read the same input, run as one matrix product when no gradient is needed.

Decoding one token multiplies a single vector by each weight matrix; at small widths the cost of a
``linear`` call is mostly dispatch, not arithmetic, so concatenating the weights of the projections
that share an input (RetNet's q/k/v/g, the GLU's fc1/gate) saves whole calls. Each output element is
the same dot product either way, and the result is the same bit for bit (tested).

The concatenated copy is built on first use and kept beside the module, never in its ``state_dict``.
It is rebuilt when any source parameter changed: an in-place update (optimizer step,
``load_state_dict``, ``copy_`` under ``no_grad``) bumps the parameter's version counter, and a moved,
cast or replaced parameter has another storage (the copy holds the old storage, so its address cannot
be reused). Writes through ``param.data`` bypass the version counter; call :meth:`FusedLinear.clear`
after such a write. The fused product is used only without autograd (``torch.no_grad`` /
``torch.inference_mode``), outside ``torch.compile``, only for plain ``nn.Linear`` modules without
hooks (their own or global ones), and only when every module has a bias or none has; otherwise the
caller runs the modules one by one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks


class FusedLinear:
    """The projections ``owner.<name>`` for ``names``, fused along the output features.

    Args:
        names: attribute names of ``nn.Linear`` submodules of the owner, all with the same in_features.

    The modules are looked up on the owner at every call, so a replaced submodule (an adapter, a
    quantised layer) is seen at once and disables the fused product.
    """

    def __init__(self, *names: str) -> None:
        self.names = names
        self.clear()

    def clear(self) -> None:
        """Drop the concatenated copy (it is rebuilt on next use)."""
        self._weight: Tensor | None = None
        self._bias: Tensor | None = None
        # What the copy was built from: per module (module, weight, bias, versions, data pointers);
        # _held keeps the source storages alive so that their addresses cannot be reused meanwhile.
        self._sources: tuple = ()
        self._held: tuple = ()

    def __call__(self, owner: nn.Module, x: Tensor) -> Tensor | None:
        """``x (..., in_features)`` -> ``(..., sum of out_features)``, the outputs in ``names`` order; or None
        when the fused product does not apply (autograd on, inside ``torch.compile``, a module that is not
        a plain hook-free ``nn.Linear``, mixed biases): the caller then calls the modules itself."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # a compiler fuses on its own
            return None
        if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
            return None  # hooks on every module: they must see each projection
        modules = owner._modules
        linears = [modules[name] for name in self.names]
        if not self._is_current(linears) and not self._rebuild(linears):
            return None
        return torch.nn.functional.linear(x, self._weight, self._bias)

    def _is_current(self, linears: list[nn.Module]) -> bool:
        sources = self._sources
        if len(sources) != len(linears):
            return False
        for linear, (module, weight, bias, versions, pointers) in zip(linears, sources, strict=True):
            if linear is not module or linear._forward_hooks or linear._forward_pre_hooks:
                return False
            params = linear._parameters
            if params["weight"] is not weight or params["bias"] is not bias:
                return False
            if (weight._version, weight.data_ptr()) != (versions[0], pointers[0]):
                return False
            if bias is not None and (bias._version, bias.data_ptr()) != (versions[1], pointers[1]):
                return False
        return True

    def _rebuild(self, linears: list[nn.Module]) -> bool:
        self.clear()
        if any(type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks for m in linears):
            return False
        has_bias = {m.bias is not None for m in linears}
        if len(has_bias) != 1:
            return False
        # Built outside inference mode (the copy may be used later under plain no_grad), never tracked.
        with torch.inference_mode(False), torch.no_grad():
            weight = torch.cat([m.weight for m in linears])
            bias = torch.cat([m.bias for m in linears]) if has_bias == {True} else None
        sources, held = [], []
        for m in linears:
            params = [p for p in (m.weight, m.bias) if p is not None]
            versions = tuple(p._version for p in params)
            pointers = tuple(p.data_ptr() for p in params)
            sources.append((m, m.weight, m.bias, versions, pointers))
            held.extend(p.detach() for p in params)
        self._weight, self._bias = weight, bias
        self._sources, self._held = tuple(sources), tuple(held)
        return True


def contiguous(x: Tensor) -> Tensor:
    """``x``, copied only if it is not contiguous (a no-op ``.contiguous()`` still dispatches).

    Use it before an activation on a slice of a fused product: the CPU kernels of transcendental
    functions (GELU's erf, SiLU's exp) may round a strided input differently from a contiguous one,
    and the fused decoding path must give the same bits as the unfused one. One row is contiguous.
    """
    return x if x.is_contiguous() else x.contiguous()
