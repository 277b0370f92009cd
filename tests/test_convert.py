"""qdpo.quant.convert: round trips qdpo → format → qdpo, the on-disk layouts, and the errors."""

import importlib.util

import pytest
import torch

from qdpo import QuantSpec, QuantizedWeight
from qdpo.kernels import reference as ref
from qdpo.quant import convert
from qdpo.quant.convert import FormatError
from tests.conftest import assert_exact

SCALE_DTYPES = {"compressed-tensors": (torch.float32, torch.bfloat16, torch.float16),
                "gptq": (torch.float16,), "awq": (torch.float16,)}
# (N, K) per group size: N odd (or not a multiple of 8) where the format pads, a multiple of 8 where it must be.
CT_SHAPES = {-1: (37, 36), 32: (67, 96), 64: (33, 128), 128: (13, 256)}
PACKED_SHAPES = {-1: (40, 72), 32: (24, 96), 64: (16, 128), 128: (8, 256)}


def random_weight(n: int, k: int, spec: QuantSpec, dtype: torch.dtype, seed: int = 0, zmin: int = 0) -> QuantizedWeight:
    """Every code and zero point value appears (incl. 2^b - 1, whose int32 fields set the sign bit)."""
    gen = torch.Generator().manual_seed(seed)
    g = k // spec.group_size_for(k)
    codes = torch.randint(0, 1 << spec.bits, (n, k), generator=gen, dtype=torch.uint8)
    if spec.symmetric:
        zeros = torch.full((n, g), 1 << (spec.bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(zmin, 1 << spec.bits, (n, g), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, g, generator=gen) * 0.1 + 1e-3).to(dtype)
    return QuantizedWeight(ref.pack(codes, spec.bits), scales, zeros, spec, (n, k), dtype)


def assert_same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert a.shape == b.shape and a.spec == b.spec
    assert_exact(a.qweight, b.qweight, "codes")
    assert_exact(a.zeros, b.zeros, "zeros")
    assert_exact(a.scales, b.scales, "scales")


def cases(fmt):
    bits = (4,) if fmt == "awq" else (4, 8)
    shapes = CT_SHAPES if fmt == "compressed-tensors" else PACKED_SHAPES
    for b in bits:
        for g, (n, k) in shapes.items():
            for sym in (False, True):
                for dt in SCALE_DTYPES[fmt]:
                    yield pytest.param(b, g, sym, dt, n, k, id=f"W{b}-g{g}-{'sym' if sym else 'asym'}-{str(dt)[6:]}")


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("bits,group,sym,dtype,n,k", list(cases("compressed-tensors")))
def test_round_trip_compressed_tensors(bits, group, sym, dtype, n, k):
    spec = QuantSpec(bits, group, sym)
    qw = random_weight(n, k, spec, dtype)
    t = convert.to_compressed_tensors(qw)
    per = 32 // bits
    assert t["weight_packed"].shape == (n, -(-k // per)) and t["weight_packed"].dtype == torch.int32
    assert t["weight_scale"].dtype == dtype and t["weight_shape"].tolist() == [n, k]
    assert ("weight_zero_point" in t) == (not sym)
    if not sym:
        assert t["weight_zero_point"].shape == (-(-n // per), k // spec.group_size_for(k))
    assert_same(convert.from_compressed_tensors(t, spec), qw)


@pytest.mark.parametrize("bits,group,sym,dtype,n,k", list(cases("gptq")))
def test_round_trip_gptq(bits, group, sym, dtype, n, k):
    spec = QuantSpec(bits, group, sym)
    qw = random_weight(n, k, spec, dtype, zmin=1)
    t = convert.to_gptq(qw)
    per, g = 32 // bits, k // spec.group_size_for(k)
    assert t["qweight"].shape == (k // per, n) and t["qzeros"].shape == (g, n // per)
    assert t["scales"].shape == (g, n) and t["scales"].dtype == torch.float16
    assert_same(convert.from_gptq(t, spec), qw)


@pytest.mark.parametrize("bits,group,sym,dtype,n,k", list(cases("awq")))
def test_round_trip_awq(bits, group, sym, dtype, n, k):
    spec = QuantSpec(bits, group, sym)
    qw = random_weight(n, k, spec, dtype)
    t = convert.to_awq(qw)
    assert t["qweight"].shape == (k, n // 8) and t["qzeros"].shape == (k // spec.group_size_for(k), n // 8)
    assert_same(convert.from_awq(t, spec), qw)


def test_round_trip_gptq_v2_keeps_zero_point_zero():
    qw = random_weight(16, 64, QuantSpec(4, 32, False), torch.float16)
    assert bool((qw.zeros == 0).any())
    assert_same(convert.from_gptq(convert.to_gptq(qw, v2=True), qw.spec, v2=True), qw)


def test_round_trip_rtn_weights():
    """Real RTN grids (not random codes) survive every format."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3)).half()
    spec = QuantSpec(4, 64, False)
    qweight, s, z = ref.quantize(w, 4, 64, False)
    qw = QuantizedWeight(qweight, s, z, spec, (32, 128), torch.float16)
    assert_same(convert.from_compressed_tensors(convert.to_compressed_tensors(qw), spec), qw)
    assert_same(convert.from_gptq(convert.to_gptq(qw), spec), qw)
    assert_same(convert.from_awq(convert.to_awq(qw), spec), qw)


# ----------------------------------------------------------------------------- layouts, written out by hand
def _word(fields, bits):
    v = sum(int(f) << (bits * i) for i, f in enumerate(fields))
    return v - (1 << 32) if v >= 1 << 31 else v


@pytest.mark.parametrize("bits", (4, 8))
def test_gptq_layout(bits):
    """qweight[r, n] holds codes k = r·(32/b) … in ascending fields; qzeros hold z - 1; g_idx = k // G."""
    spec = QuantSpec(bits, 32, False)
    qw = random_weight(8, 64, spec, torch.float16, seed=1, zmin=1)
    t = convert.to_gptq(qw)
    codes, per = ref.unpack(qw.qweight, bits), 32 // bits
    for r, n in ((0, 0), (1, 5), (64 // per - 1, 7)):
        assert t["qweight"][r, n].item() == _word(codes[n, r * per:(r + 1) * per], bits)
    for g, j in ((0, 0), (1, 8 // per - 1)):
        assert t["qzeros"][g, j].item() == _word([qw.zeros[j * per + i, g] - 1 for i in range(per)], bits)
    assert t["g_idx"].tolist() == [k // 32 for k in range(64)]
    # GPTQ's dequantization, ŵ[k, n] = (q - (stored + 1)) · s, is qdpo's ŵᵀ in float16
    q = torch.stack([(t["qweight"][k // per] >> (bits * (k % per))) & ((1 << bits) - 1) for k in range(64)])
    zs = torch.stack([(t["qzeros"][:, n // per] >> (bits * (n % per))) & ((1 << bits) - 1) for n in range(8)], 1)
    w = ((q - (zs[t["g_idx"].long()] + 1)).float() * t["scales"][t["g_idx"].long()].float()).half()
    assert_exact(w, ref.dequantize(qw.qweight, qw.scales, qw.zeros, bits, torch.float16).t(), "ŵ")


def test_awq_layout():
    """Field i of a word holds column 8j + [0, 2, 4, 6, 1, 3, 5, 7][i]; zeros are stored as z."""
    spec = QuantSpec(4, 32, False)
    qw = random_weight(16, 64, spec, torch.float16, seed=2)
    t = convert.to_awq(qw)
    codes, order = ref.unpack(qw.qweight, 4), (0, 2, 4, 6, 1, 3, 5, 7)
    for k, j in ((0, 0), (3, 1), (63, 1)):
        assert t["qweight"][k, j].item() == _word([codes[8 * j + order[i], k] for i in range(8)], 4)
    assert t["qzeros"][1, 1].item() == _word([qw.zeros[8 + order[i], 1] for i in range(8)], 4)


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="compressed-tensors not installed")
@pytest.mark.parametrize("bits", (4, 8))
def test_compressed_tensors_layout_matches_the_library(bits):
    """Same words as compressed-tensors' own packer (which takes signed q - 2^(b-1))."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    spec = QuantSpec(bits, 32, False)
    qw = random_weight(37, 96, spec, torch.float32, seed=4)
    t = convert.to_compressed_tensors(qw)
    half = 1 << (bits - 1)
    signed = (ref.unpack(qw.qweight, bits).to(torch.int32) - half).to(torch.int8)
    assert_exact(t["weight_packed"], pack_to_int32(signed, bits), "weight_packed")
    zp = (qw.zeros.to(torch.int32) - half).to(torch.int8)
    assert_exact(t["weight_zero_point"], pack_to_int32(zp, bits, packed_dim=0), "weight_zero_point")


# ----------------------------------------------------------------------------- what a format cannot hold
def test_fp32_scales_need_permission_for_float16_formats():
    qw = random_weight(16, 64, QuantSpec(4, 32, False), torch.float32, zmin=1)
    for to in (convert.to_gptq, convert.to_awq):
        with pytest.raises(FormatError, match=r"not exactly representable in torch.float16.*compressed-tensors"):
            to(qw)
        rounded = to(qw, allow_inexact_scales=True)["scales"]
        assert_exact(rounded, qw.scales.t().half(), "rounded scales")
    assert_same(convert.from_compressed_tensors(convert.to_compressed_tensors(qw), qw.spec), qw)


def test_scale_overflowing_float16_always_raises():
    qw = random_weight(8, 32, QuantSpec(4, 32, True), torch.float32)
    qw.scales[0, 0] = 1e6
    with pytest.raises(FormatError, match="overflows"):
        convert.to_gptq(qw, allow_inexact_scales=True)


def test_gptq_v1_refuses_zero_point_zero():
    qw = random_weight(16, 64, QuantSpec(4, 32, False), torch.float16)
    with pytest.raises(FormatError, match="zero points are 0.*GPTQ v1"):
        convert.to_gptq(qw)


def test_awq_is_4_bit_only():
    qw = random_weight(16, 64, QuantSpec(8, 32, False), torch.float16)
    with pytest.raises(FormatError, match="AWQ GEMM is 4-bit only"):
        convert.to_awq(qw)
    with pytest.raises(FormatError, match="4-bit only"):
        convert.from_awq({}, QuantSpec(8, 32, False))


@pytest.mark.parametrize("fmt,n,k,bits,what", [("awq", 36, 64, 4, "N"), ("gptq", 36, 64, 4, "N"),
                                               ("gptq", 16, 36, 4, "K"), ("gptq", 18, 64, 8, "N")])
def test_n_k_divisibility(fmt, n, k, bits, what):
    qw = random_weight(n, k, QuantSpec(bits, -1 if k == 36 else 32, False), torch.float16, zmin=1)
    with pytest.raises(FormatError, match=f"needs {what} .*divisible by {32 // bits}; export as compressed-tensors"):
        (convert.to_awq if fmt == "awq" else convert.to_gptq)(qw)
    assert_same(convert.from_compressed_tensors(convert.to_compressed_tensors(qw), qw.spec), qw)


def test_awq_symmetric_is_written_with_its_constant_zero_point():
    spec = QuantSpec(4, 32, True)
    t = convert.to_awq(random_weight(8, 64, spec, torch.float16))
    assert bool((t["qzeros"] == _word([8] * 8, 4)).all())
    t["qzeros"][0, 0] = _word([7] * 8, 4)
    with pytest.raises(FormatError, match="symmetric but the zero points are not all 8"):
        convert.from_awq(t, spec)


# ----------------------------------------------------------------------------- bad files
def test_compressed_tensors_symmetric_config_checks_a_stored_zero_point():
    # an asymmetric weight read with a symmetric config was read with zero point 2^(b-1): other numbers
    asym = convert.to_compressed_tensors(random_weight(24, 64, QuantSpec(4, 32, False), torch.float16))
    with pytest.raises(FormatError, match="config says symmetric but weight_zero_point holds other zero points"):
        convert.from_compressed_tensors(asym, QuantSpec(4, 32, True))
    for bits in (4, 8):  # the symmetric zero point, packed or unpacked (older writers), is read as it is
        spec = QuantSpec(bits, 32, True)
        qw = random_weight(24, 64, spec, torch.float16)
        t = convert.to_compressed_tensors(qw)
        for zp in (convert._pack_words(qw.zeros.t(), bits).t().contiguous(), torch.zeros(24, 2, dtype=torch.int8)):
            assert_same(convert.from_compressed_tensors({**t, "weight_zero_point": zp}, spec), qw)


def test_gptq_symmetric_zero_points_in_the_other_format_name_checkpoint_format():
    # gptq_v2 data whose config says v1 (or the reverse) read as "not all 8; read it with symmetric=False":
    # an asymmetric read then takes every zero point off by one, a silently wrong model
    spec = QuantSpec(4, 32, True)
    qw = random_weight(8, 64, spec, torch.float16)
    for written_v2 in (True, False):
        t = convert.to_gptq(qw, v2=written_v2)
        other = "gptq_v2" if written_v2 else "gptq"
        with pytest.raises(FormatError, match=f"every zero point is {9 if written_v2 else 7}, not 8.*set the "
                                              f"config's checkpoint_format to '{other}'"):
            convert.from_gptq(t, spec, v2=not written_v2)
        assert_same(convert.from_gptq(t, spec, v2=written_v2), qw)
    asym = convert.to_gptq(random_weight(8, 64, QuantSpec(4, 32, False), torch.float16, zmin=1))
    with pytest.raises(FormatError, match="either the weight is asymmetric .* or the checkpoint_format"):
        convert.from_gptq(asym, spec)


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_unpacked_asymmetric_zero_points(bits):
    # older compressed-tensors releases stored one signed zero point per group ([N, K/G], z - 2^(b-1)), not packed
    # along N: qdpo refused them with "weight_zero_point has shape (24, 2), expected (3, 2)" and no way out
    spec = QuantSpec(bits, 32, False)
    qw = random_weight(24, 64, spec, torch.float16)
    t = convert.to_compressed_tensors(qw)
    signed = convert._unpack_words(t["weight_zero_point"].t(), bits, 24).t().to(torch.int16) - (1 << (bits - 1))
    for zp in (signed.to(torch.int8), signed.to(torch.int32)):
        assert_same(convert.from_compressed_tensors({**t, "weight_zero_point": zp}, spec), qw)
    with pytest.raises(FormatError, match=r"unpacked \(24, 2\) but holds .*outside the signed"):
        convert.from_compressed_tensors({**t, "weight_zero_point": signed.to(torch.int32) + (1 << (bits - 1))}, spec)
    with pytest.raises(FormatError, match=r"expected int32 \((3|6), 2\) \(packed along N\) or integers \(24, 2\)"):
        convert.from_compressed_tensors({**t, "weight_zero_point": signed[:5]}, spec)


def test_act_order_g_idx_is_refused():
    spec = QuantSpec(4, 32, True)
    t = convert.to_gptq(random_weight(8, 64, spec, torch.float16))
    t["g_idx"] = t["g_idx"].flip(0)
    with pytest.raises(FormatError, match="act-order .* not supported"):
        convert.from_gptq(t, spec)
    ct = convert.to_compressed_tensors(random_weight(8, 64, spec, torch.float16))
    ct["weight_g_idx"] = torch.randperm(64, generator=torch.Generator().manual_seed(0)) // 32
    with pytest.raises(FormatError, match="act-order"):
        convert.from_compressed_tensors(ct, spec)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(8, 64, False)], ids=lambda s: s.name)
def test_converters_keep_their_inputs_device_not_the_default_one(spec):
    # g_idx was compared with a tensor made on the default device (torch.device(...) / set_default_device):
    # from_gptq raised there; symmetric compressed-tensors zero points, GPTQ's g_idx and CT's weight_shape
    # were made there too, away from the other tensors. meta stands for another device on a CPU machine.
    qw = random_weight(16, 128, spec, torch.float16)
    tensors = {"gptq": convert.to_gptq(qw), "compressed-tensors": convert.to_compressed_tensors(qw)}
    tensors["gptq"]["g_idx"] = tensors["gptq"]["g_idx"].long()  # some writers store int64: the same groups
    with torch.device("meta"):
        written = [convert.to_gptq(qw), convert.to_compressed_tensors(qw)]
        read = [convert.from_gptq(tensors["gptq"], spec),
                convert.from_compressed_tensors(tensors["compressed-tensors"], spec)]
    assert {t.device.type for w in written for t in w.values()} == {"cpu"}
    for back in read:
        assert_same(back, qw)


@pytest.mark.parametrize("fmt,drop", [("gptq", "qzeros"), ("awq", "scales"),
                                      ("compressed-tensors", "weight_zero_point")])
def test_missing_tensor(fmt, drop):
    spec = QuantSpec(4, 32, False)
    qw = random_weight(8, 64, spec, torch.float16, zmin=1)
    t = {"gptq": convert.to_gptq, "awq": convert.to_awq, "compressed-tensors": convert.to_compressed_tensors}[fmt](qw)
    del t[drop]
    read = {"gptq": convert.from_gptq, "awq": convert.from_awq, "compressed-tensors": convert.from_compressed_tensors}
    with pytest.raises(FormatError, match=f"missing tensor.*{drop}"):
        read[fmt](t, spec)


def test_a_partial_last_group_names_the_checkpoint_not_a_choice():
    # GPTQ writers give K=576 (SmolLM2's hidden size) and group_size=128 a partial fifth group; the error told
    # the user to "use group_size in [32, 64]", a choice an existing checkpoint does not offer
    spec = QuantSpec(4, 32, True)
    t = convert.to_gptq(random_weight(8, 96, spec, torch.float16))
    ct = convert.to_compressed_tensors(random_weight(8, 96, spec, torch.float16))
    for read, tensors in ((convert.from_gptq, t), (convert.from_compressed_tensors, ct)):
        with pytest.raises(FormatError, match=r"K=96 is not divisible by the checkpoint's group_size=64 \(its last "
                                              r"group is partial\).*use a checkpoint quantized with a group size"):
            read(tensors, QuantSpec(4, 64, True))


def test_mismatched_shapes_and_dtypes():
    spec = QuantSpec(4, 32, False)
    qw = random_weight(8, 64, spec, torch.float16, zmin=1)
    t = convert.to_gptq(qw)
    with pytest.raises(FormatError, match=r"scales has shape \(2, 8\), expected \(1, 8\).*group_size"):
        convert.from_gptq(t, QuantSpec(4, 64, False))
    ct = convert.to_compressed_tensors(qw)
    ct["weight_packed"] = ct["weight_packed"][:, :-1]
    with pytest.raises(FormatError, match=r"weight_packed has shape \(8, 7\), expected \(8, 8\)"):
        convert.from_compressed_tensors(ct, spec)
    t["qweight"] = t["qweight"].to(torch.int64)
    with pytest.raises(FormatError, match="qweight has dtype torch.int64, expected torch.int32"):
        convert.from_gptq(t, spec)
