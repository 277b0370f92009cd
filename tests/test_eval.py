"""Evaluation: metrics against direct full-logits computations, ROUGE-L, plots, metrics.json and report.md."""

import copy
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qdpo
from qdpo import QuantSpec
from qdpo.eval import metrics as M
from qdpo.eval import plots, report

VOCAB = 96


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      initializer_range=0.2)  # wide init: peaked distributions, a spread of margins
    return LlamaForCausalLM(cfg).eval()


def perturbed(model, scale: float = 0.15, seed: int = 1):
    """A copy with every matrix jittered by ``scale`` × its own std: some, not all, top-1 tokens flip."""
    q = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in q.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return q


def make_examples(n: int = 10, seed: int = 2) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lp, la = 2 + i % 5, (i * 3) % 8  # prompt 2..6 tokens, answers 0..7 tokens (one empty)
        out.append((torch.randint(0, VOCAB, (lp,), generator=g).tolist(),
                    torch.randint(0, VOCAB, (la,), generator=g).tolist()))
    return out


FP = tiny()
Q = perturbed(FP)
EXAMPLES = make_examples()


def reference(fp, q, examples):
    """Per-position FP/q log-softmax from plain ``model(ids).logits``, one example at a time."""
    lf, lq, ys = [], [], []
    with torch.no_grad():
        for p, a in examples:
            if not a:
                continue
            ids = torch.tensor([p + a])
            s = slice(len(p) - 1, len(p) + len(a) - 1)  # positions predicting the answer tokens
            lf.append(torch.log_softmax(fp(ids).logits[0, s].float(), -1))
            lq.append(torch.log_softmax(q(ids).logits[0, s].float(), -1))
            ys.append(torch.tensor(a))
    return torch.cat(lf), torch.cat(lq), torch.cat(ys)


def close(a, b, rel=1e-5, abs_=1e-6):
    return a == pytest.approx(b, rel=rel, abs=abs_)


# ---------------------------------------------------------------------------- teacher forcing
def test_fp_against_itself_is_perfect():
    r = M.teacher_forced(FP, FP, EXAMPLES, disable=True)
    assert r["flip_rate"] == 0 and r["top1_agreement"] == 1
    assert abs(r["kl"]) < 1e-6 and r["delta_p_rms"] < 1e-6 and close(r["ppl_ratio"], 1.0)
    assert r["tokens"] == sum(len(a) for _, a in EXAMPLES)


def test_near_tie_logits_are_not_flips_of_the_fp_model_against_itself():
    # FP logits 0 everywhere but 1e-7 at token 5: its top-1 is 5, yet log-softmax rounds all of them to -log(96)
    fp = copy.deepcopy(FP)
    fp.lm_head = torch.nn.Linear(64, VOCAB, bias=True)
    with torch.no_grad():
        fp.lm_head.weight.zero_()
        fp.lm_head.bias.zero_()
        fp.lm_head.bias[5] = 1e-7
    ex = [([1, 2, 3], [4, 5, 6]), ([7, 8], [9])]
    t = M.fp_targets(fp, ex, disable=True)
    assert t.argmax.tolist() == [5, 5, 5, 5]  # plain argmax of the logits
    for q in (fp, copy.deepcopy(fp)):
        r = M.teacher_forced(fp, q, ex, disable=True)
        assert r["flip_rate"] == 0 and not r["flipped"].any()
        assert r["flip_rate"] == M.flip_rate(q, ex, t, disable=True)


