"""mergeserve: serve many LoRA experts of one LLM, merged per request, on vLLM."""

__version__ = "0.1.0"
