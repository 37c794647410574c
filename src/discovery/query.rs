//! decpu's server query: the `dnssd://` URI (spec 7.3), the requirements on a server's TXT
//! record (7.4) and the sort order (7.5), with an explanation of every decision for `-d`.
//!
//! Pure functions only: no network. Bad input is a [`Error::Usage`], never a panic. Where
//! the Go code has a bug (empty value panics, `_x.example.com` misparsed, the `=`/`!` sort
//! comparing value lengths) we do what was meant instead; the tests name each case.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::discovery::sysinfo::{go_arch, go_os};
use crate::error::{Error, Result};

/// The service type decpud announces.
pub const DEFAULT_SERVICE: &str = "_ncpu._tcp";
/// The mDNS domain.
pub const DEFAULT_DOMAIN: &str = "local";
/// The query used with no host argument or `.`.
pub const DEFAULT_QUERY: &str = "dnssd://?sort=tenants&sort=cpu.pcnt";
/// Longest service name mDNS allows (RFC 6763 7.2), without the leading `_`.
const SERVICE_NAME_MAX: usize = 15;

/// What decpu's host argument asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Find servers by DNS-SD.
    Discover(Query),
    /// An ordinary host name: behave exactly like cpu.
    Host(String),
}

/// Classifies decpu's host argument: none or `.` is the default query, `dnssd:...` a query,
/// anything else a host name.
pub fn parse_target(host: Option<&str>) -> Result<Target> {
    match host {
        None | Some(".") => Ok(Target::Discover(Query::default_query())),
        Some(arg) if is_dnssd_uri(arg) => Query::parse(arg).map(Target::Discover),
        Some(arg) => Ok(Target::Host(arg.to_string())),
    }
}

/// True if `arg` has the `dnssd:` scheme (case-insensitive, as URL schemes are).
pub fn is_dnssd_uri(arg: &str) -> bool {
    arg.get(..6).is_some_and(|s| s.eq_ignore_ascii_case("dnssd:"))
}

/// A parsed `dnssd://` query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// Instance name to match exactly; empty: any.
    pub instance: String,
    /// Service type, e.g. `_ncpu._tcp`.
    pub service: String,
    /// Domain, e.g. `local`.
    pub domain: String,
    /// Every one must hold, in the order given.
    pub requirements: Vec<Requirement>,
    /// Sort keys, most significant first.
    pub sort: Vec<SortKey>,
}

/// One requirement on a TXT key.
#[derive(Debug, Clone, PartialEq)]
pub struct Requirement {
    pub key: String,
    pub test: Test,
    /// The value as the query gave it, for messages (numbers shown as typed: formatting an
    /// f64 would cost the binary ~12 KB, README "Size").
    pub given: String,
}

/// What a requirement asks of the server's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    /// `*`: anything, even a missing key.
    Any,
    /// `<N`: a number at most N.
    AtMost(f64),
    /// `>N`: a number at least N.
    AtLeast(f64),
    /// `!X`: missing, or anything but X.
    NotEqual(String),
    /// `v` (repeat the key for alternatives): equal to one of them.
    OneOf(Vec<String>),
}

/// One sort key and its direction.
#[derive(Debug, Clone, PartialEq)]
pub struct SortKey {
    pub key: String,
    pub order: SortOrder,
}

/// How a sort key orders servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortOrder {
    /// `key` or `<key`: smallest number first.
    Ascending,
    /// `>key`: largest number first.
    Descending,
    /// `=key`: servers that have the key first.
    PresentFirst,
    /// `!key`: servers that lack the key first.
    AbsentFirst,
}

/// Whether a server passed the requirements, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub kept: bool,
    /// One line per requirement: the failing ones if dropped, all of them if kept.
    pub reasons: Vec<String>,
}

impl Query {
    /// The query of `decpu` without a host or with `.`.
    pub fn default_query() -> Query {
        let mut q = Query {
            instance: String::new(),
            service: DEFAULT_SERVICE.into(),
            domain: DEFAULT_DOMAIN.into(),
            requirements: Vec::new(),
            sort: vec![
                SortKey { key: "tenants".into(), order: SortOrder::Ascending },
                SortKey { key: "cpu.pcnt".into(), order: SortOrder::Ascending },
            ],
        };
        q.add_client_defaults();
        q
    }

