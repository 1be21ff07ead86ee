# make test : set up .venv/ (first run only) and run the test suite
# make demo : set up .venv/ (first run only) and run the demo (see README.md)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fpn_rpn-installed

.PHONY: venv test demo clean-venv

venv: $(STAMP)

$(STAMP): setup.py tools/setup_env.sh
	bash tools/setup_env.sh $(PYTHON) $(VENV)
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) tools/demo.py

clean-venv:
	rm -rf $(VENV)
