//! The cpu exec string: how the client writes the remote command and how cpud reads it.
//!
//! Client side (spec 3.7): `-port9p=P 'arg0' 'arg1'`, or ` 'arg0'` without 9P; each argument
//! in single quotes, an embedded `'` written as `'"'"'`. Server side (spec 4.7): POSIX-shell
//! word splitting (single quotes literal, double quotes with `\"` and `\\`, backslash escapes
//! outside quotes). Unlike Go we keep empty arguments (`''`).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// Builds the exec string the Go cpud expects.
pub fn build_exec(port9p: Option<u16>, args: &[OsString]) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(p) = port9p {
        out.extend_from_slice(format!("-port9p={p}").as_bytes());
    }
    for a in args {
        out.push(b' ');
        out.extend_from_slice(&quote(a));
    }
    out
}

/// Single-quotes one word for a POSIX shell.
pub fn quote(word: &OsStr) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &b in word.as_bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"'\"'\"'");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// Whether an exec string is in the cpu form (spec 4.7): it starts with `-port9p` or with a
/// space. Anything else came from a plain ssh client and runs through the user's shell.
pub fn is_cpu_form(exec: &[u8]) -> bool {
    exec.starts_with(b"-port9p") || exec.starts_with(b" ")
}

/// Splits a command string into words by POSIX shell quoting rules. An unclosed quote ends
/// the last word (as Go's go-shlex does, the words so far are used).
pub fn split_words(s: &[u8]) -> Vec<OsString> {
    let mut words = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    let mut in_word = false;
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => {
                if in_word {
                    words.push(OsString::from_vec(std::mem::take(&mut cur)));
                    in_word = false;
                }
                i += 1;
            }
            b'\'' => {
                in_word = true;
                i += 1;
                while i < s.len() && s[i] != b'\'' {
                    cur.push(s[i]);
                    i += 1;
                }
                i += 1; // closing quote (or end)
            }
            b'"' => {
                in_word = true;
                i += 1;
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() && matches!(s[i + 1], b'"' | b'\\' | b'$' | b'`') {
                        i += 1;
                    }
                    cur.push(s[i]);
                    i += 1;
                }
                i += 1;
            }
            b'\\' => {
                in_word = true;
                if i + 1 < s.len() {
                    cur.push(s[i + 1]);
                }
                i += 2;
            }
            _ => {
                in_word = true;
                cur.push(b);
                i += 1;
            }
        }
    }
    if in_word {
        words.push(OsString::from_vec(cur));
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn build_matches_go() {
        assert_eq!(build_exec(Some(40123), &os(&["/bin/bash"])), b"-port9p=40123 '/bin/bash'");
        assert_eq!(
            build_exec(Some(40123), &os(&["ls", "-l", "it's"])),
            b"-port9p=40123 'ls' '-l' 'it'\"'\"'s'".to_vec()
        );
        assert_eq!(build_exec(None, &os(&["/bin/date"])), b" '/bin/date'");
    }

    #[test]
    fn round_trip_keeps_every_byte_and_empty_words() {
        let args = os(&["a b", "", "it's", "\"q\"", "back\\slash", "$HOME", "-x"]);
        let s = build_exec(Some(1), &args);
        let words = split_words(&s);
        assert_eq!(words[0], OsString::from("-port9p=1"));
        assert_eq!(&words[1..], &args[..]);
        assert!(is_cpu_form(&s));
        assert!(is_cpu_form(&build_exec(None, &args)));
        assert!(!is_cpu_form(b"ls -l"));
    }

    #[test]
    fn posix_rules() {
        assert_eq!(split_words(br#"a "b \" c" d\ e 'f'g"#), os(&["a", "b \" c", "d e", "fg"]));
        assert_eq!(split_words(b"  "), Vec::<OsString>::new());
        assert_eq!(split_words(b"'unclosed"), os(&["unclosed"]));
    }
}
