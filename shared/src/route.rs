//! The cluster's route table as a sans-IO machine: where each VIP of each network lives
//! (this node, or a peer link), learned by path-vector announcements between relay
//! nodes. The relay's router shell feeds it local attachments, link ups and downs and
//! the updates peers send, and carries out what it returns: the best hop of a VIP
//! changed (rewrite the data path's lookup table), or updates to send on a link.
//!
//! Rules: an announcement carries the path of nodes it crossed (origin first); a node
//! drops one whose path already holds its own name, so routes never loop. Each origin
//! stamps its announcements with a sequence number from a clock that only moves
//! forward, and the freshest announcement of a VIP wins — a VIP that roamed to another
//! node is routed there even before the old node's withdrawal arrives. Among copies of
//! the same announcement, the shortest path wins. Every link is told exactly the best
//! route of each VIP, unless the link's peer is already on that route's path (it would
//! drop it), and a withdrawal when that changes; everything learned over a link that
//! goes down is forgotten at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// A network's cluster-wide id: the first 8 bytes of the SHA-256 of its name, so every
/// node computes the same id without asking anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetKey(pub u64);

impl NetKey {
    /// The id of the network named `name`.
    pub fn of(name: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest.as_ref()[..8]);
        Self(u64::from_be_bytes(id))
    }
}

impl fmt::Display for NetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A peer link of this node, numbered by the node (links come and go; a reconnect is a
/// new link).
pub type LinkId = u64;

/// Where a VIP's traffic goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// A session on this node.
    Local,
    /// A peer link.
    Peer(LinkId),
}

/// A route announcement: `vip` in network `net` is attached at `path[0]`, and reached
/// through the nodes of `path` in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// Network.
    pub net: NetKey,
    /// The VIP.
    pub vip: Ipv4Addr,
    /// The origin's sequence number (newer wins).
    pub seq: u64,
    /// Node names from the origin to the sender.
    pub path: Vec<String>,
    /// The origin's slot, so every node can check the VIP lies in it.
    pub origin_slot: u8,
    /// For a VIP outside the origin's slot (a client that roamed there): the lease
    /// proof its issuing node signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
    /// Who holds the VIP there: a digest of the client's identity and instance, so a
    /// node whose session this announcement supersedes can tell the same client that
    /// moved from another client that now holds the VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// The holder's instance name, as members see it in `peers` and connect by it on
    /// every node (empty for the unnamed instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Announce {
    /// The node the VIP is attached at.
    pub fn origin(&self) -> &str {
        self.path.first().map_or("", String::as_str)
    }
}

/// One change a node tells a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteUpdate {
    /// A route (new or changed).
    Announce(Announce),
    /// The sender no longer has a route to `vip`.
    Withdraw {
        /// Network.
        net: NetKey,
        /// The VIP.
        vip: Ipv4Addr,
    },
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteOutput {
    /// The best hop toward `vip` changed (`None`: unreachable now).
    BestChanged {
        /// Network.
        net: NetKey,
        /// The VIP.
        vip: Ipv4Addr,
        /// Where its traffic goes now.
        best: Option<Hop>,
    },
    /// Where traffic stamped with remote `vip` as its source may now come from
    /// (`None`: from no link; the VIP is local or unknown).
    SourcesChanged {
        /// Network.
        net: NetKey,
        /// The VIP.
        vip: Ipv4Addr,
        /// The links and the origin.
        sources: Option<Sources>,
    },
    /// A local session's VIP is announced fresher by another node (the client roamed
    /// there, or the VIP's lease went to another client): the local session is stale.
    Superseded {
        /// Network.
        net: NetKey,
        /// The VIP.
        vip: Ipv4Addr,
        /// Who holds it where it is announced, if that node said.
        by: Option<String>,
    },
    /// Send these updates on `link`, in order.
    Send {
        /// The link.
        link: LinkId,
        /// The updates.
        updates: Vec<RouteUpdate>,
    },
}

/// The links a remote VIP's traffic may arrive on: those that announce its current
/// origin (all of them, not only the best: on equal paths the sender's node may pick
/// another than this node would), and the origin's slot, which numbers the broadcasts
/// that enter the cluster there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    /// The links, ascending.
    pub links: Vec<LinkId>,
    /// The slot of the node the VIP is attached at.
    pub origin_slot: u8,
}

/// Why an update from a peer was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The link is not up.
    UnknownLink,
    /// The path holds this node: a loop.
    Loop,
    /// The path is empty or does not end at the link's peer.
    BadPath,
    /// The link already holds [`MAX_ROUTES_PER_LINK`] routes.
    TooMany,
}

/// Most routes one link may hold: a peer cannot make this node's table grow without
/// bound (a cluster serves far fewer clients).
pub const MAX_ROUTES_PER_LINK: usize = 250_000;

/// What a link was told about a VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Told {
    seq: u64,
    path: Vec<String>,
    origin_slot: u8,
    proof: Option<String>,
    holder: Option<String>,
    name: Option<String>,
}

