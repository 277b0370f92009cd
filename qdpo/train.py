"""``python -m qdpo.train``: quantize a chat model and train it to answer like its FP original.

Runs, each stage writing its artifact into ``--output-dir`` (see
``qdpo/training/stages.py``): load model and prompts → FP greedy answers →
initial quantization (RTN or AWQ) → the quantized model's answers → pairs
(chosen = FP, rejected = quantized) with reference log-probs → training
(QDPO, and/or the KD and SFT baselines) with early stopping on the validation
split → evaluation against the FP model on the test split → export of the
packed model (reloaded and checked) → ``metrics.json``, ``report.md``, plots.

Examples::

    python -m qdpo.train                                   # embedded SmolLM2, W4 g64, QDPO
    python -m qdpo.train --method all --output-dir runs/all # QDPO, KD and SFT side by side
    python -m qdpo.train --model path/to/hf-model --prompts my.jsonl --bits 8 --group-size 128
    python -m qdpo.train --output-dir runs/default --resume   # continue an interrupted run
    torchrun --nproc-per-node 8 -m qdpo.train --model path/to/7b  # FSDP2 over 8 GPUs (README: Multi-GPU)

Under ``torchrun`` every rank runs this pipeline: generation and reference
log-probs are split by prompt, training is sharded (``--dist``), and rank 0
alone evaluates, exports and writes the reports while the others wait.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from qdpo.eval.judge import JudgeError
from qdpo.training import distributed as D
from qdpo.training.config import ConfigError, TrainConfig, parse_args
from qdpo.training.data import fit
from qdpo.training.prompts import PromptError, load_prompt_set, read_prompts, split
from qdpo.training.stages import ArtifactError
from qdpo.training.trainer import CheckpointError, Example, Trainer, compute_dtype, needs_fp

log = logging.getLogger("qdpo.train")
RUN_FILE = "run.json"
# Written first by --overwrite and removed last: a directory it was emptying when killed still says so.
OVERWRITING = ".overwriting"
# Fields that do not change what a run computes (so --resume accepts a change in them). The batch sizes of
# generation and of each forward and the output layer's chunk bound memory: a run that ran out of it resumes with
# smaller ones (float rounding apart, as with another number of processes).
NON_RESULT_FIELDS = ("output_dir", "resume", "overwrite", "log_every", "device", "export", "checkpoint_every",
                     "method", "dist", "activation_checkpointing", "judge_url", "judge_model", "judge_key_env",
                     "gen_batch_size", "micro_batch_size", "logps_chunk")


class RunDirError(ValueError):
    """The output directory cannot be used as asked: printed without a traceback."""


USER_ERRORS = (ConfigError, PromptError, RunDirError, CheckpointError, FileNotFoundError, ModuleNotFoundError,
               JudgeError, ArtifactError)


# ----------------------------------------------------------------------------- run directory
# The prompt files' contents: a file edited under the same path is another run (its answers and pairs would be
# reused for prompts they were not made for). Compared only when the run.json holds them.
CONTENT_FIELDS = {"prompts_sha256": "--prompts", "eval_prompts_sha256": "--eval-prompts", "model_files": "--model",
                  "init_files": "--init"}


# Input paths: compared as the files they name (absolute in run.json), so --resume from another directory with
# paths written relative to it is the same run. A prompt file's content, not its path, decides (its SHA-256).
PATH_FIELDS = ("model", "prompts", "eval_prompts", "init")
NOT_PATHS = ("", "default", "rtn", "awq")  # the embedded model and prompts, the --init methods


def _fingerprint(cfg: TrainConfig) -> dict:
    from qdpo.training.prompts import default_prompts_path

    fp = {k: v for k, v in cfg.to_dict().items() if k not in NON_RESULT_FIELDS}
    fp.update({k: _absolute(fp[k]) for k in PATH_FIELDS})
    files = {"prompts_sha256": default_prompts_path() if cfg.prompts in ("", "default") else cfg.prompts,
             "eval_prompts_sha256": cfg.eval_prompts}
    return {**fp, **{key: _sha256(path) for key, path in files.items()}, "model_files": _model_files(cfg.model),
            "init_files": _model_files(cfg.init) if cfg.init not in ("rtn", "awq") else None,
            # --device may change, but not what --dtype makes of it (auto: bf16 autocast on a GPU, fp32 on the CPU)
            "compute_dtype": compute_dtype(cfg.dtype, _device(cfg).type)}


def _absolute(path: str) -> str:
    return path if path in NOT_PATHS else str(Path(path).expanduser().resolve())


def _differs(key: str, old: dict, new: dict) -> bool:
    """Whether fingerprint entry ``key`` tells another run (an entry the old run.json lacks: only a new setting)."""
    a, b = old.get(key), new.get(key)
    if key in ("dtype", "compute_dtype"):  # the dtype resolved on the device decides; an older run.json: as given
        return a != b and (key == "compute_dtype") == ("compute_dtype" in old)
    if key in CONTENT_FIELDS:
        return key in old and a != b
    if key in ("prompts", "eval_prompts") and old.get(f"{key}_sha256") is not None:
        return False  # the same content under another path is the same prompts
    if key in PATH_FIELDS and isinstance(a, str) and isinstance(b, str):  # an older run.json: paths as given
        return _absolute(a) != b if a not in NOT_PATHS else a != b
    return a != b


def _model_files(model: str) -> str | None:
    """A digest of the model (or --init checkpoint) at ``model`` that changes when another is put there: its config.json's
    bytes and its weight files' names and sizes (hashing the weights would read gigabytes). None for the
    embedded default or a path that cannot be read (loading the model reports why)."""
    p = Path(model).expanduser() if model and model != "default" else None
    try:
        if p is None or not p.exists():
            return None
        if p.is_file():  # a .gguf
            return hashlib.sha256(f"{p.name}:{p.stat().st_size}".encode()).hexdigest()
        h = hashlib.sha256((p / "config.json").read_bytes() if (p / "config.json").is_file() else b"")
        for f in sorted(p.glob("*.safetensors")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        return h.hexdigest()
    except OSError:
        return None


def _sha256(path) -> str | None:
    """The file's SHA-256; None for no file or one that cannot be read (reading the prompts reports why)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    except OSError:
        return None


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create, reuse (``--resume``) or replace (``--overwrite``) the run directory."""
    out = Path(cfg.output_dir)
    try:
        return _prepare_run_dir(cfg, out)
    except OSError as e:  # a file, a path under a file, no permission: nothing was written
        raise RunDirError(f"--output-dir {out} cannot be used as a run directory ({e.strerror or e}); choose a "
                          "directory you can write to") from None


def _check_inputs_outside(cfg: TrainConfig, out: Path) -> None:
    """--overwrite deletes ``out``: refuse while an input of this run (the model, a prompt file, an --init
    checkpoint, e.g. an export of the run being replaced, the --config file) lies inside it."""
    inputs = {"--model": "" if cfg.model == "default" else cfg.model,
              "--prompts": "" if cfg.prompts in ("", "default") else cfg.prompts, "--eval-prompts": cfg.eval_prompts,
              "--init": "" if cfg.init in ("rtn", "awq") else cfg.init, "--config": getattr(cfg, "config_file", "")}
    root = out.resolve()
    for flag, path in inputs.items():
        if path and root in (Path(path).expanduser().resolve(), *Path(path).expanduser().resolve().parents):
            raise RunDirError(f"--overwrite would delete {flag} {path}, which lies inside --output-dir {out}; move "
                              "it out first, or use another --output-dir")


def _old_fingerprint(run_file: Path) -> dict:
    try:
        old = json.loads(run_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(f"{run_file} is damaged ({e}); use another --output-dir, or --overwrite to start "
                          "again") from None
    return old.get("fingerprint", {}) if isinstance(old, dict) else {}


def _shown_config(cfg: TrainConfig) -> dict:
    """The configuration as run.json and metrics.json record it: no credentials from ``--judge-url``."""
    from qdpo.eval.judge import shown

    return {**cfg.to_dict(), "judge_url": shown(cfg.judge_url)}


def _dtype_change(old: str, new: str) -> str:
    how = "--dtype float32" if old == "float32" else "a GPU (--device cuda) with --dtype auto or bfloat16"
    return f"the compute dtype ({old!r} there, {new!r} now on this device; {how} continues it)"


def _prepare_run_dir(cfg: TrainConfig, out: Path) -> Path:
    run_file = out / RUN_FILE
    # only run.json: a run that stopped before its first artifact (a user error in --model or --prompts, say, or a
    # kill while run.json was written: its temporary file); nothing to keep, so the corrected command starts afresh
    # instead of being refused as another run
    if out.exists() and any(p.name not in (RUN_FILE, OVERWRITING, f".{RUN_FILE}.tmp") for p in out.iterdir()):
        if not run_file.exists():
            raise RunDirError(f"--output-dir {out} is not empty and holds no qdpo run; choose another directory")
        _lock(out)  # before --overwrite deletes anything
        if cfg.overwrite:
            _check_inputs_outside(cfg, out)
            _empty_run_dir(out)
        elif (out / OVERWRITING).exists():
            raise RunDirError(f"--output-dir {out} holds a run that --overwrite was deleting when it stopped; pass "
                              "--overwrite to finish replacing it, or use another --output-dir")
        elif not cfg.resume:
            raise RunDirError(f"--output-dir {out} already holds a run; pass --resume to continue it or "
                              "--overwrite to start again")
        else:
            old, new = _old_fingerprint(run_file), _fingerprint(cfg)
            keys = sorted(k for k in set(old) | set(new) if _differs(k, old, new))
            # a flag's values, so that a --resume which left out one of the run's flags says what to pass
            diff = [f"the content of {CONTENT_FIELDS[k]}" if k in CONTENT_FIELDS else
                    _dtype_change(old[k], new[k]) if k == "compute_dtype" else
                    f"{k} ({old.get(k)!r} there, {new.get(k)!r} now)" for k in keys]
            if diff:
                again = "" if all(k in CONTENT_FIELDS for k in keys) else "pass the run's values to continue it, "
                raise RunDirError(f"--output-dir {out} holds a different run (differs in {', '.join(diff)}); "
                                  f"{again}use another --output-dir, or --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    _lock(out)
    from qdpo.training.stages import atomic_write_text

    record = {"fingerprint": _fingerprint(cfg), "config": _shown_config(cfg)}
    atomic_write_text(run_file, json.dumps(record, indent=1))
    (out / OVERWRITING).unlink(missing_ok=True)  # after the new run.json: the old run is gone
    return out


_held_lock: dict = {}  # the run directory this process works in: {"path": resolved path, "fd": its open fd}


def _lock(out: Path) -> None:
    """Hold an exclusive lock on the directory ``out`` itself (no file is added) during this call: two
    calls in one run directory at once (``--method qdpo`` and ``--method kd`` side by side) would write the same
    artifacts' temporary files and each its own metrics.json, one call's results lost. Released when
    :func:`main` returns (:func:`_unlock`), or by the process's next call."""
    import fcntl

    path = out.resolve()
    if _held_lock.get("path") == path:
        return
    _unlock()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(f"--output-dir {out} is in use by another python -m qdpo.train running there; wait for it "
                          "to finish (then --resume, with another --method if you like), or use another "
                          "--output-dir") from None
    except OSError:  # no lock on a directory here (NFS locks writable files only): the run goes on unguarded
        os.close(fd)
        log.debug("cannot lock %s; a second call there at once would not be refused", out)
        return
    _held_lock.update(path=path, fd=fd)


