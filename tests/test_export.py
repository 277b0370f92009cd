"""python -m qdpo.export and qdpo.quant.importers on tiny Llamas built from configs.

The compressed-tensors exports are loaded by ``transformers`` in a fresh
interpreter in which importing qdpo fails, and must give qdpo's packed
model's fp32 logits exactly. GPTQ/AWQ loading through transformers needs
``optimum`` + ``gptqmodel`` (``make interop-check``) and is skipped without.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from qdpo import QuantSpec
from qdpo.export import main as export_main
from qdpo.kernels import ops
from qdpo.quant import (load_quantized, quantizable_layers, quantize_model, quantized_layers, save_quantized,
                        to_packed)
from qdpo.quant.convert import FormatError
from qdpo.quant.importers import load_external, quantize_initial_from
from qdpo.quant.linear import frozen_weights
from tests.conftest import assert_close_2x, assert_exact

VOCAB = 96
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
HAS_INTEROP = all(importlib.util.find_spec(m) is not None for m in ("gptqmodel", "optimum"))
TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0"}', "chat_template.jinja": "{{ messages }}"}


def tiny_llama(odd: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """hidden 128 fits every group size; ``odd``: q N=72, k/v N=36, MLP N=180 (per-channel only)."""
    torch.manual_seed(seed)
    kw = dict(head_dim=18, intermediate_size=180) if odd else dict(intermediate_size=256)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, **kw)
    return LlamaForCausalLM(cfg).eval()


def packed_export(path: Path, spec: QuantSpec, odd: bool = False, fp16_scales: bool = False, seed: int = 0):
    """qdpo.quantize_model + to_packed + save_quantized; returns (dir, packed model, fp32 logits)."""
    model = tiny_llama(odd, seed)
    grids = None
    if fp16_scales:  # GPTQ/AWQ store float16 scales: make them exact in an fp32 model
        grids = {}
        for name, m in quantizable_layers(model).items():
            s, z = ops.qparams(m.weight.detach().half(), spec.bits, spec.group_size, spec.symmetric)
            grids[name] = (s.float(), z)
    quantize_model(model, spec, grids=grids)
    to_packed(model)
    save_quantized(model, path)
    for name, text in TOKENIZER_FILES.items():
        (path / name).write_text(text)
    with torch.no_grad():
        logits = model(IDS).logits
    return path, model, logits


def run_export(*argv) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = export_main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def assert_user_error(rc: int, err: str, match: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qdpo.export: error:") and "Traceback" not in err, err
    assert match in lines[0], lines[0]


def assert_same_layers(a, b) -> None:
    la, lb = quantized_layers(a), quantized_layers(b)
    assert sorted(la) == sorted(lb)
    for name in la:
        qa, qb = la[name].quantized_weight(), lb[name].quantized_weight()
        assert_exact(qb.qweight, qa.qweight, f"{name} codes")
        assert_exact(qb.zeros, qa.zeros, f"{name} zeros")
        assert_exact(qb.scales.to(qa.scales.dtype), qa.scales, f"{name} scales")


# A fresh interpreter that cannot import qdpo loads each checkpoint with transformers alone.
LOADER = r"""
import importlib.abc, json, sys

class NoQdpo(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "qdpo":
            raise ImportError("qdpo must not be imported here")

sys.meta_path.insert(0, NoQdpo())
import torch
from transformers import AutoModelForCausalLM

for job in json.loads(sys.argv[1]):
    kwargs = {}
    if job.get("backend") == "gptq":
        from transformers import GPTQConfig
        kwargs["quantization_config"] = GPTQConfig(bits=job["bits"], backend="torch")
    elif job.get("backend") == "awq":
        from transformers import AwqConfig
        kwargs["quantization_config"] = AwqConfig(backend="torch_awq")
    model = AutoModelForCausalLM.from_pretrained(job["dir"], device_map="cpu", **kwargs).eval()
    result = {}
    with torch.no_grad():
        result["logits"] = model(torch.load(job["ids"])).logits.float()
        result["layers"] = [type(m).__name__ for m in model.modules()]
        if job.get("experts"):  # the expert tensors as transformers holds them after loading
            result["experts"] = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
        if job.get("backend") == "gptq":
            result["w"] = model.model.layers[0].mlp.down_proj.dequantize_weight()
        elif job.get("backend") == "awq":
            from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
            m = model.model.layers[0].mlp.down_proj
            result["w"] = dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, m.group_size)
    torch.save(result, job["out"])
