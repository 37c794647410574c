//! `cpud [flags]`: the daemon, or with `-remote` as the first argument the per-session side.

use std::ffi::OsString;

use cpu_all::options::{cpud_flags, CpudOptions, RemoteOptions};

pub fn main(args: Vec<OsString>) -> i32 {
    daemon_main("cpud", args, false)
}

/// Shared by cpud and decpud.
pub fn daemon_main(applet: &'static str, args: Vec<OsString>, decpud: bool) -> i32 {
    // Remote mode only when -remote is the very first argument (spec 4.2).
    if args.first().is_some_and(|a| a == "-remote" || a == "-remote=true") {
        return remote_main(applet, args);
    }
    let usage = if decpud { cpu_all::options::decpud_flags().usage() } else { cpud_flags().usage() };
    let opts = match CpudOptions::from_args(args, decpud) {
        Ok(o) => o,
        Err(e) => return crate::flag_failure(applet, &usage, &e),
    };
    cpu_all::logger::init(applet, opts.debug, opts.klog);
    match cpu_all::server::run(opts) {
        Ok(()) => 0,
        Err(e) => {
            cpu_all::error::report(applet, &e);
            e.exit_code()
        }
    }
}

fn remote_main(applet: &'static str, args: Vec<OsString>) -> i32 {
    let opts = match RemoteOptions::from_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{applet} -remote: {e}");
            return cpu_all::error::EXIT_USAGE;
        }
    };
    cpu_all::logger::init(applet, opts.debug, false);
    match cpu_all::remote::run(opts) {
        Ok(status) => status,
        Err(e) => {
            cpu_all::error::report(applet, &e);
            e.exit_code()
        }
    }
}
