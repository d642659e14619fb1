"""Tiled MLP (ALST, arXiv 2506.13996): each decoder layer's MLP runs over its tokens in
``model.mlp_tiles`` slices, so that its ``[tokens, intermediate]`` activations (gate, up, their
product: ~65% of a Llama layer's activation bytes, 3.5x the hidden width) exist for one slice at a
time; backward recomputes each slice. DeepSpeed's ``TiledMLP`` autograd function does the work
(``deepspeed.runtime.sequence_parallel.ulysses_sp``); this module decides the tile count and hooks
it into the model.

Why not DeepSpeed's example wrapper: it all-reduces the tile count over ranks on every call (a host
sync and a collective per layer). Under ZeRO-3 every rank must call the MLP's projections equally
often, each call gathers their weights, so the count of slices may not depend on a rank's row
lengths; and torch.chunk makes fewer slices than asked for when the rows do not split evenly (9
tokens in 4 tiles are 3 slices of 3; 30 tokens in 50 tiles are 30), in which case ``TiledMLP`` never
marks the adapters' gradients ready and ZeRO silently drops them. Here the flattened rows are
padded with zero rows to a multiple of the tile count, so every rank runs exactly
``model.mlp_tiles`` slices whatever its lengths; a zero row's output is zero (Llama's MLP has no
bias) and is cut off, so it adds nothing to any gradient.
"""

from __future__ import annotations

import types

import torch

from allora_ds.errors import UserError


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
        # [rows, hidden]: TiledMLP's forward cuts dim -2 and its backward the flattened rows, the
        # same slices only for a 2-D input
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if n % tiles:  # a copy of the input, only when the row count does not split evenly
            rows = torch.cat([rows, rows.new_zeros(tiles - n % tiles, rows.shape[1])])
        params = [p for p in mlp.parameters() if p.requires_grad]
        out = TiledMLP.apply(type(mlp).forward, mlp, rows, tiles, params)
        return out[:n].reshape(*x.shape[:-1], out.shape[-1])

    for layer in layers:
        layer.mlp.forward = types.MethodType(tiled_forward, layer.mlp)
    return len(layers)
