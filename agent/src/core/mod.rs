//! The agent's logic: what to publish on connect, how each command runs, when records expire.
//! It never touches the network; it returns [`Out`] actions for the connection edge to carry
//! out, so tests drive it by feeding messages.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use debfleet_protocol::{
    time, CfgMessage, ErrorCode, Liveness, Meta, OpId, PackagesState, Rejected, RuntimeCfg, Status, Telemetry, Topic,
    UnitInfo, Verb, CONTRACT_VERSION,
};
use serde::Serialize;

use crate::config::{AgentConfig, Overrides};
use crate::identity::Identity;
use crate::jobs::{Job, JobDone};
use crate::journal::{Journal, RESEND_CLEARS_MS};
use crate::logs::LogGate;
use crate::managed::Managed;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        reliable: bool,
    },
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    /// Stop the agent; systemd starts it again.
    Restart,
    /// Start this long operation (apt, systemd) off the core now. One runs at a time: the core
    /// queues the others and hands the next out when one ends. Progress and outcome come back
    /// as [`Event::JobProgress`] and [`Event::JobDone`].
    Job(crate::jobs::Job),
}

/// What the core asks of dpkg's database: the real one (`debfleet_apt::dpkg::Database`) on a
/// device, a fixed one in tests (which then never read the host's `/var/lib/dpkg`).
pub trait PackageDb: Send + Sync {
    fn packages_state(&self, wanted: &[String]) -> BTreeMap<String, debfleet_protocol::PackageState>;
    fn package_units(&self, name: &str) -> Vec<String>;
}

impl PackageDb for debfleet_apt::dpkg::Database {
    fn packages_state(&self, wanted: &[String]) -> BTreeMap<String, debfleet_protocol::PackageState> {
        debfleet_apt::dpkg::Database::packages_state(self, wanted)
    }

    fn package_units(&self, name: &str) -> Vec<String> {
        debfleet_apt::dpkg::Database::package_units(self, name)
    }
}

pub struct Core {
    cfg: AgentConfig,
    dpkg: Arc<dyn PackageDb>,
    runtime: RuntimeCfg,
    overrides: Overrides,
    journal: Journal,
    identity: Identity,
    started: Instant,
    connected_since: Option<String>,
    under_systemd: bool,
    log_gate: Option<Arc<LogGate>>,
    managed: Managed,
    units: BTreeMap<String, UnitInfo>,
    /// Retained command deliveries already reported (topic and payload hash): each is reported
    /// once, not again on every reconnect.
    retained_seen: std::collections::HashSet<(String, u64)>,
    /// Jobs waiting for the one that runs (bounded intake: see `MAX_JOBS_PENDING`).
    jobs: std::collections::VecDeque<Job>,
    job_running: bool,
    /// Messages waiting in the outbox, as last told by the edge (bounded intake).
    backlog: usize,
}

/// Over these, a new command is answered with `busy` instead of being accepted.
pub const MAX_BACKLOG: usize = 1000;
pub const MAX_JOBS_PENDING: usize = 32;

mod commands;
mod packages;

