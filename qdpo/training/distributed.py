"""Multi-process runs under ``torchrun``: process group, sharded stages, FSDP2/DDP, DCP checkpoints.

One process (no ``torchrun``, or ``WORLD_SIZE=1``): nothing is initialized and
every helper here is a pass-through, so a single-process run computes exactly
what it always did.

``torchrun --nproc-per-node N -m qdpo.train ...``:

* :func:`init` starts the process group: gloo on the CPU, nccl on CUDA with
  one GPU per local rank;
* :func:`shard_map` deals per-prompt work (greedy answers, reference
  log-probs) to the ranks and gathers the results back in order;
  :func:`on_main`/:func:`main_first` let rank 0 write an artifact while the
  others wait (and then read it);
* :func:`wrap` puts the quantized model under FSDP2 (``fully_shard`` on every
  decoder layer, then on the root) or DDP, around a :class:`Runner`;
* :func:`save_checkpoint`/:func:`load_checkpoint` write and read
  ``torch.distributed.checkpoint`` folders that any world size can load.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import sys
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from qdpo.training.config import DIST_MODES, ConfigError

log = logging.getLogger("qdpo.train")
# Rank 0 evaluates and exports alone while the others wait on a barrier: allow it hours, not the default minutes.
TIMEOUT = timedelta(hours=3)
META = "trainer.json"  # a checkpoint's step, schedule, early-stopping record and history (written by rank 0)


# ----------------------------------------------------------------------------- the process group
@dataclass(frozen=True)
class Env:
    """What torchrun sets for each process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def env() -> Env:
    """``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` from the environment; one process when absent."""
    get = os.environ.get
    return Env(int(get("RANK", 0)), int(get("WORLD_SIZE", 1)), int(get("LOCAL_RANK", 0)))


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Start the process group when torchrun launched more than one process; return this rank's device."""
    e = env()
    if device.type == "cuda" and e.world_size > 1:
        torch.cuda.set_device(e.local_rank)
        device = torch.device("cuda", e.local_rank)
    if e.world_size > 1 and not is_dist():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        log.info("rank %d of %d on %s", e.rank, e.world_size, device)
    return device


def shutdown(clean: bool = False) -> None:
    """End the process group. ``clean``: every rank got here normally, so wait for all of them first.

    Without that barrier a rank could close its connections while a peer is still receiving the last
    collective's data, and gloo then aborts the peer at exit ("terminate called without an active
    exception", seen once in a 2-process CPU run). After an error the ranks may stand at different
    collectives, so no barrier: it could pair with another rank's pending op or wait for one that died.
    """
    if not is_dist():
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()


# What a gloo collective's error says when a peer's process ended (crashed, or stopped by torchrun)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_failed(e: BaseException) -> bool:
    """Whether ``e`` is this rank's collective failing because another rank's process ended: that rank prints
    its own error, and this one's traceback (gloo's "Connection closed by peer ... remote worker crashing")
    would only bury it."""
    return is_dist() and isinstance(e, RuntimeError) and any(s in str(e) for s in PEER_GONE)


def exit_process(code: int) -> None:
    """Leave a process of a multi-process run with ``code`` without the interpreter's teardown.

    Call it after :func:`shutdown`, when every rank got past the final barrier and the process group is
    gone. The interpreter's own teardown can still abort a gloo rank at that point, while it destroys
    the process group's C++ worker threads: "terminate called without an active exception", with no
    Python frame running. That has been seen in two 2-process CPU test runs, after the run had
    finished. Everything qdpo writes is closed by then, so flush the streams and the logs and leave,
    so the launcher sees the run's real exit status.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj) -> list:
    """Every rank's ``obj``, in rank order."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the ranks (every rank must pass the same keys in the same order)."""
    if not is_dist():
        return values
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------- sharded work
def shard_map(fn, items: list, key=None) -> list:
    """``fn`` over ``items`` split across the ranks; the results gathered back in ``items``' order.

    ``fn`` takes a list and returns one result per element. The items are dealt
    to the ranks in order of ``key`` (e.g. length) so each gets a similar load.
    One process: ``fn(items)``.
    """
    if not is_dist():
        return fn(items)
    order = sorted(range(len(items)), key=lambda i: key(items[i])) if key else list(range(len(items)))
    mine = order[rank()::world_size()]
    results = list(fn([items[i] for i in mine])) if mine else []
    out = [None] * len(items)
    for idx, res in all_gather((mine, results)):
        for i, r in zip(idx, res):
            out[i] = r
    return out


def local_slice(batch: list) -> list:
    """This rank's contiguous share of a global batch (whose size is a multiple of the world size)."""
    n = len(batch) // world_size()
    return batch[rank() * n:(rank() + 1) * n]


def on_main(fn):
    """``fn()`` on rank 0 only (None elsewhere) while the others wait; an error there is raised on every rank."""
    if not is_dist():
        return fn()
    out, err = None, None
    if is_main():
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            err = e
    shared = broadcast(_portable(err))
    if err is not None:
        raise mark_from_main(err)
    if shared is not None:
        raise mark_from_main(shared)
    return out


