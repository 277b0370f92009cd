"""QuantLinear, quantize_model and packed save/load on tiny Hugging Face models (built from configs)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import qdpo
from qdpo import QuantLinear, QuantSpec
from qdpo.kernels import reference as ref
from qdpo.quant import quantizable_layers, quantized_layers, to_packed
from qdpo.quant.linear import frozen_weights
from tests.conftest import assert_exact, sqnr

VOCAB = 96


def tiny(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval()
    if arch == "qwen2":
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        return Qwen2ForCausalLM(cfg).eval()
    if arch == "falcon":  # FalconLinear: an nn.Linear subclass whose own forward computes x @ Wᵀ + b
        cfg = FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bias=True)
        return FalconForCausalLM(cfg).eval()
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
ARCHS = ("llama", "qwen2", "gpt2", "falcon")
EXPECTED_LAYERS = {"llama": 14, "qwen2": 14, "gpt2": 8, "falcon": 8}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(8, -1, True)])
def test_train_and_packed_modes_agree(arch, spec):
    model = tiny(arch)
    fp = model(IDS).logits
    qdpo.quantize_model(model, spec)
    layers = quantized_layers(model)
    assert len(layers) == EXPECTED_LAYERS[arch]
    assert all(m.mode == "train" for m in layers.values())
    assert isinstance(model.get_output_embeddings(), nn.Linear)  # LM head untouched
    fq = model(IDS).logits
    to_packed(model)
    assert all(m.mode == "packed" and not hasattr(m, "weight") for m in layers.values())
    packed = model(IDS).logits
    assert_exact(packed, fq, "logits")  # same ŵ, same matmul
    assert sqnr(fp, fq) > (18 if spec.bits == 4 else 35)  # quantized, but close to FP (W4 g32: falcon 19 dB)


def test_layer_forward_equals_reference():
    lin = nn.Linear(64, 10)
    spec = QuantSpec(4, 32)
    q = QuantLinear.from_linear(lin, spec)
    x = torch.randn(4, 64)
    s, z = ref.qparams(lin.weight.detach(), 4, 32, False)
    expect = ref.fake_quant_matmul(x, lin.weight.detach(), s, z, 4, lin.bias.detach())
    assert_exact(q(x), expect, "y")
    assert "spec=W4A16-g32-asym, mode=train" in repr(q)


def test_gpt2_conv1d_weight_is_transposed():
    model = tiny("gpt2")
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight (K=64, N=256)
    x = torch.randn(3, 64)
    q = QuantLinear.from_linear(conv, QuantSpec(8, 64))
    assert (q.out_features, q.in_features) == (256, 64)
    torch.testing.assert_close(q(x), conv(x), atol=0.02, rtol=0.02)


def test_gradients_reach_latent_weights_and_learned_scales():
    lin = nn.Linear(64, 8)
    q = QuantLinear.from_linear(lin, QuantSpec(4, 32), learn_scales=True)
    assert isinstance(q.scales, nn.Parameter) and not isinstance(q.zeros, nn.Parameter)
    q(torch.randn(5, 64)).pow(2).sum().backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    assert q.scales.grad is not None and q.scales.grad.shape == (8, 2)
    assert q.bias.grad is not None
    trainable = {n for n, p in q.named_parameters()}
    assert trainable == {"weight", "scales", "bias"}


def test_packed_layer_passes_gradient_to_input_only():
    q = QuantLinear.from_linear(nn.Linear(64, 8), QuantSpec(4, 64), mode="packed")
    x = torch.randn(2, 64, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert {n for n, _ in q.named_parameters()} == {"bias"}


def test_to_train_from_packed_starts_at_w_hat():
    lin = nn.Linear(64, 8)
    q = QuantLinear.from_linear(lin, QuantSpec(4, 32), mode="packed")
    w_hat = qdpo.dequantize(q.quantized_weight())
    q.to_train()
    assert_exact(q.weight.detach(), w_hat, "latent")
    x = torch.randn(3, 64)
    y_train = q(x)
    q.to_packed()
    assert_exact(q(x), y_train, "y")


def test_exclude_patterns_and_lm_head():
    model = tiny("llama")
    names = quantizable_layers(model, exclude=("lm_head", "*.mlp.down_proj"))
    assert not any(n.endswith("down_proj") or n == "lm_head" for n in names)
    assert len(names) == 12


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_coverage_counts_every_matrix_once(arch):
    from qdpo.quant.model import weight_coverage

    model = tiny(arch)
    layers = quantizable_layers(model, exclude=("lm_head", "*.mlp.down_proj", "*.mlp.c_proj"))
    n_q = sum(m.weight.numel() for m in layers.values())
    left = {n: m for n, m in quantizable_layers(model).items() if n not in layers}
    n_left = sum(m.weight.numel() for m in left.values())
    emb = model.get_input_embeddings().weight.numel()
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        emb += model.get_output_embeddings().weight.numel()  # qwen2: untied; llama and gpt2: tied, counted once
    qdpo.quantize_model(model, QuantSpec(4, 32), exclude=("lm_head", "*.mlp.down_proj", "*.mlp.c_proj"))
    c = weight_coverage(model)
    assert (c["quantized_layers"], c["quantized_weights"], c["embedding_weights"]) == (len(layers), n_q, emb)
    wpe = model.transformer.wpe.weight.numel() if arch == "gpt2" else 0  # GPT-2's position embeddings
    assert c["other_fp_weights"] == n_left + wpe
    assert c["quantized_fraction"] == pytest.approx(n_q / (n_q + emb + c["other_fp_weights"]))
    assert c["fp_fused_expert_tensors"] == []


def tiny_gemma3() -> nn.Module:
    """A tiny Gemma 3 chat model with its vision encoder (token ids below VOCAB are text)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Gemma3Config(
        text_config=dict(vocab_size=VOCAB + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=VOCAB + 1, boi_token_index=VOCAB + 2, eoi_token_index=VOCAB + 3)
    return Gemma3ForConditionalGeneration(cfg).eval()


def test_a_multimodal_checkpoint_quantizes_its_language_model_only():
    # Gemma 3 chat checkpoints load as one causal LM with a vision encoder that chat data never reaches
    from qdpo.quant.model import weight_coverage

    model = tiny_gemma3()
    vision = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "vision_tower" in n]
    assert vision
    with torch.no_grad():
        before = model(IDS).logits
    qdpo.quantize_model(model, QuantSpec(4, 32))
    names = list(quantized_layers(model))
    assert len(names) == 14 and all(".language_model." in n for n in names)  # 7 per decoder layer
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in vision)
    assert weight_coverage(model)["fp_fused_expert_tensors"] == []  # the vision head's (1, 1, H) probe is no expert
    with torch.no_grad():
        assert sqnr(before, model(IDS).logits) > 10


