//! Desired state: what should be installed on a group's devices or on one device, as retained
//! records (`desired/group/G`, `desired/device/ID`) the agent reconciles against dpkg, and the
//! agent's retained report of where it stands (`device/ID/state/desired`).
//!
//! A device's effective target is its groups' records merged, then its own record on top: a
//! device entry overrides group entries; two groups that name the same package differently,
//! with no device entry to settle it, are a conflict the device reports instead of guessing.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{GroupName, OpId};
use crate::payloads::OpError;

/// Operation ids a device gives its desired-state operations start with this; commands may not
/// use it.
pub const OP_PREFIX: &str = "desired-";

/// The most packages one record may name.
pub const MAX_DESIRED_PACKAGES: usize = 256;
/// The largest record a device reads (a receiver rejects a larger one without parsing it).
pub const MAX_DESIRED_BYTES: usize = 32 * 1024;

/// What one package should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Exactly this version: installed, upgraded or downgraded to it.
    Version(String),
    /// The newest version apt has — from this suite (apt's `PKG/SUITE`) when one is named —
    /// installed once per revision: a newer upload needs a new revision to reach the device.
    Latest(Option<String>),
    /// Not installed: removed (configuration files kept) where it is.
    Absent,
}

impl Target {
    /// `1.2-1`, `latest`, `latest/SUITE`, `absent`. Debian versions start with a digit (or an
    /// epoch), so the words cannot be mistaken for one.
    pub fn parse(s: &str) -> Result<Target, String> {
        match s {
            "latest" => Ok(Target::Latest(None)),
            "absent" => Ok(Target::Absent),
            _ => match s.strip_prefix("latest/") {
                Some(suite) if crate::debian::valid_suite(suite) => Ok(Target::Latest(Some(suite.to_owned()))),
                Some(suite) => Err(format!("{suite:?} is not a suite name")),
                None if crate::debian::valid_version(s) => Ok(Target::Version(s.to_owned())),
                None => Err(format!("{s:?} is neither a Debian version nor latest, latest/SUITE or absent")),
            },
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Version(v) => f.write_str(v),
            Target::Latest(None) => f.write_str("latest"),
            Target::Latest(Some(s)) => write!(f, "latest/{s}"),
            Target::Absent => f.write_str("absent"),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Target::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// When a device may install, in its local time: `02:00-04:00`; one whose end comes before its
/// start spans midnight (`22:00-02:00`). Outside it a device downloads what it needs and waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Minutes after local midnight: the first minute inside, and the first after it.
    pub from: u16,
    pub to: u16,
}

const DAY_MIN: u16 = 24 * 60;

impl Window {
    pub fn parse(s: &str) -> Result<Window, String> {
        let bad = || format!("{s:?} is not an install window like 02:00-04:00 (device local time)");
        let minute = |t: &str| -> Option<u16> {
            let (h, m) = t.split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (from, to) = (minute(a).ok_or_else(bad)?, minute(b).ok_or_else(bad)?);
        if from == to {
            return Err(format!("{s:?}: an install window cannot start and end at the same minute"));
        }
        Ok(Window { from, to })
    }

    /// Whether `minute` (after local midnight) is inside.
    pub fn contains(&self, minute: u16) -> bool {
        if self.from < self.to {
            (self.from..self.to).contains(&minute)
        } else {
            minute >= self.from || minute < self.to
        }
    }

    /// Minutes from `minute` until the window next opens (0 inside it).
    pub fn opens_in(&self, minute: u16) -> u16 {
        if self.contains(minute) {
            0
        } else {
            (self.from + DAY_MIN - minute % DAY_MIN) % DAY_MIN
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}:{:02}-{:02}:{:02}", self.from / 60, self.from % 60, self.to / 60, self.to % 60)
    }
}

impl Serialize for Window {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Window::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `desired/group/G` and `desired/device/ID` (retained, published by consoles and rollout
/// controllers; an empty retained message removes the record, which removes nothing from a
/// device: it only stops asking).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredRecord {
    pub v: u32,
    /// Raised by every change; the device reports the revisions it converged to.
    pub revision: u64,
    pub packages: BTreeMap<String, Target>,
    /// Who set it: an operator's name, or `rollout/ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Install only inside this window of the device's local time (downloading ahead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    pub ts: String,
}

impl DesiredRecord {
    /// A record as it arrives: size, JSON, then every name and target checked.
    pub fn parse(payload: &[u8]) -> Result<DesiredRecord, String> {
        if payload.len() > MAX_DESIRED_BYTES {
            return Err(format!("the record is {} bytes; the limit is {MAX_DESIRED_BYTES}", payload.len()));
        }
        let r: DesiredRecord = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        r.check()?;
        Ok(r)
    }

    pub fn check(&self) -> Result<(), String> {
        if self.revision == 0 {
            return Err("revision must be 1 or more".into());
        }
        if self.packages.len() > MAX_DESIRED_PACKAGES {
            return Err(format!("{} packages; a record names at most {MAX_DESIRED_PACKAGES}", self.packages.len()));
        }
        if let Some(bad) = self.packages.keys().find(|n| !crate::debian::valid_package_name(n)) {
            return Err(format!("{bad:?} is not a Debian package name"));
        }
        if let Some(by) = &self.by {
            crate::ids::check_by(by)?;
        }
        Ok(())
    }
}

/// Where a record comes from, as named in reports: `device` or `group/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Group(GroupName),
    Device,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Device => f.write_str("device"),
            Source::Group(g) => write!(f, "group/{g}"),
        }
    }
}

/// Two groups name a package differently and the device's own record does not settle it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub package: String,
    pub a: (GroupName, Target),
    pub b: (GroupName, Target),
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: group {} wants {} and group {} wants {}; set it on the device or in one group only",
            self.package, self.a.0, self.a.1, self.b.0, self.b.1
        )
    }
}

