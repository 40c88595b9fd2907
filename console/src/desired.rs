//! `debfleet desired ...`: the desired-state records of groups and devices (set, unset, clear)
//! and where each device stands against them (show), from the retained set.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use clap::Subcommand;
use debfleet_protocol::desired::{Convergence, DesiredRecord, DesiredReport, Target, Window};
use debfleet_protocol::{time, DeviceId, GroupName, Topic, CONTRACT_VERSION};
use serde_json::{json, Value};

use crate::cmds::{read_retained, usage};
use crate::fleet::{Device, Fleet};
use crate::output::table;
use crate::session::Session;
use crate::Ctx;

#[derive(Subcommand)]
pub enum DesiredCommand {
    /// Set packages in a group's or a device's record: PKG=VERSION, PKG=latest,
    /// PKG=latest/SUITE or PKG=absent (the record's other packages stay); raises its revision.
    Set {
        /// The device (unless --group), then NAME=TARGET pairs (none: only --window changes).
        words: Vec<String>,
        /// The group whose record this is (instead of a device).
        #[arg(long)]
        group: Option<String>,
        /// Replace the whole record with these packages.
        #[arg(long)]
        replace: bool,
        /// Install only inside this window of the devices' local time, downloading ahead
        /// (02:00-04:00; 22:00-02:00 spans midnight); `any` removes it [default: the record's].
        #[arg(long, value_name = "HH:MM-HH:MM")]
        window: Option<String>,
        /// Print JSON instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Take packages out of a record (they stay installed; the record stops asking).
    Unset {
        /// The device (unless --group), then package names.
        #[arg(required = true)]
        words: Vec<String>,
        /// The group whose record this is (instead of a device).
        #[arg(long)]
        group: Option<String>,
        /// Print JSON instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Delete a record (nothing is removed from devices).
    Clear {
        /// The device whose own record this is.
        device: Option<String>,
        /// The group whose record this is.
        #[arg(long, conflicts_with = "device")]
        group: Option<String>,
        /// Print JSON instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// The records, and where each device stands against them.
    Show {
        /// Only this device (its record and its groups').
        device: Option<String>,
        /// Only this group's record and its devices.
        #[arg(long, conflicts_with = "device")]
        group: Option<String>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

/// Whose record: a device's own (named first among `words` when there is no group), or a group's.
fn scope(device: Option<&str>, group: Option<&str>) -> Result<Topic> {
    match (device, group) {
        (Some(d), None) => Ok(Topic::DesiredDevice(DeviceId::new(d).map_err(|e| usage(e.to_string()))?)),
        (None, Some(g)) => Ok(Topic::DesiredGroup(GroupName::new(g).map_err(|e| usage(e.to_string()))?)),
        _ => Err(usage("name a device, or a group with --group")),
    }
}

/// The record's topic and the rest of the words.
/// `packages_optional`: only the window changes (`desired set DEVICE --window W`).
fn split(words: &[String], group: Option<&str>, packages_optional: bool) -> Result<(Topic, Vec<String>)> {
    match group {
        Some(_) if words.is_empty() && !packages_optional => Err(usage("name the packages")),
        Some(_) => Ok((scope(None, group)?, words.to_vec())),
        None => {
            let (first, rest) = words.split_first().ok_or_else(|| usage("name a device, or a group with --group"))?;
            if rest.is_empty() && !packages_optional {
                return Err(usage(format!("name the packages after the device {first}")));
            }
            Ok((scope(Some(first), None)?, rest.to_vec()))
        }
    }
}

/// A record's name in reports and tables: `device` on the device's own rows, `group/G`.
fn source_name(t: &Topic) -> String {
    match t {
        Topic::DesiredDevice(d) => format!("device/{d}"),
        Topic::DesiredGroup(g) => format!("group/{g}"),
        _ => String::new(),
    }
}

/// The fleet and every desired-state record, read from the retained set (and the names of all
/// records the broker holds, readable or not).
async fn read(ctx: &Ctx) -> Result<(Session, Fleet, BTreeMap<String, DesiredRecord>, BTreeSet<String>)> {
    let filters = [ctx.topics.fleet_filter(), ctx.topics.desired_filter()];
    let (session, retained) = read_retained(ctx, "the fleet and its desired state", &filters).await?;
    let (mut fleet, mut records, mut present) = (Fleet::default(), BTreeMap::new(), BTreeSet::new());
    for m in retained {
        match ctx.topics.parse(&m.topic) {
            Ok(t @ (Topic::DesiredDevice(_) | Topic::DesiredGroup(_))) if !m.payload.is_empty() => {
                present.insert(source_name(&t));
                match DesiredRecord::parse(&m.payload) {
                    Ok(r) => {
                        records.insert(source_name(&t), r);
                    }
                    Err(e) => eprintln!("debfleet: ignoring the record on {}: {e}", m.topic),
                }
            }
            _ => {
                if let crate::fleet::Change::Invalid(why) = fleet.apply(&ctx.topics, &m.topic, &m.payload) {
                    eprintln!("debfleet: ignoring an invalid message: {why}");
                }
            }
        }
    }
    Ok((session, fleet, records, present))
}

fn parse_pairs(words: &[String]) -> Result<BTreeMap<String, Target>> {
    let mut out = BTreeMap::new();
    for w in words {
        let Some((name, target)) = w.split_once('=') else {
            return Err(usage(format!("{w:?}: write NAME=VERSION, NAME=latest, NAME=latest/SUITE or NAME=absent")));
        };
        if !debfleet_protocol::debian::valid_package_name(name) {
            return Err(usage(format!("{name:?} is not a Debian package name")));
        }
        out.insert(name.to_owned(), Target::parse(target).map_err(|e| usage(format!("{name}: {e}")))?);
    }
    Ok(out)
}

fn packages_text(p: &BTreeMap<String, Target>) -> String {
    if p.is_empty() {
        return "(none)".into();
    }
    p.iter().map(|(n, t)| format!("{n}={t}")).collect::<Vec<_>>().join(" ")
}

pub async fn run(ctx: &Ctx, command: DesiredCommand) -> Result<u8> {
    match command {
        DesiredCommand::Set { words, group, replace, window, json } => {
            let (topic, packages) = split(&words, group.as_deref(), window.is_some() && !replace)?;
            let pairs = parse_pairs(&packages)?;
            let window = match window.as_deref() {
                None => None,
                Some("any") => Some(None),
                Some(w) => Some(Some(Window::parse(w).map_err(usage)?)),
            };
            write(ctx, &topic, json, window, |old| {
                let mut p = if replace { BTreeMap::new() } else { old };
                p.extend(pairs);
                Ok(p)
            })
            .await
        }
        DesiredCommand::Unset { words, group, json } => {
            let (topic, packages) = split(&words, group.as_deref(), false)?;
            write(ctx, &topic, json, None, |mut old| {
                for name in &packages {
                    if old.remove(name).is_none() {
                        return Err(usage(format!("{name} is not in the record")));
                    }
                }
                Ok(old)
            })
            .await
        }
        DesiredCommand::Clear { device, group, json } => {
            let topic = scope(device.as_deref(), group.as_deref())?;
            let (mut session, _, _, present) = read(ctx).await?;
            let name = source_name(&topic);
            session.publish(ctx.topics.name(&topic), Vec::new(), true).await?;
            session.note_desired(&ctx.topics, &name, false).await;
            session.close().await?;
            if json {
                println!("{}", json!({"record": name, "cleared": present.contains(&name)}));
            } else if present.contains(&name) {
                println!("{name}: record deleted (devices keep what they have)");
            } else {
                println!("{name}: there was no record");
            }
            Ok(0)
        }
        DesiredCommand::Show { device, group, json } => show(ctx, device, group, json).await,
    }
}

/// Reads the record, changes its packages, and publishes it with the next revision.
async fn write(
    ctx: &Ctx,
    topic: &Topic,
    json: bool,
    window: Option<Option<Window>>,
    change: impl FnOnce(BTreeMap<String, Target>) -> Result<BTreeMap<String, Target>>,
) -> Result<u8> {
    let (mut session, fleet, records, _) = read(ctx).await?;
    let name = source_name(topic);
    let old = records.get(&name);
    let record = DesiredRecord {
        v: CONTRACT_VERSION,
        revision: old.map_or(1, |r| r.revision + 1),
        packages: change(old.map(|r| r.packages.clone()).unwrap_or_default())?,
        by: ctx.by.clone(),
        window: window.unwrap_or_else(|| old.and_then(|r| r.window)),
        ts: time::now(),
    };
    record.check().map_err(usage)?;
    let payload = serde_json::to_vec(&record)?;
    session.publish(ctx.topics.name(topic), payload, true).await?;
    session.note_desired(&ctx.topics, &name, true).await;
    session.close().await?;
    let devices: Vec<DeviceId> = match topic {
        Topic::DesiredGroup(g) => fleet.members(g),
        Topic::DesiredDevice(d) => vec![d.clone()],
        _ => vec![],
    };
    if json {
        println!(
            "{}",
            json!({"record": name, "revision": record.revision, "packages": record.packages, "devices": devices})
        );
    } else {
        println!("{name}: revision {} — {}", record.revision, packages_text(&record.packages));
        let known = devices.iter().filter(|d| fleet.devices.contains_key(*d)).count();
        match topic {
            Topic::DesiredGroup(_) => println!("{known} device(s) in the group converge on it (debfleet desired show)"),
            _ if known == 0 => println!("the broker has no facts of this device yet: it converges when it connects"),
            _ => println!("the device converges on it (debfleet desired show {})", devices[0]),
        }
    }
    Ok(0)
}

/// Where one device stands: its report judged against the records that apply to it now.
fn standing(id: &DeviceId, d: &Device, records: &BTreeMap<String, DesiredRecord>) -> (String, String, String) {
    let mut applies: BTreeMap<String, u64> = records
        .iter()
        .filter(|(src, _)| {
            *src == &format!("device/{id}")
                || src.strip_prefix("group/").is_some_and(|g| d.groups().iter().any(|m| m.as_str() == g))
        })
        .map(|(src, r)| (if src.starts_with("device/") { "device".to_owned() } else { src.clone() }, r.revision))
        .collect();
    let revisions = |r: &BTreeMap<String, u64>| r.iter().map(|(s, n)| format!("{s}:{n}")).collect::<Vec<_>>().join(" ");
    let Some(report) = &d.desired else {
        let state = if applies.is_empty() { "-" } else { "pending" };
        return (state.into(), revisions(&applies), "no report yet".into());
    };
    // A record the device refused is unreadable here too: its previous revision still applies.
    for source in report.refused.keys() {
        if let Some(r) = report.revisions.get(source) {
            applies.entry(source.clone()).or_insert(*r);
        }
    }
    // A report about older revisions than the broker holds: the device has not judged the
    // current records yet (offline, or just now).
    let current = report.revisions == applies;
    let (state, mut why) = match &report.convergence {
        Convergence::Converged => ("converged", String::new()),
        Convergence::Converging { op } => ("converging", format!("op {op}")),
        Convergence::Scheduled { op, window, opens_at } => (
            "scheduled",
            format!(
                "installs in {window} (device time), next at {opens_at}{}",
                op.as_ref().map(|o| format!("; op {o} downloaded")).unwrap_or_default()
            ),
        ),
        Convergence::Blocked { op, error } => (
            "blocked",
            format!(
                "{}: {}{}",
                error.code.as_str(),
                error.message,
                op.as_ref().map(|o| format!(" (op {o})")).unwrap_or_default()
            ),
        ),
    };
    for (source, reason) in &report.refused {
        why.push_str(&format!("{}refused {source}: {reason}", if why.is_empty() { "" } else { "; " }));
    }
    if current {
        (state.into(), revisions(&report.revisions), why)
    } else {
        ("pending".into(), revisions(&applies), format!("last report: {state} at {}", revisions(&report.revisions)))
    }
}

async fn show(ctx: &Ctx, device: Option<String>, group: Option<String>, json: bool) -> Result<u8> {
    let device = device.map(|d| DeviceId::new(d).map_err(|e| usage(e.to_string()))).transpose()?;
    let group = group.map(|g| GroupName::new(g).map_err(|e| usage(e.to_string()))).transpose()?;
    let (session, fleet, records, _) = read(ctx).await?;
    session.disconnect().await;
    let wanted = |id: &DeviceId, d: &Device| match (&device, &group) {
        (Some(want), _) => want == id,
        (None, Some(g)) => d.groups().contains(g),
        (None, None) => true,
    };
    let shown_records: BTreeMap<&String, &DesiredRecord> = records
        .iter()
        .filter(|(src, _)| match (&device, &group) {
            (Some(id), _) => {
                **src == format!("device/{id}")
                    || fleet.devices.get(id).is_some_and(|d| d.groups().iter().any(|g| **src == format!("group/{g}")))
            }
            (None, Some(g)) => **src == format!("group/{g}"),
            (None, None) => true,
        })
        .collect();
    let rows: Vec<(DeviceId, (String, String, String))> = fleet
        .devices
        .iter()
        .filter(|(id, d)| wanted(id, d))
        .map(|(id, d)| (id.clone(), standing(id, d, &records)))
        .filter(|(_, (state, _, _))| state != "-" || device.is_some())
        .collect();
    if json {
        let devices: serde_json::Map<String, Value> = rows
            .iter()
            .map(|(id, (state, revisions, why))| {
                let report: Option<&DesiredReport> = fleet.devices.get(id).and_then(|d| d.desired.as_ref());
                (id.to_string(), json!({"state": state, "revisions": revisions, "detail": why, "report": report}))
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json!({"records": shown_records, "devices": devices}))?);
        return Ok(0);
    }
    if shown_records.is_empty() {
        println!("no desired-state records");
    } else {
        let rows: Vec<Vec<String>> = shown_records
            .iter()
            .map(|(src, r)| {
                vec![
                    (*src).clone(),
                    r.revision.to_string(),
                    r.by.clone().unwrap_or_default(),
                    packages_text(&r.packages),
                ]
            })
            .collect();
        print!("{}", table(&["RECORD", "REVISION", "BY", "PACKAGES"], &rows));
    }
    if !rows.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = rows
            .into_iter()
            .map(|(id, (state, revisions, why))| {
                let status = fleet.devices.get(&id).map(Device::status_word).unwrap_or("unknown");
                vec![id.to_string(), status.into(), state, revisions, why]
            })
            .collect();
        print!("{}", table(&["DEVICE", "STATUS", "DESIRED", "REVISIONS", "DETAIL"], &rows));
    }
    Ok(0)
}
