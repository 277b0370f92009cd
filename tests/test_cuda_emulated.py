"""The CUDA kernels themselves, run on the CPU: every thread of every launch, through the ``cuda`` backend.

``qdpo._C`` is built a second time from the same ``csrc/`` sources by the C++ compiler with
``-DQDPO_EMULATE`` (``csrc/emulate/cuda_emulate.h``): the kernels, their launch plans and launchers
are the ones nvcc compiles, and what a GPU would supply — thread coordinates, ``__syncthreads``,
``__shfl_xor_sync``, ``mma.sync`` (from the PTX ISA's fragment tables), ``ldmatrix``, ``cp.async``,
shared memory, the launch — is emulated, every thread a fiber. A warp-wide instruction runs when
all 32 lanes wait at it, each warp runs as far as it can before the next one starts, and a barrier
opens when all of a block's live threads wait at it; warps take their turns first to last or, in a
second pass of some tests (``order``), last to first, so that a missing barrier between two warps
changes a result in one of the two. Shared memory starts as NaN bytes in every block, a cp.async
lands only when its thread waits for it, and some tests put every operand (outputs included) against
an unreadable page, so that a read or write past its end (or before its start) crashes the test process. The
last tests here show each of these on kernels written with the mistake (``csrc/emulate/selftest.cpp``).

The ``cuda`` backend (``qdpo/kernels/cuda.py``) is pointed at that module for each test: its
wrappers, plans, tables of launches and workspace handling run unchanged on CPU tensors, with the
SM count of an H100 (132). The test bodies are the GPU tests' own (``tests/test_cuda_kernels.py``,
which a GPU runs on CUDA tensors), here on smaller shapes where theirs take minutes. What this
cannot show: speed, occupancy, the compiler's register allocation and anything else below the
source (the sm_80/sm_90 builds are compiled by ``tests/test_build.py``), memory-model questions
finer than "every write before a barrier is seen after it", and the precise rounding of the tensor
cores' fp32 sums (emulated in float64, rounded once per mma).
"""

import hashlib
import importlib.util
import itertools
import os
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import qdpo
from qdpo import QuantSpec
from qdpo.kernels import backends
from qdpo.kernels import reference as ref
from tests import test_cuda_kernels as gpu
from tests import test_dequantize, test_fake_quant, test_quant_linear, test_quantize
from tests.conftest import assert_exact, sqnr
from tests.test_dequant_matmul import _args, _check_y, _rand, _weight

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HAS_NVCC = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
FLAGS = ["-O1", "-std=c++17", "-fPIC", "-DQDPO_EMULATE"]
# -Bsymbolic: the module's own cudaGetLastError &c., even in a process that has the real CUDA runtime
# loaded globally
LINK = ["-shared", "-Wl,-Bsymbolic", "-lpthread"]


def _sources() -> list[Path]:
    return sorted(p for p in CSRC.rglob("*") if p.is_file())


def _cuda_include() -> Path:
    spec = importlib.util.spec_from_file_location("qdpo_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # setup() runs only as __main__
    return setup.cuda_root(setup.find_nvcc()) / "include"


def _build(out: Path) -> Path:
    """``_C_emulated`` from csrc/: every .cpp and .cu (as C++) of csrc/ and csrc/emulate/, linked."""
    import pybind11

    inc = [f"-I{CSRC}", f"-I{_cuda_include()}", f"-I{sysconfig.get_paths()['include']}",
           f"-I{pybind11.get_include()}"]
    objs, cmds = [], []
    for src in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("emulate/*.cpp")):
        obj = out / f"{src.parent.name}-{src.stem}.o"
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        cmds.append(["g++", *lang, "-c", str(src), "-o", str(obj), *FLAGS, *inc])
        objs.append(str(obj))

    def run(cmd):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"emulated build failed: {' '.join(cmd)}\n{res.stderr[-4000:]}"

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(run, cmds))
    so = out / f"_C_emulated{sysconfig.get_config_var('EXT_SUFFIX')}"
    run(["g++", "-o", str(so), *objs, *LINK])
    return so


