# Sourced by bench/cpu.bench and bench/control.bench: timing one command without timing the
# harness. `$(date +%s%N)` twice and a `timeout` around every run cost two forks, two execs and
# a process layer per run (5 ms idle, 16 ms beside two busy loops on this 2-core machine, about
# half of what a loopback session takes), so: the clock is bash's $EPOCHREALTIME (no process),
# the command runs as this shell's own child, and one watchdog for the whole bench ends a run
# that takes longer than the limit (by its PID), saying so.
#
#   bounded_start LIMIT_SECONDS WORKDIR   once, before the first run
#   bounded CMD...                        stdin /dev/null, stdout dropped, stderr in
#                                         $bounded_err; sets last_us; returns CMD's status
#   bounded_stop                          at the end (the watchdog also ends with this shell)

# Microseconds since the epoch, from $EPOCHREALTIME (whatever the locale's decimal point).
now_us() {
	local t=${EPOCHREALTIME//[!0-9]/}
	echo "${t#0}"
}

bounded_start() {
	bounded_limit=$1
	bounded_pidfile=$2/bounded.pid
	bounded_err=$2/bounded.err
	: >"$bounded_pidfile"
	local parent=$$
	(
		last='' waited=0
		while sleep 2; do
			kill -0 "$parent" 2>/dev/null || exit 0
			cur=''
			read -r cur <"$bounded_pidfile" 2>/dev/null
			if [ -n "$cur" ] && [ "$cur" = "$last" ]; then waited=$((waited + 2)); else last=$cur waited=0; fi
			if [ -n "$cur" ] && [ "$waited" -ge "$bounded_limit" ]; then
				echo "bench: run $cur still going after $bounded_limit s: ended it" >&2
				kill "$cur" 2>/dev/null
				waited=0
			fi
		done
	) </dev/null >/dev/null &
	bounded_watchdog=$!
}

bounded() {
	local start end pid status t
	t=${EPOCHREALTIME//[!0-9]/}
	start=${t#0}
	"$@" </dev/null >/dev/null 2>"$bounded_err" &
	pid=$!
	echo "$pid" >"$bounded_pidfile"
	wait "$pid"
	status=$?
	t=${EPOCHREALTIME//[!0-9]/}
	end=${t#0}
	: >"$bounded_pidfile"
	last_us=$((end - start))
	return "$status"
}

bounded_stop() {
	[ -n "${bounded_watchdog:-}" ] && kill "$bounded_watchdog" 2>/dev/null && wait "$bounded_watchdog" 2>/dev/null
	bounded_watchdog=
}
