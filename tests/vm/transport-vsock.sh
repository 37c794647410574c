#!/usr/bin/env bash
# transport-vsock.sh — vsock for real: host <-> qemu guest through rust-vmm's
# vhost-device-vsock (the host kernel here has no vhost-vsock), hybrid Unix socket on the host.
#
#   tests/vm/transport-vsock.sh STATIC_BIN [ECHO_BIN [TEST_BIN...]]
#
#   STATIC_BIN  static cpu-all (x86_64 musl), booted as the guest's binary
#   ECHO_BIN    static examples/transport_echo (default: next to STATIC_BIN under examples/)
#               build: cargo build --release --target x86_64-unknown-linux-musl --example transport_echo
#   TEST_BIN    static integration-test binaries (e.g. tests/transport_vsock.rs built with
#               cargo test --target x86_64-unknown-linux-musl --test transport_vsock --no-run),
#               run inside the guest, where vsock_loopback gives their vsock tests a real peer
#
# Part 1, the transport layer (transport_echo, no SSH): in the guest, an echo server listens
#   with Listener::bind(Net::Vsock, "", "0x4272") (= port 17010 on VMADDR_CID_ANY); the host
#   dials it with Net::UnixVsock (CONNECT handshake), sends text and 1 MB, checks the echo;
#   a CONNECT to a port nobody listens on gives the clear error; the guest dials the host
#   (CID 2) with Net::Vsock, once to a listener (Net::Unix on the host side) and once to a
#   port without one (an error naming the cause), and itself over vsock_loopback (CID 1);
#   the TEST_BINs run in the guest.
# Part 2, cpu over unix-vsock: the
#   guest runs `cpud -net vsock -sp 17010` as PID 1 and the host runs
#   `cpu -net unix-vsock -sp 17010 HOSTSOCK CMD`: exit codes, output, and a host file read
#   in the guest through the 9P back-channel (which rides inside SSH over the vsock).
#
# Needs qemu-system-x86_64 and vhost-device-vsock (PATH or $VM_VHOST_DEVICE_VSOCK;
# `cargo install vhost-device-vsock --locked`); skips with a reason when they are missing.
# The VM harness is $VM_HARNESS, else the project's vm/boot-test-vm.
# Prints PASS/FAIL/SKIP lines and ends with "N passed, M failed".
set -uo pipefail
export LC_ALL=C

