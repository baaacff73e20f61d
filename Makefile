# promptflow-operator. `make run` runs the operator; `make test` checks everything.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

# Caches live outside the clone, so a fresh clone (CI) reuses the Go-built control plane and Rust builds.
PF_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/promptflow-operator
export PF_CACHE
export CARGO_TARGET_DIR ?= $(PF_CACHE)/target
OPERATOR_BIN := $(CARGO_TARGET_DIR)/debug/promptflow-operator
export OPERATOR_BIN
CLUSTER_KUBECONFIG := $(CURDIR)/.cluster/kubeconfig

.PHONY: build run generate verify-generated fmt-check clippy unit e2e test cluster-up cluster-down deps

deps: ## Install the system packages the cluster and registry need (idempotent)
	hack/install-deps.sh

build: ## Build the operator and crdgen
	cargo build --bins

run: build ## Run the operator against $$KUBECONFIG, or the local cluster when that does not answer
	hack/run.sh

generate: ## Regenerate the CRDs in config/crd from the Rust types
	cargo run --quiet --bin crdgen -- --out config/crd

verify-generated: ## Fail when config/crd is stale
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	cargo run --quiet --bin crdgen -- --out "$$tmp"; \
	diff -ru config/crd "$$tmp" || { echo "config/crd is stale: run 'make generate' and commit" >&2; exit 1; }

fmt-check:
	cargo fmt --all -- --check

clippy:
	cargo clippy --all-targets -- -D warnings

unit: ## Unit tests (no cluster)
	cargo test --lib --bins

e2e: build deps ## e2e tests against the local cluster (started and stopped here unless already up)
	@started=0; \
	if ! hack/cluster-status.sh >/dev/null 2>&1; then hack/cluster-up.sh; started=1; fi; \
	rc=0; KUBECONFIG=$(CLUSTER_KUBECONFIG) cargo test --test e2e -- --test-threads=4 || rc=$$?; \
	if [ $$started = 1 ] && [ -z "$${PF_E2E_KEEP:-}" ]; then hack/cluster-down.sh; fi; \
	exit $$rc

test: fmt-check clippy verify-generated unit e2e ## Everything CI runs

cluster-up: deps ## Start the local cluster (idempotent); kubeconfig at .cluster/kubeconfig
	hack/cluster-up.sh

cluster-down: ## Stop the local cluster and remove its state
	hack/cluster-down.sh
