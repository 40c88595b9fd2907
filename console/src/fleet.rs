//! The fleet as the retained topics describe it, assembled from messages. Pure: no IO.

use std::collections::BTreeMap;

use debfleet_protocol::component::{
    ComponentCfgMessage, ComponentMeta, ComponentStateMessage, ComponentStatus, ComponentTelemetry, ComponentsState,
};
use debfleet_protocol::desired::DesiredReport;
use debfleet_protocol::topics::ComponentFact;
use debfleet_protocol::{
    CfgMessage, ComponentId, DeviceId, GroupName, LinkState, Meta, OpId, OpRecord, PackagesState, Status, Telemetry,
    Topic, Topics, UnitsState,
};

#[derive(Debug, Default, Clone)]
pub struct Device {
    pub meta: Option<Meta>,
    pub status: Option<Status>,
    pub cfg: Option<CfgMessage>,
    pub packages: Option<PackagesState>,
    pub units: Option<UnitsState>,
    pub telemetry: Option<Telemetry>,
    pub link: Option<LinkState>,
    pub ops: BTreeMap<OpId, OpRecord>,
    /// `state/components`.
    pub components: Option<ComponentsState>,
    /// Each component's own retained facts.
    pub component: BTreeMap<ComponentId, ComponentView>,
    /// `state/desired`: where the device stands against its desired state.
    pub desired: Option<DesiredReport>,
}

/// What the broker holds of one component.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ComponentView {
    pub meta: Option<ComponentMeta>,
    pub status: Option<ComponentStatus>,
    pub state: Option<ComponentStateMessage>,
    pub cfg: Option<ComponentCfgMessage>,
    pub telemetry: Option<ComponentTelemetry>,
}

impl ComponentView {
    fn is_empty(&self) -> bool {
        self.meta.is_none()
            && self.status.is_none()
            && self.state.is_none()
            && self.cfg.is_none()
            && self.telemetry.is_none()
    }
}

impl Device {
    pub fn groups(&self) -> &[GroupName] {
        self.meta.as_ref().map(|m| m.groups.as_slice()).unwrap_or(&[])
    }

    pub fn status_word(&self) -> &'static str {
        self.status.as_ref().map(|s| s.state.as_str()).unwrap_or("unknown")
    }

    fn is_empty(&self) -> bool {
        self.meta.is_none()
            && self.status.is_none()
            && self.cfg.is_none()
            && self.packages.is_none()
            && self.units.is_none()
            && self.telemetry.is_none()
            && self.link.is_none()
            && self.ops.is_empty()
            && self.components.is_none()
            && self.component.is_empty()
            && self.desired.is_none()
    }

    /// When the device was last heard from: the newest timestamp among the facts the broker
    /// holds for it. For a `lost` device this is about when it vanished, where `since` in its
    /// status is only the start of the connection that vanished.
    pub fn last_heard(&self) -> Option<&str> {
        let status = self.status.as_ref().map(|s| s.since.as_str());
        let others = [
            self.telemetry.as_ref().map(|t| t.ts.as_str()),
            self.packages.as_ref().map(|p| p.ts.as_str()),
            self.units.as_ref().map(|u| u.ts.as_str()),
            self.link.as_ref().map(|l| l.ts.as_str()),
        ];
        let ops = self.ops.values().map(|o| Some(o.updated_at.as_str()));
        // RFC 3339 in UTC with fixed milliseconds: the text order is the time order.
        std::iter::once(status).chain(others).chain(ops).flatten().max()
    }

    /// What the SINCE column says: the connection's start while online, the last sign of life
    /// otherwise.
    pub fn since(&self) -> Option<&str> {
        match &self.status {
            Some(s) if s.state == debfleet_protocol::Liveness::Lost => self.last_heard(),
            Some(s) => Some(&s.since),
            None => self.last_heard(),
        }
    }

    pub fn is_online(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.state == debfleet_protocol::Liveness::Online)
    }
}

/// What one message changed, for callers that react to changes (watch, waiting for results).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Status(DeviceId),
    Op(DeviceId, OpId),
    Other(DeviceId),
    /// A payload that did not parse; the message says why.
    Invalid(String),
    Ignored,
}

#[derive(Debug, Default)]
pub struct Fleet {
    pub devices: BTreeMap<DeviceId, Device>,
}

