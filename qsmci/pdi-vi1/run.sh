#!/usr/bin/env bash
# PDIQSM pdi-vi1 for QSM-CI (dipole stage); the work is in ../common/run-dipole.sh.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
exec bash "$HERE/../common/run-dipole.sh" pdi-vi1 "${1:-/input}" "${2:-/output}"
