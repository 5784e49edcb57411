"""Shared routing stacks (routed.py, `AdaptedModel.prepare_routing`): every adapter's LoRA weights stacked once per
projection, each row of a routed call picking its slot. Outputs against the reference path (UNIPEFT_FUSED=0), the
stacks kept up to date (in-place weight changes, adapters added or removed), the layers that must not take them,
and the point of them: a compiled model traces once for any mix of adapters. fp32 on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import inputs, output_of, tiny_model
from test_engine import randomize
from transformers import CompileConfig, DynamicCache, GenerationConfig, StaticCache

import unipeft
from unipeft import routed
from unipeft.layer import BASE

MIXES = (["b", BASE, "default", "c"], ["c", "c", "b", "default"], ["default", "b", "c", BASE])


def _model(family: str = "llama") -> unipeft.AdaptedModel:
    """Three LoRA adapters of different ranks and scales; "c" only on some of the projections the others adapt."""
    whole = {"targets": ["c_attn", "c_proj", "c_fc"]} if family == "gpt2" else {}  # whole Conv1D modules on GPT-2
    am = unipeft.attach(tiny_model(family), "lora", r=4, **whole)
    am.add("b", "lora", r=6, alpha=4, **whole)
    am.add("c", "lora", r=2, targets=["c_attn"] if family == "gpt2" else ["q"])
    for i, n in enumerate(am.recipes):
        randomize(am, n, seed=i + 1, std=0.3)
    return am.eval()  # (the shared stacks serve eval calls)


def _reference(am, monkeypatch, x: dict, names: list) -> torch.Tensor:
    monkeypatch.setenv("UNIPEFT_FUSED", "0")
    try:
        return output_of(am(**x, adapter_names=names))
    finally:
        monkeypatch.setenv("UNIPEFT_FUSED", "1")


def _spy(monkeypatch) -> list[tuple[object, bool]]:
    """Record each routed.shared_lora call: (layer, whether it gave the output)."""
    seen: list[tuple[object, bool]] = []
    real = routed.shared_lora

    def spy(layer, x, slots):
        out = real(layer, x, slots)
        seen.append((layer, out is not None))
        return out
    monkeypatch.setattr(routed, "shared_lora", spy)
    return seen


def _stacks(w) -> tuple[torch.Tensor, torch.Tensor]:
    cached = w.__dict__[routed.SHARED]
    return cached[2], cached[3]


def _shared_layers(am) -> set[int]:
    return {id(w) for w in am._wrappers.values() if routed.SHARED in w.__dict__}


def _check_layout(am) -> None:
    """Slot i holds the i-th adapter's A and s·B (ranks padded with zeros), zeros where it has no site; the last
    slot (the base's) is zero."""
    names = list(am.recipes)
    for path, w in am._wrappers.items():
        if routed.SHARED not in w.__dict__:
            continue
        a_stack, b_stack = _stacks(w)
        assert a_stack.shape[0] == b_stack.shape[0] == len(names) + 1, path
        for i, n in enumerate(names):
            sites = list(w.sites_of(n))
            if not sites:
                assert not a_stack[i].any() and not b_stack[i].any(), (path, n)
                continue
            (sa,) = sites
            a, b = sa.fn.down.weight, sa.fn.up.weight
            r = a.shape[0]
            assert torch.equal(a_stack[i, :r], a) and not a_stack[i, r:].any(), (path, n)
            torch.testing.assert_close(b_stack[i, :, :r], b * float(sa.s), rtol=0, atol=0)
            assert not b_stack[i, :, r:].any(), (path, n)
        assert not a_stack[-1].any() and not b_stack[-1].any(), path


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_stacks_give_the_reference_outputs(family: str, monkeypatch) -> None:
    am = _model(family)
    x = inputs(batch=4, seq=5)
    mixes = (*MIXES, [BASE] * 4)
    with torch.no_grad():
        references = [_reference(am, monkeypatch, x, names) for names in mixes]
        assert am.prepare_routing() == len(am._wrappers), "every projection holds only plain LoRA"
        _check_layout(am)
        assert am.__dict__["_shared"] == {n: i for i, n in enumerate(am.recipes)}
        seen = _spy(monkeypatch)
        for names, reference in zip(mixes, references):
            seen.clear()
            out = output_of(am(**x, adapter_names=names))
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6, msg=str(names))
            assert len(seen) == len(am._wrappers) and all(took for _, took in seen), "every projection took them"
            assert {id(layer) for layer, _ in seen} == _shared_layers(am)
    base = references[-1]
    for row, name in enumerate(MIXES[0]):  # (the adapters do act: their rows are not the base's)
        assert torch.allclose(references[0][row], base[row]) == (name == BASE), name


