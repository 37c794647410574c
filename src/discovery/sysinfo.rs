//! The TXT metadata a decpud announces (spec 7.2): Go's names for architecture and OS, the
//! number of logical CPUs, memory from /proc/meminfo, CPU busy percentage from /proc/stat,
//! the number of sessions, and the user's `-dsTxt` pairs.
//!
//! Pure parsing lives in small functions that tests feed with fixed text; only
//! [`Metadata::txt`] reads /proc.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Go's GOARCH name for the architecture this binary was built for (`amd64`, not `x86_64`).
pub fn go_arch() -> &'static str {
    let little = cfg!(target_endian = "little");
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" if little => "arm64",
        "aarch64" => "arm64be",
        "arm" => "arm",
        "riscv64" => "riscv64",
        "powerpc64" if little => "ppc64le",
        "powerpc64" => "ppc64",
        "powerpc" => "ppc",
        "mips64" if little => "mips64le",
        "mips64" => "mips64",
        "mips" if little => "mipsle",
        "mips" => "mips",
        "s390x" => "s390x",
        "loongarch64" => "loong64",
        "sparc64" => "sparc64",
        "wasm32" => "wasm",
        other => other,
    }
}

/// Go's GOOS name for the operating system this binary was built for.
pub fn go_os() -> &'static str {
    match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    }
}

/// Number of logical CPUs this process may use: its affinity mask, as Go's runtime.NumCPU
/// counts. (Not `std::thread::available_parallelism`, which also reads cgroup quotas: ~9 KB of
/// the binary for a figure Go does not report, README "Size".)
pub fn logical_cpus() -> usize {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) if set.count() > 0 => set.count() as usize,
        _ => 1,
    }
}

/// Memory figures in bytes from /proc/meminfo text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub available: u64,
    pub total: u64,
}

/// Parses /proc/meminfo text (`MemTotal:  16314200 kB`). None if either line is missing.
pub fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.split(':').next() == Some(name))?;
        let mut words = line.split(':').nth(1)?.split_whitespace();
        let number: u64 = words.next()?.parse().ok()?;
        let scale = match words.next() {
            Some("kB") => 1024,
            None => 1,
            Some(_) => return None,
        };
        number.checked_mul(scale)
    };
    Some(MemInfo { available: field("MemAvailable")?, total: field("MemTotal")? })
}

/// Cumulative CPU times from the first (`cpu `) line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// Ticks spent doing anything but idling or waiting for I/O.
    pub busy: u64,
    /// All ticks (guest time is already part of user and nice, so it is not added again).
    pub total: u64,
}

/// Parses the aggregate `cpu` line of /proc/stat.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(|w| w.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    if fields.len() < 4 {
        return None;
    }
    let total = fields.iter().take(8).fold(0u64, |sum, f| sum.saturating_add(*f));
    let idle = fields[3].saturating_add(fields.get(4).copied().unwrap_or(0));
    Some(CpuTimes { busy: total.saturating_sub(idle), total })
}

/// Busy percentage between two samples (gopsutil `Percent(0, false)` semantics), 0..=100,
/// as Go's `%f` writes it (six decimals, rounded). Integer arithmetic: float formatting would
/// cost the binary ~12 KB (README "Size").
pub fn busy_percent(previous: CpuTimes, now: CpuTimes) -> String {
    let total = u128::from(now.total.saturating_sub(previous.total));
    let busy = u128::from(now.busy.saturating_sub(previous.busy)).min(total);
    // Millionths of a percent, rounded half up.
    let micro = if total == 0 { 0 } else { (busy * 200_000_000 + total) / (2 * total) };
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

/// Parses `-dsTxt`: `k=v,k2=v2,flag` (a bare `flag` means `flag=true`).
///
/// Keys must be printable ASCII without `=` (RFC 6763 6.4) and `key=value` must fit in the
/// 255 bytes of one TXT string.
pub fn parse_user_txt(spec: &str) -> Result<BTreeMap<String, String>> {
    let mut pairs = BTreeMap::new();
    for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => (item, "true"),
        };
        if key.is_empty() {
            return Err(Error::Usage(format!("-dsTxt: {item:?} has an empty key")));
        }
        if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(Error::Usage(format!("-dsTxt: key {key:?} must be printable ASCII")));
        }
        if key.len() + 1 + value.len() > 255 {
            return Err(Error::Usage(format!("-dsTxt: {key}=... is longer than 255 bytes")));
        }
        pairs.insert(key.to_string(), value.to_string());
    }
    Ok(pairs)
}

/// Keys recomputed at every refresh; a `-dsTxt` value for them would be overwritten.
pub const DYNAMIC_KEYS: [&str; 4] = ["cpu.pcnt", "mem.avail", "mem.total", "tenants"];

/// The announcement's TXT map: fixed pairs computed once plus the figures of each refresh.
#[derive(Debug)]
pub struct Metadata {
    fixed: BTreeMap<String, String>,
    last_cpu: Option<CpuTimes>,
}

