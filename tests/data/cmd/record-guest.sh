#!/usr/bin/env bash
# Records, inside the QEMU guest of tests/vm/, the output of what the host cannot run: LVM
# with device-mapper (lvs/vgs/pvs reports and lvcreate errors), open-iscsi against a LIO
# target, and showmount against the kernel's NFS server. From the checkout:
#   bash tests/vm/run-vm.sh --disks 2 --results /tmp/rec-guest --timeout 900 -- \
#       bash tests/data/cmd/record-guest.sh /vsfs-results [lvm] [iscsi] [nfs]
# then copy /tmp/rec-guest/{lvm,iscsiadm,showmount,guest-versions.txt} into tests/data/cmd/.
set -uo pipefail
export LC_ALL=C
OUT=${1:?results directory}; shift
PARTS=" ${*:-lvm iscsi nfs} "
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"/{lvm,iscsiadm,showmount}
disk() { for d in /sys/block/vd*; do [ "$(cat "$d/serial")" = "$1" ] && echo "/dev/${d##*/}"; done; }
D0=$(disk VSFSDISK0); D1=$(disk VSFSDISK1)
echo "disks: $D0 $D1"
run() { # run NAME CMD...: stdout to NAME, stderr to NAME.stderr.txt if any, exit status noted
    local name=$1; shift
    "$@" > "$OUT/$name" 2> "$OUT/$name.stderr"
    local rc=$?
    [ -s "$OUT/$name.stderr" ] && mv "$OUT/$name.stderr" "$OUT/${name%.*}.stderr.txt" \
        || rm -f "$OUT/$name.stderr"
    [ -s "$OUT/$name" ] || rm -f "$OUT/$name"
    [ $rc = 0 ] || echo "$rc" > "$OUT/${name%.*}.rc"
}

# ---- LVM (logical.py runs these)
if [[ $PARTS == *" lvm "* ]]; then
LV_FIELDS=lv_name,lv_path,lv_size,lv_attr,lv_uuid,pool_lv,origin,origin_size,data_percent
pvcreate -q -y "$D0" "$D1" && vgcreate -q vsfsvg "$D0" "$D1"
lvcreate -q -y -W y -n plain -L 64m vsfsvg
lvcreate -q -y --type snapshot -n sparse -s -V 256m -L 8m vsfsvg
lvcreate -q -y -s -n plain-snap -L 16m vsfsvg/plain
dd if=/dev/urandom of=/dev/vsfsvg/plain bs=1M count=4 oflag=direct status=none
run lvm/vgs.json vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free vsfsvg
run lvm/lvs-snapshots.json lvs --reportformat json --units b --nosuffix -o $LV_FIELDS vsfsvg
lvcreate -q -y -T -L 64m vsfsvg/thinpool
lvcreate -q -y -n thin1 -V 1g -T vsfsvg/thinpool
dd if=/dev/urandom of=/dev/vsfsvg/thin1 bs=1M count=8 oflag=direct status=none
run lvm/lvs-thin.json lvs --reportformat json --units b --nosuffix -o $LV_FIELDS vsfsvg
vgchange -q -an vsfsvg
run lvm/lvs-inactive.json lvs --reportformat json --units b --nosuffix -o $LV_FIELDS vsfsvg
vgchange -q -aay vsfsvg
run lvm/pvs-of-vg.json pvs --reportformat json -o pv_name -S vg_name=vsfsvg
run lvm/pvs-all.json pvs --reportformat json -o pv_name,vg_name
run lvm/vgs-missing.json vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free nosuchvg
run lvm/lvcreate-exists.txt lvcreate -y -W y -n plain -L 4m vsfsvg
run lvm/lvcreate-nospace.txt lvcreate -y -W y -n huge -L 100g vsfsvg
exec 7< /dev/vsfsvg/thin1
run lvm/lvremove-open.txt lvremove -f vsfsvg/thin1
exec 7<&-
run lvm/lvrename-exists.txt lvrename vsfsvg thin1 plain
vgremove -q -f vsfsvg; pvremove -q -y "$D0" "$D1"
fi

