"""Bytes a ZeRO layout communicates per optimizer step, from the model's shape alone.

What ZeRO-3 gathers depends on more than "every layer, forward and backward": DeepSpeed keeps a
gathered parameter when its next use lies within ``stage3_max_reuse_distance`` elements of the
module trace, or when the prefetcher already walked past that use; parameters at most
``stage3_param_persistence_threshold`` elements stay whole; under gradient checkpointing the
frozen weights fetched for a layer's recomputation are released as soon as the backward of that
layer's first module finishes, so they are gathered a third time; the first layer's q/k/v need no
backward without checkpointing (their input needs no gradient). So the ZeRO-3 figure is computed
by replaying DeepSpeed's own bookkeeping (``deepspeed/runtime/zero/partitioned_param_coordinator.py``,
0.16-0.19) over the module-hook events a Llama forward and backward produce: ``Zero3Replay``.
Everything else is closed-form. ``bench/comm.py`` checks both against counted bytes.

Bytes are buffer bytes per rank: the gathered output of an all-gather, the input of a
reduce-scatter, the tensor of an all-reduce. ``wire_bytes`` turns them into what a ring sends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture decoder (what config.json says)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    name: str = ""

    def linear_shape(self, proj: str) -> tuple[int, int]:
        """(out_features, in_features) of a projection."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}[proj]

    def layer_numel(self) -> int:
        """Frozen weights of one decoder layer (the 7 projections and 2 norms)."""
        return sum(o * i for o, i in map(self.linear_shape, TARGETS)) + 2 * self.hidden

    def frozen_numel(self) -> int:
        return self.layers * self.layer_numel() + self.hidden + self.vocab * self.hidden * (1 if self.tied else 2)

    def adapter_numel(self, rank: int, targets=TARGETS) -> int:
        return self.layers * sum(rank * (o + i) for o, i in map(self.linear_shape, targets))


SHAPES = {  # config.json of the Meta checkpoints
    "llama3-8b": Shape(4096, 14336, 32, 32, 8, 128, 128256, name="llama3-8b"),
    "llama3-70b": Shape(8192, 28672, 80, 64, 8, 128, 128256, name="llama3-70b"),
    "llama3.2-1b": Shape(2048, 8192, 16, 32, 8, 64, 128256, tied=True, name="llama3.2-1b"),
}


