#!/usr/bin/env bash
# oci-tests.sh X86_STATIC_BIN — the cpud OCI image (tools/mkoci, `make oci`) run by a real OCI
# runtime: the amd64 image is taken out of the multi-architecture layout with skopeo, unpacked
# into a runtime bundle with umoci, and run with runc (Debian packages; podman was not used:
# it needs more of the host's cgroup and storage set-up than this test should assume, and
# crun refuses this host's hybrid cgroup layout). The keys are mounted as in the upstream
# README (-v $KEY.pub:/key.pub -v $KEY:/key), cpud is the image's entrypoint (PID 1 of the
# container, in its own network namespace), then:
#   - the in-container `cpu -key /key localhost ...` (runc exec), with -9p=false: this host's
#     kernel has no 9p, which the default session reports in one line (checked too);
#   - a host cpu in the container's network namespace (what a published port gives).
# The 9p session and the entrypoint flow (cpu as a container's entrypoint, the container's
# arm64 files as the board's /bin) run against the arm64 guest in tests/vm/arm64-tests.sh.
# Prints PASS/FAIL/SKIP lines and "N passed, M failed".
set -uo pipefail
export LC_ALL=C
HERE=$(cd "${0%/*}" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PASS=0 FAIL=0
ok() { echo "PASS: [oci] $*"; PASS=$((PASS + 1)); }
ko() { echo "FAIL: [oci] $*"; FAIL=$((FAIL + 1)); }
finish() { echo "$PASS passed, $FAIL failed"; [ "$FAIL" = 0 ]; exit; }
check() { if [ "$2" = "$3" ]; then ok "$1"; else ko "$1: expected [$2], got [$3]"; fi; }

X86_BIN=$(readlink -f "${1:?usage: $0 X86_STATIC_BIN}")
for t in runc skopeo umoci nsenter ssh-keygen python3; do
	command -v $t >/dev/null || { echo "SKIP: [oci] $t is not installed (tools/setup-host installs runc, skopeo, umoci)"; finish; }
done
W=$(mktemp -d /tmp/cpu-oci-test.XXXXXX)
ID=arch-oci-test-$$
PID=""
stop_container() {
	runc kill "$ID" KILL >/dev/null 2>&1
	for _ in $(seq 50); do runc state "$ID" 2>/dev/null | grep -q '"status": "running"' || break; sleep 0.1; done
	runc delete -f "$ID" >/dev/null 2>&1
}
cleanup() {
	stop_container
	rm -rf "$W"
}
trap cleanup EXIT

"$ROOT/tools/mkoci" "$W/layout" x86_64="$X86_BIN" 2>"$W/mkoci.log" || { ko "tools/mkoci: $(tail -2 "$W/mkoci.log")"; finish; }
skopeo copy -q --override-arch amd64 "oci:$W/layout:latest" "oci:$W/amd64:latest" >"$W/skopeo.log" 2>&1 &&
	umoci unpack --image "$W/amd64:latest" "$W/bundle" >"$W/umoci.log" 2>&1 ||
	{ ko "skopeo copy / umoci unpack failed: $(tail -n 2 "$W/skopeo.log" "$W/umoci.log")"; finish; }
check "the image's entrypoint is cpud -pk /key.pub -hk /key" "/bin/cpud -pk /key.pub -hk /key" \
	"$(python3 -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["process"]["args"]))' "$W/bundle/config.json")"
cp "$W/bundle/config.json" "$W/config.orig.json"
ssh-keygen -q -t ed25519 -N '' -C cpu-oci -f "$W/key" || { ko ssh-keygen; finish; }

# configure CAP...: the upstream README's `docker run -v $KEY.pub:/key.pub -v $KEY:/key -v /tmp`:
# the keys bound, a tmpfs /tmp, no terminal, no seccomp filter, and these capabilities
# ("none": an empty set).
configure() {
	python3 - "$W/config.orig.json" "$W/bundle/config.json" "$W/key" "$@" <<'PY'
import json, sys
src, path, key, caps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
caps = [x for x in caps if x != "none"]
c = json.load(open(src))
c["process"]["terminal"] = False
c["mounts"] += [
    {"destination": "/key.pub", "type": "bind", "source": key + ".pub", "options": ["bind", "ro"]},
    {"destination": "/key", "type": "bind", "source": key, "options": ["bind", "ro"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]},
]
c["process"]["capabilities"] = {k: caps for k in ("bounding", "effective", "permitted")}
c["linux"].pop("seccomp", None)
c["linux"]["maskedPaths"] = []
c["linux"]["readonlyPaths"] = []
c["root"]["readonly"] = False
json.dump(c, open(path, "w"))
PY
}
# start_container CAP...: runs the image's cpud (PID 1 of a container with its own network
# namespace); sets PID; fails unless it listens on 17010 within 60 s.
start_container() {
	stop_container
	configure "$@" || { ko "cannot edit config.json"; return 1; }
	(cd "$W/bundle" && runc run -d --pid-file "$W/pid" "$ID" </dev/null >"$W/cpud.out" 2>"$W/cpud.err") ||
		{ ko "runc run failed: $(tail -n 3 "$W/cpud.err")"; return 1; }
	PID=$(cat "$W/pid" 2>/dev/null)
	for _ in $(seq 300); do
		nsenter -t "$PID" -n awk '$4=="0A" && $2 ~ /:4272$/ {f=1} END{exit !f}' /proc/net/tcp /proc/net/tcp6 2>/dev/null && return 0
		runc state "$ID" 2>/dev/null | grep -q '"status": "running"' || break
		sleep 0.2
	done
	ko "cpud in the container ($*) did not listen on 17010: $(tail -n 5 "$W/cpud.err" "$W/cpud.out")"
	return 1
}
# host_cpu CMD...: the host's cpu in the container's network namespace (what -p 17010:17010 gives)
host_cpu() {
	(cd / && timeout -k 5 120 nsenter -t "$PID" -n "$X86_BIN" cpu -key "$W/key" -hk "$W/key.pub" -9p=false \
		127.0.0.1 "$@" </dev/null)
}

# Roughly what --privileged gives: the capabilities cpud could use, no seccomp filter.
start_container CAP_SYS_ADMIN CAP_SETUID CAP_SETGID CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER CAP_KILL \
	CAP_NET_BIND_SERVICE CAP_SYS_CHROOT CAP_NET_ADMIN CAP_MKNOD || finish
ok "cpud from the image listens on 17010 in its container (runc, PID $PID)"

want="cpu-all 0.1.0"
got=$(timeout -k 5 120 runc exec "$ID" /bin/cpu -key /key -hk /key.pub -9p=false localhost /bin/cpu-all --version 2>"$W/exec.err")
case $got in "$want "*) ok "in the container: cpu -key /key localhost /bin/cpu-all --version ($got)" ;;
*) ko "in the container: cpu -9p=false localhost: [$got] $(tail -n 3 "$W/exec.err")" ;; esac
timeout -k 5 120 runc exec "$ID" /bin/cpu -key /key -hk /key.pub localhost /bin/cpu-all --version >/dev/null 2>"$W/exec9p.err"
rc=$?
if [ $rc != 0 ] && grep -q "no 9p support" "$W/exec9p.err"; then ok "in the container with 9p: this host kernel has no 9p, said in one line (status $rc)"
elif [ $rc = 0 ]; then ok "in the container with 9p: the session ran (this kernel has 9p)"
else ko "in the container with 9p: status $rc, [$(tail -n 2 "$W/exec9p.err")]"; fi

