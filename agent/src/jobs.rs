//! Long operations — apt transactions, unit restarts, index refreshes — run here, off the core,
//! one at a time. Each reports progress and ends with exactly one outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use debfleet_apt::{Apt, AptError, Op, Spec};
use debfleet_protocol::{ErrorCode, OpError, OpId, PackageChange, PackageResult, PackageSpec, Phase};
use debfleet_systemd::{Action, CrashLoop, Systemd};

use crate::journal::Handoff;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    Install(Vec<PackageSpec>),
    Upgrade(Vec<PackageSpec>),
    Uninstall {
        packages: Vec<PackageSpec>,
        purge: bool,
    },
    /// Back to an exact version (resolved by the core from its history when not given).
    Rollback(PackageSpec),
    /// To the desired state: exact versions (downgrades allowed) and newest ones (after
    /// `apt-get update` when `refresh`). `fetch_only`: download them and stop there (the
    /// install waits for its window; the core runs the same operation again then).
    Converge {
        packages: Vec<Spec>,
        refresh: bool,
        fetch_only: bool,
    },
    RestartUnit(String),
    /// Read these units' journal (`unitlog.rs`).
    Journal {
        units: Vec<String>,
        since_s: Option<u64>,
        lines: u32,
    },
    /// `apt-get update`, then the upgrades available for these (managed) packages.
    Refresh(Vec<String>),
    /// Finish an operation a transient unit carried while the agent restarted.
    Resume {
        unit: String,
        before: std::collections::BTreeMap<String, String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: OpId,
    pub kind: JobKind,
    pub dry_run: bool,
    /// The longest the units are watched after the change.
    pub watch: Duration,
    /// End the watch once every unit has been steady this long (None: watch it all).
    pub settle: Option<Duration>,
    /// The command's expiry (unix ms): a job still queued then is not started.
    pub expires_at: Option<i64>,
}

#[derive(Debug)]
pub enum JobEvent {
    Progress {
        id: OpId,
        phase: Phase,
        percent: Option<u8>,
    },
    /// The transaction is about to run in a transient unit; the core journals that durably
    /// and answers on `ack` before the unit starts.
    Handoff {
        id: OpId,
        handoff: Handoff,
        ack: tokio::sync::oneshot::Sender<()>,
    },
    Done(JobDone),
}

#[derive(Debug)]
pub struct JobDone {
    pub id: OpId,
    pub outcome: Outcome,
    /// (package, version after) for the managed-package history; empty when nothing changed.
    pub changes: Vec<(String, Option<String>)>,
    /// A rollback (operator's or automatic) landed on these versions.
    pub rolled_back: Vec<(String, String)>,
}

/// How a job ended: its result, or why it failed.
pub type Outcome = Result<Value, Failure>;

#[derive(Debug)]
pub struct Failure {
    pub error: OpError,
    /// What a failed job still has to report (a transaction that was made and undone).
    pub result: Option<Value>,
}

impl JobDone {
    fn ok(id: &OpId, result: Value, changes: Vec<(String, Option<String>)>) -> JobDone {
        JobDone { id: id.clone(), outcome: Ok(result), changes, rolled_back: vec![] }
    }

    fn failed(id: &OpId, error: OpError, changes: Vec<(String, Option<String>)>) -> JobDone {
        JobDone { id: id.clone(), outcome: Err(Failure { error, result: None }), changes, rolled_back: vec![] }
    }
}

fn json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

pub struct JobContext {
    pub apt: Apt,
    /// Packages by delta, and the keep of installed versions they start from.
    pub fetcher: crate::fetch::Fetcher,
    /// dpkg's database, shared with the core (read once per change).
    pub db: Arc<debfleet_apt::dpkg::Database>,
    pub systemd: Option<Arc<Systemd>>,
    /// Running as a systemd service with a bus: a transaction on the agent's own package goes
    /// to a transient unit, since the package's postinst restarts this service.
    pub self_upgrade: bool,
    /// The running job asked to stop before it installs (`Out::Cancel`).
    pub cancelled: std::sync::Mutex<Option<OpId>>,
}

impl JobContext {
    pub fn cancel(&self, id: OpId) {
        if let Ok(mut c) = self.cancelled.lock() {
            *c = Some(id);
        }
    }

    /// Whether `id` was asked to stop (and forgets the request).
    fn take_cancelled(&self, id: &OpId) -> bool {
        self.cancelled.lock().map(|mut c| c.take_if(|c| c == id).is_some()).unwrap_or(false)
    }
}

/// The agent's own package.
pub const OWN_PACKAGE: &str = "debfleet-agent";

fn error(code: ErrorCode, message: impl Into<String>) -> OpError {
    OpError { code, message: message.into() }
}

fn apt_error(e: AptError) -> OpError {
    OpError { code: e.code(), message: e.to_string() }
}

