//! Counted reasons: every time the relay refuses, drops or cuts something to protect
//! other members, it counts why. The counts are logged when they change and read by
//! tests (and later by the metrics endpoint).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! reasons {
    ($($variant:ident => $name:literal: $doc:literal,)*) => {
        /// Why the relay refused, dropped or cut something.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $(#[doc = $doc] $variant,)*
        }

        impl Reason {
            /// Every reason, in counter order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The counter's name in logs and metrics.
            pub fn name(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)*
                }
            }
        }
    };
}

reasons! {
    SocketLimit => "socket_limit": "A connect or offer over a session's socket cap was refused.",
    PendingConnectLimit => "pending_connect_limit": "A connect over a session's cap on unanswered connects was refused.",
    PendingOfferLimit => "pending_offer_limit": "An offer over a listener's cap on unanswered offers was refused.",
    ListenerLimit => "listener_limit": "A listen over a session's listener cap was refused.",
    PortLimit => "port_limit": "A datagram bind over a session's bound-port cap was refused.",
    DatagramRate => "datagram_rate": "A unicast datagram over the session's rate was dropped.",
    BroadcastRate => "broadcast_rate": "A broadcast over the session's rate was dropped.",
    ControlThrottled => "control_throttled": "A control message was held back by the session's control rate.",
    ReceiverStalled => "receiver_stalled": "A socket whose receiver took no data within the write timeout was cut.",
    HeldBytesCap => "held_bytes_cap": "A stalled socket was cut because the relay-wide cap on held bytes was reached.",
    DrainTimeout => "drain_timeout": "A socket still draining after its sender left was cut at the drain deadline.",
    RouteRejected => "route_rejected": "A peer's route announcement failed route-origin validation and was dropped.",
    TunPacketDropped => "tun_packet_dropped": "An IPv4 packet from a TUN session was malformed, too large, not from its VIP, a broadcast, or had no TUN session to go to.",
    LinkDatagramDropped => "link_datagram_dropped": "A datagram from a peer link was malformed, too large, had a source not announced on that link, or a broadcast number not its source's node's.",
    PeerRefused => "peer_refused": "A peer link was refused (certificate not from the cluster CA, wrong name, bad hello).",
    PeerForgedSource => "peer_forged_source": "A peer connected from a source VIP that is a client of this node, or that no route announced on that link; refused.",
    UnauthenticatedLimit => "unauthenticated_limit": "A new connection over the cap on unauthenticated connections was refused.",
    AddressValidation => "address_validation": "A new connection was asked to validate its address (QUIC retry).",
    AllocatorTimeout => "allocator_timeout": "A join was refused because the lease database did not answer in time.",
    InstanceLimit => "instance_limit": "A join over the per-identity instance cap of a network was refused.",
    LastSeenFailed => "last_seen_failed": "Recording a lease's last-seen time failed (the member was served anyway).",
    LeaseExpired => "lease_expired": "A lease unused for longer than the configured expiry was released.",
}

/// One counter per [`Reason`].
#[derive(Debug)]
pub struct Counters {
    counts: Box<[AtomicU64]>,
}

impl Default for Counters {
    fn default() -> Self {
        Self { counts: Reason::ALL.iter().map(|_| AtomicU64::new(0)).collect() }
    }
}

impl Counters {
    /// Counts one occurrence of `reason`.
    pub fn add(&self, reason: Reason) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` occurrences of `reason`.
    pub fn add_n(&self, reason: Reason, n: u64) {
        self.counts[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// The count of `reason` so far.
    pub fn get(&self, reason: Reason) -> u64 {
        self.counts[reason as usize].load(Ordering::Relaxed)
    }

    /// Every non-zero counter, by name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Reason::ALL.iter().map(|&r| (r.name(), self.get(r))).filter(|&(_, n)| n > 0).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason() {
        let c = Counters::default();
        c.add(Reason::DatagramRate);
        c.add(Reason::DatagramRate);
        c.add(Reason::LeaseExpired);
        assert_eq!(c.get(Reason::DatagramRate), 2);
        assert_eq!(c.snapshot(), vec![("datagram_rate", 2), ("lease_expired", 1)]);
    }
}
