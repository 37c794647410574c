//! PID 1 duties for `cpud -init`: basic mounts, loopback, reaping orphans.
