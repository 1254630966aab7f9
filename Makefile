# The README's two set-up commands. Each creates or reuses .venv and installs only when
# pyproject.toml changed (a stamp file named after its hash).
VENV ?= .venv
PY := $(VENV)/bin/python
HASH := $(shell sha1sum pyproject.toml | cut -c1-12)
STAMP := $(VENV)/.installed-$(HASH)
SYSSTAMP := $(VENV)/.system-deps
export DS_ACCELERATOR := cpu
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: install system-deps demo test bench lint

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,distributed,wandb,qlora]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

# Debian packages: fonts for synthetic documents, Chromium for the report's browser test.
$(SYSSTAMP):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium fonts-dejavu-core fonts-liberation fonts-freefont-ttf >/dev/null; \
	else echo "system-deps: not root or no apt-get; install chromium and fonts-dejavu-core yourself"; fi
	@mkdir -p $(VENV) && touch $@

system-deps: $(SYSSTAMP)

demo: install system-deps
	$(VENV)/bin/mmsmall demo --out demo_out

test: install system-deps
	$(PY) -m pytest -n 2 --dist loadgroup -q tests

bench: install system-deps
	$(PY) bench/run_all.py

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
