//! Components as the core sees them: connections that said hello, what each last reported
//! (republished on every connect), the `call` operations waiting for an answer, and the
//! device's `state/components` from the package database and the live connections. The
//! socket itself is the edge's (`crate::components`); a connection is a number here.

use std::collections::BTreeMap;

use debfleet_protocol::component::{
    CallResult, ComponentCfgMessage, ComponentEntry, ComponentMeta, ComponentState, ComponentStateMessage,
    ComponentStatus, ComponentsState, Down, Up,
};
use debfleet_protocol::topics::ComponentFact;
use debfleet_protocol::{time, ActionName, ComponentId, ErrorCode, OpError, OpId, Topic, CONTRACT_VERSION};
use serde_json::{Map, Value};

use super::{Core, Out};

/// How long a component has to answer a call.
pub const CALL_TIMEOUT_MS: i64 = 30_000;

/// A component connected to the agent.
struct Live {
    conn: u64,
    meta: ComponentMeta,
    state: ComponentState,
}

struct Pending {
    component: ComponentId,
    conn: u64,
    deadline_ms: i64,
}

#[derive(Default)]
pub struct Components {
    live: BTreeMap<ComponentId, Live>,
    /// Which component each connection speaks for, after its hello.
    conns: BTreeMap<u64, ComponentId>,
    pending: BTreeMap<OpId, Pending>,
    /// The process id each component last connected from, and how often it changed.
    pids: BTreeMap<ComponentId, (Option<u32>, u32)>,
    /// Every retained fact last published per component (republished on a connect; cleared
    /// when the component's package goes).
    facts: BTreeMap<(ComponentId, &'static str), Out>,
    /// The `state/components` last published.
    listed: Option<ComponentsState>,
    /// What dpkg's database says is installed, read again after package operations and on a
    /// connect (a component's status changes do not read the disk).
    installed: Option<Vec<debfleet_apt::dpkg::InstalledComponent>>,
    /// Whether the broker may hold a list with components in it (kept across restarts in
    /// `state_dir/components-listed`): a device that never had one publishes none, so
    /// devices without components pay nothing for them on the wire.
    had_list: Option<bool>,
}

/// The marker file of [`Components::had_list`].
const LISTED_MARKER: &str = "components-listed";

impl Core {
    fn installed_components(&mut self) -> &[debfleet_apt::dpkg::InstalledComponent] {
        let dpkg = &self.dpkg;
        self.components.installed.get_or_insert_with(|| dpkg.components())
    }

    /// Packages may have changed (an operation ended, a new connection): read them again.
    pub(super) fn forget_installed_components(&mut self) {
        self.components.installed = None;
    }

    fn component_topic(&self, c: &ComponentId, fact: ComponentFact) -> Topic {
        Topic::Component(self.cfg.device_id.clone(), c.clone(), fact)
    }

    /// Publishes a component's retained fact and keeps it for the next connect.
    fn component_fact<T: serde::Serialize>(&mut self, c: &ComponentId, fact: ComponentFact, payload: &T) -> Out {
        let out = self.publish(self.component_topic(c, fact), payload);
        self.components.facts.insert((c.clone(), fact.as_str()), out.clone());
        out
    }

    fn bye(conn: u64, reason: String) -> Out {
        tracing::warn!("component connection {conn}: {reason}");
        Out::Component { conn, frame: Down::Bye { reason }, close: true }
    }

