"""Build script: metadata lives in pyproject.toml; this file builds ``qdpo._C``.

The CUDA extension is compiled from ``csrc/`` when ``nvcc`` is found and
``QDPO_SKIP_CUDA_BUILD`` is not ``1``. Without it qdpo installs and works with
its reference and Triton backends.

``torch.utils.cpp_extension.CUDAExtension`` cannot be used: with a CPU torch
wheel it refuses to find CUDA. Instead each ``.cu`` is compiled by ``nvcc``
into an object, and a plain pybind11 module is linked against the static CUDA
runtime; the module takes raw device pointers, so it needs no torch headers
and imports on a machine without a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
# sm_80 (A100) and sm_90 (H100/H200) machine code, plus the last one's PTX for newer GPUs;
# override with QDPO_CUDA_ARCHS="80;89;90".
DEFAULT_ARCHS = "80;90"


def find_nvcc() -> str | None:
    """``nvcc`` from ``CUDA_HOME``/``CUDA_PATH``, else from the PATH, else None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_root(nvcc: str) -> Path:
    """The toolkit root (with include/ and lib64/); follows an nvcc wrapper script."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    out = subprocess.run([nvcc, "-v", "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return Path(line.split("=", 1)[1].strip()).resolve()
    return Path(nvcc).resolve().parent.parent


def want_cuda() -> str | None:
    if os.environ.get("QDPO_SKIP_CUDA_BUILD") == "1":
        print("qdpo: QDPO_SKIP_CUDA_BUILD=1, not building the CUDA extension", file=sys.stderr)
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        print("qdpo: nvcc not found, not building the CUDA extension", file=sys.stderr)
    return nvcc


class BuildExt(build_ext):
    """Compile ``csrc/*.cu`` with nvcc, then link them into the pybind11 module."""

    def build_extensions(self) -> None:
        nvcc = find_nvcc()
        root = cuda_root(nvcc)
        archs = os.environ.get("QDPO_CUDA_ARCHS", DEFAULT_ARCHS).replace(",", ";").split(";")
        archs = [a for a in archs if a]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        # PTX of the newest arch too: the driver compiles it for GPUs newer than every listed one
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        build_tmp = Path(self.build_temp)
        build_tmp.mkdir(parents=True, exist_ok=True)
        for ext in self.extensions:
            cmds = {}
            for src in [s for s in ext.sources if s.endswith(".cu")]:
                obj = str(build_tmp / (Path(src).stem + ".o"))
                cmds[obj] = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                             "--expt-relaxed-constexpr", f"-I{CSRC}", *gencode]
                print(" ".join(cmds[obj]), file=sys.stderr)
            # one nvcc per source, as many at once as there are cores (the GEMV's file is most of the time)
            with ThreadPoolExecutor(max(1, min(len(cmds), os.cpu_count() or 1))) as pool:
                list(pool.map(subprocess.check_call, cmds.values()))
            objs = list(cmds)
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = objs
            ext.include_dirs += [str(root / "include"), str(CSRC)]
            ext.library_dirs += [str(root / "lib64"), str(root / "lib")]
            ext.libraries += ["cudart_static", "dl", "pthread", "rt"]
        super().build_extensions()


def extensions():
    if want_cuda() is None:
        return []
    from pybind11.setup_helpers import Pybind11Extension

    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    # every file of csrc/: setuptools relinks only when one of these is newer than the module (the .cu
    # objects are compiled above, out of its sight)
    depends = sorted(str(p.relative_to(ROOT)) for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".h"))
    return [Pybind11Extension("qdpo._C", sources, depends=depends, cxx_std=17)]


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
