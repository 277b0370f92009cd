"""python -m qdpo.train end to end on a tiny local model: artifacts, run-directory rules, resume, bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast

from qdpo import train
from qdpo.training import trainer as trainer_mod

VOCAB = 200
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def _tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>")
    if chat:
        tok.chat_template = TEMPLATE
    return tok

from tests.test_judge import server  # noqa: E402,F401 - the stub judge endpoint fixture


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      initializer_range=0.2, eos_token_id=2, pad_token_id=2, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    _tokenizer(chat=True).save_pretrained(d)
    return d


def _prompts(path: Path, n=15, split=True, system: str = "") -> Path:
    """``n`` prompts of 2–5 random words; with ``system``, each starts with that system turn."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        words = " ".join(f"w{int(t)}" for t in torch.randint(0, 150, (int(torch.randint(2, 6, (1,), generator=g)),),
                                                              generator=g))
        row = {"id": f"q{i}", "prompt": words}
        if system:
            row = {"id": row["id"], "messages": [{"role": "system", "content": system},
                                                 {"role": "user", "content": words}]}
        if split:
            row["split"] = ("train", "train", "train", "validation", "test")[i % 5]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(model_dir, prompts, out, *extra):
    return ["--model", str(model_dir), "--prompts", str(prompts), "--output-dir", str(out),
            "--max-new-tokens", "6", "--steps", "4", "--batch-size", "4", "--micro-batch-size", "2",
            "--group-size", "32", "--eval-every", "2", "--checkpoint-every", "2", "--lr", "1e-3", *extra]


