//! `debfleet watch`: live status changes, operation progress, logs and telemetry.

use anyhow::Result;
use debfleet_protocol::{DeviceId, GroupName, LogBatch, Rejected, Topic};
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};

use crate::cmds::UsageError;
use crate::fleet::Fleet;
use crate::session::Session;
use crate::Ctx;

pub async fn run(ctx: &Ctx, device: Option<String>, group: Option<String>, json: bool) -> Result<u8> {
    let device = device.map(|d| DeviceId::new(d).map_err(|e| UsageError(e.to_string()))).transpose()?;
    let group = group.map(|g| GroupName::new(g).map_err(|e| UsageError(e.to_string()))).transpose()?;
    let mut session = Session::connect(ctx.connect_options()).await?;
    let filter = match &device {
        Some(d) => ctx.topics.device_filter(d),
        None => ctx.topics.fleet_filter(),
    };
    session.subscribe(&[filter]).await?;
    if !json {
        eprintln!(
            "watching {} (Ctrl-C to stop)",
            device
                .as_ref()
                .map(|d| d.to_string())
                .or(group.as_ref().map(|g| format!("group {g}")))
                .unwrap_or_else(|| "the fleet".into())
        );
    }
    let mut fleet = Fleet::default();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    loop {
        let msg = tokio::select! {
            m = session.recv() => m?,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        };
        fleet.apply(&ctx.topics, &msg.topic, &msg.payload);
        // Retained messages are the state before watching started; only changes are shown.
        if msg.retained {
            continue;
        }
        let Ok(topic) = ctx.topics.parse(&msg.topic) else {
            continue;
        };
        let Some(dev) = topic.device().cloned() else {
            continue;
        };
        if let Some(g) = &group {
            if !fleet.devices.get(&dev).is_some_and(|d| d.groups().contains(g)) {
                continue;
            }
        }
        if let Some((kind, data, text)) = describe(&topic, &msg.payload) {
            if json {
                println!(
                    "{}",
                    json!({"ts": debfleet_protocol::time::now(), "device": dev, "kind": kind, "data": data})
                );
            } else {
                let now = debfleet_protocol::time::now();
                println!("{}  {dev}  {kind:<9}  {text}", &now[11..23]);
            }
        }
    }
    session.disconnect().await;
    Ok(0)
}

fn describe(topic: &Topic, payload: &[u8]) -> Option<(&'static str, Value, String)> {
    let data: Value = if payload.is_empty() { Value::Null } else { serde_json::from_slice(payload).ok()? };
    let text = match topic {
        Topic::Status(_) => {
            return Some((
                "status",
                data.clone(),
                format!("{} since {}", data["state"].as_str()?, data["since"].as_str()?),
            ));
        }
        Topic::Op(_, id) => {
            if data.is_null() {
                return Some(("op", data, format!("{id} cleared")));
            }
            let mut t = format!("{id} {} {}", data["verb"].as_str()?, data["state"].as_str()?);
            if let Some(p) = data["phase"].as_str() {
                t.push_str(&format!(" ({p})"));
            }
            if let Some(pc) = data["percent"].as_u64() {
                t.push_str(&format!(" {pc}%"));
            }
            if let Some(e) = data.get("error").filter(|e| !e.is_null()) {
                t.push_str(&format!(" {}: {}", e["code"].as_str().unwrap_or("?"), e["message"].as_str().unwrap_or("")));
            }
            t
        }
        Topic::Logs(_) => {
            let batch: LogBatch = serde_json::from_value(data.clone()).ok()?;
            let mut lines: Vec<String> = batch.lines.iter().map(|l| format!("{:<5} {}", l.level, l.msg)).collect();
            if batch.dropped > 0 {
                lines.push(format!("({} lines dropped by the rate limit)", batch.dropped));
            }
            lines.join("\n                                 ")
        }
        Topic::Telemetry(_) => {
            let mut parts = Vec::new();
            if let Some(c) = data["cpu"].as_f64() {
                parts.push(format!("cpu={c:.1}%"));
            }
            if let Some(m) = data["memory"].as_f64() {
                parts.push(format!("mem={m:.1}%"));
            }
            if let Some(d) = data["disk"].as_object() {
                for (k, v) in d {
                    parts.push(format!("disk{k}={:.1}%", v.as_f64().unwrap_or(0.0)));
                }
            }
            parts.join(" ")
        }
        Topic::Rejected(_) => {
            let r: Rejected = serde_json::from_value(data.clone()).ok()?;
            format!("{} on {}: {}", r.code.as_str(), r.topic, r.message)
        }
        Topic::Meta(_) => return Some(("meta", data, "identity republished".into())),
        Topic::Cfg(_) => return Some(("cfg", data, "configuration published".into())),
        Topic::StatePackages(_) => return Some(("packages", data, "package state published".into())),
        _ => return None,
    };
    let kind = match topic {
        Topic::Op(..) => "op",
        Topic::Logs(_) => "log",
        Topic::Telemetry(_) => "telemetry",
        _ => "rejected",
    };
    Some((kind, data, text))
}
