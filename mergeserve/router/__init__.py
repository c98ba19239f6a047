"""Request text -> weights over the experts (no vLLM import)."""
