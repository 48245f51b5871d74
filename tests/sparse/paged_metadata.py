"""Real vLLM 0.32 `TritonAttentionMetadata` for a batch of rows, built from the rows' block tables
(what vLLM's model runner hands the attention backend), shared by the sparse tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def triton_metadata(
    tables: Sequence[Sequence[int]], seq_lens: Sequence[int], query_lens: Sequence[int], block_size: int
) -> Any:
    """Row i holds blocks `tables[i]` and `seq_lens[i]` tokens, its last `query_lens[i]` new this step."""
    from vllm.v1.attention.backends import triton_attn  # here: the test modules skip without vLLM first

    width = max(len(t) for t in tables)
    block_table = torch.zeros(len(tables), width, dtype=torch.int32)
    slots: list[int] = []
    for row, blocks in enumerate(tables):
        block_table[row, : len(blocks)] = torch.tensor(list(blocks), dtype=torch.int32)
        for pos in range(seq_lens[row] - query_lens[row], seq_lens[row]):
            slots.append(int(blocks[pos // block_size]) * block_size + pos % block_size)
    qsl = torch.tensor([0, *torch.tensor(list(query_lens)).cumsum(0).tolist()], dtype=torch.int32)
    return triton_attn.TritonAttentionMetadata(
        num_actual_tokens=int(qsl[-1]), max_query_len=max(query_lens), query_start_loc=qsl,
        max_seq_len=max(seq_lens), seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32), block_table=block_table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64), seq_threshold_3D=0, num_par_softmax_segments=0,
        softmax_segm_output=torch.empty(0), softmax_segm_max=torch.empty(0), softmax_segm_expsum=torch.empty(0),
        causal=True,
    )
