"""Mixtures of experts: transformers' fused 3-D expert tensors quantized (qdpo.quant.experts), checked
against models whose expert tensors were replaced by the reference's ŵ."""

import copy
import dataclasses
import importlib.util
import json
import warnings

import pytest
import torch
import transformers
from torch import nn

import qdpo
from qdpo import QuantSpec
from qdpo.kernels import reference as ref
from qdpo.quant import load_quantized, save_quantized
from qdpo.quant.experts import QuantExpertTensor, quantized_experts
from qdpo.quant.experts import transposed as experts_layout
from qdpo.quant.linear import frozen_weights
from qdpo.quant.model import quantized_layers, to_packed, weight_coverage

VOCAB = 96
# transformers' own MoE layouts: (experts, out, in), and gpt-oss's transposed (experts, in, out) with biases
ARCHS = {
    "Mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "Qwen3Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1,
                     head_dim=16),
    "GptOss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    # (experts, in, out) without transformers' experts attributes, called on tokens already sorted by expert
    "Llama4Text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128, head_dim=16),
}
# more layouts, for the export: shared experts beside the routed ones, a gate on the shared expert's output
MORE_ARCHS = {"Qwen2Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                               shared_expert_intermediate_size=96),
              # DeepSeek-style blocks: router and shared experts read the norm's output, the experts its view
              "DeepseekV3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32,
                                 qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1,
                                 num_key_value_heads=4),
              "Glm4Moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                              first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16)}
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def tiny_moe(arch: str, seed: int = 0, **sizes) -> nn.Module:
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    kw.update({**ARCHS, **MORE_ARCHS}[arch])
    cfg = getattr(transformers, f"{arch}Config")(**{**kw, **sizes})
    model_cls = "Llama4ForCausalLM" if arch == "Llama4Text" else f"{arch}ForCausalLM"
    return getattr(transformers, model_cls)(cfg).eval()


def packed_expert_weights(src) -> dict[str, torch.Tensor]:
    """The fp32 expert tensors (``(experts, out, in)`` or the model's own layout) of the packed model
    saved in ``src``: each quantized one dequantized, each one left in full precision as it is."""
    model = load_quantized(src)
    quantized = quantized_experts(model)
    with torch.no_grad():
        weights = {n: q.dequantized(torch.float32) for n, q in quantized.items()}
    weights.update({n: p.detach() for n, p in model.named_parameters() if ".experts." in n and n not in weights})
    return weights


def _expert_tensors(model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.dim() == 3}


def reference_model(model: nn.Module, spec: QuantSpec) -> tuple[nn.Module, dict]:
    """A copy of the FP model whose linear layers (not the LM head) and expert tensors hold the reference's
    RTN ŵ, with the clip mask of each expert tensor (for the straight-through gradient)."""
    m = copy.deepcopy(model)
    masks = {}
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 3:
                transposed = experts_layout(m.get_submodule(name.rpartition(".")[0]))
                w = p.transpose(1, 2) if transposed else p  # (experts, out, in)
                w2 = w.reshape(-1, w.shape[2])
                s, z = ref.qparams(w2, spec.bits, spec.group_size, spec.symmetric)
                w_hat, keep = ref.fake_quant_with_mask(w2, s, z, spec.bits, w2.dtype)
                w_hat, keep = w_hat.view(w.shape), keep.view(w.shape)
                p.copy_(w_hat.transpose(1, 2) if transposed else w_hat)
                masks[name] = keep.transpose(1, 2) if transposed else keep
        for name, mod in m.named_modules():
            if type(mod) is nn.Linear and mod is not m.get_output_embeddings():  # routers (Llama 4's) stay FP
                s, z = ref.qparams(mod.weight, spec.bits, spec.group_size, spec.symmetric)
                mod.weight.copy_(ref.fake_quant(mod.weight, s, z, spec.bits))
    return m, masks


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(8, -1, True)])
def test_expert_tensors_are_quantized_like_the_reference(arch, spec):
    model = tiny_moe(arch)
    expect, masks = reference_model(model, spec)
    fused = list(_expert_tensors(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every 3-D tensor is quantized: nothing to warn about
        qdpo.quantize_model(model, spec)
    qe = quantized_experts(model)
    assert list(qe) == fused and all(q.mode == "train" for q in qe.values())
    assert not _expert_tensors(model)  # the fused parameters are gone; the latent weights hold them
    torch.testing.assert_close(model(IDS).logits, expect(IDS).logits, rtol=0, atol=1e-5)

    # straight-through: the latent weight's gradient is the gradient of ŵ where it was not clipped
    model(IDS).logits.square().mean().backward()
    expect(IDS).logits.square().mean().backward()
    for name, q in qe.items():
        mod = expect.get_submodule(name.rpartition(".")[0])
        g = mod._parameters[name.rpartition(".")[2]].grad * masks[name]
        g = (g.transpose(1, 2) if q.transposed else g).reshape(q.weight.shape)
        assert g.abs().sum() > 0
        torch.testing.assert_close(q.weight.grad, g, rtol=1e-4, atol=1e-7)

    c = weight_coverage(model)
    assert c["quantized_expert_tensors"] == 4 and c["fp_fused_expert_tensors"] == []
    assert c["quantized_fraction"] > 0.85  # the experts are most of the model


@pytest.mark.parametrize("arch", ["Mixtral", "GptOss"])
def test_packed_frozen_and_saved_experts_give_the_same_logits(arch, tmp_path):
    model = tiny_moe(arch)
    qdpo.quantize_model(model, QuantSpec(4, 32))
    with torch.no_grad():
        train_logits = model(IDS).logits
        with frozen_weights(model):
            assert all(q._w_hat is not None for q in quantized_experts(model).values())
            torch.testing.assert_close(model(IDS).logits, train_logits, rtol=0, atol=1e-6)
        save_quantized(model, tmp_path / "train_saved")  # packs the latent weights on the way out
        to_packed(model)
        assert all(q.mode == "packed" and q.qweight.dtype == torch.uint8 for q in quantized_experts(model).values())
        torch.testing.assert_close(model(IDS).logits, train_logits, rtol=0, atol=1e-6)
        save_quantized(model, tmp_path / "packed_saved")
    cfg = json.loads((tmp_path / "packed_saved" / "qdpo_quant.json").read_text())
    assert cfg["experts"] == sorted(quantized_experts(model))
    for d in ("train_saved", "packed_saved"):
        for mode in ("packed", "train"):
            back = load_quantized(tmp_path / d, mode=mode)
            assert all(q.mode == mode for q in quantized_experts(back).values())
            with torch.no_grad():
                torch.testing.assert_close(back(IDS).logits, train_logits, rtol=0, atol=1e-6)


def test_excluded_and_unknown_3d_tensors_stay_fp_with_a_warning():
    model = tiny_moe("Mixtral")
    with pytest.warns(UserWarning, match=r"2 3-D parameters .* stay in full precision") as w:
        qdpo.quantize_model(model, QuantSpec(4, 32), exclude=("lm_head", "*.experts.down_proj"))
    assert w[0].filename == __file__  # points at the caller, past torch.no_grad's wrapper
    c = weight_coverage(model)
    assert c["quantized_expert_tensors"] == 2
    assert c["fp_fused_expert_tensors"] == [f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)]
    assert c["fp_excluded_expert_tensors"] == c["fp_fused_expert_tensors"]  # known experts, left out by exclude

    class Custom(nn.Module):  # a 3-D weight outside a transformers experts module
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32)
            self.bank = nn.Parameter(torch.randn(2, 32, 32))

    custom = Custom()
    with pytest.warns(UserWarning, match=r"1 3-D parameters \(bank; 67 % of the weight matrices\)"):
        qdpo.quantize_model(custom, QuantSpec(4, 32), exclude=())
    c = weight_coverage(custom)
    assert (c["fp_fused_expert_tensors"], c["fp_excluded_expert_tensors"]) == (["bank"], [])


