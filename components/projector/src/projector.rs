//! The projector as a component: its actions, each sent as one command and acknowledged (or
//! refused, or unanswered) before the call answers; the state the projector reports when asked
//! (power, input) or by itself (warming, cooling); the port opened again when the adapter comes
//! back, `disconnected` meanwhile.

use std::time::{Duration, Instant};

use debfleet_component::{
    json, ActionSpec, CallError, Component, ComponentMeta, ComponentState, Ctx, ErrorCode, Level, Map, ParamKind,
    ParamSpec, Value, CONTRACT_VERSION,
};

use crate::dialect::{self, Command, Dialect, Reply};
use crate::port::{LineError, Port};

/// How often a missing port is looked for.
const RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq)]
struct Cfg {
    port: String,
    baud: u32,
    dialect: String,
    id: u8,
    timeout_ms: u64,
}

impl Cfg {
    fn from_map(cfg: &Map<String, Value>) -> Result<Cfg, String> {
        for k in cfg.keys() {
            if !["port", "baud", "dialect", "id", "timeout_ms"].contains(&k.as_str()) {
                return Err(format!("unknown key {k:?}"));
            }
        }
        let text = |k: &str| cfg.get(k).and_then(Value::as_str).ok_or_else(|| format!("{k}: a string"));
        let int = |k: &str, min: u64, max: u64| {
            cfg.get(k)
                .and_then(Value::as_u64)
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| format!("{k}: a whole number in {min}..={max}"))
        };
        let port = text("port")?.to_owned();
        if !port.starts_with('/') || port.len() > 256 {
            return Err(format!("port: {port:?} must be an absolute path (e.g. /dev/ttyUSB0)"));
        }
        let dialect = text("dialect")?.to_owned();
        if !dialect::DIALECTS.contains(&dialect.as_str()) {
            return Err(format!("dialect: {dialect:?} is not one of {}", dialect::DIALECTS.join(", ")));
        }
        let baud = int("baud", 1200, 115_200)? as u32;
        Ok(Cfg { port, baud, dialect, id: int("id", 0, 99)? as u8, timeout_ms: int("timeout_ms", 100, 30_000)? })
    }
}

/// What the projector is known to be doing.
#[derive(Debug, Clone, Default, PartialEq)]
struct Known {
    power: Option<&'static str>,
    input: Option<&'static str>,
    aspect: Option<&'static str>,
    keystone: Option<i32>,
    shift: (Option<i32>, Option<i32>),
}

pub struct Projector {
    cfg: Option<Cfg>,
    dialect: Box<dyn Dialect>,
    port: Option<Port>,
    /// Why the port is not open.
    down: Option<String>,
    next_try: Option<Instant>,
    known: Known,
    /// Commands sent and acknowledged, refused, unanswered (metrics).
    counts: [u64; 3],
}

impl Default for Projector {
    fn default() -> Self {
        Projector::new()
    }
}

fn choice(words: &[&str]) -> ParamKind {
    ParamKind::Choice { values: words.iter().map(|w| (*w).to_owned()).collect() }
}

impl Projector {
    pub fn new() -> Projector {
        Projector {
            cfg: None,
            dialect: Box::new(dialect::Optoma { id: 0 }),
            port: None,
            down: Some("not opened yet".into()),
            next_try: None,
            known: Known::default(),
            counts: [0; 3],
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.as_ref().map_or(2000, |c| c.timeout_ms))
    }

    /// Opens the port (when it is due) and asks the projector what it is doing.
    fn connect(&mut self, now: Instant, ctx: &mut Ctx) {
        if self.port.is_some() || self.next_try.is_some_and(|t| now < t) {
            return;
        }
        let Some(cfg) = self.cfg.clone() else { return };
        self.next_try = Some(now + RETRY);
        match Port::open(&cfg.port, cfg.baud) {
            Ok(p) => {
                ctx.log(Level::Warn, format!("connected to {}", cfg.port));
                self.port = Some(p);
                self.down = None;
                ctx.set_status(ComponentState::Running, None);
                self.refresh(ctx);
            }
            Err(e) => self.disconnected(e, ctx),
        }
    }

    fn disconnected(&mut self, why: String, ctx: &mut Ctx) {
        if self.down.as_deref() != Some(why.as_str()) {
            ctx.log(Level::Error, format!("projector disconnected: {why}"));
        }
        self.port = None;
        self.known = Known::default();
        ctx.set_status(ComponentState::Error, Some(format!("disconnected: {why}")));
        self.down = Some(why);
    }

