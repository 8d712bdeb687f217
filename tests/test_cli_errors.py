"""The holes a new user hit in the ``a2r`` command line. Each case must exit with status 2 and print
one ``a2r: error:`` line on stderr, before any model runs.

The cases run end to end in a subprocess (a fresh interpreter, the real ``main``), all of them in
one interpreter to keep the import cost (torch, transformers) to one: a driver runs ``main(argv)``
per case with its own environment and returns each exit status and what it wrote to file descriptors
1 and 2 (so C code and early-bound log handlers are caught too). "Before any model
runs" is enforced, not assumed: the driver replaces ``torch.nn.Module.__call__`` with one that exits
with status 1, so a forward of any model fails its case (loading a model or a tokenizer calls no
module).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

from a2r.demo.tiny import RANDOM_WEIGHTS_MARKER, ensure_tiny_models

DRIVER = """
import json, os, sys, tempfile, traceback
import torch
if sys.argv[1] == "no-forward":
    def _forward_forbidden(self, *args, **kwargs):
        raise SystemExit("a model ran before the error: " + type(self).__name__)
    torch.nn.Module.__call__ = _forward_forbidden
from a2r.cli import main
results = {}
base_env = dict(os.environ)
saved = {fd: os.dup(fd) for fd in (1, 2)}
for name, argv, env in json.loads(sys.stdin.read()):
    os.environ.clear()
    os.environ.update({**base_env, **env})
    # File-descriptor level: also catches writes of C code and of log handlers bound earlier.
    captured = {fd: tempfile.TemporaryFile() for fd in (1, 2)}
    for fd, file in captured.items():
        os.dup2(file.fileno(), fd)
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
        if not isinstance(exit.code, int):
            print(exit.code, file=sys.stderr)
    except BaseException:
        code = 1
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    for fd in (1, 2):
        os.dup2(saved[fd], fd)
        captured[fd].seek(0)
    results[name] = [code] + [captured[fd].read().decode() for fd in (1, 2)]
with open(sys.argv[2], "w") as handle:
    json.dump(results, handle)