def test_in_place_weight_changes_refresh_the_stacks_in_place(monkeypatch) -> None:
    am = _model()
    x = inputs(batch=4, seq=5)
    names = MIXES[0]
    with torch.no_grad():
        am.prepare_routing()
        before = output_of(am(**x, adapter_names=names))
        addresses = {p: tuple(t.data_ptr() for t in _stacks(w)) for p, w in am._wrappers.items()}
        for p in am.adapter_parameters("b").values():
            p.mul_(-3.0)  # as an optimizer step does: in place, version counters move
        seen = _spy(monkeypatch)
        after = output_of(am(**x, adapter_names=names))
        reference = _reference(am, monkeypatch, x, names)
    assert seen and all(took for _, took in seen)
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after[0], before[0]), "row 0 routes to b, whose weights changed"
    torch.testing.assert_close(after[1:], before[1:], rtol=1e-5, atol=1e-6)  # no other row did
    assert {p: tuple(t.data_ptr() for t in _stacks(w)) for p, w in am._wrappers.items()} == addresses
    _check_layout(am)


@pytest.mark.parametrize("shared", [True, False])
def test_replaced_adapter_parameters_are_seen_by_the_next_routed_call(monkeypatch, shared: bool) -> None:
    """`load_state_dict(..., assign=True)` puts new Parameter objects in place, whose version counters the caches
    never saw: the shared stacks (`prepare_routing`) and the per-routing rows must notice the new objects."""
    am = _model()
    x = inputs(batch=4, seq=5)
    names = MIXES[0]
    with torch.no_grad():
        if shared:
            am.prepare_routing()
        before = output_of(am(**x, adapter_names=names))
        new = {k: torch.nn.Parameter(-3.0 * v) for k, v in am.state_dict().items() if ".adapters.b." in k}
        assert new
        am.load_state_dict(new, strict=False, assign=True)
        held = am.state_dict(keep_vars=True)
        assert all(held[k] is p for k, p in new.items()), "new objects, versions the caches never saw"
        after = output_of(am(**x, adapter_names=names))
        reference = _reference(am, monkeypatch, x, names)
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after[0], before[0]), "row 0 routes to b, whose weights were replaced"


def test_adding_and_removing_adapters_rebuilds_the_stacks(monkeypatch) -> None:
    am = _model()
    x = inputs(batch=4, seq=5)
    with torch.no_grad():
        am.prepare_routing()
        am(**x, adapter_names=MIXES[0])
        am.add("d", "lora", r=3, targets=["q", "o"])  # a new adapter, and on projections no adapter had
        randomize(am, "d", seed=9, std=0.3)
        am.eval()
        seen = _spy(monkeypatch)
        names = ["d", "b", BASE, "d"]
        out = output_of(am(**x, adapter_names=names))
        assert am.__dict__["_shared"] == {"default": 0, "b": 1, "c": 2, "d": 3}
        assert _shared_layers(am) == {id(w) for w in am._wrappers.values()}
        assert {id(layer) for layer, took in seen if took} == _shared_layers(am)
        _check_layout(am)
        torch.testing.assert_close(out, _reference(am, monkeypatch, x, names), rtol=1e-5, atol=1e-6)

        am.remove("c")
        names = ["d", "default", "b", BASE]
        out = output_of(am(**x, adapter_names=names))
        assert am.__dict__["_shared"] == {"default": 0, "b": 1, "d": 2}
        _check_layout(am)
        torch.testing.assert_close(out, _reference(am, monkeypatch, x, names), rtol=1e-5, atol=1e-6)

        assert am.prepare_routing(False) == 0
        assert am.__dict__["_shared"] is None
        assert all(routed.SHARED not in w.__dict__ for w in am._wrappers.values())
        seen.clear()
        out = output_of(am(**x, adapter_names=names))
        assert not seen, "without stacks no layer looks for them"
        torch.testing.assert_close(out, _reference(am, monkeypatch, x, names), rtol=1e-5, atol=1e-6)


def test_layers_with_other_adapters_keep_the_per_routing_path(monkeypatch) -> None:
    """IA3 scales k, v and down's input, Houlsby adapters follow o and down: those projections get no stacks; routed
    calls mixing every adapter still equal the reference path. With gradients the stacks are not used, and the
    gradients equal the reference path's."""
    am = _model()
    am.add("d", "ia3")
    am.add("e", "houlsby")
    for n in ("d", "e"):
        randomize(am, n, seed=len(n) + ord(n), std=0.3)
    am.eval()
    x = inputs(batch=6, seq=5)
    names = ["e", "b", BASE, "d", "c", "default"]
    lora_only = {id(w) for w in am._wrappers.values() if all(am.recipes[n].parts[0].function == "lowrank"
                                                               for n in w.adapters)}
    with torch.no_grad():
        reference = _reference(am, monkeypatch, x, names)
        count = am.prepare_routing()
        assert 0 < count < len(am._wrappers) and count == len(lora_only)
        assert _shared_layers(am) == lora_only
        seen = _spy(monkeypatch)
        out = output_of(am(**x, adapter_names=names))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert {id(layer) for layer, took in seen if took} == lora_only
    for n in am.recipes:  # (only the active adapter trains by default)
        for p in am.adapter_parameters(n).values():
            p.requires_grad_(True)

    def run(flag: str):
        monkeypatch.setenv("UNIPEFT_FUSED", flag)
        am.zero_grad(set_to_none=True)
        y = output_of(am(**x, adapter_names=names))
        (y ** 2).mean().backward()
        return y.detach(), {(n, k): p.grad.clone() for n in am.recipes for k, p in am.adapter_parameters(n).items()
                            if p.grad is not None}

    seen.clear()
    out, grads = run("1")
    assert not seen, "a call that records gradients does not use the shared stacks"
    ref_out, ref_grads = run("0")
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and {n for n, _ in grads} == set(am.recipes)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=str(k))


