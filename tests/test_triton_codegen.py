"""What the Triton kernels compile to for a GPU (sm_90 PTX, made on this machine without one).

The interpreter runs the kernels' arithmetic but not their GPU code generation, and some choices exist
only there: codes become fp32 through the bits of 2²³ (no integer-to-float conversion, a quarter-rate
instruction); a bf16 output uses the GPU's own round-to-nearest-even cast, and rounding to an integer
the GPU's rint, instead of the interpreter's bit-level and floor-based workarounds. A subprocess compiles the kernels as the GPU JIT would
(``TRITON_INTERPRET=0``, pointers and sizes divisible by 16) and reads the PTX.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from qdpo.kernels.triton import dequant_matmul as dm, dequant_matmul_gemm as dmg, dequantize as dq

    def ptx(fn, sig, const, div, warps=4):
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div}
        src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]

    ints = lambda *names: {n: "i32" for n in names}
    cexp = lambda *names: {n: "constexpr" for n in names}
    out = {}
    for bits in (4, 8):
        for words in (False, True) if bits == 4 else (False,):
            sig = {"q_ptr": "*i32" if words else "*u8", "s_ptr": "*bf16", "z_ptr": "*u8", "out_ptr": "*bf16",
                   "NG_MAGIC": "i64", **ints("R", "G", "NG", "NG_SHIFT", "stride_qn", "stride_qg", "stride_sn", "stride_sg", "stride_on"),
                   **cexp("BITS", "OUT_DTYPE", "BLOCK_R", "BLOCK_G", "WORDS", "WIDE")}
            out[f"dequantize W{bits}" + (" words" if words else "")] = ptx(dq._dequantize_kernel, sig, dict(
                BITS=bits, OUT_DTYPE=tl.bfloat16, BLOCK_R=32, BLOCK_G=128, WORDS=words, WIDE=False),
                ["q_ptr", "s_ptr", "z_ptr", "out_ptr", "R", "G", "stride_qn", "stride_on"])
        ptrs = {"x_ptr": "*bf16", "qw_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*u8", "b_ptr": "*bf16"}
        for bm, words, seg in ((1, False, False), (1, True, False), (16, False, False), (16, False, True),
                               (64, False, True), (1, True, "pairs")):
            # seg: dequant_matmul_experts' segments (each program finds its chunk of one expert's rows; 16 rows,
            # or 64 for a prefill), or its pairs (each program one row and its expert, returning at once for id -1)
            sig = {**ptrs, "qw_ptr": "*i32" if words else "*u8", "out_ptr": "*bf16", **ints("M", "N", "K", "G",
                   "K_PER_SPLIT", "stride_xm", "stride_qn", "stride_sn", "stride_om", "stride_os"), **cexp("BITS",
                   "HAS_BIAS", "PARTIAL", "OUT_DTYPE", "DOT_DTYPE", "BLOCK_M", "BLOCK_N", "BLOCK_K", "WORDS",
                   "GROUPED", "SEGMENTS", "EXPERTS_BLOCK"), "ids_ptr": "*i32" if seg else "constexpr",
                   "EXPERTS": "i32" if seg is True else "constexpr"}
            out[f"gemv W{bits} M<={bm}" + (" words" if words else "") + (f" {seg}" if seg == "pairs" else
                                                                          " segments" if seg else "")] = ptx(
                dm._gemv_kernel, sig, dict(BITS=bits, HAS_BIAS=False, PARTIAL=False, OUT_DTYPE=tl.bfloat16,
                DOT_DTYPE=tl.bfloat16, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=128, WORDS=words, GROUPED=bool(seg),
                SEGMENTS=seg is True, EXPERTS_BLOCK=128 if seg is True else 1,
                **({} if seg else {"ids_ptr": None}), **({} if seg is True else {"EXPERTS": 1})),
                [*ptrs, "out_ptr", "N", "K", "K_PER_SPLIT", "stride_xm", "stride_qn"] + (["ids_ptr"] if seg else []))
        sig = {**ptrs, "y_ptr": "*bf16", **ints("M", "N", "K", "G", "stride_xm", "stride_qn", "stride_sn", "stride_ym"),
               **cexp("BITS", "HAS_BIAS", "OUT_DTYPE", "DOT_DTYPE", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        out[f"gemm W{bits}"] = ptx(dmg._gemm_kernel, sig, dict(BITS=bits, HAS_BIAS=False, OUT_DTYPE=tl.bfloat16,
            DOT_DTYPE=tl.bfloat16, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            [*ptrs, "y_ptr", "M", "N", "K", "stride_xm", "stride_qn", "stride_ym"])
    from qdpo.kernels.triton import fake_quant as fq
    for wd in ("bf16", "fp32"):
        sig = {"w_ptr": "*" + wd, "s_ptr": "*" + wd, "z_ptr": "*u8", "out_ptr": "*bf16",
               "NG_MAGIC": "i64", **ints("R", "G", "NG", "NG_SHIFT", "stride_wn", "stride_sn", "stride_sg", "stride_on"),
               **cexp("BITS", "OUT_DTYPE", "BLOCK_R", "BLOCK_G", "WIDE")}
        out[f"fake_quant w={wd}"] = ptx(fq._fake_quant_kernel, sig, dict(BITS=4, OUT_DTYPE=tl.bfloat16, BLOCK_R=32,
            BLOCK_G=128, WIDE=False), ["w_ptr", "s_ptr", "z_ptr", "out_ptr", "R", "G", "NG", "stride_wn", "stride_on"])
    json.dump(out, sys.stdout)
''')


@pytest.fixture(scope="module")
def ptx():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if r.returncode != 0 and "GPUTarget" in r.stderr:
        pytest.skip(f"this Triton cannot compile for a GPU target here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_codes_become_fp32_without_an_integer_to_float_conversion(ptx):
    """Each thread converts 32 or more codes per step; the few conversions left are its rows' zero points
    (the code before the bits of 2²³ made 36-68 per kernel here)."""
    for name, text in ptx.items():
        if name.startswith("fake_quant"):
            continue  # no codes to read
        conversions = len(re.findall(r"cvt\.rn\.f32\.[us]\d+", text))
        assert conversions <= 4, f"{name}: {conversions} integer -> float conversions"
        # the bits of 2^23 (0x4B000000), alone or with the mask of a code kept in place (the M = 1 word path)
        magic = [v for v in map(int, re.findall(r"\b\d{10}\b", text)) if v >> 16 == 0x4B00]
        assert len(magic) >= 32, f"{name}: codes not made from the bits of 2^23"


def test_bf16_outputs_use_the_gpus_round_to_nearest_even_cast(ptx):
    for name, text in ptx.items():
        assert "cvt.rn.bf16" in text, f"{name}: no native bf16 cast"
        assert not re.search(r"add\.[su]32[^;]*\b32767\b", text), \
            f"{name}: the interpreter's bit-level rounding (+0x7FFF) in GPU code"


def test_rounding_is_the_gpus_rint_and_division_goes_through_the_rows_reciprocal(ptx):
    """fake_quant rounds w / s with one rint (cvt.rni) per element, not the interpreter's floor-based
    ties-to-even (cvt.rmi), and its common path divides once per row: the tile branch that holds a
    division per element (every scale within 2^±100 keeps out of it) is the only other one."""
    for name in ("fake_quant w=bf16", "fake_quant w=fp32"):
        text = ptx[name]
        assert "cvt.rni.f32.f32" in text and "cvt.rmi.f32.f32" not in text, name
        assert "fma.rn.f32" in text, f"{name}: no FMA correction of the reciprocal's quotient"


def test_word_paths_mask_codes_in_place(ptx):
    """The M = 1 GEMV and the W4 dequantize read whole 32-bit words and mask each code where it lies
    under the bits of 2²³ (one AND per code), instead of shifting every code down to bit 0. Static sm_90
    SASS: the GEMV loop, 64 × 128 tiles and 4 warps, 5.5 instructions per W4 code against 7.7 (128 × 128:
    4.4); dequantize, 32 × 128 tiles and 8 warps, 13.9 per element against 17.1."""
    masks = {4: {0x4B00000F, 0x4B0000F0, 0x4B000F00, 0x4B00F000}, 8: {0x4B0000FF, 0x4B00FF00}}
    for name, want in (("gemv W4 M<=1", masks[4]), ("gemv W8 M<=1", masks[8]), ("dequantize W4", masks[4])):
        found = {v for v in map(int, re.findall(r"\b\d{10}\b", ptx[name + " words"])) if v >> 16 == 0x4B00}
        assert want <= found, f"{name}: in-place masks {sorted(map(hex, want - found))} missing"
