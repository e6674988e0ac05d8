# nbdmirror — `make help` lists the targets.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
BIN := bin/nbdmirror
# A count, not a duration: go1.26's fuzz coordinator can fail a run with a
# bare "context deadline exceeded" when a duration expires mid-exec
# (golang/go#75804). 300000 inputs take 4-15 s per target here.
FUZZTIME ?= 300000x
# make fuzz-long: a duration per target. scripts/fuzz.sh tells that
# coordinator failure (exactly its message, no failing input written, the
# corpus replays clean) from a finding, and fails on anything else.
FUZZLONG ?= 60s
# New inputs are minimised only briefly: the default (60 s each) would eat a
# short run whole.
FUZZMINIMIZE ?= 100x
# package:target pairs; `go test -fuzz` takes one target of one package at a time.
FUZZ_TARGETS := ./nbd:FuzzRequest ./nbd:FuzzNegotiation ./nbd:FuzzTransmission \
	./bitmap:FuzzPage ./metadisk:FuzzSuperblock ./metadisk:FuzzALBlock ./replicator/config:FuzzParse \
	./transport:FuzzFrame ./transport:FuzzHandshake ./replicator/wire:FuzzDecode

# make install: PREFIX for the binary, man page and completion, UNITDIR for
# the systemd units (their ExecStart names PREFIX's binary); DESTDIR stages.
PREFIX ?= /usr
SBINDIR ?= $(PREFIX)/sbin
MANDIR ?= $(PREFIX)/share/man
COMPLETIONDIR ?= $(PREFIX)/share/bash-completion/completions
UNITDIR ?= $(PREFIX)/lib/systemd/system
# OCF_ROOT of Pacemaker's resource agents: the agent ocf:nbdmirror:nbdmirror
# goes to $(OCFDIR)/resource.d/nbdmirror/nbdmirror.
OCFDIR ?= $(PREFIX)/lib/ocf

.DEFAULT_GOAL := help
.PHONY: help build deps test unit integration faults test-cluster test-long fuzz fuzz-long lint bench demo clean install

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## build bin/nbdmirror (without cgo: the daemon marks all its threads I/O flushers)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-X main.Version=$(VERSION)" -o $(BIN) ./cmd/nbdmirror

install: build ## install the binary, systemd units, OCF resource agent, man page and bash completion (DESTDIR, PREFIX, UNITDIR, OCFDIR)
	install -D -m 0755 $(BIN) $(DESTDIR)$(SBINDIR)/nbdmirror
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(COMPLETIONDIR)
	for u in nbdmirror.service nbdmirror@.service; do \
		sed 's|@SBINDIR@|$(SBINDIR)|g' dist/systemd/$$u.in > $(DESTDIR)$(UNITDIR)/$$u && chmod 0644 $(DESTDIR)$(UNITDIR)/$$u; \
	done
	set -o pipefail; $(BIN) man | gzip -9n > $(DESTDIR)$(MANDIR)/man8/nbdmirror.8.gz
	$(BIN) completion > $(DESTDIR)$(COMPLETIONDIR)/nbdmirror
	install -d $(DESTDIR)$(OCFDIR)/resource.d/nbdmirror
	sed 's|@SBINDIR@|$(SBINDIR)|g' dist/ocf/nbdmirror.in > $(DESTDIR)$(OCFDIR)/resource.d/nbdmirror/nbdmirror
	chmod 0755 $(DESTDIR)$(OCFDIR)/resource.d/nbdmirror/nbdmirror

deps: ## install the Debian packages (apt-get) and Go modules the tests need
	@./scripts/deps.sh

test: deps lint unit fuzz integration faults ## everything: lint, unit tests with -race, short fuzzing, integration, the fault matrix

unit: ## unit tests with the race detector, then the crash tests at full count without it
	$(GO) test -race -count=1 -timeout 10m ./...
	$(GO) test -count=1 -timeout 10m -run '^TestCrash' ./metadisk/

# The fault matrix of issue #8: broken links, failing disks, metadata crash
# states. The list runs FAULTRUNS times over (go test -count), to catch flakes.
FAULTS := ^(TestFault_|TestDiskFail_|TestCrashStates_|TestResize_)
FAULTRUNS ?= 3

integration: ## end-to-end tests: real processes, real NBD clients, ext4 (root); the fault matrix is `make faults`
	$(GO) test -race -count=1 -tags integration -timeout 30m -skip '^TestPacemaker_|$(FAULTS)' ./integration/

faults: ## the fault matrix (partitions, resets, a thin link, TLS, failing, slow and hung disks, metadata crash states, resizes), the list FAULTRUNS (3) times over (root, ~8 min)
	$(GO) test -race -count=$(FAULTRUNS) -tags integration -timeout 60m -run '$(FAULTS)' ./integration/

test-cluster: deps ## a two-node Pacemaker + Corosync cluster in namespaces: failover by node loss, rejoin and resync (root, ~3 min)
	$(GO) test -race -count=1 -tags integration -timeout 15m -run '^TestPacemaker_' -v ./integration/

# make test-long: how long the endurance run's load lasts, and the seed of a
# run to replay (empty: a new one, printed).
ENDURANCE ?= 5m
SEED ?=

test-long: deps ## the endurance run, not in `make test`: two nodes, random protocol, link rate and disk delay, zipf fio and repeated invalidate-remote for ENDURANCE (default 5m; SEED= replays a run) (root)
	NBDMIRROR_ENDURANCE=$(ENDURANCE) NBDMIRROR_ENDURANCE_SEED=$(SEED) \
		$(GO) test -race -count=1 -tags 'integration long' -timeout 2h -run '^TestEndurance$$' -v ./integration/

fuzz: ## run every fuzz target for FUZZTIME inputs (default 300000x)
	@GO=$(GO) ./scripts/fuzz.sh $(FUZZTIME) $(FUZZMINIMIZE) $(FUZZ_TARGETS)

fuzz-long: ## run every fuzz target for FUZZLONG (default 60s) each, from the committed corpora (seeded from captured sessions)
	@GO=$(GO) ./scripts/fuzz.sh $(FUZZLONG) $(FUZZMINIMIZE) $(FUZZ_TARGETS)

lint: ## gofmt and go vet (with and without the integration and long tags)
	@out=$$(gofmt -l $$(find . -name '*.go' -not -path './.git/*')); \
		if [ -n "$$out" ]; then echo "gofmt would change: $$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags 'integration long' ./...

bench: deps build ## benchmarks against qemu-nbd, nbdkit and nbd-server, of the resource path and of two-node replication (root); updates BENCHMARKS.md
	./scripts/bench.sh

demo: deps build ## two nodes on loopback: initial sync, ext4 on the Primary, disconnect and resync, switchover, disks compared (root)
	./scripts/demo.sh

clean: ## remove build output
	rm -rf bin
