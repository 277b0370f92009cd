"""Completion log-probs and token-level KL without ever holding ``(B, T, V)`` logits.

The decoder runs once to hidden states ``[B, T, H]``; only the ``P`` positions
that predict a completion token go through the output layer, ``chunk``
positions at a time, and the backward pass recomputes each chunk's logits
instead of storing them. Peak extra memory is ``chunk × V`` fp32 floats
however long the batch is. This is the same trick as a fused
linear-cross-entropy, written for log-probs of the label only (DPO) and for
KL against a teacher's hidden states (KD).

Where the model turns the output layer's ``z = h Wᵀ + b`` into its logits with
a scale and a final soft-capping (Cohere's ``logit_scale``, Granite's
``1 / logits_scaling``, Gemma 2's ``final_logit_softcapping``), the log-probs
and KL here use the model's logits too (:func:`logit_transform`).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdpo.training.data import Batch

log = logging.getLogger(__name__)


MIN_SHARED_PREFIX = 8  # tokens every row must share before the prefix is run once


def base_model(model: nn.Module) -> nn.Module:
    """The decoder a causal LM wraps (``model.base_model``). Where ``base_model_prefix`` names an attribute
    the model does not have (Llama 4's ``language_model``, its decoder being ``model``), transformers gives
    the LM itself back: then the child that holds the input embeddings."""
    base = model.base_model
    if base is not model:
        return base
    emb = model.get_input_embeddings()
    for child in model.children():
        if hasattr(child, "get_input_embeddings") and child.get_input_embeddings() is emb:
            return child
    return base


def decoder_hidden(model, batch: Batch) -> Tensor:
    """Final hidden states ``[B, T, H]`` (after the last norm) of a HF causal LM.

    Shared starts of rows run once: the prefix every row shares (the chat
    template's system prompt) as one row, and, when every row has a partner
    that shares more (a DPO pair's prompt and the common start of its chosen
    and rejected answers), that longer start once per group of rows. Their
    keys and values are reused for the rest of each row. Under FSDP2 (one
    decoder call per batch, :func:`prefix_sharing_ok`) each such group is one
    packed row instead (:func:`_packed_groups`). The numbers are a whole-row
    forward's up to float rounding, with or without gradients (they flow back
    through the reuse), for less compute. Positions at padding (right of each
    row's length) hold unspecified values.
    """
    if prefix_sharing_ok(model) and _new_cache(model) is not None:
        p = shared_prefix(batch)
        plan = row_groups(batch, p)
        try:
            if sharded(model):  # one decoder call (see prefix_sharing_ok): the groups packed, if any
                plan = plan or _one_group(batch, p)
                # the packed mask spans real positions: at most a row (sliding windows, see _new_cache)
                if plan is not None and _masks_are_tensors(model) and not _positions_from_mask(model) \
                        and fits_window(model, batch.input_ids.shape[1]):
                    return _packed_groups(model, batch, plan)
            elif plan is not None:
                if fits_window(model, _parts_width(batch, plan)):
                    return _with_row_groups(model, batch, p, plan)
            elif p and fits_window(model, batch.input_ids.shape[1]):
                return _with_shared_prefix(model, batch, p)
        except _CacheUnused:  # found on the first part, before any part read a cache: whole rows from now on
            model._qdpo_prefix_ok = False
            log.info("%s does not keep the keys of shared starts here (a cache it drops under activation "
                     "checkpointing?): whole rows", type(model).__name__)
    out = base_model(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.last_hidden_state


def shared_prefix(batch: Batch) -> int:
    """Tokens ``P`` that every row of ``batch`` holds identically at its start (0 when fewer than
    :data:`MIN_SHARED_PREFIX`, or when there is one row); at most ``T - 1``."""
    ids, att = batch.input_ids, batch.attention_mask
    if ids.shape[0] < 2 or ids.shape[1] <= MIN_SHARED_PREFIX:
        return 0
    same = ((ids == ids[:1]) & (att == 1)).all(0)  # [T]
    p = int(same.long().cumprod(0).sum())
    p = min(p, ids.shape[1] - 1)
    return p if p >= MIN_SHARED_PREFIX else 0


def row_groups(batch: Batch, p: int) -> tuple[list[int], list[int]] | None:
    """``(group of each row, shared length of each group)`` when every row shares at least
    ``p + MIN_SHARED_PREFIX`` tokens with another row; each group's length leaves every row of it at
    least one token of its own. None otherwise (a lone row, or nothing worth sharing)."""
    from qdpo.training.data import common_prefix

    lengths = batch.attention_mask.sum(1).tolist()
    rows = [batch.input_ids[i, :n].tolist() for i, n in enumerate(lengths)]
    if len(rows) < 4:
        return None
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    groups: list[list[int]] = [[order[0]]]
    shared = [len(rows[order[0]])]
    for prev, i in zip(order, order[1:]):
        cp = common_prefix(rows[prev], rows[i])
        if cp >= p + MIN_SHARED_PREFIX:
            groups[-1].append(i)
            shared[-1] = min(shared[-1], cp)
        else:
            groups.append([i])
            shared.append(len(rows[i]))
    shared = [min(s, min(lengths[i] for i in g) - 1) for g, s in zip(groups, shared)]
    if any(len(g) < 2 for g in groups) or any(s < p + MIN_SHARED_PREFIX for s in shared):
        return None
    group_of = [0] * len(rows)
    for k, g in enumerate(groups):
        for i in g:
            group_of[i] = k
    return group_of, shared


def prefix_sharing_ok(model) -> bool:
    """Whether this model's shared starts may run once (decoder-only, plain dynamic KV cache: full
    attention, whose positions and masks the parts or the packed rows reproduce exactly; sliding-window
    attention too, batch by batch, while the keys fit in the window: :func:`_new_cache`).

    Under FSDP2 the decoder runs once per batch: FSDP2 gathers a layer's weights on each call and
    reduce-scatters its gradients after each call's backward, so the 2–3 parts of
    :func:`_with_row_groups` would multiply that traffic (and the ranks would have to agree on the
    number of parts). Measured on the CPU (2 ranks, gloo, SmolLM2-135M W4, 4 pairs per rank), a step
    took 1.5x longer with the parts than with whole rows. There, :func:`_packed_groups` instead.
    """
    if _checkpointing(model) and not any(hasattr(m, "_can_checkpoint_with_cache") for m in model.modules()):
        return False  # a transformers that drops any cache under checkpointing (see _Part)
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False) or getattr(model, "qdpo_no_prefix_sharing", False):
        return False
    if not _places_tokens_by_position(model):
        model._qdpo_prefix_ok = False
    return getattr(model, "_qdpo_prefix_ok", True)


# decoders without position_ids whose positions (ALiBi) follow the attention mask, as the parts need
POSITIONS_FROM_MASK = ("BloomModel",)


def _places_tokens_by_position(model) -> bool:
    """Whether the decoder puts each token where the parts' positions or attention mask say: it takes
    ``position_ids``, or is one of :data:`POSITIONS_FROM_MASK`. MPT's ALiBi counts cache slots instead, so
    the padding inside a part's keys (``[prefix][padding][rest]``) would move the rest away from the prefix."""
    import inspect

    return "position_ids" in inspect.signature(base_model(model).forward).parameters or _positions_from_mask(model)


def _positions_from_mask(model) -> bool:
    """Whether the decoder reads its ALiBi positions from a 2-D attention mask (Bloom, Falcon with
    ``alibi``): the parts give it one, but a packed row's 4-D mask it cannot read."""
    base = base_model(model)
    return any(c.__name__ in POSITIONS_FROM_MASK for c in type(base).__mro__) or \
        getattr(base.config, "alibi", False) is True


def _masks_are_tensors(model) -> bool:
    """Whether the model's attention takes a 4D mask tensor as given (eager and SDPA; not flash or flex)."""
    return getattr(base_model(model).config, "_attn_implementation", None) in ("eager", "sdpa")


def _parts_width(batch: Batch, plan: tuple[list[int], list[int]]) -> int:
    """The keys the last part of :func:`_with_row_groups` attends over: the prefix and the widest group
    start, then the longest rest."""
    group_of, shared = plan
    lengths = batch.attention_mask.sum(1).tolist()
    return max(shared) + max(n - shared[k] for n, k in zip(lengths, group_of))


def _one_group(batch: Batch, p: int) -> tuple[list[int], list[int]] | None:
    """Every row one group sharing the batch's prefix of ``p`` tokens, when packed they make a row at most
    twice the batch's (its attention then spans at most 4x a row's): a DPO pair alone in its micro-batch
    shares its prompt so. None without a prefix, or when the packed row would be longer."""
    if not p:
        return None
    width = p + int((batch.attention_mask.sum(1) - p).sum())
    return ([0] * batch.input_ids.shape[0], [p]) if width <= 2 * batch.input_ids.shape[1] else None


def _packed_groups(model, batch: Batch, plan: tuple[list[int], list[int]]) -> Tensor:
    """``decoder_hidden`` in one decoder call: one packed row per group of :func:`row_groups`, its
    shared start once and then each of its rows' own rest, with a 4D mask that lets each token see
    exactly the tokens before it in its own row (the start, then its rest) at the positions a whole-row
    forward gives them. A group's start runs once (a DPO pair's prompt: once, not twice); the attention
    of a packed row spans the rows of its group (for a pair about 1.5x a row).
    """
    group_of, shared = plan
    ids, dev = batch.input_ids, batch.input_ids.device
    lengths = batch.attention_mask.sum(1).tolist()
    b, t, g = ids.shape[0], ids.shape[1], len(shared)
    members = [[i for i in range(b) if group_of[i] == k] for k in range(g)]
    widths = [shared[k] + sum(lengths[i] - shared[k] for i in members[k]) for k in range(g)]
    width = max(widths)
    tok = torch.zeros(g, width, dtype=ids.dtype, device=dev)
    pos = torch.zeros(g, width, dtype=torch.long, device=dev)
    seg = torch.full((g, width), -1, dtype=torch.long)  # 0: the group's start, j + 1: its j-th row's rest
    index = torch.zeros(b, t, dtype=torch.long)  # row i, column c → place in the packed [G · width]
    for k, rows in enumerate(members):
        s = shared[k]
        tok[k, :s], pos[k, :s], seg[k, :s] = ids[rows[0], :s], torch.arange(s, device=dev), 0
        at = s
        for j, i in enumerate(rows):
            n = lengths[i] - s
            tok[k, at:at + n], pos[k, at:at + n], seg[k, at:at + n] = ids[i, s:lengths[i]], \
                torch.arange(s, lengths[i], device=dev), j + 1
            index[i, :s] = k * width + torch.arange(s)
            index[i, s:lengths[i]] = k * width + at + torch.arange(n)
            at += n
    seg = seg.to(dev)
    sq, sk = seg[:, :, None], seg[:, None, :]
    see = ((sk == 0) | (sk == sq)) & (pos[:, None, :] <= pos[:, :, None]) & (sq >= 0) & (sk >= 0)
    see |= torch.eye(width, dtype=torch.bool, device=dev)  # padding sees itself (no row without a key)
    mask = see[:, None]
    if base_model(model).config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, device=dev).masked_fill_(~mask, torch.finfo(torch.float32).min)
    h = base_model(model)(input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    return h.reshape(g * width, -1)[index.to(dev)]


def _checkpointing(model) -> bool:
    """Whether transformers' activation checkpointing is on for ``model`` (its 5.x name, else the older)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def sharded(model) -> bool:
    """Whether FSDP2 shards some of ``model``'s modules (in an initialised process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _new_cache(model):
    """``(cache kwarg name, empty DynamicCache)`` whose layers are all plain full-attention ones, or None when
    the model's cache is not a plain dynamic one (remembered on the model: linear-attention, chunked or
    static caches run whole rows).

    Sliding-window layers get plain layers too, and the model's smallest window is remembered
    (:func:`window`): a sliding layer attends to every key of a row that fits in its window, as a full one
    does, so the shared starts may run once while the keys a part attends over (counted by cache index,
    padding included) fit in it; the callers check that width, and run wider batches whole."""
    import inspect

    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=model.config)
    layers = getattr(cache, "layers", None)
    params = inspect.signature(base_model(model).forward).parameters
    name = "cache" if "cache" in params else "past_key_values"  # transformers renamed it in 5.x
    try:
        from transformers.cache_utils import DynamicSlidingWindowLayer as Sliding
    except ImportError:  # an older transformers: its sliding caches run whole rows
        Sliding = None
    sliding = [layer.sliding_window for layer in layers or [] if type(layer) is Sliding]
    plain = all(type(layer) in (DynamicLayer, Sliding) for layer in layers or [])
    if sliding:  # chunked attention has sliding-window cache layers too: not the same masks
        plain = plain and _layer_types(model) <= {"full_attention", "sliding_attention"}
    if not layers or name not in params or not plain:
        model._qdpo_prefix_ok = False
        return None
    model._qdpo_window = min(sliding) if sliding else None
    if sliding:
        cache.layers = [DynamicLayer() for _ in layers]
    return name, cache


