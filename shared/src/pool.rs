//! The VIP pool of one network block: which addresses are leased, which is next. Pure
//! state; the relay's allocator actor persists leases and replays them into a pool at
//! start. A pool covers a block of the network's subnet, so that later each federated
//! node can allocate from its own delegated block without a cluster-wide lock.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::addr::Subnet;

/// Leased and free VIPs of one block of a network.
#[derive(Debug, Clone)]
pub struct VipPool {
    subnet: Subnet,
    first: u32,
    last: u32,
    leased: BTreeSet<u32>,
    cursor: u32,
}

impl VipPool {
    /// A pool over the whole subnet.
    pub fn new(subnet: Subnet) -> Self {
        Self::for_block(subnet, subnet)
    }

    /// A pool over `block`, a part of `subnet` (the addresses this node may hand out).
    /// Addresses outside `subnet`, or the subnet's network, broadcast and relay
    /// addresses, are never handed out.
    pub fn for_block(subnet: Subnet, block: Subnet) -> Self {
        let first = u32::from(block.network()).max(u32::from(subnet.relay_addr()) + 1);
        let last = u32::from(block.broadcast()).min(u32::from(subnet.broadcast()) - 1);
        Self { subnet, first, last, leased: BTreeSet::new(), cursor: first }
    }

    /// A pool that hands out nothing (a subnet too small to give this node a block).
    pub fn empty(subnet: Subnet) -> Self {
        Self { subnet, first: 1, last: 0, leased: BTreeSet::new(), cursor: 1 }
    }

    /// The network's subnet.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// Marks `vip` as leased (replaying stored leases). Returns false if it is not a
    /// VIP this pool may hand out.
    pub fn handle_existing_lease(&mut self, vip: Ipv4Addr) -> bool {
        let bits = u32::from(vip);
        if !self.subnet.is_assignable(vip) || bits < self.first || bits > self.last {
            return false;
        }
        self.leased.insert(bits);
        true
    }

    /// Hands out the next free VIP, or `None` if the block is full. Allocation walks
    /// forward from the last one handed out, so a released VIP is not reused at once.
    pub fn poll_allocate(&mut self) -> Option<Ipv4Addr> {
        if self.first > self.last || self.leased.len() as u64 > u64::from(self.last - self.first) {
            return None;
        }
        let mut candidate = self.cursor;
        loop {
            if candidate > self.last {
                candidate = self.first;
            }
            if !self.leased.contains(&candidate) {
                self.leased.insert(candidate);
                self.cursor = candidate.wrapping_add(1);
                return Some(Ipv4Addr::from(candidate));
            }
            candidate += 1;
        }
    }

    /// Returns a VIP to the pool (lease deleted).
    pub fn handle_release(&mut self, vip: Ipv4Addr) {
        self.leased.remove(&u32::from(vip));
    }

    /// Number of VIPs the pool can hold.
    pub fn capacity(&self) -> u64 {
        if self.first > self.last {
            0
        } else {
            u64::from(self.last - self.first) + 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn small_subnet_fills_up_without_reserved_addresses() {
        let subnet: Subnet = "10.9.0.0/29".parse().unwrap();
        let mut pool = VipPool::new(subnet);
        let mut got = Vec::new();
        while let Some(vip) = pool.poll_allocate() {
            got.push(vip);
        }
        // 8 addresses minus network, broadcast and relay.
        assert_eq!(got.len(), 5);
        assert_eq!(pool.capacity(), 5);
        for vip in &got {
            assert!(subnet.is_assignable(*vip), "{vip}");
        }
        pool.handle_release(got[2]);
        assert_eq!(pool.poll_allocate(), Some(got[2]));
        assert_eq!(pool.poll_allocate(), None);
    }

    #[test]
    fn replayed_leases_are_skipped() {
        let subnet: Subnet = "10.9.0.0/24".parse().unwrap();
        let mut pool = VipPool::new(subnet);
        assert!(pool.handle_existing_lease("10.9.0.2".parse().unwrap()));
        assert!(!pool.handle_existing_lease("10.9.0.1".parse().unwrap()));
        assert!(!pool.handle_existing_lease("10.9.1.2".parse().unwrap()));
        assert_eq!(pool.poll_allocate(), Some("10.9.0.3".parse().unwrap()));
    }

    #[test]
    fn block_limits_allocation() {
        let subnet: Subnet = "10.9.0.0/16".parse().unwrap();
        let block: Subnet = "10.9.4.0/30".parse().unwrap();
        let mut pool = VipPool::for_block(subnet, block);
        let got: Vec<_> = std::iter::from_fn(|| pool.poll_allocate()).collect();
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|v| block.contains(*v)));
    }

    proptest! {
        #[test]
        fn never_duplicates_or_reserved(prefix in 24u8..=30, releases in proptest::collection::vec(any::<u8>(), 0..40)) {
            let subnet = Subnet::new("10.20.30.0".parse().unwrap(), prefix).unwrap();
            let mut pool = VipPool::new(subnet);
            let mut live = HashSet::new();
            for r in releases {
                match pool.poll_allocate() {
                    Some(vip) => {
                        prop_assert!(subnet.is_assignable(vip));
                        prop_assert!(live.insert(vip));
                    }
                    None => prop_assert_eq!(live.len() as u32, subnet.assignable_count()),
                }
                if r % 3 == 0 {
                    if let Some(&vip) = live.iter().next() {
                        live.remove(&vip);
                        pool.handle_release(vip);
                    }
                }
            }
        }
    }
}
