//! The projector component (`debfleet-projector`): a projector on a serial line. `dialect`
//! (what a maker's projectors understand: Optoma's ASCII protocol first), `port` (one command
//! and its acknowledgement at a time, noise skipped, an unplugged adapter noticed), `projector`
//! (the component), and `sim` (a simulated projector on a pseudo-terminal, for tests and the
//! lab).

pub mod dialect;
pub mod port;
pub mod projector;
pub mod sim;
