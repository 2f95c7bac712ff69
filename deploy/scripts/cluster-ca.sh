#!/bin/sh
# Make (or extend) an overlan cluster CA and credentials for its nodes, and one bundle
# per node to copy to that node's host. Run on an admin machine, not on a relay host:
# DIR/ca.pem is the CA's private key. Idempotent: an existing CA is kept, and nodes
# that have credentials already are left alone (use --reissue to renew them; a node
# keeps its slot).
set -eu

usage() {
    cat <<USAGE
usage: $0 [--reissue] DIR NODE...

  DIR    the cluster directory (created with the CA if it does not exist)
  NODE   node names: 1-63 of a-z 0-9 - (e.g. eu us ap)

Writes DIR/ca.pem (CA key: keep it here, back it up), DIR/ca.crt, DIR/cluster.json
(slots), DIR/NODE.pem, and DIR/bundles/NODE/{ca.crt,NODE.pem}. Copy a node's bundle to
/etc/overlan/cluster on its host (mode 0700, owned by the relay's user) and set in
/etc/overlan/server.toml:

  [cluster]
  dir = "/etc/overlan/cluster"
  node = "NODE"
  peers = ["other-node.example.com:7700"]

The overlan-server binary is taken from \$OVERLAN_SERVER, else from PATH.
USAGE
}

reissue=no
case ${1:-} in
    -h | --help) usage; exit 0 ;;
    --reissue) reissue=yes; shift ;;
esac
if [ $# -lt 2 ]; then
    usage >&2
    exit 2
fi
DIR=$1
shift
BIN=${OVERLAN_SERVER:-overlan-server}
command -v "$BIN" >/dev/null 2>&1 || { echo "cluster-ca: $BIN not found; set OVERLAN_SERVER" >&2; exit 1; }

umask 077
if [ -f "$DIR/ca.pem" ]; then
    echo "using the CA in $DIR"
else
    "$BIN" ca init --dir "$DIR"
fi
for node in "$@"; do
    if [ -f "$DIR/$node.pem" ] && [ "$reissue" = no ]; then
        echo "$node has credentials already (--reissue to renew)"
    else
        "$BIN" ca issue "$node" --dir "$DIR"
    fi
    mkdir -p "$DIR/bundles/$node"
    cp "$DIR/ca.crt" "$DIR/$node.pem" "$DIR/bundles/$node/"
done
echo
echo "bundles in $DIR/bundles/: copy each to its node's host (e.g. scp -r $DIR/bundles/NODE host:/etc/overlan/cluster)"
