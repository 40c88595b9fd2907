//! Topic names: built from typed parts and parsed back, so no other crate formats a topic string.

use crate::ids::{ComponentId, DeviceId, GroupName, IdError, OpId, RolloutId};

/// The retained topics of one rollout (see `rollout.rs`: each has one writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutPart {
    /// `rollout/ID`: the controller's state.
    State,
    /// `rollout/ID/spec`: what `rollout create` asked for.
    Spec,
    /// `rollout/ID/control`: the operator's latest instruction.
    Control,
    /// `rollout/ID/lease`: which controller drives it.
    Lease,
}

/// What a component publishes (through its device's agent) under
/// `device/ID/components/CID/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentFact {
    Meta,
    Status,
    State,
    Cfg,
    Telemetry,
    Logs,
    /// Samples of a component's named streams (a ROS topic through the bridge): not retained.
    Stream,
}

impl ComponentFact {
    pub const ALL: [ComponentFact; 7] = [
        ComponentFact::Meta,
        ComponentFact::Status,
        ComponentFact::State,
        ComponentFact::Cfg,
        ComponentFact::Telemetry,
        ComponentFact::Logs,
        ComponentFact::Stream,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ComponentFact::Meta => "meta",
            ComponentFact::Status => "status",
            ComponentFact::State => "state",
            ComponentFact::Cfg => "cfg",
            ComponentFact::Telemetry => "telemetry",
            ComponentFact::Logs => "logs",
            ComponentFact::Stream => "stream",
        }
    }
}

/// One topic of the contract. See `docs/contract.md` for direction, retention and QoS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    Meta(DeviceId),
    Status(DeviceId),
    Cfg(DeviceId),
    StatePackages(DeviceId),
    StateUnits(DeviceId),
    StateLink(DeviceId),
    /// The components installed on the device.
    StateComponents(DeviceId),
    /// Where the device stands against its desired state.
    StateDesired(DeviceId),
    /// The desired state of one device (published by consoles and rollout controllers).
    DesiredDevice(DeviceId),
    /// The desired state of a group's devices.
    DesiredGroup(GroupName),
    Rollout(RolloutId, RolloutPart),
    Component(DeviceId, ComponentId, ComponentFact),
    Telemetry(DeviceId),
    Logs(DeviceId),
    /// Commands the device could not even attribute to an operation (no usable id).
    Rejected(DeviceId),
    Op(DeviceId, OpId),
    /// One direction of a remote session (see `session.rs`); outside `device/` so that what
    /// follows a fleet's facts does not get every session's bytes.
    Session(DeviceId, OpId, crate::session::Direction),
    DeviceCmd(DeviceId, String),
    GroupCmd(GroupName, String),
    FleetCmd(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic {0:?} is not under the prefix")]
    OutsidePrefix(String),
    #[error("topic {0:?} is not part of the contract")]
    Unknown(String),
    #[error("topic {topic:?}: {source}")]
    BadId { topic: String, source: IdError },
    #[error("topic {0:?}: verb must match [a-z][a-z0-9_]{{0,31}}")]
    BadVerb(String),
}

/// The QoS a topic's messages are published with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

impl Topic {
    /// How the topic's messages travel — retained or not, and with which QoS — from this one
    /// table (the topics table of docs/contract.md is checked against it). The latest
    /// telemetry is retained, so a console that connects sees current figures at once, but sent
    /// at QoS 0: a lost sample is replaced by the next.
    pub fn delivery(&self) -> (bool, Qos) {
        match self {
            Topic::Meta(_)
            | Topic::Status(_)
            | Topic::Cfg(_)
            | Topic::StatePackages(_)
            | Topic::StateUnits(_)
            | Topic::StateLink(_)
            | Topic::StateComponents(_)
            | Topic::StateDesired(_)
            | Topic::DesiredDevice(_)
            | Topic::DesiredGroup(_)
            | Topic::Rollout(..)
            | Topic::Op(..) => (true, Qos::AtLeastOnce),
            Topic::Component(_, _, fact) => match fact {
                ComponentFact::Telemetry => (true, Qos::AtMostOnce),
                ComponentFact::Logs | ComponentFact::Stream => (false, Qos::AtMostOnce),
                _ => (true, Qos::AtLeastOnce),
            },
            Topic::Telemetry(_) => (true, Qos::AtMostOnce),
            Topic::Logs(_) => (false, Qos::AtMostOnce),
            Topic::Rejected(_)
            | Topic::Session(..)
            | Topic::DeviceCmd(..)
            | Topic::GroupCmd(..)
            | Topic::FleetCmd(_) => (false, Qos::AtLeastOnce),
        }
    }

