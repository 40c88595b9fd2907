//! The patrol: a component that drives the robot round its waypoints, `laps` times, through
//! the bridge's ROS node — the pose from `/odom`, velocities on `/cmd_vel` twenty times a
//! second. A pose older than half a second stops the robot until odometry comes back; `stop`,
//! a finished patrol and the unit stopping all send a zero velocity.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use debfleet_component::{
    json, ActionName, ActionSpec, CallError, Component, ComponentId, ComponentMeta, ComponentState, Ctx, Level, Map,
    ParamKind, ParamSpec, Value, CONTRACT_VERSION,
};
use debfleet_ros_bridge::node::{Event, Node, Plan, PubPlan, PublishError, SubPlan};
use debfleet_ros_bridge::types::{MsgType, Registry};

use crate::{wrap, Pose};

const CONTROL_PERIOD: Duration = Duration::from_millis(50);
const ODOM_MAX_AGE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Idle,
    Patrolling,
    Finished,
    Stopped,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Idle => "idle",
            Mode::Patrolling => "patrolling",
            Mode::Finished => "finished",
            Mode::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Cfg {
    odom_topic: String,
    cmd_vel_topic: String,
    waypoints: Vec<(f64, f64)>,
    max_speed: f64,
    max_turn: f64,
    tolerance: f64,
}

pub struct Patrol {
    cfg: Option<Cfg>,
    twist: Option<Arc<MsgType>>,
    node: Option<Node>,
    events: Option<Receiver<Event>>,
    master: Result<String, String>,
    pose: Option<(Pose, Instant)>,
    mode: Mode,
    laps: u32,
    lap: u32,
    next: usize,
    reached: u64,
    moving: bool,
    started: Option<Instant>,
    took: Option<Duration>,
    /// Odometry wakes the loop at its own rate: the controller runs at CONTROL_PERIOD.
    next_control: Instant,
}

impl Default for Patrol {
    fn default() -> Self {
        Patrol::new()
    }
}

impl Patrol {
    pub fn new() -> Patrol {
        Patrol {
            cfg: None,
            twist: None,
            node: None,
            events: None,
            master: Err("not connected yet".into()),
            pose: None,
            mode: Mode::Idle,
            laps: 0,
            lap: 0,
            next: 0,
            reached: 0,
            moving: false,
            started: None,
            took: None,
            next_control: Instant::now(),
        }
    }

    fn plan(&self) -> Option<Plan> {
        let (cfg, twist) = (self.cfg.as_ref()?, self.twist.clone()?);
        Some(Plan {
            node_name: "debfleet_robot_sample".into(),
            subs: vec![SubPlan {
                stream: "odom".into(),
                topic: cfg.odom_topic.clone(),
                decimate: 1,
                max_rate_hz: 0.0,
                fields: vec!["pose.pose".into()],
            }],
            pubs: vec![PubPlan { name: "cmd_vel".into(), topic: cfg.cmd_vel_topic.clone(), ty: twist }],
            max_payload: 4096,
        })
    }

    fn drive(&mut self, v: f64, w: f64, ctx: &mut Ctx) {
        let (Some(node), Some(twist)) = (&self.node, &self.twist) else { return };
        let Value::Object(data) = json!({"linear": {"x": v}, "angular": {"z": w}}) else { return };
        match node.publish("cmd_vel", twist, &data) {
            Ok(_) => self.moving = v != 0.0 || w != 0.0,
            Err(PublishError::NotConnected) => {}
            Err(e) => ctx.log(Level::Error, format!("cmd_vel: {e:?}")),
        }
    }

