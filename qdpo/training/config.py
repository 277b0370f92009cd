"""The run configuration: one typed dataclass, every field a ``--flag``.

``python -m qdpo.train --help`` lists the flags; ``--config run.yaml`` reads
the same keys (command-line flags win over the file). Every default is the one
a user should get: the embedded model and prompts, W4 g64 asymmetric RTN,
QDPO with the recipe chosen on the validation split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("qdpo", "kd", "sft")
LOSSES = ("sigmoid", "ipo", "hinge", "robust")
DIST_MODES = ("auto", "none", "ddp", "fsdp")


class ConfigError(ValueError):
    """A user error in the configuration: printed without a traceback."""


@dataclass
class TrainConfig:
    # --- inputs
    model: str = "default"  # local HF model dir, a .gguf file, or "default" (embedded SmolLM2-135M-Instruct)
    prompts: str = "default"  # JSONL with "prompt" or "messages" (+ optional "split"), or "default"
    eval_prompts: str = ""  # JSONL of held-out test prompts; default: the prompt set's test split
    trust_remote_code: bool = False  # allow model code from the model directory
    output_dir: str = "runs/default"  # run directory: every artifact goes here
    resume: bool = False  # continue the run in output_dir from its last checkpoint
    overwrite: bool = False  # replace a different run found in output_dir
    seed: int = 0  # seeds data order, splits of un-split prompt files, and init
    # --- quantization
    bits: int = 4  # 4 or 8
    group_size: int = 64  # -1, 32, 64, 128, 256 (64 is the largest that divides SmolLM2's hidden 576)
    symmetric: bool = False  # symmetric grid (zero point fixed at 2^(bits-1))
    init: str = "rtn"  # initial quantization: rtn, awq, or a GPTQ/AWQ/compressed-tensors checkpoint directory
    awq_grid: int = 20  # AWQ: alpha grid points
    # comma-separated layer names or glob patterns kept in full precision, besides the LM head and any vision
    # encoder (e.g. "*.down_proj,model.layers.0.*"); each must match a layer
    exclude: str = ""
    # --- pairs
    max_new_tokens: int = 40  # greedy answer length for pairs and evaluation
    gen_batch_size: int = 64  # prompts per generation batch (fewer, larger batches decode faster)
    # prompt + answer tokens of a training example: a longer answer is cut, a prompt that fills it is dropped (from
    # every split); validation and test score whole answers (up to --max-new-tokens), as generated
    max_length: int = 512
    max_train_prompts: int = 0  # use at most this many training prompts (0 = all)
    max_eval_prompts: int = 0  # use at most this many validation/test prompts each (0 = all)
    # --- training
    method: str = "qdpo"  # qdpo, kd, sft, or all (each from the same start, same data and budget)
    loss: str = "sigmoid"  # DPO loss: sigmoid, ipo, hinge, robust
    beta: float = 0.1  # DPO temperature
    label_smoothing: float = 0.0  # assumed label noise: conservative DPO with --loss sigmoid, or --loss robust
    nll_weight: float = 0.0  # QDPO: weight of an NLL term on the chosen (FP) answer
    # QDPO: weight of a token-level KL(FP || quantized) term on the chosen answer. 16 and lr 1e-4 are the best
    # QDPO recipe of the validation sweep (README: "Choosing the QDPO recipe"); --kd-weight 0 is plain DPO
    kd_weight: float = 16.0
    window: int = 0  # QDPO: keep only k tokens of each answer after the common prefix (0 = whole answers)
    learn_scales: bool = False  # also train the quantization scales (LSQ gradient)
    scale_lr: float = 1e-5  # learning rate of the scales when learned
    lr: float = 1e-4  # AdamW learning rate of the latent weights (every method; chosen on the validation split)
    weight_decay: float = 0.0  # AdamW weight decay (latent weights should not decay)
    warmup_steps: int = 2  # linear warm-up steps, then cosine decay to 10 %
    steps: int = 16  # optimizer steps (the best step is kept by early stopping on the validation split)
    batch_size: int = 8  # pairs (or answers) per optimizer step
    micro_batch_size: int = 8  # pairs per forward; batch_size / micro_batch_size accumulation steps
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    eval_every: int = 4  # steps between validation flip-rate checks (0 = never)
    patience: int = 3  # early stopping: validation checks without improvement before stopping (0 = off)
    checkpoint_every: int = 8  # steps between checkpoints (0 = only at the end; each holds weights + AdamW state)
    log_every: int = 1  # steps between log lines
    logps_chunk: int = 1024  # positions per chunk of the output layer (bounds the logits memory)
    dtype: str = "auto"  # compute dtype: auto (bf16 autocast on GPU, fp32 on CPU), float32, bfloat16
    device: str = "auto"  # auto, cpu, cuda
    # --- scale (torchrun --nproc-per-node N -m qdpo.train ...)
    dist: str = "auto"  # several processes: ddp, fsdp (FSDP2, shards weights, grads, optimizer state) or auto (fsdp)
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in backward: less memory
    latent_dtype: str = "float32"  # latent weights: float32, or bfloat16 with an fp32 master copy in the optimizer
    # --- evaluation and export
    export: bool = True  # write the trained model in the packed format and check it reloads
    judge_url: str = ""  # optional LLM judge: an OpenAI-compatible endpoint (e.g. http://host:8000/v1) that rates answers
    judge_model: str = ""  # the model name the judge endpoint serves (needed with --judge-url)
    judge_key_env: str = "OPENAI_API_KEY"  # environment variable holding the judge endpoint's API key, if it needs one

    def methods(self) -> list[str]:
        return list(METHODS) if self.method == "all" else [self.method]

    def exclude_patterns(self) -> list[str]:
        """``--exclude`` as a list of layer names or glob patterns (empty when none are given)."""
        return [p.strip() for p in self.exclude.split(",") if p.strip()]

    def validate(self) -> "TrainConfig":
        from qdpo.quant.spec import QuantSpec

        for k in ("model", "prompts", "eval_prompts", "output_dir", "init"):  # a config file's "~/..." as a shell's
            v = getattr(self, k)
            if isinstance(v, str) and v.startswith("~"):
                setattr(self, k, os.path.expanduser(v))
        if self.exclude_patterns() and self.init not in ("rtn", "awq"):
            raise ConfigError(f"--exclude applies to --init rtn or awq; the checkpoint {self.init} decides which "
                              "layers are quantized: drop --exclude")
        if self.init not in ("rtn", "awq"):  # a quantized checkpoint: its spec wins
            from qdpo.quant.importers import read_external_config

            try:
                _, spec, _ = read_external_config(self.init)
            except (OSError, ValueError) as e:
                raise ConfigError(f"--init {self.init}: {e} (use rtn, awq or a GPTQ/AWQ/compressed-tensors "
                                  "checkpoint directory)") from None
            self.bits, self.group_size, self.symmetric = spec.bits, spec.group_size, spec.symmetric

        try:
            QuantSpec(self.bits, self.group_size, self.symmetric)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"--bits/--group-size: {e}") from None
        checks = [
            (self.method in (*METHODS, "all"), f"--method {self.method!r}: use one of {METHODS} or all"),
            (self.loss in LOSSES, f"--loss {self.loss!r}: use one of {LOSSES}"),

            (self.steps >= 1, f"--steps {self.steps}: must be >= 1"),
            (self.batch_size >= 1 and self.micro_batch_size >= 1, "--batch-size and --micro-batch-size must be >= 1"),
            (self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size == 0
             or self.micro_batch_size > self.batch_size,
             f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size {self.micro_batch_size}"),
            *((getattr(self, k) >= 1, f"{_flag(k)} {getattr(self, k)}: must be >= 1")
              for k in ("gen_batch_size", "logps_chunk", "awq_grid")),
            # 0 means "all" / "never" / "off" for these; a negative count would cut or stop silently
            *((getattr(self, k) >= 0, f"{_flag(k)} {getattr(self, k)}: must be >= 0")
              for k in ("max_train_prompts", "max_eval_prompts", "eval_every", "patience", "checkpoint_every",
                        "log_every", "warmup_steps", "max_grad_norm", "weight_decay", "nll_weight", "kd_weight")),
            (self.beta > 0, f"--beta {self.beta}: must be > 0"),
            (0 <= self.label_smoothing < 0.5, f"--label-smoothing {self.label_smoothing}: must be in [0, 0.5)"),
            (not self.label_smoothing or self.loss in ("sigmoid", "robust"),
             f"--label-smoothing applies to --loss sigmoid or robust, not {self.loss}"),
            (self.lr > 0, f"--lr {self.lr}: must be > 0"),
            (self.max_new_tokens >= 1, f"--max-new-tokens {self.max_new_tokens}: must be >= 1"),
            (self.max_length > 8, f"--max-length {self.max_length}: too small"),
            (self.dtype in ("auto", "float32", "bfloat16"), f"--dtype {self.dtype!r}: use auto, float32 or bfloat16"),
            (self.device in ("auto", "cpu", "cuda"), f"--device {self.device!r}: use auto, cpu or cuda"),
            (self.window >= 0, f"--window {self.window}: must be >= 0"),
            (not (self.resume and self.overwrite), "--resume continues the run in --output-dir, --overwrite deletes "
                                                   "it: pass one of them"),
            (self.dist in DIST_MODES, f"--dist {self.dist!r}: use one of {DIST_MODES}"),
            (self.latent_dtype in ("float32", "bfloat16"),
             f"--latent-dtype {self.latent_dtype!r}: use float32 or bfloat16"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _comments() -> dict[str, str]:
    """Field → its comment in this file (the --help text): the one on the field's line, or the comment
    lines right above a field that has none."""
    out, above = {}, []
    for line in Path(__file__).read_text().splitlines():
        line = line.strip()
        if line.startswith("# ---"):
            above = []
        elif line.startswith("#"):
            above.append(line[1:].strip())
        elif ":" in line and "=" in line and not line.startswith(("def", "class", "(")):
            name = line.split(":", 1)[0].strip()
            if name.isidentifier():
                out[name] = line.split("#", 1)[1].strip() if "#" in line else " ".join(above)
            above = []
        else:
            above = []
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qdpo.train",
        description="Quantize a chat model and train it with QDPO (or KD/SFT) to answer like its FP original.",
    )
    p.add_argument("--config", default="", help="YAML or JSON file with the same keys as the flags")
    helps = {k: v.replace("%", "%%") for k, v in _comments().items()}  # argparse formats help with %
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        typ = hints[f.name]
        if typ is bool:
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                           help=f"{helps.get(f.name, '')} (default: {f.default})")
        else:  # an empty default (no --exclude, no judge) reads "none", not a bare "(default: )"
            p.add_argument(_flag(f.name), type=typ, default=None, metavar=typ.__name__.upper(),
                           help=f"{helps.get(f.name, '')} (default: {f.default if f.default != '' else 'none'})")
    return p


def _read_config_file(path: str) -> dict:
    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        text = f.read_text(encoding="utf-8-sig")
        if f.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one message
        raise ConfigError(f"--config {path}: cannot parse ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {unknown}")
    hints = typing.get_type_hints(TrainConfig)
    return {k: _coerce(path, k, v, hints[k]) for k, v in data.items()}


def _coerce(path: str, name: str, value, typ: type):
    """A config file's ``value`` of the field ``name``, as its flag would read it (a string such as YAML's
    ``1e-4`` is parsed like the command line's); one clear error for a value of the wrong type."""
    if name == "exclude" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # a YAML list of patterns
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
        pass  # true/false, null, a list or a mapping where a number or a string belongs
    elif typ is str:
        return str(value)
    elif isinstance(value, (str, int)) or typ is float:  # not 2.5 for an integer
        try:
            return typ(value)
        except ValueError:
            pass
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[typ]
    raise ConfigError(f"--config {path}: {name}: expected {want}, as {_flag(name)} takes; got {value!r}")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    values = _read_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    cfg.config_file = args.config  # not a setting (not in to_dict()): --overwrite must not delete it
    return cfg.validate()
