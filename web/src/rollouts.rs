//! Rollouts on the web: the list, one rollout's waves (devices per state) and devices, and the
//! operator's controls (pause, resume, abort, retry, rollback of the whole rollout), each first
//! stated on a confirmation page, then audited and sent as the rollout's control message.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Form;
use debfleet_protocol::rollout::{Action, RolloutId, Stage};
use serde::{Deserialize, Serialize};

use crate::{actions, signed_in, view_session, App, RolloutView};

#[derive(Serialize)]
struct Row {
    id: String,
    group: String,
    packages: String,
    phase: String,
    wave: String,
    by: String,
}

fn row(r: &RolloutView) -> Row {
    let s = &r.spec;
    let packages: Vec<String> = s.packages.iter().map(|(n, t)| format!("{n}={t}")).collect();
    Row {
        id: s.id.to_string(),
        group: s.group.to_string(),
        packages: packages.join(" "),
        phase: r.state.as_ref().map_or("created", |st| st.phase.as_str()).to_owned(),
        wave: r
            .state
            .as_ref()
            .and_then(|st| st.wave)
            .map(|w| format!("{} of {}", w + 1, s.waves.len()))
            .unwrap_or_default(),
        by: s.by.clone(),
    }
}

pub(crate) async fn list(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let s = signed_in!(app, headers);
    let rollouts: Vec<Row> = app.backend.rollouts().iter().map(row).collect();
    app.render("rollouts.html", minijinja::context! { session => view_session(&s), rollouts })
}

#[derive(Serialize)]
struct Wave {
    n: usize,
    size: String,
    devices: usize,
    counts: Vec<usize>,
}

#[derive(Serialize)]
struct DeviceRow {
    id: String,
    wave: u16,
    state: String,
    before: String,
    error: String,
}

/// What an action does, said before it is taken.
fn describe(id: &RolloutId, action: Action) -> String {
    match action {
        Action::Pause => format!("Rollout {id} pauses: no new wave starts; devices already asked carry on."),
        Action::Resume => format!("Rollout {id} goes on from where it stopped."),
        Action::Abort => format!(
            "Rollout {id} stops for good: devices not yet converged are asked back to what they had \
             (those still downloading do not install); devices already on the new version stay."
        ),
        Action::Retry => format!("Rollout {id} asks its failed devices again."),
        Action::Rollback => format!(
            "Every device rollout {id} changed goes back to the version it had before (the table's BEFORE column)."
        ),
    }
}

fn not_found(app: &App, s: &crate::session::Session, id: &str) -> Response {
    app.message(StatusCode::NOT_FOUND, Some(s), "No such rollout", &format!("the broker has no rollout {id:?}"))
}

fn find(app: &App, id: &str) -> Option<RolloutView> {
    let id = RolloutId::new(id).ok()?;
    app.backend.rollouts().into_iter().find(|r| r.spec.id == id)
}

pub(crate) async fn detail(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let s = signed_in!(app, headers);
    let Some(r) = find(&app, &id) else {
        return not_found(&app, &s, &id);
    };
    let spec = &r.spec;
    let tally = r.state.as_ref().map(|st| st.tally(spec.waves.len())).unwrap_or_default();
    let waves: Vec<Wave> = spec
        .waves
        .iter()
        .enumerate()
        .map(|(i, size)| {
            let (devices, counts) = tally.get(i).copied().unwrap_or_default();
            Wave { n: i + 1, size: size.to_string(), devices, counts: counts.to_vec() }
        })
        .collect();
    let devices: Vec<DeviceRow> = r
        .state
        .iter()
        .flat_map(|st| st.devices.iter())
        .map(|(d, e)| DeviceRow {
            id: d.to_string(),
            wave: e.wave + 1,
            state: e.stage.word().to_owned(),
            before: e.before.iter().map(|(n, t)| format!("{n}={t}")).collect::<Vec<_>>().join(" "),
            error: match &e.stage {
                Stage::Failed { error } => format!("{}: {}", error.code.as_str(), error.message),
                _ => String::new(),
            },
        })
        .collect();
    // The controls that apply now (all of them before a controller took it).
    let controls: Vec<&str> = Action::ALL
        .iter()
        .filter(|a| r.state.as_ref().is_none_or(|st| a.applies(st.phase)))
        .map(|a| a.as_str())
        .collect();
    let ctx = minijinja::context! {
        session => view_session(&s), r => row(&r), waves, devices, controls, words => Stage::WORDS,
        reason => r.state.as_ref().and_then(|st| st.reason.clone()),
        window => spec.window.map(|w| w.to_string()),
        started => r.state.is_some(),
    };
    app.render("rollout.html", ctx)
}

#[derive(Deserialize)]
pub(crate) struct ControlForm {
    #[serde(default)]
    csrf: String,
    action: String,
    #[serde(default)]
    confirm: String,
}

pub(crate) async fn control(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<ControlForm>,
) -> Response {
    let s = signed_in!(app, headers);
    let target = format!("rollout/{id}");
    if let Err(refused) = actions::permit(&app, &s, &f.csrf, &f.action, &target, "") {
        return refused;
    }
    let Some(action) = Action::ALL.into_iter().find(|a| a.as_str() == f.action) else {
        return app.message(
            StatusCode::BAD_REQUEST,
            Some(&s),
            "Not sent",
            &format!("{:?} is not a rollout control", f.action),
        );
    };
    let Some(r) = find(&app, &id) else {
        return not_found(&app, &s, &id);
    };
    let back = format!("/rollout/{}", r.spec.id);
    if f.confirm != "yes" {
        let ctx = minijinja::context! {
            session => view_session(&s), what => describe(&r.spec.id, action), plan => Vec::<String>::new(),
            action => format!("/rollout/{}/act", r.spec.id), fields => [("action", action.as_str())], back,
        };
        return app.render("confirm.html", ctx);
    }
    let steer = || app.backend.steer(r.spec.id.clone(), action, s.user.clone());
    actions::logged(&app, &s, action.as_str(), &target, "", &back, steer).await
}
