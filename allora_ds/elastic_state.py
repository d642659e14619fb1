"""The adapters' optimizer state in a world-size-free form: fp32 master weights, Adam moments and
step counts by parameter name, so that a checkpoint continues on any number of ranks and under any
ZeRO layout (ZeRO-2, ZeRO-3, ZeRO-3 + hpZ, offload), not only the one that wrote it.

Layout of ``CHECKPOINT/elastic/``:

    rank-00000.safetensors    the ranges of each trainable parameter that rank's optimizer
                              partition holds: ``NAME/exp_avg``, ``NAME/exp_avg_sq`` (1-D, float32)
                              and the optimizer's step count ``@step``; metadata ``slices``:
                              {NAME: [start, numel, full numel]} in the flattened parameter
    rank-00001.safetensors    ...

The fp32 masters are not repeated here: the checkpoint's ``adapter_model.safetensors`` holds them
whole (``checkpoint.gather_adapter_state``). Each rank writes only what it owns, so no rank ever
holds the whole state. A loader reads, for each parameter, the range its own partition needs from
the files that hold it (safetensors reads slices lazily) and writes it into DeepSpeed's partition
through the fragment APIs ZeRO keeps for exactly this (``deepspeed.utils.safe_{get,set}_local_*``
under ZeRO-3, ``param._hp_mapping`` under ZeRO-1/2). The values are copied bit for bit.

Why not DeepSpeed's universal checkpoint (``ds_to_universal`` + ``"load_universal": true``)? On
our frozen-base checkpoints (DeepSpeed 0.19.8) it converts and reloads ZeRO-3 -> ZeRO-3 and
ZeRO-2 -> ZeRO-2 at another world size exactly, but it needs an offline conversion that reads
every rank's partition in one process and writes a second copy, its loader unpickles
(``weights_only=False``), and it cannot cross stages: a ZeRO-3 conversion loaded under ZeRO-2
fails (no ``mp_rank_00_model_states.pt``; then "Empty ds_version in checkpoint"), and a ZeRO-2 one
under ZeRO-3 fails in the state-dict loader. It carries no data position or RNG either.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DIR = "elastic"
FP32 = "fp32"
STEP = "@step"


def file_name(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def supported(engine) -> bool:
    """Whether this engine's optimizer is one whose partitions ``save`` and ``load`` reach: ZeRO 1-3."""
    return engine.zero_optimization_stage() in (1, 2, 3)


def save(engine, directory: Path, rank: int, masters: bool = False) -> None:
    """Write this rank's ranges of every trainable parameter's optimizer state (no collective);
    with ``masters`` its fp32 masters too (``NAME/fp32``: a checkpoint has them in its adapter file)."""
    tensors, slices, step = {}, {}, None
    for name, p in _named_trainable(engine):
        owned = _owned(engine, p)
        if owned is None:
            continue
        start, numel, values = owned
        slices[name] = [start, numel, p.ds_numel if _is_zero3(p) else p.numel()]
        for key, value in values.items():
            if key == FP32 and not masters:
                continue
            tensors[f"{name}/{key}"] = value.detach().narrow(0, 0, numel).float().cpu().contiguous()
    for state in engine.optimizer.optimizer.state.values():
        step = state.get("step", step)
    if step is not None:
        tensors[STEP] = torch.as_tensor(step).detach().cpu().reshape(1).clone()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / file_name(rank), metadata={"slices": json.dumps(slices)})


def load(engine, directory: Path, masters_file: Path) -> None:
    """Set this rank's partition of masters (from ``masters_file``, full fp32 tensors by name) and
    of moments and step counts (from ``directory``).

    A collective (the low-precision weights are refreshed from the masters on every rank): all
    ranks call it. The files may come from any world size and any of the layouts ``save`` handles.
    """
    files = sorted(Path(directory).glob("rank-*.safetensors"))
    with ExitStack() as stack:
        readers = [stack.enter_context(safe_open(f, framework="pt")) for f in files]
        whole = stack.enter_context(safe_open(masters_file, framework="pt"))
        index: dict[str, list] = {}  # name -> [(reader, start, numel)]
        for r in readers:
            for name, (start, numel, _) in json.loads(r.metadata()["slices"]).items():
                index.setdefault(name, []).append((r, start, numel))
        step = next((r.get_tensor(STEP).reshape(()) for r in readers if STEP in r.keys()), None)
        keys = sorted({k.split("/")[-1] for r in readers for k in r.keys() if k != STEP} - {FP32})

        def read(name: str, key: str, start: int, numel: int) -> torch.Tensor:
            if key == FP32:  # the rows of the whole tensor that hold the range, then the range
                t = whole.get_slice(name)
                shape = t.get_shape()
                row = math.prod(shape[1:]) if len(shape) > 1 else 1
                first, last = start // row, (start + numel - 1) // row + 1 if numel else start // row
                rows = t[first:last].reshape(-1).float()
                return rows[start - first * row:start - first * row + numel]
            out = torch.zeros(numel, dtype=torch.float32)
            for r, s, n in index.get(name, []):
                lo, hi = max(start, s), min(start + numel, s + n)
                if lo < hi:
                    out[lo - start:hi - start] = r.get_slice(f"{name}/{key}")[lo - s:hi - s]
            return out

        missing = [name for name, _ in _named_trainable(engine) if name not in index or name not in whole.keys()]
        if missing:
            raise KeyError(f"no optimizer state for {len(missing)} trainable parameter(s), e.g. {missing[0]}")
        if any(_is_zero3(p) for p in _trainable(engine)):
            _load_zero3(engine, read, keys, step)
        else:
            _load_fragments(engine, read, keys, step)


