"""Backend registry and choice for ``torch.ops.qdpo.*``.

Three backends serve the ops: ``reference`` (plain PyTorch, any device),
``triton`` (``qdpo.kernels.triton``; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``) and ``cuda`` (the compiled extension ``qdpo._C``,
CUDA tensors). A backend registers one implementation per op with
:func:`register`; an implementation that cannot serve a particular request
raises :class:`Unsupported` with the reason.

Choice: an op's ``backend`` argument, else the ``QDPO_BACKEND`` environment
variable, else ``auto``. ``auto`` tries, in order, ``cuda`` (while
:data:`CUDA_IN_AUTO` is True, and only for the requests its registration
marks faster: ``auto_if``), ``triton``, ``reference`` on a CUDA tensor and
``reference`` on a CPU tensor, and logs once when it falls back. A backend
named explicitly never falls back: it serves the request or raises one clear
error saying why.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Callable

import torch

log = logging.getLogger("qdpo.kernels")

BACKENDS = ("reference", "triton", "cuda")

# The CUDA kernels (csrc/, qdpo/kernels/cuda.py) passed their GPU tests on an H200
# (make gpu-check, 2026-12-04; benchmarks/results/NVIDIA-H200*). ``auto`` uses them
# where they measured faster than Triton (each registration's ``auto_if``: the decode
# GEMV); False keeps ``auto`` off them entirely, ``backend="cuda"`` always reaches them.
CUDA_IN_AUTO = True
_IMPLS: dict[str, dict[str, Callable]] = {b: {} for b in BACKENDS}
# backend → op → may ``auto`` use this implementation: a bool, or a predicate over the op's arguments
_AUTO_IF: dict[str, dict[str, Callable[..., bool] | bool]] = {b: {} for b in BACKENDS}
_LOADED: dict[str, str | None] = {}  # backend → None if loaded, else why not
_WARNED: set[tuple[str, str, str]] = set()


class Unsupported(Exception):
    """Raised by a backend implementation that cannot serve this request."""


class Refused(RuntimeError):
    """What :func:`call` raises when a backend named explicitly cannot serve a request (its reason in
    the message); ``auto`` never raises it."""


def register(backend: str, op: str, auto_if: Callable[..., bool] | bool = True) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` the ``backend`` implementation of op ``op``.

    ``auto_if``: whether ``auto`` may pick it for a request (a bool, or a predicate over the op's
    arguments); an explicit ``backend=`` reaches it either way.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _IMPLS[backend][op] = fn
        _AUTO_IF[backend][op] = auto_if
        return fn

    return deco


def _load(backend: str) -> str | None:
    """Import a backend's module once; return why it is unavailable, or None."""
    if backend == "reference":
        return None
    if backend not in _LOADED:
        module = {"triton": "qdpo.kernels.triton", "cuda": "qdpo.kernels.cuda"}[backend]
        try:
            importlib.import_module(module)
            _LOADED[backend] = None
        except ImportError as e:
            _LOADED[backend] = f"{module} could not be imported ({e})"
    return _LOADED[backend]


def _device_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``, or None if it can."""
    if backend == "reference":
        return None
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got a {device.type} tensor"
    if backend == "triton" and device.type != "cuda":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return _load(backend)
        return (
            f"the triton backend needs CUDA tensors, got a {device.type} tensor "
            "(set TRITON_INTERPRET=1 before importing qdpo to run Triton kernels on the CPU)"
        )
    return _load(backend)


def requested(backend: str) -> str:
    """Normalise an op's ``backend`` argument, applying ``QDPO_BACKEND``."""
    if backend == "auto":
        backend = os.environ.get("QDPO_BACKEND", "auto") or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not known; use 'auto' or one of {BACKENDS} "
            "(argument or QDPO_BACKEND environment variable)"
        )
    return backend


def own(out):
    """``out`` (a tensor or a tuple of them) contiguous, as the ops' fake implementations describe it, and
    with no tensor marked as a view. A backend may return another layout (the reference's ŵ of a transposed
    weight, for one), and compiled code takes the fake strides for the real ones. An op's body runs below
    autograd, so a result that is a view of the body's own intermediate (a 2D product reshaped to x's
    leading dimensions) would reach autograd as a view output of the op, and a caller's in-place update
    of it would be refused (Falcon's decoder layer adds the attention output into the MLP's in place).
    ``detach`` drops the mark without a copy; nothing is lost, the body's tensors carry no history."""
    if isinstance(out, torch.Tensor):
        out = out.contiguous()
        return out.detach() if out._is_view() else out
    return tuple(own(o) for o in out) if isinstance(out, tuple) else out


def call(op: str, backend: str, device: torch.device, *args):
    """Run op ``op`` on the chosen backend (its result through :func:`own`); see the module docstring
    for the rules."""
    return own(_call(op, backend, device, *args))


def _call(op: str, backend: str, device: torch.device, *args):
    # the fix names where the backend came from: the op's argument, or QDPO_BACKEND under backend='auto'
    fix = "use backend='auto' or 'reference'" if backend != "auto" else \
        f"QDPO_BACKEND={os.environ.get('QDPO_BACKEND')} asked for it: unset QDPO_BACKEND or set it to 'auto'"
    backend = requested(backend)
    if backend != "auto":
        why = _device_reason(backend, device)
        fn = _IMPLS[backend].get(op)
        if why is None and fn is None:
            why = f"the {backend} backend does not implement qdpo::{op}"
        if why is not None:
            raise RuntimeError(f"qdpo::{op}: {why}; {fix}")
        try:
            return fn(*args)
        except Unsupported as e:
            raise Refused(f"qdpo::{op}: the {backend} backend cannot serve this request: {e}; {fix}") from None
    gpu_order = (("cuda",) if CUDA_IN_AUTO else ()) + ("triton", "reference")
    order = gpu_order if device.type == "cuda" else ("reference",)
    for b in order:
        fn = _IMPLS[b].get(op) if _device_reason(b, device) is None else None
        auto_if = _AUTO_IF[b].get(op, True)
        if fn is None or not (auto_if(*args) if callable(auto_if) else auto_if):
            continue
        try:
            return fn(*args)
        except Unsupported as e:
            key = (op, b, str(e))
            if key not in _WARNED:
                _WARNED.add(key)
                log.warning("qdpo::%s: %s backend skipped (%s); falling back", op, b, e)
    raise RuntimeError(f"qdpo::{op}: no backend can serve this request")  # unreachable: reference serves all


def serves(backend: str, op: str) -> bool:
    """Whether a request for ``backend`` (an op's argument, ``QDPO_BACKEND`` applied) reaches an
    implementation of ``op`` (``auto``: the reference backend serves every op)."""
    backend = requested(backend)
    return backend == "auto" or (_load(backend) is None and op in _IMPLS[backend])


def available(device: torch.device | str = "cuda") -> list[str]:
    """Backends that can run on ``device`` here."""
    device = torch.device(device)
    return [b for b in BACKENDS if _device_reason(b, device) is None]
