//! The controller against a simulated group: devices whose reports follow the records it writes.

use super::*;
use debfleet_protocol::rollout::{RolloutId, WaveSize};
use debfleet_protocol::GroupName;

fn dev(i: usize) -> DeviceId {
    DeviceId::new(format!("d{i}")).unwrap()
}

fn spec(waves: &[&str]) -> RolloutSpec {
    RolloutSpec {
        v: 1,
        id: RolloutId::new("r1").unwrap(),
        group: GroupName::new("lab").unwrap(),
        packages: [("app".to_owned(), Target::Version("2.0".into()))].into(),
        waves: waves.iter().map(|w| WaveSize::parse(w).unwrap()).collect(),
        success_pct: 100,
        max_failures: 1,
        watch_s: 10,
        deadline_s: 60,
        auto_rollback: false,
        pause_after_wave: false,
        window: None,
        by: "ana".into(),
        ts: "t".into(),
    }
}

/// Six devices on app 1.0; each applies its record when told to.
struct Sim {
    view: View,
    /// Records written and not yet acted on, by device.
    asked: BTreeMap<DeviceId, DesiredRecord>,
    group_writes: Vec<DesiredRecord>,
    now: i64,
}

impl Sim {
    fn new(n: usize) -> Sim {
        let mut view = View { members: (0..n).map(dev).collect(), ..View::default() };
        for d in &view.members {
            let v = DeviceView {
                online: true,
                installed: [("app".into(), Some("1.0".into()))].into(),
                ..Default::default()
            };
            view.devices.insert(d.clone(), v);
        }
        Sim { view, asked: BTreeMap::new(), group_writes: Vec::new(), now: 0 }
    }

    fn take(&mut self, outs: Vec<Out>) -> Vec<DeviceId> {
        let mut devices = Vec::new();
        for o in outs {
            match o {
                Out::Device { device, record } => {
                    self.view.devices.entry(device.clone()).or_default().record = Some(record.clone());
                    self.asked.insert(device.clone(), record);
                    devices.push(device);
                }
                Out::Group(r) => {
                    self.view.group_record = Some(r.clone());
                    self.group_writes.push(r);
                }
            }
        }
        devices
    }

    /// The device acts on its record: converges, or reports what blocked it.
    fn apply(&mut self, d: &DeviceId, fails: Option<ErrorCode>) {
        let r = self.asked.remove(d).expect("a record to act on");
        let v = self.view.devices.get_mut(d).unwrap();
        let convergence = match fails {
            None => {
                for (n, t) in &r.packages {
                    let now = match t {
                        Target::Version(ver) => Some(ver.clone()),
                        _ => None,
                    };
                    v.installed.insert(n.clone(), now);
                }
                Convergence::Converged
            }
            Some(code) => {
                Convergence::Blocked { op: None, error: OpError { code, message: "app.service failed".into() } }
            }
        };
        v.report = Some(DesiredReport {
            v: 1,
            ts: "t".into(),
            convergence,
            revisions: [("device".to_owned(), r.revision)].into(),
            packages: r.packages.clone(),
            refused: BTreeMap::new(),
        });
    }

    fn step(&mut self, c: &mut Controller, secs: i64) -> Vec<DeviceId> {
        self.now += secs * 1000;
        let outs = c.step(&self.view, self.now);
        self.take(outs)
    }

    fn version(&self, d: &DeviceId) -> &str {
        self.view.devices[d].installed["app"].as_deref().unwrap_or("absent")
    }
}

fn stage(c: &Controller, d: &DeviceId) -> Stage {
    c.state.devices[d].stage.clone()
}

