//! Store snapshots: the blocks of a [`BlockStore`] written to one file on graceful shutdown and
//! loaded back on start, so a restarted node keeps its cache.
//!
//! # Format (version 2, little-endian)
//!
//! ```text
//! file header (32 bytes): magic "KVSHSNAP" | u32 version | u32 flags (0) | u64 record count
//!                         | u64 xxh3-64 of the 24 bytes before it
//! record:                 namespace [32] | key [32] | u8 has_parent | parent key [32]
//!                         | u32 layers | u32 kv heads | u32 head dim | u32 tokens per block
//!                         | u8 dtype | u8 codec (wire enum values)
//!                         | u64 raw_len | u64 checksum of the raw bytes | u64 payload_len
//!                         | u8 tenant name length | tenant name [length] (UTF-8; version 2)
//!                         | payload [payload_len]
//!                         | u64 xxh3-64 of every byte of the record before it
//! ```
//!
//! Version 1 files (written before tenants existed) have no tenant name; they are still read,
//! and their blocks load as the default tenant ([`DEFAULT_TENANT`](crate::store::DEFAULT_TENANT)).
//!
//! Records come least recently used first, so replaying them in file order restores recency.
//!
//! # Reading hostile or damaged files
//!
//! A record's fixed part is validated like a block header arriving on the wire (layout limits,
//! codec, `raw_len` matching the layout, `payload_len` within what a codec can produce) and
//! against the node's largest block size **before** its payload is allocated. A record whose
//! checksum does not match is skipped and reading goes on; a record whose fixed part is invalid
//! or that ends early leaves the rest of the file unframed, so reading stops there. Either way
//! every record not loaded is counted in [`LoadReport::skipped_records`]; nothing panics.
//!
//! # Loading
//!
//! [`load_into`] keeps the newest records that fit the store's free capacity, inserts them
//! parents before children (so chains are linked again and lose their tails first), then marks
//! them used in file order, so the restored recency order is the one that was saved.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use kvshare_proto::v1 as pb;
use xxhash_rust::xxh3::{Xxh3Default, xxh3_64};

use crate::block::{BlockHeader, EncodedBlock};
use crate::keys::{BlockKey, KEY_LEN};
use crate::store::{BlockStore, DEFAULT_TENANT, StoreKey, StoredBlock};

/// First bytes of a snapshot file.
pub const MAGIC: [u8; 8] = *b"KVSHSNAP";
/// The format version this code writes (it reads this one and [`FORMAT_VERSION_V1`]).
pub const FORMAT_VERSION: u32 = 2;
/// The format version without tenant names, still read (blocks load as the default tenant).
pub const FORMAT_VERSION_V1: u32 = 1;
/// Longest tenant name a record can carry.
pub const MAX_TENANT_NAME_LEN: usize = 255;
/// Size of the file header.
pub const FILE_HEADER_LEN: usize = 32;
/// Size of a record's fixed part (everything before the payload).
pub const RECORD_FIXED_LEN: usize = 3 * KEY_LEN + 1 + 4 * 4 + 2 + 3 * 8;
/// Name of the snapshot file in the data directory.
pub const SNAPSHOT_FILE: &str = "store.snapshot";
/// Name of the file a snapshot is written to before it is renamed into place.
pub const SNAPSHOT_TMP_FILE: &str = "store.snapshot.tmp";

/// I/O buffer size of the file reader and writer.
const IO_BUFFER: usize = 1 << 20;

/// Errors writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing the file failed.
    #[error("snapshot I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The file does not start with [`MAGIC`].
    #[error("not a kvshare snapshot (bad magic)")]
    BadMagic,
    /// The file was written by another format version.
    #[error("snapshot format version {found} is not supported (this build reads {supported})")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The file header's checksum does not match.
    #[error("snapshot header checksum mismatch")]
    HeaderChecksum,
    /// The file ends inside a record.
    #[error("snapshot truncated in record {index}")]
    Truncated {
        /// Index of the record (0-based).
        index: u64,
    },
    /// A record's fixed part is invalid; the records after it cannot be framed.
    #[error("snapshot record {index} is invalid: {reason}")]
    InvalidRecord {
        /// Index of the record (0-based).
        index: u64,
        /// What is wrong.
        reason: String,
    },
    /// A record's checksum does not match (the record is skipped).
    #[error("snapshot record {index} checksum mismatch")]
    RecordChecksum {
        /// Index of the record (0-based).
        index: u64,
    },
    /// The writer was given a different number of records than its header announced.
    #[error("snapshot header announced {declared} records but {written} were written")]
    CountMismatch {
        /// Records announced.
        declared: u64,
        /// Records written.
        written: u64,
    },
}

/// Bounds a reader checks before allocating a record's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotLimits {
    /// Largest raw (decoded) block size accepted (the node's `--max-block-size`).
    pub max_block_size: u64,
}

/// Writes records after a file header announcing how many follow.
pub struct SnapshotWriter<W: Write> {
    w: W,
    declared: u64,
    written: u64,
}