#[derive(Debug, Clone)]
struct Learned {
    seq: u64,
    path: Vec<String>,
    origin_slot: u8,
    proof: Option<String>,
    holder: Option<String>,
    name: Option<String>,
}

#[derive(Debug, Default)]
struct Entry {
    /// Sequence number of the local attachment, if a session here holds the VIP.
    local: Option<u64>,
    /// The lease proof of a local VIP outside this node's slot.
    local_proof: Option<String>,
    /// Who holds the local VIP (a digest of identity and instance).
    local_holder: Option<String>,
    /// The local holder's instance name.
    local_name: Option<String>,
    /// What each link announced.
    learned: BTreeMap<LinkId, Learned>,
    best: Option<Hop>,
    /// Where traffic from the VIP may come from.
    sources: Option<Sources>,
    /// The links that were told a route: the sequence number and path they were told.
    told: HashMap<LinkId, Told>,
}

/// The route table of one node.
#[derive(Debug)]
pub struct RouteTable {
    me: String,
    slot: u8,
    links: BTreeMap<LinkId, String>,
    /// How many routes each link holds, and the most it may.
    held: HashMap<LinkId, usize>,
    max_per_link: usize,
    entries: HashMap<(NetKey, Ipv4Addr), Entry>,
    last_seq: u64,
    out: VecDeque<RouteOutput>,
}

impl RouteTable {
    /// An empty table of the node named `me`, holding slot `slot`.
    pub fn new(me: impl Into<String>, slot: u8) -> Self {
        Self {
            me: me.into(),
            slot,
            links: BTreeMap::new(),
            held: HashMap::new(),
            max_per_link: MAX_ROUTES_PER_LINK,
            entries: HashMap::new(),
            last_seq: 0,
            out: VecDeque::new(),
        }
    }

