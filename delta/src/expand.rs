//! The diff domain: a tar archive with its gzip-compressed files expanded.
//!
//! Packages carry changelogs, man pages and data files compressed with `gzip -9n`; a changed
//! byte in one scrambles its compressed form, so diffing the tar as it is wastes most of a
//! delta on them. Expanding them first lets the diff see what really changed. The expanded
//! stream keeps every tar header and padding byte: only a file's content is replaced by its
//! decompressed form. It is not a tar archive; it exists only to be diffed.
//!
//! The old side is expanded by a fixed rule (every regular file that is exactly one gzip member),
//! so the device reproduces it without being told. The new side is expanded only where
//! `gzip -n -LEVEL` reproduces the compressed bytes exactly; the delta carries those places (the
//! recipe) so the device can compress them again and end with the new tar byte for byte.

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::DeltaError;

const BLOCK: usize = 512;
/// A file expands at most to this; larger ones stay compressed (and a hostile package cannot
/// make the repository or a device allocate without bound).
const MAX_EXPANDED: u64 = 256 << 20;

/// One place in an expanded stream to compress again: `len` bytes at `offset` become a gzip
/// member made with `gzip -n -LEVEL` of `gz_len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    pub level: u8,
    pub gz_len: u64,
}

struct Entry {
    name: std::ops::Range<usize>,
    /// Where the content starts and how long it is, in the tar.
    content: std::ops::Range<usize>,
    regular: bool,
}

fn octal(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // GNU base-256 for sizes of 8 GiB and more: far beyond what we accept anyway.
        return None;
    }
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// The entries of a tar archive, as far as they are well formed; what follows (the end-of-archive
/// blocks, or anything not understood) stays raw bytes.
fn entries(tar: &[u8]) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + BLOCK <= tar.len() {
        let header = &tar[pos..pos + BLOCK];
        if header.iter().all(|b| *b == 0) {
            break;
        }
        let Some(size) = octal(&header[124..136]) else { break };
        let start = pos + BLOCK;
        let Some(content_end) = start.checked_add(size as usize).filter(|e| *e <= tar.len()) else { break };
        let end = (content_end + BLOCK - 1) / BLOCK * BLOCK;
        if end > tar.len() {
            break;
        }
        let regular = matches!(header[156], b'0' | 0 | b'7');
        let name_len = header[..100].iter().position(|b| *b == 0).unwrap_or(100);
        out.push(Entry { name: pos..pos + name_len, content: start..content_end, regular });
        pos = end;
    }
    out
}

/// The content of the regular file `name` (with or without a leading `./`).
pub fn file<'a>(tar: &'a [u8], name: &str) -> Option<&'a [u8]> {
    entries(tar).into_iter().find_map(|e| {
        let n = &tar[e.name.clone()];
        (e.regular && (n == name.as_bytes() || n.strip_prefix(b"./") == Some(name.as_bytes()))).then(|| &tar[e.content])
    })
}

/// Decompresses `bytes` if it is exactly one gzip member (nothing after it).
fn gunzip(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.len() < 18 || bytes[..3] != [0x1f, 0x8b, 8] {
        return None;
    }
    let mut decoder = flate2::bufread::GzDecoder::new(bytes);
    let mut out = Vec::with_capacity(bytes.len() * 4);
    (&mut decoder).take(MAX_EXPANDED + 1).read_to_end(&mut out).ok()?;
    if out.len() as u64 > MAX_EXPANDED || !decoder.into_inner().is_empty() {
        return None;
    }
    Some(out)
}

/// `gzip -n -LEVEL` of `data`: GNU gzip is Essential on Debian, and it is what made the files.
pub fn gzip(data: &[u8], level: u8) -> Result<Vec<u8>, DeltaError> {
    let io = |e: std::io::Error| DeltaError::Io(format!("running gzip: {e}"));
    let mut child = Command::new("gzip")
        .args(["-n", "-c", &format!("-{level}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io)?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let out = std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut out = Vec::new();
            stdout.read_to_end(&mut out).map(|_| out)
        });
        let written = stdin.write_all(data);
        drop(stdin);
        let out = reader.join().unwrap_or_else(|_| Err(std::io::Error::other("gzip reader panicked")));
        written.and(out)
    });
    let status = child.wait().map_err(io)?;
    let out = out.map_err(io)?;
    if !status.success() {
        return Err(DeltaError::Io(format!("gzip exited with {status}")));
    }
    Ok(out)
}

/// The old side: every regular file that is one gzip member, expanded.
pub fn expand_base(tar: &[u8]) -> Vec<u8> {
    expand(tar, |content| gunzip(content).map(|x| (x, 0))).0
}

/// The new side: files expanded only where gzip rebuilds them exactly (levels 9, then 6);
/// returns the stream and where to compress again.
#[cfg(feature = "make")]
pub fn expand_target(tar: &[u8]) -> (Vec<u8>, Vec<Segment>) {
    expand(tar, |content| {
        let plain = gunzip(content)?;
        [9u8, 6].into_iter().find(|l| gzip(&plain, *l).is_ok_and(|g| g == content)).map(|level| (plain, level))
    })
}

fn expand(tar: &[u8], mut try_expand: impl FnMut(&[u8]) -> Option<(Vec<u8>, u8)>) -> (Vec<u8>, Vec<Segment>) {
    let list = entries(tar);
    let mut out = Vec::with_capacity(tar.len() + tar.len() / 4);
    let mut segments = Vec::new();
    let mut copied = 0;
    for e in list {
        if !e.regular {
            continue;
        }
        let content = &tar[e.content.clone()];
        let Some((plain, level)) = try_expand(content) else { continue };
        out.extend_from_slice(&tar[copied..e.content.start]);
        segments.push(Segment {
            offset: out.len() as u64,
            len: plain.len() as u64,
            level,
            gz_len: content.len() as u64,
        });
        out.extend_from_slice(&plain);
        copied = e.content.end;
    }
    out.extend_from_slice(&tar[copied..]);
    (out, segments)
}