    /// Asks for power and input; what it does not answer stays unknown.
    fn refresh(&mut self, ctx: &mut Ctx) {
        if let Ok(Reply::Value(v)) = self.send(Command::QueryPower, ctx) {
            self.known.power = Some(self.dialect.power_word(&v));
        }
        if let Ok(Reply::Value(v)) = self.send(Command::QueryInput, ctx) {
            self.known.input = self.dialect.input_word(&v);
        }
    }

    fn apply_infos(&mut self, infos: &[u8]) {
        for i in infos {
            if let Some(w) = self.dialect.info_word(*i) {
                self.known.power = Some(w);
            }
        }
    }

    /// One command and its acknowledgement.
    fn send(&mut self, cmd: Command, ctx: &mut Ctx) -> Result<Reply, CallError> {
        let bytes = self.dialect.encode(cmd).map_err(CallError::invalid)?;
        let timeout = self.timeout();
        let Some(port) = self.port.as_mut() else {
            let why = self.down.clone().unwrap_or_default();
            return Err(CallError::unavailable(format!("the projector is disconnected: {why}")));
        };
        match port.exchange(&*self.dialect, &bytes, timeout) {
            Ok((reply, infos)) => {
                self.apply_infos(&infos);
                self.counts[if reply == Reply::Fail { 1 } else { 0 }] += 1;
                Ok(reply)
            }
            Err(LineError::Timeout) => {
                self.counts[2] += 1;
                let sent = String::from_utf8_lossy(&bytes).trim_end().to_owned();
                Err(CallError::new(
                    ErrorCode::Timeout,
                    format!("the projector did not answer {sent} within {} ms", timeout.as_millis()),
                ))
            }
            Err(LineError::Gone(why)) => {
                self.disconnected(why.clone(), ctx);
                Err(CallError::unavailable(format!("the projector is disconnected: {why}")))
            }
        }
    }

    /// A setting: sent, and taken only when the projector acknowledges it.
    fn set(&mut self, cmd: Command, ctx: &mut Ctx) -> Result<(), CallError> {
        match self.send(cmd, ctx)? {
            Reply::Pass | Reply::Value(_) => Ok(()),
            Reply::Fail => Err(CallError::new(
                ErrorCode::NotSupported,
                format!("the projector refused it ({cmd:?}): not in its current state or not on this model"),
            )),
            Reply::Info(_) => unreachable!("reports are not answers"),
        }
    }

    fn pick(words: &'static [&'static str], v: Option<&Value>) -> Option<&'static str> {
        let s = v?.as_str()?;
        words.iter().find(|w| **w == s).copied()
    }
}

impl Component for Projector {
    fn meta(&self) -> ComponentMeta {
        let d = &*self.dialect;
        let (klo, khi) = d.keystone_range();
        let (slo, shi) = d.shift_range();
        ComponentMeta {
            v: CONTRACT_VERSION,
            component: "projector".parse().expect("a valid component id"),
            version: env!("CARGO_PKG_VERSION").into(),
            actions: vec![
                ActionSpec::new(
                    "power",
                    "switch on or off (acknowledged)",
                    vec![ParamSpec::required("on", ParamKind::Bool, "true: on")],
                ),
                ActionSpec::new(
                    "input",
                    "the input source",
                    vec![ParamSpec::required("source", choice(d.inputs()), "")],
                ),
                ActionSpec::new(
                    "aspect",
                    "the aspect ratio",
                    vec![ParamSpec::required("ratio", choice(d.aspects()), "")],
                ),
                ActionSpec::new(
                    "keystone",
                    "vertical keystone correction",
                    vec![ParamSpec::required("value", ParamKind::Int { min: klo.into(), max: khi.into() }, "")],
                ),
                ActionSpec::new(
                    "shift",
                    "image shift, horizontal and vertical",
                    vec![
                        ParamSpec::optional("h", ParamKind::Int { min: slo.into(), max: shi.into() }, ""),
                        ParamSpec::optional("v", ParamKind::Int { min: slo.into(), max: shi.into() }, ""),
                    ],
                ),
                ActionSpec::new(
                    "key",
                    "a remote-control key (menu navigation)",
                    vec![ParamSpec::required("name", choice(d.keys()), "")],
                ),
                ActionSpec::new("refresh", "ask the projector for its power state and input", vec![]),
            ],
            metrics: vec!["acknowledged".into(), "refused".into(), "unanswered".into()],
        }
    }

    fn default_cfg(&self) -> Map<String, Value> {
        let v = json!({"port": "/dev/ttyUSB0", "baud": 9600, "dialect": "optoma", "id": 0, "timeout_ms": 2000});
        v.as_object().cloned().unwrap_or_default()
    }