assert "qdpo" not in sys.modules
print("loaded without qdpo")
"""


def load_elsewhere(tmp: Path, jobs: list[dict]) -> list[dict]:
    torch.save(IDS, tmp / "ids.pt")
    for i, job in enumerate(jobs):
        job.update(ids=str(tmp / "ids.pt"), out=str(tmp / f"result{i}.pt"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "loaded without qdpo" in proc.stdout, proc.stderr[-3000:]
    return [torch.load(job["out"]) for job in jobs]


# ----------------------------------------------------------------------------- compressed-tensors in transformers
CT_CASES = {  # name: (spec, odd shapes)
    "W4-g32-asym": (QuantSpec(4, 32, False), False),
    "W8-ch-sym-odd": (QuantSpec(8, -1, True), True),
    "W4-ch-asym-odd": (QuantSpec(4, -1, False), True),
    "W8-g128-asym": (QuantSpec(8, 128, False), False),
    "W4-g64-sym": (QuantSpec(4, 64, True), False),
}


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="needs compressed-tensors")
def test_compressed_tensors_export_loads_in_transformers_alone_with_identical_logits(tmp_path):
    jobs, expected = [], []
    for i, (name, (spec, odd)) in enumerate(CT_CASES.items()):
        src, _, logits = packed_export(tmp_path / f"src_{name}", spec, odd, seed=i)
        rc, out, err = run_export(src, "--format", "compressed-tensors", "--out", tmp_path / f"ct_{name}")
        assert rc == 0, err
        jobs.append({"dir": str(tmp_path / f"ct_{name}")})
        expected.append((name, logits))
    for (name, logits), got in zip(expected, load_elsewhere(tmp_path, jobs)):
        assert "Linear" in got["layers"]
        assert_exact(got["logits"], logits, f"{name} logits")  # fp32: ŵ = (q - z)·s in both, then F.linear


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="needs compressed-tensors")
def test_export_shards_by_max_shard_size_and_every_reader_follows_the_index(tmp_path):
    # exports were always one model.safetensors, whatever the model's size
    src, model, logits = packed_export(tmp_path / "src", QuantSpec(4, 32, False))
    rc, out, err = run_export(src, "--format", "compressed-tensors", "--out", tmp_path / "ct",
                              "--max-shard-size", "20KB", "--check")
    assert rc == 0 and "max |Δw| vs qdpo's reading = 0" in out, err
    ct = tmp_path / "ct"
    shards = sorted(p.name for p in ct.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((ct / "model.safetensors.index.json").read_text())
    stored = {}
    for name in shards:
        part = load_file(str(ct / name))
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 20_000 or len(part) == 1
        stored.update({k: name for k in part})
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for name in shards
                                                  for t in load_file(str(ct / name)).values())
    back, _ = load_external(ct, mode="packed")
    assert_same_layers(model, back)
    rc, _, err = run_export(src, "--format", "compressed-tensors", "--out", tmp_path / "whole")
    assert rc == 0 and sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors*")) == ["model.safetensors"]
    sym, _, sym_logits = packed_export(tmp_path / "sym", QuantSpec(4, 64, True), seed=1)  # loaded compressed
    rc, _, err = run_export(sym, "--format", "compressed-tensors", "--out", tmp_path / "ct-sym", "--max-shard-size",
                            "0.02MB")
    assert rc == 0 and (tmp_path / "ct-sym" / "model.safetensors.index.json").is_file(), err
    for got, expect in zip(load_elsewhere(tmp_path, [{"dir": str(ct)}, {"dir": str(tmp_path / "ct-sym")}]),
                           (logits, sym_logits)):
        assert_exact(got["logits"], expect, "logits")
    rc, _, err = run_export(src, "--format", "gptq", "--out", tmp_path / "bad", "--max-shard-size", "5 parsecs")
    assert_user_error(rc, err, "--max-shard-size '5 parsecs' is not a positive size; write e.g. 5GB")


def test_export_writes_config_tokenizer_and_nothing_else(tmp_path):
    src, _, _ = packed_export(tmp_path / "src", QuantSpec(4, 32, False))
    rc, out, err = run_export(src, "--format", "compressed-tensors", "--out", tmp_path / "ct")
    assert rc == 0 and "wrote" in out, err
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == sorted(
        ["config.json", "model.safetensors", *TOKENIZER_FILES])
    for name, text in TOKENIZER_FILES.items():
        assert (tmp_path / "ct" / name).read_text() == text
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert (qc["quant_method"], qc["format"], qc["ignore"], qc["dequantize"]) == (
        "compressed-tensors", "pack-quantized", ["lm_head"], True)
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 32
    assert not group["weights"]["symmetric"] and group["targets"] == ["Linear"]
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj."
    assert {k[len(q):] for k in tensors if k.startswith(q)} == {
        "weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "src"]  # no temporary directory left


def test_export_leaves_older_weight_files_behind(tmp_path):
    # save_quantized into the directory of the full-precision model (sharded, with an index): the export
    # copied its shards and index too, and qdpo's importer, which follows an index, read those, not the export
    tiny_llama().save_pretrained(tmp_path / "src", max_shard_size="200KB")
    torch.save({}, tmp_path / "src" / "pytorch_model.bin")
    src, model, logits = packed_export(tmp_path / "src", QuantSpec(4, 32, False))
    rc, _, err = run_export(src, "--format", "compressed-tensors", "--out", tmp_path / "ct")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES])
    back, _ = load_external(tmp_path / "ct", mode="packed")
    assert_same_layers(model, back)
    with torch.no_grad():
        assert_exact(back(IDS).logits, logits, "logits")


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="needs compressed-tensors")
def packed_and_exported(model, packed, out):
    """``model`` packed and saved to ``packed``, then exported as compressed-tensors to ``out``; its logits on IDS."""
    to_packed(model)
    save_quantized(model, packed)
    with torch.no_grad():
        logits = model(IDS).logits
    rc, _, err = run_export(packed, "--format", "compressed-tensors", "--out", out)
    assert rc == 0, err
    return logits


def test_export_uses_the_checkpoint_names_and_imports_them_back(tmp_path):
    # Gemma 3's modules live under model.language_model; its checkpoints (save_pretrained) say
    # language_model.model: the export writes those names, and the importer reads them back
    from tests.test_quant_linear import tiny_gemma3

    model = tiny_gemma3()
    quantize_model(model, QuantSpec(4, 32, True))
    logits = packed_and_exported(model, tmp_path / "src", tmp_path / "ct")
    tiny_gemma3().save_pretrained(tmp_path / "fp")
    fp_keys = set(load_file(str(tmp_path / "fp" / "model.safetensors")))
    got = set(load_file(str(tmp_path / "ct" / "model.safetensors")))
    packed = {k[: -len(".weight_packed")] for k in got if k.endswith(".weight_packed")}
    assert len(packed) == 14 and all(k.startswith("language_model.model.layers.") for k in packed)
    assert {k for k in got if not k.endswith(("weight_packed", "weight_scale", "weight_shape"))} | {
        f"{k}.weight" for k in packed} == fp_keys
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    vision = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "vision_tower" in n]
    assert vision and set(ignore) == {"lm_head", "language_model.lm_head", *vision,
                                      *(n[len("model."):] for n in vision)}  # model's names and checkpoint's
    for mode in ("packed", "train"):
        back, _ = load_external(tmp_path / "ct", mode=mode)
        assert sorted(quantized_layers(back)) == sorted(quantized_layers(model))
        with torch.no_grad():
            assert_exact(back(IDS).logits, logits, f"{mode} logits")
    (result,) = load_elsewhere(tmp_path, [{"dir": str(tmp_path / "ct")}])
    assert_exact(result["logits"], logits, "transformers logits")


# ----------------------------------------------------------------------------- export → import round trips
@pytest.mark.parametrize("fmt,spec,fp16", [
    ("compressed-tensors", QuantSpec(4, 32, False), False),
    ("compressed-tensors", QuantSpec(8, -1, True), False),
    ("gptq", QuantSpec(4, 64, False), True),
    ("gptq", QuantSpec(8, 128, True), True),
    ("awq", QuantSpec(4, -1, False), True),
])
def test_export_then_import_is_bit_exact(tmp_path, fmt, spec, fp16):
    src, model, logits = packed_export(tmp_path / "src", spec, fp16_scales=fp16)
    rc, _, err = run_export(src, "--format", fmt, "--out", tmp_path / "ext")
    assert rc == 0, err
    packed, got_spec = load_external(tmp_path / "ext", mode="packed", dtype=torch.float32)
    assert got_spec == spec
    assert_same_layers(model, packed)
    with torch.no_grad():
        assert_exact(packed(IDS).logits, logits, "logits")
    trained, _ = load_external(tmp_path / "ext", mode="train", dtype=torch.float32)
    assert all(m.mode == "train" for m in quantized_layers(trained).values())
    assert_same_layers(model, trained)  # re-quantizing the latent ŵ gives the file's codes back


def test_quantize_initial_from_for_the_pipeline(tmp_path):
    spec = QuantSpec(4, 32, False)
    src, model, _ = packed_export(tmp_path / "src", spec, fp16_scales=True)
    assert run_export(src, "--format", "gptq", "--out", tmp_path / "gptq")[0] == 0
    fp = tiny_llama()
    q0, stats = quantize_initial_from(tmp_path / "gptq", fp)
    assert stats == {"init": "external", "path": str(tmp_path / "gptq"), "format": "gptq",
                     "spec": spec.to_dict(), "layers": 14, "expert_tensors": 0}
    assert q0.qdpo_spec == spec and next(q0.parameters()).dtype == torch.float32
    assert all(m.mode == "train" and m.weight.requires_grad for m in quantized_layers(q0).values())
    assert_same_layers(model, q0)
    with pytest.raises(FormatError, match="W8A16-g32-asym was asked for"):
        quantize_initial_from(tmp_path / "gptq", fp, spec=QuantSpec(8, 32, False))
    with pytest.raises(FormatError, match="does not fit the full-precision model"):
        quantize_initial_from(tmp_path / "gptq", tiny_llama(odd=True))


def gptq_with_quantized_head(path: Path, spec: QuantSpec = QuantSpec(4, 32, True)) -> Path:
    """A GPTQ checkpoint of :func:`tiny_llama` (tied embeddings) that quantizes the LM head too (gptqmodel's
    ``lm_head: true``): the head's codes beside the full-precision embeddings, float16 throughout."""
    from qdpo.quant import convert
    from qdpo.quant.format import QuantizedWeight

    fp = tiny_llama().half()
    sd = {}
    for name, m in fp.named_modules():
        if isinstance(m, torch.nn.Linear):
            q, s, z = ops.quantize(m.weight.detach(), spec.bits, spec.group_size, spec.symmetric)
            qw = QuantizedWeight(q, s, z, spec, tuple(m.weight.shape), torch.float16)
            sd.update({f"{name}.{k}": v for k, v in convert.to_gptq(qw).items()})
        elif not list(m.children()):
            sd.update({f"{name}.{k}": v.contiguous() for k, v in m.state_dict().items()})
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"))
    cfg = fp.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size,
                                  "sym": spec.symmetric, "desc_act": False, "lm_head": True}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="needs compressed-tensors")
