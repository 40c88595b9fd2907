//! Actions on a device or a group from the pages: a confirmation that says what will happen
//! (with the devices' own dry run for package verbs), then the command, audited first.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use debfleet_protocol::{CommandArgs, DeviceId, GroupName, PackageSpec, Role};
use serde::Deserialize;

use crate::session::{self, Session};
use crate::{signed_in, view_session, Act, App, Target};

/// An action form: the verb and its words. Without `confirm` the answer is a page that says
/// what will happen (with the devices' dry run for package verbs); with it, the action.
#[derive(Deserialize, Debug)]
pub(crate) struct ActForm {
    #[serde(default)]
    csrf: String,
    verb: String,
    /// Package specs or a unit, space separated.
    #[serde(default)]
    words: String,
    #[serde(default)]
    confirm: String,
}

pub(crate) async fn act_device(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<ActForm>,
) -> Response {
    let s = signed_in!(app, headers);
    match DeviceId::new(id.as_str()) {
        Ok(d) => act(app, s, Target::Device(d), f).await,
        Err(e) => app.message(StatusCode::BAD_REQUEST, Some(&s), "Refused", &e.to_string()),
    }
}

pub(crate) async fn act_group(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(group): Path<String>,
    Form(f): Form<ActForm>,
) -> Response {
    let s = signed_in!(app, headers);
    match GroupName::new(group.as_str()) {
        Ok(g) => act(app, s, Target::Group(g), f).await,
        Err(e) => app.message(StatusCode::BAD_REQUEST, Some(&s), "Refused", &e.to_string()),
    }
}

/// The command a form asks for: its words put in the command's own payload and read back by
/// the protocol's parser, so the form is checked exactly as a device checks the command.
fn command(verb: &str, words: &str, dry_run: bool) -> Result<CommandArgs, String> {
    let words: Vec<&str> = words.split_whitespace().collect();
    let mut m = serde_json::Map::new();
    m.insert("id".into(), "web-form".into());
    match verb {
        "ping" => {}
        "restart" => match words[..] {
            [unit] => {
                m.insert("unit".into(), unit.into());
            }
            _ => return Err("name the one unit to restart".into()),
        },
        "install" | "upgrade" | "uninstall" | "rollback" => {
            m.insert("packages".into(), words.into());
            if dry_run {
                m.insert("dry_run".into(), true.into());
            }
        }
        other => return Err(format!("{other:?} is not an action here")),
    }
    let payload = serde_json::to_vec(&m).map_err(|e| e.to_string())?;
    debfleet_protocol::command::parse_command(verb, &payload).map(|c| c.args).map_err(|r| r.message)
}

/// What a confirmation says will happen.
fn describe(target: &Target, args: &CommandArgs) -> String {
    let who = match target {
        Target::Device(d) => format!("device {d}"),
        Target::Group(g) => format!("every device in group {g}"),
    };
    let names = |p: &[PackageSpec]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ");
    match args {
        CommandArgs::Ping => format!("{who} will answer a ping."),
        CommandArgs::Restart { unit } => format!("{who} will restart {}.", unit.as_deref().unwrap_or("the agent")),
        CommandArgs::Install { packages, .. } => {
            format!("{who} will install {} (apt, units watched, undone if they fail).", names(packages))
        }
        CommandArgs::Upgrade { packages, .. } if packages.is_empty() => {
            format!("{who} will upgrade every managed package.")
        }
        CommandArgs::Upgrade { packages, .. } => format!("{who} will upgrade {}.", names(packages)),
        CommandArgs::Uninstall { packages, .. } => {
            format!("{who} will remove {} (configuration kept).", names(packages))
        }
        CommandArgs::Rollback { package, .. } => format!("{who} will go back to the previous version of {package}."),
        other => format!("{who}: {}", other.verb().as_str()),
    }
}

