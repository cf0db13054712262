#!/usr/bin/env bash
# Builds the arm64 .deb on an amd64 Debian 12 machine and smoke-tests it under
# qemu: the arm64 binary runs, and an arm64 clinic syncs with a native hub.
#
# Toolchain: Debian's rustc-web/cargo-web (1.96), whose arm64 std matches
# libstd-rust-web-dev:arm64 — rustup's toolchain has no arm64 std here. Linker
# aarch64-linux-gnu-gcc; runner `qemu-aarch64 -L /` (with -L /usr/aarch64-linux-gnu
# threads hang). Run as root (it installs packages) unless SKIP_APT=1.
#
# armhf (best effort, untested here): the same with gcc-arm-linux-gnueabihf,
# libc6-dev-armhf-cross, libstd-rust-web-dev:armhf, TARGET=armv7-unknown-linux-gnueabihf.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if [ "${SKIP_APT:-0}" != 1 ]; then
    dpkg --add-architecture arm64
    apt-get update -qq
    apt-get install -y -qq rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu \
        libc6-dev-arm64-cross qemu-user >/dev/null
fi
started=$(date +%s)
export TARGET=aarch64-unknown-linux-gnu
export CARGO=/usr/bin/cargo RUSTC=/usr/bin/rustc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# Debian's cargo builds into its own directory, so it never mixes artefacts with rustup's.
export CARGO_TARGET_DIR=$PWD/target/cross
native=${NATIVE_BIN:-$PWD/target/release/clinicsync}
[ -x "$native" ] || env -u CARGO -u RUSTC -u CARGO_TARGET_DIR cargo build --release --locked >&2
export NATIVE_BIN=$native
deb=$(packaging/build-deb.sh)
echo "arm64 package: $deb"
dpkg-deb --info "$deb" | grep "Architecture: arm64" >/dev/null

bin=$CARGO_TARGET_DIR/$TARGET/release/clinicsync
run_arm() { qemu-aarch64 -L / "$bin" "$@"; }
run_arm --version

echo "== smoke test: native hub, arm64 clinic under qemu"
work=$(mktemp -d)
trap 'kill "${hub_pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
token=$("$native" token new | sed -n 's/^token: *//p')
hash=$(printf '%s' "$token" | sha256sum | cut -d' ' -f1)
printf '%s\n' "$token" > "$work/token"; chmod 600 "$work/token"
cat > "$work/hub.toml" <<TOML
[node]
id = "hub"
store = "$work/hub.db"
[hub]
listen = "127.0.0.1:$port"
[[hub.children]]
node = "arm-clinic"
token_sha256 = "$hash"
TOML
cat > "$work/clinic.toml" <<TOML
[node]
id = "arm-clinic"
store = "$work/clinic.db"
[parent]
url = "http://127.0.0.1:$port"
token_file = "$work/token"
TOML
echo '{"resourceType":"Location","id":"from-the-hub"}' > "$work/loc.json"
echo '{"resourceType":"Patient","id":"from-arm","gender":"male"}' > "$work/p.json"
"$native" --config "$work/hub.toml" put "$work/loc.json"
"$native" --config "$work/hub.toml" run 2>"$work/hub.log" & hub_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
run_arm --config "$work/clinic.toml" put "$work/p.json"
run_arm --config "$work/clinic.toml" sync
run_arm --config "$work/clinic.toml" get Location/from-the-hub >/dev/null
"$native" --config "$work/hub.toml" get Patient/from-arm | grep male >/dev/null
kill -TERM "$hub_pid"; wait "$hub_pid" || true
echo "arm64 build and smoke test passed in $(( $(date +%s) - started )) s"
