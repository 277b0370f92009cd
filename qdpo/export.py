"""``python -m qdpo.export``: a qdpo packed model as a checkpoint other tools load without qdpo.

Reads a directory written by :func:`qdpo.quant.io.save_quantized` (or a run
directory of ``python -m qdpo.train``, taking its ``export_<method>/``) and
writes a Hugging Face checkpoint: ``config.json`` with the format's
``quantization_config``, ``model.safetensors`` in the format's layout
(:mod:`qdpo.quant.convert`; above ``--max-shard-size``, 5GB by default as in
transformers, shards ``model-0000k-of-0000n.safetensors`` and their
``model.safetensors.index.json``), and the tokenizer files copied as they are (other weight files
beside the packed model are not: they belong to an older model).

* ``compressed-tensors`` (``pack-quantized``; W4/W8, symmetric and
  asymmetric, every group size and per-channel): ``AutoModelForCausalLM.
  from_pretrained(dir)`` loads it with the ``compressed-tensors`` package and
  reproduces qdpo's packed model's logits exactly in fp32. Asymmetric exports
  carry ``"dequantize": true`` in the ``quantization_config``: compressed-
  tensors 0.20 otherwise allocates the zero points unpacked and the load
  fails with a size mismatch; transformers then dequantizes at load time.
  Tensors take the names and layouts of the model's own checkpoints
  (:mod:`qdpo.quant.layout`); a mixture of experts' fused expert tensors
  become one layer per expert and product, and the export carries
  ``"dequantize": true``, the only way transformers loads compressed experts.
  transformers (5.25) cannot load asymmetric experts (its MoE loader drops
  their zero points); :func:`check_layers` checks such files layer by layer
  with compressed-tensors' own decompressor.
* ``gptq`` (v1; W4/W8) and ``awq`` (GEMM; W4): load in transformers through
  ``optimum`` + ``gptqmodel`` (``make interop-check``). Both store float16
  scales: see :mod:`qdpo.quant.convert` for what is exact.

Examples::

    python -m qdpo.export runs/default --format compressed-tensors --out exported/ct
    python -m qdpo.export runs/default/export_qdpo --format gptq --out exported/gptq --allow-inexact-scales

Output is written to a temporary directory beside ``--out`` and renamed into
place, so an interrupted export never leaves a directory that loads; an
existing non-empty ``--out`` is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qdpo.quant import convert, layout
from qdpo.quant.convert import FORMATS, FormatError
from qdpo.quant.experts import PREFIX, fused_expert_tensors, moe_routers
from qdpo.quant.format import QuantizedWeight
from qdpo.quant.io import CONFIG_NAME, WEIGHTS_NAME, _check_grids, read_quant_config
from qdpo.quant.spec import QuantSpec

log = logging.getLogger("qdpo.export")
# Files of a qdpo packed model that the export rewrites instead of copying.
_REWRITTEN = {CONFIG_NAME, WEIGHTS_NAME, "config.json"}
# Weight files are never copied: beside a packed model they are an older model's (save_quantized into its
# directory), and loaders would read them with or instead of the export's (qdpo's importer follows an index).
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt",
                    ".pkl", ".gguf")


# transformers' save_pretrained default: a loader holds one shard at a time, and hubs cap file sizes.
DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ExportError(ValueError):
    """A user error: printed as one line, without a traceback."""


# ----------------------------------------------------------------------------- source and destination
def find_export(path: str | os.PathLike, method: str | None = None) -> Path:
    """The qdpo packed model at ``path``: the directory itself, or a run directory's ``export_<method>/``.

    A run directory with several exports needs ``method`` unless it has
    ``export_qdpo/``, which is taken.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if not p.is_dir():
        raise ExportError(f"{p} is a file; pass the directory written by qdpo.save_quantized or a run directory")
    if (p / CONFIG_NAME).exists():
        if method and p.name != f"export_{method}":
            raise ExportError(f"--method {method} chooses among a run directory's exports, and {p} is a packed "
                              "model itself; drop --method, or pass the run directory")
        return p
    found = {d.name[len("export_"):]: d for d in sorted(p.glob("export_*")) if (d / CONFIG_NAME).exists()}
    if method:
        if method not in found:
            raise ExportError(f"{p} has no qdpo export export_{method}/ (found: {sorted(found) or 'none'})")
        return found[method]
    if len(found) == 1:
        return next(iter(found.values()))
    if "qdpo" in found:
        log.info("%s holds exports %s; using export_qdpo (pass --method to choose)", p, sorted(found))
        return found["qdpo"]
    if found:
        raise ExportError(f"{p} holds several exports {sorted(found)}; pass --method to choose one")
    raise ExportError(f"{p} is not a qdpo export: it has no {CONFIG_NAME} and no export_<method>/ with one"
                      + _what_is_it(p))