    /// Whether the device publishes this fact retained.
    pub fn retained(&self) -> bool {
        self.delivery().0
    }

    /// The device the topic belongs to, for device topics.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Topic::Meta(d)
            | Topic::Status(d)
            | Topic::Cfg(d)
            | Topic::StatePackages(d)
            | Topic::StateUnits(d)
            | Topic::StateLink(d)
            | Topic::StateComponents(d)
            | Topic::StateDesired(d)
            | Topic::Component(d, ..)
            | Topic::Telemetry(d)
            | Topic::Logs(d)
            | Topic::Rejected(d)
            | Topic::Op(d, _)
            | Topic::Session(d, ..)
            | Topic::DeviceCmd(d, _) => Some(d),
            Topic::GroupCmd(..)
            | Topic::FleetCmd(_)
            | Topic::DesiredDevice(_)
            | Topic::DesiredGroup(_)
            | Topic::Rollout(..) => None,
        }
    }
}

/// A verb is a single topic level; the set of verbs a device understands is in its meta.
pub fn valid_verb(verb: &str) -> bool {
    let b = verb.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

/// Topic names under one prefix (default `debfleet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics { prefix: "debfleet".into() }
    }
}

impl Topics {
    /// The prefix may have several levels but no wildcards and no empty level.
    pub fn new(prefix: &str) -> Result<Self, TopicError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 128
            && !prefix.contains(['+', '#', '\0'])
            && prefix.split('/').all(|l| !l.is_empty());
        if !ok {
            return Err(TopicError::Unknown(prefix.to_owned()));
        }
        Ok(Topics { prefix: prefix.to_owned() })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn name(&self, topic: &Topic) -> String {
        let p = &self.prefix;
        match topic {
            Topic::Meta(d) => format!("{p}/device/{d}/meta"),
            Topic::Status(d) => format!("{p}/device/{d}/status"),
            Topic::Cfg(d) => format!("{p}/device/{d}/cfg"),
            Topic::StatePackages(d) => format!("{p}/device/{d}/state/packages"),
            Topic::StateUnits(d) => format!("{p}/device/{d}/state/units"),
            Topic::StateLink(d) => format!("{p}/device/{d}/state/link"),
            Topic::StateComponents(d) => format!("{p}/device/{d}/state/components"),
            Topic::StateDesired(d) => format!("{p}/device/{d}/state/desired"),
            Topic::DesiredDevice(d) => format!("{p}/desired/device/{d}"),
            Topic::DesiredGroup(g) => format!("{p}/desired/group/{g}"),
            Topic::Rollout(id, part) => match part {
                RolloutPart::State => format!("{p}/rollout/{id}"),
                RolloutPart::Spec => format!("{p}/rollout/{id}/spec"),
                RolloutPart::Control => format!("{p}/rollout/{id}/control"),
                RolloutPart::Lease => format!("{p}/rollout/{id}/lease"),
            },
            Topic::Component(d, c, fact) => format!("{p}/device/{d}/components/{c}/{}", fact.as_str()),
            Topic::Telemetry(d) => format!("{p}/device/{d}/telemetry"),
            Topic::Logs(d) => format!("{p}/device/{d}/logs"),
            Topic::Rejected(d) => format!("{p}/device/{d}/rejected"),
            Topic::Op(d, op) => format!("{p}/device/{d}/op/{op}"),
            Topic::Session(d, op, dir) => format!("{p}/session/{d}/{op}/{}", dir.as_str()),
            Topic::DeviceCmd(d, verb) => format!("{p}/device/{d}/cmd/{verb}"),
            Topic::GroupCmd(g, verb) => format!("{p}/group/{g}/cmd/{verb}"),
            Topic::FleetCmd(verb) => format!("{p}/fleet/cmd/{verb}"),
        }
    }

    /// Everything one device publishes (what a console subscribes to for one device).
    pub fn device_filter(&self, device: &DeviceId) -> String {
        format!("{}/device/{device}/#", self.prefix)
    }