def test_expert_shapes_are_checked_before_anything_changes():
    model = tiny_moe("Mixtral", hidden_size=128, intermediate_size=96)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^model.layers.0.mlp.experts.down_proj: K=96 is not divisible by "
                                         r"group_size=128.*Group sizes that fit every layer: \[32, -1\]"):
        qdpo.quantize_model(model, QuantSpec(4, 128))  # the experts' down_proj has 96 in-features
    assert list(model.state_dict()) == list(before)
    assert not quantized_experts(model)


def test_training_setup_and_bf16_latents_cover_the_experts():
    from qdpo.training.optim import set_latent_dtype
    from qdpo.training.trainer import freeze_for_training, trainable_params

    model = tiny_moe("Qwen3Moe")
    qdpo.quantize_model(model, QuantSpec(4, 32))
    qe = quantized_experts(model)
    codes = {n: q.quantized_weight().qweight.clone() for n, q in qe.items()}
    set_latent_dtype(model, "bfloat16")
    weights, scales = freeze_for_training(model, learn_scales=True)
    for n, q in qe.items():
        assert q.weight.dtype == torch.bfloat16 and q.weight.requires_grad and q.scales.requires_grad
        assert torch.equal(q.quantized_weight().qweight, codes[n])  # bf16 latents keep every code
        assert any(w is q.weight for w in weights) and any(s is q.scales for s in scales)
    assert sum(map(len, trainable_params(model))) == len(weights) + len(scales)
    # learned scales get a gradient through the experts too
    model(IDS).logits.float().square().mean().backward()
    assert all(q.scales.grad is not None and q.scales.grad.abs().sum() > 0 for q in qe.values())


def test_routers_and_shared_expert_gates_stay_in_full_precision():
    from qdpo.quant.experts import moe_routers

    model = tiny_moe("Qwen2Moe")
    gates = {f"model.layers.{i}.mlp.{g}" for i in range(2) for g in ("gate", "shared_expert_gate")}
    assert moe_routers(model) == gates
    assert type(model.model.layers[0].mlp.shared_expert_gate) is nn.Linear  # an nn.Linear(H, 1)
    qdpo.quantize_model(model, QuantSpec(4, 32))
    for i in range(2):
        mlp = model.model.layers[i].mlp
        assert type(mlp.shared_expert_gate) is nn.Linear  # not replaced
        assert all(isinstance(getattr(mlp.shared_expert, n), qdpo.QuantLinear)
                   for n in ("gate_proj", "up_proj", "down_proj"))
    assert len(quantized_experts(model)) == 4


def test_packed_experts_with_one_tensor_kept_in_full_precision():
    # exclude keeps the experts' down_proj FP: the packed forward must not take the all-packed path
    model = tiny_moe("Mixtral")
    with pytest.warns(UserWarning, match="stay in full precision"):
        qdpo.quantize_model(model, QuantSpec(4, 32), exclude=("lm_head", "*.experts.down_proj"))
    with torch.no_grad():
        train_logits = model(IDS).logits
        to_packed(model)
        torch.testing.assert_close(model(IDS).logits, train_logits, rtol=0, atol=1e-6)


def export_moe(arch: str, tmp_path, spec: QuantSpec, exclude=("lm_head",), ids=IDS):
    """A packed tiny MoE saved by qdpo: (its directory, its fp32 logits on ``ids``)."""
    model = tiny_moe(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an excluded expert tensor warns
        qdpo.quantize_model(model, spec, exclude=exclude)
    to_packed(model)
    save_quantized(model, tmp_path / f"packed_{arch}")
    with torch.no_grad():
        return tmp_path / f"packed_{arch}", model(ids).logits


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="needs compressed-tensors")
def test_compressed_tensors_export_of_experts_loads_in_transformers_alone(tmp_path):
    from safetensors.torch import load_file

    from qdpo.export import export
    from tests.test_export import IDS as LOADER_IDS  # the ids load_elsewhere runs
    from tests.test_export import load_elsewhere

    cases = {"Mixtral": ("lm_head",), "Qwen3Moe": ("lm_head",), "Qwen2Moe": ("lm_head",),
             "Mixtral-fp-down": ("lm_head", "*.layers.1.mlp.experts.down_proj")}
    jobs, expected = [], []
    for case, exclude in cases.items():
        arch = case.split("-")[0]
        src, logits = export_moe(arch, tmp_path / case, QuantSpec(4, 32, True), exclude, LOADER_IDS)
        out = export(src, tmp_path / f"ct_{case}", "compressed-tensors")
        jobs.append({"dir": str(out), "experts": True})
        expected.append((case, logits, packed_expert_weights(src)))
        # the checkpoint's layers are those transformers' save_pretrained writes for the FP model: one per
        # expert and product (Mixtral's w1/w2/w3 under block_sparse_moe), each quantized or kept whole
        tiny_moe(arch).save_pretrained(tmp_path / f"fp_{case}")
        fp_keys = set(load_file(str(tmp_path / f"fp_{case}" / "model.safetensors")))
        got = set(load_file(str(out / "model.safetensors")))
        layers = {k.rpartition(".")[0] for k in got if k.endswith(".weight_packed")}
        if case == "Mixtral-fp-down":  # an expert tensor left FP keeps the model's fused layout (transformers
            fp_keys = {k for k in fp_keys if ".layers.1.block_sparse_moe.experts." not in k or ".w2." not in k}
            fp_keys.add("model.layers.1.mlp.experts.down_proj")  # fails on FP experts beside compressed ones)
        parts = ("weight_packed", "weight_scale", "weight_shape")
        assert {k for k in got if not k.endswith(parts)} | {f"{n}.weight" for n in layers} == fp_keys
        n_experts = sum(".experts." in n for n in layers)
        assert n_experts == {"Mixtral": 2 * 4 * 3, "Mixtral-fp-down": 4 * 3 + 4 * 2}.get(case, 2 * 4 * 3)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["dequantize"] is True and qc["config_groups"]["group_0"]["weights"]["symmetric"] is True
        routers = {f"model.layers.{i}.{b}.gate" for i in range(2)  # the model's names and the checkpoint's
                   for b in ({"mlp", "block_sparse_moe"} if arch == "Mixtral" else {"mlp"})}
        gates = {f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)} if arch == "Qwen2Moe" else set()
        assert set(qc["ignore"]) == {"lm_head"} | routers | gates
    for (case, logits, weights), got in zip(expected, load_elsewhere(tmp_path, jobs)):
        assert sorted(got["experts"]) == sorted(weights), case
        for name, w in weights.items():  # transformers holds qdpo's ŵ bit for bit, each expert tensor
            assert torch.equal(got["experts"][name], w), f"{case} {name}"
        # its experts group the rows otherwise (grouped_mm, or by choice rank), and a CPU GEMM's sums may
        # depend on the rows it is given: the same weights, the logits to fp32 summation order
        torch.testing.assert_close(got["logits"], logits, rtol=0, atol=1e-6, msg=f"{case} logits")


