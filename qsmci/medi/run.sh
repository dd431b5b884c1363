#!/usr/bin/env bash
# PDIQSM medi for QSM-CI (dipole stage); the work is in ../common/run-dipole.sh.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
exec bash "$HERE/../common/run-dipole.sh" medi "${1:-/input}" "${2:-/output}"