/// The device's target from its groups' records and its own: a device entry wins over group
/// entries; group entries that disagree (without a device entry) are a [`Conflict`].
pub fn effective<'a>(
    groups: impl IntoIterator<Item = (&'a GroupName, &'a DesiredRecord)>,
    device: Option<&DesiredRecord>,
) -> Result<BTreeMap<String, Target>, Conflict> {
    let mut from: BTreeMap<&str, (&GroupName, &Target)> = BTreeMap::new();
    for (g, r) in groups {
        for (name, t) in &r.packages {
            if device.is_some_and(|d| d.packages.contains_key(name)) {
                continue;
            }
            match from.get(name.as_str()) {
                Some((other, earlier)) if *earlier != t => {
                    return Err(Conflict {
                        package: name.clone(),
                        a: ((*other).clone(), (*earlier).clone()),
                        b: (g.clone(), t.clone()),
                    })
                }
                Some(_) => {}
                None => {
                    from.insert(name, (g, t));
                }
            }
        }
    }
    let mut out: BTreeMap<String, Target> = from.into_iter().map(|(n, (_, t))| (n.to_owned(), t.clone())).collect();
    if let Some(d) = device {
        out.extend(d.packages.iter().map(|(n, t)| (n.clone(), t.clone())));
    }
    Ok(out)
}

/// The install window that applies: the device's own record's, else its groups' (which must
/// agree: two groups asking for different windows, with no device window to settle it, are a
/// conflict, as for packages).
pub fn effective_window<'a>(
    groups: impl IntoIterator<Item = (&'a GroupName, &'a DesiredRecord)>,
    device: Option<&DesiredRecord>,
) -> Result<Option<Window>, String> {
    if let Some(w) = device.and_then(|d| d.window) {
        return Ok(Some(w));
    }
    let mut found: Option<(&GroupName, Window)> = None;
    for (g, r) in groups {
        match (found, r.window) {
            (Some((other, w)), Some(mine)) if w != mine => {
                return Err(format!(
                    "group {other} installs in {w} and group {g} in {mine}; set the window on the device or in one group only"
                ))
            }
            (None, Some(mine)) => found = Some((g, mine)),
            _ => {}
        }
    }
    Ok(found.map(|(_, w)| w))
}

