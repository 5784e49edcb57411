"""The Recipe data layer: presets, paper defaults, computed mergeability, overrides, validation, (de)serialisation.

Pure data: no model is built here, so the whole file runs in well under a second once unipeft is imported.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from unipeft import Part, Recipe, UnipeftError, list_presets, preset
from unipeft.presets import load_preset
from unipeft.recipe import as_recipe

PRESETS = ("lora", "rslora", "dora", "ia3", "houlsby", "pfeiffer", "parallel", "scaled_parallel", "prefix", "prompt",
           "mam", "unipelt")
MERGEABLE = {"lora", "rslora", "dora", "ia3"}


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    """The message of a raised UnipeftError, checked to be a single non-empty line."""
    msg = str(excinfo.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg and "\r" not in msg, f"error message is not one line: {msg!r}"
    return msg


def only_part(recipe: Recipe) -> Part:
    assert len(recipe.parts) == 1, f"{recipe.name} should be a single-part recipe"
    return recipe.parts[0]


# ---- presets load ----------------------------------------------------------------------------------------------------
def test_preset_names_are_exactly_the_documented_ones():
    names = list_presets()
    assert names == list(PRESETS)
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    recipe = preset(name)
    assert isinstance(recipe, Recipe)
    assert recipe.name == name
    assert recipe.parts and all(isinstance(p, Part) for p in recipe.parts)
    assert recipe.validate() is recipe
    assert recipe.description and recipe.references, f"preset {name} should cite its paper"
    # The three entry points agree: preset(), load_preset() and as_recipe() on the name.
    assert load_preset(name) == recipe == as_recipe(name)


def test_unknown_preset_is_a_one_line_error():
    with pytest.raises(UnipeftError) as ei:
        preset("nope")
    msg = one_line_error(ei)
    assert "nope" in msg
    with pytest.raises(UnipeftError):
        as_recipe("nope")


# ---- paper defaults --------------------------------------------------------------------------------------------------
def test_lora_defaults():
    p = only_part(preset("lora"))
    assert (p.function, p.insertion, p.composition) == ("lowrank", "parallel", "scaled")
    assert p.r == 8 and p.alpha == 16
    assert p.sites == ("q", "v") and p.targets == ()
    assert p.magnitude is False
    assert p.scaling() == 2.0  # alpha / r = 16 / 8


def test_rslora_scale_is_alpha_over_sqrt_r():
    p = only_part(preset("rslora"))
    assert p.function == "lowrank" and p.r == 8 and p.alpha == 16
    assert p.scaling() == pytest.approx(16 / math.sqrt(8))
    assert p.scaling() != pytest.approx(only_part(preset("lora")).scaling())


def test_dora_is_lora_with_magnitude():
    p = only_part(preset("dora"))
    assert p.magnitude is True
    assert p.function == "lowrank" and p.insertion == "parallel"
    assert p.r == 8 and p.sites == ("q", "v")
    assert p.scaling() == 2.0


def test_ia3_defaults():
    p = only_part(preset("ia3"))
    assert p.function == "vector"
    assert p.sites == ("k", "v", "down_in")
    assert p.composition == "multiply"
    assert p.resolved_init() == "ones"
    assert p.scaling() == 1.0


@pytest.mark.parametrize("name, sites", [("houlsby", ("attn", "ffn")), ("pfeiffer", ("ffn",))])
def test_sequential_adapters(name, sites):
    p = only_part(preset(name))
    assert p.function == "bottleneck"
    assert p.reduction_factor == 16 and p.r is None
    assert p.sites == sites
    assert p.insertion == "sequential"
    assert p.composition == "add"
    assert p.bottleneck_width(384) == 24  # 384 / 16


def test_parallel_adapter_defaults():
    p = only_part(preset("parallel"))
    assert p.function == "bottleneck" and p.reduction_factor == 16
    assert p.sites == ("ffn",) and p.insertion == "parallel"
    assert p.composition == "add"
    assert p.scaling() == 1.0


def test_scaled_parallel_adapter_defaults():
    p = only_part(preset("scaled_parallel"))
    assert p.function == "bottleneck" and p.reduction_factor == 16
    assert p.sites == ("ffn",) and p.insertion == "parallel"
    assert p.composition == "scaled" and p.scale == 4.0
    assert p.scaling() == 4.0


def test_prefix_defaults():
    p = only_part(preset("prefix"))
    assert p.function == "prefix" and p.sites == ("kv",)
    assert p.length == 30 and p.reparam_hidden == 512


def test_prompt_defaults():
    p = only_part(preset("prompt"))
    assert p.function == "tokens" and p.sites == ("embeddings",)
    assert p.composition == "concat"
    assert p.length == 20


def test_mam_is_prefix_plus_scaled_ffn_adapter():
    r = preset("mam")
    assert [p.name for p in r.parts] == ["prefix", "ffn_adapter"]
    prefix, ffn = r.part("prefix"), r.part("ffn_adapter")
    assert prefix.function == "prefix" and prefix.length == 30 and prefix.sites == ("kv",)
    assert ffn.function == "bottleneck" and ffn.sites == ("ffn",) and ffn.insertion == "parallel"
    assert ffn.reduction_factor == 2 and ffn.bottleneck_width(384) == 192
    assert ffn.composition == "scaled" and ffn.scaling() == 4.0


def test_unipelt_is_three_gated_parts():
    r = preset("unipelt")
    assert [p.name for p in r.parts] == ["prefix", "adapter", "lora"]
    assert r.part("prefix").function == "prefix" and r.part("prefix").length == 10
    adapter = r.part("adapter")
    assert adapter.function == "bottleneck" and adapter.reduction_factor == 16 and adapter.r is None
    lora = r.part("lora")
    assert lora.function == "lowrank" and lora.r == 8 and lora.sites == ("q", "v")
    assert all(p.composition == "gated" for p in r.parts)


def test_part_lookup_of_unknown_name_is_a_one_line_error():
    with pytest.raises(UnipeftError) as ei:
        preset("unipelt").part("nope")
    assert "nope" in one_line_error(ei)


# ---- mergeable is computed -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_mergeable_per_preset(name):
    assert preset(name).mergeable is (name in MERGEABLE)


def test_mergeable_follows_the_knobs():
    assert preset("lora").mergeable
    # A gate depends on the input: no constant weight update.
    assert not preset("lora", composition="gated").mergeable
    # A sublayer output is not one projection.
    assert not preset("lora", sites=["attn"]).mergeable
    # Sequential lowrank is fed by the projection's output, not its input.
    assert not preset("lora", insertion="sequential").mergeable
    # Plain add (s = 1) and another projection stay mergeable.
    assert preset("lora", composition="add").mergeable
    assert preset("lora", sites=["o", "up", "down"]).mergeable
    # A recipe is mergeable only if every part is.
    assert preset("unipelt", **{"lora.composition": "add"}).part("lora").mergeable
    assert not preset("unipelt", **{"lora.composition": "add"}).mergeable


# ---- overrides -------------------------------------------------------------------------------------------------------
def test_override_r_changes_r_and_scaling_without_touching_the_preset():
    r4 = preset("lora", r=4)
    assert only_part(r4).r == 4
    assert only_part(r4).scaling() == 4.0  # 16 / 4
    assert only_part(preset("lora")).r == 8  # the cached preset is unchanged
    assert r4.name == "lora"


def test_override_without_part_hits_every_part_with_the_knob():
    base, r = preset("unipelt"), preset("unipelt", r=4)
    assert r.part("lora").r == 4
    adapter = r.part("adapter")
    assert adapter.r == 4 and adapter.reduction_factor is None
    assert adapter.bottleneck_width(384) == 4
    assert r.part("prefix") == base.part("prefix")


def test_dotted_override_changes_one_part_only():
    base, r = preset("unipelt"), preset("unipelt", **{"lora.r": 2})
    assert r.part("lora").r == 2
    assert r.part("adapter") == base.part("adapter")
    assert r.part("adapter").reduction_factor == 16 and r.part("adapter").r is None
    assert r.part("prefix") == base.part("prefix")


def test_bottleneck_reduction_factor_override_clears_r():
    r = preset("unipelt", r=4).with_overrides(reduction_factor=8)
    assert r.part("adapter").reduction_factor == 8 and r.part("adapter").r is None
    assert r.part("lora").r == 4


def test_override_of_a_knob_no_part_has_raises():
    with pytest.raises(UnipeftError) as ei:
        preset("ia3", r=4)
    assert "'r'" in one_line_error(ei)
    with pytest.raises(UnipeftError):
        preset("lora", length=5)
    with pytest.raises(UnipeftError):
        preset("prompt", reduction_factor=8)


def test_override_of_an_unknown_knob_raises():
    with pytest.raises(UnipeftError) as ei:
        preset("lora", rank=4)
    assert "rank" in one_line_error(ei)
    with pytest.raises(UnipeftError) as ei:
        preset("unipelt", **{"lora.rank": 4})
    assert "rank" in one_line_error(ei)


def test_override_of_an_unknown_part_raises():
    with pytest.raises(UnipeftError) as ei:
        preset("unipelt", **{"nope.r": 2})
    assert "nope" in one_line_error(ei)


def test_targets_made_of_site_names_set_sites():
    p = only_part(preset("lora", targets=["q", "k", "v"]))
    assert p.sites == ("q", "k", "v") and p.targets == ()


def test_targets_made_of_module_names_clear_sites():
    p = only_part(preset("lora", targets=["query"]))
    assert p.targets == ("query",) and p.sites == ()
    # A single string is one target, not a sequence of characters.
    assert only_part(preset("lora", targets="query")).targets == ("query",)


def test_overrides_are_validated():
    with pytest.raises(UnipeftError):
        preset("lora", composition="multiply")
    with pytest.raises(UnipeftError):
        preset("dora", sites=["attn"])
    with pytest.raises(UnipeftError):
        preset("lora", dropout=1.0)


# ---- invalid combinations --------------------------------------------------------------------------------------------
LOWRANK = {"function": "lowrank", "composition": "add", "sites": ["q"], "r": 4}
BOTTLENECK = {"function": "bottleneck", "composition": "add", "sites": ["ffn"], "reduction_factor": 16}
PREFIX = {"function": "prefix", "composition": "add", "sites": ["kv"], "length": 5}
TOKENS = {"function": "tokens", "composition": "concat", "sites": ["embeddings"], "length": 5}
VECTOR = {"function": "vector", "composition": "multiply", "sites": ["k"]}


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


INVALID = [
    # (id, knobs, a regex the message must match: the offending knob or value)
    ("multiply-with-lowrank", {**LOWRANK, "composition": "multiply"}, "multiply"),
    ("vector-with-add", {**VECTOR, "composition": "add"}, "'add'"),
    ("prefix-on-q", {**PREFIX, "sites": ["q"]}, "'q'"),
    ("tokens-sequential", {**TOKENS, "insertion": "sequential"}, "sequential"),
    ("prefix-sequential", {**PREFIX, "insertion": "sequential"}, "sequential"),
    ("magnitude-with-bottleneck", {**BOTTLENECK, "magnitude": True}, "magnitude"),
    ("magnitude-on-attn", {**LOWRANK, "sites": ["attn"], "magnitude": True}, "magnitude"),
    ("magnitude-gated", {**LOWRANK, "composition": "gated", "magnitude": True}, "magnitude"),
    ("magnitude-sequential", {**LOWRANK, "insertion": "sequential", "magnitude": True}, "magnitude"),
    ("bottleneck-r-and-rf", {**BOTTLENECK, "r": 4}, "reduction_factor"),
    ("bottleneck-neither", _without(BOTTLENECK, "reduction_factor"), "reduction_factor"),
    ("bottleneck-rf-zero", {**BOTTLENECK, "reduction_factor": 0}, "reduction_factor"),
    ("lowrank-without-r", _without(LOWRANK, "r"), r"\br\b"),
    ("lowrank-r-zero", {**LOWRANK, "r": 0}, r"\br\b"),
    ("scaled-without-scale", {**LOWRANK, "composition": "scaled"}, "scale"),
    ("alpha-over-r-without-alpha", {**LOWRANK, "composition": "scaled", "scale": "alpha/r"}, "alpha"),
    ("unknown-scale-rule", {**LOWRANK, "composition": "scaled", "scale": "alpha*r", "alpha": 8}, r"alpha\*r"),
    ("unknown-site", {**LOWRANK, "sites": ["qq"]}, "'qq'"),
    ("unknown-init", {**LOWRANK, "init": "xavier"}, "xavier"),
    ("ones-for-lowrank", {**LOWRANK, "init": "ones"}, "ones"),
    ("vocab-for-prefix", {**PREFIX, "init": "vocab"}, "vocab"),
    ("dropout-one", {**LOWRANK, "dropout": 1.0}, "dropout"),
    ("dropout-negative", {**LOWRANK, "dropout": -0.1}, "dropout"),
    ("layers-reversed", {**LOWRANK, "layers": "5:2"}, "5:2"),
    ("layers-not-a-range", {**LOWRANK, "layers": "first"}, "first"),
    ("layers-negative", {**LOWRANK, "layers": [-1]}, "layers"),
    ("layers-empty", {**LOWRANK, "layers": []}, "layers"),
    ("unknown-function", {**LOWRANK, "function": "lowrnk"}, "lowrnk"),
    ("unknown-composition", {**LOWRANK, "composition": "mix"}, "mix"),
    ("unknown-insertion", {**LOWRANK, "insertion": "serial"}, "serial"),
    ("unknown-activation", {**BOTTLENECK, "activation": "softmax"}, "softmax"),
    ("unknown-dtype", {**LOWRANK, "dtype": "int8"}, "int8"),
    ("no-sites-no-targets", _without(LOWRANK, "sites"), "sites"),
    ("prefix-with-targets", {**_without(PREFIX, "sites"), "targets": ["query"]}, "targets"),
    ("tokens-length-zero", {**TOKENS, "length": 0}, "length"),
    ("unknown-knob", {**LOWRANK, "rank": 4}, "rank"),
    ("missing-function", _without(LOWRANK, "function"), "function"),
    ("missing-composition", _without(LOWRANK, "composition"), "composition"),
]


@pytest.mark.parametrize("knobs, pattern", [pytest.param(k, w, id=i) for i, k, w in INVALID])
def test_invalid_knobs_are_refused_with_one_line(knobs, pattern):
    with pytest.raises(UnipeftError) as ei:
        Recipe.from_dict(knobs, name="bad")
    msg = one_line_error(ei)
    assert re.search(pattern, msg), msg


def test_the_valid_bases_of_the_invalid_cases_are_valid():
    """Each invalid case above is one change away from a valid recipe, so the refusal is about that change."""
    for knobs in (LOWRANK, BOTTLENECK, PREFIX, TOKENS, VECTOR):
        Recipe.from_dict(knobs, name="ok")


@pytest.mark.parametrize("data, pattern", [
    pytest.param({"name": "x", "parts": {"a": LOWRANK, "b": {**TOKENS}, "c": {**TOKENS}}}, "prompt", id="two-tokens"),
    pytest.param({"name": "x", "parts": {"my-part": LOWRANK}}, "my-part", id="part-name-not-identifier"),
    pytest.param({"name": "x", "parts": {}}, "parts", id="empty-parts"),
    pytest.param({"name": "x", "r": 4, "parts": {"a": LOWRANK}}, r"\br\b", id="knob-beside-parts"),
    pytest.param({"name": "x", "parts": {"a": "lowrank"}}, "'a'", id="part-not-a-mapping"),
    pytest.param(["lowrank"], "mapping", id="not-a-mapping"),
])
def test_invalid_recipe_structure_is_refused_with_one_line(data, pattern):
    with pytest.raises(UnipeftError) as ei:
        Recipe.from_dict(data)
    assert re.search(pattern, one_line_error(ei))


@pytest.mark.parametrize("knobs", [
    pytest.param({**LOWRANK, "layers": {"start": 0}}, id="layers-dict-without-stop"),
    pytest.param({**LOWRANK, "layers": ["a"]}, id="layers-not-integers"),
    pytest.param({**LOWRANK, "dropout": "high"}, id="dropout-not-a-number"),
])
def test_malformed_knob_values_are_unipeft_errors(knobs):
    with pytest.raises(UnipeftError) as ei:
        Recipe.from_dict(knobs, name="bad")
    one_line_error(ei)


# ---- serialisation ---------------------------------------------------------------------------------------------------
# (preset, overrides): built inside the tests, so a broken preset fails its own test rather than the collection.
ROUND_TRIP = [pytest.param(n, {}, id=n) for n in PRESETS] + [
    pytest.param("unipelt", {"r": 4}, id="unipelt-r4"),
    pytest.param("lora", {"layers": [0, 2], "dropout": 0.1}, id="lora-layers-list"),
    pytest.param("lora", {"layers": "0:2", "targets": ["query", "value"]}, id="lora-targets-range"),
    pytest.param("scaled_parallel", {"learn_scale": True, "layer_norm": True, "dtype": "bfloat16"}, id="sp-flags"),
]


@pytest.mark.parametrize("name, overrides", ROUND_TRIP)
def test_dict_round_trip(name, overrides):
    recipe = preset(name, **overrides)
    d = recipe.to_dict()
    assert Recipe.from_dict(d) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(d))) == recipe


@pytest.mark.parametrize("name, overrides", ROUND_TRIP)
def test_yaml_round_trip(name, overrides):
    recipe = preset(name, **overrides)
    text = recipe.to_yaml()
    assert text == str(recipe)
    data = yaml.safe_load(text)
    assert isinstance(data, dict) and data["name"] == recipe.name
    assert set(data["parts"]) == {p.name for p in recipe.parts}
    assert Recipe.from_dict(data) == recipe


def test_to_dict_lists_only_non_default_knobs():
    d = preset("lora").to_dict()["parts"]["lora"]
    assert d["function"] == "lowrank" and d["composition"] == "scaled"
    assert d["r"] == 8 and d["sites"] == ["q", "v"]
    assert "dropout" not in d and "magnitude" not in d and "layers" not in d


USER_METHOD = """\
name: out_plus_attn
description: a user-invented union of lowrank on o and a parallel bottleneck on attn
parts:
  out_lora:
    function: lowrank
    sites: [o]
    r: 4
    composition: scaled
    alpha: 8
    scale: alpha/r
  attn_adapter:
    function: bottleneck
    sites: [attn]
    insertion: parallel
    reduction_factor: 8
    composition: add
