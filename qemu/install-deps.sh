#!/bin/bash
# Idempotent installer for everything sanblk's build and tests need on a fresh Debian 12
# machine: runs apt/cargo/rustup only for what is missing.
set -euo pipefail

packages=(
    linux-source-6.12 clang lld llvm libclang-dev flex bison bc libelf-dev libssl-dev cpio kmod
    qemu-system-x86 qemu-utils busybox-static fio nbdkit nbd-client dmsetup e2fsprogs iproute2 util-linux
    pkg-config libblkid-dev btrfs-progs
)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# The 6.12 kernel wants bindgen >= 0.65.1; Debian 12 ships 0.60.
bindgen_ok=0
if command -v bindgen >/dev/null; then
    version=$(bindgen --version | awk '{print $2}')
    if printf '0.65.1\n%s\n' "$version" | sort -V -C; then bindgen_ok=1; fi
fi
if [ "$bindgen_ok" = 0 ]; then
    echo "deps: cargo install bindgen-cli (about 2 minutes)" >&2
    cargo install --locked bindgen-cli >&2
fi

for component in rust-src clippy rustfmt; do
    rustup component list --installed | grep -q "^$component" || rustup component add "$component" >&2
done
