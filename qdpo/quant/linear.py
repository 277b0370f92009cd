"""QuantLinear: a drop-in ``nn.Linear`` with W4/W8 weights, in two modes.

* ``train``: the module holds latent full-precision weights ``weight`` (an
  ``nn.Parameter``) and a frozen grid (``scales``, ``zeros``); forward is
  ``x @ fake_quant(weight)ᵀ + bias`` through ``torch.ops.qdpo.fake_quant_matmul``
  with straight-through gradients. With ``learn_scales=True`` the scales are a
  parameter too and get the LSQ gradient.
* ``packed``: the module holds the packed integer weight ``qweight`` (uint8,
  the canonical format of ``qdpo.quant.format``) with ``scales`` and ``zeros``;
  forward is ``torch.ops.qdpo.dequant_matmul``. Gradients flow to the input
  (and bias) so a frozen quantized layer can sit inside a trained model.

``to_packed()`` converts train → packed exactly: the packed module's ŵ is the
fake-quantized latent weight, so both modes give the same outputs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from qdpo.kernels import ops, reference
from qdpo.quant.format import QuantizedWeight
from qdpo.quant.spec import QuantSpec

MODES = ("train", "packed")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype where autocast is on for ``device_type``; None where it is off or the device type
    has none (``meta``, on which ``torch.is_autocast_enabled`` raises)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_input(x: Tensor) -> Tensor:
    """``x`` in the autocast dtype where autocast is on: qdpo's custom ops are not autocast-aware."""
    dtype = autocast_dtype(x.device.type)
    return x if dtype is None else x.to(dtype)


