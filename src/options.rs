//! The applets' flags and the option structs built from them.
//!
//! One place defines every flag of `cpu`, `cpud`, `decpu` and `decpud` with the Go
//! implementation's names and defaults (spec 3.1, 4.1, 7.6), plus our few extensions. The
//! applets only call `from_args`; tests use the same functions. What an option *does* lives
//! in the module that uses it.

use std::ffi::OsString;
use std::time::Duration;

use crate::flags::{FlagError, FlagSet, Parsed};

/// The default bind list: the client's directories shown over the server's.
pub const DEFAULT_NAMESPACE: &str = "/lib:/lib64:/usr:/bin:/etc:/home";
/// The cpu port. Unlike the newest Go client, we never fall back to 22 unless asked.
pub const DEFAULT_PORT: u16 = 17010;
/// Largest 9P message size we offer: the Linux limit for fd transports since 5.15.
pub const MAX_MSIZE: u32 = 1 << 20;

/// Options of `cpu` (and, with `servers`, of `decpu`).
#[derive(Debug, Clone, PartialEq)]
pub struct CpuOptions {
    /// Serve the client's files over 9P (`-9p`).
    pub ninep: bool,
    pub debug: bool,
    pub debug_9p: bool,
    pub dump: bool,
    /// A local fstab file prepended to the generated one (`-fstab`).
    pub fstab: String,
    /// A pinned host public key file (`-hk`); empty: known_hosts.
    pub host_key: String,
    /// Private key file (`-key`); empty: ssh_config, then the default files.
    pub key: String,
    pub use_key: bool,
    /// Colon-separated bind list (`-namespace`); empty or `none`: no binds.
    pub namespace: String,
    /// Transport (`-net`): "", tcp, tcp4, tcp6, vsock, unix, unix-vsock.
    pub net: String,
    /// Port (`-sp`); empty: ssh_config, then 17010.
    pub port: String,
    /// Directory served over 9P (`-root`); empty disables 9P and the fstab.
    pub root: String,
    /// How long the remote side may take to dial the 9P back-channel (`-timeout9p`).
    pub timeout_9p: Duration,
    /// Plain ssh: no 9P, no namespace (`-ssh`, NEW Go).
    pub plain_ssh: bool,
    /// Largest 9P msize to offer (extension; sent as CPU_MSIZE, ignored by Go cpud).
    pub msize: u32,
    /// Extra 9P mount options (extension; sent as CPU_MOUNTOPTS, ignored by Go cpud).
    pub mount_opts: String,
    /// Serve the 9P root read-only (extension).
    pub read_only: bool,
    /// decpu only: number of servers to run the command on (`-n`).
    pub servers: u32,
    /// decpu only: browse this network interface alone (`-dsInterface`); empty: all.
    pub ds_interface: String,
    /// The host argument (or, for decpu, a dnssd:// URI or "."); None if absent.
    pub host: Option<String>,
    /// The remote command and its arguments; empty: the shell.
    pub command: Vec<OsString>,
    /// Connection reuse (`-controlmaster`, `-controlpath`, `-controlpersist`): as written;
    /// empty means ssh_config decides. `crate::control` gives them their meaning.
    pub control_master: String,
    pub control_path: String,
    pub control_persist: String,
    /// `-controlcmd`: `check` or `exit` a running master instead of running a command.
    pub control_cmd: String,
}

