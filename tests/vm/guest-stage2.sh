# Stage 2 of the vsfs test VM: PID 1 after switch_root, run by the host's /bin/sh (busybox sh
# from /.vsfs-vm/bin, copied there by stage 1, if the host has none). The root is the host's / (read-only 9p) under a tmpfs
# overlay, so the host's own tools, Python and venvs are used from here on.
#
#  - mounts /run, /dev/pts, /dev/shm (and /tmp with vsfs.tmp=tmpfs), configfs; brings up lo
#  - starts systemd-udevd, triggers and settles (in parallel with preloading storage modules);
#    if udevd cannot run, writes /etc/lvm/lvmlocal.conf so LVM works without it
#  - vsfs.mode=run: runs /vsfs-results/.vsfs-cmd.sh (written by run-vm.sh) with output on the
#    console, writes its exit status to /vsfs-results/.vsfs-exitcode
#    vsfs.mode=shell: an interactive bash (or busybox sh) on the console
#  - powers off (sysrq o)
#
# Kernel command line parameters read here:
#   vsfs.mode=run|shell
#   vsfs.tmp=overlay|tmpfs   /tmp: the host's /tmp under the RAM overlay (default; host paths such
#                            as /tmp/venv stay visible) or a fresh tmpfs
#   vsfs.rwsize=SIZE         size limit of the tmpfs on /tmp with vsfs.tmp=tmpfs (default 32g)
#   vsfs.udev=block|full|0   udevd with coldplug of block devices only (default), of every
#                            device, or no udevd (LVM is then set to work without it)
#   vsfs.modules=a,b,c       modules to preload in the background (default dm_mod,dm_thin_pool,
#                            dm_snapshot,sd_mod)
#   vsfs.rows=N vsfs.cols=N  terminal size for the shell
#   vsfs.timing=1            print boot timings
#   vsfs.debug=1             trace this script
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/.vsfs-vm/bin
export HOME=/root
RES=/vsfs-results

RWSIZE=32g TIMING='' MODE=run TMPMODE=overlay UDEV=block MODULES=dm_mod,dm_thin_pool,dm_snapshot,sd_mod ROWS='' COLS=''
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vsfs.mode=*) MODE=${arg#*=} ;;
        vsfs.tmp=*) TMPMODE=${arg#*=} ;;
        vsfs.rwsize=*) RWSIZE=${arg#*=} ;;
        vsfs.udev=*) UDEV=${arg#*=} ;;
        vsfs.modules=*) MODULES=${arg#*=} ;;
        vsfs.rows=*) ROWS=${arg#*=} ;;
        vsfs.cols=*) COLS=${arg#*=} ;;
        vsfs.debug=1) set -x ;;
        vsfs.timing=1) TIMING=1 ;;
    esac
done

say() { echo "vsfs-vm: $*" > /dev/console; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
tm() { [ -z "$TIMING" ] || say "t=$(uptime_s) $*"; }
tm stage2
poweroff_now() {
    sync
    echo o > /proc/sysrq-trigger
    sleep 30   # PID 1 must not exit before the power-off lands
}

mount -t tmpfs -o mode=755,nosuid,nodev run /run
mkdir -p /run/lock /run/udev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
if [ "$TMPMODE" = tmpfs ]; then mount -t tmpfs -o "mode=1777,size=$RWSIZE" tmp /tmp; fi
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
mount -t configfs configfs /sys/kernel/config 2>/dev/null
hostname vsfs-vm
# State directories some storage tools insist on (all in the RAM overlay): rtslib-fb's dbroot,
# LIO's default db_root, nfsd's v4 recovery dir.
mkdir -p /etc/rtslib-fb-target /etc/target /var/lib/nfs/v4recovery
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up

# udev and module preloading, side by side (busybox needs /dev/null to background jobs: devtmpfs
# has it).
UDEVD=
for f in /lib/systemd/systemd-udevd /usr/lib/systemd/systemd-udevd /sbin/udevd; do
    [ -x "$f" ] && { UDEVD=$f; break; }
done
udev_ok=0
if [ "$UDEV" != 0 ] && [ -n "$UDEVD" ] && "$UDEVD" --daemon 2>/dev/null; then
    udev_ok=1
    # Coldplug: by default only block devices (what storage tests look at: by-id/by-path links,
    # ID_SERIAL, ID_FS_*), which saves 1-2 s of boot; vsfs.udev=full replays every device.
    # Devices that appear later (loop, dm, iSCSI disks, partitions) get their events as usual.
    match=--subsystem-match=block
    [ "$UDEV" = full ] && match=
    (
        tm udevd started
        udevadm trigger --type=subsystems --action=add
        udevadm trigger --type=devices --action=add $match
        tm triggered
        udevadm settle --timeout=120
        tm settled
    ) < /dev/null > /dev/null 2>&1 &
    udev_job=$!
fi
(
    for m in $(echo "$MODULES" | tr , ' '); do modprobe "$m"; done
    tm modules loaded
) < /dev/null > /dev/null 2>&1 &
mod_job=$!

if [ "$udev_ok" = 1 ]; then
    wait "$udev_job" || say "warning: udevadm settle failed"
else
    say "udevd not running: LVM set to work without udev"
    cat > /etc/lvm/lvmlocal.conf <<'EOF'
# written by vsfs-vm stage2: no udevd in this guest
activation {
    udev_sync = 0
    udev_rules = 0
}
devices {
    obtain_device_list_from_udev = 0
}
EOF
fi
wait "$mod_job"

# Terminal size for the console (the serial line cannot tell it).
if [ -n "$ROWS" ] && [ -n "$COLS" ]; then stty -F /dev/console rows "$ROWS" cols "$COLS" 2>/dev/null; fi

READY=$(uptime_s)
export VSFS_VM=1 VSFS_VM_RESULTS=$RES
case "$MODE" in
    shell)
        say "ready after ${READY}s (udev: $udev_ok); interactive shell, exit it to power off"
        export TERM=${TERM:-vt100}
        if [ "$TERM" = linux ]; then export TERM=vt100; fi
        cd /
        if [ -x /bin/bash ]; then
            # the caller's environment and cwd (written by run-vm.sh), then an interactive bash
            setsid -w -c /bin/bash -c '[ ! -f /vsfs-results/.vsfs-env.sh ] || . /vsfs-results/.vsfs-env.sh; exec /bin/bash -i' \
                < /dev/ttyS0 > /dev/ttyS0 2>&1
        else
            setsid -c /.vsfs-vm/bin/sh -i < /dev/ttyS0 > /dev/ttyS0 2>&1
        fi
        rc=$?
        echo "$rc" > "$RES/.vsfs-exitcode.tmp" && mv "$RES/.vsfs-exitcode.tmp" "$RES/.vsfs-exitcode"
        ;;
    *)
        if [ -f "$RES/.vsfs-cmd.sh" ]; then
            say "ready after ${READY}s (udev: $udev_ok)"
            /bin/bash "$RES/.vsfs-cmd.sh" < /dev/null > /dev/console 2>&1
            rc=$?
            echo "$rc" > "$RES/.vsfs-exitcode.tmp" && mv "$RES/.vsfs-exitcode.tmp" "$RES/.vsfs-exitcode"
            say "command exited $rc after $(uptime_s)s"
        else
            say "no $RES/.vsfs-cmd.sh to run"
        fi
        ;;
esac
poweroff_now
