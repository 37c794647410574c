//! The `cpu-all` multicall binary: picks the applet from the basename of argv[0]
//! (`cpu`, `cpud`, `decpu`, `decpud`), or from the first argument of `cpu-all APPLET ...`.

mod cpu;
mod cpud;
mod decpu;
mod decpud;

use std::ffi::OsString;
use std::path::Path;

/// One applet: its name, a one-line description, and its entry point (args without argv[0]).
struct Applet {
    name: &'static str,
    about: &'static str,
    main: fn(Vec<OsString>) -> i32,
}

const APPLETS: &[Applet] = &[
    Applet { name: "cpu", about: "run a command on a remote machine that sees your files", main: cpu::main },
    Applet { name: "cpud", about: "the cpu daemon (SSH on port 17010)", main: cpud::main },
    Applet { name: "decpu", about: "cpu that picks its server by DNS-SD", main: decpu::main },
    Applet { name: "decpud", about: "cpud that announces itself by DNS-SD", main: decpud::main },
];

fn find(name: &str) -> Option<&'static Applet> {
    APPLETS.iter().find(|a| a.name == name)
}

fn overview() -> String {
    let mut s = String::from(
        "Usage: cpu-all APPLET [args...]   (or call it through a link named after the applet)\n\nApplets:\n",
    );
    for a in APPLETS {
        s.push_str(&format!("  {:<8} {}\n", a.name, a.about));
    }
    s.push_str("\ncpu-all --version   version, commit and target\ncpu-all APPLET -h   the applet's flags\n");
    s
}

fn main() {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let argv0 = if args.is_empty() { OsString::from("cpu-all") } else { args.remove(0) };
    let base = Path::new(&argv0).file_name().map(|b| b.to_string_lossy().into_owned()).unwrap_or_default();
    let code = match find(&base) {
        Some(applet) => (applet.main)(args),
        // An initramfs's /init links to cpu-all: run cpud -init with the boot files.
        None if base == "init" => cpud::init_main(args),
        None => multicall(args),
    };
    std::process::exit(code);
}

/// `cpu-all [APPLET] ...`
fn multicall(mut args: Vec<OsString>) -> i32 {
    if args.is_empty() {
        print!("{}", overview());
        return 0;
    }
    let first = args.remove(0);
    let first = first.to_string_lossy();
    match first.as_ref() {
        "-h" | "-help" | "--help" | "help" => {
            print!("{}", overview());
            0
        }
        "-version" | "--version" | "version" => {
            println!("{}", cpu_all::version_line());
            0
        }
        name => {
            match find(name) {
                Some(applet) => (applet.main)(args),
                None => {
                    eprintln!("cpu-all: unknown applet {name:?}; applets: cpu, cpud, decpu, decpud (cpu-all --help)");
                    2
                }
            }
        }
    }
}

/// Shared handling of a flag error: usage on -h and the version on --version (exit 0), else
/// one line and a hint (exit 2).
pub fn flag_failure(applet: &str, usage: &str, err: &cpu_all::flags::FlagError) -> i32 {
    match err {
        cpu_all::flags::FlagError::Help => {
            print!("{usage}");
            return 0;
        }
        cpu_all::flags::FlagError::Version => {
            println!("{}", cpu_all::version_line());
            return 0;
        }
        _ => {}
    }
    eprintln!("{applet}: {err}");
    eprintln!("Run '{applet} -h' for usage.");
    cpu_all::error::EXIT_USAGE
}
