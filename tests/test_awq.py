"""AWQ initialisation on tiny Hugging Face models (random weights with activation outliers).

Every check is against an independent computation: the FP model's own logits,
quantize_model's RTN layers, and layer outputs recomputed here from captured
inputs (not the library's internal MSE).
"""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import qdpo
from qdpo import QuantSpec
from qdpo.quant import quantized_layers
from qdpo.quant.awq import awq_quantize_model, awq_scale_model, awq_stats
from tests.conftest import assert_exact, sqnr

VOCAB = 96
SPEC = QuantSpec(4, 32)
N_GRID = 11  # α ∈ {0, 0.1, …, 1}: enough to find the gain, cheap on 2 cores
CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
HELD_OUT = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(2))
ARCHS = ("llama-gqa", "llama-mha", "qwen2")


def tiny(arch: str, seed: int = 0) -> nn.Module:
    """A 2-layer model with random weights; ``-gqa`` has 2 KV heads for 4 query heads."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4)
    if arch.startswith("llama"):
        kv = 2 if arch == "llama-gqa" else 4
        return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=kv, tie_word_embeddings=True)).eval()
    if arch == "qwen2":  # q/k/v biases, untied head
        return Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


@torch.no_grad()
def with_outliers(model: nn.Module) -> nn.Module:
    """Give a few channels 15-30× larger activations, as in real LLMs (what AWQ exploits).

    Biases (zero at init) get random values so that folding into them is tested.
    """
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(getattr(m, "bias", None), torch.Tensor):
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    model.get_input_embeddings().weight[:, [3, 17, 40]] *= 30  # residual-stream outlier channels
    for layer in getattr(getattr(model, "model", None), "layers", []):
        layer.post_attention_layernorm.weight[[5, 22]] *= 20
        layer.self_attn.v_proj.weight[[1, 9, 20]] *= 15  # outliers at o_proj's input
        layer.mlp.up_proj.weight[[7, 70, 100]] *= 15  # outliers at down_proj's input
    return model


def logits(model, ids=HELD_OUT) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def runs():
    """Per architecture: FP model, AWQ-folded FP model (+ stats), AWQ-quantized and RTN-quantized models."""
    out = {}
    for arch in (*ARCHS, "gpt2"):
        fp = with_outliers(tiny(arch))
        folded = copy.deepcopy(fp)
        stats = awq_scale_model(folded, SPEC, CALIB, n_grid=N_GRID)
        awq = qdpo.quantize_model(copy.deepcopy(folded), SPEC)
        rtn = qdpo.quantize_model(copy.deepcopy(fp), SPEC)
        out[arch] = dict(fp=fp, folded=folded, stats=stats, awq=awq, rtn=rtn)
    return out


# --------------------------------------------------------------------------- folding
@pytest.mark.parametrize("arch", (*ARCHS, "gpt2"))
def test_folding_preserves_fp_logits(runs, arch):
    r = runs[arch]
    changed = [k for k, v in r["folded"].state_dict().items() if not torch.equal(v, r["fp"].state_dict()[k])]
    assert changed, "no scale was folded"
    assert sqnr(logits(r["fp"]), logits(r["folded"])) > 80  # fp32 rounding only
    torch.testing.assert_close(logits(r["folded"]), logits(r["fp"]), atol=1e-4, rtol=1e-4)


def test_gqa_o_proj_scale_is_shared_by_the_heads_reading_one_kv_head(runs):
    """Recover s from the weights: o_proj column c is × s[c]; v_proj row r is ÷ s_v[r] (after ÷ of the norm)."""
    r = runs["llama-gqa"]
    fp, folded = r["fp"].model.layers[0], r["folded"].model.layers[0]
    s_o = folded.self_attn.o_proj.weight[0] / fp.self_attn.o_proj.weight[0]  # [64]: 4 heads × hd 16
    s_qkv = fp.input_layernorm.weight / folded.input_layernorm.weight  # [64]
    inv_s_v = folded.self_attn.v_proj.weight / (fp.self_attn.v_proj.weight * s_qkv)  # [32, 64], constant rows
    inv_s_v = inv_s_v.mean(1)
    s_o = s_o.view(2, 2, 16)  # (kv head, query head reading it, head_dim)
    assert not torch.allclose(s_o, torch.ones_like(s_o))
    torch.testing.assert_close(s_o[:, 0], s_o[:, 1], rtol=1e-5, atol=0)  # one scale per KV channel
    torch.testing.assert_close(s_o[:, 0].reshape(-1) * inv_s_v, torch.ones(32), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- calibration error
def layer_inputs(model, names, ids=CALIB) -> dict[str, torch.Tensor]:
    """Inputs of the named layers on ``ids``, captured here with hooks."""
    got, handles = {}, []
    for n in names:
        hook = lambda m, a, n=n: got.__setitem__(n, a[0].detach().reshape(-1, a[0].shape[-1]))
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return got


def group_mse(fp, x_fp, folded, x_folded, quant, names) -> float:
    """Mean squared error of the group's outputs vs FP, in the FP model's output units.

    ``quant`` runs on ``folded``'s inputs and is compared with ``folded``'s FP
    outputs; a later fold may have divided an output channel (v_proj, up_proj
    rows) by a scale, which the per-channel ratio ``c`` of FP to folded
    outputs (fitted here) undoes.
    """
    err, count = 0.0, 0
    with torch.no_grad():
        for n in names:
            y_fp, y_folded = fp.get_submodule(n)(x_fp[n]), folded.get_submodule(n)(x_folded[n])
            c = (y_fp * y_folded).sum(0) / y_folded.pow(2).sum(0)  # [N] 1 unless the rows were rescaled
            err += float(((quant.get_submodule(n)(x_folded[n]) - y_folded) * c).pow(2).sum())
            count += y_fp.numel()
    return err / count


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_output_mse_not_worse_than_rtn(runs, arch):
    r = runs[arch]
    names = list(quantized_layers(r["awq"]))
    x_fp, x_folded = layer_inputs(r["fp"], names), layer_inputs(r["folded"], names)
    groups = []
    for i in range(2):
        p = f"model.layers.{i}."
        groups += [[p + f"self_attn.{c}_proj" for c in "qkv"], [p + "self_attn.o_proj"],
                   [p + "mlp.gate_proj", p + "mlp.up_proj"], [p + "mlp.down_proj"]]
    by_first = {g["layers"][0]: g for g in r["stats"]["groups"]}
    assert sorted(by_first) == sorted(g[0] for g in groups) and not r["stats"]["fallback"]
    for g in groups:
        rtn = group_mse(r["fp"], x_fp, r["fp"], x_fp, r["rtn"], g)
        awq = group_mse(r["fp"], x_fp, r["folded"], x_folded, r["awq"], g)
        st = by_first[g[0]]
        assert st["layers"] == g
        assert st["mse_rtn"] == pytest.approx(rtn, rel=1e-3)  # the library's α = 0 is RTN
        assert st["mse_awq"] == pytest.approx(awq, rel=1e-3)
        assert awq < 0.8 * rtn, f"{g[0]}: AWQ {awq:.3g} vs RTN {rtn:.3g} (alpha {st['alpha']})"
        assert 0 < st["alpha"] <= 1
    assert r["stats"]["mse_reduction_mean"] > 0.4


@pytest.mark.parametrize("arch", ("llama-gqa", "qwen2"))
def test_never_worse_than_rtn_without_outliers(arch):
    """On plain random weights large α hurts: the search must still never lose to RTN (α = 0)."""
    fp = tiny(arch)
    folded = copy.deepcopy(fp)
    stats = awq_scale_model(folded, SPEC, CALIB, n_grid=N_GRID)
    awq = qdpo.quantize_model(copy.deepcopy(folded), SPEC)
    rtn = qdpo.quantize_model(copy.deepcopy(fp), SPEC)
    names = list(quantized_layers(awq))
    x_fp, x_folded = layer_inputs(fp, names), layer_inputs(folded, names)
    for g in stats["groups"]:
        rtn_mse = group_mse(fp, x_fp, fp, x_fp, rtn, g["layers"])
        awq_mse = group_mse(fp, x_fp, folded, x_folded, awq, g["layers"])
        assert awq_mse <= rtn_mse * (1 + 1e-5), f"{g['layers'][0]}: AWQ {awq_mse:.4g} > RTN {rtn_mse:.4g}"
    assert len(stats["groups"]) == 8


def test_alpha_zero_is_rtn_exactly():
    fp = with_outliers(tiny("qwen2"))
    awq = awq_quantize_model(copy.deepcopy(fp), SPEC, CALIB, n_grid=1)
    rtn = qdpo.quantize_model(copy.deepcopy(fp), SPEC)
    sd_awq, sd_rtn = awq.state_dict(), rtn.state_dict()
    assert sd_awq.keys() == sd_rtn.keys()
    for k in sd_rtn:
        assert_exact(sd_awq[k], sd_rtn[k], k)
    stats = awq_stats(awq)
    assert all(g["alpha"] == 0 and g["mse_awq"] == g["mse_rtn"] for g in stats["groups"])
    assert len(stats["groups"]) == 8


# --------------------------------------------------------------------------- held-out quality
@pytest.mark.parametrize("arch", ARCHS)
def test_awq_beats_rtn_on_held_out_logits(runs, arch):
    r = runs[arch]
    ref = logits(r["fp"])
    db_awq, db_rtn = sqnr(ref, logits(r["awq"])), sqnr(ref, logits(r["rtn"]))
    assert db_awq > db_rtn + 1.0, f"AWQ {db_awq:.1f} dB vs RTN {db_rtn:.1f} dB"
    kl = lambda q: F.kl_div(q.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl(logits(r["awq"])) < kl(logits(r["rtn"]))


def test_packed_mode_and_stats_on_model():
    model = awq_quantize_model(with_outliers(tiny("llama-gqa")), SPEC, [CALIB[:4], CALIB[4:]], n_grid=3,
                               mode="packed")
    assert all(m.mode == "packed" for m in quantized_layers(model).values())
    stats = awq_stats(model)
    assert stats["method"] == "awq" and stats["spec"] == SPEC.name and stats["calib_tokens"] == CALIB.numel()
    assert model.qdpo_spec == SPEC


# --------------------------------------------------------------------------- fallbacks
def test_gpt2_conv1d_folds_into_layernorms_and_falls_back_elsewhere(runs, caplog):
    r = runs["gpt2"]
    assert len(quantized_layers(r["awq"])) == 8
    folded_into = {g["layers"][0]: g["folded_into"] for g in r["stats"]["groups"]}
    assert folded_into == {f"transformer.h.{i}.{a}": f"transformer.h.{i}.{n}"
                           for i in range(2) for a, n in (("attn.c_attn", "ln_1"), ("mlp.c_fc", "ln_2"))}
    assert sorted(r["stats"]["fallback"]) == sorted(f"transformer.h.{i}.{m}.c_proj"
                                                    for i in range(2) for m in ("attn", "mlp"))
    with caplog.at_level(logging.INFO, logger="qdpo.quant.awq"):
        awq_quantize_model(with_outliers(tiny("gpt2")), SPEC, CALIB, n_grid=2)
    assert "transformer.h.1.mlp.c_proj keeps plain RTN" in caplog.text


class ToyAttention(nn.Module):
    """v_proj → parameter-free layer norm → o_proj: scaling v's rows does NOT pass through."""

    def __init__(self, d):
        super().__init__()
        self.v_proj, self.o_proj, self.head_dim = nn.Linear(d, d), nn.Linear(d, d), 16

    def forward(self, x):
        return self.o_proj(F.layer_norm(self.v_proj(x), x.shape[-1:]))


