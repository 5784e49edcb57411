"""envflags.off reads the hot-path switches without os.environ.get: it must see every change made through os.environ."""

from __future__ import annotations

import os

from unipeft import envflags


def test_off_follows_os_environ(monkeypatch) -> None:
    monkeypatch.delenv("UNIPEFT_TEST_FLAG", raising=False)
    assert not envflags.off("UNIPEFT_TEST_FLAG")
    monkeypatch.setenv("UNIPEFT_TEST_FLAG", "0")
    assert envflags.off("UNIPEFT_TEST_FLAG")
    monkeypatch.setenv("UNIPEFT_TEST_FLAG", "1")
    assert not envflags.off("UNIPEFT_TEST_FLAG")
    os.environ["UNIPEFT_TEST_FLAG"] = "0"
    assert envflags.off("UNIPEFT_TEST_FLAG")
    monkeypatch.delenv("UNIPEFT_TEST_FLAG")
    assert not envflags.off("UNIPEFT_TEST_FLAG")


def test_off_without_the_fast_path(monkeypatch) -> None:
    """Another os.environ (or a Python without its backing dict): the ordinary lookup."""
    monkeypatch.setattr(os, "environ", {"UNIPEFT_TEST_FLAG": "0"})
    assert envflags.off("UNIPEFT_TEST_FLAG")
    monkeypatch.setattr(envflags, "_FAST", False)
    monkeypatch.setattr(os, "environ", {"UNIPEFT_TEST_FLAG": "1"})
    assert not envflags.off("UNIPEFT_TEST_FLAG")


def test_raw_follows_os_environ(monkeypatch) -> None:
    monkeypatch.delenv("UNIPEFT_TEST_FLAG", raising=False)
    assert envflags.raw("UNIPEFT_TEST_FLAG") is None
    monkeypatch.setenv("UNIPEFT_TEST_FLAG", "1")
    one = envflags.raw("UNIPEFT_TEST_FLAG")
    monkeypatch.setenv("UNIPEFT_TEST_FLAG", "0")
    assert envflags.raw("UNIPEFT_TEST_FLAG") not in (None, one)
    monkeypatch.setenv("UNIPEFT_TEST_FLAG", "1")
    assert envflags.raw("UNIPEFT_TEST_FLAG") == one


def test_every_switch_read_by_the_library_is_encoded_at_import() -> None:
    """A key encoded inside a torch.compile region broke its graph (41 breaks on a Llama whose first call was
    compiled); every name the library passes to `off`/`raw` must be encoded when envflags is imported."""
    import re
    from pathlib import Path

    import unipeft

    src = Path(unipeft.__file__).parent
    names = {m for f in src.glob("*.py") for m in re.findall(r'envflags\.(?:off|raw)\("([A-Z_]+)"\)', f.read_text())}
    assert names >= {"UNIPEFT_FUSED", "UNIPEFT_GROUPS", "UNIPEFT_TRITON"}
    if envflags._FAST:
        assert names <= set(envflags._KEYS)


def test_first_call_compiled_has_no_graph_break() -> None:
    """A fresh process whose first model call is compiled (AOTAutograd, CPU): one graph, no break, every step."""
    import subprocess
    import sys
    from pathlib import Path

    script = """
import sys, torch, unipeft
sys.path.insert(0, 'tests')
from conftest import tiny_model, inputs
am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
batch = inputs(batch=4, seq=48)
cm = torch.compile(am, backend="aot_eager")
for _ in range(2):
    cm(**batch, labels=batch["input_ids"]).loss.backward()
c = torch._dynamo.utils.counters
print(c["stats"]["unique_graphs"], sum(c["graph_break"].values()))
"""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["1", "0"]


def test_compiled_model_does_not_guard_on_the_environment(monkeypatch) -> None:
    """A variable set after compiling (on the GPU something sets one while the first step compiles) does not
    recompile the model: dynamo would guard a traced os.environ lookup of a missing key on the length of the whole
    environment. A switch is read when the code is traced; torch._dynamo.reset() makes it read again."""
    import torch
    from conftest import tiny_model

    import unipeft

    am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
    torch._dynamo.reset()
    cm = torch.compile(am, backend="aot_eager")
    x = torch.randint(0, 50, (2, 16))
    cm(input_ids=x, labels=x).loss.backward()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    monkeypatch.setenv("UNIPEFT_SOME_UNRELATED_VARIABLE", "1")
    cm(input_ids=x, labels=x).loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs

    monkeypatch.delenv("UNIPEFT_TEST_FLAG", raising=False)
    fn = torch.compile(lambda t: t + 1 if envflags.off("UNIPEFT_TEST_FLAG") else t - 1, backend="eager")
    one = torch.ones(2)
    assert fn(one).tolist() == [0.0, 0.0]
    monkeypatch.setenv("UNIPEFT_TEST_FLAG", "0")
    assert fn(one).tolist() == [0.0, 0.0], "a constant of the traced graph"
    torch._dynamo.reset()
    assert fn(one).tolist() == [2.0, 2.0]
    torch._dynamo.reset()
