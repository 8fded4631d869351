# Two entry points for a fresh machine (see README):
#   make run    set up .venv and run the main job end to end on the built-in default
#   make test   set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test clean

setup: $(STAMP)

# torch is pinned through constraints.txt: 2.13.0 is the CPU wheel; anything unpinned pulls CUDA wheels.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

run: $(STAMP)
	$(BIN)/scoreaction quickstart --out runs/quickstart

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
