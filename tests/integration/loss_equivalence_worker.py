"""Worker for test_loss_equivalence: the chunked loss under DeepSpeed ZeRO-3 against transformers'
full-logits loss in one process without DeepSpeed.

    deepspeed --num_gpus 2 loss_equivalence_worker.py MODEL OUT [--gc] [--chunk 8]
    python loss_equivalence_worker.py MODEL OUT --reference --world 2 [--gc]

Both write OUT (safetensors): per-micro-batch losses, the adapters' gradients of the first step
and the adapters after all steps (plain SGD). The loss is the trainer's: each micro-batch's token
sum over ``per_micro = N / (world * gas)``, N the labelled tokens of the whole step, so that the
applied gradient is that of (sum of every token loss) / N. Micro-batches mix the layouts the
collator produces (right-padded rows with an attention mask; packed rows with restarted
position_ids), and one rank gets a micro-batch without any label.
"""

import argparse
import sys

import torch
from safetensors.torch import save_file

from allora_ds import loss as chunked_loss
from allora_ds.adapters import AdapterSpec, adapter_modules, inject_adapters

STEPS, GAS, LR, IGNORE = 3, 2, 0.1, -100
EMPTY = (0, 1, 1)  # (step, accumulation index, rank) of the micro-batch with no label


def micro_batch(step, acc, rank, vocab):
    """Deterministic batch of (step, acc, rank): packed rows when step + acc + rank is odd."""
    g = torch.Generator().manual_seed(1000 * step + 10 * acc + rank)
    packed = (step + acc + rank) % 2 == 1
    rows = []
    for _ in range(2):
        ids, labels, pos = [], [], []
        for _ in range(3 if packed else 1):
            n = int(torch.randint(6, 20, (1,), generator=g))
            x = torch.randint(3, vocab, (n,), generator=g).tolist()
            cut = int(torch.randint(1, n - 2, (1,), generator=g))  # prompt length; first label always ignored
            ids, labels, pos = ids + x, labels + [IGNORE] * cut + x[cut:], pos + list(range(n))
        rows.append((ids, labels, pos))
    width = max(len(r[0]) for r in rows)
    batch = {"input_ids": torch.tensor([r[0] + [0] * (width - len(r[0])) for r in rows]),
             "labels": torch.tensor([r[1] + [IGNORE] * (width - len(r[1])) for r in rows])}
    if packed:
        batch["position_ids"] = torch.tensor([r[2] + list(range(width - len(r[2]))) for r in rows])
    else:
        batch["attention_mask"] = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    if (step, acc, rank) == EMPTY:
        batch["labels"].fill_(IGNORE)
    return batch


def labelled(batch):
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def load(path, gc):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


SPEC = AdapterSpec(method="allora", rank=4, eta=2.0)


def nonzero_b(model, gather):
    """A nonzero B so the first step already has nonzero gradients for A (same values everywhere)."""
    g = torch.Generator().manual_seed(3)
    for m in adapter_modules(model).values():
        with gather(m.lora_B):
            with torch.no_grad():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def reference(a):
    import contextlib

    model = load(a.model, a.gc)
    inject_adapters(model, SPEC, seed=7, verbose=False)
    nonzero_b(model, lambda p: contextlib.nullcontext())
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=LR)
    vocab, out = model.config.vocab_size, {}
    for step in range(STEPS):
        batches = {(acc, r): micro_batch(step, acc, r, vocab) for acc in range(GAS) for r in range(a.world)}
        per_micro = max(sum(map(labelled, batches.values())), 1) / (a.world * GAS)
        for (acc, r), b in batches.items():
            loss = model(**b, num_items_in_batch=per_micro).loss
            (loss / (a.world * GAS)).backward()  # what DeepSpeed's accumulation and rank average apply
            out[f"loss.{step}.{acc}.{r}"] = loss.detach().reshape(1)
        if step == 0:
            out.update({f"grad.{n}": p.grad.detach().clone() for n, p in params.items()})
        opt.step()
        opt.zero_grad()
    out.update({f"final.{n}": p.detach().clone() for n, p in params.items()})
    save_file(out, a.out)


