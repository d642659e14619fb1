"""The chunked LM-head loss equals transformers' full-logits ForCausalLMLoss: loss, gradient of the
hidden states and, through a real model, the adapters' gradients; and never forms [tokens, vocab]."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from allora_ds import loss as L
from allora_ds.adapters import AdapterSpec, adapter_modules, inject_adapters
from allora_ds.tiny import tiny_llama_config

VOCAB, HIDDEN = 300, 32
IGNORE = -100


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _head_inputs(dtype, labelled=0.5, shape=(3, 23), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, HIDDEN, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5).to(dtype)
    labels = torch.randint(0, VOCAB, shape, generator=g)
    labels[torch.rand(shape, generator=g) >= labelled] = IGNORE
    return h, w, labels


def _reference(h, w, labels, **kw):
    """transformers' path: full logits (lm_head in the model dtype), ForCausalLMLoss."""
    loss = ForCausalLMLoss(h @ w.t(), labels, VOCAB, **kw)
    return loss, torch.autograd.grad(loss, h)[0]


def _ours(h, w, labels, **kw):
    loss = L.linear_cross_entropy(h, w, labels, **kw)
    return loss, torch.autograd.grad(loss, h)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_items", [None, 13.0, "tensor"])
@pytest.mark.parametrize("chunk", [1, 4, 10_000])
@pytest.mark.parametrize("labelled", [1.0, 0.3])
def test_loss_and_hidden_grad_match_transformers(dtype, num_items, chunk, labelled):
    h, w, labels = _head_inputs(dtype, labelled)
    n = torch.tensor(13.0) if num_items == "tensor" else num_items
    ref_loss, ref_grad = _reference(h, w, labels, num_items_in_batch=n)
    loss, grad = _ours(h, w, labels, num_items_in_batch=n, chunk=chunk)
    assert loss.dtype == ref_loss.dtype == torch.float32  # both upcast the logits to fp32
    assert _rel(loss, ref_loss) < 1e-6, (loss.item(), ref_loss.item())
    assert grad.dtype == dtype and _rel(grad, ref_grad) < 1e-6
    unlabelled = F_pad_shift(labels) == IGNORE
    assert (grad[unlabelled] == 0).all(), "positions without a label must get exactly zero gradient"


def F_pad_shift(labels):
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]


def test_bf16_matches_transformers_to_bf16_rounding():
    h, w, labels = _head_inputs(torch.bfloat16, 0.5)
    ref_loss, ref_grad = _reference(h, w, labels, num_items_in_batch=20.0)
    loss, grad = _ours(h, w, labels, num_items_in_batch=20.0, chunk=7)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert _rel(loss, ref_loss) < 1e-5  # the same bf16 logits, upcast; sums in fp32
    assert _rel(grad.float(), ref_grad.float()) < 1e-2  # one bf16 rounding of the logits' gradient each


def test_shift_labels_and_ignore_index_are_honoured():
    h, w, labels = _head_inputs(torch.float64, 0.6)
    shift = F_pad_shift(labels).contiguous()
    ref = ForCausalLMLoss(h @ w.t(), None, VOCAB, shift_labels=shift)
    assert _rel(L.linear_cross_entropy(h, w, shift_labels=shift, chunk=5), ref) < 1e-6
    other = labels.masked_fill(labels == IGNORE, -1)
    ref = ForCausalLMLoss(h @ w.t(), other, VOCAB, ignore_index=-1)
    assert _rel(L.linear_cross_entropy(h, w, other, ignore_index=-1, chunk=5), ref) < 1e-6


def test_no_labelled_token():
    """A rank may get a micro-batch without labels: loss 0 over num_items, a zero gradient for every
    position (so the whole backward still runs), and NaN for the mean, as transformers."""
    h, w, labels = _head_inputs(torch.float32, 0.0)
    loss, grad = _ours(h, w, labels, num_items_in_batch=4.0)
    assert loss.item() == 0.0 and grad.shape == h.shape and (grad == 0).all()
    assert torch.isnan(L.linear_cross_entropy(h, w, labels)) and torch.isnan(_reference(h, w, labels)[0])


def test_eval_without_grad_gives_the_same_loss():
    h, w, labels = _head_inputs(torch.float32, 0.5)
    with torch.no_grad():
        loss = L.linear_cross_entropy(h, w, labels, num_items_in_batch=1.0, chunk=3)
    assert loss.grad_fn is None and _rel(loss, _reference(h, w, labels, num_items_in_batch=1.0)[0]) < 1e-6


class LargestTensor(TorchDispatchMode):
    """Records the largest new allocation of any operation (forward and backward run on this
    thread); views and in-place results share an input's storage and do not count."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def test_no_tensor_of_tokens_by_vocab_ever_exists():
    h, w, labels = _head_inputs(torch.float32, 1.0, shape=(4, 64))
    chunk = 16
    with LargestTensor() as ours:
        _ours(h, w, labels, num_items_in_batch=1.0, chunk=chunk)
    with LargestTensor() as ref:
        _reference(h, w, labels, num_items_in_batch=1.0)
    assert ref.largest >= 4 * 64 * VOCAB, "the reference should form full logits"
    # one chunk of logits, or the gradient of the hidden states that every path returns
    bound = max(chunk * VOCAB, h.numel())
    assert ours.largest <= bound, f"largest allocation {ours.largest} elements > {bound}"


# ---------------------------------------------------------------------------------------------
# Through a model: adapters' gradients, batch layouts, gradient checkpointing, tied embeddings


def _model(tied=False, gc=False, method="allora", targets=("q_proj", "v_proj", "down_proj"), seed=0):
    torch.manual_seed(seed)
    cfg = tiny_llama_config(VOCAB, hidden=HIDDEN, layers=2, heads=4, kv_heads=2)
    cfg.tie_word_embeddings = tied
    model = LlamaForCausalLM(cfg)
    if tied:
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    inject_adapters(model, AdapterSpec(method=method, rank=4, target_modules=tuple(targets)), seed=1, verbose=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in adapter_modules(model).values():  # a nonzero B, so every adapter gradient is nonzero
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _examples(n, seed, prompt=True):
    """(input_ids, labels) per example; the first label is always ignored (as the data pipeline does)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 15, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length - 1, (1,), generator=g)) if prompt else 1
        out.append((ids, [IGNORE] * cut + ids[cut:]))
    return out