/// Everything the agent's loop reacts to, as the core sees it: one closed set. What needs IO
/// (sampling telemetry, reading the log queue) the edge does first and hands in.
pub enum Event {
    /// A connection is up; `since` is when it started (also in its last will).
    Connected {
        since: String,
    },
    Disconnected,
    /// A message on a command subscription; `retain` when delivered from the retained store.
    Message {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    /// The 1 s tick, with a telemetry sample when one is due, log batches, and whether the
    /// minute's housekeeping is due.
    Tick {
        telemetry: Option<Telemetry>,
        logs: Vec<debfleet_protocol::LogBatch>,
        housekeeping: bool,
    },
    JobProgress {
        id: OpId,
        phase: debfleet_protocol::Phase,
        percent: Option<u8>,
    },
    /// A transaction is about to move to a transient unit: journal it durably first.
    JobHandoff {
        id: OpId,
        handoff: crate::journal::Handoff,
    },
    JobDone(JobDone),
    /// A managed unit's state changed (systemd's signals).
    Unit {
        unit: String,
        package: String,
        state: debfleet_systemd::UnitState,
    },
}

impl Core {
    /// The one entry point of the agent's loop.
    pub fn handle(&mut self, event: Event, now_ms: i64) -> Vec<Out> {
        match event {
            Event::Connected { since } => self.on_connected(since, now_ms),
            Event::Disconnected => {
                self.on_disconnected();
                Vec::new()
            }
            Event::Message { topic, payload, retain } => self.on_message(&topic, &payload, retain, now_ms),
            Event::Tick { telemetry, logs, housekeeping } => {
                let mut out: Vec<Out> = telemetry.iter().map(|t| self.telemetry(t)).collect();
                out.extend(logs.iter().map(|b| self.logs(b)));
                if housekeeping {
                    out.extend(self.housekeeping(now_ms));
                }
                out
            }
            Event::JobProgress { id, phase, percent } => self.job_progress(&id, phase, percent),
            Event::JobHandoff { id, handoff } => {
                self.handoff(&id, handoff);
                Vec::new()
            }
            Event::JobDone(done) => self.job_done(done, now_ms),
            Event::Unit { unit, package, state } => self.unit_changed(&unit, &package, &state),
        }
    }

    /// Hands out the next queued job when none runs.
    fn next_job(&mut self) -> Option<Out> {
        if self.job_running {
            return None;
        }
        let job = self.jobs.pop_front()?;
        self.job_running = true;
        Some(Out::Job(job))
    }

    /// Jobs to finish first after a start (transactions a transient unit carried meanwhile).
    pub fn resume(&mut self, jobs: Vec<Job>) -> Vec<Out> {
        self.jobs.extend(jobs);
        self.next_job().into_iter().collect()
    }

    fn jobs_pending(&self) -> usize {
        self.jobs.len() + usize::from(self.job_running)
    }
    pub fn new(
        cfg: AgentConfig,
        journal: Journal,
        identity: Identity,
        under_systemd: bool,
        log_gate: Option<Arc<LogGate>>,
        dpkg: Arc<dyn PackageDb>,
    ) -> Core {
        let cfg_state_dir = cfg.state_dir.clone();
        let mut overrides = Overrides::load(&cfg.state_dir);
        let runtime = overrides.effective(&cfg.file_runtime);
        if let Some(g) = &log_gate {
            g.apply(&runtime.logs);
        }
        Core {
            cfg,
            dpkg,
            runtime,
            overrides,
            journal,
            identity,
            started: Instant::now(),
            connected_since: None,
            under_systemd,
            log_gate,
            managed: Managed::load(&cfg_state_dir),
            units: BTreeMap::new(),
            retained_seen: Default::default(),
            jobs: Default::default(),
            job_running: false,
            backlog: 0,
        }
    }

    pub fn runtime(&self) -> &RuntimeCfg {
        &self.runtime
    }

    fn topic(&self, t: Topic) -> String {
        self.cfg.topics.name(&t)
    }

    /// A publish as the contract's table says the topic travels (retain, QoS).
    fn publish<T: Serialize>(&self, t: Topic, payload: &T) -> Out {
        let (retain, qos) = t.delivery();
        Out::Publish {
            topic: self.topic(t),
            payload: serde_json::to_vec(payload).expect("payload serializes"),
            retain,
            reliable: qos == debfleet_protocol::topics::Qos::AtLeastOnce,
        }
    }

    fn clear(&self, id: &OpId) -> Out {
        Out::Publish {
            topic: self.topic(Topic::Op(self.cfg.device_id.clone(), id.clone())),
            payload: Vec::new(),
            retain: true,
            reliable: true,
        }
    }

    fn status(&self, state: Liveness, since: String) -> Status {
        Status { v: CONTRACT_VERSION, state, since, boot_id: self.identity.boot_id.clone() }
    }

    /// Builds the last will registered with each connection: `lost`, since that connection's
    /// start.
    pub fn will_builder(&self) -> impl Fn(&str) -> (String, Vec<u8>) + Send + 'static {
        let topic = self.topic(Topic::Status(self.cfg.device_id.clone()));
        let boot_id = self.identity.boot_id.clone();
        move |since| {
            let status = Status {
                v: CONTRACT_VERSION,
                state: Liveness::Lost,
                since: since.to_owned(),
                boot_id: boot_id.clone(),
            };
            (topic.clone(), serde_json::to_vec(&status).expect("serializes"))
        }
    }