"""

FAST = ["-n", "2", "--max-new-tokens", "4", "--synth-max-new-tokens", "3",
        "--thinker-gen-length", "8", "--thinker-block-length", "8", "--thinker-steps", "2"]
LONG_QUESTION = "What is " + "1 + " * 5000 + "1?"      # 20,009 characters, > 4096 tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Same home as test_pipeline.py / test_cli.py: the models are built once per session.
    home = tmp_path_factory.getbasetemp() / "a2r_home"
    return home, ensure_tiny_models(home)


def run_cases(tiny, cases, *, forward_allowed=False):
    """Run ``{name: (argv, env)}`` through the driver -> ``{name: (code, stdout, stderr)}``."""
    env = {**os.environ, "A2R_HOME": str(tiny[0]), "OMP_NUM_THREADS": "1"}
    env.pop("A2R_DEBUG", None)
    payload = json.dumps([[name, [str(a) for a in argv], case_env]
                          for name, (argv, case_env) in cases.items()])
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.json"
        proc = subprocess.run([sys.executable, "-c", DRIVER,
                               "forward" if forward_allowed else "no-forward", str(results)],
                              input=payload, capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0 and results.is_file(), proc.stderr
        return {name: tuple(result) for name, result in json.loads(results.read_text()).items()}


def assert_one_line_error(result, *fragments):
    code, _, err = result
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("a2r: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


BAD_EVAL_LINES = {
    "empty question": ({"question": "", "answer": "1"},
                       "qa-empty question.jsonl:2: 'question' must be a non-empty string"),
    "null question": ({"question": None, "answer": "1"}, "'question' must be a non-empty string"),
    "null answer": ({"question": "2+2?", "answer": None},
                    "'answer' must be a non-empty string or a number, got null"),
    "blank answer": ({"question": "2+2?", "answer": " "}, "'answer' must be"),
}
USAGE_ERRORS = {
    "missing question": (["run", "--tiny"],
                         "the following arguments are required: question (see 'a2r run --help')"),
    "unknown option": (["demo", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    "not an integer": (["demo", "-n", "two"],
                       "argument -n/--num-paths: expected an integer, got 'two'"),
    "unknown command": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "no command": ([], "the following arguments are required"),
    "check timeout -1": (["eval", "qa.jsonl", "--tiny", "--check-timeout", "-1"],
                         "argument --check-timeout: must be > 0, got -1.0"),
}


# Option values argparse parses but A2RConfig.validate refuses (the one place ranges are checked):
# one "a2r: error:" line naming the flag (not the A2RConfig field), before any model loads.
CONFIG_ERRORS = {
    "answer cap -7": (["demo", "--answer-max-chars", "-7"],
                      "--answer-max-chars must be an int >= 0 or None (no cap), got -7"),
    "temperature nan": (["demo", "--temperature", "nan"],
                        "--temperature must be a finite number >= 0 (0: greedy), got nan"),
    "temperature inf": (["demo", "--temperature", "inf"], "--temperature must be a finite number"),
    "min-p 1.5": (["demo", "--min-p", "1.5"], "--min-p must be in [0, 1]"),
    "paths 0": (["demo", "-n", "0"], "-n/--num-paths must be >= 1, got 0"),
    "backend cudnn": (["demo", "--backend", "cudnn"], "--backend must be one of"),
}


@pytest.fixture(scope="module")
def errors(tiny, tmp_path_factory):
    """Every error case, run once in one driver subprocess: ``{name: (code, stdout, stderr)}``."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    cases = {}
    for name, (row, _) in BAD_EVAL_LINES.items():
        data = write_jsonl(tmp / f"qa-{name}.jsonl", [{"question": "1+1?", "answer": 2}, row])
        cases[f"eval {name}"] = (["eval", data, "--tiny", *FAST], {})
    for name, (argv, _) in USAGE_ERRORS.items():
        cases[f"usage {name}"] = (argv, {})
    for name, (argv, _) in CONFIG_ERRORS.items():
        cases[f"config {name}"] = (argv, {})
    cases["blank question"] = (["run", "--tiny", *FAST, "   \n"], {})
    cases["empty question"] = (["run", "--tiny", *FAST, ""], {})
    cases["long question"] = (["run", "--tiny", *FAST, LONG_QUESTION], {})
    long_eval = write_jsonl(tmp / "long.jsonl", [{"question": "1+1?", "answer": 2},
                                                 {"question": LONG_QUESTION, "answer": 1}])
    cases["eval long question"] = (["eval", long_eval, "--tiny", *FAST], {})
    for backend in ("cuda", "triton"):
        cases[f"backend {backend}"] = (["run", "--tiny", *FAST, "--backend", backend, "q"],
                                       {"TRITON_INTERPRET": "0"})
    bare = tmp / "bare"                      # config.json and weights, no tokenizer files
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny[1].explorer / name, bare / name)
    cases["no tokenizer"] = (["run", "--explorer", bare, *FAST, "q"], {})
    for role in ("explorer", "thinker"):    # weights cut in half, as an interrupted copy leaves
        truncated = tmp / f"truncated_{role}"
        shutil.copytree(getattr(tiny[1], role), truncated)
        weights = truncated / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
        argv = ["--explorer", truncated] if role == "explorer" else [
            "--explorer", tiny[1].explorer, "--thinker", truncated]
        cases[f"truncated {role} weights"] = (["run", *argv, *FAST, "q"], {})
    broken = tmp / "broken_config"
    shutil.copytree(tiny[1].explorer, broken)
    (broken / "config.json").write_text((broken / "config.json").read_text()[:-10])
    cases["invalid config.json"] = (["run", "--explorer", broken, *FAST, "q"], {})
    cases["file as explorer"] = (["run", "--explorer", tiny[1].explorer / "config.json", *FAST,
                                  "q"], {})
    no_mask = tmp / "thinker_without_mask"          # neither config nor tokenizer names [MASK]
    shutil.copytree(tiny[1].thinker, no_mask)
    for name, key in (("config.json", "mask_token_id"), ("tokenizer_config.json", "mask_token")):
        content = json.loads((no_mask / name).read_text())
        del content[key]
        (no_mask / name).write_text(json.dumps(content))
    cases["thinker without mask token"] = (
        ["run", "--explorer", tiny[1].explorer, "--thinker", no_mask, *FAST, "q"], {})
    blocker = tmp / "a_file"
    blocker.write_text("")
    cases["home under a file"] = (["demo", "--random-models", *FAST, "--home", blocker / "home"],
                                  {})
    cases["A2R_HOME under a file"] = (["run", "--tiny", "--random-models", *FAST, "q"],
                                      {"A2R_HOME": str(blocker / "home")})
    if sys.platform.startswith("linux") and os.path.isdir("/proc"):
        cases["home in /proc"] = (["demo", "--random-models", *FAST, "--home", "/proc/nope"], {})
    # The issue's own example: with the trained defaults --home does nothing, so it is refused.
    cases["home without random models"] = (["demo", *FAST, "--home", "/proc/nope"], {})
    data = write_jsonl(tmp / "qa.jsonl", [{"question": "1+1?", "answer": 2}])
    cases["out dir missing"] = (["eval", data, "--tiny", *FAST, "--out", tmp / "missing/x.json"],
                                {})
    cases["out mkdir grandparent missing"] = (
        ["eval", data, "--tiny", *FAST, "--mkdir", "--out", tmp / "missing/deeper/x.json"], {})
    cases["out is a directory"] = (["eval", data, "--tiny", *FAST, "--out", tmp], {})
    cases["mkdir without out"] = (["eval", data, "--tiny", *FAST, "--mkdir"], {})
    # --out x.json keeps its records in x.jsonl: here the eval file itself, whose last line has
    # no newline (a records file's half-written line, which resuming would cut off).
    same = tmp / "same.jsonl"
    same.write_text('{"question": "1+1?", "answer": 2}\n{"question": "2+2?", "answer": 4}')
    cases["out records are the eval file"] = (["eval", same, "--tiny", *FAST, "--out",
                                               tmp / "same.json"], {})
    results = run_cases(tiny, cases)
    results["tmp"] = tmp
    return results


