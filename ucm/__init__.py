"""UCM — Unified Cache Management: a shared, persistent KV cache for vLLM.

Layers import only downward:
    ucm.hashing, ucm.store   (stdlib + numpy; no torch needed)
    ucm.transfer             (torch only)
    ucm.connector, ucm.sparse (vLLM)
    ucm.router               (aiohttp, httptools, uvloop, kubernetes-asyncio; imports ucm.hashing only)
"""

__version__ = "0.1.0"
