"""Activation-checkpoint offload to host memory (ALST, arXiv 2506.13996), ``model.activation_offload``.

With gradient checkpointing, what a decoder layer keeps on the GPU between forward and backward is
its input, ``[tokens, hidden]`` per layer: for Llama-3-8B at 128k tokens on one GPU that is 32 x
128k x 4096 x 2 bytes = 32 GiB, the largest share of a long sequence's memory once the MLP is tiled.
Offload moves each layer's input to pinned host memory as soon as the layer has run and brings it
back just before the layer's recompute in backward.

The work is DeepSpeed's ``CheckpointHiddenStatesOffload`` (``runtime/activation_checkpointing/
offload_activations.py``, DeepSpeed >= 0.19): a ``saved_tensors_hooks`` context that, while active,
marks the ``hidden_states`` argument of every ``GradientCheckpointingLayer`` call and packs only
that tensor, when torch's non-reentrant checkpoint saves its inputs. On a GPU the copies run on a
side stream into pooled pinned buffers (the compute stream waits on an event before a restored
input is used; nothing waits on the host), the newest layer input stays on the device (backward
needs it first) and the two newest offloaded ones keep their device copy until their copy is done.
On a synchronized accelerator (DeepSpeed's CPU accelerator) there is nowhere to offload to and the
inputs stay where they are.

This module marks the tensor to offload where it works under ZeRO-3 too (``install``) and decides
when the context is active: around all the micro-batches of one optimizer step
(``train.train_step``), so that its exit, which waits for the copy stream to drain, falls next to
the step's one host sync instead of after every micro-batch. Its host buffer pool holds one buffer
per decoder layer, so that a step of same-length micro-batches allocates (and pins) no host memory
after the first.
"""

from __future__ import annotations

from allora_ds.errors import UserError

# DeepSpeed's default stash: how many offloaded inputs keep their device copy until their
# device-to-host copy has finished (what the planner counts as still on the GPU, with the one kept)
FORWARD_STASH = 2
KEEP_LAST = 1


def check(enabled: bool) -> None:
    """``model.activation_offload`` needs a DeepSpeed that has it (config.validate checks the rest)."""
    if not enabled:
        return
    try:
        import deepspeed.runtime.activation_checkpointing.offload_activations  # noqa: F401
    except ImportError:
        import deepspeed

        raise UserError(f"model.activation_offload=true: the installed DeepSpeed {deepspeed.__version__} has no "
                        "checkpoint offload (deepspeed.runtime.activation_checkpointing.offload_activations, "
                        "DeepSpeed >= 0.19); upgrade deepspeed or set it to false") from None


def install(model):
    """Offload ``model``'s checkpointed layer inputs while the returned context is active.

    Returns DeepSpeed's offload manager (its ``stats`` count what moved), to be entered around each
    optimizer step's forwards and backwards. DeepSpeed marks the tensor to offload by its id when
    a ``GradientCheckpointingLayer`` is called; under ZeRO-3 that mark never matches, because
    ZeRO-3's forward pre-hook hands the layer's ``forward`` a new (detached alias) tensor, and
    nothing is offloaded, silently. So the mark is set here, by the layer's checkpoint function,
    on the very tensor torch's checkpoint saves."""
    import torch
    from deepspeed.runtime.activation_checkpointing.offload_activations import CheckpointHiddenStatesOffload
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    manager = CheckpointHiddenStatesOffload(keep_last_count=KEEP_LAST, max_fwd_stash_count=FORWARD_STASH,
                                            max_cpu_buffer_pool_count=max(len(layers), 1))

    def marking(checkpoint):
        def checkpoint_marking_input(function, *args, **kwargs):
            marked = args[0] if args and torch.is_tensor(args[0]) and torch.is_grad_enabled() else None
            if marked is not None:
                manager.mark(marked)
            try:
                return checkpoint(function, *args, **kwargs)
            finally:  # a mark the pack hook did not take (the manager was not active) must not linger
                if marked is not None:
                    manager._consume_mark(marked)
        return checkpoint_marking_input

    for layer in layers:
        layer._gradient_checkpointing_func = marking(layer._gradient_checkpointing_func)
    return manager


def offloads_here() -> bool:
    """Whether this accelerator has a device memory to offload from (DeepSpeed skips synchronized ones)."""
    from deepspeed.accelerator import get_accelerator

    return not get_accelerator().is_synchronized_device()
