//! The ring as one node sees it: for each key, whether this node holds it and which of its
//! peers do, and which partitions it shares with each peer (what anti-entropy compares with
//! that peer).
//!
//! The node keeps its peers in configuration order, indexed by position; the ring names
//! nodes by id. A [`Placement`] maps one onto the other once, so the write path looks up a
//! key's holders with one hash and one index, and a ring where every node holds everything
//! (N at least the node count, the default 3 of 3) skips even that.

use crate::error::Error;
use crate::membership::{Phase, RingState};
use crate::ring::{PARTITIONS, Ring, partition_of};

/// Words in a [`PartitionSet`].
const WORDS: usize = PARTITIONS as usize / 64;

/// A set of partitions, as a bitmap: 128 bytes on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionSet([u64; WORDS]);

impl PartitionSet {
    /// Bytes of [`PartitionSet::to_bytes`].
    pub const BYTES: usize = WORDS * 8;

    /// No partition.
    pub const fn none() -> Self {
        Self([0; WORDS])
    }

    /// Every partition.
    pub const fn all() -> Self {
        Self([u64::MAX; WORDS])
    }

    pub fn insert(&mut self, p: u16) {
        self.0[usize::from(p) / 64] |= 1 << (p % 64);
    }

    pub fn contains(&self, p: u16) -> bool {
        usize::from(p) < usize::from(PARTITIONS)
            && self.0[usize::from(p) / 64] & (1 << (p % 64)) != 0
    }

    /// Whether `key`'s partition is in the set.
    pub fn contains_key(&self, key: &str) -> bool {
        self.contains(partition_of(key))
    }

    /// Partitions in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    pub fn is_all(&self) -> bool {
        self.0.iter().all(|&w| w == u64::MAX)
    }

    /// The partitions in both sets.
    pub fn and(&self, other: &Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] & other.0[i]))
    }

    /// The partitions in either set.
    pub fn or(&self, other: &Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] | other.0[i]))
    }

    /// The partitions of `self` that `other` lacks.
    pub fn minus(&self, other: &Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] & !other.0[i]))
    }

    /// The partitions in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (0..PARTITIONS).filter(|&p| self.contains(p))
    }

    /// The bitmap, little-endian, partition 0 in the lowest bit of the first byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The set [`PartitionSet::to_bytes`] made.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() != Self::BYTES {
            return Err(Error::Ring(format!(
                "a partition set is {} bytes (one bit per partition), got {}",
                Self::BYTES,
                bytes.len()
            )));
        }
        let mut words = [0; WORDS];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        }
        Ok(Self(words))
    }
}

impl std::fmt::Debug for PartitionSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PartitionSet({} of {PARTITIONS})", self.len())
    }
}

impl FromIterator<u16> for PartitionSet {
    fn from_iter<I: IntoIterator<Item = u16>>(iter: I) -> Self {
        let mut set = Self::none();
        for p in iter {
            set.insert(p);
        }
        set
    }
}

/// Who holds one key: this node or not, and which peers (indexes in configuration order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holders<'a> {
    pub local: bool,
    pub peers: &'a [u16],
    /// The key's writers during a ring change, split by ring: each ring's holders, of which
    /// a write must reach the quorum. Empty when one ring places the key.
    pub rings: &'a [RingHolders],
}

impl Holders<'_> {
    /// Copies of the key: the nodes a write goes to and a quorum counts over.
    pub fn nodes(&self) -> usize {
        self.peers.len() + usize::from(self.local)
    }

    /// For each ring of a change under way, how many of its holders have a write, and how
    /// many it has: `acked(i)` says whether the peer at position `i` of `peers` has it, and
    /// this node has it if it holds the key. Empty when one ring places the key.
    pub fn ring_acks(&self, acked: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
        (self.rings.iter())
            .map(|ring| {
                let peers = ring.at.iter().filter(|&&i| acked(usize::from(i))).count();
                (usize::from(ring.local) + peers, ring.nodes())
            })
            .collect()
    }
}

/// One ring's holders of a key while the ring changes, among the key's writers. A write
/// acknowledged by the quorum of each ring is seen by a quorum read of either; the quorum of
/// the two together would ask more: for a removal, every live holder, the one still copying
/// the key included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingHolders {
    /// Whether this node is one.
    pub local: bool,
    /// The others, as positions in the key's [`Holders::peers`].
    pub at: Box<[u16]>,
}

impl RingHolders {
    /// The ring's copies of the key.
    pub fn nodes(&self) -> usize {
        self.at.len() + usize::from(self.local)
    }
}

