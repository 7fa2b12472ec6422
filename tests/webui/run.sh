#!/usr/bin/env bash
# tests/webui/run.sh [--host a1111|reforge|forge-classic|forge] [--dev] [--keep-running] [--repo PATH] [--workdir DIR]
#                    [-- pytest args...]
#
# The acceptance run against a real WebUI: AUTOMATIC1111 v1.10.1 (the harness in ../shared/webui-harness, built
# by its setup.sh into WORKDIR), or reForge / Forge Classic (built by tests/forge/setup_host.sh into WORKDIR):
# install this repository's HEAD the way Extensions > "Install from URL" does, restart the WebUI (which runs
# install.py again at launch), show what the install changed in the WebUI's venv (pip freeze before/after),
# then run the checks in tests/webui against it with pytest.
#
#   --dev           no installers: clone with RUN_INSTALLER=0, boot with SKIP_PREPARE=1, and add only
#                   peft==0.13.2 and ImageHash==4.3.2 (--no-deps) when missing. For an install.py that must not touch the venv.
#   --keep-running  leave the WebUI up afterwards (default: stop.sh at the end)
#   --repo PATH     the repository to install (default: this one; its committed HEAD is what gets cloned)
#   --host NAME     which WebUI: a1111 (default; WORKDIR <repo>/../harness), reforge or forge-classic (WORKDIR
#                   <repo>/../forge-hosts/NAME, booted by tests/forge/boot_host.sh with the flags they need on CPU);
#                   forge (lllyasviel Forge 2, trained on its backend objects; it loads the model at first use)
#   --workdir DIR   the harness' WORKDIR (default: see --host)
# Env: HARNESS (default <repo>/../shared/webui-harness), PORT (default 7861), ACCEPT_OUT (default WORKDIR/accept-out).
# Output (screenshots, images, freezes, timings, log errors): ACCEPT_OUT. Exit code: pytest's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REPO=$ROOT
WORKDIR=""
HOST=a1111
DEV=0
KEEP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dev) DEV=1 ;;
    --keep-running) KEEP=1 ;;
    --repo) REPO="$(cd "$2" && pwd)"; shift ;;
    --workdir) WORKDIR="$2"; shift ;;
    --host) HOST="$2"; shift ;;
    --) shift; break ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
case "$HOST" in
  a1111) DEFAULT_WORKDIR="$ROOT/../harness" ;;
  reforge|forge-classic|forge) DEFAULT_WORKDIR="$ROOT/../forge-hosts/$HOST" ;;
  *) echo "unknown host: $HOST (a1111, reforge, forge-classic or forge)" >&2; exit 2 ;;
esac
WORKDIR="$(cd "${WORKDIR:-$DEFAULT_WORKDIR}" && pwd)"
HARNESS="$(cd "${HARNESS:-$ROOT/../shared/webui-harness}" && pwd)"
BOOT=("$HARNESS/boot.sh")
[[ "$HOST" == a1111 ]] || BOOT=("$ROOT/tests/forge/boot_host.sh")
[[ "$HOST" != forge ]] || export WAIT_MODEL=${WAIT_MODEL:-0}  # Forge 2 prints no "Model loaded" at startup
PORT=${PORT:-7861}
export PORT
# shellcheck disable=SC1091
source "$WORKDIR/env.sh"
OUT="${ACCEPT_OUT:-$WORKDIR/accept-out}"
EXT_DIR="$WEBUI_DIR/extensions/sd-webui-lora-train"
# test-only: the conditioning probe (tests/webui/test_conditioning.py), removed again when the run ends
PROBE_DIR="$WEBUI_DIR/extensions/lora-train-conditioning-probe"
PYTHON="$ROOT/.venv/bin/python"
[[ -x "$PYTHON" ]] || PYTHON=python3
mkdir -p "$OUT"

stamp() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(stamp)" 'BEGIN { printf "%.1f", b - a }'; }

echo "== stop any WebUI of this harness, remove the previous install"
bash "$HARNESS/stop.sh" "$WORKDIR"
rm -rf "$EXT_DIR" "$PROBE_DIR"

if [[ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]]; then
  echo "note: $REPO has uncommitted changes; Install from URL clones the committed HEAD only"
fi
if [[ "$DEV" == 1 ]]; then
  for wanted in peft==0.13.2 ImageHash==4.3.2; do
    if ! "$VENV_DIR/bin/python" -m pip show -q "${wanted%%==*}" >/dev/null 2>&1; then
      echo "== dev mode: $wanted --no-deps into the WebUI venv (everything it needs is there already)"
      "$VENV_DIR/bin/python" -m pip install -q --no-deps "$wanted"
    fi
  done
fi

"$VENV_DIR/bin/python" -m pip freeze > "$OUT/freeze-before.txt"
echo "== install $REPO @ $(git -C "$REPO" rev-parse --short HEAD) as 'Install from URL' does"
t=$(stamp)
if [[ "$DEV" == 1 ]]; then
  RUN_INSTALLER=0 bash "$HARNESS/install_extension.sh" "$WORKDIR" "$REPO" sd-webui-lora-train
else
  bash "$HARNESS/install_extension.sh" "$WORKDIR" "$REPO" sd-webui-lora-train
fi
echo "INSTALL_SECONDS=$(since "$t")"
cp -r "$ROOT/tests/webui/conditioning_probe" "$PROBE_DIR"

echo "== restart the WebUI ($HOST)"
SKIP=${SKIP_PREPARE:-0}
[[ "$DEV" == 1 ]] && SKIP=1
boot() { SKIP_PREPARE="$SKIP" HARNESS="$HARNESS" bash "${BOOT[@]}" "$WORKDIR" 2>&1 | tee "$OUT/boot.txt"; }
# A1111's own startup race: a request (the boot script's API poll) that lands between gradio's launch and
# create_api builds starlette's middleware stack, and the WebUI then dies with "Cannot add middleware after an
# application has started". Nothing of the extension is involved; boot once more.
if ! boot; then
  grep -q "Cannot add middleware after an application has started" "$OUT/boot.txt" || exit 1
  echo "== the WebUI lost its startup race with the API poll; booting again"
  boot
fi
cleanup() { [[ "$KEEP" == 1 ]] || bash "$HARNESS/stop.sh" "$WORKDIR"; rm -rf "$PROBE_DIR"; }
trap cleanup EXIT

"$VENV_DIR/bin/python" -m pip freeze > "$OUT/freeze-after.txt"
echo "== what the install changed in the WebUI's venv (pip freeze before -> after)"
if diff "$OUT/freeze-before.txt" "$OUT/freeze-after.txt" > "$OUT/freeze.diff"; then
  echo "(nothing)"
else
  cat "$OUT/freeze.diff"
fi

echo "== acceptance checks"
t=$(stamp)
set +e
LORA_TRAIN_WEBUI_URL="http://127.0.0.1:$PORT" LORA_TRAIN_WEBUI_DIR="$WEBUI_DIR" \
  LORA_TRAIN_WEBUI_LOG="$WORKDIR/webui.log" LORA_TRAIN_WEBUI_OUT="$OUT" LORA_TRAIN_WEBUI_HOST="$HOST" HF_HUB_OFFLINE=1 \
  "$PYTHON" -m pytest "$ROOT/tests/webui" -m webui -v -rfEw --durations=0 -p no:cacheprovider "$@"
status=$?
set -e
echo "PYTEST_SECONDS=$(since "$t") PYTEST_EXIT=$status OUT=$OUT"
exit "$status"
