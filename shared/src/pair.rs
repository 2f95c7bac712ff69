//! The lifecycle of one virtual stream (a socket pair) as plain state: offered → accepted
//! → spliced → ended, with its deadlines. Sans-IO: the relay's `SocketPairActor` feeds it
//! events with the time (`handle_*`), carries out the actions it returns (`poll_action`)
//! and wakes it at its next deadline (`poll_timeout`). It decides; it moves no bytes.
//!
//! Closing is TCP-like. When a party's session ends, only the direction toward it is cut
//! (nobody is left to read there); the direction from it goes on delivering what the
//! relay already accepted, until it ends or the drain deadline passes. A party that left
//! after attaching its stream, before the other side attached, is kept for the same
//! reason. Only an abort, a stalled receiver, a timeout or both parties gone end the
//! whole pair at once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::wire::{reset_code, ErrorCode};

/// One side of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The side that connected.
    Connector = 0,
    /// The side that listened.
    Listener = 1,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Connector => Side::Listener,
            Side::Listener => Side::Connector,
        }
    }
}

/// Where a pair is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for the listener's application to accept or deny.
    Offered,
    /// Accepted; waiting for both sides' streams.
    Accepted,
    /// Both streams attached; bytes flow.
    Spliced,
    /// Over; the shell stops.
    Ended,
}

/// How long each stage may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairTimeouts {
    /// For the listener's application to accept or deny.
    pub accept: Duration,
    /// For both sides to attach their streams once accepted.
    pub attach: Duration,
    /// For a socket to go on delivering after a party has gone.
    pub drain: Duration,
}

/// What the shell must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairAction {
    /// Tell the connecting side its connect succeeded.
    ConnectSucceeded,
    /// Tell the connecting side its connect failed.
    ConnectFailed {
        /// The wire code.
        code: ErrorCode,
        /// Why, for the error line ("connect ADDR: {why}").
        why: &'static str,
    },
    /// Both streams are attached: splice them.
    Splice,
    /// Cut the direction that writes toward `toward` (reset it, stop its source).
    Cancel {
        /// The side that direction writes to.
        toward: Side,
        /// The reset code.
        code: u32,
    },
    /// End the pair: reset every stream with `code`, tell the sessions still there
    /// (`notify`), then stop.
    Terminate {
        /// The reset code.
        code: u32,
        /// What the sessions still there are told.
        notify: ErrorCode,
    },
    /// Stop quietly (the splice ended, or a connect was answered with a refusal).
    Stop,
}

/// Which deadline runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Accept,
    Attach,
}

/// One socket pair's lifecycle.
#[derive(Debug)]
pub struct SocketPair {
    stage: Stage,
    timeouts: PairTimeouts,
    attached: [bool; 2],
    gone: [bool; 2],
    /// The connector is told at most once.
    connector_told: bool,
    deadline: Option<(Instant, Timer)>,
    /// The drain deadline, once a party has gone (kept apart: the attach deadline may
    /// run at the same time).
    drain_deadline: Option<Instant>,
    actions: VecDeque<PairAction>,
}

impl SocketPair {
    /// A pair just offered to the listener at `now`.
    pub fn new(now: Instant, timeouts: PairTimeouts) -> Self {
        Self {
            stage: Stage::Offered,
            timeouts,
            attached: [false; 2],
            gone: [false; 2],
            connector_told: false,
            deadline: Some((now + timeouts.accept, Timer::Accept)),
            drain_deadline: None,
            actions: VecDeque::new(),
        }
    }

    /// Where the pair is.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Whether `side`'s session has gone.
    pub fn is_gone(&self, side: Side) -> bool {
        self.gone[side as usize]
    }

