//! Commands as the core runs them: intake (retained, empty, over the bound), parsing, the
//! operation's lifecycle in the journal, instant commands, and package and unit commands handed
//! out as jobs.

use debfleet_protocol::command::parse_command;
use debfleet_protocol::desired::Source;
use debfleet_protocol::signature::SignTarget;
use debfleet_protocol::{
    time, CfgMessage, Command, CommandArgs, ErrorCode, OpError, OpId, PackageOptions, PackageSpec, Rejection, Topic,
    Verb, CONTRACT_VERSION,
};
use serde_json::{json, Value};

use super::{Core, Out, MAX_BACKLOG, MAX_JOBS_PENDING};
use crate::jobs::{Job, JobKind};

/// The agent's own unit, whose journal `journal` may always read.
const AGENT_UNIT: &str = "debfleet-agent.service";

/// The operation a job belongs to, and when its command expires.
pub(super) struct Origin {
    pub(super) id: OpId,
    pub(super) expires_at: Option<i64>,
}

impl Core {
    /// A message arrived on one of the command subscriptions; `retained` when the broker
    /// delivered it from its retained store.
    pub fn on_message(&mut self, topic: &str, payload: &[u8], retained: bool, now_ms: i64) -> Vec<Out> {
        let (verb, target) = match self.cfg.topics.parse(topic) {
            Ok(Topic::DeviceCmd(d, verb)) if d == self.cfg.device_id => (verb, SignTarget::Device(d)),
            Ok(Topic::FleetCmd(verb)) => (verb, SignTarget::Fleet),
            Ok(Topic::GroupCmd(g, verb)) if self.runtime.groups.contains(&g) => (verb, SignTarget::Group(g)),
            // Desired state is retained by design (state, not a command).
            Ok(Topic::DesiredDevice(d)) if d == self.cfg.device_id => {
                return self.on_desired(Source::Device, payload, now_ms);
            }
            Ok(Topic::DesiredGroup(g)) if self.runtime.groups.contains(&g) => {
                return self.on_desired(Source::Group(g), payload, now_ms);
            }
            Ok(_) => return Vec::new(),
            Err(e) => {
                tracing::warn!("ignoring message: {e}");
                return Vec::new();
            }
        };
        // An empty payload is how a retained command is cleared; the broker forwards it.
        if payload.is_empty() {
            return Vec::new();
        }
        if retained {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            payload.hash(&mut h);
            if !self.retained_seen.insert((topic.to_owned(), h.finish())) {
                return Vec::new();
            }
            tracing::warn!("ignoring a retained command on {topic}");
            let message = "a retained command is never run (commands are events); publish it without the retain flag, \
                           and clear the retained one with an empty retained message"
                .to_owned();
            return vec![self.rejected(topic, ErrorCode::RetainedCommand, message, now_ms)];
        }
        if self.backlog > MAX_BACKLOG || self.jobs_pending() >= MAX_JOBS_PENDING {
            // A repeat of an id already recorded still gets its recorded outcome.
            match parse_command(&verb, payload) {
                Ok(cmd) if self.journal.get(&cmd.id).is_some() => return self.run(cmd, now_ms),
                _ => return self.busy(topic, &verb, payload, now_ms),
            }
        }
        match parse_command(&verb, payload) {
            Ok(cmd) => {
                if let Some(trust) = &mut self.trust {
                    let known = self.journal.get(&cmd.id).is_some();
                    if let Err(why) = trust.check(&cmd, &target, known, now_ms) {
                        tracing::warn!(op = %cmd.id, "command on {topic} refused: {why}");
                        return vec![self.refuse_unrecorded(&cmd.id, &verb, ErrorCode::Unauthorized, why, now_ms)];
                    }
                    if !known {
                        trust.accepted(&cmd, now_ms);
                    }
                }
                self.run(cmd, now_ms)
            }
            Err(Rejection { id: Some(id), code, message }) => {
                tracing::warn!(op = %id, "command on {topic} failed: {message}");
                self.fail_new(id, &verb, code, message, now_ms)
            }
            Err(Rejection { id: None, code, message }) => {
                tracing::warn!("command on {topic} rejected: {message}");
                vec![self.rejected(topic, code, message, now_ms)]
            }
        }
    }

