"""Chunked completion log-probs and KL vs full-logit computations; masking of prompt and padding."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qdpo.training.data import collate, common_prefix, fit
from qdpo.training.logps import (base_model, completion_hidden, label_logps, logit_transform, output_layer,
                                 sequence_logps, token_kl)


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


EXAMPLES = [([1, 2, 3], [4, 5, 6, 7]), ([8, 9], [10]), ([11, 12, 13, 14, 15], [16, 17])]


def _direct_logps(model, prompt, completion):
    """Unbatched, unpadded, full logits: the independent reference."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(logp[len(prompt) + i - 1, t].item() for i, t in enumerate(completion))


def test_collate_masks_prompt_and_padding():
    b = collate(EXAMPLES, pad_id=0)
    assert b.input_ids.shape == (3, 7)
    assert b.completion_mask[0].tolist() == [False] * 3 + [True] * 4
    assert b.completion_mask[1].tolist() == [False, False, True] + [False] * 4
    assert b.attention_mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    pos, labels, row = b.targets
    assert labels.tolist() == [4, 5, 6, 7, 10, 16, 17] and row.tolist() == [0, 0, 0, 0, 1, 2, 2]


@pytest.mark.parametrize("pad_id", [0, 49])
def test_sequence_logps_match_unbatched_reference(pad_id):
    model = tiny()
    total, count = sequence_logps(model, collate(EXAMPLES, pad_id), chunk=2)
    expect = [_direct_logps(model, p, c) for p, c in EXAMPLES]
    torch.testing.assert_close(total, torch.tensor(expect), rtol=1e-5, atol=1e-4)
    assert count.tolist() == [4, 1, 2]


