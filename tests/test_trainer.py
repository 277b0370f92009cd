"""The training loop on a tiny model: loss falls, flips fall, resume is exact, only latent weights train."""

import copy
import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qdpo
from qdpo import QuantSpec
from qdpo.quant import quantized_layers
from qdpo.training import distributed as D
from qdpo.training.config import TrainConfig
from qdpo.training.generate import greedy
from qdpo.training.stages import reference_logps
from qdpo.training.trainer import Example, Trainer, batch_indices

VOCAB = 64


def tiny_fp(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      eos_token_id=1, pad_token_id=1, bos_token_id=None, initializer_range=0.15)
    return LlamaForCausalLM(cfg).eval()


class Tok:
    """The few tokenizer attributes generation needs."""
    pad_token_id = 1
    eos_token_id = 1


@pytest.fixture(scope="module")
def data():
    """``(fp, q, examples)`` made once; tests train deep copies of ``q``."""
    return make_data()


def fresh(data):
    fp, q, examples = data
    return fp, copy.deepcopy(q), examples


def make_data(n_prompts=12, new_tokens=8, seed=0, system=0, words=(3, 7)):
    """``(fp, q, examples)``: prompts of ``words`` (low, high + 1) random tokens; with ``system`` > 0, every
    other prompt starts with the same ``system`` tokens (as a chat template's system prompt would)."""
    fp = tiny_fp(seed)
    q = copy.deepcopy(fp)
    qdpo.quantize_model(q, QuantSpec(4, -1))
    g = torch.Generator().manual_seed(seed + 1)
    start = torch.randint(2, VOCAB, (system,), generator=g).tolist() if system else []
    prompts = [(start if i % 2 else []) + torch.randint(2, VOCAB, (int(torch.randint(*words, (1,), generator=g)),),
                                                       generator=g).tolist()
               for i in range(n_prompts)]
    fp_ans = greedy(fp, Tok, prompts, new_tokens, batch_size=4, disable=True)
    q_ans = greedy(q, Tok, prompts, new_tokens, batch_size=4, disable=True)
    pairs = [(p, c, r) for p, c, r in zip(prompts, fp_ans, q_ans) if c != r]
    ref = reference_logps(q, [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], 1, 8, 1024)
    examples = [Example(p, c, r, ref[i], ref[len(pairs) + i]) for i, (p, c, r) in enumerate(pairs)]
    return fp, q, examples


def cfg(**kw):
    base = dict(steps=12, batch_size=4, micro_batch_size=2, lr=1e-3, warmup_steps=1, eval_every=0,
                checkpoint_every=4, beta=0.5, seed=3, kd_weight=0.0)  # plain DPO unless a test asks
    base.update(kw)
    return TrainConfig(**base).validate()


def _flips(fp, q, examples):
    """Teacher-forced argmax disagreements on the chosen answers: an independent full-logits count."""
    n = tot = 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.prompt_ids + e.chosen_ids])
            a, b = fp(ids).logits[0].argmax(-1), q(ids).logits[0].argmax(-1)
            s = len(e.prompt_ids) - 1
            n += int((a[s:-1] != b[s:-1]).sum())
            tot += len(e.chosen_ids)
    return n / tot


def test_qdpo_loss_and_flip_rate_fall(data, tmp_path):
    fp, q, examples = fresh(data)
    assert len(examples) >= 6
    before = _flips(fp, q, examples)
    t = Trainer(q, cfg(steps=20), "qdpo", examples, tmp_path, fp_model=fp, pad_id=1, disable_progress=True)
    t.run()
    losses = [h["loss"] for h in t.history if "loss" in h]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert _flips(fp, q, examples) < before


@pytest.mark.parametrize("method", ["kd", "sft"])
def test_baselines_reduce_their_loss(data, tmp_path, method):
    fp, q, examples = fresh(data)
    t = Trainer(q, cfg(steps=10), method, examples, tmp_path, fp_model=fp, pad_id=1, disable_progress=True)
    t.run()
    losses = [h["loss"] for h in t.history if "loss" in h]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["kd", "qdpo"])