impl<W: Write> SnapshotWriter<W> {
    /// Writes the file header announcing `records` records.
    pub fn new(mut w: W, records: u64) -> Result<Self, SnapshotError> {
        let mut h = [0u8; FILE_HEADER_LEN];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&0u32.to_le_bytes());
        h[16..24].copy_from_slice(&records.to_le_bytes());
        let sum = xxh3_64(&h[..24]);
        h[24..32].copy_from_slice(&sum.to_le_bytes());
        w.write_all(&h)?;
        Ok(SnapshotWriter {
            w,
            declared: records,
            written: 0,
        })
    }

    /// Appends one record.
    pub fn write_record(&mut self, rec: &StoredBlock) -> Result<(), SnapshotError> {
        if self.written >= self.declared {
            return Err(SnapshotError::CountMismatch {
                declared: self.declared,
                written: self.written + 1,
            });
        }
        let fixed = encode_fixed(rec);
        let name = rec.tenant.as_bytes();
        let name = &name[..name.len().min(MAX_TENANT_NAME_LEN)];
        let name_len = [name.len() as u8];
        let mut hasher = Xxh3Default::new();
        hasher.update(&fixed);
        hasher.update(&name_len);
        hasher.update(name);
        hasher.update(&rec.block.payload);
        self.w.write_all(&fixed)?;
        self.w.write_all(&name_len)?;
        self.w.write_all(name)?;
        self.w.write_all(&rec.block.payload)?;
        self.w.write_all(&hasher.digest().to_le_bytes())?;
        self.written += 1;
        Ok(())
    }

    /// Checks that every announced record was written and returns the inner writer.
    pub fn finish(mut self) -> Result<W, SnapshotError> {
        if self.written != self.declared {
            return Err(SnapshotError::CountMismatch {
                declared: self.declared,
                written: self.written,
            });
        }
        self.w.flush()?;
        Ok(self.w)
    }
}

fn encode_fixed(rec: &StoredBlock) -> [u8; RECORD_FIXED_LEN] {
    let h = &rec.block.header;
    let mut b = [0u8; RECORD_FIXED_LEN];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        b[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(&rec.key.namespace.0);
    put(&rec.key.key.0);
    put(&[u8::from(rec.parent.is_some())]);
    put(&rec.parent.map_or([0; KEY_LEN], |p| p.0));
    put(&h.layout.num_layers.to_le_bytes());
    put(&h.layout.num_kv_heads.to_le_bytes());
    put(&h.layout.head_dim.to_le_bytes());
    put(&h.layout.tokens_per_block.to_le_bytes());
    // Wire enum values are small positive numbers (1..=4).
    put(&[
        h.layout.dtype.to_proto() as i32 as u8,
        h.codec.to_proto() as i32 as u8,
    ]);
    put(&h.raw_len.to_le_bytes());
    put(&h.checksum.to_le_bytes());
    put(&h.payload_len.to_le_bytes());
    b
}

/// A little-endian cursor over a record's fixed part.
struct Fields<'a> {
    b: &'a [u8],
}

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let (head, rest) = self.b.split_at(N.min(self.b.len()));
        out[..head.len()].copy_from_slice(head);
        self.b = rest;
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

/// A record's fixed part, validated.
struct Fixed {
    key: StoreKey,
    parent: Option<BlockKey>,
    header: BlockHeader,
    payload_len: usize,
}

fn decode_fixed(b: &[u8; RECORD_FIXED_LEN], limits: &SnapshotLimits) -> Result<Fixed, String> {
    let mut f = Fields { b };
    let namespace = BlockKey(f.take());
    let key = BlockKey(f.take());
    let has_parent = f.take::<1>()[0];
    let parent = BlockKey(f.take());
    let parent = match has_parent {
        0 => None,
        1 => Some(parent),
        v => return Err(format!("parent flag is {v}, not 0 or 1")),
    };
    let (num_layers, num_kv_heads, head_dim, tokens_per_block) =
        (f.u32(), f.u32(), f.u32(), f.u32());
    let [dtype, codec] = f.take::<2>();
    let (raw_len, checksum, payload_len) = (f.u64(), f.u64(), f.u64());
    // The same checks as a header arriving on the wire: layout limits, codec, raw_len matching
    // the layout, payload_len within what any codec produces for raw_len.
    let header = BlockHeader::from_proto(&pb::BlockHeader {
        namespace: Bytes::copy_from_slice(&namespace.0),
        layout: Some(pb::KvLayout {
            num_layers,
            num_kv_heads,
            head_dim,
            dtype: i32::from(dtype),
            tokens_per_block,
        }),
        codec: i32::from(codec),
        raw_len,
        checksum,
        payload_len,
        // Set from the payload once it is read and its record checksum holds.
        payload_checksum: None,
    })
    .map_err(|e| e.to_string())?;
    if raw_len > limits.max_block_size {
        return Err(format!(
            "raw_len {raw_len} exceeds the largest block size {}",
            limits.max_block_size
        ));
    }
    let payload_len = usize::try_from(payload_len)
        .map_err(|_| format!("payload_len {payload_len} does not fit in memory"))?;
    Ok(Fixed {
        key: StoreKey { namespace, key },
        parent,
        header,
        payload_len,
    })
}

