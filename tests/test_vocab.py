"""The shared vocabulary (a2r_kernels/vocab.py): each name is defined once and every module that
uses it reads that one definition; the end-of-sequence and model-geometry rules."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from a2r_kernels import vocab as _vocab

# (module, attribute, the _vocab name it must be): a module that makes its own copy again fails.
SHARED = [
    ("a2r_kernels.backend", "BACKENDS", "BACKENDS"),
    ("a2r_kernels.reference_denoise", "REMASKING", "REMASKING"),
    ("a2r_kernels.denoise", "REMASKING", "REMASKING"),
    ("a2r_kernels._cuda_ops", "REMASKING_CODES", "REMASKING_CODES"),
    ("a2r_kernels.triton.denoise", "REMASKING_CODES", "REMASKING_CODES"),
    ("a2r_kernels._cuda_ops", "MAX_HEAD_DIM", "MAX_HEAD_DIM"),
    ("a2r_kernels.attention_launch", "MAX_HEAD_DIM", "MAX_HEAD_DIM"),
    ("a2r_kernels.wrapper", "MAX_HEAD_DIM", "MAX_HEAD_DIM"),
    ("a2r_kernels._cuda_ops", "WORK_INFO_COLUMNS", "WORK_INFO_COLUMNS"),
    ("a2r_kernels.triton.attention", "WORK_INFO_COLUMNS", "WORK_INFO_COLUMNS"),
    ("a2r_kernels.layout", "WORK_FIELDS", "WORK_FIELDS"),
    ("a2r.thinker.masked", "REMASKING", "REMASKING"),
    ("a2r.config", "REMASKING", "REMASKING"),
    ("a2r.config", "BACKENDS", "BACKENDS"),
    ("a2r_kernels.reference_denoise", "GUMBEL_BOUND", "GUMBEL_BOUND"),
    ("a2r_kernels.reference_entropy_bound", "GUMBEL_BOUND", "GUMBEL_BOUND"),
    ("a2r_kernels.triton.entropy_bound", "GUMBEL_BOUND", "GUMBEL_BOUND"),
    ("a2r_kernels.reference_entropy_bound", "RENOISE_STREAM", "RENOISE_STREAM"),
    ("a2r_kernels.triton.entropy_bound", "RENOISE_STREAM", "RENOISE_STREAM"),
    ("a2r_kernels.cache", "DEFAULT_BLOCK_SIZE", "DEFAULT_BLOCK_SIZE"),
    ("a2r_kernels.hf.decoder", "DEFAULT_BLOCK_SIZE", "DEFAULT_BLOCK_SIZE"),
    ("a2r_kernels.hf.decoder", "text_config", "text_config"),
    ("a2r_kernels.denoise", "SEED_BOUND", "SEED_BOUND"),
    ("a2r.thinker.masked", "SEED_BOUND", "SEED_BOUND"),
    ("a2r_kernels.reference_denoise", "NEG_HUGE", "NEG_HUGE"),
    ("a2r_kernels.reference_entropy_bound", "NEG_HUGE", "NEG_HUGE"),
    ("a2r_kernels.triton.denoise", "NEG_HUGE", "NEG_HUGE"),
    ("a2r_kernels.triton.denoise", "INT32_MAX", "INT32_MAX"),
    ("a2r_kernels.triton.attention", "LOG2E", "LOG2E"),
    ("a2r_kernels.triton.attention", "LN2", "LN2"),
]


@pytest.mark.parametrize("module,attr,name", SHARED, ids=lambda x: str(x))
def test_each_module_reads_the_one_definition(module, attr, name):
    assert getattr(importlib.import_module(module), attr) is getattr(_vocab, name)


def test_remasking_codes_are_the_mode_indices():
    assert _vocab.REMASKING == ("low_confidence", "margin", "entropy", "random")
    assert [_vocab.REMASKING_CODES[m] for m in _vocab.REMASKING] == [0, 1, 2, 3]
    assert _vocab.WORK_INFO_COLUMNS == len(_vocab.WORK_FIELDS) == 6


# Values distinctive enough that a literal equal to one, anywhere in the packages' code outside
# vocab.py, is a second definition of that constant (type and value must match: 17 is not 17.0).
DISTINCTIVE = ("INT32_MAX", "SEED_BOUND", "NEG_HUGE", "LOG2E", "LN2", "GUMBEL_BOUND")
# Calls whose fourth argument is a Philox counter word c2, i.e. a stream number (*_STREAM).
PHILOX_CALLS = ("philox", "philox_word", "philox_uniform", "_uniform_from_philox")
REPO = Path(__file__).resolve().parents[1]
_CONSTANT_NODES = (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop)


def _package_sources(root: Path):
    for tree in ("a2r_kernels", "python/a2r"):
        for path in sorted((root / tree).rglob("*.py")):
            if path.name != "vocab.py":
                yield path.relative_to(root).as_posix(), ast.parse(path.read_text())


def constant_copies(root: Path) -> list[str]:
    """``file:line: expression equals NAME`` for every constant expression (literals and
    arithmetic on them) in the packages that equals a ``DISTINCTIVE`` vocab value, and for every
    Philox call whose stream argument is a literal."""
    wanted = {(type(getattr(_vocab, name)), getattr(_vocab, name)): name for name in DISTINCTIVE}
    found = []
    for where, tree in _package_sources(root):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func.attr if isinstance(node.func, ast.Attribute) else \
                    getattr(node.func, "id", "")
                if (func in PHILOX_CALLS and len(node.args) > 3
                        and isinstance(node.args[3], ast.Constant)):
                    found.append(f"{where}:{node.lineno}: {func}(...) with stream literal "
                                 f"{ast.unparse(node.args[3])} (name a *_STREAM)")
            if (isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Constant))
                    and all(isinstance(n, _CONSTANT_NODES) for n in ast.walk(node))):
                try:
                    value = eval(compile(ast.Expression(node), where, "eval"))   # literals only
                except (ArithmeticError, TypeError, ValueError):
                    continue
                name = wanted.get((type(value), value)) if not isinstance(value, str) else None
                if name:
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node)} equals {name}")
    return found


def test_kernel_constants_are_not_written_again():
    """Each sampling / limit constant is read from a2r_kernels.vocab, never written as its value
    again (the Triton kernels wrap the vocab value in tl.constexpr), and every Philox stream is
    named (GUMBEL_STREAM, RANDOM_SCORE_STREAM, RENOISE_STREAM)."""
    assert constant_copies(REPO) == []


def test_constant_copy_check_flags_copies(tmp_path):
    """The check above fails on a copy of the tree that writes the values out again."""
    (tmp_path / "python/a2r").mkdir(parents=True)
    (tmp_path / "a2r_kernels/triton").mkdir(parents=True)
    (tmp_path / "a2r_kernels/triton/k.py").write_text(
        "import triton.language as tl\n"
        "_INT32_MAX = tl.constexpr(2147483647)\n"
        "LOG2E = tl.constexpr(1.4426950408889634)\n"
        "def f(seed, c0, c1):\n"
        "    return _uniform_from_philox(seed, c0, c1, 1) + tl.philox(seed, c0, c1, 0, 0)[0]\n")
    (tmp_path / "python/a2r/m.py").write_text("SEED = 2 ** 63 - 1\nCLAMP = -1e30\nN = 17\n")
    found = constant_copies(tmp_path)
    assert [line.split(": ", 1)[0] for line in found] == [
        "a2r_kernels/triton/k.py:2", "a2r_kernels/triton/k.py:3", "a2r_kernels/triton/k.py:5",
        "a2r_kernels/triton/k.py:5", "python/a2r/m.py:1", "python/a2r/m.py:2"]
    assert "equals INT32_MAX" in found[0] and "equals LOG2E" in found[1]
    assert all("stream literal" in line for line in found[2:4])
    assert "equals SEED_BOUND" in found[4] and "equals NEG_HUGE" in found[5]


@pytest.mark.parametrize("value,ids", [
    (None, []), ([], []), (3, [3]), ([5, 2, 5], [5, 2]), ((7,), [7]),
    (torch.tensor([4, 1]), [4, 1]), (torch.tensor(9), [9]),
])
def test_eos_ids_one_meaning(value, ids):
    assert _vocab.eos_ids(value) == ids


@pytest.mark.parametrize("value", [True, 1.5, [2.0], ["a"], "2", [-1], torch.tensor([0.5]),
                                   [[1]]])
def test_eos_ids_rejects_non_ids_naming_the_argument(value):
    with pytest.raises(ValueError, match="eos_token_id"):
        _vocab.eos_ids(value)


@pytest.mark.parametrize("ids", [[0, 9], [[3], [9, 0]], [], [[]], torch.tensor([[0, 9]]),
                                 torch.tensor([], dtype=torch.int64), np.array([9, 1])])
def test_check_token_ids_accepts_ids_in_the_vocabulary(ids):
    _vocab.check_token_ids(ids, 10)


@pytest.mark.parametrize("ids,low,high", [
    ([0, 10], 0, 10), ([[3], [-1, 2]], -1, 3), (torch.tensor([[4, 12], [-5, 0]]), -5, 12),
    (np.array([10]), 10, 10), (torch.tensor([10], dtype=torch.int32).t(), 10, 10)])
def test_check_token_ids_names_the_argument_and_the_range(ids, low, high):
    with pytest.raises(ValueError, match=rf"^input_ids must be token ids in \[0, 10\) .*from "
                                         rf"{low} to {high}$"):
        _vocab.check_token_ids(ids, 10, "input_ids")


def test_check_token_ids_without_sync_skips_only_device_tensors():
    """sync=False (the decode loop's run_step): a device tensor is not read (a meta tensor has no
    values to read: checking it would raise), host values are still checked."""
    _vocab.check_token_ids(torch.tensor([99]).to("meta"), 10, sync=False)
    with pytest.raises(RuntimeError, match="meta"):   # sync=True does read it
        _vocab.check_token_ids(torch.tensor([99]).to("meta"), 10)
    with pytest.raises(ValueError, match="token_ids"):
        _vocab.check_token_ids(torch.tensor([99]), 10, sync=False)


class _Config:
    def __init__(self, **fields):
        self.__dict__.update(fields)


@pytest.mark.parametrize("fields,geometry", [
    (dict(num_attention_heads=8, num_key_value_heads=2, head_dim=40, hidden_size=64), (8, 2, 40)),
    (dict(num_attention_heads=4, hidden_size=64), (4, 4, 16)),              # MHA, no head_dim
    (dict(num_attention_heads=4, num_key_value_heads=None, head_dim=None, hidden_size=64),
     (4, 4, 16)),
])
def test_attention_geometry(fields, geometry):
    assert _vocab.attention_geometry(_Config(**fields)) == geometry


def test_text_config_of_nested_and_plain_configs():
    """text_config: a multimodal config's nested language-model config, else the config."""
    from transformers import LlavaConfig, Qwen3Config

    plain = Qwen3Config(num_hidden_layers=1)
    assert _vocab.text_config(plain) is plain
    nested = LlavaConfig(text_config=Qwen3Config(num_hidden_layers=3).to_dict())
    assert _vocab.text_config(nested).num_hidden_layers == 3
    bare = _Config(num_attention_heads=4, hidden_size=8)   # no get_text_config at all
    assert _vocab.text_config(bare) is bare


def test_diffusion_prefix_cache_without_num_key_value_heads():
    """diffusion.py sizes its prefix KV pool by the shared geometry rule: a config whose
    num_key_value_heads is unset (multi-head attention) works, as it does in TreeDecoder."""
    from a2r.thinker import diffusion_generate
    from a2r.thinker.models import build_tiny_diffusion_model

    model = build_tiny_diffusion_model(32, 31, seed=1, num_layers=1, num_heads=4, num_kv_heads=4)
    prompt = torch.randint(0, 30, (1, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(gen_length=8, block_length=4, steps=4)
    want = diffusion_generate(model, prompt, cache="prefix", **kwargs)
    model.config.num_key_value_heads = None
    assert diffusion_generate(model, prompt, cache="prefix", **kwargs) == want