def test_linear_subclasses_with_their_own_forward_are_left_alone():
    class Router(nn.Linear):  # returns more than a linear layer does (Llama 4's router)
        def forward(self, x):
            logits = super().forward(x)
            return logits.softmax(-1), logits

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.router = nn.Linear(32, 32), Router(32, 4)

    block = Block()
    assert list(quantizable_layers(block, ())) == ["proj"]
    qdpo.quantize_model(block, QuantSpec(4, 32), exclude=())
    assert isinstance(block.proj, QuantLinear) and type(block.router) is Router


def test_shape_error_names_layer_and_leaves_model_unchanged():
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: K=64 is not divisible by group_size=128"):
        qdpo.quantize_model(model, QuantSpec(4, 128))
    assert not quantized_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nan_weights_are_refused_before_any_change():
    model = tiny("qwen2")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj: weight contains NaN"):
        qdpo.quantize_model(model, QuantSpec(4, 32))
    assert not quantized_layers(model)


def test_given_grids_off_the_spec_are_refused_before_any_change():
    # a given grid's zero points were taken as they were: one off the grid (a signed zero point stored as
    # uint8) quantized its group to a constant, and a symmetric spec took asymmetric zero points
    model = tiny("llama")
    spec = QuantSpec(4, 32, False)
    name = "model.layers.1.mlp.up_proj"
    w = model.get_submodule(name).weight.detach()
    s, z = torch.ops.qdpo.qparams(w, 4, 32, False)
    bad = z.clone()
    bad[3, 1] = 250  # -6
    with pytest.raises(ValueError, match=rf"{name}: grids' zero points hold 250, expected in \[0, 15\]"):
        qdpo.quantize_model(model, spec, grids={name: (s, bad)})
    assert not quantized_layers(model)
    with pytest.raises(ValueError, match=r"zeros hold \d+, expected all 8 \(W4A16-g32-sym is symmetric\)"):
        QuantLinear.from_linear(model.get_submodule(name), QuantSpec(4, 32, True), scales=s, zeros=z)
    q = QuantLinear.from_linear(model.get_submodule(name), spec, scales=s, zeros=z)  # the grid itself is taken
    assert_exact(q.zeros, z, "zeros")


