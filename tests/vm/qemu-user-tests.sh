#!/usr/bin/env bash
# qemu-user-tests.sh X86_STATIC_BIN — the armv7 and riscv64 (and aarch64) static builds as
# cpud, run under qemu-user on this host, against the x86_64 cpu with -9p=false: exit status,
# stdin, a signal inside the session, SIGTERM forwarded from the client; and the session's
# parent on the remote side is the emulated cpud.
#
# Everything runs in a private user + mount + network namespace (unshare -U -r -m -n): only
# its own loopback, and its own binfmt_misc instance (Linux >= 6.7) in which Debian's
# qemu-user-static handlers are registered, so that cpud's re-exec of /proc/self/exe (the
# per-session `cpud -remote`) runs the foreign binary too. Nothing of the host's binfmt_misc
# or network changes. No 9p here: this host kernel has none (the 9P server of these builds
# is exercised by tests/vm/arm64-tests.sh, which runs their `cpu` against the arm64 guest).
#
# The foreign builds come from `tools/build-static --profile vmtest ARCH` (Cargo.toml's vmtest
# profile: the release code without fat LTO; a no-op when they are up to date, minutes when
# not; VMTEST_PROFILE=release tests the shipped builds instead); QEMU_USER_ARCHES selects
# (default "armv7 riscv64"). Prints PASS/FAIL/SKIP lines and "N passed, M failed".
set -uo pipefail
export LC_ALL=C
HERE=$(cd "${0%/*}" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PASS=0 FAIL=0
ok() { echo "PASS: [qemu-user $A] $*"; PASS=$((PASS + 1)); }
ko() { echo "FAIL: [qemu-user $A] $*"; FAIL=$((FAIL + 1)); }
finish() { echo "$PASS passed, $FAIL failed"; [ "$FAIL" = 0 ]; exit; }
check() { if [ "$2" = "$3" ]; then ok "$1"; else ko "$1: expected [$2], got [$3]"; fi; }

X86_BIN=$(readlink -f "${1:?usage: $0 X86_STATIC_BIN}")
[ -f "$X86_BIN" ] || { echo "qemu-user-tests: $X86_BIN does not exist (make static)" >&2; exit 2; }
A=all
command -v ssh-keygen >/dev/null || { echo "SKIP: [qemu-user] needs ssh-keygen"; finish; }
if ! unshare --user --map-root-user --mount --net true 2>/dev/null; then
	echo "SKIP: [qemu-user] unshare --user --mount --net is not permitted here"; finish
fi
if ! unshare --user --map-root-user --mount sh -c 'mount -t binfmt_misc b /proc/sys/fs/binfmt_misc' 2>/dev/null; then
	echo "SKIP: [qemu-user] no private binfmt_misc in a user namespace (needs Linux >= 6.7 with binfmt_misc)"; finish
fi

W=$(mktemp -d /tmp/cpu-qemu-user.XXXXXX)
trap 'rm -rf "$W"' EXIT
ssh-keygen -q -t ed25519 -N '' -f "$W/hk" && ssh-keygen -q -t ed25519 -N '' -f "$W/uk" || { ko "ssh-keygen"; finish; }

# The session script, run as root of the private namespaces. Prints "name value" lines.
cat >"$W/inside.sh" <<'INSIDE'
set -u
W=$1 BIN=$2 X86=$3 CONF=$4 PORT=17010
mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || { echo "setup binfmt_misc mount failed"; exit 1; }
cat "$CONF" >/proc/sys/fs/binfmt_misc/register || { echo "setup cannot register $CONF"; exit 1; }
ip link set lo up
echo "version $("$BIN" --version 2>&1)"
(exec -a cpud "$BIN" -listen 127.0.0.1 -sp $PORT -pk "$W/uk.pub" -hk "$W/hk" 2>"$W/cpud.log") &
cpud=$!
hex=$(printf ':%04X' $PORT)
for _ in $(seq 600); do   # up to 120 s: qemu-user on a loaded machine starts slowly
	awk -v p="$hex" '$4=="0A" && substr($2, length($2)-4)==p {f=1} END{exit !f}' /proc/net/tcp && break
	kill -0 $cpud 2>/dev/null || break
	sleep 0.2
done
cpu() { timeout -k 5 180 "$X86" cpu -9p=false -sp $PORT -key "$W/uk" -hk "$W/hk.pub" 127.0.0.1 "$@"; }
cd /
cpu sh -c 'exit 3' </dev/null 2>>"$W/err"; echo "exit $?"
echo "stdin $(printf 'a\nb\nc\n' | cpu wc -l 2>>"$W/err")"
cpu sh -c 'kill -TERM $$' </dev/null 2>>"$W/err"; echo "selfkill $?"
echo "parent $(cpu sh -c 'readlink /proc/$PPID/exe' </dev/null 2>>"$W/err")"
# SIGTERM to the client: `exec`, so that $c is the client's own `timeout` (which passes the
# signal on), not a subshell whose death would orphan the client with the pipe of $(...) open.
# --foreground: otherwise timeout passes it on twice (to the client and to its process group),
# and cpu takes a second SIGTERM as "quit now" (exit 143) when it sees them one by one.
# The remote shell traps TERM and exits 7: status 7 and its line prove the signal went to the
# remote; a client that just died of the signal would give 143.
(exec timeout --foreground -k 5 180 "$X86" cpu -9p=false -sp $PORT -key "$W/uk" -hk "$W/hk.pub" 127.0.0.1 \
	sh -c 'trap "echo term-received; kill \$!; exit 7" TERM; echo started; sleep 300 </dev/null >/dev/null 2>&1 & wait' \
	</dev/null >"$W/sleep.out" 2>>"$W/err") &
c=$!
for _ in $(seq 600); do grep -q started "$W/sleep.out" 2>/dev/null && break; kill -0 $c 2>/dev/null || break; sleep 0.2; done
kill -TERM $c 2>/dev/null
for _ in $(seq 300); do kill -0 $c 2>/dev/null || break; sleep 0.1; done
if kill -0 $c 2>/dev/null; then kill -KILL $c; echo "sigterm still-running-after-30s"; else wait $c; echo "sigterm $? $(grep -c term-received "$W/sleep.out")"; fi
kill $cpud 2>/dev/null; wait $cpud 2>/dev/null
INSIDE

for A in ${QEMU_USER_ARCHES:-armv7 riscv64}; do
	case $A in
	aarch64) q=aarch64 triple=aarch64-unknown-linux-musl ;;
	armv7) q=arm triple=armv7-unknown-linux-musleabihf ;;
	riscv64) q=riscv64 triple=riscv64gc-unknown-linux-musl ;;
	*) echo "qemu-user-tests: unknown architecture $A" >&2; exit 2 ;;
	esac
	conf=/usr/lib/binfmt.d/qemu-$q.conf
	if [ ! -f "$conf" ] || ! command -v "qemu-$q-static" >/dev/null; then
		echo "SKIP: [qemu-user $A] qemu-$q-static is not installed (apt-get install qemu-user-static)"; continue
	fi
	# Up to date with the sources (make vmtest built them already: then a no-op).
	bin=$("$ROOT/tools/build-static" --profile "${VMTEST_PROFILE:-vmtest}" "$A" 2>"$W/build.log") ||
		{ ko "tools/build-static --profile ${VMTEST_PROFILE:-vmtest} $A failed: $(tail -n 3 "$W/build.log" | tr '\n' '|')"; continue; }
	cp "$bin" "$W/cpu-all-$A" && : >"$W/err"
	fails_before=$FAIL
	res=$(timeout -k 10 900 unshare --user --map-root-user --mount --net --fork \
		bash "$W/inside.sh" "$W" "$W/cpu-all-$A" "$X86_BIN" "$conf" 2>&1)
	val() { awk -v k="$1" '$1==k {sub(/^[^ ]* /, ""); print; exit}' <<<"$res"; }
	case $(val version) in
	*", $triple)") ok "the $A build runs under qemu-$q-static ($(val version))" ;;
	*) ko "the $A build did not start: $(head -n 3 <<<"$res")" ;;
	esac
	check "-9p=false: remote exit status 3 reaches the client" 3 "$(val exit)"
	check "-9p=false: stdin pipe reaches the command" 3 "$(val stdin | tr -d ' ')"
	check "-9p=false: a command killed by SIGTERM gives 128+15" 143 "$(val selfkill)"
	check "-9p=false: SIGTERM to the client reaches the remote command (its trap's status 7, its line once)" "7 1" "$(val sigterm)"
	case $(val parent) in
	*qemu-$q*) ok "the session's parent is the emulated cpud ($(val parent))" ;;
	*) ko "the session's parent is [$(val parent)], not qemu-$q-static" ;;
	esac
	if [ "$FAIL" != "$fails_before" ]; then
		echo "    --- cpu stderr ---"; tail -n 5 "$W/err" | sed 's/^/    /'
		echo "    --- cpud log ---"; tail -n 8 "$W/cpud.log" 2>/dev/null | sed 's/^/    /'
	fi
done
finish
