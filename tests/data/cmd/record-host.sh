#!/usr/bin/env bash
# Records the outside commands' output that tests/test_parsers.py reads, on this host (root).
# Usage: bash tests/data/cmd/record-host.sh   (from the checkout; rewrites the files it records)
# Needs qemu-utils, parted, util-linux, lvm2 (pvs/vgs work without device-mapper), tgt and
# libiscsi-bin. Loop devices come from `losetup -f --show` and are detached again.
set -euo pipefail
export LC_ALL=C
OUT=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d /tmp/vsfs-record.XXXXXX)
LOOPS=()
TGTD=
cleanup() {
    for l in "${LOOPS[@]}"; do partx -d "$l" 2>/dev/null || true; losetup -d "$l" || true; done
    if [ -n "$TGTD" ]; then  # tgtd ignores SIGTERM while it has targets
        kill -9 "$TGTD" 2>/dev/null || true; wait "$TGTD" 2>/dev/null || true
    fi
    umount "$W/with space" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$OUT"/{qemu-img,parted,wipefs,losetup,mountinfo,lvm,iscsi-ls,iscsi-readcapacity16}

# ---- qemu-img info / map (--output=json), as dir.py runs them
cd "$W"
qemu-img create -q -f raw raw.img 10M
qemu-img create -q -f qcow2 plain.qcow2 1G
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=65536 old.qcow2 64M
qemu-img create -q -f qcow2 -o lazy_refcounts=on,cluster_size=2097152 lazy.qcow2 100M
qemu-img create -q -f qcow2 -b "$W/plain.qcow2" -F qcow2 overlay.qcow2
qemu-img create -q -f qcow2 -b raw.img -F raw relative.qcow2 20M
for f in vmdk vpc vdi qed; do qemu-img create -q -f $f img.$f 50M; done
qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 32M 64k' old.qcow2 >/dev/null
info() { qemu-img info -U --output=json "$1" | sed "s|$W/|/var/lib/vsfs/pool/|g"; }
info raw.img > "$OUT/qemu-img/info-raw.json"
info plain.qcow2 > "$OUT/qemu-img/info-qcow2.json"
info old.qcow2 > "$OUT/qemu-img/info-qcow2-compat010.json"
info lazy.qcow2 > "$OUT/qemu-img/info-qcow2-lazy.json"
info overlay.qcow2 > "$OUT/qemu-img/info-overlay-absolute.json"
info relative.qcow2 > "$OUT/qemu-img/info-overlay-relative.json"
for f in vmdk vpc vdi qed; do info img.$f > "$OUT/qemu-img/info-$f.json"; done
qemu-img info -U --output=json nonexistent.qcow2 2> "$OUT/qemu-img/info-missing.stderr.txt" \
    || true
sed -i "s|$W/||g" "$OUT/qemu-img/info-missing.stderr.txt"
qemu-img map -U --output=json -f qcow2 old.qcow2 > "$OUT/qemu-img/map-qcow2.json"
qemu-img map -U --output=json -f qcow2 plain.qcow2 > "$OUT/qemu-img/map-qcow2-empty.json"

# ---- parted -s -m DEV unit B print free, as disk.py runs it
truncate -s 64M gpt.img msdos.img blank.img
parted -s gpt.img mklabel gpt mkpart data 1MiB 9MiB mkpart '"my disk"' 9MiB 25MiB \
    mkpart last 40MiB 63MiB
parted -s msdos.img mklabel msdos mkpart primary 1MiB 17MiB mkpart primary 17MiB 33MiB
parted -s -m gpt.img unit B print free > "$OUT/parted/file-gpt.txt"
parted -s -m msdos.img unit B print free > "$OUT/parted/file-msdos.txt"
parted -s -m blank.img unit B print free > "$OUT/parted/file-nolabel.stdout.txt" \
    2> "$OUT/parted/file-nolabel.stderr.txt" || true
truncate -s 64M empty-gpt.img && parted -s empty-gpt.img mklabel gpt
parted -s -m empty-gpt.img unit B print free > "$OUT/parted/file-gpt-empty.txt"
sed -i "s|$W/|/tmp/rec/|" "$OUT"/parted/file-*
LOOP=$(losetup -f --show gpt.img); LOOPS+=("$LOOP")
parted -s -m "$LOOP" unit B print free > "$OUT/parted/loop-gpt.txt"

# ---- wipefs --no-act --json, losetup --associated (blockdev.py)
mkfs.ext4 -q -F fs.img 32M 2>/dev/null || { truncate -s 32M fs.img; mkfs.ext4 -q -F fs.img; }
wipefs --no-act --json gpt.img > "$OUT/wipefs/gpt.json"
wipefs --no-act --json fs.img > "$OUT/wipefs/ext4.json"
wipefs --no-act --json blank.img > "$OUT/wipefs/blank.json"
L2=$(losetup -f --show gpt.img); LOOPS+=("$L2")
losetup --associated "$W/gpt.img" --output NAME --noheadings > "$OUT/losetup/associated-two.txt"
losetup --associated "$W/blank.img" --output NAME --noheadings > "$OUT/losetup/associated-none.txt"

# ---- /proc/self/mountinfo, with a mount point holding a space (\040)
mkdir -p "$W/with space"
mount -t tmpfs -o size=1m vsfs-record "$W/with space"
sed "s|$W/|/tmp/rec/|g" /proc/self/mountinfo > "$OUT/mountinfo/host.txt"
umount "$W/with space"

# ---- LVM reports: pvcreate/vgcreate work here, lvcreate needs device-mapper (the guest)
truncate -s 64M pv1.img pv2.img
P1=$(losetup -f --show pv1.img); LOOPS+=("$P1")
P2=$(losetup -f --show pv2.img); LOOPS+=("$P2")
LVMCONF='devices{obtain_device_list_from_udev=0} activation{udev_sync=0 udev_rules=0}'
lvm() { "$@" --config "$LVMCONF" 2>/dev/null; }
lvm pvcreate -q -y "$P1" "$P2" >/dev/null
lvm vgcreate -q vsfsrec "$P1" "$P2" >/dev/null
lvm vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free vsfsrec > "$OUT/lvm/host-vgs.json"
lvm lvs --reportformat json --units b --nosuffix \
    -o lv_name,lv_path,lv_size,lv_attr,lv_uuid,pool_lv,origin,origin_size,data_percent vsfsrec > "$OUT/lvm/host-lvs-empty.json"
lvm pvs --reportformat json -o pv_name -S vg_name=vsfsrec > "$OUT/lvm/host-pvs-of-vg.json"
lvm pvs --reportformat json -o pv_name,vg_name > "$OUT/lvm/host-pvs-all.json"
lvm vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free nosuchvg \
    > "$OUT/lvm/host-vgs-missing.stdout.json" || true
lvm vgremove -q -f vsfsrec >/dev/null
lvm pvremove -q -y "$P1" "$P2" >/dev/null

# ---- libiscsi's iscsi-ls / iscsi-readcapacity16 against tgtd (as tests/test_iscsi_direct.py)
PORT=13260 CTL=23260
tgtd -f --iscsi portal=127.0.0.1:$PORT --control-port $CTL >/dev/null 2>&1 &
TGTD=$!
adm() { tgtadm --lld iscsi -C $CTL "$@"; }
for _ in $(seq 100); do adm --op show --mode sys >/dev/null 2>&1 && break; sleep 0.1; done
IQN=iqn.2003-01.org.example:vsfs-t1
INIT=iqn.2003-01.org.example:vsfs-init
adm --op new --mode target --tid 1 -T $IQN
adm --op new --mode target --tid 2 -T iqn.2003-01.org.example:other
truncate -s 16M lun1.img; truncate -s 40M lun2.img; truncate -s 8M lun3.img
adm --op new --mode logicalunit --tid 1 --lun 1 -b "$W/lun1.img"
adm --op new --mode logicalunit --tid 1 --lun 2 -b "$W/lun2.img"
adm --op new --mode logicalunit --tid 2 --lun 1 -b "$W/lun3.img"
adm --op bind --mode target --tid 1 -I ALL
adm --op bind --mode target --tid 2 -I ALL
iscsi-ls -i $INIT -s iscsi://127.0.0.1:$PORT/ > "$OUT/iscsi-ls/show-luns.txt"
iscsi-ls -i $INIT iscsi://127.0.0.1:$PORT/ > "$OUT/iscsi-ls/targets.txt"
iscsi-readcapacity16 -i $INIT iscsi://127.0.0.1:$PORT/$IQN/2 > "$OUT/iscsi-readcapacity16/lun2.txt"
iscsi-readcapacity16 -i $INIT iscsi://127.0.0.1:$PORT/$IQN/9 \
    > "$OUT/iscsi-readcapacity16/nolun.stdout.txt" 2> "$OUT/iscsi-readcapacity16/nolun.stderr.txt" || true
iscsi-ls -i $INIT -s iscsi://127.0.0.1:1/ > /dev/null 2> "$OUT/iscsi-ls/unreachable.stderr.txt" || true

{ echo "recorded $(date -u +%Y-%m-%d) on $(uname -sr), Debian $(cat /etc/debian_version)"
  qemu-img --version | head -1; parted --version | head -1; wipefs --version; losetup --version
  command lvm version 2>/dev/null | head -1; tgtd --version 2>&1 | head -1 || true
  dpkg-query -W -f='libiscsi-bin ${Version}\n' libiscsi-bin; } > "$OUT/host-versions.txt"
echo "recorded into $OUT"
