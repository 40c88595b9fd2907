//! apt's machine-readable progress (`APT::Status-Fd`): one line per event.

use debfleet_protocol::Phase;

/// One line of apt's status stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// `dlstatus:ITEM:PERCENT:TEXT` — downloading.
    Download { percent: f32, text: String },
    /// `pmstatus:PACKAGE:PERCENT:TEXT` — dpkg unpacking/configuring.
    Package { package: String, percent: f32, text: String },
    /// `pmerror:DEB:PERCENT:MESSAGE` — dpkg failed on a package.
    Error { package: String, message: String },
    /// `pmconffile:CONFFILE:PERCENT:'OLD' 'NEW' ...` — a conffile prompt was answered by policy.
    Conffile { path: String },
    /// `dlstatus`/`pmstatus` media change and anything else apt may add.
    Other(String),
}

/// The phase a `pmstatus` text describes, in debfleet's terms.
pub fn phase_of(text: &str) -> Phase {
    let t = text.to_ascii_lowercase();
    if t.starts_with("unpacking") || t.starts_with("preparing") {
        Phase::Unpacking
    } else if t.starts_with("setting up") || t.starts_with("configuring") || t.starts_with("installed") {
        Phase::Configuring
    } else if t.starts_with("removing")
        || t.starts_with("preparing for removal")
        || t.starts_with("completely removing")
        || t.starts_with("removed")
    {
        Phase::Removing
    } else if t.starts_with("running") || t.starts_with("processing triggers") {
        Phase::Triggers
    } else {
        Phase::Installing
    }
}

pub fn parse(line: &str) -> Status {
    let mut parts = line.splitn(4, ':');
    let kind = parts.next().unwrap_or("");
    let (a, b, c) = (parts.next(), parts.next(), parts.next());
    let percent = |p: Option<&str>| {
        p.and_then(|p| p.trim().parse::<f32>().ok()).filter(|p| p.is_finite()).unwrap_or(0.0).clamp(0.0, 100.0)
    };
    match (kind, a, b, c) {
        ("dlstatus", Some(_), p, Some(text)) => Status::Download { percent: percent(p), text: text.trim().to_owned() },
        ("pmstatus", Some(pkg), p, Some(text)) => {
            Status::Package { package: pkg.to_owned(), percent: percent(p), text: text.trim().to_owned() }
        }
        ("pmerror", Some(deb), _, Some(msg)) => {
            Status::Error { package: deb.to_owned(), message: msg.trim().to_owned() }
        }
        ("pmconffile", Some(path), _, _) => Status::Conffile { path: path.to_owned() },
        _ => Status::Other(line.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_status_lines() {
        assert_eq!(
            parse("dlstatus:1:9.09:Retrieving file 1 of 2"),
            Status::Download { percent: 9.09, text: "Retrieving file 1 of 2".into() }
        );
        assert_eq!(
            parse("pmstatus:hello:20.0000:Unpacking hello (2.10-3) over (2.10-2)"),
            Status::Package {
                package: "hello".into(),
                percent: 20.0,
                text: "Unpacking hello (2.10-3) over (2.10-2)".into()
            }
        );
        assert_eq!(
            parse("pmerror:/var/cache/apt/archives/x_1_all.deb:50:installed x package post-installation script subprocess returned error exit status 1"),
            Status::Error {
                package: "/var/cache/apt/archives/x_1_all.deb".into(),
                message: "installed x package post-installation script subprocess returned error exit status 1".into()
            }
        );
        assert_eq!(
            parse("pmconffile:/etc/x.conf:30:'/etc/x.conf' '/etc/x.conf.dpkg-new' 1 1"),
            Status::Conffile { path: "/etc/x.conf".into() }
        );
        assert!(matches!(parse("garbage"), Status::Other(_)));
        assert!(matches!(parse("pmstatus:x:NaN:y"), Status::Package { percent, .. } if percent == 0.0));
        assert_eq!(phase_of("Setting up hello (2.10-3)"), Phase::Configuring);
        assert_eq!(phase_of("Unpacking hello"), Phase::Unpacking);
        assert_eq!(phase_of("Removing hello"), Phase::Removing);
    }
}
