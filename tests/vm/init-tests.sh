#!/usr/bin/env bash
# init-tests.sh STATIC_BIN — system tests of `cpud -init` as the real PID 1 of a qemu guest,
# booted from the project's own initramfs (vm/mkinitramfs: /init -> cpu-all, no busybox).
#
# The kernel and its modules come from the VM harness's cache (boot-test-vm prepare).
# Boot 1: cpud -init mounts the basic file systems, loads virtio/9p modules from
#   /etc/cpud/modules, brings lo up, applies ip=, and keeps the server running: a killed
#   server is restarted, PID 1 never exits (no kernel panic). (The growing pause between
#   restarts is unit-tested in tests/init_supervise.rs.)
#   Ctrl-Alt-Del (sent through the qemu monitor) reaches PID 1 as SIGINT: without -poweroff
#   it stops everything and restarts the server.
# Boot 2: with -poweroff -klog in /etc/cpud/flags, Ctrl-Alt-Del powers the guest off cleanly,
#   and cpud's log lines go through the kernel log.
# Boot 1 also runs cpu against it:
#   a double-forking command leaves no zombie, a crashing session does not take PID 1 down,
#   and a killed server is restarted.
# Prints PASS/FAIL/SKIP lines and ends with "N passed, M failed"; exit 1 if any failed.
set -uo pipefail
export LC_ALL=C
BIN=${1:-}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PASSED=0 FAILED=0
pass() { echo "PASS init: $*"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL init: $*"; FAILED=$((FAILED + 1)); }
skip() { echo "SKIP init: $*"; }
finish() {
	# A failure says why: the tail of each guest's console (cpud's log is on it).
	if [ "$FAILED" != 0 ] && [ -n "${WORK:-}" ]; then
		for l in "$WORK"/[ab].log; do
			[ -f "$l" ] || continue
			echo "    --- guest console ${l##*/} (tail) ---"
			tail -n 25 "$l" | tr -d '\r' | sed 's/^/    /'
		done
	fi
	echo "$PASSED passed, $FAILED failed"
	[ "$FAILED" = 0 ]
	exit $?
}
check() { if eval "$2"; then pass "$1"; else fail "$1"; fi; }

[ -n "$BIN" ] && [ -f "$BIN" ] || { skip "no static binary given (usage: $0 STATIC_BIN)"; finish; }
command -v qemu-system-x86_64 >/dev/null || { skip "qemu-system-x86_64 not installed"; finish; }
for t in cpio gzip ssh-keygen; do command -v $t >/dev/null || { skip "$t not installed"; finish; }; done
[ "$(od -An -tu2 -j18 -N2 "$BIN" | tr -d ' ')" = 62 ] || { skip "$BIN is not an x86_64 binary"; finish; }

HARNESS=${BOOT_TEST_VM:-}
for h in "$REPO/vm/boot-test-vm"; do
	[ -z "$HARNESS" ] && [ -x "$h" ] && HARNESS=$h
done
VM_CACHE=${VM_CACHE:-${HOME:-/tmp}/.cache/cpu-vm}
if [ -n "$HARNESS" ]; then timeout 900 "$HARNESS" prepare amd64 >/dev/null 2>&1 || true; fi
KDIR=""
[ -f "$VM_CACHE/kernel.current.amd64" ] && KDIR="$VM_CACHE/$(cat "$VM_CACHE/kernel.current.amd64")"
[ -n "$KDIR" ] && [ -f "$KDIR/READY" ] || { skip "no cached guest kernel in $VM_CACHE (run boot-test-vm prepare)"; finish; }
KERNEL=$KDIR/vmlinux; [ -f "$KERNEL" ] || KERNEL=$KDIR/vmlinuz
MODDIR=$(ls -d "$KDIR"/root/lib/modules/* | head -1)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/init-tests.XXXXXX")
QEMU_PIDS=()
cleanup() {
	local p
	for p in "${QEMU_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
	rm -rf "$WORK"
}
trap cleanup EXIT
ssh-keygen -q -t ed25519 -N '' -f "$WORK/id" </dev/null

# build_image OUT [FLAG...]
build_image() {
	local out=$1; shift
	local flags=() f
	for f in "$@"; do flags+=(-f "$f"); done
	"$REPO/vm/mkinitramfs" -b "$BIN" -k "$WORK/id.pub" -s "$WORK/state" -o "$out" -n cpu-vm \
		-M "$MODDIR" -m virtio_pci -m virtio_net -m 9p -m 9pnet_fd -m 9pnet_virtio "${flags[@]}" >"$WORK/mk.out" 2>"$WORK/mk.err"
}

free_port() {
	local p
	for _ in $(seq 50); do
		p=$((20000 + RANDOM % 40000))
		(exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo $p; return; }
	done
	echo 0
}

# boot NAME IMAGE PORT: qemu in the background (TCG), console in $WORK/NAME.log,
# monitor commands through the fifo $WORK/NAME.mon.in
boot() {
	local try
	for try in 1 2 3; do
		boot_once "$@" && return 0
		# most likely the host port was taken meanwhile: pick another one
		PORT=$(free_port); set -- "$1" "$2" "$PORT"
	done
	return 1
}
boot_once() {
	local name=$1 image=$2 port=$3
	rm -f "$WORK/$name.mon.in" "$WORK/$name.mon.out"
	mkfifo "$WORK/$name.mon.in" "$WORK/$name.mon.out"
	# keep the monitor fifos open so qemu never blocks on them
	exec {mon_out}<>"$WORK/$name.mon.out"
	qemu-system-x86_64 -name "cpu-vm-init-test" -machine q35,accel=tcg -cpu max -smp 1 -m 256 \
		-nodefaults -no-user-config -display none -no-reboot \
		-kernel "$KERNEL" -initrd "$image" \
		-append "console=ttyS0 panic=-1 cryptomgr.notests lsm= audit=0 nowatchdog mitigations=off tsc=reliable ip=10.0.2.15::10.0.2.2:255.255.255.0:cpu-vm:eth0:off" \
		-netdev "user,id=n0,ipv6=off,hostfwd=tcp:127.0.0.1:$port-:17010" -device virtio-net-pci,netdev=n0,romfile= \
		-serial "file:$WORK/$name.log" -monitor "pipe:$WORK/$name.mon" \
		-daemonize -pidfile "$WORK/$name.pid" 2>"$WORK/$name.qemu.err" || return 1
	QEMU_PIDS+=("$(cat "$WORK/$name.pid")")
}
monitor() { printf '%s\n' "$2" >"$WORK/$1.mon.in"; }
alive() { local st; st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; st=${st##*) }; [ "${st:0:1}" != Z ]; }
# wait_log NAME REGEX SECONDS: until the console matches (returns 1 on timeout or qemu exit)
wait_log() {
	local i
	for i in $(seq $(($3 * 10))); do
		grep -qaE "$2" "$WORK/$1.log" 2>/dev/null && return 0
		alive "$(cat "$WORK/$1.pid" 2>/dev/null || echo 0)" || { grep -qaE "$2" "$WORK/$1.log" 2>/dev/null; return; }
		sleep 0.1
	done
	return 1
}
count() { grep -caE "$2" "$WORK/$1.log" 2>/dev/null || true; }

# ------------------------------------------------------------------ boot 1: supervise
T0=$(date +%s)
if build_image "$WORK/a.cpio.gz"; then
	pass "mkinitramfs built an image of $(stat -c %s "$WORK/a.cpio.gz") bytes"
else
	fail "mkinitramfs: $(cat "$WORK/mk.err")"; finish
fi
LIST=$(gzip -dc "$WORK/a.cpio.gz" | cpio -it --quiet 2>/dev/null)
check "image has /init, applet links, keys, passwd, modules" \
	'for f in init bin/cpu-all bin/cpu bin/cpud bin/decpu bin/decpud etc/cpud/authorized_keys etc/cpud/ssh_host_ed25519_key etc/passwd etc/group etc/cpud/modules; do grep -qx "$f" <<<"$LIST" || exit 1; done'
K1=$(cat "$WORK/state/ssh_host_ed25519_key.pub")
build_image "$WORK/a2.cpio.gz" && K2=$(cat "$WORK/state/ssh_host_ed25519_key.pub")
check "rebuilding keeps the host key" '[ "$K1" = "${K2:-}" ]'

PORT=$(free_port)
if ! boot a "$WORK/a.cpio.gz" "$PORT"; then fail "qemu did not start: $(cat "$WORK/a.qemu.err")"; finish; fi
if wait_log a 'init: cpud .* as PID 1' 180; then pass "cpud runs as PID 1 (+$(($(date +%s) - T0))s)"; else fail "cpud did not start as PID 1"; fi
wait_log a 'init: server started' 120 || fail "the supervisor never started the server"
for m in "proc on /proc" "sysfs on /sys" "devtmpfs on /dev" "devpts on /dev/pts" "tmpfs on /dev/shm" "tmpfs on /tmp" "tmpfs on /run"; do
	check "mounted $m" "grep -qa 'init: mounted $m' '$WORK/a.log'"
done
check "modules loaded with finit_module, none failed" "grep -qaE 'init: [1-9][0-9]* modules loaded, 0 failed' '$WORK/a.log'"
check "9p and virtio_net modules loaded" "grep -qaE 'init: loaded module 9p.?$' '$WORK/a.log' && grep -qaE 'init: loaded module virtio_net.?$' '$WORK/a.log'"
check "lo brought up" "grep -qa 'init: lo is up' '$WORK/a.log'"
check "ip= applied to eth0" "grep -qa 'init: eth0 is 10.0.2.15/24 via 10.0.2.2' '$WORK/a.log'"

wait_log a 'Listening|listening' 60 || fail "the server never said it is listening: $(tail -3 "$WORK/a.log" | tr '\n' ' ')"

# Ctrl-Alt-Del -> SIGINT to PID 1 (CAD is off): stop everything, restart the server.
N_STARTED=$(count a 'init: server started')
monitor a "sendkey ctrl-alt-delete"
if wait_log a 'init: SIGINT received: stopping' 30; then pass "Ctrl-Alt-Del reaches PID 1 as SIGINT"; else fail "SIGINT (Ctrl-Alt-Del) not seen"; fi
if wait_log a 'all processes stopped; restarting the server' 30; then pass "SIGINT without -poweroff restarts the server"; else fail "no restart after SIGINT"; fi
for _ in $(seq 300); do [ "$(count a 'init: server started')" -gt "$N_STARTED" ] && break; sleep 0.1; done
check "server started again after SIGINT (within 30 s)" "[ $(count a 'init: server started') -gt $N_STARTED ]"

# ------------------------------------------------------------------ with a working server
CPU="$BIN"
run_cpu() { timeout 60 "$CPU" cpu -key "$WORK/id" -hk "$WORK/state/ssh_host_ed25519_key.pub" -sp "$PORT" 127.0.0.1 "$@"; }
{
	ok=0
	for _ in $(seq 60); do run_cpu /bin/true >/dev/null 2>&1 && { ok=1; break; }; sleep 1; done
	check "cpu runs a command on the PID-1 cpud" "[ $ok = 1 ]"
	# The orphan (its PID printed) outlives the session by a second; once it has ended, PID 1
	# must have reaped it: its /proc entry is gone, not a zombie (asked up to 20 times).
	ORPHAN=$(run_cpu sh -c '(sleep 1 </dev/null >/dev/null 2>&1 & echo $!) ; exit 0' 2>/dev/null | tr -dc 0-9)
	ST=unknown
	for _ in $(seq 20); do
		[ -n "$ORPHAN" ] || break
		ST=$(run_cpu sh -c "awk '/^State:/{print \$2}' /proc/$ORPHAN/status 2>/dev/null || true" 2>/dev/null)
		[ -z "$ST" ] && { ST=reaped; break; }
		sleep 1
	done
	# zombies anywhere in the guest (State: Z), counted by awk over every /proc/PID/status
	Z=$(run_cpu sh -c "awk '/^State:/&&\$2==\"Z\"{n++} END{print n+0}' /proc/[0-9]*/status 2>/dev/null" 2>/dev/null | tr -dc 0-9)
	check "a double-forking command's orphan (pid ${ORPHAN:-?}) is reaped (${ST:-?}) and no zombie is left (found ${Z:-?})" \
		'[ "$ST" = reaped ] && [ "${Z:-x}" = 0 ]'
	run_cpu sh -c 'kill -SEGV $$' >/dev/null 2>&1
	rc=$?
	check "a crashing session reports its signal (status $rc)" '[ $rc -ne 0 ]'
	check "PID 1 survives a crashing session" 'run_cpu /bin/true >/dev/null 2>&1 && ! grep -qa "Attempted to kill init" "$WORK/a.log"'
	run_cpu sh -c 'kill -KILL $(cat /run/cpud-server.pid)' >/dev/null 2>&1
	if wait_log a 'server \(pid [0-9]+\) ended: killed by signal 9' 30; then pass "forced server error noticed by PID 1"; else fail "killed server not noticed"; fi
	ok=0
	for _ in $(seq 30); do run_cpu /bin/true >/dev/null 2>&1 && { ok=1; break; }; sleep 1; done
	check "the server is restarted and serves again" "[ $ok = 1 ]"
}
check "no kernel panic, PID 1 never exited" "! grep -qaE 'Kernel panic|Attempted to kill init' '$WORK/a.log'"
kill -KILL "$(cat "$WORK/a.pid")" 2>/dev/null

# ------------------------------------------------------------------ boot 2: -poweroff -klog
# Appended to another initramfs (as onto a u-root one): a base image whose /init is a
# busybox script; ours, concatenated after it, must win.
BASE=$WORK/base
mkdir -p "$BASE/bin"
BB=$(command -v busybox || true)
[ -n "$BB" ] && cp "$BB" "$BASE/bin/busybox"
printf '#!/bin/busybox sh\necho WRONG-INIT-RAN\n/bin/busybox poweroff -f\n' >"$BASE/init"
chmod 755 "$BASE/init"
(cd "$BASE" && find . | sort | cpio -o -H newc -R 0:0 --quiet) | gzip -1 >"$WORK/base.cpio.gz"
if build_image "$WORK/b-own.cpio.gz" -poweroff -klog; then
	cat "$WORK/base.cpio.gz" "$WORK/b-own.cpio.gz" >"$WORK/b.cpio.gz"
	PORT=$(free_port)
	boot b "$WORK/b.cpio.gz" "$PORT" || fail "qemu (boot 2) did not start: $(cat "$WORK/b.qemu.err" 2>/dev/null)"
	if wait_log b 'init: server started' 180; then
		monitor b "sendkey ctrl-alt-delete"
		QP=$(cat "$WORK/b.pid")
		for _ in $(seq 300); do alive "$QP" || break; sleep 0.1; done
		check "with -poweroff, Ctrl-Alt-Del powers the guest off" "! alive $QP && grep -qa 'init: poweroff' '$WORK/b.log'"
		check "power-off went through the kernel (reboot: Power down)" "grep -qa 'reboot: Power down' '$WORK/b.log'"
		check "-klog: cpud's lines went through /dev/kmsg" "grep -qaE '^\[ *[0-9.]+\] cpud: init: server started' '$WORK/b.log'"
	else
		fail "boot 2: server never started"
	fi
	check "boot 2: no kernel panic" "! grep -qaE 'Kernel panic|Attempted to kill init' '$WORK/b.log'"
	check "appended to another initramfs, our /init wins" "grep -qa 'cpud: init: cpud .* as PID 1' '$WORK/b.log' && ! grep -qa WRONG-INIT-RAN '$WORK/b.log'"
fi
if [ "$FAILED" != 0 ] && [ -n "${INIT_TESTS_KEEP_LOG:-}" ]; then cp "$WORK"/*.log "$INIT_TESTS_KEEP_LOG"/ 2>/dev/null; fi
finish
