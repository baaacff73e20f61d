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
PF_CLUSTER_DIR ?= $(CURDIR)/.cluster
export PF_CLUSTER_DIR
CLUSTER_KUBECONFIG := $(PF_CLUSTER_DIR)/kubeconfig

.PHONY: build run generate verify-generated fmt-check clippy unit tools-test chart-lint e2e smoke test bench heap-profile chaos image cluster-up cluster-down deps

deps: ## Install the system packages the cluster and registry need (idempotent)
	hack/install-deps.sh

build: ## Build the operator and crdgen
	cargo build --bins

run: build ## Run the operator against $$KUBECONFIG, or the local cluster when that does not answer
	hack/run.sh

CHART := charts/promptflow-operator

generate: ## Regenerate the CRDs (config/crd and the chart's copy) from the Rust types; copy the catalog and the GitOps health checks into the chart
	cargo run --quiet --bin crdgen -- --out config/crd
	cp config/crd/*.yaml $(CHART)/crds/
	cp config/catalog/instance-types.yaml $(CHART)/files/instance-types.yaml
	mkdir -p $(CHART)/gitops/argocd $(CHART)/gitops/flux
	cp config/gitops/argocd/*.lua $(CHART)/gitops/argocd/
	cp config/gitops/flux/*.yaml $(CHART)/gitops/flux/

verify-generated: ## Fail when a generated file is stale
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	cargo run --quiet --bin crdgen -- --out "$$tmp"; \
	stale=0; \
	diff -ru config/crd "$$tmp" || stale=1; \
	diff -ru $(CHART)/crds "$$tmp" || stale=1; \
	diff -u config/catalog/instance-types.yaml $(CHART)/files/instance-types.yaml || stale=1; \
	diff -ru config/gitops $(CHART)/gitops || stale=1; \
	if [ $$stale = 1 ]; then echo "generated files are stale: run 'make generate' and commit" >&2; exit 1; fi

chart-lint: deps ## helm lint and render the chart, cluster-wide and namespaced
	hack/build-components.sh >/dev/null
	PATH="$$(hack/tool-path.sh):$$PATH" helm lint --strict $(CHART)
	PATH="$$(hack/tool-path.sh):$$PATH" helm template pf $(CHART) --namespace pf-system >/dev/null
	PATH="$$(hack/tool-path.sh):$$PATH" helm template pf $(CHART) --namespace pf-system --set watchNamespace=team-a >/dev/null

fmt-check:
	cargo fmt --all -- --check
	@unformatted=$$(gofmt -l tools/); if [ -n "$$unformatted" ]; then echo "gofmt: $$unformatted" >&2; exit 1; fi

tools-test: ## go vet and go test of tools/health (kstatus, Argo CD Lua and Flux CEL health checks)
	cd tools/health && go vet ./... && go test ./...

clippy:
	cargo clippy --all-targets -- -D warnings

unit: ## Unit tests (no cluster)
	cargo test --lib --bins

e2e: build deps ## e2e tests against the local cluster (started and stopped here unless already up), after building and pushing the operator image
	@started=0; \
	if ! hack/cluster-status.sh >/dev/null 2>&1; then started=1; hack/cluster-up.sh; fi; \
	export PATH="$$(hack/tool-path.sh):$$PATH" KUBECONFIG=$(CLUSTER_KUBECONFIG); \
	export PF_PROMPTFLOW_VENV="$$(hack/promptflow-venv.sh)"; \
	rc=0; hack/image.sh >/dev/null || rc=$$?; \
	if [ $$rc = 0 ]; then cargo test --test e2e -- --test-threads=4 --skip faults:: || rc=$$?; fi; \
	echo "smoke: make bench at N=50"; \
	if [ $$rc = 0 ]; then PF_BENCH_N=50 PF_BENCH_STEADY_SECONDS=10 PF_BENCH_PROXY_SECONDS=2 cargo test --test bench -- --nocapture --test-threads=1 || rc=$$?; fi; \
	echo "e2e: control-plane faults, one test at a time (each restarts kube-apiserver or etcd)"; \
	if [ $$rc = 0 ]; then cargo test --test e2e faults:: -- --test-threads=1 || rc=$$?; fi; \
	echo "smoke: make chaos at N=50"; \
	if [ $$rc = 0 ]; then PF_CHAOS_N=50 PF_CHAOS_REGISTRY_DOWN_SECONDS=10 cargo test --test chaos -- --nocapture --test-threads=1 || rc=$$?; fi; \
	if [ $$started = 1 ] && [ -z "$${PF_E2E_KEEP:-}" ]; then hack/cluster-down.sh; fi; \
	exit $$rc

test: fmt-check clippy verify-generated unit tools-test chart-lint e2e ## Everything CI runs

# Runs a command against the local cluster, starting it first (and stopping it after) when it is
# not up; the command sees KUBECONFIG and the cluster's tools on PATH.
define on_cluster
	@started=0; \
	if ! hack/cluster-status.sh >/dev/null 2>&1; then started=1; hack/cluster-up.sh; fi; \
	export PATH="$$(hack/tool-path.sh):$$PATH" KUBECONFIG=$(CLUSTER_KUBECONFIG); \
	rc=0; $(1) || rc=$$?; \
	if [ $$started = 1 ] && [ -z "$${PF_E2E_KEEP:-}" ]; then hack/cluster-down.sh; fi; \
	exit $$rc
endef

BENCH_N ?= 1000,10000
bench: deps ## Speed, memory and writes at N=$(BENCH_N) runtimes against a measured floor (release build); report and chart in $(CARGO_TARGET_DIR)/bench
	$(call on_cluster,PF_BENCH_N=$(BENCH_N) cargo test --release --test bench -- --nocapture --test-threads=1)

heap-profile: deps ## Where the operator's heap goes at its peak with N=1000 runtimes (dhat, backlog phase only)
	$(call on_cluster,PF_BENCH_N=$${PF_BENCH_N:-1000} PF_BENCH_PHASES=backlog PF_HEAP_PROFILE=$(CARGO_TARGET_DIR)/bench/dhat-heap.json cargo test --profile heap --features heap-profile --test bench runtimes_at_scale -- --nocapture)

CHAOS_N ?= 1000
chaos: deps ## Faults during the convergence of N=$(CHAOS_N) runtimes, and hostile objects (release build)
	$(call on_cluster,PF_CHAOS_N=$(CHAOS_N) cargo test --release --test chaos -- --nocapture --test-threads=1)

image: cluster-up ## Build the operator image without a container engine (release binary, one layer, crane) and push it to the local registry, left running
	hack/image.sh

cluster-up: deps ## Start the local cluster (idempotent); kubeconfig at .cluster/kubeconfig
	hack/cluster-up.sh

cluster-down: ## Stop the local cluster and remove its state
	hack/cluster-down.sh