def shape_from_config(config, name: str = "") -> Shape:
    """A ``Shape`` from a transformers ``LlamaConfig`` (or any config with the same fields)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                 getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size,
                 bool(getattr(config, "tie_word_embeddings", False)), name)


def padded(numel: int, world: int) -> int:
    """ZeRO pads every parameter (and gradient) to a multiple of the group size."""
    return math.ceil(numel / world) * world


# ---------------------------------------------------------------------------------------------
# parameters and module-hook events of a Llama forward + backward


@dataclass
class Param:
    name: str
    numel: int
    trainable: bool
    ds_id: int
    persist: bool = False


def llama_modules(shape: Shape, rank: int, targets=TARGETS) -> dict[str, list[Param]]:
    """Direct parameters of every module, named as in transformers (adapters as allora_ds injects
    them: ``q_proj`` holds ``lora_A``/``lora_B``, ``q_proj.base_layer`` the frozen weight). ds_ids
    follow creation order: the base under ``zero.Init`` first, then the adapters."""
    mods: dict[str, list[Param]] = {}
    ids = iter(range(10**9))

    def add(module, pname, numel, trainable=False):
        mods.setdefault(module, []).append(Param(f"{module}.{pname}", numel, trainable, next(ids)))

    add("model.embed_tokens", "weight", shape.vocab * shape.hidden)
    for i in range(shape.layers):
        for sub, projs in (("self_attn", ATTN), ("mlp", MLP)):
            for p in projs:
                o, n = shape.linear_shape(p)
                add(f"model.layers.{i}.{sub}.{p}" + (".base_layer" if p in targets else ""), "weight", o * n)
        add(f"model.layers.{i}.input_layernorm", "weight", shape.hidden)
        add(f"model.layers.{i}.post_attention_layernorm", "weight", shape.hidden)
    add("model.norm", "weight", shape.hidden)
    if not shape.tied:
        add("lm_head", "weight", shape.vocab * shape.hidden)
    for i in range(shape.layers):
        for sub, projs in (("self_attn", ATTN), ("mlp", MLP)):
            for p in projs:
                if p in targets:
                    o, n = shape.linear_shape(p)
                    add(f"model.layers.{i}.{sub}.{p}", "lora_A", rank * n, True)
                    add(f"model.layers.{i}.{sub}.{p}", "lora_B", o * rank, True)
    return mods


@dataclass(frozen=True)
class Event:
    kind: str  # reset | fetch | release | head | backward_end
    module: str = ""
    forward: bool = True
    recompute: bool = False


def micro_batch_events(shape: Shape, targets=TARGETS, checkpointing: bool = False) -> list[Event]:
    """DeepSpeed's module hooks, in order, for one forward + backward of ``LlamaForCausalLM`` with
    allora_ds's chunked loss (the LM head is gathered by the loss, outside the hooks: ``head``).

    Pre-backward hooks fire for modules whose output needs a gradient, post-backward hooks for those
    whose positional input does (attention and the model are called with keyword arguments: none).
    Without checkpointing the embeddings' output needs no gradient; transformers' checkpointing
    makes it need one (``enable_input_require_grads``). A checkpointed layer is recomputed when the
    backward reaches its last projection and the recomputation stops once ``down_proj``'s base has
    run (torch's non-reentrant checkpoint stops early)."""
    ev: list[Event] = []

    def fetch(m, forward=True, recompute=False):
        ev.append(Event("fetch", m, forward, recompute))

    def release(m, forward=True):
        ev.append(Event("release", m, forward))

    def linear_fwd(m, adapted, recompute=False, last=False):
        fetch(m, recompute=recompute)
        if adapted:
            fetch(m + ".base_layer", recompute=recompute)
            release(m + ".base_layer")
        if not last:
            release(m)

    def layer_body_fwd(p, recompute=False):
        fetch(f"{p}.input_layernorm", recompute=recompute)
        release(f"{p}.input_layernorm")
        fetch(f"{p}.self_attn", recompute=recompute)
        for proj in ATTN:
            linear_fwd(f"{p}.self_attn.{proj}", proj in targets, recompute)
        release(f"{p}.self_attn")
        fetch(f"{p}.post_attention_layernorm", recompute=recompute)
        release(f"{p}.post_attention_layernorm")
        fetch(f"{p}.mlp", recompute=recompute)
        linear_fwd(f"{p}.mlp.gate_proj", "gate_proj" in targets, recompute)
        fetch(f"{p}.mlp.act_fn", recompute=recompute)
        release(f"{p}.mlp.act_fn")
        linear_fwd(f"{p}.mlp.up_proj", "up_proj" in targets, recompute)
        linear_fwd(f"{p}.mlp.down_proj", "down_proj" in targets, recompute, last=recompute)
        if not recompute:
            release(f"{p}.mlp")

    ev.append(Event("reset"))
    fetch("")
    fetch("model")
    fetch("model.embed_tokens")
    release("model.embed_tokens")
    fetch("model.rotary_emb")
    release("model.rotary_emb")
    for i in range(shape.layers):
        fetch(f"model.layers.{i}")
        layer_body_fwd(f"model.layers.{i}")
        release(f"model.layers.{i}")
    fetch("model.norm")
    release("model.norm")
    release("model")
    ev.append(Event("head"))
    release("")

    # backward: a module's pre-backward hook fires when its output needs a gradient, its
    # post-backward hook when its positional input does
    def bwd_linear(m, adapted, in_grad):
        if adapted or in_grad:
            fetch(m, False)
        if adapted and in_grad:
            fetch(m + ".base_layer", False)
            release(m + ".base_layer", False)
        if in_grad:
            release(m, False)

    fetch("", False)
    fetch("model", False)
    fetch("model.norm", False)
    release("model.norm", False)
    for i in reversed(range(shape.layers)):
        p = f"model.layers.{i}"
        x_grad = checkpointing or i > 0  # the embeddings' output needs none unless checkpointing
        qkv_grad = x_grad or any(t in targets for t in ("q_proj", "k_proj", "v_proj"))
        h1_grad = qkv_grad or "o_proj" in targets
        fetch(p, False)
        fetch(f"{p}.mlp", False)
        if checkpointing:
            fetch(f"{p}.mlp.down_proj", False)
            layer_body_fwd(p, recompute=True)
            if "down_proj" in targets:
                fetch(f"{p}.mlp.down_proj.base_layer", False)
                release(f"{p}.mlp.down_proj.base_layer", False)
            release(f"{p}.mlp.down_proj", False)
        else:
            bwd_linear(f"{p}.mlp.down_proj", "down_proj" in targets, h1_grad)
        bwd_linear(f"{p}.mlp.up_proj", "up_proj" in targets, h1_grad)
        fetch(f"{p}.mlp.act_fn", False)
        release(f"{p}.mlp.act_fn", False)
        bwd_linear(f"{p}.mlp.gate_proj", "gate_proj" in targets, h1_grad)
        release(f"{p}.mlp", False)
        fetch(f"{p}.post_attention_layernorm", False)
        release(f"{p}.post_attention_layernorm", False)
        fetch(f"{p}.self_attn", False)
        bwd_linear(f"{p}.self_attn.o_proj", "o_proj" in targets, qkv_grad)
        for proj in ("v_proj", "k_proj", "q_proj"):
            bwd_linear(f"{p}.self_attn.{proj}", proj in targets, x_grad)
        if x_grad:
            fetch(f"{p}.input_layernorm", False)
            release(f"{p}.input_layernorm", False)
            release(p, False)
    if checkpointing:
        fetch("model.embed_tokens", False)
    ev.append(Event("backward_end"))
    return ev


# ---------------------------------------------------------------------------------------------
# ZeRO-3: DeepSpeed's parameter coordinator, replayed

NOT_AVAILABLE, INFLIGHT, AVAILABLE = 0, 1, 2


@dataclass
class Zero3Settings:
    """The ``zero_optimization`` values that decide what ZeRO-3 gathers (numbers of elements)."""

    persistence_threshold: int
    prefetch_bucket: int
    max_reuse_distance: int
    max_live: int

    @classmethod
    def from_ds(cls, ds: dict) -> "Zero3Settings":
        z = ds.get("zero_optimization", {})
        return cls(int(z.get("stage3_param_persistence_threshold", 1e5)), int(z.get("stage3_prefetch_bucket_size", 5e7)),
                   int(z.get("stage3_max_reuse_distance", 1e9)), int(z.get("stage3_max_live_parameters", 1e9)))


@dataclass
class Zero3Replay:
    """``PartitionedParameterCoordinator``'s decisions (fetch, prefetch, release, the trace, the
    reuse-distance rule and its per-step cache, checkpoint-recompute attribution), without tensors.

    ``gathers`` receives one list of parameters per all-gather DeepSpeed issues."""

    modules: dict[str, list[Param]]
    settings: Zero3Settings
    world: int = 2
    hpz: int = 1  # zero_hpz_partition_size: ranks that share hpZ's secondary copy (1 = off)
    gathers: list[tuple[list[Param], int]] = field(default_factory=list)  # (parameters, group size)

    def __post_init__(self):
        for params in self.modules.values():
            for p in params:
                p.persist = p.numel <= self.settings.persistence_threshold
        self.params = [p for ps in self.modules.values() for p in ps]
        self.by_id = {p.ds_id: p for p in self.params}
        self.status = {p.ds_id: NOT_AVAILABLE for p in self.params}
        self.active: dict[int, set] = {p.ds_id: set() for p in self.params}
        self.recompute_params: dict[str, set] = {}
        self.mode = "invalid"
        self.order: list[str] = []  # modules in fetch order (the trace)
        self.param_order: list[tuple[Param, int]] = []
        self.release_cache: dict[tuple[str, int], set] = {}  # DeepSpeed lru_caches __params_to_release
        self.queue: list = []
        self.q_head = 0
        self.most_recent: dict[int, int] = {}
        self.step_id = 0
        self.n_available = 0
        self.active_bwd: dict[str, None] = {}
        # hpZ: a parameter partitioned under zero.Init or released after a gather keeps a secondary
        # copy sharded over its node; an optimizer step drops the trainable parameters' copies
        self.secondary = {p.ds_id: self.hpz > 1 for p in self.params}

    def _gather(self, params: list[Param], coordinator: bool = True) -> None:
        todo = [p for p in params if self.status[p.ds_id] == NOT_AVAILABLE]
        if todo:
            self.n_available += sum(p.numel for p in todo)
            for p in todo:
                self.status[p.ds_id] = INFLIGHT
            # The coordinator gathers parameters with an hpZ secondary copy separately, inside their
            # node; other gathers (the persistent ones after a step) use all ranks.
            inner = [p for p in todo if coordinator and self.secondary[p.ds_id]]
            outer = [p for p in todo if not (coordinator and self.secondary[p.ds_id])]
            for group, size in ((inner, self.hpz), (outer, self.world)):
                if group:
                    self.gathers.append((sorted(group, key=lambda p: p.ds_id), size))

    def _release(self, p: Param) -> None:
        if self.status[p.ds_id] == AVAILABLE and not self.active[p.ds_id]:
            self.status[p.ds_id] = NOT_AVAILABLE
            self.n_available -= p.numel
            self.secondary[p.ds_id] = self.hpz > 1

    def reset(self) -> None:
        for p in self.params:  # _clean_inflight_param_registry
            if self.status[p.ds_id] == INFLIGHT:
                self.status[p.ds_id] = AVAILABLE
                self._release(p)
        if self.mode == "record":
            self.param_order = [(p, s) for s, m in enumerate(self.order)
                                for p in sorted(self.modules.get(m, []), key=lambda p: p.ds_id)]
            self.mode = "complete"
        elif self.mode == "invalid":
            self.mode = "record"
        self.queue, self.q_head = self.param_order, 0
        self.most_recent = {}
        self.step_id = 0
        self.n_available = 0

    def fetch(self, module: str, forward: bool, recompute: bool) -> None:
        if not forward:
            self.active_bwd.setdefault(module, None)
        if self.mode == "record":
            self.order.append(module)
        params = self.modules.get(module, [])
        self._gather(params)
        for p in params:
            self.status[p.ds_id] = AVAILABLE  # wait
            self.active[p.ds_id].add(module)
            if recompute and self.active_bwd and not p.trainable:
                owner = next(reversed(self.active_bwd))
                self.recompute_params.setdefault(owner, set()).add(p.ds_id)
                self.active[p.ds_id].add(owner)
        if self.mode == "complete":
            wanted = {p.ds_id for p in params if self.most_recent.get(p.ds_id, -10**10) < self.step_id}
            popped = set()
            while self.q_head < len(self.queue) and len(popped) < len(wanted):
                p, s = self.queue[self.q_head]
                self.q_head += 1
                self.most_recent[p.ds_id] = s
                popped.add(p.ds_id)
            assert popped == wanted, f"trace mismatch at {module} (step {self.step_id})"
            if self.settings.prefetch_bucket > 0:
                limit = min(self.settings.max_live - self.n_available, self.settings.prefetch_bucket)
                chosen, numel = {}, 0
                while self.q_head < len(self.queue) and numel < limit:
                    p, s = self.queue[self.q_head]
                    self.q_head += 1
                    if self.status[p.ds_id] == NOT_AVAILABLE and p.ds_id not in chosen:
                        chosen[p.ds_id] = p
                        numel += p.numel
                    self.most_recent[p.ds_id] = max(self.most_recent.get(p.ds_id, -10**10), s)
                if chosen:
                    self._gather(list(chosen.values()))
        self.step_id += 1

    def _to_release(self, module: str) -> set:
        key = (module, self.step_id)
        if key not in self.release_cache:
            params = self.modules.get(module, [])
            out = {p.ds_id for p in params if not p.persist}
            out -= {p.ds_id for p in params if self.most_recent.get(p.ds_id, -10**10) > self.step_id}
            traversed = 0
            for m in self.order[self.step_id:]:
                if traversed >= self.settings.max_reuse_distance:
                    break
                for p in self.modules.get(m, []):
                    out.discard(p.ds_id)
                    traversed += p.numel
            self.release_cache[key] = out
        return self.release_cache[key]

    def release(self, module: str, forward: bool) -> None:
        params = self.modules.get(module, [])
        if self.mode == "complete":
            to_release = set(self._to_release(module))
        else:
            to_release = {p.ds_id for p in params}
        members = {p.ds_id: p for p in params}
        if not forward:
            owned = self.recompute_params.pop(module, set())
            to_release |= {i for i in owned if not self.by_id[i].persist}
            members.update({i: self.by_id[i] for i in owned})
            self.active_bwd.pop(module, None)
        for i, p in members.items():
            self.active[i].discard(module)
            if i in to_release:
                self._release(p)

    def backward_end(self) -> None:
        """``release_backward_leftovers``: modules whose post-backward hook never fired."""
        while self.active_bwd:
            module = list(self.active_bwd)[-1]
            del self.active_bwd[module]
            members = {p.ds_id: p for p in self.modules.get(module, [])}
            members.update({i: self.by_id[i] for i in self.recompute_params.pop(module, set())})
            for i, p in members.items():
                self.active[i].discard(module)
                if not p.persist:
                    self._release(p)

    def optimizer_step(self) -> None:
        """``_partition_all_parameters`` then ``_post_step``: everything is released, the persistent
        parameters are gathered again in one call."""
        for p in self.params:
            self.active[p.ds_id].clear()
            if self.status[p.ds_id] == INFLIGHT:
                self.status[p.ds_id] = AVAILABLE
            self._release(p)
        self._gather([p for p in self.params if p.persist], coordinator=False)
        for p in self.params:
            if self.status[p.ds_id] == INFLIGHT:
                self.status[p.ds_id] = AVAILABLE
            if p.trainable:
                self.secondary[p.ds_id] = False  # invalidate_secondary_tensor

    def run(self, events: list[Event], head: list[Param]) -> None:
        """One micro-batch. ``head``: what the chunked loss gathers (the untied LM head)."""
        for e in events:
            if e.kind == "reset":
                self.reset()
            elif e.kind == "fetch":
                self.fetch(e.module, e.forward, e.recompute)
            elif e.kind == "release":
                self.release(e.module, e.forward)
            elif e.kind == "backward_end":
                self.backward_end()
            elif e.kind == "head":  # loss.gathered_head: all_gather_coalesced, then partitioned again
                todo = [p for p in head if self.status[p.ds_id] == NOT_AVAILABLE]
                for inner in (True, False):  # from hpZ's secondary copy inside the node where there is one
                    group = [p for p in todo if self.secondary[p.ds_id] == inner]
                    if group:
                        self.gathers.append((group, self.hpz if inner else self.world))


# ---------------------------------------------------------------------------------------------
# bytes per optimizer step, per rank, by collective and group size

# Tiny all-reduces every step: the trainer's stop/non-finite flags (2 fp32) and DeepSpeed's
# gradient norm (and, in ZeRO-1/2, its overflow flag). Counted in bench/comm.py.
SCALAR_BYTES = {3: 16, 2: 13}


def step_bytes(shape: Shape, rank: int, ds: dict, world: int, gas: int, checkpointing: bool,
               targets=TARGETS, param_bytes: int = 2, steps: int = 2) -> dict[str, int]:
    """Buffer bytes one rank sends into collectives in one optimizer step, keyed ``kind@group_size``
    (as bench/comm.py counts them). ``ds``: the filled DeepSpeed config; parameters in the model
    dtype (``param_bytes``), gradients in ``communication_data_type`` (fp32 in every shipped config).
    """
    z = ds.get("zero_optimization", {})
    stage = int(z.get("stage", 0))
    grad_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}.get(ds.get("communication_data_type"), param_bytes)
    adapters = [p for ps in llama_modules(shape, rank, targets).values() for p in ps if p.trainable]
    out: dict[str, int] = {}

    def add(kind, group, nbytes):
        if nbytes:
            key = f"{kind}@{group}"
            out[key] = out.get(key, 0) + nbytes

    if stage == 3:
        hpz = int(z.get("zero_hpz_partition_size", 1) or 1)
        mods = llama_modules(shape, rank, targets)
        replay = Zero3Replay(mods, Zero3Settings.from_ds(ds), world=world, hpz=hpz)
        events = micro_batch_events(shape, targets, checkpointing)
        head = mods.get("lm_head", []) or mods["model.embed_tokens"]  # tied: the embedding, if released
        for _ in range(steps):  # step 1 records the trace; every later step repeats step 2
            first = len(replay.gathers)
            for _ in range(gas):
                replay.run(events, head)
            replay.optimizer_step()
        for params, group in replay.gathers[first:]:
            add("all_gather", group, param_bytes * sum(padded(p.numel, world) for p in params))
        # every adapter gradient, padded to the group, reduce-scattered after each micro-batch
        add("reduce_scatter", world, gas * grad_bytes * sum(padded(p.numel, world) for p in adapters))
        add("all_reduce", world, SCALAR_BYTES[3])
    elif stage in (1, 2):
        flat = sum(p.numel for p in adapters)
        # gradients all-reduced in buckets after each micro-batch; the updated (flat, padded to
        # 2 x world) adapters all-gathered after the step
        add("all_reduce", world, gas * grad_bytes * flat + SCALAR_BYTES[2])
        add("all_gather", world, param_bytes * padded(flat, 2 * world))
    else:
        raise ValueError(f"ZeRO stage {stage}: only stages 1-3 are modelled")
    return out