    /// Parses `dnssd://[instance.]_type._proto[.domain][:port][/path]?key=value&...`.
    /// User info, port and path are ignored, as in Go.
    pub fn parse(uri: &str) -> Result<Query> {
        if !is_dnssd_uri(uri) {
            return Err(usage(uri, "the scheme must be dnssd"));
        }
        let rest = uri[6..].strip_prefix("//").ok_or_else(|| usage(uri, "expected dnssd://"))?;
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = before_query.split_once('/').map_or(before_query, |(a, _)| a);
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => return Err(usage(uri, "the port after ':' must be a number")),
            None => host,
        };
        let host = percent_decode(host, false).map_err(|e| usage(uri, &e))?;
        let mut q = Query {
            instance: String::new(),
            service: DEFAULT_SERVICE.into(),
            domain: DEFAULT_DOMAIN.into(),
            requirements: Vec::new(),
            sort: Vec::new(),
        };
        q.set_names(&host).map_err(|e| usage(uri, &e))?;
        q.set_query(query).map_err(|e| usage(uri, &e))?;
        q.add_client_defaults();
        Ok(q)
    }

    /// Splits the URI's host into instance, type and domain (spec 7.3).
    fn set_names(&mut self, host: &str) -> std::result::Result<(), String> {
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty() {
            return Ok(());
        }
        if host.chars().any(char::is_control) {
            return Err("control characters in the host part".into());
        }
        let labels: Vec<&str> = host.split('.').collect();
        if labels.iter().any(|l| l.is_empty()) {
            return Err(format!("empty label in {host:?}"));
        }
        let Some(first) = labels.iter().position(|l| l.starts_with('_')) else {
            self.domain = host.to_string();
            return Ok(());
        };
        self.instance = labels[..first].join(".");
        // `_name._proto` takes two labels; a lone `_name` (the Go code skips a label here
        // when more follow) is taken as `_name._tcp` and whatever follows is the domain.
        let (service, domain_start) = match labels.get(first + 1) {
            Some(next) if next.starts_with('_') => (format!("{}.{}", labels[first], next), first + 2),
            _ => (format!("{}._tcp", labels[first]), first + 1),
        };
        self.service = service;
        if domain_start < labels.len() {
            self.domain = labels[domain_start..].join(".");
        }
        Ok(())
    }

    /// Reads the query string: `sort` keys and requirements. Besides Go's `key=<N`, `key=>N`
    /// and `key=!X`, the shell-friendly `key<N`, `key>N` and `key!=X` are accepted.
    fn set_query(&mut self, query: &str) -> std::result::Result<(), String> {
        let mut values: Vec<(String, Vec<String>)> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let key = percent_decode(pair.split_once('=').map_or(pair, |(k, _)| k), true)?;
            let value = percent_decode(pair.split_once('=').map_or("", |(_, v)| v), true)?;
            let (key, value) = shorthand_comparison(key, value);
            if key.is_empty() {
                return Err(format!("{pair:?} has no key"));
            }
            match values.iter_mut().find(|(k, _)| *k == key) {
                Some((_, vs)) => vs.push(value),
                None => values.push((key, vec![value])),
            }
        }
        for (key, vs) in values {
            if key == "sort" {
                for v in vs {
                    self.sort.push(SortKey::parse(&v)?);
                }
            } else {
                self.requirements.push(Requirement::parse(&key, &vs)?);
            }
        }
        Ok(())
    }

    /// Only servers of the client's own architecture and OS, unless the query says otherwise.
    fn add_client_defaults(&mut self) {
        for (key, value) in [("arch", go_arch()), ("os", go_os())] {
            if !self.requirements.iter().any(|r| r.key == key) {
                self.requirements.push(Requirement {
                    key: key.into(),
                    test: Test::OneOf(vec![value.into()]),
                    given: value.into(),
                });
            }
        }
    }

    /// The name to browse, `_ncpu._tcp.local.`, after checking mDNS can browse it.
    pub fn browse_name(&self) -> Result<String> {
        let labels: Vec<&str> = self.service.split('.').collect();
        let valid_type = labels.len() == 2
            && labels[0].len() > 1
            && labels[0].starts_with('_')
            && labels[0].len() - 1 <= SERVICE_NAME_MAX
            && (labels[1] == "_tcp" || labels[1] == "_udp");
        if !valid_type {
            return Err(Error::Usage(format!(
                "dnssd: service type {:?} must look like _name._tcp or _name._udp (name at most {SERVICE_NAME_MAX} characters)",
                self.service
            )));
        }
        if !self.domain.eq_ignore_ascii_case(DEFAULT_DOMAIN) {
            return Err(Error::Usage(format!(
                "dnssd: domain {:?}: only the multicast DNS domain \"local\" can be browsed",
                self.domain
            )));
        }
        Ok(format!("{}.{}.", self.service, self.domain))
    }

    /// `<instance>.<type>.<domain>.` if an instance was asked for.
    pub fn instance_fullname(&self) -> Option<String> {
        (!self.instance.is_empty()).then(|| format!("{}.{}.{}.", self.instance, self.service, self.domain))
    }

    /// Does a server with this full instance name and TXT map qualify? With the reasons.
    pub fn check(&self, fullname: &str, txt: &BTreeMap<String, String>) -> Verdict {
        if let Some(wanted) = self.instance_fullname() {
            if !fullname.eq_ignore_ascii_case(&wanted) {
                return Verdict { kept: false, reasons: vec![format!("instance is not {wanted:?}")] };
            }
        }
        let results: Vec<(bool, String)> = self.requirements.iter().map(|r| r.check(txt)).collect();
        let kept = results.iter().all(|(ok, _)| *ok);
        let reasons = results.into_iter().filter(|(ok, _)| kept || !ok).map(|(_, why)| why).collect();
        Verdict { kept, reasons }
    }

    /// Sorts servers by the sort keys (stable: ties keep discovery order).
    pub fn sort_by_keys<T>(&self, servers: &mut [T], txt_of: impl Fn(&T) -> &BTreeMap<String, String>) {
        servers.sort_by(|a, b| {
            let (a, b) = (txt_of(a), txt_of(b));
            self.sort.iter().map(|k| k.compare(a, b)).find(|o| o.is_ne()).unwrap_or(Ordering::Equal)
        });
    }
}