def test_bad_arguments():
    with pytest.raises(TypeError, match="spec must be a qdpo.QuantSpec"):
        qdpo.quantize_model(tiny("llama"), (4, 32))
    with pytest.raises(ValueError, match="method='gptq' is not known"):
        qdpo.quantize_model(tiny("llama"), QuantSpec(4, 32), method="gptq")
    with pytest.raises(ValueError, match="mode='fast' is not known"):
        QuantLinear(64, 8, QuantSpec(4, 32), mode="fast")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["train", "packed"])
def test_save_load_roundtrip(arch, mode, tmp_path):
    model = tiny(arch)
    qdpo.quantize_model(model, QuantSpec(4, 32), mode=mode)
    expect = model(IDS).logits
    qdpo.save_quantized(model, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "qdpo_quant.json", "config.json"} <= files
    assert not any(f.startswith(".") for f in files)  # no temporary leftovers
    loaded = qdpo.load_quantized(tmp_path)
    assert_exact(loaded(IDS).logits, expect, "logits")
    assert all(m.mode == "packed" for m in quantized_layers(loaded).values())
    trained = qdpo.load_quantized(tmp_path, mode="train")
    assert_exact(trained(IDS).logits, expect, "logits")


def test_tied_embeddings_stored_once(tmp_path):
    model = tiny("llama")
    qdpo.quantize_model(model, QuantSpec(4, 32))
    qdpo.save_quantized(model, tmp_path)
    cfg = json.loads((tmp_path / "qdpo_quant.json").read_text())
    assert cfg["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = qdpo.load_quantized(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def _saved(tmp_path):
    model = tiny("llama")
    qdpo.quantize_model(model, QuantSpec(4, 32), mode="packed")
    qdpo.save_quantized(model, tmp_path)
    return tmp_path


def test_load_errors_missing_tensor(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.scales")
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="has no tensor 'model.layers.1.mlp.up_proj.scales'"):
        qdpo.load_quantized(path)


def test_load_errors_wrong_shape(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.qweight"] = tensors["model.layers.0.mlp.up_proj.qweight"][:, :8].contiguous()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="up_proj.qweight' has shape"):
        qdpo.load_quantized(path)


def test_load_errors_zero_points_and_scales_out_of_range(tmp_path):
    # the kernels read the grid as stored: a damaged value would be a silently wrong layer
    path = _saved(tmp_path)
    good = load_file(path / "model.safetensors")
    key = "model.layers.0.mlp.up_proj."
    for edit, match in (("zeros", r"zero points '.*up_proj.zeros' hold 200, expected in \[0, 15\]"),
                        ("scales", r"scales '.*up_proj.scales' hold NaN or Inf")):
        tensors = dict(good)
        t = tensors[key + edit].clone()
        t.view(-1)[3] = 200 if edit == "zeros" else float("nan")
        tensors[key + edit] = t
        save_file(tensors, path / "model.safetensors")
        with pytest.raises(ValueError, match=match):
            qdpo.load_quantized(path)
    sym = tmp_path / "sym"  # symmetric: every zero point is the fixed offset 2^(b-1)
    model = tiny("llama")
    qdpo.quantize_model(model, QuantSpec(4, 32, symmetric=True), mode="packed")
    qdpo.save_quantized(model, sym)
    tensors = load_file(sym / "model.safetensors")
    assert qdpo.load_quantized(sym) is not None
    tensors[key + "zeros"] = tensors[key + "zeros"] - 1
    save_file(tensors, sym / "model.safetensors")
    with pytest.raises(ValueError, match=r"hold 7, expected all 8 \(W4A16-g32-sym is symmetric\)"):
        qdpo.load_quantized(sym)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(format="gptq"), "'format' must be 'qdpo-packed'"),
    (lambda c: c["spec"].update(bits=3), "bits=3 is not supported"),
    (lambda c: c["spec"].pop("group_size"), "missing"),
    (lambda c: c.update(modules=["model.layers.9.mlp"]), "names module 'model.layers.9.mlp'"),
    (lambda c: c.update(version=2), "format version 2 is not one this qdpo reads"),  # was read as version 1
])
def test_load_errors_wrong_config(tmp_path, edit, match):
    path = _saved(tmp_path)
    cfg = json.loads((path / "qdpo_quant.json").read_text())
    edit(cfg)
    (path / "qdpo_quant.json").write_text(json.dumps(cfg))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        qdpo.load_quantized(path)


