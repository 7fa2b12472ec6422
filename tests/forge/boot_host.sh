#!/usr/bin/env bash
# boot_host.sh WORKDIR [extra args]: the harness boot.sh with the flags reForge / Forge Classic need on CPU.
set -euo pipefail
WORKDIR=${1:?usage: boot_host.sh WORKDIR [extra webui args...]}; shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HARNESS=${HARNESS:-$(cd "$HERE/../../../shared/webui-harness" 2>/dev/null && pwd || echo /work/shared/webui-harness)}
exec bash "$HARNESS/boot.sh" "$WORKDIR" --always-cpu --skip-python-version-check "$@"
