//! The request/response subcommands.

use std::time::Duration;

use anyhow::{bail, Result};
use debfleet_protocol::cfg::patch_from_assignments;
use debfleet_protocol::CommandArgs;
use debfleet_protocol::{DeviceId, GroupName};
use serde_json::{json, Value};

use crate::exit;
use crate::fleet::{Device, Fleet};
use crate::output::{ago, flatten, table, Spinner};
use crate::request::{send_and_wait, Outcome, Request, Target};
use crate::session::{Message, Session};
use crate::{Ctx, Targets};

/// Invalid input from the operator (exit status 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// An operator's input error (exit status 2) with this message.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

fn device_id(s: &str) -> Result<DeviceId> {
    DeviceId::new(s).map_err(|e| usage(e.to_string()))
}

/// Connects and reads the whole retained fleet.
/// Connects and reads the retained messages under `filters` (with a spinner naming `what`).
pub async fn read_retained(ctx: &Ctx, what: &str, filters: &[String]) -> Result<(Session, Vec<Message>)> {
    let mut session = Session::connect(ctx.connect_options()).await?;
    let spinner = Spinner::start(format!("reading {what} from the broker"));
    let retained = session.retained(&ctx.topics, filters).await?;
    drop(spinner);
    Ok((session, retained))
}

pub async fn load_fleet(ctx: &Ctx) -> Result<(Session, Fleet)> {
    let (session, retained) = read_retained(ctx, "the fleet", &[ctx.topics.fleet_filter()]).await?;
    let mut fleet = Fleet::default();
    for m in retained {
        if let crate::fleet::Change::Invalid(why) = fleet.apply(&ctx.topics, &m.topic, &m.payload) {
            eprintln!("debfleet: ignoring an invalid message: {why}");
        }
    }
    Ok((session, fleet))
}

fn device_row(id: &DeviceId, d: &Device) -> Vec<String> {
    let since = d.since().map(ago).unwrap_or_default();
    let version = d.meta.as_ref().map(|m| m.agent_version.clone()).unwrap_or_default();
    let groups = d.groups().iter().map(|g| g.as_str()).collect::<Vec<_>>().join(",");
    vec![id.to_string(), d.status_word().into(), since, version, groups]
}

fn device_json(id: &DeviceId, d: &Device) -> Value {
    json!({
        "id": id,
        "status": d.status_word(),
        "since": d.status.as_ref().map(|s| s.since.clone()),
        "last_heard": d.last_heard(),
        "agent_version": d.meta.as_ref().map(|m| m.agent_version.clone()),
        "groups": d.groups(),
        "hostname": d.meta.as_ref().map(|m| m.hostname.clone()),
    })
}

pub async fn devices(ctx: &Ctx, json: bool) -> Result<u8> {
    let (session, fleet) = load_fleet(ctx).await?;
    session.disconnect().await;
    if json {
        let list: Vec<Value> = fleet.devices.iter().map(|(id, d)| device_json(id, d)).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if fleet.devices.is_empty() {
        println!("no devices known to the broker at {}", ctx.broker);
    } else {
        let rows: Vec<Vec<String>> = fleet.devices.iter().map(|(id, d)| device_row(id, d)).collect();
        print!("{}", table(&["DEVICE", "STATUS", "SINCE", "AGENT", "GROUPS"], &rows));
    }
    Ok(0)
}

pub fn known<'a>(fleet: &'a Fleet, id: &DeviceId) -> Result<&'a Device> {
    fleet.devices.get(id).ok_or_else(|| anyhow::anyhow!("device {id} is not known to the broker"))
}