def test_quantized_lm_head_of_a_tied_model_exports_untied(tmp_path):
    # --init with a checkpoint that quantizes the LM head of a model with tied embeddings: the export kept
    # tie_word_embeddings, and transformers tied the compressed head to the embeddings and failed to load
    q0, stats = quantize_initial_from(gptq_with_quantized_head(tmp_path / "gptq"), tiny_llama())
    assert stats["layers"] == 15 and "lm_head" in quantized_layers(q0)
    logits = packed_and_exported(q0, tmp_path / "packed", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["ignore"] == []
    (result,) = load_elsewhere(tmp_path, [{"dir": str(tmp_path / "ct")}])
    assert_exact(result["logits"], logits, "transformers logits")
    back, _ = load_external(tmp_path / "ct", mode="packed", dtype=torch.float32)
    with torch.no_grad():
        assert_exact(back(IDS).logits, logits, "imported logits")
    for fmt in ("gptq", "awq"):  # their transformers loaders keep the LM head in full precision
        rc, _, err = run_export(tmp_path / "packed", "--format", fmt, "--out", tmp_path / f"out_{fmt}")
        assert_user_error(rc, err, f"{fmt} export of a quantized LM head (lm_head")
        assert not (tmp_path / f"out_{fmt}").exists()


def test_quantized_lm_head_is_untied_from_the_embeddings(tmp_path):
    # the model's config still tied them: tie_weights hung the full-precision embeddings on the quantized head
    # as a stray 'weight', which weight_coverage counted as quantized (0 embedding weights) and save_quantized
    # stored as an alias; in train mode a later tie_weights() replaced the head's latent weights by them
    from qdpo.quant.model import weight_coverage

    src = gptq_with_quantized_head(tmp_path / "gptq")
    packed, _ = load_external(src, mode="packed", dtype=torch.float32)
    save_quantized(packed, tmp_path / "packed")
    assert json.loads((tmp_path / "packed" / "qdpo_quant.json").read_text())["aliases"] == {}
    assert json.loads((tmp_path / "packed" / "config.json").read_text())["tie_word_embeddings"] is False
    train = load_external(src, mode="train", dtype=torch.float32)[0]
    for m in (packed, load_quantized(tmp_path / "packed"), train):
        assert m.config.tie_word_embeddings is False
        assert weight_coverage(m)["embedding_weights"] == VOCAB * 128
        assert [n for n, _ in m.lm_head.named_parameters()] == ([] if m.lm_head.mode == "packed" else ["weight"])
    head = train.lm_head.weight.detach().clone()
    train.tie_weights()
    assert train.lm_head.weight is not train.model.embed_tokens.weight
    assert_exact(train.lm_head.weight.detach(), head, "latent head weights")


# ----------------------------------------------------------------------------- export: bad input
def test_export_user_errors(tmp_path):
    src, _, _ = packed_export(tmp_path / "src", QuantSpec(8, 32, False))
    rc, _, err = run_export(tmp_path / "nope", "--format", "gptq", "--out", tmp_path / "o")
    assert_user_error(rc, err, "does not exist")
    (tmp_path / "empty").mkdir()
    rc, _, err = run_export(tmp_path / "empty", "--format", "gptq", "--out", tmp_path / "o")
    assert_user_error(rc, err, "is not a qdpo export")
    (tmp_path / "empty" / "run.json").write_text("{}")  # a run trained with --no-export: how to export it
    rc, _, err = run_export(tmp_path / "empty", "--format", "gptq", "--out", tmp_path / "o")
    assert_user_error(rc, err, "run directory without exports: rerun its command with --resume and without "
                               "--no-export")
    rc, _, err = run_export(src, "--format", "awq", "--out", tmp_path / "o")
    assert_user_error(rc, err, "AWQ GEMM is 4-bit only")
    rc, _, err = run_export(src, "--format", "gptq", "--out", tmp_path / "o")  # fp32 scales
    assert_user_error(rc, err, "--allow-inexact-scales")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    rc, _, err = run_export(src, "--format", "compressed-tensors", "--out", tmp_path / "full")
    assert_user_error(rc, err, "exists and is not empty")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    rc, _, err = run_export(src, "--format", "gptq", "--out", tmp_path / "full", "--overwrite",
                            "--allow-inexact-scales")
    assert rc == 0, err
    assert not (tmp_path / "full" / "keep.txt").exists()
    rc, _, err = run_export(tmp_path / "full", "--format", "gptq", "--out", tmp_path / "o")
    assert_user_error(rc, err, "is a gptq checkpoint already")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*tmp*"))
    (tmp_path / "afile").write_text("mine")
    rc, _, err = run_export(src, "--format", "compressed-tensors", "--out", tmp_path / "afile" / "sub")
    assert_user_error(rc, err, "afile is a file")
    assert (tmp_path / "afile").read_text() == "mine"
    run = tmp_path / "run"  # --method picks among a run directory's exports, not a packed model's own
    packed_export(run / "export_kd", QuantSpec(4, 32, True))
    for source in (run / "export_kd", src):
        rc, _, err = run_export(source, "--method", "qdpo", "--format", "compressed-tensors", "--out", tmp_path / "o")
        assert_user_error(rc, err, "--method qdpo chooses among a run directory's exports")
    rc, _, err = run_export(run / "export_kd", "--method", "kd", "--format", "compressed-tensors",
                            "--out", tmp_path / "o")
    assert rc == 0, err


@pytest.mark.parametrize("spec,declared,match", [
    (QuantSpec(8, -1, False), QuantSpec(4, -1, False), "down_proj.qweight has shape (128, 256), but the (128, 256) "
                                                       "layer quantized W4A16-ch-asym"),
    (QuantSpec(4, 32, False), QuantSpec(4, 64, False), "down_proj.scales has shape (128, 8)"),
    (QuantSpec(4, 32, False), QuantSpec(4, 32, True), "zero points 'model.layers.0.mlp.down_proj.zeros' hold"),
], ids=["W8-as-W4", "g32-as-g64", "asym-as-sym"])
def test_export_checks_the_weights_against_qdpo_quant_json(tmp_path, spec, declared, match):
    # a W8 per-channel model declared W4 was unpacked as nibbles (its zero points spilling into the next
    # field) and written as a checkpoint that loads garbage; the others failed without naming the layer
    src, _, _ = packed_export(tmp_path / "src", spec)
    cfg = json.loads((src / "qdpo_quant.json").read_text())
    (src / "qdpo_quant.json").write_text(json.dumps({**cfg, "spec": declared.to_dict()}))
    rc, _, err = run_export(src, "--format", "compressed-tensors", "--out", tmp_path / "ct")
    assert_user_error(rc, err, match)
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("edit,match", [
    (lambda c: {**c, "modules": [m for m in c["modules"] if m != "model.layers.0.mlp.down_proj"]},
     "holds the packed layer model.layers.0.mlp.down_proj (1 in all) that qdpo_quant.json does not list"),
    (lambda c: {**c, "aliases": {"lm_head.weight": "model.embed"}},
     "alias 'lm_head.weight' names 'model.embed', which model.safetensors does not hold"),
], ids=["undeclared-layer", "lost-alias"])
def test_export_refuses_layers_and_aliases_qdpo_quant_json_does_not_match(tmp_path, edit, match):
    # an undeclared layer's codes were written under qdpo's names beside the layer the export called full
    # precision, whose weight transformers then initialized at random (a warning only)
    src, _, _ = packed_export(tmp_path / "src", QuantSpec(4, 32, False))
    (src / "qdpo_quant.json").write_text(json.dumps(edit(json.loads((src / "qdpo_quant.json").read_text()))))
    rc, _, err = run_export(src, "--format", "compressed-tensors", "--out", tmp_path / "ct")
    assert_user_error(rc, err, match)
    assert not (tmp_path / "ct").exists()


def test_gpt2_conv1d_export_is_refused_with_what_to_do(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=1, n_head=2))
    quantize_model(model, QuantSpec(4, 32, False))
    to_packed(model)
    save_quantized(model, tmp_path / "gpt2")
    rc, _, err = run_export(tmp_path / "gpt2", "--format", "compressed-tensors", "--out", tmp_path / "o")
    assert_user_error(rc, err, "transformer.h.0.attn.c_attn is a Conv1D, not an nn.Linear")
    assert "keep the qdpo packed model, which qdpo.load_quantized reads" in err
    assert not (tmp_path / "o").exists()