impl Fleet {
    pub fn apply(&mut self, topics: &Topics, topic: &str, payload: &[u8]) -> Change {
        let Ok(t) = topics.parse(topic) else {
            return Change::Ignored;
        };
        let Some(dev) = t.device().cloned() else {
            return Change::Ignored;
        };
        let empty = payload.is_empty();
        let invalid = |e: serde_json::Error| Change::Invalid(format!("{topic}: {e}"));
        // An empty retained payload deletes the fact.
        macro_rules! set {
            ($field:ident) => {{
                let d = self.devices.entry(dev.clone()).or_default();
                if empty {
                    d.$field = None;
                } else {
                    match serde_json::from_slice(payload) {
                        Ok(v) => d.$field = Some(v),
                        Err(e) => return invalid(e),
                    }
                }
            }};
        }
        let change = match t {
            Topic::Session(..) => return Change::Ignored,
            Topic::Meta(_) => {
                set!(meta);
                Change::Other(dev.clone())
            }
            Topic::Status(_) => {
                set!(status);
                Change::Status(dev.clone())
            }
            Topic::Cfg(_) => {
                set!(cfg);
                Change::Other(dev.clone())
            }
            Topic::StatePackages(_) => {
                set!(packages);
                Change::Other(dev.clone())
            }
            Topic::StateUnits(_) => {
                set!(units);
                Change::Other(dev.clone())
            }
            Topic::Telemetry(_) => {
                set!(telemetry);
                Change::Other(dev.clone())
            }
            Topic::StateLink(_) => {
                set!(link);
                Change::Other(dev.clone())
            }
            Topic::StateComponents(_) => {
                set!(components);
                Change::Other(dev.clone())
            }
            Topic::StateDesired(_) => {
                set!(desired);
                Change::Other(dev.clone())
            }
            Topic::Component(_, c, fact) => {
                let d = self.devices.entry(dev.clone()).or_default();
                let view = d.component.entry(c.clone()).or_default();
                macro_rules! put {
                    ($field:ident) => {{
                        if empty {
                            view.$field = None;
                        } else {
                            match serde_json::from_slice(payload) {
                                Ok(v) => view.$field = Some(v),
                                Err(e) => return invalid(e),
                            }
                        }
                    }};
                }
                match fact {
                    ComponentFact::Meta => put!(meta),
                    ComponentFact::Status => put!(status),
                    ComponentFact::State => put!(state),
                    ComponentFact::Cfg => put!(cfg),
                    ComponentFact::Telemetry => put!(telemetry),
                    ComponentFact::Logs | ComponentFact::Stream => {}
                }
                if view.is_empty() {
                    d.component.remove(&c);
                }
                Change::Other(dev.clone())
            }
            Topic::Op(_, op) => {
                let d = self.devices.entry(dev.clone()).or_default();
                if empty {
                    d.ops.remove(&op);
                } else {
                    match serde_json::from_slice::<OpRecord>(payload) {
                        Ok(r) => {
                            d.ops.insert(op.clone(), r);
                        }
                        Err(e) => return invalid(e),
                    }
                }
                Change::Op(dev.clone(), op)
            }
            Topic::Logs(_) | Topic::Rejected(_) => return Change::Other(dev),
            Topic::DeviceCmd(..)
            | Topic::GroupCmd(..)
            | Topic::FleetCmd(_)
            | Topic::DesiredDevice(_)
            | Topic::DesiredGroup(_)
            | Topic::Rollout(..) => return Change::Ignored,
        };
        // A device whose facts have all been deleted is gone.
        if empty && self.devices.get(&dev).is_some_and(Device::is_empty) {
            self.devices.remove(&dev);
        }
        change
    }

    pub fn members(&self, group: &GroupName) -> Vec<DeviceId> {
        self.devices.iter().filter(|(_, d)| d.groups().contains(group)).map(|(id, _)| id.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_devices_and_forgets_deleted_facts() {
        let t = Topics::default();
        let mut f = Fleet::default();
        let status = br#"{"v":1,"state":"online","since":"2026-01-01T00:00:00.000Z","boot_id":"b"}"#;
        assert_eq!(f.apply(&t, "debfleet/device/d1/status", status), Change::Status(DeviceId::new("d1").unwrap()));
        assert!(f.devices[&DeviceId::new("d1").unwrap()].is_online());
        assert!(matches!(f.apply(&t, "debfleet/device/d1/meta", b"{bad"), Change::Invalid(_)));
        assert_eq!(f.apply(&t, "other/topic", b"x"), Change::Ignored);
        // Facts arrive in any order; a device known only by its telemetry so far stays.
        f.apply(&t, "debfleet/device/d2/telemetry", br#"{"v":1,"ts":"2026-01-01T00:00:00.000Z","cpu":1.0}"#);
        assert!(f.devices[&DeviceId::new("d2").unwrap()].telemetry.is_some());
        f.apply(&t, "debfleet/device/d1/status", b"");
        assert!(!f.devices.contains_key(&DeviceId::new("d1").unwrap()));
        // A component's facts, and their deletion.
        let status = br#"{"v":1,"state":"running","since":"2026-01-01T00:00:00.000Z"}"#;
        f.apply(&t, "debfleet/device/d3/components/led-strip/status", status);
        let d3 = DeviceId::new("d3").unwrap();
        let led = ComponentId::new("led-strip").unwrap();
        assert_eq!(f.devices[&d3].component[&led].status.as_ref().unwrap().state.as_str(), "running");
        f.apply(&t, "debfleet/device/d3/components/led-strip/status", b"");
        assert!(!f.devices.contains_key(&d3), "its only fact is gone, and so is the device");
    }

    #[test]
    fn a_lost_device_is_dated_by_its_last_message_not_its_connection_start() {
        let t = Topics::default();
        let mut f = Fleet::default();
        let lost = br#"{"v":1,"state":"lost","since":"2026-01-01T00:00:00.000Z","boot_id":"b"}"#;
        f.apply(&t, "debfleet/device/d1/status", lost);
        f.apply(&t, "debfleet/device/d1/telemetry", br#"{"v":1,"ts":"2026-01-01T05:00:00.000Z","cpu":1.0}"#);
        f.apply(&t, "debfleet/device/d1/state/packages", br#"{"v":1,"ts":"2026-01-01T04:00:00.000Z","packages":{}}"#);
        let d = &f.devices[&DeviceId::new("d1").unwrap()];
        assert_eq!(d.last_heard(), Some("2026-01-01T05:00:00.000Z"));
        assert_eq!(d.since(), Some("2026-01-01T05:00:00.000Z"));
        let online = br#"{"v":1,"state":"online","since":"2026-01-01T00:00:00.000Z","boot_id":"b"}"#;
        f.apply(&t, "debfleet/device/d1/status", online);
        assert_eq!(f.devices[&DeviceId::new("d1").unwrap()].since(), Some("2026-01-01T00:00:00.000Z"));
    }
}
