#!/usr/bin/env bash
# Fuzzes every decoder of clinicsync for a while: builds the cargo-fuzz targets of
# tests/fuzz and runs each one for SECONDS (default 30) from its committed corpus.
# Exits 1 when a target finds a crash; the crashing input is kept under
# tests/fuzz/artifacts/<target>/ and its path printed. New inputs go to a temporary
# directory, so the committed corpora stay as they are (see README.md to grow them).
#
#   tests/fuzz/run.sh [seconds-per-target]
#
# Environment:
#   FUZZ_TARGETS    space-separated subset of targets (default: all)
#   FUZZ_SANITIZER  address (default) or none
#   CARGO_TARGET_DIR  where the fuzz build goes (default tests/fuzz/target)
set -euo pipefail

secs="${1:-30}"
fuzz_dir="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$fuzz_dir/../.." && pwd)"
cargo_fuzz_version=0.13.2
sanitizer="${FUZZ_SANITIZER:-address}"
export PATH="$HOME/.cargo/bin:$PATH"
# cargo-fuzz passes nightly-only flags (-Zsanitizer, sanitizer coverage); the stable
# toolchain accepts them with RUSTC_BOOTSTRAP, so no nightly toolchain is needed.
export RUSTC_BOOTSTRAP=1

started=$(date +%s)
if [ "$(cargo fuzz --version 2>/dev/null || true)" != "cargo-fuzz $cargo_fuzz_version" ]; then
    echo "== installing cargo-fuzz $cargo_fuzz_version"
    nice -n 10 cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi

cd "$root"
targets="${FUZZ_TARGETS:-$(cargo fuzz list --fuzz-dir tests/fuzz)}"
echo "== building fuzz targets (sanitizer: $sanitizer)"
built=$(date +%s)
nice -n 10 cargo fuzz build --fuzz-dir tests/fuzz -s "$sanitizer"
echo "fuzz targets built in $(( $(date +%s) - built )) s"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
summary=()
for t in $targets; do
    mkdir -p "$work/corpus-$t" "tests/fuzz/corpus/$t"
    echo "== fuzzing $t for ${secs} s"
    log="$work/$t.log"
    if nice -n 10 cargo fuzz run --fuzz-dir tests/fuzz -s "$sanitizer" "$t" \
        "$work/corpus-$t" "tests/fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        status=ok
    else
        status=CRASH
        failed+=("$t")
        grep -v -E '^#[0-9]+' "$log" | tail -n 60
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -n 1)
    summary+=("$(printf '%-14s %-6s %10s execs %7s exec/s  %s' "$t" "$status" "${execs:-?}" "${rate:-?}" "${cov:-}")")
done

echo "== fuzz summary (${secs} s per target, $(( $(date +%s) - started )) s in all)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashes in: ${failed[*]} (inputs under tests/fuzz/artifacts/; see tests/fuzz/README.md)"
    exit 1
fi
