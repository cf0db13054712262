#!/usr/bin/env bash
# Trains a FHIR zstd dictionary for protocol v2 (src/wire/dict.rs) with `zstd --train`
# on synthetic FHIR from two generators: clinicsync's own (`clinicsync-bench
# dict-samples`, seeds apart from the benchmark workloads) and clinosim from PyPI
# (a hospital simulator exporting FHIR R4 NDJSON). carebundle, the third-party data
# the benchmarks measure on, is held out: it must never be added here.
#
#   tests/bench/train-dict.sh ID [MAXDICT_BYTES]     # e.g. 2 65536
#
# Writes src/wire/dict/fhir-v<ID>.zdict. A new dictionary gets a new ID and is added
# to dict::SHIPPED beside the old ones, never in their place (old frames name them).
# Environment: CLINOSIM (default: installs clinosim==0.6.5 into a venv under
# $CLINICSYNC_BENCH_NODE or /opt/clinicsync-bench), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
id=${1:?usage: train-dict.sh ID [MAXDICT_BYTES]}
maxdict=${2:-65536}
peers=${CLINICSYNC_BENCH_NODE:-/opt/clinicsync-bench}
clinosim=${CLINOSIM:-$peers/clinosim/bin/clinosim}
if [ ! -x "$clinosim" ]; then
    python3 -m venv "$peers/clinosim"
    "$peers/clinosim/bin/pip" install -q clinosim==0.6.5
    clinosim=$peers/clinosim/bin/clinosim
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# About 44,000 resources of 22 kinds (2,000 people over two months), fixed seed.
"$clinosim" simulate -o "$work/clinosim" -p 2000 -s 7 --country US \
    --start 2026-01-01 --end 2026-03-01 --format fhir-r4 >/dev/null
target=${CARGO_TARGET_DIR:-target}
cargo build --release --features devkit --quiet --bin clinicsync-bench
"$target/release/clinicsync-bench" dict-samples --out "$work/samples" \
    --ours 20000 --seed 1000 --ndjson "$work/clinosim/fhir_r4" --per-source 20000
zstd --train -q -r "$work/samples" -o "src/wire/dict/fhir-v$id.zdict" \
    --maxdict="$maxdict" --dictID="$id"
ls -l "src/wire/dict/fhir-v$id.zdict"