def _layer_types(model) -> set[str]:
    """The kinds of attention of the model's layers as transformers' cache reads them (``full_attention``,
    ``sliding_attention``, ``chunked_attention``, ...); ``{"unknown"}`` where it cannot say."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        return set(get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))[0])
    except Exception:  # noqa: BLE001 - an older or different transformers: not known, so not shared
        return {"unknown"}


def window(model) -> int | None:
    """The smallest sliding window of the model's layers (None: every layer attends to all keys), as
    :func:`_new_cache` finds it."""
    if not hasattr(model, "_qdpo_window"):
        _new_cache(model)
    return getattr(model, "_qdpo_window", None)


def fits_window(model, width: int) -> bool:
    """Whether parts whose keys span ``width`` cache positions compute what whole rows do."""
    w = window(model)
    return w is None or width <= w


def prefix_cache(model, prefix: Tensor, batch_size: int):
    """``(cache kwarg name, cache, prefix hidden [1, P, H])``: the keys and values of ``prefix`` (``[1, P]``
    token ids) computed once and repeated ``batch_size`` times, for a forward or ``generate`` that continues
    from them; None when the model's cache is not a plain dynamic one."""
    got = _new_cache(model)
    if got is None:
        return None
    name, cache = got
    pre = base_model(model)(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True,
                           **{name: cache})
    cache.batch_repeat_interleave(batch_size)
    return name, cache, pre.last_hidden_state


