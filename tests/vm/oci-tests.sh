#!/usr/bin/env bash
# oci-tests.sh STATIC_BIN — cpu and containers: the cpud image (oci/mkoci) under a real OCI
# runtime, and the static cpu as a container's entrypoint against a qemu guest.
#
# Groups (OCI_GROUPS="image podman entrypoint entrypoint-arm64 vmrunc" by default):
#   image       oci/mkoci builds the layout and archive from STATIC_BIN (+ Debian's static
#               busybox for date/cat/sh): exact file list, entrypoint, port, platform, the
#               index that names it; the same inputs give the same bytes; wrong inputs refused.
#   podman      podman (Debian) loads the archive and runs cpud as upstream's README does
#               (key.pub and key mounted): in-container `cpu -key /key localhost /bin/date`
#               (-9p=false: the host kernel has no 9p, and without it the session fails
#               with the message that says so), a host cpu through the published port with
#               the host key pinned, the capabilities cpud needs (measured: default set
#               refused, CAP_SYS_ADMIN alone enough), and a generated host key kept.
#   entrypoint  cpud as PID 1 of a qemu guest; a userland image built here (bash and its
#               libraries, a marker file) run by podman with the static cpu as entrypoint:
#               the guest runs the image's /bin/bash with the image's files over 9P.
#   entrypoint-arm64  the same with an arm64 userland image (Debian arm64 bash + libc) against
#               an arm64 guest whose cpud is the aarch64 cpu-all (skipped without one); the
#               entrypoint stays the host's x86-64 cpu: nothing is emulated on the host.
#   vmrunc      the 9p session of the cpud image, which this host's kernel cannot do: runc
#               inside the x86 guest runs the image (CAP_SYS_ADMIN only) and the in-container
#               cpu localhost gets the client's files mounted over 9p.
#
# Runtime: podman with runc. This host has hybrid cgroups (v1 controllers + an empty v2
# hierarchy), which Debian 12's crun 1.8 refuses ("cgroups in hybrid mode not supported");
# runc handles them. Podman's default rlimits for root (1048576 open files and processes) are
# above this host's hard limits and root here lacks CAP_SYS_RESOURCE, so each run passes
# lower --ulimit values. Published ports go through slirp4netns (no bridge, no iptables,
# nothing off loopback on the host: -p 127.0.0.1:PORT:17010).
#
# Prints PASS:/FAIL:/SKIP: lines and ends with "N passed, M failed"; exit 1 if any failed.
set -uo pipefail
export LC_ALL=C
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VM="$ROOT/vm/boot-test-vm"
MKOCI="$ROOT/oci/mkoci"
GROUPS_TO_RUN=${OCI_GROUPS:-image podman entrypoint entrypoint-arm64 vmrunc}
TIMEOUT=${OCI_CPU_TIMEOUT:-120}
PASS=0 FAIL=0

ok() { echo "PASS: [oci] $*"; PASS=$((PASS + 1)); }
ko() { echo "FAIL: [oci] $*"; FAIL=$((FAIL + 1)); }
skip() { echo "SKIP: [oci] $*"; }
check() { # check NAME EXPECTED ACTUAL
	if [ "$2" = "$3" ]; then ok "$1"; else ko "$1: expected [$2], got [$3]"; fi
}
finish() { echo "$PASS passed, $FAIL failed"; [ "$FAIL" = 0 ]; exit $?; }

