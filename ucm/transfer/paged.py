"""Paged KV caches seen through one canonical view, and the vectorised gather/scatter over it.

Attention backends lay out the paged KV cache differently (vLLM 0.32 hands connectors a logical
``[blocks, heads, block_size, k_dim + v_dim]`` view per layer whose physical stride order depends on
the resolved layout; older FlashAttention caches are ``[2, blocks, block_size, heads, head]``,
FlashInfer's ``[blocks, 2, block_size, heads, head]``, MLA's ``[blocks, block_size, latent]``).
Everything here works on one *canonical view* per layer, ``[blocks, heads, block_size, S, head]``
with ``S = 2`` (K, V) or ``S = 1`` (MLA latent), obtained with views only (no copy), so the stored
payload ``[layers, heads_in_group, block_size, S, head]`` is the same whatever the backend.

Head-major order is chosen because a head group is then one contiguous run per layer in vLLM's
head-major layouts (HND: the CPU backend, FlashInfer on Blackwell), and TP ranks read and write
whole head groups; token-major layouts (NHD) give runs of ``2 * head`` elements, which a GPU gathers
at full speed anyway.

The hot path never loops over blocks in Python. A gather is one `index_select` over a *row view*
of the cache: the longest contiguous run of the canonical order becomes a row, and the rows of the
requested blocks are computed with tensor arithmetic (`RowPlan`). Plain multi-dimensional
`index_select` on strided views is 5-20x slower than a copy on CPU; row gathers run at copy speed.
A scatter is one `index_copy_` over the row view on CUDA; on CPU, where `index_copy_` goes element
by element, it is one numpy copy per block of strided views when blocks are large (writes in
destination order, on the calling thread) and a numpy row assignment when they are small.
Only torch (and numpy for CPU tensors) is imported here.
"""

from __future__ import annotations

import concurrent.futures
import enum
import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch


class CacheLayout(enum.Enum):
    """How one layer's KV cache tensor is shaped (the logical axes, not the memory order)."""

    BHNC = "blocks,heads,block_size,k+v"  # vLLM 0.32 per-layer view; any stride order
    FLASH_ATTN = "2,blocks,block_size,heads,head"  # FlashAttention-style (K/V outermost)
    FLASHINFER = "blocks,2,block_size,heads,head"  # FlashInfer-style (NHD)
    MLA = "blocks,1,block_size,latent"  # vLLM 0.32 MLA view (one latent "head")
    MLA_3D = "blocks,block_size,latent"  # MLA without the head axis

    @property
    def is_mla(self) -> bool:
        return self in (CacheLayout.MLA, CacheLayout.MLA_3D)


def canonical_view(tensor: torch.Tensor, layout: CacheLayout, head_size: int) -> torch.Tensor:
    """View `tensor` as ``[blocks, heads, block_size, S, head]`` without copying.

    `head_size` is the K (= V) head size, or the latent size for MLA. A shape that does not fit
    the layout raises `ValueError` naming both, so a wrong guess is never silently reinterpreted.
    """
    shape = tuple(tensor.shape)

    def bad(expected: str) -> ValueError:
        return ValueError(
            f"KV cache tensor of shape {list(shape)} does not match layout {layout.name} "
            f"({layout.value}); expected {expected}"
        )

    if layout is CacheLayout.BHNC:
        if tensor.dim() != 4 or shape[3] != 2 * head_size:
            raise bad(f"4 dims with last dim 2*head_size={2 * head_size}")
        return tensor.unflatten(-1, (2, head_size))  # type: ignore[no-untyped-call,no-any-return]
    if layout is CacheLayout.FLASH_ATTN:
        if tensor.dim() != 5 or shape[0] != 2 or shape[4] != head_size:
            raise bad(f"[2, blocks, block_size, heads, {head_size}]")
        return tensor.permute(1, 3, 2, 0, 4)
    if layout is CacheLayout.FLASHINFER:
        if tensor.dim() != 5 or shape[1] != 2 or shape[4] != head_size:
            raise bad(f"[blocks, 2, block_size, heads, {head_size}]")
        return tensor.permute(0, 3, 2, 1, 4)
    if layout is CacheLayout.MLA:
        if tensor.dim() != 4 or shape[1] != 1 or shape[3] != head_size:
            raise bad(f"[blocks, 1, block_size, {head_size}]")
        return tensor.unsqueeze(-2)
    if layout is CacheLayout.MLA_3D:
        if tensor.dim() != 3 or shape[2] != head_size:
            raise bad(f"[blocks, block_size, {head_size}]")
        return tensor.unsqueeze(1).unsqueeze(3)
    raise ValueError(f"unknown KV cache layout {layout!r}")


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MAX_ROW = 1 << 14  # elements per gathered row; measured fastest for CPU index_select (16-64 KiB rows)
# Scatter writes each row to a random place in the cache, and every row start costs the CPU's
# store prefetch a restart: numpy row assignment of 32 KiB rows ran at 0.77x a plain copy, of
# 128-512 KiB rows at 0.95-0.98x (2-core EPYC). So scatter rows are as long as the layout allows.
_MAX_SCATTER_ROW = 1 << 20


