"""Low-rank adapters: ALLoRA, its output-dependent variant, and plain LoRA.

All three wrap a frozen ``nn.Linear`` (``base_layer``) and add a trainable ``B A x`` path.
ALLoRA's rule lives in ``ALLoRAFunction.backward``: the upstream gradient of the adapter
output is scaled per output row by ``c_i = 1/sqrt(||(BA)_i|| + 1/eta^2)`` before it is
contracted into the gradients of A and B; the gradient to ``x`` is left unscaled.
See docs/method.md for the derivation and why it cannot be an optimizer hook.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from allora_ds import log
from allora_ds.fields import documented
from allora_ds.flops import full_numel

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def row_norms_of_product(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``||(BA)_{i,:}||_2`` for every row i, via the Gram matrix ``A A^T`` (never forms BA).

    O(r^2 (n_out + n_in)) work in fp32 (fp64 for fp64 weights); clamped at 0 before the
    square root because rounding can make ``b^T (A A^T) b`` slightly negative for tiny rows.
    """
    acc = _accumulation_dtype(A)
    A32, B32 = A.to(acc), B.to(acc)
    gram = A32 @ A32.t()  # [r, r]
    sq = (B32 @ gram).mul_(B32).sum(dim=1)  # b_i^T (A A^T) b_i
    return sq.clamp_min_(0.0).sqrt_()


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def allora_row_scale(A: torch.Tensor, B: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(c, row_norms)`` with ``c_i = 1/sqrt(||(BA)_i|| + 1/eta^2)`` (at least fp32)."""
    norms = row_norms_of_product(A, B)
    return (norms + 1.0 / (eta * eta)).rsqrt_(), norms


class _Diagnostics:
    """The last backward's per-row scale ``c`` and row norms of one adapter (``n_out`` floats each).

    Kept as tensors, reduced only when ``scale_diagnostics`` is read: no work or host sync per step.
    """

    __slots__ = ("c", "norms")

    def __init__(self) -> None:
        self.c: torch.Tensor | None = None
        self.norms: torch.Tensor | None = None


class ALLoRAFunction(torch.autograd.Function):
    """``B A x`` with ALLoRA's gradient scale per row, or per token and row (``output_dependent=True``)."""

    @staticmethod
    def forward(ctx, x, A, B, eta: float, output_dependent: bool, diag: _Diagnostics):
        h = F.linear(x, A)  # [..., r]
        out = F.linear(h, B)  # [..., n_out]
        ctx.save_for_backward(x, h, A, B)
        ctx.eta, ctx.output_dependent, ctx.diag = eta, output_dependent, diag
        return out

    @staticmethod
    def backward(ctx, g):
        x, h, A, B = ctx.saved_tensors
        eta = ctx.eta
        g2 = g.reshape(-1, g.shape[-1])  # [T, n_out]
        x2 = x.reshape(-1, x.shape[-1])  # [T, n_in]
        h2 = h.reshape(-1, h.shape[-1])  # [T, r]
        need_x = ctx.needs_input_grad[0]
        if not ctx.output_dependent:
            c, norms = allora_row_scale(A, B, eta)
            ctx.diag.c, ctx.diag.norms = c, norms
            c = c.to(g.dtype)
            Bc = B * c[:, None]
            if need_x:  # one GEMM gives both g B (for grad_x, unscaled) and g diag(c) B (for grad_A)
                gB, gcB = (g2 @ torch.cat([B, Bc], dim=1)).split(B.shape[1], dim=1)
            else:
                gcB = g2 @ Bc
            grad_B = (g2.t() @ h2).mul_(c[:, None])  # diag(c) G A^T
        else:
            # c depends on the token's own adapter output f(x) = h B^T; recomputed, not stored.
            f = F.linear(h2, B)
            c = (f.to(_accumulation_dtype(f)).abs_() + 1.0 / (eta * eta)).rsqrt_()
            ctx.diag.c, ctx.diag.norms = c.mean(dim=0), None  # per row, averaged over tokens
            gc = g2 * c.to(g.dtype)
            gcB = gc @ B
            gB = g2 @ B if need_x else None
            grad_B = gc.t() @ h2
        grad_A = gcB.t() @ x2  # B^T diag(c) G
        grad_x = (gB @ A).reshape(x.shape) if need_x else None
        return grad_x, grad_A, grad_B, None, None, None


class AdapterMethod:
    """How one adapter method trains and scales the ``B A x`` path.

    A new method is one subclass here and one entry in ``METHODS``: config choices, validation,
    forward, merge scale and export all read it from there.
    """

    uses_dropout = False  # whether adapter.dropout applies to the method

    def scale(self, spec: AdapterSpec) -> float:
        """Factor on ``B A`` in forward and merge."""
        return 1.0

    def check(self, spec: AdapterSpec) -> None:
        """Raise ``AdapterSpecError`` for a hyper-parameter this method cannot use."""

    def delta(self, layer: AdapterLinear, x: torch.Tensor) -> torch.Tensor:
        """The adapter path's output for input ``x`` (already in the adapter's dtype)."""
        raise NotImplementedError


class ALLoRA(AdapterMethod):
    """The paper's rule: the gradient of row i is scaled by ``1/sqrt(||(BA)_i|| + 1/eta^2)``."""

    output_dependent = False

    def delta(self, layer: AdapterLinear, x: torch.Tensor) -> torch.Tensor:
        return ALLoRAFunction.apply(x, layer.lora_A, layer.lora_B, layer.spec.eta, self.output_dependent,
                                    layer.diagnostics)


class ALLoRAOutputDependent(ALLoRA):
    """ALLoRA with the scale taken per token from the adapter's own output ``|f(x)_i|``."""

    output_dependent = True


class LoRA(AdapterMethod):
    """PEFT-style LoRA: ``alpha/r * B A x`` with optional input dropout."""

    uses_dropout = True

    def scale(self, spec: AdapterSpec) -> float:
        return spec.alpha / spec.rank

    def check(self, spec: AdapterSpec) -> None:
        if not spec.alpha > 0:
            raise AdapterSpecError("alpha", f"alpha must be > 0 for lora, got {spec.alpha!r}")

    def delta(self, layer: AdapterLinear, x: torch.Tensor) -> torch.Tensor:
        # The scale on the rank-r intermediate: r columns, not n_out.
        return F.linear(F.linear(layer.dropout(x), layer.lora_A) * layer.spec.scale, layer.lora_B)


METHODS: dict[str, AdapterMethod] = {"allora": ALLoRA(), "allora_od": ALLoRAOutputDependent(), "lora": LoRA()}


class AdapterSpecError(ValueError):
    """A bad adapter hyper-parameter; ``field`` names it, ``detail`` says what is wrong with it."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"adapter {detail}")
        self.field, self.detail = field, detail


@dataclass(frozen=True)
class AdapterSpec:
    """The adapter hyper-parameters (the config's ``adapter`` section), validated on construction."""

    method: str = documented("allora", "allora (paper's rule), lora (PEFT-style baseline) or allora_od "
                                       "(output-dependent variant).", tuple(METHODS))
    rank: int = documented(16, "Adapter rank r.")
    eta: float = documented(2.0, "ALLoRA's eta: scale 1/sqrt(||(BA)_i|| + 1/eta^2); equals eta while a row is zero.")
    alpha: float = documented(32.0, "LoRA only: output scale alpha/r.")
    dropout: float = documented(0.0, "LoRA only: dropout on the adapter input (ALLoRA uses none).")
    target_modules: list[str] = documented(list(LLAMA_TARGETS), "Names of the nn.Linear modules that get adapters.")

    def __post_init__(self) -> None:
        # A list, as YAML, JSON and the saved config hold it, whatever sequence the caller passed.
        object.__setattr__(self, "target_modules", list(self.target_modules))
        if self.method not in METHODS:
            raise AdapterSpecError("method", f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise AdapterSpecError("rank", f"rank must be a positive integer, got {self.rank!r}")
        if not self.eta > 0:
            raise AdapterSpecError("eta", f"eta must be > 0, got {self.eta!r}")
        self.rule.check(self)
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterSpecError("dropout", f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.dropout and not self.rule.uses_dropout:
            with_dropout = ", ".join(name for name, m in METHODS.items() if m.uses_dropout)
            raise AdapterSpecError("dropout", f"dropout applies to {with_dropout} only; {self.method} uses none "
                                              f"(got {self.dropout})")
        if not self.target_modules:
            raise AdapterSpecError("target_modules", "target_modules is empty")

    @property
    def rule(self) -> AdapterMethod:
        """The method's training rule and scale."""
        return METHODS[self.method]

    @property
    def scale(self) -> float:
        """Factor on ``B A`` in forward and merge: ``alpha/r`` for LoRA, 1 for ALLoRA."""
        return self.rule.scale(self)

    def checkpoint_record(self) -> dict:
        """What a checkpoint's trainer state records about its adapters (export reads scale, rank, targets)."""
        return {"method": self.method, "rank": self.rank, "eta": self.eta, "alpha": self.alpha, "scale": self.scale,
                "target_modules": list(self.target_modules)}


class AdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank adapter ``lora_B @ lora_A`` trained by ``spec.method``."""

    def __init__(self, base: nn.Linear, spec: AdapterSpec, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"adapters wrap nn.Linear layers, got {type(base).__name__}")
        self.base_layer = base
        self.spec = spec
        # Under ZeRO-3 the base weight may already be an empty partition: the real shape is in
        # in_features/out_features, never weight.shape.
        self.in_features, self.out_features = base.in_features, base.out_features
        dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        device = base.weight.device if base.weight.device.type != "meta" else None
        self.lora_A = nn.Parameter(torch.empty(spec.rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, spec.rank, dtype=dtype, device=device))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.diagnostics = _Diagnostics()
        self.reset_adapter(generator)

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """A: Kaiming-uniform(a=sqrt(5)) as PEFT does, i.e. U(-1/sqrt(n_in), 1/sqrt(n_in)); B: zeros.

        The values are drawn in fp32 on the CPU (``generator`` is a CPU generator) and then copied
        into the parameter, wherever it lives and whatever its dtype: every device, precision and
        ZeRO stage starts from the same adapter, up to the final cast.
        """
        self.lora_A.copy_(uniform_cpu_fp32(self.lora_A.shape, 1.0 / math.sqrt(self.in_features), generator))
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        delta = self.spec.rule.delta(self, x.to(self.lora_A.dtype))
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return f"method={s.method}, rank={s.rank}, eta={s.eta}, scale={s.scale:g}"


def uniform_cpu_fp32(shape: torch.Size, bound: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``U(-bound, bound)`` in fp32 on the CPU, from ``generator`` (default: torch's CPU generator).

    ``torch.rand`` with an explicit device and dtype: inside ``deepspeed.zero.Init`` the constructors
    ``torch.empty/zeros/ones/full/randn/...`` put a tensor made without ``device=`` on the accelerator
    and cast floats to the training dtype, and a CPU generator cannot draw into a CUDA tensor.
    """
    u = torch.rand(shape, generator=generator, dtype=torch.float32, device="cpu")
    if u.device.type != "cpu" or u.dtype != torch.float32:  # a constructor override we do not know about
        raise RuntimeError(f"adapter init drew a {u.dtype} tensor on {u.device}, expected float32 on cpu")
    return u.mul_(2 * bound).sub_(bound)


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W + scale * B A`` computed in fp32 and rounded once, to ``dtype`` (default ``weight``'s).

    A float32 export of a bf16 base must get the fp32 sum, not the sum rounded to bf16 and then
    widened: the adapter's update is often below bf16's resolution of the base weight.
    """
    return (weight.float() + scale * (lora_B.float() @ lora_A.float())).to(dtype or weight.dtype)


def adapter_seed(seed: int, name: str) -> int:
    """Per-module init seed: the same adapters whatever the creation order, rank or ZeRO stage."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _matches(name: str, targets: Iterable[str]) -> str | None:
    for target in targets:
        if name == target or name.endswith("." + target):
            return target
    return None


def inject_adapters(model: nn.Module, spec: AdapterSpec, seed: int = 0, verbose: bool = True) -> dict[str, int]:
    """Replace the target ``nn.Linear`` modules of ``model`` by ``AdapterLinear``; freeze all else.

    Works on a model whose weights ZeRO-3 has partitioned (shapes come from in/out_features).
    Adapters are created on every rank with the same per-module seed; when DeepSpeed is in a
    ``zero.Init`` context they are partitioned on creation, otherwise ``deepspeed.initialize``
    partitions them. Returns ``{"trainable": n, "total": n, "adapted_modules": n}``.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    found: dict[str, nn.Module] = {}
    hit_targets: set[str] = set()
    for name, module in model.named_modules():
        target = _matches(name, spec.target_modules)
        if target is None:
            continue
        if isinstance(module, AdapterLinear):
            raise ValueError(f"module {name!r} already has an adapter")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target {target!r} matched {name!r}, a {type(module).__name__}, not an nn.Linear")
        found[name] = module
        hit_targets.add(target)
    missing = [t for t in spec.target_modules if t not in hit_targets]
    if missing:
        raise ValueError(f"adapter target(s) {', '.join(map(repr, missing))} match no module of {type(model).__name__}")
    for name, module in found.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        gen = torch.Generator().manual_seed(adapter_seed(seed, name))
        setattr(parent, child, AdapterLinear(module, spec, generator=gen))
    counts = {
        "trainable": sum(full_numel(p) for p in model.parameters() if p.requires_grad),
        "total": sum(full_numel(p) for p in model.parameters()),
        "adapted_modules": len(found),
    }
    if verbose:
        pct = 100.0 * counts["trainable"] / max(counts["total"], 1)
        log.info(f"{spec.method} r={spec.rank} on {len(found)} modules: "
                 f"trainable {counts['trainable']:,} / total {counts['total']:,} ({pct:.3f}%)", every_rank=True)
    return counts


def adapter_modules(model: nn.Module) -> dict[str, AdapterLinear]:
    """Adapted modules by their name in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def scale_diagnostics(model: nn.Module) -> dict[str, float]:
    """min/mean/max over all adapted rows of ALLoRA's scale ``c`` and of ``||(BA)_i||`` (last backward).

    For allora_od, ``c`` is per row averaged over the tokens. Empty for lora.
    """
    diags = [m.diagnostics for m in adapter_modules(model).values() if m.diagnostics.c is not None]
    out = {}
    for name, vectors in (("c", [d.c for d in diags]), ("row_norm", [d.norms for d in diags if d.norms is not None])):
        if vectors:
            v = torch.cat([t.float() for t in vectors])
            out.update({f"{name}_min": v.min(), f"{name}_mean": v.mean(), f"{name}_max": v.max()})
    return {k: float(v) for k, v in out.items()}
