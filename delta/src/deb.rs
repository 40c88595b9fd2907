//! The .deb container: an `ar` archive of `debian-binary`, `control.tar[.COMP]` and
//! `data.tar[.COMP]`. Read with every compression Debian uses; written with zstd at a fast level
//! (the device must never spend its time recompressing xz).

use std::io::{Read, Write};

use sha2::{Digest, Sha256};

use crate::DeltaError;

const AR_MAGIC: &[u8; 8] = b"!<arch>\n";
/// Members beyond this size are refused: no real package payload comes near it, and a hostile
/// file must not make us allocate without bound.
pub const MAX_MEMBER_BYTES: u64 = 4 << 30;

/// How a tar member is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
}

impl Compression {
    fn of(name: &str, prefix: &str) -> Option<Compression> {
        match name.strip_prefix(prefix)? {
            "" => Some(Compression::None),
            ".gz" => Some(Compression::Gzip),
            ".xz" => Some(Compression::Xz),
            ".zst" => Some(Compression::Zstd),
            _ => None,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Gzip => ".gz",
            Compression::Xz => ".xz",
            Compression::Zstd => ".zst",
        }
    }

    fn reader<'a>(self, raw: &'a [u8]) -> Result<Box<dyn Read + 'a>, DeltaError> {
        Ok(match self {
            Compression::None => Box::new(raw),
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(raw)),
            Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(raw)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(raw)
                    .map_err(|e| DeltaError::NotADeb(format!("zstd member: {e}")))?,
            ),
        })
    }
}

/// One tar member of a package, uncompressed, with its SHA-256.
#[derive(Debug, Clone)]
pub struct Tar {
    pub bytes: Vec<u8>,
    pub sha256: [u8; 32],
    pub compression: Compression,
}

/// A package's two payload members, uncompressed.
#[derive(Debug, Clone)]
pub struct Payload {
    pub control: Tar,
    pub data: Tar,
}

impl Payload {
    /// The payload's identity: SHA-256 over the two members' SHA-256s (control, then data).
    /// It names what a delta applies to and what it rebuilds, whatever the compression.
    pub fn id(&self) -> String {
        payload_id(&self.control.sha256, &self.data.sha256)
    }
}

pub fn payload_id(control: &[u8; 32], data: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(control);
    h.update(data);
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Member<'a> {
    name: &'a str,
    data: &'a [u8],
}

fn members(deb: &[u8]) -> Result<Vec<Member<'_>>, DeltaError> {
    let bad = |why: &str| DeltaError::NotADeb(why.to_owned());
    if deb.len() < 8 || &deb[..8] != AR_MAGIC {
        return Err(bad("not an ar archive"));
    }
    let mut pos = 8;
    let mut out = Vec::new();
    while pos < deb.len() {
        let header = deb.get(pos..pos + 60).ok_or_else(|| bad("truncated member header"))?;
        if &header[58..60] != b"`\n" {
            return Err(bad("corrupt member header"));
        }
        let name = std::str::from_utf8(&header[..16]).map_err(|_| bad("member name is not UTF-8"))?;
        let name = name.trim_end().trim_end_matches('/');
        let size: u64 = std::str::from_utf8(&header[48..58])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| bad("member size is not a number"))?;
        if size > MAX_MEMBER_BYTES {
            return Err(bad("member larger than 4 GiB"));
        }
        let start = pos + 60;
        let end = start.checked_add(size as usize).ok_or_else(|| bad("member size overflows"))?;
        let data = deb.get(start..end).ok_or_else(|| bad("truncated member"))?;
        out.push(Member { name, data });
        pos = end + (end & 1);
    }
    Ok(out)
}

fn read_tar(member: &Member<'_>, prefix: &str, limit: u64) -> Result<Tar, DeltaError> {
    let compression = Compression::of(member.name, prefix)
        .ok_or_else(|| DeltaError::NotADeb(format!("unsupported member {}", member.name)))?;
    let mut reader = compression.reader(member.data)?.take(limit.saturating_add(1));
    let mut bytes = Vec::with_capacity(member.data.len() * 4);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| DeltaError::NotADeb(format!("{}: {e}", member.name)))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes.extend_from_slice(&buf[..n]);
    }
    if bytes.len() as u64 > limit {
        return Err(DeltaError::NotADeb(format!("{} expands beyond {limit} bytes", member.name)));
    }
    Ok(Tar { bytes, sha256: hasher.finalize().into(), compression })
}

/// Reads a .deb's payload (both members decompressed).
pub fn read_payload(deb: &[u8]) -> Result<Payload, DeltaError> {
    read_payload_limited(deb, MAX_MEMBER_BYTES)
}

/// Like [`read_payload`], refusing a member that expands beyond `limit` bytes.
pub fn read_payload_limited(deb: &[u8], limit: u64) -> Result<Payload, DeltaError> {
    let list = members(deb)?;
    match list.first() {
        Some(m) if m.name == "debian-binary" && m.data.starts_with(b"2.") => {}
        _ => return Err(DeltaError::NotADeb("the first member is not debian-binary 2.x".into())),
    }
    let find = |prefix: &str| {
        list.iter()
            .find(|m| m.name.starts_with(prefix))
            .ok_or_else(|| DeltaError::NotADeb(format!("no {prefix} member")))
    };
    Ok(Payload {
        control: read_tar(find("control.tar")?, "control.tar", limit)?,
        data: read_tar(find("data.tar")?, "data.tar", limit)?,
    })
}

/// Writes a .deb from its two tar members, each compressed with zstd at `level`.
pub struct DebWriter<W: Write> {
    out: W,
}

impl<W: Write> DebWriter<W> {
    pub fn new(mut out: W) -> std::io::Result<Self> {
        out.write_all(AR_MAGIC)?;
        let mut w = DebWriter { out };
        w.member("debian-binary", b"2.0\n")?;
        Ok(w)
    }

    fn member(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        // Owner root, mode 0644, time 0: the container's metadata carries no information.
        write!(self.out, "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n", name, 0, 0, 0, 100644, data.len())?;
        self.out.write_all(data)?;
        if data.len() % 2 == 1 {
            self.out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Adds `control.tar.zst` or `data.tar.zst` (`which` is `control` or `data`).
    pub fn tar(&mut self, which: &str, tar: &[u8], level: i32) -> std::io::Result<()> {
        self.compressed_tar(which, &zstd::bulk::compress(tar, level)?)
    }

    /// Adds a tar member already compressed with zstd.
    pub fn compressed_tar(&mut self, which: &str, zstd: &[u8]) -> std::io::Result<()> {
        self.member(&format!("{which}.tar{}", Compression::Zstd.suffix()), zstd)
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}
