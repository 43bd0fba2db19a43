//! What a squashfs image's metadata can expand to, known before any of it is unpacked.
//!
//! backhand unpacks an image's inode and directory tables whole when it opens it, and
//! parses every inode it finds there: an image of many tiny compressed metadata blocks
//! (each unpacks to 8 KiB) makes a megabyte file cost hundreds of megabytes before any
//! entry limit can run. So before backhand reads a byte, the superblock and the tables'
//! block headers (two bytes each, read in place) bound what the tables unpack to, and
//! the image is refused when that is more than its entries can need:
//!
//! - `inode_count` at most `maxEntries`, fragments at most one per inode;
//! - the inode and directory tables together at most [`BYTES_PER_INODE`] per inode, plus
//!   the data block lists its files may have (`expansion_budget / block_size` sizes of
//!   four bytes) and a last, partly filled block per table;
//! - and at most `maxExpansionRatio` times what they take in the file (once over
//!   [`RATIO_FLOOR`]): real tables compress 5–20 times.
//!
//! Only the headers are read, stopping at the first block over the budget, so refusing
//! costs no memory. A table whose blocks do not end where the next table starts is
//! refused as damaged.

use std::{fs::File, os::unix::fs::FileExt as _};

use crate::{Error, Limits, Result};

/// Unpacked inode and directory table bytes one inode may need: an extended file inode
/// (56), its directory entry with a long name (8 + 128) and its share of headers, with
/// room to spare (mksquashfs writes about 80 for a registry tree of 64-character names).
pub const BYTES_PER_INODE: u64 = 256;
/// Tables whose bound is below this are not held to the ratio (a small table's one
/// partly filled block counts as a whole 8 KiB).
pub const RATIO_FLOOR: u64 = 1 << 20;

const MAGIC: u32 = 0x7371_7368;
const SUPERBLOCK: usize = 96;
const NOT_SET: u64 = u64::MAX;
const METADATA_MAX: u64 = 8192;
const UNCOMPRESSED: u16 = 0x8000;
const FLAG_EXPORTABLE: u16 = 0x0080;

/// The superblock fields the bound needs (squashfs 4.0, little endian).
#[derive(Debug, Clone, Copy)]
struct Superblock {
    inode_count: u64,
    block_size: u64,
    frag_count: u64,
    flags: u16,
    bytes_used: u64,
    id_table: u64,
    inode_table: u64,
    dir_table: u64,
    frag_table: u64,
    export_table: u64,
}

impl Superblock {
    fn parse(b: &[u8; SUPERBLOCK]) -> Option<Self> {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        (u32_at(0) == MAGIC && u16_at(28) == 4).then(|| Superblock {
            inode_count: u32_at(4).into(),
            block_size: u32_at(12).into(),
            frag_count: u32_at(16).into(),
            flags: u16_at(24),
            bytes_used: u64_at(40),
            id_table: u64_at(48),
            inode_table: u64_at(64),
            dir_table: u64_at(72),
            frag_table: u64_at(80),
            export_table: u64_at(88),
        })
    }
}

/// What the tables of an image unpack to at most, as read from their block headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tables {
    pub inodes: u64,
    pub blocks: u64,
    /// Bytes the inode and directory tables take in the file.
    pub stored: u64,
    /// Bytes they unpack to at most.
    pub unpacked: u64,
}

