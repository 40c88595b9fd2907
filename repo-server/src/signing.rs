//! The repository's OpenPGP key: generated (ed25519, v4 "EdDSA legacy" framing so that apt's gpgv
//! accepts it) or imported, and the signatures apt checks: InRelease (cleartext) and Release.gpg
//! (detached, over the exact bytes of Release).

use std::path::Path;

use anyhow::{bail, Context, Result};
use pgp::composed::{
    ArmorOptions, CleartextSignedMessage, Deserializable, DetachedSignature, EncryptionCaps, KeyType,
    SecretKeyParamsBuilder, SignedPublicKey, SignedSecretKey,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::ser::Serialize;
use pgp::types::{KeyDetails, Password};

pub struct Signer {
    key: SignedSecretKey,
}

impl Signer {
    pub fn generate(user_id: &str) -> Result<Signer> {
        let mut params = SecretKeyParamsBuilder::default();
        params
            .key_type(KeyType::Ed25519Legacy)
            .can_certify(true)
            .can_sign(true)
            .can_encrypt(EncryptionCaps::None)
            .primary_user_id(user_id.into());
        let params = params.build().context("key parameters")?;
        let key = params.generate(rand::thread_rng()).context("generating the signing key")?;
        Ok(Signer { key })
    }

    /// Reads an armored or binary secret key (without a passphrase).
    pub fn import(bytes: &[u8]) -> Result<Signer> {
        let key = match SignedSecretKey::from_armor_single(bytes) {
            Ok((key, _)) => key,
            Err(_) => SignedSecretKey::from_bytes(bytes).context("not an OpenPGP secret key (armored or binary)")?,
        };
        let signer = Signer { key };
        // Prove the key can sign without a passphrase before we rely on it.
        signer.sign_release("check\n").context("the key cannot sign (passphrase-protected keys are not supported)")?;
        Ok(signer)
    }

    pub fn load(path: &Path) -> Result<Signer> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (key, _) =
            SignedSecretKey::from_armor_single(&bytes[..]).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Signer { key })
    }

    pub fn secret_armored(&self) -> Result<String> {
        Ok(self.key.to_armored_string(ArmorOptions::default())?)
    }

    pub fn public(&self) -> SignedPublicKey {
        SignedPublicKey::from(self.key.clone())
    }

    /// The public key in binary form, as apt's `signed-by=` wants it.
    pub fn public_binary(&self) -> Result<Vec<u8>> {
        Ok(self.public().to_bytes()?)
    }

    pub fn public_armored(&self) -> Result<String> {
        Ok(self.public().to_armored_string(ArmorOptions::default())?)
    }

    pub fn fingerprint(&self) -> String {
        self.key.fingerprint().to_string()
    }

    /// Returns (InRelease, Release.gpg) for the Release text.
    pub fn sign_release(&self, release: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        if release.lines().any(|l| l.ends_with([' ', '\t'])) {
            // gpg strips trailing whitespace before checking a cleartext signature.
            bail!("Release text has trailing whitespace");
        }
        let pw = Password::empty();
        let clear = CleartextSignedMessage::sign(rand::thread_rng(), release, &self.key.primary_key, &pw)?;
        let inrelease = clear.to_armored_bytes(ArmorOptions::default())?;
        let detached = DetachedSignature::sign_binary_data(
            rand::thread_rng(),
            &self.key.primary_key,
            &pw,
            HashAlgorithm::Sha256,
            release.as_bytes(),
        )?;
        let gpg = detached.to_armored_bytes(ArmorOptions::default())?;
        Ok((inrelease, gpg))
    }
}
