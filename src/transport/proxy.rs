//! ssh_config's ProxyCommand and ProxyJump: the SSH connection runs over the standard input and
//! output of a command instead of a socket, as in ssh (a board behind a jump host, a serial
//! console bridge, `nc -X`). Owns the command line they give (tokens expanded, ProxyJump turned
//! into the `ssh -W` command OpenSSH itself runs for it) and the child process, which lives
//! exactly as long as the stream.

use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Join, ReadBuf};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::BoxStream;
use crate::error::{Error, Result};

/// What the command line's `%` tokens stand for.
pub struct ProxyTokens<'a> {
    /// The host to reach (HostName, else the alias): `%h`.
    pub host: &'a str,
    pub port: &'a str,
    pub remote_user: &'a str,
    /// The name as typed: `%n`.
    pub alias: &'a str,
}

/// The command to run for ssh_config's ProxyCommand or ProxyJump (ProxyCommand when both are
/// given: the config reader keeps only the first), tokens expanded; None for a direct
/// connection (neither, or `none`).
pub fn proxy_command(command: Option<&str>, jump: Option<&str>, t: &ProxyTokens<'_>) -> Option<String> {
    let template = match (command, jump) {
        (Some(c), _) if !c.eq_ignore_ascii_case("none") && !c.is_empty() => c.to_string(),
        (None, Some(j)) if !j.eq_ignore_ascii_case("none") && !j.is_empty() => jump_command(j),
        _ => return None,
    };
    let token = |c| match c {
        'h' => Some(t.host.to_string()),
        'p' => Some(t.port.to_string()),
        'r' => Some(t.remote_user.to_string()),
        'n' => Some(t.alias.to_string()),
        other => Some(format!("%{other}")),
    };
    Some(crate::ssh::config::expand_percent(&template, token).unwrap_or(template))
}

/// ProxyJump `hop1,hop2,...` as OpenSSH runs it: `ssh -W [%h]:%p` to the last hop, through
/// the others (`-J`). Each hop is `[user@]host[:port]`, given to ssh as an `ssh://` URI so a
/// port needs no flag. The hops are single-quoted for the shell.
fn jump_command(jump: &str) -> String {
    let hops: Vec<&str> = jump.split(',').map(str::trim).filter(|h| !h.is_empty()).collect();
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut cmd = String::from("ssh -W '[%h]:%p'");
    if let Some((last, through)) = hops.split_last() {
        if !through.is_empty() {
            cmd += &format!(" -J {}", quote(&through.join(",")));
        }
        cmd += &format!(" {}", quote(&format!("ssh://{last}")));
    }
    cmd
}

/// The connection over a running command's standard output (read) and input (write).
struct CommandStream {
    io: Join<ChildStdout, ChildStdin>,
    /// Killed when the stream is dropped (the connection is over).
    _child: Child,
}

impl AsyncRead for CommandStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CommandStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Starts `command` with /bin/sh, as ssh does (`exec` in front, so the shell does not stay
/// between), its standard error on ours (a jump host's messages reach the user).
pub async fn dial_command(command: &str) -> Result<BoxStream> {
    log::debug!("connecting through the proxy command: {command}");
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec {command}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::Connect(format!("cannot start the proxy command `{command}`: {e}")))?;
    let (Some(out), Some(input)) = (child.stdout.take(), child.stdin.take()) else {
        return Err(Error::Connect(format!("the proxy command `{command}` has no pipes")));
    };
    Ok(Box::new(CommandStream { io: tokio::io::join(out, input), _child: child }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: ProxyTokens<'static> =
        ProxyTokens { host: "board", port: "17010", remote_user: "me", alias: "cam" };

    #[test]
    fn proxy_command_tokens_and_none() {
        assert_eq!(
            proxy_command(Some("nc -X 5 %h %p # %r %n %%"), None, &T).as_deref(),
            Some("nc -X 5 board 17010 # me cam %")
        );
        assert_eq!(proxy_command(Some("none"), Some("jump"), &T), None);
        assert_eq!(proxy_command(None, Some("NONE"), &T), None);
        assert_eq!(proxy_command(None, None, &T), None);
    }

    #[test]
    fn proxy_jump_is_ssh_w_through_the_hops() {
        assert_eq!(proxy_command(None, Some("gw"), &T).as_deref(), Some("ssh -W '[board]:17010' 'ssh://gw'"));
        assert_eq!(
            proxy_command(None, Some("ops@gw1:2222,gw2"), &T).as_deref(),
            Some("ssh -W '[board]:17010' -J 'ops@gw1:2222' 'ssh://gw2'")
        );
    }

    #[tokio::test]
    async fn the_stream_is_the_commands_input_and_output() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = dial_command("sh -c 'read l; echo \"got:$l\"'").await.expect("started");
        s.write_all(b"hello\n").await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read until the command ends");
        assert_eq!(out, "got:hello\n");
    }
}
