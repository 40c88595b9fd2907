//! Incremental compression of Packages indices. A publish changes one stanza among thousands,
//! so the text is cut into chunks at content-defined stanza boundaries and each chunk is
//! compressed once and cached:
//! - `.gz`: one gzip member per chunk; concatenated members are one valid gzip file (RFC 1952)
//!   that zlib, and so apt, reads to the end.
//! - `.xz`: one xz *block* per chunk inside a single stream, with the stream header, index and
//!   footer rebuilt around the cached blocks — the layout multi-threaded xz produces. apt's
//!   decoder does not accept concatenated xz *streams*, which is why this is done block-wise.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use lzma_sys::{
    lzma_check, lzma_filter, lzma_options_lzma, lzma_ret, lzma_stream_flags, lzma_vli, LZMA_CHECK_CRC64,
    LZMA_FILTER_LZMA2, LZMA_OK, LZMA_VLI_UNKNOWN,
};

/// The `lzma_block` structure of liblzma 5 (api/lzma/block.h), which lzma-sys does not bind.
#[repr(C)]
struct LzmaBlock {
    version: u32,
    header_size: u32,
    check: lzma_check,
    compressed_size: lzma_vli,
    uncompressed_size: lzma_vli,
    filters: *mut lzma_filter,
    raw_check: [u8; 64],
    reserved_ptr: [*mut std::ffi::c_void; 3],
    reserved_int1: u32,
    reserved_int2: u32,
    reserved_int3_8: [lzma_vli; 6],
    reserved_enum: [u32; 4],
    ignore_check: u8,
    reserved_bool: [u8; 7],
}

#[repr(C)]
struct LzmaIndex {
    _private: [u8; 0],
}

extern "C" {
    fn lzma_block_buffer_bound(uncompressed_size: usize) -> usize;
    fn lzma_block_buffer_encode(
        block: *mut LzmaBlock,
        allocator: *const std::ffi::c_void,
        input: *const u8,
        in_size: usize,
        out: *mut u8,
        out_pos: *mut usize,
        out_size: usize,
    ) -> lzma_ret;
    fn lzma_block_unpadded_size(block: *const LzmaBlock) -> lzma_vli;
    fn lzma_index_init(allocator: *const std::ffi::c_void) -> *mut LzmaIndex;
    fn lzma_index_append(
        i: *mut LzmaIndex,
        allocator: *const std::ffi::c_void,
        unpadded_size: lzma_vli,
        uncompressed_size: lzma_vli,
    ) -> lzma_ret;
    fn lzma_index_size(i: *const LzmaIndex) -> lzma_vli;
    fn lzma_index_buffer_encode(i: *const LzmaIndex, out: *mut u8, out_pos: *mut usize, out_size: usize) -> lzma_ret;
    fn lzma_index_end(i: *mut LzmaIndex, allocator: *const std::ffi::c_void);
}

/// One chunk, compressed both ways.
pub struct Chunk {
    gz: Vec<u8>,
    xz_block: Vec<u8>,
    unpadded: u64,
    uncompressed: u64,
}

fn xz_block(data: &[u8], preset: u32) -> Chunk {
    // SAFETY: plain liblzma calls on buffers we own and size as liblzma asks; the options and
    // filter array outlive the call.
    unsafe {
        let mut opts: lzma_options_lzma = std::mem::zeroed();
        assert!(lzma_sys::lzma_lzma_preset(&mut opts, preset) == 0, "xz preset {preset}");
        let mut filters = [
            lzma_filter { id: LZMA_FILTER_LZMA2, options: &mut opts as *mut _ as *mut _ },
            lzma_filter { id: LZMA_VLI_UNKNOWN, options: std::ptr::null_mut() },
        ];
        let mut block: LzmaBlock = std::mem::zeroed();
        block.version = 0;
        block.check = LZMA_CHECK_CRC64;
        block.filters = filters.as_mut_ptr();
        let bound = lzma_block_buffer_bound(data.len());
        let mut out = vec![0u8; bound];
        let mut pos = 0usize;
        let ret = lzma_block_buffer_encode(
            &mut block,
            std::ptr::null(),
            data.as_ptr(),
            data.len(),
            out.as_mut_ptr(),
            &mut pos,
            bound,
        );
        assert!(ret == LZMA_OK, "lzma_block_buffer_encode: {ret}");
        out.truncate(pos);
        let unpadded = lzma_block_unpadded_size(&block);
        Chunk { gz: Vec::new(), xz_block: out, unpadded, uncompressed: data.len() as u64 }
    }
}

