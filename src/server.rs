//! The `cpud` daemon: listen, authenticate, and run each session through `cpud -remote`.
//!
//! This module turns [`CpudOptions`] into a running server: it picks the host key
//! (`-hk`, `-statedir`, or a fresh one), checks the authorized keys file once at start (a
//! missing file stops the daemon; `-pk ""` means no authentication, loudly), listens on
//! `-listen`/`-sp`, sends the `-register` note, and runs [`crate::ssh::server::serve`] on a
//! current-thread tokio runtime until SIGTERM, SIGINT or SIGHUP (then it stops accepting and
//! waits for the sessions in progress; a second signal ends it at once).

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::options::CpudOptions;
use crate::ssh::authorized_keys::AuthorizedKeys;
use crate::ssh::hostkey::{self, HostKeySource};
use crate::ssh::server::{serve, ServerConfig};
use crate::transport::{Listener, Net};

/// Runs the daemon until it is told to stop.
pub fn run(opts: CpudOptions) -> Result<()> {
    run_with_tenants(opts, None)
}

/// [`run`], calling `on_tenants` with the number of running sessions whenever it changes
/// (decpud announces it).
pub fn run_with_tenants(
    opts: CpudOptions,
    on_tenants: Option<Arc<dyn Fn(usize) + Send + Sync>>,
) -> Result<()> {
    let config = server_config(&opts, on_tenants)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    runtime.block_on(async move {
        if !opts.sleep_before_serving.is_zero() {
            tokio::time::sleep(opts.sleep_before_serving).await;
        }
        let net = Net::parse(&opts.net, false)?;
        let listener = Listener::bind(net, &opts.listen, &opts.port).await?;
        log::info!("Listening on {}", listener.local_addr());
        if !opts.register.is_empty() {
            register(net, &opts.register, opts.register_timeout).await;
        }
        serve(listener, config, stop_signal()).await
    })
}

/// Builds the server configuration from the flags; fails (exit 1) on an unusable host key or
/// authorized keys file.
pub fn server_config(
    opts: &CpudOptions,
    on_tenants: Option<Arc<dyn Fn(usize) + Send + Sync>>,
) -> Result<ServerConfig> {
    // A key of the wrong kind is one clear line at start, not a parse error or refused logins.
    if !opts.host_key.is_empty() {
        crate::keyfile::expect_private("-hk", std::path::Path::new(&opts.host_key)).map_err(Error::Daemon)?;
    }
    if !opts.authorized_keys.is_empty() {
        crate::keyfile::expect_public("-pk", std::path::Path::new(&opts.authorized_keys))
            .map_err(Error::Daemon)?;
    }
    let (key, source) = hostkey::load_or_create(&opts.host_key, &opts.state_dir)?;
    let fp = hostkey::fingerprint(key.public_key());
    let alg = key.algorithm().as_str().to_string();
    match &source {
        HostKeySource::File(p) => log::info!("host key {alg} {fp} from {}", p.display()),
        HostKeySource::StateLoaded(p) => log::info!("host key {alg} {fp} from {}", p.display()),
        HostKeySource::StateCreated(p) => log::info!("host key {alg} {fp} created in {}", p.display()),
        HostKeySource::Ephemeral => {
            log::info!("host key {alg} {fp} (generated for this run; use -hk or -statedir to keep one)")
        }
    }
    let authorized = if opts.authorized_keys.is_empty() {
        log::warn!(
            "-pk \"\": NO AUTHENTICATION. Anyone who can reach this port can run commands as this user."
        );
        None
    } else {
        let path = PathBuf::from(&opts.authorized_keys);
        let keys = AuthorizedKeys::load(&path).map_err(|e| match e {
            Error::Daemon(m) => Error::Daemon(format!(
                "{m} (-pk names the authorized keys; -pk \"\" turns authentication off)"
            )),
            other => other,
        })?;
        for w in &keys.warnings {
            log::warn!("{}: {w}", path.display());
        }
        if keys.keys.is_empty() {
            log::warn!(
                "{} has no usable key: every login will be refused until one is added",
                path.display()
            );
        } else {
            log::info!("{} key(s) authorized by {}", keys.keys.len(), path.display());
        }
        Some(path)
    };
    let mut config = ServerConfig::new(key, authorized);
    config.on_tenants = on_tenants;
    if !config.remote_program.exists() {
        // No /proc (an initramfs before init mounted it): fall back to how we were started.
        if let Some(p) = own_path() {
            config.remote_program = p;
        }
    }
    Ok(config)
}

/// This binary's path from argv[0] (searched in PATH when it has no slash).
fn own_path() -> Option<PathBuf> {
    let argv0 = PathBuf::from(std::env::args_os().next()?);
    if argv0.components().count() > 1 {
        return std::fs::canonicalize(&argv0).ok().or(Some(argv0));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(&argv0)).find(|p| p.is_file())
}

/// `-register host:port`: tell a waiting harness we are up (sends `ok`); errors are logged.
async fn register(net: Net, target: &str, timeout: std::time::Duration) {
    use tokio::io::AsyncWriteExt;
    let (host, port) = match target.rsplit_once(':') {
        Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']'), p),
        None => (target, ""),
    };
    match crate::transport::dial(net, host, port, timeout).await {
        Ok(mut s) => {
            if let Err(e) = s.write_all(b"ok").await {
                log::warn!("-register {target}: {e}");
            }
            let _ = s.shutdown().await;
        }
        Err(e) => log::warn!("-register {target}: {e}"),
    }
}

/// Completes on the first SIGTERM, SIGINT or SIGHUP; a second one exits the process.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        log::warn!("cannot watch signals; cpud stops only when killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = hup.recv() => {}
    }
    log::info!("signal received: no new connections; waiting for sessions to end (signal again to quit now)");
    crate::task::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
        }
        log::info!("second signal: exiting");
        std::process::exit(0);
    });
}
