//! Go-`flag`-compatible command-line parsing.
//!
//! Users type the flags of the Go cpu: `-key f`, `-key=f`, `--key f`, `-9p=false`, `-d`.
//! This module owns exactly those rules (parsing stops at the first non-flag word or after
//! `--`; a boolean takes no separate value; `-h`/`-help` ask for usage) and the usage text
//! with each flag's default. It knows nothing about what the flags mean: the applets' option
//! structs in [`crate::options`] read the parsed values.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::time::Duration;

/// The value type of a flag: decides how its value is parsed and shown in usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    String,
    Int,
    Duration,
}

/// One flag definition.
#[derive(Debug, Clone)]
pub struct Flag {
    pub name: &'static str,
    pub kind: Kind,
    pub default: String,
    pub help: &'static str,
}

/// Why parsing stopped. Every variant but `Help` is a usage error (exit status 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlagError {
    /// `-h`, `-help` or `--help`: print usage and exit 0.
    Help,
    /// `-version` or `--version` (when the applet defines no such flag): print the version, exit 0.
    Version,
    /// A word after the flags of an applet that takes none; the text says what to do instead.
    Unexpected { arg: String, hint: String },
    /// A flag that is not defined.
    Unknown(String),
    /// A non-boolean flag at the end of the line, without its value.
    MissingValue(String),
    /// A value that does not parse for the flag's kind.
    BadValue { flag: String, value: String, reason: String },
    /// A flag name or value that is not valid UTF-8.
    NotUtf8,
}

impl fmt::Display for FlagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlagError::Help => write!(f, "help requested"),
            FlagError::Version => write!(f, "version requested"),
            FlagError::Unexpected { arg, hint } => write!(f, "unexpected argument {arg:?}: {hint}"),
            FlagError::Unknown(n) => write!(f, "flag provided but not defined: -{n}"),
            FlagError::MissingValue(n) => write!(f, "flag needs an argument: -{n}"),
            FlagError::BadValue { flag, value, reason } => {
                write!(f, "invalid value {value:?} for flag -{flag}: {reason}")
            }
            FlagError::NotUtf8 => write!(f, "a flag or flag value is not valid UTF-8"),
        }
    }
}

impl std::error::Error for FlagError {}

/// A set of flag definitions for one applet.
#[derive(Debug, Clone)]
pub struct FlagSet {
    /// The applet name, for messages.
    pub name: &'static str,
    /// The line after "Usage: " (e.g. `cpu [flags] host [command [args...]]`).
    pub synopsis: &'static str,
    /// Lines printed after the flags in the usage text (examples, what the words mean).
    notes: &'static str,
    flags: Vec<Flag>,
}

/// The result of a parse: each flag's value (its default when not given) and the rest.
#[derive(Debug, Clone)]
pub struct Parsed {
    values: HashMap<&'static str, String>,
    given: Vec<&'static str>,
    /// The words after the flags, untouched (the host and the remote command).
    pub rest: Vec<OsString>,
}

impl FlagSet {
    pub fn new(name: &'static str, synopsis: &'static str) -> Self {
        FlagSet { name, synopsis, notes: "", flags: Vec::new() }
    }

    /// Text shown after the flags in [`FlagSet::usage`]; it should end with a newline.
    pub fn notes(mut self, notes: &'static str) -> Self {
        self.notes = notes;
        self
    }

    fn add(mut self, name: &'static str, kind: Kind, default: String, help: &'static str) -> Self {
        debug_assert!(self.lookup(name).is_none(), "flag -{name} defined twice");
        self.flags.push(Flag { name, kind, default, help });
        self
    }

    pub fn bool(self, name: &'static str, default: bool, help: &'static str) -> Self {
        self.add(name, Kind::Bool, default.to_string(), help)
    }

    pub fn string(self, name: &'static str, default: &str, help: &'static str) -> Self {
        self.add(name, Kind::String, default.to_string(), help)
    }

