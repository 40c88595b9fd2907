//! `debfleet component ...`: a device's components (list, show) and their actions (call, cfg),
//! from the retained set and through the `call` command.

use anyhow::{bail, Result};
use clap::Subcommand;
use debfleet_protocol::cfg::patch_from_assignments;
use debfleet_protocol::{ActionName, CommandArgs, ComponentId, DeviceId, GroupName};
use serde_json::{json, Map, Value};

use crate::cmds::{known, load_fleet, usage};
use crate::fleet::{ComponentView, Device};
use crate::output::{ago, flatten, table};
use crate::request::{send_and_wait, Request, Target};
use crate::Ctx;

#[derive(Subcommand)]
pub enum ComponentCommand {
    /// The components installed on a device: package, version, state, restarts.
    List {
        /// The device's id.
        device: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One component: its actions and their parameters, status, state, configuration, metrics.
    Show {
        /// The device's id.
        device: String,
        /// The component's id, e.g. led-strip.
        component: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run an action: `debfleet component call lab-1 led-strip rainbow-cycle wait_ms=20`
    /// (`--group G` or `--all` instead of devices).
    Call {
        /// Devices, then the component, the action and its KEY=VALUE arguments (values as JSON
        /// where they parse: 20, true, [255,0,0]; otherwise strings: #ff0000).
        #[arg(required = true)]
        words: Vec<String>,
        #[command(flatten)]
        common: CallFlags,
    },
    /// What a component with a `frames` action (the LED strip) shows: its last frames in colour,
    /// a line each, oldest first; or as a PNG picture (a row a frame).
    Frames {
        /// The device's id.
        device: String,
        /// The component's id, e.g. led-strip.
        component: String,
        /// How many of the last frames.
        #[arg(long, default_value_t = 8)]
        count: u32,
        /// Write a PNG here instead of drawing in the terminal.
        #[arg(long)]
        png: Option<std::path::PathBuf>,
    },
    /// Change a component's configuration (`brightness=40 logs.level=warn`; KEY=null for the
    /// default), or print it without assignments.
    Cfg {
        /// Devices, then the component and KEY=VALUE assignments.
        #[arg(required = true)]
        words: Vec<String>,
        #[command(flatten)]
        common: CallFlags,
    },
}

#[derive(clap::Args)]
pub struct CallFlags {
    /// Every device in this group (one publish; the broker fans out).
    #[arg(long, conflicts_with = "all")]
    group: Option<String>,
    /// Every device in the fleet (one publish).
    #[arg(long)]
    all: bool,
    /// Seconds to wait for the devices.
    #[arg(long, default_value_t = 40.0)]
    timeout: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(ctx: &Ctx, cmd: ComponentCommand) -> Result<u8> {
    match cmd {
        ComponentCommand::List { device, json } => list(ctx, &device, json).await,
        ComponentCommand::Show { device, component, json } => show(ctx, &device, &component, json).await,
        ComponentCommand::Call { words, common } => {
            let (target, rest, args) = split(&words, &common, 2)?;
            let (component, action) = (component_id(&rest[0])?, action_name(&rest[1])?);
            let args = arguments(&args)?;
            call(ctx, target, component, action, args, &common).await
        }
        ComponentCommand::Frames { device, component, count, png } => {
            frames(ctx, &device, &component, count, png.as_deref()).await
        }
        ComponentCommand::Cfg { words, common } => {
            let (target, rest, assignments) = split(&words, &common, 1)?;
            let component = component_id(&rest[0])?;
            if assignments.is_empty() {
                let Target::Devices(ids) = &target else { bail!(usage("name one device to print a configuration")) };
                let [id] = ids.as_slice() else { bail!(usage("name one device to print a configuration")) };
                return print_cfg(ctx, id, &component, common.json).await;
            }
            let patch = patch_from_assignments(&assignments).map_err(|e| usage(e.to_string()))?;
            let Value::Object(patch) = patch else { bail!(usage("cfg takes KEY=VALUE assignments")) };
            let action = action_name("cfg")?;
            call(ctx, target, component, action, patch, &common).await
        }
    }
}

fn component_id(s: &str) -> Result<ComponentId> {
    ComponentId::new(s).map_err(|e| usage(e.to_string()))
}

fn action_name(s: &str) -> Result<ActionName> {
    ActionName::new(s).map_err(|e| usage(e.to_string()))
}

/// Splits `words` into the targets, `fixed` words (component, action) and KEY=VALUE words.
fn split(words: &[String], f: &CallFlags, fixed: usize) -> Result<(Target, Vec<String>, Vec<String>)> {
    let (plain, assignments): (Vec<String>, Vec<String>) = words.iter().cloned().partition(|w| !w.contains('='));
    let what = if fixed == 2 { "the component and the action" } else { "the component" };
    if plain.len() < fixed {
        bail!(usage(format!("name {what}")));
    }
    let (devices, rest) = plain.split_at(plain.len() - fixed);
    let target = match (&f.group, f.all, devices.is_empty()) {
        (Some(g), false, true) => Target::Group(GroupName::new(g.as_str()).map_err(|e| usage(e.to_string()))?),
        (None, true, true) => Target::All,
        (None, false, false) => Target::Devices(
            devices
                .iter()
                .map(|d| DeviceId::new(d.as_str()).map_err(|e| usage(e.to_string())))
                .collect::<Result<_>>()?,
        ),
        (None, false, true) => bail!(usage(format!("name devices (or --group G, --all), then {what}"))),
        _ => bail!(usage("devices, --group and --all exclude each other")),
    };
    Ok((target, rest.to_vec(), assignments))
}

/// KEY=VALUE words as an object; values are JSON where they parse, strings otherwise.
fn arguments(words: &[String]) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    for w in words {
        let (k, v) = w.split_once('=').ok_or_else(|| usage(format!("{w:?} is not KEY=VALUE")))?;
        if k.is_empty() {
            bail!(usage(format!("{w:?} has no key")));
        }
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
        if m.insert(k.to_owned(), value).is_some() {
            bail!(usage(format!("{k} is given twice")));
        }
    }
    Ok(m)
}

/// Checks a call against what the device's retained meta says the component takes, so a
/// mistake is named at once (the device checks again).
fn precheck(d: &Device, component: &ComponentId, action: &ActionName, args: &Map<String, Value>) -> Result<()> {
    let Some(meta) = d.component.get(component).and_then(|c| c.meta.as_ref()) else { return Ok(()) };
    if action.as_str() == "cfg" {
        return Ok(());
    }
    let Some(spec) = meta.action(action.as_str()) else {
        let names: Vec<&str> = meta.actions.iter().map(|a| a.name.as_str()).collect();
        bail!(usage(format!("{component} has no action {action} (it has {})", names.join(", "))));
    };
    spec.check(args).map_err(usage)
}

/// Sends a call and waits for every target's outcome.
async fn send_call(
    ctx: &Ctx,
    target: Target,
    component: ComponentId,
    action: ActionName,
    args: Map<String, Value>,
    timeout: f64,
) -> Result<Vec<crate::request::Outcome>> {
    let timeout = crate::cmds::seconds(timeout)?;
    let (mut session, mut fleet) = load_fleet(ctx).await?;
    if let Target::Devices(ids) = &target {
        for id in ids {
            if let Some(d) = fleet.devices.get(id) {
                precheck(d, &component, &action, &args)?;
            }
        }
    }
    let req = Request {
        target,
        args: CommandArgs::Call { component, action, args },
        timeout,
        expires: ctx.expires,
        by: ctx.by.clone(),
    };
    let outcomes = send_and_wait(&mut session, &ctx.topics, &mut fleet, &req).await?;
    session.disconnect().await;
    Ok(outcomes)
}

async fn call(
    ctx: &Ctx,
    target: Target,
    component: ComponentId,
    action: ActionName,
    args: Map<String, Value>,
    f: &CallFlags,
) -> Result<u8> {
    let outcomes = send_call(ctx, target, component, action, args, f.timeout).await?;
    if f.json {
        let all: Vec<Value> = outcomes.iter().map(|o| o.to_json()).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for o in &outcomes {
            match (&o.record, o.ok) {
                (Some(r), true) => {
                    let result = r.result.clone().unwrap_or(Value::Null);
                    println!("{}: {}", o.device, serde_json::to_string(&result)?);
                }
                _ => println!("{}: failed: {}", o.device, o.error.clone().unwrap_or_default()),
            }
        }
    }
    Ok(if outcomes.iter().all(|o| o.ok) { 0 } else { crate::exit::FAILED })
}

/// Hex colours (`rrggbb` per light) as a frame.
fn parse_frame(hex: &str) -> Option<Vec<[u8; 3]>> {
    if hex.len() % 6 != 0 || !hex.is_ascii() {
        return None;
    }
    (0..hex.len())
        .step_by(6)
        .map(|i| {
            let n = u32::from_str_radix(&hex[i..i + 6], 16).ok()?;
            Some([(n >> 16) as u8, (n >> 8) as u8, n as u8])
        })
        .collect()
}

/// Lights drawn per line in the terminal; longer strips are cut, saying so.
const TERMINAL_LIGHTS: usize = 120;

async fn frames(ctx: &Ctx, device: &str, component: &str, count: u32, png: Option<&std::path::Path>) -> Result<u8> {
    let id = DeviceId::new(device).map_err(|e| usage(e.to_string()))?;
    let c = component_id(component)?;
    let mut args = Map::new();
    args.insert("count".into(), count.into());
    let outcomes =
        send_call(ctx, Target::Devices(vec![id.clone()]), c.clone(), action_name("frames")?, args, 20.0).await?;
    let o = &outcomes[0];
    let result = match (&o.record, o.ok) {
        (Some(r), true) => r.result.clone().unwrap_or(Value::Null),
        _ => bail!("{id}: {}", o.error.clone().unwrap_or_default()),
    };
    let rows: Vec<Vec<[u8; 3]>> = result["frames"]
        .as_array()
        .map(|a| a.iter().filter_map(|f| f.as_str().and_then(parse_frame)).collect())
        .unwrap_or_default();
    if rows.is_empty() {
        bail!("{c} on {id} answered no frames: {result}");
    }
    if let Some(path) = png {
        std::fs::write(path, debfleet_component::png::frames(&rows))
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        println!("{}: {} frames of {} lights", path.display(), rows.len(), rows[0].len());
        return Ok(0);
    }
    for row in &rows {
        let mut line = String::new();
        for [r, g, b] in row.iter().take(TERMINAL_LIGHTS) {
            line.push_str(&format!("\x1b[38;2;{r};{g};{b}m\u{2588}"));
        }
        line.push_str("\x1b[0m");
        if row.len() > TERMINAL_LIGHTS {
            line.push_str(&format!(" (+{} more)", row.len() - TERMINAL_LIGHTS));
        }
        println!("{line}");
    }
    println!("{c} on {id}: the last {} frames of {} lights, oldest first", rows.len(), rows[0].len());
    Ok(0)
}

async fn list(ctx: &Ctx, device: &str, json: bool) -> Result<u8> {
    let id = DeviceId::new(device).map_err(|e| usage(e.to_string()))?;
    let (session, fleet) = load_fleet(ctx).await?;
    session.disconnect().await;
    let d = known(&fleet, &id)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&json!({"components": d.components, "facts": d.component}))?);
        return Ok(0);
    }
    match components_table(d) {
        Some(t) => print!("{t}"),
        None => println!("no components on {id}"),
    }
    Ok(0)
}