impl Metadata {
    /// Computes arch, os and cores once and lays the user's pairs over them.
    pub fn new(user_txt: &str) -> Result<Self> {
        let mut fixed = BTreeMap::new();
        fixed.insert("arch".to_string(), go_arch().to_string());
        fixed.insert("os".to_string(), go_os().to_string());
        fixed.insert("cores".to_string(), logical_cpus().to_string());
        for (k, v) in parse_user_txt(user_txt)? {
            if DYNAMIC_KEYS.contains(&k.as_str()) {
                log::warn!("-dsTxt: {k} is computed by decpud; the given value is ignored");
                continue;
            }
            fixed.insert(k, v);
        }
        let last_cpu = read_cpu_times();
        Ok(Metadata { fixed, last_cpu })
    }

    /// The full TXT map now: fixed pairs, memory, CPU busy since the previous call, tenants.
    pub fn txt(&mut self, tenants: usize) -> BTreeMap<String, String> {
        let mut txt = self.fixed.clone();
        if let Some(mem) = std::fs::read_to_string("/proc/meminfo").ok().as_deref().and_then(parse_meminfo) {
            txt.insert("mem.avail".into(), mem.available.to_string());
            txt.insert("mem.total".into(), mem.total.to_string());
        }
        let now = read_cpu_times();
        let pcnt = match (self.last_cpu, now) {
            (Some(prev), Some(now)) => busy_percent(prev, now),
            _ => busy_percent(CpuTimes::default(), CpuTimes::default()),
        };
        if now.is_some() {
            self.last_cpu = now;
        }
        txt.insert("cpu.pcnt".into(), pcnt);
        txt.insert("tenants".into(), tenants.to_string());
        txt
    }
}

fn read_cpu_times() -> Option<CpuTimes> {
    std::fs::read_to_string("/proc/stat").ok().as_deref().and_then(parse_proc_stat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_names() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(go_arch(), "amd64");
        #[cfg(target_arch = "aarch64")]
        assert_eq!(go_arch(), "arm64");
        #[cfg(target_os = "linux")]
        assert_eq!(go_os(), "linux");
        assert!(logical_cpus() >= 1);
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:       16314200 kB\nMemFree:         1000 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some(MemInfo { available: 8_000_000 * 1024, total: 16_314_200 * 1024 })
        );
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n"), None);
        assert!(parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default()).is_some());
    }

    #[test]
    fn proc_stat_and_percent() {
        let a = parse_proc_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(a, CpuTimes { busy: 200, total: 1000 });
        let b = parse_proc_stat("cpu  200 0 200 1400 200 0 0 0 50 0\n").unwrap();
        assert_eq!(b, CpuTimes { busy: 400, total: 2000 });
        assert_eq!(busy_percent(a, b), "20.000000");
        assert_eq!(busy_percent(b, b), "0.000000");
        let third = CpuTimes { busy: 1, total: 3 };
        assert_eq!(busy_percent(CpuTimes::default(), third), format!("{:.6}", 100.0 / 3.0));
        let two_thirds = CpuTimes { busy: 2, total: 3 };
        assert_eq!(busy_percent(CpuTimes::default(), two_thirds), format!("{:.6}", 200.0 / 3.0));
        assert_eq!(busy_percent(CpuTimes::default(), CpuTimes { busy: 9, total: 9 }), "100.000000");
        assert_eq!(parse_proc_stat("cpu  1 2\n"), None);
        assert_eq!(parse_proc_stat("intr 1 2 3 4\n"), None);
    }

    #[test]
    fn user_txt() {
        let m = parse_user_txt("near=gpu, secure ,k=a=b,,").unwrap();
        assert_eq!(m.get("near").map(String::as_str), Some("gpu"));
        assert_eq!(m.get("secure").map(String::as_str), Some("true"));
        assert_eq!(m.get("k").map(String::as_str), Some("a=b"));
        assert_eq!(m.len(), 3);
        assert!(parse_user_txt("=x").is_err());
        assert!(parse_user_txt("k\u{e9}=x").is_err());
        assert!(parse_user_txt(&format!("k={}", "v".repeat(300))).is_err());
        assert!(parse_user_txt("").unwrap().is_empty());
    }

    #[test]
    fn metadata_user_pairs_win_over_computed_ones() {
        let mut m = Metadata::new("arch=riscv64,cores=64,tenants=9,near=gpu").unwrap();
        let txt = m.txt(3);
        assert_eq!(txt["arch"], "riscv64");
        assert_eq!(txt["cores"], "64");
        assert_eq!(txt["os"], go_os());
        assert_eq!(txt["near"], "gpu");
        assert_eq!(txt["tenants"], "3");
        let pcnt: f64 = txt["cpu.pcnt"].parse().unwrap();
        assert!((0.0..=100.0).contains(&pcnt));
        assert_eq!(txt["cpu.pcnt"].split('.').nth(1).map(str::len), Some(6));
        let total: u64 = txt["mem.total"].parse().unwrap();
        let avail: u64 = txt["mem.avail"].parse().unwrap();
        assert!(total > 0 && avail <= total);
    }
}
