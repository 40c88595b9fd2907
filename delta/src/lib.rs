//! Deltas between two versions of a Debian package (`docs/delta.md` is the format's reference).
//!
//! A delta works on the package's *uncompressed* payload — `control.tar` and `data.tar`, with the
//! gzip-compressed files inside the data expanded (see [`expand`]) — and diffs it bsdiff-style
//! ([`diff`]). Applying it to the old package rebuilds the new one's payload byte for byte,
//! checks it against the hashes the delta names, and only then hands out a .deb: the same control
//! fields and file tree as the new package (`dpkg-deb --fsys-tarfile` identical), its members
//! compressed with zstd rather than the original xz, which a device would spend seconds on.
//!
//! Invariants: nothing is returned that was not verified against the delta's result hashes; a
//! delta whose own bytes do not match its header, or whose base is another payload, is refused
//! before any patching; bad input is an error, never a panic.

pub mod deb;
pub mod diff;
pub mod expand;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use deb::{payload_id, read_payload, Payload};

const MAGIC: &[u8; 8] = b"DFDELTA1";
const MAX_HEADER: usize = 4 << 20;
/// zstd level of the rebuilt package's members: fast, since apply time is the point.
pub const OUTPUT_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DeltaError {
    #[error("not a Debian package: {0}")]
    NotADeb(String),
    #[error("not a debfleet delta: {0}")]
    NotADelta(String),
    #[error("the delta is damaged (truncated or altered): {0}")]
    Corrupt(String),
    #[error("the delta does not fit: {0}")]
    Mismatch(String),
    #[error("{0}")]
    Io(String),
}

/// One side of a delta: which package, and the hashes of its uncompressed members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    pub package: String,
    pub version: String,
    pub architecture: String,
    pub control_sha256: String,
    pub data_sha256: String,
    /// [`Payload::id`]: what the repository's delta index names.
    pub payload: String,
}

/// A patch stream's place in the delta body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    pub size: u64,
    pub sha256: String,
}

/// What a delta says about itself (JSON after the magic and a length).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    pub base: Side,
    pub result: Side,
    /// Where the rebuilt data stream is compressed again with gzip.
    pub recompress: Vec<expand::Segment>,
    pub control: Stream,
    pub data: Stream,
}

#[cfg(feature = "make")]
fn side(p: &Payload) -> Side {
    let field = |name: &str| -> String {
        expand::file(&p.control.bytes, "control")
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(|v| v.trim().to_owned())))
            .unwrap_or_default()
    };
    Side {
        package: field("Package"),
        version: field("Version"),
        architecture: field("Architecture"),
        control_sha256: deb::hex(&p.control.sha256),
        data_sha256: deb::hex(&p.data.sha256),
        payload: p.id(),
    }
}

/// Makes the delta that turns `old` into `new` (both whole .deb files).
#[cfg(feature = "make")]
pub fn make(old: &[u8], new: &[u8]) -> Result<Vec<u8>, DeltaError> {
    make_limited(old, new, deb::MAX_MEMBER_BYTES)
}

/// Like [`make`], refusing packages whose members expand beyond `limit` bytes (making a delta
/// holds both payloads and a suffix array several times their size).
#[cfg(feature = "make")]
pub fn make_limited(old: &[u8], new: &[u8], limit: u64) -> Result<Vec<u8>, DeltaError> {
    let (old, new) = (deb::read_payload_limited(old, limit)?, deb::read_payload_limited(new, limit)?);
    let (base, result) = (side(&old), side(&new));
    if base.package != result.package || base.architecture != result.architecture {
        return Err(DeltaError::Mismatch(format!(
            "{} ({}) and {} ({}) are different packages",
            base.package, base.architecture, result.package, result.architecture
        )));
    }
    let control = diff::make(&old.control.bytes, &new.control.bytes)?;
    let old_data = expand::expand_base(&old.data.bytes);
    drop(old);
    let (new_data, recompress) = expand::expand_target(&new.data.bytes);
    let data = diff::make(&old_data, &new_data)?;
    let stream = |b: &[u8]| Stream { size: b.len() as u64, sha256: deb::hex(&Sha256::digest(b)) };
    let header = Header { format: 1, base, result, recompress, control: stream(&control), data: stream(&data) };
    let json = serde_json::to_vec(&header).map_err(|e| DeltaError::Io(e.to_string()))?;
    let mut out = Vec::with_capacity(16 + json.len() + control.len() + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&control);
    out.extend_from_slice(&data);
    Ok(out)
}