def test_teacher_cache_gives_the_recomputed_kd_loss_and_runs_the_fp_model_once_per_example(data, method):
    from qdpo.training.trainer import TeacherCache, micro_loss

    fp, q, examples = fresh(data)
    c = cfg(kd_weight=2.0)
    calls = []
    hook = fp.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        teacher = TeacherCache()
        for batch in (examples[:3], examples[1:5], examples[:5]):  # overlapping, in other batch layouts
            want, _ = micro_loss(q, fp, batch, c, method, 1, torch.device("cpu"))  # no cache: FP runs
            got, _ = micro_loss(q, fp, batch, c, method, 1, torch.device("cpu"), teacher)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert len(teacher.rows) == 5
        n = len(calls)
        micro_loss(q, fp, examples[:5], c, method, 1, torch.device("cpu"), teacher)
        assert len(calls) == n, "every example cached: the FP decoder does not run"
        full = TeacherCache(max_bytes=0)  # no room: recomputed every time, same loss
        torch.testing.assert_close(micro_loss(q, fp, examples[:3], c, method, 1, torch.device("cpu"), full)[0],
                                   micro_loss(q, fp, examples[:3], c, method, 1, torch.device("cpu"))[0])
        assert not full.rows
    finally:
        hook.remove()


@pytest.mark.parametrize("method,kw", [("kd", {}), ("sft", {}), ("qdpo", dict(kd_weight=4.0, nll_weight=1.0))])
def test_micro_batches_give_the_whole_batch_loss_and_gradient(data, tmp_path, method, kw):
    """Gradient accumulation: a step in micro-batches of 1 or 2 is the step of one forward over the batch. The
    per-token terms (KD, SFT) are means over the batch's tokens, not means of each micro-batch's token means."""
    fp, q, examples = fresh(data)
    # answers of different lengths: a micro-batch's token mean is not the batch's
    examples = [Example(e.prompt_ids, e.chosen_ids[:2 + (i * 5) % 7], e.rejected_ids, e.ref_chosen, e.ref_rejected)
                for i, e in enumerate(examples)]
    recs = []
    for micro in (4, 2, 1):
        c = cfg(steps=1, batch_size=4, micro_batch_size=micro, max_grad_norm=0.0, **kw)
        t = Trainer(copy.deepcopy(q), c, method, examples, tmp_path / str(micro), fp_model=fp, pad_id=1,
                    disable_progress=True)
        assert len({len(examples[i].chosen_ids) for i in batch_indices(len(examples), 0, 4, c.seed)}) > 1
        recs.append(t.train_step())
    for rec in recs[1:]:
        for k in ("loss", "grad_norm", "kd", "nll", "rewards/margins", "num_tokens"):
            if k in recs[0]:
                assert rec[k] == pytest.approx(recs[0][k], rel=1e-5, abs=1e-7), (k, rec, recs[0])


def test_only_latent_weights_train(data, tmp_path):
    fp, q, examples = fresh(data)
    frozen = {n: p.detach().clone() for n, p in q.named_parameters() if not n.endswith("weight")
              or "embed" in n or "norm" in n}
    grids = {n: (m.scales.clone(), m.zeros.clone()) for n, m in quantized_layers(q).items()}
    Trainer(q, cfg(steps=3), "qdpo", examples, tmp_path, pad_id=1, disable_progress=True).run()
    for n, p in q.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    for n, m in quantized_layers(q).items():
        assert torch.equal(m.scales, grids[n][0]) and torch.equal(m.zeros, grids[n][1])


def test_learned_scales_move(data, tmp_path):
    fp, q, examples = fresh(data)
    before = {n: m.scales.clone() for n, m in quantized_layers(q).items()}
    Trainer(q, cfg(steps=3, learn_scales=True, scale_lr=1e-3), "qdpo", examples, tmp_path, pad_id=1,
            disable_progress=True).run()
    assert any(not torch.equal(m.scales.detach(), before[n]) for n, m in quantized_layers(q).items())


class _Interrupt(Exception):
    pass


def _killed_after(t: Trainer, step: int) -> None:
    """Run ``t`` and stop it as a kill would, right after its step ``step`` (no checkpoint of that step)."""
    orig = t.train_step

    def step_then_die():
        rec = orig()
        if t.step == step:
            raise _Interrupt
        return rec

    t.train_step = step_then_die
    with pytest.raises(_Interrupt):
        t.run()


