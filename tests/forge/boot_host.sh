#!/usr/bin/env bash
# boot_host.sh WORKDIR [extra args]: the harness boot.sh with the flags reForge / Forge Classic need on CPU.
#
# The model wait is done here, not by boot.sh: when its 5 s look at /openapi.json times out on a busy machine,
# boot.sh waits for A1111's "Model loaded in" line, which reForge never prints (it says "Model NAME [hash] loaded
# in"), and hangs. Here either line counts. WAIT_MODEL=0 skips the wait (Forge 2 loads at first use).
set -euo pipefail
WORKDIR=${1:?usage: boot_host.sh WORKDIR [extra webui args...]}; shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HARNESS=${HARNESS:-$(cd "$HERE/../../../shared/webui-harness" 2>/dev/null && pwd || echo /work/shared/webui-harness)}
WAIT=${WAIT_MODEL:-1}
WAIT_MODEL=0 bash "$HARNESS/boot.sh" "$WORKDIR" --always-cpu --skip-python-version-check "$@"
[[ "$WAIT" == 1 ]] || exit 0

LOG="$WORKDIR/webui.log"
PID=$(cat "$WORKDIR/webui.pid")
DEADLINE=$((SECONDS + ${BOOT_TIMEOUT:-900}))
until grep -qE "^Model (.+ )?loaded in" "$LOG"; do
  kill -0 "$PID" 2>/dev/null || { echo "webui exited while loading the model; log tail:" >&2; tail -40 "$LOG" >&2; exit 1; }
  (( SECONDS < DEADLINE )) || { echo "timeout: no 'Model … loaded in' line in $LOG" >&2; tail -40 "$LOG" >&2; exit 2; }
  sleep 1
done
grep -E "^Model (.+ )?loaded in" "$LOG" | sed 's/^/webui: /'