def test_teacher_forced_matches_full_logits_reference():
    r = M.teacher_forced(FP, Q, EXAMPLES, disable=True)
    lf, lq, y = reference(FP, Q, EXAMPLES)
    flipped = lf.argmax(-1) != lq.argmax(-1)
    assert 0 < flipped.float().mean() < 1, "the test needs some flips and some agreements"
    assert torch.equal(r["flipped"], flipped)
    assert r["flip_rate"] == pytest.approx(flipped.float().mean().item())
    assert close(r["kl"], (lf.exp() * (lf - lq)).sum(-1).mean().item(), rel=1e-4)
    nll = -lq.gather(1, y[:, None]).mean().item()
    assert close(r["nll"], nll) and close(r["ppl"], math.exp(nll))
    dp = lq.gather(1, y[:, None]).exp() - lf.gather(1, y[:, None]).exp()
    assert close(r["delta_p_rms"], dp.pow(2).mean().sqrt().item(), rel=1e-4)
    top2 = (lf.topk(2, -1).values).T
    torch.testing.assert_close(r["margins"], top2[0] - top2[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["Cohere", "Gemma2"])
def test_teacher_forced_scores_the_models_scaled_or_capped_logits(arch):
    """KL, NLL, Δp and margins of the model's own logits (Cohere scales its output layer's values, Gemma 2
    soft-caps them), as decoding and transformers see them."""
    import transformers

    config, cls, kw = {"Cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
                       "Gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 0.5,
                                                                        "head_dim": 16})}[arch]
    torch.manual_seed(0)
    c = getattr(transformers, config)(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                      initializer_range=0.2, **kw)
    fp = getattr(transformers, cls)(c).eval()
    q = perturbed(fp, 0.3)
    r = M.teacher_forced(fp, q, EXAMPLES, disable=True)
    lf, lq, y = reference(fp, q, EXAMPLES)
    assert close(r["kl"], (lf.exp() * (lf - lq)).sum(-1).mean().item(), rel=1e-4)
    nll = -lq.gather(1, y[:, None]).mean().item()
    assert close(r["nll"], nll) and close(M.mean_nll(q, EXAMPLES, disable=True), nll)
    dp = lq.gather(1, y[:, None]).exp() - lf.gather(1, y[:, None]).exp()
    assert close(r["delta_p_rms"], dp.pow(2).mean().sqrt().item(), rel=1e-4)
    top2 = (lf.topk(2, -1).values).T
    torch.testing.assert_close(r["margins"], top2[0] - top2[1], atol=1e-4, rtol=1e-4)


def test_a_diverged_model_gets_infinite_perplexity_not_an_overflow_error():
    q = copy.deepcopy(Q)
    with torch.no_grad():
        q.lm_head.weight.mul_(300)  # logit gaps of thousands: NLLs past exp's range
    r = M.teacher_forced(FP, q, EXAMPLES, disable=True)
    lf, lq, y = reference(FP, q, EXAMPLES)
    nll = -lq.gather(1, y[:, None]).mean().item()
    assert nll > 710 and close(r["nll"], nll, rel=1e-4)
    assert r["ppl"] == math.inf and r["ppl_ratio"] == math.inf
    assert r["flip_rate"] == pytest.approx((lf.argmax(-1) != lq.argmax(-1)).float().mean().item())


def test_quantized_model_runs_on_frozen_weights_and_keeps_training_flag():
    q = copy.deepcopy(FP)
    qdpo.quantize_model(q, QuantSpec(4, 32))
    q.train()
    r = M.teacher_forced(FP, q, EXAMPLES, disable=True)
    assert q.training and all(m._w_hat is None for m in qdpo.quant.quantized_layers(q).values())
    lf, lq, _ = reference(FP, q.eval(), EXAMPLES)  # fake-quant forward: same ŵ, another matmul
    assert close(r["kl"], (lf.exp() * (lf - lq)).sum(-1).mean().item(), rel=1e-3)
    assert abs(r["flip_rate"] - (lf.argmax(-1) != lq.argmax(-1)).float().mean().item()) <= 2 / r["tokens"]


def test_chunk_size_does_not_change_results():
    a = M.teacher_forced(FP, Q, EXAMPLES, chunk=3, disable=True)
    b = M.teacher_forced(FP, Q, EXAMPLES, chunk=1024, disable=True)
    assert torch.equal(a["flipped"], b["flipped"])
    for k in ("kl", "ppl", "delta_p_rms"):
        assert close(a[k], b[k]), k
    t3, t = M.fp_targets(FP, EXAMPLES, chunk=3, disable=True), M.fp_targets(FP, EXAMPLES, disable=True)
    assert torch.equal(t3.argmax, t.argmax)