    fn configure(&mut self, cfg: &Map<String, Value>, ctx: &mut Ctx) -> Result<(), String> {
        let new = Cfg::from_map(cfg)?;
        let dialect = dialect::by_name(&new.dialect, new.id).ok_or("dialect: unknown")?;
        let reopen = self.cfg.as_ref().is_none_or(|old| (&old.port, old.baud) != (&new.port, new.baud));
        self.dialect = dialect;
        self.cfg = Some(new);
        if reopen {
            self.port = None;
            self.next_try = None;
            self.down = Some("not opened yet".into());
            self.known = Known::default();
            self.connect(Instant::now(), ctx);
        }
        Ok(())
    }

    fn start(&mut self, ctx: &mut Ctx) {
        self.connect(Instant::now(), ctx);
    }

    fn stop(&mut self, _ctx: &mut Ctx) {
        // The projector keeps its state; the line is simply closed.
        self.port = None;
    }

    fn call(&mut self, action: &str, args: &Map<String, Value>, ctx: &mut Ctx) -> Result<Value, CallError> {
        let int = |k: &str| args.get(k).and_then(Value::as_i64).map(|n| n as i32);
        match action {
            "power" => {
                let on = args.get("on").and_then(Value::as_bool).unwrap_or(false);
                self.set(Command::Power(on), ctx)?;
                // Acknowledged: it is on its way (the projector reports warming or cooling).
                self.known.power = Some(if on { "on" } else { "off" });
            }
            "input" => {
                let w = Self::pick(self.dialect.inputs(), args.get("source"))
                    .ok_or_else(|| CallError::invalid("source"))?;
                self.set(Command::Input(w), ctx)?;
                self.known.input = Some(w);
            }
            "aspect" => {
                let w =
                    Self::pick(self.dialect.aspects(), args.get("ratio")).ok_or_else(|| CallError::invalid("ratio"))?;
                self.set(Command::Aspect(w), ctx)?;
                self.known.aspect = Some(w);
            }
            "keystone" => {
                let n = int("value").unwrap_or(0);
                self.set(Command::Keystone(n), ctx)?;
                self.known.keystone = Some(n);
            }
            "shift" => {
                if args.is_empty() {
                    return Err(CallError::invalid("shift: give h, v or both"));
                }
                if let Some(h) = int("h") {
                    self.set(Command::ShiftH(h), ctx)?;
                    self.known.shift.0 = Some(h);
                }
                if let Some(v) = int("v") {
                    self.set(Command::ShiftV(v), ctx)?;
                    self.known.shift.1 = Some(v);
                }
            }
            "key" => {
                let w = Self::pick(self.dialect.keys(), args.get("name")).ok_or_else(|| CallError::invalid("name"))?;
                self.set(Command::Key(w), ctx)?;
            }
            "refresh" => {
                if self.port.is_none() {
                    let why = self.down.clone().unwrap_or_default();
                    return Err(CallError::unavailable(format!("the projector is disconnected: {why}")));
                }
                self.refresh(ctx);
            }
            other => return Err(CallError::new(ErrorCode::UnknownAction, format!("no action {other:?}"))),
        }
        Ok(Value::Object(self.state()))
    }

    fn state(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let k = &self.known;
        m.insert("connection".into(), if self.port.is_some() { "connected" } else { "disconnected" }.into());
        if let Some(c) = &self.cfg {
            m.insert("port".into(), c.port.clone().into());
        }
        m.insert("dialect".into(), self.dialect.name().into());
        if let Some(why) = &self.down {
            m.insert("error".into(), why.clone().into());
        }
        m.insert("power".into(), k.power.unwrap_or("unknown").into());
        for (key, v) in [("input", k.input), ("aspect", k.aspect)] {
            if let Some(v) = v {
                m.insert(key.into(), v.into());
            }
        }
        if let Some(n) = k.keystone {
            m.insert("keystone".into(), n.into());
        }
        if let Some(h) = k.shift.0 {
            m.insert("shift_h".into(), h.into());
        }
        if let Some(v) = k.shift.1 {
            m.insert("shift_v".into(), v.into());
        }
        m
    }

    fn tick(&mut self, now: Instant, ctx: &mut Ctx) -> Option<Duration> {
        if self.port.is_none() {
            self.connect(now, ctx);
        } else if let Some(port) = self.port.as_mut() {
            // Reports between commands, and the unplugging noticed without a command.
            match port.poll(&*self.dialect) {
                Ok(infos) => self.apply_infos(&infos),
                Err(LineError::Gone(why)) => self.disconnected(why, ctx),
                Err(LineError::Timeout) => {}
            }
        }
        Some(Duration::from_millis(500))
    }

    fn metrics(&mut self) -> std::collections::BTreeMap<String, f64> {
        ["acknowledged", "refused", "unanswered"]
            .iter()
            .zip(self.counts)
            .map(|(k, n)| ((*k).to_owned(), n as f64))
            .collect()
    }
}
