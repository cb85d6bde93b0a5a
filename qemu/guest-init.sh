#!/bin/sh
# PID 1 of a sanblk QEMU test guest (see tests/src/vm.rs for the host side).
#
# The guest boots on the host's root filesystem, shared read-only over 9p, so every host
# binary is available at its host path. The host also shares the run's log directory
# read-write (9p tag $SANBLK_OUT_TAG); the harness writes the test script (and env.sh) there,
# and the script can leave files there for the host test to read.
#
# Kernel command-line parameters of the form KEY=value that the kernel does not know reach
# this script as environment variables:
#   SANBLK_OUT_TAG  9p mount tag of the out share          (default: sanblkout)
#   SANBLK_OUT      where to mount it in the guest          (default: /run/sanblk-out)
#   SANBLK_SCRIPT   script to run, relative to SANBLK_OUT   (default: script.sh)
#   SANBLK_SCRATCH_TAG, SANBLK_SCRATCH   9p tag and host path of the scratch dirs (optional)
#
# The outcome is reported as a kernel log line `SANBLK-GUEST-EXIT: <rc>`, written through
# /dev/kmsg: printk writes to the serial console synchronously, whereas tty output may still
# be queued when the guest reboots, which could truncate the line. Then the guest reboots at
# once; QEMU runs with -no-reboot, so that ends QEMU.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/tmp
DM_DISABLE_UDEV=1
export PATH HOME DM_DISABLE_UDEV

out_tag=${SANBLK_OUT_TAG:-sanblkout}
SANBLK_OUT=${SANBLK_OUT:-/run/sanblk-out}
script_name=${SANBLK_SCRIPT:-script.sh}
export SANBLK_OUT

log() {
    # Kernel log when possible (timestamped, synchronous to the console), else the console.
    if [ -w /dev/kmsg ]; then
        echo "$*" > /dev/kmsg
    else
        echo "$*"
    fi
}

finish() {
    log "SANBLK-GUEST-EXIT: $1"
    $bb sync
    # Immediate reboot; -no-reboot turns it into QEMU exiting. No ACPI, so no poweroff.
    echo b > /proc/sysrq-trigger 2>/dev/null
    $bb reboot -f
    # PID 1 must never exit (that panics the kernel); wait for the reset.
    while :; do $bb sleep 60; done
}

# Init's own tools come from the static busybox: every dynamically linked host binary pays for
# loading its libraries over 9p under TCG+KASAN (~0.2 s per exec at boot).
bb=/bin/busybox

is_mounted() { # mount-point; reads /proc/mounts with shell builtins only
    while read -r _ mnt _; do
        [ "$mnt" = "$1" ] && return 0
    done < /proc/mounts
    return 1
}

mount_fs() { # type source target [options]
    is_mounted "$3" && return 0
    $bb mount -t "$1" ${4:+-o "$4"} "$2" "$3"
}

# The root share exports the host's whole tree, submounts included: until the guest mounts its
# own, /proc, /sys and /run show the HOST's files. So mount proc and sysfs unconditionally
# (first, since is_mounted reads the guest's /proc/mounts). The kernel has usually mounted
# devtmpfs on /dev already (CONFIG_DEVTMPFS_MOUNT).
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
mount_fs devtmpfs devtmpfs /dev
# The repository (module, binaries, test scratch files) may itself live under /tmp, /run or
# /var/tmp on the host (CI clones wherever it likes). Those get the guest's own tmpfs, so keep
# the repository visible at its host path: bind it aside first, then move it back on top.
repo_aside=
case "$SANBLK_REPO" in
    /tmp/*|/run/*|/var/tmp/*)
        $bb mount -t tmpfs -o mode=0700 tmpfs /mnt
        $bb mkdir -p /mnt/repo
        $bb mount -o bind "$SANBLK_REPO" /mnt/repo && repo_aside=/mnt/repo
        ;;
esac
for dir in /tmp /run /var/tmp; do
    mount_fs tmpfs tmpfs "$dir" mode=1777
done
if [ -n "$repo_aside" ]; then
    $bb mkdir -p "$SANBLK_REPO"
    $bb mount -o bind "$repo_aside" "$SANBLK_REPO"
fi
p9_options=trans=virtio,version=9p2000.L,msize=262144
$bb mkdir -p "$SANBLK_OUT"
if ! mount_fs 9p "$out_tag" "$SANBLK_OUT" "$p9_options"; then
    log "sanblk-guest-init: cannot mount out share '$out_tag' at $SANBLK_OUT"
    finish 126
fi
# The root share is cached (cache=loose in rootflags); the scratch dirs the host writes into
# while the guest runs come over their own uncached share, mounted over their host path (after
# the repository, which holds them, is in place).
if [ -n "$SANBLK_SCRATCH_TAG" ] && [ -n "$SANBLK_SCRATCH" ]; then
    if ! mount_fs 9p "$SANBLK_SCRATCH_TAG" "$SANBLK_SCRATCH" "$p9_options,ro"; then
        log "sanblk-guest-init: cannot mount scratch share '$SANBLK_SCRATCH_TAG' at $SANBLK_SCRATCH"
        finish 126
    fi
fi

# Static networking matching QEMU user networking (restrict=on: only guestfwd targets such as
# 10.0.2.100 are reachable).
$bb ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    $bb ip addr add 10.0.2.15/24 dev eth0 && $bb ip link set eth0 up
fi

if [ -f "$SANBLK_OUT/env.sh" ]; then
    . "$SANBLK_OUT/env.sh"
fi

script="$SANBLK_OUT/$script_name"
if [ ! -f "$script" ]; then
    log "sanblk-guest-init: test script $script is missing"
    finish 127
fi

cd "$SANBLK_OUT" || finish 126
log "SANBLK-GUEST-START: $script"
sh "$script" < /dev/null
rc=$?
cd /
finish "$rc"
