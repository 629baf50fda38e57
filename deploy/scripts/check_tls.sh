#!/usr/bin/env bash
# Tell a CA mismatch from an unreachable SuperLink before starting a SuperNode.
# usage: check_tls.sh HOST:PORT CA_FILE
set -u
addr=${1:?usage: check_tls.sh HOST:PORT CA_FILE}; ca=${2:?CA file}
host=${addr%:*}
out=$(timeout 10 openssl s_client -connect "$addr" -servername "$host" -CAfile "$ca" -verify_return_error </dev/null 2>&1)
rc=$?
if echo "$out" | grep -q "Verify return code: 0 (ok)"; then echo "OK: $addr presents a certificate that verifies against $ca"; exit 0; fi
if [ $rc -eq 124 ] || echo "$out" | grep -qiE "connect:|Connection refused|errno"; then
  echo "UNREACHABLE: nothing answers TLS on $addr (wrong address/port, SuperLink down, firewall)"; exit 2; fi
echo "CA MISMATCH: $addr answers, but its certificate does not verify against $ca:"; echo "$out" | grep -iE "verify|error" | head -3; exit 3
