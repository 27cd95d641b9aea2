"""Gemma 3 split across the ranks of an `mx.distributed` group: tensor parallel and pipeline parallel.

Tensor parallel (`shard_tensor`): every rank runs every layer on its share of the query heads and of
the MLP's hidden units, with MLX's sharded linear layers (q/gate/up all-to-sharded, o/down
sharded-to-all: two all-reduces of (B, L, hidden) per layer). A rank keeps the key/value heads its
query heads read: its own share when they divide evenly, all of them when there is one (270M, 1B).
The tied embedding is split by vocabulary rows: a lookup is one all-reduce, the head one all-gather
of the logits (the 262K-row head took 42% of a 270M decode step on a CPU here; split, each rank
computes 1/N of it, and holds 1/N of the table). Quantized layers stay quantized, split along whole groups.

Pipeline parallel (`pipeline`): each rank holds a contiguous run of layers; hidden states flow from
the highest rank (the first layers, the embedding) down to rank 0 (the last layers and the head).
Rank 0 alone has logits: every rank continues with rank 0's tokens (`agree`).

`Plan` says which checkpoint tensors (and which slice of each) a rank reads, so a rank never holds
more than its share. This module moves no bytes itself: MLX's ring/JACCL/MPI backends do. It does
not start processes or read files (distributed.py, loader.py).
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear


def kv_heads(n_heads: int, n_kv: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of the key/value heads that rank's query heads read (grouped-query attention: query
    head j reads kv head j // (n_heads / n_kv)). Its even share when n_kv divides by size; all of
    them when n_kv == 1; in between, the one or few its block of query heads needs."""
    per = n_heads // size
    group = n_heads // n_kv
    return (rank * per) // group, ((rank + 1) * per - 1) // group + 1