Pieces = list[tuple[Tensor, Tensor, "Tensor | int"]]  # one layer's keys, values and their rows (see _Part)


@functools.cache
def _part_layer() -> type:
    """The cache layer of :class:`_Part` (a transformers ``DynamicLayer`` that never changes; made on first
    use, transformers being imported only then)."""
    from transformers.cache_utils import DynamicLayer

    class PartLayer(DynamicLayer):
        def __init__(self, pieces: Pieces):
            super().__init__()
            self.pieces, self.new = pieces, None
            self.is_initialized = bool(pieces)

        def get_seq_length(self) -> int:
            return sum(k.shape[-2] for k, _, _ in self.pieces)

        def update(self, key_states, value_states, *args, **kwargs):
            self.new = key_states, value_states
            if not self.pieces:
                return key_states, value_states
            ks = [_pick(k, rows) for k, _, rows in self.pieces]
            vs = [_pick(v, rows) for _, v, rows in self.pieces]
            return torch.cat([*ks, key_states], -2), torch.cat([*vs, value_states], -2)

    return PartLayer


class _Part:
    """One forward of a part of a batch (a shared prefix, the pairs' starts, the rows' rests) on the
    keys and values of the parts before it.

    Its cache's layers hold those keys and values and never change: ``update`` returns them followed by
    the part's own, and keeps the part's own (``new``) for the parts after it. So a layer run again by
    activation checkpointing's recompute in the backward pass sees exactly what it saw in the forward
    (a growing cache would see its own keys twice), and the decoder layers may keep the cache under
    checkpointing (transformers drops a cache there, whose layers write to it). Each layer's earlier
    keys are pieces (``[rows, heads, tokens, dim]`` each, with the rows of this part: an int, its one
    row repeated that often; a tensor, the rows it picks) put together only inside ``update``, so a part's
    keys for every row of every layer are not all held at once (under checkpointing, nothing saves them).
    """

    def __init__(self, model, past: list[Pieces] | None):
        layer = _part_layer()
        self.name, self.cache = _new_cache(model)
        n = len(self.cache.layers)
        self.cache.layers = [layer([] if past is None else past[i]) for i in range(n)]
        self.model = model

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None):
        """``(hidden [b, t, H], this part's keys and values per layer)``."""
        key = "_can_checkpoint_with_cache"
        layers = {m: m.__dict__.get(key) for m in self.model.modules() if hasattr(m, key)}
        for m in layers:  # the cache only reads, so the recompute sees the same (see the class docstring)
            setattr(m, key, True)
        try:
            # use_cache: transformers turns it off itself where it checkpoints (with a warning); the cache
            # given is used either way
            checkpointed = _checkpointing(self.model) and self.model.training and torch.is_grad_enabled()
            h = base_model(self.model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=not checkpointed, **{self.name: self.cache}).last_hidden_state
        finally:
            for m, was in layers.items():
                if was is None:
                    delattr(m, key)  # the class's own again
                else:
                    setattr(m, key, was)
        new = [layer.new for layer in self.cache.layers]
        if any(kv is None for kv in new):
            raise _CacheUnused
        return h, new


