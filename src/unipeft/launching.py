"""How the Triton kernels of kernels.py and routed_kernels.py are launched from eager code.

Triton's own launch path (`JITFunction.run`: argument binding, specialization, cache-key hashing; then the compiled
kernel's runner: launch metadata, hook settings, scratch checks) costs tens of µs of host time per call, and an eager
LoRA training step launches these kernels 160 times — on the GPU machines' CPUs, time the step waits for on slower
hosts (docs/performance.md). Three layers take it off:

- `_launch`: a cache of compiled kernels keyed by what Triton specializes on (the key built by the caller);
- `_launcher`: the compiled kernel's C launch function called directly, checked once per kernel against the
  installed Triton's own runner and launcher (a registered launch hook sends launches through Triton's path);
- `_Plan`: per call signature (every tensor's shape, strides, dtype and alignment, plus the non-tensor arguments
  in the caller's key), the recorded grid, constants and argument positions, so a call seen before skips building
  its arguments, its checks and its key.

Anything unexpected in Triton's internals (another version) falls back to Triton's own path, once for good.
"""

from __future__ import annotations

import copy
import operator
import os

import torch

from . import envflags

_COMPILED: dict[tuple, object] = {}  # launch key -> launch(grid, args) for Triton's compiled kernel (see _launch)
_DIRECT = [True]  # whether compiled kernels are launched directly (False once their launcher API surprised us)


def _launch(kernel, grid: tuple[int, ...], args: tuple, key: tuple, names: tuple[str, ...],
            num_warps: int = 4, num_stages: int | None = None, options: dict | None = None) -> None:
    """Launch with the compiled kernel looked up by `key` (everything Triton specializes the kernel's arguments on,
    built by the caller) instead of through `JITFunction.run`, whose argument binding and cache-key hashing cost
    tens of µs of host time per call (a LoRA step launches these kernels a few hundred times, and eager steps on a
    fast GPU are close to host-bound). `args` ends with the constexprs, named by `names`. The first launch per key
    goes through Triton's own path and compiles; if the compiled kernel's launcher API differs (another Triton
    version), every launch takes Triton's own path. Triton launches on the current device and its stream, so a
    tensor on another GPU (a model split across GPUs) makes its device current for the launch. `options`: more
    compile options (e.g. enable_fp_fusion), constant per kernel (the key does not hold them)."""
    t = args[0]
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        with torch.cuda.device(t.device):
            return _launch(kernel, grid, args, key, names, num_warps, num_stages, options)
    launch = _COMPILED.get(key)
    if launch is not None:
        try:
            launch(grid, args)
            return
        except (TypeError, IndexError, AttributeError):  # a launcher API we do not know: Triton's own path from now
            _PLANS.clear()
            _COMPILED.clear()
            _DIRECT[0] = False
    compiled = kernel[grid](*args[:-len(names)], **_compile_options(args, names, num_warps, num_stages, options))
    if _DIRECT[0] and os.environ.get("TRITON_INTERPRET") != "1" and hasattr(compiled, "__getitem__"):
        _COMPILED[key] = _launcher(compiled, grid, args, torch._C._cuda_getCurrentRawStream)


_PLANS: dict[tuple, _Plan] = {}  # call signature -> its launch plan (see _Plan)
_PLAN_LIMIT = 4096  # signatures kept (one per projection group and sequence length, usually); cleared when full
_ONE = ("1", b"1")  # TRITON_INTERPRET on, as envflags.raw returns it


def _signature(tensors: list[torch.Tensor]) -> tuple:
    """What a launch plan depends on in its tensors: shape, strides, dtype, 16-byte alignment (Triton specializes
    pointers on it), and the device (as the first tensor's index)."""
    return (tensors[0].get_device(), *[(t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0) for t in tensors])


class _Plan:
    """One kernel launch recorded for a call signature — the grid, the launch function, every non-tensor argument
    and which of the call's tensors goes where — so that the next call with the same signature skips building the
    grid, the argument tuple, the launch key and the checks (all of it settled by the signature): its arguments come
    from one `itemgetter` over the call's tensors and the recorded constants. Holds no tensor (a plan must not keep
    a model's weights alive). Host µs per call on the GPU machine's CPU (bench/host_micro.py, two runs each):
    `lora_grads` for q/k/v 70–96 → 35, `merged_weights` for q/k/v 57–96 → 28, `merged_weight` 23–36 → 13.5 (29.2 →
    13.3 in kernel_check.py, where `addmm` takes 19.3): ~4–6 ms of CPU a step of the 953M benchmark model, whose
    eager step waits on the CPU on slower hosts. The signature costs a few µs (five attribute reads per tensor)."""

    __slots__ = ("launch", "grid", "consts", "pick", "device", "extra")

    def __init__(self, launch, grid: tuple[int, ...], args: tuple, tensors: list[torch.Tensor], extra) -> None:
        where = {id(t): j for j, t in enumerate(tensors)}
        idx, consts = [], []
        for a in args:
            if isinstance(a, torch.Tensor):
                idx.append(where[id(a)])  # (KeyError: a tensor the caller did not list — no plan, see _plan)
            else:
                idx.append(len(tensors) + len(consts))
                consts.append(a)
        self.launch, self.grid, self.consts = launch, grid, consts
        self.pick = operator.itemgetter(*idx)
        self.device = tensors[0].get_device()
        self.extra = extra

    def ready(self) -> bool:
        """Whether the plan may launch now: its device is the current one (or it is a CPU plan: the interpreter)."""
        return self.device < 0 or self.device == torch.cuda.current_device()

    def __call__(self, tensors: list[torch.Tensor]) -> bool:
        """Launch with these tensors (in the recorded order); False if the launcher refused its arguments (another
        Triton: every plan and cached launcher is dropped, the caller takes the unplanned path)."""
        try:
            self.launch(self.grid, self.pick(tensors + self.consts))
            return True
        except (TypeError, IndexError, AttributeError):
            _PLANS.clear()
            _COMPILED.clear()
            _DIRECT[0] = False
            return False