def test_end_to_end_all_methods(model_dir, tmp_path, capsys):
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    assert train.main(_args(model_dir, prompts, out, "--method", "all")) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed and "test token-flip rate: initial" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert {"config", "pairs", "eval", "timing"} <= set(m)
    assert list(m["eval"]) == ["fp", "initial", "qdpo", "kd", "sft"]
    for name, row in m["eval"].items():
        for key in ("flip_rate", "top1_agreement", "kl", "first_divergence", "exact_match", "rouge_l",
                    "fp_nll", "ppl"):
            assert key in row, (name, key)
    assert m["eval"]["fp"]["flip_rate"] == 0 and m["eval"]["fp"]["exact_match"] == 1
    assert m["pairs"]["total"] == 9 and m["pairs"]["pairs"] + m["pairs"]["identical_dropped"] == 9
    for method in ("qdpo", "kd", "sft"):
        assert m["training"][method]["export"]["reproduces_eval"] is True
        # the compressed-tensors copy, loaded by transformers itself, computes the same logits
        assert m["training"][method]["export"]["compressed_tensors_max_abs_logit_diff"] < 1e-4
        assert (out / f"export_{method}" / "qdpo_quant.json").exists()
        lines = (out / f"train_{method}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == list(range(5))
    assert {"load", "fp_answers", "quantize", "pairs", "train_qdpo"} <= set(m["timing"])
    assert "peak_rss_gb" in m["timing"]["train_qdpo"]
    pair = json.loads((out / "pairs.jsonl").read_text().splitlines()[0])
    assert {"prompt", "chosen", "rejected", "first_divergence", "ref_chosen_logps", "ref_rejected_logps"} <= set(pair)
    assert pair["prompt"][-1]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"
    report = (out / "report.md").read_text()
    assert "| initial" in report and "kd" in report and "flip_vs_margin.png" in report
    w = m["init"]["weights"]  # 14 linear layers quantized; the tied embeddings are the only FP matrix
    assert (w["quantized_layers"], w["other_fp_weights"], w["fp_fused_expert_tensors"]) == (14, 0, [])
    assert f"- **Quantized weights**: {100 * w['quantized_fraction']:.2f} % of the weight matrices" in report
    assert (out / "flip_vs_margin.png").stat().st_size > 0 and (out / "training_curves.png").stat().st_size > 0


def test_resume_accepts_smaller_memory_settings(model_dir, tmp_path):
    # a run that ran out of memory (generation, a training forward, the output layer) was refused as another run
    # when resumed with smaller batches: only --overwrite, losing its answers, let it go on
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    assert train.main(_args(model_dir, prompts, out, "--steps", "1")) == 0
    assert train.main(_args(model_dir, prompts, out, "--steps", "1", "--resume", "--gen-batch-size", "2",
                            "--micro-batch-size", "1", "--logps-chunk", "5")) == 0
    assert json.loads((out / "run.json").read_text())["config"]["micro_batch_size"] == 1


def test_run_directory_rules_and_resume(model_dir, tmp_path, capsys):
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    assert train.main(_args(model_dir, prompts, out)) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert train.main(_args(model_dir, prompts, out)) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert train.main(_args(model_dir, prompts, out, "--bits", "8", "--resume")) == 2
    assert ("holds a different run (differs in bits (4 there, 8 now)); pass the run's values to continue it"
            in capsys.readouterr().err)
    assert train.main(_args(model_dir, prompts, out, "--resume")) == 0  # every stage reused
    again = json.loads((out / "metrics.json").read_text())
    assert again["eval"]["qdpo"]["flip_rate"] == first["eval"]["qdpo"]["flip_rate"]
    edited = prompts.read_text().replace('"id": "q0", "prompt": "', '"id": "q0", "prompt": "w7 ')
    prompts.write_text(edited)  # the same path, another prompt q0: its answers and pair must not be reused
    assert train.main(_args(model_dir, prompts, out, "--resume")) == 2
    assert "holds a different run (differs in the content of --prompts)" in capsys.readouterr().err
    prompts.write_text(prompts.read_text().replace('"id": "q0", "prompt": "w7 ', '"id": "q0", "prompt": "'))
    other = tmp_path / "other_model"  # another model put under the same path: its FP answers are not these
    shutil.copytree(model_dir, other)
    assert train.main(_args(other, prompts, tmp_path / "run2", "--steps", "1")) == 0
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert train.main(_args(other, prompts, tmp_path / "run2", "--steps", "1", "--resume")) == 2
    assert "holds a different run (differs in the content of --model)" in capsys.readouterr().err
    assert train.main(_args(model_dir, prompts, out, "--bits", "8", "--overwrite")) == 0
    assert json.loads((out / "run.json").read_text())["config"]["bits"] == 8
    inside = out / "prompts_kept_here.jsonl"  # an input inside the run that --overwrite would delete
    inside.write_text(prompts.read_text())
    assert train.main(_args(model_dir, inside, out, "--overwrite")) == 2
    assert (f"--overwrite would delete --prompts {inside}, which lies inside --output-dir {out}; move it out first"
            in capsys.readouterr().err)
    assert inside.exists() and (out / "metrics.json").exists()  # nothing deleted
    kept = out / "run.yaml"  # the --config file itself, kept beside the run it made
    kept.write_text("steps: 2\n")
    assert train.main(_args(model_dir, prompts, out, "--config", str(kept), "--overwrite")) == 2
    assert f"--overwrite would delete --config {kept}" in capsys.readouterr().err
    assert kept.exists() and (out / "metrics.json").exists()
    stranger = tmp_path / "not_a_run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert train.main(_args(model_dir, prompts, stranger, "--overwrite")) == 2
    assert "holds no qdpo run" in capsys.readouterr().err
    assert (stranger / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kill", ["after_run_json", "second_file"])
def test_overwrite_killed_while_deleting_the_old_run_is_finished_by_the_same_command(model_dir, tmp_path,
                                                                                     monkeypatch, capsys, kill):
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    args = _args(model_dir, prompts, out, "--steps", "1", "--no-export")
    assert train.main(args) == 0
    keep = tmp_path / "keep"  # outside the run, linked from inside it
    keep.mkdir()
    (keep / "mine.txt").write_text("mine")
    (out / "link").symlink_to(keep, target_is_directory=True)
    real_unlink, gone = os.unlink, []

    def killed(path, *a, **k):  # the process dies during --overwrite's deletion
        real_unlink(path, *a, **k)
        gone.append(Path(path).name)
        if (gone[-1] == "run.json") if kill == "after_run_json" else len(gone) == 2:
            raise KeyboardInterrupt

    cfg = train.parse_args([*args, "--overwrite"])
    monkeypatch.setattr(os, "unlink", killed)
    try:
        train.prepare_run_dir(cfg)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    if (out / "metrics.json").exists():  # half deleted: only the same --overwrite goes on
        for extra in ([], ["--resume"]):
            assert train.main([*args, *extra]) == 2
            assert "holds a run that --overwrite was deleting when it stopped; pass --overwrite to finish" in (
                capsys.readouterr().err)
    assert train.main([*args, "--overwrite", "--bits", "8"]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["bits"] == 8
    assert (out / "metrics.json").exists() and not (out / "link").exists()
    assert (keep / "mine.txt").read_text() == "mine" and prompts.exists()


def test_resume_names_the_same_inputs_by_other_paths(model_dir, tmp_path, monkeypatch, capsys):
    """--resume from another directory, with the inputs' paths written relative to it: the same run, not one that
    "differs in model, prompts"; another file under the same name still differs."""
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    assert train.main(_args(model_dir, prompts, out, "--steps", "1", "--no-export")) == 0
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    rel_model = os.path.relpath(model_dir, tmp_path / "sub")
    assert train.main(_args(rel_model, "../p.jsonl", "../run", "--steps", "1", "--no-export", "--resume")) == 0
    shutil.copy(prompts, tmp_path / "sub" / "p.jsonl")  # the same content under another path: the same prompts
    assert train.main(_args(rel_model, "p.jsonl", "../run", "--steps", "1", "--no-export", "--resume")) == 0
    capsys.readouterr()
    assert train.main(_args(model_dir, prompts, out, "--steps", "1", "--no-export", "--resume", "--model",
                            str(tmp_path / "sub"))) == 2
    assert "differs in model" in capsys.readouterr().err


def test_output_dir_that_cannot_hold_a_run_is_one_clear_error(model_dir, tmp_path, capsys):
    prompts = _prompts(tmp_path / "p.jsonl")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    damaged = tmp_path / "damaged"
    (damaged / "answers").mkdir(parents=True)
    (damaged / "run.json").write_text('{"fingerp')
    for out, extra, match in ((a_file, [], r"--output-dir .*notes.txt cannot be used as a run directory \(Not a "
                                             r"directory\); choose a directory you can write to"),
                              (a_file / "run", [], "notes.txt/run cannot be used as a run directory"),
                              (damaged, ["--resume"], r"damaged/run.json is damaged \(.*\); use another --output-dir, "
                                                      "or --overwrite")):
        capsys.readouterr()
        assert train.main(_args(model_dir, prompts, out, *extra)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("qdpo.train: error: ") == 1
        assert re.search(match, err.strip().splitlines()[-1]), err
    assert a_file.read_text() == "mine" and (damaged / "run.json").read_text() == '{"fingerp'


def test_a_user_error_before_any_artifact_does_not_block_the_corrected_command(model_dir, tmp_path, capsys):
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    assert train.main(_args(model_dir, tmp_path / "typo.jsonl", out)) == 2
    assert "prompt file" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["run.json"]
    assert train.main(_args(model_dir, prompts, out, "--steps", "1", "--no-export")) == 0  # not "holds a run"
    assert json.loads((out / "run.json").read_text())["config"]["prompts"] == str(prompts)
    assert train.main(_args(model_dir, prompts, out, "--steps", "1", "--no-export")) == 2  # a real run: refused
    assert "already holds a run" in capsys.readouterr().err
    killed = tmp_path / "killed"  # a kill while the first run.json was written: its temporary file alone
    killed.mkdir()
    (killed / ".run.json.tmp").write_text('{"finger')
    assert train.prepare_run_dir(train.parse_args(_args(model_dir, prompts, killed))) == killed
    assert json.loads((killed / "run.json").read_text())["config"]["prompts"] == str(prompts)


def test_resume_on_a_device_where_the_dtype_computes_otherwise_is_refused(model_dir, tmp_path, monkeypatch):
    """--dtype auto is fp32 on the CPU and bf16 autocast on a GPU: moving a run there would switch mid-run."""
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    train.prepare_run_dir(train.parse_args(_args(model_dir, prompts, out)))  # on the CPU
    (out / "pairs.jsonl").write_text("")  # an artifact: a run to continue
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto now resolves to the GPU
    with pytest.raises(train.RunDirError, match=r"compute dtype \('float32' there, 'bfloat16' now on this device; "
                                                 r"--dtype float32 continues it\)"):
        train.prepare_run_dir(train.parse_args(_args(model_dir, prompts, out, "--resume")))
    for dtype in ("float32", "bfloat16"):  # fp32 on the GPU, as the run began; bf16 on the CPU: fp32 there too
        monkeypatch.setattr(torch.cuda, "is_available", lambda: dtype == "float32")
        train.prepare_run_dir(train.parse_args(_args(model_dir, prompts, out, "--resume", "--dtype", dtype)))


def test_interrupted_training_resumes_to_the_same_result(model_dir, tmp_path, monkeypatch, capsys):
    prompts = _prompts(tmp_path / "p.jsonl")
    full = tmp_path / "full"
    assert train.main(_args(model_dir, prompts, full, "--steps", "6", "--eval-every", "0")) == 0
    cut = tmp_path / "cut"
    orig = trainer_mod.Trainer.train_step

    def dying(self):
        rec = orig(self)
        if self.step == 5:
            raise KeyboardInterrupt
        return rec

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", dying)
    assert train.main(_args(model_dir, prompts, cut, "--steps", "6", "--eval-every", "0", "--overwrite")) == 130
    # the advice works as written: --resume and --overwrite together are refused
    assert "rerun the same command with --resume instead of --overwrite to continue" in capsys.readouterr().err
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", orig)
    assert train.main(_args(model_dir, prompts, cut, "--steps", "6", "--eval-every", "0", "--resume")) == 0
    a = json.loads((full / "metrics.json").read_text())["eval"]["qdpo"]
    b = json.loads((cut / "metrics.json").read_text())["eval"]["qdpo"]
    assert a == b


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_takes_more_flags(tmp_path):
    # an interrupted make train says "rerun the same command with --resume": make train must be able to
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(["make", "-n", "train", "ARGS=--resume", f"VENV={tmp_path / 'venv'}"], cwd=root,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path / 'venv'}/bin/python -m qdpo.train --output-dir runs/default --resume" in r.stdout


def test_fp_targets_come_from_decoding(model_dir, tmp_path, monkeypatch):
    """The FP hidden states kept while decoding feed KD and evaluation: the FP model never runs in training;
    without them (an older run directory) the FP model computes the same numbers."""
    from qdpo.quant.linear import QuantLinear
    from qdpo.training import stages as S

    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    fp_calls = []
    orig = trainer_mod.completion_hidden

    def spy(model, batch):
        if not any(isinstance(m, QuantLinear) for m in model.modules()):
            fp_calls.append(batch.input_ids.shape[0])
        return orig(model, batch)

    monkeypatch.setattr(trainer_mod, "completion_hidden", spy)
    assert train.main(_args(model_dir, prompts, out, "--method", "kd")) == 0
    assert fp_calls == [], "KD ran the FP model although its hidden states were kept"
    fp = {r["id"]: r["answer_ids"] for r in S.read_jsonl(out / "answers" / "fp.jsonl")}
    hidden = S.load_hidden(out / "answers" / "fp_hidden.safetensors", fp)
    assert hidden is not None and set(hidden) == set(fp)
    first = json.loads((out / "metrics.json").read_text())["eval"]
    (out / "answers" / "fp_hidden.safetensors").write_bytes(b"damaged")  # ignored, then recomputed
    (out / "metrics.json").unlink()
    assert train.main(_args(model_dir, prompts, out, "--method", "kd", "--resume")) == 0
    again = json.loads((out / "metrics.json").read_text())["eval"]
    for name in ("initial", "kd"):
        assert again[name]["flip_rate"] == first[name]["flip_rate"]
        assert again[name]["kl"] == pytest.approx(first[name]["kl"], rel=1e-4, abs=1e-7)


def test_any_prompt_id_keys_the_kept_fp_hidden_states(model_dir, tmp_path, monkeypatch):
    """safetensors reserves the key "__metadata__": a prompt with that id (or an empty or non-ASCII one) made
    answers/fp_hidden.safetensors unreadable, and the run quietly ran the FP model again. A run directory written
    before (tensors keyed by the bare ids) still reads."""
    from safetensors.torch import save_file

    from qdpo.training import stages as S

    prompts = _prompts(tmp_path / "p.jsonl")
    ids = {"q0": "__metadata__", "q1": "", "q3": "é 中"}  # training, training, validation
    text = prompts.read_text()
    for old, new in ids.items():
        text = text.replace(f'"id": "{old}"', f'"id": {json.dumps(new)}')
    prompts.write_text(text)
    out = tmp_path / "run"
    monkeypatch.setattr(trainer_mod.Trainer, "run", lambda self, resume=False: {"steps_run": 0, "best_step": 0})
    assert train.main(_args(model_dir, prompts, out, "--method", "kd", "--no-export")) == 0
    fp = {r["id"]: r["answer_ids"] for r in S.read_jsonl(out / "answers" / "fp.jsonl")}
    assert set(ids.values()) <= set(fp)
    path = out / "answers" / "fp_hidden.safetensors"
    hidden = S.load_hidden(path, fp)
    assert hidden is not None and set(hidden) == set(fp)
    old = {k: v for k, v in hidden.items() if k != "__metadata__"}  # the earlier layout: keyed by the ids
    save_file(old, str(path))
    del fp["__metadata__"]
    got = S.load_hidden(path, fp)
    assert got is not None and all(torch.equal(got[k], v) for k, v in old.items())


def test_max_length_cuts_every_method_s_training_examples(model_dir, tmp_path, monkeypatch):
    """--max-length bounds prompt + answer in training for KD and SFT too, not only QDPO's pairs."""
    seen = {}
    orig = trainer_mod.Trainer.__init__

    def spy(self, model, cfg, method, examples, *a, **k):
        seen[method] = [(len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids or [])) for e in examples]
        orig(self, model, cfg, method, examples, *a, **k)

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", spy)
    out = tmp_path / "run"
    assert train.main(_args(model_dir, _prompts(tmp_path / "p.jsonl"), out, "--method", "all", "--max-length", "12",
                            "--steps", "1", "--no-export")) == 0
    assert set(seen) == {"qdpo", "kd", "sft"}
    fp = [json.loads(x) for x in (out / "answers" / "fp.jsonl").read_text().splitlines()]
    assert max(len(r["answer_ids"]) for r in fp) == 6  # prompts of 7 to 10 tokens: some answers are cut
    for method, lengths in seen.items():
        assert max(p + max(c, r) for p, c, r in lengths) == 12, method
    # evaluation scores the whole answers, as generated (the flag's help says so)
    m = json.loads((out / "metrics.json").read_text())
    test = {p["id"] for p in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines()) if p["split"] == "test"}
    assert m["eval"]["initial"]["tokens"] == sum(len(r["answer_ids"]) for r in fp if r["id"] in test)
    from qdpo.training.config import build_parser

    assert "validation and test score whole answers" in " ".join(build_parser().format_help().split())


def test_without_validation_the_report_names_the_step_whose_weights_were_kept(model_dir, tmp_path, caplog):
    """No validation check (--eval-every 0, or no validation prompts left): training keeps its last step's
    weights, and metrics.json and report.md say so instead of "kept the weights of step 0" and early stopping."""
    prompts = _prompts(tmp_path / "p.jsonl")
    no_val = tmp_path / "no_val.jsonl"
    no_val.write_text(prompts.read_text().replace('"validation"', '"train"'))
    for name, p, extra in (("off", prompts, ["--eval-every", "0"]), ("no_val", no_val, [])):
        out = tmp_path / name
        with caplog.at_level("WARNING", logger="qdpo.train"):
            assert train.main(_args(model_dir, p, out, "--steps", "3", "--no-export", *extra)) == 0
        m = json.loads((out / "metrics.json").read_text())["training"]["qdpo"]
        assert (m["steps_run"], m["best_step"], m["best_val_flip_rate"]) == (3, 3, None), name
        report = (out / "report.md").read_text()
        assert "ran 3 steps, kept the weights of step 3 (no validation check: the last step)" in report, name
        assert "early stopping" not in report.split("## Notes")[1], name
        assert "- **Early stopping**: off" in report, name  # the Configuration section agrees
    assert "no validation prompts: training keeps its last step's weights (no early stopping)" in caplog.text


def test_held_out_prompts_that_are_training_prompts_are_named(model_dir, tmp_path, monkeypatch, caplog):
    """--eval-prompts given the --prompts file (or a prompt repeated across splits) tests on training prompts:
    the report's "never used for training" would not hold, so the run says which prompts."""
    prompts = _prompts(tmp_path / "p.jsonl")
    monkeypatch.setattr(trainer_mod.Trainer, "run", lambda self, resume=False: {"steps_run": 0, "best_step": 0})
    with caplog.at_level("WARNING", logger="qdpo.train"):
        assert train.main(_args(model_dir, prompts, tmp_path / "run", "--eval-prompts", str(prompts),
                                "--no-export")) == 0
    assert ("9 of the 15 test prompts are also training prompts (first: 'eval:q0' = 'q0'): their metrics are not "
            "held out") in caplog.text


def test_judge_url_scores_every_model(model_dir, tmp_path, server, capsys):
    """--judge-url: each evaluated model's greedy test answers are rated; scores land in metrics.json and
    report.md, and a judge added on --resume of a finished run needs no retraining; a secret in the URL is
    written nowhere."""
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    assert train.main(_args(model_dir, prompts, out, "--method", "kd")) == 0
    judge = ["--judge-url", server + "?api-key=s3cret", "--judge-model", "stub"]  # a key in the URL: never written
    assert train.main(_args(model_dir, prompts, out, "--method", "kd", "--resume", *judge)) == 0
    assert not [p for p in out.rglob("*") if p.is_file() and b"s3cret" in p.read_bytes()]
    m = json.loads((out / "metrics.json").read_text())
    assert m["judge"]["url"] == server + "?api-key=***" == m["config"]["judge_url"]
    for name in ("fp", "initial", "kd"):
        assert 1 <= m["eval"][name]["judge_score"] <= 10, name
        assert m["judge"][name]["judged"] + m["judge"][name]["unrated"] == 3  # the test split
    assert "judge_score" in (out / "report.md").read_text()
    # a later --resume without a judge or export (another method, or the judge server down) dropped the earlier
    # judge scores and export record though the answers rated and the export directory were unchanged
    assert train.main(_args(model_dir, prompts, out, "--method", "kd", "--resume", "--no-export")) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["judge"] == m["judge"] and again["eval"] == m["eval"]
    assert again["training"]["kd"]["export"] == {**m["training"]["kd"]["export"], "path": str(out / "export_kd"),
                                                 "earlier_call": True}
    assert "judge_score" in (out / "report.md").read_text()
    (out / "answers" / "initial.jsonl").unlink()  # answered again: the same answers, so the same scores
    rows = [json.loads(line) for line in (out / "answers" / "kd.jsonl").read_text().splitlines()]
    (out / "answers" / "kd.jsonl").write_text("".join(json.dumps({**r, "answer_ids": r["answer_ids"][:-1]}) + "\n"
                                                      for r in rows))  # the answers an earlier judge rated differ
    assert train.main(_args(model_dir, prompts, out, "--method", "sft", "--resume", "--no-export")) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert [n for n in again["eval"] if "judge_score" in again["eval"][n]] == ["fp", "initial"]
    assert set(again["judge"]) == {"url", "model", "scale", "fp", "initial"}
    capsys.readouterr()
    assert train.main(_args(model_dir, prompts, tmp_path / "other", "--judge-url", "http://127.0.0.1:9/v1",
                            "--judge-model", "m")) == 2
    err = capsys.readouterr().err
    assert "cannot reach an OpenAI-compatible" in err and "Traceback" not in err
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_plain_template_and_unsplit_prompts(tmp_path):
    d = tmp_path / "plain"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    _tokenizer(chat=False).save_pretrained(d)
    prompts = _prompts(tmp_path / "p.jsonl", n=20, split=False)
    out = tmp_path / "run"
    assert train.main(_args(d, prompts, out, "--steps", "1", "--export", "--no-export")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["pairs"]["total"] == 12  # 60 % of 20 unsplit prompts are training prompts


def test_plain_template_keeps_the_tokenizers_bos_but_not_an_appended_eos():
    """A tokenizer without a chat template that wraps every text as ``<s> ... </s>``: the prompt starts with its
    BOS, and the EOS it appends does not end the prompt before the answer."""
    from qdpo.training.prompts import prompt_ids

    tok = _tokenizer(chat=False)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=[("<|im_start|>", 1), ("<|im_end|>", 2)])
    text = tok("User: w5 w6\nAssistant:", add_special_tokens=False)["input_ids"]
    assert tok("w5")["input_ids"] == [1, tok.convert_tokens_to_ids("w5"), 2]  # what the tokenizer adds
    assert prompt_ids(tok, [{"role": "user", "content": "w5 w6"}]) == [1, *text]


def test_prompt_file_with_a_bom_and_crlf_lines_reads_as_written(tmp_path):
    from qdpo.training.prompts import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_bytes("\ufeff".encode() + '{"prompt": "héllo w1", "split": "test"}\r\n\r\n{"prompt": "w2"}\r\n'.encode())
    got = read_prompts(f)
    assert [(p.id, p.text, p.split) for p in got] == [("line1", "héllo w1", "test"), ("line3", "w2", "")]


def test_prompt_ids_null_and_duplicates(tmp_path):
    """A null id (pandas' export of a missing value) is no id: the line's name, not one 'None' shared by every
    such line; a repeated id names both lines, the default names included."""
    from qdpo.training.prompts import PromptError, read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text('{"id": null, "prompt": "w1"}\n{"id": null, "prompt": "w2"}\n{"id": 7, "prompt": "w3"}\n')
    assert [p.id for p in read_prompts(f)] == ["line1", "line2", "7"]
    f.write_text('{"prompt": "w1"}\n{"id": "x", "prompt": "w2"}\n{"id": "line1", "prompt": "w3"}\n')
    with pytest.raises(PromptError, match=r"p.jsonl:3: id 'line1' is also the id of line 1 \(a line without an "
                                          r"id is named line<N>\); give every prompt its own id"):
        read_prompts(f)


def test_a_lone_surrogate_escape_is_one_clear_error(tmp_path):
    """JSON may escape half of a UTF-16 pair ("\\ud83d", a string cut between the halves of an emoji): no
    character, so the tokenizer (and any UTF-8 artifact) failed on it with a traceback after the model loaded."""
    from qdpo.training.prompts import PromptError, read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "w1"}\n{"messages": [{"role": "user", "content": "w2 \\ud83d"}]}\n')
    with pytest.raises(PromptError, match=r"p.jsonl:2: message 1 holds '\\ud83d' \(character 4\), half of a UTF-16 "
                                          r"surrogate pair and no character; escape both halves or write the "
                                          r"character itself"):
        read_prompts(f)
    f.write_text('{"prompt": "w1", "id": "\\udc00"}\n')
    with pytest.raises(PromptError, match=r"p.jsonl:1: the id holds '\\udc00'"):
        read_prompts(f)
    f.write_text('{"prompt": "w1 \\ud83d\\ude00"}\n')  # both halves: one character
    assert read_prompts(f)[0].text == "w1 \U0001f600"


@pytest.mark.parametrize("case,match", [
    ("missing_model", "--model .*does not exist|not found"),
    ("no_head", "without a causal-LM head"),
    ("truncated_weights", r"--model .*: cannot load the model in .*: a weight file is damaged or incomplete "
                          r"\(.*\); copy or download it again"),
    ("malformed", r"p.jsonl:3: malformed JSON"),
    ("empty", "holds no prompts"),
    ("latin1", r"p.jsonl:2: not UTF-8 text \(invalid continuation byte at byte 16 of the line\); save the file as "
               "UTF-8"),
    ("positions", r"prompt 'q1' \(14 tokens\) and an answer of --max-new-tokens 6 need 20 positions, but .* has 16 "
                  r"\(a learned position table\); lower --max-new-tokens, or drop the longer prompts with --max-length 11"),
    ("no_eval_file", r"prompt file .*nowhere.jsonl not found; pass --eval-prompts PATH to a JSONL file$"),
    ("eval_id_clash", r"--eval-prompts .*e.jsonl: the prompt 'q5' is known in the run as 'eval:q5', the id of a "
                      r"--prompts prompt in .*p.jsonl; rename one of the two"),
    ("bits", "bits=3 is not supported"),
    ("group", "K=64 is not divisible by group_size=128.*Group sizes that fit every layer: \\[32, 64, -1\\]"),
    ("too_long", "longer than --max-length"),
    ("nan_weights", r"model.layers.1.mlp.down_proj: weight contains NaN or Inf; fix the checkpoint"),
    ("no_test", "no test prompts"),
    ("small_vocab", r"prompt 'line1' has token id \d+, but .* has 150 embedding rows: the tokenizer \(200 tokens\) "
                    r"does not match the model; resize"),
    ("no_system_role", r"prompt 'q0': the tokenizer's chat template refuses its messages \(System role not supported\)"
                       r"; .*put the system text into the first user turn"),
    ("logits", r"--model .*: LlamaForCausalLM turns its output layer's values into logits in a way qdpo does not "
               r"reproduce"),
])
def test_bad_input_gives_one_clear_error(model_dir, tmp_path, capsys, case, match):
    prompts = _prompts(tmp_path / "p.jsonl")
    model, extra = model_dir, []
    if case == "missing_model":
        model = tmp_path / "nowhere"
    elif case == "no_head":
        model = tmp_path / "base"
        LlamaModel(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=False)).save_pretrained(model)
        _tokenizer(True).save_pretrained(model)
    elif case == "truncated_weights":  # an interrupted download
        model = tmp_path / "truncated"
        shutil.copytree(model_dir, model)
        (model / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:1000])
    elif case == "malformed":
        lines = prompts.read_text().splitlines()
        lines[2] = '{"prompt": "w1 w2"'
        prompts.write_text("\n".join(lines) + "\n")
    elif case == "latin1":  # a file saved in a legacy encoding
        lines = prompts.read_bytes().splitlines(keepends=True)
        lines[1] = '{"prompt": "caf\u00e9 w1"}\n'.encode("latin-1")
        prompts.write_bytes(b"".join(lines))
    elif case == "empty":
        prompts.write_text("\n")
    elif case == "positions":  # GPT-2's learned positions end at n_positions: generation would fail past them
        from transformers import GPT2Config, GPT2LMHeadModel

        model = tmp_path / "gpt2"
        GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=16, eos_token_id=2,
                                   pad_token_id=2, bos_token_id=2)).save_pretrained(model)
        _tokenizer(True).save_pretrained(model)
    elif case == "eval_id_clash":  # eval ids get the prefix "eval:": a training prompt could already hold one
        prompts.write_text(prompts.read_text().replace('"id": "q0"', '"id": "eval:q5"'))
        (tmp_path / "e.jsonl").write_text('{"id": "q5", "prompt": "w1 w2"}\n')
        extra = ["--eval-prompts", str(tmp_path / "e.jsonl")]
    elif case == "no_eval_file":
        extra = ["--eval-prompts", str(tmp_path / "nowhere.jsonl")]
    elif case == "bits":
        extra = ["--bits", "3"]
    elif case == "too_long":
        extra = ["--max-length", "9"]
    elif case == "small_vocab":  # a tokenizer with tokens the model has no embedding rows for
        model = tmp_path / "small"
        LlamaForCausalLM(LlamaConfig(vocab_size=150, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, eos_token_id=2,
                                     pad_token_id=2)).save_pretrained(model)
        _tokenizer(True).save_pretrained(model)
        prompts.write_text('{"prompt": "w1 w190", "split": "train"}\n{"prompt": "w3", "split": "test"}\n')
    elif case == "no_system_role":  # a chat template that raises on a system turn (Gemma's does)
        model = tmp_path / "nosys"
        shutil.copytree(model_dir, model)
        tok = _tokenizer(True)
        tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                             "supported') }}{% endif %}" + TEMPLATE)
        tok.save_pretrained(model)
        prompts = _prompts(tmp_path / "p.jsonl", system="w5 w6")
    elif case == "nan_weights":  # caught before the FP answers: a fixed checkpoint (same file sizes) starts afresh
        from safetensors.torch import load_file, save_file

        model = tmp_path / "nan"
        shutil.copytree(model_dir, model)
        sd = load_file(str(model / "model.safetensors"))
        sd["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
        save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})
    elif case == "logits":  # a soft cap the config names but the model's forward does not apply
        model = tmp_path / "capped"
        shutil.copytree(model_dir, model)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 0.01}))
    elif case == "no_test":
        prompts.write_text("".join(l.replace('"test"', '"train"') + "\n" for l in prompts.read_text().splitlines()))
    out = tmp_path / "run"
    args = _args(model, prompts, out, *extra)
    if case == "group":
        args[args.index("--group-size") + 1] = "128"
    capsys.readouterr()  # drop what building the fixture printed
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("qdpo.train: error: ") == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("qdpo.train: error: ")
    assert re.search(match, last), last
    # each fails before the first artifact (FP answers): the corrected command starts afresh in the same directory
    assert not out.exists() or [p.name for p in out.iterdir()] == ["run.json"]


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(model_dir, tmp_path, monkeypatch, capsys):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    real_dcp_save, real_torch_save = trainer_mod.D.dcp.save, torch.save
    saves = []

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    def flaky_dcp_save(*a, **k):  # every write of the second checkpoint hits a full disk
        saves.append(1)
        if len(saves) == 2:
            monkeypatch.setattr(torch, "save", disk_full)
        try:
            return real_dcp_save(*a, **k)
        finally:
            monkeypatch.setattr(torch, "save", real_torch_save)

    monkeypatch.setattr(trainer_mod.D.dcp, "save", flaky_dcp_save)
    assert train.main(_args(model_dir, prompts, out, "--eval-every", "0")) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err
    ckpts = sorted((out / "train_qdpo" / "checkpoints").glob("*"))
    assert [p.name for p in ckpts] == ["step-000002"]  # the failed save left nothing behind
    assert trainer_mod.D.read_meta(ckpts[0])["step"] == 2
    dcp_to_torch_save(ckpts[0], tmp_path / "ckpt.pt")  # complete and readable
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]