def mark_from_main(err: BaseException, cause: BaseException | None = None) -> BaseException:
    """``err`` marked as rank 0's error that every rank raises at the same point (or, with ``cause``, marked
    when ``cause`` is): rank 0 prints it, and the ranks may end together (:func:`from_main`)."""
    if cause is None or getattr(cause, "qdpo_from_main", False):
        try:
            err.qdpo_from_main = True
        except AttributeError:  # an exception type without attributes: printed on every rank
            pass
    return err


def from_main(err: BaseException) -> bool:
    """Whether ``err`` is rank 0's error that :func:`on_main` raised on every rank."""
    return is_dist() and getattr(err, "qdpo_from_main", False)


def main_first(fn):
    """``fn()`` on rank 0 (which writes the artifact), then on the other ranks (which load it)."""
    out = on_main(fn)
    return out if is_main() else fn()


def _portable(err: Exception | None) -> Exception | None:
    try:
        pickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001 - an exception that does not pickle: send its text
        return RuntimeError(f"rank 0 failed: {type(err).__name__}: {err}")


# ----------------------------------------------------------------------------- wrapping the model
def resolve_mode(requested: str, batch_size: int, learn_scales: bool = False, latent_dtype: str = "float32") -> str:
    """``none`` for one process; ``auto`` means FSDP2 for several. Checks the batch splits evenly, and that
    FSDP2 can shard what trains: one dtype for a layer's trainable parameters, so not bf16 latent weights
    beside learned scales (which stay in their own dtype, float32)."""
    n = world_size()
    if requested not in DIST_MODES:
        raise ConfigError(f"--dist {requested!r}: use one of {DIST_MODES}")
    if n == 1:
        return "none"
    if requested == "none":
        raise ConfigError(f"--dist none cannot train with {n} processes; use --dist ddp or fsdp (or auto)")
    if batch_size % n:
        raise ConfigError(f"--batch-size {batch_size} does not split over {n} processes; use a multiple of {n}")
    mode = "fsdp" if requested == "auto" else requested
    if mode == "fsdp" and learn_scales and latent_dtype != "float32":
        raise ConfigError(f"--dist {requested} (FSDP2) cannot train --learn-scales with --latent-dtype {latent_dtype}: "
                          "FSDP2 needs one dtype for a layer's trainable parameters, and the learned scales stay "
                          "float32; use --dist ddp, or --latent-dtype float32")
    return mode


class Runner(nn.Module):
    """Calls ``fn(model)`` inside one module call: the module FSDP2 or DDP wraps as the root.

    The losses call ``model.base_model`` and read the output layer's weight
    directly (chunked log-probs), outside the model's own ``forward``. Under
    FSDP2 the root's parameters (embeddings, final norm, tied head) are
    unsharded only inside the root's forward, and DDP prepares its gradient
    reduction in its forward: running the whole loss as this module's forward
    satisfies both. Without a wrapper it is a plain call.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the classes the model lists in ``_no_split_modules``, else its longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard; use --dist ddp")
    return list(max(lists, key=len))


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """A :class:`Runner` around ``model``: plain (``none``), under DDP, or FSDP2-sharded per decoder layer."""
    runner = Runner(model)
    if mode == "ddp":
        # frozen buffers (scales, zero points) are equal on every rank: no broadcast before each forward
        return DDP(runner, broadcast_buffers=False)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        from qdpo.quant.linear import QuantLinear

        for m in model.modules():
            if isinstance(m, QuantLinear):  # the step cache would hold every layer's full ŵ; see QuantLinear
                m.step_cache, m._cache = False, None
        mesh = init_device_mesh(device.type, (world_size(),))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(runner, mesh=mesh)
    return runner


def activation_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder layer's activations in backward (transformers' per-layer checkpointing).

    Shared starts still run once (``logps.decoder_hidden``): each part's cache only reads, so a
    recomputed layer sees the keys and values it saw in the forward.
    """
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def gradient_sync(runner: nn.Module, sync: bool):
    """Context for one micro-batch: gradients are reduced across ranks only when ``sync`` (the last one)."""
    if isinstance(runner, DDP) and not sync:
        return runner.no_sync()
    if isinstance(runner, FSDPModule):
        runner.set_requires_gradient_sync(sync)
    return nullcontext()