class _CacheUnused(Exception):
    """The decoder did not write a part's keys and values into the cache it was given (GPT-2 hands its
    blocks no cache while it checkpoints them, whatever ``_can_checkpoint_with_cache`` says)."""


def _pick(t: Tensor, rows: "Tensor | int") -> Tensor:
    return t.expand(rows, -1, -1, -1) if isinstance(rows, int) else t[rows]


def _pieces(kv: list[tuple[Tensor, Tensor]], rows: "Tensor | int") -> list[Pieces]:
    """A part's keys and values as one piece per layer, for the ``rows`` of the next part."""
    return [[(k, v, rows)] for k, v in kv]


def _with_shared_prefix(model, batch: Batch, p: int) -> Tensor:
    """``decoder_hidden`` with the first ``p`` tokens run once."""
    ids, att = batch.input_ids, batch.attention_mask
    b = ids.shape[0]
    h_pre, kv = _Part(model, None)(ids[:1, :p], att[:1, :p])
    h_rest, _ = _Part(model, _pieces(kv, b))(ids[:, p:], att)
    return torch.cat([h_pre.expand(b, -1, -1), h_rest], 1)


def _with_row_groups(model, batch: Batch, p: int, plan: tuple[list[int], list[int]]) -> Tensor:
    """``decoder_hidden`` in three parts: the batch's shared prefix (``p`` tokens, one row; none when 0),
    each row group's longer shared start (one row per group, ``plan`` from :func:`row_groups`), each row's
    own rest.

    Keys of row i in group g: ``[prefix p][group start m_g][padding to M][own rest]``; the padding is
    masked and the positions are given explicitly, so each token sees exactly the tokens before it in
    its own row, at the positions a whole-row forward gives them.
    """
    group_of, shared = plan
    ids, dev = batch.input_ids, batch.input_ids.device
    lengths = batch.attention_mask.sum(1).tolist()
    b, t, g = ids.shape[0], ids.shape[1], len(shared)
    first = [group_of.index(k) for k in range(g)]  # a row of each group: its tokens up to shared[k]
    mid_len = [s - p for s in shared]
    m = max(mid_len)
    mid_ids = torch.zeros(g, m, dtype=ids.dtype, device=dev)
    mid_att = torch.zeros(g, m, dtype=batch.attention_mask.dtype, device=dev)
    for k, (r, n) in enumerate(zip(first, mid_len)):
        mid_ids[k, :n], mid_att[k, :n] = ids[r, p:p + n], 1
    ones = torch.ones(1, p, dtype=mid_att.dtype, device=dev)
    if p:
        h_pre, kv_pre = _Part(model, None)(ids[:1, :p], ones)
    mid_pos = (torch.arange(m, device=dev) + p).expand(g, -1)
    h_mid, kv_mid = _Part(model, _pieces(kv_pre, g) if p else None)(
        mid_ids, torch.cat([ones.expand(g, -1), mid_att], 1), mid_pos)  # [G, M, H]
    sel = torch.tensor(group_of, device=dev)
    past = _pieces(kv_mid, sel)
    if p:
        past = [pre + mid for pre, mid in zip(_pieces(kv_pre, b), past)]
    own = [lengths[i] - shared[group_of[i]] for i in range(b)]
    r = max(own)
    rest_ids = torch.zeros(b, r, dtype=ids.dtype, device=dev)
    rest_att = torch.zeros(b, r, dtype=mid_att.dtype, device=dev)
    rest_pos = torch.zeros(b, r, dtype=torch.long, device=dev)
    for i in range(b):
        s = shared[group_of[i]]
        rest_ids[i, :own[i]], rest_att[i, :own[i]] = ids[i, s:lengths[i]], 1
        rest_pos[i] = torch.arange(r, device=dev) + s
    att = torch.cat([ones.expand(b, -1), mid_att[sel], rest_att], 1)
    h_rest, _ = _Part(model, past)(rest_ids, att, rest_pos)  # [B, R, H]
    # gather every row's hidden states back into the [B, T] layout of the batch
    h_pre = h_pre[0] if p else h_mid.new_zeros(0, h_mid.shape[-1])
    src = torch.cat([h_pre, h_mid.reshape(-1, h_mid.shape[-1]), h_rest.reshape(-1, h_rest.shape[-1])])
    index = torch.zeros(b, t, dtype=torch.long)
    for i in range(b):
        k, s, n = group_of[i], shared[group_of[i]], lengths[i]
        index[i, :p] = torch.arange(p)
        index[i, p:s] = p + k * m + torch.arange(s - p)
        index[i, s:n] = p + g * m + i * r + torch.arange(n - s)
    return src[index.to(dev)]