def test_exported_experts_import_back_bit_for_bit(tmp_path):
    from safetensors.torch import load_file, save_file

    from qdpo.export import export
    from qdpo.quant.importers import load_external, quantize_initial_from

    cases = {"Mixtral": ("lm_head",), "Qwen2Moe": ("lm_head",),
             "Mixtral-fp-down": ("lm_head", "*.layers.1.mlp.experts.down_proj"),
             "Mixtral-fp-experts": ("lm_head", "*.experts.*")}
    for case, exclude in cases.items():
        arch = case.split("-")[0]
        src, logits = export_moe(arch, tmp_path / case, QuantSpec(4, 32, True), exclude)
        out = export(src, tmp_path / f"ct_{case}", "compressed-tensors")
        if case == "Mixtral-fp-experts":  # full-precision experts as the Hub stores them: one layer per expert
            tensors = {k: v for k, v in load_file(str(out / "model.safetensors")).items() if ".experts." not in k}
            tiny_moe(arch).save_pretrained(tmp_path / "fp")  # the same seed: the same FP experts
            tensors.update({k: v for k, v in load_file(str(tmp_path / "fp" / "model.safetensors")).items()
                            if ".experts." in k})
            assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in tensors
            save_file(tensors, str(out / "model.safetensors"))
        saved = load_file(str(src / "model.safetensors"))
        for mode in ("packed", "train"):
            model, spec = load_external(out, mode=mode)
            assert spec == QuantSpec(4, 32, True)
            qe = quantized_experts(model)
            assert sorted(qe) == sorted(json.loads((src / "qdpo_quant.json").read_text()).get("experts", []))
            for name, q in qe.items():  # the codes, scales and zero points qdpo saved
                k = name.rpartition(".")[0] + ".qdpo_" + name.rpartition(".")[2]
                qw = q.quantized_weight()
                assert torch.equal(qw.qweight, saved[f"{k}.qweight"]) and torch.equal(qw.scales, saved[f"{k}.scales"])
                assert torch.equal(qw.zeros, saved[f"{k}.zeros"])
            with torch.no_grad():
                torch.testing.assert_close(model(IDS).logits, logits, rtol=0, atol=1e-6, msg=f"{case} {mode}")
        model, stats = quantize_initial_from(out, tiny_moe(arch))  # the pipeline's --init PATH
        assert stats["expert_tensors"] == len(quantized_experts(model))
        assert all(q.mode == "train" for q in quantized_experts(model).values())


