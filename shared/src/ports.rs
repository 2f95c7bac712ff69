//! The virtual ports one client holds in one port space (streams or datagrams), with
//! ephemeral allocation for port 0. Pure state; the relay's session actor owns two.

use std::collections::HashSet;
use std::ops::RangeInclusive;

/// Ephemeral virtual ports, as in IANA's dynamic range.
pub const EPHEMERAL_PORTS: RangeInclusive<u16> = 49152..=65535;

/// Why a port could not be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortError {
    /// The port is taken (or, for port 0, every ephemeral port is).
    InUse,
}

/// Ports in use in one port space.
#[derive(Debug, Clone)]
pub struct PortSet {
    used: HashSet<u16>,
    next_ephemeral: u16,
}

impl Default for PortSet {
    fn default() -> Self {
        Self { used: HashSet::new(), next_ephemeral: *EPHEMERAL_PORTS.start() }
    }
}

impl PortSet {
    /// Claims `port`, or a free ephemeral port for 0; returns the port claimed.
    pub fn claim(&mut self, port: u16) -> Result<u16, PortError> {
        if port != 0 {
            return if self.used.insert(port) { Ok(port) } else { Err(PortError::InUse) };
        }
        for _ in 0..EPHEMERAL_PORTS.len() {
            let candidate = self.next_ephemeral;
            self.next_ephemeral =
                if candidate == *EPHEMERAL_PORTS.end() { *EPHEMERAL_PORTS.start() } else { candidate + 1 };
            if self.used.insert(candidate) {
                return Ok(candidate);
            }
        }
        Err(PortError::InUse)
    }

    /// Releases a port; returns whether it was held.
    pub fn release(&mut self, port: u16) -> bool {
        self.used.remove(&port)
    }

    /// Number of ports held.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// Whether no port is held.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// Releases every port, yielding them.
    pub fn drain(&mut self) -> impl Iterator<Item = u16> + '_ {
        self.used.drain()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_and_ephemeral_ports() {
        let mut ports = PortSet::default();
        assert_eq!(ports.claim(80), Ok(80));
        assert_eq!(ports.claim(80), Err(PortError::InUse));
        let a = ports.claim(0).unwrap();
        let b = ports.claim(0).unwrap();
        assert!(EPHEMERAL_PORTS.contains(&a) && EPHEMERAL_PORTS.contains(&b) && a != b);
        // A fixed claim of the next ephemeral port is skipped by the next port 0.
        assert_eq!(ports.claim(b + 1), Ok(b + 1));
        assert_eq!(ports.claim(0), Ok(b + 2));
        assert!(ports.release(80));
        assert!(!ports.release(80));
        assert_eq!(ports.claim(80), Ok(80));
    }

    #[test]
    fn ephemeral_range_exhausts_cleanly() {
        let mut ports = PortSet::default();
        for _ in EPHEMERAL_PORTS {
            ports.claim(0).unwrap();
        }
        assert_eq!(ports.claim(0), Err(PortError::InUse));
    }
}
