#!/usr/bin/env bash
# Run the module's self-test (PDIQSMTest) headlessly in an installed 3D Slicer (5.8 - 5.12), from a checkout:
#
#   Testing/run_slicer_selftest.sh /path/to/Slicer
#
# The PyTorch extension must be installed in that Slicer (torch), plus nibabel, scipy, safetensors and
# matplotlib in Slicer's Python (the module offers to install them on first interactive use; in testing
# mode it installs nothing). No Slicer application exists on the machines where this project is built,
# so this script has not been run there; the logic under the widget is tested with pytest and slicer-core.
set -euo pipefail
slicer=${1:?usage: $0 /path/to/Slicer}
here=$(cd "$(dirname "$0")/.." && pwd)
"$slicer" --no-splash --no-main-window --testing \
  --additional-module-paths "$here/PDIQSM" \
  --python-code "import sys; sys.path.insert(0, '$here'); import slicer; \
slicer.util.selectModule('PDIQSM'); import PDIQSM; t = PDIQSM.PDIQSMTest(); t.runTest(); slicer.util.exit(0)"
