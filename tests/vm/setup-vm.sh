#!/usr/bin/env bash
# tests/vm/setup-vm.sh — prepare the VM test tier on this host (run as root; idempotent).
#
# What it does (see shared/design/TESTBED.md, "The VM tier"):
#   1. apt-get installs what the tier needs on the host: qemu-system-x86, busybox-static, kmod,
#      cpio, and for the guest's use (the guest runs the host's own / over 9p): udev, lvm2,
#      thin-provisioning-tools, open-iscsi, python3-rtslib-fb, nfs-kernel-server, nfs-common.
#      No daemon is started on the host by this: a policy-rc.d that forbids starts is in force
#      while installing, and any of the new packages' daemons found running afterwards that were
#      not running before are stopped (by PID); under systemd their units are also disabled.
#   2. `apt-get download`s the generic kernel that linux-image-amd64 depends on (not the cloud
#      kernel: it lacks 9p), unpacks it into $VSFS_VM_CACHE/kernel, runs depmod there, and
#      extracts the uncompressed vmlinux (booted through PVH, skipping decompression under TCG).
#   3. Builds $VSFS_VM_CACHE/initrd.img: static busybox, the modules needed before the host's
#      root is mounted, and /init (stage 1) plus /stage2 (PID 1 after switch_root).
#
# Environment:
#   VSFS_VM_CACHE   cache directory (default /var/cache/vsfs-vm); must be on the host's /
#                   filesystem tree, since the guest bind-mounts its modules from there.
#   VSFS_VM_FORCE=1 re-download and re-extract the kernel even if the cache looks current.
#
# Outputs in $VSFS_VM_CACHE: kernel/ (unpacked package), kver, vmlinux (or vmlinuz symlink),
# initrd.img, ready (stamp read by run-vm.sh).
set -euo pipefail

CACHE=${VSFS_VM_CACHE:-/var/cache/vsfs-vm}
HERE=$(cd "$(dirname "$0")" && pwd)

