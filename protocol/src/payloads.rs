//! Payloads of the device topics. Every one carries `v` (the contract version); receivers ignore
//! fields they do not know and reject payloads that miss required ones.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cfg::RuntimeCfg;
use crate::ids::{DeviceId, GroupName, OpId};

fn is_false(b: &bool) -> bool {
    !*b
}

/// `device/ID/meta`: who the device is and what it understands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub v: u32,
    pub device_id: DeviceId,
    pub agent_version: String,
    pub hostname: String,
    pub os: OsRelease,
    /// Debian architecture name (`amd64`, `arm64`, `armhf`, ...).
    pub arch: String,
    pub kernel: String,
    pub boot_id: String,
    pub groups: Vec<GroupName>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Verbs this agent accepts.
    pub commands: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsRelease {
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pretty_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    Online,
    Offline,
    /// Published by the broker as the device's last will when its connection vanished.
    Lost,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Online => "online",
            Liveness::Offline => "offline",
            Liveness::Lost => "lost",
        }
    }
}

/// `device/ID/status`. For `online` and `lost`, `since` is when the current (or lost) connection
/// started; for `offline`, when the agent stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub v: u32,
    pub state: Liveness,
    pub since: String,
    pub boot_id: String,
}

/// `device/ID/cfg`: the effective runtime configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CfgMessage {
    pub v: u32,
    #[serde(flatten)]
    pub cfg: RuntimeCfg,
}

/// `device/ID/state/packages`: the managed packages as dpkg sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackagesState {
    pub v: u32,
    pub ts: String,
    pub packages: BTreeMap<String, PackageState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageState {
    /// Installed version; absent when the package is not installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// dpkg's package state: `installed`, `not-installed`, `config-files`, `half-configured`, ...
    pub status: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub held: bool,
}

/// `device/ID/state/units`: the managed packages' systemd units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitsState {
    pub v: u32,
    pub ts: String,
    pub units: BTreeMap<String, UnitInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitInfo {
    /// The managed package that owns the unit.
    pub package: String,
    /// systemd's ActiveState.
    pub active: crate::units::ActiveState,
    /// systemd's SubState: `running`, `dead`, `auto-restart`, ...
    pub sub: String,
    /// UnitFileState: `enabled`, `disabled`, `static`, ...
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub enabled: String,
    /// When the active state last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
}

/// The outcome of a package operation (`install`, `upgrade`, `uninstall`, `rollback`), in the
/// operation's `result` (or, for a rolled-back change, next to its error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageResult {
    pub changes: Vec<PackageChange>,
    /// Bytes fetched for packages: deltas plus whole packages.
    pub download_bytes: u64,
    /// Bytes fetched for indices (`apt-get update`, index diffs included).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub index_bytes: u64,
    /// What the same fetches would have cost without deltas and index diffs (packages and
    /// indices together): the saving is `full_bytes - download_bytes - index_bytes`.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub full_bytes: u64,
    /// How each package that had to be fetched came: by delta, or whole (and why not by delta
    /// when one was listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fetches: Vec<PackageFetch>,
    pub duration_ms: u64,
    /// A dry run: what would change; nothing did.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dry_run: bool,
    /// After a unit failed: the version the package went back to (`null` entries mean removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<BTreeMap<String, Option<String>>>,
}

/// One package's fetch in a package operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageFetch {
    pub package: String,
    pub version: String,
    pub method: FetchMethod,
    /// Bytes fetched for it (the delta, or the package).
    pub bytes: u64,
    /// The whole package's size.
    pub full_bytes: u64,
    /// A delta was listed but could not be used: the package came whole, and this says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchMethod {
    Delta,
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fallback {
    pub reason: FallbackReason,
    pub message: String,
}

/// Why a listed delta was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackReason {
    /// The device keeps no copy of the installed version (installed before debfleet managed
    /// it, or the copy was evicted).
    NoBase,
    /// The kept copy of the installed version is not the payload the delta applies to.
    BaseMismatch,
    /// The delta could not be downloaded (after retries and resumes).
    DownloadFailed,
    /// The delta was refused: its hash, its contents or the rebuilt package did not match.
    DeltaInvalid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageChange {
    pub package: String,
    /// Version before (absent: was not installed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// Version after (absent: removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// `hello 1.0 → 2.0`; `-` for no version (not installed before, removed after).
impl std::fmt::Display for PackageChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        write!(f, "{} {} → {}", self.package, v(&self.before), v(&self.after))
    }
}

