//! A cluster's ring as it changes: the ring in force, and while a node joins, the ring it
//! joins into, with the phase of the change.
//!
//! A change goes through three phases, each a new [`RingState`] that every node adopts in turn
//! (the order of states is their [`RingState::epoch`]):
//! 1. **Pending.** Reads go to the old ring's holders, which hold every acknowledged write;
//!    writes go to the holders of both rings (Cassandra's pending ranges), so a new holder
//!    misses nothing written from here on while it copies what was written before.
//! 2. **Committed.** Once the new holders have copied their partitions, reads go to the new
//!    ring. Writes still go to both, because a node that has not heard of the commit yet still
//!    reads from the old holders.
//! 3. **Settled.** Once every node has heard of the commit, only the new ring's holders take
//!    writes, and the old holders drop the partitions they no longer hold.

use crate::error::Error;
use crate::ring::Ring;

/// Where a ring change stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Pending = 0,
    Committed = 1,
    Settled = 2,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Committed => "committed",
            Self::Settled => "settled",
        }
    }
}

/// The ring in force and, during a change, the one before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingState {
    ring: Ring,
    /// The ring before the change, until it is settled.
    previous: Option<Ring>,
    phase: Phase,
}

/// First bytes of an encoded [`RingState`], so that anything else in its place (the data dir
/// file of an older build held a fingerprint) is told apart.
const MAGIC: &[u8; 8] = b"kvring1\n";

impl RingState {
    /// A ring with no change under way.
    pub fn settled(ring: Ring) -> Self {
        Self {
            ring,
            previous: None,
            phase: Phase::Settled,
        }
    }

    /// The state that begins the change from this ring to `next`.
    pub fn begin(&self, next: Ring) -> Result<Self, Error> {
        if self.phase != Phase::Settled {
            return Err(Error::Ring(format!(
                "a change to ring version {} is still {}",
                self.ring.version(),
                self.phase.name()
            )));
        }
        if next.version() != self.ring.version() + 1 {
            return Err(Error::Ring(format!(
                "ring version {} does not follow {}",
                next.version(),
                self.ring.version()
            )));
        }
        Ok(Self {
            ring: next,
            previous: Some(self.ring.clone()),
            phase: Phase::Pending,
        })
    }

    /// The next phase of the change under way; a settled state has none.
    pub fn advance(&self) -> Result<Self, Error> {
        let (phase, previous) = match self.phase {
            Phase::Pending => (Phase::Committed, self.previous.clone()),
            Phase::Committed => (Phase::Settled, None),
            Phase::Settled => {
                return Err(Error::Ring(format!(
                    "ring version {} has no change under way",
                    self.ring.version()
                )));
            }
        };
        Ok(Self {
            ring: self.ring.clone(),
            previous,
            phase,
        })
    }

    /// Calls off a pending change: the ring goes back to the one before it, under the next
    /// version, settled. Safe while pending only: reads still go to the old holders, and
    /// every write since the change began went to them too.
    pub fn abort(&self) -> Result<Self, Error> {
        match (self.phase, &self.previous) {
            (Phase::Pending, Some(previous)) => {
                Ok(Self::settled(previous.renumbered(self.ring.version() + 1)))
            }
            _ => Err(Error::Ring(format!(
                "the change to ring version {} is {}: only a pending change can be called off",
                self.ring.version(),
                self.phase.name()
            ))),
        }
    }

    /// The order of states: a node adopts a state only if its epoch is above its own.
    pub fn epoch(&self) -> (u64, Phase) {
        (self.ring.version(), self.phase)
    }