fn stream_flags(backward_size: lzma_vli) -> lzma_stream_flags {
    // SAFETY: an all-zero lzma_stream_flags is valid (version 0, reserved fields zero).
    let mut f: lzma_stream_flags = unsafe { std::mem::zeroed() };
    f.version = 0;
    f.check = LZMA_CHECK_CRC64;
    f.backward_size = backward_size;
    f
}

/// Assembles one xz stream from cached blocks.
fn xz_stream(chunks: &[Arc<Chunk>]) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    // SAFETY: liblzma writes exactly 12 bytes of stream header/footer; the index is sized by
    // lzma_index_size and freed before returning.
    unsafe {
        let flags = stream_flags(0);
        assert!(lzma_sys::lzma_stream_header_encode(&flags, out.as_mut_ptr()) == LZMA_OK);
        let index = lzma_index_init(std::ptr::null());
        assert!(!index.is_null(), "lzma_index_init");
        for c in chunks {
            out.extend_from_slice(&c.xz_block);
            assert!(lzma_index_append(index, std::ptr::null(), c.unpadded, c.uncompressed) == LZMA_OK);
        }
        let index_size = lzma_index_size(index) as usize;
        let start = out.len();
        out.resize(start + index_size, 0);
        let mut pos = 0usize;
        let ret = lzma_index_buffer_encode(index, out[start..].as_mut_ptr(), &mut pos, index_size);
        lzma_index_end(index, std::ptr::null());
        assert!(ret == LZMA_OK && pos == index_size, "lzma_index_buffer_encode: {ret}");
        let footer_flags = stream_flags(index_size as lzma_vli);
        let mut footer = [0u8; 12];
        assert!(lzma_sys::lzma_stream_footer_encode(&footer_flags, footer.as_mut_ptr()) == LZMA_OK);
        out.extend_from_slice(&footer);
    }
    out
}

/// One gzip member of `data`: a whole .gz file on its own.
pub(crate) fn gzip_member(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    enc.write_all(data).expect("in-memory write");
    enc.finish().expect("in-memory write")
}

/// A chunk of a Packages file: its text and a key naming its content.
pub struct ChunkText {
    pub key: String,
    pub text: String,
}

/// One stanza as the chunker sees it: the boundary hash, the text, and an identity that
/// determines the text (the .deb's SHA-256 and pool path), cheaper to hash than the text.
pub struct Stanza {
    pub boundary: u64,
    pub text: std::sync::Arc<str>,
    pub identity: String,
}

/// Splits stanzas into chunks: a chunk ends after a stanza whose boundary hash (of the
/// package's identity) has its low bits zero, so inserting or removing one stanza changes one
/// chunk only.
pub fn chunks(stanzas: Vec<Stanza>) -> Vec<ChunkText> {
    use sha2::Digest;
    const AVERAGE: u64 = 128;
    let mut out = Vec::new();
    let mut text = String::new();
    let mut hasher = sha2::Sha256::new();
    let n = stanzas.len();
    for (i, s) in stanzas.into_iter().enumerate() {
        text.push_str(&s.text);
        hasher.update(s.identity.as_bytes());
        hasher.update(b"\n");
        if s.boundary % AVERAGE == 0 || i + 1 == n {
            let key = crate::fsutil::hex(&std::mem::take(&mut hasher).finalize());
            out.push(ChunkText { key, text: std::mem::take(&mut text) });
        }
    }
    out
}

/// FNV-1a: a cheap, stable hash for chunk boundaries (not for integrity).
pub fn boundary_hash(parts: &[&str]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.bytes().chain([0u8]))
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Compressed chunks by content key, kept between builds.
#[derive(Default)]
pub struct ChunkCache {
    map: HashMap<String, Arc<Chunk>>,
}