def test_load_errors_not_json_missing_dir_and_pickles(tmp_path):
    path = _saved(tmp_path / "m")
    (path / "qdpo_quant.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        qdpo.load_quantized(path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        qdpo.load_quantized(tmp_path / "nowhere")
    pick = tmp_path / "pickled"
    pick.mkdir()
    torch.save({"x": torch.ones(1)}, pick / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="refuses pickles"):
        qdpo.load_quantized(pick)


def test_interrupted_resave_is_refused_not_read_with_the_old_config(tmp_path, monkeypatch):
    # re-saving into a packed directory wrote the new weights first: interrupted, they sat beside the old
    # qdpo_quant.json, which load_quantized read them with
    path = _saved(tmp_path)
    (path / "notes.txt").write_text("mine")
    model = tiny("llama", seed=1)
    qdpo.quantize_model(model, QuantSpec(8, 32), mode="packed")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model.config), "to_json_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        qdpo.save_quantized(model, path)
    with pytest.raises(ValueError, match="save_quantized that wrote it did not finish.*save the model again"):
        qdpo.load_quantized(path)
    monkeypatch.undo()
    qdpo.save_quantized(model, path)
    assert_exact(qdpo.load_quantized(path)(IDS).logits, model(IDS).logits, "logits")
    assert (path / "notes.txt").read_text() == "mine"  # other files in the directory are kept
    assert not any(p.name.startswith(".") for p in path.iterdir())


