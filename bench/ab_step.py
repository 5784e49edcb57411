"""Two versions of unipeft timed against each other on one GPU, round by round: is a change faster?

The step-time differences left to find are below 1%, while one version's in-turn ratio drifts by ±1.5% from round to
round, and two versions timed one after the other (two `perf_vs_peft.py --repeats` runs) also differ by the drift
between the runs. Here one worker process per source tree builds the frozen floor and the LoRA model once (compiled
once with --compile) and keeps them; the parent then asks the workers for rounds in turn, A B B A A B …, each round
timing that worker's floor and its LoRA step with the harness (`time_train`: median of 10 steps). Each version's
ratio to its own floor is taken per round, and the difference B − A is taken per pair of adjacent rounds, so drift
slower than a round cancels. Both workers hold their models on the GPU together; only one runs at a time.

Usage (GPU machine; the old code as a copy of its src/ tree in an ignored folder):
    python3 bench/ab_step.py --harness .gpu_carry/bench --a .gpu_carry/old_src/src --b src [--compile] \\
        [--rounds 6] [--env-b UNIPEFT_RECOMPUTE=1] --out ab.json
Each worker imports unipeft from its tree (PYTHONPATH) and the harness from --harness; --env-a / --env-b set
environment variables in one worker only (the same tree twice with a switch flipped is an A/B as well; `--env-b
AB_SKIP_GUARDS=1` times B's LoRA model without guard evaluation, `--env-b AB_FLAT_PARAMS=1` with its LoRA weights
in one flat parameter: bench/flat_probe.py; `--env-b AB_DICT_TAGS=1` compiles both of B's models with dynamo's
`use_recursive_dict_tags_for_guards`, which skips the guards of module subtrees whose dicts did not change;
`--env-b AB_FUSED_ADAMW=1` gives both of B's models the harness's AdamW with `fused=True`: the update in fused
kernels instead of the default foreach path's sequence of multi-tensor ops — the per-parameter Python loop that
gathers the state is the same; `AB_COMPILE_MODE=reduce-overhead` with --compile compiles that worker's models in
that torch.compile mode, each step replayed from CUDA graphs). `--squeeze 4:4` adds as many rounds again on a
squeezed CPU, after the plain ones: during each such round the worker's threads are pinned to 4 cores beside 4 busy
loops (bench/spin_probe.py's `squeezed`; the other worker is idle meanwhile), summarized apart — an A/B of the host
time two versions need on a slow or shared CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

SITES = ["q", "k", "v", "o", "gate", "up", "down"]


class _WholeLines:
    """A text stream that writes each complete line to fd in one os.write: the two workers share the parent's
    stderr, and print() writes a line's text and its newline in two calls, so two workers' lines could interleave
    into one ('{...}{...}'); a write of under 4 KiB to a pipe is atomic."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pending = fd, ""

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            done, _, self.pending = self.pending.rpartition("\n")
            for line in done.split("\n"):
                os.write(self.fd, (line + "\n").encode())
        return len(text)

    def flush(self) -> None:
        if self.pending:
            os.write(self.fd, self.pending.encode())
            self.pending = ""

    def isatty(self) -> bool:
        return False


def worker(harness: str, compile_: bool) -> None:
    """Build the floor and the LoRA model once, warm both up (compiling them), then time one round per request
    line on stdin ("round <i> [CORES:HOGS]", the latter a squeeze), answering one JSON line each (step ms and the
    harness's peak GiB per case: the other model's weights are resident in both, so compare peaks between the
    versions, not with the floor); the harness's own prints go to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr = _WholeLines(2)
    sys.path.insert(0, harness)
    import peft_baseline as h
    import torch
    from spin_probe import squeezed  # (bench/, this script's folder)

    import unipeft

    if os.environ.get("AB_DICT_TAGS") == "1":  # both of this worker's models: guards skip unchanged module dicts
        torch._dynamo.config.use_recursive_dict_tags_for_guards = True
    if os.environ.get("AB_FUSED_ADAMW") == "1":  # the harness's AdamW as one fused kernel (both models)
        torch.optim.AdamW = functools.partial(torch.optim.AdamW, fused=True)
    mode = os.environ.get("AB_COMPILE_MODE") or None  # e.g. reduce-overhead: steps replayed from CUDA graphs
    wrap = functools.partial(torch.compile, mode=mode) if compile_ else (lambda m: m)
    floor = h.make_model()
    floor_params = h.frozen_floor(floor)
    lora = unipeft.attach(h.make_model(), "lora", r=16, alpha=32, targets=SITES)
    if os.environ.get("AB_FLAT_PARAMS") == "1":  # one flat trainable tensor (bench/flat_probe.py)
        import flat_probe
        flat_probe.apply(lora)
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    models = (("floor", wrap(floor), floor_params), ("lora", wrap(lora), lora_params))
    for case, model, params in models:  # warm-up (and compilation) outside the timed rounds
        h.time_train(f"warm_{case}", model, params)
    proto.write(json.dumps(dict(ready=True, unipeft=os.path.dirname(unipeft.__file__))) + "\n")
    for line in sys.stdin:
        if not line.startswith("round"):
            break
        row = {}
        _, tag, *spec = line.split()
        with squeezed(spec[0] if spec else None):  # (bench/spin_probe.py: None squeezes nothing)
            for case, model, params in models:
                with _stance(case):
                    timed = h.time_train(f"{case}_{tag}", model, params)
                row[case], row[f"{case}_peak_gib"] = timed["step_ms"], timed.get("peak_gib")
        proto.write(json.dumps(row) + "\n")


def _stance(case: str):
    """`AB_SKIP_GUARDS=1` (set through --env-a/--env-b): that worker's compiled LoRA model runs its timed rounds
    without evaluating dynamo's guards (torch.compiler.set_stance(skip_guard_eval_unsafe=True)) — what the LoRA
    model's guard evaluation costs a synced step, against the same model with it."""
    import contextlib

    import torch
    if case == "lora" and os.environ.get("AB_SKIP_GUARDS") == "1":
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    return contextlib.nullcontext()