fn versions(ctx: &JobContext, names: &[String]) -> std::collections::BTreeMap<String, Option<String>> {
    ctx.db.packages_state(names).into_iter().map(|(n, s)| (n, s.version)).collect()
}

struct Reporter {
    id: OpId,
    tx: mpsc::Sender<JobEvent>,
    last: Option<(Phase, u8, Instant)>,
}

impl Reporter {
    /// Sends progress when the phase changes, the percentage moves by 5 or a second passed: a
    /// device on a metered link does not publish every dpkg line.
    fn report(&mut self, phase: Phase, percent: Option<u8>) {
        let p = percent.unwrap_or(0);
        let due = match &self.last {
            Some((ph, pc, t)) => *ph != phase || p >= pc.saturating_add(5) || t.elapsed() >= Duration::from_secs(1),
            None => true,
        };
        if due {
            self.last = Some((phase, p, Instant::now()));
            let _ = self.tx.blocking_send(JobEvent::Progress { id: self.id.clone(), phase, percent });
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("job thread")
}

/// Runs a job to its end and sends its outcome.
pub async fn run(job: Job, ctx: Arc<JobContext>, tx: mpsc::Sender<JobEvent>) {
    let id = job.id.clone();
    let done = match &job.kind {
        JobKind::RestartUnit(unit) => restart_unit(&id, unit, &ctx).await,
        JobKind::Journal { units, since_s, lines } => {
            let (units, since_s, lines) = (units.clone(), *since_s, *lines);
            match blocking(move || crate::unitlog::read(&units, since_s, lines)).await {
                Ok(result) => JobDone::ok(&id, result, vec![]),
                Err(e) => JobDone::failed(&id, e, vec![]),
            }
        }
        JobKind::Refresh(managed) => {
            let apt = ctx.apt.clone();
            let specs: Vec<Spec> = managed.iter().map(|n| Spec::named(n)).collect();
            let outcome = blocking(move || {
                let _ = apt.update()?;
                apt.upgradable(&specs)
            })
            .await;
            match outcome {
                Ok(up) => {
                    let upgradable: serde_json::Map<String, Value> = up
                        .into_iter()
                        .map(|(n, (from, to))| (n, serde_json::json!({"installed": from, "candidate": to})))
                        .collect();
                    let result = serde_json::json!({"updated": true, "upgradable": upgradable});
                    JobDone::ok(&id, result, vec![])
                }
                Err(e) => JobDone::failed(&id, apt_error(e), vec![]),
            }
        }
        JobKind::Resume { unit, before } => match &ctx.systemd {
            Some(sd) => finish_transient(&id, unit, before.clone(), &ctx, sd, Instant::now()).await,
            None => JobDone::failed(
                &id,
                error(ErrorCode::Interrupted, format!("cannot read the result of {unit}: no systemd bus")),
                vec![],
            ),
        },
        _ => packages(&job, &ctx, &tx).await,
    };
    let _ = tx.send(JobEvent::Done(done)).await;
}

async fn restart_unit(id: &OpId, unit: &str, ctx: &JobContext) -> JobDone {
    match &ctx.systemd {
        None => JobDone::failed(id, error(ErrorCode::NotSupported, "no systemd on this device"), vec![]),
        Some(sd) => match sd.act(unit, Action::Restart, Duration::from_secs(90)).await {
            Ok(s) => {
                JobDone::ok(id, serde_json::json!({"unit": unit, "active": s.active_state, "sub": s.sub_state}), vec![])
            }
            Err(e) => JobDone::failed(id, error(ErrorCode::UnitFailed, e.to_string()), vec![]),
        },
    }
}

fn to_spec(p: &PackageSpec) -> Spec {
    Spec { name: p.name.clone(), version: p.version.clone(), release: None }
}

/// What `apt-get update` cost an operation: the bytes fetched, and what they would have been
/// without index diffs. An upgrade starts with it; other operations run it once, when apt did not
/// know what was asked for (just published), and try again.
#[derive(Default)]
struct Indices {
    fetched: u64,
    full: u64,
    updated: bool,
}

impl Indices {
    async fn update(&mut self, tx: &mpsc::Sender<JobEvent>, id: &OpId, apt: &Apt) -> Result<(), OpError> {
        let _ = tx.send(JobEvent::Progress { id: id.clone(), phase: Phase::UpdatingIndices, percent: None }).await;
        let apt = apt.clone();
        let b = blocking(move || apt.update()).await.map_err(apt_error)?;
        self.fetched += b.fetched;
        self.full += b.without_diffs;
        self.updated = true;
        Ok(())
    }
}

async fn packages(job: &Job, ctx: &Arc<JobContext>, tx: &mpsc::Sender<JobEvent>) -> JobDone {
    let started = Instant::now();
    let id = job.id.clone();
    let fail = |e: OpError| JobDone::failed(&id, e, vec![]);
    let (op, allow_downgrades) = match &job.kind {
        JobKind::Install(p) => (Op::Install(p.iter().map(to_spec).collect()), false),
        JobKind::Upgrade(p) => (Op::Upgrade(p.iter().map(to_spec).collect()), false),
        JobKind::Uninstall { packages, purge } => {
            (Op::Remove { names: packages.iter().map(to_spec).collect(), purge: *purge }, false)
        }
        JobKind::Rollback(p) => (Op::Install(vec![to_spec(p)]), true),
        JobKind::Converge { packages, .. } => (Op::Install(packages.clone()), true),
        _ => unreachable!("package jobs only"),
    };
    let touches_self = match &op {
        Op::Install(s) | Op::Upgrade(s) | Op::Remove { names: s, .. } => s.iter().any(|s| s.name == OWN_PACKAGE),
    };
    // An upgrade is about the newest the repository has, so it starts from fresh indices; other
    // operations refresh them only when apt does not know what was asked for (just published).
    let mut indices = Indices::default();
    if matches!(job.kind, JobKind::Upgrade(_) | JobKind::Converge { refresh: true, .. }) {
        if let Err(e) = indices.update(tx, &id, &ctx.apt).await {
            return fail(e);
        }
    }
    if job.dry_run {
        let _ = tx.send(JobEvent::Progress { id: id.clone(), phase: Phase::Resolving, percent: None }).await;
        let plan = loop {
            let (apt, plan_op) = (ctx.apt.clone(), op.clone());
            match blocking(move || apt.simulate(&plan_op, allow_downgrades)).await {
                Ok(p) => break p,
                Err(AptError::PackageNotFound(_) | AptError::VersionNotFound { .. }) if !indices.updated => {
                    if let Err(e) = indices.update(tx, &id, &ctx.apt).await {
                        return fail(e);
                    }
                }
                Err(e) => return fail(apt_error(e)),
            }
        };
        let changes = plan
            .install
            .iter()
            .map(|(n, v)| PackageChange { package: n.clone(), before: None, after: Some(v.clone()) })
            .chain(plan.upgrade.iter().map(|(n, o, v)| PackageChange {
                package: n.clone(),
                before: Some(o.clone()),
                after: Some(v.clone()),
            }))
            .chain(plan.remove.iter().map(|(n, o)| PackageChange {
                package: n.clone(),
                before: Some(o.clone()),
                after: None,
            }))
            .collect();
        let r = PackageResult {
            changes,
            download_bytes: 0,
            index_bytes: indices.fetched,
            full_bytes: indices.full,
            fetches: vec![],
            duration_ms: started.elapsed().as_millis() as u64,
            dry_run: true,
            rolled_back_to: None,
        };
        return JobDone::ok(&id, json(&r), vec![]);
    }
    if touches_self && ctx.self_upgrade {
        if let Some(sd) = &ctx.systemd {
            return hand_off(&id, &op, allow_downgrades, ctx, sd, tx, started).await;
        }
    }
    // What changed is read from dpkg's database before and after (no separate simulation: the
    // transaction itself resolves, and dependencies show up in the difference).
    let before = ctx.db.installed_versions();
    let _ = tx.send(JobEvent::Progress { id: id.clone(), phase: Phase::Resolving, percent: None }).await;
    let mut plan = crate::fetch::Plan::default();
    let mut planned = false;
    let converge = matches!(job.kind, JobKind::Converge { .. });
    let mut fetched_first: Option<debfleet_apt::Report> = None;
    let run = loop {
        if !planned && !matches!(op, Op::Remove { .. }) && ctx.fetcher.has_deltas() {
            // What apt would download, so that the packages with a delta come by delta. A plan
            // that fails here fails the same way in the run below, which reports it (and after
            // a refresh of the indices, planning is tried again).
            let (apt, plan_op) = (ctx.apt.clone(), op.clone());
            if let Ok(c) = blocking(move || apt.simulate(&plan_op, allow_downgrades)).await {
                planned = true;
                if !c.upgrade.is_empty() || !c.install.is_empty() {
                    let _ =
                        tx.send(JobEvent::Progress { id: id.clone(), phase: Phase::Downloading, percent: None }).await;
                }
                let named: Vec<String> = match &op {
                    Op::Install(s) | Op::Upgrade(s) | Op::Remove { names: s, .. } => {
                        s.iter().map(|s| s.name.clone()).collect()
                    }
                };
                plan = ctx.fetcher.prepare(&ctx.apt, &c.upgrade, &c.install, &named).await;
            }
        }
        // A convergence fetches everything before it installs anything, so that a newer desired
        // state arriving meanwhile (a rollout aborted) stops it with nothing changed.
        if converge && fetched_first.is_none() {
            let _ = tx.send(JobEvent::Progress { id: id.clone(), phase: Phase::Downloading, percent: None }).await;
            let (apt, dl_op, local) = (ctx.apt.clone(), op.clone(), plan.local.clone());
            match blocking(move || apt.download(&dl_op, allow_downgrades, &local)).await {
                Ok(r) => fetched_first = Some(r),
                Err(AptError::PackageNotFound(_) | AptError::VersionNotFound { .. }) if !indices.updated => {
                    if let Err(e) = indices.update(tx, &id, &ctx.apt).await {
                        return fail(e);
                    }
                    continue;
                }
                Err(e) => return fail(apt_error(e)),
            }
            if ctx.take_cancelled(&id) {
                let message = "a newer desired state arrived while it downloaded; nothing was installed";
                tracing::info!(op = %id, "{message}");
                return fail(error(ErrorCode::Superseded, message));
            }
            if matches!(job.kind, JobKind::Converge { fetch_only: true, .. }) {
                let bytes = fetched_first.as_ref().map_or(0, |r| r.download_bytes) + plan.delta_bytes();
                tracing::info!(op = %id, "downloaded {bytes} bytes ahead of the install window");
                return JobDone::ok(&id, serde_json::json!({ "download_bytes": bytes }), vec![]);
            }
        }
        let (apt, run_op, local) = (ctx.apt.clone(), op.clone(), plan.local.clone());
        let mut reporter = Reporter { id: id.clone(), tx: tx.clone(), last: None };
        let r = blocking(move || {
            apt.run_with(&run_op, allow_downgrades, &local, &mut |p| {
                reporter.report(p.phase, Some(p.percent.round() as u8))
            })
        })
        .await;
        match r {
            Err(AptError::PackageNotFound(_) | AptError::VersionNotFound { .. }) if !indices.updated => {
                if let Err(e) = indices.update(tx, &id, &ctx.apt).await {
                    return fail(e);
                }
            }
            other => break other,
        }
    };
    let (changes, history) = changes_since(&before, ctx);
    let installed: Vec<(String, String)> =
        changes.iter().filter_map(|c| c.after.clone().map(|v| (c.package.clone(), v))).collect();
    let removed: Vec<String> = changes.iter().filter(|c| c.after.is_none()).map(|c| c.package.clone()).collect();
    ctx.fetcher.keep(&installed, &removed, &plan.local);
    let report = match run {
        Ok(mut r) => {
            // What the download-only pass fetched is what this transaction cost.
            if let Some(first) = fetched_first {
                r.download_bytes += first.download_bytes;
                r.downloads.extend(first.downloads);
            }
            crate::fetch::Fetcher::account(&r.downloads, &mut plan);
            r
        }
        Err(e) => {
            // Some packages may have changed before the failure: the history follows dpkg.
            return JobDone::failed(&id, apt_error(e), history);
        }
    };
    // What apt downloaded whole is what it said it would; the whole cost of the rest is
    // what their deltas replaced.
    let full_packages: u64 = report.download_bytes
        + plan
            .fetches
            .iter()
            .filter(|f| f.method == debfleet_protocol::FetchMethod::Delta)
            .map(|f| f.full_bytes)
            .sum::<u64>();
    let mut result = PackageResult {
        changes: changes.clone(),
        download_bytes: report.download_bytes + plan.delta_bytes(),
        index_bytes: indices.fetched,
        full_bytes: full_packages + indices.full,
        fetches: plan.fetches,
        duration_ms: 0,
        dry_run: false,
        rolled_back_to: None,
    };
    let rolled_back: Vec<(String, String)> = match &job.kind {
        JobKind::Rollback(p) => vec![(p.name.clone(), p.version.clone().unwrap_or_default())],
        _ => vec![],
    };
    let installs = !matches!(job.kind, JobKind::Uninstall { .. });
    if installs && !job.watch.is_zero() && !changes.is_empty() {
        if let Some(sd) = &ctx.systemd {
            let _ = tx.send(JobEvent::Progress { id: id.clone(), phase: Phase::VerifyingUnits, percent: None }).await;
            let units: Vec<String> =
                changes.iter().filter(|c| c.after.is_some()).flat_map(|c| ctx.db.package_units(&c.package)).collect();
            if let Some(reason) = watch_units(sd, &units, job.watch, job.settle).await {
                let _ = tx.send(JobEvent::Progress { id: id.clone(), phase: Phase::RollingBack, percent: None }).await;
                let (now, failures) = undo(ctx, &changes).await;
                result.rolled_back_to = Some(now.clone());
                result.duration_ms = started.elapsed().as_millis() as u64;
                let verdict = undo_verdict(&reason, &changes, &now, &failures);
                return JobDone {
                    id,
                    outcome: Err(Failure { error: verdict.error, result: Some(json(&result)) }),
                    changes: verdict.history,
                    rolled_back: verdict.rolled_back,
                };
            }
        }
    }
    result.duration_ms = started.elapsed().as_millis() as u64;
    JobDone { id, outcome: Ok(json(&result)), changes: history, rolled_back }
}

/// Watches units for `window` at most; returns why one is failing, if one is. With `settle`,
/// the watch ends as soon as every unit has been steady that long (a crash loop is never steady:
/// each restart moves it).
async fn watch_units(sd: &Systemd, units: &[String], window: Duration, settle: Option<Duration>) -> Option<String> {
    if units.is_empty() {
        return None;
    }
    let mut states = match sd.watch(units).await {
        Ok(s) => s,
        Err(e) => return Some(format!("cannot watch units: {e}")),
    };
    let mut detector = CrashLoop::new(window, 3);
    let mut steady = Steady::new(units);
    let deadline = tokio::time::Instant::now() + window;
    loop {
        let wake = match settle.and_then(|s| steady.settled_at(s)) {
            Some(at) => deadline.min(tokio::time::Instant::from_std(at)),
            None => deadline,
        };
        match tokio::time::timeout_at(wake, states.next()).await {
            Ok(Some(state)) => {
                if let Some(reason) = detector.observe(&state, Instant::now()) {
                    return Some(reason);
                }
                steady.observe(&state, Instant::now());
            }
            Ok(None) => return None,
            // The deadline, or every unit settled.
            Err(_) => return None,
        }
    }
}

/// Since when each unit has been steady (active, or inactive without failing).
struct Steady {
    since: std::collections::BTreeMap<String, Option<Instant>>,
}

impl Steady {
    fn new(units: &[String]) -> Steady {
        Steady { since: units.iter().map(|u| (u.clone(), None)).collect() }
    }

    fn observe(&mut self, state: &debfleet_systemd::UnitState, now: Instant) {
        let is_steady = state.active_state.is_steady();
        if let Some(slot) = self.since.get_mut(&state.name) {
            *slot = match (is_steady, *slot) {
                (true, Some(t)) => Some(t),
                (true, None) => Some(now),
                (false, _) => None,
            };
        }
    }

    /// When all of them will have been steady for `settle`, if all are steady now.
    fn settled_at(&self, settle: Duration) -> Option<Instant> {
        let mut latest = None;
        for since in self.since.values() {
            let t = (*since)?;
            latest = Some(latest.map_or(t, |l: Instant| l.max(t)));
        }
        latest.map(|t| t + settle)
    }
}

/// Puts the packages back as they were: the old version, or removed if it was new. Returns
/// what dpkg has for them afterwards, and the steps that failed.
async fn undo(
    ctx: &Arc<JobContext>,
    changes: &[PackageChange],
) -> (std::collections::BTreeMap<String, Option<String>>, Vec<String>) {
    let mut failures = Vec::new();
    let reinstall: Vec<Spec> = changes
        .iter()
        .filter_map(|c| {
            c.before.as_ref().map(|v| Spec { name: c.package.clone(), version: Some(v.clone()), release: None })
        })
        .collect();
    let remove: Vec<Spec> = changes.iter().filter(|c| c.before.is_none()).map(|c| Spec::named(&c.package)).collect();
    if !reinstall.is_empty() {
        let apt = ctx.apt.clone();
        let op = Op::Install(reinstall.clone());
        if let Err(e) = blocking(move || apt.run(&op, true, &mut |_| {})).await {
            tracing::error!("undoing the change failed: {e}");
            failures.push(format!("reinstalling the previous versions: {e}"));
        }
    }
    if !remove.is_empty() {
        let apt = ctx.apt.clone();
        let op = Op::Remove { names: remove.clone(), purge: true };
        if let Err(e) = blocking(move || apt.run(&op, false, &mut |_| {})).await {
            tracing::error!("removing the new packages failed: {e}");
            failures.push(format!("removing the new packages: {e}"));
        }
    }
    let names: Vec<String> = changes.iter().map(|c| c.package.clone()).collect();
    (versions(ctx, &names), failures)
}

/// How an undo after a unit failure ended, told from what dpkg has now (not from whether the
/// apt calls claimed success).
struct UndoVerdict {
    error: OpError,
    /// (package, version now) for the history.
    history: Vec<(String, Option<String>)>,
    /// Packages that are back on their previous version.
    rolled_back: Vec<(String, String)>,
}

fn undo_verdict(
    reason: &str,
    changes: &[PackageChange],
    now: &std::collections::BTreeMap<String, Option<String>>,
    failures: &[String],
) -> UndoVerdict {
    let installed = |p: &str| now.get(p).cloned().flatten();
    let off: Vec<String> = changes
        .iter()
        .filter(|c| installed(&c.package) != c.before)
        .map(|c| {
            let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "not installed".into());
            format!("{} is {} (was {})", c.package, show(&installed(&c.package)), show(&c.before))
        })
        .collect();
    let rolled_back = changes
        .iter()
        .filter_map(|c| {
            c.before.clone().filter(|b| installed(&c.package).as_ref() == Some(b)).map(|b| (c.package.clone(), b))
        })
        .collect();
    let history = changes.iter().map(|c| (c.package.clone(), installed(&c.package))).collect();
    let error = if off.is_empty() {
        error(ErrorCode::UnitFailed, format!("{reason}; the change was undone"))
    } else {
        let why = if failures.is_empty() { String::new() } else { format!(" ({})", failures.join("; ")) };
        error(
            ErrorCode::UndoFailed,
            format!("{reason}; putting the previous versions back failed{why}: {}", off.join(", ")),
        )
    };
    UndoVerdict { error, history, rolled_back }
}

/// What dpkg's database says changed since `before`: the changes for the result, and
/// (package, version now) for the managed-package history.
fn changes_since(
    before: &std::collections::BTreeMap<String, String>,
    ctx: &JobContext,
) -> (Vec<PackageChange>, Vec<(String, Option<String>)>) {
    let after = ctx.db.installed_versions();
    let names: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let changes: Vec<PackageChange> = names
        .into_iter()
        .map(|n| PackageChange { package: n.clone(), before: before.get(n).cloned(), after: after.get(n).cloned() })
        .filter(|c| c.before != c.after)
        .collect();
    let history = changes.iter().map(|c| (c.package.clone(), c.after.clone())).collect();
    (changes, history)
}

/// Runs the transaction in a transient unit (outside the agent's service, which the package's
/// postinst restarts); the result is read by this agent if it is still there, or its successor.
async fn hand_off(
    id: &OpId,
    op: &Op,
    allow_downgrades: bool,
    ctx: &Arc<JobContext>,
    sd: &Arc<Systemd>,
    tx: &mpsc::Sender<JobEvent>,
    started: Instant,
) -> JobDone {
    let before = ctx.db.installed_versions();
    let unit = format!("debfleet-op-{id}.service");
    let (ack, acked) = tokio::sync::oneshot::channel();
    let handoff = Handoff { unit: unit.clone(), before: before.clone() };
    let _ = tx.send(JobEvent::Handoff { id: id.clone(), handoff, ack }).await;
    if acked.await.is_err() {
        return JobDone::failed(id, error(ErrorCode::Internal, "the handoff was not journaled"), vec![]);
    }
    let _ = tx.send(JobEvent::Progress { id: id.clone(), phase: Phase::OutsideTheAgent, percent: None }).await;
    let argv = ctx.apt.argv(op, allow_downgrades);
    if let Err(e) = sd.start_transient(&unit, "debfleet: a transaction on the agent's own package", &argv).await {
        return JobDone::failed(id, error(ErrorCode::Internal, e.to_string()), vec![]);
    }
    finish_transient(id, &unit, before, ctx, sd, started).await
}

/// Waits for a transient unit's transaction to end (through systemd's signals) and reports it.
async fn finish_transient(
    id: &OpId,
    unit: &str,
    before: std::collections::BTreeMap<String, String>,
    ctx: &Arc<JobContext>,
    sd: &Arc<Systemd>,
    started: Instant,
) -> JobDone {
    let done = |outcome: Result<Value, OpError>, changes| match outcome {
        Ok(result) => JobDone::ok(id, result, changes),
        Err(e) => JobDone::failed(id, e, changes),
    };
    let mut states = match sd.watch(&[unit.to_owned()]).await {
        Ok(s) => s,
        Err(e) => return done(Err(error(ErrorCode::Interrupted, format!("{unit}: {e}"))), vec![]),
    };
    while let Some(state) = states.next().await {
        use debfleet_systemd::ActiveState;
        if matches!(state.active_state, ActiveState::Active | ActiveState::Failed) || state.load_state == "not-found" {
            break;
        }
    }
    let outcome = sd.oneshot_result(unit).await;
    let log = tokio::process::Command::new("journalctl")
        .args(["-u", unit, "-o", "cat", "--no-pager"])
        .output()
        .await
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let _ = sd.forget(unit).await;
    let (changes, history) = changes_since(&before, ctx);
    match outcome {
        Ok(Some((result, _))) if result == "success" => {
            let r = PackageResult {
                changes,
                download_bytes: debfleet_apt::need_to_get(&log),
                index_bytes: 0,
                full_bytes: debfleet_apt::need_to_get(&log),
                fetches: vec![],
                duration_ms: started.elapsed().as_millis() as u64,
                dry_run: false,
                rolled_back_to: None,
            };
            done(Ok(json(&r)), history)
        }
        Ok(Some((result, status))) => {
            let e = debfleet_apt::classify(&log, &[]);
            let e = if matches!(e, AptError::Other(ref m) if m.is_empty()) {
                error(ErrorCode::AptFailed, format!("{unit} ended {result} (status {status})"))
            } else {
                apt_error(e)
            };
            done(Err(e), history)
        }
        Ok(None) | Err(_) => done(Err(error(ErrorCode::Interrupted, format!("the result of {unit} is gone"))), history),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str, active: &str) -> debfleet_systemd::UnitState {
        debfleet_systemd::UnitState {
            name: name.into(),
            load_state: "loaded".into(),
            active_state: debfleet_systemd::ActiveState::parse(active),
            sub_state: String::new(),
            unit_file_state: "enabled".into(),
            n_restarts: Some(0),
            since_us: 0,
        }
    }

    #[test]
    fn units_settle_only_when_all_have_been_steady_long_enough() {
        let t0 = Instant::now();
        let s5 = Duration::from_secs(5);
        let mut s = Steady::new(&["a.service".into(), "b.service".into()]);
        s.observe(&unit("a.service", "active"), t0);
        assert_eq!(s.settled_at(s5), None, "b has not been seen");
        s.observe(&unit("b.service", "activating"), t0);
        assert_eq!(s.settled_at(s5), None);
        s.observe(&unit("b.service", "active"), t0 + Duration::from_secs(1));
        assert_eq!(s.settled_at(s5), Some(t0 + Duration::from_secs(6)));
        // A restart moves it again.
        s.observe(&unit("a.service", "deactivating"), t0 + Duration::from_secs(2));
        assert_eq!(s.settled_at(s5), None);
        s.observe(&unit("a.service", "active"), t0 + Duration::from_secs(3));
        assert_eq!(s.settled_at(s5), Some(t0 + Duration::from_secs(8)));
    }

    fn change(p: &str, before: Option<&str>, after: Option<&str>) -> PackageChange {
        PackageChange { package: p.into(), before: before.map(Into::into), after: after.map(Into::into) }
    }

    /// A stand-in for apt-get (thin-edge tests its software manager with fake plugins the same
    /// way): `update` succeeds; a transaction reports progress on fd 3, replaces dpkg's status
    /// file with `$dir/next-status` the way dpkg does (rename), prints `$dir/stderr` and exits
    /// with `$dir/exit`.
    fn fake_apt(dir: &std::path::Path) -> (Arc<JobContext>, std::path::PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let admin = dir.join("admin");
        std::fs::create_dir_all(admin.join("info")).unwrap();
        std::fs::write(admin.join("status"), "Package: bash\nStatus: install ok installed\nVersion: 5.2\n").unwrap();
        let script = dir.join("apt-get");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ncase \" $* \" in *\" update \"*) exit 0;; *\" --download-only \"*) echo 'Need to get 1,234 B of archives.'; exit 0;; esac\nd={d}\necho 'pmstatus:hello:40:Unpacking hello (1.0)' >&3\necho 'pmstatus:hello:90:Setting up hello (1.0)' >&3\n[ -f $d/next-status ] && cp $d/next-status {a}/status-new && mv {a}/status-new {a}/status\n[ -f $d/stderr ] && cat $d/stderr >&2\nexit $(cat $d/exit 2>/dev/null || echo 0)\n",
                d = dir.display(),
                a = admin.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let apt = Apt { apt_get: vec![script.display().to_string()], ..Apt::default() };
        let ctx = JobContext {
            apt,
            fetcher: crate::fetch::Fetcher {
                enabled: false,
                keep_dir: dir.join("debs"),
                work_dir: dir.join("fetch"),
                keep_max_bytes: 0,
            },
            db: Arc::new(debfleet_apt::dpkg::Database::new(&admin)),
            systemd: None,
            self_upgrade: false,
            cancelled: Default::default(),
        };
        (Arc::new(ctx), admin)
    }

    fn install(spec: &str) -> Job {
        Job {
            id: OpId::new("i-1").unwrap(),
            kind: JobKind::Install(vec![PackageSpec::parse(spec).unwrap()]),
            dry_run: false,
            watch: Duration::ZERO,
            settle: None,
            expires_at: None,
        }
    }

    async fn run_job(job: Job, ctx: Arc<JobContext>) -> (JobDone, Vec<Phase>) {
        let (tx, mut rx) = mpsc::channel(64);
        tokio::spawn(run(job, ctx, tx));
        let mut phases = Vec::new();
        loop {
            match rx.recv().await.expect("an outcome") {
                JobEvent::Progress { phase, .. } => phases.push(phase),
                JobEvent::Done(done) => return (done, phases),
                JobEvent::Handoff { .. } => panic!("no handoff here"),
            }
        }
    }

    #[tokio::test]
    async fn a_package_job_reports_phases_and_what_dpkg_changed_dependencies_included() {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, _) = fake_apt(dir.path());
        std::fs::write(
            dir.path().join("next-status"),
            "Package: bash\nStatus: install ok installed\nVersion: 5.2\n\nPackage: hello\nStatus: install ok installed\nVersion: 1.0\n\nPackage: libhello\nStatus: install ok installed\nVersion: 3\n",
        )
        .unwrap();
        let (done, phases) = run_job(install("hello=1.0"), ctx).await;
        assert!(done.outcome.is_ok(), "{:?}", done.outcome);
        assert_eq!(phases, [Phase::Resolving, Phase::Unpacking, Phase::Configuring]);
        let result: PackageResult = serde_json::from_value(done.outcome.unwrap()).unwrap();
        let changed: Vec<(&str, Option<&str>)> =
            result.changes.iter().map(|c| (c.package.as_str(), c.after.as_deref())).collect();
        assert_eq!(changed, [("hello", Some("1.0")), ("libhello", Some("3"))]);
        // The history has both; the core adopts only what the operator named.
        assert_eq!(done.changes.len(), 2);
    }