[ $# -ge 1 ] && [ -f "$1" ] || { echo "usage: $0 STATIC_BIN (make static)" >&2; exit 2; }
command -v python3 >/dev/null || { skip "python3 is missing (oci/mkoci is a python3 script)"; finish; }
[ "$(od -An -tu2 -j18 -N2 "$1" | tr -d ' ')" = 62 ] || { skip "$1 is not an x86_64 binary"; finish; }

W=$(mktemp -d /tmp/cpu-oci-test.XXXXXX)
cp "$1" "$W/cpu-all" && chmod 755 "$W/cpu-all"
BIN="$W/cpu-all"
PODMAN=() VM_STATE="" VM_TIMEOUT_PID=""
cleanup() {
	# The runc guest's `timeout` leads a process group of its own: a TERM to this script's
	# group does not reach it; told by PID, it ends its guest.
	if [ -n "$VM_TIMEOUT_PID" ]; then kill -TERM "$VM_TIMEOUT_PID" 2>/dev/null; fi
	if [ ${#PODMAN[@]} -gt 0 ]; then
		"${PODMAN[@]}" rm -a -f -t 0 >/dev/null 2>&1
		"${PODMAN[@]}" rmi -a -f >/dev/null 2>&1
	fi
	if [ -n "$VM_STATE" ]; then "$VM" stop "$VM_STATE" >/dev/null 2>&1; fi
	# Overlay mounts podman may have left under its private storage.
	grep -o " $W/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
	rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

BUSYBOX=""
if file -L /bin/busybox 2>/dev/null | grep -q 'x86-64.*statically linked'; then BUSYBOX=/bin/busybox; fi
ssh-keygen -q -t ed25519 -N '' -C cpu-oci-user -f "$W/key" </dev/null || { ko "ssh-keygen"; finish; }

# ---------------------------------------------------------------------------------------------
# image: the layout and the archive
# ---------------------------------------------------------------------------------------------
build_image() { # build_image OUTDIR
	local bb=()
	[ -n "$BUSYBOX" ] && bb=(--busybox "amd64=$BUSYBOX")
	SOURCE_DATE_EPOCH=1700000000 "$MKOCI" --bin "amd64=$BIN" "${bb[@]}" --tag test \
		-o "$1/layout" --archive "$1/cpu-all-oci.tar" >"$1/mkoci.out" 2>&1
}
# The aarch64 cpu-all: OCI_ARM64_BIN, else the release build, else the `vmtest` profile's
# build that `make vmtest` makes for the arm64 group (same code without fat LTO).
arm64_bin() {
	local t=$ROOT/target/aarch64-unknown-linux-musl
	if [ -n "${OCI_ARM64_BIN:-}" ]; then echo "$OCI_ARM64_BIN"
	elif [ -f "$t/release/cpu-all" ] || [ ! -f "$t/vmtest/cpu-all" ]; then echo "$t/release/cpu-all"
	else echo "$t/vmtest/cpu-all"; fi
}

blob() { echo "$W/img/layout/blobs/sha256/${1#sha256:}"; }

run_image_group() {
	mkdir -p "$W/img" "$W/img2"
	if ! build_image "$W/img"; then ko "oci/mkoci failed: $(tail -3 "$W/img/mkoci.out")"; return; fi
	ok "oci/mkoci built the layout and archive ($(tail -1 "$W/img/mkoci.out" | cut -d: -f2 | cut -d/ -f1))"
	local index manifest config layer
	index=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["manifests"]; print(len(d), d[0]["mediaType"], d[0]["annotations"]["org.opencontainers.image.ref.name"], d[0]["digest"])' \
		"$W/img/layout/index.json" 2>&1)
	check "index.json: one image index named cpu-all:test" "1 application/vnd.oci.image.index.v1+json cpu-all:test" "${index% *}"
	manifest=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))["manifests"]; print(" ".join(x["platform"]["os"]+"/"+x["platform"]["architecture"] for x in m), m[0]["digest"])' \
		"$(blob "${index##* }")" 2>&1)
	check "the image index lists linux/amd64" "linux/amd64" "${manifest% *}"
	config=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["config"]["digest"], m["layers"][0]["digest"])' "$(blob "${manifest##* }")" 2>&1)
	layer=${config#* } config=${config% *}
	check "config: entrypoint, port, platform" \
		'["/bin/cpud", "-pk", "/key.pub", "-statedir", "/etc/cpud"] ["17010/tcp"] amd64 linux' \
		"$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(json.dumps(c["config"]["Entrypoint"]), json.dumps(list(c["config"]["ExposedPorts"])), c["architecture"], c["os"])' "$(blob "$config")" 2>&1)"
	local want_files="bin/ bin/cpu-all bin/cpu->cpu-all bin/cpud->cpu-all bin/decpu->cpu-all bin/decpud->cpu-all"
	[ -n "$BUSYBOX" ] && want_files+=" bin/busybox bin/date=bin/busybox bin/cat=bin/busybox bin/sh=bin/busybox"
	want_files+=" etc/ etc/cpud/ etc/cpud/ssh_host_ed25519_key->/key etc/group etc/hosts etc/passwd lib/ lib64/ usr/ home/ root/ tmp/"
	check "layer: exactly the files of a FROM scratch cpu-all image" "$want_files" \
		"$(python3 -c '
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    out = []
    for m in t.getmembers():
        n = m.name + ("/" if m.isdir() else "")
        n += ("->" + m.linkname) if m.issym() else ("=" + m.linkname) if m.islnk() else ""
        out.append(n)
print(" ".join(out))' "$(blob "$layer")" 2>&1)"
	check "layer: modes and owners (cpu-all 0755, /tmp 1777, /etc/cpud 0700, all root)" "755 1777 700 0" \
		"$(python3 -c '
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    m = {x.name: x for x in t.getmembers()}
    print("%o %o %o %d" % (m["bin/cpu-all"].mode, m["tmp"].mode, m["etc/cpud"].mode, max(x.uid + x.gid for x in m.values())))' "$(blob "$layer")" 2>&1)"
	check "layer: /bin/cpu-all is byte for byte the static binary" "$(sha256sum <"$BIN")" \
		"$(python3 -c 'import sys,tarfile; sys.stdout.buffer.write(tarfile.open(sys.argv[1]).extractfile("bin/cpu-all").read())' "$(blob "$layer")" | sha256sum)"
	local bad=0 f
	for f in "$W"/img/layout/blobs/sha256/*; do [ "$(sha256sum <"$f" | cut -d' ' -f1)" = "${f##*/}" ] || bad=$((bad + 1)); done
	check "every blob's sha256 is its name" 0 "$bad"
	build_image "$W/img2"
	check "the same inputs give the same archive, byte for byte" "$(sha256sum <"$W/img/cpu-all-oci.tar")" "$(sha256sum <"$W/img2/cpu-all-oci.tar" 2>&1)"
	if command -v skopeo >/dev/null; then
		check "skopeo reads the archive as a linux/amd64 image with our layer" "amd64 $layer" \
			"$(skopeo inspect "oci-archive:$W/img/cpu-all-oci.tar:cpu-all:test" 2>&1 | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["Architecture"], " ".join(d["Layers"]))' 2>&1)"
		# (docker-archive names a layer by its uncompressed digest, the config's diff_id)
		check "skopeo reads the docker-archive view (manifest.json, for Docker < 25)" \
			"$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["rootfs"]["diff_ids"][0])' "$(blob "$config")")" \
			"$(skopeo inspect "docker-archive:$W/img/cpu-all-oci.tar" 2>&1 | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["Layers"]))' 2>&1)"
	else
		skip "skopeo is not installed: the archive is not read back by a second implementation"
	fi
	local arm_bin=$(arm64_bin)
	if ! command -v skopeo >/dev/null; then
		skip "multi-arch index: skopeo is not installed"
	elif [ -f "$arm_bin" ] && "$MKOCI" --bin "amd64=$BIN" --bin "arm64=$arm_bin" --tag multi -o "$W/img4" \
		--archive "$W/img4.tar" >"$W/img4.out" 2>&1; then
		check "multi-arch: the index lists linux/amd64 and linux/arm64" "amd64 arm64" \
			"$(skopeo inspect --raw "oci-archive:$W/img4.tar:cpu-all:multi" 2>&1 | python3 -c 'import json,sys; print(" ".join(m["platform"]["architecture"] for m in json.load(sys.stdin)["manifests"]))' 2>&1)"
		check "multi-arch: an arm64 puller gets the arm64 image" arm64 \
			"$(skopeo inspect --override-arch arm64 "oci-archive:$W/img4.tar:cpu-all:multi" 2>&1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["Architecture"])' 2>&1)"
	elif [ -f "$arm_bin" ]; then
		ko "multi-arch: oci/mkoci with $arm_bin: $(tail -2 "$W/img4.out")"
	else
		skip "multi-arch index: no aarch64 cpu-all ($arm_bin: make static ARCH=aarch64)"
	fi
	local out rc=0
	out=$("$MKOCI" --bin "arm64=$BIN" -o "$W/img3" 2>&1) || rc=$?
	check "an x86-64 binary given as arm64 is refused" "1 mkoci: error: $BIN: ELF machine 62 (class 2), not a arm64 binary" "$rc $out"
	rc=0
	out=$("$MKOCI" --bin "amd64=$(readlink -f "$(command -v ssh-keygen)")" -o "$W/img3" 2>&1) || rc=$?
	case "$rc $out" in
	"1 mkoci: error: "*"dynamically linked"*) ok "a dynamically linked binary is refused" ;;
	*) ko "a dynamically linked binary: [$rc $out]" ;;
	esac
}

