"""Reading GPTQ, AWQ and compressed-tensors checkpoints into qdpo models.

:func:`load_external` reads a checkpoint directory (``config.json`` with a
``quantization_config``, or the older ``quantize_config.json`` /
``quant_config.json`` beside it, and ``*.safetensors`` weights, sharded ones
through their ``*.safetensors.index.json``: pickled checkpoints are refused)
into a ``transformers`` causal LM whose quantized Linear layers are
:class:`QuantLinear`. Codes, zero points and scales are
the file's, bit for bit (:mod:`qdpo.quant.convert` does the unpacking);
every other tensor (embeddings, norms, which AWQ has rescaled, the LM head)
is the file's too.

Supported: GPTQ v1 (and ``gptq_v2``) W4/W8 without act-order, AWQ GEMM W4
with zero points, compressed-tensors ``pack-quantized`` W4/W8 (group or
channel strategy, weight-only). Layer names may be the model's or those of
its checkpoints (:mod:`qdpo.quant.layout`); a mixture of experts' per-expert
layers are gathered into the model's fused expert tensors
(:class:`~qdpo.quant.experts.QuantExpertTensor` when quantized). Anything
else gets one :class:`FormatError` naming what is unsupported.

:func:`quantize_initial_from` is the pipeline's entry point (``--init PATH``):
the imported model in train mode, checked against the full-precision model
it will be trained towards.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qdpo.quant import convert, layout
from qdpo.quant.convert import FormatError
from qdpo.quant.experts import (QuantExpertTensor, fused_expert_tensors, install, quantized_experts,
                                submodule_name)
from qdpo.quant.format import QuantizedWeight
from qdpo.quant.linear import QuantLinear
from qdpo.quant.model import mark_quantized, quantized_layers, set_module, untie_quantized_head
from qdpo.quant.spec import QuantSpec

__all__ = ["FormatError", "read_external_config", "read_safetensors", "load_external", "quantize_initial_from"]

log = logging.getLogger(__name__)
_PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Per-module tensor names each format stores (the module's bias is read separately).
_PARTS = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"),
}
_MARKER = {"gptq": "qweight", "awq": "qweight", "compressed-tensors": "weight_packed"}


# ----------------------------------------------------------------------------- config
def read_external_config(path: str | os.PathLike) -> tuple[str, QuantSpec, dict]:
    """``(format, spec, details)`` of the checkpoint at ``path``; :class:`FormatError` if unsupported.

    ``format`` is ``"gptq"``, ``"awq"`` or ``"compressed-tensors"``;
    ``details`` holds ``{"v2": bool}`` for GPTQ.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory holding a quantized checkpoint")
    qc = _quantization_config(path)
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        return "gptq", *_gptq_spec(qc)
    if method == "awq":
        return "awq", _awq_spec(qc), {}
    if method == "compressed-tensors":
        return "compressed-tensors", _ct_spec(qc), {}
    raise FormatError(f"{path}: quant_method {method!r} is not supported; qdpo reads gptq, awq and "
                      "compressed-tensors (pack-quantized)")


def _quantization_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} is missing: {path} is not a Hugging Face checkpoint")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfg_file} is not valid JSON ({e})") from None
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict):
        return qc
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):  # AutoGPTQ / AutoAWQ
        if (path / name).exists():
            try:
                legacy = json.loads((path / name).read_text())
            except json.JSONDecodeError as e:
                raise FormatError(f"{path / name} is not valid JSON ({e})") from None
            if not isinstance(legacy, dict):
                raise FormatError(f"{path / name} holds {type(legacy).__name__}, not a JSON object of "
                                  "quantization settings")
            return {"quant_method": method, **legacy}
    if (path / "qdpo_quant.json").is_file():  # qdpo.quant.io.CONFIG_NAME
        raise FormatError(f"{path} is a qdpo packed model, not a gptq, awq or compressed-tensors checkpoint: "
                          "qdpo.load_quantized loads it; to start from it here, convert it first with "
                          f"python -m qdpo.export {path} --format compressed-tensors --out DIR")
    raise FormatError(f"{cfg_file} has no quantization_config: {path} is not a quantized checkpoint "
                      "(quantize it with python -m qdpo.train instead)")


