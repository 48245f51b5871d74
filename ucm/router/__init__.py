"""The PD router: an OpenAI-compatible front that sends each request through a prefill pod and
then streams it from a decode pod of the same revision (see server.py, proxy.py, endpoints.py)."""
