//! Where keys live: a fixed set of partitions, each held by a preference list of N distinct
//! nodes, and how that assignment changes when a node joins or leaves.
//!
//! Keys hash onto [`PARTITIONS`] partitions, as in Riak, rather than onto virtual nodes with
//! random tokens, as in Cassandra:
//! - balance comes from the assignment, not from chance: every node holds its exact share of
//!   partition copies, give or take one, at any cluster size (random tokens need hundreds per
//!   node to get within 10 %, and each is a range to stream and repair);
//! - a partition is the unit that moves, is repaired and is handed off, and every node names it
//!   the same way, so a change of the ring is a list of copies that move, nothing to split;
//! - the ring is small (a partition count times N node ids) and cheap to ship whole.
//!
//! A ring is a value: [`Ring::bootstrap`] makes the first one from the founding members, and
//! [`Ring::with_joined`] and [`Ring::without`] make the next one from it. Each step moves as
//! little as it can: a join moves copies only to the new node, about 1/M of all of them (it
//! takes its share from the nodes that hold the most), and a leave moves only the leaving
//! node's copies, each to the least-loaded node not already holding that partition. Every
//! step is deterministic, so nodes that apply the same changes to the same ring hold the same
//! ring; [`Ring::version`] counts the changes.

use std::collections::BTreeMap;

use crate::error::Error;

/// Partitions the key space is cut into. Fixed for the life of a cluster: every node must map
/// a key to the same partition. 1,024 keeps a partition's share of the keys small (under 0.1 %)
/// and the ring small, and is several times the largest cluster this is meant for, so that
/// every node still holds many partitions.
pub const PARTITIONS: u16 = 1024;

/// Seed of the partition hash, so that a key's partition and its anti-entropy bucket (the
/// same hash family, unseeded) are independent.
const PARTITION_SEED: u64 = 0x6b76_7374_6f72_6521;

/// The partition of `key`. xxh3 is specified and stable across builds and machines, which a
/// placement every node must agree on needs (std's hashers promise neither).
pub fn partition_of(key: &str) -> u16 {
    let hash = xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), PARTITION_SEED);
    (hash % u64::from(PARTITIONS)) as u16
}

/// Which nodes hold each partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    version: u64,
    /// N, as configured: copies of each partition, when there are that many nodes.
    replicas: usize,
    /// Node ids, sorted.
    members: Vec<String>,
    /// Partition `p`'s holders are `table[p * width..(p + 1) * width]`, indexes into `members`,
    /// all distinct.
    table: Vec<u16>,
    /// min(N, members): copies each partition has.
    width: usize,
}

impl Ring {
    /// The first ring of a cluster whose founding members are `members`, with `replicas`
    /// copies of each partition (every node holds everything when there are no more nodes
    /// than copies). Partition `p` goes to the N members from `p mod M` on, as a walk of the
    /// ring would give it: every member holds the same number of copies, give or take N, and
    /// the copies of one member's partitions are spread over the 2(N-1) members around it, so
    /// a dead member's load and its repair fall on several, not on the one group it would
    /// share with `(p * N + j) mod M` (two disjoint groups for six members and three copies).
    pub fn bootstrap(
        members: impl IntoIterator<Item = impl Into<String>>,
        replicas: usize,
    ) -> Result<Self, Error> {
        let mut members: Vec<String> = members.into_iter().map(Into::into).collect();
        members.sort_unstable();
        members.dedup();
        if members.is_empty() {
            return Err(Error::Ring("a ring needs at least one member".into()));
        }
        if replicas == 0 {
            return Err(Error::Ring("replicas must be at least 1".into()));
        }
        if members.len() > usize::from(u16::MAX) {
            return Err(Error::Ring(format!(
                "{} members; a ring holds at most {}",
                members.len(),
                u16::MAX
            )));
        }
        let m = members.len();
        let width = replicas.min(m);
        let table = (0..usize::from(PARTITIONS))
            .flat_map(|p| (0..width).map(move |j| ((p + j) % m) as u16))
            .collect();
        Ok(Self {
            version: 1,
            replicas,
            members,
            table,
            width,
        })
    }

