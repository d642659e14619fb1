"""allora-plan: memory, communication and step time of each ZeRO layout for a model and a cluster,
and the layout to use.

    allora-plan --model llama3-8b --nodes 2 --gpus-per-node 8 --gpu-mem 80 --seq-len 2048 --micro-batch 1
    allora-plan --model /models/Meta-Llama-3-70B --nodes 2 --gpus-per-node 8 --seq-len 2048 --micro-batch 1 \\
        --inter-bw 50 --gpu-tflops 989 --json

Candidates: ZeRO-2 (base replicated), ZeRO-3, ZeRO-3 + hpZ (a second copy of the base partitioned
within each node, so that its gathers stay inside the node), ZeRO-3 + CPU offload; each with and
without gradient checkpointing. For each: memory per GPU (base, adapters, optimizer, gathered
working set, activations with and without checkpointing, loss path, buffers), communication per
optimizer step split into intra- and inter-node traffic (bytes from ``allora_ds.zero_comm``, checked
against counted bytes by bench/comm.py), and step time = max(compute at an assumed MFU,
communication at the given bus bandwidths). The recommendation is the fastest layout that fits;
it names the ds_configs/ file and the overrides that implement it.

Model-state memory is checked against bench/memory.py (tests/unit/test_plan.py). Activations are
an estimate (tensors autograd keeps per token and layer), not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from allora_ds import activation_offload
from allora_ds.ds_config import fill_ds_config, read_ds_config
from allora_ds.errors import UserError, cli
from allora_ds.zero_comm import (
    SHAPES, TARGETS, Shape, llama_modules, shape_from_config, step_bytes, ulysses_bytes, wire_bytes,
)

GB = 1e9
LAYOUTS = {  # name -> (shipped DeepSpeed config, what it is)
    "zero2": ("zero2_bf16", "ZeRO-2: base replicated"),
    "zero3": ("zero3_bf16", "ZeRO-3"),
    "zero3_hpz": ("zero3_hpz_bf16", "ZeRO-3 + hpZ within a node"),
    "zero3_offload": ("zero3_offload_bf16", "ZeRO-3 + CPU offload"),
}
PREFERENCE = ("zero2", "zero3_hpz", "zero3", "zero3_offload")  # among equally fast layouts: the simplest
CUDA_CONTEXT = 2 * GB  # CUDA context, NCCL and allocator slack not counted elsewhere
PCIE_BW = 25.0  # GB/s host<->device per GPU, for offload
# allora-plan --sequence-parallel auto: a sequence that fills a GPU but for this share (activations
# are an estimate; allocator fragmentation grows with tensor size) gets split over more GPUs
AUTO_SP_HEADROOM = 0.10


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_mem_gb: float = 80.0
    intra_bw: float = 200.0  # GB/s bus bandwidth of a collective within a node (NVLink)
    inter_bw: float = 25.0  # GB/s bus bandwidth per GPU of a collective across nodes (NIC)
    gpu_tflops: float = 989.0  # dense bf16 peak (H100/H200 SXM)
    mfu: float = 0.4
    host_mem_gb: float = 2048.0  # host memory per node (DGX H100/H200: 2 TB), for offload

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Workload:
    seq_len: int
    micro_batch: int
    grad_accum: int = 1
    rank: int = 16
    targets: tuple = TARGETS
    sequence_parallel: int = 1  # GPUs sharing each sequence (train.sequence_parallel_size)
    mlp_tiles: int = 1  # model.mlp_tiles
    activation_offload: bool = False  # model.activation_offload (with checkpointing)

    @property
    def tokens(self) -> int:
        """Tokens one GPU holds per micro-batch: its slice of each sequence (padded to SP)."""
        return -(-self.seq_len // self.sequence_parallel) * self.micro_batch


# ---------------------------------------------------------------------------------------------
# memory


def activation_bytes_per_token_layer(s: Shape, w: Workload) -> float:
    """Bytes autograd keeps for backward per token of this GPU's slice and decoder layer, for a
    bf16 model with flash attention or sdpa without a mask (what long rows and packed rows run),
    counted storage by storage on a real layer (tests/unit/test_plan.py):

    * each RMSNorm's fp32 upcast of its input and its fp32 1/rms (transformers computes the norm
      in fp32), and its bf16 output where an adapter of the projections it feeds needs it;
    * what the attention kernel saves: rotated q and k, v (after Ulysses' all-to-all a GPU holds
      every token of ``heads / SP`` heads, the size of its slice of every head; KV heads repeated
      up to SP when fewer), its output and the fp32 log-sum-exp per head;
    * under Ulysses (SP > 1) the output's all-to-all back makes o_proj's input a storage of its
      own (at SP = 1 it is a view of the kernel's output);
    * the MLP's gate, its activation and up (SiLU's and the product's inputs), and the product
      where down_proj has an adapter; a tiled MLP (model.mlp_tiles) holds them for one tile;
    * each adapter's r-wide intermediate.

    The frozen projections save no inputs; the rotary tables are shared by all layers (not counted)."""
    t = set(w.targets)
    q = s.heads * s.head_dim
    kv = max(s.kv_heads, w.sequence_parallel) * s.head_dim
    adapted_norm_outputs = bool(t & {"q_proj", "k_proj", "v_proj"}) + bool(t & {"gate_proj", "up_proj"})
    norms = 2 * 4 * (s.hidden + 1) + 2 * s.hidden * adapted_norm_outputs
    attention = 2 * (2 * q + 2 * kv) + (2 * q if w.sequence_parallel > 1 else 0) + 4 * s.heads
    mlp = 2 * s.intermediate * (3 + ("down_proj" in t)) / w.mlp_tiles
    return norms + attention + mlp + 2 * w.rank * len(t & set(TARGETS))


def loss_path_bytes(s: Shape, tokens: int, chunked: bool = True) -> float:
    """allora_ds.loss: one chunk of fp32 logits (chunk rows x vocab, about 2^26 values), held as
    bf16 logits, their fp32 copy and the fp32 and bf16 gradient (6 bytes per value), plus the
    [tokens, hidden] gradient it returns. transformers' loss: [tokens, vocab] bf16 logits, their
    fp32 upcast and fp32 log-softmax."""
    from allora_ds.loss import chunk_rows

    if chunked:
        return 6 * min(chunk_rows(s.vocab), tokens) * s.vocab + 2 * tokens * s.hidden
    return (2 + 4 + 4) * tokens * s.vocab


def model_states(s: Shape, ds: dict, world: int, rank: int, targets=TARGETS) -> dict:
    """Bytes per GPU of the weights and optimizer, as bench/memory.py accounts them after a step.

    ZeRO-3 keeps every parameter's shard (2 bytes x numel / N, bf16) plus whole copies of those at
    most ``stage3_param_persistence_threshold`` elements; hpZ adds a secondary shard of every frozen
    weight over the node; ZeRO-2 keeps the bf16 weights whole. The optimizer holds 14 bytes per
    adapter parameter per GPU (fp32 master, two fp32 moments, a bf16 copy of the shard), measured."""
    z = ds["zero_optimization"]
    params = [p for ps in llama_modules(s, rank, targets).values() for p in ps]
    frozen = sum(p.numel for p in params if not p.trainable)
    adapters = sum(p.numel for p in params if p.trainable)
    if z.get("stage") != 3:
        return {"base": 2 * frozen, "adapters": 2 * adapters, "optimizer": 14 * adapters / world}
    threshold = z["stage3_param_persistence_threshold"]
    whole = lambda trainable: sum(p.numel for p in params if p.trainable == trainable and p.numel <= threshold)  # noqa: E731
    hpz = int(z.get("zero_hpz_partition_size", 1) or 1)
    offload = "offload_param" in z
    base = 2 * whole(False) + (0 if offload else 2 * frozen / world) + (2 * frozen / hpz if hpz > 1 else 0)
    return {"base": base, "adapters": 2 * whole(True) + (0 if offload else 2 * adapters / world),
            "optimizer": 0.0 if "offload_optimizer" in z else 14 * adapters / world}


def memory(layout: str, s: Shape, ds: dict, c: Cluster, w: Workload) -> dict:
    """GB per GPU by component, for ``layout`` with its filled DeepSpeed config ``ds``."""
    z = ds["zero_optimization"]
    zero3 = z.get("stage") == 3
    offload = "offload_param" in z
    adapters = s.adapter_numel(w.rank, w.targets)
    states = model_states(s, ds, c.world, w.rank, w.targets)
    # the fp32 gradient shard micro-batches accumulate into (grad_accum_dtype fp32)
    grads = 0.0 if (zero3 and "offload_optimizer" in z) else 4 * adapters / c.world
    working = 0.0
    if zero3:  # gathered weights alive at once (DeepSpeed's live limit, at least a layer) + the LM head
        live = max(min(z["stage3_max_live_parameters"], s.frozen_numel()), s.layer_numel())
        working = 2 * (live + s.vocab * s.hidden)
    # overlap_comm's reduce buckets (about 4.5 x the bucket) in the communication dtype (fp32)
    buffers = 4.5 * z.get("reduce_bucket_size", s.hidden ** 2) * 4
    tokens = w.tokens
    per_layer = activation_bytes_per_token_layer(s, w) * tokens
    # with checkpointing the layer inputs stay, one layer is recomputed; activation offload keeps
    # the newest input and those whose copy to host is in flight (activation_offload.py)
    inputs_on_gpu, inputs_on_host = activation_inputs(s, w)
    parts = {**states, "gradients": grads, "working": working, "buffers": buffers,
             "activations_ckpt": inputs_on_gpu * 2 * s.hidden * tokens + per_layer,
             "activations_no_ckpt": s.layers * per_layer,
             "loss_path": loss_path_bytes(s, tokens), "context": CUDA_CONTEXT}
    # offload: pinned host memory per node, the node's share of the base, adapters and optimizer
    host = (2 * s.frozen_numel() + 18 * adapters) / c.nodes if offload else 0.0
    # activation offload (with checkpointing): every GPU's offloaded layer inputs, pinned
    host_act = inputs_on_host * 2 * s.hidden * tokens * c.gpus_per_node
    return {k: v / GB for k, v in parts.items()} | {"host_per_node": host / GB, "host_activations_per_node": host_act / GB}


def activation_inputs(s: Shape, w: Workload) -> tuple[int, int]:
    """Checkpointed layer inputs held on the GPU and in host memory per micro-batch."""
    if not w.activation_offload:
        return s.layers, 0
    on_host = max(s.layers - activation_offload.KEEP_LAST, 0)
    return min(s.layers, activation_offload.KEEP_LAST + activation_offload.FORWARD_STASH), on_host


def total_memory(mem: dict, checkpointing: bool) -> float:
    act = mem["activations_ckpt" if checkpointing else "activations_no_ckpt"]
    return sum(v for k, v in mem.items() if not k.startswith(("activations", "host"))) + act


def host_memory(mem: dict, checkpointing: bool) -> float:
    """GB of pinned host memory per node: ZeRO offload, and activation offload (which needs checkpointing)."""
    return mem["host_per_node"] + (mem["host_activations_per_node"] if checkpointing else 0.0)


# ---------------------------------------------------------------------------------------------
# communication and time


def traffic(layout: str, s: Shape, ds: dict, c: Cluster, w: Workload, checkpointing: bool) -> dict:
    """Per GPU per optimizer step: collective buffer bytes and ring wire bytes, intra vs inter node."""
    buf = _step_bytes(s, w.rank, json.dumps(ds, sort_keys=True), c.world, w.grad_accum, checkpointing, w.targets)
    intra = inter = 0.0
    for key, nbytes in buf.items():
        kind, group = key.split("@")
        wire = wire_bytes(kind, nbytes, int(group))
        if c.nodes > 1 and int(group) > c.gpus_per_node:
            inter += wire
        else:
            intra += wire
    out = {"buffers": {k: v / GB for k, v in buf.items()}, "intra_gb": intra / GB, "inter_gb": inter / GB}
    # Ulysses' all-to-alls sit inside every attention: the computation waits for them (sp_gb, apart)
    sp = ulysses_bytes(s, w.tokens, w.sequence_parallel, w.grad_accum, checkpointing, w.targets)
    out["buffers"].update({k: v / GB for k, v in sp.items()})
    out["sp_gb"] = sum(wire_bytes(k.split("@")[0], v, w.sequence_parallel) for k, v in sp.items()) / GB
    if "offload_param" in ds["zero_optimization"]:
        # every gather first copies this rank's shard to the GPU; gradients and updated adapters cross back
        gathered = sum(v for k, v in buf.items() if k.startswith("all_gather"))
        out["pcie_gb"] = (gathered / c.world + 4 * s.adapter_numel(w.rank, w.targets) * w.grad_accum / c.world) / GB
    if w.activation_offload and checkpointing:  # each offloaded layer input to host in forward, back in backward
        moved = 2 * activation_inputs(s, w)[1] * 2 * s.hidden * w.tokens * w.grad_accum
        out["pcie_gb"] = out.get("pcie_gb", 0.0) + moved / GB
    return out


@functools.lru_cache(maxsize=64)
def _step_bytes(s: Shape, rank: int, ds_json: str, world: int, gas: int, checkpointing: bool, targets) -> dict:
    """``step_bytes``, once per distinct setting: offload gathers what plain ZeRO-3 gathers."""
    ds = json.loads(ds_json)
    z = {k: v for k, v in ds["zero_optimization"].items() if not k.startswith("offload")}
    return step_bytes(s, rank, {**ds, "zero_optimization": z}, world, gas, checkpointing, targets)


def step_flops(s: Shape, w: Workload, checkpointing: bool) -> float:
    """FLOPs executed per GPU per optimizer step: forward 2N, input gradients 2N, adapter weight
    gradients 2 N_adapters per token (allora_ds/flops.py), causal attention, with checkpointing
    the recomputed forward of every layer, with a tiled MLP its recomputed forward."""
    n = s.frozen_numel() - s.vocab * s.hidden * (0 if s.tied else 1)  # the input embedding does no matmul
    a = s.adapter_numel(w.rank, w.targets)
    tokens = w.tokens * w.grad_accum
    # each GPU of an SP group computes 1/SP of the heads over the whole sequence
    attn = 12 * s.layers * s.heads * s.head_dim * w.micro_batch * w.grad_accum * w.seq_len * (w.seq_len + 1) / 2 \
        / w.sequence_parallel
    flops = (4 * n + 2 * a) * tokens + attn
    if checkpointing:
        layers = s.layers * s.layer_numel() + a
        flops += 2 * layers * tokens + attn / 3
    if w.mlp_tiles > 1:  # the tiled MLP's backward runs its forward once more
        flops += 2 * s.layers * 3 * s.hidden * s.intermediate * tokens
    return flops


def estimate(layout: str, s: Shape, c: Cluster, w: Workload, checkpointing: bool, ds: dict) -> dict:
    mem = memory(layout, s, ds, c, w)
    total, host = total_memory(mem, checkpointing), host_memory(mem, checkpointing)
    t = traffic(layout, s, ds, c, w, checkpointing)
    compute_s = step_flops(s, w, checkpointing) / (c.gpu_tflops * 1e12 * c.mfu)
    comm_s = t["intra_gb"] / c.intra_bw + t["inter_gb"] / c.inter_bw + t.get("pcie_gb", 0.0) / PCIE_BW
    # an SP group within a node uses NVLink; one spanning nodes waits on the slowest link
    sp_s = t["sp_gb"] / (c.intra_bw if w.sequence_parallel <= c.gpus_per_node else c.inter_bw)
    return {"layout": layout, "what": LAYOUTS[layout][1], "checkpointing": checkpointing, "memory_gb": mem,
            "total_gb": total, "host_gb": host, "fits": total <= c.gpu_mem_gb and host <= c.host_mem_gb,
            "traffic": t, "compute_s": compute_s,
            "comm_s": comm_s, "sp_comm_s": sp_s, "step_s": max(compute_s, comm_s) + sp_s,
            "bound": "communication" if comm_s > compute_s else "compute",
            "ds_config": LAYOUTS[layout][0], "zero_optimization": ds["zero_optimization"]}


def filled_config(layout: str, s: Shape, c: Cluster, w: Workload) -> dict:
    """The shipped config of ``layout`` with its "auto" values as the trainer would fill them."""
    from allora_ds.config import load_config

    cfg = load_config(None, base={"model": {"path": "unused", "dtype": "bfloat16"}, "data": {"train": "unused"},
                                  "adapter": {"rank": w.rank, "target_modules": list(w.targets)},
                                  "train": {"micro_batch_size": w.micro_batch,
                                            "gradient_accumulation_steps": w.grad_accum,
                                            "sequence_parallel_size": w.sequence_parallel}})
    name = LAYOUTS[layout][0]
    return fill_ds_config(read_ds_config(name), cfg, c.world, s.hidden, name, per_node=c.gpus_per_node)


def sequence_parallel_sizes(s: Shape, c: Cluster) -> list[int]:
    """SP sizes this model and cluster allow (sequence_parallel.check_layout/check_model), smallest first."""
    out = []
    for sp in range(1, c.world + 1):
        tiles = c.world % sp == 0 and (c.gpus_per_node % sp == 0 or sp % c.gpus_per_node == 0)
        heads = s.heads % sp == 0 and (s.kv_heads % sp == 0 or sp % s.kv_heads == 0)
        if tiles and heads:
            out.append(sp)
    return out


def plan(s: Shape, c: Cluster, w: Workload, auto_sequence_parallel: bool = False) -> dict:
    """Every candidate (layout x checkpointing) and the recommendation, at ``w.sequence_parallel``;
    with ``auto_sequence_parallel``, at the smallest SP whose recommendation leaves ``AUTO_SP_HEADROOM``
    of the GPU free (else the smallest at which anything fits): SP is proposed only for sequences
    one GPU holds with no margin or not at all. Its all-to-alls cost little next to attention."""
    if auto_sequence_parallel:
        fitting = [res for sp in sequence_parallel_sizes(s, c)
                   if (res := plan(s, c, dataclasses.replace(w, sequence_parallel=sp)))["recommended"] is not None]
        roomy = [r for r in fitting if r["recommended"]["total_gb"] <= (1 - AUTO_SP_HEADROOM) * c.gpu_mem_gb]
        if fitting:
            return (roomy or fitting)[0]
    rows = []
    for layout in LAYOUTS:
        if layout == "zero3_hpz" and c.nodes == 1:
            continue  # one node: hpZ's group would be the whole world, plain ZeRO-3
        ds = filled_config(layout, s, c, w)
        for ckpt in (False, True):
            rows.append(estimate(layout, s, c, w, ckpt, ds))
    fitting = [r for r in rows if r["fits"]]
    best = None
    if fitting:
        fastest = min(r["step_s"] for r in fitting)
        # within 5% of the fastest: the simplest layout, then without checkpointing
        close = [r for r in fitting if r["step_s"] <= 1.05 * fastest]
        best = min(close, key=lambda r: (PREFERENCE.index(r["layout"]), r["checkpointing"], r["step_s"]))
    return {"shape": asdict(s), "cluster": asdict(c), "workload": asdict(w), "candidates": rows,
            "recommended": best, "overrides": overrides(best, w) if best else None}


def overrides(r: dict, w: Workload) -> list[str]:
    sp = [f"train.sequence_parallel_size={w.sequence_parallel}"] if w.sequence_parallel > 1 else []
    tiles = [f"model.mlp_tiles={w.mlp_tiles}"] if w.mlp_tiles > 1 else []
    offload = ["model.activation_offload=true"] if w.activation_offload and r["checkpointing"] else []
    return [f"train.deepspeed={r['ds_config']}", f"model.gradient_checkpointing={str(r['checkpointing']).lower()}", *sp,
            *tiles, *offload]


# ---------------------------------------------------------------------------------------------
# CLI


def resolve_shape(model: str) -> Shape:
    """A named shape, or config.json of a local directory or hub id (no weights are read)."""
    if model.lower() in SHAPES:
        return SHAPES[model.lower()]
    if not Path(model).expanduser().is_dir() and "/" not in model:
        raise UserError(f"--model: {model!r} is neither one of {', '.join(SHAPES)} nor a model directory or hub id "
                        "(org/name)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model)
    except (OSError, ValueError) as e:
        raise UserError(f"--model: {model!r} is neither one of {', '.join(SHAPES)} nor a model directory or hub "
                        f"id with a config.json ({str(e).splitlines()[0]})") from None
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if getattr(config, k, None) is None]
    if missing:
        raise UserError(f"--model: {model} has no {', '.join(missing)} in its config: not a Llama-style decoder")
    return shape_from_config(config, name=model)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through cli(), like every other mistake
        raise UserError(message)


def parse_args(argv):
    p = _Parser(prog="allora-plan", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help=f"{', '.join(SHAPES)}, a model directory or a hub id")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GB per GPU (default 80)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence (the longest padded batch)")
    p.add_argument("--micro-batch", type=int, required=True, help="sequences per GPU per forward pass")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--rank", type=int, default=16, help="adapter rank (default 16)")
    p.add_argument("--mlp-tiles", type=int, default=1, help="model.mlp_tiles: slices each MLP runs over (default 1)")
    p.add_argument("--activation-offload", action="store_true",
                   help="model.activation_offload: checkpointed layer inputs in host memory (rows with checkpointing)")
    p.add_argument("--host-mem", type=float, default=Cluster.host_mem_gb,
                   help=f"GB of host memory per node, for offload (default {Cluster.host_mem_gb:g})")
    p.add_argument("--sequence-parallel", default="auto",
                   help="GPUs sharing each sequence (train.sequence_parallel_size); default auto: 1, or the "
                        "smallest size at which a layout fits")
    p.add_argument("--intra-bw", type=float, default=Cluster.intra_bw,
                   help=f"GB/s bus bandwidth of collectives within a node (default {Cluster.intra_bw:g})")
    p.add_argument("--inter-bw", type=float, default=Cluster.inter_bw,
                   help=f"GB/s bus bandwidth per GPU of collectives across nodes (default {Cluster.inter_bw:g})")
    p.add_argument("--gpu-tflops", type=float, default=Cluster.gpu_tflops,
                   help=f"dense bf16 peak TFLOP/s per GPU (default {Cluster.gpu_tflops:g}, H100 SXM)")
    p.add_argument("--mfu", type=float, default=Cluster.mfu, help=f"assumed model FLOPs utilisation (default {Cluster.mfu:g})")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.add_argument("--markdown", action="store_true", help="print one row per layout as a markdown table")
    args = p.parse_args(argv)
    for flag in ("nodes", "gpus_per_node", "seq_len", "micro_batch", "grad_accum", "rank", "mlp_tiles"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    for flag in ("gpu_mem", "intra_bw", "inter_bw", "gpu_tflops", "host_mem"):
        if not getattr(args, flag) > 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}")
    return args


def render(res: dict) -> str:
    s, c, w = res["shape"], res["cluster"], res["workload"]
    shape = Shape(**s)
    sp = w["sequence_parallel"]
    split = (f"; each sequence split over {sp} GPUs (sequence parallelism: {-(-w['seq_len'] // sp)} tokens per GPU, "
             f"{c['nodes'] * c['gpus_per_node'] // sp} sequences at a time)") if sp > 1 else ""
    lines = [
        f"{s['name'] or 'model'}: {shape.frozen_numel() / 1e9:.2f} B frozen parameters ({2 * shape.frozen_numel() / GB:.1f} GB "
        f"in bf16), ALLoRA r={w['rank']} on {len(w['targets'])} projections "
        f"({shape.adapter_numel(w['rank'], w['targets']) / 1e6:.0f} M); "
        f"{c['nodes']} node(s) x {c['gpus_per_node']} GPUs of {c['gpu_mem_gb']:g} GB; micro-batch {w['micro_batch']} x "
        f"{w['seq_len']} tokens, {w['grad_accum']} micro-batch(es) per optimizer step{split}.",
        f"Assumed: {c['intra_bw']:g} GB/s within a node, {c['inter_bw']:g} GB/s per GPU across nodes (bus bandwidth), "
        f"{c['gpu_tflops']:g} TFLOP/s x MFU {c['mfu']:g}, {CUDA_CONTEXT / GB:g} GB of CUDA context; step = max(compute, "
        "ZeRO communication) + the sequence-parallel all-to-alls (attention waits for them). Memory: GB per GPU. "
        "Traffic: GB through each GPU's links per optimizer step.",
        "",
    ]
    head = ["layout", "ckpt", "base", "adapt", "optim", "gathered", "act ckpt", "act no-ckpt", "loss", "total", "fits",
            "intra GB", "inter GB", "SP GB", "compute s", "comm s", "step s"]
    rows = []
    for r in res["candidates"]:
        m, t = r["memory_gb"], r["traffic"]
        rows.append([r["what"], "on" if r["checkpointing"] else "off", f"{m['base']:.1f}", f"{m['adapters']:.2f}",
                     f"{m['optimizer'] + m['gradients']:.2f}", f"{m['working']:.1f}", f"{m['activations_ckpt']:.1f}",
                     f"{m['activations_no_ckpt']:.1f}", f"{m['loss_path']:.2f}", f"{r['total_gb']:.1f}",
                     "yes" if r["fits"] else "no", f"{t['intra_gb']:.1f}", f"{t['inter_gb']:.1f}", f"{t['sp_gb']:.1f}",
                     f"{r['compute_s']:.2f}", f"{r['comm_s'] + r['sp_comm_s']:.2f}", f"{r['step_s']:.2f}"])
    widths = [max(len(str(x[i])) for x in [head] + rows) for i in range(len(head))]
    fmt = lambda row: "  ".join(str(v).ljust(wd) if i == 0 else str(v).rjust(wd) for i, (v, wd) in enumerate(zip(row, widths)))  # noqa: E731
    lines += [fmt(head), "-" * len(fmt(head))] + [fmt(r) for r in rows]
    if any(r["memory_gb"]["host_per_node"] for r in res["candidates"]):
        host = next(r["memory_gb"]["host_per_node"] for r in res["candidates"] if r["memory_gb"]["host_per_node"])
        lines.append(f"(offload keeps {host:.0f} GB in pinned host memory per node)")
    if w["activation_offload"]:
        host = res["candidates"][0]["memory_gb"]["host_activations_per_node"]
        lines.append(f"(activation offload, with checkpointing: {host:.0f} GB of layer inputs in pinned host memory per "
                     f"node, of {c['host_mem_gb']:g}; their copies are in 'comm s')")
    best = res["recommended"]
    lines.append("")
    if best is None:
        lines.append(f"Nothing fits in {c['gpu_mem_gb']:g} GB per GPU: use more GPUs, a smaller --micro-batch or --seq-len"
                     f"{' (or --sequence-parallel auto)' if w['sequence_parallel'] == 1 else ''}.")
    else:
        lines.append(f"Recommended: {best['what']}, gradient checkpointing {'on' if best['checkpointing'] else 'off'} "
                     f"(ds_configs/{best['ds_config']}.json; {best['total_gb']:.0f} GB per GPU, {best['step_s']:.2f} s "
                     f"per step, {best['bound']}-bound):")
        lines.append("    allora-train CONFIG.yaml " + " ".join(res["overrides"]))
    return "\n".join(lines)


def markdown(res: dict) -> str:
    """One row per layout (its faster fitting variant), the recommended one in bold: ds_configs/README.md."""
    c, w = res["cluster"], res["workload"]
    sp = w["sequence_parallel"]
    seq = f"{w['seq_len'] // 1024}k" if w["seq_len"] % 1024 == 0 else str(w["seq_len"])
    out = ["| model | GPUs | tokens | SP | layout | ckpt | GB per GPU | intra-node GB | inter-node GB | SP GB | compute s "
           "| comm s | step s |",
           "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for layout in LAYOUTS:
        rows = [r for r in res["candidates"] if r["layout"] == layout]
        if not rows:
            continue
        fit = [r for r in rows if r["fits"]]
        r = min(fit, key=lambda r: (r["step_s"], r["checkpointing"])) if fit else min(rows, key=lambda r: r["total_gb"])
        best = res["recommended"] is not None and r is res["recommended"]
        b = (lambda x: f"**{x}**") if best else (lambda x: x)  # noqa: E731
        gpus = f"{c['nodes']} x {c['gpus_per_node']}"
        lead = f"| {res['shape']['name']} r{w['rank']} | {gpus} | {seq} | {sp} |"
        if not fit:
            out.append(f"{lead} {r['what']} | | {r['total_gb']:.0f} (does not fit) | | | | | | |")
            continue
        t, step = r["traffic"], f"{r['step_s']:.2f}"
        out.append(f"{lead} {b(r['what'])} | {'on' if r['checkpointing'] else 'off'} "
                   f"| {r['total_gb']:.0f} | {t['intra_gb']:.1f} | {t['inter_gb']:.1f} | {t['sp_gb']:.1f} "
                   f"| {r['compute_s']:.2f} | {r['comm_s'] + r['sp_comm_s']:.2f} | {b(step)} |")
    return "\n".join(out)


def _sequence_parallel(value: str, s: Shape, c: Cluster) -> int:
    allowed = sequence_parallel_sizes(s, c)
    if not value.isdigit() or int(value) not in allowed:
        raise UserError(f"--sequence-parallel {value}: use auto or one of {', '.join(map(str, allowed))} (it must tile "
                        f"the {c.world} GPUs and nodes, and split the {s.heads} attention heads)")
    return int(value)


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    shape = resolve_shape(args.model)
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_mem, args.intra_bw, args.inter_bw, args.gpu_tflops,
                      args.mfu, args.host_mem)
    auto = args.sequence_parallel == "auto"
    sp = 1 if auto else _sequence_parallel(args.sequence_parallel, shape, cluster)
    workload = Workload(args.seq_len, args.micro_batch, args.grad_accum, args.rank, sequence_parallel=sp,
                        mlp_tiles=args.mlp_tiles, activation_offload=args.activation_offload)
    res = plan(shape, cluster, workload, auto_sequence_parallel=auto)
    print(json.dumps(res, indent=2, default=float) if args.json else markdown(res) if args.markdown else render(res))


if __name__ == "__main__":
    main()
