//! The relay-wide budget of bytes held for receivers that do not take them. A splice
//! direction whose write toward its receiver has not completed for a grace period is
//! *stalled*; while stalled it holds at most its two flow-control windows (what the
//! relay accepted from the sender and what it queued toward the receiver), and it is
//! counted at that bound. When a new stall would push the total over the cap, the
//! oldest stalls are cut first, so a crowd of slow readers cannot make the relay hold
//! memory without bound.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use actix::Addr;

use crate::counters::{Counters, Reason};
use crate::pair::{SocketPairActor, Stalled};

/// Bytes held for stalled receivers, relay-wide.
pub struct HoldBudget {
    cap: u64,
    state: Mutex<HoldState>,
}

#[derive(Default)]
struct HoldState {
    held: u64,
    next: u64,
    /// Stalls by age (registration order): bytes and the pair to cut.
    stalls: BTreeMap<u64, (u64, Addr<SocketPairActor>)>,
}

/// A registered stall; dropping it (the write completed or the pair ended) releases it.
pub struct Hold {
    budget: Arc<HoldBudget>,
    id: u64,
}

impl HoldBudget {
    /// A budget of `cap` bytes.
    pub fn new(cap: u64) -> Self {
        Self { cap, state: Mutex::new(HoldState::default()) }
    }

    /// Bytes counted as held now.
    pub fn held(&self) -> u64 {
        self.state.lock().expect("hold budget lock").held
    }

    /// Registers a stall of `pair` holding up to `bytes`. Older stalls are cut (their
    /// pairs told [`Stalled`]) until the new one fits under the cap; a stall larger than
    /// the whole cap evicts everything older and is itself let through, so one socket
    /// always makes progress.
    pub fn stall(self: &Arc<Self>, bytes: u64, pair: Addr<SocketPairActor>, counters: &Counters) -> Hold {
        let mut state = self.state.lock().expect("hold budget lock");
        while state.held + bytes > self.cap {
            let Some((_, (old_bytes, old_pair))) = state.stalls.pop_first() else { break };
            state.held -= old_bytes;
            counters.add(Reason::HeldBytesCap);
            old_pair.do_send(Stalled { why: "the relay's cap on bytes held for stalled receivers was reached" });
        }
        let id = state.next;
        state.next += 1;
        state.held += bytes;
        state.stalls.insert(id, (bytes, pair));
        Hold { budget: self.clone(), id }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut state = self.budget.state.lock().expect("hold budget lock");
        if let Some((bytes, _)) = state.stalls.remove(&self.id) {
            state.held -= bytes;
        }
    }
}