def output_layer(model) -> tuple[Tensor, Tensor | None]:
    """The output layer's weight ``[V, H]`` and bias as the model's forward applies them. A quantized head (a
    checkpoint that quantizes it) gives its ŵ: in training, fake-quantized from its latent weight, which gets
    the straight-through gradient (as every other quantized layer's)."""
    from qdpo.kernels import ops
    from qdpo.quant.linear import QuantLinear

    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear):
        if head.mode == "train" and torch.is_grad_enabled() and head.weight.requires_grad:
            w = ops.fake_quant(head.weight, head.scales, head.zeros, head.spec.bits, None, head.backend)
        else:
            w = head._w_hat if head._w_hat is not None else head.dequantized()
        return w, head.bias
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding layer (not a causal LM?)")
    return head.weight, getattr(head, "bias", None)


def logit_transform(model, tokens: "Tensor | Batch | list[int]") -> tuple[float, float | None]:
    """``(scale, cap)``: the model's logits are ``cap · tanh(scale · z / cap)`` (``scale · z`` without a cap) of
    the output layer's ``z`` (Cohere multiplies z by ``logit_scale``, Granite divides it by ``logits_scaling``,
    Gemma 2 soft-caps it at ``final_logit_softcapping``). Found once per model (and remembered on it) by
    running the model on ``tokens`` (real tokens: ids ``[1, T]``, a list of ids, or a batch's first row; read only
    then, so a call once it is known costs nothing): the cap from its config, the scale from its logits. A model
    whose logits are no such function of z is refused, as its log-probs would be wrong."""
    got = getattr(model, "_qdpo_logits", None)
    if got is not None:
        return got
    device = next(model.parameters()).device
    input_ids = (_first_row(tokens) if isinstance(tokens, Batch) else torch.as_tensor(tokens).view(1, -1)).to(device)
    cfg = model.config
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    cap = getattr(text, "final_logit_softcapping", None) or getattr(cfg, "final_logit_softcapping", None)
    was = model.training
    model.eval()  # no dropout between the two forwards
    try:
        with torch.no_grad():
            w, b = output_layer(model)
            logits = model(input_ids=input_ids, use_cache=False).logits
            want = logits.float()[0]  # [T, V]
            h = base_model(model)(input_ids=input_ids, use_cache=False).last_hidden_state[0]
            z = F.linear(h.to(w.dtype), w, b).float()
    finally:
        model.train(was)
    # the rounding of the model's own logits: bf16 ones are 3 significant digits (a soft cap of 30 rounds by 0.06)
    rel = 1e-3 if logits.dtype == torch.float32 else 4 * torch.finfo(logits.dtype).eps
    u = want if cap is None else cap * torch.atanh((want / cap).clamp(-1 + 1e-6, 1 - 1e-6))
    fin = torch.isfinite(want) & torch.isfinite(z)  # NaN weights are another check's error, not this one's
    keep = fin & (want.abs() < 0.9 * cap) if cap is not None else fin
    keep = keep if bool(keep.any()) else fin  # every logit near the cap: atanh of the clamped
    scale = float((u * z)[keep].sum() / (z * z)[keep].sum().clamp_min(1e-30)) if bool(keep.any()) else 1.0
    # the model's own z (left bit for bit), or the scale its config declares, rather than a fit of rounded logits
    for exact in (1.0, *_declared_scales(text)):
        if abs(scale - exact) <= (1e-5 if rel == 1e-3 else rel) * abs(exact):
            scale = exact
            break
    out, _ = final_logits(z, scale, cap)
    tol = rel * float(want[fin].abs().max()) + 1e-5 if bool(fin.any()) else 0.0
    if not bool(((out - want).abs()[fin] <= tol).all()):
        raise ValueError(f"{type(model).__name__} turns its output layer's values into logits in a way qdpo does not "
                         "reproduce (neither a scale nor a final soft-capping): its log-probs would be wrong; "
                         "use a model whose logits are its output layer's")
    model._qdpo_logits = (scale, cap)
    return scale, cap