def check_tensor(cfg, size: int, quant_groups=()) -> None:
    """Raise ValueError when this text config cannot be split `size` ways (heads, MLP, vocabulary)."""
    why = []
    if cfg.num_attention_heads % size:
        why.append(f"{cfg.num_attention_heads} query heads")
    if cfg.intermediate_size % size:
        why.append(f"an MLP of {cfg.intermediate_size}")
    if cfg.vocab_size % size:
        why.append(f"a vocabulary of {cfg.vocab_size}")
    lo, hi = kv_heads(cfg.num_attention_heads, cfg.num_key_value_heads, 0, size)
    if (cfg.num_attention_heads // size) % (hi - lo):
        why.append(f"{cfg.num_key_value_heads} key/value heads")
    for gs in quant_groups:  # o_proj and down_proj are split along their inputs: whole groups per rank
        for n in (cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size):
            if (n // size) % gs:
                why.append(f"{n} inputs in groups of {gs}")
    if why:
        raise ValueError(f"tensor parallel over {size} ranks needs {size} to divide " + ", ".join(dict.fromkeys(why)))


# ---------------------------------------------------------------------------------- tensor parallel

def _rows(linear, lo: int, hi: int) -> None:
    """Keep output rows [lo, hi) of a Linear or QuantizedLinear, in place (rows are independent)."""
    for k in ("weight", "scales", "biases", "bias"):
        if k in linear and linear[k] is not None:
            linear[k] = mx.contiguous(linear[k][lo:hi])


class VocabShardedEmbedding(nn.Module):
    """Rows [lo, lo + V/N) of a tied embedding (float or quantized), under the same parameter names.

    `__call__` looks up the ids this rank owns and all-reduces: each row comes from exactly one rank,
    so the sum is exact. `as_linear` computes this rank's logits and all-gathers them: (..., V)."""

    def __init__(self, emb, group: mx.distributed.Group):
        super().__init__()
        N, r = group.size(), group.rank()
        V = emb.weight.shape[0]
        self.group, self.n, self.lo = group, V // N, r * (V // N)
        self.quant = {k: getattr(emb, k) for k in ("group_size", "bits", "mode") if hasattr(emb, k)}
        for k in ("weight", "scales", "biases"):
            if k in emb and emb[k] is not None:
                setattr(self, k, mx.contiguous(emb[k][self.lo : self.lo + self.n]))

    def _table(self, ids):
        if not self.quant:
            return self.weight[ids]
        return mx.dequantize(self.weight[ids], self.scales[ids], self.get("biases")[ids] if "biases" in self else None,
                             group_size=self.quant["group_size"], bits=self.quant["bits"],
                             mode=self.quant.get("mode", "affine"))

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.lo
        mine = (local >= 0) & (local < self.n)
        h = self._table(mx.where(mine, local, 0))
        return mx.distributed.all_sum(mx.where(mine[..., None], h, mx.zeros_like(h)), group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        if self.quant:
            y = mx.quantized_matmul(x, self.weight, self.scales, self.get("biases"), transpose=True,
                                    group_size=self.quant["group_size"], bits=self.quant["bits"],
                                    mode=self.quant.get("mode", "affine"))
        else:
            y = x @ self.weight.T
        # all_gather stacks along axis 0: put the vocabulary there and back. (V, ...) -> (..., V)
        return mx.moveaxis(mx.distributed.all_gather(mx.moveaxis(y, -1, 0), group=self.group), 0, -1)


def group_of(model) -> mx.distributed.Group | None:
    """The group `model` is split across (by `tensor` or `pipeline`); None for a model in one process."""
    return getattr(model, "group", None)


def stage_of(model) -> "Stage | None":
    """This rank's pipeline stage of `model`; None unless `pipeline` split it."""
    return getattr(model, "stage", None)


def tensor(model, group: mx.distributed.Group) -> None:
    """Tensor parallel over `group`, in place: each rank keeps 1/N of the heads, of the MLP and of the
    vocabulary; rank 0 alone keeps the vision tower (images are encoded there and broadcast)."""
    groups = {m.group_size for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)
              if hasattr(m, "group_size")}
    check_tensor(model.config.text, group.size(), groups)
    shard_tensor(model, group)
    if group.rank() != 0 and "vision_tower" in model:
        del model.vision_tower, model.multi_modal_projector
    model.group = group


def shard_tensor(model, group: mx.distributed.Group) -> None:
    """Split `model`'s layers and embedding (a Model, loaded or just built) across `group`, in place: see the
    module docstring. `tensor` also checks the split and places the vision tower."""
    N, r = group.size(), group.rank()
    text = model.model
    for layer in text.layers:
        a, m = layer.self_attn, layer.mlp
        lo, hi = kv_heads(a.n_heads, a.n_kv_heads, r, N)
        a.q_proj = shard_linear(a.q_proj, "all-to-sharded", group=group)
        if a.n_kv_heads % N == 0:
            a.k_proj = shard_linear(a.k_proj, "all-to-sharded", group=group)
            a.v_proj = shard_linear(a.v_proj, "all-to-sharded", group=group)
        else:  # replicated (one kv head) or the few this rank's query heads read: plain row slices
            _rows(a.k_proj, lo * a.head_dim, hi * a.head_dim)
            _rows(a.v_proj, lo * a.head_dim, hi * a.head_dim)
        a.o_proj = shard_linear(a.o_proj, "sharded-to-all", group=group)
        a.n_heads, a.n_kv_heads = a.n_heads // N, hi - lo
        m.gate_proj = shard_linear(m.gate_proj, "all-to-sharded", group=group)
        m.up_proj = shard_linear(m.up_proj, "all-to-sharded", group=group)
        m.down_proj = shard_linear(m.down_proj, "sharded-to-all", group=group)
    text.embed_tokens = VocabShardedEmbedding(text.embed_tokens, group)


# ---------------------------------------------------------------------------------- pipeline parallel

def split_layers(is_local, weights) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges, one per rank, in proportion to `weights` (each rank's
    memory), at least one layer each. Rank N-1 gets the first layers, rank 0 the last. Every stage
    holds a local layer when the model has any, so every rank takes the same rollback decisions
    (prompt_cache.py asks the local layers' rings how far they can go back)."""
    n, N = len(is_local), len(weights)
    if N > n:
        raise ValueError(f"pipeline parallel over {N} ranks needs at least {N} layers (the model has {n})")
    total, bounds = float(sum(weights)), [0]
    order = list(reversed(range(N)))  # ranks in layer order: N-1 first
    acc = 0.0
    for i, rank in enumerate(order[:-1]):
        acc += weights[rank]
        cut = round(n * acc / total)
        bounds.append(min(max(cut, bounds[-1] + 1), n - (N - 1 - i)))
    bounds.append(n)
    ranges = {rank: (bounds[i], bounds[i + 1]) for i, rank in enumerate(order)}
    if any(is_local):
        for rank, (a, b) in ranges.items():
            if not any(is_local[a:b]):
                raise ValueError(f"pipeline stage of rank {rank} (layers {a}-{b - 1}) has no sliding-window layer: "
                                 "use fewer ranks or tensor parallel")
    return [ranges[rank] for rank in range(N)]


class Stage:
    """This rank's place in a pipeline: layers [start, end) of the model, hidden states received from
    rank + 1 and passed to rank - 1. `first` embeds (and sees images), `last` (rank 0) has the head."""

    def __init__(self, group: mx.distributed.Group, start: int, end: int):
        self.group, self.start, self.end = group, start, end
        self.rank, self.size = group.rank(), group.size()
        self.first, self.last = self.rank == self.size - 1, self.rank == 0

    def receive(self, shape, dtype: mx.Dtype) -> mx.array:
        return mx.distributed.recv(shape, dtype, self.rank + 1, group=self.group)

    def pass_on(self, h: mx.array) -> None:
        # Queued now: nothing downstream of a send is read on this rank, and the next rank waits for it.
        self.sent = mx.distributed.send(h, self.rank - 1, group=self.group)
        mx.async_eval(self.sent)

    def run(self, model, ids: mx.array, cache: list, embed, image_spans=None) -> mx.array | None:
        """This stage's part of one forward pass over `ids` (B, L): `embed()` (the first stage) or the
        previous stage's states, then this rank's layers. Returns the final-norm hidden states on the last
        stage (rank 0); the others pass theirs on and return None."""
        if self.first:
            h = embed()
        else:
            h = self.receive((*ids.shape, model.config.text.hidden_size), model.model.norm.weight.dtype)
        h = model.blocks(h, cache, image_spans, norm=self.last)
        if self.last:
            return h
        self.pass_on(h)
        return None


def pipeline(model, group: mx.distributed.Group, weights=None) -> Stage:
    """Pipeline parallel over `group`, in place: keep only this rank's run of layers of `model` (loaded or
    just built), in proportion to `weights` (one number per rank, e.g. its memory; equal shares when
    None). Rank 0 has the last layers. Returns this rank's Stage (also `stage_of(model)`)."""
    N, r = group.size(), group.rank()
    text = model.model
    start, end = split_layers(model.config.text.is_local, weights or [1] * N)[r]
    # Empty modules stand in for the other ranks' layers: names keep the checkpoint's layer numbers
    # (and its per-layer quantization settings still apply).
    text.layers = [layer if start <= i < end else nn.Module() for i, layer in enumerate(text.layers)]
    stage = Stage(group, start, end)
    if not (stage.first or stage.last):
        del text.embed_tokens  # a middle stage neither embeds nor has the head
    if not stage.first and model.config.vision is not None:
        del model.vision_tower, model.multi_modal_projector  # the first stage embeds the images
    model.stage, model.group = stage, group
    return stage


def image_features(model, pixels: mx.array, encode) -> mx.array:
    """`encode(pixels)` on the rank that holds the vision tower, for a split model: tensor parallel sums
    rank 0's features with the others' zeros (exactly rank 0's, everywhere); in a pipeline only the first
    stage embeds, so the others' zeros are never read."""
    shape = (pixels.shape[0], model.config.mm_tokens_per_image, model.config.text.hidden_size)
    feats = encode(pixels).astype(mx.float32) if "vision_tower" in model else mx.zeros(shape, mx.float32)
    if stage_of(model) is not None:
        return feats
    return mx.distributed.all_sum(feats, group=group_of(model))


def agree(model, tokens: mx.array) -> mx.array:
    """The sampled tokens every rank continues with: rank 0's (the engine calls this once per step); the
    tokens themselves for a model in one process."""
    group = group_of(model)
    return tokens if group is None else agree_in(tokens, group, computed=stage_of(model) is None)


def agree_in(tokens: mx.array, group: mx.distributed.Group, computed: bool = True) -> mx.array:
    """Rank 0's tokens, on every rank: every rank runs the same steps, so the same tokens must go in.
    `computed`: the other ranks still compute their own (discarded) tokens, because the all-reduces
    inside the forward pass that made them must run on every rank (tensor parallel); a pipeline stage
    has already queued its send, and skips its stand-in logits."""
    if group.rank() == 0:
        mine = tokens
    else:
        mine = tokens * 0 if computed else mx.zeros_like(tokens)
    return mx.distributed.all_sum(mine.astype(mx.int32), group=group).astype(tokens.dtype)


def traffic(cfg, mode: str, size: int, value_bytes: int = 2, batch: int = 1) -> tuple[int, int]:
    """(bytes one rank sends, collective operations) per decoded token, on paper. A ring all-reduce of
    S bytes sends 2(N-1)/N x S from each rank, an all-gather (N-1)/N x S. Tensor parallel: two
    all-reduces of (B, hidden) per layer, one for the embedding lookup, the logits' all-gather and
    the token (agree); a pipeline: one (B, hidden) send per stage boundary and the token."""
    N, D, V, L = size, cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    if N == 1:
        return 0, 0
    token = 2 * (N - 1) * 4 * batch // N
    if mode == "tensor":
        reduce = 2 * (N - 1) * batch * D * value_bytes // N
        return (2 * L + 1) * reduce + (N - 1) * batch * V * value_bytes // N + token, 2 * L + 3
    return batch * D * value_bytes + token, 2


# ---------------------------------------------------------------------------------- what each rank reads

_LAYER = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|scales|biases|bias)$")
_ROWS = {"q_proj", "gate_proj", "up_proj"}  # all-to-sharded: output rows split
_COLS = {"o_proj", "down_proj"}  # sharded-to-all: inputs (columns) split


class OnPaper:
    """Rank `rank` of `size`, for a Plan's arithmetic alone (what each rank would hold): no processes."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


class Plan:
    """Which checkpoint tensors a rank reads, and which slice of each, for `mode` "tensor" or
    "pipeline" (`weights` as in `pipeline`). `keep(name)` before reading, `take(name, w)` on the lazily
    read tensor (a lazy copy of this rank's slice: the whole tensor is freed once it is evaluated),
    `apply(model)` splits the freshly built model the same way before the weights go in."""

    def __init__(self, config, group: mx.distributed.Group, mode: str, weights=None):
        if mode not in ("tensor", "pipeline"):
            raise ValueError(f"parallel mode must be tensor or pipeline (got {mode!r})")
        self.config, self.group, self.mode, self.weights = config, group, mode, weights
        N, r = group.size(), group.rank()
        t = config.text
        self.kv_range = (0, t.num_key_value_heads)  # the KV heads a layer of this rank holds
        if mode == "tensor":
            self.kv_range = kv_heads(t.num_attention_heads, t.num_key_value_heads, r, N)
            q = config.quantization or {}
            groups = {int(v["group_size"]) for v in [q, *q.values()] if isinstance(v, dict) and "group_size" in v}
            check_tensor(t, N, groups)
            self.vision = config.vision is not None and r == 0  # encoded on rank 0, broadcast
            self.layers = range(t.num_hidden_layers)
            self.embed = True
        else:
            start, end = split_layers(t.is_local, weights or [1] * N)[r]
            self.layers = range(start, end)
            self.vision = config.vision is not None and r == N - 1
            self.embed = r in (0, N - 1)

    def keep(self, name: str) -> bool:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            return int(m.group(1)) in self.layers
        if name.startswith("model.embed_tokens."):
            return self.embed
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            return self.vision
        return True

    def take(self, name: str, w: mx.array) -> mx.array:
        """This rank's part of `w`: a slice for tensor parallel, all of it for a pipeline."""
        cut = self._cut(name, w.shape)
        if cut is None:
            return w
        axis, lo, hi = cut
        index = [slice(None)] * w.ndim
        index[axis] = slice(lo, hi)
        return mx.contiguous(w[tuple(index)])  # a copy once evaluated: the whole tensor is not kept

    def share(self, name: str, shape) -> float:
        """The fraction of tensor `name` (of `shape`) this rank holds: 0 when it does not read it."""
        if not self.keep(name):
            return 0.0
        cut = self._cut(name, shape)
        return 1.0 if cut is None else (cut[2] - cut[1]) / int(shape[cut[0]])

    def _cut(self, name: str, shape) -> tuple[int, int, int] | None:
        """(axis, start, end) of this rank's slice of a tensor; None: it holds all of it."""
        if self.mode != "tensor":
            return None
        N, r, t = self.group.size(), self.group.rank(), self.config.text
        m = _LAYER.match(name)
        if name.startswith("model.embed_tokens.") or (m and m.group(3) in _ROWS):
            axis = 0
        elif m and m.group(3) in _COLS and m.group(4) != "bias":
            axis = len(shape) - 1
        elif m and m.group(3) in ("k_proj", "v_proj"):
            if t.num_key_value_heads % N:  # replicated heads: this rank's own
                lo, hi = self.kv_range
                return 0, lo * t.head_dim, hi * t.head_dim
            axis = 0
        else:
            return None
        n = int(shape[axis]) // N
        return axis, r * n, (r + 1) * n

    def apply(self, model, quantize=None) -> None:
        """Split a freshly built `model`, after `quantize(model)` swapped in the quantized layers the
        checkpoint has (tensor parallel splits them along whole groups)."""
        if quantize:
            quantize(model)
        if self.mode == "tensor":
            tensor(model, self.group)
        else:
            pipeline(model, self.group, self.weights)


__all__ = ["OnPaper", "Plan", "Stage", "VocabShardedEmbedding", "agree", "agree_in", "group_of", "image_features", "kv_heads",
           "pipeline", "shard_tensor", "split_layers", "stage_of", "tensor", "traffic"]