BIN=${1:?usage: $0 STATIC_BIN [ECHO_BIN]}
BIN=$(realpath "$BIN")
ECHO=${2:-$(dirname "$BIN")/examples/transport_echo}
shift; [ $# -gt 0 ] && shift
TEST_BINS=("$@")
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PASS=0 FAIL=0 SKIP=0
ok() { echo "PASS: $*"; PASS=$((PASS + 1)); }
ko() { echo "FAIL: $*"; FAIL=$((FAIL + 1)); }
skip() { echo "SKIP: $*"; SKIP=$((SKIP + 1)); }
finish() {
	# A failure says why: the tail of the guest console.
	if [ "$FAIL" != 0 ] && [ -n "${VM_CONSOLE:-}" ] && [ -f "$VM_CONSOLE" ]; then
		echo "    --- guest console (tail) ---"
		tail -n 25 "$VM_CONSOLE" | tr -d '\r' | sed 's/^/    /'
	fi
	echo "$PASS passed, $FAIL failed"
	[ "$FAIL" = 0 ]
	exit $?
}

VM=${VM_HARNESS:-}
for c in "$REPO/vm/boot-test-vm"; do
	[ -n "$VM" ] && break
	[ -x "$c" ] && VM=$c
done
[ -x "$VM" ] || { skip "no VM harness (vm/boot-test-vm)"; finish; }
command -v qemu-system-x86_64 >/dev/null || { skip "qemu-system-x86_64 not installed"; finish; }
if [ -z "${VM_VHOST_DEVICE_VSOCK:-}" ] && ! command -v vhost-device-vsock >/dev/null; then
	if [ -x "$HOME/.cargo/bin/vhost-device-vsock" ]; then export PATH="$PATH:$HOME/.cargo/bin"; else
		skip "vhost-device-vsock not installed (cargo install vhost-device-vsock --locked)"; finish
	fi
fi
echo "harness: $VM"

W=$(mktemp -d /tmp/transport-vsock.XXXXXX)
VM_STATE="" HOST_PIDS=()
cleanup() {
	if [ -n "$VM_STATE" ]; then "$VM" stop "$VM_STATE" >/dev/null 2>&1; fi
	for p in "${HOST_PIDS[@]}"; do kill "$p" 2>/dev/null; done
	rm -rf "$W"
}
trap cleanup EXIT

# Waits (bounded) for a console line matching $1; $2 = seconds.
wait_console() {
	local i
	for i in $(seq $(($2 * 5))); do
		grep -aq -- "$1" "$VM_CONSOLE" 2>/dev/null && return 0
		kill -0 "$QEMU_PID" 2>/dev/null || return 1
		sleep 0.2
	done
	return 1
}
console_line() { grep -a -- "$1" "$VM_CONSOLE" | tail -1 | tr -d '\r'; }

# ---------------------------------------------------------------------------------------
# Part 1: the transport layer with transport_echo
# ---------------------------------------------------------------------------------------
if [ ! -x "$ECHO" ]; then
	skip "part 1: no transport_echo at $ECHO (cargo build --release --target x86_64-unknown-linux-musl --example transport_echo)"
else
	SOCK="$W/v.sock"
	# Guest -> host: vhost-device-vsock connects guest CID 2 port P to the host's ${SOCK}_P.
	timeout 600 "$ECHO" listen unix "" "${SOCK}_5000" 1 >"$W/host-echo.log" 2>&1 &
	HOST_PIDS+=($!)
	GUEST='
/bin/transport_echo listen vsock "" 0x4272 &
sleep 1
if out=$(/bin/transport_echo dial vsock 2 5000 guest-to-host 60 2>&1); then echo "@@G2H-OK $out@@"; else echo "@@G2H-FAIL $out@@"; fi
out=$(/bin/transport_echo dial vsock 0x2 5001 nobody 5 2>&1); echo "@@G2H-REFUSED rc=$? $out@@"
out=$(/bin/transport_echo dial vsock 1 17010 loopback 20 2>&1); echo "@@LOOP rc=$? $out@@"
for t in /bin/transport-test-*; do
	[ -x "$t" ] || continue
	(cd /tmp && "$t" --test-threads=1 --nocapture >/tmp/test.log 2>&1); rc=$?
	sed "s|^|@@T ${t##*/}: |" /tmp/test.log; echo "@@TEST-DONE ${t##*/} rc=$rc@@"
done
echo "@@GUEST-TESTS-DONE@@"
sleep 900'
	FILES=(-f "$ECHO:/bin/transport_echo")
	for t in "${TEST_BINS[@]}"; do
		n=$(basename "$t"); n=${n%-*}    # cargo's hash suffix off
		strip -o "$W/transport-test-$n" "$t" 2>/dev/null || cp "$t" "$W/transport-test-$n"
		FILES+=(-f "$W/transport-test-$n:/bin/transport-test-$n")
	done
	T0=$(date +%s.%N)
	if out=$(VM_EXTRA_MODULES="vsock_loopback ${VM_EXTRA_MODULES:-}" "$VM" --no-wait-port --vsock-uds "$SOCK" \
		"${FILES[@]}" -c "$GUEST" "$BIN" 2>"$W/boot.log"); then
		eval "$out"
		if wait_console 'listening on vsock CID any port 17010' 240; then
			ok "guest: Listener::bind(Net::Vsock, \"\", \"0x4272\") -> $(console_line 'listening on vsock' | sed 's/.*listening/listening/')"
			echo "  (guest ready $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s after boot start, accel ${VM_ACCEL:-?})"
			if got=$(timeout 60 "$ECHO" dial unix-vsock "$SOCK" 17010 "hello over vsock" 30 2>&1) && [ "$got" = "hello over vsock" ]; then
				ok "host unix-vsock -> guest vsock 17010: echo '$got'"
			else
				ko "host unix-vsock -> guest vsock 17010: '$got'"
			fi
			if got=$(timeout 60 "$ECHO" dial unix-vsock "$SOCK" 0x4272 "port in hex" 30 2>&1) && [ "$got" = "port in hex" ]; then
				ok "host unix-vsock with port 0x4272: echo '$got'"
			else
				ko "host unix-vsock with port 0x4272: '$got'"
			fi
			# 1 MB: four times the guest's vsock buffer (256 KiB), so credit updates flow both
			# ways. Host-to-guest transfers of several MB through the emulated device can stall
			# in vhost-device-vsock itself (rust-vmm/vhost-device#494: rx stuck after a credit
			# request; one such stall here at load 13 with 4 MB); the message says how far it got.
			if got=$(timeout 120 "$ECHO" dial unix-vsock "$SOCK" 17010 bytes:1000000 100 2>&1); then
				ok "host unix-vsock 1 MB echo intact: $got"
			else
				ko "host unix-vsock 1 MB echo: '$got'"
			fi
			# The host closing its end must reach the guest as EOF (else sessions would leak).
			if wait_console 'echoed 1000000 bytes to vsock CID 2' 30 && wait_console 'echoed 16 bytes to vsock CID 2' 5; then
				ok "guest saw EOF after each host close: $(console_line 'echoed 1000000 bytes' | sed 's/.*echoed/echoed/')"
			else
				ko "guest never saw the host close: $(grep -a 'accepted\|echo' "$VM_CONSOLE" | tr -d '\r' | tail -5 | paste -sd'|' -)"
			fi
			got=$(timeout 60 "$ECHO" dial unix-vsock "$SOCK" 17011 x 20 2>&1); rc=$?
			case $rc:$got in
			1:*"CONNECT 17011"*) ok "host unix-vsock to a guest port nobody listens on: $got" ;;
			*) ko "host unix-vsock to guest port 17011: rc=$rc '$got'" ;;
			esac
			got=$(timeout 60 "$ECHO" dial unix-vsock "$W/nothing.sock" 17010 x 20 2>&1); rc=$?
			case $rc:$got in
			1:*"no such socket"*) ok "host unix-vsock without a device: $got" ;;
			*) ko "host unix-vsock without a device: rc=$rc '$got'" ;;
			esac
			if wait_console '@@G2H-' 120; then
				line=$(console_line '@@G2H-OK\|@@G2H-FAIL')
				case $line in *"@@G2H-OK guest-to-host@@"*) ok "guest Net::Vsock dial CID 2 port 5000 -> host Net::Unix listener: echo" ;;
				*) ko "guest vsock dial to host: '$line'" ;; esac
				if wait_console '@@G2H-REFUSED' 60; then
					line=$(console_line '@@G2H-REFUSED')
					# vhost-device-vsock 0.3 does not reset a connection to a missing ${SOCK}_P:
					# the guest kernel times out (2 s); a real vhost-vsock host refuses.
					case $line in *"rc=1 "*"vsock CID "*" port 5001"*"connection refused"* | \
						*"rc=1 "*"vsock CID 0x2 port 5001 timed out after 5s"*"_5001"*) ok "guest vsock dial to a closed host port: ${line#*rc=1 }" ;;
					*) ko "guest vsock dial to a closed host port: '$line'" ;; esac
				else
					ko "guest vsock dial to a closed host port: no result on the console"
				fi
			else
				ko "guest vsock dial to host: no result on the console"
			fi
			if wait_console '@@LOOP' 60; then
				line=$(console_line '@@LOOP')
				case $line in *"@@LOOP rc=0 loopback@@"*) ok "guest Net::Vsock dial CID 1 (vsock_loopback) -> guest listener: echo" ;;
				*) ko "guest vsock loopback: '$line'" ;; esac
			else
				ko "guest vsock loopback: no result on the console"
			fi
			if [ ${#TEST_BINS[@]} -gt 0 ]; then
				if wait_console '@@GUEST-TESTS-DONE@@' 300; then
					while read -r done_line; do
						name=${done_line#*@@TEST-DONE }; name=${name%% rc=*}; rc=${done_line##*rc=}; rc=${rc%%@@*}
						summary=$(grep -a "^@@T $name: test result:" "$VM_CONSOLE" | tail -1 | tr -d '\r' | sed "s/^@@T $name: //")
						# A test that skipped inside the guest is a skip here, one line each (counted
						# by tests/vm/all); libtest counts it as passed, so the binary is a pass only
						# when more of its tests passed than skipped.
						skips=$(grep -a "^@@T $name: .*SKIP: " "$VM_CONSOLE" | tr -d '\r' | sed "s/^.*SKIP: //")
						passed=$(echo "$summary" | grep -o '[0-9]* passed' | cut -d' ' -f1)
						nskips=$(grep -c . <<<"$skips")
						if [ "$rc" != 0 ]; then
							ko "in the guest: $name rc=$rc: $summary"; grep -a "^@@T $name: " "$VM_CONSOLE" | grep -a -i "panicked\|FAILED\|assert" | head -20
						elif [ "${passed:-0}" -gt "$nskips" ]; then
							ok "in the guest: $name: $summary ($nskips of them skipped, below)"
						fi
						while read -r s; do
							[ -n "$s" ] && skip "[vsock guest] $name: $s"
						done <<<"$skips"
					done < <(grep -a '@@TEST-DONE' "$VM_CONSOLE" | tr -d '\r')
				else
					ko "guest test binaries did not finish; console tail:"; tail -20 "$VM_CONSOLE"
				fi
			fi
			if grep -q "accepted unix peer" "$W/host-echo.log"; then ok "host Net::Unix listener saw the guest: $(head -2 "$W/host-echo.log" | tail -1)"; fi
		else
			ko "guest vsock echo server did not start; console tail:"; tail -20 "$VM_CONSOLE"
		fi
		if [ "$FAIL" != 0 ]; then echo "--- guest console (tail) ---"; tail -40 "$VM_CONSOLE" | tr -d '\r'; echo "---"; fi
		"$VM" stop "$VM_STATE" >/dev/null 2>&1; VM_STATE=""
	else
		ko "part 1: VM did not boot"; tail -20 "$W/boot.log"
	fi
fi

# ---------------------------------------------------------------------------------------
# Part 2: cpu over unix-vsock to cpud on guest vsock
# ---------------------------------------------------------------------------------------
command -v ssh-keygen >/dev/null || { skip "part 2: ssh-keygen not installed"; finish; }
ssh-keygen -q -t ed25519 -N "" -f "$W/key" </dev/null && ssh-keygen -q -t ed25519 -N "" -f "$W/hostkey" </dev/null
echo "read through 9p over vsock" >"$W/marker"
SOCK="$W/v2.sock"
T0=$(date +%s.%N)
if out=$("$VM" --no-wait-port --vsock-uds "$SOCK" -f "$W/key.pub:/key.pub" -f "$W/hostkey:/hostkey" \
	"$BIN" -net vsock -sp 17010 -pk /key.pub -hk /hostkey 2>"$W/boot2.log"); then
	eval "$out"
	export HOME="$W"    # keep the user's ~/.ssh out of it
	cd /                # a $PWD that exists in the remote namespace
	# stdout only; stderr goes to $W/cpu.err (shown on failure)
	cpu() { timeout 120 "$BIN" cpu -key "$W/key" -hk "$W/hostkey.pub" -net unix-vsock -sp 17010 "$SOCK" "$@" 2>"$W/cpu.err"; }
	cpu_err() { tr '\n' ' ' <"$W/cpu.err"; }
	# cpud is PID 1 on vsock; boot-test-vm only watches TCP ports, so poll with cpu (bounded).
	up=0
	for _ in $(seq 240); do
		if timeout 30 "$BIN" cpu -key "$W/key" -hk "$W/hostkey.pub" -net unix-vsock -sp 17010 "$SOCK" true >/dev/null 2>"$W/probe.err"; then up=1; break; fi
		kill -0 "$QEMU_PID" 2>/dev/null || break
		sleep 1
	done
	if [ $up = 1 ]; then
		T1=$(date +%s.%N)
		cpu true; rc=$?
		echo "  (one 'cpu true' over unix-vsock: $(awk -v a="$T1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}') s, rc $rc)"
		ok "cpu -net unix-vsock true: exit 0 ($(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s after boot start)"
		got=$(cpu echo hello vsock); rc=$?
		[ "$rc:$got" = "0:hello vsock" ] && ok "cpu -net unix-vsock echo: '$got'" || ko "cpu echo: rc=$rc '$got' stderr: $(cpu_err)"
		cpu sh -c 'exit 7' >/dev/null; rc=$?
		[ $rc = 7 ] && ok "cpu -net unix-vsock exit status 7 passed through" || ko "exit status: want 7, got $rc; stderr: $(cpu_err)"
		got=$(cpu cat "/tmp/cpu$W/marker"); rc=$?
		[ "$rc:$got" = "0:read through 9p over vsock" ] && ok "9P back-channel over vsock: guest read the host file" || ko "9P over vsock: rc=$rc '$got' stderr: $(cpu_err)"
		t=$(date +%s.%N)
		got=$(cpu sh -c 'head -c 4000000 /dev/zero | wc -c'); rc=$?
		[ "$rc:$got" = "0:4000000" ] && ok "4 MB of output over SSH over vsock in $(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s" || ko "4 MB output: rc=$rc '$got' stderr: $(cpu_err)"
		got=$(timeout 60 "$BIN" cpu -key "$W/key" -hk "$W/hostkey.pub" -net unix-vsock -sp 17011 "$SOCK" true 2>&1); rc=$?
		case $rc:$got in 255:*"CONNECT 17011"*) ok "cpu to a guest vsock port without cpud: exit 255, $got" ;; *) ko "cpu to port 17011: rc=$rc '$got'" ;; esac
	else
		ko "cpu -net unix-vsock never connected: $(tail -3 "$W/probe.err" | tr '\n' ' ')"; tail -20 "$VM_CONSOLE"
	fi
	"$VM" stop "$VM_STATE" >/dev/null 2>&1; VM_STATE=""
else
	ko "part 2: VM did not boot"; tail -20 "$W/boot2.log"
fi
finish
