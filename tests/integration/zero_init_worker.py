"""Worker for test_zero_init: inject adapters under ``deepspeed.zero.Init`` as on a GPU node.

    python zero_init_worker.py OUT --dtype bfloat16 [--target-meta]

On a GPU, ``zero.Init`` makes ``torch.empty/zeros/randn/...`` called without ``device=`` create on
``cuda:LOCAL_RANK`` and casts floats to the training dtype. On CPU ranks its target device is the
CPU, which hides any init that mixes such a tensor with a CPU generator. ``--target-meta`` makes
DeepSpeed's constructor wrapper target the ``meta`` device instead: a tensor that the wrapper
placed is then unusable, exactly as a CUDA tensor is for a CPU generator.

Every RNG call made during injection is checked: its generator must be on its tensor's device.
Writes the gathered adapter weights (in the training dtype) to OUT (safetensors).
"""

import argparse
import functools

import torch
from safetensors.torch import save_file

from allora_ds.adapters import AdapterSpec, adapter_modules, inject_adapters
from allora_ds.tiny import tiny_llama_config

RNG_CALLS: list[str] = []


def _check_generator(name, fn):
    """Wrap an RNG function: record it and fail if its generator is not on its output's device."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        gen = kwargs.get("generator")
        if gen is not None:
            assert gen.device.type == out.device.type, \
                f"{name}: generator on {gen.device} draws into a tensor on {out.device}"
        RNG_CALLS.append(f"{name}@{out.device.type}")
        return out

    return wrapped


def install_rng_checks():
    for name in ("rand", "randn", "randint"):
        setattr(torch, name, _check_generator(f"torch.{name}", getattr(torch, name)))
    for name in ("uniform_", "normal_", "random_"):
        setattr(torch.Tensor, name, _check_generator(f"Tensor.{name}", getattr(torch.Tensor, name)))


def target_meta():
    """DeepSpeed's tensor-constructor wrapper, but placing tensors on ``meta`` instead of the CPU."""
    from deepspeed.runtime.zero import partition_parameters as pp

    original = pp.zero_wrapper_for_fp_tensor_constructor

    def meta_wrapper(fn, target_fp_dtype, target_device):
        return original(fn, target_fp_dtype, torch.device("meta"))

    pp.zero_wrapper_for_fp_tensor_constructor = meta_wrapper


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--stage", type=int, default=3, choices=(0, 3))
    p.add_argument("--target-meta", action="store_true")
    a = p.parse_args()

    import deepspeed

    from allora_ds.distributed import init_distributed

    init_distributed()  # a world of one
    bf16 = a.dtype == "bfloat16"
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": bf16}}
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=64, hidden=32, layers=2)).to(getattr(torch, a.dtype))
    if a.target_meta:
        target_meta()
    install_rng_checks()
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=a.stage == 3):
        inject_adapters(model, AdapterSpec(rank=4), seed=11, verbose=False)
    assert RNG_CALLS, "no RNG call seen during injection: the check saw nothing"
    out = {}
    for name, m in adapter_modules(model).items():
        params = [m.lora_A, m.lora_B]
        if a.stage == 3:
            assert all(hasattr(q, "ds_id") for q in params), f"{name}: adapters not partitioned by zero.Init"
        with deepspeed.zero.GatheredParameters(params, enabled=a.stage == 3):
            out[f"{name}.lora_A"] = m.lora_A.detach().clone().cpu()
            out[f"{name}.lora_B"] = m.lora_B.detach().clone().cpu()
    save_file(out, a.out)


if __name__ == "__main__":
    from allora_ds.errors import cli  # each rank ends through errors._exit, never in gloo's teardown abort

    cli(main)()