def test_export_out_holding_the_source_is_refused_even_with_overwrite(tmp_path):
    # --out the run directory (or any folder above the export) would be replaced, source and run with it
    run = tmp_path / "run"
    packed_export(run / "export_qdpo", QuantSpec(4, 32, True))
    (run / "metrics.json").write_text("{}")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out in (run, tmp_path):
        rc, _, err = run_export(run, "--format", "compressed-tensors", "--out", out, "--overwrite")
        assert_user_error(rc, err, "holds the model being exported")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert not list(tmp_path.glob(".*"))


def test_export_out_the_current_directory_is_refused(tmp_path, monkeypatch):
    # `--out .` in an empty directory: the export replaces --out whole, so the shell would be left in a deleted one
    packed_export(tmp_path / "run" / "export_qdpo", QuantSpec(4, 32, True))
    here = tmp_path / "work" / "sub"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    for out in (".", "..", str(here)):
        rc, _, err = run_export(tmp_path / "run", "--format", "compressed-tensors", "--out", out)
        assert_user_error(rc, err, f"--out {out} is the current directory (or holds it)")
    assert here.is_dir() and not any(here.iterdir())
    assert run_export(tmp_path / "run", "--format", "compressed-tensors", "--out", "model")[0] == 0  # a new one


def test_save_pretrained_of_a_quantized_model_is_refused(tmp_path):
    # transformers would write the packed tensors under names it does not read back, and load that
    # checkpoint with random weights in their place (warning only): the model says how to save it instead
    import copy
    import pickle

    src, model, _ = packed_export(tmp_path / "src", QuantSpec(4, 32, False), fp16_scales=True)
    assert run_export(src, "--format", "gptq", "--out", tmp_path / "gptq")[0] == 0
    train = quantize_model(tiny_llama(), QuantSpec(8, 64, True))
    models = [model, train, load_quantized(src), load_external(tmp_path / "gptq", mode="packed")[0],
              copy.deepcopy(model), pickle.loads(pickle.dumps(train))]
    for i, m in enumerate(models):
        with pytest.raises(ValueError, match=r"save_pretrained cannot save qdpo's quantized layers.*"
                                             r"qdpo.save_quantized.*python -m qdpo.export"):
            m.save_pretrained(tmp_path / f"sp{i}")
        assert not (tmp_path / f"sp{i}").exists()
    plain = tiny_llama()
    plain.save_pretrained(tmp_path / "plain")  # an FP model saves as before
    assert (tmp_path / "plain" / "model.safetensors").exists()


