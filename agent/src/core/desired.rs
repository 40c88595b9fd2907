//! Desired state as the core sees it: the records that apply to this device (its own and its
//! groups'), kept in `state_dir/desired/` (a restart into a kept session gets no retained
//! copies), the operations that bring dpkg there, and the retained `state/desired` report.
//!
//! Every target (the records' revisions and the merged packages) gets a sequence number, kept on
//! disk, and its operations are `desired-N` (install) and `desired-N-rm` (removals): the journal,
//! which remembers ids across restarts, decides what happens. No operation yet → start one;
//! running → converging; failed → blocked until the target changes (never retried in a loop);
//! interrupted (a power cut) → a new attempt; succeeded but dpkg differs again → drifted (not
//! undone behind the operator's back). A target seen before gets a new number, so an old verdict
//! never applies to it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use debfleet_apt::Spec;
use debfleet_protocol::desired::{
    effective, effective_window, Convergence, DesiredRecord, DesiredReport, Source, Target, Window,
};
use debfleet_protocol::{
    time, ErrorCode, GroupName, OpError, OpId, OpState, PackageSpec, Topic, TrafficClass, Verb, CONTRACT_VERSION,
};

use super::{Core, Out};
use crate::jobs::JobKind;

/// Records arriving together are judged together, this long after the last one.
const SETTLE_MS: i64 = 1000;
/// After a connect into a fresh session the broker sends every retained record again; one not
/// sent within this was deleted while the device was away.
const RESYNC_MS: i64 = 5000;
/// Attempts at one target that a stop or power cut interrupted, before it counts as blocked.
const MAX_ATTEMPTS: u8 = 3;
/// A refused record's reason is cut to this (it may quote what it refused).
const MAX_REASON_CHARS: usize = 200;

/// The target being judged, kept in `dir/target`: its fingerprint, its sequence number, whether
/// dpkg has been seen to match it, and the attempts interrupted so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Judged {
    key: u64,
    seq: u64,
    converged: bool,
    attempts: u8,
}

#[derive(Default)]
pub(super) struct Desired {
    dir: PathBuf,
    records: BTreeMap<Source, DesiredRecord>,
    /// Records that did not parse, with why; the last good one from that source still applies.
    invalid: BTreeMap<Source, String>,
    /// The last report published; `None` when there is none (see `clear_stale`).
    reported: Option<DesiredReport>,
    /// A report from an earlier run may be on the broker: clear it if there is nothing to say.
    clear_stale: bool,
    /// When to judge again (records arrived, a connect, an operation ended).
    due_ms: Option<i64>,
    /// After a connect into a fresh session: the sources heard from since, and until when to
    /// wait for the rest before forgetting them.
    resync: Option<(i64, BTreeSet<Source>)>,
    target: Judged,
    /// Operations this run started (only these are ever superseded).
    started: Vec<OpId>,
    /// The running operation asked to stop before it installs (asked once).
    cancelling: Option<OpId>,
    /// The operation downloading ahead of its install window (a fetch-only job).
    fetching: Option<OpId>,
    /// The operation that downloaded and waits for its window (no job runs for it meanwhile).
    waiting: Option<OpId>,
}

/// Why a device that requires signed commands refuses desired-state records.
const UNSIGNED: &str = "unauthorized: this device runs only signed commands (require_signed_commands) and \
                        desired-state records carry no signature";

impl Desired {
    pub(super) fn load(state_dir: &Path, groups: &[GroupName], signed_only: bool) -> Desired {
        let dir = state_dir.join("desired");
        let mut d = Desired { dir, ..Desired::default() };
        for entry in std::fs::read_dir(&d.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let source = match name.strip_suffix(".json") {
                Some("device") => Source::Device,
                Some(stem) => match stem.strip_prefix("group-").and_then(|g| GroupName::new(g).ok()) {
                    Some(g) => Source::Group(g),
                    None => continue,
                },
                None => continue,
            };
            match std::fs::read(entry.path()).map_err(|e| e.to_string()).and_then(|b| DesiredRecord::parse(&b)) {
                Ok(r) => {
                    d.records.insert(source, r);
                }
                Err(e) => tracing::warn!("ignoring {}: {e}", entry.path().display()),
            }
        }
        // The groups may have changed in agent.toml while the agent was stopped.
        let left: Vec<Source> =
            d.records.keys().filter(|s| matches!(s, Source::Group(g) if !groups.contains(g))).cloned().collect();
        for s in &left {
            d.forget(s);
        }
        let target = std::fs::read_to_string(d.dir.join("target")).unwrap_or_default();
        let w: Vec<u64> = target.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        if let [key, seq, converged, attempts] = w[..] {
            d.target = Judged { key, seq, converged: converged == 1, attempts: attempts.min(255) as u8 };
        }
        d.clear_stale = d.dir.join("reported").exists();
        // Records kept from before signed commands were required do not apply either.
        if signed_only {
            for (s, _) in std::mem::take(&mut d.records) {
                d.invalid.insert(s, UNSIGNED.to_owned());
            }
        }
        d
    }

