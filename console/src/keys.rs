//! Operator keys (ed25519) for signed commands: `debfleet key generate` makes a pair, and with
//! `--sign-key` every command this console sends carries a signature (see the contract's
//! Signature). Devices trust the public half from `/etc/debfleet/operators.d/NAME.pub`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use debfleet_protocol::signature::{self, SignTarget, Signature};
use debfleet_protocol::Command;
use ring::signature::KeyPair;

/// A private key and the name devices know it by.
pub struct Signer {
    name: String,
    pair: ring::signature::Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.name)
    }
}

impl Signer {
    /// Reads `ed25519-private NAME <64 hex digits>`.
    pub fn load(path: &Path) -> Result<Signer> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading the signing key {}", path.display()))?;
        let mut words = text.split_whitespace();
        let (Some("ed25519-private"), Some(name), Some(seed), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            bail!("{}: expected \"ed25519-private NAME <64 hex digits>\" (debfleet key generate)", path.display());
        };
        let seed = signature::from_hex::<32>(seed)
            .with_context(|| format!("{}: the key is not 64 hex digits", path.display()))?;
        if !signature::valid_key_name(name) {
            bail!("{}: key name {name:?} is not valid", path.display());
        }
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|_| anyhow::anyhow!("{}: not an ed25519 key", path.display()))?;
        Ok(Signer { name: name.to_owned(), pair })
    }

    /// Signs `cmd` for `target` now (the command must carry its expiry already).
    pub fn sign(&self, cmd: &Command, target: &SignTarget) -> Signature {
        let issued_at = debfleet_protocol::time::now_unix_ms();
        let value = self.pair.sign(&cmd.signed_message(&self.name, target, issued_at));
        let mut bytes = [0u8; 64];
        bytes.copy_from_slice(value.as_ref());
        Signature { key: self.name.clone(), issued_at, value: bytes }
    }

    pub fn public_line(&self) -> String {
        format!("ed25519 {} {}\n", signature::to_hex(self.pair.public_key().as_ref()), self.name)
    }
}

/// `debfleet key generate NAME`: NAME.key (0600) and NAME.pub in `dir`; returns their paths.
pub fn generate(name: &str, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if !signature::valid_key_name(name) {
        bail!("key name {name:?}: 1-64 letters, digits, '-', '_', '.' or '@'");
    }
    let seed: [u8; 32] = crate::broker::random_bytes()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (private, public) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")));
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&private).with_context(|| {
            format!("creating {} (a key of that name exists? pick another name to rotate)", private.display())
        })?;
    f.write_all(format!("ed25519-private {name} {}\n", signature::to_hex(&seed)).as_bytes())?;
    f.sync_all()?;
    let signer = Signer::load(&private)?;
    std::fs::write(&public, signer.public_line()).with_context(|| format!("writing {}", public.display()))?;
    Ok((private, public))
}

pub fn default_dir() -> PathBuf {
    crate::web::default_path("keys")
}

#[cfg(test)]
mod tests {
    use super::*;
    use debfleet_protocol::{CommandArgs, DeviceId, OpId, Verb};

    #[test]
    fn generated_keys_sign_what_the_public_half_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = generate("ana-2026", dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(generate("ana-2026", dir.path()).is_err(), "never overwritten");
        let signer = Signer::load(&private).unwrap();
        let cmd = Command {
            id: OpId::new("p1").unwrap(),
            verb: Verb::Ping,
            args: CommandArgs::Ping,
            expires_at: Some(1),
            by: None,
            signature: None,
        };
        let target = SignTarget::Device(DeviceId::new("d1").unwrap());
        let sig = signer.sign(&cmd, &target);
        let text = std::fs::read_to_string(public).unwrap();
        let hex = text.split_whitespace().nth(1).unwrap();
        let pk = signature::from_hex::<32>(hex).unwrap();
        let msg = cmd.signed_message("ana-2026", &target, sig.issued_at);
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pk).verify(&msg, &sig.value).unwrap();
        assert!(Signer::load(&dir.path().join("ana-2026.pub")).is_err());
    }
}
