#!/usr/bin/env bash
# The link benchmark's clinicsync row over a real TCP path: the kernel's own TCP,
# rate-limited by htb and made lossy by nftables on loopback, with a small proxy for
# the 600 ms round trip and the cut every 60 s (this kernel has no netem). Runs in a
# private network namespace as root, so the host's loopback is untouched.
#   Usage: sudo tests/bench/real-path.sh [extra `clinicsync-bench link` flags]
#   e.g.   sudo tests/bench/real-path.sh --runs 3 --third-party <carebundle NDJSON dir>
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v tc >/dev/null || apt-get install -y -qq iproute2
command -v nft >/dev/null || apt-get install -y -qq nftables
cargo build --release --features devkit --quiet
exec unshare -n -- sh -c 'ip link set lo up && CLINICSYNC_BENCH_NETNS=1 exec "$0" "$@"' \
    ./target/release/clinicsync-bench link --path real --rows clinicsync "$@"
