#!/usr/bin/env bash
# tests/vm/run-vm.sh — run a command inside a throw-away QEMU (TCG) guest that sees the host's
# whole filesystem, with real device-mapper/LVM, udev, kernel NFS server/client and LIO/iSCSI.
#
# Usage:
#   tests/vm/run-vm.sh [OPTIONS] -- COMMAND [ARG...]
#   tests/vm/run-vm.sh [OPTIONS] --shell
#
# The guest's / is the host's / (read-only 9p) under a RAM overlay: every host path, binary,
# Python and venv is there at the same path, and nothing the guest writes reaches the host
# except through the results share. COMMAND runs as root with cwd = the directory run-vm.sh was
# called from, stdin /dev/null, stdout+stderr on the guest console, which is streamed here.
# run-vm.sh exits with COMMAND's exit status.
#
# Options:
#   --disks N         N raw virtio-blk test disks (default 3), sparse files in a temp dir,
#                     serials VSFSDISK0..VSFSDISK{N-1}. In the guest find them by serial:
#                     /dev/disk/by-id/virtio-VSFSDISK0 (udev), or /sys/block/vd*/serial.
#   --disk-size SIZE  size of each test disk (truncate syntax, default 512M)
#   --mem MB          guest memory (default 2048)     --smp N   vCPUs (default 2)
#   --timeout SEC     kill the guest after SEC seconds (default 1800; 0 = none; --shell: none)
#   --results DIR     host directory shared read-write as /vsfs-results in the guest (default:
#                     a temp dir, removed afterwards). The only way to get files back.
#   --env NAME[=VAL]  pass an environment variable (repeatable). Passed anyway: PATH, LANG,
#                     LC_*, TERM, VIRTUAL_ENV, PYTHONPATH, CI and every VSFS_* variable.
#   --log FILE        write the console to FILE instead of stdout; on failure its last 200
#                     lines are shown on stderr.   -q|--quiet  the same with a temp file.
#   --overlay-size S  size limit of the RAM (tmpfs) layer under / and of --tmpfs-tmp's /tmp
#                     (default 32g: a limit only, so sparse files of many GiB fit and free-space
#                     checks pass; really writing more than --mem gets processes OOM-killed)
#   --tmpfs-tmp       a fresh tmpfs on the guest's /tmp (default: the host's /tmp under the RAM
#                     overlay, so host paths like /tmp/venv stay visible)
#   --no-udev         do not start udevd in the guest (LVM is then configured without udev)
#   --udev-full       replay udev events for every device at boot, not only block devices
#                     (+1-2 s; devices created later always get their events)
#   --modules A,B     modules to preload in the guest (default dm_mod,dm_thin_pool,dm_snapshot,sd_mod)
#   --verbose         kernel messages on the console (drops "quiet")
#   --keep            keep the temp dir (disk images, results) and print its path
#   --shell           interactive shell in the guest instead of COMMAND (Ctrl-A X kills QEMU;
#                     `exit` powers off)
#
# Exit status: COMMAND's; 124 if the timeout hit; 125 if the guest never reported an exit status
# (kernel panic, init failure, QEMU error) — both with a message on stderr.
#
# In the guest: VSFS_VM=1, VSFS_VM_RESULTS=/vsfs-results, VSFS_VM_DISKS=N (and
# VSFS_VM_DISK_SERIALS="VSFSDISK0 ..."). Needs root and tests/vm/setup-vm.sh having been run
# (run-vm.sh runs it if its cache is missing). Cache: $VSFS_VM_CACHE (default /var/cache/vsfs-vm).
# VSFS_VM_APPEND adds kernel parameters (e.g. vsfs.timing=1 prints the boot's stages,
# vsfs.debug=1 traces the guest's init scripts; see tests/vm/guest-*.sh).
#
# Examples:
#   tests/vm/run-vm.sh -- /usr/bin/python3 -c 'import os; print(os.uname())'
#   tests/vm/run-vm.sh -- tests/vm/smoke-guest.sh      # udev, LVM, FUSE, NFS, iSCSI checks
#   tests/vm/run-vm.sh --results out -q -- .venv/bin/python -m pytest -p no:cacheprovider \
#       --junitxml=/vsfs-results/junit.xml tests/vm_tests
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${VSFS_VM_CACHE:-/var/cache/vsfs-vm}
CWD=$(pwd)

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }
die() { printf 'run-vm: error: %s\n' "$*" >&2; exit 125; }