impl PackageResult {
    /// The changes as people read them: `hello 1.0 → 2.0, libhello - → 3`, or `no change`.
    pub fn changes_text(&self) -> String {
        if self.changes.is_empty() {
            return "no change".into();
        }
        self.changes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
    }
}

/// `device/ID/telemetry` (retained): the latest published value of every enabled metric. It is
/// sent when a metric is due and moved past its threshold; `ts` is that moment, `at` when each
/// value was sampled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub v: u32,
    pub ts: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<f64>,
    /// Used percent per mount point.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub disk: BTreeMap<String, f64>,
    /// When each value was sampled: `cpu`, `memory`, `disk:MOUNT`. The retained message holds the
    /// latest value of every enabled metric, so one metric's sample never hides the others.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub at: BTreeMap<String, String>,
    /// Aggregated samples (`telemetry.window_s` > 0): the values above are means over this many
    /// seconds ending at `ts` (so there is no `at`), and `range` holds each one's `[min, max]`,
    /// keyed like `at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_s: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub range: BTreeMap<String, [f64; 2]>,
}

/// The priority classes of what a device sends, highest first. Over the data budget the lower
/// classes wait in the outbox or are dropped; the top two always go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficClass {
    /// Final operation results and the device's retained facts (status, meta, cfg, state).
    Result,
    /// Acknowledgements: accepted and running records, progress, rejections.
    Ack,
    Logs,
    Telemetry,
    /// The connection itself: connect, keepalive, subscriptions, and `state/link`.
    Control,
}

impl TrafficClass {
    pub const ALL: [TrafficClass; 5] =
        [TrafficClass::Result, TrafficClass::Ack, TrafficClass::Logs, TrafficClass::Telemetry, TrafficClass::Control];

    pub fn as_str(self) -> &'static str {
        match self {
            TrafficClass::Result => "result",
            TrafficClass::Ack => "ack",
            TrafficClass::Logs => "logs",
            TrafficClass::Telemetry => "telemetry",
            TrafficClass::Control => "control",
        }
    }
}

/// Bytes of one class today: sent and received, each counted as the MQTT packet plus an
/// estimated 52 bytes of TCP/IP header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassBytes {
    pub sent: u64,
    pub received: u64,
}

/// `device/ID/state/link` (retained): what the link carried today (UTC), against the budget.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkState {
    pub v: u32,
    pub ts: String,
    /// The UTC day the counters are for (`YYYY-MM-DD`).
    pub day: String,
    pub profile: crate::cfg::Profile,
    /// The MQTT protocol level of the connection (4 is 3.1.1).
    pub mqtt: u8,
    pub keepalive_s: u32,
    /// Whether the broker kept the session at the last connect.
    pub session_present: bool,
    /// `budget.bytes_per_day` (0: none).
    pub budget: u64,
    /// By class (`result`, `ack`, `logs`, `telemetry`, `control`).
    pub classes: BTreeMap<TrafficClass, ClassBytes>,
    /// Telemetry and logs dropped today: over the outbox's bound, or lost with a connection.
    pub dropped: u64,
    /// Connections made today after the first.
    pub reconnects: u64,
    /// Messages waiting in the on-disk outbox, and their bytes.
    pub outbox: u64,
    pub outbox_bytes: u64,
}

/// `device/ID/logs`: a batch of the agent's log lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatch {
    pub v: u32,
    pub ts: String,
    pub lines: Vec<LogLine>,
    /// Lines dropped by the rate limit since the previous batch.
    #[serde(default)]
    pub dropped: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub ts: String,
    pub level: String,
    pub target: String,
    pub msg: String,
}

