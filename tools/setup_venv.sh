#!/usr/bin/env bash
# Create a venv from nothing. The host venvs start from a pip freeze of a real, fresh A1111 v1.10.1 venv
# (requirements/webui-1.10.1-freeze.txt), run install.py in it as the WebUI does, and fail if it changed any
# package; then they add the CLI's and the tests' packages with the freeze as constraints.
#   bash tools/setup_venv.sh            # .venv: the WebUI's venv + install.py + diffusers (the standalone CLI)
#   bash tools/setup_venv.sh --test     # .venv as above + pytest, ruff, playwright, Stability's ldm, ...
#   bash tools/setup_venv.sh --older    # .venv-older: the same freeze with the huggingface_hub of a mid-2024
#                                       #   install (0.23.4) + install.py + diffusers 0.26.3 + WebUI-path tests
#   bash tools/setup_venv.sh --current  # .venv-current: current releases (diffusers, peft, transformers 5) + tests
#   bash tools/setup_venv.sh --project  # only the last step of every mode, on an existing VENV (default .venv):
#                                       #   this repository installed editable, no dependency added or changed, so
#                                       #   VENV/bin/lora-train and VENV/bin/python -m lora_train work from any folder
# VENV=DIR puts it elsewhere; PYTHON=python3.11 picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
MODE="${1:-}"
FREEZE=requirements/webui-1.10.1-freeze.txt
case "$MODE" in
  "") DEFAULT=.venv; PIN=(); ADD=(-r requirements/cli.txt) ;;
  --test) DEFAULT=.venv; PIN=(); ADD=(-r requirements/cli.txt -r requirements/test.txt) ;;
  --older) DEFAULT=.venv-older; PIN=(--set huggingface_hub==0.23.4); ADD=(-r requirements/older.txt) ;;
  --current) DEFAULT=.venv-current ;;
  --project) DEFAULT=.venv ;;
  *) echo "usage: bash tools/setup_venv.sh [--test|--older|--current|--project]" >&2; exit 2 ;;
esac
VENV="${VENV:-$DEFAULT}"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

install_project() {
  # editable (the checkout is the code that runs) and --no-deps (pip adds this one distribution, nothing else)
  "${PIP[@]}" --no-deps -e .
}

if [ "$MODE" = "--project" ]; then
  [ -x "$VENV/bin/python" ] || { echo "$VENV/bin/python not found: make the venv first" >&2; exit 2; }
  install_project
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
# The CPU torch 2.13 imports only torchvision 0.16.2 without its deps (pip pairs it with a CUDA 0.28 that fails
# at import). Test/CPU venvs only: the WebUI and users' GPUs have a matching torchvision.
TORCHVISION=(--no-deps torchvision==0.16.2)

if [ "$MODE" = "--test" ] || [ "$MODE" = "--current" ]; then
  # the browser test drives Debian's chromium; skipped where it cannot be installed
  if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "chromium not installed: the browser test will skip"
  fi
fi

if [ "$MODE" = "--current" ]; then
  "${PIP[@]}" -r requirements/current.txt -r requirements/test.txt
else
  # 1. the WebUI's venv as frozen (torch as the CPU build), 2. install.py as the WebUI runs it, 3. nothing changed
  "$PYTHON" tools/host_freeze.py requirements "$FREEZE" "${PIN[@]}" > "$VENV/webui-freeze-requirements.txt"
  "${PIP[@]}" -r "$VENV/webui-freeze-requirements.txt"
  "${PIP[@]}" "${TORCHVISION[@]}"
  "$PY" install.py
  "$PY" tools/host_freeze.py check "$FREEZE" "${PIN[@]}"
  # 4. the CLI's and the tests' packages with the freeze as constraints (--no-deps for sdkit: its own requirements
  # would replace torch and transformers; the freeze already has its einops/omegaconf/lightning)
  "${PIP[@]}" -c "$VENV/webui-freeze-requirements.txt" "${ADD[@]}"
  if [ "$MODE" != "" ]; then "${PIP[@]}" --no-deps -r requirements/ldm-test.txt; fi
  "$PY" tools/host_freeze.py check "$FREEZE" "${PIN[@]}"
fi
# nothing after this may pull torchvision again
"${PIP[@]}" "${TORCHVISION[@]}"
install_project
"$PY" -c "import torch, diffusers, peft, open_clip; print('venv ready: torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
