#!/usr/bin/env bash
# Development certificates for kvshare TLS and mTLS (openssl): a CA, a node certificate and a
# client certificate, in DIR (default ./certs):
#
#   DIR/ca.pem, DIR/ca.key         the CA (keep ca.key private; it signs everything below)
#   DIR/node.pem, DIR/node.key     kvshared --tls-cert/--tls-key (server and client auth: peers
#                                  present it under mTLS)
#   DIR/client.pem, DIR/client.key CLI, workers, Python: --tls-cert/--tls-key under mTLS
#
#   scripts/dev-certs.sh [DIR] [SAN...]
#
# The node certificate's SANs: localhost, 127.0.0.1, ::1, this host's name, and each extra SAN
# given (DNS names or IP addresses; wildcards like *.kvshare-headless.ns.svc.cluster.local are
# fine). Clients verify the name they dial against them. Keys are ECDSA P-256; certificates
# are valid for 825 days. Existing files in DIR are replaced. For development and tests only:
# in production use your PKI or cert-manager (deploy/kubernetes/overlays/tls).
set -euo pipefail

DIR="${1:-certs}"
shift || true
command -v openssl >/dev/null || { echo "dev-certs.sh: openssl not found" >&2; exit 1; }
mkdir -p "$DIR"
umask 077

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
host="$(hostname 2>/dev/null || true)"
[[ -n "$host" && "$host" != localhost ]] && sans="$sans,DNS:$host"
for s in "$@"; do
    if [[ "$s" =~ ^[0-9.]+$ || "$s" == *:* ]]; then sans="$sans,IP:$s"; else sans="$sans,DNS:$s"; fi
done

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key "$DIR/ca.key"
openssl req -x509 -new -key "$DIR/ca.key" -sha256 -days 3650 -subj "/CN=kvshare dev CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$DIR/ca.pem"

# issue NAME CN SANS: DIR/NAME.key and DIR/NAME.pem signed by the CA.
issue() {
    local name="$1" cn="$2" san="$3" ext
    ext="$(mktemp)"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=serverAuth,clientAuth"
        echo "subjectAltName=$san"
    } >"$ext"
    key "$DIR/$name.key"
    openssl req -new -key "$DIR/$name.key" -subj "/CN=$cn" -out "$DIR/$name.csr"
    openssl x509 -req -in "$DIR/$name.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" \
        -CAcreateserial -days 825 -sha256 -extfile "$ext" -out "$DIR/$name.pem" 2>/dev/null
    rm -f "$ext" "$DIR/$name.csr"
}
issue node "kvshare node" "$sans"
issue client "kvshare client" "DNS:kvshare-client"
rm -f "$DIR/ca.srl"
chmod 644 "$DIR"/*.pem
echo "dev-certs.sh: wrote $DIR/{ca,node,client}.{pem,key}; node SANs: $sans"
