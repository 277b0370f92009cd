"""A model's tensors under the names and layouts of its checkpoints.

qdpo saves a model under its module names. The model's checkpoints (on the Hub, and those
``save_pretrained`` writes) may use others: Mixtral's ``block_sparse_moe``, Gemma 3's
``language_model.model``, and one linear layer per expert and product where transformers fuses
the experts into one 3-D tensor. transformers' own reverse conversion mapping (the one
``save_pretrained`` applies) gives those names; :mod:`qdpo.export` writes them and
:mod:`qdpo.quant.importers` reads them back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdpo.quant.convert import FormatError
from qdpo.quant.experts import transposed

WEIGHT = ".weight"


def revert(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` (the model's names and layouts) as ``save_pretrained`` writes them."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


def checkpoint_name(model: nn.Module, module: str) -> str:
    """The name a linear layer (or router) of ``model`` has in the model's checkpoints."""
    w = model.get_submodule(module).weight
    out = revert(model, {module + WEIGHT: w})
    key = next(iter(out))
    if len(out) != 1 or not key.endswith(WEIGHT) or tuple(out[key].shape) != tuple(w.shape):
        raise FormatError(f"{module}: transformers stores this layer's weight as {sorted(out)[:2]} in "
                          f"{type(model).__name__} checkpoints, not as one matrix; qdpo cannot map it")
    return key[: -len(WEIGHT)]


def expert_layers(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Checkpoint layer name → the rows of the fused expert tensor ``name``'s ``(experts·out, in)`` weight
    that layer holds: transformers' reverse conversion applied to the row numbers. Refuses a model whose
    checkpoints keep the experts fused (gpt-oss, Llama 4): GPTQ, AWQ and compressed-tensors describe
    linear layers only."""
    mod, _, tensor = name.rpartition(".")
    m = model.get_submodule(mod)
    p = m._parameters.get(tensor)
    cls = type(model).__name__
    if p is None or transposed(m) is not False:
        raise FormatError(f"{name}: {cls} keeps its experts as fused (experts, in, out) tensors, in its "
                          "checkpoints too; GPTQ, AWQ and compressed-tensors checkpoints describe linear layers only "
                          "and cannot hold them: keep the qdpo packed model (qdpo.load_quantized)")
    e, o, k = p.shape
    rows = revert(model, {name: torch.arange(e * o, device=p.device if p.device.type != "meta" else "cpu").view(e, o, 1)})
    shapes = revert(model, {name: p})
    layers = {}
    for key, r in rows.items():
        if not key.endswith(WEIGHT) or key not in shapes or r.dim() != 2 or tuple(shapes[key].shape) != (r.shape[0], k):
            raise FormatError(f"{name}: {cls} checkpoints store its experts as {key} (shape "
                              f"{tuple(shapes.get(key, r).shape)}), not as one linear layer per expert; "
                              "keep the qdpo packed model (qdpo.load_quantized)")
        layers[key[: -len(WEIGHT)]] = r.reshape(-1).cpu()
    if not torch.equal(torch.cat(list(layers.values())).sort().values, torch.arange(e * o)):
        raise FormatError(f"{name}: transformers' checkpoint layout for {cls} does not cover every expert row once")
    return layers


def model_names(model: nn.Module) -> dict[str, str]:
    """Checkpoint tensor name → the model's, for every tensor of ``model`` stored as it is (renamed at most)."""
    out = {}
    for key, t in model.state_dict().items():
        got = revert(model, {key: t})
        if len(got) == 1:
            new, v = next(iter(got.items()))
            if tuple(v.shape) == tuple(t.shape):
                out[new] = key
    return out