    fn file(&self, s: &Source) -> PathBuf {
        match s {
            Source::Device => self.dir.join("device.json"),
            Source::Group(g) => self.dir.join(format!("group-{g}.json")),
        }
    }

    fn forget(&mut self, s: &Source) {
        self.invalid.remove(s);
        if self.records.remove(s).is_some() {
            if let Err(e) = std::fs::remove_file(self.file(s)) {
                tracing::warn!("cannot remove {}: {e}", self.file(s).display());
            }
        }
    }

    fn save(&self, name: &str, bytes: &[u8]) {
        let saved = std::fs::create_dir_all(&self.dir)
            .and_then(|()| crate::fsutil::write_atomic(&self.dir.join(name), bytes, true));
        if let Err(e) = saved {
            tracing::error!("cannot keep the desired state in {}: {e}", self.dir.display());
        }
    }

    fn set_target(&mut self, t: Judged) {
        if t != self.target {
            self.target = t;
            let line = format!("{} {} {} {}\n", t.key, t.seq, u8::from(t.converged), t.attempts);
            self.save("target", line.as_bytes());
        }
    }

    /// The sequence number of the target with this fingerprint: a new one when it differs
    /// from the one judged last.
    fn sequence(&mut self, key: u64) -> u64 {
        let t = self.target;
        if t.key != key || t.seq == 0 {
            self.set_target(Judged { key, seq: t.seq + 1, converged: false, attempts: 0 });
        }
        self.target.seq
    }

    /// Another attempt at the same target, under a new number.
    fn again(&mut self) -> u64 {
        let t = self.target;
        self.set_target(Judged { seq: t.seq + 1, converged: false, attempts: t.attempts.saturating_add(1), ..t });
        t.seq + 1
    }

    /// No target (no record, or a conflict): whatever comes next gets a new number, so no
    /// verdict of an earlier target applies to it.
    fn no_target(&mut self) {
        let t = self.target;
        self.set_target(Judged { key: 0, ..t });
    }

    /// Who set the records that ask for these packages (a device's own record decides what it
    /// names): the operation's `by`.
    fn asked_by(&self, packages: &[String]) -> Option<String> {
        let device = self.records.get(&Source::Device);
        let mut names: Vec<&str> = Vec::new();
        for p in packages {
            let decided = match device.filter(|d| d.packages.contains_key(p)) {
                Some(d) => Some(d),
                None => self
                    .records
                    .iter()
                    .find(|(s, r)| **s != Source::Device && r.packages.contains_key(p))
                    .map(|(_, r)| r),
            };
            if let Some(by) = decided.and_then(|r| r.by.as_deref()) {
                if !names.contains(&by) {
                    names.push(by);
                }
            }
        }
        let mut joined = names.join(", ");
        if let Some((cut, _)) = joined.char_indices().nth(64) {
            joined.truncate(cut);
        }
        (!joined.is_empty()).then_some(joined)
    }

    fn judging_soon(&self) -> bool {
        self.due_ms.is_some() || self.resync.is_some()
    }
}