log() { printf 'setup-vm: %s\n' "$*" >&2; }
die() { printf 'setup-vm: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
case "$CACHE" in /*) ;; *) die "VSFS_VM_CACHE must be an absolute path" ;; esac

HOST_PKGS="qemu-system-x86 busybox-static kmod cpio"
GUEST_PKGS="udev lvm2 thin-provisioning-tools open-iscsi python3-rtslib-fb nfs-kernel-server nfs-common"
# Daemons these packages may start; checked before and after the install.
DAEMONS="rpcbind rpc.statd rpc.mountd rpc.idmapd rpc.gssd rpc.svcgssd nfsdcld blkmapd iscsid systemd-udevd udevd dmeventd lvmpolld"
UNITS="rpcbind.service rpcbind.socket nfs-server.service nfs-kernel-server.service nfs-mountd.service
  nfs-idmapd.service nfs-blkmap.service rpc-statd.service rpc-gssd.service nfs-client.target
  iscsid.service iscsid.socket open-iscsi.service lvm2-monitor.service lvm2-lvmpolld.socket
  dm-event.socket dm-event.service"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9   # one setup at a time (apt and the cache)

TMP=$(mktemp -d /tmp/vsfs-vm-setup.XXXXXX)
chmod 711 "$TMP"   # apt-get download runs as _apt and must reach $TMP/dl
POLICY_CREATED=
cleanup() {
    if [ -n "$POLICY_CREATED" ]; then rm -f /usr/sbin/policy-rc.d; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

daemon_pids() {
    local d
    for d in $DAEMONS; do pgrep -x "$d" 2>/dev/null || true; done | sort -u
}

# ---------------------------------------------------------------- 1. packages
missing=
for p in $HOST_PKGS $GUEST_PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing="$missing $p"
    fi
done
if [ -n "$missing" ]; then
    log "installing:$missing"
    daemon_pids > "$TMP/pids.before"
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# vsfs setup-vm.sh: no service starts while installing\nexit 101\n' \
            > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_CREATED=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # A stale or empty package list would make the install fail: update first.
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >"$TMP/apt.log" 2>&1 \
        || { cat "$TMP/apt.log" >&2; die "apt-get install failed"; }
    if [ -n "$POLICY_CREATED" ]; then rm -f /usr/sbin/policy-rc.d; POLICY_CREATED=; fi
    if [ -d /run/systemd/system ]; then
        # systemd host: disable (and stop) units of packages this run installed. Only those:
        # a host that already had one of these services keeps it as it was.
        for u in $UNITS; do
            pkg=$(dpkg -S "/lib/systemd/system/$u" 2>/dev/null | cut -d: -f1 || true)
            [ -n "$pkg" ] || continue
            case " $missing " in *" $pkg "*) ;; *) continue ;; esac
            systemctl disable --now "$u" >/dev/null 2>&1 || true
        done
    fi
    daemon_pids > "$TMP/pids.after"
    for pid in $(comm -13 "$TMP/pids.before" "$TMP/pids.after"); do
        log "stopping daemon started by the install: $(ps -o comm= -p "$pid" 2>/dev/null) (pid $pid)"
        kill "$pid" 2>/dev/null || true
    done
else
    log "packages already installed"
fi

[ -x /bin/busybox ] || die "/bin/busybox missing"
if ldd /bin/busybox >/dev/null 2>&1; then die "/bin/busybox is not static (busybox-static?)"; fi

# ---------------------------------------------------------------- 2. kernel
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kpkg" ]; then
    apt-get update -qq
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
            | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$kpkg" ] || die "cannot find the kernel package linux-image-amd64 depends on"
case "$kpkg" in *cloud*|*rt-*) die "unexpected kernel flavour $kpkg" ;; esac
kver=${kpkg#linux-image-}
kpkgver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')
want="$kpkg $kpkgver"

mkdir -p "$CACHE"
if [ "${VSFS_VM_FORCE:-0}" != 1 ] && [ -f "$CACHE/kernel.pkg" ] \
        && [ "$(cat "$CACHE/kernel.pkg")" = "$want" ] \
        && [ -f "$CACHE/kernel/boot/vmlinuz-$kver" ] \
        && [ -f "$CACHE/kernel/lib/modules/$kver/modules.dep" ]; then
    log "kernel $want already unpacked"
else
    log "downloading $want"
    rm -f "$CACHE/ready"
    mkdir -p "$TMP/dl"
    chmod 777 "$TMP/dl"   # apt-get download runs as _apt
    (cd "$TMP/dl" && apt-get download -qq "$kpkg")
    deb=$(ls "$TMP"/dl/*.deb)
    rm -rf "$CACHE/kernel.new" "$CACHE/kernel"
    mkdir "$CACHE/kernel.new"
    dpkg-deb -x "$deb" "$CACHE/kernel.new"
    # The package may put modules in lib/ or usr/lib/: make lib/modules the canonical place.
    if [ ! -d "$CACHE/kernel.new/lib/modules/$kver" ] && [ -d "$CACHE/kernel.new/usr/lib/modules/$kver" ]; then
        mkdir -p "$CACHE/kernel.new/lib/modules"
        mv "$CACHE/kernel.new/usr/lib/modules/$kver" "$CACHE/kernel.new/lib/modules/"
    fi
    depmod -b "$CACHE/kernel.new" "$kver"
    mv "$CACHE/kernel.new" "$CACHE/kernel"
    rm -f "$CACHE/vmlinux"
    echo "$want" > "$CACHE/kernel.pkg"
fi
echo "$kver" > "$CACHE/kver"

# Uncompressed vmlinux (an ELF with a PVH entry note: QEMU boots it directly, skipping the
# real-mode setup and the in-guest decompression, which are slow under TCG).
extract_vmlinux() {   # $1 = vmlinuz, $2 = output; like the kernel's scripts/extract-vmlinux
    local img=$1 out=$2 magic cmd pos
    # (magics without NUL bytes: the shell cannot hold them)
    for pair in '\3757zXZ:xz -dc' '\037\213\010:gzip -dc' '\002\041\114\030:lz4 -dc' \
                '(\265/\375:zstd -dc' 'BZh:bzip2 -dc'; do
        magic=${pair%%:*} cmd=${pair#*:}
        command -v "${cmd%% *}" >/dev/null 2>&1 || continue
        # every offset where the magic occurs
        for pos in $(LC_ALL=C grep -Fabo "$(printf "$magic")" "$img" 2>/dev/null | cut -d: -f1); do
            tail -c +"$((pos + 1))" "$img" | $cmd > "$out.tmp" 2>/dev/null || true
            if [ -s "$out.tmp" ] && [ "$(head -c 4 "$out.tmp" | od -An -c | tr -d ' ')" = '177ELF' ]; then
                mv "$out.tmp" "$out"
                return 0
            fi
        done
    done
    rm -f "$out.tmp"
    return 1
}
if [ ! -s "$CACHE/vmlinux" ] || [ -L "$CACHE/vmlinux" ]; then
    rm -f "$CACHE/vmlinux"
    if extract_vmlinux "$CACHE/kernel/boot/vmlinuz-$kver" "$CACHE/vmlinux"; then
        # QEMU boots an ELF kernel only through its PVH note (Xen ELF note type 18).
        if ! readelf -n "$CACHE/vmlinux" 2>/dev/null | grep -q '(0x00000012)'; then
            log "vmlinux has no PVH note: booting vmlinuz instead"
            rm -f "$CACHE/vmlinux"
        fi
    fi
    if [ ! -s "$CACHE/vmlinux" ]; then
        log "could not extract vmlinux; using the compressed vmlinuz"
        ln -sf "kernel/boot/vmlinuz-$kver" "$CACHE/vmlinux"
    fi
fi

# ---------------------------------------------------------------- 3. initramfs
# Modules needed before the host's root is reachable (the rest are loaded inside the guest from
# the cache, bind-mounted on /lib/modules/$kver).
EARLY_MODS="virtio_pci virtio_blk 9p 9pnet_virtio overlay fuse configfs loop"
IR="$TMP/initramfs"
mkdir -p "$IR"/{bin,dev,proc,sys,hostroot,newroot,rw,mods,vsfs-vm/bin}
cp /bin/busybox "$IR/bin/busybox"
cp /bin/busybox "$IR/vsfs-vm/bin/busybox"   # copied into the guest's root for stage2
for a in $(/bin/busybox --list); do
    [ "$a" = busybox ] && continue
    ln -s busybox "$IR/bin/$a"
    ln -s busybox "$IR/vsfs-vm/bin/$a"
done
: > "$IR/mods/order"
seen=" "
for m in $EARLY_MODS; do
    deps=$(modprobe -d "$CACHE/kernel" -S "$kver" --show-depends "$m") \
        || die "modprobe --show-depends $m failed"
    while read -r kind path _; do
        [ "$kind" = insmod ] || continue
        base=$(basename "$path")
        case "$seen" in *" $base "*) continue ;; esac
        seen="$seen$base "
        case "$base" in
            *.ko.xz)  xz -dc "$path" > "$IR/mods/${base%.xz}"; base=${base%.xz} ;;
            *.ko.zst) zstd -qdc "$path" > "$IR/mods/${base%.zst}"; base=${base%.zst} ;;
            *.ko.gz)  gzip -dc "$path" > "$IR/mods/${base%.gz}"; base=${base%.gz} ;;
            *)        cp "$path" "$IR/mods/$base" ;;
        esac
        echo "$base" >> "$IR/mods/order"
    done <<EOF
$deps
EOF
done

sed -e "s|@KVER@|$kver|g" -e "s|@CACHE@|$CACHE|g" "$HERE/guest-init.sh" > "$IR/init"
sed -e "s|@KVER@|$kver|g" -e "s|@CACHE@|$CACHE|g" "$HERE/guest-stage2.sh" > "$IR/vsfs-vm/stage2"
chmod 755 "$IR/init" "$IR/vsfs-vm/stage2"

# Uncompressed: unpacking it is faster under TCG than decompressing it.
(cd "$IR" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$CACHE/initrd.img.new"
mv "$CACHE/initrd.img.new" "$CACHE/initrd.img"
echo "$kver" > "$CACHE/ready"
log "ready: kernel $kver ($(readlink -f "$CACHE/vmlinux")), initrd $(du -h "$CACHE/initrd.img" | cut -f1), modules: $(tr '\n' ' ' < "$IR/mods/order")"
