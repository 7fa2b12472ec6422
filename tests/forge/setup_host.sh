#!/usr/bin/env bash
# setup_host.sh HOST MIRRORS WORKDIR      HOST = reforge | forge-classic | forge (lllyasviel Forge 2: refused)
#
# Builds an offline, CPU-only reForge or Forge Classic under WORKDIR, laid out like the A1111 harness
# (../../../shared/webui-harness, see its README) so that its boot.sh / stop.sh / install_extension.sh /
# smoke.py work unchanged on it:
#   WORKDIR/stable-diffusion-webui   the host at its tested commit, with repositories/ at the commits it asks for
#   WORKDIR/venv                     a hard-linked copy of the harness venv (torch 2.14.1, python 3.11) with the
#                                    host's own pins installed on top from PyPI
#   WORKDIR/hf-home                  the harness's offline CLIP tokenizer
#   WORKDIR/env.sh                   what boot.sh sources (plus the host's own env: STABLE_DIFFUSION_COMMIT_HASH,
#                                    BOOT_ARGS_EXTRA)
# The random SD1.5 checkpoint and test LoRA are symlinked from the harness (HARNESS_WORKDIR, default /work/harness),
# which setup.sh of the harness must have built first.
# Boot:  bash tests/forge/boot_host.sh WORKDIR    (boot.sh of the harness with the host's extra flags)
# Stop:  bash $HARNESS/stop.sh WORKDIR
# Idempotent (stamps in WORKDIR/.stamps); FORCE_STEPS="venv reqs ..." redoes steps.
set -euo pipefail

HOST=${1:?usage: setup_host.sh reforge|forge-classic|forge MIRRORS WORKDIR}
MIRROR_ROOT=${2:?usage: setup_host.sh HOST MIRRORS WORKDIR}
WORKDIR=${3:?usage: setup_host.sh HOST MIRRORS WORKDIR}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HARNESS=${HARNESS:-$(cd "$HERE/../../../shared/webui-harness" 2>/dev/null && pwd || echo /work/shared/webui-harness)}
HARNESS_WORKDIR=${HARNESS_WORKDIR:-/work/harness}

case "$HOST" in
  reforge)
    HOST_MIRROR=Panchovix+stable-diffusion-webui-reForge; HOST_REF=3b56b268ad9158ee8b30900973b6ccda4ec22241
    REQS_IN=requirements_versions.txt ;;
  forge-classic)
    HOST_MIRROR=Haoming02+sd-webui-forge-classic; HOST_REF=1f95d717   # branch classic
    REQS_IN=requirements.txt ;;
  forge)  # lllyasviel Forge 2: only to check that the extension refuses it clearly
    HOST_MIRROR=lllyasviel+stable-diffusion-webui-forge; HOST_REF=dfdcbab685e57677014f05a3309b48cc87383167
    REQS_IN=requirements_versions.txt ;;
  *) echo "unknown host $HOST (reforge | forge-classic | forge)" >&2; exit 2 ;;
esac
# ldm: reForge pins a fork (joypaul162/Stability-AI-stablediffusion f16630a9) that is not mirrored; upstream
# cf1d67a6 (what A1111 and Forge Classic pin) works, and STABLE_DIFFUSION_COMMIT_HASH makes launch accept it.
SD_COMMIT=cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf

mkdir -p "$WORKDIR"; WORKDIR="$(cd "$WORKDIR" && pwd)"
WEBUI="$WORKDIR/stable-diffusion-webui"; VENV="$WORKDIR/venv"; STAMPS="$WORKDIR/.stamps"
mkdir -p "$STAMPS"
log() { printf '\n[setup-%s %(%H:%M:%S)T] %s\n' "$HOST" -1 "$*"; }
forced() { case " ${FORCE_STEPS:-} " in *" $1 "*) return 0 ;; esac; return 1; }
need_step() { forced "$1" || [[ ! -e "$STAMPS/$1" ]]; }
mirror() { local d="$MIRROR_ROOT/$1/repo"; [[ -d "$d" ]] || { echo "missing mirror $d (fetch github:${1/+//})" >&2; return 1; }; echo "$d"; }
pipq() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v -E "is ignored: it is neither a file nor a directory" || return "${PIPESTATUS[0]}"; }
clone_at() {  # mirror dir commit
  local src dir="$2"; src="$(mirror "$1")"
  [[ -d "$dir/.git" ]] || git clone --quiet --no-checkout "$src" "$dir"
  git -C "$dir" -c advice.detachedHead=false checkout --quiet "$3"
  echo "$(basename "$dir") -> $(git -C "$dir" rev-parse HEAD)"
}