def _declared_scales(config) -> list[float]:
    """The logit scales a config names: Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, Falcon-H1's
    ``lm_head_multiplier``."""
    out = []
    for name, invert in (("logit_scale", False), ("logits_scaling", True), ("lm_head_multiplier", False)):
        v = getattr(config, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v:
            out.append(1.0 / v if invert else float(v))
    return out


def final_logits(z: Tensor, scale: float, cap: float | None) -> tuple[Tensor, "Tensor | float"]:
    """The model's logits from the output layer's fp32 ``z`` (:func:`logit_transform`), and their derivative
    by z (elementwise)."""
    if cap is None:
        return (z if scale == 1 else z * scale), scale
    t = torch.tanh(z * (scale / cap))
    return cap * t, scale * (1 - t * t)


def _chunks(n: int, chunk: int):
    for i in range(0, n, chunk):
        yield slice(i, min(i + chunk, n))


class _LabelLogProb(torch.autograd.Function):
    """``log softmax(f(h Wᵀ + b))[label]`` per row, chunked, logits recomputed in backward; ``f``: the model's
    scale and soft-capping (:func:`logit_transform`)."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk, scale, cap):
        out = h.new_empty(h.shape[0], dtype=torch.float32)
        for c in _chunks(h.shape[0], chunk):
            logits, _ = final_logits(F.linear(h[c], weight, bias).float(), scale, cap)  # [chunk, V]
            out[c] = logits.gather(1, labels[c, None]).squeeze(1) - torch.logsumexp(logits, -1)
        ctx.save_for_backward(h, weight, bias, labels)
        ctx.chunk, ctx.scale, ctx.cap = chunk, scale, cap
        return out

    @staticmethod
    def backward(ctx, g):
        h, weight, bias, labels = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.zeros_like(h) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        for c in _chunks(h.shape[0], ctx.chunk):
            logits, dz = final_logits(F.linear(h[c], weight, bias).float(), ctx.scale, ctx.cap)
            dlogits = -torch.softmax(logits, -1) * g[c, None]  # d/dlogits of lp[label]
            dlogits.scatter_add_(1, labels[c, None], g[c, None])
            _accumulate(dlogits.mul_(dz), h[c], weight, dh, dw, db, c)
        return dh, _cast(dw, weight), _cast(db, bias), None, None, None, None


class _TokenKL(torch.autograd.Function):
    """``KL(softmax(t) ‖ softmax(s))`` per row, student ``s = f(h Wᵀ + b)``, teacher ``t = ft(ht Wtᵀ + bt)``
    (``f``, ``ft``: each model's scale and soft-capping, :func:`logit_transform`)."""

    @staticmethod
    def forward(ctx, h, weight, bias, h_t, weight_t, bias_t, chunk, transform, transform_t):
        out = h.new_empty(h.shape[0], dtype=torch.float32)
        for c in _chunks(h.shape[0], chunk):
            ls = torch.log_softmax(final_logits(F.linear(h[c], weight, bias).float(), *transform)[0], -1)
            lt = torch.log_softmax(final_logits(F.linear(h_t[c], weight_t, bias_t).float(), *transform_t)[0], -1)
            out[c] = (lt.exp() * (lt - ls)).sum(-1)
        ctx.save_for_backward(h, weight, bias, h_t, weight_t, bias_t)
        ctx.chunk, ctx.transform, ctx.transform_t = chunk, transform, transform_t
        return out

    @staticmethod
    def backward(ctx, g):
        h, weight, bias, h_t, weight_t, bias_t = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.zeros_like(h) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        for c in _chunks(h.shape[0], ctx.chunk):
            s, dz = final_logits(F.linear(h[c], weight, bias).float(), *ctx.transform)
            pt = torch.softmax(final_logits(F.linear(h_t[c], weight_t, bias_t).float(), *ctx.transform_t)[0], -1)
            _accumulate(((torch.softmax(s, -1) - pt) * g[c, None]).mul_(dz), h[c], weight, dh, dw, db, c)
        return dh, _cast(dw, weight), _cast(db, bias), None, None, None, None, None, None


def _accumulate(dlogits, h_c, weight, dh, dw, db, c) -> None:
    if dh is not None:
        dh[c] = (dlogits.to(weight.dtype) @ weight).to(dh.dtype)
    if dw is not None:
        dw += dlogits.t() @ h_c.float()
    if db is not None:
        db += dlogits.sum(0)


def _cast(t, like):
    return None if t is None else t.to(like.dtype)


def label_logps(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int = 1024,
                transform: tuple[float, float | None] = (1.0, None)) -> Tensor:
    """Log-prob ``[P]`` fp32 of each label under the output layer applied to ``h`` ``[P, H]``; ``transform``:
    the model's ``(scale, cap)`` (:func:`logit_transform`)."""
    return _LabelLogProb.apply(h, weight, bias, labels, chunk, *transform)


def token_kl(h, weight, bias, h_teacher, weight_teacher, bias_teacher, chunk: int = 1024,
             transform: tuple[float, float | None] = (1.0, None), transform_teacher=None) -> Tensor:
    """``KL(teacher ‖ student)`` ``[P]`` fp32 per position; gradients reach the student only. ``transform``
    (and ``transform_teacher``, the same by default): each model's ``(scale, cap)`` (:func:`logit_transform`)."""
    return _TokenKL.apply(h, weight, bias, h_teacher.detach(), weight_teacher.detach(),
                          None if bias_teacher is None else bias_teacher.detach(), chunk, tuple(transform),
                          tuple(transform_teacher or transform))


def _first_row(batch: Batch) -> Tensor:
    """The first row's tokens ``[1, n]``, without its padding."""
    return batch.input_ids[:1, :int(batch.attention_mask[0].sum())]


def completion_hidden(model, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """``(h [P, H], labels [P], row [P])`` at the positions predicting completion tokens."""
    pos, labels, row = batch.targets
    hid = decoder_hidden(model, batch)
    return hid.reshape(-1, hid.shape[-1])[pos], labels, row


def sequence_logps(model, batch: Batch, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Summed completion log-prob ``[B]`` fp32 and completion token counts ``[B]``."""
    h, labels, row = completion_hidden(model, batch)
    w, b = output_layer(model)
    lp = label_logps(h, w, b, labels, chunk, logit_transform(model, batch))
    n = batch.input_ids.shape[0]
    total = torch.zeros(n, dtype=torch.float32, device=lp.device).index_add(0, row, lp)
    count = torch.zeros(n, dtype=torch.float32, device=lp.device).index_add(0, row, torch.ones_like(lp))
    return total, count
