"""Logits of the trained model inside the trainer: resume a run's checkpoint through the real
``allora_ds.train.setup`` (ZeRO-3, deepspeed launcher) and run the engine on fixed inputs.

    deepspeed --num_gpus 2 logits_worker.py CONFIG CHECKPOINT OUT.safetensors
"""

import sys

import torch
from safetensors.torch import save_file

from allora_ds.config import load_config
from allora_ds.train import setup

INPUTS = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80], [1, 9, 8, 7, 6, 5, 4, 3]])


def main(config, ckpt, out):
    cfg = load_config(config, [f"train.resume={ckpt}", f"train.output_dir={out}.run"])
    run = setup(cfg)
    run.engine.eval()
    with torch.no_grad():
        logits = run.engine(input_ids=INPUTS.to(run.engine.device)).logits.float().cpu()
    if run.rank == 0:
        save_file({"logits": logits.contiguous(), "inputs": INPUTS}, out)


if __name__ == "__main__":
    from allora_ds.errors import cli  # each rank ends through errors._exit, never in gloo's teardown abort

    cli(main)(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
