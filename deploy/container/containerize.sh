#!/usr/bin/env bash
# `make containerize`: the OCI image of a Bento of the store (default: the newest kubesentiment),
# tagged kubesentiment:<Bento version> and kubesentiment:latest, with -onnx appended for
# FLAVOR=onnx (no torch). The base image is built first if the engine lacks it
# (deploy/container/build-base.sh).
#
# Settings (environment): CONTAINER_ENGINE (podman; docker needs BuildKit), FLAVOR (full|onnx),
# BENTO (kubesentiment:latest), IMAGE_NAME (kubesentiment), BASE_IMAGE, PY (.venv/bin/python),
# CA_BUNDLE (the CA certificates pip trusts during the build: /etc/ssl/certs/ca-certificates.crt;
# a build secret, never in the image), PIP_FIND_LINKS (folders of local wheels, e.g. a CPU
# build of torch), CONTAINER_BUILD_ARGS (more arguments for `build`, e.g. --no-cache).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ENGINE=${CONTAINER_ENGINE:-podman}
FLAVOR=${FLAVOR:-full}
BENTO=${BENTO:-kubesentiment:latest}
IMAGE_NAME=${IMAGE_NAME:-kubesentiment}
BASE_IMAGE=${BASE_IMAGE:-localhost/kubesentiment-base:bookworm}
PY=${PY:-.venv/bin/python}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
read -r -a extra_args <<<"${CONTAINER_BUILD_ARGS:-}"

case $FLAVOR in
    full) suffix="" ;;
    onnx) suffix="-onnx" ;;
    *)
        echo "containerize.sh: FLAVOR must be full or onnx, not '$FLAVOR'" >&2
        exit 2
        ;;
esac
[[ $ENGINE == docker ]] && export DOCKER_BUILDKIT=1 # --secret and --build-context need BuildKit

start=$SECONDS
BASE_IMAGE=$BASE_IMAGE CONTAINER_ENGINE=$ENGINE deploy/container/build-base.sh

stage=$(mktemp -d "${TMPDIR:-/tmp}/kubesentiment-containerize.XXXXXX")
trap 'rm -rf "$stage"' EXIT
echo "==> staging $BENTO with its models"
version=$("$PY" deploy/container/stage_bento.py "$BENTO" "$stage/bento")

# Local wheels for pip's --find-links: hard links where possible (nothing is copied then).
mkdir "$stage/wheels"
wheels=0
for dir in ${PIP_FIND_LINKS:-}; do
    [[ -d $dir ]] || continue
    for wheel in "$dir"/*.whl; do
        [[ -f $wheel ]] || continue
        ln "$wheel" "$stage/wheels/" 2>/dev/null || cp "$wheel" "$stage/wheels/"
        wheels=$((wheels + 1))
    done
done
echo "==> $wheels local wheel(s) for --find-links"
if [[ ! -f $CA_BUNDLE ]]; then
    echo "==> no CA bundle at $CA_BUNDLE: pip trusts its own certificates"
    CA_BUNDLE=$stage/no-ca-bundle
    : >"$CA_BUNDLE"
fi

tag=$IMAGE_NAME:$version$suffix
latest=$IMAGE_NAME:latest$suffix
echo "==> $ENGINE build $tag (FLAVOR=$FLAVOR, from $BASE_IMAGE)"
"$ENGINE" build \
    --file "$PWD/deploy/container/Containerfile" \
    --build-context "wheels=$stage/wheels" \
    --secret "id=cacert,src=$CA_BUNDLE" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "FLAVOR=$FLAVOR" \
    --label "io.kubesentiment.bento=kubesentiment:$version" \
    --tag "$tag" --tag "$latest" \
    "${extra_args[@]}" \
    "$stage/bento"

size=$("$ENGINE" image inspect --format '{{.Size}}' "$tag")
echo "==> $tag and $latest: $((size / 1000000)) MB, built in $((SECONDS - start)) s; largest layers:"
# Sizes as the engine prints them ("1.41 GB", "240MB"), in MB.
"$ENGINE" history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$tag" |
    awk -F '\t' '{
        size = $1; unit = $1; sub(/[ ]*[kKMG]?B$/, "", size); sub(/^[0-9.]+[ ]*/, "", unit)
        mb = size * (unit ~ /^G/ ? 1000 : unit ~ /^M/ ? 1 : unit ~ /^k/ ? 0.001 : 0.000001)
        step = $2; sub(/^\/bin\/sh -c (#\(nop\) )?/, "", step); gsub(/(dir|file):[0-9a-f]+ /, "", step)
        printf "%10.1f MB  %s\n", mb, substr(step, 1, 90)
    }' | sort -n -r | head -n 4
echo "==> run it: $ENGINE run --rm -p 127.0.0.1:3000:3000 $tag serve --host 0.0.0.0 --port 3000"