# ---- open-iscsi against LIO (iscsi.py runs these)
if [[ $PARTS == *" iscsi "* ]]; then
modprobe -a iscsi_tcp target_core_mod iscsi_target_mod target_core_file
# a session of its own: iscsid signals its whole process group when it ends
setsid iscsid -f & ISCSID=$!
for _ in $(seq 100); do iscsiadm -m session >/dev/null 2>&1; [ $? = 0 -o $? = 21 ] && break; sleep 0.2; done
IQN=iqn.2003-01.org.example:vsfs-t1
mkdir -p /run/vsfs-lio
/usr/bin/python3 "$HERE/../../guest/lio_target.py" create $IQN /run/vsfs-lio/a.img:16 /run/vsfs-lio/b.img:32
/usr/bin/python3 "$HERE/../../guest/lio_target.py" create iqn.2003-01.org.example:vsfs-t2 /run/vsfs-lio/c.img:8
run iscsiadm/discovery.txt iscsiadm --mode discovery --type sendtargets --portal 127.0.0.1:3260
run iscsiadm/discovery-nonpersistent.txt iscsiadm --mode discovery --type sendtargets --portal 127.0.0.1:3260 --op nonpersistent
run iscsiadm/discovery-refused.txt iscsiadm --mode discovery --type sendtargets --portal 127.0.0.1:3999
run iscsiadm/session-none.txt iscsiadm --mode session
run iscsiadm/login.txt iscsiadm --mode node --targetname $IQN --portal 127.0.0.1:3260,1 --login
run iscsiadm/session.txt iscsiadm --mode session
run iscsiadm/login-again.txt iscsiadm --mode node --targetname $IQN --portal 127.0.0.1:3260,1 --login
run iscsiadm/logout.txt iscsiadm --mode node --targetname $IQN --portal 127.0.0.1:3260,1 --logout
run iscsiadm/node-missing.txt iscsiadm --mode node --targetname iqn.2003-01.org.example:nosuch --portal 127.0.0.1:3260 --login
/usr/bin/python3 "$HERE/../../guest/lio_target.py" delete iqn.2003-01.org.example:vsfs-t2
/usr/bin/python3 "$HERE/../../guest/lio_target.py" create iqn.2003-01.org.example:vsfs-t3 /run/vsfs-lio/d.img:8 --chap alice:Sesame-0pen-1234
iscsiadm --mode discovery --type sendtargets --portal 127.0.0.1:3260 >/dev/null
iscsiadm -m node -T iqn.2003-01.org.example:vsfs-t3 -p 127.0.0.1:3260 --op update -n node.session.auth.authmethod -v CHAP
iscsiadm -m node -T iqn.2003-01.org.example:vsfs-t3 -p 127.0.0.1:3260 --op update -n node.session.auth.username -v alice
iscsiadm -m node -T iqn.2003-01.org.example:vsfs-t3 -p 127.0.0.1:3260 --op update -n node.session.auth.password -v wrong-password
run iscsiadm/login-badchap.txt iscsiadm --mode node --targetname iqn.2003-01.org.example:vsfs-t3 --portal 127.0.0.1:3260 --login
iscsiadm -m node -u >/dev/null 2>&1
kill $ISCSID; wait $ISCSID
run iscsiadm/discovery-noiscsid.txt iscsiadm --mode discovery --type sendtargets --portal 127.0.0.1:3260
fi

# ---- showmount against the kernel NFS server (netfs.py find_sources); NFSv3 needs rpcbind
if [[ $PARTS == *" nfs "* ]]; then
modprobe nfsd; mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd
mkdir -p /run/vsfs-nfs /var/lib/nfs/v4recovery
mount -t tmpfs vsfs-nfs /run/vsfs-nfs && mkdir -p /run/vsfs-nfs/a "/run/vsfs-nfs/with space" /run/vsfs-nfs/c
: > /etc/exports
rpcbind -w || rpcbind
exportfs -o rw,fsid=0,no_subtree_check 127.0.0.1:/run/vsfs-nfs
exportfs -o ro,fsid=1,no_subtree_check '*:/run/vsfs-nfs/a'
exportfs -o rw,fsid=2,no_subtree_check 10.0.0.0/8:/run/vsfs-nfs/c
exportfs -o rw,fsid=2,no_subtree_check host1.example:/run/vsfs-nfs/c
exportfs -o rw,fsid=3,no_subtree_check '127.0.0.1:/run/vsfs-nfs/with space'
rpc.mountd -F & MOUNTD=$!
rpc.nfsd 2
sleep 1
run showmount/exports.txt showmount --no-headers --exports 127.0.0.1
run showmount/exports-headers.txt showmount --exports 127.0.0.1
rpc.nfsd 0; kill $MOUNTD; wait $MOUNTD
run showmount/no-mountd.txt showmount --no-headers --exports 127.0.0.1
exportfs -ua; umount /run/vsfs-nfs
fi

{ echo "recorded $(date -u +%Y-%m-%d) in the QEMU guest of tests/vm (kernel $(uname -r))"
  lvm version | head -2; iscsiadm --version; showmount --version 2>&1 | head -1
  dpkg-query -W -f='${Package} ${Version}\n' lvm2 open-iscsi nfs-common nfs-kernel-server \
    python3-rtslib-fb; } > "$OUT/guest-versions.txt" 2>&1
echo "recorded into $OUT"
