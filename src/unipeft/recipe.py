"""Recipes: the unified view's knobs as frozen, validated data.

He et al. (2022) show that adapters, LoRA, prefix tuning and IA3 are one operation on a frozen model:

    h  <-  compose(h, Δh),    Δh = f(x_src · W_down) · W_up

and differ only in four knobs: the **site** (which representation h is modified), the **insertion** (x_src is the
sublayer's input — parallel — or its output h — sequential), the **function** f and the **composition**. A `Part`
fixes every knob for one group of sites; a `Recipe` is a named union of parts (MAM, UniPELT are unions). Recipes are
plain data: they load from YAML/JSON, print as YAML, and carry no code, so a new method is a YAML file.

Whether a recipe can be merged into the frozen weights is *computed* from the knobs (`Part.mergeable`), never declared.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import UnipeftError

# ---- site vocabulary -------------------------------------------------------------------------------------------------
#: Projection outputs: the output of one linear layer inside a transformer layer.
PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "o", "up", "gate", "down")
#: Projection inputs (`down_in` is where IA3 scales the FFN, as peft does).
PROJECTION_INPUTS: tuple[str, ...] = tuple(f"{p}_in" for p in PROJECTIONS)
#: Sublayer outputs: the attention and FFN sublayers, before the residual add.
SUBLAYERS: tuple[str, ...] = ("attn", "ffn")
#: Attention keys/values (prefix tuning) and the input embeddings (prompt tuning).
KV, EMBEDDINGS = "kv", "embeddings"
ALL_SITES: tuple[str, ...] = PROJECTIONS + PROJECTION_INPUTS + SUBLAYERS + (KV, EMBEDDINGS)

FUNCTIONS = ("lowrank", "bottleneck", "prefix", "tokens", "vector")
COMPOSITIONS = ("add", "scaled", "gated", "multiply", "concat")
INSERTIONS = ("parallel", "sequential")
ACTIVATIONS = ("relu", "gelu", "swish", "tanh", "identity")
INITS = ("lora", "bert", "near_identity", "ones", "vocab")
DTYPES = ("float32", "float16", "bfloat16")
SCALE_RULES = ("alpha/r", "alpha/sqrt(r)")
#: Where the real tokens sit when a prefix is present: `keep` (unipeft: positions 0..T-1, the prefix takes none) or
#: `shift` (peft: the prefix occupies positions 0..l-1 and the real tokens move to l..l+T-1).
POSITIONS = ("keep", "shift")

#: Which compositions and sites each function supports, and its default init. The validation below reads this table.
_FUNCTION_RULES: dict[str, dict[str, tuple[str, ...]]] = {
    "lowrank": {"compositions": ("add", "scaled", "gated"), "sites": PROJECTIONS + SUBLAYERS,
                "inits": ("lora", "bert", "near_identity")},
    "bottleneck": {"compositions": ("add", "scaled", "gated"), "sites": PROJECTIONS + SUBLAYERS,
                   "inits": ("lora", "bert", "near_identity")},
    "vector": {"compositions": ("multiply",), "sites": PROJECTIONS + PROJECTION_INPUTS + SUBLAYERS,
               "inits": ("ones",)},
    "prefix": {"compositions": ("add", "gated"), "sites": (KV,), "inits": ("bert",)},
    "tokens": {"compositions": ("concat",), "sites": (EMBEDDINGS,), "inits": ("vocab", "bert")},
}
_DEFAULT_INIT = {"lowrank": "lora", "bottleneck": "near_identity", "vector": "ones", "prefix": "bert",
                 "tokens": "vocab"}

#: Knobs that only mean something for some parts. An override of such a knob applies to every part where it means
#: something; a knob that means nothing to any part of a recipe is an error.
_KNOB_APPLIES: dict[str, Any] = {
    "r": lambda p: p.function in ("lowrank", "bottleneck"),
    "reduction_factor": lambda p: p.function == "bottleneck",
    "magnitude": lambda p: p.function == "lowrank",
    "activation": lambda p: p.function == "bottleneck",
    "layer_norm": lambda p: p.function == "bottleneck",
    "length": lambda p: p.function in ("prefix", "tokens"),
    "reparam_hidden": lambda p: p.function == "prefix",
    "positions": lambda p: p.function == "prefix",
    "alpha": lambda p: p.composition == "scaled",
    "scale": lambda p: p.composition == "scaled",
    "learn_scale": lambda p: p.composition == "scaled",
    "dropout": lambda p: p.function in ("lowrank", "bottleneck"),
}


@dataclass(frozen=True)
class Part:
    """One group of sites with every knob fixed. See the module docstring for the formula.

    Knobs:
      sites / targets: named sites (see `ALL_SITES`) or module-name patterns (for any `nn.Module`, see `arch.py`).
      layers: "all", a list of layer indices, or a range "start:stop".
      insertion: parallel (x_src = the sublayer's input) or sequential (x_src = its output h).
      function: lowrank (r; magnitude=True adds DoRA's magnitude vector), bottleneck (r or reduction_factor,
        activation, layer_norm), prefix (length, reparam_hidden, positions: keep | shift), tokens (length), vector.
      composition: add (h + Δh), scaled (h + s·Δh, s from alpha and the scale rule, or a number; learn_scale makes s a
        parameter), gated (h + σ(x_src·w_g + b_g)·Δh), multiply (h ⊙ v), concat (prompt tokens before the input).
      init: lora (Kaiming-uniform down, zero up), bert (N(0, 0.02)), near_identity (N(0, 1e-3) down, zero up),
        ones (vector), vocab (prompt tokens copied from random vocabulary embeddings).
    """

    name: str
    function: str
    composition: str
    sites: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    layers: str | tuple[int, ...] = "all"
    insertion: str = "parallel"
    r: int | None = None
    reduction_factor: float | None = None
    magnitude: bool = False
    activation: str = "relu"
    layer_norm: bool = False
    length: int | None = None
    reparam_hidden: int | None = None
    positions: str = "keep"
    alpha: float | None = None
    scale: float | str | None = None
    learn_scale: bool = False
    init: str | None = None
    dropout: float = 0.0
    dtype: str | None = None

    # -- derived ------------------------------------------------------------------------------------------------------
    @property
    def mergeable(self) -> bool:
        """True iff the part folds exactly into the frozen weights: a linear f (lowrank or vector) on a single
        projection fed by its own input (parallel, or any insertion for a vector), composed with add / scaled add
        (a learned s is a constant after training) / multiply."""
        if self.function not in ("lowrank", "vector"):
            return False
        on_projection = bool(self.targets) or all(s in PROJECTIONS + PROJECTION_INPUTS for s in self.sites)
        linear_input = self.insertion == "parallel" or self.function == "vector"
        return on_projection and linear_input and self.composition in ("add", "scaled", "multiply")

    def scaling(self) -> float:
        """The constant s of a scaled composition (α/r, α/√r or a number); 1.0 for the other compositions."""
        if self.composition != "scaled":
            return 1.0
        if isinstance(self.scale, str):
            r = self.r if self.r is not None else 1
            return float(self.alpha) / (r if self.scale == "alpha/r" else math.sqrt(r))
        return float(self.scale)

    def bottleneck_width(self, d_in: int) -> int:
        """r for a bottleneck: given directly, or d_in / reduction_factor (at least 1)."""
        if self.r is not None:
            return self.r
        return max(1, int(round(d_in / float(self.reduction_factor))))

    def resolved_init(self) -> str:
        return self.init or _DEFAULT_INIT[self.function]

    # -- validation ----------------------------------------------------------------------------------------------------
    def validate(self) -> Part:
        """Refuse invalid knob combinations with a one-line reason; return self."""
        where = f"recipe part '{self.name}'"

        def bad(msg: str) -> None:
            raise UnipeftError(f"{where}: {msg}")

        if self.function not in FUNCTIONS:
            bad(f"unknown function '{self.function}'; choose one of {', '.join(FUNCTIONS)}")
        for knob in ("magnitude", "layer_norm", "learn_scale"):
            if not isinstance(getattr(self, knob), bool):
                bad(f"{knob} must be true or false, not {getattr(self, knob)!r}")
        if self.sites and self.targets:
            bad("give sites or targets, not both")
        for knob in ("alpha", "reduction_factor", "dropout"):
            value = getattr(self, knob)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                bad(f"{knob} must be a number, not {value!r}")
        if self.composition in COMPOSITIONS:
            for f in fields(self):
                applies = _KNOB_APPLIES.get(f.name)
                if applies is not None and getattr(self, f.name) != f.default and not applies(self):
                    bad(f"knob '{f.name}' means nothing for function '{self.function}' with composition "
                        f"'{self.composition}'; remove it")
        rules = _FUNCTION_RULES[self.function]
        if self.composition not in COMPOSITIONS:
            bad(f"unknown composition '{self.composition}'; choose one of {', '.join(COMPOSITIONS)}")
        if self.composition not in rules["compositions"]:
            bad(f"function '{self.function}' cannot be composed by '{self.composition}'; "
                f"use {' or '.join(rules['compositions'])}")
        if self.insertion not in INSERTIONS:
            bad(f"unknown insertion '{self.insertion}'; choose parallel or sequential")
        if not self.sites and not self.targets:
            bad("no sites and no targets: say where the adapter goes (e.g. sites: [q, v])")
        for s in self.sites:
            if s not in ALL_SITES:
                bad(f"unknown site '{s}'; sites are {', '.join(ALL_SITES)} (or give module names as targets)")
            if s not in rules["sites"]:
                bad(f"function '{self.function}' cannot act on site '{s}'; it acts on {', '.join(rules['sites'])}")
        if self.targets and self.function in ("prefix", "tokens"):
            bad(f"function '{self.function}' acts on site '{rules['sites'][0]}', not on module-name targets")
        if self.function in ("prefix", "tokens") and self.insertion == "sequential":
            bad(f"function '{self.function}' has no sequential form; use insertion: parallel")
        if self.function == "lowrank" and (not isinstance(self.r, int) or self.r < 1):
            bad("lowrank needs an integer rank r >= 1")
        if self.function == "bottleneck":
            if (self.r is None) == (self.reduction_factor is None):
                bad("a bottleneck needs exactly one of r or reduction_factor")
            if self.r is not None and (not isinstance(self.r, int) or self.r < 1):
                bad("r must be an integer >= 1")
            if self.reduction_factor is not None and self.reduction_factor <= 0:
                bad("reduction_factor must be > 0")
            if self.activation not in ACTIVATIONS:
                bad(f"unknown activation '{self.activation}'; choose one of {', '.join(ACTIVATIONS)}")
        if self.magnitude:
            if self.function != "lowrank" or self.insertion != "parallel":
                bad("magnitude (DoRA) needs a parallel lowrank function")
            if any(s not in PROJECTIONS for s in self.sites):
                bad("magnitude (DoRA) decomposes a projection's weight: use projection sites (q, k, v, o, up, gate, "
                    "down)")
            if self.composition == "gated":
                bad("magnitude (DoRA) needs add or scaled composition")
        if self.function in ("prefix", "tokens") and (not isinstance(self.length, int) or self.length < 1):
            bad(f"{self.function} needs an integer length >= 1")
        if self.positions not in POSITIONS:
            bad(f"positions '{self.positions}' is not keep (unipeft: real tokens keep positions 0..T-1) or shift "
                "(peft: the prefix takes positions 0..l-1)")
        if self.reparam_hidden is not None and (not isinstance(self.reparam_hidden, int) or self.reparam_hidden < 1):
            bad("reparam_hidden must be an integer >= 1 (or null for no reparametrisation)")
        if self.composition == "scaled":
            if self.scale is None:
                bad("scaled composition needs scale: a number, 'alpha/r' or 'alpha/sqrt(r)'")
            if isinstance(self.scale, str):
                if self.scale not in SCALE_RULES:
                    bad(f"scale '{self.scale}' is not a number, 'alpha/r' or 'alpha/sqrt(r)'")
                if self.alpha is None:
                    bad(f"scale '{self.scale}' needs alpha")
                if self.r is None:
                    bad(f"scale '{self.scale}' needs r")
        init = self.resolved_init()
        if init not in INITS:
            bad(f"unknown init '{init}'; choose one of {', '.join(INITS)}")
        if init not in rules["inits"]:
            bad(f"init '{init}' does not apply to function '{self.function}'; use {' or '.join(rules['inits'])}")
        if not 0.0 <= float(self.dropout) < 1.0:
            bad("dropout must be in [0, 1)")
        if self.dtype is not None and self.dtype not in DTYPES:
            bad(f"unknown dtype '{self.dtype}'; choose one of {', '.join(DTYPES)} or leave it unset (base dtype)")
        if isinstance(self.layers, str) and self.layers != "all":
            start, _, stop = self.layers.partition(":")
            if not (start.strip().isdigit() and stop.strip().isdigit() and int(start) < int(stop)):
                bad(f"layers '{self.layers}' is not 'all', a list of indices or a range 'start:stop'")
        if isinstance(self.layers, tuple) and (not self.layers or any(
                not isinstance(i, int) or i < 0 for i in self.layers)):
            bad("layers must be a non-empty list of non-negative layer indices")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Only the knobs that differ from the defaults, so the printed recipe reads like its YAML."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "name":
                continue
            v = getattr(self, f.name)
            if v != f.default or f.name in ("function", "composition"):
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class Recipe:
    """A named method: one or more `Part`s. `mergeable` holds iff every part is mergeable."""

    name: str
    parts: tuple[Part, ...]
    description: str = ""
    references: tuple[str, ...] = field(default=())

    @property
    def mergeable(self) -> bool:
        return all(p.mergeable for p in self.parts)

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise UnipeftError(f"recipe '{self.name}' has no part '{name}'; its parts are "
                           f"{', '.join(p.name for p in self.parts)}")

    def validate(self) -> Recipe:
        if not self.parts:
            raise UnipeftError(f"recipe '{self.name}' has no parts")
        names = [p.name for p in self.parts]
        if len(set(names)) != len(names):
            raise UnipeftError(f"recipe '{self.name}' has duplicate part names: {names}")
        for p in self.parts:
            if not p.name.isidentifier():
                raise UnipeftError(f"recipe '{self.name}': part name '{p.name}' must be an identifier")
            p.validate()
        if sum(p.function == "tokens" for p in self.parts) > 1:
            raise UnipeftError(f"recipe '{self.name}' has two prompt-token parts; use one with a longer length")
        return self

    # -- overrides -----------------------------------------------------------------------------------------------------
    def with_overrides(self, **overrides: Any) -> Recipe:
        """Return a new recipe with knobs changed. `knob=value` changes every part where the knob means something;
        `part.knob=value` (pass as a dict key: ``**{"lora.r": 4}``) changes one part. `targets=[...]` chooses sites
        when every entry is a site name, module-name patterns otherwise."""
        parts = {p.name: p for p in self.parts}
        for key, value in overrides.items():
            part_name, _, knob = key.rpartition(".")
            if part_name and part_name not in parts:
                raise UnipeftError(f"override '{key}': recipe '{self.name}' has no part '{part_name}'; parts are "
                                   f"{', '.join(parts)}")
            chosen = [parts[part_name]] if part_name else list(parts.values())
            if knob not in _KNOB_NAMES:
                raise UnipeftError(f"unknown knob '{knob}' in override '{key}'; knobs are {', '.join(_KNOB_NAMES)}")
            applies = _KNOB_APPLIES.get(knob, lambda p: True)
            hit = [p for p in chosen if applies(p)]
            if not hit:
                which = f"part '{part_name}'" if part_name else f"no part of recipe '{self.name}'"
                raise UnipeftError(f"override '{key}': {which} has no knob '{knob}' (it means nothing for its "
                                   "function/composition)")
            for p in hit:
                parts[p.name] = _override_one(p, knob, value)
        return Recipe(self.name, tuple(parts.values()), self.description, self.references).validate()

    # -- serialisation -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.description:
            d["description"] = self.description
        if self.references:
            d["references"] = list(self.references)
        d["parts"] = {p.name: p.to_dict() for p in self.parts}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)

    def __str__(self) -> str:
        return self.to_yaml()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str | None = None) -> Recipe:
        """Build from a mapping: either {name, parts: {part: knobs}} or a single part's knobs at the top level."""
        if not isinstance(data, Mapping):
            raise UnipeftError("a recipe must be a mapping of knobs (YAML/JSON object)")
        data = dict(data)
        rname = str(data.pop("name", name or "custom"))
        description = str(data.pop("description", "") or "")
        references = tuple(data.pop("references", ()) or ())
        if "parts" in data:
            raw_parts = data.pop("parts")
            if data:
                raise UnipeftError(f"recipe '{rname}': knobs {sorted(data)} must go inside a part when 'parts' is used")
            if not isinstance(raw_parts, Mapping) or not raw_parts:
                raise UnipeftError(f"recipe '{rname}': 'parts' must map part names to knobs")
            parts = tuple(_part_from_dict(str(k), v) for k, v in raw_parts.items())
        else:
            parts = (_part_from_dict(rname, data),)
        return cls(rname, parts, description, references).validate()

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        p = Path(path)
        if not p.is_file():
            raise UnipeftError(f"recipe file '{path}' does not exist")
        text = p.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if p.suffix == ".json" else load_yaml(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise UnipeftError(f"recipe file '{path}' is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                               f"{str(e).splitlines()[0]}") from None
        return cls.from_dict(data, name=p.stem)


_KNOB_NAMES = tuple(f.name for f in fields(Part) if f.name != "name")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader minus YAML 1.1's base-60 integers, so `layers: 2:4` stays the string "2:4"."""


_YamlLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """Parse recipe YAML (safe: no Python objects)."""
    return yaml.load(text, Loader=_YamlLoader)


def _coerce(knob: str, value: Any) -> Any:
    """Turn YAML/CLI values into the field's type: lists become tuples, layer ranges stay strings."""
    if knob in ("sites", "targets"):
        if isinstance(value, str):
            value = [value]
        return tuple(str(v) for v in value)
    if knob == "layers":
        if isinstance(value, Mapping):
            return f"{int(value['start'])}:{int(value['stop'])}"
        if isinstance(value, (list, tuple)):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError("layer indices must be integers")
            return tuple(value)
        if isinstance(value, int):
            return (value,)
        return str(value)
    if knob == "scale" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if knob in ("r", "length", "reparam_hidden") and isinstance(value, float) and value.is_integer():
        return int(value)
    if knob in ("alpha", "reduction_factor", "dropout") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _checked_coerce(part: str, knob: str, value: Any) -> Any:
    try:
        return _coerce(knob, value)
    except (KeyError, ValueError, TypeError) as e:
        raise UnipeftError(f"recipe part '{part}': knob '{knob}' has a malformed value {value!r} ({e!r})") from None


def _override_one(p: Part, knob: str, value: Any) -> Part:
    if knob == "targets":
        items = _checked_coerce(p.name, "targets", value)
        if items and all(t in ALL_SITES for t in items):
            return replace(p, sites=items, targets=())
        return replace(p, targets=items, sites=())
    changes: dict[str, Any] = {knob: _checked_coerce(p.name, knob, value)}
    if p.function == "bottleneck" and knob == "r":
        changes["reduction_factor"] = None
    if p.function == "bottleneck" and knob == "reduction_factor":
        changes["r"] = None
    new = replace(p, **changes)
    if knob in ("function", "composition"):  # knobs that stop meaning anything go back to their defaults
        defaults = {f.name: f.default for f in fields(Part) if f.name in _KNOB_APPLIES}
        new = replace(new, **{k: v for k, v in defaults.items() if not _KNOB_APPLIES[k](new)})
    return new


def _part_from_dict(name: str, data: Any) -> Part:
    if not isinstance(data, Mapping):
        raise UnipeftError(f"recipe part '{name}' must be a mapping of knobs")
    unknown = sorted(set(data) - set(_KNOB_NAMES))
    if unknown:
        raise UnipeftError(f"recipe part '{name}': unknown knob(s) {', '.join(unknown)}; knobs are "
                           f"{', '.join(_KNOB_NAMES)}")
    for required in ("function", "composition"):
        if required not in data:
            raise UnipeftError(f"recipe part '{name}' needs '{required}'")
    kwargs = {k: _checked_coerce(name, k, v) for k, v in data.items()}
    try:
        return Part(name=name, **kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the unknown-knob check above
        raise UnipeftError(f"recipe part '{name}': {e}") from None


def as_recipe(spec: Recipe | str | Path | Mapping[str, Any], **overrides: Any) -> Recipe:
    """Accept a Recipe, a preset name, a YAML/JSON file path or a mapping; apply overrides."""
    from .presets import load_preset

    if isinstance(spec, Recipe):
        recipe = spec.validate()
    elif isinstance(spec, Mapping):
        recipe = Recipe.from_dict(spec)
    elif isinstance(spec, (str, Path)) and (Path(spec).suffix in (".yaml", ".yml", ".json") or Path(spec).is_file()):
        recipe = Recipe.from_file(spec)
    elif isinstance(spec, str):
        recipe = load_preset(spec)
    else:
        raise UnipeftError(f"cannot make a recipe from {type(spec).__name__}; pass a preset name, a YAML file or a "
                           "Recipe")
    return recipe.with_overrides(**overrides) if overrides else recipe


def recipe_asdict(recipe: Recipe) -> dict[str, Any]:
    """A JSON-safe dict (used in saved adapters)."""
    return json.loads(json.dumps(recipe.to_dict()))


__all__ = ["Part", "Recipe", "as_recipe", "ALL_SITES", "PROJECTIONS", "PROJECTION_INPUTS", "SUBLAYERS", "KV",
           "EMBEDDINGS"]
