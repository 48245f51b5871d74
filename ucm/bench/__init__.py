"""Benchmarks: commands that print numbers next to a baseline measured in the same run.

One module per subject, each imported only when its command runs (`ucm bench NAME`, see
`ucm.cli.BENCHMARKS`): `transfer`, `router`, `sparse` (with its inputs `sparse_data` and
`tiny_lm`, the vLLM-path replays `sparse_paged` and `sparse_vllm_offload`, and `sparse_tally`),
`serve`. The GPU checks of `make gpu-check` are `gpu_transfer` and `gpu_sparse` (torch only).
Test doubles the router benchmark runs: `fake_upstreams` (over `fake_http`) and the baseline
`toy_proxy`. `common` holds the timing and summary helpers they share. The store's benchmark is
`ucm.store.bench` (`ucm store bench`).
"""