    /// The ring after `node` joins. It takes its share of copies from the members holding the
    /// most, one copy at a time, never a partition it already holds; copies move to it and
    /// nowhere else. While there are no more members than N, it gets a copy of everything.
    pub fn with_joined(&self, node: &str) -> Result<Self, Error> {
        if self.members.iter().any(|m| m == node) {
            return Err(Error::Ring(format!("{node} is already a member")));
        }
        if self.members.len() >= usize::from(u16::MAX) {
            return Err(Error::Ring(format!(
                "the ring already holds {} members, its most",
                self.members.len()
            )));
        }
        let mut members = self.members.clone();
        members.push(node.to_owned());
        members.sort_unstable();
        let new = members.iter().position(|m| m == node).expect("just added") as u16;
        // Indexes at and after the new member's shift by one.
        let shift = |i: u16| if i >= new { i + 1 } else { i };
        let old_table: Vec<u16> = self.table.iter().map(|&i| shift(i)).collect();
        let mut next = Self {
            version: self.version + 1,
            replicas: self.replicas,
            members,
            table: old_table,
            width: self.width,
        };
        if self.width < self.replicas {
            // Fewer members than copies: the new member holds every partition too.
            next.width += 1;
            next.table = (0..usize::from(PARTITIONS))
                .flat_map(|p| {
                    let held = &next.table[p * self.width..(p + 1) * self.width];
                    held.iter().copied().chain(std::iter::once(new))
                })
                .collect();
            return Ok(next);
        }
        let mut loads = next.loads_by_index();
        let target = next.table.len() / next.members.len();
        // Which of a donor's partitions goes makes no difference to balance: keys hash onto
        // partitions, so neighbouring partitions are not neighbouring keys.
        while loads[usize::from(new)] < target {
            let donor = (0..next.members.len())
                .filter(|&i| i != usize::from(new))
                .max_by_key(|&i| (loads[i], std::cmp::Reverse(i)))
                .expect("a ring that takes a join has another member")
                as u16;
            let p = (0..usize::from(PARTITIONS))
                .find(|&p| {
                    let held = next.holders_by_index(p as u16);
                    held.contains(&donor) && !held.contains(&new)
                })
                .expect("the most loaded member holds a partition the new one does not");
            let slot = next
                .holders_by_index(p as u16)
                .iter()
                .position(|&i| i == donor);
            next.table[p * next.width + slot.expect("found above")] = new;
            loads[usize::from(donor)] -= 1;
            loads[usize::from(new)] += 1;
        }
        Ok(next)
    }

    /// The ring after `node` leaves (or is removed for good). Each of its copies goes to the
    /// least-loaded member that does not hold that partition yet; nothing else moves. Once there
    /// are no more members than N, the partitions just lose that copy.
    pub fn without(&self, node: &str) -> Result<Self, Error> {
        let Some(gone) = self.members.iter().position(|m| m == node) else {
            return Err(Error::Ring(format!("{node} is not a member")));
        };
        if self.members.len() == 1 {
            return Err(Error::Ring(format!("{node} is the ring's last member")));
        }
        let gone = gone as u16;
        let members: Vec<String> = (self.members.iter())
            .filter(|m| *m != node)
            .cloned()
            .collect();
        let shift = |i: u16| if i > gone { i - 1 } else { i };
        if members.len() < self.width {
            let width = self.width - 1;
            let table = (self.table.chunks(self.width))
                .flat_map(|held| held.iter().filter(|&&i| i != gone).map(|&i| shift(i)))
                .collect();
            return Ok(Self {
                version: self.version + 1,
                replicas: self.replicas,
                members,
                table,
                width,
            });
        }
        let mut next = self.clone();
        next.version += 1;
        let mut loads = next.loads_by_index();
        for p in 0..PARTITIONS {
            let held = next.holders_by_index(p);
            let Some(slot) = held.iter().position(|&i| i == gone) else {
                continue;
            };
            let heir = (0..next.members.len() as u16)
                .filter(|i| *i != gone && !held.contains(i))
                .min_by_key(|&i| (loads[usize::from(i)], i))
                .expect("more members than copies leaves one that does not hold p");
            next.table[usize::from(p) * next.width + slot] = heir;
            loads[usize::from(heir)] += 1;
        }
        next.members = members;
        next.table = next.table.iter().map(|&i| shift(i)).collect();
        Ok(next)
    }

    /// The same placement under `version`: what a change that is called off goes back to, as
    /// a newer ring than the one it was going to.
    pub fn renumbered(&self, version: u64) -> Self {
        Self {
            version,
            ..self.clone()
        }
    }