    /// The units a `journal` command may read: the managed packages' and the agent's own; any
    /// unit only where agent.toml says `journal_any_unit = true` (not changeable over the wire).
    fn journal_units(&self, unit: Option<String>) -> Result<Vec<String>, OpError> {
        let mut allowed: Vec<String> = self.managed_units().into_iter().map(|(u, _)| u).collect();
        allowed.push(AGENT_UNIT.to_owned());
        match unit {
            None => Ok(allowed),
            Some(u) if allowed.contains(&u) || self.cfg.journal_any_unit => Ok(vec![u]),
            Some(u) => Err(OpError {
                code: ErrorCode::InvalidValue,
                message: format!(
                    "{u:?} is not a unit of a managed package nor the agent's; the device's agent.toml may allow any \
                     unit (journal_any_unit = true)"
                ),
            }),
        }
    }

    /// Too much is queued: answer at once, without journaling, so the id stays free for a retry.
    fn busy(&self, topic: &str, verb: &str, payload: &[u8], now_ms: i64) -> Vec<Out> {
        let message = format!(
            "the device is busy ({} messages to send, {} operations queued); nothing was done, send it again later",
            self.backlog,
            self.jobs_pending()
        );
        let id = match parse_command(verb, payload) {
            Ok(c) => c.id,
            Err(Rejection { id: Some(id), .. }) => id,
            Err(Rejection { id: None, code, message }) => return vec![self.rejected(topic, code, message, now_ms)],
        };
        tracing::warn!(op = %id, "refused: {message}");
        vec![self.refuse_unrecorded(&id, verb, ErrorCode::Busy, message, now_ms)]
    }

    /// A failed record for a command that was not taken, sent without journaling and not
    /// retained: the id stays free (for a retry, or for the rightful sender).
    fn refuse_unrecorded(&self, id: &OpId, verb: &str, code: ErrorCode, message: String, now_ms: i64) -> Out {
        let id = id.clone();
        let ts = time::format_unix_ms(now_ms);
        let record = debfleet_protocol::OpRecord {
            v: CONTRACT_VERSION,
            id: id.clone(),
            verb: verb.to_owned(),
            state: debfleet_protocol::OpState::Failed,
            accepted_at: ts.clone(),
            updated_at: ts,
            phase: None,
            percent: None,
            result: None,
            error: Some(OpError { code, message }),
            by: None,
            repeats: 0,
        };
        let mut out = self.publish(Topic::Op(self.cfg.device_id.clone(), id), &record);
        if let Out::Publish { retain, .. } = &mut out {
            *retain = false;
        }
        out
    }

    /// Answers an id seen before with its recorded outcome, or journals a new one.
    /// `durable`: the accepted record must be on disk before the work starts (work with effects
    /// that a power cut could interrupt). Instant commands skip that flush: their final record is
    /// written durably a moment later, and a crash in between leaves nothing half-done.
    fn begin(
        &mut self,
        id: &OpId,
        verb: &str,
        by: Option<&str>,
        now_ms: i64,
        durable: bool,
    ) -> Result<Vec<Out>, Vec<Out>> {
        if self.journal.get(id).is_some() {
            tracing::info!(op = %id, "repeated operation id; returning the recorded outcome");
            if let Err(e) = self.journal.repeat(id) {
                tracing::error!("{e}");
            }
            return Err(vec![self.publish_op(id)]);
        }
        match self.journal.accept(id.clone(), verb, by.map(str::to_owned), now_ms, !durable) {
            Ok(evicted) => {
                let mut out: Vec<Out> = evicted.iter().map(|e| self.clear(e)).collect();
                out.push(self.publish_op(id));
                Ok(out)
            }
            Err(e) => {
                tracing::error!("{e}");
                let record = json!({
                    "v": CONTRACT_VERSION, "id": id, "verb": verb, "state": "failed",
                    "accepted_at": time::format_unix_ms(now_ms), "updated_at": time::format_unix_ms(now_ms),
                    "error": {"code": ErrorCode::Internal, "message": format!("cannot record the operation: {e}")},
                });
                Err(vec![self.publish(Topic::Op(self.cfg.device_id.clone(), id.clone()), &record)])
            }
        }
    }