/// After `cpu -h`'s flags: how the command words are run, and what `user@` means.
const CPU_NOTES: &str = "
The command runs as a program with its arguments, not through a shell (as with Go's cpu):
  cpu board ls -l /tmp/cpu/home
  cpu board sh -c 'echo $HOME; ls | wc -l'     # shell syntax: ask for sh -c
With no command, cpu runs $SHELL (with a terminal when stdin is one).
The port goes in -sp, not in the host: cpu -sp 17011 board date
One connection for many sessions, as ssh's ControlMaster (or the same lines in ~/.ssh/config):
  cpu -controlmaster=auto -controlpath='~/.ssh/cpu-%C' -controlpersist=10m board date
user@host: cpud accepts any user name and runs every session as cpud's own user.
";

/// After `decpu -h`'s flags.
const DECPU_NOTES: &str = "
The host is '.' (the best server around), a dnssd:// URI with requirements, or a host name:
  decpu . uname -a
  decpu 'dnssd://?arch=arm64&mem.avail>1000000' sh -c 'echo $HOSTNAME'
The command runs as a program with its arguments, not through a shell (use sh -c).
";

fn client_flags(name: &'static str, synopsis: &'static str, decpu: bool) -> FlagSet {
    let mut f = FlagSet::new(name, synopsis)
        .notes(if decpu { DECPU_NOTES } else { CPU_NOTES })
        .bool("9p", true, "Enable the 9p mount in the client")
        .bool("d", false, "enable debug prints")
        .bool("dbg9p", false, "show 9p io")
        .bool("dump", false, "Dump debug output and 9p trace to a file named cpu* in $TMPDIR")
        .string("fstab", "", "pass an fstab to the cpud")
        .string("hk", "", "file for host key (pinned; default: ~/.ssh/known_hosts)")
        .string(
            "key",
            "",
            "key file (default: ssh_config IdentityFile, then ~/.ssh/cpu_rsa, id_ed25519, id_ecdsa, id_rsa)",
        )
        .string(
            "namespace",
            DEFAULT_NAMESPACE,
            "Default namespace for the remote process -- set to none for none",
        )
        .string("net", "", "network type to use (tcp, tcp4, tcp6, vsock, unix, unix-vsock); default tcp")
        .string("sp", "", "cpu default port (default: ssh_config Port, then 17010)")
        .string("root", "/", "namespace root")
        .duration(
            "timeout9p",
            "100ms",
            "accepted for compatibility with Go cpu and ignored (the remote has 30s to dial the 9p back-channel)",
        )
        .int("msize", MAX_MSIZE as i64, "largest 9p message size to offer (cpu-all cpud only)")
        .string("mountopts", "", "extra 9p mount options, comma separated (cpu-all cpud only)")
        .bool("ro", false, "serve the 9p root read-only")
        // Connection reuse as OpenSSH does it; empty: ssh_config's ControlMaster etc.
        .string("controlmaster", "", "share one connection per host: no, yes, auto, ask, autoask (default: ssh_config ControlMaster, else no)")
        .string("controlpath", "", "control socket path, with ssh_config's %h %p %r %u %C... tokens; none disables (default: ssh_config ControlPath)")
        .string("controlpersist", "", "keep an idle master for: no, yes (forever), seconds, or 10m, 1h... (default: ssh_config ControlPersist, else no)")
        .string("controlcmd", "", "ask the master at -controlpath: check (is it running?) or exit (stop it)");
    if decpu {
        f = f.int("n", 1, "number of cpu servers to use").string(
            "dsInterface",
            "",
            "DNSSD interface to browse (default: all multicast-capable, lo included)",
        );
    } else {
        f = f.bool("useKey", true, "use ssh public key auth").bool(
            "ssh",
            false,
            "plain ssh: no 9p, no namespace",
        );
    }
    f
}

/// The flags of `cpu`.
pub fn cpu_flags() -> FlagSet {
    client_flags("cpu", "cpu [options] host [shell command]", false)
}

/// The flags of `decpu`.
pub fn decpu_flags() -> FlagSet {
    client_flags("decpu", "decpu [options] [host|dnssd://...|.] [shell command]", true)
}

impl CpuOptions {
    /// `cpu` flags and arguments (without the program name).
    pub fn from_cpu_args<I, S>(args: I) -> Result<Self, FlagError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let p = cpu_flags().parse(args)?;
        Self::from_parsed(&p, false)
    }

    /// `decpu` flags and arguments (without the program name).
    pub fn from_decpu_args<I, S>(args: I) -> Result<Self, FlagError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let p = decpu_flags().parse(args)?;
        Self::from_parsed(&p, true)
    }

    fn from_parsed(p: &Parsed, decpu: bool) -> Result<Self, FlagError> {
        let msize = p.int("msize");
        if !(4096..=MAX_MSIZE as i64).contains(&msize) {
            return Err(FlagError::BadValue {
                flag: "msize".into(),
                value: msize.to_string(),
                reason: format!("must be between 4096 and {MAX_MSIZE}"),
            });
        }
        let servers = if decpu { p.int("n") } else { 1 };
        if !(1..=1000).contains(&servers) {
            return Err(FlagError::BadValue {
                flag: "n".into(),
                value: servers.to_string(),
                reason: "must be between 1 and 1000".into(),
            });
        }
        if p.bool("d") && p.bool("dump") {
            return Err(FlagError::BadValue {
                flag: "dump".into(),
                value: "true".into(),
                reason: "-d and -dump cannot be used together".into(),
            });
        }
        let mut rest = p.rest.iter();
        let host = match rest.next() {
            Some(h) => Some(h.clone().into_string().map_err(|_| FlagError::NotUtf8)?),
            None => None,
        };
        let plain_ssh = !decpu && p.bool("ssh");
        let mut o = CpuOptions {
            ninep: p.bool("9p"),
            debug: p.bool("d"),
            debug_9p: p.bool("dbg9p"),
            dump: p.bool("dump"),
            fstab: p.string("fstab"),
            host_key: p.string("hk"),
            key: p.string("key"),
            use_key: decpu || p.bool("useKey"),
            namespace: p.string("namespace"),
            net: p.string("net"),
            port: p.string("sp"),
            root: p.string("root"),
            timeout_9p: p.duration("timeout9p"),
            plain_ssh,
            msize: msize as u32,
            mount_opts: p.string("mountopts"),
            read_only: p.bool("ro"),
            servers: servers as u32,
            ds_interface: if decpu { p.string("dsInterface") } else { String::new() },
            host,
            command: rest.cloned().collect(),
            control_master: p.string("controlmaster"),
            control_path: p.string("controlpath"),
            control_persist: p.string("controlpersist"),
            control_cmd: p.string("controlcmd"),
        };
        if !matches!(o.control_cmd.as_str(), "" | "check" | "exit") {
            return Err(FlagError::BadValue {
                flag: "controlcmd".into(),
                value: o.control_cmd.clone(),
                reason: "must be check or exit".into(),
            });
        }
        if plain_ssh {
            o.ninep = false;
            o.namespace.clear();
        }
        Ok(o)
    }
}

