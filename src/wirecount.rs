//! Counts the 9P requests that cross the client's back-channel, by message type, at the
//! transport: [`Counted`] wraps the forwarded stream and follows the 9P framing (`size[4]
//! type[1] ...`) of the bytes the remote kernel sends. It decodes nothing else and changes no
//! byte; the 9P server (`ninep`) does not know it is there. Its one use is the summary `cpu -d`
//! logs when the session ends, which `make bench` reads (round trips decide speed on a link).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Requests seen, by 9P message type, and the bytes they took.
#[derive(Debug)]
pub struct RequestCounts {
    by_type: [AtomicU64; 256],
    bytes: AtomicU64,
    reply_bytes: AtomicU64,
}

impl Default for RequestCounts {
    fn default() -> Self {
        RequestCounts {
            by_type: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes: AtomicU64::new(0),
            reply_bytes: AtomicU64::new(0),
        }
    }
}

/// The 9P2000.L request names, for the summary.
fn request_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        8 => "statfs",
        12 => "lopen",
        14 => "lcreate",
        16 => "symlink",
        18 => "mknod",
        20 => "rename",
        22 => "readlink",
        24 => "getattr",
        26 => "setattr",
        30 => "xattrwalk",
        32 => "xattrcreate",
        40 => "readdir",
        50 => "fsync",
        52 => "lock",
        54 => "getlock",
        70 => "link",
        72 => "mkdir",
        74 => "renameat",
        76 => "unlinkat",
        100 => "version",
        102 => "auth",
        104 => "attach",
        108 => "flush",
        110 => "walk",
        116 => "read",
        118 => "write",
        120 => "clunk",
        122 => "remove",
        _ => return None,
    })
}

impl RequestCounts {
    /// Every request of every type.
    pub fn total(&self) -> u64 {
        self.by_type.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Requests of one 9P message type (e.g. 116, Tread).
    pub fn of_type(&self, kind: u8) -> u64 {
        self.by_type[usize::from(kind)].load(Ordering::Relaxed)
    }

    /// `9p requests: N (B bytes, replies R bytes): walk 3, getattr 5, ...`, most frequent first.
    pub fn summary(&self) -> String {
        let mut kinds: Vec<(u64, u8)> =
            (0..=255u8).map(|k| (self.of_type(k), k)).filter(|(n, _)| *n > 0).collect();
        kinds.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let parts: Vec<String> = kinds
            .iter()
            .map(|(n, k)| match request_name(*k) {
                Some(name) => format!("{name} {n}"),
                None => format!("type{k} {n}"),
            })
            .collect();
        format!(
            "9p requests: {} ({} bytes, replies {} bytes): {}",
            self.total(),
            self.bytes.load(Ordering::Relaxed),
            self.reply_bytes.load(Ordering::Relaxed),
            parts.join(", ")
        )
    }
}

/// A stream whose inbound 9P messages are counted.
pub struct Counted<S> {
    inner: S,
    counts: std::sync::Arc<RequestCounts>,
    header: [u8; 5],
    header_len: usize,
    /// Bytes of the current message still to pass after its header.
    body_left: u64,
}

impl<S> Counted<S> {
    pub fn new(inner: S, counts: std::sync::Arc<RequestCounts>) -> Self {
        Counted { inner, counts, header: [0; 5], header_len: 0, body_left: 0 }
    }

    /// Follows the framing over bytes just read.
    fn feed(&mut self, mut bytes: &[u8]) {
        self.counts.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = bytes.len().min(usize::try_from(self.body_left).unwrap_or(usize::MAX));
                self.body_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = bytes.len().min(self.header.len() - self.header_len);
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == self.header.len() {
                let size =
                    u32::from_le_bytes([self.header[0], self.header[1], self.header[2], self.header[3]]);
                self.counts.by_type[usize::from(self.header[4])].fetch_add(1, Ordering::Relaxed);
                // A size below the header is a protocol error the server reports; keep counting.
                self.body_left = u64::from(size.saturating_sub(5));
                self.header_len = 0;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.feed(&buf.filled()[before..]);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = result {
            self.counts.reply_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            self.counts.reply_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn message(kind: u8, body: usize) -> Vec<u8> {
        let mut m = ((5 + body) as u32).to_le_bytes().to_vec();
        m.push(kind);
        m.extend(vec![0xABu8; body]);
        m
    }

    #[tokio::test(flavor = "current_thread")]
    async fn counts_messages_split_anywhere_and_passes_bytes_unchanged() {
        let mut wire = Vec::new();
        for (kind, body) in [(100u8, 14usize), (110, 17), (24, 10), (116, 20), (118, 70000), (110, 2)] {
            wire.extend(message(kind, body));
        }
        let (mut near, far) = tokio::io::duplex(4096);
        let counts = Arc::new(RequestCounts::default());
        let mut counted = Counted::new(far, counts.clone());
        let sent = wire.clone();
        let writer = tokio::spawn(async move {
            // Odd chunk sizes: headers and bodies split across reads.
            for chunk in sent.chunks(3) {
                near.write_all(chunk).await.unwrap();
            }
            near
        });
        let mut got = vec![0u8; wire.len()];
        counted.read_exact(&mut got).await.unwrap();
        let mut near = writer.await.unwrap();
        assert_eq!(got, wire);
        assert_eq!(counts.total(), 6);
        assert_eq!(counts.of_type(110), 2);
        assert_eq!(counts.of_type(118), 1);
        let (_rd, mut wr) = tokio::io::split(counted);
        let mut buffered = tokio::io::BufWriter::new(&mut wr);
        buffered.write_all(b"Rversion").await.unwrap();
        buffered.flush().await.unwrap();
        wr.write_all(b"Rwalk").await.unwrap();
        let mut reply = [0u8; 13];
        near.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"RversionRwalk");
        assert_eq!(
            counts.summary(),
            format!(
                "9p requests: 6 ({} bytes, replies 13 bytes): walk 2, getattr 1, version 1, read 1, write 1",
                wire.len()
            )
        );
    }
}