def test_resume_gives_the_same_final_weights(data, tmp_path):
    fp, q, examples = fresh(data)
    c = cfg(steps=10, checkpoint_every=3)
    q_full = copy.deepcopy(q)
    Trainer(q_full, c, "qdpo", examples, tmp_path / "full", pad_id=1, disable_progress=True).run()

    q_a = copy.deepcopy(q)
    t = Trainer(q_a, c, "qdpo", examples, tmp_path / "cut", pad_id=1, disable_progress=True)
    _killed_after(t, 7)  # between checkpoints (the last one at step 6)
    q_b = copy.deepcopy(q)
    t2 = Trainer(q_b, c, "qdpo", examples, tmp_path / "cut", pad_id=1, disable_progress=True)
    t2.run(resume=True)
    assert t2.history[-1]["step"] == 10 and [h["step"] for h in t2.history] == list(range(11))
    for (n, a), (_, b) in zip(q_full.named_parameters(), q_b.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("method,kw", [("kd", {}), ("qdpo", dict(kd_weight=2.0))])
def test_kd_resume_gives_the_same_final_weights(data, tmp_path, method, kw):
    """The KD teacher's cache starts empty on resume: its hidden states must not depend on the micro-batch
    that first asked for them (the straight run filled it in other batches), or the weights drift by
    float rounding."""
    fp, q, examples = fresh(data)
    c = cfg(steps=8, checkpoint_every=3, **kw)
    q_full = copy.deepcopy(q)
    Trainer(q_full, c, method, examples, tmp_path / "full", fp_model=fp, pad_id=1, disable_progress=True).run()
    t = Trainer(copy.deepcopy(q), c, method, examples, tmp_path / "cut", fp_model=fp, pad_id=1,
                disable_progress=True)
    _killed_after(t, 4)  # after the checkpoint of step 3
    q_b = copy.deepcopy(q)
    Trainer(q_b, c, method, examples, tmp_path / "cut", fp_model=fp, pad_id=1, disable_progress=True).run(resume=True)
    for (n, a), (_, b) in zip(q_full.named_parameters(), q_b.named_parameters()):
        assert torch.equal(a, b), n


def test_a_failed_load_is_named_by_its_error_type():
    assert D.failure_reason(KeyError("scheduler")) == "KeyError: 'scheduler'"  # not a bare 'scheduler'
    assert D.failure_reason(ValueError("bad\nmore")) == "ValueError: bad"
    assert D.failure_reason(OSError()) == "OSError"


def test_checkpoints_that_fail_part_way_through_loading_leave_a_fresh_start(data, tmp_path, caplog):
    fp, q, examples = fresh(data)
    c = cfg(steps=6, checkpoint_every=3)
    q_full = copy.deepcopy(q)
    Trainer(q_full, c, "qdpo", examples, tmp_path / "run", pad_id=1, disable_progress=True).run()
    ckpts = D.complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000003", "step-000006"]
    for folder in ckpts:  # damaged data files (their .metadata intact): every load fails part-way
        shard = folder / "__0_0.distcp"
        os.truncate(shard, shard.stat().st_size * 6 // 10)
    q_b = copy.deepcopy(q)
    t = Trainer(q_b, c, "qdpo", examples, tmp_path / "run", pad_id=1, disable_progress=True)
    t.run(resume=True)  # nothing loads: trains from step 0, as the first run did
    why = [r.getMessage() for r in caplog.records if r.name == "qdpo.train" and "does not load" in r.getMessage()]
    assert len(why) == 2, why
    for w in why:  # the reading error, not the first line of DCP's exception (the list of ranks that failed)
        assert "(RuntimeError: PytorchStreamReader failed reading zip archive" in w and "ranks:" not in w, w
    assert [h["step"] for h in t.history] == list(range(7))
    for (n, a), (_, b) in zip(q_full.named_parameters(), q_b.named_parameters()):
        assert torch.equal(a, b), n


def _save_step(ckpt_dir, step, keep=2, **meta):
    """A checkpoint of a tiny linear layer, as the trainer writes them (``step`` and ``meta`` in its meta)."""
    lin = torch.nn.Linear(3, 2)
    D.save_checkpoint(ckpt_dir / f"step-{step:06d}", lin, torch.optim.AdamW(lin.parameters()), {},
                      {"step": step, **meta}, keep=keep)


def test_checkpoints_past_a_million_steps_are_ordered_by_step(tmp_path):
    for step in (999_998, 999_999, 1_000_000):
        _save_step(tmp_path, step)
    # by name, step-1000000 sorts first: it was the oldest, and pruning dropped it
    assert [D.read_meta(p)["step"] for p in D.complete_checkpoints(tmp_path)] == [999_999, 1_000_000]


def test_a_save_killed_while_replacing_a_checkpoint_of_its_step_keeps_that_step(tmp_path, monkeypatch):
    _save_step(tmp_path, 1)
    _save_step(tmp_path, 2)
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp"):  # killed after the old step-2 moved aside, before the new one is in place
            raise _Interrupt
        real(src, dst)

    monkeypatch.setattr(D.os, "replace", replace)
    with pytest.raises(_Interrupt):
        _save_step(tmp_path, 2)  # the same step again (a run that restarted from scratch)
    monkeypatch.setattr(D.os, "replace", real)
    (tmp_path / "step-000002.tmp" / ".metadata").unlink()  # without the new one, the old one counts
    assert [p.name for p in D.complete_checkpoints(tmp_path)] == ["step-000001", "step-000002.old"]
    _save_step(tmp_path, 3)  # the next start: its first save prunes the leftovers, but not step 2's only copy
    assert [D.read_meta(p)["step"] for p in D.complete_checkpoints(tmp_path)] == [2, 3]
    _save_step(tmp_path, 2)  # replaced again, with the leftover of an earlier replacement still there
    assert [p.name for p in D.complete_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003"]


def test_checkpoints_that_do_not_load_never_prune_the_restarted_runs_own(data, tmp_path):
    fp, q, examples = fresh(data)
    q_full = copy.deepcopy(q)
    Trainer(q_full, cfg(steps=6, checkpoint_every=3), "qdpo", examples, tmp_path, pad_id=1,
            disable_progress=True).run()
    for folder in D.complete_checkpoints(tmp_path / "checkpoints"):  # steps 3 and 6, both damaged
        shard = folder / "__0_0.distcp"
        os.truncate(shard, shard.stat().st_size // 2)
    c = cfg(steps=6, checkpoint_every=2)  # restarted from scratch, checkpointing more often
    t = Trainer(copy.deepcopy(q), c, "qdpo", examples, tmp_path, pad_id=1, disable_progress=True)
    orig = t.train_step

    def step_then_die():
        rec = orig()
        if t.step == 3:  # killed after the checkpoint of step 2
            raise _Interrupt
        return rec

    t.train_step = step_then_die
    with pytest.raises(_Interrupt):
        t.run(resume=True)
    names = [p.name for p in D.complete_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-000002", "step-000003", "step-000006"]  # the damaged ones are still there
    q_b = copy.deepcopy(q)
    t = Trainer(q_b, c, "qdpo", examples, tmp_path, pad_id=1, disable_progress=True)
    steps, orig = [], t.train_step
    t.train_step = lambda: steps.append(t.step) or orig()
    t.run(resume=True)
    assert steps == [2, 3, 4, 5]  # from the restarted run's checkpoint, not from scratch again
    assert [p.name for p in D.complete_checkpoints(tmp_path / "checkpoints")] == ["step-000004", "step-000006"]
    for (n, a), (_, b) in zip(q_full.named_parameters(), q_b.named_parameters()):
        assert torch.equal(a, b), n


def test_a_checkpoint_whose_meta_fails_after_the_optimizer_loaded_leaves_a_fresh_start(data, tmp_path):
    """A trainer.json without its schedule fails after DCP set the optimizer's state, learning rates included."""
    fp, q, examples = fresh(data)
    c = cfg(steps=6, checkpoint_every=3)
    q_full = copy.deepcopy(q)
    Trainer(q_full, c, "qdpo", examples, tmp_path, pad_id=1, disable_progress=True).run()
    for folder in D.complete_checkpoints(tmp_path / "checkpoints"):
        meta = D.read_meta(folder)
        del meta["scheduler"]
        (folder / D.META).write_text(json.dumps(meta))
    q_b = copy.deepcopy(q)
    t = Trainer(q_b, c, "qdpo", examples, tmp_path, pad_id=1, disable_progress=True)
    t.run(resume=True)  # nothing loads: trains from step 0, as the first run did
    assert [h["step"] for h in t.history] == list(range(7))
    for (n, a), (_, b) in zip(q_full.named_parameters(), q_b.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("replacing", [False, True])
def test_a_save_killed_after_writing_counts_before_its_rename(tmp_path, monkeypatch, replacing):
    _save_step(tmp_path, 1)
    if replacing:
        _save_step(tmp_path, 2, new=False)
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp"):  # DCP wrote the whole checkpoint; killed before it is in place
            raise _Interrupt
        real(src, dst)

    monkeypatch.setattr(D.os, "replace", replace)
    with pytest.raises(_Interrupt):
        _save_step(tmp_path, 2, new=True)
    monkeypatch.setattr(D.os, "replace", real)
    got = D.complete_checkpoints(tmp_path)
    assert [D.read_meta(p) for p in got] == [{"step": 1}, {"step": 2, "new": True}]  # the newer save of step 2
    _save_step(tmp_path, 3)  # the next start's first save keeps it
    assert [D.read_meta(p) for p in D.complete_checkpoints(tmp_path)] == [{"step": 2, "new": True}, {"step": 3}]


def test_the_logged_learning_rate_is_the_one_each_step_used(data, tmp_path):
    """metrics.jsonl's lr of step k is the rate AdamW applied in step k: warm-up, then cosine decay towards 10 %."""
    import math

    _, q, examples = fresh(data)
    t = Trainer(q, cfg(steps=5, warmup_steps=2, lr=1e-3, max_grad_norm=0.0), "qdpo", examples, tmp_path, pad_id=1,
                disable_progress=True)
    before = {n: p.detach().clone() for n, p in q.named_parameters() if p.requires_grad}
    recs = [t.train_step()]
    # AdamW's first step moves each weight by lr · g / (|g| + eps): by the rate itself wherever |g| >> eps
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in q.named_parameters() if p.requires_grad)
    assert recs[0]["lr"] == pytest.approx(moved, rel=1e-3)
    recs += [t.train_step() for _ in range(4)]
    cosine = [0.1 + 0.45 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]  # from step 2 of 5, to 0.1 at 5
    assert [r["lr"] for r in recs] == pytest.approx([1e-3 * f for f in [1 / 3, 2 / 3, *cosine]], rel=1e-6)


def test_batch_order_is_a_function_of_step():
    a = [batch_indices(10, s, 4, seed=1) for s in range(6)]
    assert a == [batch_indices(10, s, 4, seed=1) for s in range(6)]
    flat = sum(a[:5], [])[:20]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_refuses_packed_or_unquantized_model(data, tmp_path):
    fp, q, examples = fresh(data)
    with pytest.raises(ValueError, match="no QuantLinear layers"):
        Trainer(fp, cfg(), "qdpo", examples, tmp_path, pad_id=1)
    qdpo.quant.to_packed(q)
    with pytest.raises(ValueError, match="packed"):
        Trainer(q, cfg(), "qdpo", examples, tmp_path, pad_id=1)


def test_decoding_logps_equal_teacher_forced_reference(data):
    """The rejected answers' reference log-probs may come from decoding: same values as a forward pass."""
    fp, q, examples = fresh(data)
    prompts = [e.prompt_ids for e in examples[:6]]
    answers, logps = greedy(q, Tok, prompts, 8, batch_size=3, disable=True, with_logps=True)
    ref = reference_logps(q, list(zip(prompts, answers)), 1, 4, 1024)
    torch.testing.assert_close(torch.tensor(logps), torch.tensor(ref), rtol=1e-4, atol=1e-4)


def test_a_kd_term_without_the_fp_model_is_refused_up_front(data, tmp_path):
    _, q, examples = fresh(data)
    for method, c in (("qdpo", cfg(kd_weight=1.0)), ("kd", cfg())):
        with pytest.raises(ValueError, match=f"{method} with kd_weight .* needs fp_model"):
            Trainer(q, c, method, examples, tmp_path, pad_id=1)
    Trainer(q, cfg(), "qdpo", examples, tmp_path, pad_id=1, disable_progress=True)  # plain DPO needs none


def test_decoding_hidden_states_equal_teacher_forced(data):
    """greedy(hidden=...) keeps the output layer's input of every decoding step: what a forward gives."""
    from qdpo.training.data import collate
    from qdpo.training.logps import completion_hidden

    fp, _, _ = fresh(data)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (3, 6, 4, 5, 7)]
    hidden = []
    answers = greedy(fp, Tok, prompts, 8, batch_size=3, disable=True, hidden=hidden)
    assert [h.shape for h in hidden] == [(len(a), 64) for a in answers]
    with torch.no_grad():
        for p, a, h in zip(prompts, answers, hidden):
            want, _, _ = completion_hidden(fp, collate([(p, a)], 1))
            torch.testing.assert_close(h, want, rtol=1e-4, atol=1e-4)
    # the hook is gone afterwards: a plain forward adds nothing
    fp(torch.tensor([prompts[0]]))
    assert len(hidden) == len(prompts)
    assert not fp.model._forward_hooks and not fp.get_output_embeddings()._forward_pre_hooks


@pytest.mark.parametrize("arch", ["MiniCPM3", "OPT"])
def test_decoding_hidden_states_of_a_model_that_scales_them_before_its_head(arch):
    """MiniCPM3 divides the decoder's output by logits_scaling before its head: greedy(hidden=...) kept the
    head's input, so the FP targets taken from decoding were that much off the teacher-forced ones (8x here)
    and the KD and evaluation targets had the scale twice. They are the decoder's output, as a forward's;
    OPT's causal LM calls its decoder's inner part, whose output is its head's input."""
    import transformers

    from qdpo.training.data import collate
    from qdpo.training.logps import completion_hidden

    torch.manual_seed(0)
    if arch == "OPT":
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
            word_embed_proj_dim=16)).eval()
    else:
        model = transformers.MiniCPM3ForCausalLM(transformers.MiniCPM3Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8)).eval()
    prompts = [[2, 3, 4], [5, 6, 7, 8]]
    hidden = []
    answers = greedy(model, Tok, prompts, 4, batch_size=2, disable=True, hidden=hidden)
    with torch.no_grad():
        for p, a, h in zip(prompts, answers, hidden):
            want, _, _ = completion_hidden(model, collate([(p, a)], 1))
            torch.testing.assert_close(h, want, rtol=1e-4, atol=1e-4)


def test_fp_hidden_from_decoding_gives_the_same_eval_and_kd(data, tmp_path):
    """fp_targets / teacher_forced / the KD teacher fed with decoding hidden states match the forward path."""
    from qdpo.eval import metrics as M
    from qdpo.training.trainer import TeacherCache

    fp, q, _ = fresh(data)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (4, 6, 3, 5, 7, 4)]
    hidden = []
    answers = greedy(fp, Tok, prompts, 8, batch_size=4, disable=True, hidden=hidden)
    ex = list(zip(prompts, answers))
    t0, t1 = M.fp_targets(fp, ex, 4, disable=True), M.fp_targets(fp, ex, 4, disable=True, fp_hidden=hidden)
    assert torch.equal(t0.argmax, t1.argmax)
    torch.testing.assert_close(t0.margin, t1.margin, rtol=1e-4, atol=1e-4)
    a = M.teacher_forced(fp, q, ex, 4, disable=True)
    b = M.teacher_forced(fp, q, ex, 4, disable=True, fp_hidden=hidden)
    for k in ("flip_rate", "kl", "nll", "fp_ppl", "delta_p_rms"):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    with pytest.raises(ValueError, match="fp_hidden holds"):
        M.teacher_forced(fp, q, ex, 4, disable=True, fp_hidden=[h[:-1] for h in hidden])
    # KD loss of one step: the teacher cache seeded with decoding hidden states vs computed by the FP model
    examples = [Example(p, a) for p, a in ex]
    seeded = TeacherCache()
    for e, h in zip(examples, hidden):
        assert seeded.add(e.prompt_ids, e.chosen_ids, h)
    losses = []
    for teacher in (None, seeded):
        tr = Trainer(copy.deepcopy(q), cfg(), "kd", examples, tmp_path / str(len(losses)), fp_model=fp, pad_id=1,
                     disable_progress=True, teacher=teacher)
        losses.append(tr.train_step()["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    with pytest.raises(ValueError, match="hidden states for"):
        seeded.add(prompts[0], answers[0] + [2], hidden[0])
    assert not TeacherCache(max_bytes=0).add(prompts[0], answers[0], hidden[0])  # over budget: not kept


@pytest.mark.parametrize("kw", [dict(steps=8, checkpoint_every=4),  # the last step is a checkpoint step
                                dict(steps=12, eval_every=2, patience=1, lr=3e-2)])  # stops early
def test_resuming_a_finished_run_trains_no_more(data, tmp_path, kw):
    """--resume on a completed run (last step checkpointed, or stopped early) keeps its final weights and does not
    write its last checkpoint again."""
    fp, q, examples = fresh(data)
    targets_ex = [(e.prompt_ids, e.chosen_ids) for e in examples]
    from qdpo.eval.metrics import fp_targets

    val = (targets_ex, fp_targets(fp, targets_ex, 4, disable=True))
    c = cfg(**kw)
    q_a = copy.deepcopy(q)
    summary = Trainer(q_a, c, "qdpo", examples, tmp_path, val=val, pad_id=1, disable_progress=True).run()
    if "patience" in kw:
        assert summary["early_stopped"] and summary["steps_run"] < c.steps
    q_b = copy.deepcopy(q)
    t = Trainer(q_b, c, "qdpo", examples, tmp_path, val=val, pad_id=1, disable_progress=True)
    t.train_step = lambda: pytest.fail("a finished run trained again on --resume")
    t.save_checkpoint = lambda: pytest.fail("a finished run wrote its last checkpoint again on --resume")
    again = t.run(resume=True)
    assert again["steps_run"] == summary["steps_run"] and again["best_step"] == summary["best_step"]
    for (n, a), (_, b) in zip(q_a.named_parameters(), q_b.named_parameters()):
        assert torch.equal(a, b), n


def test_greedy_with_a_shared_prompt_prefix_matches_plain_left_padding(data):
    """Prompts sharing a system prefix decode from one cached prefix: same answers, log-probs, hidden states."""
    fp, q, _ = fresh(data)
    g = torch.Generator().manual_seed(11)
    system = torch.randint(2, VOCAB, (12,), generator=g).tolist()
    prompts = [system + torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 3, 8, 2, 6, 4)]
    prompts.append(torch.randint(2, VOCAB, (9,), generator=g).tolist())  # one without it: its batch runs plain
    for model in (fp, q):
        got = []
        for share in (True, False):
            model.qdpo_no_prefix_sharing = not share
            hidden = []
            answers, logps = greedy(model, Tok, prompts, 8, batch_size=4, disable=True, with_logps=True,
                                    hidden=hidden)
            got.append((answers, logps, hidden))
        model.qdpo_no_prefix_sharing = False
        (a1, l1, h1), (a0, l0, h0) = got
        assert a1 == a0
        torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-4, atol=1e-4)
        for x, y in zip(h1, h0):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_greedy_shares_a_prefix_on_sliding_window_models_only_within_the_window(monkeypatch):
    """Gemma 2 (sliding-window layers between full ones): prompts with their answers inside the window
    decode from one cached prefix, as plain left padding does; wider ones run plain (forced to share,
    their hidden states differ: the window matters)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from qdpo.training import logps

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(12)
    system = torch.randint(2, VOCAB, (12,), generator=g).tolist()
    prompts = [system + torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 3, 8)]
    calls = []
    real = logps.prefix_cache
    monkeypatch.setattr(logps, "prefix_cache", lambda *a: calls.append(1) or real(*a))

    def decode(model, share):
        model.qdpo_no_prefix_sharing = not share
        hidden = []
        answers = greedy(model, Tok, prompts, 8, batch_size=4, disable=True, hidden=hidden)
        return answers, torch.cat(hidden)

    for window, shared in ((64, True), (12, False)):  # widest prompt + answer: 28 tokens
        cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=window,
                           eos_token_id=1, pad_token_id=1, bos_token_id=None, initializer_range=0.3)
        model = Gemma2ForCausalLM(cfg).eval()
        calls.clear()
        (a1, h1), (a0, h0) = decode(model, True), decode(model, False)
        assert len(calls) == shared and a1 == a0
        torch.testing.assert_close(h1, h0, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(logps, "fits_window", lambda m, width: True)
    a1, h1 = decode(model, True)
    assert len(calls) == 1 and (a1 != a0 or not torch.allclose(h1, h0, rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("arch", ["gpt2", "llama-attention-dropout", "opt", "starcoder2"])
def test_training_runs_without_dropout(data, tmp_path, arch):
    """The targets (FP answers, reference log-probs, the teacher's distributions) come from eval-mode
    forwards; the trained model's train-mode forward must compute the same function, so dropout is off
    for training: GPT-2's dropout modules (p = 0.1), an attention's float ``attention_dropout``, and the
    float probabilities other layers hand to ``F.dropout`` (OPT's ``dropout`` and ``layerdrop``,
    Starcoder2's ``residual_dropout`` and ``embedding_dropout``; before, they stayed on)."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, Starcoder2Config, \
        Starcoder2ForCausalLM

    _, _, examples = data
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    elif arch == "opt":  # OPT checkpoints ship dropout 0.1
        model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=4, dropout=0.1, attention_dropout=0.1, layerdrop=0.5))
    elif arch == "starcoder2":  # so do Starcoder2's (residual, embedding and attention dropout)
        model = Starcoder2ForCausalLM(Starcoder2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, residual_dropout=0.1,
                                                       embedding_dropout=0.1))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, attention_dropout=0.5))
    qdpo.quantize_model(model, QuantSpec(4, -1))
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))

    def logits(train: bool):
        with torch.no_grad():
            return model.train(train)(ids).logits

    assert not torch.equal(logits(True), logits(False))  # dropout on, as transformers built it
    Trainer(model, cfg(steps=1), "qdpo", examples, tmp_path, pad_id=1, disable_progress=True)
    assert torch.equal(logits(True), logits(False))


