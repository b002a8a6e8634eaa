#!/usr/bin/env bash
# Locate (or download into a cache) the ONNX Runtime C API headers.
#
# Usage: fetch_ort_headers.sh CACHE_DIR
# Prints the directory that holds onnxruntime_c_api.h as the last line of stdout.
#
# Order: an installed libonnxruntime-dev (Debian 13+), then CACHE_DIR, then a
# download of Debian trixie's libonnxruntime-dev .deb from the Debian mirror
# this machine's apt is already configured with (read from `apt-cache policy`;
# no host name is hard-coded here), unpacked with `dpkg -x` into CACHE_DIR.
set -euo pipefail

cache=${1:?usage: fetch_ort_headers.sh CACHE_DIR}
suite=${NBSMT_ORT_DEB_SUITE:-trixie}
hdr=onnxruntime_c_api.h

die() { echo "fetch_ort_headers: $*" >&2; exit 1; }

if [ -f /usr/include/onnxruntime/$hdr ]; then
  echo /usr/include/onnxruntime
  exit 0
fi

cached=$(ls -d "$cache"/*/usr/include/onnxruntime 2>/dev/null | sort -V | tail -n 1 || true)
if [ -n "$cached" ] && [ -f "$cached/$hdr" ]; then
  echo "$cached"
  exit 0
fi

command -v apt-get >/dev/null && command -v dpkg >/dev/null \
  || die "apt-get/dpkg not found; set ORT_INCLUDE_DIR to a directory containing $hdr"

debian_mirror() {
  # `apt-cache policy` prints a URI line followed by its release line; keep the
  # URI of the main Debian archive (origin and label "Debian", not -Security).
  apt-cache policy 2>/dev/null | awk '
    /^ *[0-9]+ (https?|file):/ { uri=$2; next }
    /release / && /o=Debian,/ && /l=Debian,/ && uri != "" { print uri; exit }
    { uri="" }'
}

mirror=$(debian_mirror)
if [ -z "$mirror" ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq >/dev/null 2>&1 || true
  mirror=$(debian_mirror)
fi
[ -n "$mirror" ] || die "no Debian mirror in this machine's apt sources (run 'apt-get update' first), or set ORT_INCLUDE_DIR"

keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || die "$keyring missing (apt-get install debian-archive-keyring), or set ORT_INCLUDE_DIR"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/etc" "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
cat > "$work/etc/nbsmt-ort.sources" <<SRC
Types: deb
URIs: $mirror
Suites: $suite
Components: main
Signed-By: $keyring
SRC
apt_opts=(-o "Dir::Etc::sourcelist=/dev/null" -o "Dir::Etc::sourceparts=$work/etc"
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
          -o "Dir::State::status=/dev/null" -o "APT::Sandbox::User=root" -qq)
apt-get "${apt_opts[@]}" update >&2 || die "apt-get update against $mirror $suite failed; set ORT_INCLUDE_DIR"
( cd "$work/deb" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >&2 ) \
  || die "apt-get download libonnxruntime-dev ($suite) failed; set ORT_INCLUDE_DIR"
deb=$(ls "$work"/deb/libonnxruntime-dev_*.deb | head -n 1)
ver=$(dpkg-deb -f "$deb" Version)
dest="$cache/$ver"
mkdir -p "$cache"
rm -rf "$dest.tmp"
dpkg -x "$deb" "$dest.tmp"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
[ -f "$dest/usr/include/onnxruntime/$hdr" ] || die "$deb has no $hdr"
echo "$dest/usr/include/onnxruntime"
