//! Operator signatures on commands: what is signed and how it travels. The cryptography
//! (ed25519) is the sender's and the device's; here is only the canonical message, so both ends
//! sign and verify the same bytes.
//!
//! The signed message is built from the typed command, never from the bytes that arrived: the
//! device parses the payload, then rebuilds the canonical form from what it parsed (the payload
//! of [`crate::Command::canonical_payload`], keys sorted), so a field it would ignore cannot
//! change what it runs, and a field it runs cannot change without breaking the signature.

use crate::ids::{DeviceId, GroupName};

/// What a signature commits to besides the command: where it was sent. A command signed for one
/// device does not verify on another's topic, nor on a group's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignTarget {
    Device(DeviceId),
    Group(GroupName),
    Fleet,
}

impl std::fmt::Display for SignTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignTarget::Device(d) => write!(f, "device/{d}"),
            SignTarget::Group(g) => write!(f, "group/{g}"),
            SignTarget::Fleet => f.write_str("fleet"),
        }
    }
}

/// The `sig` object of a command: the operator key's name (the device looks it up as
/// `operators.d/NAME.pub`), when it was signed, and the ed25519 signature (64 bytes, hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub key: String,
    pub issued_at: i64,
    pub value: [u8; 64],
}

/// Names the context so a signature over a command can never pass for one over anything else.
pub const CONTEXT: &str = "debfleet command signature v1";

/// The longest a signed command may stay good (`expires_at - issued_at`): what bounds the
/// device's journal of signed ids it has seen (a replay within a command's life is refused by
/// that journal, after it by the expiry).
pub const MAX_SIGNED_LIFE_MS: i64 = 7 * 24 * 3600 * 1000;

/// Key names: what a file name in `operators.d` can carry.
pub fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
}

/// The bytes an operator signs: context, key name, target, verb (the topic's last level: the
/// same arguments mean another thing under another verb), issue time and the command's canonical
/// payload, one per line.
pub fn message(key: &str, target: &SignTarget, verb: &str, issued_at: i64, canonical_payload: &[u8]) -> Vec<u8> {
    let at = crate::time::format_unix_ms(issued_at);
    let mut m = format!("{CONTEXT}\n{key}\n{target}\n{verb}\n{at}\n").into_bytes();
    m.extend_from_slice(canonical_payload);
    m
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_everything_it_commits_to() {
        let d = SignTarget::Device(DeviceId::new("d1").unwrap());
        let m = String::from_utf8(message("ana", &d, "ping", 0, br#"{"id":"p1"}"#)).unwrap();
        assert_eq!(m, "debfleet command signature v1\nana\ndevice/d1\nping\n1970-01-01T00:00:00.000Z\n{\"id\":\"p1\"}");
        assert_eq!(SignTarget::Group(GroupName::new("lab").unwrap()).to_string(), "group/lab");
        assert_eq!(from_hex::<2>("0aff"), Some([10, 255]));
        assert_eq!(from_hex::<2>("0af"), None);
        assert_eq!(from_hex::<2>("zzzz"), None);
        assert_eq!(to_hex(&[1, 171]), "01ab");
        assert!(valid_key_name("ana-2026") && !valid_key_name("../x") && !valid_key_name(".hidden"));
    }
}