#[test]
fn a_good_version_moves_wave_by_wave_and_counts_success_only_after_the_watch() {
    let mut sim = Sim::new(6);
    let mut c = Controller::new(spec(&["1", "50%", "100%"]), None, 0);
    assert_eq!(sim.step(&mut c, 0), [dev(0)], "the first wave is one device");
    assert_eq!(c.state.devices[&dev(0)].before["app"], Target::Version("1.0".into()));
    sim.apply(&dev(0), None);
    assert!(sim.step(&mut c, 1).is_empty());
    assert!(matches!(stage(&c, &dev(0)), Stage::Converged { .. }));
    // Converged is not yet a success: the watch has not passed.
    assert!(sim.step(&mut c, 5).is_empty());
    assert_eq!(sim.step(&mut c, 5), [dev(1), dev(2)], "50% of six, cumulative");
    assert_eq!(stage(&c, &dev(0)), Stage::Healthy);
    sim.apply(&dev(1), None);
    // One device of the wave still converging: the wave is not complete (hawkBit PR #2867).
    for _ in 0..5 {
        assert!(sim.step(&mut c, 10).is_empty());
    }
    sim.apply(&dev(2), None);
    sim.step(&mut c, 1);
    assert_eq!(sim.step(&mut c, 10), [dev(3), dev(4), dev(5)]);
    for i in 3..6 {
        sim.apply(&dev(i), None);
    }
    sim.step(&mut c, 1);
    assert_eq!(c.state.phase, Phase::Running);
    assert!(sim.group_writes.is_empty());
    sim.step(&mut c, 10);
    assert_eq!(c.state.phase, Phase::Succeeded);
    assert!((0..6).all(|i| sim.version(&dev(i)) == "2.0"));
    // From now on the group's record names it (new and returning members).
    assert_eq!(sim.group_writes.len(), 1);
    assert_eq!(sim.group_writes[0].packages["app"], Target::Version("2.0".into()));
    assert_eq!(sim.group_writes[0].by.as_deref(), Some("rollout/r1"));
}

#[test]
fn a_failing_version_halts_after_the_first_wave_and_rolls_it_back() {
    let mut sim = Sim::new(6);
    let mut c = Controller::new(RolloutSpec { auto_rollback: true, ..spec(&["1", "100%"]) }, None, 0);
    assert_eq!(sim.step(&mut c, 0), [dev(0)]);
    sim.apply(&dev(0), Some(ErrorCode::UnitFailed));
    assert_eq!(sim.step(&mut c, 1), [dev(0)], "the failed device is asked for what it had");
    assert_eq!(c.state.phase, Phase::RollingBack);
    assert!(c.state.reason.as_deref().unwrap().contains("1 device(s) failed"), "{:?}", c.state.reason);
    assert_eq!(sim.asked[&dev(0)].packages["app"], Target::Version("1.0".into()));
    assert_eq!(sim.asked[&dev(0)].revision, 2);
    sim.apply(&dev(0), None);
    sim.step(&mut c, 1);
    assert_eq!((c.state.phase, stage(&c, &dev(0))), (Phase::RolledBack, Stage::Reverted));
    // The other devices were never asked.
    assert!((1..6).all(|i| sim.view.devices[&dev(i)].record.is_none()));
    assert!(sim.step(&mut c, 100).is_empty());
}

#[test]
fn a_unit_that_fails_during_the_watch_is_a_failure_not_a_success() {
    let mut sim = Sim::new(2);
    let mut c = Controller::new(spec(&["1", "100%"]), None, 0);
    sim.step(&mut c, 0);
    sim.apply(&dev(0), None);
    sim.step(&mut c, 1);
    sim.view.devices.get_mut(&dev(0)).unwrap().failed_units = vec!["app.service".into()];
    sim.step(&mut c, 5);
    assert!(matches!(stage(&c, &dev(0)), Stage::Failed { error } if error.code == ErrorCode::UnitFailed));
    assert_eq!(c.state.phase, Phase::Halted, "no rollback unless asked: {:?}", c.state.reason);
    assert!(sim.view.devices[&dev(1)].record.is_none());
}

#[test]
fn a_device_that_never_reports_holds_its_wave_only_until_the_deadline() {
    let mut sim = Sim::new(3);
    let mut c = Controller::new(spec(&["2", "100%"]), None, 0);
    assert_eq!(sim.step(&mut c, 0), [dev(0), dev(1)]);
    sim.view.devices.get_mut(&dev(1)).unwrap().online = false;
    sim.apply(&dev(0), None);
    sim.step(&mut c, 1);
    sim.step(&mut c, 10);
    assert_eq!(c.state.wave, Some(0), "waiting for d1");
    assert_eq!(sim.step(&mut c, 60), [dev(2)], "d1 is offline past the deadline; the next wave starts");
    assert_eq!(stage(&c, &dev(1)), Stage::Offline);
    // It comes back and converges: its record was kept.
    sim.view.devices.get_mut(&dev(1)).unwrap().online = true;
    sim.apply(&dev(1), None);
    sim.apply(&dev(2), None);
    sim.step(&mut c, 1);
    sim.step(&mut c, 10);
    assert_eq!(c.state.phase, Phase::Succeeded);
    assert_eq!(stage(&c, &dev(1)), Stage::Healthy);
}

