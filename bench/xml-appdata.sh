#!/usr/bin/env bash
# Latency of RequestAppData against a running demo broker (scripts/run-demo), as a front end
# sees it: the first request pays for the PBKDF2 password check, later ones hit the credential
# cache. Prints the first request's time and p50/p99 of the next N (default 200).
set -euo pipefail
n=${1:-200}
url=${OPENBROKER_XML_URL:-http://127.0.0.1:8080/scripts/wpnbr.dll}
body=$(mktemp)
trap 'rm -f "$body"' EXIT
cat > "$body" <<'XML'
<?xml version="1.0" encoding="UTF-8"?>
<NFuseProtocol version="5.1"><RequestAppData><Scope traverse="subtree"/><DesiredDetails>defaults</DesiredDetails><Credentials><UserName>alice</UserName><Password>alice-pass</Password><Domain type="NT">DEMO</Domain></Credentials></RequestAppData></NFuseProtocol>
XML
for i in $(seq 0 "$n"); do
  curl -s -o /dev/null -w '%{time_total}\n' -H 'Content-Type: text/xml' --data-binary @"$body" "$url"
done | awk 'NR==1 {first=$1; next} {a[NR-1]=$1} END {
  n=asort(a); printf "first (PBKDF2): %.1f ms\ncached: n=%d p50=%.2f ms p99=%.2f ms\n", first*1000, n, a[int(n*0.5)]*1000, a[int(n*0.99)]*1000 }'