    fn fail_new(&mut self, id: OpId, verb: &str, code: ErrorCode, message: String, now_ms: i64) -> Vec<Out> {
        let mut out = match self.begin(&id, verb, None, now_ms, false) {
            Ok(out) => out,
            Err(out) => return out,
        };
        if let Err(e) = self.journal.finish_instant(&id, now_ms, Err(OpError { code, message })) {
            tracing::error!("{e}");
        }
        out.push(self.publish_op(&id));
        out
    }

    fn run(&mut self, cmd: Command, now_ms: i64) -> Vec<Out> {
        if cmd.expired(now_ms) && self.journal.get(&cmd.id).is_none() {
            let mut out = match self.begin(&cmd.id, cmd.verb.as_str(), cmd.by.as_deref(), now_ms, false) {
                Ok(out) => out,
                Err(out) => return out,
            };
            out.extend(self.expire(&cmd.id, cmd.expires_at.unwrap_or(now_ms), now_ms));
            return out;
        }
        let Command { id, verb, args, expires_at, by, .. } = cmd;
        // Commands that finish within this call (no job, no side effect outside the journal and
        // the configuration file, which is written durably itself).
        let instant = matches!(
            args,
            CommandArgs::Ping
                | CommandArgs::Cfg { .. }
                | CommandArgs::Clear { .. }
                | CommandArgs::Restart { unit: None }
        );
        let mut out = match self.begin_running(&id, verb.as_str(), by.as_deref(), now_ms, !instant) {
            Ok(out) => out,
            Err(out) => return out,
        };
        tracing::info!(op = %id, "running {}", verb.as_str());
        let mut after = Vec::new();
        let op = || Origin { id: id.clone(), expires_at };
        let outcome = match args {
            CommandArgs::Ping => Ok(json!({
                "agent_version": env!("CARGO_PKG_VERSION"),
                "uptime_s": self.started.elapsed().as_secs(),
            })),
            CommandArgs::Refresh => {
                let managed = self.managed.names(&self.cfg.packages);
                return self.start_job(out, op(), JobKind::Refresh(managed), PackageOptions::default());
            }
            CommandArgs::Install { packages, options } => {
                return self.start_job(out, op(), JobKind::Install(packages), options)
            }
            CommandArgs::Upgrade { packages, options } => {
                let packages = if packages.is_empty() {
                    self.managed
                        .names(&self.cfg.packages)
                        .into_iter()
                        .map(|name| PackageSpec { name, version: None })
                        .collect()
                } else {
                    packages
                };
                return self.start_job(out, op(), JobKind::Upgrade(packages), options);
            }
            CommandArgs::Uninstall { packages, purge, options } => {
                // No units to watch after a removal.
                let options = PackageOptions { watch_s: None, ..options };
                return self.start_job(out, op(), JobKind::Uninstall { packages, purge }, options);
            }
            CommandArgs::Rollback { package, options } => match self.rollback_target(&package) {
                Ok(target) => return self.start_job(out, op(), JobKind::Rollback(target), options),
                Err(e) => Err(e),
            },
            CommandArgs::Restart { unit: Some(unit) } => {
                if self.managed_units().iter().any(|(u, _)| *u == unit) {
                    return self.start_job(out, op(), JobKind::RestartUnit(unit), PackageOptions::default());
                }
                Err(OpError {
                    code: ErrorCode::InvalidValue,
                    message: format!("{unit:?} is not a unit of a managed package"),
                })
            }
            args @ (CommandArgs::Shell { .. } | CommandArgs::Forward { .. }) => match self.open_session(&id, args) {
                Ok(orders) => {
                    out.extend(orders);
                    return out;
                }
                Err(e) => Err(e),
            },
            CommandArgs::Journal { unit, since_s, lines, follow } => match (self.journal_units(unit), follow) {
                (Ok(units), None) => {
                    let kind = JobKind::Journal { units, since_s, lines };
                    return self.start_job(out, op(), kind, PackageOptions::default());
                }
                (Ok(units), Some(key)) => match self.open_follow(&id, key, units, since_s, lines) {
                    Ok(orders) => {
                        out.extend(orders);
                        return out;
                    }
                    Err(e) => Err(e),
                },
                (Err(e), _) => Err(e),
            },
            CommandArgs::Restart { unit: None } if !self.under_systemd => Err(OpError {
                code: ErrorCode::NotSupported,
                message: "the agent is not running under systemd, so nothing would start it again; restart it by hand"
                    .into(),
            }),
            CommandArgs::Restart { unit: None } => {
                after.push(Out::Restart);
                Ok(json!({"restarting": true}))
            }
            CommandArgs::Cfg { set } => self.apply_cfg(&set, &mut after, now_ms),
            // Answered when the component answers (or its time is up).
            CommandArgs::Call { component, action, args } => {
                match self.call_component(&id, component, action, args, now_ms) {
                    Ok(sent) => {
                        out.extend(sent);
                        return out;
                    }
                    Err(e) => Err(e),
                }
            }
            CommandArgs::Clear { ops, older_than_s } => {
                let older = older_than_s.map(|s| (s as i64).saturating_mul(1000));
                let (clear, skipped) = self.journal.clearable(&ops, older, now_ms);
                let clear: Vec<OpId> = clear.into_iter().filter(|c| *c != id).collect();
                after = self.unretain_all(&clear, now_ms);
                Ok(json!({"cleared": clear, "skipped": skipped}))
            }
        };
        if let Err(e) = &outcome {
            tracing::warn!(op = %id, "{} failed: {}", verb.as_str(), e.message);
        }
        let finished = time::now_unix_ms().max(now_ms);
        let saved = if instant {
            self.journal.finish_instant(&id, finished, outcome)
        } else {
            self.journal.finish(&id, finished, outcome)
        };
        if let Err(e) = saved {
            tracing::error!("{e}");
        }
        out.push(self.publish_op(&id));
        // Restart goes last, after the result is on its way.
        out.extend(after);
        out
    }