    pub fn int(self, name: &'static str, default: i64, help: &'static str) -> Self {
        self.add(name, Kind::Int, default.to_string(), help)
    }

    /// A Go duration (`100ms`, `5s`, `1m30s`); the default is written the same way.
    pub fn duration(self, name: &'static str, default: &str, help: &'static str) -> Self {
        debug_assert!(parse_duration(default).is_ok());
        self.add(name, Kind::Duration, default.to_string(), help)
    }

    pub fn flags(&self) -> &[Flag] {
        &self.flags
    }

    fn lookup(&self, name: &str) -> Option<&Flag> {
        self.flags.iter().find(|f| f.name == name)
    }

    /// Parses `args` (without the program name) by Go's rules.
    pub fn parse<I, S>(&self, args: I) -> Result<Parsed, FlagError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut args: std::collections::VecDeque<OsString> = args.into_iter().map(Into::into).collect();
        let mut values: HashMap<&'static str, String> =
            self.flags.iter().map(|f| (f.name, f.default.clone())).collect();
        let mut given = Vec::new();
        while let Some(arg) = args.front() {
            let Some(text) = arg.to_str() else { break };
            if text.len() < 2 || !text.starts_with('-') {
                break; // "-" alone and every non-flag word end the flags
            }
            if text == "--" {
                args.pop_front();
                break;
            }
            let body = text.strip_prefix("--").unwrap_or(&text[1..]).to_string();
            if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
                return Err(FlagError::BadValue {
                    flag: body.clone(),
                    value: text.to_string(),
                    reason: "bad flag syntax".into(),
                });
            }
            args.pop_front();
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (body, None),
            };
            let Some(flag) = self.lookup(&name) else {
                if name == "h" || name == "help" {
                    return Err(FlagError::Help);
                }
                if name == "version" && inline.is_none() {
                    return Err(FlagError::Version);
                }
                return Err(FlagError::Unknown(name));
            };
            let value = match (flag.kind, inline) {
                (Kind::Bool, None) => "true".to_string(),
                (_, Some(v)) => v,
                (_, None) => match args.pop_front() {
                    Some(v) => v.into_string().map_err(|_| FlagError::NotUtf8)?,
                    None => return Err(FlagError::MissingValue(name)),
                },
            };
            let normalized = check_value(flag, &value)?;
            values.insert(flag.name, normalized);
            if !given.contains(&flag.name) {
                given.push(flag.name);
            }
        }
        Ok(Parsed { values, given, rest: args.into_iter().collect() })
    }

    /// The usage text: the synopsis, then each flag with its help and default, Go style.
    pub fn usage(&self) -> String {
        let mut out = format!("Usage: {}\n", self.synopsis);
        let mut flags: Vec<&Flag> = self.flags.iter().collect();
        flags.sort_by_key(|f| f.name.to_ascii_lowercase());
        for f in flags {
            let kind = match f.kind {
                Kind::Bool => "",
                Kind::String => " string",
                Kind::Int => " int",
                Kind::Duration => " duration",
            };
            out.push_str(&format!("  -{}{}\n    \t{}", f.name, kind, f.help));
            let show_default = match f.kind {
                Kind::Bool => f.default == "true",
                Kind::String => !f.default.is_empty(),
                Kind::Int => f.default != "0",
                Kind::Duration => f.default != "0s" && f.default != "0",
            };
            if show_default {
                if f.kind == Kind::String {
                    out.push_str(&format!(" (default {:?})", f.default));
                } else {
                    out.push_str(&format!(" (default {})", f.default));
                }
            }
            out.push('\n');
        }
        out.push_str(self.notes);
        out
    }
}

