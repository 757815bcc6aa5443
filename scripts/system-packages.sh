#!/usr/bin/env bash
# Debian packages the test suite needs beyond Python's: bubblewrap, so that the sandbox's bwrap
# backend runs (and is tested) beside unshare. Needs root; a machine that has them is left as is.
set -euo pipefail
PACKAGES=(bubblewrap)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0
if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "system-packages: missing ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -q
apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
