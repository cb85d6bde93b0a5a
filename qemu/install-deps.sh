#!/bin/bash
# Idempotent installer for everything sanblk's build and tests need on a fresh Debian 12
# machine: runs apt/cargo/rustup only for what is missing.
set -euo pipefail

packages=(
    linux-source-6.12 clang lld llvm libclang-dev flex bison bc libelf-dev libssl-dev cpio kmod
    qemu-system-x86 qemu-utils busybox-static fio nbdkit nbd-client libnbd-bin dmsetup e2fsprogs
    iproute2 util-linux
    pkg-config libblkid-dev btrfs-progs
)
find_missing() {
    missing=()
    for pkg in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
}
# Twice: installing one package can remove another that was there before. A machine with
# qemu-utils from bookworm-backports (10.x) loses it when qemu-system-x86 (7.2, bookworm)
# comes in, as the two versions' common files conflict; the second pass installs bookworm's.
for pass in 1 2; do
    find_missing
    [ ${#missing[@]} -eq 0 ] && break
    echo "deps: installing ${missing[*]}" >&2
    [ "$pass" = 1 ] && apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
done
find_missing
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: still missing after installing: ${missing[*]}" >&2
    exit 1
fi
for tool in qemu-system-x86_64 qemu-img qemu-nbd nbd-client nbdcopy fio dmsetup busybox; do
    command -v "$tool" >/dev/null || { echo "deps: $tool not found after installing" >&2; exit 1; }
done

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

# `make test` schedules every test of the workspace on one queue (test priorities: 0.9.91).
nextest_ok=0
if version=$(cargo nextest --version 2>/dev/null | awk 'NR == 1 {print $2}') && [ -n "$version" ]; then
    if printf '0.9.91\n%s\n' "$version" | sort -V -C; then nextest_ok=1; fi
fi
if [ "$nextest_ok" = 0 ]; then
    echo "deps: cargo install cargo-nextest (about 4 minutes)" >&2
    cargo install --locked cargo-nextest >&2
fi

for component in rust-src clippy rustfmt; do
    rustup component list --installed | grep -q "^$component" || rustup component add "$component" >&2
done