    pub fn offline(&self) -> Out {
        self.publish(Topic::Status(self.cfg.device_id.clone()), &self.status(Liveness::Offline, time::now()))
    }

    fn meta(&self) -> Meta {
        Meta {
            v: CONTRACT_VERSION,
            device_id: self.cfg.device_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            hostname: self.identity.hostname.clone(),
            os: self.identity.os.clone(),
            arch: self.identity.arch.into(),
            kernel: self.identity.kernel.clone(),
            boot_id: self.identity.boot_id.clone(),
            groups: self.runtime.groups.clone(),
            labels: self.cfg.labels.clone(),
            commands: Verb::ALL.iter().map(|v| v.as_str().to_owned()).collect(),
        }
    }

    fn command_filters(&self) -> Vec<String> {
        self.cfg.topics.command_filters(&self.cfg.device_id, &self.runtime.groups)
    }

    /// Everything retained, as published on every (re)connect and on `refresh`.
    fn retained_facts(&self, now_ms: i64) -> Vec<Out> {
        let dev = &self.cfg.device_id;
        let mut out = vec![
            self.publish(Topic::Meta(dev.clone()), &self.meta()),
            self.publish(Topic::Cfg(dev.clone()), &CfgMessage { v: CONTRACT_VERSION, cfg: self.runtime.clone() }),
            self.publish(Topic::StatePackages(dev.clone()), &self.packages_state()),
            self.units_message(),
        ];
        for e in self.journal.entries() {
            if e.retained {
                out.push(self.publish(Topic::Op(dev.clone(), e.record.id.clone()), &e.record));
            } else if e.unretained_at.is_some_and(|t| now_ms - t < RESEND_CLEARS_MS) {
                out.push(self.clear(&e.record.id));
            }
        }
        out
    }

    fn packages_state(&self) -> PackagesState {
        PackagesState {
            v: CONTRACT_VERSION,
            ts: time::now(),
            packages: self.dpkg.packages_state(&self.managed.names(&self.cfg.packages)),
        }
    }

    /// A connection was established at `since`: subscribe, then republish every retained fact,
    /// including operation results produced while the connection was down.
    pub fn on_connected(&mut self, since: String, now_ms: i64) -> Vec<Out> {
        let mut out = vec![Out::Subscribe(self.command_filters())];
        out.push(
            self.publish(Topic::Status(self.cfg.device_id.clone()), &self.status(Liveness::Online, since.clone())),
        );
        self.connected_since = Some(since);
        out.extend(self.retained_facts(now_ms));
        out
    }

    pub fn on_disconnected(&mut self) {
        self.connected_since = None;
    }

    pub fn telemetry(&self, msg: &Telemetry) -> Out {
        self.publish(Topic::Telemetry(self.cfg.device_id.clone()), msg)
    }

    pub fn logs(&self, batch: &debfleet_protocol::LogBatch) -> Out {
        self.publish(Topic::Logs(self.cfg.device_id.clone()), batch)
    }

    /// Expires finished operation records (age and count limits).
    pub fn housekeeping(&mut self, now_ms: i64) -> Vec<Out> {
        let keep_ms = (self.cfg.ops.keep_finished_s as i64).saturating_mul(1000);
        let due = self.journal.due_for_unretain(now_ms, keep_ms, self.cfg.ops.max_retained);
        self.unretain_all(&due, now_ms)
    }

    fn unretain_all(&mut self, ids: &[OpId], now_ms: i64) -> Vec<Out> {
        let mut out = Vec::new();
        for id in ids {
            match self.journal.unretain(id, now_ms) {
                Ok(true) => out.push(self.clear(id)),
                Ok(false) => {}
                Err(e) => tracing::error!("{e}"),
            }
        }
        out
    }

    /// How many messages wait in the outbox (the edge tells before each command).
    pub fn set_backlog(&mut self, n: usize) {
        self.backlog = n;
    }

