"""ALLoRA / LoRA / ALLoRA-OD gradients checked against their definitions in float64 (on the CPU, and
on CUDA when a GPU is present: the gpu-marked variants run in `make gpu-check`)."""

import pytest
import torch
import torch.nn as nn

from allora_ds.adapters import AdapterLinear, AdapterSpec, allora_row_scale, row_norms_of_product

N_IN, N_OUT, R, TOKENS = 24, 40, 4, 7
RTOL = 1e-12


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    return torch.device(request.param)


def _layer(method, device="cpu", seed=0, random_b=True, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(N_IN, N_OUT, bias=True).double().to(device)
    layer = AdapterLinear(base, AdapterSpec(method=method, rank=R, **kw))
    if random_b:
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, dtype=torch.float64) * 0.3)
    return layer


def _inputs(device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, TOKENS, N_IN, dtype=torch.float64, generator=g)
    upstream = torch.randn(2, TOKENS, N_OUT, dtype=torch.float64, generator=g)  # dL/dy
    return x.to(device), upstream.to(device)


def _assert_close(actual, expected, what):
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-300)
    assert err < RTOL, f"{what}: relative error {err:.3e} > {RTOL:g}"


def _run(layer, x, upstream):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(upstream)
    return y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad


def _definition_grads(layer, x, upstream, scale=1.0, x_adapter=None):
    """Materialise D = BA, let autograd give G = dL/dD and dL/dx of the plain LoRA path."""
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    D = (B @ A).requires_grad_(True)
    x = x.clone().requires_grad_(True)
    xa = x if x_adapter is None else x_adapter(x)
    y = layer.base_layer(x) + scale * xa @ D.t()
    y.backward(upstream)
    return y.detach(), D.grad, x.grad


def test_row_norms_match_materialised_product():
    layer = _layer("allora")
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    _assert_close(row_norms_of_product(A, B).double(), (B @ A).norm(dim=1), "row norms via Gram")


def test_input_without_grad_gives_the_same_adapter_grads(device):
    """The backward skips grad_x work when x needs no gradient; A and B grads must not change."""
    layer = _layer("allora", device)
    x, up = _inputs(device)
    _, _, gA, gB = _run(layer, x, up)
    layer.zero_grad()
    layer(x).backward(up)  # x.requires_grad is False here
    _assert_close(layer.lora_A.grad, gA, "grad_A without grad_x")
    _assert_close(layer.lora_B.grad, gB, "grad_B without grad_x")


def test_scale_diagnostics_summarise_rows():
    from allora_ds.adapters import scale_diagnostics

    layer = _layer("allora", eta=2.0)
    x, up = _inputs()
    _run(layer, x, up)
    d = scale_diagnostics(layer)
    c, norms = allora_row_scale(layer.lora_A.detach(), layer.lora_B.detach(), 2.0)
    assert d["c_min"] == pytest.approx(c.min().item()) and d["c_max"] == pytest.approx(c.max().item())
    assert d["row_norm_mean"] == pytest.approx(norms.mean().item()) and d["c_max"] < 2.0


def test_allora_grad_a_and_grad_b_match_definition(device):
    layer = _layer("allora", device, eta=1.5)
    x, up = _inputs(device)
    y, gx, gA, gB = _run(layer, x, up)
    y_ref, G, gx_lora = _definition_grads(layer, x, up)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    c = 1.0 / torch.sqrt((B @ A).norm(dim=1) + 1.0 / 1.5**2)
    Gt = c[:, None] * G
    _assert_close(y, y_ref, "output")
    _assert_close(gA, B.t() @ Gt, "grad_A = B^T diag(c) G")
    _assert_close(gB, Gt @ A.t(), "grad_B = diag(c) G A^T")
    _assert_close(gx, gx_lora, "grad_x must equal unscaled LoRA's")


def test_allora_scale_is_not_a_constant():
    """Guard against a test that passes with c == 1: the scale must really vary per row."""
    layer = _layer("allora")
    c, norms = allora_row_scale(layer.lora_A.detach(), layer.lora_B.detach(), 2.0)
    assert c.max() - c.min() > 0.05 and norms.min() > 0


def test_allora_zero_b_gives_eta_scale_and_base_output(device):
    layer = _layer("allora", device, random_b=False, eta=2.0)
    x, up = _inputs(device)
    y, _, gA, gB = _run(layer, x, up)
    assert torch.equal(y, layer.base_layer(x).detach()), "B = 0 must leave the base output unchanged"
    c = layer.diagnostics.c
    assert torch.equal(c, torch.full_like(c, 2.0)), f"c should be eta=2 on every row, got {c}"
    _, G, _ = _definition_grads(layer, x, up)
    _assert_close(gB, 2.0 * G @ layer.lora_A.detach().t(), "grad_B at B=0 is eta * G A^T")
    assert torch.count_nonzero(gA) == 0, "grad_A is B^T(...) = 0 when B = 0"


def test_lora_with_dropout_matches_definition(device):
    layer = _layer("lora", device, alpha=8.0, dropout=0.25)
    x, up = _inputs(device)
    torch.manual_seed(123)
    y, gx, gA, gB = _run(layer, x, up)
    torch.manual_seed(123)
    mask = nn.functional.dropout(torch.ones_like(x), 0.25)
    y_ref, G, gx_ref = _definition_grads(layer, x, up, scale=8.0 / R, x_adapter=lambda t: t * mask)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    _assert_close(y, y_ref, "output")
    _assert_close(gA, B.t() @ G, "grad_A")
    _assert_close(gB, G @ A.t(), "grad_B")
    _assert_close(gx, gx_ref, "grad_x")


def test_allora_od_matches_definition(device):
    layer = _layer("allora_od", device, eta=2.0)
    x, up = _inputs(device)
    y, gx, gA, gB = _run(layer, x, up)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    f = x @ (B @ A).t()  # adapter output per token
    c = 1.0 / torch.sqrt(f.abs() + 0.25)
    Gt = ((c * up).reshape(-1, N_OUT)).t() @ x.reshape(-1, N_IN)
    _, _, gx_lora = _definition_grads(layer, x, up)
    _assert_close(gA, B.t() @ Gt, "grad_A = B^T sum_t diag(c_t) g_t x_t^T")
    _assert_close(gB, Gt @ A.t(), "grad_B")
    _assert_close(gx, gx_lora, "grad_x must be unscaled")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rank=0), "rank must be a positive integer, got 0"),
        (dict(rank=-3), "rank must be a positive integer, got -3"),
        (dict(eta=0.0), "eta must be > 0, got 0.0"),
        (dict(eta=-1.0), "eta must be > 0, got -1.0"),
        (dict(method="dora"), "'dora' is not one of"),
        (dict(method="allora", dropout=0.1), "dropout applies to lora only"),
    ],
)
def test_bad_spec_values_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        AdapterSpec(**kw)


def test_non_linear_base_is_refused():
    with pytest.raises(ValueError, match="wrap nn.Linear layers, got Conv1d"):
        AdapterLinear(nn.Conv1d(2, 2, 1), AdapterSpec())
