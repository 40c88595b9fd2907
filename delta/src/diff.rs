//! The bsdiff-style diff and its patch stream.
//!
//! Matches are found by qbsdiff (suffix array, bsdiff 4 controls); its bzip2 container is
//! replaced by three zstd frames — controls, byte-wise differences, new bytes — compressed
//! apart because their statistics differ. Applying streams: the old bytes in memory, the patch
//! read as it is decompressed, the new bytes written out as they come.
//!
//! Stream: varints `new_len`, `ctrl_len`, `diff_len`, `extra_len` (compressed sizes), then the
//! three frames. Controls (decompressed): per step varints `add`, `copy`, and `seek` zigzagged.

use std::io::{Read, Write};

use crate::DeltaError;

#[cfg(feature = "make")]
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn get_varint(input: &mut &[u8]) -> Result<u64, DeltaError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first().ok_or_else(|| DeltaError::Corrupt("patch ends inside a number".into()))?;
        *input = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DeltaError::Corrupt("a number in the patch is too long".into()))
}

/// zstd level for patches: made once on the repository, fetched by many devices.
#[cfg(feature = "make")]
const LEVEL: i32 = 22;
/// Shortest match bsdiff keeps. Measured over the Debian pairs in bench/delta.sh: qbsdiff's
/// default 12 gives 0.82x debdelta's bytes in total, 16 to 20 give 0.77x (libssl3 loses 10%).
#[cfg(feature = "make")]
const SMALL_MATCH: usize = 16;

#[cfg(feature = "make")]
pub fn make(old: &[u8], new: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let mut bsdiff4 = Vec::new();
    qbsdiff::Bsdiff::new(old, new)
        .small_match(SMALL_MATCH)
        .compare(std::io::Cursor::new(&mut bsdiff4))
        .map_err(|e| DeltaError::Io(format!("diffing: {e}")))?;
    // BSDIFF40, then the three bzip2 streams' sizes and the new size (sign-magnitude i64 LE).
    let int = |at: usize| -> u64 {
        let x = u64::from_le_bytes(bsdiff4[at..at + 8].try_into().expect("8 bytes"));
        x & !(1 << 63)
    };
    let (clen, dlen) = (int(8) as usize, int(16) as usize);
    let unbz = |b: &[u8]| -> Result<Vec<u8>, DeltaError> {
        let mut out = Vec::new();
        bzip2::read::BzDecoder::new(b)
            .read_to_end(&mut out)
            .map_err(|e| DeltaError::Io(format!("bsdiff output: {e}")))?;
        Ok(out)
    };
    let ctrl4 = unbz(&bsdiff4[32..32 + clen])?;
    let diff = unbz(&bsdiff4[32 + clen..32 + clen + dlen])?;
    let extra = unbz(&bsdiff4[32 + clen + dlen..])?;
    let mut ctrl = Vec::with_capacity(ctrl4.len() / 3);
    for step in ctrl4.chunks_exact(24) {
        let word = |i: usize| u64::from_le_bytes(step[i..i + 8].try_into().expect("8 bytes"));
        let seek = word(16);
        let seek: i64 = if seek >> 63 == 0 { seek as i64 } else { -((seek & !(1 << 63)) as i64) };
        put_varint(&mut ctrl, word(0));
        put_varint(&mut ctrl, word(8));
        put_varint(&mut ctrl, ((seek << 1) ^ (seek >> 63)) as u64);
    }
    let z = |b: &[u8]| zstd::bulk::compress(b, LEVEL).map_err(|e| DeltaError::Io(format!("zstd: {e}")));
    let (ctrl, diff) = (z(&ctrl)?, z(&diff)?);
    let extra = compress_with_reference(&extra, old).map_err(|e| DeltaError::Io(format!("zstd: {e}")))?;
    let mut out = Vec::new();
    for n in [new.len(), ctrl.len(), diff.len(), extra.len()] {
        put_varint(&mut out, n as u64);
    }
    out.extend_from_slice(&ctrl);
    out.extend_from_slice(&diff);
    out.extend_from_slice(&extra);
    Ok(out)
}

/// The window that reaches back over the whole reference (the old bytes) from the end of `len`
/// new bytes.
fn window_log(reference: usize, len: usize) -> u32 {
    let span = (reference as u64).saturating_add(len as u64).max(1 << 10);
    (64 - (span - 1).leading_zeros()).clamp(10, 30)
}

/// The new bytes bsdiff found no match for still share shorter runs with the old bytes: zstd
/// with the old bytes as its reference prefix (as `zstd --patch-from`) finds those.
#[cfg(feature = "make")]
fn compress_with_reference(data: &[u8], reference: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut enc = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), LEVEL, reference)?;
    enc.window_log(window_log(reference.len(), data.len()))?;
    enc.long_distance_matching(true)?;
    enc.set_pledged_src_size(Some(data.len() as u64))?;
    enc.include_contentsize(true)?;
    enc.write_all(data)?;
    enc.finish()
}

/// The size of the bytes a patch rebuilds, read from its start.
pub fn new_len(mut patch: &[u8]) -> Result<u64, DeltaError> {
    get_varint(&mut patch)
}

