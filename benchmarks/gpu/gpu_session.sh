#!/usr/bin/env bash
# One GPU session in as few device calls as possible: build + test + sanitize, then benchmark.
#
#   bash benchmarks/gpu/gpu_session.sh [options] [phase]
#
# phases (default: build-test)
#   verify        THE ONE-CALL GPU PROOF, 480 s in all (fits the device tool's 15 minutes with
#                 the machine's start): build _C for sm_90 only, the kernel families' GPU tests
#                 (an explicit selection, VERIFY_TESTS), compute-sanitizer memcheck (racecheck
#                 if time is left) on one small case per CUDA kernel, the headline benchmark rows,
#                 one verdict line per GPU target (benchmarks/verdict.py). Table-driven: see
#                 verify_plan below; each result JSON is copied to $OUT/results/ as soon as its
#                 step ends; --dry-run prints the plan and its total
#   build-test    pip install -e . (csrc/ compiled for this GPU's arch), pytest on the CUDA /
#                 attention / denoise tests with compiled Triton, compute-sanitizer
#                 memcheck + racecheck (then synccheck + initcheck if time is left)
#   bench         install, then the benchmarks named in A2R_BENCHES, in that order (default
#                 "tree denoise plans flashinfer explore"): bench_tree_attention (full sweep),
#                 bench_denoise (full), the split-KV plan sweep at the target shapes
#                 (tree_attention_plans.json), FlashInfer decode / cascade baselines (--quick shapes,
#                 only when flashinfer imports), bench_explore at P=2048 then P=8192;
#                 benchmarks/results/*.json + *.png packed into $OUT/results.tgz
#   bench-explore the same with A2R_BENCHES=explore
#   all           build-test then bench, in one call, for as long as the time budget lasts
#   env           only the environment report (GPU, driver, tool and package versions)
#
# options
#   --dry-run     print every step with its time limit, run nothing
#   --assume-gpu  with --dry-run: show the steps a GPU machine would run (sm_90) on this machine
#   --quick       the benchmarks' --quick shapes (GPU: a few shapes; CPU: tiny ones)
#   --no-install  skip `pip install -e .` (use the package as installed)
#   --budget S    wall seconds the whole script may use (default 480 for verify, else 560: the
#                 device tool kills a command at 600 s; every step gets min(its cap, what is
#                 left - the reserve) and a step that would get less than its minimum is SKIPPED,
#                 so logs always come back)
#   --list-tests  print verify's pytest selection, one node id a line, and exit
#
# Environment: OUT (where logs go; the device tool sets it; default /tmp/a2r_gpu_session_out),
# PYTHON (default python3), A2R_CUDA_ARCHS (default: read off nvidia-smi), A2R_TESTS (the test
# files), A2R_PYTEST_WORKERS (pytest-xdist workers on a GPU, default 4, verify 8; 0 = no xdist),
# A2R_BENCHES (see bench), A2R_SESSION_BUDGET_S (= --budget).
#
# What comes back in $OUT (at most 7 of the device tool's 8 files):
#   <phase>.log      everything the phase printed (verify.log, build-test.log, bench.log, ...)
#   results/*.json   verify: each step's result file, copied as soon as the step ends
#   summary.txt      one line per step: status, seconds used, time limit, command
#   pytest-junit.xml per-test results of the build-test phase (verify: counted in summary.txt,
#                    the file kept in /tmp, so that its 5 result files fit in the 8 returned)
#   results.tgz      benchmarks/results/*.json *.png as the benchmarks left them (bench phases);
#                    unpack in the repository root: tar -xzf results.tgz
#
# Carried wheels: when .whl/*.whl exists (carry ".whl"), they are installed first with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# and PYTHONPATH=/tmp/site is exported (benchmarks/README.md: FlashInfer as a baseline).

set -uo pipefail   # no -e: every step records its own status and the script goes on

VERIFY_BUDGET_S=480   # verify's wall budget: 8 minutes, so machine start + verify fit in 15
VERIFY_RESERVE_S=20   # held back after verify's last step: a SIGINT-ed step's 15 s, the summary

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; }

PHASE=""
DRY_RUN=0
ASSUME_GPU=0
QUICK=0
INSTALL=1
BUDGET_S="${A2R_SESSION_BUDGET_S:-}"
LIST_TESTS=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --assume-gpu) ASSUME_GPU=1 ;;
    --quick) QUICK=1 ;;
    --no-install) INSTALL=0 ;;
    --budget) BUDGET_S="${2:?--budget needs seconds}"; shift ;;
    --budget=*) BUDGET_S="${1#--budget=}" ;;
    --list-tests) LIST_TESTS=1 ;;
    -h|--help) usage; exit 0 ;;
    verify|build-test|bench|bench-explore|all|env)
      [[ -z "$PHASE" ]] || { echo "gpu_session.sh: one phase only (got $PHASE and $1)" >&2; exit 2; }
      PHASE="$1" ;;
    *) echo "gpu_session.sh: unknown argument '$1' (phases: verify build-test bench bench-explore all env;" \
            "options: --dry-run --assume-gpu --quick --no-install --budget S --list-tests)" >&2; exit 2 ;;
  esac
  shift
