"""Bad input on every CLI command beyond `train`'s flags: one `error:` line, exit 2, nothing overwritten or left
half-made — resumed folders that are not runs, comparisons over existing runs, empty generation requests, paths
that look like markup, a run config YAML 1.1 reads as strings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from test_train_cli import cli

ROWS = "".join(json.dumps({"sentence": f"film {i} was {'great' if i % 2 else 'dull'}", "y": i % 2}) + "\n"
               for i in range(24))


def _data(tmp_path: Path) -> str:
    path = tmp_path / "reviews.jsonl"
    path.write_text(ROWS)
    return str(path)


def _one_line(text: str, message: str) -> None:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], text


def _run(tiny_bert: str, data: str, out: Path, capsys, *extra: str) -> None:
    cli("train", "--model", tiny_bert, "--data", data, "--text-column", "sentence", "--label-column", "y",
        "--max-steps", "1", "--batch-size", "4", "--out", str(out), "--quiet", *extra, capsys=capsys)


def test_resume_refuses_folders_and_checkpoints_that_are_not_unipeft_runs(tiny_bert, tmp_path, capsys) -> None:
    data = _data(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    torch.save({"w": torch.zeros(3)}, foreign / "checkpoint.pt")
    text = cli("train", "--model", tiny_bert, "--data", data, "--out", str(foreign), "--resume", "--quiet",
               expect=2, capsys=capsys)
    _one_line(text, "is not a unipeft run (no config.yaml)")
    done = tmp_path / "done"
    _run(tiny_bert, data, done, capsys)
    mixed = tmp_path / "mixed"  # a run's own config beside a checkpoint someone else wrote
    mixed.mkdir()
    shutil.copy(done / "config.yaml", mixed / "config.yaml")
    torch.save({"w": torch.zeros(3)}, mixed / "checkpoint.pt")
    text = cli("train", "--out", str(mixed), "--resume", "--quiet", expect=2, capsys=capsys)
    _one_line(text, "is not a unipeft training checkpoint")
    assert (mixed / "checkpoint.pt").exists() and not (mixed / "results.json").exists()


def test_an_abandoned_run_with_only_its_config_can_be_overwritten(tiny_bert, tmp_path, capsys) -> None:
    data = _data(tmp_path)
    done = tmp_path / "done"
    _run(tiny_bert, data, done, capsys)
    abandoned = tmp_path / "abandoned"  # killed before its first step: config.yaml only
    abandoned.mkdir()
    shutil.copy(done / "config.yaml", abandoned / "config.yaml")
    text = cli("train", "--model", tiny_bert, "--data", data, "--out", str(abandoned), "--quiet", expect=2,
               capsys=capsys)
    _one_line(text, "already holds an unfinished run")
    _run(tiny_bert, data, abandoned, capsys, "--overwrite")
    assert (abandoned / "results.json").is_file()


def test_compare_checks_every_method_and_folder_before_training(tiny_bert, tmp_path, capsys) -> None:
    data = _data(tmp_path)
    out = tmp_path / "cmp"
    args = ["compare", "--model", tiny_bert, "--data", data, "--text-column", "sentence", "--label-column", "y",
            "--max-steps", "1", "--batch-size", "4", "--out", str(out)]
    text = cli(*args, "--methods", "lora,nosuch", expect=2, capsys=capsys)
    _one_line(text, "unknown preset 'nosuch'")
    assert not out.exists(), "nothing trained for a comparison that could not finish"
    _run(tiny_bert, data, out / "lora-s0", capsys, "--seed", "5")
    before = (out / "lora-s0" / "results.json").read_text()
    text = cli(*args, "--methods", "lora", expect=2, capsys=capsys)
    _one_line(text, "already holds a run")
    assert (out / "lora-s0" / "results.json").read_text() == before, "an existing run is not replaced silently"
    cli(*args, "--methods", "lora", "--overwrite", capsys=capsys)
    assert json.loads((out / "compare.json").read_text())["rows"][0]["method"] == "lora"
    assert "seed: 0" in (out / "lora-s0" / "config.yaml").read_text()
    assert not list(out.glob(".*.tmp")), "compare.json and compare.md are written atomically"


def test_generate_refuses_empty_requests(tiny_llama, tmp_path, capsys) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("once upon a time there was a film. " * 80)
    run = tmp_path / "lm"
    cli("train", "--model", tiny_llama, "--data", str(corpus), "--max-steps", "1", "--max-length", "32",
        "--batch-size", "4", "--out", str(run), "--quiet", capsys=capsys)
    _one_line(cli("generate", str(run), "the cat", "--max-new-tokens", "0", expect=2, capsys=capsys),
              "--max-new-tokens must be >= 1")
    _one_line(cli("generate", str(run), "", expect=2, capsys=capsys), "a prompt is empty")


def test_paths_print_as_given_and_usage_errors_are_one_line(tiny_bert, tmp_path, capsys) -> None:
    data = _data(tmp_path)
    out = tmp_path / "lora[r=16]"
    _run(tiny_bert, data, out, capsys)
    text = cli("merge", str(out), "--to", str(tmp_path / "merged[/v1]"), capsys=capsys)
    assert f"→ {tmp_path / 'merged[/v1]'}" in text.replace("\n", ""), "a path with brackets is no markup"
    assert (tmp_path / "merged[/v1]" / "config.json").is_file()
    _one_line(cli("merge", str(out), expect=2, capsys=capsys), "Missing option '--to'")
    _one_line(cli("frobnicate", expect=2, capsys=capsys), "No such command 'frobnicate'")
    text = cli("merge", str(out), "--to", str(out / "inside"), expect=2, capsys=capsys)
    _one_line(text, "inside a training run folder")


def test_eval_takes_the_new_datas_columns(tiny_bert, tmp_path, capsys) -> None:
    data = _data(tmp_path)
    run = tmp_path / "run"
    _run(tiny_bert, data, run, capsys)
    other = tmp_path / "other.csv"
    other.write_text("review,stars\n" + "a fine film,1\na dull film,0\n" * 6)
    _one_line(cli("eval", str(run), "--data", str(other), "--out", str(tmp_path / "e1"), expect=2, capsys=capsys),
              "has no column 'sentence'")
    cli("eval", str(run), "--data", str(other), "--text-column", "review", "--label-column", "stars", "--out",
        str(tmp_path / "e2"), capsys=capsys)
    assert set(json.loads((tmp_path / "e2" / "results.json").read_text())["test"]) == {"accuracy", "loss"}


def test_run_config_takes_floats_yaml_reads_as_strings(tiny_bert, tmp_path, capsys) -> None:
    """YAML 1.1 reads `1e-3` (no dot) as a string: a float field takes it as the number it means."""
    data = _data(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_bert}\ndata: {data}\ntext_column: sentence\nlabel_column: y\nmax_steps: 1\n"
                      f"batch_size: 4\nlr: 1e-3\nout: {tmp_path / 'run'}\n")
    cli("train", str(config), "--quiet", capsys=capsys)
    assert "lr: 0.001" in (tmp_path / "run" / "config.yaml").read_text()


def test_convert_is_quiet_and_explains_a_full_fine_tuning_run(tiny_bert, tmp_path, capsys) -> None:
    data = _data(tmp_path)
    run = tmp_path / "run"
    _run(tiny_bert, data, run, capsys)
    text = cli("convert", str(run / "adapter"), str(tmp_path / "peft"), "--model", tiny_bert, capsys=capsys)
    assert text.strip().splitlines() == [f"wrote a peft adapter folder: {tmp_path / 'peft'}"], text
    full = tmp_path / "full"
    _run(tiny_bert, data, full, capsys, "--method", "full")
    _one_line(cli("convert", str(full), str(tmp_path / "x"), expect=2, capsys=capsys), "is a full fine-tuning run")


def test_a_run_folder_missing_a_part_is_one_line(tiny_bert, tmp_path, capsys) -> None:
    data = _data(tmp_path)
    run = tmp_path / "run"
    _run(tiny_bert, data, run, capsys)
    shutil.rmtree(run / "tokenizer")
    _one_line(cli("predict", str(run), "a fine film", expect=2, capsys=capsys), "has no tokenizer/ folder")