    fn rejected(&self, topic: &str, code: ErrorCode, message: String, now_ms: i64) -> Out {
        let r =
            Rejected { v: CONTRACT_VERSION, ts: time::format_unix_ms(now_ms), topic: topic.to_owned(), code, message };
        let mut out = self.publish(Topic::Rejected(self.cfg.device_id.clone()), &r);
        if let Out::Publish { retain, .. } = &mut out {
            *retain = false;
        }
        out
    }

    fn publish_op(&self, id: &OpId) -> Out {
        let record = &self.journal.get(id).expect("journaled").record;
        self.publish(Topic::Op(self.cfg.device_id.clone(), id.clone()), record)
    }
}

#[cfg(test)]
pub(super) mod tests {
    pub(super) use super::*;
    pub(super) use crate::jobs::{JobDone, JobKind};
    pub(super) use debfleet_protocol::{OpRecord, PackageSpec};
    pub(super) use serde_json::Value;

    pub(super) struct Fixture {
        pub(super) _dir: tempfile::TempDir,
        pub(super) core: Core,
    }

    /// dpkg as the core tests want it: bash installed, nothing else.
    #[derive(Default)]
    struct FakeDpkg;

    impl PackageDb for FakeDpkg {
        fn packages_state(&self, wanted: &[String]) -> BTreeMap<String, debfleet_protocol::PackageState> {
            wanted
                .iter()
                .map(|w| {
                    let installed = w == "bash";
                    let state = debfleet_protocol::PackageState {
                        version: installed.then(|| "5.2.15-2+b8".to_owned()),
                        arch: installed.then(|| "amd64".to_owned()),
                        status: if installed { "installed" } else { "not-installed" }.into(),
                        held: false,
                    };
                    (w.clone(), state)
                })
                .collect()
        }

        fn package_units(&self, _name: &str) -> Vec<String> {
            Vec::new()
        }
    }

    pub(super) fn fixture(under_systemd: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "device_id = \"d1\"\nbroker = \"mqtt://127.0.0.1:1\"\nstate_dir = \"{}\"\ngroups = [\"lab\"]\npackages = [\"bash\"]\n",
            dir.path().display()
        );
        let cfg = AgentConfig::parse(&text).unwrap();
        let (journal, _) = Journal::open(&cfg.state_dir.join("ops"), 4, 0).unwrap();
        let identity = Identity::read();
        let dpkg = Arc::new(FakeDpkg::default());
        Fixture { core: Core::new(cfg, journal, identity, under_systemd, None, dpkg), _dir: dir }
    }

    pub(super) fn publishes(outs: &[Out]) -> Vec<(String, Value, bool)> {
        outs.iter()
            .filter_map(|o| match o {
                Out::Publish { topic, payload, retain, .. } => {
                    let v = if payload.is_empty() { Value::Null } else { serde_json::from_slice(payload).unwrap() };
                    Some((topic.clone(), v, *retain))
                }
                _ => None,
            })
            .collect()
    }

    pub(super) fn op_states(outs: &[Out], id: &str) -> Vec<OpRecord> {
        publishes(outs)
            .into_iter()
            .filter(|(t, _, _)| t == &format!("debfleet/device/d1/op/{id}"))
            .map(|(_, v, _)| serde_json::from_value(v).unwrap())
            .collect()
    }
    #[test]
    fn connect_subscribes_and_publishes_retained_facts() {
        let mut f = fixture(false);
        let outs = f.core.on_connected("2026-01-01T00:00:00.000Z".into(), 0);
        assert_eq!(
            outs[0],
            Out::Subscribe(vec![
                "debfleet/device/d1/cmd/+".into(),
                "debfleet/fleet/cmd/+".into(),
                "debfleet/group/lab/cmd/+".into()
            ])
        );
        let topics: Vec<String> = publishes(&outs)
            .into_iter()
            .map(|(t, _, r)| {
                assert!(r);
                t
            })
            .collect();
        for suffix in ["status", "meta", "cfg", "state/packages"] {
            assert!(topics.contains(&format!("debfleet/device/d1/{suffix}")), "{suffix}");
        }
        let status = &publishes(&outs)[0].1;
        assert_eq!(status["state"], "online");
        assert_eq!(status["since"], "2026-01-01T00:00:00.000Z");
    }
}