/// Applies `patch` to `old`, writing the new bytes to `out`; returns how many were written.
pub fn apply(old: &[u8], mut patch: &[u8], out: &mut dyn Write) -> Result<u64, DeltaError> {
    let new_len = get_varint(&mut patch)?;
    if new_len > crate::deb::MAX_MEMBER_BYTES {
        return Err(DeltaError::Corrupt(format!("the patch claims {new_len} bytes, more than a member may hold")));
    }
    let take = |patch: &mut &[u8]| -> Result<usize, DeltaError> {
        let n = get_varint(patch)?;
        usize::try_from(n).map_err(|_| DeltaError::Corrupt("stream size overflows".into()))
    };
    let (clen, dlen, elen) = (take(&mut patch)?, take(&mut patch)?, take(&mut patch)?);
    if clen.checked_add(dlen).and_then(|x| x.checked_add(elen)) != Some(patch.len()) {
        return Err(DeltaError::Corrupt("patch streams do not add up to the patch's size".into()));
    }
    let (cz, rest) = patch.split_at(clen);
    let (dz, ez) = rest.split_at(dlen);
    let corrupt = |what: &str, e: std::io::Error| DeltaError::Corrupt(format!("{what} stream: {e}"));
    // Every step takes at least one byte of controls and moves the output by `add + copy`;
    // a control stream larger than this cannot be honest.
    let mut ctrl = Vec::new();
    zstd::stream::read::Decoder::with_buffer(cz)
        .map_err(|e| corrupt("control", e))?
        .take(new_len.saturating_mul(30).saturating_add(64).min(256 << 20))
        .read_to_end(&mut ctrl)
        .map_err(|e| corrupt("control", e))?;
    let mut diff = zstd::stream::read::Decoder::with_buffer(dz).map_err(|e| corrupt("difference", e))?;
    let mut extra = zstd::stream::read::Decoder::with_ref_prefix(ez, old).map_err(|e| corrupt("new-bytes", e))?;
    extra.window_log_max(window_log(old.len(), new_len as usize)).map_err(|e| corrupt("new-bytes", e))?;
    let mut ctrl = &ctrl[..];
    let mut written = 0u64;
    let mut spos: i64 = 0;
    let mut buf = vec![0u8; 1 << 16];
    while !ctrl.is_empty() {
        let add = get_varint(&mut ctrl)?;
        let copy = get_varint(&mut ctrl)?;
        let z = get_varint(&mut ctrl)?;
        let seek = ((z >> 1) as i64) ^ -((z & 1) as i64);
        if written.checked_add(add).and_then(|w| w.checked_add(copy)).is_none_or(|w| w > new_len) {
            return Err(DeltaError::Corrupt("the patch writes beyond the new size".into()));
        }
        let start =
            usize::try_from(spos).map_err(|_| DeltaError::Corrupt("the patch reads before the old bytes".into()))?;
        if start.checked_add(add as usize).is_none_or(|end| end > old.len()) {
            return Err(DeltaError::Corrupt("the patch reads beyond the old bytes".into()));
        }
        let mut left = add as usize;
        let mut at = start;
        while left > 0 {
            let n = left.min(buf.len());
            diff.read_exact(&mut buf[..n]).map_err(|e| corrupt("difference", e))?;
            for (b, o) in buf[..n].iter_mut().zip(&old[at..at + n]) {
                *b = b.wrapping_add(*o);
            }
            out.write_all(&buf[..n]).map_err(write_error)?;
            at += n;
            left -= n;
        }
        let mut left = copy as usize;
        while left > 0 {
            let n = left.min(buf.len());
            extra.read_exact(&mut buf[..n]).map_err(|e| corrupt("new-bytes", e))?;
            out.write_all(&buf[..n]).map_err(write_error)?;
            left -= n;
        }
        written += add + copy;
        spos = (start as i64 + add as i64)
            .checked_add(seek)
            .ok_or_else(|| DeltaError::Corrupt("the patch seeks out of range".into()))?;
    }
    if written != new_len {
        return Err(DeltaError::Corrupt(format!("the patch rebuilt {written} bytes of {new_len}")));
    }
    let mut probe = [0u8; 1];
    if diff.read(&mut probe).map_err(|e| corrupt("difference", e))? != 0
        || extra.read(&mut probe).map_err(|e| corrupt("new-bytes", e))? != 0
    {
        return Err(DeltaError::Corrupt("the patch has data left over".into()));
    }
    Ok(written)
}

/// A write error may carry our own error (a recompression that did not match): keep it.
fn write_error(e: std::io::Error) -> DeltaError {
    match e.into_inner() {
        Some(inner) => match inner.downcast::<DeltaError>() {
            Ok(d) => *d,
            Err(other) => DeltaError::Io(other.to_string()),
        },
        None => DeltaError::Io("writing the rebuilt package".into()),
    }
}

#[cfg(all(test, feature = "make"))]
mod tests {
    use super::*;

    #[test]
    fn patches_rebuild_the_new_bytes() {
        let old: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut new = old.clone();
        new[1000..1010].copy_from_slice(b"0123456789");
        new.splice(50_000..50_000, b"inserted bytes".iter().copied());
        new.truncate(180_000);
        let patch = make(&old, &new).unwrap();
        assert!(patch.len() < 2_000, "{}", patch.len());
        let mut out = Vec::new();
        assert_eq!(apply(&old, &patch, &mut out).unwrap(), new.len() as u64);
        assert_eq!(out, new);
    }

    #[test]
    fn a_damaged_patch_is_an_error_never_a_panic() {
        let old = b"the quick brown fox jumps over the lazy dog".repeat(100);
        let new = b"the quick brown cat jumps over the lazy dog".repeat(100);
        let patch = make(&old, &new).unwrap();
        for i in 0..patch.len() {
            for flip in [1u8, 0x80] {
                let mut bad = patch.clone();
                bad[i] ^= flip;
                let mut out = Vec::new();
                if apply(&old, &bad, &mut out).is_ok() {
                    // zstd frames without checksums can decode damaged bytes; the caller's hash
                    // check is what catches those, so only the length must hold here.
                    assert_eq!(out.len(), new.len());
                }
            }
        }
        for cut in 0..patch.len() {
            assert!(apply(&old, &patch[..cut], &mut Vec::new()).is_err());
        }
        assert!(apply(&old[..10], &patch, &mut Vec::new()).is_err());
    }
}
