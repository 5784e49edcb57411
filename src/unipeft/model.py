"""The adapted-model handle: named adapters on one frozen model.

`attach(model, "lora")` wraps the modules a recipe's sites resolve to (each keeps its frozen module as `base_layer`),
freezes everything else and returns an `AdaptedModel` whose `forward` / `generate` pass straight through to the
model's — same signatures — plus one optional keyword, `adapter_names=[...]`, one adapter name per batch row
(per-sample routing; `"__base__"` means no adapter for that row).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpointing, compose, graphs, merging, quant, routed, siblings
from . import prefix as prefix_mod
from . import prompt as prompt_mod
from .arch import Binding, accepts, get_module, logical_modules, resolve, set_module, text_config
from .errors import UnipeftError
from .functions import SiteAdapter
from .layer import BASE, AdapterLayer
from .recipe import Recipe, as_recipe


class AdaptedModel(nn.Module):
    """A frozen model plus named adapters. Only active adapters' parameters (and their extra modules) train."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.__class__ = _with_model_signature(type(self), type(model))
        self.model = model
        self.training = model.training  # (the handle reports the model's mode; it holds no module of its own)
        self.recipes: dict[str, Recipe] = {}
        self.train_modules: dict[str, list[str]] = {}
        self.active: list = []
        self.merged: list[str] = []
        self.fusions: dict[str, compose.Fuse] = {}
        self._wrappers: dict[str, AdapterLayer] = {}
        self._groups: list[siblings.SiblingGroup] = []  # q/k/v, gate/up (siblings.py), relinked by _refresh
        self._position_hook: Any = None
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for m in model.modules():  # quantized bases: bitsandbytes' exact CPU path (see quant.keep_exact_on_cpu)
            quant.keep_exact_on_cpu(m)

    # -- pass-through -----------------------------------------------------------------------------------------------
    @property
    def config(self):
        return getattr(self.model, "config", None)

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        return self._routed_call(self._forward, adapter_names, args, kwargs, generating=False)

    def _routed_call(self, call, adapter_names: list[str] | None, args: tuple, kwargs: dict,
                     generating: bool) -> Any:
        """call(args, kwargs) with this call's routing handed to the layers, marked over when the call returns.
        `generating` is passed, not found by comparing `call` with `self._generate`: dynamo (torch 2.11) cannot
        compare two bound methods and broke the graph there, so a compiled model's outer frames ran eagerly."""
        routing = routed.hand_over(self, adapter_names, args, kwargs, generating=generating)
        try:
            return call(args, kwargs)
        finally:
            if routing is not None:
                routing.open = False  # (routed._operands trusts checks made earlier in an open call only)
                routed.publish(self, None)  # (stacks are refreshed per call: a later, bypassing call can't trust them)

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        args, kwargs, n_prompt, rows = prompt_mod.with_prompt(self, args, kwargs)
        try:
            if not n_prompt:
                return self.model(*args, **kwargs)
            want_tuple = kwargs.get("return_dict") is False
            kwargs["return_dict"] = True
            out = prompt_mod.strip_prompt(self.model(*args, **kwargs), n_prompt, kwargs["inputs_embeds"].shape[1],
                                          rows)
            return out.to_tuple() if want_tuple else out
        finally:
            siblings.clear(self._groups)  # outputs computed ahead never outlive the call (siblings.py)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None and (self.__dict__.get("_shared") is None
                                          or self.__dict__.get("_route_key") is None) \
                and routed.static_cache(self.model, kwargs):
            self.prepare_routing()  # transformers compiles a static-cache generate's decoding steps: trace once
        return self._routed_call(self._generate, adapter_names, args, kwargs, generating=True)

    def prepare_routing(self, enable: bool = True) -> int:
        """Stack every adapter's LoRA weights once per projection for mixed-adapter calls (`adapter_names=`), slot i =
        the i-th adapter (routed.py). A routed call then hands the layers one slot index per row: a new mix of
        adapters copies no weights, and a compiled model — transformers compiles a static-cache `generate`'s decoding
        steps, which calls this itself — traces once for every mix instead of once per mix. Applies to projections
        with only plain LoRA on them, in no-grad eval calls; the rest routes as before. Costs one more copy of the
        adapters' LoRA weights; weights changed in place are copied in at the next routed call.
        `enable=False` frees the stacks. Returns the number of projections that have them."""
        return routed.prepare(self, enable)

    def _generate(self, args: tuple, kwargs: dict) -> Any:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        new_args, new_kwargs, n_prompt, _ = prompt_mod.with_prompt(self, args, kwargs)
        if not n_prompt:
            return self.model.generate(*args, **kwargs)
        out = self.model.generate(*new_args, **new_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        if input_ids is None:
            return out
        full = torch.cat([input_ids.to(sequences.device), sequences], dim=1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Turn on the base model's gradient checkpointing (non-reentrant, so frozen inputs need no grad hook); works
        eager and under torch.compile (checkpointing.py)."""
        checkpointing.enable(self, **kwargs)

    # -- adapters ---------------------------------------------------------------------------------------------------
    def add(self, name: str, preset_or_recipe: Recipe | str | Path | Mapping[str, Any] = "lora",
            train_modules: list[str] | None = None, **overrides: Any) -> AdaptedModel:
        """Add adapter `name` (not activated unless it is the only one; see `activate`). On error nothing changes."""
        if not isinstance(name, str) or not name.isidentifier() or name == BASE:
            raise UnipeftError(f"adapter name '{name}' must be a Python identifier (letters, digits, _)")
        if name in self.recipes:
            raise UnipeftError(f"adapter '{name}' already exists; remove it first or choose another name")
        recipe = as_recipe(preset_or_recipe, **overrides)
        plan = [(part, b) for part in recipe.parts for b in resolve(self.model, part)]
        heads = self._resolve_train_modules(train_modules or [], plan)
        self._check_plan(recipe, plan)
        shifts = any(p.function == "prefix" and p.positions == "shift" for p in recipe.parts)
        if shifts and not accepts(self.model, "position_ids"):
            raise UnipeftError(f"positions: shift moves the real tokens after the prefix, which needs a model whose "
                               f"forward takes position_ids; {type(self.model).__name__}'s does not")
        created: list[str] = []
        try:
            for part, b in plan:
                wrapper = self._wrap(b.module, created)
                base = wrapper.base_layer
                wrapper.add_site(name, SiteAdapter(part, b, base, **self._extra_dims(b, base)))
                wrapper.train(base.training)  # a new adapter takes its base module's mode (eval: no dropout)
                if b.role == "prefix":
                    prefix_mod.install(base, wrapper, b.module)
            for path in heads:
                wrapper = self._wrap(path, created)
                head = copy.deepcopy(wrapper.base_layer)
                head.requires_grad_(True)
                wrapper.copies[name] = head
        except Exception:
            for w in self._wrappers.values():
                w.remove(name)
            self._unwrap_empty()
            raise
        self.recipes[name] = recipe
        self.train_modules[name] = heads
        if shifts and self._position_hook is None:
            self._position_hook = self.model.register_forward_pre_hook(self._shift_positions, with_kwargs=True)
        if len(self.recipes) == 1:
            self.activate(name)
        else:
            self._refresh()
        return self

    def activate(self, *units) -> AdaptedModel:
        """Make exactly these units active — adapter names or blocks (`Stack`, `Average`, `Fuse`, see compose.py) —
        composed in this order. Active adapters train, except a Fuse's members (its fusion layers train instead)."""
        for u in units:
            if isinstance(u, (list, tuple)):
                raise UnipeftError(f"activate takes adapter names as separate arguments, e.g. activate('a', 'b'); got "
                                   f"{type(u).__name__}")
            compose.check(self, u)
        self.active = list(dict.fromkeys(units))
        self._refresh()
        return self

    def add_fusion(self, fuse: compose.Fuse, train_modules: list[str] | None = None) -> AdaptedModel:
        """Add AdapterFusion layers over `fuse`'s adapters at every sublayer output they adapt (not activated:
        `am.activate(fuse)`; training then updates only the fusion layers, and its own copies of `train_modules`,
        e.g. a task head, while the fused adapters stay frozen)."""
        if not isinstance(fuse, compose.Fuse):
            raise UnipeftError(f"add_fusion takes a Fuse(...), not {type(fuse).__name__}")
        if fuse.name in self.fusions:
            raise UnipeftError(f"{fuse!r} already exists")
        for n in fuse.units:
            compose.check(self, n, "Fuse")
        for w in self._wrappers.values():
            sites = [sa for n in fuse.units for sa in w.sites_of(n) if sa.role == "out"]
            if sites:
                d = sites[0].span[1] - sites[0].span[0]
                w.fusions[fuse.name] = compose.FusionLayer(d, sites[0].dtype, sites[0].fn.up.weight.device)
                w._forget_plan()
        created: list[str] = []
        for path in self._resolve_train_modules(train_modules or [], []):
            wrapper = self._wrap(path, created)
            wrapper.copies[fuse.name] = copy.deepcopy(wrapper.base_layer).requires_grad_(True)
        self.fusions[fuse.name] = fuse
        self._refresh()
        return self

    def remove_fusion(self, fuse: compose.Fuse) -> AdaptedModel:
        if fuse.name not in self.fusions:
            raise UnipeftError(f"no fusion {fuse!r}")
        if any(u == fuse or (not isinstance(u, str) and fuse in u.units) for u in self.active):
            raise UnipeftError(f"{fuse!r} is active; deactivate it first")
        for w in self._wrappers.values():
            for d in (w.fusions, w.copies):
                if fuse.name in d:
                    del d[fuse.name]
            w._forget_plan()
        del self.fusions[fuse.name]
        self.__dict__["_shared_dirty"] = True  # (layers that had the fusion may take shared stacks again)
        self._unwrap_empty()
        return self

    def fusion_parameters(self, fuse: compose.Fuse | str) -> dict[str, nn.Parameter]:
        name = fuse.name if isinstance(fuse, compose.Fuse) else fuse
        if name not in self.fusions:
            raise UnipeftError(f"no fusion '{name}'; fusions are {', '.join(self.fusions) or 'none'}")
        out = {f"{path}::{name}.{pn}": p for path, w in self._wrappers.items() if name in w.fusions
               for pn, p in w.fusions[name].named_parameters()}
        out.update({f"{path}::{name}.module.{pn}": p for path, w in self._wrappers.items() if name in w.copies
                    for pn, p in w.copies[name].named_parameters()})
        return out

    def deactivate(self) -> AdaptedModel:
        """No adapter acts (merged weights stay merged): the model behaves as the base."""
        self.active = []
        self._refresh()
        return self

    def remove(self, name: str) -> AdaptedModel:
        self._require(name)
        users = [u for u in [*self.active, *self.fusions.values()] if not isinstance(u, str) and
                 name in compose.adapter_names(u)]
        if users:
            raise UnipeftError(f"adapter '{name}' is part of {users[0]!r}; deactivate or remove that first")
        if name in self.merged:
            raise UnipeftError(f"adapter '{name}' is merged into the weights; call unmerge() before removing it")
        for w in self._wrappers.values():
            w.remove(name)
        self._unwrap_empty()
        del self.recipes[name], self.train_modules[name]
        self.active = [a for a in self.active if a != name]
        self._refresh()
        return self

    def merge(self, name: str | None = None, requantize: bool = False) -> AdaptedModel:
        """Fold adapters (default: the active ones) into the frozen weights: zero added latency. Refused, with the
        reason, for recipes whose knobs are not mergeable."""
        names = merging.check(self, name)  # (raises with the reason; nothing changed)
        quantized = any(quant.is_quantized(w.base_layer) for w in self._wrappers.values() for n in names
                        if n in w.adapters)
        if quantized and not requantize:
            raise UnipeftError("the base is quantized: am.merge_dequantized() returns a plain model with the adapters "
                               "merged exactly; am.merge(requantize=True) rounds them into the 4/8-bit weights")
        if quantized:
            self.merge_report = quant.merge_requantized(self, names)
            self._requantized = [*getattr(self, "_requantized", []), *names]
            warnings.warn(f"merged {', '.join(names)} into quantized weights; rounding error up to "
                          f"{self.merge_report['max_abs_rounding_error']:.3g} (am.merge_report)", stacklevel=2)
        else:
            for n in names:
                for w in self._wrappers.values():
                    if n in w.adapters:
                        w.merge(n)
        self.merged.extend(names)
        self._refresh()
        return self

    def merge_dequantized(self, dtype: torch.dtype | None = None) -> nn.Module:
        """QLoRA's exact merge: the active adapters folded into the *dequantized* weights of the quantized base; returns
        a plain float model (the compute dtype unless `dtype`) whose outputs match this quantized + adapter model.
        This handle is detached afterwards."""
        return quant.merge_dequantized(self, dtype)

    def unmerge(self) -> AdaptedModel:
        """Take every merged adapter back out of the weights (exact up to the weights' dtype rounding)."""
        lossy = [n for n in self.merged if n in getattr(self, "_requantized", ())]
        if lossy:
            raise UnipeftError(f"'{lossy[0]}' was merged into quantized weights with rounding and cannot be taken out "
                               "exactly; reload the base model")
        for n in reversed(list(self.merged)):
            for w in self._wrappers.values():
                if n in w.merged:
                    w.unmerge(n)
            self.merged.remove(n)
        self._refresh()
        return self

    def detach(self) -> nn.Module:
        """Put the original modules back and return the model. Merged adapters stay in the weights (merge-and-unload);
        with nothing merged the state_dict is bit-identical to the one before attach."""
        for path, w in list(self._wrappers.items()):
            prefix_mod.uninstall(w.base_layer)
            keep = next((n for n in self.active if n in self.merged and n in w.copies), None)
            original = w.base_layer
            if keep is not None:  # merge-and-unload keeps the merged adapter's own head
                original = w.copies[keep]
            set_module(self.model, path, original)
        self._wrappers.clear()
        self._groups = []
        self.__dict__["_has_prompt"] = False
        if self._position_hook is not None:
            self._position_hook.remove()
            self._position_hook = None
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        self.recipes.clear(), self.train_modules.clear(), self.active.clear(), self.merged.clear()
        self.fusions.clear()
        routed.prepare(self, False)
        graphs.graph_layers(self.model, enable=False)  # (recorded with the adapters; the originals are plain)
        return self.model

    # -- reporting --------------------------------------------------------------------------------------------------
    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s parameters keyed structurally: "<module path>::<part>.<site>.<param>" for site adapters,
        "<module path>::module.<param>" for its copies of extra trainable modules. The keys do not depend on the
        adapter's name, so a saved adapter loads under any name."""
        self._require(name)
        out: dict[str, nn.Parameter] = {}
        for path, w in self._wrappers.items():
            if name in w.adapters:
                for part, sites in w.adapters[name].items():
                    for site, sa in sites.items():
                        for pn, p in sa.named_parameters():
                            out[f"{path}::{part}.{site}.{pn}"] = p
            if name in w.copies:
                for pn, p in w.copies[name].named_parameters():
                    out[f"{path}::module.{pn}"] = p
        return out

    def base_parameter_count(self) -> int:
        seen = set()
        total = 0
        for n, p in self.model.named_parameters():
            if ".adapters." in f".{n}" or ".copies." in f".{n}" or ".fusions." in f".{n}" or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def summary(self) -> str:
        """A table: each adapter's method, state, trainable parameters and their % of the base model."""
        total = self.base_parameter_count()
        lines = [f"base model: {type(self.model).__name__}, {total:,} parameters (frozen)",
                 f"{'adapter':<14}{'method':<17}{'state':<16}{'parameters':>14}{'% of base':>11}"]
        for n, recipe in self.recipes.items():
            count = sum(p.numel() for p in self.adapter_parameters(n).values())
            state = "merged" if n in self.merged else ("active" if n in self.active else "inactive")
            lines.append(f"{n:<14}{recipe.name:<17}{state:<16}{count:>14,}{100 * count / max(total, 1):>10.3f}%")
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        lines.append(f"trainable now: {trainable:,} ({100 * trainable / max(total, 1):.3f}% of base)")
        return "\n".join(lines)

    # -- persistence ------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path, name: str | None = None) -> Path:
        """Write adapters (default: all) atomically to `directory`: safetensors + recipe + fingerprint."""
        from .io import save_adapters

        return save_adapters(self, Path(directory), [name] if name else list(self.recipes))

    def export_peft(self, directory: str | Path, name: str | None = None) -> Path:
        """Write adapter `name` as a Hugging Face peft checkpoint (LoRA / rsLoRA / DoRA recipes)."""
        from .peft_io import export_peft

        return export_peft(self, directory, name)

    def load(self, directory: str | Path, name: str | None = None, as_name: str | None = None) -> AdaptedModel:
        """Load adapters saved by `save` into this model (default: all of them; `name` picks one, `as_name` renames
        it, e.g. to load two runs' "default" adapters side by side)."""
        from .io import load_adapters

        load_adapters(self, Path(directory), name, as_name=as_name)
        return self

    # -- internals --------------------------------------------------------------------------------------------------
    def _require(self, name: str) -> None:
        if name not in self.recipes:
            raise UnipeftError(f"no adapter '{name}'; adapters are {', '.join(self.recipes) or 'none'}")

    def _wrap(self, path: str, created: list[str]) -> AdapterLayer:
        if path in self._wrappers:
            return self._wrappers[path]
        module = get_module(self.model, path)
        wrapper = AdapterLayer(module)
        set_module(self.model, path, wrapper)
        self._wrappers[path] = wrapper
        created.append(path)
        return wrapper

    def _unwrap_empty(self) -> None:
        for path, w in list(self._wrappers.items()):
            if w.is_empty():
                prefix_mod.uninstall(w.base_layer)
                set_module(self.model, path, w.base_layer)
                del self._wrappers[path]

    def _extra_dims(self, b: Binding, base: nn.Module) -> dict[str, Any]:
        cfg = text_config(self.model)
        hidden = getattr(cfg, "hidden_size", None)
        if b.role == "block":
            return {"hidden": hidden}
        if b.role == "prefix":
            heads = cfg.num_attention_heads
            n_kv = getattr(cfg, "num_key_value_heads", None) or heads
            head_dim = getattr(cfg, "head_dim", None) or hidden // heads
            return {"hidden": hidden, "prefix_shape": (n_kv, head_dim)}
        if b.role == "embed":
            return {"hidden": base.weight.shape[1], "vocab": base.weight}
        return {}

    def _check_plan(self, recipe: Recipe, plan: list[tuple[Any, Binding]]) -> None:
        """Refuse combinations that would silently misbehave."""
        copies = [p for p, w in self._wrappers.items() if w.copies]
        for part, b in plan:
            clash = [c for c in copies if b.module == c or b.module.startswith(c + ".") or c.startswith(b.module + ".")]
            if clash:
                raise UnipeftError(f"part '{part.name}' would act on '{b.module}', which is (inside) the train module "
                                   f"'{clash[0]}' of another adapter; target other modules")
            w = self._wrappers.get(b.module)
            if part.magnitude and w is not None and w.merged:
                raise UnipeftError(f"a DoRA magnitude on '{b.module}' would start from merged weights "
                                   f"({', '.join(w.merged)} merged); unmerge() first")

    def _resolve_train_modules(self, patterns: list[str], plan: list[tuple[Any, Binding]]) -> list[str]:
        adapted = {b.module for _, b in plan} | {p for p, w in self._wrappers.items() if w.adapters}
        named = [n for n, _ in logical_modules(self.model) if n]
        out: list[str] = []
        for pat in patterns:
            hits = [n for n in named if fnmatchcase(n, pat) or fnmatchcase(n, "*." + pat)]
            hits = [n for n in hits if not any(h != n and n.startswith(h + ".") for h in hits)]
            if not hits:
                tops = [n for n in named if "." not in n]
                raise UnipeftError(f"train module '{pat}' matches no module; top-level modules are {', '.join(tops)}")
            clash = [h for h in hits if h in adapted or any(a.startswith(h + ".") for a in adapted)]
            if clash:
                raise UnipeftError(f"train module '{clash[0]}' contains adapted modules; name a module no adapter "
                                   "acts on (e.g. the classifier head)")
            out.extend(h for h in hits if h not in out)
        return out

    def _refresh(self) -> None:
        """Push the active/merged sets into the wrappers and set requires_grad: active, unmerged adapters train."""
        graphs.invalidate(self.model, guard=self._unrouted)  # CUDA graphs recorded the old state (graphs.py)
        self.__dict__["_shared_dirty"] = True  # shared stacks (prepare_routing) are rebuilt at the next routed call
        routed.release(self)  # (and freed now: a removed or merged adapter's stacked copy must not stay behind)
        self.__dict__["_shared_watch"] = None  # (it holds the adapters' tensors: a removed one must not stay alive)
        self._groups = siblings.link(self._wrappers)
        # whether any layer holds prompt tokens: a model call without them then reads no layer for them (prompt.py)
        self.__dict__["_has_prompt"] = any(w.holds_prompt for w in self._wrappers.values())
        for w in self._wrappers.values():
            w.active = list(self.active)
            w.merged = [n for n in self.merged if n in w.adapters]
        training: set[str] = set()
        fusing: set[str] = set()

        def collect(unit) -> None:
            if isinstance(unit, str):
                training.add(unit)
            elif isinstance(unit, compose.Fuse):
                fusing.add(unit.name)
            else:
                for u in unit.units:
                    collect(u)

        for u in self.active:
            collect(u)
        for name in self.recipes:
            train = name in training and name not in self.merged
            for p in self.adapter_parameters(name).values():
                p.requires_grad_(train)
        for w in self._wrappers.values():
            for fname, layer in w.fusions.items():
                layer.requires_grad_(fname in fusing)
            for fname in self.fusions:
                if fname in w.copies:
                    w.copies[fname].requires_grad_(fname in fusing)
        for name in self.merged:  # a merged adapter's head still trains only while active
            for path in self.train_modules.get(name, []):
                self._wrappers[path].copies[name].requires_grad_(name in self.active)
        self._warm_plans()

    def _warm_plans(self) -> None:
        """Cache every wrapper's plan for the current state now, outside any trace. A compiled call then reads the
        cached plan instead of deriving it from the adapter tree, so dynamo guards the plan's few values rather than
        every dict and attribute on the way (a lone LoRA projection: 52 guard nodes before, 41 now; 7,218 → 5,830
        on a 16-layer Llama): fewer guards to evaluate before each compiled step's first kernel. A stale plan is
        still caught: the cache is keyed by the routing, active and merged sets and train mode, and dropped on any
        adapter change."""
        for w in self._wrappers.values():
            w._plan()
            w._warm_lean()

    def train(self, mode: bool = True) -> AdaptedModel:
        super().train(mode)
        self._warm_plans()  # (the plan key includes the mode)
        return self

    def _unrouted(self) -> bool:
        """No per-sample routing in this call (graphs.py replays only unrouted calls)."""
        return not self._wrappers or next(iter(self._wrappers.values())).routing is None

    def _shift_positions(self, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of the wrapped model for prefixes with `positions: shift` (peft semantics): every row's
        real tokens move right by the total length of the shifting prefixes that row uses. Runs inside `generate`
        too, since transformers calls the wrapped model's forward there."""
        lengths = {n: sum(p.length for p in self.recipes[n].parts if p.function == "prefix" and p.positions == "shift")
                   for n in self.recipes if n not in self.merged}
        routing = next(iter(self._wrappers.values())).routing if self._wrappers else None
        names = list(dict.fromkeys(routing.names)) if routing is not None else self.active
        if not any(lengths.get(n) for n in names):
            return None
        return prefix_mod.shifted_positions(args, kwargs, [(n, lengths[n]) for n in names if lengths.get(n)], routing)

_SIGNATURE_CLASSES: dict[tuple[type, type], type] = {}


def _with_model_signature(cls: type, model_cls: type) -> type:
    """A subclass whose `forward` *advertises* the wrapped model's signature plus `adapter_names`, so tools that read
    `inspect.signature(model.forward)` (transformers.Trainer drops batch columns by it) see the real arguments."""
    import inspect

    key = (cls, model_cls)
    if key not in _SIGNATURE_CLASSES:
        try:
            base = inspect.signature(model_cls.forward)
        except (TypeError, ValueError):
            return cls
        params = list(base.parameters.values())
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
        rest = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
        try:
            sig = base.replace(parameters=rest + [extra] + var_kw)
        except ValueError:
            return cls

        def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
            return cls.forward(self, *args, adapter_names=adapter_names, **kwargs)

        forward.__signature__ = sig
        forward.__doc__ = cls.forward.__doc__

        def __reduce_ex__(self, protocol):  # (pickle finds classes by name; this one is made here, per model class)
            return _signature_instance, (cls, model_cls), self.__dict__

        _SIGNATURE_CLASSES[key] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                             "__qualname__": cls.__qualname__,
                                                             "__reduce_ex__": __reduce_ex__})
    return _SIGNATURE_CLASSES[key]


def _signature_instance(cls: type, model_cls: type):
    """Unpickling: an empty instance of the signature class for (cls, model_cls); pickle then restores its state."""
    return object.__new__(_with_model_signature(cls, model_cls))




def attach(model: nn.Module, preset_or_recipe: Recipe | str | Path | Mapping[str, Any] = "lora",
           name: str = "default", train_modules: list[str] | None = None, **overrides: Any) -> AdaptedModel:
    """Attach a preset (by name), a recipe file or a `Recipe` to a frozen model; the new adapter is active.

    Overrides use the knob names (`r=16`, `alpha=32`, `dropout=0.1`, `layers=[0, 1]`, `targets=["q", "k", "v"]`;
    `**{"lora.r": 4}` changes one part of a union). `train_modules=["classifier"]` trains (and saves) a copy of those
    modules with the adapter, e.g. a new classification head.
    """
    if isinstance(model, AdaptedModel) or any(getattr(m, "_unipeft_wrapper", False) for m in model.modules()):
        raise UnipeftError("this model is already adapted (it holds unipeft wrappers); use am.add(name, ...) on its "
                           "AdaptedModel, or am.detach() first")
    am = AdaptedModel(model)
    try:
        am.add(name, preset_or_recipe, train_modules=train_modules, **overrides)
    except BaseException:
        am.detach()  # a refused attach leaves the model exactly as it was, requires_grad flags included
        raise
    return am

