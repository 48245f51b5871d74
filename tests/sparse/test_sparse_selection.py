"""Block selection: windows always kept, exact top-k on constructed data, stride, dense at 100%."""

from __future__ import annotations

import math

import pytest
import torch

from ucm.sparse import retrieval_math as rm
from ucm.sparse.block_retrieval import BlockRetrievalConfig, DecodeLayer

H, HQ, D, BS = 2, 4, 32, 16


def layer(n_tokens: int, **cfg: object) -> tuple[DecodeLayer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    keys, values = torch.randn(n_tokens, H, D), torch.randn(n_tokens, H, D)
    config = BlockRetrievalConfig.from_dict({"min_blocks": 4, **cfg})
    dl = DecodeLayer(config, num_kv_heads=H, head_dim=D, block_size=BS, max_tokens=n_tokens + 64, scale=D**-0.5)
    dl.append(keys, values)
    return dl, keys, values


def test_windows_always_kept_and_size() -> None:
    dl, _, _ = layer(40 * BS + 5, keep_ratio=0.2, init_blocks=2, local_blocks=3, retrieval_stride=1)
    nb = dl.num_blocks  # 41, last partial
    for _ in range(5):
        _, report = dl.step(torch.randn(HQ, D))
        sel = report.selection
        assert sel.shape == (H, math.ceil(0.2 * nb))
        for h in range(H):
            row = sel[h].tolist()
            assert row == sorted(set(row))
            assert {0, 1, nb - 3, nb - 2, nb - 1} <= set(row)


def test_top_k_exact_on_constructed_needles() -> None:
    """Blocks whose keys align with the query (per head, different needles) are exactly the top-k."""
    nb = 32
    torch.manual_seed(0)
    keys = torch.randn(nb * BS, H, D) * 0.1
    query = torch.zeros(HQ, D)
    query[:2, 0] = 1.0  # group of KV head 0 looks along channel 0
    query[2:, 1] = 1.0  # group of KV head 1 along channel 1
    needles = {0: [5, 11, 20], 1: [3, 17, 25]}
    for h, blocks in needles.items():
        for i, b in enumerate(blocks):
            keys[b * BS + 7, h, h] = 5.0 + i  # one strong token per needle block
    kb, n = rm.to_block_major(keys, BS)
    for kind in rm.SUMMARY_KINDS:
        sel = rm.select_blocks(
            query, rm.build_block_summaries(kb, n, kind), keep_ratio=6 / nb, init_blocks=1, local_blocks=2, kind=kind
        )
        for h, blocks in needles.items():
            assert sel[h].tolist() == sorted([0, *blocks, nb - 2, nb - 1]), kind
    # ground truth agrees: the needles hold the largest attention mass outside the windows
    mass = rm.block_attention_mass(query, kb, n, scale=1.0)
    for h, blocks in needles.items():
        assert set(mass[h, 1 : nb - 2].topk(3).indices.add(1).tolist()) == set(blocks)


def test_bounds_find_a_single_needle_token_that_the_mean_misses() -> None:
    """Why the Quest bound: one matching token in a block barely moves its mean key."""
    nb = 40
    torch.manual_seed(3)
    keys = torch.randn(nb * BS, 1, D)
    query = torch.zeros(1, D)
    query[0, 0] = 1.0
    keys[17 * BS + 3, 0, 0] = 8.0  # a single needle token in block 17
    kb, n = rm.to_block_major(keys, BS)
    s = rm.build_block_summaries(kb, n, "bounds")
    bounds = rm.select_blocks(query, s, keep_ratio=4 / nb, init_blocks=1, local_blocks=2, kind="bounds")
    assert 17 in bounds[0].tolist()
    assert int(rm.score_blocks(query, s, "bounds")[0, 1:-2].argmax()) + 1 == 17
    # the farthest-key start of the k-means puts a centre on the needle: "mass" finds it too
    mass = rm.select_blocks(query, rm.build_block_summaries(kb, n, "mass"), keep_ratio=4 / nb, init_blocks=1,
                            local_blocks=2, kind="mass")
    assert 17 in mass[0].tolist()


def test_stride_reuses_retrieval_and_windows_follow() -> None:
    dl, _, _ = layer(30 * BS, keep_ratio=0.3, retrieval_stride=3)
    rescored = []
    selections = []
    for step in range(7):
        _, report = dl.step(torch.randn(HQ, D))
        rescored.append(report.rescored)
        selections.append(report.selection)
        assert (report.summary_bytes > 0) == report.rescored
        if step == 1:  # the sequence grows into a new block: the local window follows
            dl.append(torch.randn(BS, H, D), torch.randn(BS, H, D))
    assert rescored == [True, False, False, True, False, False, True]
    nb_before, nb_after = 30, 31
    assert selections[0][:, -2:].tolist() == [[nb_before - 2, nb_before - 1]] * H
    assert selections[2][:, -2:].tolist() == [[nb_after - 2, nb_after - 1]] * H
    middle = lambda sel, nb: sel[:, 1:-2]  # noqa: E731 - retrieved part between the windows
    assert torch.equal(middle(selections[0], 30), middle(selections[1], 30))
    assert torch.equal(middle(selections[0], 30), middle(selections[2], 31))


@pytest.mark.parametrize("n_tokens", [20 * BS, 20 * BS + 9])
def test_keep_ratio_one_is_dense(n_tokens: int) -> None:
    dl, keys, values = layer(n_tokens, keep_ratio=1.0)
    kb, n = rm.to_block_major(keys, BS)
    vb, _ = rm.to_block_major(values, BS)
    for _ in range(3):
        q = torch.randn(HQ, D)
        out, report = dl.step(q)
        torch.testing.assert_close(out, rm.dense_decode_attention(q, kb, vb, n, D**-0.5), rtol=1e-5, atol=1e-6)
        assert report.kv_bytes == 2 * n_tokens * H * D * 4


def test_short_context_stays_dense() -> None:
    dl, _, _ = layer(3 * BS, keep_ratio=0.1)
    _, report = dl.step(torch.randn(HQ, D))
    assert report.selection.tolist() == [[0, 1, 2]] * H and not report.rescored


def test_prefetch_candidates_are_runners_up_then_trending_blocks() -> None:
    from ucm.sparse.block_retrieval import RetrievalState

    config = BlockRetrievalConfig.from_dict({"keep_ratio": 0.25, "min_blocks": 4, "prefetch_blocks": 1,
                                             "retrieval_stride": 1})
    state = RetrievalState(config)
    nb = 20  # keep 5: block 0, blocks 18-19, and 2 retrieved
    scores = torch.arange(nb, dtype=torch.float32).flip(0)[None]  # block 1 best, then 2, 3 ...
    assert state.select(scores, nb, 1)[0].tolist() == [0, 1, 2, 18, 19]
    assert state.prefetch_candidates() == [(0, 3)]  # the runner-up; no history yet
    rising = scores.clone()
    rising[0, 12] += 5.0  # block 12 climbs but stays outside the top-3
    assert state.select(rising, nb, 1)[0].tolist() == [0, 1, 2, 18, 19]
    assert state.prefetch_candidates() == [(0, 3), (0, 12)]


def test_mass_score_follows_the_peaked_head_of_a_gqa_group() -> None:
    """Why "mass" is a softmax share per query head: one head of the group has large but flat scores
    (every block alike), the other one peaks on block 9. A max over raw scores ranks blocks by the
    flat head's noise; the shares rank block 9 first, and each head's shares sum to one."""
    torch.manual_seed(5)
    nb = 24
    keys = torch.randn(nb * BS, 1, D) * 0.05
    keys[:, 0, 0] += 6.0  # every key scores ~6 * 4 for the flat head (query along channel 0)
    keys[:, 0, 0] += torch.randn(nb * BS) * 0.3
    keys[9 * BS : 10 * BS, 0, 1] = 3.0  # block 9 stands out along channel 1 only
    query = torch.zeros(2, D)
    query[0, 0] = 4.0  # flat head
    query[1, 1] = 4.0  # peaked head
    kb, n = rm.to_block_major(keys, BS)
    mass = rm.score_blocks(query, rm.build_block_summaries(kb, n, "mass"), "mass")
    torch.testing.assert_close(mass.sum(), torch.tensor(2.0))
    assert int(mass[0].argmax()) == 9
    assert int(rm.score_blocks(query, rm.build_block_summaries(kb, n, "bounds"), "bounds")[0].argmax()) != 9


def test_shared_selection_keeps_each_query_heads_best_block() -> None:
    """One selection for every KV head (a vLLM block-table row): a head that is confident about four
    blocks would take all four slots in a plain sum of shares; the flatter head's own best block
    (7) still gets one, and the confident head keeps the other three."""
    nb, d = 12, 4
    centres = torch.zeros(2, nb, rm.CENTRES, d)
    centres[0, 1:5, :, 0] = 10.0  # KV head 0: blocks 1-4 match strongly
    centres[1, 7, :, 1] = 1.0  # KV head 1: block 7 matches mildly
    summaries = rm.BlockSummaries.empty("mass", 2, nb, d, torch.float32, "cpu")
    summaries.codes, summaries.scales = rm.encode_centres(centres)
    query = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0]])  # one query head per KV head
    init_end, local_start, count = 1, nb - 2, 4
    plain = rm.score_blocks(query, summaries, "mass").sum(dim=0, keepdim=True)
    assert sorted(rm.rank_middle(plain, init_end, local_start, count)[0].tolist()) == [1, 2, 3, 4]
    shared = rm.shared_block_scores(query, summaries, "mass", init_end, local_start, count)
    chosen = sorted(rm.rank_middle(shared, init_end, local_start, count)[0].tolist())
    assert 7 in chosen and len(set(chosen) & {1, 2, 3, 4}) == 3