    /// Starts an operation the agent decided on itself (to converge on the desired state):
    /// journaled, published and run with the same lifecycle as a command's.
    pub(super) fn start_internal(
        &mut self,
        id: OpId,
        verb: Verb,
        by: Option<&str>,
        kind: JobKind,
        now_ms: i64,
    ) -> Vec<Out> {
        let out = match self.begin_running(&id, verb.as_str(), by, now_ms, true) {
            Ok(out) => out,
            Err(out) => return out,
        };
        tracing::info!(op = %id, "{} to converge on the desired state", verb.as_str());
        self.start_job(out, Origin { id, expires_at: None }, kind, PackageOptions::default())
    }

    /// `begin`, then the operation marked running and published.
    fn begin_running(
        &mut self,
        id: &OpId,
        verb: &str,
        by: Option<&str>,
        now_ms: i64,
        durable: bool,
    ) -> Result<Vec<Out>, Vec<Out>> {
        let mut out = self.begin(id, verb, by, now_ms, durable)?;
        if let Err(e) = self.journal.set_running(id, now_ms, None) {
            tracing::error!("{e}");
        }
        out.push(self.publish_op(id));
        Ok(out)
    }

    pub(super) fn start_job(
        &mut self,
        mut out: Vec<Out>,
        op: Origin,
        kind: JobKind,
        options: PackageOptions,
    ) -> Vec<Out> {
        let Origin { id, expires_at } = op;
        let PackageOptions { dry_run, watch_s } = options;
        let watch = std::time::Duration::from_secs(watch_s.unwrap_or(self.cfg.apt.watch_s).into());
        // A single operation with the defaults ends once its units have settled; a window the
        // operator asked for is watched in full.
        let settle = watch_s.is_none().then(|| std::time::Duration::from_secs(self.cfg.apt.settle_s.into()));
        let touched: Vec<String> = match &kind {
            JobKind::Install(p) | JobKind::Upgrade(p) | JobKind::Uninstall { packages: p, .. } => {
                p.iter().map(|s| s.name.clone()).collect()
            }
            JobKind::Rollback(p) => vec![p.name.clone()],
            JobKind::Converge { packages, .. } => packages.iter().map(|s| s.name.clone()).collect(),
            JobKind::RestartUnit(_) | JobKind::Refresh(_) | JobKind::Resume { .. } | JobKind::Journal { .. } => {
                Vec::new()
            }
        };
        if !touched.is_empty() && !dry_run {
            if let Err(e) = self.journal.set_packages(&id, touched) {
                tracing::error!("{e}");
            }
        }
        if let Err(e) = self.journal.progress(&id, time::now_unix_ms(), debfleet_protocol::Phase::Queued, None) {
            tracing::error!("{e}");
        }
        out.push(self.publish_op(&id));
        self.jobs.push_back(Job { id, kind, dry_run, watch, settle, expires_at });
        out.extend(self.next_job());
        out
    }

