"""Switches read from the environment on hot paths (`UNIPEFT_FUSED`, `UNIPEFT_GROUPS`, `UNIPEFT_TRITON`,
`UNIPEFT_RECOMPUTE`, `UNIPEFT_STREAMS`).

They are read at every projection call, so that setting one (tests use monkeypatch.setenv) takes effect at the next
call. `os.environ.get` costs about 1 µs there — it encodes the key and, when the variable is unset, raises and
catches a KeyError — several times per projection on a host-bound training step. CPython's `os.environ` keeps its
values in the dict `_data` under encoded keys, and every write through `os.environ` (monkeypatch included) updates
it: one dict lookup reads the same value. Where that dict is not there (another Python, os.environ replaced), the
ordinary `os.environ.get` runs.

Under torch.compile a switch is read once, when the code is traced, and is a constant of the graph: a lookup that
dynamo traced would guard on the whole environment (a missing key is guarded by the dict's length), so any variable
set later — Inductor sets some while it compiles — recompiled the model on its next call (the 953M benchmark model:
25–40 s more compile time at its second step). After changing a switch, `torch._dynamo.reset()` makes a compiled
model read it again.
"""

from __future__ import annotations

import os

import torch

_ENVIRON = os.environ
_DATA = getattr(_ENVIRON, "_data", None)
_FAST = type(_DATA) is dict and hasattr(_ENVIRON, "encodekey") and hasattr(_ENVIRON, "encodevalue")
#: the switches' encoded keys, made here: encoding one inside a torch.compile region would break its graph
_KEYS: dict[str, object] = {n: _ENVIRON.encodekey(n) for n in ("UNIPEFT_FUSED", "UNIPEFT_GROUPS", "UNIPEFT_TRITON",
                                                              "UNIPEFT_RECOMPUTE", "UNIPEFT_STREAMS",
                                                              "TRITON_INTERPRET")} if _FAST else {}
#: "0" and "1" as `raw` returns them: os.environ's own encoding on the fast path, plain strings otherwise
_ZEROS = (_ENVIRON.encodevalue("0"), "0") if _FAST else ("0",)


def off(name: str) -> bool:
    """Whether environment variable `name` is set to "0" (the switches' only "off" value)."""
    return raw(name) in _ZEROS


def raw(name: str) -> object:
    """The variable's value in os.environ's own encoding (bytes on POSIX), or None when unset: a cache key that
    follows the variable (compare it only with other `raw` results). While tracing: its value then, as a constant."""
    if torch.compiler.is_compiling():
        return _traced(name)
    return _lookup(name)


def _lookup(name: str) -> object:
    if _FAST and os.environ is _ENVIRON:
        key = _KEYS.get(name)
        if key is None:
            key = _KEYS[name] = _ENVIRON.encodekey(name)
        return _DATA.get(key)
    return os.environ.get(name)


@torch.compiler.assume_constant_result
def _traced(name: str) -> object:
    """`raw` for dynamo: called while tracing, its result a constant of the graph, with no guard on os.environ."""
    return _lookup(name)