def test_padding_does_not_change_results():
    a = M.teacher_forced(FP, Q, EXAMPLES, batch_size=1, disable=True)
    b = M.teacher_forced(FP, Q, EXAMPLES, batch_size=4, disable=True, pad_id=7)
    assert torch.equal(a["flipped"], b["flipped"])
    torch.testing.assert_close(a["margins"], b["margins"], atol=1e-4, rtol=1e-4)
    for k in ("kl", "ppl", "delta_p_rms"):
        assert close(a[k], b[k], rel=1e-4), k


def test_bf16_models_take_fp32_fp_hidden_states_as_greedy_keeps_them():
    fp, q = copy.deepcopy(FP).to(torch.bfloat16), copy.deepcopy(Q).to(torch.bfloat16)
    ex = [e for e in EXAMPLES if e[1]]
    with torch.no_grad():  # the FP model's bf16 hidden states at the answer positions, stored as fp32
        hidden = [fp.model(torch.tensor([p + a])).last_hidden_state[0, len(p) - 1:-1].float() for p, a in ex]
    lf, lq, y = reference(fp, q, ex)  # bf16 logits, log-softmax in fp32
    r = M.teacher_forced(fp, q, ex, disable=True, fp_hidden=hidden)
    assert torch.equal(r["flipped"], lf.argmax(-1) != lq.argmax(-1))
    assert close(r["kl"], (lf.exp() * (lf - lq)).sum(-1).mean().item(), rel=1e-3)
    assert close(r["nll"], -lq.gather(1, y[:, None]).mean().item(), rel=1e-3)
    t = M.fp_targets(fp, ex, disable=True, fp_hidden=hidden)
    assert torch.equal(t.argmax, lf.argmax(-1))
    assert M.flip_rate(q, ex, t, disable=True) == pytest.approx(r["flip_rate"])


def test_flip_rate_with_cached_targets_equals_teacher_forced():
    t = M.fp_targets(FP, EXAMPLES, batch_size=3, disable=True)
    assert t.num_examples == len(EXAMPLES) and t.num_tokens == sum(len(a) for _, a in EXAMPLES)
    assert len(t.example(1)[0]) == len(EXAMPLES[1][1])
    assert t.argmax.dtype == torch.long and t.margin.dtype == torch.float32
    r = M.teacher_forced(FP, Q, EXAMPLES, disable=True)
    assert M.flip_rate(Q, EXAMPLES, t, disable=True) == pytest.approx(r["flip_rate"])
    assert M.flip_rate(FP, EXAMPLES, t, disable=True) == 0
    torch.testing.assert_close(t.margin, r["margins"])


def test_errors():
    t = M.fp_targets(FP, EXAMPLES, disable=True)
    with pytest.raises(ValueError, match="call fp_targets on the same examples"):
        M.flip_rate(Q, EXAMPLES[:-1], t, disable=True)
    with pytest.raises(ValueError, match=r"examples\[0\] has an empty prompt"):
        M.teacher_forced(FP, Q, [([], [1, 2])], disable=True)
    with pytest.raises(ValueError, match="every answer is empty"):
        M.fp_targets(FP, [([1], [])], disable=True)
    with pytest.raises(ValueError, match="2 quantized answers for 1 examples"):
        M.generation_metrics(FP, [([1], [2])], [[2], [3]], None, disable=True)


# ---------------------------------------------------------------------------- generation
def test_words_split_spaced_and_unspaced_scripts():
    assert M.words("The cat, the CAT!  sat_down 42") == ["the", "cat", "the", "cat", "sat_down", "42"]
    assert M.words("猫が座った。OK") == ["猫", "が", "座", "っ", "た", "ok"]  # CJK: one word per character
    assert M.words("中文abc中") == ["中", "文", "abc", "中"]
    assert M.words("Ça va? Привет мир") == ["ça", "va", "привет", "мир"]
    # two differing characters of six: ROUGE-L 4/6, not 0 as two six-character "words"
    assert M.rouge_l(M.words("我喜欢吃苹果"), M.words("我喜欢吃香蕉")) == pytest.approx(2 * 4 / 12)