    /// The newest ring: the one in force once the change settles.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The ring before the change, while one is under way.
    pub fn previous(&self) -> Option<&Ring> {
        self.previous.as_ref()
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The ring reads go to: the old one until the change is committed.
    pub fn read_ring(&self) -> &Ring {
        match (self.phase, &self.previous) {
            (Phase::Pending, Some(previous)) => previous,
            _ => &self.ring,
        }
    }

    /// The rings whose holders take writes: both while a change is under way.
    pub fn write_rings(&self) -> impl Iterator<Item = &Ring> {
        std::iter::once(&self.ring).chain(self.previous.as_ref())
    }

    /// Every node of either ring, sorted.
    pub fn members(&self) -> Vec<String> {
        let mut members: Vec<String> = (self.write_rings())
            .flat_map(|r| r.members().iter().cloned())
            .collect();
        members.sort_unstable();
        members.dedup();
        members
    }

    /// The members that copy partitions before a change is committed: those that take
    /// partitions they did not hold in the ring before. When a node leaves (or is removed) a
    /// ring of no more members than copies, no one takes a partition it did not hold, but the
    /// copies lose one holder: then every member copies, so that each write a majority
    /// acknowledged, on the node that goes too, is on every holder that stays before it
    /// drops its keys. None when no change is under way.
    pub fn gaining(&self) -> Vec<String> {
        let Some(previous) = &self.previous else {
            return Vec::new();
        };
        let gaining: Vec<String> = (self.ring.members().iter())
            .filter(|m| {
                let before = previous.partitions_of(m);
                self.ring
                    .partitions_of(m)
                    .iter()
                    .any(|p| before.binary_search(p).is_err())
            })
            .cloned()
            .collect();
        if gaining.is_empty() && self.ring.members().len() < previous.members().len() {
            return self.ring.members().to_vec();
        }
        gaining
    }

    /// The node that makes changes: the first member of the ring in force, and during a
    /// change, the first member of both rings. One node deciding every change (Riak's
    /// claimant) is what keeps two changes from being made at once; a node that joins or
    /// leaves is never the claimant of its own change.
    pub fn claimant(&self) -> &str {
        self.deciders().next().expect("a ring has a member")
    }

    /// The members that may decide a change, in the order they would: those of both rings.
    pub fn deciders(&self) -> impl Iterator<Item = &str> {
        (self.ring.members().iter())
            .filter(|m| (self.previous.as_ref()).is_none_or(|p| p.members().contains(m)))
            .map(String::as_str)
    }

    /// What two nodes must agree on to compute the same ring: the copies of each key and the
    /// members, hashed, and after the first ring its version and the phase of its change;
    /// `None` for a first ring where every node holds every key, where there is nothing to
    /// agree on. Nodes exchange it on every call, so that two nodes given different
    /// `--replicas` or different names for one node find out at once (see
    /// [`crate::placement::Fingerprint`]).
    pub fn fingerprint(&self) -> Option<String> {
        let ring = &self.ring;
        let (version, phase) = self.epoch();
        if (version, phase) == (1, Phase::Settled) && ring.width() == ring.members().len() {
            return None;
        }
        let mut bytes = (ring.replicas() as u64).to_le_bytes().to_vec();
        for member in ring.members() {
            bytes.extend_from_slice(member.as_bytes());
            bytes.push(b'\n');
        }
        let hash = xxhash_rust::xxh3::xxh3_64(&bytes);
        let ring = format!("{}x{}-{hash:016x}", ring.replicas(), ring.members().len());
        Some(match (version, phase) {
            (1, Phase::Settled) => ring,
            (version, phase) => format!("{ring}.v{version}{}", &phase.name()[..1]),
        })
    }

    /// Its bytes, for the wire and the data dir: [`MAGIC`], the phase (one byte), the ring,
    /// and the previous ring while there is one.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(self.phase as u8);
        out.extend_from_slice(&self.ring.to_bytes());
        if let Some(previous) = &self.previous {
            out.extend_from_slice(&previous.to_bytes());
        }
        out
    }

