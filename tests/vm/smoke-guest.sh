#!/bin/bash
# tests/vm/smoke-guest.sh — checks the VM tier's guest can do what vsfs's tests need.
# Runs INSIDE the guest:   tests/vm/run-vm.sh -- tests/vm/smoke-guest.sh
#
# Checks: udev ran (/dev/disk/by-id links by serial), LVM (linear and thin LVs on a test disk),
# /dev/fuse and a pyfuse3 mount from the host's venv, modprobe of nfsd/iscsi_tcp/target_core_mod,
# an NFSv4 export of a tmpfs mounted over 127.0.0.1, and a LIO iSCSI target (python3-rtslib-fb)
# logged into with open-iscsi. Prints "N passed, N failed"; exits non-zero if any check failed.
#
# Environment: VSFS_SMOKE_PY  Python with pyfuse3 (default: /work/main/.venv/bin/python, else
#              /tmp/venv/bin/python); VSFS_SMOKE_ONLY  space-separated subset of check names.
set -u
[ "${VSFS_VM:-}" = 1 ] || { echo "smoke-guest.sh: run me inside the VM (tests/vm/run-vm.sh -- $0)" >&2; exit 2; }

PASS=0 FAIL=0 FAILED=
t0() { date +%s%N; }
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
check() {   # check NAME FUNCTION
    case " ${VSFS_SMOKE_ONLY:-$1} " in *" $1 "*) ;; *) return ;; esac
    local s out rc
    s=$(t0)
    out=$("$2" 2>&1); rc=$?
    if [ $rc = 0 ]; then
        PASS=$((PASS + 1)); echo "PASS $1 ($(ms "$s") ms)"
    else
        FAIL=$((FAIL + 1)); FAILED="$FAILED $1"; echo "FAIL $1 ($(ms "$s") ms, exit $rc):"
    fi
    [ $rc = 0 ] && [ -z "${VSFS_SMOKE_VERBOSE:-}" ] || printf '%s\n' "$out" | sed 's/^/    /'
}

# The block device whose virtio serial is $1 (sysfs serial files have no trailing newline).
disk_by_serial() {
    local f s
    for f in /sys/block/*/serial; do
        [ -f "$f" ] || continue
        s=$(cat "$f")
        if [ "$s" = "$1" ]; then f=${f%/serial}; echo "/dev/${f##*/}"; return 0; fi
    done
    return 1
}

c_udev() {
    set -e
    test -d /dev/disk/by-id
    ls -l /dev/disk/by-id/
    local dev; dev=$(disk_by_serial VSFSDISK0)
    test "$(readlink -f /dev/disk/by-id/virtio-VSFSDISK0)" = "$dev"
    udevadm info --query=property --name="$dev" | grep -E '^(ID_SERIAL|DEVLINKS)='
}

c_lvm() {
    set -e
    local dev; dev=$(disk_by_serial VSFSDISK0)
    pvcreate -y -q "$dev"
    vgcreate -q vsfssmoke "$dev"
    lvcreate -y -q -L 16M -n lv0 vsfssmoke
    test -b /dev/vsfssmoke/lv0
    if [ -S /run/udev/control ]; then   # udevd runs (not with run-vm.sh --no-udev)
        udevadm settle
        test -e /dev/disk/by-id/dm-name-vsfssmoke-lv0
    fi
    lvcreate -y -q -L 64M -T vsfssmoke/pool
    lvcreate -y -q -V 256M -T vsfssmoke/pool -n thin0
    lvcreate -y -q -s -n snap0 vsfssmoke/thin0
    lvs --reportformat json -o lv_name,lv_size,segtype,pool_lv vsfssmoke
    vgremove -y -q -ff vsfssmoke
    pvremove -y -q "$dev"
}

c_fuse() {
    set -e
    test -c /dev/fuse
    local py=${VSFS_SMOKE_PY:-}
    if [ -z "$py" ]; then
        for py in /work/main/.venv/bin/python /tmp/venv/bin/python; do [ -x "$py" ] && break; done
    fi
    echo "python: $py"
    local mnt; mnt=$(mktemp -d)
    "$py" - "$mnt" <<'EOF' &
import errno, os, stat, sys
import pyfuse3, trio
DATA = b"hello from pyfuse3 in the VM\n"
class Hello(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode, e.st_size = stat.S_IFDIR | 0o755, 0
        elif inode == 2:
            e.st_mode, e.st_size = stat.S_IFREG | 0o644, len(DATA)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e.st_ino = inode
        return e
    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name != b"hello":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(2)
    async def opendir(self, inode, ctx):
        return inode
    async def readdir(self, fh, off, token):
        if off == 0:
            pyfuse3.readdir_reply(token, b"hello", await self.getattr(2), 1)
    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)
    async def read(self, fh, off, size):
        return DATA[off:off + size]
pyfuse3.init(Hello(), sys.argv[1], set(pyfuse3.default_options) | {"fsname=smoke"})
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=True)
EOF
    local pid=$! i
    for i in $(seq 200); do mountpoint -q "$mnt" && break; sleep 0.1; done
    grep -q hello "$mnt/hello"
    ls -l "$mnt"
    fusermount3 -u "$mnt"
    wait "$pid"
    rmdir "$mnt"
}