# 1. host tree
if need_step webui; then log "host $HOST_MIRROR @ $HOST_REF"; clone_at "$HOST_MIRROR" "$WEBUI" "$HOST_REF"; touch "$STAMPS/webui"; fi

# 2. repositories/ (what prepare_environment() git_clone()s; an existing dir at the right hash is left alone)
if need_step repositories; then
  log "repositories/"; mkdir -p "$WEBUI/repositories"
  clone_at AUTOMATIC1111+stable-diffusion-webui-assets "$WEBUI/repositories/stable-diffusion-webui-assets" 6f7db241d2f8ba7457bac5ca9753331f0c266917
  if [[ "$HOST" == forge ]]; then  # Forge 2 dropped ldm/sgm/k-diffusion for its backend and huggingface_guess
    clone_at lllyasviel+huggingface_guess "$WEBUI/repositories/huggingface_guess" 84826248b49bb7ca754c73293299c4d4e23a548d
  else
    clone_at Stability-AI+stablediffusion "$WEBUI/repositories/stable-diffusion-stability-ai" "$SD_COMMIT"
    clone_at Stability-AI+generative-models "$WEBUI/repositories/generative-models" 45c443b316737a4ab6e40413d7794a7f5657c19f
  fi
  if [[ "$HOST" == reforge || "$HOST" == forge ]]; then
    clone_at crowsonkb+k-diffusion "$WEBUI/repositories/k-diffusion" ab527a9a6d347f364e3d185ba6d714e22d80cb3c
    if [[ ! -d "$WEBUI/repositories/BLIP/.git" ]]; then   # only the unused interrogator needs it
      git init --quiet "$WEBUI/repositories/BLIP"
      git -C "$WEBUI/repositories/BLIP" -c user.name=acceptance -c user.email=acceptance@localhost commit --quiet --allow-empty -m "placeholder: BLIP not fetched"
    fi
  fi
  touch "$STAMPS/repositories"
fi

# 3. venv: hard-linked copy of the harness venv (no extra disk; pip replaces files instead of writing into
#    them, and sed -i below writes new files, so the harness venv is never modified), then fix its paths.
if need_step venv; then
  log "venv: cp -al $HARNESS_WORKDIR/venv"
  [[ -x "$HARNESS_WORKDIR/venv/bin/python" ]] || { echo "no harness venv at $HARNESS_WORKDIR/venv (run the harness setup.sh first)" >&2; exit 1; }
  rm -rf "$VENV"; cp -al "$HARNESS_WORKDIR/venv" "$VENV"
  grep -rlI --exclude-dir=__pycache__ "$HARNESS_WORKDIR/venv" "$VENV/bin" "$VENV/pyvenv.cfg" | xargs -r sed -i "s#$HARNESS_WORKDIR/venv#$VENV#g"
  "$VENV/bin/python" -c "import sys, torch; assert sys.prefix == '$VENV', sys.prefix; print('venv ok', sys.prefix, torch.__version__)"
  touch "$STAMPS/venv"
fi

# 4. the host's own pins (relaxed only where PyPI cannot serve them)
REQS="$WORKDIR/requirements_acceptance.txt"
if need_step reqs; then
  log "host requirements -> $REQS"
  # reForge: pydantic is a GitHub wheel (Panchovix/pydantic-fixreforge 1.10.15); PyPI's 1.10.15 works.
  sed -E -e 's|^https://github.com/Panchovix/pydantic-fixreforge/.*pydantic-1\.10\.15-.*$|pydantic==1.10.15  # was a GitHub wheel|' \
    -e '/^\s*(#.*)?$/d' "$WEBUI/$REQS_IN" > "$REQS"
  # (comment and blank lines dropped: launch_utils.requirements_met() returns False on any line its regex does not
  #  match, and then pip install -r runs at every launch -- which on reForge also moves torch, see below)
  pipq install -q -r "$REQS"
  # reForge pins setuptools==69.5.1 (and its launch reinstalls 69.5.1 whenever the version string is >= "70",
  # modules/launch_utils.py ensure_build_dependencies); torch 2.14.1 declares setuptools>=77.0.3, so pip
  # resolves torch 2.12.1 / torchvision 0.27.1. Keep the host's setuptools pin (no re-install at every launch)
  # and put the harness's torch 2.14.1 back as hard links (it imports and runs with setuptools 69.5.1).
  if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '2.14.1')"; then
    "$VENV/bin/python" "$HERE/relink_from_harness.py" "$HARNESS_WORKDIR/venv" "$VENV" \
      torch torchvision triton cuda-toolkit nvidia-cudnn-cu13 nvidia-nccl-cu13 nvidia-nvjitlink
  fi
  "$VENV/bin/python" -c "import torch, torchvision, setuptools; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'setuptools', setuptools.__version__)"
  touch "$STAMPS/reqs"