def test_export_unsupported_shapes_name_the_layer(tmp_path):
    src, _, _ = packed_export(tmp_path / "src", QuantSpec(4, -1, False), odd=True, fp16_scales=True)
    rc, _, err = run_export(src, "--format", "gptq", "--out", tmp_path / "o")
    assert_user_error(rc, err, "model.layers.0.mlp.down_proj: gptq packs 8 4-bit codes per int32 and needs "
                               "K (in_features)=180 divisible by 8")
    rc, _, err = run_export(src, "--format", "awq", "--out", tmp_path / "o")
    assert_user_error(rc, err, "model.layers.0.mlp.gate_proj: awq packs 8 4-bit codes per int32 and needs "
                               "N (out_features)=180 divisible by 8")


def test_export_picks_from_a_run_directory(tmp_path):
    run = tmp_path / "run"
    for method in ("kd", "sft"):
        packed_export(run / f"export_{method}", QuantSpec(4, 32, True))
    rc, _, err = run_export(run, "--format", "compressed-tensors", "--out", tmp_path / "o")
    assert_user_error(rc, err, "several exports ['kd', 'sft']; pass --method")
    rc, _, err = run_export(run, "--format", "compressed-tensors", "--out", tmp_path / "o", "--method", "sft")
    assert rc == 0, err
    packed_export(run / "export_qdpo", QuantSpec(4, 32, True))
    rc, _, err = run_export(run, "--format", "compressed-tensors", "--out", tmp_path / "o2")
    assert rc == 0, err