    /// The same table holding at most `max` routes per link (instead of
    /// [`MAX_ROUTES_PER_LINK`]).
    pub fn with_max_routes_per_link(mut self, max: usize) -> Self {
        self.max_per_link = max;
        self
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The best hop toward `vip`.
    pub fn best(&self, net: NetKey, vip: Ipv4Addr) -> Option<Hop> {
        self.entries.get(&(net, vip)).and_then(|e| e.best)
    }

    /// Where traffic from remote `vip` may come from.
    pub fn sources(&self, net: NetKey, vip: Ipv4Addr) -> Option<&Sources> {
        self.entries.get(&(net, vip))?.sources.as_ref()
    }

    /// The origin node and its slot of the best route toward `vip`.
    pub fn origin(&self, net: NetKey, vip: Ipv4Addr) -> Option<(&str, u8)> {
        let entry = self.entries.get(&(net, vip))?;
        match entry.best? {
            Hop::Local => Some((&self.me, self.slot)),
            Hop::Peer(link) => entry.learned.get(&link).map(|l| (l.path[0].as_str(), l.origin_slot)),
        }
    }

    /// The path of the best route toward `vip` (this node's name alone for a local VIP).
    pub fn path(&self, net: NetKey, vip: Ipv4Addr) -> Option<Vec<String>> {
        let entry = self.entries.get(&(net, vip))?;
        match entry.best? {
            Hop::Local => Some(vec![self.me.clone()]),
            Hop::Peer(link) => entry.learned.get(&link).map(|l| l.path.clone()),
        }
    }

    /// The instance name of each VIP of `net` held on another node (by the best route).
    pub fn names_in(&self, net: NetKey) -> Vec<(Ipv4Addr, &str)> {
        self.entries
            .iter()
            .filter(|((n, _), _)| *n == net)
            .filter_map(|((_, vip), e)| match e.best? {
                Hop::Peer(link) => Some((*vip, e.learned.get(&link)?.name.as_deref()?)),
                Hop::Local => None,
            })
            .collect()
    }

    /// The lease proof of a session here holding `vip`, if it has one.
    pub fn local_proof(&self, net: NetKey, vip: Ipv4Addr) -> Option<&str> {
        self.entries.get(&(net, vip))?.local_proof.as_deref()
    }

    /// The lease proofs the links' routes toward `vip` came with, by link.
    pub fn learned_proofs(&self, net: NetKey, vip: Ipv4Addr) -> Vec<(LinkId, &str)> {
        let Some(entry) = self.entries.get(&(net, vip)) else { return Vec::new() };
        entry.learned.iter().filter_map(|(link, l)| Some((*link, l.proof.as_deref()?))).collect()
    }

    /// The peer node of `link`.
    pub fn peer(&self, link: LinkId) -> Option<&str> {
        self.links.get(&link).map(String::as_str)
    }

    /// A session here took `vip` (`proof`: the lease proof of a VIP outside this node's
    /// slot; `holder`: a digest of the client's identity and instance; `name`: its
    /// instance name). `now_ms` is wall-clock milliseconds; sequence numbers never go
    /// backwards even if the clock does.
    pub fn handle_local_attach(
        &mut self,
        net: NetKey,
        vip: Ipv4Addr,
        proof: Option<String>,
        holder: Option<String>,
        name: Option<String>,
        now_ms: u64,
    ) {
        // Newer than anything announced for this VIP (a Lamport clock): a client that
        // just joined here wins over its older session elsewhere even if that node's
        // clock runs ahead.
        let seen = self.entries.get(&(net, vip)).map_or(0, |e| e.learned.values().map(|l| l.seq).max().unwrap_or(0));
        self.last_seq = now_ms.max(self.last_seq + 1).max(seen.saturating_add(1));
        let seq = self.last_seq;
        let entry = self.entries.entry((net, vip)).or_default();
        entry.local = Some(seq);
        entry.local_proof = proof;
        entry.local_holder = holder;
        entry.local_name = name;
        self.recompute(net, vip);
    }

    /// The session here holding `vip` is announced anew, numbered above `above` (an
    /// announcement for another client's stale lease of it was refused): fresher than
    /// that, it wins everywhere. Nothing if no session here holds it.
    pub fn handle_local_reassert(&mut self, net: NetKey, vip: Ipv4Addr, above: u64, now_ms: u64) {
        if self.entries.get(&(net, vip)).is_none_or(|e| e.local.is_none()) {
            return;
        }
        let seen = self.entries.get(&(net, vip)).map_or(0, |e| e.learned.values().map(|l| l.seq).max().unwrap_or(0));
        self.last_seq = now_ms.max(self.last_seq + 1).max(seen.saturating_add(1)).max(above.saturating_add(1));
        let seq = self.last_seq;
        if let Some(entry) = self.entries.get_mut(&(net, vip)) {
            entry.local = Some(seq);
        }
        self.recompute(net, vip);
    }

    /// The session here holding `vip` is gone.
    pub fn handle_local_detach(&mut self, net: NetKey, vip: Ipv4Addr) {
        if let Some(entry) = self.entries.get_mut(&(net, vip)) {
            entry.local = None;
            entry.local_proof = None;
            entry.local_holder = None;
            entry.local_name = None;
            self.recompute(net, vip);
        }
    }

    /// A link to node `peer` came up: it is told the whole table.
    pub fn handle_link_up(&mut self, link: LinkId, peer: impl Into<String>) {
        let peer = peer.into();
        self.links.insert(link, peer.clone());
        let keys: Vec<_> = self.entries.keys().copied().collect();
        let mut updates = Vec::new();
        for &(net, vip) in &keys {
            if let Some(update) = self.tell(link, net, vip) {
                updates.push(update);
            }
        }
        if !updates.is_empty() {
            self.out.push_back(RouteOutput::Send { link, updates });
        }
        // Routes relayed from `peer`'s origin now wait for its own word.
        self.recompute_origin(&peer, &keys);
    }

    /// Recomputes the entries with a route from `origin` (whose eligibility changed).
    fn recompute_origin(&mut self, origin: &str, keys: &[(NetKey, Ipv4Addr)]) {
        for &(net, vip) in keys {
            let has = self.entries.get(&(net, vip)).is_some_and(|e| e.learned.values().any(|l| l.path[0] == origin));
            if has {
                self.recompute(net, vip);
            }
        }
    }

    /// A link went down: everything learned over it is forgotten.
    pub fn handle_link_down(&mut self, link: LinkId) {
        let Some(peer) = self.links.remove(&link) else { return };
        self.held.remove(&link);
        let affected: Vec<_> = self
            .entries
            .iter_mut()
            .filter_map(|(key, entry)| {
                entry.told.remove(&link);
                entry.learned.remove(&link).map(|_| *key)
            })
            .collect();
        for (net, vip) in affected {
            self.recompute(net, vip);
        }
        // Routes of `peer` relayed by others count again if no other link to it is left.
        let keys: Vec<_> = self.entries.keys().copied().collect();
        self.recompute_origin(&peer, &keys);
    }

    /// Updates a peer sent on `link`. Returns the ones dropped, and why.
    pub fn handle_updates(
        &mut self,
        link: LinkId,
        updates: impl IntoIterator<Item = RouteUpdate>,
    ) -> Vec<(RouteUpdate, Dropped)> {
        let mut dropped = Vec::new();
        for update in updates {
            if let Err(why) = self.handle_update(link, &update) {
                dropped.push((update, why));
            }
        }
        dropped
    }

    fn handle_update(&mut self, link: LinkId, update: &RouteUpdate) -> Result<(), Dropped> {
        let peer = self.links.get(&link).ok_or(Dropped::UnknownLink)?;
        match update {
            RouteUpdate::Announce(a) => {
                if a.path.last() != Some(peer) {
                    return Err(Dropped::BadPath);
                }
                if a.path.contains(&self.me) {
                    return Err(Dropped::Loop);
                }
                let held = self.held.entry(link).or_default();
                let known = self.entries.get(&(a.net, a.vip)).is_some_and(|e| e.learned.contains_key(&link));
                if !known && *held >= self.max_per_link {
                    return Err(Dropped::TooMany);
                }
                let entry = self.entries.entry((a.net, a.vip)).or_default();
                let learned = Learned {
                    seq: a.seq,
                    path: a.path.clone(),
                    origin_slot: a.origin_slot,
                    proof: a.proof.clone(),
                    holder: a.holder.clone(),
                    name: a.name.clone(),
                };
                if entry.learned.insert(link, learned).is_none() {
                    *held += 1;
                }
                self.recompute(a.net, a.vip);
            }
            RouteUpdate::Withdraw { net, vip } => {
                if let Some(entry) = self.entries.get_mut(&(*net, *vip)) {
                    if entry.learned.remove(&link).is_some() {
                        if let Some(held) = self.held.get_mut(&link) {
                            *held -= 1;
                        }
                        self.recompute(*net, *vip);
                    }
                }
            }
        }
        Ok(())
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<RouteOutput> {
        self.out.pop_front()
    }

    /// Picks the best route of `(net, vip)` and tells the shell and the links what
    /// changed.
    fn recompute(&mut self, net: NetKey, vip: Ipv4Addr) {
        let Some(entry) = self.entries.get_mut(&(net, vip)) else { return };
        // A route of an origin this node has a link to counts only as that link
        // announced it: a peer cannot relay a fake route of a node whose own word this
        // node hears. Relayed copies wait until the direct link is gone.
        let links = &self.links;
        let eligible = |link: &LinkId, learned: &Learned| {
            let origin = &learned.path[0];
            links.get(link) == Some(origin) || !links.values().any(|peer| peer == origin)
        };
        // The freshest origin wins (a client that roamed); within one origin, whose
        // copies may carry older and newer numbers, the shortest path; then the lowest
        // link (deterministic).
        let mut freshest: HashMap<&str, u64> = HashMap::new();
        if let Some(seq) = entry.local {
            freshest.insert(&self.me, seq);
        }
        for (_, learned) in entry.learned.iter().filter(|(l, x)| eligible(l, x)) {
            let seq = freshest.entry(learned.path[0].as_str()).or_insert(learned.seq);
            *seq = (*seq).max(learned.seq);
        }
        let mut best: Option<(u64, usize, Hop)> = entry.local.map(|_| (freshest[self.me.as_str()], 0, Hop::Local));
        for (link, learned) in entry.learned.iter().filter(|(l, x)| eligible(l, x)) {
            let candidate = (freshest[learned.path[0].as_str()], learned.path.len(), Hop::Peer(*link));
            let better = match best {
                None => true,
                Some((seq, len, _)) => candidate.0 > seq || (candidate.0 == seq && candidate.1 < len),
            };
            if better {
                best = Some(candidate);
            }
        }
        let best = best.map(|(_, _, hop)| hop);
        let sources = match best {
            Some(Hop::Peer(via)) => {
                let chosen = &entry.learned[&via];
                let links = entry
                    .learned
                    .iter()
                    .filter(|(l, x)| eligible(l, x) && x.path[0] == chosen.path[0])
                    .map(|(l, _)| *l)
                    .collect();
                Some(Sources { links, origin_slot: chosen.origin_slot })
            }
            _ => None,
        };
        if sources != entry.sources {
            entry.sources = sources.clone();
            self.out.push_back(RouteOutput::SourcesChanged { net, vip, sources });
        }
        if entry.local.is_some() && best != Some(Hop::Local) {
            let by = match best {
                Some(Hop::Peer(via)) => entry.learned[&via].holder.clone(),
                _ => None,
            };
            self.out.push_back(RouteOutput::Superseded { net, vip, by });
        }
        if best != entry.best {
            entry.best = best;
            self.out.push_back(RouteOutput::BestChanged { net, vip, best });
        }
        let links: Vec<LinkId> = self.links.keys().copied().collect();
        for link in links {
            if let Some(update) = self.tell(link, net, vip) {
                self.out.push_back(RouteOutput::Send { link, updates: vec![update] });
            }
        }
        let entry = self.entries.get(&(net, vip)).expect("present above");
        if entry.local.is_none() && entry.learned.is_empty() && entry.told.is_empty() {
            self.entries.remove(&(net, vip));
        }
    }

    /// What `link` must be told about `(net, vip)` now, if anything, recording it.
    fn tell(&mut self, link: LinkId, net: NetKey, vip: Ipv4Addr) -> Option<RouteUpdate> {
        let peer = self.links.get(&link)?.clone();
        let entry = self.entries.get(&(net, vip))?;
        let (seq, mut path, origin_slot, proof, holder, name) = match entry.best {
            Some(Hop::Local) => (
                entry.local.expect("a local best has a local seq"),
                Vec::new(),
                self.slot,
                entry.local_proof.clone(),
                entry.local_holder.clone(),
                entry.local_name.clone(),
            ),
            Some(Hop::Peer(via)) => {
                let l = &entry.learned[&via];
                (l.seq, l.path.clone(), l.origin_slot, l.proof.clone(), l.holder.clone(), l.name.clone())
            }
            None => (0, Vec::new(), 0, None, None, None),
        };
        let wanted = match entry.best {
            Some(_) if !path.contains(&peer) => {
                path.push(self.me.clone());
                Some(Told { seq, path, origin_slot, proof, holder, name })
            }
            _ => None,
        };
        let entry = self.entries.get_mut(&(net, vip)).expect("present above");
        match wanted {
            Some(told) => {
                if entry.told.get(&link) == Some(&told) {
                    return None;
                }
                let Told { seq, path, origin_slot, proof, holder, name } = told.clone();
                entry.told.insert(link, told);
                Some(RouteUpdate::Announce(Announce { net, vip, seq, path, origin_slot, proof, holder, name }))
            }
            None => {
                entry.told.remove(&link)?;
                Some(RouteUpdate::Withdraw { net, vip })
            }
        }
    }
}

/// Drops broadcasts a node has seen already: one sliding window of sequence numbers
/// per origin node, so a broadcast flooded over a mesh with cycles fans out once per
/// node. Origins number their broadcasts from the clock at start-up onward, so a
/// restarted origin starts above what it sent before.
#[derive(Debug, Default)]
pub struct BroadcastDedup {
    origins: HashMap<u64, Window>,
}

/// How many sequence numbers below the highest seen are remembered.
pub const DEDUP_WINDOW: u64 = 1024;

#[derive(Debug)]
struct Window {
    highest: u64,
    /// Bit `i`: `highest - i` was seen.
    seen: [u64; (DEDUP_WINDOW / 64) as usize],
}

impl Window {
    fn bit(&mut self, age: u64) -> (&mut u64, u64) {
        (&mut self.seen[(age / 64) as usize], 1 << (age % 64))
    }

    fn shift(&mut self, by: u64) {
        if by >= DEDUP_WINDOW {
            self.seen = [0; (DEDUP_WINDOW / 64) as usize];
            return;
        }
        let (words, bits) = ((by / 64) as usize, by % 64);
        let n = self.seen.len();
        for i in (0..n).rev() {
            let lo = if i >= words { self.seen[i - words] } else { 0 };
            let carry = if bits > 0 && i > words { self.seen[i - words - 1] >> (64 - bits) } else { 0 };
            self.seen[i] = (lo << bits) | carry;
        }
    }
}

impl BroadcastDedup {
    /// Forgets what `origin` sent: its node restarted or its link came back, and may
    /// number from lower than before (a clock set back).
    pub fn forget(&mut self, origin: u64) {
        self.origins.remove(&origin);
    }

    /// Whether broadcast `seq` of `origin` is new (and records it). Too old to judge
    /// (below the window) counts as seen.
    pub fn handle_broadcast(&mut self, origin: u64, seq: u64) -> bool {
        let Some(window) = self.origins.get_mut(&origin) else {
            let mut window = Window { highest: seq, seen: [0; (DEDUP_WINDOW / 64) as usize] };
            window.seen[0] = 1;
            self.origins.insert(origin, window);
            return true;
        };
        if seq > window.highest {
            window.shift(seq - window.highest);
            window.highest = seq;
            window.seen[0] |= 1;
            return true;
        }
        let age = window.highest - seq;
        if age >= DEDUP_WINDOW {
            return false;
        }
        let (word, mask) = window.bit(age);
        let new = *word & mask == 0;
        *word |= mask;
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: NetKey = NetKey(7);

    fn vip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, n)
    }

    /// Nodes of a test cluster and their links: (node a, link id at a, node b, link id at b).
    struct Cluster {
        tables: Vec<RouteTable>,
        links: Vec<(usize, LinkId, usize, LinkId)>,
    }

    impl Cluster {
        fn new(n: usize) -> Self {
            Self { tables: (0..n).map(|i| RouteTable::new(format!("n{i}"), i as u8)).collect(), links: Vec::new() }
        }

        fn connect(&mut self, a: usize, b: usize) {
            let id = self.links.len() as LinkId + 1;
            self.links.push((a, id, b, id));
            let (name_a, name_b) = (self.tables[a].me().to_owned(), self.tables[b].me().to_owned());
            self.tables[a].handle_link_up(id, name_b);
            self.tables[b].handle_link_up(id, name_a);
            self.settle();
        }

        fn cut(&mut self, a: usize, b: usize) {
            let i = self.links.iter().position(|l| (l.0, l.2) == (a, b) || (l.0, l.2) == (b, a)).unwrap();
            let (a, la, b, lb) = self.links.remove(i);
            self.tables[a].handle_link_down(la);
            self.tables[b].handle_link_down(lb);
            self.settle();
        }

        /// Delivers every update until nothing moves. Returns other outputs by node.
        fn settle(&mut self) -> Vec<(usize, RouteOutput)> {
            let mut other = Vec::new();
            for _ in 0..1000 {
                let mut moved = false;
                for node in 0..self.tables.len() {
                    while let Some(out) = self.tables[node].poll_output() {
                        match out {
                            RouteOutput::Send { link, updates } => {
                                moved = true;
                                let &(a, la, b, lb) = self
                                    .links
                                    .iter()
                                    .find(|l| (l.0 == node && l.1 == link) || (l.2 == node && l.3 == link))
                                    .expect("sent on a live link");
                                let (to, to_link) = if a == node && la == link { (b, lb) } else { (a, la) };
                                let dropped = self.tables[to].handle_updates(to_link, updates);
                                assert!(dropped.iter().all(|(_, why)| *why == Dropped::Loop), "{dropped:?}");
                            }
                            out => other.push((node, out)),
                        }
                    }
                }
                if !moved {
                    return other;
                }
            }
            panic!("routes did not converge");
        }

        fn path(&self, node: usize, vip: Ipv4Addr) -> Option<Vec<String>> {
            self.tables[node].path(NET, vip)
        }
    }

    fn names(names: &[&str]) -> Option<Vec<String>> {
        Some(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_line_reaches_its_far_end_through_the_middle() {
        let mut c = Cluster::new(3);
        c.connect(0, 1);
        c.connect(1, 2);
        c.tables[2].handle_local_attach(NET, vip(3), None, None, None, 1);
        c.settle();
        assert_eq!(c.path(0, vip(3)), names(&["n2", "n1"]));
        assert_eq!(c.tables[0].best(NET, vip(3)), Some(Hop::Peer(1)));
        assert_eq!(c.tables[2].best(NET, vip(3)), Some(Hop::Local));
        c.tables[2].handle_local_detach(NET, vip(3));
        c.settle();
        for node in 0..3 {
            assert_eq!(c.tables[node].best(NET, vip(3)), None, "node {node}");
        }
    }

    #[test]
    fn traffic_from_a_vip_may_come_on_every_link_that_announces_its_origin() {
        // A ring n0—n1—n2—n3—n0: n2 hears n0's client on two paths of equal length,
        // and n0's node may send on either.
        let mut c = Cluster::new(4);
        c.connect(0, 1);
        c.connect(1, 2);
        c.connect(2, 3);
        c.connect(3, 0);
        c.tables[0].handle_local_attach(NET, vip(1), None, None, None, 1);
        let outputs = c.settle();
        let n2_links: Vec<LinkId> = c.links.iter().filter(|l| l.0 == 2 || l.2 == 2).map(|l| l.1).collect();
        assert_eq!(c.tables[2].sources(NET, vip(1)), Some(&Sources { links: n2_links, origin_slot: 0 }));
        assert!(outputs.iter().any(|(node, out)| *node == 2 && matches!(out, RouteOutput::SourcesChanged { .. })));
        // Only the direct link where the origin is a neighbour; none at the origin.
        let n1_link_to_n0 = c.links.iter().find(|l| (l.0, l.2) == (0, 1)).unwrap().1;
        assert_eq!(c.tables[1].sources(NET, vip(1)).map(|s| s.links.clone()), Some(vec![n1_link_to_n0]));
        assert_eq!(c.tables[0].sources(NET, vip(1)), None);
        // One path gone: one link left; the client gone: none.
        c.cut(1, 2);
        let n2_to_n3 = c.links.iter().find(|l| (l.0, l.2) == (2, 3)).unwrap().1;
        assert_eq!(c.tables[2].sources(NET, vip(1)).map(|s| s.links.clone()), Some(vec![n2_to_n3]));
        c.tables[0].handle_local_detach(NET, vip(1));
        c.settle();
        assert_eq!(c.tables[2].sources(NET, vip(1)), None);
    }

    #[test]
    fn a_link_holds_a_bounded_number_of_routes() {
        let mut table = RouteTable::new("n0", 0).with_max_routes_per_link(3);
        table.handle_link_up(1, "n1");
        let announce = |n: u8| {
            RouteUpdate::Announce(Announce {
                net: NET,
                vip: vip(n),
                seq: 1,
                path: vec!["n1".into()],
                origin_slot: 1,
                proof: None,
                holder: None,
                name: None,
            })
        };
        let dropped = table.handle_updates(1, (1..=5).map(announce));
        assert_eq!(dropped.iter().map(|(_, why)| *why).collect::<Vec<_>>(), vec![Dropped::TooMany; 2]);
        // A newer word about a route it holds still counts; a withdrawal makes room.
        assert!(table.handle_updates(1, [announce(3)]).is_empty());
        assert!(table.handle_updates(1, [RouteUpdate::Withdraw { net: NET, vip: vip(1) }]).is_empty());
        assert!(table.handle_updates(1, [announce(4)]).is_empty());
        assert_eq!(table.handle_updates(1, [announce(5)]).len(), 1);
        // A link that comes up again starts empty.
        table.handle_link_down(1);
        table.handle_link_up(1, "n1");
        assert!(table.handle_updates(1, (5..=7).map(announce)).is_empty());
    }

    #[test]
    fn a_link_that_comes_up_later_gets_the_whole_table() {
        let mut c = Cluster::new(3);
        c.tables[0].handle_local_attach(NET, vip(1), None, None, None, 1);
        c.tables[2].handle_local_attach(NET, vip(3), None, None, None, 1);
        c.connect(0, 1);
        c.connect(1, 2);
        assert_eq!(c.path(0, vip(3)), names(&["n2", "n1"]));
        assert_eq!(c.path(2, vip(1)), names(&["n0", "n1"]));
    }

    #[test]
    fn a_triangle_prefers_the_direct_link_and_reroutes_when_it_dies() {
        let mut c = Cluster::new(3);
        c.connect(0, 1);
        c.connect(1, 2);
        c.connect(0, 2);
        c.tables[2].handle_local_attach(NET, vip(3), None, None, None, 1);
        c.settle();
        assert_eq!(c.path(0, vip(3)), names(&["n2"]));
        c.cut(0, 2);
        assert_eq!(c.path(0, vip(3)), names(&["n2", "n1"]));
        c.cut(1, 2);
        assert_eq!(c.path(0, vip(3)), None);
        assert_eq!(c.path(1, vip(3)), None);
    }

    #[test]
    fn changes_report_the_new_best_hop() {
        let mut c = Cluster::new(2);
        c.connect(0, 1);
        c.tables[1].handle_local_attach(NET, vip(9), None, None, None, 1);
        let outputs = c.settle();
        assert!(outputs.contains(&(0, RouteOutput::BestChanged { net: NET, vip: vip(9), best: Some(Hop::Peer(1)) })));
        assert!(outputs.contains(&(1, RouteOutput::BestChanged { net: NET, vip: vip(9), best: Some(Hop::Local) })));
        c.cut(0, 1);
        // Link down: node 0 forgets at once, without waiting for a withdrawal.
        assert_eq!(c.tables[0].best(NET, vip(9)), None);
    }

    #[test]
    fn a_roamed_vip_is_routed_to_its_newer_node_and_the_old_session_is_superseded() {
        let mut c = Cluster::new(3);
        c.connect(0, 1);
        c.connect(1, 2);
        c.tables[0].handle_local_attach(NET, vip(5), None, Some("me".into()), None, 100);
        c.settle();
        // The client joins n2 before n0 noticed it left: n0 hears who holds it there.
        c.tables[2].handle_local_attach(
            NET,
            vip(5),
            Some("proof".into()),
            Some("me".into()),
            Some("carol".into()),
            200,
        );
        let outputs = c.settle();
        assert!(outputs.contains(&(0, RouteOutput::Superseded { net: NET, vip: vip(5), by: Some("me".into()) })));
        assert_eq!(c.path(1, vip(5)), names(&["n2"]));
        // The proof travels with the route: each node can check it again later.
        assert_eq!(c.tables[1].learned_proofs(NET, vip(5)), vec![(2, "proof")]);
        assert_eq!(c.tables[0].learned_proofs(NET, vip(5)), vec![(1, "proof")]);
        assert!(c.tables[2].learned_proofs(NET, vip(5)).is_empty(), "its own session's is not learned");
        assert_eq!(c.tables[2].local_proof(NET, vip(5)), Some("proof"));
        assert_eq!(c.tables[1].local_proof(NET, vip(5)), None);
        // So does the holder's name; n2's own member is not another node's.
        assert_eq!(c.tables[0].names_in(NET), vec![(vip(5), "carol")]);
        assert_eq!(c.tables[1].names_in(NET), vec![(vip(5), "carol")]);
        assert!(c.tables[2].names_in(NET).is_empty());
        assert!(c.tables[0].names_in(NetKey(8)).is_empty());
        assert_eq!(c.tables[0].best(NET, vip(5)), Some(Hop::Peer(1)));
        // n0's late detach changes nothing elsewhere.
        c.tables[0].handle_local_detach(NET, vip(5));
        c.settle();
        assert_eq!(c.path(0, vip(5)), names(&["n2", "n1"]));
        assert_eq!(c.path(1, vip(5)), names(&["n2"]));
    }

    #[test]
    fn a_peer_cannot_relay_a_fresher_fake_route_of_a_node_this_node_hears_itself() {
        let mut t = RouteTable::new("n0", 0);
        t.handle_link_up(1, "n1");
        t.handle_link_up(2, "liar");
        let announce = |seq: u64, path: &[&str]| {
            let path = names(path).unwrap();
            RouteUpdate::Announce(Announce {
                net: NET,
                vip: vip(7),
                seq,
                path,
                origin_slot: 1,
                proof: None,
                holder: None,
                name: None,
            })
        };
        assert!(t.handle_updates(1, [announce(10, &["n1"])]).is_empty());
        // The liar relays "n1's" route with a far fresher number: not taken.
        assert!(t.handle_updates(2, [announce(u64::MAX / 2, &["n1", "liar"])]).is_empty());
        assert_eq!(t.best(NET, vip(7)), Some(Hop::Peer(1)));
        // n1's client leaves: no phantom route through the liar while n1 is linked.
        t.handle_updates(1, [RouteUpdate::Withdraw { net: NET, vip: vip(7) }]);
        assert_eq!(t.best(NET, vip(7)), None);
        // Without a link to n1, a relayed route is all there is, and it counts.
        t.handle_link_down(1);
        assert_eq!(t.best(NET, vip(7)), Some(Hop::Peer(2)));
    }

    #[test]
    fn a_local_join_wins_over_an_older_session_on_a_node_whose_clock_runs_ahead() {
        let mut t = RouteTable::new("n0", 0);
        t.handle_link_up(1, "n1");
        let ahead = RouteUpdate::Announce(Announce {
            net: NET,
            vip: vip(4),
            seq: 10_000,
            path: vec!["n1".into()],
            origin_slot: 1,
            proof: None,
            holder: None,
            name: None,
        });
        t.handle_updates(1, [ahead]);
        t.handle_local_attach(NET, vip(4), None, None, None, 5);
        assert_eq!(t.best(NET, vip(4)), Some(Hop::Local));
        assert!(!std::iter::from_fn(|| t.poll_output()).any(|o| matches!(o, RouteOutput::Superseded { .. })));
    }

    #[test]
    fn sequence_numbers_never_go_backwards() {
        let mut t = RouteTable::new("n0", 0);
        t.handle_local_attach(NET, vip(1), None, None, None, 500);
        t.handle_local_attach(NET, vip(2), None, None, None, 10);
        t.handle_link_up(1, "n1");
        let Some(RouteOutput::Send { updates, .. }) =
            std::iter::from_fn(|| t.poll_output()).find(|o| matches!(o, RouteOutput::Send { .. }))
        else {
            panic!("no full table sent");
        };
        let seqs: HashMap<Ipv4Addr, u64> = updates
            .iter()
            .map(|u| match u {
                RouteUpdate::Announce(a) => (a.vip, a.seq),
                RouteUpdate::Withdraw { .. } => panic!("withdrawal in a full table"),
            })
            .collect();
        assert!(seqs[&vip(2)] > seqs[&vip(1)]);
    }

    #[test]
    fn bad_updates_are_dropped_and_named() {
        let mut t = RouteTable::new("n0", 0);
        let announce = |path: &[&str]| {
            RouteUpdate::Announce(Announce {
                net: NET,
                vip: vip(1),
                seq: 1,
                path: names(path).unwrap(),
                origin_slot: 1,
                proof: None,
                holder: None,
                name: None,
            })
        };
        assert_eq!(t.handle_updates(1, [announce(&["n1"])])[0].1, Dropped::UnknownLink);
        t.handle_link_up(1, "n1");
        assert_eq!(t.handle_updates(1, [announce(&["n0", "n1"])])[0].1, Dropped::Loop);
        assert_eq!(t.handle_updates(1, [announce(&["n1", "n2"])])[0].1, Dropped::BadPath);
        assert_eq!(t.handle_updates(1, [announce(&[])])[0].1, Dropped::BadPath);
        assert_eq!(t.best(NET, vip(1)), None);
        assert!(t.handle_updates(1, [announce(&["n2", "n1"])]).is_empty());
        assert_eq!(t.best(NET, vip(1)), Some(Hop::Peer(1)));
    }

    #[test]
    fn networks_are_kept_apart() {
        let mut c = Cluster::new(2);
        c.connect(0, 1);
        c.tables[1].handle_local_attach(NetKey::of("a"), vip(1), None, None, None, 1);
        c.settle();
        assert_eq!(c.tables[0].best(NetKey::of("b"), vip(1)), None);
        assert!(c.tables[0].best(NetKey::of("a"), vip(1)).is_some());
        assert_ne!(NetKey::of("a"), NetKey::of("b"));
        assert_eq!(NetKey::of("default"), NetKey::of("default"));
    }

    #[test]
    fn dedup_passes_each_broadcast_once() {
        let mut d = BroadcastDedup::default();
        assert!(d.handle_broadcast(1, 1000));
        assert!(!d.handle_broadcast(1, 1000));
        assert!(d.handle_broadcast(1, 1002));
        assert!(d.handle_broadcast(1, 1001));
        assert!(!d.handle_broadcast(1, 1001));
        assert!(d.handle_broadcast(2, 1001), "origins are separate");
        assert!(d.handle_broadcast(1, 1000 + 300));
        assert!(!d.handle_broadcast(1, 1002), "still remembered after a shift of 298");
        assert!(d.handle_broadcast(1, 1003));
        assert!(d.handle_broadcast(1, 5000));
        assert!(!d.handle_broadcast(1, 5000 - DEDUP_WINDOW), "too old to judge");
        assert!(d.handle_broadcast(1, 5000 - DEDUP_WINDOW + 1));
    }

    proptest::proptest! {
        #[test]
        fn dedup_matches_a_set_within_the_window(seqs in proptest::collection::vec(0u64..3000, 1..400)) {
            let mut d = BroadcastDedup::default();
            let mut seen = std::collections::HashSet::new();
            let mut highest = 0;
            for seq in seqs {
                let expected = if !seen.is_empty() && seq + DEDUP_WINDOW <= highest { false } else { !seen.contains(&seq) };
                proptest::prop_assert_eq!(d.handle_broadcast(0, seq), expected, "seq {}", seq);
                seen.insert(seq);
                highest = highest.max(seq);
            }
        }
    }
}
