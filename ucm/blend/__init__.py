"""Cache blend: reuse the KV of document chunks wherever they appear in a prompt (CacheBlend).

`config` (torch-free) validates `ucm_blend_config`; `chunks` (torch-free) splits prompts into
prefix | chunks | suffix and plans which stored chunk blocks a request reuses; `select` and
`attention` are the torch math; `algorithm` runs it inside vLLM through the hook framework.
"""
