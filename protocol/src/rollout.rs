//! Staged rollouts: a version moved through a group's devices in waves by a controller that
//! writes their desired-state records, judges each wave by the devices' own reports, and stops
//! by itself on trouble.
//!
//! Three retained topics per rollout, each with one writer, so no two parties ever race on one:
//! - `rollout/ID/spec` ([`RolloutSpec`]): what to roll out and how; written once by the console.
//! - `rollout/ID` ([`RolloutState`]): where it stands, device by device; written only by the
//!   controller holding the lease, so a controller that starts resumes from it.
//! - `rollout/ID/control` ([`RolloutControl`]): the operator's latest instruction (pause,
//!   resume, abort, retry, rollback), numbered; the controller applies each number once.
//!
//! And `rollout/ID/lease` ([`Lease`]): which controller drives it, until when.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::desired::Target;
pub use crate::ids::RolloutId;
use crate::ids::{DeviceId, GroupName};
use crate::payloads::OpError;

/// The largest spec or control message a controller reads.
pub const MAX_SPEC_BYTES: usize = 16 * 1024;
/// The most waves a rollout has.
pub const MAX_WAVES: usize = 32;
/// The most packages one rollout moves.
pub const MAX_ROLLOUT_PACKAGES: usize = 32;

/// How many devices a wave takes: a count, or a share of the group (rounded up, at least one).
/// Waves are cumulative, as operators say them: `1,10%,50%,100%` ends with every device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveSize {
    Count(u32),
    Percent(u8),
}

impl WaveSize {
    pub fn parse(s: &str) -> Result<WaveSize, String> {
        let bad = || format!("{s:?}: a wave is a number of devices (5) or a share of the group (10%)");
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p @ 1..=100) => Ok(WaveSize::Percent(p)),
                _ => Err(bad()),
            },
            None => match s.parse::<u32>() {
                Ok(n @ 1..) => Ok(WaveSize::Count(n)),
                _ => Err(bad()),
            },
        }
    }

    /// How many of `total` devices have been reached once this wave has started.
    pub fn reach(self, total: usize) -> usize {
        let n = match self {
            WaveSize::Count(n) => n as usize,
            WaveSize::Percent(p) => (total * p as usize).div_ceil(100).max(1),
        };
        n.min(total)
    }
}

impl std::fmt::Display for WaveSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaveSize::Count(n) => write!(f, "{n}"),
            WaveSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for WaveSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WaveSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        WaveSize::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// `rollout/ID/spec` (retained, written once by `debfleet rollout create`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub v: u32,
    pub id: RolloutId,
    pub group: GroupName,
    /// Exact versions (a rollout is undone to exact versions too).
    pub packages: BTreeMap<String, Target>,
    pub waves: Vec<WaveSize>,
    /// The share of a wave's devices that must end healthy before the next wave starts.
    pub success_pct: u8,
    /// Failed devices (over the whole rollout) at which it halts.
    pub max_failures: u32,
    /// How long a device must stay healthy after converging before it counts as a success.
    pub watch_s: u32,
    /// How long a wave waits for a device that does not report (offline, powered off) before it
    /// is counted as `offline` and no longer holds the wave up.
    pub deadline_s: u32,
    #[serde(default)]
    pub auto_rollback: bool,
    #[serde(default)]
    pub pause_after_wave: bool,
    /// Devices install only inside this window of their local time (downloading ahead); it
    /// applies to every record the rollout writes, its rollback's too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::desired::Window>,
    pub by: String,
    pub ts: String,
}

impl RolloutSpec {
    pub fn parse(payload: &[u8]) -> Result<RolloutSpec, String> {
        if payload.len() > MAX_SPEC_BYTES {
            return Err(format!("the spec is {} bytes; the limit is {MAX_SPEC_BYTES}", payload.len()));
        }
        let s: RolloutSpec = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        s.check()?;
        Ok(s)
    }

    pub fn check(&self) -> Result<(), String> {
        if self.packages.is_empty() || self.packages.len() > MAX_ROLLOUT_PACKAGES {
            return Err(format!("a rollout moves 1 to {MAX_ROLLOUT_PACKAGES} packages"));
        }
        for (name, t) in &self.packages {
            if !crate::debian::valid_package_name(name) {
                return Err(format!("{name:?} is not a Debian package name"));
            }
            if !matches!(t, Target::Version(_)) {
                return Err(format!("{name}={t}: a rollout names exact versions"));
            }
        }
        if self.waves.is_empty() || self.waves.len() > MAX_WAVES {
            return Err(format!("a rollout has 1 to {MAX_WAVES} waves"));
        }
        if self.waves.last() != Some(&WaveSize::Percent(100)) {
            return Err("the last wave must be 100% (every device of the group)".into());
        }
        if !(1..=100).contains(&self.success_pct) {
            return Err("success must be 1% to 100%".into());
        }
        if self.max_failures == 0 {
            return Err("max failures must be 1 or more".into());
        }
        crate::ids::check_by(&self.by)?;
        Ok(())
    }

