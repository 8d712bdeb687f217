"""Helpers shared by the explorer tests: tiny random-init Qwen3 and Llama models with GQA (4 q
heads, 2 kv heads), saved with save_pretrained and reloaded with from_pretrained as a user's
checkpoint would be (the ``model`` and ``qwen3`` fixtures), prompts, and the models' own
``generate`` and dense forward as references.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          Qwen3Config, Qwen3ForCausalLM)

import a2r_kernels.hf as akhf  # noqa: E402


VOCAB = 160
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=512,
            # larger than the default 0.02 so random logits have clear gaps (no argmax near-ties)
            initializer_range=0.1, eos_token_id=None, bos_token_id=None, pad_token_id=None)


def _build(kind: str, path) -> torch.nn.Module:
    torch.manual_seed(1234)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**TINY))
    else:
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.save_pretrained(path)
    if kind == "qwen3":   # our attention chosen at load time ...
        loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation=akhf.ATTN_IMPLEMENTATION)
    else:                 # ... or set afterwards on a model loaded with SDPA
        loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
        loaded.set_attn_implementation(akhf.ATTN_IMPLEMENTATION)
    assert loaded.config._attn_implementation == akhf.ATTN_IMPLEMENTATION
    return loaded.eval()


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _build("qwen3", tmp_path_factory.mktemp("qwen3_single"))


def _prompt(length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, length), generator=g)


def _generate(model, ids, max_new_tokens, **kwargs) -> list[int]:
    # An explicit all-ones mask: generate would otherwise infer one from pad_token_id.
    kwargs.setdefault("attention_mask", torch.ones_like(ids))
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=VOCAB - 1, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def _dense_next_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits of the token after ``tokens`` from a plain full forward (eager attention)."""
    saved = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0, -1].float()
    finally:
        model.config._attn_implementation = saved
