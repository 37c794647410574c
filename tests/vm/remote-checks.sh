#!/bin/sh
# Guest half of the `cpud -remote` checks (busybox sh; run by vm/boot-test-vm --cmd, as PID 1's
# child). Runs the real `cpud -remote` with the environment a session would give it, without
# an SSH server: the 9P back-channel is a busybox `nc` relay to a diod on the host that drops
# the nonce (and keeps it for comparison). Prints PASS:/FAIL: lines; the host counts them.
#   MODE=basic   namespace, tmpfs, fstab, mount points, $PWD, exit statuses, no leaks
#   MODE=ninep   the 9P mount (needs DIOD_PORT, SHARE on the host; ROOT_EXPORT=1: host / too)
#   MODE=no9p    a kernel without 9p: the clear message and status 125
#   MODE=modprobe  9p not loaded at boot: `modprobe 9p` makes the mount work
R="cpu-all cpud -remote"
ok() { echo "PASS: $*"; }
ko() { echo "FAIL: $*"; }
check() { # check NAME EXPECTED ACTUAL
	if [ "$2" = "$3" ]; then ok "$1"; else ko "$1: expected [$2] got [$3]"; fi
}
contains() { # contains NAME NEEDLE FILE
	if grep -qF -- "$2" "$3"; then ok "$1"; else ko "$1: no [$2] in: $(cat "$3")"; fi
}
session_mounts() { grep -c ' - tmpfs cpu \| /tmp/cpu \| - 9p ' /proc/1/mountinfo; }
# wait_listening PORT: until something listens on PORT (at most 5 s; says so when it gave up).
# busybox nc listens on the IPv6 wildcard: the port shows in /proc/net/tcp6, not tcp.
wait_listening() {
	i=0
	until awk -v p="$(printf ':%04X' "$1")" '$4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
		/proc/net/tcp /proc/net/tcp6 2>/dev/null; do
		[ $i -ge 50 ] && { echo "nothing listens on port $1 after 5 s; going on" >&2; return 1; }
		usleep 100000
		i=$((i + 1))
	done
}

# relay LISTEN_PORT HOST_PORT: accept one connection (busybox nc listens on all addresses), keep the first
# 32 bytes (the nonce) in /run/nonce.got, and splice the rest to the host's diod.
relay() {
	cat >/run/relay.sh <<-R
	#!/bin/sh
	dd bs=32 count=1 of=/run/nonce.got 2>/dev/null
	exec nc 10.0.2.2 $2
	R
	chmod +x /run/relay.sh
	rm -f /run/nonce.got
	nc -l -p "$1" -e /run/relay.sh &
	wait_listening "$1"
}

case ${MODE:-basic} in
basic)
	mkdir -p /srv/data && echo bound >/srv/data/f.txt && echo one >/srv/one.txt
	before=$(session_mounts)

	out=$(PWD=/ $R sh -c 'grep " /tmp " /proc/self/mountinfo | tail -1 | cut -d" " -f9-; ls -d /tmp/cpu /tmp/local/srv')
	check "tmpfs on /tmp, /tmp/cpu and /tmp/local (server root) in the session" "cpu rw,inode64
/tmp/cpu
/tmp/local/srv" "$out"

	out=$(TMPDIR=/nonexistent PWD=/ $R sh -c 'grep -c " /tmp rw.* - tmpfs cpu " /proc/self/mountinfo')
	check "the tmpfs goes on /tmp even with the client's TMPDIR set" 1 "$out"

	FSTAB='
# comment line
/srv/data /mnt/new/dir none bind 0 0
/srv/one.txt /etc/one.txt none defaults,bind 0 0
/srv/data /srv/ro none bind,ro 0 0
too few fields
/nosuch /mnt/x none bind 0 0
'
	out=$(CPU_FSTAB="$FSTAB" PWD=/mnt/new/dir $R sh -c 'cat f.txt /etc/one.txt; pwd; echo x > /srv/ro/w 2>/dev/null || echo ro' 2>/run/err)
	check "fstab binds (dir and file) onto created mount points; ro bind; cwd inside a bind" "bound