impl Requirement {
    /// `key` with its values from the query string (7.4).
    pub fn parse(key: &str, values: &[String]) -> std::result::Result<Requirement, String> {
        if values.iter().any(String::is_empty) {
            return Err(format!("{key}= has an empty value (use {key}=* to accept any value)"));
        }
        let first = values.first().ok_or_else(|| format!("{key} has no value"))?;
        let operator = |v: &str| v.starts_with(['*', '<', '>', '!']);
        if values.len() > 1 && values.iter().any(|v| operator(v)) {
            return Err(format!(
                "{key}: repeat a key only for alternative values; *, <N, >N and !X take a single value"
            ));
        }
        let number = |s: &str| -> std::result::Result<f64, String> {
            match crate::flags::parse_decimal(s) {
                Some(n) => Ok(n),
                _ => Err(format!("{key}={first}: {s:?} is not a number")),
            }
        };
        let test = if first.starts_with('*') {
            Test::Any
        } else if let Some(n) = first.strip_prefix('<') {
            Test::AtMost(number(n)?)
        } else if let Some(n) = first.strip_prefix('>') {
            Test::AtLeast(number(n)?)
        } else if let Some(x) = first.strip_prefix('!') {
            Test::NotEqual(x.to_string())
        } else {
            Test::OneOf(values.to_vec())
        };
        Ok(Requirement { key: key.to_string(), test, given: first.clone() })
    }

