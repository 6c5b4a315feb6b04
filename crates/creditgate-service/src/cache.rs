//! The node's caches of records it read from the store (keys and root keys by secret
//! hash, rate-limit overrides by namespace, recent refusals by account): a map with a
//! time to live and a bound on its size, split in shards so that the two workers rarely
//! wait on one lock.
//!
//! It replaces a general cache library (moka) that cost about 5 % of an embedded node's
//! CPU samples under load (`perf`, 1,000 keys) and about 2.9k instructions per
//! verification (callgrind; about 0.6k with this map): two lookups per verification,
//! each recording the read for its eviction policy, and that policy's upkeep. Nothing here needs
//! such a policy: an entry lives `ttl` at most, a write on this node or another node's
//! invalidation drops it at once, and an entry dropped early is read again from the
//! store. So a full shard first drops its expired entries (walking them at most once per
//! tenth of the time to live) and then, if it is still full, any entry.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::{Arc, PoisonError, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

const SHARDS: usize = 16;

/// Values by string key, each for at most `ttl` after its insertion. Cloning shares the
/// cache.
pub(crate) struct TtlCache<V> {
    inner: Arc<Inner<V>>,
}

impl<V> Clone for TtlCache<V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<V> {
    shards: [RwLock<Shard<V>>; SHARDS],
    ttl: Duration,
    per_shard: usize,
    hasher: Seeded,
}

struct Shard<V> {
    map: HashMap<String, Entry<V>, Seeded>,
    /// When this shard last dropped its expired entries.
    swept: Option<Instant>,
}

struct Entry<V> {
    value: V,
    expires: Instant,
}

impl<V: Clone> TtlCache<V> {
    /// A cache of at most about `capacity` entries (rounded up to a multiple of the
    /// shard count), each kept at most `ttl`.
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        let hasher = Seeded::new();
        Self {
            inner: Arc::new(Inner {
                shards: std::array::from_fn(|_| {
                    RwLock::new(Shard {
                        map: HashMap::with_hasher(hasher),
                        swept: None,
                    })
                }),
                ttl,
                per_shard: capacity.div_ceil(SHARDS).max(1),
                hasher,
            }),
        }
    }

    fn shard(&self, key: &str) -> &RwLock<Shard<V>> {
        &self.inner.shards[shard_of(self.inner.hasher.hash_one(key))]
    }

    fn write(&self, key: &str) -> RwLockWriteGuard<'_, Shard<V>> {
        // A panic while holding the lock cannot leave the map half-changed (each
        // change is one map call): keep serving.
        self.shard(key)
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The value under `key`, unless it is absent or older than the time to live.
    pub(crate) fn get(&self, key: &str) -> Option<V> {
        let shard = self
            .shard(key)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = shard.map.get(key)?;
        (Instant::now() < entry.expires).then(|| entry.value.clone())
    }

    /// Puts `value` under `key` for the time to live, replacing what was there.
    pub(crate) fn insert(&self, key: String, value: V) {
        let now = Instant::now();
        let ttl = self.inner.ttl;
        let mut shard = self.write(&key);
        if shard.map.len() >= self.inner.per_shard && !shard.map.contains_key(&key) {
            // Dropping the expired entries walks the whole shard: at most once per tenth
            // of the time to live, so that a shard full of live entries (more keys in use
            // than the bound) does not walk itself on every insert.
            let due = match shard.swept {
                Some(at) => now.duration_since(at) >= ttl / 10,
                None => true,
            };
            if due {
                shard.map.retain(|_, e| now < e.expires);
                shard.swept = Some(now);
            }
            if shard.map.len() >= self.inner.per_shard {
                if let Some(any) = shard.map.keys().next().cloned() {
                    shard.map.remove(&any);
                }
            }
        }
        shard.map.insert(
            key,
            Entry {
                value,
                expires: now + ttl,
            },
        );
    }

    /// Forgets `key`.
    pub(crate) fn invalidate(&self, key: &str) {
        self.write(key).map.remove(key);
    }

    /// Forgets everything.
    pub(crate) fn invalidate_all(&self) {
        for shard in &self.inner.shards {
            shard
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .map
                .clear();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }
}

/// The shard of a hash: bits the map's own use of the hash leaves alone (it takes the
/// low bits for the bucket and the top seven as a tag).
fn shard_of(hash: u64) -> usize {
    (hash >> 40) as usize % SHARDS
}

/// A fast keyed hash: a multiply-and-rotate over 8-byte words, from a seed drawn per
/// cache. The keys are mostly SHA-256 digests in hex (uniform, not chosen by a client);
/// the others are names an authenticated caller chose, in caches of bounded size. The
/// standard SipHash cost about as much per lookup as the rest of the lookup.
#[derive(Clone, Copy)]
struct Seeded {
    seed: u64,
}

