//! Hash slots: how keys are spread over stripes.
//!
//! A key's slot is CRC-16/XMODEM of its bytes modulo 16384 (the scheme Redis Cluster uses, so its
//! distribution is well known, and Redis Cluster clients compute the same slots). Hash tags follow
//! Redis Cluster too: when a key holds a `{` and, after it, a `}` with at least one byte between
//! them, only the bytes between the first `{` and the next `}` are hashed, so `{user7}.cart` and
//! `{user7}.orders` share a slot and a stripe (and a multi-key write can cover both).
//!
//! A config that names no stripe's `slots` splits the slots into equal contiguous ranges in stripe
//! order, so the same key always lands on the same stripe for a given config, on every client and
//! server. Once slots have moved between stripes (`ferrocotta array rebalance`) every stripe's
//! section names its [`SlotSet`] explicitly.

/// Number of hash slots.
pub const SLOT_COUNT: u16 = 16384;

/// CRC-16/XMODEM (polynomial 0x1021, initial value 0).
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key.
pub fn slot_of_key(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOT_COUNT
}

/// The part of a key that decides its slot: the hash tag when it has one, else the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    match key[open + 1..].iter().position(|&b| b == b'}') {
        Some(len) if len > 0 => &key[open + 1..open + 1 + len],
        _ => key,
    }
}

/// A half-open range of slots `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRange {
    /// First slot in the range.
    pub start: u16,
    /// One past the last slot.
    pub end: u16,
}

impl SlotRange {
    /// The slots of stripe `stripe` out of `stripes`.
    pub fn for_stripe(stripe: usize, stripes: usize) -> SlotRange {
        let n = SLOT_COUNT as usize;
        SlotRange {
            start: (stripe * n / stripes) as u16,
            end: ((stripe + 1) * n / stripes) as u16,
        }
    }

    /// Whether a slot is in this range.
    pub fn contains(&self, slot: u16) -> bool {
        slot >= self.start && slot < self.end
    }
}

/// The stripe owning a slot.
pub fn stripe_of_slot(slot: u16, stripes: usize) -> usize {
    // Inverse of `for_stripe`: the largest stripe whose start is <= slot.
    let n = SLOT_COUNT as usize;
    let guess = (slot as usize * stripes) / n;
    (guess..stripes)
        .take_while(|&s| SlotRange::for_stripe(s, stripes).start <= slot)
        .last()
        .unwrap_or(guess)
}

/// A set of slots, kept as sorted, disjoint, non-adjacent half-open ranges `[start, end)`: the
/// form it takes in config documents (`slots = [[0, 8192], [9000, 9100]]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "Vec<[u16; 2]>", into = "Vec<[u16; 2]>")]
pub struct SlotSet {
    ranges: Vec<[u16; 2]>,
}

impl SlotSet {
    /// No slot.
    pub fn empty() -> SlotSet {
        SlotSet::default()
    }

    /// The slots of one range.
    pub fn range(start: u16, end: u16) -> SlotSet {
        let mut s = SlotSet::empty();
        s.insert(start, end);
        s
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> &[[u16; 2]] {
        &self.ranges
    }

    /// Whether a slot is in the set.
    pub fn contains(&self, slot: u16) -> bool {
        let i = self.ranges.partition_point(|r| r[1] <= slot);
        self.ranges.get(i).is_some_and(|r| r[0] <= slot)
    }

    /// Whether every slot of `[start, end)` is in the set.
    pub fn contains_range(&self, start: u16, end: u16) -> bool {
        start >= end || self.ranges.iter().any(|r| r[0] <= start && end <= r[1])
    }

    /// Whether no slot of `[start, end)` is in the set.
    pub fn disjoint_from(&self, start: u16, end: u16) -> bool {
        self.ranges.iter().all(|r| r[1] <= start || end <= r[0])
    }

    /// How many slots it holds.
    pub fn len(&self) -> usize {
        self.ranges.iter().map(|r| (r[1] - r[0]) as usize).sum()
    }

    /// Whether it holds no slot.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Adds `[start, end)`.
    pub fn insert(&mut self, start: u16, end: u16) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        let mut kept = Vec::with_capacity(self.ranges.len() + 1);
        for r in &self.ranges {
            if r[1] < start || end < r[0] {
                kept.push(*r);
            } else {
                start = start.min(r[0]);
                end = end.max(r[1]);
            }
        }
        kept.push([start, end]);
        kept.sort();
        self.ranges = kept;
    }

    /// Takes `[start, end)` out.
    pub fn remove(&mut self, start: u16, end: u16) {
        if start >= end {
            return;
        }
        let mut kept = Vec::with_capacity(self.ranges.len() + 1);
        for r in &self.ranges {
            if r[1] <= start || end <= r[0] {
                kept.push(*r);
                continue;
            }
            if r[0] < start {
                kept.push([r[0], start]);
            }
            if end < r[1] {
                kept.push([end, r[1]]);
            }
        }
        self.ranges = kept;
    }

