#!/usr/bin/env bash
# Builds rlhf-mesh:<version>-cpu (or -gpu) into the local container storage: `make images`.
#
#   deploy/docker/build-images.sh [cpu|gpu]
#
# With a Docker or Podman engine: `docker build` of deploy/docker/Dockerfile as it is. Without one
# (buildah, as root): `buildah build --isolation chroot`, and where the Dockerfile's public base
# image cannot be pulled, a local base of the same Python is made from Debian's packages
# (debootstrap bookworm with python3.11 and libnuma1) and passed as BASE. The packages of
# requirements/lock.txt are downloaded by this machine's pip (its own index settings) into
# build/wheels, mounted into the build and installed from there with --no-index: the image holds
# exactly the lock.
# Prints the image's size. Environment: DEBIAN_MIRROR (the Debian mirror debootstrap uses).
set -euo pipefail
cd "$(dirname "$0")/../.."

kind=${1:-cpu}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
image="rlhf-mesh:${version}-${kind}"
dockerfile=deploy/docker/Dockerfile
[ "$kind" = gpu ] && dockerfile=deploy/docker/Dockerfile.gpu
python=${PYTHON:-.venv/bin/python}

if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  docker build -f "$dockerfile" -t "$image" .
  docker image ls "$image"
  exit 0
fi
if ! command -v buildah >/dev/null; then
  echo "no Docker engine and no buildah: apt-get install buildah debootstrap (as root), or build on a Docker machine" >&2
  exit 1
fi
export BUILDAH_ISOLATION=chroot

# The Dockerfile's base (its ARG BASE), or a local one with the same Python where it cannot be pulled.
public_base=$(sed -n 's/^ARG BASE=//p' "$dockerfile" | head -1)
local_base="localhost/rlhf-mesh-base:bookworm-python3.11"
build_args=()
if timeout 30 buildah pull --quiet "$public_base" >/dev/null 2>&1; then
  echo "base: $public_base"
else
  if ! buildah inspect --type image "$local_base" >/dev/null 2>&1; then
    echo "base: $public_base cannot be pulled here; building $local_base from Debian's packages"
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3.11,python3-venv,ca-certificates,libnuma1 bookworm "$rootfs/root" \
      "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$rootfs/debootstrap.log" \
      || { tail -20 "$rootfs/debootstrap.log" >&2; exit 1; }
    # What a slim image leaves out: package lists and caches, documentation, locales.
    rm -rf "$rootfs"/root/var/lib/apt/lists/* "$rootfs"/root/var/cache/apt/* "$rootfs"/root/usr/share/doc/* \
      "$rootfs"/root/usr/share/man/* "$rootfs"/root/usr/share/info/* "$rootfs"/root/usr/share/locale/* \
      "$rootfs"/root/var/log/*.log
    container=$(buildah from scratch)
    cp -a "$rootfs/root/." "$(buildah mount "$container")/"
    buildah umount "$container" >/dev/null
    buildah config --env LANG=C.UTF-8 --cmd python3 "$container"
    buildah commit --quiet --rm "$container" "$local_base" >/dev/null
  fi
  echo "base: $local_base"
  build_args=(--build-arg BASE="$local_base" --build-arg PYTHON=python3.11)
fi

if [ "$kind" = cpu ]; then  # the lock's wheels as this machine's pip finds them (a CPU torch where it lies on disk)
  mkdir -p build/wheels
  "$python" -m pip download --quiet --no-deps --only-binary=:all: -r requirements/lock.txt -d build/wheels \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  build_args+=(--build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels --volume "$PWD/build/wheels:/wheels:ro")
fi
if [ "$kind" = gpu ] && [ -n "${PIP_CERT:-}" ]; then  # the CA this machine's pip trusts (a proxy's, say)
  build_args+=(--build-arg PIP_CERT=/etc/pip-ca.crt --volume "$PIP_CERT:/etc/pip-ca.crt:ro")
fi
buildah build --quiet --layers "${build_args[@]}" -f "$dockerfile" -t "$image" . >/dev/null
echo "built $image ($(buildah images --format '{{.Size}}' "$image" | head -1))"