def test_chunked_gradients_match_full_logits():
    model = tiny()
    b = collate(EXAMPLES, 0)
    h, labels, row = completion_hidden(model, b)
    w, bias = output_layer(model)
    hh = h.detach().requires_grad_()
    g = torch.randn(labels.shape[0])
    (label_logps(hh, w, bias, labels, chunk=3) * g).sum().backward()
    h2 = h.detach().requires_grad_()
    full = torch.log_softmax(h2 @ w.t(), -1).gather(1, labels[:, None]).squeeze(1)
    (full * g).sum().backward()
    torch.testing.assert_close(hh.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_weight_gradient_of_chunked_logps():
    h = torch.randn(7, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    bias = torch.randn(11, requires_grad=True)
    labels = torch.randint(0, 11, (7,))
    label_logps(h, w, bias, labels, chunk=2).sum().backward()
    grads = [t.grad.clone() for t in (h, w, bias)]
    for t in (h, w, bias):
        t.grad = None
    torch.log_softmax(h @ w.t() + bias, -1).gather(1, labels[:, None]).sum().backward()
    for a, t in zip(grads, (h, w, bias)):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-6)


def test_token_kl_value_and_gradient():
    h = torch.randn(9, 8, requires_grad=True)
    w = torch.randn(13, 8)
    ht, wt = torch.randn(9, 8), torch.randn(13, 8)
    kl = token_kl(h, w, None, ht, wt, None, chunk=4)
    g = torch.rand(9)
    (kl * g).sum().backward()
    h2 = h.detach().requires_grad_()
    lt = torch.log_softmax(ht @ wt.t(), -1)
    ref = (lt.exp() * (lt - torch.log_softmax(h2 @ w.t(), -1))).sum(-1)
    (ref * g).sum().backward()
    torch.testing.assert_close(kl, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    assert bool((token_kl(ht, wt, None, ht, wt, None) .abs() < 1e-5).all())


def test_fit_and_common_prefix():
    assert fit([1, 2, 3], [4, 5, 6], 5) == ([1, 2, 3], [4, 5])
    assert fit([1, 2, 3], [4], 3) is None
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([1], [1]) == 1


# ----------------------------------------------------------------------------- shared prefix
SYSTEM = [3, 7, 1, 9, 4, 4, 2, 8, 6, 5]  # a shared "system prompt" (10 tokens)
PREFIXED = [(SYSTEM + [11, 12], [13, 14, 15]), (SYSTEM + [16], [17, 18, 19, 20, 21]), (SYSTEM + [22, 23, 24], [25])]


def _plain_hidden(model, batch):
    return model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state


def test_shared_prefix_length():
    from qdpo.training.logps import MIN_SHARED_PREFIX, shared_prefix

    assert shared_prefix(collate(PREFIXED, 0)) == len(SYSTEM)
    assert shared_prefix(collate(PREFIXED[:1], 0)) == 0  # one row: nothing to share
    assert shared_prefix(collate(EXAMPLES, 0)) == 0  # rows differ at once
    short = [(SYSTEM[:MIN_SHARED_PREFIX - 1] + [30], [31]), (SYSTEM[:MIN_SHARED_PREFIX - 1] + [32], [33])]
    assert shared_prefix(collate(short, 0)) == 0  # below the minimum
    same = [(SYSTEM, [40, 41]), (SYSTEM, [40, 41])]
    assert shared_prefix(collate(same, 0)) == len(SYSTEM) + 1  # identical rows: all but the last token
    padded = collate([(SYSTEM, [40]), (SYSTEM[:9], [])], 0)  # the second row's padding cuts the prefix
    assert shared_prefix(padded) == 9


def _assert_sharing_matches_whole_rows(model, batch) -> None:
    """decoder_hidden with shared starts vs whole rows: hidden states at real tokens and every parameter
    gradient of a random probe of them, equal up to fp32 rounding."""
    from qdpo.training.logps import decoder_hidden

    mask = batch.attention_mask.bool()
    probe = torch.randn(*batch.input_ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    got = []
    for share in (True, False):
        model.zero_grad()
        model.qdpo_no_prefix_sharing = not share
        h = decoder_hidden(model, batch)
        (h * probe)[mask].sum().backward()
        got.append((h.detach()[mask], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    model.qdpo_no_prefix_sharing = False
    torch.testing.assert_close(got[0][0], got[1][0], rtol=1e-5, atol=1e-5)
    assert got[0][1].keys() == got[1][1].keys() and got[1][1]
    for n, want in got[1][1].items():  # fp32 rounding relative to each gradient's scale (sums over positions)
        torch.testing.assert_close(got[0][1][n], want, rtol=0, atol=2e-6 * want.abs().max().item(), msg=n)


def test_shared_prefix_forward_and_gradients_match_whole_rows():
    """The prefix run once and repeated gives the same hidden states and parameter gradients."""
    from qdpo.training.logps import decoder_hidden

    model = tiny(3).train()
    batch = collate(PREFIXED, 0)
    _assert_sharing_matches_whole_rows(model, batch)
    mask = batch.attention_mask.bool()
    model.qdpo_no_prefix_sharing = False
    with torch.no_grad():
        torch.testing.assert_close(decoder_hidden(model, batch)[mask], _plain_hidden(model, batch)[mask],
                                   rtol=1e-5, atol=1e-5)
    # and the completion log-probs of the whole path agree with the unbatched reference
    with torch.no_grad():
        total, _ = sequence_logps(model.eval(), batch)
    for i, (p, c) in enumerate(PREFIXED):
        assert total[i].item() == pytest.approx(_direct_logps(model, p, c), abs=1e-4)


def test_batches_wider_than_a_sliding_window_run_whole_rows(monkeypatch):
    """A sliding-window model shares starts only while a part's keys fit in the window (see the next
    test); a batch wider than it runs whole rows, which apply the model's own sliding masks."""
    from transformers import MistralConfig, MistralForCausalLM

    from qdpo.training import logps
    from qdpo.training.logps import decoder_hidden

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    model = MistralForCausalLM(cfg).eval()
    parts = []
    real = logps._Part.__call__
    monkeypatch.setattr(logps._Part, "__call__", lambda self, *a: parts.append(1) or real(self, *a))
    for batch in (collate(PREFIXED, 0), _dpo_batch(SYSTEM, seed=2)):
        with torch.no_grad():
            h = decoder_hidden(model, batch)
            want = _plain_hidden(model, batch)
        assert torch.equal(h, want)
    assert logps.window(model) == 4 and not parts and logps.prefix_sharing_ok(model)
    model.config.sliding_window = 3  # it matters: the rows differ from full attention's
    with torch.no_grad():
        assert not torch.allclose(_plain_hidden(model, batch), want)


def test_chunked_attention_runs_whole_rows():
    """Chunked attention (Llama 4) keeps its keys in sliding-window cache layers, but its masks are not a
    sliding window's: never shared."""
    from qdpo.training import logps
    from tests.test_experts import tiny_moe

    model = tiny_moe("Llama4Text", attention_chunk_size=8)
    assert "chunked_attention" in logps._layer_types(model)
    assert logps._new_cache(model) is None and not logps.prefix_sharing_ok(model)


def _dpo_batch(system: list[int], seed: int = 0):
    """Chosen and rejected rows of 3 prompts (a DPO micro-batch): each pair shares its prompt and 2 answer tokens."""
    g = torch.Generator().manual_seed(seed)

    def r(n):
        return torch.randint(1, 50, (n,), generator=g).tolist()

    prompts = [system + r(n) for n in (9, 12, 10)]
    pairs = [(pr, r(2)) for pr in prompts]
    chosen = [(pr, c + r(4 + i)) for i, (pr, c) in enumerate(pairs)]
    rejected = [(pr, c + r(7 - i)) for i, (pr, c) in enumerate(pairs)]
    return collate(chosen + rejected, 0)


@pytest.mark.parametrize("system", [SYSTEM, []])
def test_row_groups_forward_and_gradients_match_whole_rows(system):
    """Pairs of rows sharing a prompt run it once per pair (after the batch-wide prefix, if any)."""
    from qdpo.training.logps import row_groups, shared_prefix

    batch = _dpo_batch(system)
    p = shared_prefix(batch)
    assert p == len(system)
    group_of, shared = row_groups(batch, p)
    assert group_of[:3] == group_of[3:] and len(set(group_of)) == 3  # chosen i and rejected i together
    lengths = batch.attention_mask.sum(1).tolist()
    for i in range(3):  # the prompt and the 2 common answer tokens
        assert shared[group_of[i]] == min(lengths[i] - 1, lengths[i + 3] - 1, len(system) + (9, 12, 10)[i] + 2)
    _assert_sharing_matches_whole_rows(tiny(4).train(), batch)


def test_row_groups_need_a_partner_for_every_row():
    from qdpo.training.logps import row_groups

    batch = _dpo_batch(SYSTEM)
    lone = collate([(SYSTEM + [5] * 12, [6, 7]), *((batch.input_ids[i, :n].tolist(), [])
                    for i, n in enumerate(batch.attention_mask.sum(1).tolist()))], 0)
    assert row_groups(lone, len(SYSTEM)) is None  # one row without a partner: the batch-wide prefix only
    assert row_groups(collate(PREFIXED, 0), len(SYSTEM)) is None  # fewer than 4 rows


@pytest.mark.parametrize("kind,parts", [("prefix", 2), ("groups", 3), ("groups without a prefix", 2)])
def test_shared_starts_under_activation_checkpointing_match_whole_rows(kind, parts):
    """With every decoder layer recomputed in the backward pass, the shared starts still run once (each
    part's cache only reads: a recomputed layer sees what it saw) and give whole rows' hidden states and
    parameter gradients; the layers are recomputed (a forward hook counts each layer's calls)."""
    from qdpo.training.distributed import activation_checkpointing
    from qdpo.training.logps import decoder_hidden

    model = tiny(5).train()
    activation_checkpointing(model)
    batch = {"prefix": collate(PREFIXED, 0), "groups": _dpo_batch(SYSTEM, seed=1),
             "groups without a prefix": _dpo_batch([], seed=1)}[kind]
    calls = []
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    _assert_sharing_matches_whole_rows(model, batch)
    hook.remove()
    assert len(calls) == 2 * parts + 2  # sharing: each part and its recompute; whole rows: one and its recompute
    mask = batch.attention_mask.bool()
    with torch.no_grad():  # validation of a model whose checkpointing is on: nothing recomputed, the same rows
        got = decoder_hidden(model.eval(), batch)[mask]
        torch.testing.assert_close(got, _plain_hidden(model, batch)[mask], rtol=1e-5, atol=1e-5)


ARCHS = {  # name: (config class, model class, what differs from tiny()'s sizes)
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),  # q/k norms
    "Phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),  # fused qkv, partial rotary
    "Olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),  # norms after the blocks
    "Mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "Qwen3Moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                                           "moe_intermediate_size": 16, "head_dim": 8}),
    # sliding windows wider than these batches (the keys of every part fit): shared, as full attention is
    "Mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64}),
    "Gemma2-hybrid": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 64, "head_dim": 8}),
}


