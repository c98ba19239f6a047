"""llama.cpp as the peer that also mixes LoRAs per request: the same base and the same six
demo experts, each request with its own scales over the six.

llama.cpp's server takes per-request LoRA scales (`"lora": [{"id", "scale"}]`) but never
batches two requests whose adapter lists differ (`server_slot::can_batch_with` requires
`are_lora_equal`), and clears a slot's prompt cache when its adapters change. With a
distinct weighting per request it therefore decodes one request at a time. This module
drives llama.cpp's library (the PyPI sdist of llama-cpp-python vendors it; benchmark-only,
`scripts/bench_deps.sh` builds it) the same way: the adapters loaded once, each request's
scales set before it runs (`llama_set_adapters_lora`), its prompt evaluated afresh, the
requests one after another. A closed loop of C clients in front of such a server sees
request i start when request i-1 ends; its time to first token counts the wait from its
client's previous reply (`serial_round`).

Assets (`prepare_assets`), all converted from what the project ships, with llama.cpp's own
converters from the sdist:

* `base-f32.gguf`: the fp32 checkpoint mergeserve serves (dequantized once from the
  shipped Q4_1 GGUF), so the weights and the precision are those vLLM computes with;
* the shipped `SmolLM2-135M-Instruct.Q4_1.gguf` itself, with llama.cpp's quantized
  kernels: the fp32 checkpoint *is* this file dequantized, so both hold the same weight
  values, but Q4_1 matrix products quantize the activations too (to 8 bits), so its
  greedy replies may differ;
* `<expert>.gguf`: each demo expert, f32, by `convert_lora_to_gguf.py`.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SDIST = "llama_cpp_python-0.3.36.tar.gz"
"""The sdist `scripts/bench_deps.sh` downloads and builds; its converters live inside."""


def converters(cache: Path) -> Path:
    """The vendored llama.cpp tree of the sdist in `cache` (extracted once)."""
    tree = cache / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if not (tree / "convert_lora_to_gguf.py").is_file():
        sdist = cache / SDIST
        if not sdist.is_file():
            raise SystemExit(f"{sdist} missing: run scripts/bench_deps.sh")
        with tarfile.open(sdist) as tf:
            tf.extractall(cache, filter="data")
    return tree


def prepare_assets(cache: Path, hf_model: Path, q4_gguf: Path, experts: Path) -> dict[str, Path]:
    """GGUF files of the base (f32 and the shipped Q4_1) and of each expert, converted once
    into `cache/gguf`."""
    tree = converters(cache)
    out = cache / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    assets = {"base:f32": out / "base-f32.gguf", "base:q4_1": q4_gguf}
    if not assets["base:f32"].is_file():
        tmp = out / "base-f32.gguf.part"
        script = str(tree / "convert_hf_to_gguf.py")
        argv = [sys.executable, script, str(hf_model), "--outtype", "f32", "--outfile", str(tmp)]
        subprocess.run(argv, check=True, capture_output=True)
        tmp.rename(assets["base:f32"])
    for d in sorted(p for p in experts.iterdir() if (p / "adapter_config.json").is_file()):
        f = out / f"{d.name}.gguf"
        if not f.is_file():
            tmp = out / f"{d.name}.gguf.part"
            script = str(tree / "convert_lora_to_gguf.py")
            argv = [sys.executable, script, "--base", str(hf_model), "--outtype", "f32"]
            subprocess.run([*argv, "--outfile", str(tmp), str(d)], check=True, capture_output=True)
            tmp.rename(f)
        assets[f"expert:{d.name}"] = f
    return assets


@dataclass
class Reply:
    tokens: list[int]
    ttft_s: float
    wall_s: float


class LlamaCppPeer:
    """One llama.cpp context over a base GGUF with every expert's LoRA loaded once."""

    def __init__(self, base: Path, adapters: dict[str, Path], threads: int, n_ctx: int = 1024):
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(base),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            verbose=False,
            seed=0,
        )
        self.names = list(adapters)
        self._adapters = []
        for name, path in adapters.items():
            a = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
            if not a:
                raise RuntimeError(f"llama.cpp could not load the LoRA {path} ({name})")
            self._adapters.append(a)
        self.eos = self.llm.token_eos()

    def set_scales(self, scales: dict[str, float]) -> None:
        """Set this request's scales over the loaded adapters (missing ones: 0)."""
        lib = self._lib
        n = len(self._adapters)
        ptrs = (lib.llama_adapter_lora_p_ctypes * n)(*self._adapters)
        vals = (ctypes.c_float * n)(*(float(scales.get(k, 0.0)) for k in self.names))
        if lib.llama_set_adapters_lora(self.llm.ctx, ptrs, n, vals) != 0:
            raise RuntimeError("llama_set_adapters_lora failed")

    def generate(
        self, prompt_ids: Sequence[int], scales: dict[str, float], max_tokens: int, ignore_eos: bool
    ) -> Reply:
        """Greedy decoding of one request under its own scales, its prompt evaluated
        afresh (llama.cpp's server clears the slot's cache when the adapters change)."""
        t0 = time.perf_counter()
        self.set_scales(scales)
        self.llm.reset()
        out: list[int] = []
        first = 0.0
        for tok in self.llm.generate(list(prompt_ids), top_k=1, temp=0.0, reset=True):
            if not out:
                first = time.perf_counter() - t0
            if tok == self.eos and not ignore_eos:
                break
            out.append(int(tok))
            if len(out) >= max_tokens:
                break
        return Reply(out, first, time.perf_counter() - t0)


def serial_round(
    peer: LlamaCppPeer,
    prompts: Sequence[Sequence[int]],
    scales: Sequence[dict[str, float]],
    concurrency: int,
    max_tokens: int,
) -> dict[str, float]:
    """One round as a closed loop of `concurrency` clients sees a server that runs one
    request at a time: request i is sent when its client's previous reply (request
    i - concurrency) ended, and starts when request i-1 ends."""
    import statistics

    t0 = time.perf_counter()
    ends: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    for i, (ids, sc) in enumerate(zip(prompts, scales, strict=True)):
        sent = ends[i - concurrency] if i >= concurrency else 0.0
        start = time.perf_counter() - t0
        r = peer.generate(ids, sc, max_tokens, ignore_eos=True)
        tokens += len(r.tokens)
        ttfts.append(start + r.ttft_s - sent)
        ends.append(start + r.wall_s)
    wall = time.perf_counter() - t0
    return {
        "tokens_per_s": tokens / wall,
        "wall_s": wall,
        "completion_tokens": float(tokens),
        "ttft_p50_s": statistics.median(ttfts),
    }


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids of a chat request as mergeserve renders it (the model's template)."""
    user = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def available() -> bool:
    """Whether llama-cpp-python is importable (scripts/bench_deps.sh installs it)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None