@pytest.mark.parametrize("fmt,spec", [("gptq", QuantSpec(4, 32, True)), ("awq", QuantSpec(4, 32, False))])
def test_gptq_and_awq_moe_checkpoints_import_their_experts(fmt, spec, tmp_path):
    # GPTQ/AWQ MoE checkpoints (GPTQModel, AutoAWQ) hold one layer per expert in the Hub layout, written
    # here from qdpo's codes with Mixtral's known row order: w1 = gate rows, w3 = up rows, w2 = down
    from safetensors.torch import load_file, save_file

    from qdpo.export import quantization_config
    from qdpo.quant import convert
    from qdpo.quant.format import QuantizedWeight
    from qdpo.quant.importers import load_external

    src, _ = export_moe("Mixtral", tmp_path, spec)
    saved = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "qdpo_quant.json").read_text())
    write = convert.to_gptq if fmt == "gptq" else convert.to_awq

    def layer(prefix: str, rows: slice) -> dict:
        qw, sc, z = (saved[f"{prefix}.{p}"][rows] for p in ("qweight", "scales", "zeros"))
        qw = QuantizedWeight(qw, sc, z, spec, (qw.shape[0], qw.shape[1] * 2), sc.dtype)
        return write(qw, allow_inexact_scales=True)  # float16 scales

    out = {k: v for k, v in saved.items() if not k.endswith(("qweight", "scales", "zeros"))}
    for name in cfg["modules"]:
        out.update({f"{name}.{k}": v for k, v in layer(name, slice(None)).items()})
    inter, hidden, experts = 128, 64, 4
    for i in range(2):
        q = f"model.layers.{i}.mlp.experts.qdpo_"
        for e in range(experts):
            hub = f"model.layers.{i}.block_sparse_moe.experts.{e}"
            for w, (t, lo, n) in {"w1": ("gate_up_proj", 2 * inter * e, inter),
                                  "w3": ("gate_up_proj", 2 * inter * e + inter, inter),
                                  "w2": ("down_proj", hidden * e, hidden)}.items():
                out.update({f"{hub}.{w}.{k}": v for k, v in layer(q + t, slice(lo, lo + n)).items()})
    d = tmp_path / fmt
    d.mkdir()
    save_file(out, str(d / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(fmt, spec, ["lm_head"])
    (d / "config.json").write_text(json.dumps(config))
    model, got_spec = load_external(d, mode="packed")
    assert got_spec == spec
    qe = quantized_experts(model)
    assert sorted(qe) == cfg["experts"]
    for name, q in qe.items():  # qdpo's codes and zero points; its scales as float16 holds them
        k = name.rpartition(".")[0] + ".qdpo_" + name.rpartition(".")[2]
        assert torch.equal(q.qweight, saved[f"{k}.qweight"]) and torch.equal(q.zeros, saved[f"{k}.zeros"])
        assert torch.equal(q.scales, saved[f"{k}.scales"].half().float())
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="needs compressed-tensors")
def test_asymmetric_experts_export_checked_layer_by_layer(tmp_path, monkeypatch, caplog):
    # transformers 5.25 cannot load asymmetric experts (it drops their zero points); the file is checked by
    # compressed-tensors' own decompressor, layer by layer, and read back by qdpo
    from qdpo.export import asymmetric_experts, check_layers, export
    from qdpo.quant import convert
    from qdpo.quant.importers import load_external

    src, logits = export_moe("Mixtral", tmp_path, QuantSpec(4, 32))
    assert asymmetric_experts(src)
    with caplog.at_level("WARNING", logger="qdpo.export"):
        out = export(src, tmp_path / "ct", "compressed-tensors")
    assert "transformers (5.25) cannot load them" in caplog.text
    assert check_layers(out) == {"layers": 8 + 2 * 4 * 3, "max_abs_diff": 0.0}  # attention + w1/w2/w3 per expert
    back, spec = load_external(out, mode="packed")
    assert spec == QuantSpec(4, 32) and len(quantized_experts(back)) == 4
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, logits, rtol=0, atol=1e-6)
    from tests.test_export import run_export  # the command line says what loads it, and checks on request

    rc, printed, err = run_export(src, "--format", "compressed-tensors", "--out", tmp_path / "cli", "--check")
    assert rc == 0, err
    assert "transformers cannot load its asymmetric experts" in printed
    assert "checked 32 layers with compressed-tensors' decompressor: max |Δw| vs qdpo's reading = 0" in printed
    rc, _, err = run_export(src, "--format", "gptq", "--out", tmp_path / "g", "--check")
    assert rc == 2 and "--check reads compressed-tensors exports, not gptq" in err
    # the check compares two readers: one that gets the zero points wrong is caught
    read = convert.from_compressed_tensors
    monkeypatch.setattr(convert, "from_compressed_tensors",
                        lambda t, sp: dataclasses.replace(read(t, sp), zeros=read(t, sp).zeros ^ 1))
    assert check_layers(out)["max_abs_diff"] > 0
    rc, _, err = run_export(src, "--format", "compressed-tensors", "--out", tmp_path / "cli", "--check", "--overwrite")
    assert rc == 1 and "compressed-tensors reads" in err and "differently from qdpo; do not deploy it" in err