    /// What `desired` records say this rollout wrote them.
    pub fn writer(&self) -> String {
        format!("rollout/{}", self.id)
    }
}

/// Where the rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waves move on as their devices prove healthy.
    Running,
    /// No new wave starts until an operator resumes it (after a wave with `pause_after_wave`, or
    /// on `pause`); devices already asked go on.
    Paused,
    /// It stopped by itself: too many failures, or a wave below the success threshold.
    Halted,
    /// An operator stopped it: devices that had not converged were put back.
    Aborted,
    /// Its devices are being returned to the versions they had before.
    RollingBack,
    /// Every wave ended and the group's record names the new versions.
    Succeeded,
    /// Every device it changed is back on what it had before.
    RolledBack,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Running,
        Phase::Paused,
        Phase::Halted,
        Phase::Aborted,
        Phase::RollingBack,
        Phase::Succeeded,
        Phase::RolledBack,
    ];

    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Halted => "halted",
            Phase::Aborted => "aborted",
            Phase::RollingBack => "rolling_back",
            Phase::Succeeded => "succeeded",
            Phase::RolledBack => "rolled_back",
        }
    }

    /// No further change comes from the controller (an operator's `retry` or `rollback` can
    /// still start one).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Halted | Phase::Aborted | Phase::Succeeded | Phase::RolledBack)
    }
}

/// One device's part in the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Stage {
    /// Its record asks for the new versions; no verdict yet.
    Pending,
    /// It reports the new versions; healthy once its units have stayed up for the watch.
    Converged { at_ms: i64 },
    /// Converged and stayed healthy through the watch: a success.
    Healthy,
    /// Its report says blocked, or a unit failed during the watch.
    Failed { error: OpError },
    /// No verdict within the deadline; its record stays, so it converges when it returns.
    Offline,
    /// Put back to what it had before (abort or rollback), and it reports so.
    Reverted,
    /// Being put back; no verdict yet.
    Reverting,
}

impl Stage {
    /// The words an operator is told, in the order waves are tallied ([`RolloutState::tally`]).
    pub const WORDS: [&'static str; 7] =
        ["pending", "watching", "healthy", "failed", "offline", "reverting", "reverted"];

    /// What an operator is told: `watching` for a converged device under watch, else the
    /// wire's word.
    pub fn word(&self) -> &'static str {
        match self {
            Stage::Pending => "pending",
            Stage::Converged { .. } => "watching",
            Stage::Healthy => "healthy",
            Stage::Failed { .. } => "failed",
            Stage::Offline => "offline",
            Stage::Reverting => "reverting",
            Stage::Reverted => "reverted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutDevice {
    /// The wave (from 0) that reached it.
    pub wave: u16,
    #[serde(flatten)]
    pub stage: Stage,
    /// What it had before (versions, `absent`), to go back to.
    pub before: BTreeMap<String, Target>,
    /// The revision of its device record the rollout last wrote (its report must cover it).
    pub revision: u64,
    /// When the current stage's clock started (the deadline counts from here).
    pub since_ms: i64,
}

/// `rollout/ID` (retained; written only by the controller holding the lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    pub v: u32,
    pub id: RolloutId,
    pub phase: Phase,
    /// The wave under way (from 0); `None` before the first starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u16>,
    /// The group's devices when the rollout started, in the order waves take them.
    pub members: Vec<DeviceId>,
    pub devices: BTreeMap<DeviceId, RolloutDevice>,
    /// Why it halted, paused or stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The last control message applied.
    #[serde(default)]
    pub control_seq: u64,
    pub ts: String,
}

impl RolloutState {
    /// For each of `waves` waves, its devices and how many are at each of [`Stage::WORDS`].
    pub fn tally(&self, waves: usize) -> Vec<(usize, [usize; 7])> {
        let mut out = vec![(0, [0; 7]); waves];
        for e in self.devices.values() {
            if let Some((n, counts)) = out.get_mut(usize::from(e.wave)) {
                *n += 1;
                if let Some(i) = Stage::WORDS.iter().position(|w| *w == e.stage.word()) {
                    counts[i] += 1;
                }
            }
        }
        out
    }
}

/// An operator's instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Pause,
    Resume,
    Abort,
    /// Ask the failed devices again (a new revision of their record).
    Retry,
    /// Return every device the rollout changed to what it had before.
    Rollback,
}