def test_init_from_an_existing_quantized_checkpoint(model_dir, tmp_path, capsys):
    """--init PATH starts from a compressed-tensors checkpoint: its spec and codes, not RTN's."""
    import qdpo
    from qdpo.export import export
    from qdpo.loading import load_model

    model, tok = load_model(model_dir)
    qdpo.quantize_model(model, qdpo.QuantSpec(4, 64, symmetric=True), mode="packed")
    qdpo.save_quantized(model, tmp_path / "packed", tokenizer=tok)
    ckpt = export(tmp_path / "packed", tmp_path / "ct", "compressed-tensors")
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    assert train.main(_args(model_dir, prompts, out, "--init", str(ckpt), "--steps", "1")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["config"]["bits"], m["config"]["group_size"], m["config"]["symmetric"]) == (4, 64, True)
    assert m["init"]["init"] == "external"
    assert train.main(_args(model_dir, prompts, tmp_path / "bad", "--init", str(tmp_path / "nowhere"))) == 2
    # a checkpoint of another model fails before the FP answers: the corrected command starts afresh there
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 eos_token_id=2, pad_token_id=2)).save_pretrained(other)
    _tokenizer(True).save_pretrained(other)
    bad = tmp_path / "mismatch"
    assert train.main(_args(other, prompts, bad, "--init", str(ckpt), "--steps", "1")) == 2
    assert "does not fit the full-precision model" in capsys.readouterr().err
    assert [p.name for p in bad.iterdir()] == ["run.json"]
    # another checkpoint under the same --init path: the pairs' reference log-probs were the old one's
    shutil.rmtree(ckpt)
    export(tmp_path / "packed", ckpt, "gptq", allow_inexact_scales=True)
    assert train.main(_args(model_dir, prompts, out, "--init", str(ckpt), "--steps", "1", "--resume")) == 2