def test_compiled_model_traces_once_for_any_mix(monkeypatch) -> None:
    """With shared stacks nothing a layer reads depends on the mix: one graph for every mix (fullgraph), the same
    outputs as the reference path — also after an in-place weight change, which the stacks take in place."""
    from torch._dynamo.testing import CompileCounter

    am = _model()
    x = inputs(batch=4, seq=5)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            references = [_reference(am, monkeypatch, x, names) for names in MIXES]
            am.prepare_routing()
            counter = CompileCounter()
            am.model.forward = torch.compile(am.model.forward, backend=counter, fullgraph=True)
            for names, reference in zip(MIXES, references):
                torch.testing.assert_close(output_of(am(**x, adapter_names=names)), reference, rtol=1e-5,
                                           atol=1e-6, msg=str(names))
            assert counter.frame_count == 1
            for p in am.adapter_parameters("c").values():
                p.mul_(-2.0)
            changed = output_of(am(**x, adapter_names=MIXES[1]))
            assert counter.frame_count == 1
            reference = _reference(am, monkeypatch, x, MIXES[1])
        torch.testing.assert_close(changed, reference, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(changed[0], references[1][0])
    finally:
        torch._dynamo.reset()


def _greedy(tokens: int, **extra):
    """A model, prompts (4 rows × 5 tokens) and greedy generate() arguments for exactly `tokens` new tokens."""
    am = _model()
    ids = inputs(batch=4, seq=5)["input_ids"]
    return am, ids, dict(attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=False, pad_token_id=0, **extra)


def _static_generate(am, ids, names, **kw):
    cc = CompileConfig(backend="eager", fullgraph=True)
    cc._compile_all_devices = True  # (transformers compiles CPU models' decoding steps only when told to)
    return am.generate(input_ids=ids, adapter_names=names, cache_implementation="static", compile_config=cc, **kw)


def test_static_cache_generate_prepares_the_stacks_and_compiles_once() -> None:
    """transformers compiles a static-cache generate's decoding step; `generate` prepares the shared stacks itself,
    so three mixes share one graph, and each gives the tokens of an eager dynamic-cache routed generate."""
    from torch._dynamo.utils import counters

    am, ids, kw = _greedy(6)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            references = [am.generate(input_ids=ids, adapter_names=names, **kw) for names in MIXES]
            assert am.__dict__.get("_shared") is None
            counters.clear()
            for names, reference in zip(MIXES, references):
                assert torch.equal(_static_generate(am, ids, names, **kw), reference), names
                assert am.__dict__["_shared"] is not None
            assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    assert len({tuple(r[:, 5:].flatten().tolist()) for r in references}) == 3, "the mixes decode differently"


def test_static_cache_generate_outside_no_grad_compiles_once() -> None:
    """A plain generate() call (gradients on until transformers turns them off inside) still hands the layers their
    slots: one graph for every mix."""
    from torch._dynamo.utils import counters

    am, ids, kw = _greedy(3)
    torch._dynamo.reset()
    try:
        counters.clear()
        for names in MIXES[:2]:
            _static_generate(am, ids, names, **kw)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("expand", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)])
def test_expanded_rows_find_their_slots(expand: dict, monkeypatch) -> None:
    """Beam search and num_return_sequences expand each row after the routing is set: the shared stacks repeat each
    row's slot and give the per-routing path's (and the reference path's) sequences."""
    am, ids, kw = _greedy(4, adapter_names=MIXES[0], **expand)
    with torch.no_grad():
        monkeypatch.setenv("UNIPEFT_FUSED", "0")
        reference = am.generate(input_ids=ids, **kw)
        monkeypatch.setenv("UNIPEFT_FUSED", "1")
        per_routing = am.generate(input_ids=ids, **kw)
        am.prepare_routing()
        sizes = []
        real = routed.shared_lora

        def spy(layer, x, slots):
            out = real(layer, x, slots)
            sizes.append((x.shape[0], slots.shape[0], out is not None))
            return out
        monkeypatch.setattr(routed, "shared_lora", spy)
        shared = am.generate(input_ids=ids, **kw)
    assert sizes and set(sizes) == {(8, 4, True)}, "every call had 2 rows per routed row, all on the stacks"
    assert shared.shape[0] == 4 * expand.get("num_return_sequences", 1)
    assert torch.equal(shared, per_routing) and torch.equal(shared, reference)