@pytest.mark.parametrize("checkpointing,packed", [(False, False), (True, False), (True, True)],
                         ids=["parts", "parts-checkpointing", "packed-checkpointing"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_starts_match_whole_rows_across_architectures(monkeypatch, arch, checkpointing, packed):
    """Other decoder families, dense and mixture-of-experts, with and without activation checkpointing,
    in parts (one process) or packed (FSDP2): the pairs' starts run once and give whole rows' hidden
    states and gradients."""
    import transformers

    from qdpo.training import logps

    from qdpo.training.distributed import activation_checkpointing
    from qdpo.training.logps import _new_cache, prefix_sharing_ok

    config, cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, config)(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, **extra)
    model = getattr(transformers, cls)(cfg).train()
    if checkpointing:
        activation_checkpointing(model)
    if packed:
        monkeypatch.setattr(logps, "sharded", lambda m: True)
        assert logps._masks_are_tensors(model)
    assert prefix_sharing_ok(model) and _new_cache(model) is not None  # the shared starts run once
    batch = _dpo_batch(SYSTEM, seed=2)
    assert logps.fits_window(model, batch.input_ids.shape[1] * 2)
    _assert_sharing_matches_whole_rows(model, batch)


def test_a_model_that_drops_the_cache_under_checkpointing_runs_whole_rows(caplog):
    """GPT-2 hands its blocks no cache while it checkpoints them: the first part's keys never reach the
    cache, so that model runs whole rows from then on (the same hidden states and gradients; before, a
    TypeError), and says so once. Without checkpointing it shares its starts."""
    import transformers

    from qdpo.training import logps
    from qdpo.training.distributed import activation_checkpointing
    from qdpo.training.trainer import disable_dropout

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    model = transformers.GPT2LMHeadModel(cfg).train()
    disable_dropout(model)  # as training does
    batch = _dpo_batch(SYSTEM, seed=2)
    parts = []
    real = logps._Part.__call__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(logps._Part, "__call__", lambda self, *a: parts.append(1) or real(self, *a))
        _assert_sharing_matches_whole_rows(model, batch)
        assert parts and getattr(model, "_qdpo_prefix_ok", True)  # shared without checkpointing
        activation_checkpointing(model)
        parts.clear()
        with caplog.at_level("INFO", logger="qdpo.training.logps"):
            _assert_sharing_matches_whole_rows(model, batch)
    assert len(parts) == 1 and model._qdpo_prefix_ok is False  # one try, then whole rows
    assert caplog.text.count("does not keep the keys of shared starts") == 1


def test_a_model_whose_alibi_counts_cache_slots_runs_whole_rows():
    """MPT takes no position_ids and its ALiBi counts cache slots, so the padding inside the parts' keys
    (``[prefix][group start][padding][rest]``, and generation's ``[prefix][padding][rest]``) moved each
    row's rest away from its start: hidden states and greedy answers differed from whole rows' (before,
    13 % of the hidden values of a DPO batch, and the answers). It runs whole rows; Bloom, whose ALiBi
    follows the attention mask, still shares its starts."""
    import transformers

    from qdpo.training import logps
    from qdpo.training.generate import greedy
    from qdpo.training.logps import decoder_hidden

    torch.manual_seed(0)
    model = transformers.MptForCausalLM(transformers.MptConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2,
                                                                max_seq_len=128)).eval()
    with torch.no_grad():
        for p in model.parameters():  # large enough weights that the answers depend on the positions
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    batch = _dpo_batch(SYSTEM, seed=2)
    mask = batch.attention_mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(decoder_hidden(model, batch)[mask], _plain_hidden(model, batch)[mask],
                                   rtol=1e-5, atol=1e-5)

    class Tok:
        pad_token_id = eos_token_id = 0

    prompts = [SYSTEM + [11 + i] * n for i, n in enumerate((3, 7, 5, 9))]
    alone = [greedy(model, Tok, [p], 6, batch_size=1, disable=True)[0] for p in prompts]
    assert greedy(model, Tok, prompts, 6, batch_size=4, disable=True) == alone
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=50, hidden_size=32, n_layer=2,
                                                                   n_head=4))
    assert not logps.prefix_sharing_ok(model) and logps.prefix_sharing_ok(bloom)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("system", [SYSTEM, []], ids=["prefix", "no prefix"])
