"""Static sm_90 instruction counts of the kernels, on a machine without a GPU: how the README's
"static" numbers are made, so that anyone can make them again.

* ``--triton``: compiles qdpo's Triton kernels for ``GPUTarget("cuda", 90)`` as the GPU JIT would
  (``TRITON_INTERPRET=0``, pointers, sizes and strides divisible by 16), disassembles the cubin with
  the ``cuobjdump`` of Triton's wheel and prints, per kernel, the instructions of its main loop per
  weight code (the M = 1 GEMV) or of the whole kernel per element (the element-wise kernels, whose
  threads each take one tile), and for the fake_quant forward also those of the path a tile of
  positive scales within 2^±100 runs (``first_branch_path``).
* ``--cuda``: reads the sm_90 SASS of the built ``qdpo._C`` (or ``--so PATH``) and prints, per kernel
  whose name matches ``--match``, its registers, its loops (instructions between a backward branch and
  its target) and the widths of its global loads and stores.

These are counts of instructions in the code, not of instructions executed, and not times: a loop
holds every branch of a run-time dtype, and only a GPU can weigh instructions against latency::

    python benchmarks/static_sass.py --triton
    python benchmarks/static_sass.py --cuda --match "fake_quant_kernel|dequantize_kernel"
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def cuobjdump() -> str:
    """The CUDA toolkit's cuobjdump, else the copy in Triton's wheel."""
    from shutil import which

    found = which("cuobjdump")
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if found:
        return found
    if bundled.exists():
        return str(bundled)
    raise SystemExit("no cuobjdump: install the CUDA toolkit or a Triton wheel with its NVIDIA backend")


def instructions(sass: str) -> list[tuple[int, str]]:
    """``(address, text)`` of each instruction of one function's SASS (the NOPs that pad it left out)."""
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and m.group(2) != "NOP":
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def loops(ins: list[tuple[int, str]]) -> list[int]:
    """Sizes of the loops: the instructions from a backward branch's target to the branch, largest first."""
    sizes = []
    for addr, text in ins:
        if "BRA" in text:
            target = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1])
            if target and int(target.group(1), 16) < addr:
                lo = int(target.group(1), 16)
                sizes.append(sum(1 for a, _ in ins if lo <= a <= addr))
    return sorted(sizes, reverse=True)


def first_branch_path(ins: list[tuple[int, str]]) -> int | None:
    """Instructions on the path of a kernel whose one tile-wide branch (after its first warp reduction,
    REDUX) goes the first way: from the entry to the unconditional jump that ends that branch, then
    from the jump's target to the first EXIT. None when the code has no such shape. Counts the code on
    the path, the blocks it jumps over inside it included (the reciprocal's rarely taken fix-up calls)."""
    at = {a: i for i, (a, _) in enumerate(ins)}
    reduce = next((i for i, (_, t) in enumerate(ins) if t.startswith("REDUX")), None)
    if reduce is None:
        return None
    cond = next((i for i, (_, t) in enumerate(ins) if i > reduce and re.match(r"@!?U?P\d BRA", t)), None)
    if cond is None:
        return None
    other = int(ins[cond][1].split("0x")[-1], 16)  # where the other way starts
    ends = [i for i, (a, t) in enumerate(ins) if cond < i and a < other and re.match(r"BRA 0x", t)]
    if not ends or int(ins[ends[-1]][1].split("0x")[-1], 16) not in at:
        return None
    merge = at[int(ins[ends[-1]][1].split("0x")[-1], 16)]
    exit_ = next((i for i in range(merge, len(ins)) if "EXIT" in ins[i][1]), None)
    return None if exit_ is None else ends[-1] + 1 + exit_ - merge + 1


def functions(sass: str) -> dict[str, str]:
    """Each function's SASS, by its mangled name."""
    return {block.split("\n", 1)[0].strip(): block for block in sass.split("Function : ")[1:]}


