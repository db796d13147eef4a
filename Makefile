# Two commands on a fresh clone:  `make run`  (train on the-verdict)  and  `make test`.
# Each sets up the virtual environment it needs on first use.
#
# PyTorch is installed first, pinned by TORCH. On a machine that has the CPU wheel on
# disk this takes it; on a Linux machine with internet it gets PyPI's CUDA build.
# Override it for another build, e.g. `make run TORCH="torch==2.14.1"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(abspath $(VENV))/bin/python
EXTRAS := $(wildcard ch05/*/requirements-extra.txt)

# Machines without internet that keep the course data beside the clone (../shared/data)
# use it, unless the environment already says where the data is.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/the-verdict.txt),)
export CH05_DATA_DIR ?= $(SHARED_DATA)
export TIKTOKEN_CACHE_DIR ?= $(SHARED_DATA)/tiktoken-cache
endif

.PHONY: run test lint sync setup setup-test clean

run: $(VENV)/.installed
	cd ch05/01_main-chapter-code && $(PY) gpt_train.py --overwrite

test: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) scripts/sync_shared_code.py --check
	$(PY) -m pytest

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .

sync: $(VENV)/.installed
	$(PY) scripts/sync_shared_code.py

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-dev.txt $(EXTRAS) scripts/setup_test_system.sh
	$(PY) -m pip install --quiet -r requirements-dev.txt $(addprefix -r ,$(EXTRAS))
	bash scripts/setup_test_system.sh
	touch $@

clean:
	rm -rf $(VENV)
