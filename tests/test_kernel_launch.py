"""launching._launcher: a compiled Triton kernel's C launch function called directly passes what Triton's own runner
and launcher pass (checked against the installed Triton's code, with a recorder in place of the C call) — minus the
launch metadata and hook chains, which are None while no hook is registered — and anything that would make them
differ (another argument layout, scratch memory, a registered launch hook) keeps Triton's own path. CPU only: the
objects are Triton's real classes without a GPU behind them."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton")
import triton.compiler.compiler as triton_compiler  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.nvidia.driver import CudaLauncher  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402

from unipeft import launching  # noqa: E402

STREAM = 77
HEAD = 10  # grid (3), stream, function, cooperative, pdl, two scratch buffers, packed metadata


def _compiled(record: list, launcher_cls=CudaLauncher, scratch: int = 0) -> CompiledKernel:
    run = launcher_cls.__new__(launcher_cls)
    run.__dict__.update(launch=lambda *a: record.append(a), num_ctas=1, global_scratch_size=scratch,
                        global_scratch_align=1, profile_scratch_size=0, profile_scratch_align=1,
                        launch_cooperative_grid=False, launch_pdl=False)
    ck = CompiledKernel.__new__(CompiledKernel)
    ck.__dict__.update(_run=run, module=object(), function=0xF00, packed_metadata=(4, 1, 1, 0), name="k", src=None)
    return ck


def _args():
    return (torch.zeros(3), torch.ones(2), 5, 2.0, 64, True)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x is y or (type(x) is type(y) and x == y) for x, y in zip(a, b))


def test_direct_launch_passes_what_tritons_path_passes():
    grid, args = (4, 2, 1), _args()
    seen: list = []
    launch = launching._launcher(_compiled(seen), grid, args, stream_of=lambda device: STREAM)
    assert launch.__name__ == "direct"
    for g, a in ((grid, args), ((7, 1, 1), (torch.zeros(5), torch.ones(1), 9, 0.5, 16, False))):
        launch(g, a)
        got = seen.pop()
        want: list = []
        _compiled(want)[g](*a, stream=STREAM)  # Triton's own runner and launcher
        want = want.pop()
        assert _same(got[:HEAD], want[:HEAD]) and _same(got[HEAD + 3:], want[HEAD + 3:])
        assert got[HEAD:HEAD + 3] == (None, None, None)  # no metadata, no hooks: nothing is registered
        assert want[HEAD + 1] is knobs.runtime.launch_enter_hook and launching._idle(want[HEAD + 1])


class _ReorderedLauncher(CudaLauncher):
    """A launcher whose layout differs (as another Triton version's might): the direct call would be wrong."""

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_pdl, self.launch_cooperative_grid, None,
                    *args)


def test_unknown_layouts_and_scratch_keep_tritons_path():
    grid, args = (2, 1, 1), _args()
    for ck in (_compiled([], _ReorderedLauncher), _compiled([], scratch=128)):
        assert launching._launcher(ck, grid, args, stream_of=lambda d: STREAM).__name__ == "<lambda>"
    broken = _compiled([])
    del broken.__dict__["_run"].__dict__["launch_pdl"]
    assert launching._launcher(broken, grid, args, stream_of=lambda d: STREAM).__name__ == "<lambda>"


def test_a_registered_hook_sends_launches_through_triton(monkeypatch):
    grid, args = (2, 1, 1), _args()
    seen: list = []
    launch = launching._launcher(_compiled(seen), grid, args, stream_of=lambda d: STREAM)
    fake_driver = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: STREAM)
    monkeypatch.setattr(triton_compiler, "driver", types.SimpleNamespace(active=fake_driver))
    hook = lambda meta: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert not launching._idle(knobs.runtime.launch_enter_hook)
        launch(grid, args)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    got = seen.pop()
    assert got[HEAD + 1] is knobs.runtime.launch_enter_hook and got[HEAD] is not None  # Triton's metadata and hooks
    launch(grid, args)
    assert seen.pop()[HEAD:HEAD + 3] == (None, None, None)  # hook removed: direct again
