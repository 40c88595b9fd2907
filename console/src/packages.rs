//! Package operations from the console: install, upgrade, uninstall, rollback, restart a unit —
//! one publish per device (or one for a group or the fleet), live progress per device, a final
//! table.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Result};
use debfleet_protocol::{CommandArgs, DeviceId, OpRecord, PackageOptions, PackageResult, PackageSpec, Verb};
use serde_json::{json, Value};

use crate::cmds::{load_fleet, usage};
use crate::output::table;
use crate::request::{send, send_and_wait, Outcome, Request, Target};
use crate::{exit, Ctx};

pub struct PackageRequest {
    pub verb: Verb,
    /// Positional words: devices then the package (with --group/--all: packages only).
    pub words: Vec<String>,
    pub group: Option<String>,
    pub all: bool,
    pub purge: bool,
    pub dry_run: bool,
    pub watch_s: Option<u32>,
    pub everything: bool,
    pub timeout: f64,
    pub json: bool,
}

/// Splits the words into targets and packages, checking both.
fn parse(req: &PackageRequest) -> Result<(Target, Vec<PackageSpec>)> {
    let (target, packages) = if req.all || req.group.is_some() {
        let target = match &req.group {
            Some(g) => Target::Group(debfleet_protocol::GroupName::new(g.as_str()).map_err(|e| usage(e.to_string()))?),
            None => Target::All,
        };
        (target, req.words.clone())
    } else {
        let mut words = req.words.clone();
        let packages =
            if req.verb == Verb::Upgrade && req.everything { Vec::new() } else { words.pop().into_iter().collect() };
        if words.is_empty() {
            bail!(usage(format!(
                "usage: debfleet {} (DEVICE... | --group G | --all) PACKAGE[=VERSION]",
                req.verb.as_str()
            )));
        }
        let devices =
            words.iter().map(|d| DeviceId::new(d.as_str()).map_err(|e| usage(e.to_string()))).collect::<Result<_>>()?;
        (Target::Devices(devices), packages)
    };
    // Checked here with the protocol's own parser, the one the agent uses.
    let packages: Vec<PackageSpec> =
        packages.iter().map(|p| PackageSpec::parse(p).map_err(usage)).collect::<Result<_>>()?;
    match req.verb {
        Verb::Upgrade if packages.is_empty() && !req.everything && !(req.all || req.group.is_some()) => {
            bail!(usage("name a package, or --everything for every managed package"))
        }
        Verb::Upgrade => {}
        Verb::Rollback if packages.len() != 1 => bail!(usage("rollback takes exactly one PACKAGE[=VERSION]")),
        _ if packages.is_empty() => bail!(usage(format!("{} needs a PACKAGE", req.verb.as_str()))),
        _ => {}
    }
    Ok((target, packages))
}

/// Draws one line per device while a person watches; prints phase changes otherwise.
struct ProgressView {
    tty: bool,
    lines: BTreeMap<DeviceId, String>,
    drawn: usize,
}

impl ProgressView {
    fn update(&mut self, dev: &DeviceId, r: &OpRecord) {
        let phase = r.phase.map(|p| p.as_str()).unwrap_or_else(|| r.state.as_str()).to_owned();
        let line = match r.percent {
            Some(p) => {
                let filled = (p as usize / 5).min(20);
                format!("{dev:<16} [{}{}] {p:>3}% {phase}", "#".repeat(filled), " ".repeat(20 - filled))
            }
            None => format!("{dev:<16} {phase}"),
        };
        if self.lines.get(dev) == Some(&line) {
            return;
        }
        let changed_phase = self.lines.get(dev).map(|l| !l.ends_with(&phase)).unwrap_or(true);
        self.lines.insert(dev.clone(), line.clone());
        let mut err = std::io::stderr();
        if self.tty {
            if self.drawn > 0 {
                let _ = write!(err, "\x1b[{}A", self.drawn);
            }
            for l in self.lines.values() {
                let _ = writeln!(err, "\x1b[2K{l}");
            }
            self.drawn = self.lines.len();
        } else if changed_phase {
            let _ = writeln!(err, "{dev}: {phase}");
        }
    }
}

pub async fn run(ctx: &Ctx, req: PackageRequest) -> Result<u8> {
    let (target, packages) = parse(&req)?;
    if !(req.timeout.is_finite() && req.timeout > 0.0 && req.timeout <= 86_400.0) {
        bail!(usage("--timeout must be between 0 and 86400 seconds"));
    }
    let options = PackageOptions { dry_run: req.dry_run, watch_s: req.watch_s };
    let mut specs = packages.into_iter();
    let args = match req.verb {
        Verb::Install => CommandArgs::Install { packages: specs.collect(), options },
        Verb::Upgrade => CommandArgs::Upgrade { packages: specs.collect(), options },
        Verb::Uninstall => CommandArgs::Uninstall { packages: specs.collect(), purge: req.purge, options },
        Verb::Rollback => match specs.next() {
            Some(package) => CommandArgs::Rollback { package, options },
            None => bail!(usage("rollback takes exactly one PACKAGE[=VERSION]")),
        },
        other => bail!("{} is not a package operation", other.as_str()),
    };
    let (mut session, mut fleet) = load_fleet(ctx).await?;
    let mut view = ProgressView { tty: std::io::stderr().is_terminal() && !req.json, lines: BTreeMap::new(), drawn: 0 };
    let request = Request {
        target,
        args,
        timeout: Duration::from_secs_f64(req.timeout),
        expires: ctx.expires,
        by: ctx.by.clone(),
    };
    let outcomes = send(&mut session, &ctx.topics, &mut fleet, &request, &mut |dev, r| view.update(dev, r)).await?;
    session.disconnect().await;
    print_outcomes(&outcomes, req.json, req.dry_run)
}