DISKS=3 DISK_SIZE=512M MEM=2048 SMP=2 TIMEOUT=1800 TIMEOUT_SET='' RESULTS='' LOG='' QUIET='' SHELL_MODE=''
TMPFS_TMP='' OVERLAY_SIZE='' NO_UDEV='' UDEV_FULL='' MODULES='' VERBOSE='' KEEP=''
ENVS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --disks) DISKS=$2; shift 2 ;;
        --disk-size) DISK_SIZE=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; TIMEOUT_SET=1; shift 2 ;;
        --results) RESULTS=$2; shift 2 ;;
        --env) ENVS+=("$2"); shift 2 ;;
        --log) LOG=$2; shift 2 ;;
        -q|--quiet) QUIET=1; shift ;;
        --tmpfs-tmp) TMPFS_TMP=1; shift ;;
        --overlay-size) OVERLAY_SIZE=$2; shift 2 ;;
        --no-udev) NO_UDEV=1; shift ;;
        --udev-full) UDEV_FULL=1; shift ;;
        --modules) MODULES=$2; shift 2 ;;
        --verbose) VERBOSE=1; shift ;;
        --keep) KEEP=1; shift ;;
        --shell) SHELL_MODE=1; shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        *) echo "run-vm: unknown option $1" >&2; usage ;;
    esac
done
[ -n "$SHELL_MODE" ] || [ $# -gt 0 ] || { echo "run-vm: no COMMAND given" >&2; usage; }
case "$DISKS" in ''|*[!0-9]*) die "--disks wants a number" ;; esac
case "$TIMEOUT" in ''|*[!0-9]*) die "--timeout wants seconds" ;; esac
[ "$(id -u)" = 0 ] || die "must run as root (QEMU shares / with the guest as root)"

if [ ! -f "$CACHE/ready" ] || [ ! -e "$CACHE/vmlinux" ] || [ ! -f "$CACHE/initrd.img" ]; then
    echo "run-vm: no VM cache in $CACHE: running tests/vm/setup-vm.sh" >&2
    VSFS_VM_CACHE=$CACHE "$HERE/setup-vm.sh" >&2 || die "setup-vm.sh failed"
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run tests/vm/setup-vm.sh"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vsfs-vm.XXXXXX")
QPID=''
cleanup() {
    local rc=$?
    if [ -n "$QPID" ]; then
        kill "$QPID" 2>/dev/null || true   # QEMU (or the timeout(1) running it)
        wait "$QPID" 2>/dev/null || true
    fi
    if [ -n "$RESULTS" ]; then rm -f "$RESULTS/.vsfs-cmd.sh" "$RESULTS/.vsfs-env.sh" "$RESULTS/.vsfs-exitcode" "$RESULTS/.vsfs-exitcode.tmp"; fi
    if [ -n "$KEEP" ]; then echo "run-vm: kept $WORK" >&2; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -z "$RESULTS" ]; then RESULTS=$WORK/results; fi
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
rm -f "$RESULTS/.vsfs-cmd.sh" "$RESULTS/.vsfs-env.sh" "$RESULTS/.vsfs-exitcode" "$RESULTS/.vsfs-exitcode.tmp"

