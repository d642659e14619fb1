"""model.activation_offload: DeepSpeed's checkpoint offload, marked where ZeRO-3 cannot hide it."""

import importlib.util
import sys

import pytest
import torch

from allora_ds import activation_offload
from allora_ds.config import load_config
from allora_ds.errors import UserError

needs_offload = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed.runtime.activation_checkpointing.offload_activations") is None,
    reason="this DeepSpeed has no checkpoint offload")


def test_config_needs_checkpointing(tmp_path):
    base = {"model": {"path": "m", "activation_offload": True}, "data": {"train": "t.jsonl"}}
    with pytest.raises(UserError, match="model.activation_offload: needs model.gradient_checkpointing=true"):
        load_config(None, base=base)
    base["model"]["gradient_checkpointing"] = True
    assert load_config(None, base=base).model.activation_offload


def test_a_deepspeed_without_it_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed.runtime.activation_checkpointing.offload_activations", None)
    with pytest.raises(UserError, match=r"model.activation_offload=true: the installed DeepSpeed .* has no checkpoint"):
        activation_offload.check(True)
    activation_offload.check(False)


def _alias_inputs(module, args):
    """What ZeRO-3's forward pre-hook does to a module's inputs (parameter_offload.py,
    PostBackwardFunctionModule): the module's forward gets a new tensor object on the same storage,
    still in the graph."""
    return tuple(a.view_as(a) if torch.is_tensor(a) else a for a in args)


@needs_offload
@pytest.mark.parametrize("zero3_hooks", [False, True])
def test_every_layer_input_but_the_newest_goes_to_host_and_back(tiny_model, monkeypatch, zero3_hooks):
    from deepspeed.runtime.activation_checkpointing import offload_activations
    from transformers import AutoModelForCausalLM

    from allora_ds._testing.offload import should_skip_as_on_a_gpu
    from allora_ds.adapters import AdapterSpec, adapter_modules, inject_adapters

    monkeypatch.setattr(offload_activations._ActivationOffloadEngine, "_should_skip", should_skip_as_on_a_gpu)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    inject_adapters(model, AdapterSpec(method="allora", rank=4, eta=2.0), seed=1, verbose=False)
    for m in adapter_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.02, generator=torch.Generator().manual_seed(0))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if zero3_hooks:
        for layer in model.model.layers:
            layer.register_forward_pre_hook(_alias_inputs)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    def grads(ctx):
        model.zero_grad()
        with ctx:
            for _ in range(2):  # two micro-batches in one step, as train_step enters it
                model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref = grads(torch.enable_grad())
    manager = activation_offload.install(model)
    got = grads(manager)
    layers = model.config.num_hidden_layers
    st = manager.stats
    # DeepSpeed's own mark (by id, at the layer's __call__) misses under ZeRO-3's hook: without
    # install's mark, offloaded_tensors would be 0 there
    assert (st.offloaded_tensors, st.restored_tensors, st.kept_last_tensors) == (2 * (layers - 1), 2 * (layers - 1), 2)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    with torch.no_grad(), manager:  # eval: nothing is marked or moved
        model(input_ids=ids)
    assert manager.stats.offloaded_tensors == 0