pub async fn show(ctx: &Ctx, device: &str, json: bool) -> Result<u8> {
    let id = device_id(device)?;
    let (session, fleet) = load_fleet(ctx).await?;
    session.disconnect().await;
    let d = known(&fleet, &id)?;
    let ops: Vec<&debfleet_protocol::OpRecord> = d.ops.values().collect();
    let transfer = Transfer::of(&ops);
    let all = json!({
        "id": id,
        "meta": d.meta,
        "status": d.status,
        "cfg": d.cfg,
        "packages": d.packages,
        "telemetry": d.telemetry,
        "link": d.link,
        "components": d.components,
        "component": d.component,
        "last_heard": d.last_heard(),
        "transfer": transfer,
        "ops": ops,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(0);
    }
    let when = match (&d.status, d.last_heard()) {
        (Some(s), Some(heard)) if s.state == debfleet_protocol::Liveness::Lost => {
            format!("last heard {heard} ({}); its connection began {}", ago(heard), s.since)
        }
        (Some(s), _) => format!("since {} ({})", s.since, ago(&s.since)),
        (None, _) => String::new(),
    };
    println!("{id}: {} {when}", d.status_word());
    if let Some(m) = &d.meta {
        let groups = m.groups.iter().map(|g| g.as_str()).collect::<Vec<_>>().join(", ");
        let rows = vec![
            vec!["hostname".into(), m.hostname.clone()],
            vec!["os".into(), if m.os.pretty_name.is_empty() { m.os.id.clone() } else { m.os.pretty_name.clone() }],
            vec!["arch".into(), m.arch.clone()],
            vec!["kernel".into(), m.kernel.clone()],
            vec!["boot id".into(), m.boot_id.clone()],
            vec!["agent".into(), m.agent_version.clone()],
            vec!["groups".into(), groups],
        ];
        print!("\n{}", table(&["META", ""], &rows));
    }
    if let Some(t) = &d.telemetry {
        let mut rows = Vec::new();
        if let Some(c) = t.cpu {
            rows.push(vec!["cpu".into(), format!("{c:.1}%")]);
        }
        if let Some(m) = t.memory {
            rows.push(vec!["memory".into(), format!("{m:.1}%")]);
        }
        for (mount, v) in &t.disk {
            rows.push(vec![format!("disk {mount}"), format!("{v:.1}%")]);
        }
        let title = match t.window_s {
            Some(w) => format!("TELEMETRY ({}, means over {})", ago(&t.ts), crate::output::duration_words(w.into())),
            None => format!("TELEMETRY ({})", ago(&t.ts)),
        };
        print!("\n{}", table(&[&title, ""], &rows));
    }
    if let Some(l) = &d.link {
        print!("\n{}", link_table(l));
    }
    if let Some(p) = &d.packages {
        let rows: Vec<Vec<String>> = p
            .packages
            .iter()
            .map(|(n, s)| vec![n.clone(), s.version.clone().unwrap_or_else(|| "-".into()), s.status.clone()])
            .collect();
        if !rows.is_empty() {
            print!("\n{}", table(&["PACKAGE", "VERSION", "STATUS"], &rows));
        }
    }
    if let Some(t) = crate::components::components_table(d) {
        print!("\n{t}");
    }
    if let Some(c) = &d.cfg {
        let rows: Vec<Vec<String>> = flatten(&c.cfg.full_value()).into_iter().map(|(k, v)| vec![k, v]).collect();
        print!("\n{}", table(&["CFG", "VALUE"], &rows));
    }
    if transfer.operations > 0 {
        let saved = transfer.full_bytes.saturating_sub(transfer.fetched_bytes);
        let rows = vec![
            vec!["fetched".into(), crate::packages::bytes(transfer.fetched_bytes)],
            vec!["whole packages and indices".into(), crate::packages::bytes(transfer.full_bytes)],
            vec![
                "saved".into(),
                format!(
                    "{} ({:.0}%), {} package(s) by delta",
                    crate::packages::bytes(saved),
                    100.0 * saved as f64 / transfer.full_bytes.max(1) as f64,
                    transfer.by_delta
                ),
            ],
        ];
        print!("\n{}", table(&[&format!("TRANSFER ({} operations held)", transfer.operations), ""], &rows));
    }
    if !ops.is_empty() {
        print!("\n{}", ops_table(&ops));
    }
    Ok(0)
}

/// `state/link` as a table: today's bytes by class against the budget.
fn link_table(l: &debfleet_protocol::LinkState) -> String {
    use crate::packages::bytes;
    let mut rows: Vec<Vec<String>> =
        l.classes.iter().map(|(c, b)| vec![c.as_str().to_owned(), bytes(b.sent), bytes(b.received)]).collect();
    let sent: u64 = l.classes.values().map(|c| c.sent).sum();
    let received: u64 = l.classes.values().map(|c| c.received).sum();
    rows.push(vec!["total".into(), bytes(sent), bytes(received)]);
    let budget = if l.budget == 0 {
        "no budget".to_owned()
    } else {
        format!("{:.0}% of {} a day", 100.0 * sent as f64 / l.budget as f64, bytes(l.budget))
    };
    let session = if l.session_present { "kept session" } else { "new session" };
    let title = format!(
        "LINK {} ({}; {}, keepalive {} s, {session}; {budget}; {} reconnects, {} dropped, {} waiting)",
        l.day,
        l.profile.as_str(),
        ago(&l.ts),
        l.keepalive_s,
        l.reconnects,
        l.dropped,
        l.outbox
    );
    table(&[&title, "SENT", "RECEIVED"], &rows)
}

/// What a device's package operations fetched, over the operation records the broker holds.
#[derive(serde::Serialize, Default)]
struct Transfer {
    operations: usize,
    fetched_bytes: u64,
    full_bytes: u64,
    by_delta: usize,
}

impl Transfer {
    fn of(ops: &[&debfleet_protocol::OpRecord]) -> Transfer {
        let mut t = Transfer::default();
        for r in ops.iter().filter_map(|o| o.result.as_ref()) {
            let Ok(r) = serde_json::from_value::<debfleet_protocol::PackageResult>(r.clone()) else { continue };
            if r.dry_run {
                continue;
            }
            t.operations += 1;
            t.fetched_bytes += r.download_bytes + r.index_bytes;
            t.full_bytes += r.full_bytes.max(r.download_bytes + r.index_bytes);
            t.by_delta += r.fetches.iter().filter(|f| f.method == debfleet_protocol::FetchMethod::Delta).count();
        }
        t
    }
}

fn ops_table(ops: &[&debfleet_protocol::OpRecord]) -> String {
    let mut ops = ops.to_vec();
    ops.sort_by(|a, b| a.accepted_at.cmp(&b.accepted_at));
    let rows: Vec<Vec<String>> = ops
        .iter()
        .map(|r| {
            let detail = match (&r.error, &r.result) {
                (Some(e), _) => format!("{}: {}", e.code.as_str(), e.message),
                (None, Some(v)) => v.to_string(),
                _ => String::new(),
            };
            let by = r.by.clone().unwrap_or_else(|| "-".into());
            vec![r.id.to_string(), r.verb.clone(), r.state.as_str().into(), by, ago(&r.updated_at), detail]
        })
        .collect();
    table(&["OPERATION", "VERB", "STATE", "BY", "UPDATED", "DETAIL"], &rows)
}

fn targets(t: &Targets) -> Result<Target> {
    if t.all {
        return Ok(Target::All);
    }
    if let Some(g) = &t.group {
        return Ok(Target::Group(GroupName::new(g.as_str()).map_err(|e| usage(e.to_string()))?));
    }
    if t.devices.is_empty() {
        bail!(usage("name devices, or use --group G or --all"));
    }
    Ok(Target::Devices(t.devices.iter().map(|d| device_id(d)).collect::<Result<_>>()?))
}

fn print_outcomes(outcomes: &[Outcome], json: bool) -> Result<u8> {
    if json {
        let list: Vec<Value> = outcomes.iter().map(Outcome::to_json).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        let rows: Vec<Vec<String>> = outcomes
            .iter()
            .map(|o| {
                vec![
                    o.device.to_string(),
                    if o.ok { "ok".into() } else { "FAILED".into() },
                    o.rtt_ms.map(|r| format!("{r} ms")).unwrap_or_else(|| "-".into()),
                    o.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        print!("{}", table(&["DEVICE", "RESULT", "RTT", "DETAIL"], &rows));
    }
    Ok(if outcomes.iter().all(|o| o.ok) { 0 } else { exit::FAILED })
}

/// A timeout from the command line, checked (exit status 2 when out of range).
pub fn seconds(s: f64) -> Result<Duration> {
    if !(s.is_finite() && s > 0.0 && s <= 86_400.0) {
        bail!(usage(format!("timeout {s} must be between 0 and 86400 seconds")));
    }
    Ok(Duration::from_secs_f64(s))
}

pub async fn ping(ctx: &Ctx, t: &Targets, timeout: f64, json: bool) -> Result<u8> {
    let target = targets(t)?;
    let timeout = seconds(timeout)?;
    let (mut session, mut fleet) = load_fleet(ctx).await?;
    let req = Request { target, args: CommandArgs::Ping, timeout, expires: ctx.expires, by: ctx.by.clone() };
    let outcomes = send_and_wait(&mut session, &ctx.topics, &mut fleet, &req).await?;
    session.disconnect().await;
    print_outcomes(&outcomes, json)
}

pub async fn cfg_get(ctx: &Ctx, device: &str, json: bool) -> Result<u8> {
    let id = device_id(device)?;
    let (session, fleet) = load_fleet(ctx).await?;
    session.disconnect().await;
    let cfg = known(&fleet, &id)?
        .cfg
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("device {id} has not published its configuration"))?;
    print_cfg(&cfg.cfg.full_value(), json)
}

pub fn print_cfg(v: &Value, json: bool) -> Result<u8> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        let rows: Vec<Vec<String>> = flatten(v).into_iter().map(|(k, v)| vec![k, v]).collect();
        print!("{}", table(&["KEY", "VALUE"], &rows));
    }
    Ok(0)
}

pub async fn cfg_set(ctx: &Ctx, device: &str, assignments: &[String], timeout: f64, json: bool) -> Result<u8> {
    let id = device_id(device)?;
    let timeout = seconds(timeout)?;
    let patch = patch_from_assignments(assignments).map_err(|e| usage(e.to_string()))?;
    let (mut session, mut fleet) = load_fleet(ctx).await?;
    // Check locally first so an obvious mistake names the key without a round trip.
    if let Some(cfg) = fleet.devices.get(&id).and_then(|d| d.cfg.as_ref()) {
        cfg.cfg.apply_patch(&patch).map_err(|e| usage(e.to_string()))?;
    }
    let req = Request {
        target: Target::Devices(vec![id]),
        args: CommandArgs::Cfg { set: patch },
        timeout,
        expires: ctx.expires,
        by: ctx.by.clone(),
    };
    let outcomes = send_and_wait(&mut session, &ctx.topics, &mut fleet, &req).await?;
    session.disconnect().await;
    let o = &outcomes[0];
    match (&o.record, o.ok) {
        (Some(r), true) => print_cfg(r.result.as_ref().unwrap_or(&Value::Null), json),
        _ => {
            bail!("{}: {}", o.device, o.error.clone().unwrap_or_default())
        }
    }
}

pub async fn ops(ctx: &Ctx, device: &str, clear: bool, older_than: Option<u64>, json: bool) -> Result<u8> {
    let id = device_id(device)?;
    let (mut session, mut fleet) = load_fleet(ctx).await?;
    known(&fleet, &id)?;
    if clear {
        let req = Request {
            target: Target::Devices(vec![id]),
            args: CommandArgs::Clear { ops: vec![], older_than_s: older_than },
            timeout: Duration::from_secs(10),
            expires: ctx.expires,
            by: ctx.by.clone(),
        };
        let outcomes = send_and_wait(&mut session, &ctx.topics, &mut fleet, &req).await?;
        session.disconnect().await;
        let o = &outcomes[0];
        if !o.ok {
            bail!("{}: {}", o.device, o.error.clone().unwrap_or_default());
        }
        let result = o.record.as_ref().and_then(|r| r.result.clone()).unwrap_or(Value::Null);
        if json {
            println!("{}", serde_json::to_string_pretty(&result)?);
        } else {
            let n = result["cleared"].as_array().map(|a| a.len()).unwrap_or(0);
            println!("cleared {n} finished operation(s) on {}", o.device);
        }
        return Ok(0);
    }
    session.disconnect().await;
    let d = known(&fleet, &id)?;
    let ops: Vec<&debfleet_protocol::OpRecord> = d.ops.values().collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&ops)?);
    } else if ops.is_empty() {
        println!("no operations retained for {id}");
    } else {
        print!("{}", ops_table(&ops));
    }
    Ok(0)
}

