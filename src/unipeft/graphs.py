"""CUDA graphs for the transformer layers of a training step (opt-in: `graph_layers(model)`).

Why: a LoRA step launches a few hundred small kernels per layer more than the frozen model, and on a slow host — or a
base already made GPU-lean by `accelerate()` — issuing them from Python costs more than running them (measured: host
96 ms for 65 ms of GPU work). A CUDA graph replays a layer's recorded kernels in one launch, so the step's cost falls
back to its GPU time. Nothing of the model's forward code is copied: each layer's own forward is recorded, once.

How: each layer of the model's layer list (the family's interface map, or `layers="model.layers"`) gets a forward that
dispatches per call. At the first layer's call in a grad-enabled forward, every layer is recorded at once — a few
warm-up passes, then the forward graphs in layer order and the backward graphs in reverse order, all sharing one
memory pool (the order they replay in, so no replay overwrites memory another still needs). Layer i's recorded input is
layer i-1's recorded output, and its output gradient is layer i+1's input gradient, so consecutive replays hand
tensors over without copies. Inputs every layer shares (RoPE cos/sin, position ids, a mask) are copied into the
graphs once per step; a layer that receives different ones (per-layer masks) makes the stack record each layer's own
copies instead. Each replayed layer is one autograd node whose parameters are its trainable ones (the adapters'),
so gradients flow and accumulate as in eager mode; parameter gradients are returned as fresh tensors, because a graph
rewrites its output buffers at every replay.

When it replays: grad enabled, CUDA inputs, the call's shape/dtype/flags equal to the recorded ones, no KV-cache
object, no gradient checkpointing, no torch.compile, no per-sample routing, no hooks on the layers' modules (they
would fire while recording and never at replay), the layers' parameters and buffers still the recorded tensors.
Anything else runs the layer's own forward. A new input shape runs eagerly once; if the next call has it too, it is
recorded in place of the old one, up to `max_captures` times (then other shapes stay eager, with one warning).

While graphs are on, grad-enabled calls of the layer list's owner get `use_cache=False` unless the caller set it: a
training step has no use for a KV cache, and a cache object is Python state a replay cannot update. A forward whose
layers' last replay still waits for its backward (two forwards, then one backward) runs eagerly, as a replay would
overwrite the saved activations; a backward after a later replay (retain_graph=True) is an error, not a silent one.
`AdaptedModel` drops the recording whenever its adapters change (add, remove, activate, merge, ...); a deep copy of a
graphed model runs its layers eagerly. Recording happens with autocast's weight cache off (a cached cast copy would
be baked into the graph). Caveats: a layer's outputs are the graph's buffers, rewritten by the next step's replay
(clone what you keep across steps); a trainable tensor a layer reads but does not own as a parameter gets no
gradient through a replay. Memory: the recorded activations stay allocated between steps (the pool), as the eager
step's peak does.

`emulate=True` runs the same bookkeeping with each "replay" re-running the recorded Python function (on any device):
the CPU test suite uses it to check the hand-over of inputs, outputs and gradients; real replay is checked against
eager on the GPU by bench/graph_check.py.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from torch import nn

from . import arch
from .errors import UnipeftError

_STACK = "_unipeft_graphs"  # attribute on the model holding its _Stack
_SLOT = "_unipeft_graph_slot"  # attribute on each layer (and the layer list's owner): (stack, index)
_SCALARS = (type(None), bool, int, float, str)


def graph_layers(model: nn.Module, *, enable: bool = True, layers: str | None = None, warmup: int = 2,
                 max_captures: int = 4, emulate: bool = False) -> int:
    """Replay the model's transformer layers from CUDA graphs in grad-enabled calls (see the module docstring);
    works on a transformers model or an AdaptedModel. Returns the number of layers set up. `enable=False` restores
    the layers' own forwards and frees the graphs."""
    am = model if getattr(model, "_wrappers", None) is not None else None
    hf = am.model if am is not None else model
    old = hf.__dict__.pop(_STACK, None)
    if old is not None:
        old.remove()
    if not enable:
        return 0
    owner, layer_list = _layer_list(hf, layers)
    if not emulate:
        device = next(hf.parameters()).device
        if device.type != "cuda":
            raise UnipeftError(f"graph_layers() records CUDA graphs but the model is on {device.type}; move it to a "
                               "CUDA GPU first, or train without graphs")
    guard = am._unrouted if am is not None else None
    stack = _Stack(owner, list(layer_list), warmup=warmup, max_captures=max_captures, emulate=emulate, guard=guard)
    hf.__dict__[_STACK] = stack
    return len(stack.layers)