/// A ring mapped onto one node's peers. While the ring changes (see [`crate::membership`]),
/// reads follow one ring and writes go to the holders of both, so a placement keeps a table
/// for each.
#[derive(Clone, Debug)]
pub struct Placement {
    state: RingState,
    /// This node's id.
    me: String,
    /// Whether every node holds every key: then nothing is looked up.
    everywhere: bool,
    /// Every peer's index, for `everywhere`.
    all_peers: Vec<u16>,
    /// The peers' ids, in configuration order.
    peer_ids: Vec<String>,
    /// Partitions this node holds a copy of to read.
    local: PartitionSet,
    /// Per partition, the peers holding it to read, in preference order.
    peers_of: Vec<Box<[u16]>>,
    /// Partitions this node takes writes of: `local`, and during a change those it gains or
    /// has not yet given up.
    write_local: PartitionSet,
    /// Per partition, the peers that take its writes.
    write_peers_of: Vec<Box<[u16]>>,
    /// Per partition while the ring changes, its writers split by ring; empty when settled.
    rings_of: Vec<Box<[RingHolders]>>,
    /// Per peer, the partitions both it and this node take writes of: what anti-entropy
    /// compares with it, and how a new holder fills its partitions.
    shared: Vec<PartitionSet>,
}

impl Placement {
    /// `ring` seen from node `me`, whose peers are `peers` (ring member ids, in configuration
    /// order). Every member but `me` must be a peer, and `me` a member.
    pub fn new(ring: Ring, me: &str, peers: &[String]) -> Result<Self, Error> {
        if !ring.members().iter().any(|m| m == me) {
            return Err(Error::Ring(format!("{me} is not a member of the ring")));
        }
        Self::of(RingState::settled(ring), me, peers)
    }

    /// `state` seen from node `me`, whose peers are `peers`: every member of either ring but
    /// `me` must be a peer. Peers that are no member hold nothing, and so does `me` if it is
    /// none: a node that has left the ring holds no key, and still takes calls for any.
    pub fn of(state: RingState, me: &str, peers: &[String]) -> Result<Self, Error> {
        let members = state.members();
        let index_of = |member: &str| peers.iter().position(|p| p == member);
        for member in members.iter().filter(|m| *m != me) {
            if index_of(member).is_none() {
                return Err(Error::Ring(format!(
                    "ring member {member} is not one of this node's peers"
                )));
            }
        }
        let peer_count = u16::try_from(peers.len())
            .map_err(|_| Error::Ring(format!("{} peers is too many", peers.len())))?;
        let read = state.read_ring();
        let everywhere = state.phase() == Phase::Settled
            && read.width() == read.members().len()
            && read.members().iter().any(|m| m == me);
        let table = |ring: &Ring, p: u16| -> (bool, Vec<u16>) {
            let mut here = false;
            let mut held = Vec::with_capacity(ring.width());
            for holder in ring.holders(p) {
                if holder == me {
                    here = true;
                } else {
                    held.push(index_of(holder).expect("checked above") as u16);
                }
            }
            (here, held)
        };
        let mut local = PartitionSet::none();
        let mut write_local = PartitionSet::none();
        let mut shared = vec![PartitionSet::none(); peers.len()];
        let mut peers_of = Vec::with_capacity(usize::from(PARTITIONS));
        let mut write_peers_of = Vec::with_capacity(usize::from(PARTITIONS));
        let changing = state.previous().is_some();
        let mut rings_of = Vec::with_capacity(if changing { PARTITIONS.into() } else { 0 });
        for p in 0..PARTITIONS {
            let (here, held) = table(read, p);
            if here {
                local.insert(p);
            }
            // The reading holders first, then any other ring's: the order a write's failures
            // are named in.
            let mut writers = held.clone();
            let mut write_here = here;
            for ring in state.write_rings() {
                let (also_here, others) = table(ring, p);
                write_here |= also_here;
                for peer in others {
                    if !writers.contains(&peer) {
                        writers.push(peer);
                    }
                }
            }
            if write_here {
                write_local.insert(p);
                for &peer in &writers {
                    shared[usize::from(peer)].insert(p);
                }
            }
            if changing {
                let split = (state.write_rings()).map(|ring| {
                    let (local, others) = table(ring, p);
                    let at = (others.iter())
                        .map(|peer| writers.iter().position(|w| w == peer).expect("a writer"))
                        .map(|at| at as u16)
                        .collect();
                    RingHolders { local, at }
                });
                rings_of.push(split.collect());
            }
            peers_of.push(held.into_boxed_slice());
            write_peers_of.push(writers.into_boxed_slice());
        }
        Ok(Self {
            state,
            me: me.to_owned(),
            everywhere,
            all_peers: (0..peer_count).collect(),
            peer_ids: peers.to_vec(),
            local,
            peers_of,
            write_local,
            write_peers_of,
            rings_of,
            shared,
        })
    }