/// Whether the session may take the action the form asks for: the form's CSRF token is the
/// session's and the session is an operator's (or an admin's). A refusal is logged and answered
/// with 403.
pub(crate) fn permit(
    app: &App,
    s: &Session,
    csrf: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<(), Response> {
    if !session::same(csrf, &s.csrf) {
        app.log(s, action, target, detail, "refused: no valid CSRF token");
        return Err(app.message(
            StatusCode::FORBIDDEN,
            Some(s),
            "Refused",
            "the form did not come from this page (CSRF token missing or wrong)",
        ));
    }
    if s.role < Role::Operator {
        app.log(s, action, target, detail, "refused: viewers cannot act");
        return Err(app.message(
            StatusCode::FORBIDDEN,
            Some(s),
            "Refused",
            &format!("{} is a viewer: viewers see, operators act", s.user),
        ));
    }
    Ok(())
}

/// Logs the action as sent, then sends it; the answer is the page to go back to, or why not.
pub(crate) async fn send(app: &App, s: &Session, act: Act, action: &str, detail: &str, back: &str) -> Response {
    let target = act.target.to_string();
    logged(app, s, action, &target, detail, back, || app.backend.act(act)).await
}

/// Logs the action as sent, then sends it (`send` is called only once the log has it: a backend
/// may send as soon as it is called); a failure is logged too.
pub(crate) async fn logged<T, F: std::future::Future<Output = Result<T, String>>>(
    app: &App,
    s: &Session,
    action: &str,
    target: &str,
    detail: &str,
    back: &str,
    send: impl FnOnce() -> F,
) -> Response {
    if !app.log(s, action, target, detail, "sent") {
        return app.message(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(s),
            "Not sent",
            "the audit log cannot be written, so nothing was sent",
        );
    }
    match send().await {
        Ok(_) => Redirect::to(back).into_response(),
        Err(e) => {
            app.log(s, action, target, detail, &format!("failed: {e}"));
            app.message(StatusCode::BAD_GATEWAY, Some(s), "Not sent", &e)
        }
    }
}

async fn act(app: Arc<App>, s: Session, target: Target, f: ActForm) -> Response {
    let target_name = target.to_string();
    let detail = format!("{} {}", f.verb, f.words.trim()).trim().to_owned();
    if let Err(refused) = permit(&app, &s, &f.csrf, &f.verb, &target_name, &detail) {
        return refused;
    }
    let confirmed = f.confirm == "yes";
    let package_verb = matches!(f.verb.as_str(), "install" | "upgrade" | "uninstall" | "rollback");
    let args = match command(&f.verb, &f.words, !confirmed && package_verb) {
        Ok(a) => a,
        Err(e) => return app.message(StatusCode::BAD_REQUEST, Some(&s), "Not sent", &e),
    };
    let back = match &target {
        Target::Device(d) => format!("/device/{d}"),
        Target::Group(g) => format!("/?group={g}"),
    };
    if !confirmed {
        // The dry run: what apt on each device would do, nothing changed.
        let plan = if package_verb {
            // The dry run is a command to the devices too: logged before it goes.
            if !app.log(&s, &f.verb, &target_name, &detail, "dry run") {
                return app.message(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Some(&s),
                    "Not sent",
                    "the audit log cannot be written, so nothing was sent",
                );
            }
            let dry = Act { target: target.clone(), args: args.clone(), by: s.user.clone() };
            match app.backend.act(dry).await {
                Ok(lines) => lines,
                Err(e) => vec![format!("the dry run failed: {e}")],
            }
        } else {
            Vec::new()
        };
        let ctx = minijinja::context! {
            session => view_session(&s), what => describe(&target, &args), plan,
            action => match &target { Target::Device(d) => format!("/device/{d}/act"), Target::Group(g) => format!("/group/{g}/act") },
            fields => [("verb", f.verb), ("words", f.words)], back,
        };
        return app.render("confirm.html", ctx);
    }
    send(&app, &s, Act { target, args, by: s.user.clone() }, &f.verb, &detail, &back).await
}
