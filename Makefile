# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of PyTorch; with a GPU, install the CUDA build of torch first (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test install-browser demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The web page's browser test drives the distribution's headless Chromium (Playwright never downloads one).
install-browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	{ SUDO=$$([ "$$(id -u)" -eq 0 ] || echo "sudo -n"); export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; } || \
	echo "no Chromium could be installed: the browser test will be skipped (apt install chromium)"

install-test: $(VENV)/.installed-test

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/anti-i2v protect --sample --model tiny-cogvideox --preset fast --out protected --overwrite

# one test process per core (each test runs one torch thread); a file's tests share one process
test: install-test install-browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -n auto --dist loadfile

bench: install
	cd benchmarks && HF_HUB_OFFLINE=1 ../$(BIN)/python bench_protect.py

clean:
	rm -rf $(VENV) protected
