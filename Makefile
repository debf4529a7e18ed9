# Every target sets up its own environment on first use: a fresh machine needs only python3.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run run-clip test bench docs reproduce-cpu clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The quickstart: DeCAF, DLoRA and Local on a non-IID ring, then one plot of all three.
run: $(STAMP)
	rm -rf runs/quickstart
	for alg in decaf dlora local; do \
	  $(VENV)/bin/decaf-ray run sweeps/quickstart.yaml --set algorithm=$$alg --set name=$$alg \
	    --out runs/quickstart/$$alg || exit 1; \
	done
	$(VENV)/bin/decaf-ray plot runs/quickstart --metric test_accuracy --out runs/quickstart/test_accuracy.png

# The same three on the pretrained CLIP stand-in (digits, Dirichlet(0.5) non-IID ring, 40
# rounds): a few minutes, plus about 4 minutes to pretrain the stand-in on first use (cached).
run-clip: $(STAMP)
	rm -rf runs/quickstart-clip
	for alg in decaf dlora local; do \
	  $(VENV)/bin/decaf-ray run sweeps/base/clip-standin-digits.yaml --set algorithm=$$alg \
	    --set name=$$alg --set rounds=40 --out runs/quickstart-clip/$$alg || exit 1; \
	done
	$(VENV)/bin/decaf-ray plot runs/quickstart-clip --metric test_accuracy --out runs/quickstart-clip/test_accuracy.png

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_consensus.py

# docs/config.md from the config dataclasses' docstrings (tests/test_config_reference.py checks it).
docs: $(STAMP)
	$(PY) -m decaf_ray.config_reference --write

# Every CPU sweep of docs/results in order, resumed where it stopped, then every file there
# (docs/results/reproduce.py; hours on 2 cores: `--list` shows the last times).
reproduce-cpu: $(STAMP)
	$(PY) docs/results/reproduce.py runs/sweeps

clean:
	rm -rf $(VENV) runs .pytest_cache