done
PHASE="${PHASE:-build-test}"
[[ -n "$BUDGET_S" ]] || { [[ $PHASE == verify ]] && BUDGET_S=$VERIFY_BUDGET_S || BUDGET_S=560; }
[[ $ASSUME_GPU == 0 || $DRY_RUN == 1 ]] || { echo "gpu_session.sh: --assume-gpu needs --dry-run" >&2; exit 2; }
[[ "$BUDGET_S" =~ ^[0-9]+$ ]] || { echo "gpu_session.sh: --budget must be whole seconds, got '$BUDGET_S'" >&2; exit 2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO" || exit 2
OUT="${OUT:-${TMPDIR:-/tmp}/a2r_gpu_session_out}"   # outside the checkout: never sent or committed
JUNIT="$OUT/pytest-junit.xml"
[[ $PHASE == verify ]] && JUNIT="${TMPDIR:-/tmp}/a2r_verify_junit.xml"   # $OUT: 8 files at most
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
START_S=$(date +%s)
RESERVE_S=30          # kept back for a SIGINT-ed step to stop (15 s), packing and the summary
[[ $PHASE == verify ]] && RESERVE_S=$VERIFY_RESERVE_S
SUMMARY="$OUT/summary.txt"
MODE="$PHASE"                                   # what was asked; PHASE labels the log lines
[[ $MODE == all ]] && PHASE=build-test          # `all`: build-test.log, then bench.log
LOG="$OUT/$PHASE.log"
FAILED=0

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # the device has no internet: never try the hub
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"          # FlashInfer's JIT (ninja) parallelism

HAS_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAS_GPU=1; fi
if [[ $ASSUME_GPU == 1 ]]; then HAS_GPU=1; export A2R_CUDA_ARCHS="${A2R_CUDA_ARCHS:-90}"; fi
if [[ $HAS_GPU == 1 ]]; then
  # Test modules set TRITON_INTERPRET with os.environ.setdefault(..., "1") (test_attention and
  # test_denoise only without a GPU, others always): an exported 0 wins over every setdefault,
  # and a2r_kernels.backend.triton_interpret and triton.knobs both read "0" as off, so
  # "triton" means compiled kernels on CUDA tensors.
  export TRITON_INTERPRET=0
  if [[ -z "${A2R_CUDA_ARCHS:-}" ]]; then
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')"
    [[ "$cap" =~ ^[0-9]+$ ]] && export A2R_CUDA_ARCHS="$cap"   # "9.0" -> "90": sm_90 SASS + PTX
  fi
else
  export TRITON_INTERPRET=1   # CPU: Triton kernels run in the interpreter (small shapes only)
fi
# The CUDA tools may sit outside PATH (/usr/local/cuda/bin): setup.py finds nvcc via CUDA_HOME.
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PATH="$PATH:/usr/local/cuda/bin"
fi
if command -v nvcc >/dev/null 2>&1; then export A2R_BUILD_CUDA=1; fi   # a failed build is an error
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
             /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n1)"
[[ $ASSUME_GPU == 1 && -z "$SANITIZER" ]] && SANITIZER=compute-sanitizer

QUICK_FLAG=""; [[ $QUICK == 1 || $HAS_GPU == 0 ]] && QUICK_FLAG="--quick"
DEFAULT_TESTS="tests/test_cuda.py tests/test_cuda_gpu.py tests/test_attention.py"
DEFAULT_TESTS+=" tests/test_paged_attention.py tests/test_layout.py tests/test_denoise.py"
DEFAULT_TESTS+=" tests/test_denoise_rules.py"
TESTS="${A2R_TESTS:-$DEFAULT_TESTS}"

DRY_ELAPSED_S=0       # --dry-run: a simulated clock, advanced by each step's expected time
elapsed_s() { if [[ $DRY_RUN == 1 ]]; then echo "$DRY_ELAPSED_S"; else echo $(( $(date +%s) - START_S )); fi; }
remaining_s() { echo $(( BUDGET_S - $(elapsed_s) - RESERVE_S )); }

say() { echo "$*" | tee -a "$LOG"; }

record() {  # status seconds limit name command
  printf '%-9s %5ss / %-5s %-30s %s\n' "$1" "$2" "$3" "$4" "$5" >> "$SUMMARY"
}

