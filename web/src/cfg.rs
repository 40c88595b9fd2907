//! The cfg editor: a device's effective runtime configuration as one field per key. What is
//! submitted is checked by the protocol's own rules (`RuntimeCfg::apply_patch`, the check the
//! agent makes) field by field, so every wrong field gets its own error beside it; the changed
//! fields go to the device as one `cfg` command, audited first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use debfleet_protocol::cfg::patch_from_assignments;
use debfleet_protocol::{CfgError, CommandArgs, DeviceId, RuntimeCfg};
use serde::Serialize;
use serde_json::Value;

use crate::session::Session;
use crate::{actions, signed_in, view_session, Act, App, Target};

/// Form fields carrying a key's value are named `f:KEY`; beside each, `o:KEY` carries the value
/// the form was shown with, so that only what the operator changed is sent (not a value someone
/// else changed on the device since the form was read).
const FIELD: &str = "f:";
const SHOWN: &str = "o:";

#[derive(Serialize)]
struct Field {
    key: String,
    value: String,
    /// What the form was first shown with.
    shown: String,
    error: Option<String>,
}

/// Whether two texts of a field stand for the same value: the same JSON for a non-string field
/// (`["/", "/data"]` is `["/","/data"]`), the same text for a string one.
fn same(current: &Value, a: &str, b: &str) -> bool {
    match current {
        Value::String(_) => a == b,
        _ => match (serde_json::from_str::<Value>(a.trim()), serde_json::from_str::<Value>(b.trim())) {
            (Ok(x), Ok(y)) => x == y,
            _ => a.trim() == b.trim(),
        },
    }
}

/// Every key of the configuration, every one at its value (the profile's defaults included).
fn leaves(cfg: &RuntimeCfg) -> Vec<(String, Value)> {
    debfleet_protocol::cfg::leaves(&cfg.full_value())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The assignment a field's text stands for: a string field's text is the string whatever it
/// looks like; other fields' text is read as JSON (else it is a string, and the type check says so).
fn assignment(key: &str, current: &Value, given: &str) -> String {
    match current {
        Value::String(_) => format!("{key}={}", Value::String(given.to_owned())),
        _ => format!("{key}={}", given.trim()),
    }
}

/// The key a configuration error is about, and what to say beside it.
fn split(e: &CfgError) -> (String, String) {
    match e {
        CfgError::Invalid { key, message } => (key.clone(), message.clone()),
        CfgError::UnknownKey { key } => (key.clone(), "unknown key".into()),
        other => (String::new(), other.to_string()),
    }
}

fn device(app: &App, s: &Session, id: &str) -> Result<(DeviceId, RuntimeCfg), Response> {
    let not_found = |why: String| app.message(StatusCode::NOT_FOUND, Some(s), "No configuration", &why);
    let id = DeviceId::new(id).map_err(|e| not_found(e.to_string()))?;
    let detail = app.backend.device(&id).ok_or_else(|| not_found(format!("the broker has no device {id}")))?;
    let cfg = detail.cfg.ok_or_else(|| not_found(format!("{id} has not published its configuration")))?;
    Ok((id, cfg))
}

fn page(app: &App, s: &Session, id: &DeviceId, fields: Vec<Field>, error: Option<String>) -> Response {
    let ctx = minijinja::context! { session => view_session(s), device => id.as_str(), fields, error };
    app.render("cfg.html", ctx)
}

pub(crate) async fn form(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let s = signed_in!(app, headers);
    let (id, cfg) = match device(&app, &s, &id) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let fields =
        leaves(&cfg).into_iter().map(|(key, v)| Field { key, value: text(&v), shown: text(&v), error: None }).collect();
    page(&app, &s, &id, fields, None)
}

pub(crate) async fn submit(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let s = signed_in!(app, headers);
    let (id, cfg) = match device(&app, &s, &id) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let leaves = leaves(&cfg);
    let changed: Vec<(&str, String)> = leaves
        .iter()
        .filter_map(|(key, current)| {
            let given = f.get(&format!("{FIELD}{key}"))?;
            let shown = f.get(&format!("{SHOWN}{key}")).cloned().unwrap_or_else(|| text(current));
            (!same(current, given, &shown)).then(|| (key.as_str(), assignment(key, current, given)))
        })
        .collect();
    let assignments: Vec<&str> = changed.iter().map(|(_, a)| a.as_str()).collect();
    let detail = assignments.join(" ");
    let target = Target::Device(id.clone());
    if let Err(refused) =
        actions::permit(&app, &s, f.get("csrf").map_or("", String::as_str), "cfg", &target.to_string(), &detail)
    {
        return refused;
    }
    if changed.is_empty() {
        let back = format!("no field differs from {id}'s configuration, so nothing was sent");
        return app.message(StatusCode::OK, Some(&s), "Nothing to send", &back);
    }
    // Each field on its own against the device's configuration, so every wrong one is named.
    let mut errors: BTreeMap<String, String> = BTreeMap::new();
    for (key, a) in &changed {
        if let Err(e) = patch_from_assignments(&[a]).and_then(|p| cfg.apply_patch(&p)) {
            errors.insert((*key).to_owned(), split(&e).1);
        }
    }
    let mut general = None;
    let patch = if errors.is_empty() {
        // Then together: a rule across fields may still refuse the whole.
        match patch_from_assignments(&assignments) {
            Ok(p) => match cfg.apply_patch(&p) {
                Ok(_) => Some(p),
                Err(e) => {
                    let (key, message) = split(&e);
                    if changed.iter().any(|(k, _)| *k == key) {
                        errors.insert(key, message);
                    } else {
                        general = Some(e.to_string());
                    }
                    None
                }
            },
            Err(e) => {
                general = Some(e.to_string());
                None
            }
        }
    } else {
        None
    };
    let Some(patch) = patch else {
        let fields = leaves
            .iter()
            .map(|(key, v)| Field {
                key: key.clone(),
                value: f.get(&format!("{FIELD}{key}")).cloned().unwrap_or_else(|| text(v)),
                shown: f.get(&format!("{SHOWN}{key}")).cloned().unwrap_or_else(|| text(v)),
                error: errors.get(key).cloned(),
            })
            .collect();
        return (StatusCode::UNPROCESSABLE_ENTITY, page(&app, &s, &id, fields, general)).into_response();
    };
    let act = Act { target, args: CommandArgs::Cfg { set: patch }, by: s.user.clone() };
    actions::send(&app, &s, act, "cfg", &detail, &format!("/device/{id}")).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_the_configuration_s_leaves_and_text_reads_back_as_the_same_value() {
        let cfg = RuntimeCfg::default();
        let leaves = leaves(&cfg);
        assert!(leaves.iter().any(|(k, v)| k == "logs.level" && v == "info"));
        assert!(leaves.iter().any(|(k, _)| k == "telemetry.cpu.interval_s"));
        for (key, v) in &leaves {
            let patch = patch_from_assignments(&[assignment(key, v, &text(v))]).unwrap();
            assert_eq!(cfg.apply_patch(&patch).unwrap(), cfg, "{key}");
        }
        // A string field takes text that looks like JSON as the string it is.
        assert_eq!(assignment("logs.level", &Value::from("info"), "true"), r#"logs.level="true""#);
    }
}