@pytest.mark.parametrize("a,b,expect", [
    ("the cat sat on the mat", "the cat on the mat", 10 / 11),
    ("a b c d", "d c b a", 0.25),
    ("x y", "p q r", 0.0),
    ("", "", 1.0),
    ("", "a", 0.0),
    ("a b a b", "b a b a", 2 * 3 / 8),
])
def test_rouge_l_hand_computed(a, b, expect):
    assert M.rouge_l(a.split(), b.split()) == pytest.approx(expect)
    assert M.rouge_l(b.split(), a.split()) == pytest.approx(expect)


class WordTokenizer:
    """Token i decodes to WORDS[i % len(WORDS)], joined by spaces; id 0 is special (EOS)."""

    WORDS = ["<eos>", "Hello", ",", "world", "!", "The", "cat", "sat", "."]
    pad_token_id, eos_token_id = None, 0

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.WORDS[i % len(self.WORDS)] for i in ids if not (skip_special_tokens and i == 0))


def test_generation_metrics_hand_built_answers():
    tok = WordTokenizer()
    ex = [([5, 6], [1, 2, 3, 4, 0]), ([7, 8, 9], [5, 6, 7, 8, 0]), ([3], [6, 7, 0])]
    same = M.generation_metrics(FP, ex, [a for _, a in ex], tok, disable=True)
    assert same["exact_match"] == 1 and same["rouge_l"] == 1
    assert same["first_divergence"] == pytest.approx((5 + 5 + 3) / 3)
    # diverge at index 2 (a punctuation-only change: same words), index 0, and an empty answer
    q = [[1, 2, 4, 3, 0], [6, 6, 7, 8, 0], []]
    r = M.generation_metrics(FP, ex, q, tok, batch_size=2, disable=True)
    assert r["exact_match"] == 0 and r["first_divergence"] == pytest.approx((2 + 0 + 0) / 3)
    words = [["hello", "world"], ["the", "cat", "sat"]]  # fp answers 0, 1 as words; q: hello world | cat cat sat
    assert r["rouge_l"] == pytest.approx((1.0 + M.rouge_l(["cat", "cat", "sat"], words[1]) + 0.0) / 3)
    assert r["empty_answers"] == 1 and r["answer_tokens"] == pytest.approx(10 / 3)
    lf, _, y = reference(FP, FP, [(p, a) for (p, _), a in zip(ex, q)])
    assert close(r["fp_nll"], -lf.gather(1, y[:, None]).mean().item())


# ---------------------------------------------------------------------------- plots
def _is_png(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path, monkeypatch):
    r = M.teacher_forced(FP, Q, EXAMPLES, disable=True)
    g = torch.Generator().manual_seed(0)
    m = torch.rand(500, generator=g) * 10
    curves = {"initial": (r["margins"], r["flipped"]), "qdpo": (m, torch.rand(500, generator=g) < 1 / (1 + m))}
    p = plots.flip_vs_margin(curves, tmp_path / "plots" / "flip_vs_margin.png")
    assert _is_png(p)
    hist = {
        "qdpo": [{"step": s, "loss": 0.7 - 0.01 * s, "rewards/margins": 0.02 * s,
                  **({"val/flip_rate": 0.2 - 0.002 * s} if s % 5 == 0 else {})} for s in range(1, 31)],
        "sft": [{"step": s, "loss": 2.0 - 0.01 * s} for s in range(1, 31)],
    }
    figs = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or save(fig, path))
    assert _is_png(plots.training_curves(hist, tmp_path / "curves.png"))
    assert [line.get_label() for line in figs[0].axes[0].lines] == ["QDPO", "SFT"]  # the report's labels
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_file()) == ["curves.png", "flip_vs_margin.png"]
    plots.flip_vs_margin({"fp": (torch.rand(50), torch.zeros(50, dtype=torch.bool))}, tmp_path / "fp.png")
    assert figs[1].axes[0].lines[0].get_label() == "FP (0.00% overall)"
    with pytest.raises(ValueError, match="no curves"):
        plots.flip_vs_margin({}, tmp_path / "x.png")