def _spec(bits, group_size, symmetric, what: str) -> QuantSpec:
    if bits not in (4, 8):
        raise FormatError(f"{what}: {bits}-bit weights are not supported; qdpo handles 4 and 8 bits")
    try:
        return QuantSpec(int(bits), int(group_size), bool(symmetric))
    except (ValueError, TypeError) as e:
        raise FormatError(f"{what}: {e}") from None


def _gptq_spec(qc: dict) -> tuple[QuantSpec, dict]:
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise FormatError(f"GPTQ checkpoint_format {fmt!r} is not supported; qdpo reads gptq (v1) and gptq_v2")
    if qc.get("is_marlin_format"):  # AutoGPTQ's repacked layout: other tensors than qweight/qzeros/scales
        raise FormatError("GPTQ is_marlin_format checkpoints (AutoGPTQ's Marlin repacking) are not supported; use "
                          "the plain gptq checkpoint of the model")
    pack = str(qc.get("pack_dtype") or "int32").lower().replace("torch.", "")
    if pack != "int32":  # gptqmodel can pack into int8/int16/int64 words: other shapes, another bit layout
        raise FormatError(f"GPTQ pack_dtype {pack!r} is not supported; qdpo reads checkpoints packed in int32 words "
                          "(gptqmodel's default)")
    return _spec(qc.get("bits"), qc.get("group_size", 128), qc.get("sym", True), "GPTQ"), {"v2": fmt == "gptq_v2"}


def _awq_spec(qc: dict) -> QuantSpec:
    bits = qc.get("bits", qc.get("w_bit"))
    version = str(qc.get("version", qc.get("format", "gemm"))).lower()
    if version != "gemm":
        raise FormatError(f"AWQ version {version!r} is not supported; qdpo reads the GEMM layout")
    if not qc.get("zero_point", True):
        raise FormatError("AWQ without zero points (zero_point: false) is not supported")
    if bits != 4:
        raise FormatError(f"AWQ: {bits}-bit weights are not supported; AWQ GEMM is 4-bit")
    return _spec(bits, qc.get("group_size", qc.get("q_group_size", 128)), False, "AWQ")


def _ct_spec(qc: dict) -> QuantSpec:
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise FormatError(f"compressed-tensors: {len(groups)} config groups; qdpo reads one (one spec per model)")
    group = next(iter(groups.values()))
    fmt = group.get("format") or qc.get("format")
    if fmt != "pack-quantized":
        raise FormatError(f"compressed-tensors format {fmt!r} is not supported; qdpo reads pack-quantized")
    w = group.get("weights") or {}
    if group.get("input_activations") or w.get("type", "int") != "int":
        raise FormatError("compressed-tensors: only weight-only integer quantization (W4A16/W8A16) is supported")
    if w.get("actorder") not in (None, False, "weight"):
        raise FormatError(f"compressed-tensors actorder={w.get('actorder')!r} (act-order g_idx) is not supported")
    strategy = w.get("strategy") or ("channel" if w.get("group_size") in (None, -1) else "group")
    if strategy not in ("group", "channel"):
        raise FormatError(f"compressed-tensors strategy {strategy!r} is not supported; use group or channel")
    g = -1 if strategy == "channel" else w.get("group_size")
    return _spec(w.get("num_bits", 8), g, w.get("symmetric", True), "compressed-tensors")