# ---------------------------------------------------------------------------------------------
# layouts


def _is_zero3(p) -> bool:
    return hasattr(p, "ds_id")


def _trainable(engine):
    return [p for p in engine.module.parameters() if p.requires_grad]


def _named_trainable(engine):
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _owned(engine, p) -> tuple[int, int, dict[str, torch.Tensor]] | None:
    """(start, numel, {key: local values}) of the range of ``p`` this rank's optimizer holds."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    if _is_zero3(p):
        # A rank's partition is one contiguous range of the flattened parameter, the last one padded.
        part = p.ds_tensor.ds_numel
        start = _partition_rank(p) * part
        numel = max(0, min(part, p.ds_numel - start))
        if numel == 0:
            return None
        values = {FP32: safe_get_local_fp32_param(p)}
        for key in _state_keys(engine, engine.optimizer.fp32_partitioned_groups_flat):
            values[key] = safe_get_local_optimizer_state(p, key)
        return start, numel, values
    m = getattr(p, "_hp_mapping", None)
    if m is None:  # this rank's partition holds none of it
        return None
    values = {FP32: m.get_hp_fragment()}
    for key in (m.get_optim_state_keys() if m.optim_fragment else []):
        values[key] = m.get_hp_fragment(key)
    return m.lp_fragment_address.start, m.lp_fragment_address.numel, values


def _state_keys(engine, flats) -> list[str]:
    """The optimizer's per-element states (Adam: exp_avg, exp_avg_sq), as DeepSpeed's fragments see them."""
    state = engine.optimizer.optimizer.state
    return sorted({k for f in flats if f in state for k, v in state[f].items()
                   if torch.is_tensor(v) and v.shape == f.shape})


def _ensure_state(engine, flat: torch.Tensor, keys: list[str], step) -> dict:
    """The optimizer state of one flat fp32 partition, created as torch's optimizer would on its first step."""
    state = engine.optimizer.optimizer.state[flat]
    for key in keys:
        if key not in state:
            state[key] = torch.zeros_like(flat)
    if step is not None:  # torch keeps the count on the host unless the optimizer is capturable or fused
        group = engine.optimizer.optimizer.param_groups[0]
        state["step"] = step.clone().to(flat.device if group.get("capturable") or group.get("fused") else "cpu")
    return state


def _load_zero3(engine, read, keys, step) -> None:
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    opt = engine.optimizer
    opt.checkpoint_event_prologue()  # every parameter partitioned, as DeepSpeed's own load does
    for flat in opt.fp32_partitioned_groups_flat:
        _ensure_state(engine, flat, keys, step)
    for name, p in _named_trainable(engine):
        part = p.ds_tensor.ds_numel
        start = _partition_rank(p) * part
        numel = max(0, min(part, p.ds_numel - start))
        for key in [FP32, *keys]:
            value = torch.zeros(part, dtype=torch.float32)
            value[:numel] = read(name, key, start, numel)
            value = value.to(engine.device)
            if key == FP32:
                safe_set_local_fp32_param(p, value)
            else:
                safe_set_local_optimizer_state(p, value, key)
    # What ZeRO-3's step does after an update: the low-precision partitions from the masters.
    for sub_group in range(len(opt.fp16_groups)):
        opt._reassign_or_swap_out_partitioned_parameters(sub_group)
    opt.checkpoint_event_epilogue()  # gathers the persistent (whole) parameters again


def _load_fragments(engine, read, keys, step) -> None:
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    opt = engine.optimizer
    names = {id(p): n for n, p in _named_trainable(engine)}
    for group, flat in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
        for p in group:
            m = getattr(p, "_hp_mapping", None)
            if m is None:
                continue
            addr = m.lp_fragment_address
            m.hp_fragment.data.copy_(read(names[id(p)], FP32, addr.start, addr.numel).to(m.hp_fragment.device))
            m.optim_fragment = {key: read(names[id(p)], key, addr.start, addr.numel).to(flat.device) for key in keys}
        if keys:  # DeepSpeed's own helper builds the flat states from the fragments (padding zero)
            map_to_flat_opt_states(flat, group, opt.optimizer.state, keys)
        _ensure_state(engine, flat, keys, step)
    opt.update_lp_params()  # each rank's fp32 partition into the low-precision weights, all-gathered


def _partition_rank(p) -> int:
    """Which partition of ``p`` this rank holds (DeepSpeed < 0.17 has no ``ds_zero_partition_rank``)."""
    import torch.distributed as dist

    rank = getattr(p, "ds_zero_partition_rank", None)
    return dist.get_rank(group=p.ds_process_group) if rank is None else rank
