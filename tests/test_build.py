"""The optional CUDA extension build (setup.py) and the shared host/device math of csrc/.

nvcc is on this machine but no GPU: the extension must compile, import, and
its __host__ __device__ math must match the reference bit for bit. Without
nvcc (or with QDPO_SKIP_CUDA_BUILD=1) the build must skip the extension and
qdpo must still work.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qdpo.kernels import reference as ref

ROOT = Path(__file__).resolve().parents[1]
HAS_NVCC = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))


def _build(tmp: Path, env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp / "lib"),
           "--build-temp", str(tmp / "tmp")]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def _built_module(tmp: Path):
    found = list((tmp / "lib" / "qdpo").glob("_C*.so"))
    return found[0] if found else None


def test_skip_env_builds_nothing(tmp_path):
    out = _build(tmp_path, {"QDPO_SKIP_CUDA_BUILD": "1"})
    assert out.returncode == 0, out.stderr
    assert "QDPO_SKIP_CUDA_BUILD=1" in out.stderr
    assert _built_module(tmp_path) is None


def test_no_nvcc_builds_nothing(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CUDA_HOME": "", "CUDA_PATH": ""}
    out = _build(tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert "nvcc not found" in out.stderr
    assert _built_module(tmp_path) is None


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    if not HAS_NVCC:
        pytest.skip("nvcc not installed")
    tmp = tmp_path_factory.mktemp("cuda_build")
    out = _build(tmp, {})
    assert out.returncode == 0, f"CUDA extension failed to build:\n{out.stderr[-4000:]}"
    so = _built_module(tmp)
    assert so is not None
    # the module's init function is named after "_C": load it under that name
    spec = importlib.util.spec_from_file_location("_C", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_extension_compiles_and_imports_without_gpu(ext):
    assert ext.runtime_version() >= 12000
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            ext.device_count()


@pytest.mark.parametrize("bits", [4, 8])
def test_host_math_matches_reference(ext, bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.cat([torch.randn(1, 256, generator=g) * 3, (torch.arange(-16, 16) * 0.5).reshape(1, 32).repeat(1, 8)], 1)
    for sym in (False, True):
        s, z = ref.qparams(w, bits, 32, sym)
        q = ref.quantize_codes(w, s, z, bits)
        mask = ref.fake_quant_mask(w * 1.5, s, z, bits)
        w_hat = ref.dequantize_codes(q, s, z, torch.float32)
        for k in range(w.shape[1]):
            sk, zk = s[0, k // 32].item(), float(z[0, k // 32])
            assert ext.host_quantize_one(w[0, k].item(), sk, zk, bits) == q[0, k].item()
            assert ext.host_ste_pass((w[0, k] * 1.5).item(), sk, zk, bits) == mask[0, k].item()
            assert ext.host_dequantize_one(int(q[0, k]), sk, zk) == w_hat[0, k].item()


def test_host_nibble_packing_matches_reference(ext):
    codes = torch.randint(0, 16, (1, 64), dtype=torch.uint8)
    packed = ref.pack(codes, 4)
    for j in range(32):
        byte = ext.host_pack_nibbles(int(codes[0, 2 * j]), int(codes[0, 2 * j + 1]))
        assert byte == packed[0, j].item()
        assert ext.host_unpack_nibble(byte, 0) == codes[0, 2 * j].item()
        assert ext.host_unpack_nibble(byte, 1) == codes[0, 2 * j + 1].item()


def test_qdpo_works_without_the_extension():
    code = ("import sys; sys.modules['qdpo._C'] = None\n"
            "import torch, qdpo\n"
            "from qdpo.kernels import backends\n"
            "assert 'cuda' not in backends.available('cpu')\n"
            "qw = qdpo.quantize(torch.randn(4, 64), qdpo.QuantSpec(4, 32))\n"
            "print(qdpo.dequant_matmul(torch.randn(2, 64), qw).shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 4])" in out.stdout


def test_console_scripts_name_callables():
    """Each [project.scripts] entry (qdpo-train, qdpo-export) points at a main(argv) that exists."""
    import importlib
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"qdpo-train", "qdpo-export"}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
    assert scripts["qdpo-export"] == "qdpo.export:main"
