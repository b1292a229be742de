# Development JWTs, signed with the services' JWT secret (HS256), for the
# demo and for `./stack token`. Sourced, not run.
JWT_SECRET=${USAGE_JWT_SECRET:-dev-only-jwt-secret-change-me}

b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }

# jwt '<claims JSON>': header.payload.signature.
jwt() {
  local header payload sig
  header=$(printf '%s' '{"alg":"HS256","typ":"JWT"}' | b64url)
  payload=$(printf '%s' "$1" | b64url)
  sig=$(printf '%s' "$header.$payload" | openssl dgst -sha256 -hmac "$JWT_SECRET" -binary | b64url)
  printf '%s.%s.%s' "$header" "$payload" "$sig"
}

# dev_token ROLE [ACCOUNT_ID [INSTALL_ID...]] [--days N]: a token of that role.
dev_token() {
  local role=${1:-provider_admin}
  shift || true
  local days=7 account="" ids=()
  while (($#)); do
    case $1 in
      --days) days=$2; shift 2 ;;
      *) if [[ -z $account ]]; then account=$1; else ids+=("$1"); fi; shift ;;
    esac
  done
  case $role in
    provider_admin|account|network_admin|site_admin|user|service) ;;
    *) echo "unknown role '$role' (provider_admin, account, network_admin, site_admin, user, service)" >&2; return 2 ;;
  esac
  if [[ $role != provider_admin && $role != service && -z $account ]]; then
    echo "a $role token needs an account id: ./stack token $role <account_id> [install_id...]" >&2
    return 2
  fi
  local exp=$(($(date +%s) + days * 86400))
  local claims="{\"sub\":\"dev-$role\",\"role\":\"$role\",\"exp\":$exp"
  [[ -n $account ]] && claims+=",\"account_id\":\"$account\""
  if ((${#ids[@]})); then
    claims+=",\"install_ids\":[$(printf '"%s",' "${ids[@]}" | sed 's/,$//')]"
    [[ $role == user ]] && claims+=",\"user_hash\":\"$(printf '%s' "${ids[0]}:1:user" | sha256sum | cut -d' ' -f1)\""
  fi
  jwt "$claims}"
}
