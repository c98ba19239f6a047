"""Where merged adapters meet the engine; only engine.py imports vLLM."""