class ToyMLP(nn.Module):
    """down_proj(silu(up_proj(x))): silu does not commute with a row scale of up_proj."""

    def __init__(self, d):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.up_proj(x)))


class Toy(nn.Module):
    """An unknown architecture whose names look foldable but whose math is not."""

    def __init__(self, d=64):
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, d), nn.Linear(d, VOCAB)
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(d), ToyAttention(d), nn.LayerNorm(d), ToyMLP(d)

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = h + self.attn(self.norm1(h))
        return self.head(h + self.mlp(self.norm2(h)))


def test_unfoldable_lookalikes_are_undone_and_keep_rtn():
    torch.manual_seed(0)
    model = Toy()
    with torch.no_grad():
        model.emb.weight[:, [3, 17]] *= 30
        model.attn.v_proj.weight[[1, 9]] *= 15
        model.mlp.up_proj.weight[[7, 70]] *= 15
    fp = copy.deepcopy(model)
    stats = awq_scale_model(model, SPEC, CALIB, n_grid=N_GRID)
    torch.testing.assert_close(model(HELD_OUT), fp(HELD_OUT), atol=1e-4, rtol=1e-4)
    assert "does not scale linearly" in stats["fallback"]["mlp.down_proj"]  # caught by the MLP check
    assert "changed the model's FP logits" in stats["fallback"]["attn.o_proj"]  # caught end to end
    assert {g["folded_into"] for g in stats["groups"]} == {"norm1", "norm2"}
    assert all(g["alpha"] > 0 for g in stats["groups"])
    qdpo.quantize_model(model, SPEC)
    assert len(quantized_layers(model)) == 4