def _compile_options(args: tuple, names: tuple[str, ...], num_warps: int, num_stages: int | None,
                     options: dict | None) -> dict:
    """The keyword arguments of a Triton launch: the constexprs (the last len(names) args) and compile options."""
    kw = dict(zip(names, args[-len(names):]), num_warps=num_warps, **(options or {}))
    if num_stages is not None:
        kw["num_stages"] = num_stages
    return kw


def _plan(key: tuple, launch_key: tuple, kernel, grid, args, tensors, names, num_warps: int = 4,
          num_stages: int | None = None, extra=None, options: dict | None = None) -> None:
    """Record the plan of a call that made this one launch, when its kernel has a cached launcher (`_launch`) or runs
    under Triton's interpreter (tests)."""
    launch = _COMPILED.get(launch_key)
    if launch is None and envflags.raw("TRITON_INTERPRET") in _ONE:
        k = len(names)
        launch = lambda grid, args: kernel[grid](*args[:-k],  # noqa: E731
                                                 **_compile_options(args, names, num_warps, num_stages, options))
    if launch is None:
        return
    try:
        plan = _Plan(launch, grid, args, tensors, extra)
    except KeyError:
        return
    if len(_PLANS) >= _PLAN_LIMIT:
        _PLANS.clear()
    _PLANS[key] = plan


def _launcher(compiled, grid: tuple[int, ...], args: tuple, stream_of) -> object:
    """launch(grid, args) for a compiled kernel: its C launch function called directly when that provably passes what
    Triton's own path would, else `compiled[grid](*args)`.

    Triton's path per launch — `CompiledKernel.__getitem__` builds a runner closure, which looks up the device and
    stream, builds launch metadata for profiler hooks (Triton 3.6: at every launch, its hook chains being objects even
    when empty), reads the hook settings, and calls the launcher object, which checks for scratch memory; the C code
    then calls both empty hook chains — is ~15–20 µs of Python on the GPU machine's CPU, and an eager LoRA step
    launches these kernels 160 times (`bench/host_probe.py`: on a slow host the eager step waits on the CPU).
    Without scratch memory and with no hook registered, all of that reduces to one call of the C function with no
    metadata and no hooks (which it skips). Whether this Triton version's two layers pass (grid, stream, function,
    cooperative, pdl, no scratch, packed metadata, metadata, the two hook settings, *args) is checked once per kernel,
    by running Triton's own runner and launcher code with a recorder in place of the C call (`grid`, `args`: the
    first launch's). `stream_of(device index)` gives the current raw stream (injectable for tests). While a hook is
    registered (a profiler such as proton), launches take Triton's path."""
    plain = lambda grid, args: compiled[grid](*args)  # noqa: E731
    try:
        from triton import knobs

        hooks = knobs.runtime
        run = compiled.run
        c_launch, coop, pdl = run.launch, run.launch_cooperative_grid, run.launch_pdl
        if run.global_scratch_size or run.profile_scratch_size:
            return plain
        function, packed = compiled.function, compiled.packed_metadata
        seen: list[tuple] = []
        sentinel = object()
        proxy = type(run).__new__(type(run))
        proxy.__dict__.update(run.__dict__)
        proxy.launch = lambda *a: seen.append(a)
        probe = copy.copy(compiled)  # (the shared kernel object is left alone: another thread may launch it)
        probe._run = lambda *a: type(run).__call__(proxy, *a)  # Triton's runner, then its launcher, recorded
        probe[grid](*args, stream=sentinel)
        if len(seen) != 1:
            return plain
        got = seen[0]
        head = (*grid, sentinel, function, coop, pdl, None, None, packed)
        k = len(head)  # then: launch metadata, the two hook settings, the kernel's arguments
        if (len(got) != k + 3 + len(args) or any(a is not b for a, b in zip(got, head))
                or got[k + 1] is not hooks.launch_enter_hook or got[k + 2] is not hooks.launch_exit_hook
                or any(a is not b for a, b in zip(got[k + 3:], args))):
            return plain
    except Exception:  # noqa: BLE001 — any surprise in Triton's internals: its own path
        return plain

    def direct(grid, args) -> None:
        if not (_idle(hooks.launch_enter_hook) and _idle(hooks.launch_exit_hook)):
            compiled[grid](*args)
            return
        c_launch(grid[0], grid[1], grid[2], stream_of(args[0].get_device()), function, coop, pdl, None, None, packed,
                 None, None, None, *args)

    return direct


def _idle(hook) -> bool:
    """Whether a Triton launch-hook setting calls nothing: None (Triton < 3.5) or an empty hook chain."""
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)
