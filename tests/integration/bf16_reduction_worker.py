"""Worker for test_zero_equivalence's bf16 test: ZeRO-3 in bf16, with adapter gradients reduced
and accumulated in fp32 or in bf16, against a one-process bf16 reference.

    deepspeed --num_gpus 2 bf16_reduction_worker.py MODEL OUT --comm shipped|bf16   # shipped: zero3_bf16.json
    deepspeed --num_gpus 1 bf16_reduction_worker.py MODEL OUT --comm fp32 --as-ranks 2   # the reference

The reference is one process that runs every (accumulation index, rank) micro-batch of the 2-rank
run in turn, with the same bf16 kernels (so the same bf16 micro-batch gradients), and sums them in
fp32: the 2-rank runs can differ from it only in how they reduce and accumulate those gradients.
Plain SGD on DeepSpeed's fp32 master weights. Writes the masters before and after training to OUT.
"""

import argparse

import torch
from adapter_equivalence_worker import LR, MICRO, batch, lm_loss, spec
from safetensors.torch import save_file

from allora_ds.adapters import adapter_modules, inject_adapters
from allora_ds.ds_config import read_ds_config

STEPS, GAS = 2, 4


def load_bf16(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)


def init_adapters(model, gathered):
    torch.manual_seed(3)
    for m in adapter_modules(model).values():
        with gathered([m.lora_B]):
            torch.nn.init.normal_(m.lora_B, std=0.02)


def distributed(a):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers.integrations import HfDeepSpeedConfig

    from allora_ds.distributed import init_distributed, leave_process_group

    rank, world, _ = init_distributed()
    # One process standing in for a.as_ranks ranks runs their micro-batches as accumulation steps.
    gas = GAS * a.as_ranks
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas, "gradient_clipping": 0.0,
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if a.comm == "shipped":  # what ds_configs/zero3_bf16.json says about reduction and accumulation
        shipped = read_ds_config("zero3_bf16")
        cfg.update({k: shipped[k] for k in ("communication_data_type", "data_types") if k in shipped})
    else:
        cfg.update({"communication_data_type": a.comm, "data_types": {"grad_accum_dtype": a.comm}})
    keep = HfDeepSpeedConfig(cfg)  # noqa: F841 - makes from_pretrained partition
    model = load_bf16(a.model)
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        inject_adapters(model, spec("allora"), seed=7, verbose=False)
    init_adapters(model, lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=LR), config=cfg)
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]

    def master():
        return {n: safe_get_full_fp32_param(p).detach().float().cpu().clone()
                for n, p in engine.module.named_parameters() if p.requires_grad}

    out = {f"init.{n}": t for n, t in master().items()}
    vocab = model.config.vocab_size
    for step in range(STEPS):
        for k in range(GAS):
            for r in range(a.as_ranks) if a.as_ranks > 1 else [rank]:
                engine.backward(lm_loss(engine, batch(step, k, r, vocab)))
                engine.step()
    out.update({f"final.{n}": t for n, t in master().items()})
    assert len(out) == 2 * len(names)
    if rank == 0:
        save_file(out, a.out)
    leave_process_group()


if __name__ == "__main__":
    from allora_ds.errors import cli  # each rank ends through errors._exit, never in gloo's teardown abort

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--comm", choices=("shipped", "fp32", "bf16"), default="shipped")
    p.add_argument("--as-ranks", type=int, default=1)
    p.add_argument("--local_rank", type=int, default=0)
    cli(distributed)(p.parse_args())
