#!/usr/bin/env bash
# Shows the running stack working end to end, the way a plugin uses it:
# the provider onboards a demo installation on the pro plan, the plugin
# sends a signed batch (the legacy X-Install-Signature every deployed plugin
# sends), the summary is read, and the provider's generation API asks for
# admission before generating more.
# Idempotent: the installation and its event ids are fixed, so running it
# again shows the same numbers (duplicates are counted once).
set -euo pipefail

INGEST=${INGEST:-http://127.0.0.1:8080}
QUERY=${QUERY:-http://127.0.0.1:8081}
INSTALL_ID=550e8400-e29b-41d4-a716-446655440000_a3b4c5d6e7f8
ACCOUNT_ID=acc_demo
SECRET=demo-installation-secret-0001

# shellcheck source=devstack/jwt.sh
source "$(dirname "${BASH_SOURCE[0]}")/jwt.sh"
EXP=$(($(date +%s) + 3600))
ACCOUNT_TOKEN=$(jwt "{\"sub\":\"demo\",\"role\":\"account\",\"account_id\":\"$ACCOUNT_ID\",\"exp\":$EXP}")
ADMIN_TOKEN=$(jwt "{\"sub\":\"ops\",\"role\":\"provider_admin\",\"exp\":$EXP}")

echo "    1. the provider registers installation $INSTALL_ID on the pro plan:"
curl -sS -X POST "$INGEST/api/usage/installations" \
  -H "Authorization: Bearer $ADMIN_TOKEN" -H 'Content-Type: application/json' \
  -d "{\"install_id\":\"$INSTALL_ID\",\"account_id\":\"$ACCOUNT_ID\",\"secret\":\"$SECRET\",\"plan\":\"pro\",\"site_hash\":\"a3b4c5d6e7f8\",\"plugin_version\":\"2.4.1\",\"wordpress_version\":\"6.8.3\",\"php_version\":\"8.2.12\",\"is_multisite\":false}" \
  | sed 's/^/       /'
echo

NOW=$(date -u +%Y-%m-%dT%H:%M:%SZ)
USER_HASH=$(printf '%s' "$INSTALL_ID:1:user" | sha256sum | cut -d' ' -f1)
BODY="{\"install_id\":\"$INSTALL_ID\",\"account_id\":\"$ACCOUNT_ID\",\"events\":[
{\"event_id\":\"evt_00000000000000000000000000000d01\",\"wp_user_id_hash\":\"$USER_HASH\",\"source\":\"inline\",\"model\":\"gpt-4o-mini\",\"prompt_tokens\":150,\"completion_tokens\":25,\"total_tokens\":175,\"context\":{\"attachment_id\":12345},\"created_at\":\"$NOW\"},
{\"event_id\":\"evt_00000000000000000000000000000d02\",\"wp_user_id_hash\":\"$USER_HASH\",\"source\":\"bulk\",\"model\":\"gpt-4o\",\"prompt_tokens\":1000,\"completion_tokens\":200,\"total_tokens\":1200,\"created_at\":\"$NOW\"}],
\"batch_sent_at\":\"$NOW\"}"
TS=$(date +%s)
SIG=$(printf '%s' "$INSTALL_ID:$TS" | openssl dgst -sha256 -hmac "$SECRET" | awk '{print $NF}')
echo "    2. send a signed batch of 2 events (X-Install-Signature: <hmac>:$TS):"
curl -sS -X POST "$INGEST/api/usage/event" \
  -H "Authorization: Bearer $ACCOUNT_TOKEN" -H "X-Install-Signature: $SIG:$TS" \
  -H 'Content-Type: application/json' --data-binary "$BODY" | sed 's/^/       /'
echo

echo "    3. the summary from ClickHouse (group_by=source):"
for _ in $(seq 1 50); do
  OUT=$(curl -sS "$QUERY/provider/usage/summary?install_id=$INSTALL_ID&group_by=source" -H "Authorization: Bearer $ADMIN_TOKEN")
  case $OUT in *'"bulk"'*'"inline"'*) break ;; esac
  sleep 0.2
done
echo "$OUT" | sed 's/^/       /'
echo

sleep 1   # the processors count the batch within ~0.5 s (a rerun resends known ids)
echo "    4. admission before the next generation (the site's token and signature):"
ADMIT="{\"install_id\":\"$INSTALL_ID\",\"generations\":1,\"tokens\":200}"
TS=$(date +%s)
SIG=$(printf '%s' "$TS.$ADMIT" | openssl dgst -sha256 -hmac "$SECRET" | awk '{print $NF}')
curl -sS -X POST "$INGEST/api/usage/admit" \
  -H "Authorization: Bearer $ACCOUNT_TOKEN" -H "X-Usage-Signature: t=$TS,v1=$SIG" \
  -H 'Content-Type: application/json' --data-binary "$ADMIT" | sed 's/^/       /'
echo
