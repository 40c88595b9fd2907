//! The debfleet MQTT contract as types.
//!
//! Invariant: this crate knows nothing about IO. It builds and parses topic names, defines every
//! payload, validates what arrives from the wire and holds the pure logic both ends share
//! (configuration patches, timestamps). The agent and the console do the IO.

pub mod broker;
pub mod cfg;
pub mod command;
pub mod component;
pub mod debian;
pub mod desired;
pub mod ids;
pub mod payloads;
pub mod roles;
pub mod rollout;
pub mod session;
pub mod signature;
pub mod time;
pub mod topics;
pub mod units;

/// Version of the contract carried as `v` in every payload.
pub const CONTRACT_VERSION: u32 = 1;

/// Size limits, in bytes, of payloads on the wire. A receiver rejects anything larger
/// without parsing it.
pub mod limits {
    /// A command sent to a device.
    pub const MAX_COMMAND_BYTES: usize = 16 * 1024;
    /// A retained device fact (meta, status, cfg, state, op).
    pub const MAX_STATE_BYTES: usize = 64 * 1024;
    /// One batch of log lines.
    pub const MAX_LOG_BATCH_BYTES: usize = 32 * 1024;
    /// One log line's message; longer messages are cut.
    pub const MAX_LOG_LINE_CHARS: usize = 1024;
    /// The MQTT packet size both ends configure their clients for. A larger packet makes the
    /// client library close the connection, so it sits above what any broker we ship or
    /// document delivers: [`BROKER_MAX_PACKET_BYTES`] for ours, 1 MB for EMQX's default.
    pub const MAX_PACKET_BYTES: usize = 2 * 1024 * 1024;
    /// What the broker configurations we ship and document accept (Mosquitto
    /// `max_packet_size`, the embedded broker's packet limit): a publish above it is refused at
    /// the broker and never reaches a device.
    pub const BROKER_MAX_PACKET_BYTES: usize = 256 * 1024;
}

pub use cfg::{CfgError, RuntimeCfg};
pub use command::{Command, CommandArgs, PackageOptions, PackageSpec, Rejection, Verb};
pub use ids::{ActionName, ComponentId, DeviceId, GroupName, IdError, OpId};
pub use payloads::*;
pub use roles::Role;
pub use topics::{RolloutPart, Topic, TopicError, Topics};