def distributed(a):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad
    from transformers.integrations import HfDeepSpeedConfig

    from allora_ds.distributed import init_distributed, leave_process_group

    rank, world, _ = init_distributed()
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": GAS, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    # The persistence threshold (default 1e5 elements) would keep this small LM head whole on every
    # rank; below it, the head is partitioned as a real one is.
    keep = HfDeepSpeedConfig(cfg)  # noqa: F841 - makes from_pretrained partition the base
    model = load(a.model, a.gc)
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        inject_adapters(model, SPEC, seed=7, verbose=False)
    head = model.lm_head.weight
    assert head.ds_numel > 0 and head.data.numel() == 0, "the LM head must be a partitioned parameter"
    nonzero_b(model, lambda p: deepspeed.zero.GatheredParameters([p], modifier_rank=0))
    assert chunked_loss.install(model, chunk=a.chunk) is None

    # Count the LM head's gathers by the loss (not DeepSpeed's coordinator): one per forward is the design.
    gathers = []
    gather = head.all_gather_coalesced

    def counting_gather(params, *args, **kwargs):
        if any(p is head for p in params) and "/allora_ds/loss.py" in sys._getframe(1).f_code.co_filename:
            gathers.append(1)
        return gather(params, *args, **kwargs)

    head.all_gather_coalesced = counting_gather

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params.values(), lr=LR), config=cfg)
    engine.train()
    vocab, out, forwards = model.config.vocab_size, {}, 0
    for step in range(STEPS):
        batches = [micro_batch(step, acc, r, vocab) for acc in range(GAS) for r in range(world)]
        per_micro = max(sum(map(labelled, batches)), 1) / (world * GAS)
        for acc in range(GAS):
            loss = engine(**micro_batch(step, acc, rank, vocab), num_items_in_batch=per_micro).loss
            forwards += 1
            engine.backward(loss)
            losses = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(losses, loss.detach().reshape(1))
            out.update({f"loss.{step}.{acc}.{r}": x for r, x in enumerate(losses)})
            if step == 0 and acc == GAS - 1:  # reduced, before the update
                out.update({f"grad.{n}": safe_get_full_grad(p).detach().clone() for n, p in params.items()})
            engine.step()
    with torch.no_grad():  # the eval path: no gradient work, one gather as well
        eval_loss = engine(**micro_batch(0, 0, rank, vocab), num_items_in_batch=1.0).loss
        forwards += 1
    assert eval_loss.grad_fn is None
    # Tied to the embedding, the weight may still be held whole by DeepSpeed's own fetch: no gather then.
    tied = head is model.model.embed_tokens.weight
    assert len(gathers) <= forwards if tied else len(gathers) == forwards, \
        f"{len(gathers)} gathers of the LM head in {forwards} forwards"
    assert head.data.numel() == 0, "the LM head must be partitioned again after the loss"
    # Read as an attribute in forward, ZeRO-3 would make it an external parameter of the model and
    # gather it again for the backward.
    assert not any(id(head) in getattr(m, "_external_params", {}) for m in engine.module.modules()), \
        "the LM head was registered as an external parameter"
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            with deepspeed.zero.GatheredParameters([p]):
                out[f"final.{n}"] = p.detach().clone()
    if rank == 0:
        save_file(out, a.out)
    leave_process_group()


if __name__ == "__main__":
    from allora_ds.errors import cli  # each rank ends through errors._exit, never in gloo's teardown abort

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--gc", action="store_true")
    p.add_argument("--chunk", type=int, default=8, help="rows per chunk: small, so ranks run different chunk counts")
    p.add_argument("--reference", action="store_true")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args()
    cli(reference if a.reference else distributed)(a)
