"""Run DeepSpeed's activation-offload engine for real on the CPU accelerator (tests only).

DeepSpeed skips every tensor on a synchronized accelerator (its CPU one): nothing would move, and a
test could not tell an offloaded input from one that stayed. Here the engine skips only what it
skips on a GPU (small tensors, parameters, aliased views): every layer input it offloads is copied
into a host buffer of its pool, the saved tensor is replaced by a reference, and backward copies it
into a new tensor, as on a GPU (there: on a side stream, into pinned buffers).
"""

from __future__ import annotations

import torch


def should_skip_as_on_a_gpu(engine, tensor: torch.Tensor) -> bool:
    return (engine._num_bytes(tensor) < engine.min_offload_bytes or isinstance(tensor, torch.nn.Parameter)
            or (tensor.numel() > 1 and 0 in tensor.stride()))


def emulate_device() -> None:
    from deepspeed.runtime.activation_checkpointing import offload_activations

    offload_activations._ActivationOffloadEngine._should_skip = should_skip_as_on_a_gpu