    /// Every node holds everything: the first ring of `me` and `peers` with as many copies
    /// as nodes.
    pub fn everywhere(me: &str, peers: &[String]) -> Result<Self, Error> {
        let members = std::iter::once(me.to_owned()).chain(peers.iter().cloned());
        Self::new(Ring::bootstrap(members, peers.len() + 1)?, me, peers)
    }

    /// The first ring of `me` and `peers`, with `replicas` copies of each key.
    pub fn bootstrap(me: &str, peers: &[String], replicas: usize) -> Result<Self, Error> {
        let members = std::iter::once(me.to_owned()).chain(peers.iter().cloned());
        Self::new(Ring::bootstrap(members, replicas)?, me, peers)
    }

    /// The ring reads follow (the one in force, but during the first phase of a change).
    pub fn ring(&self) -> &Ring {
        self.state.read_ring()
    }

    /// The ring and any change under way.
    pub fn state(&self) -> &RingState {
        &self.state
    }

    /// This node's id in the ring.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// This node's part in the ring: "joining" or "leaving" while a change that adds or
    /// takes it out is under way, "left" once it is out, "normal" otherwise.
    pub fn role(&self) -> &'static str {
        let member = |ring: &Ring| ring.members().contains(&self.me);
        match (member(self.state.ring()), self.state.previous().map(member)) {
            (true, Some(false)) => "joining",
            (false, Some(true)) => "leaving",
            (false, _) => "left",
            _ => "normal",
        }
    }

    /// The peers' ids, in configuration order.
    pub fn peer_ids(&self) -> &[String] {
        &self.peer_ids
    }

    /// Whether every node holds every key.
    pub fn is_everywhere(&self) -> bool {
        self.everywhere
    }

    /// Who holds `key` to read it.
    pub fn holders(&self, key: &str) -> Holders<'_> {
        self.lookup(key, &self.local, &self.peers_of, &[])
    }

    /// Who takes the writes of `key`: its holders, and during a change those of the other
    /// ring too.
    pub fn write_holders(&self, key: &str) -> Holders<'_> {
        self.lookup(key, &self.write_local, &self.write_peers_of, &self.rings_of)
    }

    /// `key`'s holders by one of the tables: whether this node is one, and which peers, and
    /// split by ring if `rings_of` has the split.
    fn lookup<'a>(
        &'a self,
        key: &str,
        local: &PartitionSet,
        peers_of: &'a [Box<[u16]>],
        rings_of: &'a [Box<[RingHolders]>],
    ) -> Holders<'a> {
        if self.everywhere {
            return Holders {
                local: true,
                peers: &self.all_peers,
                rings: &[],
            };
        }
        let p = usize::from(partition_of(key));
        Holders {
            local: local.contains(p as u16),
            peers: &peers_of[p],
            rings: rings_of.get(p).map_or(&[], |rings| rings),
        }
    }

    /// The peers holding partition `p` to read, in preference order (this node left out).
    pub fn peers_of(&self, p: u16) -> &[u16] {
        &self.peers_of[usize::from(p)]
    }

    /// Partitions this node holds to read.
    pub fn local(&self) -> &PartitionSet {
        &self.local
    }

    /// Partitions this node takes writes of (and so keeps).
    pub fn write_local(&self) -> &PartitionSet {
        &self.write_local
    }

    /// The ring's fingerprint (see [`RingState::fingerprint`]).
    pub fn fingerprint(&self) -> Option<String> {
        self.state.fingerprint()
    }

    /// How many peers the placement was made for.
    pub fn peers(&self) -> usize {
        self.shared.len()
    }

    /// Partitions this node and peer `peer` both take writes of: what anti-entropy compares
    /// with it.
    pub fn shared_with(&self, peer: usize) -> PartitionSet {
        self.shared[peer]
    }
}

/// A ring's fingerprint as another node sent it: which ring, and how far its changes went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint<'a> {
    /// Copies, members and their hash.
    pub ring: &'a str,
    /// The ring's version and phase letter; `None` for a first ring.
    pub epoch: Option<&'a str>,
}

impl<'a> Fingerprint<'a> {
    pub fn parse(text: &'a str) -> Self {
        match text.split_once(".v") {
            Some((ring, epoch)) => Self {
                ring,
                epoch: Some(epoch),
            },
            None => Self {
                ring: text,
                epoch: None,
            },
        }
    }

