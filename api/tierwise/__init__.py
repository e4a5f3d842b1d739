"""tierwise: cost and service-level control plane for LLM traffic on Kubernetes."""

__version__ = "0.1.0"