    /// One control step: toward the next waypoint, turning first when far off its bearing.
    fn control(&mut self, now: Instant, ctx: &mut Ctx) {
        let Some(cfg) = self.cfg.clone() else { return };
        let pose = match self.pose {
            Some((p, at)) if now.duration_since(at) <= ODOM_MAX_AGE => p,
            _ => {
                // No fresh pose: stand still until odometry is back.
                if self.moving {
                    self.drive(0.0, 0.0, ctx);
                }
                return;
            }
        };
        let (tx, ty) = cfg.waypoints[self.next];
        let (dx, dy) = (tx - pose.x, ty - pose.y);
        let dist = dx.hypot(dy);
        if dist <= cfg.tolerance {
            self.reached += 1;
            ctx.log(Level::Info, format!("waypoint {} ({tx}, {ty}) reached, lap {}", self.next + 1, self.lap + 1));
            self.next += 1;
            if self.next == cfg.waypoints.len() {
                self.next = 0;
                self.lap += 1;
                if self.lap >= self.laps {
                    self.mode = Mode::Finished;
                    self.took = self.started.map(|s| now.duration_since(s));
                    self.drive(0.0, 0.0, ctx);
                    ctx.set_status(ComponentState::Idle, Some("patrol finished".into()));
                    return;
                }
            }
            return;
        }
        let err = wrap(dy.atan2(dx) - pose.theta);
        let w = (2.0 * err).clamp(-cfg.max_turn, cfg.max_turn);
        let v = if err.abs() > 0.6 { 0.0 } else { (dist * 1.5).min(cfg.max_speed) * err.cos() };
        self.drive(v, w, ctx);
    }
}

