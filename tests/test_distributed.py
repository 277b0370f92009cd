"""Multi-process training on the CPU: gloo, 2 processes under torchrun, tiny models.

DDP and FSDP2 reproduce the one-process loss curve and weights for the same
global batch; a 2-process checkpoint resumes in one process; a rank that
raises stops the launcher with its message and leaves the last checkpoint
loadable; ``torchrun -m qdpo.train`` writes one set of artifacts, from the
same pairs as a one-process run. In-process: bf16 latent weights with an fp32
master, and the checks on how a batch splits.
"""

import json
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_worker as W
from qdpo import train
from qdpo.training import distributed as D
from qdpo.training.config import ConfigError, TrainConfig
from qdpo.training.trainer import Trainer
from test_pipeline import _args, _prompts, model_dir  # noqa: F401 - model_dir is a fixture
from test_trainer import make_data

HERE = Path(__file__).parent
# Sums split across ranks add up in another order: fp32 rounding only. (With AdamW an element whose
# gradient is ~0 could move by up to ~lr on that noise; these runs have none, see TOOLCHAIN.md.)
CURVE = dict(rtol=1e-5, atol=1e-6)
WEIGHTS = dict(rtol=0, atol=1e-5)


def torchrun(*args, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *map(str, args)]
    with subprocess.Popen(cmd, cwd=HERE.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a run that hangs: SIGTERM lets torchrun stop its ranks too
            p.terminate()
            p.communicate(timeout=60)
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "examples.json"
    # half the prompts share a start, and each pair a prompt of 8-11 more tokens: the runs share starts
    W.write_examples(path, make_data(system=8, words=(8, 12))[2])
    return path


def in_process(*args, **kw) -> dict:
    """``dist_worker.train`` here, with one thread like each rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return W.train(*args, **kw)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> dict:
    return in_process(data, tmp_path_factory.mktemp("one"))


def assert_same_run(ref: dict, got: dict) -> None:
    assert [h["step"] for h in got["history"]] == [h["step"] for h in ref["history"]]
    for a, b in zip(ref["history"], got["history"]):
        for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "num_tokens"):
            if k in a:
                torch.testing.assert_close(b[k], a[k], **CURVE, msg=f"step {a['step']} {k}")
        assert b.get("val/flip_rate") == a.get("val/flip_rate"), a["step"]  # so the same best step is kept
    assert got["weights"].keys() == ref["weights"].keys()
    for n, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][n], w, **WEIGHTS, msg=n)


def decoder_calls(out: Path) -> list[list[tuple[list[int], int]]]:
    """Per rank, per decoder forward: (rows of each decoder call, rows of the batch), from dist_worker."""
    return [[tuple(c) for c in json.loads((out / f"calls-rank{r}.json").read_text())] for r in range(2)]


@pytest.mark.parametrize("mode,extra", [("ddp", []), ("fsdp", []), ("fsdp", ["--activation-checkpointing"])],
                         ids=["ddp", "fsdp", "fsdp-checkpointing"])
def test_two_processes_match_one_process(data, one_process, tmp_path, mode, extra):
    r = torchrun(HERE / "dist_worker.py", data, tmp_path, "--dist", mode, *extra)
    assert r.returncode == 0, r.stderr[-4000:]
    assert_same_run(one_process, torch.load(tmp_path / "result.pt", weights_only=False))
    logged = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(9))  # rank 0 alone writes the log
    ckpts = D.complete_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000006", "step-000008"]  # the last two
    assert sorted(p.name for p in ckpts[-1].iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", D.META]
    calls = decoder_calls(tmp_path)
    assert len(calls[0]) == len(calls[1]) > 0
    every = [c for rank in calls for c in rank]
    if mode == "ddp":  # whole copies: each rank runs its batch's shared starts once, in parts
        assert any(len(n) > 1 for n, _ in every)
    else:  # FSDP2 (each layer gathered per call): one call per forward, the pairs packed where they share
        assert all(len(n) == 1 for n, _ in every)
        assert any(n[0] < rows for n, rows in every) and any(n[0] == rows for n, rows in every)


def test_dying_rank_stops_the_launcher_and_its_checkpoint_resumes_in_one_process(data, one_process, tmp_path):
    r = torchrun(HERE / "dist_worker.py", data, tmp_path, "--dist", "fsdp", "--fail-at", 7, "--fail-rank", 1)
    assert r.returncode != 0
    assert "Root Cause" in r.stderr, r.stderr[-4000:]
    summary = r.stderr[r.stderr.index("Root Cause"):]  # torchrun's report names the rank and its error
    assert "rank      : 1" in summary and "SimulatedFailure: rank 1: simulated failure at step 7" in summary
    assert [p.name for p in D.complete_checkpoints(tmp_path / "checkpoints")] == ["step-000003", "step-000006"]
    assert D.read_meta(tmp_path / "checkpoints" / "step-000006")["world_size"] == 2
    resumed = in_process(data, tmp_path, resume=True)  # one process continues the 2-process run
    assert_same_run(one_process, resumed)


def test_torchrun_pipeline_writes_one_report_from_the_one_process_pairs(model_dir, tmp_path):  # noqa: F811
    # one system turn for all: generation (on each rank's whole copy) and training share its prefix
    prompts = _prompts(tmp_path / "p.jsonl", system="w1 w2 w3 w4 w5 w6 w7 w8 w9")
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(_args(model_dir, prompts, one)) == 0
    r = torchrun("-m", "qdpo.train", *_args(model_dir, prompts, two))
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("report: ") == 1 and f"report: {two / 'report.md'}" in r.stdout
    assert r.stderr.count("stage: load") == 1  # logs from rank 0 only
    a, b = ([json.loads(x) for x in (d / "pairs.jsonl").read_text().splitlines()] for d in (one, two))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):  # the same answers; reference log-probs up to batch-composition rounding
        for k in x:
            if k.endswith("logps"):
                assert y[k] == pytest.approx(x[k], rel=1e-5), (x["id"], k)
            else:
                assert y[k] == x[k], (x["id"], k)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["pairs"] == m1["pairs"] and m2["config"]["dist"] == "auto"
    h1, h2 = ([json.loads(x) for x in (d / "train_qdpo" / "metrics.jsonl").read_text().splitlines()]
              for d in (one, two))
    assert [h["step"] for h in h2] == list(range(5))
    assert [h["loss"] for h in h2[1:]] == pytest.approx([h["loss"] for h in h1[1:]], rel=1e-5)
    assert m2["eval"]["qdpo"]["flip_rate"] == pytest.approx(m1["eval"]["qdpo"]["flip_rate"], abs=1e-9)
    assert m2["training"]["qdpo"]["export"]["reproduces_eval"] is True


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="needs compressed-tensors")
def test_torchrun_checks_a_symmetric_export_in_transformers_on_rank_0_alone(model_dir, tmp_path):  # noqa: F811
    # transformers loads a symmetric export compressed, and compressed-tensors spreads that over the ranks of an
    # initialized process group: rank 0, loading alone while the others wait, hung there
    prompts = _prompts(tmp_path / "p.jsonl")
    r = torchrun("-m", "qdpo.train", *_args(model_dir, prompts, tmp_path / "run", "--symmetric"), timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    export = json.loads((tmp_path / "run" / "metrics.json").read_text())["training"]["qdpo"]["export"]
    assert export["reproduces_eval"] is True and export["compressed_tensors_max_abs_logit_diff"] < 1e-4


def test_torchrun_an_unreachable_judge_ends_every_rank_with_its_error(model_dir, tmp_path):  # noqa: F811
    # rank 0 alone checks the judge: its error went to rank 0 only, and rank 1, waiting for rank 0's next
    # broadcast, died on the closed connection with a gloo traceback ("Connection reset by peer")
    prompts = _prompts(tmp_path / "p.jsonl")
    r = torchrun("-m", "qdpo.train", *_args(model_dir, prompts, tmp_path / "run", "--judge-url",
                                            "http://127.0.0.1:9/v1", "--judge-model", "stub"), timeout=120)
    assert r.returncode != 0
    assert "qdpo.train: error: rank 0 of 2: --judge-url http://127.0.0.1:9/v1: cannot reach" in r.stderr
    assert r.stderr.count("qdpo.train: error:") == 1, r.stderr[-4000:]  # rank 1 does not repeat rank 0's error
    assert "[rank1]" not in r.stderr and "Connection reset" not in r.stderr, r.stderr[-4000:]
    assert not (tmp_path / "run").exists()  # nothing written


def test_torchrun_prints_a_warning_once(model_dir, tmp_path):  # noqa: F811
    # every rank tokenizes the prompts and meets the one too long for --max-length: its warning came from each
    prompts = _prompts(tmp_path / "p.jsonl")
    with prompts.open("a") as f:
        f.write(json.dumps({"id": "long", "prompt": " ".join(["w1"] * 40), "split": "train"}) + "\n")
    r = torchrun("-m", "qdpo.train", *_args(model_dir, prompts, tmp_path / "run", "--method", "sft", "--steps", "2",
                                            "--max-length", "32", "--no-export"), timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("1 prompt(s) longer than --max-length 32 were dropped") == 1, r.stderr[-4000:]


CRASH = """# qdpo.train with rank 0's evaluation of the trained model failing
import runpy
import sys

sys.path.insert(0, {root!r})
from qdpo.eval import metrics as M
from qdpo.training import stages as S

calls, tf = [], M.teacher_forced


def failing(*a, **kw):
    calls.append(1)
    if len(calls) == 3:  # the FP and initial models' evaluations pass, the trained one's fails
        raise RuntimeError("simulated evaluation bug")
    return tf(*a, **kw)


def failing_write(*a, **kw):
    raise RuntimeError("simulated write bug")


M.teacher_forced = failing
if {write!r}:
    S._save_hidden = failing_write  # rank 0 writes answers/fp_hidden.safetensors alone, through on_main
runpy.run_module("qdpo.train", run_name="__main__")
"""


@pytest.mark.parametrize("where", ["evaluation", "write"])
def test_torchrun_a_crash_on_rank_0_is_the_one_error_printed(model_dir, tmp_path, where):  # noqa: F811
    # evaluation: rank 1, waiting on a barrier while rank 0 evaluated, printed gloo's "Connection closed by peer"
    # traceback; write: rank 1 raised rank 0's error (on_main shares it) with a traceback of its own
    script = tmp_path / "crash.py"
    script.write_text(CRASH.format(root=str(HERE.parent), write=where == "write"))
    prompts = _prompts(tmp_path / "p.jsonl")
    r = torchrun(script, *_args(model_dir, prompts, tmp_path / "run", "--method", "sft", "--steps", "2",
                                "--no-export"), timeout=180)
    assert r.returncode != 0
    assert f"RuntimeError: simulated {where} bug" in r.stderr, r.stderr[-4000:]
    assert "Connection closed" not in r.stderr and "Connection reset" not in r.stderr, r.stderr[-4000:]
    assert "[rank1]" not in r.stderr, r.stderr[-4000:]


@pytest.mark.parametrize("extra,error", [(["--bits", "5"], "bits=5 is not supported"),
                                         (["--batch-size", "3", "--micro-batch-size", "1"],
                                          "--batch-size 3 does not split over 2 processes")],
                         ids=["argument", "split"])
def test_torchrun_prints_a_user_error_once(model_dir, tmp_path, extra, error):  # noqa: F811
    # every rank parses the arguments and checks the split, and each printed the same error line
    r = torchrun("-m", "qdpo.train", *_args(model_dir, _prompts(tmp_path / "p.jsonl"), tmp_path / "run", *extra),
                 timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("qdpo.train: error:") == 1 and error in r.stderr, r.stderr[-4000:]
    assert "exitcode  : 2" in r.stderr


def test_bf16_latent_weights_step_an_fp32_master_that_resumes_exactly(data, one_process, tmp_path):
    full = in_process(data, tmp_path / "full", latent_dtype="bfloat16")
    assert all(w.dtype == torch.bfloat16 for w in full["weights"].values())
    losses = [h["loss"] for h in full["history"][1:]]
    assert losses[0] == pytest.approx(0.6931472, abs=1e-6)  # bf16 rounding kept every code: policy = reference
    # bf16 weights near a code boundary land in other bins than fp32 ones: the curve follows fp32's loosely
    assert losses == pytest.approx([h["loss"] for h in one_process["history"][1:]], abs=0.1)
    with pytest.raises(W.SimulatedFailure):
        in_process(data, tmp_path / "cut", latent_dtype="bfloat16", fail_at=7, fail_rank=0)
    resumed = in_process(data, tmp_path / "cut", resume=True, latent_dtype="bfloat16")
    for n, w in full["weights"].items():  # the master (not the bf16 weight) carried the sub-bf16 updates over
        assert torch.equal(resumed["weights"][n], w), n


def test_master_copy_lives_in_the_optimizer_state(data, tmp_path):
    _, q = W.models()
    cfg = TrainConfig(**{**W.SETTINGS, "steps": 1, "eval_every": 0, "latent_dtype": "bfloat16"}).validate()
    t = Trainer(q, cfg, "qdpo", W.read_examples(data), tmp_path, pad_id=1, disable_progress=True)
    t.train_step()
    for p in t.opt.param_groups[0]["params"]:
        st = t.opt.state[p]
        assert p.dtype == torch.bfloat16 and st["master"].dtype == st["exp_avg"].dtype == torch.float32
        assert torch.equal(p, st["master"].to(torch.bfloat16))


def test_a_batch_the_ranks_cannot_split_is_refused(monkeypatch):
    monkeypatch.setattr(D, "world_size", lambda: 4)
    assert D.resolve_mode("auto", 8) == "fsdp" and D.resolve_mode("ddp", 8) == "ddp"
    with pytest.raises(ConfigError, match="--batch-size 6 does not split over 4 processes; use a multiple of 4"):
        D.resolve_mode("auto", 6)
    with pytest.raises(ConfigError, match="--dist none cannot train with 4 processes"):
        D.resolve_mode("none", 8)
    monkeypatch.setattr(D, "world_size", lambda: 1)
    assert D.resolve_mode("fsdp", 6) == "none"  # one process trains unwrapped


def test_fsdp_refuses_bf16_latent_weights_beside_learned_scales_before_generation(model_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                                   capsys):
    # FSDP2 asserts one dtype for a layer's trainable parameters: it failed at the first training step
    monkeypatch.setattr(D, "world_size", lambda: 2)
    out = tmp_path / "run"
    args = _args(model_dir, _prompts(tmp_path / "p.jsonl"), out, "--learn-scales", "--latent-dtype", "bfloat16")
    assert train.main(args) == 2
    assert "--dist auto (FSDP2) cannot train --learn-scales" in capsys.readouterr().err
    assert not (out / "answers").exists()  # refused before generation
    assert D.resolve_mode("ddp", 4, True, "bfloat16") == "ddp" and D.resolve_mode("fsdp", 4, True, "float32") == "fsdp"
    assert D.resolve_mode("fsdp", 4, False, "bfloat16") == "fsdp"
    with pytest.raises(ConfigError, match="cannot train --learn-scales with --latent-dtype bfloat16.*use --dist ddp"):
        D.resolve_mode("fsdp", 4, True, "bfloat16")


def test_a_clean_shutdown_waits_for_every_rank_and_an_error_does_not(monkeypatch):
    """``shutdown(clean=True)``: a barrier, then the group ends; after an error no barrier (ranks may
    stand at different collectives); the group ends even when the barrier raises."""
    calls = []
    monkeypatch.setattr(D, "is_dist", lambda: True)
    monkeypatch.setattr(D.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(D.dist, "destroy_process_group", lambda: calls.append("destroy"))
    D.shutdown(clean=True)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    D.shutdown()
    assert calls == ["destroy"]
    calls.clear()

    def peer_gone():
        raise RuntimeError("connection closed by peer")

    monkeypatch.setattr(D.dist, "barrier", peer_gone)
    with pytest.raises(RuntimeError, match="peer"):
        D.shutdown(clean=True)
    assert calls == ["destroy"]