/// Options of `cpud` and `decpud` in daemon mode.
#[derive(Debug, Clone, PartialEq)]
pub struct CpudOptions {
    /// Host private key file (`-hk`); empty: `state_dir`'s key, else a fresh ed25519 key.
    pub host_key: String,
    /// Authorized keys file (`-pk`); every key in it is accepted.
    pub authorized_keys: String,
    /// Port, vsock port or unix socket path (`-sp`).
    pub port: String,
    /// Listen address for tcp (`-listen`, extension); empty: all addresses.
    pub listen: String,
    /// Transport (`-net`): tcp, tcp4, tcp6, vsock, unix.
    pub net: String,
    pub debug: bool,
    /// Act as init (`-init`); implied when running as PID 1.
    pub init: bool,
    pub klog: bool,
    /// `host:port` to dial once listening, sending "ok" (`-register`).
    pub register: String,
    pub register_timeout: Duration,
    pub sleep_before_serving: Duration,
    /// Where a generated host key is kept across restarts (`-statedir`, extension).
    pub state_dir: String,
    /// As PID 1: power off when the server stops for good (`-poweroff`, extension).
    pub poweroff: bool,
    /// As PID 1: reboot on SIGTERM/SIGINT or when the server stops (`-reboot`, extension).
    pub reboot: bool,
    /// decpud: DNS-SD registration settings.
    pub dnssd: DnssdOptions,
}

/// DNS-SD flags of `decpud`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DnssdOptions {
    pub enabled: bool,
    pub instance: String,
    pub domain: String,
    pub service: String,
    pub interface: String,
    /// Extra TXT pairs `k=v,k2=v2,flag`.
    pub txt: String,
}

/// After `cpud -h`'s flags.
const CPUD_NOTES: &str = "
cpud takes flags only. Every session runs as cpud's own user, whatever user name the client
sends (Go's cpu sends the local user's name): run cpud as the user the sessions should be.
";

fn daemon_flags(name: &'static str, synopsis: &'static str, decpud: bool) -> FlagSet {
    let mut f = FlagSet::new(name, synopsis)
        .notes(CPUD_NOTES)
        .string("hk", "", "file for host key (default: -statedir's key, else a new ed25519 key)")
        .string("pk", "key.pub", "file for authorized public keys (every key in it is accepted)")
        .string("sp", &DEFAULT_PORT.to_string(), "cpu default port (or unix socket path)")
        .string("listen", "", "address to listen on for tcp (default: all addresses)")
        .string("net", "tcp", "network type (tcp, tcp4, tcp6, vsock, unix)")
        .bool("d", false, "enable debug prints")
        .bool(
            "init",
            false,
            "run as init: mount /proc, /sys, /dev..., reap orphans, restart the server if it fails (recommended as PID 1 in an initramfs; implied as PID 1)",
        )
        .bool("klog", false, "Log cpud messages in kernel log, not stdout")
        .bool("remote", false, "indicates we are the remote side of the cpu session")
        .string("port9p", "", "port9p # on remote machine for 9p mount")
        .string("register", "", "address to dial, sending \"ok\", once listening")
        .duration("registerTO", "5s", "time to wait for the -register dial")
        .duration(
            "sleepBeforeServing",
            "0s",
            "add a sleep before serving -- usually only needed if cpud runs as init with uinitcmd",
        )
        .string("statedir", "", "directory where a generated host key is kept across restarts")
        .bool("poweroff", false, "as PID 1, power off when the server stops instead of restarting it")
        .bool("reboot", false, "as PID 1, reboot when the server stops instead of restarting it");
    if decpud {
        f = f
            .bool("dnssd", true, "advertise service using DNSSD")
            .string("dsInstance", "", "DNSSD instance name (default: hostname-cpud)")
            .string("dsDomain", "local", "DNSSD domain")
            .string("dsService", "_ncpu._tcp", "DNSSD service type")
            .string("dsInterface", "", "DNSSD interface (default: all)")
            .string("dsTxt", "", "DNSSD extra key-value pairs: k=v,k2=v2,flag");
    }
    f
}

