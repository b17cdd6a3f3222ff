#!/usr/bin/env bash
# One prepared GPU benchmark of `textgen serve` (fits in about 8 minutes on one H200).
#
# How to run, from the repository root on the GPU machine:
#     bash bench/gpu.sh [OUT_DIR] [--tokenizer DIR] [--budget-s S] [--only NAMES] [--dry-run]
#   OUT_DIR      results directory; default "$OUT". Results: OUT_DIR/gpu.json, one log per server,
#                and the table on stdout.
#   --tokenizer  the GPT-2 tokenizer directory; default ./.gpu/gpt2-tokenizer (a copy of
#                ../shared/models/gpt2-tokenizer carried with the tree: there is no network).
#   --dry-run    CPU, float32, 2-layer model, eager and compiled, 1 and 4 clients (what the unit test runs).
#   PYTHON       interpreter (default python3); PYTHONPATH must reach the app's dependencies
#                (fastapi, uvicorn, pydantic-settings) when they are not installed.
#
# What it does: builds a GPT2Config() model with random weights (seed 0) and the given tokenizer,
# then for fp16 and bf16, each with the decode step eager and compiled into CUDA graphs
# (TEXTGEN_COMPILE=false/true), starts `python3 -m app.cli serve` on 127.0.0.1 and drives it with
# bench's own streaming clients at 1, 32 and 128 concurrent clients (128 new tokens each, greedy,
# EOS suppressed). It stops starting new configurations after --budget-s (default 480 s).
# GPT-2 runs on textgen's compact forward (TEXTGEN_COMPACT_FORWARD=true); the graph configurations
# set TEXTGEN_COMPILE=true (torch.compile, mode reduce-overhead: CUDA graphs).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m bench.gpu "$@"