/// Reads a delta's header and checks its body against it; returns the header and the two
/// patch streams.
pub fn open(delta: &[u8]) -> Result<(Header, &[u8], &[u8]), DeltaError> {
    if delta.len() < 12 || &delta[..8] != MAGIC {
        return Err(DeltaError::NotADelta("it does not start with DFDELTA1".into()));
    }
    let len = u32::from_le_bytes(delta[8..12].try_into().expect("4 bytes")) as usize;
    if len > MAX_HEADER {
        return Err(DeltaError::Corrupt("header length out of range".into()));
    }
    let json = delta.get(12..12 + len).ok_or_else(|| DeltaError::Corrupt("it ends inside its header".into()))?;
    let header: Header = serde_json::from_slice(json).map_err(|e| DeltaError::Corrupt(format!("header: {e}")))?;
    if header.format != 1 {
        return Err(DeltaError::NotADelta(format!("format {} (this program reads format 1)", header.format)));
    }
    let body = &delta[12 + len..];
    let (csize, dsize) = (header.control.size as usize, header.data.size as usize);
    if csize.checked_add(dsize) != Some(body.len()) {
        return Err(DeltaError::Corrupt(format!(
            "{} bytes of patch data where the header says {}",
            body.len(),
            header.control.size.saturating_add(header.data.size)
        )));
    }
    let (control, data) = body.split_at(csize);
    for (what, bytes, want) in [("control", control, &header.control), ("data", data, &header.data)] {
        if deb::hex(&Sha256::digest(bytes)) != want.sha256 {
            return Err(DeltaError::Corrupt(format!("the {what} patch does not match its hash")));
        }
    }
    // The payload ids must be those of the member hashes the delta is checked against, or a
    // header could name one payload and rebuild another.
    for side in [&header.base, &header.result] {
        let (Some(c), Some(d)) = (unhex(&side.control_sha256), unhex(&side.data_sha256)) else {
            return Err(DeltaError::Corrupt("a member hash is not 64 hex digits".into()));
        };
        if payload_id(&c, &d) != side.payload {
            return Err(DeltaError::Corrupt("a payload id does not match its member hashes".into()));
        }
    }
    expand::check_segments(&header.recompress)?;
    Ok((header, control, data))
}