# ---------------------------------------------------------------------------------------------
# podman: the cpud image under a real runtime
# ---------------------------------------------------------------------------------------------
free_port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 40000))
		awk -v p="$(printf ':%04X' $p)" '$4=="0A" && substr($2, length($2)-4)==p {f=1} END{exit !f}' /proc/net/tcp /proc/net/tcp6 || { echo $p; return; }
	done
}

setup_podman() {
	[ ${#PODMAN[@]} -gt 0 ] && return 0
	command -v podman >/dev/null || { skip "podman is not installed (apt-get install podman runc slirp4netns)"; return 1; }
	[ "$(id -u)" = 0 ] || { skip "podman tests run as root (rootless podman needs subuids set up)"; return 1; }
	local runtime=crun
	command -v runc >/dev/null && runtime=runc
	# Private storage: nothing of the host's podman state is touched or left behind.
	PODMAN=(podman --root "$W/storage" --runroot "$W/run" --tmpdir "$W/ptmp" --cgroup-manager cgroupfs
		--events-backend file --runtime "$runtime")
	if [ ! -f "$W/img/cpu-all-oci.tar" ]; then mkdir -p "$W/img" && build_image "$W/img" || { ko "oci/mkoci failed"; return 1; }; fi
	local out
	if ! out=$(timeout 300 "${PODMAN[@]}" load -i "$W/img/cpu-all-oci.tar" 2>&1); then
		ko "podman load: $(echo "$out" | tail -3)"; return 1
	fi
	check "podman load names the image" "Loaded image: localhost/cpu-all:test" "$(echo "$out" | tail -1)"
}

RUN_OPTS=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
# start_cpud NAME [podman run options...]: waits (bounded) for "Listening" in its log
start_cpud() {
	local name=$1 out i
	shift
	if ! out=$(timeout 120 "${PODMAN[@]}" run -d --name "$name" "${RUN_OPTS[@]}" "$@" cpu-all:test 2>&1); then
		ko "[$name] podman run: $(echo "$out" | tail -3)"; return 1
	fi
	for i in $(seq 120); do
		"${PODMAN[@]}" logs "$name" 2>&1 | grep -q 'Listening on' && return 0
		[ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$name" 2>&1)" = true ] || break
		sleep 0.5
	done
	ko "[$name] cpud did not start listening; its log:"
	"${PODMAN[@]}" logs "$name" 2>&1 | tail -n 10 | sed 's/^/    /'
	return 1
}
pexec() { timeout -k 5 "$TIMEOUT" "${PODMAN[@]}" exec -e PWD=/root "$@" </dev/null; }
KEYS=(-v "$W/key.pub:/key.pub:ro" -v "$W/key:/key:ro")

run_podman_group() {
	setup_podman || return
	local out rc
	# Upstream's line: -v key.pub:/key.pub -v key:/key -v /tmp --privileged -p 17010:17010
	# (here the port goes to 127.0.0.1 only, and to a free port).
	local port
	port=$(free_port)
	start_cpud up --privileged "${KEYS[@]}" -v /tmp --network slirp4netns -p "127.0.0.1:$port:17010" || return
	out=$(pexec up /bin/cpu -key /key -9p=false localhost /bin/date 2>"$W/err"); rc=$?
	if [ $rc = 0 ] && [[ $out =~ ^[A-Z][a-z][a-z]\ [A-Z][a-z][a-z]\ +[0-9]+\ [0-9:]{8}\ [A-Z]+\ [0-9]{4}$ ]]; then
		ok "[privileged] in the container: cpu -key /key -9p=false localhost /bin/date printed [$out]"
	else ko "[privileged] in-container cpu date: status $rc, out [$out], err [$(tail -2 "$W/err")]"; fi
	check "[privileged] the session runs in its own namespace: tmpfs 'cpu' on /tmp" 1 \
		"$(pexec up /bin/cpu -key /key -9p=false localhost /bin/cat /proc/self/mountinfo 2>>"$W/err" | grep -c ' /tmp .* - tmpfs cpu ')"
	pexec up /bin/cpu -key /key -9p=false localhost /bin/sh -c 'exit 7' 2>>"$W/err"
	check "[privileged] the remote exit status comes back through the container" 7 $?
	out=$(pexec up /bin/cpu -key /key localhost /bin/date 2>&1); rc=$?
	if grep -qw 9p /proc/filesystems; then
		check "[privileged] with 9p (the host kernel has it): cpu localhost /bin/date" 0 $rc
	else
		case $out in
		*"the remote kernel has no 9p support"*"-9p=false"*) ok "[privileged] without -9p=false on a kernel without 9p: the error says why (status $rc)" ;;
		*) ko "[privileged] 9p session on a kernel without 9p: status $rc, [$out]" ;;
		esac
	fi
	# A host cpu through the published port; /key is the host key, so key.pub pins it.
	out=$(cd / && timeout -k 5 "$TIMEOUT" "$BIN" cpu -key "$W/key" -hk "$W/key.pub" -sp "$port" -9p=false 127.0.0.1 \
		/bin/cat /etc/hostname </dev/null 2>"$W/err"); rc=$?
	check "[privileged] host cpu -> 127.0.0.1:$port (published) -> cpud in the container, host key /key" \
		"0 $("${PODMAN[@]}" inspect -f '{{.Config.Hostname}}' up 2>&1)" "$rc $out"
	"${PODMAN[@]}" rm -f -t 0 up >/dev/null 2>&1

	# Which capabilities: the default set (no CAP_SYS_ADMIN) is refused with the reason;
	# CAP_SYS_ADMIN alone (every other capability dropped) is enough.
	if start_cpud caps-default "${KEYS[@]}" --network none; then
		out=$(pexec caps-default /bin/cpu -key /key -9p=false localhost /bin/date 2>&1); rc=$?
		case "$rc $out" in
		*"need CAP_SYS_ADMIN"*) ok "[default capabilities] refused: [${out##*$'\n'}] (status $rc)" ;;
		*) ko "[default capabilities] expected a CAP_SYS_ADMIN refusal, got status $rc [$out]" ;;
		esac
	fi
	if start_cpud caps-sysadmin "${KEYS[@]}" --network none --cap-drop ALL --cap-add SYS_ADMIN; then
		out=$(pexec caps-sysadmin /bin/cpu -key /key -9p=false localhost /bin/sh -c \
			'grep -c " /tmp .* - tmpfs cpu " /proc/self/mountinfo; grep CapEff /proc/self/status' 2>"$W/err"); rc=$?
		check "[--cap-drop ALL --cap-add SYS_ADMIN] a session with its own namespace runs" \
			"0 1 CapEff: 0000000000200000" "$rc $(echo $out)"
	fi

	# No /key mounted: cpud generates a host key, keeps it in the container (-statedir
	# /etc/cpud) and loads the same key after a restart.
	if start_cpud genkey -v "$W/key.pub:/key.pub:ro" --network none; then
		local fp1 fp2 i
		fp1=$("${PODMAN[@]}" logs genkey 2>&1 | sed -n 's/.*host key ssh-ed25519 \(SHA256:[^ ]*\) created in \/etc\/cpud\/ssh_host_ed25519_key.*/\1/p')
		[ -n "$fp1" ] && ok "[no /key] cpud generated a host key ($fp1)" ||
			ko "[no /key] no 'created in /etc/cpud' line: $("${PODMAN[@]}" logs genkey 2>&1 | tail -3)"
		timeout 120 "${PODMAN[@]}" restart -t 2 genkey >/dev/null 2>&1
		for i in $(seq 120); do
			fp2=$("${PODMAN[@]}" logs genkey 2>&1 | sed -n 's/.*host key ssh-ed25519 \(SHA256:[^ ]*\) from \/etc\/cpud\/ssh_host_ed25519_key.*/\1/p' | sort -u)
			[ -n "$fp2" ] && break
			sleep 0.5
		done
		check "[no /key] after podman restart the same host key is loaded" "$fp1" "$fp2"
	fi
	"${PODMAN[@]}" rm -a -f -t 0 >/dev/null 2>&1
}