/// Checks that the metadata of the squashfs image in `file` (`len` bytes) stays within
/// what `limits` allow, before it is parsed; returns what was found.
pub fn check(file: &File, len: u64, limits: &Limits) -> Result<Tables> {
    let damaged = |why: String| Error::Squashfs(format!("damaged image: {why}"));
    let mut raw = [0u8; SUPERBLOCK];
    read_at(file, &mut raw, 0).map_err(|_| damaged("no superblock".into()))?;
    let Some(sb) = Superblock::parse(&raw) else {
        // Not squashfs 4.0 little endian: backhand refuses it with its own reason.
        return Ok(Tables::default());
    };
    if sb.inode_count > limits.max_entries {
        return Err(Error::Hostile(format!(
            "the squashfs image says it has {} inodes, over the limit of {} entries \
             (maxEntries)",
            sb.inode_count, limits.max_entries
        )));
    }
    if sb.frag_count > sb.inode_count.max(1) {
        return Err(Error::Hostile(format!(
            "the squashfs image says it has {} fragments for {} inodes (each fragment \
             holds the end of at least one file)",
            sb.frag_count, sb.inode_count
        )));
    }
    if !sb.block_size.is_power_of_two() || !(4096..=1 << 20).contains(&sb.block_size) {
        return Err(damaged(format!("block size {}", sb.block_size)));
    }
    let end = len.min(sb.bytes_used);
    let pointer = |at: u64| -> Result<u64> {
        let mut b = [0u8; 8];
        read_at(file, &mut b, at).map_err(|_| damaged(format!("no table pointer at byte {at}")))?;
        Ok(u64::from_le_bytes(b))
    };
    // The directory table ends where backhand stops reading it: at the first fragment
    // table block, else the first export table block, else the first id table block.
    let dir_end = if sb.frag_count > 0 && sb.frag_table != NOT_SET {
        pointer(sb.frag_table)?
    } else if sb.flags & FLAG_EXPORTABLE != 0 && sb.export_table != NOT_SET {
        pointer(sb.export_table)?
    } else {
        pointer(sb.id_table)?
    };
    let blocks_of_lists = limits.expansion_budget(len) / sb.block_size + sb.inode_count;
    let budget = sb
        .inode_count
        .saturating_mul(BYTES_PER_INODE)
        .saturating_add(blocks_of_lists.saturating_mul(4))
        .saturating_add(2 * METADATA_MAX);
    let mut t = Tables {
        inodes: sb.inode_count,
        ..Tables::default()
    };
    for (name, from, to) in [
        ("inode", sb.inode_table, sb.dir_table),
        ("directory", sb.dir_table, dir_end),
    ] {
        if from > to || to > end {
            return Err(damaged(format!(
                "the {name} table runs from byte {from} to {to}, in an image of {end} bytes"
            )));
        }
        walk(file, name, from, to, &mut t, |t| {
            let ratio = limits
                .max_expansion_ratio
                .saturating_mul(t.stored)
                .max(RATIO_FLOOR);
            if t.unpacked > budget {
                return Err(Error::Hostile(format!(
                    "the squashfs image's metadata unpacks to more than {} bytes ({} blocks \
                     in {} bytes so far), over the {budget} bytes {} inodes need (maxEntries)",
                    t.unpacked, t.blocks, t.stored, sb.inode_count
                )));
            }
            if t.unpacked > ratio {
                return Err(Error::Hostile(format!(
                    "the squashfs image's metadata unpacks to more than {} bytes from {} \
                     ({} blocks), over {} times what it takes in the file \
                     (maxExpansionRatio)",
                    t.unpacked, t.stored, t.blocks, limits.max_expansion_ratio
                )));
            }
            Ok(())
        })?;
    }
    Ok(t)
}

/// Adds the metadata blocks from `from` to `to` to `t`, calling `within` after each.
fn walk(
    file: &File,
    name: &str,
    from: u64,
    to: u64,
    t: &mut Tables,
    within: impl Fn(&Tables) -> Result<()>,
) -> Result<()> {
    let mut at = from;
    while at < to {
        let mut h = [0u8; 2];
        read_at(file, &mut h, at).map_err(|_| {
            Error::Squashfs(format!(
                "damaged image: the {name} table's block at byte {at} cannot be read"
            ))
        })?;
        let h = u16::from_le_bytes(h);
        let size = u64::from(h & !UNCOMPRESSED);
        if size > METADATA_MAX {
            return Err(Error::Squashfs(format!(
                "damaged image: a {name} table block of {size} bytes at byte {at}"
            )));
        }
        t.blocks += 1;
        t.stored += 2 + size;
        t.unpacked += if h & UNCOMPRESSED != 0 {
            size
        } else {
            METADATA_MAX
        };
        within(t)?;
        at += 2 + size;
    }
    if at != to {
        return Err(Error::Squashfs(format!(
            "damaged image: the {name} table's last block ends at byte {at}, past the next \
             table at {to}"
        )));
    }
    Ok(())
}

fn read_at(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    file.read_exact_at(buf, at)
}