# ------------------------------------------------------------------ the question


@pytest.mark.parametrize("case", ["empty question", "blank question"])
def test_blank_question(errors, case):
    assert_one_line_error(errors[case], "the question must be a non-empty string")


@pytest.mark.parametrize("name", list(BAD_EVAL_LINES))
def test_bad_eval_line(errors, name):
    assert_one_line_error(errors[f"eval {name}"], ".jsonl:2: ", BAD_EVAL_LINES[name][1])


def test_question_longer_than_the_model_positions(errors):
    # --tiny is the trained explorer (a2r/demo/trained): the limit is read from its config.
    from a2r.demo.tiny import trained_models

    config = json.loads((trained_models().explorer / "config.json").read_text())
    limit = f"max_position_embeddings={config['max_position_embeddings']}"
    assert_one_line_error(errors["long question"], "the explorer prompt is", "+ 4 new tokens",
                          limit, "Qwen3ForCausalLM", "shorten the question")
    assert_one_line_error(errors["eval long question"], "long.jsonl: question 2: ", limit,
                          "shorten the question")


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_backend_unavailable_on_cpu(errors, backend):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes the backend available")
    assert_one_line_error(errors[f"backend {backend}"],
                          f"--backend {backend} is unavailable on device cpu")


@pytest.mark.parametrize("name", list(USAGE_ERRORS))
def test_usage_errors_are_one_line(errors, name):
    assert_one_line_error(errors[f"usage {name}"], USAGE_ERRORS[name][1], "--help')")


@pytest.mark.parametrize("name", list(CONFIG_ERRORS))
def test_bad_option_values_are_one_line(errors, name):
    assert_one_line_error(errors[f"config {name}"], CONFIG_ERRORS[name][1])


def test_config_rejects_negative_answer_caps_and_non_finite_temperatures():
    from a2r.config import A2RConfig, PipelineError
    from a2r.sampling import SamplingParams

    for field in ("answer_max_chars", "answer_max_tokens"):
        with pytest.raises(PipelineError, match=field):
            A2RConfig(**{field: -7}).validate()
    A2RConfig(answer_max_chars=None, answer_max_tokens=0).validate()
    for field in ("temperature", "synth_temperature", "thinker_temperature"):
        for value in (float("nan"), float("inf"), -1.0):
            with pytest.raises(PipelineError, match=field):
                A2RConfig().replace(**{field: value}).validate()
    with pytest.raises(PipelineError, match="min_p"):
        A2RConfig(sampling=SamplingParams(min_p=-0.1)).validate()


# ------------------------------------------------------------------ files and directories


def test_model_directory_without_a_tokenizer(errors):
    assert_one_line_error(errors["no tokenizer"],
                          f"explorer model directory {errors['tmp'] / 'bare'} has no tokenizer")


@pytest.mark.parametrize("role", ["explorer", "thinker"])
def test_truncated_weights(errors, role):
    assert_one_line_error(errors[f"truncated {role} weights"],
                          f"{role} model directory {errors['tmp'] / f'truncated_{role}'} has no "
                          "loadable weights")