impl ChunkCache {
    /// Returns (gz, xz) of the concatenated chunks, compressing only chunks not seen before.
    /// Entries no build used this time are dropped afterwards by [`ChunkCache::retain`].
    pub fn build(&mut self, chunks: &[ChunkText], preset: u32, used: &mut Vec<String>) -> (Vec<u8>, Vec<u8>) {
        let keys: Vec<String> = chunks.iter().map(|c| c.key.clone()).collect();
        let missing: Vec<usize> = (0..chunks.len()).filter(|&i| !self.map.contains_key(&keys[i])).collect();
        // Compress the new chunks on every core.
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(missing.len().max(1));
        let fresh: Vec<(usize, Chunk)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let mine: Vec<usize> = missing.iter().copied().skip(t).step_by(threads).collect();
                    s.spawn(move || {
                        mine.into_iter()
                            .map(|i| {
                                let mut c = xz_block(chunks[i].text.as_bytes(), preset);
                                c.gz = gzip_member(chunks[i].text.as_bytes());
                                (i, c)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("compression thread")).collect()
        });
        for (i, c) in fresh {
            self.map.insert(keys[i].clone(), Arc::new(c));
        }
        let parts: Vec<Arc<Chunk>> = keys.iter().map(|k| self.map[k].clone()).collect();
        used.extend(keys);
        let mut gz = Vec::with_capacity(parts.iter().map(|c| c.gz.len()).sum());
        for c in &parts {
            gz.extend_from_slice(&c.gz);
        }
        if parts.is_empty() {
            gz = gzip_member(b"");
        }
        (gz, xz_stream(&parts))
    }

    pub fn retain(&mut self, used: &[String]) {
        let keep: std::collections::HashSet<&String> = used.iter().collect();
        self.map.retain(|k, _| keep.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn text(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("Package: pkg-{i}\nVersion: 1.{i}\nDescription: thing {i}\n\n")).collect()
    }

    fn keyed(stanzas: &[String]) -> Vec<Stanza> {
        stanzas
            .iter()
            .map(|s| Stanza { boundary: boundary_hash(&[s]), text: Arc::from(s.as_str()), identity: s.clone() })
            .collect()
    }

    #[test]
    fn gz_and_xz_decode_to_the_whole_text_and_reuse_chunks() {
        let stanzas = text(3000);
        let whole: String = stanzas.concat();
        let chunks1 = chunks(keyed(&stanzas));
        assert!(chunks1.len() > 5, "{}", chunks1.len());
        let mut cache = ChunkCache::default();
        let mut used = Vec::new();
        let (gz, xz) = cache.build(&chunks1, 6, &mut used);
        let mut got = String::new();
        flate2::read::MultiGzDecoder::new(&gz[..]).read_to_string(&mut got).unwrap();
        assert_eq!(got, whole);
        // A single-stream decoder (as apt uses) must see everything.
        let mut got = String::new();
        xz2::read::XzDecoder::new(&xz[..]).read_to_string(&mut got).unwrap();
        assert_eq!(got, whole);
        // One more stanza changes one chunk.
        let mut more = stanzas.clone();
        more.insert(1500, "Package: new\nVersion: 1\nDescription: n\n\n".into());
        let chunks2 = chunks(keyed(&more));
        let changed = chunks2.iter().filter(|c| !chunks1.iter().any(|o| o.text == c.text)).count();
        assert!(changed <= 2, "{changed}");
        let before = cache.map.len();
        let (_, xz2) = cache.build(&chunks2, 6, &mut used);
        assert!(cache.map.len() <= before + 2);
        let mut got = String::new();
        xz2::read::XzDecoder::new(&xz2[..]).read_to_string(&mut got).unwrap();
        assert_eq!(got, more.concat());
    }

    #[test]
    fn empty_index_is_valid() {
        let (gz, xz) = ChunkCache::default().build(&[], 6, &mut Vec::new());
        let mut got = String::new();
        flate2::read::MultiGzDecoder::new(&gz[..]).read_to_string(&mut got).unwrap();
        xz2::read::XzDecoder::new(&xz[..]).read_to_string(&mut got).unwrap();
        assert!(got.is_empty());
    }
}