def test_export_refuses_what_cannot_hold_the_experts(tmp_path):
    from qdpo.export import ExportError, export
    from qdpo.quant.convert import FormatError

    src, _ = export_moe("Mixtral", tmp_path, QuantSpec(4, 32))  # asymmetric
    with pytest.raises(ExportError, match=r"4 quantized fused expert tensors .* gptq checkpoints of those are not "
                                          r"supported: export as compressed-tensors"):
        export(src, tmp_path / "ct", "gptq")
    src, _ = export_moe("GptOss", tmp_path, QuantSpec(4, 32, True))
    with pytest.raises(FormatError, match=r"GptOssForCausalLM keeps its experts as fused \(experts, in, out\) "
                                          r"tensors, in its checkpoints too"):
        export(src, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists() and not list(tmp_path.glob(".ct*"))


def save_moe(arch: str, d):
    """A tiny MoE of ``arch`` saved in ``d`` with the pipeline tests' tokenizer."""
    from tests.test_pipeline import VOCAB as TOKENS, _tokenizer

    m = tiny_moe(arch, vocab_size=TOKENS)
    m.config.update(dict(eos_token_id=2, pad_token_id=2, bos_token_id=None))
    with torch.no_grad():  # weights large enough that W4 flips some answers
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    m.save_pretrained(d)
    _tokenizer(chat=True).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return save_moe("Mixtral", tmp_path_factory.mktemp("moe"))


# Llama 4: its own experts layout, and a decoder that transformers' base_model does not find
@pytest.mark.parametrize("arch", ["Mixtral", "Llama4Text"])
def test_pipeline_on_a_mixture_of_experts(arch, moe_dir, tmp_path):
    from qdpo import train
    from tests.test_pipeline import _args, _prompts

    d = moe_dir if arch == "Mixtral" else save_moe(arch, tmp_path / "model")
    out = tmp_path / "run"
    # Mixtral's (asymmetric) compressed-tensors export is written and checked; Llama 4's experts cannot be
    args = _args(d, _prompts(tmp_path / "p.jsonl"), out, "--steps", "2", "--eval-every", "0")  # keeps the last step
    assert train.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    w = metrics["init"]["weights"]
    linears = {"Mixtral": 8, "Llama4Text": 14}[arch]  # attention (and Llama 4's shared expert) in 2 layers
    assert (w["quantized_layers"], w["quantized_expert_tensors"], w["fp_fused_expert_tensors"]) == (linears, 4, [])
    ex = metrics["training"]["qdpo"]["export"]
    assert ex["reproduces_eval"] is True
    if arch == "Mixtral":  # read back by qdpo, every layer checked by compressed-tensors' decompressor
        assert ex["compressed_tensors"] == str(out / "export_qdpo_compressed_tensors")
        assert ex["compressed_tensors_layers"] == {"layers": 8 + 2 * 4 * 3, "max_abs_diff": 0.0}
        assert ex["compressed_tensors_max_abs_logit_diff"] < 1e-4
    else:
        assert ex["compressed_tensors"] is None  # skipped, with a log line
    back = load_quantized(out / "export_qdpo")
    assert len(quantized_experts(back)) == 4
    # QDPO trained the experts: their codes moved from the initial (RTN) model's
    from safetensors.torch import load_file

    init, final = load_file(str(out / "initial" / "model.safetensors")), load_file(str(out / "export_qdpo" / "model.safetensors"))
    moved = 0
    for name in quantized_experts(back):
        k = name.rpartition(".")[0] + ".qdpo_" + name.rpartition(".")[2]
        codes = ref.quantize_codes(init[f"{k}.weight"], init[f"{k}.scales"], init[f"{k}.zeros"], 4)
        moved += int((ref.unpack(final[f"{k}.qweight"], 4) != codes).sum())
    assert moved > 0
    assert train.main(args + ["--resume"]) == 0  # a finished run resumes to the same result
    assert json.loads((out / "metrics.json").read_text())["eval"] == metrics["eval"]
    assert isinstance(next(iter(quantized_experts(back).values())), QuantExpertTensor)


def test_torchrun_fsdp_trains_the_experts_as_one_process_does(moe_dir, tmp_path):
    # FSDP2 shards the experts' latent weights with their decoder layer: the same losses and result
    from qdpo import train
    from tests.test_distributed import torchrun
    from tests.test_pipeline import _args, _prompts

    prompts = _prompts(tmp_path / "p.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(_args(moe_dir, prompts, one, "--no-export")) == 0
    r = torchrun("-m", "qdpo.train", *_args(moe_dir, prompts, two, "--no-export", "--dist", "fsdp"))
    assert r.returncode == 0, r.stderr[-4000:]
    h1, h2 = ([json.loads(x) for x in (d / "train_qdpo" / "metrics.jsonl").read_text().splitlines()]
              for d in (one, two))
    assert len(h2) == len(h1) == 5
    assert [h["loss"] for h in h2[1:]] == pytest.approx([h["loss"] for h in h1[1:]], rel=1e-5)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["eval"]["qdpo"]["flip_rate"] == pytest.approx(m1["eval"]["qdpo"]["flip_rate"], abs=1e-9)
    assert m2["init"]["weights"]["quantized_expert_tensors"] == 4


def test_autocast_gives_the_experts_in_its_dtype():
    # grouped_mm does not autocast: ŵ comes in the autocast dtype, as QuantLinear computes under autocast
    model = tiny_moe("Mixtral")
    expect, _ = reference_model(model, QuantSpec(4, 32))
    qdpo.quantize_model(model, QuantSpec(4, 32))
    seen = []
    q = next(iter(quantized_experts(model).values()))
    value = q.value
    q.value = lambda dtype=None: seen.append(dtype) or value(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(IDS).logits
        ref_logits = expect(IDS).logits
    assert seen and set(seen) == {torch.bfloat16}
    assert got.dtype == ref_logits.dtype
    torch.testing.assert_close(got.float(), ref_logits.float(), rtol=0.05, atol=0.05)
    got.float().square().mean().backward()
    assert q.weight.grad is not None and q.weight.grad.dtype == torch.float32
    seen.clear()
    with torch.no_grad():
        model(IDS)
    assert seen == [None]  # no autocast: the scales' dtype


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("arch", ["Mixtral", "GptOss"])
def test_experts_on_the_gpu(arch, backend):
    # the kernels' fake_quant and dequantize on (experts·out, in) weights, under bf16 autocast as the trainer runs
    model = tiny_moe(arch).cuda()
    expect, masks = reference_model(model, QuantSpec(4, 32))
    qdpo.quantize_model(model, QuantSpec(4, 32), backend=backend)
    ids = IDS.cuda()
    torch.testing.assert_close(model(ids).logits, expect(ids).logits, rtol=0, atol=1e-4)
    model(ids).logits.square().mean().backward()
    expect(ids).logits.square().mean().backward()
    for name, q in quantized_experts(model).items():
        g = expect.get_submodule(name.rpartition(".")[0])._parameters[name.rpartition(".")[2]].grad * masks[name]
        g = (g.transpose(1, 2) if q.transposed else g).reshape(q.weight.shape)
        torch.testing.assert_close(q.weight.grad, g, rtol=1e-3, atol=1e-6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(model(ids).logits.float(), expect(ids).logits.float(), rtol=0.05, atol=0.05)
    to_packed(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expect(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("arch", ["Mixtral", "GptOss"])
def test_packed_bf16_decode_step_on_the_gpu_and_in_a_graph(arch, backend, monkeypatch):
    """A packed bf16 MoE's decode step on each GPU backend: the grouped launches (dequant_matmul_experts)
    give the per-expert launches' logits within bf16 rounding, and one experts module's forward of one
    and of three tokens, captured in a CUDA graph, follows new routing written into its index tensor on
    replay (nothing in it depends on the host seeing the ids)."""
    import qdpo.quant.experts as experts

    if backend == "cuda":
        pytest.importorskip("qdpo.kernels.cuda", reason="qdpo._C was not built")
    model = tiny_moe(arch).to(torch.bfloat16).cuda()
    qdpo.quantize_model(model, QuantSpec(4, 32), mode="packed", backend=backend)
    ids = IDS[:1, :1].cuda()
    with torch.no_grad():
        routed = model(ids).logits.float()
        with monkeypatch.context() as mp:
            mp.setattr(experts, "ROUTED_DECODE", False)
            per_expert = model(ids).logits.float()
        torch.testing.assert_close(routed, per_expert, rtol=0.02, atol=0.02)
        m = _experts_modules(model)[0]
        g = torch.Generator().manual_seed(4)
        # one token (a block per pair), three (the pairs sorted on the device, then the segments)
        for routes in ([[[3, 1]], [[0, 2]]], [[[3, 1], [0, 3], [2, 1]], [[0, 1], [1, 2], [3, 0]]]):
            t = len(routes[0])
            x = torch.randn(t, model.config.hidden_size, generator=g).to(torch.bfloat16).cuda()
            idx = torch.tensor(routes[0], device="cuda")
            w = torch.softmax(torch.randn(t, 2, generator=g), -1).to("cuda", torch.bfloat16)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                m(x, idx, w)  # warm-up outside the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = m(x, idx, w)
            for route in routes:
                idx.copy_(torch.tensor(route))
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, m(x, idx, w)), route


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_experts_read_only_the_chosen_experts(arch, monkeypatch):
    # packed experts run each chosen expert's rows of the packed weight through dequant_matmul; the result
    # equals the path that dequantizes every expert (frozen_weights' cached ŵ through the module's own forward)
    model = tiny_moe(arch)
    qdpo.quantize_model(model, QuantSpec(4, 32), mode="packed")
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), frozen_weights(model):
        every = model(ids).logits
    calls, real = [], QuantExpertTensor.matmul

    def matmul(self, x, expert, bias=None):
        calls.append((id(self), expert, x.shape[0]))
        return real(self, x, expert, bias)

    monkeypatch.setattr(QuantExpertTensor, "matmul", matmul)
    with torch.no_grad():
        fast = model(ids).logits
    torch.testing.assert_close(fast, every, rtol=1e-5, atol=1e-5)
    k, layers = model.config.num_experts_per_tok, model.config.num_hidden_layers
    if arch == "Llama4Text":  # tokens laid out expert by expert: every expert runs on every token row
        assert len(calls) == 2 * model.config.num_local_experts * layers and {n for *_, n in calls} == {ids.numel()}
    else:
        tensors = {id(q) for q in quantized_experts(model).values()}
        assert {c[0] for c in calls} == tensors
        for t in tensors:  # every (token, chosen expert) pair once per tensor
            assert sum(n for i, _, n in calls if i == t) == ids.numel() * k
        calls.clear()
        routed, real_routed = [], QuantExpertTensor.matmul_routed

        def matmul_routed(self, x, experts, bias=None, max_rows=0):
            routed.append((id(self), x.shape[0]))
            return real_routed(self, x, experts, bias, max_rows)

        monkeypatch.setattr(QuantExpertTensor, "matmul_routed", matmul_routed)
        with torch.no_grad():  # one decode step: one grouped launch per product and layer, over the k experts
            model(ids[:1, :1])
        assert not calls and len(routed) == 2 * layers and {n for _, n in routed} == {k}
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), every, rtol=0.05, atol=0.05)


def _experts_modules(model) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(type(m), "_qdpo_experts", False)]


@pytest.mark.parametrize("arch", ["Mixtral", "Qwen3Moe", "GptOss"])
def test_packed_decode_step_reads_no_expert_id_on_the_host(arch, monkeypatch):
    """A decode step through a packed experts module: one grouped launch per product over its (token,
    expert) pairs, the expert ids never read on the host (the module runs with Tensor.item, tolist,
    __bool__ and __int__ refused, where the per-expert loop must read them). One token: bit for bit the
    per-expert loop's output, the same products and fp32 sums in the same order (dequant_matmul_experts,
    a block per pair); three tokens: the same within fp32 rounding (the loop multiplies each expert's
    rows together), the pairs sorted once for both products (dequant_matmul_segments). An
    expert-parallel sentinel id (past the experts) adds nothing in either. Seventeen tokens (prefill)
    keep the loop on the reference backend."""
    import qdpo.quant.experts as experts

    model = tiny_moe(arch)
    qdpo.quantize_model(model, QuantSpec(4, 32), mode="packed")
    m = _experts_modules(model)[0]
    e, g = m.qdpo_down_proj.experts, torch.Generator().manual_seed(2)
    x = torch.randn(1, model.config.hidden_size, generator=g)
    cases = [(torch.tensor([[3, 1]]), torch.tensor([[0.7, 0.3]])), (torch.tensor([[1, e]]), torch.tensor([[0.6, 0.4]])),
             (torch.tensor([[3, 0, 1]]), torch.tensor([[0.5, 0.3, 0.2]]))]  # top 3: the order of the sum shows
    with torch.no_grad():
        want = []
        with monkeypatch.context() as mp:
            mp.setattr(experts, "ROUTED_DECODE", False)
            want = [m(x, idx, w) for idx, w in cases]
        launches = []
        for op in ("dequant_matmul_experts", "dequant_matmul_segments"):
            monkeypatch.setattr(experts.ops, op, lambda *a, op=op, real=getattr(experts.ops, op), **kw:
                                launches.append((op, *a[0].shape)) or real(*a, **kw))
        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "__bool__", "__int__"):
                mp.setattr(torch.Tensor, name, lambda *a, name=name: pytest.fail(f"Tensor.{name} in the decode step"))
            got = [m(x, idx, w) for idx, w in cases]
        assert launches == [("dequant_matmul_experts", k, w) for k in (2, 2, 3)
                            for w in (x.shape[1], m.qdpo_down_proj.in_features)]
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)
        three = torch.randn(3, x.shape[1], generator=g)
        idx, w = torch.tensor([[3, 1], [0, 3], [3, e]]), torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
        with monkeypatch.context() as mp:
            mp.setattr(experts, "ROUTED_DECODE", False)
            want = m(three, idx, w)
        launches.clear()
        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "__bool__", "__int__"):
                mp.setattr(torch.Tensor, name, lambda *a, name=name: pytest.fail(f"Tensor.{name} in the decode step"))
            got = m(three, idx, w)
        assert [(op, p) for op, p, _ in launches] == [("dequant_matmul_segments", 6)] * 2
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        launches.clear()
        m(torch.randn(17, x.shape[1], generator=g), torch.randint(0, e, (17, 2), generator=g), torch.ones(17, 2) / 2)
        assert not launches


