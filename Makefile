# make test : set up .venv/ (first run only) and run the test suite
# make demo : set up .venv/ (first run only) and run the demo (see README.md)
# make install-into PYTHON=/path/to/env/bin/python : install fpn_rpn into an existing
#     environment that has torch and Detectron2, keeping both; make test-into PYTHON=... tests it there
# make test-official-d2 : build Detectron2's official sources, _C included, into
#     .venv-d2official/ (first run only, about 6 minutes) and run the test suite there
# make check-env : say which torch, CUDA and Detectron2 (_C or not) .venv/ has
# make gpu-check OUT=dir : on a machine with one GPU, the checks CI cannot run, in at most
#     8 minutes (tools/gpu_check.py); summary.md and raw logs in dir. GPU_CHECK_PYTHON=... picks
#     the environment (default .venv's python where it exists); nothing is installed
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fpn_rpn-installed
D2_VENV := .venv-d2official
D2_STAMP := $(D2_VENV)/.fpn_rpn-installed
# Detectron2's official sources (a checkout or a .tar.gz); the vendored snapshot by default
D2_OFFICIAL_SRC ?= $(firstword $(wildcard shared/vendor/detectron2-*.tar.gz ../shared/vendor/detectron2-*.tar.gz))

.PHONY: venv test demo check-env gpu-check install-into test-into test-official-d2 clean-venv clean-venv-d2official

venv: $(STAMP)

$(STAMP): setup.py tools/setup_env.sh
	bash tools/setup_env.sh $(PYTHON) $(VENV)
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) tools/demo.py

check-env: $(STAMP)
	$(PY) -m fpn_rpn.check_env

install-into:
	bash tools/setup_env.sh --into $(PYTHON)

test-into:
	$(PYTHON) -m pytest -q tests

$(D2_STAMP): setup.py tools/setup_env.sh $(D2_OFFICIAL_SRC)
	@test -n "$(D2_OFFICIAL_SRC)" || { echo "make: Detectron2's official sources not found under shared/vendor or ../shared/vendor: set D2_OFFICIAL_SRC=/path/to/detectron2 (a checkout or .tar.gz)" >&2; exit 1; }
	bash tools/setup_env.sh --d2-source $(D2_OFFICIAL_SRC) $(PYTHON) $(D2_VENV)
	touch $@

test-official-d2: $(D2_STAMP)
	$(D2_VENV)/bin/python -m pytest -q tests

clean-venv:
	rm -rf $(VENV)

clean-venv-d2official:
	rm -rf $(D2_VENV)

OUT ?= output/gpu_check
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_CHECK_PYTHON) tools/gpu_check.py --output $(OUT) --python $(GPU_CHECK_PYTHON)