def test_exclude_keeps_the_named_layers_in_full_precision(model_dir, tmp_path, capsys):
    from qdpo.quant import load_quantized, quantized_layers

    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    keep = ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    assert train.main(_args(model_dir, prompts, out, "--steps", "1", "--init", "awq",
                            "--exclude", "*.down_proj, model.layers.0.self_attn.q_proj")) == 0
    m = json.loads((out / "metrics.json").read_text())
    packed = quantized_layers(load_quantized(out / "export_qdpo"))
    assert packed and not set(keep) & set(packed)
    assert m["init"]["weights"]["quantized_layers"] == len(packed)
    ct = json.loads((out / "export_qdpo_compressed_tensors" / "config.json").read_text())
    assert set(keep) <= set(ct["quantization_config"]["ignore"])
    assert train.main(_args(model_dir, prompts, out, "--steps", "1", "--init", "awq", "--resume")) == 2
    assert "holds a different run (differs in exclude (" in capsys.readouterr().err
    assert train.main(_args(model_dir, prompts, tmp_path / "typo", "--exclude", "*.down_porj")) == 2
    assert ("--exclude *.down_porj matches no layer of LlamaForCausalLM; its layers are named like "
            "'model.layers.0.self_attn.q_proj'") in capsys.readouterr().err
    from qdpo.training.stages import excluded_layers  # the LM head is kept anyway: naming it is no typo
    assert "lm_head" in excluded_layers(load_quantized(out / "export_qdpo"), ["lm_head", "*.down_proj"])


