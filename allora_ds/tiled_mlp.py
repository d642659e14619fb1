"""Tiled MLP (ALST, arXiv 2506.13996): each decoder layer's MLP runs over its tokens in
``model.mlp_tiles`` slices, so that its ``[tokens, intermediate]`` activations (gate, up, their
product: ~65% of a Llama layer's activation bytes, 3.5x the hidden width) exist for one slice at a
time; backward recomputes each slice. DeepSpeed's ``TiledMLP`` autograd function does the work
(``deepspeed.runtime.sequence_parallel.ulysses_sp``); this module decides the tile count and hooks
it into the model.

Why not DeepSpeed's example wrapper: it all-reduces the tile count over ranks on every call (a host
sync and a collective per layer), and it passes a tile count torch.chunk may not produce (9 tokens
in 4 tiles are 3 slices of 3), in which case ``TiledMLP`` never marks the adapters' gradients ready
and ZeRO silently drops them. Here every rank uses the same count, from the config, corrected to the
number of slices torch.chunk makes.
"""

from __future__ import annotations

import math
import types

import torch

from allora_ds.errors import UserError


def slices(n: int, tiles: int) -> int:
    """How many pieces ``torch.chunk`` cuts ``n`` rows into when asked for ``tiles``."""
    return math.ceil(n / math.ceil(n / tiles)) if n else 1


def check(tiles: int) -> None:
    if tiles <= 1:
        return
    try:
        import deepspeed.runtime.sequence_parallel.ulysses_sp  # noqa: F401
    except ImportError:
        import deepspeed

        raise UserError(f"model.mlp_tiles={tiles}: the installed DeepSpeed {deepspeed.__version__} has no TiledMLP "
                        "(deepspeed.runtime.sequence_parallel.ulysses_sp); upgrade deepspeed or set it to 1") from None


def install(model, tiles: int) -> int:
    """Tile the MLP of every decoder layer of ``model`` (``model.model.layers[i].mlp``); returns how many."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise UserError(f"model.mlp_tiles: {type(model).__name__} has no model.layers[i].mlp to tile")

    def tiled_forward(mlp, x):
        if not (torch.is_grad_enabled() and mlp.training):  # eval and generation: nothing to save
            return type(mlp).forward(mlp, x)
        n = x.numel() // x.shape[-1]  # TiledMLP's backward cuts the flattened rows
        params = [p for p in mlp.parameters() if p.requires_grad]
        return TiledMLP.apply(type(mlp).forward, mlp, x, slices(n, tiles), params)

    for layer in layers:
        layer.mlp.forward = types.MethodType(tiled_forward, layer.mlp)
    return len(layers)