    /// The version a rollback goes to: the one named, or the one installed before the current.
    fn rollback_target(&self, p: &PackageSpec) -> Result<PackageSpec, OpError> {
        if p.version.is_some() {
            return Ok(p.clone());
        }
        let state = self.dpkg.packages_state(std::slice::from_ref(&p.name));
        let current = state.get(&p.name).and_then(|s| s.version.clone());
        match self.managed.previous(&p.name, current.as_deref()) {
            Some(v) => Ok(PackageSpec { name: p.name.clone(), version: Some(v) }),
            None => Err(OpError {
                code: ErrorCode::InvalidValue,
                message: format!("no earlier version of {} was installed through debfleet; name the version", p.name),
            }),
        }
    }

    fn apply_cfg(&mut self, patch: &Value, after: &mut Vec<Out>, now_ms: i64) -> Result<Value, OpError> {
        // The file's keys, the earlier overrides, then this change: a profile named here picks
        // new defaults for every key no layer sets.
        let next = self
            .overrides
            .with(patch, &self.cfg.file_patch)
            .map_err(|e| OpError { code: ErrorCode::InvalidValue, message: e.to_string() })?;
        self.overrides.add(patch).map_err(|e| OpError {
            code: ErrorCode::Internal,
            message: format!("cannot persist the configuration: {e}"),
        })?;
        let old_filters = self.command_filters();
        let old_link = self.link_settings();
        self.runtime = next;
        if let Some(spool) = &mut self.spool {
            let before = spool.dropped;
            spool.set_max_bytes(u64::from(self.runtime.outbox.max_kb) * 1024);
            self.link.dropped(spool.dropped - before);
        }
        let relink = self.link_settings() != old_link;
        let new_filters = self.command_filters();
        let gone: Vec<String> = old_filters.iter().filter(|f| !new_filters.contains(f)).cloned().collect();
        let added: Vec<String> = new_filters.iter().filter(|f| !old_filters.contains(f)).cloned().collect();
        if !gone.is_empty() {
            after.push(Out::Unsubscribe(gone));
        }
        if !added.is_empty() {
            after.push(Out::Subscribe(added));
        }
        self.desired_groups_changed(now_ms);
        if let Some(g) = &self.log_gate {
            g.apply(&self.runtime.logs);
        }
        let dev = self.cfg.device_id.clone();
        after.push(
            self.publish(Topic::Cfg(dev.clone()), &CfgMessage { v: CONTRACT_VERSION, cfg: self.runtime.clone() }),
        );
        after.push(self.publish(Topic::Meta(dev), &self.meta()));
        // The profile, keepalive or budget it reports may have changed.
        after.push(self.link_report(time::now_unix_ms()));
        if relink {
            self.report_next_connect = true;
            // Last: what this change publishes is queued before the reconnect.
            after.push(Out::Relink(self.link_settings()));
        }
        tracing::info!("configuration changed: {patch}");
        Ok(serde_json::to_value(&self.runtime).expect("serializes"))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;
    use debfleet_protocol::OpState;

    #[test]
    fn ping_lifecycle_and_dedupe() {
        let mut f = fixture(false);
        let outs = f.core.on_message("debfleet/fleet/cmd/ping", br#"{"id":"p1","by":"ana"}"#, false, 1000);
        let states: Vec<OpState> = op_states(&outs, "p1").iter().map(|r| r.state).collect();
        assert_eq!(states, [OpState::Accepted, OpState::Running, OpState::Succeeded]);
        let first = op_states(&outs, "p1").pop().unwrap();
        // The record says who asked.
        assert_eq!(first.by.as_deref(), Some("ana"));
        let again = f.core.on_message("debfleet/device/d1/cmd/ping", br#"{"id":"p1"}"#, false, 5000);
        let records = op_states(&again, "p1");
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].repeats, 1);
        assert_eq!(records[0].updated_at, first.updated_at);
    }

    #[test]
    fn a_device_that_requires_signatures_refuses_unsigned_commands_without_recording_them() {
        let mut f = fixture_with(false, "require_signed_commands = true\noperators_dir = \"/nonexistent\"\n");
        for topic in ["debfleet/device/d1/cmd/ping", "debfleet/group/lab/cmd/ping", "debfleet/fleet/cmd/ping"] {
            let outs = f.core.on_message(topic, br#"{"id":"p1","expires_at":"2030-01-01T00:00:00Z"}"#, false, 1000);
            let (t, v, retain) = publishes(&outs).pop().unwrap();
            assert_eq!(
                (t.as_str(), v["state"].as_str(), v["error"]["code"].as_str(), retain),
                ("debfleet/device/d1/op/p1", Some("failed"), Some("unauthorized"), false),
                "{topic}"
            );
            assert!(f.core.journal.get(&OpId::new("p1").unwrap()).is_none(), "the id stays free");
        }
        // The same device without the setting runs it (the id was never taken).
        let mut f = fixture(false);
        let outs = f.core.on_message("debfleet/device/d1/cmd/ping", br#"{"id":"p1"}"#, false, 1000);
        assert_eq!(op_states(&outs, "p1").pop().unwrap().state, OpState::Succeeded);
    }

    #[test]
    fn ignores_other_devices_and_groups() {
        let mut f = fixture(false);
        assert!(f.core.on_message("debfleet/device/d2/cmd/ping", br#"{"id":"p1"}"#, false, 0).is_empty());
        assert!(f.core.on_message("debfleet/group/other/cmd/ping", br#"{"id":"p1"}"#, false, 0).is_empty());
        assert!(f.core.on_message("elsewhere/x", b"{}", false, 0).is_empty());
        assert_eq!(
            op_states(&f.core.on_message("debfleet/group/lab/cmd/ping", br#"{"id":"p1"}"#, false, 0), "p1").len(),
            3
        );
    }

    #[test]
    fn bad_input_gets_error_codes() {
        let mut f = fixture(false);
        let outs = f.core.on_message("debfleet/device/d1/cmd/ping", b"{nope", false, 0);
        let (topic, v, retain) = publishes(&outs).pop().unwrap();
        assert_eq!(
            (topic.as_str(), v["code"].as_str(), retain),
            ("debfleet/device/d1/rejected", Some("malformed_json"), false)
        );
        let outs = f.core.on_message("debfleet/device/d1/cmd/fly", br#"{"id":"f1"}"#, false, 0);
        let rec = op_states(&outs, "f1").pop().unwrap();
        assert_eq!((rec.state, rec.error.unwrap().code), (OpState::Failed, ErrorCode::UnknownVerb));
        let outs = f.core.on_message(
            "debfleet/device/d1/cmd/cfg",
            br#"{"id":"c1","set":{"logs":{"level":"loud"}}}"#,
            false,
            0,
        );
        let err = op_states(&outs, "c1").pop().unwrap().error.unwrap();
        assert_eq!(err.code, ErrorCode::InvalidValue);
        assert!(err.message.contains("logs.level"), "{}", err.message);
        let outs = f.core.on_message("debfleet/device/d1/cmd/restart", br#"{"id":"r1"}"#, false, 0);
        assert_eq!(op_states(&outs, "r1").pop().unwrap().error.unwrap().code, ErrorCode::NotSupported);
        assert!(!outs.contains(&Out::Restart));
    }

    #[test]
    fn retained_commands_never_run_and_are_reported_once() {
        let mut f = fixture(false);
        let topic = "debfleet/fleet/cmd/install";
        let payload = br#"{"id":"i9","packages":["hello"]}"#;
        let outs = f.core.on_message(topic, payload, true, 0);
        assert!(!outs.iter().any(|o| matches!(o, Out::Job(_))));
        assert!(op_states(&outs, "i9").is_empty());
        let (t, v, retain) = publishes(&outs).pop().unwrap();
        assert_eq!(
            (t.as_str(), v["code"].as_str(), retain),
            ("debfleet/device/d1/rejected", Some("retained_command"), false)
        );
        // Delivered again after a reconnect: not reported again.
        assert!(f.core.on_message(topic, payload, true, 10).is_empty());
        // The same id sent live later runs: the retained copy did not take it.
        assert!(f.core.on_message(topic, payload, false, 20).iter().any(|o| matches!(o, Out::Job(_))));
    }

    #[test]
    fn clearing_a_retained_command_is_not_malformed_json() {
        let mut f = fixture(false);
        assert!(f.core.on_message("debfleet/fleet/cmd/ping", b"", true, 0).is_empty());
        assert!(f.core.on_message("debfleet/fleet/cmd/ping", b"", false, 0).is_empty());
    }

    #[test]
    fn over_the_intake_bound_commands_get_busy_and_are_not_recorded() {
        let mut f = fixture(false);
        f.core.set_backlog(MAX_BACKLOG + 1);
        let outs = f.core.on_message("debfleet/device/d1/cmd/ping", br#"{"id":"b1"}"#, false, 0);
        let (_, v, retain) = publishes(&outs).pop().unwrap();
        assert_eq!((v["state"].as_str(), v["error"]["code"].as_str(), retain), (Some("failed"), Some("busy"), false));
        // An id already recorded gets its recorded outcome, busy or not.
        f.core.set_backlog(0);
        f.core.on_message("debfleet/device/d1/cmd/ping", br#"{"id":"done-1"}"#, false, 0);
        f.core.set_backlog(MAX_BACKLOG + 1);
        let again = f.core.on_message("debfleet/device/d1/cmd/ping", br#"{"id":"done-1"}"#, false, 0);
        assert_eq!(op_states(&again, "done-1").pop().unwrap().state, OpState::Succeeded);
        f.core.set_backlog(0);
        // The id was not journaled: sent again, it runs.
        let states: Vec<OpState> =
            op_states(&f.core.on_message("debfleet/device/d1/cmd/ping", br#"{"id":"b1"}"#, false, 1), "b1")
                .iter()
                .map(|r| r.state)
                .collect();
        assert_eq!(states, [OpState::Accepted, OpState::Running, OpState::Succeeded]);
        // Queued jobs count too: one runs, the rest wait queued.
        for i in 0..MAX_JOBS_PENDING {
            let p = format!(r#"{{"id":"j{i}","packages":["hello"]}}"#);
            let outs = f.core.on_message("debfleet/device/d1/cmd/install", p.as_bytes(), false, 2);
            let started = outs.iter().any(|o| matches!(o, Out::Job(_)));
            assert_eq!(started, i == 0, "job {i}");
            let queued = op_states(&outs, &format!("j{i}")).pop().unwrap();
            assert_eq!(queued.phase, Some(debfleet_protocol::Phase::Queued));
        }
        let outs =
            f.core.on_message("debfleet/device/d1/cmd/install", br#"{"id":"jx","packages":["hello"]}"#, false, 3);
        assert_eq!(publishes(&outs).pop().unwrap().1["error"]["code"], "busy");
    }

    #[test]
    fn restart_under_systemd_reports_then_stops() {
        let mut f = fixture(true);
        let outs = f.core.on_message("debfleet/device/d1/cmd/restart", br#"{"id":"r1"}"#, false, 0);
        assert_eq!(outs.last(), Some(&Out::Restart));
        assert_eq!(op_states(&outs, "r1").pop().unwrap().state, OpState::Succeeded);
    }

    #[test]
    fn cfg_change_resubscribes_and_republishes() {
        let mut f = fixture(false);
        let outs = f.core.on_message(
            "debfleet/device/d1/cmd/cfg",
            br#"{"id":"c1","set":{"groups":["edge"],"telemetry":{"cpu":{"interval_s":2}}}}"#,
            false,
            0,
        );
        assert!(outs
            .contains(&Out::Unsubscribe(vec!["debfleet/group/lab/cmd/+".into(), "debfleet/desired/group/lab".into()])));
        assert!(outs
            .contains(&Out::Subscribe(vec!["debfleet/group/edge/cmd/+".into(), "debfleet/desired/group/edge".into()])));
        let cfg = publishes(&outs).into_iter().find(|(t, _, _)| t.ends_with("/cfg")).unwrap().1;
        assert_eq!(cfg["telemetry"]["cpu"]["interval_s"], 2);
        assert_eq!(f.core.runtime().telemetry.cpu.interval_s, 2);
    }

    #[test]
    fn clear_and_expiry_publish_empty_retained() {
        let mut f = fixture(false);
        f.core.on_message("debfleet/device/d1/cmd/ping", br#"{"id":"p1"}"#, false, 0);
        f.core.on_message("debfleet/device/d1/cmd/ping", br#"{"id":"p2"}"#, false, 0);
        let outs = f.core.on_message("debfleet/device/d1/cmd/clear", br#"{"id":"c1","ops":["p1"]}"#, false, 1000);
        let cleared: Vec<_> = publishes(&outs).into_iter().filter(|(_, v, _)| v.is_null()).map(|(t, _, _)| t).collect();
        assert_eq!(cleared, ["debfleet/device/d1/op/p1"]);
        // Journal capacity is 4: the next ops evict the oldest finished ones and clear them.
        // p1 goes first (already cleared: nothing to publish), then p2.
        f.core.on_message("debfleet/device/d1/cmd/ping", br#"{"id":"p3"}"#, false, 2000);
        let outs = f.core.on_message("debfleet/device/d1/cmd/ping", br#"{"id":"p4"}"#, false, 2000);
        assert!(!publishes(&outs).iter().any(|(_, v, _)| v.is_null()));
        let outs = f.core.on_message("debfleet/device/d1/cmd/ping", br#"{"id":"p5"}"#, false, 2000);
        assert!(publishes(&outs).iter().any(|(t, v, _)| t.ends_with("/op/p2") && v.is_null()));
    }

    #[test]
    fn rollback_and_restart_need_something_to_act_on() {
        let mut f = fixture(false);
        let outs = f.core.on_message("debfleet/device/d1/cmd/rollback", br#"{"id":"r1","package":"hello"}"#, false, 0);
        let err = op_states(&outs, "r1").pop().unwrap().error.unwrap();
        assert_eq!(err.code, ErrorCode::InvalidValue);
        assert!(err.message.contains("no earlier version"), "{}", err.message);
        let outs =
            f.core.on_message("debfleet/device/d1/cmd/restart", br#"{"id":"r2","unit":"ssh.service"}"#, false, 0);
        let err = op_states(&outs, "r2").pop().unwrap().error.unwrap();
        assert!(err.message.contains("not a unit of a managed package"), "{}", err.message);
        // A named version needs no history.
        let outs =
            f.core.on_message("debfleet/device/d1/cmd/rollback", br#"{"id":"r3","package":"hello=0.9"}"#, false, 0);
        assert!(outs.iter().any(|o| matches!(o, Out::Job(j) if j.kind == JobKind::Rollback(PackageSpec { name: "hello".into(), version: Some("0.9".into()) }))));
    }
}
