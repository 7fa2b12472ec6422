#!/usr/bin/env bash
# Create a venv from nothing.
#   bash tools/setup_venv.sh            # .venv: the WebUI host profile (the pins A1111 1.10 runs)
#   bash tools/setup_venv.sh --test     # .venv plus pytest, ruff, Stability's ldm (for the WebUI-host tests)
#   bash tools/setup_venv.sh --current  # .venv-current: current releases (diffusers, peft, transformers 5) + pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
VENV=.venv
REQUIREMENTS=requirements/host.txt
if [ "${1:-}" = "--current" ]; then VENV=.venv-current; REQUIREMENTS=requirements/current.txt; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" -r "$REQUIREMENTS"
if [ "${1:-}" = "--current" ]; then "${PIP[@]}" -r requirements/test.txt; fi
if [ "${1:-}" = "--test" ] || [ "${1:-}" = "--current" ]; then
  # the browser test drives Debian's chromium; skipped where it cannot be installed
  if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "chromium not installed: the browser test will skip"
  fi
fi
if [ "${1:-}" = "--test" ]; then
  "${PIP[@]}" -r requirements/test.txt
  # Stability's ldm as the WebUI vendors it; --no-deps or it replaces torch/transformers (see requirements/ldm-test.txt)
  "${PIP[@]}" --no-deps stable-diffusion-sdkit==2.1.5
  "${PIP[@]}" torch==2.13.0 einops omegaconf 'pytorch_lightning>=1.9,<2' 'setuptools<81'
fi
# Last step, test/CPU venvs only: pip pairs torch 2.13 with a torchvision build that fails to import on this CPU
# torch; 0.16.2 without its deps imports and serves open_clip. The WebUI has its own matching torchvision.
"${PIP[@]}" --no-deps torchvision==0.16.2
"$VENV/bin/python" -c "import torch, diffusers, peft, open_clip; print('venv ready: torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
