#!/bin/bash
# Build the sanblk guest kernel (Rust-enabled 6.12) from Debian's linux-source-6.12, cached
# outside the work tree so fresh clones reuse it.
#   build-kernel.sh [debug]   the test kernel: kernel.config (KASAN, lockdep, ...)
#   build-kernel.sh bench     kernel.config without its debug section + kernel-bench.config
# The cache key covers the source package version, the config fragment and RECIPE; bump
# RECIPE whenever a change to this script changes what gets built.
# Prints the kernel build directory (usable as KDIR) on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tarball=/usr/src/linux-source-6.12.tar.xz
flavour=${1:-debug}
[ -f "$tarball" ] || { echo "missing $tarball: run 'make deps'" >&2; exit 1; }

RECIPE=2
pkg_version=$(dpkg-query -W -f='${Version}' linux-source-6.12)
fragment=$(mktemp)
trap 'rm -f "$fragment"' EXIT
case "$flavour" in
    debug)
        cp "$here/kernel.config" "$fragment"
        key_extra=""
        ;;
    bench)
        { sed '/^# Debug flavour/,$d' "$here/kernel.config"; cat "$here/kernel-bench.config"; } > "$fragment"
        key_extra="flavour bench"
        ;;
    *)
        echo "usage: $0 [debug|bench]" >&2
        exit 2
        ;;
esac
# The debug key is computed exactly as before flavours existed, so its cache stays valid.
key=$( { echo "$pkg_version"; echo "recipe $RECIPE"; [ -z "$key_extra" ] || echo "$key_extra"; cat "$fragment"; } | sha256sum | cut -c1-16)
cache_root=${SANBLK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sanblk}
dir="$cache_root/kernel-$key"
tree="$dir/linux-source-6.12"
mkdir -p "$cache_root"
# Serialise concurrent builders (parallel make targets, two test runs).
exec 9>"$cache_root/kernel-$key.lock"
flock 9

if [ -f "$dir/.built" ]; then
    echo "kernel: cached build $key ($pkg_version)" >&2
    echo "$tree"
    exit 0
fi

echo "kernel: building $key ($pkg_version) in $dir; about 10 minutes on 2 cores" >&2
rm -rf "$dir"
mkdir -p "$dir"
tar -C "$dir" -xf "$tarball"
cd "$tree"
# 6.12's Rust bindings leave out generic netlink; with its header the module reads a request's
# command and attributes from `struct genl_info` itself instead of through C field accessors.
sed -i 's|^#include <linux/workqueue.h>$|&\n#include <net/genetlink.h>|' rust/bindings/bindings_helper.h
grep -q '^#include <net/genetlink.h>$' rust/bindings/bindings_helper.h
make -s LLVM=1 tinyconfig >/dev/null
./scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
make -s LLVM=1 olddefconfig >/dev/null
# merge_config silently drops options whose dependencies fail; the build must not.
missing=0
while IFS= read -r line; do
    case "$line" in CONFIG_*=y)
        grep -qx "$line" .config || { echo "kernel: option not satisfied: $line" >&2; missing=1; } ;;
    esac
done < "$fragment"
if [ "$missing" != 0 ]; then
    make -s LLVM=1 rustavailable >&2 || true
    exit 1
fi
jobs=$(( $(nproc) + 1 ))
make -s LLVM=1 -j"$jobs" bzImage modules >&2
touch "$dir/.built"
echo "kernel: built $tree/arch/x86/boot/bzImage" >&2
echo "$tree"