def test_flip_vs_margin_puts_each_point_at_the_median_margin_of_the_positions_it_counts(tmp_path, monkeypatch):
    figs = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or save(fig, path))
    # bf16-like margins: many ties, one on a bin edge; the margin-0 positions all flip, the others never
    m = torch.tensor([0.0] * 30 + [0.125] * 40 + [0.25] * 30)
    f = m == 0
    assert _is_png(plots.flip_vs_margin({"q": (m, f)}, tmp_path / "p.png"))
    (line,) = figs[0].axes[0].lines
    assert line.get_label() == "q (30.00% overall)"
    assert line.get_xydata().tolist() == [[0.0, 1.0], [0.125, 0.0]]  # bins {0} and {0.125, 0.25}


# ---------------------------------------------------------------------------- metrics.json and report.md
def _eval(initial, qdpo_, kd):
    def row(flip, **kw):
        return {"flip_rate": flip, "top1_agreement": 1 - flip, "kl": flip / 2, "first_divergence": 10 * (1 - flip),
                "exact_match": 0.5 - flip, "rouge_l": 0.9 - flip, "fp_nll": 1 + flip, "ppl": 3 + flip,
                "delta_p_rms": flip / 3, "tokens": 400, **kw}
    return {"fp": row(0.0), "initial": row(initial), "qdpo": row(qdpo_, margins=torch.rand(400)),
            "kd": row(kd, flipped=torch.zeros(400, dtype=torch.bool))}


CONFIG = {"model": "default", "bits": 4, "group_size": 64, "symmetric": False, "init": "rtn", "method": "all",
          "loss": "sigmoid", "beta": 0.1, "lr": 1e-5, "steps": 30, "eval_every": 5, "patience": 3}


