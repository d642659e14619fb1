"""Worker for test_sequence_parallel: set up the real trainer, run optimizer steps, and record the
whole adapter gradient of each step (before the optimizer applies it) and each step's loss.

    deepspeed --num_gpus N sequence_parallel_worker.py CONFIG.yaml OUT.safetensors [overrides...]

The gradient is read at the accumulation boundary, after DeepSpeed's reduction and before its
step (``safe_get_full_grad``: the full, reduced gradient under ZeRO-0/1/2/3, a collective under
ZeRO-3); rank 0 writes ``step{k}.{name}`` for every adapter parameter, ``loss`` (per step), and
``eval`` (the eval loss and token count before training), ``counts``, summed over ranks and steps: tokens and attention pairs the metrics count, micro-batches
whose length SP does not divide, and micro-batches whose slice on some rank holds no label; and
``offload``, summed over ranks and steps: the layer inputs model.activation_offload moved to host,
brought back, kept on the device, and skipped; ``secondary``: rank 0's parameters that have an hpZ
secondary copy after the steps.

With ``--emulate-offload-device`` DeepSpeed's offload engine moves the layer inputs on this CPU
accelerator as it does on a GPU (allora_ds/_testing/offload.py).
"""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from allora_ds import sequence_parallel
from allora_ds.config import load_config
from allora_ds.data import IGNORE
from allora_ds.distributed import all_reduce_sum, leave_process_group
from allora_ds.train import evaluate, setup, train_step

STEPS = 2


def main(config, out, overrides):
    from deepspeed.utils import safe_get_full_grad

    run = setup(load_config(config, overrides))
    eng = run.engine
    params = [(n, p) for n, p in eng.module.named_parameters() if p.requires_grad]
    grads: dict[str, torch.Tensor] = {}
    real_step = eng.step

    def step_recording_gradients():
        if eng.is_gradient_accumulation_boundary():
            for n, p in params:
                grads[f"step{run.step + 1}.{n}"] = safe_get_full_grad(p).detach().float().clone()
        real_step()

    eng.step = step_recording_gradients
    padded = [0]
    real_shard = sequence_parallel.shard

    def shard_counting_padding(batch, layout, pad_id):
        padded[0] += batch["input_ids"].shape[1] % layout.size != 0
        return real_shard(batch, layout, pad_id)

    sequence_parallel.shard = shard_counting_padding
    losses, tokens, pairs, unlabelled = [], 0, 0, 0
    moved = torch.zeros(4, dtype=torch.float64)  # offloaded, restored, kept on the device, skipped
    with run.teardown:
        initial_eval = evaluate(run)
        for _ in range(STEPS):
            share, sb, applied = train_step(run)
            assert applied
            dist.all_reduce(share)
            losses.append(share.item())
            tokens, pairs = tokens + sb.tokens, pairs + sb.causal_pairs
            unlabelled += sum(int((b["labels"] == IGNORE).all()) for b in sb.batches)
            if hasattr(run.offload, "stats"):  # the counts of this step (the context resets them on entry)
                st = run.offload.stats
                moved += torch.tensor([st.offloaded_tensors, st.restored_tensors, st.kept_last_tensors,
                                       st.skipped_marked_tensors], dtype=torch.float64)
            run.step += 1
    secondary = sum(getattr(p, "ds_secondary_tensor", None) is not None for p in eng.module.parameters())
    counts = all_reduce_sum([tokens, pairs, padded[0], unlabelled], eng.device)
    moved = all_reduce_sum(moved.tolist(), eng.device)
    if run.rank == 0:
        save_file({**{k: v.contiguous() for k, v in grads.items()}, "loss": torch.tensor(losses, dtype=torch.float64),
                   "counts": torch.tensor(counts, dtype=torch.float64),
                   "offload": torch.tensor(moved, dtype=torch.float64), "secondary": torch.tensor(float(secondary)),
                   "eval": torch.tensor([initial_eval["eval_loss"], initial_eval["eval_tokens"]], dtype=torch.float64)},
                  out)
    leave_process_group()


if __name__ == "__main__":
    from allora_ds.errors import cli  # each rank ends through errors._exit, never in gloo's teardown abort

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if "--emulate-offload-device" in args:
        args.remove("--emulate-offload-device")
        from allora_ds._testing import offload

        offload.emulate_device()
    cli(main)(args[0], args[1], args[2:])
