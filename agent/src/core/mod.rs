//! The agent's logic: what to publish on connect, how each command runs, when records expire.
//! It never touches the network; it returns [`Out`] actions for the connection edge to carry
//! out, so tests drive it by feeding messages.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use debfleet_protocol::topics::ComponentFact;
use debfleet_protocol::{
    time, CfgMessage, ErrorCode, Liveness, Meta, OpId, PackagesState, Rejected, RuntimeCfg, Status, Telemetry, Topic,
    TrafficClass, UnitInfo, Verb, CONTRACT_VERSION,
};
use serde::Serialize;

use crate::config::{AgentConfig, Overrides};
use crate::identity::Identity;
use crate::jobs::{Job, JobDone};
use crate::journal::{Journal, RESEND_CLEARS_MS};
use crate::link::Link;
use crate::logs::LogGate;
use crate::managed::Managed;
use crate::spool::Spool;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        reliable: bool,
        class: TrafficClass,
    },
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    /// The connection settings changed (`link.keepalive_s`, `link.persistent_session`):
    /// reconnect with them.
    Relink(crate::connection::Settings),
    /// Stop the agent; systemd starts it again.
    Restart,
    /// A frame for a component's connection; `close` ends the connection after it.
    Component {
        conn: u64,
        frame: debfleet_protocol::component::Down,
        close: bool,
    },
    /// Stop the running job with this id if it has not changed anything yet (a converge job
    /// between its download and its install: it ends as `superseded`); past that it finishes.
    Cancel(OpId),
    /// Start or stop a remote session (the edge moves its bytes: `remote.rs`).
    Session(sessions::SessionOrder),
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
    /// The installed packages that ship a component.
    fn components(&self) -> Vec<debfleet_apt::dpkg::InstalledComponent> {
        Vec::new()
    }
}

impl PackageDb for debfleet_apt::dpkg::Database {
    fn packages_state(&self, wanted: &[String]) -> BTreeMap<String, debfleet_protocol::PackageState> {
        debfleet_apt::dpkg::Database::packages_state(self, wanted)
    }

    fn package_units(&self, name: &str) -> Vec<String> {
        debfleet_apt::dpkg::Database::package_units(self, name)
    }

    fn components(&self) -> Vec<debfleet_apt::dpkg::InstalledComponent> {
        debfleet_apt::dpkg::Database::components(self)
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
    /// The job handed out and not yet done (one runs at a time).
    running: Option<OpId>,
    /// Messages waiting in the outbox, as last told by the edge (bounded intake).
    backlog: usize,
    link: Arc<Link>,
    /// Telemetry and logs that could not go yet (link down, over budget); `None` when the
    /// outbox directory cannot be used (then they are dropped and counted).
    spool: Option<Spool>,
    /// When `state/link` was last reported.
    link_reported_ms: i64,
    /// The connection settings changed: report the link on the next connect.
    report_next_connect: bool,
    /// The latest telemetry view went to the outbox, not to the broker: the retained one is
    /// older, so it is published again (retained) on the next connect.
    telemetry_behind: Option<Telemetry>,
    components: components::Components,
    desired: desired::Desired,
    /// The local time zone's offset from UTC at a time (install windows are local); fixed in tests.
    local_offset: fn(i64) -> i64,
    /// `require_signed_commands`: the keys trusted and the signed ids seen.
    trust: Option<crate::operators::Trust>,
    sessions: sessions::Sessions,
}

/// Over these, a new command is answered with `busy` instead of being accepted.
pub const MAX_BACKLOG: usize = 1000;
pub const MAX_JOBS_PENDING: usize = 32;

mod commands;
mod components;
mod desired;
mod link;
mod packages;
pub mod sessions;

/// Everything the agent's loop reacts to, as the core sees it: one closed set. What needs IO
/// (sampling telemetry, reading the log queue) the edge does first and hands in.
pub enum Event {
    /// A connection is up; `since` is when it started (also in its last will). Whether the
    /// broker kept the session is in the shared [`Link`].
    Connected {
        since: String,
    },
    /// The connection broke; `unsent` are the telemetry and log messages it left in the
    /// outbox (they go to the on-disk outbox).
    Disconnected {
        unsent: Vec<crate::spool::Spooled>,
    },
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
    /// A frame from a component's connection (`pid`: its process, from the socket).
    Component {
        conn: u64,
        pid: Option<u32>,
        frame: debfleet_protocol::component::Up,
    },
    /// A component's connection ended.
    ComponentClosed {
        conn: u64,
    },
    /// A remote session got ready or ended (`remote.rs`).
    Session(sessions::SessionEvent),
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
            Event::Disconnected { unsent } => {
                self.on_disconnected();
                for m in unsent {
                    self.spool_push(m);
                }
                self.stop_sessions("the device's connection to the broker broke")
            }
            Event::Session(e) => self.on_session(e, now_ms),
            Event::Message { topic, payload, retain } => self.on_message(&topic, &payload, retain, now_ms),
            Event::Tick { telemetry, logs, housekeeping } => {
                let mut out: Vec<Out> = telemetry.iter().filter_map(|t| self.telemetry(t)).collect();
                out.extend(logs.iter().filter_map(|b| self.logs(b)));
                out.extend(self.drain(now_ms));
                out.extend(self.call_deadlines(now_ms));
                out.extend(self.desired_tick(now_ms));
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
            Event::Component { conn, pid, frame } => self.on_component(conn, pid, frame, now_ms),
            Event::ComponentClosed { conn } => self.on_component_closed(conn, now_ms),
        }
    }

