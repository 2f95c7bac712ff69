//! `nc`'s stdin and stdout, read and written without a thread hand-off when they are
//! pipes.
//!
//! tokio's `stdin()`/`stdout()` run every read and write on its blocking pool, a
//! hand-off to another thread and back per call. When stdin or stdout is a pipe (the
//! common `producer | overlan nc … | consumer`), it is driven by the reactor instead,
//! like a socket; a terminal or a regular file keeps tokio's way. The pipe's file
//! description is put back into blocking mode when the command is done with it, so a
//! process that shares the pipe after `nc` (a shell's next command reading the same
//! stdin) finds it as it was.

use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::unix::pipe;

/// How much is moved per read of stdin and write of stdout. Through tokio's blocking
/// pool, `copy`'s 8 KiB pieces made the hand-offs cost more than the transfer.
pub(crate) const STDIO_BUFFER: usize = 1 << 20;

/// This process's stdin, buffered.
pub(crate) fn stdin() -> tokio::io::BufReader<Input> {
    tokio::io::BufReader::with_capacity(STDIO_BUFFER, Input::open())
}

/// This process's stdout for a writer of whole chunks ([`write_chunks`]): a pipe as it
/// is, since each write passes many chunks at once (`writev`) with no copy; anything
/// else behind a buffer, since each write goes through tokio's blocking pool (flush it
/// after each batch, or a terminal shows nothing until the buffer fills).
pub(crate) fn stdout_for_chunks() -> Pin<Box<dyn AsyncWrite + Send>> {
    match Output::open() {
        pipe @ Output::Pipe(_) => Box::pin(pipe),
        std => Box::pin(tokio::io::BufWriter::with_capacity(STDIO_BUFFER, std)),
    }
}

/// Reads stdin into `buf`'s spare room (made [`STDIO_BUFFER`] when it runs low) and
/// returns what was read as one chunk that owns its bytes, or `None` at the end:
/// nothing is copied on the way to [`crate::VirtualWriteHalf::write_chunk`].
pub(crate) async fn read_chunk(input: &mut (impl AsyncRead + Unpin), buf: &mut BytesMut) -> io::Result<Option<Bytes>> {
    if buf.capacity() < STDIO_BUFFER / 8 {
        // The last chunks still hold the old allocation; this one is new.
        *buf = BytesMut::with_capacity(STDIO_BUFFER);
    }
    match input.read_buf(buf).await? {
        0 => Ok(None),
        _ => Ok(Some(buf.split().freeze())),
    }
}

/// Writes every chunk whole to `out`, as many at once as a vectored write takes.
pub(crate) async fn write_chunks(out: &mut (impl AsyncWrite + Unpin + ?Sized), chunks: &mut [Bytes]) -> io::Result<()> {
    const AT_ONCE: usize = 64;
    let mut first = 0;
    loop {
        while first < chunks.len() && chunks[first].is_empty() {
            first += 1;
        }
        if first == chunks.len() {
            return Ok(());
        }
        let mut slices = [io::IoSlice::new(&[]); AT_ONCE];
        let pending = &chunks[first..chunks.len().min(first + AT_ONCE)];
        for (slice, chunk) in slices.iter_mut().zip(pending) {
            *slice = io::IoSlice::new(chunk);
        }
        let mut written = out.write_vectored(&slices[..pending.len()]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let chunk = &mut chunks[first];
            let n = written.min(chunk.len());
            chunk.advance(n);
            written -= n;
            if chunk.is_empty() {
                first += 1;
            }
        }
    }
}

/// Stdin: a pipe driven by the reactor, or tokio's stdin.
#[derive(Debug)]
pub(crate) enum Input {
    /// Taken only on drop.
    Pipe(Option<pipe::Receiver>),
    Std(tokio::io::Stdin),
}

/// Stdout: a pipe driven by the reactor, or tokio's stdout.
#[derive(Debug)]
pub(crate) enum Output {
    /// Taken only on drop.
    Pipe(Option<pipe::Sender>),
    Std(tokio::io::Stdout),
}

