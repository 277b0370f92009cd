"""Saving and loading packed models: safetensors + a JSON quantization config.

A saved directory holds:

* ``model.safetensors``: the whole state dict, each quantized layer as
  ``<name>.qweight`` / ``.scales`` / ``.zeros`` (/ ``.bias``) in the canonical
  format (``qdpo.quant.format``); a tensor shared by several names (tied
  embeddings) is stored once;
* ``qdpo_quant.json``: ``{"format": "qdpo-packed", "version": 1, "spec": {...},
  "modules": [...], "aliases": {...}}``, and ``"experts": [...]`` when a mixture
  of experts' fused expert tensors are quantized (``qdpo.quant.experts``: each
  stored as ``<module>.qdpo_<tensor>.qweight`` / ``.scales`` / ``.zeros`` of its
  ``(experts·out, in)`` weight);
* ``config.json`` (the model's ``transformers`` config) and, when given,
  the tokenizer files.

Files are written under temporary names and renamed. Before the new weights
replace any file, ``qdpo_quant.json`` is replaced by a placeholder saying the
save is under way, and it is written for real last: an interrupted save (also
one into a directory holding an earlier packed model) leaves a directory that
every reader refuses as unfinished, never new weights beside an old config. Other files in the
directory are left as they are; a ``model.safetensors`` that is not a packed
model's (a full-precision model's) is never overwritten: the save is refused. Loading reads safetensors only and
refuses pickled checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qdpo.quant.experts import (QuantExpertTensor, expert_shape, install, quantized_experts, submodule_name,
                                transposed)
from qdpo.quant.linear import QuantLinear
from qdpo.quant.model import mark_quantized, quantized_layers, set_module, untie_quantized_head
from qdpo.quant.spec import QuantSpec

CONFIG_NAME = "qdpo_quant.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "qdpo-packed"
# The key of the placeholder qdpo_quant.json a save writes before its files (and replaces last): not finished.
_UNFINISHED = "save_in_progress"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def packed_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with train-mode layers packed; returns ``(tensors, aliases)``.

    ``aliases`` maps a dropped name to the stored name it shares memory with.
    """
    sd = dict(model.state_dict())
    named = {**quantized_layers(model), **{submodule_name(n): q for n, q in quantized_experts(model).items()}}
    for name, m in named.items():
        if m.mode == "train":
            qw = m.quantized_weight()
            sd.pop(f"{name}.weight")
            sd[f"{name}.qweight"], sd[f"{name}.scales"] = qw.qweight, qw.scales
    tensors, aliases, seen = {}, {}, {}
    for k, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = t.detach().contiguous().cpu()
    return tensors, aliases


