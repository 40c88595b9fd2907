//! Packages and units as the core tracks them: jobs' progress and outcomes, the managed set,
//! reconciliation after an interrupted operation, and the managed units' states.

use debfleet_protocol::{time, Liveness, OpId, Topic, UnitInfo, UnitsState, CONTRACT_VERSION};

use super::{Core, Out};
use crate::jobs::JobDone;

impl Core {
    /// After a package operation was cut short and dpkg repaired: the managed set follows what
    /// dpkg now has for the packages it touched.
    pub fn reconcile_packages(&mut self, names: &[String]) {
        if names.is_empty() {
            return;
        }
        let state = self.dpkg.packages_state(names);
        let changes: Vec<(String, Option<String>)> = state.into_iter().map(|(n, s)| (n, s.version)).collect();
        tracing::info!("reconciled interrupted packages with dpkg: {changes:?}");
        self.managed.record(&changes);
    }

    /// Units of the managed packages: (unit, package).
    pub fn managed_units(&self) -> Vec<(String, String)> {
        self.managed
            .names(&self.cfg.packages)
            .into_iter()
            .flat_map(|pkg| self.dpkg.package_units(&pkg).into_iter().map(move |u| (u, pkg.clone())))
            .collect()
    }

    /// A transaction moved to a transient unit: journal it (durably) before it starts.
    pub fn handoff(&mut self, id: &OpId, handoff: crate::journal::Handoff) {
        if let Err(e) = self.journal.set_handoff(id, handoff) {
            tracing::error!("{e}");
        }
    }

    /// A running job's progress.
    pub fn job_progress(&mut self, id: &OpId, phase: debfleet_protocol::Phase, percent: Option<u8>) -> Vec<Out> {
        if let Err(e) = self.journal.progress(id, time::now_unix_ms(), phase, percent) {
            tracing::error!("{e}");
        }
        vec![self.publish_op(id)]
    }

    /// A job ended: record the outcome, update the managed set, republish the state.
    pub fn job_done(&mut self, done: JobDone, now_ms: i64) -> Vec<Out> {
        self.running = None;
        if let Some(out) = self.desired_fetched(&done, now_ms) {
            return out;
        }
        let verb = self.journal.verb(&done.id).unwrap_or("").to_owned();
        let (result, error) = match done.outcome {
            Ok(v) => (Some(v), None),
            Err(f) => (f.result, Some(f.error)),
        };
        match &error {
            Some(e) => tracing::warn!(op = %done.id, "{verb} failed: {}", e.message),
            None => tracing::info!(op = %done.id, "{verb} succeeded"),
        }
        if let Err(e) = self.journal.finish_with(&done.id, now_ms, result, error) {
            tracing::error!("{e}");
        }
        // Only what the operator named joins (or leaves) the managed set: dependencies apt
        // pulled in, and whatever another package manager changed meanwhile, are in the
        // result's changes but not adopted.
        let named: Vec<String> = self.journal.get(&done.id).map(|e| e.packages.clone()).unwrap_or_default();
        let adopted: Vec<(String, Option<String>)> =
            done.changes.iter().filter(|(n, _)| named.contains(n)).cloned().collect();
        if !adopted.is_empty() {
            self.managed.record(&adopted);
        }
        for (name, version) in &done.rolled_back {
            self.managed.record_rollback(name, version);
        }
        let mut out = vec![self.publish_op(&done.id)];
        if verb == "refresh" {
            out.extend(self.retained_facts(now_ms));
            out.push(self.link_report(now_ms));
            if let Some(since) = self.connected_since.clone() {
                out.push(
                    self.publish(Topic::Status(self.cfg.device_id.clone()), &self.status(Liveness::Online, since)),
                );
            }
        } else {
            out.push(self.publish(Topic::StatePackages(self.cfg.device_id.clone()), &self.packages_state()));
        }
        // A component's package may have come, changed or gone.
        self.forget_installed_components();
        out.extend(self.list_components());
        // Where the desired state stands now (and the next step towards it).
        out.extend(self.desired_after_job(now_ms));
        out.extend(self.next_job());
        out
    }

    /// A managed unit changed state (from systemd's signals).
    pub fn unit_changed(&mut self, unit: &str, package: &str, state: &debfleet_systemd::UnitState) -> Vec<Out> {
        let info = UnitInfo {
            package: package.to_owned(),
            active: state.active_state,
            sub: state.sub_state.clone(),
            enabled: state.unit_file_state.clone(),
            since: (state.since_us > 0).then(|| time::format_unix_ms((state.since_us / 1000) as i64)),
            restarts: state.n_restarts.unwrap_or(0),
        };
        if self.units.get(unit) == Some(&info) {
            return Vec::new();
        }
        self.units.insert(unit.to_owned(), info);
        vec![self.units_message()]
    }