def test_bfloat16_model_folds_within_bf16_rounding():
    fp = with_outliers(tiny("llama-gqa")).to(torch.bfloat16)
    model = awq_quantize_model(copy.deepcopy(fp), SPEC, CALIB, n_grid=3)
    assert not awq_stats(model)["fallback"]
    assert sqnr(logits(fp).float(), logits(model).float()) > 15


# --------------------------------------------------------------------------- calibration data
def test_padding_is_ignored_and_tokens_are_subsampled():
    fp = with_outliers(tiny("llama-gqa"))
    ids = CALIB.clone()
    mask = torch.ones_like(ids)
    mask[:, 20:] = 0  # right padding: real tokens never attend to it (causal)
    runs = []
    for pad in (0, VOCAB - 1):
        ids[:, 20:] = pad
        runs.append(awq_scale_model(copy.deepcopy(fp), SPEC, ids, mask, n_grid=3))
    assert runs[0]["sampled_tokens"] == runs[0]["calib_tokens"] == 8 * 20
    assert runs[0]["groups"] == runs[1]["groups"]  # pad ids do not matter
    seqs = [CALIB[0, :32], CALIB[1, :7], CALIB[2:5]]  # ragged list: 1-D and 2-D batches
    small = awq_scale_model(copy.deepcopy(fp), SPEC, seqs, max_tokens=50, n_grid=2)
    assert small["calib_tokens"] == 32 + 7 + 96 and small["sampled_tokens"] == 50


