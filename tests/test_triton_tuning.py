"""The Triton backend's config picker (``pick_config``): every candidate compiled once, then timed in
turns and ranked by its median, failures passed over, one pick per key, no timing inside a graph
capture; with a scripted timer on the CPU, and the real timer (CUDA graphs, cold L2) on a GPU."""

import logging

import pytest
import torch

from qdpo.kernels.triton import dequant_matmul_gemm as dmg


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(dmg, "_BEST", {})


class Script:
    """A timer that returns scripted ms per candidate, in call order, and records what ran."""

    def __init__(self, ms: dict):
        self.ms = {c: list(t) for c, t in ms.items()}
        self.ran: list = []

    def run(self, cfg):
        self.ran.append(cfg)

    def __call__(self, fn):
        fn()
        cfg = self.ran[-1]
        t = self.ms[cfg].pop(0)
        if isinstance(t, Exception):
            raise t
        return t


def test_candidates_are_timed_in_turns_and_ranked_by_their_median():
    timer = Script({"a": [1.0, 9.0, 1.0], "b": [2.0, 2.0, 2.0], "c": [3.0, 1.2, 1.2]})
    assert dmg.pick_config("gemv", ("k",), ("b", "c", "a"), timer.run, timer) == "a"  # one slow round: still a
    # each compiled once, then three rounds, every candidate in each
    assert timer.ran == ["b", "c", "a"] + ["b", "c", "a"] * dmg.TUNE_ROUNDS
    assert dmg._BEST[("gemv", ("k",))] == "a"


def test_a_tie_goes_to_the_earlier_candidate_and_a_pick_is_kept():
    timer = Script({"x": [1.0] * 3, "y": [1.0] * 3})
    assert dmg.pick_config("gemm", 1, ("y", "x"), timer.run, timer) == "y"
    ran = len(timer.ran)
    assert dmg.pick_config("gemm", 1, ("y", "x"), timer.run, timer) == "y" and len(timer.ran) == ran  # cached
    assert dmg.pick_config("dx", 1, ("x",), timer.run, timer) == "x" and len(timer.ran) == ran  # one: no timing


def test_candidates_that_fail_are_passed_over_and_none_left_is_an_error():
    timer = Script({"ok": [2.0] * 3, "graph": [RuntimeError("capture"), 0.5, 0.5]})

    def run(cfg):
        if cfg == "bad":
            raise RuntimeError("out of shared memory")
        timer.run(cfg)

    # "bad" fails to compile: never timed; "graph" fails one timing: that round ranks it last, median 0.5
    assert dmg.pick_config("gemv", 2, ("bad", "ok", "graph"), run, timer) == "graph"
    timer2 = Script({"ok": [1.0, RuntimeError("x"), RuntimeError("y")], "also": [3.0] * 3})
    assert dmg.pick_config("gemv", 3, ("ok", "also"), timer2.run, timer2) == "also"  # median inf

    def fail(cfg):
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="qdpo gemv: no candidate config compiled for 4"):
        dmg.pick_config("gemv", 4, ("p", "q"), fail, timer)


def test_a_first_call_inside_a_graph_capture_takes_the_first_candidate_uncached(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    timer = Script({})
    with caplog.at_level(logging.WARNING, logger="qdpo.kernels"):
        assert dmg.pick_config("gemv", 5, ("p", "q"), timer.run, timer) == "p"
    assert timer.ran == [] and not dmg._BEST and "inside a CUDA graph capture" in caplog.text


@pytest.mark.gpu
def test_the_graph_timer_times_a_real_gemv_and_the_pick_is_one_of_the_candidates():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import qdpo
    from qdpo.kernels.triton import dequant_matmul as tdm
    from qdpo.quant.spec import QuantSpec

    w = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    qw = qdpo.quantize(w, QuantSpec(4, 128, False), backend="reference")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    packed = dmg.Packed.of(qw.qweight, qw.scales, qw.zeros, 4)
    y = torch.empty(1, 1024, device="cuda", dtype=torch.bfloat16)
    timer = dmg.ColdGraphTimer()
    ms = [timer(lambda c=c: tdm._launch_gemv(x, packed, None, y, c)) for c in tdm.GEMV_GPU[:2]]
    assert all(0.0 <= t < float("inf") for t in ms), ms
    best = dmg.pick_config("gemv", ("test",), tdm.GEMV_GPU, lambda c: tdm._launch_gemv(x, packed, None, y, c))
    assert best in tdm.GEMV_GPU and dmg._BEST[("gemv", ("test",))] == best
    ref = torch.ops.qdpo.dequant_matmul(x, qw.qweight, qw.scales, qw.zeros, 4, None, "reference")
    tdm._launch_gemv(x, packed, None, y, best)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
