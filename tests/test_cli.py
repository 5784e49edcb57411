"""The `unipeft` command line, run as a real subprocess (`python -m unipeft.cli`).

Each run pays ~3 s of imports, so all commands start together once per module (as many at a time as there are CPUs)
and the tests read their results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import yaml

from unipeft import Recipe, preset

PRESETS = ("lora", "rslora", "dora", "ia3", "houlsby", "pfeiffer", "parallel", "scaled_parallel", "prefix", "prompt",
           "mam", "unipelt")
MERGEABLE = {"lora", "rslora", "dora", "ia3"}

#: key -> (arguments, terminal width). 80 is what rich assumes when stdout is not a terminal (pipes, CI).
COMMANDS: dict[str, tuple[list[str], int]] = {
    "sites": (["sites", "minilm"], 200),  # the slowest (loads a model): start it first
    "presets": (["presets"], 200),
    "presets_80": (["presets"], 80),
    "presets_lora": (["presets", "lora"], 80),
    "presets_nope": (["presets", "nope"], 80),
    "sites_missing": (["sites", "/nonexistent/path"], 80),
}


def _run(args: list[str], columns: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TERM", "CLICOLOR_FORCE")}
    env.update(COLUMNS=str(columns), LINES="1000", NO_COLOR="1", PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "unipeft.cli", *args], capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=180)


@pytest.fixture(scope="module")
def cli():
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures: dict[str, Future] = {key: pool.submit(_run, *spec) for key, spec in COMMANDS.items()}
        yield lambda key: futures[key].result()


def table_rows(text: str) -> list[list[str]]:
    """The body cells of a rich table (lines drawn with │), stripped."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def assert_one_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:"), lines[0]
    for w in words:
        assert w in lines[0], lines[0]


def _preset_column(res: subprocess.CompletedProcess) -> dict[str, str]:
    """preset name -> its 'mergeable' cell, from the `presets` table."""
    return {row[0]: row[-1] for row in table_rows(res.stdout) if row and row[0]}


def test_presets_lists_every_preset_with_mergeability(cli):
    res = cli("presets")
    assert res.returncode == 0, res.stderr
    listed = _preset_column(res)
    assert set(listed) == set(PRESETS)
    assert listed == {n: "yes" if n in MERGEABLE else "no" for n in PRESETS}
    # Multi-part recipes show one row per part.
    assert {"ffn_adapter", "adapter"} <= {row[1] for row in table_rows(res.stdout)}


def test_presets_names_survive_an_80_column_terminal(cli):
    res = cli("presets_80")
    assert res.returncode == 0, res.stderr
    assert set(_preset_column(res)) == set(PRESETS)


def test_presets_name_prints_parseable_yaml(cli):
    res = cli("presets_lora")
    assert res.returncode == 0, res.stderr
    data = yaml.safe_load(res.stdout)
    assert isinstance(data, dict)
    assert data["name"] == "lora"
    assert data["parts"]["lora"]["r"] == 8
    # What is printed is the recipe itself: it loads back to the preset (even wrapped at 80 columns).
    assert Recipe.from_dict(data) == preset("lora")


def test_presets_unknown_name_is_one_error_line(cli):
    res = cli("presets_nope")
    assert_one_line_error(res, "nope")
    assert res.stdout.strip() == ""


def test_sites_of_minilm(cli):
    res = cli("sites")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    listed = [row[0] for row in table_rows(res.stdout) if row and row[0]]
    assert {"q", "v", "attn", "ffn", "kv", "embeddings"} <= set(listed)
    assert "gate" not in listed  # a BERT FFN has no gate projection
    assert len(listed) == len(set(listed))
    assert "6 layers" in res.stdout  # all-MiniLM-L6-v2


def test_sites_of_a_missing_path_is_one_error_line(cli):
    res = cli("sites_missing")
    assert_one_line_error(res, "/nonexistent/path")
