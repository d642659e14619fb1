"""Worker for test_zero_equivalence: train adapters with plain SGD under DeepSpeed, or as reference.

    deepspeed --num_gpus 2 adapter_equivalence_worker.py MODEL OUT --stage 3 [--gc]
    python adapter_equivalence_worker.py MODEL OUT --reference --world 2 [--gc]

Both write the final adapter weights to OUT (safetensors). Data: fixed random token batches;
rank k takes micro-batch (step, accumulation index, k), the reference sums over all of them.
"""

import argparse

import torch
from safetensors.torch import save_file

from allora_ds.adapters import AdapterSpec, adapter_modules, inject_adapters

# Plain SGD (no momentum) so the update is exactly -LR * accumulated gradient. LR stays below the
# stability edge of the pretrained tiny model: at LR 1 its sharpness amplifies fp32 rounding ~20x
# per step, and two correct implementations drift apart after a few steps.
STEPS, GAS, MICRO, SEQ, LR = 3, 2, 2, 16, 0.1


def batch(step, acc, rank, vocab):
    g = torch.Generator().manual_seed(1000 * step + 10 * acc + rank)
    return torch.randint(3, vocab, (MICRO, SEQ), generator=g)


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def load(path, gc):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def spec(method):
    return AdapterSpec(method=method, rank=4, eta=2.0, alpha=8.0)


def reference(a):
    model = load(a.model, a.gc)
    inject_adapters(model, spec(a.method), seed=7)
    # Give B a nonzero start so the first steps already exercise grad_A and the row scale.
    torch.manual_seed(3)
    for m in adapter_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.02)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    vocab = model.config.vocab_size
    for step in range(STEPS):
        n = GAS * a.world
        for acc in range(GAS):
            for rank in range(a.world):
                (lm_loss(model, batch(step, acc, rank, vocab)) / n).backward()
        opt.step()
        opt.zero_grad()
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, a.out)


def distributed(a):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from allora_ds.distributed import init_distributed, leave_process_group

    rank, world, _ = init_distributed()
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "zero_optimization": {"stage": a.stage},
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise; the reference does not clip
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    keep = HfDeepSpeedConfig(cfg) if a.stage == 3 else None  # noqa: F841 - makes from_pretrained partition
    model = load(a.model, a.gc)
    if a.stage == 3:
        assert all(p.numel() == 0 or p.ds_numel == 0 for p in model.parameters()), "base not partitioned"
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            inject_adapters(model, spec(a.method), seed=7, verbose=rank == 0)
        assert all(hasattr(p, "ds_id") for p in model.parameters() if p.requires_grad), "adapters not partitioned"
    else:
        inject_adapters(model, spec(a.method), seed=7, verbose=rank == 0)
    torch.manual_seed(3)
    for m in adapter_modules(model).values():
        with deepspeed.zero.GatheredParameters([m.lora_B], modifier_rank=0, enabled=a.stage == 3):
            torch.nn.init.normal_(m.lora_B, std=0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=LR), config=cfg)
    engine.train()
    vocab = model.config.vocab_size
    for step in range(STEPS):
        for acc in range(GAS):
            engine.backward(lm_loss(engine, batch(step, acc, rank, vocab)))
            engine.step()
    out = {}
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            with deepspeed.zero.GatheredParameters([p], enabled=a.stage == 3):
                out[n] = p.detach().clone().contiguous()
    if rank == 0:
        save_file(out, a.out)
    leave_process_group()


if __name__ == "__main__":
    from allora_ds.errors import cli  # each rank ends through errors._exit, never in gloo's teardown abort

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--method", default="allora")
    p.add_argument("--gc", action="store_true")
    p.add_argument("--reference", action="store_true")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args()
    cli(reference if a.reference else distributed)(a)
