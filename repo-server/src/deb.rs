//! Reading an uploaded .deb: the ar container, the control archive (gz, xz, zst or plain) and its
//! `control` file. Only what the repository needs is read; the data archive is checked for
//! presence and bounds, not unpacked.

use std::io::{Read, Seek, SeekFrom};

use crate::control::{ControlError, Paragraph};

#[derive(Debug, thiserror::Error)]
pub enum DebError {
    #[error("not a .deb: {0}")]
    NotDeb(String),
    #[error("the .deb is truncated: {0}")]
    Truncated(String),
    #[error("control archive: {0}")]
    ControlArchive(String),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("reading the upload: {0}")]
    Io(#[from] std::io::Error),
}

struct Member {
    name: String,
    offset: u64,
    size: u64,
}

fn members<R: Read + Seek>(r: &mut R, total: u64) -> Result<Vec<Member>, DebError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|_| DebError::NotDeb("shorter than an ar header".into()))?;
    if &magic != b"!<arch>\n" {
        return Err(DebError::NotDeb("no ar archive signature".into()));
    }
    let mut out = Vec::new();
    let mut pos = 8u64;
    while pos < total {
        let mut h = [0u8; 60];
        r.read_exact(&mut h).map_err(|_| DebError::Truncated(format!("member header at byte {pos}")))?;
        if &h[58..60] != b"`\n" {
            return Err(DebError::NotDeb(format!("bad ar member header at byte {pos}")));
        }
        let name = String::from_utf8_lossy(&h[0..16]).trim_end().trim_end_matches('/').to_owned();
        let size: u64 = std::str::from_utf8(&h[48..58])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| DebError::NotDeb(format!("bad size of ar member {name:?}")))?;
        let offset = pos + 60;
        if offset + size > total {
            return Err(DebError::Truncated(format!("member {name:?} needs {size} bytes, the file ends first")));
        }
        out.push(Member { name, offset, size });
        pos = offset + size + (size & 1);
        r.seek(SeekFrom::Start(pos))?;
        if out.len() > 16 {
            return Err(DebError::NotDeb("too many ar members".into()));
        }
    }
    Ok(out)
}

/// Validates the structure of a .deb and returns its control paragraph.
pub fn read_control<R: Read + Seek>(mut r: R) -> Result<Paragraph, DebError> {
    let total = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(0))?;
    let ms = members(&mut r, total)?;
    let names: Vec<&str> = ms.iter().map(|m| m.name.as_str()).collect();
    if names.first() != Some(&"debian-binary") {
        return Err(DebError::NotDeb("the first member is not debian-binary".into()));
    }
    let mut version = String::new();
    r.seek(SeekFrom::Start(ms[0].offset))?;
    (&mut r)
        .take(ms[0].size.min(16))
        .read_to_string(&mut version)
        .map_err(|_| DebError::NotDeb("debian-binary is not text".into()))?;
    if !version.starts_with("2.") {
        return Err(DebError::NotDeb(format!("unsupported format version {:?}", version.trim())));
    }
    let control = ms
        .get(1)
        .filter(|m| m.name.starts_with("control.tar"))
        .ok_or_else(|| DebError::NotDeb("the second member is not control.tar".into()))?;
    if !ms.iter().skip(2).any(|m| m.name.starts_with("data.tar")) {
        return Err(DebError::NotDeb("no data.tar member".into()));
    }
    if control.size > 16 << 20 {
        return Err(DebError::ControlArchive("larger than 16 MiB".into()));
    }
    r.seek(SeekFrom::Start(control.offset))?;
    let raw = (&mut r).take(control.size);
    let tar_reader: Box<dyn Read + '_> = match control.name.as_str() {
        "control.tar" => Box::new(raw),
        "control.tar.gz" => Box::new(flate2::read::GzDecoder::new(raw)),
        "control.tar.xz" => Box::new(xz2::read::XzDecoder::new(raw)),
        "control.tar.zst" => Box::new(
            ruzstd::decoding::StreamingDecoder::new(raw).map_err(|e| DebError::ControlArchive(format!("zstd: {e}")))?,
        ),
        other => return Err(DebError::ControlArchive(format!("unsupported compression {other}"))),
    };
    // Bound what a malicious archive can make us decompress.
    let mut archive = tar::Archive::new(tar_reader.take(64 << 20));
    let entries = archive.entries().map_err(|e| DebError::ControlArchive(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| DebError::ControlArchive(e.to_string()))?;
        let path = entry.path().map_err(|e| DebError::ControlArchive(e.to_string()))?.into_owned();
        let name = path.to_string_lossy();
        if name == "./control" || name == "control" {
            if entry.size() > 1 << 20 {
                return Err(DebError::ControlArchive("control file larger than 1 MiB".into()));
            }
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(|e| DebError::ControlArchive(e.to_string()))?;
            return Ok(Paragraph::parse(&bytes)?);
        }
    }
    Err(DebError::ControlArchive("no control file".into()))
}
