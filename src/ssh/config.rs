//! ssh_config(5), the part `cpu` uses: which `Host` blocks apply to an alias and what they say
//! about HostName, Port, User, IdentityFile, StrictHostKeyChecking, UserKnownHostsFile and
//! HashKnownHosts.
//!
//! As in ssh, the first value obtained for a keyword wins (IdentityFile and UserKnownHostsFile
//! accumulate), `~/.ssh/config` is read before `/etc/ssh/ssh_config`, and `Include` is followed.
//! IdentitiesOnly, HostKeyAlias and ConnectTimeout are honoured too, ProxyCommand and ProxyJump
//! (the first of the two wins, as in ssh; `crate::transport::proxy` runs them), and
//! ControlMaster, ControlPath and ControlPersist are read for connection reuse (their meaning
//! lives in `crate::control`). `Match` blocks are skipped with a debug message rather than failing the whole file (the Go
//! client's library gives up on every lookup when it sees one, pitfall P2). Nothing here does
//! I/O except reading the config files; token expansion (`~`, `%d %u %h %r %%`) is a separate,
//! pure step so the resolution can be tested without a home directory.

use std::path::{Path, PathBuf};

/// What the config files say about one host alias. Every field is "first value wins".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    pub host_name: Option<String>,
    pub port: Option<String>,
    pub user: Option<String>,
    /// Every IdentityFile that applies, in order, unexpanded.
    pub identity_files: Vec<String>,
    /// `yes`, `no`, `accept-new`, `ask`, `off` as written (lowercased).
    pub strict_host_key_checking: Option<String>,
    /// Every UserKnownHostsFile path that applies, unexpanded.
    pub user_known_hosts_files: Vec<String>,
    pub hash_known_hosts: Option<bool>,
    /// `IdentitiesOnly yes`: offer only the key files, not the agent's keys.
    pub identities_only: Option<bool>,
    /// The name looked up and recorded in known_hosts instead of the host name.
    pub host_key_alias: Option<String>,
    /// ConnectTimeout in seconds.
    pub connect_timeout: Option<u64>,
    /// ControlMaster, ControlPath and ControlPersist as written (unexpanded).
    pub control_master: Option<String>,
    pub control_path: Option<String>,
    pub control_persist: Option<String>,
    /// ProxyCommand, the rest of its line as written (a shell command, unexpanded).
    pub proxy_command: Option<String>,
    /// ProxyJump as written: `[user@]host[:port]`, comma-separated hops, or `none`.
    pub proxy_jump: Option<String>,
}

/// Deepest `Include` nesting followed (ssh uses 16).
const MAX_INCLUDE_DEPTH: usize = 16;

/// Reads `files` in order (missing files are skipped) and collects what applies to `alias`.
/// `user_dir` is where relative `Include` paths of the first file resolve (`~/.ssh`); the
/// other files resolve relative to `/etc/ssh`.
pub fn lookup(alias: &str, files: &[PathBuf], home: &Path) -> HostConfig {
    let mut cfg = HostConfig::default();
    for (i, file) in files.iter().enumerate() {
        let base = if i == 0 { home.join(".ssh") } else { PathBuf::from("/etc/ssh") };
        read_file(file, alias, &base, home, &mut cfg, 0);
    }
    cfg
}

