//! The queue of encoded control frames from a session actor to the task that writes
//! them to the client's control stream. A bounded queue: a client that stops reading its
//! control stream fills it and is cut off. Unlike a tokio channel it allocates nothing
//! until a frame is queued, which matters at tens of thousands of idle sessions.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

/// Frames queued toward one client before it counts as stuck.
pub const CONTROL_QUEUE: usize = 4096;

struct Shared {
    frames: Mutex<VecDeque<Bytes>>,
    notify: Notify,
    closed: AtomicBool,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The client is not reading; the queue is full.
    Full,
    /// The writer ended (the stream or connection is gone).
    Closed,
}

/// The actor's end of the queue; dropping it finishes the stream once drained.
pub struct ControlQueue {
    shared: Arc<Shared>,
}

impl ControlQueue {
    /// Starts the writer task for `send`.
    pub fn start(send: quinn::SendStream) -> Self {
        let shared = Arc::new(Shared {
            frames: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(run_writer(shared.clone(), send));
        Self { shared }
    }

    /// Queues one encoded frame.
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        {
            let mut frames = self.shared.frames.lock().expect("control queue lock");
            if frames.len() >= CONTROL_QUEUE {
                return Err(PushError::Full);
            }
            frames.push_back(frame);
        }
        self.shared.notify.notify_one();
        Ok(())
    }
}

impl Drop for ControlQueue {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.notify.notify_one();
    }
}

/// Writes what is queued, a burst at a time; finishes the stream when the actor is gone.
async fn run_writer(shared: Arc<Shared>, mut send: quinn::SendStream) {
    loop {
        let mut batch: Vec<Bytes> = shared.frames.lock().expect("control queue lock").drain(..).collect();
        if batch.is_empty() {
            if shared.closed.load(Ordering::Acquire) {
                let _ = send.finish();
                return;
            }
            // `notify_one` stores a permit, so a push between the check and here is not lost.
            shared.notify.notified().await;
            continue;
        }
        if send.write_all_chunks(&mut batch).await.is_err() {
            shared.closed.store(true, Ordering::Release);
            return;
        }
    }
}
