//! `debfleet rollout ...`: create a staged rollout, follow and steer it, and `run`, the
//! controller that drives rollouts (decisions in the `debfleet-rollout` crate; this is its IO:
//! the broker's retained set in, records and state out, and the lease).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use debfleet_protocol::desired::{DesiredRecord, Target, Window};
use debfleet_protocol::rollout::{
    Action, Lease, Phase, RolloutControl, RolloutId, RolloutSpec, RolloutState, Stage, WaveSize,
};
use debfleet_protocol::units::ActiveState;
use debfleet_protocol::{time, DeviceId, GroupName, RolloutPart, Topic, Topics, CONTRACT_VERSION};
use debfleet_rollout::{Controller, DeviceView, Out, View};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};

use crate::cmds::{read_retained, usage};
use crate::fleet::Fleet;
use crate::output::table;
use crate::session::Session;
use crate::Ctx;

/// A lease lasts this long unless renewed (every third of it).
const LEASE_MS: i64 = 15_000;
/// A claim is ours if the broker still shows it this long after it was sent (the broker has no
/// compare-and-set: the last claim wins, and every claimant sees which).
const CLAIM_SETTLE_MS: i64 = 2_000;

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Roll packages out to a group in waves (a controller drives it: `debfleet rollout run`).
    Create {
        /// PKG=VERSION pairs.
        #[arg(required = true)]
        packages: Vec<String>,
        /// The group whose devices it moves (its members when the rollout starts).
        #[arg(long)]
        group: String,
        /// The rollout's id [default: r and the current time].
        #[arg(long)]
        id: Option<String>,
        /// Cumulative wave sizes, counts or shares of the group; the last is 100%.
        #[arg(long, default_value = "1,10%,50%,100%")]
        waves: String,
        /// The share of a wave's reporting devices that must end healthy for the next to start.
        #[arg(long, default_value = "95%")]
        success: String,
        /// Failed devices at which the rollout halts.
        #[arg(long, default_value_t = 1)]
        max_failures: u32,
        /// How long a device's units must stay up after it converged (30s, 5m, 1h).
        #[arg(long, default_value = "5m")]
        watch: String,
        /// How long a wave waits for a device that does not report before counting it offline.
        #[arg(long, default_value = "1h")]
        deadline: String,
        /// On halting, return the devices already changed to what they had.
        #[arg(long)]
        auto_rollback: bool,
        /// Wait for `rollout resume` after each wave.
        #[arg(long)]
        pause_after_wave: bool,
        /// Devices install only inside this window of their local time, downloading ahead
        /// (02:00-04:00; 22:00-02:00 spans midnight). Each wave waits for it.
        #[arg(long, value_name = "HH:MM-HH:MM")]
        window: Option<String>,
        /// Print JSON instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Where a rollout stands: its waves, and every device's state in them.
    Status {
        /// The rollout's id.
        id: String,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Show it again on every change until it ends (Ctrl-C stops); NDJSON with --json.
        #[arg(long)]
        follow: bool,
    },
    /// Every rollout the broker holds.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start no new wave until resumed (devices already asked go on).
    Pause(Steer),
    /// Go on after a pause.
    Resume(Steer),
    /// Stop: devices that have not converged are asked for what they had (they do not install).
    Abort(Steer),
    /// Ask the failed devices again.
    Retry(Steer),
    /// Return every device the rollout changed to the version it had before.
    Rollback(Steer),
    /// Drive every rollout on the broker until stopped (Ctrl-C), holding a lease on each so
    /// that no two controllers drive the same one.
    Run {
        /// Stop once no rollout has anything left to do.
        #[arg(long)]
        exit_when_done: bool,
    },
}

#[derive(Args)]
pub struct Steer {
    /// The rollout's id.
    id: String,
    /// Print JSON instead of a sentence.
    #[arg(long)]
    json: bool,
}

