//! The rollout controller's decisions, without IO: given the spec, the state it left, the
//! operator's instructions and what the broker holds of the group's devices, it says which
//! desired-state records to write and what the rollout's state is now. The driver
//! (`debfleet rollout run`) subscribes, holds the lease and publishes what this returns.
//!
//! Invariants (each has a test below):
//! - A device counts as a success only once it reported the new versions *and* its units stayed
//!   up for the watch after that (not when its operation ended).
//! - A wave is complete only when every device in it has a verdict (healthy, failed, or offline
//!   past the deadline); the rollout succeeds only when every wave is complete.
//! - A device that never reports holds its wave up for at most the deadline; its record stays, so
//!   it converges when it returns.
//! - The controller writes a device's record only with a revision above any it has seen or
//!   written, so a device never takes an older instruction for a newer one.

use std::collections::BTreeMap;

use debfleet_protocol::desired::{Convergence, DesiredRecord, DesiredReport, Target};
use debfleet_protocol::rollout::{Action, Phase, RolloutControl, RolloutDevice, RolloutSpec, RolloutState, Stage};
use debfleet_protocol::{time, DeviceId, ErrorCode, OpError, CONTRACT_VERSION};

/// What the broker holds of one device, as far as a rollout cares.
#[derive(Debug, Clone, Default)]
pub struct DeviceView {
    pub online: bool,
    /// What `state/packages` says of a package: its version, or `None` when it is known not
    /// to be installed. A package it does not list (the device does not manage it) is unknown.
    pub installed: BTreeMap<String, Option<String>>,
    /// Units of the rollout's packages that are in the `failed` state (`state/units`).
    pub failed_units: Vec<String>,
    /// `state/desired`.
    pub report: Option<DesiredReport>,
    /// Its own record (`desired/device/ID`).
    pub record: Option<DesiredRecord>,
}

/// The group as the broker holds it now.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub devices: BTreeMap<DeviceId, DeviceView>,
    /// The group's members now, in id order (a rollout takes its members when it starts).
    pub members: Vec<DeviceId>,
    /// The group's record (`desired/group/G`).
    pub group_record: Option<DesiredRecord>,
}

/// What the driver does.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// Publish (retained) this device's record.
    Device { device: DeviceId, record: DesiredRecord },
    /// Publish (retained) the group's record.
    Group(DesiredRecord),
}

pub struct Controller {
    pub spec: RolloutSpec,
    pub state: RolloutState,
    /// Revisions written this run, by device (the view may not show them yet).
    written: BTreeMap<DeviceId, u64>,
}

impl Controller {
    /// A rollout starting now, or resumed from the state a controller left on the broker.
    pub fn new(spec: RolloutSpec, resumed: Option<RolloutState>, now_ms: i64) -> Controller {
        let state = resumed.unwrap_or_else(|| RolloutState {
            v: CONTRACT_VERSION,
            id: spec.id.clone(),
            phase: Phase::Running,
            wave: None,
            members: Vec::new(),
            devices: BTreeMap::new(),
            reason: None,
            control_seq: 0,
            ts: time::format_unix_ms(now_ms),
        });
        let written = state.devices.iter().map(|(d, e)| (d.clone(), e.revision)).collect();
        Controller { spec, state, written }
    }

    /// Applies an operator's instruction (once per number).
    pub fn control(&mut self, c: &RolloutControl, view: &View, now_ms: i64) -> Vec<Out> {
        if c.seq <= self.state.control_seq {
            return Vec::new();
        }
        self.state.control_seq = c.seq;
        let mut out = Vec::new();
        let phase = self.state.phase;
        self.state.ts = time::format_unix_ms(now_ms);
        if !c.action.applies(phase) {
            return out;
        }
        match c.action {
            Action::Pause => {
                self.state.phase = Phase::Paused;
                self.state.reason = Some(format!("paused by {}", c.by));
            }
            Action::Resume => {
                self.state.phase = Phase::Running;
                self.state.reason = None;
                // Paused after a complete wave: the next one starts now.
                if self.wave_complete() {
                    self.advance(view, now_ms, &mut out);
                }
            }
            Action::Abort => {
                self.state.phase = Phase::Aborted;
                self.state.reason = Some(format!("aborted by {}", c.by));
                // Devices that have not converged yet are asked for what they had: they do not
                // install (a queued operation is superseded); those that converged keep it.
                let waiting: Vec<DeviceId> = self.devices_in(|s| matches!(s, Stage::Pending | Stage::Offline));
                for d in waiting {
                    self.revert(&d, view, now_ms, &mut out);
                }
            }
            Action::Retry => {
                let failed: Vec<DeviceId> = self.devices_in(|s| matches!(s, Stage::Failed { .. }));
                for d in failed {
                    let targets = self.spec.packages.clone();
                    self.write(&d, targets, view, now_ms, &mut out);
                    self.set_stage(&d, Stage::Pending, now_ms);
                }
                if matches!(phase, Phase::Halted | Phase::Aborted) {
                    self.state.phase = Phase::Running;
                    self.state.reason = None;
                }
            }
            Action::Rollback => {
                self.state.phase = Phase::RollingBack;
                self.state.reason = Some(format!("rollback asked by {}", c.by));
                self.rollback_all(view, now_ms, &mut out);
            }
        }
        out
    }