    /// Whether `side` has attached its stream.
    pub fn is_attached(&self, side: Side) -> bool {
        self.attached[side as usize]
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<PairAction> {
        self.actions.pop_front()
    }

    /// The next deadline, when the shell must call [`SocketPair::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        let stage = self.deadline.map(|(at, _)| at);
        match (stage, self.drain_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn tell_connector(&mut self, action: PairAction) {
        if !self.connector_told && !self.gone[Side::Connector as usize] {
            self.connector_told = true;
            self.actions.push_back(action);
        }
    }

    fn terminate(&mut self, code: u32, notify: ErrorCode) {
        if self.stage == Stage::Ended {
            return;
        }
        if self.stage == Stage::Offered {
            self.tell_connector(PairAction::ConnectFailed { code: notify, why: notify.describe() });
        }
        self.stage = Stage::Ended;
        self.deadline = None;
        self.drain_deadline = None;
        self.actions.push_back(PairAction::Terminate { code, notify });
    }

    fn stop(&mut self) {
        self.stage = Stage::Ended;
        self.deadline = None;
        self.drain_deadline = None;
        self.actions.push_back(PairAction::Stop);
    }

    /// The listener's application answered: accept, or the code to refuse with.
    pub fn handle_answer(&mut self, now: Instant, answer: Result<(), ErrorCode>) {
        if self.stage != Stage::Offered {
            return;
        }
        match answer {
            Ok(()) => {
                self.stage = Stage::Accepted;
                self.deadline = Some((now + self.timeouts.attach, Timer::Attach));
                self.tell_connector(PairAction::ConnectSucceeded);
                self.maybe_splice();
            }
            Err(code) => {
                self.tell_connector(PairAction::ConnectFailed { code, why: code.describe() });
                self.stop();
            }
        }
    }

    /// `side` attached its stream. Returns false if it may not (not accepted yet is
    /// fine; already attached, gone or spliced is not): the shell rejects the stream.
    pub fn handle_attach(&mut self, side: Side) -> bool {
        let i = side as usize;
        if self.attached[i] || self.gone[i] || matches!(self.stage, Stage::Spliced | Stage::Ended) {
            return false;
        }
        self.attached[i] = true;
        self.maybe_splice();
        true
    }

    fn maybe_splice(&mut self) {
        if self.stage != Stage::Accepted || !self.attached.iter().all(|a| *a) {
            return;
        }
        self.stage = Stage::Spliced;
        self.deadline = None;
        self.actions.push_back(PairAction::Splice);
        // A party that left before the splice began: its direction drains, the one
        // toward it is cut at once.
        for side in [Side::Connector, Side::Listener] {
            if self.gone[side as usize] {
                self.actions.push_back(PairAction::Cancel { toward: side, code: reset_code::SESSION_LOST });
            }
        }
    }

    /// `side`'s session ended at `now` (for a client connected to its own listener,
    /// call it for both sides).
    pub fn handle_party_gone(&mut self, now: Instant, side: Side) {
        if self.gone[side as usize] || self.stage == Stage::Ended {
            return;
        }
        self.gone[side as usize] = true;
        let both_gone = self.gone.iter().all(|g| *g);
        match self.stage {
            Stage::Offered => {
                if side == Side::Listener {
                    self.tell_connector(PairAction::ConnectFailed {
                        code: ErrorCode::Unreachable,
                        why: "unreachable (the listener's session ended)",
                    });
                }
                self.terminate(reset_code::SESSION_LOST, ErrorCode::SessionLost);
            }
            Stage::Accepted => {
                // Kept only if what it sent may still be delivered: its stream is here.
                if both_gone || !self.attached[side as usize] {
                    self.terminate(reset_code::SESSION_LOST, ErrorCode::SessionLost);
                } else {
                    self.start_drain(now);
                }
            }
            Stage::Spliced => {
                if both_gone {
                    self.terminate(reset_code::SESSION_LOST, ErrorCode::SessionLost);
                } else {
                    self.actions.push_back(PairAction::Cancel { toward: side, code: reset_code::SESSION_LOST });
                    self.start_drain(now);
                }
            }
            Stage::Ended => {}
        }
    }

    fn start_drain(&mut self, now: Instant) {
        if self.drain_deadline.is_none() {
            self.drain_deadline = Some(now + self.timeouts.drain);
        }
    }

    /// A party closed the socket at once (both directions).
    pub fn handle_close(&mut self) {
        self.terminate(reset_code::ABORTED, ErrorCode::Closed);
    }

    /// A receiver took no data within the write timeout, or the relay's cap on held
    /// bytes chose this pair: cut it.
    pub fn handle_stalled(&mut self) {
        self.terminate(reset_code::RECEIVER_STALLED, ErrorCode::TimedOut);
    }

    /// Both directions of the splice ended.
    pub fn handle_splice_done(&mut self) {
        if self.stage != Stage::Ended {
            self.stop();
        }
    }

    /// Time passed; fires the deadlines due at `now`. Returns true if the drain
    /// deadline cut the pair (the shell counts it).
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        if self.drain_deadline.is_some_and(|at| at <= now) {
            self.terminate(reset_code::SESSION_LOST, ErrorCode::SessionLost);
            return true;
        }
        match self.deadline {
            Some((at, Timer::Accept)) if at <= now && self.stage == Stage::Offered => {
                self.terminate(reset_code::TIMED_OUT, ErrorCode::TimedOut)
            }
            Some((at, Timer::Attach)) if at <= now && self.stage == Stage::Accepted => {
                self.terminate(reset_code::TIMED_OUT, ErrorCode::TimedOut)
            }
            _ => {}
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: PairTimeouts = PairTimeouts {
        accept: Duration::from_secs(10),
        attach: Duration::from_secs(10),
        drain: Duration::from_secs(60),
    };

    fn drain(pair: &mut SocketPair) -> Vec<PairAction> {
        std::iter::from_fn(|| pair.poll_action()).collect()
    }

    fn spliced(now: Instant) -> SocketPair {
        let mut pair = SocketPair::new(now, T);
        pair.handle_answer(now, Ok(()));
        assert!(pair.handle_attach(Side::Connector));
        assert!(pair.handle_attach(Side::Listener));
        assert_eq!(drain(&mut pair), vec![PairAction::ConnectSucceeded, PairAction::Splice]);
        pair
    }

    #[test]
    fn accept_attach_splice_and_end() {
        let now = Instant::now();
        let mut pair = spliced(now);
        assert_eq!(pair.stage(), Stage::Spliced);
        assert_eq!(pair.poll_timeout(), None, "no deadline while bytes flow");
        assert!(!pair.handle_attach(Side::Connector), "a second stream is rejected");
        pair.handle_splice_done();
        assert_eq!(drain(&mut pair), vec![PairAction::Stop]);
        assert_eq!(pair.stage(), Stage::Ended);
    }

    #[test]
    fn a_stream_may_arrive_before_the_accept() {
        let now = Instant::now();
        let mut pair = SocketPair::new(now, T);
        assert!(pair.handle_attach(Side::Connector));
        pair.handle_answer(now, Ok(()));
        assert!(pair.handle_attach(Side::Listener));
        assert_eq!(drain(&mut pair), vec![PairAction::ConnectSucceeded, PairAction::Splice]);
    }

    #[test]
    fn deny_refuses_the_connector_once() {
        let now = Instant::now();
        let mut pair = SocketPair::new(now, T);
        pair.handle_answer(now, Err(ErrorCode::Denied));
        pair.handle_answer(now, Ok(()));
        assert_eq!(
            drain(&mut pair),
            vec![PairAction::ConnectFailed { code: ErrorCode::Denied, why: "denied by the peer" }, PairAction::Stop]
        );
    }

    #[test]
    fn deadlines_of_each_stage() {
        let now = Instant::now();
        let mut pair = SocketPair::new(now, T);
        assert_eq!(pair.poll_timeout(), Some(now + T.accept));
        assert!(!pair.handle_timeout(now + T.accept - Duration::from_millis(1)));
        assert!(drain(&mut pair).is_empty(), "not yet");
        pair.handle_timeout(now + T.accept);
        let actions = drain(&mut pair);
        assert_eq!(actions[0], PairAction::ConnectFailed { code: ErrorCode::TimedOut, why: "timed out" });
        assert_eq!(actions[1], PairAction::Terminate { code: reset_code::TIMED_OUT, notify: ErrorCode::TimedOut });

        let mut pair = SocketPair::new(now, T);
        let later = now + Duration::from_secs(3);
        pair.handle_answer(later, Ok(()));
        assert_eq!(pair.poll_timeout(), Some(later + T.attach), "the attach deadline replaces the accept one");
        pair.handle_attach(Side::Listener);
        pair.handle_timeout(later + T.attach);
        assert_eq!(
            drain(&mut pair),
            vec![
                PairAction::ConnectSucceeded,
                PairAction::Terminate { code: reset_code::TIMED_OUT, notify: ErrorCode::TimedOut }
            ]
        );
    }

    #[test]
    fn a_sender_that_leaves_drains_and_the_direction_toward_it_is_cut() {
        let now = Instant::now();
        let mut pair = spliced(now);
        pair.handle_party_gone(now, Side::Connector);
        assert_eq!(
            drain(&mut pair),
            vec![PairAction::Cancel { toward: Side::Connector, code: reset_code::SESSION_LOST }]
        );
        assert_eq!(pair.poll_timeout(), Some(now + T.drain));
        // Delivered in time: the splice ends by itself.
        pair.handle_splice_done();
        assert_eq!(drain(&mut pair), vec![PairAction::Stop]);
        // Or the drain deadline cuts it.
        let mut pair = spliced(now);
        pair.handle_party_gone(now, Side::Listener);
        drain(&mut pair);
        assert!(pair.handle_timeout(now + T.drain));
        assert_eq!(
            drain(&mut pair),
            vec![PairAction::Terminate { code: reset_code::SESSION_LOST, notify: ErrorCode::SessionLost }]
        );
    }

    #[test]
    fn a_party_that_left_after_attaching_is_kept_until_the_other_attaches() {
        let now = Instant::now();
        let mut pair = SocketPair::new(now, T);
        pair.handle_answer(now, Ok(()));
        pair.handle_attach(Side::Connector);
        pair.handle_party_gone(now, Side::Connector);
        assert_eq!(drain(&mut pair), vec![PairAction::ConnectSucceeded], "kept");
        assert!(pair.handle_attach(Side::Listener));
        assert_eq!(
            drain(&mut pair),
            vec![PairAction::Splice, PairAction::Cancel { toward: Side::Connector, code: reset_code::SESSION_LOST }]
        );
        // One that left before attaching ends the pair.
        let mut pair = SocketPair::new(now, T);
        pair.handle_answer(now, Ok(()));
        pair.handle_attach(Side::Connector);
        pair.handle_party_gone(now, Side::Listener);
        assert_eq!(
            drain(&mut pair)[1],
            PairAction::Terminate { code: reset_code::SESSION_LOST, notify: ErrorCode::SessionLost }
        );
    }

    #[test]
    fn a_listener_lost_before_answering_makes_the_connect_unreachable() {
        let now = Instant::now();
        let mut pair = SocketPair::new(now, T);
        pair.handle_party_gone(now, Side::Listener);
        let actions = drain(&mut pair);
        assert_eq!(
            actions,
            vec![
                PairAction::ConnectFailed {
                    code: ErrorCode::Unreachable,
                    why: "unreachable (the listener's session ended)"
                },
                PairAction::Terminate { code: reset_code::SESSION_LOST, notify: ErrorCode::SessionLost },
            ]
        );
        // A connector that left is not told anything.
        let mut pair = SocketPair::new(now, T);
        pair.handle_party_gone(now, Side::Connector);
        assert_eq!(
            drain(&mut pair),
            vec![PairAction::Terminate { code: reset_code::SESSION_LOST, notify: ErrorCode::SessionLost }]
        );
        assert!(pair.is_gone(Side::Connector) && !pair.is_gone(Side::Listener));
    }

    #[test]
    fn close_and_stall_end_everything_once() {
        let now = Instant::now();
        let mut pair = spliced(now);
        pair.handle_stalled();
        pair.handle_close();
        pair.handle_party_gone(now, Side::Connector);
        pair.handle_splice_done();
        assert_eq!(
            drain(&mut pair),
            vec![PairAction::Terminate { code: reset_code::RECEIVER_STALLED, notify: ErrorCode::TimedOut }]
        );
        let mut pair = SocketPair::new(now, T);
        pair.handle_close();
        let actions = drain(&mut pair);
        assert_eq!(actions[0], PairAction::ConnectFailed { code: ErrorCode::Closed, why: "closed by the peer" });
        assert_eq!(actions[1], PairAction::Terminate { code: reset_code::ABORTED, notify: ErrorCode::Closed });
    }

    #[test]
    fn both_parties_gone_ends_at_once() {
        let now = Instant::now();
        let mut pair = spliced(now);
        pair.handle_party_gone(now, Side::Connector);
        pair.handle_party_gone(now, Side::Listener);
        let actions = drain(&mut pair);
        assert_eq!(
            actions.last(),
            Some(&PairAction::Terminate { code: reset_code::SESSION_LOST, notify: ErrorCode::SessionLost })
        );
    }
}
