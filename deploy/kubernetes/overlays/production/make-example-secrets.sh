#!/usr/bin/env bash
# Writes THROWAWAY source files for the production overlay's Secrets, to try it (render it,
# apply it to a test cluster): a certificate for the Service's names and for localhost
# (kubectl port-forward) signed by a throwaway CA (ca.crt: what clients trust), one admin
# token (printed once: keep it to call sagad), and a database URL. Never deploy these.
#
#   make-example-secrets.sh [DIR]     # DIR defaults to secrets/ beside this script
#
# Existing files are kept; uses openssl and sha256sum.
set -euo pipefail

dir=${1:-$(dirname "$0")/secrets}
namespace=${SAGAD_NAMESPACE:-sagad}
mkdir -p "$dir"

if [[ ! -s $dir/tls.crt || ! -s $dir/tls.key ]]; then
  # A CA of its own (ca.crt: what clients trust, e.g. `sagactl --ca`) signs sagad's certificate:
  # TLS clients refuse a CA certificate as the server's own.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=sagad example CA" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=sagad.$namespace.svc" -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=DNS:sagad,DNS:sagad.$namespace,DNS:sagad.$namespace.svc,$(
    )DNS:sagad.$namespace.svc.cluster.local,DNS:localhost,IP:127.0.0.1" >"$dir/tls.ext"
  openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 30 -extfile "$dir/tls.ext" -out "$dir/tls.crt" 2>/dev/null
  rm -f "$dir/tls.csr" "$dir/tls.ext" "$dir/ca.srl"
  chmod 600 "$dir/tls.key" "$dir/ca.key"
  echo "wrote $dir/tls.crt and tls.key, signed by the example CA ca.crt (30 days)"
fi

# SAGAD_EXAMPLE_TOKEN_FILE: also write the token there (deploy/test.sh uses it).
if [[ ! -s $dir/tokens.toml ]]; then
  # The form `sagactl token new` makes: sagad_ and 64 hex digits; the file keeps its SHA-256.
  token=sagad_$(openssl rand -hex 32)
  hash=$(printf '%s' "$token" | sha256sum | cut -d' ' -f1)
  printf '[[token]]\nname = "example-admin"\nrole = "admin"\nsha256 = "%s"\n' "$hash" \
    >"$dir/tokens.toml"
  echo "wrote $dir/tokens.toml; its admin token (shown once): $token"
  if [[ -n ${SAGAD_EXAMPLE_TOKEN_FILE:-} ]]; then
    printf '%s' "$token" >"$SAGAD_EXAMPLE_TOKEN_FILE"
  fi
fi

if [[ ! -s $dir/database-url ]]; then
  printf '%s' "postgres://sagad:change-me@postgres.$namespace.svc:5432/sagad" >"$dir/database-url"
  echo "wrote $dir/database-url"
fi