fn check_value(flag: &Flag, value: &str) -> Result<String, FlagError> {
    let bad = |reason: &str| FlagError::BadValue {
        flag: flag.name.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    };
    match flag.kind {
        Kind::String => Ok(value.to_string()),
        Kind::Bool => parse_bool(value).map(|b| b.to_string()).ok_or_else(|| bad("parse error")),
        Kind::Int => parse_int(value).map(|i| i.to_string()).ok_or_else(|| bad("parse error")),
        Kind::Duration => parse_duration(value).map(|_| value.to_string()).map_err(|e| bad(&e)),
    }
}

/// Go's strconv.ParseBool.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's strconv.ParseInt(s, 0, 64): decimal, or 0x / 0o / 0b / leading-0 octal prefixes.
pub fn parse_int(s: &str) -> Option<i64> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = parse_uint(digits)?;
    let v = i64::try_from(v).ok()?;
    Some(if neg { -v } else { v })
}

/// Unsigned integer with Go's base prefix detection (`42`, `0x2a`, `0o52`, `052`, `0b101010`).
pub fn parse_uint(s: &str) -> Option<u64> {
    let s = s.replace('_', "");
    let lower = s.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d.to_string())
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d.to_string())
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d.to_string())
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].to_string())
    } else {
        (10, lower)
    };
    if digits.is_empty() {
        return None;
    }
    u64::from_str_radix(&digits, radix).ok()
}

/// Go's time.ParseDuration: a sequence of decimal numbers with units ns, us (µs), ms, s, m, h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let orig = s;
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err("negative durations are not allowed".into());
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() {
        return Err(format!("invalid duration {orig:?}"));
    }
    // Integer nanoseconds, as Go does (a fraction beyond the unit's nanoseconds is dropped);
    // no float parsing, whose tables cost the binary ~15 KB (README "Size").
    const MAX_NANOS: u128 = 10_000_000_000 * 1_000_000_000;
    let too_large = || format!("duration {orig:?} is too large");
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (whole, fraction) = rest[..num_len].split_once('.').unwrap_or((&rest[..num_len], ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(format!("invalid duration {orig:?}"));
        }
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("missing unit in duration {orig:?}")),
            u => return Err(format!("unknown unit {u:?} in duration {orig:?}")),
        };
        // Digits past the 20th of a fraction are below a nanosecond even in hours.
        let fraction = &fraction[..fraction.len().min(20)];
        let digits =
            |d: &str| d.bytes().try_fold(0u128, |n, b| n.checked_mul(10)?.checked_add(u128::from(b - b'0')));
        let whole = if whole.len() > 20 { None } else { digits(whole) }.ok_or_else(too_large)?;
        let fraction_nanos = digits(fraction).unwrap_or(0) * unit_nanos / 10u128.pow(fraction.len() as u32);
        total = whole
            .checked_mul(unit_nanos)
            .and_then(|n| n.checked_add(fraction_nanos))
            .and_then(|n| n.checked_add(total))
            .filter(|&n| n <= MAX_NANOS)
            .ok_or_else(too_large)?;
    }
    Ok(Duration::new((total / 1_000_000_000) as u64, (total % 1_000_000_000) as u32))
}