/// The flags of `cpud`.
pub fn cpud_flags() -> FlagSet {
    cpud_flags_for("cpud", false)
}

/// The flags of `decpud`.
pub fn decpud_flags() -> FlagSet {
    cpud_flags_for("decpud", true)
}

fn cpud_flags_for(name: &'static str, decpud: bool) -> FlagSet {
    if decpud {
        daemon_flags(name, "decpud [options]", true)
    } else {
        daemon_flags(name, "cpud [options]", false)
    }
}

impl CpudOptions {
    pub fn from_args<I, S>(args: I, decpud: bool) -> Result<Self, FlagError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let p = cpud_flags_for(if decpud { "decpud" } else { "cpud" }, decpud).parse(args)?;
        if let Some(extra) = p.rest.first() {
            let arg = extra.to_string_lossy().into_owned();
            let applet = if decpud { "decpud" } else { "cpud" };
            let hint = if crate::flags::parse_bool(&arg).is_some() {
                format!("{applet} takes flags only; give a boolean flag its value with =, as -init={arg}")
            } else {
                format!("{applet} takes flags only, no arguments")
            };
            return Err(FlagError::Unexpected { arg, hint });
        }
        let dnssd = if decpud {
            DnssdOptions {
                enabled: p.bool("dnssd"),
                instance: p.string("dsInstance"),
                domain: p.string("dsDomain"),
                service: p.string("dsService"),
                interface: p.string("dsInterface"),
                txt: p.string("dsTxt"),
            }
        } else {
            DnssdOptions::default()
        };
        Ok(CpudOptions {
            host_key: p.string("hk"),
            authorized_keys: p.string("pk"),
            port: p.string("sp"),
            listen: p.string("listen"),
            net: p.string("net"),
            debug: p.bool("d"),
            init: p.bool("init"),
            klog: p.bool("klog"),
            register: p.string("register"),
            register_timeout: p.duration("registerTO"),
            sleep_before_serving: p.duration("sleepBeforeServing"),
            state_dir: p.string("statedir"),
            poweroff: p.bool("poweroff"),
            reboot: p.bool("reboot"),
            dnssd,
        })
    }
}

/// `cpud -remote`: the words of the exec string after the daemon re-executed itself.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteOptions {
    pub debug: bool,
    /// The forwarded 9P port on the server's loopback, if the client serves 9P.
    pub port9p: Option<u16>,
    /// The command and its arguments; empty: `$SHELL`.
    pub command: Vec<OsString>,
}

impl RemoteOptions {
    /// Parses the words after `-remote`. Only `-d` and `-port9p` are taken, and only as
    /// leading words, so a user command that starts with `-` is passed through verbatim.
    pub fn from_args<I, S>(args: I) -> Result<Self, FlagError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut words: std::collections::VecDeque<OsString> = args.into_iter().map(Into::into).collect();
        let mut o = RemoteOptions { debug: false, port9p: None, command: Vec::new() };
        while let Some(w) = words.front().and_then(|w| w.to_str()).map(str::to_string) {
            let body = w.strip_prefix("--").or_else(|| w.strip_prefix('-'));
            let Some(body) = body else { break };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            match name {
                "" if inline.is_none() && w == "--" => {
                    words.pop_front();
                    break;
                }
                "d" => {
                    words.pop_front();
                    o.debug = match inline {
                        Some(v) => crate::flags::parse_bool(&v).ok_or(FlagError::BadValue {
                            flag: "d".into(),
                            value: v.clone(),
                            reason: "parse error".into(),
                        })?,
                        None => true,
                    };
                }
                "remote" => {
                    words.pop_front();
                }
                "port9p" => {
                    words.pop_front();
                    let v = match inline {
                        Some(v) => v,
                        None => words
                            .pop_front()
                            .ok_or(FlagError::MissingValue("port9p".into()))?
                            .into_string()
                            .map_err(|_| FlagError::NotUtf8)?,
                    };
                    if v.is_empty() {
                        continue;
                    }
                    let port: u16 = v.parse().map_err(|_| FlagError::BadValue {
                        flag: "port9p".into(),
                        value: v.clone(),
                        reason: "not a port number".into(),
                    })?;
                    o.port9p = Some(port);
                }
                _ => break,
            }
        }
        o.command = words.into_iter().collect();
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_defaults() {
        let o = CpuOptions::from_cpu_args(["host"]).unwrap();
        assert!(o.ninep && o.use_key && !o.debug);
        assert_eq!(o.namespace, DEFAULT_NAMESPACE);
        assert_eq!(o.root, "/");
        assert_eq!(o.port, "");
        assert_eq!(o.msize, MAX_MSIZE);
        assert_eq!(o.timeout_9p, Duration::from_millis(100));
        assert_eq!(o.host.as_deref(), Some("host"));
        assert!(o.command.is_empty());
    }

