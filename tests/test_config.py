"""python -m qdpo.train's configuration: --help, flags, --config files and their errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from qdpo import train
from qdpo.training.config import ConfigError, TrainConfig, _flag, parse_args


def test_help_lists_every_option_with_its_text_and_default():
    # in a fresh interpreter, as a user runs it: argparse expands % in help texts, so one stray % crashed --help
    r = subprocess.run([sys.executable, "-m", "qdpo.train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split("options:", 1)[1].split())  # the options' section; argparse wraps lines
    assert "Traceback" not in r.stderr
    for f in dataclasses.fields(TrainConfig):
        flag = _flag(f.name)
        assert flag in text, flag
        # the help of each option: its text (not only the default) and the default once
        shown = f"{flag}, --no-{flag[2:]} " if f.type == "bool" else f"{flag} {f.type.upper()} "
        after = text.split(shown, 1)[1]
        help_text = after.split("(default:", 1)[0]
        assert len(help_text.strip().split()) >= 2, (flag, help_text)
        assert after.split("(default:", 1)[1].split(")", 1)[0].strip() == (str(f.default) or "none"), flag
    assert "to 10 % (default: 2)" in text  # the stray % itself, printed as written
    assert "default: None" not in text and "(default: )" not in text
    # a field whose comment stands on the lines above it gets that comment
    assert "weight of a token-level KL(FP || quantized) term" in text


def test_flags_and_config_file(tmp_path):
    cfg = parse_args(["--bits", "8", "--group-size", "128", "--no-export", "--lr", "3e-5"])
    assert (cfg.bits, cfg.group_size, cfg.export, cfg.lr) == (8, 128, False, 3e-5)
    assert cfg.steps == TrainConfig.steps
    yml = tmp_path / "run.yaml"
    yml.write_text("bits: 8\ngroup-size: 32\nsteps: 5\nexport: false\n")
    cfg = parse_args(["--config", str(yml), "--steps", "7"])  # the command line wins over the file
    assert (cfg.bits, cfg.group_size, cfg.steps, cfg.export) == (8, 32, 7, False)
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"kd_weight": 0, "beta": 0.5}))
    cfg = parse_args(["--config", str(js)])
    assert (cfg.kd_weight, cfg.beta) == (0, 0.5)
    # YAML 1.1 reads 1e-4 (no dot) as a string: read like the flag, as the number it is
    yml.write_text("lr: 1e-4\nbeta: 1\nsteps: '5'\n")
    cfg = parse_args(["--config", str(yml)])
    assert (cfg.lr, cfg.beta, cfg.steps) == (1e-4, 1.0, 5) and isinstance(cfg.beta, float)
    yml.write_text("output_dir: ~/runs/x\nprompts: ~/p.jsonl\n")  # as the shell expands a flag's ~
    cfg = parse_args(["--config", str(yml)])
    assert (cfg.output_dir, cfg.prompts) == (os.path.expanduser("~/runs/x"), os.path.expanduser("~/p.jsonl"))
    yml.write_text("exclude: ['*.down_proj', model.layers.0.self_attn.q_proj]\n")  # a list, or the flag's commas
    cfg = parse_args(["--config", str(yml)])
    assert cfg.exclude_patterns() == ["*.down_proj", "model.layers.0.self_attn.q_proj"]
    assert parse_args(["--exclude", " *.down_proj,,model.layers.0.self_attn.q_proj "]).exclude_patterns() == \
        cfg.exclude_patterns()


@pytest.mark.parametrize("content, argv, match", [
    (None, ["--config", "{d}/missing.yaml"], "file not found"),
    ("bits: [4", ["--config", "{d}/c.yaml"], "cannot parse"),
    ("- 4\n- 8\n", ["--config", "{d}/c.yaml"], "expected a mapping"),
    ("bitz: 4\n", ["--config", "{d}/c.yaml"], r"unknown option\(s\) \['bitz'\]"),
    ("output_dir: caf\u00e9\n".encode("latin-1"), ["--config", "{d}/c.yaml"], "cannot parse.*can't decode byte 0xe9"),
    ("steps: 2.5\n", ["--config", "{d}/c.yaml"], "steps: expected an integer, as --steps takes; got 2.5"),
    ("beta: abc\n", ["--config", "{d}/c.yaml"], "beta: expected a number, as --beta takes; got 'abc'"),
    ("export: 'no'\n", ["--config", "{d}/c.yaml"], "export: expected true or false, as --export takes"),
    ("max-new-tokens:\n", ["--config", "{d}/c.yaml"], "max_new_tokens: expected an integer"),
    (None, ["--bits", "3"], "--bits/--group-size"),
    (None, ["--method", "ppo"], "--method 'ppo'"),
    (None, ["--batch-size", "6", "--micro-batch-size", "4"], "multiple of --micro-batch-size 4"),
    (None, ["--micro-batch-size", "0"], "--batch-size and --micro-batch-size must be >= 1"),
    (None, ["--gen-batch-size", "0"], "--gen-batch-size 0: must be >= 1"),
    (None, ["--logps-chunk", "0"], "--logps-chunk 0: must be >= 1"),
    (None, ["--patience", "-1"], "--patience -1: must be >= 0"),  # stopped before step 1
    (None, ["--max-train-prompts", "-1"], "--max-train-prompts -1: must be >= 0"),  # all but the last prompt
    (None, ["--init", "{d}", "--exclude", "*.down_proj"], "--exclude applies to --init rtn or awq"),
    (None, ["--loss", "ipo", "--label-smoothing", "0.1"], "--label-smoothing applies to --loss sigmoid or robust"),
    ("exclude: [1, 2]\n", ["--config", "{d}/c.yaml"], "exclude: expected a string"),
    # --overwrite deleted the run that --resume asked to continue
    (None, ["--resume", "--overwrite"], "--resume continues the run in --output-dir, --overwrite deletes it"),
])
def test_bad_configuration_is_one_clear_error(tmp_path, capsys, content, argv, match):
    if isinstance(content, bytes):  # not UTF-8
        (tmp_path / "c.yaml").write_bytes(content)
    elif content is not None:
        (tmp_path / "c.yaml").write_text(content)
    argv = [a.format(d=tmp_path) for a in argv]
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)
    assert train.main(argv) == 2  # printed without a traceback, nothing run
    err = capsys.readouterr().err
    assert err.startswith("qdpo.train: error: ") and "Traceback" not in err