    /// Whether some slot is in both sets.
    pub fn overlaps(&self, other: &SlotSet) -> bool {
        other.ranges.iter().any(|r| !self.disjoint_from(r[0], r[1]))
    }

    /// Whether every slot of `other` is in the set.
    pub fn contains_set(&self, other: &SlotSet) -> bool {
        other.ranges.iter().all(|r| self.contains_range(r[0], r[1]))
    }

    /// Adds every slot of `other`.
    pub fn insert_set(&mut self, other: &SlotSet) {
        for r in &other.ranges {
            self.insert(r[0], r[1]);
        }
    }

    /// Takes every slot of `other` out.
    pub fn remove_set(&mut self, other: &SlotSet) {
        for r in &other.ranges {
            self.remove(r[0], r[1]);
        }
    }

    /// The first `count` slots of the set, counted from the end (the highest slots).
    pub fn last_slots(&self, count: usize) -> SlotSet {
        let mut out = SlotSet::empty();
        let mut left = count;
        for r in self.ranges.iter().rev() {
            if left == 0 {
                break;
            }
            let n = ((r[1] - r[0]) as usize).min(left);
            out.insert(r[1] - n as u16, r[1]);
            left -= n;
        }
        out
    }
}

impl TryFrom<Vec<[u16; 2]>> for SlotSet {
    type Error = String;

    fn try_from(ranges: Vec<[u16; 2]>) -> Result<SlotSet, String> {
        let mut set = SlotSet::empty();
        for [start, end] in ranges {
            if start >= end || end > SLOT_COUNT {
                return Err(format!(
                    "slot range [{start}, {end}] is empty or beyond {SLOT_COUNT} (ranges are [first, one past the last])"
                ));
            }
            if !set.disjoint_from(start, end) {
                return Err(format!("slot range [{start}, {end}] overlaps another"));
            }
            set.insert(start, end);
        }
        Ok(set)
    }
}

impl From<SlotSet> for Vec<[u16; 2]> {
    fn from(s: SlotSet) -> Vec<[u16; 2]> {
        s.ranges
    }
}

impl std::fmt::Display for SlotSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ranges.is_empty() {
            return write!(f, "none");
        }
        let parts: Vec<String> = self.ranges.iter().map(|r| format!("{}-{}", r[0], r[1] - 1)).collect();
        write!(f, "{}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_redis_reference() {
        // Redis Cluster spec: CRC16 of "123456789" is 0x31C3.
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn hash_tags_follow_the_redis_cluster_rule() {
        // Examples from the Redis Cluster specification.
        assert_eq!(hash_tag(b"{user1000}.following"), b"user1000");
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"no tag"), b"no tag");
        assert_eq!(hash_tag(b"open{only"), b"open{only");
        assert_eq!(slot_of_key(b"{user7}.cart"), slot_of_key(b"{user7}.orders"));
        // Known slots, as `CLUSTER KEYSLOT` reports them in Redis.
        assert_eq!(slot_of_key(b"foo"), 12182);
        assert_eq!(slot_of_key(b"{foo}bar"), 12182);
        assert_eq!(slot_of_key(b"hello"), 866);
    }

    #[test]
    fn every_slot_has_exactly_one_stripe() {
        for stripes in 1..=7 {
            for slot in 0..SLOT_COUNT {
                let s = stripe_of_slot(slot, stripes);
                assert!(
                    SlotRange::for_stripe(s, stripes).contains(slot),
                    "slot {slot} stripes {stripes}"
                );
            }
        }
    }

    #[test]
    fn slot_sets_merge_split_and_refuse_overlaps() {
        let mut s = SlotSet::range(0, 100);
        s.insert(100, 200);
        assert_eq!(s.ranges(), &[[0, 200]]);
        s.remove(50, 60);
        assert_eq!(s.ranges(), &[[0, 50], [60, 200]]);
        assert!(s.contains(49) && !s.contains(50) && !s.contains(59) && s.contains(60) && !s.contains(200));
        assert_eq!(s.len(), 190);
        assert!(s.contains_range(60, 200) && !s.contains_range(40, 70));
        assert_eq!(s.last_slots(150).ranges(), &[[40, 50], [60, 200]]);
        s.insert(50, 60);
        assert_eq!(s.ranges(), &[[0, 200]]);
        assert!(SlotSet::try_from(vec![[0, 10], [5, 20]]).is_err());
        assert!(SlotSet::try_from(vec![[0, 16385]]).is_err());
        assert!(SlotSet::try_from(vec![[3, 3]]).is_err());
        let text = toml::to_string(&std::collections::BTreeMap::from([("slots", SlotSet::range(7, 9))])).unwrap();
        assert_eq!(text.trim(), "slots = [[7, 9]]");
    }
}
