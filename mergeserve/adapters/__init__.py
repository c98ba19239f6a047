"""Low-rank merge math, PEFT I/O, Twin decomposition, static merges, registry.

Imports no server code and no vLLM.
"""
