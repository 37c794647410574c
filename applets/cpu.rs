//! `cpu [flags] host [command...]`: flags, then [`cpu_all::client::run`].

use std::ffi::OsString;

use cpu_all::options::{cpu_flags, CpuOptions};

pub fn main(args: Vec<OsString>) -> i32 {
    let opts = match CpuOptions::from_cpu_args(args) {
        Ok(o) => o,
        Err(e) => return crate::flag_failure("cpu", &cpu_flags().usage(), &e),
    };
    if opts.host.is_none() {
        eprint!("{}", cpu_flags().usage());
        eprintln!("cpu: missing host");
        return cpu_all::error::EXIT_USAGE;
    }
    cpu_all::logger::init("cpu", opts.debug, false);
    match cpu_all::client::run(opts) {
        Ok(status) => status,
        Err(e) => {
            cpu_all::error::report("cpu", &e);
            e.exit_code()
        }
    }
}
