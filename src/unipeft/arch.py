"""Sites on real architectures: one small declarative interface map per model family.

A map names module paths — never model forward code — so unipeft follows new transformers releases instead of
pinning one (AdapterHub's forked forwards pin it). For any other `nn.Module`, target modules by name:

**The matching rule.** A target pattern matches a module when the pattern, as a shell-style glob (`*`, `?`, `[..]`),
matches the module's whole qualified name or one of its dot-suffixes: `query` matches `encoder.layer.0.attention.self.
query`; `layer.*.attention.self.query` and `*.query` do too. Add `:in` to act on the module's input instead of its
output (IA3-style scaling). Only linear layers (`nn.Linear`, transformers' `Conv1D`) can be targets; a pattern that
matches nothing is an error that lists the linear modules that exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn
from torch.nn.modules import module as _module

from .errors import UnipeftError
from .recipe import EMBEDDINGS, KV, PROJECTION_INPUTS, PROJECTIONS, SUBLAYERS, Part


@dataclass(frozen=True)
class Block:
    """A sublayer as a module call: where its input arrives and how its output meets the residual stream.

    mode "output": the module returns the sublayer output before the residual add (Llama's `self_attn`, `mlp`).
    mode "residual": the module adds the residual itself from argument `arg` (BERT's post-LN `BertSelfOutput`,
    `BertOutput`: LayerNorm(dense(h) + input_tensor)); an additive Δh then enters through that argument, which is
    exactly LayerNorm(dense(h) + Δh + input_tensor).
    """

    path: str
    arg: str
    position: int
    mode: str


@dataclass(frozen=True)
class FamilyMap:
    """Module paths of one architecture family, relative to one transformer layer (except `layers`).

    `projections` maps a site to a path; "path[i/n]" is the i-th of n equal output chunks of a fused projection
    (GPT-2's `c_attn` holds q, k and v).
    """

    family: str
    layers: str
    projections: dict[str, str]
    attention: str
    blocks: dict[str, Block]
    out_projection: dict[str, str] = field(default_factory=lambda: {"attn": "o", "ffn": "down"})


_BERT = FamilyMap(
    family="bert", layers="encoder.layer",
    projections={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                 "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"},
    attention="attention.self",
    blocks={"attn": Block("attention.output", "input_tensor", 1, "residual"),
            "ffn": Block("output", "input_tensor", 1, "residual")},
)
_GPT2 = FamilyMap(
    family="gpt2", layers="h",
    projections={"q": "attn.c_attn[0/3]", "k": "attn.c_attn[1/3]", "v": "attn.c_attn[2/3]", "o": "attn.c_proj",
                 "up": "mlp.c_fc", "down": "mlp.c_proj"},
    attention="attn",
    blocks={"attn": Block("attn", "hidden_states", 0, "output"), "ffn": Block("mlp", "hidden_states", 0, "output")},
)
_LLAMA = FamilyMap(
    family="llama", layers="layers",
    projections={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                 "up": "mlp.up_proj", "gate": "mlp.gate_proj", "down": "mlp.down_proj"},
    attention="self_attn",
    blocks={"attn": Block("self_attn", "hidden_states", 0, "output"), "ffn": Block("mlp", "x", 0, "output")},
)

#: model_type -> interface map. Mistral and Qwen2/3 share Llama's module names (GQA is read from the config).
FAMILIES: dict[str, FamilyMap] = {
    "bert": _BERT, "roberta": _BERT, "gpt2": _GPT2,
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
}


@dataclass(frozen=True)
class Binding:
    """One concrete place an adapter part acts: a module and a role there.

    role: "out" (projection output), "in" (projection input), "block" (parallel sublayer), "prefix" (attention
    keys/values), "embed" (input embeddings). `chunk` = (i, n) for a slice of a fused projection's output.
    """

    module: str
    role: str
    site: str
    layer: int | None = None
    chunk: tuple[int, int] | None = None
    block: Block | None = None


def accepts(model: nn.Module, arg: str) -> bool:
    """Whether the model's forward declares argument `arg` (e.g. position_ids)."""
    import inspect

    return arg in inspect.signature(model.forward).parameters


def has_hooks(module: nn.Module) -> bool:
    """Whether calling the module runs forward/backward hooks (its own, or those set on every module): code that
    reads a module's weights instead of calling it (fused paths) or replays a recording of it (graphs) must not."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (whose weight is stored in × out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight
    return int(w.shape[0]), int(w.shape[1])


def logical_modules(model: nn.Module):
    """(name, module) pairs as if no adapter were attached: a wrapper is seen as the module it wraps, under the
    wrapped module's own name, and adapter internals are skipped."""
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str):
        while getattr(module, "_unipeft_wrapper", False):
            module = module.base_layer
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        for name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The module at a logical path (through wrappers); a wrapped module comes back as its wrapper."""
    module = root
    for part in path.split(".") if path else []:
        while getattr(module, "_unipeft_wrapper", False):
            module = module.base_layer
        child = module._modules.get(part)
        if child is None:
            raise UnipeftError(f"no module '{path}' in {type(root).__name__}")
        module = child
    return module


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = get_module(root, parent_path)
    while getattr(parent, "_unipeft_wrapper", False):
        parent = parent.base_layer
    setattr(parent, child, new)


#: model_types of encoder-only models: every token attends both ways (no causal LM head makes sense on them, and a
#: routed prompt batch packs its rows so first-token heads stay exact, prompt.py).
ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "mpnet",
            "camembert", "modernbert"}


def is_encoder(config) -> bool:
    """Whether a transformers config (or a model's) describes an encoder-only model."""
    config = getattr(config, "config", config)
    return getattr(config, "model_type", None) in ENCODERS and not getattr(config, "is_decoder", False) \
        and not getattr(config, "is_encoder_decoder", False)


def family_of(model: nn.Module) -> FamilyMap | None:
    config = getattr(model, "config", None)
    return FAMILIES.get(getattr(config, "model_type", None))


def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def find_layers(model: nn.Module, fmap: FamilyMap) -> tuple[str, nn.ModuleList]:
    for name, module in logical_modules(model):
        if isinstance(module, nn.ModuleList) and (name == fmap.layers or name.endswith("." + fmap.layers)):
            return name, module
    raise UnipeftError(f"no layer list '{fmap.layers}' found in {type(model).__name__} although its model_type is "
                       f"'{fmap.family}'; target modules by name instead (targets=[...])")


def sites(model: nn.Module) -> list[str]:
    """Site names this model offers. Unknown architectures offer none: target their modules by name."""
    fmap = family_of(model)
    if fmap is None:
        return []
    names = [s for s in PROJECTIONS if s in fmap.projections]
    names += [f"{s}_in" for s in PROJECTIONS if s in fmap.projections and "[" not in fmap.projections[s]]
    names += list(SUBLAYERS) + [KV]
    if _input_embedding_name(model) is not None:
        names.append(EMBEDDINGS)
    return names


def site_table(model: nn.Module) -> list[tuple[str, str, str]]:
    """(site, what it is, module path pattern) for every site of the model — what `unipeft sites` prints."""
    fmap = family_of(model)
    if fmap is None:
        return []
    lname, _ = find_layers(model, fmap)
    rows = []
    for s in sites(model):
        if s in PROJECTIONS:
            rows.append((s, "projection output", f"{lname}.N.{fmap.projections[s]}"))
        elif s in PROJECTION_INPUTS:
            rows.append((s, "projection input", f"{lname}.N.{fmap.projections[s[:-3]]}"))
        elif s in SUBLAYERS:
            block = fmap.blocks[s]
            rows.append((s, f"{'attention' if s == 'attn' else 'FFN'} sublayer output",
                         f"sequential: {lname}.N.{fmap.projections[fmap.out_projection[s]]}; "
                         f"parallel: {lname}.N.{block.path}({block.arg})"))
        elif s == KV:
            rows.append((s, "attention keys/values", f"{lname}.N.{fmap.attention}"))
        else:
            rows.append((s, "input embeddings", _input_embedding_name(model) or ""))
    return rows


def _input_embedding_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        emb = get()
    except (NotImplementedError, AttributeError):
        return None
    while getattr(emb, "_unipeft_wrapper", False):
        emb = emb.base_layer
    for name, module in logical_modules(model):
        if module is emb:
            return name
    return None


def _select_layers(part: Part, n: int) -> list[int]:
    if part.layers == "all":
        return list(range(n))
    if isinstance(part.layers, str):
        start, stop = (int(v) for v in part.layers.split(":"))
        chosen = list(range(start, stop))
    else:
        chosen = list(part.layers)
    bad = [i for i in chosen if i >= n]
    if bad:
        raise UnipeftError(f"part '{part.name}': layer(s) {bad} do not exist; the model has {n} layers (0..{n - 1})")
    return chosen


def _parse_path(path: str) -> tuple[str, tuple[int, int] | None]:
    if path.endswith("]"):
        base, _, idx = path[:-1].partition("[")
        i, n = idx.split("/")
        return base, (int(i), int(n))
    return path, None


def resolve(model: nn.Module, part: Part) -> list[Binding]:
    """Every binding of one recipe part on this model; errors list what exists."""
    bindings = _resolve_targets(model, part) if part.targets else _resolve_sites(model, part)
    if not bindings:
        raise UnipeftError(f"part '{part.name}' matched no module (sites {list(part.sites)}, targets "
                           f"{list(part.targets)}, layers {part.layers})")
    return bindings


def _resolve_sites(model: nn.Module, part: Part) -> list[Binding]:
    if part.sites == (EMBEDDINGS,):
        name = _input_embedding_name(model)
        if name is None:
            raise UnipeftError(f"{type(model).__name__} has no input embedding (get_input_embeddings); prompt tuning "
                               "needs one")
        return [Binding(name, "embed", EMBEDDINGS)]
    fmap = family_of(model)
    if fmap is None:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        raise UnipeftError(f"{type(model).__name__} (model_type {mt!r}) has no interface map, so named sites "
                           f"{list(part.sites)} are unknown; target its modules by name instead, e.g. "
                           f"targets=['q_proj', 'v_proj'] (families with maps: {', '.join(sorted(FAMILIES))})")
    available = sites(model)
    missing = [s for s in part.sites if s not in available]
    if missing:
        raise UnipeftError(f"site(s) {', '.join(missing)} do not exist on {fmap.family} ({type(model).__name__}); "
                           f"available: {', '.join(available)}")
    lname, layers = find_layers(model, fmap)
    out: list[Binding] = []
    for i in _select_layers(part, len(layers)):
        prefix = f"{lname}.{i}."
        for s in part.sites:
            if s in PROJECTIONS:
                path, chunk = _parse_path(fmap.projections[s])
                out.append(Binding(prefix + path, "out", s, i, chunk))
            elif s in PROJECTION_INPUTS:
                out.append(Binding(prefix + fmap.projections[s[:-3]], "in", s, i))
            elif s in SUBLAYERS and part.insertion == "sequential":
                path, chunk = _parse_path(fmap.projections[fmap.out_projection[s]])
                out.append(Binding(prefix + path, "out", s, i, chunk))
            elif s in SUBLAYERS:
                block = fmap.blocks[s]
                if block.mode == "residual" and part.composition == "multiply":
                    raise UnipeftError(f"part '{part.name}': a multiplicative parallel adapter at '{s}' is not "
                                       f"defined on {fmap.family}'s post-LN blocks; use sequential insertion")
                out.append(Binding(prefix + block.path, "block", s, i, block=block))
            elif s == KV:
                out.append(Binding(prefix + fmap.attention, "prefix", s, i))
    return out


def _resolve_targets(model: nn.Module, part: Part) -> list[Binding]:
    named = dict(logical_modules(model))
    fmap = family_of(model)
    layer_of: dict[str, int] = {}
    if fmap is not None or part.layers != "all":
        lists = [(n, m) for n, m in named.items() if isinstance(m, nn.ModuleList)]
        if fmap is not None:
            lists = [(n, m) for n, m in lists if n == fmap.layers or n.endswith("." + fmap.layers)] or lists
        if lists:
            lname, layers = max(lists, key=lambda nm: len(nm[1]))
            for i in range(len(layers)):
                for sub, _ in logical_modules(layers[i]):
                    layer_of[f"{lname}.{i}" + (f".{sub}" if sub else "")] = i
            chosen = set(_select_layers(part, len(layers)))
        else:
            chosen = set()
    out: list[Binding] = []
    for pattern in part.targets:
        pat, _, io = pattern.partition(":")
        if io not in ("", "in"):
            raise UnipeftError(f"target '{pattern}': only the ':in' suffix is understood")
        hits = [n for n in named if n and (fnmatchcase(n, pat) or fnmatchcase(n, "*." + pat))]
        linear_hits = [n for n in hits if is_linear(named[n])]
        if not linear_hits:
            linears = [n for n, m in named.items() if is_linear(m)]
            what = (f"it matched only non-linear modules ({', '.join(hits[:4])})" if hits else "it matched nothing")
            raise UnipeftError(f"target '{pattern}' of part '{part.name}': {what}; linear modules are e.g. "
                               f"{', '.join(_short_list(linears))}")
        for n in linear_hits:
            layer = layer_of.get(n)
            if part.layers != "all" and (layer is None or layer not in chosen):
                continue
            out.append(Binding(n, "in" if io else "out", pattern, layer))
    seen: set[tuple[str, str]] = set()
    unique = []
    for b in out:
        if (b.module, b.role) not in seen:
            seen.add((b.module, b.role))
            unique.append(b)
    return unique


def _short_list(names: list[str], k: int = 8) -> list[str]:
    """Distinct last-two-component names, so an error message stays one readable line."""
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(".".join(n.split(".")[-2:]), None)
    keys = list(seen)
    return keys[:k] + ([f"... ({len(keys) - k} more)"] if len(keys) > k else [])
