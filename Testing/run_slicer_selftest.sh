#!/usr/bin/env bash
# Run the module's self-test (PDIQSMTest) headlessly in an installed 3D Slicer (5.8 - 5.12), from a checkout,
# the way Slicer's own CTest runs a scripted module's test (slicer_add_python_unittest):
#
#   Testing/run_slicer_selftest.sh /path/to/Slicer
#
# The PyTorch extension must be installed in that Slicer (torch), plus nibabel, scipy, safetensors and
# matplotlib in Slicer's Python (the module offers to install them on first interactive use; in testing
# mode it installs nothing and the self-test reports a skip). No Slicer application exists on the machines
# where this project is built, so this script has not been run there (see Testing/SLICER.md).
set -euo pipefail
slicer=${1:?usage: $0 /path/to/Slicer}
here=$(cd "$(dirname "$0")/.." && pwd)
"$slicer" --no-splash --no-main-window --testing --ignore-slicerrc \
  --additional-module-paths "$here/PDIQSM" \
  --python-code "import sys; sys.path.insert(0, '$here'); import slicer.testing; \
slicer.testing.runUnitTest(['$here/PDIQSM'], 'PDIQSM')"
