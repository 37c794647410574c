//! `decpu [flags] [host|dnssd://...|.] [command...]`: flags, then [`cpu_all::discovery::run_decpu`].

use std::ffi::OsString;

use cpu_all::options::{decpu_flags, CpuOptions};

pub fn main(args: Vec<OsString>) -> i32 {
    let opts = match CpuOptions::from_decpu_args(args) {
        Ok(o) => o,
        Err(e) => return crate::flag_failure("decpu", &decpu_flags().usage(), &e),
    };
    // No words at all: show how to call it rather than browse for nothing in particular.
    if opts.host.is_none() {
        eprint!("{}", decpu_flags().usage());
        eprintln!("decpu: missing host: give '.' (the best server around), a dnssd:// URI or a host name");
        return cpu_all::error::EXIT_USAGE;
    }
    cpu_all::logger::init("decpu", opts.debug, false);
    match cpu_all::discovery::run_decpu(opts) {
        Ok(status) => status,
        Err(e) => {
            cpu_all::error::report("decpu", &e);
            e.exit_code()
        }
    }
}