fi
"$VENV/bin/python" - "$REQS" <<'PY'
import sys, re, importlib.metadata as md
from packaging.version import parse
bad = []
for line in open(sys.argv[1]):
    m = re.match(r"\s*([-_a-zA-Z0-9]+)\s*(?:==\s*([-+_.a-zA-Z0-9]+))?\s*", line)
    if not m or not m.group(2): continue
    try: v = md.version(m.group(1))
    except Exception: v = None
    if v is None or parse(v) != parse(m.group(2)): bad.append((m.group(1), m.group(2), v))
print("requirements_met:", not bad, bad)
PY

# 5. tokenizer, checkpoint, LoRA (from the harness), probe extensions
if [[ ! -d "$WORKDIR/hf-home" ]]; then
  if [[ -d "$HARNESS_WORKDIR/hf-home" ]]; then cp -a "$HARNESS_WORKDIR/hf-home" "$WORKDIR/hf-home"
  else "$VENV/bin/python" "$HARNESS/make_tokenizer.py" --hf-home "$WORKDIR/hf-home"; fi
fi
mkdir -p "$WEBUI/models/Stable-diffusion" "$WEBUI/models/Lora"
ln -sfn "$HARNESS_WORKDIR/stable-diffusion-webui/models/Stable-diffusion/acceptance-random-sd15.safetensors" "$WEBUI/models/Stable-diffusion/acceptance-random-sd15.safetensors"
[[ -e "$HARNESS_WORKDIR/stable-diffusion-webui/models/Lora/acceptance_test_lora.safetensors" ]] && \
  ln -sfn "$HARNESS_WORKDIR/stable-diffusion-webui/models/Lora/acceptance_test_lora.safetensors" "$WEBUI/models/Lora/acceptance_test_lora.safetensors"
# the harness probe reads A1111's Lora extension (and does not load on Forge Classic): ours answers the same routes
rm -rf "$WEBUI/extensions/acceptance-probe"; mkdir -p "$WEBUI/extensions/acceptance-probe"
cp -r "$HERE/acceptance-probe/." "$WEBUI/extensions/acceptance-probe/"
if [[ -d "$HERE/probe-ext" ]]; then mkdir -p "$WEBUI/extensions/forge-probe"; cp -r "$HERE/probe-ext/." "$WEBUI/extensions/forge-probe/"; fi

# 6. live previews off (reForge/Forge download a VAE-approx model for them); settings the harness expects
# The built-in forge_legacy_preprocessors and sd_forge_controlnet install.py files pip-installs mediapipe, onnxruntime,
# fvcore, svglib at the first launch (mediapipe moves numpy to 2.x and protobuf to 7) and tries two GitHub wheels at
# every launch; it is disabled here (run_extensions_installers() skips disabled extensions).
[[ -s "$WEBUI/config.json" ]] || echo '{"live_previews_enable": false, "show_progress_every_n_steps": -1, "disabled_extensions": ["forge_legacy_preprocessors", "sd_forge_controlnet"]}' > "$WEBUI/config.json"

BLIP_HASH="$(git -C "$WEBUI/repositories/BLIP" rev-parse HEAD 2>/dev/null || true)"
cat > "$WORKDIR/env.sh" <<ENV
# generated by tests/forge/setup_host.sh ($HOST) -- sourced by the harness boot.sh / install_extension.sh
export WEBUI_HOST="$HOST"
export WEBUI_DIR="$WEBUI"
export VENV_DIR="$VENV"
export HF_HOME="$WORKDIR/hf-home"
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export GRADIO_ANALYTICS_ENABLED=False
export DO_NOT_TRACK=1
export REQS_FILE="$REQS"
export STABLE_DIFFUSION_COMMIT_HASH="$SD_COMMIT"
${BLIP_HASH:+export BLIP_COMMIT_HASH="$BLIP_HASH"}
export PIP_DISABLE_PIP_VERSION_CHECK=1
ENV
log "setup complete: WORKDIR=$WORKDIR  boot: bash $HERE/boot_host.sh $WORKDIR"
