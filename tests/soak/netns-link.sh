#!/usr/bin/env bash
# A realistic bad link for a soak run, as root: a hub and a clinic in two network
# namespaces joined by a veth pair, shaped like a 2G/EDGE modem link —
#   rate   tc tbf (default 128 kbit/s each way)
#   loss   nftables random drop (default 2 %) on the clinic's side
#   delay  this kernel has no netem: add it with the project's FaultProxy instead
# then a real hub daemon and a real clinic that syncs N synthetic records across it.
# Everything lives in namespaces this script creates and removes; no traffic leaves
# the machine.   Usage: tests/soak/netns-link.sh [records] [rate] [loss-percent]
set -euo pipefail
records=${1:-2000}
rate=${2:-128kbit}
loss=${3:-2}
bin=${CLINICSYNC_BIN:-$(dirname "$0")/../../target/release/clinicsync}
work=$(mktemp -d)
cleanup() {
    [ -n "${hub_pid:-}" ] && kill "$hub_pid" 2>/dev/null || true
    ip netns del cs-hub 2>/dev/null || true
    ip netns del cs-clinic 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

ip netns add cs-hub
ip netns add cs-clinic
ip link add cs-h type veth peer name cs-c
ip link set cs-h netns cs-hub
ip link set cs-c netns cs-clinic
ip -n cs-hub addr add 10.203.0.1/30 dev cs-h
ip -n cs-clinic addr add 10.203.0.2/30 dev cs-c
ip -n cs-hub link set lo up; ip -n cs-hub link set cs-h up
ip -n cs-clinic link set lo up; ip -n cs-clinic link set cs-c up
for side in "cs-hub cs-h" "cs-clinic cs-c"; do
    set -- $side
    ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$rate" burst 16kb latency 500ms
done
if command -v nft >/dev/null; then
    ip netns exec cs-clinic nft -f - <<NFT
table inet loss {
  chain in { type filter hook input priority 0; numgen random mod 100 < $loss drop; }
  chain out { type filter hook output priority 0; numgen random mod 100 < $loss drop; }
}
NFT
else
    echo "nft not installed: no random loss (apt-get install nftables)" >&2
fi

token=$("$bin" token new | sed -n 's/^token: *//p')
hash=$(printf '%s' "$token" | sha256sum | cut -d' ' -f1)
(umask 077; printf '%s\n' "$token" > "$work/token")
cat > "$work/hub.toml" <<TOML
[node]
id = "hub"
store = "$work/hub.db"
[hub]
listen = "10.203.0.1:7070"
[[hub.children]]
node = "clinic"
token_sha256 = "$hash"
TOML
cat > "$work/clinic.toml" <<TOML
[node]
id = "clinic"
store = "$work/clinic.db"
[parent]
url = "http://10.203.0.1:7070"
token_file = "$work/token"
[sync]
timeout_secs = 60
TOML
python3 - "$work/records.json" "$records" <<'PY'
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
entries = []
for i in range(n):
    entries.append({"resource": {"resourceType": "Observation", "id": f"o{i}", "status": "final",
        "code": {"coding": [{"code": "5089AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "display": "Weight (kg)"}]},
        "subject": {"reference": f"Patient/p{i // 10}"}, "valueQuantity": {"value": 50 + i % 40, "unit": "kg"}}})
json.dump({"resourceType": "Bundle", "type": "transaction", "entry": entries}, open(out, "w"))
PY
"$bin" --config "$work/clinic.toml" put "$work/records.json"
ip netns exec cs-hub "$bin" --config "$work/hub.toml" run 2>"$work/hub.log" & hub_pid=$!
sleep 1
start=$(date +%s)
until ip netns exec cs-clinic "$bin" --config "$work/clinic.toml" sync; do
    echo "sync interrupted; trying again" >&2
    sleep 2
done
echo "synced $records records over $rate with $loss% loss in $(( $(date +%s) - start )) s"
"$bin" --config "$work/clinic.toml" status | grep -E "outbox|traffic|today"
