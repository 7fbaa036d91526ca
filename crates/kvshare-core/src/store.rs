//! The bounded block store: byte-capped, concurrent, LRU over chain tails, chain-aware.
//!
//! # Why our own store
//!
//! We index blocks in a hash map plus an ordered set of evictable blocks behind one mutex, with a
//! concurrent read index beside it (below), rather than use a cache crate or a sharded map:
//! - moka's TinyLFU admission refuses freshly pushed blocks once the cache is full (200 of 200
//!   refused in our check) and its weighted size lags until maintenance runs, so capacity is not
//!   a hard limit at every instant. Both are wrong for a KV tier: a new prefix must be admitted,
//!   and the cap must hold under concurrent puts.
//! - quick_cache is S3-FIFO, not the LRU the user asked for, and foyer's LRU cannot evict chain
//!   tails before their parents, which we need: a lookup stops at the first missing block, so a
//!   chain whose head is gone is dead weight.
//! - A sharded map (dashmap) gives per-shard recency and per-shard budgets, so neither global LRU
//!   order nor a global hard cap would hold.
//!
//! Writers (insert, remove, eviction) take one mutex around O(log n) operations (a few hundred
//! ns, no I/O and no allocation of payloads under the lock); payloads are `Bytes` shared with the
//! network layer, never copied.
//!
//! # Reads do not take the lock
//!
//! Lookups and gets read a concurrent index (`dashmap`, key to block) that writers update in the
//! same critical section as the LRU structures, so a 2,048-key Lookup never waits for inserts
//! and evictions and never makes them wait. What a read must change, the recency of its hits, is
//! recorded in a bounded read buffer and applied to the LRU order in batches under the lock
//! (Caffeine's read-buffer technique): by a maintenance task ([`BlockStore::apply_buffered_reads`],
//! which the node runs every few milliseconds, in batches so writers never wait long) and by
//! the next writer, which drains the buffer before it evicts. Readers never take the lock; a
//! read that finds the buffer full drops its recency record (the buffer is lossy, as Caffeine's
//! is: memory stays bounded, and the hard cap and tail-first order never depend on it).
//!
//! # Eviction rule
//!
//! The victim is **the least recently used block that has no stored children**. Every block
//! carries a recency tick (bumped on insert and on every hit) and a count of the blocks stored
//! with it as their parent. Blocks whose count is zero (leaves) sit in an ordered set keyed by
//! tick; eviction takes the smallest. When a leaf goes and its parent's count drops to zero, the
//! parent becomes a leaf at its own (older) tick, so a chain is eaten from its tail towards its
//! head, and a chain head is never evicted while a longer prefix of it is stored here.
//!
//! A child remembers its parent by key and by the parent's unique insertion id: after an explicit
//! delete orphans the children of a block (they stay stored, counted nowhere), a new block stored
//! later under the same key does not inherit them.
//!
//! # Complexity
//!
//! Whatever the shape of the chains (one chain of 262,000 blocks, or a star of 100,000 children
//! of one parent): insert, remove and each evicted block cost O(log n); lookups and gets
//! O(k log n) for k keys, of which only the k index probes happen on the reader's thread.
//! Nothing walks a chain or a list of children.
//!
//! # Guarantees
//! - `used_bytes() <= capacity()` at every instant: room is made (by eviction) before a block is
//!   charged, inside the same critical section. The one exception is a capacity change:
//!   [`BlockStore::set_capacity`] lowers the cap at once and evicts down to it in batches of
//!   [`SHRINK_BATCH_BLOCKS`], releasing the lock between batches so requests keep being served.
//!   Until it returns, stored bytes may exceed the new cap but never grow (an insert evicts at
//!   least what it adds); once it returns, the cap holds again for every later insert.
//! - Tails before parents (above); among leaves, least recently used first.
//! - A block handed out by [`BlockStore::get`] is an `Arc`: eviction drops the index entry, and
//!   the bytes live until the last reader (a streaming Get) is done.
//! - Per-namespace usage lives in a concurrent map updated inside the same critical section as
//!   the index, so [`BlockStore::stats`] reads it without holding the store's lock; a namespace's
//!   entry (and its hit count) is dropped as soon as it has no stored block.
//!
//! # Tenants and quotas
//!
//! Every block belongs to a tenant ([`TenantId`], a small id the store hands out per tenant
//! name, [`BlockStore::tenant_id`]; id 0 is [`DEFAULT_TENANT`]). Per-tenant usage (blocks,
//! bytes, hits, evictions) is kept like per-namespace usage. A tenant may have a quota
//! ([`BlockStore::set_quota`]): then the store also keeps that tenant's leaves in their own
//! ordered set, and an insert that would take the tenant over its quota first evicts the
//! tenant's own least recently used leaves (tails first, as for the global cap), never another
//! tenant's; a block larger than the quota is refused ([`CoreError::OverQuota`]). Tenants
//! without a quota pay nothing for this (no second leaf set).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use parking_lot::{Mutex, MutexGuard};

use crate::block::EncodedBlock;
use crate::error::CoreError;
use crate::keys::BlockKey;

/// Bytes charged per stored block on top of its payload (index entry, header, recency links).
pub const ENTRY_OVERHEAD_BYTES: u64 = 256;

/// Most blocks [`BlockStore::set_capacity`] evicts in one hold of the store's lock while it
/// shrinks the store (about a millisecond of work: the evicted payloads are freed after the lock
/// is released).
pub const SHRINK_BATCH_BLOCKS: usize = 2048;

/// Most recency records the read buffer holds (64 bytes each); more are dropped until it is
/// applied.
pub const READ_BUFFER_KEYS: usize = 256 * 1024;

/// Hasher of the store's key maps: aHash with per-process random keys. Keys are 64 client-chosen
/// bytes; SipHash (std's default) spent about half of a 2,048-key Lookup hashing them, and a
/// keyed hash keeps chosen-collision floods out as SipHash does.
type KeyHasher = ahash::RandomState;

/// Most buffered hits applied in one hold of the store's lock.
pub const READ_APPLY_BATCH: usize = 4096;

/// Name of the tenant every block belongs to when no tenant is given (id [`TenantId::DEFAULT`]).
pub const DEFAULT_TENANT: &str = "default";

/// A tenant's small id in one store (see [`BlockStore::tenant_id`]); 0 is [`DEFAULT_TENANT`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(pub u32);

impl TenantId {
    /// The default tenant ([`DEFAULT_TENANT`]).
    pub const DEFAULT: TenantId = TenantId(0);
}

/// Usage of one tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantUsage {
    /// Blocks stored.
    pub blocks: u64,
    /// Charged bytes stored.
    pub bytes: u64,
    /// Hits (blocks found by lookups and gets) since start.
    pub hits: u64,
    /// Blocks of this tenant evicted since start (by the capacity or by its quota).
    pub evictions: u64,
    /// The tenant's quota in charged bytes, if it has one.
    pub quota: Option<u64>,
}

/// A block's identity in the store: namespace digest plus block key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StoreKey {
    /// Namespace digest.
    pub namespace: BlockKey,
    /// Block key.
    pub key: BlockKey,
}

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Stored; `evicted` blocks were removed to make room.
    Stored {
        /// Blocks evicted to make room.
        evicted: u64,
    },
    /// A block with this key was already stored; nothing changed but its recency.
    AlreadyPresent,
}

struct Entry {
    block: Arc<EncodedBlock>,
    charge: u64,
    /// Unique insertion id (never reused).
    id: u64,
    /// Recency: larger is more recent; unique among stored blocks.
    tick: u64,
    /// The parent stored when this block was inserted, with that parent's insertion id.
    parent: Option<(BlockKey, u64)>,
    /// Stored blocks whose `parent` points at this block (key and id).
    children: u32,
    /// The tenant the block belongs to.
    tenant: TenantId,
}

/// A stored block with its identity and live parent link ([`BlockStore::peek`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBlock {
    /// Namespace and key.
    pub key: StoreKey,
    /// Key of the parent block it is linked to, when that parent is stored.
    pub parent: Option<BlockKey>,
    /// The block.
    pub block: Arc<EncodedBlock>,
    /// Name of the tenant it belongs to.
    pub tenant: Arc<str>,
}

/// Usage of one namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NamespaceUsage {
    /// Blocks stored.
    pub blocks: u64,
    /// Charged bytes stored.
    pub bytes: u64,
    /// Hits (blocks found by lookups and gets) since the namespace last had no stored block.
    pub hits: u64,
    /// Tokens per block of the namespace's layout (from its stored blocks; 0 if unknown).
    pub tokens_per_block: u32,
    /// The tenant whose blocks these are (a namespace never holds two tenants' blocks when the
    /// caller maps namespaces per tenant, as the server does).
    pub tenant: TenantId,
}

