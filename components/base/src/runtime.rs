//! The loop every component runs in: one thread for the component and the socket's writes, a
//! reader thread per connection, a channel between them. It owns the configuration (defaults,
//! what was set, kept on disk), checks calls against the parameter table, and publishes what
//! changed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use debfleet_protocol::component::{
    CallResult, ComponentMeta, ComponentStatus, ComponentStream, Down, Up, SOCKET_PATH,
};
use debfleet_protocol::ids::ActionName;
use debfleet_protocol::{ErrorCode, OpError, CONTRACT_VERSION};
use serde_json::{Map, Value};

use crate::gate::{merge, LogGate, MetricGate, Streams};
use crate::link::{Incoming, Link};
use crate::{ActionSpec, CallError, Component, Ctx};

/// Where the runtime connects and keeps the configuration.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
}

impl Options {
    /// `DEBFLEET_SOCKET` (default the agent's socket) and systemd's `STATE_DIRECTORY` (default
    /// `/var/lib/debfleet-ID`).
    pub fn from_env(meta: &ComponentMeta) -> Options {
        let socket = std::env::var_os("DEBFLEET_SOCKET").map(PathBuf::from).unwrap_or_else(|| SOCKET_PATH.into());
        let state_dir = std::env::var("STATE_DIRECTORY")
            .ok()
            .and_then(|s| s.split(':').next().map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/debfleet-{}", meta.component)));
        Options { socket, state_dir }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Runs the component until SIGTERM or SIGINT, then stops it (so the hardware is left safe).
pub fn run<C: Component>(component: C) {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
    let meta = component.meta();
    let options = Options::from_env(&meta);
    let mut rt = Runtime::new(component, options);
    rt.start();
    while !STOP.load(Ordering::SeqCst) {
        rt.turn(Instant::now());
    }
    rt.stop();
}

/// How long the loop sleeps at most, so a stop request is seen promptly.
const MAX_WAIT: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub(crate) struct Runtime<C: Component> {
    c: C,
    meta: ComponentMeta,
    options: Options,
    ctx: Ctx,
    /// What was set (kept in `cfg.json`), and the whole configuration in force.
    set: Value,
    cfg: Map<String, Value>,
    streams: Streams,
    logs: LogGate,
    metrics: MetricGate,
    link: Option<Link>,
    welcomed: bool,
    generation: u64,
    next_connect: Instant,
    backoff: Duration,
    warned: bool,
    tx: Sender<(u64, Incoming)>,
    rx: Receiver<(u64, Incoming)>,
    next_tick: Instant,
    next_check: Instant,
    sent_state: Option<Map<String, Value>>,
    sent_cfg: Option<Map<String, Value>>,
    sent_telemetry: Option<debfleet_protocol::component::ComponentTelemetry>,
}

impl<C: Component> Runtime<C> {
    pub(crate) fn new(c: C, options: Options) -> Runtime<C> {
        let mut meta = c.meta();
        meta.actions.extend(builtin_actions());
        let (tx, rx) = channel();
        let now = Instant::now();
        let ctx = Ctx::new(options.state_dir.clone(), crate::Waker(tx.clone()));
        let streams = Streams::from_cfg(&Map::new(), &meta.metrics)
            .unwrap_or_else(|_| Streams { logs: crate::gate::default_logs(), telemetry: Default::default() });
        Runtime {
            c,
            meta,
            options,
            ctx,
            set: Value::Object(Map::new()),
            cfg: Map::new(),
            streams,
            logs: LogGate::default(),
            metrics: MetricGate::default(),
            link: None,
            welcomed: false,
            generation: 0,
            next_connect: now,
            backoff: Duration::from_millis(250),
            warned: false,
            tx,
            rx,
            next_tick: now,
            next_check: now,
            sent_state: None,
            sent_cfg: None,
            sent_telemetry: None,
        }
    }

    fn cfg_file(&self) -> PathBuf {
        self.options.state_dir.join("cfg.json")
    }

    /// The kept configuration applied (or the defaults, when it is unreadable or refused), then
    /// the component started.
    pub(crate) fn start(&mut self) {
        let file = self.cfg_file();
        let kept = match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    self.ctx
                        .log(crate::Level::Error, format!("{}: not a JSON object; the defaults apply", file.display()));
                    Value::Object(Map::new())
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Object(Map::new()),
            Err(e) => {
                self.ctx.log(crate::Level::Error, format!("{}: {e}; the defaults apply", file.display()));
                Value::Object(Map::new())
            }
        };
        if let Err(e) = self.apply(kept.clone()) {
            self.ctx.log(crate::Level::Error, format!("the kept configuration was refused ({e}); the defaults apply"));
            if let Err(e) = self.apply(Value::Object(Map::new())) {
                self.ctx.log(crate::Level::Error, format!("the default configuration was refused: {e}"));
            }
        }
        self.c.start(&mut self.ctx);
    }

    /// Applies `set` (what an operator set, merged over the defaults): all or nothing.
    fn apply(&mut self, set: Value) -> Result<(), String> {
        let mut whole = Value::Object(self.c.default_cfg());
        merge(&mut whole, &set);
        let Value::Object(whole) = whole else { return Err("the configuration must be an object".into()) };
        let streams = Streams::from_cfg(&whole, &self.meta.metrics)?;
        let mut own = whole.clone();
        own.remove("logs");
        own.remove("telemetry");
        self.c.configure(&own, &mut self.ctx)?;
        self.streams = streams;
        self.set = set;
        self.cfg = whole;
        Ok(())
    }

    /// A patch from the `cfg` action: applied, kept on disk, the whole configuration returned.
    fn patch(&mut self, patch: &Map<String, Value>) -> Result<Value, CallError> {
        let mut set = self.set.clone();
        merge(&mut set, &Value::Object(patch.clone()));
        let before = (self.set.clone(), self.cfg.clone());
        self.apply(set).map_err(|e| CallError::invalid(format!("cfg: {e}")))?;
        if let Err(e) = write_atomic(&self.cfg_file(), &self.set) {
            // Not kept means not applied: a restart would silently undo it.
            let (set, _) = before;
            let _ = self.apply(set);
            return Err(CallError::new(ErrorCode::Internal, format!("keeping the configuration: {e}")));
        }
        Ok(Value::Object(self.cfg.clone()))
    }

    pub(crate) fn stop(&mut self) {
        self.c.stop(&mut self.ctx);
        self.flush(Instant::now());
    }

    /// One turn of the loop: connect if due, wait for a frame or the next tick, do what is due.
    pub(crate) fn turn(&mut self, now: Instant) {
        if self.link.is_none() && now >= self.next_connect {
            self.connect(now);
        }
        let wait = self.next_tick.saturating_duration_since(now).min(MAX_WAIT);
        match self.rx.recv_timeout(wait) {
            Ok((_, Incoming::Wake)) => self.next_tick = Instant::now(),
            Ok((generation, incoming)) if generation == self.generation => self.incoming(incoming, Instant::now()),
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {}
        }
        let now = Instant::now();
        if now >= self.next_tick {
            let next = self.c.tick(now, &mut self.ctx).unwrap_or(Duration::from_secs(1));
            self.next_tick = now + next.max(Duration::from_millis(1));
        }
        self.flush(now);
    }

    fn connect(&mut self, now: Instant) {
        self.generation += 1;
        match Link::open(&self.options.socket, &self.meta, self.generation, self.tx.clone()) {
            Ok(link) => {
                self.link = Some(link);
                self.backoff = Duration::from_millis(250);
                self.warned = false;
            }
            Err(e) => {
                // Said once per outage, not at every retry.
                if !std::mem::replace(&mut self.warned, true) {
                    eprintln!("warn: the agent's socket {}: {e}; retrying", self.options.socket.display());
                }
                self.next_connect = now + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    fn disconnected(&mut self, now: Instant, after: Duration) {
        self.link = None;
        self.welcomed = false;
        self.next_connect = now + after;
    }

    fn incoming(&mut self, incoming: Incoming, now: Instant) {
        match incoming {
            Incoming::Frame(Down::Welcome { device }) => {
                self.ctx.device = Some(device);
                self.welcomed = true;
                // Everything retained goes again: the agent may be new, or its broker.
                self.ctx.status_changed = true;
                self.sent_state = None;
                self.sent_cfg = None;
                if let Some(t) = self.sent_telemetry.clone() {
                    self.send(&Up::Telemetry { telemetry: t });
                }
            }
            Incoming::Frame(Down::Call { id, action, args }) => {
                let result = match self.call(&action, &args) {
                    Ok(v) => CallResult::Ok(v),
                    Err(e) => CallResult::Err(OpError { code: e.code, message: e.message }),
                };
                self.send(&Up::Result { id, result });
                self.next_check = now;
            }
            Incoming::Frame(Down::Bye { reason }) => {
                self.ctx.log(crate::Level::Error, format!("the agent refused this component: {reason}"));
                self.disconnected(now, MAX_BACKOFF);
            }
            Incoming::Closed(why) => {
                eprintln!("warn: {why}; reconnecting");
                self.disconnected(now, Duration::from_millis(250));
            }
            Incoming::Wake => self.next_tick = now,
        }
    }

    /// The built-in actions, then the component's own after checking the arguments.
    pub(crate) fn call(&mut self, action: &ActionName, args: &Map<String, Value>) -> Result<Value, CallError> {
        match action.as_str() {
            "cfg" => self.patch(args),
            "state" => Ok(Value::Object(self.c.state())),
            name => {
                let spec = self.meta.action(name).ok_or_else(|| {
                    let known: Vec<&str> = self.meta.actions.iter().map(|a| a.name.as_str()).collect();
                    CallError::new(
                        ErrorCode::UnknownAction,
                        format!("{} has no action {name:?} (it has {})", self.meta.component, known.join(", ")),
                    )
                })?;
                spec.check(args).map_err(CallError::invalid)?;
                self.c.call(name, args, &mut self.ctx)
            }
        }
    }

    /// Publishes what changed: status, state, configuration, telemetry, logs.
    fn flush(&mut self, now: Instant) {
        for (level, msg) in std::mem::take(&mut self.ctx.logs) {
            self.logs.push(&self.streams.logs, now, level, self.meta.component.as_str(), &msg);
        }
        if !self.welcomed {
            // Samples are live data: kept for no one.
            self.ctx.samples_dropped += self.ctx.samples.len() as u64;
            self.ctx.samples.clear();
            return;
        }
        if std::mem::take(&mut self.ctx.status_changed) {
            let (state, message) = self.ctx.status.clone();
            let status = ComponentStatus { v: CONTRACT_VERSION, state, since: debfleet_protocol::time::now(), message };
            self.send(&Up::Status { status });
        }
        if now >= self.next_check {
            self.next_check = now + Duration::from_secs(1);
            let state = self.c.state();
            if self.sent_state.as_ref() != Some(&state) {
                self.send(&Up::State { state: state.clone() });
                self.sent_state = Some(state);
            }
            if self.sent_cfg.as_ref() != Some(&self.cfg) {
                self.send(&Up::Cfg { cfg: self.cfg.clone() });
                self.sent_cfg = Some(self.cfg.clone());
            }
        }
        if self.metrics.due(&self.streams.telemetry, now) {
            let sample = self.c.metrics();
            if let Some(t) = self.metrics.offer(&self.streams.telemetry, now, &sample) {
                self.send(&Up::Telemetry { telemetry: t.clone() });
                self.sent_telemetry = Some(t);
            }
        }
        for (stream, value) in std::mem::take(&mut self.ctx.samples) {
            let sample = ComponentStream { v: CONTRACT_VERSION, ts: debfleet_protocol::time::now(), stream, value };
            self.send(&Up::Stream { sample });
        }
        if let Some(batch) = self.logs.batch(&self.streams.logs, now) {
            self.send(&Up::Logs { logs: batch });
        }
    }

    fn send(&mut self, up: &Up) {
        let Some(link) = self.link.as_mut() else { return };
        if let Err(e) = link.send(up) {
            eprintln!("warn: writing to the agent: {e}; reconnecting");
            self.disconnected(Instant::now(), Duration::from_millis(250));
        }
    }
}

fn builtin_actions() -> Vec<ActionSpec> {
    let name = |s: &str| ActionName::new(s).expect("a valid action name");
    vec![
        ActionSpec {
            name: name("cfg"),
            help: "change the configuration: key=value (null puts a key back to its default); answers the whole configuration".into(),
            params: Vec::new(),
        },
        ActionSpec { name: name("state"), help: "the component's state".into(), params: Vec::new() },
    ]
}

fn write_atomic(path: &std::path::Path, v: &Value) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
#[path = "runtime_tests.rs"]
mod tests;
