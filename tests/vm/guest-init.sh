#!/bin/busybox sh
# Stage 1 of the vsfs test VM: /init of the initramfs that tests/vm/setup-vm.sh builds
# (@KVER@ and @CACHE@ are filled in by setup-vm.sh). Runs under the initramfs' static busybox.
#
#  - loads the early modules (virtio, 9p, overlay, fuse, configfs, loop) listed in /mods/order
#  - mounts the host's / read-only over 9p (tag hostroot) with a tmpfs overlay on top: /newroot
#  - bind-mounts the kernel's modules from the host's cache on /lib/modules/@KVER@
#  - mounts the read-write 9p share "results" (if QEMU offers it) on /vsfs-results
#  - moves /dev /proc /sys into the new root and switch_roots to /stage2 (tests/vm/guest-stage2.sh)
#
# Kernel command line parameters read here:
#   vsfs.p9cache=loose|mmap|none  9p cache mode for the host root (default loose: the host's files
#                                 are taken not to change while the guest runs)
#   vsfs.rwsize=SIZE              size limit of the overlay's tmpfs (default 32g: only a limit,
#                                 pages are used as written, so sparse files of many GiB fit;
#                                 really writing more than the guest's RAM kills processes)
#   vsfs.debug=1                  trace this script on the console
export PATH=/bin
KVER=@KVER@
CACHE=@CACHE@

mount -t devtmpfs devtmpfs /dev 2>/dev/null || mount -t tmpfs -o mode=755 dev /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys

fail() {
    echo "vsfs-vm init: FATAL: $*" > /dev/console
    echo "vsfs-vm init: dropping to a shell; exit it to power off" > /dev/console
    setsid -c sh -i < /dev/console > /dev/console 2>&1
    echo o > /proc/sysrq-trigger
    sleep 10
}

P9CACHE=loose
RWSIZE=32g
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vsfs.p9cache=*) P9CACHE=${arg#vsfs.p9cache=} ;;
        vsfs.rwsize=*) RWSIZE=${arg#vsfs.rwsize=} ;;
        vsfs.debug=1) set -x ;;
    esac
done

while read -r m; do
    insmod "/mods/$m" 2>/dev/null   # "File exists" for built-ins/already loaded: fine
done < /mods/order

# 9p over virtio: msize up to 512 KiB cuts round trips for large reads.
P9OPTS=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$P9OPTS,ro,cache=$P9CACHE" hostroot /hostroot \
    || fail "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o "mode=755,size=$RWSIZE" rw /rw || fail "tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/hostroot,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the overlay root"

# Modules for modprobe in the guest (/lib is a symlink to usr/lib on Debian 12: mkdir follows it).
if [ -d "/hostroot$CACHE/kernel/lib/modules/$KVER" ]; then
    mkdir -p "/newroot/lib/modules/$KVER"
    mount -o bind "/hostroot$CACHE/kernel/lib/modules/$KVER" "/newroot/lib/modules/$KVER"
else
    echo "vsfs-vm init: warning: no modules at $CACHE/kernel/lib/modules/$KVER" > /dev/console
fi

# The results share, if QEMU has one (read-write; the only way back to the host).
mkdir -p /newroot/vsfs-results
for t in /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag; do
    [ -f "$t" ] || continue
    if [ "$(cat "$t" | tr -d '\0')" = results ]; then
        mount -t 9p -o "$P9OPTS,cache=none" results /newroot/vsfs-results \
            || echo "vsfs-vm init: warning: cannot mount the results share" > /dev/console
    fi
done

# Stage 2 and a static busybox for it, in the overlay's RAM layer.
# (/vsfs-vm holds a copy of busybox, its applet links and stage2, made by setup-vm.sh)
cp -a /vsfs-vm /newroot/.vsfs-vm

mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
# Stage 2 runs under the host's /bin/sh (busybox sh would prefer its own applets to the host's
# tools); busybox only if the host has none.
SH=/.vsfs-vm/bin/sh
[ -x /newroot/bin/sh ] && SH=/bin/sh
exec switch_root /newroot "$SH" /.vsfs-vm/stage2