def ulysses_bytes(shape: Shape, tokens: int, sp: int, gas: int, checkpointing: bool, targets=TARGETS,
                  act_bytes: int = 2) -> dict[str, int]:
    """Buffer bytes one rank sends into DeepSpeed Ulysses' collectives per optimizer step, keyed as
    ``step_bytes`` (sequence_parallel.py; ``deepspeed.runtime.sequence_parallel.ulysses_sp``).

    ``tokens``: this rank's slice of one micro-batch (rows x padded length / SP). Each attention
    turns q, k and v from "my tokens, all heads" into "all tokens, my heads" and the output back:
    four all-to-alls whose buffer is this rank's slice, ``tokens x heads x head_dim`` for q and the
    output and ``tokens x max(kv_heads, sp) x head_dim`` for k and v (DeepSpeed repeats the KV heads
    up to SP first). Backward sends each gradient back the same way; checkpointing recomputes the
    forward. Each forward also all-gathers the int64 position ids over the group. In the first
    layer only the gradients that reach a trainable parameter flow: those of q/k/v whose projection
    is adapted, and the output's when any of them is.
    """
    if sp <= 1:
        return {}
    q = tokens * shape.heads * shape.head_dim * act_bytes
    kv = tokens * max(shape.kv_heads, sp) * shape.head_dim * act_bytes
    forwards = 2 if checkpointing else 1
    per_forward = 2 * q + 2 * kv
    adapted = [p for p in ("q_proj", "k_proj", "v_proj") if p in targets]
    first_backward = sum(q if p == "q_proj" else kv for p in adapted) + (q if adapted else 0)
    layer0 = forwards * per_forward + first_backward
    others = (shape.layers - 1) * (forwards + 1) * per_forward
    return {f"all_to_all@{sp}": gas * (layer0 + others),
            f"all_gather@{sp}": gas * shape.layers * forwards * tokens * sp * 8}


def wire_bytes(kind: str, nbytes: float, group: int) -> float:
    """What a ring collective puts through each rank's link for a buffer of ``nbytes``
    (NCCL's "bus bandwidth" convention): (n-1)/n of it (an all-to-all's too), twice for an all-reduce."""
    if group <= 1:
        return 0.0
    return nbytes * (group - 1) / group * (2 if kind == "all_reduce" else 1)
