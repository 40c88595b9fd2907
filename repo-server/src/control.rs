//! Debian control paragraphs: parsing with the checks that keep a hostile package from injecting
//! fields or paragraphs into our indices, and the syntax of names, versions and architectures.

use std::fmt;

pub use debfleet_protocol::debian::{valid_package_name, valid_suite, valid_version};

/// The architectures the repository serves; `all` packages appear in every binary index.
pub const ARCHES: [&str; 3] = ["amd64", "arm64", "armhf"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("control file is not UTF-8")]
    NotUtf8,
    #[error("control file line {0}: not a `Field: value` line")]
    BadLine(usize),
    #[error("control field name {0:?} is not valid")]
    BadFieldName(String),
    #[error("control field {0} appears twice")]
    Duplicate(String),
    #[error("control field {0} carries a control character")]
    ControlCharacter(String),
    #[error("control field {0} is set by the repository and must not be in a package")]
    Reserved(String),
    #[error("control file has no {0} field")]
    Missing(&'static str),
    #[error("control file has more than one paragraph")]
    ExtraParagraph,
    #[error("package name {0:?} is not valid (Debian policy: [a-z0-9][a-z0-9+.-]+)")]
    BadName(String),
    #[error("version {0:?} is not a valid Debian version")]
    BadVersion(String),
    #[error("architecture {0:?} is not served (one of amd64, arm64, armhf, all)")]
    BadArch(String),
}

/// A control paragraph: fields in their original order; values keep continuation lines.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Paragraph {
    pub fields: Vec<(String, String)>,
}

const RESERVED: [&str; 6] = ["Filename", "Size", "MD5sum", "SHA1", "SHA256", "SHA512"];

impl Paragraph {
    pub fn parse(bytes: &[u8]) -> Result<Paragraph, ControlError> {
        let text = std::str::from_utf8(bytes).map_err(|_| ControlError::NotUtf8)?;
        let mut fields: Vec<(String, String)> = Vec::new();
        let mut ended = false;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                ended = !fields.is_empty();
                continue;
            }
            if ended {
                return Err(ControlError::ExtraParagraph);
            }
            if line.starts_with([' ', '\t']) {
                let Some((name, value)) = fields.last_mut() else { return Err(ControlError::BadLine(n + 1)) };
                if line.chars().any(|c| c.is_control() && c != '\t') {
                    return Err(ControlError::ControlCharacter(name.clone()));
                }
                value.push('\n');
                value.push_str(line);
                continue;
            }
            let (name, value) = line.split_once(':').ok_or(ControlError::BadLine(n + 1))?;
            let valid_name = !name.is_empty()
                && !name.starts_with(['#', '-'])
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid_name {
                return Err(ControlError::BadFieldName(name.chars().take(64).collect()));
            }
            if fields.iter().any(|(f, _)| f.eq_ignore_ascii_case(name)) {
                return Err(ControlError::Duplicate(name.into()));
            }
            if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
                return Err(ControlError::Reserved(name.into()));
            }
            let value = value.trim();
            if value.chars().any(|c| c.is_control() && c != '\t') {
                return Err(ControlError::ControlCharacter(name.into()));
            }
            fields.push((name.to_owned(), value.to_owned()));
        }
        let p = Paragraph { fields };
        let name = p.get("Package").ok_or(ControlError::Missing("Package"))?;
        if !valid_package_name(name) {
            return Err(ControlError::BadName(name.into()));
        }
        let version = p.get("Version").ok_or(ControlError::Missing("Version"))?;
        if !valid_version(version) || version.parse::<debversion::Version>().is_err() {
            return Err(ControlError::BadVersion(version.into()));
        }
        let arch = p.get("Architecture").ok_or(ControlError::Missing("Architecture"))?;
        if arch != "all" && !ARCHES.contains(&arch) {
            return Err(ControlError::BadArch(arch.into()));
        }
        p.get("Description").ok_or(ControlError::Missing("Description"))?;
        Ok(p)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(f, _)| f.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for Paragraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, value) in &self.fields {
            writeln!(f, "{name}: {value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"Package: hello\nVersion: 1:2.10-3~bpo1\nArchitecture: amd64\nMaintainer: Ops <ops@example.com>\nDescription: greets\n long text\n .\n more\n";

    #[test]
    fn parses_and_renders() {
        let p = Paragraph::parse(GOOD).unwrap();
        assert_eq!(p.get("version"), Some("1:2.10-3~bpo1"));
        assert_eq!(p.to_string(), std::str::from_utf8(GOOD).unwrap());
    }

    #[test]
    fn rejects_injection_and_bad_syntax() {
        let cases: &[(&[u8], fn(&ControlError) -> bool)] = &[
            (b"Package: a\n\nPackage: b\n", |e| matches!(e, ControlError::ExtraParagraph)),
            (b"Package: hello\nFilename: ../../etc/passwd\n", |e| matches!(e, ControlError::Reserved(_))),
            (b"Package: hello\nPackage: again\n", |e| matches!(e, ControlError::Duplicate(_))),
            (b"Package: hello\x1b[31m\n", |e| matches!(e, ControlError::ControlCharacter(_))),
            (b"Package: Hello\nVersion: 1\nArchitecture: all\nDescription: x\n", |e| {
                matches!(e, ControlError::BadName(_))
            }),
            (b"Package: hello\nVersion: one\nArchitecture: all\nDescription: x\n", |e| {
                matches!(e, ControlError::BadVersion(_))
            }),
            (b"Package: hello\nVersion: 1\nArchitecture: s390x\nDescription: x\n", |e| {
                matches!(e, ControlError::BadArch(_))
            }),
            (b"Package: hello\nVersion: 1\nArchitecture: all\n", |e| matches!(e, ControlError::Missing("Description"))),
            (b"no colon here\n", |e| matches!(e, ControlError::BadLine(1))),
            (b"Bad Name: x\n", |e| matches!(e, ControlError::BadFieldName(_))),
            (b"\xff\xfe", |e| matches!(e, ControlError::NotUtf8)),
        ];
        for (input, check) in cases {
            let err = Paragraph::parse(input).unwrap_err();
            assert!(check(&err), "{:?}: {err}", String::from_utf8_lossy(input));
        }
    }
}
