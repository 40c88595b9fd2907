//! Debian name syntax shared by every crate that handles package names, versions and suites:
//! checked before such a string reaches a command line, a path or a URL.

/// Debian's name for a Rust target architecture (`std::env::consts::ARCH`).
pub fn debian_arch(rust_arch: &str) -> &'static str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "armhf",
        "x86" => "i386",
        "riscv64" => "riscv64",
        "powerpc64" => "ppc64el",
        "s390x" => "s390x",
        _ => "unknown",
    }
}

/// Debian's name for the architecture this program was built for.
pub fn host_arch() -> &'static str {
    debian_arch(std::env::consts::ARCH)
}

/// Debian policy 5.6.1.
pub fn valid_package_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2
        && b.len() <= 128
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'+' | b'-' | b'.'))
}

/// Debian policy 5.6.12: `[epoch:]upstream[-revision]`.
pub fn valid_version(v: &str) -> bool {
    if v.is_empty() || v.len() > 128 {
        return false;
    }
    let (epoch, rest) = match v.split_once(':') {
        Some((e, r)) => (Some(e), r),
        None => (None, v),
    };
    if epoch.is_some_and(|e| e.is_empty() || !e.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    let (upstream, revision) = match rest.rsplit_once('-') {
        Some((u, r)) => (u, Some(r)),
        None => (rest, None),
    };
    let up_ok = upstream.as_bytes().first().is_some_and(u8::is_ascii_digit)
        && upstream.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'~' | b'-' | b':'))
        && (epoch.is_some() || !upstream.contains(':'));
    let rev_ok = revision.is_none_or(|r| {
        !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'~'))
    });
    up_ok && rev_ok
}

/// A repository suite (channel): `[a-z0-9][a-z0-9.-]*`, at most 64 characters, no `..`.
pub fn valid_suite(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && !s.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_versions_suites() {
        for n in ["bash", "libc6", "g++", "x.y-z"] {
            assert!(valid_package_name(n), "{n}");
        }
        for n in ["", "a", "Bash", "-x", "a b", "a;rm", "a/b"] {
            assert!(!valid_package_name(n), "{n:?}");
        }
        for v in ["1.0", "1:2.3-4", "2.0~rc1-1+deb12u1", "0.1-1.2", "1.2.3+git20240101-0ubuntu1"] {
            assert!(valid_version(v), "{v}");
        }
        for v in ["", "a1.0", "1.0-", ":1", "x:1", "1.0 beta", "1.0\n", "1_0", "1.0-a b", "1;ls"] {
            assert!(!valid_version(v), "{v:?}");
        }
        assert!(valid_suite("stable") && valid_suite("bookworm-backports") && valid_suite("1.2"));
        for s in ["", "Stable", "../x", "a/b", "-x", "a..b", "x y"] {
            assert!(!valid_suite(s), "{s:?}");
        }
    }
}
