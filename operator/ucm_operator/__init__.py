"""The UCM operator: reconciles UCMCluster resources into prefill/decode vLLM pools, the shared
KV store volume and the PD router. Imports nothing from vLLM or torch."""

__version__ = "0.1.0"