    /// One frame from a component's connection.
    pub fn on_component(&mut self, conn: u64, pid: Option<u32>, frame: Up, now_ms: i64) -> Vec<Out> {
        let Some(id) = self.components.conns.get(&conn).cloned() else {
            return match frame {
                Up::Hello { meta } => self.hello(conn, pid, meta),
                _ => vec![Self::bye(conn, "the first frame must be a hello".into())],
            };
        };
        match frame {
            Up::Hello { .. } => vec![Self::bye(conn, format!("{id}: a second hello"))],
            Up::Status { status } => {
                if let Some(l) = self.components.live.get_mut(&id) {
                    l.state = status.state;
                }
                let mut out = vec![self.component_fact(&id, ComponentFact::Status, &status)];
                out.extend(self.list_components());
                out
            }
            Up::State { state } => {
                let msg = ComponentStateMessage { v: CONTRACT_VERSION, ts: time::now(), state };
                vec![self.component_fact(&id, ComponentFact::State, &msg)]
            }
            Up::Cfg { cfg } => {
                let msg = ComponentCfgMessage { v: CONTRACT_VERSION, cfg };
                vec![self.component_fact(&id, ComponentFact::Cfg, &msg)]
            }
            // Streams share the device's budget and on-disk outbox.
            Up::Telemetry { telemetry } => {
                let out = self.publish(self.component_topic(&id, ComponentFact::Telemetry), &telemetry);
                self.components.facts.insert((id.clone(), ComponentFact::Telemetry.as_str()), out.clone());
                self.stream(out).into_iter().collect()
            }
            Up::Stream { sample } => {
                let out = self.publish(self.component_topic(&id, ComponentFact::Stream), &sample);
                self.stream(out).into_iter().collect()
            }
            Up::Logs { logs } => {
                let out = self.publish(self.component_topic(&id, ComponentFact::Logs), &logs);
                self.stream(out).into_iter().collect()
            }
            Up::Result { id: op, result } => {
                match self.components.pending.get(&op) {
                    Some(p) if p.conn == conn => {}
                    _ => {
                        tracing::warn!(op = %op, "{id} answered a call it was not given; ignored");
                        return Vec::new();
                    }
                }
                self.components.pending.remove(&op);
                let outcome = match result {
                    CallResult::Ok(v) => Ok(v),
                    CallResult::Err(e) => Err(e),
                };
                self.finish_call(&op, outcome, now_ms)
            }
        }
    }

    fn hello(&mut self, conn: u64, pid: Option<u32>, meta: ComponentMeta) -> Vec<Out> {
        let id = meta.component.clone();
        if let Some(l) = self.components.live.get(&id) {
            let reason = format!("{id} is already connected (connection {}); one process per component", l.conn);
            return vec![Self::bye(conn, reason)];
        }
        let (last, restarts) = self.components.pids.entry(id.clone()).or_insert((None, 0));
        if last.is_some() && *last != pid {
            *restarts += 1;
        }
        *last = pid;
        tracing::info!("component {id} {} connected (connection {conn})", meta.version);
        self.components.conns.insert(conn, id.clone());
        self.components.live.insert(id.clone(), Live { conn, meta: meta.clone(), state: ComponentState::Idle });
        let mut out =
            vec![Out::Component { conn, frame: Down::Welcome { device: self.cfg.device_id.clone() }, close: false }];
        out.push(self.component_fact(&id, ComponentFact::Meta, &meta));
        out.extend(self.list_components());
        out
    }

    /// A component's connection ended: it is `stopped`, and its calls fail.
    pub fn on_component_closed(&mut self, conn: u64, now_ms: i64) -> Vec<Out> {
        let Some(id) = self.components.conns.remove(&conn) else { return Vec::new() };
        self.components.live.remove(&id);
        tracing::info!("component {id} disconnected");
        let status = ComponentStatus {
            v: CONTRACT_VERSION,
            state: ComponentState::Stopped,
            since: time::format_unix_ms(now_ms),
            message: Some("disconnected from the agent".into()),
        };
        let mut out = vec![self.component_fact(&id, ComponentFact::Status, &status)];
        let orphans: Vec<OpId> =
            self.components.pending.iter().filter(|(_, p)| p.conn == conn).map(|(op, _)| op.clone()).collect();
        for op in orphans {
            self.components.pending.remove(&op);
            let e =
                OpError { code: ErrorCode::ComponentUnavailable, message: format!("{id} stopped before it answered") };
            out.extend(self.finish_call(&op, Err(e), now_ms));
        }
        out.extend(self.list_components());
        out
    }

