//! Hash slots: how keys are spread over stripes.
//!
//! A key's slot is CRC-16/XMODEM of its bytes modulo 16384 (the scheme Redis Cluster uses, so its
//! distribution is well known, and Redis Cluster clients compute the same slots). Hash tags follow
//! Redis Cluster too: when a key holds a `{` and, after it, a `}` with at least one byte between
//! them, only the bytes between the first `{` and the next `}` are hashed, so `{user7}.cart` and
//! `{user7}.orders` share a slot and a stripe (and a multi-key write can cover both). The slots are split into equal contiguous ranges in stripe order, so
//! the same key always lands on the same stripe for a given config, on every client and server.

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
}
