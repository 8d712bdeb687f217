"""The embedded default models: built offline from fixed seeds, saved once, loaded like any model.

``a2r demo`` (and tests) need an explorer, a thinker and a synthesizer without a model hub. This
module builds them from configs:

* a character-level tokenizer (printable ASCII and a few math symbols; ``<s>``, ``</s>``,
  ``<pad>``, ``<unk>``, a ``<|mask|>`` token for the diffusion thinker, ``<think>``/``</think>``) with a
  small chat template: a ``tokenizers`` BPE model with no merges wrapped as
  ``PreTrainedTokenizerFast``;
* a tiny Qwen3 explorer (2 layers, hidden 64) and a slightly larger Llama synthesizer (3 layers,
  hidden 96) — different architectures and sizes, the asymmetric A2R set-up in miniature;
* a tiny masked-diffusion thinker from :func:`a2r.thinker.build_tiny_diffusion_model`, sharing the
  tokenizer and its mask token.

All weights are random (fixed seeds): the models are untrained and their answers are noise. They
exist to exercise the whole pipeline end to end on a CPU in seconds (``--random-models``).

The embedded *default* models are trained ones, shipped inside the package under ``a2r/demo/trained``
(:func:`trained_models`; built by ``python -m a2r.demo.train``, :mod:`a2r.demo.train`) for one synthetic task
(:mod:`a2r.demo.task`). Their tokenizer is this one plus a few whole-phrase tokens
(:func:`trained_phrases`).

Files go to ``$A2R_HOME/tiny-v1`` (default ``~/.cache/a2r/tiny-v1``), one sub-directory per model,
each with its tokenizer, written by ``save_pretrained`` and read back by ``from_pretrained``. A build
writes into a temporary directory and renames it into place, so concurrent builders never see half a
model. The files are the same on every build (fixed seeds, deterministic CPU init).
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TINY_NAME",
    "TRACE_LENGTH",
    "TRAINED_THINKER_SETTINGS",
    "TinyModelPaths",
    "a2r_home",
    "build_tiny_tokenizer",
    "ensure_tiny_models",
    "is_random_model",
    "tiny_dir",
    "trained_models",
    "trained_models_dir",
    "trained_phrases",
]

TINY_NAME = "tiny-v1"
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "mask_token": "<|mask|>",
}
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
THINK_TOKENS = ("<think>", "</think>")
MATH_SYMBOLS = "×÷−±√π°²³≤≥≠∞·…"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Model vocabularies are padded to a multiple of 64 past the tokenizer's size (usual practice).
VOCAB_MULTIPLE = 64
EXPLORER_SEED, SYNTHESIZER_SEED, THINKER_SEED = 1234, 2345, 3456
# Wider than the usual 0.02: random logits then have clear gaps, so greedy choices do not hinge on
# float rounding (the same token whichever attention kernel ran) and samples are not near-uniform.
INIT_RANGE = 0.1
_COMPLETE_MARKER = ".complete"
# The trained diffusion thinker's canvas (a2r.demo.train): the longest sum of the task has 4 digits,
# the rest is EOS padding. It decodes one token per step.
TRACE_LENGTH = 8
TRAINED_THINKER_SETTINGS = {"thinker_gen_length": TRACE_LENGTH,
                            "thinker_block_length": TRACE_LENGTH, "thinker_steps": TRACE_LENGTH}
# A file in a model directory saying its weights are random (untrained): the CLI then says that its
# answers are noise. Every model this module builds is random; a trained model has no such file.
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"


def a2r_home() -> Path:
    """``$A2R_HOME`` when set, else ``~/.cache/a2r``."""
    env = os.environ.get("A2R_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "a2r"


def is_random_model(path: str | os.PathLike) -> bool:
    """True when the model directory ``path`` holds random (untrained) weights (its
    :data:`RANDOM_WEIGHTS_MARKER` file exists)."""
    return (Path(path) / RANDOM_WEIGHTS_MARKER).is_file()


def tiny_dir(home: str | os.PathLike | None = None) -> Path:
    """Directory of the embedded models: ``<home>/tiny-v1``."""
    return (Path(home).expanduser() if home is not None else a2r_home()) / TINY_NAME


@dataclass(frozen=True)
class TinyModelPaths:
    """Directories of the embedded models (each loadable with ``from_pretrained``).

    ``trained``: the committed trained models (:func:`trained_models`), which also have an
    ``ar_thinker`` (the AR counterpart of the diffusion thinker); else the random ones.
    """

    explorer: Path
    synthesizer: Path
    thinker: Path | None
    ar_thinker: Path | None = None
    trained: bool = False


def trained_models_dir() -> Path:
    """The trained embedded models, shipped inside the package (``a2r/demo/trained``); rebuilt by
    ``python -m a2r.demo.train``."""
    return Path(__file__).resolve().parent / "trained"


def trained_models(*, thinker: bool = True) -> TinyModelPaths:
    """Paths of the committed trained models (:mod:`a2r.demo.train`). ValueError when they are missing
    (an install without the package data): never a silent switch to the random ones."""
    root = trained_models_dir()
    names = ("explorer", "synthesizer") + (("thinker", "ar_thinker") if thinker else ())
    missing = [n for n in names if not (root / n / "model.safetensors").is_file()]
    if missing:
        raise ValueError(f"the trained embedded models are missing from {root} ({', '.join(missing)}):"
                         " rebuild them with `python -m a2r.demo.train`, or use --random-models")
    return TinyModelPaths(root / "explorer", root / "synthesizer",
                          root / "thinker" if thinker else None,
                          root / "ar_thinker" if thinker else None, trained=True)


def trained_phrases() -> tuple[str, ...]:
    """Whole phrases that are one token each in the trained models' tokenizer: the pipeline's
    fixed prompt texts (the default instructions, the section headers) and ``\\boxed{``. A
    character-level model would otherwise spend most of every prompt on them (the synthesizer's
    instruction alone is 165 characters), and training time grows with prompt length."""
    from ..config import EXPLORER_INSTRUCTION, SYNTHESIZER_INSTRUCTION, THINKER_INSTRUCTION

    return (EXPLORER_INSTRUCTION, SYNTHESIZER_INSTRUCTION, THINKER_INSTRUCTION,
            "Reference answers:", "Reasoning trace:", "What is ", "\\boxed{")


def build_tiny_tokenizer(phrases=()):
    """The embedded character-level tokenizer (``PreTrainedTokenizerFast``), built in memory.

    Vocabulary, in id order: the five special tokens, the three chat-role tokens, the printable
    ASCII characters, a few math symbols (``MATH_SYMBOLS``), then ``<think>`` and ``</think>``,
    then ``phrases`` (each one token; the trained models use :func:`trained_phrases`).
    Any other character encodes as ``<unk>`` (deliberately no byte fallback: with 256 byte tokens a
    random model would mostly emit invalid UTF-8, and the demo output would be unreadable).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + list(ROLE_TOKENS)
    vocab: dict[str, int] = {token: i for i, token in enumerate(specials)}
    for ch in string.printable.replace("\r\x0b\x0c", "") + MATH_SYMBOLS:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in phrases])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _model_vocab_size(tokenizer) -> int:
    return -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _explorer_model(tokenizer):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=_model_vocab_size(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=4096, tie_word_embeddings=True, initializer_range=INIT_RANGE,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(EXPLORER_SEED)
    return Qwen3ForCausalLM(config)


def _synthesizer_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=_model_vocab_size(tokenizer), hidden_size=96, intermediate_size=192,
        num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=INIT_RANGE,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SYNTHESIZER_SEED)
    return LlamaForCausalLM(config)