    /// Everything every device publishes.
    /// The fleet index consoles keep (retained): the devices the last read found, so the next
    /// read knows when it has them all.
    pub fn index(&self) -> String {
        format!("{}/index", self.prefix)
    }

    pub fn fleet_filter(&self) -> String {
        format!("{}/device/+/#", self.prefix)
    }

    /// What a device subscribes to: its own, its groups' and the fleet's commands, and its own
    /// and its groups' desired state.
    pub fn command_filters<'a>(
        &self,
        device: &DeviceId,
        groups: impl IntoIterator<Item = &'a GroupName>,
    ) -> Vec<String> {
        let p = &self.prefix;
        let mut v = vec![
            format!("{p}/device/{device}/cmd/+"),
            format!("{p}/fleet/cmd/+"),
            format!("{p}/desired/device/{device}"),
        ];
        for g in groups {
            v.push(format!("{p}/group/{g}/cmd/+"));
            v.push(format!("{p}/desired/group/{g}"));
        }
        v
    }

    /// Every desired-state record.
    pub fn desired_filter(&self) -> String {
        format!("{}/desired/#", self.prefix)
    }

    /// Every rollout's topics.
    pub fn rollout_filter(&self) -> String {
        format!("{}/rollout/#", self.prefix)
    }

    pub fn group_cmd_filter(&self, group: &GroupName) -> String {
        format!("{}/group/{group}/cmd/+", self.prefix)
    }

    pub fn parse(&self, name: &str) -> Result<Topic, TopicError> {
        let unknown = || TopicError::Unknown(name.to_owned());
        let rest = name
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| TopicError::OutsidePrefix(name.to_owned()))?;
        let levels: Vec<&str> = rest.split('/').collect();
        let bad_id = |source| TopicError::BadId { topic: name.to_owned(), source };
        let verb = |v: &str| {
            if valid_verb(v) {
                Ok(v.to_owned())
            } else {
                Err(TopicError::BadVerb(name.to_owned()))
            }
        };
        match levels.as_slice() {
            ["device", dev, tail @ ..] => {
                let d = DeviceId::new(*dev).map_err(bad_id)?;
                Ok(match tail {
                    ["meta"] => Topic::Meta(d),
                    ["status"] => Topic::Status(d),
                    ["cfg"] => Topic::Cfg(d),
                    ["state", "packages"] => Topic::StatePackages(d),
                    ["state", "units"] => Topic::StateUnits(d),
                    ["state", "link"] => Topic::StateLink(d),
                    ["state", "components"] => Topic::StateComponents(d),
                    ["state", "desired"] => Topic::StateDesired(d),
                    ["components", c, fact] => {
                        let c = ComponentId::new(*c).map_err(bad_id)?;
                        let fact = ComponentFact::ALL.into_iter().find(|f| f.as_str() == *fact).ok_or_else(unknown)?;
                        Topic::Component(d, c, fact)
                    }
                    ["telemetry"] => Topic::Telemetry(d),
                    ["logs"] => Topic::Logs(d),
                    ["rejected"] => Topic::Rejected(d),
                    ["op", op] => Topic::Op(d, OpId::new(*op).map_err(bad_id)?),
                    ["cmd", v] => Topic::DeviceCmd(d, verb(v)?),
                    _ => return Err(unknown()),
                })
            }
            ["group", g, "cmd", v] => Ok(Topic::GroupCmd(GroupName::new(*g).map_err(bad_id)?, verb(v)?)),
            ["fleet", "cmd", v] => Ok(Topic::FleetCmd(verb(v)?)),
            ["session", d, op, dir] => {
                use crate::session::Direction;
                let dir = match *dir {
                    "in" => Direction::In,
                    "out" => Direction::Out,
                    _ => return Err(unknown()),
                };
                Ok(Topic::Session(DeviceId::new(*d).map_err(bad_id)?, OpId::new(*op).map_err(bad_id)?, dir))
            }
            ["desired", "device", d] => Ok(Topic::DesiredDevice(DeviceId::new(*d).map_err(bad_id)?)),
            ["desired", "group", g] => Ok(Topic::DesiredGroup(GroupName::new(*g).map_err(bad_id)?)),
            ["rollout", id, part @ ..] => {
                let id = RolloutId::new(*id).map_err(bad_id)?;
                let part = match part {
                    [] => RolloutPart::State,
                    ["spec"] => RolloutPart::Spec,
                    ["control"] => RolloutPart::Control,
                    ["lease"] => RolloutPart::Lease,
                    _ => return Err(unknown()),
                };
                Ok(Topic::Rollout(id, part))
            }
            _ => Err(unknown()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn builds_and_parses() {
        let t = Topics::default();
        let op = OpId::new("op-1").unwrap();
        for topic in [
            Topic::Meta(dev("d1")),
            Topic::Status(dev("d1")),
            Topic::Cfg(dev("d1")),
            Topic::StatePackages(dev("d1")),
            Topic::Telemetry(dev("d1")),
            Topic::Logs(dev("d1")),
            Topic::Rejected(dev("d1")),
            Topic::Op(dev("d1"), op.clone()),
            Topic::Session(dev("d1"), op.clone(), crate::session::Direction::In),
            Topic::Session(dev("d1"), op, crate::session::Direction::Out),
            Topic::StateComponents(dev("d1")),
            Topic::Component(dev("d1"), ComponentId::new("led-strip").unwrap(), ComponentFact::State),
            Topic::Component(dev("d1"), ComponentId::new("led-strip").unwrap(), ComponentFact::Logs),
            Topic::DeviceCmd(dev("d1"), "ping".into()),
            Topic::GroupCmd(GroupName::new("lab").unwrap(), "ping".into()),
            Topic::FleetCmd("refresh".into()),
            Topic::StateDesired(dev("d1")),
            Topic::DesiredDevice(dev("d1")),
            Topic::DesiredGroup(GroupName::new("lab").unwrap()),
            Topic::Rollout(RolloutId::new("r-1").unwrap(), RolloutPart::State),
            Topic::Rollout(RolloutId::new("r-1").unwrap(), RolloutPart::Spec),
            Topic::Rollout(RolloutId::new("r-1").unwrap(), RolloutPart::Control),
            Topic::Rollout(RolloutId::new("r-1").unwrap(), RolloutPart::Lease),
        ] {
            assert_eq!(t.parse(&t.name(&topic)).unwrap(), topic);
        }
        assert_eq!(t.name(&Topic::Status(dev("d1"))), "debfleet/device/d1/status");
    }

    #[test]
    fn rejects_foreign_and_malformed() {
        let t = Topics::new("acme/fleet").unwrap();
        assert!(matches!(t.parse("debfleet/device/d/meta"), Err(TopicError::OutsidePrefix(_))));
        assert!(matches!(t.parse("acme/fleet/device/D/meta"), Err(TopicError::BadId { .. })));
        assert!(matches!(t.parse("acme/fleet/device/d/nope"), Err(TopicError::Unknown(_))));
        assert!(matches!(t.parse("acme/fleet/fleet/cmd/Bad"), Err(TopicError::BadVerb(_))));
        assert!(matches!(t.parse("acme/fleet/device/d/components/Led/meta"), Err(TopicError::BadId { .. })));
        assert!(matches!(t.parse("acme/fleet/device/d/components/led/nope"), Err(TopicError::Unknown(_))));
        assert!(Topics::new("a/+/b").is_err());
        assert!(Topics::new("a//b").is_err());
    }

    fn id_strategy() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9_-]{0,20}"
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = Topics::default().parse(&s);
        }

        #[test]
        fn device_topics_round_trip(d in id_strategy(), op in "[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", verb in "[a-z][a-z0-9_]{0,10}") {
            let t = Topics::default();
            let d = DeviceId::new(d).unwrap();
            for topic in [
                Topic::Op(d.clone(), OpId::new(op.clone()).unwrap()),
                Topic::DeviceCmd(d.clone(), verb.clone()),
                Topic::Meta(d.clone()),
            ] {
                prop_assert_eq!(t.parse(&t.name(&topic)).unwrap(), topic);
            }
        }

        #[test]
        fn parsed_topics_rebuild_identically(d in id_strategy(), tail in prop::sample::select(vec!["meta", "status", "cfg", "state/packages", "telemetry", "logs", "rejected", "cmd/x", "op/y"])) {
            let t = Topics::default();
            let name = format!("debfleet/device/{d}/{tail}");
            let topic = t.parse(&name).unwrap();
            prop_assert_eq!(t.name(&topic), name);
        }
    }
}