    /// Forgets units no managed package owns any more.
    pub fn retain_units(&mut self, keep: &[(String, String)]) -> Vec<Out> {
        let before = self.units.len();
        self.units.retain(|u, _| keep.iter().any(|(k, _)| k == u));
        if self.units.len() != before {
            vec![self.units_message()]
        } else {
            Vec::new()
        }
    }

    pub(super) fn units_message(&self) -> Out {
        let msg = UnitsState { v: CONTRACT_VERSION, ts: time::now(), units: self.units.clone() };
        self.publish(Topic::StateUnits(self.cfg.device_id.clone()), &msg)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;
    use debfleet_protocol::OpState;

    #[test]
    fn package_commands_become_jobs_and_their_outcome_is_recorded() {
        let mut f = fixture(false);
        let outs = f.core.on_message(
            "debfleet/device/d1/cmd/install",
            br#"{"id":"i1","packages":["hello=1.0"],"watch_s":0}"#,
            false,
            0,
        );
        let job = outs
            .iter()
            .find_map(|o| match o {
                Out::Job(j) => Some(j.clone()),
                _ => None,
            })
            .expect("a job");
        assert_eq!(job.kind, JobKind::Install(vec![PackageSpec { name: "hello".into(), version: Some("1.0".into()) }]));
        assert_eq!((job.watch, job.settle), (std::time::Duration::ZERO, None));
        let last = op_states(&outs, "i1").pop().unwrap();
        assert_eq!((last.state, last.phase), (OpState::Running, Some(debfleet_protocol::Phase::Queued)));

        let result = serde_json::json!({"changes": [{"package": "hello", "after": "1.0"}], "download_bytes": 1, "duration_ms": 5});
        let done = JobDone {
            id: job.id,
            outcome: Ok(result),
            changes: vec![("hello".into(), Some("1.0".into()))],
            rolled_back: vec![],
        };
        let outs = f.core.job_done(done, 10);
        assert_eq!(op_states(&outs, "i1").pop().unwrap().state, OpState::Succeeded);
        let pkgs = publishes(&outs).into_iter().find(|(t, _, _)| t.ends_with("/state/packages")).unwrap().1;
        assert!(pkgs["packages"].get("hello").is_some(), "managed now: {pkgs}");
    }

    #[test]
    fn dependencies_apt_pulled_in_are_not_adopted() {
        let mut f = fixture(false);
        let outs =
            f.core.on_message("debfleet/device/d1/cmd/install", br#"{"id":"i2","packages":["hello"]}"#, false, 0);
        let job = outs.iter().find_map(|o| if let Out::Job(j) = o { Some(j.clone()) } else { None }).unwrap();
        let done = JobDone {
            id: job.id,
            outcome: Ok(serde_json::json!({})),
            changes: vec![("hello".into(), Some("1.0".into())), ("libhello-dep".into(), Some("3".into()))],
            rolled_back: vec![],
        };
        let outs = f.core.job_done(done, 10);
        let pkgs = publishes(&outs).into_iter().find(|(t, _, _)| t.ends_with("/state/packages")).unwrap().1;
        assert!(pkgs["packages"].get("hello").is_some(), "{pkgs}");
        assert!(pkgs["packages"].get("libhello-dep").is_none(), "a dependency became managed: {pkgs}");
    }

    #[test]
    fn one_job_runs_at_a_time_and_the_next_starts_when_it_ends() {
        let mut f = fixture(false);
        let first = f.core.on_message("debfleet/device/d1/cmd/install", br#"{"id":"a","packages":["x1"]}"#, false, 0);
        let second = f.core.on_message("debfleet/device/d1/cmd/install", br#"{"id":"b","packages":["x2"]}"#, false, 0);
        let started =
            |outs: &[Out]| outs.iter().find_map(|o| if let Out::Job(j) = o { Some(j.id.to_string()) } else { None });
        assert_eq!((started(&first), started(&second)), (Some("a".into()), None));
        let done = JobDone {
            id: OpId::new("a").unwrap(),
            outcome: Ok(serde_json::json!({})),
            changes: vec![],
            rolled_back: vec![],
        };
        let outs = f.core.handle(crate::core::Event::JobDone(done), 1);
        assert_eq!(started(&outs), Some("b".into()));
        assert_eq!(op_states(&outs, "a").pop().unwrap().state, OpState::Succeeded);
    }
}