def test_llama4_decode_step_reads_only_the_chosen_experts():
    """Llama 4's experts take every token once per expert, scaled by its router score (zero for the experts
    it did not choose). A packed decode step runs both products as one grouped launch each over the rows
    that are not all zero, so only the chosen expert's weights are read (the per-expert launches read
    all of them), and gives the per-expert launches' logits, bit for bit, without a host read."""
    import qdpo.quant.experts as experts

    model = tiny_moe("Llama4Text")
    qdpo.quantize_model(model, QuantSpec(4, 32), mode="packed")
    ids = IDS[:1, :1]
    with torch.no_grad():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(experts, "ROUTED_DECODE", False)
            want = model(ids).logits
        launches, real = [], experts.ops.dequant_matmul_experts
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(experts.ops, "dequant_matmul_experts",
                       lambda *a, **kw: launches.append(a[1].clone()) or real(*a, **kw))
            mp.setattr(QuantExpertTensor, "matmul", lambda *a, **kw: pytest.fail("a per-expert launch"))
            for name in ("item", "tolist", "__bool__", "__int__"):
                mp.setattr(torch.Tensor, name, lambda *a, name=name: pytest.fail(f"Tensor.{name} in the decode step"))
            got = model(ids).logits
    e = model.config.num_local_experts
    assert len(launches) == 2 * model.config.num_hidden_layers
    for chosen in launches:  # one token, top 1: one row of the E has an expert, the others none (-1)
        assert chosen.shape == (e,) and (chosen >= 0).sum() == 1 and (chosen == -1).sum() == e - 1
    assert torch.equal(got, want)