def test_invalid_config_json_and_a_file_for_a_directory(errors):
    assert_one_line_error(errors["invalid config.json"],
                          f"{errors['tmp'] / 'broken_config'}: config.json is not valid JSON (")
    assert_one_line_error(errors["file as explorer"],
                          "config.json is a file, not a model directory")


def test_thinker_without_mask_token_says_where_to_name_one(errors):
    # Not "pass mask_id=": the command line has no such parameter.
    assert_one_line_error(errors["thinker without mask token"], "names no mask token",
                          'add "mask_token_id": ID to config.json')
    assert "mask_id=" not in errors["thinker without mask token"][2]


def test_hub_ids_resolve_through_the_local_cache(tiny, tmp_path):
    """``--explorer org/name`` loads the snapshot in the Hugging Face cache, as from_pretrained
    would (HF_HUB_OFFLINE=1: no network); what looks like a path stays a path."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--a2r-test--tiny-explorer"
    shutil.copytree(tiny[1].explorer, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    hub = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    results = run_cases(tiny, {
        "hub id": (["run", "--explorer", "a2r-test/tiny-explorer", *FAST, "--json", "q"], hub),
        "not cached": (["run", "--explorer", "a2r-test/elsewhere", *FAST, "q"], hub),
        "relative path": (["run", "--explorer", "./a2r-test/tiny-explorer", *FAST, "q"], hub),
    }, forward_allowed=True)
    code, out, err = results["hub id"]
    assert code == 0, err
    models = json.loads(out)["models"]
    assert models["explorer"]["path"] == "a2r-test/tiny-explorer"
    assert models["explorer"]["arch"] == "Qwen3ForCausalLM" and models["explorer"]["random"]
    assert_one_line_error(results["not cached"], "explorer model 'a2r-test/elsewhere' is not a "
                          "local directory, and not a model in the local Hugging Face cache "
                          "(HF_HUB_OFFLINE is set)")
    assert_one_line_error(results["relative path"], "explorer model directory not found")


def test_unusable_home(errors):
    home = errors["tmp"] / "a_file" / "home"
    assert_one_line_error(errors["home under a file"],
                          f"--home {home}: cannot build the embedded models")
    assert_one_line_error(errors["A2R_HOME under a file"],
                          f"A2R_HOME={home}: cannot build the embedded models")
    if "home in /proc" in errors:
        assert_one_line_error(errors["home in /proc"],
                              "--home /proc/nope: cannot build the embedded models")
    assert_one_line_error(errors["home without random models"],
                          "--home /proc/nope: only --random-models builds models under --home")


def test_out_directory_is_created_only_when_asked(errors):
    missing = errors["tmp"] / "missing"
    assert_one_line_error(errors["out dir missing"],
                          f"directory {missing} does not exist (create it, or pass --mkdir)")
    # --mkdir creates the file's own directory only, never its ancestors.
    assert_one_line_error(errors["out mkdir grandparent missing"],
                          "--mkdir creates only the file's own directory")
    assert not missing.exists()
    assert_one_line_error(errors["out is a directory"], "is a directory")
    assert_one_line_error(errors["mkdir without out"], "--mkdir needs --out")


def test_out_whose_records_file_is_the_eval_file_is_refused(errors):
    """Resuming reads the records file and cuts a last line without newline: pointed at the eval
    file, that cut the user's last question off. It is refused before anything reads it."""
    assert_one_line_error(errors["out records are the eval file"], "is the eval file")
    assert (errors["tmp"] / "same.jsonl").read_text().endswith('"answer": 4}')


# ------------------------------------------------------------------ what a working run prints


def test_a_run_prints_no_warnings_and_says_when_the_models_are_random(tiny, tmp_path):
    # transformers 5.24 warns on every forward that gets `past_key_values` instead of `cache`.
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1?", "answer": 2}])
    trained_looking = tmp_path / "explorer"          # a copy without the random-weights marker
    shutil.copytree(tiny[1].explorer, trained_looking)
    (trained_looking / RANDOM_WEIGHTS_MARKER).unlink(missing_ok=True)
    results = run_cases(tiny, {
        "run": (["run", "--tiny", "--random-models", *FAST, "2+2?"], {}),
        "eval": (["eval", data, "--tiny", "--random-models", "--no-thinker", *FAST, "--no-progress"],
                 {}),
        "trained": (["run", "--explorer", trained_looking, *FAST, "--json", "2+2?"], {}),
    }, forward_allowed=True)
    for code, _, err in results.values():
        assert code == 0 and err == "", err
    assert "explorer, thinker, synthesizer model(s) are random (untrained)" in results["run"][1]
    assert "explorer, synthesizer model(s) are random (untrained)" in results["eval"][1]
    # The notice follows the marker file, so trained models (no marker) get none.
    payload = json.loads(results["trained"][1])
    assert payload["note"] is None and payload["models"]["explorer"]["random"] is False