def invalidate(model: nn.Module, guard: Callable[[], bool] | None = None) -> None:
    """Drop the recorded graphs (the next eligible call records again): AdaptedModel calls this whenever its
    adapters change, with `guard` telling whether a call is free of per-sample routing (routed calls run eagerly)."""
    stack = model.__dict__.get(_STACK)
    if stack is not None:
        stack.reset()
        stack.refused.clear()
        if guard is not None:
            stack.guard = guard


def _layer_list(hf: nn.Module, path: str | None) -> tuple[nn.Module, nn.ModuleList]:
    if path is None:
        fmap = arch.family_of(hf)
        if fmap is None:
            kind = getattr(getattr(hf, "config", None), "model_type", type(hf).__name__)
            raise UnipeftError(f"graph_layers() does not know where {kind!r} keeps its layers; name the layer list, "
                               "e.g. layers='model.layers'")
        path, _ = arch.find_layers(hf, fmap)
    try:
        layer_list = hf.get_submodule(path)
    except AttributeError:
        raise UnipeftError(f"graph_layers(): the model has no module '{path}'; name its layer list, e.g. "
                           "layers='model.layers'") from None
    if not isinstance(layer_list, nn.ModuleList) or not len(layer_list):
        raise UnipeftError(f"graph_layers(): '{path}' is not a non-empty nn.ModuleList of layers")
    owner = hf.get_submodule(path.rpartition(".")[0]) if "." in path else hf
    return owner, layer_list