class QuantModes:
    """The storage of a quantized ``(N, K)`` weight and its train ↔ packed conversion: ``weight``
    (train) or ``qweight`` (packed) with ``scales``, ``zeros``, ``spec``, ``backend``, ``mode`` and
    ``in_features`` (:class:`QuantLinear`, and the quantized expert tensors of ``qdpo.quant.experts``)."""

    def _allocate(self, n: int, k: int, spec: QuantSpec, mode: str, dtype, device, learn_scales: bool) -> None:
        """Zeroed latent weights (train) or codes (packed), unit scales and zero points, for an ``(n, k)`` weight."""
        g = 1 if spec.group_size == -1 else k // spec.group_size
        if mode == "train":
            self.weight = nn.Parameter(torch.zeros(n, k, dtype=dtype, device=device))  # latent weights [N, K]
        else:
            self.register_buffer("qweight", torch.zeros(n, k * spec.bits // 8, dtype=torch.uint8, device=device))
        scales = torch.ones(n, g, dtype=dtype, device=device)  # [N, K/G]
        if learn_scales and mode == "train":
            self.scales = nn.Parameter(scales)
        else:
            self.register_buffer("scales", scales)
        self.register_buffer("zeros", torch.zeros(n, g, dtype=torch.uint8, device=device))  # [N, K/G]

    def _drop_cache(self) -> None:
        pass

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``.to(dtype)``, ``.half()``), with scales taken to a new float dtype as quantization
        makes them, rounded *up* (``reference.to_scale_dtype``): a plain cast rounds to the nearest value, and the
        ``finfo.tiny`` scale of a float32 all-zero group became 0 in float16, where fake-quant's 0 / 0 made the
        layer's outputs NaN."""
        old = self.scales.detach()  # the data before the cast (a parameter's .data is swapped in place)
        out = super()._apply(fn, recurse)
        new = self.scales
        if new.dtype != old.dtype and new.is_floating_point() and "meta" not in (old.device.type, new.device.type):
            with torch.no_grad():
                new.copy_(reference.to_scale_dtype(old.float().to(new.device), new.dtype))
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        """Scales of another float dtype (a float32 state dict into a float16 layer) copied in as :meth:`_apply`
        casts them, rounded up; ``assign=True`` takes the given tensors as they are."""
        key, given = prefix + "scales", state_dict.get(prefix + "scales")
        if (isinstance(given, Tensor) and given.dtype != self.scales.dtype and given.is_floating_point()
                and self.scales.is_floating_point() and given.device.type != "meta"
                and not local_metadata.get("assign_to_params_buffers", False)):
            state_dict = {**state_dict, key: reference.to_scale_dtype(given.float(), self.scales.dtype)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def quantized_weight(self) -> QuantizedWeight:
        """The ``(N, K)`` weight in the canonical packed format (packing the latent weight in train mode)."""
        with torch.no_grad():
            if self.mode == "train":
                qweight = ops.quantize_with(self.weight, self.scales, self.zeros, self.spec.bits, self.backend)
            else:
                qweight = self.qweight
            return QuantizedWeight(qweight, self.scales.detach(), self.zeros, self.spec,
                                   (self.scales.shape[0], self.in_features), self.scales.dtype)

    @torch.no_grad()
    def _fill(self, w: Tensor, scales: Tensor, zeros: Tensor) -> None:
        """Take the 2-D weight ``w`` on the grid (``scales``, ``zeros``): as latent weights, or as codes."""
        self.scales.copy_(scales)
        self.zeros.copy_(zeros)
        if self.mode == "train":
            self.weight.copy_(w)
        else:
            self.qweight.copy_(ops.quantize_with(w, self.scales, self.zeros, self.spec.bits, self.backend))

    @torch.no_grad()
    def to_packed(self):
        """Train → packed, in place and exact; returns ``self``."""
        if self.mode == "packed":
            return self
        self._drop_cache()
        qweight = ops.quantize_with(self.weight, self.scales, self.zeros, self.spec.bits, self.backend)
        scales = self.scales.detach().clone()
        del self.weight, self.scales
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.mode = "packed"
        return self

    @torch.no_grad()
    def to_train(self, dtype: torch.dtype | None = None, learn_scales: bool = False):
        """Packed → train, in place: the latent weight starts at ŵ; returns ``self``."""
        if self.mode == "train":
            return self
        dtype = dtype or self.scales.dtype
        w = ops.dequantize(self.qweight, self.scales, self.zeros, self.spec.bits, dtype, self.backend)
        scales = reference.to_scale_dtype(self.scales.detach().float(), dtype)  # as _apply casts them
        del self.qweight, self.scales
        self.weight = nn.Parameter(w)
        if learn_scales:
            self.scales = nn.Parameter(scales)
        else:
            self.register_buffer("scales", scales)
        self.mode = "train"
        return self


class QuantLinear(QuantModes, nn.Module):
    """Weight-quantized linear layer; see the module docstring for the two modes.

    Args:
        in_features, out_features: K and N.
        spec: the :class:`QuantSpec`.
        bias: whether the layer has a (full-precision) bias.
        mode: ``"train"`` or ``"packed"``.
        dtype: dtype of the latent weight / scales / bias.
        learn_scales: in train mode, make ``scales`` a parameter (LSQ).
        backend: kernel backend for forward and backward (``"auto"`` by default).
    """

    def __init__(
        self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = True,
        mode: str = "train", dtype: torch.dtype = torch.float32, device=None,
        learn_scales: bool = False, backend: str = "auto",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not known; use one of {MODES}")
        spec.check_shape(out_features, in_features, "QuantLinear")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.mode, self.backend = mode, backend
        self._allocate(out_features, in_features, spec, mode, dtype, device, learn_scales)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls, linear: nn.Module, spec: QuantSpec, mode: str = "train", learn_scales: bool = False,
        scales: Tensor | None = None, zeros: Tensor | None = None, backend: str = "auto",
    ) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (or a GPT-2 ``Conv1D``, whose weight is ``(K, N)``).

        The grid is round-to-nearest from the weight unless ``scales``/``zeros``
        are given (e.g. from AWQ or an imported checkpoint).
        """
        w = _linear_weight(linear).detach()
        n, k = w.shape
        q = cls(k, n, spec, bias=linear.bias is not None, mode=mode, dtype=w.dtype,
                device=w.device, learn_scales=learn_scales, backend=backend)
        if scales is None or zeros is None:
            scales, zeros = ops.qparams(w, spec.bits, spec.group_size, spec.symmetric, backend)
        else:
            check_grid(zeros, spec)
        q._fill(w, scales, zeros)
        with torch.no_grad():
            if q.bias is not None:
                q.bias.copy_(linear.bias.detach())
        return q

    # ------------------------------------------------------------------ forward
    _w_hat: Tensor | None = None  # set by frozen_weights(): a cached ŵ for inference

    def forward(self, x: Tensor) -> Tensor:
        x = autocast_input(x)
        if self._w_hat is not None:
            return self._linear(x, lambda: self._w_hat.to(x.dtype))
        bits = self.spec.bits
        if self.mode == "train" and self._use_step_cache(x):
            ops._check_x(x, self.in_features)
            return _StepLinear.apply(x, self.weight, self.bias, *self._step_cache(x.dtype))
        if self.mode == "train":
            return ops.fake_quant_matmul(x, self.weight, self.scales, self.zeros, bits, self.bias, self.backend)
        return ops.dequant_matmul(x, self.qweight, self.scales, self.zeros, bits, self.bias, self.backend)

    def _linear(self, x: Tensor, w_hat: Callable[[], Tensor]) -> Tensor:
        """``x @ ŵᵀ (+ b)`` with a ŵ made here rather than by an op: x gets the ops' check first (ŵ cast to an
        integer x would be zeros)."""
        ops._check_x(x, self.in_features)
        return nn.functional.linear(x, w_hat(), None if self.bias is None else self.bias.to(x.dtype))

    # ------------------------------------------------------------------ CPU training path
    _cache: tuple | None = None  # (key, ŵ, mask) for the current latent weights
    # False under FSDP2: its all-gathers refill the same unsharded storage without bumping ``_version`` (a
    # stale key), and a cache per layer would keep every layer's full ŵ that sharding is meant to free
    step_cache: bool = True

    def _use_step_cache(self, x: Tensor) -> bool:
        """Cache ŵ and the STE mask across micro-batches when training on the reference backend.

        On the CPU the reference ops would re-quantize every weight in every
        forward and again in every backward; with frozen scales ŵ only changes
        when the optimizer steps, so it is computed once per step (at the cost
        of holding ŵ and a bool mask). Learned scales need the LSQ gradient of
        the ops, so they take the ops path; so does code being compiled or
        exported, which cannot key a cache on data pointers.
        """
        if not (self.step_cache and torch.is_grad_enabled() and self.weight.requires_grad) or self.scales.requires_grad:
            return False
        if torch.compiler.is_compiling():
            return False
        from qdpo.kernels import backends

        b = backends.requested(self.backend)
        return b == "reference" or (b == "auto" and x.device.type == "cpu")

    def _cache_key(self, dtype: torch.dtype) -> tuple:
        # the zero points too: a calibration that edits them in place (weights and scales untouched) changes ŵ
        w, s, z = self.weight, self.scales, self.zeros
        return (w.data_ptr(), w._version, s.data_ptr(), s._version, z.data_ptr(), z._version, dtype)

    def _step_cache(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        w, s = self.weight, self.scales
        key = self._cache_key(dtype)
        if self._cache is None or self._cache[0] != key:
            from qdpo.kernels import reference

            with torch.no_grad():
                w_hat, mask = reference.fake_quant_with_mask(w, s, self.zeros, self.spec.bits, dtype)
                clipped = ~mask
            self._cache = (key, w_hat, clipped if bool(clipped.any()) else None)
        return self._cache[1], self._cache[2]

    # ------------------------------------------------------------------ conversion (QuantModes)
    def _drop_cache(self) -> None:
        self._cache = None

    @torch.no_grad()
    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        """ŵ ``(N, K)`` in ``dtype`` (default: the scales' dtype)."""
        dtype = dtype or self.scales.dtype
        if self.mode == "train" and self._cache is not None and self._cache[0] == self._cache_key(dtype):
            return self._cache[1]  # the training step's ŵ of these very weights
        qw = self.quantized_weight()
        return ops.dequantize(qw.qweight, qw.scales, qw.zeros, self.spec.bits, dtype or qw.dtype, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, spec={self.spec.name}, mode={self.mode}")


class _StepLinear(torch.autograd.Function):
    """``x @ ŵᵀ (+ b)`` on a precomputed ŵ (in x's dtype) with the gradients of ``qdpo::fake_quant_matmul``:
    ``dx = dy @ ŵ``; ``dŵ = dyᵀ @ x`` and the bias gradient accumulated in fp32 (F.linear's own backward rounds
    them to x's dtype: bf16 gradients for fp32 latent weights under autocast), then the straight-through mask."""

    @staticmethod
    def forward(ctx, x, w, bias, w_hat, clipped):
        ctx.save_for_backward(x, w_hat)
        ctx.clipped = clipped  # bool (N, K), or None when no code was clipped
        ctx.w_dtype, ctx.bias_dtype = w.dtype, None if bias is None else bias.dtype
        y = nn.functional.linear(x, w_hat, None if bias is None else bias.to(x.dtype))
        return y.detach() if y._is_view() else y  # a 3-D x's product is a view: unmarked (no copy) for in-place users

    @staticmethod
    @once_differentiable  # first order only, as qdpo::fake_quant_matmul (a second derivative is refused, never 0)
    def backward(ctx, dy):
        x, w_hat = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).float()  # [M, N]
        dx = dy @ w_hat if ctx.needs_input_grad[0] else None
        dw = db = None
        if ctx.needs_input_grad[1]:
            dw = dy2.t() @ x.reshape(-1, x.shape[-1]).float()  # [N, K] fp32, as reference.fake_quant_matmul_backward
            if ctx.clipped is not None:
                dw = dw.masked_fill_(ctx.clipped, 0)
            dw = dw.to(ctx.w_dtype)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None


def check_grid(zeros: Tensor, spec: QuantSpec, what: str = "zeros") -> None:
    """A given grid's zero points are codes of ``spec`` (the symmetric offset where symmetric): the ops read them
    as they are, so one off the grid (a signed zero point stored as uint8, another bit width's) gives wrong ŵ
    with no error."""
    offset, top = 1 << (spec.bits - 1), (1 << spec.bits) - 1
    bad = (zeros != offset) if spec.symmetric else (zeros > top)
    if bool(bad.any()):
        want = f"all {offset} ({spec.name} is symmetric)" if spec.symmetric else f"in [0, {top}]"
        raise ValueError(f"{what} hold {int(zeros[bad].flatten()[0])}, expected {want}: pass the unsigned zero points "
                         f"of {spec.name}'s grid (as qdpo.kernels.ops.qparams returns them)")


def _linear_weight(module: nn.Module) -> Tensor:
    """``(N, K)`` weight of an ``nn.Linear`` or of a GPT-2 style ``Conv1D`` (stored ``(K, N)``)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t()
    raise TypeError(f"cannot quantize a {type(module).__name__}; expected nn.Linear or transformers Conv1D")


class frozen_weights:
    """Context manager: every :class:`QuantLinear` (and quantized expert tensor) of ``model`` runs on a cached ŵ.

    For generation and evaluation: ŵ is computed once per layer (in ``dtype``,
    default each layer's own) and the forward becomes a plain ``F.linear``, so
    the hundreds of decoding steps do not re-quantize the weights each time.
    Outputs equal the layer's normal forward for inputs of that dtype. Use
    under ``torch.no_grad()``; the cache is dropped on exit.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        from qdpo.quant.experts import QuantExpertTensor

        self.layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantExpertTensor))]
        self.dtype = dtype

    def __enter__(self):
        with torch.no_grad():
            for m in self.layers:
                m._w_hat = m.dequantized(self.dtype)
        return self

    def __exit__(self, *exc) -> None:
        for m in self.layers:
            m._w_hat = None
