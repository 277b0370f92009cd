"""Converting a Hugging Face causal LM: which layers, and how.

:func:`quantize_model` replaces every ``nn.Linear`` (and GPT-2 ``Conv1D``)
inside the model by a :class:`QuantLinear`, except the output embeddings
(LM head) and any module whose name matches ``exclude``. Embeddings are not
linear layers and are never touched. All shapes are checked before the first
layer is replaced, so a model that cannot take the spec is left unchanged.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

import torch
from torch import nn

from qdpo.quant.linear import QuantLinear, _linear_weight
from qdpo.quant.spec import QuantSpec

METHODS = ("rtn", "awq")


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))


def quantizable_layers(model: nn.Module, exclude: Iterable[str] = ("lm_head",)) -> dict[str, nn.Module]:
    """Name → module of the linear layers :func:`quantize_model` would replace.

    ``exclude`` holds module names or glob patterns (``"*.mlp.down_proj"``).
    """
    exclude = tuple(exclude)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for name, m in model.named_modules():
        if not _is_linear(m) or m is head:
            continue
        if any(name == p or fnmatch.fnmatch(name, p) for p in exclude):
            continue
        out[name] = m
    return out


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Name → :class:`QuantLinear` for every quantized layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    method: str = "rtn",
    mode: str = "train",
    exclude: Iterable[str] = ("lm_head",),
    learn_scales: bool = False,
    backend: str = "auto",
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> nn.Module:
    """Replace the model's linear layers by :class:`QuantLinear`, in place; returns ``model``.

    Args:
        spec: bits, group size, symmetry.
        method: ``"rtn"`` (round to nearest). ``"awq"`` needs calibration
            activations: use ``qdpo.quant.awq.awq_quantize_model``.
        mode: ``"train"`` (latent weights + fake-quant) or ``"packed"``.
        exclude: module names or glob patterns left in full precision.
        grids: optional name → ``(scales, zeros)`` to use instead of RTN.
        progress: optional wrapper for the layer iterator (e.g. ``tqdm``).
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a qdpo.QuantSpec, got {type(spec).__name__}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; use one of {METHODS}")
    if method == "awq" and grids is None:
        raise ValueError("method='awq' needs calibration data: call qdpo.quant.awq.awq_quantize_model")
    layers = quantizable_layers(model, exclude)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear/Conv1D layers outside {tuple(exclude)} to quantize")
    _check_shapes(layers, spec)
    for name, m in layers.items():  # check every layer before changing any
        w = _linear_weight(m)
        if not w.is_floating_point():
            raise TypeError(f"{name}: weight dtype {w.dtype} is not floating point")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{name}: weight contains NaN or Inf; fix the checkpoint before quantizing")
    items = list(layers.items())
    for name, m in (progress(items) if progress else items):
        s, z = (grids or {}).get(name, (None, None))
        set_module(model, name, QuantLinear.from_linear(
            m, spec, mode=mode, learn_scales=learn_scales, scales=s, zeros=z, backend=backend))
    model.qdpo_spec = spec
    return model


def _check_shapes(layers: dict[str, nn.Module], spec: QuantSpec) -> None:
    """One error naming every layer the spec does not fit, and the group sizes that fit them all."""
    from qdpo.quant.spec import SUPPORTED_GROUP_SIZES

    bad = []
    for name, m in layers.items():
        try:
            spec.check_shape(*_linear_weight(m).shape, what=name)
        except ValueError as e:
            bad.append(str(e))
    if not bad:
        return
    ks = {_linear_weight(m).shape[1] for m in layers.values()}
    fits = [g for g in SUPPORTED_GROUP_SIZES if g > 0 and all(k % g == 0 for k in ks)]
    more = f" (and {len(bad) - 3} more layers)" if len(bad) > 3 else ""
    raise ValueError("; ".join(bad[:3]) + more + f". Group sizes that fit every layer: {fits + [-1]}")


def to_packed(model: nn.Module) -> nn.Module:
    """Convert every train-mode :class:`QuantLinear` to packed mode, in place."""
    for m in quantized_layers(model).values():
        m.to_packed()
    return model