def test_no_differing_pairs_skips_qdpo_with_a_clear_note(model_dir, tmp_path):
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    assert train.main(_args(model_dir, prompts, out, "--bits", "8", "--group-size", "64", "--symmetric", "--steps", "1")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["pairs"]["pairs"] == 0  # W8 g64 sym on this tiny model changes no greedy answer
    assert m["training"]["qdpo"]["skipped"] == "no differing pairs"
    assert m["eval"]["qdpo"]["flip_rate"] == m["eval"]["initial"]["flip_rate"]


def test_a_compressed_tensors_export_transformers_cannot_load_is_recorded_not_fatal(model_dir, tmp_path, monkeypatch,
                                                                                     caplog):
    # transformers 5.25 fails to load a symmetric Falcon export (its weight init reads a compressed layer's
    # missing `weight`); the run, trained and exported by then, finishes and says what was not checked
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, path, *args, **kwargs):
        if str(path).endswith("_compressed_tensors"):
            raise AttributeError("'FalconLinear' object has no attribute 'weight'")
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="qdpo.train"):
        assert train.main(_args(model_dir, _prompts(tmp_path / "p.jsonl"), out, "--symmetric", "--steps", "2")) == 0
    export = json.loads((out / "metrics.json").read_text())["training"]["qdpo"]["export"]
    assert export["reproduces_eval"] is True and export["compressed_tensors_checked"] is False
    assert "FalconLinear" in export["compressed_tensors_load_error"]
    assert (out / "export_qdpo_compressed_tensors" / "model.safetensors").exists() and (out / "report.md").exists()
    assert "transformers could not load it to check it" in caplog.text