impl Seeded {
    fn new() -> Self {
        Self {
            seed: RandomState::new().hash_one(0u8),
        }
    }
}

impl BuildHasher for Seeded {
    type Hasher = WordHasher;

    fn build_hasher(&self) -> WordHasher {
        WordHasher { h: self.seed }
    }
}

struct WordHasher {
    h: u64,
}

const K: u64 = 0x517c_c1b7_2722_0a95;

impl WordHasher {
    fn word(&mut self, w: u64) {
        self.h = (self.h.rotate_left(5) ^ w).wrapping_mul(K);
    }
}

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        // The length first, so that inputs padded to the same words differ.
        self.word(bytes.len() as u64);
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.word(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.word(u64::from(i));
    }

    fn finish(&self) -> u64 {
        // Spread every input bit over the low bits (buckets), the middle (shard) and
        // the top (the map's tag).
        let h = self.h;
        (h ^ (h >> 29)).wrapping_mul(K) ^ (h >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_until_the_time_to_live_then_forgets() {
        let cache = TtlCache::new(100, Duration::from_millis(50));
        cache.insert("a".into(), 1);
        assert_eq!(cache.get("a"), Some(1));
        assert_eq!(cache.get("b"), None);
        cache.insert("a".into(), 2);
        assert_eq!(cache.get("a"), Some(2), "an insert replaces");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get("a"), None, "expired");
    }

    #[test]
    fn invalidation_forgets_at_once() {
        let cache = TtlCache::new(100, Duration::from_secs(60));
        cache.insert("a".into(), 1);
        cache.insert("b".into(), 2);
        cache.invalidate("a");
        assert_eq!(cache.get("a"), None);
        assert_eq!(cache.get("b"), Some(2));
        let shared = cache.clone();
        shared.invalidate_all();
        assert_eq!(cache.get("b"), None, "clones share the cache");
    }

    #[test]
    fn stays_within_its_bound_and_keeps_the_newest() {
        let cache = TtlCache::new(64, Duration::from_secs(60));
        for i in 0..10_000 {
            cache.insert(format!("{i:064x}"), i);
            // What was just inserted is always there.
            assert_eq!(cache.get(&format!("{i:064x}")), Some(i));
        }
        assert!(cache.len() <= 64, "{} entries", cache.len());
        assert!(cache.len() >= 32, "the shards fill evenly: {}", cache.len());
    }

    #[test]
    fn a_full_shard_drops_expired_entries_first() {
        let cache = TtlCache::new(SHARDS, Duration::from_millis(30));
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
        // Find two keys of one shard.
        let h = |k: &str| shard_of(cache.inner.hasher.hash_one(k));
        let first = &keys[0];
        let second = keys[1..].iter().find(|k| h(k) == h(first)).unwrap();
        cache.insert(first.clone(), 1);
        std::thread::sleep(Duration::from_millis(40));
        cache.insert(second.clone(), 2);
        assert_eq!(cache.get(second), Some(2));
        assert_eq!(cache.len(), 1, "the expired entry made room");
    }

    #[test]
    fn a_full_shard_walks_its_entries_at_most_once_per_tenth_of_the_time_to_live() {
        let cache = TtlCache::new(SHARDS, Duration::from_secs(60));
        let shard = |k: &str| shard_of(cache.inner.hasher.hash_one(k));
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
        let same: Vec<&String> = keys
            .iter()
            .filter(|k| shard(k) == shard(&keys[0]))
            .collect();
        assert!(same.len() >= 3);
        let swept = || cache.inner.shards[shard(same[0])].read().unwrap().swept;
        cache.insert(same[0].clone(), 0);
        assert_eq!(swept(), None, "not full yet");
        cache.insert(same[1].clone(), 1);
        let first = swept().expect("the first insert into a full shard walks it");
        cache.insert(same[2].clone(), 2);
        assert_eq!(
            swept(),
            Some(first),
            "not again within a tenth of the time to live"
        );
        assert_eq!(cache.get(same[2]), Some(2), "the newest is kept");
        assert_eq!(cache.len(), 1, "one entry per shard");
    }

    #[test]
    fn the_hash_depends_on_every_byte_and_the_length() {
        let s = Seeded::new();
        let base = "0123456789abcdef0123456789abcdef";
        let h0 = s.hash_one(base);
        for i in 0..base.len() {
            let mut b = base.as_bytes().to_vec();
            b[i] ^= 1;
            assert_ne!(s.hash_one(std::str::from_utf8(&b).unwrap()), h0, "byte {i}");
        }
        assert_ne!(s.hash_one("ab"), s.hash_one("ab\0"));
    }
}