fn parse_cfg(cfg: &Map<String, Value>) -> Result<Cfg, String> {
    for k in cfg.keys() {
        if !["odom_topic", "cmd_vel_topic", "waypoints", "max_speed", "max_turn", "tolerance"].contains(&k.as_str()) {
            return Err(format!("no key {k:?}"));
        }
    }
    let text =
        |k: &str| cfg.get(k).and_then(Value::as_str).map(str::to_owned).ok_or(format!("{k}: expected a topic name"));
    let num = |k: &str, lo: f64, hi: f64| match cfg.get(k).and_then(Value::as_f64) {
        Some(x) if x >= lo && x <= hi => Ok(x),
        _ => Err(format!("{k}: expected a number in {lo}..={hi}")),
    };
    let waypoints = cfg
        .get("waypoints")
        .and_then(Value::as_array)
        .ok_or("waypoints: expected [[x, y], ...]")?
        .iter()
        .map(|p| match p.as_array().map(Vec::as_slice) {
            Some([x, y]) => match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) if x.abs() <= 1e4 && y.abs() <= 1e4 => Ok((x, y)),
                _ => Err(format!("waypoints: {p} is not [x, y] in metres")),
            },
            _ => Err(format!("waypoints: {p} is not [x, y]")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if waypoints.is_empty() || waypoints.len() > 100 {
        return Err("waypoints: 1 to 100 of them".into());
    }
    Ok(Cfg {
        odom_topic: text("odom_topic")?,
        cmd_vel_topic: text("cmd_vel_topic")?,
        waypoints,
        max_speed: num("max_speed", 0.01, 2.0)?,
        max_turn: num("max_turn", 0.1, 4.0)?,
        tolerance: num("tolerance", 0.01, 5.0)?,
    })
}

impl Component for Patrol {
    fn meta(&self) -> ComponentMeta {
        let name = |s: &str| ActionName::new(s).expect("a valid action name");
        ComponentMeta {
            v: CONTRACT_VERSION,
            component: ComponentId::new("robot").expect("a valid component id"),
            version: env!("CARGO_PKG_VERSION").into(),
            actions: vec![
                ActionSpec {
                    name: name("patrol"),
                    help: "drive round the waypoints, from the first".into(),
                    params: vec![ParamSpec::optional("laps", ParamKind::Int { min: 1, max: 1000 }, "default 1")],
                },
                ActionSpec { name: name("stop"), help: "stop where it is".into(), params: Vec::new() },
            ],
            metrics: vec!["waypoints_reached".into()],
        }
    }

    fn default_cfg(&self) -> Map<String, Value> {
        let Value::Object(m) = json!({
            "odom_topic": "/odom",
            "cmd_vel_topic": "/cmd_vel",
            "waypoints": [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]],
            "max_speed": 0.5,
            "max_turn": 1.5,
            "tolerance": 0.1,
        }) else {
            unreachable!()
        };
        m
    }

    fn configure(&mut self, cfg: &Map<String, Value>, ctx: &mut Ctx) -> Result<(), String> {
        let c = parse_cfg(cfg)?;
        let twist = Registry::new(vec![PathBuf::from("/usr/share")]).get("geometry_msgs/Twist")?;
        if self.mode == Mode::Patrolling && self.cfg.as_ref().is_some_and(|old| old.waypoints != c.waypoints) {
            self.mode = Mode::Stopped;
            self.drive(0.0, 0.0, ctx);
            ctx.log(Level::Warn, "the waypoints changed: patrol stopped");
        }
        self.cfg = Some(c);
        self.twist = Some(twist);
        if let (Some(node), Some(plan)) = (&self.node, self.plan()) {
            node.plan(plan);
        }
        Ok(())
    }

    fn start(&mut self, ctx: &mut Ctx) {
        let (tx, rx) = channel();
        let waker = ctx.waker();
        match Node::start(tx, Arc::new(move || waker.wake())) {
            Ok(node) => {
                if let Some(plan) = self.plan() {
                    node.plan(plan);
                }
                self.node = Some(node);
                self.events = Some(rx);
            }
            Err(e) => ctx.set_status(ComponentState::Error, Some(format!("starting the ROS node's thread: {e}"))),
        }
    }

    fn stop(&mut self, ctx: &mut Ctx) {
        self.drive(0.0, 0.0, ctx);
        if let Some(node) = self.node.take() {
            node.stop();
        }
        ctx.set_status(ComponentState::Stopped, None);
    }

    fn call(&mut self, action: &str, args: &Map<String, Value>, ctx: &mut Ctx) -> Result<Value, CallError> {
        match action {
            "patrol" => {
                if self.master.is_err() {
                    return Err(CallError::unavailable(format!(
                        "not connected to the ROS master: {}",
                        self.master.as_ref().err().map_or("", String::as_str)
                    )));
                }
                if self.pose.is_none() {
                    return Err(CallError::unavailable("no odometry yet: is the robot's base running?"));
                }
                self.laps = args.get("laps").and_then(Value::as_u64).unwrap_or(1) as u32;
                (self.lap, self.next, self.mode) = (0, 0, Mode::Patrolling);
                self.started = Some(Instant::now());
                self.took = None;
                ctx.set_status(ComponentState::Running, None);
                Ok(Value::Object(self.state()))
            }
            "stop" => {
                if self.mode == Mode::Patrolling {
                    self.mode = Mode::Stopped;
                }
                self.drive(0.0, 0.0, ctx);
                ctx.set_status(ComponentState::Idle, None);
                Ok(Value::Object(self.state()))
            }
            other => Err(CallError::new(debfleet_component::ErrorCode::UnknownAction, format!("no action {other}"))),
        }
    }

    fn state(&self) -> Map<String, Value> {
        // Rounded so the retained state changes at centimetre steps, not at every message.
        let r = |x: f64| (x * 100.0).round() / 100.0;
        let pose = self.pose.map(|(p, _)| json!({"x": r(p.x), "y": r(p.y), "theta": r(p.theta)}));
        let n = self.cfg.as_ref().map_or(0, |c| c.waypoints.len());
        let Value::Object(m) = json!({
            "mode": self.mode.as_str(),
            "laps": self.laps,
            "lap": self.lap,
            "waypoint": self.next + 1,
            "waypoints": n,
            "reached": self.reached,
            "pose": pose,
            "took_s": self.took.map(|d| r(d.as_secs_f64())),
            "ros": if self.master.is_ok() { "connected" } else { "unreachable" },
        }) else {
            unreachable!()
        };
        m
    }

    fn tick(&mut self, now: Instant, ctx: &mut Ctx) -> Option<Duration> {
        let events: Vec<Event> = self.events.as_ref().map(|rx| rx.try_iter().take(1000).collect()).unwrap_or_default();
        for e in events {
            match e {
                Event::Sample { value, .. } => {
                    if let Some(p) = Pose::from_odometry(&value) {
                        self.pose = Some((p, now));
                    }
                }
                Event::Master(m) => {
                    match &m {
                        Ok(_) if self.mode != Mode::Patrolling => ctx.set_status(ComponentState::Idle, None),
                        Ok(_) => ctx.set_status(ComponentState::Running, None),
                        Err(why) => ctx.set_status(ComponentState::Error, Some(why.clone())),
                    }
                    self.master = m;
                }
                Event::Warn(w) => ctx.log(Level::Warn, w),
            }
        }
        if self.mode == Mode::Patrolling {
            if now >= self.next_control {
                self.next_control = now + CONTROL_PERIOD;
                self.control(now, ctx);
            }
            Some(self.next_control.saturating_duration_since(now))
        } else {
            Some(Duration::from_millis(500))
        }
    }

    fn metrics(&mut self) -> BTreeMap<String, f64> {
        BTreeMap::from([("waypoints_reached".to_owned(), self.reached as f64)])
    }
}