def _no_autocast_cache():
    """Recording inside torch.autocast: its cache of cast weights would put a cast copy made during warm-up into the
    graph (never updated by the optimizer, freed when the autocast region ends); record with the cache off."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


@contextlib.contextmanager
def _recording_aliases(layers: list[nn.Module], on: bool):
    """While the layers are recorded, each trainable parameter is replaced in its module by an alias: a new leaf
    Parameter over the same storage. Yields {id(alias): parameter} (empty when off).

    Why: the recorded forward's autograd graph stays alive with the recording, and with it the AccumulateGrad node of
    every leaf it used, created on the capture's side stream. Were those the real parameters', every training step's
    replay — which hands their gradients over on the current stream — would meet a node of another stream: autograd
    then synchronizes the two streams per parameter and warns (torch >= 2.10: "The AccumulateGrad node's stream does
    not match ..."). With aliases, the recording keeps only the aliases' nodes; the parameters' own are made at the
    first replay, on the stream that trains. The graphs read the same memory, so in-place optimizer updates reach
    them as before. A parameter shared by several modules, or a module reached twice, gets one alias. Off for
    emulated (CPU) recording, whose replay re-runs the layer with the modules' own parameters."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    aliases: dict[int, nn.Parameter] = {}
    originals: dict[int, nn.Parameter] = {}
    try:
        if on:
            for layer in layers:
                for module in layer.modules():
                    for name, p in list(module._parameters.items()):
                        if p is None or not p.requires_grad or id(p) in originals:  # (a module reached twice)
                            continue
                        alias = aliases.get(id(p))
                        if alias is None:
                            alias = aliases[id(p)] = nn.Parameter(p.detach(), requires_grad=True)
                            originals[id(alias)] = p
                        module._parameters[name] = alias
                        swapped.append((module, name, p))
        yield originals
    finally:
        for module, name, p in reversed(swapped):
            module._parameters[name] = p


def _hooked(modules: list[nn.Module]) -> bool:
    return any(arch.has_hooks(m) for m in modules)


def _flatten(args: tuple, kwargs: dict) -> tuple[tuple, list[torch.Tensor], Callable] | None:
    """(key, tensor leaves, rebuild) for a layer call, or None when it holds something a graph cannot take (a cache
    object, ...). Tensors and tuples of tensors are inputs; None / bool / int / float / str are part of the key."""
    key: list = []
    leaves: list[torch.Tensor] = []
    layout: list = []  # per argument: None (constant), -1 (one tensor), n (tuple/list of n tensors)
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            leaves.append(value)
            key.append((tuple(value.shape), value.dtype, value.device, value.requires_grad))
            layout.append(-1)
        elif type(value) in (tuple, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            leaves.extend(value)
            key.append(tuple((tuple(v.shape), v.dtype, v.device, v.requires_grad) for v in value))
            layout.append(len(value))
        elif isinstance(value, _SCALARS):
            key.append(("=", type(value), value))
            layout.append(None)
        else:
            return None
    names = tuple(kwargs)
    n_args = len(args)
    values = (*args, *kwargs.values())

    def rebuild(tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
        out, k = [], 0
        for value, kind in zip(values, layout):
            if kind is None:
                out.append(value)
            elif kind == -1:
                out.append(tensors[k])
                k += 1
            else:
                out.append(type(value)(tensors[k:k + kind]))
                k += kind
        return tuple(out[:n_args]), dict(zip(names, out[n_args:]))

    return (n_args, names, *key), leaves, rebuild


class _Graph:
    """One recorded pass: a CUDA graph, or (emulate) the Python function re-run at each replay."""

    def __init__(self, emulate: bool, pool: Any) -> None:
        self.emulate, self.pool = emulate, pool
        self.graph = None if emulate else torch.cuda.CUDAGraph()
        self.fn: Callable | None = None
        self.static: list = []

    def capture(self, fn: Callable[[], list]) -> list:
        if self.emulate:
            self.fn = fn
            out = fn()
        else:
            with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
                out = fn()
        self.static = [o.detach() if o is not None else None for o in out]
        return out

    def replay(self) -> None:
        if not self.emulate:
            self.graph.replay()
            return
        with torch.enable_grad():
            fresh = self.fn()
        with torch.no_grad():
            for s, f in zip(self.static, fresh):
                if s is not None and f is not None:
                    s.copy_(f)


class _Entry:
    """One layer's recorded forward and backward and the static tensors they read and write."""

    def __init__(self, fwd: _Graph, leaves: list[torch.Tensor], spec: Any, params: list[nn.Parameter]) -> None:
        self.fwd, self.leaves, self.spec, self.params = fwd, leaves, spec, params
        self.outs: list = fwd.static
        self.bwd: _Graph | None = None
        self.grad_outs: list = []
        self.grad_leaves: list = []
        self.grad_params: list = []
        self.key: tuple | None = None  # the call signature this layer replays for
        self.holder: dict = {}
        self.pending: weakref.ref | None = None  # the last replay's autograd node, until its backward ran
        self.generation = 0  # forward replays so far: a backward must belong to the latest one

    def busy(self) -> bool:
        """Whether an earlier forward's activations still wait for their backward: replaying again would overwrite
        them (two forwards, then one backward), so such a call runs eagerly."""
        return self.pending is not None and self.pending() is not None


class _Token:
    """Held by a replay's autograd node; the entry keeps a weak reference (dead once the graph is freed)."""


class _Replay(torch.autograd.Function):
    """One layer: copy inputs into the graph's static inputs (unless already there), replay, return its outputs; in
    backward, the same for output gradients. Inputs are (entry, stack, layer index, n leaves, *leaves, *params)."""

    @staticmethod
    def forward(ctx, entry: _Entry, stack: _Stack, index: int, n: int, *tensors: torch.Tensor):
        leaves = tensors[:n]
        for k, (static, user) in enumerate(zip(entry.leaves, leaves)):
            if static.data_ptr() != user.data_ptr() and (k == 0 or not stack.shared or index == 0):
                static.copy_(user)
        entry.fwd.replay()
        entry.generation += 1
        ctx.entry, ctx.token, ctx.generation = entry, _Token(), entry.generation
        entry.pending = weakref.ref(ctx.token)
        # a gradient leaving the stack (layer 0's inputs, or a leaf) is copied out: the next replay rewrites it
        ctx.copy_out = [index == 0 or t.grad_fn is None for t in leaves]
        outs = tuple(o.detach() if o is not None else None for o in entry.outs)
        ctx.mark_non_differentiable(*[o for o, g in zip(outs, entry.grad_outs) if o is not None and g is None])
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        entry = ctx.entry
        if ctx.generation != entry.generation:
            raise RuntimeError("graph_layers: a later forward replayed this layer before this backward ran (a graph "
                               "kept with retain_graph=True); run such steps without graphs: "
                               "unipeft.graph_layers(model, enable=False)")
        entry.pending = None
        if entry.bwd is None:
            return (None,) * (4 + len(entry.leaves) + len(entry.params))
        for static, g in zip(entry.grad_outs, grads):
            if static is None:
                continue
            if g is None:
                static.zero_()
            elif g.data_ptr() != static.data_ptr():
                static.copy_(g)
        entry.bwd.replay()
        leaf_grads = [None if g is None else (g.clone() if out else g.detach())
                      for g, out in zip(entry.grad_leaves, ctx.copy_out)]
        present = [g for g in entry.grad_params if g is not None]
        fresh = iter(torch._foreach_mul(present, 1.0) if present else [])  # (a graph rewrites its buffers)
        param_grads = [None if g is None else next(fresh) for g in entry.grad_params]
        return (None, None, None, None, *leaf_grads, *param_grads)


def _dispatch(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A graphed layer's forward (bound to the layer, so a deep copy binds to the copy)."""
    stack, index = layer.__dict__.get(_SLOT) or (None, 0)
    if stack is None:  # a deep copy of a graphed model: the layer's own forward
        return type(layer).forward(layer, *args, **kwargs)
    return stack.call(index, layer, stack.own[index], args, kwargs)


def _is_dispatcher(forward: Any) -> bool:
    return getattr(forward, "__func__", None) is _dispatch


def _no_cache(module: nn.Module, args: tuple, kwargs: dict):
    """Pre-hook on the layer list's owner: grad-enabled calls skip the KV cache unless the caller chose."""
    stack, _ = module.__dict__.get(_SLOT) or (None, 0)
    if stack is None or not torch.is_grad_enabled() or kwargs.get("use_cache") is not None:
        return None
    if len(args) > module.__dict__.get("_unipeft_use_cache_at", len(args)):
        return None  # (passed positionally)
    kwargs["use_cache"] = False
    return args, kwargs


class _Stack:
    """The layers of one model, their original forwards and the current recording (one input signature)."""

    def __init__(self, owner: nn.Module, layers: list[nn.Module], *, warmup: int, max_captures: int, emulate: bool,
                 guard: Callable[[], bool] | None) -> None:
        self.owner, self.layers = owner, layers
        self.warmup, self.max_captures, self.emulate, self.guard = warmup, max_captures, emulate, guard
        self.key: tuple | None = None
        self.entries: list[_Entry] = []
        self.snapshot: list[tuple[nn.Parameter, int, bool]] = []
        self.shared = True  # inputs after the hidden state shared by all layers (one static copy)
        self.captures = 0  # recordings so far (a new shape, or adapters changed)
        self.switches = 0  # recordings for a changed input shape: at most max_captures
        self.candidate: tuple | None = None  # a new signature seen in the last call (recorded if it comes again)
        self.refused: set = set()
        self.step_ok = False
        self.step_src: list[torch.Tensor] = []
        self.replayed = 0  # layers replayed in the latest forward (the rest ran their own forward)
        prior = [layer.__dict__.get("forward") for layer in layers]  # an instance forward someone else set
        self.prior = [None if _is_dispatcher(p) else p for p in prior]  # (a deep copy's stale dispatcher: dropped)
        self.own = [p if p is not None else MethodType(type(layer).forward, layer)
                    for p, layer in zip(self.prior, layers)]
        for i, layer in enumerate(layers):
            layer.__dict__[_SLOT] = (self, i)
            layer.forward = MethodType(_dispatch, layer)
        self.hook = None
        self.hooked: list[list[nn.Module]] = []
        self.reset()
        owner.__dict__[_SLOT] = (self, -1)
        if arch.accepts(owner, "use_cache"):
            names = list(inspect.signature(owner.forward).parameters)
            owner.__dict__["_unipeft_use_cache_at"] = names.index("use_cache")
            self.hook = owner.register_forward_pre_hook(_no_cache, with_kwargs=True)

    def __deepcopy__(self, memo: dict) -> None:
        """A deep copy of a graphed model (an EMA or reference copy) runs its layers eagerly: graphs belong to the
        tensors they were recorded on."""
        return None

    def remove(self) -> None:
        for layer, prior in zip(self.layers, self.prior):
            if _is_dispatcher(layer.__dict__.get("forward")):
                del layer.forward
                if prior is not None:
                    layer.forward = prior
            layer.__dict__.pop(_SLOT, None)
        self.owner.__dict__.pop(_SLOT, None)
        if self.hook is not None:
            self.hook.remove()
        self.reset()

    def reset(self) -> None:
        """Drop the recording (the next eligible call records again)."""
        self.key, self.entries, self.snapshot, self.step_ok, self.step_src = None, [], [], False, []
        self.hooked = [[m for m in layer.modules()] for layer in self.layers]  # (modules may have been swapped)

    # -- per call ---------------------------------------------------------------------------------------------------
    def _eligible(self, index: int, layer: nn.Module, args: tuple, kwargs: dict) -> bool:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling() or getattr(layer, "gradient_checkpointing",
                                                                                  False):
            return False
        if self.guard is not None and not self.guard():
            return False
        if _hooked(self.hooked[index]):  # hooks fire when recording, never at replay: such calls run eagerly
            return False
        first = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(first, torch.Tensor):
            return False
        if self.emulate:
            return True
        return first.is_cuda and not torch.cuda.is_current_stream_capturing()

    def call(self, index: int, layer: nn.Module, own: Callable, args: tuple, kwargs: dict) -> Any:
        flat = _flatten(args, kwargs) if self._eligible(index, layer, args, kwargs) else None
        if index == 0:
            self.step_ok, self.replayed = False, 0
        if flat is None:
            return own(*args, **kwargs)
        key, leaves, rebuild = flat
        key = (key, *self._mode(layer))
        if index == 0:
            if key in self.refused:
                return own(*args, **kwargs)
            if key != self.key or not self._snapshot_holds():
                if key != self.key and self.key is not None and not self._switch(key):
                    return own(*args, **kwargs)  # (an odd batch keeps the recording: it runs eagerly)
                if any(_hooked(modules) for modules in self.hooked):
                    return own(*args, **kwargs)  # (hooks would fire while recording: record once they are gone)
                if not self._record(key, leaves, rebuild):
                    return own(*args, **kwargs)
            self.step_ok, self.step_src = True, leaves
        elif not self.step_ok or key != self.entries[index].key:
            self.step_ok = False
            return own(*args, **kwargs)
        elif self.shared and any(a is not b for a, b in zip(leaves[1:], self.step_src[1:])):
            self.step_ok, self.shared, self.key = False, False, None  # per-layer inputs: record per-layer copies
            return own(*args, **kwargs)
        entry = self.entries[index]
        if entry.busy():
            self.step_ok = False
            return own(*args, **kwargs)
        outs = _Replay.apply(entry, self, index, len(leaves), *leaves, *entry.params)
        self.replayed += 1
        return torch.utils._pytree.tree_unflatten(list(outs), entry.spec)

    @staticmethod
    def _mode(layer: nn.Module) -> tuple:
        return layer.training, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")

    def _switch(self, key: tuple) -> bool:
        """Whether to record a new signature in place of the current one: only once it came in two calls in a
        row (a last, smaller batch runs eagerly and keeps the recording), and at most max_captures times."""
        if key != self.candidate:
            self.candidate = key
            return False
        self.candidate = None
        if self.switches >= self.max_captures:
            if self.switches == self.max_captures:
                warnings.warn(f"graph_layers: the layers' input shapes changed {self.switches + 1} times; other "
                              "shapes than the recorded one run eagerly from now on (pad batches to one shape)",
                              stacklevel=5)
                self.switches += 1
            return False
        self.switches += 1
        return True

    def _snapshot_holds(self) -> bool:
        return all(p.data_ptr() == ptr and p.requires_grad == rg for p, ptr, rg in self.snapshot)

    # -- recording --------------------------------------------------------------------------------------------------
    def _record(self, key: tuple, leaves: list[torch.Tensor], rebuild: Callable) -> bool:
        self.reset()
        if any(t.requires_grad for t in leaves[1:]):
            self.refused.add(key)
            return False
        self.captures += 1
        try:
            with _no_autocast_cache(), _recording_aliases(self.layers, not self.emulate) as originals:
                self._capture(leaves, rebuild)
            for entry in self.entries:  # replays hand gradients to the parameters themselves
                entry.params = [originals.get(id(p), p) for p in entry.params]
        except Exception as e:  # (an op a graph cannot hold, e.g. a host sync): this signature runs eagerly
            self.reset()
            self.refused.add(key)
            warnings.warn(f"graph_layers: recording the layers failed ({type(e).__name__}: {str(e)[:200]}); "
                          "these calls run eagerly", stacklevel=4)
            return False
        self.key = key
        self.snapshot = [(p, p.data_ptr(), p.requires_grad) for layer in self.layers
                         for p in (*layer.parameters(), *layer.buffers())]
        return True

    def _capture(self, leaves: list[torch.Tensor], rebuild: Callable) -> None:
        params = [[p for p in layer.parameters() if p.requires_grad] for layer in self.layers]
        hidden = leaves[0].detach().clone().requires_grad_(leaves[0].requires_grad)
        shared = [t.detach().clone() for t in leaves[1:]]

        def layer_leaves(h: torch.Tensor) -> list[torch.Tensor]:
            return [h, *(shared if self.shared else [t.detach().clone() for t in leaves[1:]])]

        def run(i: int, inputs: list[torch.Tensor]) -> tuple[list, Any]:
            args, kwargs = rebuild(inputs)
            return torch.utils._pytree.tree_flatten(self.own[i](*args, **kwargs))

        self._warm_up(hidden, layer_leaves, run, params)
        pool = None if self.emulate else torch.cuda.graph_pool_handle()
        h = hidden
        for i in range(len(self.layers)):  # forward graphs, in layer order
            inputs = layer_leaves(h)
            holder: dict = {}

            def fwd(i=i, inputs=inputs, holder=holder) -> list:
                outs, holder["spec"] = run(i, inputs)
                bad = [type(o).__name__ for o in outs if o is not None and not isinstance(o, torch.Tensor)]
                if bad or not outs or not isinstance(outs[0], torch.Tensor):
                    raise TypeError(f"layer {i} returns {bad or 'no tensor first'}, which a graph cannot replay")
                holder["outs"] = outs
                return outs
            graph = _Graph(self.emulate, pool)
            graph.capture(fwd)
            entry = _Entry(graph, inputs, holder["spec"], params[i])
            entry.holder = holder
            entry.key = (_flatten(*rebuild(inputs))[0], *self._mode(self.layers[i]))  # (input i>0 requires grad)
            self.entries.append(entry)
            h = entry.outs[0].detach().requires_grad_(holder["outs"][0].requires_grad)
        g_next = None
        for i in reversed(range(len(self.layers))):  # backward graphs, in reverse order
            entry = self.entries[i]
            live = entry.holder["outs"]
            wanting = [k for k, o in enumerate(live) if o is not None and o.requires_grad]
            wrt = [t for t in entry.leaves if t.requires_grad] + entry.params
            entry.grad_outs = [None] * len(live)
            for k in wanting:
                entry.grad_outs[k] = g_next if (k == 0 and g_next is not None) else torch.empty_like(live[k])
            entry.grad_leaves = [None] * len(entry.leaves)
            entry.grad_params = [None] * len(entry.params)
            g_next = None
            if not wanting or not wrt:
                continue

            def bwd(entry=entry, wanting=wanting, wrt=wrt) -> list:
                outs = entry.holder["outs"]
                return list(torch.autograd.grad([outs[k] for k in wanting], wrt,
                                                [entry.grad_outs[k] for k in wanting], allow_unused=True))
            entry.bwd = _Graph(self.emulate, pool)
            grads = entry.bwd.capture(bwd)
            static = iter(entry.bwd.static)
            for k, t in enumerate(entry.leaves):
                if t.requires_grad:
                    entry.grad_leaves[k] = next(static)
            entry.grad_params = list(static)
            if entry.leaves[0].requires_grad:
                g_next = grads[0].detach() if grads[0] is not None else None

    def _warm_up(self, hidden: torch.Tensor, layer_leaves: Callable, run: Callable, params: list) -> None:
        """A few passes of every layer before recording (lazy initialisation, autotuning and cuDNN's algorithm
        search must not land in a graph), on a side stream as CUDA graph capture wants."""
        stream = None if self.emulate else torch.cuda.Stream()
        if stream is not None:
            torch.cuda.synchronize()
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for _ in range(self.warmup):
                h = hidden
                for i in range(len(self.layers)):
                    inputs = layer_leaves(h)
                    outs, _ = run(i, inputs)
                    want = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
                    wrt = [t for t in inputs if t.requires_grad] + params[i]
                    if want and wrt:
                        torch.autograd.grad(want, wrt, [torch.ones_like(o) for o in want], allow_unused=True)
                    h = outs[0].detach().requires_grad_(outs[0].requires_grad)
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