/// A stable name for a target (FNV-1a; the same on every run and build, unlike `Hash`).
fn fingerprint(revisions: &BTreeMap<String, u64>, targets: &BTreeMap<String, Target>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |s: &str| {
        for b in s.bytes().chain([0]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (s, r) in revisions {
        eat(s);
        eat(&r.to_string());
    }
    for (n, t) in targets {
        eat(n);
        eat(&t.to_string());
    }
    h
}

impl Core {
    /// A record arrived on `desired/device/ID` or `desired/group/G` (retained or live: records
    /// are state, not commands). An empty one removes the record; a bad one is reported and
    /// changes nothing.
    pub(super) fn on_desired(&mut self, source: Source, payload: &[u8], now_ms: i64) -> Vec<Out> {
        if let Some((_, heard)) = &mut self.desired.resync {
            heard.insert(source.clone());
        }
        // A record delivered late after a resync forgot it is simply taken again.
        self.desired.due_ms = Some(now_ms + SETTLE_MS);
        if payload.is_empty() {
            self.desired.forget(&source);
            return Vec::new();
        }
        if self.trust.is_some() {
            tracing::warn!("desired state from {source} refused: {UNSIGNED}");
            self.desired.invalid.insert(source, UNSIGNED.to_owned());
            return Vec::new();
        }
        match DesiredRecord::parse(payload) {
            Ok(r) => {
                self.desired.invalid.remove(&source);
                if self.desired.records.get(&source) != Some(&r) {
                    let name = self.desired.file(&source);
                    let name = name.file_name().and_then(|n| n.to_str()).unwrap_or("device.json").to_owned();
                    self.desired.save(&name, payload);
                    tracing::info!("desired state from {source}: revision {}", r.revision);
                    self.desired.records.insert(source, r);
                }
            }
            Err(mut e) => {
                if let Some((cut, _)) = e.char_indices().nth(MAX_REASON_CHARS) {
                    e.truncate(cut);
                    e.push('…');
                }
                tracing::warn!("desired state from {source} refused: {e}");
                self.desired.invalid.insert(source, e);
            }
        }
        Vec::new()
    }

    /// The groups changed: records of groups the device left no longer apply.
    pub(super) fn desired_groups_changed(&mut self, now_ms: i64) {
        let groups = &self.runtime.groups;
        let gone: Vec<Source> = self
            .desired
            .records
            .keys()
            .chain(self.desired.invalid.keys())
            .filter(|s| matches!(s, Source::Group(g) if !groups.contains(g)))
            .cloned()
            .collect();
        for s in &gone {
            self.desired.forget(s);
        }
        if !gone.is_empty() {
            self.desired.due_ms = Some(now_ms);
        }
    }

    /// A connection is up. Into a fresh session every retained record comes again: those that
    /// do not were deleted meanwhile. Into a kept one, deletions come as messages.
    pub(super) fn desired_connected(&mut self, now_ms: i64) {
        let anything = !self.desired.records.is_empty() || self.desired.reported.is_some() || self.desired.clear_stale;
        match (&mut self.desired.resync, self.link.session_present()) {
            (_, false) => self.desired.resync = Some((now_ms + RESYNC_MS, BTreeSet::new())),
            // The fresh session's records were still coming when the link broke: keep waiting.
            (Some((until, _)), true) => *until = now_ms + RESYNC_MS,
            (None, true) if anything => self.desired.due_ms = Some(now_ms + SETTLE_MS),
            (None, true) => {}
        }
    }

    /// Called every second: judges when something asked for it (and the records a connect
    /// brings are in).
    pub(super) fn desired_tick(&mut self, now_ms: i64) -> Vec<Out> {
        if self.connected_since.is_none() {
            return Vec::new();
        }
        if let Some((until, _)) = &self.desired.resync {
            if now_ms < *until {
                return Vec::new();
            }
            let heard = self.desired.resync.take().map(|(_, h)| h).unwrap_or_default();
            let kept = self.desired.records.keys().chain(self.desired.invalid.keys());
            let gone: Vec<Source> = kept.filter(|s| !heard.contains(*s)).cloned().collect();
            for s in &gone {
                tracing::info!("the desired state from {s} was deleted while the device was away");
                self.desired.forget(s);
            }
            self.desired.due_ms = Some(now_ms);
        }
        // The last report waits for a window that is open now: judged again (which reports
        // something else, so this happens once).
        let waits_for = self.desired.reported.as_ref().and_then(|r| match r.convergence {
            Convergence::Scheduled { window, .. } => Some(window),
            _ => None,
        });
        if waits_for.is_some_and(|w| w.contains(self.local_minute(now_ms))) {
            self.desired.due_ms = Some(now_ms);
        }
        match self.desired.due_ms {
            Some(t) if now_ms >= t => {
                self.desired.due_ms = None;
                self.converge(now_ms)
            }
            _ => Vec::new(),
        }
    }

    /// After an operation: where the desired state stands now (unless records are still
    /// arriving; the tick judges then).
    pub(super) fn desired_after_job(&mut self, now_ms: i64) -> Vec<Out> {
        let idle =
            self.desired.records.is_empty() && self.desired.reported.is_none() && self.desired.started.is_empty();
        if idle || self.desired.judging_soon() {
            return Vec::new();
        }
        self.converge(now_ms)
    }

    /// Minutes after local midnight now.
    fn local_minute(&self, now_ms: i64) -> u16 {
        crate::localtime::minute_of_day(now_ms, self.local_offset)
    }

    /// A fetch-only job ended. Downloaded: the operation stays running, waiting for its window
    /// (`Some`: what to publish). Failed: `None`, and it ends like any other operation.
    pub(super) fn desired_fetched(&mut self, done: &crate::jobs::JobDone, now_ms: i64) -> Option<Vec<Out>> {
        if self.desired.fetching.as_ref() != Some(&done.id) {
            return None;
        }
        self.desired.fetching = None;
        if done.outcome.is_err() {
            return None;
        }
        if let Err(e) = self.journal.progress(&done.id, now_ms, debfleet_protocol::Phase::WaitingForWindow, None) {
            tracing::error!("{e}");
        }
        self.desired.waiting = Some(done.id.clone());
        let mut out = vec![self.publish_op(&done.id)];
        if !self.desired.judging_soon() {
            out.extend(self.converge(now_ms));
        }
        out.extend(self.next_job());
        Some(out)
    }

    /// The retained report, for a connect or `refresh`.
    pub(super) fn desired_fact(&self) -> Option<Out> {
        let r = self.desired.reported.as_ref()?;
        Some(self.publish(Topic::StateDesired(self.cfg.device_id.clone()), r))
    }

    /// Compares dpkg with the records, starts the operation that closes the gap, and publishes
    /// the report when it changed.
    pub(super) fn converge(&mut self, now_ms: i64) -> Vec<Out> {
        let mut out = Vec::new();
        let topic = Topic::StateDesired(self.cfg.device_id.clone());
        if self.desired.records.is_empty() && self.desired.invalid.is_empty() {
            self.supersede(&[], now_ms, &mut out);
            self.desired.no_target();
            if self.desired.reported.take().is_some() || std::mem::take(&mut self.desired.clear_stale) {
                out.push(Out::Publish {
                    topic: self.topic(topic),
                    payload: Vec::new(),
                    retain: true,
                    reliable: true,
                    class: TrafficClass::Result,
                });
                let _ = std::fs::remove_file(self.desired.dir.join("reported"));
            }
            return out;
        }
        let records = &self.desired.records;
        let revisions: BTreeMap<String, u64> = records.iter().map(|(s, r)| (s.to_string(), r.revision)).collect();
        let groups = self.runtime.groups.iter().filter_map(|g| records.get(&Source::Group(g.clone())).map(|r| (g, r)));
        let device = records.get(&Source::Device);
        let targets = effective(groups.clone(), device).map_err(|c| c.to_string());
        let window = effective_window(groups, device);
        let (convergence, packages) = match targets.and_then(|t| Ok((t, window?))) {
            Ok((targets, window)) => (self.close_gap(&revisions, &targets, window, now_ms, &mut out), targets),
            Err(message) => {
                self.supersede(&[], now_ms, &mut out);
                self.desired.no_target();
                let error = OpError { code: ErrorCode::Conflict, message };
                (Convergence::Blocked { op: None, error }, BTreeMap::new())
            }
        };
        let refused = self.desired.invalid.iter().map(|(s, why)| (s.to_string(), why.clone())).collect();
        let report = DesiredReport {
            v: CONTRACT_VERSION,
            ts: time::format_unix_ms(now_ms),
            convergence,
            revisions,
            packages,
            refused,
        };
        let same = self.desired.reported.as_ref().is_some_and(|r| {
            (&r.convergence, &r.revisions, &r.packages, &r.refused)
                == (&report.convergence, &report.revisions, &report.packages, &report.refused)
        });
        if !same {
            if self.desired.reported.is_none() {
                self.desired.save("reported", b"");
            }
            out.push(self.publish(topic, &report));
            self.desired.reported = Some(report);
            self.desired.clear_stale = false;
        }
        out
    }

    /// What dpkg lacks for `targets`, and the operation for it: first what to install (exact
    /// versions, downgrades included, and newest ones), then what to remove.
    fn close_gap(
        &mut self,
        revisions: &BTreeMap<String, u64>,
        targets: &BTreeMap<String, Target>,
        window: Option<Window>,
        now_ms: i64,
        out: &mut Vec<Out>,
    ) -> Convergence {
        let names: Vec<String> = targets.keys().cloned().collect();
        let installed = self.dpkg.packages_state(&names);
        let version = |n: &str| installed.get(n).and_then(|s| s.version.clone());
        let key = fingerprint(revisions, targets);
        let seq = self.desired.sequence(key);
        let ids = |seq: u64| {
            let id = |s: String| OpId::new(s).expect("a valid operation id");
            let p = debfleet_protocol::desired::OP_PREFIX;
            (id(format!("{p}{seq}")), id(format!("{p}{seq}-rm")))
        };
        let (mut install_id, mut remove_id) = ids(seq);
        // An attempt a stop or a power cut interrupted (or that never ran) is tried again under
        // a new number, a few times.
        let cut_short = |c: &Core, id: &OpId| {
            c.journal
                .get(id)
                .and_then(|e| e.record.error.as_ref())
                .is_some_and(|e| matches!(e.code, ErrorCode::Interrupted | ErrorCode::Superseded))
        };
        if (cut_short(self, &install_id) || cut_short(self, &remove_id)) && self.desired.target.attempts < MAX_ATTEMPTS
        {
            (install_id, remove_id) = ids(self.desired.again());
        }
        // A newest-version target is met by this target's install having run (and the package
        // being there): "latest" is judged once per target.
        let installed_once = self.journal.get(&install_id).is_some_and(|e| e.record.state == OpState::Succeeded);
        let install: Vec<Spec> = targets
            .iter()
            .filter_map(|(n, t)| match t {
                Target::Version(v) if version(n).as_deref() != Some(v.as_str()) => {
                    Some(Spec { name: n.clone(), version: Some(v.clone()), release: None })
                }
                Target::Latest(suite) if version(n).is_none() || !installed_once => {
                    Some(Spec { name: n.clone(), version: None, release: suite.clone() })
                }
                _ => None,
            })
            .collect();
        let remove: Vec<PackageSpec> = targets
            .iter()
            .filter(|(n, t)| **t == Target::Absent && version(n).is_some())
            .map(|(n, _)| PackageSpec { name: n.clone(), version: None })
            .collect();
        self.supersede(&[&install_id, &remove_id], now_ms, out);
        let differing: Vec<String> =
            install.iter().map(|s| s.name.clone()).chain(remove.iter().map(|s| s.name.clone())).collect();
        // Outside its window a change waits: an install downloads ahead (a fetch-only job, then
        // the same operation again once the window opens), a removal just waits.
        let minute = self.local_minute(now_ms);
        let closed = window.filter(|w| !w.contains(minute));
        let scheduled = |op: Option<OpId>, w: Window| {
            let into_minute = now_ms.div_euclid(1000) + (self.local_offset)(now_ms.div_euclid(1000));
            let minute_start = now_ms - now_ms.rem_euclid(1000) - into_minute.rem_euclid(60) * 1000;
            let opens_ms = minute_start + i64::from(w.opens_in(minute)) * 60_000;
            Convergence::Scheduled { op, window: w, opens_at: time::format_unix_ms(opens_ms) }
        };
        let (id, verb, kind) = if !install.is_empty() {
            let refresh = install.iter().any(|s| s.version.is_none());
            let fetch_only = closed.is_some();
            (install_id, Verb::Install, JobKind::Converge { packages: install, refresh, fetch_only })
        } else if let (false, Some(w)) = (remove.is_empty(), closed) {
            return scheduled(None, w);
        } else if !remove.is_empty() {
            (remove_id, Verb::Uninstall, JobKind::Uninstall { packages: remove, purge: false })
        } else {
            let t = self.desired.target;
            self.desired.set_target(Judged { converged: true, ..t });
            return Convergence::Converged;
        };
        let recorded = self.journal.get(&id).map(|e| (e.record.state, e.record.error.clone()));
        match recorded {
            // dpkg matched this target before, without an operation of ours: something else
            // changed it since.
            None if self.desired.target.converged => {
                let message = format!(
                    "{} changed after the device had converged; a new revision applies the desired state again",
                    differing.join(", ")
                );
                Convergence::Blocked { op: None, error: OpError { code: ErrorCode::Drifted, message } }
            }
            None => {
                self.desired.started.push(id.clone());
                if matches!(kind, JobKind::Converge { fetch_only: true, .. }) {
                    self.desired.fetching = Some(id.clone());
                }
                let by = self.desired.asked_by(&differing);
                out.extend(self.start_internal(id.clone(), verb, by.as_deref(), kind, now_ms));
                Convergence::Converging { op: id }
            }
            // Downloaded; the window is still closed.
            Some((state, _)) if !state.is_final() && self.desired.waiting.as_ref() == Some(&id) => match (closed, kind)
            {
                (Some(w), _) => scheduled(Some(id), w),
                (None, JobKind::Converge { packages, .. }) => {
                    self.desired.waiting = None;
                    tracing::info!(op = %id, "the install window is open: installing");
                    let origin = super::commands::Origin { id: id.clone(), expires_at: None };
                    // The indices were refreshed for the download; the same versions install.
                    let kind = JobKind::Converge { packages, refresh: false, fetch_only: false };
                    let started = self.start_job(Vec::new(), origin, kind, Default::default());
                    out.extend(started);
                    Convergence::Converging { op: id }
                }
                (None, _) => Convergence::Converging { op: id },
            },
            Some((state, _)) if !state.is_final() => Convergence::Converging { op: id },
            Some((OpState::Succeeded, _)) => {
                let message = format!(
                    "{} changed after operation {id} converged; a new revision applies the desired state again",
                    differing.join(", ")
                );
                Convergence::Blocked { op: Some(id), error: OpError { code: ErrorCode::Drifted, message } }
            }
            Some((_, error)) => {
                let error = error.unwrap_or(OpError { code: ErrorCode::Internal, message: "it failed".into() });
                Convergence::Blocked { op: Some(id), error }
            }
        }
    }

    /// Operations this run started for an older target and that still wait in the queue never
    /// run: they end as `superseded`. One already running is asked to stop before it installs
    /// (it downloads first): it then ends as `superseded` too; past its download it finishes.
    /// Either way the next judgement follows it.
    fn supersede(&mut self, keep: &[&OpId], now_ms: i64, out: &mut Vec<Out>) {
        if let Some(waiting) = self.desired.waiting.take() {
            if keep.contains(&&waiting) {
                self.desired.waiting = Some(waiting);
            } else {
                let message = "a newer desired state arrived before the install window opened; nothing was installed";
                tracing::info!(op = %waiting, "superseded: {message}");
                let error = OpError { code: ErrorCode::Superseded, message: message.into() };
                if let Err(e) = self.journal.finish(&waiting, now_ms, Err(error)) {
                    tracing::error!("{e}");
                }
                out.push(self.publish_op(&waiting));
            }
        }
        if let Some(running) = self.running.clone() {
            let stale = self.desired.started.contains(&running) && !keep.contains(&&running);
            if stale && self.desired.cancelling.as_ref() != Some(&running) {
                tracing::info!(op = %running, "a newer desired state arrived: stopping it before it installs");
                out.push(Out::Cancel(running.clone()));
                self.desired.cancelling = Some(running);
            }
        }
        let started = std::mem::take(&mut self.desired.started);
        let (stale, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.jobs).into_iter().partition(|j| started.contains(&j.id) && !keep.contains(&&j.id));
        self.jobs = rest.into();
        // Only what may still be queued or running is worth remembering.
        let running = self.running.clone();
        self.desired.started =
            started.into_iter().filter(|id| keep.contains(&id) || running.as_ref() == Some(id)).collect();
        for job in stale {
            let message = "a newer desired state arrived before it started".to_owned();
            tracing::info!(op = %job.id, "superseded: {message}");
            if let Err(e) = self.journal.finish(&job.id, now_ms, Err(OpError { code: ErrorCode::Superseded, message }))
            {
                tracing::error!("{e}");
            }
            out.push(self.publish_op(&job.id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;
    use super::Desired;
    use crate::jobs::JobKind;
    use debfleet_protocol::desired::Source;
    use debfleet_protocol::{GroupName, OpError, OpState};

    fn record(rev: u64, packages: &str) -> Vec<u8> {
        format!(r#"{{"v":1,"revision":{rev},"packages":{packages},"ts":"2026-12-03T08:00:00.000Z"}}"#).into_bytes()
    }

    fn report(outs: &[Out]) -> Option<serde_json::Value> {
        publishes(outs).into_iter().rev().find(|(t, _, _)| t.ends_with("/state/desired")).map(|(_, v, _)| v)
    }

    /// Connected into a kept session (no resync of the retained records).
    fn connected(f: &mut Fixture) {
        f.core.on_connected("2026-12-03T08:00:00.000Z".into(), 0);
        f.core.desired.resync = None;
    }

    #[test]
    fn a_record_becomes_one_operation_and_its_result_the_report() {
        let mut f = fixture(false);
        connected(&mut f);
        let by =
            br#"{"v":1,"revision":1,"packages":{"hello":"2.0"},"by":"rollout/r1","ts":"2026-12-03T08:00:00.000Z"}"#;
        assert!(f.core.on_message("debfleet/desired/group/lab", by, true, 10).is_empty());
        // Judged a second later, together with whatever else arrived.
        assert!(f.core.desired_tick(500).is_empty());
        let outs = f.core.desired_tick(1100);
        let job = outs.iter().find_map(|o| if let Out::Job(j) = o { Some(j.clone()) } else { None }).unwrap();
        // The operation says who asked for it.
        assert_eq!(op_states(&outs, job.id.as_str()).pop().unwrap().by.as_deref(), Some("rollout/r1"));
        assert!(
            matches!(&job.kind, JobKind::Converge { packages, refresh: false, fetch_only: false } if packages[0].version.as_deref() == Some("2.0"))
        );
        let r = report(&outs).unwrap();
        assert_eq!((r["state"].as_str(), r["op"].as_str()), (Some("converging"), Some(job.id.as_str())));
        assert_eq!(r["revisions"]["group/lab"], 1);
        // The same record again (a reconnect's retained copy) changes nothing.
        assert!(f.core.on_message("debfleet/desired/group/lab", by, true, 2000).is_empty());
        // It fails: blocked with the operation's error, and not retried.
        let done = crate::jobs::JobDone {
            id: job.id.clone(),
            outcome: Err(crate::jobs::Failure {
                error: OpError { code: ErrorCode::UnitFailed, message: "hello.service failed".into() },
                result: None,
            }),
            changes: vec![],
            rolled_back: vec![],
        };
        let mut outs = f.core.handle(Event::JobDone(done), 3000);
        outs.extend(f.core.desired_tick(3000));
        let r = report(&outs).unwrap();
        assert_eq!((r["state"].as_str(), r["error"]["code"].as_str()), (Some("blocked"), Some("unit_failed")));
        f.core.desired.due_ms = Some(0);
        assert!(!f.core.desired_tick(4000).iter().any(|o| matches!(o, Out::Job(_))));
        // A new revision is a new target: it runs again.
        f.core.on_message("debfleet/desired/group/lab", &record(2, r#"{"hello":"2.0"}"#), false, 5000);
        assert!(f.core.desired_tick(6100).iter().any(|o| matches!(o, Out::Job(_))));
    }

    #[test]
    fn other_devices_groups_and_bad_records_change_nothing() {
        let mut f = fixture(false);
        connected(&mut f);
        f.core.on_message("debfleet/desired/device/d1", &record(1, r#"{"hello":"absent"}"#), true, 0);
        assert!(report(&f.core.desired_tick(1000)).is_some_and(|r| r["state"] == "converged"));
        for (topic, payload) in [
            ("debfleet/desired/device/d2", record(1, r#"{"hello":"9.0"}"#)),
            ("debfleet/desired/group/other", record(1, r#"{"hello":"9.0"}"#)),
        ] {
            f.core.on_message(topic, &payload, false, 2000);
            assert!(f.core.desired_tick(4000).is_empty(), "{topic}");
        }
        for (bad, why) in [
            (b"{nope".to_vec(), "key must be a string"),
            (record(0, r#"{"hello":"1.0"}"#), "revision must be 1 or more"),
            (record(3, r#"{"hello":"1.0; reboot"}"#), "neither a Debian version"),
            (record(3, r#"{"../etc":"1.0"}"#), "not a Debian package name"),
            (vec![b'x'; 64 * 1024], "the limit is"),
        ] {
            f.core.on_message("debfleet/desired/device/d1", &bad, false, 5000);
            let outs = f.core.desired_tick(7000);
            assert!(!outs.iter().any(|o| matches!(o, Out::Job(_))));
            let r = report(&outs).unwrap();
            assert_eq!(r["state"], "converged", "the good record still applies: {r}");
            assert!(r["refused"]["device"].as_str().unwrap().contains(why), "{r}");
            assert_eq!(f.core.desired.records[&Source::Device].revision, 1);
        }
        // Removing the record removes the report, not packages.
        f.core.on_message("debfleet/desired/device/d1", b"", false, 8000);
        let outs = f.core.desired_tick(9100);
        assert!(!outs.iter().any(|o| matches!(o, Out::Job(_))));
        assert!(publishes(&outs).iter().any(|(t, v, _)| t.ends_with("/state/desired") && v.is_null()));
    }

    #[test]
    fn records_deleted_while_away_are_forgotten_after_a_fresh_connect() {
        let mut f = fixture(false);
        connected(&mut f);
        f.core.on_message("debfleet/desired/group/lab", &record(1, r#"{"hello":"absent"}"#), true, 0);
        f.core.on_message("debfleet/desired/device/d1", &record(1, r#"{"bash":"absent"}"#), true, 0);
        f.core.desired_tick(1000);
        f.core.on_disconnected();
        // A fresh session: only the group's record comes back; the device's was deleted.
        f.core.on_connected("2026-12-03T09:00:00.000Z".into(), 10_000);
        f.core.on_message("debfleet/desired/group/lab", &record(1, r#"{"hello":"absent"}"#), true, 10_100);
        assert!(f.core.desired_tick(12_000).is_empty(), "judged before the retained records were in");
        let outs = f.core.desired_tick(15_000);
        assert!(!outs.iter().any(|o| matches!(o, Out::Job(_))), "bash is not removed by a deleted record");
        let r = report(&outs).unwrap();
        assert_eq!(r["revisions"], serde_json::json!({"group/lab": 1}));
        assert!(!f.core.desired.dir.join("device.json").exists());
        // What is on disk is what a restart starts from.
        let again = Desired::load(&f.core.cfg.state_dir, &f.core.runtime.groups, false);
        assert_eq!(again.records.keys().collect::<Vec<_>>(), [&Source::Group(GroupName::new("lab").unwrap())]);
        assert_eq!(again.target, f.core.desired.target);
    }

    #[test]
    fn groups_that_disagree_are_a_conflict_and_a_newer_target_supersedes_a_queued_one() {
        let mut f = fixture(false);
        connected(&mut f);
        f.core.on_message("debfleet/device/d1/cmd/cfg", br#"{"id":"c1","set":{"groups":["lab","kiosk"]}}"#, false, 0);
        f.core.on_message("debfleet/desired/group/lab", &record(1, r#"{"hello":"1.0"}"#), false, 0);
        f.core.on_message("debfleet/desired/group/kiosk", &record(1, r#"{"hello":"2.0"}"#), false, 0);
        let r = report(&f.core.desired_tick(1000)).unwrap();
        assert_eq!(r["error"]["code"], "conflict");
        // The device's own entry settles it. A command runs meanwhile, so the job queues.
        f.core.on_message("debfleet/device/d1/cmd/install", br#"{"id":"i1","packages":["other"]}"#, false, 1000);
        f.core.on_message("debfleet/desired/device/d1", &record(1, r#"{"hello":"3.0"}"#), false, 1000);
        let outs = f.core.desired_tick(2000);
        let first = report(&outs).unwrap()["op"].as_str().unwrap().to_owned();
        assert!(op_states(&outs, &first).last().is_some_and(|r| r.phase == Some(debfleet_protocol::Phase::Queued)));
        f.core.on_message("debfleet/desired/device/d1", &record(2, r#"{"hello":"3.1"}"#), false, 2500);
        let outs = f.core.desired_tick(4000);
        let gone = op_states(&outs, &first).pop().unwrap();
        assert_eq!((gone.state, gone.error.unwrap().code), (OpState::Failed, ErrorCode::Superseded));
        assert_ne!(report(&outs).unwrap()["op"].as_str(), Some(first.as_str()));
    }

    fn job(outs: &[Out]) -> Option<crate::jobs::Job> {
        outs.iter().find_map(|o| if let Out::Job(j) = o { Some(j.clone()) } else { None })
    }

    #[test]
    fn outside_its_window_a_device_downloads_ahead_and_installs_when_it_opens() {
        let mut f = fixture(false);
        f.core.local_offset = |_| 3600; // UTC+1: 01:00 UTC is 02:00 here.
        connected(&mut f);
        let hour = 3_600_000;
        let windowed = br#"{"v":1,"revision":1,"packages":{"hello":"2.0"},"window":"03:00-04:00","ts":"2026-12-03T08:00:00.000Z"}"#;
        f.core.on_message("debfleet/desired/group/lab", windowed, false, hour);
        let outs = f.core.desired_tick(hour + 1000);
        let fetch = job(&outs).unwrap();
        assert!(matches!(fetch.kind, JobKind::Converge { fetch_only: true, .. }), "{:?}", fetch.kind);
        // Downloaded: the operation stays running, waiting; the report says until when.
        let done = crate::jobs::JobDone {
            id: fetch.id.clone(),
            outcome: Ok(serde_json::json!({"download_bytes": 2048})),
            changes: vec![],
            rolled_back: vec![],
        };
        let outs = f.core.handle(Event::JobDone(done), hour + 5000);
        let rec = op_states(&outs, fetch.id.as_str()).pop().unwrap();
        assert_eq!((rec.state, rec.phase), (OpState::Running, Some(debfleet_protocol::Phase::WaitingForWindow)));
        let r = report(&outs).unwrap();
        assert_eq!(
            (r["state"].as_str(), r["op"].as_str(), r["window"].as_str(), r["opens_at"].as_str()),
            (Some("scheduled"), Some(fetch.id.as_str()), Some("03:00-04:00"), Some("1970-01-01T02:00:00.000Z"))
        );
        assert!(job(&f.core.desired_tick(2 * hour - 1000)).is_none(), "not before the window");
        // The window opens (03:00 local): the same operation installs.
        let outs = f.core.desired_tick(2 * hour);
        let install = job(&outs).unwrap();
        assert_eq!(install.id, fetch.id);
        assert!(matches!(install.kind, JobKind::Converge { fetch_only: false, .. }));
        assert_eq!(report(&outs).unwrap()["state"], "converging");
    }

    #[test]
    fn a_newer_target_ends_a_waiting_operation_and_a_removal_waits_without_one() {
        let mut f = fixture(false);
        f.core.local_offset = |_| 0;
        connected(&mut f);
        let w = |rev: u64, p: &str| {
            format!(
                r#"{{"v":1,"revision":{rev},"packages":{p},"window":"02:00-04:00","ts":"2026-12-03T08:00:00.000Z"}}"#
            )
        };
        f.core.on_message("debfleet/desired/device/d1", w(1, r#"{"hello":"2.0"}"#).as_bytes(), false, 0);
        let fetch = job(&f.core.desired_tick(1000)).unwrap();
        let done = crate::jobs::JobDone {
            id: fetch.id.clone(),
            outcome: Ok(Value::Null),
            changes: vec![],
            rolled_back: vec![],
        };
        f.core.handle(Event::JobDone(done), 2000);
        // Aborted while it waits: it ends superseded, nothing installed; bash's removal waits
        // for the window with no operation.
        f.core.on_message("debfleet/desired/device/d1", w(2, r#"{"bash":"absent"}"#).as_bytes(), false, 3000);
        let outs = f.core.desired_tick(5000);
        let gone = op_states(&outs, fetch.id.as_str()).pop().unwrap();
        assert_eq!((gone.state, gone.error.unwrap().code), (OpState::Failed, ErrorCode::Superseded));
        assert!(job(&outs).is_none());
        let r = report(&outs).unwrap();
        assert_eq!((r["state"].as_str(), r.get("op")), (Some("scheduled"), None));
        // At 02:00 it removes.
        let outs = f.core.desired_tick(7_200_000);
        assert!(matches!(job(&outs).unwrap().kind, JobKind::Uninstall { .. }));
    }

    #[test]
    fn a_newer_target_stops_the_running_operation_before_it_installs() {
        let mut f = fixture(false);
        connected(&mut f);
        f.core.on_message("debfleet/desired/group/lab", &record(1, r#"{"hello":"2.0"}"#), false, 0);
        let outs = f.core.desired_tick(1000);
        let job = outs.iter().find_map(|o| if let Out::Job(j) = o { Some(j.clone()) } else { None }).unwrap();
        // A rollout is aborted: the record goes back while the operation downloads.
        f.core.on_message("debfleet/desired/group/lab", &record(2, r#"{"hello":"1.0"}"#), false, 1500);
        let outs = f.core.desired_tick(2600);
        assert!(outs.contains(&Out::Cancel(job.id.clone())), "{outs:?}");
        assert!(!outs.iter().any(|o| matches!(o, Out::Job(_))), "one job at a time");
        // Asked once.
        f.core.desired.due_ms = Some(0);
        assert!(!f.core.desired_tick(3000).contains(&Out::Cancel(job.id.clone())));
        // It stops with nothing installed; the newer target runs next.
        let done = crate::jobs::JobDone {
            id: job.id.clone(),
            outcome: Err(crate::jobs::Failure {
                error: OpError { code: ErrorCode::Superseded, message: "stopped".into() },
                result: None,
            }),
            changes: vec![],
            rolled_back: vec![],
        };
        let outs = f.core.handle(Event::JobDone(done), 4000);
        let next = outs.iter().find_map(|o| if let Out::Job(j) = o { Some(j.clone()) } else { None }).unwrap();
        assert_ne!(next.id, job.id);
        assert!(
            matches!(&next.kind, JobKind::Converge { packages, .. } if packages[0].version.as_deref() == Some("1.0"))
        );
    }
}
