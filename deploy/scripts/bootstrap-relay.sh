#!/bin/sh
# Install or update an overlan relay on a Debian host with systemd. Run as root.
# Idempotent: a re-run replaces the binary if it changed (restarting the relay) and
# leaves an existing unit, config and data directory alone.
set -eu

usage() {
    cat <<USAGE
usage: $0 BINARY [PUBLIC_HOST:PORT]

  BINARY            a built overlan-server, e.g. target/release/overlan-server
  PUBLIC_HOST:PORT  address clients dial (written into invites); stored as public_addr
                    when /etc/overlan/server.toml is created, ignored if it exists

Creates the system user overlan, /etc/overlan and /var/lib/overlan; installs
/usr/local/bin/overlan-server, overlan-server.service and an example server.toml if
absent; starts the relay and prints its fingerprint and default invite.
USAGE
}

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    usage >&2
    exit 2
fi
case $1 in -h | --help) usage; exit 0 ;; esac

BIN=$1
PUBLIC_ADDR=${2:-}
DEPLOY=$(cd "$(dirname "$0")/.." && pwd)
UNIT_SRC=$DEPLOY/systemd/overlan-server.service
CONF_SRC=$DEPLOY/config/server.toml

SVC_USER=overlan
DEST=/usr/local/bin/overlan-server
UNIT=/etc/systemd/system/overlan-server.service
CONF=/etc/overlan/server.toml
DATA=/var/lib/overlan

die() {
    echo "bootstrap-relay: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "run as root"
[ -f "$BIN" ] && [ -x "$BIN" ] || die "$BIN: not an executable file"
[ -f "$UNIT_SRC" ] && [ -f "$CONF_SRC" ] || die "missing $UNIT_SRC or $CONF_SRC (keep deploy/ together)"
command -v systemctl >/dev/null 2>&1 || die "systemctl not found"
"$BIN" --version >/dev/null || die "$BIN does not run on this host"
case $PUBLIC_ADDR in
    *[!]A-Za-z0-9.:[_-]*) die "PUBLIC_HOST:PORT: unexpected characters in '$PUBLIC_ADDR'" ;;
esac

# User and directories.
if ! getent passwd "$SVC_USER" >/dev/null; then
    useradd --system --user-group --home-dir "$DATA" --no-create-home \
        --shell /usr/sbin/nologin "$SVC_USER"
    echo "created user $SVC_USER"
fi
install -d -m 0755 /etc/overlan
install -d -m 0700 -o "$SVC_USER" -g "$SVC_USER" "$DATA"

# Binary.
updated=no
if [ -f "$DEST" ] && cmp -s "$BIN" "$DEST"; then
    echo "$DEST is up to date"
else
    install -m 0755 "$BIN" "$DEST"
    updated=yes
    echo "installed $DEST"
fi

# Unit.
if [ -e "$UNIT" ]; then
    cmp -s "$UNIT_SRC" "$UNIT" || echo "note: $UNIT differs from $UNIT_SRC; left as is"
else
    install -m 0644 "$UNIT_SRC" "$UNIT"
    echo "installed $UNIT"
fi
systemctl daemon-reload

# Config.
if [ -e "$CONF" ]; then
    echo "$CONF exists; left as is"
    [ -z "$PUBLIC_ADDR" ] || echo "note: $PUBLIC_ADDR not applied; set public_addr in $CONF yourself"
else
    install -m 0644 "$CONF_SRC" "$CONF"
    if [ -n "$PUBLIC_ADDR" ]; then
        printf '\npublic_addr = "%s"\n' "$PUBLIC_ADDR" >>"$CONF"
    fi
    echo "installed $CONF"
fi
if ! grep -q '^[[:space:]]*public_addr[[:space:]]*=' "$CONF"; then
    echo "note: no public_addr in $CONF; invites will carry this host's outbound IP"
fi

# Check the config and create the database (default network) as the service user.
# The certificate (relay.pem) is created by the first start below.
(cd / && runuser -u "$SVC_USER" -- "$DEST" --config "$CONF" --data-dir "$DATA" network list)

# Start, or restart if the binary changed.
systemctl enable overlan-server.service
if systemctl is-active --quiet overlan-server.service; then
    if [ "$updated" = yes ]; then
        systemctl restart overlan-server.service
        echo "restarted overlan-server"
    fi
else
    systemctl start overlan-server.service
fi

# The relay prints `listen`, `fingerprint` and `invite` lines to stdout (the journal)
# once it is bound. Read them from the current run.
out=
tries=0
while [ $tries -lt 15 ]; do
    id=$(systemctl show --property=InvocationID --value overlan-server.service)
    if [ -n "$id" ]; then
        out=$(journalctl --quiet --no-pager --output=cat "_SYSTEMD_INVOCATION_ID=$id" \
            | grep -E '^(listen|fingerprint|invite) ' || true)
    fi
    printf '%s\n' "$out" | grep -q '^invite ' && break
    tries=$((tries + 1))
    sleep 1
done

if [ -z "$out" ]; then
    systemctl --no-pager status overlan-server.service || true
    die "no start-up lines from the relay yet; see: journalctl -u overlan-server"
fi

port=$(printf '%s\n' "$out" | sed -n 's/^listen .*:\([0-9][0-9]*\)$/\1/p')
echo
printf '%s\n' "$out"
cat <<DONE

Next:
  - allow UDP port ${port:-7700} in the firewall (and any cloud security group)
  - back up $DATA; relay.pem in it is pinned by every invite
  - the invite above is the default one (unlimited uses, no expiry, also in the journal);
    per-person invites:
      runuser -u $SVC_USER -- $DEST --config $CONF --data-dir $DATA invite default --uses 1 --expires 7d
DONE