    /// Its bytes, for the wire and the data dir: what [`Ring::from_bytes`] reads back.
    /// Little-endian: version (u64), replicas (u32), width (u32), member count (u32), each
    /// member as a length (u32) and UTF-8, then the table, a u16 per copy.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.table.len() * 2);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.replicas as u32).to_le_bytes());
        out.extend_from_slice(&(self.width as u32).to_le_bytes());
        out.extend_from_slice(&(self.members.len() as u32).to_le_bytes());
        for member in &self.members {
            out.extend_from_slice(&(member.len() as u32).to_le_bytes());
            out.extend_from_slice(member.as_bytes());
        }
        for slot in &self.table {
            out.extend_from_slice(&slot.to_le_bytes());
        }
        out
    }

    /// A ring from [`Ring::to_bytes`], checked as thoroughly as one made here: sorted, distinct
    /// members, and every partition held by `width` distinct members. Returns the ring and the
    /// bytes after it.
    pub fn from_bytes(bytes: &[u8]) -> Result<(Self, &[u8]), Error> {
        let bad = |what: &str| Error::Ring(format!("malformed ring: {what}"));
        let mut rest = bytes;
        let mut take = |n: usize| -> Result<&[u8], Error> {
            if rest.len() < n {
                return Err(bad("truncated"));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
        let version = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        let replicas = u32_at(take(4)?);
        let width = u32_at(take(4)?);
        let count = u32_at(take(4)?);
        if count == 0 || count > usize::from(u16::MAX) {
            return Err(bad("member count"));
        }
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            let len = u32_at(take(4)?);
            let name = std::str::from_utf8(take(len)?).map_err(|_| bad("member not UTF-8"))?;
            members.push(name.to_owned());
        }
        if replicas == 0 || width != replicas.min(count) || version == 0 {
            return Err(bad("copies"));
        }
        if !members.windows(2).all(|w| w[0] < w[1]) {
            return Err(bad("members not sorted and distinct"));
        }
        let table_bytes = take(usize::from(PARTITIONS) * width * 2)?;
        let table: Vec<u16> = (table_bytes.chunks_exact(2))
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        for held in table.chunks(width) {
            if held.iter().any(|&i| usize::from(i) >= count)
                || (1..held.len()).any(|j| held[..j].contains(&held[j]))
            {
                return Err(bad("a partition's holders"));
            }
        }
        Ok((
            Self {
                version,
                replicas,
                members,
                table,
                width,
            },
            rest,
        ))
    }

    /// How many changes made this ring (the first ring is version 1).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// N, as configured.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Copies each partition has now: N, or every member when there are fewer.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The members' node ids, sorted.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// The nodes that hold partition `p`, in preference order.
    pub fn holders(&self, p: u16) -> impl Iterator<Item = &str> {
        (self.holders_by_index(p).iter()).map(|&i| self.members[usize::from(i)].as_str())
    }

    /// The nodes that hold `key`, in preference order.
    pub fn holders_of_key(&self, key: &str) -> impl Iterator<Item = &str> {
        self.holders(partition_of(key))
    }

    /// Whether `node` holds partition `p`.
    pub fn holds(&self, node: &str, p: u16) -> bool {
        self.holders(p).any(|h| h == node)
    }

    /// The partitions `node` holds a copy of, in order.
    pub fn partitions_of(&self, node: &str) -> Vec<u16> {
        (0..PARTITIONS).filter(|&p| self.holds(node, p)).collect()
    }

    /// Copies each member holds, by node id.
    pub fn loads(&self) -> BTreeMap<&str, usize> {
        (self.members.iter().map(String::as_str))
            .zip(self.loads_by_index())
            .collect()
    }

    fn holders_by_index(&self, p: u16) -> &[u16] {
        let p = usize::from(p);
        &self.table[p * self.width..(p + 1) * self.width]
    }

    fn loads_by_index(&self) -> Vec<usize> {
        let mut loads = vec![0; self.members.len()];
        for &i in &self.table {
            loads[usize::from(i)] += 1;
        }
        loads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("node{i:03}")).collect()
    }

    /// Copies that changed holder between two rings, as (partition, from, to).
    fn moves<'a>(before: &'a Ring, after: &'a Ring) -> Vec<(u16, &'a str, &'a str)> {
        let mut moved = Vec::new();
        for p in 0..PARTITIONS {
            let old: Vec<&str> = before.holders(p).collect();
            let new: Vec<&str> = after.holders(p).collect();
            for o in old.iter().filter(|o| !new.contains(o)) {
                for n in new.iter().filter(|n| !old.contains(n)) {
                    moved.push((p, *o, *n));
                }
            }
            assert!(
                new.len() >= old.len() || old.len() - new.len() == 1,
                "partition {p} lost more than one copy"
            );
        }
        moved
    }

    /// Checks what every ring must hold: each partition held by `width` distinct members, and
    /// no member holding more than 1.1x the mean (or one copy more, when the mean is small).
    fn check(ring: &Ring) {
        assert_eq!(ring.width(), ring.replicas().min(ring.members().len()));
        for p in 0..PARTITIONS {
            let mut held: Vec<&str> = ring.holders(p).collect();
            assert_eq!(held.len(), ring.width(), "partition {p}");
            held.sort_unstable();
            held.dedup();
            assert_eq!(held.len(), ring.width(), "partition {p} holds a node twice");
        }
        let loads = ring.loads();
        assert_eq!(
            loads.keys().copied().collect::<Vec<_>>(),
            ring.members()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            loads.values().sum::<usize>(),
            usize::from(PARTITIONS) * ring.width()
        );
        if let Some((node, &load)) = loads.iter().next() {
            assert_eq!(ring.partitions_of(node).len(), load);
        }
        let mean = (usize::from(PARTITIONS) * ring.width()) as f64 / loads.len() as f64;
        let max = *loads.values().max().unwrap() as f64;
        assert!(
            max <= (mean * 1.1).max(mean.ceil()),
            "{} members: the largest holds {max} copies, the mean is {mean:.1}",
            loads.len()
        );
    }

    #[test]
    fn keys_spread_evenly_over_the_partitions() {
        let mut counts = vec![0u32; usize::from(PARTITIONS)];
        let keys = 1_024_000;
        for i in 0..keys {
            counts[usize::from(partition_of(&format!("key-{i:012}")))] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        // 1,000 keys per partition on average; a fair hash stays within about 5 deviations.
        assert!(*min > 850 && *max < 1150, "partition sizes {min}..{max}");
        assert_eq!(partition_of("name"), partition_of(&String::from("name")));
        // A key's holders are its partition's.
        let ring = Ring::bootstrap(names(10), 3).unwrap();
        for key in ["name", "a", "key-000000000007"] {
            let holders: Vec<&str> = ring.holders_of_key(key).collect();
            assert_eq!(holders, ring.holders(partition_of(key)).collect::<Vec<_>>());
            assert_eq!(holders.len(), 3);
            assert!(
                holders
                    .iter()
                    .all(|h| ring.members().iter().any(|m| m == h))
            );
        }
    }

    #[test]
    fn a_first_ring_is_the_same_whatever_order_its_members_come_in() {
        let a = Ring::bootstrap(["c", "a", "b"], 3).unwrap();
        let b = Ring::bootstrap(["b", "c", "a", "a"], 3).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.members(), ["a", "b", "c"]);
        assert_eq!(a.version(), 1);
    }

    #[test]
    fn with_no_more_nodes_than_copies_every_node_holds_everything() {
        for (m, n) in [(1, 3), (2, 3), (3, 3), (3, 5)] {
            let ring = Ring::bootstrap(names(m), n).unwrap();
            check(&ring);
            for node in names(m) {
                assert_eq!(ring.partitions_of(&node).len(), usize::from(PARTITIONS));
            }
        }
        // Growing from one node to N: each newcomer gets a copy of everything, no one loses any.
        let mut ring = Ring::bootstrap(["n1"], 3).unwrap();
        for node in ["n2", "n3"] {
            let next = ring.with_joined(node).unwrap();
            assert!(
                moves(&ring, &next).is_empty(),
                "copies are added, none moved"
            );
            assert_eq!(next.partitions_of(node).len(), usize::from(PARTITIONS));
            check(&next);
            ring = next;
        }
        // And back down: the partitions lose that copy, and nothing moves.
        let down = ring.without("n2").unwrap();
        check(&down);
        assert_eq!(down.version(), ring.version() + 1);
        assert!(moves(&ring, &down).is_empty());
        assert_eq!(down.width(), 2);
    }

    #[test]
    fn first_rings_of_3_to_100_nodes_are_balanced() {
        for m in 3..=100 {
            for n in [1, 3, 5] {
                check(&Ring::bootstrap(names(m), n).unwrap());
            }
        }
    }

    #[test]
    fn a_join_moves_about_one_mth_of_the_copies_all_to_the_new_node() {
        let mut ring = Ring::bootstrap(names(3), 3).unwrap();
        for m in 4..=100 {
            let node = format!("node{m:03}");
            let next = ring.with_joined(&node).unwrap();
            check(&next);
            let moved = moves(&ring, &next);
            assert!(moved.iter().all(|&(_, _, to)| to == node), "only to {node}");
            let total = usize::from(PARTITIONS) * 3;
            assert_eq!(moved.len(), total / m, "{m} members");
            assert_eq!(next.version(), ring.version() + 1);
            ring = next;
        }
    }

    #[test]
    fn a_leave_moves_only_the_leavers_copies_and_keeps_the_balance() {
        let mut ring = Ring::bootstrap(names(60), 3).unwrap();
        // Leave from the middle, the ends, and down to N members, checking each step.
        for node in ["node030", "node001", "node060", "node045"] {
            let next = ring.without(node).unwrap();
            check(&next);
            let moved = moves(&ring, &next);
            assert_eq!(moved.len(), ring.partitions_of(node).len());
            assert!(moved.iter().all(|&(_, from, _)| from == node));
            assert!(!next.members().iter().any(|m| m == node));
            assert_eq!(next.version(), ring.version() + 1);
            ring = next;
        }
        while ring.members().len() > 3 {
            let node = ring.members()[ring.members().len() / 2].clone();
            ring = ring.without(&node).unwrap();
            check(&ring);
        }
    }

    #[test]
    fn joins_and_leaves_in_turn_stay_balanced() {
        let mut ring = Ring::bootstrap(names(6), 3).unwrap();
        for round in 0..40 {
            let node = format!("extra{round:02}");
            ring = ring.with_joined(&node).unwrap();
            check(&ring);
            // Take out an older member each time, so the ring keeps changing hands.
            let old = ring.members()[round % ring.members().len()].clone();
            ring = ring.without(&old).unwrap();
            check(&ring);
        }
    }

    #[test]
    fn the_share_of_keys_follows_the_share_of_copies() {
        let mut per_partition = vec![0usize; usize::from(PARTITIONS)];
        for i in 0..200_000 {
            per_partition[usize::from(partition_of(&format!("user:{i}")))] += 1;
        }
        let mut ring = Ring::bootstrap(names(3), 3).unwrap();
        for m in 4..=100 {
            ring = ring.with_joined(&format!("node{m:03}")).unwrap();
            if m % 8 != 0 && m != 100 {
                continue;
            }
            let held: Vec<usize> = (ring.members().iter())
                .map(|node| {
                    let parts = ring.partitions_of(node);
                    parts.iter().map(|&p| per_partition[usize::from(p)]).sum()
                })
                .collect();
            let mean = held.iter().sum::<usize>() as f64 / m as f64;
            let max = *held.iter().max().unwrap() as f64;
            assert!(
                max <= 1.1 * mean,
                "{m} nodes: the largest holds {max} keys, mean {mean:.0}"
            );
        }
    }

    #[test]
    fn bad_changes_are_refused_naming_the_node() {
        let ring = Ring::bootstrap(["a", "b"], 3).unwrap();
        let err = |r: Result<Ring, Error>| r.unwrap_err().to_string();
        assert!(err(ring.with_joined("a")).contains("a is already a member"));
        assert!(err(ring.without("z")).contains("z is not a member"));
        let one = ring.without("a").unwrap();
        assert!(err(one.without("b")).contains("last member"));
        assert!(err(Ring::bootstrap(Vec::<String>::new(), 3)).contains("at least one member"));
        assert!(err(Ring::bootstrap(["a"], 0)).contains("at least 1"));
        // Member indexes are 16 bits: the largest ring fits, one more member does not.
        let most = Ring::bootstrap(names(usize::from(u16::MAX)), 1).unwrap();
        assert!(err(most.with_joined("one-more")).contains("its most"));
        assert!(err(Ring::bootstrap(names(usize::from(u16::MAX) + 1), 1)).contains("at most"));
    }
}
