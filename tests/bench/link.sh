#!/usr/bin/env bash
# The link benchmark of BENCHMARKS.md in one command: installs the peers it measures
# against when missing (sekmet-fhir from PyPI, pouchdb-server 4.2.0 and pouchdb 9.0.0
# from npm, carebundle from PyPI for third-party synthetic FHIR), builds clinicsync,
# and runs `clinicsync-bench link` with all rows. Takes about half an hour; the link
# is emulated in user space (src/linksim.rs), so it needs no root.
#   Usage: tests/bench/link.sh [extra `bench link` flags, e.g. --runs 5]
set -euo pipefail
cd "$(dirname "$0")/../.."
peers=${CLINICSYNC_BENCH_NODE:-/opt/clinicsync-bench}
sekmet=${SEKMET_BIN:-/opt/clinicsync-test/sekmet/bin/sekmet}
if [ ! -x "$sekmet" ]; then
    python3 -m venv "$(dirname "$(dirname "$sekmet")")"
    "$(dirname "$sekmet")/pip" install -q sekmet-fhir
fi
if [ ! -d "$peers/node_modules/pouchdb-server" ] || [ ! -d "$peers/node_modules/pouchdb" ]; then
    mkdir -p "$peers"
    (cd "$peers" && { [ -f package.json ] || npm init -y >/dev/null; } &&
        npm install --no-audit --no-fund pouchdb-server@4.2.0 pouchdb@9.0.0)
fi
if [ ! -x "$peers/py/bin/carebundle" ]; then
    python3 -m venv "$peers/py"
    "$peers/py/bin/pip" install -q carebundle==0.5.0
fi
third=$(mktemp -d)
trap 'rm -rf "$third"' EXIT
# About a day's work of a busy clinic: 60 patients, ~2,700 resources of 8 kinds.
"$peers/py/bin/carebundle" generate --profile mixed --count 60 --seed 42 --sex mixed \
    --format ndjson --out "$third" >/dev/null
cargo build --release --features devkit --quiet
CLINICSYNC_BENCH_NODE=$peers SEKMET_BIN=$sekmet \
    ./target/release/clinicsync-bench link --third-party "$third" "$@"