/// `debfleet logs`: the journal of a device's units (or a group's, merged by time and labelled
/// by device), read on the device by a `journal` command.
pub async fn logs(ctx: &Ctx, a: crate::LogsArgs) -> Result<u8> {
    let mut words = a.words.iter();
    let target = if a.all {
        Target::All
    } else if let Some(g) = &a.group {
        Target::Group(GroupName::new(g.as_str()).map_err(|e| usage(e.to_string()))?)
    } else {
        let device =
            words.next().ok_or_else(|| usage("name a device (or --group G, --all), then a unit if you want one"))?;
        Target::Devices(vec![device_id(device)?])
    };
    let unit = words.next().cloned();
    if let Some(extra) = words.next() {
        bail!(usage(format!("unexpected {extra:?}: logs [DEVICE] [UNIT]")));
    }
    let since_s = a.since.as_deref().map(crate::rollout::duration_s).transpose()?.map(u64::from);
    if let Some(f) = &a.follow {
        // `--follow` alone: until Ctrl-C; `--follow 30s`: that long.
        let duration = match f.as_str() {
            "" => None,
            d => Some(Duration::from_secs(crate::rollout::duration_s(d)?.into())),
        };
        let devices = match target {
            Target::Devices(d) => d,
            other => {
                let (session, fleet) = load_fleet(ctx).await?;
                session.disconnect().await;
                match other {
                    Target::Group(g) => fleet.members(&g),
                    _ => fleet.devices.keys().cloned().collect(),
                }
            }
        };
        return crate::remote::follow_logs(ctx, devices, unit, since_s, a.lines, duration, a.json).await;
    }
    let args = CommandArgs::Journal { unit, since_s, lines: a.lines, follow: None };
    let timeout = seconds(a.timeout)?;
    let (mut session, mut fleet) = load_fleet(ctx).await?;
    let req = Request { target, args, timeout, expires: ctx.expires, by: ctx.by.clone() };
    let outcomes = send_and_wait(&mut session, &ctx.topics, &mut fleet, &req).await?;
    session.disconnect().await;
    let mut lines: Vec<(String, String, Value)> = Vec::new();
    let mut failed = Vec::new();
    for o in &outcomes {
        let result = o.record.as_ref().and_then(|r| r.result.as_ref());
        match (o.ok, result) {
            (true, Some(r)) => {
                for e in r["entries"].as_array().into_iter().flatten() {
                    let ts = e["ts"].as_str().unwrap_or("").to_owned();
                    lines.push((ts, o.device.to_string(), e.clone()));
                }
                if let Some(n) = r["dropped"].as_u64().filter(|n| *n > 0) {
                    eprintln!("debfleet: {}: {n} older entries left out (the answer is bounded; narrow with --since or --lines)", o.device);
                }
            }
            _ => failed.push(format!("{}: {}", o.device, o.error.clone().unwrap_or_else(|| "no answer".into()))),
        }
    }
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    if a.json {
        let list: Vec<Value> = lines
            .iter()
            .map(|(_, d, e)| serde_json::json!({"device": d, "ts": e["ts"], "unit": e["unit"], "priority": e["priority"], "message": e["message"]}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        for (ts, d, e) in &lines {
            println!("{d}  {ts}  {}  {}", e["unit"].as_str().unwrap_or("-"), e["message"].as_str().unwrap_or(""));
        }
    }
    for f in &failed {
        eprintln!("debfleet: {f}");
    }
    Ok(if failed.is_empty() { 0 } else { crate::exit::FAILED })
}