    /// Judges every device against what the broker holds, and moves the rollout on.
    pub fn step(&mut self, view: &View, now_ms: i64) -> Vec<Out> {
        let mut out = Vec::new();
        let before = self.state.clone();
        // Twice: a device that converged in this pass and needs no watch is healthy in the same
        // step, so the next wave does not wait a tick for it.
        self.judge(view, now_ms);
        self.judge(view, now_ms);
        match self.state.phase {
            Phase::Running => self.run(view, now_ms, &mut out),
            Phase::RollingBack if self.devices_in(|s| *s == Stage::Reverting).is_empty() => {
                self.state.phase = Phase::RolledBack;
                let failed = self.devices_in(|s| matches!(s, Stage::Failed { .. }));
                let offline = self.devices_in(|s| *s == Stage::Offline);
                if !failed.is_empty() || !offline.is_empty() {
                    self.state.reason = Some(format!(
                        "rolled back; not back yet: {} failed, {} offline (they go back when they can)",
                        failed.len(),
                        offline.len()
                    ));
                }
            }
            _ => {}
        }
        if self.state != before {
            self.state.ts = time::format_unix_ms(now_ms);
        }
        out
    }

    fn run(&mut self, view: &View, now_ms: i64, out: &mut Vec<Out>) {
        let failed = self.devices_in(|s| matches!(s, Stage::Failed { .. })).len();
        if failed as u64 >= u64::from(self.spec.max_failures) {
            return self.halt(
                format!("{failed} device(s) failed (the limit is {})", self.spec.max_failures),
                view,
                now_ms,
                out,
            );
        }
        let Some(wave) = self.state.wave else {
            self.state.members = view.members.clone();
            if self.state.members.is_empty() {
                return self.halt(format!("group {} has no devices", self.spec.group), view, now_ms, out);
            }
            return self.start_wave(0, view, now_ms, out);
        };
        if !self.wave_complete() {
            return;
        }
        let of_wave = |c: &Controller, f: fn(&Stage) -> bool| {
            c.state.devices.values().filter(|e| e.wave == wave && f(&e.stage)).count()
        };
        let healthy = of_wave(self, |s| *s == Stage::Healthy);
        let offline = of_wave(self, |s| *s == Stage::Offline);
        let total = of_wave(self, |_| true);
        let judged = total - offline;
        if total > 0 && judged == 0 {
            let why = format!("no device of wave {} reported within {} s", wave + 1, self.spec.deadline_s);
            return self.halt(why, view, now_ms, out);
        }
        if judged > 0 && healthy * 100 < usize::from(self.spec.success_pct) * judged {
            let why = format!(
                "wave {}: {healthy} of {judged} reporting device(s) healthy, below {}%",
                wave + 1,
                self.spec.success_pct
            );
            return self.halt(why, view, now_ms, out);
        }
        let last = usize::from(wave) + 1 >= self.spec.waves.len();
        if self.spec.pause_after_wave && !last {
            self.state.phase = Phase::Paused;
            self.state.reason = Some(format!("wave {} done; resume to start the next", wave + 1));
            return;
        }
        self.advance(view, now_ms, out);
    }

