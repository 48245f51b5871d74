"""Real vLLM serving on this machine: offline models and `vllm serve` processes with UCMConnector.

Used by `ucm bench serve`, the serving end-to-end tests and the demo's answer. Imports neither vLLM
nor torch at module level: a server is a child process.
"""