# --------------------------------------------------------------------------- errors
def test_errors():
    model = tiny("llama-gqa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="calibration data is empty"):
        awq_quantize_model(model, SPEC, [])
    with pytest.raises(ValueError, match="must not be empty"):
        awq_quantize_model(model, SPEC, torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 96, out of range for the model's vocabulary of 96"):
        awq_quantize_model(model, SPEC, torch.tensor([[1, 2, 96]]))
    with pytest.raises(ValueError, match="token id -1"):
        awq_quantize_model(model, SPEC, torch.tensor([[1, -1]]))
    with pytest.raises(TypeError, match="integer tensor of token ids"):
        awq_quantize_model(model, SPEC, torch.rand(2, 8))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: K=64 is not divisible by group_size=128"):
        awq_quantize_model(model, QuantSpec(4, 128), CALIB)
    with pytest.raises(ValueError, match="attention_mask batch 0 has shape"):
        awq_quantize_model(model, SPEC, CALIB, torch.ones(8, 5))
    with pytest.raises(ValueError, match="every calibration position as padding"):
        awq_quantize_model(model, SPEC, CALIB, torch.zeros_like(CALIB))
    with pytest.raises(ValueError, match="n_grid=0"):
        awq_quantize_model(model, SPEC, CALIB, n_grid=0)
    with pytest.raises(ValueError, match="mode='fast' is not known"):
        awq_quantize_model(model, SPEC, CALIB, mode="fast")
    with pytest.raises(TypeError, match="spec must be a qdpo.QuantSpec"):
        awq_quantize_model(model, (4, 32), CALIB)
    with pytest.raises(ValueError, match="was not quantized with AWQ"):
        awq_stats(model)
    assert not quantized_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_exported_from_qdpo_quant():
    from qdpo.quant import awq_quantize_model as exported

    assert exported is awq_quantize_model
