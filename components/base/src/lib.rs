//! The component contract: a component implements [`Component`]; [`run`] does everything
//! else — it connects to the device's agent over the local socket (never to the broker),
//! publishes the component's meta, status, state and configuration, checks every call's
//! arguments against the action's parameters before the component sees them, answers with
//! the same error codes as device commands, keeps the configuration across restarts, and
//! streams logs and telemetry as the configuration's `logs` and `telemetry` keys say.
//!
//! A component's own work (an LED effect's frames, a serial line) goes on while the agent is
//! away: the runtime reconnects and publishes its facts again.

mod gate;
mod link;
pub mod png;
mod runtime;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use debfleet_protocol::component::{parse_color, ActionSpec, ComponentMeta, ComponentState, ParamKind, ParamSpec};
pub use debfleet_protocol::ids::{ActionName, ComponentId, DeviceId};
pub use debfleet_protocol::{ErrorCode, CONTRACT_VERSION};
pub use gate::{merge, Level};
pub use runtime::{run, Options};
pub use serde_json::{json, Map, Value};

/// A failed call: the code (as for device commands) and what went wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct CallError {
    pub code: ErrorCode,
    pub message: String,
}

impl CallError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> CallError {
        CallError { code, message: message.into() }
    }

    /// An argument the parameter table lets through but the component cannot take (a range
    /// past the strip's end).
    pub fn invalid(message: impl Into<String>) -> CallError {
        CallError::new(ErrorCode::InvalidValue, message)
    }

    /// The hardware is not there or does not answer.
    pub fn unavailable(message: impl Into<String>) -> CallError {
        CallError::new(ErrorCode::ComponentUnavailable, message)
    }
}

/// One component. Every method runs on the runtime's one thread, so none needs locking; none
/// may block for long (a serial read waits at most its timeout).
pub trait Component {
    /// What it is and can do: id, version, actions with their parameters, metrics.
    fn meta(&self) -> ComponentMeta;

    /// The configuration's defaults (the component's own keys; the runtime adds `logs` and
    /// `telemetry`). What an operator sets is merged over them.
    fn default_cfg(&self) -> Map<String, Value>;

    /// Applies a whole configuration (defaults merged with what was set). An error leaves the
    /// previous configuration in force and is the caller's answer; unknown keys are errors.
    fn configure(&mut self, cfg: &Map<String, Value>, ctx: &mut Ctx) -> Result<(), String>;

    /// Starts the work; called once after the first `configure`. Report the state with
    /// [`Ctx::set_status`].
    fn start(&mut self, ctx: &mut Ctx);

    /// Stops the work (the unit is stopping): leave the hardware safe (a dark strip).
    fn stop(&mut self, ctx: &mut Ctx);

    /// Runs one action; its arguments already match the action's parameters.
    fn call(&mut self, action: &str, args: &Map<String, Value>, ctx: &mut Ctx) -> Result<Value, CallError>;

    /// The state it reports (retained): what it is doing, with the parameters.
    fn state(&self) -> Map<String, Value>;

    /// The work between calls (the next frame); returns how long until it wants the next
    /// tick, `None` for "only when something happens" (the runtime still ticks once a second).
    fn tick(&mut self, _now: Instant, _ctx: &mut Ctx) -> Option<Duration> {
        None
    }

    /// The current value of each metric named in the meta (sampled as telemetry is due).
    fn metrics(&mut self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
}

/// What a component sees of its surroundings, and how it reports.
pub struct Ctx {
    device: Option<DeviceId>,
    state_dir: PathBuf,
    status: (ComponentState, Option<String>),
    status_changed: bool,
    logs: Vec<(Level, String)>,
    samples: Vec<(String, Value)>,
    /// Samples in the current quarter second, and those dropped (over the rate, too big, or no
    /// agent).
    sample_window: Option<(Instant, u32)>,
    samples_dropped: u64,
    waker: Waker,
}

/// At most this many stream samples a second leave a component: the agent ends a connection
/// that sends more than 200 frames in a second, and a device's link is small. Counted in
/// quarter seconds, so that no second, however it falls, carries more than 125.
pub const MAX_SAMPLES_PER_S: u32 = 100;
const SAMPLE_WINDOW: Duration = Duration::from_millis(250);

/// Wakes the runtime's loop from a component's own thread (a ROS callback, a serial reader), so
/// [`Component::tick`] runs at once instead of at the next timer.
#[derive(Clone)]
pub struct Waker(std::sync::mpsc::Sender<(u64, link::Incoming)>);

impl Waker {
    pub fn wake(&self) {
        // The loop is gone only when the process is stopping.
        let _ = self.0.send((0, link::Incoming::Wake));
    }
}

impl Ctx {
    fn new(state_dir: PathBuf, waker: Waker) -> Ctx {
        Ctx {
            device: None,
            state_dir,
            status: (ComponentState::Idle, None),
            status_changed: true,
            logs: Vec::new(),
            samples: Vec::new(),
            sample_window: None,
            samples_dropped: 0,
            waker,
        }
    }

    /// A context without an agent, for a component's own tests.
    pub fn for_tests() -> Ctx {
        Ctx::new(std::env::temp_dir(), Waker(std::sync::mpsc::channel().0))
    }

    /// A handle that wakes the loop (see [`Waker`]).
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// A sample of the named stream, sent as it is (`device/ID/components/CID/stream`). Beyond
    /// [`MAX_SAMPLES_PER_S`] a second, or too big for a frame, samples are dropped and counted
    /// ([`Ctx::samples_dropped`]).
    pub fn sample(&mut self, stream: &str, value: Value, now: Instant) {
        let (start, n) = self.sample_window.get_or_insert((now, 0));
        if now.duration_since(*start) >= SAMPLE_WINDOW {
            (*start, *n) = (now, 0);
        }
        let size = serde_json::to_vec(&value).map_or(usize::MAX, |b| b.len()) + stream.len();
        if *n >= MAX_SAMPLES_PER_S / 4 || size > debfleet_protocol::component::MAX_FRAME_BYTES - 1024 {
            self.samples_dropped += 1;
            return;
        }
        *n += 1;
        self.samples.push((stream.to_owned(), value));
    }

    /// Samples dropped so far: over the rate, or taken while no agent was there.
    pub fn samples_dropped(&self) -> u64 {
        self.samples_dropped
    }

    /// The device's id, once the agent has welcomed the component.
    pub fn device(&self) -> Option<&DeviceId> {
        self.device.as_ref()
    }

    /// The component's own directory for what it keeps (systemd's `StateDirectory=`).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Reports the lifecycle state (published when it changes).
    pub fn set_status(&mut self, state: ComponentState, message: Option<String>) {
        if self.status != (state, message.clone()) {
            self.status = (state, message);
            self.status_changed = true;
        }
    }

    pub fn status(&self) -> ComponentState {
        self.status.0
    }

    /// A log line: to stderr (the journal) always, to the broker as the `logs` key allows.
    pub fn log(&mut self, level: Level, msg: impl Into<String>) {
        let msg = msg.into();
        eprintln!("{}: {msg}", level.as_str());
        if self.logs.len() < 1000 {
            self.logs.push((level, msg));
        }
    }
}