def test_greedy_decodes_with_a_kv_cache_when_the_checkpoint_says_use_cache_false(data):
    """A checkpoint saved after training with gradient checkpointing carries use_cache=False: greedy still feeds
    the decoder one new token per step (on one cached prefill), with the answers of a model that caches."""
    fp, _, _ = fresh(data)
    g = torch.Generator().manual_seed(13)
    system = torch.randint(2, VOCAB, (12,), generator=g).tolist()
    prompts = [system + torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 3, 8)]
    want = greedy(fp, Tok, prompts, 6, batch_size=4, disable=True)
    model = copy.deepcopy(fp)
    model.config.use_cache = model.generation_config.use_cache = False
    widths = []
    hook = model.model.register_forward_pre_hook(lambda _m, args, kw: widths.append(kw["input_ids"].shape[1]),
                                                 with_kwargs=True)
    got = greedy(model, Tok, prompts, 6, batch_size=4, disable=True)
    hook.remove()
    assert got == want
    assert sorted(widths)[:-2] == [1] * (len(widths) - 2), widths  # prefill: the shared prefix, then the rests


def test_pairs_identical_once_cut_by_max_length_are_dropped(data, tmp_path):
    """Answers that differ only past --max-length's cut train as no preference (the DPO terms of two equal
    answers cancel): dropped and counted like identical answers, never trained or counted as pairs."""
    from qdpo.training.prompts import Prompt
    from qdpo.training.stages import build_pairs

    _, q, _ = fresh(data)
    prompt = [5, 6, 7, 8, 5, 6, 7, 8]
    fp = {"same": [9, 10, 11, 1], "late": [9, 10, 11, 12, 1], "early": [9, 13, 1]}
    qa = {"same": [9, 10, 11, 1], "late": [9, 10, 11, 14, 1], "early": [9, 10, 11, 1]}
    prompts = [Prompt(k, [{"role": "user", "content": k}], "train") for k in fp]

    class Text(Tok):
        @staticmethod
        def decode(ids, skip_special_tokens=False):
            return " ".join(map(str, ids))

    rows, stats = build_pairs(tmp_path / "pairs.jsonl", prompts, {k: prompt for k in fp}, fp, qa, q, Text,
                              cfg(max_length=len(prompt) + 3), 1)
    assert [r["id"] for r in rows] == ["early"]  # "late" differs at its 4th answer token: cut to 3, no preference
    assert (stats["total"], stats["identical_dropped"], stats["pairs"]) == (3, 2, 1)
    assert [json.loads(x)["id"] for x in (tmp_path / "pairs.jsonl").read_text().splitlines()] == ["early"]