def test_artifacts_are_utf8_whatever_the_locale(tmp_path):
    # answers hold any text (written with ensure_ascii=False): under a non-UTF-8 locale (LC_ALL=C without
    # Python's UTF-8 mode, a Windows code page) the default encoding would fail on them or misread them
    code = ("import sys; from pathlib import Path; from qdpo.training.stages import read_jsonl, write_jsonl\n"
            "p = Path(sys.argv[1]); rows = [{'id': 'q0', 'answer': 'caf\\u00e9 \\u2192 \\u4e2d'}]\n"
            "write_jsonl(p, rows); assert read_jsonl(p) == rows\n")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.jsonl")], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "caf\u00e9" in (tmp_path / "a.jsonl").read_text(encoding="utf-8")


def test_coverage_log_line_groups_large_counts(caplog):
    # "embeddings 28311552": the count of SmolLM2's embedding weights was logged as an unbroken run of digits
    from qdpo.quant import QuantSpec, quantize_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    quantize_model(model, QuantSpec(4, 32))
    with caplog.at_level("INFO", logger="qdpo.train"):
        train._coverage(model)
    assert "(full precision: embeddings 1,280,000, other 0 weights)" in caplog.text


def test_an_artifact_changed_by_hand_is_one_clear_error_or_counted_again(model_dir, tmp_path, capsys, caplog):
    # a deleted pairs.stats.json was a bare "No such file or directory" on --resume, a cut or edited JSONL line a
    # traceback
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    args = _args(model_dir, prompts, out, "--steps", "1", "--no-export")
    assert train.main(args) == 0
    stats = json.loads((out / "pairs.stats.json").read_text())
    (out / "pairs.stats.json").unlink()  # counted again from pairs.jsonl and the answers: nothing to rebuild
    assert train.main([*args, "--resume"]) == 0
    assert json.loads((out / "pairs.stats.json").read_text()) == stats
    assert json.loads((out / "metrics.json").read_text())["pairs"]["pairs"] == stats["pairs"]
    for name, cut in (("answers/fp.jsonl", lambda t: t[: len(t) // 2]),
                      ("pairs.jsonl", lambda t: t.replace('"chosen_ids"', '"chosen"', 1))):
        path = out / name
        text = path.read_text()
        path.write_text(cut(text))
        capsys.readouterr()
        assert train.main([*args, "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"qdpo.train: error: {path} is damaged (line "), err
        assert "delete it and rerun with --resume to have it rebuilt, or use --overwrite" in err[0]
        assert path.read_text() == cut(text)  # nothing rewritten
        path.unlink()  # the fix the error names
        assert train.main([*args, "--resume"]) == 0
        assert path.read_text() == text


def test_a_method_trained_in_another_call_stays_in_the_report(model_dir, tmp_path, server):
    # --resume --method kd after a --method qdpo run rewrote metrics.json and report.md with KD alone: QDPO's
    # results dropped out though its checkpoints, export and answers stayed in the run directory
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    args = _args(model_dir, prompts, out, "--steps", "1", "--no-export")
    assert train.main([*args, "--method", "qdpo"]) == 0
    first = json.loads((out / "metrics.json").read_text())
    judge = ["--judge-url", server, "--judge-model", "stub"]  # rates QDPO's answers too, from answers/qdpo.jsonl
    assert train.main([*args, "--method", "kd", "--resume", *judge]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["eval"]) == ["fp", "initial", "qdpo", "kd"]
    assert 1 <= m["eval"]["qdpo"].pop("judge_score") <= 10 and m["judge"]["qdpo"]["judged"] == 3
    assert m["eval"]["qdpo"] == first["eval"]["qdpo"]
    assert m["training"]["qdpo"] == {**first["training"]["qdpo"], "earlier_call": True}
    assert "earlier_call" not in m["training"]["kd"] and "train_qdpo" in m["timing"]
    report = (out / "report.md").read_text()
    assert "| QDPO (earlier call) |" in report and "| KD |" in report
    assert re.search(r"- QDPO (beats|does not beat|and) KD", report)  # the verdict compares them
    assert "trained and evaluated by an earlier call in this run directory" in report
    assert train.main([*args, "--method", "qdpo", "--resume"]) == 0  # rerun: its own row, KD's kept
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["eval"]) == ["fp", "initial", "qdpo", "kd"]
    assert "earlier_call" not in m["training"]["qdpo"] and m["training"]["kd"]["earlier_call"] is True
    assert train.main([*args, "--method", "all", "--resume"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["eval"]) == ["fp", "initial", "qdpo", "kd", "sft"]
    assert not any("earlier_call" in t for t in m["training"].values())
    assert "earlier call" not in (out / "report.md").read_text()


@pytest.mark.parametrize("damage", ["weights", "stats"])
def test_a_damaged_initial_model_is_quantized_again(model_dir, tmp_path, damage):
    # a cut initial/model.safetensors (or an edited done.json) ended --resume with a SafetensorError traceback
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    args = _args(model_dir, prompts, out, "--steps", "1", "--no-export")
    assert train.main(args) == 0
    first = json.loads((out / "metrics.json").read_text())
    path = out / "initial" / ("model.safetensors" if damage == "weights" else "done.json")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert train.main([*args, "--resume"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["eval"]["initial"] == first["eval"]["initial"] and again["init"] == first["init"]
    assert again["eval"]["qdpo"]["flip_rate"] == first["eval"]["qdpo"]["flip_rate"]


def test_a_second_call_in_a_run_directory_in_use_is_refused(model_dir, tmp_path, capsys):
    # `--method qdpo` and `--method kd` run side by side in one directory wrote the same artifacts' temporary files
    # (one failing on a vanished .tmp) and each its own metrics.json, one call's results lost
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    args = _args(model_dir, prompts, out, "--steps", "1", "--no-export")
    assert train.main(args) == 0
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"  # another call working in the directory
        before = (out / "metrics.json").read_bytes()
        capsys.readouterr()
        assert train.main([*args, "--method", "kd", "--resume"]) == 2
        err = capsys.readouterr().err
        assert err == (f"qdpo.train: error: --output-dir {out} is in use by another python -m qdpo.train running "
                       "there; wait for it to finish (then --resume, with another --method if you like), or use "
                       "another --output-dir\n")
        assert (out / "metrics.json").read_bytes() == before and not (out / "train_kd").exists()
    finally:
        holder.communicate("")
    assert train.main([*args, "--method", "kd", "--resume"]) == 0  # once it has finished


def test_an_earlier_method_s_damaged_answers_go_unrated_not_fatal(tmp_path, caplog):
    # rating an earlier call's method with a new --judge-url read answers/<method>.jsonl after all of this call's
    # work: a cut line was a JSONDecodeError traceback there, and no metrics.json or report
    from qdpo.training.prompts import Prompt

    (tmp_path / "answers").mkdir()
    (tmp_path / "answers" / "qdpo.jsonl").write_text('{"id": "a", "answer_ids": [1, 2]}\n{"id": "b", "answer')
    (tmp_path / "metrics.json").write_text(json.dumps({"eval": {"qdpo": {"flip_rate": 0.1, "judge_score": 5}},
                                                       "training": {"qdpo": {"steps_run": 1}}}))
    cfg = train.parse_args(["--output-dir", str(tmp_path), "--method", "kd", "--resume", "--judge-url", "http://x/v1"])
    evals, summaries, texts = {"fp": {}, "kd": {}}, {"kd": {}}, {}
    test_p = [Prompt("a", [{"role": "user", "content": "x"}], "test"), Prompt("b", [{"role": "user", "content": "y"}],
                                                                               "test")]
    train._keep_earlier_methods(tmp_path, cfg, evals, summaries, {}, texts, test_p)
    assert list(evals) == ["fp", "qdpo", "kd"] and evals["qdpo"] == {"flip_rate": 0.1} and texts == {}
    assert summaries["qdpo"]["earlier_call"] is True and "qdpo's answers are not rated" in caplog.text