/// Where the device stands against its desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Convergence {
    /// dpkg has what the records ask for.
    Converged,
    /// An operation is on its way there (`op/ID` has its progress).
    Converging { op: OpId },
    /// Outside its install window: its operation (`op`) downloaded what it needs and installs
    /// when the window opens (`opens_at`, by the device's clock); a removal (no `op` yet)
    /// starts then.
    Scheduled {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        op: Option<OpId>,
        window: Window,
        opens_at: String,
    },
    /// It cannot get there without an operator: the operation that failed (its record has the
    /// details, and it is not retried until a record changes), records that disagree
    /// (`conflict`), or packages changed since it converged (`drifted`).
    Blocked {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        op: Option<OpId>,
        error: OpError,
    },
}

/// `device/ID/state/desired` (retained): published by devices that have desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredReport {
    pub v: u32,
    pub ts: String,
    #[serde(flatten)]
    pub convergence: Convergence,
    /// The revision of every record that applies, by source (`device`, `group/NAME`).
    pub revisions: BTreeMap<String, u64>,
    /// The effective target (empty when blocked by a conflict).
    pub packages: BTreeMap<String, Target>,
    /// Records refused (by source), with why; the previous record from each still applies.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refused: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(rev: u64, p: &[(&str, &str)]) -> DesiredRecord {
        DesiredRecord {
            v: 1,
            revision: rev,
            packages: p.iter().map(|(n, t)| (n.to_string(), Target::parse(t).unwrap())).collect(),
            by: None,
            window: None,
            ts: "2026-12-03T08:00:00.000Z".into(),
        }
    }

    #[test]
    fn windows_parse_contain_and_open() {
        let w = Window::parse("02:00-04:00").unwrap();
        assert_eq!(w.to_string(), "02:00-04:00");
        assert!(w.contains(120) && w.contains(239) && !w.contains(240) && !w.contains(119));
        assert_eq!((w.opens_in(60), w.opens_in(130), w.opens_in(240)), (60, 0, 22 * 60));
        // Across midnight.
        let n = Window::parse("22:30-01:00").unwrap();
        assert!(n.contains(23 * 60) && n.contains(0) && n.contains(59) && !n.contains(60) && !n.contains(22 * 60));
        assert_eq!(n.opens_in(22 * 60), 30);
        for bad in ["", "02:00", "2:00-04:00", "02:00-24:00", "02:60-03:00", "03:00-03:00", "02:00-04:00x", "a:b-c:d"] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
        let rec = br#"{"v":1,"revision":1,"packages":{},"window":"25:00-01:00","ts":"t"}"#;
        assert!(DesiredRecord::parse(rec).unwrap_err().contains("install window"));
    }

    #[test]
    fn the_device_window_wins_and_group_windows_must_agree() {
        let (a, b) = (GroupName::new("a").unwrap(), GroupName::new("b").unwrap());
        let w = |s: &str| Some(Window::parse(s).unwrap());
        let ga = DesiredRecord { window: w("02:00-04:00"), ..rec(1, &[]) };
        let gb = DesiredRecord { window: w("03:00-05:00"), ..rec(1, &[]) };
        let none = rec(1, &[]);
        assert_eq!(effective_window([(&a, &ga), (&b, &none)], None).unwrap(), w("02:00-04:00"));
        assert!(effective_window([(&a, &ga), (&b, &gb)], None)
            .unwrap_err()
            .contains("group a installs in 02:00-04:00"));
        let dev = DesiredRecord { window: w("23:00-01:00"), ..rec(1, &[]) };
        assert_eq!(effective_window([(&a, &ga), (&b, &gb)], Some(&dev)).unwrap(), w("23:00-01:00"));
        assert_eq!(effective_window([(&b, &none)], Some(&none)).unwrap(), None);
    }

    #[test]
    fn targets_parse_and_print_back() {
        for s in ["1.0-1", "2:1.0~rc1+b1", "latest", "latest/stable", "absent"] {
            assert_eq!(Target::parse(s).unwrap().to_string(), s);
        }
        for bad in ["", "Latest", "latest/", "latest/../x", "1.0 1", "v1", "absent/x", "latest/Stable"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn records_are_checked() {
        let ok = br#"{"v":1,"revision":3,"packages":{"hello":"1.0-1","kiosk":"latest/stable","old":"absent"},"by":"ana","ts":"t"}"#;
        assert_eq!(DesiredRecord::parse(ok).unwrap().packages.len(), 3);
        for bad in [
            &br#"{"v":1,"revision":0,"packages":{},"ts":"t"}"#[..],
            br#"{"v":1,"revision":1,"packages":{"Bad Name":"1.0"},"ts":"t"}"#,
            br#"{"v":1,"revision":1,"packages":{"hello":"1.0; rm -rf /"},"ts":"t"}"#,
            br#"{"v":1,"revision":1,"packages":{"hello":7},"ts":"t"}"#,
            br#"{"v":1,"revision":-1,"packages":{},"ts":"t"}"#,
            br#"{"v":1,"revision":1,"packages":[],"ts":"t"}"#,
            br#"{"v":1,"revision":1,"packages":{},"ts":"t","by":""}"#,
            b"[]",
            b"\xff\xfe",
        ] {
            assert!(DesiredRecord::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let many: BTreeMap<String, Target> =
            (0..=MAX_DESIRED_PACKAGES).map(|i| (format!("p{i}"), Target::Absent)).collect();
        let r = DesiredRecord { packages: many, ..rec(1, &[]) };
        assert!(DesiredRecord::parse(&serde_json::to_vec(&r).unwrap()).unwrap_err().contains("at most"));
        assert!(DesiredRecord::parse(&vec![b' '; MAX_DESIRED_BYTES + 1]).unwrap_err().contains("limit"));
    }

    #[test]
    fn device_entries_override_and_groups_that_disagree_conflict() {
        let (a, b) = (GroupName::new("a").unwrap(), GroupName::new("b").unwrap());
        let ga = rec(1, &[("hello", "1.0"), ("tool", "latest")]);
        let gb = rec(4, &[("hello", "2.0"), ("tool", "latest"), ("old", "absent")]);
        let err = effective([(&a, &ga), (&b, &gb)], None).unwrap_err();
        assert_eq!(err.package, "hello");
        assert!(err.to_string().contains("group a wants 1.0 and group b wants 2.0"), "{err}");
        let dev = rec(2, &[("hello", "1.5")]);
        let t = effective([(&a, &ga), (&b, &gb)], Some(&dev)).unwrap();
        let shown: Vec<String> = t.iter().map(|(n, t)| format!("{n}={t}")).collect();
        assert_eq!(shown, ["hello=1.5", "old=absent", "tool=latest"]);
    }

    #[test]
    fn reports_round_trip() {
        let r = DesiredReport {
            v: 1,
            ts: "t".into(),
            convergence: Convergence::Blocked {
                op: Some(OpId::new("desired-1").unwrap()),
                error: OpError { code: crate::ErrorCode::UnitFailed, message: "m".into() },
            },
            revisions: [("group/a".to_owned(), 3)].into(),
            packages: [("hello".to_owned(), Target::Version("1.0".into()))].into(),
            refused: BTreeMap::new(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(r#""state":"blocked""#), "{text}");
        assert_eq!(serde_json::from_str::<DesiredReport>(&text).unwrap(), r);
    }
}