def test_export_cli_exit_code_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qdpo.export", str(tmp_path / "missing"), "--format", "awq",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("qdpo.export: error:")


def test_export_says_what_loading_it_needs(tmp_path):
    # transformers loads GPTQ/AWQ checkpoints only through optimum + gptqmodel (not installed by make install)
    src, _, _ = packed_export(tmp_path / "src", QuantSpec(4, 32, False), fp16_scales=True)
    for fmt, needs in (("gptq", "(needs the optimum and gptqmodel packages)"),
                       ("awq", "(needs the optimum and gptqmodel packages)"),
                       ("compressed-tensors", "(needs the compressed-tensors package)")):
        rc, out, err = run_export(src, "--format", fmt, "--out", tmp_path / fmt)
        assert rc == 0, err
        assert f"from_pretrained({str(tmp_path / fmt)!r}) {needs}" in out, out


def test_export_help_states_each_default_once():
    # argparse's defaults formatter printed '(default: None)' for --format and --out (required) and after
    # --method's own '(default: qdpo)', and the description kept the docstring's ``markup``
    proc = subprocess.run([sys.executable, "-m", "qdpo.export", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "(default: None)" not in text and "``" not in text
    assert "python -m qdpo.export: a qdpo packed model as a checkpoint" in text
    assert "(default: its only one, or else export_qdpo)" in text and text.count("(default:") == 1


# ----------------------------------------------------------------------------- import: bad input
@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gptq")
    src, _, _ = packed_export(tmp / "src", QuantSpec(4, 32, True), fp16_scales=True)
    assert run_export(src, "--format", "gptq", "--out", tmp / "gptq")[0] == 0
    return tmp / "gptq"


def _copy(d: Path, to: Path, config=None, tensors=None) -> Path:
    to.mkdir()
    cfg = json.loads((d / "config.json").read_text())
    sd = load_file(str(d / "model.safetensors"))
    (to / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    save_file(tensors(sd) if tensors else sd, str(to / "model.safetensors"))
    return to


def _set(d: dict, **kw) -> dict:
    d["quantization_config"].update(kw)
    return d


def _pop(sd: dict, key: str) -> dict:
    sd.pop(key)
    return sd


def _flip(sd: dict, key: str) -> dict:
    sd[key] = sd[key].flip(0).contiguous()
    return sd


@pytest.mark.parametrize("case,match", [
    ("bits3", "3-bit weights are not supported"),
    ("act_order", "act-order (desc_act) checkpoints, whose groups follow a permutation of K, are not supported"),
    ("missing", "model.layers.1.mlp.up_proj: GPTQ weight is missing tensor(s) ['scales']"),
    ("missing_norm", "has no tensor(s) ['model.norm.weight']"),
    ("shapes", "down_proj: the file's weight is (128, 256) (N, K), the model's layer is (128, 200)"),
    ("method", "quant_method 'bitsandbytes' is not supported"),
    ("v3", "checkpoint_format 'marlin' is not supported"),
    ("pack16", "GPTQ pack_dtype 'int16' is not supported; qdpo reads checkpoints packed in int32 words"),
    ("inf_scale", "model.layers.1.mlp.up_proj: the scales hold NaN or Inf; the checkpoint is damaged"),
    ("marlin_flag", "GPTQ is_marlin_format checkpoints (AutoGPTQ's Marlin repacking) are not supported"),
])
def test_import_errors(gptq_dir, tmp_path, case, match):
    g = "model.layers.1.mlp.up_proj."
    edits = {
        "bits3": dict(config=lambda c: _set(c, bits=3)),
        "act_order": dict(tensors=lambda sd: _flip(sd, g + "g_idx")),
        "missing": dict(tensors=lambda sd: _pop(sd, g + "scales")),
        "missing_norm": dict(tensors=lambda sd: _pop(sd, "model.norm.weight")),
        "shapes": dict(config=lambda c: {**c, "intermediate_size": 200}),
        "method": dict(config=lambda c: _set(c, quant_method="bitsandbytes")),
        "v3": dict(config=lambda c: _set(c, checkpoint_format="marlin")),
        "pack16": dict(config=lambda c: _set(c, pack_dtype="int16")),  # gptqmodel's other words: other shapes
        "inf_scale": dict(tensors=lambda sd: {**sd, g + "scales": sd[g + "scales"].index_fill(0, torch.tensor([0]),
                                                                                           float("inf"))}),
        "marlin_flag": dict(config=lambda c: _set(c, is_marlin_format=True)),
    }
    bad = _copy(gptq_dir, tmp_path / "bad", **edits[case])
    with pytest.raises(FormatError) as e:
        load_external(bad)
    assert match in str(e.value)


def test_import_reads_the_shards_its_index_names(gptq_dir, tmp_path):
    # hub checkpoints ship model-0000i-of-0000n.safetensors and an index; a stray file beside them is not read
    sd = load_file(str(gptq_dir / "model.safetensors"))
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    d = _copy(gptq_dir, tmp_path / "sharded")
    (d / "model.safetensors").unlink()
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(d / name))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    stale = "model.layers.1.mlp.up_proj.scales"
    save_file({stale: sd[stale] * 2}, str(d / "old-model.safetensors"))  # not in the index
    whole, _ = load_external(gptq_dir, mode="packed")
    sharded, _ = load_external(d, mode="packed")
    assert_same_layers(whole, sharded)
    (d / "model.safetensors.index.json").unlink()  # without the index, a tensor stored twice is refused
    with pytest.raises(FormatError, match=f"tensor '{stale}' is stored in both model-0000"):
        load_external(d)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FormatError, match=r"lists shard\(s\) \['model-00002-of-00002.safetensors'\]"):
        load_external(d)


def test_import_reads_model_safetensors_over_a_stale_index(gptq_dir, tmp_path):
    # transformers reads model.safetensors where it exists; the importer followed an older version's index
    # beside it and started from other weights than the checkpoint transformers loads
    sd = load_file(str(gptq_dir / "model.safetensors"))
    d = _copy(gptq_dir, tmp_path / "both")
    old = {**sd, "model.layers.1.mlp.up_proj.scales": sd["model.layers.1.mlp.up_proj.scales"] * 2}
    save_file(old, str(d / "model-00001-of-00001.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in old}}))
    assert_same_layers(load_external(gptq_dir, mode="packed")[0], load_external(d, mode="packed")[0])


def test_import_keeps_a_stored_head_apart_from_different_embeddings(gptq_dir, tmp_path):
    # config.json ties them, but the file stores an LM head of its own: transformers keeps the two apart; the
    # importer tied them, so the embeddings silently became the head's values
    head = torch.randn(VOCAB, 128, generator=torch.Generator().manual_seed(3))
    d = _copy(gptq_dir, tmp_path / "head", tensors=lambda sd: {**sd, "lm_head.weight": head})
    emb = load_file(str(gptq_dir / "model.safetensors"))["model.embed_tokens.weight"]
    for mode in ("packed", "train"):
        m, _ = load_external(d, mode=mode, dtype=torch.float32)
        assert not m.config.tie_word_embeddings
        assert_exact(m.lm_head.weight.detach(), head, "head")
        assert_exact(m.model.embed_tokens.weight.detach(), emb.float(), "embeddings")


def test_import_refuses_pickles_and_plain_models(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}}))
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(FormatError, match="pickled weights .*pytorch_model.bin.* refuses pickles"):
        load_external(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FormatError, match="has no quantization_config"):
        load_external(d)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_external(tmp_path / "missing")
    (d / "quantize_config.json").write_text('{"bits": 4,')  # AutoGPTQ's settings file, cut short
    with pytest.raises(FormatError, match="quantize_config.json is not valid JSON"):
        load_external(d)
    (d / "quantize_config.json").write_text("[4, 128]")
    with pytest.raises(FormatError, match="quantize_config.json holds list, not a JSON object"):
        load_external(d)