def test_mass_summary_stores_int8_centres_that_recover_distinct_key_groups() -> None:
    """Four groups of keys in one block, each along its own axis: the farthest-first start gives each
    a centre, the int8 codes decode to within half a code step of it, and a scoring pass reads
    CENTRES*D bytes of codes plus a scale and a radius per centre, per block and KV head."""
    torch.manual_seed(5)
    keys = torch.zeros(2 * BS, 1, D)
    for g in range(4):
        keys[BS + 4 * g : BS + 4 * g + 4, 0, g] = 3.0 + g  # block 1: 4 keys of group g along axis g
    keys += 0.01 * torch.randn_like(keys)
    kb, n = rm.to_block_major(keys, BS)
    s = rm.build_block_summaries(kb, n, "mass")
    assert s.codes.dtype == torch.int8 and s.scales.dtype == torch.float32
    centres = s.centres[0, 1]  # [CENTRES, D]
    assert sorted(int(c.abs().argmax()) for c in centres) == [0, 1, 2, 3]
    assert float(s.radii[0, 1].max()) < 0.1  # each centre sits on its group
    exact = torch.stack([keys[BS + 4 * g : BS + 4 * g + 4, 0].mean(0) for g in range(4)])
    exact = exact[centres.abs().argmax(dim=1).argsort()]
    step = s.scales[0, 1, :, None] / rm.CODE_MAX
    assert bool(((centres - exact).abs() <= step / 2 + 1e-4).all())
    per_block_head = rm.CENTRES * D * 1 + 2 * rm.CENTRES * 4
    assert s.nbytes("mass") == 2 * per_block_head  # 2 blocks, 1 KV head, float32 scales and radii
    assert rm.BlockSummaries.empty("mass", 3, 5, D, torch.bfloat16, "cpu").nbytes("mass") == 15 * (
        rm.CENTRES * D + 2 * rm.CENTRES * 2)


def test_shared_selection_ignores_unwritten_slots_of_the_rows_last_block() -> None:
    """A paged summary covers every slot of its block; the tail's unwritten slots can hold another
    request's keys. They must not change any other block's score (the tail is kept anyway)."""
    torch.manual_seed(6)
    nb = 20
    keys = torch.randn(nb * BS, H, D)
    query = torch.randn(HQ, D)
    kb, _ = rm.to_block_major(keys, BS)
    clean = rm.build_block_summaries(kb, nb * BS, "mass")
    stale_kb = kb.clone()
    stale_kb[:, -1, 3:] = 5.0 * query.view(H, 2, D)[:, :1]  # slots 3.. of the tail: stale, matching keys
    stale = rm.build_block_summaries(stale_kb, nb * BS, "mass")
    assert not torch.equal(stale.codes[:, -1], clean.codes[:, -1])
    scores = [rm.shared_block_scores(query, s, "mass", 1, nb - 2, 6)[0, : nb - 1] for s in (clean, stale)]
    assert torch.equal(scores[0], scores[1])