def reshard(runner: nn.Module) -> None:
    """Free the FSDP2 groups' gathered parameters (e.g. after a no-grad forward left the root's gathered)."""
    for m in runner.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors with the whole value of each (sharded) tensor; every rank must call it (all-gathers)."""
    return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu() for n, t in state.items()}


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient norm over all ranks' shards; gradients clipped to ``max_norm`` (0 = no clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        if max_norm:
            return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        return torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item()
    total = torch.nn.utils.get_total_norm(grads).full_tensor()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total.item()


# ----------------------------------------------------------------------------- checkpoints
# a step's folder, then a save of it written but not yet renamed (newer), then the one a save of it moves aside
SUFFIXES = ("", ".tmp", ".old")
OLD = SUFFIXES[2]


def _suffix(p: Path) -> str:
    return p.suffix if p.suffix in SUFFIXES else ""


def _step(p: Path) -> int | None:
    num = p.name[5:len(p.name) - len(_suffix(p))]
    return int(num) if num.isdigit() else None


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    """Checkpoint folders by step (as numbers: past 999,999 the name has more digits than the older ones'),
    each step's in the order of ``SUFFIXES``."""
    return sorted((p for p in ckpt_dir.glob("step-*") if p.is_dir() and _step(p) is not None),
                  key=lambda p: (_step(p), SUFFIXES.index(_suffix(p))))


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first, that are complete: DCP writes ``.metadata`` last.

    A step without a complete folder counts by its save's ``.tmp`` folder where that is complete (killed
    before :func:`_publish` renamed it), else by its ``.old`` copy (a save of that step again was killed
    between moving the old one aside and putting the new one in place).
    """
    done: list[Path] = []
    for p in _step_dirs(ckpt_dir):
        if (p / ".metadata").exists() and (p / META).exists() and not (done and _step(done[-1]) == _step(p)):
            done.append(p)
    return done


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text())


def _model_state(model: nn.Module, optimizer):
    """``(trainable parameters, optimizer state)`` keyed by parameter name: sharded DTensors under FSDP2."""
    msd, osd = get_state_dict(model, optimizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in msd.items() if k in trainable}, osd


def save_checkpoint(folder: Path, model: nn.Module, optimizer, tensors: dict, meta: dict, keep: int = 2,
                    unloadable=frozenset()) -> None:
    """Write the trainable weights, optimizer state, ``tensors`` and ``meta`` as the DCP folder ``folder``.

    Every rank writes its shards into ``<folder>.tmp``; rank 0 then renames it
    to ``folder`` (replacing an older one of that step) and keeps the newest
    ``keep`` checkpoints, not counting those in ``unloadable`` (see
    :func:`_prune`). A failed or killed save leaves the previous
    checkpoints as they were (one killed once DCP wrote it all counts, as
    its ``.tmp`` folder). Raises ``OSError`` when the save fails.
    """
    tmp = folder.with_name(folder.name + ".tmp")
    on_main(lambda: _fresh(tmp, meta))
    weights, optim = _model_state(model, optimizer)
    try:
        with _quiet_single_process():
            dcp.save({"model": weights, "optimizer": optim, **tensors}, checkpoint_id=str(tmp), no_dist=not is_dist())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(e) from None
    if is_main():
        _publish(tmp, folder)
        _prune(folder.parent, keep, unloadable)
    barrier()


def load_checkpoint(folder: Path, model: nn.Module, optimizer, tensors: dict) -> dict:
    """Load ``folder`` into the (wrapped) model, the optimizer and ``tensors`` (templates, filled in place).

    Works for any world size: DCP reshards what was saved into this run's layout.
    Returns the checkpoint's meta.
    """
    weights, optim = _model_state(model, optimizer)
    state = {"model": weights, "optimizer": optim, **tensors}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(folder), no_dist=not is_dist())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))
    tensors.update({k: state[k] for k in tensors})
    return read_meta(folder)


def _fresh(tmp: Path, meta: dict) -> None:
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a save that died
    tmp.mkdir(parents=True)
    (tmp / META).write_text(json.dumps(meta))


def _publish(tmp: Path, folder: Path) -> None:
    """Move the written ``tmp`` to ``folder``; one of that step already there stays, as ``<folder>.old``,
    until the new one is in place (a directory cannot be replaced by a rename)."""
    old = folder.with_name(folder.name + OLD)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)  # a leftover of an earlier save of this step: folder is newer
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _prune(ckpt_dir: Path, keep: int, unloadable=frozenset()) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and leftovers of failed saves.

    ``unloadable``: checkpoints this run failed to load (it started from an older one, or from scratch). They
    count for nothing, so newer ones of them never push out the run's own; they stay while newer than all kept.
    """
    complete = complete_checkpoints(ckpt_dir)
    kept = [p for p in complete if p not in unloadable][-keep:]
    newest = _step(kept[-1]) if kept else -1
    for p in ckpt_dir.glob("step-*"):
        if p not in kept and not (p in unloadable and p in complete and _step(p) > newest):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def _quiet_single_process():
    with warnings.catch_warnings():  # one process is meant: DCP warns that it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def failure_reason(e: BaseException) -> str:
    """``Type: first line`` of what went wrong: for a DCP ``CheckpointException`` (whose own first line only
    lists the ranks that failed), the first rank's error. The type is kept: a ``KeyError``'s text is its key alone."""
    failures = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    err = failures[0] if failures else e
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _os_error(e: BaseException) -> OSError:
    """The ``OSError`` behind a failed DCP save (a rank's failure is wrapped in a CheckpointException)."""
    failures = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    for err in [e, *failures]:
        if isinstance(err, OSError):
            return err
    return OSError(str(failures[0] if failures else e))