struct Inner {
    map: HashMap<StoreKey, Entry, KeyHasher>,
    /// Evictable blocks (no stored children), by tick.
    leaves: BTreeMap<u64, StoreKey>,
    /// Evictable blocks of each tenant that has a quota, by tick (a subset of `leaves`).
    quota_leaves: HashMap<TenantId, BTreeMap<u64, StoreKey>>,
    /// Quotas (charged bytes) of the tenants that have one.
    quotas: HashMap<TenantId, u64>,
    /// Source of ticks and insertion ids.
    clock: u64,
    used: u64,
    raw_bytes: u64,
    /// Test builds: check each victim against a full recount of its children (O(n) each).
    #[cfg(test)]
    audit: bool,
    /// Test builds: victims found to have stored children by the audit.
    #[cfg(test)]
    evicted_parents: u64,
}

impl Inner {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Marks a stored block used now. Returns whether it is stored.
    fn promote(&mut self, key: &StoreKey) -> bool {
        let now = self.tick();
        let Some(e) = self.map.get_mut(key) else {
            return false;
        };
        let old = std::mem::replace(&mut e.tick, now);
        if e.children == 0 {
            let tenant = e.tenant;
            self.leaf_remove(old, tenant);
            self.leaf_insert(now, *key, tenant);
        }
        true
    }

    /// Adds an evictable block (to the tenant's own set too, when it has a quota).
    fn leaf_insert(&mut self, tick: u64, key: StoreKey, tenant: TenantId) {
        self.leaves.insert(tick, key);
        if !self.quota_leaves.is_empty()
            && let Some(l) = self.quota_leaves.get_mut(&tenant)
        {
            l.insert(tick, key);
        }
    }

    /// Removes an evictable block (from the tenant's own set too).
    fn leaf_remove(&mut self, tick: u64, tenant: TenantId) {
        self.leaves.remove(&tick);
        if !self.quota_leaves.is_empty()
            && let Some(l) = self.quota_leaves.get_mut(&tenant)
        {
            l.remove(&tick);
        }
    }
}

/// A point-in-time view of the store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreStats {
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Charged bytes stored (payloads plus [`ENTRY_OVERHEAD_BYTES`] per block).
    pub used_bytes: u64,
    /// Blocks stored.
    pub blocks: u64,
    /// Raw (decoded) bytes the stored blocks represent.
    pub raw_bytes: u64,
    /// Encoded payload bytes stored.
    pub payload_bytes: u64,
    /// Blocks evicted since start.
    pub evictions: u64,
    /// Namespaces with stored blocks.
    pub namespaces_total: u64,
    /// The top namespaces asked for ([`BlockStore::stats`]): the `n` largest by bytes together
    /// with the `n` with most hits, largest first.
    pub namespaces: Vec<(BlockKey, NamespaceUsage)>,
}

/// Tenant names by id, and ids by name.
type TenantNames = (Vec<Arc<str>>, HashMap<Arc<str>, TenantId>);

/// The byte-bounded block store. Cheap to share behind an `Arc`.
pub struct BlockStore {
    /// The cap; written under `inner`'s lock, so an insert (which reads it under the lock) sees
    /// a change before or after it as a whole.
    capacity: AtomicU64,
    /// Serialises capacity changes.
    resize: Mutex<()>,
    inner: Mutex<Inner>,
    /// The read index: every stored block, written under `inner`'s lock, read without it.
    index: DashMap<StoreKey, Arc<EncodedBlock>, KeyHasher>,
    /// Hits not yet applied to the LRU order, oldest first (at most [`READ_BUFFER_KEYS`]).
    reads: Mutex<Vec<StoreKey>>,
    /// Hits not recorded because the read buffer was full.
    dropped_reads: AtomicU64,
    namespaces: DashMap<BlockKey, NamespaceUsage>,
    /// Usage per tenant id (entries are never removed: tenants are few).
    tenants: DashMap<TenantId, TenantUsage>,
    /// Tenant names by id, and ids by name.
    tenant_names: parking_lot::RwLock<TenantNames>,
    used: AtomicU64,
    evictions: AtomicU64,
}

