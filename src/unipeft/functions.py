"""The functions f of Δh = f(x_src · W_down) · W_up, and the composition that puts Δh into h.

Each function is a tiny `nn.Module` whose docstring carries its formula; `SiteAdapter` pairs one function with one
recipe part at one binding (a module and a role there) and implements the composition:

    add        h' = h + Δh
    scaled     h' = h + s·Δh                    (s = α/r, α/√r, a number; learn_scale makes s a parameter)
    gated      h' = h + σ(x_src·w_g + b_g)·Δh    (a learned per-token sigmoid gate, UniPELT)
    multiply   h' = h ⊙ v                        (IA3; on a projection input: x' = x ⊙ v)
    DoRA       h' = m/‖W + s·BA‖ ⊙ (x·(W + s·BA)ᵀ) + b   (row norms, detached as in the paper, §4.3)

Prefix keys/values and prompt tokens are composed elsewhere (prefix.py, model.py): their "composition" happens inside
attention (softmax mass) and in the input sequence (concat).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import quant
from .arch import Binding, linear_dims
from .errors import UnipeftError
from .recipe import Part

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _init_down_up(down: nn.Linear, up: nn.Linear, init: str) -> None:
    """lora: Kaiming-uniform down (nn.Linear's default), zero up. bert: N(0, 0.02) both. near_identity: N(0, 1e-3)
    down, zero up — an identity map at init that still receives gradients through up. Biases start at zero."""
    if init == "lora":
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)
    elif init == "bert":
        nn.init.normal_(down.weight, std=0.02)
        nn.init.normal_(up.weight, std=0.02)
    elif init == "near_identity":
        nn.init.normal_(down.weight, std=1e-3)
        nn.init.zeros_(up.weight)
    for lin in (down, up):
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)


class LowRank(nn.Module):
    """f(x) = x·Aᵀ·Bᵀ with A = down.weight (r × d_in), B = up.weight (d_out × r); ΔW = B·A (d_out × d_in)."""

    def __init__(self, d_in: int, d_out: int, r: int, init: str) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, r, bias=False)
        self.up = nn.Linear(r, d_out, bias=False)
        _init_down_up(self.down, self.up, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def delta_weight(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight


class Bottleneck(nn.Module):
    """f(x) = act(LN(x)·W_downᵀ + b_down)·W_upᵀ + b_up  (LN only with layer_norm: true)."""

    def __init__(self, d_in: int, d_out: int, r: int, activation: str, layer_norm: bool, init: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in) if layer_norm else nn.Identity()
        self.down = nn.Linear(d_in, r)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(r, d_out)
        _init_down_up(self.down, self.up, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(self.norm(x))))


class Vector(nn.Module):
    """v ∈ R^d, used as h ⊙ v (IA3). Ones at init: the model is unchanged."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self) -> torch.Tensor:
        return self.scale


class Prefix(nn.Module):
    """l learned key and value vectors per KV head: P ∈ R^{2 × l × n_kv·d_head}.

    With reparam_hidden = h (Li & Liang), P = MLP(E) = tanh(E·W₁ᵀ + b₁)·W₂ᵀ + b₂ with E ∈ R^{l × d_model}: a smoother
    optimisation; `kv()` is what attention sees either way. GQA models get n_kv (not n_heads) heads.
    """

    def __init__(self, length: int, n_kv: int, head_dim: int, d_model: int, reparam_hidden: int | None) -> None:
        super().__init__()
        self.length, self.n_kv, self.head_dim = length, n_kv, head_dim
        width = n_kv * head_dim
        if reparam_hidden:
            self.embedding = nn.Parameter(torch.randn(length, d_model) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(d_model, reparam_hidden), nn.Tanh(),
                                     nn.Linear(reparam_hidden, 2 * width))
            for lin in (self.mlp[0], self.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        else:
            self.prefix = nn.Parameter(torch.randn(2, length, width) * 0.02)

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, each (n_kv, l, d_head)."""
        if hasattr(self, "mlp"):
            flat = self.mlp(self.embedding).view(self.length, 2, -1).transpose(0, 1)
        else:
            flat = self.prefix
        kv = flat.view(2, self.length, self.n_kv, self.head_dim).permute(0, 2, 1, 3)
        return kv[0], kv[1]


class Tokens(nn.Module):
    """l learned input embeddings placed before the input sequence (prompt tuning)."""

    def __init__(self, length: int, d_model: int, init: str, vocab: torch.Tensor | None) -> None:
        super().__init__()
        if init == "vocab" and vocab is not None:
            ids = torch.randint(0, vocab.shape[0], (length,))
            self.weight = nn.Parameter(vocab[ids].detach().clone().float())
        else:
            self.weight = nn.Parameter(torch.randn(length, d_model) * 0.02)

    def forward(self) -> torch.Tensor:
        return self.weight


# ---- the base weight as a (d_out × d_in) matrix, whatever layer holds it --------------------------------------------
def base_weight(base: nn.Module) -> torch.Tensor:
    """The frozen weight as (d_out × d_in): nn.Linear stores it so; transformers' Conv1D stores (d_in × d_out).
    The returned tensor is a view: in-place changes reach the module (merge relies on this) — except for a quantized
    base, whose dequantized weight is a fresh float32 tensor (merging there goes through quant.py)."""
    if quant.is_quantized(base):
        return quant.dequantized_weight(base)
    w = base.weight
    return w.data if isinstance(base, nn.Linear) else w.data.t()


def base_bias(base: nn.Module) -> torch.Tensor | None:
    b = getattr(base, "bias", None)
    return None if b is None else b.data


class SiteAdapter(nn.Module):
    """One recipe part at one binding: the function, its composition knobs, and the binding it acts on."""

    def __init__(self, part: Part, binding: Binding, base: nn.Module, *, hidden: int | None = None,
                 prefix_shape: tuple[int, int] | None = None, vocab: torch.Tensor | None = None) -> None:
        super().__init__()
        self.part_name, self.role, self.site = part.name, binding.role, binding.site
        self.function, self.composition, self.insertion = part.function, part.composition, part.insertion
        self.chunk = binding.chunk
        self.block = binding.block
        self.s = part.scaling()
        init = part.resolved_init()
        ref = next(base.parameters(), None) if base is not None else None
        dtype = _DTYPES[part.dtype] if part.dtype else (ref.dtype if ref is not None and ref.is_floating_point()
                                                        else torch.float32)
        if base is not None and quant.is_quantized(base):
            if not part.dtype:
                dtype = quant.compute_dtype(base)  # a packed 4/8-bit weight says nothing about the compute dtype
        d_src = d_out = hidden or 0
        if binding.role in ("out", "in"):
            d_in, d_full = linear_dims(base)
            if self.chunk is not None:
                i, n = self.chunk
                if d_full % n:
                    raise UnipeftError(f"{binding.module}: output width {d_full} does not split into {n} chunks")
                self.span = (i * d_full // n, (i + 1) * d_full // n)
            else:
                self.span = (0, d_full)
            d_out = self.span[1] - self.span[0]
            d_src = d_in if (part.insertion == "parallel" or binding.role == "in") else d_out
            if binding.role == "in":
                d_out = d_in
        if part.function == "lowrank":
            self.fn = LowRank(d_src, d_out, part.r, init)
        elif part.function == "bottleneck":
            self.fn = Bottleneck(d_src, d_out, part.bottleneck_width(d_src), part.activation, part.layer_norm, init)
        elif part.function == "vector":
            self.fn = Vector(d_out)
        elif part.function == "prefix":
            n_kv, head_dim = prefix_shape
            self.fn = Prefix(part.length, n_kv, head_dim, hidden, part.reparam_hidden)
        else:
            self.fn = Tokens(part.length, hidden, init, vocab)
        self.dropout = nn.Dropout(part.dropout) if part.dropout > 0 else nn.Identity()
        if part.composition == "scaled" and part.learn_scale:
            self.learned_scale = nn.Parameter(torch.tensor(float(self.s)))
        if part.composition == "gated":
            # One sigmoid per token, from the sublayer input (prefix: the attention input).
            self.gate = nn.Linear(hidden if part.function == "prefix" else d_src, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        if part.magnitude:
            w = base_weight(base)[self.span[0]:self.span[1]].float()
            self.magnitude = nn.Parameter(w.norm(dim=1))
        # Adapters live where the frozen module lives, in the recipe's dtype (default: the base weight's dtype).
        self.to(device=ref.device if ref is not None else None, dtype=dtype)
        self._merge_undo: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The adapter's parameter dtype, read at call time so `am.to(torch.bfloat16)` after attach just works."""
        return next(self.parameters()).dtype

    # -- composition ---------------------------------------------------------------------------------------------------
    def scale(self) -> torch.Tensor | float:
        return self.learned_scale if hasattr(self, "learned_scale") else self.s

    def contribution(self, src: torch.Tensor) -> torch.Tensor:
        """The additive term: Δh, s·Δh or σ(gate(x_src))·Δh, in src's dtype."""
        x = self.dropout(src.to(self.dtype))
        delta = self.fn(x)
        if self.composition == "scaled":
            delta = delta * self.scale()
        elif self.composition == "gated":
            delta = delta * torch.sigmoid(self.gate(src.to(self.dtype)))
        return delta.to(src.dtype)

    def apply_out(self, h: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """Compose into a projection's output h (or its span, for a fused projection)."""
        a, b = self.span
        full = (a, b) == (0, h.shape[-1])
        hs = h if full else h[..., a:b]
        if self.function == "vector":
            new = hs * self.fn().to(h.dtype)
        elif hasattr(self, "magnitude"):
            new = hs + self._dora_delta(x, base_out[..., a:b] if not full else base_out, base)
        else:
            new = hs + self.contribution(x if self.insertion == "parallel" else hs)
        return new if full else torch.cat([h[..., :a], new, h[..., b:]], dim=-1)

    def _dora_delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """DoRA as a delta on the base output: (m/‖V‖ − 1)·(h − b) + (m/‖V‖)·s·x̃AᵀBᵀ, with V = W + s·BA."""
        a, b = self.span
        w = base_weight(base)[a:b].to(self.dtype)
        v = w + self.scale() * self.fn.delta_weight()
        g = (self.magnitude / v.norm(dim=1).detach()).to(x.dtype)
        bias = base_bias(base)
        no_bias = base_out if bias is None else base_out - bias[a:b].to(base_out.dtype)
        lora = self.fn(self.dropout(x.to(self.dtype))).to(x.dtype) * self.scale()
        return (g - 1) * no_bias + g * lora

    def input_factor(self) -> torch.Tensor:
        return self.fn()

    # -- merge ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        """Fold this site into the base weight (in place); remember what unmerge needs."""
        w, bias = base_weight(base), base_bias(base)
        if self.role == "in":
            w.mul_(self.fn().to(w.dtype)[None, :])
            return
        a, b = self.span
        if self.function == "vector":
            v = self.fn().to(w.dtype)
            w[a:b].mul_(v[:, None])
            if bias is not None:
                bias[a:b].mul_(v.to(bias.dtype))
            return
        ct = torch.promote_types(w.dtype, torch.float32)  # (at least fp32; an fp64 model merges in fp64)
        delta = float(self.scale()) * self.fn.delta_weight().to(ct)
        if hasattr(self, "magnitude"):
            v = w[a:b].to(ct) + delta
            norm = v.norm(dim=1)
            self._merge_undo = norm
            w[a:b].copy_((self.magnitude.to(ct) / norm)[:, None] * v)
        else:
            w[a:b].add_(delta.to(w.dtype))

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        w, bias = base_weight(base), base_bias(base)
        if self.role == "in":
            w.div_(self.fn().to(w.dtype)[None, :])
            return
        a, b = self.span
        if self.function == "vector":
            v = self.fn().to(w.dtype)
            w[a:b].div_(v[:, None])
            if bias is not None:
                bias[a:b].div_(v.to(bias.dtype))
            return
        ct = torch.promote_types(w.dtype, torch.float32)
        delta = float(self.scale()) * self.fn.delta_weight().to(ct)
        if hasattr(self, "magnitude"):  # (the norms kept at merge time: a plain attribute, so follow the weight)
            undo = self._merge_undo.to(device=w.device, dtype=ct)
            v = w[a:b].to(ct) * (undo / self.magnitude.to(ct))[:, None]
            w[a:b].copy_(v - delta)
            self._merge_undo = None
        else:
            w[a:b].sub_(delta.to(w.dtype))
