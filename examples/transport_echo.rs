//! A tiny echo server and client over any cpu-all transport, to prove a transport end to end
//! where the SSH code is not needed (e.g. vsock in a VM guest, unix-vsock from the host).
//!
//! ```text
//! transport_echo listen NET ADDR PORT [COUNT]       echo COUNT connections (default: forever)
//! transport_echo dial NET HOST PORT MESSAGE [SECS]  send MESSAGE, expect it back, print it
//! transport_echo dial NET HOST PORT bytes:N [SECS]  send N bytes, check the echo, print a rate
//! ```
//! Exit status: 0 on success, 1 on any error (printed on stderr).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cpu_all::transport::{dial, BoxStream, Listener, Net};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USAGE: &str =
    "usage: transport_echo listen NET ADDR PORT [COUNT] | dial NET HOST PORT MESSAGE|bytes:N [SECS]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("transport_echo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("transport_echo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> Result<(), String> {
    let arg = |i: usize| args.get(i).map(String::as_str).ok_or_else(|| USAGE.to_string());
    match arg(0)? {
        "listen" => {
            let net = Net::parse(arg(1)?, false).map_err(|e| e.to_string())?;
            let count: u64 = match args.get(4) {
                Some(c) => c.parse().map_err(|_| format!("bad COUNT {c:?}"))?,
                None => u64::MAX,
            };
            let listener = Listener::bind(net, arg(2)?, arg(3)?).await.map_err(|e| e.to_string())?;
            println!("listening on {}", listener.local_addr());
            // One task per connection: a peer that never closes must not block the others.
            let mut sessions = tokio::task::JoinSet::new();
            for _ in 0..count {
                let (s, peer) = listener.accept().await.map_err(|e| format!("accept: {e}"))?;
                println!("accepted {peer}");
                sessions.spawn(async move {
                    let (n, r) = echo(s).await;
                    match r {
                        Ok(()) => println!("echoed {n} bytes to {peer}"),
                        Err(e) => println!("echo to {peer} ended after {n} bytes: {e}"),
                    }
                });
            }
            while sessions.join_next().await.is_some() {}
            Ok(())
        }
        "dial" => {
            let net = Net::parse(arg(1)?, true).map_err(|e| e.to_string())?;
            let secs: u64 = match args.get(5) {
                Some(s) => s.parse().map_err(|_| format!("bad SECS {s:?}"))?,
                None => 30,
            };
            let message = arg(4)?;
            let payload: Vec<u8> = match message.strip_prefix("bytes:") {
                Some(n) => {
                    let n: usize = n.parse().map_err(|_| format!("bad byte count {n:?}"))?;
                    (0..n).map(|i| (i % 251) as u8).collect()
                }
                None => message.as_bytes().to_vec(),
            };
            let started = Instant::now();
            let s =
                dial(net, arg(2)?, arg(3)?, Duration::from_secs(secs)).await.map_err(|e| e.to_string())?;
            let connected = started.elapsed();
            let progress = Progress::default();
            let got = tokio::time::timeout(Duration::from_secs(secs), exchange(s, &payload, &progress))
                .await
                .map_err(|_| {
                    // Where it stopped: a stall in the sending or in the echo.
                    format!(
                        "no full echo within {secs} s: {} of {} bytes written, {} read back",
                        progress.written.get(),
                        payload.len(),
                        progress.read.get()
                    )
                })??;
            if got != payload {
                return Err(format!(
                    "echo differs: sent {} bytes, got {} bytes back",
                    payload.len(),
                    got.len()
                ));
            }
            if message.starts_with("bytes:") {
                let t = started.elapsed().as_secs_f64();
                println!(
                    "echoed {} bytes, connect {:.1} ms, total {:.1} ms, {:.2} MB/s each way",
                    got.len(),
                    connected.as_secs_f64() * 1e3,
                    t * 1e3,
                    got.len() as f64 / t / 1e6
                );
            } else {
                println!("{}", String::from_utf8_lossy(&got));
            }
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    }
}

/// Echoes until EOF; returns the byte count.
async fn echo(mut s: BoxStream) -> (u64, Result<(), String>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) => return (total, Ok(())),
            Ok(n) => n,
            Err(e) => return (total, Err(e.to_string())),
        };
        if let Err(e) = s.write_all(&buf[..n]).await {
            return (total, Err(e.to_string()));
        }
        total += n as u64;
    }
}

/// Bytes moved so far by [`exchange`], for the message when it does not finish.
#[derive(Default)]
struct Progress {
    written: std::cell::Cell<usize>,
    read: std::cell::Cell<usize>,
}

/// Writes `payload` while reading the same number of bytes back.
async fn exchange(s: BoxStream, payload: &[u8], progress: &Progress) -> Result<Vec<u8>, String> {
    let (mut rd, mut wr) = tokio::io::split(s);
    let writer = async {
        while progress.written.get() < payload.len() {
            match wr.write(&payload[progress.written.get()..]).await {
                Ok(0) => return Err("write: the peer takes no more".to_string()),
                Ok(n) => progress.written.set(progress.written.get() + n),
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        wr.flush().await.map_err(|e| format!("flush: {e}"))
    };
    let reader = async {
        let mut got = vec![0u8; payload.len()];
        while progress.read.get() < got.len() {
            match rd.read(&mut got[progress.read.get()..]).await {
                Ok(0) => return Err(format!("read echo: end of stream after {} bytes", progress.read.get())),
                Ok(n) => progress.read.set(progress.read.get() + n),
                Err(e) => return Err(format!("read echo: {e}")),
            }
        }
        Ok::<_, String>(got)
    };
    let (w, r) = tokio::join!(writer, reader);
    w?;
    r
}