    /// Whether two nodes disagree on the ring itself. Nodes at different points of a change
    /// hold different rings for a while, and that is no disagreement: each sends writes to
    /// every node that may need them. Nodes at the same point must hold the same ring, every
    /// ring has the same copies, and a node more than one version behind missed a change.
    pub fn conflicts_with(&self, other: &Fingerprint<'_>) -> bool {
        fn copies<'f>(f: &Fingerprint<'f>) -> Option<&'f str> {
            f.ring.split_once('x').map(|(c, _)| c)
        }
        let version = |f: &Fingerprint<'_>| -> Option<u64> {
            match f.epoch {
                None => Some(1),
                Some(e) => e.trim_end_matches(char::is_alphabetic).parse().ok(),
            }
        };
        let everywhere = |f: &Fingerprint<'_>| copies(f).is_none();
        if self.epoch == other.epoch {
            return self.ring != other.ring;
        }
        if everywhere(self) || everywhere(other) {
            // A first ring where every node holds every key, against one that changed: told
            // apart by versions alone.
            return version(self)
                .zip(version(other))
                .is_none_or(|(a, b)| a.abs_diff(b) > 1);
        }
        copies(self) != copies(other)
            || version(self)
                .zip(version(other))
                .is_none_or(|(a, b)| a.abs_diff(b) > 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("127.0.0.1:{}", 5000 + i)).collect()
    }

    #[test]
    fn partition_sets_round_trip_and_count() {
        let set: PartitionSet = [0, 1, 63, 64, 1023].into_iter().collect();
        assert_eq!(set.len(), 5);
        assert!(set.contains(63) && set.contains(64) && set.contains(1023));
        assert!(!set.contains(2) && !set.contains(1024));
        let bytes = set.to_bytes();
        assert_eq!(bytes.len(), PartitionSet::BYTES);
        assert_eq!(bytes[0], 0b11, "partition 0 in the lowest bit");
        assert_eq!(PartitionSet::from_bytes(&bytes).unwrap(), set);
        assert!(PartitionSet::from_bytes(&bytes[1..]).is_err());
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 1, 63, 64, 1023]);
        let other: PartitionSet = [1, 64, 500].into_iter().collect();
        assert_eq!(set.and(&other).iter().collect::<Vec<_>>(), [1, 64]);
        assert_eq!(set.minus(&other).iter().collect::<Vec<_>>(), [0, 63, 1023]);
        assert_eq!(
            set.or(&other).iter().collect::<Vec<_>>(),
            [0, 1, 63, 64, 500, 1023]
        );
        assert!(PartitionSet::all().is_all() && PartitionSet::all().len() == 1024);
        assert!(PartitionSet::none().is_empty() && !set.is_empty() && !set.is_all());
    }

    #[test]
    fn with_as_many_copies_as_nodes_every_node_holds_every_key() {
        let nodes = addrs(3);
        let p = Placement::bootstrap(&nodes[0], &nodes[1..], 3).unwrap();
        assert!(p.is_everywhere());
        let h = p.holders("any key");
        assert_eq!((h.local, h.peers), (true, &[0, 1][..]));
        assert!(p.local().is_all());
        assert!(p.shared_with(0).is_all() && p.shared_with(1).is_all());
        // More copies than nodes: the same.
        assert!(
            Placement::bootstrap(&nodes[0], &nodes[1..], 5)
                .unwrap()
                .is_everywhere()
        );
    }

    /// Six nodes, three copies: each node's own view agrees with the ring on every key, every
    /// key has three holders, and what two nodes share is what both hold.
    #[test]
    fn each_node_sees_the_same_three_holders_of_a_key() {
        let nodes = addrs(6);
        let placements: Vec<Placement> = (0..6)
            .map(|i| {
                let peers: Vec<String> = (nodes.iter().enumerate())
                    .filter(|(j, _)| *j != i)
                    .map(|(_, n)| n.clone())
                    .collect();
                Placement::bootstrap(&nodes[i], &peers, 3).unwrap()
            })
            .collect();
        assert!(!placements[0].is_everywhere());
        for k in 0..2000 {
            let key = format!("key{k}");
            let mut seen: Vec<Vec<String>> = Vec::new();
            let mut local = 0;
            for (i, p) in placements.iter().enumerate() {
                let peers: Vec<&String> = (nodes.iter().enumerate())
                    .filter(|(j, _)| *j != i)
                    .map(|(_, n)| n)
                    .collect();
                let h = p.holders(&key);
                local += usize::from(h.local);
                assert_eq!(h.nodes(), 3, "{key} on node {i}");
                let mut names: Vec<String> = (h.peers.iter())
                    .map(|&j| peers[usize::from(j)].clone())
                    .chain(h.local.then(|| nodes[i].clone()))
                    .collect();
                names.sort();
                seen.push(names);
            }
            assert_eq!(local, 3, "{key}: held by three nodes");
            assert!(seen.windows(2).all(|w| w[0] == w[1]), "{key}: {seen:?}");
            let mut ring: Vec<String> = (placements[0].ring().holders_of_key(&key))
                .map(String::from)
                .collect();
            ring.sort();
            assert_eq!(seen[0], ring);
        }
        // Node 0 and its first peer (node 1) share exactly the partitions both hold.
        let both = placements[0].local().and(placements[1].local());
        assert_eq!(placements[0].shared_with(0), both);
        assert!(!both.is_empty() && !both.is_all());
        // Half the partitions, give or take the copies.
        assert!((509..=515).contains(&placements[0].local().len()));
        // Spread: node 0 shares partitions with four of its five peers (all but the one
        // opposite it), not with the same two for every partition.
        let sharing = (0..5)
            .filter(|&i| !placements[0].shared_with(i).is_empty())
            .count();
        assert_eq!(sharing, 4);
    }

    #[test]
    fn nodes_of_one_ring_share_a_fingerprint_and_other_rings_do_not() {
        let nodes = addrs(6);
        let of = |i: usize, replicas: usize, nodes: &[String]| {
            let peers: Vec<String> = (nodes.iter().enumerate())
                .filter(|(j, _)| *j != i)
                .map(|(_, n)| n.clone())
                .collect();
            Placement::bootstrap(&nodes[i], &peers, replicas)
                .unwrap()
                .fingerprint()
        };
        let first = of(0, 3, &nodes).expect("a ring has one");
        assert!(first.starts_with("3x6-"), "{first}");
        assert!((1..6).all(|i| of(i, 3, &nodes).as_ref() == Some(&first)));
        assert_ne!(of(0, 2, &nodes).unwrap(), first, "other copies");
        let mut renamed = nodes.clone();
        renamed[4] = "localhost:5005".into();
        assert_ne!(
            of(0, 3, &renamed).unwrap(),
            first,
            "a member named otherwise"
        );
        assert_eq!(of(0, 6, &nodes), None, "every node holds everything");
    }

    /// A node that has left holds nothing, though every member of the ring holds every key;
    /// a joining node takes the writes of the partitions it gains before it reads them, and
    /// each write's holders are split by ring while the change is under way.
    #[test]
    fn a_node_outside_the_ring_holds_nothing_and_a_joining_one_takes_writes_first() {
        let nodes = addrs(4);
        let three = Ring::bootstrap(nodes[..3].to_vec(), 3).unwrap();
        let gone = Placement::of(RingState::settled(three.clone()), &nodes[3], &nodes[..3]);
        let gone = gone.unwrap();
        assert!(!gone.is_everywhere());
        assert!(!gone.holders("k").local && !gone.write_holders("k").local);
        assert_eq!(gone.holders("k").peers.len(), 3);

        let joining = RingState::settled(three.clone())
            .begin(three.with_joined(&nodes[3]).unwrap())
            .unwrap();
        let joiner = Placement::of(joining, &nodes[3], &nodes[..3]).unwrap();
        let key = (0..10_000)
            .map(|i| format!("key{i}"))
            .find(|k| joiner.write_holders(k).local)
            .expect("the joining node gains partitions");
        let (read, write) = (joiner.holders(&key), joiner.write_holders(&key));
        assert!(!read.local && read.peers.len() == 3, "{read:?}");
        assert_eq!(write.nodes(), 4);
        let rings: Vec<(bool, usize)> =
            (write.rings.iter()).map(|r| (r.local, r.nodes())).collect();
        assert_eq!(
            rings,
            [(true, 3), (false, 3)],
            "new ring first, then the old"
        );
    }

    #[test]
    fn a_ring_naming_a_node_that_is_not_a_peer_is_refused() {
        let nodes = addrs(4);
        let ring = Ring::bootstrap(nodes.clone(), 2).unwrap();
        let err = Placement::new(ring.clone(), &nodes[0], &nodes[1..3]).unwrap_err();
        assert!(err.to_string().contains(&nodes[3]), "{err}");
        let err = Placement::new(ring, "elsewhere:1", &nodes[1..]).unwrap_err();
        assert!(err.to_string().contains("not a member"), "{err}");
    }
}