def save_quantized(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """Save a model with :class:`QuantLinear` layers (and quantized expert tensors; either mode) as packed weights."""
    path = Path(path)
    layers, experts = quantized_layers(model), quantized_experts(model)
    if not layers and not experts:
        raise ValueError("the model has no QuantLinear layers; call qdpo.quantize_model first")
    specs = {m.spec for m in [*layers.values(), *experts.values()]}
    if len(specs) != 1:
        raise ValueError(f"layers use several specs {sorted(s.name for s in specs)}; one spec per model is supported")
    if (path / WEIGHTS_NAME).exists() and not (path / CONFIG_NAME).exists():
        raise FileExistsError(f"{path / WEIGHTS_NAME} exists and is not a qdpo packed model's (no {CONFIG_NAME} "
                              "beside it; the full-precision model's?): saving would overwrite those weights; save "
                              "into another directory, or remove the file first")
    path.mkdir(parents=True, exist_ok=True)
    tensors, aliases = packed_state_dict(model)
    cfg = {"format": FORMAT, "version": 1, "spec": specs.pop().to_dict(),
           "modules": sorted(layers), "aliases": aliases, **({"experts": sorted(experts)} if experts else {})}
    weights = path / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
    try:
        save_file(tensors, str(weights), metadata={"format": "pt"})
        # an earlier save's config must never describe the new files: replaced before them, rewritten last
        _atomic_write(path / CONFIG_NAME, lambda p: p.write_text(json.dumps({"format": FORMAT, "version": 1,
                                                                             _UNFINISHED: True})))
        os.replace(weights, path / WEIGHTS_NAME)
    finally:
        if weights.exists():
            weights.unlink()
    if hasattr(model, "config"):
        _atomic_write(path / "config.json", lambda p: model.config.to_json_file(str(p)))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    _atomic_write(path / CONFIG_NAME, lambda p: p.write_text(json.dumps(cfg, indent=1)))  # last: marks complete
    return path


def read_quant_config(path: str | os.PathLike) -> dict:
    """Read and validate ``qdpo_quant.json``; one clear error for each problem."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory holding a qdpo packed model")
    f = path / CONFIG_NAME
    if not f.exists():
        pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        hint = f" (found pickled files {pickles}: qdpo refuses pickles, re-save with safetensors)" if pickles else ""
        raise FileNotFoundError(f"{f} is missing: {path} was not saved by qdpo.save_quantized{hint}")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); re-save the model") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ValueError(f"{f}: 'format' must be {FORMAT!r}, got {cfg.get('format') if isinstance(cfg, dict) else cfg!r}")
    if cfg.get(_UNFINISHED):
        raise ValueError(f"{path}: the qdpo.save_quantized that wrote it did not finish (interrupted; its files may "
                         "mix an earlier model's with a new one's); save the model again")
    if cfg.get("version") != 1:  # a later layout: reading it as version 1 could misplace tensors silently
        raise ValueError(f"{f}: format version {cfg.get('version')!r} is not one this qdpo reads (1); load it with the "
                         "qdpo release that saved it, or a newer one")
    cfg.setdefault("experts", [])
    for key, typ in (("spec", dict), ("modules", list), ("aliases", dict), ("experts", list)):
        if not isinstance(cfg.get(key), typ):
            raise ValueError(f"{f}: '{key}' must be a {typ.__name__}; re-save the model")
    cfg["spec"] = QuantSpec.from_dict(cfg["spec"])
    if not (path / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"{path / WEIGHTS_NAME} is missing; the save did not finish, save again")
    return cfg


def load_quantized(path: str | os.PathLike, mode: str = "packed", device="cpu", backend: str = "auto") -> nn.Module:
    """Load a directory written by :func:`save_quantized` into a ``transformers`` model.

    The architecture comes from ``config.json``; the quantized layers are
    rebuilt as :class:`QuantLinear` in ``mode`` (``"train"`` starts the latent
    weights at ŵ). Every tensor must be present with the right shape and dtype.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if mode not in ("packed", "train"):  # before reading gigabytes
        raise ValueError(f"mode={mode!r} is not known; use 'packed' or 'train'")
    path = Path(path)
    cfg = read_quant_config(path)
    spec = cfg["spec"]
    with safe_open(str(path / WEIGHTS_NAME), "pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = AutoConfig.from_pretrained(str(path))
    scales_dtype = next((t.dtype for k, t in tensors.items() if k.endswith(".scales")), torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=scales_dtype)
    for name in cfg["modules"]:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{CONFIG_NAME} names module {name!r}, which {type(model).__name__} does not have") from None
        from qdpo.quant.linear import _linear_weight

        n, k = _linear_weight(old).shape
        set_module(model, name, QuantLinear(k, n, spec, bias=old.bias is not None, mode="packed",
                                            dtype=scales_dtype, backend=backend))
    for name in cfg["experts"]:
        mod_name, _, t = name.rpartition(".")
        try:
            mod = model.get_submodule(mod_name)
            shape = expert_shape(mod, t)
        except (AttributeError, KeyError):
            raise ValueError(f"{CONFIG_NAME} names expert tensor {name!r}, which {type(model).__name__} does not "
                             "have") from None
        e = mod._parameters[t].shape[0]
        install(mod, t, QuantExpertTensor(e, shape[0] // e, shape[1], spec, transposed(mod), mode="packed",
                                          dtype=scales_dtype, backend=backend))
    _check_grids(tensors, spec, path / WEIGHTS_NAME)
    untie_quantized_head(model)
    _load_tensors(model, tensors, cfg["aliases"], path / WEIGHTS_NAME)
    mark_quantized(model, spec)
    if mode == "train":
        for m in [*quantized_layers(model).values(), *quantized_experts(model).values()]:
            m.to_train()
    return model.to(device).eval()


def _check_grids(tensors: dict, spec: QuantSpec, where: Path) -> None:
    """Every zero point a code of ``spec`` (the symmetric offset where symmetric) and every scale finite: the
    kernels read them as they are, so a damaged value would give wrong outputs with no error."""
    offset, top = 1 << (spec.bits - 1), (1 << spec.bits) - 1
    for k, t in tensors.items():
        if k.endswith(".zeros") and t.numel():
            bad = (t != offset) if spec.symmetric else (t > top)
            if bool(bad.any()):
                want = f"all {offset} ({spec.name} is symmetric)" if spec.symmetric else f"in [0, {top}]"
                raise ValueError(f"{where}: zero points {k!r} hold {int(t[bad].flatten()[0])}, expected {want}; "
                                 "the file is damaged or from another spec")
        elif k.endswith(".scales") and t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: scales {k!r} hold NaN or Inf; the file is damaged, save the model again")


def _load_tensors(model: nn.Module, tensors: dict, aliases: dict, where: Path) -> None:
    expected = model.state_dict()
    for k, t in expected.items():
        src = tensors.get(k, tensors.get(aliases.get(k, ""), None))
        if src is None:
            raise ValueError(f"{where} has no tensor {k!r}; the file is incomplete or from another model")
        if tuple(src.shape) != tuple(t.shape):
            raise ValueError(f"{where}: tensor {k!r} has shape {tuple(src.shape)}, the model expects {tuple(t.shape)}")
        if (src.dtype == torch.uint8) != (t.dtype == torch.uint8):
            raise ValueError(f"{where}: tensor {k!r} has dtype {src.dtype}, the model expects {t.dtype}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{where} has tensors the model does not expect: {extra[:5]}; wrong config.json?")
    model.load_state_dict({k: tensors.get(k, tensors.get(aliases.get(k, ""))) for k in expected}, strict=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
