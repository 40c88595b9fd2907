//! `apt-get -s`: what a transaction would do, parsed from apt's simulation lines.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// (name, new version)
    pub install: Vec<(String, String)>,
    /// (name, old version, new version); downgrades included.
    pub upgrade: Vec<(String, String, String)>,
    /// (name, old version)
    pub remove: Vec<(String, String)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.install.is_empty() && self.upgrade.is_empty() && self.remove.is_empty()
    }
}

/// Parses `Inst NAME [OLD] (NEW SOURCE [ARCH])`, `Remv NAME [OLD]` and `Purg NAME [OLD]` lines.
pub fn parse(output: &str) -> Changes {
    let mut c = Changes::default();
    for line in output.lines() {
        let (kind, rest) = match line.split_once(' ') {
            Some((k @ ("Inst" | "Remv" | "Purg"), r)) => (k, r),
            _ => continue,
        };
        let mut words = rest.split_whitespace();
        let Some(name) = words.next() else { continue };
        let rest: String = words.collect::<Vec<_>>().join(" ");
        let old = rest.strip_prefix('[').and_then(|r| r.split_once(']')).map(|(v, _)| v.to_owned());
        let new = rest
            .split_once('(')
            .and_then(|(_, r)| r.split_whitespace().next())
            .map(|v| v.trim_end_matches(')').to_owned());
        let name = name.split(':').next().unwrap_or(name).to_owned();
        match (kind, old, new) {
            ("Inst", Some(old), Some(new)) => c.upgrade.push((name, old, new)),
            ("Inst", None, Some(new)) => c.install.push((name, new)),
            ("Remv" | "Purg", Some(old), _) => c.remove.push((name, old)),
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_simulation_output() {
        let out = "Reading package lists...\nThe following NEW packages will be installed:\n  hello\nInst libfoo (1.2-1 debfleet:stable [amd64])\nInst hello [2.10-2] (2.10-3 debfleet:stable [amd64]) []\nInst old:amd64 [3.0] (2.0 debfleet:stable [amd64])\nRemv gone [1.0]\nPurg purged [0.9]\nConf hello (2.10-3 debfleet:stable [amd64])\n";
        let c = parse(out);
        assert_eq!(c.install, vec![("libfoo".into(), "1.2-1".into())]);
        assert_eq!(
            c.upgrade,
            vec![("hello".into(), "2.10-2".into(), "2.10-3".into()), ("old".into(), "3.0".into(), "2.0".into())]
        );
        assert_eq!(c.remove, vec![("gone".into(), "1.0".into()), ("purged".into(), "0.9".into())]);
        assert!(parse("nothing to do").is_empty());
    }
}