/// Reads the records of a snapshot, checking each one. An iterator of records: `Err` items
/// are records that could not be used; after an error that leaves the file unframed
/// ([`SnapshotError::Truncated`], [`SnapshotError::InvalidRecord`], I/O), it ends.
pub struct SnapshotReader<R: Read> {
    r: R,
    limits: SnapshotLimits,
    declared: u64,
    index: u64,
    done: bool,
    /// The file's format version ([`FORMAT_VERSION`] or [`FORMAT_VERSION_V1`]).
    version: u32,
}

impl<R: Read> SnapshotReader<R> {
    /// Reads and checks the file header.
    pub fn open(mut r: R, limits: SnapshotLimits) -> Result<Self, SnapshotError> {
        let mut h = [0u8; FILE_HEADER_LEN];
        r.read_exact(&mut h).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => SnapshotError::BadMagic,
            _ => SnapshotError::Io(e),
        })?;
        let mut f = Fields { b: &h };
        if f.take::<8>() != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let version = f.u32();
        if version != FORMAT_VERSION && version != FORMAT_VERSION_V1 {
            return Err(SnapshotError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let _flags = f.u32();
        let declared = f.u64();
        if f.u64() != xxh3_64(&h[..24]) {
            return Err(SnapshotError::HeaderChecksum);
        }
        Ok(SnapshotReader {
            r,
            limits,
            declared,
            index: 0,
            done: false,
            version,
        })
    }

    /// Records the header announces.
    pub fn declared_records(&self) -> u64 {
        self.declared
    }

    /// Records read so far (good or bad).
    pub fn records_read(&self) -> u64 {
        self.index
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => SnapshotError::Truncated { index: self.index },
            _ => SnapshotError::Io(e),
        })
    }

    fn read_record(&mut self) -> Result<StoredBlock, SnapshotError> {
        let index = self.index;
        let mut fixed = [0u8; RECORD_FIXED_LEN];
        self.read_exact(&mut fixed)?;
        let f = decode_fixed(&fixed, &self.limits)
            .map_err(|reason| SnapshotError::InvalidRecord { index, reason })?;
        let mut name_len = [0u8; 1];
        let mut name = Vec::new();
        if self.version >= FORMAT_VERSION {
            self.read_exact(&mut name_len)?;
            name = vec![0u8; usize::from(name_len[0])];
            self.read_exact(&mut name)?;
        }
        // Sizes are checked above (layout limits, max block size, codec bound) before this.
        let mut payload = vec![0u8; f.payload_len];
        self.read_exact(&mut payload)?;
        let mut sum = [0u8; 8];
        self.read_exact(&mut sum)?;
        let mut hasher = Xxh3Default::new();
        hasher.update(&fixed);
        if self.version >= FORMAT_VERSION {
            hasher.update(&name_len);
            hasher.update(&name);
        }
        hasher.update(&payload);
        if hasher.digest() != u64::from_le_bytes(sum) {
            return Err(SnapshotError::RecordChecksum { index });
        }
        let tenant: Arc<str> = if self.version >= FORMAT_VERSION {
            match String::from_utf8(name) {
                Ok(n) if !n.is_empty() => Arc::from(n),
                _ => return Err(SnapshotError::RecordChecksum { index }),
            }
        } else {
            Arc::from(DEFAULT_TENANT)
        };
        // The payload checksum is not stored: it is the hash of bytes the record checksum has
        // just vouched for, so peers the block is re-replicated to can check it cheaply.
        let header = BlockHeader {
            payload_checksum: Some(crate::codec::checksum(&payload)),
            ..f.header
        };
        Ok(StoredBlock {
            key: f.key,
            parent: f.parent,
            block: Arc::new(EncodedBlock {
                header,
                payload: Bytes::from(payload),
            }),
            tenant,
        })
    }
}

impl<R: Read> Iterator for SnapshotReader<R> {
    type Item = Result<StoredBlock, SnapshotError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.index >= self.declared {
            return None;
        }
        let r = self.read_record();
        self.index += 1;
        if let Err(e) = &r
            && !matches!(e, SnapshotError::RecordChecksum { .. })
        {
            self.done = true;
        }
        Some(r)
    }
}

/// What writing a snapshot did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveReport {
    /// Blocks written.
    pub blocks: u64,
    /// Payload bytes written.
    pub payload_bytes: u64,
    /// Size of the file.
    pub file_bytes: u64,
}

/// Writes every block of `store`, least recently used first, to `w`. The store's lock is taken
/// once to list the keys and once per block, never for the whole write; blocks removed
/// meanwhile are left out.
pub fn write_store<W: Write>(store: &BlockStore, w: W) -> Result<(W, SaveReport), SnapshotError> {
    let blocks: Vec<StoredBlock> = store
        .keys_oldest_first()
        .iter()
        .filter_map(|k| store.peek(k))
        .collect();
    let mut report = SaveReport {
        blocks: blocks.len() as u64,
        file_bytes: FILE_HEADER_LEN as u64,
        ..SaveReport::default()
    };
    let mut sw = SnapshotWriter::new(w, report.blocks)?;
    for b in &blocks {
        sw.write_record(b)?;
        let len = b.block.payload.len() as u64;
        report.payload_bytes += len;
        let name = b.tenant.len().min(MAX_TENANT_NAME_LEN) as u64;
        report.file_bytes += RECORD_FIXED_LEN as u64 + 1 + name + len + 8;
    }
    Ok((sw.finish()?, report))
}

