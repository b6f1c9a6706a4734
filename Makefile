# One entry point for people and CI. `make help` lists the targets.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
SERVE := $(VENV)/.installed-serve
DEV := $(VENV)/.installed-dev

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(SERVE): pyproject.toml
	scripts/venv.sh $(VENV)
	touch $@

$(DEV): pyproject.toml
	scripts/venv.sh $(VENV) test,lint
	touch $@ $(SERVE)

venv: $(DEV) ## create .venv with stor and its test and lint tools

run: $(SERVE) ## serve stor on the embedded default (./stor-data), port 8321 (installs only what serving needs)
	$(BIN)/stor serve

test: $(DEV) test-deps ## install what the suite needs (venv, memcached, RabbitMQ, git-lfs, fault tools) and run it
	scripts/private-mounts.sh $(BIN)/pytest -m "not faults"
	scripts/private-mounts.sh $(BIN)/pytest -m faults

test-faults: $(DEV) test-deps ## only the reliability suite (tests/faults; mounts need root)
	scripts/private-mounts.sh $(BIN)/pytest -m faults

test-deps:
	scripts/debian-deps.sh memcached:memcached rabbitmq-server:rabbitmq-server git:git git-lfs:git-lfs 7z:p7zip-full unzip:unzip
	if [ "$$(id -u)" = 0 ]; then scripts/debian-deps.sh fusermount3:fuse3 strace:strace mkfs.ext4:e2fsprogs; fi

bench: $(DEV) ## benchmark stor against nginx on the same files; writes docs/benchmarks.md
	scripts/debian-deps.sh wrk:wrk hey:hey nginx:nginx-light memcached:memcached rabbitmq-server:rabbitmq-server
	PATH="/usr/sbin:$$PATH" scripts/private-mounts.sh $(BIN)/python -m bench.run

bench-scale: $(DEV) ## how costs grow with the store (10x more blobs, names); writes docs/benchmarks-scale.md
	scripts/debian-deps.sh wrk:wrk
	$(BIN)/python -m bench.scale

lint: $(DEV) ## ruff and mypy (strict)
	$(BIN)/ruff check stor tests bench
	$(BIN)/ruff format --check stor tests bench
	$(BIN)/mypy

format: $(DEV) ## apply ruff's formatting and import order
	$(BIN)/ruff check --fix stor tests bench
	$(BIN)/ruff format stor tests bench

clean: ## remove the venv and caches (keeps ./stor-data)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

.PHONY: help venv run test test-faults test-deps bench bench-scale lint format clean