def _function_in(filename, body):
    """A function ``f()`` whose code claims to live in ``filename`` (warnings report that file)."""
    namespace = {}
    exec(compile(f"import warnings\ndef f():\n    {body}\n", filename, "exec"), namespace)
    return namespace["f"]


def test_third_party_warnings_keep_their_own_format(capsys, monkeypatch):
    """Only warnings raised in a2r / a2r_kernels get the ``a2r: warning:`` prefix; the others
    go to Python's usual ``warnings.showwarning``."""
    import a2r.cli as cli

    library_warns = _function_in("/elsewhere/some_library.py",
                                 "warnings.warn('from a library', FutureWarning)")
    a2r_warns = _function_in(os.path.join(os.path.dirname(cli.__file__), "pipeline.py"),
                             "warnings.warn('from a2r itself', UserWarning)")

    def command(args):
        library_warns()
        a2r_warns()
        return 0

    shown = []
    monkeypatch.setitem(cli.COMMANDS, "bench", command)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, *rest: shown.append(
            f"{category.__name__}: {message}")
        assert cli.main(["bench"]) == 0
    err = capsys.readouterr().err
    assert err == "a2r: warning: from a2r itself\n"
    assert shown == ["FutureWarning: from a library"]


def test_cache_keyword_follows_the_forward_signature():
    from a2r_kernels.hf.decoder import cache_kwarg

    def old_forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    def new_forward(self, input_ids=None, cache=None, **kwargs): ...

    assert cache_kwarg(old_forward) == "past_key_values"   # transformers 5.0
    assert cache_kwarg(new_forward) == "cache"              # transformers 5.24


def test_mask_sizes_take_a_length_or_cache_position():
    """transformers 5.0 calls ``get_mask_sizes(cache_position, layer_idx)`` with a ``[T]`` tensor;
    5.24 calls it with the length T. Both must give plain ints (a tensor breaks 5.0's masks)."""
    import torch

    import a2r_kernels as ak
    from a2r_kernels.hf import ForwardContext, HFTreeCacheAdapter

    tree = ak.TreeKVCache(1, 1, 8, 4, block_size=4, dtype=torch.float32)
    hf_cache = HFTreeCacheAdapter(tree)
    hf_cache.begin(ForwardContext(tree, torch.zeros(6, dtype=torch.int64), past_lengths=[5, 2],
                                  seqs=[0, 1]))
    assert hf_cache.get_mask_sizes(3, 0) == (8, 0)
    sizes = hf_cache.get_mask_sizes(torch.arange(5, 8), 0)
    assert sizes == (8, 0) and all(type(v) is int for v in sizes)


def test_closed_stdout_pipe_is_not_a_traceback(tiny):
    """``a2r demo | head -1``: the reader leaves early. No traceback, no 'Exception ignored'."""
    read_end, write_end = os.pipe()
    os.close(read_end)                                  # every write of the child fails (EPIPE)
    env = {**os.environ, "A2R_HOME": str(tiny[0]), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "a2r.cli", "demo", "--no-thinker", *FAST],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, env=env,
                              timeout=600)
    finally:
        os.close(write_end)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr


# ------------------------------------------------------------------ Ctrl-C (a real SIGINT)

