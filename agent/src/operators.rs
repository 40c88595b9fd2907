//! Signed commands (`require_signed_commands`): the operator keys this device trusts and the
//! signed ids it has seen. Keys are files `NAME.pub` in `operators_dir`, installed by a package
//! the ops team controls, so trust is managed with apt like everything else; they are read again
//! for every signed command (a handful of small files), so a key removed by a package upgrade is
//! revoked at once. The ids of accepted signed commands are kept, durably, until their expiry: a
//! replay is refused even after `clear` made the operation journal forget the id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use debfleet_protocol::signature::{self, SignTarget, MAX_SIGNED_LIFE_MS};
use debfleet_protocol::{Command, OpId};

/// Tolerated clock difference for a command signed "in the future".
const SKEW_MS: i64 = 5 * 60 * 1000;

pub struct Trust {
    dir: PathBuf,
    seen_path: PathBuf,
    /// Signed ids accepted, with their expiry.
    seen: BTreeMap<OpId, i64>,
}

impl Trust {
    pub fn new(dir: &Path, state_dir: &Path) -> Trust {
        let seen_path = state_dir.join("signed-seen.json");
        let seen = std::fs::read(&seen_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        Trust { dir: dir.to_owned(), seen_path, seen }
    }

    /// The public key of `name`, if this device trusts it now.
    fn key(&self, name: &str) -> Result<[u8; 32], String> {
        let path = self.dir.join(format!("{name}.pub"));
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                format!("operator key {name:?} is not trusted here (no {}; removed keys are revoked)", path.display())
            }
            _ => format!("cannot read operator key {}: {e}", path.display()),
        })?;
        parse_public(&text).ok_or_else(|| format!("{}: expected \"ed25519 <64 hex digits>\"", path.display()))
    }

    /// Whether the command may run here: signed by a trusted key for `target`, with a bounded
    /// life, not expired-at-signing, and not a replay of one already accepted (`known`: the
    /// operation journal has the id — a repeat, answered with its recorded outcome).
    pub fn check(&self, cmd: &Command, target: &SignTarget, known: bool, now_ms: i64) -> Result<(), String> {
        let Some(sig) = &cmd.signature else {
            return Err("this device runs only signed commands (require_signed_commands); this one has no sig".into());
        };
        let key = self.key(&sig.key)?;
        let msg = cmd.signed_message(&sig.key, target, sig.issued_at);
        let pk = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key);
        if pk.verify(&msg, &sig.value).is_err() {
            return Err(format!(
                "the signature by {:?} does not verify for {target} (altered, signed for another target, or by another key)",
                sig.key
            ));
        }
        let Some(expires_at) = cmd.expires_at else {
            return Err("a signed command must carry expires_at".into());
        };
        if expires_at - sig.issued_at > MAX_SIGNED_LIFE_MS || expires_at < sig.issued_at {
            return Err("a signed command may stay good at most 7 days after issued_at".into());
        }
        if sig.issued_at > now_ms + SKEW_MS {
            return Err("issued_at is in the future (more than 5 minutes ahead of this device's clock)".into());
        }
        if self.seen.contains_key(&cmd.id) && !known {
            return Err(format!("command {} was run here before: a replay is refused", cmd.id));
        }
        Ok(())
    }

    /// Remembers an accepted signed command until it expires (written before it runs).
    pub fn accepted(&mut self, cmd: &Command, now_ms: i64) {
        let Some(expires_at) = cmd.expires_at else { return };
        self.seen.retain(|_, e| *e > now_ms);
        self.seen.insert(cmd.id.clone(), expires_at);
        let bytes = serde_json::to_vec(&self.seen).unwrap_or_default();
        if let Err(e) = crate::fsutil::write_atomic(&self.seen_path, &bytes, true) {
            tracing::error!("cannot record signed command {}: {e}", cmd.id);
        }
    }
}