# --------------------------------------------------------------------------- Triton
def _compile(fn, sig: dict, const: dict, div: list[str], warps: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def _sass_of(kernel) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        return subprocess.run([cuobjdump(), "-sass", str(path)], capture_output=True, text=True, check=True).stdout


def triton_rows():
    """``(kernel, instructions, per, unit)`` rows for qdpo's Triton kernels (module docstring)."""
    from qdpo.kernels.triton import dequant_matmul as dm, dequantize as dq, fake_quant as fq

    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    cexp = lambda *names: {n: "constexpr" for n in names}  # noqa: E731
    for bits in (4, 8):
        for words, (bn, bk, warps) in [(w, c) for w in (False, True) for c in ((64, 128, 4), (128, 128, 4))]:
            ptrs = {"x_ptr": "*bf16", "qw_ptr": "*i32" if words else "*u8", "s_ptr": "*bf16", "z_ptr": "*u8",
                    "b_ptr": "*bf16"}
            sig = {**ptrs, "out_ptr": "*fp32", **ints("M", "N", "K", "G", "K_PER_SPLIT", "stride_xm", "stride_qn",
                   "stride_sn", "stride_om", "stride_os"), **cexp("BITS", "HAS_BIAS", "PARTIAL", "OUT_DTYPE",
                   "DOT_DTYPE", "BLOCK_M", "BLOCK_N", "BLOCK_K", "WORDS", "ids_ptr", "GROUPED", "SEGMENTS",
                   "EXPERTS", "EXPERTS_BLOCK")}
            k = _compile(dm._gemv_kernel, sig, dict(BITS=bits, HAS_BIAS=False, PARTIAL=True, OUT_DTYPE=tl.bfloat16,
                         DOT_DTYPE=tl.bfloat16, BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, WORDS=words, ids_ptr=None,
                         GROUPED=False, SEGMENTS=False, EXPERTS=1, EXPERTS_BLOCK=1),
                         [*ptrs, "out_ptr", "N", "K", "K_PER_SPLIT", "stride_xm", "stride_qn"], warps)
            body = loops(instructions(_sass_of(k)))[0]
            name = f"gemv M=1 W{bits} {'words' if words else 'bytes'} {bn}x{bk} {warps} warps"
            yield name, body, bn * bk / (32 * warps), "code (main loop)"
    grid = {"NG_MAGIC": "i64", **ints("R", "G", "NG", "NG_SHIFT")}
    for bits, words in ((4, False), (4, True), (8, False)):
        sig = {"q_ptr": "*i32" if words else "*u8", "s_ptr": "*bf16", "z_ptr": "*u8", "out_ptr": "*bf16", **grid,
               **ints("stride_qn", "stride_qg", "stride_sn", "stride_sg", "stride_on"),
               **cexp("BITS", "OUT_DTYPE", "BLOCK_R", "BLOCK_G", "WORDS", "WIDE")}
        k = _compile(dq._dequantize_kernel, sig, dict(BITS=bits, OUT_DTYPE=tl.bfloat16, BLOCK_R=32, BLOCK_G=128,
                     WORDS=words, WIDE=False), ["q_ptr", "s_ptr", "z_ptr", "out_ptr", "R", "G", "stride_qn",
                                                "stride_on", "stride_qg"], 8)
        yield f"dequantize W{bits} {'words' if words else 'bytes'} bf16 32x128 8 warps", \
            len(instructions(_sass_of(k))), 16, "element (whole kernel)"
    for wd in ("bf16", "fp32"):
        t = {"bf16": tl.bfloat16, "fp32": tl.float32}[wd]
        sig = {"w_ptr": "*" + wd, "s_ptr": "*" + wd, "z_ptr": "*u8", "out_ptr": "*bf16", **grid,
               **ints("stride_wn", "stride_sn", "stride_sg", "stride_on"),
               **cexp("BITS", "OUT_DTYPE", "BLOCK_R", "BLOCK_G", "WIDE")}
        k = _compile(fq._fake_quant_kernel, sig, dict(BITS=4, OUT_DTYPE=tl.bfloat16, BLOCK_R=32, BLOCK_G=128,
                     WIDE=False), ["w_ptr", "s_ptr", "z_ptr", "out_ptr", "R", "G", "NG", "stride_wn", "stride_on"], 8)
        ins = instructions(_sass_of(k))
        yield f"fake_quant forward w={wd} 32x128 8 warps", len(ins), 16, "element (whole kernel, both division paths)"
        path = first_branch_path(ins)
        if path:
            yield f"fake_quant forward w={wd} 32x128 8 warps, reciprocal path", path, 16, \
                "element (the tile's path when its scales are positive and within 2^±100)"
        sig = {"g_ptr": "*" + wd, "w_ptr": "*" + wd, "s_ptr": "*" + wd, "z_ptr": "*u8", "gw_ptr": "*" + wd,
               "gs_ptr": "*" + wd, **grid, **ints("stride_gn", "stride_wn", "stride_sn", "stride_sg", "stride_gwn"),
               **cexp("BITS", "W_DTYPE", "S_DTYPE", "NEED_GS", "BLOCK_R", "BLOCK_G", "N_CHUNKS", "WIDE")}
        k = _compile(fq._fake_quant_backward_kernel, sig, dict(BITS=4, W_DTYPE=t, S_DTYPE=t, NEED_GS=False,
                     BLOCK_R=32, BLOCK_G=128, N_CHUNKS=1, WIDE=False),
                     ["g_ptr", "w_ptr", "s_ptr", "z_ptr", "gw_ptr", "R", "G", "NG", "stride_gn", "stride_wn",
                      "stride_gwn"], 8)
        yield f"fake_quant backward w={wd} 32x128 8 warps", len(instructions(_sass_of(k))), 16, \
            "element (whole kernel, both division paths)"


# --------------------------------------------------------------------------- cuda
def cuda_rows(so: str, match: str):
    """``(kernel, registers, loops, memory ops)`` for the sm_90 kernels of ``so`` whose demangled name
    matches ``match``."""
    tool = cuobjdump()
    run = subprocess.run([tool, "-sass", "-arch", "sm_90", so], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"cuobjdump cannot read {so}: {run.stderr.strip()[-300:]} (a qdpo._C built for sm_90?)")
    sass = run.stdout
    usage = subprocess.run([tool, "-res-usage", "-arch", "sm_90", so], capture_output=True, text=True).stdout
    regs = dict(re.findall(r"Function (\S+):\s*\n\s*REG:(\d+)", usage))
    names = list(functions(sass))
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n") \
        if names else []
    for (name, body), pretty in zip(functions(sass).items(), demangled or names):
        pretty = re.sub(r"\(.*", "", pretty.replace("(anonymous namespace)::", ""))
        if not re.search(match, pretty):
            continue
        mem = Counter(re.findall(r"\b((?:LDG|STG)(?:\.[A-Z0-9]+)*)\b", body))
        yield pretty, regs.get(name, "?"), loops(instructions(body))[:3], dict(sorted(mem.items()))


def _built_extension() -> str:
    import importlib.util

    spec = importlib.util.find_spec("qdpo._C")
    if spec is None or not spec.origin:
        raise SystemExit("qdpo._C is not built here: python setup.py build_ext --inplace (needs nvcc), or --so PATH")
    return spec.origin


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triton", action="store_true", help="count the Triton kernels")
    ap.add_argument("--cuda", action="store_true", help="count the built extension's kernels")
    ap.add_argument("--so", help="the extension to read (default: the built qdpo._C)")
    ap.add_argument("--match", default="gemv_mma_kernel<2, 4, 1, 1|fake_quant|dequantize_kernel",
                    help="regular expression over the cuda kernels' demangled names")
    args = ap.parse_args(argv)
    # compile for the GPU, whatever the caller's environment says; set before the kernels' modules are
    # imported (triton_rows), since their decorators and qdpo's INTERPRETED read it then
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if not (args.triton or args.cuda):
        ap.error("say --triton, --cuda or both")
    if args.triton:
        print("| Triton kernel (sm_90) | instructions | per |")
        print("| --- | --- | --- |")
        for name, count, per, unit in triton_rows():
            print(f"| {name} | {count} | {count / per:.2f} per {unit} |")
    if args.cuda:
        print("| cuda kernel (sm_90) | registers | loops | global loads and stores |")
        print("| --- | --- | --- | --- |")
        for name, regs, sizes, mem in cuda_rows(args.so or _built_extension(), args.match):
            print(f"| {name} | {regs} | {sizes} | {mem} |")


if __name__ == "__main__":
    main()
