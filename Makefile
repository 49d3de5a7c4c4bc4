# Every target creates what it needs from nothing: a fresh clone runs
# `make demo` or `make test` directly.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODELS := build/models
SCENARIO ?= scenarios/demo.toml

.PHONY: env compile models demo test test-venvs lint generate bench k6 chaos eval eval-generated ablate compose-demo compose-clean clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $@

env: $(BIN)/.installed

# Always asked: the build is cached by a fingerprint of its sources, seed and
# library versions, returns at once when nothing changed, and rebuilds when
# anything did (a file target would keep a zoo older than its sources).
models: env
	$(BIN)/apdispatch models build --out $(MODELS)

# The routing decision's hot path as C extensions (mypyc, a C compiler and
# Python's headers): returns at once when the build matches the sources; a
# stale or missing build runs the same code interpreted (docs/operations.md).
# Without a compiler or headers it says so and goes on; a build error fails.
compile: env
	$(BIN)/apdispatch compile --if-possible

# Set-up in one command: environment, model zoo, then the demo scenario
# (16 s; another SCENARIO is shortened to that), once per static policy and
# once with the learned policy.
demo: models compile
	$(BIN)/apdispatch demo $(SCENARIO) --models $(MODELS) --policies static,learned --duration 16

# What the tests drive that pip does not carry: Debian's prometheus (with
# promtool) and nginx (the bench's peer), installed when missing and this runs
# as root; tests/test_metrics.py and tests/test_bench_nginx.py skip without them.
.PHONY: tools
tools:
	@missing=""; for tool in prometheus nginx; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		{ [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } || \
		echo "missing:$$missing (the tests that need them skip)"; \
	fi

test: models compile tools
	APDISPATCH_MODELS=$(MODELS) $(BIN)/pytest -m "not venv"

# Tests that build a virtual environment of their own from the package index
# (MLServer 1.7.0, the newest tritonclient): minutes on a fresh machine.
test-venvs: models
	APDISPATCH_MODELS=$(MODELS) $(BIN)/pytest -m venv

# Generated hostile requests through both APIs of a live AP (tests/test_fuzz.py):
# FUZZ_EXAMPLES per API: one request per Infer example, one to eight per stream
# example. `make test` runs a short derandomized pass; FUZZ_SEED=N explores others.
FUZZ_EXAMPLES ?= 2500
fuzz: models
	APDISPATCH_MODELS=$(MODELS) APDISPATCH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
		$(if $(FUZZ_SEED),APDISPATCH_FUZZ_SEED=$(FUZZ_SEED)) \
		$(BIN)/pytest tests/test_fuzz.py -s -p no:cacheprovider --timeout 3600

lint: env
	$(BIN)/ruff check apdispatch workers tests
	$(BIN)/mypy apdispatch workers

# Regenerate the protobuf and gRPC stubs; tests/test_protocol.py fails when
# the committed ones are stale.
generate: env
	$(BIN)/python -m apdispatch.common.protocol.generate

bench: models compile
	$(BIN)/apdispatch bench --models $(MODELS) --json build/bench.json

# SCENARIO's load from k6 (unary calls, the scenario's SLAs and rates) and from
# `apdispatch load`, each against a fresh AP on the same workers, side by side.
k6: models
	$(BIN)/apdispatch k6 $(SCENARIO) --models $(MODELS) --json build/k6.json

# The demo scenario live for CHAOS_S seconds while workers and the AP are
# killed (-9), terminated, frozen and restarted at random (CHAOS_SEED); fails
# when a request sent got no outcome. tests/test_chaos.py runs a short one.
CHAOS_S ?= 120
CHAOS_SEED ?= 1
chaos: models
	$(BIN)/apdispatch chaos $(SCENARIO) --models $(MODELS) --duration $(CHAOS_S) \
		--fault-seed $(CHAOS_SEED) --json build/chaos.json

# The evaluation table of docs/evaluation/: every policy, five seeds, on the
# repo's scenarios and the held-out ones (about 24 minutes on 2 cores). The zoo's
# variants take the shipped reference latencies, so every machine writes the same
# tables; LATENCIES=measured uses what this machine's zoo build timed instead.
SEEDS ?= 5
JOBS ?= 2
LATENCIES ?= reference
eval: models
	$(BIN)/apdispatch evaluate scenarios/sim/*.toml scenarios/held-out/*.toml --models $(MODELS) \
		--latencies $(LATENCIES) --seeds $(SEEDS) --jobs $(JOBS) --out docs/evaluation

# What each layer of the learned policy adds (docs/evaluation.md, "What each layer adds"):
# slack, slack-guarded, learned-frozen, learned beside the two best static policies.
ablate: models
	$(BIN)/apdispatch ablate scenarios/sim/*.toml scenarios/held-out/*.toml --models $(MODELS) \
		--latencies $(LATENCIES) --statics fastest,least-loaded --seeds 3 --jobs $(JOBS) --out docs/ablation

# The same on thirty random scenarios (apdispatch generate, seeds 100-129, 150 s
# each): deployments nobody chose. Each is run on arrival seeds 100-104, so that
# a gap of a few requests can be told from a trajectory's noise (about 14
# minutes on 2 cores; GEN_SEEDS=1 for one seed, about 4).
GEN_SEEDS ?= 5
eval-generated: models
	$(BIN)/apdispatch generate --seeds 100-129 --duration 150 --models $(MODELS) \
		--latencies $(LATENCIES) --out build/generated
	$(BIN)/apdispatch evaluate build/generated/generated-*.toml --models $(MODELS) --seeds $(GEN_SEEDS) \
		--latencies $(LATENCIES) --jobs $(JOBS) --no-plot --out docs/evaluation/generated

# docker-compose.yml through real containers, from nothing: a Docker engine
# (installed and started when missing), a base image made with debootstrap, one
# image per role, then the scenario (DURATION_S seconds, load levels kept) once
# per policy of COMPOSE_POLICIES, mutual TLS between the containers (PLAINTEXT=1:
# none), and `make demo`'s table. Grafana is left out: no Debian package.
compose-demo:
	docker/compose-demo.sh

# Removes the compose project's containers and volumes (the zoo, the
# certificates) and dangling images; the images themselves stay.
compose-clean:
	docker-compose -p apdispatch -f docker-compose.yml down -v --remove-orphans
	docker image prune -f

clean:
	-[ -x $(BIN)/apdispatch ] && $(BIN)/apdispatch compile --clean
	rm -rf build $(VENV)