# --- the command script, run by the guest's stage 2 with bash (the shell sources .vsfs-env.sh)
SERIALS=
for ((i = 0; i < DISKS; i++)); do SERIALS="$SERIALS${SERIALS:+ }VSFSDISK$i"; done
{
    echo '# written by tests/vm/run-vm.sh: the environment and cwd for the guest command/shell'
    for v in PATH LANG LANGUAGE TERM VIRTUAL_ENV PYTHONPATH CI $(compgen -e | grep -E '^(LC_|VSFS_)' || true); do
        [ -n "${!v+x}" ] || continue
        case "$v" in VSFS_VM*) continue ;; esac   # the VM's own settings
        printf 'export %s=%q\n' "$v" "${!v}"
    done
    for e in "${ENVS[@]+"${ENVS[@]}"}"; do
        case "$e" in
            *=*) printf 'export %s=%q\n' "${e%%=*}" "${e#*=}" ;;
            *) [ -z "${!e+x}" ] || printf 'export %s=%q\n' "$e" "${!e}" ;;
        esac
    done
    printf 'export VSFS_VM=1 VSFS_VM_RESULTS=/vsfs-results VSFS_VM_DISKS=%q VSFS_VM_DISK_SERIALS=%q\n' "$DISKS" "$SERIALS"
    printf 'cd %q || exit 125\n' "$CWD"
} > "$RESULTS/.vsfs-env.sh"
{
    echo '#!/bin/bash'
    echo '. /vsfs-results/.vsfs-env.sh'
    if [ $# -gt 0 ]; then printf 'exec'; printf ' %q' "$@"; printf '\n'; fi
} > "$RESULTS/.vsfs-cmd.sh"

# --- disks
QARGS=()
for ((i = 0; i < DISKS; i++)); do
    img=$WORK/disk$i.img
    truncate -s "$DISK_SIZE" "$img"
    QARGS+=(-drive "file=${img//,/,,},format=raw,if=none,id=d$i,cache=unsafe,aio=threads"
            -device "virtio-blk-pci,drive=d$i,serial=VSFSDISK$i")
done

# oops=panic: a guest kernel oops ends the run at once (panic, then QEMU exits) instead of
# leaving a wedged guest to the timeout.
APPEND="console=ttyS0 panic=-1 oops=panic vsfs.mode=$([ -n "$SHELL_MODE" ] && echo shell || echo run)"
[ -n "$VERBOSE" ] || APPEND="$APPEND quiet"
[ -z "$TMPFS_TMP" ] || APPEND="$APPEND vsfs.tmp=tmpfs"
[ -z "$OVERLAY_SIZE" ] || APPEND="$APPEND vsfs.rwsize=$OVERLAY_SIZE"
[ -z "$NO_UDEV" ] || APPEND="$APPEND vsfs.udev=0"
[ -z "$UDEV_FULL" ] || APPEND="$APPEND vsfs.udev=full"
[ -z "$MODULES" ] || APPEND="$APPEND vsfs.modules=$MODULES"
[ -z "${VSFS_VM_APPEND:-}" ] || APPEND="$APPEND $VSFS_VM_APPEND"   # extra kernel parameters
if [ -n "$SHELL_MODE" ] && [ -t 0 ]; then
    read -r rows cols < <(stty size 2>/dev/null || echo "")
    [ -z "${rows:-}" ] || APPEND="$APPEND vsfs.rows=$rows vsfs.cols=$cols"
fi

QEMU=(qemu-system-x86_64 -nodefaults -no-user-config
    -accel tcg,thread=multi -smp "$SMP" -m "$MEM"
    -machine q35,sata=off,smbus=off,i8042=off,vmport=off -cpu qemu64,-svm,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16
    -display none -vga none -no-reboot -nic none
    -kernel "$CACHE/vmlinux" -initrd "$CACHE/initrd.img" -append "$APPEND"
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
    -virtfs "local,path=${RESULTS//,/,,},mount_tag=results,security_model=none,multidevs=remap"
    "${QARGS[@]+"${QARGS[@]}"}")

START=$(date +%s%N)
if [ -n "$SHELL_MODE" ]; then
    # Like -nographic: serial and monitor multiplexed on the terminal (Ctrl-A X quits, Ctrl-A C
    # toggles the monitor).
    QEMU+=(-chardev stdio,id=con,mux=on,signal=off -serial chardev:con -mon chardev=con,mode=readline)
    set +e
    if [ "$TIMEOUT_SET" ] && [ "$TIMEOUT" != 0 ]; then
        timeout --foreground -k 10 "$TIMEOUT" "${QEMU[@]}"
    else
        "${QEMU[@]}"
    fi
    qrc=$?
    set -e
    if [ -f "$RESULTS/.vsfs-exitcode" ]; then exit "$(cat "$RESULTS/.vsfs-exitcode")"; fi
    echo "run-vm: the guest shell did not report an exit status (QEMU exit $qrc)" >&2
    exit 125
fi

QEMU+=(-chardev stdio,id=con,signal=on -serial chardev:con -monitor none)
if [ -n "$QUIET" ] && [ -z "$LOG" ]; then LOG=$WORK/console.log; fi
TO=()
[ "$TIMEOUT" = 0 ] || TO=(timeout -k 10 "$TIMEOUT")
# The console's CR LF becomes LF, and the kernel's two power-off lines are dropped (line by line:
# a partial line shows when its newline comes).
filter() { sed -u -e 's/\r$//' -e '/^\[ *[0-9.]*\] \(sysrq: Power Off\|reboot: Power down\)$/d'; }
if [ -n "$LOG" ]; then exec 3> >(filter > "$LOG"); else exec 3> >(filter); fi
FPID=$!
# QEMU runs in the background so that a signal to run-vm.sh (Ctrl-C, a test runner's timeout)
# is handled at once: the EXIT trap then stops QEMU by its PID.
"${TO[@]+"${TO[@]}"}" "${QEMU[@]}" < /dev/null >&3 2>&1 &
QPID=$!
exec 3>&-
set +e
wait "$QPID"
qrc=$?
QPID=''
wait "$FPID" 2>/dev/null
set -e
ELAPSED=$(awk -v a="$START" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')

show_log() {
    if [ -n "$LOG" ]; then
        echo "run-vm: ---- last 200 lines of the guest console ($LOG) ----" >&2
        tail -n 200 "$LOG" >&2
        echo "run-vm: ---- end of console ----" >&2
    fi
}
if [ -f "$RESULTS/.vsfs-exitcode" ]; then
    rc=$(cat "$RESULTS/.vsfs-exitcode")
    case "$rc" in ''|*[!0-9]*) show_log; die "guest wrote a bad exit status '$rc'" ;; esac
    [ "$rc" = 0 ] || show_log
    echo "run-vm: guest command exited $rc (${ELAPSED}s in all)" >&2
    exit "$rc"
fi
show_log
if [ "$qrc" = 124 ] && [ "$TIMEOUT" != 0 ]; then
    echo "run-vm: error: timeout: the guest was killed after ${TIMEOUT}s" >&2
    exit 124
fi
die "the guest never reported an exit status (QEMU exit $qrc after ${ELAPSED}s: kernel panic, init failure or QEMU error; see the console above)"
