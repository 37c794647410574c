#!/usr/bin/env bash
# tests/vm/cache-checks.sh STATIC_BIN — what the 9p cache defaults must never break, checked
# against cpud as PID 1 in a qemu guest (Debian 6.1 kernel), with cpu on the host:
#   - the mounts: cache=mmap on /tmp/cpu, cache=loose on the system mount, binds from it
#   - a host file changed between two sessions is seen changed by the second
#   - a file the guest wrote is complete on the host when cpu returns (dd, then stat)
#   - a writable shared mmap works, and its bytes are on the host when cpu returns
#     (the host's python3 through the default namespace)
#   - -mountopts cache=none (what a Go-like setup asks for) gives one mount, no system mount
#   - the namespace teardown comes after the exit status (src/remote.rs, the keeper): the
#     system mount writes through (sync), a shared mapping the command never unmapped is on
#     the host when cpu returns, and no keeper outlives its session
#   - record locks meet across the machines: a lock a host process holds refuses the remote
#     (F_GETLK there shows it as process 0), an F_SETLKW waiting for it gets it once the host
#     lets go, and the host sees the remote's lock (src/ninep/locks.rs)
# Prints PASS/FAIL/SKIP lines and "N passed, M failed".
set -uo pipefail
BIN=$(readlink -f "${1:?usage: $0 STATIC_BIN}")
HERE=$(cd "$(dirname "$0")" && pwd)
VM="$HERE/../../vm/boot-test-vm"
pass=0 fail=0
ok() { echo "PASS: $*"; pass=$((pass + 1)); }
ko() { echo "FAIL: $*"; fail=$((fail + 1)); }
finish() { echo "$pass passed, $fail failed"; [ "$fail" = 0 ]; exit $?; }
command -v qemu-system-x86_64 >/dev/null || { echo "SKIP: cache-checks: qemu-system-x86_64 missing"; finish; }
PY=/usr/bin/python3
W=$(mktemp -d /tmp/cpu-cachecheck.XXXXXX)
VM_STATE=""
HOLDER=""
cleanup() {
	[ -n "$HOLDER" ] && kill "$HOLDER" 2>/dev/null
	[ -n "$VM_STATE" ] && "$VM" stop "$VM_STATE" >/dev/null 2>&1
	rm -rf "$W"
}
trap cleanup EXIT
ssh-keygen -q -t ed25519 -N '' -f "$W/hk" && ssh-keygen -q -t ed25519 -N '' -f "$W/uk" || { ko "ssh-keygen"; finish; }
out=$("$VM" --state "$W/vm" -f "$W/hk:/etc/cpud/hostkey" -f "$W/uk.pub:/etc/cpud/authorized_keys" \
	"$BIN" -hk /etc/cpud/hostkey -pk /etc/cpud/authorized_keys 2>"$W/boot.log") || {
	ko "VM boot: $(tail -5 "$W/boot.log")"
	finish
}
eval "$out"
BB=/tmp/local/bin/busybox
G="/tmp/cpu$W"
# run CPU-FLAGS... -- COMMAND...: one session from /; output in $W/out and $W/err, status in $rc.
run() {
	local flags=()
	while [ $# -gt 0 ] && [ "$1" != -- ]; do flags+=("$1"); shift; done
	shift
	(cd / && timeout -k 5 300 "$BIN" cpu -sp "$HOST_PORT" -key "$W/uk" -hk "$W/hk.pub" "${flags[@]}" 127.0.0.1 "$@" \
		</dev/null >"$W/out" 2>"$W/err")
	rc=$?
}
why() { echo "status $rc, stdout [$(head -c 300 "$W/out")], stderr [$(tail -3 "$W/err" | tr '\n' ' ')]"; }

# The mounts the default namespace gets.
run -- $BB grep -E ' /tmp/cpu | /tmp/.cpu-system | /usr ' /proc/self/mountinfo
mounts=$(cat "$W/out")
# 6.1 shows the mode as ",mmap" / ",loose"; 6.6 and later as ",cache=<bitmask>" (mmap 5, loose f).
echo "$mounts" | grep ' /tmp/cpu .*- 9p ' | grep -Eq ',(mmap|cache=5)(,|$)' && ok "/tmp/cpu is 9p with cache=mmap" || ko "main mount: $(why)"
echo "$mounts" | grep ' /tmp/.cpu-system .*- 9p ' | grep -Eq ',(loose|cache=f)(,|$)' && ok "system mount with cache=loose" || ko "system mount: $(why)"
echo "$mounts" | grep -q ' /usr .*- 9p ' && ok "/usr is bound from the client" || ko "/usr bind: $(why)"
echo "$mounts" | grep ' /tmp/.cpu-system ' | grep -Eq '[ ,]sync[ ,]' && ok "system mount writes through (sync)" || ko "system mount without sync: $(why)"

# A host file changed between two sessions.
echo first >"$W/f"
run -namespace= -- $BB cat "$G/f"
[ "$rc" = 0 ] && [ "$(cat "$W/out")" = first ] && ok "session 1 reads the host file" || ko "session 1: $(why)"
echo second-and-longer >"$W/f"
run -namespace= -- $BB cat "$G/f"
[ "$rc" = 0 ] && [ "$(cat "$W/out")" = second-and-longer ] && ok "session 2 sees the file changed on the host" || ko "session 2: $(why)"
# Changed on the host while a session runs, read again in the same session (cache=mmap reads
# through): the guest waits for a marker the host writes after changing the file.
echo before >"$W/g"
rm -f "$W/changed"
(
	for _ in $(seq 600); do [ -e "$W/ready" ] && break; sleep 0.1; done
	echo after-change >"$W/g"
	touch "$W/changed"
) &
helper=$!
run -namespace= -- $BB sh -c "cat $G/g; touch $G/ready; i=0; while [ ! -e $G/changed ] && [ \$i -lt 600 ]; do sleep 0.1; i=\$((i+1)); done; cat $G/g"
wait "$helper" 2>/dev/null
rm -f "$W/ready"
[ "$rc" = 0 ] && [ "$(cat "$W/out")" = "$(printf 'before\nafter-change')" ] && ok "a change on the host during a session is seen" || ko "change during a session: $(why)"

# A guest write is on the host when cpu returns.
run -namespace= -- $BB dd if=/dev/zero of="$G/written" bs=65536 count=64
size=$(stat -c %s "$W/written" 2>/dev/null)
[ "$rc" = 0 ] && [ "$size" = 4194304 ] && ok "4 MiB written by the guest are on the host at exit" || ko "write: size ${size:-none}, $(why)"

# Writable shared mmap, through the host's python3 and the default namespace.
if [ -x "$PY" ]; then
	printf 'xxxxxxxxxx' >"$W/m"
	run -- "$PY" -c "import mmap; f = open('$G/m', 'r+b'); m = mmap.mmap(f.fileno(), 0); m[0:5] = b'HELLO'; m.close(); f.close(); print('mapped')"
	[ "$rc" = 0 ] && [ "$(cat "$W/m")" = HELLOxxxxx ] && ok "writable shared mmap: bytes on the host at exit" || ko "shared mmap: host has [$(cat "$W/m")], $(why)"
else
	echo "SKIP: writable shared mmap: no $PY on the host"
fi

# The command exits with a dirty shared mapping it never unmapped or closed: the exit writes
# it back (cache=mmap), before the status is sent and before the keeper tears the mounts down.
if [ -x "$PY" ]; then
	printf 'xxxxxxxxxx' >"$W/m2"
	run -- "$PY" -c "import mmap, os; f = open('$G/m2', 'r+b'); m = mmap.mmap(f.fileno(), 0); m[0:3] = b'BYE'; os._exit(7)"
	[ "$rc" = 7 ] && [ "$(cat "$W/m2")" = BYExxxxxxx ] && ok "mapping left dirty at exit: on the host when cpu returns" || ko "dirty mapping at exit: host has [$(cat "$W/m2")], $(why)"
else
	echo "SKIP: dirty mapping at exit: no $PY on the host"
fi

# Keepers end with their sessions: the previous sessions' are gone (bounded wait), this one's
# is the only one left while it runs.
run -namespace= -- $BB sh -c "i=0; while [ \$i -lt 100 ]; do n=\$(for c in /proc/[0-9]*/cmdline; do $BB tr '\\0' ' ' <\$c 2>/dev/null; echo; done | $BB grep -c '^cpud -remo[t]e '); [ \$n -le 1 ] && break; $BB sleep 0.1; i=\$((i+1)); done; echo \$n"
[ "$rc" = 0 ] && [ "$(cat "$W/out")" = 1 ] && ok "one keeper per running session, none left behind" || ko "keepers: $(why)"

# Record locks across the machines. The host side (a background python3, bounded) holds bytes
# 0-9 of $W/shared with a classic fcntl lock until the remote says it is about to wait, gives
# it 2 s to be inside F_SETLKW, lets go, then tries byte 5 once the remote holds 0-9. The
# remote's F_SETLKW gets the lock either way; how long it waited is printed, not judged
# (locktimeout=1 makes the guest retry each second; 6.1's default is 30 s; bench/baseline.txt).
# Both sides run the same script (the remote reads it through /tmp/cpu); they talk through
# marker files in the shared directory.
if [ -x "$PY" ]; then
	head -c 100 /dev/zero >"$W/shared"
	cat >"$W/locks.py" <<'PY'
import fcntl, os, struct, sys, time
side, w = sys.argv[1], sys.argv[2]
def path(name):
    return os.path.join(w, name)
def mark(name):
    open(path(name), "w").close()
def wait_for(name):
    # As long as a session may take (run's timeout: 300 s): a slow guest must not make the
    # host let go before the remote has tried.
    for _ in range(3000):
        if os.path.exists(path(name)):
            return True
        time.sleep(0.1)
    return False
fd = os.open(path("shared"), os.O_RDWR)
if side == "host":
    fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
    mark("host-holds")
    if wait_for("remote-waits"):
        time.sleep(2)
    fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
    saw = "no-marker"
    if wait_for("remote-holds"):
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 5)
            saw = "granted"
        except OSError as e:
            saw = "refused-errno%d" % e.errno
    with open(path("host-saw.tmp"), "w") as f:
        f.write(saw)
    os.rename(path("host-saw.tmp"), path("host-saw"))