def test_static_cache_detection() -> None:
    model = tiny_model("llama")
    assert routed.static_cache(model, {"cache_implementation": "static"})
    assert not routed.static_cache(model, {})
    assert not routed.static_cache(model, {"cache_implementation": None})
    assert not routed.static_cache(model, {"cache_implementation": "dynamic"})
    assert routed.static_cache(model, {"generation_config": GenerationConfig(cache_implementation="static")})
    assert routed.static_cache(model, {"past_key_values": StaticCache(config=model.config, max_cache_len=16)})
    assert routed.static_cache(model, {"cache": StaticCache(config=model.config, max_cache_len=16)})
    assert not routed.static_cache(model, {"cache": DynamicCache(config=model.config)})
    assert not routed.static_cache(model, {"past_key_values": DynamicCache(config=model.config)})
    model.generation_config.cache_implementation = "static"
    assert routed.static_cache(model, {})
    assert not routed.static_cache(model, {"cache_implementation": "dynamic"})


def test_plain_calls_and_copies_do_not_read_another_calls_slots(monkeypatch) -> None:
    """A call without `adapter_names` after a routed one runs the active adapter on every row; a deep copy of a
    prepared model does not read the original's slots (it routes through the per-routing path until its own
    prepare_routing) and neither changes the other's results."""
    import copy

    am = _model()
    x = inputs(batch=4, seq=5)
    with torch.no_grad():
        plain_reference = output_of(am(**x))
        routed_reference = _reference(am, monkeypatch, x, MIXES[0])
        am.prepare_routing()
        seen = _spy(monkeypatch)
        torch.testing.assert_close(output_of(am(**x, adapter_names=MIXES[0])), routed_reference, rtol=1e-5,
                                   atol=1e-6)
        seen.clear()
        torch.testing.assert_close(output_of(am(**x)), plain_reference, rtol=1e-5, atol=1e-6)
        assert not seen
        twin = copy.deepcopy(am)
        torch.testing.assert_close(output_of(twin(**x, adapter_names=MIXES[1])),
                                   _reference(am, monkeypatch, x, MIXES[1]), rtol=1e-5, atol=1e-6)
        assert not seen, "the copy has no stacks of its own yet"
        assert twin.prepare_routing() == len(twin._wrappers)
        for p in twin.adapter_parameters("b").values():
            p.mul_(-3.0)  # the copy's weights only
        twin_out = output_of(twin(**x, adapter_names=MIXES[0]))
        assert {id(layer) for layer, took in seen if took} == {id(w) for w in twin._wrappers.values()}
        torch.testing.assert_close(twin_out, _reference(twin, monkeypatch, x, MIXES[0]), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(twin_out[0], routed_reference[0])
        torch.testing.assert_close(output_of(am(**x, adapter_names=MIXES[0])), routed_reference, rtol=1e-5,
                                   atol=1e-6)


def test_stacks_follow_the_model_to_another_dtype(monkeypatch) -> None:
    """`am.to(...)` after prepare_routing() changes no version counter; the next routed call rebuilds the stacks in
    the new dtype (and on the new device) instead of mixing them with the moved weights."""
    am = _model()
    am.prepare_routing()
    am.to(torch.float64)
    x = inputs(batch=4, seq=3)
    with torch.no_grad():
        got = output_of(am(**x, adapter_names=MIXES[0]))
        want = _reference(am, monkeypatch, x, MIXES[0])
    for w in am._wrappers.values():
        if routed.SHARED in w.__dict__:
            assert _stacks(w)[0].dtype == torch.float64
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_new_adapters_take_the_models_mode() -> None:
    """Attached to a model in eval mode, the new adapters are in eval mode too (no dropout; the shared stacks serve
    them); attached to a training model, they train."""
    am = unipeft.attach(tiny_model("llama").eval(), "lora", r=4, dropout=0.1)
    assert not any(m.training for m in am.modules())
    am.train()
    am.add("b", "lora", r=4, dropout=0.1)
    assert all(m.training for w in am._wrappers.values() for m in w.modules())


def test_compiled_per_routing_path_with_a_dynamic_cache(monkeypatch) -> None:
    """Without shared stacks a compiled routed call still traces without a break: its caches (which compare
    version counters, something a tracer cannot read) are skipped while compiling — the routing's row indices too:
    a tensor the graph made and a cache kept would outlive the call, which CUDA graphs (a static-cache generate's
    compiled decoding) overwrite at the next replay."""
    am = _model()
    x = inputs(batch=4, seq=3)
    with torch.no_grad():
        want = _reference(am, monkeypatch, x, MIXES[0])
    torch._dynamo.reset()
    try:
        forward = am.model.forward
        am.model.forward = torch.compile(forward, backend="eager", fullgraph=True)
        with torch.no_grad():
            got = output_of(am(**x, adapter_names=MIXES[0]))
    finally:
        am.model.forward = forward
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    routings = {id(w.routing): w.routing for w in am._wrappers.values()}
    assert len(routings) == 1 and not next(iter(routings.values()))._cache


def test_the_slots_table_is_keyed_by_the_plain_int_each_layer_holds() -> None:
    """Layers hold their model's key as a plain int and look their slots up with it; the table's keys are plain
    ints too. (torch 2.11's dynamo did not match that int against a key of the int subclass RouteKey: the traced
    lookup gave None and a static-cache generate's compiled decoding ran the per-routing path, on the GPU.)"""
    am = _model()
    am.prepare_routing()
    key = am._route_key
    assert type(key) is routed.RouteKey
    assert int(key) in routed.CURRENT and all(type(k) is int for k in routed.CURRENT)
    assert {w.route for w in am._wrappers.values()} == {int(key)}
    assert all(type(w.route) is int for w in am._wrappers.values())


def test_routings_cache_row_indices_outside_a_trace() -> None:
    """Eager calls keep the row indices they built (one build per call for every layer)."""
    from unipeft.layer import Routing

    routing = Routing(["a", BASE, "a", "b"])
    first = routing.row_index(("a", "b"), 4, torch.device("cpu"))
    assert routing.row_index(("a", "b"), 4, torch.device("cpu")) is first
    assert first.tolist() == [0, 2, 0, 1]
    assert routing.rows("a", 8, torch.device("cpu")).tolist() == [0, 1, 4, 5]
    assert routing.rows("a", 8, torch.device("cpu")) is routing.rows("a", 8, torch.device("cpu"))
    assert routing.rows("c", 4, torch.device("cpu")) is None


def test_stacks_built_under_inference_mode_refresh_outside_it(monkeypatch) -> None:
    """Stacks first built inside torch.inference_mode() (an evaluation loop) are ordinary tensors: an optimizer-like
    in-place change afterwards is copied into them by the next routed call outside inference mode."""
    am = _model()
    x = inputs(batch=4, seq=3)
    with torch.inference_mode():
        am.prepare_routing()
        am(**x, adapter_names=MIXES[0])
    with torch.no_grad():
        for p in am.adapter_parameters("b").values():
            p.mul_(-2.0)
        got = output_of(am(**x, adapter_names=MIXES[0]))
        want = _reference(am, monkeypatch, x, MIXES[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_call_that_bypasses_the_handle_sees_changed_weights(monkeypatch) -> None:
    """The slots are published only while an AdaptedModel call runs: a later direct call of the wrapped model (the
    routing still on its layers) goes through the per-routing path, which checks the weights' versions, so an
    in-place change in between is seen."""
    am = _model()
    am.prepare_routing()
    x = inputs(batch=4, seq=3)
    with torch.no_grad():
        am(**x, adapter_names=MIXES[0])
        assert routed.CURRENT[am._route_key] is None
        for p in am.adapter_parameters("b").values():
            p.mul_(-3.0)
        got = output_of(am.model(**x))  # (the routing set by the last call stays on the layers)
        want = _reference(am, monkeypatch, x, MIXES[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_disabling_frees_the_stacks_and_the_gathered_rows() -> None:
    am = _model()
    am.prepare_routing()
    with torch.no_grad():
        am(**inputs(batch=4, seq=3), adapter_names=MIXES[0])
    assert any(routed.ROWS in w.__dict__ for w in am._wrappers.values())
    am.prepare_routing(False)
    for w in am._wrappers.values():
        assert routed.SHARED not in w.__dict__ and routed.ROWS not in w.__dict__ and w.route is None
    assert am.__dict__["_shared_watch"] is None


def test_an_unpickled_copy_does_not_read_the_originals_slots() -> None:
    """The wrapped model saved with torch.save (pickle) and loaded again keeps no routing key on its layers: its calls
    run its active adapter, whatever the original publishes (keys also restart in every process)."""
    import io

    am = _model()
    am.prepare_routing()
    buffer = io.BytesIO()
    torch.save(am.model, buffer)
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)  # (the test's own object; never done with outside files)
    layers = [m for m in copy.modules() if hasattr(m, "route")]
    assert layers and all(m.route is None for m in layers)
    x = inputs(batch=4, seq=3)
    with torch.no_grad():
        want = output_of(copy(**x))
        routed.CURRENT[am._route_key] = torch.tensor([1, 2, 0, 3])  # as if the original were mid-call
        try:
            got = output_of(copy(**x))
        finally:
            routed.CURRENT[am._route_key] = None
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_layers_guard_no_shared_routing_object(caplog) -> None:
    """The slot tensor is read from one table, not from each layer: the compiled call has no identity guard between
    layers' routing state (dynamo evaluates those in Python at every call, one per layer). Read from dynamo's guard
    log; the log must show lambda guards at all (transformers' shared config makes some), or the check is void."""
    import logging

    am = _model()
    am.prepare_routing()
    x = inputs(batch=4, seq=3)
    torch._dynamo.reset()
    torch._logging.set_logs(guards=True)
    forward = am.model.forward
    try:
        am.model.forward = torch.compile(forward, backend="eager", fullgraph=True)
        with caplog.at_level(logging.DEBUG), torch.no_grad():
            am(**x, adapter_names=MIXES[0])
    finally:
        am.model.forward = forward
        torch._logging.set_logs()
        torch._dynamo.reset()
    lambdas = [r.getMessage() for r in caplog.records if "LAMBDA_GUARD" in r.getMessage()]
    text = "\n".join(lambdas)
    assert "LAMBDA_GUARD" in text, "no guard log captured"
    lines = [ln for ln in text.splitlines() if "LAMBDA_GUARD" in ln]
    shared = [ln for ln in lines if any(f".{a} is " in ln for a in ("routing", "route", "slots"))]
    assert not shared, shared[:3]


def test_graphed_decoding_is_a_static_cache_compiled_into_cuda_graphs() -> None:
    """Two streams per projection only where the decoding steps replay CUDA graphs: a static cache with
    transformers' default compile config ("reduce-overhead"), "max-autotune", Inductor's graphs asked for in the
    options instead of a mode, or the "cudagraphs" backend; not a dynamic cache, compilation disabled, a mode
    without graphs, no mode and no graphs in the options, or another backend."""
    model = tiny_model("llama")
    static = {"cache_implementation": "static"}

    def graphed(**config) -> bool:
        return routed.graphed_decoding(model, {**static, "compile_config": CompileConfig(**config)})
    assert routed.graphed_decoding(model, static)
    assert routed.graphed_decoding(model, {"cache": StaticCache(config=model.config, max_cache_len=16)})
    assert not routed.graphed_decoding(model, {})
    assert not routed.graphed_decoding(model, {**static, "disable_compile": True})
    assert graphed() and graphed(mode="max-autotune") and graphed(backend="cudagraphs", mode=None)
    assert graphed(mode=None, options={"triton.cudagraphs": True})
    assert not graphed(mode="default") and not graphed(mode="max-autotune-no-cudagraphs")
    assert not graphed(mode=None, options={"max_autotune": True}) and not graphed(backend="eager")


def test_graphed_flag_is_published_for_generate_calls_only_and_reset_after(monkeypatch) -> None:
    """hand_over publishes GRAPHED for a generate call with shared stacks (as the layers see it during the call) and
    sets it back when the call returns; a plain forward call never sets it."""
    am = unipeft.attach(tiny_model("llama").eval(), "lora", r=4)
    am.add("b", "lora", r=4)
    am.eval()
    assert am.prepare_routing() == len(am._wrappers)
    key = int(am.__dict__["_route_key"])
    seen = []
    real = routed.shared_lora
    monkeypatch.setattr(routed, "shared_lora", lambda layer, x, slots: seen.append(routed.GRAPHED[key])
                        or real(layer, x, slots))
    ids = inputs(batch=2, seq=4)["input_ids"]
    monkeypatch.setattr(routed, "graphed_decoding", lambda model, kwargs: True)  # (as a static-cache generate)
    with torch.no_grad():
        am(input_ids=ids, adapter_names=["b", "default"])
        assert seen and not any(seen), "a plain call is no graphed decode"
        seen.clear()
        am.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                    pad_token_id=0, adapter_names=["b", "default"])
    assert seen and all(seen)
    assert routed.GRAPHED[key] is False and routed.CURRENT[key] is None


def test_side_by_side_is_the_gemm_plus_the_delta_and_leaves_autocast_alone(monkeypatch) -> None:
    """`side_by_side` (a graphed decode's projection) returns x·Wᵀ + Δ from the shared stacks; it declines — the
    one-stream path runs instead — under autocast (the op's GEMM would not follow it) and with UNIPEFT_STREAMS=0."""
    am = unipeft.attach(tiny_model("llama").eval(), "lora", r=4)
    am.add("b", "lora", r=4)
    randomize(am, "b", seed=3, std=0.3)
    am.eval()
    assert am.prepare_routing() == len(am._wrappers)
    layer = next(iter(am._wrappers.values()))
    monkeypatch.setattr(routed.routed_kernels, "routed_available", lambda x, a=None: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # (the op's CPU reference)
    a_stack, b_stack = layer.__dict__[routed.SHARED][2:4]
    x = torch.randn(3, 1, a_stack.shape[2])
    rows = torch.tensor([1, 0, 2])  # b, default, the base's zero slot
    w = layer.base_layer.weight
    want = x @ w.T + torch.einsum("btr,bor->bto", torch.einsum("bti,bri->btr", x, a_stack[rows]), b_stack[rows])
    with torch.no_grad():
        torch.testing.assert_close(routed.side_by_side(layer, x, a_stack, b_stack, rows), want, rtol=1e-5,
                                   atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert routed.side_by_side(layer, x, a_stack, b_stack, rows) is None
        monkeypatch.setenv("UNIPEFT_STREAMS", "0")
        assert routed.side_by_side(layer, x, a_stack, b_stack, rows) is None


def test_routed_calls_rewrite_one_slot_tensor_per_row_count(monkeypatch) -> None:
    """Every routed call of a model with shared stacks hands its layers the same slot tensor for the same number of
    rows, its values rewritten in place and its address marked static: a compiled call reads the slots as a static
    input, and Inductor's CUDA-graph trees record a graph again whenever a static input moves (on the GPU a fresh
    tensor per call re-recorded a static-cache generate's first decoding step at every generate, keeping every
    graph: bench/results/churn_1_reasons.json). (That the eager rows gathered for one call are not reused by the
    next, the same tensor with new values, test_shared_stacks_give_the_reference_outputs checks.)"""
    am = _model()
    assert am.prepare_routing() == len(am._wrappers)
    first: list[tuple[torch.Tensor, list[int]]] = []
    real = routed.shared_lora

    def spy(layer, x, slots):
        if not first or first[-1][0] is not slots or first[-1][1] != slots.tolist():
            first.append((slots, slots.tolist()))
        return real(layer, x, slots)

    monkeypatch.setattr(routed, "shared_lora", spy)
    order = am.__dict__["_shared"]
    with torch.no_grad():
        for names in MIXES:
            am(**inputs(batch=4, seq=5), adapter_names=names)
        am(**inputs(batch=2, seq=5), adapter_names=["c", BASE])
    assert [values for _, values in first] == [[order.get(n, len(order)) for n in names]
                                               for names in (*MIXES, ["c", BASE])]
    assert len({id(t) for t, _ in first[:len(MIXES)]}) == 1, "one tensor for every call of 4 rows"
    assert first[-1][0] is not first[0][0] and first[-1][0].shape == (2,)
    assert all(hasattr(t, "_dynamo_static_input_type") for t, _ in first), "marked static for CUDA-graph trees"


def test_a_routed_call_checks_and_refreshes_only_the_adapters_it_names(monkeypatch) -> None:
    """The freshness check before a routed call covers the adapters the call names, not every adapter the model
    holds (its cost, paid before the call's first kernel, follows the mix). An adapter changed in place keeps its
    old slot contents through calls that do not name it, and the first call that names it refreshes them."""
    am = _model()
    x = inputs(batch=4, seq=5)
    assert am.prepare_routing() == len(am._wrappers)
    per = {n: len(am.__dict__["_shared_watch"][n][1]) for n in am.recipes}
    assert all(per.values())
    checked: list[int] = []
    real = routed._fresh
    monkeypatch.setattr(routed, "_fresh", lambda snap: checked.append(len(snap[1])) or real(snap))
    layer = next(w for w in am._wrappers.values() if any(True for _ in w.sites_of("default")))
    (sa,) = layer.sites_of("default")
    slot = am.__dict__["_shared"]["default"]
    b_stack = _stacks(layer)[1]
    with torch.no_grad():
        am(**x, adapter_names=["b", BASE, "b", "c"])
        assert sorted(checked) == sorted([per["b"], per["c"]])
        sa.fn.up.weight.mul_(2)  # in place: a version counter moves
        before = b_stack[slot].clone()
        am(**x, adapter_names=["b", "c", BASE, "b"])
        assert torch.equal(b_stack[slot], before), "not named: not refreshed"
        names = ["default", "b", BASE, "c"]
        out = output_of(am(**x, adapter_names=names))
        r = sa.fn.down.weight.shape[0]
        torch.testing.assert_close(b_stack[slot, :, :r], sa.fn.up.weight * float(sa.s), rtol=0, atol=0)
        fills: list[object] = []
        real_fill = routed._fill
        monkeypatch.setattr(routed, "_fill", lambda cached, only=None: fills.append(only) or real_fill(cached, only))
        am(**x, adapter_names=names)
        assert not fills, "refreshed once, then seen as fresh"
        reference = _reference(am, monkeypatch, x, names)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_a_compiled_call_takes_the_flat_buffers_not_two_stacks_per_layer(monkeypatch) -> None:
    """Every layer's shared stacks are views into one flat A buffer and one flat s·B buffer per model (routed.FLAT),
    each starting at a multiple of routed._ALIGN elements, none overlapping; a compiled call takes those two
    buffers as its inputs and slices the views inside the graph. Each input a compiled call takes costs host time
    at every call (up to ~3 µs on the H200 machine: two stacks per projection were up to ~0.65 ms of a static
    decoding step, bench/results/decode_9_split.json)."""
    am = _model()
    x = inputs(batch=4, seq=5)
    with torch.no_grad():
        reference = _reference(am, monkeypatch, x, MIXES[0])
    count = am.prepare_routing()
    flats = routed.FLAT[int(am._route_key)]
    assert len(flats) == 1 and count == len(am._wrappers)
    spans = {0: [], 1: []}
    for w in am._wrappers.values():
        for k, stack in enumerate(_stacks(w)):
            assert stack.untyped_storage().data_ptr() == flats[0][k].untyped_storage().data_ptr()
            assert stack.storage_offset() % routed._ALIGN == 0
            spans[k].append((stack.storage_offset(), stack.storage_offset() + stack.numel()))
    for k in spans:
        ordered = sorted(spans[k])
        assert all(end <= start for (_, end), (start, _) in zip(ordered, ordered[1:])), "stacks overlap"
    taken: list[list] = []

    def backend(gm, example_inputs):
        taken.append(list(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            am.model.forward = torch.compile(am.model.forward, backend=backend, fullgraph=True)
            got = output_of(am(**x, adapter_names=MIXES[0]))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    tensors = [t for t in taken[0] if isinstance(t, torch.Tensor)]
    assert sum(any(t is f for f in flats[0]) for t in tensors) == 2
    slots_n = len(am.recipes) + 1
    assert not [t.shape for t in tensors if t.dim() == 3 and t.shape[0] == slots_n], "a per-layer stack as input"


def test_a_kept_static_cache_decodes_as_a_fresh_one() -> None:
    """The recipe docs/api.md gives for repeated static-cache generates: one StaticCache kept by the caller, reset
    before each call and passed instead of `cache_implementation="static"` (transformers builds a fresh cache at
    every such generate, and its new addresses make CUDA-graph trees record a decoding step again:
    bench/results/reuse_1.json). The kept cache alone prepares the shared stacks, its decoding steps compile once
    for every mix, and every call gives the tokens of a fresh-cache generate, call after call and mix after mix."""
    import inspect

    from torch._dynamo.utils import counters

    am, ids, kw = _greedy(4)
    cc = CompileConfig(backend="eager", fullgraph=True)
    cc._compile_all_devices = True  # (as _static_generate: CPU decoding steps compile only when told to)
    word = "cache" if "cache" in inspect.signature(am.model.forward).parameters else "past_key_values"
    cache = StaticCache(config=am.model.config, max_cache_len=ids.shape[1] + 4)
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad():
            kept = {}
            for names in MIXES:
                for _ in range(2):
                    cache.reset()
                    out = am.generate(input_ids=ids, adapter_names=names, compile_config=cc, **{word: cache}, **kw)
                    assert torch.equal(out, kept.setdefault(str(names), out)), names
            assert am.__dict__["_shared"] is not None
            assert counters["stats"]["unique_graphs"] == 1
            for names in MIXES:
                assert torch.equal(_static_generate(am, ids, names, **kw), kept[str(names)]), names
    finally:
        torch._dynamo.reset()
    assert len(set(map(str, kept.values()))) == 3, "the mixes decode differently"


def test_flat_buffers_are_kept_while_the_layout_holds_and_freed_when_adapters_change(monkeypatch) -> None:
    """Preparing again with the same adapters keeps the buffers (a CUDA graph recorded their addresses); adding an
    adapter frees them at once — every layer's views and the buffers, so no stacked copy of the old adapters stays
    on the device — and the next routed call builds new ones that give the reference outputs."""
    am = _model()
    am.prepare_routing()
    key = int(am._route_key)
    first = routed.FLAT[key]
    ptrs = [t.data_ptr() for t in first[0]]
    am.prepare_routing()
    assert routed.FLAT[key] is first and [t.data_ptr() for t in routed.FLAT[key][0]] == ptrs
    am.add("d", "lora", r=3)
    randomize(am, "d", seed=9, std=0.3)
    am.eval()
    assert routed.FLAT[key] is None and _shared_layers(am) == set()
    names = ["d", "b", BASE, "c"]
    x = inputs(batch=4, seq=5)
    with torch.no_grad():
        got = output_of(am(**x, adapter_names=names))
        want = _reference(am, monkeypatch, x, names)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert routed.FLAT[key] is not None and routed.FLAT[key][0][0].numel() > first[0][0].numel()
    _check_layout(am)


def test_a_lower_rank_in_a_slot_leaves_zero_padding(monkeypatch) -> None:
    """An adapter whose rank drops below the stack's (its Parameters replaced by smaller ones, the stack's rank set
    by another adapter) is refilled with zeros past its rank: the stacks are reused in place, and the old rows
    must not leak into the new adapter's delta."""
    am = _model()
    x = inputs(batch=4, seq=5)
    with torch.no_grad():
        am(**x, adapter_names=MIXES[0])  # (a static-cache generate or any routed call prepares the stacks)
        am.prepare_routing()
        am(**x, adapter_names=MIXES[0])
        for sa in (sa for w in am._wrappers.values() for sa in w.sites_of("c")):
            down, up = sa.fn.down, sa.fn.up
            down.weight = torch.nn.Parameter(down.weight[:1].clone())  # rank 2 -> 1; the stacks keep rank 6
            up.weight = torch.nn.Parameter(up.weight[:, :1].clone())
        got = output_of(am(**x, adapter_names=MIXES[1]))
        want = _reference(am, monkeypatch, x, MIXES[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
