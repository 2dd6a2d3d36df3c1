# Every target CI runs is here; `make help` lists them.
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.toml
ARTIFACTS ?= artifacts

.PHONY: help install run retrain test test-fast lint format bench-srs docker-config

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-14s %s\n", $$1, $$2}'

install: ## create .venv and install llmemb (CPU PyTorch where there is no GPU)
	@scripts/install.sh

run: install ## the main job: LLMEmb pipeline on the embedded default (unless a bundle exists), then serve on 127.0.0.1:8000
	@if [ -f $(ARTIFACTS)/CURRENT ]; then \
	  echo "bundle $$(cat $(ARTIFACTS)/CURRENT) found in $(ARTIFACTS)/: serving it (make retrain to train again)"; \
	else $(BIN)/llmemb pipeline --config $(CONFIG) --set export.artifacts=$(ARTIFACTS); fi
	LLMEMB_ARTIFACTS=$(ARTIFACTS) $(BIN)/llmemb serve

retrain: install ## run the pipeline again (finished stages are skipped) and export a new bundle
	$(BIN)/llmemb pipeline --config $(CONFIG) --set export.artifacts=$(ARTIFACTS)

test: install ## lint + the whole test suite (what CI runs)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

test-fast: ## tests without the slow ones (no install step)
	$(BIN)/pytest -q -m "not slow"

lint: ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docker-config: ## lint the Dockerfiles (hadolint) and validate docker-compose*.yml (docker compose config); no engine needed
	@scripts/docker_check.sh

bench-srs: install ## SASRec seconds/epoch vs RecBole 1.2.1 on ml-100k (own venv for RecBole)
	bench/setup_recbole_venv.sh
	$(BIN)/python bench/srs_speed.py