# step NAME CAP_S MIN_S EXPECT_S COMMAND: run COMMAND (a bash string) under `timeout`, its output
# tee'd to $LOG; the limit is min(CAP_S, time left); SKIPPED when that is under MIN_S. EXPECT_S is
# a guess of its time on an H100 (not measured yet), used only to simulate the budget in --dry-run.
# Returns COMMAND's status.
step() {
  local name="$1" cap="$2" min="$3" expect="$4" cmd="$5" left limit begin rc status shown full
  full="$(echo "$cmd" | tr -s ' \n' ' ' | sed 's/^ //')"
  shown="$full"
  (( ${#shown} > 200 )) && shown="${shown:0:197}..."
  left=$(remaining_s)
  limit=$(( cap < left ? cap : left ))
  if (( limit < min )); then
    say "=== [$PHASE] $name: SKIPPED, ${left}s left of the budget, needs ${min}s"
    record SKIPPED 0 "$min" "$name" "$shown"
    return 0
  fi
  # a dry run shows the whole command and the simulated clock: it is the plan a reviewer checks
  if [[ $DRY_RUN == 1 ]]; then
    say "=== [$PHASE] $name (limit ${limit}s, at t=$(elapsed_s)s): $full"
  else
    say "=== [$PHASE] $name (limit ${limit}s, $(date -u +%H:%M:%S)): $shown"
  fi
  if [[ $DRY_RUN == 1 ]]; then
    expect=$(( expect < limit ? expect : limit ))
    DRY_ELAPSED_S=$(( DRY_ELAPSED_S + expect ))
    record DRY-RUN "~$expect" "$limit" "$name" "$shown"
    return 0
  fi
  begin=$(date +%s)
  # SIGINT first: pytest then still prints its summary and writes the junit file; python
  # scripts stop with a traceback that says where they were. SIGKILL 15 s later.
  timeout --signal=INT --kill-after=15 "$limit" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT ;;
    *) status="FAIL($rc)" ;;
  esac
  [[ $rc == 0 ]] || FAILED=1
  say "=== [$PHASE] $name: $status after $(( $(date +%s) - begin ))s"
  record "$status" "$(( $(date +%s) - begin ))" "$limit" "$name" "$shown"
  return "$rc"
}

# ------------------------------------------------------------------------------------ steps
env_report() {
  step env 60 5 5 "$(env_cmd)"
}

env_cmd() {  # the environment report's command: GPU, driver, tools, package versions
  echo "date -u; uname -srm; echo phase=$PHASE quick=$QUICK install=$INSTALL budget=${BUDGET_S}s gpu=$HAS_GPU
    echo A2R_CUDA_ARCHS=\${A2R_CUDA_ARCHS:-unset} TRITON_INTERPRET=\$TRITON_INTERPRET PYTHONPATH=\${PYTHONPATH:-}
    if [[ $HAS_GPU == 1 ]]; then
      nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
    fi
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    [[ -n \"$SANITIZER\" ]] && $SANITIZER --version | head -n 2
    cmake --version | head -n 1; ninja --version
    $PY - <<'EOF'
import importlib, platform, sys
print('python', platform.python_version(), sys.executable)
for name in ('torch', 'triton', 'transformers', 'numpy', 'pybind11', 'pytest', 'hypothesis',
             'xdist', 'matplotlib', 'flashinfer', 'tvm_ffi', 'flash_attn'):
    try:
        module = importlib.import_module(name)
        print(f'{name:>12} {getattr(module, \"__version__\", \"?\")}  {module.__file__}')
    except Exception as exc:
        print(f'{name:>12} -- {type(exc).__name__}: {str(exc)[:120]}')
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f'torch sees {p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB,'
          f' L2 {getattr(p, \"L2_cache_size\", 0) / 2**20:.0f} MiB, torch CUDA {torch.version.cuda}')
EOF"
}

# --upgrade so a re-run in a warm machine replaces what an earlier call installed
WHEELS_CMD="ls -la .whl; $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl"

install_wheels() {
  compgen -G ".whl/*.whl" >/dev/null || return 0
  step wheels 120 10 10 "$WHEELS_CMD" && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
}

install_package() {
  [[ $INSTALL == 1 ]] || { say "=== [$PHASE] install: skipped (--no-install)"; return 0; }
  # A warm machine (a call within 30 s of the last) still has the editable install and _C: pip
  # would rebuild it from scratch in a temporary build folder, so keep it while no source changed.
  local built
  built="$(ls -t a2r_kernels/_C*.so 2>/dev/null | head -n1)"
  if [[ $DRY_RUN == 0 && -n "$built" && -z "$(find csrc CMakeLists.txt setup.py -newer "$built" 2>/dev/null | head -n1)" ]] \
      && (cd /tmp && $PY -c "import a2r_kernels._C, a2r_kernels, sys; sys.exit(not a2r_kernels.__file__.startswith('$REPO/'))") 2>/dev/null; then
    say "=== [$PHASE] install: $built is installed and newer than csrc/, CMakeLists.txt, setup.py; kept"
    record kept 0 0 install "$built"
    return 0
  fi
  # --no-deps --no-index: torch / numpy / transformers are already there and nothing can be
  # fetched; -v shows the CMake build and ptxas's spill warnings (-Xptxas=-warn-spills).
  step install 240 30 45 "$PY -m pip install -v --no-deps --no-index --no-build-isolation -e . 2>&1 | grep -v '^  *\(copying\|adding\|creating\) ' ; test \${PIPESTATUS[0]} = 0 && $PY -c 'import a2r_kernels._C as C, a2r_kernels as ak; print(\"a2r_kernels._C\", C.__file__, \"CUDA runtime\", C.cuda_runtime_version(), \"ops\", sorted(C.PUBLIC_OPS))' && { ! command -v cuobjdump >/dev/null || cuobjdump --list-elf a2r_kernels/_C*.so | head -n 20; }"
}

run_tests() {
  local xdist=""
  if [[ $HAS_GPU == 1 && "${A2R_PYTEST_WORKERS:-4}" != 0 ]] && $PY -c "import xdist" 2>/dev/null; then
    xdist="-n ${A2R_PYTEST_WORKERS:-4} --dist load"
  fi
  # -rs: every skip reason (a GPU test skipped on a GPU machine is a finding), slowest tests last
  step pytest 420 60 240 "$PY -m pytest -q -rs --durations=15 -p no:cacheprovider $xdist --junitxml=$OUT/pytest-junit.xml $TESTS"
}

run_sanitizers() {
  if [[ $HAS_GPU == 0 || -z "$SANITIZER" ]]; then
    if [[ $HAS_GPU == 1 ]]; then
      say "=== [$PHASE] compute-sanitizer not found on PATH or under /usr/local/cuda*"
      record SKIPPED 0 0 sanitize "compute-sanitizer not found"; FAILED=1
    fi
    step sanitize-smoke 60 10 10 "$PY benchmarks/cuda_sanitize.py --quick"
    return
  fi
  # No caching allocator under memcheck/initcheck: torch otherwise sub-allocates small tensors
  # inside one large cudaMalloc, where an out-of-bounds access lands in valid memory unseen.
  local tool env cap
  for tool in memcheck racecheck synccheck initcheck; do
    env=""; cap=240
    [[ $tool == memcheck || $tool == initcheck ]] && env="PYTORCH_NO_CUDA_MEMORY_CACHING=1"
    [[ $tool == synccheck || $tool == initcheck ]] && cap=150
    step "sanitize-$tool" "$cap" 45 90 "$env $SANITIZER --tool $tool --error-exitcode 86 --print-limit 50 $PY benchmarks/cuda_sanitize.py"
  done
}

run_explore() {
  # One process per prompt length: bench_explore writes its JSON only at the end, so a timeout
  # then costs one prompt length, not the whole grid (rows are upserted per device and shape).
  if [[ -n "$QUICK_FLAG" ]]; then
    step bench-explore-quick 240 60 60 "$PY benchmarks/bench_explore.py --quick"
    return
  fi
  step bench-explore-P2048 300 120 150 "$PY benchmarks/bench_explore.py --prompt-lens 2048"
  step bench-explore-P8192 400 180 240 "$PY benchmarks/bench_explore.py --prompt-lens 8192"
}

have_flashinfer() {
  [[ $HAS_GPU == 1 ]] || return 1
  $PY -c "import flashinfer" 2>/dev/null && return 0
  [[ $DRY_RUN == 1 ]] && compgen -G ".whl/flashinfer*.whl" >/dev/null   # not installed by a dry run
}

run_benches() {
  # Default order: the two kernel products, their external baseline, the end-to-end explorer.
  local bench
  for bench in ${A2R_BENCHES:-tree denoise plans flashinfer explore}; do
    case "$bench" in
      tree) step bench-tree-attention 300 90 180 "$PY benchmarks/bench_tree_attention.py $QUICK_FLAG" ;;
      # the split-KV plan sweep at the issue's target shapes (tunes a2r_kernels/layout.py)
      plans) step bench-tree-plans 150 30 60 "$PY benchmarks/bench_tree_attention.py --P 1024,8192 --N 4,64 --S 128 --heads 32/8,8/1 --providers a2r-tree,a2r-paged,a2r-cuda --plan-sweep --tile-sweep --out tree_attention_plans" ;;
      denoise) step bench-denoise 240 60 90 "$PY benchmarks/bench_denoise.py $QUICK_FLAG --cuda-split-sweep" ;;
      flashinfer) run_flashinfer ;;
      explore) run_explore ;;
      *) say "=== [$PHASE] unknown benchmark '$bench' in A2R_BENCHES (tree denoise plans flashinfer explore)"
         record FAIL 0 0 "$bench" "unknown benchmark"; FAILED=1 ;;
    esac
  done
}

