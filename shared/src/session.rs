//! A relay session's policy as a sans-IO machine: what one client may hold (listeners,
//! bound ports, sockets, connects and offers waiting for an answer), which ports it
//! holds, how many QUIC streams it needs, and its allowances (token buckets for control
//! messages, datagrams and broadcasts, with time passed in as `now`). The relay's
//! session actor feeds it requests and answers and carries out its decisions; routing
//! (is the target reachable, who listens) stays with the router.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::ports::PortSet;
use crate::wire::control::SocketId;

/// What one session may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Stream sockets, established and waiting.
    pub max_sockets: u32,
    /// Connects waiting for an answer.
    pub max_pending_connects: u32,
    /// Offers waiting for the application's answer.
    pub max_pending_offers: u32,
    /// Stream listeners.
    pub max_listeners: u32,
    /// Bound datagram ports.
    pub max_bound_ports: u32,
}

/// Why the policy refuses a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// As many listeners as allowed.
    ListenerLimit(u32),
    /// As many bound ports as allowed.
    PortLimit(u32),
    /// As many connects waiting as allowed.
    PendingConnectLimit(u32),
    /// As many sockets as allowed.
    SocketLimit(u32),
    /// As many offers waiting as allowed.
    PendingOfferLimit(u32),
    /// The port is taken.
    AddrInUse,
    /// Every ephemeral port is taken.
    NoEphemeralPort,
    /// Nothing listens on the port offered to.
    NotListening,
}

/// A socket the session takes part in (as connector, listener, or both when a client
/// connects to its own listener).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Membership {
    /// The ephemeral stream port held as the connecting side.
    local_port: Option<u16>,
    /// Waiting for the connect's answer.
    connecting: bool,
    /// Waiting for the application to accept or deny.
    offered: bool,
    /// QUIC streams the client opens for it: one per side it is on.
    streams: u32,
}

/// One session's holdings and caps.
#[derive(Debug)]
pub struct SessionPolicy {
    limits: SessionLimits,
    listeners: HashSet<u16>,
    datagram_ports: PortSet,
    stream_ports: PortSet,
    sockets: HashMap<SocketId, Membership>,
    pending_connects: u32,
    pending_offers: u32,
    /// Streams the client may need (sum of `Membership::streams`).
    stream_demand: u32,
    /// QUIC stream limit granted so far.
    stream_limit: u32,
    /// A new limit to grant, if it grew since last polled.
    grant: Option<u32>,
    initial_streams: u32,
}

impl SessionPolicy {
    /// A session with nothing, allowed `limits`, granted `initial_streams` QUIC streams.
    pub fn new(limits: SessionLimits, initial_streams: u32) -> Self {
        Self {
            limits,
            listeners: HashSet::new(),
            datagram_ports: PortSet::default(),
            stream_ports: PortSet::default(),
            sockets: HashMap::new(),
            pending_connects: 0,
            pending_offers: 0,
            stream_demand: 0,
            stream_limit: initial_streams,
            grant: None,
            initial_streams,
        }
    }

    /// A listener on `port` (0: ephemeral). Returns the port.
    pub fn handle_listen(&mut self, port: u16) -> Result<u16, Refusal> {
        if self.listeners.len() >= self.limits.max_listeners as usize {
            return Err(Refusal::ListenerLimit(self.limits.max_listeners));
        }
        let port = self.stream_ports.claim(port).map_err(|_| Refusal::AddrInUse)?;
        self.listeners.insert(port);
        Ok(port)
    }

    /// The listener on `port` is closed. Returns whether there was one.
    pub fn handle_unlisten(&mut self, port: u16) -> bool {
        let had = self.listeners.remove(&port);
        if had {
            self.stream_ports.release(port);
        }
        had
    }

    /// Whether a listener is on `port`.
    pub fn is_listening(&self, port: u16) -> bool {
        self.listeners.contains(&port)
    }

    /// A datagram port `port` (0: ephemeral). Returns the port.
    pub fn handle_bind(&mut self, port: u16) -> Result<u16, Refusal> {
        if self.datagram_ports.len() >= self.limits.max_bound_ports as usize {
            return Err(Refusal::PortLimit(self.limits.max_bound_ports));
        }
        self.datagram_ports.claim(port).map_err(|_| Refusal::AddrInUse)
    }

    /// The datagram port is released. Returns whether it was bound.
    pub fn handle_unbind(&mut self, port: u16) -> bool {
        self.datagram_ports.release(port)
    }