/// Machine-readable reasons a command failed or was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The payload is not a JSON object.
    MalformedJson,
    /// The payload has no `id` string.
    MissingId,
    /// The `id` does not match the operation id syntax.
    InvalidId,
    /// The verb is not one this agent knows.
    UnknownVerb,
    /// The payload is larger than the topic's limit.
    PayloadTooLarge,
    /// An argument is missing, of the wrong type or out of range.
    InvalidValue,
    /// The agent understood the command but cannot do it here.
    NotSupported,
    /// The agent stopped while the operation ran; it was not finished.
    Interrupted,
    /// Something failed on the device (disk, system call); the message says what.
    Internal,
    /// apt does not know the package.
    PackageNotFound,
    /// The requested version is not in the device's repositories.
    VersionNotFound,
    /// apt cannot resolve the transaction's dependencies.
    DependencyConflict,
    /// Fetching packages or indices failed.
    DownloadFailed,
    /// A repository's signature did not verify.
    SignatureFailure,
    /// The device's disk is full.
    DiskFull,
    /// A package's maintainer script failed.
    MaintainerScriptFailed,
    /// Another package manager held the dpkg lock for too long.
    LockTimeout,
    /// apt failed in a way not listed above; the message has apt's words.
    AptFailed,
    /// A unit of the package failed or crash-looped after the change; the change was undone.
    UnitFailed,
    /// A unit failed after the change and putting the previous versions back failed too: the
    /// device is left between versions (the result says what is installed) and needs an operator.
    UndoFailed,
    /// The device has too much work queued; nothing was done and the id was not recorded, so the
    /// same command can be sent again later.
    Busy,
    /// The command was delivered from the broker's retained store: commands are events, so a
    /// retained one (left by a sender that set the retain flag) is never run.
    RetainedCommand,
    /// The command's `expires_at` had passed when it arrived or before it could start: it was
    /// not run (the operation's state is `expired`).
    Expired,
    /// The component named in a `call` is not installed, not connected to the agent, or its
    /// hardware is missing.
    ComponentUnavailable,
    /// The component has no such action (its meta lists those it has).
    UnknownAction,
    /// The component, or the hardware behind it, did not answer in time; what it did is
    /// unknown (its state tells).
    Timeout,
    /// Desired-state records disagree: two groups name a package differently and the device's
    /// own record does not settle it.
    Conflict,
    /// The packages changed after the device converged (a command, or someone on the device):
    /// it does not undo that by itself; a new revision applies the desired state again.
    Drifted,
    /// A desired-state operation still queued when a newer revision arrived: it never ran.
    Superseded,
    /// The device requires commands signed by an operator key it trusts
    /// (`require_signed_commands`), and this one was unsigned, signed by an unknown or revoked
    /// key, signed for another target, altered, without an expiry, or a replay. Nothing was run
    /// and the id was not recorded.
    Unauthorized,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 30] = [
        ErrorCode::MalformedJson,
        ErrorCode::MissingId,
        ErrorCode::InvalidId,
        ErrorCode::UnknownVerb,
        ErrorCode::PayloadTooLarge,
        ErrorCode::InvalidValue,
        ErrorCode::NotSupported,
        ErrorCode::Interrupted,
        ErrorCode::Internal,
        ErrorCode::PackageNotFound,
        ErrorCode::VersionNotFound,
        ErrorCode::DependencyConflict,
        ErrorCode::DownloadFailed,
        ErrorCode::SignatureFailure,
        ErrorCode::DiskFull,
        ErrorCode::MaintainerScriptFailed,
        ErrorCode::LockTimeout,
        ErrorCode::AptFailed,
        ErrorCode::UnitFailed,
        ErrorCode::UndoFailed,
        ErrorCode::Busy,
        ErrorCode::RetainedCommand,
        ErrorCode::Expired,
        ErrorCode::ComponentUnavailable,
        ErrorCode::UnknownAction,
        ErrorCode::Timeout,
        ErrorCode::Conflict,
        ErrorCode::Drifted,
        ErrorCode::Superseded,
        ErrorCode::Unauthorized,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::MissingId => "missing_id",
            ErrorCode::InvalidId => "invalid_id",
            ErrorCode::UnknownVerb => "unknown_verb",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::InvalidValue => "invalid_value",
            ErrorCode::NotSupported => "not_supported",
            ErrorCode::Interrupted => "interrupted",
            ErrorCode::Internal => "internal",
            ErrorCode::PackageNotFound => "package_not_found",
            ErrorCode::VersionNotFound => "version_not_found",
            ErrorCode::DependencyConflict => "dependency_conflict",
            ErrorCode::DownloadFailed => "download_failed",
            ErrorCode::SignatureFailure => "signature_failure",
            ErrorCode::DiskFull => "disk_full",
            ErrorCode::MaintainerScriptFailed => "maintainer_script_failed",
            ErrorCode::LockTimeout => "lock_timeout",
            ErrorCode::AptFailed => "apt_failed",
            ErrorCode::UnitFailed => "unit_failed",
            ErrorCode::UndoFailed => "undo_failed",
            ErrorCode::Busy => "busy",
            ErrorCode::RetainedCommand => "retained_command",
            ErrorCode::Expired => "expired",
            ErrorCode::ComponentUnavailable => "component_unavailable",
            ErrorCode::UnknownAction => "unknown_action",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Drifted => "drifted",
            ErrorCode::Superseded => "superseded",
            ErrorCode::Unauthorized => "unauthorized",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
}