one
/mnt/new/dir
ro" "$out"
	contains "missing bind source is a warning naming it" "/nosuch does not exist; /mnt/x is left as it is" /run/err
	[ ! -e /etc/one.txt ] || [ ! -s /etc/one.txt ] && ok "file mount point is an empty file outside the session" || ko "file mount point"

	out=$(LC_GLENDA_CPU_FSTAB='/srv/data /mnt/lc none bind 0 0' PWD=/ $R cat /mnt/lc/f.txt)
	check "LC_GLENDA_CPU_FSTAB is applied when CPU_FSTAB is absent" bound "$out"

	out=$(CPU_FSTAB=x CPU_MSIZE=1 CPU_MOUNTOPTS=y LC_GLENDA_CPU_FSTAB=z PWD=/ $R sh -c 'env | grep -c "CPU" || true')
	check "session variables are not passed to the command" 0 "$out"

	out=$(PWD=/does/not/exist $R pwd 2>/run/err)
	check "missing \$PWD falls back to /" / "$out"
	contains "missing \$PWD warns" 'your $PWD "/does/not/exist" is not in the remote namespace' /run/err

	PWD=/ $R sh -c 'exit 7'; check "exit status passes through" 7 $?
	PWD=/ $R nosuchcommand 2>/run/err; check "command not found is 127" 127 $?
	contains "command not found message" "nosuchcommand: command not found" /run/err
	PWD=/ $R /srv/data/f.txt 2>/dev/null; check "not executable is 126" 126 $?
	PWD=/ $R sh -c 'kill -KILL $$'; check "fatal signal reaches the parent (128+9)" 137 $?
	CPUNONCE=0123456789abcdef0123456789abcdef PWD=/ $R true 2>/run/err; check "setup failure is 125" 125 $?
	contains "setup failure message" "CPUNONCE is set but no -port9p was given" /run/err
	CPUNONCE=0123456789abcdef0123456789abcdef CPU_MOUNTOPTS=trans=tcp PWD=/ $R -port9p=1 true 2>/run/err
	check "CPU_MOUNTOPTS may not override trans= (125)" 125 $?
	# A back-channel that accepts and never answers: the mount must not hang forever.
	printf '#!/bin/sh\nexec sleep 90\n' >/run/mute.sh && chmod +x /run/mute.sh
	nc -l -p 5650 -e /run/mute.sh &
	mute=$!
	wait_listening 5650
	t0=$(date +%s)
	CPUNONCE=0123456789abcdef0123456789abcdef PWD=/ $R -port9p=5650 true 2>/run/err
	check "a 9p server that never answers: status 125" 125 $?
	contains "a 9p server that never answers: message" "the client's 9p server did not answer within 30 s" /run/err
	t=$(($(date +%s) - t0)); [ $t -le 40 ] && ok "gave up after ${t}s" || ko "gave up only after ${t}s"
	# The mute server (nc exec'd its sleep 90) is done with: the `wait` below waited for it.
	kill $mute 2>/dev/null
	su -s /bin/sh -c "cpu-all cpud -remote true" nobody 2>/run/err; check "unshare refused (not root): status 125" 125 $?
	contains "unshare refused: its own message" "cannot create a private mount namespace: need CAP_SYS_ADMIN (is cpud running as root?)" /run/err
	out=$(printf 'line1\nline2\n' | PWD=/ $R wc -l)
	check "stdin reaches the command" 2 "$out"

	# Five sessions at once, each with its own bind; none sees another's.
	pids=""
	for i in 1 2 3 4 5; do
		mkdir -p /srv/s$i && echo $i >/srv/s$i/id
		CPU_FSTAB="/srv/s$i /mnt/session none bind 0 0" PWD=/ $R sh -c 'sleep 1; cat /mnt/session/id' >/run/par.$i &
		pids="$pids $!"
	done
	wait $pids
	out=$(cat /run/par.1 /run/par.2 /run/par.3 /run/par.4 /run/par.5 | tr '\n' ' ')
	check "five parallel sessions each see their own bind" "1 2 3 4 5 " "$out"

	after=$(session_mounts)
	check "no session mount leaked into PID 1's namespace" "$before" "$after"
	check "no bind on /mnt/new/dir outside" 0 "$(grep -c ' /mnt/new/dir ' /proc/1/mountinfo)"
	zombies=$(grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l)
	check "no zombie processes" 0 "$zombies"
	;;