def test_packed_groups_match_whole_rows(monkeypatch, attn, system):
    """Under FSDP2 (one decoder call per batch) each group of rows runs as one packed row: its start once,
    then each row's rest, a 4D mask giving each token its own row's tokens. Hidden states and gradients
    are whole rows'; the decoder runs once, on one packed row per pair."""
    model = tiny(6).train()
    model.config._attn_implementation = attn
    batch = _dpo_batch(system, seed=4)
    _check_packed(monkeypatch, model, batch, 3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_sharing_only_a_prefix_pack_into_one_row(monkeypatch, attn):
    """Under FSDP2, rows that share only the batch's prefix (a pair alone in its micro-batch: its prompt)
    pack into one row while it is at most twice a row: the prefix once, then each row's rest."""
    from qdpo.training import logps

    model = tiny(7).train()
    model.config._attn_implementation = attn
    batch = collate(PREFIXED[:2], 0)
    assert logps.row_groups(batch, logps.shared_prefix(batch)) is None
    _check_packed(monkeypatch, model, batch, 1)
    long = collate([(SYSTEM, [5 + i] * 40) for i in range(3)], 0)  # packed: 10 + 3 x 40 > 2 x 50
    assert logps.shared_prefix(long) and logps._one_group(long, logps.shared_prefix(long)) is None


@pytest.mark.parametrize("arch", ["Bloom", "Falcon-alibi"])
def test_alibi_read_from_the_mask_runs_whole_rows_under_fsdp(monkeypatch, arch):
    """Bloom and Falcon with ``alibi`` read their positions from a 2-D attention mask: a packed row's 4-D
    mask made them raise ValueError under FSDP2 (``--dist fsdp``). They run whole rows there, with whole
    rows' hidden states and gradients; one process still shares their starts (in parts, 2-D masks)."""
    import transformers

    from qdpo.training import logps
    from qdpo.training.trainer import disable_dropout

    torch.manual_seed(0)
    if arch == "Bloom":
        model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=50, hidden_size=32, n_layer=2,
                                                                       n_head=4))
    else:
        model = transformers.FalconForCausalLM(transformers.FalconConfig(vocab_size=50, hidden_size=32,
                                                                         num_hidden_layers=2, num_attention_heads=4,
                                                                         alibi=True))
    disable_dropout(model.train())
    batch = _dpo_batch(SYSTEM, seed=4)
    parts = []
    real = logps._Part.__call__
    monkeypatch.setattr(logps._Part, "__call__", lambda self, *a: parts.append(1) or real(self, *a))
    _assert_sharing_matches_whole_rows(model, batch)
    assert parts  # shared in parts in one process
    monkeypatch.setattr(logps, "sharded", lambda m: True)
    _assert_sharing_matches_whole_rows(model, batch)


