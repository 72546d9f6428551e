# Wicket build, test and benchmark targets. `make help` lists them.

GO        ?= go
BIN       := bin/wicket
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X main.version=$(VERSION)
# Packages whose concurrency is the product's core: always tested with -race.
CORE_PKGS := ./ca/... ./tunnel/... ./gateway/... ./agent/...
STATICCHECK_VERSION := v0.8.2
STATICCHECK ?= $(shell command -v staticcheck 2>/dev/null || echo $$(go env GOPATH)/bin/staticcheck)

.PHONY: help build test lint unit e2e bench fuzz demo clean

help: ## list the targets
	@awk 'BEGIN{FS=":.*## "} /^[a-zA-Z_-]+:.*## /{printf "  %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## build bin/wicket
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/wicket

test: lint unit e2e ## everything CI runs: gofmt, vet, staticcheck, unit tests with -race, end-to-end tests

lint: ## gofmt, go vet and staticcheck (installed by .ci/run; `go install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)`)
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@command -v $(STATICCHECK) >/dev/null || { echo "staticcheck is not installed: go install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)"; exit 1; }
	$(STATICCHECK) ./...

unit: ## unit tests of the core packages with the race detector (needs PostgreSQL at 127.0.0.1:5432)
	$(GO) test -race -count=1 -timeout 15m $(CORE_PKGS) ./cmd/...

e2e: ## end-to-end tests: the real wicket binary as separate processes on loopback
	$(GO) test -count=1 -timeout 15m ./test/...

bench: ## benchmarks: tunnel vs raw TLS relay, CA enrollments/renewals, audit writes, pgbench direct / raw / audited PostgreSQL (needs PostgreSQL at 127.0.0.1:5432 and pgbench)
	$(GO) test -run '^$$' -bench . -benchmem -count=1 ./tunnel/ ./ca/ ./gateway/audit/
	$(GO) run ./cmd/wicket-bench

fuzz: ## fuzz the stream header decoder for 60 s
	$(GO) test -run '^$$' -fuzz FuzzDecodeHeader -fuzztime 60s ./tunnel/

demo: build ## run a gateway, an agent, a demo target and a connect on loopback
	bash examples/demo.sh

clean: ## remove build output and demo state
	rm -rf bin demo-data