def _what_is_it(p: Path) -> str:
    if (p / "run.json").is_file():  # a python -m qdpo.train run directory: trained with --no-export, or unfinished
        return (" (a python -m qdpo.train run directory without exports: rerun its command with --resume and "
                "without --no-export to write export_<method>/)")
    try:
        qc = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return ""
    if qc.get("quant_method"):
        return (f" (it is a {qc['quant_method']} checkpoint already; qdpo.quant.importers.load_external "
                "reads those)")
    return " (a plain model? quantize it with python -m qdpo.train or qdpo.quantize_model first)"


def _check_out(out: Path, overwrite: bool, src: Path) -> None:
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ExportError(f"--out {out} is inside the model being exported; choose another directory")
    if out.resolve() in src.resolve().parents:  # --overwrite would delete the source (a run directory) with it
        raise ExportError(f"--out {out} holds the model being exported ({src}); choose another directory")
    here = Path.cwd().resolve()
    if out.resolve() in (here, *here.parents):  # `--out .`: the export replaces --out whole, and the shell's cwd
        raise ExportError(f"--out {out} is the current directory (or holds it), which the export would replace as a "
                          f"whole; name a new directory, e.g. --out {out / 'model-export'}")
    blocked = next((d for d in out.resolve().parents if d.exists() and not d.is_dir()), None)
    if blocked is not None:
        raise ExportError(f"--out {out} cannot be made: {blocked} is a file; choose another directory")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; an old ``out`` is removed only after the rename."""
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif overwrite:
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        else:
            raise ExportError(f"--out {out} appeared while exporting; pass --overwrite to replace it")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


# ----------------------------------------------------------------------------- conversion
def _skeleton(src: Path) -> nn.Module:
    """The model's module tree on the meta device (no memory): names, classes and shapes of its layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(src))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{src}/config.json does not describe a transformers causal LM: {e}") from None


def _plan(model: nn.Module, modules: list[str], spec: QuantSpec, fmt: str) -> list[str]:
    """Check every quantized layer against the model and the format; returns the layers left unquantized
    (Linear layers and MoE routers), by their names in the model and in its checkpoints."""
    head = model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    bad = []
    for name in modules:
        m = model.get_submodule(name) if _has(model, name) else None
        if not isinstance(m, nn.Linear):
            what = "does not exist" if m is None else f"is a {type(m).__name__}, not an nn.Linear"
            bad.append(f"{name} {what} in {type(model).__name__}")
            continue
        try:
            convert.check_exportable(spec, m.out_features, m.in_features, fmt)
        except FormatError as e:
            bad.append(f"{name}: {e}")
    left = sorted(set(linears) - set(modules))
    head_name = next((n for n, m in linears.items() if m is head), None)
    if fmt != "compressed-tensors" and head_name in modules:  # their loaders replace the decoder's layers only
        bad.append(f"{fmt} export of a quantized LM head ({head_name}, from a checkpoint given to --init that "
                   f"quantizes it): transformers' {fmt} loader keeps the LM head in full precision and would not "
                   "read it; export as compressed-tensors, which loads it quantized")
    if fmt != "compressed-tensors" and [n for n in left if n != head_name]:
        bad.append(f"{fmt} export needs every Linear layer but the LM head quantized; {left[:3]} are not: "
                   "export as compressed-tensors, whose 'ignore' list can name them")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        conv = any("is a Conv1D" in b for b in bad)
        hint = ("; these formats describe nn.Linear layers only (GPT-2's Conv1D stores its weight transposed, "
                "and loaders do not replace it): keep the qdpo packed model, which qdpo.load_quantized reads"
                if conv else "")
        raise ExportError("; ".join(bad[:3]) + more + hint)
    # each under the model's name (transformers matches those) and its checkpoints' (other loaders may)
    names = set(left) | moe_routers(model)
    return sorted(names | {layout.checkpoint_name(model, n) for n in names})


