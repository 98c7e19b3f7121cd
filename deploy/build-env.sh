#!/bin/sh
# Used only while building the images: run a command (pip) with the pip
# settings that were passed as build arguments, dropping the ones passed empty
# (compose passes every argument it lists; pip rejects an empty PIP_NO_INDEX
# and would use an empty index URL).
#   collnet-build-env /opt/collnet/bin/pip install ...
set -eu
for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_NO_INDEX; do
  eval "value=\${$name:-}"
  # shellcheck disable=SC2154  # assigned by the eval above
  [ -n "$value" ] || unset "$name"
done
exec "$@"