    /// Checks one server's TXT map; the text says what was compared.
    pub fn check(&self, txt: &BTreeMap<String, String>) -> (bool, String) {
        let key = &self.key;
        let have = txt.get(key);
        let numeric = |bound: f64, at_most: bool| -> (bool, String) {
            let op = if at_most { '<' } else { '>' };
            let shown = self.given.get(1..).unwrap_or_default();
            let Some(v) = have else { return (false, format!("{key}{op}={shown}: key missing")) };
            match crate::flags::parse_decimal(v) {
                Some(x) => {
                    let ok = if at_most { x <= bound } else { x >= bound };
                    (ok, format!("{key}{op}={shown}: has {v}"))
                }
                _ => (false, format!("{key}{op}={shown}: {v:?} is not a number")),
            }
        };
        match &self.test {
            Test::Any => (true, format!("{key}=*: any value")),
            Test::AtMost(n) => numeric(*n, true),
            Test::AtLeast(n) => numeric(*n, false),
            Test::NotEqual(x) => match have {
                None => (true, format!("{key}!={x}: key missing")),
                Some(v) => (v != x, format!("{key}!={x}: has {v}")),
            },
            Test::OneOf(alternatives) => {
                let wanted = alternatives.join("|");
                match have {
                    None => (false, format!("{key}={wanted}: key missing")),
                    Some(v) => (alternatives.contains(v), format!("{key}={wanted}: has {v}")),
                }
            }
        }
    }
}

impl SortKey {
    /// `key`, `<key`, `>key`, `=key` or `!key`.
    pub fn parse(spec: &str) -> std::result::Result<SortKey, String> {
        let (order, key) = match spec.chars().next() {
            Some('<') => (SortOrder::Ascending, &spec[1..]),
            Some('>') => (SortOrder::Descending, &spec[1..]),
            Some('=') => (SortOrder::PresentFirst, &spec[1..]),
            Some('!') => (SortOrder::AbsentFirst, &spec[1..]),
            _ => (SortOrder::Ascending, spec),
        };
        if key.is_empty() {
            return Err(format!("sort={spec}: empty sort key"));
        }
        Ok(SortKey { key: key.to_string(), order })
    }