def _batch(layout):
    if layout in ("padded", "text"):  # one example per row, right-padded, attention mask
        ex = _examples(3, 5, prompt=layout == "padded")
        n = max(len(i) for i, _ in ex)
        return {"input_ids": torch.tensor([i + [0] * (n - len(i)) for i, _ in ex]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i, _ in ex]),
                "labels": torch.tensor([lab + [IGNORE] * (n - len(lab)) for _, lab in ex])}
    rows = [_examples(3, 6), _examples(2, 7)] if layout == "packed" else [_examples(5, 8)]  # or flattened
    rows = [(sum((i for i, _ in r), []), sum((lab for _, lab in r), []), sum((list(range(len(i))) for i, _ in r), []))
            for r in rows]
    n = max(len(r[0]) for r in rows)
    return {"input_ids": torch.tensor([i + [0] * (n - len(i)) for i, _, _ in rows]),
            "labels": torch.tensor([lab + [IGNORE] * (n - len(lab)) for _, lab, _ in rows]),
            "position_ids": torch.tensor([p + list(range(n - len(p))) for _, _, p in rows])}


def _loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("layout", ["padded", "packed", "flattened", "text"])
@pytest.mark.parametrize("gc", [False, True])
def test_model_loss_and_adapter_grads_match_transformers(layout, gc):
    model, batch = _model(gc=gc), _batch(layout)
    ref_loss, ref = _loss_and_grads(model, batch, num_items_in_batch=9.0)
    assert L.install(model, chunk=4) is None and L.installed(model)
    loss, got = _loss_and_grads(model, batch, num_items_in_batch=9.0)
    assert _rel(loss, ref_loss) < 1e-6, (loss.item(), ref_loss.item())
    assert got.keys() == ref.keys() and len(got) == 12
    for name in ref:
        assert _rel(got[name], ref[name]) < 1e-5, f"{name}: {_rel(got[name], ref[name]):.2e}"
        assert ref[name].abs().max() > 0, name


def test_tied_embeddings_and_mean_reduction():
    model, batch = _model(tied=True), _batch("packed")
    ref_loss, ref = _loss_and_grads(model, batch)
    L.install(model)
    loss, got = _loss_and_grads(model, batch)
    assert _rel(loss, ref_loss) < 1e-6
    assert all(_rel(got[n], ref[n]) < 1e-5 for n in ref)


def test_parameter_names_generation_and_copies_are_unchanged():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    batch = _batch("padded")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        L.install(model)
        assert [n for n, _ in model.named_parameters()] == names and "forward" not in model.state_dict()
        # without labels: transformers' forward, logits and all
        same = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(logits, same)
        assert model(**batch).logits is None  # with labels: the logits are never formed
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin, "a copy must run its own modules"
    L.uninstall(model)
    assert not L.installed(model) and model(**batch).logits is not None


def test_lm_head_adapter_keeps_transformers_loss():
    model = _model(targets=("q_proj", "lm_head"))
    reason = L.install(model)
    assert reason and "lm_head" in reason and not L.installed(model)


def test_other_architectures_keep_transformers_loss():
    from transformers import GraniteConfig, GraniteForCausalLM

    model = GraniteForCausalLM(GraniteConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    reason = L.install(model)
    assert reason and "GraniteForCausalLM" in reason and not L.installed(model)
    plain = nn.Linear(2, 2)
    assert L.unsupported_reason(plain)


@pytest.mark.parametrize("chunked, targets, installed", [(True, "q_proj,v_proj", True), (False, "q_proj,v_proj", False),
                                                         (True, "q_proj,lm_head", False)])
def test_load_model_gives_the_trainer_the_chunked_loss(tmp_path, capsys, monkeypatch, chunked, targets, installed):
    """The trainer's model comes from load_model: chunked unless train.chunked_loss=false, and an
    adapter on lm_head keeps transformers' loss with the reason printed."""
    import contextlib

    import deepspeed

    from allora_ds.config import load_config
    from allora_ds.modeling import load_model

    LlamaForCausalLM(tiny_llama_config(VOCAB, hidden=HIDDEN, layers=1)).save_pretrained(tmp_path / "m")
    cfg = load_config(None, [f"train.chunked_loss={str(chunked).lower()}", f"adapter.target_modules={targets}"],
                      base={"model": {"path": str(tmp_path / "m"), "dtype": "float32"}, "data": {"train": "x.jsonl"}})
    # Without ZeRO-3, load_model's zero.Init is disabled; it would still look for a process group.
    monkeypatch.setattr(deepspeed.zero, "Init", lambda **kw: contextlib.nullcontext())
    model = load_model(cfg, {"train_micro_batch_size_per_gpu": 1}, verbose=True)[0]
    assert L.installed(model) == installed
    if chunked and not installed:
        assert "keeping transformers' loss: lm_head is a AdapterLinear" in capsys.readouterr().out