def test_failed_weights_write_keeps_the_earlier_save(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    expect = qdpo.load_quantized(path)(IDS).logits
    model = tiny("llama", seed=1)
    qdpo.quantize_model(model, QuantSpec(8, 32), mode="packed")

    def full_disk(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("qdpo.quant.io.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        qdpo.save_quantized(model, path)
    assert_exact(qdpo.load_quantized(path)(IDS).logits, expect, "logits")
    assert not any(p.name.startswith(".") for p in path.iterdir())


def test_save_into_a_full_precision_model_directory_keeps_its_weights(tmp_path):
    # saving into the directory of the model it was quantized from replaced its model.safetensors: the
    # full-precision weights were lost
    fp = tiny("llama")
    fp.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    model = tiny("llama")
    qdpo.quantize_model(model, QuantSpec(4, 32))
    with pytest.raises(FileExistsError, match="model.safetensors exists and is not a qdpo packed model's.*save into "
                                              "another directory"):
        qdpo.save_quantized(model, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "qdpo_quant.json").exists()
    qdpo.save_quantized(model, tmp_path / "packed")
    qdpo.save_quantized(model, tmp_path / "packed")  # its own earlier save is replaced


def test_save_refuses_unquantized_model(tmp_path):
    with pytest.raises(ValueError, match="no QuantLinear layers; call qdpo.quantize_model first"):
        qdpo.save_quantized(tiny("llama"), tmp_path)


def test_bf16_model_modes_agree():
    model = tiny("llama").to(torch.bfloat16)
    qdpo.quantize_model(model, QuantSpec(4, 64))
    a = model(IDS).logits
    to_packed(model)
    assert_exact(model(IDS).logits, a, "logits")



@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("how", ["half", "learned scales", "to_train", "load_state_dict"])
def test_cast_to_float16_keeps_scales_nonzero_and_rounded_up(backend, how):
    """A float32 layer with an all-zero group cast to (or loaded into) float16: a plain cast rounded its finfo.tiny
    scale to 0, and the train-mode forward (0 / 0 in fake-quant) gave NaN. Scales now go to the new dtype rounded
    up, as quantization makes them."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 4)
    with torch.no_grad():
        lin.weight[1, :32] = 0
    spec = QuantSpec(4, 32)
    if how == "to_train":
        q = QuantLinear.from_linear(lin, spec, mode="packed", backend=backend)
        s32 = q.scales.clone()
        q.to_train(torch.float16)
    elif how == "load_state_dict":  # a float32 state dict into a float16 layer
        q32 = QuantLinear.from_linear(lin, spec, backend=backend)
        s32 = q32.scales.clone()
        q = QuantLinear(64, 4, spec, dtype=torch.float16, backend=backend)
        q.load_state_dict(q32.state_dict())
    else:
        q = QuantLinear.from_linear(lin, spec, learn_scales=how == "learned scales", backend=backend)
        s32 = q.scales.detach().clone()
        q.half()
        assert isinstance(q.scales, nn.Parameter) == (how == "learned scales")
    s16 = q.scales.detach()
    assert s16.dtype == torch.float16 and bool((s16 > 0).all())
    below = torch.nextafter(s16, torch.zeros_like(s16)).float()  # the float16 value under each scale
    assert bool((s16.float() >= s32).all()) and bool((below < s32).all())  # the smallest float16 >= the scale
    x = torch.randn(3, 64, dtype=torch.float16)
    y = q(x)
    assert bool(torch.isfinite(y).all())
    want = ref.fake_quant_matmul(x, q.weight.detach(), s16, q.zeros, 4, q.bias.detach())
    torch.testing.assert_close(y, want, rtol=1e-3, atol=1e-3)
    assert_exact(y[:, 1:2], want[:, 1:2], "the all-zero row")

def test_cpu_step_cache_matches_ops_path_and_refreshes_after_a_step():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    a = QuantLinear.from_linear(lin, QuantSpec(4, 32))
    b = QuantLinear.from_linear(lin, QuantSpec(4, 32), backend="reference")
    with torch.no_grad():  # push latent weights off the grid so the mask matters
        a.weight.add_(torch.randn_like(a.weight))
        b.weight.copy_(a.weight)
    x = torch.randn(5, 64)
    for _ in range(2):  # the second round runs on a cache refreshed after the in-place update
        assert a._use_step_cache(x)
        ya = a(x)
        yb = torch.ops.qdpo.fake_quant_matmul(x, b.weight, b.scales, b.zeros, 4, b.bias, "reference")
        assert_exact(ya, yb, "y")
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        assert_exact(a.weight.grad, b.weight.grad, "dw")
        with torch.no_grad():
            a.weight.sub_(0.5 * a.weight.grad)
            b.weight.sub_(0.5 * b.weight.grad)
        a.weight.grad = b.weight.grad = None



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_step_cache_gradients_of_low_precision_x_accumulate_in_fp32(dtype):
    """bf16/fp16 x (CPU autocast) on fp32 latent weights: the step cache's backward was F.linear's, which rounded
    dŵ = dyᵀ @ x and the bias gradient to x's dtype (relative error ~1e-3 in bf16, ~1e-7 on the ops path); they
    now accumulate in fp32 as qdpo::fake_quant_matmul's do, bit for bit."""
    torch.manual_seed(0)
    a = QuantLinear.from_linear(nn.Linear(64, 8), QuantSpec(4, 32))
    with torch.no_grad():  # push latent weights off the grid so the mask matters
        a.weight.add_(torch.randn_like(a.weight))
    w, b = a.weight.detach().clone().requires_grad_(), a.bias.detach().clone().requires_grad_()
    x = torch.randn(2, 5, 64).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert a._use_step_cache(xa)
    ya = a(xa)
    yb = torch.ops.qdpo.fake_quant_matmul(xb, w, a.scales, a.zeros, 4, b, "reference")
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    for got, want, what in ((ya, yb, "y"), (xa.grad, xb.grad, "dx"), (a.weight.grad, w.grad, "dw"),
                            (a.bias.grad, b.grad, "db")):
        assert_exact(got, want, what)
    (gx,) = torch.autograd.grad(a(xa).pow(2).sum(), xa, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):  # first order only, as the op: never a silent 0
        gx.sum().backward()

def test_cpu_step_cache_refreshes_after_zero_points_change_in_place():
    """A calibration that edits the zero points alone (weights and scales untouched): the cached ŵ used to be
    kept, so the forward, its gradient and dequantized() ignored the new zero points."""
    torch.manual_seed(0)
    a = QuantLinear.from_linear(nn.Linear(64, 8), QuantSpec(4, 32))
    x = torch.randn(5, 64)
    a(x)  # fills the cache
    with torch.no_grad():
        a.zeros.copy_((a.zeros + 3).clamp_max(15))
    assert a._use_step_cache(x)
    y = a(x)
    want = ref.fake_quant_matmul(x, a.weight.detach(), a.scales, a.zeros, 4, a.bias.detach())
    assert_exact(y, want, "y")
    assert_exact(a.dequantized(), ref.fake_quant(a.weight.detach(), a.scales, a.zeros, 4), "ŵ")
    y.sum().backward()
    dw, _ = ref.fake_quant_backward(torch.ones(5, 8).t() @ x, a.weight.detach(), a.scales, a.zeros, 4)
    torch.testing.assert_close(a.weight.grad, dw)

@pytest.mark.parametrize("mode", ["train", "packed"])
def test_layer_runs_on_the_meta_device(mode):
    """A model moved to (or built on) ``meta`` runs shapes only, as nn.Linear does: autocast, which meta
    does not have, is not asked about there."""
    q = QuantLinear.from_linear(nn.Linear(64, 8), QuantSpec(4, 32), mode=mode).to("meta")
    y = q(torch.randn(2, 3, 64, device="meta"))
    assert (y.device.type, y.shape, y.dtype) == ("meta", (2, 3, 8), torch.float32)


@pytest.mark.parametrize("mode", ["train", "packed"])
def test_quantize_model_of_a_meta_model_is_a_skeleton_that_loads_a_state_dict(mode):
    """A model built on ``meta`` (shapes only, as for a large checkpoint) quantized into an empty skeleton: the
    weights' NaN check read the meta values and raised 'Tensor.item() cannot be called on meta tensors'."""
    torch.manual_seed(0)
    spec = QuantSpec(4, 32)

    def build():
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))

    real = qdpo.quantize_model(build(), spec, mode=mode)
    with torch.device("meta"):
        skeleton = build()
    qdpo.quantize_model(skeleton, spec, mode=mode)
    assert all(t.device.type == "meta" for t in skeleton.state_dict().values())
    skeleton.to_empty(device="cpu").load_state_dict(real.state_dict())
    x = torch.randn(3, 64)
    assert_exact(skeleton(x), real(x), "y")

def test_train_layer_compiles_fullgraph_and_exports_on_the_cpu():
    """The CPU step cache (keyed on data pointers) is an eager-mode path: compiled and exported code takes
    the ops, with the same outputs and gradients."""
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 8), QuantSpec(4, 32))
    x = torch.randn(3, 64)
    assert q._use_step_cache(x)
    y = q(x)
    y.pow(2).sum().backward()
    dw, q.weight.grad = q.weight.grad, None
    yc = torch.compile(q, fullgraph=True)(x)
    yc.pow(2).sum().backward()
    assert_exact(yc, y, "compiled y")
    assert_exact(q.weight.grad, dw, "compiled dw")
    assert_exact(torch.export.export(q, (x,)).module()(x), y, "exported y")