/// `device/ID/rejected`: a command that could not be tied to an operation id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub v: u32,
    pub ts: String,
    /// The topic the command arrived on.
    pub topic: String,
    pub code: ErrorCode,
    pub message: String,
}

/// Where a running operation is, as `phase` in its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Accepted, waiting for the operation before it to end.
    #[serde(rename = "queued")]
    Queued,
    /// `apt-get update`.
    #[serde(rename = "updating indices")]
    UpdatingIndices,
    /// apt works out the transaction.
    #[serde(rename = "resolving")]
    Resolving,
    #[serde(rename = "downloading")]
    Downloading,
    #[serde(rename = "unpacking")]
    Unpacking,
    #[serde(rename = "configuring")]
    Configuring,
    #[serde(rename = "removing")]
    Removing,
    /// dpkg triggers (man-db, ldconfig, ...).
    #[serde(rename = "triggers")]
    Triggers,
    /// dpkg is at work on something it did not name more precisely.
    #[serde(rename = "installing")]
    Installing,
    /// The transaction runs in a transient unit (the agent's own package).
    #[serde(rename = "installing outside the agent")]
    OutsideTheAgent,
    /// The packages' units are watched after the change.
    #[serde(rename = "verifying units")]
    VerifyingUnits,
    /// A unit failed: the previous versions are being put back.
    #[serde(rename = "rolling back")]
    RollingBack,
    /// Downloaded; the install waits for the desired state's install window to open.
    #[serde(rename = "waiting for the install window")]
    WaitingForWindow,
    /// A phase a newer agent reports that this version does not know.
    #[serde(other, rename = "other")]
    Other,
}

impl Phase {
    pub const ALL: [Phase; 13] = [
        Phase::Queued,
        Phase::UpdatingIndices,
        Phase::Resolving,
        Phase::Downloading,
        Phase::Unpacking,
        Phase::Configuring,
        Phase::Removing,
        Phase::Triggers,
        Phase::Installing,
        Phase::OutsideTheAgent,
        Phase::VerifyingUnits,
        Phase::RollingBack,
        Phase::WaitingForWindow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::UpdatingIndices => "updating indices",
            Phase::Resolving => "resolving",
            Phase::Downloading => "downloading",
            Phase::Unpacking => "unpacking",
            Phase::Configuring => "configuring",
            Phase::Removing => "removing",
            Phase::Triggers => "triggers",
            Phase::Installing => "installing",
            Phase::OutsideTheAgent => "installing outside the agent",
            Phase::VerifyingUnits => "verifying units",
            Phase::RollingBack => "rolling back",
            Phase::WaitingForWindow => "waiting for the install window",
            Phase::Other => "other",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpState {
    Accepted,
    Running,
    Succeeded,
    Failed,
    /// Not run: the command's expiry passed before it could start.
    Expired,
}

impl OpState {
    pub fn is_final(self) -> bool {
        matches!(self, OpState::Succeeded | OpState::Failed | OpState::Expired)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Accepted => "accepted",
            OpState::Running => "running",
            OpState::Succeeded => "succeeded",
            OpState::Failed => "failed",
            OpState::Expired => "expired",
        }
    }
}

/// `device/ID/op/OPID`: one operation's lifecycle, retained until cleared or expired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpRecord {
    pub v: u32,
    pub id: OpId,
    pub verb: String,
    pub state: OpState,
    pub accepted_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// Verb-specific outcome of a succeeded operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<OpError>,
    /// Who asked: the command's `by`, or for a desired-state operation its record's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// How many times the same id arrived again after the first (each got this record back).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeats: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_read_as_people_write_them() {
        let c = |p: &str, b: Option<&str>, a: Option<&str>| PackageChange {
            package: p.into(),
            before: b.map(Into::into),
            after: a.map(Into::into),
        };
        let mut r: PackageResult =
            serde_json::from_value(serde_json::json!({"changes": [], "download_bytes": 0, "duration_ms": 1})).unwrap();
        assert_eq!(r.changes_text(), "no change");
        r.changes =
            vec![c("hello", Some("1.0"), Some("2.0")), c("libhello", None, Some("3")), c("old", Some("1"), None)];
        assert_eq!(r.changes_text(), "hello 1.0 → 2.0, libhello - → 3, old 1 → -");
    }
}