#[test]
fn a_device_waiting_for_its_install_window_is_not_offline() {
    let mut sim = Sim::new(2);
    let window = debfleet_protocol::desired::Window::parse("02:00-04:00").unwrap();
    let mut c = Controller::new(RolloutSpec { window: Some(window), ..spec(&["1", "100%"]) }, None, 0);
    assert_eq!(sim.step(&mut c, 0), [dev(0)]);
    let record = sim.asked[&dev(0)].clone();
    assert_eq!(record.window, Some(window), "the records carry the window");
    // It downloaded and waits for hours, past the deadline, saying so.
    sim.view.devices.get_mut(&dev(0)).unwrap().report = Some(DesiredReport {
        v: 1,
        ts: "t".into(),
        convergence: Convergence::Scheduled { op: None, window, opens_at: "t".into() },
        revisions: [("device".to_owned(), record.revision)].into(),
        packages: record.packages.clone(),
        refused: BTreeMap::new(),
    });
    for _ in 0..10 {
        assert!(sim.step(&mut c, 600).is_empty());
    }
    assert_eq!(stage(&c, &dev(0)), Stage::Pending);
    // The window opens; it installs; the rollout goes on.
    sim.apply(&dev(0), None);
    sim.step(&mut c, 1);
    assert_eq!(sim.step(&mut c, 10), [dev(1)]);
}

#[test]
fn a_wave_where_nobody_reports_halts_instead_of_passing() {
    let mut sim = Sim::new(3);
    let mut c = Controller::new(spec(&["1", "100%"]), None, 0);
    sim.step(&mut c, 0);
    sim.step(&mut c, 61);
    assert_eq!(c.state.phase, Phase::Halted);
    assert!(c.state.reason.as_deref().unwrap().contains("no device of wave 1 reported"));
}

#[test]
fn abort_puts_back_the_devices_that_have_not_converged_and_leaves_the_others() {
    let mut sim = Sim::new(4);
    let mut c = Controller::new(spec(&["2", "100%"]), None, 0);
    sim.step(&mut c, 0);
    sim.apply(&dev(0), None);
    sim.step(&mut c, 1);
    let abort = RolloutControl { v: 1, seq: 1, action: Action::Abort, by: "bo".into(), ts: "t".into() };
    let outs = c.control(&abort, &sim.view, sim.now);
    assert_eq!(sim.take(outs), [dev(1)]);
    assert_eq!(sim.asked[&dev(1)].packages["app"], Target::Version("1.0".into()));
    assert_eq!(c.state.phase, Phase::Aborted);
    // The same instruction again (a retained copy) does nothing.
    assert!(c.control(&abort, &sim.view, sim.now).is_empty());
    assert!(sim.step(&mut c, 100).is_empty());
    assert_eq!(sim.version(&dev(0)), "2.0");
}

#[test]
fn pause_after_wave_waits_for_resume_and_retry_asks_the_failed_again() {
    let mut sim = Sim::new(2);
    let s = RolloutSpec { pause_after_wave: true, max_failures: 2, success_pct: 50, ..spec(&["1", "100%"]) };
    let mut c = Controller::new(s, None, 0);
    sim.step(&mut c, 0);
    sim.apply(&dev(0), None);
    sim.step(&mut c, 1);
    sim.step(&mut c, 10);
    assert_eq!(c.state.phase, Phase::Paused);
    assert!(sim.step(&mut c, 100).is_empty());
    let ctl = |seq, action| RolloutControl { v: 1, seq, action, by: "ana".into(), ts: "t".into() };
    let outs = c.control(&ctl(1, Action::Resume), &sim.view, sim.now);
    assert_eq!(sim.take(outs), [dev(1)]);
    sim.apply(&dev(1), Some(ErrorCode::AptFailed));
    sim.step(&mut c, 1);
    assert!(matches!(stage(&c, &dev(1)), Stage::Failed { .. }));
    let outs = c.control(&ctl(2, Action::Retry), &sim.view, sim.now);
    assert_eq!(sim.take(outs), [dev(1)]);
    assert_eq!(sim.asked[&dev(1)].revision, 2, "a new revision: the device tries again");
    sim.apply(&dev(1), None);
    sim.step(&mut c, 1);
    sim.step(&mut c, 10);
    assert_eq!(c.state.phase, Phase::Succeeded);
}

