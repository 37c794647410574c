#!/usr/bin/env bash
# arm64-tests.sh X86_STATIC_BIN [AARCH64_STATIC_BIN] — cpud as PID 1 in an arm64 guest
# (Debian's arm64 kernel under qemu-system-aarch64, TCG), the x86_64 host's cpu against it
# with the real 9p mount:
#   - the e2e checks of the x86 guest (run-vm-tests e2e): host file, pwd in a host dir,
#     exit status, stdin, pty, signals both ways, 2 MiB both ways with sha256 (several
#     full-size 9P messages; VMTEST_ARM64_MIB; 16 MiB is in make bench), and `uname -m` says
#     aarch64;
#   - the upstream README's cross-architecture namespace: an arm64 Debian userland unpacked
#     on the host (vm/foreign-userland) bound at /bin, /lib, /usr with the host's /home:
#     the arm64 bash runs, sees /home, and what it writes lands on the host;
#   - the reverse mistake: the default namespace (the host's x86_64 /bin) on the arm64 board
#     fails with ENOEXEC, and cpud says so in one line (exit status 126);
#   - the armv7 and riscv64 builds' cpu (under qemu-user on this host) serve the host's files
#     to the guest's 9p mount (skipped when those builds or qemu-user-static are missing);
#   - cpu as the entrypoint of a runc container whose root is the arm64 tree: the board runs
#     the container's bash on the container's files;
#   - decpud in the guest announces arch=arm64 (seen by a decpu in the same guest).
# AARCH64_STATIC_BIN defaults to `tools/build-static --profile vmtest aarch64` (Cargo.toml's
# vmtest profile: the release code without fat LTO; a no-op when up to date; VMTEST_PROFILE=
# release tests the shipped build), the armv7 and riscv64 builds of section 6 likewise (make
# vmtest builds them first). Prints PASS/FAIL/SKIP lines and "N passed, M failed".
set -uo pipefail
export LC_ALL=C
HERE=$(cd "${0%/*}" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VM="$ROOT/vm/boot-test-vm"
PASS=0 FAIL=0
CPU_TIMEOUT=${VMTEST_CPU_TIMEOUT:-240}
# Each MiB costs seconds under TCG, more through the armv7 and riscv64 cpu under qemu-user
# (section 6): 4 MiB took 80 of the group's 107 s at load 1.5.
MIB=${VMTEST_ARM64_MIB:-2}

ok() { echo "PASS: [arm64] $*"; PASS=$((PASS + 1)); }
ko() { echo "FAIL: [arm64] $*"; FAIL=$((FAIL + 1)); }
finish() { echo "$PASS passed, $FAIL failed"; [ "$FAIL" = 0 ]; exit; }
skip_all() { echo "SKIP: [arm64] $*"; finish; }
check() { # check NAME EXPECTED ACTUAL
	if [ "$2" = "$3" ]; then ok "$1"; else ko "$1: expected [$2], got [$3]"; fi
}

X86_BIN=${1:?usage: $0 X86_STATIC_BIN [AARCH64_STATIC_BIN]}
PROFILE=${VMTEST_PROFILE:-vmtest}
ARM_BIN=${2:-}
# Under tests/vm/all's builds (VMTEST_BUILT_DIR): the aarch64 build is done; calling cargo
# again would wait on the target dir's lock while the armv7 build runs.
if [ -z "$ARM_BIN" ] && [ "$(cat "${VMTEST_BUILT_DIR:-/nonexistent}/aarch64" 2>/dev/null)" = 0 ]; then
	ARM_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/aarch64-unknown-linux-musl/$PROFILE/cpu-all"
fi
[ -f "$X86_BIN" ] || { echo "arm64-tests: $X86_BIN does not exist (make static)" >&2; exit 2; }
command -v qemu-system-aarch64 >/dev/null ||
	skip_all "qemu-system-aarch64 is not installed (apt-get install qemu-system-arm; tools/setup-host does)"
command -v ssh-keygen >/dev/null || skip_all "needs ssh-keygen (openssh-client) for the test keys"
if [ -z "$ARM_BIN" ]; then
	ARM_BIN=$("$ROOT/tools/build-static" --profile "$PROFILE" aarch64 2>/tmp/arm64-build.$$.log) ||
		{ ko "tools/build-static --profile $PROFILE aarch64 failed: $(tail -n 3 /tmp/arm64-build.$$.log | tr '\n' '|')"; rm -f /tmp/arm64-build.$$.log; finish; }
	rm -f /tmp/arm64-build.$$.log
fi
file -L "$ARM_BIN" | grep -q 'ARM aarch64.*static' || { ko "$ARM_BIN is not a static aarch64 binary: $(file -L "$ARM_BIN")"; finish; }

W=$(mktemp -d /tmp/cpu-arm64-test.XXXXXX)
HOMEDIR=""
VM_STATE=""
cleanup() {
	[ -n "$VM_STATE" ] && "$VM" stop "$VM_STATE" >/dev/null 2>&1
	[ -n "$HOMEDIR" ] && rm -rf "$HOMEDIR"
	rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cp "$X86_BIN" "$W/cpu-all" && chmod 755 "$W/cpu-all"
cp "$ARM_BIN" "$W/cpu-all-arm64" && chmod 755 "$W/cpu-all-arm64"
echo "hello from the host" >"$W/hello.txt"

ssh-keygen -q -t ed25519 -N '' -C cpud-host -f "$W/hostkey" &&
	ssh-keygen -q -t ed25519 -N '' -C cpu-user -f "$W/userkey" || { ko "ssh-keygen"; finish; }
if ! out=$("$VM" --state "$W/vm" --keep -f "$W/hostkey:/etc/cpud/hostkey" \
	-f "$W/userkey.pub:/etc/cpud/authorized_keys" \
	"$W/cpu-all-arm64" -hk /etc/cpud/hostkey -pk /etc/cpud/authorized_keys -d 2>"$W/boot.log"); then
	ko "cpud did not start listening in the arm64 guest; boot log and console tail:"
	tail -n 5 "$W/boot.log" | sed 's/^/    /'
	grep -a -v '^\[ *[0-9.]*\] ' "$W/vm/console.log" 2>/dev/null | tail -n 15 | sed 's/^/    /'
	finish
fi
eval "$out"
[ "$VM_ARCH" = arm64 ] || ko "the harness booted a $VM_ARCH guest, not arm64"
ok "arm64 guest booted with the aarch64 cpud as PID 1 in ${VM_BOOT_SECONDS}s ($VM_ACCEL), host port $HOST_PORT"

CPU=("$W/cpu-all" cpu -sp "$HOST_PORT" -key "$W/userkey" -hk "$W/hostkey.pub")
# The guest is aarch64: the host's /bin, /lib, /usr (x86_64) must not be bound over the
# guest's busybox, so every session names its namespace (empty: only /tmp/cpu).
cpu_run() { # cpu_run [-flag=value...] CMD...   (stdin from /dev/null)
	local flags=()
	while [ $# -gt 0 ] && [[ $1 == -* ]]; do flags+=("$1"); shift; done
	timeout -k 10 "$CPU_TIMEOUT" "${CPU[@]}" "${flags[@]}" 127.0.0.1 "$@" </dev/null
}
cpu_stdin() {
	local flags=()
	while [ $# -gt 0 ] && [[ $1 == -* ]]; do flags+=("$1"); shift; done
	timeout -k 10 "$CPU_TIMEOUT" "${CPU[@]}" "${flags[@]}" 127.0.0.1 "$@"
}
D="$W/proj"
mkdir -p "$D"

# 1. the machine, a host file, pwd in a host directory
check "uname -m in the guest says aarch64" aarch64 "$(cd / && cpu_run -namespace= uname -m 2>"$W/err")"
check "cpu VM cat /tmp/cpu\$DIR/hello.txt (the real 9p mount)" "hello from the host" \
	"$(cd / && cpu_run -namespace= cat "/tmp/cpu$W/hello.txt" 2>>"$W/err")"
check "cpu VM pwd prints the host dir (bound with -namespace)" "$D" "$(cd "$D" && cpu_run -namespace="$W" pwd 2>>"$W/err")"
(cd "$D" && cpu_run -namespace="$W" sh -c 'echo data > out.img') 2>>"$W/err"
check "a file written in the guest's cwd lands in the host dir" data "$(cat "$D/out.img" 2>/dev/null)"

# 2. a few MiB both ways
head -c "${MIB}M" /dev/urandom >"$D/big"
want=$(sha256sum "$D/big" | cut -d' ' -f1)
got=$(cd "$D" && cpu_run -namespace="$W" sha256sum big 2>>"$W/err" | cut -d' ' -f1)
check "$MIB MiB host file read in the guest has the host's sha256" "$want" "$got"
got=$(cd "$D" && cpu_run -namespace="$W" sh -c "head -c ${MIB}m /dev/urandom > written.bin && sha256sum written.bin" 2>>"$W/err" | cut -d' ' -f1)
want=$(sha256sum "$D/written.bin" 2>/dev/null | cut -d' ' -f1)
if [ -n "$got" ] && [ "$got" = "$want" ]; then ok "$MIB MiB written in the guest is byte for byte the same on the host"
else ko "guest-written file: guest sha256 [$got], host [$want]"; fi

# 3. exit status, stdin, pty, signals
(cd / && cpu_run -namespace= sh -c 'exit 3') 2>>"$W/err"
check "remote exit status 3 reaches the client" 3 $?
check "stdin pipe reaches the command" 3 "$(cd / && printf 'a\nb\nc\n' | cpu_stdin -namespace= wc -l 2>>"$W/err" | tr -d ' ')"
if command -v script >/dev/null; then
	got=$(cd / && timeout -k 10 "$CPU_TIMEOUT" script -qec "$(printf '%q ' "${CPU[@]}") -namespace= 127.0.0.1 tty" /dev/null 2>>"$W/err" | tr -d '\r')
	case $got in /dev/pts/*) ok "a pty when the client's stdin is a terminal ($got)" ;; *) ko "pty: tty printed [$got]" ;; esac
else
	echo "SKIP: [arm64] pty: no script(1) (bsdutils) on the host"
fi
(cd / && cpu_run -namespace= sh -c 'kill -TERM $$') 2>>"$W/err"
check "a command killed by SIGTERM gives 128+15" 143 $?
# SIGTERM to the client: $pid is the client's own `timeout` (exec; it passes the signal on,
# once with --foreground: without it also to its process group, and cpu takes a second
# SIGTERM as "quit now").
# The remote shell traps TERM and exits 7: status 7 and its line prove the signal reached the
# remote; a client that merely died of the signal would give 143.
(cd / && exec timeout --foreground -k 10 "$CPU_TIMEOUT" "${CPU[@]}" -namespace= 127.0.0.1 \
	sh -c 'trap "echo term-received; kill \$!; exit 7" TERM; echo started; sleep 300 </dev/null >/dev/null 2>&1 & wait' \
	</dev/null >"$W/sleep.out" 2>>"$W/err") &
pid=$!
for _ in $(seq 600); do grep -q started "$W/sleep.out" 2>/dev/null && break; kill -0 $pid 2>/dev/null || break; sleep 0.2; done
if ! grep -q started "$W/sleep.out" 2>/dev/null; then
	kill -KILL $pid 2>/dev/null; wait $pid 2>/dev/null; rc=$?
	ko "the remote command never said started (client exit $rc; its stderr: $(tail -n 3 "$W/err" | tr '\n' '|'))"
else
	kill -TERM $pid 2>/dev/null
	for _ in $(seq 300); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
	if kill -0 $pid 2>/dev/null; then kill -KILL $pid; wait $pid 2>/dev/null; ko "SIGTERM to the client did not end the session in 30 s"
	else
		wait $pid; rc=$?
		check "SIGTERM to the client reaches the remote command (its trap's status 7, its line once)" "7 1" "$rc $(grep -c term-received "$W/sleep.out")"
	fi
fi
check "-9p=false runs without a mount" "0 ok" \
	"$(cd / && cpu_run -9p=false sh -c 'echo $(grep -c " /tmp/cpu " /proc/self/mountinfo) ok' 2>>"$W/err")"

# 4. the reverse mistake: the default namespace binds the host's x86_64 /bin and /lib
(cd / && cpu_run /bin/bash -c true) >"$W/enoexec.out" 2>"$W/enoexec.err"
rc=$?
check "the host's x86_64 /bin/bash on the arm64 board: exit status 126" 126 $rc
want='cpud: /bin/bash is an x86_64 binary; this machine is aarch64: give an aarch64 userland with -namespace (see README "Boards and architectures")'
got=$(grep -c . "$W/enoexec.err")
if [ "$got" = 1 ] && [ "$(cat "$W/enoexec.err")" = "$want" ]; then ok "ENOEXEC: cpud says so in one line"
else ko "ENOEXEC: expected the one line [$want], got $got lines:"; sed 's/^/    /' "$W/enoexec.err"; fi

# 5. the upstream README's honeycomb command, with an arm64 Debian userland from this host
if TREE=$("$ROOT/vm/foreign-userland" arm64 2>"$W/userland.log"); then
	HOMEDIR=$(mktemp -d /home/cpu-arm64-test.XXXXXX)
	echo "in the host's home" >"$HOMEDIR/marker"
	got=$(cd / && cpu_run -namespace="/home:/bin=$TREE/bin:/lib=$TREE/lib:/usr=$TREE/usr" /bin/bash -c \
		'echo "bash ${BASH_VERSINFO[0]} on $(uname -m)"; cat '"$HOMEDIR"'/marker; echo written-by-arm64-bash > '"$HOMEDIR"'/from-arm64; /usr/bin/sha256sum --version | head -1' \
		2>>"$W/err")
	check "the host tree's arm64 bash runs on the board and sees the host's /home" \
		"bash 5 on aarch64"$'\n'"in the host's home"$'\n'"sha256sum (GNU coreutils) 9.1" "$got"
	check "a file the arm64 bash writes in /home lands on the host" written-by-arm64-bash "$(cat "$HOMEDIR/from-arm64" 2>/dev/null)"
	check "the arm64 bash's exit status comes back" 7 "$(cd / && cpu_run -namespace="/bin=$TREE/bin:/lib=$TREE/lib:/usr=$TREE/usr" /bin/bash -c 'exit 7' 2>>"$W/err"; echo $?)"
else
	ko "vm/foreign-userland arm64 failed: $(tail -n 3 "$W/userland.log")"
fi

# 6. the 9P server of the armv7 and riscv64 builds: their `cpu` runs on this host under
# qemu-user and serves the host's files to the arm64 guest's kernel (the real 9p mount).
for a in armv7:arm:armv7-unknown-linux-musleabihf riscv64:riscv64:riscv64gc-unknown-linux-musl; do
	IFS=: read -r name q triple <<<"$a"
	fb="${CARGO_TARGET_DIR:-$ROOT/target}/$triple/$PROFILE/cpu-all"
	if ! command -v "qemu-$q-static" >/dev/null; then echo "SKIP: [arm64] $name cpu: no qemu-$q-static (qemu-user-static)"; continue; fi
	if [ -f "${VMTEST_BUILT_DIR:-/nonexistent}/$name.queued" ]; then # tests/vm/all builds it now: wait (bounded)
		for _ in $(seq 3600); do [ -f "$VMTEST_BUILT_DIR/$name" ] && break; sleep 1; done
		brc=$(cat "$VMTEST_BUILT_DIR/$name" 2>/dev/null || echo "not done after 3600 s")
		[ "$brc" = 0 ] || { ko "the $name build (tests/vm/all, beside the groups) failed: exit $brc"; continue; }
	fi
	if [ ! -f "$fb" ]; then echo "SKIP: [arm64] $name cpu: no $fb (tools/build-static --profile $PROFILE $name; make vmtest builds it)"; continue; fi
	cp "$fb" "$W/cpu-all-$name"
	FCPU=("qemu-$q-static" "$W/cpu-all-$name" cpu -sp "$HOST_PORT" -key "$W/userkey" -hk "$W/hostkey.pub")
	want=$(sha256sum "$D/big" | cut -d' ' -f1)
	got=$(cd "$D" && timeout -k 10 "$CPU_TIMEOUT" "${FCPU[@]}" -namespace="$W" 127.0.0.1 sh -c "sha256sum big; head -c 1m /dev/urandom > by-$name.bin; sha256sum by-$name.bin" </dev/null 2>>"$W/err")
	check "the $name cpu's 9P server: $MIB MiB read in the guest has the host's sha256" "$want" "$(sed -n 1p <<<"$got" | cut -d' ' -f1)"
	want=$(sha256sum "$D/by-$name.bin" 2>/dev/null | cut -d' ' -f1)
	got=$(sed -n 2p <<<"$got" | cut -d' ' -f1)
	if [ -n "$got" ] && [ "$got" = "$want" ]; then ok "the $name cpu's 9P server: 1 MiB written in the guest is the same on the host"
	else ko "the $name cpu's 9P server: guest-written file: guest sha256 [$got], host [$want]"; fi
done

# 8. cpu as a container's entrypoint (issue 16; the upstream README's `docker run --entrypoint
# /home/me/bin/cpu ... ubuntu-arm64 board`): a runc container whose root is the arm64 tree,
# on the host's network, runs the x86_64 static cpu; the board runs the container's bash.
if [ -n "${TREE:-}" ] && command -v runc >/dev/null && command -v python3 >/dev/null; then
	B="$W/entry"
	mkdir -p "$B/keys" "$B/home"
	cp -a "$TREE" "$B/rootfs" && mkdir -p "$B/rootfs/home" "$B/rootfs/keys" "$B/rootfs/tmp" && : >"$B/rootfs/cpu"
	cp "$W/userkey" "$W/hostkey.pub" "$B/keys/"
	echo "a file of the container" >"$B/home/marker"
	(cd "$B" && runc spec) && python3 - "$B/config.json" "$W/cpu-all" "$B" "$HOST_PORT" <<'EOF2' || ko "entrypoint: cannot write the runc bundle"
import json, sys
path, cpu, b, port = sys.argv[1:]
c = json.load(open(path))
c["root"] = {"path": "rootfs", "readonly": True}
p = c["process"]
p["terminal"] = False
p["env"] = ["PATH=/bin:/usr/bin", "HOME=/tmp", "TERM=dumb"]
p["args"] = ["/cpu", "-key", "/keys/userkey", "-hk", "/keys/hostkey.pub", "-sp", port, "127.0.0.1",
             "/bin/bash", "-c", 'echo "$(uname -m) bash ${BASH_VERSINFO[0]}"; cat /home/marker; echo from-the-board > /home/reply']
c["linux"]["namespaces"] = [n for n in c["linux"]["namespaces"] if n["type"] != "network"]
c["mounts"] += [
    {"destination": "/cpu", "type": "bind", "source": cpu, "options": ["bind", "ro"]},
    {"destination": "/keys", "type": "bind", "source": b + "/keys", "options": ["bind", "ro"]},
    {"destination": "/home", "type": "bind", "source": b + "/home", "options": ["bind", "rw"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]},
]
json.dump(c, open(path, "w"))
EOF2
	got=$(cd "$B" && timeout -k 10 "$CPU_TIMEOUT" runc run "arch-entry-$$" </dev/null 2>"$W/entry.err")
	runc delete -f "arch-entry-$$" >/dev/null 2>&1
	check "cpu as a container's entrypoint: the board runs the container's arm64 bash and reads its files" \
		"aarch64 bash 5"$'\n'"a file of the container" "$got"
	check "cpu as a container's entrypoint: what the board writes lands in the container's /home" \
		from-the-board "$(cat "$B/home/reply" 2>/dev/null)"
	[ -n "$got" ] || tail -n 5 "$W/entry.err" | sed 's/^/    /'
else
	echo "SKIP: [arm64] cpu as a container's entrypoint: needs runc, python3 and the arm64 tree"
fi

# 7. decpud in the arm64 guest announces arch=arm64: a decpud on another port and a decpu in
# the same guest that accepts only arch=arm64 servers (keys: the test's, through /tmp/cpu).
# decpud runs with -d: "dnssd: announced" is a debug line, and without it the wait below ran
# to its bound every time (60 s and more under TCG) and decided nothing.
K="/tmp/cpu$W"
got=$(cd / && cpu_run -namespace= sh -c '
	cpu-all decpud -d -sp 17011 -pk '"$K"'/userkey.pub -hk '"$K"'/hostkey -dsInstance arm64-test >/tmp/decpud.log 2>&1 &
	d=$!
	i=0; until grep -q "dnssd: announced" /tmp/decpud.log || [ $i -ge 600 ]; do usleep 100000; i=$((i+1)); done
	[ $i -lt 600 ] || echo "decpud did not say \"dnssd: announced\" in 60 s; decpu browses anyway" >&2
	r=$(timeout 120 cpu-all decpu -d -key '"$K"'/userkey -hk '"$K"'/hostkey.pub "dnssd://?arch=arm64" uname -m 2>/tmp/decpu.log)
	echo "$r $(grep -o "txt \[arch=[a-z0-9]*" /tmp/decpu.log | head -1)"
	kill $d 2>/dev/null
	[ -n "$r" ] || { tail -n 3 /tmp/decpu.log; tail -n 3 /tmp/decpud.log; }' 2>>"$W/err")
check "decpud in the guest announces arch=arm64 (decpu dnssd://?arch=arm64 finds it)" "aarch64 txt [arch=arm64" "$got"

if [ "$FAIL" != 0 ]; then
	echo "    --- client stderr (tail) ---"; tail -n 20 "$W/err" | sed 's/^/    /'
	echo "    --- guest console (tail) ---"; tail -n 40 "$VM_CONSOLE" | sed 's/^/    /'
fi
"$VM" stop "$VM_STATE" >/dev/null 2>&1; VM_STATE=""
finish