got=$(host_cpu /bin/cpu-all --version 2>"$W/host.err")
case $got in "$want "*) ok "from the host into the container's network: cpu -key \$KEY 127.0.0.1 ($got)" ;;
*) ko "from the host: [$got] $(tail -n 3 "$W/host.err")" ;; esac
host_cpu /no/such/program >/dev/null 2>&1
check "from the host: the remote exit status comes back (127: no such program in the image)" 127 $?

# The narrower set, measured: CAP_SYS_ADMIN alone runs a session (its mount namespace and
# mounts); with no capability at all the session cannot set up and says why.
if start_container CAP_SYS_ADMIN; then
	got=$(host_cpu /bin/cpu-all --version 2>"$W/host.err")
	case $got in "$want "*) ok "capabilities: CAP_SYS_ADMIN alone runs a session" ;;
	*) ko "capabilities: CAP_SYS_ADMIN alone: [$got] $(tail -n 3 "$W/host.err")" ;; esac
fi
if start_container none; then
	host_cpu /bin/cpu-all --version >/dev/null 2>"$W/host.err"
	rc=$?
	if [ $rc != 0 ] && [ -s "$W/host.err" ]; then ok "capabilities: none: the session fails (status $rc: $(tail -n 1 "$W/host.err"))"
	else ko "capabilities: none: expected a failed session, got status $rc"; fi
fi
stop_container
finish