    /// Orders two TXT maps by this key. A missing or non-numeric value sorts after numbers.
    pub fn compare(&self, a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Ordering {
        let number =
            |m: &BTreeMap<String, String>| m.get(&self.key).and_then(|v| crate::flags::parse_decimal(v));
        let numeric = |reverse: bool| match (number(a), number(b)) {
            (Some(x), Some(y)) => {
                let o = x.partial_cmp(&y).unwrap_or(Ordering::Equal);
                if reverse {
                    o.reverse()
                } else {
                    o
                }
            }
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        let has = |m: &BTreeMap<String, String>| m.contains_key(&self.key);
        match self.order {
            SortOrder::Ascending => numeric(false),
            SortOrder::Descending => numeric(true),
            SortOrder::PresentFirst => has(b).cmp(&has(a)),
            SortOrder::AbsentFirst => has(a).cmp(&has(b)),
        }
    }
}

fn usage(uri: &str, why: &str) -> Error {
    Error::Usage(format!("dnssd: bad URI {uri:?}: {why}"))
}

/// Decodes `%XX` escapes (and `+` as space in query strings) into UTF-8 text.
fn percent_decode(s: &str, plus_is_space: bool) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad %-escape in {s:?}"))?;
                out.push(byte);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// `mem.avail>1000000` (no `=`) means `mem.avail=>1000000`; likewise `<`; `arch!=arm` means
/// `arch=!arm`. Anything else is returned unchanged.
fn shorthand_comparison(key: String, value: String) -> (String, String) {
    if value.is_empty() {
        if let Some(at) = key.find(['<', '>']) {
            if at > 0 && at + 1 < key.len() {
                return (key[..at].to_string(), key[at..].to_string());
            }
        }
    }
    if let Some(k) = key.strip_suffix('!') {
        if !k.is_empty() && !value.is_empty() {
            return (k.to_string(), format!("!{value}"));
        }
    }
    (key, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txt(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn q(uri: &str) -> Query {
        Query::parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"))
    }

    fn req<'a>(query: &'a Query, key: &str) -> &'a Test {
        &query.requirements.iter().find(|r| r.key == key).unwrap().test
    }

    #[test]
    fn targets() {
        assert_eq!(parse_target(None).unwrap(), Target::Discover(Query::default_query()));
        assert_eq!(parse_target(Some(".")).unwrap(), Target::Discover(Query::default_query()));
        assert_eq!(parse_target(Some("board")).unwrap(), Target::Host("board".into()));
        assert_eq!(parse_target(Some("user@board:22")).unwrap(), Target::Host("user@board:22".into()));
        assert!(matches!(parse_target(Some("DNSSD://")).unwrap(), Target::Discover(_)));
        assert!(matches!(parse_target(Some("dnssd:opaque")), Err(Error::Usage(_))));
        assert!(matches!(parse_target(Some("dnssd://?arch=")), Err(Error::Usage(_))));
    }

    #[test]
    fn default_query_is_the_documented_uri() {
        let d = Query::default_query();
        assert_eq!(d, q(DEFAULT_QUERY));
        assert_eq!(d.service, "_ncpu._tcp");
        assert_eq!(d.domain, "local");
        assert_eq!(d.instance, "");
        assert_eq!(d.browse_name().unwrap(), "_ncpu._tcp.local.");
        assert_eq!(
            d.sort,
            vec![
                SortKey { key: "tenants".into(), order: SortOrder::Ascending },
                SortKey { key: "cpu.pcnt".into(), order: SortOrder::Ascending }
            ]
        );
        assert_eq!(req(&d, "arch"), &Test::OneOf(vec![go_arch().into()]));
        assert_eq!(req(&d, "os"), &Test::OneOf(vec![go_os().into()]));
    }

    #[test]
    fn host_part_per_spec_7_3() {
        let u = q("dnssd://");
        assert_eq!((u.instance.as_str(), u.service.as_str(), u.domain.as_str()), ("", "_ncpu._tcp", "local"));
        let u = q("dnssd://_ncpu._tcp");
        assert_eq!((u.instance.as_str(), u.service.as_str(), u.domain.as_str()), ("", "_ncpu._tcp", "local"));
        let u = q("dnssd://_ncpu._tcp.local/");
        assert_eq!((u.instance.as_str(), u.service.as_str(), u.domain.as_str()), ("", "_ncpu._tcp", "local"));
        let u = q("dnssd://board-cpud._ncpu._tcp.local");
        assert_eq!(
            (u.instance.as_str(), u.service.as_str(), u.domain.as_str()),
            ("board-cpud", "_ncpu._tcp", "local")
        );
        assert_eq!(u.instance_fullname().unwrap(), "board-cpud._ncpu._tcp.local.");
        let u = q("dnssd://my.host-cpud._ncpu._tcp");
        assert_eq!(u.instance, "my.host-cpud");
        let u = q("dnssd://a%20b-cpud._ncpu._tcp.local.");
        assert_eq!(u.instance, "a b-cpud");
        // No label starting with `_`: the whole host is the domain.
        let u = q("dnssd://example.com");
        assert_eq!((u.service.as_str(), u.domain.as_str()), ("_ncpu._tcp", "example.com"));
        // Only one `_` label, and it is the last.
        let u = q("dnssd://_cpu");
        assert_eq!(u.service, "_cpu._tcp");
        // User info, port, path and fragment are ignored.
        let u = q("dnssd://me@_ncpu._tcp.local:5353/some/path?arch=*#frag");
        assert_eq!((u.service.as_str(), u.domain.as_str()), ("_ncpu._tcp", "local"));
        assert_eq!(req(&u, "arch"), &Test::Any);
    }

    #[test]
    fn go_bug_single_underscore_label_followed_by_domain_is_not_copied() {
        // Go skips a label and keeps the default type; we keep the type and the domain.
        let u = q("dnssd://_x.example.com");
        assert_eq!(
            (u.instance.as_str(), u.service.as_str(), u.domain.as_str()),
            ("", "_x._tcp", "example.com")
        );
        // Browsing a unicast domain is a clear error, not a silent search of the wrong type.
        assert!(matches!(u.browse_name(), Err(Error::Usage(m)) if m.contains("example.com")));
    }

    #[test]
    fn shorthand_comparisons() {
        let a = Query::parse("dnssd://?arch=arm64&mem.avail>1000000&cores<9&os!=plan9").unwrap();
        let b = Query::parse("dnssd://?arch=arm64&mem.avail=>1000000&cores=<9&os=!plan9").unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn malformed_uris_are_usage_errors() {
        for bad in [
            "dnssd:",
            "dnssd:/x",
            "dnssd://host:port/",
            "dnssd://a..b",
            "dnssd://?arch=",
            "dnssd://?arch",
            "dnssd://?=x",
            "dnssd://?tenants=<",
            "dnssd://?tenants=<lots",
            "dnssd://?tenants=>NaN",
            "dnssd://?sort=",
            "dnssd://?sort=>",
            "dnssd://?a=%zz",
            "dnssd://?a=%ff",
            "dnssd://%0a",
            "dnssd://?arch=!amd64&arch=!arm64",
        ] {
            assert!(matches!(Query::parse(bad), Err(Error::Usage(_))), "{bad} should be a usage error");
        }
        let e = Query::parse("dnssd://?arch=").unwrap_err().to_string();
        assert!(e.contains("arch= has an empty value"), "{e}");
        assert!(Query::parse("dnssd://_toolongservicename123._tcp").unwrap().browse_name().is_err());
        assert!(Query::parse("dnssd://_ncpu._sctp").unwrap().browse_name().is_err());
    }

    #[test]
    fn query_values_and_defaults() {
        let u =
            q("dnssd://?arch=amd64&arch=arm64&near=gpu&mem.avail=%3E1000&cores=%3C8&x=!y&os=*&sort=%3Ecores");
        assert_eq!(req(&u, "arch"), &Test::OneOf(vec!["amd64".into(), "arm64".into()]));
        assert_eq!(req(&u, "near"), &Test::OneOf(vec!["gpu".into()]));
        assert_eq!(req(&u, "mem.avail"), &Test::AtLeast(1000.0));
        assert_eq!(req(&u, "cores"), &Test::AtMost(8.0));
        assert_eq!(req(&u, "x"), &Test::NotEqual("y".into()));
        assert_eq!(req(&u, "os"), &Test::Any);
        assert_eq!(u.sort, vec![SortKey { key: "cores".into(), order: SortOrder::Descending }]);
        // Raw < and > work too, and + is a space.
        let u = q("dnssd://?cores=>4&name=a+b");
        assert_eq!(req(&u, "cores"), &Test::AtLeast(4.0));
        assert_eq!(req(&u, "name"), &Test::OneOf(vec!["a b".into()]));
        // arch and os are added when absent.
        assert_eq!(req(&u, "arch"), &Test::OneOf(vec![go_arch().into()]));
        assert_eq!(req(&u, "os"), &Test::OneOf(vec![go_os().into()]));
        assert!(q("dnssd://?sort=tenants").sort.len() == 1);
    }

    #[test]
    fn requirements_per_spec_7_4() {
        let server =
            txt(&[("arch", "amd64"), ("os", "linux"), ("cores", "8"), ("tenants", "2"), ("near", "gpu")]);
        let pass = |uri: &str| q(uri).check("x._ncpu._tcp.local.", &server).kept;
        assert!(pass("dnssd://?arch=amd64&os=linux"));
        assert!(pass("dnssd://?arch=arm64&arch=amd64&os=*"));
        assert!(!pass("dnssd://?arch=arm64&os=*"));
        assert!(pass("dnssd://?arch=*&os=*"));
        assert!(pass("dnssd://?arch=*&os=*&missing=*"));
        assert!(pass("dnssd://?arch=*&os=*&cores=<8"));
        assert!(!pass("dnssd://?arch=*&os=*&cores=<7.5"));
        assert!(pass("dnssd://?arch=*&os=*&cores=>8"));
        assert!(!pass("dnssd://?arch=*&os=*&cores=>9"));
        assert!(!pass("dnssd://?arch=*&os=*&missing=<9"));
        assert!(!pass("dnssd://?arch=*&os=*&missing=>0"));
        assert!(!pass("dnssd://?arch=*&os=*&near=>0"));
        assert!(pass("dnssd://?arch=*&os=*&near=!cpu"));
        assert!(!pass("dnssd://?arch=*&os=*&near=!gpu"));
        assert!(pass("dnssd://?arch=*&os=*&missing=!x"));
        assert!(!pass("dnssd://?arch=*&os=*&missing=x"));
        // The client's arch and os are required by default.
        let own = txt(&[("arch", go_arch()), ("os", go_os())]);
        assert!(Query::default_query().check("x", &own).kept);
        let other = txt(&[("arch", "s390x-not-ours"), ("os", go_os())]);
        let v = Query::default_query().check("x", &other);
        assert!(!v.kept);
        assert_eq!(v.reasons, vec![format!("arch={}: has s390x-not-ours", go_arch())]);
        // An instance asked for must match exactly (case-insensitive, like DNS).
        let u = q("dnssd://Board-cpud._ncpu._tcp?arch=*&os=*");
        assert!(u.check("board-cpud._ncpu._tcp.local.", &server).kept);
        assert!(!u.check("other-cpud._ncpu._tcp.local.", &server).kept);
    }

    #[test]
    fn explanations_say_what_was_compared() {
        let u = q("dnssd://?arch=*&os=*&tenants=<1&near=gpu");
        let v = u.check("x", &txt(&[("tenants", "3")]));
        assert!(!v.kept);
        assert_eq!(v.reasons, vec!["tenants<=1: has 3".to_string(), "near=gpu: key missing".to_string()]);
        let v = u.check("x", &txt(&[("tenants", "0"), ("near", "gpu")]));
        assert!(v.kept);
        assert_eq!(v.reasons.len(), 4);
        let v = u.check("x", &txt(&[("tenants", "many"), ("near", "gpu")]));
        assert_eq!(v.reasons, vec!["tenants<=1: \"many\" is not a number".to_string()]);
    }

    #[test]
    fn no_input_panics() {
        // A deterministic walk over strings made of the characters the parser cares about.
        let alphabet: Vec<char> = "dnssd:/?&=%<>!*._@#+a1fé\u{0}".chars().collect();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut uri = String::from("dnssd://");
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 24) as usize;
            for i in 0..len {
                let pick = (seed >> (i % 32)) as usize % alphabet.len();
                uri.push(alphabet[pick]);
            }
            if let Ok(query) = Query::parse(&uri) {
                let _ = query.browse_name();
                let _ = query.check("x._ncpu._tcp.local.", &txt(&[("tenants", "1")]));
            }
        }
    }

    fn sorted(uri: &str, servers: &[(&str, &[(&str, &str)])]) -> Vec<String> {
        let mut list: Vec<(String, BTreeMap<String, String>)> =
            servers.iter().map(|(n, p)| (n.to_string(), txt(p))).collect();
        q(uri).sort_by_keys(&mut list, |s| &s.1);
        list.into_iter().map(|s| s.0).collect()
    }

    #[test]
    fn sorting_per_spec_7_5() {
        let servers: &[(&str, &[(&str, &str)])] = &[
            ("a", &[("tenants", "2"), ("cpu.pcnt", "1.0"), ("cores", "4")]),
            ("b", &[("tenants", "0"), ("cpu.pcnt", "50.5"), ("cores", "16"), ("near", "gpu")]),
            ("c", &[("tenants", "0"), ("cpu.pcnt", "3.25"), ("cores", "8")]),
            ("d", &[("tenants", "x"), ("cores", "32"), ("near", "gpu-with-a-long-name")]),
        ];
        // Default: tenants, then cpu.pcnt; non-numeric last.
        assert_eq!(sorted(DEFAULT_QUERY, servers), ["c", "b", "a", "d"]);
        assert_eq!(sorted("dnssd://?sort=%3Ccores", servers), ["a", "c", "b", "d"]);
        assert_eq!(sorted("dnssd://?sort=>cores", servers), ["d", "b", "c", "a"]);
        // No sort key: discovery order.
        assert_eq!(sorted("dnssd://", servers), ["a", "b", "c", "d"]);
        // `=key`: has the key first; Go compared value lengths (d before b): not copied.
        assert_eq!(sorted("dnssd://?sort==near", servers), ["b", "d", "a", "c"]);
        assert_eq!(sorted("dnssd://?sort=!near", servers), ["a", "c", "b", "d"]);
        // Ties fall through to the next key.
        assert_eq!(sorted("dnssd://?sort==near&sort=>cores", servers), ["d", "b", "c", "a"]);
    }
}