/// A decimal number (`12`, `-0.5`, `.5`, `1e3`) as f64, without core's float parser (its
/// tables cost the binary ~15 KB: README "Size"). Correctly rounded while the significant
/// digits fit 2^53 and the power of ten stays within 10^22, as every value compared here
/// does (load, memory, percentages); beyond that within a few units in the last place. No
/// `inf` or `nan`: those are not numbers to compare.
pub fn parse_decimal(s: &str) -> Option<f64> {
    let (negative, text) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let bytes = text.as_bytes();
    let (mut mantissa, mut exponent, mut digits, mut dot, mut i) = (0u64, 0i32, 0usize, false, 0usize);
    while let Some(&b) = bytes.get(i) {
        match b {
            b'0'..=b'9' if mantissa < 100_000_000_000_000_000 => {
                mantissa = mantissa * 10 + u64::from(b - b'0');
                exponent -= i32::from(dot);
            }
            b'0'..=b'9' => exponent += i32::from(!dot),
            b'.' if !dot => dot = true,
            _ => break,
        }
        digits += usize::from(b != b'.');
        i += 1;
    }
    if digits == 0 {
        return None;
    }
    if let Some(&(b'e' | b'E')) = bytes.get(i) {
        let power = &text[i + 1..];
        let unsigned = power.strip_prefix(['+', '-']).unwrap_or(power);
        if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let magnitude = unsigned.bytes().fold(0i32, |n, b| (n * 10 + i32::from(b - b'0')).min(100_000));
        exponent += if power.starts_with('-') { -magnitude } else { magnitude };
    } else if i != bytes.len() {
        return None;
    }
    let mut value = mantissa as f64;
    // 10^k is exact for k <= 22; larger powers in steps (overflow gives inf, underflow 0).
    while exponent != 0 && value != 0.0 && value.is_finite() {
        let step = exponent.clamp(-22, 22);
        let power = 10f64.powi(step.abs());
        value = if step > 0 { value * power } else { value / power };
        exponent -= step;
    }
    Some(if negative { -value } else { value })
}

impl Parsed {
    /// The flag's value as given, or its default. Panics only on a name that was never
    /// defined, which is a programming error caught by the unit tests.
    fn raw(&self, name: &str) -> &str {
        match self.values.get(name) {
            Some(v) => v,
            None => panic!("flag -{name} is not defined"),
        }
    }

    pub fn string(&self, name: &str) -> String {
        self.raw(name).to_string()
    }

    pub fn bool(&self, name: &str) -> bool {
        self.raw(name) == "true"
    }

    pub fn int(&self, name: &str) -> i64 {
        self.raw(name).parse().unwrap_or(0)
    }

    pub fn duration(&self, name: &str) -> Duration {
        parse_duration(self.raw(name)).unwrap_or(Duration::ZERO)
    }

