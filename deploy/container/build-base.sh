#!/usr/bin/env bash
# The base of both stages of deploy/container/Containerfile: Debian 12 (bookworm, Python 3.11)
# with python3, python3-venv and ca-certificates, no apt lists or caches. Built once: skipped
# when the engine holds the image already (remove it to rebuild).
#
# From docker.io/library/debian:bookworm-slim where the engine can pull it; otherwise (no
# registry reachable) debootstrap'd from the Debian mirror the host's apt uses (root needed),
# or from $DEBIAN_MIRROR, and imported.
#
# Usage: deploy/container/build-base.sh        (CONTAINER_ENGINE=podman|docker, BASE_IMAGE=...)
set -euo pipefail

ENGINE=${CONTAINER_ENGINE:-podman}
IMAGE=${BASE_IMAGE:-localhost/kubesentiment-base:bookworm}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
DEFAULT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

if "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "==> base image $IMAGE exists, not rebuilt"
    exit 0
fi

# The mirror the host's apt uses for Debian itself (not -security): deb822 .sources files first,
# then one-line sources.list entries; a stanza naming the suite itself wins.
host_mirror() {
    {
        for f in /etc/apt/sources.list.d/*.sources; do
            [[ -f $f ]] || continue
            awk 'BEGIN { RS = ""; FS = "\n" }
                {
                    types = ""; uris = ""; suites = ""
                    for (i = 1; i <= NF; i++) {
                        if ($i ~ /^Types:/)  { types = $i;  sub(/^Types:[ \t]*/, "", types) }
                        if ($i ~ /^URIs:/)   { uris = $i;   sub(/^URIs:[ \t]*/, "", uris) }
                        if ($i ~ /^Suites:/) { suites = $i; sub(/^Suites:[ \t]*/, "", suites) }
                    }
                    if (types !~ /(^| )deb( |$)/ || uris == "") next
                    split(uris, u, " "); split(suites, s, " ")
                    for (j in s) print u[1], s[j]
                }' "$f"
        done
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [[ -f $f ]] || continue
            awk '$1 == "deb" { line = $0; sub(/\[[^]]*\]/, "", line); split(line, f, " "); print f[2], f[3] }' "$f"
        done
    } | awk -v suite="$SUITE" '
        $2 ~ /security/ || $1 ~ /security/ { next }
        $2 == suite && !exact { exact = $1 }
        $1 ~ /debian\/?$/ && !debian { debian = $1 }
        END { if (exact) print exact; else if (debian) print debian }'
}

start=$SECONDS
echo "==> building the base image $IMAGE (Debian $SUITE, Python 3.11)"
if "$ENGINE" pull docker.io/library/debian:bookworm-slim; then
    context=$(mktemp -d)
    trap 'rm -rf "$context"' EXIT
    cat >"$context/Containerfile" <<'EOF'
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/apt \
        /var/log/dpkg.log /usr/share/man/* /usr/share/info/* \
    && find /usr/share/locale -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} + \
    && find /usr/share/doc -type f ! -name copyright -delete \
    && python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
ENV LANG=C.UTF-8
EOF
    "$ENGINE" build -t "$IMAGE" "$context"
else
    echo "==> the engine cannot pull debian:bookworm-slim: debootstrap instead"
    if [[ $EUID -ne 0 ]]; then
        echo "build-base.sh: debootstrap needs root (sudo $0)" >&2
        exit 1
    fi
    command -v debootstrap >/dev/null || {
        echo "build-base.sh: debootstrap is missing (deploy/container/setup-podman.sh installs it)" >&2
        exit 1
    }
    mirror=${DEBIAN_MIRROR:-$(host_mirror)}
    if [[ -z $mirror ]]; then
        echo "build-base.sh: no Debian mirror in the host's apt sources: set DEBIAN_MIRROR" >&2
        exit 1
    fi
    root=$(mktemp -d "${TMPDIR:-/tmp}/kubesentiment-base.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    echo "==> debootstrap --variant=minbase $SUITE from the host's mirror (about a minute)"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror"
    # apt lists and caches, logs, manuals, and what debootstrap copied from the host.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
        "$root"/var/log/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/etc/resolv.conf "$root"/etc/hostname "$root"/etc/machine-id
    # Translations and documentation (the licences stay): nothing in the image reads them.
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
    find "$root/usr/share/doc" -type f ! -name copyright -delete
    mkdir -p "$root/var/lib/apt/lists/partial" "$root/var/cache/apt/archives/partial"
    version=$(chroot "$root" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ $version != 3.11 ]]; then
        echo "build-base.sh: the base has Python $version, not 3.11" >&2
        exit 1
    fi
    echo "==> importing $(du -sh "$root" | cut -f1) as $IMAGE"
    tar --numeric-owner -C "$root" -c . |
        "$ENGINE" import --change "ENV PATH=$DEFAULT_PATH" --change "ENV LANG=C.UTF-8" \
            --change 'CMD ["/bin/bash"]' - "$IMAGE"
fi
echo "==> base image $IMAGE built in $((SECONDS - start)) s"