/// Segments must be in order, apart, and no larger than a file may expand: a delta that says
/// otherwise is damaged (and would make the writer below gather without bound).
pub fn check_segments(segments: &[Segment]) -> Result<(), DeltaError> {
    let mut end = 0u64;
    for s in segments {
        let bad = s.offset < end || s.len > MAX_EXPANDED || s.gz_len > MAX_EXPANDED || !(1..=9).contains(&s.level);
        end = s.offset.checked_add(s.len).ok_or_else(|| DeltaError::Corrupt("a segment overflows".into()))?;
        if bad {
            return Err(DeltaError::Corrupt("recompression segments out of order or out of range".into()));
        }
    }
    Ok(())
}

/// A writer that turns an expanded stream back into the tar: bytes inside a segment are
/// gathered and written compressed, the rest pass through. Checks each segment's size.
pub struct Recompose<W: Write> {
    out: W,
    segments: std::vec::IntoIter<Segment>,
    next: Option<Segment>,
    pos: u64,
    pending: Vec<u8>,
}

impl<W: Write> Recompose<W> {
    pub fn new(out: W, segments: Vec<Segment>) -> Self {
        let mut segments = segments.into_iter();
        let next = segments.next();
        Recompose { out, segments, next, pos: 0, pending: Vec::new() }
    }

    /// Ends the stream; fails when a segment was not complete.
    pub fn finish(self) -> Result<W, DeltaError> {
        if self.next.is_some() {
            return Err(DeltaError::Corrupt("the rebuilt stream ends inside a compressed file".into()));
        }
        Ok(self.out)
    }
}

impl<W: Write> Write for Recompose<W> {
    fn write(&mut self, mut buf: &[u8]) -> std::io::Result<usize> {
        let total = buf.len();
        while !buf.is_empty() {
            let Some(seg) = self.next else {
                self.out.write_all(buf)?;
                self.pos += buf.len() as u64;
                break;
            };
            if self.pos < seg.offset {
                let n = (seg.offset - self.pos).min(buf.len() as u64) as usize;
                self.out.write_all(&buf[..n])?;
                self.pos += n as u64;
                buf = &buf[n..];
                continue;
            }
            let want = (seg.offset + seg.len - self.pos).min(buf.len() as u64) as usize;
            self.pending.extend_from_slice(&buf[..want]);
            self.pos += want as u64;
            buf = &buf[want..];
            if self.pos == seg.offset + seg.len {
                let gz = gzip(&self.pending, seg.level).map_err(std::io::Error::other)?;
                if gz.len() as u64 != seg.gz_len {
                    return Err(std::io::Error::other(DeltaError::Mismatch(format!(
                        "gzip -{} on this machine does not rebuild a compressed file exactly ({} bytes, expected {})",
                        seg.level,
                        gz.len(),
                        seg.gz_len
                    ))));
                }
                self.out.write_all(&gz)?;
                self.pending.clear();
                self.next = self.segments.next();
            }
        }
        Ok(total)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(all(test, feature = "make"))]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, content) in files {
            let mut h = [0u8; 512];
            h[..name.len()].copy_from_slice(name.as_bytes());
            h[100..107].copy_from_slice(b"0000644");
            let size = format!("{:011o}", content.len());
            h[124..135].copy_from_slice(size.as_bytes());
            h[156] = b'0';
            out.extend_from_slice(&h);
            out.extend_from_slice(content);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    #[test]
    fn a_gzip_file_is_expanded_and_recomposed_exactly() {
        let text = b"changelog line\n".repeat(200);
        let gz = gzip(&text, 9).unwrap();
        let tar = tar_of(&[("a", b"plain"), ("changelog.gz", &gz), ("b", b"more")]);
        let (expanded, segments) = expand_target(&tar);
        assert_eq!(segments.len(), 1);
        assert_eq!(segments[0].level, 9);
        assert!(expanded.windows(text.len()).any(|w| w == &text[..]));
        let mut rebuilt = Recompose::new(Vec::new(), segments);
        // Written in awkward pieces, as a patcher would.
        for chunk in expanded.chunks(77) {
            rebuilt.write_all(chunk).unwrap();
        }
        assert_eq!(rebuilt.finish().unwrap(), tar);
        assert_eq!(expand_base(&tar), expanded);
    }

    #[test]
    fn a_gzip_file_gzip_cannot_rebuild_stays_compressed() {
        // Made with a file name in the header: `gzip -n` does not write one.
        let mut enc = flate2::GzBuilder::new().filename("x").write(Vec::new(), flate2::Compression::best());
        enc.write_all(&b"data ".repeat(100)).unwrap();
        let gz = enc.finish().unwrap();
        let tar = tar_of(&[("x.gz", &gz)]);
        let (expanded, segments) = expand_target(&tar);
        assert!(segments.is_empty());
        assert_eq!(expanded, tar);
    }

    #[test]
    fn malformed_tars_pass_through_unchanged() {
        let mut tar = tar_of(&[("a", b"x")]);
        tar[124..135].copy_from_slice(b"77777777777");
        assert_eq!(expand_base(&tar), tar);
        assert_eq!(expand_base(b"short"), b"short");
    }
}
