"""`make demo`: the local control plane, the Helm chart, the operator and a heterogeneous PD
UCMCluster, end to end (see run.py)."""