    /// Whether a connect may start now (before the target is looked up).
    pub fn admit_connect(&self) -> Result<(), Refusal> {
        if self.pending_connects >= self.limits.max_pending_connects {
            return Err(Refusal::PendingConnectLimit(self.limits.max_pending_connects));
        }
        if self.sockets.len() >= self.limits.max_sockets as usize {
            return Err(Refusal::SocketLimit(self.limits.max_sockets));
        }
        Ok(())
    }

    /// A connect starts as `socket`: it holds an ephemeral port (returned) and waits
    /// for its answer.
    pub fn handle_connect(&mut self, socket: SocketId) -> Result<u16, Refusal> {
        self.admit_connect()?;
        let port = self.stream_ports.claim(0).map_err(|_| Refusal::NoEphemeralPort)?;
        self.pending_connects += 1;
        self.add(socket, Membership { local_port: Some(port), connecting: true, offered: false, streams: 1 });
        Ok(port)
    }

    /// `socket`'s connect was answered (either way).
    pub fn handle_connect_answered(&mut self, socket: SocketId) {
        if let Some(m) = self.sockets.get_mut(&socket) {
            if std::mem::take(&mut m.connecting) {
                self.pending_connects -= 1;
            }
        }
    }

    /// A connection to this session's listener on `port` is offered as `socket`.
    pub fn handle_offer(&mut self, socket: SocketId, port: u16) -> Result<(), Refusal> {
        if !self.listeners.contains(&port) {
            return Err(Refusal::NotListening);
        }
        if self.pending_offers >= self.limits.max_pending_offers {
            return Err(Refusal::PendingOfferLimit(self.limits.max_pending_offers));
        }
        if self.sockets.len() >= self.limits.max_sockets as usize && !self.sockets.contains_key(&socket) {
            return Err(Refusal::SocketLimit(self.limits.max_sockets));
        }
        self.pending_offers += 1;
        match self.sockets.get_mut(&socket) {
            // A connect to this session's own listener: one membership on both sides.
            Some(m) => {
                m.offered = true;
                m.streams += 1;
                self.stream_demand += 1;
                self.grow_stream_limit();
            }
            None => self.add(socket, Membership { local_port: None, connecting: false, offered: true, streams: 1 }),
        }
        Ok(())
    }

    /// The application answered the offer of `socket`.
    pub fn handle_offer_answered(&mut self, socket: SocketId) {
        if let Some(m) = self.sockets.get_mut(&socket) {
            if std::mem::take(&mut m.offered) {
                self.pending_offers -= 1;
            }
        }
    }

    /// `socket` ended: everything it held is released. Returns whether it was one.
    pub fn handle_socket_ended(&mut self, socket: SocketId) -> bool {
        let Some(m) = self.sockets.remove(&socket) else { return false };
        if let Some(port) = m.local_port {
            self.stream_ports.release(port);
        }
        self.stream_demand -= m.streams;
        self.pending_connects -= u32::from(m.connecting);
        self.pending_offers -= u32::from(m.offered);
        true
    }

    /// Whether the session takes part in `socket`.
    pub fn has_socket(&self, socket: SocketId) -> bool {
        self.sockets.contains_key(&socket)
    }

    /// A new QUIC stream limit to grant the client, if its sockets need more streams.
    pub fn poll_stream_limit(&mut self) -> Option<u32> {
        self.grant.take()
    }

    /// The session ends: its listeners, bound ports and sockets, to release.
    pub fn drain(&mut self) -> (Vec<u16>, Vec<u16>, Vec<SocketId>) {
        let listeners = self.listeners.drain().collect();
        let ports = self.datagram_ports.drain().collect();
        let sockets = self.sockets.drain().map(|(s, _)| s).collect();
        (listeners, ports, sockets)
    }

    fn add(&mut self, socket: SocketId, membership: Membership) {
        self.stream_demand += membership.streams;
        self.sockets.insert(socket, membership);
        self.grow_stream_limit();
    }