    /// A state from [`RingState::to_bytes`], checked.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let bad = |what: &str| Error::Ring(format!("malformed ring state: {what}"));
        let rest = bytes.strip_prefix(MAGIC).ok_or_else(|| bad("not a ring"))?;
        let (&phase, rest) = rest.split_first().ok_or_else(|| bad("truncated"))?;
        let phase = match phase {
            0 => Phase::Pending,
            1 => Phase::Committed,
            2 => Phase::Settled,
            _ => return Err(bad("unknown phase")),
        };
        let (ring, rest) = Ring::from_bytes(rest)?;
        let (previous, rest) = match phase {
            Phase::Settled => (None, rest),
            _ => {
                let (previous, rest) = Ring::from_bytes(rest)?;
                if previous.version() + 1 != ring.version()
                    || previous.replicas() != ring.replicas()
                {
                    return Err(bad("the previous ring does not precede the ring"));
                }
                (Some(previous), rest)
            }
        };
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self {
            ring,
            previous,
            phase,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_of(n: usize) -> Ring {
        Ring::bootstrap((1..=n).map(|i| format!("node{i}")), 3).unwrap()
    }

    #[test]
    fn a_change_goes_pending_committed_settled_in_epoch_order() {
        let first = RingState::settled(ring_of(6));
        let next = first.ring().with_joined("node7").unwrap();
        let pending = first.begin(next.clone()).unwrap();
        let committed = pending.advance().unwrap();
        let settled = committed.advance().unwrap();
        assert!(first.epoch() < pending.epoch());
        assert!(pending.epoch() < committed.epoch());
        assert!(committed.epoch() < settled.epoch());
        assert!(settled.advance().is_err());
        assert!(pending.begin(next.clone()).is_err(), "one change at a time");
        assert!(
            settled
                .begin(first.ring().with_joined("node8").unwrap())
                .is_err(),
            "a change must follow the ring in force"
        );

        // Reads follow the old ring until the commit; writes go to both until settled.
        assert_eq!(pending.read_ring(), first.ring());
        assert_eq!(committed.read_ring(), &next);
        assert_eq!(pending.write_rings().count(), 2);
        assert_eq!(committed.write_rings().count(), 2);
        assert_eq!(settled.write_rings().collect::<Vec<_>>(), [&next]);
        assert_eq!(pending.members().len(), 7);
        assert_eq!(settled.claimant(), "node1");
        // A node joining ahead of the first member is not the claimant of its own join.
        let early = first
            .begin(first.ring().with_joined("node0").unwrap())
            .unwrap();
        assert_eq!(early.claimant(), "node1");
        assert_eq!(
            early.advance().unwrap().advance().unwrap().claimant(),
            "node0"
        );
        // Only the joining node takes partitions it did not hold.
        assert_eq!(pending.gaining(), ["node7"]);
        // A leave from three holding everything moves no partition, and loses a copy of each:
        // the two that stay copy, or the change would wait for a copy no one makes.
        let three = RingState::settled(ring_of(3));
        let shrink = three.begin(three.ring().without("node2").unwrap()).unwrap();
        assert_eq!(shrink.gaining(), ["node1", "node3"]);
        assert!(settled.gaining().is_empty());
        // A leave hands the leaver's partitions to several others.
        let leave = settled
            .begin(settled.ring().without("node3").unwrap())
            .unwrap();
        let gaining = leave.gaining();
        assert!(
            gaining.len() > 1 && !gaining.contains(&"node3".to_string()),
            "{gaining:?}"
        );
    }

    #[test]
    fn a_pending_change_is_called_off_back_to_the_ring_before_it() {
        let first = RingState::settled(ring_of(6));
        let pending = first
            .begin(first.ring().with_joined("node7").unwrap())
            .unwrap();
        let off = pending.abort().unwrap();
        assert_eq!(off.phase(), Phase::Settled);
        assert_eq!(
            off.ring().version(),
            3,
            "newer than the change it calls off"
        );
        assert!(off.epoch() > pending.epoch());
        assert_eq!(off.ring().members(), first.ring().members());
        for p in 0..crate::ring::PARTITIONS {
            assert!(
                off.ring().holders(p).eq(first.ring().holders(p)),
                "partition {p} moved"
            );
        }
        assert_eq!(off.ring().replicas(), first.ring().replicas());
        assert!(off.previous().is_none() && off.gaining().is_empty());
        // Once reads may have gone to the new holders, there is no going back.
        assert!(pending.advance().unwrap().abort().is_err());
        assert!(first.abort().is_err());
        // The next change follows it.
        assert!(off.begin(off.ring().with_joined("node8").unwrap()).is_ok());
    }

    #[test]
    fn states_round_trip_and_damage_is_refused() {
        let first = RingState::settled(ring_of(6));
        let pending = first
            .begin(first.ring().with_joined("node7").unwrap())
            .unwrap();
        for state in [&first, &pending, &pending.advance().unwrap()] {
            let bytes = state.to_bytes();
            assert_eq!(&RingState::from_bytes(&bytes).unwrap(), state);
            for cut in [0, 8, 9, 30, bytes.len() - 1] {
                assert!(
                    RingState::from_bytes(&bytes[..cut]).is_err(),
                    "cut at {cut}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(RingState::from_bytes(&longer).is_err());
        }
        // A partition held twice by one node.
        let mut bytes = first.to_bytes();
        let table = bytes.len() - 2 * 3 * usize::from(crate::ring::PARTITIONS);
        bytes[table + 2] = bytes[table];
        bytes[table + 3] = bytes[table + 1];
        let error = RingState::from_bytes(&bytes).unwrap_err().to_string();
        assert!(error.contains("holders"), "{error}");
        assert!(RingState::from_bytes(b"4x6-0123456789abcdef").is_err());
        // A previous ring that does not come just before the ring, or keeps other copies.
        let next = first.ring().with_joined("node7").unwrap();
        let other_copies = Ring::bootstrap((1..=6).map(|i| format!("node{i}")), 2).unwrap();
        for previous in [first.ring().with_joined("node8").unwrap(), other_copies] {
            let mut bytes = MAGIC.to_vec();
            bytes.push(Phase::Pending as u8);
            bytes.extend(next.to_bytes());
            bytes.extend(previous.to_bytes());
            let error = RingState::from_bytes(&bytes).unwrap_err().to_string();
            assert!(error.contains("does not precede"), "{error}");
        }
    }

    #[test]
    fn fingerprints_name_the_ring_and_after_the_first_its_version_and_phase() {
        let everywhere = RingState::settled(Ring::bootstrap(["a:1", "b:1", "c:1"], 3).unwrap());
        assert_eq!(everywhere.fingerprint(), None);
        let first = RingState::settled(ring_of(6));
        let ring = first.fingerprint().unwrap();
        assert!(ring.starts_with("3x6-") && !ring.contains(".v"), "{ring}");
        let pending = first
            .begin(first.ring().with_joined("node7").unwrap())
            .unwrap();
        assert_eq!(pending.previous(), Some(first.ring()));
        let committed = pending.advance().unwrap();
        let settled = committed.advance().unwrap();
        let seven = pending.fingerprint().unwrap();
        assert!(
            seven.starts_with("3x7-") && seven.ends_with(".v2p"),
            "{seven}"
        );
        assert!(committed.fingerprint().unwrap().ends_with(".v2c"));
        assert!(settled.fingerprint().unwrap().ends_with(".v2s"));
        assert_eq!(
            [pending.phase(), committed.phase(), settled.phase()].map(Phase::name),
            ["pending", "committed", "settled"]
        );
    }
}
