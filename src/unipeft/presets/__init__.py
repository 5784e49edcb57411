"""Presets: every built-in method is a YAML file in this folder — data, not code.

Adding a method means adding a YAML file (here, or anywhere: `unipeft.attach(model, "my_method.yaml")`).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from ..errors import UnipeftError
from ..recipe import Recipe, load_yaml

#: The built-in methods, in the order `unipeft presets` lists them.
PRESET_NAMES: tuple[str, ...] = ("lora", "rslora", "dora", "ia3", "houlsby", "pfeiffer", "parallel", "scaled_parallel",
                                 "prefix", "prompt", "mam", "unipelt")


def list_presets() -> list[str]:
    """Names of the built-in presets."""
    return list(PRESET_NAMES)


@cache
def load_preset(name: str) -> Recipe:
    """The preset's recipe, parsed from its YAML file."""
    if name not in PRESET_NAMES:
        raise UnipeftError(f"unknown preset '{name}'; presets are {', '.join(PRESET_NAMES)} (or pass a recipe YAML "
                           "file)")
    text = (resources.files(__package__) / f"{name}.yaml").read_text(encoding="utf-8")
    return Recipe.from_dict(load_yaml(text), name=name)


def preset(name: str, **overrides: Any) -> Recipe:
    """`unipeft.preset("lora", r=16)` — a preset with knob overrides (``**{"lora.r": 4}`` targets one part)."""
    recipe = load_preset(name)
    return recipe.with_overrides(**overrides) if overrides else recipe
