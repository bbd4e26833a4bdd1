#!/usr/bin/env bash
# Wheels for the GPU machine's image (Python 3.12, x86-64), which lacks grain, tensorflow-datasets and ml_collections
# and these of their needs; experiments/device_check.sh installs them from the folder (default .whl, ignored by git).
# Run here, where pip can reach PyPI:   bash experiments/fetch_wheels.sh [.whl]
# Then carry the folder with the device call (see /work/.library/device/README.md: name it in `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
EXCLUDE=$(git rev-parse --git-path info/exclude)
case "$DEST" in /*) ;; *) mkdir -p "$(dirname "$EXCLUDE")"; grep -qx "/$DEST/" "$EXCLUDE" 2>/dev/null || echo "/$DEST/" >> "$EXCLUDE";; esac
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
# The versions this repository is tested with (requirements.txt / the CPU venv).
WHEELS="grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 tensorflow-datasets==4.9.10
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 dm-tree==0.1.10 immutabledict==4.3.1
  simple-parsing==0.1.9 docstring_parser==0.18.0 termcolor==3.3.0 toml==0.10.2"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
  -d "$DEST" $WHEELS
# promise is published as a source archive only (pure Python): build its wheel here.
$PY -m pip wheel -q --no-deps -w "$DEST" promise==2.3
ls -la "$DEST"
du -sh "$DEST"
