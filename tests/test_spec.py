"""QuantSpec validation and shape checks."""

import pytest

from qdpo import QuantSpec


def test_defaults_and_fields():
    s = QuantSpec()
    assert (s.bits, s.group_size, s.symmetric) == (4, 128, False)
    assert QuantSpec(8, -1, True).qmax == 255 and QuantSpec(4, 32).qmax == 15
    assert QuantSpec(4, 64, True).name == "W4A16-g64-sym"
    assert QuantSpec(8, -1).name == "W8A16-ch-asym"


@pytest.mark.parametrize("bits", [2, 3, 16, True, 4.0])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits=.* is not supported; use one of"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("g", [0, 16, 100, 512, -2])
def test_unsupported_group_size(g):
    with pytest.raises(ValueError, match=f"group_size={g} is not supported"):
        QuantSpec(group_size=g)


def test_symmetric_must_be_bool():
    with pytest.raises(TypeError, match="symmetric"):
        QuantSpec(symmetric="yes")


def test_frozen():
    with pytest.raises(AttributeError):
        QuantSpec().bits = 8


def test_k_divisibility_names_value_and_fix():
    with pytest.raises(ValueError, match=r"K=576 is not divisible by group_size=128; use group_size in \[32, 64\]"):
        QuantSpec(4, 128).check_shape(1536, 576)
    QuantSpec(4, 64).check_shape(1536, 576)


def test_odd_k_for_4_bits():
    with pytest.raises(ValueError, match="K=7 is odd"):
        QuantSpec(4, -1).check_shape(3, 7)
    QuantSpec(8, -1).check_shape(3, 7)


def test_roundtrip_dict():
    s = QuantSpec(8, 256, True)
    assert QuantSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="missing"):
        QuantSpec.from_dict({"bits": 4})
