"""The tierwise sidecar: the OpenAI-compatible data path in front of every LLM call of a pod."""