/// `ed25519 <64 hex digits> [comment]`.
pub fn parse_public(text: &str) -> Option<[u8; 32]> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#'))?;
    let mut words = line.split_whitespace();
    (words.next()? == "ed25519").then_some(())?;
    signature::from_hex::<32>(words.next()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use debfleet_protocol::signature::Signature;
    use debfleet_protocol::{CommandArgs, DeviceId, Verb};
    use ring::signature::KeyPair;

    fn keypair(seed: u8) -> ring::signature::Ed25519KeyPair {
        ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
    }

    fn signed(kp: &ring::signature::Ed25519KeyPair, key: &str, target: &SignTarget, id: &str, life_ms: i64) -> Command {
        let mut cmd = Command {
            id: OpId::new(id).unwrap(),
            verb: Verb::Ping,
            args: CommandArgs::Ping,
            expires_at: Some(1_000_000 + life_ms),
            by: None,
            signature: None,
        };
        let value = kp.sign(&cmd.signed_message(key, target, 1_000_000));
        cmd.signature =
            Some(Signature { key: key.into(), issued_at: 1_000_000, value: value.as_ref().try_into().unwrap() });
        cmd
    }

    #[test]
    fn only_trusted_keys_for_the_right_target_once() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("operators.d");
        std::fs::create_dir(&keys).unwrap();
        let ana = keypair(1);
        std::fs::write(
            keys.join("ana.pub"),
            format!("ed25519 {} ana's laptop\n", signature::to_hex(ana.public_key().as_ref())),
        )
        .unwrap();
        let mut t = Trust::new(&keys, dir.path());
        let me = SignTarget::Device(DeviceId::new("d1").unwrap());
        let other = SignTarget::Device(DeviceId::new("d2").unwrap());
        let now = 1_000_500;
        let good = signed(&ana, "ana", &me, "p1", 60_000);
        assert_eq!(t.check(&good, &me, false, now), Ok(()));
        assert!(t.check(&good, &other, false, now).unwrap_err().contains("does not verify for device/d2"));
        assert!(t.check(&good, &SignTarget::Fleet, false, now).is_err());
        // Altered after signing: another package, same signature.
        let mut altered = good.clone();
        (altered.verb, altered.args) = (Verb::Refresh, CommandArgs::Refresh);
        assert!(t.check(&altered, &me, false, now).unwrap_err().contains("does not verify"));
        let mut unsigned = good.clone();
        unsigned.signature = None;
        assert!(t.check(&unsigned, &me, false, now).unwrap_err().contains("no sig"));
        // A key the device does not have, or one signed by the wrong key under ana's name.
        let eve = keypair(2);
        assert!(t.check(&signed(&eve, "eve", &me, "p2", 60_000), &me, false, now).unwrap_err().contains("not trusted"));
        assert!(t
            .check(&signed(&eve, "ana", &me, "p3", 60_000), &me, false, now)
            .unwrap_err()
            .contains("does not verify"));
        // Life bounded; no expiry refused.
        assert!(t.check(&signed(&ana, "ana", &me, "p4", MAX_SIGNED_LIFE_MS + 1), &me, false, now).is_err());
        let mut forever = signed(&ana, "ana", &me, "p5", 60_000);
        forever.expires_at = None;
        assert!(t.check(&forever, &me, false, now).is_err());
        // Accepted once: a replay is refused after the journal forgot it, survives a restart.
        t.accepted(&good, now);
        assert!(t.check(&good, &me, false, now).unwrap_err().contains("replay"));
        assert_eq!(t.check(&good, &me, true, now), Ok(()), "a repeat the journal knows gets its outcome");
        let t = Trust::new(&keys, dir.path());
        assert!(t.check(&good, &me, false, now).unwrap_err().contains("replay"));
        // Revoked: the file is gone.
        std::fs::remove_file(keys.join("ana.pub")).unwrap();
        assert!(t.check(&signed(&ana, "ana", &me, "p6", 60_000), &me, false, now).unwrap_err().contains("not trusted"));
        assert_eq!(parse_public("# c\n\ned25519 00\n"), None);
    }
}
