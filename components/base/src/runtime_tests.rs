//! The runtime against a fake agent (a Unix listener in a temporary directory) and a lamp.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use debfleet_protocol::component::{decode, encode, frame_len, CallResult, Down, Up};
use debfleet_protocol::ids::{ActionName, DeviceId, OpId};
use serde_json::json;

use super::*;
use crate::{ComponentState, ParamKind, ParamSpec};

/// A lamp: `on` with a level, `off`; its level is a metric.
#[derive(Default)]
struct Lamp {
    level: i64,
    max: i64,
    started: bool,
}

impl Component for Lamp {
    fn meta(&self) -> ComponentMeta {
        ComponentMeta {
            v: 1,
            component: "lamp".parse().unwrap(),
            version: "1.0".into(),
            actions: vec![
                ActionSpec {
                    name: ActionName::new("on").unwrap(),
                    help: String::new(),
                    params: vec![ParamSpec {
                        name: "level".into(),
                        kind: ParamKind::Int { min: 1, max: 100 },
                        required: true,
                        help: String::new(),
                    }],
                },
                ActionSpec { name: ActionName::new("off").unwrap(), help: String::new(), params: vec![] },
            ],
            metrics: vec!["level".into()],
        }
    }

    fn default_cfg(&self) -> Map<String, Value> {
        json!({"max": 100}).as_object().unwrap().clone()
    }

    fn configure(&mut self, cfg: &Map<String, Value>, _ctx: &mut Ctx) -> Result<(), String> {
        for k in cfg.keys() {
            if k != "max" {
                return Err(format!("unknown key {k:?}"));
            }
        }
        self.max = cfg["max"].as_i64().filter(|m| (1..=100).contains(m)).ok_or("max: 1..=100")?;
        self.level = self.level.min(self.max);
        Ok(())
    }

    fn start(&mut self, ctx: &mut Ctx) {
        self.started = true;
        ctx.set_status(ComponentState::Idle, None);
    }

    fn stop(&mut self, _ctx: &mut Ctx) {
        self.level = 0;
    }

    fn call(&mut self, action: &str, args: &Map<String, Value>, ctx: &mut Ctx) -> Result<Value, CallError> {
        match action {
            "on" => {
                let level = args["level"].as_i64().unwrap_or(0);
                if level > self.max {
                    return Err(CallError::invalid(format!("level {level} is above max {}", self.max)));
                }
                self.level = level;
                ctx.set_status(ComponentState::Running, None);
                ctx.log(crate::Level::Error, "switched on");
            }
            _ => {
                self.level = 0;
                ctx.set_status(ComponentState::Idle, None);
            }
        }
        Ok(json!({"level": self.level}))
    }

    fn state(&self) -> Map<String, Value> {
        json!({"level": self.level}).as_object().unwrap().clone()
    }

    fn metrics(&mut self) -> BTreeMap<String, f64> {
        BTreeMap::from([("level".to_owned(), self.level as f64)])
    }
}

/// The agent's end of one connection.
struct FakeAgent {
    stream: UnixStream,
    /// Every frame received, in order.
    seen: Vec<Up>,
}

impl FakeAgent {
    fn accept(listener: &UnixListener) -> FakeAgent {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        FakeAgent { stream, seen: Vec::new() }
    }

    fn send(&mut self, d: &Down) {
        self.stream.write_all(&encode(d).unwrap()).unwrap();
    }

    fn recv(&mut self) -> Option<Up> {
        let mut h = [0u8; 4];
        self.stream.read_exact(&mut h).ok()?;
        let mut body = vec![0; frame_len(h).unwrap()];
        self.stream.set_read_timeout(None).unwrap();
        self.stream.read_exact(&mut body).unwrap();
        self.stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        Some(decode(&body).unwrap())
    }
}

fn runtime(dir: &std::path::Path) -> (Runtime<Lamp>, UnixListener) {
    let socket = dir.join("agent.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let rt = Runtime::new(Lamp::default(), Options { socket, state_dir: dir.join("state") });
    (rt, listener)
}

/// Turns the loop, reading what reaches the agent, until `want` matches a frame received
/// (now or before).
fn until(rt: &mut Runtime<Lamp>, agent: &mut FakeAgent, want: impl Fn(&Up) -> bool) -> Up {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(up) = agent.seen.iter().find(|u| want(u)) {
            return up.clone();
        }
        rt.turn(Instant::now());
        while let Some(up) = agent.recv() {
            agent.seen.push(up);
        }
    }
    panic!("no such frame in 10 s (linked: {}, welcomed: {})", rt.link.is_some(), rt.welcomed);
}

fn call(agent: &mut FakeAgent, id: &str, action: &str, args: Value) {
    agent.send(&Down::Call {
        id: OpId::new(id).unwrap(),
        action: ActionName::new(action).unwrap(),
        args: args.as_object().unwrap().clone(),
    });
}

fn result_of(rt: &mut Runtime<Lamp>, agent: &mut FakeAgent, id: &str) -> CallResult {
    match until(rt, agent, |u| matches!(u, Up::Result { id: i, .. } if i.as_str() == id)) {
        Up::Result { result, .. } => result,
        _ => unreachable!(),
    }
}

fn welcomed(rt: &mut Runtime<Lamp>, listener: &UnixListener) -> FakeAgent {
    rt.turn(Instant::now());
    let mut agent = FakeAgent::accept(listener);
    match agent.recv().unwrap() {
        Up::Hello { meta } => {
            assert_eq!(meta.component.as_str(), "lamp");
            assert!(meta.action("cfg").is_some(), "the built-in actions are in the meta");
        }
        other => panic!("expected the hello first, got {other:?}"),
    }
    agent.send(&Down::Welcome { device: DeviceId::new("d1").unwrap() });
    agent
}