# ---------------------------------------------------------------------------------------------
# entrypoint: the static cpu as a container's entrypoint, against cpud in a qemu guest
# ---------------------------------------------------------------------------------------------
# A small userland (x86-64): the host's bash with exactly its libraries, and a marker file.
make_userland() {
	local tree=$1 lib
	mkdir -p "$tree"/{bin,etc,lib,lib64,usr,home,tmp,root}
	cp /bin/bash "$tree/bin/bash" || return 1
	for lib in $(ldd /bin/bash | grep -o '/[^ ]*'); do
		mkdir -p "$tree$(dirname "$lib")" && cp -L "$lib" "$tree$lib" || return 1
	done
	echo "root:x:0:0:root:/root:/bin/bash" >"$tree/etc/passwd"
	echo "userland $MARKER" >"$tree/etc/userland-marker"
	tar -C "$tree" --owner=0 --group=0 -cf "$W/userland.tar" .
}

run_entrypoint_group() {
	setup_podman || return
	command -v qemu-system-x86_64 >/dev/null || { skip "[entrypoint] qemu-system-x86_64 is not installed"; return; }
	command -v ldd >/dev/null && [ -x /bin/bash ] || { skip "[entrypoint] needs /bin/bash and ldd for the userland image"; return; }
	MARKER=$RANDOM$RANDOM
	make_userland "$W/userland" || { ko "[entrypoint] building the userland tree"; return; }
	local out rc
	out=$(timeout 300 "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' "$W/userland.tar" localhost/userland:test 2>&1) ||
		{ ko "[entrypoint] podman import: $out"; return; }
	ssh-keygen -q -t ed25519 -N '' -C cpud-host -f "$W/hostkey" </dev/null
	if ! out=$("$VM" --state "$W/vm" --keep -f "$W/hostkey:/etc/cpud/hostkey" -f "$W/key.pub:/etc/cpud/authorized_keys" \
		"$BIN" -hk /etc/cpud/hostkey -pk /etc/cpud/authorized_keys 2>"$W/boot.log"); then
		ko "[entrypoint] cpud did not start in the guest: $(tail -3 "$W/boot.log")"
		VM_STATE="$W/vm"
		return
	fi
	eval "$out"
	ok "[entrypoint] guest up with cpud as PID 1 ($VM_ACCEL, ${VM_BOOT_SECONDS}s), host port $HOST_PORT"
	# The container is the client: its / is served over 9P and the guest binds the image's
	# /bin, /lib, /lib64, /etc ... over its own (a busybox initramfs: it has no bash).
	mkdir -p "$W/ssh"
	cp "$W/key" "$W/ssh/id_ed25519"
	cp "$W/hostkey.pub" "$W/ssh/hostkey.pub"
	local script='echo "$BASH_VERSION"; read -r line </etc/userland-marker; echo "$line"; read -r k v </proc/version; echo "$k"; while read -r dev mnt fs rest; do if [ "$mnt" = /tmp/cpu ]; then echo "$fs"; fi; done </proc/mounts'
	out=$(timeout -k 5 $((TIMEOUT * 2)) "${PODMAN[@]}" run --rm "${RUN_OPTS[@]}" --network host \
		-v "$BIN:/cpu:ro" -v "$W/ssh:/root/.ssh:ro" --entrypoint /cpu localhost/userland:test \
		-key /root/.ssh/id_ed25519 -hk /root/.ssh/hostkey.pub -sp "$HOST_PORT" 127.0.0.1 /bin/bash -c "$script" \
		</dev/null 2>"$W/err"); rc=$?
	check "[entrypoint] the guest ran the image's /bin/bash with the image's files over 9P" \
		"0 ${BASH_VERSION} userland $MARKER Linux 9p" "$rc $(echo $out)"
	if [ $rc != 0 ]; then
		tail -n 5 "$W/err" | sed 's/^/    client: /'
		grep -a -v '^\[ *[0-9.]*\] ' "$VM_CONSOLE" | tail -n 10 | sed 's/^/    guest: /'
	fi
	out=$(timeout -k 5 $((TIMEOUT * 2)) "${PODMAN[@]}" run --rm "${RUN_OPTS[@]}" --network host \
		-v "$BIN:/cpu:ro" -v "$W/ssh:/root/.ssh:ro" --entrypoint /cpu localhost/userland:test \
		-key /root/.ssh/id_ed25519 -hk /root/.ssh/hostkey.pub -sp "$HOST_PORT" 127.0.0.1 /bin/bash -c 'exit 5' \
		</dev/null 2>>"$W/err"); rc=$?
	check "[entrypoint] the remote exit status is the container's exit status" 5 $rc
	"$VM" stop "$VM_STATE" >/dev/null 2>&1
	VM_STATE=""
}

# ---------------------------------------------------------------------------------------------
# vmrunc: the cpud image under runc inside the qemu guest, where the kernel has 9p
# ---------------------------------------------------------------------------------------------
# The host kernel has no 9p, so a 9p session with cpud in a container is checked in the guest:
# Debian's runc (8.7 MB, with libseccomp and libc) is copied into the guest's initramfs with
# an OCI bundle made from the image's layer; the container gets CAP_SYS_ADMIN and nothing
# else. (podman in the guest would also need conmon, its storage and configuration: runc is
# the runtime podman itself runs here.)
make_bundle() { # make_bundle DIR: rootfs from the image's layer, config.json from `runc spec`
	local dir=$1 layer
	layer=$(python3 -c '
import json, sys
d = sys.argv[1] + "/blobs/sha256/"
idx = json.load(open(sys.argv[1] + "/index.json"))["manifests"][0]["digest"]
man = json.load(open(d + idx.split(":")[1]))["manifests"][0]["digest"]
print(d + json.load(open(d + man.split(":")[1]))["layers"][0]["digest"].split(":")[1])' "$W/img/layout") || return 1
	mkdir -p "$dir/rootfs" && tar -xzf "$layer" -C "$dir/rootfs" && runc spec -b "$dir" || return 1
	python3 - "$dir/config.json" <<'PY'
import json, sys
path = sys.argv[1]
c = json.load(open(path))
p = c["process"]
p["terminal"] = False
p["args"] = ["/bin/cpud", "-pk", "/key.pub", "-statedir", "/etc/cpud"]
p["env"] = ["PATH=/bin", "HOME=/root"]
p["capabilities"] = {k: ["CAP_SYS_ADMIN"] for k in ("bounding", "effective", "permitted")}
c["root"]["readonly"] = False
c["hostname"] = "cpud-runc"
c["mounts"] += [{"destination": d, "type": "bind", "source": "/keys" + d, "options": ["bind", "ro"]}
                for d in ("/key", "/key.pub")]
json.dump(c, open(path, "w"), indent=1)
PY
}

run_vmrunc_group() {
	command -v qemu-system-x86_64 >/dev/null || { skip "[vm runc] qemu-system-x86_64 is not installed"; return; }
	command -v runc >/dev/null || { skip "[vm runc] runc is not installed (apt-get install runc)"; return; }
	if [ ! -f "$W/img/cpu-all-oci.tar" ]; then mkdir -p "$W/img" && build_image "$W/img" || { ko "oci/mkoci failed"; return; }; fi
	make_bundle "$W/bundle" || { ko "[vm runc] making the bundle"; return; }
	local files=(-f "$(readlink -f "$(command -v runc)"):/usr/sbin/runc" -f "$W/bundle:/bundle"
		-f "$W/key:/keys/key" -f "$W/key.pub:/keys/key.pub") lib
	for lib in $(ldd "$(command -v runc)" | grep -o '/[^ ]*'); do files+=(-f "$(readlink -f "$lib"):$lib"); done
	local script='
r="runc --root /tmp/runc"
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
# --no-pivot: an initramfs root cannot be pivot_root(2)ed away.
$r run -d --no-pivot --bundle /bundle cpud </dev/null >/tmp/cpud.log 2>&1
rc=$?
echo "[oci-vm] run=$rc"
i=0; while [ $rc = 0 ] && [ $i -lt 240 ] && ! grep -q "Listening on" /tmp/cpud.log; do sleep 0.5; i=$((i + 1)); done
sed "s/^/[oci-vm] log: /" /tmp/cpud.log
out=$($r exec --env PWD=/root cpud /bin/cpu -key /key localhost /bin/cat /proc/mounts </dev/null 2>/tmp/cpu.err)
echo "[oci-vm] mounts=$? $(echo "$out" | grep " /tmp/cpu " | cut -d" " -f2,3)"
out=$($r exec --env PWD=/root cpud /bin/cpu -key /key localhost /bin/sh -c "read -r t k c </tmp/cpu/key.pub; echo \$c; grep CapEff /proc/self/status" </dev/null 2>>/tmp/cpu.err)
echo "[oci-vm] session=$? $(echo $out)"
sed "s/^/[oci-vm] cpu stderr: /" /tmp/cpu.err
$r kill cpud KILL; true'
	local log="$W/vmrunc.log" rc=0
	# In the background and waited for: a trapped TERM interrupts `wait` (not a foreground job).
	timeout 900 "$VM" --wait -m 768 "${files[@]}" -c "$script" "$BIN" >"$log.raw" 2>&1 &
	VM_TIMEOUT_PID=$!
	wait "$VM_TIMEOUT_PID"
	rc=$?
	VM_TIMEOUT_PID=""
	sed 's/^\[vm\] //' "$log.raw" >"$log"
	check "[vm runc] runc started the image's cpud in the guest" "[oci-vm] run=0" "$(grep -a -m1 '^\[oci-vm\] run=' "$log")"
	check "[vm runc] in-container cpu localhost: the guest kernel mounted the client's files (9p on /tmp/cpu)" \
		"[oci-vm] mounts=0 /tmp/cpu 9p" "$(grep -a -m1 '^\[oci-vm\] mounts=' "$log")"
	check "[vm runc] the session reads the container's /key.pub through /tmp/cpu, with CAP_SYS_ADMIN only" \
		"[oci-vm] session=0 cpu-oci-user CapEff: 0000000000200000" "$(grep -a -m1 '^\[oci-vm\] session=' "$log" | tr '\t' ' ')"
	if [ $rc != 0 ] || ! grep -aq '^\[oci-vm\] session=0' "$log"; then
		echo "    guest exit $rc; log tail:"
		grep -a -v '^\[ *[0-9.]*\] ' "$log" | tail -n 25 | sed 's/^/    /'
	fi
}

# ---------------------------------------------------------------------------------------------
# entrypoint-arm64: the same flow with a foreign-architecture image against an arm64 guest
# ---------------------------------------------------------------------------------------------
# Needs an aarch64 static cpu-all for cpud in the guest (make static ARCH=aarch64, or
# OCI_ARM64_BIN) and qemu-system-aarch64. The image is Debian arm64's bash, libc6 and libtinfo6
# (apt-get download with a private apt state, as vm/boot-test-vm fetches the arm64 kernel);
# the entrypoint is the host's own x86-64 cpu, so nothing is emulated on the host: only the
# guest runs the image's arm64 bash.
arm64_apt() {
	local d="$VM_CACHE/apt-arm64"
	mkdir -p "$d/lists/partial" "$d/archives/partial"; touch "$d/status"
	apt-get -o APT::Architecture=arm64 -o APT::Architectures::=arm64 \
		-o Dir::State::Lists="$d/lists" -o Dir::State::status="$d/status" \
		-o Dir::Cache::Archives="$d/archives" -o Dir::Cache::pkgcache="$d/pkgcache.bin" \
		-o Dir::Cache::srcpkgcache="$d/srcpkgcache.bin" "$@"
}

run_entrypoint_arm64_group() {
	local arm_bin=$(arm64_bin)
	[ -f "$arm_bin" ] || { skip "[entrypoint arm64] no aarch64 cpu-all ($arm_bin: make static ARCH=aarch64)"; return; }
	command -v qemu-system-aarch64 >/dev/null || { skip "[entrypoint arm64] qemu-system-aarch64 is not installed"; return; }
	setup_podman || return
	VM_CACHE=${VM_CACHE:-${HOME:-/tmp}/.cache/cpu-vm}
	local debs="$W/debs" tree="$W/userland-arm64" pkgs=(bash libc6 libtinfo6)
	mkdir -p "$debs" "$tree"
	if ! (cd "$debs" && arm64_apt download -q -o APT::Sandbox::User=root "${pkgs[@]}" >/dev/null 2>&1); then
		arm64_apt update -q >/dev/null 2>&1
		(cd "$debs" && arm64_apt download -q -o APT::Sandbox::User=root "${pkgs[@]}" >/dev/null 2>&1) ||
			{ skip "[entrypoint arm64] cannot download Debian arm64 ${pkgs[*]}"; return; }
	fi
	local deb
	for deb in "$debs"/*.deb; do dpkg -x "$deb" "$tree" || { ko "[entrypoint arm64] dpkg -x $deb"; return; }; done
	rm -rf "$tree/usr/share" "$tree"/usr/lib/*/gconv
	mkdir -p "$tree"/{etc,tmp,root,home,usr,lib64}
	MARKER=$RANDOM$RANDOM
	echo "userland $MARKER" >"$tree/etc/userland-marker"
	echo "root:x:0:0:root:/root:/bin/bash" >"$tree/etc/passwd"
	tar -C "$tree" --owner=0 --group=0 -cf "$W/userland-arm64.tar" .
	local out rc
	out=$(timeout 300 "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' "$W/userland-arm64.tar" localhost/userland-arm64:test 2>&1) ||
		{ ko "[entrypoint arm64] podman import: $out"; return; }
	[ -f "$W/hostkey" ] || ssh-keygen -q -t ed25519 -N '' -C cpud-host -f "$W/hostkey" </dev/null
	if ! out=$("$VM" --state "$W/vm64" --keep -f "$W/hostkey:/etc/cpud/hostkey" -f "$W/key.pub:/etc/cpud/authorized_keys" \
		"$arm_bin" -hk /etc/cpud/hostkey -pk /etc/cpud/authorized_keys 2>"$W/boot64.log"); then
		ko "[entrypoint arm64] cpud did not start in the arm64 guest: $(tail -3 "$W/boot64.log")"
		VM_STATE="$W/vm64"
		return
	fi
	eval "$out"
	ok "[entrypoint arm64] arm64 guest up with cpud as PID 1 ($VM_ACCEL, ${VM_BOOT_SECONDS}s), host port $HOST_PORT"
	mkdir -p "$W/ssh"
	cp "$W/key" "$W/ssh/id_ed25519"
	cp "$W/hostkey.pub" "$W/ssh/hostkey.pub"
	out=$(timeout -k 5 $((TIMEOUT * 3)) "${PODMAN[@]}" run --rm "${RUN_OPTS[@]}" --network host \
		-v "$BIN:/cpu:ro" -v "$W/ssh:/root/.ssh:ro" --entrypoint /cpu localhost/userland-arm64:test \
		-key /root/.ssh/id_ed25519 -hk /root/.ssh/hostkey.pub -sp "$HOST_PORT" 127.0.0.1 \
		/bin/bash -c 'echo "$HOSTTYPE"; read -r line </etc/userland-marker; echo "$line"' </dev/null 2>"$W/err"); rc=$?
	check "[entrypoint arm64] an x86-64 host runs the arm64 image's /bin/bash on the arm64 guest" \
		"0 aarch64 userland $MARKER" "$rc $(echo $out)"
	if [ $rc != 0 ]; then
		tail -n 5 "$W/err" | sed 's/^/    client: /'
		grep -a -v '^\[ *[0-9.]*\] ' "$VM_CONSOLE" | tail -n 10 | sed 's/^/    guest: /'
	fi
	"$VM" stop "$VM_STATE" >/dev/null 2>&1
	VM_STATE=""
}

for group in $GROUPS_TO_RUN; do
	case $group in
	image) run_image_group ;;
	podman) run_podman_group ;;
	entrypoint) run_entrypoint_group ;;
	vmrunc) run_vmrunc_group ;;
	entrypoint-arm64) run_entrypoint_arm64_group ;;
	*) echo "oci-tests: unknown group $group (image, podman, entrypoint, entrypoint-arm64, vmrunc)" >&2; exit 2 ;;
	esac
done
finish