    fn converge(spec: &str) -> Job {
        let kind = JobKind::Converge { packages: vec![Spec::parse(spec).unwrap()], refresh: false, fetch_only: false };
        Job { id: OpId::new("desired-1").unwrap(), kind, ..install(spec) }
    }

    #[tokio::test]
    async fn a_convergence_ahead_of_its_window_only_downloads() {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, admin) = fake_apt(dir.path());
        let new = "Package: bash\nStatus: install ok installed\nVersion: 5.2\n\nPackage: hello\nStatus: install ok installed\nVersion: 1.0\n";
        std::fs::write(dir.path().join("next-status"), new).unwrap();
        let mut job = converge("hello=1.0");
        job.kind =
            JobKind::Converge { packages: vec![Spec::parse("hello=1.0").unwrap()], refresh: false, fetch_only: true };
        let (done, phases) = run_job(job, ctx).await;
        assert_eq!(done.outcome.expect("downloaded")["download_bytes"], 1234);
        assert!(phases.contains(&Phase::Downloading) && !phases.contains(&Phase::Unpacking), "{phases:?}");
        assert!(!std::fs::read_to_string(admin.join("status")).unwrap().contains("hello"), "it installed");
    }

    #[tokio::test]
    async fn a_convergence_downloads_first_and_a_cancel_meanwhile_installs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, admin) = fake_apt(dir.path());
        let new = "Package: bash\nStatus: install ok installed\nVersion: 5.2\n\nPackage: hello\nStatus: install ok installed\nVersion: 1.0\n";
        std::fs::write(dir.path().join("next-status"), new).unwrap();
        // Asked to stop while it downloads (a rollout aborted): nothing changes.
        ctx.cancel(OpId::new("desired-1").unwrap());
        let (done, phases) = run_job(converge("hello=1.0"), ctx.clone()).await;
        let f = done.outcome.expect_err("stopped");
        assert_eq!(f.error.code, ErrorCode::Superseded, "{}", f.error.message);
        assert!(phases.contains(&Phase::Downloading) && !phases.contains(&Phase::Unpacking), "{phases:?}");
        assert!(!std::fs::read_to_string(admin.join("status")).unwrap().contains("hello"), "it installed");
        // Not asked: it installs, and what the download pass fetched is counted.
        let (done, _) = run_job(converge("hello=1.0"), ctx).await;
        let result: PackageResult = serde_json::from_value(done.outcome.unwrap()).unwrap();
        assert_eq!(result.download_bytes, 1234);
        assert_eq!(result.changes.len(), 1);
    }

    #[tokio::test]
    async fn an_unknown_package_refreshes_the_indices_once_then_fails_with_its_code() {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, admin) = fake_apt(dir.path());
        std::fs::write(dir.path().join("stderr"), "E: Unable to locate package nosuch\n").unwrap();
        std::fs::write(dir.path().join("exit"), "100").unwrap();
        let (done, phases) = run_job(install("nosuch"), ctx).await;
        assert_eq!(done.outcome.err().map(|f| f.error.code), Some(ErrorCode::PackageNotFound));
        assert!(phases.contains(&Phase::UpdatingIndices), "{phases:?}");
        assert!(done.changes.is_empty());
        assert!(std::fs::read_to_string(admin.join("status")).unwrap().contains("bash"));
    }

    #[test]
    fn an_undo_is_judged_by_what_dpkg_has_afterwards() {
        let changes = [change("app", Some("1.0"), Some("2.0")), change("libnew", None, Some("1"))];
        let back = [("app".to_owned(), Some("1.0".to_owned())), ("libnew".to_owned(), None)].into_iter().collect();
        let v = undo_verdict("app.service failed", &changes, &back, &[]);
        assert_eq!(v.error.code, ErrorCode::UnitFailed);
        assert_eq!(v.rolled_back, [("app".to_owned(), "1.0".to_owned())]);

        // apt failed to reinstall 1.0: the device is left on 2.0, and the result says so.
        let stuck = [("app".to_owned(), Some("2.0".to_owned())), ("libnew".to_owned(), None)].into_iter().collect();
        let v = undo_verdict("app.service failed", &changes, &stuck, &["reinstalling: 404".into()]);
        assert_eq!(v.error.code, ErrorCode::UndoFailed);
        assert!(v.error.message.contains("app is 2.0 (was 1.0)"), "{}", v.error.message);
        assert!(v.error.message.contains("404"), "{}", v.error.message);
        assert!(v.rolled_back.is_empty());
        assert_eq!(v.history[0], ("app".to_owned(), Some("2.0".to_owned())));
    }
}