@pytest.mark.parametrize("impl", ["dynamic", "static"])
def test_greedy_shares_a_prefix_when_the_generation_config_names_a_cache_implementation(data, impl):
    """A checkpoint whose generation_config.json names a cache_implementation: prompts sharing a system prefix
    decode from its cache (generate refused the two together) with the answers of plain left padding."""
    fp, _, _ = fresh(data)
    g = torch.Generator().manual_seed(14)
    system = torch.randint(2, VOCAB, (12,), generator=g).tolist()
    prompts = [system + torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 3, 8)]
    model = copy.deepcopy(fp)
    model.qdpo_no_prefix_sharing = True
    want = greedy(model, Tok, prompts, 6, batch_size=4, disable=True)
    model.qdpo_no_prefix_sharing = False
    model.generation_config.cache_implementation = impl
    assert greedy(model, Tok, prompts, 6, batch_size=4, disable=True) == want


def test_greedy_takes_the_argmax_whatever_the_generation_config_adds(data):
    """A checkpoint's generation_config may name logit processors (Qwen2-Instruct ships a repetition penalty):
    greedy answers were then no argmax of the logits, unlike the token flips and targets qdpo measures. Every
    step must take the argmax; reference: one full forward per step, no cache."""
    fp, _, _ = fresh(data)
    model = copy.deepcopy(fp)
    gc = model.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.min_new_tokens, gc.suppress_tokens = 50.0, 1, 6, [3, 4]
    gc.bad_words_ids, gc.forced_eos_token_id = [[5]], 1
    g = torch.Generator().manual_seed(15)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (3, 6, 4)]

    def argmax_answer(prompt):
        ids = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(t)
            if t == 1:  # EOS
                break
        return ids[len(prompt):]

    want = [argmax_answer(p) for p in prompts]
    assert any(len(set(a)) < len(a) for a in want)  # a repeated token: what the penalties would have changed
    model.train()
    assert greedy(model, Tok, prompts, 6, batch_size=2, disable=True) == want
    assert model.training  # back in the mode it came in