"""


def _check_user_method(r: Recipe) -> None:
    assert r.name == "out_plus_attn"
    assert [p.name for p in r.parts] == ["out_lora", "attn_adapter"]
    lora, adapter = r.part("out_lora"), r.part("attn_adapter")
    assert lora.function == "lowrank" and lora.sites == ("o",) and lora.scaling() == 2.0
    assert adapter.function == "bottleneck" and adapter.sites == ("attn",) and adapter.insertion == "parallel"
    assert adapter.bottleneck_width(64) == 8
    assert lora.mergeable and not adapter.mergeable and not r.mergeable


def test_user_recipe_from_yaml_file(tmp_path: Path):
    path = tmp_path / "union.yaml"
    path.write_text(USER_METHOD, encoding="utf-8")
    r = Recipe.from_file(path)
    _check_user_method(r)
    assert as_recipe(str(path)) == r
    assert as_recipe(path) == r
    # Overrides apply to a file recipe too: r means something to both the lowrank and the bottleneck part.
    r2 = as_recipe(str(path), r=2)
    assert r2.part("out_lora").r == 2 and r2.part("out_lora").scaling() == 4.0
    assert r2.part("attn_adapter").r == 2 and r2.part("attn_adapter").reduction_factor is None


def test_user_recipe_from_json_file(tmp_path: Path):
    path = tmp_path / "union.json"
    path.write_text(json.dumps(yaml.safe_load(USER_METHOD)), encoding="utf-8")
    r = Recipe.from_file(path)
    _check_user_method(r)
    assert as_recipe(str(path)) == r
    yaml_path = tmp_path / "union.yaml"
    yaml_path.write_text(USER_METHOD, encoding="utf-8")
    assert r == Recipe.from_file(yaml_path)


def test_single_part_file_takes_its_name_from_the_file(tmp_path: Path):
    path = tmp_path / "my_method.yml"
    path.write_text("function: lowrank\nsites: [q, k]\nr: 2\ncomposition: add\n", encoding="utf-8")
    r = as_recipe(str(path))
    assert r.name == "my_method" and [p.name for p in r.parts] == ["my_method"]
    assert r.parts[0].sites == ("q", "k") and r.parts[0].r == 2


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "parts:\n  lora: {function: lowrank, r: [8\n"),
    (".yaml", "name: x\n\tfunction: lowrank\n"),
    (".json", '{"function": "lowrank", "r": 8,,}'),
])
def test_malformed_file_is_a_one_line_error(tmp_path: Path, suffix, text):
    path = tmp_path / f"broken{suffix}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UnipeftError) as ei:
        Recipe.from_file(path)
    msg = one_line_error(ei)
    assert "broken" in msg
    with pytest.raises(UnipeftError):
        as_recipe(str(path))


@pytest.mark.parametrize("text", ["", "- lowrank\n- add\n", "just a string\n"])
def test_file_that_is_not_a_mapping_is_a_one_line_error(tmp_path: Path, text):
    path = tmp_path / "odd.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UnipeftError) as ei:
        Recipe.from_file(path)
    one_line_error(ei)


def test_missing_file_is_a_one_line_error(tmp_path: Path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(UnipeftError) as ei:
        Recipe.from_file(missing)
    assert "missing.yaml" in one_line_error(ei)
    # A .yaml path is a file, not a preset name, even when it does not exist.
    with pytest.raises(UnipeftError) as ei:
        as_recipe(str(missing))
    assert "missing.yaml" in one_line_error(ei)


# ---- the layers knob -------------------------------------------------------------------------------------------------
LAYER_TEMPLATE = "function: lowrank\ncomposition: add\nsites: [q]\nr: 2\nlayers: {}\n"


@pytest.mark.parametrize("written, expected", [
    ("all", "all"),
    ("[0, 2]", (0, 2)),
    ("'0:2'", "0:2"),
    ("0:2", "0:2"),
    ("{start: 0, stop: 2}", "0:2"),
    ("3", (3,)),
])
def test_layers_forms_in_yaml(tmp_path: Path, written, expected):
    path = tmp_path / "layers.yaml"
    path.write_text(LAYER_TEMPLATE.format(written), encoding="utf-8")
    r = Recipe.from_file(path)
    assert r.parts[0].layers == expected
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r


def test_layers_dict_form_equals_range_string():
    a = Recipe.from_dict({**LOWRANK, "layers": {"start": 1, "stop": 4}}, name="a")
    b = Recipe.from_dict({**LOWRANK, "layers": "1:4"}, name="a")
    assert a == b and a.parts[0].layers == "1:4"
    assert preset("lora", layers={"start": 0, "stop": 2}).parts[0].layers == "0:2"


def test_unquoted_range_not_starting_at_zero(tmp_path: Path):
    path = tmp_path / "layers.yaml"
    path.write_text(LAYER_TEMPLATE.format("2:4"), encoding="utf-8")
    assert Recipe.from_file(path).parts[0].layers == "2:4"