fn read_file(path: &Path, alias: &str, base: &Path, home: &Path, cfg: &mut HostConfig, depth: usize) {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            log::debug!("reading ssh config {}", path.display());
            apply(&text, alias, cfg, &mut |inc: &str, cfg: &mut HostConfig| {
                if depth >= MAX_INCLUDE_DEPTH {
                    log::warn!("{}: Include nested too deeply, ignored", path.display());
                    return;
                }
                for p in include_paths(inc, base, home) {
                    read_file(&p, alias, base, home, cfg, depth + 1);
                }
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot read ssh config {}: {e}", path.display()),
    }
}

/// The files one `Include` argument names: `~` expanded, relative to `base`, and a `*`/`?`
/// pattern in the last component matched against that directory (sorted, as ssh does).
fn include_paths(arg: &str, base: &Path, home: &Path) -> Vec<PathBuf> {
    let expanded = expand_tilde(arg, home);
    let path = if Path::new(&expanded).is_absolute() { PathBuf::from(expanded) } else { base.join(expanded) };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !name.contains(['*', '?']) {
        return vec![path];
    }
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut found: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter(|e| wildcard_match(&name, &e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .collect(),
        Err(_) => Vec::new(),
    };
    found.sort();
    found
}

/// Applies the text of one config file to `cfg` for `alias`; `include` is called for every
/// `Include` line that is in effect (top level or inside a matching Host block).
pub fn apply(text: &str, alias: &str, cfg: &mut HostConfig, include: &mut dyn FnMut(&str, &mut HostConfig)) {
    // Lines before the first Host/Match apply to every host.
    let mut active = true;
    for (number, raw) in text.lines().enumerate() {
        let Some((keyword, args)) = split_line(raw) else { continue };
        match keyword.as_str() {
            "host" => active = host_matches(&args, alias),
            "match" => {
                log::debug!("ssh config line {}: Match blocks are not supported, skipped", number + 1);
                active = false;
            }
            _ if !active => {}
            "include" => {
                for a in &args {
                    include(a, cfg);
                }
            }
            "hostname" => first(&mut cfg.host_name, &args),
            "port" => first(&mut cfg.port, &args),
            "user" => first(&mut cfg.user, &args),
            "identityfile" => {
                if let Some(a) = args.first() {
                    cfg.identity_files.push(a.clone());
                }
            }
            "stricthostkeychecking" if cfg.strict_host_key_checking.is_none() => {
                cfg.strict_host_key_checking = args.first().map(|a| a.to_ascii_lowercase());
            }
            "userknownhostsfile" if cfg.user_known_hosts_files.is_empty() => {
                cfg.user_known_hosts_files = args.clone();
            }
            "hashknownhosts" if cfg.hash_known_hosts.is_none() => {
                cfg.hash_known_hosts = args.first().map(|a| a.eq_ignore_ascii_case("yes"));
            }
            "hostkeyalias" => first(&mut cfg.host_key_alias, &args),
            "connecttimeout" if cfg.connect_timeout.is_none() => {
                cfg.connect_timeout = args.first().and_then(|a| a.parse().ok());
            }
            // ProxyCommand and ProxyJump: whichever comes first wins (ssh_config(5)).
            "proxycommand" if cfg.proxy_command.is_none() && cfg.proxy_jump.is_none() => {
                cfg.proxy_command = Some(rest_of_line(raw));
            }
            "proxyjump" if cfg.proxy_command.is_none() && cfg.proxy_jump.is_none() => {
                cfg.proxy_jump = args.first().cloned();
            }
            "controlmaster" => first(&mut cfg.control_master, &args),
            "controlpath" => first(&mut cfg.control_path, &args),
            "controlpersist" => first(&mut cfg.control_persist, &args),
            "identitiesonly" if cfg.identities_only.is_none() => {
                cfg.identities_only = args.first().map(|a| a.eq_ignore_ascii_case("yes"));
            }
            _ => {}
        }
    }
}

fn first(slot: &mut Option<String>, args: &[String]) {
    if slot.is_none() {
        if let Some(a) = args.first() {
            *slot = Some(a.clone());
        }
    }
}

/// Everything after the keyword (and its `=`) as written: ProxyCommand is a shell command,
/// whose quotes are the shell's to read.
fn rest_of_line(line: &str) -> String {
    let line = line.trim();
    let end = line.find(|c: char| c.is_whitespace() || c == '=').unwrap_or(line.len());
    let rest = line[end..].trim_start();
    rest.strip_prefix('=').unwrap_or(rest).trim().to_string()
}

/// Splits a config line into a lowercased keyword and its arguments (`Key value`, `Key=value`,
/// double-quoted arguments). Comments and blank lines give None.
fn split_line(line: &str) -> Option<(String, Vec<String>)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line.find(|c: char| c.is_whitespace() || c == '=').unwrap_or(line.len());
    let keyword = line[..end].to_ascii_lowercase();
    let mut rest = line[end..].trim_start();
    if let Some(r) = rest.strip_prefix('=') {
        rest = r.trim_start();
    }
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut in_word = false;
    for c in rest.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                in_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if in_word {
                    args.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        args.push(cur);
    }
    Some((keyword, args))
}

/// Whether a `Host` line's patterns select `alias`: some pattern matches and no negated
/// pattern does. Patterns are case-insensitive as host names are.
pub fn host_matches(patterns: &[String], alias: &str) -> bool {
    let alias = alias.to_ascii_lowercase();
    let mut matched = false;
    for p in patterns.iter().flat_map(|p| p.split(',')) {
        let p = p.to_ascii_lowercase();
        if let Some(neg) = p.strip_prefix('!') {
            if wildcard_match(neg, &alias) {
                return false;
            }
        } else if wildcard_match(&p, &alias) {
            matched = true;
        }
    }
    matched
}

/// `*` matches any run of characters, `?` exactly one.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Replaces a leading `~` or `~/` with `home`.
pub fn expand_tilde(path: &str, home: &Path) -> String {
    if path == "~" {
        home.to_string_lossy().into_owned()
    } else if let Some(rest) = path.strip_prefix("~/") {
        home.join(rest).to_string_lossy().into_owned()
    } else {
        path.to_string()
    }
}

/// The values `%` tokens stand for in IdentityFile and UserKnownHostsFile.
#[derive(Debug, Clone)]
pub struct Tokens<'a> {
    /// `%d`: the local home directory.
    pub home: &'a Path,
    /// `%u`: the local user name.
    pub local_user: &'a str,
    /// `%h`: the remote host name (after HostName).
    pub host: &'a str,
    /// `%r`: the remote user name.
    pub remote_user: &'a str,
    /// `%p`: the port.
    pub port: &'a str,
}