else:
    out = []
    wait_for("host-holds")
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        out.append("nb:granted")
    except OSError as e:
        out.append("nb:errno%d" % e.errno)
    t, _, s, l, p = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)))
    out.append("getlk:%d:%d+%d:pid%d" % (t, s, l, p))
    mark("remote-waits")
    t0 = time.time()
    fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
    waited = time.time() - t0
    out.append("setlkw:granted")
    mark("remote-holds")
    out.append("host:" + (open(path("host-saw")).read() if wait_for("host-saw") else "no-answer"))
    print(" ".join(out))
    print("waited %.1f s" % waited)
PY
	"$PY" "$W/locks.py" host "$W" &
	HOLDER=$!
	run -- "$PY" "$G/locks.py" remote "$G"
	wait "$HOLDER" 2>/dev/null; HOLDER=""
	[ "$rc" = 0 ] && [ "$(head -1 "$W/out")" = "nb:errno11 getlk:1:0+10:pid0 setlkw:granted host:refused-errno11" ] \
		&& ok "record locks meet across the machines (remote F_SETLKW $(sed -n 2p "$W/out" | tr -d '\n') for a host lock held 2 s more)" \
		|| ko "record locks across the machines: $(why)"
else
	echo "SKIP: record locks across the machines: no $PY on the host"
fi

# An explicit cache mode is applied to everything, with one mount.
run -mountopts cache=none -msize 65536 -- $BB grep -E ' /tmp/cpu | /tmp/.cpu-system ' /proc/self/mountinfo
case $(cat "$W/out") in *".cpu-system"*) ko "cache=none: a system mount anyway: $(why)" ;; *" /tmp/cpu "*msize=65536*) ok "-mountopts cache=none -msize 65536: one mount, as asked" ;; *) ko "cache=none: $(why)" ;; esac
finish