/// What loading a snapshot did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Records the file header announced.
    pub declared_records: u64,
    /// Blocks stored.
    pub loaded_blocks: u64,
    /// Payload bytes stored.
    pub loaded_bytes: u64,
    /// Records not loaded because they were damaged, invalid or missing (truncated file).
    pub skipped_records: u64,
    /// Good records left out because the newer ones filled the store's free capacity.
    pub over_capacity: u64,
}

/// Loads a snapshot from `r` into `store` (see the module docs). `Err` only when the file
/// header is unusable; damaged records are counted in the report.
pub fn load_into<R: Read>(
    store: &BlockStore,
    r: R,
    limits: SnapshotLimits,
) -> Result<LoadReport, SnapshotError> {
    let mut reader = SnapshotReader::open(r, limits)?;
    let mut report = LoadReport {
        declared_records: reader.declared_records(),
        ..LoadReport::default()
    };
    // The newest records that fit: drop the oldest while the kept ones exceed the room.
    let room = store.capacity().saturating_sub(store.used_bytes());
    let mut kept: VecDeque<StoredBlock> = VecDeque::new();
    let mut kept_charge: u64 = 0;
    let mut good: u64 = 0;
    for rec in reader.by_ref() {
        let Ok(rec) = rec else { continue };
        good += 1;
        let charge = BlockStore::charge_of(&rec.block);
        if charge > room {
            report.over_capacity += 1;
            continue;
        }
        kept_charge = kept_charge.saturating_add(charge);
        kept.push_back(rec);
        while kept_charge > room {
            if let Some(old) = kept.pop_front() {
                kept_charge -= BlockStore::charge_of(&old.block);
                report.over_capacity += 1;
            } else {
                break;
            }
        }
    }
    report.skipped_records = report.declared_records.saturating_sub(good);
    let kept: Vec<StoredBlock> = kept.into();

    // Parents before children, so that each insert links to a stored parent. A parent that
    // follows its child in the file (a chain whose head was used last) is inserted first.
    let index: HashMap<StoreKey, usize> =
        kept.iter().enumerate().map(|(i, r)| (r.key, i)).collect();
    let parent_of = |i: usize| {
        let r = &kept[i];
        r.parent
            .filter(|p| *p != r.key.key)
            .and_then(|p| {
                index.get(&StoreKey {
                    namespace: r.key.namespace,
                    key: p,
                })
            })
            .copied()
    };
    const NEW: u8 = 0;
    const ON_PATH: u8 = 1;
    const PLACED: u8 = 2;
    let mut state = vec![NEW; kept.len()];
    let mut stored = vec![false; kept.len()];
    let mut path = Vec::new();
    for i in 0..kept.len() {
        let mut j = i;
        // Walk up to the first placed ancestor; a cycle (only in a forged file) stops the walk.
        while state[j] == NEW {
            state[j] = ON_PATH;
            path.push(j);
            match parent_of(j) {
                Some(p) => j = p,
                None => break,
            }
        }
        while let Some(j) = path.pop() {
            state[j] = PLACED;
            let r = &kept[j];
            if let Ok(crate::store::InsertOutcome::Stored { .. }) =
                store.insert_for(store.tenant_id(&r.tenant), r.key, r.parent, r.block.clone())
            {
                stored[j] = true;
                report.loaded_blocks += 1;
                report.loaded_bytes += r.block.payload.len() as u64;
            }
        }
    }
    // Replay recency: the file is least recently used first.
    for (r, s) in kept.iter().zip(&stored) {
        if *s {
            store.get(&r.key);
        }
    }
    Ok(report)
}

