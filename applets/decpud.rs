//! `decpud [flags]`: cpud that also announces itself over DNS-SD.

use std::ffi::OsString;

pub fn main(args: Vec<OsString>) -> i32 {
    crate::cpud::daemon_main("decpud", args, true)
}