def test_import_names_a_qdpo_packed_model(tmp_path):
    # --init runs/x/export_qdpo: the packed model is quantized; the error said to quantize it
    src, _, _ = packed_export(tmp_path / "src", QuantSpec(4, 32, True))
    with pytest.raises(FormatError, match="is a qdpo packed model, .* convert it first with python -m qdpo.export"):
        quantize_initial_from(src, tiny_llama())


# ----------------------------------------------------------------------------- GPTQ/AWQ in transformers
@pytest.mark.skipif(not HAS_INTEROP, reason="GPTQ/AWQ loading needs optimum + gptqmodel: run `make interop-check`")
def test_gptq_and_awq_exports_load_in_transformers(tmp_path):
    """gptqmodel's torch kernels: ŵ bit-exact to qdpo's ŵ in float16 (they dequantize in float16).

    GPTQ (TorchLinear) multiplies fp32 activations by that fp16 ŵ: logits equal qdpo's with ŵ rounded
    to float16. AWQ (AwqTorchLinear) casts activations to float16 too: within 2× qdpo's own fp16 error.
    """
    cases = [("gptq", QuantSpec(4, 32, False)), ("gptq", QuantSpec(8, -1, True)), ("awq", QuantSpec(4, 64, False))]
    jobs, models = [], []
    for i, (fmt, spec) in enumerate(cases):
        src, model, logits = packed_export(tmp_path / f"src{i}", spec, fp16_scales=True, seed=i)
        assert run_export(src, "--format", fmt, "--out", tmp_path / f"{fmt}{i}")[0] == 0
        jobs.append({"dir": str(tmp_path / f"{fmt}{i}"), "backend": fmt, "bits": spec.bits})
        models.append((fmt, model, logits))
    for (fmt, model, logits), got in zip(models, load_elsewhere(tmp_path, jobs)):
        layer = model.model.layers[0].mlp.down_proj
        assert_exact(got["w"].contiguous(), layer.dequantized(torch.float16).t().contiguous(), f"{fmt} ŵ")
        with torch.no_grad(), frozen_weights(model, torch.float16):
            rounded = model(IDS).logits
        if fmt == "gptq":
            assert_exact(got["logits"], rounded, "gptq logits")
        else:
            with torch.no_grad():
                half = model.half()(IDS).logits.float()
            assert_close_2x(got["logits"], logits, half, what="awq logits")
