#!/usr/bin/env bash
# README command 1 as a new user runs it: a fresh clone of HEAD, a fresh venv, no pip or qconv cache.
# Prints the command, its wall time in seconds and the venv's size.   bash bench/readme_command1.sh [WORKDIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
rm -rf "$work/clone" "$work/venv" "$work/cache"
git clone -q "$repo" "$work/clone"
cd "$work/clone"
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
export PIP_NO_CACHE_DIR=1 QCONV_CACHE="$work/cache"
cmd=$(grep -A1 '^# 1\.' README.md | tail -1)
echo "commit $(git rev-parse --short HEAD): $cmd"
start=$(date +%s.%N)
bash -c "$cmd"
echo "seconds $(echo "$(date +%s.%N) - $start" | bc)"
echo "venv $(du -sh "$work/venv" | cut -f1)"