#[test]
fn a_new_controller_resumes_from_the_state_the_last_one_left() {
    let mut sim = Sim::new(3);
    let mut c = Controller::new(spec(&["1", "100%"]), None, 0);
    sim.step(&mut c, 0);
    sim.apply(&dev(0), None);
    sim.step(&mut c, 1);
    // The first controller dies; the next one reads its state from the broker.
    let left = serde_json::to_vec(&c.state).unwrap();
    let mut c2 = Controller::new(spec(&["1", "100%"]), Some(serde_json::from_slice(&left).unwrap()), sim.now);
    assert_eq!(sim.step(&mut c2, 10), [dev(1), dev(2)], "no device asked twice, none skipped");
    // The operator's rollback of the whole rollout returns every device it changed.
    let rb = RolloutControl { v: 1, seq: 1, action: Action::Rollback, by: "ana".into(), ts: "t".into() };
    let outs = c2.control(&rb, &sim.view, sim.now);
    assert_eq!(sim.take(outs), [dev(0), dev(1), dev(2)]);
    for i in 0..3 {
        assert_eq!(sim.asked[&dev(i)].packages["app"], Target::Version("1.0".into()));
        sim.apply(&dev(i), None);
    }
    sim.step(&mut c2, 1);
    assert_eq!(c2.state.phase, Phase::RolledBack);
    assert!((0..3).all(|i| sim.version(&dev(i)) == "1.0"));
}

#[test]
fn records_are_written_above_any_revision_seen_and_keep_their_other_packages() {
    let mut sim = Sim::new(1);
    let own = DesiredRecord {
        v: 1,
        revision: 7,
        packages: [("tool".to_owned(), Target::Latest(None))].into(),
        by: Some("ana".into()),
        window: None,
        ts: "t".into(),
    };
    sim.view.devices.get_mut(&dev(0)).unwrap().record = Some(own);
    let mut c = Controller::new(spec(&["100%"]), None, 0);
    sim.step(&mut c, 0);
    let r = &sim.asked[&dev(0)];
    assert_eq!(r.revision, 8);
    assert_eq!(r.packages.keys().collect::<Vec<_>>(), ["app", "tool"]);
    // A report of an older revision is not a verdict on this one.
    sim.view.devices.get_mut(&dev(0)).unwrap().report = Some(DesiredReport {
        v: 1,
        ts: "t".into(),
        convergence: Convergence::Converged,
        revisions: [("device".to_owned(), 7)].into(),
        packages: [("app".to_owned(), Target::Version("2.0".into()))].into(),
        refused: BTreeMap::new(),
    });
    sim.step(&mut c, 1);
    assert_eq!(stage(&c, &dev(0)), Stage::Pending);
}

#[test]
fn a_package_the_device_did_not_report_is_not_removed_by_a_rollback() {
    let mut sim = Sim::new(1);
    sim.view.devices.get_mut(&dev(0)).unwrap().installed.clear();
    let mut c = Controller::new(RolloutSpec { auto_rollback: true, ..spec(&["100%"]) }, None, 0);
    sim.step(&mut c, 0);
    assert!(c.state.devices[&dev(0)].before.is_empty());
    sim.apply(&dev(0), Some(ErrorCode::UnitFailed));
    sim.step(&mut c, 1);
    assert_eq!(c.state.phase, Phase::RollingBack);
    // The record stops asking for it (it is not asked to be `absent`).
    assert!(!sim.asked[&dev(0)].packages.contains_key("app"), "{:?}", sim.asked[&dev(0)]);
}