    /// Whether the flag appeared on the command line (not just its default).
    pub fn was_given(&self, name: &str) -> bool {
        self.given.contains(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> FlagSet {
        FlagSet::new("t", "t [flags] host")
            .bool("9p", true, "serve 9p")
            .bool("d", false, "debug")
            .string("key", "", "key file")
            .string("namespace", "/lib:/usr", "binds")
            .int("n", 1, "count")
            .duration("timeout9p", "100ms", "timeout")
    }

    fn parse(args: &[&str]) -> Result<Parsed, FlagError> {
        set().parse(args.iter().copied())
    }

    #[test]
    fn forms_of_a_value() {
        for args in
            [&["-key", "k", "host"][..], &["-key=k", "host"], &["--key", "k", "host"], &["--key=k", "host"]]
        {
            let p = parse(args).unwrap();
            assert_eq!(p.string("key"), "k", "{args:?}");
            assert_eq!(p.rest, vec![OsString::from("host")]);
            assert!(p.was_given("key"));
        }
    }

    #[test]
    fn booleans() {
        let p = parse(&["-d", "-9p=false", "h"]).unwrap();
        assert!(p.bool("d"));
        assert!(!p.bool("9p"));
        // A separate word after a boolean is not its value: it ends the flags (Go rule).
        let p = parse(&["-9p", "false"]).unwrap();
        assert!(p.bool("9p"));
        assert_eq!(p.rest, vec![OsString::from("false")]);
        assert!(matches!(parse(&["-d=maybe"]), Err(FlagError::BadValue { .. })));
    }

    #[test]
    fn stops_at_first_non_flag_and_double_dash() {
        let p = parse(&["-d", "host", "ls", "-l"]).unwrap();
        assert_eq!(p.rest, ["host", "ls", "-l"].map(OsString::from).to_vec());
        let p = parse(&["--", "-d", "x"]).unwrap();
        assert!(!p.bool("d"));
        assert_eq!(p.rest, ["-d", "x"].map(OsString::from).to_vec());
        let p = parse(&["-", "x"]).unwrap();
        assert_eq!(p.rest.len(), 2);
    }

    #[test]
    fn defaults_and_errors() {
        let p = parse(&[]).unwrap();
        assert!(p.bool("9p"));
        assert_eq!(p.string("namespace"), "/lib:/usr");
        assert_eq!(p.int("n"), 1);
        assert_eq!(p.duration("timeout9p"), Duration::from_millis(100));
        assert!(!p.was_given("key"));
        assert_eq!(parse(&["-nosuch"]).unwrap_err(), FlagError::Unknown("nosuch".into()));
        assert_eq!(parse(&["-key"]).unwrap_err(), FlagError::MissingValue("key".into()));
        assert_eq!(parse(&["-h"]).unwrap_err(), FlagError::Help);
        assert_eq!(parse(&["--help"]).unwrap_err(), FlagError::Help);
        assert_eq!(parse(&["--version"]).unwrap_err(), FlagError::Version);
        assert_eq!(parse(&["-version"]).unwrap_err(), FlagError::Version);
        assert_eq!(parse(&["-version=1"]).unwrap_err(), FlagError::Unknown("version".into()));
        assert!(matches!(parse(&["-n", "x"]), Err(FlagError::BadValue { .. })));
        assert!(matches!(parse(&["-timeout9p", "10"]), Err(FlagError::BadValue { .. })));
        assert!(matches!(parse(&["---x"]), Err(FlagError::BadValue { .. })));
    }

    #[test]
    fn usage_shows_defaults() {
        let u = set().usage();
        assert!(u.contains("  -9p\n    \tserve 9p (default true)\n"), "{u}");
        assert!(u.contains("  -namespace string\n    \tbinds (default \"/lib:/usr\")\n"), "{u}");
        assert!(u.contains("  -timeout9p duration\n    \ttimeout (default 100ms)\n"), "{u}");
        assert!(u.contains("  -d\n    \tdebug\n"), "{u}");
    }

    #[test]
    fn numbers_and_durations() {
        assert_eq!(parse_uint("0x2a"), Some(42));
        assert_eq!(parse_uint("052"), Some(42));
        assert_eq!(parse_uint("0o52"), Some(42));
        assert_eq!(parse_uint("0b101010"), Some(42));
        assert_eq!(parse_uint("42"), Some(42));
        assert_eq!(parse_uint("0"), Some(0));
        assert_eq!(parse_uint("x"), None);
        assert_eq!(parse_int("-7"), Some(-7));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_duration(".5ms").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_duration("2.ms").unwrap(), Duration::from_millis(2));
        assert_eq!(parse_duration("1h2m3.000000004s").unwrap(), Duration::new(3723, 4));
        assert_eq!(parse_duration("1.0000000001s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("300us").unwrap(), Duration::from_micros(300));
        assert!(parse_duration(".s").is_err());
        assert!(parse_duration("1.2.3s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("10000000001s").is_err());
        assert!(parse_duration("99999999999999999999999999h").is_err());
        assert_eq!(parse_duration("10000000000s").unwrap(), Duration::from_secs(10_000_000_000));
    }

    #[test]
    fn decimals_parse_like_core() {
        for text in [
            "0",
            "12",
            "-0.5",
            ".5",
            "5.",
            "+3",
            "1e3",
            "2.5E-2",
            "0.1",
            "0.3",
            "99.999999",
            "123456.789",
            "1e-5",
        ] {
            assert_eq!(parse_decimal(text), text.parse::<f64>().ok(), "{text}");
        }
        for text in ["", ".", "-", "e3", "1e", "1e+", "1x", "nan", "inf", "1.2.3", " 1"] {
            assert_eq!(parse_decimal(text), None, "{text:?}");
        }
        assert_eq!(parse_decimal("123456789012345678901234"), Some(123456789012345678901234.0));
        assert_eq!(parse_decimal("1e400"), Some(f64::INFINITY));
    }
}