    /// The stream limit doubles while sockets approach it: each socket needs one stream
    /// per side this session is on, plus the control stream; quinn keeps bookkeeping for
    /// every stream it allows, so idle sessions start small.
    fn grow_stream_limit(&mut self) {
        let max = self.limits.max_sockets * 2 + 1;
        let wanted = self.stream_demand + self.initial_streams / 2;
        if wanted > self.stream_limit && self.stream_limit < max {
            self.stream_limit = (self.stream_limit * 2).clamp(wanted, max);
            self.grant = Some(self.stream_limit);
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up. Time comes in as
/// `now`, so it is tested without a clock.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let (rate, burst) = (f64::from(rate.max(1)), f64::from(burst.max(1)));
        Self { rate, burst, tokens: burst, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }

    /// Takes a token if there is one.
    pub fn handle_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until a token is there (zero: now).
    pub fn poll_wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SessionLimits = SessionLimits {
        max_sockets: 3,
        max_pending_connects: 2,
        max_pending_offers: 2,
        max_listeners: 2,
        max_bound_ports: 2,
    };

    #[test]
    fn listeners_and_ports_are_capped_and_claimed_once() {
        let mut p = SessionPolicy::new(LIMITS, 4);
        assert_eq!(p.handle_listen(80), Ok(80));
        assert_eq!(p.handle_listen(80), Err(Refusal::AddrInUse));
        assert!(p.handle_listen(0).unwrap() >= 49152);
        assert_eq!(p.handle_listen(81), Err(Refusal::ListenerLimit(2)));
        assert!(p.handle_unlisten(80));
        assert!(!p.handle_unlisten(80));
        assert_eq!(p.handle_listen(81), Ok(81));
        // Datagram ports are another space.
        assert_eq!(p.handle_bind(80), Ok(80));
        assert_eq!(p.handle_bind(80), Err(Refusal::AddrInUse));
        p.handle_bind(0).unwrap();
        assert_eq!(p.handle_bind(5), Err(Refusal::PortLimit(2)));
    }

    #[test]
    fn pending_connects_and_sockets_are_capped_and_released() {
        let mut p = SessionPolicy::new(LIMITS, 4);
        let a = p.handle_connect(1).unwrap();
        let b = p.handle_connect(2).unwrap();
        assert_ne!(a, b);
        assert_eq!(p.admit_connect(), Err(Refusal::PendingConnectLimit(2)));
        p.handle_connect_answered(1);
        p.handle_connect_answered(1); // twice changes nothing
        p.handle_connect(3).unwrap();
        p.handle_connect_answered(2);
        assert_eq!(p.admit_connect(), Err(Refusal::SocketLimit(3)));
        assert!(p.handle_socket_ended(1));
        assert!(!p.handle_socket_ended(1));
        assert!(p.admit_connect().is_ok());
        // Ended sockets give their ephemeral port back.
        let (_, _, sockets) = p.drain();
        assert_eq!(sockets.len(), 2);
    }

    #[test]
    fn offers_need_a_listener_and_are_capped() {
        let mut p = SessionPolicy::new(LIMITS, 4);
        assert_eq!(p.handle_offer(9, 80), Err(Refusal::NotListening));
        p.handle_listen(80).unwrap();
        p.handle_offer(9, 80).unwrap();
        p.handle_offer(10, 80).unwrap();
        assert_eq!(p.handle_offer(11, 80), Err(Refusal::PendingOfferLimit(2)));
        p.handle_offer_answered(9);
        p.handle_offer(11, 80).unwrap();
        p.handle_offer_answered(10);
        p.handle_offer_answered(11);
        assert_eq!(p.handle_offer(12, 80), Err(Refusal::SocketLimit(3)));
        // A connect to its own listener is one socket on both sides.
        p.handle_socket_ended(9);
        p.handle_socket_ended(10);
        p.handle_connect(20).unwrap();
        p.handle_offer(20, 80).unwrap();
        assert!(p.has_socket(20));
        p.handle_socket_ended(20);
        assert!(!p.has_socket(20));
    }

    #[test]
    fn the_stream_limit_grows_with_the_sockets_and_stops_at_the_cap() {
        let limits = SessionLimits { max_sockets: 100, max_pending_connects: 200, ..LIMITS };
        let mut p = SessionPolicy::new(limits, 4);
        assert_eq!(p.poll_stream_limit(), None);
        let mut granted = Vec::new();
        for socket in 0..100 {
            p.handle_connect(socket).unwrap();
            p.handle_connect_answered(socket);
            granted.extend(p.poll_stream_limit());
        }
        assert!(granted.windows(2).all(|w| w[0] < w[1]), "{granted:?}");
        assert!(*granted.last().unwrap() >= 100 + 2 && *granted.last().unwrap() <= 201, "{granted:?}");
        assert!(granted.len() < 10, "doubling, not one step per socket: {granted:?}");
    }

    #[test]
    fn a_token_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        assert!((0..3).all(|_| b.handle_take(t0)));
        assert!(!b.handle_take(t0));
        assert_eq!(b.poll_wait(t0), Duration::from_millis(100));
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.handle_take(t1));
        assert!(!b.handle_take(t1));
        // Saved up to the burst, no more.
        let t2 = t1 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.handle_take(t2)));
        assert!(!b.handle_take(t2));
        // Time going backwards takes nothing away and gives nothing.
        assert!(!b.handle_take(t0));
    }
}