    /// The next wave, or success after the last.
    fn advance(&mut self, view: &View, now_ms: i64, out: &mut Vec<Out>) {
        let next = self.state.wave.map_or(0, |w| w + 1);
        if usize::from(next) >= self.spec.waves.len() {
            self.state.phase = Phase::Succeeded;
            self.state.reason = None;
            // New members and returning ones get the versions from the group from now on.
            let mut packages = view.group_record.as_ref().map(|r| r.packages.clone()).unwrap_or_default();
            packages.extend(self.spec.packages.clone());
            let revision = view.group_record.as_ref().map_or(1, |r| r.revision + 1);
            out.push(Out::Group(self.record(packages, revision, now_ms)));
            return;
        }
        self.start_wave(next, view, now_ms, out);
    }

    fn start_wave(&mut self, wave: u16, view: &View, now_ms: i64, out: &mut Vec<Out>) {
        self.state.wave = Some(wave);
        let reach = self.spec.waves[usize::from(wave)].reach(self.state.members.len());
        let new: Vec<DeviceId> =
            self.state.members.iter().take(reach).filter(|d| !self.state.devices.contains_key(*d)).cloned().collect();
        for d in &new {
            let installed = view.devices.get(d).map(|v| &v.installed);
            // Only what the device told: a package it does not manage is left out, and a rollback
            // then stops asking for it rather than guess (`absent` would remove it).
            let before = self
                .spec
                .packages
                .keys()
                .filter_map(|n| {
                    let had = installed.and_then(|i| i.get(n))?;
                    Some((n.clone(), had.clone().map_or(Target::Absent, Target::Version)))
                })
                .collect();
            let revision = self.write(d, self.spec.packages.clone(), view, now_ms, out);
            self.state
                .devices
                .insert(d.clone(), RolloutDevice { wave, stage: Stage::Pending, before, revision, since_ms: now_ms });
        }
        // A wave that reaches no new device (10% of a small group after a first wave of 1) is
        // complete at once.
        if new.is_empty() {
            self.advance(view, now_ms, out);
        }
    }

    fn halt(&mut self, why: String, view: &View, now_ms: i64, out: &mut Vec<Out>) {
        if self.spec.auto_rollback {
            self.state.phase = Phase::RollingBack;
            self.state.reason = Some(format!("halted: {why}"));
            self.rollback_all(view, now_ms, out);
        } else {
            self.state.phase = Phase::Halted;
            self.state.reason = Some(format!("halted: {why}"));
        }
    }

    fn rollback_all(&mut self, view: &View, now_ms: i64, out: &mut Vec<Out>) {
        let changed: Vec<DeviceId> = self.devices_in(|s| *s != Stage::Reverted);
        for d in changed {
            self.revert(&d, view, now_ms, out);
        }
    }

    fn revert(&mut self, d: &DeviceId, view: &View, now_ms: i64, out: &mut Vec<Out>) {
        let Some(before) = self.state.devices.get(d).map(|e| e.before.clone()) else { return };
        let unknown: Vec<String> = self.spec.packages.keys().filter(|n| !before.contains_key(*n)).cloned().collect();
        self.write_with(d, view, now_ms, out, |packages| {
            packages.extend(before);
            for n in &unknown {
                packages.remove(n);
            }
        });
        self.set_stage(d, Stage::Reverting, now_ms);
    }

    /// Writes the device's record with `targets` over what it has, at a revision above any seen.
    fn write(
        &mut self,
        d: &DeviceId,
        targets: BTreeMap<String, Target>,
        view: &View,
        now_ms: i64,
        out: &mut Vec<Out>,
    ) -> u64 {
        self.write_with(d, view, now_ms, out, |packages| packages.extend(targets))
    }

    fn write_with(
        &mut self,
        d: &DeviceId,
        view: &View,
        now_ms: i64,
        out: &mut Vec<Out>,
        change: impl FnOnce(&mut BTreeMap<String, Target>),
    ) -> u64 {
        let current = view.devices.get(d).and_then(|v| v.record.as_ref());
        let mut packages = current.map(|r| r.packages.clone()).unwrap_or_default();
        change(&mut packages);
        let seen = current.map_or(0, |r| r.revision).max(self.written.get(d).copied().unwrap_or(0));
        let revision = seen + 1;
        self.written.insert(d.clone(), revision);
        if let Some(e) = self.state.devices.get_mut(d) {
            e.revision = revision;
        }
        // The rollout's window, else the one the device's record had.
        let window = self.spec.window.or(current.and_then(|r| r.window));
        let record = DesiredRecord { window, ..self.record(packages, revision, now_ms) };
        out.push(Out::Device { device: d.clone(), record });
        revision
    }