impl Input {
    pub(crate) fn open() -> Self {
        match std::io::stdin().as_fd().try_clone_to_owned().map(pipe::Receiver::from_owned_fd) {
            Ok(Ok(pipe)) => Input::Pipe(Some(pipe)),
            _ => Input::Std(tokio::io::stdin()),
        }
    }
}

impl Output {
    pub(crate) fn open() -> Self {
        match std::io::stdout().as_fd().try_clone_to_owned().map(pipe::Sender::from_owned_fd) {
            Ok(Ok(pipe)) => Output::Pipe(Some(pipe)),
            _ => Output::Std(tokio::io::stdout()),
        }
    }
}

impl AsyncRead for Input {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Input::Pipe(pipe) => Pin::new(pipe.as_mut().expect("taken only on drop")).poll_read(cx, buf),
            Input::Std(std) => Pin::new(std).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Output {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Output::Pipe(pipe) => Pin::new(pipe.as_mut().expect("taken only on drop")).poll_write(cx, buf),
            Output::Std(std) => Pin::new(std).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Output::Pipe(pipe) => Pin::new(pipe.as_mut().expect("taken only on drop")).poll_write_vectored(cx, bufs),
            Output::Std(std) => Pin::new(std).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Output::Pipe(pipe) => pipe.as_ref().is_some_and(|p| p.is_write_vectored()),
            Output::Std(std) => std.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Output::Pipe(pipe) => Pin::new(pipe.as_mut().expect("taken only on drop")).poll_flush(cx),
            Output::Std(std) => Pin::new(std).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Output::Pipe(pipe) => Pin::new(pipe.as_mut().expect("taken only on drop")).poll_shutdown(cx),
            Output::Std(std) => Pin::new(std).poll_shutdown(cx),
        }
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        if let Input::Pipe(pipe) = self {
            // Back to blocking mode; dropping the returned descriptor closes only our
            // duplicate, fd 0 stays open.
            let _ = pipe.take().map(pipe::Receiver::into_blocking_fd);
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Output::Pipe(pipe) = self {
            let _ = pipe.take().map(pipe::Sender::into_blocking_fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes at most 7 bytes per write, from the first two slices only, and says it
    /// would block every other call: every partial-write path of `write_chunks`.
    #[derive(Default)]
    struct Stingy {
        got: Vec<u8>,
        calls: usize,
    }

    impl AsyncWrite for Stingy {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.calls += 1;
            if this.calls.is_multiple_of(2) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let mut room = 7;
            for buf in bufs.iter().take(2) {
                let n = buf.len().min(room);
                this.got.extend_from_slice(&buf[..n]);
                room -= n;
                if n < buf.len() {
                    break;
                }
            }
            Poll::Ready(Ok(7 - room))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn chunks_are_written_whole_and_in_order_through_partial_writes() {
        // Empty pieces among them (every 13th), and at the end.
        let pieces: Vec<Vec<u8>> = (0..=104u8).map(|i| vec![i; usize::from(i % 13)]).collect();
        let mut chunks: Vec<Bytes> = pieces.iter().cloned().map(Bytes::from).collect();
        let mut out = Stingy::default();
        write_chunks(&mut out, &mut chunks).await.unwrap();
        assert_eq!(out.got, pieces.concat());
    }

    /// A writer with no room left: every write takes nothing.
    struct Full;

    impl AsyncWrite for Full {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(0))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_writer_that_takes_nothing_is_an_error_not_a_hang() {
        let mut chunks = vec![Bytes::from_static(b"data")];
        let err = write_chunks(&mut Full, &mut chunks).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }

    #[tokio::test]
    async fn stdin_chunks_own_their_bytes_and_end_at_eof() {
        let data: Vec<u8> = (0..3 * STDIO_BUFFER as u32).map(|i| (i % 251) as u8).collect();
        let mut input = &data[..];
        let mut buf = BytesMut::new();
        let mut chunks = Vec::new();
        while let Some(chunk) = read_chunk(&mut input, &mut buf).await.unwrap() {
            assert!(!chunk.is_empty());
            chunks.push(chunk);
        }
        // Earlier chunks are untouched by later reads.
        assert_eq!(chunks.concat(), data);
    }
}