def test_packed_decode_step_compiles_into_one_graph():
    """torch.compile(fullgraph=True) takes a packed experts module's decode step whole (no host read to
    break the graph; the grouped op traced through its fake impl) and gives the eager output; the
    per-expert launches of 17 tokens read the routing on the host, which fullgraph refuses."""
    model = tiny_moe("Mixtral")
    qdpo.quantize_model(model, QuantSpec(4, 32), mode="packed")
    m = _experts_modules(model)[0]
    g = torch.Generator().manual_seed(6)
    x = torch.randn(17, model.config.hidden_size, generator=g)
    idx, w = torch.randint(0, 4, (17, 2), generator=g), torch.full((17, 2), 0.5)
    idx[:, 1] = (idx[:, 0] + 1) % 4  # distinct experts per token
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")  # the graph capture, not a code generator
    with torch.no_grad():
        assert torch.equal(compiled(x[:3], idx[:3], w[:3]), m(x[:3], idx[:3], w[:3]))
        with pytest.raises(Exception, match="(?i)graph break|tolist|item|data-dependent"):
            compiled(x, idx, w)


@pytest.mark.parametrize("arch", ["Mixtral", "GptOss"])
def test_packed_prefill_with_few_rows_per_expert_takes_the_grouped_launches(arch, monkeypatch):
    """More tokens than a decode step (20) whose (token, expert) pairs make at most 16 rows per expert on
    average (40 rows over 4 experts) take the grouped launches too on a backend with GPU kernels (here
    triton, under the interpreter), without reading an expert id on the host, and give the per-expert
    launches' output within fp32 rounding; 40 tokens (20 rows per expert) keep the per-expert launches,
    and so does the reference backend (auto on CPU tensors), which would dequantize an expert per row."""
    import qdpo.quant.experts as experts

    model = tiny_moe(arch)
    qdpo.quantize_model(model, QuantSpec(4, 32), mode="packed")
    m = _experts_modules(model)[0]
    e, g = m.qdpo_down_proj.experts, torch.Generator().manual_seed(4)
    launches, rows = [], []  # rows: max_rows, the rows one expert is expected to take
    for op in ("dequant_matmul_experts", "dequant_matmul_segments"):
        monkeypatch.setattr(experts.ops, op, lambda *a, real=getattr(experts.ops, op), **kw:
                            launches.append((a[0].shape[0], kw.get("backend"))) or rows.append(a[8])
                            or real(*a, **kw))

    def step(t):
        x = torch.randn(t, model.config.hidden_size, generator=g)
        idx = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(t)])
        return x, idx, torch.softmax(torch.randn(t, 2, generator=g), -1)

    with torch.no_grad():
        x, idx, w = step(20)
        with monkeypatch.context() as mp:
            mp.setattr(experts, "ROUTED_DECODE", False)
            want = m(x, idx, w)
        assert m(x, idx, w) is not None and not launches  # auto on CPU tensors: the reference, per expert
        with monkeypatch.context() as mp:
            mp.setenv("QDPO_BACKEND", "triton")
            for name in ("item", "tolist", "__bool__", "__int__"):
                mp.setattr(torch.Tensor, name, lambda *a, name=name: pytest.fail(f"Tensor.{name} in the prefill"))
            got = m(x, idx, w)
        assert [n for n, _ in launches] == [40, 40] and rows == [16, 16]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        launches.clear()
        rows.clear()
        x, idx, w = step(40)
        with monkeypatch.context() as mp:
            mp.setenv("QDPO_BACKEND", "triton")
            m(x, idx, w)
        assert not launches
        # the bound lifted (as bench_moe's "-grouped" rows do): 20 rows per expert expected, which widens
        # the triton tile to 32 rows; the same output as the per-expert launches
        with monkeypatch.context() as mp:
            mp.setattr(experts, "ROUTED_DECODE", False)
            want = m(x, idx, w)
        with monkeypatch.context() as mp:
            mp.setenv("QDPO_BACKEND", "triton")
            mp.setattr(experts, "ROUTED_ROWS_PER_EXPERT", 64)
            got = m(x, idx, w)
        assert [n for n, _ in launches] == [80, 80] and rows == [20, 20]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["Mixtral", "Qwen3Moe", "GptOss"])
