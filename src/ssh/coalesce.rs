//! The socket under russh's client session loop: reads through a buffer, and writes held
//! until the loop waits for input, so a burst of packets costs one system call each way and
//! one wake-up of the peer instead of one per packet.
//!
//! russh reads every packet with two small exact reads (length, then the rest) and writes and
//! flushes after every pass of its loop. A `cpu` session's env requests, or the replies a
//! server sends to them, were ~90 `recvfrom` calls in a control master per session, and the
//! requests left in several writes, each waking cpud. russh's loop polls its read on every pass
//! and whenever it has nothing else to do. A read that would block after a write lets the other
//! tasks run (the loop is woken again at once), so that what they are about to queue (the rest
//! of a session's requests, the EOF of an empty stdin) leaves in the same write. This repeats
//! while they keep adding: russh takes channel messages through a queue of 10, so a session's
//! ~40 env requests reach the socket over several passes of its loop (they left in four
//! writes, each waking cpud). The loop polls its read in random order with its queue, so a
//! pass may find nothing added yet while the queue is full again: what is held goes out at the
//! second read in a row that would block with nothing added (a full socket's writability
//! wakes the loop, which polls the read again). Shutdown sends the rest. The server's connection
//! stream (`ssh::server`'s Killable, which adds the key-exchange checks) wraps one built with
//! [`Coalesced::without_deferral`]: its replies go out at the first read that would block.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};

/// Read buffer: a burst of small packets in one read.
const READ_BUFFER: usize = 16 * 1024;
/// Held writes are sent once this much is waiting, even while input keeps arriving.
const WRITE_COALESCE: usize = 64 * 1024;
/// Passes of the loop a held write may wait for while the feeding tasks keep adding to it.
const MAX_DEFERRALS: u32 = 64;
/// Reads in a row that would block with nothing added before what is held is sent.
const IDLE_PASSES: u32 = 2;