def test_metrics_json_round_trips_without_tensors(tmp_path):
    ev = _eval(0.2, 0.1, 0.15)
    ev["sft"] = {"flip_rate": torch.tensor(0.18), "fp_nll": float("nan"), "kl": torch.ones(3)}
    path = report.write_metrics_json(tmp_path / "metrics.json", config=CONFIG,
                                     pairs={"total": 100, "identical_dropped": 20, "kept": 80},
                                     eval=ev, timing={"train/qdpo": {"seconds": 12.5, "peak_memory_mb": 300.0}},
                                     training={"qdpo": {"steps": 30, "best_step": 25}})
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 1 and list(doc["eval"]) == ["fp", "initial", "qdpo", "kd", "sft"]
    assert doc["pairs"]["identical_dropped"] == 20 and doc["training"]["qdpo"]["best_step"] == 25
    assert "margins" not in doc["eval"]["qdpo"] and "flipped" not in doc["eval"]["kd"]
    assert doc["eval"]["sft"] == {"flip_rate": pytest.approx(0.18), "fp_nll": None}

    def walk(x):
        assert isinstance(x, (dict, list, str, int, float, bool, type(None))), type(x)
        for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()):
            walk(v)
    walk(doc)
    assert [f.name for f in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind
    with pytest.raises(ValueError, match="schema_version"):
        report.write_metrics_json(tmp_path / "m.json", config={}, pairs={}, eval={}, timing={}, schema_version=2)


@pytest.mark.parametrize("qdpo_flip,kd_flip,sentence", [
    (0.10, 0.15, "QDPO beats KD on flip rate (10.00 % vs 15.00 %)."),
    (0.15, 0.10, "QDPO does not beat KD: KD's flip rate 10.00 % is lower than QDPO's 15.00 %."),
])
def test_report_table_and_verdict_follow_the_numbers(tmp_path, qdpo_flip, kd_flip, sentence):
    metrics_path = report.write_metrics_json(
        tmp_path / "metrics.json", config=CONFIG, pairs={"total": 100, "identical_dropped": 20},
        eval=_eval(0.20, qdpo_flip, kd_flip), timing={"pairs": 3.0, "eval": {"seconds": 4.0}})
    png = plots.training_curves({"qdpo": [{"step": 1, "loss": 0.69}]}, tmp_path / "plots" / "curves.png")
    md = report.write_report_md(tmp_path / "report.md", json.loads(metrics_path.read_text()),
                                plots={"Training curves": png}, notes=["a tiny test run"]).read_text()
    for row in ("| FP |", "| initial |", "| QDPO |", "| KD |"):
        assert row in md
    assert "| SFT |" not in md
    assert "flip_rate ↓" in md and "top1_agreement ↑" in md and "delta_p_rms ↓" in md
    assert f"QDPO lowered the test flip rate from 20.00 % to {100 * qdpo_flip:.2f} % (RTN start" in md
    assert f"KD reached {100 * kd_flip:.2f} %" in md
    assert sentence in md
    assert "W4A16-g64-asym" in md and "patience 3" in md and "a tiny test run" in md
    assert "![Training curves](plots/curves.png)" in md
    assert "| pairs | 3 |" in md
    assert ("Units (kl: nats/token; first_divergence: tokens; rouge_l: F1 in [0, 1]; fp_nll: nats/token; "
            "delta_p_rms: probability).") in md  # only the columns shown (no judge_score here)


@pytest.mark.parametrize("experts, left, excluded", [(0, [], []), (4, [], []), (0, ["model.layers.0.mlp.bank"], []),
                                                     (4, ["model.layers.0.mlp.experts.down_proj"],
                                                      ["model.layers.0.mlp.experts.down_proj"])])
def test_report_says_how_much_of_the_model_is_quantized(tmp_path, experts, left, excluded):
    weights = {"quantized_layers": 14, "quantized_expert_tensors": experts, "quantized_weights": 1500,
               "embedding_weights": 400, "other_fp_weights": 100, "quantized_fraction": 0.75,
               "fp_fused_expert_tensors": left, "fp_excluded_expert_tensors": excluded}
    path = report.write_metrics_json(tmp_path / "metrics.json", config=CONFIG, pairs={}, eval=_eval(0.2, 0.1, 0.15),
                                     timing={}, init={"init": "rtn", "weights": weights})
    md = report.write_report_md(tmp_path / "report.md", json.loads(path.read_text())).read_text()
    fused = " and 4 fused expert tensors" if experts else ""
    assert (f"- **Quantized weights**: 75.00 % of the weight matrices (14 linear layers{fused}; full precision: "
            "embeddings 400, other 100 weights)") in md
    # expert tensors --exclude kept in full precision are named as such, not as experts qdpo does not know
    unknown = bool(left) and not excluded
    assert ("1 3-D weight tensors (experts of a module qdpo does not know) stay in full precision" in md) == unknown
    assert ("- **Expert tensors kept in full precision** (`--exclude`, or the `--init` checkpoint): 1, "
            "model.layers.0.mlp.experts.down_proj") in md if excluded else "kept in full precision" not in md
    assert "| init | rtn |" in md and "quantized_fraction" not in md  # the line above, not a JSON cell


def test_verdict_when_training_made_things_worse():
    ev = {"initial": {"flip_rate": 0.1}, "qdpo": {"flip_rate": 0.12}}
    lines = report.verdict({"config": {"init": "awq"}, "eval": ev})
    assert lines[0].startswith("QDPO raised the test flip rate from 10.00 % to 12.00 % (AWQ start, +20 % relative)")
    # --init PATH: the checkpoint's path as written, not upper-cased like a method name
    lines = report.verdict({"config": {"init": "/ckpts/Llama-gptq"}, "eval": ev})
    assert "(start: the --init checkpoint /ckpts/Llama-gptq, +20 % relative)" in lines[0]


def test_verdict_on_an_unchanged_or_missing_flip_rate_says_what_happened():
    ev = {"initial": {"flip_rate": 0.1}, "kd": {"flip_rate": 0.1}}
    lines = report.verdict({"config": {"init": "rtn"}, "eval": ev})
    assert lines[0] == "KD left the test flip rate at 10.00 % (RTN start)."
    ev = {"initial": {"flip_rate": 0.1}, "qdpo": {"flip_rate": None}, "kd": {"flip_rate": 0.08}}
    assert report.verdict({"eval": ev})[0] == "QDPO has no flip rate, so there is no before/after comparison."
    ev["initial"]["flip_rate"] = float("nan")
    assert report.verdict({"eval": ev})[0] == "The initial model has no flip rate, so there is no before/after " \
                                              "comparison."
    del ev["initial"]
    assert report.verdict({"eval": ev})[0].startswith("The initial quantized model was not evaluated, so there is no")


def test_verdict_says_when_kl_ranks_qdpo_and_kd_the_other_way_and_that_one_seed_is_one_seed():
    ev = {"initial": {"flip_rate": 0.25, "kl": 0.33}, "qdpo": {"flip_rate": 0.1986, "kl": 0.1895},
          "kd": {"flip_rate": 0.2006, "kl": 0.1809}}
    lines = report.verdict({"config": {"init": "rtn"}, "eval": ev})
    assert "QDPO beats KD on flip rate (19.86 % vs 20.06 %)." in lines
    assert "On KL the order differs: KD is lower (0.1809 vs 0.1895 nats/token)." in lines
    assert any(line.startswith("These come from one seed") for line in lines)
    ev["kd"]["kl"] = 0.2  # the same order on both: no extra line
    assert not any("order differs" in line for line in report.verdict({"eval": ev}))


def test_report_training_table_gives_each_export_in_words(tmp_path):
    # the whole export record was dumped as JSON into one cell of the Training table
    run = tmp_path / "run"
    exports = {"qdpo": {"path": str(run / "export_qdpo"), "reproduces_eval": True, "flip_rate": 0.1, "kl": 0.2,
                        "compressed_tensors": str(run / "export_qdpo_compressed_tensors"),
                        "compressed_tensors_max_abs_logit_diff": 1.5e-6},
               "kd": {"path": str(run / "export_kd"), "reproduces_eval": False, "flip_rate": 0.1, "kl": 0.2,
                      "compressed_tensors": None}}
    training = {m: {"steps_run": 4, "best_step": 2, "export": e} for m, e in exports.items()}
    path = report.write_metrics_json(run / "metrics.json", config=CONFIG, pairs={}, eval=_eval(0.2, 0.1, 0.15),
                                     timing={}, training=training)
    md = report.write_report_md(run / "report.md", json.loads(path.read_text())).read_text()
    assert ("| qdpo | 4 | 2 | export_qdpo/, reproduces the evaluation; compressed-tensors "
            "export_qdpo_compressed_tensors/ (max \\|Δlogit\\| 1.5e-06) |") in md
    assert "| kd | 4 | 2 | export_kd/, DOES NOT reproduce the evaluation; compressed-tensors: skipped |" in md
    assert '"reproduces_eval"' not in md


def test_report_names_the_methods_an_earlier_call_trained():
    # the configuration said "Method(s): kd" above a table that also holds QDPO's row from an earlier call
    training = {"qdpo": {"steps_run": 4, "best_step": 2, "earlier_call": True}, "kd": {"steps_run": 4, "best_step": 4}}
    md = "\n".join(report._config_lines({**CONFIG, "method": "kd"}, training))
    assert "- **Method(s)**: kd (this call; qdpo from an earlier call)" in md
    assert "- **Method(s)**: kd\n" in "\n".join(report._config_lines({**CONFIG, "method": "kd"}, {"kd": {}})) + "\n"