pub async fn run(ctx: &Ctx, command: RolloutCommand) -> Result<u8> {
    match command {
        RolloutCommand::Create {
            packages,
            group,
            id,
            waves,
            success,
            max_failures,
            watch,
            deadline,
            auto_rollback,
            pause_after_wave,
            window,
            json,
        } => {
            let id = match id {
                Some(id) => rollout_id(&id)?,
                None => rollout_id(&format!("r{}", time::now_unix_ms() / 1000))?,
            };
            let spec = RolloutSpec {
                v: CONTRACT_VERSION,
                id,
                group: GroupName::new(group).map_err(|e| usage(e.to_string()))?,
                packages: pairs(&packages)?,
                waves: waves.split(',').map(|w| WaveSize::parse(w.trim()).map_err(usage)).collect::<Result<_>>()?,
                success_pct: percent(&success)?,
                max_failures,
                watch_s: duration_s(&watch)?,
                deadline_s: duration_s(&deadline)?,
                auto_rollback,
                pause_after_wave,
                window: window.map(|w| Window::parse(&w).map_err(usage)).transpose()?,
                by: operator(ctx),
                ts: time::now(),
            };
            spec.check().map_err(usage)?;
            create(ctx, spec, json).await
        }
        RolloutCommand::Status { id, json, follow } => status(ctx, &rollout_id(&id)?, json, follow).await,
        RolloutCommand::List { json } => list(ctx, json).await,
        RolloutCommand::Pause(s) => steer(ctx, s, Action::Pause).await,
        RolloutCommand::Resume(s) => steer(ctx, s, Action::Resume).await,
        RolloutCommand::Abort(s) => steer(ctx, s, Action::Abort).await,
        RolloutCommand::Retry(s) => steer(ctx, s, Action::Retry).await,
        RolloutCommand::Rollback(s) => steer(ctx, s, Action::Rollback).await,
        RolloutCommand::Run { exit_when_done } => drive(ctx, exit_when_done).await,
    }
}

fn rollout_id(s: &str) -> Result<RolloutId> {
    RolloutId::new(s).map_err(|e| usage(e.to_string()))
}

/// A rollout always names who asked (the field is required): `operator` when nobody is known.
fn operator(ctx: &Ctx) -> String {
    ctx.by.clone().unwrap_or_else(|| "operator".into())
}

fn pairs(words: &[String]) -> Result<BTreeMap<String, Target>> {
    let mut out = BTreeMap::new();
    for w in words {
        let Some((name, version)) = w.split_once('=') else {
            return Err(usage(format!("{w:?}: write NAME=VERSION")));
        };
        match Target::parse(version) {
            Ok(t @ Target::Version(_)) => out.insert(name.to_owned(), t),
            _ => return Err(usage(format!("{w:?}: a rollout names an exact Debian version"))),
        };
    }
    Ok(out)
}

fn percent(s: &str) -> Result<u8> {
    match s.strip_suffix('%').unwrap_or(s).parse::<u8>() {
        Ok(p @ 1..=100) => Ok(p),
        _ => Err(usage(format!("{s:?}: write a share from 1% to 100%"))),
    }
}

/// `90`, `90s`, `5m`, `2h`, `1d`, in seconds.
pub(crate) fn duration_s(s: &str) -> Result<u32> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u32 = digits.parse().map_err(|_| usage(format!("{s:?}: write a duration such as 90s, 5m or 2h")))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(usage(format!("{s:?}: the units are s, m, h and d"))),
    };
    n.checked_mul(scale).filter(|v| *v <= 30 * 86_400).ok_or_else(|| usage(format!("{s:?} is longer than 30 days")))
}

/// What the broker holds that a controller or a status needs.
#[derive(Default)]
struct World {
    fleet: Fleet,
    devices: BTreeMap<DeviceId, DesiredRecord>,
    groups: BTreeMap<GroupName, DesiredRecord>,
    rollouts: Rollouts,
}

/// The rollouts' retained messages (`rollout/ID/spec|state|control|lease`), as the broker
/// holds them; also what the web console shows.
#[derive(Default)]
pub struct Rollouts {
    pub specs: BTreeMap<RolloutId, RolloutSpec>,
    pub states: BTreeMap<RolloutId, RolloutState>,
    pub controls: BTreeMap<RolloutId, RolloutControl>,
    pub leases: BTreeMap<RolloutId, Lease>,
}

