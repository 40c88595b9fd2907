//! The ROS 1 bridge: ROS topics forwarded as the component's streams (rate limited, decimated,
//! fields selected), commands published on ROS topics after their fields are checked against
//! the message type, stale topics, a master that goes away and comes back. See decision 0013
//! for the client library.

pub mod bridge;
pub mod convert;
pub mod node;
pub mod service;
pub mod types;
pub mod xmlrpc;
