"""Host µs a call costs through torch.library's two ways of registering a Python op — the custom_op decorator and
a plain torch.library.Library definition — with the schema of `unipeft::lora_backward` (overlap.py) and a body that
returns prepared tensors, so only the dispatch layers are timed. A compiled LoRA backward calls that op 64 times a
step on the 953M benchmark model, and its host time is what a slow CPU round runs short of (docs/performance.md).

Usage (any machine, unipeft importable: installed or PYTHONPATH=src):
    python3 bench/op_overhead.py [--calls 2000] [--out op_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import unipeft.overlap  # noqa: F401  (registers unipeft::lora_backward, whose schema the probe ops take)

#: "(Tensor?[] gs, …) -> (Tensor, Tensor, Tensor)", read from the registered op
_SCHEMA = str(torch.ops.unipeft.lora_backward.default._schema).partition("lora_backward")[2]
_OUT: list = []


def _body(gs, ws, bs, x, a_cat, scales, ranks, need_dx, need_da, rebuild):
    return _OUT[0], _OUT[1], _OUT[2]


def _register() -> tuple:
    """(the custom_op-registered op, the Library-registered op), each once per process."""
    if not hasattr(torch.ops.op_overhead, "decorated"):
        fn = torch.library.custom_op("op_overhead::decorated", mutates_args=(), schema=_SCHEMA)(_body)
        fn.register_fake(lambda *a: tuple(torch.empty(1) for _ in range(3)))
        lib = torch.library.Library("op_overhead", "FRAGMENT")
        lib.define("plain" + _SCHEMA)
        lib.impl("plain", _body, "CompositeExplicitAutograd")
        _register.lib = lib  # (a Library's registrations last as long as the object)
    return torch.ops.op_overhead.decorated.default, torch.ops.op_overhead.plain.default


def measure(calls: int = 2000, repeats: int = 5) -> dict:
    decorated, plain = _register()
    x = torch.randn(64, 32)
    gs = [torch.randn(64, 16) for _ in range(3)]
    ws = [torch.randn(16, 32) for _ in range(3)]
    bs = [torch.randn(16, 4) for _ in range(3)]
    args = (gs, ws, bs, x, torch.randn(12, 32), [1.0, 1.0, 1.0], [4, 4, 4], True, True, False)

    def best(fn) -> float:
        out = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                _OUT[:] = [torch.empty(1), torch.empty(1), torch.empty(1)]  # fresh outputs, as the op returns
                fn(*args)
            out = min(out, (time.perf_counter() - t0) / calls * 1e6)
        return out

    base = best(lambda *a: None)  # the loop and the three fresh outputs alone
    return {"custom_op_us": round(best(decorated) - base, 2), "library_us": round(best(plain) - base, 2),
            "calls": calls, "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    row = measure(args.calls)
    print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