impl Rollouts {
    /// One retained message (empty: deleted); why not, for one that does not parse.
    pub fn apply(&mut self, id: RolloutId, part: RolloutPart, payload: &[u8]) -> Result<(), String> {
        if payload.is_empty() {
            match part {
                RolloutPart::Spec => self.specs.remove(&id).map(|_| ()),
                RolloutPart::State => self.states.remove(&id).map(|_| ()),
                RolloutPart::Control => self.controls.remove(&id).map(|_| ()),
                RolloutPart::Lease => self.leases.remove(&id).map(|_| ()),
            };
            return Ok(());
        }
        match part {
            RolloutPart::Spec => RolloutSpec::parse(payload)
                .and_then(|s| if s.id == id { Ok(s) } else { Err("its id is not its topic's".into()) })
                .map(|s| drop(self.specs.insert(id, s))),
            RolloutPart::State => parse::<RolloutState>(payload).map(|s| drop(self.states.insert(id, s))),
            RolloutPart::Control => RolloutControl::parse(payload).map(|c| drop(self.controls.insert(id, c))),
            RolloutPart::Lease => parse::<Lease>(payload).map(|l| drop(self.leases.insert(id, l))),
        }
    }
}

impl World {
    fn apply(&mut self, topics: &Topics, topic: &str, payload: &[u8]) {
        let Ok(t) = topics.parse(topic) else { return };
        let refused = |what: &str, e: String| eprintln!("debfleet: ignoring {what} on {topic}: {e}");
        match t {
            Topic::DesiredDevice(d) => match (payload.is_empty(), DesiredRecord::parse(payload)) {
                (true, _) => drop(self.devices.remove(&d)),
                (false, Ok(r)) => drop(self.devices.insert(d, r)),
                (false, Err(e)) => refused("a desired-state record", e),
            },
            Topic::DesiredGroup(g) => match (payload.is_empty(), DesiredRecord::parse(payload)) {
                (true, _) => drop(self.groups.remove(&g)),
                (false, Ok(r)) => drop(self.groups.insert(g, r)),
                (false, Err(e)) => refused("a desired-state record", e),
            },
            Topic::Rollout(id, part) => {
                if let Err(e) = self.rollouts.apply(id, part, payload) {
                    refused("a rollout message", e);
                }
            }
            _ => {
                if let crate::fleet::Change::Invalid(why) = self.fleet.apply(topics, topic, payload) {
                    eprintln!("debfleet: ignoring an invalid message: {why}");
                }
            }
        }
    }