/// The COMPONENTS table of a device (for `list` and `show`).
pub fn components_table(d: &Device) -> Option<String> {
    let list = d.components.as_ref().filter(|l| !l.components.is_empty())?;
    let rows: Vec<Vec<String>> = list
        .components
        .iter()
        .map(|(id, e)| {
            let view = d.component.get(id);
            let since = view.and_then(|v| v.status.as_ref()).map(|s| ago(&s.since)).unwrap_or_default();
            let actions = view.and_then(|v| v.meta.as_ref()).map_or(0, |m| m.actions.len());
            let package = if e.package.is_empty() { "-".to_owned() } else { e.package.clone() };
            vec![
                id.to_string(),
                package,
                e.version.clone(),
                format!("{} {since}", e.state.as_str()).trim().to_owned(),
                e.restarts.to_string(),
                actions.to_string(),
            ]
        })
        .collect();
    Some(table(&["COMPONENT", "PACKAGE", "VERSION", "STATE", "RESTARTS", "ACTIONS"], &rows))
}

fn view<'a>(d: &'a Device, device: &DeviceId, component: &ComponentId) -> Result<&'a ComponentView> {
    d.component.get(component).ok_or_else(|| usage(format!("{device} has no component {component}")))
}

async fn show(ctx: &Ctx, device: &str, component: &str, json: bool) -> Result<u8> {
    let id = DeviceId::new(device).map_err(|e| usage(e.to_string()))?;
    let c = component_id(component)?;
    let (session, fleet) = load_fleet(ctx).await?;
    session.disconnect().await;
    let v = view(known(&fleet, &id)?, &id, &c)?;
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(0);
    }
    match &v.status {
        Some(s) => println!(
            "{c} on {id}: {} since {} ({}){}",
            s.state.as_str(),
            s.since,
            ago(&s.since),
            s.message.as_ref().map(|m| format!(": {m}")).unwrap_or_default()
        ),
        None => println!("{c} on {id}: no status"),
    }
    if let Some(m) = &v.meta {
        let rows: Vec<Vec<String>> = m
            .actions
            .iter()
            .map(|a| {
                let params: Vec<String> = a
                    .params
                    .iter()
                    .map(|p| {
                        use debfleet_protocol::component::ParamKind;
                        let desc = match &p.kind {
                            ParamKind::Int { min, max } => format!("int {min}-{max}"),
                            ParamKind::Number { min, max } => format!("number {min}-{max}"),
                            ParamKind::Bool => "bool".into(),
                            ParamKind::Color => "color".into(),
                            ParamKind::Text { max_len } => format!("text (at most {max_len})"),
                            ParamKind::Choice { values } => values.join("|"),
                            ParamKind::Object { max_bytes } => format!("json object (at most {max_bytes} bytes)"),
                        };
                        format!("{}{}={desc}", p.name, if p.required { "" } else { "?" })
                    })
                    .collect();
                vec![a.name.to_string(), params.join(" "), a.help.clone()]
            })
            .collect();
        print!("\n{}", table(&[&format!("ACTIONS ({} {})", m.component, m.version), "ARGUMENTS", ""], &rows));
    }
    if let Some(s) = &v.state {
        let rows: Vec<Vec<String>> =
            flatten(&Value::Object(s.state.clone())).into_iter().map(|(k, v)| vec![k, v]).collect();
        print!("\n{}", table(&[&format!("STATE ({})", ago(&s.ts)), ""], &rows));
    }
    if let Some(t) = &v.telemetry {
        let rows: Vec<Vec<String>> = t.metrics.iter().map(|(k, v)| vec![k.clone(), format!("{v}")]).collect();
        print!("\n{}", table(&[&format!("METRICS ({})", ago(&t.ts)), ""], &rows));
    }
    if let Some(cfg) = &v.cfg {
        let rows: Vec<Vec<String>> =
            flatten(&Value::Object(cfg.cfg.clone())).into_iter().map(|(k, v)| vec![k, v]).collect();
        print!("\n{}", table(&["CFG", "VALUE"], &rows));
    }
    Ok(0)
}

