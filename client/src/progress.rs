//! The progress line of `overlan nc` (the CLI's, not the library's): when stdout goes to
//! a file and stderr is a terminal, a stream's bytes sent and received and the rate are
//! shown on one line of stderr, rewritten twice a second, as `curl` and `pv` do.

use std::io::{IsTerminal, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How often the line is rewritten.
const EVERY: Duration = Duration::from_millis(500);

/// A reader or writer that counts the bytes through it.
pub(crate) struct Counted<T> {
    inner: T,
    count: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    /// Counts into `count`.
    pub(crate) fn new(inner: T, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        self.count.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, data))?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The counters of one transfer and the task that shows them.
pub(crate) struct Progress {
    /// Bytes read from stdin.
    pub(crate) sent: Arc<AtomicU64>,
    /// Bytes written to stdout.
    pub(crate) received: Arc<AtomicU64>,
    started: Instant,
    shown: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Counters for a transfer; the line is shown only when stdout is not a terminal and
    /// stderr is (a terminal user would see the data itself; a script wants no noise).
    pub(crate) fn start() -> Self {
        let show = !std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        let mut progress =
            Self { sent: Arc::default(), received: Arc::default(), started: Instant::now(), shown: None };
        if show {
            let (sent, received, started) = (progress.sent.clone(), progress.received.clone(), progress.started);
            progress.shown = Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let line = line(sent.load(Ordering::Relaxed), received.load(Ordering::Relaxed), started.elapsed());
                    let _ = write!(std::io::stderr(), "\r{line}\x1b[K");
                }
            }));
        }
        progress
    }

    /// Stops the line, leaving its last state on a line of its own.
    pub(crate) fn finish(self) {
        if let Some(task) = self.shown {
            task.abort();
            let line =
                line(self.sent.load(Ordering::Relaxed), self.received.load(Ordering::Relaxed), self.started.elapsed());
            let _ = writeln!(std::io::stderr(), "\r{line}\x1b[K");
        }
    }
}

/// `sent 1.0 MiB, received 12.5 MiB in 3.2 s (3.9 MiB/s)`.
fn line(sent: u64, received: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = (sent + received) as f64 / secs;
    format!("sent {}, received {} in {secs:.1} s ({}/s)", size(sent as f64), size(received as f64), size(rate))
}

/// Bytes in binary units, one decimal.
fn size(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_reads_in_binary_units() {
        assert_eq!(line(0, 0, Duration::from_secs(1)), "sent 0 B, received 0 B in 1.0 s (0 B/s)");
        assert_eq!(
            line(1536, 10 * 1024 * 1024, Duration::from_secs(2)),
            "sent 1.5 KiB, received 10.0 MiB in 2.0 s (5.0 MiB/s)"
        );
    }

    #[tokio::test]
    async fn counted_counts_what_passes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let count = Arc::new(AtomicU64::new(0));
        let mut reader = Counted::new(&b"hello world"[..], count.clone());
        let mut out = Vec::new();
        reader.read_to_end(&mut out).await.unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 11);
        let written = Arc::new(AtomicU64::new(0));
        let mut writer = Counted::new(Vec::new(), written.clone());
        writer.write_all(&out).await.unwrap();
        assert_eq!(written.load(Ordering::Relaxed), 11);
    }
}