    /// The group's devices as the controller judges them.
    fn view(&self, spec: &RolloutSpec, state: Option<&RolloutState>) -> View {
        let members = self.fleet.members(&spec.group);
        let involved = state.map(|s| s.devices.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
        let mut devices = BTreeMap::new();
        for d in members.iter().chain(&involved) {
            let Some(dev) = self.fleet.devices.get(d) else { continue };
            let installed = dev
                .packages
                .as_ref()
                .map(|p| p.packages.iter().map(|(n, s)| (n.clone(), s.version.clone())).collect())
                .unwrap_or_default();
            let failed_units = dev
                .units
                .as_ref()
                .map(|u| {
                    u.units
                        .iter()
                        .filter(|(_, i)| spec.packages.contains_key(&i.package) && i.active == ActiveState::Failed)
                        .map(|(n, _)| n.clone())
                        .collect()
                })
                .unwrap_or_default();
            let view = DeviceView {
                online: dev.is_online(),
                installed,
                failed_units,
                report: dev.desired.clone(),
                record: self.devices.get(d).cloned(),
            };
            devices.insert(d.clone(), view);
        }
        View { devices, members, group_record: self.groups.get(&spec.group).cloned() }
    }
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    if payload.len() > debfleet_protocol::limits::MAX_PACKET_BYTES {
        return Err("too large".into());
    }
    serde_json::from_slice(payload).map_err(|e| e.to_string())
}

async fn read(ctx: &Ctx, what: &str, with_fleet: bool) -> Result<(Session, World)> {
    let mut filters = vec![ctx.topics.rollout_filter()];
    if with_fleet {
        filters.extend([ctx.topics.fleet_filter(), ctx.topics.desired_filter()]);
    }
    let (session, retained) = read_retained(ctx, what, &filters).await?;
    let mut world = World::default();
    for m in retained {
        world.apply(&ctx.topics, &m.topic, &m.payload);
    }
    Ok((session, world))
}

fn publish_json<T: serde::Serialize>(topics: &Topics, topic: Topic, value: &T) -> (String, Vec<u8>) {
    (topics.name(&topic), serde_json::to_vec(value).expect("protocol types serialise"))
}

async fn create(ctx: &Ctx, spec: RolloutSpec, json: bool) -> Result<u8> {
    let (session, world) = read(ctx, "the fleet and its rollouts", true).await?;
    if world.rollouts.specs.contains_key(&spec.id) {
        session.disconnect().await;
        return Err(usage(format!("a rollout {} exists already; choose another --id", spec.id)));
    }
    let busy = world.rollouts.specs.values().find(|s| {
        s.group == spec.group
            && world.rollouts.states.get(&s.id).is_none_or(|st| !st.phase.is_final() || st.phase == Phase::Halted)
    });
    if let Some(other) = busy {
        session.disconnect().await;
        return Err(usage(format!(
            "rollout {} is not finished in group {}: abort it or let it end first",
            other.id, spec.group
        )));
    }
    let members = world.fleet.members(&spec.group);
    let (topic, payload) = publish_json(&ctx.topics, Topic::Rollout(spec.id.clone(), RolloutPart::Spec), &spec);
    session.publish(topic, payload, true).await?;
    session.close().await?;
    let reach: Vec<usize> = spec.waves.iter().map(|w| w.reach(members.len())).collect();
    if json {
        println!("{}", json!({"id": spec.id, "group": spec.group, "devices": members.len(), "waves": reach}));
    } else {
        let packages: Vec<String> = spec.packages.iter().map(|(n, t)| format!("{n}={t}")).collect();
        println!(
            "rollout {}: {} to group {} ({} devices; waves reach {})",
            spec.id,
            packages.join(" "),
            spec.group,
            members.len(),
            reach.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
        );
        println!("a controller drives it (debfleet rollout run); follow it with: debfleet rollout status {}", spec.id);
    }
    Ok(0)
}

async fn status(ctx: &Ctx, id: &RolloutId, json: bool, follow: bool) -> Result<u8> {
    let (mut session, mut world) = read(ctx, "the rollouts", false).await?;
    let Some(spec) = world.rollouts.specs.get(id).cloned() else {
        session.disconnect().await;
        return Err(anyhow!(usage(format!("the broker has no rollout {id}"))));
    };
    let show = |world: &World| -> Result<()> {
        let state = world.rollouts.states.get(id);
        if json {
            let out = json!({"spec": spec, "state": state, "control": world.rollouts.controls.get(id), "lease": world.rollouts.leases.get(id)});
            // One line per change when following (NDJSON), pretty otherwise.
            println!("{}", if follow { serde_json::to_string(&out)? } else { serde_json::to_string_pretty(&out)? });
        } else {
            print!("{}", render(&spec, state));
        }
        Ok(())
    };
    show(&world)?;
    // The live view: again on every change of the state, until the rollout ends or Ctrl-C.
    if follow {
        let topic = ctx.topics.name(&Topic::Rollout(id.clone(), RolloutPart::State));
        let mut sigint = signal(SignalKind::interrupt())?;
        while !world.rollouts.states.get(id).is_some_and(|s| s.phase.is_final()) {
            let m = tokio::select! {
                m = session.recv() => m?,
                _ = sigint.recv() => break,
            };
            let before = world.rollouts.states.get(id).cloned();
            world.apply(&ctx.topics, &m.topic, &m.payload);
            if m.topic == topic && world.rollouts.states.get(id) != before.as_ref() {
                if !json {
                    println!();
                }
                show(&world)?;
            }
        }
    }
    session.disconnect().await;
    Ok(0)
}

/// The waves (devices per state) and every device's part.
fn render(spec: &RolloutSpec, state: Option<&RolloutState>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let packages: Vec<String> = spec.packages.iter().map(|(n, t)| format!("{n}={t}")).collect();
    let window = spec.window.map(|w| format!(", installing in {w} device time")).unwrap_or_default();
    let _ =
        writeln!(out, "rollout {}: {} to group {} (by {}{window})", spec.id, packages.join(" "), spec.group, spec.by);
    let Some(state) = state else {
        out.push_str("not started: no controller has taken it yet (debfleet rollout run)\n");
        return out;
    };
    let wave = state.wave.map(|w| format!(", wave {} of {}", w + 1, spec.waves.len())).unwrap_or_default();
    let reason = state.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default();
    let _ = writeln!(out, "{}{wave}{reason}", state.phase.as_str());
    let mut rows = Vec::new();
    for (w, (size, (n, counts))) in spec.waves.iter().zip(state.tally(spec.waves.len())).enumerate() {
        let mut row = vec![format!("{}", w + 1), size.to_string(), n.to_string()];
        row.extend(counts.iter().map(usize::to_string));
        rows.push(row);
    }
    let header: Vec<String> =
        ["wave", "size", "devices"].iter().chain(&Stage::WORDS).map(|h| h.to_uppercase()).collect();
    out.push_str(&table(&header.iter().map(String::as_str).collect::<Vec<_>>(), &rows));
    let rows: Vec<Vec<String>> = state
        .devices
        .iter()
        .map(|(d, e)| {
            let why = match &e.stage {
                Stage::Failed { error } => format!("{}: {}", error.code.as_str(), error.message),
                _ => String::new(),
            };
            let before: Vec<String> = e.before.iter().map(|(n, t)| format!("{n}={t}")).collect();
            vec![d.to_string(), (e.wave + 1).to_string(), e.stage.word().into(), before.join(" "), why]
        })
        .collect();
    if !rows.is_empty() {
        out.push('\n');
        out.push_str(&table(&["DEVICE", "WAVE", "STATE", "BEFORE", "ERROR"], &rows));
    }
    out
}

async fn list(ctx: &Ctx, json: bool) -> Result<u8> {
    let (session, world) = read(ctx, "the rollouts", false).await?;
    session.disconnect().await;
    let rows: Vec<(String, Vec<String>)> = world
        .rollouts
        .specs
        .values()
        .map(|s| {
            let st = world.rollouts.states.get(&s.id);
            let phase = st.map_or("created", |st| st.phase.as_str()).to_owned();
            let wave = st.and_then(|st| st.wave).map(|w| format!("{}/{}", w + 1, s.waves.len())).unwrap_or_default();
            let packages: Vec<String> = s.packages.iter().map(|(n, t)| format!("{n}={t}")).collect();
            (phase.clone(), vec![s.id.to_string(), s.group.to_string(), packages.join(" "), phase, wave, s.by.clone()])
        })
        .collect();
    if json {
        let list: Vec<_> = world
            .rollouts
            .specs
            .values()
            .map(|s| json!({"id": s.id, "group": s.group, "packages": s.packages, "by": s.by, "phase": world.rollouts.states.get(&s.id).map(|st| st.phase), "wave": world.rollouts.states.get(&s.id).and_then(|st| st.wave)}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if rows.is_empty() {
        println!("no rollouts");
    } else {
        let rows: Vec<Vec<String>> = rows.into_iter().map(|(_, r)| r).collect();
        print!("{}", table(&["ID", "GROUP", "PACKAGES", "PHASE", "WAVE", "BY"], &rows));
    }
    Ok(0)
}

async fn steer(ctx: &Ctx, s: Steer, action: Action) -> Result<u8> {
    let id = rollout_id(&s.id)?;
    let (seq, applied) = steer_once(ctx, &id, action, operator(ctx)).await?;
    let verb = action.as_str();
    match applied {
        Some(phase) => {
            if s.json {
                println!("{}", json!({"id": id, "action": verb, "seq": seq, "applied": true, "phase": phase}));
            } else {
                println!("rollout {id}: {verb} applied; now {}", phase.as_str());
            }
            Ok(0)
        }
        None => {
            if s.json {
                println!("{}", json!({"id": id, "action": verb, "seq": seq, "applied": false}));
            } else {
                println!("rollout {id}: {verb} is on the broker; no controller applied it within 15 s (is `debfleet rollout run` running?)");
            }
            Ok(crate::exit::FAILED)
        }
    }
}

/// Publishes the operator's control message for the rollout and waits up to 15 s for a
/// controller to apply it: its sequence number, and the rollout's phase once applied (`None`:
/// it waits on the broker for a controller). A rollout that does not exist, or whose phase the
/// action does not apply to, is a usage error.
pub async fn steer_once(ctx: &Ctx, id: &RolloutId, action: Action, by: String) -> Result<(u64, Option<Phase>)> {
    let id = id.clone();
    let (mut session, world) = read(ctx, "the rollouts", false).await?;
    if !world.rollouts.specs.contains_key(&id) {
        session.disconnect().await;
        return Err(usage(format!("the broker has no rollout {id}")));
    }
    if let Some(st) = world.rollouts.states.get(&id).filter(|st| !action.applies(st.phase)) {
        session.disconnect().await;
        return Err(usage(format!("rollout {id} is {}: nothing to {}", st.phase.as_str(), action.as_str())));
    }
    let seq = world
        .rollouts
        .controls
        .get(&id)
        .map_or(0, |c| c.seq)
        .max(world.rollouts.states.get(&id).map_or(0, |s| s.control_seq))
        + 1;
    let control = RolloutControl { v: CONTRACT_VERSION, seq, action, by, ts: time::now() };
    let (topic, payload) = publish_json(&ctx.topics, Topic::Rollout(id.clone(), RolloutPart::Control), &control);
    session.publish(topic, payload, true).await?;
    // Until a controller applies it, it only waits on the broker: say which.
    let state_topic = ctx.topics.name(&Topic::Rollout(id.clone(), RolloutPart::State));
    let applied = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let m = session.recv().await?;
            if m.topic == state_topic {
                if let Ok(st) = serde_json::from_slice::<RolloutState>(&m.payload) {
                    if st.control_seq >= seq {
                        return Ok::<_, anyhow::Error>(st);
                    }
                }
            }
        }
    })
    .await;
    session.close().await?;
    match applied {
        Ok(Ok(st)) => Ok((seq, Some(st.phase))),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok((seq, None)),
    }
}

/// One rollout as this controller sees it.
enum Claim {
    /// Someone else's live lease, or nothing to do.
    Idle,
    /// Our claim is on its way; ours if it is still the broker's at `at + CLAIM_SETTLE_MS`.
    Claimed {
        at: i64,
    },
    Held {
        controller: Box<Controller>,
        renewed: i64,
        published: Option<RolloutState>,
    },
}

pub async fn drive(ctx: &Ctx, exit_when_done: bool) -> Result<u8> {
    let holder = format!("controller-{:08x}", fastrand::u32(..));
    let (session, mut world) = read(ctx, "the fleet, its desired state and rollouts", true).await?;
    eprintln!("debfleet: rollout controller {holder} driving the rollouts at {}", ctx.broker);
    let mut claims: BTreeMap<RolloutId, Claim> = BTreeMap::new();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut session = session;
    loop {
        tokio::select! {
            m = session.recv() => {
                let m = m?;
                world.apply(&ctx.topics, &m.topic, &m.payload);
                continue;
            }
            _ = tick.tick() => {}
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
        let now = time::now_unix_ms();
        let mut sends: Vec<(String, Vec<u8>)> = Vec::new();
        let ids: Vec<RolloutId> = world.rollouts.specs.keys().cloned().collect();
        let mut busy = false;
        for id in ids {
            let spec = world.rollouts.specs[&id].clone();
            let state = world.rollouts.states.get(&id);
            let control = world.rollouts.controls.get(&id).filter(|c| c.seq > state.map_or(0, |s| s.control_seq));
            // A rollout with nothing left to do needs no lease (an instruction wakes it).
            let done = state.is_some_and(|s| s.phase.is_final()) && control.is_none();
            let lease = world.rollouts.leases.get(&id);
            let ours = lease.is_some_and(|l| l.holder == holder);
            let free = lease.is_none_or(|l| l.expires_ms <= now || l.holder == holder);
            let claim = claims.remove(&id).unwrap_or(Claim::Idle);
            let lease_msg = |expires_ms| {
                publish_json(
                    &ctx.topics,
                    Topic::Rollout(id.clone(), RolloutPart::Lease),
                    &Lease { v: CONTRACT_VERSION, holder: holder.clone(), expires_ms },
                )
            };
            let next = match claim {
                Claim::Idle if done || !free => Claim::Idle,
                Claim::Idle => {
                    sends.push(lease_msg(now + LEASE_MS));
                    Claim::Claimed { at: now }
                }
                Claim::Claimed { at } if now < at + CLAIM_SETTLE_MS => Claim::Claimed { at },
                Claim::Claimed { .. } if !ours => Claim::Idle,
                Claim::Claimed { .. } => {
                    eprintln!("debfleet: driving rollout {id}");
                    let resumed = world.rollouts.states.get(&id).cloned();
                    let controller = Box::new(Controller::new(spec.clone(), resumed.clone(), now));
                    Claim::Held { controller, renewed: now, published: resumed }
                }
                // Another controller took it (ours lapsed, e.g. this process was stopped).
                Claim::Held { .. } if !ours => {
                    eprintln!(
                        "debfleet: rollout {id} is driven by {} now",
                        lease.map(|l| l.holder.as_str()).unwrap_or("?")
                    );
                    Claim::Idle
                }
                Claim::Held { mut controller, mut renewed, mut published } => {
                    let view = world.view(&spec, Some(&controller.state));
                    let mut outs = Vec::new();
                    if let Some(c) = control {
                        outs.extend(controller.control(c, &view, now));
                    }
                    outs.extend(controller.step(&view, now));
                    for o in outs {
                        sends.push(match o {
                            Out::Device { device, record } => {
                                publish_json(&ctx.topics, Topic::DesiredDevice(device), &record)
                            }
                            Out::Group(record) => {
                                publish_json(&ctx.topics, Topic::DesiredGroup(spec.group.clone()), &record)
                            }
                        });
                    }
                    if published.as_ref() != Some(&controller.state) {
                        sends.push(publish_json(
                            &ctx.topics,
                            Topic::Rollout(id.clone(), RolloutPart::State),
                            &controller.state,
                        ));
                        published = Some(controller.state.clone());
                    }
                    if controller.state.phase.is_final() {
                        // Released: the next instruction is taken by whichever controller sees it.
                        sends.push((ctx.topics.name(&Topic::Rollout(id.clone(), RolloutPart::Lease)), Vec::new()));
                        eprintln!("debfleet: rollout {id} {}", controller.state.phase.as_str());
                        Claim::Idle
                    } else {
                        if now - renewed >= LEASE_MS / 3 {
                            sends.push(lease_msg(now + LEASE_MS));
                            renewed = now;
                        }
                        Claim::Held { controller, renewed, published }
                    }
                }
            };
            busy |= !matches!(next, Claim::Idle) || !done;
            claims.insert(id, next);
        }
        for (topic, payload) in sends {
            session.publish(topic, payload, true).await?;
        }
        if exit_when_done && !busy {
            break;
        }
    }
    // Leases held are given up, so another controller can go on at once.
    for (id, claim) in &claims {
        if matches!(claim, Claim::Held { .. }) {
            session.publish(ctx.topics.name(&Topic::Rollout(id.clone(), RolloutPart::Lease)), Vec::new(), true).await?;
        }
    }
    session.close().await?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_shares_and_pairs_parse() {
        assert_eq!(duration_s("90").unwrap(), 90);
        assert_eq!(duration_s("5m").unwrap(), 300);
        assert_eq!(duration_s("2h").unwrap(), 7200);
        for bad in ["", "m", "5x", "-1", "31d", "1.5h"] {
            assert!(duration_s(bad).is_err(), "{bad}");
        }
        assert_eq!(percent("95%").unwrap(), 95);
        assert!(percent("0%").is_err() && percent("101").is_err());
        assert_eq!(pairs(&["app=2.0".into()]).unwrap()["app"], Target::Version("2.0".into()));
        assert!(pairs(&["app=latest".into()]).is_err());
        assert!(pairs(&["app".into()]).is_err());
    }
}
