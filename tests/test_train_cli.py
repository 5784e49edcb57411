"""`unipeft train / eval / predict / generate / merge / compare` end to end on tiny models and tiny data files.

Tiny random-init models use the real shipped tokenizers (MiniLM's WordPiece, SmolLM2's BPE with its chat template), so
the data plumbing is the real one while each run takes seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import NEG, POS
from safetensors.torch import load_file

import unipeft
from unipeft.cli import main


def cli(*args: str, expect: int = 0, capsys=None) -> str:
    """Run the CLI in-process the way the `unipeft` entry point does; return stdout + stderr."""
    argv = sys.argv
    sys.argv = ["unipeft", *args]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = argv
    text = ""
    if capsys is not None:
        captured = capsys.readouterr()
        text = captured.out + captured.err
    assert code == expect, f"exit {code} (expected {expect}): {text[-1500:]}"
    return text


def test_classification_run_end_to_end(tiny_bert, sentiment, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    cli("train", "--model", tiny_bert, "--data", str(sentiment), "--text-column", "review", "--label-column",
        "sentiment", "--max-steps", "6", "--batch-size", "8", "--eval-every", "3", "--out", str(out), "--quiet",
        "--set", "r=4", capsys=capsys)
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["test"]["accuracy"] <= 1.0 and results["summary"]["steps"] == 6
    for f in ("config.yaml", "metrics.jsonl", "report.md", "loss.png", "validation.png",
              "adapter/unipeft_adapters.json"):
        assert (out / f).is_file(), f
    assert not (out / "checkpoint.pt").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "split" not in x] == list(range(1, 7))
    assert [x["step"] for x in lines if x.get("split") == "validation"] == [3, 6]
    report = (out / "report.md").read_text()
    assert "trainable / total parameters" in report and "tokens/s" in report and "peak memory" in report
    am = unipeft.from_pretrained(out)
    assert am.recipes["default"].part("lora").r == 4
    assert am.model.config.id2label == {0: "neg", 1: "pos"}

    text = cli("predict", str(out), "a wonderful film", "a dull mess", capsys=capsys)
    assert len([ln for ln in text.splitlines() if ln.split("\t")[0] in ("pos", "neg")]) == 2

    ev = tmp_path / "eval"
    cli("eval", str(out), "--data", str(sentiment), "--out", str(ev), capsys=capsys)
    assert "accuracy" in json.loads((ev / "results.json").read_text())["test"]
    assert json.loads((out / "results.json").read_text()) == results, "eval never touches the run's files"
    text = cli("eval", str(out), "--out", str(out), expect=2, capsys=capsys)
    assert "must not be the run folder" in text


def test_merge_gives_a_plain_transformers_model(tiny_bert, sentiment, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    cli("train", "--model", tiny_bert, "--data", str(sentiment), "--text-column", "review", "--label-column",
        "sentiment", "--max-steps", "4", "--batch-size", "8", "--lr", "0.05", "--out", str(out), "--quiet",
        capsys=capsys)
    merged = tmp_path / "merged"
    cli("merge", str(out), "--to", str(merged), capsys=capsys)
    plain = T.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tok = T.AutoTokenizer.from_pretrained(merged)
    am = unipeft.from_pretrained(out)
    batch = tok(POS[:3] + NEG[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, am(**batch).logits, rtol=1e-5, atol=1e-5)
    hb = tmp_path / "houlsby"
    cli("train", "--model", tiny_bert, "--data", str(sentiment), "--text-column", "review", "--label-column",
        "sentiment", "--method", "houlsby", "--max-steps", "2", "--out", str(hb), "--quiet", capsys=capsys)
    text = cli("merge", str(hb), "--to", str(tmp_path / "m2"), expect=2, capsys=capsys)
    assert "cannot be merged" in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "m2").exists()


def test_causal_lm_plain_text_and_chat(tiny_llama, tmp_path, capsys) -> None:
    txt = tmp_path / "corpus.txt"
    txt.write_text(" ".join(POS + NEG) * 20)
    out = tmp_path / "lm"
    cli("train", "--model", tiny_llama, "--data", str(txt), "--method", "ia3", "--max-steps", "3", "--max-length",
        "32", "--batch-size", "4", "--out", str(out), "--quiet", capsys=capsys)
    test = json.loads((out / "results.json").read_text())["test"]
    assert set(test) == {"loss", "perplexity"} and abs(test["perplexity"] - torch.tensor(test["loss"]).exp()) < 1e-3
    text = cli("generate", str(out), "Once upon a time", "--max-new-tokens", "4", capsys=capsys)
    assert text.strip().startswith("Once upon a time")

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"q": f"Review {i}: {t}", "a": "positive" if t in POS else "negative"}) + "\n"
                            for i, t in enumerate((POS + NEG) * 2)))
    out2 = tmp_path / "chat"
    cli("train", "--model", tiny_llama, "--data", str(chat), "--prompt-column", "q", "--response-column", "a",
        "--max-steps", "2", "--batch-size", "4", "--out", str(out2), "--quiet", capsys=capsys)
    import yaml

    assert yaml.safe_load((out2 / "config.yaml").read_text())["task"] == "causal-lm"


def test_chat_labels_are_masked_to_the_response(tiny_llama) -> None:
    from unipeft.data import Columns, encode_chat

    tok = T.AutoTokenizer.from_pretrained(tiny_llama)
    rows = [{"prompt": "What is 2+2?", "response": "Four."}]
    enc = encode_chat(rows, tok, Columns(), max_length=128)
    ids, labels = enc.input_ids[0], enc.labels[0]
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                     tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert labels[: len(prompt)] == [-100] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert "Four." in tok.decode(ids[len(prompt):])


def test_kill_and_resume_reaches_the_same_weights(tiny_bert, sentiment, tmp_path) -> None:
    common = ["--model", tiny_bert, "--data", str(sentiment), "--text-column", "review", "--label-column",
              "sentiment", "--max-steps", "12", "--batch-size", "4", "--save-every", "3", "--eval-every", "4",
              "--quiet", "--set", "dropout=0.1"]
    env = {**os.environ, "UNIPEFT_TEST_STEP_SLEEP": "0.4"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([sys.executable, "-m", "unipeft", "train", *common, "--out", str(straight)], check=True,
                   env={**os.environ}, capture_output=True, timeout=300)
    proc = subprocess.Popen([sys.executable, "-m", "unipeft", "train", *common, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        metrics = killed / "metrics.jsonl"
        steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if (killed / "checkpoint.pt").exists() and steps and max(steps) >= 7:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run must be killed mid-way for this test to mean anything"
    resumed = subprocess.run([sys.executable, "-m", "unipeft", "train", "--out", str(killed), "--resume",
                              "--quiet", "--lr", "0.5"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "warning: --resume continues the run's own config.yaml; --lr not used" in resumed.stdout, resumed.stdout
    a = load_file(str(straight / "adapter" / "default.safetensors"))
    b = load_file(str(killed / "adapter" / "default.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in ma] == \
        [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in mb]


def test_adapted_model_trains_under_transformers_trainer(tiny_bert, tmp_path) -> None:
    tok = T.AutoTokenizer.from_pretrained(tiny_bert)
    model = T.AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    am = unipeft.attach(model, "lora", train_modules=["classifier"])
    rows = [{**tok(t, truncation=True), "labels": y} for t, y in [(p, 1) for p in POS] + [(n, 0) for n in NEG]]
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4,
                               learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    before = {k: p.detach().clone() for k, p in am.adapter_parameters("default").items()}
    trainer = T.Trainer(model=am, args=args, train_dataset=rows, data_collator=T.DataCollatorWithPadding(tok))
    result = trainer.train()
    assert result.global_step == 5
    after = am.adapter_parameters("default")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    frozen = [p for n, p in am.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_compare_writes_table_and_plot(tiny_bert, sentiment, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    cli("compare", "--data", str(sentiment), "--model", tiny_bert, "--methods", "lora,full,ia3", "--max-steps", "2",
        "--text-column", "review", "--label-column", "sentiment", "--out", str(out), capsys=capsys)
    summary = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["full", "lora", "ia3"]
    full, lora = summary["rows"][0], summary["rows"][1]
    assert full["trainable_percent"] > 99 and lora["trainable_percent"] < full["trainable_percent"]
    assert (out / "compare.png").is_file() and "| lora |" in (out / "compare.md").read_text()


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "missing column": (lambda d: ["--data", _write(d / "a.jsonl", '{"text": "x", "label": 0}\n' * 20),
                                  "--text-column", "review"], "has no column 'review'"),
    "unknown dataset": (lambda d: ["--data", "no_such_dataset"], "neither a shipped dataset"),
    "unknown preset": (lambda d: ["--method", "lorax"], "unknown preset 'lorax'"),
    "empty file": (lambda d: ["--data", _write(d / "e.csv", "")], "is empty"),
    "malformed file": (lambda d: ["--data", _write(d / "m.jsonl", '{"text": "x", "label": 0\n{{{\n')],
                       "cannot read"),
    "label out of range": (lambda d: ["--data", _write(d / "t.jsonl", ''.join(
        f'{{"text": "t{i}", "label": {i % 2}}}\n' for i in range(20))), "--eval-data",
        _write(d / "v.jsonl", '{"text": "v", "label": 5}\n'), "--test-data",
        _write(d / "s.jsonl", '{"text": "s", "label": 1}\n')], "label 5 in the validation is out of range"),
    "unknown knob": (lambda d: ["--set", "rank=4"], "unknown knob 'rank'"),
    "unknown model": (lambda d: ["--model", str(d / "nowhere")], "neither a shipped model"),
    "unwritable output": (lambda d: ["--out", "/proc/unipeft-cannot-write"], "cannot write to --out"),
    "bad --set syntax": (lambda d: ["--set", "r"], "is not KNOB=VALUE"),
    "one label only": (lambda d: ["--data", _write(d / "one.jsonl", '{"text": "x", "label": "pos"}\n' * 20)],
                       "at least 2 labels"),
    "malformed run config": (lambda d: [_write(d / "run.yaml", "epochs: [\n")], "not valid YAML"),
    "mistyped run config": (lambda d: [_write(d / "run2.yaml", "epochs: two\n")], "epochs must be int"),
    "null in run config": (lambda d: [_write(d / "run3.yaml", "batch_size: null\n")], "batch_size cannot be empty"),
    "misnamed label column": (lambda d: ["--data", _write(d / "s.csv", "sentence,y\n" + "a film,1\nb film,0\n" * 10),
                                         "--text-column", "sentence"], "has no column 'label' (columns: sentence, y)"),
    "plain text on an encoder": (lambda d: ["--data", _write(d / "c.txt", "once upon a time " * 200)],
                                 "is an encoder (bert)"),
    "lr not finite": (lambda d: ["--lr", "inf"], "--lr must be a finite number"),
    "warmup out of range": (lambda d: ["--warmup", "50"], "0 <= warmup < 1"),
    "eval every below 1": (lambda d: ["--eval-every", "-1"], "--eval-every must be >= 1"),
    "unknown option": (lambda d: ["--nosuch"], "No such option: --nosuch"),
    "labels of two kinds": (lambda d: ["--data", _write(d / "k.jsonl", "".join(
        json.dumps({"text": f"t{i}", "label": [0, 1, "neg", "pos"][i % 4]}) + "\n" for i in range(20)))],
        "mixes number and str values"),
    "header-only csv": (lambda d: ["--data", _write(d / "h.csv", "text,label\n")], "has no rows (a header only?)"),
    "empty text, numbered as in the file": (lambda d: ["--data", _write(d / "n.jsonl", "".join(
        json.dumps({"text": None if i == 5 else f"t{i}", "label": i % 2}) + "\n" for i in range(20)))],
        "row 6 has an empty 'text'"),
    "malformed jsonl names the cause": (lambda d: ["--data", _write(d / "b.jsonl", '{"text": "x", "label": 0}\n'
                                                                    '{"text": nope}\n' * 3)], "as json: ValueError"),
    "not a number": (lambda d: ["--batch-size", "1.5"], "Invalid value for '--batch-size'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case, tiny_bert, tmp_path, capsys) -> None:
    make, message = BAD_INPUTS[case]
    args = ["--model", tiny_bert, "--max-steps", "1", "--out", str(tmp_path / "out"), "--quiet"]
    extra = make(tmp_path)
    text = cli("train", *args, *extra, expect=2, capsys=capsys)
    assert message in text, text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text
    assert not (tmp_path / "out").exists(), "a run that failed before writing anything leaves no folder"


def test_run_folder_rules_and_truncation_warning(tiny_bert, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    long = " ".join(POS + NEG)
    data = _write(tmp_path / "long.jsonl", "".join(json.dumps({"text": long if i % 5 == 0 else POS[i % 8],
                                                               "label": i % 2}) + "\n" for i in range(30)))
    args = ["--model", tiny_bert, "--data", data, "--max-steps", "1", "--out", str(out), "--quiet", "--max-length",
            "16"]
    text = cli("train", *args, capsys=capsys)
    assert "warning:" in text and "truncated" in text
    text = cli("train", *args, expect=2, capsys=capsys)
    assert "already holds a finished run" in text and "--overwrite" in text
    cli("train", *args, "--overwrite", capsys=capsys)
    text = cli("train", "--out", str(out), "--resume", expect=2, capsys=capsys)
    assert "finished run" in text
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    text = cli("train", "--model", tiny_bert, "--data", data, "--out", str(tmp_path / "other"), "--overwrite",
               expect=2, capsys=capsys)
    assert "not a unipeft run" in text and (tmp_path / "other" / "notes.txt").exists()


def test_nan_loss_stops_with_the_last_good_checkpoint_kept(tiny_bert, sentiment, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    text = cli("train", "--model", tiny_bert, "--data", str(sentiment), "--text-column", "review", "--label-column",
               "sentiment", "--max-steps", "6", "--batch-size", "4", "--save-every", "1", "--lr", "1e30",
               "--warmup", "0", "--out", str(out), "--quiet", expect=2, capsys=capsys)
    assert "the loss became" in text and "last good checkpoint" in text and "--lr" in text
    assert (out / "checkpoint.pt").is_file() and not (out / "results.json").exists()
    blob = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in blob["params"].values()), "the kept checkpoint is a good one"


def test_max_eval_examples_uses_a_fixed_subset(tiny_bert, sentiment, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    cli("train", "--model", tiny_bert, "--data", str(sentiment), "--text-column", "review", "--label-column",
        "sentiment", "--max-steps", "2", "--eval-every", "1", "--max-eval-examples", "3", "--out", str(out), "--quiet",
        capsys=capsys)
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["validation_examples"] == 3 and summary["test_examples"] == 3


def test_overwrite_only_replaces_unipeft_runs_and_only_after_inputs_check(tiny_bert, sentiment, tmp_path,
                                                                          capsys) -> None:
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "config.yaml").write_text("lr: 1\n")
    (proj / "src" / "main.py").write_text("x")
    text = cli("train", "--model", tiny_bert, "--data", str(sentiment), "--out", str(proj), "--overwrite",
               expect=2, capsys=capsys)
    assert "not a unipeft run" in text and (proj / "src" / "main.py").exists()
    run = tmp_path / "run"
    args = ["--model", tiny_bert, "--data", str(sentiment), "--text-column", "review", "--label-column", "sentiment",
            "--max-steps", "1", "--out", str(run), "--quiet"]
    cli("train", *args, capsys=capsys)
    before = (run / "results.json").read_text()
    cli("train", *args[:-4], "--data", "no_such.jsonl", "--out", str(run), "--overwrite", expect=2, capsys=capsys)
    assert (run / "results.json").read_text() == before, "a failed --overwrite run leaves the old run intact"
    other = tmp_path / "other"
    cli("train", *args[:-2], str(other), "--quiet", capsys=capsys)
    text = cli("eval", str(run), "--out", str(other), expect=2, capsys=capsys)
    assert "training run folder" in text


def test_max_steps_caps_epochs_and_lr_log_is_the_rate_used(tiny_bert, sentiment, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    cli("train", "--model", tiny_bert, "--data", str(sentiment), "--text-column", "review", "--label-column",
        "sentiment", "--batch-size", "8", "--epochs", "1", "--max-steps", "100", "--warmup", "0.5", "--lr", "1",
        "--out", str(out), "--quiet", capsys=capsys)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "split" not in x]
    assert len(rows) == 5, "38 training rows (80% of 48) / 8 = 5 steps in the one epoch; --max-steps only caps"
    total, warm = 5, round(0.5 * 5)  # linear warmup to step `warm`, then linear decay to 0 at `total`
    expected = [(i + 1) / warm if i < warm else 1 - (i - warm) / (total - warm) for i in range(total)]
    assert [r["lr"] for r in rows] == pytest.approx(expected), "each logged lr is the one that step used"


def test_chat_examples_without_response_tokens_are_dropped(tiny_llama) -> None:
    from unipeft.data import Columns, encode_chat
    from unipeft.errors import UnipeftError

    tok = T.AutoTokenizer.from_pretrained(tiny_llama)
    rows = [{"prompt": "word " * 200, "response": "ok"}, {"prompt": "hi", "response": "hello there"}]
    enc = encode_chat(rows, tok, Columns(), max_length=64)
    assert len(enc) == 1 and any(x != -100 for x in enc.labels[0])
    with pytest.raises(UnipeftError, match="raise --max-length"):
        encode_chat(rows[:1], tok, Columns(), max_length=64)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_user_files_in_every_format_with_string_labels(fmt, tmp_path) -> None:
    import pandas as pd

    from unipeft.data import Columns, load_splits

    frame = pd.DataFrame({"review": POS + NEG, "sentiment": ["pos"] * 8 + ["neg"] * 8})
    path = tmp_path / f"reviews.{fmt}"
    {"jsonl": lambda: frame.to_json(path, orient="records", lines=True), "csv": lambda: frame.to_csv(path, index=False),
     "parquet": lambda: frame.to_parquet(path)}[fmt]()
    splits = load_splits(str(path), None, None, None, Columns(text="review", label="sentiment"), seed=0)
    assert splits.task == "classification" and splits.label_names == ["neg", "pos"]
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 16
    again = load_splits(str(path), None, None, None, Columns(text="review", label="sentiment"), seed=0)
    assert again.test == splits.test, "splits are deterministic for a seed"