def _check_packed(monkeypatch, model, batch, groups: int) -> None:
    """``batch`` under FSDP2 (``sharded`` patched): whole rows' hidden states and gradients, from one
    decoder call on ``groups`` packed rows, each as wide as its group's start and rests."""
    from qdpo.training import logps

    monkeypatch.setattr(logps, "sharded", lambda m: True)
    shapes = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                 with_kwargs=True)
    _assert_sharing_matches_whole_rows(model, batch)
    hook.remove()
    lengths = batch.attention_mask.sum(1).tolist()
    p = logps.shared_prefix(batch)
    group_of, shared = logps.row_groups(batch, p) or logps._one_group(batch, p)
    assert sorted(group_of) == sorted(list(range(groups)) * (len(lengths) // groups))  # pairs, or all rows
    widths = [s + sum(n - s for n, k in zip(lengths, group_of) if k == g) for g, s in enumerate(shared)]
    assert shapes == [(groups, max(widths)), tuple(batch.input_ids.shape)]  # packed, then whole rows


# ----------------------------------------------------------------------------- scaled and capped logits
SCALED = {  # name: (config class, model class, settings): logits the model makes from its output layer's z
    "Cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),  # z · logit_scale
    "Granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),  # z / logits_scaling
    "Gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 0.5, "head_dim": 8}),  # soft cap
}


def _scaled(arch: str, seed: int, **extra):
    import transformers

    config, cls, kw = SCALED[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config)(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                        initializer_range=0.2, **kw, **extra)
    return getattr(transformers, cls)(cfg).eval()


@pytest.mark.parametrize("arch", SCALED)
def test_logps_and_kl_are_those_of_the_models_scaled_or_capped_logits(arch):
    """Log-probs, KL and their gradients from the model's own logits (as decoding and every other tool see
    them), not from its output layer's values before the model scales or caps them."""
    model, teacher = _scaled(arch, 0), _scaled(arch, 1)
    norm = base_model(model).norm.weight  # a parameter before the output layer: gradients pass the transform
    b = collate(EXAMPLES, 0)
    total, _ = sequence_logps(model, b, chunk=2)
    torch.testing.assert_close(total.detach(), torch.tensor([_direct_logps(model, p, c) for p, c in EXAMPLES]),
                               rtol=1e-5, atol=1e-4)
    g = torch.tensor([0.5, -1.0, 2.0])
    (total * g).sum().backward()
    got, norm.grad = norm.grad.clone(), None
    pos, labels, row = b.targets
    ref = [torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1) for p, c in EXAMPLES]
    sum(g[i] * sum(ref[i][len(p) + j - 1, t] for j, t in enumerate(c)) for i, (p, c) in enumerate(EXAMPLES)).backward()
    torch.testing.assert_close(got, norm.grad, rtol=1e-4, atol=1e-6)
    norm.grad = None

    h, _, _ = completion_hidden(model, b)
    with torch.no_grad():
        h_t, _, _ = completion_hidden(teacher, b)
    ids = b.input_ids[:1, :7]
    kl = token_kl(h, *output_layer(model), h_t, *output_layer(teacher), 2, logit_transform(model, ids),
                  logit_transform(teacher, ids))
    kl.sum().backward()
    got, norm.grad = norm.grad.clone(), None
    want = []
    for p, c in EXAMPLES:
        ids = torch.tensor([p + c])
        lt = torch.log_softmax(teacher(ids).logits[0, len(p) - 1:-1].float(), -1).detach()
        ls = torch.log_softmax(model(ids).logits[0, len(p) - 1:-1].float(), -1)
        want.append((lt.exp() * (lt - ls)).sum(-1))
    want = torch.cat(want)
    want.sum().backward()
    torch.testing.assert_close(kl.detach(), want.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got, norm.grad, rtol=1e-4, atol=1e-6)


def test_logits_no_scale_or_cap_explains_are_refused():
    model = tiny()
    model.config.final_logit_softcapping = 0.5  # said, but Llama's forward does not cap: its logits are z
    with pytest.raises(ValueError, match="LlamaForCausalLM turns its output layer's values into logits"):
        logit_transform(model, torch.tensor([[1, 2, 3, 4]]))
    model.config.final_logit_softcapping = None
    assert logit_transform(model, torch.tensor([[1, 2, 3, 4]])) == (1.0, None)


def test_a_quantized_head_gives_its_quantized_logps_and_straight_through_gradients():
    """A checkpoint may quantize the LM head: its log-probs are those of its ŵ (the model's forward), and its
    latent weight gets the straight-through gradient, zero where the grid clips it."""
    from qdpo import QuantSpec
    from qdpo.kernels.reference import fake_quant, fake_quant_mask
    from qdpo.quant.linear import QuantLinear

    model = tiny()
    model.config.tie_word_embeddings = False
    head = QuantLinear.from_linear(model.lm_head, QuantSpec(4, 32))
    with torch.no_grad():
        head.weight.mul_(1.3)  # latent weights off the grid's points, some beyond its range
    model.lm_head = head
    w_hat, keep = fake_quant(head.weight, head.scales, head.zeros, 4), fake_quant_mask(head.weight, head.scales,
                                                                                       head.zeros, 4)
    assert not keep.all() and not torch.equal(w_hat, head.weight)
    total, _ = sequence_logps(model, collate(EXAMPLES, 0), chunk=2)
    torch.testing.assert_close(total.detach(), torch.tensor([_direct_logps(model, p, c) for p, c in EXAMPLES]),
                               rtol=1e-5, atol=1e-4)
    g = torch.tensor([0.5, -1.0, 2.0])
    (total * g).sum().backward()
    plain = torch.nn.Linear(32, 50, bias=False)
    plain.weight = torch.nn.Parameter(w_hat.clone())
    model.lm_head = plain
    sum(g[i] * _direct_logps_grad(model, p, c) for i, (p, c) in enumerate(EXAMPLES)).backward()
    torch.testing.assert_close(head.weight.grad, plain.weight.grad * keep, rtol=1e-4, atol=1e-6)


def _direct_logps_grad(model, prompt, completion):
    logp = torch.log_softmax(model(torch.tensor([prompt + completion])).logits[0].float(), -1)
    return sum(logp[len(prompt) + i - 1, t] for i, t in enumerate(completion))


@pytest.mark.parametrize("arch, settings, want", [
    ("Gemma2", {"final_logit_softcapping": 30.0, "initializer_range": 1.0}, (1.0, 30.0)),  # logits near the cap
    ("Cohere", {"logit_scale": 0.3}, (0.3, None)),  # no power of two: bf16 logits are a rounded 0.3 · z
    ("Granite", {"logits_scaling": 3.0}, (1 / 3.0, None)),
])
def test_a_bf16_model_s_scale_and_cap_are_found_despite_its_rounded_logits(arch, settings, want):
    # a bf16 Gemma 2 (as --dtype auto loads it on a GPU) was refused as "turns its output layer's values into logits
    # in a way qdpo does not reproduce": its capped logits round by up to 0.06 near 30, above a fp32 tolerance
    config, cls, kw = SCALED[arch]
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config)(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                        **{"initializer_range": 0.2, **kw, **settings})
    model = getattr(transformers, cls)(cfg).eval().to(torch.bfloat16)
    ids = torch.randint(1, 50, (1, 24), generator=torch.Generator().manual_seed(3))
    assert logit_transform(model, ids) == want  # the config's values exactly, not a fit of rounded logits
    if settings.get("final_logit_softcapping"):
        assert float(model(ids).logits.detach().abs().max()) > 16  # toward the cap, where bf16 rounds by 0.125


def test_falcon_h1_s_lm_head_multiplier_is_its_logit_scale():
    # a fit of the logits gave 0.30000004 (fp32) or 0.300012 (bf16) for Falcon-H1's lm_head_multiplier of 0.3
    import transformers

    torch.manual_seed(0)
    cfg = transformers.FalconH1Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, mamba_d_ssm=32, mamba_n_heads=4,
                                      mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, lm_head_multiplier=0.3)
    model = transformers.FalconH1ForCausalLM(cfg).eval()
    ids = torch.randint(1, 50, (1, 12), generator=torch.Generator().manual_seed(4))
    assert logit_transform(model, ids) == (0.3, None)
    model = copy.deepcopy(model).to(torch.bfloat16)
    del model._qdpo_logits
    assert logit_transform(model, ids) == (0.3, None)
