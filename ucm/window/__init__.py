"""Window extrapolation: ReRoPE attention, so a model answers over contexts longer than it was trained for.

Layers, lowest first: `rope` (the model's rotary embedding as plain torch), `rerope` (the attention
formula: a dense reference and the two-pass computation vLLM runs), `paged` (the same over vLLM's
paged KV cache, per request row), `algorithm` (the hook-framework algorithm vLLM's attention backend
calls). Only `algorithm` knows about the hook framework; nothing here imports vLLM.
"""
