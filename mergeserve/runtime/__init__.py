"""Where merged adapters meet the engine; only engine/local.py imports vLLM."""
