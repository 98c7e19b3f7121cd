#!/usr/bin/env bash
# Make a Debian bookworm base image (python3 + pip + venv) for hosts that can
# reach a Debian mirror but no container registry: debootstrap a minimal
# rootfs and `docker import` it.
#
#   deploy/churn/base-image.sh [TAG]        (default TAG: collnet-base:bookworm)
#
# Env: DEBIAN_MIRROR (default: the first deb.debian.org-style URI in apt's
# sources), COLLNET_ROOTFS_DIR (scratch folder, default /var/tmp).
# Does nothing when TAG already exists (delete it with `docker rmi` to rebuild).
set -euo pipefail

tag="${1:-collnet-base:bookworm}"

die() { echo "base-image: error: $*" >&2; exit 1; }

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base-image: $tag exists"
  exit 0
fi

command -v debootstrap >/dev/null || die "debootstrap not installed (apt-get install -y debootstrap)"
[ "$(id -u)" = 0 ] || die "debootstrap needs root"

mirror_from_apt() {
  # deb822 sources (URIs: ...) first, then one-line sources (deb URI suite ...).
  local uri
  uri="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
          | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
  if [ -z "$uri" ]; then
    uri="$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '{for (i = 2; i <= NF; i++) if ($i !~ /^\[/) {print $i; break}}' \
            | grep -E '/debian/?$' | head -n1 || true)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

mirror="${DEBIAN_MIRROR:-$(mirror_from_apt)}"
scratch="$(mktemp -d "${COLLNET_ROOTFS_DIR:-/var/tmp}/collnet-rootfs.XXXXXX")"
cleanup() { rm -rf --one-file-system "$scratch"; }
trap cleanup EXIT

echo "base-image: debootstrap bookworm from $mirror (a few minutes)"
start=$SECONDS
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$scratch/rootfs" "$mirror" > "$scratch/debootstrap.log" 2>&1 \
  || { tail -n 30 "$scratch/debootstrap.log" >&2; die "debootstrap failed (log above)"; }

# The rootfs keeps the mirror it was made from, so `apt-get` in a Dockerfile
# RUN reaches the same mirror. Trim what an image does not need.
echo "deb $mirror bookworm main" > "$scratch/rootfs/etc/apt/sources.list"
rm -rf "$scratch/rootfs/var/cache/apt/archives/"*.deb "$scratch/rootfs/var/lib/apt/lists/"* \
       "$scratch/rootfs/usr/share/doc/"* "$scratch/rootfs/usr/share/man/"*

tar -C "$scratch/rootfs" --numeric-owner -c . \
  | docker import \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["/bin/bash"]' \
      - "$tag" >/dev/null
echo "base-image: built $tag in $((SECONDS - start)) s"