class KVLayout(enum.Enum):
    """How an attention backend packs K and V inside each block of its
    ``[blocks, kv_heads, block_size, 2*head]`` cache, for code that reads K or V *as values*
    (attention, scoring), where `CacheLayout` only names logical axes for whole-block copies.

    - `CPU_VEC`: vLLM's CPU backend (ISA "vec"/"vec16", what AVX2/AVX-512 machines run for float32
      and bfloat16): each (block, head) holds K transposed ([head, block_size]), then V
      ([block_size, head]).
    - `BHNC`: vLLM 0.32's FlashAttention/Triton view, [blocks, kv_heads, block_size, K|V].
    """

    CPU_VEC = "cpu_vec"
    BHNC = "bhnc"


def kv_views(kv_cache: torch.Tensor, layout: KVLayout, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of every block as views [blocks, block_size, kv_heads, head] (no copy; writes through
    them land in the cache where the backend's kernel reads them)."""
    if not isinstance(layout, KVLayout):  # a CacheLayout names axes, not where K and V sit in a block
        raise TypeError(f"kv_views: expected a KVLayout, got {layout!r}")
    num_blocks, heads, block_size, last = kv_cache.shape
    if last != 2 * head_size:
        raise ValueError(f"KV cache of shape {list(kv_cache.shape)}: expected last dim 2*head_size={2 * head_size}")
    if layout is KVLayout.CPU_VEC:
        halves = kv_cache.view(num_blocks, heads, 2, block_size, head_size)  # [n, H, 2, bs*D] as K^T | V
        k = halves[:, :, 0].reshape(num_blocks, heads, head_size, block_size).permute(0, 3, 1, 2)
        v = halves[:, :, 1].transpose(1, 2)
        return k, v
    blocks = kv_cache.unflatten(-1, (2, head_size))  # type: ignore[no-untyped-call]  # [n, H, bs, 2, D]
    return blocks[:, :, :, 0].transpose(1, 2), blocks[:, :, :, 1].transpose(1, 2)


def request_kv(
    kv_cache: torch.Tensor, layout: KVLayout, block_ids: torch.Tensor, seq_len: int, head_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [seq_len, kv_heads, head] of one request, gathered from its physical `block_ids`."""
    k, v = kv_views(kv_cache, layout, head_size)
    used = block_ids[: math.ceil(seq_len / k.shape[1])].to(device=kv_cache.device, dtype=torch.long)
    heads = k.shape[2]
    return k[used].reshape(-1, heads, head_size)[:seq_len], v[used].reshape(-1, heads, head_size)[:seq_len]


class RowPlan:
    """How to address the blocks of a strided view ``[B, *rest]`` as rows of one 2-D view.

    The innermost dims of `rest` that are contiguous in memory form a run; every run starts at an
    element offset that is a multiple of `row_len` (the gcd of all offsets and the run length), so
    the storage can be seen as non-overlapping rows ``[num_rows, row_len]`` and the payload of
    block b is the rows ``base + b * block_rows + rel_rows`` in canonical order.
    """

    def __init__(self, view: torch.Tensor, max_row: int = _MAX_ROW) -> None:
        rest_sizes, rest_strides = list(view.shape[1:]), list(view.stride()[1:])
        run, cut = 1, len(rest_sizes)
        for dim in reversed(range(len(rest_sizes))):
            if rest_sizes[dim] == 1:
                cut = dim
                continue
            if rest_strides[dim] != run:
                break
            run *= rest_sizes[dim]
            cut = dim
        prefix = [(rest_sizes[d], rest_strides[d]) for d in range(cut) if rest_sizes[d] > 1]
        g = math.gcd(run, view.storage_offset(), view.stride(0), *(st for _, st in prefix))
        g = max(g, 1)
        while g > max_row and g % 2 == 0:  # long rows hit slow paths of CPU index_select
            g //= 2
        rel = torch.zeros(1, dtype=torch.long)
        for size, stride in prefix:
            rel = (rel[:, None] + torch.arange(size, dtype=torch.long)[None, :] * (stride // g)).reshape(-1)
        rel = (rel[:, None] + torch.arange(run // g, dtype=torch.long)[None, :]).reshape(-1)
        self.row_len = g
        self.block_rows = view.stride(0) // g
        self.base_row = view.storage_offset() // g
        self.rel_rows = rel.to(view.device)
        num_rows = view.untyped_storage().nbytes() // view.element_size() // g
        self.rows = view.as_strided((num_rows, g), (g, 1), 0)

    def row_ids(self, block_ids: torch.Tensor) -> torch.Tensor:
        return (self.base_row + block_ids[:, None] * self.block_rows + self.rel_rows[None, :]).reshape(-1)

    def gather(self, block_ids: torch.Tensor, out: torch.Tensor) -> None:
        """`out` (contiguous, canonical order) receives the blocks' payloads."""
        torch.index_select(self.rows, 0, self.row_ids(block_ids), out=out.view(-1, self.row_len))

    def scatter(self, block_ids: torch.Tensor, src: torch.Tensor) -> None:
        self.scatter_rows(self.row_ids(block_ids), src)

    def scatter_rows(self, rows: torch.Tensor, src: torch.Tensor) -> None:
        """Write `src` (canonical order, any strides) into the given rows."""
        values = src.reshape(-1, self.row_len)
        if self.rows.device.type == "cpu":
            # numpy's fancy assignment copies whole rows (memcpy); torch's CPU index_copy_ goes
            # element by element and measured 2-4x slower than a plain copy of the same bytes.
            as_int = _SAME_SIZE_INT[self.rows.element_size()]
            _parallel_row_assign(self.rows.view(as_int).numpy(), rows.numpy(), values.view(as_int).numpy())
            return
        self.rows.index_copy_(0, rows, values)


_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _parallel_row_assign(dst: np.ndarray, rows: np.ndarray, src: np.ndarray) -> None:
    """`dst[rows] = src` split over torch's intra-op thread count (numpy releases the GIL while it
    copies rows, so chunks run in parallel, like torch's own multi-threaded copy does).

    The calling thread copies the last chunk itself instead of sleeping on the pool: one thread
    fewer to wake up per call. On a loaded 2-core machine each wake-up can wait for a time slice;
    handing every chunk to the pool measured 0.63-0.73x a plain copy (median), this 0.90-0.94x."""
    global _executor
    threads = max(1, torch.get_num_threads())
    if threads == 1 or len(rows) < 2 * threads:
        dst[rows] = src
        return
    if _executor is None or _executor._max_workers != threads - 1:
        _executor = concurrent.futures.ThreadPoolExecutor(threads - 1, thread_name_prefix="ucm-scatter")
    bounds = np.linspace(0, len(rows), threads + 1).astype(int)

    def part(i: int) -> None:
        a, b = bounds[i], bounds[i + 1]
        dst[rows[a:b]] = src[a:b]

    futures = [_executor.submit(part, i) for i in range(threads - 1)]
    try:
        part(threads - 1)
    finally:  # never return while a worker still writes into `dst`
        for future in futures:
            future.result()


class PagedKV:
    """All attention layers of one worker's paged KV cache, in canonical form.

    `layers[i]` is ``[num_blocks, heads, block_size, S, head]``; `stacked`, when not None, is the
    same memory as ``[num_blocks, num_layers, heads, block_size, S, head]`` so a whole batch moves
    in one indexing call.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], layout: CacheLayout, head_size: int) -> None:
        if not tensors:
            raise ValueError("PagedKV needs at least one layer")
        self.layout = layout
        self.layers = [canonical_view(t, layout, head_size) for t in tensors]
        first = self.layers[0]
        for i, view in enumerate(self.layers):
            if view.shape != first.shape or view.dtype != first.dtype or view.device != first.device:
                raise ValueError(
                    f"layer {i} KV cache {list(view.shape)} {view.dtype} {view.device} differs from "
                    f"layer 0 {list(first.shape)} {first.dtype} {first.device}"
                )
        self.num_blocks, self.num_heads, self.block_size, self.num_states, self.head_size = first.shape
        self.dtype = first.dtype
        self.device = first.device
        self.stacked = _find_stacked(self.layers)
        self._plans: dict[tuple[int, int, int, int], RowPlan] = {}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def payload_shape(self, num_heads: int) -> tuple[int, int, int, int, int]:
        """Shape of one block's canonical payload for `num_heads` heads."""
        return (self.num_layers, num_heads, self.block_size, self.num_states, self.head_size)

    def block_nbytes(self, num_heads: int) -> int:
        n = self.dtype.itemsize
        for d in self.payload_shape(num_heads):
            n *= d
        return n

    def plan(self, layer: int, head_start: int, head_count: int, *, for_scatter: bool = False) -> RowPlan:
        """Row plan of one layer (`layer >= 0`) or of all layers (`layer == -1`, needs `stacked`);
        scatter plans use longer rows than gather plans (see `_MAX_SCATTER_ROW`)."""
        max_row = _MAX_SCATTER_ROW if for_scatter else _MAX_ROW
        key = (layer, head_start, head_count, max_row)
        plan = self._plans.get(key)
        if plan is None:
            if layer == -1:
                assert self.stacked is not None
                view = self.stacked.narrow(2, head_start, head_count)
            else:
                view = self.layers[layer].narrow(1, head_start, head_count)
            plan = self._plans[key] = RowPlan(view, max_row)
        return plan


def _find_stacked(layers: list[torch.Tensor]) -> torch.Tensor | None:
    """A single strided view over all layers when they share storage at a constant layer stride."""
    if len(layers) == 1:
        return layers[0].unsqueeze(1)
    first = layers[0]
    try:
        base_ptr = first.untyped_storage().data_ptr()
        if any(t.untyped_storage().data_ptr() != base_ptr or t.stride() != first.stride() for t in layers):
            return None
    except (RuntimeError, NotImplementedError):
        return None
    offsets = [t.storage_offset() for t in layers]
    layer_stride = offsets[1] - offsets[0]
    if layer_stride <= 0 or any(b - a != layer_stride for a, b in itertools.pairwise(offsets)):
        return None
    size = (first.shape[0], len(layers), *first.shape[1:])
    stride = (first.stride(0), layer_stride, *first.stride()[1:])
    return first.as_strided(size, stride, offsets[0])


def gather_blocks(
    paged: PagedKV, block_ids: torch.Tensor, head_start: int, head_count: int, out: torch.Tensor
) -> torch.Tensor:
    """Copy blocks `block_ids` (heads [head_start, +head_count)) into `out`, block-major:
    ``out[i] = payload of block_ids[i]`` with shape ``paged.payload_shape(head_count)``.
    `out` must be contiguous and on the cache's device."""
    if paged.stacked is not None:
        paged.plan(-1, head_start, head_count).gather(block_ids, out)
        return out
    tmp = torch.empty((len(block_ids), *out.shape[2:]), dtype=out.dtype, device=out.device)
    for layer in range(paged.num_layers):
        paged.plan(layer, head_start, head_count).gather(block_ids, tmp)
        out[:, layer].copy_(tmp)
    return out


def gather_layer(
    paged: PagedKV,
    layer: int,
    block_ids: torch.Tensor,
    head_start: int,
    head_count: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """One layer of `gather_blocks` into a contiguous ``[n, heads, block_size, S, head]`` `out`."""
    paged.plan(layer, head_start, head_count).gather(block_ids, out)
    return out


# Per-block copies are used on CPU when each block moves at least this many bytes (below it, the
# per-copy overhead of ~1-2 us outweighs the bytes and the row scatter is faster).
_MIN_BLOCK_COPY_BYTES = 1 << 16


def _copy_into_blocks(dst: torch.Tensor, block_ids: torch.Tensor, src: torch.Tensor) -> bool:
    """``dst[block_ids[i]] = src[i]`` as one strided `copy_` per block, on CPU only; False (nothing
    done) on other devices or when blocks are too small to pay for a copy call each.

    Why not the row scatter: torch's copy runs on its own OpenMP threads, which keep spinning for
    milliseconds after the last torch op (the forward pass, a gather); a scatter on Python threads
    then competes with them for the cores (measured 0.57-0.86x a plain copy on 2 cores). Each copy
    iterates in destination order, so the writes are sequential and only the reads are strided
    (head-group payloads).

    Why numpy, not torch's `copy_`/`_foreach_copy_`: torch splits every block's copy over its
    OpenMP threads and joins them after each one; on a busy 2-core machine each join waits for a
    descheduled thread, and the scatter of 64 MiB in 1 MiB blocks measured 0.04-0.39x a plain copy
    (0.27-0.43 s; torch with one thread 0.013 s). numpy copies each block on the calling thread
    (strided loops over the contiguous runs, GIL released): 0.010 s for the same batch."""
    if dst.device.type != "cpu" or len(block_ids) == 0:
        return False
    if src[0].numel() * src.element_size() < _MIN_BLOCK_COPY_BYTES:
        return False
    ids = block_ids.tolist()
    if min(ids) < 0 or max(ids) >= dst.shape[0]:  # a negative id would silently wrap around
        raise IndexError(f"block ids must be in [0, {dst.shape[0]}), got min {min(ids)} max {max(ids)}")
    order = sorted(range(len(ids)), key=ids.__getitem__)  # ascending writes: measured 3-5% faster
    as_int = _SAME_SIZE_INT[dst.element_size()]
    dst_np, src_np = dst.view(as_int).numpy(), src.view(as_int).numpy()
    for i in order:
        dst_np[ids[i]] = src_np[i]
    return True


def _group_dst(view: torch.Tensor, head_dim: int, groups: Sequence[tuple[int, int]]) -> torch.Tensor | None:
    """`view` narrowed to the heads of `groups` and split as ``[..., G, count, ...]`` at `head_dim`,
    when the groups are consecutive and in order (else None)."""
    start, count = groups[0]
    if list(groups) != [(start + i * count, count) for i in range(len(groups))]:
        return None
    return view.narrow(head_dim, start, count * len(groups)).unflatten(head_dim, (len(groups), count))  # type: ignore[no-untyped-call,no-any-return]


def scatter_blocks(
    paged: PagedKV, block_ids: torch.Tensor, head_start: int, head_count: int, src: torch.Tensor
) -> None:
    """Inverse of `gather_blocks`: write block-major payloads `src` into blocks `block_ids`."""
    if paged.stacked is not None:
        if _copy_into_blocks(paged.stacked.narrow(2, head_start, head_count), block_ids, src):
            return
        paged.plan(-1, head_start, head_count, for_scatter=True).scatter(block_ids, src)
        return
    for layer in range(paged.num_layers):
        scatter_layer(paged, layer, block_ids, head_start, head_count, src[:, layer])


def scatter_layer(
    paged: PagedKV,
    layer: int,
    block_ids: torch.Tensor,
    head_start: int,
    head_count: int,
    src: torch.Tensor,
) -> None:
    """One layer of `scatter_blocks`; `src` is ``[n, heads, block_size, S, head]`` (any strides)."""
    if _copy_into_blocks(paged.layers[layer].narrow(1, head_start, head_count), block_ids, src):
        return
    paged.plan(layer, head_start, head_count, for_scatter=True).scatter(block_ids, src)


def _group_rows(
    paged: PagedKV,
    layer: int,
    block_ids: torch.Tensor,
    groups: Sequence[tuple[int, int]],
    *,
    for_scatter: bool = False,
) -> tuple[RowPlan, torch.Tensor] | None:
    """One row plan and the row ids of all `groups` in group-major order, when the groups' rows
    line up (same row length); else None. One indexing call for all groups instead of one per
    group: small calls cost more than the bytes they move (measured 3-5x on 2 CPU threads)."""
    if layer == -1 and paged.stacked is None:
        return None
    plans = [paged.plan(layer, start, count, for_scatter=for_scatter) for start, count in groups]
    first = plans[0]
    if any(p.row_len != first.row_len for p in plans):
        return None
    # Equal-sized head groups of one view have the same sizes, strides and row length, hence the
    # same `block_rows` and `rel_rows`; only the base row differs. One expression for all groups
    # (per-group `row_ids` + `cat` cost ~4% of a 64 MiB batch in small tensor ops).
    base_rows = [p.base_row for p in plans]
    step = base_rows[1] - base_rows[0] if len(base_rows) > 1 else 0
    if base_rows == [base_rows[0] + k * step for k in range(len(base_rows))]:  # no host-to-device copy
        bases = torch.arange(len(plans), dtype=torch.long, device=block_ids.device) * step + base_rows[0]
    else:
        bases = torch.tensor(base_rows, dtype=torch.long, device=block_ids.device)
    rows = bases[:, None, None] + block_ids[None, :, None] * first.block_rows + first.rel_rows[None, None, :]
    return first, rows.reshape(-1)


def gather_groups(
    paged: PagedKV, block_ids: torch.Tensor, groups: Sequence[tuple[int, int]], out: torch.Tensor
) -> torch.Tensor:
    """`gather_blocks` for several equal-sized head groups into contiguous ``out[g] = payloads of
    group g`` (shape ``[len(groups), n, *payload_shape(count)]``)."""
    found = _group_rows(paged, -1, block_ids, groups)
    if found is None:
        for i, (start, count) in enumerate(groups):
            gather_blocks(paged, block_ids, start, count, out[i])
        return out
    plan, rows = found
    torch.index_select(plan.rows, 0, rows, out=out.view(-1, plan.row_len))
    return out


def scatter_groups(
    paged: PagedKV, block_ids: torch.Tensor, groups: Sequence[tuple[int, int]], src: torch.Tensor
) -> None:
    """Inverse of `gather_groups`."""
    dst = None if paged.stacked is None else _group_dst(paged.stacked, 2, groups)
    if dst is not None and _copy_into_blocks(dst, block_ids, src.movedim(0, 2)):  # [n, L, G, count, ...]
        return
    found = _group_rows(paged, -1, block_ids, groups, for_scatter=True)
    if found is None:
        for i, (start, count) in enumerate(groups):
            scatter_blocks(paged, block_ids, start, count, src[i])
        return
    plan, rows = found
    plan.scatter_rows(rows, src)


def scatter_groups_layer(
    paged: PagedKV, layer: int, block_ids: torch.Tensor, groups: Sequence[tuple[int, int]], src: torch.Tensor
) -> None:
    """One layer of `scatter_groups`; `src` is ``[len(groups), n, count, block_size, S, head]``."""
    dst = _group_dst(paged.layers[layer], 1, groups)
    if dst is not None and _copy_into_blocks(dst, block_ids, src.movedim(0, 1)):  # [n, G, count, ...]
        return
    found = _group_rows(paged, layer, block_ids, groups, for_scatter=True)
    if found is None:
        for i, (start, count) in enumerate(groups):
            scatter_layer(paged, layer, block_ids, start, count, src[i])
        return
    plan, rows = found
    plan.scatter_rows(rows, src)
