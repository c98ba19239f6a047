"""End to end: dynamic arms on real vLLM. The merged adapter vLLM runs is exactly the
merge it claims to be: greedy tokens equal those of transformers on the base model with
the dense merged delta (S + Σ wᵢ Xᵢ for Twin, Σ wᵢ Δᵢ exact) added into its weights."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from mergeserve.adapters.lowrank import AdapterFactors
from mergeserve.config import Settings
from mergeserve.runtime.expert_set import ExpertSet, twin_decomposition
from mergeserve.service.served_set import twin_config
from tests.e2e.conftest import RealServer

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the moon.",
    "List three colours.",
]
WEIGHTS = {"rand": 0.7, "rand2": 0.3}
MAX_TOKENS = 12


@cache
def _reference_model(base: Path, experts_dir: Path, mode: str) -> Any:
    """transformers' model of `base` with the dense merged delta added to its weights."""
    from transformers import AutoModelForCausalLM

    experts = ExpertSet.from_dir(experts_dir)
    twin = twin_decomposition(experts, twin_config(Settings()), None)
    merged: AdapterFactors = twin.merged(WEIGHTS) if mode == "twin" else twin.merged_exact(WEIGHTS)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (a, b) in merged.modules().items():
            target = name.removeprefix("base_model.model.") + ".weight"
            params[target] += (b.double() @ a.double()).to(torch.float32)
    return model.eval()


def _reference(server: RealServer, mode: str, prompt: str) -> tuple[str, int]:
    """Greedy text and token count of the dense reference."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.base)
    model = _reference_model(server.base, server.experts, mode)
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = tok.encode(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )
    new = out[0, ids.shape[1] :]
    decoded: str = tok.decode(new, skip_special_tokens=True)
    return decoded, len(new)


def _complete(text: str) -> str:
    """The text without a trailing partial UTF-8 character: vLLM's incremental
    detokenizer holds those back, transformers' decode shows them as U+FFFD."""
    return text.rstrip("\ufffd")


@pytest.mark.parametrize("mode", ["exact", "twin"])
def test_merged_adapter_equals_dense_merge_in_transformers(
    real_server: RealServer, mode: str
) -> None:
    for prompt in PROMPTS:
        r = real_server.client.chat.completions.create(
            model=f"dynamic:{mode}",
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=MAX_TOKENS,
            extra_body={"merge_weights": WEIGHTS},
        )
        merge = (r.model_extra or {})["merge"]
        assert merge["weights"] == WEIGHTS
        assert merge["mixture"] is True  # the in-engine mixture answered, not a materialized merge
        assert merge["truncated"] is False
        assert merge["routed"] is False
        want, n_tokens = _reference(real_server, mode, prompt)
        assert _complete(r.choices[0].message.content or "") == _complete(want), (mode, prompt)
        assert r.usage is not None
        assert r.usage.completion_tokens == n_tokens


def test_merge_differs_from_each_expert(real_server: RealServer) -> None:
    def greedy(model: str, **extra: Any) -> str:
        r = real_server.client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPTS[1]}],
            temperature=0,
            max_tokens=16,
            extra_body=extra or None,
        )
        return r.choices[0].message.content or ""

    merged = greedy("dynamic:exact", merge_weights={"rand": 0.5, "rand2": 0.5})
    assert merged != greedy("expert:rand")
    assert merged != greedy("expert:rand2")
    # Weight 1 on one expert is that expert, exactly.
    assert greedy("dynamic:exact", merge_weights={"rand2": 1.0}) == greedy("expert:rand2")


def test_openai_client_streams_from_dynamic_and_sees_the_merge(real_server: RealServer) -> None:
    stream = real_server.client.chat.completions.create(
        model="dynamic",
        messages=[{"role": "user", "content": "What is 14 plus 9?"}],
        temperature=0,
        max_tokens=8,
        stream=True,
    )
    chunks = list(stream)
    merge = (chunks[0].model_extra or {})["merge"]
    assert merge["arm"] == "dynamic:exact"
    assert merge["routed"] is True
    assert max(merge["weights"], key=merge["weights"].get) == "rand2"  # the sums expert
    assert isinstance(merge["adapter_id"], int)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("model", ["dynamic:exact", "dynamic:twin", "route:top1"])
def test_a_request_of_no_expert_gets_exactly_the_base_models_tokens(
    real_server: RealServer, model: str
) -> None:
    """Open-world routing: a request unlike every expert's examples is routed to none
    and generated with no LoRA at all, so its greedy tokens are base's, exactly."""

    def greedy(name: str) -> Any:
        return real_server.client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "Give me three tips for better sleep."}],
            temperature=0,
            max_tokens=24,
        )

    r, base = greedy(model), greedy("base")
    merge = (r.model_extra or {})["merge"]
    assert (merge["route"], merge["weights"], merge["adapter_id"]) == ("none", {}, None)
    assert merge["in_domain"] < 0.5
    assert r.choices[0].message.content == base.choices[0].message.content
    assert r.usage is not None
    assert base.usage is not None
    assert r.usage.completion_tokens == base.usage.completion_tokens
    text = httpx.get(f"{real_server.base_url}/metrics").text
    assert f'mergeserve_routing_outcomes_total{{arm="{model}",outcome="none"}}' in text


def test_dynamic_metrics_pass_promtool(real_server: RealServer) -> None:
    import shutil
    import subprocess

    text = httpx.get(f"{real_server.base_url}/metrics").text
    assert 'mergeserve_requests_total{arm="dynamic:exact",status="ok"}' in text
    assert "mergeserve_merge_latency_seconds_bucket" in text
    promtool = shutil.which("promtool")
    assert promtool is not None, "`make test` installs Debian's prometheus (promtool)"
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
