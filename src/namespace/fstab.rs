//! fstab text (CPU_FSTAB, spec 5.4): parsing lines and translating mount options.
//!
//! Pure functions only: what to mount, with which flags and data. Applying the entries (and
//! deciding what to do about missing paths) is [`super::session`]'s job.

/// Mount flags (`MS_*` of mount(2)), as the kernel numbers them.
pub type MsFlags = u32;

/// The `MS_*` values this crate uses (the same on every Linux architecture).
pub mod ms {
    use super::MsFlags;
    pub const RDONLY: MsFlags = 1;
    pub const NOSUID: MsFlags = 2;
    pub const NODEV: MsFlags = 4;
    pub const NOEXEC: MsFlags = 8;
    pub const SYNCHRONOUS: MsFlags = 16;
    pub const REMOUNT: MsFlags = 32;
    pub const MANDLOCK: MsFlags = 64;
    pub const DIRSYNC: MsFlags = 128;
    pub const NOSYMFOLLOW: MsFlags = 256;
    pub const NOATIME: MsFlags = 1024;
    pub const NODIRATIME: MsFlags = 2048;
    pub const BIND: MsFlags = 4096;
    pub const MOVE: MsFlags = 8192;
    pub const REC: MsFlags = 16384;
    pub const SILENT: MsFlags = 32768;
    pub const POSIXACL: MsFlags = 1 << 16;
    pub const UNBINDABLE: MsFlags = 1 << 17;
    pub const PRIVATE: MsFlags = 1 << 18;
    pub const SLAVE: MsFlags = 1 << 19;
    pub const SHARED: MsFlags = 1 << 20;
    pub const RELATIME: MsFlags = 1 << 21;
    pub const KERNMOUNT: MsFlags = 1 << 22;
    pub const I_VERSION: MsFlags = 1 << 23;
    pub const STRICTATIME: MsFlags = 1 << 24;
    pub const LAZYTIME: MsFlags = 1 << 25;
    pub const SUBMOUNT: MsFlags = 1 << 26;
    pub const NOREMOTELOCK: MsFlags = 1 << 27;
    pub const NOSEC: MsFlags = 1 << 28;
    pub const BORN: MsFlags = 1 << 29;
    pub const ACTIVE: MsFlags = 1 << 30;
    pub const MGC_VAL: MsFlags = 0xC0ED_0000;
    pub const MGC_MSK: MsFlags = 0xFFFF_0000;
    pub const RMT_MASK: MsFlags = RDONLY | SYNCHRONOUS | MANDLOCK | I_VERSION | LAZYTIME;
}

/// One usable fstab line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FstabEntry {
    /// 1-based line number in the fstab text (for messages).
    pub line: usize,
    /// What to mount (a path for binds, a device or a name otherwise).
    pub spec: String,
    /// Where to mount it.
    pub file: String,
    pub vfstype: String,
    /// The raw options field (comma separated).
    pub options: String,
}

/// Parses fstab text: blank and `#` lines are skipped; lines with fewer than six fields are
/// ignored (as Go does) with a debug note, because `dump` and `pass` are mandatory there.
pub fn parse_fstab(text: &str) -> Vec<FstabEntry> {
    let mut entries = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 {
            log::debug!("fstab line {}: {} fields, want 6; ignored: {line:?}", index + 1, fields.len());
            continue;
        }
        entries.push(FstabEntry {
            line: index + 1,
            spec: fields[0].to_string(),
            file: fields[1].to_string(),
            vfstype: fields[2].to_string(),
            options: fields[3].to_string(),
        });
    }
    entries
}

/// Mount options split into mount(2) flags and the filesystem's data string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountOptions {
    pub flags: MsFlags,
    /// The words that are not flags, comma-joined in their original order.
    pub data: String,
}

impl MountOptions {
    /// Whether this is a bind mount (the spec is then a path that must exist).
    pub fn is_bind(&self) -> bool {
        self.flags & ms::BIND != 0
    }
}