pub fn package_result(o: &Outcome) -> Option<PackageResult> {
    o.record.as_ref().and_then(|r| r.result.clone()).and_then(|v| serde_json::from_value(v).ok())
}

fn print_outcomes(outcomes: &[Outcome], json_out: bool, dry_run: bool) -> Result<u8> {
    if json_out {
        let list: Vec<Value> = outcomes
            .iter()
            .map(|o| {
                let mut v = o.to_json();
                v["duration_ms"] = json!(package_result(o).map(|r| r.duration_ms));
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        let rows: Vec<Vec<String>> = outcomes
            .iter()
            .map(|o| {
                let r = package_result(o);
                let changes = r.as_ref().map(PackageResult::changes_text).unwrap_or_else(|| "no change".into());
                let result = match (&o.error, dry_run) {
                    (Some(e), _) => format!("FAILED {e}"),
                    (None, true) => "would change".into(),
                    (None, false) => "ok".into(),
                };
                let rolled = r
                    .as_ref()
                    .and_then(|r| r.rolled_back_to.as_ref())
                    .map(|m| {
                        let list: Vec<String> =
                            m.iter().map(|(p, v)| format!("{p} {}", v.as_deref().unwrap_or("removed"))).collect();
                        format!(" (rolled back to {})", list.join(", "))
                    })
                    .unwrap_or_default();
                vec![
                    o.device.to_string(),
                    changes,
                    format!("{result}{rolled}"),
                    r.as_ref().map(|r| bytes(r.download_bytes + r.index_bytes)).unwrap_or_else(|| "-".into()),
                    r.as_ref().map(saving).unwrap_or_else(|| "-".into()),
                    r.as_ref().map(|r| format!("{:.1}", r.duration_ms as f64 / 1000.0)).unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        print!("{}", table(&["DEVICE", "CHANGE", "RESULT", "FETCHED", "SAVED", "SECONDS"], &rows));
    }
    Ok(if outcomes.iter().all(|o| o.ok) { 0 } else { exit::FAILED })
}

pub async fn restart_unit(ctx: &Ctx, device: &str, unit: &str, json_out: bool) -> Result<u8> {
    let dev = DeviceId::new(device).map_err(|e| usage(e.to_string()))?;
    let (mut session, mut fleet) = load_fleet(ctx).await?;
    let req = Request {
        target: Target::Devices(vec![dev]),
        args: CommandArgs::Restart { unit: Some(unit.to_owned()) },
        timeout: Duration::from_secs(120),
        expires: ctx.expires,
        by: ctx.by.clone(),
    };
    let outcomes = send_and_wait(&mut session, &ctx.topics, &mut fleet, &req).await?;
    session.disconnect().await;
    if json_out {
        let list: Vec<Value> = outcomes.iter().map(Outcome::to_json).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        for o in &outcomes {
            match &o.error {
                None => println!("{}: {unit} restarted", o.device),
                Some(e) => println!("{}: FAILED {e}", o.device),
            }
        }
    }
    Ok(if outcomes.iter().all(|o| o.ok) { 0 } else { exit::FAILED })
}

/// Bytes the way a person reads them.
pub fn bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        _ => format!("{:.1} MB", n as f64 / 1e6),
    }
}

/// What deltas and index diffs saved against whole fetches, and how each package came.
fn saving(r: &debfleet_protocol::PackageResult) -> String {
    let fetched = r.download_bytes + r.index_bytes;
    let deltas = r.fetches.iter().filter(|f| f.method == debfleet_protocol::FetchMethod::Delta).count();
    let fallbacks: Vec<String> = r
        .fetches
        .iter()
        .filter_map(|f| {
            f.fallback.as_ref().map(|fb| {
                format!(
                    "{}: {}",
                    f.package,
                    serde_json::to_value(fb.reason).unwrap_or_default().as_str().unwrap_or("?")
                )
            })
        })
        .collect();
    let mut out = if r.full_bytes > fetched {
        format!("{:.0}% of {}", 100.0 * (r.full_bytes - fetched) as f64 / r.full_bytes as f64, bytes(r.full_bytes))
    } else {
        "-".into()
    };
    if deltas > 0 {
        out.push_str(&format!(", {deltas} by delta"));
    }
    if !fallbacks.is_empty() {
        out.push_str(&format!(" (whole: {})", fallbacks.join(", ")));
    }
    out
}