/// Expands `~` and the `%d %u %h %r %p %%` tokens; an unknown token is kept as written.
pub fn expand_path(path: &str, t: &Tokens<'_>) -> String {
    let token = |c| match c {
        'd' => Some(t.home.to_string_lossy().into_owned()),
        'u' => Some(t.local_user.to_string()),
        'h' => Some(t.host.to_string()),
        'r' => Some(t.remote_user.to_string()),
        'p' => Some(t.port.to_string()),
        other => Some(format!("%{other}")),
    };
    let text = expand_tilde(path, t.home);
    // `token` refuses nothing, so the only error is a lone `%` at the end: kept as written.
    expand_percent(&text, token).unwrap_or_else(|_| {
        let head = &text[..text.len() - 1];
        expand_percent(head, token).unwrap_or_default() + "%"
    })
}

/// The `%` scanning shared by the ssh_config expanders: `%%` is `%`, every other `%x` is
/// `token(x)`. Err(Some(x)) for a token `token` refuses, Err(None) for a lone `%` at the end.
pub fn expand_percent(
    text: &str,
    mut token: impl FnMut(char) -> Option<String>,
) -> std::result::Result<String, Option<char>> {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some(c) => out.push_str(&token(c).ok_or(Some(c))?),
            None => return Err(None),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, alias: &str) -> HostConfig {
        let mut cfg = HostConfig::default();
        apply(text, alias, &mut cfg, &mut |_, _| {});
        cfg
    }

    const CONFIG: &str = "\
# comment
Host board*  !boardx
    HostName 10.0.0.%h
    Port 2222
    User=pi
    IdentityFile ~/.ssh/board_key
    IdentityFile \"/keys/with space\"

Match host foo exec \"true\"
    Port 1

Host b?? *.lab
  HostName lab-machine
  IdentitiesOnly yes
  HostKeyAlias labbox
  ConnectTimeout 7
  Port 17011
  StrictHostKeyChecking no

Host *
  Port 17010
  User everyone
  IdentityFile %d/.ssh/id_%r
  UserKnownHostsFile ~/.ssh/kh1 ~/.ssh/kh2
