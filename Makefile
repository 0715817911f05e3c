# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
TOPOLOGY ?= topologies/local-1p1d.yaml
.PHONY: setup demo test lint down

setup:
	./scripts/setup.sh

demo:
	WITH_SMOLLM2=$(if $(findstring smollm2,$(TOPOLOGY)),1,) ./scripts/setup.sh
	./scripts/demo.sh $(TOPOLOGY)

lint: setup
	.venv/bin/ruff check disaggctl tests benchmarks scripts
	.venv/bin/lint-imports

test: setup lint
	.venv/bin/python -m pytest -q --timeout 300 -p no:cacheprovider tests

down:
	.venv/bin/disaggctl down