    /// Hands out the next queued job when none runs. Queued jobs whose command expired while
    /// they waited end as `expired` instead.
    fn next_job(&mut self) -> Vec<Out> {
        let mut out = Vec::new();
        if self.running.is_some() {
            return out;
        }
        let now_ms = time::now_unix_ms();
        while let Some(job) = self.jobs.pop_front() {
            if job.expires_at.is_some_and(|t| now_ms >= t) {
                out.extend(self.expire(&job.id, job.expires_at.unwrap_or(now_ms), now_ms));
                continue;
            }
            self.running = Some(job.id.clone());
            out.push(Out::Job(job));
            break;
        }
        out
    }

    /// Records an operation as expired (not run) and publishes its record.
    fn expire(&mut self, id: &OpId, expires_at: i64, now_ms: i64) -> Vec<Out> {
        let message = format!(
            "the command expired at {} and was not run (the device had it at {})",
            time::format_unix_ms(expires_at),
            time::format_unix_ms(now_ms)
        );
        tracing::warn!(op = %id, "{message}");
        let err = debfleet_protocol::OpError { code: ErrorCode::Expired, message };
        if let Err(e) = self.journal.finish(id, now_ms, Err(err)) {
            tracing::error!("{e}");
        }
        vec![self.publish_op(id)]
    }

    /// Jobs to finish first after a start (transactions a transient unit carried meanwhile).
    pub fn resume(&mut self, jobs: Vec<Job>) -> Vec<Out> {
        self.jobs.extend(jobs);
        self.next_job()
    }