no9p)
	grep -q '9p' /proc/filesystems && ko "9p is present (boot with --no-9p)"
	CPUNONCE=0123456789abcdef0123456789abcdef PWD=/ $R -port9p=5640 true 2>/run/err
	check "kernel without 9p: status 125" 125 $?
	contains "kernel without 9p: clear message" "the remote kernel has no 9p support (CONFIG_9P_FS, module 9p); run cpu with -9p=false" /run/err
	PWD=/ $R true; check "without CPUNONCE the session runs on a kernel without 9p" 0 $?
	;;
ninep | modprobe)
	NONCE=0123456789abcdef0123456789abcdef
	if [ "$MODE" = modprobe ]; then
		grep -qw 9p /proc/filesystems && ko "9p already loaded (boot with --no-load 9p)"
	fi
	relay 5640 "$DIOD_PORT"
	out=$(USER=root CPUNONCE=$NONCE CPU_MOUNTOPTS="aname=$SHARE" PWD=/tmp/cpu $R -d -port9p=5640 \
		sh -c 'cat hello.txt; echo written-in-guest > from-guest.txt; grep " /tmp/cpu " /proc/self/mountinfo' 2>/run/err)
	rc=$?
	check "9p session status" 0 $rc
	check "nonce written first on the back-channel" "$NONCE" "$(cat /run/nonce.got 2>/dev/null)"
	case $out in "hello from the host"*) ok "host file read through /tmp/cpu" ;; *) ko "host file: [$out] $(cat /run/err)" ;; esac
	case $out in *"- 9p localhost "*trans=fd*) ok "9p mounted with trans=fd: $(echo "$out" | grep -o 'msize=[0-9]*')" ;; *) ko "mountinfo: [$out]" ;; esac
	case $out in *nosuid*nodev*|*nodev*nosuid*) ok "9p mount is nosuid,nodev" ;; *) ko "flags: [$out]" ;; esac
	contains "debug log names the msize" "with msize=" /run/err
	if [ "$MODE" = modprobe ]; then grep -qw 9p /proc/filesystems && ok "modprobe 9p loaded the module" || ko "9p not loaded"; fi
	if [ "${ROOT_EXPORT:-0}" = 1 ]; then
		FSTAB='
/tmp/cpu/lib /lib none defaults,bind 0 0
/tmp/cpu/lib64 /lib64 none defaults,bind 0 0
/tmp/cpu/usr /usr none defaults,bind 0 0
/tmp/cpu/bin /bin none defaults,bind 0 0
/tmp/cpu/etc /etc none defaults,bind 0 0
'
		# No /lib64 in the guest: a dynamically linked host program cannot start without the
		# client's (its loader lives there); the session must say so.
		rmdir /lib64 || ko "cannot remove the guest's empty /lib64"
		relay 5642 "$DIOD_PORT"
		NOLIB64=$(echo "$FSTAB" | grep -v lib64)
		USER=root CPUNONCE=$NONCE CPU_FSTAB="$NOLIB64" CPU_MOUNTOPTS="aname=/" PATH=/usr/bin:/bin PWD=/ \
			$R -port9p=5642 /usr/bin/expr 6 '*' 7 2>/run/err
		check "no /lib64: exec fails with 127" 127 $?
		contains "no /lib64: the message names the missing loader" "its program interpreter (dynamic loader) or a library is missing here" /run/err
		# With the client's /lib64 in the fstab, the mount point is created (initramfs root).
		relay 5641 "$DIOD_PORT"
		# A small dynamically linked host program (its loader, libc and libgmp through the
		# binds): python3 proved the same with seconds of module reads under TCG.
		out=$(USER=root CPUNONCE=$NONCE CPU_FSTAB="$FSTAB" CPU_MOUNTOPTS="aname=/" PATH=/usr/bin:/bin PWD=/ \
			$R -port9p=5641 /usr/bin/expr 6 '*' 7 2>/run/err)
		check "host /usr/bin/expr (dynamically linked: loader, libc, libgmp) runs through the default namespace" 42 "$out"
		[ "$out" = 42 ] || cat /run/err
		[ -d /lib64 ] && ok "the missing /lib64 mount point was created on the initramfs" || ko "/lib64 not created"
	fi
	check "no 9p mount leaked into PID 1's namespace" 0 "$(grep -c ' - 9p ' /proc/1/mountinfo)"
	;;
esac
