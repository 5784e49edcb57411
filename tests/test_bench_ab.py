"""bench/ab_step.py: two versions timed round by round in two worker processes. The GPU is what it is for; here a
stand-in harness (a tiny Llama on CPU) checks the protocol, the alternating order and the paired statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]

_FAKE_HARNESS = '''
import json, os, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, H = 128, 32


def make_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def frozen_floor(model):
    for p in model.parameters():
        p.requires_grad_(False)
    scale = torch.nn.Parameter(torch.ones(H))
    model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: out * scale)
    return [scale]


def time_train(case, model, params):
    x = torch.randint(0, VOCAB, (2, 16))
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    row = dict(case=case, step_ms=sorted(times)[1] * 1e3, peak_gib=0.5, fused=os.environ.get("UNIPEFT_FUSED"),
               cores=len(os.sched_getaffinity(0)))
    print(json.dumps(row), flush=True)
    return row


def release():
    pass
'''




def test_ab_step_alternates_two_workers_and_pairs_their_rounds(tmp_path) -> None:
    """Both workers build once and answer every round; rounds alternate A B B A; each version's ratio is its own
    LoRA over its own floor; --env-b reaches worker B only (its harness prints show UNIPEFT_FUSED=0); --squeeze 1:1
    adds as many rounds again, each worker pinned to one core for them only, summarized apart."""
    harness = tmp_path / "harness"
    harness.mkdir()
    (harness / "peft_baseline.py").write_text(_FAKE_HARNESS)
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ab_step.py"), "--harness", str(harness),
                           "--a", str(ROOT / "src"), "--b", str(ROOT / "src"), "--env-b", "UNIPEFT_FUSED=0",
                           "--squeeze", "1:1", "--rounds", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["version"] for r in result["rounds"]] == ["a", "b", "b", "a", "a", "b"] * 2
    assert [r["squeeze"] for r in result["rounds"]] == [None] * 6 + ["1:1"] * 6
    assert all(r["floor"] > 0 and r["lora"] > 0 and r["lora_peak_gib"] == 0.5 for r in result["rounds"])
    assert all(Path(w["unipeft"]) == ROOT / "src" / "unipeft" for w in result["meta"]["workers"].values())
    summary = result["summary"]
    assert summary["pairs"] == 3 and len(summary["ratio_a"]) == len(summary["ratio_b"]) == 3
    squeezed = result["summary_squeezed"]
    assert squeezed["pairs"] == 3 and squeezed["ratio_a"] == bench_module("ab_step").compare(
        [r for r in result["rounds"] if r["squeeze"]])["ratio_a"]
    rows = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith('{"case"')]
    assert {r["fused"] for r in rows} == {None, "0"}, "worker A without the switch, worker B with it"
    full = len(os.sched_getaffinity(0))
    assert len(rows) == 4 + 24  # each worker's warm-up (floor, LoRA), then 6 rounds of both per worker
    assert [r["cores"] for r in rows if r["case"].startswith("warm")] == [full] * 4
    pinned = [r["cores"] == 1 for r in rows if not r["case"].startswith("warm")]
    assert pinned == [False] * 12 + [True] * 12, "plain rounds unpinned, squeezed rounds on one core, in order"
    assert "CPU squeezed 1:1" in proc.stdout
    assert "B − A per adjacent pair" in proc.stdout


def test_compare_pairs_adjacent_rounds_of_the_two_versions() -> None:
    """The statistics against hand-computed values: ratios per round, B − A per adjacent pair, medians."""
    rounds = [dict(version="a", floor=100.0, lora=110.0), dict(version="b", floor=100.0, lora=108.0),
              dict(version="b", floor=200.0, lora=220.0), dict(version="a", floor=200.0, lora=224.0),
              dict(version="a", floor=100.0, lora=111.0), dict(version="b", floor=100.0, lora=112.0)]
    s = bench_module("ab_step").compare(rounds)
    assert s["ratio_a"] == [1.1, 1.12, 1.11] and s["ratio_b"] == [1.08, 1.1, 1.12]
    assert s["diffs_b_minus_a"] == pytest.approx([-0.02, -0.02, 0.01])
    assert s["median_a"] == 1.11 and s["median_b"] == 1.1 and s["median_diff"] == pytest.approx(-0.02)
    assert s["b_faster_in"] == 2 and s["pairs"] == 3


def test_env_items_must_be_name_value() -> None:
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        bench_module("ab_step")._env("src", "h", ["UNIPEFT_FUSED"])


def test_worker_output_is_written_a_whole_line_at_a_time(monkeypatch) -> None:
    """The workers share the parent's stderr: each complete line goes out in one os.write (text and newline
    together, as print() does not), so two workers' lines cannot interleave into one; a partial line waits."""
    ab = bench_module("ab_step")
    writes: list[bytes] = []
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append((fd, data)) or len(data))
    out = ab._WholeLines(2)
    print('{"case": "warm_floor"}', file=out)  # print: the text, then "\n", in two calls
    out.write("two\nlines\npart")
    assert writes == [(2, b'{"case": "warm_floor"}\n'), (2, b"two\n"), (2, b"lines\n")]
    out.flush()
    assert writes[-1] == (2, b"part") and out.pending == ""