/// A stream whose reads are buffered and whose writes wait for the next read that would block.
pub struct Coalesced<S> {
    inner: BufReader<S>,
    /// Written (and flushed, as russh sees it) but not yet on the socket.
    unsent: Vec<u8>,
    /// How much was held when a read last found nothing and the loop was woken to look again
    /// (None: not deferred since the last send).
    deferred_at: Option<usize>,
    /// Deferrals since the last send (bounded by [`MAX_DEFERRALS`]).
    deferrals: u32,
    /// Deferrals in a row that found nothing added.
    idle_deferrals: u32,
    /// Whether a read that would block lets the feeding tasks run and add to the write first
    /// (the client), or sends at once (the server).
    defers: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Coalesced<S> {
    pub fn new(stream: S) -> Coalesced<S> {
        Coalesced {
            inner: BufReader::with_capacity(READ_BUFFER, stream),
            unsent: Vec::new(),
            deferred_at: None,
            deferrals: 0,
            idle_deferrals: 0,
            defers: true,
        }
    }

    /// Like [`Coalesced::new`], but what is held goes out at the first read that would block.
    pub fn without_deferral(stream: S) -> Coalesced<S> {
        Coalesced { defers: false, ..Coalesced::new(stream) }
    }

    /// Writes out what is held; Pending (with the socket's writability registered) while some
    /// is left. For a wrapper whose read waits without reaching this stream.
    pub fn poll_send_unsent(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.unsent.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.unsent) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.unsent.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if read.is_pending() && !self.unsent.is_empty() {
            let held = self.unsent.len();
            self.idle_deferrals = if self.deferred_at == Some(held) { self.idle_deferrals + 1 } else { 0 };
            if self.defers && self.idle_deferrals < IDLE_PASSES && self.deferrals < MAX_DEFERRALS {
                // The tasks that feed the loop run first, and add to this write, for as long
                // as they keep adding.
                self.deferred_at = Some(held);
                self.deferrals += 1;
                cx.waker().wake_by_ref();
                return read;
            }
            // The loop waits for input and nothing more came: what it wrote goes out.
            self.deferred_at = None;
            self.deferrals = 0;
            self.idle_deferrals = 0;
            if let Poll::Ready(Err(e)) = self.poll_send_unsent(cx) {
                return Poll::Ready(Err(e));
            }
        }
        read
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.unsent.len() >= WRITE_COALESCE {
            std::task::ready!(self.poll_send_unsent(cx))?;
        }
        self.unsent.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    /// Leaves the bytes held (see [`Coalesced`]): russh flushes after every pass of its loop.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_send_unsent(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Whether `peer` has anything to read right now.
    fn readable(peer: &mut tokio::io::DuplexStream) -> Option<Vec<u8>> {
        let mut buf = [0u8; 256];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(peer).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) => Some(rb.filled().to_vec()),
            _ => None,
        }
    }

    /// Polls a read that finds nothing to read (as russh's loop does when it waits).
    fn read_would_block(s: &mut Coalesced<tokio::io::DuplexStream>) {
        let mut buf = [0u8; 8];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut rb = ReadBuf::new(&mut buf);
        assert!(Pin::new(s).poll_read(&mut cx, &mut rb).is_pending());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writes_wait_for_a_read_that_would_block() {
        let (ours, mut peer) = tokio::io::duplex(1 << 16);
        let mut s = Coalesced::new(ours);
        s.write_all(b"one").await.unwrap();
        s.flush().await.unwrap();
        s.write_all(b"two").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(readable(&mut peer), None, "nothing is sent before the loop waits for input");
        // The first read with nothing to read lets the other tasks add to the write.
        read_would_block(&mut s);
        assert_eq!(readable(&mut peer), None);
        s.write_all(b"three").await.unwrap();
        // They added: they run again.
        read_would_block(&mut s);
        assert_eq!(readable(&mut peer), None);
        // Nothing added since: once more (the loop may not have taken their queue yet).
        read_would_block(&mut s);
        assert_eq!(readable(&mut peer), None);
        // Nothing added twice in a row: the three writes go out in one.
        read_would_block(&mut s);
        assert_eq!(readable(&mut peer).as_deref(), Some(&b"onetwothree"[..]));
        // With nothing held, a read that would block does nothing more.
        read_would_block(&mut s);
        assert_eq!(readable(&mut peer), None);
    }

    /// A session's requests reach the socket over several passes of russh's loop (its queue
    /// holds 10), some of which add nothing: they leave in one write, once two reads in a row
    /// found nothing added.
    #[tokio::test(flavor = "current_thread")]
    async fn writes_wait_while_the_feeding_tasks_keep_adding() {
        let (ours, mut peer) = tokio::io::duplex(1 << 16);
        let mut s = Coalesced::new(ours);
        let mut want = Vec::new();
        for pass in 0..5u8 {
            let chunk = [b'a' + pass; 10];
            s.write_all(&chunk).await.unwrap();
            want.extend_from_slice(&chunk);
            read_would_block(&mut s);
            // A pass that finds nothing added yet (the loop polled its read first).
            read_would_block(&mut s);
            assert_eq!(readable(&mut peer), None, "pass {pass}: still adding, nothing sent");
        }
        read_would_block(&mut s);
        assert_eq!(readable(&mut peer), Some(want));
        // A writer that never stops adding is sent after MAX_DEFERRALS passes all the same.
        for pass in 0..=MAX_DEFERRALS {
            s.write_all(b"x").await.unwrap();
            read_would_block(&mut s);
            if pass < MAX_DEFERRALS {
                assert_eq!(readable(&mut peer), None, "pass {pass}");
            }
        }
        let mut sent = vec![0u8; MAX_DEFERRALS as usize + 1];
        peer.read_exact(&mut sent).await.unwrap();
        assert!(sent.iter().all(|b| *b == b'x'));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_deferral_the_first_read_that_would_block_sends() {
        let (ours, mut peer) = tokio::io::duplex(1 << 16);
        let mut s = Coalesced::without_deferral(ours);
        s.write_all(b"reply").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(readable(&mut peer), None, "nothing is sent before the loop waits for input");
        read_would_block(&mut s);
        assert_eq!(readable(&mut peer).as_deref(), Some(&b"reply"[..]));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reads_come_from_one_buffer_and_shutdown_sends_the_rest() {
        let (ours, mut peer) = tokio::io::duplex(1 << 16);
        let mut s = Coalesced::new(ours);
        peer.write_all(b"\0\0\0\x05hello\0\0\0\x02hi").await.unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(body, b"hello");
        s.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(body, b"hi");
        s.write_all(b"bye").await.unwrap();
        assert_eq!(readable(&mut peer), None);
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"bye");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_large_backlog_goes_out_without_a_read() {
        let (ours, mut peer) = tokio::io::duplex(1 << 20);
        let mut s = Coalesced::new(ours);
        let block = vec![7u8; WRITE_COALESCE];
        s.write_all(&block).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut got = vec![0u8; WRITE_COALESCE];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, block);
    }
}