def _env(src: str, harness: str, extra: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, harness]))
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"ab_step: --env-a/--env-b take NAME=VALUE, got {item!r}")
        env[key] = value
    return env


def _ask(proc: subprocess.Popen, line: str | None) -> dict:
    if line is not None:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    answer = proc.stdout.readline()
    if not answer:
        raise SystemExit(f"ab_step: a worker stopped (exit {proc.wait()}); its output is above")
    return json.loads(answer)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def compare(rounds: list[dict]) -> dict:
    """Per-version ratios (LoRA / floor, each round) and the differences B − A between adjacent rounds of the
    two versions (rounds alternate A B B A …: each pair of rounds next to each other gives one difference)."""
    ratio = {v: [r["lora"] / r["floor"] for r in rounds if r["version"] == v] for v in "ab"}
    diffs = []
    for first, second in zip(rounds, rounds[1:]):
        if first["version"] != second["version"]:
            a, b = (first, second) if first["version"] == "a" else (second, first)
            diffs.append(b["lora"] / b["floor"] - a["lora"] / a["floor"])
    return dict(ratio_a=[round(x, 4) for x in ratio["a"]], ratio_b=[round(x, 4) for x in ratio["b"]],
                median_a=round(_median(ratio["a"]), 4), median_b=round(_median(ratio["b"]), 4),
                diffs_b_minus_a=[round(d, 4) for d in diffs], median_diff=round(_median(diffs), 4),
                b_faster_in=sum(d < 0 for d in diffs), pairs=len(diffs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench", help="folder holding peft_baseline.py")
    ap.add_argument("--a", required=True, help="version A's source tree (the folder holding the unipeft package)")
    ap.add_argument("--b", required=True, help="version B's source tree")
    ap.add_argument("--env-a", action="append", default=[], help="NAME=VALUE for worker A only (repeatable)")
    ap.add_argument("--env-b", action="append", default=[], help="NAME=VALUE for worker B only (repeatable)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per version (alternating A B B A …)")
    ap.add_argument("--squeeze", default=None, metavar="CORES:HOGS",
                    help="then as many rounds again with the CPU squeezed (bench/spin_probe.py), summarized apart")
    ap.add_argument("--out", default="ab.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.harness, args.compile)
        return
    harness = os.path.abspath(args.harness)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--harness", harness, "--a", "-", "--b", "-"]
    cmd += ["--compile"] if args.compile else []
    procs = {v: subprocess.Popen(cmd, env=_env(os.path.abspath(src), harness, extra), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
             for v, src, extra in (("a", args.a, args.env_a), ("b", args.b, args.env_b))}
    try:
        ready = {v: _ask(p, None) for v, p in procs.items()}  # (built and warmed up in parallel)
        rounds = []
        order = [("a", "b"), ("b", "a")]
        plan = [(i, None) for i in range(args.rounds)]
        plan += [(i, args.squeeze) for i in range(args.rounds)] if args.squeeze else []
        for i, squeeze in plan:
            for v in order[i % 2]:
                row = _ask(procs[v], f"round {i}" + (f" {squeeze}" if squeeze else ""))
                rounds.append(dict(version=v, round=i, squeeze=squeeze, **row))
                print(json.dumps(rounds[-1]), flush=True)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.stdin.close()
                p.wait(timeout=60)
    result = dict(meta=dict(date=time.strftime("%Y-%m-%d"), compiled=args.compile, a=args.a, b=args.b,
                            env_a=args.env_a, env_b=args.env_b, workers=ready),
                  rounds=rounds, summary=compare([r for r in rounds if not r["squeeze"]]))
    if args.squeeze:
        result["summary_squeezed"] = compare([r for r in rounds if r["squeeze"]])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for key, label in (("summary", ""), ("summary_squeezed", f", CPU squeezed {args.squeeze}")):
        if key in result:
            s = result[key]
            print(f"LoRA / floor, medians over {args.rounds} rounds{label}: A {s['median_a']:.4f}  "
                  f"B {s['median_b']:.4f};  B − A per adjacent pair: median {s['median_diff']:+.4f}, "
                  f"B faster in {s['b_faster_in']} of {s['pairs']}")


if __name__ == "__main__":
    main()