# ----------------------------------------------------------------------------- tensors
def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, from the files transformers reads: ``model.safetensors`` where it exists
    (an index beside it is stale), else the shards its ``*.safetensors.index.json`` lists (other
    ``*.safetensors`` files beside them are ignored), else every ``*.safetensors`` file, where a tensor stored
    in two files is refused."""
    single = (path / "model.safetensors").is_file()
    shards = None if single else _index_shards(path)
    files = (["model.safetensors"] if single else sorted(shards) if shards is not None
             else sorted(p.name for p in path.glob("*.safetensors")))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLES)
        if pickles:
            raise FormatError(f"{path} holds pickled weights {pickles}; qdpo refuses pickles (they can run code): "
                              "convert the checkpoint to safetensors")
        raise FileNotFoundError(f"{path} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for name in files:
        f = path / name
        try:
            with safe_open(str(f), "pt", device="cpu") as sf:
                keys = [k for k in sf.keys() if shards is None or k in shards[name]]
                if shards is not None and set(shards[name]) - set(keys):
                    raise FormatError(f"{f} lacks {sorted(set(shards[name]) - set(keys))[:3]}, which the index "
                                      "lists there; the download is incomplete or mixes two versions")
                for k in keys:
                    if k in where:
                        raise FormatError(f"{path}: tensor {k!r} is stored in both {where[k]} and {name}; remove "
                                          "the stale file (or add a model.safetensors.index.json naming the shards)")
                    where[k] = name
                    tensors[k] = sf.get_tensor(k)
        except FormatError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
            raise FormatError(f"{f} is not a readable safetensors file ({e})") from None
    return tensors


def _index_shards(path: Path) -> dict[str, list[str]] | None:
    """Shard file → the tensors ``*.safetensors.index.json`` puts there; ``None`` without an index."""
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if not indexes:
        return None
    if len(indexes) > 1:
        raise FormatError(f"{path} holds several safetensors indexes {[p.name for p in indexes]}; keep the one "
                          "of the checkpoint")
    try:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for k, name in weight_map.items():
            shards.setdefault(str(name), []).append(str(k))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{indexes[0]} is not a safetensors index (a JSON object with a 'weight_map'): {e}") from None
    missing = sorted(name for name in shards if not (path / name).is_file())
    if missing:
        raise FormatError(f"{indexes[0].name} lists shard(s) {missing} that {path} does not hold; the download is "
                          "incomplete")
    return shards


def _layer(fmt: str, spec: QuantSpec, parts: dict, details: dict, name: str) -> QuantizedWeight:
    try:
        if fmt == "gptq":
            qw = convert.from_gptq(parts, spec, v2=details.get("v2", False))
        elif fmt == "awq":
            qw = convert.from_awq(parts, spec)
        else:
            qw = convert.from_compressed_tensors(parts, spec)
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None
    if not bool(torch.isfinite(qw.scales).all()):  # as load_quantized checks its own files: NaN outputs, no error
        raise FormatError(f"{name}: the scales hold NaN or Inf; the checkpoint is damaged, download it again")
    return qw


def _default_dtype(tensors: dict) -> torch.dtype:
    """The dtype of the file's full-precision tensors, or float32 when they and the scales differ."""
    dtypes = {t.dtype for k, t in tensors.items() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _cast_exact(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    out = t.to(dtype)
    if out.dtype != t.dtype and not torch.equal(out.to(t.dtype), t):
        raise FormatError(f"{what}: {t.dtype} scales do not convert to {dtype} exactly; load with "
                          "dtype=torch.float32 (exact for every scale dtype)")
    return out


# ----------------------------------------------------------------------------- loading
def load_external(path: str | os.PathLike, mode: str = "train", dtype: torch.dtype | None = None,
                  device="cpu", backend: str = "auto") -> tuple[nn.Module, QuantSpec]:
    """Load a GPTQ, AWQ or compressed-tensors checkpoint as a qdpo model; returns ``(model, spec)``.

    Args:
        path: the checkpoint directory (``config.json`` + ``*.safetensors``).
        mode: ``"train"`` (latent weights start at ŵ, ready for QDPO) or
            ``"packed"`` (the file's codes, run on the dequant-matmul kernels).
        dtype: model dtype. Default: the file's full-precision dtype, or
            float32 when the file mixes dtypes (e.g. bf16 weights, fp16
            scales). Scales are cast to it only where exact (else
            :class:`FormatError`); float32 is exact for every scale dtype.

    In train mode, re-quantizing the latent weights gives the file's codes
    back exactly in float32; in float16/bfloat16 the stored ŵ is rounded and
    an 8-bit code can move by one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if mode not in ("train", "packed"):
        raise ValueError(f"mode={mode!r} is not known; use 'train' or 'packed'")
    path = Path(path)
    fmt, spec, details = read_external_config(path)
    tensors = read_safetensors(path)
    marker = _MARKER[fmt]
    names = sorted(k[: -len(marker) - 1] for k in tensors if k.endswith("." + marker))
    if not names:
        raise FormatError(f"{path} is a {fmt} checkpoint without any '*.{marker}' tensor; the weights are missing")
    dtype = dtype or _default_dtype(tensors)
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build the plain architecture; qdpo fills in the layers
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # the checkpoint's names (Mixtral's block_sparse_moe, one layer per expert) → the model's (qdpo.quant.layout)
    to_model, expert_of = layout.model_names(model), _expert_layers(model)
    quantized, experts = set(), {}
    for name in names:
        if name in expert_of:
            experts.setdefault(expert_of[name][0], []).append(name)
            continue
        target = to_model.get(name + layout.WEIGHT, name + layout.WEIGHT)[: -len(layout.WEIGHT)]
        _install(model, target, fmt, spec, details, tensors, dtype, backend, key=name)
        quantized.add(target)
    for fused, layers in experts.items():
        _install_experts(model, fused, layers, expert_of, fmt, spec, details, tensors, dtype, backend)
        quantized.add(submodule_name(fused))
    _merge_fp_experts(model, tensors, expert_of, set(experts))
    tensors = {to_model.get(k, k): v for k, v in tensors.items()}
    untie_quantized_head(model)
    _load_rest(model, tensors, quantized, path)
    mark_quantized(model, spec)
    if mode == "train":
        for m in [*quantized_layers(model).values(), *quantized_experts(model).values()]:
            m.to_train(dtype)
    log.info("loaded %s checkpoint %s (%s, %d layers)", fmt, path, spec.name, len(names))
    return model.to(device).eval(), spec


def _expert_layers(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """Checkpoint layer → (the fused expert tensor it is part of, its rows there), for every fused expert
    tensor the model's checkpoints store as one linear layer per expert."""
    out = {}
    for fused in fused_expert_tensors(model):
        try:
            layers = layout.expert_layers(model, fused)
        except FormatError:  # kept fused in the checkpoints too (gpt-oss, Llama 4): no layer of the file is one
            continue
        out.update({layer: (fused, rows) for layer, rows in layers.items()})
    return out


def _install_experts(model: nn.Module, fused: str, layers: list[str], expert_of: dict, fmt: str, spec: QuantSpec,
                     details: dict, tensors: dict, dtype: torch.dtype, backend: str) -> None:
    """Gather the file's per-expert quantized layers of one fused expert tensor into a packed
    :class:`~qdpo.quant.experts.QuantExpertTensor` (codes, zero points and scales the file's)."""
    mod_name, _, t = fused.rpartition(".")
    mod = model.get_submodule(mod_name)
    e, o, k = mod._parameters[t].shape
    missing = sorted(n for n, (f, _) in expert_of.items() if f == fused and n not in layers)
    if missing:
        raise FormatError(f"the checkpoint quantizes {len(layers)} of the per-expert layers of {fused} but not "
                          f"{missing[:3]}; qdpo imports a fused expert tensor whole")
    q = QuantExpertTensor(e, o, k, spec, transposed=False, mode="packed", dtype=dtype, backend=backend)
    with torch.no_grad():
        for layer in layers:
            rows = expert_of[layer][1]
            parts = {p: tensors.pop(f"{layer}.{p}") for p in _PARTS[fmt] if f"{layer}.{p}" in tensors}
            qw = _layer(fmt, spec, parts, details, layer)
            if qw.shape != (len(rows), k):
                raise FormatError(f"{layer}: the file's weight is {qw.shape} (N, K), the model's expert layer is "
                                  f"{(len(rows), k)}; config.json does not match the weights")
            q.qweight[rows] = qw.qweight
            q.scales[rows] = _cast_exact(qw.scales, dtype, layer)
            q.zeros[rows] = qw.zeros
    install(mod, t, q)


def _merge_fp_experts(model: nn.Module, tensors: dict, expert_of: dict, quantized: set[str]) -> None:
    """The file's full-precision per-expert layers as the model's fused ``(experts, out, in)`` tensors
    (every layer of a fused tensor present; anything else is left for :func:`_load_rest` to report)."""
    layers: dict[str, list[str]] = {}
    for layer, (fused, _) in expert_of.items():
        layers.setdefault(fused, []).append(layer)
    for fused, names in layers.items():
        if fused in quantized or not all(n + layout.WEIGHT in tensors for n in names):
            continue
        mod, _, t = fused.rpartition(".")
        shape = model.get_submodule(mod)._parameters[t].shape
        parts = [tensors.pop(n + layout.WEIGHT) for n in names]
        whole = parts[0].new_empty(shape[0] * shape[1], shape[2])
        for n, part in zip(names, parts):
            whole[expert_of[n][1]] = part
        tensors[fused] = whole.view(shape)


def _install(model: nn.Module, name: str, fmt: str, spec: QuantSpec, details: dict, tensors: dict,
             dtype: torch.dtype, backend: str, key: str | None = None) -> None:
    """Replace the Linear at ``name`` by a packed :class:`QuantLinear` holding the file's weight (the file's
    layer ``key``, by default ``name``)."""
    key = key or name
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise FormatError(f"the checkpoint quantizes {key!r}, which {type(model).__name__} does not have") from None
    if not isinstance(old, nn.Linear):
        raise FormatError(f"the checkpoint quantizes {key!r}, a {type(old).__name__}; qdpo imports nn.Linear layers")
    parts = {p: tensors.pop(f"{key}.{p}") for p in _PARTS[fmt] if f"{key}.{p}" in tensors}
    qw = _layer(fmt, spec, parts, details, key)
    if qw.shape != (old.out_features, old.in_features):
        raise FormatError(f"{name}: the file's weight is {qw.shape} (N, K), the model's layer is "
                          f"{(old.out_features, old.in_features)}; config.json does not match the weights")
    bias = tensors.pop(f"{key}.bias", None)
    if bias is not None and old.bias is None and not bool(bias.any()):
        bias = None  # some GPTQ writers store a zero bias for every layer
    if (bias is None) != (old.bias is None):
        raise FormatError(f"{name}: the layer {'has' if old.bias is not None else 'has no'} bias but the file "
                          f"{'has none' if bias is None else 'has one'}")
    q = QuantLinear(old.in_features, old.out_features, spec, bias=bias is not None, mode="packed", dtype=dtype,
                    backend=backend)
    with torch.no_grad():
        q.qweight.copy_(qw.qweight)
        q.scales.copy_(_cast_exact(qw.scales, dtype, name))
        q.zeros.copy_(qw.zeros)
        if bias is not None:
            q.bias.copy_(bias.to(dtype))
    set_module(model, name, q)


def _load_rest(model: nn.Module, tensors: dict, quantized: set[str], path: Path) -> None:
    """Load the non-quantized tensors; every one the model needs must be present with its shape."""
    expected = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in quantized}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    tied = {f"{head_name}.weight"} if head_name and getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(k for k in expected if k not in tensors and k not in tied)
    if missing:
        raise FormatError(f"{path} has no tensor(s) {missing[:5]}; the checkpoint is incomplete or from another model")
    extra = sorted(k for k in tensors if k not in expected)
    if extra:
        raise FormatError(f"{path} has tensors the model does not expect: {extra[:5]}; wrong config.json?")
    for k in expected:
        if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape):
            raise FormatError(f"{path}: tensor {k!r} has shape {tuple(tensors[k].shape)}, the model expects "
                              f"{tuple(expected[k].shape)}")
    if tied:
        _untie_distinct_head(model, tensors, head, head_name, path)
    model.load_state_dict({k: t for k, t in tensors.items()}, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _untie_distinct_head(model: nn.Module, tensors: dict, head: nn.Module, head_name: str, path: Path) -> None:
    """A config that ties the LM head to the input embeddings while the file holds both, with different values:
    transformers then keeps them apart (warning), and so does qdpo. Tied, the one loaded last replaced the
    other."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_name = next((n for n, m in model.named_modules() if emb is not None and m is emb), None)
    a, b = tensors.get(f"{head_name}.weight"), tensors.get(f"{emb_name}.weight")
    if a is None or b is None or a.shape != b.shape or torch.equal(a, b):
        return
    log.warning("%s: config.json ties %s to the input embeddings, but the checkpoint stores both with different "
                "values; they are kept apart (as transformers does)", path, head_name)
    for c in (model.config, getattr(model.config, "text_config", None)):
        if c is not None and getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    head.weight = nn.Parameter(head.weight.detach().clone())


# ----------------------------------------------------------------------------- the pipeline's entry point
def quantize_initial_from(path: str | os.PathLike, fp_model_like: nn.Module,
                          spec: QuantSpec | None = None) -> tuple[nn.Module, dict]:
    """The pipeline's initial quantized model read from an existing checkpoint (``--init PATH``).

    Returns ``(model, stats)`` like ``qdpo.training.stages.quantize_initial``:
    a train-mode copy in ``fp_model_like``'s dtype and device whose codes,
    zero points and scales are the checkpoint's, and
    ``{"init": "external", "path", "format", "spec", "layers", "expert_tensors"}``.

    Raises :class:`FormatError` (a ``ValueError``) when the checkpoint is
    unsupported, when its architecture differs from ``fp_model_like`` (layer
    names or shapes), or when ``spec`` is given and differs from the
    checkpoint's.
    """
    p = next(fp_model_like.parameters())
    fmt, file_spec, _ = read_external_config(path)
    if spec is not None and spec != file_spec:
        raise FormatError(f"{path} is quantized {file_spec.name}, but {spec.name} was asked for; drop the "
                          "--bits/--group-size/--symmetric flags or make them match the checkpoint")
    model, file_spec = load_external(path, mode="train", dtype=p.dtype)
    _check_same_architecture(model, fp_model_like, path)
    model = model.to(p.device)
    stats = {"init": "external", "path": str(path), "format": fmt, "spec": file_spec.to_dict(),
             "layers": len(quantized_layers(model)), "expert_tensors": len(quantized_experts(model))}
    return model, stats


def _check_same_architecture(model: nn.Module, fp: nn.Module, path) -> None:
    """Same state-dict names and shapes as ``fp`` (a quantized layer's latent ``weight`` standing for its Linear)."""
    qnames = set(quantized_layers(model))
    experts = {submodule_name(n): (n, q) for n, q in quantized_experts(model).items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()
           if not (k.rsplit(".", 1)[0] in qnames | set(experts) and k.rsplit(".", 1)[1] in ("scales", "zeros"))}
    for sub, (name, q) in experts.items():  # the latent weight (E·out, in) stands for the fused tensor
        got.pop(f"{sub}.weight", None)
        got[name] = (q.experts, *((q.in_features, q.out_features) if q.transposed else (q.out_features, q.in_features)))
    want = {k: tuple(v.shape) for k, v in fp.state_dict().items()}
    bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    if bad:
        k = bad[0]
        raise FormatError(f"{path} does not fit the full-precision model: {k} is {got.get(k, 'absent')} in the "
                          f"checkpoint and {want.get(k, 'absent')} in the model ({len(bad)} differences); "
                          "pass the checkpoint of the same model as --model")
