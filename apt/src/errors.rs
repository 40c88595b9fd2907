//! apt's failures, recognised from what it prints, as typed errors.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AptError {
    #[error("package {0} is not known to apt (not in the device's repositories)")]
    PackageNotFound(String),
    #[error("version {version} of {package} is not in the device's repositories")]
    VersionNotFound { package: String, version: String },
    #[error("the transaction cannot be resolved: {0}")]
    DependencyConflict(String),
    #[error("downloading failed: {0}")]
    DownloadFailed(String),
    #[error("repository signature check failed: {0}")]
    SignatureFailure(String),
    #[error("the disk is full: {0}")]
    DiskFull(String),
    #[error("a maintainer script failed: {0}")]
    MaintainerScriptFailed(String),
    #[error("another package manager holds the dpkg lock: {0}")]
    LockTimeout(String),
    #[error("{0:?} is not a valid Debian package name or version")]
    InvalidSpec(String),
    #[error("running {command}: {message}")]
    Io { command: String, message: String },
    #[error("apt-get failed: {0}")]
    Other(String),
}

impl AptError {
    /// A stable, machine-readable code for operation results.
    /// The contract's error code for this failure.
    pub fn code(&self) -> debfleet_protocol::ErrorCode {
        use debfleet_protocol::ErrorCode;
        match self {
            AptError::PackageNotFound(_) => ErrorCode::PackageNotFound,
            AptError::VersionNotFound { .. } => ErrorCode::VersionNotFound,
            AptError::DependencyConflict(_) => ErrorCode::DependencyConflict,
            AptError::DownloadFailed(_) => ErrorCode::DownloadFailed,
            AptError::SignatureFailure(_) => ErrorCode::SignatureFailure,
            AptError::DiskFull(_) => ErrorCode::DiskFull,
            AptError::MaintainerScriptFailed(_) => ErrorCode::MaintainerScriptFailed,
            AptError::LockTimeout(_) => ErrorCode::LockTimeout,
            AptError::InvalidSpec(_) => ErrorCode::InvalidValue,
            AptError::Io { .. } | AptError::Other(_) => ErrorCode::AptFailed,
        }
    }
}

/// Classifies a failed apt-get run from its output (stderr and stdout together) and the
/// dpkg errors seen on the status stream.
pub fn classify(output: &str, dpkg_errors: &[String]) -> AptError {
    let line_with = |needle: &str| -> Option<String> {
        output.lines().find(|l| l.contains(needle)).map(|l| l.trim_start_matches("E: ").trim().to_owned())
    };
    if let Some(l) = line_with("Unable to locate package ") {
        let pkg = l.rsplit(' ').next().unwrap_or("").to_owned();
        return AptError::PackageNotFound(pkg);
    }
    if let Some(l) = line_with("was not found") {
        // E: Version '9.9' for 'hello' was not found
        let quoted: Vec<&str> = l.split('\'').collect();
        if quoted.len() >= 4 {
            return AptError::VersionNotFound { package: quoted[3].to_owned(), version: quoted[1].to_owned() };
        }
    }
    for needle in ["Could not get lock", "Unable to acquire the dpkg frontend lock", "Unable to lock"] {
        if let Some(l) = line_with(needle) {
            return AptError::LockTimeout(l);
        }
    }
    for needle in [
        "NO_PUBKEY",
        "is not signed",
        "signatures couldn't be verified",
        "signatures were invalid",
        "The repository",
        "EXPKEYSIG",
    ] {
        if let Some(l) = line_with(needle) {
            if needle != "The repository" || l.contains("not signed") {
                return AptError::SignatureFailure(l);
            }
        }
    }
    if let Some(l) = line_with("No space left on device").or_else(|| line_with("You don't have enough free space")) {
        return AptError::DiskFull(l);
    }
    if let Some(e) = dpkg_errors.first() {
        return AptError::MaintainerScriptFailed(e.clone());
    }
    if let Some(l) = line_with("subprocess returned error exit status").or_else(|| line_with("script subprocess")) {
        return AptError::MaintainerScriptFailed(l);
    }
    if let Some(l) = line_with("Failed to fetch").or_else(|| line_with("Some index files failed")) {
        return AptError::DownloadFailed(l);
    }
    if output.contains("unmet dependencies")
        || output.contains("held broken packages")
        || output.contains("Unable to correct problems")
    {
        let detail = output
            .lines()
            .filter(|l| l.contains("Depends:") || l.contains("Conflicts:") || l.contains("Breaks:"))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("; ");
        return AptError::DependencyConflict(if detail.is_empty() {
            line_with("E:").unwrap_or_default()
        } else {
            detail
        });
    }
    AptError::Other(
        output
            .lines()
            .filter(|l| l.starts_with("E:"))
            .map(|l| l.trim_start_matches("E: "))
            .collect::<Vec<_>>()
            .join("; "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_real_apt_messages() {
        let cases: &[(&str, &str)] = &[
            ("E: Unable to locate package nosuch", "package_not_found"),
            ("E: Version '9.9' for 'hello' was not found", "version_not_found"),
            ("E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 123 (apt-get)", "lock_timeout"),
            ("W: GPG error: http://x stable InRelease: The following signatures couldn't be verified because the public key is not available: NO_PUBKEY 1234\nE: The repository 'http://x stable InRelease' is not signed.", "signature_failure"),
            ("E: Write error - write (28: No space left on device)", "disk_full"),
            ("E: Failed to fetch http://x/pool/a.deb  404  Not Found [IP: 127.0.0.1 80]", "download_failed"),
            ("The following packages have unmet dependencies:\n a : Depends: b (>= 2) but 1 is to be installed\nE: Unable to correct problems, you have held broken packages.", "dependency_conflict"),
            ("E: Sub-process /usr/bin/dpkg returned an error code (1)", "apt_failed"),
        ];
        for (out, code) in cases {
            assert_eq!(classify(out, &[]).code().as_str(), *code, "{out}");
        }
        assert_eq!(
            classify("E: Version '9.9' for 'hello' was not found", &[]),
            AptError::VersionNotFound { package: "hello".into(), version: "9.9".into() }
        );
        let e = classify(
            "E: Sub-process /usr/bin/dpkg returned an error code (1)",
            &["x: post-installation script returned 1".into()],
        );
        assert_eq!(e.code().as_str(), "maintainer_script_failed");
    }
}
