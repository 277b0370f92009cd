"""Converting a Hugging Face causal LM: which layers, and how.

:func:`quantize_model` replaces every ``nn.Linear`` (and GPT-2 ``Conv1D``)
inside the model by a :class:`QuantLinear`, except the output embeddings
(LM head) and any module whose name matches ``exclude``, and gives every fused
3-D expert tensor of a transformers mixture of experts a
:class:`~qdpo.quant.experts.QuantExpertTensor` (named ``<experts module>.<tensor>``
for ``exclude``). Embeddings and routers (also the linear gates beside an experts module,
:func:`~qdpo.quant.experts.moe_routers`) are never touched. All shapes are
checked before the first layer is replaced, so a model that cannot take the
spec is left unchanged.
"""

from __future__ import annotations

import fnmatch
import functools
import warnings
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from qdpo.quant.experts import (QuantExpertTensor, expert_shape, fused_expert_tensors, install, moe_routers,
                                quantized_experts, transposed)
from qdpo.quant.linear import QuantLinear, _linear_weight, check_grid
from qdpo.quant.spec import QuantSpec

METHODS = ("rtn", "awq")
# Left in full precision unless asked for: the LM head, and a multimodal checkpoint's vision encoder and
# projector (Gemma 3, Llama 4, Mistral 3, Qwen2.5-VL load as one causal LM): the chat data qdpo trains and
# evaluates on never reaches them, so their quantization error would go unmeasured.
DEFAULT_EXCLUDE = ("lm_head", "*vision_tower*", "*vision_model*", "*visual*", "*multi_modal_projector*")


# nn.Linear subclasses of transformers whose own forward computes exactly ``x @ Wᵀ (+ b)`` (Falcon's, for
# the transposed product it prefers): quantized like nn.Linear
PLAIN_LINEAR_SUBCLASSES = ("FalconLinear",)