c_modules() {
    set -e
    local m
    for m in nfsd nfs iscsi_tcp target_core_mod iscsi_target_mod target_core_iblock target_core_file dm_thin_pool; do
        modprobe "$m"
    done
    lsmod | grep -E '^(nfsd|iscsi_tcp|target_core_mod|iscsi_target_mod) '
}

c_nfs() {
    set -e
    modprobe nfsd
    mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd
    mkdir -p /run/smoke-nfs /run/smoke-nfs-mnt /var/lib/nfs/v4recovery
    mount -t tmpfs smoke-nfs /run/smoke-nfs   # an overlay cannot be exported: a tmpfs can
    echo hi > /run/smoke-nfs/file
    : > /etc/exports
    exportfs -o rw,fsid=0,no_subtree_check,no_root_squash,insecure 127.0.0.1:/run/smoke-nfs
    rpc.mountd -N 3 --no-udp          # NFSv4 only: no rpcbind needed
    rpc.nfsd -N 3 -U 4
    mount -t nfs4 -o vers=4.2 127.0.0.1:/ /run/smoke-nfs-mnt
    grep -q hi /run/smoke-nfs-mnt/file
    echo there > /run/smoke-nfs-mnt/new
    grep -q there /run/smoke-nfs/new
    grep smoke-nfs-mnt /proc/mounts
    umount /run/smoke-nfs-mnt
    rpc.nfsd 0
    exportfs -ua
    umount /run/smoke-nfs
}

c_iscsi() {
    set -e
    local dev iqn=iqn.2003-01.org.example:vsfs-smoke
    dev=$(disk_by_serial VSFSDISK1)
    modprobe iscsi_target_mod; modprobe target_core_iblock; modprobe iscsi_tcp
    mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
    # rtslib imports only in Debian's /usr/bin/python3
    /usr/bin/python3 - "$dev" "$iqn" <<'EOF'
import sys
from rtslib_fb import BlockStorageObject, FabricModule, LUN, NetworkPortal, RTSRoot, Target, TPG
dev, iqn = sys.argv[1:]
RTSRoot()   # first: sets the dbroot before any storage object exists
so = BlockStorageObject("smoke0", dev=dev)
tpg = TPG(Target(FabricModule("iscsi"), iqn), 1)
tpg.enable = True
tpg.set_attribute("authentication", "0")
tpg.set_attribute("generate_node_acls", "1")
tpg.set_attribute("demo_mode_write_protect", "0")
LUN(tpg, 0, so)
NetworkPortal(tpg, "127.0.0.1", 3260)
EOF
    iscsid
    sleep 0.5
    iscsiadm -m discovery -t sendtargets -p 127.0.0.1:3260
    iscsiadm -m node -T "$iqn" -p 127.0.0.1:3260 --login
    udevadm settle
    local link=/dev/disk/by-path/ip-127.0.0.1:3260-iscsi-$iqn-lun-0 i
    for i in $(seq 50); do [ -e "$link" ] && break; sleep 0.2; done
    ls -l "$link"
    blockdev --getsize64 "$link"
    iscsiadm -m node -T "$iqn" -p 127.0.0.1:3260 --logout
    iscsiadm -m node -o delete
    /usr/bin/python3 -c 'from rtslib_fb import RTSRoot; RTSRoot().clear_existing(confirm=True)'
    iscsiadm -k 0 2>/dev/null || true
}

echo "smoke: kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime)s, disks:$(for f in /sys/block/*/serial; do printf ' %s=%s' "$(basename "$(dirname "$f")")" "$(cat "$f")"; done)"
check udev c_udev
check lvm c_lvm
check fuse c_fuse
check modules c_modules
check nfs c_nfs
check iscsi c_iscsi
echo "smoke: $PASS passed, $FAIL failed${FAILED:+ (failed:$FAILED)}"
[ "$FAIL" = 0 ]