run_flashinfer() {
  if ! have_flashinfer; then
    say "=== [$PHASE] flashinfer: not importable (carry .whl, see benchmarks/README.md), skipped"
    record SKIPPED 0 0 flashinfer "not importable: carry .whl (benchmarks/README.md)"
    return 0
  fi
  # Separate processes, --quick shapes: FlashInfer JIT-compiles its kernels with nvcc on first
  # use (minutes), and an error there must not cost other rows (a failing provider ends
  # bench_tree_attention before it writes anything). Each run redraws the P plots with its own
  # providers only, so the full run's plots are put back afterwards.
  local saved=/tmp/a2r_tree_png provider
  mkdir -p "$saved" && cp benchmarks/results/tree_attention_P*.png "$saved"/ 2>/dev/null
  for provider in flashinfer-decode flashinfer-cascade; do
    step "bench-tree-$provider" 300 120 150 "$PY benchmarks/bench_tree_attention.py --quick --providers a2r-tree,a2r-paged,$provider"
  done
  cp "$saved"/*.png benchmarks/results/ 2>/dev/null
}

pack_results() {
  [[ $DRY_RUN == 1 ]] && { record DRY-RUN 0 0 pack "tar -czf $OUT/results.tgz benchmarks/results"; return; }
  # Unpack over the repository root; the JSON files hold every device's rows (upserted).
  tar -czf "$OUT/results.tgz" benchmarks/results/*.json benchmarks/results/*.png 2>>"$LOG" \
    && say "=== [$PHASE] packed $(tar -tzf "$OUT/results.tgz" | wc -l) files into $OUT/results.tgz"
}

phase_build_test() {
  install_package
  run_tests
  run_sanitizers
}

phase_bench() {
  install_package
  run_benches
  pack_results
}

phase_bench_explore() {
  A2R_BENCHES=explore phase_bench
}

# ============================================================================ verify (one call)
# The GPU tests that matter most: every CUDA kernel family (tests/test_cuda.py, test_cuda_gpu.py)
# and every compiled Triton family (test_attention.py, test_paged_attention.py, test_denoise.py,
# test_denoise_rules.py, test_entropy_bound.py, test_wrapper.py, test_from_block_tables.py with
# TRITON_INTERPRET=0; the wrapper's CUDA-graph capture and replay) against the torch reference,
# on a few odd shapes per dtype: GQA 1-8, head_dim 40/96/256, block sizes 1/16/32, strided and
# non-contiguous inputs, empty paths, V = 1 / 50257, ties, forced V splits.
# tests/test_gpu_session.py checks in CI that every id here is still collected (a [cuda] backend
# parameter exists only with a GPU: without one such an id must name a test that collects for
# triton). A new kernel family or GPU-only test: add a few ids here and give the pytest step the
# seconds they need.
VERIFY_TESTS=(
  tests/test_cuda.py::test_extension_imports_when_nvcc_was_available
  "tests/test_cuda_gpu.py::test_tree_decode_matches_reference[contig-seed3-torch.bfloat16]"
  "tests/test_cuda_gpu.py::test_tree_decode_matches_reference[contig-seed5-torch.bfloat16]"
  "tests/test_cuda_gpu.py::test_tree_decode_matches_reference[contig-seed6-torch.float32]"
  "tests/test_cuda_gpu.py::test_tree_decode_matches_reference[strided-seed4-torch.float16]"
  tests/test_cuda_gpu.py::test_tree_decode_empty_paths_and_sm_scale
  tests/test_cuda_gpu.py::test_tree_decode_any_q_and_out_strides
  tests/test_cuda_gpu.py::test_tree_decode_zero_sequences
  "tests/test_cuda_gpu.py::test_paged_decode_matches_reference[128-hq8hkv1-16-torch.bfloat16]"
  "tests/test_cuda_gpu.py::test_paged_decode_matches_reference[64-hq8hkv2-32-torch.float16]"
  "tests/test_cuda_gpu.py::test_paged_decode_matches_reference[128-hq4hkv4-16-torch.float32]"
  "tests/test_cuda_gpu.py::test_merge_states_matches_reference[100-torch.bfloat16]"
  "tests/test_cuda_gpu.py::test_merge_states_matches_reference[1-torch.float16]"
  "tests/test_cuda_gpu.py::test_merge_states_matches_reference[64-torch.float32]"
  tests/test_cuda_gpu.py::test_merge_partials_direct_with_empty_rows
  "tests/test_cuda_gpu.py::test_denoise_matches_reference_topk[3x5x50257-low_confidence-torch.bfloat16]"
  "tests/test_cuda_gpu.py::test_denoise_matches_reference_topk[2x17x1000-margin-torch.float16]"
  "tests/test_cuda_gpu.py::test_denoise_matches_reference_topk[2x17x1000-entropy-torch.float32]"
  "tests/test_cuda_gpu.py::test_denoise_matches_reference_topk[4x1x1-random-torch.bfloat16]"
  "tests/test_cuda_gpu.py::test_denoise_forced_splits_match_reference[low_confidence-7-torch.bfloat16]"
  "tests/test_cuda_gpu.py::test_denoise_forced_splits_match_reference[entropy-2-torch.float32]"
  "tests/test_cuda_gpu.py::test_denoise_gumbel_sampling_matches_reference[50257-0.5]"
  "tests/test_cuda_gpu.py::test_denoise_threshold_mode[0.3]"
  "tests/test_cuda_gpu.py::test_denoise_all_or_none_masked[all_masked]"
  tests/test_cuda_gpu.py::test_denoise_ties_go_to_lower_positions_and_index
  tests/test_cuda_gpu.py::test_denoise_noncontiguous_and_unmasked_logits_never_read
  tests/test_cuda_gpu.py::test_denoise_random_scores_bitwise_match_the_reference_stream
  "tests/test_attention.py::test_tree_kernel_matches_reference[seed0-float16-triton]"
  "tests/test_attention.py::test_tree_kernel_matches_reference[seed4-bfloat16-triton]"
  "tests/test_attention.py::test_tree_kernel_matches_reference[seed6-float32-triton]"
  "tests/test_attention.py::test_tree_kernel_matches_reference[seed7-bfloat16-triton]"
  "tests/test_attention.py::test_tree_kernel_edge_shapes[block_size1-d256-triton]"
  "tests/test_attention.py::test_tree_kernel_edge_shapes[rows328-triton]"
  "tests/test_attention.py::test_tree_kernel_edge_shapes[groups3-chunk64-triton]"
  "tests/test_attention.py::test_tree_kernel_noncontiguous_inputs_and_scale[dtype1-triton]"
  "tests/test_attention.py::test_empty_paths_give_zero_and_neg_inf[triton]"
  "tests/test_paged_attention.py::test_paged_kernel_matches_reference[dtype0-16-8-2-64-triton]"
  "tests/test_paged_attention.py::test_paged_kernel_matches_reference[dtype2-16-6-3-64-triton]"
  "tests/test_paged_attention.py::test_paged_several_splits_and_strided_tables[triton]"
  "tests/test_paged_attention.py::test_merge_states_is_attention_over_union[dtype0-triton]"
  "tests/test_paged_attention.py::test_merge_states_is_attention_over_union[dtype1-triton]"
  "tests/test_paged_attention.py::test_merge_states_is_attention_over_union[dtype2-triton]"
  "tests/test_paged_attention.py::test_merge_states_ignores_the_payload_of_empty_states[dtype0-triton]"
  tests/test_paged_attention.py::test_triton_merge_partials_ignores_the_payload_of_empty_rows
  "tests/test_incremental_plan.py::test_decode_step_planner_cuda_graph_replays_later_plans[compiled]"
  "tests/test_attention.py::test_head_major_transposed_key_pool_is_read_in_place[triton]"
  "tests/test_denoise.py::test_matches_reference[shape0-selection0-0.0-low_confidence-triton]"
  "tests/test_denoise.py::test_matches_reference[shape0-selection1-0.8-margin-triton]"
  "tests/test_denoise.py::test_matches_reference[shape1-selection0-0.0-entropy-triton]"
  "tests/test_denoise.py::test_matches_reference[shape2-selection0-0.8-random-triton]"
  "tests/test_denoise.py::test_low_precision_logits[low_confidence-dtype0-triton]"
  "tests/test_denoise.py::test_low_precision_logits[entropy-dtype1-triton]"
  "tests/test_denoise.py::test_large_vocab[low_confidence-0.0-triton]"
  "tests/test_denoise.py::test_non_contiguous_inputs[triton]"
  "tests/test_denoise.py::test_triton_several_chunks_and_splits[0.0-low_confidence]"
  "tests/test_denoise_rules.py::test_ties_go_to_lower_positions[triton]"
  "tests/test_denoise_rules.py::test_all_masked_and_none_masked[triton]"
  "tests/test_denoise_rules.py::test_threshold_rule[triton]"
  "tests/test_denoise_rules.py::test_empty_and_single_position[triton]"
  "tests/test_entropy_bound.py::test_triton_matches_reference[shape2-inf]"
  "tests/test_entropy_bound.py::test_triton_matches_reference[shape6-4.0]"
  "tests/test_entropy_bound.py::test_triton_low_precision_logits[dtype1]"
  "tests/test_entropy_bound.py::test_triton_several_chunks_and_splits[64-4]"
  tests/test_entropy_bound.py::test_triton_non_contiguous_inputs
  "tests/test_entropy_bound.py::test_matches_transformers_sampler[1.0-triton]"
  "tests/test_entropy_bound.py::test_non_finite_logits[triton]"
  tests/test_entropy_bound.py::test_cuda_device_checks
  "tests/test_entropy_bound.py::test_cuda_triton_at_gemma_vocabulary[flat]"
  "tests/test_entropy_bound.py::test_cuda_triton_at_gemma_vocabulary[lm-like]"
  "tests/test_wrapper.py::test_cuda_graph_capture_replan_replay[triton]"
  "tests/test_wrapper.py::test_cuda_graph_over_cache_layouts[triton]"
  "tests/test_wrapper.py::test_cuda_graph_capture_replan_replay[cuda]"
  "tests/test_wrapper.py::test_cuda_graph_over_cache_layouts[cuda]"
  "tests/test_wrapper.py::test_cache_layouts_step_by_step[triton]"
  "tests/test_wrapper.py::test_three_trees_through_one_wrapper_and_one_out[bfloat16-8/1-bs32-triton]"
  "tests/test_wrapper.py::test_three_trees_through_one_wrapper_and_one_out[float16-16/2-bs1-triton]"
  "tests/test_wrapper.py::test_stale_work_items_of_a_larger_plan_are_cleared[triton]"
  "tests/test_from_block_tables.py::test_from_block_tables_matches_paged_decode[1-triton]"
  "tests/test_decode_graphs.py::test_cuda_graph_replay_equals_eager[triton]"
  "tests/test_decode_graphs.py::test_cuda_graph_replay_equals_eager[cuda]"
  tests/test_explore.py::test_cuda_stop_reads_through_the_pinned_buffer
  tests/test_explore_steps.py::test_cuda_plan_run_and_sample_never_sync
)

# The headline rows' providers: issue 12's wrapper (planned once, timed on run) and its
# CUDA-graph replay (target in verdict.py); the host-side plan rows are a CPU target, skipped.
TREE_PROVIDERS="a2r-tree,a2r-paged,a2r-cuda,a2r-tree-wrapper,a2r-tree-graph"

# plan_step NAME BUDGET_S MIN_S KIND NEEDS RESULT COMMAND -- one row of the verify plan.
#   BUDGET_S  the most wall seconds the step may take: its timeout, and what the dry run's
#             simulated clock advances by. The plan's budgets + VERIFY_RESERVE_S must fit in
#             the phase budget (480 s), or verify refuses to start (tests/test_gpu_session.py).
#   MIN_S     the step is SKIPPED rather than started with less time than this
#   KIND      must   its budget is held back from every earlier step
#             spare  runs only in time that no later `must` step needs (racecheck)
#             extra  like spare, and also takes the seconds earlier steps saved (FlashInfer:
#                    its JIT compile takes what the plan has left)
#   NEEDS     -, wheels (.whl/*.whl carried), sanitizer (compute-sanitizer found), flashinfer
#             (importable once the wheels are installed; the plan counts it when its wheel is
#             carried). The dry run plans every step, as if all of them were there.
#   RESULT    benchmarks/results/RESULT.json is copied to $OUT/results/ as soon as the step
#             ends (a killed call still brings back what finished); - for none
P_NAME=(); P_BUDGET=(); P_MIN=(); P_KIND=(); P_NEEDS=(); P_RESULT=(); P_CMD=()
plan_step() {
  P_NAME+=("$1"); P_BUDGET+=("$2"); P_MIN+=("$3"); P_KIND+=("$4"); P_NEEDS+=("$5")
  P_RESULT+=("$6"); P_CMD+=("$7")
}

verify_plan() {
  local workers="${A2R_PYTEST_WORKERS:-8}" tests memcheck racecheck
  tests="$(printf '%q ' "${VERIFY_TESTS[@]}")"
  # No caching allocator under memcheck: torch otherwise sub-allocates small tensors inside one
  # large cudaMalloc, where an out-of-bounds access lands in valid memory unseen.
  memcheck="PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SANITIZER --tool memcheck --error-exitcode 86 --print-limit 50 $PY benchmarks/cuda_sanitize.py --small"
  racecheck="$SANITIZER --tool racecheck --error-exitcode 86 --print-limit 50 $PY benchmarks/cuda_sanitize.py --small"
  #         name                  budget min kind  needs      result           command
  # the carried wheels first, so that the environment report shows what imports
  plan_step wheels                10     5   must  wheels     -                "$WHEELS_CMD"
  plan_step env                   12     3   must  -          -                "$(env_cmd)"
  # (1) sm_90 only (A2R_CUDA_ARCHS from nvidia-smi), the .cu files compiled in parallel by ninja
  plan_step build                 45     25  must  -          -                "A2R_BUILD_CUDA=1 A2R_CUDA_ARCHS=${A2R_CUDA_ARCHS:-90} A2R_BUILD_JOBS=\$(nproc) $PY setup.py build_ext --inplace && $PY -c 'import a2r_kernels._C as C; print(\"a2r_kernels._C\", C.__file__, \"CUDA runtime\", C.cuda_runtime_version())' && { ! command -v cuobjdump >/dev/null || cuobjdump --list-elf a2r_kernels/_C*.so; }"
  # (2) compiled Triton (TRITON_INTERPRET=0) and CUDA against the reference; xdist when present
  plan_step pytest                95     45  must  -          -                "A2R_PYTEST_WORKERS=$workers verify_pytest $tests"
  # (3) one small case per CUDA kernel under the sanitizer
  plan_step sanitize-memcheck     45     30  must  sanitizer  -                "$memcheck"
  plan_step sanitize-racecheck    20     15  spare sanitizer  -                "$racecheck"
  # (4) the headline rows: tree attention at the issues' two target shapes (one process each,
  # since a benchmark writes its JSON at its end), denoise, explore against hf-generate
  plan_step bench-tree-P8k-N64    30     15  must  -          tree_attention   "$PY benchmarks/bench_tree_attention.py --P 8192 --N 64 --S 128 --heads 32/8 --providers $TREE_PROVIDERS --no-plan-rows"
  plan_step bench-tree-P1k-N4     25     10  must  -          tree_attention   "$PY benchmarks/bench_tree_attention.py --P 1024 --N 4 --S 128 --heads 8/1 --providers $TREE_PROVIDERS --no-plan-rows"
  plan_step bench-denoise         35     20  must  -          denoise          "$PY benchmarks/bench_denoise.py --ops denoise --shapes 8x256x126464"
  # issue 15: the entropy-bound step at its default GPU shape, B=8 L=256 V=262144, flat and
  # lm-like logits, against transformers' sampler step
  plan_step bench-entropy-bound   35     20  must  -          entropy_bound    "$PY benchmarks/bench_denoise.py --ops entropy-bound"
  # Issue 13: CUDA-graph (a2r-explore) and eager (a2r-explore-eager) explore rows side by side.
  plan_step bench-explore         75     45  must  -          explore          "$PY benchmarks/bench_explore.py --prompt-lens 8192 --ns 32 --providers a2r-explore a2r-explore-eager hf-generate --rep 2"
  # FlashInfer's cascade beside a2r-paged, in its own file: its JIT compile (nvcc, minutes on a
  # fresh machine) must not cost the rows above.
  plan_step bench-tree-flashinfer 25     20  extra flashinfer tree_attention_flashinfer "rc=0; for shape in '8192 64 32/8' '1024 4 8/1'; do set -- \$shape; $PY benchmarks/bench_tree_attention.py --P \$1 --N \$2 --S 128 --heads \$3 --providers a2r-paged,flashinfer-cascade --out tree_attention_flashinfer || rc=1; done; exit \$rc"
  plan_step verdict               5      3   must  -          -                "set -o pipefail; $PY benchmarks/verdict.py --results benchmarks/results --baseline $BASELINE_DIR | tee $VERDICT_FILE"
}

# verify_pytest ID...: pytest on the ids that collect, and the list of those that do not. One id
# pytest cannot find (a renamed test, a module that fails to import on the device's torch or
# transformers) would otherwise end the whole run before its first test.
verify_pytest() {
  local collected ids found rc=0 xdist=() run_ids=()
  # whole files, not the ids: pytest lists nothing when one id is not found
  collected="$("$PY" -m pytest --collect-only -q -p no:cacheprovider --continue-on-collection-errors \
               $(printf '%s\n' "${@%%::*}" | sort -u) 2>&1)"
  ids="$(grep -xF -- "$(printf '%s\n' "$@")" <<<"$collected")"
  found=$(grep -c . <<<"$ids")
  echo "verify: $found of $# test ids collected"
  if [[ $found != "$#" ]]; then
    grep -E '^(ERROR|E ) ' <<<"$collected" | head -n 20
    echo "verify: not collected:"; printf '%s\n' "$@" | grep -vxF -- "$ids"
  fi
  if (( found > 0 )); then
    if [[ ${A2R_PYTEST_WORKERS:-0} != 0 ]] && "$PY" -c "import xdist" 2>/dev/null; then
      xdist=(-n "$A2R_PYTEST_WORKERS" --dist load)
    fi
    mapfile -t run_ids <<<"$ids"
    "$PY" -m pytest -q -rs --durations=10 -p no:cacheprovider "${xdist[@]}" \
      --junitxml="$JUNIT" "${run_ids[@]}" || rc=$?
  fi
  [[ $found == "$#" || $rc != 0 ]] || rc=1
  return "$rc"
}

needs_met() {  # NEEDS WHEN(plan|run): is the step's prerequisite there?
  case "$1" in
    -) return 0 ;;
    wheels) [[ $DRY_RUN == 1 ]] || compgen -G ".whl/*.whl" >/dev/null ;;
    sanitizer) [[ -n "$SANITIZER" ]] ;;
    flashinfer)
      [[ $DRY_RUN == 1 ]] && return 0
      [[ $2 == plan ]] && compgen -G ".whl/flashinfer*.whl" >/dev/null && return 0
      $PY -c "import flashinfer" 2>/dev/null ;;
    *) echo "gpu_session.sh: unknown NEEDS '$1' in verify_plan" >&2; return 1 ;;
  esac
}

copy_result() {  # RESULT: benchmarks/results/RESULT.json -> $OUT/results/ (renamed into place)
  [[ $DRY_RUN == 1 || $1 == - ]] && return 0
  local src="benchmarks/results/$1.json"
  [[ -f "$src" ]] || { say "=== [$PHASE] $src: not written"; return 0; }
  mkdir -p "$OUT/results" && cp "$src" "$OUT/results/$1.json.tmp" \
    && mv "$OUT/results/$1.json.tmp" "$OUT/results/$1.json" \
    && say "=== [$PHASE] $src -> $OUT/results/$1.json"
}

run_plan() {  # print the plan and its total, refuse a plan over budget, then run its steps
  local n=${#P_NAME[@]} i j total=0 reserved avail limit planned=()
  say "# verify plan (seconds; the dry run's simulated clock): step, budget, start -> end, kind, needs"
  for ((i = 0; i < n; i++)); do
    planned[i]=0
    needs_met "${P_NEEDS[i]}" plan || continue
    planned[i]=1
    say "$(printf '#   %-24s %4ss %5s -> %4s  %-5s %s' "${P_NAME[i]}" "${P_BUDGET[i]}" "$total" \
           "$((total + P_BUDGET[i]))" "${P_KIND[i]}" "${P_NEEDS[i]}")"
    total=$((total + P_BUDGET[i]))
  done
  if (( total + RESERVE_S > BUDGET_S )); then
    say "# verify plan total: ${total}s of steps + ${RESERVE_S}s reserve = $((total + RESERVE_S))s > ${BUDGET_S}s budget: DOES NOT FIT, nothing run"
    record FAIL 0 "$BUDGET_S" plan "steps ${total}s + reserve ${RESERVE_S}s over the ${BUDGET_S}s budget"
    return 2
  fi
  say "# verify plan total: ${total}s of steps + ${RESERVE_S}s reserve = $((total + RESERVE_S))s <= ${BUDGET_S}s budget: fits"
  for ((i = 0; i < n; i++)); do
    if [[ ${planned[i]} == 0 ]] || ! needs_met "${P_NEEDS[i]}" run; then
      say "=== [$PHASE] ${P_NAME[i]}: SKIPPED, needs ${P_NEEDS[i]}"
      record SKIPPED 0 0 "${P_NAME[i]}" "needs ${P_NEEDS[i]}"
      continue
    fi
    reserved=0
    for ((j = i + 1; j < n; j++)); do
      [[ ${planned[j]} == 1 && ${P_KIND[j]} == must ]] && reserved=$((reserved + P_BUDGET[j]))
    done
    avail=$(( $(remaining_s) - reserved ))
    limit=$(( P_BUDGET[i] < avail ? P_BUDGET[i] : avail ))
    [[ ${P_KIND[i]} == extra ]] && limit=$avail
    (( limit > 0 )) || limit=0
    step "${P_NAME[i]}" "$limit" "${P_MIN[i]}" "${P_BUDGET[i]}" "${P_CMD[i]}"
    copy_result "${P_RESULT[i]}"
  done
  return 0
}

DEVICE_CARRY_LIMIT_MB=64   # the device tool sends at most 64 MiB: checkout + carried paths

carry_report() {  # what the device call sends: the checkout (tracked + untracked, not ignored) + .whl
  local tree wheels total
  tree=$(git ls-files -z -co --exclude-standard 2>/dev/null | xargs -0 -r du -cb 2>/dev/null | tail -n 1 | cut -f1)
  [[ -n "$tree" ]] || { say "# carry: not a git checkout here, sizes not checked"; return 0; }
  wheels=$(du -cb .whl/*.whl 2>/dev/null | tail -n 1 | cut -f1); wheels=${wheels:-0}
  total=$((tree + wheels))
  say "# carry: $(awk -v t="$tree" -v w="$wheels" -v l="$DEVICE_CARRY_LIMIT_MB" 'BEGIN {
        printf "checkout %.1f MiB + .whl %.1f MiB = %.1f MiB of the device tool'"'"'s %d MiB",
               t / 2^20, w / 2^20, (t + w) / 2^20, l }') ($(ls .whl 2>/dev/null | tr '\n' ' '))"
  if (( total > DEVICE_CARRY_LIMIT_MB * 1048576 )); then
    say "# carry: OVER the limit: the device tool would refuse the call; carry fewer wheels"
    return 2
  fi
}

phase_verify() {
  if [[ $DRY_RUN == 1 ]]; then carry_report || { FAILED=2; return; }; fi
  export PY JUNIT; export -f verify_pytest   # the pytest step's `bash -c` calls it
  if [[ $HAS_GPU == 0 ]]; then
    say "gpu_session.sh: verify needs a CUDA GPU (nvidia-smi -L lists none); the plan: --dry-run --assume-gpu verify"
    FAILED=2; return
  fi
  # no pip install: _C is built in place and both packages import from the checkout
  export PYTHONPATH="/tmp/site:$REPO:$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
  # the result files as they came (committed rows of earlier sessions): verdict.py ignores those
  BASELINE_DIR="${TMPDIR:-/tmp}/a2r_verify_baseline"
  VERDICT_FILE="$BASELINE_DIR/verdict.txt"
  if [[ $DRY_RUN == 0 ]]; then
    rm -rf "$BASELINE_DIR" && mkdir -p "$BASELINE_DIR" && cp benchmarks/results/*.json "$BASELINE_DIR"/ 2>/dev/null
  fi
  verify_plan
  run_plan || FAILED=2
  if [[ -s "$VERDICT_FILE" ]]; then cat "$VERDICT_FILE" >> "$SUMMARY"; fi
}

# ------------------------------------------------------------------------------------- main
if [[ $LIST_TESTS == 1 ]]; then printf '%s\n' "${VERIFY_TESTS[@]}"; exit 0; fi
rm -f "$OUT"/{verify,build-test,bench,bench-explore,env}.log "$OUT"/pytest-junit.xml "$OUT"/results.tgz "$JUNIT"
rm -rf "$OUT"/results
: > "$SUMMARY"
: > "$LOG"
say "# gpu_session.sh $MODE  (repo $REPO, OUT $OUT, budget ${BUDGET_S}s, dry-run $DRY_RUN)"
[[ $MODE == verify ]] || { install_wheels; env_report; }
case "$MODE" in
  env) ;;
  verify) phase_verify ;;
  build-test) phase_build_test ;;
  bench) phase_bench ;;
  bench-explore) phase_bench_explore ;;
  all)
    phase_build_test
    PHASE=bench LOG="$OUT/bench.log"; : > "$LOG"
    INSTALL=0   # built a moment ago
    phase_bench ;;
esac

if [[ -s "$JUNIT" && $DRY_RUN == 0 ]]; then
  $PY - "$JUNIT" >> "$SUMMARY" <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("pytest    " + "  ".join(f"{k} {v}" for k, v in count.items()))
EOF
fi
echo "# total $(elapsed_s)s$([[ $DRY_RUN == 1 ]] && echo ' (simulated)') of ${BUDGET_S}s budget; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')" >> "$SUMMARY"
echo
echo "================================ summary ($MODE) ================================"
cat "$SUMMARY"
exit "$FAILED"
