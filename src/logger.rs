//! A small logger for the `log` facade: stderr, or the kernel log (`-klog`).
//!
//! `-d` turns on debug messages; `RUST_LOG` (error, warn, info, debug, trace) overrides the
//! level. Other crates (russh, mdns-sd) log at warn and above unless `RUST_LOG` asks for more,
//! so `-d` shows our own story. Lines are `applet: message`, and end in `\r\n` when stderr is a raw terminal so
//! they stay readable during a pty session.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    applet: &'static str,
    /// `-klog`: write to /dev/kmsg. It is opened on first use, because a cpud that is PID 1
    /// initialises the logger before it has mounted /dev.
    klog: bool,
    kmsg: std::sync::Mutex<Option<std::fs::File>>,
}

/// Whether `RUST_LOG` chose the level (then every crate logs at it).
static LEVEL_FROM_ENV: AtomicBool = AtomicBool::new(false);

static LOGGER: OnceLock<Logger> = OnceLock::new();
static RAW_TERMINAL: AtomicBool = AtomicBool::new(false);

/// Tell the logger that the local terminal is in raw mode (lines need `\r\n`).
pub fn set_raw_terminal(raw: bool) {
    RAW_TERMINAL.store(raw, Ordering::Relaxed);
}

/// Installs the logger once; later calls only change the level.
pub fn init(applet: &'static str, debug: bool, klog: bool) {
    let from_env = std::env::var("RUST_LOG").ok().and_then(|v| v.parse::<LevelFilter>().ok());
    LEVEL_FROM_ENV.store(from_env.is_some(), Ordering::Relaxed);
    let level = from_env.unwrap_or(if debug { LevelFilter::Debug } else { LevelFilter::Info });
    let logger = LOGGER.get_or_init(|| Logger { applet, klog, kmsg: std::sync::Mutex::new(None) });
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        if metadata.level() > log::max_level() {
            return false;
        }
        let ours = metadata.target().starts_with("cpu_all");
        ours || metadata.level() <= Level::Warn || LEVEL_FROM_ENV.load(Ordering::Relaxed)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let prefix = match record.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            _ => "",
        };
        if self.klog {
            // Kernel log priorities: 3 err, 4 warning, 6 info, 7 debug.
            let prio = match record.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                _ => 7,
            };
            if let Ok(mut k) = self.kmsg.lock() {
                if k.is_none() {
                    *k = std::fs::OpenOptions::new().write(true).open("/dev/kmsg").ok();
                }
                if let Some(f) = k.as_mut() {
                    // One write(2) per record: /dev/kmsg makes a log entry of each write.
                    let line = format!("<{prio}>{}: {prefix}{}\n", self.applet, record.args());
                    let _ = f.write_all(line.as_bytes());
                    return;
                }
            }
        }
        let end = if RAW_TERMINAL.load(Ordering::Relaxed) { "\r\n" } else { "\n" };
        let line = format!("{}: {prefix}{}{end}", self.applet, record.args());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}