/// Rebuilds the new package from the old one (a whole .deb) and a delta. The returned .deb has
/// been verified against the delta's result hashes.
pub fn apply(old: &[u8], delta: &[u8]) -> Result<(Header, Vec<u8>), DeltaError> {
    let (header, control_patch, data_patch) = open(delta)?;
    let old = read_payload(old)?;
    if deb::hex(&old.control.sha256) != header.base.control_sha256
        || deb::hex(&old.data.sha256) != header.base.data_sha256
    {
        return Err(DeltaError::Mismatch(format!(
            "it applies to {} {} with payload {}, and this package's payload is {}",
            header.base.package,
            header.base.version,
            header.base.payload,
            old.id()
        )));
    }
    let mut control = Vec::new();
    diff::apply(&old.control.bytes, control_patch, &mut control)?;
    check(&control, &header.result.control_sha256, "control")?;
    let base = expand::expand_base(&old.data.bytes);
    drop(old);
    let io = |e: std::io::Error| DeltaError::Io(format!("compressing the rebuilt data: {e}"));
    let encoder = zstd::stream::write::Encoder::new(Vec::new(), OUTPUT_LEVEL).map_err(io)?;
    let mut rebuilt =
        expand::Recompose::new(Hashing { inner: encoder, hasher: Sha256::new() }, header.recompress.clone());
    diff::apply(&base, data_patch, &mut rebuilt)?;
    drop(base);
    let Hashing { inner, hasher } = rebuilt.finish()?;
    if deb::hex(&hasher.finalize()) != header.result.data_sha256 {
        return Err(DeltaError::Mismatch("the rebuilt data differs from the new package's".into()));
    }
    let data = inner.finish().map_err(io)?;
    let mut w = deb::DebWriter::new(Vec::with_capacity(data.len() + control.len() + 512)).map_err(io)?;
    w.tar("control", &control, OUTPUT_LEVEL).map_err(io)?;
    w.compressed_tar("data", &data).map_err(io)?;
    Ok((header, w.finish().map_err(io)?))
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn check(bytes: &[u8], want: &str, what: &str) -> Result<(), DeltaError> {
    if deb::hex(&Sha256::digest(bytes)) == want {
        Ok(())
    } else {
        Err(DeltaError::Mismatch(format!("the rebuilt {what} differs from the new package's")))
    }
}

/// Hashes what passes through.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(all(test, feature = "make"))]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    /// A real .deb made by dpkg-deb, with a gzip-compressed changelog like Debian's.
    fn deb(dir: &Path, version: &str, body: &str) -> Vec<u8> {
        let root = dir.join(format!("root-{version}"));
        std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(root.join("usr/share/doc/demo")).unwrap();
        std::fs::write(
            root.join("DEBIAN/control"),
            format!(
                "Package: demo\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@example.com>\nDescription: d\n"
            ),
        )
        .unwrap();
        std::fs::write(root.join("usr/share/doc/demo/readme"), body.repeat(300)).unwrap();
        let changelog = format!("demo ({version}) stable; urgency=low\n\n  * {body}\n").repeat(50);
        std::fs::write(
            root.join("usr/share/doc/demo/changelog.Debian.gz"),
            expand::gzip(changelog.as_bytes(), 9).unwrap(),
        )
        .unwrap();
        let out = dir.join(format!("demo_{version}.deb"));
        let ok = Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&root)
            .arg(&out)
            .output()
            .unwrap();
        assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
        std::fs::read(out).unwrap()
    }

    #[test]
    fn a_delta_rebuilds_the_new_payload_and_refuses_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let old = deb(dir.path(), "1.0", "first text of the package\n");
        let new = deb(dir.path(), "2.0", "first text of the package, changed\n");
        let delta = make(&old, &new).unwrap();
        let (header, rebuilt) = apply(&old, &delta).unwrap();
        assert_eq!((header.base.version.as_str(), header.result.version.as_str()), ("1.0", "2.0"));
        assert_eq!(header.recompress.len(), 1, "the changelog is expanded");
        let (want, got) = (read_payload(&new).unwrap(), read_payload(&rebuilt).unwrap());
        assert_eq!(got.control.bytes, want.control.bytes);
        assert_eq!(got.data.bytes, want.data.bytes);
        assert_eq!(got.id(), header.result.payload);

        // Another base: refused before any patching.
        let other = deb(dir.path(), "1.1", "something else entirely\n");
        assert!(matches!(apply(&other, &delta), Err(DeltaError::Mismatch(_))));
        assert!(matches!(apply(b"not a deb", &delta), Err(DeltaError::NotADeb(_)) | Err(DeltaError::Mismatch(_))));
        // Truncated anywhere, or one byte altered anywhere: an error, never a package.
        for cut in (0..delta.len()).step_by(97) {
            assert!(apply(&old, &delta[..cut]).is_err(), "cut at {cut}");
        }
        for at in (0..delta.len()).step_by(89) {
            let mut bad = delta.clone();
            bad[at] ^= 0x20;
            match apply(&old, &bad) {
                Err(_) => {}
                // A flipped byte in the header's JSON that only changes a name's case, say.
                Ok((_, deb)) => assert_eq!(read_payload(&deb).unwrap().id(), want.id(), "byte {at}"),
            }
        }
        assert!(matches!(apply(&old, b"DFDELTA1\xff\xff\xff\xff"), Err(DeltaError::Corrupt(_))));
        // A header that names another result payload than its member hashes make.
        let (mut header, control, data) = open(&delta).map(|(h, c, d)| (h, c.to_vec(), d.to_vec())).unwrap();
        header.result.payload = header.base.payload.clone();
        let json = serde_json::to_vec(&header).unwrap();
        let forged = [&MAGIC[..], &(json.len() as u32).to_le_bytes(), &json, &control, &data].concat();
        assert!(matches!(apply(&old, &forged), Err(DeltaError::Corrupt(_))));
        assert!(matches!(apply(&old, b"PK\x03\x04 zip"), Err(DeltaError::NotADelta(_))));
    }
}