@pytest.fixture(scope="session")
def E(request):
    """The emulated module, built once per source hash (pytest's cache keeps it between sessions; without
    the cache plugin, the system's temporary folder)."""
    if not HAS_NVCC or shutil.which("g++") is None:
        pytest.skip("the emulated build needs the CUDA headers (nvcc's toolkit) and g++")
    h = hashlib.sha256(" ".join(FLAGS + LINK).encode())
    for p in _sources():
        h.update(str(p.relative_to(CSRC)).encode() + p.read_bytes())
    if getattr(request.config, "cache", None) is not None:
        cache = Path(request.config.cache.mkdir("qdpo_cuda_emulated"))
    else:  # pytest -p no:cacheprovider
        cache = Path(tempfile.gettempdir()) / "qdpo_cuda_emulated"
        cache.mkdir(exist_ok=True)
    key = cache / h.hexdigest()[:16]
    found = list(key.glob("_C_emulated*.so"))
    if not found:
        tmp = cache / f"{key.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _build(tmp)
        try:
            tmp.rename(key)  # atomic; another process may have got there first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        found = list(key.glob("_C_emulated*.so"))
    spec = importlib.util.spec_from_file_location("_C_emulated", found[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cpu_device(*tensors) -> torch.device:
    ts = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" for t in ts):
        raise backends.Unsupported("the emulated cuda backend takes CPU tensors")
    return torch.device("cpu")


def _stay(backend, *ts):
    return ts[0] if len(ts) == 1 else list(ts)


@pytest.fixture(params=[0, 1], ids=["first-to-last", "last-to-first"])
def order(request):
    return request.param


@pytest.fixture
def emulated(E, monkeypatch, request):
    """The ``cuda`` backend on the emulated module, for CPU tensors (132 SMs; no table of launches)."""
    cuda = pytest.importorskip("qdpo.kernels.cuda", reason="qdpo._C was not built (no nvcc at install time)")
    E.emulate_set_order(request.getfixturevalue("order") if "order" in request.fixturenames else 0)
    monkeypatch.setattr(cuda, "_C", E)
    monkeypatch.setattr(cuda, "_check_device", _cpu_device)
    monkeypatch.setattr(cuda, "_sm_count", lambda index: 132)
    monkeypatch.setattr(cuda, "_launch", lambda device, fn, *args, **kw: fn(*args, 0, **kw))
    monkeypatch.setattr(cuda, "_TABLES", {None: None})  # the CPU device: no table of launches
    reason = backends._device_reason
    monkeypatch.setattr(backends, "_device_reason",
                        lambda b, d: None if b == "cuda" and d.type == "cpu" else reason(b, d))
    for module in (gpu, test_quantize, test_dequantize, test_fake_quant):  # the GPU tests' inputs stay here
        monkeypatch.setattr(module, "on", _stay)
    monkeypatch.setattr(gpu, "DEV", "cpu")
    yield cuda
    E.emulate_set_order(0)


# --------------------------------------------------------------------------- the decode GEMV
@pytest.mark.parametrize("warps", range(1, 9))
def test_gemv_any_block_size(emulated, order, warps):
    gpu.test_dequant_matmul_any_block_size(warps)


@pytest.mark.parametrize("gs", [32, -1])
def test_gemv_on_a_partial_last_step(emulated, order, gs):
    gpu.test_dequant_matmul_on_a_partial_last_step(gs)


@pytest.mark.parametrize("bits,gs", [(4, 128), (8, -1), (4, 32)])
def test_gemv_every_forced_split(emulated, bits, gs):
    gpu.test_dequant_matmul_every_forced_split(bits, gs)


def test_gemv_row_tiles_sum_the_same_terms(emulated, order):
    gpu.test_dequant_matmul_row_tiles_sum_the_same_terms()


@pytest.mark.parametrize("bits,gs,xdtype,k", gpu.EXPERTS_CASES)
def test_gemv_experts_gives_each_row_its_experts_gemv(emulated, order, bits, gs, xdtype, k):
    gpu.test_dequant_matmul_experts_gives_each_row_its_experts_gemv(bits, gs, xdtype, k)


@pytest.mark.parametrize("bits,gs,xdtype,k,max_rows", gpu.SEGMENT_CASES)
def test_gemv_experts_takes_each_experts_rows_together(emulated, order, bits, gs, xdtype, k, max_rows):
    gpu.test_dequant_matmul_experts_takes_each_experts_rows_together(bits, gs, xdtype, k, max_rows)


@pytest.mark.parametrize("max_rows", [2, 12])
def test_gemv_experts_segments_need_no_block_per_expert(emulated, order, max_rows):
    gpu.test_dequant_matmul_experts_segments_need_no_block_per_expert(max_rows)


@pytest.mark.parametrize("case", gpu.RANDOM_CASES)
def test_gemv_random_shapes_every_choice(emulated, order, case):
    gpu.test_dequant_matmul_random_shapes_every_choice(case)


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("gs", [128, 256, -1])
def test_gemv_scale_after_dtypes_and_groups(emulated, xdtype, bits, gs):
    gpu.test_dequant_matmul_scale_after_dtypes_and_groups(xdtype, bits, gs)


@pytest.mark.parametrize("xdtype", gpu.XDTYPES)
@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("gs", gpu.GROUPS)
def test_dequant_matmul_dtypes_and_groups(emulated, xdtype, bits, gs):
    gpu.test_dequant_matmul_dtypes_and_groups(xdtype, bits, gs)


def test_dequant_matmul_every_launcher_path(emulated):
    gpu.test_dequant_matmul_every_launcher_path()


@pytest.mark.parametrize("i,m,nk", gpu.ODD_CASES)
def test_dequant_matmul_odd_shapes(emulated, i, m, nk):
    gpu.test_dequant_matmul_odd_shapes(i, m, nk)


def test_dequant_matmul_launches_by_the_device_table(emulated, tmp_path, monkeypatch):
    """A table of measured launches decides where nothing is forced (the CPU device stands in for the
    current CUDA device)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "emulated")
    gpu.test_dequant_matmul_launches_by_the_device_table(tmp_path)


def test_dequant_matmul_opcheck(emulated):
    """torch.library's checks of qdpo::dequant_matmul on the cuda backend (the GPU test adds graph capture)."""
    from torch.library import opcheck

    qw = _weight(7, 96, 4, 32)
    for m, dtype in ((1, torch.float16), (3, torch.bfloat16), (5, torch.float32)):
        opcheck(torch.ops.qdpo.dequant_matmul, (_rand(m, 96, dtype=dtype), *_args(qw), _rand(7), "cuda"))


def test_dequant_matmul_zero_rows_give_the_bias_exactly(emulated):
    gpu.test_dequant_matmul_zero_rows_give_the_bias_exactly()


def test_dequant_matmul_paths_refuse_what_they_cannot_serve(emulated):
    gpu.test_dequant_matmul_paths_refuse_what_they_cannot_serve()


# --------------------------------------------------------------------------- the prefill GEMM
@pytest.mark.parametrize("bits,gs,xdtype", [(4, 128, torch.bfloat16), (8, -1, torch.float16), (4, 32, torch.float16),
                                             (8, 64, torch.bfloat16)])
def test_gemm_path(emulated, order, bits, gs, xdtype):
    """The hand-written tensor-core GEMM (path="gemm"; not yet run on a GPU) as the GPU test checks it,
    on 4 K tiles instead of 18 (the double buffer alternates twice): partial 128-row tiles in M and N,
    bias, batch dimensions, deterministic."""
    gpu.check_gemm_path(bits, gs, xdtype, 256, (1, 17, 130), 65)


@pytest.mark.parametrize("m", (3, 17, 300))
def test_dequant_matmul_dx_and_prefill(emulated, m):
    gpu.test_dequant_matmul_dx_and_prefill(m)


# --------------------------------------------------------------------------- element-wise kernels
@pytest.mark.parametrize("k,bits", [(14336, 4), (4100, 4), (4101, 8), (66, 4)])
def test_quantize_long_and_narrow_rows(emulated, order, k, bits):
    gpu.test_quantize_long_and_narrow_rows(k, bits)


@pytest.mark.parametrize("bits,gs,sym", [(4, 128, False), (8, -1, True)])
def test_quantize_rows_aligned_to_4_bytes_only(emulated, bits, gs, sym):
    gpu.test_quantize_rows_aligned_to_4_bytes_only(bits, gs, sym)


def test_dequantize_misaligned_and_long_rows(emulated):
    gpu.test_dequantize_misaligned_and_long_rows()


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_both_chunk_widths(emulated, bits):
    gpu.test_dequantize_both_chunk_widths(bits)


@pytest.mark.parametrize("k,bits", [(14336, 4), (4100, 4), (4101, 8)])
def test_fake_quant_long_and_narrow_rows(emulated, order, k, bits):
    gpu.test_fake_quant_long_and_narrow_rows(k, bits)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,gs", [(4096, 128), (14336, -1), (200, 40)])
def test_fake_quant_both_chunk_widths(emulated, wdtype, k, gs):
    gpu.test_fake_quant_both_chunk_widths(wdtype, k, gs)


@pytest.mark.parametrize("m", (1, 16, 40))
def test_fake_quant_matmul_forward_and_backward(emulated, m):
    gpu.test_fake_quant_matmul_forward_and_backward(m)


# --------------------------------------------------------------------------- the emulation itself
def test_emulation_shows_a_missing_barrier_in_either_order(E):
    """Thread t reads thread 63 - t's word of shared memory: with the barrier every thread sees it
    in both orders; without, each order leaves half the threads reading before the write, and they
    see the NaN bytes shared memory starts with."""
    want = [float(63 - t) for t in range(64)]
    for reverse in (0, 1):
        E.emulate_set_order(reverse)
        assert E.emulate_selftest("exchange") == (want, "")
        out, error = E.emulate_selftest("exchange_no_barrier")
        early = range(32) if reverse == 0 else range(32, 64)  # the threads that ran first
        assert error == "" and all(out[t] != out[t] for t in early), out  # NaN
        assert all(out[t] == want[t] for t in range(64) if t not in early)
    E.emulate_set_order(0)


def test_emulation_shows_reads_of_unwritten_and_not_yet_copied_shared_memory(E):
    out, error = E.emulate_selftest("unwritten")
    assert error == "" and all(out[t] == t for t in range(0, 64, 2)) and all(out[t] != out[t] for t in range(1, 64, 2))
    out, error = E.emulate_selftest("unwritten_static")  # two blocks: NaN bytes again for the second
    assert error == "" and all(out[i] == i % 64 for i in range(0, 128, 2)) and all(v != v for v in out[1::2])
    assert E.emulate_selftest("cp_async") == ([float(4 * t) for t in range(64)], "")
    out, error = E.emulate_selftest("cp_async_no_wait")
    assert error == "" and all(v != v for v in out)  # a cp.async lands at its thread's wait


def test_emulation_refuses_broken_warp_instructions_and_launches(E):
    _, error = E.emulate_selftest("exited_lane")
    assert "1 lanes exited or missing" in error and "block (0, 0, 0)" in error
    _, error = E.emulate_selftest("split_warp")
    assert "lanes at different warp-wide instructions" in error
    _, error = E.emulate_selftest("too_much_smem")
    assert "50176 bytes of dynamic shared memory, more than the kernel's 49152" in error
    assert E.emulate_selftest("exchange") == ([float(63 - t) for t in range(64)], "")  # the error was cleared
    assert E.emulate_selftest("no_such_test") == ([], "unknown self-test no_such_test")


# --------------------------------------------------------------------------- the backends' shared tests
# The test bodies every kernel backend shares (tests/test_quantize.py, test_dequantize.py,
# test_fake_quant.py: against the reference, on the GPU for cuda), collected here once more with the
# ``backend`` fixture below: the cuda backend on the emulated build.
@pytest.fixture
def backend(emulated):
    return "cuda"


def _shared(module, *skip):
    """``module``'s tests that take the ``backend`` fixture, named ``<module>__<test>`` here."""
    import inspect

    for name, fn in vars(module).items():
        if name.startswith("test_") and name not in skip and "backend" in inspect.signature(fn).parameters:
            globals()[f"test_{module.__name__.split('.')[-1].removeprefix('test_')}__{name[5:]}"] = fn


_shared(test_quantize)
_shared(test_dequantize)
_shared(test_fake_quant, "test_torch_compile_fullgraph_forward_and_backward")  # inductor on the CPU: minutes


# --------------------------------------------------------------------------- reads stay inside their operands
def _guarded(t: torch.Tensor, side: str, keep: list) -> torch.Tensor:
    """A copy of ``t`` in memory that ends right before (``side="end"``) or starts right after
    (``side="start"``) a page the process may not read: a kernel's read past the operand (or before
    it) kills the test process with a segmentation fault (pytest prints the test's traceback) instead
    of reading a neighbour's bytes. ``keep`` holds the mapping alive."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    nbytes = t.numel() * t.element_size()
    size = (nbytes + page - 1) // page * page + 2 * page
    buf = mmap.mmap(-1, size)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    guard = base if side == "start" else base + size - page
    assert libc.mprotect(guard, page, 0) == 0, ctypes.get_errno()  # PROT_NONE
    offset = page if side == "start" else size - page - nbytes
    out = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).view(t.dtype).view(t.shape)
    out.copy_(t)
    keep.append((buf, libc, guard, page))
    return out


def _guard_outputs(monkeypatch, side: str, keep: list) -> None:
    """The cuda backend's outputs and workspaces (its ``torch.empty``, ``torch.empty_like``) guarded too:
    a kernel's write outside them crashes the test as a read would."""
    import qdpo.kernels.cuda as cuda_module

    class GuardedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*size, **kw):
            t = torch.empty(*size, **kw)
            return _guarded(t, side, keep) if t.device.type == "cpu" and t.numel() else t

        @staticmethod
        def empty_like(other, **kw):
            t = torch.empty_like(other, **kw)
            return _guarded(t, side, keep) if t.device.type == "cpu" and t.numel() else t

    monkeypatch.setattr(cuda_module, "torch", GuardedTorch())


def _unguard(keep: list) -> None:
    for _, libc, guard, page in keep:
        libc.mprotect(guard, page, 3)  # PROT_READ | PROT_WRITE again, before the mapping goes


@pytest.mark.parametrize("side", ["end", "start"])
@pytest.mark.parametrize("bits,gs", [(4, 32), (8, -1), (4, -1)])
def test_gemv_reads_stay_inside_their_operands(emulated, monkeypatch, side, bits, gs):
    """x, the packed weight, its scales and zeros and the bias each end (or start) at an unreadable
    page, for every launch choice at M = 1, 2, 5 and 16, with splits 1 and 3, on N = 37 (rows past N in
    the last tile) and K = 2080 (a partial last step): no kernel reads outside them (on a GPU,
    compute-sanitizer's question; the rows past N, lanes past K and rows of x past M that the kernels
    leave unread are the point). The path="gemm" and FMA kernels likewise. The outputs and the split-K
    workspace too, for writes."""
    cuda = emulated
    keep = []
    _guard_outputs(monkeypatch, side, keep)
    try:
        qw = _weight(37, 2080, bits, gs, wdtype=torch.bfloat16, seed=bits)
        q, s, z = (_guarded(t, side, keep) for t in (qw.qweight, qw.scales, qw.zeros))
        b = _guarded(_rand(37, dtype=torch.bfloat16, seed=2), side, keep)
        for m in (1, 2, 5, 16):
            x = _guarded(_rand(m, 2080, dtype=torch.bfloat16, seed=m), side, keep)
            for choice, splits in itertools.product(cuda.gemv_choices(m, more_warps=(6, 3)), (1, 3)):
                y = cuda.dequant_matmul(x, q, s, z, bits, b, splits=splits, **choice)
                _check_y(y, x, qw, b, f"M={m} splits={splits} {choice}")
        x = _guarded(_rand(70, 2048, dtype=torch.bfloat16, seed=70), side, keep)  # the GEMM: K % 64 == 0
        qg = _weight(37, 2048, bits, gs, wdtype=torch.bfloat16, seed=3)
        qgs = [_guarded(t, side, keep) for t in (qg.qweight, qg.scales, qg.zeros)]
        _check_y(cuda.dequant_matmul(x, *qgs, bits, b, path="gemm"), x, qg, b, "gemm")
        xf = _guarded(_rand(3, 2080, seed=4), side, keep)  # fp32 x: the FMA kernel
        _check_y(cuda.dequant_matmul(xf, q, s, z, bits, b), xf, qw, b, "fma")
        # the grouped launch on three experts of 37 rows: the last expert ends at the weights' end, the first
        # starts at their start
        qe = _weight(3 * 37, 2080, bits, gs, wdtype=torch.bfloat16, seed=5)
        qes = [_guarded(t, side, keep) for t in (qe.qweight, qe.scales, qe.zeros)]
        be = _guarded(_rand(3, 37, dtype=torch.bfloat16, seed=6), side, keep)
        xe = _guarded(_rand(3, 2080, dtype=torch.bfloat16, seed=7), side, keep)
        ye = cuda.dequant_matmul_experts(xe, torch.tensor([2, 0, 7]), *qes, bits, 3, be)
        for p, eid in enumerate((2, 0)):
            rows = slice(37 * eid, 37 * (eid + 1))
            want = cuda.dequant_matmul(xe[p:p + 1], qe.qweight[rows], qe.scales[rows], qe.zeros[rows], bits, be[eid],
                                       splits=1)
            assert torch.equal(ye[p:p + 1], want), eid
        assert not ye[2].any()
        # dequant_matmul_segments with offsets that are not ranges (decreasing, past P, negative): the kernel
        # clamps each to 0 .. P, so no read or write leaves x and y
        bad = _guarded(torch.tensor([0, 9, -4, 10**6], dtype=torch.int32), side, keep)
        assert cuda.dequant_matmul_segments(xe, bad, *qes, bits, 3, be, 2).isfinite().all()
    finally:
        _unguard(keep)


@pytest.mark.parametrize("side", ["end", "start"])
@pytest.mark.parametrize("n,k,gs,wdtype", [(7, 96, 32, torch.bfloat16), (5, 4101, -1, torch.float32),
                                           (9, 200, 40, torch.float16), (3, 14336, -1, torch.bfloat16)])
def test_element_wise_reads_stay_inside_their_operands(emulated, monkeypatch, side, n, k, gs, wdtype):
    """quantize, dequantize and fake_quant (forward, backward with and without LSQ) with every operand
    ending (or starting) at an unreadable page, both bit widths (8 for odd K), chunks of 16, 8 and 1-2 elements
    (K = 4101), block-wide teams (K = 14336), with both chunk widths the benchmarks compare; and their
    outputs, for writes."""
    cuda = emulated
    keep = []
    _guard_outputs(monkeypatch, side, keep)
    try:
        w = test_fake_quant.randn(n, k, wdtype, seed=k)
        grad = test_fake_quant.randn(n, k, wdtype, seed=k + 1)
        wg, gg = _guarded(w, side, keep), _guarded(grad, side, keep)
        for bits in (8,) if k % 2 else (4, 8):  # an odd K: 8 bits only
            q, s, z = cuda.quantize(wg, bits, gs, bits == 8)
            rq, rs, rz = ref.quantize(w, bits, gs, bits == 8)
            assert_exact(q, rq, "codes"), assert_exact(s, rs, "scales"), assert_exact(z, rz, "zeros")
            qg, sg, zg = (_guarded(t, side, keep) for t in (rq, rs, rz))
            for max_vec in (16, 8):
                assert_exact(cuda.dequantize(qg, sg, zg, bits, wdtype, max_vec=max_vec),
                             ref.dequantize(rq, rs, rz, bits, wdtype), "ŵ (dequantize)")
                assert_exact(cuda.fake_quant(wg, sg, zg, bits, wdtype, max_vec=max_vec),
                             ref.fake_quant(w, rs, rz, bits, wdtype), "ŵ (fake_quant)")
                for lsq in (False, True):
                    gw, gsc = cuda.fake_quant_backward(gg, wg, sg, zg, bits, lsq, max_vec=max_vec)
                    rw, rsc = ref.fake_quant_backward(grad, w, rs, rz, bits, lsq)
                    assert_exact(gw, rw, "∂w")
                    if lsq:
                        test_fake_quant._assert_sum_close(gsc, rsc, grad, bits)
    finally:
        _unguard(keep)


# --------------------------------------------------------------------------- bytes moved
@pytest.mark.parametrize("bits,gs", [(4, -1), (8, 32)])
def test_gemv_reads_each_weight_byte_once_and_x_once_per_block(emulated, E, bits, gs):
    """What the GEMV's header says it moves, counted load by load: the packed weight streamed exactly
    once (rows past N in the last tile of 16 · rt rows repeat row N - 1, so whole tiles are read;
    lanes past K in the partial last step load nothing), and x once per block column of the grid
    (M · K · 2 bytes per block_rows rows of ŵ, whatever the split of K) — for every launch choice,
    splits 1 and 3, M = 1, 2, 5, 16. A second read of a weight byte or of x would pass every
    result check and cost only time."""
    cuda = emulated
    n, k = 37, 2080
    qw = _weight(n, k, bits, gs, wdtype=torch.bfloat16, seed=bits)
    for m in (1, 2, 5, 16):
        x = _rand(m, k, dtype=torch.bfloat16, seed=m)
        for choice, splits in itertools.product(cuda.gemv_choices(m, more_warps=(6, 3)), (1, 3)):
            plan = cuda.gemv_plan(x, *_args(qw)[:2], bits, splits=splits, **choice)
            E.emulate_take_load_bytes()
            cuda.dequant_matmul(x, *_args(qw), splits=splits, **choice)
            x_bytes, w_bytes, x_copied = E.emulate_take_load_bytes()
            x_bytes += x_copied  # shared_x copies x with cp.async; x is the only operand a GEMV copies so
            what = f"M={m} splits={splits} {choice}"
            tile = 16 * plan["rt"]  # a warp's rows (shared_x: 16; a whole warp past N loads nothing)
            assert w_bytes == -(-n // tile) * tile * k * bits // 8, what
            assert x_bytes == -(-n // plan["block_rows"]) * m * k * 2, what
    # the grouped launch: pairs read each pair's expert rows once, segments each chosen expert's rows once;
    # each x row once per block column; an id past the experts, nothing
    qe = _weight(3 * n, k, bits, gs, wdtype=torch.bfloat16, seed=bits)
    x = _rand(4, k, dtype=torch.bfloat16, seed=4)
    for max_rows, experts_read in ((1, 3), (2, 2)):
        plan = cuda.experts_plan(x, qe.qweight, qe.scales, bits, 3, max_rows)
        E.emulate_take_load_bytes()
        cuda.dequant_matmul_experts(x, torch.tensor([2, 0, 2, 9]), *_args(qe)[:3], bits, 3, None, max_rows)
        x_bytes, w_bytes, _ = E.emulate_take_load_bytes()
        tile = 16 * plan["rt"]
        assert w_bytes == experts_read * -(-n // tile) * tile * k * bits // 8, max_rows
        assert x_bytes == 3 * -(-n // plan["block_rows"]) * k * 2, max_rows


def test_gemm_copies_each_tile_once_per_block(emulated, E):
    """path="gemm" copies (cp.async) each row of x once per 128-row block column of ŵ and each row of
    the packed weight once per 128-row block row of x; rows past M or N are zero-filled, not read."""
    cuda = emulated
    n, k = 200, 256
    for bits in (4, 8):
        qw = _weight(n, k, bits, 32, wdtype=torch.float16, seed=bits)
        for m in (1, 130, 300):
            x = _rand(m, k, dtype=torch.float16, seed=m)
            E.emulate_take_load_bytes()
            cuda.dequant_matmul(x, *_args(qw), path="gemm")
            assert E.emulate_take_load_bytes()[2] == -(-n // 128) * m * k * 2 + -(-m // 128) * n * k * bits // 8


# --------------------------------------------------------------------------- models on the cuda backend
@pytest.mark.parametrize("arch", test_quant_linear.ARCHS)
@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(8, -1, True)])
def test_quantized_models_on_the_cuda_backend(emulated, monkeypatch, arch, spec):
    """A small Hugging Face model of each architecture, quantized into QuantLinear layers, with every
    op on the cuda backend (QDPO_BACKEND=cuda): train mode (fake_quant_matmul, its backward) and packed
    mode (dequant_matmul: 22 rows, so ŵ once from the dequantize kernel, then the product) agree, as
    test_quant_linear checks on the reference."""
    monkeypatch.setenv("QDPO_BACKEND", "cuda")
    test_quant_linear.test_train_and_packed_modes_agree(arch, spec)


@pytest.mark.parametrize("arch", test_quant_linear.ARCHS)
@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(8, -1, True)])
def test_quantized_bf16_model_decodes_on_the_cuda_gemv(emulated, E, monkeypatch, arch, spec):
    """A packed bf16 model's decode step (one token per sequence: 2 rows of x, the tensor-core GEMV in
    every layer) on the cuda backend gives the reference backend's logits (fp32 sums in both; the
    reference rounds its product to bf16 before the bias, the kernel after)."""
    model = test_quant_linear.tiny(arch).to(torch.bfloat16)
    qdpo.quantize_model(model, spec)
    test_quant_linear.to_packed(model)
    ids = test_quant_linear.IDS[:, :1]
    want = model(ids).logits.float()  # auto on CPU tensors: the reference
    monkeypatch.setenv("QDPO_BACKEND", "cuda")
    for layer in test_quant_linear.quantized_layers(model).values():
        x = torch.zeros(2, layer.in_features, dtype=torch.bfloat16)
        assert emulated.gemv_plan(x, layer.qweight, layer.scales, spec.bits)["kernel"] == "mma"
    E.emulate_take_load_bytes()
    got = model(ids).logits.float()
    layers = test_quant_linear.quantized_layers(model).values()
    assert E.emulate_take_load_bytes()[1] == sum(layer.qweight.numel() for layer in layers)  # each streamed once
    assert sqnr(want, got) > 35


@pytest.mark.parametrize("arch", ["Mixtral", "GptOss", "Llama4Text"])
def test_packed_bf16_moe_decodes_on_the_grouped_gemv(emulated, monkeypatch, arch):
    """A packed bf16 mixture of experts' decode step with every op on the cuda backend: each experts
    module takes two grouped launches (dequant_matmul_experts), and the logits match the reference
    backend's per-expert launches. So does a prefill of 18 tokens (36 rows over 4 experts: 9 per expert
    on average, within one tile). Llama 4's rows its router gave no weight get no expert there."""
    import qdpo.quant.experts as experts
    from tests import test_experts

    model = test_experts.tiny_moe(arch).to(torch.bfloat16)
    qdpo.quantize_model(model, QuantSpec(4, 32), mode="packed")
    launches = []
    for op in ("dequant_matmul_experts", "dequant_matmul_segments"):  # one token: pairs; more: sorted once
        monkeypatch.setitem(backends._IMPLS["cuda"], op,
                            lambda *a, grouped=backends._IMPLS["cuda"][op]: launches.append(a[0].shape) or grouped(*a))
    # one token (pairs), two (segments), 2 × 9 (a prefill of 18 tokens: segments)
    for ids in (test_experts.IDS[:1, :1], test_experts.IDS[:, :1], test_experts.IDS):
        with torch.no_grad(), monkeypatch.context() as mp:
            mp.setattr(experts, "ROUTED_DECODE", False)
            want = model(ids).logits.float()  # auto on CPU tensors: the reference
        launches.clear()
        with torch.no_grad(), monkeypatch.context() as mp:
            mp.setenv("QDPO_BACKEND", "cuda")
            got = model(ids).logits.float()
        assert len(launches) == 2 * model.config.num_hidden_layers
        assert sqnr(want, got) > 35


@pytest.mark.parametrize("arch", ["Mixtral", "Llama4Text"])
def test_packed_fp32_moe_on_the_cuda_backend_keeps_the_per_expert_launches(emulated, monkeypatch, arch):
    """Named explicitly, the cuda backend refuses the grouped launch for fp32 x (its tensor cores take
    16-bit x); the packed experts then run per expert (the FMA GEMV) and give the reference's logits
    (Llama 4: every expert on every row)."""
    import qdpo.quant.experts as experts
    from tests import test_experts

    model = test_experts.tiny_moe(arch)
    qdpo.quantize_model(model, QuantSpec(4, 32), mode="packed")
    ids = test_experts.IDS[:1, :1]
    with torch.no_grad():
        want = model(ids).logits  # auto on CPU tensors: the reference
    matmuls, real = [], experts.QuantExpertTensor.matmul
    monkeypatch.setattr(experts.QuantExpertTensor, "matmul", lambda *a, **kw: matmuls.append(1) or real(*a, **kw))
    monkeypatch.setenv("QDPO_BACKEND", "cuda")
    with torch.no_grad():
        got = model(ids).logits
    per_layer = model.config.num_local_experts if arch == "Llama4Text" else model.config.num_experts_per_tok
    assert len(matmuls) == 2 * per_layer * model.config.num_hidden_layers
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,gs", [(4, 32), (8, -1)])
def test_quantized_layer_trains_on_the_cuda_backend(emulated, bits, gs):
    """A QuantLinear with learned scales (LSQ) in train mode: its output and the gradients of x, the
    latent weights, the scales and the bias on the cuda backend (fake_quant forward and backward
    kernels, the products from PyTorch) equal the reference backend's, up to the order of fp32 sums."""
    from torch import nn

    from qdpo import QuantLinear

    torch.manual_seed(bits)
    lin, x = nn.Linear(96, 40), torch.randn(5, 96)
    out = {}
    for backend in ("reference", "cuda"):
        q = QuantLinear.from_linear(lin, QuantSpec(bits, gs), learn_scales=True, backend=backend)
        xi = x.clone().requires_grad_()
        y = q(xi)
        y.pow(2).sum().backward()
        out[backend] = {"y": y.detach(), "dx": xi.grad, "dw": q.weight.grad, "ds": q.scales.grad, "db": q.bias.grad}
    for name, want in out["reference"].items():
        got = out["cuda"][name]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)