def _check_packed(model: nn.Module, tensors: dict[str, torch.Tensor], modules: list[str], spec: QuantSpec,
                  where: Path) -> None:
    """Every quantized layer's tensors have the shapes ``spec`` gives its layer, and every zero point is on its grid,
    as :func:`qdpo.quant.io.load_quantized` checks: a ``qdpo_quant.json`` that does not match the weights (a W8
    per-channel file declared W4) was otherwise converted into a checkpoint that loads garbage."""
    for name in modules:
        m = model.get_submodule(name)
        n, k = m.out_features, m.in_features
        g = 1 if spec.group_size == -1 else k // spec.group_size
        for part, shape in (("qweight", (n, k * spec.bits // 8)), ("scales", (n, g)), ("zeros", (n, g))):
            t = tensors.get(f"{name}.{part}")
            if t is not None and tuple(t.shape) != shape:
                raise ExportError(f"{where}: {name}.{part} has shape {tuple(t.shape)}, but the ({n}, {k}) layer "
                                  f"quantized {spec.name} (the spec {CONFIG_NAME} declares) has {shape}: "
                                  f"{CONFIG_NAME} does not match the weights; save the model again")
    _check_grids(tensors, spec, where)


def _check_declared(tensors: dict[str, torch.Tensor], modules: list[str], experts: list[str], aliases: dict,
                    src: Path) -> None:
    """Every packed layer of the file is one ``qdpo_quant.json`` declares, and every alias names a stored tensor, as
    :func:`qdpo.quant.io.load_quantized` requires: an undeclared layer's codes were otherwise written under qdpo's
    names beside a layer the export calls full precision, which transformers filled with random weights."""
    owners = set(modules) | {f"{mod}.{PREFIX}{t}" for mod, _, t in (e.rpartition(".") for e in experts)}
    stray = sorted(k for k in tensors if k.endswith(".qweight") and k[: -len(".qweight")] not in owners)
    if stray:
        raise ExportError(f"{src / WEIGHTS_NAME} holds the packed layer {stray[0][: -len('.qweight')]} "
                          f"({len(stray)} in all) that {CONFIG_NAME} does not list; the two do not match, save "
                          "the model again")
    lost = sorted(a for a, t in aliases.items() if t not in tensors)
    if lost:
        raise ExportError(f"{src / CONFIG_NAME}: alias {lost[0]!r} names {aliases[lost[0]]!r}, which "
                          f"{WEIGHTS_NAME} does not hold; save the model again")


def _untie_quantized_head(config: dict, model: nn.Module, modules: list[str]) -> None:
    """A quantized LM head (an --init checkpoint's) is no longer the full-precision input embeddings: a
    ``config.json`` that still ties them makes transformers tie the compressed head to the embeddings, and
    the load fails (the head has no ``weight``). The export says they are separate, as its tensors are."""
    head = model.get_output_embeddings()
    if next((n for n, m in model.named_modules() if m is head), None) not in modules:
        return
    for c in (config, config.get("text_config")):  # set even where absent: a config class may tie by default
        if isinstance(c, dict):
            c["tie_word_embeddings"] = False


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def convert_state_dict(tensors: dict[str, torch.Tensor], modules: list[str], spec: QuantSpec, fmt: str,
                       allow_inexact_scales: bool = False) -> dict[str, torch.Tensor]:
    """A qdpo packed state dict in ``fmt``'s tensor names and layouts; other tensors are kept as they are."""
    out = dict(tensors)
    for name in modules:
        parts = {}
        for part in ("qweight", "scales", "zeros"):
            t = out.pop(f"{name}.{part}", None)
            if t is None:
                raise ExportError(f"the qdpo export has no tensor {name}.{part}; it is incomplete, save it again")
            parts[part] = t
        n, k = parts["qweight"].shape[0], parts["qweight"].shape[1] * 8 // spec.bits
        qw = QuantizedWeight(parts["qweight"], parts["scales"], parts["zeros"], spec, (n, k), parts["scales"].dtype)
        try:
            if fmt == "compressed-tensors":
                new = convert.to_compressed_tensors(qw)
            elif fmt == "gptq":
                new = convert.to_gptq(qw, allow_inexact_scales)
            else:
                new = convert.to_awq(qw, allow_inexact_scales)
        except FormatError as e:
            raise FormatError(f"{name}: {e}") from None
        out.update({f"{name}.{k_}": v for k_, v in new.items()})
    return out


# qdpo saves a model under its module names; the export writes the names and layouts of the model's own
# checkpoints (qdpo.quant.layout): Mixtral's block_sparse_moe, one linear layer per expert and product.
def _checkpoint_layout(model: nn.Module, tensors: dict[str, torch.Tensor], modules: list[str], spec: QuantSpec,
                       fmt: str, allow_inexact_scales: bool,
                       experts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A qdpo packed state dict in ``fmt``'s layouts and the checkpoint's names: each quantized linear layer
    converted, each quantized fused expert tensor split into one converted layer per expert and product,
    every other tensor named as ``save_pretrained`` names it."""
    layers = {layout.checkpoint_name(model, n): {p: tensors.pop(f"{n}.{p}", None) for p in ("qweight", "scales", "zeros")}
              for n in modules}
    for name, parts in experts.items():
        mod, _, tensor = name.rpartition(".")
        whole = {p: tensors.pop(f"{mod}.{PREFIX}{tensor}.{p}", None) for p in ("qweight", "scales", "zeros")}
        for layer, rows in parts.items():
            layers[layer] = {p: None if t is None else t[rows].contiguous() for p, t in whole.items()}
    # fused expert tensors left in full precision keep the model's name and layout: transformers reads
    # them as they are, while per-expert full-precision layers beside compressed ones fail its loader
    fp_experts = {n: tensors.pop(n) for n in fused_expert_tensors(model) if n in tensors}
    out = {**layout.revert(model, tensors), **fp_experts}
    for key in out:
        if key.endswith(".weight") and key[: -len(".weight")] in layers:
            raise ExportError(f"{key} is both a full-precision tensor and a quantized layer of the export; "
                              "save the model again")
    flat = {f"{layer}.{p}": t for layer, parts in layers.items() for p, t in parts.items() if t is not None}
    out.update(convert_state_dict(flat, list(layers), spec, fmt, allow_inexact_scales))
    return out


def quantization_config(fmt: str, spec: QuantSpec, ignore: list[str]) -> dict:
    """The ``quantization_config`` entry of ``config.json`` that makes transformers load ``fmt``."""
    g = spec.group_size
    if fmt == "compressed-tensors":
        weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
                   "strategy": "channel" if g == -1 else "group", "group_size": None if g == -1 else g,
                   "dynamic": False, "actorder": None, "observer": "minmax"}
        qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "quantization_status": "compressed", "global_compression_ratio": None, "kv_cache_scheme": None,
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                            "output_activations": None, "format": "pack-quantized"}},
              "ignore": ignore}
        if not spec.symmetric:  # compressed-tensors 0.20 cannot load packed zero points otherwise
            qc["dequantize"] = True
        return qc
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": spec.bits, "group_size": g, "desc_act": False,
                "sym": spec.symmetric, "true_sequential": True, "damp_percent": 0.01, "static_groups": False,
                "lm_head": False, "checkpoint_format": "gptq", "pack_dtype": "int32",
                "meta": {"quantizer": ["qdpo:0.1.0"]}}
    return {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": ignore or None}


def asymmetric_experts(path: str | os.PathLike) -> bool:
    """Whether the qdpo packed model at ``path`` has quantized expert tensors on asymmetric grids: their
    compressed-tensors export is one transformers (5.25) cannot load (see :func:`export`)."""
    qcfg = read_quant_config(path)
    return bool(qcfg["experts"]) and not qcfg["spec"].symmetric


def check_layers(path: str | os.PathLike) -> dict:
    """Decompress every quantized layer of the compressed-tensors export at ``path`` with compressed-tensors'
    own decompressor and compare it with qdpo's reading of the same tensors (:func:`~qdpo.quant.convert.
    from_compressed_tensors`, dequantized in fp32): ``{"layers": count, "max_abs_diff": float}``. Needs the
    ``compressed-tensors`` package."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from qdpo.kernels import reference
    from qdpo.quant.importers import read_external_config, read_safetensors

    path = Path(path)
    fmt, spec, _ = read_external_config(path)
    if fmt != "compressed-tensors":
        raise ExportError(f"{path} is a {fmt} checkpoint; check_layers reads compressed-tensors exports")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    group = next(iter(qc["config_groups"].values()))
    scheme = QuantizationScheme.model_validate({k: group[k] for k in ("targets", "weights") if k in group})
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    tensors = read_safetensors(path)  # model.safetensors or the shards its index lists
    worst, count = 0.0, 0
    for key in sorted(k for k in tensors if k.endswith(".weight_packed")):
        layer = key[: -len(".weight_packed")]
        parts = {p: tensors[f"{layer}.{p}"] for p in ("weight_packed", "weight_scale", "weight_zero_point",
                                                      "weight_shape") if f"{layer}.{p}" in tensors}
        theirs = compressor.decompress(parts, scheme)["weight"].float()
        qw = convert.from_compressed_tensors(parts, spec)
        ours = reference.dequantize(qw.qweight, qw.scales, qw.zeros, spec.bits, torch.float32)
        if theirs.shape != ours.shape:
            raise ExportError(f"{layer}: compressed-tensors decompresses it to {tuple(theirs.shape)}, qdpo reads "
                              f"{tuple(ours.shape)}")
        worst, count = max(worst, float((theirs - ours).abs().max())), count + 1
    return {"layers": count, "max_abs_diff": worst}


def parse_size(size: str | int) -> int:
    """Bytes in ``size``: a count, or ``"5GB"`` / ``"500MB"`` / ``"2GiB"`` (GB = 10⁹, GiB = 2³⁰, as transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(size), re.IGNORECASE)
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]) if m else 0
    if n <= 0:
        raise ExportError(f"--max-shard-size {size!r} is not a positive size; write e.g. 5GB, 500MB or 2GiB")
    return n


def _save_weights(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int) -> None:
    """``model.safetensors``, or where the tensors exceed ``max_bytes`` shards of at most that size (a larger
    tensor gets a shard of its own) named ``model-0000k-of-0000n.safetensors``, in name order so each layer's
    tensors lie together, and ``model.safetensors.index.json`` mapping each tensor to its shard."""
    shards, size = [[]], 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards, size = [*shards, []], 0
        shards[-1].append(k)
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise ExportError(f"{path} is not a readable safetensors file ({e}); save the model again") from None


def export(src: str | os.PathLike, out: str | os.PathLike, fmt: str = "compressed-tensors",
           overwrite: bool = False, allow_inexact_scales: bool = False, method: str | None = None,
           max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write the qdpo packed model at ``src`` (or a run directory's export) to ``out`` in ``fmt``; returns ``out``.

    Weights larger than ``max_shard_size`` (bytes, or ``"5GB"``-style) are written as shards with an index."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    max_bytes = parse_size(max_shard_size)
    src, out = find_export(src, method), Path(out)
    _check_out(out, overwrite, src)
    qcfg = read_quant_config(src)
    spec, modules = qcfg["spec"], list(qcfg["modules"])
    experts = list(qcfg["experts"])
    if experts and fmt != "compressed-tensors":
        raise ExportError(f"{src} holds {len(experts)} quantized fused expert tensors (a mixture of experts); "
                          f"{fmt} checkpoints of those are not supported: export as compressed-tensors")
    if experts and not spec.symmetric:
        log.warning("%s: asymmetric expert layers (%s): transformers (5.25) cannot load them, its MoE loader drops "
                    "their zero points; loaders with asymmetric compressed-tensors MoE support read them (recent "
                    "vLLM and SGLang list it; not checked here). Each layer decompresses to qdpo's weights with "
                    "compressed-tensors' own decompressor (qdpo.export.check_layers)", src, spec.name)
    skeleton = _skeleton(src)
    ignore = _plan(skeleton, modules, spec, fmt)
    config = json.loads((src / "config.json").read_text())
    tensors = _read_tensors(src / WEIGHTS_NAME)
    _check_packed(skeleton, tensors, modules, spec, src / WEIGHTS_NAME)
    _check_declared(tensors, modules, experts, qcfg["aliases"], src)
    for alias, target in qcfg["aliases"].items():  # tied weights: transformers ties them again on load
        if not config.get("tie_word_embeddings", False) and target in tensors:
            tensors[alias] = tensors[target].clone()
    _untie_quantized_head(config, skeleton, modules)
    expert_parts = {name: layout.expert_layers(skeleton, name) for name in experts}  # checked before any work
    tensors = _checkpoint_layout(skeleton, tensors, modules, spec, fmt, allow_inexact_scales, expert_parts)
    config["quantization_config"] = quantization_config(fmt, spec, ignore)
    if experts:  # transformers reads a mixture of experts' compressed experts only by dequantizing them
        config["quantization_config"]["dequantize"] = True
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _save_weights(tensors, tmp, max_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for f in sorted(src.iterdir()):  # tokenizer, chat template, generation config; no weight file
            if f.is_file() and not (f.name in _REWRITTEN or f.name.startswith(".") or f.name.endswith(_WEIGHT_SUFFIXES)):
                shutil.copy2(f, tmp / f.name)
        _publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s, %d layers) to %s", src, spec.name, len(modules), out)
    return out


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qdpo.export", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("source", help="a qdpo packed model directory (export_<method>/) or a run directory")
    p.add_argument("--format", required=True, choices=FORMATS, help="checkpoint format to write")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --overwrite)")
    p.add_argument("--method", default=None,
                   help="which export_<method>/ of a run directory (default: its only one, or else export_qdpo)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--allow-inexact-scales", action="store_true",
                   help="gptq/awq: round scales float16 cannot hold exactly to nearest instead of refusing")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="largest weight file; bigger models are written as model-0000k-of-0000n.safetensors shards "
                        "with a model.safetensors.index.json (e.g. 500MB, 2GiB; default: %(default)s, as transformers)")
    p.add_argument("--check", action="store_true",
                   help="compressed-tensors: decompress every layer written with compressed-tensors' own "
                        "decompressor and compare it with qdpo's reading (needs the compressed-tensors package)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.check and args.format != "compressed-tensors":
            raise ExportError(f"--check reads compressed-tensors exports, not {args.format}")
        if args.check and importlib.util.find_spec("compressed_tensors") is None:
            raise ExportError("--check needs the compressed-tensors package: pip install compressed-tensors")
        src = find_export(args.source, args.method)
        out = export(src, args.out, args.format, args.overwrite, args.allow_inexact_scales,
                     max_shard_size=args.max_shard_size)
        checked = check_layers(out) if args.check else None
    except (ValueError, OSError) as e:  # ExportError, FormatError, a bad qdpo_quant.json, a missing file
        print(f"qdpo.export: error: {e}", file=sys.stderr)
        return 2
    if args.format == "compressed-tensors" and asymmetric_experts(src):
        print(f"wrote {out} ({args.format}, from {src}); transformers cannot load its asymmetric experts, "
              "loaders with asymmetric compressed-tensors MoE support can; qdpo reads it with "
              f"qdpo.quant.importers.load_external({str(out)!r})")
    else:
        print(f"wrote {out} ({args.format}, from {src}); load it with "
              f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
              + (" (needs the compressed-tensors package)" if args.format == "compressed-tensors" else
                 " (needs the optimum and gptqmodel packages)"))
    if checked is not None:
        print(f"checked {checked['layers']} layers with compressed-tensors' decompressor: max |Δw| vs qdpo's "
              f"reading = {checked['max_abs_diff']:.3g}")
        if checked["max_abs_diff"] != 0:  # both compute (q - z)·s in fp32: any difference is a wrong tensor
            print(f"qdpo.export: error: compressed-tensors reads {out} differently from qdpo; do not deploy it",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
