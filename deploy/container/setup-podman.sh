#!/usr/bin/env bash
# Prepares a Debian or Ubuntu machine to build and run the image with rootful podman (run as
# root; idempotent). It installs podman, buildah, runc and debootstrap if one is missing, and
# writes the two settings without which `podman run` fails on this project's build machines
# (`crun: setrlimit RLIMIT_NOFILE: Operation not permitted`, then `cgroups in hybrid mode not
# supported`) into /etc/containers/containers.conf, unless that file sets them already.
set -euo pipefail

CONF=${CONTAINERS_CONF:-/etc/containers/containers.conf}

if [[ $EUID -ne 0 ]]; then
    echo "setup-podman.sh: run as root (sudo $0)" >&2
    exit 1
fi

missing=()
for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
# debootstrap checks Debian's Release files with this keyring (absent on Ubuntu by default).
[[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
if ((${#missing[@]})); then
    echo "==> apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y podman buildah runc debootstrap \
        debian-archive-keyring
else
    echo "==> podman, buildah, runc and debootstrap are installed"
fi

# has_key SECTION KEY: whether CONF sets KEY (uncommented) in [SECTION].
has_key() {
    [[ -f $CONF ]] || return 1
    awk -v section="[$1]" -v key="$2" '
        /^[[:space:]]*\[/ { gsub(/[[:space:]]/, ""); current = $0; next }
        current == section && $0 ~ "^[[:space:]]*" key "[[:space:]]*=" { found = 1 }
        END { exit !found }
    ' "$CONF"
}

# ensure SECTION KEY LINE: adds LINE under [SECTION] unless KEY is set there already.
ensure() {
    local section=$1 key=$2 line=$3
    if has_key "$section" "$key"; then
        echo "==> $CONF: [$section] $key is set already, left as it is"
        return
    fi
    mkdir -p "$(dirname "$CONF")"
    touch "$CONF"
    if grep -Eq "^[[:space:]]*\[$section\][[:space:]]*$" "$CONF"; then
        sed -i -E "0,/^[[:space:]]*\[$section\][[:space:]]*$/s//[$section]\n$line/" "$CONF"
    else
        [[ -s $CONF ]] && printf '\n' >>"$CONF"
        printf '[%s]\n%s\n' "$section" "$line" >>"$CONF"
    fi
    echo "==> $CONF: [$section] $line"
}

ensure containers default_ulimits 'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]'
ensure engine runtime 'runtime = "runc"'

echo "==> podman $(podman version --format '{{.Client.Version}}'), runtime $(podman info --format '{{.Host.OCIRuntime.Name}}')"