    fn jobs_pending(&self) -> usize {
        self.jobs.len() + usize::from(self.running.is_some())
    }
    pub fn new(
        cfg: AgentConfig,
        journal: Journal,
        identity: Identity,
        under_systemd: bool,
        log_gate: Option<Arc<LogGate>>,
        dpkg: Arc<dyn PackageDb>,
        link: Arc<Link>,
    ) -> Core {
        let cfg_state_dir = cfg.state_dir.clone();
        let signed = cfg.signed_commands.clone();
        let mut overrides = Overrides::load(&cfg.state_dir);
        let runtime = overrides.effective(&cfg.file_patch);
        let runtime_groups = runtime.groups.clone();
        let spool = match Spool::open(&cfg.state_dir.join("outbox"), u64::from(runtime.outbox.max_kb) * 1024) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("the on-disk outbox is unusable ({e}); telemetry and logs are dropped while offline");
                None
            }
        };
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
            running: None,
            backlog: 0,
            link,
            spool,
            // The first periodic report comes `link.report_s` after the start.
            link_reported_ms: time::now_unix_ms(),
            telemetry_behind: None,
            report_next_connect: false,
            components: Default::default(),
            desired: desired::Desired::load(&cfg_state_dir, &runtime_groups, signed.is_some()),
            local_offset: crate::localtime::utc_offset_s,
            trust: signed.map(|dir| crate::operators::Trust::new(&dir, &cfg_state_dir)),
            sessions: Default::default(),
        }
    }

    pub fn runtime(&self) -> &RuntimeCfg {
        &self.runtime
    }

    fn topic(&self, t: Topic) -> String {
        self.cfg.topics.name(&t)
    }

    /// A publish as the contract's table says the topic travels (retain, QoS), in the class
    /// its topic implies (operation records: see [`Core::publish_op`]).
    fn publish<T: Serialize>(&self, t: Topic, payload: &T) -> Out {
        let (retain, qos) = t.delivery();
        let class = match t {
            Topic::Telemetry(_)
            | Topic::Component(_, _, ComponentFact::Telemetry)
            | Topic::Component(_, _, ComponentFact::Stream) => TrafficClass::Telemetry,
            Topic::Logs(_) | Topic::Component(_, _, ComponentFact::Logs) => TrafficClass::Logs,
            Topic::Rejected(_) => TrafficClass::Ack,
            Topic::StateLink(_) => TrafficClass::Control,
            _ => TrafficClass::Result,
        };
        Out::Publish {
            topic: self.topic(t),
            payload: serde_json::to_vec(payload).expect("payload serializes"),
            retain,
            reliable: qos == debfleet_protocol::topics::Qos::AtLeastOnce,
            class,
        }
    }

    fn clear(&self, id: &OpId) -> Out {
        Out::Publish {
            topic: self.topic(Topic::Op(self.cfg.device_id.clone(), id.clone())),
            payload: Vec::new(),
            retain: true,
            reliable: true,
            class: TrafficClass::Result,
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
        out.extend(self.component_facts());
        out.extend(self.desired_fact());
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
    /// including operation results produced while the connection was down. Into a session the
    /// broker kept (`link.persistent_session`), the subscriptions are already there and, with
    /// `link.skip_unchanged`, only the facts that differ from what the broker got are sent.
    /// The status always goes: the last will may have replaced it.
    pub fn on_connected(&mut self, since: String, now_ms: i64) -> Vec<Out> {
        let filters = self.command_filters();
        let mut out = Vec::new();
        if !(self.runtime.link.persistent_session && self.link.subscribed_to(&filters)) {
            out.push(Out::Subscribe(filters.clone()));
        }
        self.link.set_subscribed(filters);
        out.push(
            self.publish(Topic::Status(self.cfg.device_id.clone()), &self.status(Liveness::Online, since.clone())),
        );
        self.connected_since = Some(since);
        let skip = self.runtime.link.skip_unchanged && self.link.session_present();
        self.forget_installed_components();
        let mut facts = self.list_components();
        facts.extend(self.retained_facts(now_ms));
        if let Some(t) = self.telemetry_behind.take() {
            facts.push(self.publish(Topic::Telemetry(self.cfg.device_id.clone()), &t));
        }
        out.extend(facts.into_iter().filter(|o| match o {
            Out::Publish { topic, payload, retain: true, .. } if skip && !payload.is_empty() => {
                !self.link.holds(topic, payload)
            }
            _ => true,
        }));
        if self.runtime.link.report_connects || std::mem::take(&mut self.report_next_connect) {
            out.push(self.link_report(now_ms));
        }
        self.desired_connected(now_ms);
        out
    }

    pub fn on_disconnected(&mut self) {
        self.connected_since = None;
    }

    /// Expires finished operation records (age and count limits); saves the link's counters.
    pub fn housekeeping(&mut self, now_ms: i64) -> Vec<Out> {
        let keep_ms = (self.cfg.ops.keep_finished_s as i64).saturating_mul(1000);
        let due = self.journal.due_for_unretain(now_ms, keep_ms, self.cfg.ops.max_retained);
        self.link.save();
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

    /// An operation's record: a final one is a result, the others acknowledgements.
    fn publish_op(&self, id: &OpId) -> Out {
        let record = &self.journal.get(id).expect("journaled").record;
        let mut out = self.publish(Topic::Op(self.cfg.device_id.clone(), id.clone()), record);
        if let Out::Publish { class, .. } = &mut out {
            *class = if record.state.is_final() { TrafficClass::Result } else { TrafficClass::Ack };
        }
        out
    }
}

#[cfg(test)]
pub(super) mod tests {
    pub(super) use super::*;
    pub(super) use crate::jobs::JobKind;
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
        fixture_with(under_systemd, "")
    }

    /// With more top-level configuration keys.
    pub(super) fn fixture_with(under_systemd: bool, extra: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "device_id = \"d1\"\nbroker = \"mqtt://127.0.0.1:1\"\nstate_dir = \"{}\"\ngroups = [\"lab\"]\npackages = [\"bash\"]\n{extra}",
            dir.path().display()
        );
        let cfg = AgentConfig::parse(&text).unwrap();
        let (journal, _) = Journal::open(&cfg.state_dir.join("ops"), 4, 0).unwrap();
        let identity = Identity::read();
        let dpkg = Arc::new(FakeDpkg::default());
        let link = Arc::new(Link::open(&cfg.state_dir, 0));
        Fixture { core: Core::new(cfg, journal, identity, under_systemd, None, dpkg, link), _dir: dir }
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
                "debfleet/desired/device/d1".into(),
                "debfleet/group/lab/cmd/+".into(),
                "debfleet/desired/group/lab".into(),
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
