"""Causal-LM loss sized by the labels, not by the vocabulary: LM head + cross-entropy at labelled
positions only, chunk by chunk, with no ``[tokens, vocab]`` tensor at any time.

transformers' ``ForCausalLMLoss`` projects *every* position to the vocabulary and upcasts the
logits to fp32: ~0.5 GB (bf16) + ~1 GB (fp32) + ~1 GB (log-softmax) per 2,048 tokens at Llama-3's
128,256 words, mostly for prompt positions that carry no loss. Here:

* only the positions whose (shifted) label is not ``ignore_index`` are projected;
* they are projected ``chunk`` rows at a time; each chunk's logits are upcast to fp32 (the
  weight never is), turned into the loss *and* into ``d loss / d hidden`` for those rows at once
  (``(softmax - onehot) @ W``), then freed. Backward only scales that gradient, so the LM
  head weight is needed in forward only: under ZeRO-3 it is gathered once per micro-batch, the
  gather overlapping the decoder's forward;
* the result equals ``ForCausalLMLoss(lm_head(hidden), labels, num_items_in_batch=...)``: the
  same shift, ignore index, sum / ``num_items_in_batch`` (mean when it is None) and gradients,
  up to fp32 summation order.

Peak memory of the loss path: ``chunk x vocab x 4`` bytes (fp32 model; ``x 6`` in bf16: the chunk's
bf16 logits and their fp32 copy, then the fp32 and the bf16 gradient) whatever the number of
tokens, plus the ``[tokens, hidden]`` gradient of the hidden states that any loss path returns
(here allocated in forward and scaled in place in backward).

``install(model)`` gives a supported ``*ForCausalLM`` instance this loss: its ``forward`` runs the
decoder (``model.model``) and this function when labels are given, and is transformers' own
otherwise. Parameter names, ``state_dict`` and generation are unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
# Logits per chunk: 2**26 fp32 values = 256 MiB, i.e. 523 rows at Llama-3's 128,256 words. Large
# enough that each chunk's GEMMs run at full speed, small next to the full-logits path.
CHUNK_ELEMENTS = 2**26
# Classes whose forward is exactly: decoder -> lm_head -> loss_function(logits, labels) (no logit
# scaling, soft-capping or auxiliary loss), checked against transformers 5.x sources.
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
             "Phi3ForCausalLM", "Olmo2ForCausalLM")
# Keyword arguments the decoder takes that change nothing in the loss computation.
DECODER_KWARGS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "use_cache",
                  "output_attentions", "output_hidden_states", "cu_seq_lens_q", "cu_seq_lens_k",
                  "max_length_q", "max_length_k", "seq_idx")
LOSS_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "ignore_index", "label_positions")


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that one chunk of logits holds about ``elements`` values."""
    return max(1, elements // vocab)


def label_positions(labels: torch.Tensor | None, shift_labels: torch.Tensor | None = None,
                    ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions whose next-token label counts, and those labels: ``(rows, targets)``.

    As ``ForCausalLMLoss``: position ``t`` of a row predicts ``labels[t + 1]``; the last position of
    each row predicts nothing. (Packed examples never predict each other because the data sets the
    first label of every example to ``ignore_index``.) ``nonzero`` waits for the device: one host
    sync per micro-batch, which ``install``'s forward takes before the decoder's kernels are queued.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat = shift_labels.reshape(-1)
    rows = (flat != ignore_index).nonzero().squeeze(1)
    return rows, flat.index_select(0, rows)


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, chunk: int,
             with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of the token losses at ``rows`` of ``hidden`` ``[T, H]`` and, with ``with_grad``, the
    gradient of that sum with respect to ``hidden`` (``[T, H]``, zero where there is no label)."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.zeros_like(hidden) if with_grad else None
    for s in range(0, rows.numel(), chunk):
        idx, tgt = rows[s : s + chunk], targets[s : s + chunk, None]
        # The chunk's logits in the model dtype, upcast as transformers does (a no-op in fp32). A
        # plain matmul, not F.linear, which DeepSpeed's zero.Init may have replaced.
        logits = (hidden.index_select(0, idx) @ weight.t()).float()
        picked = logits.gather(1, tgt).squeeze(1)
        top = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(top).exp_()  # in place: one [chunk, vocab] fp32 buffer for everything
        sum_exp = probs.sum(dim=1)
        total += (sum_exp.log() + top.squeeze(1) - picked).sum()
        if with_grad:
            probs.div_(sum_exp[:, None]).scatter_add_(1, tgt, probs.new_full(tgt.shape, -1.0))  # softmax - onehot
            grad.index_copy_(0, idx, (probs.to(weight.dtype) @ weight).to(grad.dtype))
        del logits, probs  # before the next chunk's logits exist, not after: one chunk alive at a time
    return total, grad


class _LinearCrossEntropy(torch.autograd.Function):
    """Token-sum of the losses; the gradient for ``hidden`` is computed in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, targets, chunk):
        total, ctx.grad = _chunked(hidden, weight, rows, targets, chunk, with_grad=True)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # Rows without a label get exactly 0, as in the full-logits path, and every position gets a
        # gradient: a rank with no labelled token still runs the whole backward (ZeRO's gradient
        # hooks are collectives). Scaled in place: the stored gradient is the returned one.
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("backward through the chunked loss a second time (retain_graph) is not supported")
        return grad.mul_(grad_total), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None, *,
                         num_items_in_batch=None, shift_labels: torch.Tensor | None = None,
                         ignore_index: int = IGNORE_INDEX, positions: tuple[torch.Tensor, torch.Tensor] | None = None,
                         chunk: int | None = None) -> torch.Tensor:
    """``ForCausalLMLoss(hidden @ weight.T, labels, vocab, num_items_in_batch)`` without the logits.

    ``hidden``: ``[..., H]`` final hidden states (after the last norm); ``weight``: the LM head's
    ``[vocab, H]`` weight, frozen (it gets no gradient). ``positions``: ``label_positions``'s result
    when already computed. Returns the fp32 token-sum divided by ``num_items_in_batch`` (the mean
    over labelled tokens when it is None: NaN without any, as transformers).
    """
    if positions is None:
        positions = label_positions(labels, shift_labels, ignore_index)
    rows, targets = (t.to(hidden.device) for t in positions)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk or chunk_rows(weight.shape[0])
    if torch.is_grad_enabled() and hidden.requires_grad:
        total = _LinearCrossEntropy.apply(h2, weight.detach(), rows, targets, chunk)
    else:
        total = _chunked(h2.detach(), weight.detach(), rows, targets, chunk, with_grad=False)[0]
    if num_items_in_batch is None:
        return total / rows.numel()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


@contextlib.contextmanager
def gathered_head(weight: torch.nn.Parameter, early: bool = True):
    """Yields a function that returns ``weight`` whole, for the duration of the context.

    Under ZeRO-3 the all-gather is issued on entry (``early``), so that it runs while the decoder
    computes, and waited for on the first call; the weight is partitioned again on exit. It is
    DeepSpeed's handle-based ``all_gather_coalesced``, as its coordinator uses for every layer:
    under hpZ it gathers from the secondary copy inside the node, and waiting makes the device
    wait, not the host. (``GatheredParameters`` gathers over all ranks and ends with
    ``synchronize()`` on CUDA.) One collective on every rank, whatever its labels.

    Nothing is gathered when DeepSpeed already holds the weight whole: a persistent parameter, or
    a head tied to the input embedding that the coordinator has not released. A tied head must not
    be gathered early (``early=False``): the coordinator fetches and releases it with the embedding
    during the decoder, so it is looked at when first needed, after the decoder.
    """
    if not hasattr(weight, "ds_id"):
        yield lambda: weight
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    handle, started = None, False

    def start():
        nonlocal handle, started
        started = True
        if weight.ds_status == ZeroParamStatus.INFLIGHT:  # only DeepSpeed's prefetcher puts it there
            raise RuntimeError("the LM head weight is being prefetched by DeepSpeed; the chunked loss cannot gather it")
        if weight.ds_status == ZeroParamStatus.NOT_AVAILABLE:
            handle = weight.all_gather_coalesced([weight])

    def whole():
        if not started:
            start()
        if handle is not None:
            handle.wait()
        return weight

    if early:
        start()
    try:
        yield whole
    finally:
        if handle is not None:  # wait: a no-op once waited for; after an exception it is still needed
            handle.wait()
            weight.partition(param_list=[weight], has_been_updated=False)


def head_weight(model: nn.Module) -> nn.Parameter:
    """The LM head's weight, read without DeepSpeed's attribute getter.

    Inside the engine's forward, ZeRO-3 gathers a partitioned parameter read as ``module.weight``
    and registers it as an external parameter of the enclosing module (here the whole model), which
    then gathers it again for the backward, where the chunked loss does not need it. Iterating over
    ``named_parameters`` does not go through that getter, so ``gathered_head`` alone decides.
    """
    return dict(model.lm_head.named_parameters(recurse=False))["weight"]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``install`` cannot give ``model`` the chunked loss, or None if it can."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    cls = type(model)
    if cls.__name__ not in SUPPORTED or not cls.__module__.startswith("transformers.models."):
        return f"{cls.__module__}.{cls.__name__} is not one of the architectures it supports ({', '.join(SUPPORTED)})"
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        return f"lm_head is a {type(head).__name__} (an adapter on lm_head needs its weight gradient)"
    if head.bias is not None:
        return "lm_head has a bias"
    if head.weight.requires_grad:
        return "lm_head.weight is trainable (the chunked loss gives it no gradient)"
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return "the model's loss_function is not transformers' ForCausalLMLoss"
    return None


def install(model: nn.Module, chunk: int | None = None) -> str | None:
    """Give ``model`` the chunked loss (an instance-level ``forward``); returns None, or the reason
    it kept transformers' loss."""
    reason = unsupported_reason(model)
    if reason is None:
        model.forward = types.MethodType(functools.partial(_forward, chunk=chunk), model)
    return reason


def uninstall(model: nn.Module) -> None:
    """Back to the class's own forward."""
    model.__dict__.pop("forward", None)


def installed(model: nn.Module) -> bool:
    return "forward" in model.__dict__


def _forward(self, *args, chunk=None, **kwargs):
    """``*ForCausalLM.forward`` with the chunked loss; transformers' own without labels, or with
    arguments whose meaning it would change (positional inputs, caches, ``logits_to_keep``, tuple
    outputs). ``logits`` of the output is None: they are never formed."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    unknown = set(kwargs) - set(DECODER_KWARGS) - set(LOSS_KWARGS)
    if args or unknown or kwargs.get("use_cache") or (kwargs.get("labels") is None and kwargs.get("shift_labels") is None):
        return type(self).forward(self, *args, **kwargs)
    loss_kw = {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs}
    # ``label_positions``: computed by the caller where the labels are on the host (the trainer's
    # collate); otherwise here, whose host sync comes before the decoder's kernels are queued.
    positions = loss_kw.get("label_positions") or label_positions(
        loss_kw.get("labels"), loss_kw.get("shift_labels"), loss_kw.get("ignore_index", IGNORE_INDEX))
    weight = head_weight(self)
    embedding = dict(self.get_input_embeddings().named_parameters(recurse=False)).get("weight")
    # Untied: the head's gather runs while the decoder computes. Tied: after it (see gathered_head).
    with gathered_head(weight, early=weight is not embedding) as head:
        out = self.model(**kwargs)
        loss = linear_cross_entropy(out.last_hidden_state, head(), num_items_in_batch=loss_kw.get("num_items_in_batch"),
                                    positions=positions, chunk=chunk)
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states, attentions=out.attentions)
