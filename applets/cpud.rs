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
        // PID 1 must not exit (the kernel would panic): serve with the boot defaults instead.
        Err(e) if cpu_all::init::is_pid1() => {
            eprintln!("{applet}: {e}; running as init with the default flags");
            match cpu_all::init::fallback_options() {
                Ok(o) => o,
                Err(e) => {
                    cpu_all::error::report(applet, &e);
                    cpu_all::init::hang()
                }
            }
        }
        Err(e) => return crate::flag_failure(applet, &usage, &e),
    };
    serve(applet, opts)
}

/// `/init`, a link to cpu-all named `init`: `cpud -init` with the boot files of
/// `make initramfs` (see `cpu_all::init::boot_args`). The words the kernel passes to init
/// are not cpud flags and are ignored.
pub fn init_main(_kernel_args: Vec<OsString>) -> i32 {
    let opts = match cpu_all::init::boot_options(std::path::Path::new(cpu_all::init::BOOT_FLAGS_FILE)) {
        Ok(o) => o,
        Err(e) => {
            cpu_all::error::report("init", &e);
            cpu_all::init::hang()
        }
    };
    serve("cpud", opts)
}

/// The daemon, supervised by `cpu_all::init` when `-init` is given or we are PID 1.
fn serve(applet: &'static str, opts: CpudOptions) -> i32 {
    cpu_all::logger::init(applet, opts.debug, opts.klog);
    let as_init = opts.init || cpu_all::init::is_pid1();
    let result = if as_init { cpu_all::init::run_as_init(opts, run_daemon) } else { run_daemon(opts) };
    match result {
        Ok(()) => 0,
        Err(e) => {
            cpu_all::error::report(applet, &e);
            if cpu_all::init::is_pid1() {
                cpu_all::init::hang()
            }
            e.exit_code()
        }
    }
}

/// cpud, or decpud announcing itself by DNS-SD (unless `-dnssd=false`) with its tenant count.
fn run_daemon(opts: CpudOptions) -> cpu_all::Result<()> {
    if opts.dnssd.enabled {
        cpu_all::discovery::run_decpud(opts, cpu_all::server::run_with_tenants)
    } else {
        cpu_all::server::run(opts)
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
