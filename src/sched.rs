//! Scheduling hints: the client and the daemon ask the kernel for a short time slice.
//!
//! A session is mostly waiting: for the peer's next SSH packet, a process start, a 9P reply.
//! On a busy host every wake-up then queues behind CPU-bound tasks: with the default slice
//! (about 1.4 ms on 2 cores), EEVDF lets the running task finish its protected slice and the
//! other runnable tasks with earlier deadlines go first, so each of the session's dozens of
//! wake-ups could wait milliseconds (`cpu -9p=false` on loopback went from 15 ms to 60-170 ms
//! with two busy loops beside it; `perf sched latency` showed the waits on wake-up, not CPU).
//! Linux 6.12 and later take `sched_attr.sched_runtime` of a SCHED_OTHER thread as its slice
//! request: a shorter slice gives an earlier deadline and lets a waking task preempt one with
//! a longer slice (PREEMPT_SHORT). It buys latency, not CPU: the share stays fair. Older
//! kernels ignore the field. This module owns only that call; it never changes the policy or
//! the nice value, and it never raises a priority.

/// The slice asked for: the kernel's minimum (0.1 ms).
pub const SHORT_SLICE_NS: u64 = 100_000;

const SCHED_OTHER: u32 = 0;

/// `struct sched_attr`, first version (48 bytes): all a SCHED_OTHER slice needs.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Asks for [`SHORT_SLICE_NS`] for the calling thread; threads and processes it creates later
/// inherit it. Call before starting threads. Failures are ignored (the hint is optional).
pub fn request_short_slice() {
    set_slice(SHORT_SLICE_NS);
}

/// Back to the kernel's default slice for the calling thread (before exec'ing a user's
/// command: a long computation should not be cut into 0.1 ms pieces).
pub fn restore_default_slice() {
    set_slice(0);
}

/// The calling thread's slice in ns as sched_getattr reports it (6.12 and later: the request,
/// or the default slice when there is none).
pub fn current_slice_request() -> Option<u64> {
    current().map(|a| a.runtime)
}

fn current() -> Option<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as libc::c_uint;
    // SAFETY: sched_getattr writes at most `size` bytes into `attr`, a valid, writable,
    // correctly sized struct; pid 0 is the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut SchedAttr, size, 0) };
    (r == 0).then_some(attr)
}

fn set_slice(runtime_ns: u64) {
    // Keep policy and nice as they are: only a SCHED_OTHER thread gets a slice request.
    let Some(mut attr) = current() else { return };
    if attr.policy != SCHED_OTHER || attr.runtime == runtime_ns {
        return;
    }
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    attr.flags = 0;
    attr.runtime = runtime_ns;
    attr.deadline = 0;
    attr.period = 0;
    // SAFETY: sched_setattr reads `size` bytes from `attr`, a valid, initialised struct; pid 0
    // is the calling thread; policy and nice are the thread's own, so nothing is raised.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r != 0 {
        log::debug!("sched_setattr (slice {runtime_ns} ns): {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_slice_then_default_keeps_the_nice_value() {
        // On a thread of its own: the test harness's other threads keep theirs.
        std::thread::spawn(|| {
            let before = current().expect("sched_getattr works on Linux");
            request_short_slice();
            let after = current().expect("sched_getattr");
            assert_eq!(after.nice, before.nice);
            assert_eq!(after.policy, before.policy);
            // Kernels from 6.12 report the request back (older ones report their own slice).
            if after.runtime == SHORT_SLICE_NS {
                restore_default_slice();
                assert_ne!(current_slice_request(), Some(SHORT_SLICE_NS));
            }
        })
        .join()
        .expect("the test thread");
    }
}