def _thinker_model(tokenizer):
    import torch

    from ..thinker.models import build_tiny_diffusion_model

    model = build_tiny_diffusion_model(_model_vocab_size(tokenizer), tokenizer.mask_token_id,
                                       seed=THINKER_SEED)
    # A trained masked-diffusion LM never predicts [MASK] (it is never a target), so a committed
    # position always leaves the mask. A random model has no such property: give it one by zeroing
    # the [MASK] output row (its logit is then 0, below the max of the other random logits).
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.mask_token_id].zero_()
    return model


_BUILDERS = {"explorer": _explorer_model, "synthesizer": _synthesizer_model,
             "thinker": _thinker_model}


def _build_one(name: str, target: Path) -> None:
    """Build model ``name`` + tokenizer into ``target`` atomically (tmp dir, then rename)."""
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = build_tiny_tokenizer()
        with torch.random.fork_rng(devices=[]):  # fixed seeds without disturbing the caller's RNG
            model = _BUILDERS[name](tokenizer)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / RANDOM_WEIGHTS_MARKER).write_text(f"random weights, seed-initialised by "
                                                     f"a2r.demo.tiny ({TINY_NAME}/{name})\n")
        (staging / _COMPLETE_MARKER).write_text(f"{TINY_NAME}/{name}\n")
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished first (rename onto a non-empty dir fails); keep theirs.
            if not (target / _COMPLETE_MARKER).exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def ensure_tiny_models(home: str | os.PathLike | None = None, *,
                       thinker: bool = True) -> TinyModelPaths:
    """Build the embedded models under :func:`tiny_dir` unless already there; return their paths.

    ``thinker=False`` skips the diffusion thinker (it needs :mod:`a2r.thinker`).
    """
    root = tiny_dir(home)
    paths = {name: root / name for name in _BUILDERS}
    for name in ("explorer", "synthesizer") + (("thinker",) if thinker else ()):
        # A directory built before RANDOM_WEIGHTS_MARKER existed is rebuilt (a few seconds), so
        # that every embedded random model carries it.
        if not ((paths[name] / _COMPLETE_MARKER).exists() and is_random_model(paths[name])):
            if paths[name].exists():  # a stale, incomplete directory from an interrupted build
                shutil.rmtree(paths[name], ignore_errors=True)
            _build_one(name, paths[name])
    return TinyModelPaths(paths["explorer"], paths["synthesizer"], paths["thinker"] if thinker else None)