impl BlockStore {
    /// A store that never holds more than `capacity_bytes` charged bytes.
    pub fn new(capacity_bytes: u64) -> Self {
        BlockStore {
            capacity: AtomicU64::new(capacity_bytes),
            resize: Mutex::new(()),
            inner: Mutex::new(Inner {
                map: HashMap::default(),
                leaves: BTreeMap::new(),
                quota_leaves: HashMap::new(),
                quotas: HashMap::new(),
                clock: 0,
                used: 0,
                raw_bytes: 0,
                #[cfg(test)]
                audit: false,
                #[cfg(test)]
                evicted_parents: 0,
            }),
            index: DashMap::default(),
            reads: Mutex::new(Vec::new()),
            dropped_reads: AtomicU64::new(0),
            namespaces: DashMap::new(),
            tenants: DashMap::new(),
            tenant_names: parking_lot::RwLock::new({
                let d: Arc<str> = Arc::from(DEFAULT_TENANT);
                (vec![d.clone()], HashMap::from([(d, TenantId::DEFAULT)]))
            }),
            used: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// Capacity in bytes now (the last [`BlockStore::set_capacity`], else the one the store was
    /// created with).
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Changes the capacity; returns how many blocks were evicted to fit under it.
    ///
    /// Growing takes effect at once. Shrinking sets the new cap at once, then evicts least
    /// recently used leaves (the usual eviction order) in batches of at most
    /// [`SHRINK_BATCH_BLOCKS`], handing the lock to waiting requests between batches and freeing
    /// each batch's payloads outside the lock. While it runs, inserts evict at least as many
    /// bytes as they add, so stored bytes only go down; when it returns, `used_bytes() <=
    /// capacity()` holds and every later insert keeps it. Concurrent calls are serialised.
    /// A capacity of 0 empties the store and refuses every block.
    pub fn set_capacity(&self, capacity_bytes: u64) -> u64 {
        let _one_at_a_time = self.resize.lock();
        let mut g = self.inner.lock();
        self.apply_reads(&mut g);
        self.capacity.store(capacity_bytes, Ordering::Release);
        let mut evicted = 0u64;
        let mut freed = Vec::with_capacity(SHRINK_BATCH_BLOCKS.min(g.map.len()));
        loop {
            while g.used > capacity_bytes && freed.len() < SHRINK_BATCH_BLOCKS {
                match self.evict_one(&mut g) {
                    Some(block) => freed.push(block),
                    None => break,
                }
            }
            let batch = freed.len();
            evicted += batch as u64;
            if g.used <= capacity_bytes || batch == 0 {
                break;
            }
            // Free the batch and let waiting requests run before the next one.
            MutexGuard::unlocked_fair(&mut g, || freed.clear());
        }
        drop(g);
        drop(freed);
        evicted
    }

    /// Charged bytes stored now (lock-free read; never above capacity, except while
    /// [`BlockStore::set_capacity`] shrinks the store).
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Blocks evicted since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Bytes a block is charged.
    pub fn charge_of(block: &EncodedBlock) -> u64 {
        Self::charge_of_len(block.payload.len() as u64)
    }

    /// Bytes a block with a payload of `payload_len` bytes is charged.
    pub fn charge_of_len(payload_len: u64) -> u64 {
        payload_len + ENTRY_OVERHEAD_BYTES
    }

    /// Stores `block` under `key`, evicting the least recently used blocks without stored
    /// children to make room. `parent` is the key of the previous block of the same prefix,
    /// when known; it links the two only if the parent is stored here now.
    pub fn insert(
        &self,
        key: StoreKey,
        parent: Option<BlockKey>,
        block: Arc<EncodedBlock>,
    ) -> Result<InsertOutcome, CoreError> {
        self.insert_for(TenantId::DEFAULT, key, parent, block)
    }

    /// [`BlockStore::insert`] for a block of `tenant`: when the tenant has a quota, its own least
    /// recently used leaves are evicted first to keep it within the quota, and a block larger
    /// than the quota is refused with [`CoreError::OverQuota`].
    pub fn insert_for(
        &self,
        tenant: TenantId,
        key: StoreKey,
        parent: Option<BlockKey>,
        block: Arc<EncodedBlock>,
    ) -> Result<InsertOutcome, CoreError> {
        let charge = Self::charge_of(&block);
        let too_large = |limit| CoreError::TooLarge {
            size: charge,
            limit,
        };
        let capacity = self.capacity();
        if charge > capacity {
            return Err(too_large(capacity));
        }
        // Evicted blocks are freed after the lock is released (declared first, dropped last).
        let mut freed = Vec::new();
        let mut g = self.inner.lock();
        // Read under the lock: a capacity change is seen entirely before or after this insert.
        let capacity = self.capacity();
        if charge > capacity {
            return Err(too_large(capacity));
        }
        // Recency of reads so far first, so the victims below are the true LRU leaves.
        self.apply_reads(&mut g);
        if g.promote(&key) {
            return Ok(InsertOutcome::AlreadyPresent);
        }
        let mut evicted = self.make_quota_room(&mut g, tenant, charge, &mut freed)?;
        // While `set_capacity` is shrinking the store, `used` may exceed the new cap: then this
        // insert only keeps `used` from growing and leaves the rest to the shrink.
        let limit = capacity.max(g.used);
        while g.used + charge > limit {
            match self.evict_one(&mut g) {
                Some(victim) => freed.push(victim),
                None => break,
            }
            evicted += 1;
        }
        if g.used + charge > limit {
            // Unreachable while charge <= capacity (an empty store has room), kept as a guard.
            return Err(too_large(limit - g.used));
        }
        let mut parent_link = None;
        if let Some(p) = parent.filter(|p| *p != key.key) {
            let pk = StoreKey {
                namespace: key.namespace,
                key: p,
            };
            if let Some(pe) = g.map.get_mut(&pk) {
                pe.children = pe.children.saturating_add(1);
                let (pid, ptick, now_parent, ptenant) =
                    (pe.id, pe.tick, pe.children == 1, pe.tenant);
                parent_link = Some((p, pid));
                if now_parent {
                    g.leaf_remove(ptick, ptenant);
                }
            }
        }
        let raw = block.header.raw_len;
        let tpb = block.header.layout.tokens_per_block;
        let now = g.tick();
        self.index.insert(key, block.clone());
        g.map.insert(
            key,
            Entry {
                block,
                charge,
                id: now,
                tick: now,
                parent: parent_link,
                children: 0,
                tenant,
            },
        );
        g.leaf_insert(now, key, tenant);
        g.used += charge;
        g.raw_bytes += raw;
        {
            let mut ns = self.namespaces.entry(key.namespace).or_default();
            ns.blocks += 1;
            ns.bytes += charge;
            ns.tokens_per_block = tpb;
            ns.tenant = tenant;
        }
        {
            let mut t = self.tenants.entry(tenant).or_default();
            t.blocks += 1;
            t.bytes += charge;
        }
        self.used.store(g.used, Ordering::Release);
        Ok(InsertOutcome::Stored { evicted })
    }

    /// Evicts the least recently used leaf and returns its block (for the caller to drop after
    /// releasing the lock). `None` when nothing is stored.
    fn evict_one(&self, g: &mut Inner) -> Option<Arc<EncodedBlock>> {
        let (_, victim) = g.leaves.pop_first()?;
        #[cfg(test)]
        if g.audit
            && let Some(v) = g.map.get(&victim)
        {
            let link = Some((victim.key, v.id));
            let stored_children = g
                .map
                .iter()
                .filter(|(k, e)| k.namespace == victim.namespace && e.parent == link)
                .count();
            if stored_children > 0 || v.children > 0 {
                g.evicted_parents += 1;
            }
        }
        let tenant = g.map.get(&victim).map(|e| e.tenant);
        let block = self.remove_locked(g, &victim);
        self.evictions.fetch_add(1, Ordering::Relaxed);
        if let Some(mut t) = tenant.and_then(|t| self.tenants.get_mut(&t)) {
            t.evictions += 1;
        }
        block
    }

    /// Evicts `tenant`'s least recently used leaf (it must have a quota, hence its own leaf
    /// set). `None` when it has no evictable block.
    fn evict_one_of(&self, g: &mut Inner, tenant: TenantId) -> Option<Arc<EncodedBlock>> {
        let (_, victim) = g.quota_leaves.get_mut(&tenant)?.pop_first()?;
        let block = self.remove_locked(g, &victim);
        self.evictions.fetch_add(1, Ordering::Relaxed);
        if let Some(mut t) = self.tenants.get_mut(&tenant) {
            t.evictions += 1;
        }
        block
    }

    /// Charged bytes `tenant` holds now.
    fn tenant_bytes(&self, tenant: TenantId) -> u64 {
        self.tenants.get(&tenant).map_or(0, |u| u.bytes)
    }

    /// Before storing `charge` more bytes of `tenant`: refuses a block over its quota and
    /// evicts its own least recently used leaves until the block fits under it. Returns the
    /// number of blocks evicted (their payloads go to `freed`, dropped after the lock).
    fn make_quota_room(
        &self,
        g: &mut Inner,
        tenant: TenantId,
        charge: u64,
        freed: &mut Vec<Arc<EncodedBlock>>,
    ) -> Result<u64, CoreError> {
        if g.quotas.is_empty() {
            return Ok(0);
        }
        let Some(&quota) = g.quotas.get(&tenant) else {
            return Ok(0);
        };
        if charge > quota {
            return Err(CoreError::OverQuota {
                size: charge,
                quota,
            });
        }
        let mut evicted = 0;
        while self.tenant_bytes(tenant) + charge > quota {
            match self.evict_one_of(g, tenant) {
                Some(b) => freed.push(b),
                None => break,
            }
            evicted += 1;
        }
        Ok(evicted)
    }

    /// Sets (`Some`) or clears (`None`) the quota of `tenant`, in charged bytes; returns how
    /// many of the tenant's blocks were evicted to fit under a new, lower quota (its least
    /// recently used leaves first).
    pub fn set_quota(&self, tenant: TenantId, quota: Option<u64>) -> u64 {
        let mut freed = Vec::new();
        let mut g = self.inner.lock();
        self.apply_reads(&mut g);
        self.tenants.entry(tenant).or_default().quota = quota;
        let Some(quota) = quota else {
            g.quotas.remove(&tenant);
            g.quota_leaves.remove(&tenant);
            return 0;
        };
        g.quotas.insert(tenant, quota);
        if !g.quota_leaves.contains_key(&tenant) {
            // O(n) once, when a tenant gets a quota: collect its current leaves.
            let own: BTreeMap<u64, StoreKey> = g
                .leaves
                .iter()
                .filter(|(_, k)| g.map.get(k).is_some_and(|e| e.tenant == tenant))
                .map(|(t, k)| (*t, *k))
                .collect();
            g.quota_leaves.insert(tenant, own);
        }
        let mut evicted = 0;
        while self.tenant_bytes(tenant) > quota {
            match self.evict_one_of(&mut g, tenant) {
                Some(b) => freed.push(b),
                None => break,
            }
            evicted += 1;
        }
        drop(g);
        drop(freed);
        evicted
    }

    /// The id of tenant `name`, registering it on first use (ids are never reused).
    pub fn tenant_id(&self, name: &str) -> TenantId {
        if let Some(id) = self.tenant_names.read().1.get(name) {
            return *id;
        }
        let mut w = self.tenant_names.write();
        if let Some(id) = w.1.get(name) {
            return *id;
        }
        let id = TenantId(u32::try_from(w.0.len()).unwrap_or(u32::MAX));
        let name: Arc<str> = Arc::from(name);
        w.0.push(name.clone());
        w.1.insert(name, id);
        id
    }

    /// The name of tenant `id` ([`DEFAULT_TENANT`] for an id this store never handed out).
    pub fn tenant_name(&self, id: TenantId) -> Arc<str> {
        let r = self.tenant_names.read();
        r.0.get(id.0 as usize)
            .cloned()
            .unwrap_or_else(|| r.0[0].clone())
    }

    /// Usage of every tenant that has stored blocks, a quota or counted hits, by name.
    pub fn tenant_usage(&self) -> Vec<(Arc<str>, TenantUsage)> {
        let mut all: Vec<(TenantId, TenantUsage)> = self
            .tenants
            .iter()
            .map(|r| (*r.key(), *r.value()))
            .collect();
        all.sort_unstable_by_key(|(id, _)| *id);
        all.into_iter()
            .map(|(id, u)| (self.tenant_name(id), u))
            .collect()
    }

    /// Usage of one tenant (zeros when it never stored anything).
    pub fn usage_of(&self, tenant: TenantId) -> TenantUsage {
        self.tenants.get(&tenant).map(|u| *u).unwrap_or_default()
    }

    /// The tenant a namespace's stored blocks belong to (`None` when it has none).
    pub fn namespace_tenant(&self, namespace: &BlockKey) -> Option<TenantId> {
        self.namespaces.get(namespace).map(|u| u.tenant)
    }

    /// Removes a block from the index; returns it if it was stored.
    fn remove_locked(&self, g: &mut Inner, key: &StoreKey) -> Option<Arc<EncodedBlock>> {
        let e = g.map.remove(key)?;
        self.index.remove(key);
        if e.children == 0 {
            g.leaf_remove(e.tick, e.tenant);
        }
        // Children of a deleted parent stay stored as orphans: their `parent` ids match no
        // stored block any more, so they never touch a block later stored under this key.
        g.used -= e.charge;
        g.raw_bytes -= e.block.header.raw_len;
        if let Some((p, pid)) = e.parent {
            let pk = StoreKey {
                namespace: key.namespace,
                key: p,
            };
            if let Some(pe) = g.map.get_mut(&pk)
                && pe.id == pid
            {
                pe.children = pe.children.saturating_sub(1);
                let (ptick, leaf, ptenant) = (pe.tick, pe.children == 0, pe.tenant);
                if leaf {
                    g.leaf_insert(ptick, pk, ptenant);
                }
            }
        }
        let now_empty = match self.namespaces.get_mut(&key.namespace) {
            Some(mut ns) => {
                ns.blocks = ns.blocks.saturating_sub(1);
                ns.bytes = ns.bytes.saturating_sub(e.charge);
                ns.blocks == 0
            }
            None => false,
        };
        if now_empty {
            self.namespaces
                .remove_if(&key.namespace, |_, ns| ns.blocks == 0);
        }
        if let Some(mut t) = self.tenants.get_mut(&e.tenant) {
            t.blocks = t.blocks.saturating_sub(1);
            t.bytes = t.bytes.saturating_sub(e.charge);
        }
        self.used.store(g.used, Ordering::Release);
        Some(e.block)
    }

    /// Removes a block; returns whether it existed. Its stored children (if any) stay, orphaned.
    pub fn remove(&self, key: &StoreKey) -> bool {
        let mut g = self.inner.lock();
        self.remove_locked(&mut g, key).is_some()
    }

    /// Whether a block is stored (does not change recency).
    pub fn contains(&self, key: &StoreKey) -> bool {
        self.index.contains_key(key)
    }

    /// Applies the buffered hits to the LRU order, oldest first (under the store's lock).
    fn apply_reads(&self, g: &mut Inner) {
        let reads = std::mem::take(&mut *self.reads.lock());
        for k in &reads {
            // A block removed since it was read is simply not promoted.
            g.promote(k);
        }
        self.reuse_read_buffer(reads);
    }

    /// Records hits (in the order they should become recent: the last one most recent). A
    /// reader never takes the store's lock: when the buffer is full the records are dropped
    /// (see the module docs), and [`BlockStore::apply_buffered_reads`] empties it.
    fn record_reads(&self, hits: impl ExactSizeIterator<Item = StoreKey>) {
        let n = hits.len();
        if n == 0 {
            return;
        }
        let mut buf = self.reads.lock();
        if buf.len() + n <= READ_BUFFER_KEYS {
            buf.extend(hits);
        } else {
            drop(buf);
            self.dropped_reads.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Applies the buffered hits to the LRU order, at most [`READ_APPLY_BATCH`] per hold of the
    /// store's lock (so writers wait at most one batch); returns how many were applied. Call it
    /// often from a maintenance task (the node does every few milliseconds): readers only
    /// record, and inserts apply what is buffered before they evict.
    pub fn apply_buffered_reads(&self) -> usize {
        let reads = std::mem::take(&mut *self.reads.lock());
        for batch in reads.chunks(READ_APPLY_BATCH) {
            let mut g = self.inner.lock();
            for k in batch {
                g.promote(k);
            }
        }
        let applied = reads.len();
        self.reuse_read_buffer(reads);
        applied
    }

    /// Hands an applied batch's allocation back to the read buffer, unless readers started a
    /// new one meanwhile, so that readers extend memory already mapped instead of growing a new
    /// buffer after every apply. The buffer never holds more than [`READ_BUFFER_KEYS`] records.
    fn reuse_read_buffer(&self, mut reads: Vec<StoreKey>) {
        reads.clear();
        let mut buf = self.reads.lock();
        if buf.is_empty() && buf.capacity() < reads.capacity() {
            *buf = reads;
        }
    }

    /// Hits waiting in the read buffer.
    pub fn buffered_reads(&self) -> usize {
        self.reads.lock().len()
    }

    /// Hits whose recency was dropped because the read buffer was full (since start).
    pub fn dropped_reads(&self) -> u64 {
        self.dropped_reads.load(Ordering::Relaxed)
    }

    /// Adds hits to a namespace that has stored blocks (never creates an entry).
    fn count_hits(&self, namespace: &BlockKey, hits: u64) {
        if hits > 0
            && let Some(mut ns) = self.namespaces.get_mut(namespace)
        {
            ns.hits += hits;
            let tenant = ns.tenant;
            drop(ns);
            if let Some(mut t) = self.tenants.get_mut(&tenant) {
                t.hits += hits;
            }
        }
    }

    /// Number of leading `keys` stored in `namespace`. The hits are marked used, the head of the
    /// prefix last (most recent).
    pub fn lookup_prefix(&self, namespace: BlockKey, keys: &[BlockKey]) -> usize {
        let hit = keys
            .iter()
            .take_while(|k| {
                self.index.contains_key(&StoreKey {
                    namespace,
                    key: **k,
                })
            })
            .count();
        self.record_reads(
            keys[..hit]
                .iter()
                .rev()
                .map(|k| StoreKey { namespace, key: *k }),
        );
        self.count_hits(&namespace, hit as u64);
        hit
    }

    /// Whether each of `keys` is stored in `namespace`. Hits are marked used, last key first.
    pub fn presence(&self, namespace: BlockKey, keys: &[BlockKey]) -> Vec<bool> {
        let out: Vec<bool> = keys
            .iter()
            .map(|k| self.index.contains_key(&StoreKey { namespace, key: *k }))
            .collect();
        let hits: Vec<StoreKey> = keys
            .iter()
            .zip(&out)
            .rev()
            .filter(|(_, hit)| **hit)
            .map(|(k, _)| StoreKey { namespace, key: *k })
            .collect();
        self.count_hits(&namespace, hits.len() as u64);
        self.record_reads(hits.into_iter());
        out
    }

    /// Fetches blocks, marking hits used (last key first, as for lookups). `None` marks a miss.
    pub fn get_many(
        &self,
        namespace: BlockKey,
        keys: &[BlockKey],
    ) -> Vec<Option<Arc<EncodedBlock>>> {
        let out: Vec<Option<Arc<EncodedBlock>>> = keys
            .iter()
            .map(|k| {
                self.index
                    .get(&StoreKey { namespace, key: *k })
                    .map(|b| b.value().clone())
            })
            .collect();
        let hits: Vec<StoreKey> = keys
            .iter()
            .zip(&out)
            .rev()
            .filter(|(_, b)| b.is_some())
            .map(|(k, _)| StoreKey { namespace, key: *k })
            .collect();
        self.count_hits(&namespace, hits.len() as u64);
        self.record_reads(hits.into_iter());
        out
    }

    /// Tokens per block of a namespace this store holds blocks of (0 when unknown).
    pub fn tokens_per_block(&self, namespace: &BlockKey) -> u32 {
        self.namespaces
            .get(namespace)
            .map_or(0, |u| u.tokens_per_block)
    }

    /// Fetches one block, marking it used. Does not count a namespace hit.
    pub fn get(&self, key: &StoreKey) -> Option<Arc<EncodedBlock>> {
        let block = self.index.get(key).map(|b| b.value().clone())?;
        self.record_reads(std::iter::once(*key));
        Some(block)
    }

    /// Namespaces with stored blocks.
    pub fn namespace_count(&self) -> u64 {
        self.namespaces.len() as u64
    }

    /// A snapshot of sizes and of the top namespaces: the `top` largest by bytes together with
    /// the `top` with most hits (so at most `2 * top`), largest first. Selected in O(n) over the
    /// n namespaces, without holding the store's lock while the namespaces are read.
    pub fn stats(&self, top: usize) -> StoreStats {
        let (used, blocks, raw_bytes) = {
            let g = self.inner.lock();
            (g.used, g.map.len() as u64, g.raw_bytes)
        };
        let (namespaces_total, namespaces) = if top == 0 {
            (self.namespace_count(), Vec::new())
        } else {
            let all: Vec<(BlockKey, NamespaceUsage)> = self
                .namespaces
                .iter()
                .map(|r| (*r.key(), *r.value()))
                .collect();
            (all.len() as u64, top_namespaces(all, top))
        };
        StoreStats {
            capacity_bytes: self.capacity(),
            used_bytes: used,
            blocks,
            raw_bytes,
            payload_bytes: used.saturating_sub(blocks * ENTRY_OVERHEAD_BYTES),
            evictions: self.evictions(),
            namespaces_total,
            namespaces,
        }
    }

    /// The top namespaces of one tenant, as [`BlockStore::stats`] selects them, with the
    /// number of namespaces the tenant has (O(n) over all namespaces).
    pub fn tenant_namespaces(
        &self,
        tenant: TenantId,
        top: usize,
    ) -> (u64, Vec<(BlockKey, NamespaceUsage)>) {
        let all: Vec<(BlockKey, NamespaceUsage)> = self
            .namespaces
            .iter()
            .filter(|r| r.value().tenant == tenant)
            .map(|r| (*r.key(), *r.value()))
            .collect();
        let total = all.len() as u64;
        if top == 0 {
            return (total, Vec::new());
        }
        (total, top_namespaces(all, top))
    }

    /// Every stored key, least recently used first, for snapshots: the lock is held only to
    /// copy (tick, key) pairs (O(n)); they are sorted after it is released.
    pub fn keys_oldest_first(&self) -> Vec<StoreKey> {
        let mut all: Vec<(u64, StoreKey)> = {
            let mut g = self.inner.lock();
            self.apply_reads(&mut g);
            g.map.iter().map(|(k, e)| (e.tick, *k)).collect()
        };
        all.sort_unstable_by_key(|(t, _)| *t);
        all.into_iter().map(|(_, k)| k).collect()
    }

    /// One stored block with the key of its parent (when the parent it was linked to is still
    /// stored), without marking it used. For snapshots: [`BlockStore::keys_oldest_first`] then
    /// `peek` per key, so the lock is never held for more than one lookup.
    pub fn peek(&self, key: &StoreKey) -> Option<StoredBlock> {
        let g = self.inner.lock();
        let e = g.map.get(key)?;
        let parent = e.parent.and_then(|(p, pid)| {
            let pk = StoreKey {
                namespace: key.namespace,
                key: p,
            };
            g.map.get(&pk).filter(|pe| pe.id == pid).map(|_| p)
        });
        let tenant = e.tenant;
        let block = e.block.clone();
        drop(g);
        Some(StoredBlock {
            key: *key,
            parent,
            block,
            tenant: self.tenant_name(tenant),
        })
    }
}

/// The `top` largest namespaces by bytes together with the `top` with most (non-zero) hits,
/// sorted by bytes then hits, largest first (ties by digest). O(n) selection plus a sort of at
/// most `2 * top` entries.
fn top_namespaces(
    mut all: Vec<(BlockKey, NamespaceUsage)>,
    top: usize,
) -> Vec<(BlockKey, NamespaceUsage)> {
    type Item = (BlockKey, NamespaceUsage);
    let by_bytes = |a: &Item, b: &Item| b.1.bytes.cmp(&a.1.bytes).then(a.0.cmp(&b.0));
    let by_hits = |a: &Item, b: &Item| b.1.hits.cmp(&a.1.hits).then(a.0.cmp(&b.0));
    let mut picked: Vec<Item> = Vec::with_capacity(2 * top.min(all.len()));
    if all.len() > top {
        all.select_nth_unstable_by(top - 1, by_hits);
    }
    picked.extend(all.iter().take(top).filter(|n| n.1.hits > 0).copied());
    if all.len() > top {
        all.select_nth_unstable_by(top - 1, by_bytes);
    }
    let seen: HashSet<BlockKey> = picked.iter().map(|n| n.0).collect();
    picked.extend(
        all.iter()
            .take(top)
            .filter(|n| !seen.contains(&n.0))
            .copied(),
    );
    picked.sort_unstable_by(|a, b| {
        (b.1.bytes, b.1.hits)
            .cmp(&(a.1.bytes, a.1.hits))
            .then(a.0.cmp(&b.0))
    });
    picked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;
    use crate::layout::{DType, KvLayout};
    use proptest::prelude::*;

    const NS: BlockKey = BlockKey([1; 32]);

    fn block(seed: u8) -> Arc<EncodedBlock> {
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 372,
            dtype: DType::U8,
            tokens_per_block: 1,
        };
        let raw = vec![seed; 744];
        Arc::new(EncodedBlock::encode(NS, layout, Codec::None, &raw).expect("encode"))
    }

    fn key(i: u8) -> StoreKey {
        StoreKey {
            namespace: NS,
            key: BlockKey([i; 32]),
        }
    }

    /// A 2-byte block (charged 258 bytes).
    fn tiny() -> Arc<EncodedBlock> {
        sized(1)
    }

    /// A block of `2 * head_dim` raw bytes, stored uncompressed.
    fn sized(head_dim: u32) -> Arc<EncodedBlock> {
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim,
            dtype: DType::U8,
            tokens_per_block: 1,
        };
        let raw = vec![7u8; 2 * head_dim as usize];
        Arc::new(EncodedBlock::encode(NS, layout, Codec::None, &raw).expect("encode"))
    }

    fn nkey(namespace: BlockKey, i: u32) -> StoreKey {
        let mut k = [0xa5; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        StoreKey {
            namespace,
            key: BlockKey(k),
        }
    }

    impl BlockStore {
        /// Checks every internal invariant against a full recount; panics on a violation.
        fn check_invariants(&self) {
            let g = self.inner.lock();
            // The read index holds exactly the stored blocks; the read buffer stays bounded.
            assert_eq!(self.index.len(), g.map.len(), "read index size");
            for (k, e) in &g.map {
                let indexed = self.index.get(k).map(|b| Arc::ptr_eq(b.value(), &e.block));
                assert_eq!(indexed, Some(true), "read index entry {k:?}");
            }
            assert!(self.reads.lock().len() <= READ_BUFFER_KEYS);
            let used: u64 = g.map.values().map(|e| e.charge).sum();
            assert_eq!(g.used, used, "used bytes");
            assert_eq!(self.used_bytes(), used);
            assert!(used <= self.capacity(), "{used} > {}", self.capacity());
            let mut children: HashMap<StoreKey, u32> = HashMap::new();
            for (k, e) in &g.map {
                if let Some((p, pid)) = e.parent {
                    let pk = StoreKey {
                        namespace: k.namespace,
                        key: p,
                    };
                    if g.map.get(&pk).is_some_and(|pe| pe.id == pid) {
                        *children.entry(pk).or_default() += 1;
                    }
                }
            }
            let mut leaves = BTreeMap::new();
            for (k, e) in &g.map {
                assert_eq!(e.children, children.get(k).copied().unwrap_or(0), "{k:?}");
                if e.children == 0 {
                    leaves.insert(e.tick, *k);
                }
            }
            assert_eq!(g.leaves, leaves, "leaf set");
            // Tenants: usage recount, quota leaf sets = the tenant's part of the leaf set,
            // and every tenant with a quota is within it (while no shrink runs).
            let mut tenants: HashMap<TenantId, (u64, u64)> = HashMap::new();
            for e in g.map.values() {
                let u = tenants.entry(e.tenant).or_default();
                u.0 += 1;
                u.1 += e.charge;
            }
            for r in self.tenants.iter() {
                let want = tenants.get(r.key()).copied().unwrap_or_default();
                assert_eq!((r.blocks, r.bytes), want, "tenant {:?}", r.key());
                assert_eq!(
                    r.quota,
                    g.quotas.get(r.key()).copied(),
                    "quota {:?}",
                    r.key()
                );
                if let Some(q) = r.quota {
                    assert!(
                        r.bytes <= q,
                        "tenant {:?}: {} > quota {q}",
                        r.key(),
                        r.bytes
                    );
                }
            }
            for t in tenants.keys() {
                assert!(
                    self.tenants.contains_key(t),
                    "tenant {t:?} has no usage entry"
                );
            }
            assert_eq!(
                g.quota_leaves.keys().collect::<HashSet<_>>(),
                g.quotas.keys().collect::<HashSet<_>>()
            );
            for (t, own) in &g.quota_leaves {
                let want: BTreeMap<u64, StoreKey> = leaves
                    .iter()
                    .filter(|(_, k)| g.map.get(k).is_some_and(|e| e.tenant == *t))
                    .map(|(a, b)| (*a, *b))
                    .collect();
                assert_eq!(own, &want, "leaf set of tenant {t:?}");
            }
            for (k, e) in &g.map {
                let nt = self.namespaces.get(&k.namespace).map(|u| u.tenant);
                assert_eq!(nt, Some(e.tenant), "namespace tenant of {k:?}");
            }
            let mut ns: HashMap<BlockKey, (u64, u64)> = HashMap::new();
            for (k, e) in &g.map {
                let u = ns.entry(k.namespace).or_default();
                u.0 += 1;
                u.1 += e.charge;
            }
            assert_eq!(self.namespaces.len(), ns.len(), "namespace entries");
            for (k, (blocks, bytes)) in ns {
                let u = self.namespaces.get(&k).map(|u| *u).unwrap_or_default();
                assert_eq!((u.blocks, u.bytes), (blocks, bytes), "{k:?}");
            }
            assert_eq!(
                g.evicted_parents, 0,
                "a block with stored children was evicted"
            );
        }

        fn audited(capacity: u64) -> Self {
            let s = BlockStore::new(capacity);
            s.inner.lock().audit = true;
            s
        }
    }

    // Each test block is charged 744 + 256 = 1000 bytes.
    #[test]
    fn evicts_least_recently_used_and_respects_capacity() {
        let s = BlockStore::new(3_000);
        for i in 0..3 {
            assert_eq!(
                s.insert(key(i), None, block(i)),
                Ok(InsertOutcome::Stored { evicted: 0 })
            );
        }
        assert!(s.get(&key(0)).is_some()); // 0 is now most recent; 1 is LRU
        assert_eq!(
            s.insert(key(3), None, block(3)),
            Ok(InsertOutcome::Stored { evicted: 1 })
        );
        assert!(!s.contains(&key(1)));
        assert!(s.contains(&key(0)));
        assert_eq!(s.used_bytes(), 3_000);
        assert_eq!(s.evictions(), 1);
        assert_eq!(
            s.insert(key(3), None, block(3)),
            Ok(InsertOutcome::AlreadyPresent)
        );
    }

    #[test]
    fn too_large_is_rejected() {
        let s = BlockStore::new(999);
        assert!(matches!(
            s.insert(key(0), None, block(0)),
            Err(CoreError::TooLarge { .. })
        ));
        assert_eq!(s.used_bytes(), 0);
    }

    #[test]
    fn chain_tails_go_before_their_parents() {
        let s = BlockStore::new(4_000);
        // chain 0 -> 1 -> 2, inserted head first (head is least recent), then an unrelated 9.
        s.insert(key(0), None, block(0)).expect("0");
        s.insert(key(1), Some(key(0).key), block(1)).expect("1");
        s.insert(key(2), Some(key(1).key), block(2)).expect("2");
        s.insert(key(9), None, block(9)).expect("9");
        s.insert(key(10), None, block(10)).expect("10");
        // The LRU block is the head 0, but its tail 2 is evicted instead.
        assert!(s.contains(&key(0)) && s.contains(&key(1)) && !s.contains(&key(2)));
        s.insert(key(11), None, block(11)).expect("11");
        assert!(s.contains(&key(0)) && !s.contains(&key(1)));
        s.insert(key(12), None, block(12)).expect("12");
        assert!(!s.contains(&key(0)));
        assert!(s.contains(&key(9)));
    }

    #[test]
    fn lookup_counts_leading_hits_and_keeps_heads_recent() {
        let s = BlockStore::new(10_000);
        for i in 0..4 {
            let parent = (i > 0).then(|| key(i - 1).key);
            s.insert(key(i), parent, block(i)).expect("insert");
        }
        let keys: Vec<BlockKey> = [0u8, 1, 2, 7, 3].iter().map(|i| key(*i).key).collect();
        assert_eq!(s.lookup_prefix(NS, &keys), 3);
        assert_eq!(s.lookup_prefix(NS, &keys[3..]), 0);
        assert_eq!(
            s.lookup_prefix(BlockKey([2; 32]), &keys),
            0,
            "other namespace"
        );
        let order = s.keys_oldest_first();
        // 3 was not touched; then tail-first promotion leaves 0 most recent.
        assert_eq!(order.last(), Some(&key(0)));
        assert_eq!(order.first(), Some(&key(3)));
    }

    #[test]
    fn reads_are_buffered_applied_in_batches_and_dropped_when_the_buffer_is_full() {
        let s = BlockStore::new(1 << 30);
        for i in 0..3 {
            s.insert(key(i), None, block(i)).expect("insert");
        }
        // Key 0 is the oldest; a get of it is only recorded...
        assert!(s.get(&key(0)).is_some());
        assert_eq!(s.buffered_reads(), 1);
        // ...until applied: then it is the most recent.
        assert_eq!(s.apply_buffered_reads(), 1);
        assert_eq!(s.buffered_reads(), 0);
        assert_eq!(s.keys_oldest_first().last(), Some(&key(0)));
        // More hits than a batch are applied in several holds of the lock, in order.
        let many = vec![key(1).key; READ_APPLY_BATCH + 10];
        assert_eq!(s.presence(NS, &many).len(), many.len());
        assert_eq!(s.apply_buffered_reads(), many.len());
        assert_eq!(s.keys_oldest_first().last(), Some(&key(1)));
        // The applied batch's allocation is kept for the next reads (no regrowth per apply).
        assert!(s.reads.lock().capacity() >= many.len());
        // A full buffer drops what does not fit and counts it; readers never block.
        let full = vec![key(2).key; READ_BUFFER_KEYS];
        assert_eq!(s.lookup_prefix(NS, &full), READ_BUFFER_KEYS);
        assert_eq!(s.lookup_prefix(NS, &full[..5]), 5);
        assert_eq!(s.buffered_reads(), READ_BUFFER_KEYS);
        assert_eq!(s.dropped_reads(), 5);
        s.check_invariants();
    }

    #[test]
    fn evicted_block_still_readable_by_holder() {
        let s = BlockStore::new(1_000);
        s.insert(key(0), None, block(0)).expect("0");
        let held = s.get(&key(0)).expect("held");
        s.insert(key(1), None, block(1)).expect("1");
        assert!(!s.contains(&key(0)));
        assert_eq!(held.decode().expect("decode"), vec![0u8; 744]);
    }

    #[test]
    fn concurrent_inserts_never_exceed_capacity() {
        let s = Arc::new(BlockStore::new(20_000));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut max = 0;
                while !stop.load(Ordering::Relaxed) {
                    max = max.max(s.used_bytes());
                }
                max
            })
        };
        let writers: Vec<_> = (0..4u8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000u32 {
                        let mut k = [t; 32];
                        k[..4].copy_from_slice(&i.to_le_bytes());
                        let sk = StoreKey {
                            namespace: NS,
                            key: BlockKey(k),
                        };
                        s.insert(sk, None, block(t)).expect("insert");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        stop.store(true, Ordering::Relaxed);
        let max = sampler.join().expect("sampler");
        assert!(max <= 20_000, "max {max}");
        let st = s.stats(usize::MAX);
        assert_eq!(st.blocks, 20);
        assert_eq!(st.evictions, 8_000 - 20);
        assert_eq!(st.used_bytes, 20_000);
    }

    #[test]
    fn shrinking_evicts_least_recently_used_down_to_the_new_cap_and_growing_is_immediate() {
        let s = BlockStore::audited(10_000);
        for i in 0..10 {
            s.insert(key(i), None, block(i)).expect("insert");
        }
        assert!(s.get(&key(0)).is_some()); // 0 is the most recent; 1..=7 are the oldest
        assert_eq!(s.set_capacity(3_500), 7);
        assert_eq!(s.capacity(), 3_500);
        assert_eq!(s.used_bytes(), 3_000);
        assert_eq!(s.evictions(), 7);
        assert!(s.contains(&key(0)) && s.contains(&key(8)) && s.contains(&key(9)));
        s.check_invariants();
        // The cap holds for the next inserts.
        s.insert(key(10), None, block(10)).expect("insert");
        assert_eq!(s.used_bytes(), 3_000);
        assert!(!s.contains(&key(8)));
        // Growing evicts nothing and makes room at once.
        assert_eq!(s.set_capacity(5_000), 0);
        for i in 11..13 {
            assert_eq!(
                s.insert(key(i), None, block(i)),
                Ok(InsertOutcome::Stored { evicted: 0 })
            );
        }
        assert_eq!(s.used_bytes(), 5_000);
        assert_eq!(s.stats(0).capacity_bytes, 5_000);
        s.check_invariants();
        // A block larger than the new cap is refused with the new limit.
        s.set_capacity(999);
        assert_eq!(s.stats(0).blocks, 0);
        assert_eq!(
            s.insert(key(20), None, block(20)),
            Err(CoreError::TooLarge {
                size: 1_000,
                limit: 999
            })
        );
        // 0 empties the store and refuses everything.
        s.set_capacity(0);
        assert_eq!(s.used_bytes(), 0);
        assert!(s.insert(key(21), None, tiny()).is_err());
        s.check_invariants();
    }

    #[test]
    fn shrinking_keeps_chain_order_and_works_through_many_batches() {
        let s = BlockStore::audited(1 << 30);
        // One chain of 3 * SHRINK_BATCH_BLOCKS + 5 tiny blocks, then an unrelated recent block.
        let n = 3 * SHRINK_BATCH_BLOCKS as u32 + 5;
        for i in 0..n {
            let parent = i.checked_sub(1).map(|p| nkey(NS, p).key);
            s.insert(nkey(NS, i), parent, tiny()).expect("insert");
        }
        let other = nkey(BlockKey([9; 32]), 0);
        s.insert(other, None, tiny()).expect("insert");
        // The chain's head is the oldest block, but its tail goes first.
        let keep = 100;
        let evicted = s.set_capacity(keep * BlockStore::charge_of(&tiny()));
        assert_eq!(evicted, u64::from(n) + 1 - keep);
        assert!(s.contains(&other));
        for i in 0..n {
            assert_eq!(
                s.contains(&nkey(NS, i)),
                u64::from(i) < keep - 1,
                "block {i}"
            );
        }
        s.check_invariants();
    }

    #[test]
    fn concurrent_inserts_and_shrinks_keep_the_cap_once_set_capacity_returns() {
        const BIG: u64 = 400_000;
        const SMALL: u64 = 50_000;
        let s = Arc::new(BlockStore::new(BIG));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..4u8)
            .map(|t| {
                let (s, stop) = (s.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        let mut k = [t; 32];
                        k[..4].copy_from_slice(&i.to_le_bytes());
                        let sk = StoreKey {
                            namespace: NS,
                            key: BlockKey(k),
                        };
                        s.insert(sk, None, block(t)).expect("insert");
                        i = i.wrapping_add(1);
                    }
                })
            })
            .collect();
        for round in 0..20 {
            // Let the writers fill the big cap, then shrink under them.
            let t0 = std::time::Instant::now();
            while s.used_bytes() + 1_000 <= BIG && t0.elapsed().as_secs() < 5 {
                std::thread::yield_now();
            }
            s.set_capacity(SMALL);
            // From here on no insert may push stored bytes over the new cap.
            let t0 = std::time::Instant::now();
            let mut samples = 0;
            while t0.elapsed() < std::time::Duration::from_millis(5) {
                let used = s.used_bytes();
                assert!(used <= SMALL, "round {round}: {used} > {SMALL}");
                samples += 1;
            }
            assert!(samples > 0);
            s.set_capacity(BIG);
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().expect("writer");
        }
        s.check_invariants();
    }

    #[test]
    fn chain_is_evicted_tail_first_while_recent_blocks_stay() {
        let s = BlockStore::audited(5_000);
        s.insert(key(0), None, block(0)).expect("0");
        s.insert(key(1), Some(key(0).key), block(1)).expect("1");
        s.insert(key(2), Some(key(1).key), block(2)).expect("2");
        s.insert(key(8), None, block(8)).expect("8");
        s.insert(key(9), None, block(9)).expect("9");
        let mut gone = Vec::new();
        for i in 20..23 {
            // Keep the unrelated blocks the most recent.
            assert!(s.get(&key(8)).is_some() && s.get(&key(9)).is_some());
            s.insert(key(i), None, block(i)).expect("insert");
            for c in [0u8, 1, 2] {
                if !s.contains(&key(c)) && !gone.contains(&c) {
                    gone.push(c);
                }
            }
            s.check_invariants();
        }
        assert_eq!(gone, vec![2, 1, 0]);
        assert!(s.contains(&key(8)) && s.contains(&key(9)));
    }

    #[test]
    fn deleting_a_parent_orphans_its_children_and_a_new_parent_does_not_adopt_them() {
        let s = BlockStore::audited(10_000);
        s.insert(key(0), None, block(0)).expect("0");
        s.insert(key(1), Some(key(0).key), block(1)).expect("1");
        assert!(s.remove(&key(0)));
        s.check_invariants();
        // A new block under the parent's key: the orphan's stale link must not count for it.
        s.insert(key(0), None, block(0)).expect("0 again");
        s.check_invariants();
        assert!(s.remove(&key(1)));
        s.check_invariants();
        assert_eq!(s.inner.lock().map.get(&key(0)).map(|e| e.children), Some(0));
    }

    #[test]
    fn namespace_entry_goes_with_its_last_block_and_hits_never_create_one() {
        let s = BlockStore::new(10_000);
        s.insert(key(0), None, block(0)).expect("0");
        assert_eq!(s.lookup_prefix(NS, &[key(0).key]), 1);
        assert_eq!(s.stats(10).namespaces[0].1.hits, 1);
        assert!(s.remove(&key(0)));
        assert_eq!(s.stats(10).namespaces_total, 0);
        let other = BlockKey([9; 32]);
        assert_eq!(s.lookup_prefix(other, &[key(0).key]), 0);
        assert_eq!(s.presence(other, &[key(0).key]), vec![false]);
        assert_eq!(s.stats(10).namespaces_total, 0);
        assert!(s.stats(10).namespaces.is_empty());
    }

    #[test]
    fn stats_keep_the_top_namespaces_by_bytes_and_by_hits() {
        let s = BlockStore::new(1 << 30);
        // Namespace i holds i + 1 blocks; namespace 100 + i holds one block and gets 1000 + i hits.
        for i in 0..50u32 {
            let ns = BlockKey([i as u8; 32]);
            for b in 0..=i {
                s.insert(nkey(ns, b), None, tiny()).expect("insert");
            }
        }
        for i in 0..5u32 {
            let ns = BlockKey([100 + i as u8; 32]);
            s.insert(nkey(ns, 0), None, tiny()).expect("insert");
            for _ in 0..(1000 + i) {
                s.get_many(ns, &[nkey(ns, 0).key]);
            }
        }
        let st = s.stats(3);
        assert_eq!(st.namespaces_total, 55);
        let got: Vec<u8> = st.namespaces.iter().map(|(k, _)| k.0[0]).collect();
        // By bytes 49, 48, 47; by hits 104, 103, 102 (one block each, so last).
        assert_eq!(got, vec![49, 48, 47, 104, 103, 102]);
        assert_eq!(st.namespaces[0].1.blocks, 50);
        assert_eq!(st.namespaces[3].1.hits, 1004);
        assert_eq!(s.stats(0).namespaces.len(), 0);
        assert_eq!(s.stats(1000).namespaces.len(), 55);
    }

    #[test]
    fn a_tenant_over_its_quota_evicts_only_its_own_blocks_tails_first() {
        let s = BlockStore::audited(100_000);
        let (a, b) = (s.tenant_id("a"), s.tenant_id("b"));
        assert_eq!(s.tenant_id("a"), a);
        assert_ne!(a, b);
        assert_ne!(a, TenantId::DEFAULT);
        assert_eq!(&*s.tenant_name(b), "b");
        assert_eq!(s.set_quota(a, Some(3_000)), 0);
        let (na, nb) = (BlockKey([1; 32]), BlockKey([2; 32]));
        // b's blocks are the oldest in the store; a's chain 0 <- 1 <- 2 fills its quota.
        for i in 0..3 {
            s.insert_for(b, nkey(nb, i), None, block(9)).expect("b");
        }
        for i in 0..3u32 {
            let parent = i.checked_sub(1).map(|p| nkey(na, p).key);
            s.insert_for(a, nkey(na, i), parent, block(1)).expect("a");
        }
        s.check_invariants();
        // One more block of a: a's chain loses its tail, b keeps everything.
        let r = s.insert_for(a, nkey(na, 10), None, block(2));
        assert_eq!(r, Ok(InsertOutcome::Stored { evicted: 1 }));
        assert!(!s.contains(&nkey(na, 2)) && s.contains(&nkey(na, 0)));
        assert!((0..3).all(|i| s.contains(&nkey(nb, i))));
        let ua = s.usage_of(a);
        assert_eq!(
            (ua.blocks, ua.bytes, ua.evictions, ua.quota),
            (3, 3_000, 1, Some(3_000))
        );
        assert_eq!(s.usage_of(b).evictions, 0);
        s.check_invariants();
        // Larger than the quota: refused, nothing evicted.
        assert_eq!(
            s.insert_for(a, nkey(na, 11), None, sized(1_500)),
            Err(CoreError::OverQuota {
                size: 3_256,
                quota: 3_000
            })
        );
        assert_eq!(s.usage_of(a).blocks, 3);
        // Lowering the quota evicts a's least recently used leaves at once.
        assert_eq!(s.set_quota(a, Some(1_000)), 2);
        assert_eq!(s.usage_of(a).blocks, 1);
        assert_eq!(s.usage_of(b).blocks, 3);
        s.check_invariants();
        assert_eq!(
            s.insert_for(a, nkey(na, 12), None, sized(1_500)),
            Err(CoreError::OverQuota {
                size: 3_256,
                quota: 1_000
            })
        );
        // Clearing the quota drops the tenant's leaf set; usage stays.
        assert_eq!(s.set_quota(a, None), 0);
        s.check_invariants();
        let names: Vec<String> = s
            .tenant_usage()
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        assert_eq!(names, vec!["a", "b"]);
        assert_eq!(s.tenant_namespaces(b, 10).0, 1);
        assert_eq!(
            s.peek(&nkey(nb, 0)).map(|p| p.tenant.to_string()),
            Some("b".into())
        );
    }

    #[test]
    fn a_star_of_50_000_children_fills_and_evicts_without_walking_children() {
        let block = tiny();
        let charge = BlockStore::charge_of(&block);
        let s = BlockStore::new(10_000 * charge);
        s.insert(nkey(NS, 0), None, block.clone()).expect("parent");
        for i in 1..=50_000 {
            s.insert(nkey(NS, i), Some(nkey(NS, 0).key), block.clone())
                .expect("child");
        }
        s.check_invariants();
        // The parent is kept (it has children); the most recent children fill the rest.
        assert!(s.contains(&nkey(NS, 0)));
        assert!(s.contains(&nkey(NS, 50_000)) && !s.contains(&nkey(NS, 1)));
        assert_eq!(s.evictions(), 50_001 - 10_000);
        let children = s.inner.lock().map.get(&nkey(NS, 0)).map(|e| e.children);
        assert_eq!(children, Some(9_999));
        // Deleting the children one by one is O(1) each as well.
        for i in 40_002..=50_000 {
            assert!(s.remove(&nkey(NS, i)));
        }
        s.check_invariants();
        assert_eq!(s.inner.lock().leaves.len(), 1, "the parent is a leaf again");
    }

    #[test]
    fn a_262_000_block_chain_fills_and_evicts_twice_over() {
        let block = tiny();
        let charge = BlockStore::charge_of(&block);
        let cap_blocks = 131_000u32;
        let s = BlockStore::new(u64::from(cap_blocks) * charge);
        for i in 0..2 * cap_blocks {
            let parent = i.checked_sub(1).map(|p| nkey(NS, p).key);
            s.insert(nkey(NS, i), parent, block.clone())
                .expect("insert");
            if i % 8192 == 0 {
                // Other clients' lookups keep working at every stage.
                assert_eq!(s.lookup_prefix(NS, &[nkey(NS, i).key]), 1);
            }
        }
        s.check_invariants();
        assert_eq!(s.evictions(), u64::from(cap_blocks));
        assert_eq!(s.used_bytes(), u64::from(cap_blocks) * charge);
        // The newest chain segment is stored whole, head to tail.
        let keys: Vec<BlockKey> = (cap_blocks..2 * cap_blocks)
            .map(|i| nkey(NS, i).key)
            .collect();
        assert_eq!(s.lookup_prefix(NS, &keys), cap_blocks as usize);
        let u = s.stats(1).namespaces[0].1;
        assert_eq!((u.blocks, u.bytes), (u64::from(cap_blocks), s.used_bytes()));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert {
            ns: u8,
            key: u8,
            parent: Option<u8>,
            size: u8,
        },
        Remove {
            ns: u8,
            key: u8,
        },
        Lookup {
            ns: u8,
            keys: Vec<u8>,
        },
        Get {
            ns: u8,
            key: u8,
        },
        SetCapacity {
            blocks: u8,
        },
        SetQuota {
            tenant: u8,
            blocks: Option<u8>,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..3u8, 0..40u8, proptest::option::weighted(0.8, 0..40u8), 0..4u8)
                .prop_map(|(ns, key, parent, size)| Op::Insert { ns, key, parent, size }),
            1 => (0..3u8, 0..40u8).prop_map(|(ns, key)| Op::Remove { ns, key }),
            2 => (0..3u8, proptest::collection::vec(0..40u8, 0..6))
                .prop_map(|(ns, keys)| Op::Lookup { ns, keys }),
            2 => (0..3u8, 0..40u8).prop_map(|(ns, key)| Op::Get { ns, key }),
            1 => (1..12u8).prop_map(|blocks| Op::SetCapacity { blocks }),
            1 => (0..2u8, proptest::option::of(0..8u8))
                .prop_map(|(tenant, blocks)| Op::SetQuota { tenant, blocks }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Lookups of many keys (presence and the leading run) answer as a per-key `contains`
        /// would, with keys of other namespaces stored beside them.
        #[test]
        fn many_key_lookups_match_per_key_contains(
            stored in proptest::collection::btree_set(0..700u32, 0..600),
            other in proptest::collection::btree_set(0..700u32, 0..100),
            asked in proptest::collection::vec(0..700u32, 0..900),
            prefix_of_stored in any::<bool>(),
        ) {
            let s = BlockStore::new(1 << 30);
            let other_ns = BlockKey([9; 32]);
            for k in &stored {
                prop_assert!(s.insert(nkey(NS, *k), None, tiny()).is_ok());
            }
            for k in &other {
                prop_assert!(s.insert(nkey(other_ns, *k), None, tiny()).is_ok());
            }
            // Long leading runs too, not only runs that end early.
            let asked: Vec<u32> = if prefix_of_stored {
                stored.iter().copied().chain(asked).collect()
            } else {
                asked
            };
            let keys: Vec<BlockKey> = asked.iter().map(|k| nkey(NS, *k).key).collect();
            let want: Vec<bool> = asked.iter().map(|k| stored.contains(k)).collect();
            prop_assert_eq!(s.presence(NS, &keys), want.clone());
            let run = want.iter().take_while(|p| **p).count();
            prop_assert_eq!(s.lookup_prefix(NS, &keys), run);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn random_ops_keep_every_invariant(
            cap_blocks in 1..12u64,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let blocks: Vec<_> = [1u32, 8, 40, 100].iter().map(|h| sized(*h)).collect();
            let s = BlockStore::audited(cap_blocks * BlockStore::charge_of(&blocks[3]));
            let ns = |n: u8| BlockKey([n + 1; 32]);
            // Namespaces 0 and 2 belong to tenant "t0", namespace 1 to "t1".
            let tenants = [s.tenant_id("t0"), s.tenant_id("t1")];
            let tenant_of = |n: u8| tenants[usize::from(n % 2)];
            let unit = BlockStore::charge_of(&blocks[3]);
            for op in ops {
                match op {
                    Op::Insert { ns: n, key, parent, size } => {
                        let parent = parent.map(|p| nkey(ns(n), u32::from(p)).key);
                        let b = blocks[size as usize].clone();
                        let charge = BlockStore::charge_of(&b);
                        let quota = s.usage_of(tenant_of(n)).quota;
                        let r = s.insert_for(tenant_of(n), nkey(ns(n), u32::from(key)), parent, b);
                        match quota {
                            Some(q) if charge > q => prop_assert!(
                                s.contains(&nkey(ns(n), u32::from(key)))
                                    || matches!(r, Err(CoreError::OverQuota { .. })),
                                "{:?}", r
                            ),
                            _ => prop_assert!(r.is_ok(), "{:?}", r),
                        }
                    }
                    Op::SetQuota { tenant, blocks: b } => {
                        let t = tenants[usize::from(tenant)];
                        let other = tenants[1 - usize::from(tenant)];
                        let before = s.usage_of(other);
                        s.set_quota(t, b.map(|b| u64::from(b) * unit));
                        let after = s.usage_of(other);
                        // Another tenant's quota never evicts this one's blocks.
                        prop_assert_eq!((before.blocks, before.evictions), (after.blocks, after.evictions));
                    }
                    Op::Remove { ns: n, key } => {
                        s.remove(&nkey(ns(n), u32::from(key)));
                    }
                    Op::Lookup { ns: n, keys } => {
                        let keys: Vec<BlockKey> =
                            keys.iter().map(|k| nkey(ns(n), u32::from(*k)).key).collect();
                        let hit = s.lookup_prefix(ns(n), &keys);
                        let all_stored = keys[..hit].iter().all(|k| s.contains(&StoreKey { namespace: ns(n), key: *k }));
                        prop_assert!(all_stored);
                        // The run ends at the first missing key.
                        let ends_at_miss = hit == keys.len()
                            || !s.contains(&StoreKey { namespace: ns(n), key: keys[hit] });
                        prop_assert!(ends_at_miss);
                    }
                    Op::Get { ns: n, key } => {
                        let k = nkey(ns(n), u32::from(key));
                        prop_assert_eq!(s.get_many(ns(n), &[k.key])[0].is_some(), s.contains(&k));
                    }
                    Op::SetCapacity { blocks: b } => {
                        let before = s.stats(0).blocks;
                        let evicted = s.set_capacity(u64::from(b) * BlockStore::charge_of(&blocks[3]));
                        prop_assert_eq!(s.stats(0).blocks, before - evicted);
                    }
                }
                s.check_invariants();
            }
        }
    }
}