async fn print_cfg(ctx: &Ctx, id: &DeviceId, c: &ComponentId, json: bool) -> Result<u8> {
    let (session, fleet) = load_fleet(ctx).await?;
    session.disconnect().await;
    let v = view(known(&fleet, id)?, id, c)?;
    let cfg = v.cfg.as_ref().ok_or_else(|| anyhow::anyhow!("{c} on {id} has not published its configuration"))?;
    crate::cmds::print_cfg(&Value::Object(cfg.cfg.clone()), json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(group: Option<&str>, all: bool) -> CallFlags {
        CallFlags { group: group.map(str::to_owned), all, timeout: 10.0, json: false }
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn words_split_into_targets_component_action_and_arguments() {
        let (t, rest, args) =
            split(&words("lab-1 lab-2 led-strip set-color color=#ff0000"), &flags(None, false), 2).unwrap();
        assert!(matches!(t, Target::Devices(ref d) if d.len() == 2));
        assert_eq!(rest, ["led-strip", "set-color"]);
        let a = arguments(&args).unwrap();
        assert_eq!(a["color"], "#ff0000");
        let a = arguments(&words("level=50 color=[1,2,3] on=true")).unwrap();
        assert_eq!((a["level"].as_i64(), a["color"][2].as_i64(), a["on"].as_bool()), (Some(50), Some(3), Some(true)));
        let (t, ..) = split(&words("led-strip clear"), &flags(Some("lab"), false), 2).unwrap();
        assert!(matches!(t, Target::Group(_)));
        for (w, f) in [
            ("led-strip", flags(None, false)),
            ("led-strip clear", flags(None, false)),
            ("lab-1 led-strip clear", flags(None, true)),
        ] {
            assert!(split(&words(w), &f, 2).is_err(), "{w}");
        }
        assert!(arguments(&words("a=1 a=2")).is_err());
        assert_eq!(parse_frame("ff000000ff00"), Some(vec![[255, 0, 0], [0, 255, 0]]));
        assert_eq!(parse_frame("ff00"), None);
        assert_eq!(parse_frame("zz0000"), None);
        assert!(arguments(&words("=1")).is_err());
    }
}