    /// A `call` command: handed to the component, or failed at once when it is not there.
    pub(super) fn call_component(
        &mut self,
        op: &OpId,
        component: ComponentId,
        action: ActionName,
        args: Map<String, Value>,
        now_ms: i64,
    ) -> Result<Vec<Out>, OpError> {
        let Some(live) = self.components.live.get(&component) else {
            return Err(self.unavailable(&component));
        };
        if live.meta.action(action.as_str()).is_none() {
            let names: Vec<&str> = live.meta.actions.iter().map(|a| a.name.as_str()).collect();
            return Err(OpError {
                code: ErrorCode::UnknownAction,
                message: format!("{component} has no action {action} (it has {})", names.join(", ")),
            });
        }
        let conn = live.conn;
        self.components.pending.insert(op.clone(), Pending { component, conn, deadline_ms: now_ms + CALL_TIMEOUT_MS });
        Ok(vec![Out::Component { conn, frame: Down::Call { id: op.clone(), action, args }, close: false }])
    }

    /// Why a component that is not connected cannot take a call.
    fn unavailable(&mut self, component: &ComponentId) -> OpError {
        let installed = self.installed_components();
        let message = match installed.iter().find(|c| c.component == component.as_str()) {
            Some(c) => format!(
                "{component} is installed ({} {}) but not connected to the agent; see its unit {}",
                c.package, c.version, c.unit
            ),
            None => {
                let names: Vec<&str> = installed.iter().map(|c| c.component.as_str()).collect();
                let have = if names.is_empty() { "none".to_owned() } else { names.join(", ") };
                format!("no component {component} on this device (installed: {have})")
            }
        };
        OpError { code: ErrorCode::ComponentUnavailable, message }
    }

    fn finish_call(&mut self, op: &OpId, outcome: Result<Value, OpError>, now_ms: i64) -> Vec<Out> {
        if let Err(e) = &outcome {
            tracing::warn!(op = %op, "call failed: {}", e.message);
        }
        if let Err(e) = self.journal.finish(op, time::now_unix_ms().max(now_ms), outcome) {
            tracing::error!("{e}");
        }
        vec![self.publish_op(op)]
    }

    /// Calls past their deadline fail with `timeout` (called every second).
    pub(super) fn call_deadlines(&mut self, now_ms: i64) -> Vec<Out> {
        let late: Vec<(OpId, ComponentId)> = self
            .components
            .pending
            .iter()
            .filter(|(_, p)| now_ms >= p.deadline_ms)
            .map(|(op, p)| (op.clone(), p.component.clone()))
            .collect();
        let mut out = Vec::new();
        for (op, c) in late {
            self.components.pending.remove(&op);
            let message =
                format!("{c} did not answer within {} s; its state shows what it did", CALL_TIMEOUT_MS / 1000);
            out.extend(self.finish_call(&op, Err(OpError { code: ErrorCode::Timeout, message }), now_ms));
        }
        out
    }