def _is_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` that computes what ``nn.Linear`` does, or GPT-2's ``Conv1D``. A subclass with a
    forward of its own (Llama 4's router returns scores and logits) is not, unless it is one of
    :data:`PLAIN_LINEAR_SUBCLASSES`: replacing it would change what it returns, so it stays as it is
    (counted as a full-precision weight)."""
    if isinstance(m, nn.Linear):
        return type(m).forward is nn.Linear.forward or type(m).__name__ in PLAIN_LINEAR_SUBCLASSES
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def quantizable_layers(model: nn.Module, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> dict[str, nn.Module]:
    """Name → module of the linear layers :func:`quantize_model` would replace.

    ``exclude`` holds module names or glob patterns (``"*.mlp.down_proj"``).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    gates = moe_routers(model)
    return {name: m for name, m in model.named_modules() if _is_linear(m) and m is not head
            and name not in gates and not _excluded(name, exclude)}


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatch(name, p) for p in exclude)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Name → :class:`QuantLinear` for every quantized layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def mark_quantized(model: nn.Module, spec: QuantSpec) -> None:
    """Record ``spec`` on a model holding quantized layers, and make its ``save_pretrained`` (transformers')
    refuse while it does: it would write the layers' packed tensors under names no loader reads, and
    transformers would load that checkpoint with random weights in their place, warning only."""
    model.qdpo_spec = spec
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = functools.partial(_save_pretrained, model)


def _save_pretrained(model: nn.Module, *args, **kwargs):
    if quantized_layers(model) or quantized_experts(model):
        raise ValueError(
            f"{type(model).__name__}.save_pretrained cannot save qdpo's quantized layers: transformers would "
            "load the checkpoint with random weights in their place. Save it with qdpo.save_quantized(model, DIR) "
            "(load_quantized reads it back), and for a checkpoint transformers and other tools load, convert that "
            "with python -m qdpo.export DIR --format compressed-tensors --out OUT")
    return type(model).save_pretrained(model, *args, **kwargs)


def untie_quantized_head(model: nn.Module) -> None:
    """Untie a quantized LM head (a checkpoint's that quantizes it) from the input embeddings in ``model.config``:
    they are separate weights now, and a config that still ties them makes ``tie_weights`` hang the full-precision
    embeddings on the head as a stray ``weight`` (counted as a quantized weight, saved as an alias of them)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if not isinstance(head, QuantLinear) or config is None:
        return
    for c in (config, getattr(config, "text_config", None)):
        if c is not None and getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False


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
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    learn_scales: bool = False,
    backend: str = "auto",
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> nn.Module:
    """Replace the model's linear layers by :class:`QuantLinear` (and quantize its fused expert tensors), in
    place; returns ``model``.

    Args:
        spec: bits, group size, symmetry.
        method: ``"rtn"`` (round to nearest). ``"awq"`` needs calibration
            activations: use ``qdpo.quant.awq.awq_quantize_model``.
        mode: ``"train"`` (latent weights + fake-quant) or ``"packed"``.
        exclude: module names or glob patterns left in full precision (default: the LM head and any
            vision encoder or multimodal projector, :data:`DEFAULT_EXCLUDE`).
        grids: optional name → ``(scales, zeros)`` to use instead of RTN (zero points unsigned codes of
            ``spec``, the symmetric offset where symmetric; others raise before any layer is replaced).
        progress: optional wrapper for the layer iterator (e.g. ``tqdm``).
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a qdpo.QuantSpec, got {type(spec).__name__}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; use one of {METHODS}")
    if method == "awq" and grids is None:
        raise ValueError("method='awq' needs calibration data: call qdpo.quant.awq.awq_quantize_model")
    layers, experts = check_quantizable(model, spec, exclude)  # every layer checked before changing any
    for name in [*layers, *experts]:
        if name in (grids or {}):
            check_grid(grids[name][1], spec, f"{name}: grids' zero points")
    _warn_fused_experts(model, set(experts))
    items = list(layers.items()) + list(experts.items())
    for name, m in (progress(items) if progress else items):
        if name in experts:
            mod, t = m
            install(mod, t, QuantExpertTensor.from_tensor(mod._parameters[t], spec, transposed(mod), mode=mode,
                                                          learn_scales=learn_scales, backend=backend))
            continue
        s, z = (grids or {}).get(name, (None, None))
        set_module(model, name, QuantLinear.from_linear(
            m, spec, mode=mode, learn_scales=learn_scales, scales=s, zeros=z, backend=backend))
    mark_quantized(model, spec)
    return model


def check_quantizable(model: nn.Module, spec: QuantSpec,
                      exclude: Iterable[str] = DEFAULT_EXCLUDE) -> tuple[dict, dict]:
    """The layers and fused expert tensors :func:`quantize_model` would quantize, after every check it makes
    before changing any: something to quantize, ``spec`` fits every shape, finite floating-point weights
    (``ValueError``; ``TypeError`` for integer weights). ``python -m qdpo.train`` runs them before the FP
    answers."""
    layers = quantizable_layers(model, exclude)
    experts = {n: v for n, v in fused_expert_tensors(model).items() if not _excluded(n, exclude)}
    if not layers and not experts:
        raise ValueError(f"{type(model).__name__} has no nn.Linear/Conv1D layers outside {tuple(exclude)} to quantize")
    _check_shapes(_shapes(layers, experts), spec)
    weights = {**{n: _linear_weight(m) for n, m in layers.items()}, **{n: m._parameters[t] for n, (m, t) in experts.items()}}
    for name, w in weights.items():
        if not w.is_floating_point():
            raise TypeError(f"{name}: weight dtype {w.dtype} is not floating point")
        if w.device.type != "meta" and not bool(torch.isfinite(w).all()):  # a meta model has shapes only
            raise ValueError(f"{name}: weight contains NaN or Inf; fix the checkpoint before quantizing")
    return layers, experts


def _shapes(layers: dict, experts: dict) -> dict[str, tuple[int, int]]:
    """Name → the ``(N, K)`` each layer and expert tensor is quantized as."""
    return {**{n: tuple(_linear_weight(m).shape) for n, m in layers.items()},
            **{n: expert_shape(m, t) for n, (m, t) in experts.items()}}


def _check_shapes(shapes: dict[str, tuple[int, int]], spec: QuantSpec) -> None:
    """One error naming every weight the spec does not fit, and the group sizes that fit them all."""
    from qdpo.quant.spec import SUPPORTED_GROUP_SIZES

    bad = []
    for name, (n, k) in shapes.items():
        try:
            spec.check_shape(n, k, what=name)
        except ValueError as e:
            bad.append(str(e))
    if not bad:
        return
    ks = {k for _, k in shapes.values()}
    fits = [g for g in SUPPORTED_GROUP_SIZES if g > 0 and all(k % g == 0 for k in ks)]
    more = f" (and {len(bad) - 3} more layers)" if len(bad) > 3 else ""
    raise ValueError("; ".join(bad[:3]) + more + f". Group sizes that fit every layer: {fits + [-1]}")


def weight_coverage(model: nn.Module) -> dict:
    """What share of the model's weight matrices is quantized: element counts of the
    :class:`QuantLinear` weights and quantized expert tensors, of the embeddings (input and output, a tied pair once) and of every
    other floating-point parameter with two or more dimensions, which stays in full precision (a
    mixture of experts' fused 3-D expert tensors, its routers, layers left out by ``exclude``).
    ``fp_fused_expert_tensors`` names every 3-D one left so; ``fp_excluded_expert_tensors`` those of them
    that are expert tensors of a transformers experts module, which qdpo quantizes unless ``exclude`` (or
    the checkpoint the model was read from) kept them in full precision; the rest belong to modules qdpo
    does not know."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    experts = quantized_experts(model)
    emb = [getattr(model, f)() for f in ("get_input_embeddings", "get_output_embeddings") if hasattr(model, f)]
    emb_ids = {id(m.weight) for m in emb if m is not None and isinstance(getattr(m, "weight", None), Tensor)}
    q_ids = {id(p) for m in [*quantized.values(), *experts.values()] for p in m.parameters(recurse=False)}
    n_emb, other, fp3d, seen = 0, 0, [], set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or id(p) in q_ids or not p.is_floating_point() or p.dim() < 2:
            continue
        seen.add(id(p))
        if id(p) in emb_ids:
            n_emb += p.numel()
            continue
        other += p.numel()
        if _stacked_matrices(p):
            fp3d.append(name)
    n_q = sum(m.out_features * m.in_features for m in quantized.values())
    n_q += sum(q.experts * q.out_features * q.in_features for q in experts.values())
    total = n_q + n_emb + other
    return {"quantized_layers": len(quantized), "quantized_expert_tensors": len(experts),
            "quantized_weights": n_q, "embedding_weights": n_emb,
            "other_fp_weights": other, "quantized_fraction": n_q / total if total else 0.0,
            "fp_fused_expert_tensors": fp3d,
            "fp_excluded_expert_tensors": [n for n in fp3d if n in fused_expert_tensors(model)]}


def _stacked_matrices(p: Tensor) -> bool:
    """A floating-point 3-D parameter whose slices are matrices (experts' weights; not a (1, 1, H) probe)."""
    return p.dim() == 3 and p.is_floating_point() and p.shape[1] > 1 and p.shape[2] > 1


def _warn_fused_experts(model: nn.Module, quantizing: set[str]) -> None:
    """Warn about 3-D parameters that stay in full precision: expert tensors left out by ``exclude``, or
    those of a mixture of experts whose module qdpo does not know (not a transformers experts module)."""
    fused = [(n, p) for n, p in model.named_parameters() if _stacked_matrices(p) and n not in quantizing]
    if not fused:
        return
    n_fused = sum(p.numel() for _, p in fused)
    n_lin = sum(_linear_weight(m).numel() for m in quantizable_layers(model, ()).values())
    n_lin += sum(p.numel() for n, p in model.named_parameters() if n in quantizing)
    names = ", ".join(n for n, _ in fused[:2]) + (f" and {len(fused) - 2} more" if len(fused) > 2 else "")
    warnings.warn(
        f"{type(model).__name__}: {len(fused)} 3-D parameters ({names}; "
        f"{100 * n_fused / (n_fused + n_lin):.0f} % of the weight matrices) stay in full precision: qdpo quantizes "
        "nn.Linear layers and the fused expert tensors of transformers' experts modules, and these are neither "
        "(or were excluded).", UserWarning, stacklevel=4)  # past torch.no_grad's wrapper


def to_packed(model: nn.Module) -> nn.Module:
    """Convert every train-mode :class:`QuantLinear` (and quantized expert tensor) to packed mode, in place."""
    for m in [*quantized_layers(model).values(), *quantized_experts(model).values()]:
        m.to_packed()
    return model