impl Action {
    pub const ALL: [Action; 5] = [Action::Pause, Action::Resume, Action::Abort, Action::Retry, Action::Rollback];

    /// Whether the instruction means anything in this phase (consoles refuse the others; the
    /// controller ignores them).
    pub fn applies(self, phase: Phase) -> bool {
        match self {
            Action::Pause => phase == Phase::Running,
            Action::Resume => phase == Phase::Paused,
            Action::Abort => matches!(phase, Phase::Running | Phase::Paused | Phase::Halted),
            Action::Retry => phase != Phase::RollingBack,
            Action::Rollback => phase != Phase::RolledBack,
        }
    }

    /// The word on the wire (and the console's subcommand).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Abort => "abort",
            Action::Retry => "retry",
            Action::Rollback => "rollback",
        }
    }
}

/// `rollout/ID/control` (retained: a controller that starts later still sees it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutControl {
    pub v: u32,
    /// Raised by every instruction; the controller applies each once.
    pub seq: u64,
    pub action: Action,
    pub by: String,
    pub ts: String,
}

impl RolloutControl {
    pub fn parse(payload: &[u8]) -> Result<RolloutControl, String> {
        if payload.len() > MAX_SPEC_BYTES {
            return Err(format!("the message is {} bytes; the limit is {MAX_SPEC_BYTES}", payload.len()));
        }
        serde_json::from_slice(payload).map_err(|e| e.to_string())
    }
}

/// `rollout/ID/lease` (retained): the controller driving the rollout renews it well before it
/// expires; another takes over only once it has expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub v: u32,
    pub holder: String,
    pub expires_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_parse_and_reach_cumulatively() {
        let w: Vec<WaveSize> = ["1", "10%", "50%", "100%"].iter().map(|s| WaveSize::parse(s).unwrap()).collect();
        assert_eq!(w.iter().map(|w| w.reach(6)).collect::<Vec<_>>(), [1, 1, 3, 6]);
        assert_eq!(w.iter().map(|w| w.reach(1000)).collect::<Vec<_>>(), [1, 100, 500, 1000]);
        assert_eq!(WaveSize::Count(10).reach(3), 3);
        for bad in ["0", "0%", "101%", "-1", "x", "", "%", "1.5"] {
            assert!(WaveSize::parse(bad).is_err(), "{bad}");
        }
    }

    fn spec() -> RolloutSpec {
        RolloutSpec {
            v: 1,
            id: RolloutId::new("r1").unwrap(),
            group: GroupName::new("lab").unwrap(),
            packages: [("hello".to_owned(), Target::Version("2.0".into()))].into(),
            waves: vec![WaveSize::Count(1), WaveSize::Percent(100)],
            success_pct: 95,
            max_failures: 1,
            watch_s: 10,
            deadline_s: 600,
            auto_rollback: true,
            pause_after_wave: false,
            window: None,
            by: "ana".into(),
            ts: "t".into(),
        }
    }

    #[test]
    fn specs_are_checked() {
        let s = spec();
        assert_eq!(RolloutSpec::parse(&serde_json::to_vec(&s).unwrap()).unwrap(), s);
        let bad = [
            RolloutSpec { packages: BTreeMap::new(), ..spec() },
            RolloutSpec { packages: [("hello".to_owned(), Target::Latest(None))].into(), ..spec() },
            RolloutSpec { waves: vec![WaveSize::Count(1)], ..spec() },
            RolloutSpec { success_pct: 0, ..spec() },
            RolloutSpec { max_failures: 0, ..spec() },
            RolloutSpec { by: String::new(), ..spec() },
        ];
        for b in bad {
            assert!(RolloutSpec::parse(&serde_json::to_vec(&b).unwrap()).is_err(), "{b:?}");
        }
        assert!(RolloutSpec::parse(br#"{"v":1,"id":"../x"}"#).is_err());
        assert!(RolloutSpec::parse(&vec![b' '; MAX_SPEC_BYTES + 1]).unwrap_err().contains("limit"));
    }

    #[test]
    fn phases_and_actions_name_themselves_as_on_the_wire() {
        for p in Phase::ALL {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        for a in Action::ALL {
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
        }
    }

    #[test]
    fn device_stages_are_tagged() {
        let d = RolloutDevice {
            wave: 0,
            stage: Stage::Converged { at_ms: 5 },
            before: [("hello".to_owned(), Target::Absent)].into(),
            revision: 2,
            since_ms: 1,
        };
        let text = serde_json::to_string(&d).unwrap();
        assert!(text.contains(r#""state":"converged","at_ms":5"#), "{text}");
        assert_eq!(serde_json::from_str::<RolloutDevice>(&text).unwrap(), d);
    }
}
