# Every target CI runs is here; `make help` lists them.
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= ml-100k

.PHONY: help install run test test-fast lint format bench-srs docker-config

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-14s %s\n", $$1, $$2}'

install: ## create .venv and install llmemb (CPU PyTorch where there is no GPU)
	@scripts/install.sh

run: install ## the main job: train + evaluate ID-SASRec on the embedded default (ml-100k), print the table
	$(BIN)/llmemb train srs --dataset $(DATASET) --backbone sasrec --seeds 42

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