def _unlock() -> None:
    if _held_lock:
        os.close(_held_lock.pop("fd"))
        _held_lock.clear()


def _empty_run_dir(out: Path) -> None:
    """Delete the run in ``out`` for --overwrite, in an order that a kill at any point leaves recognisable: the
    marker first, then every artifact, keeping run.json (replaced by the new run's), so the same command run
    again finishes the job. Only entries of ``out`` are removed (a link in it, not what it points to)."""
    (out / OVERWRITING).touch()
    for p in out.iterdir():
        if p.name in (RUN_FILE, OVERWRITING):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ----------------------------------------------------------------------------- timing
class Stages:
    """Wall time and peak memory per stage, for metrics.json."""

    def __init__(self) -> None:
        self.timing: dict[str, dict] = {}

    def __call__(self, name: str):
        stages = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()
                log.info("stage: %s", name)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()

            def __exit__(self, *exc):
                rec = {"seconds": round(time.perf_counter() - self.t0, 2),
                       "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
                if torch.cuda.is_available():
                    rec["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                stages.timing[name] = rec

        return _Stage()


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available; use --device cpu")
    return torch.device(cfg.device)


def _load(cfg: TrainConfig, device):
    from qdpo.loading import load_model

    try:
        return load_model(cfg.model, device=device, trust_remote_code=cfg.trust_remote_code)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--model {cfg.model}: {e}") from None


def _prompt_sets(cfg: TrainConfig):
    prompts = load_prompt_set(cfg.prompts, cfg.seed)
    train = split(prompts, "train", cfg.max_train_prompts)
    val = split(prompts, "validation", cfg.max_eval_prompts)
    test = split(prompts, "test", cfg.max_eval_prompts)
    if cfg.eval_prompts:
        test = read_prompts(cfg.eval_prompts, "--eval-prompts")[: cfg.max_eval_prompts or None]
        taken = {p.id for p in train + val}  # the answers and hidden states of every prompt are keyed by id
        for p in test:
            if f"eval:{p.id}" in taken:
                raise PromptError(f"--eval-prompts {cfg.eval_prompts}: the prompt {p.id!r} is known in the run as "
                                  f"'eval:{p.id}', the id of a --prompts prompt in {cfg.prompts}; rename one of "
                                  "the two")
            p.id, p.split = f"eval:{p.id}", "test"
    if not train:
        raise PromptError(f"the prompt set {cfg.prompts} has no training prompts")
    known = {json.dumps(p.messages, sort_keys=True): p.id for p in train}
    for name, ps in (("validation", val), ("test", test)):  # the same messages under another id or split
        seen = [(p.id, known[k]) for p in ps if (k := json.dumps(p.messages, sort_keys=True)) in known]
        if seen:
            log.warning("%d of the %d %s prompts are also training prompts (first: %r = %r): their metrics are not "
                        "held out", len(seen), len(ps), name, *seen[0])
    if not test:
        raise PromptError(f"the prompt set {cfg.prompts} has no test prompts; add a 'test' split or --eval-prompts")
    return train, val, test


# ----------------------------------------------------------------------------- the pipeline
def run(cfg: TrainConfig) -> dict:
    from qdpo.eval import metrics as M
    from qdpo.training import stages as S

    device = D.init(_device(cfg))
    if cfg.judge_url:  # an unusable judge fails now, not after training; on rank 0, its error on every rank
        from qdpo.eval.judge import check

        D.on_main(lambda: check(cfg.judge_url, cfg.judge_model, cfg.judge_key_env))
    # fails now, not after generation; the same on every rank: rank 0's error, printed once
    D.on_main(lambda: D.resolve_mode(cfg.dist, cfg.batch_size, cfg.learn_scales, cfg.latent_dtype))
    D.on_main(lambda: prepare_run_dir(cfg))
    out = Path(cfg.output_dir)
    stage = Stages()
    torch.manual_seed(cfg.seed)
    with stage("load"):
        fp_model, tok = _load(cfg, device)
        train_p, val_p, test_p = _prompt_sets(cfg)
        all_p, all_ids, dropped = S.tokenize_prompts(tok, train_p + val_p + test_p, cfg.max_length)
        ids = {p.id: t for p, t in zip(all_p, all_ids)}
        _check_vocab(fp_model, tok, ids)
        keep = set(ids)
        train_p, val_p, test_p = ([p for p in ps if p.id in keep] for ps in (train_p, val_p, test_p))
        if not train_p or not test_p:
            raise PromptError(f"every training or test prompt is longer than --max-length {cfg.max_length}")
        _check_positions(fp_model, ids, cfg.max_new_tokens)
        exclude = S.excluded_layers(fp_model, cfg.exclude_patterns())  # a pattern that matches nothing fails now
        _check_quantizable(fp_model, cfg, exclude)  # so do a group size that does not divide a layer, NaN weights
        _check_logits(fp_model, cfg, ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    q0 = None
    if cfg.init not in ("rtn", "awq"):  # read first: a checkpoint that does not fit --model fails before any artifact
        with stage("quantize"):
            q0, init_stats = _initial(fp_model, cfg, None, out)
    with stage("fp_answers"):
        hidden_path = out / "answers" / "fp_hidden.safetensors"  # FP targets of KD and evaluation, from decoding
        fp = S.answers(out / "answers" / "fp.jsonl", fp_model, tok, all_p, all_ids, cfg, "FP answers",
                       hidden_path=hidden_path)
        fp_hidden = S.load_hidden(hidden_path, fp)  # None: the FP model runs where they are needed
    if q0 is None:
        with stage("quantize"):
            calib = [ids[p.id] + fp[p.id] for p in train_p]  # AWQ's calibration: prompts and FP answers
            q0, init_stats = _initial(fp_model, cfg, calib, out)
    init_stats = {**init_stats, "weights": _coverage(q0)}
    with stage("initial_answers"):
        tt = train_p + test_p
        q_ans, q_logps = S.answers(out / "answers" / "initial.jsonl", q0, tok, tt, [ids[p.id] for p in tt], cfg,
                                   "quantized answers", with_logps=True)
    with stage("pairs"):
        pairs, pair_stats = S.build_pairs(out / "pairs.jsonl", train_p, ids, fp, q_ans, q0, tok, cfg, pad, q_logps)
    test_ex = [(ids[p.id], fp[p.id]) for p in test_p]
    val_ex = [(ids[p.id], fp[p.id]) for p in val_p]
    if cfg.eval_every and not val_ex:
        log.warning("no validation prompts: training keeps its last step's weights (no early stopping); give some "
                    "prompts the split 'validation'")
    evals, curves, histories, summaries = {}, {}, {}, {}
    texts = {"fp": [fp[p.id] for p in test_p], "initial": [q_ans[p.id] for p in test_p]}  # greedy answers (ids)
    ev = dict(batch_size=cfg.micro_batch_size * 2, chunk=cfg.logps_chunk, fp_cache={},  # FP runs once on test
              fp_hidden=_per_example(fp_hidden, test_p))
    with stage("eval_start"):
        val = (val_ex, M.fp_targets(fp_model, val_ex, ev["batch_size"], ev["chunk"], disable=True,
                                    fp_hidden=_per_example(fp_hidden, val_p))) if val_ex else None
        if D.is_main():
            for name, model, answers in (("fp", fp_model, fp), ("initial", q0, q_ans)):
                evals[name], curves[name] = _evaluate(fp_model, model, tok, test_ex, [answers[p.id] for p in test_p],
                                                      ev)
    if device.type == "cuda":
        q0.to("cpu")  # from here on only the template of each method's copy: off the GPU
    for method in cfg.methods():
        model = copy.deepcopy(q0).to(device)
        examples = _examples(method, pairs, train_p, ids, fp, cfg.window, cfg.max_length)
        with stage(f"train_{method}"):
            if not examples:  # every pair identical: nothing to prefer
                log.warning("%s: no training pairs (the quantized model already answers every training prompt "
                            "like the FP model); evaluating the initial model unchanged", method)
                summaries[method] = {"steps_run": 0, "best_step": 0, "skipped": "no differing pairs"}
            else:
                with _parked(device, None if needs_fp(method, cfg) else fp_model):
                    trainer = Trainer(model, cfg, method, examples, out / f"train_{method}", fp_model=fp_model,
                                      val=val, pad_id=pad, teacher=_teacher(method, cfg, examples, pairs, train_p,
                                                                            fp_hidden))
                    summaries[method] = trainer.run(resume=cfg.resume)
                    histories[method] = trainer.history
                    model = trainer.final_model(q0)  # FSDP2: gathered into a plain copy on rank 0
                    del trainer
        if not D.is_main():  # rank 0 evaluates and exports alone
            D.barrier()
            continue
        with stage(f"eval_{method}"):
            answers = S.greedy(model, tok, [ids[p.id] for p in test_p], cfg.max_new_tokens, cfg.gen_batch_size,
                               desc=f"{method} answers")
            evals[method], curves[method] = _evaluate(fp_model, model, tok, test_ex, answers, ev)
            texts[method] = answers
            S.write_jsonl(out / "answers" / f"{method}.jsonl",
                          [{"id": p.id, "answer": tok.decode(a, skip_special_tokens=True), "answer_ids": a}
                           for p, a in zip(test_p, answers)])
        if cfg.export:
            with stage(f"export_{method}"):
                summaries[method]["export"] = _export(model, tok, out / f"export_{method}", fp_model, test_ex,
                                                      evals[method], ev)
        D.barrier()
    if not D.is_main():
        return {"report": None, "metrics": None}
    judge = None
    if cfg.resume:  # the methods an earlier call trained here (--method kd after --method qdpo) stay in the report
        judge = _keep_earlier_methods(out, cfg, evals, summaries, stage.timing, texts, test_p)
    if cfg.judge_url:
        with stage("judge"):
            judge = _judge(cfg, tok, test_p, texts, evals)
    return _finish(cfg, out, evals, curves, histories, summaries, pair_stats, init_stats, stage, dropped, judge)


def _keep_earlier_methods(out: Path, cfg: TrainConfig, evals: dict, summaries: dict, timing: dict, texts: dict,
                          test_p) -> dict | None:
    """Add what the run directory's metrics.json holds from earlier calls. The methods this call did not train:
    their evaluation, training summary (marked ``earlier_call``), stage timings and test answers. With --no-export,
    the export record of a method an earlier call exported (its export directory still there). Without
    --judge-url, the earlier judge's scores of the answers that are unchanged: returned as the ``judge`` record,
    or None. --resume accepted the directory, so that metrics.json is this run's: the same model, prompts and
    recipe (a method trained again resumes to the weights that were exported)."""
    from qdpo.training.config import METHODS
    from qdpo.training.stages import read_artifact

    path = out / "metrics.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as e:
        log.warning("%s cannot be read (%s): the report holds only the methods of this call", path, e)
        return None
    old_eval, old_training = old.get("eval") or {}, old.get("training") or {}
    if not cfg.export:
        for m in (m for m in summaries if isinstance((old_training.get(m) or {}).get("export"), dict)):
            if "export" not in summaries[m] and (out / f"export_{m}").is_dir():
                summaries[m]["export"] = {**old_training[m]["export"], "path": str(out / f"export_{m}"),
                                          "earlier_call": True}
    earlier = [m for m in METHODS if m not in evals and m in old_eval and m in old_training]
    if earlier:
        log.info("keeping the results of %s from an earlier call in this run directory", ", ".join(earlier))
    for m in earlier:  # a judge score only for the answers it rated (below)
        evals[m] = {k: v for k, v in old_eval[m].items() if k != "judge_score"}
        summaries[m] = {**old_training[m], "earlier_call": True}
        timing.update({k: v for k, v in (old.get("timing") or {}).items() if k.endswith(f"_{m}")})
        answers = out / "answers" / f"{m}.jsonl"
        if answers.exists():
            try:  # after the training and evaluation of this call: a damaged file only goes unrated
                rows = {r["id"]: r["answer_ids"] for r in read_artifact(answers, ("id", "answer_ids"))}
            except ArtifactError as e:
                log.warning("%s's answers are not rated: %s", m, e)
                continue
            if all(p.id in rows for p in test_p):
                texts[m] = [rows[p.id] for p in test_p]
    order = [*(k for k in evals if k not in METHODS), *(m for m in METHODS if m in evals)]
    for d in (evals, summaries):  # the methods in their usual order, wherever each was trained
        items = dict(d)
        d.clear()
        d.update({k: items[k] for k in order if k in items})
    return None if cfg.judge_url else _earlier_judge(old, evals, texts)


def _earlier_judge(old: dict, evals: dict, texts: dict) -> dict | None:
    """The judge record of ``old`` metrics for the models whose test answers ``texts`` are the ones it rated (its
    ``answers_sha256``), their ``judge_score`` put back into ``evals``; None when it rated none of them."""
    judge, old_eval = old.get("judge"), old.get("eval") or {}
    if not isinstance(judge, dict):
        return None
    kept = {name: rec for name, rec in judge.items() if isinstance(rec, dict) and name in evals and name in texts
            and rec.get("answers_sha256") == _answers_digest(texts[name])}
    if not kept:
        return None
    dropped = [name for name, rec in judge.items() if isinstance(rec, dict) and name not in kept]
    if dropped:
        log.warning("the earlier judge scores of %s are dropped: their answers changed (add --judge-url to rate "
                    "them)", ", ".join(dropped))
    for name in kept:
        evals[name]["judge_score"] = (old_eval.get(name) or {}).get("judge_score")
    return {k: v for k, v in judge.items() if not isinstance(v, dict)} | kept


def _answers_digest(answers: list[list[int]]) -> str:
    """What identifies the greedy answers a judge rated: a SHA-256 of their token ids."""
    return hashlib.sha256(json.dumps(answers).encode()).hexdigest()


def judge_question(messages: list[dict]) -> str:
    """The conversation the judge sees before the answer: a lone user turn as is; else every turn, the system
    prompt included (its instructions are part of what the answer should follow), one ``Role: text`` line each."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _judge(cfg: TrainConfig, tok, test_p, texts: dict, evals: dict) -> dict:
    """LLM-judge ratings of every evaluated model's greedy test answers (``qdpo.eval.judge``)."""
    from qdpo.eval.judge import judge_answers, shown

    answers = {name: [tok.decode(a, skip_special_tokens=True) for a in ids] for name, ids in texts.items()}
    questions = [judge_question(p.messages) for p in test_p]
    scores = judge_answers(cfg.judge_url, cfg.judge_model, cfg.judge_key_env, questions, answers)
    for name, rec in scores.items():
        evals[name]["judge_score"] = rec["judge_score"]
    unrated = sum(r["unrated"] for r in scores.values())
    if unrated:
        log.warning("the judge rated no score for %d answer(s); they are left out of the means", unrated)
    return {"url": shown(cfg.judge_url), "model": cfg.judge_model, "scale": "1-10, single-answer grading",
            **{name: {**{k: v for k, v in r.items() if k != "judge_score"},
                      "answers_sha256": _answers_digest(texts[name])} for name, r in scores.items()}}


@contextmanager
def _parked(device: torch.device, *models):
    """On a GPU, hold ``models`` (those training does not use) in CPU memory meanwhile."""
    parked = [m for m in models if m is not None] if device.type == "cuda" else []
    for m in parked:
        m.to("cpu")
    try:
        yield
    finally:
        for m in parked:
            m.to(device)


def _check_vocab(model, tok, ids: dict[str, list[int]]) -> None:
    """Token ids past the model's embedding (a tokenizer with tokens the model was never resized for)
    would fail deep inside the first forward: one clear error now."""
    rows = model.get_input_embeddings().num_embeddings
    for pid, t in ids.items():
        if t and max(t) >= rows:
            raise ConfigError(f"prompt {pid!r} has token id {max(t)}, but {_model_name(model)} has {rows} embedding rows: "
                              f"the tokenizer ({len(tok)} tokens) does not match the model; resize the model's "
                              "embeddings (model.resize_token_embeddings(len(tokenizer))) and save it, or use the "
                              "model's own tokenizer")


def _check_positions(model, ids: dict[str, list[int]], max_new_tokens: int) -> None:
    """A model with a learned position table (GPT-2's ``wpe``, OPT's ``embed_positions``) has no position past
    it: a prompt plus its answer longer than that would fail deep inside generation. One clear error now."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    emb = model.get_input_embeddings()
    if not isinstance(limit, int) or not any(
            isinstance(m, torch.nn.Embedding) and m is not emb and m.num_embeddings - getattr(m, "offset", 0) == limit
            for m in model.modules()):
        return  # rotary or ALiBi positions: longer sequences run
    pid, t = max(ids.items(), key=lambda kv: len(kv[1]))
    if len(t) + max_new_tokens > limit:
        raise ConfigError(f"prompt {pid!r} ({len(t)} tokens) and an answer of --max-new-tokens {max_new_tokens} "
                          f"need {len(t) + max_new_tokens} positions, but {_model_name(model)} has {limit} (a learned "
                          f"position table); lower --max-new-tokens, or drop the longer prompts with --max-length "
                          f"{limit - max_new_tokens + 1}")


def _check_logits(model, cfg: TrainConfig, ids: dict[str, list[int]]) -> None:
    """The model's logit scale and soft-capping (``logps.logit_transform``), found now: a model whose logits are
    some other function of its output layer is refused before the first artifact, not after generation."""
    from qdpo.training.logps import logit_transform

    t = next(t for t in ids.values() if t)
    try:
        logit_transform(model, t)
    except ValueError as e:
        raise ConfigError(f"--model {cfg.model}: {e}") from None


def _model_name(model) -> str:
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


def _coverage(model) -> dict:
    """The quantized share of the model's weights (metrics.json "init", the report), logged; a loud line
    when a large share stays in full precision (a mixture of experts' fused expert tensors)."""
    from qdpo.quant.model import weight_coverage

    c = weight_coverage(model)
    experts = f" and {c['quantized_expert_tensors']} fused expert tensors" if c["quantized_expert_tensors"] else ""
    log.info("quantized %d linear layers%s: %.1f %% of the weight matrices (full precision: embeddings %s, "
             "other %s weights)", c["quantized_layers"], experts, 100 * c["quantized_fraction"],
             f"{c['embedding_weights']:,}", f"{c['other_fp_weights']:,}")  # grouped, as the report writes them
    excluded = c["fp_excluded_expert_tensors"]
    unknown = [n for n in c["fp_fused_expert_tensors"] if n not in excluded]
    if excluded:
        log.info("%d expert tensors kept in full precision (--exclude, or the --init checkpoint)", len(excluded))
    if unknown:
        log.warning("%d 3-D parameters stay in full precision (not the expert tensors of a transformers experts "
                    "module): the evaluation measures a model where they are not quantized", len(unknown))
    return c


def _initial(fp_model, cfg: TrainConfig, calib, out: Path):
    """The initial quantized model: RTN/AWQ (cached in ``initial/``) or read from ``--init PATH``."""
    from qdpo.training import stages as S

    if cfg.init not in ("rtn", "awq"):
        from qdpo.quant import QuantSpec
        from qdpo.quant.importers import quantize_initial_from

        try:
            return quantize_initial_from(cfg.init, fp_model, spec=QuantSpec(cfg.bits, cfg.group_size, cfg.symmetric))
        except ValueError as e:
            raise ConfigError(f"--init {cfg.init}: {e}") from None

    def quantize():
        try:
            return S.quantize_initial(fp_model, cfg, calib, out / "initial")
        except ValueError as e:  # a layer AWQ refuses
            raise _cannot_quantize(cfg, e) from None

    return D.main_first(quantize)  # rank 0 quantizes and writes initial/; the others load it


def _check_quantizable(fp_model, cfg: TrainConfig, exclude) -> None:
    """--bits/--group-size against the layers RTN or AWQ will quantize, and their weights (a checkpoint given to
    --init brings its own spec and weights, checked when it is read), before the FP answers are written: the
    corrected command then starts afresh instead of finding a run (and a broken model's answers) there."""
    if cfg.init not in ("rtn", "awq"):
        return
    from qdpo.quant import QuantSpec
    from qdpo.quant.model import check_quantizable

    try:
        check_quantizable(fp_model, QuantSpec(cfg.bits, cfg.group_size, cfg.symmetric), exclude)
    except ValueError as e:
        raise _cannot_quantize(cfg, e) from None


def _cannot_quantize(cfg: TrainConfig, e: ValueError) -> ConfigError:
    return ConfigError(f"cannot quantize {cfg.model} with --bits {cfg.bits} --group-size {cfg.group_size}: {e}")


def _examples(method: str, pairs: list[dict], train_p, ids, fp, window: int = 0, max_length: int = 0) -> list[Example]:
    """Training examples of ``method``: QDPO's pairs (already cut to ``--max-length``), or the FP answers cut to
    ``max_length`` (0: whole) like the pairs (every prompt here leaves room for an answer)."""
    if method == "qdpo":
        pre = f"window{window}_" if window else ""
        return [Example(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], r[f"{pre}ref_chosen_logps"],
                        r[f"{pre}ref_rejected_logps"]).windowed(window) for r in pairs]
    return [Example(*(fit(ids[p.id], fp[p.id], max_length) if max_length else (ids[p.id], fp[p.id])))
            for p in train_p]


def _per_example(fp_hidden: dict | None, prompts) -> list | None:
    return None if fp_hidden is None else [fp_hidden[p.id] for p in prompts]


def _teacher(method: str, cfg: TrainConfig, examples: list[Example], pairs: list[dict], train_p, fp_hidden):
    """The KD teacher's cache, filled with the FP hidden states kept while decoding (no FP forward in training)."""
    if fp_hidden is None or not needs_fp(method, cfg):
        return None
    from qdpo.training.trainer import TeacherCache

    teacher = TeacherCache()
    ids = [r["id"] for r in pairs] if method == "qdpo" else [p.id for p in train_p]  # _examples' order
    for pid, e in zip(ids, examples):  # a chosen answer cut by --max-length or --window is a prefix
        teacher.add(e.prompt_ids, e.chosen_ids, fp_hidden[pid][: len(e.chosen_ids)])
    return teacher


def _evaluate(fp_model, model, tok, test_ex, answers, ev) -> tuple[dict, tuple]:
    from qdpo.eval import metrics as M

    tf = M.teacher_forced(fp_model, model, test_ex, **ev)
    known = tf["nll"] if model is fp_model else None  # the FP model judging its own answers
    gen = M.generation_metrics(fp_model, test_ex, answers, tok, ev["batch_size"], ev["chunk"], fp_nll=known)
    curve = (tf.pop("margins"), tf.pop("flipped"))
    return {**tf, **gen}, curve


def _export(model, tok, path: Path, fp_model, test_ex, evaluated: dict, ev) -> dict:
    """Save packed and as compressed-tensors; check both reload and reproduce the evaluation.

    The packed reload must give the evaluated flip rate and KL on the test split
    (only the quantized model runs: the FP side is cached). The compressed-tensors
    checkpoint is loaded by ``transformers`` itself and its logits compared with
    the trained model's on a few test examples.
    """
    from qdpo.eval import metrics as M
    from qdpo.quant import load_quantized, save_quantized

    save_quantized(model, path, tokenizer=tok)
    device = next(model.parameters()).device
    reloaded = load_quantized(path, device=device)
    tf = M.teacher_forced(fp_model, reloaded, test_ex, **ev, disable=True)
    ok = abs(tf["flip_rate"] - evaluated["flip_rate"]) < 1e-6 and abs(tf["kl"] - evaluated["kl"]) < 1e-4
    if not ok:
        log.error("exported model at %s does not reproduce the evaluation (flip %.6f vs %.6f)", path,
                  tf["flip_rate"], evaluated["flip_rate"])
    rec = {"path": str(path), "reproduces_eval": ok, "flip_rate": tf["flip_rate"], "kl": tf["kl"]}
    rec.update(_export_compressed_tensors(model, path, test_ex[:4], device))
    return rec


def _export_compressed_tensors(model, path: Path, examples, device) -> dict:
    """``python -m qdpo.export`` into ``<path>_compressed_tensors``, loaded back by transformers alone (a model
    with asymmetric experts, which transformers cannot load: by qdpo's reader, each layer checked with
    compressed-tensors' decompressor)."""
    import importlib.util

    from qdpo.export import export

    out = path.with_name(path.name + "_compressed_tensors")
    try:
        export(path, out, "compressed-tensors", overwrite=True)
    except ValueError as e:
        log.warning("compressed-tensors export skipped: %s", e)
        return {"compressed_tensors": None}
    if importlib.util.find_spec("compressed_tensors") is None:
        log.warning("compressed-tensors is not installed: %s was written but not checked", out)
        return {"compressed_tensors": str(out), "compressed_tensors_checked": False}
    from transformers import AutoModelForCausalLM

    from qdpo.export import asymmetric_experts, check_layers
    from qdpo.quant.importers import load_external
    from qdpo.quant.linear import frozen_weights
    from qdpo.training.data import collate

    rec = {"compressed_tensors": str(out)}
    if asymmetric_experts(path):  # transformers cannot load it: qdpo's reader, checked by compressed-tensors'
        reader = load_external(out, mode="packed", device=device)[0]
        rec["compressed_tensors_layers"] = check_layers(out)
        log.info("compressed-tensors export %s: transformers cannot load asymmetric experts; read back by qdpo, "
                 "its %d layers decompress with compressed-tensors to qdpo's weights (max |Δw| %.3g)", out,
                 rec["compressed_tensors_layers"]["layers"], rec["compressed_tensors_layers"]["max_abs_diff"])
    else:
        try:
            with _ct_local():
                reader = AutoModelForCausalLM.from_pretrained(str(out)).to(device)
        except Exception as e:  # noqa: BLE001 - transformers' loader, not the export, failed: the run goes on
            # (transformers 5.25 cannot load a symmetric Falcon export: its weight init reads a
            # compressed layer's missing `weight`)
            why = f"{type(e).__name__}: {e}"
            log.warning("compressed-tensors export %s was written, but transformers could not load it to check "
                        "it (%s); qdpo's own export beside it is unaffected", out, why)
            return {**rec, "compressed_tensors_checked": False, "compressed_tensors_load_error": why[:500]}
    batch = collate(examples, 0).to(device)
    with torch.no_grad(), frozen_weights(model):
        a = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        b = reader.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    m = batch.attention_mask.bool()
    diff = (a[m] - b[m]).abs().max().item()
    log.info("compressed-tensors export %s: max |Δlogit| vs the trained model = %.3g", out, diff)
    return {**rec, "compressed_tensors_max_abs_logit_diff": diff}


def _ct_local():
    """compressed-tensors (0.20) spreads the compression of a model it loads over the ranks of an initialized
    process group, with collectives every rank must join; under torchrun only rank 0 loads the export (the
    others wait on a barrier), which hung there. Its ``as_single_threaded`` keeps that work on this process."""
    from contextlib import nullcontext

    try:
        from compressed_tensors.offload import as_single_threaded
    except ImportError:  # a release without the distributed compression: nothing to keep local
        return nullcontext()
    return as_single_threaded()


def _finish(cfg, out, evals, curves, histories, summaries, pair_stats, init_stats, stage, dropped,
            judge: dict | None = None) -> dict:
    from qdpo.eval import plots, report

    plot_paths = {"flip_vs_margin": plots.flip_vs_margin(curves, out / "flip_vs_margin.png")}
    if histories:
        plot_paths["training_curves"] = plots.training_curves(histories, out / "training_curves.png")
    pair_stats = {**pair_stats, "prompts_dropped_too_long": dropped}
    metrics_path = report.write_metrics_json(
        out / "metrics.json", config=_shown_config(cfg), pairs=pair_stats, eval=evals, timing=stage.timing,
        training=summaries, init=init_stats, **({"judge": judge} if judge else {}))
    metrics = json.loads(metrics_path.read_text())
    rpath = report.write_report_md(out / "report.md", metrics, plots=plot_paths, notes=_notes(cfg, summaries))
    return {"report": str(rpath), "metrics": metrics}


def _notes(cfg: TrainConfig, summaries: dict) -> list[str]:
    notes = [f"QDPO recipe: loss={cfg.loss}, beta={cfg.beta}, lr={cfg.lr}, steps={cfg.steps}, "
             f"batch={cfg.batch_size}, window={cfg.window or 'whole answers'}, nll_weight={cfg.nll_weight}, "
             f"kd_weight={cfg.kd_weight}, learn_scales={cfg.learn_scales}, "
             + (f"early stopping on the validation flip rate every {cfg.eval_every} steps (patience {cfg.patience})."
                if any(s.get("best_val_flip_rate") is not None for s in summaries.values()) else
                "no validation check (the last step's weights are kept).")]
    for m, s in summaries.items():
        notes.append(f"{m}: ran {s['steps_run']} steps, kept the weights of step {s['best_step']}"
                     + (" (early stop)" if s.get("early_stopped") else "")
                     + (" (no validation check: the last step)" if s.get("best_val_flip_rate", 0) is None else "")
                     + (" (trained and evaluated by an earlier call in this run directory: its row and summary "
                        "come from that call's metrics.json; the plots show only this call's models)"
                        if s.get("earlier_call") else "")
                     + ("" if "export" not in s else
                        f"; export {'reproduces' if s['export']['reproduces_eval'] else 'DOES NOT reproduce'} "
                        "the evaluation"))
    return notes


def main(argv: list[str] | None = None) -> int:
    env = D.env()
    where = f"rank {env.rank} of {env.world_size}: " if env.world_size > 1 else ""
    # logs and warnings from rank 0 only (every rank meets the same ones); errors from every rank, tagged
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.ERROR,
                        format=f"%(asctime)s {where}%(name)s: %(message)s" if env.rank else
                        "%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if env.rank:
        logging.captureWarnings(True)  # Python warnings as log records at WARNING: dropped here as well
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-tensor bars of instant loads; qdpo has its own
    clean, cfg = False, None
    try:
        cfg = _parse(argv, env.rank)
        result = run(cfg)
        clean = True
    except USER_ERRORS as e:
        # once, from rank 0: errors in the arguments (every rank parses them) and rank 0's, re-raised on every
        # rank (which then all end together: rank 0 prints before the others leave and torchrun stops it)
        clean = D.from_main(e)
        if not env.rank or not (cfg is None or clean):
            print(f"qdpo.train: error: {where}{e}", file=sys.stderr)
        elif cfg is None:
            _wait_for_rank_0(f"qdpo.train: error: {where}{e}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches every rank
        if not env.rank:
            instead = " instead of --overwrite" if cfg is not None and cfg.overwrite else ""  # the pair is refused
            print(f"qdpo.train: interrupted; rerun the same command with --resume{instead} to continue",
                  file=sys.stderr)
        return 130
    except Exception as e:
        if D.peer_failed(e):
            return 1  # another rank failed and prints why: leave quietly
        if env.rank and D.from_main(e):  # rank 0's crash, raised on every rank: rank 0 prints its traceback
            _wait_for_rank_0(f"qdpo.train: error: {where}rank 0 failed: {type(e).__name__}: {e}")
            return 1
        raise
    finally:
        D.shutdown(clean)
        _unlock()
    if env.rank != 0:
        return 0
    ev = result["metrics"]["eval"]
    line = ", ".join(f"{k} {v['flip_rate']:.4f}" for k, v in ev.items() if k != "fp")
    print(f"report: {result['report']}\ntest token-flip rate: {line}")
    return 0


def _parse(argv: list[str] | None, rank: int) -> TrainConfig:
    """The configuration. Every rank parses the same arguments: on the others argparse's output (usage and
    errors, --help) is held back, as rank 0 prints it (see :func:`_wait_for_rank_0`)."""
    if not rank:
        return parse_args(argv)
    held = io.StringIO()
    try:
        with redirect_stdout(held), redirect_stderr(held):
            return parse_args(argv)
    except SystemExit as e:
        if e.code:
            _wait_for_rank_0(held.getvalue().rstrip())
        raise


RANK_0_WAIT_S = 60  # how long a rank waits for rank 0 to print an error they share (and torchrun to stop it)


def _wait_for_rank_0(message: str) -> None:
    """On a rank other than 0, after an error that rank 0 meets too (one in the arguments, or rank 0's crash
    that ``on_main`` raised here): rank 0 prints it, then exits, and torchrun stops this rank. Leaving first
    would get rank 0 stopped, maybe before it printed; so wait, and print ``message`` only if this rank is
    still running after :data:`RANK_0_WAIT_S` seconds."""
    time.sleep(RANK_0_WAIT_S)
    print(message, file=sys.stderr)


if __name__ == "__main__":
    if D.env().world_size > 1:  # under torchrun: an uncaught error's message goes into the launcher's summary
        from torch.distributed.elastic.multiprocessing.errors import record

        D.exit_process(record(main)())  # past the process group's teardown (exit_process)
    sys.exit(main())