";

    #[test]
    fn proxy_command_is_the_rest_of_its_line_and_the_first_of_the_two_wins() {
        let text = "Host a\n  ProxyCommand=ssh -W \"%h:%p\" 'gw one'  \n  ProxyJump later\n\
                    Host b\n  ProxyJump ops@gw:2222,gw2 extra\n  ProxyCommand later\nHost *\n  ProxyCommand none\n";
        let a = parse(text, "a");
        assert_eq!(a.proxy_command.as_deref(), Some("ssh -W \"%h:%p\" 'gw one'"));
        assert_eq!(a.proxy_jump, None);
        let b = parse(text, "b");
        assert_eq!((b.proxy_command, b.proxy_jump.as_deref()), (None, Some("ops@gw:2222,gw2")));
        assert_eq!(parse(text, "c").proxy_command.as_deref(), Some("none"));
    }

    #[test]
    fn first_value_wins_and_identity_files_accumulate() {
        let c = parse(CONFIG, "board1");
        assert_eq!(c.host_name.as_deref(), Some("10.0.0.%h"));
        assert_eq!(c.port.as_deref(), Some("2222"));
        assert_eq!(c.user.as_deref(), Some("pi"));
        assert_eq!(c.identity_files, vec!["~/.ssh/board_key", "/keys/with space", "%d/.ssh/id_%r"]);
        assert_eq!(c.user_known_hosts_files, vec!["~/.ssh/kh1", "~/.ssh/kh2"]);
        assert_eq!(c.strict_host_key_checking, None);
    }

    #[test]
    fn control_keys_first_value_wins() {
        let text = "Host board\n  ControlMaster auto\n  ControlPath ~/.ssh/cm-%C\nHost *\n  ControlMaster no\n  ControlPersist=10m\n";
        let c = parse(text, "board");
        assert_eq!(c.control_master.as_deref(), Some("auto"));
        assert_eq!(c.control_path.as_deref(), Some("~/.ssh/cm-%C"));
        assert_eq!(c.control_persist.as_deref(), Some("10m"));
        let c = parse(text, "other");
        assert_eq!((c.control_master.as_deref(), c.control_path.as_deref()), (Some("no"), None));
    }

    #[test]
    fn negation_question_mark_and_several_patterns() {
        let c = parse(CONFIG, "boardx");
        assert_eq!(c.port.as_deref(), Some("17010"), "!boardx excludes the first block");
        assert_eq!(c.user.as_deref(), Some("everyone"));
        let c = parse(CONFIG, "bxy");
        assert_eq!(c.host_name.as_deref(), Some("lab-machine"));
        assert_eq!(c.port.as_deref(), Some("17011"));
        assert_eq!(c.strict_host_key_checking.as_deref(), Some("no"));
        assert_eq!(c.identities_only, Some(true));
        assert_eq!(c.host_key_alias.as_deref(), Some("labbox"));
        assert_eq!(c.connect_timeout, Some(7));
        let c = parse(CONFIG, "x.LAB");
        assert_eq!(c.port.as_deref(), Some("17011"));
        let c = parse(CONFIG, "other");
        assert_eq!(c.host_name, None);
        assert_eq!(c.port.as_deref(), Some("17010"));
    }

    #[test]
    fn match_block_is_skipped_not_fatal() {
        let c = parse(CONFIG, "foo");
        assert_eq!(c.port.as_deref(), Some("17010"));
    }

    #[test]
    fn no_match_means_no_values() {
        let c = parse("Host a\n Port 1\n", "b");
        assert_eq!(c, HostConfig::default());
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("a*b*c", "aXXbYc"));
        assert!(!wildcard_match("a*b", "aXXc"));
        assert!(wildcard_match("10.0.?.*", "10.0.1.200"));
        assert!(!wildcard_match("?", ""));
    }

    #[test]
    fn tokens() {
        let t = Tokens { home: Path::new("/h"), local_user: "me", host: "hh", remote_user: "rr", port: "22" };
        assert_eq!(expand_path("~/.ssh/id_%r@%h", &t), "/h/.ssh/id_rr@hh");
        assert_eq!(expand_path("%d/%u/%p/%%/%x", &t), "/h/me/22/%/%x");
        assert_eq!(expand_path("~", &t), "/h");
    }

    #[test]
    fn includes_follow_files() {
        let dir = std::env::temp_dir().join(format!("cpu-sshcfg-{}", std::process::id()));
        let ssh = dir.join(".ssh");
        std::fs::create_dir_all(ssh.join("conf.d")).unwrap();
        std::fs::write(ssh.join("config"), "Include conf.d/*.conf\nHost *\n  Port 1\n").unwrap();
        std::fs::write(ssh.join("conf.d/a.conf"), "Host inc\n  Port 4242\n  User u1\n").unwrap();
        std::fs::write(ssh.join("conf.d/ignored.txt"), "Host inc\n  Port 9\n").unwrap();
        let system = dir.join("system_config");
        std::fs::write(&system, "Host inc\n  HostName sys\n  User u2\n").unwrap();
        let c = lookup("inc", &[ssh.join("config"), system], &dir);
        assert_eq!(c.port.as_deref(), Some("4242"));
        assert_eq!(c.user.as_deref(), Some("u1"));
        assert_eq!(c.host_name.as_deref(), Some("sys"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
