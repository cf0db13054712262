#!/usr/bin/env bash
# Builds the .deb for this machine's architecture, or for TARGET (a Rust target
# triple, e.g. aarch64-unknown-linux-gnu) when set. Needs cargo-deb
# (`cargo install cargo-deb --locked`). Prints the path of the package.
#   CARGO / RUSTC: the toolchain to build with (cross/build-arm64.sh sets Debian's).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo_bin=${CARGO:-cargo}
target_args=()
bin_dir=target/release
if [ -n "${TARGET:-}" ]; then
    target_args=(--target "$TARGET")
    bin_dir=target/$TARGET/release
fi
"$cargo_bin" build --release --locked "${target_args[@]}" >&2

# Man pages and completions come from the CLI definition itself; generate them
# with a native binary (a cross-built one may not run here): NATIVE_BIN, or a
# native build with the default toolchain.
tdir=${CARGO_TARGET_DIR:-target}
gen=${NATIVE_BIN:-$tdir/release/clinicsync}
if [ -n "${TARGET:-}" ] && [ -z "${NATIVE_BIN:-}" ]; then
    env -u CARGO -u RUSTC cargo build --release --locked >&2
fi
rm -rf target/assets && mkdir -p target/assets
"$gen" generate man target/assets
"$gen" generate completions target/assets
gzip -9n target/assets/*.1

# cargo-deb rewrites target/release/… asset paths for --target builds, and strips
# the binary with the target's strip.
# It prints the package's path last.
"${CARGO_DEB:-cargo-deb}" --no-build "${target_args[@]}" | tail -n 1