    #[test]
    fn cpu_remote_command_keeps_its_flags() {
        let o = CpuOptions::from_cpu_args(["-9p=false", "-sp", "22", "camera", "flashrom", "-r", "rom.img"])
            .unwrap();
        assert!(!o.ninep);
        assert_eq!(o.port, "22");
        assert_eq!(o.command, ["flashrom", "-r", "rom.img"].map(OsString::from).to_vec());
    }

    #[test]
    fn plain_ssh_turns_off_9p() {
        let o = CpuOptions::from_cpu_args(["-ssh", "h"]).unwrap();
        assert!(!o.ninep);
        assert!(o.namespace.is_empty());
    }

    #[test]
    fn decpu_has_n_and_no_usekey() {
        let o = CpuOptions::from_decpu_args(["-n", "3", "dnssd://?arch=arm64", "date"]).unwrap();
        assert_eq!(o.servers, 3);
        assert!(matches!(CpuOptions::from_decpu_args(["-useKey=false"]), Err(FlagError::Unknown(_))));
        assert!(CpuOptions::from_decpu_args(["-n", "0"]).is_err());
        assert_eq!(o.ds_interface, "");
        let o = CpuOptions::from_decpu_args(["-dsInterface", "usb0", ".", "date"]).unwrap();
        assert_eq!(o.ds_interface, "usb0");
        assert!(matches!(CpuOptions::from_cpu_args(["-dsInterface", "usb0"]), Err(FlagError::Unknown(_))));
    }

    #[test]
    fn cpud_defaults() {
        let o = CpudOptions::from_args(Vec::<String>::new(), false).unwrap();
        assert_eq!(o.port, "17010");
        assert_eq!(o.authorized_keys, "key.pub");
        assert_eq!(o.net, "tcp");
        assert_eq!(o.register_timeout, Duration::from_secs(5));
        assert!(CpudOptions::from_args(["-dsTxt", "a=b"], false).is_err());
        let d = CpudOptions::from_args(["-dsTxt", "a=b"], true).unwrap();
        assert_eq!(d.dnssd.txt, "a=b");
        assert_eq!(d.dnssd.service, "_ncpu._tcp");
        assert!(d.dnssd.enabled);
        assert_eq!(
            CpudOptions::from_args(["-d", "extra"], false),
            Err(FlagError::Unexpected {
                arg: "extra".into(),
                hint: "cpud takes flags only, no arguments".into()
            })
        );
        assert!(matches!(
            CpudOptions::from_args(["-init", "false"], true),
            Err(FlagError::Unexpected { hint, .. }) if hint.contains("-init=false")
        ));
    }

    #[test]
    fn remote_words() {
        let o = RemoteOptions::from_args(["-port9p=4000", "ls", "-l"]).unwrap();
        assert_eq!(o.port9p, Some(4000));
        assert_eq!(o.command, ["ls", "-l"].map(OsString::from).to_vec());
        let o = RemoteOptions::from_args(["-remote", "-d", "-port9p", "5", "-x"]).unwrap();
        assert!(o.debug);
        assert_eq!(o.port9p, Some(5));
        assert_eq!(o.command, vec![OsString::from("-x")]);
        let o = RemoteOptions::from_args(["--", "-d"]).unwrap();
        assert_eq!(o.command, vec![OsString::from("-d")]);
        assert!(RemoteOptions::from_args(["-port9p=x"]).is_err());
    }
}
