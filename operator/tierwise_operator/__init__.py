"""The tierwise operator (kopf): reconciles InferenceTiers into Deployments, Services and Policies.

Import name `tierwise_operator`, never `operator`, which would shadow the standard library.
"""