/// Writes `store` to `dir/store.snapshot` atomically: to `store.snapshot.tmp`, fsync, rename,
/// fsync of the directory.
pub fn save_to_dir(store: &BlockStore, dir: &Path) -> Result<SaveReport, SnapshotError> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(SNAPSHOT_TMP_FILE);
    let file = File::create(&tmp)?;
    let result =
        write_store(store, BufWriter::with_capacity(IO_BUFFER, file)).and_then(|(w, report)| {
            let file = w
                .into_inner()
                .map_err(|e| SnapshotError::Io(e.into_error()))?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
            File::open(dir)?.sync_all()?;
            Ok(report)
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The snapshot file in `dir`.
pub fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join(SNAPSHOT_FILE)
}

/// Loads `dir/store.snapshot` into `store` when it exists, then deletes it (and any leftover
/// `store.snapshot.tmp`), so that a later crash cannot bring back blocks deleted meanwhile.
/// `Ok(None)` when there is no snapshot; the file is deleted even when it is unusable.
pub fn load_from_dir(
    store: &BlockStore,
    dir: &Path,
    limits: SnapshotLimits,
) -> Result<Option<LoadReport>, SnapshotError> {
    let _ = std::fs::remove_file(dir.join(SNAPSHOT_TMP_FILE));
    let path = snapshot_path(dir);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let result = load_into(store, BufReader::with_capacity(IO_BUFFER, file), limits);
    std::fs::remove_file(&path)?;
    File::open(dir)?.sync_all()?;
    result.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;
    use crate::layout::{DType, KvLayout};
    use proptest::prelude::*;

    const LIMITS: SnapshotLimits = SnapshotLimits {
        max_block_size: 64 << 20,
    };

    fn ns(n: u8) -> BlockKey {
        BlockKey([n; 32])
    }

    fn skey(namespace: BlockKey, i: u32) -> StoreKey {
        let mut k = [0x5a; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        StoreKey {
            namespace,
            key: BlockKey(k),
        }
    }

    /// A block of `2 * head_dim` raw bytes derived from `seed`, compressed or not.
    fn block(namespace: BlockKey, seed: u32, head_dim: u32, codec: Codec) -> Arc<EncodedBlock> {
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim,
            dtype: DType::U8,
            tokens_per_block: 1,
        };
        let raw: Vec<u8> = (0..2 * head_dim)
            .map(|i| (i.wrapping_mul(31) ^ seed) as u8)
            .collect();
        Arc::new(EncodedBlock::encode(namespace, layout, codec, &raw).expect("encode"))
    }

    /// Two namespaces: a chain 0 -> 1 -> 2 -> 3 whose head was looked up last (so the tail is
    /// older than the head in the file), a star, and unrelated blocks.
    fn sample_store() -> BlockStore {
        let s = BlockStore::new(1 << 20);
        let a = ns(1);
        for i in 0..4u32 {
            let parent = i.checked_sub(1).map(|p| skey(a, p).key);
            s.insert(skey(a, i), parent, block(a, i, 40, Codec::Lz4))
                .expect("chain");
        }
        let team_b = s.tenant_id("team-b");
        for i in 10..13 {
            s.insert_for(
                team_b,
                skey(ns(2), i),
                None,
                block(ns(2), i, 8, Codec::None),
            )
            .expect("other");
        }
        s.insert(skey(a, 20), None, block(a, 20, 16, Codec::None))
            .expect("star");
        for i in 21..24 {
            s.insert(
                skey(a, i),
                Some(skey(a, 20).key),
                block(a, i, 16, Codec::None),
            )
            .expect("leaf");
        }
        let keys: Vec<BlockKey> = (0..4).map(|i| skey(a, i).key).collect();
        assert_eq!(s.lookup_prefix(a, &keys), 4);
        s.get(&skey(ns(2), 10));
        s
    }

    fn snapshot(s: &BlockStore) -> Vec<u8> {
        let (bytes, report) = write_store(s, Vec::new()).expect("write");
        assert_eq!(report.file_bytes, bytes.len() as u64);
        bytes
    }

    fn load(bytes: &[u8], capacity: u64) -> (BlockStore, Result<LoadReport, SnapshotError>) {
        let s = BlockStore::new(capacity);
        let r = load_into(&s, bytes, LIMITS);
        (s, r)
    }

    /// Every block of `loaded` is stored in `original` with the same bytes.
    fn subset_of(loaded: &BlockStore, original: &BlockStore) {
        for k in loaded.keys_oldest_first() {
            let got = loaded.peek(&k).expect("listed");
            let want = original.peek(&k).expect("loaded block was saved");
            assert_eq!(got.block, want.block);
        }
    }

    #[test]
    fn round_trip_keeps_blocks_parents_and_recency() {
        let s = sample_store();
        let bytes = snapshot(&s);
        let (t, r) = load(&bytes, 1 << 20);
        let r = r.expect("load");
        assert_eq!(r.declared_records, 11);
        assert_eq!(
            (r.loaded_blocks, r.skipped_records, r.over_capacity),
            (11, 0, 0)
        );
        assert_eq!(t.keys_oldest_first(), s.keys_oldest_first());
        for k in s.keys_oldest_first() {
            assert_eq!(t.peek(&k), s.peek(&k), "{k:?}");
        }
        assert_eq!(t.used_bytes(), s.used_bytes());
        // Chains still lose their tails first: in a store that is full, touch the chain's tail
        // (by recency alone it would now go last), then push unrelated blocks through.
        let (t, _) = load(&bytes, s.used_bytes());
        let a = ns(1);
        t.get(&skey(a, 3));
        let mut gone = Vec::new();
        for i in 100..140u32 {
            t.insert(skey(ns(4), i), None, block(ns(4), i, 16, Codec::None))
                .expect("fill");
            for c in 0..4 {
                if !t.contains(&skey(a, c)) && !gone.contains(&c) {
                    gone.push(c);
                }
            }
        }
        assert_eq!(gone, vec![3, 2, 1, 0]);
    }

    #[test]
    fn every_truncation_loads_a_prefix_and_counts_the_rest() {
        let s = sample_store();
        let bytes = snapshot(&s);
        for cut in 0..bytes.len() {
            let (t, r) = load(&bytes[..cut], 1 << 20);
            match r {
                Ok(r) => {
                    assert!(cut >= FILE_HEADER_LEN);
                    assert_eq!(r.loaded_blocks + r.skipped_records, 11, "cut {cut}");
                    assert!(r.skipped_records >= 1, "cut {cut}");
                    subset_of(&t, &s);
                }
                Err(e) => {
                    assert!(cut < FILE_HEADER_LEN, "cut {cut}: {e}");
                    assert!(matches!(e, SnapshotError::BadMagic), "{e}");
                }
            }
        }
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let s = sample_store();
        let bytes = snapshot(&s);
        let name_at = FILE_HEADER_LEN + RECORD_FIXED_LEN;
        let first_payload = name_at + 1 + usize::from(bytes[name_at]);
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            let (t, r) = load(&bad, 1 << 20);
            subset_of(&t, &s);
            if let Ok(r) = r {
                assert!(r.skipped_records >= 1, "flip at {at} went unnoticed");
                assert_eq!(r.loaded_blocks + r.skipped_records, 11);
            } else {
                assert!(at < FILE_HEADER_LEN, "flip at {at}");
            }
            if at == first_payload {
                // A payload byte: only that record is lost.
                let r = r.expect("load");
                assert_eq!((r.loaded_blocks, r.skipped_records), (10, 1));
            }
        }
    }

    fn with_header(bytes: &[u8], version: u32, count: u64) -> Vec<u8> {
        let mut b = bytes.to_vec();
        b[8..12].copy_from_slice(&version.to_le_bytes());
        b[16..24].copy_from_slice(&count.to_le_bytes());
        let sum = xxh3_64(&b[..24]);
        b[24..32].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// The same snapshot in format version 1 (no tenant names).
    fn as_version_1(v2: &[u8]) -> Vec<u8> {
        let mut out = with_header(&v2[..FILE_HEADER_LEN], FORMAT_VERSION_V1, 0);
        out[16..24].copy_from_slice(&v2[16..24]);
        let sum = xxh3_64(&out[..24]);
        out[24..32].copy_from_slice(&sum.to_le_bytes());
        let mut at = FILE_HEADER_LEN;
        while at < v2.len() {
            let fixed = &v2[at..at + RECORD_FIXED_LEN];
            let payload_len =
                u64::from_le_bytes(fixed[RECORD_FIXED_LEN - 8..].try_into().expect("8"));
            let name_len = usize::from(v2[at + RECORD_FIXED_LEN]);
            let p0 = at + RECORD_FIXED_LEN + 1 + name_len;
            let payload = &v2[p0..p0 + payload_len as usize];
            let mut h = Xxh3Default::new();
            h.update(fixed);
            h.update(payload);
            out.extend_from_slice(fixed);
            out.extend_from_slice(payload);
            out.extend_from_slice(&h.digest().to_le_bytes());
            at = p0 + payload_len as usize + 8;
        }
        out
    }

    #[test]
    fn version_1_files_load_as_the_default_tenant() {
        let s = sample_store();
        let v1 = as_version_1(&snapshot(&s));
        let (t, r) = load(&v1, 1 << 20);
        assert_eq!(r.expect("load").loaded_blocks, 11);
        assert_eq!(t.keys_oldest_first(), s.keys_oldest_first());
        for k in s.keys_oldest_first() {
            let (got, want) = (t.peek(&k).expect("loaded"), s.peek(&k).expect("saved"));
            assert_eq!(&*got.tenant, DEFAULT_TENANT);
            assert_eq!((got.parent, &got.block), (want.parent, &want.block));
        }
        let default = t.usage_of(crate::store::TenantId::DEFAULT);
        assert_eq!((default.blocks, default.bytes), (11, s.used_bytes()));
    }

    #[test]
    fn tenants_survive_a_round_trip() {
        let s = sample_store();
        let (t, _) = load(&snapshot(&s), 1 << 20);
        let b = t.usage_of(t.tenant_id("team-b"));
        assert_eq!(b.blocks, 3);
        assert_eq!(
            t.usage_of(crate::store::TenantId::DEFAULT).blocks + b.blocks,
            11
        );
    }

    #[test]
    fn other_versions_and_foreign_files_are_refused() {
        let bytes = snapshot(&sample_store());
        let (t, r) = load(&with_header(&bytes, 3, 11), 1 << 20);
        assert!(matches!(
            r,
            Err(SnapshotError::UnsupportedVersion {
                found: 3,
                supported: 2
            })
        ));
        assert_eq!(t.used_bytes(), 0);
        assert!(matches!(
            load(b"hello world, not a snapshot at all", 1 << 20).1,
            Err(SnapshotError::BadMagic)
        ));
        let mut bad = bytes.clone();
        bad[17] ^= 1; // the record count, without fixing the header checksum
        assert!(matches!(
            load(&bad, 1 << 20).1,
            Err(SnapshotError::HeaderChecksum)
        ));
        // A header announcing more records than follow: the missing ones are skipped.
        let r = load(&with_header(&bytes, 2, u64::MAX), 1 << 20)
            .1
            .expect("load");
        assert_eq!((r.loaded_blocks, r.skipped_records), (11, u64::MAX - 11));
    }

    /// A file with one record whose fixed part is patched by `patch` (record checksum fixed up,
    /// so only the size checks can refuse it).
    fn forged(patch: impl Fn(&mut [u8])) -> Vec<u8> {
        let s = BlockStore::new(1 << 20);
        s.insert(skey(ns(1), 0), None, block(ns(1), 0, 8, Codec::None))
            .expect("insert");
        let mut b = snapshot(&s);
        let rec = &mut b[FILE_HEADER_LEN..];
        patch(&mut rec[..RECORD_FIXED_LEN]);
        let end = rec.len() - 8;
        let sum = xxh3_64(&rec[..end]);
        rec[end..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    #[test]
    fn sizes_over_the_limits_are_skipped_before_allocating() {
        // Offsets in the fixed part.
        const LAYERS: usize = 97;
        const HEAD_DIM: usize = 105;
        const TOKENS: usize = 109;
        const RAW_LEN: usize = 115;
        const PAYLOAD_LEN: usize = 131;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "layers over the limit",
                forged(|f| f[LAYERS..LAYERS + 4].copy_from_slice(&u32::MAX.to_le_bytes())),
            ),
            (
                "payload_len of 2^63",
                forged(|f| {
                    f[PAYLOAD_LEN..PAYLOAD_LEN + 8].copy_from_slice(&(1u64 << 63).to_le_bytes())
                }),
            ),
            (
                "raw_len not the layout's",
                forged(|f| f[RAW_LEN..RAW_LEN + 8].copy_from_slice(&(1u64 << 40).to_le_bytes())),
            ),
            (
                "a valid 128 MiB block over --max-block-size (64 MiB)",
                forged(|f| {
                    f[HEAD_DIM..HEAD_DIM + 4].copy_from_slice(&(1u32 << 20).to_le_bytes());
                    f[TOKENS..TOKENS + 4].copy_from_slice(&64u32.to_le_bytes());
                    f[RAW_LEN..RAW_LEN + 8].copy_from_slice(&(1u64 << 27).to_le_bytes());
                    f[PAYLOAD_LEN..PAYLOAD_LEN + 8].copy_from_slice(&(1u64 << 27).to_le_bytes());
                }),
            ),
            ("parent flag 7", forged(|f| f[64] = 7)),
            ("unknown codec", forged(|f| f[114] = 9)),
        ];
        for (what, bytes) in cases {
            let mut reader = SnapshotReader::open(bytes.as_slice(), LIMITS).expect("header");
            let first = reader.next().expect("one record");
            assert!(
                matches!(first, Err(SnapshotError::InvalidRecord { index: 0, .. })),
                "{what}: {first:?}"
            );
            assert!(reader.next().is_none(), "{what}");
            let r = load(&bytes, 1 << 20).1.expect("load");
            assert_eq!((r.loaded_blocks, r.skipped_records), (0, 1), "{what}");
        }
        // The unpatched file loads: the offsets above are the ones the writer uses.
        let r = load(&forged(|_| {}), 1 << 20).1.expect("load");
        assert_eq!(r.loaded_blocks, 1);
    }

    #[test]
    fn a_smaller_store_keeps_the_newest_records() {
        let s = sample_store();
        let order = s.keys_oldest_first();
        let bytes = snapshot(&s);
        let newest_three: u64 = order[order.len() - 3..]
            .iter()
            .map(|k| BlockStore::charge_of(&s.peek(k).expect("stored").block))
            .sum();
        let (t, r) = load(&bytes, newest_three);
        let r = r.expect("load");
        assert_eq!(
            (r.loaded_blocks, r.over_capacity, r.skipped_records),
            (3, 8, 0)
        );
        assert_eq!(t.keys_oldest_first(), order[order.len() - 3..].to_vec());
    }

    #[test]
    fn a_forged_parent_cycle_loads_and_stays_evictable() {
        // Two records naming each other as parent.
        let s = BlockStore::new(1 << 20);
        let (a, b) = (skey(ns(1), 0), skey(ns(1), 1));
        s.insert(a, None, block(ns(1), 0, 8, Codec::None))
            .expect("a");
        s.insert(b, None, block(ns(1), 1, 8, Codec::None))
            .expect("b");
        let mut recs = vec![s.peek(&a).expect("a"), s.peek(&b).expect("b")];
        recs[0].parent = Some(b.key);
        recs[1].parent = Some(a.key);
        let mut w = SnapshotWriter::new(Vec::new(), 2).expect("writer");
        for r in &recs {
            w.write_record(r).expect("record");
        }
        let bytes = w.finish().expect("finish");
        let (t, r) = load(&bytes, 1 << 20);
        assert_eq!(r.expect("load").loaded_blocks, 2);
        // One of them is a leaf: an insert that needs room evicts it.
        let big = block(ns(2), 0, ((1 << 20) - 600) / 2, Codec::None);
        t.insert(skey(ns(2), 0), None, big).expect("room is made");
        assert!(!t.contains(&a) || !t.contains(&b));
    }

    #[test]
    fn writer_checks_the_announced_count() {
        let s = sample_store();
        let rec = s.peek(&s.keys_oldest_first()[0]).expect("stored");
        let w = SnapshotWriter::new(Vec::new(), 2).expect("writer");
        assert!(matches!(
            w.finish(),
            Err(SnapshotError::CountMismatch {
                declared: 2,
                written: 0
            })
        ));
        let mut w = SnapshotWriter::new(Vec::new(), 0).expect("writer");
        assert!(w.write_record(&rec).is_err());
    }

    #[test]
    fn files_in_a_directory_are_replaced_atomically_and_deleted_after_loading() {
        let dir =
            std::env::temp_dir().join(format!("kvshare-snapshot-test-{}", std::process::id()));
        let s = sample_store();
        let saved = save_to_dir(&s, &dir).expect("save");
        assert_eq!(saved.blocks, 11);
        assert!(snapshot_path(&dir).exists() && !dir.join(SNAPSHOT_TMP_FILE).exists());
        std::fs::write(dir.join(SNAPSHOT_TMP_FILE), b"half-written").expect("tmp");
        let t = BlockStore::new(1 << 20);
        let r = load_from_dir(&t, &dir, LIMITS)
            .expect("load")
            .expect("a snapshot");
        assert_eq!(r.loaded_blocks, 11);
        assert!(!snapshot_path(&dir).exists() && !dir.join(SNAPSHOT_TMP_FILE).exists());
        assert_eq!(load_from_dir(&t, &dir, LIMITS).expect("nothing"), None);
        // An unusable file is reported and deleted too.
        std::fs::write(snapshot_path(&dir), b"garbage").expect("garbage");
        assert!(load_from_dir(&t, &dir, LIMITS).is_err());
        assert!(!snapshot_path(&dir).exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// Write and load speed of a 1 GiB store (1 MiB blocks) through a file next to this crate:
    /// `cargo test --release -p kvshare-core --lib snapshot_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement: writes a 1 GiB file"]
    fn snapshot_speed_1gib() {
        let block_raw = 1u32 << 20;
        let layout = KvLayout {
            num_layers: 8,
            num_kv_heads: 8,
            head_dim: 128,
            dtype: DType::F16,
            tokens_per_block: 64,
        };
        assert_eq!(layout.block_bytes(), u64::from(block_raw) * 2);
        let n = 512u32; // 512 x 2 MiB = 1 GiB
        let s = BlockStore::new(2 << 30);
        for i in 0..n {
            let raw: Vec<u8> = (0..layout.block_bytes() as usize)
                .map(|j| (j as u32).wrapping_mul(2_654_435_761).wrapping_add(i) as u8)
                .collect();
            let b = EncodedBlock::encode(ns(1), layout, Codec::None, &raw).expect("encode");
            let parent = i.checked_sub(1).map(|p| skey(ns(1), p).key);
            s.insert(skey(ns(1), i), parent, Arc::new(b))
                .expect("insert");
        }
        let dir = tempfile_dir();
        let t0 = std::time::Instant::now();
        let saved = save_to_dir(&s, &dir).expect("save");
        let write = t0.elapsed().as_secs_f64();
        drop(s);
        // Drop the file's pages from the page cache (they are clean after the fsync), so the
        // load reads from the disk.
        {
            use std::os::fd::AsRawFd;
            let f = File::open(snapshot_path(&dir)).expect("open");
            // SAFETY: a valid open descriptor; the call only advises the kernel.
            let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0);
        }
        let t = BlockStore::new(2 << 30);
        let limits = SnapshotLimits {
            max_block_size: 64 << 20,
        };
        let t0 = std::time::Instant::now();
        let r = load_from_dir(&t, &dir, limits)
            .expect("load")
            .expect("some");
        let load = t0.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(r.loaded_blocks, u64::from(n));
        let mb = saved.file_bytes as f64 / 1e6;
        println!(
            "snapshot of {} blocks, {mb:.0} MB: write + fsync {write:.2} s = {:.0} MB/s; load (cold: pages dropped) {load:.2} s = {:.0} MB/s",
            saved.blocks,
            mb / write,
            mb / load
        );
    }

    fn tempfile_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("snapshot-speed-{}", std::process::id()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_stores_round_trip(
            ops in proptest::collection::vec((0..3u8, 0..30u32, proptest::option::weighted(0.7, 0..30u32), 1..40u32, any::<bool>()), 1..80),
            lookups in proptest::collection::vec((0..3u8, proptest::collection::vec(0..30u32, 1..5)), 0..20),
            cap_blocks in 4..40u64,
        ) {
            let s = BlockStore::new(cap_blocks * 400);
            for (n, k, p, size, lz4) in ops {
                let codec = if lz4 { Codec::Lz4 } else { Codec::None };
                let parent = p.map(|p| skey(ns(n), p).key);
                s.insert(skey(ns(n), k), parent, block(ns(n), k, size, codec)).expect("insert");
            }
            for (n, keys) in lookups {
                let keys: Vec<BlockKey> = keys.iter().map(|k| skey(ns(n), *k).key).collect();
                s.lookup_prefix(ns(n), &keys);
            }
            let bytes = snapshot(&s);
            let (t, r) = load(&bytes, s.capacity());
            let r = r.expect("load");
            prop_assert_eq!(r.loaded_blocks, s.keys_oldest_first().len() as u64);
            prop_assert_eq!(t.keys_oldest_first(), s.keys_oldest_first());
            for k in s.keys_oldest_first() {
                prop_assert_eq!(t.peek(&k), s.peek(&k));
            }
        }
    }
}