# Runs `a2r ARGV` (sys.exit(main(argv)), as the console script does) and stops it at one named
# point, test-side only: the first open() of a file matching `open` (an audit hook: model
# loading), the first rename onto a file matching `rename_to` (writing --out), or the first module
# forward (generation). There it writes one byte on `ready_fd` and waits on `block_fd`, which the
# test never writes: only the SIGINT the test then sends to the whole process group (as a terminal's
# Ctrl-C does) ends the wait, so where the signal lands is fixed, without sleeps.
INTERRUPT_DRIVER = r"""
import json, os, re, signal, sys
# Ctrl-C as at a terminal, also where the tests run in a background job of a non-interactive
# shell (`nohup ... &`), which starts its commands with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
spec = json.loads(os.environ.pop("A2R_TEST_PAUSE"))
paused = False

def pause():
    global paused
    paused = True
    os.write(spec["ready_fd"], b"p")
    os.read(spec["block_fd"], 1)
    raise SystemExit("the test's block pipe closed before the interrupt")

def audit(event, args):
    if paused:
        return
    if event == "open" and spec.get("open") and isinstance(args[0], (str, bytes, os.PathLike)):
        if re.search(spec["open"], os.fsdecode(args[0])):
            pause()
    if event == "os.rename" and spec.get("rename_to") and re.search(spec["rename_to"],
                                                                  os.fsdecode(args[1])):
        pause()

sys.addaudithook(audit)
if spec.get("forward"):
    import torch
    module_call = torch.nn.Module.__call__
    def paused_call(self, *args, **kwargs):
        if not paused:
            pause()
        return module_call(self, *args, **kwargs)
    torch.nn.Module.__call__ = paused_call
from a2r.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_interrupted(argv, env, **pause_at):
    """(reached the pause point, exit status, stdout, stderr) of ``a2r argv`` sent SIGINT there."""
    import select
    import signal

    ready_read, ready_write = os.pipe()
    block_read, block_write = os.pipe()
    spec = {"ready_fd": ready_write, "block_fd": block_read, **pause_at}
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPT_DRIVER, *map(str, argv)],
                            env={**env, "A2R_TEST_PAUSE": json.dumps(spec)},
                            pass_fds=(ready_write, block_read), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    os.close(ready_write)
    os.close(block_read)
    try:
        readable, _, _ = select.select([ready_read], [], [], 600)
        reached = bool(readable) and os.read(ready_read, 1) == b"p"   # b"": it exited first
        if reached:
            os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(ready_read)
        os.close(block_write)
    return reached, proc.returncode, out, err


@pytest.fixture(scope="module")
def interrupts(tiny, tmp_path_factory):
    """Each command interrupted at one point, all run side by side: ``{name: (reached, code, out,
    err, out_dir)}``."""
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("interrupts")
    env = {**os.environ, "A2R_HOME": str(tiny[0]), "OMP_NUM_THREADS": "1"}
    env.pop("A2R_DEBUG", None)
    data = write_jsonl(tmp / "qa.jsonl", [{"question": "What is 1 + 2 + 3?", "answer": 6}])
    cases = {
        "run while loading": (["run", "--explorer", tiny[1].explorer, *FAST, "q"],
                              {"open": re.escape(str(tiny[1].explorer / "config.json")) + "$"}),
        "demo while generating": (["demo", "--random-models", "--no-thinker", *FAST],
                                  {"forward": True}),
        "eval while loading": (["eval", data, "--tiny", "--no-thinker", *FAST, "--out", "OUT"],
                               {"open": r"explorer/config\.json$"}),
        "eval while writing --out": (["eval", data, "--tiny", "--no-thinker", *FAST, "--out",
                                      "OUT"], {"rename_to": r"summary\.json$"}),
    }

    def run(name):
        argv, pause_at = cases[name]
        out_dir = tmp / name.replace(" ", "_")
        out_dir.mkdir()
        argv = [out_dir / "summary.json" if a == "OUT" else a for a in argv]
        return (*run_interrupted(argv, env, **pause_at), out_dir)

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        return dict(zip(cases, pool.map(run, cases)))


@pytest.mark.parametrize("case", ["run while loading", "demo while generating",
                                  "eval while loading", "eval while writing --out"])
def test_ctrl_c_is_one_line_and_exit_130(interrupts, case):
    reached, code, _, err, _ = interrupts[case]
    assert reached, f"the command ended before the interrupt point: {code}\n{err}"
    assert code == 130 and err == "a2r: interrupted\n", err


@pytest.mark.parametrize("case", ["eval while loading", "eval while writing --out"])
def test_ctrl_c_leaves_no_partial_out_file(interrupts, case):
    """The --out file is written beside itself and renamed: an interrupted eval leaves none (and
    no temporary file); the records file holds whole lines only."""
    reached, _, _, _, out_dir = interrupts[case]
    assert reached
    left = sorted(p.name for p in out_dir.iterdir())
    assert left in ([], ["summary.jsonl"]), left
    for line in (out_dir / "summary.jsonl").read_text().splitlines() if left else []:
        json.loads(line)
