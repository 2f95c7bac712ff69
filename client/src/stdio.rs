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

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::pipe;

/// How much is moved per read of stdin and write of stdout. Through tokio's blocking
/// pool, `copy`'s 8 KiB pieces made the hand-offs cost more than the transfer.
pub(crate) const STDIO_BUFFER: usize = 1 << 20;

/// This process's stdin, buffered.
pub(crate) fn stdin() -> tokio::io::BufReader<Input> {
    let input = match std::io::stdin().as_fd().try_clone_to_owned().map(pipe::Receiver::from_owned_fd) {
        Ok(Ok(pipe)) => Input::Pipe(Some(pipe)),
        _ => Input::Std(tokio::io::stdin()),
    };
    tokio::io::BufReader::with_capacity(STDIO_BUFFER, input)
}

/// This process's stdout, buffered: `tokio::io::copy` flushes whenever its source has
/// nothing more to read at once, so output shows as it arrives.
pub(crate) fn stdout() -> tokio::io::BufWriter<Output> {
    let output = match std::io::stdout().as_fd().try_clone_to_owned().map(pipe::Sender::from_owned_fd) {
        Ok(Ok(pipe)) => Output::Pipe(Some(pipe)),
        _ => Output::Std(tokio::io::stdout()),
    };
    tokio::io::BufWriter::with_capacity(STDIO_BUFFER, output)
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