def test_awq_scales_the_experts_input_with_the_router(arch):
    # the experts' first product reads the flattened output of the post-attention norm, as the router
    # does: AWQ folds 1/s into the norm and s into the experts' and the router's input channels
    from qdpo.quant.awq import _sqnr, awq_quantize_model, awq_scale_model

    model = tiny_moe(arch)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("mlp.gate.weight", "mlp.router.weight"))}
    experts = {n: p.detach().clone() for n, p in _expert_tensors(model).items() if n.endswith("gate_up_proj")}
    stats = awq_scale_model(model, QuantSpec(4, 32), ids)
    with torch.no_grad():
        assert _sqnr(ref, model(ids).logits) > 100  # the FP function is unchanged (fp32)
    groups = {g["layers"][0]: g for g in stats["groups"] if g["layers"][0] in experts}
    assert set(groups) == set(experts)
    # gpt-oss's experts, (experts, in, out) with their own gate, keep RTN for down_proj; nothing else does
    assert set(stats["fallback"]) == ({f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)}
                                      if arch == "GptOss" else set())
    params = dict(model.named_parameters())
    for name, g in groups.items():
        assert g["folded_into"].endswith("post_attention_layernorm") and g["mse_awq"] <= g["mse_rtn"]
        router = next(n for n in routers if n.startswith(name.rsplit(".experts", 1)[0]))
        moved = not torch.equal(params[router], routers[router])
        gate = (slice(None),) if arch == "GptOss" else (slice(None), slice(0, params[name].shape[1] // 2))
        # (the up rows move with the down_proj folds too; the gate rows only with this one)
        assert moved == (g["alpha"] > 0) and moved == (not torch.equal(params[name][gate], experts[name][gate]))
    assert any(g["alpha"] > 0 for g in groups.values())
    model = tiny_moe(arch)  # and the whole AWQ start: every expert tensor quantized
    awq_quantize_model(model, QuantSpec(4, 32), ids)
    assert len(quantized_experts(model)) == 4


def test_awq_quantizes_the_experts_alone():
    # every linear layer excluded (attention in full precision, a common MoE recipe): RTN quantized the experts,
    # AWQ refused the model as having nothing to quantize
    from qdpo.quant.awq import _sqnr, awq_quantize_model

    exclude = ("lm_head", "*.self_attn.*")
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    rtn, model = tiny_moe("Mixtral"), tiny_moe("Mixtral")
    with torch.no_grad():
        ref = model(ids).logits
    qdpo.quantize_model(rtn, QuantSpec(4, 32), exclude=exclude)
    awq_quantize_model(model, QuantSpec(4, 32), ids, exclude=exclude)
    assert not quantized_layers(model) and len(quantized_experts(model)) == len(quantized_experts(rtn)) == 4
    assert {g["layers"][0] for g in model.qdpo_awq_stats["groups"]} >= {f"model.layers.{i}.mlp.experts.gate_up_proj"
                                                                       for i in range(2)}
    with torch.no_grad():
        assert _sqnr(ref, model(ids).logits) >= _sqnr(ref, rtn(ids).logits)  # scaled on this very data


def test_awq_checks_the_experts_shapes_before_calibrating():
    """An expert tensor the group size does not divide (Mixtral's down_proj, K = 48, g32) is one error naming
    it, before any calibration forward, as quantize_model's; before, AWQ calibrated and searched every
    group first, then failed in the experts' search with 'weight: K=48 is not divisible'."""
    from qdpo.quant.awq import awq_quantize_model

    model = tiny_moe("Mixtral", intermediate_size=48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts.down_proj: K=48 is not divisible by "
                                         r"group_size=32.*Group sizes that fit every layer: \[-1\]"):
        awq_quantize_model(model, QuantSpec(4, 32), ids)
    assert not calls and not quantized_experts(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["Mixtral", "Qwen3Moe"])
def test_awq_scales_each_experts_down_proj_into_its_up_rows(arch):
    # expert e's down_proj reads act(gate)·up of the tokens routed to e: s multiplies its columns, 1/s its up rows
    from qdpo.quant.awq import _sqnr, awq_scale_model

    model = tiny_moe(arch)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    # the reference: each expert's down_proj input from the FP model's own experts call, RTN error by the reference
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: calls.append((mod, a[0].detach(), a[1])))
             for n, m in model.named_modules() if n.endswith("mlp.experts")]
    with torch.no_grad():
        ref_logits = model(ids).logits
    for h in hooks:
        h.remove()
    spec = QuantSpec(4, 32)
    expect = {}
    for layer, (mod, x, idx) in enumerate(calls):
        inter = mod.down_proj.shape[-1]
        for e in range(mod.down_proj.shape[0]):
            xe = x[(idx == e).any(-1)]
            if len(xe):
                gate, up = (xe @ mod.gate_up_proj[e].detach().t()).split(inter, dim=-1)
                h = mod.act_fn(gate) * up
                w = mod.down_proj[e].detach()
                sc, z = ref.qparams(w, spec.bits, spec.group_size, spec.symmetric)
                err = h @ (ref.fake_quant(w, sc, z, spec.bits) - w).t()
                expect[f"model.layers.{layer}.mlp.experts.down_proj[{e}]"] = float(err.pow(2).mean())
    before = {n: p.detach().clone() for n, p in _expert_tensors(model).items()}
    # gate_up_proj left FP: no norm fold scales its columns, so only the down_proj folds move it
    stats = awq_scale_model(model, spec, ids, exclude=("lm_head", "*.experts.gate_up_proj"))
    with torch.no_grad():
        assert _sqnr(ref_logits, model(ids).logits) > 100  # the FP function is unchanged (fp32)
    groups = {g["layers"][0]: g for g in stats["groups"] if "down_proj[" in g["layers"][0]}
    assert set(groups) == set(expect) and len(expect) >= 6
    params = dict(model.named_parameters())
    for label, g in groups.items():
        assert g["mse_rtn"] == pytest.approx(expect[label], rel=1e-4)  # the inputs the reference saw
        assert g["mse_awq"] <= g["mse_rtn"]
        name, e = label.split("[")[0], int(label.split("[")[1][:-1])
        up_name = name.replace("down_proj", "gate_up_proj")
        half = params[up_name].shape[1] // 2
        assert torch.equal(params[up_name][e, :half], before[up_name][e, :half])  # the gate rows never move
        moved = not torch.equal(params[up_name][e, half:], before[up_name][e, half:])
        assert moved == (g["alpha"] > 0) == (not torch.equal(params[name][e], before[name][e]))
    assert sum(g["alpha"] > 0 for g in groups.values()) >= 2
    missing = {f"model.layers.{i}.mlp.experts.down_proj[{e}]" for i in range(2) for e in range(4)} - set(expect)
    assert {k for k in stats["fallback"] if "down_proj[" in k} == missing  # no token routed there: RTN


@pytest.mark.parametrize("arch", ["DeepseekV3", "Glm4Moe"])
def test_awq_folds_a_deepseek_style_block_as_one_group(arch):
    # the router and shared experts read the post-attention norm's output, the experts a view of it: one
    # scale for all of them (before, the shared experts took the fold alone, the FP logits moved and AWQ
    # undid every fold of the model)
    from qdpo.quant.awq import _sqnr, awq_scale_model

    model = tiny_moe(arch)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    router = model.model.layers[1].mlp.gate.weight.detach().clone()
    stats = awq_scale_model(model, QuantSpec(4, 32), ids)
    with torch.no_grad():
        assert _sqnr(ref, model(ids).logits) > 100  # the FP function is unchanged (fp32)
    assert not any("changed the model's FP logits" in why for why in stats["fallback"].values()), stats["fallback"]
    (g,) = [g for g in stats["groups"] if "model.layers.1.mlp.experts.gate_up_proj" in g["layers"]]
    assert g["folded_into"] == "model.layers.1.post_attention_layernorm" and g["alpha"] > 0
    assert {"model.layers.1.mlp.shared_experts.gate_proj", "model.layers.1.mlp.shared_experts.up_proj"} <= set(g["layers"])
    assert not torch.equal(model.model.layers[1].mlp.gate.weight, router)  # the router's columns took s too
    assert sum(f["folded_into"].endswith("input_layernorm") for f in stats["groups"]) == 2  # attention still scaled


def test_awq_leaves_llama4_experts_alone():
    # Llama 4 feeds its experts the norm's output times the router's scores, not a view of it: no fold there,
    # and nothing else undone
    from qdpo.quant.awq import awq_scale_model

    model = tiny_moe("Llama4Text")
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = awq_scale_model(model, QuantSpec(4, 32), ids)
    assert not any("changed the model's FP logits" in why for why in stats["fallback"].values()), stats["fallback"]
    assert "model.layers.0.feed_forward.experts.gate_up_proj" in stats["fallback"]
    assert not any("experts.gate_up_proj" in g["layers"][0] for g in stats["groups"])
    assert any(g["folded_into"].endswith("input_layernorm") for g in stats["groups"])  # attention still scaled
