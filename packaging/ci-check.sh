#!/usr/bin/env bash
# Package checks, run by .ci/run as root on a Debian 12 machine (amd64):
#   1. upgrade: the previous release's package (schema 1) with data, then this one
#   2. build this .deb; lintian; install; --version; config check; systemd-analyze
#   3. journald: structured fields from the daemon reach the journal
#   4. purge removes the data
# Needs: cargo-deb, lintian, systemd (systemd-analyze, systemd-journald), adduser.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"; git -C "$root" worktree remove --force "$work/old" 2>/dev/null || true' EXIT
step() { echo "== package: $*"; }

# The last release with schema 1 (0.1.0). Built from history so the test needs no
# download; its package has only the binary (it predates the packaging work).
old_rev=98de6fb
dpkg --purge clinicsync >/dev/null 2>&1 || true
rm -rf /var/lib/clinicsync /etc/clinicsync

step "build the previous release (0.1.0, schema 1) from $old_rev"
git worktree add --detach "$work/old" "$old_rev" >/dev/null
(cd "$work/old" && CARGO_TARGET_DIR="$root/target/old" cargo build --release --locked >&2 \
    && CARGO_TARGET_DIR="$root/target/old" cargo-deb --no-build >/dev/null)
old_deb=$(ls "$root"/target/old/debian/clinicsync_0.1.0*.deb)

step "install 0.1.0 and write data as the service user"
dpkg -i "$old_deb" >/dev/null
getent passwd clinicsync >/dev/null || adduser --system --group --home /var/lib/clinicsync --no-create-home clinicsync >/dev/null
install -d -o clinicsync -g clinicsync -m 0750 /var/lib/clinicsync
mkdir -p /etc/clinicsync
cat > /etc/clinicsync/clinicsync.toml <<'TOML'
[node]
id = "hub"
store = "/var/lib/clinicsync/clinicsync.db"

[hub]
listen = "127.0.0.1:7070"
TOML
echo '{"resourceType":"Patient","id":"kept-across-upgrade","gender":"female"}' > "$work/p.json"
chmod 644 "$work/p.json"; chmod 755 "$work"
runuser -u clinicsync -- clinicsync --config /etc/clinicsync/clinicsync.toml put "$work/p.json"
runuser -u clinicsync -- clinicsync --config /etc/clinicsync/clinicsync.toml status | grep "schema 1" >/dev/null

step "build this version's package"
deb=$(packaging/build-deb.sh)
echo "$deb"

step "lintian"
lintian --fail-on error,warning "$deb"

step "upgrade over 0.1.0: data kept, migrations run by postinst"
dpkg -i --force-confold "$deb" >/dev/null
# Migrated past schema 1 by postinst (whatever the newest schema is now).
runuser -u clinicsync -- clinicsync --config /etc/clinicsync/clinicsync.toml status --json | grep -E '"schema": ([2-9]|[1-9][0-9])\b' >/dev/null
runuser -u clinicsync -- clinicsync --config /etc/clinicsync/clinicsync.toml get Patient/kept-across-upgrade | grep female >/dev/null
runuser -u clinicsync -- clinicsync --config /etc/clinicsync/clinicsync.toml audit verify

step "a store from a newer schema is refused by this binary"
cp /var/lib/clinicsync/clinicsync.db "$work/newer.db"
sqlite3 "$work/newer.db" "INSERT INTO schema_migrations VALUES (99, 0)" 2>/dev/null \
    || python3 -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('INSERT INTO schema_migrations VALUES (99, 0)'); c.commit()" "$work/newer.db"
sed "s#/var/lib/clinicsync/clinicsync.db#$work/newer.db#" /etc/clinicsync/clinicsync.toml > "$work/newer.toml"
if clinicsync --config "$work/newer.toml" status 2> "$work/err"; then echo "newer store accepted" >&2; exit 1; fi
grep -q "schema version 99 is newer" "$work/err"

step "purge, then a fresh install of this version"
dpkg --purge clinicsync >/dev/null
test ! -e /var/lib/clinicsync
dpkg -i "$deb" >/dev/null
clinicsync --version
clinicsync --config /etc/clinicsync/clinicsync.toml config check
test "$(stat -c '%a %G' /etc/clinicsync/clinicsync.toml)" = "640 clinicsync"
test "$(stat -c '%a %U' /var/lib/clinicsync)" = "750 clinicsync"
test -f /usr/share/man/man1/clinicsync.1.gz && test -f /usr/share/man/man1/clinicsync-status.1.gz
test -f /usr/share/bash-completion/completions/clinicsync

step "systemd-analyze verify and security"
systemd-analyze verify /lib/systemd/system/clinicsync.service
systemd-analyze security --offline=true /lib/systemd/system/clinicsync.service | tail -n 1

step "journald receives structured fields"
mkdir -p /run/systemd/journal
/lib/systemd/systemd-journald & jpid=$!
for _ in $(seq 50); do [ -S /run/systemd/journal/socket ] && break; sleep 0.1; done
cat > "$work/j.toml" <<TOML
[node]
id = "journal-probe"
store = "$work/j.db"
[hub]
listen = "127.0.0.1:0"
TOML
JOURNAL_STREAM=8:8 clinicsync --config "$work/j.toml" run & dpid=$!
sleep 2; kill -TERM "$dpid"; wait "$dpid" || true
journalctl --sync 2>/dev/null || true
# (no `grep -q` in pipes: with pipefail an early exit would fail the pipeline)
found=$(journalctl -o json --no-pager SYSLOG_IDENTIFIER=clinicsync | grep '"NODE":"journal-probe"' | grep -c '"MESSAGE":"serving children"' || true)
if [ "${found:-0}" -lt 1 ]; then
    echo "no structured NODE field in the journal" >&2
    journalctl -o json --no-pager | tail -n 5 >&2
    kill "$jpid"; exit 1
fi
kill "$jpid"; wait "$jpid" 2>/dev/null || true

step "purge"
dpkg --purge clinicsync >/dev/null
test ! -e /var/lib/clinicsync && test ! -e /etc/clinicsync/clinicsync.toml
echo "package checks passed"