    /// `state/components` when it changed: the package database's components with the state
    /// each last reported; a component whose package is gone has its retained facts cleared.
    pub(super) fn list_components(&mut self) -> Vec<Out> {
        let mut list = ComponentsState { v: CONTRACT_VERSION, components: BTreeMap::new() };
        for c in self.installed_components().to_vec() {
            let Ok(id) = ComponentId::new(c.component) else { continue };
            let state = self.components.live.get(&id).map_or(ComponentState::Stopped, |l| l.state);
            let restarts = self.components.pids.get(&id).map_or(0, |p| p.1);
            list.components
                .insert(id, ComponentEntry { package: c.package, version: c.version, unit: c.unit, state, restarts });
        }
        // A component running without a package (started by hand) is listed too.
        for (id, l) in &self.components.live {
            list.components.entry(id.clone()).or_insert_with(|| ComponentEntry {
                package: String::new(),
                version: l.meta.version.clone(),
                unit: String::new(),
                state: l.state,
                restarts: self.components.pids.get(id).map_or(0, |p| p.1),
            });
        }
        if self.components.listed.as_ref() == Some(&list) {
            return Vec::new();
        }
        let marker = self.cfg.state_dir.join(LISTED_MARKER);
        let had = *self.components.had_list.get_or_insert_with(|| marker.exists());
        let mut out = Vec::new();
        let gone: Vec<(ComponentId, &'static str)> =
            self.components.facts.keys().filter(|(id, _)| !list.components.contains_key(id)).cloned().collect();
        for key in gone {
            if let Some(Out::Publish { topic, retain: true, reliable, class, .. }) = self.components.facts.remove(&key)
            {
                // An empty retained message clears the topic on the broker.
                out.push(Out::Publish { topic, payload: Vec::new(), retain: true, reliable, class });
            }
        }
        let topic = Topic::StateComponents(self.cfg.device_id.clone());
        match (list.components.is_empty(), had) {
            (true, false) => {}
            (true, true) => {
                // Cleared: the topic's absence says "no components".
                if let Out::Publish { topic, reliable, class, .. } = self.publish(topic, &list) {
                    out.push(Out::Publish { topic, payload: Vec::new(), retain: true, reliable, class });
                }
                if let Err(e) = std::fs::remove_file(&marker) {
                    tracing::warn!("{}: {e}", marker.display());
                }
                self.components.had_list = Some(false);
            }
            (false, _) => {
                out.push(self.publish(topic, &list));
                if !had {
                    if let Err(e) = std::fs::write(&marker, b"") {
                        tracing::warn!("{}: {e}", marker.display());
                    }
                    self.components.had_list = Some(true);
                }
            }
        }
        self.components.listed = Some(list);
        out
    }

    /// The components' retained facts, for a connect.
    pub(super) fn component_facts(&self) -> Vec<Out> {
        let mut out: Vec<Out> = self.components.facts.values().cloned().collect();
        if let Some(list) = self.components.listed.as_ref().filter(|l| !l.components.is_empty()) {
            out.push(self.publish(Topic::StateComponents(self.cfg.device_id.clone()), list));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use crate::core::Event;
    use debfleet_protocol::component::ActionSpec;

    fn meta(id: &str) -> ComponentMeta {
        ComponentMeta {
            v: 1,
            component: id.parse().unwrap(),
            version: "1.0".into(),
            actions: vec![ActionSpec { name: "clear".parse().unwrap(), help: String::new(), params: vec![] }],
            metrics: vec![],
        }
    }

    fn frames(outs: &[Out]) -> Vec<(u64, Down, bool)> {
        outs.iter()
            .filter_map(|o| match o {
                Out::Component { conn, frame, close } => Some((*conn, frame.clone(), *close)),
                _ => None,
            })
            .collect()
    }

    fn up(core: &mut Core, conn: u64, pid: u32, frame: Up) -> Vec<Out> {
        core.handle(Event::Component { conn, pid: Some(pid), frame }, time::now_unix_ms())
    }

    fn call(core: &mut Core, id: &str, component: &str, action: &str) -> Vec<Out> {
        let payload = format!(r#"{{"id":"{id}","component":"{component}","action":"{action}"}}"#);
        core.handle(
            Event::Message {
                topic: "debfleet/device/d1/cmd/call".into(),
                payload: payload.into_bytes(),
                retain: false,
            },
            time::now_unix_ms(),
        )
    }

    #[test]
    fn hello_welcome_facts_and_a_call_answered() {
        let mut f = fixture(false);
        let core = &mut f.core;
        let out = up(core, 1, 100, Up::Hello { meta: meta("led-strip") });
        assert!(matches!(&frames(&out)[..], [(1, Down::Welcome { .. }, false)]));
        let pubs = publishes(&out);
        assert!(pubs
            .iter()
            .any(|(t, v, r)| t == "debfleet/device/d1/components/led-strip/meta" && v["version"] == "1.0" && *r));
        assert!(pubs
            .iter()
            .any(|(t, v, _)| t == "debfleet/device/d1/state/components"
                && v["components"]["led-strip"]["state"] == "idle"));

        let out = call(core, "c1", "led-strip", "clear");
        assert!(matches!(&frames(&out)[..], [(1, Down::Call { .. }, false)]));
        assert_eq!(op_states(&out, "c1").last().unwrap().state.as_str(), "running");
        let out = up(
            core,
            1,
            100,
            Up::Result { id: "c1".parse().unwrap(), result: CallResult::Ok(serde_json::json!({"ok": 1})) },
        );
        let rec = op_states(&out, "c1").pop().unwrap();
        assert_eq!((rec.state.as_str(), rec.result.unwrap()["ok"].as_i64()), ("succeeded", Some(1)));
        // A repeated id gets the recorded outcome; the component is not asked again.
        let out = call(core, "c1", "led-strip", "clear");
        assert!(frames(&out).is_empty());
        assert_eq!(op_states(&out, "c1").pop().unwrap().repeats, 1);
    }

    #[test]
    fn unavailable_unknown_duplicate_gone_and_late() {
        let mut f = fixture(false);
        let core = &mut f.core;
        let out = call(core, "c1", "led-strip", "clear");
        let e = op_states(&out, "c1").pop().unwrap().error.unwrap();
        assert_eq!(e.code, ErrorCode::ComponentUnavailable);
        up(core, 1, 100, Up::Hello { meta: meta("led-strip") });
        // A frame before the hello, a second process for the same id: refused and closed.
        assert!(matches!(
            &frames(&up(core, 2, 101, Up::Hello { meta: meta("led-strip") }))[..],
            [(2, Down::Bye { .. }, true)]
        ));
        let state = Up::State { state: Map::new() };
        assert!(matches!(&frames(&up(core, 3, 102, state))[..], [(3, Down::Bye { .. }, true)]));
        let out = call(core, "c2", "led-strip", "dance");
        assert_eq!(op_states(&out, "c2").pop().unwrap().error.unwrap().code, ErrorCode::UnknownAction);
        // An answer to a call it never got is ignored.
        let out = up(core, 1, 100, Up::Result { id: "zz".parse().unwrap(), result: CallResult::Ok(Value::Null) });
        assert!(out.is_empty());

        call(core, "c3", "led-strip", "clear");
        let out = core.handle(Event::ComponentClosed { conn: 1 }, time::now_unix_ms());
        assert_eq!(op_states(&out, "c3").pop().unwrap().error.unwrap().code, ErrorCode::ComponentUnavailable);
        let pubs = publishes(&out);
        assert!(pubs.iter().any(|(t, v, _)| t.ends_with("/components/led-strip/status") && v["state"] == "stopped"));

        // Back from another process: a restart; a call it never answers times out.
        up(core, 4, 200, Up::Hello { meta: meta("led-strip") });
        let key: ComponentId = "led-strip".parse().unwrap();
        assert_eq!(core.components.listed.as_ref().unwrap().components[&key].restarts, 1);
        call(core, "c4", "led-strip", "clear");
        let out = core.call_deadlines(time::now_unix_ms() + CALL_TIMEOUT_MS);
        assert_eq!(op_states(&out, "c4").pop().unwrap().error.unwrap().code, ErrorCode::Timeout);

        // Gone for good (its package removed, here: a hand-started one that stopped): the list
        // is cleared, as are the component's retained facts.
        let out = core.handle(Event::ComponentClosed { conn: 4 }, time::now_unix_ms());
        let cleared: Vec<String> =
            publishes(&out).into_iter().filter(|(_, v, _)| v.is_null()).map(|(t, ..)| t).collect();
        assert!(cleared.contains(&"debfleet/device/d1/state/components".to_owned()), "{cleared:?}");
        assert!(cleared.contains(&"debfleet/device/d1/components/led-strip/meta".to_owned()), "{cleared:?}");
    }

    #[test]
    fn a_device_without_components_publishes_no_list() {
        let mut f = fixture(false);
        let out = f.core.handle(Event::Connected { since: time::now() }, time::now_unix_ms());
        assert!(!publishes(&out).iter().any(|(t, ..)| t.contains("components")));
    }
}