/// The flag a word stands for; `Some(0)` for words that only clear a flag or are accepted and
/// dropped. The Go table also maps `async`, `sync` and `invalidate` to msync(2) constants,
/// which makes `async` mean read-only; here `sync` is MS_SYNCHRONOUS and the others are no-ops.
fn flag_word(word: &str) -> Option<MsFlags> {
    Some(match word {
        "active" => ms::ACTIVE,
        "bind" => ms::BIND,
        "rbind" => ms::BIND | ms::REC,
        "born" => ms::BORN,
        "dirsync" => ms::DIRSYNC,
        "i_version" | "iversion" => ms::I_VERSION,
        "kernmount" => ms::KERNMOUNT,
        "lazytime" => ms::LAZYTIME,
        "mandlock" => ms::MANDLOCK,
        "mgc_MSK" => ms::MGC_MSK,
        "mgc_val" => ms::MGC_VAL,
        "move" => ms::MOVE,
        "noatime" => ms::NOATIME,
        "nodev" => ms::NODEV,
        "nodiratime" => ms::NODIRATIME,
        "noexec" => ms::NOEXEC,
        "noremotelock" => ms::NOREMOTELOCK,
        "nosec" => ms::NOSEC,
        "nosuid" => ms::NOSUID,
        "nosymfollow" => ms::NOSYMFOLLOW,
        "posixacl" => ms::POSIXACL,
        "private" => ms::PRIVATE,
        "rprivate" => ms::PRIVATE | ms::REC,
        "rdonly" | "ro" => ms::RDONLY,
        "rec" => ms::REC,
        "relatime" => ms::RELATIME,
        "remount" => ms::REMOUNT,
        "rmt_mask" => ms::RMT_MASK,
        "shared" => ms::SHARED,
        "rshared" => ms::SHARED | ms::REC,
        "silent" | "verbose" => ms::SILENT,
        "slave" => ms::SLAVE,
        "rslave" => ms::SLAVE | ms::REC,
        "strictatime" => ms::STRICTATIME,
        "submount" => ms::SUBMOUNT,
        "synchronous" | "sync" => ms::SYNCHRONOUS,
        "unbindable" => ms::UNBINDABLE,
        "runbindable" => ms::UNBINDABLE | ms::REC,
        // Defaults and negations: nothing to set.
        "defaults" | "rw" | "async" | "invalidate" | "exec" | "suid" | "dev" | "atime" | "diratime"
        | "norelatime" | "nostrictatime" | "symfollow" => 0,
        // Only meaningful to mount(8), fsck or systemd; the kernel would reject them as data.
        "blkio" | "nouser" | "user" | "users" | "owner" | "group" | "auto" | "noauto" | "nofail"
        | "_netdev" => 0,
        _ => return None,
    })
}

/// Translates an fstab options field into flags and data (spec 5.4, minus the Go quirks).
pub fn translate_options(options: &str) -> MountOptions {
    let mut flags = 0;
    let mut data: Vec<&str> = Vec::new();
    for word in options.split(',').filter(|w| !w.is_empty()) {
        if word.starts_with("x-") || word.starts_with("comment=") {
            continue; // userspace-only annotations
        }
        match flag_word(word) {
            Some(f) => flags |= f,
            None => data.push(word),
        }
    }
    MountOptions { flags, data: data.join(",") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_client_fstab() {
        let text = "\n# comment\n/tmp/cpu/lib /lib none defaults,bind 0 0\nshort line 1 2\n  proc /proc proc defaults 0 0  \n";
        let entries = parse_fstab(text);
        assert_eq!(
            entries,
            vec![
                FstabEntry {
                    line: 3,
                    spec: "/tmp/cpu/lib".into(),
                    file: "/lib".into(),
                    vfstype: "none".into(),
                    options: "defaults,bind".into()
                },
                FstabEntry {
                    line: 5,
                    spec: "proc".into(),
                    file: "/proc".into(),
                    vfstype: "proc".into(),
                    options: "defaults".into()
                },
            ]
        );
        assert!(parse_fstab("\n\n").is_empty());
    }

    #[test]
    fn options_to_flags_and_data() {
        assert_eq!(translate_options("defaults,bind"), MountOptions { flags: ms::BIND, data: String::new() });
        assert_eq!(
            translate_options("ro,nosuid,size=10m,mode=0755,nodev"),
            MountOptions { flags: ms::RDONLY | ms::NOSUID | ms::NODEV, data: "size=10m,mode=0755".into() }
        );
        assert_eq!(translate_options("rbind,rw").flags, ms::BIND | ms::REC);
        // Go turns `async` into MS_RDONLY (an msync constant); not here.
        assert_eq!(translate_options("async").flags, 0);
        assert_eq!(translate_options("sync").flags, ms::SYNCHRONOUS);
        assert_eq!(
            translate_options("noauto,nofail,x-systemd.automount,comment=foo,blkio,nouser"),
            MountOptions::default()
        );
        assert!(translate_options("bind").is_bind());
        assert!(!translate_options("size=1m").is_bind());
    }
}