#[test]
fn hello_then_facts_then_calls_checked_against_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, listener) = runtime(dir.path());
    rt.start();
    let mut agent = welcomed(&mut rt, &listener);
    until(&mut rt, &mut agent, |u| matches!(u, Up::Status { status } if status.state == ComponentState::Idle));
    until(&mut rt, &mut agent, |u| matches!(u, Up::Cfg { cfg } if cfg["max"] == 100));
    assert_eq!(rt.ctx.device().unwrap().as_str(), "d1");

    call(&mut agent, "c1", "on", json!({"level": 40}));
    assert_eq!(result_of(&mut rt, &mut agent, "c1"), CallResult::Ok(json!({"level": 40})));
    until(&mut rt, &mut agent, |u| matches!(u, Up::State { state } if state["level"] == 40));

    for (id, action, args, code, says) in [
        ("c2", "on", json!({}), ErrorCode::InvalidValue, "level is required"),
        ("c3", "on", json!({"level": "high"}), ErrorCode::InvalidValue, "got a string"),
        ("c4", "on", json!({"level": 1000}), ErrorCode::InvalidValue, "outside 1..=100"),
        ("c5", "on", json!({"level": 5, "colour": 1}), ErrorCode::InvalidValue, "unknown argument"),
        ("c6", "dance", json!({}), ErrorCode::UnknownAction, "has no action \"dance\""),
        ("c7", "cfg", json!({"max": 0}), ErrorCode::InvalidValue, "max: 1..=100"),
        ("c8", "cfg", json!({"brightness": 3}), ErrorCode::InvalidValue, "unknown key"),
        ("c9", "cfg", json!({"logs": {"level": "loud"}}), ErrorCode::InvalidValue, "logs.level"),
    ] {
        call(&mut agent, id, action, args);
        match result_of(&mut rt, &mut agent, id) {
            CallResult::Err(e) => {
                assert_eq!(e.code, code, "{id}: {}", e.message);
                assert!(e.message.contains(says), "{id}: {}", e.message);
            }
            ok => panic!("{id}: {ok:?}"),
        }
    }
    // Refused calls left the lamp as it was.
    assert_eq!(rt.c.level, 40);
    assert_eq!(rt.c.max, 100);
}

#[test]
fn cfg_is_kept_across_restarts_and_gates_the_streams() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, listener) = runtime(dir.path());
    rt.start();
    let mut agent = welcomed(&mut rt, &listener);
    call(
        &mut agent,
        "c1",
        "cfg",
        json!({"max": 30, "logs": {"level": "error", "batch_s": 1}, "telemetry": {"level": {"interval_s": 1}}}),
    );
    match result_of(&mut rt, &mut agent, "c1") {
        CallResult::Ok(cfg) => assert_eq!(cfg["max"], 30),
        e => panic!("{e:?}"),
    }
    call(&mut agent, "c2", "on", json!({"level": 50}));
    assert!(matches!(result_of(&mut rt, &mut agent, "c2"), CallResult::Err(e) if e.message.contains("above max 30")));
    call(&mut agent, "c3", "on", json!({"level": 20}));
    result_of(&mut rt, &mut agent, "c3");
    until(&mut rt, &mut agent, |u| matches!(u, Up::Telemetry { telemetry } if telemetry.metrics["level"] == 20.0));
    until(&mut rt, &mut agent, |u| matches!(u, Up::Logs { logs } if logs.lines.iter().any(|l| l.msg == "switched on")));
    drop(rt);

    // A new process: the kept configuration applies before the agent is even there.
    drop(agent);
    let mut rt = Runtime::new(
        Lamp::default(),
        Options { socket: dir.path().join("agent.sock"), state_dir: dir.path().join("state") },
    );
    rt.start();
    assert_eq!(rt.c.max, 30);
    // null puts a key back to its default.
    let mut agent = welcomed(&mut rt, &listener);
    call(&mut agent, "c4", "cfg", json!({"max": null}));
    match result_of(&mut rt, &mut agent, "c4") {
        CallResult::Ok(cfg) => assert_eq!(cfg["max"], 100),
        e => panic!("{e:?}"),
    }
}

#[test]
fn the_agent_going_away_is_survived_and_facts_go_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, listener) = runtime(dir.path());
    rt.start();
    let mut agent = welcomed(&mut rt, &listener);
    call(&mut agent, "c1", "on", json!({"level": 7}));
    result_of(&mut rt, &mut agent, "c1");
    drop(agent);
    // A garbage frame from the next agent ends that connection too, and the runtime carries on.
    let deadline = Instant::now() + Duration::from_secs(10);
    listener.set_nonblocking(true).unwrap();
    let mut bad = loop {
        rt.turn(Instant::now());
        if let Ok((s, _)) = listener.accept() {
            break s;
        }
        assert!(Instant::now() < deadline, "no reconnect");
    };
    bad.write_all(&[0, 0, 0, 3, b'x', b'y', b'z']).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        rt.turn(Instant::now());
        if let Ok((s, _)) = listener.accept() {
            break s;
        }
        assert!(Instant::now() < deadline, "no reconnect after a bad frame");
    };
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut agent = FakeAgent { stream, seen: Vec::new() };
    assert!(matches!(agent.recv(), Some(Up::Hello { .. })));
    agent.send(&Down::Welcome { device: DeviceId::new("d1").unwrap() });
    // State and status are published again to the new agent, unchanged.
    until(&mut rt, &mut agent, |u| matches!(u, Up::State { state } if state["level"] == 7));
    until(&mut rt, &mut agent, |u| matches!(u, Up::Status { status } if status.state == ComponentState::Running));
    rt.stop();
    assert_eq!(rt.c.level, 0, "stop leaves it safe");
}