def test_bad_inputs_are_refused_on_every_path():
    """The CPU step cache and frozen_weights multiply by a cached ŵ outside the ops: x is checked as the
    ops check it (an integer x used to come out as zeros, ŵ cast to it)."""
    q = QuantLinear.from_linear(nn.Linear(64, 8), QuantSpec(4, 32))

    def frozen(x):
        with torch.no_grad(), frozen_weights(q):
            return q(x)

    for run in (q, frozen):
        with pytest.raises(TypeError, match="x has dtype torch.int64; use float16, bfloat16 or float32"):
            run(torch.ones(3, 64, dtype=torch.long))
        with pytest.raises(TypeError, match="x has dtype torch.float64"):
            run(torch.randn(3, 64, dtype=torch.float64))
        with pytest.raises(ValueError, match="in_features K=64"):
            run(torch.randn(3, 63))


def test_load_quantized_refuses_an_unknown_mode_before_reading_anything(tmp_path):
    # the directory does not even exist: the mode is checked first, not after building and loading the model
    with pytest.raises(ValueError, match="mode='pakced' is not known; use 'packed' or 'train'"):
        qdpo.load_quantized(tmp_path / "absent", mode="pakced")


def test_packed_state_dict_keeps_a_transposed_view_apart():
    # same storage, offset and shape, other strides: another tensor (a square matrix and its transpose), not an alias
    from qdpo.quant.io import packed_state_dict

    m = nn.Module()
    w = torch.arange(16.0).reshape(4, 4)
    m.register_buffer("a", w)
    m.register_buffer("b", w.t())
    m.register_buffer("c", w)  # the same view again: an alias
    tensors, aliases = packed_state_dict(m)
    assert aliases == {"c": "a"}
    assert torch.equal(tensors["a"], w) and torch.equal(tensors["b"], w.t())