    fn record(&self, packages: BTreeMap<String, Target>, revision: u64, now_ms: i64) -> DesiredRecord {
        DesiredRecord {
            v: CONTRACT_VERSION,
            revision,
            packages,
            by: Some(self.spec.writer()),
            window: self.spec.window,
            ts: time::format_unix_ms(now_ms),
        }
    }

    /// Each device's verdict from its report, its units and the clock.
    fn judge(&mut self, view: &View, now_ms: i64) {
        let watch_ms = i64::from(self.spec.watch_s) * 1000;
        let deadline_ms = i64::from(self.spec.deadline_s) * 1000;
        let ids: Vec<DeviceId> = self.state.devices.keys().cloned().collect();
        for d in ids {
            let e = &self.state.devices[&d];
            let v = view.devices.get(&d);
            // The device's report covers the revision written last, and names these targets.
            let wanted = match e.stage {
                Stage::Reverting => &e.before,
                _ => &self.spec.packages,
            };
            let report = v.and_then(|v| v.report.as_ref()).filter(|r| {
                r.revisions.get("device").is_some_and(|rev| *rev >= e.revision)
                    && wanted.iter().all(|(n, t)| r.packages.get(n) == Some(t))
            });
            let next = match (&e.stage, report.map(|r| &r.convergence)) {
                (Stage::Healthy | Stage::Reverted, _) => None,
                (Stage::Reverting, Some(Convergence::Converged)) => Some(Stage::Reverted),
                (Stage::Reverting, Some(Convergence::Blocked { error, .. })) => Some(Stage::Failed {
                    error: OpError { code: error.code, message: format!("going back: {}", error.message) },
                }),
                (Stage::Pending | Stage::Offline, Some(Convergence::Converged)) => {
                    Some(Stage::Converged { at_ms: now_ms })
                }
                (
                    Stage::Pending | Stage::Offline | Stage::Converged { .. },
                    Some(Convergence::Blocked { error, .. }),
                ) => Some(Stage::Failed { error: error.clone() }),
                (Stage::Converged { at_ms }, _) => {
                    let failed_units = v.map(|v| v.failed_units.clone()).unwrap_or_default();
                    if !failed_units.is_empty() {
                        let message = format!("{} failed within the watch after converging", failed_units.join(", "));
                        Some(Stage::Failed { error: OpError { code: ErrorCode::UnitFailed, message } })
                    } else if now_ms - at_ms >= watch_ms && v.is_some_and(|v| v.online) {
                        Some(Stage::Healthy)
                    } else if now_ms - at_ms > watch_ms + deadline_ms {
                        // Converged, then gone before its watch could end.
                        Some(Stage::Offline)
                    } else {
                        None
                    }
                }
                // Downloaded and waiting for its install window: its deadline counts from when
                // the window lets it install.
                (Stage::Pending | Stage::Reverting, Some(Convergence::Scheduled { .. })) => {
                    if let Some(e) = self.state.devices.get_mut(&d) {
                        e.since_ms = now_ms;
                    }
                    None
                }
                (Stage::Pending | Stage::Reverting, _) if now_ms - e.since_ms > deadline_ms => Some(Stage::Offline),
                _ => None,
            };
            if let Some(s) = next {
                // A revert that went offline stays `Reverting` in spirit: the record is there, but
                // the rollback does not wait for it.
                self.set_stage(&d, s, now_ms);
            }
        }
    }

    fn set_stage(&mut self, d: &DeviceId, stage: Stage, now_ms: i64) {
        if let Some(e) = self.state.devices.get_mut(d) {
            // The clock of a convergence keeps counting from when the device was asked.
            if !matches!(stage, Stage::Converged { .. } | Stage::Healthy | Stage::Offline) {
                e.since_ms = now_ms;
            }
            e.stage = stage;
        }
    }

    fn devices_in(&self, f: impl Fn(&Stage) -> bool) -> Vec<DeviceId> {
        self.state.devices.iter().filter(|(_, e)| f(&e.stage)).map(|(d, _)| d.clone()).collect()
    }

    /// Every device of the current wave has a verdict.
    fn wave_complete(&self) -> bool {
        let Some(w) = self.state.wave else { return false };
        self.state
            .devices
            .values()
            .filter(|e| e.wave == w)
            .all(|e| matches!(e.stage, Stage::Healthy | Stage::Failed { .. } | Stage::Offline))
    }
}

#[cfg(test)]
mod tests;
